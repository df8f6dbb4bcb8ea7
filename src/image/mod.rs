//! The image engine: [`Image`] is an open qcow2 image, safe to share between threads.
//!
//! Concurrency: one lock (`Meta`) guards the header, L1, caches and allocator, as
//! QEMU's `s->lock` does. Guest data I/O runs outside it (see `inflight.rs`).

mod amend;
mod backing;
mod bitmaps;
mod cache;
mod check;
mod cluster;
mod compress;
mod create;
mod encryption;
mod inflight;
mod layers;
mod meta;
mod open;
mod options;
pub(crate) mod overlap;
mod read;
mod refcount;
mod repair;
mod resize;
mod snapshot;
mod status;
mod txn;
mod vmstate;
mod write;
mod zero;

pub use amend::AmendOptions;
pub use bitmaps::{default_granularity, BitmapInfo, DirtyExtent};
pub use check::{CheckReport, Progress, Repair};
pub use compress::{ClusterCompressor, CompressedClusters, DEFAULT_COMPRESSED_CACHE_SIZE};
pub use options::*;
pub use snapshot::{SnapshotInfo, SnapshotOptions, MAX_SNAPSHOT_NAME};
pub use status::Extent;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::io::Storage;
use meta::Meta;

/// An open qcow2 image.
///
/// All methods take `&self` and may be called from many threads at once. Dropping an
/// image flushes its metadata (errors are lost then; call [`Image::close`] to see them).
pub struct Image {
    /// Shared with the VM state writer threads.
    meta: Arc<Mutex<Meta>>,
    /// Signalled when an allocation in flight ends (see `inflight.rs`).
    allocation_ended: Condvar,
    path: Option<PathBuf>,
    closed: bool,
    vmstate: vmstate::VmState,
    /// The image is encrypted: guest I/O goes through whole 512-byte sectors.
    encrypted: bool,
    /// Unaligned writes of an encrypted image hold this exclusively across their
    /// read-modify-write of partial sectors; aligned writes share it.
    sector_rmw: std::sync::RwLock<()>,
}

impl Image {
    /// Creates a new image file at `path` (which must not exist) of `size` bytes.
    /// With a backing file and `size == 0`, the backing file's size is used.
    pub fn create(path: &Path, size: u64, opts: &CreateOptions) -> Result<()> {
        create::create_file(path, size, opts)
    }

    /// Formats `storage` (which should be empty) as a new image.
    pub fn create_on(storage: Arc<dyn Storage>, size: u64, opts: &CreateOptions) -> Result<()> {
        create::format_storage(storage, size, opts, None)
    }

