//! `cowdisk bitmap` against QEMU: every operation's result is read back with
//! `qemu-img info` (flags, names, granularities) and with `qemu-nbd -B` +
//! `nbdinfo --map=qemu:dirty-bitmap:NAME` (the bits), `cowdisk bitmap --dirty` must
//! print the same runs as nbdinfo, and `qemu-img check` must stay clean. Tests that
//! need QEMU's tools skip when they are missing.

mod common;

use common::Scratch;
use serde_json::Value;
use std::process::{Command, Output};

/// Runs a program and returns its output.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// Runs a program, asserts success and returns its stdout.
fn ok_tool(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
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

/// Runs cowdisk, asserts success and returns its stdout.
fn ok(args: &[&str]) -> String {
    ok_tool(COWDISK, args)
}

/// Runs cowdisk, asserts exit status 1 and returns its one-line error message.
fn fails(args: &[&str]) -> String {
    let out = run(COWDISK, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "cowdisk {args:?}: {stderr}");
    assert!(stderr.starts_with("cowdisk: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr.trim_end().to_string()
}

/// Whether `tool` can be run.
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

/// A bitmap as `qemu-img info` lists it: (name, granularity, flags).
type Listed = (String, u64, Vec<String>);

/// The bitmaps `qemu-img info --output=json` lists (none: the key is absent).
fn qemu_bitmaps(image: &str) -> Vec<Listed> {
    let v: Value =
        serde_json::from_str(&ok_tool("qemu-img", &["info", "--output=json", image])).unwrap();
    let Some(list) = v["format-specific"]["data"].get("bitmaps") else {
        return Vec::new();
    };
    list.as_array()
        .expect("bitmaps is a list")
        .iter()
        .map(|b| {
            let flags = b["flags"].as_array().unwrap();
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                flags
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// Shorthand for one listed bitmap.
fn listed(name: &str, granularity: u64, flags: &[&str]) -> Listed {
    (
        name.to_string(),
        granularity,
        flags.iter().map(|f| f.to_string()).collect(),
    )
}

/// Asserts `qemu-img check` finds nothing wrong (no errors, no leaks).
fn check_clean(image: &str) {
    let out = run("qemu-img", &["check", "--output=json", image]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check {image}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["check-errors"], 0, "{text}");
    assert!(v.get("leaks").is_none_or(|l| l == 0), "{text}");
    assert!(v.get("corruptions").is_none_or(|c| c == 0), "{text}");
}

/// A run of a bitmap: (start, length, dirty).
type Run = (u64, u64, bool);

/// Joins neighbouring runs of the same state (nbdinfo may split runs where the
/// server's replies end).
fn coalesce(runs: impl IntoIterator<Item = Run>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (start, length, dirty) in runs {
        match out.last_mut() {
            Some(last) if last.2 == dirty && last.0 + last.1 == start => last.1 += length,
            _ => out.push((start, length, dirty)),
        }
    }
    out
}

/// The runs of bitmap `name` as QEMU exports them: `qemu-nbd -r -B NAME` read by
/// `nbdinfo --map=qemu:dirty-bitmap:NAME`.
fn nbd_runs(image: &str, name: &str) -> Vec<Run> {
    let map = format!("--map=qemu:dirty-bitmap:{name}");
    let text = ok_tool(
        "nbdinfo",
        &[
            "--json", &map, "--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name, image, "]",
        ],
    );
    let v: Value = serde_json::from_str(&text).expect("nbdinfo JSON");
    coalesce(v.as_array().unwrap().iter().map(|e| {
        (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap() & 1 == 1,
        )
    }))
}

/// The runs `cowdisk bitmap --dirty --output=json` prints.
fn cowdisk_runs(image: &str, name: &str) -> Vec<Run> {
    let text = ok(&["bitmap", "--dirty", "--output=json", image, name]);
    let v: Value = serde_json::from_str(&text).expect("cowdisk JSON");
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["dirty"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Asserts cowdisk and QEMU see the same runs of `name`, returns them.
fn runs_agree(image: &str, name: &str, nbd: bool) -> Vec<Run> {
    let ours = cowdisk_runs(image, name);
    if nbd {
        assert_eq!(ours, nbd_runs(image, name), "runs of {name} in {image}");
    }
    ours
}

/// Whole-disk runs of a 64 MiB disk with the dirty ranges given.
fn expected(dirty: &[(u64, u64)]) -> Vec<Run> {
    let size = 64 << 20;
    let mut out = Vec::new();
    let mut at = 0;
    for &(start, len) in dirty {
        if start > at {
            out.push((at, start - at, false));
        }
        out.push((start, len, true));
        at = start + len;
    }
    if at < size {
        out.push((at, size - at, false));
    }
    out
}

/// Every operation, alone and combined, read back by QEMU.
#[test]
fn bitmap_operations_round_trip_through_qemu() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let nbd = have("qemu-nbd") && have("nbdinfo");
    let dir = Scratch::new("ops");
    let img = dir.file("a.qcow2");
    ok(&["create", "-q", &img, "64M"]);

    // --add (default granularity: the cluster size), --add --disable -g 512.
    ok(&["bitmap", "--add", &img, "b0"]);
    ok(&["bitmap", "--add", "--disable", "-g", "512", &img, "b1"]);
    ok(&["bitmap", "--add", "-g", "1M", &img, "big"]);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            listed("b0", 65536, &["auto"]),
            listed("b1", 512, &[]),
            listed("big", 1 << 20, &["auto"])
        ]
    );
    check_clean(&img);
    assert_eq!(runs_agree(&img, "b0", nbd), expected(&[]));

    // Writes by QEMU dirty the enabled bitmaps only.
    ok_tool(
        "qemu-io",
        &[
            "-c",
            "write 0 100k",
            "-c",
            "write 5M 1k",
            "-f",
            "qcow2",
            &img,
        ],
    );
    check_clean(&img);
    let b0 = runs_agree(&img, "b0", nbd);
    assert_eq!(b0, expected(&[(0, 128 << 10), (5 << 20, 64 << 10)]));
    assert_eq!(runs_agree(&img, "b1", nbd), expected(&[]));
    assert_eq!(
        runs_agree(&img, "big", nbd),
        expected(&[(0, 1 << 20), (5 << 20, 1 << 20)])
    );

    // Writes by cowdisk too.
    ok(&["write", "-P", "7", &img, "10M", "4k"]);
    check_clean(&img);
    assert_eq!(
        runs_agree(&img, "b0", nbd),
        expected(&[(0, 128 << 10), (5 << 20, 64 << 10), (10 << 20, 64 << 10)])
    );

    // --enable, --disable.
    ok(&["bitmap", "--enable", &img, "b1"]);
    ok(&["bitmap", "--disable", &img, "b0"]);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            listed("b0", 65536, &[]),
            listed("b1", 512, &["auto"]),
            listed("big", 1 << 20, &["auto"])
        ]
    );
    ok_tool("qemu-io", &["-c", "write 20M 512", "-f", "qcow2", &img]);
    check_clean(&img);
    assert_eq!(runs_agree(&img, "b1", nbd), expected(&[(20 << 20, 512)]));
    assert_eq!(
        runs_agree(&img, "b0", nbd),
        expected(&[(0, 128 << 10), (5 << 20, 64 << 10), (10 << 20, 64 << 10)])
    );

    // --merge from a bitmap of the same image (coarser into finer).
    ok(&["bitmap", "--merge", "b0", &img, "b1"]);
    check_clean(&img);
    assert_eq!(
        runs_agree(&img, "b1", nbd),
        expected(&[
            (0, 128 << 10),
            (5 << 20, 64 << 10),
            (10 << 20, 64 << 10),
            (20 << 20, 512)
        ])
    );

    // --merge from another image's bitmap (made and dirtied by QEMU), with -F.
    let other = dir.file("other.qcow2");
    ok_tool("qemu-img", &["create", "-q", "-f", "qcow2", &other, "64M"]);
    ok_tool("qemu-img", &["bitmap", "--add", "-g", "4k", &other, "src"]);
    ok_tool("qemu-io", &["-c", "write 30M 8k", "-f", "qcow2", &other]);
    ok(&[
        "bitmap", "--merge", "src", "-b", &other, "-F", "qcow2", &img, "b0",
    ]);
    check_clean(&img);
    check_clean(&other);
    assert_eq!(
        runs_agree(&img, "b0", nbd),
        expected(&[
            (0, 128 << 10),
            (5 << 20, 64 << 10),
            (10 << 20, 64 << 10),
            (30 << 20, 64 << 10)
        ])
    );
    // Bitmaps of a disk of another size are not merged, as with qemu-img.
    let small = dir.file("small.qcow2");
    ok_tool("qemu-img", &["create", "-q", "-f", "qcow2", &small, "8M"]);
    ok_tool("qemu-img", &["bitmap", "--add", &small, "s"]);
    assert_eq!(
        fails(&["bitmap", "--merge", "s", "-b", &small, &img, "b0"]),
        "cowdisk: operation merge on bitmap 'b0' failed: bitmaps are of different sizes \
         (destination size is 67108864, source size is 8388608) and can't be merged"
    );
    // The source is left as it was.
    assert_eq!(
        runs_agree(&other, "src", nbd),
        expected(&[(30 << 20, 8 << 10)])
    );

    // --clear, then --remove; several operations in one call, in order.
    ok(&["bitmap", "--clear", "--enable", &img, "b0"]);
    check_clean(&img);
    assert_eq!(runs_agree(&img, "b0", nbd), expected(&[]));
    ok(&["bitmap", "--remove", &img, "big"]);
    ok(&["bitmap", "--add", "--disable", "--clear", &img, "late"]);
    ok(&["bitmap", "--add", "--remove", &img, "gone"]);
    check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            listed("b0", 65536, &["auto"]),
            listed("b1", 512, &["auto"]),
            listed("late", 65536, &[])
        ]
    );
    for name in ["b0", "b1", "late"] {
        ok(&["bitmap", "--remove", &img, name]);
        check_clean(&img);
    }
    assert_eq!(qemu_bitmaps(&img), Vec::new());
    // QEMU can still add bitmaps to the image afterwards.
    ok_tool("qemu-img", &["bitmap", "--add", &img, "again"]);
    assert_eq!(qemu_bitmaps(&img), vec![listed("again", 65536, &["auto"])]);
    check_clean(&img);
}

