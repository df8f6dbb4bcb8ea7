//! cowdisk — a qcow2 block-driver library with a stable C ABI.
//!
//! Layers, each calling only downward:
//! - [`format`]: pure on-disk codecs (header, L1/L2 entries, refcount blocks); no I/O.
//! - [`io`]: host storage (`Storage` trait: file with O_DIRECT, memory, fault injection).
//! - [`image`]: the engine: open/create, the read/write path, allocation, caches, COW.
//! - [`bench`], [`convert`]: services built on the engine's public API (the CLI and
//!   the C ABI call them).
//! - [`ffi`]: the C ABI over the engine; the CLI and bindings sit on top.

#![warn(missing_docs)]

pub mod bench;
pub mod bitmap;
pub mod convert;
pub mod crypto;
pub mod error;
pub mod ffi;
pub mod format;
pub mod image;
pub mod io;

pub use error::{Error, Result};
pub use image::{
    CompressionType, CreateOptions, EncryptionFormat, EncryptionInfo, Image, ImageInfo,
    OpenOptions, Preallocation, SnapshotInfo, SnapshotOptions,
};
