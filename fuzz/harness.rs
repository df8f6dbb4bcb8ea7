//! The fuzzing harness, shared by the cargo-fuzz targets and by the regression test
//! that replays every input in `fuzz/regressions/` (tests/fuzz_regressions.rs).
//!
//! Input layout: a little-endian u32 `n`, then `n` bytes of image file (clamped to
//! what is there), then a script of operations. Each operation is one byte of opcode
//! followed by its arguments, read as little-endian integers (missing bytes read as
//! zeros). Offsets and lengths are reduced to the image's virtual size and to at most
//! 256 KiB, so memory stays bounded by the input, not by what the image claims.
#![allow(dead_code)]

use std::sync::Arc;

use cowdisk::image::Repair;
use cowdisk::io::MemStorage;
use cowdisk::io::Storage;
use cowdisk::{Image, OpenOptions, SnapshotOptions};

/// Largest request the script makes.
const MAX_IO: u64 = 256 * 1024;
/// Operations per input.
const MAX_OPS: usize = 64;

struct Script<'a> {
    data: &'a [u8],
}

impl Script<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    fn u64(&mut self) -> u64 {
        let n = self.data.len().min(8);
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        u64::from_le_bytes(b)
    }
}

fn split(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 4 {
        return (data, &[]);
    }
    let n = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
    let n = n.min(data.len() - 4);
    (&data[4..4 + n], &data[4 + n..])
}

fn storage_with(bytes: &[u8]) -> Arc<MemStorage> {
    let s = Arc::new(MemStorage::new());
    s.write_at(bytes, 0).expect("memory storage");
    s
}

fn options(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        // Never follow a backing file an untrusted image names.
        follow_backing: false,
        // Small caches: eviction paths run too.
        l2_cache_size: 4 * 65536,
        ..OpenOptions::default()
    }
}

/// Opens the bytes read-only and asks everything a reader would.
pub fn open_only(data: &[u8]) {
    let (image, _) = split(data);
    let storage = storage_with(if data.len() >= 4 { image } else { data });
    if let Ok(img) = Image::open_storage(storage, &options(true)) {
        let _ = img.info();
        let _ = img.snapshots();
        let size = img.size();
        let _ = img.block_status(0, size, 64);
        let mut buf = vec![0u8; size.min(MAX_IO) as usize];
        let _ = img.read_at(&mut buf, 0);
        let n = buf.len() as u64;
        if size > n {
            let _ = img.read_at(&mut buf, size - n);
        }
    }
}

/// A range inside `size`: (offset, length ≥ 1), or None for an empty disk.
fn range(s: &mut Script, size: u64) -> Option<(u64, u64)> {
    if size == 0 {
        return None;
    }
    let off = s.u64() % size;
    let len = 1 + s.u64() % MAX_IO.min(size - off);
    Some((off, len))
}

/// True when `check` finds the image consistent (leaks allowed).
fn consistent(img: &Image) -> bool {
    img.check(Repair::None)
        .is_ok_and(|r| r.corruptions == 0 && r.check_errors == 0 && r.failed.is_none())
}

/// The oracle on consistent images: what a successful write stored reads back.
fn reads_back(img: &Image, want: &[u8], off: u64, what: &str) {
    let mut got = vec![0u8; want.len()];
    match img.read_at(&mut got, off) {
        Ok(()) => assert!(got == want, "{what} at {off} did not read back"),
        // A backing file the harness does not open.
        Err(e) if e.errno() == libc::ENOTSUP => {}
        Err(e) => panic!("reading back {what} at {off} failed: {e}"),
    }
}

