//! Untrusted images: malformed headers and tables give a clear error, never a panic,
//! and random corruption of metadata never crashes the library.

mod common;

use common::*;
use cowdisk::{CreateOptions, Image, OpenOptions};
use std::path::Path;

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn fresh(s: &Scratch, name: &str) -> std::path::PathBuf {
    let p = s.path(name);
    Image::create(&p, 64 << 20, &CreateOptions::default()).unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.write_at(&[0x5a; 200_000], 1 << 20).unwrap();
    img.close().unwrap();
    p
}

fn open_err(path: &Path) -> cowdisk::Error {
    match Image::open(path, &OpenOptions::default()) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => e,
    }
}

#[test]
fn truncated_header() {
    let s = Scratch::new("trunc");
    let p = fresh(&s, "t.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(50)
        .unwrap();
    let e = open_err(&p);
    assert!(e.to_string().contains("truncated"), "{e}");
    assert_eq!(e.errno(), libc::EIO);
}

#[test]
fn truncated_tables() {
    let s = Scratch::new("trunc-tables");
    let p = fresh(&s, "t.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(0x30004)
        .unwrap();
    let e = open_err(&p);
    assert!(
        e.to_string()
            .contains("L1 table at 0x30000 (8 bytes) lies outside the file"),
        "{e}"
    );
}

#[test]
fn not_qcow2_and_empty() {
    let s = Scratch::new("notq");
    let p = s.path("x.raw");
    std::fs::write(&p, vec![7u8; 4096]).unwrap();
    let e = open_err(&p);
    assert!(e.to_string().contains("not a qcow2 image"), "{e}");
    assert_eq!(e.errno(), libc::EINVAL);
    std::fs::write(&p, b"").unwrap();
    assert!(open_err(&p).to_string().contains("empty"));
    let e = open_err(&s.path("missing.qcow2"));
    assert_eq!(e.errno(), libc::ENOENT);
    assert!(e.to_string().contains("missing.qcow2"), "{e}");
}

#[test]
fn l1_table_beyond_the_file() {
    let s = Scratch::new("l1far");
    let p = fresh(&s, "t.qcow2");
    patch(&p, 40, &0x1000_0000u64.to_be_bytes());
    let e = open_err(&p);
    assert!(e.to_string().contains("L1 table at 0x10000000"), "{e}");
    assert!(e.to_string().contains("outside the file"), "{e}");
}

#[test]
fn absurd_l1_size() {
    let s = Scratch::new("l1size");
    let p = fresh(&s, "t.qcow2");
    patch(&p, 36, &0xffff_fff0u32.to_be_bytes());
    let e = open_err(&p);
    assert!(e.to_string().contains("too large"), "{e}");
}

#[test]
fn bad_cluster_bits() {
    let s = Scratch::new("cbits");
    let p = fresh(&s, "t.qcow2");
    for bits in [0u32, 8, 22, 63, u32::MAX] {
        patch(&p, 20, &bits.to_be_bytes());
        let e = open_err(&p);
        assert!(e.to_string().contains("cluster_bits"), "{bits}: {e}");
    }
}

#[test]
fn refcount_table_at_cluster_zero() {
    let s = Scratch::new("rt0");
    let p = fresh(&s, "t.qcow2");
    patch(&p, 48, &0u64.to_be_bytes());
    let e = open_err(&p);
    assert!(
        e.to_string()
            .contains("refcount table at offset 0 overlaps the header"),
        "{e}"
    );
}

#[test]
fn missing_first_refcount_block_fails_writes_cleanly() {
    let s = Scratch::new("rb0");
    let p = fresh(&s, "t.qcow2");
    patch(&p, 0x10000, &0u64.to_be_bytes()); // refcount table entry 0 → no block
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, vec![0x5a; 4096], "reads still work");
    let e = img.write_at(&[1u8; 10], 40 << 20).unwrap_err();
    assert!(e.to_string().contains("refcount block 0 is missing"), "{e}");
}

#[test]
fn l2_table_and_data_outside_the_file() {
    let s = Scratch::new("l2far");
    let p = fresh(&s, "t.qcow2");
    let l1_entry_at = 0x30000u64;
    // Point the only L1 entry far away.
    patch(&p, l1_entry_at, &(0x8000_0000_7770_0000u64).to_be_bytes());
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 512];
    let e = img.read_at(&mut buf, 0).unwrap_err();
    assert!(
        e.to_string()
            .contains("L2 table at 0x77700000 lies outside the file"),
        "{e}"
    );
    drop(img);

    let p = fresh(&s, "t2.qcow2");
    // Read the L2 table offset from L1, then corrupt the entry for guest 1 MiB.
    let data = std::fs::read(&p).unwrap();
    let l2 = u64::from_be_bytes(data[0x30000..0x30008].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    let index = (1u64 << 20) / 65536;
    patch(
        &p,
        l2 + index * 8,
        &(0x8000_0000_9990_0000u64).to_be_bytes(),
    );
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let e = img.read_at(&mut buf, 1 << 20).unwrap_err();
    assert!(
        e.to_string()
            .contains("data cluster at 0x99900000 lies outside the file"),
        "{e}"
    );
    // Found by a read-write handle, the inconsistency marks the image corrupt (as
    // QEMU does): writes are refused and the next read-write open too.
    assert!(img.write_at(&[0u8; 512], 0).is_err());
    assert!(img.info().corrupt, "the corrupt bit");
    drop(img);
    assert!(Image::open(&p, &OpenOptions::default()).is_err());
    // Reserved bits in an L2 entry are corruption, named with the entry.
    patch(
        &p,
        l2 + index * 8,
        &(0x8000_0000_0005_0002u64).to_be_bytes(),
    );
    let ro = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let img = Image::open(&p, &ro).unwrap();
    let e = img.read_at(&mut buf, 1 << 20).unwrap_err();
    assert!(e.to_string().contains("reserved bits"), "{e}");
}

#[test]
fn unknown_incompatible_feature_is_named() {
    let s = Scratch::new("incompat");
    let p = fresh(&s, "t.qcow2");
    patch(&p, 72, &(1u64 << 4).to_be_bytes());
    let e = open_err(&p);
    assert_eq!(e.errno(), libc::ENOTSUP);
    assert!(e.to_string().contains("extended L2 entries"), "{e}");
    patch(&p, 72, &(1u64 << 40).to_be_bytes());
    let e = open_err(&p);
    assert!(e.to_string().contains("unknown feature bit 40"), "{e}");
    patch(&p, 72, &0u64.to_be_bytes());
    patch(&p, 32, &2u32.to_be_bytes());
    let e = open_err(&p);
    assert!(e.to_string().contains("LUKS"), "{e}");
}

/// Random byte flips in the metadata clusters: every call returns (Ok or Err), none
/// panics, and allocations stay bounded.
#[test]
fn random_corruption_never_panics() {
    let s = Scratch::new("fuzz");
    let pristine_path = fresh(&s, "pristine.qcow2");
    let pristine = std::fs::read(&pristine_path).unwrap();
    let mut rng = Rng::new(seed(99));
    let p = s.path("fuzzed.qcow2");
    for round in 0..300 {
        let mut data = pristine.clone();
        for _ in 0..1 + rng.below(8) {
            // Metadata lives in the first clusters: header, reftable, refblock, L1, L2.
            let at = rng.below(6 * 65536) as usize;
            let at = match rng.below(3) {
                0 => rng.below(120) as usize,          // header fields
                1 => 0x30000 + rng.below(16) as usize, // L1
                _ => at,
            };
            data[at] ^= 1 << rng.below(8);
        }
        std::fs::write(&p, &data).unwrap();
        for readonly in [true, false] {
            let opts = OpenOptions {
                read_only: readonly,
                ..OpenOptions::default()
            };
            let result = std::panic::catch_unwind(|| {
                if let Ok(img) = Image::open(&p, &opts) {
                    let size = img.size().min(64 << 20);
                    let mut buf = vec![0u8; 256 * 1024];
                    let at = (1u64 << 20).min(size.saturating_sub(buf.len() as u64));
                    let _ = img.read_at(&mut buf, at);
                    if !readonly {
                        let _ = img.write_at(&[3u8; 70000], 0);
                        let _ = img.write_at(&[4u8; 512], (5 << 20).min(size.saturating_sub(512)));
                    }
                    let _ = img.close();
                }
            });
            assert!(result.is_ok(), "round {round}: panic on a corrupted image");
        }
    }
}

/// The header and table limits QEMU's iotest 080 probes: each damaged field is
/// refused at open with a message naming it (never a panic or an absurd allocation).
#[test]
fn header_and_table_limits_of_iotest_080() {
    let s = Scratch::new("iotest-080");
    /// (what, pokes at header offsets, word the message must contain)
    type Case<'a> = (&'a str, &'a [(u64, &'a [u8])], &'a str);
    let cases: &[Case] = &[
        (
            "huge header length",
            &[(100, &0xffff_ffffu32.to_be_bytes())],
            "header",
        ),
        (
            "huge header length 2",
            &[(100, &0x7fff_ffffu32.to_be_bytes())],
            "header",
        ),
        (
            "huge extension",
            &[
                (112, &0x1234_5678u32.to_be_bytes()),
                (116, &0x7fff_ffffu32.to_be_bytes()),
            ],
            "extension",
        ),
        (
            "huge refcount table",
            &[(56, &0xffff_ffffu32.to_be_bytes())],
            "refcount table",
        ),
        (
            "refcount table too large",
            &[(56, &0x0002_0001u32.to_be_bytes())],
            "refcount table",
        ),
        (
            "misaligned refcount table",
            &[(48, &0x1234_5678_90ab_cdefu64.to_be_bytes())],
            "refcount table",
        ),
        (
            "refcount table offset overflows",
            &[
                (48, &0xffff_ffff_ffff_0000u64.to_be_bytes()),
                (56, &0x7fu32.to_be_bytes()),
            ],
            "refcount table",
        ),
        (
            "too many snapshots",
            &[(60, &0xffff_ffffu32.to_be_bytes())],
            "snapshot",
        ),
        (
            "snapshot table offset",
            &[
                (60, &0xffffu32.to_be_bytes()),
                (64, &0xffff_ffff_ffff_0000u64.to_be_bytes()),
            ],
            "snapshot table",
        ),
        ("huge L1", &[(36, &0xffff_ffffu32.to_be_bytes())], "L1"),
        (
            "L1 offset past anything",
            &[
                (36, &0xffffu32.to_be_bytes()),
                (40, &0x7fff_ffff_ffff_0000u64.to_be_bytes()),
            ],
            "L1",
        ),
        (
            "misaligned L1",
            &[
                (36, &1u32.to_be_bytes()),
                (40, &0x1234_5678_90ab_cdefu64.to_be_bytes()),
            ],
            "L1",
        ),
        ("L1 too small", &[(36, &0u32.to_be_bytes())], "L1"),
        (
            "backing name too long",
            &[
                (8, &0x1000u64.to_be_bytes()),
                (16, &0xffff_ffffu32.to_be_bytes()),
            ],
            "backing",
        ),
    ];
    for (k, (what, pokes, expect)) in cases.iter().enumerate() {
        let p = fresh(&s, &format!("limits-{k}.qcow2"));
        for (off, bytes) in *pokes {
            patch(&p, *off, bytes);
        }
        let e = open_err(&p).to_string();
        assert!(
            e.to_lowercase().contains(&expect.to_lowercase()),
            "{what}: the message does not name the {expect}: {e}"
        );
    }
}
