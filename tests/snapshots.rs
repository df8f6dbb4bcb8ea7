//! Internal snapshots and VM state, judged by QEMU: snapshots cowdisk makes are listed
//! and applied by `qemu-img snapshot`, snapshots qemu-img makes are listed, applied and
//! deleted by cowdisk, `qemu-img check` stays clean after any mix; VM state streams
//! round-trip through save → finalize → snapshot → goto → load, and a write error in a
//! VM state worker surfaces without recording anything.

mod common;

use common::*;
use cowdisk::io::{FaultStorage, FileStorage, Storage};
use cowdisk::{CreateOptions, Image, OpenOptions, SnapshotOptions};
use std::path::Path;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn create(path: &Path, size: u64, cluster_size: u32, version: u32, refcount_bits: u32) {
    let opts = CreateOptions {
        cluster_size,
        version,
        refcount_bits,
        ..CreateOptions::default()
    };
    Image::create(path, size, &opts).unwrap();
}

fn open(path: &Path) -> Image {
    Image::open(path, &OpenOptions::default()).unwrap()
}

/// The snapshots `qemu-img info` reports: (id, name, vm-state-size).
fn qemu_snapshots(path: &Path) -> Vec<(String, String, u64)> {
    let out = run_ok(
        "qemu-img",
        &["info", "--output=json", "-U", path.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.get("snapshots")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap().to_string(),
                        s["name"].as_str().unwrap().to_string(),
                        s["vm-state-size"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reads snapshot `id` of the image as QEMU sees it.
fn qemu_read_snapshot(path: &Path, id: &str, s: &Scratch) -> Vec<u8> {
    let out = s.path("qemu-snapshot.raw");
    let _ = std::fs::remove_file(&out);
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "-l",
            &format!("snapshot.id={id}"),
            path.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// Snapshots cowdisk makes (with and without VM state) are listed by qemu-img with
/// the right VM size, read and applied by QEMU; QEMU keeps our VM state where we
/// find it again.
#[test]
fn our_snapshots_serve_qemu() {
    for (cs, version) in [(65536u32, 3u32), (4096, 2), (512, 3), (2 << 20, 3)] {
        let s = Scratch::new(&format!("ours-{cs}-{version}"));
        let path = s.path("a.qcow2");
        let size = 24 * MIB;
        create(&path, size, cs, version, 16);
        let img = open(&path);
        let mut rng = Rng::new(cs as u64 ^ 0x5eed);
        let mut model = vec![0u8; size as usize];
        scribble(&img, &mut model, &mut rng, 60, cs as u64);
        let state = pattern(3 * MIB as usize + 12345, cs as u64);
        for (i, piece) in state.chunks(4096 + 8).enumerate() {
            img.save_vmstate(piece, (i * (4096 + 8)) as u64).unwrap();
        }
        img.finalize_vmstate().unwrap();
        let first = img
            .snapshot_create(
                "with-state",
                &SnapshotOptions {
                    vm_state_size: state.len() as u64,
                    vm_clock_nsec: 123_456_789_000,
                    icount: -1,
                },
            )
            .unwrap();
        assert_eq!(first.id, "1");
        let model1 = model.clone();
        scribble(&img, &mut model, &mut rng, 60, cs as u64);
        let second = img
            .snapshot_create("disk-only", &SnapshotOptions::default())
            .unwrap();
        assert_eq!(second.id, "2");
        let model2 = model.clone();
        scribble(&img, &mut model, &mut rng, 60, cs as u64);
        // The active image no longer holds the VM state.
        let mut probe = vec![1u8; 4096];
        img.load_vmstate(&mut probe, 0).unwrap();
        assert!(probe.iter().all(|&b| b == 0), "active VM state dropped");
        assert!(read_all(&img) == model);
        img.close().unwrap();

        qemu_check_clean(&path);
        assert_eq!(
            qemu_snapshots(&path),
            vec![
                ("1".into(), "with-state".into(), state.len() as u64),
                ("2".into(), "disk-only".into(), 0)
            ]
        );
        let listing = run_ok("qemu-img", &["snapshot", "-l", path.to_str().unwrap()]);
        assert!(listing.contains("with-state") && listing.contains("disk-only"));
        assert!(qemu_read_snapshot(&path, "1", &s) == model1);
        assert!(qemu_read_snapshot(&path, "2", &s) == model2);
        assert!(qemu_read_raw(&path, &s) == model);

        // QEMU applies snapshot 1; its data comes back and our VM state is still there.
        run_ok(
            "qemu-img",
            &["snapshot", "-a", "with-state", path.to_str().unwrap()],
        );
        qemu_check_clean(&path);
        let raw = s.path("model1.raw");
        std::fs::write(&raw, &model1).unwrap();
        qemu_compare_raw(&path, &raw);
        let img = open(&path);
        assert!(read_all(&img) == model1);
        let mut back = vec![0u8; state.len()];
        img.load_vmstate(&mut back, 0).unwrap();
        assert!(back == state, "VM state after qemu-img snapshot -a");
        img.close().unwrap();
        // QEMU deletes ours.
        run_ok(
            "qemu-img",
            &["snapshot", "-d", "disk-only", path.to_str().unwrap()],
        );
        qemu_check_clean(&path);
    }
}

/// Snapshots qemu-img makes are listed, applied and deleted by cowdisk.
#[test]
fn qemu_snapshots_serve_us() {
    for (cs, version, rb) in [
        (65536u32, 3u32, 16u32),
        (4096, 2, 16),
        (512, 3, 64),
        (65536, 3, 4),
    ] {
        let s = Scratch::new(&format!("theirs-{cs}-{version}-{rb}"));
        let path = s.path("q.qcow2");
        let p = path.to_str().unwrap();
        run_ok(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                &format!(
                    "cluster_size={cs},compat={},refcount_bits={rb}",
                    if version == 2 { "0.10" } else { "1.1" }
                ),
                p,
                "8M",
            ],
        );
        qemu_io(&path, &["write -P 0x11 0 1M", "write -P 0x12 3M 100k"]);
        run_ok("qemu-img", &["snapshot", "-c", "alpha", p]);
        let alpha = qemu_read_raw(&path, &s);
        qemu_io(&path, &["write -P 0x21 512k 1M", "write -z 3M 64k"]);
        run_ok("qemu-img", &["snapshot", "-c", "beta", p]);
        let beta = qemu_read_raw(&path, &s);
        qemu_io(&path, &["write -P 0x31 0 2M", "discard 6M 1M"]);
        let current = qemu_read_raw(&path, &s);

        let img = open(&path);
        let list = img.snapshots().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].id.as_str(), list[0].name.as_str()), ("1", "alpha"));
        assert_eq!((list[1].id.as_str(), list[1].name.as_str()), ("2", "beta"));
        assert_eq!(list[0].disk_size, 8 * MIB);
        assert!(read_all(&img) == current);
        img.snapshot_goto("alpha").unwrap();
        assert!(read_all(&img) == alpha);
        img.flush().unwrap();
        qemu_check_clean(&path);
        // Writes after goto must not reach the snapshots.
        let mut model = alpha.clone();
        let mut rng = Rng::new(7);
        scribble(&img, &mut model, &mut rng, 40, cs as u64);
        img.snapshot_goto("2").unwrap();
        assert!(read_all(&img) == beta);
        img.snapshot_delete("alpha").unwrap();
        assert_eq!(img.snapshots().unwrap().len(), 1);
        img.close().unwrap();
        qemu_check_clean(&path);
        assert!(qemu_read_raw(&path, &s) == beta);
        assert_eq!(qemu_snapshots(&path).len(), 1);

        let img = open(&path);
        let e = img.snapshot_goto("alpha").unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT, "{e}");
        img.snapshot_delete("2").unwrap();
        assert!(img.snapshots().unwrap().is_empty());
        assert!(read_all(&img) == beta);
        img.close().unwrap();
        qemu_check_clean(&path);
        assert!(qemu_snapshots(&path).is_empty());
    }
}

