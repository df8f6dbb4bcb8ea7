//! `cowdisk info --output=json` against `qemu-img info --output=json`, key by key, on
//! the same images: every key qemu-img prints must be in cowdisk's output with the
//! same value (except host-dependent keys), and cowdisk may add nothing but its
//! `cowdisk` extension object. Skipped when qemu-img is missing.

mod common;

use common::Scratch;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// Keys whose values depend on the host rather than on the image: compared for
/// presence only.
const HOST_DEPENDENT: &[&str] = &["actual-size"];

/// The one key cowdisk may print that qemu-img does not.
const EXTENSION: &str = "cowdisk";

/// Whether `tool` can be run.
fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs a program in `dir` and returns its output.
fn run_in(dir: &Path, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// Runs a program in `dir`, asserts success and returns its stdout.
fn ok_in(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = run_in(dir, program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// The cowdisk binary under test.
const COWDISK: &str = env!("CARGO_BIN_EXE_cowdisk");

/// Compares qemu-img's JSON value `q` with cowdisk's `c` at `path`, pushing one line
/// per difference: a key qemu-img prints that cowdisk lacks or prints differently,
/// or a key cowdisk prints that qemu-img lacks (other than the top-level extension).
fn compare(q: &Value, c: &Value, path: &str, top: bool, problems: &mut Vec<String>) {
    match (q, c) {
        (Value::Object(qo), Value::Object(co)) => {
            for (key, qv) in qo {
                let here = format!("{path}/{key}");
                match co.get(key) {
                    None => problems.push(format!("{here}: missing in cowdisk's output")),
                    Some(_) if HOST_DEPENDENT.contains(&key.as_str()) => {}
                    Some(cv) => compare(qv, cv, &here, false, problems),
                }
            }
            for key in co.keys() {
                let allowed = qo.contains_key(key) || (top && key == EXTENSION);
                if !allowed {
                    problems.push(format!("{path}/{key}: printed by cowdisk, not by qemu-img"));
                }
            }
        }
        (Value::Array(qa), Value::Array(ca)) => {
            if qa.len() != ca.len() {
                problems.push(format!(
                    "{path}: {} entries in qemu-img's output, {} in cowdisk's",
                    qa.len(),
                    ca.len()
                ));
            }
            for (i, (qv, cv)) in qa.iter().zip(ca).enumerate() {
                // The images of a --backing-chain array are each a top level.
                compare(qv, cv, &format!("{path}[{i}]"), top, problems);
            }
        }
        _ if q != c => problems.push(format!("{path}: qemu-img {q}, cowdisk {c}")),
        _ => {}
    }
}

/// The differences between two outputs, empty when they agree.
fn differences(q: &Value, c: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    compare(q, c, "", true, &mut problems);
    problems
}

/// Runs `info --output=json` (plus `extra`) with both tools on `image` in `dir` and
/// asserts the outputs agree.
fn assert_info_agrees(dir: &Path, image: &str, extra: &[&str]) {
    let mut args = vec!["info", "--output=json"];
    args.extend_from_slice(extra);
    args.push(image);
    let q: Value = serde_json::from_str(&ok_in(dir, "qemu-img", &args)).expect("qemu-img JSON");
    let c: Value = serde_json::from_str(&ok_in(dir, COWDISK, &args)).expect("cowdisk JSON");
    let problems = differences(&q, &c);
    assert!(
        problems.is_empty(),
        "info {extra:?} {image}: cowdisk differs from qemu-img:\n  {}\nqemu-img: {q:#}\ncowdisk: {c:#}",
        problems.join("\n  ")
    );
    if extra.is_empty() {
        assert!(c[EXTENSION].is_object(), "no {EXTENSION} object: {c:#}");
    }
}

/// Runs the text `info` (plus `extra`) with both tools and asserts the same text,
/// once cowdisk's own `Backing chain:` summary is left out.
fn assert_text_agrees(dir: &Path, image: &str, extra: &[&str]) {
    let mut args = vec!["info"];
    args.extend_from_slice(extra);
    args.push(image);
    let q = ok_in(dir, "qemu-img", &args);
    let c = ok_in(dir, COWDISK, &args);
    let mut kept = Vec::new();
    let mut in_summary = false;
    for line in c.lines() {
        if line == "Backing chain:" {
            in_summary = true;
        } else if in_summary && line.starts_with("    ") {
            continue;
        } else {
            in_summary = false;
            kept.push(line);
        }
    }
    let c = kept.join("\n");
    assert_eq!(c.trim_end(), q.trim_end(), "text info {extra:?} of {image}");
}

/// The comparison itself catches a renamed, a missing, a changed and an extra key.
#[test]
fn comparison_catches_differences() {
    let q: Value = serde_json::json!({
        "virtual-size": 1, "actual-size": 5,
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}},
        "snapshots": [{"id": "1"}]
    });
    let same: Value = serde_json::json!({
        "virtual-size": 1, "actual-size": 9, "cowdisk": {"x": 1},
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}},
        "snapshots": [{"id": "1"}]
    });
    assert_eq!(differences(&q, &same), Vec::<String>::new());
    let mut renamed = same.clone();
    let v = renamed
        .as_object_mut()
        .unwrap()
        .remove("virtual-size")
        .unwrap();
    renamed["virtual_size"] = v;
    assert_eq!(differences(&q, &renamed).len(), 2, "{renamed}");
    let mut changed = same.clone();
    changed["format-specific"]["data"]["compat"] = "0.10".into();
    assert_eq!(differences(&q, &changed).len(), 1);
    let mut nested_extra = same.clone();
    nested_extra["snapshots"][0]["cowdisk"] = 1.into();
    assert_eq!(differences(&q, &nested_extra).len(), 1);
    let mut fewer = same.clone();
    fewer["snapshots"] = serde_json::json!([]);
    assert_eq!(differences(&q, &fewer).len(), 1);
}

