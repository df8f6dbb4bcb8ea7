//! Error reporting across the C boundary: the per-thread last-error message, errno
//! strings, and the guard that turns results and panics into return codes.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::cowdisk;
use crate::error::{Error, Result};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: String) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = c);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs `f`, returning 0 or a negative errno; records the message of a failure and
/// turns a panic into `-EIO`.
pub(super) fn guard(name: &str, f: impl FnOnce() -> Result<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            let code = e.errno();
            set_last_error(format!("{name}: {e}"));
            -code
        }
        Err(payload) => {
            set_last_error(format!(
                "{name}: internal error (please report): {}",
                panic_message(payload.as_ref())
            ));
            -libc::EIO
        }
    }
}

/// Like [`guard`], for calls on a handle: rejects NULL.
pub(super) fn guard_handle(
    name: &str,
    img: *mut cowdisk,
    f: impl FnOnce(&cowdisk) -> Result<()>,
) -> c_int {
    guard(name, || {
        // SAFETY: the caller promises `img` is NULL or a live handle.
        let handle = unsafe { img.as_ref() }
            .ok_or_else(|| Error::InvalidArgument("image handle is NULL".into()))?;
        f(handle)
    })
}

/// Returns the message of the last failed cowdisk call on this thread ("" if none).
///
/// Ownership: the string belongs to the library and stays valid until the next cowdisk
/// call on the same thread; copy it to keep it. Thread-safe (one message per thread).
#[no_mangle]
pub extern "C" fn cowdisk_last_error() -> *const c_char {
    LAST_ERROR.with(|slot| slot.borrow().as_ptr())
}

macro_rules! errno_table {
    ($($name:ident => $text:literal),* $(,)?) => {
        fn errno_text(code: i32) -> &'static [u8] {
            match code {
                0 => b"success\0",
                $(libc::$name => concat!($text, "\0").as_bytes(),)*
                _ => b"unknown error\0",
            }
        }
    };
}

errno_table! {
    EPERM => "operation not permitted",
    ENOENT => "no such file or directory",
    EIO => "input/output error",
    ENOMEM => "out of memory",
    EACCES => "permission denied",
    EBUSY => "device or resource busy",
    EEXIST => "file exists",
    EINVAL => "invalid argument",
    EFBIG => "file too large",
    ENOSPC => "no space left on device",
    EROFS => "read-only image",
    ENOTSUP => "operation not supported",
    ENAMETOOLONG => "file name too long",
    ELOOP => "too many levels of backing files",
    EISDIR => "is a directory",
    ENOTDIR => "not a directory",
    EAGAIN => "resource temporarily unavailable",
    EOVERFLOW => "value too large",
    ERANGE => "result out of range",
    E2BIG => "argument list too long",
    EBADF => "bad file descriptor",
    ECANCELED => "operation cancelled",
    ENOKEY => "a passphrase is needed",
    EKEYREJECTED => "the passphrase was rejected",
}

/// Returns a static description of an errno value; accepts `-EINVAL` or `EINVAL`.
///
/// Ownership: the string is static and must not be freed. Thread-safe.
#[no_mangle]
pub extern "C" fn cowdisk_strerror(code: c_int) -> *const c_char {
    errno_text(code.checked_abs().unwrap_or(0)).as_ptr() as *const c_char
}

/// Returns the library's version string, for example "0.1.0".
///
/// Ownership: static, must not be freed. Thread-safe.
#[no_mangle]
pub extern "C" fn cowdisk_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn strerror_accepts_both_signs() {
        let a = unsafe { CStr::from_ptr(cowdisk_strerror(-libc::EINVAL)) };
        let b = unsafe { CStr::from_ptr(cowdisk_strerror(libc::EINVAL)) };
        assert_eq!(a, b);
        assert_eq!(a.to_str().unwrap(), "invalid argument");
        let unknown = unsafe { CStr::from_ptr(cowdisk_strerror(99999)) };
        assert_eq!(unknown.to_str().unwrap(), "unknown error");
    }

    #[test]
    fn guard_catches_panics_and_records_message() {
        let rc = guard("test_call", || panic!("boom"));
        assert_eq!(rc, -libc::EIO);
        let msg = unsafe { CStr::from_ptr(cowdisk_last_error()) };
        assert!(msg.to_str().unwrap().contains("boom"));
    }
}
