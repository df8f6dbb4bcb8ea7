//! Internal snapshots and VM state through the C ABI.

use std::ffi::{c_char, c_int, c_void, CStr};

use super::cowdisk;
use super::errors::guard_handle;
use crate::error::{Error, Result};
use crate::image::{SnapshotInfo, SnapshotOptions};

/// Options for [`cowdisk_snapshot_create`]. A zero-filled struct records a disk-only
/// snapshot (like `qemu-img snapshot -c`, which records icount 0).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct cowdisk_snapshot_opts {
    /// Set to `sizeof(cowdisk_snapshot_opts)`.
    pub struct_size: u32,
    /// Reserved, set to 0.
    pub flags: u32,
    /// Bytes of VM state saved with `cowdisk_save_vmstate()` (and finalized) to record
    /// in the snapshot; 0 for a disk-only snapshot.
    pub vm_state_size: u64,
    /// Guest clock in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count for record/replay, or -1 for none.
    pub icount: i64,
}

/// One internal snapshot, filled by [`cowdisk_snapshot_list`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct cowdisk_snapshot_info {
    /// Set by the caller (in the first array element) to `sizeof(cowdisk_snapshot_info)`.
    pub struct_size: u32,
    /// Creation time: seconds since the Unix epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// Reserved, written as 0.
    pub reserved: u32,
    /// Bytes of VM state recorded (0 = disk-only snapshot).
    pub vm_state_size: u64,
    /// Guest clock when the snapshot was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Instruction count for record/replay, -1 when none.
    pub icount: i64,
    /// Unique id, NUL-terminated (truncated to fit).
    pub id: [c_char; 128],
    /// Name, NUL-terminated (truncated to fit).
    pub name: [c_char; 1024],
}

/// Reads a C string argument as UTF-8, rejecting NULL.
///
/// # Safety
/// `s` must be NULL or a valid NUL-terminated string.
pub(super) unsafe fn c_str<'a>(s: *const c_char, what: &str) -> Result<&'a str> {
    if s.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    CStr::from_ptr(s)
        .to_str()
        .map_err(|_| Error::InvalidArgument(format!("{what} is not valid UTF-8")))
}

/// Converts C snapshot options (NULL = disk-only, no icount).
///
/// # Safety
/// `opts` must be NULL or point to at least `opts->struct_size` readable bytes.
unsafe fn snapshot_options(opts: *const cowdisk_snapshot_opts) -> Result<SnapshotOptions> {
    if opts.is_null() {
        return Ok(SnapshotOptions::default());
    }
    let declared = *(opts as *const u32) as usize;
    if declared < 8 {
        return Err(Error::InvalidArgument(format!(
            "cowdisk_snapshot_opts.struct_size is {declared}; set it to sizeof(cowdisk_snapshot_opts)"
        )));
    }
    let mut c: cowdisk_snapshot_opts = std::mem::zeroed();
    let n = declared.min(std::mem::size_of::<cowdisk_snapshot_opts>());
    std::ptr::copy_nonoverlapping(opts as *const u8, &mut c as *mut _ as *mut u8, n);
    if c.flags != 0 {
        return Err(Error::InvalidArgument(format!(
            "unknown snapshot flags {:#x}",
            c.flags
        )));
    }
    Ok(SnapshotOptions {
        vm_state_size: c.vm_state_size,
        vm_clock_nsec: c.vm_clock_nsec,
        icount: c.icount,
    })
}

pub(super) fn copy_c_string(dst: &mut [c_char], src: &str) {
    dst.fill(0);
    let n = src.len().min(dst.len() - 1);
    for (d, b) in dst.iter_mut().zip(&src.as_bytes()[..n]) {
        *d = *b as c_char;
    }
}

fn to_c_info(s: &SnapshotInfo, struct_size: u32) -> cowdisk_snapshot_info {
    // SAFETY: the struct is plain data; all-zero is valid.
    let mut c: cowdisk_snapshot_info = unsafe { std::mem::zeroed() };
    c.struct_size = struct_size;
    c.date_sec = s.date_sec;
    c.date_nsec = s.date_nsec;
    c.vm_state_size = s.vm_state_size;
    c.vm_clock_nsec = s.vm_clock_nsec;
    c.disk_size = s.disk_size;
    c.icount = s.icount;
    copy_c_string(&mut c.id, &s.id);
    copy_c_string(&mut c.name, &s.name);
    c
}

/// Creates an internal snapshot named `name` of the active image, with the next free
/// numeric id (one more than the largest), as `qemu-img snapshot -c` does.
///
/// `opts` may be NULL for a disk-only snapshot. With `opts->vm_state_size > 0`, the VM
/// state saved with [`cowdisk_save_vmstate`] is recorded in the snapshot (buffered
/// state is finalized first) and dropped from the active image; when saving it failed,
/// that error is returned and nothing is recorded. Names need not be unique (at most
/// 1023 bytes, UTF-8). The date is taken from the system clock.
///
/// Errors: `-EINVAL` for a NULL or too long name or bad options, `-EROFS` read-only,
/// `-ENOTSUP` when the image's refcount width cannot count another reference, host
/// errors as their errno. Thread-safe; saves of VM state wait until it is done.
///
/// # Safety
/// `img` must be a live handle, `name` a valid NUL-terminated string, `opts` NULL or
/// valid with `struct_size` set.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_snapshot_create(
    img: *mut cowdisk,
    name: *const c_char,
    opts: *const cowdisk_snapshot_opts,
) -> c_int {
    guard_handle("cowdisk_snapshot_create", img, |h| {
        let name = c_str(name, "name")?;
        let opts = snapshot_options(opts)?;
        h.image.snapshot_create(name, &opts).map(|_| ())
    })
}

