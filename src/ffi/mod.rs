//! The stable C ABI: `libcowdisk.so` / `libcowdisk.a`, header `include/cowdisk.h`.
//!
//! Conventions for every function here:
//! - 0 on success, a negative errno on failure; the failure's message is kept per thread
//!   and returned by `cowdisk_last_error()`.
//! - Out-pointers are written only on success.
//! - A NULL handle, path or buffer is an error (`-EINVAL`), never a crash.
//! - No panic crosses the boundary: a panic becomes `-EIO` with a message, and the handle
//!   whose lock was held refuses further writes.
//! - Option and info structs begin with `struct_size`, which the caller sets to
//!   `sizeof(the struct)`; fields are only ever appended, so old callers keep working.
#![allow(non_camel_case_types)]

mod bitmap;
mod check;
mod compress;
mod convert;
mod errors;
mod options;
mod records;
mod snapshot;

use std::ffi::{c_char, c_int, CStr};
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::image::Image;

pub use bitmap::{
    cowdisk_bitmap_add, cowdisk_bitmap_clear, cowdisk_bitmap_enable, cowdisk_bitmap_extents,
    cowdisk_bitmap_info, cowdisk_bitmap_list, cowdisk_bitmap_merge, cowdisk_bitmap_remove,
    COWDISK_BITMAP_ADD_DISABLED, COWDISK_BITMAP_ENABLED, COWDISK_BITMAP_INCONSISTENT,
};
pub use check::{
    cowdisk_amend, cowdisk_amend_opts, cowdisk_check, cowdisk_check_result,
    COWDISK_CHECK_REPAIR_ALL, COWDISK_CHECK_REPAIR_LEAKS,
};
pub use compress::cowdisk_pwrite_compressed;
pub use convert::{
    cowdisk_commit, cowdisk_compare, cowdisk_convert, cowdisk_convert_opts, cowdisk_progress_fn,
    cowdisk_rebase, COWDISK_COMMIT_KEEP, COWDISK_COMPARE_FIRST_RAW, COWDISK_COMPARE_FORCE_SHARE,
    COWDISK_COMPARE_SECOND_RAW, COWDISK_COMPARE_STRICT, COWDISK_CONVERT_COMPRESSED,
    COWDISK_CONVERT_EXISTING_TARGET, COWDISK_CONVERT_FORCE_SHARE, COWDISK_CONVERT_NO_SPARSE,
    COWDISK_CONVERT_OUT_OF_ORDER, COWDISK_CONVERT_SOURCE_DIRECT, COWDISK_CONVERT_SOURCE_QCOW2,
    COWDISK_CONVERT_SOURCE_RAW, COWDISK_CONVERT_TARGET_DIRECT, COWDISK_CONVERT_TARGET_IS_ZERO,
    COWDISK_CONVERT_TARGET_NO_FLUSH, COWDISK_CONVERT_TARGET_RAW, COWDISK_REBASE_UNSAFE,
};
pub use errors::{cowdisk_last_error, cowdisk_strerror, cowdisk_version};
pub use options::{cowdisk_create_opts, cowdisk_info, cowdisk_open_opts};
pub use snapshot::{
    cowdisk_finalize_vmstate, cowdisk_load_vmstate, cowdisk_save_vmstate, cowdisk_snapshot_create,
    cowdisk_snapshot_delete, cowdisk_snapshot_goto, cowdisk_snapshot_info, cowdisk_snapshot_list,
    cowdisk_snapshot_opts,
};

use errors::{guard, guard_handle};

/// Open with no writes allowed (`cowdisk_open_opts.flags`).
pub const COWDISK_OPEN_READONLY: u32 = 1;
/// Open the image file with O_DIRECT, bypassing the host page cache.
pub const COWDISK_OPEN_DIRECT: u32 = 2;
/// Refuse to open backing files named inside the image; reads of unallocated
/// clusters then fail with `-ENOTSUP` instead of reaching an unopened backing file.
pub const COWDISK_OPEN_NO_BACKING: u32 = 4;

