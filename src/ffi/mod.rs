//! The stable C ABI: `libcowdisk.so` / `libcowdisk.a`, header `include/cowdisk.h`.
//!
//! Conventions for every function here:
//! - 0 on success, a negative errno on failure; the failure's message is kept per thread
//!   and returned by [`cowdisk_last_error`].
//! - Out-pointers are written only on success.
//! - A NULL handle, path or buffer is an error (`-EINVAL`), never a crash.
//! - No panic crosses the boundary: a panic becomes `-EIO` with a message, and the handle
//!   whose lock was held refuses further writes.
//! - Option and info structs begin with `struct_size`, which the caller sets to
//!   `sizeof(the struct)`; fields are only ever appended, so old callers keep working.
#![allow(non_camel_case_types)]

mod errors;
mod options;

use std::ffi::{c_char, c_int, CStr};
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::image::Image;

pub use errors::{cowdisk_last_error, cowdisk_strerror, cowdisk_version};
pub use options::{cowdisk_create_opts, cowdisk_info, cowdisk_open_opts};

use errors::{guard, guard_handle};

/// Open with no writes allowed (`cowdisk_open_opts.flags`).
pub const COWDISK_OPEN_READONLY: u32 = 1;
/// Open the image file with O_DIRECT, bypassing the host page cache.
pub const COWDISK_OPEN_DIRECT: u32 = 2;
/// Refuse to open backing files named inside the image; reads of unallocated
/// clusters then fail with `-ENOTSUP` instead of reaching an unopened backing file.
pub const COWDISK_OPEN_NO_BACKING: u32 = 4;

/// Create with lazy refcounts (`cowdisk_create_opts.flags`, v3 only).
pub const COWDISK_CREATE_LAZY_REFCOUNTS: u32 = 1;

/// `cowdisk_info.flags`: the handle is read-only.
pub const COWDISK_INFO_READONLY: u32 = 1;
/// `cowdisk_info.flags`: the image has lazy refcounts enabled.
pub const COWDISK_INFO_LAZY_REFCOUNTS: u32 = 2;
/// `cowdisk_info.flags`: the image's dirty bit is set.
pub const COWDISK_INFO_DIRTY: u32 = 4;
/// `cowdisk_info.flags`: the image is marked corrupt.
pub const COWDISK_INFO_CORRUPT: u32 = 8;

/// An open qcow2 image. Opaque; created by [`cowdisk_open`], freed by [`cowdisk_close`].
///
/// Thread-safety: every function taking a `cowdisk *` may be called from any number of
/// threads at once on the same handle, except `cowdisk_close`, which must be the last call.
pub struct cowdisk {
    image: Image,
}

/// Converts a C path to a `PathBuf`, rejecting NULL.
///
/// # Safety
/// `path` must be NULL or a valid NUL-terminated string.
unsafe fn c_path(path: *const c_char, what: &str) -> Result<PathBuf> {
    if path.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    let bytes = CStr::from_ptr(path).to_bytes();
    if bytes.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is empty")));
    }
    use std::os::unix::ffi::OsStrExt;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
}

/// Creates a new qcow2 image of `size` bytes at `path` (which must not exist yet).
///
/// `opts` may be NULL for QEMU's defaults: version 3, 64 KiB clusters, 16-bit refcounts,
/// no backing file. When `opts->backing_file` is set and `size` is 0, the backing
/// file's size is used.
///
/// Errors: `-EEXIST` when the path exists, `-EINVAL` for bad options, host errors as
/// their errno. Thread-safe (touches no shared state).
///
/// # Safety
/// `path` must be a valid NUL-terminated string; `opts` NULL or a valid pointer whose
/// `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_create(
    path: *const c_char,
    size: u64,
    opts: *const cowdisk_create_opts,
) -> c_int {
    guard("cowdisk_create", || {
        let path = c_path(path, "path")?;
        let opts = options::create_options(opts)?;
        Image::create(&path, size, &opts)
    })
}

