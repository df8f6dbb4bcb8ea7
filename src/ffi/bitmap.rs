//! Persistent dirty bitmaps through the C ABI (QEMU's qcow2 `bitmaps` extension, as
//! `qemu-img bitmap` manages them).
//!
//! Changes made through these calls (and the bits set by writes) live in memory and are
//! stored in the image by `cowdisk_close()`.

use std::ffi::{c_char, c_int};

use super::errors::guard_handle;
use super::snapshot::{c_str, copy_c_string};
use super::{cowdisk, cowdisk_extent, COWDISK_EXTENT_DIRTY};
use crate::error::Error;
use crate::image::BitmapInfo;

/// `cowdisk_bitmap_info.flags`: writes set the bitmap's bits (QEMU's `auto` flag).
pub const COWDISK_BITMAP_ENABLED: u32 = 1;
/// `cowdisk_bitmap_info.flags`: the bitmap was marked in use when the image was opened
/// (a crash, or another program has the image open): its bits cannot be trusted, it is
/// kept as it is on disk, and it can only be removed.
pub const COWDISK_BITMAP_INCONSISTENT: u32 = 2;

/// `cowdisk_bitmap_add` flag: create the bitmap disabled (writes do not set its bits
/// until `cowdisk_bitmap_enable()`), like `qemu-img bitmap --add --disable`.
pub const COWDISK_BITMAP_ADD_DISABLED: u32 = 1;

/// One persistent dirty bitmap, filled by [`cowdisk_bitmap_list`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct cowdisk_bitmap_info {
    /// Set by the caller (in the first array element) to `sizeof(cowdisk_bitmap_info)`.
    pub struct_size: u32,
    /// `COWDISK_BITMAP_ENABLED`, `COWDISK_BITMAP_INCONSISTENT`.
    pub flags: u32,
    /// Bytes of guest data one bit covers.
    pub granularity: u64,
    /// Bytes covered by set bits (0 for an inconsistent bitmap, whose bits are not read).
    pub dirty_bytes: u64,
    /// Name, unique in the image, NUL-terminated (names are at most 1023 bytes).
    pub name: [c_char; 1024],
}

fn to_c_info(b: &BitmapInfo, struct_size: u32) -> cowdisk_bitmap_info {
    // SAFETY: the struct is plain data; all-zero is valid.
    let mut c: cowdisk_bitmap_info = unsafe { std::mem::zeroed() };
    c.struct_size = struct_size;
    if b.enabled {
        c.flags |= COWDISK_BITMAP_ENABLED;
    }
    if b.inconsistent {
        c.flags |= COWDISK_BITMAP_INCONSISTENT;
    }
    c.granularity = b.granularity;
    c.dirty_bytes = b.dirty_bytes;
    copy_c_string(&mut c.name, &b.name);
    c
}

/// Lists the image's persistent dirty bitmaps in directory order.
///
/// `*count` receives the number of bitmaps the image has; the first `min(max, *count)`
/// of them are written to `out`. When `*count > max`, call again with a larger array
/// (a first call with `max = 0` and `out = NULL` gives the number). The caller sets
/// `out[0].struct_size` to `sizeof(cowdisk_bitmap_info)`: it is the array's element
/// size, and only that many bytes of each element are written.
///
/// Errors: `-EINVAL` for a NULL `count`, a NULL `out` with `max > 0` or a bad
/// `struct_size`; `-ENOTSUP` when the image's bitmaps could not be read (a read-only
/// or `COWDISK_OPEN_CHECK` open of an image with a damaged or unknown bitmap
/// directory; the message says why; a read-write open with `COWDISK_OPEN_DROP_BITMAPS`
/// gives such bitmaps up and lists none). Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `count` a valid pointer; `out` valid for `max`
/// elements of `out[0].struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_bitmap_list(
    img: *mut cowdisk,
    out: *mut cowdisk_bitmap_info,
    max: usize,
    count: *mut usize,
) -> c_int {
    guard_handle("cowdisk_bitmap_list", img, |h| {
        super::records::fill_records(
            "cowdisk_bitmap_info",
            out,
            max,
            count,
            || h.image.bitmaps(),
            to_c_info,
        )
    })
}

/// Adds an empty persistent dirty bitmap `name` (1 to 1023 bytes of UTF-8, unique in
/// the image), like `qemu-img bitmap --add`.
///
/// `granularity` is the number of bytes one bit covers: a power of two from 512 bytes
/// to 2 GiB, or 0 for QEMU's default (the cluster size, within 4 KiB..64 KiB). The
/// bitmap tracks writes from now on unless `flags` has `COWDISK_BITMAP_ADD_DISABLED`.
/// It is stored in the image when the handle is closed.
///
/// Errors: `-EINVAL` for a NULL, empty, too long or already used name, a bad
/// granularity (or one that would make the bitmap too large) or unknown flags;
/// `-EROFS` read-only; `-ENOTSUP` for a version 2 image or an image whose bitmaps
/// could not be read. Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `name` a valid NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_bitmap_add(
    img: *mut cowdisk,
    name: *const c_char,
    granularity: u64,
    flags: u32,
) -> c_int {
    guard_handle("cowdisk_bitmap_add", img, |h| {
        let name = c_str(name, "name")?;
        if flags & !COWDISK_BITMAP_ADD_DISABLED != 0 {
            return Err(Error::InvalidArgument(format!(
                "unknown bitmap_add flags {:#x}",
                flags & !COWDISK_BITMAP_ADD_DISABLED
            )));
        }
        h.image
            .bitmap_add(name, granularity, flags & COWDISK_BITMAP_ADD_DISABLED == 0)
    })
}

