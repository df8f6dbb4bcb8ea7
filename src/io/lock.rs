//! Image locking compatible with QEMU's (`block/file-posix.c`): open-file-description
//! byte-range locks, one byte per permission. A holder takes a shared lock on byte
//! `100 + bit` for every permission it uses and on byte `200 + bit` for every
//! permission it does not let others have. An open conflicts when another open file
//! description holds byte `200 + bit` for a permission it wants, or byte `100 + bit`
//! for a permission it refuses to share.
//!
//! Locks are applied first and checked second (as QEMU does), so of two opens racing
//! each other at least one sees the other: both may fail, neither can wrongly succeed.
//! They belong to the open file description, so they last as long as the file is open
//! and vanish when it is closed or the process dies.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Read the disk's contents and get a consistent view (QEMU's `consistent read`).
pub const PERM_CONSISTENT_READ: u8 = 0x01;
/// Change the disk's contents.
pub const PERM_WRITE: u8 = 0x02;
/// Write without changing what the disk reads as.
pub const PERM_WRITE_UNCHANGED: u8 = 0x04;
/// Change the disk's size.
pub const PERM_RESIZE: u8 = 0x08;
/// Every permission.
pub const PERM_ALL: u8 = 0x0f;

const PERM_BASE: u64 = 100;
const SHARED_BASE: u64 = 200;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// What a holder of an image file uses and what it lets others use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockMode {
    /// `PERM_*` bits this holder uses.
    pub perm: u8,
    /// `PERM_*` bits others may use meanwhile.
    pub shared: u8,
}

impl LockMode {
    /// What QEMU's writers take: read, write and resize; others may read (and write
    /// unchanged data) but not write or resize.
    pub const WRITER: LockMode = LockMode {
        perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// What `qemu-img` takes to read an image (and what QEMU takes on backing files):
    /// nobody may write or resize it meanwhile.
    pub const READER: LockMode = LockMode {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// A reader that shares everything (QEMU's `force-share`, `qemu-img -U`).
    pub const SHARING_READER: LockMode = LockMode {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_ALL,
    };
}

/// Why a lock could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockConflict {
    /// Someone else refuses to share this permission, which we want.
    Wanted(&'static str),
    /// Someone else uses this permission, which we refuse to share.
    Unshared(&'static str),
}

impl std::fmt::Display for LockConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // QEMU's wording, so that users and scripts recognise it.
        match self {
            LockConflict::Wanted(name) => write!(f, "Failed to get \"{name}\" lock"),
            LockConflict::Unshared(name) => write!(f, "Failed to get shared \"{name}\" lock"),
        }
    }
}

/// The result of [`lock_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locked {
    /// The locks are held.
    Held,
    /// The file system has no open-file-description locks: nothing is held (QEMU's
    /// `locking=auto` goes on unlocked too).
    Unsupported,
}

fn flock(byte: u64, kind: libc::c_short) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

fn fcntl(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: fcntl with a valid descriptor and a pointer to a live flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// True when some other open file description holds a lock on `byte`.
fn held_by_others(file: &File, byte: u64) -> io::Result<bool> {
    let mut fl = flock(byte, libc::F_WRLCK as libc::c_short);
    fcntl(file, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes the locks of `mode` on `file` and checks nobody else's conflict with them.
/// `Ok(Err(conflict))` names the first conflict found; nothing stays locked then.
pub fn lock_file(file: &File, mode: LockMode) -> io::Result<Result<Locked, LockConflict>> {
    let result = apply_and_check(file, mode);
    if !matches!(result, Ok(Ok(Locked::Held))) {
        // Give back what was taken (only this open file description's locks).
        let mut fl = flock(PERM_BASE, libc::F_UNLCK as libc::c_short);
        fl.l_len = (SHARED_BASE + PERM_NAMES.len() as u64 - PERM_BASE) as libc::off_t;
        let _ = fcntl(file, libc::F_OFD_SETLK, &mut fl);
    }
    result
}

fn apply_and_check(file: &File, mode: LockMode) -> io::Result<Result<Locked, LockConflict>> {
    for (bit, _) in PERM_NAMES.iter().enumerate() {
        let mask = 1u8 << bit;
        let bytes = [
            (mode.perm & mask != 0, PERM_BASE),
            (mode.shared & mask == 0, SHARED_BASE),
        ];
        for (take, base) in bytes {
            if !take {
                continue;
            }
            let mut fl = flock(base + bit as u64, libc::F_RDLCK as libc::c_short);
            match fcntl(file, libc::F_OFD_SETLK, &mut fl) {
                Ok(()) => {}
                Err(e) if unsupported(&e) => return Ok(Ok(Locked::Unsupported)),
                // A write lock elsewhere (not QEMU's way, but someone's): a conflict.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                    return Ok(Err(if base == PERM_BASE {
                        LockConflict::Wanted(PERM_NAMES[bit])
                    } else {
                        LockConflict::Unshared(PERM_NAMES[bit])
                    }));
                }
                Err(e) => return Err(e),
            }
        }
    }
    for (bit, name) in PERM_NAMES.iter().enumerate() {
        let mask = 1u8 << bit;
        if mode.perm & mask != 0 && held_by_others(file, SHARED_BASE + bit as u64)? {
            return Ok(Err(LockConflict::Wanted(name)));
        }
        if mode.shared & mask == 0 && held_by_others(file, PERM_BASE + bit as u64)? {
            return Ok(Err(LockConflict::Unshared(name)));
        }
    }
    Ok(Ok(Locked::Held))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_opens(name: &str) -> (std::path::PathBuf, File, File) {
        let p = std::env::temp_dir().join(format!("cowdisk-lock-{}-{name}", std::process::id()));
        std::fs::write(&p, [0u8; 512]).unwrap();
        let a = File::open(&p).unwrap();
        let b = File::open(&p).unwrap();
        (p, a, b)
    }

    #[test]
    fn writers_exclude_writers_and_readers_but_not_sharing_readers() {
        let (p, a, b) = two_opens("rw");
        assert_eq!(lock_file(&a, LockMode::WRITER).unwrap(), Ok(Locked::Held));
        assert_eq!(
            lock_file(&b, LockMode::WRITER).unwrap(),
            Err(LockConflict::Wanted("write"))
        );
        let c = File::open(&p).unwrap();
        assert_eq!(
            lock_file(&c, LockMode::READER).unwrap(),
            Err(LockConflict::Unshared("write"))
        );
        let d = File::open(&p).unwrap();
        assert_eq!(
            lock_file(&d, LockMode::SHARING_READER).unwrap(),
            Ok(Locked::Held)
        );
        // The failed opens b and c hold nothing: once a is gone, readers get in.
        drop(a);
        let e = File::open(&p).unwrap();
        assert_eq!(lock_file(&e, LockMode::READER).unwrap(), Ok(Locked::Held));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn readers_share_and_keep_writers_out() {
        let (p, a, b) = two_opens("ro");
        assert_eq!(lock_file(&a, LockMode::READER).unwrap(), Ok(Locked::Held));
        assert_eq!(lock_file(&b, LockMode::READER).unwrap(), Ok(Locked::Held));
        let c = File::open(&p).unwrap();
        assert_eq!(
            lock_file(&c, LockMode::WRITER).unwrap(),
            Err(LockConflict::Wanted("write"))
        );
        std::fs::remove_file(&p).unwrap();
    }
}