/// Any mix of our operations and QEMU's keeps `qemu-img check` clean and every
/// snapshot's data intact.
#[test]
fn mixed_with_qemu() {
    let s = Scratch::new("mixed");
    let path = s.path("m.qcow2");
    let p = path.to_str().unwrap();
    let size = 16 * MIB;
    create(&path, size, 65536, 3, 16);
    let mut rng = Rng::new(seed(0x5A5A));
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut model = vec![0u8; size as usize];
    for round in 0..12 {
        let img = open(&path);
        scribble(&img, &mut model, &mut rng, 30, 65536);
        if round % 3 == 2 && !snaps.is_empty() {
            let (name, data) = snaps.remove(rng.below(snaps.len() as u64) as usize);
            img.snapshot_goto(&name).unwrap();
            model = data.clone();
            assert!(read_all(&img) == model);
            snaps.push((name, data));
        }
        let name = format!("ours{round}");
        img.snapshot_create(&name, &SnapshotOptions::default())
            .unwrap();
        snaps.push((name, model.clone()));
        img.close().unwrap();
        qemu_check_clean(&path);

        // QEMU's turn: write, snapshot, sometimes delete one.
        let off = rng.below(size / 65536 - 16) * 65536;
        qemu_io(&path, &[&format!("write -P {} {off} 300k", round + 1)]);
        model[off as usize..off as usize + 300 * 1024].fill(round as u8 + 1);
        let name = format!("theirs{round}");
        run_ok("qemu-img", &["snapshot", "-c", &name, p]);
        snaps.push((name, model.clone()));
        if round % 2 == 1 {
            let (name, _) = snaps.remove(rng.below(snaps.len() as u64) as usize);
            run_ok("qemu-img", &["snapshot", "-d", &name, p]);
        }
        qemu_check_clean(&path);
        if round % 4 == 3 {
            let img = open(&path);
            let (name, _) = snaps.remove(0);
            img.snapshot_delete(&name).unwrap();
            img.close().unwrap();
            qemu_check_clean(&path);
        }
    }
    assert!(qemu_read_raw(&path, &s) == model);
    let listed = qemu_snapshots(&path);
    assert_eq!(listed.len(), snaps.len());
    for (id, name, _) in listed {
        let (_, data) = snaps.iter().find(|(n, _)| *n == name).unwrap();
        assert!(
            qemu_read_snapshot(&path, &id, &s) == *data,
            "snapshot {name}"
        );
    }
}

