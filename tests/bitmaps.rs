//! Persistent dirty bitmaps against QEMU: bitmaps QEMU made stay consistent and exact
//! after cowdisk writes; bitmaps cowdisk made and filled are read by QEMU with the
//! same dirty extents (through `qemu-nbd -B NAME` and `nbdinfo --map`); a bitmap in
//! use at open is kept as it is; malformed directories and tables are refused with a
//! clear message; a crash at every write leaves every bitmap consistent and exact, or
//! marked in use.

mod common;

use common::dirty::{cowdisk_runs, Model};
use common::*;
use cowdisk::io::{FaultStorage, FileStorage, Storage};
use cowdisk::{CreateOptions, Image, OpenOptions};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// `qemu-nbd -r -B NAME` serving the image on a Unix socket, stopped on drop.
struct QemuNbd {
    child: Child,
    socket: std::path::PathBuf,
}

impl QemuNbd {
    fn serve(image: &Path, bitmap: &str, scratch: &Scratch) -> QemuNbd {
        let socket = scratch.path(&format!("nbd-{bitmap}.sock"));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("qemu-nbd")
            .args(["-r", "-t", "-f", "qcow2", "-B", bitmap, "-k"])
            .arg(&socket)
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-nbd");
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(socket.exists(), "qemu-nbd did not start");
        QemuNbd { child, socket }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The dirty runs QEMU sees for a bitmap: `nbdinfo --map=qemu:dirty-bitmap:NAME` of a
/// `qemu-nbd -B NAME` export.
fn qemu_runs(image: &Path, bitmap: &str, scratch: &Scratch) -> Vec<(u64, u64, bool)> {
    let nbd = QemuNbd::serve(image, bitmap, scratch);
    let uri = format!("nbd+unix:///?socket={}", nbd.socket.display());
    let out = run_ok(
        "nbdinfo",
        &[&format!("--map=qemu:dirty-bitmap:{bitmap}"), &uri],
    );
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (start, len, kind): (u64, u64, u64) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        let dirty = kind & 1 != 0;
        match runs.last_mut() {
            Some(l) if l.2 == dirty && l.0 + l.1 == start => l.1 += len,
            _ => runs.push((start, len, dirty)),
        }
    }
    runs
}

/// `format-specific.data.bitmaps` of `qemu-img info`: (name, granularity, flags).
fn qemu_bitmaps(image: &Path) -> Vec<(String, u64, Vec<String>)> {
    let out = run_ok(
        "qemu-img",
        &["info", "-U", "--output=json", image.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|b| {
                    (
                        b["name"].as_str().unwrap().to_string(),
                        b["granularity"].as_u64().unwrap(),
                        b["flags"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|f| f.as_str().unwrap().to_string())
                            .collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn qemu_bitmap_add(image: &Path, name: &str, granularity: u64, enabled: bool) {
    let g = granularity.to_string();
    let mut args = vec!["bitmap", "--add", "-g", &g];
    if !enabled {
        args.push("--disable");
    }
    let p = image.to_str().unwrap();
    args.extend([p, name]);
    run_ok("qemu-img", &args);
}

/// Random guest writes of every kind cowdisk has, recorded into the models of the
/// enabled bitmaps.
fn scribble_all(img: &Image, models: &mut [(&str, Model, bool)], rng: &mut Rng, n: usize) {
    let size = img.size();
    let cs = 65536;
    for _ in 0..n {
        let kind = rng.below(10);
        let (off, len) = match kind {
            0..=5 => {
                let long = rng.below(5) == 0;
                let len = 1 + rng.below(if long { 2 * MIB } else { 8192 });
                let off = rng.below(size - len);
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                img.write_at(&data, off).unwrap();
                (off, len)
            }
            6 | 7 => {
                let len = 1 + rng.below(300_000);
                let off = rng.below(size - len);
                img.write_zeroes(off, len, kind == 7).unwrap();
                (off, len)
            }
            8 => {
                let off = rng.below(size / cs - 4) * cs;
                let len = (1 + rng.below(3)) * cs;
                img.discard(off, len).unwrap();
                (off, len)
            }
            _ => {
                // Compressed clusters go only where nothing is allocated yet.
                let off = rng.below(size / cs) * cs;
                let ext = img.block_status(off, cs, 1).unwrap();
                if ext[0].data || ext[0].offset.is_some() {
                    continue;
                }
                let mut data = vec![7u8; cs as usize];
                rng.fill(&mut data[..1000]);
                img.write_compressed(&data, off).unwrap();
                (off, cs)
            }
        };
        for (_, model, enabled) in models.iter_mut() {
            if *enabled {
                model.mark(off, len);
            }
        }
    }
}

#[test]
fn qemu_bitmaps_stay_consistent_and_exact_after_cowdisk_writes() {
    let s = Scratch::new("bitmaps-from-qemu");
    let path = s.path("disk.qcow2");
    let p = path.to_str().unwrap();
    let size = 64 * MIB;
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p, "64M"]);
    let specs: [(&str, u64, bool); 6] = [
        ("g64k", 65536, true),
        ("g512", 512, true),
        ("g4k", 4096, true),
        ("g1m", MIB, true),
        ("g64m", 64 * MIB, true),
        ("off", 65536, false),
    ];
    for (name, g, enabled) in specs {
        qemu_bitmap_add(&path, name, g, enabled);
    }
    let mut models: Vec<(&str, Model, bool)> = specs
        .iter()
        .map(|&(n, g, e)| (n, Model::new(g, size), e))
        .collect();
    // QEMU dirties the enabled bitmaps first.
    qemu_io(&path, &["write -P 1 100000 5000", "write -z 30M 1M"]);
    for (_, m, e) in models.iter_mut() {
        if *e {
            m.mark(100000, 5000);
            m.mark(30 * MIB, MIB);
        }
    }
    let mut rng = Rng::new(seed(16));
    for round in 0..2 {
        let img = Image::open(&path, &OpenOptions::default()).unwrap();
        // While cowdisk has the image open the bitmaps are marked in use on disk.
        for (name, _, flags) in qemu_bitmaps(&path) {
            assert!(
                flags.contains(&"in-use".to_string()),
                "{name}: {flags:?} while open"
            );
        }
        scribble_all(&img, &mut models, &mut rng, 60);
        for (name, model, _) in &models {
            assert_eq!(
                cowdisk_runs(&img, name),
                model.runs(),
                "round {round}: {name} in memory"
            );
        }
        img.close().unwrap();
        qemu_check_clean(&path);
        let listed = qemu_bitmaps(&path);
        assert_eq!(listed.len(), specs.len());
        for ((name, g, flags), (want, wg, enabled)) in listed.iter().zip(specs) {
            assert_eq!((name.as_str(), *g), (want, wg));
            let expect: Vec<String> = if enabled { vec!["auto".into()] } else { vec![] };
            assert_eq!(flags, &expect, "{name} after close");
        }
        for (name, model, _) in &models {
            assert_eq!(
                qemu_runs(&path, name, &s),
                model.runs(),
                "round {round}: {name} as QEMU reads it"
            );
        }
    }
}

#[test]
fn cowdisk_bitmaps_are_read_by_qemu_and_back() {
    let s = Scratch::new("bitmaps-from-cowdisk");
    let path = s.path("disk.qcow2");
    let size = 48 * MIB;
    Image::create(&path, size, &CreateOptions::default()).unwrap();
    let img = Image::open(&path, &OpenOptions::default()).unwrap();
    let mut models: Vec<(&str, Model, bool)> = Vec::new();
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "disabled"];
    let grains = [
        512,
        4096,
        65536,
        MIB,
        8 * MIB,
        64 * MIB,
        2048,
        8 * MIB,
        65536,
    ];
    for (i, name) in names.iter().enumerate() {
        let g = grains[i];
        let enabled = *name != "disabled";
        img.bitmap_add(name, g, enabled).unwrap();
        models.push((name, Model::new(g, size), enabled));
    }
    let info = img.bitmaps().unwrap();
    assert_eq!(info.len(), names.len());
    assert_eq!(info[5].granularity, 64 * MIB);
    assert!(!info[8].enabled);
    let mut rng = Rng::new(seed(17));
    scribble_all(&img, &mut models, &mut rng, 80);
    img.close().unwrap();
    qemu_check_clean(&path);
    let listed = qemu_bitmaps(&path);
    assert_eq!(
        listed.iter().map(|b| b.0.as_str()).collect::<Vec<_>>(),
        names
    );
    for (name, model, _) in &models {
        assert_eq!(
            qemu_runs(&path, name, &s),
            model.runs(),
            "{name} as QEMU reads it"
        );
    }
    // QEMU writes; cowdisk reads what QEMU recorded.
    qemu_io(&path, &["write -P 3 40M 100k"]);
    for (_, m, e) in models.iter_mut() {
        if *e {
            m.mark(40 * MIB, 100 * 1024);
        }
    }
    let ro = Image::open(
        &path,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    for (name, model, _) in &models {
        assert_eq!(
            cowdisk_runs(&ro, name),
            model.runs(),
            "{name} after QEMU wrote"
        );
    }
    drop(ro);
    // Clear, disable, merge, remove, and QEMU agrees.
    let img = Image::open(&path, &OpenOptions::default()).unwrap();
    img.bitmap_clear("a").unwrap();
    img.bitmap_set_enabled("b", false).unwrap();
    let h = img.bitmap_contents("h").unwrap();
    img.bitmap_merge("a", &h).unwrap();
    img.bitmap_remove("c").unwrap();
    assert!(img
        .bitmap_add("d", 0, true)
        .unwrap_err()
        .to_string()
        .contains("already exists"));
    assert!(img
        .bitmap_clear("nope")
        .unwrap_err()
        .to_string()
        .contains("no bitmap named 'nope'"));
    assert!(img
        .bitmap_add("x", 1000, true)
        .unwrap_err()
        .to_string()
        .contains("power of two"));
    img.write_at(&[1u8; 10], 20 * MIB).unwrap();
    img.close().unwrap();
    qemu_check_clean(&path);
    let listed = qemu_bitmaps(&path);
    let names_now: Vec<&str> = listed.iter().map(|b| b.0.as_str()).collect();
    assert_eq!(names_now, ["a", "b", "d", "e", "f", "g", "h", "disabled"]);
    assert_eq!(listed[1].2, Vec::<String>::new(), "b disabled");
    let mut a = Model::new(512, size);
    a.bits = models[0]
        .1
        .bits
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let off = i as u64 * 512;
            models[7].1.bits[(off / models[7].1.granularity) as usize]
        })
        .collect();
    a.mark(20 * MIB, 10);
    assert_eq!(
        qemu_runs(&path, "a", &s),
        a.runs(),
        "a = cleared, merged with h, then written"
    );
    let b = models[1].1.clone();
    assert_eq!(
        qemu_runs(&path, "b", &s),
        b.runs(),
        "b disabled before the write"
    );
}

#[test]
fn a_bitmap_in_use_at_open_is_kept_as_it_is() {
    let s = Scratch::new("bitmaps-in-use");
    let path = s.path("disk.qcow2");
    let p = path.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p, "16M"]);
    qemu_bitmap_add(&path, "ck", 65536, true);
    let img = Image::open(&path, &OpenOptions::default()).unwrap();
    img.write_at(&[5u8; 4096], MIB).unwrap();
    img.flush().unwrap();
    // What a crash now leaves: the file as it is while cowdisk has it open.
    let crashed = s.path("crashed.qcow2");
    std::fs::copy(&path, &crashed).unwrap();
    img.close().unwrap();
    assert_eq!(qemu_bitmaps(&crashed)[0].2, ["in-use", "auto"]);
    qemu_check_clean(&crashed);
    let img = Image::open(&crashed, &OpenOptions::default()).unwrap();
    let info = img.bitmaps().unwrap();
    assert!(info[0].inconsistent);
    let err = img.dirty_extents("ck", 0, MIB, 4).unwrap_err().to_string();
    assert!(err.contains("inconsistent"), "{err}");
    assert!(img
        .resize(32 * MIB, false)
        .unwrap_err()
        .to_string()
        .contains("inconsistent"));
    img.write_at(&[6u8; 4096], 2 * MIB).unwrap();
    img.close().unwrap();
    qemu_check_clean(&crashed);
    assert_eq!(
        qemu_bitmaps(&crashed)[0].2,
        ["in-use", "auto"],
        "kept in use"
    );
    let img = Image::open(&crashed, &OpenOptions::default()).unwrap();
    img.bitmap_remove("ck").unwrap();
    img.close().unwrap();
    qemu_check_clean(&crashed);
    assert!(qemu_bitmaps(&crashed).is_empty());
    // The cleanly closed original is consistent and exact.
    let mut m = Model::new(65536, 16 * MIB);
    m.mark(MIB, 4096);
    assert_eq!(qemu_runs(&path, "ck", &s), m.runs());
}

