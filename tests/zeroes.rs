//! write_zeroes, discard, block status and resize: sparse images stay sparse, zeros are
//! stored in the layer they were written to, and block status agrees with
//! `qemu-img map --output=json`.

mod common;

use common::*;
use cowdisk::image::Extent;
use cowdisk::{CreateOptions, Image, OpenOptions};
use std::path::Path;

const CS: u64 = 65536;

/// Data clusters `qemu-img check` counts as allocated (metadata excluded).
fn allocated_clusters(path: &Path) -> u64 {
    let (code, out, err) = run(
        "qemu-img",
        &["check", "--output=json", path.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.get("allocated-clusters")
        .and_then(|c| c.as_u64())
        .unwrap_or(0)
}

/// How a kernel splits an unaligned 1 MiB O_DIRECT zero write: pieces of a cluster,
/// sector-sized slivers at cluster ends, whole clusters — covering [0, 1 MiB).
fn storm_pieces() -> Vec<(u64, u64)> {
    let mut pieces = vec![(0, 0x10000), (0x1fe00, 0x200), (0x10000, 0xfe00)];
    let mut off = 0x20000;
    while off < 0x100000 {
        match (off / CS) % 3 {
            0 => pieces.push((off, CS)),
            1 => {
                pieces.push((off + CS - 0x200, 0x200));
                pieces.push((off, CS - 0x200));
            }
            _ => {
                pieces.push((off + 0x1000, CS - 0x1000));
                pieces.push((off, 0x1000));
            }
        }
        off += CS;
    }
    let covered: u64 = pieces.iter().map(|p| p.1).sum();
    assert_eq!(covered, 0x100000);
    pieces
}

#[test]
fn unaligned_zero_storm_allocates_no_data_clusters() {
    let s = Scratch::new("storm");
    let p = s.path("empty.qcow2");
    Image::create(&p, 8 << 20, &CreateOptions::default()).unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    for (off, len) in storm_pieces() {
        img.write_zeroes(off + CS, len, false).unwrap();
    }
    img.close().unwrap();
    qemu_check_clean(&p);
    assert_eq!(
        allocated_clusters(&p),
        0,
        "zeros over zeros allocate nothing"
    );
    run_ok(
        "qemu-io",
        &["-r", "-c", "read -P 0 0 8M", p.to_str().unwrap()],
    );

    // The same storm over a backing file full of data: the range reads zeros.
    let base = s.path("base.raw");
    std::fs::write(&base, vec![0xb7u8; 4 << 20]).unwrap();
    let top = s.path("top.qcow2");
    let opts = CreateOptions {
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        ..CreateOptions::default()
    };
    Image::create(&top, 0, &opts).unwrap();
    let img = Image::open(&top, &OpenOptions::default()).unwrap();
    for (off, len) in storm_pieces() {
        img.write_zeroes(off + CS, len, false).unwrap();
    }
    let mut buf = vec![1u8; 0x100000];
    img.read_at(&mut buf, CS).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    img.close().unwrap();
    qemu_check_clean(&top);
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 0 64k 1M",
            "-c",
            "read -P 0xb7 0 64k",
            "-c",
            "read -P 0xb7 1088k 1M",
            top.to_str().unwrap(),
        ],
    );
}

#[test]
fn aligned_zeroes_on_v3_are_zero_clusters_and_may_unmap() {
    let s = Scratch::new("zclusters");
    let p = s.path("z.qcow2");
    Image::create(&p, 4 << 20, &CreateOptions::default()).unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.write_at(&vec![9u8; 8 * CS as usize], 0).unwrap();
    img.write_zeroes(0, 2 * CS, false).unwrap(); // keeps the allocation
    img.write_zeroes(2 * CS, 2 * CS, true).unwrap(); // releases it
    let map = img.block_status(0, 4 * CS, 100).unwrap();
    assert_eq!(map.len(), 2, "{map:?}");
    assert!(
        map[0].zero && !map[0].data && map[0].offset.is_some(),
        "{map:?}"
    );
    assert!(
        map[1].zero && !map[1].data && map[1].offset.is_none(),
        "{map:?}"
    );
    img.close().unwrap();
    qemu_check_clean(&p);
    assert_eq!(
        allocated_clusters(&p),
        6,
        "2 zero-allocated + 4 data clusters"
    );
    // Writing into a zero-allocated cluster reuses it and keeps the rest zero.
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.write_at(&[5u8; 100], 1000).unwrap();
    img.close().unwrap();
    qemu_check_clean(&p);
    assert_eq!(allocated_clusters(&p), 6);
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 0 0 1000",
            "-c",
            "read -P 5 1000 100",
            "-c",
            "read -P 0 1100 261044",
            "-c",
            "read -P 9 256k 256k",
            p.to_str().unwrap(),
        ],
    );
}