    /// Opens the image at `path`.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        Image::open_chain(path, opts, opts.max_backing_depth)
    }

    pub(crate) fn open_chain(path: &Path, opts: &OpenOptions, depth_left: u32) -> Result<Image> {
        if opts.force_share && !opts.read_only {
            return Err(Error::InvalidArgument(
                "force-share can only be used with read-only images".into(),
            ));
        }
        let storage = crate::io::FileStorage::open(path, !opts.read_only, opts.direct)
            .map_err(|e| Error::io(format!("cannot open '{}'", path.display()), e))?;
        lock_image_file(&storage, path, opts)?;
        let meta = open::open_meta(Arc::new(storage), opts, Some(path), depth_left, None)?;
        Ok(Image::from_meta(meta, Some(path.to_path_buf())))
    }

    /// Opens an image on any storage (tests use memory and fault-injecting storage).
    /// Relative backing file names resolve against the current directory.
    pub fn open_storage(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        let meta = open::open_meta(storage, opts, None, opts.max_backing_depth, None)?;
        Ok(Image::from_meta(meta, None))
    }

    /// Opens an image on any storage over a backing image the caller opened itself
    /// (instead of the backing file named in the header), as embedders that manage
    /// their own chains do. The backing image is owned by the new image from now on.
    pub fn open_storage_over(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        backing: Image,
    ) -> Result<Image> {
        let given = Some(backing::Backing::Qcow2(Box::new(backing)));
        let meta = open::open_meta(storage, opts, None, opts.max_backing_depth, given)?;
        Ok(Image::from_meta(meta, None))
    }

    fn from_meta(meta: Meta, path: Option<PathBuf>) -> Image {
        let cluster_size = meta.cluster_size;
        let encrypted = meta.header.crypt_method != 0;
        let meta = Arc::new(Mutex::new(meta));
        Image {
            vmstate: vmstate::VmState::new(Arc::clone(&meta), cluster_size),
            meta,
            allocation_ended: Condvar::new(),
            path,
            closed: false,
            encrypted,
            sector_rmw: std::sync::RwLock::new(()),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Meta>> {
        self.meta
            .lock()
            .map_err(|_| Error::Broken("an earlier call panicked while updating the image".into()))
    }

    fn check_range(meta: &Meta, len: usize, offset: u64, what: &str) -> Result<()> {
        Image::check_range64(meta, len as u64, offset, what)
    }

    fn check_range64(meta: &Meta, len: u64, offset: u64, what: &str) -> Result<()> {
        let size = meta.header.size;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "{what} of {len} bytes at offset {offset} exceeds the virtual size {size}"
            ))),
        }
    }

    /// Runs an operation that changes mappings wholesale, with no allocation or data
    /// transfer in flight (see `inflight.rs`), marking the handle broken if it finds
    /// corruption midway (host errors leave the metadata consistent).
    fn modify(&self, what: &str, f: impl FnOnce(&mut Meta) -> Result<()>) -> Result<()> {
        let mut meta = self.exclusive()?;
        meta.check_writable()?;
        f(&mut meta).map_err(|e| meta.judge(what, e))
    }

    /// Makes guest `[offset, offset+len)` read as zeros, in this layer, whatever the
    /// backing chain holds now or later. Whole clusters become zero clusters (v3);
    /// with `may_unmap` their host clusters are released too. Unaligned heads and tails
    /// allocate nothing when the rest of their cluster already reads as zero.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.modify("write_zeroes", |meta| {
            Image::check_range64(meta, len, offset, "write_zeroes")?;
            meta.write_zeroes(offset, len, may_unmap)
        })
    }

    /// Releases the whole clusters of guest `[offset, offset+len)`. They read as zeros
    /// afterwards (v2 images with a backing file: as the backing file); partial
    /// clusters at the edges are left as they are.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.modify("discard", |meta| {
            Image::check_range64(meta, len, offset, "discard")?;
            meta.discard(offset, len)
        })
    }

    /// Changes the virtual size. Growing always works (bytes past the old end read as
    /// zeros); shrinking fails when data is allocated past the new end unless `force`,
    /// which discards it. Images with internal snapshots cannot shrink.
    pub fn resize(&self, new_size: u64, force: bool) -> Result<()> {
        // The VM state area moves with the size: unfinalized state is written first.
        let mut vm = self.vmstate.quiesce(false)?;
        let result = self.modify("resize", |meta| meta.resize(new_size, force));
        vm.invalidate();
        result
    }

    /// The status of guest `[offset, offset+len)` (clamped to the virtual size) as
    /// merged extents, through the whole backing chain. At most `limit` extents are
    /// returned; they always start at `offset` and are contiguous.
    pub fn block_status(&self, offset: u64, len: u64, limit: usize) -> Result<Vec<Extent>> {
        let mut meta = self.lock()?;
        let size = meta.header.size;
        if offset > size {
            return Err(Error::InvalidArgument(format!(
                "block status at offset {offset} is past the virtual size {size}"
            )));
        }
        let len = len.min(size - offset);
        let mut out = Vec::new();
        meta.block_status(offset, len, 0, &mut out, limit.max(1))?;
        out.truncate(limit.max(1));
        if self.encrypted {
            // Host bytes of an encrypted image are not the guest's: like QEMU, no offset.
            out.iter_mut().for_each(|e| e.offset = None);
        }
        Ok(out)
    }

    /// Makes everything written so far durable. A failed write of metadata is
    /// retried by the next flush; once flushing the host file itself has failed,
    /// this and every later flush (and close) fail, since the kernel may have dropped
    /// written data, and writes are refused until the image is reopened.
    pub fn flush(&self) -> Result<()> {
        let mut meta = self.lock()?;
        if meta.read_only {
            return Ok(());
        }
        meta.flush_metadata()
    }

    /// Flushes and closes the image, returning the flush status.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        let vmstate = self.vmstate.shutdown();
        vmstate.and(self.flush()).and_then(|()| {
            let mut meta = self.lock()?;
            if meta.read_only {
                return Ok(());
            }
            meta.store_bitmaps()?;
            meta.trim_preallocation()
        })
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self.meta.lock() {
            Ok(m) => m.header.size,
            Err(poisoned) => poisoned.into_inner().header.size,
        }
    }

    /// The path the image was opened from ("" for storage opened directly).
    pub fn filename(&self) -> String {
        self.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// Facts about the image and its backing chain.
    pub fn info(&self) -> ImageInfo {
        let meta = match self.meta.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let h = &meta.header;
        ImageInfo {
            version: h.version,
            virtual_size: h.size,
            cluster_size: meta.cluster_size as u32,
            refcount_bits: 1 << h.refcount_order,
            lazy_refcounts: h.compatible_features & crate::format::header::COMPAT_LAZY_REFCOUNTS
                != 0,
            dirty: h.incompatible_features & crate::format::header::INCOMPAT_DIRTY != 0,
            corrupt: h.incompatible_features & crate::format::header::INCOMPAT_CORRUPT != 0,
            read_only: meta.read_only,
            compression_type: if h.compression_type == 1 {
                CompressionType::Zstd
            } else {
                CompressionType::Zlib
            },
            nb_snapshots: h.nb_snapshots,
            host_size: meta.host_end,
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            backing_chain: meta.backing.as_ref().map(|b| b.chain()).unwrap_or_default(),
            encryption: meta.encryption_info.clone(),
        }
    }

    /// True when `[offset, offset+len)` reads as zeros through the whole chain, known
    /// from metadata alone.
    pub(crate) fn range_reads_zero(&self, offset: u64, len: u64) -> Result<bool> {
        self.lock()?.range_reads_zero(offset, len)
    }
}

