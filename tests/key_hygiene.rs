//! Key hygiene: the passphrase never stays behind in freed heap memory, and damaged
//! LUKS headers and key slots give clear errors, never a panic.
//!
//! A counting allocator wraps the system one: every block freed by the process is
//! scanned for the passphrase before it is handed back. Opening, reading, writing
//! and closing an encrypted image, creating one, and failing to open one with a
//! wrong passphrase must leave no freed block holding it (`Zeroizing` buffers are
//! wiped before they are freed).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::Scratch;
use cowdisk::crypto::{LuksCreateOptions, Secret};
use cowdisk::{CreateOptions, EncryptionFormat, Error, Image, OpenOptions};

/// A passphrase no other data in the process contains.
const PASS: &[u8] = b"Zq7#hygiene-passphrase-9vK!";

struct Scanning;

static SCANNING: AtomicBool = AtomicBool::new(false);
static FOUND: AtomicUsize = AtomicUsize::new(0);

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

unsafe impl GlobalAlloc for Scanning {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if SCANNING.load(Ordering::Relaxed) && layout.size() >= PASS.len() {
            let block = std::slice::from_raw_parts(ptr, layout.size());
            if contains(block, PASS) {
                FOUND.fetch_add(1, Ordering::Relaxed);
            }
        }
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if SCANNING.load(Ordering::Relaxed) && layout.size() >= PASS.len() {
            // The old block is freed by realloc (or kept): scan it first.
            let block = std::slice::from_raw_parts(ptr, layout.size());
            if contains(block, PASS) {
                FOUND.fetch_add(1, Ordering::Relaxed);
            }
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Scanning = Scanning;

fn luks(iter_time_ms: u32) -> Option<EncryptionFormat> {
    Some(EncryptionFormat::Luks(LuksCreateOptions {
        iter_time_ms,
        ..LuksCreateOptions::default()
    }))
}

#[test]
fn the_passphrase_is_not_left_in_freed_memory_and_damage_is_reported() {
    let sc = Scratch::new("key-hygiene");
    let path = sc.path("k.qcow2");
    SCANNING.store(true, Ordering::SeqCst);
    {
        let opts = CreateOptions {
            encryption: luks(10),
            secret: Some(Secret::new(PASS.to_vec())),
            ..CreateOptions::default()
        };
        Image::create(&path, 1 << 20, &opts).unwrap();
        let open = OpenOptions {
            secret: Some(Secret::new(PASS.to_vec())),
            ..OpenOptions::default()
        };
        let img = Image::open(&path, &open).unwrap();
        img.write_at(&[7u8; 300_000], 4096).unwrap();
        let mut back = vec![0u8; 300_000];
        img.read_at(&mut back, 4096).unwrap();
        assert!(back.iter().all(|&b| b == 7));
        img.close().unwrap();
        let mut wrong = PASS.to_vec();
        wrong[0] ^= 1;
        let e = Image::open(
            &path,
            &OpenOptions {
                secret: Some(Secret::new(wrong)),
                ..OpenOptions::default()
            },
        )
        .err()
        .unwrap();
        assert_eq!(e.errno(), libc::EKEYREJECTED);
    }
    SCANNING.store(false, Ordering::SeqCst);
    assert_eq!(
        FOUND.load(Ordering::SeqCst),
        0,
        "freed heap blocks still held the passphrase"
    );

    // The scan works: a plain Vec holding the passphrase is caught when freed.
    SCANNING.store(true, Ordering::SeqCst);
    drop(std::hint::black_box(PASS.to_vec()));
    SCANNING.store(false, Ordering::SeqCst);
    assert_eq!(
        FOUND.swap(0, Ordering::SeqCst),
        1,
        "the scanner missed a plain copy"
    );

    damaged_images(&sc, &path);
}

fn open_err(path: &std::path::Path) -> Error {
    Image::open(
        path,
        &OpenOptions {
            secret: Some(Secret::new(PASS.to_vec())),
            ..OpenOptions::default()
        },
    )
    .err()
    .expect("a damaged image opened")
}

fn damaged_images(sc: &Scratch, good: &std::path::Path) {
    let bytes = std::fs::read(good).unwrap();
    // The LUKS area: cluster 4 for a 1 MiB image (header, reftable, refblock, L1).
    let area = 4 * 65536;
    assert_eq!(&bytes[area..area + 6], b"LUKS\xba\xbe");
    let variant = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let p = sc.path(name);
        let mut b = bytes.clone();
        f(&mut b);
        std::fs::write(&p, &b).unwrap();
        p
    };
    // A damaged key slot: its key material no longer decrypts to the master key.
    let p = variant("slot.qcow2", &|b| {
        for x in &mut b[area + 4096..area + 4096 + 4096] {
            *x ^= 0x5a;
        }
    });
    let e = open_err(&p);
    assert_eq!(e.errno(), libc::EKEYREJECTED, "{e}");
    // A corrupted header: bad magic, absurd iterations, key material outside the area.
    let p = variant("magic.qcow2", &|b| b[area] = b'X');
    let e = open_err(&p);
    assert!(
        matches!(e, Error::Corrupt(_)) && e.to_string().contains("LUKS"),
        "{e}"
    );
    let p = variant("iters.qcow2", &|b| {
        b[area + 208 + 4..area + 208 + 8].copy_from_slice(&u32::MAX.to_be_bytes())
    });
    let e = open_err(&p);
    assert!(e.to_string().contains("iteration"), "{e}");
    let p = variant("offset.qcow2", &|b| {
        b[area + 208 + 40..area + 208 + 44].copy_from_slice(&0x7fff_ffffu32.to_be_bytes())
    });
    open_err(&p);
    // The extension pointing past the end of the file.
    let p = variant("ext.qcow2", &|b| {
        let at = (0..4096)
            .find(|&i| b[i..i + 4] == 0x0537_be77u32.to_be_bytes())
            .unwrap();
        b[at + 8..at + 16].copy_from_slice(&(1u64 << 40).to_be_bytes());
    });
    let e = open_err(&p);
    assert!(e.to_string().contains("outside the file"), "{e}");
    // Random byte flips anywhere in the header: errors, never a panic.
    let mut seed = 0x1234_5678u64;
    for i in 0..200 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = area + (seed % 592) as usize;
        let p = variant(&format!("flip{i}.qcow2"), &|b| b[at] ^= 1 << (seed % 8));
        let r = std::panic::catch_unwind(|| {
            Image::open(
                &p,
                &OpenOptions {
                    secret: Some(Secret::new(PASS.to_vec())),
                    read_only: true,
                    ..OpenOptions::default()
                },
            )
            .map(|_| ())
        });
        assert!(r.is_ok(), "flip {i} at {at:#x} panicked");
        std::fs::remove_file(&p).unwrap();
    }
}
