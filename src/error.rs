//! The one error type of the library and its mapping to negative errno values.

use std::io;

/// Every failure cowdisk reports. The message says what went wrong and where; the
/// C ABI turns it into a negative errno with [`Error::errno`] and keeps the message
/// for `cowdisk_last_error()`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host storage failed (the OS error is kept, with what we were doing).
    #[error("{context}: {}", os_text(.source))]
    Io {
        /// What cowdisk was doing when the host I/O failed.
        context: String,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// The image is not a qcow2 image at all.
    #[error("{0}")]
    NotQcow2(String),
    /// The image is qcow2 but its metadata is inconsistent or malformed.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// The image uses a feature cowdisk does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An argument was out of range or malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A write was attempted on an image opened read-only.
    #[error("image is read-only: {0}")]
    ReadOnly(String),
    /// The image would grow beyond what the format or the configured limits allow.
    #[error("no space: {0}")]
    NoSpace(String),
    /// The backing chain is deeper than the open options allow.
    #[error("{0}")]
    ChainTooDeep(String),
    /// An earlier failure left the in-memory metadata in doubt; the handle refuses writes.
    #[error("image handle is broken by an earlier failure: {0}")]
    Broken(String),
    /// A named thing (an internal snapshot) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Another process (QEMU or cowdisk) holds the image file in a way that conflicts
    /// with this open (see `io::lock`).
    #[error("{0}")]
    Busy(String),
    /// The caller cancelled a long operation (a progress callback asked to stop).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The image is encrypted and no passphrase was given.
    #[error("{0}")]
    NoKey(String),
    /// The passphrase given does not open any key slot of the image.
    #[error("{0}")]
    KeyRejected(String),
}

/// An OS error's message without Rust's " (os error N)" suffix: the errno travels
/// separately ([`Error::errno`]), and messages read like QEMU's.
fn os_text(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') && e.raw_os_error().is_some() => s[..i].to_string(),
        _ => s,
    }
}

/// Shorthand for results carrying [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps a host I/O error with a description of the operation.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A copy of this error (OS errors keep their code), for reporting one failure
    /// to several callers.
    pub fn duplicate(&self) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: match source.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::new(source.kind(), source.to_string()),
                },
            },
            Error::NotQcow2(m) => Error::NotQcow2(m.clone()),
            Error::Corrupt(m) => Error::Corrupt(m.clone()),
            Error::Unsupported(m) => Error::Unsupported(m.clone()),
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::ReadOnly(m) => Error::ReadOnly(m.clone()),
            Error::NoSpace(m) => Error::NoSpace(m.clone()),
            Error::ChainTooDeep(m) => Error::ChainTooDeep(m.clone()),
            Error::Broken(m) => Error::Broken(m.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::Busy(m) => Error::Busy(m.clone()),
            Error::Cancelled(m) => Error::Cancelled(m.clone()),
            Error::NoKey(m) => Error::NoKey(m.clone()),
            Error::KeyRejected(m) => Error::KeyRejected(m.clone()),
        }
    }

    /// The same error (same kind, same errno) with `note` added to its message.
    pub fn with_note(self, note: &str) -> Error {
        let add = |m: String| format!("{m} ({note})");
        match self {
            Error::Io { context, source } => Error::Io {
                context: add(context),
                source,
            },
            Error::NotQcow2(m) => Error::NotQcow2(add(m)),
            Error::Corrupt(m) => Error::Corrupt(add(m)),
            Error::Unsupported(m) => Error::Unsupported(add(m)),
            Error::InvalidArgument(m) => Error::InvalidArgument(add(m)),
            Error::ReadOnly(m) => Error::ReadOnly(add(m)),
            Error::NoSpace(m) => Error::NoSpace(add(m)),
            Error::ChainTooDeep(m) => Error::ChainTooDeep(add(m)),
            Error::Broken(m) => Error::Broken(add(m)),
            Error::NotFound(m) => Error::NotFound(add(m)),
            Error::Busy(m) => Error::Busy(add(m)),
            Error::Cancelled(m) => Error::Cancelled(add(m)),
            Error::NoKey(m) => Error::NoKey(add(m)),
            Error::KeyRejected(m) => Error::KeyRejected(add(m)),
        }
    }

    /// The positive errno value that best describes this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::NotQcow2(_) => libc::EINVAL,
            Error::Corrupt(_) => libc::EIO,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::ReadOnly(_) => libc::EROFS,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::ChainTooDeep(_) => libc::ELOOP,
            Error::Broken(_) => libc::EIO,
            Error::NotFound(_) => libc::ENOENT,
            Error::Busy(_) => libc::EBUSY,
            Error::Cancelled(_) => libc::ECANCELED,
            Error::NoKey(_) => libc::ENOKEY,
            Error::KeyRejected(_) => libc::EKEYREJECTED,
        }
    }
}

/// Builds an [`Error::Corrupt`] from a format string.
#[macro_export]
macro_rules! corrupt {
    ($($arg:tt)*) => { $crate::error::Error::Corrupt(format!($($arg)*)) };
}

/// Builds an [`Error::InvalidArgument`] from a format string.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::error::Error::InvalidArgument(format!($($arg)*)) };
}

/// Builds an [`Error::Unsupported`] from a format string.
#[macro_export]
macro_rules! unsupported {
    ($($arg:tt)*) => { $crate::error::Error::Unsupported(format!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_read_without_the_rust_suffix() {
        let e = Error::io(
            "cannot open 'x.qcow2'",
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(
            e.to_string(),
            "cannot open 'x.qcow2': No such file or directory"
        );
        assert_eq!(e.errno(), libc::ENOENT);
        let other = Error::io("reading", io::Error::other("short read (os error 5)"));
        assert_eq!(other.to_string(), "reading: short read (os error 5)");
    }
}