/// Images made by qemu-img (and one by cowdisk) read the same through both tools.
#[test]
fn info_json_matches_qemu_img_key_by_key() {
    if !have("qemu-img") {
        eprintln!("qemu-img not found; skipping");
        return;
    }
    let tmp = Scratch::new("keys");
    let dir = tmp.0.as_path();
    let qemu = |args: &[&str]| ok_in(dir, "qemu-img", args);

    qemu(&["create", "-q", "-f", "qcow2", "plain.qcow2", "64M"]);
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "3M",
    ]);
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd,cluster_size=4k,lazy_refcounts=on,refcount_bits=8",
        "zstd.qcow2",
        "10M",
    ]);
    ok_in(
        dir,
        "qemu-io",
        &["-c", "write -c -P 3 0 128k", "zstd.qcow2"],
    );
    // A chain of three, the middle one in a sub-folder with a relative name.
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    qemu(&["create", "-q", "-f", "qcow2", "sub/base.qcow2", "8M"]);
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "sub/mid.qcow2",
    ]);
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "sub/mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    // A qcow2 image over a raw one, with the backing format left to probing.
    qemu(&["create", "-q", "-f", "raw", "base.raw", "1M"]);
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "onraw.qcow2",
    ]);
    // Two internal snapshots made by qemu-img: their dates must match exactly.
    qemu(&["create", "-q", "-f", "qcow2", "snap.qcow2", "2M"]);
    ok_in(dir, "qemu-io", &["-c", "write -P 7 0 64k", "snap.qcow2"]);
    qemu(&["snapshot", "-c", "first", "snap.qcow2"]);
    ok_in(dir, "qemu-io", &["-c", "write -P 8 64k 64k", "snap.qcow2"]);
    qemu(&["snapshot", "-c", "second", "snap.qcow2"]);
    // A backing file that is gone.
    qemu(&["create", "-q", "-f", "qcow2", "gone.qcow2", "1M"]);
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "orphan.qcow2",
    ]);
    std::fs::remove_file(dir.join("gone.qcow2")).unwrap();
    std::fs::write(dir.join("pw"), "hunter2").unwrap();
    // An image made and written by cowdisk.
    ok_in(dir, COWDISK, &["create", "-q", "ours.qcow2", "5M"]);
    ok_in(
        dir,
        COWDISK,
        &["write", "-P", "0x5a", "ours.qcow2", "1M", "300k"],
    );
    ok_in(
        dir,
        COWDISK,
        &["snapshot", "-c", "by-cowdisk", "ours.qcow2"],
    );
    // Legacy AES, made by cowdisk (qemu-img no longer creates it).
    ok_in(
        dir,
        COWDISK,
        &[
            "create",
            "-q",
            "--secret-file",
            "pw",
            "-o",
            "encrypt.format=aes",
            "aes.qcow2",
            "1M",
        ],
    );
    // LUKS, made by qemu-img (cheap key derivation).
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,file=pw",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "luks.qcow2",
        "1M",
    ]);
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,file=pw",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,\
         encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
        "luks-essiv.qcow2",
        "1M",
    ]);

    // Dirty (lazy refcounts, writer killed) and corrupt (the header bit set).
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "dirty.qcow2",
        "1M",
    ]);
    let _ = run_in(
        dir,
        "qemu-io",
        &["-c", "write 0 64k", "-c", "abort", "dirty.qcow2"],
    );
    qemu(&["create", "-q", "-f", "qcow2", "corrupt.qcow2", "1M"]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("corrupt.qcow2"))
            .unwrap();
        // incompatible_features (header offset 72, big-endian): bit 1 is "corrupt".
        f.write_all_at(&[2], 79).unwrap();
    }
    for image in ["dirty.qcow2", "corrupt.qcow2"] {
        assert_info_agrees(dir, image, &[]);
        assert_text_agrees(dir, image, &[]);
    }
    let dirty: Value = serde_json::from_str(&ok_in(
        dir,
        COWDISK,
        &["info", "--output=json", "dirty.qcow2"],
    ))
    .unwrap();
    assert_eq!(dirty["dirty-flag"], true, "{dirty:#}");
    let corrupt: Value = serde_json::from_str(&ok_in(
        dir,
        COWDISK,
        &["info", "--output=json", "corrupt.qcow2"],
    ))
    .unwrap();
    assert_eq!(corrupt["format-specific"]["data"]["corrupt"], true);

    for image in [
        "plain.qcow2",
        "v2.qcow2",
        "zstd.qcow2",
        "top.qcow2",
        "sub/mid.qcow2",
        "onraw.qcow2",
        "snap.qcow2",
        "ours.qcow2",
        "luks.qcow2",
        "luks-essiv.qcow2",
        "aes.qcow2",
    ] {
        assert_info_agrees(dir, image, &[]);
        assert_info_agrees(dir, image, &["--backing-chain"]);
        assert_info_agrees(dir, image, &["-U"]);
        assert_text_agrees(dir, image, &[]);
        assert_text_agrees(dir, image, &["--backing-chain"]);
    }
    // Absolute names give absolute full-backing-filename values in both.
    let top = tmp.file("top.qcow2");
    assert_info_agrees(dir, &top, &["--backing-chain"]);
    let chain: Value = serde_json::from_str(&ok_in(
        dir,
        COWDISK,
        &["info", "--output=json", "--backing-chain", &top],
    ))
    .unwrap();
    assert_eq!(chain.as_array().map(Vec::len), Some(3), "{chain:#}");

    let snap: Value = serde_json::from_str(&ok_in(
        dir,
        COWDISK,
        &["info", "--output=json", "snap.qcow2"],
    ))
    .unwrap();
    assert_eq!(snap["snapshots"][1]["name"], "second");

    // A missing backing file: the image is still shown (qemu-img does not open the
    // backing file for info), and cowdisk says why in its extension.
    assert_info_agrees(dir, "orphan.qcow2", &[]);
    let orphan: Value = serde_json::from_str(&ok_in(
        dir,
        COWDISK,
        &["info", "--output=json", "orphan.qcow2"],
    ))
    .unwrap();
    assert_eq!(orphan["backing-filename"], "gone.qcow2");
    assert!(
        orphan["cowdisk"]["backing-chain-error"].is_string(),
        "{orphan:#}"
    );
    // ... but --backing-chain fails in both, with one line naming the missing file.
    let q = run_in(
        dir,
        "qemu-img",
        &["info", "--backing-chain", "orphan.qcow2"],
    );
    let c = run_in(dir, COWDISK, &["info", "--backing-chain", "orphan.qcow2"]);
    assert_eq!(q.status.code(), Some(1));
    assert_eq!(c.status.code(), Some(1));
    let err = String::from_utf8_lossy(&c.stderr);
    assert_eq!(
        err,
        "cowdisk: could not open backing file 'gone.qcow2' of 'orphan.qcow2': No such file or directory\n"
    );
}

