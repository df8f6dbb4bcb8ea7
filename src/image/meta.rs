//! `Meta`: everything about an open image that lives under its lock — the header, the
//! L1 table, the L2 and refcount caches, the allocator state — and the low-level helpers
//! the other engine files build on. Its methods are spread over files by concern
//! (`refcount.rs`, `cluster.rs`, `write.rs`, `read.rs`).

use std::sync::{Arc, RwLock};

use super::backing::Backing;
use super::cache::TableCache;
use super::inflight::{DataIo, InFlight};
use super::overlap::Kind;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::header::Header;
use crate::io::Storage;

/// Refcount table and allocator state.
pub(crate) struct RefcountState {
    /// Refcount table entries (raw, big-endian decoded).
    pub table: Vec<u64>,
    /// Cached refcount blocks.
    pub blocks: TableCache,
    /// First cluster index that may be free.
    pub free_hint: u64,
    /// Decrements deferred until the tables that dropped the references are on disk
    /// (rule 4 of the write order): (host offset, clusters).
    pub pending_frees: Vec<(u64, u64)>,
    /// Clusters whose refcount was raised for an allocation that failed before anything
    /// (in memory or on disk) pointed to them, and whose release failed too: released
    /// at the next flush, so a failed call never leaks in a process that goes on.
    pub orphans: Vec<(u64, u64)>,
}

/// The state of an open image that sits behind the image's lock.
pub(crate) struct Meta {
    pub storage: Arc<dyn Storage>,
    pub header: Header,
    pub cluster_bits: u32,
    pub cluster_size: u64,
    /// log2 of entries per L2 table.
    pub l2_bits: u32,
    /// log2 of refcount entries per refcount block.
    pub rb_bits: u32,
    /// The active L1 table (decoded entries).
    pub l1: Vec<u64>,
    pub l2_cache: TableCache,
    pub rc: RefcountState,
    pub backing: Option<Arc<Backing>>,
    /// The image names a backing file that the open options told us not to open.
    pub backing_refused: bool,
    /// The open options said not to open backing files (`follow_backing: false`).
    pub backing_disabled: bool,
    /// The unlocked cipher of an encrypted image (`None`: not encrypted, or opened
    /// for metadata only without its key).
    pub crypto: Option<Arc<super::encryption::Encryption>>,
    /// How the image is encrypted, for `info`.
    pub encryption_info: Option<super::EncryptionInfo>,
    pub read_only: bool,
    /// Punch freed host clusters out of the file.
    pub discard_unmap: bool,
    /// Highest byte in use on the host: max(file length at open, end of every allocation).
    pub host_end: u64,
    /// Length of the image file as far as our writes made it (bytes past it read as
    /// zeros, so a fresh cluster there needs no zero-filling).
    pub file_len: u64,
    /// End of the host space preallocated for new clusters (see `write.rs`).
    pub preallocated_end: u64,
    /// Whether the image looks metadata-preallocated (decided once, on first use).
    pub preallocated: Option<bool>,
    /// Host flushes are skipped (`OpenOptions::no_flush`, QEMU's cache=unsafe).
    pub no_flush: bool,
    /// Set when the in-memory metadata is in doubt (corruption found midway, an
    /// internal inconsistency): writes are refused until the image is reopened.
    pub broken: Option<String>,
    /// The in-memory metadata may differ from the disk (a pointer write whose result
    /// could not be read back): nothing more is written — no flush, no release, no
    /// repair — until the image is reopened.
    pub in_doubt: bool,
    /// Set when flushing the host file failed: the kernel may have dropped written
    /// pages, so no later flush can promise durability and writes are refused until
    /// the image is reopened (QEMU does the same).
    pub flush_failed: Option<String>,
    /// The internal snapshot table (see `snapshot.rs`).
    pub snapshots: crate::format::snapshot::SnapshotTable,
    /// Persistent dirty bitmaps (see `bitmaps.rs`).
    pub bitmaps: super::bitmaps::Bitmaps,
    /// Compressed clusters: packing position, write cache, last decompressed cluster.
    pub compress: super::compress::CompressState,
    /// Held shared by every data transfer done without this lock; taken exclusively
    /// (see [`Meta::drain_data_io`]) before a host cluster can be reused.
    pub gate: Arc<RwLock<()>>,
    /// Guest clusters being allocated by writes running without the lock.
    pub inflight: InFlight,
    /// Where live metadata lies, checked before every host write (`overlap.rs`).
    pub overlaps: super::overlap::MetadataIndex,
    /// Opened to check and repair (`OpenOptions::check`): misplaced snapshot L1
    /// tables are accepted for the check to report.
    pub check_mode: bool,
    /// Host writes are checked against the metadata index (`OpenOptions::overlap_checks`).
    pub overlap_checks: bool,
}

