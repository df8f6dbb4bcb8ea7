//! Crash consistency: a workload runs against storage that stops accepting writes from
//! the N-th on (every N across the run). Whatever reached the disk must be a valid
//! image — `qemu-img check` may find leaked clusters but never corruption — and every
//! byte written before the last successful flush must read back.

mod common;

use common::*;
use cowdisk::io::{FaultStorage, FileStorage, Storage};
use cowdisk::{CreateOptions, Image, OpenOptions};
use std::path::Path;
use std::sync::Arc;

const SIZE: u64 = 8 << 20;

/// The workload: random writes with a flush every few. Returns the model as of the
/// last successful flush and a map of bytes written after it (which may or may not
/// have survived). Stops at the first error.
fn workload(img: &Image, seed: u64, cs: u64) -> (Vec<u8>, Vec<bool>, bool) {
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; SIZE as usize];
    let mut durable = model.clone();
    let mut unsure = vec![false; SIZE as usize];
    for step in 0..120 {
        if step % 7 == 6 {
            if img.flush().is_err() {
                return (durable, unsure, true);
            }
            durable.copy_from_slice(&model);
            unsure.fill(false);
            continue;
        }
        let len = if step % 11 == 0 {
            1 + rng.below(96 * 1024)
        } else {
            1 + rng.below(2 * cs)
        };
        let off = rng.below(SIZE - len);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        let range = off as usize..(off + len) as usize;
        unsure[range.clone()].fill(true);
        if img.write_at(&data, off).is_err() {
            return (durable, unsure, true);
        }
        model[range].copy_from_slice(&data);
    }
    if img.flush().is_err() {
        return (durable, unsure, true);
    }
    (model, vec![false; SIZE as usize], false)
}

const PASS: &str = "crash passphrase";

fn secret(encrypted: bool) -> Option<cowdisk::crypto::Secret> {
    encrypted.then(|| cowdisk::crypto::Secret::new(PASS.as_bytes()))
}

fn check_after_crash(path: &Path, durable: &[u8], unsure: &[bool], what: &str, encrypted: bool) {
    let p = path.to_str().unwrap();
    let (obj, opts) = (
        format!("secret,id=s0,data={PASS}"),
        format!("driver=qcow2,file.filename={p},encrypt.key-secret=s0"),
    );
    let args: Vec<&str> = if encrypted {
        vec![
            "check",
            "--output=json",
            "--object",
            &obj,
            "--image-opts",
            &opts,
        ]
    } else {
        vec!["check", "--output=json", p]
    };
    let (code, out, err) = run("qemu-img", &args);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check exit {code}\n{out}\n{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v.get("corruptions").is_none_or(|c| c == 0),
        "{what}: {out}\n{err}"
    );
    let img = Image::open(
        path,
        &OpenOptions {
            read_only: true,
            secret: secret(encrypted),
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(&mut got, 0).unwrap();
    for (i, ((g, d), u)) in got.iter().zip(durable).zip(unsure).enumerate() {
        if !u && g != d {
            panic!("{what}: byte {i} was flushed as {d:#x} but reads {g:#x} after the crash");
        }
    }
}

fn crash_at_every_point(cluster_size: u32, refcount_bits: u32, seed: u64, encrypted: bool) {
    let s = Scratch::new(&format!("crash-{cluster_size}-{refcount_bits}-{encrypted}"));
    let create = CreateOptions {
        cluster_size,
        refcount_bits,
        secret: secret(encrypted),
        encryption: encrypted.then(|| {
            cowdisk::EncryptionFormat::Luks(cowdisk::crypto::LuksCreateOptions {
                iter_time_ms: 10,
                ..Default::default()
            })
        }),
        ..CreateOptions::default()
    };
    let template = s.path("template.qcow2");
    Image::create(&template, SIZE, &create).unwrap();
    let open = |path: &Path| {
        let file = FileStorage::open(path, true, false).unwrap();
        let faulty = Arc::new(FaultStorage::new(Arc::new(file) as Arc<dyn Storage>));
        let opts = OpenOptions {
            secret: secret(encrypted),
            ..OpenOptions::default()
        };
        let img = Image::open_storage(faulty.clone(), &opts).unwrap();
        (img, faulty)
    };
    // Count the writes of a clean run.
    let clean = s.path("clean.qcow2");
    std::fs::copy(&template, &clean).unwrap();
    let (img, faulty) = open(&clean);
    let (_, _, failed) = workload(&img, seed, cluster_size as u64);
    assert!(!failed);
    // The workload's writes (closing may trim preallocated space afterwards).
    let total = faulty.writes_seen();
    img.close().unwrap();
    if !encrypted {
        qemu_check_clean(&clean);
    }

    let step = (total / 120).max(1);
    let mut n = 0;
    while n < total {
        let path = s.path("crashed.qcow2");
        std::fs::copy(&template, &path).unwrap();
        let (img, faulty) = open(&path);
        faulty.fail_writes_after(n);
        let (durable, unsure, failed) = workload(&img, seed, cluster_size as u64);
        assert!(failed, "write {n} of {total} should have failed");
        drop(img);
        check_after_crash(
            &path,
            &durable,
            &unsure,
            &format!("crash at write {n}/{total}"),
            encrypted,
        );
        n += step;
    }
}

#[test]
fn crash_64k_clusters() {
    crash_at_every_point(65536, 16, seed(5), false);
}

#[test]
fn crash_512b_clusters_64bit_refcounts() {
    // Small clusters and wide refcounts: new refcount blocks and refcount table growth
    // happen inside the workload.
    crash_at_every_point(512, 64, seed(6), false);
}

#[test]
fn crash_64k_clusters_luks() {
    // Encrypted: every allocating write seals whole clusters (head and tail too).
    crash_at_every_point(65536, 16, seed(7), true);
}