#[test]
fn resize_carries_bitmaps() {
    let s = Scratch::new("bitmaps-resize");
    let path = s.path("disk.qcow2");
    Image::create(&path, 8 * MIB, &CreateOptions::default()).unwrap();
    let img = Image::open(&path, &OpenOptions::default()).unwrap();
    img.bitmap_add("r", 65536, true).unwrap();
    img.write_at(&[1u8; 100], 7 * MIB).unwrap();
    img.resize(24 * MIB, false).unwrap();
    img.write_at(&[2u8; 100], 20 * MIB).unwrap();
    img.resize(16 * MIB, true).unwrap();
    img.close().unwrap();
    qemu_check_clean(&path);
    let mut m = Model::new(65536, 16 * MIB);
    m.mark(7 * MIB, 100);
    assert_eq!(qemu_runs(&path, "r", &s), m.runs());
}

/// Offset of the bitmap directory, from the header extension.
fn directory_offset(bytes: &[u8]) -> usize {
    let be32 = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().unwrap()) as usize;
    let mut off = be32(100);
    loop {
        let (kind, len) = (be32(off), be32(off + 4));
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return u64::from_be_bytes(bytes[off + 24..off + 32].try_into().unwrap()) as usize;
        }
        off += 8 + len.div_ceil(8) * 8;
    }
}