impl Meta {
    /// Wraps a host I/O error with context.
    pub fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |e| Error::io(what, e)
    }

    /// Marks the image corrupt when `e` means its metadata is inconsistent (see
    /// `overlap.rs`), then hands the error back. Host I/O errors and lack
    /// of space leave the metadata consistent (every path rolls back or keeps dirty
    /// tables for the next flush), so they do not break the handle.
    pub fn judge(&mut self, what: &str, e: Error) -> Error {
        if let Error::Corrupt(msg) = &e {
            self.mark_corrupt(&format!("{what} failed: {msg}"));
        }
        e
    }

    /// What data transfers without the lock need: the storage, the backing image and
    /// the gate.
    pub fn data_io(&self) -> DataIo {
        DataIo {
            storage: Arc::clone(&self.storage),
            backing: self.backing.clone(),
            gate: Arc::clone(&self.gate),
            cluster_size: self.cluster_size,
            compression: self.compression_type(),
            crypto: self.crypto.clone(),
            encrypted: self.header.crypt_method != 0,
        }
    }

    /// Waits until no data transfer runs without the lock. Called (under the lock)
    /// before a host cluster's refcount reaches 0, so that a read or write planned
    /// against the old mapping can never touch the cluster after it is reused.
    pub fn drain_data_io(&self) {
        drop(self.gate.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// Refuses writes on a read-only or broken handle, and after a failed flush.
    pub fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("opened read-only".into()));
        }
        if let Some(why) = &self.broken {
            return Err(Error::Broken(why.clone()));
        }
        if let Some(why) = &self.flush_failed {
            return Err(Error::Broken(format!(
                "{why}; data written since the last successful flush may be lost, so \
                 writes are refused until the image is reopened"
            )));
        }
        Ok(())
    }

    /// Checks that a table of `len` bytes at `offset` is aligned and inside the file.
    pub fn check_table_location(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        if offset == 0 {
            return Err(corrupt!("{what} at offset 0 overlaps the header"));
        }
        if !offset.is_multiple_of(self.cluster_size) {
            return Err(corrupt!("{what} at {offset:#x} is not cluster-aligned"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.host_end => Ok(()),
            _ => Err(corrupt!(
                "{what} at {offset:#x} lies outside the file ({} bytes)",
                self.host_end
            )),
        }
    }

    /// Reads one cluster-sized table from the host.
    pub fn read_table(&self, what: &str, offset: u64) -> Result<Box<[u8]>> {
        self.check_table_location(what, offset, self.cluster_size)?;
        let mut buf = vec![0u8; self.cluster_size as usize].into_boxed_slice();
        self.storage
            .read_at(&mut buf, offset)
            .map_err(Meta::io_err(format!("reading {what} at {offset:#x}")))?;
        Ok(buf)
    }

    /// Writes bytes to the host, extending `host_end` as needed. The range must not
    /// overlap live metadata (see `overlap.rs`).
    pub fn write_host(&mut self, what: &str, buf: &[u8], offset: u64) -> Result<()> {
        self.write_host_as(super::overlap::NONE, what, buf, offset)
    }

    /// [`Meta::write_host`] for a write that rewrites metadata of the `allowed` kinds
    /// in place.
    pub fn write_host_as(
        &mut self,
        allowed: super::overlap::Allowed,
        what: &str,
        buf: &[u8],
        offset: u64,
    ) -> Result<()> {
        self.check_overlap(offset, buf.len() as u64, allowed)?;
        self.storage
            .write_at(buf, offset)
            .map_err(Meta::io_err(format!("writing {what} at {offset:#x}")))?;
        self.host_end = self.host_end.max(offset + buf.len() as u64);
        self.file_len = self.file_len.max(offset + buf.len() as u64);
        Ok(())
    }

    /// Flushes the host storage (a write barrier). Once a flush has failed, every later
    /// one fails too: the kernel may have dropped dirty pages and then reports success
    /// for pages it never wrote, so durability can no longer be promised.
    pub fn sync(&mut self) -> Result<()> {
        if self.no_flush {
            return Ok(());
        }
        if let Some(why) = &self.flush_failed {
            return Err(Error::io(
                why.clone(),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.storage.flush().map_err(|e| {
            let why = format!("flushing the image file failed earlier ({e})");
            self.flush_failed = Some(why);
            Error::io("flushing the image file", e)
        })
    }

    /// Rewrites a few bytes that switch the on-disk structure from one state to
    /// another (a table pointer, an L1 entry): `old` is what they held. When the
    /// write fails, the bytes are read back to learn whether the switch happened:
    /// `Ok` when it did, the write's error when the old bytes are still there, and the
    /// handle breaks when neither can be told.
    pub fn write_pointer(
        &mut self,
        allowed: super::overlap::Allowed,
        what: &str,
        offset: u64,
        new: &[u8],
        old: &[u8],
    ) -> Result<()> {
        let Err(e) = self.write_host_as(allowed, what, new, offset) else {
            return Ok(());
        };
        let mut now = vec![0u8; new.len()];
        match self.storage.read_at(&mut now, offset) {
            Ok(()) if now == new => Ok(()),
            Ok(()) if now == old => Err(e),
            _ => {
                self.broken = Some(format!(
                    "writing {what} at {offset:#x} failed and its contents cannot be told: {e}"
                ));
                self.in_doubt = true;
                Err(e)
            }
        }
    }

    /// Rewrites the whole header cluster from `self.header`.
    pub fn write_header(&mut self) -> Result<()> {
        let mut buf = self.header.serialize()?;
        buf.resize(self.cluster_size as usize, 0);
        self.write_host_as(Kind::Header as u16, "header", &buf, 0)
    }

    /// Rewrites the header cluster from `self.header`, switching from `old` (what the
    /// disk holds): a failed write is read back to learn whether it landed (see
    /// [`Meta::write_pointer`]); when it did not, `self.header` goes back to `old`.
    pub fn switch_header(&mut self, old: &Header) -> Result<()> {
        let cs = self.cluster_size as usize;
        let mut new = self.header.serialize()?;
        new.resize(cs, 0);
        let mut was = old.serialize()?;
        was.resize(cs, 0);
        let result = self.write_pointer(Kind::Header as u16, "header", 0, &new, &was);
        if result.is_err() && !self.in_doubt {
            self.header = old.clone();
        }
        result
    }

    /// Rewrites header fields at `offset` (QEMU's way of switching a table pointer
    /// atomically enough: a write inside one sector); see [`Meta::write_pointer`].
    pub fn write_header_fields(&mut self, offset: u64, bytes: &[u8], old: &[u8]) -> Result<()> {
        self.write_pointer(Kind::Header as u16, "header fields", offset, bytes, old)
    }

    /// Writes one L1 entry in place; `old` is the entry the disk holds. On failure
    /// the in-memory entry goes back to `old` unless the write is found to have landed.
    pub fn write_l1_entry(&mut self, index: usize, old: u64) -> Result<()> {
        let off = self.header.l1_table_offset + index as u64 * 8;
        let bytes = self.l1[index].to_be_bytes();
        let written = self.write_pointer(
            Kind::ActiveL1 as u16,
            "L1 entry",
            off,
            &bytes,
            &old.to_be_bytes(),
        );
        if written.is_err() {
            self.l1[index] = old;
        }
        written
    }

    /// Writes every dirty cached table back: refcount blocks first, a barrier, then L2
    /// tables, a barrier, then the deferred refcount decrements. Leaves the image
    /// consistent on disk. A failure leaves what was not written dirty (or pending),
    /// for the next flush to retry.
    pub fn flush_metadata(&mut self) -> Result<()> {
        if self.in_doubt {
            return Err(Error::Broken(
                self.broken.clone().unwrap_or_default() + "; reopen the image",
            ));
        }
        self.release_orphans()?;
        self.flush_compressed_cache()?;
        self.write_dirty_refcount_blocks()?;
        let dirty_l2 = self.l2_cache.dirty_keys();
        if !dirty_l2.is_empty() {
            self.sync()?;
            for key in dirty_l2 {
                self.write_l2_table(key)?;
            }
        }
        self.sync()?;
        if !self.rc.pending_frees.is_empty() {
            self.apply_pending_frees()?;
            self.write_dirty_refcount_blocks()?;
            self.sync()?;
        }
        Ok(())
    }

    /// Writes one cached L2 table to its place.
    pub fn write_l2_table(&mut self, key: u64) -> Result<()> {
        self.before_l2_write(key)?;
        let data = self
            .l2_cache
            .peek(key)
            .ok_or_else(|| corrupt!("L2 table at {key:#x} vanished from the cache"))?
            .to_vec();
        self.write_host_as(Kind::ActiveL2 as u16, "L2 table", &data, key)?;
        self.l2_cache.mark_clean(key);
        Ok(())
    }
}
