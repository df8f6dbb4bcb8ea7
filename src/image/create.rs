//! Creating images: validate the options, write a minimal image (header, one-cluster
//! refcount table, one refcount block), then let the allocator place the L1 table —
//! the same layout `qemu-img create` produces.

use std::path::Path;
use std::sync::Arc;

use super::backing::{backing_format, resolve_backing_path, Backing};
use super::{CompressionType, CreateOptions, Image, OpenOptions, Preallocation};
use crate::error::{Error, Result};
use crate::format::entry::{COPIED, OFFSET_MASK};
use crate::format::header::{
    Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, MAX_BACKING_NAME, MAX_CLUSTER_BITS,
    MAX_L1_BYTES, MIN_CLUSTER_BITS,
};
use crate::format::refcount;
use crate::invalid;
use crate::io::{FileStorage, Storage};

fn validate(size: u64, opts: &CreateOptions) -> Result<(u32, u32)> {
    if opts.version != 2 && opts.version != 3 {
        return Err(invalid!("version must be 2 or 3, not {}", opts.version));
    }
    let cs = opts.cluster_size;
    if !cs.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cs.trailing_zeros())
    {
        return Err(invalid!(
            "cluster size {cs} must be a power of two from 512 to 2097152"
        ));
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(invalid!(
            "refcount width {rb} must be a power of two from 1 to 64"
        ));
    }
    if opts.version == 2 && rb != 16 {
        return Err(invalid!(
            "version 2 images support only 16-bit refcounts (asked for {rb})"
        ));
    }
    if opts.version == 2 && opts.lazy_refcounts {
        return Err(invalid!("lazy refcounts need a version 3 image"));
    }
    if opts.version == 2 && opts.compression_type != CompressionType::Zlib {
        return Err(invalid!("zstd compression needs a version 3 image"));
    }
    let cluster_bits = cs.trailing_zeros();
    let max = 1u64 << (2 * cluster_bits + 19).min(56);
    if size > max {
        return Err(invalid!(
            "image size {size} exceeds the maximum {max} for {cs}-byte clusters"
        ));
    }
    if opts.preallocation != Preallocation::Off {
        if opts.backing_file.is_some() {
            return Err(invalid!(
                "preallocation={} cannot be used with a backing file",
                opts.preallocation.name()
            ));
        }
        if opts.encryption.is_some() {
            return Err(invalid!(
                "preallocation={} is not supported for encrypted images",
                opts.preallocation.name()
            ));
        }
    }
    if let Some(b) = &opts.backing_file {
        if b.len() > MAX_BACKING_NAME as usize {
            return Err(invalid!(
                "backing file name is longer than {MAX_BACKING_NAME} bytes"
            ));
        }
    }
    if let Some(f) = &opts.backing_format {
        if f != "qcow2" && f != "raw" {
            return Err(invalid!(
                "backing format '{f}' is not supported (qcow2 or raw)"
            ));
        }
        if opts.backing_file.is_none() {
            return Err(invalid!("a backing format needs a backing file"));
        }
    }
    Ok((cluster_bits, rb.trailing_zeros()))
}

/// Rounds a requested size up to whole 512-byte sectors, as qemu-img does.
fn round_size(size: u64) -> Result<u64> {
    size.checked_next_multiple_of(512)
        .ok_or_else(|| invalid!("image size {size} is too large"))
}

