//! Pure on-disk codecs: the header and its extensions, L1/L2 entries, refcount blocks,
//! snapshots, LUKS headers and persistent bitmaps.
//! Nothing here performs I/O; everything here validates what it decodes.

pub mod bitmap;
pub mod compressed;
pub mod entry;
pub mod header;
pub mod luks;
pub mod refcount;
pub mod snapshot;
