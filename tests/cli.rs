//! Integration tests of the `cowdisk` command-line tool, cross-checked against
//! `qemu-img` and `qemu-io` (tests needing them are skipped when they are missing).

mod common;

use common::Scratch;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// Runs `cowdisk` with `args`.
fn cowdisk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cowdisk"))
        .args(args)
        .output()
        .expect("run cowdisk")
}

/// Runs `cowdisk`, asserts success and returns its stdout.
fn ok(args: &[&str]) -> String {
    let out = cowdisk(args);
    assert!(
        out.status.success(),
        "cowdisk {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `cowdisk`, asserts exit status 1 with a `cowdisk: ` message, returns stderr.
fn fails(args: &[&str]) -> String {
    let out = cowdisk(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "cowdisk {args:?} should exit 1; stdout: {} stderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.starts_with("cowdisk: "),
        "error message of {args:?} should start with 'cowdisk: ': {stderr}"
    );
    stderr
}

/// Whether an external program (qemu-img, qemu-io) can be run.
fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok();
    if !found {
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

/// Runs an external program, asserts success and returns stdout.
fn run_tool(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().expect("run tool");
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img info --output=json` of an image, parsed.
fn qemu_info(path: &str) -> Value {
    let text = run_tool("qemu-img", &["info", "-f", "qcow2", "--output=json", path]);
    serde_json::from_str(&text).expect("qemu-img JSON")
}

/// Deterministic non-trivial test data.
fn test_data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Malformed command lines exit 1 with `cowdisk: ` and create nothing.
#[test]
fn bad_arguments_are_rejected() {
    let dir = Scratch::new("badargs");
    let img = dir.file("x.qcow2");
    let err = fails(&["create", "-o", "cluster_size=64k,frobnicate=1", &img, "1G"]);
    assert!(err.contains("frobnicate"), "{err}");
    let err = fails(&["create", &img, "12Q"]);
    assert!(err.contains("12Q"), "{err}");
    fails(&["create", &img]);
    fails(&["create", "-o", "compat=2", &img, "1M"]);
    fails(&["create", "-o", "lazy_refcounts=maybe", &img, "1M"]);
    let err = fails(&["create", "-b", &dir.file("missing-base.qcow2"), &img]);
    assert!(err.contains("missing-base.qcow2"), "{err}");
    fails(&["create", "-f", "vmdk", &img, "1M"]);
    fails(&["write", "-P", "256", &img, "0", "1"]);
    fails(&["write", "-P", "1", "--from", &img, &img, "0"]);
    fails(&["write", &img, "0"]);
    fails(&["read", &img, "0"]);
    fails(&["read", &img, "zero", "1"]);
    fails(&["info", "--output=yaml", &img]);
    fails(&["frobnicate"]);
    assert!(
        !Path::new(&img).exists(),
        "nothing may be created on bad input"
    );
    let help = ok(&["create", "-o", "help"]);
    assert!(help.contains("cluster_size"), "{help}");
    let version = ok(&["--version"]);
    assert!(version.starts_with("cowdisk "), "{version}");
}

/// `create -o ...` produces what `qemu-img info` reports, and `qemu-img check` is clean.
#[test]
fn create_options_agree_with_qemu_img() {
    if !have("qemu-img") {
        return;
    }
    let dir = Scratch::new("create");
    let v3 = dir.file("v3.qcow2");
    let out = ok(&[
        "create",
        "-o",
        "cluster_size=4k,refcount_bits=8,lazy_refcounts=on,compression_type=zstd",
        &v3,
        "16M",
    ]);
    assert!(
        out.starts_with(&format!("Formatting '{v3}', fmt=qcow2 cluster_size=4096 ")),
        "{out}"
    );
    assert!(out.contains(" size=16777216"), "{out}");
    assert!(out.contains(" refcount_bits=8"), "{out}");
    let q = qemu_info(&v3);
    assert_eq!(q["virtual-size"], 16 << 20);
    assert_eq!(q["cluster-size"], 4096);
    let data = &q["format-specific"]["data"];
    assert_eq!(data["compat"], "1.1");
    assert_eq!(data["refcount-bits"], 8);
    assert_eq!(data["lazy-refcounts"], true);
    assert_eq!(data["compression-type"], "zstd");
    assert_eq!(data["corrupt"], false);

    let v2 = dir.file("v2.qcow2");
    let out = ok(&[
        "create",
        "-o",
        "compat=0.10",
        "-o",
        "cluster_size=512",
        &v2,
        "1.5M",
    ]);
    assert!(out.contains(" compat=0.10"), "{out}");
    let q = qemu_info(&v2);
    assert_eq!(q["virtual-size"], 1536 * 1024);
    assert_eq!(q["cluster-size"], 512);
    assert_eq!(q["format-specific"]["data"]["compat"], "0.10");
    assert_eq!(q["format-specific"]["data"]["refcount-bits"], 16);

    let v3b = dir.file("v3-bytes.qcow2");
    let out = ok(&[
        "create",
        "-o",
        "compat=v3,refcount_bits=64",
        &v3b,
        "1000000",
    ]);
    assert!(
        out.contains(" size=1000448 "),
        "rounded up to 512 like qemu-img: {out}"
    );
    let q = qemu_info(&v3b);
    assert_eq!(q["virtual-size"], 1_000_448);
    assert_eq!(q["format-specific"]["data"]["refcount-bits"], 64);
    assert_eq!(q["cluster-size"], 65536);
    for path in [&v3, &v2, &v3b] {
        let check = run_tool("qemu-img", &["check", "-f", "qcow2", path]);
        assert!(check.contains("No errors were found"), "{check}");
    }
}

/// `read -P` accepts what `write -P` wrote and names the first mismatching offset.
#[test]
fn write_then_read_pattern_verifies() {
    let dir = Scratch::new("pattern");
    let img = dir.file("p.qcow2");
    ok(&["create", &img, "4M"]);
    let out = ok(&["write", "-P", "0xab", &img, "65636", "10000"]);
    assert_eq!(out.trim(), "wrote 10000 bytes at offset 65636");
    let out = ok(&["read", "-P", "0xab", &img, "65636", "10000"]);
    assert_eq!(out.trim(), "read 10000 bytes at offset 65636");
    ok(&["read", "-P", "171", &img, "65636", "10000"]);
    ok(&["read", "-P", "0", &img, "0", "65636"]);
    ok(&["read", "-P", "0", &img, "75636", "1M"]);

    let err = fails(&["read", "-P", "0xcd", &img, "65636", "10000"]);
    assert!(err.contains("offset 65636"), "{err}");
    let err = fails(&["read", "-P", "0xab", &img, "65600", "100"]);
    assert!(err.contains("offset 65600"), "{err}");
    let err = fails(&["read", "-P", "0", &img, "64k", "64k"]);
    assert!(err.contains("offset 65636"), "{err}");

    // Default pattern 0xcd, a write crossing clusters, and a write up to the end.
    ok(&["write", "--flush", &img, "1M", "200k"]);
    ok(&["read", "-P", "0xcd", &img, "1M", "200k"]);
    ok(&["write", "-P", "0x11", &img, "4190208", "4k"]);
    ok(&["read", "-P", "0x11", &img, "4190208", "4096"]);

    // Out of range requests fail cleanly.
    let err = fails(&["write", &img, "4M", "1"]);
    assert!(err.contains("beyond the end"), "{err}");
    fails(&["read", &img, "4190209", "4096"]);
    fails(&["read", &img, "18446744073709551615", "2"]);
}

/// `qemu-img check` and `qemu-io read -P` accept images written by cowdisk.
#[test]
fn qemu_agrees_with_our_writes() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("qemu-agrees");
    let img = dir.file("w.qcow2");
    ok(&["create", "-o", "cluster_size=4k", &img, "8M"]);
    ok(&["write", "-P", "0xab", &img, "6000", "20000"]);
    ok(&["write", "-P", "0x5c", "--flush", &img, "7M", "1M"]);
    ok(&["write", "-P", "0xab", &img, "2M", "1"]);
    let check = run_tool("qemu-img", &["check", "-f", "qcow2", &img]);
    assert!(check.contains("No errors were found"), "{check}");
    for cmd in [
        "read -P 0xab 6000 20000",
        "read -P 0 0 6000",
        "read -P 0 26000 2071152",
        "read -P 0xab 2M 1",
        "read -P 0x5c 7M 1M",
    ] {
        let out = run_tool("qemu-io", &["-r", "-f", "qcow2", "-c", cmd, &img]);
        assert!(!out.contains("Pattern verification failed"), "{cmd}: {out}");
    }
    // Sanity: qemu-io does detect a wrong pattern.
    let bad = Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "read -P 0xcd 6000 20000", &img])
        .output()
        .expect("run qemu-io");
    assert!(String::from_utf8_lossy(&bad.stdout).contains("Pattern verification failed"));
}

/// cowdisk reads data that qemu-io wrote.
#[test]
fn we_read_what_qemu_wrote() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("qemu-wrote");
    let img = dir.file("q.qcow2");
    run_tool("qemu-img", &["create", "-f", "qcow2", &img, "64M"]);
    run_tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "write -P 0x33 40000 100",
            &img,
        ],
    );
    ok(&["read", "-P", "0x5a", &img, "1M", "64k"]);
    ok(&["read", "-P", "0x33", &img, "40000", "100"]);
    ok(&["read", "-P", "0", &img, "0", "40000"]);
    ok(&["read", "-P", "0", &img, "40100", "1008476"]);
    let info: Value = serde_json::from_str(&ok(&["info", "--output=json", &img])).unwrap();
    assert_eq!(info["virtual-size"], 64 << 20);
}

/// `write --from` and `read --to` move file contents exactly.
#[test]
fn from_and_to_files_round_trip() {
    let dir = Scratch::new("files");
    let img = dir.file("f.qcow2");
    let src = dir.file("src.bin");
    let dst = dir.file("dst.bin");
    let data = test_data(3 * 65536 + 1234);
    std::fs::write(&src, &data).unwrap();
    ok(&["create", &img, "10M"]);
    let out = ok(&["write", "--from", &src, &img, "12345"]);
    assert_eq!(
        out.trim(),
        format!("wrote {} bytes at offset 12345", data.len())
    );
    let out = ok(&["write", "--from", &src, &img, "5M", "1000"]);
    assert_eq!(out.trim(), "wrote 1000 bytes at offset 5242880");
    fails(&["write", "--from", &src, &img, "0", "1M"]);

    let len = data.len().to_string();
    ok(&["read", "--to", &dst, &img, "12345", &len]);
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    ok(&["read", "--to", &dst, &img, "5M", "1000"]);
    assert_eq!(std::fs::read(&dst).unwrap(), &data[..1000]);

    let out = cowdisk(&["read", "--to", "-", &img, "12345", "100"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, &data[..100]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("read 100 bytes at offset 12345"));

    if have("qemu-img") {
        let raw = dir.file("f.raw");
        run_tool(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", &img, &raw],
        );
        let raw = std::fs::read(&raw).unwrap();
        assert_eq!(raw.len(), 10 << 20);
        assert_eq!(&raw[12345..12345 + data.len()], &data[..]);
        assert_eq!(&raw[5 << 20..(5 << 20) + 1000], &data[..1000]);
        assert!(raw[..12345].iter().all(|&b| b == 0));
    }
}

/// Without -P or --to, read prints a qemu-io style hexdump, limited on request.
#[test]
fn read_prints_a_hexdump() {
    let dir = Scratch::new("hexdump");
    let img = dir.file("h.qcow2");
    ok(&["create", &img, "1M"]);
    ok(&["write", "-P", "0x41", &img, "16", "20"]);
    let out = ok(&["read", &img, "0", "40"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(
        lines[0],
        "00000000:  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00  ................"
    );
    assert_eq!(
        lines[1],
        "00000010:  41 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41  AAAAAAAAAAAAAAAA"
    );
    assert!(
        lines[2].starts_with("00000020:  41 41 41 41 00 00 00 00 "),
        "{out}"
    );
    assert_eq!(lines[3], "read 40 bytes at offset 0");

    let out = ok(&["read", "--dump-limit", "32", &img, "0", "64k"]);
    assert_eq!(
        out.lines().filter(|l| l.contains(":  ")).count(),
        2,
        "{out}"
    );
    assert!(out.contains("read 65536 bytes at offset 0"), "{out}");
}

/// Missing and non-qcow2 files fail with exit 1 and are left alone.
#[test]
fn errors_for_missing_and_non_qcow2_files() {
    let dir = Scratch::new("errors");
    let missing = dir.file("missing.qcow2");
    let err = fails(&["info", &missing]);
    assert!(err.contains("missing.qcow2"), "{err}");
    fails(&["read", &missing, "0", "1"]);
    fails(&["write", &missing, "0", "1"]);
    assert!(!Path::new(&missing).exists());

    let text = dir.file("text.txt");
    std::fs::write(&text, "this is not a qcow2 image\n".repeat(100)).unwrap();
    fails(&["info", &text]);
    fails(&["info", "--output=json", &text]);
    fails(&["read", &text, "0", "1"]);
    fails(&["write", &text, "0", "1"]);
    assert_eq!(
        std::fs::read_to_string(&text).unwrap(),
        "this is not a qcow2 image\n".repeat(100),
        "a failed write must not touch a non-qcow2 file"
    );

    let empty = dir.file("empty");
    std::fs::write(&empty, b"").unwrap();
    fails(&["info", &empty]);
    fails(&["info", dir.0.to_str().unwrap()]);
}

/// `info` (JSON and text) matches qemu-img and lists the backing chain.
#[test]
fn info_json_matches_qemu_and_reports_the_chain() {
    let dir = Scratch::new("info");
    let base = dir.file("base.qcow2");
    let top = dir.file("top.qcow2");
    ok(&[
        "create",
        "-o",
        "cluster_size=32k,lazy_refcounts=on",
        &base,
        "2M",
    ]);
    ok(&["write", "-P", "0x77", &base, "0", "100k"]);
    let out = ok(&["create", "-b", "base.qcow2", "-F", "qcow2", &top]);
    assert!(out.contains(" size=2097152 "), "{out}");
    assert!(
        out.contains(" backing_file=base.qcow2 backing_fmt=qcow2"),
        "{out}"
    );
    ok(&["write", "-P", "0x88", &top, "50k", "10k"]);
    ok(&["read", "-P", "0x77", &top, "0", "50k"]);
    ok(&["read", "-P", "0x88", &top, "50k", "10k"]);
    ok(&["read", "-P", "0x77", &top, "60k", "40k"]);
    ok(&["read", "-P", "0", &top, "100k", "1948k"]);
    ok(&["read", "-P", "0x77", &base, "50k", "10k"]);

    let info: Value = serde_json::from_str(&ok(&["info", "--output=json", &top])).unwrap();
    assert_eq!(info["filename"], top.as_str());
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 2 << 20);
    assert_eq!(info["cluster-size"], 65536);
    assert_eq!(info["dirty-flag"], false);
    assert!(info["actual-size"].as_u64().unwrap() > 0);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    let chain = info["cowdisk"]["backing-chain"]
        .as_array()
        .expect("backing-chain array");
    assert_eq!(chain.len(), 1);
    assert!(chain[0]["filename"]
        .as_str()
        .unwrap()
        .ends_with("base.qcow2"));
    assert_eq!(chain[0]["format"], "qcow2");
    assert_eq!(chain[0]["virtual-size"], 2 << 20);
    let data = &info["format-specific"]["data"];
    assert_eq!(info["format-specific"]["type"], "qcow2");
    assert_eq!(data["compat"], "1.1");
    assert_eq!(data["refcount-bits"], 16);
    assert_eq!(data["lazy-refcounts"], false);
    assert_eq!(data["corrupt"], false);
    assert_eq!(data["compression-type"], "zlib");

    let base_info: Value = serde_json::from_str(&ok(&["info", "--output=json", &base])).unwrap();
    assert_eq!(base_info["cluster-size"], 32768);
    assert_eq!(base_info["format-specific"]["data"]["lazy-refcounts"], true);
    assert_eq!(base_info["cowdisk"]["backing-chain"], Value::Array(vec![]));
    assert!(base_info.get("backing-filename").is_none());

    let full: Value =
        serde_json::from_str(&ok(&["info", "--output=json", "--backing-chain", &top])).unwrap();
    let full = full.as_array().expect("--backing-chain gives an array");
    assert_eq!(full.len(), 2);
    assert_eq!(full[0]["filename"], top.as_str());
    assert_eq!(full[1]["cluster-size"], 32768);

    let human = ok(&["info", &top]);
    for expected in [
        format!("image: {top}\n"),
        "file format: qcow2\n".to_string(),
        "virtual size: 2 MiB (2097152 bytes)\n".to_string(),
        "cluster_size: 65536\n".to_string(),
        "backing file: base.qcow2".to_string(),
        "backing file format: qcow2\n".to_string(),
        "Format specific information:\n".to_string(),
        "    compat: 1.1\n".to_string(),
        "    compression type: zlib\n".to_string(),
        "    lazy refcounts: false\n".to_string(),
        "    refcount bits: 16\n".to_string(),
        "    corrupt: false\n".to_string(),
    ] {
        assert!(
            human.contains(&expected),
            "missing {expected:?} in:\n{human}"
        );
    }
    let human_chain = ok(&["info", "--backing-chain", &top]);
    assert_eq!(human_chain.matches("image: ").count(), 2, "{human_chain}");

    if have("qemu-img") {
        for path in [&base, &top] {
            let ours: Value = serde_json::from_str(&ok(&["info", "--output=json", path])).unwrap();
            let q = qemu_info(path);
            for key in [
                "virtual-size",
                "cluster-size",
                "format",
                "dirty-flag",
                "backing-filename",
                "backing-filename-format",
            ] {
                assert_eq!(ours.get(key), q.get(key), "{key} of {path}");
            }
            for key in [
                "compat",
                "refcount-bits",
                "lazy-refcounts",
                "corrupt",
                "compression-type",
            ] {
                assert_eq!(
                    ours["format-specific"]["data"][key], q["format-specific"]["data"][key],
                    "format-specific {key} of {path}"
                );
            }
            let check = run_tool("qemu-img", &["check", "-f", "qcow2", path]);
            assert!(check.contains("No errors were found"), "{check}");
        }
        run_tool(
            "qemu-io",
            &["-r", "-f", "qcow2", "-c", "read -P 0x88 50k 10k", &top],
        );
    }
}

/// Asserts `qemu-img check` finds no errors in an image.
fn assert_qemu_check_clean(path: &str) {
    let check = run_tool("qemu-img", &["check", "-f", "qcow2", path]);
    assert!(check.contains("No errors were found"), "{path}: {check}");
}

/// Runs qemu-io read commands on an image and asserts every pattern verifies.
fn assert_qemu_reads(path: &str, cmds: &[&str]) {
    for cmd in cmds {
        let out = run_tool("qemu-io", &["-r", "-f", "qcow2", "-c", cmd, path]);
        assert!(
            !out.contains("Pattern verification failed"),
            "{path}: {cmd}: {out}"
        );
    }
}

/// Asserts `cowdisk map` prints exactly what `qemu-img map` prints, as JSON and as a
/// table (`human` false when the image has compressed clusters, which qemu-img's
/// table refuses).
fn assert_map_like_qemu(path: &str, human: bool) {
    let ours = ok(&["map", "--output=json", path]);
    let theirs = run_tool("qemu-img", &["map", "-f", "qcow2", "--output=json", path]);
    let ours_value: Value = serde_json::from_str(&ours).expect("our map is JSON");
    let theirs_value: Value = serde_json::from_str(&theirs).expect("qemu-img map is JSON");
    assert_eq!(ours_value, theirs_value, "map of {path} parses differently");
    assert_eq!(ours, theirs, "map of {path} is not byte-identical");
    if human {
        let ours = ok(&["map", path]);
        let theirs = run_tool("qemu-img", &["map", "-f", "qcow2", path]);
        assert_eq!(ours, theirs, "human map of {path}");
    }
}

/// `zero` and `discard` change what reads back, as qemu-io sees it too.
#[test]
fn zero_and_discard_read_back_as_zeros() {
    let dir = Scratch::new("zero");
    let img = dir.file("z.qcow2");
    ok(&["create", &img, "4M"]);
    ok(&["write", "-P", "0x5a", &img, "0", "1M"]);
    let out = ok(&["zero", &img, "64k", "128k"]);
    assert_eq!(out.trim(), "zeroed 131072 bytes at offset 65536");
    ok(&["read", "-P", "0", &img, "64k", "128k"]);
    ok(&["read", "-P", "0x5a", &img, "0", "64k"]);
    ok(&["read", "-P", "0x5a", &img, "192k", "64k"]);
    // Unaligned, crossing cluster boundaries, with unmap.
    ok(&["zero", "-u", &img, "300000", "100000"]);
    ok(&["read", "-P", "0", &img, "300000", "100000"]);
    ok(&["read", "-P", "0x5a", &img, "256k", "37856"]);
    ok(&["read", "-P", "0x5a", &img, "400000", "648576"]);
    ok(&["zero", "--unmap", &img, "1", "1"]);
    ok(&["read", "-P", "0", &img, "1", "1"]);
    ok(&["read", "-P", "0x5a", &img, "0", "1"]);
    ok(&["read", "-P", "0x5a", &img, "2", "65534"]);
    // Discard releases whole clusters only.
    let out = ok(&["discard", &img, "512k", "200k"]);
    assert_eq!(out.trim(), "discarded 204800 bytes at offset 524288");
    ok(&["read", "-P", "0", &img, "512k", "192k"]);
    ok(&["read", "-P", "0x5a", &img, "704k", "8k"]);
    ok(&["discard", "--unmap", &img, "768k", "256k"]);
    ok(&["read", "-P", "0", &img, "768k", "256k"]);
    ok(&["read", "-P", "0x5a", &img, "712k", "56k"]);
    // Out of range requests fail cleanly.
    let err = fails(&["zero", &img, "4M", "1"]);
    assert!(err.contains("beyond the end"), "{err}");
    fails(&["discard", &img, "3M", "2M"]);
    fails(&["zero", &img, "0", "x"]);
    if have("qemu-img") && have("qemu-io") {
        assert_qemu_check_clean(&img);
        assert_qemu_reads(
            &img,
            &[
                "read -P 0x5a 0 1",
                "read -P 0 1 1",
                "read -P 0x5a 2 65534",
                "read -P 0 64k 128k",
                "read -P 0x5a 192k 64k",
                "read -P 0x5a 256k 37856",
                "read -P 0 300000 100000",
                "read -P 0x5a 400000 124288",
                "read -P 0 512k 192k",
                "read -P 0x5a 704k 64k",
                "read -P 0 768k 3328k",
            ],
        );
        assert_map_like_qemu(&img, true);
    }
}

/// `map` matches qemu-img on an image cowdisk wrote, zeroed and discarded in.
#[test]
fn map_matches_qemu_img_on_our_image() {
    if !have("qemu-img") {
        return;
    }
    let dir = Scratch::new("map-ours");
    let img = dir.file("ours.qcow2");
    ok(&["create", &img, "16M"]);
    ok(&["write", "-P", "1", &img, "10000", "300000"]);
    ok(&["zero", &img, "1M", "320k"]);
    ok(&["write", "-P", "2", &img, "2M", "192k"]);
    ok(&["zero", "-u", &img, "2M", "64k"]);
    ok(&["discard", &img, "0", "64k"]);
    ok(&["zero", &img, "12M", "100"]);
    ok(&["write", "-P", "3", &img, "15M", "1M"]);
    ok(&["discard", &img, "15M", "128k"]);
    assert_map_like_qemu(&img, true);
    assert_qemu_check_clean(&img);

    // A v2 image (zeroing deallocates there) with small clusters.
    let v2 = dir.file("v2.qcow2");
    ok(&["create", "-o", "compat=0.10,cluster_size=4k", &v2, "1M"]);
    ok(&["write", "-P", "4", &v2, "0", "100k"]);
    ok(&["zero", &v2, "8k", "16k"]);
    ok(&["discard", &v2, "40k", "8k"]);
    assert_map_like_qemu(&v2, true);
    assert_qemu_check_clean(&v2);

    // The map of a part of the image, and of an empty image.
    let part = ok(&[
        "map",
        "--output=json",
        "--start-offset",
        "1M",
        "--max-length",
        "1M",
        &img,
    ]);
    let theirs = run_tool(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "--start-offset=1M",
            "--max-length=1M",
            &img,
        ],
    );
    assert_eq!(part, theirs);
    let empty = dir.file("empty.qcow2");
    ok(&["create", &empty, "0"]);
    assert_map_like_qemu(&empty, true);
}

/// `map` matches qemu-img on an image qemu-io wrote with zeroes, discards,
/// compressed data and plain data.
#[test]
fn map_matches_qemu_img_on_a_qemu_io_image() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("map-qemu");
    let img = dir.file("q.qcow2");
    run_tool("qemu-img", &["create", "-f", "qcow2", &img, "16M"]);
    run_tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -z 2M 128k",
            "-c",
            "write -z -u 512k 64k",
            "-c",
            "discard 128k 64k",
            "-c",
            "write -P 5 3M 256k",
            "-c",
            "write -z 3M 64k",
            "-c",
            "write -P 3 15M 64k",
            &img,
        ],
    );
    assert_map_like_qemu(&img, true);

    // Compressed clusters: JSON without an offset; the table refuses, like qemu-img.
    run_tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -c -P 7 4M 64k", &img],
    );
    assert_map_like_qemu(&img, false);
    let out = cowdisk(&["map", &img]);
    let q = Command::new("qemu-img")
        .args(["map", "-f", "qcow2", &img])
        .output()
        .expect("run qemu-img");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(q.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "cowdisk: File contains external, encrypted or compressed clusters.\n"
    );
    assert!(String::from_utf8_lossy(&q.stderr)
        .contains("File contains external, encrypted or compressed clusters."));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&q.stdout),
        "the table up to the compressed cluster"
    );

    // After our own zeroes and discards on top of qemu's.
    ok(&["zero", &img, "4M", "64k"]);
    ok(&["discard", &img, "15M", "64k"]);
    ok(&["zero", "-u", &img, "0", "128k"]);
    assert_map_like_qemu(&img, true);
    assert_qemu_check_clean(&img);
}

/// Host-file holes inside data clusters (the unwritten tail of a partially written
/// last cluster) are data, not zeros, unless the image looks preallocated: QEMU only
/// asks the host file then (`qcow2_detect_metadata_preallocation`).
#[test]
fn map_matches_qemu_img_with_host_holes() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("map-holes");
    // qemu-io writes 1000 bytes: the rest of the cluster is left unwritten.
    let img = dir.file("p.qcow2");
    run_tool("qemu-img", &["create", "-f", "qcow2", &img, "1M"]);
    run_tool("qemu-io", &["-f", "qcow2", "-c", "write -P 1 0 1000", &img]);
    assert_map_like_qemu(&img, true);
    // cowdisk leaves the tail of a partial last cluster unwritten too.
    let ours = dir.file("ours.qcow2");
    ok(&["create", &ours, "16M"]);
    ok(&["write", "-P", "1", &ours, "10000", "300000"]);
    ok(&["write", "-P", "3", &ours, "15M", "1M"]);
    assert_map_like_qemu(&ours, true);
}

/// `map` matches qemu-img on a 3-deep chain top.qcow2 → mid.qcow2 → base.raw of
/// different sizes, and names each layer's file in the table.
#[test]
fn map_matches_qemu_img_on_a_chain() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("map-chain");
    let base = dir.file("base.raw");
    let mid = dir.file("mid.qcow2");
    let top = dir.file("top.qcow2");
    run_tool("qemu-img", &["create", "-f", "raw", &base, "4M"]);
    run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 3M 64k",
            &base,
        ],
    );
    run_tool(
        "qemu-img",
        &[
            "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &mid, "6M",
        ],
    );
    run_tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 3 512k 128k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write -P 4 5M 64k",
            &mid,
        ],
    );
    run_tool(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &top,
            "8M",
        ],
    );
    run_tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 5 0 64k",
            "-c",
            "discard 3M 64k",
            "-c",
            "write -z 5M 128k",
            "-c",
            "write -P 6 7M 128k",
            &top,
        ],
    );
    assert_map_like_qemu(&top, true);
    assert_map_like_qemu(&mid, true);
    let human = ok(&["map", &top]);
    for file in [&top, &mid, &base] {
        assert!(human.contains(file.as_str()), "{file} missing in:\n{human}");
    }

    // Our own changes on top.
    ok(&["zero", &top, "64k", "64k"]);
    ok(&["write", "-P", "7", &top, "3M", "64k"]);
    ok(&["zero", "-u", &top, "0", "64k"]);
    ok(&["discard", &top, "7M", "64k"]);
    assert_map_like_qemu(&top, true);
    assert_qemu_check_clean(&top);
    assert_qemu_check_clean(&mid);
    assert_qemu_reads(
        &top,
        &[
            "read -P 0 0 128k",
            "read -P 1 128k 384k",
            "read -P 3 512k 128k",
            "read -P 7 3M 64k",
            "read -P 0 5M 128k",
            "read -P 0 7M 64k",
            "read -P 6 7232k 64k",
        ],
    );
}

/// `resize` grows and shrinks like `qemu-img resize`, refuses to lose data without
/// `--force`, and qemu-img agrees on the result.
#[test]
fn resize_like_qemu_img() {
    let dir = Scratch::new("resize");
    let img = dir.file("r.qcow2");
    ok(&["create", &img, "1M"]);
    ok(&["write", "-P", "0x42", &img, "512k", "64k"]);
    let size = |path: &str| -> u64 {
        let info: Value = serde_json::from_str(&ok(&["info", "--output=json", path])).unwrap();
        info["virtual-size"].as_u64().unwrap()
    };

    assert_eq!(ok(&["resize", &img, "2M"]).trim(), "Image resized.");
    assert_eq!(size(&img), 2 << 20);
    ok(&["read", "-P", "0", &img, "1M", "1M"]);
    ok(&["resize", &img, "+512k"]);
    assert_eq!(size(&img), 2560 << 10);

    // Shrinking needs --shrink; relative sizes may start with '-'.
    let err = fails(&["resize", &img, "-512k"]);
    assert!(err.contains("--shrink"), "{err}");
    let err = fails(&["resize", &img, "1M"]);
    assert!(err.contains("--shrink"), "{err}");
    assert_eq!(size(&img), 2560 << 10);
    ok(&["resize", "--shrink", &img, "-512k"]);
    assert_eq!(size(&img), 2 << 20);
    ok(&["resize", "--shrink", &img, "--", "-1M"]);
    assert_eq!(size(&img), 1 << 20);

    // Data past the new end: refused (EINVAL) unless --force.
    let err = fails(&["resize", "--shrink", &img, "256k"]);
    assert!(err.contains("invalid argument"), "{err}");
    assert_eq!(size(&img), 1 << 20);
    ok(&["read", "-P", "0x42", &img, "512k", "64k"]);
    ok(&["resize", "--force", &img, "256k"]);
    assert_eq!(size(&img), 256 << 10);
    ok(&["resize", &img, "1M"]);
    ok(&["read", "-P", "0", &img, "0", "1M"]);

    // Bad sizes.
    fails(&["resize", "--shrink", &img, "1000"]);
    fails(&["resize", &img, "-2M"]);
    fails(&["resize", &img, "+x"]);
    fails(&["resize", "-f", "raw", &img, "2M"]);
    assert_eq!(size(&img), 1 << 20);

    if have("qemu-img") {
        assert_eq!(qemu_info(&img)["virtual-size"], 1 << 20);
        assert_qemu_check_clean(&img);
        // An image qemu made, resized by us, and one we made resized by qemu.
        let q = dir.file("q.qcow2");
        run_tool("qemu-img", &["create", "-f", "qcow2", &q, "3M"]);
        ok(&["resize", &q, "+5M"]);
        assert_eq!(qemu_info(&q)["virtual-size"], 8 << 20);
        ok(&["resize", "--shrink", &q, "100k"]);
        assert_eq!(qemu_info(&q)["virtual-size"], 100 << 10);
        assert_qemu_check_clean(&q);
        run_tool("qemu-img", &["resize", "-f", "qcow2", &img, "3M"]);
        assert_eq!(size(&img), 3 << 20);
        assert_map_like_qemu(&img, true);
    }
}

#[test]
fn create_quiet_and_one_line_errors_without_rust_noise() {
    let dir = Scratch::new("quiet");
    let img = dir.file("q.qcow2");
    assert_eq!(ok(&["create", "-q", &img, "1M"]), "");
    let err = fails(&["create", &img, "1M"]);
    assert!(err.contains("File exists"), "{err}");
    let err = fails(&["info", &dir.file("missing.qcow2")]);
    assert!(err.contains("No such file or directory"), "{err}");
    for e in [err, fails(&["create", &img, "1M"])] {
        assert!(!e.contains("os error"), "Rust's errno suffix leaked: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "not one line: {e}");
    }
}

/// Allocated bytes of a file on the host.
fn allocated(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// `create -o preallocation=...` maps every cluster like qemu-img's preallocated
/// images, reads as zeros and checks clean; falloc and full reserve the space.
#[test]
fn create_preallocation_like_qemu_img() {
    let dir = Scratch::new("prealloc");
    let raw = dir.file("zero.raw");
    std::fs::write(&raw, vec![0u8; 3 << 20]).unwrap();
    for mode in ["off", "metadata", "falloc", "full"] {
        let ours = dir.file(&format!("ours-{mode}.qcow2"));
        let option = format!("preallocation={mode}");
        let out = ok(&["create", "-o", &option, &ours, "3M"]);
        assert!(out.contains(&format!(" {option} ")), "{out}");
        let info: Value = serde_json::from_str(&ok(&["info", "--output=json", &ours])).unwrap();
        assert_eq!(info["virtual-size"], 3 << 20);
        if mode == "falloc" || mode == "full" {
            assert!(allocated(&ours) >= 3 << 20, "{mode}: {}", allocated(&ours));
        }
        if mode == "metadata" {
            assert!(allocated(&ours) < 1 << 20, "metadata: {}", allocated(&ours));
        }
        ok(&["read", "-P", "0", &ours, "0", "3M"]);
        ok(&["write", "-P", "0x3c", &ours, "1M", "64k"]);
        ok(&["read", "-P", "0x3c", &ours, "1M", "64k"]);
        ok(&["write", "-P", "0", &ours, "1M", "64k"]);
        if !have("qemu-img") {
            continue;
        }
        assert_qemu_check_clean(&ours);
        let cmp = run_tool(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "raw", &ours, &raw],
        );
        assert!(cmp.contains("Images are identical"), "{mode}: {cmp}");
        let theirs = dir.file(&format!("qemu-{mode}.qcow2"));
        run_tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &option, &theirs, "3M"],
        );
        ok(&["write", "-P", "0", &theirs, "1M", "64k"]);
        let map = |p: &str| run_tool("qemu-img", &["map", "-f", "qcow2", "--output=json", p]);
        assert_eq!(
            map(&ours),
            map(&theirs),
            "qemu-img map of preallocation={mode}"
        );
    }
    // Small clusters, several L2 tables and refcount blocks: still clean.
    let small = dir.file("small.qcow2");
    ok(&[
        "create",
        "-q",
        "-o",
        "preallocation=metadata,cluster_size=512,refcount_bits=64",
        &small,
        "3M",
    ]);
    ok(&["read", "-P", "0", &small, "0", "3M"]);
    if have("qemu-img") {
        assert_qemu_check_clean(&small);
    }
    let err = fails(&[
        "create",
        "-o",
        "preallocation=sparse",
        &dir.file("x.qcow2"),
        "1M",
    ]);
    assert_eq!(
        err,
        "cowdisk: invalid preallocation mode 'sparse' (expected off, metadata, falloc or full)\n"
    );
    let base = dir.file("ours-off.qcow2");
    let err = fails(&[
        "create",
        "-o",
        "preallocation=metadata",
        "-b",
        &base,
        "-F",
        "qcow2",
        &dir.file("y.qcow2"),
    ]);
    assert!(err.contains("cannot be used with a backing file"), "{err}");
    assert!(!Path::new(&dir.file("y.qcow2")).exists());
}

/// `create -u` stores a backing file name without opening it, as qemu-img does.
#[test]
fn create_unsafe_backing_is_not_opened() {
    let dir = Scratch::new("unsafe");
    let img = dir.file("u.qcow2");
    let out = ok(&[
        "create",
        "-u",
        "-b",
        "not-there.qcow2",
        "-F",
        "qcow2",
        &img,
        "1M",
    ]);
    assert!(
        out.contains(" backing_file=not-there.qcow2 backing_fmt=qcow2"),
        "{out}"
    );
    let info: Value = serde_json::from_str(&ok(&["info", "--output=json", &img])).unwrap();
    assert_eq!(info["backing-filename"], "not-there.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], 1 << 20);
    assert!(
        info["cowdisk"]["backing-chain-error"].is_string(),
        "{info:#}"
    );
    if have("qemu-img") {
        let q = qemu_info(&img);
        assert_eq!(q["backing-filename"], "not-there.qcow2");
        assert_eq!(q["full-backing-filename"], info["full-backing-filename"]);
    }
    let other = dir.file("v.qcow2");
    assert_eq!(
        fails(&["create", "-u", "-b", "not-there.qcow2", &other, "1M"]),
        "cowdisk: -F must be given with -u (the backing file is not opened)\n"
    );
    assert_eq!(
        fails(&[
            "create",
            "-u",
            "-b",
            "not-there.qcow2",
            "-F",
            "qcow2",
            &other
        ]),
        "cowdisk: SIZE must be given with -u (the backing file is not opened)\n"
    );
    let err = fails(&[
        "create",
        "-b",
        "not-there.qcow2",
        "-F",
        "qcow2",
        &other,
        "1M",
    ]);
    assert!(
        err.contains("not-there.qcow2") && err.contains("No such file"),
        "{err}"
    );
    assert!(!Path::new(&other).exists());
}

/// Bad sizes and command lines give one line with the reason, and no Rust noise.
#[test]
fn bad_sizes_and_usage_errors_are_one_line() {
    let dir = Scratch::new("sizes");
    let img = dir.file("s.qcow2");
    for (size, why) in [
        ("-1G", "invalid size '-1G': sizes cannot be negative"),
        ("0x", "invalid size '0x': not a hexadecimal number"),
        (
            "1Q",
            "invalid size '1Q': unknown suffix (use k, M, G, T, P or E)",
        ),
        ("1.5", "invalid size '1.5': a fraction needs a unit suffix"),
        ("16E", "invalid size '16E': too large"),
    ] {
        assert_eq!(fails(&["create", &img, size]), format!("cowdisk: {why}\n"));
        assert_eq!(
            fails(&["create", &img, "--", size]),
            format!("cowdisk: {why}\n")
        );
    }
    assert!(!Path::new(&img).exists());
    ok(&["create", "-q", &img, "1M"]);
    assert_eq!(
        fails(&["write", &img, "--", "-1", "1"]),
        "cowdisk: <OFFSET>: invalid size '-1': sizes cannot be negative\n"
    );
    assert_eq!(
        fails(&["read", &img, "0", "0x"]),
        "cowdisk: <LENGTH>: invalid size '0x': not a hexadecimal number\n"
    );
    assert_eq!(
        fails(&["info", "--output=yaml", &img]),
        "cowdisk: invalid value 'yaml' for '--output <OUTPUT>' (possible values: human, json)\n"
    );
    assert_eq!(
        fails(&["info"]),
        "cowdisk: missing required argument: <FILE>\n"
    );
    assert_eq!(
        fails(&["create", &img, "1M"]),
        format!("cowdisk: cannot create '{img}': File exists\n")
    );
    let missing = dir.file("missing.qcow2");
    assert_eq!(
        fails(&["info", &missing]),
        format!("cowdisk: cannot open '{missing}': No such file or directory\n")
    );
    for args in [
        vec!["frobnicate"],
        vec!["info", "--bogus", img.as_str()],
        vec!["write", "--from", "/nonexistent/file", img.as_str(), "0"],
        vec![
            "create",
            "--secret-file",
            "/nonexistent/pw",
            "-o",
            "encrypt.format=luks",
            &missing,
            "1M",
        ],
    ] {
        let err = fails(&args);
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(!err.contains("os error"), "{args:?}: {err}");
    }
}