/// The semantics QEMU's maintainers insisted on: zeros written over a backing file's
/// data stay zeros when the backing file changes later.
#[test]
fn zeroes_survive_changes_to_the_backing_file() {
    let s = Scratch::new("zsem");
    let base = s.path("base.qcow2");
    Image::create(&base, 2 << 20, &CreateOptions::default()).unwrap();
    let b = Image::open(&base, &OpenOptions::default()).unwrap();
    b.write_at(&vec![0x11u8; 1 << 20], 0).unwrap();
    b.close().unwrap();
    let top = s.path("top.qcow2");
    Image::create(
        &top,
        0,
        &CreateOptions {
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let t = Image::open(&top, &OpenOptions::default()).unwrap();
    // Over data (aligned and unaligned) and over a backing region that is empty today.
    t.write_zeroes(0, 2 * CS, false).unwrap();
    t.write_zeroes(3 * CS + 100, 1000, false).unwrap();
    t.write_zeroes(20 * CS, 2 * CS, false).unwrap();
    t.write_zeroes(24 * CS + 512, 4096, false).unwrap();
    t.close().unwrap();
    // The backing file changes underneath.
    let b = Image::open(&base, &OpenOptions::default()).unwrap();
    b.write_at(&vec![0x22u8; 2 << 20], 0).unwrap();
    b.close().unwrap();
    let t = Image::open(&top, &OpenOptions::default()).unwrap();
    let mut got = vec![0u8; 2 << 20];
    t.read_at(&mut got, 0).unwrap();
    let zero = |from: u64, len: u64| {
        got[from as usize..(from + len) as usize]
            .iter()
            .all(|&x| x == 0)
    };
    assert!(zero(0, 2 * CS));
    assert!(zero(3 * CS + 100, 1000));
    assert!(zero(20 * CS, 2 * CS));
    assert!(zero(24 * CS + 512, 4096));
    assert_eq!(
        got[(3 * CS) as usize],
        0x11,
        "rest of a COWed cluster kept the old backing data"
    );
    assert_eq!(
        got[(2 * CS) as usize],
        0x22,
        "untouched clusters follow the backing file"
    );
    // The unaligned zeroes in cluster 24 found the rest of it reading as zero, so the
    // whole cluster became a zero cluster (as in QEMU): it stays zero too.
    assert!(zero(24 * CS, CS));
    assert_eq!(got[(25 * CS) as usize], 0x22);
    t.close().unwrap();
    qemu_check_clean(&top);
}

#[test]
fn discard_releases_clusters_for_reuse_and_can_punch_holes() {
    let s = Scratch::new("discard");
    let p = s.path("d.qcow2");
    Image::create(&p, 64 << 20, &CreateOptions::default()).unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.write_at(&vec![7u8; 16 << 20], 0).unwrap();
    // Closing trims the space preallocated past the last cluster.
    img.close().unwrap();
    let len_full = std::fs::metadata(&p).unwrap().len();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.discard(100, (8 << 20) - 200).unwrap(); // partial clusters at both ends kept
    img.flush().unwrap();
    img.write_at(&vec![8u8; 4 << 20], 32 << 20).unwrap();
    img.close().unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        len_full,
        "freed clusters were reused"
    );
    qemu_check_clean(&p);
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 7 0 64k",
            "-c",
            "read -P 0 64k 8064k",
            "-c",
            "read -P 7 8128k 64k",
            "-c",
            "read -P 8 32M 4M",
            p.to_str().unwrap(),
        ],
    );

    // discard=unmap gives the space back to the file system.
    let blocks = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks()
    };
    let before = blocks(&p);
    let img = Image::open(
        &p,
        &OpenOptions {
            discard_unmap: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    img.discard(8 << 20, 8 << 20).unwrap();
    img.close().unwrap();
    let after = blocks(&p);
    assert!(
        after + (7 << 20) / 512 <= before,
        "blocks {before} -> {after}"
    );
    qemu_check_clean(&p);
}

#[test]
fn discard_over_a_backing_file() {
    for (compat, expect) in [("1.1", 0u8), ("0.10", 0xc4u8)] {
        let s = Scratch::new("discard-backing");
        let base = s.path("base.raw");
        std::fs::write(&base, vec![0xc4u8; 1 << 20]).unwrap();
        let top = s.path("top.qcow2");
        run_ok(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat}"),
                "-F",
                "raw",
                "-b",
                "base.raw",
                top.to_str().unwrap(),
            ],
        );
        let img = Image::open(&top, &OpenOptions::default()).unwrap();
        img.write_at(&vec![1u8; 4 * CS as usize], 0).unwrap();
        img.discard(0, 4 * CS).unwrap();
        let mut buf = vec![9u8; 4 * CS as usize];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == expect), "compat {compat}");
        img.close().unwrap();
        qemu_check_clean(&top);
        let q = qemu_read_raw(&top, &s);
        assert!(
            q[..4 * CS as usize].iter().all(|&b| b == expect),
            "qemu agrees for compat {compat}"
        );
    }
}

