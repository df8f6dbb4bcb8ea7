//! Compressed clusters, both ways with QEMU: images `qemu-img convert -c` makes (zlib
//! and zstd, several cluster sizes) read exactly as QEMU reads them; images cowdisk
//! writes compressed pass `qemu-img check` with their compressed clusters counted and
//! compare identical; writes, zeroes and discards over compressed clusters; clear
//! errors for broken descriptors; crash consistency and host write counts of the
//! compressed-write cache.

mod common;

use common::*;
use cowdisk::io::{FaultStorage, FileStorage, IoEvent, MemStorage, Storage};
use cowdisk::{CompressionType, CreateOptions, Image, OpenOptions};
use std::path::Path;
use std::sync::Arc;

const CACHE: u64 = cowdisk::image::DEFAULT_COMPRESSED_CACHE_SIZE;

/// Guest data of `size` bytes mixing zeros, text, random bytes and half-random
/// clusters, in runs of about a cluster.
fn mixed_data(size: usize, cs: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; size];
    let text =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit; qcow2 cluster 0123456789\n";
    let mut at = 0;
    let mut kind = 0u64;
    while at < size {
        let run = (cs / 2 + rng.below(cs as u64 * 2) as usize).min(size - at);
        let piece = &mut data[at..at + run];
        match kind % 5 {
            0 => {} // zeros
            1 | 3 => {
                for (i, b) in piece.iter_mut().enumerate() {
                    *b = text[(at + i) % text.len()];
                }
            }
            2 => rng.fill(piece),
            _ => {
                for (i, b) in piece.iter_mut().enumerate() {
                    *b = if i % 3 == 0 {
                        rng.next() as u8
                    } else {
                        (i / 64) as u8
                    };
                }
            }
        }
        at += run;
        kind += 1 + rng.below(2);
    }
    data
}

fn qemu_img_create_args(kind: CompressionType, cs: u64) -> String {
    format!("cluster_size={cs},compression_type={}", kind.name())
}

/// `qemu-img check --output=json` as a map; asserts no errors, corruptions or leaks.
fn check_json(path: &Path) -> serde_json::Value {
    qemu_check_clean(path);
    let out = run_ok(
        "qemu-img",
        &["check", "--output=json", path.to_str().unwrap()],
    );
    serde_json::from_str(&out).unwrap()
}

fn compressed_clusters(check: &serde_json::Value) -> u64 {
    check
        .get("compressed-clusters")
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

// ---------------------------------------------------------------------------------
// QEMU writes, cowdisk reads.

fn qemu_compressed_reads(kind: CompressionType, cs: u64) {
    let s = Scratch::new(&format!("qemu-c-{}-{cs}", kind.name()));
    // Not a multiple of the cluster size: the last cluster is partial.
    let size = (7 * cs + 3 * 512).max(40 * 1024 + 512);
    let data = mixed_data(size as usize, cs as usize, cs ^ kind.code() as u64);
    let raw = s.path("data.raw");
    std::fs::write(&raw, &data).unwrap();
    let img_path = s.path("c.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &qemu_img_create_args(kind, cs),
            raw.to_str().unwrap(),
            img_path.to_str().unwrap(),
        ],
    );
    let check = check_json(&img_path);
    assert!(
        compressed_clusters(&check) > 0,
        "qemu wrote no compressed clusters: {check}"
    );
    let expected = qemu_read_raw(&img_path, &s);
    assert!(
        expected == data,
        "qemu-img convert reads back different data"
    );

    let img = Image::open(&img_path, &ro()).unwrap();
    assert_eq!(img.info().compression_type, kind);
    assert!(
        read_all(&img) == expected,
        "whole read differs ({kind:?}, {cs})"
    );
    // Odd-sized reads crossing cluster boundaries.
    let mut off = 0u64;
    let step = 3000 + cs / 3;
    while off < size {
        let len = step.min(size - off);
        let mut buf = vec![0u8; len as usize];
        img.read_at(&mut buf, off).unwrap();
        assert!(
            buf[..] == expected[off as usize..(off + len) as usize],
            "read {len}@{off} differs ({kind:?}, {cs})"
        );
        off += len;
    }
    // Block status marks the compressed clusters.
    let extents = img.block_status(0, size, usize::MAX).unwrap();
    assert!(extents
        .iter()
        .any(|e| e.compressed && e.data && e.offset.is_none()));
}

