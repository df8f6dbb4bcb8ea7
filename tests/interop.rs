//! Interoperability with QEMU: images made by `qemu-img` and filled by `qemu-io` read
//! exactly as `qemu-img convert -O raw` reads them, and stay `qemu-img check`-clean and
//! equal to a model after cowdisk writes into them.

mod common;

use common::*;
use cowdisk::{CreateOptions, Image, OpenOptions};
use std::path::Path;

/// Checks cowdisk reads the image as QEMU does, writes into it, and lets QEMU judge.
fn read_then_write(s: &Scratch, path: &Path, cs: u64, seed: u64) {
    let expected = qemu_read_raw(path, s);
    let img = Image::open(path, &OpenOptions::default()).unwrap();
    let mut model = read_all(&img);
    assert!(
        model == expected,
        "{}: cowdisk reads differ from qemu-img convert",
        path.display()
    );
    let mut rng = Rng::new(seed);
    scribble(&img, &mut model, &mut rng, 150, cs);
    assert!(read_all(&img) == model);
    img.close().unwrap();
    qemu_check_clean(path);
    let raw = s.path("model.raw");
    std::fs::write(&raw, &model).unwrap();
    qemu_compare_raw(path, &raw);
    assert!(qemu_read_raw(path, s) == model);
}

fn qemu_made_image(compat: &str, cluster_size: u64, refcount_bits: u32) {
    let s = Scratch::new(&format!("qemu-{compat}-{cluster_size}-{refcount_bits}"));
    let path = s.path("q.qcow2");
    let size = 32 * cluster_size.max(65536);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat},cluster_size={cluster_size},refcount_bits={refcount_bits}"),
            path.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    let cs = cluster_size;
    qemu_io(
        &path,
        &[
            format!("write -P 0x11 0 {}", 3 * cs + 100),
            format!("write -P 0x22 {} {}", 5 * cs + 7, cs),
            format!("write -P 0x33 {} 512", size - 512),
            format!("write -z {} {}", 8 * cs, 2 * cs),
            format!("write -P 0x44 {} {}", size / 2, 4 * cs),
            format!("discard {} {}", size / 2 + cs, cs),
        ],
    );
    qemu_check_clean(&path);
    read_then_write(&s, &path, cs, cluster_size ^ refcount_bits as u64);
}

#[test]
fn qemu_v3_512_rc1() {
    qemu_made_image("1.1", 512, 1);
}

#[test]
fn qemu_v3_4k_rc8() {
    qemu_made_image("1.1", 4096, 8);
}

#[test]
fn qemu_v3_64k_rc64() {
    qemu_made_image("1.1", 65536, 64);
}

#[test]
fn qemu_v3_2m_rc16() {
    qemu_made_image("1.1", 2 * 1024 * 1024, 16);
}

#[test]
fn qemu_v2_64k() {
    qemu_made_image("0.10", 65536, 16);
}

#[test]
fn qemu_v2_512() {
    qemu_made_image("0.10", 512, 16);
}

#[test]
fn qemu_v2_4k() {
    qemu_made_image("0.10", 4096, 16);
}

/// raw base ← qcow2 middle ← qcow2 top, each layer with its own data, and a top whose
/// virtual size is larger than the base's.
#[test]
fn three_deep_chain_mixing_raw_and_qcow2() {
    let s = Scratch::new("chain");
    let base = s.path("base.raw");
    let mut base_data = vec![0u8; 4 << 20];
    Rng::new(7).fill(&mut base_data[..1 << 20]);
    std::fs::write(&base, &base_data).unwrap();
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
            "-o",
            "cluster_size=4096",
            mid.to_str().unwrap(),
            "6M",
        ],
    );
    qemu_io(&mid, &["write -P 0x55 512k 1M", "write -z 100k 8k"]);
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
    qemu_io(&top, &["write -P 0x66 1000k 100k", "write -P 0x77 7M 4k"]);

    let img = Image::open(&top, &OpenOptions::default()).unwrap();
    let info = img.info();
    assert_eq!(info.backing_file.as_deref(), Some("mid.qcow2"));
    assert_eq!(info.backing_chain.len(), 2);
    assert_eq!(info.backing_chain[0].format, "qcow2");
    assert_eq!(info.backing_chain[1].format, "raw");
    assert!(info.backing_chain[1].filename.ends_with("base.raw"));
    drop(img);
    read_then_write(&s, &top, 65536, 3);
    // The layers below were not touched.
    qemu_check_clean(&mid);
    assert_eq!(std::fs::read(&base).unwrap(), base_data);
}