/// goto restores the snapshot's virtual size, and QEMU agrees.
#[test]
fn goto_restores_disk_size() {
    let s = Scratch::new("resize");
    let path = s.path("r.qcow2");
    create(&path, 20 * MIB, 65536, 3, 16);
    let img = open(&path);
    let a = pattern(MIB as usize, 1);
    img.write_at(&a, 5 * MIB).unwrap();
    let small = read_all(&img);
    img.snapshot_create("small", &SnapshotOptions::default())
        .unwrap();
    img.resize(700 * MIB, false).unwrap();
    img.write_at(&pattern(MIB as usize, 2), 600 * MIB).unwrap();
    img.snapshot_create("big", &SnapshotOptions::default())
        .unwrap();
    let big = read_all(&img);
    img.snapshot_goto("small").unwrap();
    assert_eq!(img.size(), 20 * MIB);
    assert!(read_all(&img) == small);
    img.close().unwrap();
    qemu_check_clean(&path);
    assert!(qemu_read_raw(&path, &s) == small);
    run_ok(
        "qemu-img",
        &["snapshot", "-a", "big", path.to_str().unwrap()],
    );
    qemu_check_clean(&path);
    let img = open(&path);
    assert_eq!(img.size(), 700 * MIB);
    assert!(read_all(&img) == big);
    img.snapshot_goto("small").unwrap();
    img.snapshot_goto("big").unwrap();
    assert!(read_all(&img) == big);
    img.close().unwrap();
    qemu_check_clean(&path);
}

/// Narrow refcounts limit how many snapshots can share a cluster: the snapshot that
/// would overflow fails cleanly and changes nothing.
#[test]
fn refcount_width_limits_snapshots() {
    let s = Scratch::new("narrow");
    let path = s.path("n.qcow2");
    create(&path, 4 * MIB, 65536, 3, 2);
    let img = open(&path);
    img.write_at(&pattern(300_000, 3), 100_000).unwrap();
    img.snapshot_create("a", &SnapshotOptions::default())
        .unwrap();
    img.snapshot_create("b", &SnapshotOptions::default())
        .unwrap();
    let e = img
        .snapshot_create("c", &SnapshotOptions::default())
        .unwrap_err();
    assert_eq!(e.errno(), libc::ENOTSUP, "{e}");
    assert_eq!(img.snapshots().unwrap().len(), 2);
    img.write_at(&[9u8; 5000], 0).unwrap();
    img.snapshot_delete("a").unwrap();
    img.snapshot_create("c", &SnapshotOptions::default())
        .unwrap();
    img.close().unwrap();
    qemu_check_clean(&path);

    let path1 = s.path("one.qcow2");
    create(&path1, 4 * MIB, 65536, 3, 1);
    let img = open(&path1);
    img.write_at(&[1u8; 1000], 0).unwrap();
    let e = img
        .snapshot_create("x", &SnapshotOptions::default())
        .unwrap_err();
    assert_eq!(e.errno(), libc::ENOTSUP, "{e}");
    img.write_at(&[2u8; 1000], 70000).unwrap();
    img.close().unwrap();
    qemu_check_clean(&path1);
}

