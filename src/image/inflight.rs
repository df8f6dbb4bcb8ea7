//! Guest reads and writes with their data I/O outside the metadata lock.
//!
//! The lock (`Meta`) is held only to plan: map guest bytes to host runs, reserve new
//! clusters, and afterwards switch L2 entries. Three rules keep that safe:
//!
//! - **The I/O gate.** Every transfer done without the lock holds [`Meta::gate`]
//!   shared, taken before the lock is released. Before any host cluster's refcount
//!   reaches 0 (so before it can be reused), the freeing code, under the lock, takes
//!   the gate exclusively once ([`Meta::drain_data_io`]): transfers planned against an
//!   old mapping have ended by then, and new ones see the new mapping.
//! - **In-flight allocations.** An allocating write registers its guest clusters in
//!   [`InFlight`] until their L2 entries point to the filled clusters. A second write
//!   to one of them waits on the image's condition variable and plans again (then
//!   finds an owned cluster and writes in place). Readers keep seeing the old mapping,
//!   hence the old data, until the switch.
//! - **Exclusive operations.** Operations that change mappings wholesale (zeroes,
//!   discard, compressed writes, snapshots, resize) first wait until no allocation is
//!   in flight (holding new ones back) and then drain the gate ([`Image::exclusive`]).
//!
//! A thread never waits for the lock while it holds the gate, so the two cannot
//! deadlock. Compressed clusters are read and decompressed without the lock as well,
//! except the cached last one and bytes still in the compressed-write cache.

use std::sync::{Arc, MutexGuard, RwLock, RwLockReadGuard};

use super::backing::Backing;
use super::compress::{decompress_cluster, CompressedRead};
use super::encryption::Encryption;
use super::meta::Meta;
use super::read::ReadTask;
use super::write::WriteStep;
use super::CompressionType;
use super::Image;
use crate::error::{Error, Result};
use crate::io::Storage;

/// A cluster decompressed by a read, offered to the cache of the last one.
pub(crate) type Decompressed = Option<(CompressedRead, Box<[u8]>)>;

/// What a data transfer needs when it runs without the lock.
pub(crate) struct DataIo {
    pub storage: Arc<dyn Storage>,
    pub backing: Option<Arc<Backing>>,
    pub gate: Arc<RwLock<()>>,
    pub cluster_size: u64,
    pub compression: CompressionType,
    /// The cipher of an encrypted image (see `encryption.rs`).
    pub crypto: Option<Arc<Encryption>>,
    /// The image is encrypted (data I/O without `crypto` fails: no key).
    pub encrypted: bool,
}