#[test]
fn qemu_zlib_4k() {
    qemu_compressed_reads(CompressionType::Zlib, 4096);
}

#[test]
fn qemu_zlib_64k() {
    qemu_compressed_reads(CompressionType::Zlib, 65536);
}

#[test]
fn qemu_zlib_2m() {
    qemu_compressed_reads(CompressionType::Zlib, 2 << 20);
}

#[test]
fn qemu_zstd_4k() {
    qemu_compressed_reads(CompressionType::Zstd, 4096);
}

#[test]
fn qemu_zstd_64k() {
    qemu_compressed_reads(CompressionType::Zstd, 65536);
}

#[test]
fn qemu_zstd_2m() {
    qemu_compressed_reads(CompressionType::Zstd, 2 << 20);
}

#[test]
fn qemu_io_compressed_writes_read_back() {
    // qemu-io 'write -c' packs single clusters, including into partly used host
    // clusters; read them with a 512-byte cluster image too.
    for (kind, cs) in [
        (CompressionType::Zlib, 512u64),
        (CompressionType::Zstd, 65536),
    ] {
        let s = Scratch::new("qemu-io-c");
        let path = s.path("q.qcow2");
        let size = 64 * cs;
        run_ok(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                &qemu_img_create_args(kind, cs),
                path.to_str().unwrap(),
                &size.to_string(),
            ],
        );
        let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
        for i in (0..64).step_by(3) {
            args.push("-c".into());
            args.push(format!("write -c -P {} {} {}", i + 1, i * cs, cs));
        }
        args.push(path.to_str().unwrap().into());
        let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        run_ok("qemu-io", &refs);
        let expected = qemu_read_raw(&path, &s);
        let img = Image::open(&path, &ro()).unwrap();
        assert!(read_all(&img) == expected, "{kind:?} {cs}");
    }
}

// ---------------------------------------------------------------------------------
// cowdisk writes, QEMU reads and checks.

fn create(path: &Path, size: u64, kind: CompressionType, cs: u32, rb: u32) {
    Image::create(
        path,
        size,
        &CreateOptions {
            cluster_size: cs,
            refcount_bits: rb,
            compression_type: kind,
            ..CreateOptions::default()
        },
    )
    .unwrap();
}