/// Punch freed clusters out of the image file (QEMU's `discard=unmap`).
pub const COWDISK_OPEN_DISCARD_UNMAP: u32 = 8;
/// Write each compressed cluster on its own instead of gathering them into whole host
/// clusters in the compressed-write cache (`cowdisk_open_opts.compressed_cache_size`).
pub const COWDISK_OPEN_NO_COMPRESSED_CACHE: u32 = 16;
/// With `COWDISK_OPEN_READONLY`: open even while another process writes the image
/// (QEMU's `force-share`, `qemu-img -U`); what is read may then be inconsistent.
/// Without `COWDISK_OPEN_READONLY` the open fails with `-EINVAL`.
pub const COWDISK_OPEN_FORCE_SHARE: u32 = 32;
/// Take no locks on the image file and its backing files (QEMU's `locking=off`), for
/// callers that coordinate access to the image themselves.
pub const COWDISK_OPEN_NO_LOCK: u32 = 64;
/// Open to check and repair (`cowdisk_check()`), as `qemu-img check` opens: an image
/// marked corrupt opens read-write (writes other than repairs fail until a repair
/// leaves nothing to fix), and a dirty lazy-refcounts image is not rebuilt on open.
pub const COWDISK_OPEN_CHECK: u32 = 128;
/// Open for metadata only: an encrypted image opens without its passphrase (for
/// `cowdisk_get_info`, `cowdisk_check`, `cowdisk_block_status`); reads and writes
/// of its data then fail with `-ENOKEY`.
pub const COWDISK_OPEN_METADATA_ONLY: u32 = 256;
/// Read-write opens of an image whose persistent dirty bitmaps cannot be kept (an
/// unknown bitmap type or flag, a damaged bitmap directory): open anyway and give the
/// bitmaps up, as a program without bitmap support would (their clusters leak until
/// `cowdisk_check()` repairs leaks). Without it such an open fails with the reason.
pub const COWDISK_OPEN_DROP_BITMAPS: u32 = 512;

/// `cowdisk_create_opts.encrypt_format` and `cowdisk_info.encrypt_format`: not
/// encrypted.
pub const COWDISK_ENCRYPT_NONE: u32 = 0;
/// Legacy qcow AES-CBC (crypt method 1), weak and deprecated by QEMU: only when asked
/// for explicitly.
pub const COWDISK_ENCRYPT_AES: u32 = 1;
/// LUKS1 (crypt method 2), QEMU's encryption for qcow2.
pub const COWDISK_ENCRYPT_LUKS: u32 = 2;

/// `cowdisk_create_opts.compression_type` and `cowdisk_info.compression_type`: zlib
/// (deflate), readable by every qcow2 implementation.
pub const COWDISK_COMPRESSION_ZLIB: u32 = 0;
/// zstd (a v3 image with the compression-type header field; QEMU 5.1 and later).
pub const COWDISK_COMPRESSION_ZSTD: u32 = 1;

/// Create with lazy refcounts (`cowdisk_create_opts.flags`, v3 only).
pub const COWDISK_CREATE_LAZY_REFCOUNTS: u32 = 1;
/// Do not open the backing file (`qemu-img create -u`): `backing_format` and a
/// non-zero size are then required (`cowdisk_create_opts.flags`).
pub const COWDISK_CREATE_NO_BACKING_CHECK: u32 = 2;

/// `cowdisk_info.flags`: the handle is read-only.
pub const COWDISK_INFO_READONLY: u32 = 1;
/// `cowdisk_info.flags`: the image has lazy refcounts enabled.
pub const COWDISK_INFO_LAZY_REFCOUNTS: u32 = 2;
/// `cowdisk_info.flags`: the image's dirty bit is set.
pub const COWDISK_INFO_DIRTY: u32 = 4;
/// `cowdisk_info.flags`: the image is marked corrupt.
pub const COWDISK_INFO_CORRUPT: u32 = 8;