/// A realistic VM state stream of 192 MiB (mostly tiny pieces, many 4096+8, some
/// large) is saved, recorded in a snapshot, overwritten, and loaded back after goto.
#[test]
fn vmstate_round_trip() {
    let s = Scratch::new("vmstate");
    let path = s.path("v.qcow2");
    let size = 64 * MIB;
    create(&path, size, 65536, 3, 16);
    let img = open(&path);
    img.write_at(&pattern(2 * MIB as usize, 11), 0).unwrap();
    let disk = read_all(&img);

    let total = 192 * MIB as usize;
    let mut state = vec![0u8; total];
    let mut rng = Rng::new(seed(0x57A7E));
    rng.fill(&mut state);
    let start = std::time::Instant::now();
    let mut pieces = Vec::new();
    let mut pos = 0usize;
    while pos < total {
        let len = match rng.below(1000) {
            0..=599 => 1 + rng.below(100) as usize,
            600..=979 => 4096 + 8,
            980..=998 => 1 + rng.below(256 * 1024) as usize,
            _ => 1 + rng.below(4 * MIB) as usize,
        }
        .min(total - pos);
        pieces.push((pos, len));
        pos += len;
    }
    for &(pos, len) in &pieces {
        img.save_vmstate(&state[pos..pos + len], pos as u64)
            .unwrap();
    }
    img.finalize_vmstate().unwrap();
    let saved = start.elapsed();
    img.snapshot_create(
        "vm",
        &SnapshotOptions {
            vm_state_size: total as u64,
            vm_clock_nsec: 5_000_000_000,
            icount: -1,
        },
    )
    .unwrap();
    eprintln!(
        "saved {} MiB in {} pieces in {saved:?}",
        total >> 20,
        pieces.len()
    );

    // Other data and other VM state afterwards.
    img.write_at(&pattern(3 * MIB as usize, 12), MIB).unwrap();
    img.save_vmstate(&pattern(5 * MIB as usize, 13), 0).unwrap();
    img.finalize_vmstate().unwrap();

    img.snapshot_goto("vm").unwrap();
    assert!(read_all(&img) == disk);
    let info = &img.snapshots().unwrap()[0];
    assert_eq!(info.vm_state_size, total as u64);
    assert_eq!(info.vm_clock_nsec, 5_000_000_000);
    let mut back = vec![0u8; total];
    let start = std::time::Instant::now();
    // Loaded the way it was saved: in the same pieces.
    for &(pos, len) in &pieces {
        img.load_vmstate(&mut back[pos..pos + len], pos as u64)
            .unwrap();
    }
    eprintln!("loaded in {:?}", start.elapsed());
    assert!(back == state, "VM state differs after goto");
    img.close().unwrap();
    qemu_check_clean(&path);
    assert_eq!(qemu_snapshots(&path)[0].2, total as u64);
}

/// Saves at other positions go straight through and win over what was buffered
/// before them; unsaved bytes read as zeros; reads and writes past the disk are
/// possible only as VM state.
#[test]
fn vmstate_non_sequential_saves() {
    let s = Scratch::new("vmstate-seek");
    let path = s.path("v.qcow2");
    create(&path, 10 * MIB, 4096, 3, 16);
    let img = open(&path);
    let mut model = vec![0u8; 6 * MIB as usize];
    let mut rng = Rng::new(21);
    let mut pos = 0u64;
    for i in 0..4000 {
        let len = 1 + rng.below(3000);
        let at = if i % 97 == 0 {
            rng.below(model.len() as u64 - len) // a jump
        } else if pos + len > model.len() as u64 {
            0
        } else {
            pos
        };
        let data = pattern(len as usize, i);
        if i % 50 == 7 {
            img.save_vmstate_unbuffered(&data, at).unwrap();
        } else {
            img.save_vmstate(&data, at).unwrap();
        }
        model[at as usize..(at + len) as usize].copy_from_slice(&data);
        pos = at + len;
    }
    // Reading before finalize sees everything saved so far.
    let mut back = vec![0u8; model.len()];
    img.load_vmstate(&mut back, 0).unwrap();
    assert!(back == model);
    img.finalize_vmstate().unwrap();
    img.snapshot_create(
        "s",
        &SnapshotOptions {
            vm_state_size: model.len() as u64,
            ..SnapshotOptions::default()
        },
    )
    .unwrap();
    img.snapshot_goto("1").unwrap();
    let mut back = vec![0u8; model.len() + 4096];
    img.load_vmstate(&mut back, 0).unwrap();
    assert!(back[..model.len()] == model[..]);
    assert!(back[model.len()..].iter().all(|&b| b == 0));
    // The guest cannot reach the VM state.
    assert!(img.write_at(&[1], 10 * MIB).is_err());
    img.close().unwrap();
    qemu_check_clean(&path);
}

