//! Image locking next to QEMU's real tools: cowdisk and QEMU refuse to be a second
//! writer of each other's images, readers behave like qemu-img's (with force-share as
//! the way around), backing files are locked as QEMU locks them, and the locks go away
//! when the handle is closed or its process is killed.

mod common;

use common::*;
use cowdisk::{CreateOptions, Image, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn rw() -> OpenOptions {
    OpenOptions::default()
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

fn new_image(s: &Scratch, name: &str) -> std::path::PathBuf {
    let p = s.path(name);
    Image::create(&p, 16 << 20, &CreateOptions::default()).unwrap();
    p
}

/// Waits until some process holds an open-file-description lock on `path`.
fn wait_for_lock(path: &Path, child: &mut Child) {
    let inode = std::fs::metadata(path).unwrap().ino();
    let suffix = format!(":{inode}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let locks = std::fs::read_to_string("/proc/locks").unwrap();
        if locks
            .lines()
            .any(|l| l.contains("OFDLCK") && l.split_whitespace().any(|f| f.ends_with(&suffix)))
        {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the lock holder exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "no lock on {} appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A QEMU process holding `path` open (read-write unless `read_only`) until killed.
struct Qemu(Child);

impl Qemu {
    fn hold(path: &Path, read_only: bool) -> Qemu {
        let sock = path.with_extension("sock");
        let mut args = vec!["-k", sock.to_str().unwrap(), "-f", "qcow2"];
        if read_only {
            args.push("-r");
        }
        args.push(path.to_str().unwrap());
        let mut child = Command::new("qemu-nbd")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        wait_for_lock(path, &mut child);
        Qemu(child)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn busy(result: cowdisk::Result<Image>) -> String {
    match result {
        Ok(_) => panic!("the open succeeded although another process holds the image"),
        Err(e) => {
            assert_eq!(e.errno(), libc::EBUSY, "{e}");
            e.to_string()
        }
    }
}

/// Runs qemu-io `cmd` on `path`; returns (exit code, stderr).
fn qemu_io_try(path: &Path, extra: &[&str], cmd: &str) -> (i32, String) {
    let mut args = vec!["-f", "qcow2"];
    args.extend_from_slice(extra);
    args.extend(["-c", cmd, path.to_str().unwrap()]);
    let (code, _, err) = run("qemu-io", &args);
    (code, err)
}

#[test]
fn cowdisk_refuses_an_image_qemu_writes() {
    let s = Scratch::new("lock-qemu-rw");
    let p = new_image(&s, "a.qcow2");
    let qemu = Qemu::hold(&p, false);
    let msg = busy(Image::open(&p, &rw()));
    assert!(msg.contains("Failed to get \"write\" lock"), "{msg}");
    assert!(msg.contains("is another process using the image"), "{msg}");
    // Readers are refused too (QEMU's writer does not share writes with them)...
    let msg = busy(Image::open(&p, &ro()));
    assert!(msg.contains("Failed to get shared \"write\" lock"), "{msg}");
    // ...unless they share.
    let shared = OpenOptions {
        force_share: true,
        ..ro()
    };
    let img = Image::open(&p, &shared).unwrap();
    assert_eq!(img.size(), 16 << 20);
    drop(img);
    // Without locking the caller is on its own.
    let unlocked = OpenOptions {
        locking: false,
        ..rw()
    };
    drop(Image::open(&p, &unlocked).unwrap());
    drop(qemu);
    // Once QEMU is gone the image is free.
    Image::open(&p, &rw()).unwrap().close().unwrap();
}

#[test]
fn cowdisk_reads_beside_a_qemu_reader_but_does_not_write() {
    let s = Scratch::new("lock-qemu-ro");
    let p = new_image(&s, "a.qcow2");
    let _qemu = Qemu::hold(&p, true);
    let img = Image::open(&p, &ro()).unwrap();
    let mut buf = [1u8; 512];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 512]);
    let msg = busy(Image::open(&p, &rw()));
    assert!(msg.contains("Failed to get \"write\" lock"), "{msg}");
}

#[test]
fn qemu_refuses_an_image_cowdisk_writes() {
    let s = Scratch::new("lock-ours");
    let p = new_image(&s, "a.qcow2");
    let img = Image::open(&p, &rw()).unwrap();
    img.write_at(&[0x5a; 4096], 0).unwrap();
    img.flush().unwrap();
    let (code, err) = qemu_io_try(&p, &[], "write -P 0x11 0 4k");
    assert_ne!(code, 0, "qemu-io wrote into an image cowdisk holds");
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    let (code, err) = qemu_io_try(&p, &["-r"], "read 0 4k");
    assert_ne!(code, 0, "qemu-io -r opened an image cowdisk writes");
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    let (code, err) = qemu_io_try(&p, &["-r", "-U"], "read -P 0x5a 0 4k");
    assert_eq!(code, 0, "qemu-io -U -r: {err}");
    let (code, _, err) = run("qemu-img", &["info", p.to_str().unwrap()]);
    assert_ne!(code, 0, "qemu-img info without -U: {err}");
    run_ok("qemu-img", &["info", "-U", p.to_str().unwrap()]);
    // A second handle is a second writer, even in this process.
    busy(Image::open(&p, &rw()));
    img.close().unwrap();
    let (code, err) = qemu_io_try(&p, &[], "write -P 0x11 0 4k");
    assert_eq!(code, 0, "after close: {err}");
}

#[test]
fn backing_files_are_locked_as_qemu_locks_them() {
    let s = Scratch::new("lock-backing");
    let base = new_image(&s, "base.qcow2");
    let raw = s.path("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let top = s.path("top.qcow2");
    let opts = |b: &Path, f: &str| CreateOptions {
        backing_file: Some(b.to_str().unwrap().into()),
        backing_format: Some(f.into()),
        ..CreateOptions::default()
    };
    Image::create(&top, 0, &opts(&base, "qcow2")).unwrap();
    let img = Image::open(&top, &rw()).unwrap();
    // The base may be read by others, not written.
    let (code, err) = qemu_io_try(&base, &[], "write 0 512");
    assert_ne!(
        code, 0,
        "qemu-io wrote into the backing file of an open image"
    );
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    let (code, err) = qemu_io_try(&base, &["-r"], "read 0 512");
    assert_eq!(code, 0, "reading the backing file: {err}");
    busy(Image::open(&base, &rw()));
    drop(img);
    // Raw backing files too.
    let top2 = s.path("top2.qcow2");
    Image::create(&top2, 0, &opts(&raw, "raw")).unwrap();
    let img = Image::open(&top2, &rw()).unwrap();
    let (code, _, err) = run(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 512", raw.to_str().unwrap()],
    );
    assert_ne!(code, 0, "qemu-io wrote into a raw backing file: {err}");
    drop(img);
    // And a QEMU writer of the base keeps cowdisk from opening an overlay on it.
    let _qemu = Qemu::hold(&base, false);
    let msg = busy(Image::open(&top, &rw()));
    assert!(msg.contains(base.to_str().unwrap()), "{msg}");
    let shared = OpenOptions {
        force_share: true,
        ..ro()
    };
    drop(Image::open(&top, &shared).unwrap());
}

#[test]
fn force_share_is_for_readers_only() {
    let s = Scratch::new("lock-fs");
    let p = new_image(&s, "a.qcow2");
    let opts = OpenOptions {
        force_share: true,
        ..rw()
    };
    let e = Image::open(&p, &opts)
        .err()
        .expect("force-share read-write open");
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
}

/// Helper process of `locks_die_with_the_process`: holds the image named by
/// `COWDISK_LOCK_HOLD` open read-write until killed (not a test on its own).
#[test]
#[ignore]
fn hold_image_until_killed() {
    let Ok(path) = std::env::var("COWDISK_LOCK_HOLD") else {
        return;
    };
    let img = Image::open(Path::new(&path), &rw()).unwrap();
    img.write_at(&[0xee; 512], 0).unwrap();
    img.flush().unwrap();
    println!("holding");
    std::thread::sleep(Duration::from_secs(120));
    drop(img);
}

#[test]
fn locks_die_with_the_process() {
    let s = Scratch::new("lock-kill");
    let p = new_image(&s, "a.qcow2");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "hold_image_until_killed",
            "--nocapture",
        ])
        .env("COWDISK_LOCK_HOLD", &p)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    while !line.contains("holding") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the holder died");
    }
    // Another cowdisk process (this one) and QEMU are kept out...
    busy(Image::open(&p, &rw()));
    let (code, err) = qemu_io_try(&p, &[], "write 0 512");
    assert_ne!(code, 0, "{err}");
    // ...and the CLI too, except to read with -U.
    let cli = env!("CARGO_BIN_EXE_cowdisk");
    let pp = p.to_str().unwrap();
    let o = Command::new(cli)
        .args(["write", pp, "0", "512"])
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "cowdisk write beside a writer succeeded"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    let o = Command::new(cli).args(["info", pp]).output().unwrap();
    assert!(
        !o.status.success(),
        "cowdisk info without -U beside a writer"
    );
    let o = Command::new(cli)
        .args(["read", "-U", "-P", "0xee", pp, "0", "512"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // SIGKILL: no close, no flush — the kernel drops the locks with the process.
    child.kill().unwrap();
    child.wait().unwrap();
    let img = Image::open(&p, &rw()).unwrap();
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0xee; 512], "the flushed write of the killed holder");
    img.close().unwrap();
    qemu_check_clean(&p);
}
