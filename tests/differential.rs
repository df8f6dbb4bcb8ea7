//! Randomised differential test: random writes (1 byte to several clusters, at random
//! offsets), write_zeroes (aligned and not, with and without unmap), discards, resizes,
//! reads, flushes and reopens applied both to an image and to an in-memory model; every
//! read must match, and at the end `qemu-img check` must be clean and `qemu-img compare`
//! must find the image identical to the model written as raw.
//!
//! Compressed configurations add compressed writes of whole clusters (into clusters
//! that are unallocated in the image; elsewhere the write must fail and change
//! nothing), with the compressed-write cache on and off and O_DIRECT on and off; the
//! model is unchanged by compression, and later writes, zeroes and discards hit the
//! compressed clusters.

mod common;

use common::dirty::{cowdisk_runs, Model};
use common::*;
use cowdisk::image::Extent;
use cowdisk::{CompressionType, CreateOptions, Image, OpenOptions, SnapshotOptions};
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
    /// Compressed writes: None, or the compression type.
    compression: Option<CompressionType>,
    /// Compressed-write cache bytes (0 = off).
    compressed_cache: u64,
    /// Open with O_DIRECT.
    direct: bool,
    /// Encrypted configurations: "luks" or "aes" (legacy). Snapshots then carry no VM
    /// state, and QEMU is given the passphrase.
    encryption: Option<&'static str>,
}

const PASS: &str = "differential passphrase";

/// qemu-img arguments naming the image, with the passphrase for encrypted ones.
fn qemu_image_args(path: &Path, encrypted: bool) -> Vec<String> {
    if !encrypted {
        return vec![path.to_str().unwrap().to_string()];
    }
    vec![
        "--object".into(),
        format!("secret,id=s0,data={PASS}"),
        "--image-opts".into(),
        format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=s0",
            path.to_str().unwrap()
        ),
    ]
}