/// Takes the locks QEMU would take on an image file opened with `opts` (a read-write
/// open as a writer, read-only opens and backing files as readers) unless locking is
/// off; fails with [`Error::Busy`] naming the conflict, in QEMU's words.
pub(crate) fn lock_image_file(
    storage: &crate::io::FileStorage,
    path: &Path,
    opts: &OpenOptions,
) -> Result<()> {
    use crate::io::lock::LockMode;
    if !opts.locking {
        return Ok(());
    }
    let mode = match (opts.read_only, opts.force_share) {
        (false, _) => LockMode::WRITER,
        (true, false) => LockMode::READER,
        (true, true) => LockMode::SHARING_READER,
    };
    // A conflict that goes away within moments is waited out: a process another
    // thread is spawning holds copies of this process's descriptors (and so of the
    // locks of an image just closed) until it execs.
    let mut tries = 0;
    loop {
        match storage.lock(mode) {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(_)) if tries < LOCK_RETRIES => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(Err(conflict)) => {
                return Err(Error::Busy(format!(
                    "{conflict}: is another process using the image [{}]?",
                    path.display()
                )))
            }
            Err(e) => return Err(Error::io(format!("locking '{}'", path.display()), e)),
        }
    }
}

/// How many times a lock conflict is retried, 10 ms apart, before the open fails.
const LOCK_RETRIES: u32 = 5;

impl Drop for Image {
    fn drop(&mut self) {
        // Unfinalized VM state is written (and the writer threads stopped) first.
        let _ = self.vmstate.shutdown();
        if !self.closed {
            if let Ok(mut meta) = self.meta.lock() {
                if !meta.read_only
                    && meta.broken.is_none()
                    && meta.flush_metadata().is_ok()
                    && meta.store_bitmaps().is_ok()
                {
                    let _ = meta.trim_preallocation();
                }
            }
        }
    }
}