/// An injected write error inside a worker surfaces from finalize and from every
/// later save; no snapshot is recorded and the image stays clean.
#[test]
fn vmstate_write_error_in_worker() {
    for fail_after in [0u64, 1, 3, 6] {
        let s = Scratch::new(&format!("vmstate-fault-{fail_after}"));
        let path = s.path("f.qcow2");
        create(&path, 32 * MIB, 65536, 3, 16);
        let file: Arc<dyn Storage> = Arc::new(FileStorage::open(&path, true, false).unwrap());
        let fault = Arc::new(FaultStorage::new(file));
        let img = Image::open_storage(fault.clone(), &OpenOptions::default()).unwrap();
        img.write_at(&pattern(MIB as usize, 1), 0).unwrap();
        // A first, successful session, flushed.
        let state = pattern(2 * MIB as usize + 100, 2);
        for (i, piece) in state.chunks(77).enumerate() {
            img.save_vmstate(piece, (i * 77) as u64).unwrap();
        }
        img.finalize_vmstate().unwrap();
        img.flush().unwrap();

        // Writes fail from the `fail_after`-th on, while workers write.
        fault.fail_writes_after(fail_after);
        let more = pattern(12 * MIB as usize, 3);
        let mut first_error = None;
        for (i, piece) in more.chunks(4104).enumerate() {
            let at = state.len() + i * 4104;
            if let Err(e) = img.save_vmstate(piece, at as u64) {
                first_error = Some(e);
                break;
            }
        }
        let fin = img.finalize_vmstate().unwrap_err();
        assert_eq!(fin.errno(), libc::EIO, "{fin}");
        if let Some(e) = first_error {
            assert_eq!(e.to_string(), fin.to_string());
        }
        let later = img.save_vmstate(b"more", 1 << 30).unwrap_err();
        assert_eq!(later.to_string(), fin.to_string(), "later saves fail alike");
        assert!(img.finalize_vmstate().is_err());
        let e = img
            .snapshot_create(
                "never",
                &SnapshotOptions {
                    vm_state_size: (state.len() + more.len()) as u64,
                    ..SnapshotOptions::default()
                },
            )
            .unwrap_err();
        assert_eq!(e.to_string(), fin.to_string());
        assert!(img.snapshots().unwrap().is_empty());
        drop(img);
        fault.heal();
        qemu_check_clean(&path);
        assert!(qemu_snapshots(&path).is_empty());
        let img = open(&path);
        assert!(img.snapshots().unwrap().is_empty());
        let mut buf = vec![0u8; MIB as usize];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf == pattern(MIB as usize, 1));
        img.close().unwrap();
    }
}

/// Closing with unfinalized VM state writes it.
#[test]
fn close_finalizes_vmstate() {
    let s = Scratch::new("vmstate-close");
    let path = s.path("c.qcow2");
    create(&path, 8 * MIB, 65536, 3, 16);
    let state = pattern(3 * MIB as usize + 5, 9);
    let img = open(&path);
    for (i, piece) in state.chunks(50).enumerate() {
        img.save_vmstate(piece, (i * 50) as u64).unwrap();
    }
    img.close().unwrap();
    qemu_check_clean(&path);
    let img = open(&path);
    let mut back = vec![0u8; state.len()];
    img.load_vmstate(&mut back, 0).unwrap();
    assert!(back == state);
    // Dropping works the same.
    img.save_vmstate(&[7u8; 100], state.len() as u64).unwrap();
    drop(img);
    let img = open(&path);
    let mut tail = [0u8; 100];
    img.load_vmstate(&mut tail, state.len() as u64).unwrap();
    assert_eq!(tail, [7u8; 100]);
    img.snapshot_create(
        "s",
        &SnapshotOptions {
            vm_state_size: state.len() as u64 + 100,
            ..SnapshotOptions::default()
        },
    )
    .unwrap();
    img.close().unwrap();
    qemu_check_clean(&path);
    assert_eq!(qemu_snapshots(&path)[0].2, state.len() as u64 + 100);
}

