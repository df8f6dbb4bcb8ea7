//! Persistent dirty bitmaps in memory: which guest ranges changed since a bitmap was
//! started (the engine keeps them, `src/image/bitmaps.rs` loads and stores them, and
//! `src/format/bitmap.rs` is their on-disk form).

mod dirty;

pub use dirty::{DirtyBitmap, DirtyChunk};