impl DataIo {
    /// Holds the gate shared for the transfer about to run without the lock.
    fn enter(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `len` bytes at host offset `host`.
    pub(crate) fn read_host(&self, len: u64, host: u64, why: &str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.storage
            .read_at(&mut buf, host)
            .map_err(|e| Meta::io_err(format!("reading host {host:#x} for {why}"))(e))?;
        Ok(buf)
    }

    /// The cipher of an encrypted image (`None` when not encrypted); fails when the
    /// image is encrypted but was opened without its key.
    pub(crate) fn cipher(&self) -> Result<Option<&Encryption>> {
        match (&self.crypto, self.encrypted) {
            (Some(c), _) => Ok(Some(c)),
            (None, false) => Ok(None),
            (None, true) => Err(super::encryption::key_needed()),
        }
    }

    /// Reads `len` bytes of guest data at host offset `host` (guest offset `guest`),
    /// decrypted.
    pub(crate) fn read_data(&self, len: u64, host: u64, guest: u64, why: &str) -> Result<Vec<u8>> {
        let mut buf = self.read_host(len, host, why)?;
        if let Some(c) = self.cipher()? {
            c.decrypt(host, guest, &mut buf)?;
        }
        Ok(buf)
    }

    /// Writes guest data at host offset `host` (guest offset `guest`), encrypted on
    /// the way when the image is.
    pub(crate) fn write_data(&self, data: &[u8], host: u64, guest: u64) -> Result<()> {
        let written = match self.cipher()? {
            Some(c) => {
                let mut sealed = data.to_vec();
                c.encrypt(host, guest, &mut sealed)?;
                self.storage.write_at(&sealed, host)
            }
            None => self.storage.write_at(data, host),
        };
        // The message is built only on failure: this is every guest write's path.
        written.map_err(|e| Meta::io_err(format!("writing guest data at {host:#x}"))(e))
    }

    /// Reads unallocated guest bytes at `guest` from the backing chain (zeros without
    /// one).
    pub(crate) fn read_backing(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        match &self.backing {
            Some(b) => b.read_at(buf, guest),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Reads and decompresses a compressed cluster.
    pub(crate) fn decompress(&self, read: &CompressedRead) -> Result<Box<[u8]>> {
        let input = self.read_host(read.len, read.offset, "a compressed cluster")?;
        decompress_cluster(self.compression, self.cluster_size, read.offset, &input)
    }

    /// Runs planned read tasks into `buf`. Returns the last compressed cluster it
    /// decompressed, for the caller to keep (see `Meta::keep_decompressed`).
    pub(crate) fn run_reads(&self, buf: &mut [u8], tasks: &[ReadTask]) -> Result<Decompressed> {
        let mut last: Decompressed = None;
        for &task in tasks {
            match task {
                ReadTask::Host {
                    host,
                    guest,
                    start,
                    len,
                } => {
                    let piece = &mut buf[start..start + len];
                    self.storage.read_at(piece, host).map_err(|e| {
                        Meta::io_err(format!("reading guest data at host {host:#x}"))(e)
                    })?;
                    if let Some(c) = self.cipher()? {
                        c.decrypt(host, guest, piece)?;
                    }
                }
                ReadTask::Backing { guest, start, len } => {
                    self.read_backing(&mut buf[start..start + len], guest)?
                }
                ReadTask::Compressed {
                    read,
                    within,
                    start,
                    len,
                } => {
                    let data = match last.take() {
                        Some((r, data)) if r.offset == read.offset => data,
                        _ => self.decompress(&read)?,
                    };
                    buf[start..start + len].copy_from_slice(&data[within..within + len]);
                    last = Some((read, data));
                }
            }
        }
        Ok(last)
    }
}

/// Guest clusters being allocated by writes that run without the lock, and whether
/// an exclusive operation is waiting for them to end.
#[derive(Default)]
pub(crate) struct InFlight {
    /// (first guest cluster index, clusters) of each allocation in flight.
    runs: Vec<(u64, u64)>,
    /// Exclusive operations waiting: no new allocation starts meanwhile.
    exclusive_waiting: usize,
    /// Threads waiting on `Image::allocation_ended`: with none, ending an allocation
    /// makes no wake-up syscall.
    waiters: usize,
}

impl InFlight {
    /// True when any of the `n` guest clusters from index `first` is being allocated.
    pub(crate) fn busy(&self, first: u64, n: u64) -> bool {
        self.runs
            .iter()
            .any(|&(s, len)| s < first + n && first < s + len)
    }

    /// True when an exclusive operation waits for the allocations in flight to end.
    pub(crate) fn exclusive_waiting(&self) -> bool {
        self.exclusive_waiting > 0
    }

    pub(crate) fn register(&mut self, first: u64, n: u64) {
        self.runs.push((first, n));
    }

    pub(crate) fn unregister(&mut self, first: u64, n: u64) {
        if let Some(i) = self.runs.iter().position(|&r| r == (first, n)) {
            self.runs.swap_remove(i);
        }
    }

    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

impl Image {
    /// Reads `buf.len()` bytes at guest `offset`; the range must lie within the
    /// virtual size. Host and backing I/O run without the image lock, so reads and
    /// writes from many threads overlap.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.encrypted && super::encryption::unaligned(offset, buf.len()) {
            return self.read_unaligned_sectors(buf, offset);
        }
        self.read_aligned(buf, offset)
    }

    /// [`Image::read_at`] of a request an encrypted image can serve directly (whole
    /// sectors), or of any request of an unencrypted image.
    pub(crate) fn read_aligned(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut meta = self.lock()?;
        Image::check_range(&meta, buf.len(), offset, "read")?;
        let tasks = meta
            .plan_read(buf, offset)
            .map_err(|e| meta.judge("a read", e))?;
        if tasks.is_empty() {
            return Ok(());
        }
        let io = meta.data_io();
        let gate = io.enter();
        drop(meta);
        let last = io.run_reads(buf, &tasks)?;
        drop(gate);
        if let Some((read, data)) = last {
            // Reading a compressed cluster piece by piece decompresses it once.
            self.lock()?.keep_decompressed(read, data);
        }
        Ok(())
    }

    /// Writes `buf` at guest `offset`; the range must lie within the virtual size.
    /// Data I/O (including copy-on-write reads) runs without the image lock; a write
    /// into a cluster another write is allocating waits for that allocation. On
    /// failure (EIO, ENOSPC) the handle stays usable and the same write succeeds once
    /// the cause is gone; what the range reads as meanwhile is undefined, as on a disk
    /// (old bytes, new bytes, or a mix), while everything outside it is unchanged and
    /// no cluster leaks.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.encrypted {
            if super::encryption::unaligned(offset, buf.len()) {
                return self.write_unaligned_sectors(buf, offset);
            }
            let _shared = self.sector_rmw.read().unwrap_or_else(|e| e.into_inner());
            return self.write_aligned(buf, offset);
        }
        self.write_aligned(buf, offset)
    }

