//! `cowdisk check` against `qemu-img check` on images damaged the way QEMU's iotests
//! (060, 108) damage them: the same counts of corruptions and leaks and the same exit
//! code; `-r all` (and `-r leaks`) repair what QEMU's repair repairs, leaving an image
//! `qemu-img check` calls clean and reading the same data as QEMU's repaired copy.

mod common;

use common::*;
use std::path::Path;

const CLUSTER: u64 = 65536;
/// Layout of a fresh 64 MiB image with 64 KiB clusters (qemu-img's).
const REFTABLE: u64 = 0x10000;
const REFBLOCK: u64 = 0x20000;
const L1: u64 = 0x30000;
const L2: u64 = 0x40000;

fn cowdisk_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cowdisk")
}

/// A 64 MiB image with data in clusters 5 and 6 (guest 0..128k) and 7 (guest 1M).
fn base(s: &Scratch) -> std::path::PathBuf {
    let p = s.path("base.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"],
    );
    qemu_io(&p, &["write -P 0x11 0 128k", "write -P 0x22 1M 64k"]);
    p
}

/// (corruptions, leaks, check-errors, exit code) of a check, from its JSON.
fn counts(tool: &str, path: &Path, extra: &[&str]) -> (u64, u64, u64, i32, String) {
    let mut args = vec!["check", "--output=json"];
    args.extend_from_slice(extra);
    args.push(path.to_str().unwrap());
    let (code, out, err) = run(tool, &args);
    let v: serde_json::Value = match serde_json::from_str(&out) {
        Ok(v) => v,
        Err(_) => return (0, 0, 0, code, format!("{out}{err}")),
    };
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (
        n("corruptions"),
        n("leaks"),
        n("check-errors"),
        code,
        format!("{out}{err}"),
    )
}

/// Applies `damage` to a fresh copy of the base image for each tool, then compares
/// their checks, their repairs and what the repaired images read.
fn compare_case(name: &str, damage: &dyn Fn(&Path)) {
    let s = Scratch::new(&format!("check-{name}"));
    let b = base(&s);
    damage(&b);
    let ours = s.path("ours.qcow2");
    let theirs = s.path("theirs.qcow2");
    for repair in ["leaks", "all"] {
        std::fs::copy(&b, &ours).unwrap();
        std::fs::copy(&b, &theirs).unwrap();
        let q = counts("qemu-img", &theirs, &[]);
        let c = counts(cowdisk_bin(), &ours, &[]);
        assert_eq!(
            (q.0, q.1, q.2, q.3),
            (c.0, c.1, c.2, c.3),
            "{name}: check differs\nqemu-img: {}\ncowdisk: {}",
            q.4,
            c.4
        );
        let q = counts("qemu-img", &theirs, &["-r", repair]);
        let c = counts(cowdisk_bin(), &ours, &["-r", repair]);
        assert_eq!(
            (q.0, q.1, q.3),
            (c.0, c.1, c.3),
            "{name}: check -r {repair} differs\nqemu-img: {}\ncowdisk: {}",
            q.4,
            c.4
        );
        // What QEMU thinks of our repair, and the data both repairs kept.
        let after_ours = counts("qemu-img", &ours, &[]);
        let after_theirs = counts("qemu-img", &theirs, &[]);
        assert_eq!(
            (after_ours.0, after_ours.1, after_ours.3),
            (after_theirs.0, after_theirs.1, after_theirs.3),
            "{name}: qemu-img check after -r {repair}\nours: {}\ntheirs: {}",
            after_ours.4,
            after_theirs.4
        );
        if after_theirs.3 == 0 {
            let (code, out, err) = run(
                "qemu-img",
                &[
                    "compare",
                    "-U",
                    ours.to_str().unwrap(),
                    theirs.to_str().unwrap(),
                ],
            );
            assert_eq!(code, 0, "{name}: repaired images differ: {out}{err}");
        }
    }
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn u64be(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

fn u16be(v: u16) -> [u8; 2] {
    v.to_be_bytes()
}

#[test]
fn clean_image_agrees() {
    compare_case("clean", &|_| {});
}

#[test]
fn leaked_cluster() {
    // Cluster 9 (past the data) counted once, referenced by nothing.
    compare_case("leak", &|p| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(10 * CLUSTER)
            .unwrap();
        poke(p, REFBLOCK + 2 * 9, &u16be(1));
    });
}

#[test]
fn refcount_too_high() {
    compare_case("rc-high", &|p| poke(p, REFBLOCK + 2 * 5, &u16be(2)));
}

#[test]
fn refcount_zero_for_data_needs_a_rebuild() {
    compare_case("rc-zero", &|p| poke(p, REFBLOCK + 2 * 5, &u16be(0)));
}

#[test]
fn l1_entry_without_copied() {
    compare_case("l1-copied", &|p| poke(p, L1, &u64be(L2)));
}

#[test]
fn l2_entry_without_copied() {
    compare_case("l2-copied", &|p| poke(p, L2, &u64be(5 * CLUSTER)));
}

#[test]
fn cluster_referenced_twice() {
    // Guest cluster 1 maps to the host cluster of guest cluster 0 too.
    compare_case("double", &|p| {
        poke(p, L2 + 8, &u64be((1 << 63) | (5 * CLUSTER)));
    });
}

#[test]
fn data_cluster_past_the_end_of_the_file() {
    compare_case("past-eof", &|p| {
        poke(p, L2 + 8, &u64be((1 << 63) | 0x1000_0000));
    });
}

#[test]
fn unaligned_data_cluster() {
    compare_case("unaligned-data", &|p| {
        poke(p, L2, &u64be((1 << 63) | (5 * CLUSTER + 0x2a00)));
    });
}

#[test]
fn unaligned_preallocated_zero_cluster() {
    compare_case("unaligned-zero", &|p| {
        poke(p, L2, &u64be((1 << 63) | (5 * CLUSTER + 0x2a00) | 1));
    });
}

#[test]
fn empty_refcount_table() {
    compare_case("reftable-empty", &|p| poke(p, REFTABLE, &u64be(0)));
}

#[test]
fn empty_refcount_block() {
    compare_case("refblock-empty", &|p| poke(p, REFBLOCK, &[0u8; 8]));
}

#[test]
fn l1_entry_pointing_at_the_refcount_table() {
    compare_case("l1-at-reftable", &|p| {
        poke(p, L1 + 8, &u64be((1 << 63) | REFTABLE));
    });
}

#[test]
fn compressed_entry_with_copied() {
    compare_case("compressed-copied", &|p| {
        let s = Scratch::new("cc");
        let c = s.path("c.qcow2");
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", c.to_str().unwrap(), "64M"],
        );
        qemu_io(&c, &["write -c -P 0x33 0 64k"]);
        std::fs::copy(&c, p).unwrap();
        let data = std::fs::read(p).unwrap();
        let e = u64::from_be_bytes(data[L2 as usize..L2 as usize + 8].try_into().unwrap());
        poke(p, L2, &u64be(e | (1 << 63)));
    });
}

