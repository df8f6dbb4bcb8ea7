//! The copy engine through the C ABI: convert, compare, commit and rebase, with a
//! progress callback that may cancel.

use std::ffi::{c_char, c_int, c_void};

use super::c_path;
use super::errors::guard;
use super::options::{c_secret, cowdisk_create_opts, create_options, opt_string, read_versioned};
use crate::convert::{
    self, CommitOptions, Comparison, ConvertOptions, Format, OpenSpec, RebaseOptions, Source,
};
use crate::error::{Error, Result};

/// Progress of a long call: `done` of `total` bytes. Called on the thread that made
/// the call (never on a worker thread), at least once at the start and once at the
/// end, with `done` never going backwards. Return 0 to go on, non-zero to cancel:
/// the call then stops its workers, does not call it again, and returns
/// `-ECANCELED` (non-zero on the last call, once everything is done, is too late to
/// cancel: the call succeeds).
pub type cowdisk_progress_fn =
    Option<unsafe extern "C" fn(opaque: *mut c_void, done: u64, total: u64) -> c_int>;

/// Write compressed clusters (qcow2 targets; `qemu-img convert -c`).
pub const COWDISK_CONVERT_COMPRESSED: u32 = 1;
/// Write chunks as soon as they are ready instead of in guest order (`-W`).
pub const COWDISK_CONVERT_OUT_OF_ORDER: u32 = 2;
/// Write into an existing target instead of creating it (`-n`).
pub const COWDISK_CONVERT_EXISTING_TARGET: u32 = 4;
/// The existing target already reads as zeros (`--target-is-zero`, with `-n`).
pub const COWDISK_CONVERT_TARGET_IS_ZERO: u32 = 8;
/// The source is a raw file (default: probed).
pub const COWDISK_CONVERT_SOURCE_RAW: u32 = 16;
/// The target is a raw file (default: qcow2).
pub const COWDISK_CONVERT_TARGET_RAW: u32 = 32;
/// Read the source with O_DIRECT (`-T none`).
pub const COWDISK_CONVERT_SOURCE_DIRECT: u32 = 64;
/// Write the target with O_DIRECT (`-t none`).
pub const COWDISK_CONVERT_TARGET_DIRECT: u32 = 128;
/// Open the source even while another process writes it (`-U`).
pub const COWDISK_CONVERT_FORCE_SHARE: u32 = 256;
/// No zero detection: every byte is copied as data (`-S 0`).
pub const COWDISK_CONVERT_NO_SPARSE: u32 = 512;
/// The source is a qcow2 image (default: probed).
pub const COWDISK_CONVERT_SOURCE_QCOW2: u32 = 1024;
/// Never flush the target (`-t unsafe`, qemu-img convert's default): the copy is not
/// durable when the call returns. Without it the target is flushed once at the end.
pub const COWDISK_CONVERT_TARGET_NO_FLUSH: u32 = 2048;
/// Carry the source's persistent dirty bitmaps into the qcow2 target (`--bitmaps`);
/// an inconsistent one fails the convert before anything is copied.
pub const COWDISK_CONVERT_BITMAPS: u32 = 4096;
/// With `COWDISK_CONVERT_BITMAPS`: leave inconsistent bitmaps out
/// (`--skip-broken-bitmaps`).
pub const COWDISK_CONVERT_SKIP_BROKEN_BITMAPS: u32 = 8192;