/// Persistent dirty bitmaps: made by qemu-img and dirtied by qemu-io, made by cowdisk,
/// left in use by a killed writer, all removed again. qemu-img and cowdisk list the
/// same bitmaps, in JSON and in text.
#[test]
fn info_lists_bitmaps_as_qemu_img() {
    if !have("qemu-img") || !have("qemu-io") {
        eprintln!("qemu-img or qemu-io not found; skipping");
        return;
    }
    let tmp = Scratch::new("bitmaps");
    let dir = tmp.0.as_path();
    let qemu = |args: &[&str]| ok_in(dir, "qemu-img", args);

    // Made by qemu-img: one enabled, one disabled, one of granularity 512; written.
    qemu(&["create", "-q", "-f", "qcow2", "qemu.qcow2", "64M"]);
    qemu(&["bitmap", "--add", "qemu.qcow2", "on"]);
    qemu(&["bitmap", "--add", "--disable", "qemu.qcow2", "off"]);
    qemu(&["bitmap", "--add", "-g", "512", "qemu.qcow2", "fine"]);
    ok_in(
        dir,
        "qemu-io",
        &["-c", "write 0 100k", "-c", "write 7M 1k", "qemu.qcow2"],
    );
    // Made by cowdisk and written by it.
    ok_in(dir, COWDISK, &["create", "-q", "ours.qcow2", "16M"]);
    ok_in(dir, COWDISK, &["bitmap", "--add", "ours.qcow2", "mine"]);
    ok_in(
        dir,
        COWDISK,
        &[
            "bitmap",
            "--add",
            "--disable",
            "-g",
            "1M",
            "ours.qcow2",
            "coarse",
        ],
    );
    ok_in(
        dir,
        COWDISK,
        &["write", "-P", "0x11", "ours.qcow2", "1M", "300k"],
    );
    // Left in use by QEMU: the writer aborts without storing its bitmaps.
    qemu(&["create", "-q", "-f", "qcow2", "qemu-inuse.qcow2", "8M"]);
    qemu(&["bitmap", "--add", "qemu-inuse.qcow2", "a"]);
    qemu(&["bitmap", "--add", "--disable", "qemu-inuse.qcow2", "d"]);
    let _ = run_in(
        dir,
        "qemu-io",
        &["-c", "write 0 64k", "-c", "abort", "qemu-inuse.qcow2"],
    );
    // Every bitmap removed again: qemu-img leaves the key out.
    qemu(&["create", "-q", "-f", "qcow2", "none.qcow2", "8M"]);
    ok_in(dir, COWDISK, &["bitmap", "--add", "none.qcow2", "x"]);
    ok_in(dir, COWDISK, &["bitmap", "--remove", "none.qcow2", "x"]);

    for image in ["qemu.qcow2", "ours.qcow2", "qemu-inuse.qcow2", "none.qcow2"] {
        assert_info_agrees(dir, image, &[]);
        assert_info_agrees(dir, image, &["-U"]);
        assert_text_agrees(dir, image, &[]);
    }
    let info = |image: &str| -> Value {
        serde_json::from_str(&ok_in(dir, COWDISK, &["info", "--output=json", image])).unwrap()
    };
    let q = info("qemu.qcow2");
    let bitmaps = &q["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps[1]["flags"], serde_json::json!([]), "{q:#}");
    assert_eq!(bitmaps[2]["granularity"], 512, "{q:#}");
    // The dirty byte counts are cowdisk's own, in its extension object.
    assert_eq!(
        q["cowdisk"]["bitmaps"][0]["dirty-bytes"],
        3 * 65536,
        "{q:#}"
    );
    assert_eq!(q["cowdisk"]["bitmaps"][2]["dirty-bytes"], 100 * 1024 + 1024);
    let inuse = info("qemu-inuse.qcow2");
    assert_eq!(
        inuse["format-specific"]["data"]["bitmaps"][0]["flags"],
        serde_json::json!(["in-use", "auto"]),
        "{inuse:#}"
    );
    let none = info("none.qcow2");
    assert!(
        none["format-specific"]["data"].get("bitmaps").is_none(),
        "{none:#}"
    );

    // Left in use by cowdisk: opened read-write through the library (which marks
    // the bitmaps in use on disk) and never closed. The image stays locked by this
    // process, so both tools read it with -U.
    let path = dir.join("ours-inuse.qcow2");
    ok_in(dir, COWDISK, &["create", "-q", "ours-inuse.qcow2", "8M"]);
    ok_in(
        dir,
        COWDISK,
        &["bitmap", "--add", "ours-inuse.qcow2", "live"],
    );
    let image = cowdisk::Image::open(&path, &cowdisk::OpenOptions::default()).unwrap();
    image.write_at(&[1u8; 4096], 0).unwrap();
    std::mem::forget(image);
    assert_info_agrees(dir, "ours-inuse.qcow2", &["-U"]);
    assert_text_agrees(dir, "ours-inuse.qcow2", &["-U"]);
    let live = serde_json::from_str::<Value>(&ok_in(
        dir,
        COWDISK,
        &["info", "--output=json", "-U", "ours-inuse.qcow2"],
    ))
    .unwrap();
    assert_eq!(
        live["format-specific"]["data"]["bitmaps"][0]["flags"],
        serde_json::json!(["in-use", "auto"]),
        "{live:#}"
    );
}