/// `--dirty` text is nbdinfo's text, line for line.
#[test]
fn dirty_text_matches_nbdinfo() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") || !have("nbdinfo") {
        return;
    }
    let dir = Scratch::new("text");
    let img = dir.file("t.qcow2");
    ok_tool("qemu-img", &["create", "-q", "-f", "qcow2", &img, "64M"]);
    ok_tool("qemu-img", &["bitmap", "--add", &img, "b"]);
    ok_tool(
        "qemu-io",
        &[
            "-c",
            "write 0 128k",
            "-c",
            "write 1M 4k",
            "-f",
            "qcow2",
            &img,
        ],
    );
    let ours = ok(&["bitmap", "--dirty", &img, "b"]);
    let theirs = ok_tool(
        "nbdinfo",
        &[
            "--map=qemu:dirty-bitmap:b",
            "--",
            "[",
            "qemu-nbd",
            "-r",
            "-f",
            "qcow2",
            "-B",
            "b",
            &img,
            "]",
        ],
    );
    assert_eq!(ours, theirs);
    assert_eq!(ours.lines().count(), 4, "{ours}");
}

/// Operations run in command-line order; the first failure stops the rest and
/// what came before it is kept (qemu-img's behaviour).
#[test]
fn operations_run_in_order() {
    if !have("qemu-img") {
        return;
    }
    let dir = Scratch::new("order");
    let img = dir.file("o.qcow2");
    ok(&["create", "-q", &img, "8M"]);
    let err = fails(&["bitmap", "--disable", "--add", &img, "x"]);
    assert_eq!(
        err,
        "cowdisk: operation disable on bitmap 'x' failed: no bitmap named 'x'"
    );
    assert_eq!(qemu_bitmaps(&img), Vec::new());
    fails(&["bitmap", "--add", "--add", &img, "x"]);
    assert_eq!(qemu_bitmaps(&img), vec![listed("x", 65536, &["auto"])]);
    fails(&["bitmap", "--add", "--remove", "--remove", &img, "y"]);
    assert_eq!(qemu_bitmaps(&img), vec![listed("x", 65536, &["auto"])]);
    check_clean(&img);
    // The same sequences through qemu-img end the same way.
    let q = dir.file("q.qcow2");
    ok_tool("qemu-img", &["create", "-q", "-f", "qcow2", &q, "8M"]);
    for ops in [
        &["--disable", "--add"][..],
        &["--add", "--add"],
        &["--add", "--remove", "--remove"],
    ] {
        for (tool, image) in [("qemu-img", &q), (COWDISK, &img)] {
            let mut args = vec!["bitmap"];
            args.extend_from_slice(ops);
            args.extend_from_slice(&[image, "z"]);
            assert_eq!(run(tool, &args).status.code(), Some(1), "{tool} {ops:?}");
        }
    }
    let strip = |mut l: Vec<Listed>| {
        l.retain(|b| b.0 != "x");
        l
    };
    assert_eq!(strip(qemu_bitmaps(&img)), strip(qemu_bitmaps(&q)));
}