/// Read-only images list snapshots but refuse changes.
#[test]
fn read_only_refuses_changes() {
    let s = Scratch::new("ro");
    let path = s.path("ro.qcow2");
    create(&path, MIB, 65536, 3, 16);
    run_ok("qemu-img", &["snapshot", "-c", "q", path.to_str().unwrap()]);
    let img = Image::open(
        &path,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(img.snapshots().unwrap()[0].name, "q");
    for e in [
        img.snapshot_create("x", &SnapshotOptions::default())
            .unwrap_err(),
        img.snapshot_goto("q").unwrap_err(),
        img.snapshot_delete("q").unwrap_err(),
        img.save_vmstate(b"x", 0).unwrap_err(),
    ] {
        assert_eq!(e.errno(), libc::EROFS, "{e}");
    }
}

/// Compressed clusters (several packed into one host cluster) are shared with
/// snapshots by reference counts on every host cluster they touch, for images we
/// compress and images `qemu-img convert -c` compressed.
#[test]
fn compressed_clusters_in_snapshots() {
    let s = Scratch::new("compressed");
    let text: Vec<u8> = b"qcow2 internal snapshot with compressed clusters "
        .iter()
        .cycle()
        .take(4 * MIB as usize)
        .copied()
        .collect();
    // Ours: compressed writes through cowdisk.
    let path = s.path("ours.qcow2");
    create(&path, 8 * MIB, 65536, 3, 16);
    let img = open(&path);
    img.write_compressed(&text, 0).unwrap();
    img.flush().unwrap();
    let mut model = read_all(&img);
    let a = img
        .snapshot_create("a", &SnapshotOptions::default())
        .unwrap();
    let model_a = model.clone();
    let mut rng = Rng::new(77);
    scribble(&img, &mut model, &mut rng, 30, 65536);
    img.write_zeroes(MIB, 300_000, true).unwrap();
    model[MIB as usize..MIB as usize + 300_000].fill(0);
    let b = img
        .snapshot_create("b", &SnapshotOptions::default())
        .unwrap();
    let model_b = model.clone();
    img.close().unwrap();
    qemu_check_clean(&path);
    assert!(qemu_read_snapshot(&path, &a.id, &s) == model_a);
    assert!(qemu_read_snapshot(&path, &b.id, &s) == model_b);
    let img = open(&path);
    img.snapshot_goto("a").unwrap();
    assert!(read_all(&img) == model_a);
    img.snapshot_delete("b").unwrap();
    img.snapshot_delete("a").unwrap();
    assert!(read_all(&img) == model_a);
    img.close().unwrap();
    qemu_check_clean(&path);

    // QEMU's: convert -c, then snapshots by both sides.
    let raw = s.path("text.raw");
    std::fs::write(&raw, &text).unwrap();
    let qpath = s.path("theirs.qcow2");
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
            qpath.to_str().unwrap(),
        ],
    );
    run_ok(
        "qemu-img",
        &["snapshot", "-c", "q", qpath.to_str().unwrap()],
    );
    let img = open(&qpath);
    let mut model = read_all(&img);
    assert!(model == text);
    img.snapshot_create("ours", &SnapshotOptions::default())
        .unwrap();
    scribble(&img, &mut model, &mut rng, 20, 65536);
    img.snapshot_delete("q").unwrap();
    img.close().unwrap();
    qemu_check_clean(&qpath);
    run_ok(
        "qemu-img",
        &["snapshot", "-a", "ours", qpath.to_str().unwrap()],
    );
    qemu_check_clean(&qpath);
    assert!(qemu_read_raw(&qpath, &s) == text);
}

