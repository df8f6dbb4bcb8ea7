//! Checking and repairing an image through the C ABI (`qemu-img check`'s counts).

use std::ffi::c_int;

use super::cowdisk;
use super::errors::guard_handle;
use crate::error::Error;
use crate::image::{CheckReport, Repair};

/// Repair leaked clusters (`cowdisk_check` flags; `qemu-img check -r leaks`).
pub const COWDISK_CHECK_REPAIR_LEAKS: u32 = 1;
/// Repair everything repairable, leaks included (`qemu-img check -r all`).
pub const COWDISK_CHECK_REPAIR_ALL: u32 = 2;

/// What `cowdisk_check()` found, with `qemu-img check`'s meaning of each count.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct cowdisk_check_result {
    /// Set by the caller to `sizeof(cowdisk_check_result)`.
    pub struct_size: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// Inconsistencies left that may corrupt data.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Failures that kept parts of the image from being checked.
    pub check_errors: u64,
    /// Corruptions this call repaired.
    pub corruptions_fixed: u64,
    /// Leaks this call repaired.
    pub leaks_fixed: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active image.
    pub allocated_clusters: u64,
    /// Allocated clusters not right after the previous one on the host.
    pub fragmented_clusters: u64,
    /// Compressed clusters in the active image.
    pub compressed_clusters: u64,
}

/// Checks the image's metadata as `qemu-img check` does and, with
/// `COWDISK_CHECK_REPAIR_LEAKS` or `COWDISK_CHECK_REPAIR_ALL` in `flags`, repairs it
/// (the handle must be read-write; open an image marked corrupt with
/// `COWDISK_OPEN_CHECK`). As with `qemu-img check -r`, call again without flags to
/// see what a repair left. A successful repair of an image marked corrupt makes it
/// writable again.
///
/// `out->struct_size` must be set; `*out` is written only on success. Returns 0 when
/// the check completed (whatever it found: read the counts), `-EROFS` for a repair on
/// a read-only handle, `-EIO` when the check could not complete (for example a
/// refcount structure that only `COWDISK_CHECK_REPAIR_ALL` can rebuild), `-EINVAL`
/// for unknown flags. Waits for writes in flight on other threads, then holds the
/// image for the check.
///
/// # Safety
/// `img` must be a live handle; `out` a valid pointer whose `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_check(
    img: *mut cowdisk,
    flags: u32,
    out: *mut cowdisk_check_result,
) -> c_int {
    guard_handle("cowdisk_check", img, |h| {
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        let declared = *(out as *const u32) as usize;
        if declared < 8 {
            return Err(Error::InvalidArgument(format!(
                "cowdisk_check_result.struct_size is {declared}; set it to \
                 sizeof(cowdisk_check_result)"
            )));
        }
        let known = COWDISK_CHECK_REPAIR_LEAKS | COWDISK_CHECK_REPAIR_ALL;
        if flags & !known != 0 {
            return Err(Error::InvalidArgument(format!(
                "unknown check flags {:#x}",
                flags & !known
            )));
        }
        let repair = if flags & COWDISK_CHECK_REPAIR_ALL != 0 {
            Repair::All
        } else if flags & COWDISK_CHECK_REPAIR_LEAKS != 0 {
            Repair::Leaks
        } else {
            Repair::None
        };
        let r: CheckReport = h.image.check(repair)?;
        if let Some(why) = r.failed {
            return Err(Error::io(
                format!("the check could not complete: {why}"),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let c = cowdisk_check_result {
            struct_size: declared.min(std::mem::size_of::<cowdisk_check_result>()) as u32,
            reserved: 0,
            corruptions: r.corruptions,
            leaks: r.leaks,
            check_errors: r.check_errors,
            corruptions_fixed: r.corruptions_fixed,
            leaks_fixed: r.leaks_fixed,
            image_end_offset: r.image_end_offset,
            total_clusters: r.total_clusters,
            allocated_clusters: r.allocated_clusters,
            fragmented_clusters: r.fragmented_clusters,
            compressed_clusters: r.compressed_clusters,
        };
        let n = c.struct_size as usize;
        std::ptr::copy_nonoverlapping(&c as *const _ as *const u8, out as *mut u8, n);
        Ok(())
    })
}

/// What `cowdisk_amend()` changes; zero fields leave a setting as it is.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct cowdisk_amend_opts {
    /// Set to `sizeof(cowdisk_amend_opts)`.
    pub struct_size: u32,
    /// qcow2 version: 2 (compat 0.10) or 3 (compat 1.1); 0 = unchanged.
    pub version: u32,
    /// Lazy refcounts: 1 = on, 2 = off, 0 = unchanged.
    pub lazy_refcounts: u32,
    /// Refcount width in bits (1, 2, 4, ..., 64); 0 = unchanged.
    pub refcount_bits: u32,
}

/// Changes the image's version, lazy refcounts flag or refcount width in place, as
/// `qemu-img amend -o compat=…,lazy_refcounts=…,refcount_bits=…` does, refusing what
/// it refuses (`-EINVAL` for impossible combinations, `-ENOTSUP` for a downgrade the
/// image's snapshots or features prevent, with QEMU's messages). Crash-safe: a crash
/// leaves the old image or the new one, with the same data. Needs a read-write
/// handle (`-EROFS`); waits for writes in flight on other threads.
///
/// # Safety
/// `img` must be a live handle; `opts` a valid pointer whose `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_amend(
    img: *mut cowdisk,
    opts: *const cowdisk_amend_opts,
) -> c_int {
    guard_handle("cowdisk_amend", img, |h| {
        if opts.is_null() {
            return Err(Error::InvalidArgument("opts is NULL".into()));
        }
        let declared = *(opts as *const u32) as usize;
        if declared < 8 {
            return Err(Error::InvalidArgument(format!(
                "cowdisk_amend_opts.struct_size is {declared}; set it to sizeof(cowdisk_amend_opts)"
            )));
        }
        let mut c: cowdisk_amend_opts = std::mem::zeroed();
        let n = declared.min(std::mem::size_of::<cowdisk_amend_opts>());
        std::ptr::copy_nonoverlapping(opts as *const u8, &mut c as *mut _ as *mut u8, n);
        let o = crate::image::AmendOptions {
            version: (c.version != 0).then_some(c.version),
            lazy_refcounts: match c.lazy_refcounts {
                0 => None,
                1 => Some(true),
                2 => Some(false),
                v => {
                    return Err(Error::InvalidArgument(format!(
                        "lazy_refcounts is {v} (0 unchanged, 1 on, 2 off)"
                    )))
                }
            },
            refcount_bits: (c.refcount_bits != 0).then_some(c.refcount_bits),
        };
        h.image.amend(&o)
    })
}