fn qemu_check_clean_enc(path: &Path, encrypted: bool) {
    if !encrypted {
        return qemu_check_clean(path);
    }
    let mut args = vec!["check".to_string(), "--output=json".to_string()];
    args.extend(qemu_image_args(path, true));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = run("qemu-img", &a);
    assert_eq!(code, 0, "qemu-img check: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v.get("leaks").is_none_or(|l| l == 0), "{out}");
    assert!(v.get("corruptions").is_none_or(|c| c == 0), "{out}");
}

fn qemu_compare_raw_enc(path: &Path, raw: &Path, encrypted: bool) {
    if !encrypted {
        return qemu_compare_raw(path, raw);
    }
    let mut args = vec!["compare".to_string()];
    args.extend(qemu_image_args(path, true));
    args.push(format!(
        "driver=raw,file.filename={}",
        raw.to_str().unwrap()
    ));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = run("qemu-img", &a);
    assert_eq!(code, 0, "qemu-img compare: {out}{err}");
}

/// Fills `buf` with data that compresses: text, zeros and a few random bytes, or
/// (sometimes) all random, which falls back to normal clusters.
fn compressible(rng: &mut Rng, buf: &mut [u8]) {
    let words: [&[u8]; 4] = [b"qcow2 ", b"compressed ", b"cluster ", b"\0\0\0\0\0\0\0\0"];
    match rng.below(6) {
        0 => rng.fill(buf),
        _ => {
            let mut at = 0;
            while at < buf.len() {
                let w = words[rng.below(4) as usize];
                let n = w.len().min(buf.len() - at);
                buf[at..at + n].copy_from_slice(&w[..n]);
                at += n;
                if rng.below(64) == 0 {
                    let r = (rng.below(32) as usize).min(buf.len() - at);
                    rng.fill(&mut buf[at..at + r]);
                    at += r;
                }
            }
        }
    }
}

/// True when block status says the bytes are not allocated in the image itself (or
/// are a zero cluster without a host cluster): compressed writes may go there.
fn compressible_target(extents: &[Extent]) -> bool {
    extents
        .iter()
        .all(|e| e.depth > 0 || !e.present || (e.zero && !e.data && e.offset.is_none()))
}

/// An internal snapshot as the model sees it.
struct Snap {
    id: String,
    model: Vec<u8>,
    /// VM state recorded with it.
    vmstate: Vec<u8>,
}

/// One snapshot step: create (sometimes with VM state), goto or delete, mirrored in
/// the model. Narrow refcounts may refuse a create or goto (ENOTSUP); then nothing
/// changes.
fn snapshot_step(
    img: &Image,
    rng: &mut Rng,
    snaps: &mut Vec<Snap>,
    model: &mut Vec<u8>,
    step: usize,
    cs: u64,
    with_vmstate: bool,
) {
    let op = if snaps.is_empty() { 0 } else { rng.below(4) };
    match op {
        0 | 1 if snaps.len() < 6 => {
            let n = rng.below(3) as usize * rng.below(3 * cs + 70_000) as usize;
            let mut vmstate = vec![0u8; if with_vmstate { n } else { 0 }];
            rng.fill(&mut vmstate);
            let mut at = 0;
            while at < vmstate.len() {
                let n = (1 + rng.below(5000) as usize).min(vmstate.len() - at);
                img.save_vmstate(&vmstate[at..at + n], at as u64)
                    .unwrap_or_else(|e| panic!("step {step}: save_vmstate: {e}"));
                at += n;
            }
            if with_vmstate {
                img.finalize_vmstate().unwrap();
            }
            let opts = SnapshotOptions {
                vm_state_size: vmstate.len() as u64,
                ..SnapshotOptions::default()
            };
            match img.snapshot_create(&format!("s{step}"), &opts) {
                Ok(info) => snaps.push(Snap {
                    id: info.id,
                    model: model.clone(),
                    vmstate,
                }),
                Err(e) => assert_eq!(e.errno(), libc::ENOTSUP, "step {step}: create: {e}"),
            }
        }
        0..=2 => {
            let i = rng.below(snaps.len() as u64) as usize;
            match img.snapshot_goto(&snaps[i].id) {
                Ok(()) => {
                    *model = snaps[i].model.clone();
                    assert_eq!(img.size(), model.len() as u64, "step {step}: goto size");
                    if with_vmstate {
                        let mut back = vec![0u8; snaps[i].vmstate.len()];
                        img.load_vmstate(&mut back, 0).unwrap();
                        assert!(back == snaps[i].vmstate, "step {step}: VM state after goto");
                    }
                }
                Err(e) => assert_eq!(e.errno(), libc::ENOTSUP, "step {step}: goto: {e}"),
            }
        }
        _ => {
            let i = rng.below(snaps.len() as u64) as usize;
            img.snapshot_delete(&snaps[i].id)
                .unwrap_or_else(|e| panic!("step {step}: delete: {e}"));
            snaps.remove(i);
        }
    }
}

/// Snapshot `id` of the image read by QEMU.
fn qemu_read_snapshot(path: &Path, id: &str, s: &Scratch, encrypted: bool) -> Vec<u8> {
    let out = s.path("qemu-snapshot.raw");
    let _ = std::fs::remove_file(&out);
    let mut args: Vec<String> = ["convert", "-O", "raw", "-l"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.push(format!("snapshot.id={id}"));
    args.extend(qemu_image_args(path, encrypted));
    args.push(out.to_str().unwrap().to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok("qemu-img", &a);
    std::fs::read(&out).unwrap()
}

/// `cowdisk check` finds nothing: no corruption, no leak, no check error.
fn assert_clean(img: &Image, what: &str) {
    let r = img.check(cowdisk::image::Repair::None).unwrap();
    assert!(
        r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0,
        "{what}: cowdisk check: {r:?}"
    );
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
        compression_type: cfg.compression.unwrap_or_default(),
        version: cfg.version,
        cluster_size: cfg.cluster_size,
        refcount_bits: cfg.refcount_bits,
        ..CreateOptions::default()
    };
    let encrypted = cfg.encryption.is_some();
    let secret = encrypted.then(|| cowdisk::crypto::Secret::new(PASS.as_bytes()));
    create.secret = secret.clone();
    create.encryption = cfg.encryption.map(|kind| match kind {
        "aes" => cowdisk::EncryptionFormat::LegacyAes,
        _ => cowdisk::EncryptionFormat::Luks(cowdisk::crypto::LuksCreateOptions {
            iter_time_ms: 10,
            ..Default::default()
        }),
    });
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
        compressed_cache_size: cfg.compressed_cache,
        direct: cfg.direct,
        secret,
        ..OpenOptions::default()
    };
    let mut img = Image::open(&img_path, &open_opts).unwrap();
    let cs = cfg.cluster_size as u64;
    let mut size = cfg.size;
    let (mut compressed_ok, mut compressed_refused) = (0, 0);
    let mut snaps: Vec<Snap> = Vec::new();
    // Persistent bitmaps (v3): a fine one, a coarse one, and one that starts disabled;
    // each has a model of its dirty set, checked after every step and every reopen.
    let mut bitmaps: Vec<(String, Model, bool)> = Vec::new();
    if cfg.version == 3 {
        for (name, g, enabled) in [
            ("fine", 512, true),
            ("coarse", 4 * cs, true),
            ("off", cs, false),
        ] {
            img.bitmap_add(name, g, enabled).unwrap();
            bitmaps.push((name.to_string(), Model::new(g, size), enabled));
        }
    }
    let mark = |bitmaps: &mut Vec<(String, Model, bool)>, off: u64, len: u64| {
        for (_, m, enabled) in bitmaps.iter_mut() {
            if *enabled {
                m.mark(off, len);
            }
        }
    };
    for step in 0..cfg.ops {
        match rng.below(100) {
            0..=49 if cfg.compression.is_some() && rng.below(3) == 0 => {
                // A compressed write of whole clusters (the last one may be partial).
                let first = rng.below(size.div_ceil(cs));
                let off = first * cs;
                let len = (cs * (1 + rng.below(6))).min(size - off);
                let mut data = vec![0u8; len as usize];
                compressible(&mut rng, &mut data);
                let status = img.block_status(off, len, usize::MAX).unwrap();
                let allowed = compressible_target(&status);
                match img.write_compressed(&data, off) {
                    Ok(()) => {
                        assert!(allowed, "step {step}: compressed write {len}@{off} over allocated clusters succeeded: {status:?}");
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        mark(&mut bitmaps, off, len);
                        compressed_ok += 1;
                    }
                    Err(e) => {
                        assert!(!allowed, "step {step}: compressed write {len}@{off}: {e}");
                        assert_eq!(e.errno(), libc::EINVAL, "step {step}: {e}");
                        compressed_refused += 1;
                    }
                }
            }
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
                mark(&mut bitmaps, off, len);
            }
            50..=57 => {
                // Zeroes: aligned whole clusters or arbitrary pieces, maybe unmapping.
                let (off, len) = random_range(&mut rng, size, cs);
                let unmap = rng.below(2) == 0;
                img.write_zeroes(off, len, unmap)
                    .unwrap_or_else(|e| panic!("step {step}: zeroes {len}@{off}: {e}"));
                model[off as usize..(off + len) as usize].fill(0);
                mark(&mut bitmaps, off, len);
            }
            58..=62 => {
                let (off, len) = random_range(&mut rng, size, cs);
                img.discard(off, len)
                    .unwrap_or_else(|e| panic!("step {step}: discard {len}@{off}: {e}"));
                mark(&mut bitmaps, off, len);
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
                // Images with snapshots may refuse to shrink.
                let new_size = (cfg.size / 2 + rng.below(cfg.size)) / 512 * 512;
                match img.resize(new_size, true) {
                    Ok(()) => {
                        model.resize(new_size as usize, 0);
                        size = new_size;
                        bitmaps.iter_mut().for_each(|(_, m, _)| m.resize(new_size));
                    }
                    Err(e) => assert!(
                        !snaps.is_empty() && new_size < size && e.errno() == libc::ENOTSUP,
                        "step {step}: resize {size} -> {new_size}: {e}"
                    ),
                }
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
            90..=94 if cfg.compression.is_none() && rng.below(2) == 0 => {
                snapshot_step(&img, &mut rng, &mut snaps, &mut model, step, cs, !encrypted);
                size = model.len() as u64;
                // A goto changes the data but not the bitmaps (QEMU's rule); a
                // different snapshot size resizes them.
                bitmaps.iter_mut().for_each(|(_, m, _)| m.resize(size));
            }
            90..=92 if !bitmaps.is_empty() => {
                // Manage a bitmap: clear one, or flip one's tracking.
                let i = rng.below(bitmaps.len() as u64) as usize;
                let (name, m, enabled) = &mut bitmaps[i];
                if rng.below(2) == 0 {
                    img.bitmap_clear(name).unwrap();
                    m.bits.fill(false);
                } else {
                    *enabled = !*enabled;
                    img.bitmap_set_enabled(name, *enabled).unwrap();
                }
            }
            90..=94 => img.flush().unwrap(),
            _ => {
                assert_clean(&img, &format!("{}: step {step}", cfg.name));
                img.close().unwrap();
                img = Image::open(&img_path, &open_opts).unwrap();
            }
        }
        for (name, m, _) in &bitmaps {
            assert_eq!(
                cowdisk_runs(&img, name),
                m.runs(),
                "{}: step {step}: bitmap {name} differs from its model",
                cfg.name
            );
        }
    }
    if cfg.compression.is_some() {
        eprintln!(
            "{}: {compressed_ok} compressed writes, {compressed_refused} refused",
            cfg.name
        );
        assert!(compressed_ok >= 5, "too few compressed writes went through");
    }
    // Full read-back through cowdisk, then let QEMU judge the file.
    let mut all = vec![0u8; size as usize];
    img.read_at(&mut all, 0).unwrap();
    assert!(
        all == model,
        "{}: final read differs from the model",
        cfg.name
    );
    assert_clean(&img, &format!("{}: the end", cfg.name));
    img.close().unwrap();
    qemu_check_clean_enc(&img_path, encrypted);
    if !bitmaps.is_empty() {
        let ro = Image::open(
            &img_path,
            &OpenOptions {
                read_only: true,
                ..open_opts.clone()
            },
        )
        .unwrap();
        for (name, m, _) in &bitmaps {
            assert_eq!(
                cowdisk_runs(&ro, name),
                m.runs(),
                "{}: bitmap {name} after close",
                cfg.name
            );
        }
    }
    let model_path = s.path("model.raw");
    write_raw(&model_path, &model);
    qemu_compare_raw_enc(&img_path, &model_path, encrypted);
    // QEMU reads a snapshot at the image's current size: compare what both cover.
    for snap in &snaps {
        let q = qemu_read_snapshot(&img_path, &snap.id, &s, encrypted);
        let n = q.len().min(snap.model.len());
        assert!(
            q[..n] == snap.model[..n],
            "{}: snapshot {} read by QEMU differs from its model",
            cfg.name,
            snap.id
        );
    }
    // Every snapshot, applied by cowdisk, is exactly its model; QEMU stays content.
    if !snaps.is_empty() {
        let img = Image::open(&img_path, &open_opts).unwrap();
        for snap in &snaps {
            match img.snapshot_goto(&snap.id) {
                Ok(()) => {}
                Err(e) if e.errno() == libc::ENOTSUP => continue, // narrow refcounts
                Err(e) => panic!("{}: goto {}: {e}", cfg.name, snap.id),
            }
            let mut all = vec![0u8; img.size() as usize];
            img.read_at(&mut all, 0).unwrap();
            assert!(
                all == snap.model,
                "{}: snapshot {} after goto",
                cfg.name,
                snap.id
            );
            if encrypted {
                continue;
            }
            let mut state = vec![0u8; snap.vmstate.len()];
            img.load_vmstate(&mut state, 0).unwrap();
            assert!(
                state == snap.vmstate,
                "{}: VM state of {}",
                cfg.name,
                snap.id
            );
        }
        img.close().unwrap();
        qemu_check_clean_enc(&img_path, encrypted);
    }
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
                compression: None,
                compressed_cache: 0,
                direct: false,
                encryption: None,
            };
            run_config(&cfg, seed(0xC0DE));
        }
    };
}