/// Snapshot operations stopped at every write: what reached the disk is never
/// corrupt — not even the OFLAG_COPIED errors QEMU's own snapshot operations leave
/// when killed (each operation switches to its new metadata in one header write) —
/// and every snapshot listed reads back what it recorded.
#[test]
fn crash_during_snapshot_operations() {
    let s = Scratch::new("snap-crash");
    let template = s.path("template.qcow2");
    create(&template, 8 * MIB, 4096, 3, 16);
    let mut base = vec![0u8; 8 * MIB as usize];
    {
        let img = open(&template);
        scribble(&img, &mut base, &mut Rng::new(3), 40, 4096);
        img.snapshot_create("base", &SnapshotOptions::default())
            .unwrap();
        img.close().unwrap();
    }
    // What each snapshot the workload makes must read as.
    let mut y = base.clone();
    y[3 * MIB as usize..3 * MIB as usize + 50_000].copy_from_slice(&pattern(50_000, 7));
    let models = [("base", &base), ("x", &base), ("y", &y)];
    let workload = |img: &Image| -> cowdisk::Result<()> {
        let state = pattern(300_000, 5);
        for (i, piece) in state.chunks(999).enumerate() {
            img.save_vmstate(piece, (i * 999) as u64)?;
        }
        img.finalize_vmstate()?;
        img.snapshot_create(
            "x",
            &SnapshotOptions {
                vm_state_size: state.len() as u64,
                ..SnapshotOptions::default()
            },
        )?;
        img.write_at(&pattern(200_000, 6), 100_000)?;
        img.snapshot_goto("base")?;
        img.write_at(&pattern(50_000, 7), 3 * MIB)?;
        img.snapshot_delete("x")?;
        img.snapshot_create("y", &SnapshotOptions::default())?;
        img.snapshot_delete("base")?;
        img.flush()
    };
    let open_faulty = |path: &Path| {
        let file: Arc<dyn Storage> = Arc::new(FileStorage::open(path, true, false).unwrap());
        let fault = Arc::new(FaultStorage::new(file));
        let img = Image::open_storage(fault.clone(), &OpenOptions::default()).unwrap();
        (img, fault)
    };
    let clean = s.path("clean.qcow2");
    std::fs::copy(&template, &clean).unwrap();
    let (img, fault) = open_faulty(&clean);
    workload(&img).unwrap();
    // The workload's writes (closing may trim preallocated space afterwards).
    let total = fault.writes_seen();
    img.close().unwrap();
    qemu_check_clean(&clean);

    for n in 0..total {
        let path = s.path("crashed.qcow2");
        std::fs::copy(&template, &path).unwrap();
        let (img, fault) = open_faulty(&path);
        fault.fail_writes_after(n);
        assert!(workload(&img).is_err(), "write {n} of {total} should fail");
        drop(img);
        let what = format!("crash at write {n}/{total}");
        check_crashed(&path, &what);
        for (id, name, _) in qemu_snapshots(&path) {
            let want = models.iter().find(|m| m.0 == name).expect("known name").1;
            let got = qemu_read_snapshot(&path, &id, &s);
            assert!(got == *want, "{what}: snapshot {name} reads other data");
        }
    }
}