#[test]
fn resize_grows_and_shrinks_with_the_rules() {
    let s = Scratch::new("resize");
    let p = s.path("r.qcow2");
    Image::create(
        &p,
        1 << 20,
        &CreateOptions {
            cluster_size: 4096,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.write_at(&[3u8; 6000], (1 << 20) - 6000).unwrap();
    // Grow far enough that the L1 table must grow (4 KiB clusters: 2 MiB per L2 table).
    img.resize(64 << 20, false).unwrap();
    img.write_at(&[4u8; 4096], 60 << 20).unwrap();
    img.close().unwrap();
    qemu_check_clean(&p);
    let out = run_ok("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
    assert!(out.contains("\"virtual-size\": 67108864"), "{out}");
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 3 1042576 6000",
            "-c",
            "read -P 0 1M 59M",
            "-c",
            "read -P 4 60M 4k",
            p.to_str().unwrap(),
        ],
    );

    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let e = img.resize(2 << 20, false).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("use force"), "{e}");
    img.resize(1 << 20, true).unwrap();
    // Growing again shows zeros, not the data that was cut off.
    img.resize(70 << 20, false).unwrap();
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, 60 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    img.resize(1000 * 1024, false).unwrap_err(); // data past 1000 KiB
    img.close().unwrap();
    qemu_check_clean(&p);
    assert_eq!(
        allocated_clusters(&p),
        2,
        "only the two clusters below 1 MiB remain"
    );
}

#[test]
fn growing_over_a_longer_backing_file_reads_zeros() {
    let s = Scratch::new("grow-backing");
    std::fs::write(s.path("base.raw"), vec![0x5eu8; 4 << 20]).unwrap();
    let top = s.path("top.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "base.raw",
            top.to_str().unwrap(),
            "1M",
        ],
    );
    let img = Image::open(&top, &OpenOptions::default()).unwrap();
    img.resize(3 << 20, false).unwrap();
    img.close().unwrap();
    qemu_check_clean(&top);
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 0x5e 0 1M",
            "-c",
            "read -P 0 1M 2M",
            top.to_str().unwrap(),
        ],
    );
}