fn open_rw(path: &Path, cache: u64, direct: bool) -> Image {
    Image::open(
        path,
        &OpenOptions {
            compressed_cache_size: cache,
            direct,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// Writes mixed data compressed (one big call for the first half, cluster by cluster
/// for the rest) and lets QEMU judge.
fn cowdisk_writes_compressed(
    s: &Scratch,
    kind: CompressionType,
    cs: u32,
    rb: u32,
    cache: u64,
    direct: bool,
) {
    let cs64 = cs as u64;
    let size = 24 * cs64 + 1024;
    let path = s.path(&format!(
        "w-{}-{cs}-{rb}-{cache}-{direct}.qcow2",
        kind.name()
    ));
    create(&path, size, kind, cs, rb);
    let data = mixed_data(size as usize, cs as usize, 77 + cs64);
    let img = open_rw(&path, cache, direct);
    let half = 12 * cs as usize;
    img.write_compressed(&data[..half], 0).unwrap();
    let mut off = half;
    while off < data.len() {
        let end = (off + cs as usize).min(data.len());
        img.write_compressed(&data[off..end], off as u64).unwrap();
        off = end;
    }
    // Reads are right before anything is flushed (served from the cache).
    assert!(read_all(&img) == data, "read before flush");
    img.flush().unwrap();
    assert!(read_all(&img) == data, "read after flush");
    img.close().unwrap();

    let check = check_json(&path);
    assert!(
        compressed_clusters(&check) >= 10,
        "{kind:?} cs {cs} rb {rb}: too few compressed clusters: {check}"
    );
    let raw = s.path("expected.raw");
    std::fs::write(&raw, &data).unwrap();
    qemu_compare_raw(&path, &raw);
    assert!(qemu_read_raw(&path, s) == data);
    let info = run_ok(
        "qemu-img",
        &["info", "--output=json", path.to_str().unwrap()],
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["format-specific"]["data"]["compression-type"],
        kind.name()
    );
    let img = Image::open(&path, &ro()).unwrap();
    assert!(read_all(&img) == data);
}

#[test]
fn cowdisk_compressed_zlib_and_zstd_all_cluster_sizes() {
    let s = Scratch::new("cw");
    for kind in [CompressionType::Zlib, CompressionType::Zstd] {
        for cs in [512u32, 4096, 65536, 2 << 20] {
            for cache in [0, CACHE] {
                cowdisk_writes_compressed(&s, kind, cs, 16, cache, false);
            }
        }
    }
}

#[test]
fn cowdisk_compressed_narrow_and_wide_refcounts() {
    // 1-bit refcounts: a host cluster holds one compressed cluster; 2-bit: three.
    let s = Scratch::new("cw-rc");
    for rb in [1u32, 2, 64] {
        for cache in [0, 8192] {
            cowdisk_writes_compressed(&s, CompressionType::Zlib, 4096, rb, cache, false);
        }
    }
}

#[test]
fn cowdisk_compressed_direct() {
    let Some(s) = direct_scratch("cw-direct") else {
        return;
    };
    for cache in [0, CACHE] {
        for cs in [512u32, 65536] {
            cowdisk_writes_compressed(&s, CompressionType::Zstd, cs, 16, cache, true);
            cowdisk_writes_compressed(&s, CompressionType::Zlib, cs, 16, cache, true);
        }
    }
}

#[test]
fn deflate_uses_a_4k_window() {
    // QEMU inflates with a 4 KiB window, so cowdisk deflates with one too: random
    // blocks repeating every 2 KiB compress (and QEMU reads them back), blocks
    // repeating every 8 KiB cannot (a 32 KiB window would have found the repeats).
    let s = Scratch::new("window");
    for (period, compressed) in [(2048usize, 4u64), (8192, 0)] {
        let path = s.path(&format!("w{period}.qcow2"));
        let size = 4 * 65536;
        create(&path, size, CompressionType::Zlib, 65536, 16);
        let mut block = vec![0u8; period];
        Rng::new(3).fill(&mut block);
        let data: Vec<u8> = block.iter().copied().cycle().take(size as usize).collect();
        let img = open_rw(&path, CACHE, false);
        img.write_compressed(&data, 0).unwrap();
        img.close().unwrap();
        let check = check_json(&path);
        assert_eq!(
            compressed_clusters(&check),
            compressed,
            "period {period}: {check}"
        );
        let raw = s.path("w.raw");
        std::fs::write(&raw, &data).unwrap();
        qemu_compare_raw(&path, &raw);
    }
}

#[test]
fn compressed_write_rules() {
    let s = Scratch::new("rules");
    let path = s.path("r.qcow2");
    let cs = 65536u64;
    let size = 8 * cs + 4096;
    create(&path, size, CompressionType::Zlib, cs as u32, 16);
    let img = open_rw(&path, CACHE, false);
    let data = vec![b'x'; cs as usize];
    let errno = |r: cowdisk::Result<()>| r.unwrap_err().errno();
    assert_eq!(
        errno(img.write_compressed(&data, 512)),
        libc::EINVAL,
        "unaligned offset"
    );
    assert_eq!(
        errno(img.write_compressed(&data[..4096], 0)),
        libc::EINVAL,
        "partial cluster"
    );
    assert_eq!(
        errno(img.write_compressed(&data, 8 * cs)),
        libc::EINVAL,
        "past the end"
    );
    // The last, partial cluster is allowed (zero-padded).
    img.write_compressed(&data[..4096], 8 * cs).unwrap();
    // Only into unallocated clusters; the refusal changes nothing and breaks nothing.
    img.write_at(b"normal", cs).unwrap();
    assert_eq!(
        errno(img.write_compressed(&[b'y'; 131072], 0)),
        libc::EINVAL
    );
    img.write_compressed(&data, 7 * cs).unwrap();
    assert_eq!(
        errno(img.write_compressed(&data, 7 * cs)),
        libc::EINVAL,
        "twice"
    );
    // A zero cluster without a host cluster may be written compressed.
    img.write_zeroes(2 * cs, cs, true).unwrap();
    img.write_compressed(&data, 2 * cs).unwrap();
    let mut buf = vec![0u8; cs as usize];
    img.read_at(&mut buf, 2 * cs).unwrap();
    assert!(buf == data);
    img.read_at(&mut buf, 0).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "the refused write left data behind"
    );
    // Incompressible data is stored as a normal cluster.
    let mut noise = vec![0u8; cs as usize];
    Rng::new(9).fill(&mut noise);
    img.write_compressed(&noise, 3 * cs).unwrap();
    let st = img.block_status(3 * cs, cs, 4).unwrap();
    assert!(!st[0].compressed && st[0].offset.is_some(), "{st:?}");
    let st = img.block_status(2 * cs, cs, 4).unwrap();
    assert!(st[0].compressed, "{st:?}");
    img.close().unwrap();
    qemu_check_clean(&path);
    let ro_img = Image::open(&path, &ro()).unwrap();
    assert_eq!(
        ro_img.write_compressed(&data, 4 * cs).unwrap_err().errno(),
        libc::EROFS
    );
}

// ---------------------------------------------------------------------------------
// Writes, zeroes and discards over compressed clusters.

fn overwrite_compressed(s: &Scratch, qemu_made: bool, cache: u64, seed: u64) {
    let cs = 65536u64;
    let size = 48 * cs;
    let path = s.path(&format!("ow-{qemu_made}-{cache}.qcow2"));
    let mut model = mixed_data(size as usize, cs as usize, seed);
    // Text everywhere (compressible), so every cluster is compressed.
    for (i, b) in model.iter_mut().enumerate() {
        if *b == 0 && (i / 4096) % 2 == 1 {
            *b = b"abcdefgh"[i % 8];
        }
    }
    if qemu_made {
        let raw = s.path("ow.raw");
        std::fs::write(&raw, &model).unwrap();
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                path.to_str().unwrap(),
            ],
        );
    } else {
        create(&path, size, CompressionType::Zlib, cs as u32, 16);
        let img = open_rw(&path, cache, false);
        img.write_compressed(&model, 0).unwrap();
        img.close().unwrap();
    }
    let before = compressed_clusters(&check_json(&path));
    assert!(before > 20, "{before}");

    let img = open_rw(&path, cache, false);
    let mut rng = Rng::new(seed);
    for step in 0..300 {
        let cluster = rng.below(48);
        let base = cluster * cs;
        match rng.below(8) {
            0..=2 => {
                // Partial write: decompress + COW.
                let off = base + rng.below(cs - 1);
                let len = (1 + rng.below(cs)).min(size - off);
                let mut d = vec![0u8; len as usize];
                rng.fill(&mut d);
                img.write_at(&d, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            3 => {
                // Whole cluster overwrite.
                let mut d = vec![0u8; cs as usize];
                rng.fill(&mut d);
                img.write_at(&d, base).unwrap();
                model[base as usize..(base + cs) as usize].copy_from_slice(&d);
            }
            4 => {
                // Zeroes: whole clusters (zero cluster) or a piece (COW).
                let (off, len) = if rng.below(2) == 0 {
                    (base, cs * (1 + rng.below(2)))
                } else {
                    (base + rng.below(cs / 2), 1 + rng.below(cs / 2))
                };
                let len = len.min(size - off);
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            5 => {
                let len = (cs * (1 + rng.below(3))).min(size - base);
                img.discard(base, len).unwrap();
                model[base as usize..(base + len) as usize].fill(0);
            }
            6 => {
                // Compressed again where that is allowed.
                let st = img.block_status(base, cs, 4).unwrap();
                let mut d = vec![0u8; cs as usize];
                for (i, b) in d.iter_mut().enumerate() {
                    *b = (i as u64 / 100 + step) as u8;
                }
                let allowed = st
                    .iter()
                    .all(|e| !e.present || (e.zero && e.offset.is_none()));
                let r = img.write_compressed(&d, base);
                assert_eq!(r.is_ok(), allowed, "step {step}: {r:?} {st:?}");
                if allowed {
                    model[base as usize..(base + cs) as usize].copy_from_slice(&d);
                }
            }
            _ => {
                let off = rng.below(size - cs);
                let mut buf = vec![0u8; cs as usize];
                img.read_at(&mut buf, off).unwrap();
                assert!(
                    buf[..] == model[off as usize..(off + cs) as usize],
                    "step {step}: read at {off}"
                );
            }
        }
        if step % 50 == 49 {
            img.flush().unwrap();
        }
    }
    assert!(read_all(&img) == model);
    img.close().unwrap();
    let check = check_json(&path);
    assert!(compressed_clusters(&check) < before, "{check}");
    let raw = s.path("model.raw");
    std::fs::write(&raw, &model).unwrap();
    qemu_compare_raw(&path, &raw);
}

#[test]
fn overwrite_qemu_compressed_clusters() {
    let s = Scratch::new("ow-q");
    overwrite_compressed(&s, true, CACHE, seed(21));
    overwrite_compressed(&s, true, 0, seed(22));
}

#[test]
fn overwrite_cowdisk_compressed_clusters() {
    let s = Scratch::new("ow-c");
    overwrite_compressed(&s, false, CACHE, seed(23));
    overwrite_compressed(&s, false, 0, seed(24));
}

#[test]
fn releasing_every_compressed_cluster_frees_the_host_clusters() {
    let s = Scratch::new("release");
    let path = s.path("r.qcow2");
    let cs = 65536u64;
    create(&path, 32 * cs, CompressionType::Zstd, cs as u32, 16);
    let img = open_rw(&path, CACHE, false);
    let text: Vec<u8> = (0..32 * cs).map(|i| (i % 251) as u8).collect();
    img.write_compressed(&text, 0).unwrap();
    img.discard(0, 32 * cs).unwrap();
    img.close().unwrap();
    let check = check_json(&path);
    assert_eq!(compressed_clusters(&check), 0);
    assert_eq!(
        check["allocated-clusters"].as_u64().unwrap_or(0),
        0,
        "{check}"
    );
}

// ---------------------------------------------------------------------------------
// Broken descriptors.

/// Points guest cluster 0's L2 entry somewhere else.
fn patch_l2_entry(path: &Path, entry: u64) {
    let bytes = std::fs::read(path).unwrap();
    let l1_off = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2 =
        u64::from_be_bytes(bytes[l1_off..l1_off + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&entry.to_be_bytes(), l2).unwrap();
}

#[test]
fn broken_compressed_descriptors_are_clear_errors() {
    let s = Scratch::new("broken");
    let path = s.path("b.qcow2");
    let cs = 65536u64;
    create(&path, 4 * cs, CompressionType::Zlib, cs as u32, 16);
    let img = open_rw(&path, CACHE, false);
    img.write_compressed(&vec![b'a'; 2 * cs as usize], 0)
        .unwrap();
    img.close().unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let x = 62 - (16 - 8);
    let mut buf = vec![0u8; 4096];
    // Outside the file.
    patch_l2_entry(&path, (1u64 << 62) | (3u64 << x) | (len + 100));
    let img = Image::open(&path, &ro()).unwrap();
    let e = img.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(e.to_string().contains("outside the file"), "{e}");
    // Garbage that does not inflate to a whole cluster (the L2 table itself).
    let l2_table = {
        let bytes = std::fs::read(&path).unwrap();
        let l1_off = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
        u64::from_be_bytes(bytes[l1_off..l1_off + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00
    };
    patch_l2_entry(&path, (1u64 << 62) | (1u64 << x) | (l2_table + 8));
    let img = Image::open(&path, &ro()).unwrap();
    let e = img.read_at(&mut buf, 0).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("does not decompress to {cs} bytes")),
        "{e}"
    );
    // The other cluster still reads.
    img.read_at(&mut buf, cs).unwrap();
    assert!(buf.iter().all(|&b| b == b'a'));
}

// ---------------------------------------------------------------------------------
// Crash consistency with the cache, and what the cache saves.

#[test]
fn crash_during_compressed_writes() {
    let s = Scratch::new("crash-c");
    let cs = 4096u64;
    let size = 256 * cs;
    let template = s.path("template.qcow2");
    create(&template, size, CompressionType::Zlib, cs as u32, 16);
    let workload = |img: &Image| -> (Vec<u8>, Vec<bool>, bool) {
        let mut rng = Rng::new(seed(31));
        let mut model = vec![0u8; size as usize];
        let mut durable = model.clone();
        let mut unsure = vec![false; size as usize];
        for step in 0..150u64 {
            let cluster = rng.below(256);
            let off = cluster * cs;
            let r = match step % 10 {
                9 => {
                    let r = img.flush();
                    if r.is_ok() {
                        durable.copy_from_slice(&model);
                        unsure.fill(false);
                    }
                    r.map(|_| 0)
                }
                0..=5 => {
                    let n = (1 + rng.below(4)).min(256 - cluster);
                    let d: Vec<u8> = (0..n * cs).map(|i| ((i / 7) as u8) ^ step as u8).collect();
                    match img.write_compressed(&d, off) {
                        Err(e) if e.errno() == libc::EINVAL => Ok(0), // allocated
                        Err(e) => Err(e),
                        Ok(()) => {
                            let range = off as usize..(off + n * cs) as usize;
                            unsure[range.clone()].fill(true);
                            model[range].copy_from_slice(&d);
                            Ok(0)
                        }
                    }
                }
                6 | 7 => {
                    let o = off + rng.below(cs);
                    let len = (1 + rng.below(cs)).min(size - o);
                    let mut d = vec![0u8; len as usize];
                    rng.fill(&mut d);
                    let range = o as usize..(o + len) as usize;
                    unsure[range.clone()].fill(true);
                    img.write_at(&d, o).map(|_| {
                        model[range].copy_from_slice(&d);
                        0
                    })
                }
                _ => {
                    let range = off as usize..(off + cs) as usize;
                    unsure[range.clone()].fill(true);
                    img.discard(off, cs).map(|_| {
                        model[range].fill(0);
                        0
                    })
                }
            };
            if r.is_err() {
                return (durable, unsure, true);
            }
        }
        if img.flush().is_err() {
            return (durable, unsure, true);
        }
        (model, vec![false; size as usize], false)
    };
    let open = |path: &Path| {
        let file = FileStorage::open(path, true, false).unwrap();
        let faulty = Arc::new(FaultStorage::new(Arc::new(file) as Arc<dyn Storage>));
        let img = Image::open_storage(faulty.clone(), &OpenOptions::default()).unwrap();
        (img, faulty)
    };
    let clean = s.path("clean.qcow2");
    std::fs::copy(&template, &clean).unwrap();
    let (img, faulty) = open(&clean);
    let (_, _, failed) = workload(&img);
    assert!(!failed);
    // The workload's writes (closing may trim preallocated space afterwards).
    let total = faulty.writes_seen();
    img.close().unwrap();
    assert!(compressed_clusters(&check_json(&clean)) > 0);

    let step = (total / 100).max(1);
    let mut n = 0;
    while n < total {
        let path = s.path("crashed.qcow2");
        std::fs::copy(&template, &path).unwrap();
        let (img, faulty) = open(&path);
        faulty.fail_writes_after(n);
        let (durable, unsure, failed) = workload(&img);
        assert!(failed, "write {n} of {total} should have failed");
        drop(img);
        let (code, out, err) = run(
            "qemu-img",
            &["check", "--output=json", path.to_str().unwrap()],
        );
        assert!(
            code == 0 || code == 3,
            "crash at {n}/{total}: exit {code}\n{out}\n{err}"
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(
            v.get("corruptions").is_none_or(|c| c == 0),
            "crash at {n}: {out}\n{err}"
        );
        let img = Image::open(&path, &ro()).unwrap();
        let got = read_all(&img);
        for (i, ((g, d), u)) in got.iter().zip(&durable).zip(&unsure).enumerate() {
            assert!(
                *u || g == d,
                "crash at write {n}/{total}: flushed byte {i} lost"
            );
        }
        n += step;
    }
}

/// Host writes while writing `n` compressible clusters one call at a time.
fn count_writes(storage: Arc<dyn Storage>, cache: u64, cs: u64, n: u64) -> (Vec<IoEvent>, u64) {
    let faulty = Arc::new(FaultStorage::new(storage));
    Image::create_on(
        faulty.clone(),
        (n + 1) * cs,
        &CreateOptions {
            cluster_size: cs as u32,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let img = Image::open_storage(
        faulty.clone(),
        &OpenOptions {
            compressed_cache_size: cache,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let cluster = |i: u64| -> Vec<u8> {
        let mut rng = Rng::new(i);
        (0..cs)
            .map(|j| {
                if j % 16 == 0 {
                    rng.next() as u8
                } else {
                    (j / 50) as u8
                }
            })
            .collect()
    };
    // The first cluster allocates the L2 table; count from the second on.
    img.write_compressed(&cluster(0), 0).unwrap();
    img.flush().unwrap();
    let start_len = faulty.len().unwrap();
    faulty.take_log();
    for i in 1..=n {
        img.write_compressed(&cluster(i), i * cs).unwrap();
    }
    let log = faulty.take_log();
    img.close().unwrap();
    let grown = faulty.len().unwrap() - start_len;
    (log, grown)
}

fn writes_of(log: &[IoEvent]) -> Vec<(u64, u64)> {
    log.iter()
        .filter_map(|e| match e {
            IoEvent::Write { offset, len, .. } => Some((*offset, *len)),
            _ => None,
        })
        .collect()
}

#[test]
fn the_cache_writes_whole_aligned_clusters() {
    let cs = 65536u64;
    let n = 200u64;
    let direct = direct_scratch("count");
    let storage = |name: &str| -> Arc<dyn Storage> {
        match &direct {
            Some(s) => {
                let p = s.path(name);
                drop(FileStorage::create(&p).unwrap());
                Arc::new(FileStorage::open(&p, true, true).unwrap())
            }
            None => Arc::new(MemStorage::new()),
        }
    };
    let (with_cache, grown) = count_writes(storage("cache.qcow2"), CACHE, cs, n);
    let w = writes_of(&with_cache);
    let compressed_clusters = grown.div_ceil(cs);
    eprintln!(
        "{n} compressed clusters in {compressed_clusters} host clusters: {} writes with the cache",
        w.len()
    );
    assert!(compressed_clusters < n / 2, "the data should compress");
    assert!(
        w.len() as u64 <= compressed_clusters + 1,
        "{} writes for {compressed_clusters} host clusters: {w:?}",
        w.len()
    );
    for &(off, len) in &w {
        assert!(
            off % cs == 0 && len % cs == 0,
            "unaligned write {len}@{off:#x}"
        );
    }
    let (without, _) = count_writes(storage("nocache.qcow2"), 0, cs, n);
    let w = writes_of(&without);
    eprintln!("{} writes without the cache", w.len());
    assert!(w.len() as u64 >= n);
    assert!(w.iter().any(|&(off, len)| off % cs != 0 || len % cs != 0));
}

#[test]
fn cli_write_compressed() {
    let s = Scratch::new("cli-c");
    let path = s.path("cli.qcow2");
    create(&path, 4 << 20, CompressionType::Zstd, 65536, 16);
    let text: Vec<u8> = b"cowdisk write --compressed\n"
        .iter()
        .copied()
        .cycle()
        .take(3 << 20)
        .collect();
    let src = s.path("src.txt");
    std::fs::write(&src, &text).unwrap();
    let p = path.to_str().unwrap();
    let out = run_ok(
        env!("CARGO_BIN_EXE_cowdisk"),
        &[
            "write",
            "--compressed",
            "--from",
            src.to_str().unwrap(),
            p,
            "1M",
        ],
    );
    assert!(out.contains("compressed"), "{out}");
    run_ok(
        env!("CARGO_BIN_EXE_cowdisk"),
        &["write", "-c", "-P", "0x55", p, "0", "64k"],
    );
    let (code, _, err) = run(
        env!("CARGO_BIN_EXE_cowdisk"),
        &["write", "-c", p, "512", "64k"],
    );
    assert_ne!(code, 0, "a misaligned compressed write must fail");
    assert!(err.contains("whole clusters"), "{err}");
    let check = check_json(&path);
    assert!(compressed_clusters(&check) >= 49, "{check}");
    let mut expected = vec![0u8; 4 << 20];
    expected[..65536].fill(0x55);
    expected[1 << 20..].copy_from_slice(&text);
    let raw = s.path("expected.raw");
    std::fs::write(&raw, &expected).unwrap();
    qemu_compare_raw(&path, &raw);
}
