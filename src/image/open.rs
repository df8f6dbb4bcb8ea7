//! Opening an image: reading and validating the header and tables, sizing the caches,
//! opening the backing chain, loading persistent bitmaps, and QEMU's autoclear rule
//! for read-write opens.

use std::path::Path;
use std::sync::Arc;

use super::backing::Backing;
use super::cache::TableCache;
use super::meta::{Meta, RefcountState};
use super::OpenOptions;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::io::Storage;

/// Upper bound of the default L2 cache (QEMU's too).
const MAX_DEFAULT_L2_CACHE: u64 = 32 * 1024 * 1024;
/// Refcount blocks kept in memory.
pub(crate) const REFCOUNT_CACHE_BLOCKS: usize = 16;

fn read_exact(storage: &dyn Storage, len: u64, offset: u64, what: &str) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    storage
        .read_at(&mut buf, offset)
        .map_err(|e| Error::io(format!("reading {what} at {offset:#x}"), e))?;
    Ok(buf)
}

fn decode_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Reads everything `Meta` needs from `storage` and validates it.
pub(crate) fn open_meta(
    storage: Arc<dyn Storage>,
    opts: &OpenOptions,
    path: Option<&Path>,
    depth_left: u32,
    given_backing: Option<Backing>,
) -> Result<Meta> {
    let file_size = storage
        .len()
        .map_err(|e| Error::io("reading the image size", e))?;
    if file_size == 0 {
        return Err(Error::NotQcow2(
            "not a qcow2 image: the file is empty".into(),
        ));
    }
    let first = read_exact(&*storage, file_size.min(512), 0, "header")?;
    let cluster_bits = Header::peek_cluster_bits(&first)?;
    let cluster_size = 1u64 << cluster_bits;
    let header_bytes = read_exact(&*storage, file_size.min(cluster_size), 0, "header")?;
    let header = Header::parse(&header_bytes, file_size)?;
    let unlocked = super::encryption::unlock(&*storage, &header, opts, path)?;

    let marked_corrupt = header.incompatible_features & INCOMPAT_CORRUPT != 0;
    if !opts.read_only && marked_corrupt && !opts.check {
        return Err(corrupt!(
            "the image is marked corrupt; it can only be opened read-only"
        ));
    }

    let l1 = if header.l1_size > 0 {
        decode_table(&read_exact(
            &*storage,
            header.l1_size as u64 * 8,
            header.l1_table_offset,
            "L1 table",
        )?)
    } else {
        Vec::new()
    };
    let reftable = decode_table(&read_exact(
        &*storage,
        header.refcount_table_clusters as u64 * cluster_size,
        header.refcount_table_offset,
        "refcount table",
    )?);

    let l2_cache_bytes = if opts.l2_cache_size == 0 {
        (header.l1_size as u64 * cluster_size).min(MAX_DEFAULT_L2_CACHE)
    } else {
        opts.l2_cache_size
    };
    let l2_tables = (l2_cache_bytes / cluster_size).max(4) as usize;

    let mut backing = None;
    let mut backing_refused = false;
    if given_backing.is_some() {
        backing = given_backing;
    } else if let Some(name) = &header.backing_file {
        if opts.follow_backing {
            backing = Some(Backing::open(
                path,
                name,
                header.backing_format.as_deref(),
                opts,
                depth_left,
            )?);
        } else {
            backing_refused = true;
        }
    }

    let mut meta = Meta {
        storage,
        cluster_bits,
        cluster_size,
        l2_bits: cluster_bits - 3,
        rb_bits: cluster_bits + 3 - header.refcount_order,
        l1,
        l2_cache: TableCache::new(l2_tables),
        rc: RefcountState {
            table: reftable,
            blocks: TableCache::new(REFCOUNT_CACHE_BLOCKS),
            free_hint: 0,
            pending_frees: Vec::new(),
            orphans: Vec::new(),
        },
        backing: backing.map(Arc::new),
        backing_refused,
        backing_disabled: !opts.follow_backing,
        crypto: unlocked.crypto,
        encryption_info: unlocked.info,
        read_only: opts.read_only,
        discard_unmap: opts.discard_unmap,
        host_end: file_size,
        file_len: file_size,
        preallocated_end: file_size,
        preallocated: None,
        no_flush: opts.no_flush,
        broken: None,
        in_doubt: false,
        flush_failed: None,
        snapshots: Default::default(),
        bitmaps: Default::default(),
        compress: super::compress::CompressState::new(if opts.read_only {
            0
        } else {
            opts.compressed_cache_size
        }),
        header,
        gate: Default::default(),
        inflight: Default::default(),
        overlaps: Default::default(),
        check_mode: opts.check,
        overlap_checks: opts.overlap_checks,
    };

    meta.snapshots = meta.read_snapshot_table()?;
    meta.load_bitmaps(opts.drop_bitmaps)?;
    meta.rebuild_metadata_index();
    if let Some(name) = &opts.snapshot {
        meta.view_snapshot(name.as_bytes())?;
    }
    if marked_corrupt && !meta.read_only {
        meta.broken =
            Some("the image is marked corrupt; repair it with `check -r all` first".into());
    }
    if !meta.read_only && !opts.check && meta.header.incompatible_features & INCOMPAT_DIRTY != 0 {
        // Lazy refcounts and an unclean close: the refcounts on disk may be stale.
        // Rebuild them before anything is allocated (QEMU repairs on open too).
        meta.rebuild_refcounts()?;
    }

    if !meta.read_only && meta.header.version >= 3 {
        // Autoclear bits we do not maintain are cleared before the first write, as
        // QEMU does; the bitmaps we keep are marked in use (see `bitmaps.rs`).
        meta.claim_autoclear()?;
    }
    Ok(meta)
}
