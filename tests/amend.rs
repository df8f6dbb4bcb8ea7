//! `cowdisk amend` against `qemu-img amend`: version up and down (zero clusters,
//! compressed clusters, snapshots, a backing file), refcount widths, lazy refcounts;
//! the result is check-clean, reads what it read before, and a crash at any write of
//! an amend leaves an image without corruption that reads the same.

mod common;

use common::*;
use cowdisk::image::AmendOptions;
use cowdisk::io::{FaultStorage, FileStorage, Storage};
use cowdisk::{Image, OpenOptions};
use std::path::Path;
use std::sync::Arc;

fn cowdisk_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cowdisk")
}

fn info(p: &Path) -> serde_json::Value {
    let out = run_ok(
        "qemu-img",
        &["info", "--output=json", "-U", p.to_str().unwrap()],
    );
    serde_json::from_str(&out).unwrap()
}

/// An image with data, zero clusters (plain and preallocated), compressed data and
/// (optionally) a snapshot.
fn populated(s: &Scratch, name: &str, opts: &str, snapshot: bool) -> std::path::PathBuf {
    let p = s.path(name);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            p.to_str().unwrap(),
            "16M",
        ],
    );
    qemu_io(
        &p,
        &[
            "write -P 0x11 0 256k",
            "write -z 64k 64k",
            "write -z -u 192k 64k",
            "write -z 1M 128k",
            "write -c -P 0x22 2M 64k",
            "write -P 0x33 3M 100k",
        ],
    );
    if snapshot {
        run_ok("qemu-img", &["snapshot", "-c", "s1", p.to_str().unwrap()]);
        qemu_io(&p, &["write -P 0x44 0 64k", "write -z 3M 64k"]);
    }
    p
}

/// Amends a copy with cowdisk and one with qemu-img, then compares everything.
fn both(s: &Scratch, src: &Path, options: &str) {
    let ours = s.path("ours.qcow2");
    let theirs = s.path("theirs.qcow2");
    std::fs::copy(src, &ours).unwrap();
    std::fs::copy(src, &theirs).unwrap();
    let before = qemu_read_raw(src, s);
    run_ok(
        cowdisk_bin(),
        &["amend", "-o", options, ours.to_str().unwrap()],
    );
    run_ok(
        "qemu-img",
        &["amend", "-o", options, theirs.to_str().unwrap()],
    );
    qemu_check_clean(&ours);
    assert!(qemu_read_raw(&ours, s) == before, "{options}: data changed");
    let (a, b) = (info(&ours), info(&theirs));
    for key in [
        "compat",
        "refcount-bits",
        "lazy-refcounts",
        "compression-type",
    ] {
        assert_eq!(
            a["format-specific"]["data"][key], b["format-specific"]["data"][key],
            "{options}: {key}"
        );
    }
    assert_eq!(a["snapshots"], b["snapshots"], "{options}: snapshots");
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-U",
            ours.to_str().unwrap(),
            theirs.to_str().unwrap(),
        ],
    );
}

#[test]
fn downgrade_to_v2() {
    let s = Scratch::new("amend-down");
    let p = populated(&s, "a.qcow2", "compat=1.1", false);
    both(&s, &p, "compat=0.10");
}

#[test]
fn downgrade_over_a_backing_file() {
    let s = Scratch::new("amend-down-backing");
    let base = s.path("base.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"],
    );
    qemu_io(&base, &["write -P 0x55 0 16M"]);
    let top = s.path("top.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    // Plain zero clusters over the backing file must become zero-filled data.
    qemu_io(
        &top,
        &["write -z 0 128k", "write -P 0x66 1M 64k", "write -z 1M 64k"],
    );
    both(&s, &top, "compat=0.10");
}

#[test]
fn downgrade_with_a_snapshot() {
    let s = Scratch::new("amend-down-snap");
    let p = populated(&s, "a.qcow2", "compat=1.1", true);
    both(&s, &p, "compat=0.10");
    // The snapshot still reads what it recorded.
    let ours = s.path("ours.qcow2");
    run_ok(
        "qemu-img",
        &["snapshot", "-a", "s1", ours.to_str().unwrap()],
    );
    qemu_io(&ours, &["read -P 0x11 0 64k", "read -P 0x33 3M 64k"]);
}