/// Creates the file at `path` and formats it; removes it again if formatting fails.
pub(crate) fn create_file(path: &Path, size: u64, opts: &CreateOptions) -> Result<()> {
    let size = round_size(size)?;
    validate(size, opts)?;
    let storage = FileStorage::create(path)
        .map_err(|e| Error::io(format!("cannot create '{}'", path.display()), e))?;
    let result = format_storage(Arc::new(storage), size, opts, Some(path));
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Writes a new image onto `storage`. `path` (if any) resolves relative backing names.
pub(crate) fn format_storage(
    storage: Arc<dyn Storage>,
    size: u64,
    opts: &CreateOptions,
    path: Option<&Path>,
) -> Result<()> {
    let mut size = round_size(size)?;
    let (cluster_bits, refcount_order) = validate(size, opts)?;
    let mut opts = opts.clone();
    if opts.backing_file.is_some() && !opts.open_backing {
        // qemu-img create -u: nothing to learn from the backing file.
        if size == 0 {
            return Err(invalid!(
                "a size is needed when the backing file is not opened"
            ));
        }
        if opts.backing_format.is_none() {
            return Err(invalid!(
                "a backing format is needed when the backing file is not opened"
            ));
        }
    } else if let Some(name) = &opts.backing_file {
        // Check the backing file now (as qemu-img does) and learn its size and format.
        let resolved = resolve_backing_path(path, name);
        let fmt = backing_format(&resolved, opts.backing_format.as_deref())?;
        // Only its size is read: it may be in use (qemu-img create shares it too).
        let probe = OpenOptions {
            read_only: true,
            force_share: true,
            ..OpenOptions::default()
        };
        let backing = Backing::open(path, name, Some(fmt), &probe, probe.max_backing_depth)?;
        if size == 0 {
            size = backing.size().div_ceil(512) * 512;
        }
        opts.backing_format = Some(fmt.to_string());
    }
    validate(size, &opts)?;
    let crypt_method =
        super::encryption::validate_create(opts.encryption.as_ref(), opts.secret.as_ref())?;

    let cs = 1u64 << cluster_bits;
    // The header starts with size 0 (so it is valid without an L1 table); the real
    // size is written together with the L1 table pointer.
    let mut header = Header::new(opts.version, cluster_bits, 0, refcount_order);
    header.refcount_table_offset = cs;
    header.refcount_table_clusters = 1;
    if opts.lazy_refcounts {
        header.compatible_features |= COMPAT_LAZY_REFCOUNTS;
    }
    if opts.compression_type == CompressionType::Zstd {
        header.compression_type = 1;
        header.incompatible_features |= INCOMPAT_COMPRESSION;
    }
    header.backing_file = opts.backing_file.clone();
    header.backing_format = opts.backing_format.clone();
    if crypt_method == crate::format::header::CRYPT_AES {
        // Legacy AES has no header of its own: the method alone says it.
        header.crypt_method = crypt_method;
    }

    let mut first = header.serialize()?;
    first.resize(cs as usize, 0);
    let mut reftable = vec![0u8; cs as usize];
    reftable[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut block = vec![0u8; cs as usize];
    for i in 0..3 {
        refcount::set(&mut block, i, refcount_order, 1)?;
    }
    let io = |e| Error::io("writing the new image", e);
    storage.write_at(&first, 0).map_err(io)?;
    storage.write_at(&reftable, cs).map_err(io)?;
    storage.write_at(&block, 2 * cs).map_err(io)?;
    storage.flush().map_err(io)?;

    let l2_span = 1u64 << (2 * cluster_bits - 3);
    let l1_size = size.div_ceil(l2_span);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(invalid!(
            "image size {size} needs an L1 table beyond 32 MiB"
        ));
    }
    {
        let image = Image::open_storage(
            storage,
            &OpenOptions {
                follow_backing: false,
                metadata_only: true,
                ..OpenOptions::default()
            },
        )?;
        {
            let mut meta = image.lock()?;
            meta.create_l1_table(l1_size, size)?;
            if let (Some(super::EncryptionFormat::Luks(luks)), Some(secret)) =
                (&opts.encryption, &opts.secret)
            {
                meta.create_luks_area(luks, secret)?;
            }
            meta.preallocate(opts.preallocation, size)?;
        }
        image.close()?;
    }
    Ok(())
}

impl super::meta::Meta {
    /// Preallocates a new, empty image of `size` bytes as `mode` asks: an L2 table
    /// for every L1 entry, each followed by the data clusters it maps (QEMU's
    /// layout), then the data space reserved or zeroed.
    fn preallocate(&mut self, mode: Preallocation, size: u64) -> Result<()> {
        if mode == Preallocation::Off || size == 0 {
            return Ok(());
        }
        let cs = self.cluster_size;
        let clusters = size.div_ceil(cs);
        let per_l2 = 1u64 << self.l2_bits;
        let data_start = self.host_end;
        let mut guest = 0u64;
        let mut data_runs = Vec::new();
        while guest < clusters {
            let (l1_index, _) = self.indexes(guest * cs);
            let table = self.writable_l2_table(l1_index)?;
            let mut n = (per_l2 - guest % per_l2).min(clusters - guest);
            // Stop at the next refcount block's range: the allocator puts a new
            // block at the start of its range, and a run crossing it would start
            // after it and leave the clusters before it unused.
            let next = self.host_end >> self.cluster_bits;
            let per_block = 1u64 << self.rb_bits;
            n = n.min(per_block - next % per_block);
            let host = self.alloc_clusters(n)?;
            for i in 0..n {
                self.set_l2_entry(table, (guest + i) * cs, (host + i * cs) | COPIED)?;
            }
            data_runs.push((host, n * cs));
            guest += n;
        }
        self.flush_metadata()?;
        let end = self.host_end;
        let io = |what: &'static str| move |e| Error::io(what, e);
        match mode {
            Preallocation::Off | Preallocation::Metadata => {
                if self.storage.len().map_err(io("reading the image length"))? < end {
                    self.storage
                        .set_len(end)
                        .map_err(io("extending the preallocated image"))?;
                }
            }
            Preallocation::Falloc => self
                .storage
                .preallocate(data_start, end - data_start)
                .and_then(|()| {
                    // Storage that cannot reserve space still gets the length.
                    if self.storage.len()? < end {
                        self.storage.set_len(end)?;
                    }
                    Ok(())
                })
                .map_err(io("reserving the preallocated data"))?,
            Preallocation::Full => {
                let zeros = vec![0u8; (1 << 20).max(cs as usize)];
                for (host, len) in data_runs {
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(zeros.len() as u64) as usize;
                        self.storage
                            .write_at(&zeros[..n], host + done)
                            .map_err(io("writing zeros over the preallocated data"))?;
                        done += n as u64;
                    }
                }
            }
        }
        self.file_len = self.file_len.max(end);
        self.sync()
    }

    /// Allocates and zeroes a fresh L1 table of `entries`, then points the header at it
    /// and sets the virtual size.
    fn create_l1_table(&mut self, entries: u64, size: u64) -> Result<()> {
        self.header.size = size;
        if entries == 0 {
            self.write_header()?;
            return self.sync();
        }
        let bytes = entries * 8;
        let clusters = bytes.div_ceil(self.cluster_size);
        let offset = self.alloc_clusters(clusters)?;
        debug_assert_eq!(offset & !OFFSET_MASK, 0);
        // Like qemu-img, write only the table's bytes: the file ends right after them.
        let zeros = vec![0u8; bytes.min(1 << 20) as usize];
        let mut done = 0;
        while done < bytes {
            let n = (bytes - done).min(zeros.len() as u64) as usize;
            self.write_host("new L1 table", &zeros[..n], offset + done)?;
            done += n as u64;
        }
        self.write_dirty_refcount_blocks()?;
        self.sync()?;
        self.header.l1_size = entries as u32;
        self.header.l1_table_offset = offset;
        self.l1 = vec![0; entries as usize];
        self.write_header()?;
        self.sync()?;
        Ok(())
    }
}