/// An open qcow2 image. Opaque; created by `cowdisk_open()`, freed by `cowdisk_close()`.
///
/// Thread-safety: every function taking a `cowdisk *` may be called from any number of
/// threads at once on the same handle, except `cowdisk_close`, which must be the last call.
/// Reads and writes from different threads do their data I/O in parallel. As on a disk,
/// concurrent writes to the same bytes land in an unspecified order, and a read racing a
/// write of the same bytes sees the old or the new data of each cluster, never anything
/// else.
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
/// The handle is owned by the caller and must be released with `cowdisk_close()`.
///
/// The image file is locked as QEMU locks it, for as long as the handle lives: a
/// read-write open fails with `-EBUSY` while another process (QEMU or cowdisk) has the
/// image open, and keeps others from writing it or opening it read-only without
/// force-share; a read-only open fails with `-EBUSY` while another process writes the
/// image, unless `COWDISK_OPEN_FORCE_SHARE`. Backing files are locked as read-only
/// opens. The message names the conflict in QEMU's words. `COWDISK_OPEN_NO_LOCK`
/// turns locking off.
///
/// Errors: `-ENOENT` and other host errors, `-EBUSY` (see above), `-EINVAL` for a file
/// that is not qcow2, `-ENOTSUP` for features cowdisk does not implement (named in the
/// message), `-EIO` for corrupt metadata. On failure `*out` is untouched and nothing on
/// disk changed.
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
/// The handle is freed even when the flush fails; it must not be used afterwards (to
/// retry a flush that fails for lack of space, call `cowdisk_flush()` first).
/// NULL is `-EINVAL`. Not to be called while other threads still use the handle.
///
/// # Safety
/// `img` must be NULL or a handle from `cowdisk_open()` not yet closed.
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
/// gives `-EROFS`. A host failure (`-EIO`, `-ENOSPC`) leaves the range undefined and
/// the handle usable: retry the same write once the cause is gone. The data is durable
/// only after `cowdisk_flush()` or `cowdisk_close()`. Thread-safe.
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
/// A failed metadata write (`-EIO`, `-ENOSPC`) is retried by the next flush. Once
/// flushing the image file itself has failed, this call keeps failing with `-EIO` (the
/// kernel may have dropped written data; a later success would overstate durability)
/// and writes are refused until the image is reopened.
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

/// `cowdisk_write_zeroes` flag: whole clusters may release their host clusters.
pub const COWDISK_ZEROES_MAY_UNMAP: u32 = 1;

/// `cowdisk_resize_ex` flag: shrink even when data is allocated past the new end
/// (that data is discarded).
pub const COWDISK_RESIZE_FORCE: u32 = 1;

/// `cowdisk_extent.flags`: the bytes are stored as data.
pub const COWDISK_EXTENT_DATA: u32 = 1;
/// `cowdisk_extent.flags`: the bytes read as zeros.
pub const COWDISK_EXTENT_ZERO: u32 = 2;
/// `cowdisk_extent.flags`: some layer of the chain allocates the bytes.
pub const COWDISK_EXTENT_PRESENT: u32 = 4;
/// `cowdisk_extent.flags`: the bytes are in a compressed cluster.
pub const COWDISK_EXTENT_COMPRESSED: u32 = 8;
/// `cowdisk_extent.flags`: `offset` holds a host offset in the file of layer `depth`.
pub const COWDISK_EXTENT_OFFSET_VALID: u32 = 16;
/// `cowdisk_extent.flags`, from `cowdisk_bitmap_extents()` only: the bytes changed
/// since the bitmap was added or cleared (a clean run has flags 0).
pub const COWDISK_EXTENT_DIRTY: u32 = 32;

/// One run of guest bytes with the same status, filled by `cowdisk_block_status()`
/// (and by `cowdisk_bitmap_extents()`: dirty or clean).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct cowdisk_extent {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Host offset in the file of layer `depth` (valid with `COWDISK_EXTENT_OFFSET_VALID`).
    pub offset: u64,
    /// `COWDISK_EXTENT_*` flags.
    pub flags: u32,
    /// Layer of the backing chain that decides the bytes (0 = this image).
    pub depth: u32,
}

/// Makes guest `[offset, offset+len)` read as zeros in this image, whatever its
/// backing chain holds now or later.
///
/// Whole clusters become zero clusters (v3); with `COWDISK_ZEROES_MAY_UNMAP` their host
/// clusters are released. Unaligned heads and tails allocate nothing when the rest of
/// their cluster already reads as zero; otherwise zeros are written as data. On v2
/// images without a backing file, clusters are deallocated instead.
///
/// Errors: `-EINVAL` out of range or unknown flags, `-EROFS` read-only, host errors
/// (the range is then undefined; retry once the cause is gone). Thread-safe.
///
/// # Safety
/// `img` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_write_zeroes(
    img: *mut cowdisk,
    offset: u64,
    len: u64,
    flags: u32,
) -> c_int {
    guard_handle("cowdisk_write_zeroes", img, |h| {
        if flags & !COWDISK_ZEROES_MAY_UNMAP != 0 {
            return Err(Error::InvalidArgument(format!(
                "unknown write_zeroes flags {:#x}",
                flags & !COWDISK_ZEROES_MAY_UNMAP
            )));
        }
        h.image
            .write_zeroes(offset, len, flags & COWDISK_ZEROES_MAY_UNMAP != 0)
    })
}