/// A differential run with compressed writes: compression type, compressed-write
/// cache bytes (0 = off), O_DIRECT.
macro_rules! compressed {
    ($name:ident, $v:expr, $cs:expr, $rb:expr, $size:expr, $backing:expr, $l2:expr, $ops:expr,
     $kind:expr, $ccache:expr, $direct:expr) => {
        #[test]
        fn $name() {
            let cfg = Config {
                name: stringify!($name),
                version: $v,
                cluster_size: $cs,
                refcount_bits: $rb,
                size: $size,
                backing: $backing,
                l2_cache_size: $l2,
                ops: $ops,
                compression: Some($kind),
                compressed_cache: $ccache,
                direct: $direct,
                encryption: None,
            };
            if $direct && !supports_direct(&std::env::temp_dir()) {
                eprintln!(
                    "NOTICE: the temporary folder refuses O_DIRECT; skipping {}",
                    cfg.name
                );
                return;
            }
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

const CACHE: u64 = cowdisk::image::DEFAULT_COMPRESSED_CACHE_SIZE;
use CompressionType::{Zlib, Zstd};

compressed!(
    c_v3_64k_zlib_cache,
    3,
    65536,
    16,
    24 * MIB,
    "none",
    0,
    1500,
    Zlib,
    CACHE,
    false
);
compressed!(
    c_v3_64k_zstd_nocache,
    3,
    65536,
    16,
    24 * MIB,
    "none",
    0,
    1500,
    Zstd,
    0,
    false
);
compressed!(
    c_v3_64k_zlib_direct_cache,
    3,
    65536,
    16,
    24 * MIB,
    "none",
    0,
    1200,
    Zlib,
    CACHE,
    true
);
compressed!(
    c_v3_64k_zstd_direct_nocache,
    3,
    65536,
    16,
    24 * MIB,
    "none",
    0,
    1200,
    Zstd,
    0,
    true
);
// 4 KiB clusters with 2-bit refcounts: a host cluster holds at most 3 compressed ones.
compressed!(
    c_v3_4k_rc2_zlib_direct_cache,
    3,
    4096,
    2,
    8 * MIB,
    "qcow2",
    0,
    1500,
    Zlib,
    64 * 1024,
    true
);
// 512-byte clusters, 1-bit refcounts and a tiny L2 cache: evictions of L2 tables that
// point into the cache.
compressed!(
    c_v3_512_rc1_small_l2_cache,
    3,
    512,
    1,
    2 * MIB,
    "none",
    2048,
    1500,
    Zlib,
    8192,
    false
);
compressed!(
    c_v3_512_rc16_small_l2_direct,
    3,
    512,
    16,
    2 * MIB,
    "none",
    2048,
    1500,
    Zstd,
    4096,
    true
);
compressed!(
    c_v2_64k_raw_backing_cache,
    2,
    65536,
    16,
    24 * MIB,
    "raw",
    0,
    1200,
    Zlib,
    CACHE,
    false
);
compressed!(
    c_v3_2m_zstd_cache,
    3,
    2 * 1024 * 1024,
    16,
    48 * MIB,
    "none",
    0,
    400,
    Zstd,
    CACHE,
    false
);

/// An encrypted differential run: "luks" or "aes", O_DIRECT on or off.
macro_rules! encrypted {
    ($name:ident, $v:expr, $cs:expr, $size:expr, $backing:expr, $ops:expr, $kind:expr, $direct:expr) => {
        #[test]
        fn $name() {
            let cfg = Config {
                name: stringify!($name),
                version: $v,
                cluster_size: $cs,
                refcount_bits: 16,
                size: $size,
                backing: $backing,
                l2_cache_size: 0,
                ops: $ops,
                compression: None,
                compressed_cache: 0,
                direct: $direct,
                encryption: Some($kind),
            };
            if $direct && !supports_direct(&std::env::temp_dir()) {
                eprintln!(
                    "NOTICE: the temporary folder refuses O_DIRECT; skipping {}",
                    cfg.name
                );
                return;
            }
            run_config(&cfg, seed(0xC0DE));
        }
    };
}

encrypted!(
    e_luks_v3_64k,
    3,
    65536,
    24 * MIB,
    "none",
    1500,
    "luks",
    false
);
encrypted!(
    e_luks_v3_4k_qcow2_backing,
    3,
    4096,
    12 * MIB,
    "qcow2",
    1200,
    "luks",
    false
);
encrypted!(
    e_luks_v3_64k_direct,
    3,
    65536,
    16 * MIB,
    "none",
    1000,
    "luks",
    true
);
encrypted!(
    e_aes_v2_64k_raw_backing,
    2,
    65536,
    16 * MIB,
    "raw",
    1000,
    "aes",
    false
);