/// Opens the image read-write and runs the script. On images `check` calls
/// consistent, every successful write must read back and the image must stay
/// consistent (an image whose metadata is broken only has to survive).
pub fn run(data: &[u8]) {
    let (image, script) = split(data);
    let storage = storage_with(image);
    let Ok(mut img) = Image::open_storage(storage.clone(), &options(false)) else {
        return;
    };
    let oracle = consistent(&img);
    let mut s = Script { data: script };
    let mut snapshots = 0u32;
    let trace = std::env::var_os("COWDISK_FUZZ_TRACE").is_some();
    for _ in 0..MAX_OPS {
        let Some(op) = s.byte() else {
            break;
        };
        let size = img.size();
        if trace {
            eprintln!(
                "op {} (size {size}, next bytes {:02x?})",
                op % 13,
                &s.data[..s.data.len().min(16)]
            );
        }
        match op % 14 {
            0 => {
                if let Some((off, len)) = range(&mut s, size) {
                    let mut buf = vec![0u8; len as usize];
                    let _ = img.read_at(&mut buf, off);
                }
            }
            1 => {
                let fill = s.byte().unwrap_or(0xA5);
                if let Some((off, len)) = range(&mut s, size) {
                    let buf = vec![fill; len as usize];
                    if img.write_at(&buf, off).is_ok() && oracle {
                        reads_back(&img, &buf, off, "a write");
                    }
                }
            }
            2 => {
                let unmap = s.byte().unwrap_or(0) & 1 == 1;
                if let Some((off, len)) = range(&mut s, size) {
                    if img.write_zeroes(off, len, unmap).is_ok() && oracle {
                        reads_back(&img, &vec![0u8; len as usize], off, "write_zeroes");
                    }
                }
            }
            3 => {
                if let Some((off, len)) = range(&mut s, size) {
                    let _ = img.discard(off, len);
                }
            }
            4 => {
                let cs = img.info().cluster_size as u64;
                let n = 1 + s.u64() % 4;
                if size >= cs && n * cs <= MAX_IO {
                    let off = s.u64() % (size / cs) * cs;
                    let len = (n * cs).min(size - off);
                    let buf: Vec<u8> = (0..len).map(|i| (i / 7) as u8).collect();
                    if img.write_compressed(&buf, off).is_ok() && oracle {
                        reads_back(&img, &buf, off, "a compressed write");
                    }
                }
            }
            5 => {
                snapshots += 1;
                let _ = img.snapshot_create(&format!("s{snapshots}"), &SnapshotOptions::default());
            }
            6 => {
                let id = 1 + s.byte().unwrap_or(0) % 8;
                let _ = img.snapshot_goto(&id.to_string());
            }
            7 => {
                let id = 1 + s.byte().unwrap_or(0) % 8;
                let _ = img.snapshot_delete(&id.to_string());
            }
            8 => {
                if let Some((off, len)) = range(&mut s, size) {
                    let limit = 1 + (s.byte().unwrap_or(0) % 64) as usize;
                    let _ = img.block_status(off, len, limit);
                }
            }
            9 => {
                let _ = img.flush();
            }
            10 => {
                let _ = img.close();
                match Image::open_storage(storage.clone(), &options(false)) {
                    Ok(i) => img = i,
                    Err(_) => return,
                }
            }
            11 => {
                let len = 1 + s.u64() % 4096;
                let pos = s.u64() % (1 << 24);
                let buf = vec![0x3c; len as usize];
                let _ = img.save_vmstate(&buf, pos);
                let mut back = vec![0u8; len as usize];
                let _ = img.load_vmstate(&mut back, pos);
            }
            13 => {
                let repair =
                    [Repair::None, Repair::Leaks, Repair::All][s.byte().unwrap_or(0) as usize % 3];
                let _ = img.check(repair);
            }
            _ => {
                // Grow or shrink by up to 16 MiB, in 512-byte steps.
                let delta = (s.u64() % (1 << 15)) * 512;
                let new = if s.byte().unwrap_or(0) & 1 == 1 {
                    size.saturating_add(delta)
                } else {
                    size.saturating_sub(delta)
                };
                let _ = img.resize(new, true);
            }
        }
    }
    if oracle {
        let r = img.check(Repair::None);
        assert!(
            r.as_ref()
                .is_ok_and(|r| r.corruptions == 0 && r.check_errors == 0),
            "a consistent image became inconsistent: {r:?}"
        );
    }
    let _ = img.close();
}
