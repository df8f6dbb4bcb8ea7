//! Helpers shared by the integration tests: scratch folders, a seeded PRNG, and
//! wrappers around `qemu-img` / `qemu-io`, the reference implementation.
#![allow(dead_code)]

pub mod dirty;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch folder removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("cowdisk-test-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    /// A path inside the folder as a string, for command lines.
    pub fn file(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64* — deterministic, seedable, no dependencies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Seed from COWDISK_SEED or a fixed default, printed so failures can be replayed.
pub fn seed(default: u64) -> u64 {
    let s = std::env::var("COWDISK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    eprintln!("seed = {s} (set COWDISK_SEED to replay)");
    s
}

pub fn run(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let (code, out, err) = run(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?} failed:\n{out}\n{err}");
    out
}

/// Asserts `qemu-img check` finds no errors and no leaks. It shares the image (`-U`):
/// tests check images they still hold open after a flush.
pub fn qemu_check_clean(path: &Path) {
    let p = path.to_str().unwrap();
    let (code, out, err) = run("qemu-img", &["check", "-U", "--output=json", p]);
    assert_eq!(code, 0, "qemu-img check {p} exit {code}:\n{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("check json");
    assert_eq!(v["check-errors"], 0, "{out}");
    assert!(v.get("leaks").is_none_or(|l| l == 0), "leaks: {out}\n{err}");
    assert!(
        v.get("corruptions").is_none_or(|c| c == 0),
        "corruptions: {out}\n{err}"
    );
}

/// Asserts `qemu-img compare` says the qcow2 image and the raw file are identical.
pub fn qemu_compare_raw(image: &Path, raw: &Path) {
    let (code, out, err) = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "qemu-img compare: {out}\n{err}");
}

/// Converts an image to raw with qemu-img and returns the bytes (sharing the image, as
/// tests read images they still hold open).
pub fn qemu_read_raw(image: &Path, scratch: &Scratch) -> Vec<u8> {
    let out = scratch.path("qemu-converted.raw");
    let _ = std::fs::remove_file(&out);
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            image.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// True when files in `dir` can be opened with O_DIRECT (tmpfs refuses it).
pub fn supports_direct(dir: &Path) -> bool {
    let probe = dir.join(".direct-probe");
    let _ = std::fs::write(&probe, [0u8; 4096]);
    let ok = cowdisk::io::FileStorage::open(&probe, true, true).is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// A scratch folder on a file system that supports O_DIRECT: the temporary folder, or
/// one under the target folder. `None` (with a notice) when neither does.
pub fn direct_scratch(name: &str) -> Option<Scratch> {
    let s = Scratch::new(name);
    if supports_direct(&s.0) {
        return Some(s);
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cowdisk-direct-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let s = Scratch(dir);
    if supports_direct(&s.0) {
        return Some(s);
    }
    eprintln!(
        "NOTICE: no file system here supports O_DIRECT; skipping the O_DIRECT part of {name}"
    );
    None
}

/// Runs qemu-io on a qcow2 image with one `-c` per command; panics if it fails.
pub fn qemu_io<S: AsRef<str>>(path: &Path, cmds: &[S]) {
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c.as_ref());
    }
    args.push(path.to_str().unwrap());
    run_ok("qemu-io", &args);
}

/// The whole guest contents of an image, read through cowdisk.
pub fn read_all(img: &cowdisk::Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

/// Random writes (up to three clusters each) through cowdisk, mirrored into `model`.
pub fn scribble(img: &cowdisk::Image, model: &mut [u8], rng: &mut Rng, writes: usize, cs: u64) {
    let size = model.len() as u64;
    for _ in 0..writes {
        let len = (1 + rng.below(3 * cs)).min(size);
        let off = rng.below(size - len + 1);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        img.write_at(&data, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
}
