//! Compressed writes through the C ABI.

use std::ffi::c_int;

use super::cowdisk;
use super::errors::guard_handle;
use crate::error::Error;

/// Writes `len` bytes from `buf` at guest `offset` as compressed clusters, with the
/// compression type chosen when the image was created (zlib or zstd).
///
/// `offset` must be cluster-aligned and `len` a whole number of clusters; only the
/// image's last cluster may be partial (it is compressed zero-padded). Every cluster
/// written must be unallocated in this image (or a zero cluster without a host
/// cluster), as QEMU requires: compressed writes fill fresh images and backups, they
/// do not overwrite. A cluster that does not compress is stored as a normal cluster.
/// The clusters of one call are compressed on as many threads as there are cores.
///
/// Unless the image was opened with `COWDISK_OPEN_NO_COMPRESSED_CACHE`, compressed
/// clusters are gathered in memory and written as whole, aligned host clusters (fast
/// under `COWDISK_OPEN_DIRECT`); reads see them at once, and `cowdisk_flush()` or
/// `cowdisk_close()` writes out the last, partly filled host cluster.
///
/// Errors: `-EINVAL` for a misaligned range, a range past the end or a cluster that is
/// already allocated (nothing is written then), `-EROFS` read-only, host errors as
/// their errno. Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `buf` must be valid for `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_pwrite_compressed(
    img: *mut cowdisk,
    buf: *const std::ffi::c_void,
    len: usize,
    offset: u64,
) -> c_int {
    guard_handle("cowdisk_pwrite_compressed", img, |h| {
        if buf.is_null() && len > 0 {
            return Err(Error::InvalidArgument("buffer is NULL".into()));
        }
        if len == 0 {
            return h.image.write_compressed(&[], offset);
        }
        let data = std::slice::from_raw_parts(buf as *const u8, len);
        h.image.write_compressed(data, offset)
    })
}