/// Removes the bitmap `name` (an inconsistent one too), like `qemu-img bitmap
/// --remove`. Its clusters are freed when the handle is closed.
///
/// Errors: `-EINVAL` for a NULL name, `-ENOENT` when there is no such bitmap,
/// `-EROFS` read-only, `-ENOTSUP` when the image's bitmaps could not be read.
/// Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `name` a valid NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_bitmap_remove(img: *mut cowdisk, name: *const c_char) -> c_int {
    guard_handle("cowdisk_bitmap_remove", img, |h| {
        h.image.bitmap_remove(c_str(name, "name")?)
    })
}

/// Clears every bit of the bitmap `name` (a new checkpoint starts), like `qemu-img
/// bitmap --clear`.
///
/// Errors: `-EINVAL` for a NULL name, `-ENOENT` when there is no such bitmap,
/// `-EROFS` read-only, `-ENOTSUP` for an inconsistent bitmap or when the image's
/// bitmaps could not be read. Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `name` a valid NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_bitmap_clear(img: *mut cowdisk, name: *const c_char) -> c_int {
    guard_handle("cowdisk_bitmap_clear", img, |h| {
        h.image.bitmap_clear(c_str(name, "name")?)
    })
}

/// Makes the bitmap `name` track writes (`enabled` non-zero, `qemu-img bitmap
/// --enable`) or stop tracking them (`enabled` 0, `--disable`).
///
/// Errors: `-EINVAL` for a NULL name, `-ENOENT` when there is no such bitmap,
/// `-EROFS` read-only, `-ENOTSUP` for an inconsistent bitmap or when the image's
/// bitmaps could not be read. Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `name` a valid NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_bitmap_enable(
    img: *mut cowdisk,
    name: *const c_char,
    enabled: c_int,
) -> c_int {
    guard_handle("cowdisk_bitmap_enable", img, |h| {
        h.image
            .bitmap_set_enabled(c_str(name, "name")?, enabled != 0)
    })
}

/// Sets in the bitmap `name` of `img` every bit that the bitmap `src_name` of
/// `src_img` has set, like `qemu-img bitmap --merge SRC [-b SRC_IMAGE]`. `src_img`
/// NULL means `img`; the two bitmaps may have different granularities (and the images
/// different sizes: bits past the end of `img` are ignored). The source is read before
/// the target is changed, so `src_img` is only read.
///
/// Errors: `-EINVAL` for a NULL name, `-ENOENT` when either bitmap does not exist,
/// `-EROFS` when `img` is read-only, `-ENOTSUP` for an inconsistent bitmap or an
/// image whose bitmaps could not be read. Thread-safe (on both handles).
///
/// # Safety
/// `img` must be a live handle, `src_img` NULL or a live handle; `name` and `src_name`
/// valid NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_bitmap_merge(
    img: *mut cowdisk,
    name: *const c_char,
    src_img: *mut cowdisk,
    src_name: *const c_char,
) -> c_int {
    guard_handle("cowdisk_bitmap_merge", img, |h| {
        let name = c_str(name, "name")?;
        let src_name = c_str(src_name, "src_name")?;
        // SAFETY: the caller promises `src_img` is NULL or a live handle.
        let src = match src_img.as_ref() {
            Some(s) => s,
            None => h,
        };
        let bits = src.image.bitmap_contents(src_name)?;
        h.image.bitmap_merge(name, &bits)
    })
}

/// Describes guest `[offset, offset+len)` (clamped to the virtual size) as the dirty
/// and clean runs of the bitmap `name`: what changed since the bitmap was added (or
/// last cleared), for an incremental backup that copies only that.
///
/// Same calling convention as `cowdisk_block_status()`: writes at most `max_extents`
/// extents to `extents` and their number to `*count`. Each has `start` and `length`
/// (multiples of the granularity, except at the ends of the range), `flags`
/// `COWDISK_EXTENT_DIRTY` for a dirty run and 0 for a clean one, `offset` and `depth`
/// 0. Extents are contiguous and alternate between dirty and clean; when they end
/// before `offset + len`, call again from the end of the last one. `*count` is 0 only
/// when `offset` is the virtual size or `len` is 0.
///
/// Errors: `-EINVAL` for NULL pointers, `max_extents == 0` or `offset` past the end;
/// `-ENOENT` when there is no such bitmap; `-ENOTSUP` for an inconsistent bitmap or
/// when the image's bitmaps could not be read. Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `name` a valid NUL-terminated string; `extents` valid
/// for `max_extents` elements; `count` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_bitmap_extents(
    img: *mut cowdisk,
    name: *const c_char,
    offset: u64,
    len: u64,
    extents: *mut cowdisk_extent,
    max_extents: usize,
    count: *mut usize,
) -> c_int {
    guard_handle("cowdisk_bitmap_extents", img, |h| {
        if extents.is_null() || count.is_null() || max_extents == 0 {
            return Err(Error::InvalidArgument(
                "extents and count must be non-NULL and max_extents > 0".into(),
            ));
        }
        let name = c_str(name, "name")?;
        let found = h.image.dirty_extents(name, offset, len, max_extents)?;
        for (i, e) in found.iter().take(max_extents).enumerate() {
            *extents.add(i) = cowdisk_extent {
                start: e.start,
                length: e.length,
                offset: 0,
                flags: if e.dirty { COWDISK_EXTENT_DIRTY } else { 0 },
                depth: 0,
            };
        }
        *count = found.len().min(max_extents);
        Ok(())
    })
}