    /// [`Image::write_at`] of whole sectors (any request for an unencrypted image).
    pub(crate) fn write_aligned(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut meta = self.lock()?;
        meta.check_writable()?;
        Image::check_range(&meta, buf.len(), offset, "write")?;
        // Set before the data lands: a failed write's range is undefined, so dirty.
        meta.mark_dirty(offset, buf.len() as u64);
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let step = match meta.plan_write(&buf[done..], at, false) {
                Ok(step) => step,
                Err(e) => return Err(meta.judge("a write", e)),
            };
            match step {
                WriteStep::Wait => {
                    meta = self.wait(meta)?;
                    meta.check_writable()?;
                }
                WriteStep::InPlace { host, len } => {
                    let io = meta.data_io();
                    let gate = io.enter();
                    drop(meta);
                    let written = io.write_data(&buf[done..done + len], host, at);
                    drop(gate);
                    done += len;
                    if written.is_ok() && done == buf.len() {
                        return Ok(());
                    }
                    meta = self.lock()?;
                    if let Err(e) = written {
                        return Err(meta.judge("a write", e));
                    }
                    meta.check_writable()?;
                }
                WriteStep::Allocate(a) => {
                    let io = meta.data_io();
                    let gate = io.enter();
                    drop(meta);
                    let filled = a.fill(&io, &buf[done..done + a.len()]);
                    drop(gate);
                    meta = self.lock()?;
                    let finished = meta.finish_allocation(&a, filled);
                    if meta.inflight.waiters > 0 {
                        self.allocation_ended.notify_all();
                    }
                    if let Err(e) = finished {
                        return Err(meta.judge("a write", e));
                    }
                    done += a.len();
                    if done < buf.len() {
                        meta.check_writable()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits (releasing the lock) until an allocation in flight ends or an exclusive
    /// operation is done.
    fn wait<'a>(&'a self, mut meta: MutexGuard<'a, Meta>) -> Result<MutexGuard<'a, Meta>> {
        // Counted under the lock, so a notifier holding it afterwards sees us.
        meta.inflight.waiters += 1;
        let mut meta = self.allocation_ended.wait(meta).map_err(|_| {
            Error::Broken("an earlier call panicked while updating the image".into())
        })?;
        meta.inflight.waiters -= 1;
        Ok(meta)
    }

    /// Takes the lock for an operation that changes mappings wholesale: waits until no
    /// allocation is in flight (new ones wait meanwhile), then until every data
    /// transfer without the lock has ended.
    pub(crate) fn exclusive(&self) -> Result<MutexGuard<'_, Meta>> {
        let mut meta = self.lock()?;
        meta.inflight.exclusive_waiting += 1;
        while !meta.inflight.is_empty() {
            meta = self.wait(meta)?;
        }
        meta.inflight.exclusive_waiting -= 1;
        if meta.inflight.exclusive_waiting == 0 && meta.inflight.waiters > 0 {
            // Writes held back for us plan again once we release the lock.
            self.allocation_ended.notify_all();
        }
        meta.drain_data_io();
        Ok(meta)
    }
}