/// Opening with backing files refused: allocated data reads, unallocated fails.
#[test]
fn backing_files_can_be_refused() {
    let s = Scratch::new("refuse");
    let base = s.path("base.raw");
    std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
    let top = s.path("top.qcow2");
    Image::create(
        &top,
        0,
        &CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let img = Image::open(
        &top,
        &OpenOptions {
            follow_backing: false,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(img.size(), 1 << 20);
    let mut buf = [0u8; 16];
    let err = img.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.errno(), libc::ENOTSUP);
    assert!(err.to_string().contains("base.raw"), "{err}");
    img.write_at(&[9u8; 65536], 0).unwrap();
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [9u8; 16]);
    img.close().unwrap();
    qemu_check_clean(&top);
}

/// A chain deeper than the limit is refused with a clear message.
#[test]
fn backing_depth_is_limited() {
    let s = Scratch::new("depth");
    let mut prev = s.path("l0.qcow2");
    Image::create(&prev, 1 << 20, &CreateOptions::default()).unwrap();
    for i in 1..6 {
        let p = s.path(&format!("l{i}.qcow2"));
        Image::create(
            &p,
            0,
            &CreateOptions {
                backing_file: Some(prev.file_name().unwrap().to_str().unwrap().into()),
                backing_format: Some("qcow2".into()),
                ..CreateOptions::default()
            },
        )
        .unwrap();
        prev = p;
    }
    let opts = OpenOptions {
        max_backing_depth: 3,
        ..OpenOptions::default()
    };
    let err = Image::open(&prev, &opts).err().expect("too deep");
    assert!(err.to_string().contains("deeper than 3"), "{err}");
    let opts = OpenOptions {
        max_backing_depth: 5,
        ..OpenOptions::default()
    };
    assert_eq!(
        Image::open(&prev, &opts)
            .unwrap()
            .info()
            .backing_chain
            .len(),
        5
    );
}

/// Writes into clusters shared with an internal snapshot (made by qemu-img) copy on
/// write; the snapshot keeps its data.
#[test]
fn internal_snapshot_made_by_qemu() {
    let s = Scratch::new("snap");
    let path = s.path("s.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", path.to_str().unwrap(), "8M"],
    );
    qemu_io(&path, &["write -P 0xa1 0 3M", "write -P 0xa2 5M 100k"]);
    let at_snapshot = qemu_read_raw(&path, &s);
    run_ok(
        "qemu-img",
        &["snapshot", "-c", "snap1", path.to_str().unwrap()],
    );
    qemu_io(&path, &["write -P 0xa3 1M 64k"]);
    let img = Image::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(img.info().nb_snapshots, 1);
    drop(img);
    read_then_write(&s, &path, 65536, 11);
    run_ok(
        "qemu-img",
        &["snapshot", "-a", "snap1", path.to_str().unwrap()],
    );
    qemu_check_clean(&path);
    assert!(
        qemu_read_raw(&path, &s) == at_snapshot,
        "snapshot data changed"
    );
}

/// Images we create have the layout and metadata qemu-img reports for its own.
#[test]
fn created_images_match_qemu_info() {
    let s = Scratch::new("create-info");
    for (version, cs, rb, lazy) in [
        (3u32, 65536u32, 16u32, false),
        (2, 4096, 16, false),
        (3, 512, 1, true),
        (3, 2097152, 64, false),
    ] {
        let p = s.path(&format!("c-{version}-{cs}-{rb}.qcow2"));
        Image::create(
            &p,
            1 << 30,
            &CreateOptions {
                version,
                cluster_size: cs,
                refcount_bits: rb,
                lazy_refcounts: lazy,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        qemu_check_clean(&p);
        let out = run_ok("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["virtual-size"], 1u64 << 30);
        assert_eq!(v["cluster-size"], cs);
        let data = &v["format-specific"]["data"];
        assert_eq!(data["compat"], if version == 2 { "0.10" } else { "1.1" });
        assert_eq!(data["refcount-bits"], rb);
        if version == 3 {
            assert_eq!(data["lazy-refcounts"], lazy);
        }
    }
    // The default layout is byte-for-byte the size qemu-img makes: 1 GiB → 0x30010.
    let p = s.path("default.qcow2");
    Image::create(&p, 1 << 30, &CreateOptions::default()).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 0x30010);
}