/// Bad command lines and failing operations print one line and exit 1.
#[test]
fn bitmap_errors_are_one_line() {
    if !have("qemu-img") {
        return;
    }
    let dir = Scratch::new("errors");
    let img = dir.file("e.qcow2");
    ok(&["create", "-q", &img, "8M"]);
    ok(&["bitmap", "--add", &img, "b"]);
    assert_eq!(
        fails(&["bitmap", "--remove", &img, "nope"]),
        "cowdisk: operation remove on bitmap 'nope' failed: no bitmap named 'nope'"
    );
    assert_eq!(
        fails(&["bitmap", "--merge", "nope", &img, "b"]),
        "cowdisk: operation merge on bitmap 'b' failed: no bitmap named 'nope'"
    );
    assert_eq!(
        fails(&["bitmap", "--dirty", &img, "nope"]),
        "cowdisk: no bitmap named 'nope'"
    );
    let dup = fails(&["bitmap", "--add", &img, "b"]);
    assert!(
        dup.starts_with("cowdisk: operation add on bitmap 'b' failed: ")
            && dup.ends_with("a bitmap named 'b' already exists"),
        "{dup}"
    );
    for bad in ["1000", "256", "4G", "1.5k"] {
        let err = fails(&["bitmap", "--add", "-g", bad, &img, "g"]);
        assert!(
            err.contains(&format!("invalid granularity '{bad}'")),
            "{err}"
        );
    }
    assert!(fails(&["bitmap", "--add", "-g", "abc", &img, "g"]).contains("invalid size 'abc'"));
    assert_eq!(
        fails(&["bitmap", "-g", "64k", "--clear", &img, "b"]),
        "cowdisk: granularity only supported with --add"
    );
    assert_eq!(
        fails(&["bitmap", "-b", &img, "--clear", &img, "b"]),
        "cowdisk: merge bitmap source file only supported with --merge"
    );
    assert_eq!(
        fails(&["bitmap", "-F", "qcow2", "--merge", "b", &img, "b"]),
        "cowdisk: -F only supported with -b"
    );
    assert!(fails(&["bitmap", &img, "b"]).contains("need at least one of --add"));
    assert!(fails(&["bitmap", "--dirty", "--clear", &img, "b"]).contains("cannot be used"));
    assert!(fails(&["bitmap", "--add", &img]).contains("BITMAP"));
    // Nothing of this changed the image.
    assert_eq!(qemu_bitmaps(&img), vec![listed("b", 65536, &["auto"])]);
    check_clean(&img);
    // A version 2 image has no room for bitmaps.
    let v2 = dir.file("v2.qcow2");
    ok(&["create", "-q", "-o", "compat=0.10", &v2, "8M"]);
    let err = fails(&["bitmap", "--add", &v2, "b"]);
    assert!(err.contains("version 3"), "{err}");
}