#[test]
fn malformed_bitmaps_are_refused_with_a_reason() {
    let s = Scratch::new("bitmaps-malformed");
    let good = s.path("good.qcow2");
    let p = good.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p, "16M"]);
    qemu_bitmap_add(&good, "b", 65536, true);
    qemu_io(&good, &["write 0 64k"]);
    let bytes = std::fs::read(&good).unwrap();
    let dir = directory_offset(&bytes);
    let table = u64::from_be_bytes(bytes[dir..dir + 8].try_into().unwrap()) as usize;
    // (what is changed, how, the message)
    type Damage = fn(&mut Vec<u8>, usize, usize);
    let cases: [(&str, Damage, &str); 7] = [
        ("type", |b, d, _| b[d + 16] = 2, "type 2"),
        ("flags", |b, d, _| b[d + 15] |= 0x10, "unknown flags"),
        ("granularity", |b, d, _| b[d + 17] = 40, "granularity"),
        (
            "table offset",
            |b, d, _| b[d..d + 8].copy_from_slice(&(1u64 << 40).to_be_bytes()),
            "outside the file",
        ),
        (
            "table size",
            |b, d, _| b[d + 8..d + 12].copy_from_slice(&0u32.to_be_bytes()),
            "bitmap table of 0 entries",
        ),
        (
            "name size",
            |b, d, _| b[d + 18..d + 20].copy_from_slice(&500u16.to_be_bytes()),
            "overruns",
        ),
        ("table entry", |b, _, t| b[t + 7] |= 2, "reserved bits"),
    ];
    for (what, damage, message) in cases {
        let path = s.path(&format!("bad-{}.qcow2", what.replace(' ', "-")));
        let mut b = bytes.clone();
        damage(&mut b, dir, table);
        std::fs::write(&path, &b).unwrap();
        let err = Image::open(&path, &OpenOptions::default())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(message), "{what}: {err}");
        assert!(
            err.contains("drop_bitmaps"),
            "{what}: the error says how to go on: {err}"
        );
        // Read-only it opens; the bitmaps say why they cannot be used.
        let ro = Image::open(
            &path,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let err = ro.bitmaps().unwrap_err().to_string();
        assert!(err.contains(message), "{what}: {err}");
        let mut buf = vec![0u8; 4096];
        ro.read_at(&mut buf, 0).unwrap();
        drop(ro);
        // Accepting the loss opens it read-write, as a program without bitmaps would.
        let rw = Image::open(
            &path,
            &OpenOptions {
                drop_bitmaps: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        rw.write_at(&[1u8; 512], 0).unwrap();
        assert!(rw.bitmaps().unwrap().is_empty());
        rw.close().unwrap();
        assert!(qemu_bitmaps(&path).is_empty(), "{what}: bitmaps dropped");
    }
}

/// A crash at every write of a session that opens an image with bitmaps, writes and
/// closes: afterwards the image checks clean (leaks allowed) and each bitmap is
/// either consistent and exact, or marked in use, or gone with the autoclear bit (the
/// state QEMU's own crash leaves in the same window).
#[test]
fn crash_at_every_write_keeps_bitmaps_honest() {
    let s = Scratch::new("bitmaps-crash");
    let template = s.path("template.qcow2");
    let size = 8 * MIB;
    Image::create(&template, size, &CreateOptions::default()).unwrap();
    {
        let img = Image::open(&template, &OpenOptions::default()).unwrap();
        img.bitmap_add("keep", 65536, true).unwrap();
        img.bitmap_add("fine", 512, true).unwrap();
        img.write_at(&[9u8; 70000], 3 * MIB).unwrap();
        img.close().unwrap();
    }
    let before = |g| {
        let mut m = Model::new(g, size);
        m.mark(3 * MIB, 70000);
        m
    };
    let workload_seed = seed(99);
    let session = |path: &Path, fail_after: Option<u64>| -> (bool, u64, Vec<(u64, u64)>) {
        let file = FileStorage::open(path, true, false).unwrap();
        let faulty = Arc::new(FaultStorage::new(Arc::new(file) as Arc<dyn Storage>));
        if let Some(n) = fail_after {
            faulty.fail_writes_after(n);
        }
        let Ok(img) = Image::open_storage(faulty.clone(), &OpenOptions::default()) else {
            return (false, faulty.writes_seen(), vec![]);
        };
        let mut rng = Rng::new(workload_seed);
        let mut done = Vec::new();
        for _ in 0..25 {
            let len = 1 + rng.below(100_000);
            let off = rng.below(size - len);
            if img.write_at(&vec![3u8; len as usize], off).is_err() {
                return (false, faulty.writes_seen(), done);
            }
            done.push((off, len));
        }
        let closed = img.close().is_ok();
        (closed, faulty.writes_seen(), done)
    };
    let clean = s.path("clean.qcow2");
    std::fs::copy(&template, &clean).unwrap();
    let (closed, total, all_writes) = session(&clean, None);
    assert!(closed);
    qemu_check_clean(&clean);
    let mut consistent_seen = 0;
    for n in 0..total {
        let path = s.path("crashed.qcow2");
        std::fs::copy(&template, &path).unwrap();
        let (closed, _, done) = session(&path, Some(n));
        assert!(
            !closed,
            "crash at write {n}/{total}: the close should have failed"
        );
        let (code, out, _) = run(
            "qemu-img",
            &["check", "--output=json", path.to_str().unwrap()],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        assert!(
            code == 0 || code == 3,
            "crash at {n}: check exit {code}: {out}"
        );
        assert!(
            v.get("corruptions").is_none_or(|c| c == 0),
            "crash at {n}: {out}"
        );
        let listed = qemu_bitmaps(&path);
        let ro = Image::open(
            &path,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        for (name, g, flags) in listed {
            if flags.contains(&"in-use".to_string()) {
                continue;
            }
            // Consistent: it must be exactly what happened, writes included.
            let mut want = before(g);
            let writes = if done.is_empty() { &done } else { &all_writes };
            for &(off, len) in writes {
                want.mark(off, len);
            }
            assert_eq!(
                cowdisk_runs(&ro, &name),
                want.runs(),
                "crash at {n}: {name} claims consistency"
            );
            consistent_seen += 1;
        }
    }
    assert!(
        consistent_seen > 0,
        "some crash points leave consistent bitmaps"
    );
}

#[test]
fn convert_carries_bitmaps_like_qemu_img() {
    use cowdisk::convert::{convert, ConvertOptions};
    let s = Scratch::new("bitmaps-convert");
    let src = s.path("src.qcow2");
    let p = src.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p, "32M"]);
    qemu_bitmap_add(&src, "daily", 65536, true);
    qemu_bitmap_add(&src, "fine", 512, true);
    qemu_bitmap_add(&src, "frozen", 1 << 20, false);
    qemu_io(&src, &["write -P 7 1M 3000", "write -P 8 20M 1M"]);
    let ours = s.path("ours.qcow2");
    let opts = ConvertOptions {
        bitmaps: true,
        ..ConvertOptions::default()
    };
    convert(&src, &ours, &opts, None).unwrap();
    qemu_check_clean(&ours);
    let theirs = s.path("theirs.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            p,
            theirs.to_str().unwrap(),
        ],
    );
    assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&theirs));
    for name in ["daily", "fine", "frozen"] {
        assert_eq!(
            qemu_runs(&ours, name, &s),
            qemu_runs(&theirs, name, &s),
            "{name} after convert --bitmaps"
        );
    }
    // Without --bitmaps none are carried.
    let plain = s.path("plain.qcow2");
    convert(&src, &plain, &ConvertOptions::default(), None).unwrap();
    assert!(qemu_bitmaps(&plain).is_empty());
    // An inconsistent bitmap fails the convert, unless skipped.
    let img = Image::open(&src, &OpenOptions::default()).unwrap();
    let broken = s.path("broken.qcow2");
    std::fs::copy(&src, &broken).unwrap();
    img.close().unwrap();
    let out = s.path("out.qcow2");
    let err = convert(&broken, &out, &opts, None).unwrap_err().to_string();
    assert!(err.contains("skip-broken-bitmaps"), "{err}");
    assert!(
        !out.exists(),
        "nothing is created when the bitmaps cannot be copied"
    );
    let skip = ConvertOptions {
        bitmaps: true,
        skip_broken_bitmaps: true,
        ..ConvertOptions::default()
    };
    convert(&broken, &out, &skip, None).unwrap();
    qemu_check_clean(&out);
    assert!(qemu_bitmaps(&out).is_empty());
}