#[test]
fn snapshot_with_unaligned_l1() {
    compare_case("snapshot-l1", &|p| {
        run_ok("qemu-img", &["snapshot", "-c", "s", p.to_str().unwrap()]);
        qemu_io(p, &["write -P 0x44 0 64k"]);
        let (_, out, _) = run("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
        let _ = out;
        // The snapshot table is the last thing qemu-img wrote before the COW: find
        // it through the header and break its L1 offset.
        let data = std::fs::read(p).unwrap();
        let table = u64::from_be_bytes(data[64..72].try_into().unwrap());
        let l1 = u64::from_be_bytes(data[table as usize..table as usize + 8].try_into().unwrap());
        poke(p, table, &u64be(l1 + 0x200));
    });
}

/// `map` works on an image whose refcount structure is damaged (as QEMU's does) and
/// gives what `qemu-img map` gives.
#[test]
fn map_with_damaged_refcounts() {
    let s = Scratch::new("check-map");
    let p = base(&s);
    poke(&p, REFTABLE, &u64be(0x7fff_0000_0000_0200));
    let ours = run_ok(
        cowdisk_bin(),
        &["map", "--output=json", p.to_str().unwrap()],
    );
    let theirs = run_ok("qemu-img", &["map", "--output=json", p.to_str().unwrap()]);
    assert_eq!(ours, theirs);
}

/// An empty image of the largest size maps at once (block status skips unmapped L1
/// ranges): nothing here waits on the virtual size.
#[test]
fn map_of_an_empty_huge_image() {
    let s = Scratch::new("check-huge");
    let p = s.path("huge.qcow2");
    run_ok(cowdisk_bin(), &["create", p.to_str().unwrap(), "2P"]);
    let out = run_ok(
        cowdisk_bin(),
        &["map", "--output=json", p.to_str().unwrap()],
    );
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("\"length\": 2251799813685248"), "{out}");
    let r = counts(cowdisk_bin(), &p, &[]);
    assert_eq!((r.0, r.1, r.3), (0, 0, 0), "{}", r.4);
}