/// `qemu-img check` after a crash: leaked clusters are allowed, nothing else.
fn check_crashed(path: &Path, what: &str) {
    let (code, out, err) = run(
        "qemu-img",
        &["check", "--output=json", path.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let corruptions = v.get("corruptions").and_then(|c| c.as_u64()).unwrap_or(0);
    assert!(
        (code == 0 || code == 3) && corruptions == 0 && !err.contains("ERROR"),
        "{what}: qemu-img check exit {code}\n{out}\n{err}"
    );
}

/// `cowdisk snapshot -l|-c|-a|-d` works like `qemu-img snapshot`.
#[test]
fn cli_snapshot_command() {
    let s = Scratch::new("cli");
    let path = s.path("c.qcow2");
    let p = path.to_str().unwrap();
    let cowdisk = env!("CARGO_BIN_EXE_cowdisk");
    create(&path, 4 * MIB, 65536, 3, 16);
    qemu_io(&path, &["write -P 0x41 0 64k"]);
    run_ok(cowdisk, &["snapshot", "-c", "one", p]);
    qemu_io(&path, &["write -P 0x42 0 64k"]);
    run_ok("qemu-img", &["snapshot", "-c", "two", p]);
    let ours = run_ok(cowdisk, &["snapshot", "-l", p]);
    let theirs = run_ok("qemu-img", &["snapshot", "-l", p]);
    let columns = |t: &str| -> Vec<Vec<String>> {
        t.lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    };
    // Same table; qemu-img prints its own icount for the snapshot it made.
    assert_eq!(columns(&ours), columns(&theirs), "{ours}\n{theirs}");
    assert!(ours.starts_with("Snapshot list:\nID      TAG "), "{ours}");
    run_ok(cowdisk, &["snapshot", "-a", "one", p]);
    qemu_check_clean(&path);
    let data = qemu_read_raw(&path, &s);
    assert!(data[..65536].iter().all(|&b| b == 0x41));
    run_ok(cowdisk, &["snapshot", "-d", "2", p]);
    run_ok(cowdisk, &["snapshot", "-d", "one", p]);
    qemu_check_clean(&path);
    assert_eq!(run_ok(cowdisk, &["snapshot", "-l", p]), "");
    let (code, _, err) = run(cowdisk, &["snapshot", "-a", "gone", p]);
    assert_eq!(code, 1);
    assert!(err.contains("no snapshot with id or name 'gone'"), "{err}");
    let (code, _, _) = run(cowdisk, &["snapshot", p]);
    assert_eq!(code, 1, "an action is required");
}

/// With 512-byte clusters and 64-bit refcounts a refcount block describes only 64
/// clusters, so the L1 copy of a 256 MiB image (128 clusters) is longer than a
/// block's range: the allocator must place new refcount blocks outside the run
/// (it used to search forever, and `create` made a 280 MB file).
#[test]
fn tables_longer_than_a_refcount_block() {
    let s = Scratch::new("long-tables");
    let path = s.path("l.qcow2");
    create(&path, 256 * MIB, 512, 3, 64);
    assert!(std::fs::metadata(&path).unwrap().len() < MIB);
    qemu_check_clean(&path);
    let img = open(&path);
    img.write_at(&pattern(100_000, 1), 200 * MIB).unwrap();
    let state = pattern(2 * MIB as usize, 2);
    img.save_vmstate(&state, 0).unwrap();
    img.snapshot_create(
        "a",
        &SnapshotOptions {
            vm_state_size: state.len() as u64,
            ..SnapshotOptions::default()
        },
    )
    .unwrap();
    img.resize(512 * MIB, false).unwrap();
    img.write_at(&pattern(100_000, 3), 400 * MIB).unwrap();
    img.snapshot_goto("a").unwrap();
    assert_eq!(img.size(), 256 * MIB);
    let mut back = vec![0u8; state.len()];
    img.load_vmstate(&mut back, 0).unwrap();
    assert!(back == state);
    img.close().unwrap();
    qemu_check_clean(&path);
}

/// Snapshot tables are untrusted: bad counts, sizes and offsets are refused with a
/// message naming the problem, and random damage never panics.
#[test]
fn malformed_snapshot_tables() {
    let s = Scratch::new("malformed");
    let good = s.path("good.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", good.to_str().unwrap(), "4M"],
    );
    qemu_io(&good, &["write -P 7 0 200k"]);
    run_ok("qemu-img", &["snapshot", "-c", "a", good.to_str().unwrap()]);
    run_ok("qemu-img", &["snapshot", "-c", "b", good.to_str().unwrap()]);
    let pristine = std::fs::read(&good).unwrap();
    let table = u64::from_be_bytes(pristine[64..72].try_into().unwrap()) as usize;
    let path = s.path("bad.qcow2");
    let open_err = |bytes: &[u8]| -> String {
        std::fs::write(&path, bytes).unwrap();
        match Image::open(&path, &OpenOptions::default()) {
            Ok(_) => panic!("opened a malformed image"),
            Err(e) => e.to_string(),
        }
    };
    let patched = |at: usize, value: &[u8]| {
        let mut b = pristine.clone();
        b[at..at + value.len()].copy_from_slice(value);
        b
    };
    let e = open_err(&patched(60, &70000u32.to_be_bytes()));
    assert!(e.contains("70000 snapshots"), "{e}");
    let e = open_err(&patched(table + 36, &5000u32.to_be_bytes()));
    assert!(e.contains("extra data"), "{e}");
    let e = open_err(&patched(table, &0x10200u64.to_be_bytes()));
    assert!(e.contains("not cluster-aligned"), "{e}");
    let e = open_err(&patched(table, &(1u64 << 40).to_be_bytes()));
    assert!(e.contains("outside the file"), "{e}");
    let e = open_err(&patched(table + 8, &u32::MAX.to_be_bytes()));
    assert!(e.contains("entries"), "{e}");
    let e = open_err(&patched(table + 12, &u16::MAX.to_be_bytes()));
    assert!(e.contains("past the end of the file"), "{e}");
    let e = open_err(&patched(64, &(1u64 << 40).to_be_bytes()));
    assert!(e.contains("snapshot table"), "{e}");

    // Random damage to the table and the snapshots' L1 tables.
    let l1 = u64::from_be_bytes(pristine[table..table + 8].try_into().unwrap()) as usize;
    let mut rng = Rng::new(seed(0xBAD));
    for round in 0..200 {
        let mut bytes = pristine.clone();
        for _ in 0..1 + rng.below(4) {
            let at = if rng.below(2) == 0 {
                table + rng.below((pristine.len() - table) as u64) as usize
            } else {
                l1 + rng.below(16) as usize
            };
            bytes[at] ^= 1 << rng.below(8);
        }
        std::fs::write(&path, &bytes).unwrap();
        let result = std::panic::catch_unwind(|| {
            if let Ok(img) = Image::open(&path, &OpenOptions::default()) {
                let _ = img.snapshots();
                let _ = img.snapshot_goto("1");
                let _ = img.snapshot_delete("b");
                let _ = img.snapshot_create("c", &SnapshotOptions::default());
                let _ = img.close();
            }
        });
        assert!(
            result.is_ok(),
            "round {round}: panic on a damaged snapshot table"
        );
    }
}