fn qemu_map(path: &Path) -> Vec<Extent> {
    let out = run_ok(
        "qemu-img",
        &["map", "--output=json", path.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| Extent {
            start: e["start"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            depth: e["depth"].as_u64().unwrap() as u32,
            present: e["present"].as_bool().unwrap(),
            zero: e["zero"].as_bool().unwrap(),
            data: e["data"].as_bool().unwrap(),
            compressed: e["compressed"].as_bool().unwrap_or(false),
            offset: e.get("offset").and_then(|o| o.as_u64()),
        })
        .collect()
}

fn assert_map_matches(path: &Path) {
    let img = Image::open(
        path,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let ours = img.block_status(0, img.size(), usize::MAX).unwrap();
    let theirs = qemu_map(path);
    assert_eq!(ours, theirs, "{}", path.display());
    // In small batches, continuing from the end of each, the result is the same.
    let mut batched = Vec::new();
    let mut pos = 0;
    while pos < img.size() {
        let part = img.block_status(pos, img.size() - pos, 2).unwrap();
        assert!(!part.is_empty() && part.len() <= 2);
        pos = part.last().map(|e| e.start + e.length).unwrap();
        batched.extend(part);
    }
    let mut merged: Vec<Extent> = Vec::new();
    for e in batched {
        match merged.last_mut() {
            Some(l) if l.mergeable(&e) => l.length += e.length,
            _ => merged.push(e),
        }
    }
    assert_eq!(merged, theirs);
}

#[test]
fn block_status_matches_qemu_img_map() {
    let s = Scratch::new("map");
    // An image we wrote.
    let ours = s.path("ours.qcow2");
    Image::create(&ours, 16 << 20, &CreateOptions::default()).unwrap();
    let img = Image::open(&ours, &OpenOptions::default()).unwrap();
    img.write_at(&vec![1u8; 300_000], 10_000).unwrap();
    img.write_zeroes(1 << 20, 5 * CS, false).unwrap();
    img.write_at(&vec![2u8; 3 * CS as usize], 2 << 20).unwrap();
    img.write_zeroes(2 << 20, CS, true).unwrap();
    img.discard(0, CS).unwrap();
    img.write_zeroes(12 << 20, 100, false).unwrap();
    img.close().unwrap();
    assert_map_matches(&ours);

    // An image qemu-io wrote, with zeros, discards and compressed data.
    let q = s.path("qemu.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", q.to_str().unwrap(), "16M"],
    );
    run_ok(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -z 2M 128k",
            "-c",
            "write -z -u 512k 64k",
            "-c",
            "discard 128k 64k",
            "-c",
            "write -c 4M 64k",
            "-c",
            "write -P 3 15M 1k",
            q.to_str().unwrap(),
        ],
    );
    assert_map_matches(&q);

    // A 3-deep chain: top.qcow2 → mid.qcow2 → base.raw (sparse), different sizes.
    let base = s.path("base.raw");
    run_ok(
        "qemu-img",
        &["create", "-f", "raw", base.to_str().unwrap(), "4M"],
    );
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 1M", base.to_str().unwrap()],
    );
    let mid = s.path("mid.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "base.raw",
            mid.to_str().unwrap(),
            "6M",
        ],
    );
    run_ok(
        "qemu-io",
        &[
            "-c",
            "write -P 2 1M 128k",
            "-c",
            "write -z 2M 64k",
            mid.to_str().unwrap(),
        ],
    );
    let top = s.path("top.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "mid.qcow2",
            top.to_str().unwrap(),
            "8M",
        ],
    );
    let img = Image::open(&top, &OpenOptions::default()).unwrap();
    img.write_at(&[3u8; 65536], 0).unwrap();
    img.write_zeroes(128 << 10, 64 << 10, true).unwrap();
    img.discard(5 << 20, 64 << 10).unwrap();
    img.close().unwrap();
    assert_map_matches(&top);
}

/// Growing an overlay whose old last cluster is partial and unallocated: the bytes
/// from the old end on must read as zeros, not as the backing file's (found by the
/// differential test with COWDISK_SEED=606).
#[test]
fn growing_over_a_backing_file_hides_it_from_the_old_end() {
    let s = Scratch::new("grow-over-backing");
    let base = s.path("base.qcow2");
    Image::create(&base, 4 << 20, &CreateOptions::default()).unwrap();
    let b = Image::open(&base, &OpenOptions::default()).unwrap();
    b.write_at(&vec![0x7eu8; 4 << 20], 0).unwrap();
    b.close().unwrap();
    let top = s.path("top.qcow2");
    let create = CreateOptions {
        backing_file: Some("base.qcow2".into()),
        backing_format: Some("qcow2".into()),
        ..CreateOptions::default()
    };
    Image::create(&top, 4 << 20, &create).unwrap();
    let img = Image::open(&top, &OpenOptions::default()).unwrap();
    let old_end = (1 << 20) + 1536; // inside an unallocated cluster of the overlay
    img.resize(old_end, true).unwrap();
    img.resize(3 << 20, false).unwrap();
    let mut buf = vec![0u8; (3 << 20) - old_end as usize];
    img.read_at(&mut buf, old_end).unwrap();
    assert!(
        buf.iter().all(|&x| x == 0),
        "bytes past the old end show the backing file"
    );
    let mut head = vec![0u8; old_end as usize];
    img.read_at(&mut head, 0).unwrap();
    assert!(
        head.iter().all(|&x| x == 0x7e),
        "the backing file still shows below the old end"
    );
    img.close().unwrap();
    qemu_check_clean(&top);
}
