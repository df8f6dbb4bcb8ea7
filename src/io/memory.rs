//! An in-memory [`Storage`], for tests and scratch images.

use std::io;
use std::sync::RwLock;

use super::Storage;

/// A growable byte vector behind a lock.
#[derive(Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        buf.fill(0);
        let start = offset.min(data.len() as u64) as usize;
        let end = (offset.saturating_add(buf.len() as u64)).min(data.len() as u64) as usize;
        buf[..end - start].copy_from_slice(&data[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_vectored_at(&[buf], offset)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let end = offset as usize + total;
        if data.len() < end {
            data.resize(end, 0);
        }
        let mut pos = offset as usize;
        for b in bufs {
            data[pos..pos + b.len()].copy_from_slice(b);
            pos += b.len();
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let start = (offset as usize).min(data.len());
        let end = ((offset + len) as usize).min(data.len());
        data[start..end].fill(0);
        Ok(())
    }

    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let end = (offset + len) as usize;
        if end > data.len() {
            data.resize(end, 0);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len as usize, 0);
        Ok(())
    }
}