#[test]
fn upgrade_to_v3() {
    let s = Scratch::new("amend-up");
    let p = s.path("v2.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            p.to_str().unwrap(),
            "16M",
        ],
    );
    qemu_io(&p, &["write -P 0x11 0 256k", "write -c -P 0x22 2M 64k"]);
    run_ok("qemu-img", &["snapshot", "-c", "s1", p.to_str().unwrap()]);
    qemu_io(&p, &["write -P 0x44 0 64k"]);
    both(&s, &p, "compat=1.1");
    both(&s, &p, "compat=1.1,lazy_refcounts=on");
}

#[test]
fn refcount_widths() {
    let s = Scratch::new("amend-rc");
    let p = populated(&s, "a.qcow2", "compat=1.1", true);
    for bits in ["8", "64", "2"] {
        both(&s, &p, &format!("refcount_bits={bits}"));
    }
    // A snapshot shares clusters: 1-bit refcounts cannot count them.
    let ours = s.path("ours.qcow2");
    std::fs::copy(&p, &ours).unwrap();
    let (code, _, err) = run(
        cowdisk_bin(),
        &["amend", "-o", "refcount_bits=1", ours.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("Cannot decrease refcount entry width to 1 bits"),
        "{err}"
    );
    qemu_check_clean(&ours);
}

#[test]
fn lazy_refcounts_on_and_off() {
    let s = Scratch::new("amend-lazy");
    let p = populated(&s, "a.qcow2", "compat=1.1", false);
    both(&s, &p, "lazy_refcounts=on");
    let ours = s.path("ours.qcow2");
    run_ok(
        cowdisk_bin(),
        &["amend", "-o", "lazy_refcounts=off", ours.to_str().unwrap()],
    );
    assert_eq!(
        info(&ours)["format-specific"]["data"]["lazy-refcounts"],
        false
    );
}

#[test]
fn refusals_match_qemu() {
    let s = Scratch::new("amend-refuse");
    let p = populated(&s, "a.qcow2", "compat=1.1,refcount_bits=8", false);
    let (code, _, err) = run(
        cowdisk_bin(),
        &["amend", "-o", "compat=0.10", p.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("compat=0.10 requires refcount_bits=16"),
        "{err}"
    );
    // Both at once works (the width changes first).
    both(&s, &p, "compat=0.10,refcount_bits=16");
    let z = populated(&s, "z.qcow2", "compat=1.1,compression_type=zstd", false);
    let (code, _, err) = run(
        cowdisk_bin(),
        &["amend", "-o", "compat=0.10", z.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(err.contains("zstd compression type"), "{err}");
    let (code, _, err) = run(
        cowdisk_bin(),
        &["amend", "-o", "cluster_size=4k", z.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(err.contains("only supported for image creation"), "{err}");
    qemu_check_clean(&z);
}

/// A crash at every write of an amend: no corruption, and the same data.
#[test]
fn crash_during_amend() {
    let s = Scratch::new("amend-crash");
    let p = populated(&s, "a.qcow2", "compat=1.1", true);
    let before = qemu_read_raw(&p, &s);
    for opts in [
        AmendOptions {
            refcount_bits: Some(8),
            ..AmendOptions::default()
        },
        AmendOptions {
            version: Some(2),
            ..AmendOptions::default()
        },
    ] {
        let mut n = 0;
        loop {
            let c = s.path("crash.qcow2");
            std::fs::copy(&p, &c).unwrap();
            let file: Arc<dyn Storage> = Arc::new(FileStorage::open(&c, true, false).unwrap());
            let fault = Arc::new(FaultStorage::new(file));
            let img = Image::open_storage(fault.clone(), &OpenOptions::default()).unwrap();
            fault.fail_writes_after(n);
            let done = img.amend(&opts).and_then(|()| img.close());
            if done.is_ok() {
                break;
            }
            let (code, out, err) = run("qemu-img", &["check", c.to_str().unwrap()]);
            assert!(
                code == 0 || code == 3,
                "{opts:?}, crash at write {n}: {out}{err}"
            );
            assert!(
                qemu_read_raw(&c, &s) == before,
                "{opts:?}, crash at write {n}: data"
            );
            n += 1;
        }
        assert!(n > 2, "{opts:?}: the amend made only {n} writes");
    }
}