/// Options of `cowdisk_convert()`. Zero fields mean "default" (qemu-img's).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct cowdisk_convert_opts {
    /// Set to `sizeof(cowdisk_convert_opts)`.
    pub struct_size: u32,
    /// `COWDISK_CONVERT_*` flags.
    pub flags: u32,
    /// Worker threads, 1 to 16 (0 = 8).
    pub workers: u32,
    /// Reserved, set to 0.
    pub reserved: u32,
    /// Zero runs of at least this many bytes inside data are not written as data
    /// (0 = 4096; `COWDISK_CONVERT_NO_SPARSE` turns zero detection off).
    pub min_sparse: u64,
    /// Options of a new qcow2 target, or NULL for the defaults. Its backing file, if
    /// any, is used as `backing_file` below. Borrowed for the call only.
    pub create: *const cowdisk_create_opts,
    /// Id or name of an internal snapshot of the source to convert, or NULL.
    pub snapshot: *const c_char,
    /// Backing file of the new target (`-B`): only what the source's top image
    /// allocates is copied. NULL for none.
    pub backing_file: *const c_char,
    /// Format of `backing_file` ("qcow2" or "raw"; NULL = probe).
    pub backing_format: *const c_char,
    /// Progress callback, or NULL.
    pub progress: cowdisk_progress_fn,
    /// Passed to `progress`.
    pub opaque: *mut c_void,
    /// Passphrase bytes of an encrypted source (and of an encrypted existing target
    /// when `create->secret` is not set), or NULL. A new encrypted target takes its
    /// passphrase from `create`. Borrowed for the call only.
    pub secret: *const c_void,
    /// Length of `secret` in bytes.
    pub secret_len: usize,
}

/// Calls a C progress callback; non-zero means cancel.
fn c_progress(cb: cowdisk_progress_fn, opaque: *mut c_void) -> impl FnMut(u64, u64) -> bool {
    let opaque = opaque as usize;
    move |done, total| match cb {
        // SAFETY: the caller promised a valid function pointer and opaque value.
        Some(f) => unsafe { f(opaque as *mut c_void, done, total) == 0 },
        None => true,
    }
}

/// Converts C convert options (NULL = defaults).
///
/// # Safety
/// `opts` must be NULL or valid as documented on `cowdisk_convert_opts`.
unsafe fn convert_options(
    opts: *const cowdisk_convert_opts,
) -> Result<(ConvertOptions, cowdisk_progress_fn, *mut c_void)> {
    let mut out = ConvertOptions::default();
    let Some(c) = read_versioned(opts, "cowdisk_convert_opts")? else {
        return Ok((out, None, std::ptr::null_mut()));
    };
    let known = COWDISK_CONVERT_SKIP_BROKEN_BITMAPS * 2 - 1;
    if c.flags & !known != 0 {
        return Err(Error::InvalidArgument(format!(
            "unknown convert flags {:#x}",
            c.flags & !known
        )));
    }
    let flag = |f: u32| c.flags & f != 0;
    if flag(COWDISK_CONVERT_SOURCE_RAW) && flag(COWDISK_CONVERT_SOURCE_QCOW2) {
        return Err(Error::InvalidArgument(
            "COWDISK_CONVERT_SOURCE_RAW and COWDISK_CONVERT_SOURCE_QCOW2 exclude each other".into(),
        ));
    }
    out.source = OpenSpec {
        format: if flag(COWDISK_CONVERT_SOURCE_RAW) {
            Some(Format::Raw)
        } else if flag(COWDISK_CONVERT_SOURCE_QCOW2) {
            Some(Format::Qcow2)
        } else {
            None
        },
        direct: flag(COWDISK_CONVERT_SOURCE_DIRECT),
        snapshot: opt_string(c.snapshot, "snapshot")?,
        force_share: flag(COWDISK_CONVERT_FORCE_SHARE),
        no_flush: false,
        secret: c_secret(c.secret, c.secret_len)?,
    };
    out.target_format = if flag(COWDISK_CONVERT_TARGET_RAW) {
        Format::Raw
    } else {
        Format::Qcow2
    };
    out.create = create_options(c.create)?;
    if out.create.secret.is_none() && flag(COWDISK_CONVERT_EXISTING_TARGET) {
        out.create.secret = out.source.secret.clone();
    }
    if let Some(b) = opt_string(c.backing_file, "backing_file")? {
        out.create.backing_file = Some(b);
    }
    if let Some(f) = opt_string(c.backing_format, "backing_format")? {
        out.create.backing_format = Some(f);
    }
    out.existing_target = flag(COWDISK_CONVERT_EXISTING_TARGET);
    out.target_is_zero = flag(COWDISK_CONVERT_TARGET_IS_ZERO);
    out.target_direct = flag(COWDISK_CONVERT_TARGET_DIRECT);
    out.target_no_flush = flag(COWDISK_CONVERT_TARGET_NO_FLUSH);
    out.compressed = flag(COWDISK_CONVERT_COMPRESSED);
    out.out_of_order = flag(COWDISK_CONVERT_OUT_OF_ORDER);
    out.bitmaps = flag(COWDISK_CONVERT_BITMAPS);
    out.skip_broken_bitmaps = flag(COWDISK_CONVERT_SKIP_BROKEN_BITMAPS);
    if c.workers != 0 {
        out.workers = c.workers as usize;
    }
    out.min_sparse = if flag(COWDISK_CONVERT_NO_SPARSE) {
        0
    } else if c.min_sparse != 0 {
        c.min_sparse
    } else {
        convert::DEFAULT_MIN_SPARSE
    };
    Ok((out, c.progress, c.opaque))
}