/// An encrypted image's bitmaps are managed without its passphrase, or with it
/// given as qemu-img does.
#[test]
fn bitmaps_of_an_encrypted_image() {
    if !have("qemu-img") {
        return;
    }
    let dir = Scratch::new("luks");
    let img = dir.file("l.qcow2");
    let pw = dir.file("pw");
    std::fs::write(&pw, "hunter2").unwrap();
    let object = format!("secret,id=s0,file={pw}");
    ok_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &object,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            &img,
            "8M",
        ],
    );
    ok(&["bitmap", "--object", &object, "--add", &img, "b"]);
    ok(&["bitmap", "--secret-file", &pw, "--disable", &img, "b"]);
    assert_eq!(qemu_bitmaps(&img), vec![listed("b", 65536, &[])]);
    let opts = format!("driver=qcow2,file.filename={img},encrypt.key-secret=s0");
    let out = run(
        "qemu-img",
        &["check", "--object", &object, "--image-opts", &opts],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bitmap left in use by a killed QEMU cannot be used (its bits are unknown), only
/// removed, as with qemu-img.
#[test]
fn an_inconsistent_bitmap_can_only_be_removed() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("inuse");
    let img = dir.file("u.qcow2");
    ok_tool("qemu-img", &["create", "-q", "-f", "qcow2", &img, "8M"]);
    ok_tool("qemu-img", &["bitmap", "--add", &img, "a"]);
    ok_tool("qemu-img", &["bitmap", "--add", &img, "keep"]);
    let _ = run(
        "qemu-io",
        &["-c", "write 0 64k", "-c", "abort", "-f", "qcow2", &img],
    );
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            listed("a", 65536, &["in-use", "auto"]),
            listed("keep", 65536, &["in-use", "auto"])
        ]
    );
    for op in ["--clear", "--disable", "--enable"] {
        let err = fails(&["bitmap", op, &img, "a"]);
        assert!(err.contains("inconsistent"), "{err}");
    }
    assert!(fails(&["bitmap", "--dirty", &img, "a"]).contains("inconsistent"));
    let err = fails(&["bitmap", "--merge", "a", &img, "keep"]);
    assert!(err.contains("inconsistent"), "{err}");
    ok(&["bitmap", "--remove", &img, "a"]);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![listed("keep", 65536, &["in-use", "auto"])]
    );
    check_clean(&img);
}
