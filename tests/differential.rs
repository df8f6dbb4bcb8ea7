//! Randomised differential test: random writes (1 byte to several clusters, at random
//! offsets), write_zeroes (aligned and not, with and without unmap), discards, resizes,
//! reads, flushes and reopens applied both to an image and to an in-memory model; every
//! read must match, and at the end `qemu-img check` must be clean and `qemu-img compare`
//! must find the image identical to the model written as raw.

mod common;

use common::*;
use cowdisk::{CreateOptions, Image, OpenOptions};
use std::path::Path;

struct Config {
    name: &'static str,
    version: u32,
    cluster_size: u32,
    refcount_bits: u32,
    size: u64,
    /// "none", "qcow2" or "raw".
    backing: &'static str,
    l2_cache_size: u64,
    ops: usize,
}

fn write_raw(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

/// A random range: a few whole aligned clusters, or any offset and length.
fn random_range(rng: &mut Rng, size: u64, cs: u64) -> (u64, u64) {
    if rng.below(2) == 0 {
        let clusters = size.div_ceil(cs);
        let first = rng.below(clusters);
        let n = 1 + rng.below(4.min(clusters - first));
        let off = first * cs;
        (off, (n * cs).min(size - off))
    } else {
        let len = (1 + rng.below(3 * cs)).min(size);
        (rng.below(size - len + 1), len)
    }
}

fn run_config(cfg: &Config, seed: u64) {
    let s = Scratch::new(cfg.name);
    let img_path = s.path("image.qcow2");
    let mut rng = Rng::new(seed ^ cfg.cluster_size as u64 ^ ((cfg.refcount_bits as u64) << 32));
    let mut model = vec![0u8; cfg.size as usize];
    let mut base = Vec::new();

    let mut create = CreateOptions {
        version: cfg.version,
        cluster_size: cfg.cluster_size,
        refcount_bits: cfg.refcount_bits,
        ..CreateOptions::default()
    };
    if cfg.backing != "none" {
        // A backing file with data in random places (and a shorter size, so the tail of
        // the image reads zeros past the backing file's end).
        let base_size = cfg.size * 3 / 4 / 512 * 512;
        base = vec![0u8; base_size as usize];
        for _ in 0..16 {
            let off = rng.below(base_size) as usize;
            let len = (rng.below(4 * cfg.cluster_size as u64) as usize).min(base.len() - off);
            rng.fill(&mut base[off..off + len]);
        }
        model[..base.len()].copy_from_slice(&base);
        let raw_path = s.path("base.raw");
        write_raw(&raw_path, &base);
        if cfg.backing == "qcow2" {
            let qpath = s.path("base.qcow2");
            run_ok(
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=4096",
                    raw_path.to_str().unwrap(),
                    qpath.to_str().unwrap(),
                ],
            );
            create.backing_file = Some("base.qcow2".into());
            create.backing_format = Some("qcow2".into());
        } else {
            create.backing_file = Some("base.raw".into());
            create.backing_format = Some("raw".into());
        }
    }
    Image::create(&img_path, cfg.size, &create).unwrap();
    let open_opts = OpenOptions {
        l2_cache_size: cfg.l2_cache_size,
        ..OpenOptions::default()
    };
    let mut img = Image::open(&img_path, &open_opts).unwrap();
    let cs = cfg.cluster_size as u64;
    let mut size = cfg.size;
    for step in 0..cfg.ops {
        match rng.below(100) {
            0..=49 => {
                // Mostly small writes, some spanning several clusters; aligned sometimes.
                let len = match rng.below(40) {
                    0 => 1 + rng.below(256 * 1024), // large: grows the refcount table
                    1..=9 => 1 + rng.below(16),
                    10..=19 => 1 + rng.below(cs),
                    20..=29 => 1 + rng.below(4 * cs),
                    _ => cs * (1 + rng.below(3)),
                }
                .min(size);
                let mut off = rng.below(size - len + 1);
                if rng.below(3) == 0 {
                    off = off / cs * cs;
                    off = off.min(size - len);
                }
                let mut data = vec![0u8; len as usize];
                if rng.below(5) == 0 {
                    data.fill(0); // zero writes must be stored too
                } else {
                    rng.fill(&mut data);
                }
                img.write_at(&data, off)
                    .unwrap_or_else(|e| panic!("step {step}: write {len}@{off}: {e}"));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            50..=57 => {
                // Zeroes: aligned whole clusters or arbitrary pieces, maybe unmapping.
                let (off, len) = random_range(&mut rng, size, cs);
                let unmap = rng.below(2) == 0;
                img.write_zeroes(off, len, unmap)
                    .unwrap_or_else(|e| panic!("step {step}: zeroes {len}@{off}: {e}"));
                model[off as usize..(off + len) as usize].fill(0);
            }
            58..=62 => {
                let (off, len) = random_range(&mut rng, size, cs);
                img.discard(off, len)
                    .unwrap_or_else(|e| panic!("step {step}: discard {len}@{off}: {e}"));
                // Whole clusters are released: zeros, or on v2 over a backing file the
                // backing file's bytes. Partial clusters keep their contents.
                let mut c = off.next_multiple_of(cs);
                while c < off + len {
                    let end = (c + cs).min(size);
                    if end > off + len {
                        break;
                    }
                    for i in c..end {
                        model[i as usize] = if cfg.version == 2 && cfg.backing != "none" {
                            base.get(i as usize).copied().unwrap_or(0)
                        } else {
                            0
                        };
                    }
                    c += cs;
                }
            }
            63..=64 => {
                // Resize within [size/2, 1.5 size], shrinking with force.
                let new_size = (cfg.size / 2 + rng.below(cfg.size)) / 512 * 512;
                img.resize(new_size, true)
                    .unwrap_or_else(|e| panic!("step {step}: resize {size} -> {new_size}: {e}"));
                model.resize(new_size as usize, 0);
                size = new_size;
                assert_eq!(img.size(), size);
            }
            65..=89 => {
                let len = (1 + rng.below(3 * cs)).min(size);
                let off = rng.below(size - len + 1);
                let mut buf = vec![0u8; len as usize];
                img.read_at(&mut buf, off)
                    .unwrap_or_else(|e| panic!("step {step}: read {len}@{off}: {e}"));
                if buf[..] != model[off as usize..(off + len) as usize] {
                    panic!("step {step}: read {len}@{off} differs from the model");
                }
            }
            90..=94 => img.flush().unwrap(),
            _ => {
                img.close().unwrap();
                img = Image::open(&img_path, &open_opts).unwrap();
            }
        }
    }
    // Full read-back through cowdisk, then let QEMU judge the file.
    let mut all = vec![0u8; size as usize];
    img.read_at(&mut all, 0).unwrap();
    assert!(
        all == model,
        "{}: final read differs from the model",
        cfg.name
    );
    img.close().unwrap();
    qemu_check_clean(&img_path);
    let model_path = s.path("model.raw");
    write_raw(&model_path, &model);
    qemu_compare_raw(&img_path, &model_path);
}

macro_rules! differential {
    ($name:ident, $v:expr, $cs:expr, $rb:expr, $size:expr, $backing:expr, $cache:expr, $ops:expr) => {
        #[test]
        fn $name() {
            let cfg = Config {
                name: stringify!($name),
                version: $v,
                cluster_size: $cs,
                refcount_bits: $rb,
                size: $size,
                backing: $backing,
                l2_cache_size: $cache,
                ops: $ops,
            };
            run_config(&cfg, seed(0xC0DE));
        }
    };
}

const MIB: u64 = 1 << 20;

differential!(v3_64k_rc16, 3, 65536, 16, 64 * MIB, "none", 0, 2000);
differential!(v2_64k_rc16, 2, 65536, 16, 48 * MIB, "none", 0, 1500);
differential!(v3_512_rc1, 3, 512, 1, 4 * MIB, "none", 0, 1500);
differential!(
    v3_512_rc64_small_cache,
    3,
    512,
    64,
    6 * MIB,
    "none",
    2048,
    1500
);
differential!(v3_4k_rc8, 3, 4096, 8, 16 * MIB, "none", 16384, 1500);
differential!(
    v3_4k_rc2_qcow2_backing,
    3,
    4096,
    2,
    16 * MIB,
    "qcow2",
    0,
    1500
);
differential!(v2_64k_raw_backing, 2, 65536, 16, 32 * MIB, "raw", 0, 1500);
differential!(v3_2m_rc32, 3, 2 * 1024 * 1024, 32, 64 * MIB, "none", 0, 600);
differential!(
    v3_64k_rc4_qcow2_backing,
    3,
    65536,
    4,
    40 * MIB,
    "qcow2",
    0,
    1500
);