/// Converts the image at `src` (qcow2 with its backing chain, or raw) into `dst`, as
/// `qemu-img convert` does: N workers read in parallel, zero runs are skipped or
/// written as zeros, writes reach the target in guest order unless
/// `COWDISK_CONVERT_OUT_OF_ORDER`, and the target is flushed once at the end.
///
/// A new target (the default) replaces any file at `dst`; a failed or cancelled
/// convert removes it. An existing target (`COWDISK_CONVERT_EXISTING_TARGET`) keeps
/// what was written before a failure, and the message says so.
///
/// Errors: `-ECANCELED` when the progress callback asked to stop, `-EINVAL` for bad
/// options, `-EBUSY` when another process holds an image, host errors (`-ENOSPC`,
/// `-EIO`, ...) as their errno; the message names what failed. Thread-safe: several
/// converts may run at once on different files.
///
/// # Safety
/// `src` and `dst` must be valid NUL-terminated strings, `opts` NULL or valid (its
/// callback, if any, callable with its `opaque` until the call returns).
#[no_mangle]
pub unsafe extern "C" fn cowdisk_convert(
    src: *const c_char,
    dst: *const c_char,
    opts: *const cowdisk_convert_opts,
) -> c_int {
    guard("cowdisk_convert", || {
        let src = c_path(src, "src")?;
        let dst = c_path(dst, "dst")?;
        let (opts, cb, opaque) = convert_options(opts)?;
        let mut progress = c_progress(cb, opaque);
        convert::convert(&src, &dst, &opts, Some(&mut progress)).map(|_| ())
    })
}

/// A size difference is a difference (`qemu-img compare -s`).
pub const COWDISK_COMPARE_STRICT: u32 = 1;
/// The first image is raw (default: probed).
pub const COWDISK_COMPARE_FIRST_RAW: u32 = 2;
/// The second image is raw (default: probed).
pub const COWDISK_COMPARE_SECOND_RAW: u32 = 4;
/// Open the images even while other processes write them (`-U`).
pub const COWDISK_COMPARE_FORCE_SHARE: u32 = 8;

/// Compares what the images at `a` and `b` read (qcow2 with their chains, or raw),
/// reading both in parallel. Returns 0 when identical (the larger image's extra part
/// reads as zeros), 1 when they differ — `*mismatch` (if not NULL) is then the offset
/// of the 512-byte sector holding the first difference, as `qemu-img compare`
/// reports it, or the smaller size in strict mode when the sizes differ — or a
/// negative errno. Thread-safe.
///
/// # Safety
/// `a` and `b` must be valid NUL-terminated strings; `mismatch` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_compare(
    a: *const c_char,
    b: *const c_char,
    flags: u32,
    mismatch: *mut u64,
) -> c_int {
    let mut outcome = 0;
    let rc = guard("cowdisk_compare", || {
        let known = COWDISK_COMPARE_FORCE_SHARE * 2 - 1;
        if flags & !known != 0 {
            return Err(Error::InvalidArgument(format!(
                "unknown compare flags {:#x}",
                flags & !known
            )));
        }
        let spec = |raw: u32| OpenSpec {
            format: (flags & raw != 0).then_some(Format::Raw),
            force_share: flags & COWDISK_COMPARE_FORCE_SHARE != 0,
            ..OpenSpec::default()
        };
        let a = Source::open(&c_path(a, "a")?, &spec(COWDISK_COMPARE_FIRST_RAW))?;
        let b = Source::open(&c_path(b, "b")?, &spec(COWDISK_COMPARE_SECOND_RAW))?;
        let r = convert::compare_sources(
            a.into(),
            b.into(),
            flags & COWDISK_COMPARE_STRICT != 0,
            convert::DEFAULT_WORKERS,
        )?;
        let at = match r {
            Comparison::Identical => None,
            Comparison::Differ { offset } => Some(offset),
            Comparison::SizeMismatch { first, second } => Some(first.min(second)),
        };
        if let Some(at) = at {
            outcome = 1;
            if !mismatch.is_null() {
                *mismatch = at;
            }
        }
        Ok(())
    });
    if rc < 0 {
        rc
    } else {
        outcome
    }
}

