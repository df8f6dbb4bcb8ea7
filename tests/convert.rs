//! The copy engine against qemu-img: convert (sources made by qemu-img/qemu-io, every
//! target kind), write order, faults, cancelling, progress; compare; measure; commit
//! and rebase compared with what qemu-img commit/rebase make of the same images.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{qemu_check_clean, qemu_io, run, run_ok, Rng, Scratch};
use cowdisk::convert::{
    self, CommitOptions, CompareOptions, Comparison, ConvertOptions, Format, OpenSpec,
    RebaseOptions, Source, Target,
};
use cowdisk::io::{FaultStorage, FileStorage, IoEvent, MemStorage, Storage};
use cowdisk::{CompressionType, CreateOptions, Error, Image, OpenOptions};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img compare` of two images (formats probed) says identical.
fn assert_same(a: &Path, b: &Path) {
    let (code, out, err) = run("qemu-img", &["compare", "-U", s(a), s(b)]);
    assert_eq!(code, 0, "qemu-img compare {a:?} {b:?}: {out}{err}");
}

/// Bytes `qemu-img map` reports as data in the image's own layer (depth 0).
fn own_data_bytes(img: &Path) -> u64 {
    let out = run_ok("qemu-img", &["map", "-U", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true && e["depth"] == 0)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// Guest clusters `qemu-img check` counts as allocated, and compressed.
fn allocated_clusters(img: &Path) -> (u64, u64) {
    let out = run_ok("qemu-img", &["check", "-U", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &v["allocated-clusters"];
    let z = &v["compressed-clusters"];
    (c.as_u64().unwrap_or(0), z.as_u64().unwrap_or(0))
}

/// Fills an image through qemu-io with the kinds of data a convert meets: random-ish
/// patterns, zeros written as data, zero clusters, compressed clusters, holes.
fn populate(img: &Path, cs: u64, size: u64) {
    let mb = 1u64 << 20;
    let mut cmds = vec![
        format!("write -P 0x11 0 {}", 3 * mb / 2),
        format!("write -P 0 {} {}", 2 * mb, mb),
        format!("write -z {} {}", 4 * mb, mb),
        format!("write -P 0x22 {} 4096", 6 * mb + 512),
        format!("write -P 0x33 {} {}", size - 3 * cs, 2 * cs),
    ];
    if cs >= 4096 {
        cmds.push(format!("write -c -P 0x44 {} {}", 8 * mb, 4 * cs));
    }
    qemu_io(img, &cmds);
}

fn cowdisk_convert(src: &Path, dst: &Path, opts: &ConvertOptions) {
    convert::convert(src, dst, opts, None).unwrap_or_else(|e| panic!("convert {src:?}: {e}"));
}

fn qemu_convert(src: &Path, dst: &Path, args: &[&str]) {
    let mut a = vec!["convert", "-U"];
    a.extend_from_slice(args);
    a.push(s(src));
    a.push(s(dst));
    run_ok("qemu-img", &a);
}

#[test]
fn sources_made_by_qemu_convert_to_every_target_like_qemu_img() {
    let sc = Scratch::new("convert-interop");
    let size = 24u64 << 20;
    for (compat, cs) in [
        ("1.1", 65536u64),
        ("0.10", 65536),
        ("1.1", 512),
        ("1.1", 2 << 20),
        ("0.10", 4096),
    ] {
        let src = sc.path(&format!("src-{compat}-{cs}.qcow2"));
        run_ok(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat},cluster_size={cs}"),
                s(&src),
                &size.to_string(),
            ],
        );
        populate(&src, cs, size);
        // qcow2 (same and different cluster size), compressed (zlib, zstd), raw.
        let cases: Vec<(&str, ConvertOptions, Vec<&str>)> = vec![
            ("qcow2", ConvertOptions::default(), vec!["-O", "qcow2"]),
            (
                "qcow2-4k",
                ConvertOptions {
                    create: CreateOptions {
                        cluster_size: 4096,
                        ..CreateOptions::default()
                    },
                    ..ConvertOptions::default()
                },
                vec!["-O", "qcow2", "-o", "cluster_size=4096"],
            ),
            (
                "zlib",
                ConvertOptions {
                    compressed: true,
                    ..ConvertOptions::default()
                },
                vec!["-O", "qcow2", "-c"],
            ),
            (
                "zstd",
                ConvertOptions {
                    compressed: true,
                    create: CreateOptions {
                        compression_type: CompressionType::Zstd,
                        ..CreateOptions::default()
                    },
                    ..ConvertOptions::default()
                },
                vec!["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
            ),
            (
                "raw",
                ConvertOptions {
                    target_format: Format::Raw,
                    ..ConvertOptions::default()
                },
                vec!["-O", "raw"],
            ),
        ];
        for (name, opts, qargs) in cases {
            let ours = sc.path(&format!("ours-{compat}-{cs}-{name}"));
            let theirs = sc.path(&format!("theirs-{compat}-{cs}-{name}"));
            cowdisk_convert(&src, &ours, &opts);
            qemu_convert(&src, &theirs, &qargs);
            assert_same(&src, &ours);
            if name == "raw" {
                let ours_blocks = std::fs::metadata(&ours).unwrap();
                let theirs_blocks = std::fs::metadata(&theirs).unwrap();
                use std::os::unix::fs::MetadataExt;
                assert!(
                    ours_blocks.blocks() <= theirs_blocks.blocks() + 8,
                    "{name} {compat} {cs}: raw target holds {} blocks, qemu-img's {}",
                    ours_blocks.blocks(),
                    theirs_blocks.blocks()
                );
                continue;
            }
            qemu_check_clean(&ours);
            let (a, ac) = allocated_clusters(&ours);
            let (b, bc) = allocated_clusters(&theirs);
            assert!(
                a <= b,
                "{name} {compat} {cs}: {a} clusters allocated, qemu-img {b}"
            );
            assert_eq!(ac, bc, "{name} {compat} {cs}: compressed clusters");
            assert_eq!(own_data_bytes(&ours), own_data_bytes(&theirs), "{name}");
        }
    }
}

#[test]
fn chains_snapshots_and_preallocated_images_convert() {
    let sc = Scratch::new("convert-chain");
    let size = 16u64 << 20;
    // A 3-deep chain over a raw base.
    let base = sc.path("base.raw");
    let mut data = vec![0u8; size as usize];
    Rng::new(7).fill(&mut data[..(4 << 20)]);
    std::fs::write(&base, &data).unwrap();
    let mid = sc.path("mid.qcow2");
    let top = sc.path("top.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "raw",
            s(&mid),
        ],
    );
    qemu_io(&mid, &["write -P 0x55 1M 2M", "write -z 5M 1M"]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&mid),
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    qemu_io(&top, &["write -P 0x66 1536k 1M", "write -z 0 64k"]);
    let full = sc.path("full.qcow2");
    cowdisk_convert(&top, &full, &ConvertOptions::default());
    assert_same(&top, &full);
    qemu_check_clean(&full);
    assert!(Image::open(&full, &OpenOptions::default())
        .unwrap()
        .info()
        .backing_file
        .is_none());

    // -B mid: only the top layer is copied; reads through mid give the same disk.
    let over = sc.path("over.qcow2");
    let theirs = sc.path("over-qemu.qcow2");
    let opts = ConvertOptions {
        create: CreateOptions {
            backing_file: Some(s(&mid).to_string()),
            backing_format: Some("qcow2".into()),
            ..CreateOptions::default()
        },
        ..ConvertOptions::default()
    };
    cowdisk_convert(&top, &over, &opts);
    qemu_convert(
        &top,
        &over_path(&theirs),
        &["-O", "qcow2", "-B", s(&mid), "-F", "qcow2"],
    );
    assert_same(&top, &over);
    qemu_check_clean(&over);
    assert_eq!(own_data_bytes(&over), own_data_bytes(&theirs));
    assert_eq!(own_data_bytes(&over), 1 << 20);
    assert!(allocated_clusters(&over).0 <= allocated_clusters(&theirs).0);

    // An internal snapshot converts as it was taken.
    let snap = sc.path("snap.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&snap), "8M"]);
    qemu_io(&snap, &["write -P 0x77 0 1M"]);
    run_ok("qemu-img", &["snapshot", "-c", "before", s(&snap)]);
    qemu_io(&snap, &["write -P 0x78 512k 1M", "write -z 3M 1M"]);
    run_ok("qemu-img", &["resize", s(&snap), "12M"]);
    let ours = sc.path("snap-ours.qcow2");
    let theirs = sc.path("snap-theirs.qcow2");
    let opts = ConvertOptions {
        source: OpenSpec {
            snapshot: Some("before".into()),
            ..OpenSpec::default()
        },
        ..ConvertOptions::default()
    };
    cowdisk_convert(&snap, &ours, &opts);
    qemu_convert(
        &snap,
        &theirs,
        &["-O", "qcow2", "-l", "snapshot.name=before"],
    );
    assert_same(&ours, &theirs);
    assert_eq!(
        Image::open(&ours, &OpenOptions::default()).unwrap().size(),
        8 << 20
    );
    qemu_check_clean(&ours);
    // An unknown snapshot is an error naming it, and leaves no target.
    let missing = sc.path("missing.qcow2");
    let e = convert::convert(
        &snap,
        &missing,
        &ConvertOptions {
            source: OpenSpec {
                snapshot: Some("nope".into()),
                ..OpenSpec::default()
            },
            ..ConvertOptions::default()
        },
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    assert!(!missing.exists());

    // Metadata-preallocated images: their allocated-but-zero clusters stay holes.
    let pre = sc.path("pre.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            s(&pre),
            "32M",
        ],
    );
    qemu_io(&pre, &["write -P 0x12 3M 100k"]);
    let ours = sc.path("pre-ours.qcow2");
    let theirs = sc.path("pre-theirs.qcow2");
    cowdisk_convert(&pre, &ours, &ConvertOptions::default());
    qemu_convert(&pre, &theirs, &["-O", "qcow2"]);
    assert_same(&pre, &ours);
    assert!(allocated_clusters(&ours).0 <= allocated_clusters(&theirs).0);

    // Raw to qcow2, with -S 0 (every byte allocated) and O_DIRECT on both sides.
    let q = sc.path("from-raw.qcow2");
    cowdisk_convert(
        &base,
        &q,
        &ConvertOptions {
            source: OpenSpec {
                format: Some(Format::Raw),
                ..OpenSpec::default()
            },
            ..ConvertOptions::default()
        },
    );
    assert_same(&base, &q);
    assert_eq!(own_data_bytes(&q), 4 << 20);
    let q0 = sc.path("from-raw-s0.qcow2");
    cowdisk_convert(
        &base,
        &q0,
        &ConvertOptions {
            min_sparse: 0,
            ..ConvertOptions::default()
        },
    );
    assert_same(&base, &q0);
    assert_eq!(own_data_bytes(&q0), size);
    if let Some(dsc) = common::direct_scratch("convert-direct") {
        let src = dsc.path("src.qcow2");
        std::fs::copy(&full, &src).unwrap();
        let dst = dsc.path("dst.qcow2");
        cowdisk_convert(
            &src,
            &dst,
            &ConvertOptions {
                source: OpenSpec {
                    direct: true,
                    ..OpenSpec::default()
                },
                target_direct: true,
                ..ConvertOptions::default()
            },
        );
        assert_same(&src, &dst);
        qemu_check_clean(&dst);
    }
}

fn over_path(p: &Path) -> std::path::PathBuf {
    p.to_path_buf()
}

/// A raw target in memory behind a fault-injecting, logging storage.
fn logged_raw_target(size: u64) -> (Arc<FaultStorage>, Arc<Target>) {
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    mem.set_len(size).unwrap();
    let fault = Arc::new(FaultStorage::new(mem));
    let target = Arc::new(Target::Raw {
        storage: fault.clone() as Arc<dyn Storage>,
        no_flush: false,
    });
    (fault, target)
}

/// A raw source in memory: 64 MiB of data with zero gaps.
fn raw_source(size: u64, seed: u64) -> (Arc<FaultStorage>, Vec<u8>) {
    let mut data = vec![0u8; size as usize];
    let mut rng = Rng::new(seed);
    for chunk in data.chunks_mut(1 << 20).step_by(2) {
        rng.fill(chunk);
    }
    let mem = Arc::new(MemStorage::new());
    mem.write_at(&data, 0).unwrap();
    (Arc::new(FaultStorage::new(mem)), data)
}

fn read_storage(s: &dyn Storage, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    s.read_at(&mut out, 0).unwrap();
    out
}

#[test]
fn writes_reach_the_target_in_guest_order_unless_out_of_order() {
    let size = 48u64 << 20;
    let (src, data) = raw_source(size, 3);
    // A slow source makes workers finish out of order.
    src.set_delays(Duration::from_micros(300), Duration::ZERO);
    let source = Arc::new(Source::raw(src.clone()).unwrap());
    let (fault, target) = logged_raw_target(size);
    let opts = ConvertOptions {
        target_format: Format::Raw,
        existing_target: true,
        target_is_zero: true,
        ..ConvertOptions::default()
    };
    let report = convert::copy_between(source.clone(), target.clone(), &opts, None).unwrap();
    let writes: Vec<u64> = fault
        .take_log()
        .into_iter()
        .filter_map(|e| match e {
            IoEvent::Write { offset, .. } => Some(offset),
            _ => None,
        })
        .collect();
    assert!(writes.len() >= 24, "{} writes", writes.len());
    assert!(
        writes.windows(2).all(|w| w[0] < w[1]),
        "in-order writes arrived as {writes:?}"
    );
    assert_eq!(report.peak_concurrent_writes, 1);
    assert_eq!(read_storage(&*fault, size), data);

    // -W: writes overlap (a slow target keeps several in flight at once).
    let (fault, target) = logged_raw_target(size);
    fault.set_delays(Duration::ZERO, Duration::from_millis(20));
    let opts = ConvertOptions {
        out_of_order: true,
        ..opts
    };
    let report = convert::copy_between(source, target, &opts, None).unwrap();
    assert!(
        report.peak_concurrent_writes > 1,
        "out-of-order writes never overlapped"
    );
    assert_eq!(read_storage(&*fault, size), data);
}

#[test]
fn a_failing_worker_ends_the_convert_with_its_error() {
    let size = 32u64 << 20;
    for out_of_order in [false, true] {
        // A read error in one worker.
        let (src, _) = raw_source(size, 5);
        src.fail_one_read(7);
        let (_, target) = logged_raw_target(size);
        let opts = ConvertOptions {
            target_format: Format::Raw,
            existing_target: true,
            target_is_zero: true,
            out_of_order,
            ..ConvertOptions::default()
        };
        let e = convert::copy_between(Arc::new(Source::raw(src).unwrap()), target, &opts, None)
            .unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        assert!(e.to_string().contains("reading the raw source"), "{e}");
        // A write error (ENOSPC) in one worker.
        let (src, _) = raw_source(size, 5);
        let (fault, target) = logged_raw_target(size);
        fault.set_errno(libc::ENOSPC);
        fault.fail_one_write(3);
        let e = convert::copy_between(Arc::new(Source::raw(src).unwrap()), target, &opts, None)
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    }

    // Through files: a source whose L2 table points past its end fails the convert,
    // and the target it created is gone.
    let sc = Scratch::new("convert-fault");
    let src = sc.path("bad.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&src), "64M"]);
    qemu_io(&src, &["write -P 1 0 8M", "write -P 2 40M 1M"]);
    // The last L2 entry of the first table: make it point far past the end.
    let mut bytes = std::fs::read(&src).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
        as usize;
    let entry = (1u64 << 63) | (1u64 << 40);
    bytes[l2 + 100 * 8..l2 + 101 * 8].copy_from_slice(&entry.to_be_bytes());
    std::fs::write(&src, &bytes).unwrap();
    let dst = sc.path("dst.qcow2");
    let e = convert::convert(&src, &dst, &ConvertOptions::default(), None).unwrap_err();
    assert!(!dst.exists(), "the failed convert left {dst:?} behind: {e}");
}

#[test]
fn progress_is_monotone_and_cancelling_removes_the_target() {
    let sc = Scratch::new("convert-progress");
    let src = sc.path("src.raw");
    let (_, data) = raw_source(40 << 20, 9);
    std::fs::write(&src, &data).unwrap();
    let dst = sc.path("dst.qcow2");
    let mut seen: Vec<(u64, u64)> = Vec::new();
    let mut cb = |d: u64, t: u64| {
        seen.push((d, t));
        true
    };
    let r = convert::convert(&src, &dst, &ConvertOptions::default(), Some(&mut cb)).unwrap();
    assert_eq!(seen.first().map(|p| p.0), Some(0));
    let total = seen[0].1;
    assert_eq!(total, r.total);
    assert!(seen.iter().all(|p| p.1 == total));
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
    assert_eq!(seen.last().unwrap().0, total);
    assert_eq!(r.data_bytes, 20 << 20);
    assert_same(&src, &dst);

    // Cancel once a quarter is done.
    for compressed in [false, true] {
        let dst = sc.path(&format!("cancelled-{compressed}.qcow2"));
        let mut calls = 0;
        let mut after_stop = 0;
        let mut stopped = false;
        let mut cb = |d: u64, t: u64| {
            calls += 1;
            after_stop += usize::from(stopped);
            stopped |= d >= t / 4;
            !stopped
        };
        let opts = ConvertOptions {
            compressed,
            workers: 2,
            ..ConvertOptions::default()
        };
        let e = convert::convert(&src, &dst, &opts, Some(&mut cb)).unwrap_err();
        assert!(matches!(e, Error::Cancelled(_)), "{e}");
        assert_eq!(e.errno(), libc::ECANCELED);
        assert!(!dst.exists());
        assert!(calls >= 1);
        assert_eq!(after_stop, 0, "called again after asking to stop");
    }

    // An existing target keeps what was written, and the error says so.
    let existing = sc.path("existing.qcow2");
    Image::create(&existing, 40 << 20, &CreateOptions::default()).unwrap();
    let mut cb = |d: u64, _t: u64| d == 0;
    let e = convert::convert(
        &src,
        &existing,
        &ConvertOptions {
            existing_target: true,
            ..ConvertOptions::default()
        },
        Some(&mut cb),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::ECANCELED);
    assert!(e.to_string().contains("keeps what was written"), "{e}");
    qemu_check_clean(&existing);
}

#[test]
fn existing_targets_get_zeros_where_the_source_has_them() {
    let sc = Scratch::new("convert-existing");
    let src = sc.path("src.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&src), "16M"]);
    qemu_io(&src, &["write -P 1 1M 1M"]);
    for fmt in ["qcow2", "raw"] {
        let dst = sc.path(&format!("dst.{fmt}"));
        run_ok("qemu-img", &["create", "-f", fmt, s(&dst), "16M"]);
        let q = if fmt == "qcow2" {
            &["-f", "qcow2"][..]
        } else {
            &["-f", "raw"][..]
        };
        let mut args = q.to_vec();
        args.extend_from_slice(&["-c", "write -P 9 0 16M", s(&dst)]);
        run_ok("qemu-io", &args);
        let opts = ConvertOptions {
            existing_target: true,
            target_format: Format::parse(fmt).unwrap(),
            ..ConvertOptions::default()
        };
        cowdisk_convert(&src, &dst, &opts);
        assert_same(&src, &dst);
        if fmt == "qcow2" {
            qemu_check_clean(&dst);
            // Zeros became zero clusters, not data.
            assert_eq!(own_data_bytes(&dst), 1 << 20);
        }
    }
    // A target too small is refused before anything is written.
    let small = sc.path("small.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&small), "1M"]);
    let e = convert::convert(
        &src,
        &small,
        &ConvertOptions {
            existing_target: true,
            ..ConvertOptions::default()
        },
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("smaller"), "{e}");
}

#[test]
fn compare_finds_one_byte_anywhere_like_qemu_img() {
    let sc = Scratch::new("compare");
    let size = 12u64 << 20;
    let a = sc.path("a.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", s(&a), &size.to_string()],
    );
    qemu_io(
        &a,
        &["write -P 3 0 2M", "write -z 4M 1M", "write -P 4 9M 100k"],
    );
    let raw = sc.path("a.raw");
    qemu_convert(&a, &raw, &["-O", "raw"]);
    let same = convert::compare(&a, &raw, &CompareOptions::default()).unwrap();
    assert_eq!(same, Comparison::Identical);
    let mut rng = Rng::new(common::seed(11));
    for _ in 0..12 {
        let b = sc.path("b.qcow2");
        let _ = std::fs::remove_file(&b);
        std::fs::copy(&a, &b).unwrap();
        let at = rng.below(size);
        let mut byte = [0u8; 1];
        let img = Image::open(&b, &OpenOptions::default()).unwrap();
        img.read_at(&mut byte, at).unwrap();
        img.write_at(&[byte[0] ^ 0x5a], at).unwrap();
        img.close().unwrap();
        let got = convert::compare(&a, &b, &CompareOptions::default()).unwrap();
        assert_eq!(
            got,
            Comparison::Differ {
                offset: at / 512 * 512
            },
            "byte {at}"
        );
        let (code, out, _) = run("qemu-img", &["compare", s(&a), s(&b)]);
        assert_eq!(code, 1);
        assert!(
            out.contains(&format!("offset {}!", at / 512 * 512)),
            "{out}"
        );
    }
    // Sizes differ: the extra part reads as zeros (identical unless strict), then not.
    let big = sc.path("big.qcow2");
    qemu_convert(&a, &big, &["-O", "qcow2"]);
    run_ok("qemu-img", &["resize", s(&big), "20M"]);
    assert_eq!(
        convert::compare(&a, &big, &CompareOptions::default()).unwrap(),
        Comparison::Identical
    );
    let strict = CompareOptions {
        strict: true,
        ..CompareOptions::default()
    };
    assert!(matches!(
        convert::compare(&a, &big, &strict).unwrap(),
        Comparison::SizeMismatch { .. }
    ));
    qemu_io(&big, &["write -P 1 19M 1"]);
    assert_eq!(
        convert::compare(&a, &big, &CompareOptions::default()).unwrap(),
        Comparison::Differ { offset: 19 << 20 }
    );
    // Across a backing chain: an overlay reads as its base until it writes.
    let top = sc.path("top.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", s(&a), "-F", "qcow2", s(&top)],
    );
    assert_eq!(
        convert::compare(&top, &raw, &CompareOptions::default()).unwrap(),
        Comparison::Identical
    );
    qemu_io(&top, &["write -P 3 3M 512"]);
    assert_eq!(
        convert::compare(&top, &raw, &CompareOptions::default()).unwrap(),
        Comparison::Differ { offset: 3 << 20 }
    );
}

#[test]
fn measure_agrees_with_qemu_img_measure() {
    let sc = Scratch::new("measure");
    let src = sc.path("src.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&src), "100M"]);
    qemu_io(
        &src,
        &[
            "write -P 1 0 1M",
            "write -P 2 5000k 100k",
            "write -z 10M 1M",
            "write -c -P 3 20M 192k",
        ],
    );
    let source = Source::open(&src, &OpenSpec::default()).unwrap();
    for (opts, create) in [
        ("cluster_size=65536", CreateOptions::default()),
        (
            "cluster_size=4096,refcount_bits=64",
            CreateOptions {
                cluster_size: 4096,
                refcount_bits: 64,
                ..CreateOptions::default()
            },
        ),
        (
            "cluster_size=2097152,refcount_bits=1",
            CreateOptions {
                cluster_size: 2 << 20,
                refcount_bits: 1,
                ..CreateOptions::default()
            },
        ),
    ] {
        let out = run_ok(
            "qemu-img",
            &[
                "measure",
                "-O",
                "qcow2",
                "-o",
                opts,
                "--output=json",
                s(&src),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let m = convert::measure(Some(&source), None, Format::Qcow2, &create).unwrap();
        assert_eq!(m.required, v["required"].as_u64().unwrap(), "{opts}");
        assert_eq!(
            m.fully_allocated,
            v["fully-allocated"].as_u64().unwrap(),
            "{opts}"
        );
        let out = run_ok(
            "qemu-img",
            &[
                "measure",
                "-O",
                "qcow2",
                "-o",
                opts,
                "--size",
                "3G",
                "--output=json",
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let m = convert::measure(None, Some(3 << 30), Format::Qcow2, &create).unwrap();
        assert_eq!(m.required, v["required"].as_u64().unwrap(), "{opts} --size");
        assert_eq!(m.fully_allocated, v["fully-allocated"].as_u64().unwrap());
    }
    let m = convert::measure(Some(&source), None, Format::Raw, &CreateOptions::default()).unwrap();
    assert_eq!((m.required, m.fully_allocated), (100 << 20, 100 << 20));
}

/// base.qcow2 ← mid.qcow2 ← top.qcow2 with data in every layer, in folder `dir`.
fn make_chain(
    sc: &Scratch,
    dir: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let d = sc.path(dir);
    std::fs::create_dir_all(&d).unwrap();
    let (base, mid, top) = (
        d.join("base.qcow2"),
        d.join("mid.qcow2"),
        d.join("top.qcow2"),
    );
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&base), "8M"]);
    qemu_io(&base, &["write -P 1 0 8M"]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&mid),
            "12M",
        ],
    );
    qemu_io(
        &mid,
        &["write -P 2 1M 2M", "write -z 6M 1M", "write -P 5 9M 1M"],
    );
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    qemu_io(
        &top,
        &["write -P 3 2M 2M", "write -z 0 64k", "write -P 4 10M 64k"],
    );
    (base, mid, top)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn commit_gives_what_qemu_img_commit_gives() {
    let sc = Scratch::new("commit");
    for (label, base_arg, keep) in [
        ("default", false, false),
        ("keep", false, true),
        ("deep", true, false),
    ] {
        let (_, _, top) = make_chain(&sc, &format!("{label}-ours"));
        let ours_dir = top.parent().unwrap().to_path_buf();
        let theirs_dir = sc.path(&format!("{label}-theirs"));
        copy_dir(&ours_dir, &theirs_dir);
        let before = sc.path(&format!("{label}-before.raw"));
        qemu_convert(&top, &before, &["-O", "raw"]);

        let base = if base_arg {
            ours_dir.join("base.qcow2")
        } else {
            ours_dir.join("mid.qcow2")
        };
        let opts = CommitOptions {
            base: base_arg.then(|| base.clone()),
            keep_top: keep,
            workers: 0,
            secret: None,
        };
        convert::commit(&top, &opts, None).unwrap();
        let mut args = vec!["commit"];
        if base_arg {
            args.extend_from_slice(&["-b", "base.qcow2"]);
        }
        if keep {
            args.push("-d");
        }
        let ttop = theirs_dir.join("top.qcow2");
        args.push(s(&ttop));
        let (code, out, err) = {
            let o = std::process::Command::new("qemu-img")
                .args(&args)
                .current_dir(&theirs_dir)
                .output()
                .unwrap();
            (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stdout).to_string(),
                String::from_utf8_lossy(&o.stderr).to_string(),
            )
        };
        assert_eq!(code, 0, "qemu-img commit: {out}{err}");
        for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
            assert_same(&ours_dir.join(f), &theirs_dir.join(f));
            qemu_check_clean(&ours_dir.join(f));
            assert_eq!(
                own_data_bytes(&ours_dir.join(f)),
                own_data_bytes(&theirs_dir.join(f)),
                "{label}: {f}"
            );
        }
        // The chain still reads what it read before.
        assert_same(&top, &before);
        let tbase = if base_arg { "base.qcow2" } else { "mid.qcow2" };
        assert_same(&ours_dir.join(tbase), &theirs_dir.join(tbase));
    }
    // Nothing to commit into.
    let lone = sc.path("lone.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&lone), "1M"]);
    let e = convert::commit(&lone, &CommitOptions::default(), None).unwrap_err();
    assert!(e.to_string().contains("no backing file"), "{e}");
}

#[test]
fn rebase_gives_what_qemu_img_rebase_gives() {
    let sc = Scratch::new("rebase");
    for (label, target, unsafe_mode) in [
        ("onto-base", "base.qcow2", false),
        ("remove", "", false),
        ("unsafe", "base.qcow2", true),
    ] {
        let (_, _, top) = make_chain(&sc, &format!("{label}-ours"));
        let ours_dir = top.parent().unwrap().to_path_buf();
        let theirs_dir = sc.path(&format!("{label}-theirs"));
        copy_dir(&ours_dir, &theirs_dir);
        let before = sc.path(&format!("{label}-before.raw"));
        qemu_convert(&top, &before, &["-O", "raw"]);
        let opts = RebaseOptions {
            backing_file: Some(target.to_string()),
            backing_format: (!target.is_empty()).then(|| "qcow2".to_string()),
            unsafe_mode,
            ..RebaseOptions::default()
        };
        convert::rebase(&top, &opts, None).unwrap();
        let ttop = theirs_dir.join("top.qcow2");
        let mut args = vec!["rebase", "-b", target];
        if !target.is_empty() {
            args.extend_from_slice(&["-F", "qcow2"]);
        }
        if unsafe_mode {
            args.push("-u");
        }
        args.push(s(&ttop));
        let o = std::process::Command::new("qemu-img")
            .args(&args)
            .current_dir(&theirs_dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "qemu-img rebase: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_same(&top, &ttop);
        qemu_check_clean(&top);
        let info = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&run_ok("qemu-img", &["info", "-U", "--output=json", s(p)]))
                .unwrap()
        };
        assert_eq!(
            info(&top)["backing-filename"],
            info(&ttop)["backing-filename"]
        );
        assert_eq!(own_data_bytes(&top), own_data_bytes(&ttop), "{label}");
        if !unsafe_mode {
            assert_same(&top, &before);
        }
    }

    // -u onto a file that does not exist (yet), from an image without a backing
    // file opened without following backing files: qemu-img -u -F accepts it.
    let (_, _, top) = make_chain(&sc, "unsafe-missing");
    let remove = RebaseOptions {
        backing_file: None,
        ..RebaseOptions::default()
    };
    convert::rebase(&top, &remove, None).unwrap();
    let missing = RebaseOptions {
        backing_file: Some("later.qcow2".into()),
        backing_format: Some("qcow2".into()),
        unsafe_mode: true,
        ..RebaseOptions::default()
    };
    convert::rebase(&top, &missing, None).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&run_ok("qemu-img", &["info", "--output=json", s(&top)])).unwrap();
    assert_eq!(info["backing-filename"], "later.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
}

#[test]
fn the_cli_converts_compares_measures_commits_and_rebases() {
    let sc = Scratch::new("convert-cli");
    let bin = env!("CARGO_BIN_EXE_cowdisk");
    let src = sc.path("src.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&src), "8M"]);
    qemu_io(&src, &["write -P 1 0 1M"]);
    let dst = sc.path("dst.qcow2");
    let (code, _, err) = run(
        bin,
        &[
            "convert",
            "--progress=json",
            "-c",
            "-m",
            "4",
            s(&src),
            s(&dst),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert!(!lines.is_empty());
    assert_eq!(
        lines.last().unwrap()["done"],
        lines.last().unwrap()["total"]
    );
    assert_eq!(run(bin, &["compare", s(&src), s(&dst)]).0, 0);
    let raw = sc.path("dst.raw");
    assert_eq!(run(bin, &["convert", "-O", "raw", s(&dst), s(&raw)]).0, 0);
    qemu_io(&dst, &["write -P 2 4k 1"]);
    let (code, out, _) = run(bin, &["compare", s(&src), s(&dst)]);
    assert_eq!((code, out.trim()), (1, "Content mismatch at offset 4096!"));
    assert_eq!(run(bin, &["compare", s(&src), s(&sc.path("none"))]).0, 2);
    let (code, out, _) = run(bin, &["measure", "--output=json", s(&src)]);
    assert_eq!(code, 0);
    let ours: serde_json::Value = serde_json::from_str(&out).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&run_ok(
        "qemu-img",
        &["measure", "-O", "qcow2", "--output=json", s(&src)],
    ))
    .unwrap();
    assert_eq!(ours, theirs);
    // Convert with a bad worker count is refused.
    let (code, _, err) = run(bin, &["convert", "-m", "17", s(&src), s(&sc.path("x"))]);
    assert_eq!(code, 1);
    assert!(err.contains("workers"), "{err}");
    // Commit and rebase from the command line.
    let top = sc.path("top.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "src.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    qemu_io(&top, &["write -P 7 2M 1M"]);
    let (code, out, err) = run(bin, &["commit", s(&top)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Image committed."));
    assert_eq!(own_data_bytes(&top), 0);
    let (code, _, err) = run(
        bin,
        &["rebase", "-u", "-b", "dst.qcow2", "-F", "qcow2", s(&top)],
    );
    assert_eq!(code, 0, "{err}");
    let info = run_ok("qemu-img", &["info", "--output=json", s(&top)]);
    assert!(
        info.contains("\"backing-filename\": \"dst.qcow2\""),
        "{info}"
    );
}

#[test]
fn a_target_on_a_fault_storage_sees_every_chunk_once() {
    // Copy between qcow2 images on memory through the library API.
    let src_mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    Image::create_on(src_mem.clone(), 32 << 20, &CreateOptions::default()).unwrap();
    let img = Image::open_storage(src_mem, &OpenOptions::default()).unwrap();
    let mut model = vec![0u8; 32 << 20];
    common::scribble(&img, &mut model, &mut Rng::new(21), 200, 65536);
    let dst_mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    Image::create_on(dst_mem.clone(), 32 << 20, &CreateOptions::default()).unwrap();
    let fault = Arc::new(FaultStorage::new(dst_mem));
    let dst = Image::open_storage(fault.clone(), &OpenOptions::default()).unwrap();
    let source = Arc::new(Source::Qcow2(img));
    let target = Arc::new(Target::Qcow2(dst));
    let r =
        convert::copy_between(source, target.clone(), &ConvertOptions::default(), None).unwrap();
    assert!(r.data_bytes > 0);
    let Target::Qcow2(dst) = Arc::into_inner(target).unwrap() else {
        unreachable!()
    };
    assert_eq!(common::read_all(&dst), model);
    dst.close().unwrap();
    let _ = FileStorage::open; // the file backend is exercised by the other tests
}
