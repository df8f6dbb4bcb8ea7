//! A damaged image is not damaged further (iotests 060's catalogue, our own tests):
//! each write that would land on metadata is refused with EIO naming what it would
//! have overwritten, the image is marked corrupt (and refused read-write afterwards),
//! `qemu-img check` finds no more errors than before the attempt, and the data that
//! was readable reads the same.

mod common;

use common::*;
use cowdisk::{Image, OpenOptions};
use std::path::Path;

const CLUSTER: u64 = 65536;
const REFTABLE: u64 = 0x10000;
const REFBLOCK: u64 = 0x20000;
const L1: u64 = 0x30000;
const L2: u64 = 0x40000;
const COPIED: u64 = 1 << 63;

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn image(s: &Scratch, cmds: &[&str]) -> std::path::PathBuf {
    let p = s.path("o.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"],
    );
    if !cmds.is_empty() {
        qemu_io(&p, cmds);
    }
    p
}

/// Errors `qemu-img check` reports (corruptions + check errors).
fn qemu_errors(p: &Path) -> u64 {
    let (_, out, _) = run("qemu-img", &["check", "--output=json", p.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    n("corruptions") + n("check-errors")
}

fn corrupt_bit(p: &Path) -> bool {
    let data = std::fs::read(p).unwrap();
    u64::from_be_bytes(data[72..80].try_into().unwrap()) & 2 != 0
}

/// What the guest range `[0, len)` reads as through QEMU (read-only).
fn qemu_view(p: &Path, s: &Scratch) -> Vec<u8> {
    qemu_read_raw(p, s)
}

/// Runs `attempt` on the damaged image at `p` and checks the rules of this file.
fn refused(p: &Path, s: &Scratch, expect: &str, attempt: &dyn Fn(&Image) -> cowdisk::Result<()>) {
    let before = qemu_errors(p);
    let view = qemu_view(p, s);
    let img = Image::open(p, &OpenOptions::default()).unwrap();
    let e = attempt(&img).expect_err("the write should be refused");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(
        e.to_string().contains(expect),
        "expected '{expect}' in: {e}"
    );
    // Later writes are refused too; reads go on.
    assert!(img.write_at(&[1u8; 512], 32 << 20).is_err());
    let mut buf = vec![0u8; 4096];
    let _ = img.read_at(&mut buf, 0);
    assert!(img.info().corrupt);
    drop(img);
    assert!(corrupt_bit(p), "the corrupt bit is set on disk");
    let again = Image::open(p, &OpenOptions::default())
        .err()
        .expect("a corrupt image opens read-only only");
    assert!(again.to_string().contains("marked corrupt"), "{again}");
    assert!(
        qemu_errors(p) <= before,
        "qemu-img check finds more errors after the refused write"
    );
    assert!(qemu_view(p, s) == view, "what the image reads changed");
}

#[test]
fn l2_table_on_the_l1_table() {
    let s = Scratch::new("ov-l1");
    let p = image(&s, &["write -P 0x11 67043328 64k"]);
    // L1[0] points at the L1 table itself, as an owned L2 table.
    poke(&p, L1, &(COPIED | L1).to_be_bytes());
    refused(&p, &s, "overlaps with active L1 table", &|img| {
        img.write_at(&[0x2a; 512], 0)
    });
}

#[test]
fn guest_data_on_a_refcount_block() {
    let s = Scratch::new("ov-rb");
    let p = image(&s, &["write -P 0x11 0 64k"]);
    // Guest cluster 1 mapped onto the refcount block.
    poke(&p, L2 + 8, &(COPIED | REFBLOCK).to_be_bytes());
    refused(&p, &s, "overlaps with refcount block", &|img| {
        img.write_at(&[0x2a; 512], CLUSTER)
    });
}

#[test]
fn guest_data_on_an_inactive_l2_table() {
    let s = Scratch::new("ov-snap-l2");
    let p = image(&s, &["write -P 1 0 512"]);
    run_ok("qemu-img", &["snapshot", "-c", "foo", p.to_str().unwrap()]);
    qemu_io(&p, &["write -P 2 0 512"]);
    // The active L2 table moved (COW); its first entry now points at the snapshot's
    // L2 table in cluster 4.
    let data = std::fs::read(&p).unwrap();
    let l2 = u64::from_be_bytes(data[L1 as usize..L1 as usize + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, L2);
    poke(&p, l2, &(COPIED | L2).to_be_bytes());
    refused(&p, &s, "overlaps with inactive L2 table", &|img| {
        img.write_at(&[3; 512], 0)
    });
}

#[test]
fn refcount_table_entry_pointing_at_the_l1_table() {
    let s = Scratch::new("ov-rt-l1");
    let p = image(&s, &["write -P 0x11 67043328 64k"]);
    // The refcount block of the first range is the L1 table: its "refcounts" say the
    // refcount table is free, and allocating would update the L1 table.
    poke(&p, REFTABLE, &L1.to_be_bytes());
    refused(&p, &s, "Preventing invalid write on metadata", &|img| {
        img.write_at(&[0x2a; 512], 0)?;
        img.flush()
    });
}

/// The header's refcount zeroed: cowdisk's allocator never hands out cluster 0
/// (QEMU's does, and then refuses the write), so the write simply lands elsewhere.
#[test]
fn header_cluster_with_a_zero_refcount() {
    let s = Scratch::new("ov-hdr");
    let p = image(&s, &["write 0 64k"]);
    poke(&p, REFBLOCK, &0u16.to_be_bytes());
    let before = qemu_errors(&p);
    let header = std::fs::read(&p).unwrap()[..4096].to_vec();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.write_at(&[0x2a; 512], CLUSTER).unwrap();
    img.close().unwrap();
    assert_eq!(&std::fs::read(&p).unwrap()[..4096], &header[..]);
    assert!(qemu_errors(&p) <= before);
}

#[test]
fn empty_refcount_table() {
    let s = Scratch::new("ov-rt-empty");
    let p = image(&s, &[]);
    poke(&p, REFTABLE, &0u64.to_be_bytes());
    // The allocator would create refcount block 0 (which must describe the header).
    refused(&p, &s, "refcount block 0 is missing", &|img| {
        img.write_at(&[0x2a; 512], 0)
    });
}

#[test]
fn empty_refcount_block() {
    let s = Scratch::new("ov-rb-empty");
    let p = image(&s, &[]);
    poke(&p, REFBLOCK, &[0u8; 8]);
    // The allocator finds cluster 1 (the refcount table) "free".
    refused(&p, &s, "overlaps with refcount table", &|img| {
        img.write_at(&[0x2a; 512], 0)
    });
}

#[test]
fn empty_refcount_block_and_a_compressed_write() {
    let s = Scratch::new("ov-rb-c");
    let p = image(&s, &["write 64k 64k"]);
    poke(&p, REFBLOCK, &[0u8; 8]);
    refused(&p, &s, "overlaps with refcount table", &|img| {
        img.write_compressed(&vec![7u8; CLUSTER as usize], 0)
    });
}

#[test]
fn preallocated_zero_cluster_on_the_l1_table() {
    let s = Scratch::new("ov-zero-l1");
    let p = image(&s, &["write 0 64k", "write -z 64k 64k"]);
    // Guest cluster 1: an owned, preallocated zero cluster whose host cluster is L1.
    poke(&p, L2 + 8, &(COPIED | L1 | 1).to_be_bytes());
    refused(&p, &s, "overlaps with active L1 table", &|img| {
        img.write_at(&[0x2a; 4096], CLUSTER)
    });
}

#[test]
fn l1_entry_pointing_at_the_refcount_table() {
    let s = Scratch::new("ov-l1-rt");
    let p = image(&s, &[]);
    poke(&p, L1, &(COPIED | REFTABLE).to_be_bytes());
    refused(&p, &s, "overlaps with refcount table", &|img| {
        img.write_at(&[0x2a; 512], 0)?;
        img.flush()
    });
}

/// A refused write does not keep `check -r all` from repairing the image, after which
/// it is writable again.
#[test]
fn repair_after_refusal() {
    let s = Scratch::new("ov-repair");
    let p = image(&s, &["write -P 0x11 0 64k"]);
    poke(&p, L2 + 8, &(COPIED | REFBLOCK).to_be_bytes());
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    assert!(img.write_at(&[0x2a; 512], CLUSTER).is_err());
    drop(img);
    let opts = OpenOptions {
        check: true,
        ..OpenOptions::default()
    };
    let img = Image::open(&p, &opts).unwrap();
    let r = img.check(cowdisk::image::Repair::All).unwrap();
    assert!(r.corruptions_fixed > 0, "{r:?}");
    let r = img.check(cowdisk::image::Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    img.write_at(&[0x33; 512], 2 * CLUSTER).unwrap();
    img.close().unwrap();
    assert!(!corrupt_bit(&p));
    qemu_check_clean(&p);
}