/// Reverts the active image to the snapshot whose id is `id_or_name`, or else the
/// first whose name is: its data, its virtual size, and its VM state (read it with
/// [`cowdisk_load_vmstate`]). What only the active image held is released.
///
/// Errors: `-ENOENT` no such snapshot, `-EROFS` read-only, `-ENOTSUP` when the refcount
/// width cannot count another reference, host errors as their errno. Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `id_or_name` a valid NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_snapshot_goto(
    img: *mut cowdisk,
    id_or_name: *const c_char,
) -> c_int {
    guard_handle("cowdisk_snapshot_goto", img, |h| {
        h.image.snapshot_goto(c_str(id_or_name, "id_or_name")?)
    })
}

/// Deletes the snapshot whose id is `id_or_name`, or else the first whose name is,
/// releasing the clusters only it referenced.
///
/// Errors: `-ENOENT` no such snapshot, `-EROFS` read-only, host errors as their errno.
/// Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `id_or_name` a valid NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_snapshot_delete(
    img: *mut cowdisk,
    id_or_name: *const c_char,
) -> c_int {
    guard_handle("cowdisk_snapshot_delete", img, |h| {
        h.image.snapshot_delete(c_str(id_or_name, "id_or_name")?)
    })
}

/// Lists the internal snapshots in table order.
///
/// `*count` receives the number of snapshots the image has; the first
/// `min(max, *count)` of them are written to `out`. When `*count > max`, call again
/// with a larger array. The caller sets `out[0].struct_size` to
/// `sizeof(cowdisk_snapshot_info)`: it is the array's element size, and only that many
/// bytes of each element are written. `out` may be NULL when `max` is 0.
///
/// Errors: `-EINVAL` for a NULL `count`, a NULL `out` with `max > 0` or a bad
/// `struct_size`. Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `count` a valid pointer; `out` valid for `max`
/// elements of `out[0].struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_snapshot_list(
    img: *mut cowdisk,
    out: *mut cowdisk_snapshot_info,
    max: usize,
    count: *mut usize,
) -> c_int {
    guard_handle("cowdisk_snapshot_list", img, |h| {
        super::records::fill_records(
            "cowdisk_snapshot_info",
            out,
            max,
            count,
            || h.image.snapshots(),
            to_c_info,
        )
    })
}

/// Saves `len` bytes of VM state from `buf` at position `pos` (bytes from the start of
/// the state), for a snapshot taken afterwards with [`cowdisk_snapshot_create`].
///
/// Sequential saves (each starting where the previous one ended) are copied into a
/// buffer of max(1 MiB, cluster size); full buffers are written by up to 8 background
/// threads while the caller goes on, with at most 9 buffers in memory (a save blocks
/// while all writers are busy). A save at another position first hands over what is
/// buffered, then is written before the call returns. The state lives past the
/// virtual disk at QEMU's offset, so QEMU loads it too.
///
/// Call [`cowdisk_finalize_vmstate`] to wait for the writes and learn about failures.
/// After a failure, every later save (and finalize) fails at once with the same error
/// for the life of the handle.
///
/// Errors: `-EINVAL` for a NULL buffer or a range past what the image can address,
/// `-EROFS` read-only, the first background write error. Thread-safe; saves from
/// several threads are serialised.
///
/// # Safety
/// `img` must be a live handle; `buf` valid for `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_save_vmstate(
    img: *mut cowdisk,
    buf: *const c_void,
    len: usize,
    pos: u64,
) -> c_int {
    guard_handle("cowdisk_save_vmstate", img, |h| {
        if buf.is_null() && len > 0 {
            return Err(Error::InvalidArgument("buffer is NULL".into()));
        }
        if len == 0 {
            return h.image.save_vmstate(&[], pos);
        }
        h.image
            .save_vmstate(std::slice::from_raw_parts(buf as *const u8, len), pos)
    })
}

/// Reads `len` bytes of VM state at position `pos` of the active image into `buf`
/// (after [`cowdisk_snapshot_goto`]: the snapshot's state). Bytes never saved read as
/// zeros. Reads go through a read-ahead of one buffer size (max(1 MiB, cluster
/// size)), so small sequential reads are cheap. State still buffered is written first.
///
/// Errors: `-EINVAL` for a NULL buffer or a range past what the image can address,
/// host errors as their errno. Thread-safe.
///
/// # Safety
/// `img` must be a live handle; `buf` valid for `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_load_vmstate(
    img: *mut cowdisk,
    buf: *mut c_void,
    len: usize,
    pos: u64,
) -> c_int {
    guard_handle("cowdisk_load_vmstate", img, |h| {
        if buf.is_null() && len > 0 {
            return Err(Error::InvalidArgument("buffer is NULL".into()));
        }
        if len == 0 {
            return h.image.load_vmstate(&mut [], pos);
        }
        h.image
            .load_vmstate(std::slice::from_raw_parts_mut(buf as *mut u8, len), pos)
    })
}

/// Writes the VM state still buffered, waits for every background write and returns
/// the first error any save met (0 when all of it is written). `cowdisk_close()`
/// finalizes too.
///
/// Errors: the first write error of the saves (e.g. `-EIO`, `-ENOSPC`). Thread-safe.
///
/// # Safety
/// `img` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn cowdisk_finalize_vmstate(img: *mut cowdisk) -> c_int {
    guard_handle("cowdisk_finalize_vmstate", img, |h| {
        h.image.finalize_vmstate()
    })
}
