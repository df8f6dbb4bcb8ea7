//! Host storage under an image: the [`Storage`] trait and its backends — a plain file
//! (optionally O_DIRECT), memory, and a fault-injecting, counting wrapper for tests.

mod fault;
mod file;
pub mod lock;
mod memory;

pub use fault::{FaultStorage, IoCounts, IoEvent};
pub use file::FileStorage;
pub use memory::MemStorage;

use std::io;

/// Byte-addressed host storage. Implementations are shared between threads.
///
/// Reads past the end of the storage return zeros for the missing part (like a sparse
/// file); writes past the end extend it.
pub trait Storage: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes the buffers back to back starting at `offset`, as one request.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()>;
    /// Makes all completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocates `[offset, offset+len)` so it reads as zeros and frees host space,
    /// keeping the length. Storage that cannot punch holes may do nothing.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Reserves space for `[offset, offset+len)` so that later writes there neither
    /// allocate blocks nor move the end of the file; extends the length when the range
    /// ends past it, never shrinks it. Contents are unchanged (zeros past the old end).
    /// Storage that cannot may do nothing.
    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Where `offset` lies in a run of data (`true`) or a hole (`false`), and where that
    /// run ends; `None` when the storage cannot tell (treat as data).
    fn extent_at(&self, offset: u64) -> io::Result<Option<(bool, u64)>> {
        let _ = offset;
        Ok(None)
    }
    /// Bytes the storage really occupies on its device (a sparse file's blocks);
    /// `None` when unknown.
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
    /// True when the storage holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}