/// Releases the whole clusters of guest `[offset, offset+len)`; partial clusters at
/// the edges are left unchanged.
///
/// Afterwards the released clusters read as zeros (on a v2 image with a backing file:
/// as the backing file). Freed host clusters are reused by later writes, and punched
/// out of the file when the image was opened with `COWDISK_OPEN_DISCARD_UNMAP`.
///
/// Errors: `-EINVAL` out of range, `-EROFS` read-only, host errors (the range is then
/// undefined; retry once the cause is gone). Thread-safe.
///
/// # Safety
/// `img` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_discard(img: *mut cowdisk, offset: u64, len: u64) -> c_int {
    guard_handle("cowdisk_discard", img, |h| h.image.discard(offset, len))
}

/// Changes the virtual size to `new_size` (a multiple of 512).
///
/// Growing always works and the new bytes read as zeros. Shrinking fails with
/// `-EINVAL` when data is allocated past the new end (see `cowdisk_resize_ex()` to
/// force it) and with `-ENOTSUP` when the image has internal snapshots. Thread-safe.
///
/// # Safety
/// `img` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_resize(img: *mut cowdisk, new_size: u64) -> c_int {
    guard_handle("cowdisk_resize", img, |h| h.image.resize(new_size, false))
}

/// Like `cowdisk_resize()`, with `COWDISK_RESIZE_FORCE` to shrink over allocated data
/// (which is discarded). Thread-safe.
///
/// # Safety
/// `img` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_resize_ex(img: *mut cowdisk, new_size: u64, flags: u32) -> c_int {
    guard_handle("cowdisk_resize_ex", img, |h| {
        if flags & !COWDISK_RESIZE_FORCE != 0 {
            return Err(Error::InvalidArgument(format!(
                "unknown resize flags {:#x}",
                flags & !COWDISK_RESIZE_FORCE
            )));
        }
        h.image.resize(new_size, flags & COWDISK_RESIZE_FORCE != 0)
    })
}

/// Describes guest `[offset, offset+len)` (clamped to the virtual size) as extents of
/// equal status through the whole backing chain, like `qemu-img map`.
///
/// Writes at most `max_extents` extents to `extents` and their number to `*count`.
/// The extents start at `offset` and are contiguous; when they end before
/// `offset + len`, call again from the end of the last one. `*count` is 0 only when
/// `offset` is the virtual size.
///
/// Errors: `-EINVAL` for NULL pointers, `max_extents == 0` or `offset` past the end.
/// Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `extents` valid for `max_extents` elements; `count`
/// a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_block_status(
    img: *mut cowdisk,
    offset: u64,
    len: u64,
    extents: *mut cowdisk_extent,
    max_extents: usize,
    count: *mut usize,
) -> c_int {
    guard_handle("cowdisk_block_status", img, |h| {
        if extents.is_null() || count.is_null() || max_extents == 0 {
            return Err(Error::InvalidArgument(
                "extents and count must be non-NULL and max_extents > 0".into(),
            ));
        }
        let found = h.image.block_status(offset, len, max_extents)?;
        for (i, e) in found.iter().enumerate() {
            let mut flags = 0;
            if e.data {
                flags |= COWDISK_EXTENT_DATA;
            }
            if e.zero {
                flags |= COWDISK_EXTENT_ZERO;
            }
            if e.present {
                flags |= COWDISK_EXTENT_PRESENT;
            }
            if e.compressed {
                flags |= COWDISK_EXTENT_COMPRESSED;
            }
            if e.offset.is_some() {
                flags |= COWDISK_EXTENT_OFFSET_VALID;
            }
            *extents.add(i) = cowdisk_extent {
                start: e.start,
                length: e.length,
                offset: e.offset.unwrap_or(0),
                flags,
                depth: e.depth,
            };
        }
        *count = found.len();
        Ok(())
    })
}