/// Keep the top image's data after a commit (`qemu-img commit -d`).
pub const COWDISK_COMMIT_KEEP: u32 = 1;

/// Commits the image at `path` into `base` (NULL: its backing file), as `qemu-img
/// commit` does: what the layers above the base allocate is copied into it, the base
/// is flushed, and then — when `base` is NULL and without `COWDISK_COMMIT_KEEP` —
/// the image is emptied so it reads through its backing file. `progress` (may be
/// NULL) is called on this thread and may cancel (`-ECANCELED`; the base keeps what
/// was written, which the top still holds too).
///
/// Errors: `-EINVAL` when there is no backing file or `base` is not in the chain,
/// `-EBUSY` when another process holds an image, host errors as their errno.
///
/// # Safety
/// `path` must be a valid NUL-terminated string, `base` NULL or one; `progress`
/// NULL or callable with `opaque`.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_commit(
    path: *const c_char,
    base: *const c_char,
    flags: u32,
    progress: cowdisk_progress_fn,
    opaque: *mut c_void,
) -> c_int {
    guard("cowdisk_commit", || {
        if flags & !COWDISK_COMMIT_KEEP != 0 {
            return Err(Error::InvalidArgument(format!(
                "unknown commit flags {:#x}",
                flags & !COWDISK_COMMIT_KEEP
            )));
        }
        let path = c_path(path, "path")?;
        let base = opt_string(base, "base")?.map(std::path::PathBuf::from);
        let opts = CommitOptions {
            base,
            keep_top: flags & COWDISK_COMMIT_KEEP != 0,
            workers: 0,
            secret: None,
        };
        let mut cb = c_progress(progress, opaque);
        convert::commit(&path, &opts, Some(&mut cb)).map(|_| ())
    })
}

/// Only change the backing file name, copying nothing (`qemu-img rebase -u`).
pub const COWDISK_REBASE_UNSAFE: u32 = 1;

/// Rebases the image at `path` onto `backing` (NULL or "": no backing file; relative
/// names resolve against the image's folder; `backing_format` "qcow2", "raw" or NULL
/// to probe), as `qemu-img rebase` does: every cluster the image does not allocate
/// itself that reads differently through the new backing file is written into the
/// image first, then the header names the new file. `COWDISK_REBASE_UNSAFE` only
/// renames. `progress` (may be NULL) is called on this thread and may cancel
/// (`-ECANCELED`: the image still names its old backing file and reads as before).
///
/// # Safety
/// `path` must be a valid NUL-terminated string, `backing` and `backing_format` NULL
/// or valid strings; `progress` NULL or callable with `opaque`.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_rebase(
    path: *const c_char,
    backing: *const c_char,
    backing_format: *const c_char,
    flags: u32,
    progress: cowdisk_progress_fn,
    opaque: *mut c_void,
) -> c_int {
    guard("cowdisk_rebase", || {
        if flags & !COWDISK_REBASE_UNSAFE != 0 {
            return Err(Error::InvalidArgument(format!(
                "unknown rebase flags {:#x}",
                flags & !COWDISK_REBASE_UNSAFE
            )));
        }
        let path = c_path(path, "path")?;
        let opts = RebaseOptions {
            backing_file: opt_string(backing, "backing")?,
            backing_format: opt_string(backing_format, "backing_format")?,
            unsafe_mode: flags & COWDISK_REBASE_UNSAFE != 0,
            force_share: false,
            workers: 0,
            secret: None,
        };
        let mut cb = c_progress(progress, opaque);
        convert::rebase(&path, &opts, Some(&mut cb)).map(|_| ())
    })
}