/// Opens the qcow2 image at `path` and stores a new handle in `*out`.
///
/// `opts` may be NULL: read-write, buffered I/O, backing files followed (as QEMU does).
/// The handle is owned by the caller and must be released with [`cowdisk_close`].
///
/// Errors: `-ENOENT` and other host errors, `-EINVAL` for a file that is not qcow2,
/// `-ENOTSUP` for features cowdisk does not implement (named in the message), `-EIO` for
/// corrupt metadata. On failure `*out` is untouched and nothing on disk changed.
///
/// # Safety
/// `path` must be a valid NUL-terminated string, `opts` NULL or valid, `out` a valid
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_open(
    path: *const c_char,
    opts: *const cowdisk_open_opts,
    out: *mut *mut cowdisk,
) -> c_int {
    guard("cowdisk_open", || {
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        let path = c_path(path, "path")?;
        let opts = options::open_options(opts)?;
        let image = Image::open(&path, &opts)?;
        *out = Box::into_raw(Box::new(cowdisk { image }));
        Ok(())
    })
}

/// Flushes the image, frees the handle and returns the flush status.
///
/// The handle is freed even when the flush fails; it must not be used afterwards.
/// NULL is `-EINVAL`. Not to be called while other threads still use the handle.
///
/// # Safety
/// `img` must be NULL or a handle from [`cowdisk_open`] not yet closed.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_close(img: *mut cowdisk) -> c_int {
    guard("cowdisk_close", || {
        if img.is_null() {
            return Err(Error::InvalidArgument("image handle is NULL".into()));
        }
        let handle = Box::from_raw(img);
        handle.image.close()
    })
}

/// Reads `len` bytes at guest `offset` into `buf`.
///
/// The range must lie within the virtual size (`-EINVAL` otherwise). Unallocated
/// clusters read from the backing chain, or as zeros. Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `buf` must be valid for `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_pread(
    img: *mut cowdisk,
    buf: *mut std::ffi::c_void,
    len: usize,
    offset: u64,
) -> c_int {
    guard_handle("cowdisk_pread", img, |h| {
        if buf.is_null() && len > 0 {
            return Err(Error::InvalidArgument("buffer is NULL".into()));
        }
        if len == 0 {
            return h.image.read_at(&mut [], offset);
        }
        let data = std::slice::from_raw_parts_mut(buf as *mut u8, len);
        h.image.read_at(data, offset)
    })
}

/// Writes `len` bytes from `buf` at guest `offset`.
///
/// The range must lie within the virtual size (`-EINVAL` otherwise); a read-only handle
/// gives `-EROFS`. On failure the old contents of the range stay readable. The data is
/// durable only after [`cowdisk_flush`] or [`cowdisk_close`]. Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `buf` must be valid for `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_pwrite(
    img: *mut cowdisk,
    buf: *const std::ffi::c_void,
    len: usize,
    offset: u64,
) -> c_int {
    guard_handle("cowdisk_pwrite", img, |h| {
        if buf.is_null() && len > 0 {
            return Err(Error::InvalidArgument("buffer is NULL".into()));
        }
        if len == 0 {
            return h.image.write_at(&[], offset);
        }
        let data = std::slice::from_raw_parts(buf as *const u8, len);
        h.image.write_at(data, offset)
    })
}

/// Makes everything written so far durable on the host storage. Thread-safe.
///
/// # Safety
/// `img` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_flush(img: *mut cowdisk) -> c_int {
    guard_handle("cowdisk_flush", img, |h| h.image.flush())
}

/// Fills `*out` with facts about the image: version, sizes, flags, backing file.
///
/// The caller sets `out->struct_size = sizeof(cowdisk_info)`; only that many bytes are
/// written. Strings are NUL-terminated and truncated to their arrays. Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `out` a valid pointer whose `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_get_info(img: *mut cowdisk, out: *mut cowdisk_info) -> c_int {
    guard_handle("cowdisk_get_info", img, |h| {
        options::write_info(&h.image.info(), out)
    })
}
