//! Compressed clusters: decompression for reads and copy-on-write, compression on
//! worker threads, byte-granular packing of compressed clusters into host clusters,
//! and the compressed-write cache that turns many small unaligned writes into full,
//! aligned host-cluster writes.
//!
//! Write order with the cache (see docs/ARCHITECTURE.md, "Compressed clusters"): an L2
//! entry may point at compressed bytes that are still only in the cache. Such L2
//! tables are remembered (`dependents`); writing one of them back first writes out the
//! cache and flushes the host file, so the data always reaches the disk before the
//! mapping. `flush_metadata` writes the cache first of all.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::meta::Meta;
use super::CompressionType;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::compressed;
use crate::format::entry::Mapping;

/// Default memory bound of the compressed-write cache.
pub const DEFAULT_COMPRESSED_CACHE_SIZE: u64 = 4 * 1024 * 1024;

/// Alignment of cache buffers, so O_DIRECT writes need no bounce buffer.
const BUFFER_ALIGN: usize = 4096;

/// Deflate settings QEMU writes with: level 6, 4 KiB window (raw deflate, no header).
const DEFLATE_LEVEL: u32 = 6;
const DEFLATE_WINDOW_BITS: u8 = 12;
/// zstd level QEMU writes with (the library default).
const ZSTD_LEVEL: i32 = 3;

/// A cluster-sized buffer whose memory is `BUFFER_ALIGN`-aligned.
struct AlignedCluster {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedCluster {
    fn new(len: usize) -> AlignedCluster {
        let raw = vec![0u8; len + BUFFER_ALIGN];
        let start = raw.as_ptr().align_offset(BUFFER_ALIGN);
        AlignedCluster { raw, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// One host cluster held by the write cache.
struct CachedCluster {
    data: AlignedCluster,
    /// Holds bytes not yet written to the host.
    dirty: bool,
}

/// The compressed-write cache: host clusters being filled with compressed data.
struct WriteCache {
    /// Write out complete clusters once this many dirty bytes are buffered.
    limit: u64,
    /// Buffered host clusters by host offset.
    clusters: BTreeMap<u64, CachedCluster>,
}

/// Compression state of an open image (a field of [`Meta`]).
pub(crate) struct CompressState {
    /// The next free byte of the host cluster compressed clusters are packed into
    /// (`None`: the next compressed cluster starts a new host cluster).
    tail: Option<u64>,
    /// The compressed-write cache (`None`: each compressed cluster is written directly).
    cache: Option<WriteCache>,
    /// Dirty L2 tables with entries pointing at bytes still only in the cache.
    dependents: HashSet<u64>,
    /// The last cluster decompressed: (host byte offset, contents).
    last: Option<(u64, Box<[u8]>)>,
    /// Counts releases of host clusters: a cluster decompressed without the lock is
    /// kept as `last` only if none happened meanwhile (its bytes may be reused).
    generation: u64,
}

/// A compressed cluster to read and decompress without the lock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CompressedRead {
    /// Host byte offset of the compressed data (as the L2 descriptor names it).
    pub offset: u64,
    /// Bytes to read there (clamped to the file).
    pub len: u64,
    /// `CompressState::generation` when planned.
    pub generation: u64,
}

impl CompressState {
    /// Compression state for an image opened with a cache of `cache_size` bytes
    /// (0 = no cache).
    pub fn new(cache_size: u64) -> CompressState {
        CompressState {
            tail: None,
            cache: (cache_size > 0).then(|| WriteCache {
                limit: cache_size,
                clusters: BTreeMap::new(),
            }),
            dependents: HashSet::new(),
            last: None,
            generation: 0,
        }
    }
}

/// Decompresses the compressed cluster read from host byte `offset` (`input`) into a
/// new cluster-sized buffer; a cluster that does not decompress to exactly that size
/// is corrupt.
pub(crate) fn decompress_cluster(
    kind: CompressionType,
    cluster_size: u64,
    offset: u64,
    input: &[u8],
) -> Result<Box<[u8]>> {
    let mut out = vec![0u8; cluster_size as usize].into_boxed_slice();
    decompress(kind, input, &mut out).map_err(|why| {
        corrupt!(
            "compressed cluster at {offset:#x} does not decompress to {cluster_size} bytes: {why}"
        )
    })?;
    Ok(out)
}

thread_local! {
    /// One inflate state per thread, reset per cluster: building one costs more than
    /// decompressing a small cluster.
    static INFLATE: std::cell::RefCell<Option<Decompress>> = const { std::cell::RefCell::new(None) };
    /// One zstd decompression context per thread, reinitialised per cluster.
    static UNZSTD: std::cell::RefCell<Option<zstd::stream::raw::Decoder<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses one cluster: `out` (exactly one cluster) must be filled completely.
/// Input beyond the end of the stream is ignored; deflate streams with any window
/// size are accepted. The codec state is the calling thread's, reused.
pub(crate) fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), String> {
    match kind {
        CompressionType::Zlib => INFLATE.with_borrow_mut(|slot| {
            let d = slot.get_or_insert_with(|| Decompress::new(false));
            d.reset(false);
            match d.decompress(input, out, FlushDecompress::Finish) {
                Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
                Ok(_) => Err(format!(
                    "the deflate stream ends after {} bytes",
                    d.total_out()
                )),
                Err(e) => Err(format!("invalid deflate data ({e})")),
            }
        }),
        CompressionType::Zstd => UNZSTD.with_borrow_mut(|slot| {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let d = match slot {
                Some(d) => d,
                None => slot.insert(Decoder::new().map_err(|e| format!("zstd: {e}"))?),
            };
            // A clean state whatever the last cluster left (a failure mid-frame).
            d.reinit().map_err(|e| format!("zstd: {e}"))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            loop {
                let (in_before, out_before) = (inb.pos(), outb.pos());
                let hint = d
                    .run(&mut inb, &mut outb)
                    .map_err(|e| format!("invalid zstd data ({e})"))?;
                let produced = outb.pos();
                if produced == outb.capacity() {
                    return Ok(());
                }
                if hint == 0 {
                    return Err(format!("the zstd frame ends after {produced} bytes"));
                }
                if inb.pos() == in_before && produced == out_before {
                    return Err(format!("the zstd data is truncated after {produced} bytes"));
                }
            }
        }),
    }
}

/// A reusable compressor of one cluster at a time.
enum Compressor {
    Deflate(Box<Compress>),
    Zstd(Box<zstd::bulk::Compressor<'static>>),
}

impl Compressor {
    fn new(kind: CompressionType) -> Result<Compressor> {
        Ok(match kind {
            CompressionType::Zlib => Compressor::Deflate(Box::new(Compress::new_with_window_bits(
                Compression::new(DEFLATE_LEVEL),
                false,
                DEFLATE_WINDOW_BITS,
            ))),
            CompressionType::Zstd => Compressor::Zstd(Box::new(
                zstd::bulk::Compressor::new(ZSTD_LEVEL)
                    .map_err(|e| Error::io("creating a zstd compressor", e))?,
            )),
        })
    }

    /// Compresses `input` into at most `limit` bytes; `None` when it does not fit.
    fn compress(&mut self, input: &[u8], limit: usize) -> Result<Option<Vec<u8>>> {
        let mut out = vec![0u8; limit];
        match self {
            Compressor::Deflate(c) => {
                c.reset();
                let status = c
                    .compress(input, &mut out, FlushCompress::Finish)
                    .map_err(|e| Error::InvalidArgument(format!("deflate failed: {e}")))?;
                if status != Status::StreamEnd {
                    return Ok(None);
                }
                out.truncate(c.total_out() as usize);
            }
            Compressor::Zstd(c) => match c.compress_to_buffer(input, &mut out[..]) {
                Ok(n) => out.truncate(n),
                Err(_) => return Ok(None), // does not fit
            },
        }
        Ok(Some(out))
    }
}

/// A cluster's index in a batch and its compressed form (`None`: did not compress).
type Compressed = (usize, Option<Vec<u8>>);

/// Compresses every cluster of `inputs` on up to as many threads as there are cores,
/// keeping the order. An entry is `None` when its cluster does not compress to less
/// than a cluster minus one byte (it is then stored as a normal cluster).
pub(crate) fn compress_clusters(
    kind: CompressionType,
    cluster_size: usize,
    inputs: &[&[u8]],
) -> Result<Vec<Option<Vec<u8>>>> {
    let limit = cluster_size - 1;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(inputs.len());
    if threads <= 1 {
        let mut c = Compressor::new(kind)?;
        return inputs.iter().map(|i| c.compress(i, limit)).collect();
    }
    // Helpers get their own copy of the clusters (plain threads need 'static data;
    // std::thread::scope would leave a thread handle behind on a C caller's thread).
    let cs = cluster_size;
    let mut all = Vec::with_capacity(inputs.len() * cs);
    for i in inputs {
        all.extend_from_slice(i);
        all.resize(all.len().next_multiple_of(cs), 0);
    }
    let all = Arc::new(all);
    let count = inputs.len();
    let next = Arc::new(AtomicUsize::new(0));
    let work = move |all: &[u8], next: &AtomicUsize| -> Result<Vec<Compressed>> {
        let mut c = Compressor::new(kind)?;
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                return Ok(done);
            }
            done.push((i, c.compress(&all[i * cs..(i + 1) * cs], limit)?));
        }
    };
    let helpers: Vec<_> = (1..threads)
        .map(|_| {
            let (all, next) = (all.clone(), next.clone());
            std::thread::Builder::new()
                .name("cowdisk-compress".into())
                .spawn(move || work(&all, &next))
                .map_err(|e| Error::io("starting a compression thread", e))
        })
        .collect::<Result<_>>()?;
    // The calling thread works too.
    let mut parts = vec![work(&all, &next)];
    for h in helpers {
        parts.push(h.join().unwrap_or_else(|_| {
            Err(Error::InvalidArgument(
                "a compression thread panicked".into(),
            ))
        }));
    }
    let mut out: Vec<Option<Vec<u8>>> = vec![None; inputs.len()];
    for part in parts {
        for (i, c) in part? {
            out[i] = c;
        }
    }
    Ok(out)
}

impl Meta {
    /// The compression type of this image's compressed clusters.
    pub(crate) fn compression_type(&self) -> CompressionType {
        if self.header.compression_type == 1 {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        }
    }

    fn refcount_max(&self) -> u64 {
        match self.header.refcount_order {
            6 => u64::MAX,
            o => (1u64 << (1u32 << o)) - 1,
        }
    }

    /// Reads the `len` bytes of compressed data at host byte `offset` (as the L2
    /// descriptor names them), taking bytes still in the write cache from there.
    fn read_compressed_bytes(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let cs = self.cluster_size;
        let len = self.compressed_extent(offset, len)?;
        let mut buf = vec![0u8; len as usize];
        self.storage
            .read_at(&mut buf, offset)
            .map_err(Meta::io_err(format!(
                "reading compressed cluster at {offset:#x}"
            )))?;
        if let Some(cache) = &self.compress.cache {
            let end = offset + len;
            let first = offset & !(cs - 1);
            for (&host, c) in cache.clusters.range(first..end) {
                let from = host.max(offset);
                let to = (host + cs).min(end);
                buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(
                    &c.data.as_slice()[(from - host) as usize..(to - host) as usize],
                );
            }
        }
        Ok(buf)
    }

    /// Checks where a compressed cluster's bytes lie and returns how many to read (the
    /// last sector named may run past the end of the file: only what exists).
    fn compressed_extent(&self, offset: u64, len: u64) -> Result<u64> {
        if offset < self.cluster_size || offset >= self.host_end {
            return Err(corrupt!(
                "compressed cluster at {offset:#x} lies outside the file ({} bytes)",
                self.host_end
            ));
        }
        Ok(len.min(self.host_end - offset))
    }

    /// Plans reading the compressed cluster at `[offset, offset+len)` without the
    /// lock; `None` when it must be read under the lock (it is the cached last cluster,
    /// or some of its bytes are still only in the write cache).
    pub(crate) fn plan_compressed_read(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<CompressedRead>> {
        let c = &self.compress;
        if matches!(&c.last, Some((o, _)) if *o == offset) {
            return Ok(None);
        }
        let len = self.compressed_extent(offset, len)?;
        if let Some(cache) = &c.cache {
            let first = offset & !(self.cluster_size - 1);
            if cache.clusters.range(first..offset + len).next().is_some() {
                return Ok(None);
            }
        }
        Ok(Some(CompressedRead {
            offset,
            len,
            generation: c.generation,
        }))
    }

    /// Keeps a cluster decompressed without the lock as the last one, unless a host
    /// cluster was released since it was planned.
    pub(crate) fn keep_decompressed(&mut self, read: CompressedRead, data: Box<[u8]>) {
        if self.compress.generation == read.generation {
            self.compress.last = Some((read.offset, data));
        }
    }

    /// The decompressed contents of the compressed cluster whose descriptor names
    /// `[offset, offset+len)`. The last cluster decompressed is kept, so reading a
    /// compressed cluster piece by piece decompresses it once.
    pub(crate) fn decompressed(&mut self, offset: u64, len: u64) -> Result<&[u8]> {
        let hit = matches!(&self.compress.last, Some((o, _)) if *o == offset);
        if !hit {
            let input = self.read_compressed_bytes(offset, len)?;
            let out =
                decompress_cluster(self.compression_type(), self.cluster_size, offset, &input)?;
            self.compress.last = Some((offset, out));
        }
        Ok(&self.compress.last.as_ref().expect("just filled").1)
    }

    /// Called when the refcount of the host cluster at `host` drops to 0: the packing
    /// tail and cached buffers there are forgotten, so the cluster can be reused.
    pub(crate) fn compressed_host_cluster_freed(&mut self, host: u64) {
        let cs = self.cluster_size;
        let c = &mut self.compress;
        if c.tail.is_some_and(|t| t & !(cs - 1) == host) {
            c.tail = None;
        }
        if let Some(cache) = &mut c.cache {
            cache.clusters.remove(&host);
        }
        c.last = None;
        c.generation += 1;
    }

    /// Chooses where `len` compressed bytes go: right after the previous compressed
    /// cluster when they fit in its host cluster (or the next host cluster is free to
    /// continue in), else at the start of a new host cluster. Every host cluster the
    /// bytes touch gets one more reference; they are returned too, for the caller to
    /// give back if storing the bytes fails.
    fn place_compressed(&mut self, len: u64) -> Result<(u64, Vec<u64>)> {
        let cs = self.cluster_size;
        let mut start = None;
        let mut touched = Vec::new();
        if let Some(t) = self.compress.tail {
            let cluster = t & !(cs - 1);
            let rc = self.refcount(cluster >> self.cluster_bits)?;
            if rc > 0 && rc < self.refcount_max() {
                if t + len <= cluster + cs {
                    self.update_refcounts(cluster, 1, true)?;
                    touched.push(cluster);
                    start = Some(t);
                } else {
                    let new = self.alloc_clusters(1)?;
                    touched.push(new);
                    // The allocation may have flushed and freed the tail cluster.
                    if new == cluster + cs && self.compress.tail == Some(t) {
                        if let Err(e) = self.update_refcounts(cluster, 1, true) {
                            self.release_unreferenced(new, 1);
                            return Err(e);
                        }
                        touched.push(cluster);
                        start = Some(t);
                    } else {
                        start = Some(new);
                    }
                }
            }
        }
        let start = match start {
            Some(s) => s,
            None => {
                let new = self.alloc_clusters(1)?;
                touched.push(new);
                new
            }
        };
        let end = start + len;
        if end > 1u64 << compressed::offset_bits(self.cluster_bits) {
            for c in touched {
                self.release_unreferenced(c, 1);
            }
            return Err(Error::NoSpace(format!(
                "compressed cluster at {start:#x} is beyond what a compressed descriptor can address"
            )));
        }
        self.compress.tail = (!end.is_multiple_of(cs)).then_some(end);
        Ok((start, touched))
    }

    /// Stores compressed bytes at host `offset`: into the cache, or straight to the host.
    fn store_compressed(&mut self, data: &[u8], offset: u64) -> Result<()> {
        if self.compress.cache.is_none() {
            return self.write_host("compressed cluster", data, offset);
        }
        let cs = self.cluster_size;
        let end = offset + data.len() as u64;
        let mut host = offset & !(cs - 1);
        while host < end {
            let present = self
                .compress
                .cache
                .as_ref()
                .is_some_and(|c| c.clusters.contains_key(&host));
            if !present {
                let mut data = AlignedCluster::new(cs as usize);
                if offset > host {
                    // Earlier compressed clusters live in this host cluster: keep them.
                    self.storage
                        .read_at(&mut data.as_mut_slice()[..(offset - host) as usize], host)
                        .map_err(Meta::io_err(format!(
                            "reading host cluster at {host:#x} for the compressed-write cache"
                        )))?;
                }
                let cache = self.compress.cache.as_mut().expect("cache on");
                cache
                    .clusters
                    .insert(host, CachedCluster { data, dirty: false });
            }
            let cache = self.compress.cache.as_mut().expect("cache on");
            let c = cache.clusters.get_mut(&host).expect("just inserted");
            let from = offset.max(host);
            let to = end.min(host + cs);
            c.data.as_mut_slice()[(from - host) as usize..(to - host) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            c.dirty = true;
            host += cs;
        }
        Ok(())
    }

    /// Writes the cache's dirty host clusters as whole aligned clusters (adjacent ones
    /// in one request). With `all` false only complete clusters are written (every one
    /// but the packing tail's); written complete clusters leave the cache, the tail's
    /// stays (clean) for the compressed clusters that will follow it.
    fn write_compressed_cache(&mut self, all: bool) -> Result<()> {
        let cs = self.cluster_size;
        let tail_cluster = self.compress.tail.map(|t| t & !(cs - 1));
        let Some(cache) = &mut self.compress.cache else {
            return Ok(());
        };
        let keys: Vec<u64> = cache
            .clusters
            .iter()
            .filter(|(&k, c)| c.dirty && (all || Some(k) != tail_cluster))
            .map(|(&k, _)| k)
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let mut run_start = 0;
        while run_start < keys.len() {
            let mut run_end = run_start + 1;
            while run_end < keys.len() && keys[run_end] == keys[run_end - 1] + cs {
                run_end += 1;
            }
            let at = keys[run_start];
            let run_bytes = (run_end - run_start) as u64 * cs;
            self.check_overlap(at, run_bytes, crate::image::overlap::NONE)?;
            let cache = self.compress.cache.as_ref().expect("cache on");
            let pieces: Vec<&[u8]> = keys[run_start..run_end]
                .iter()
                .map(|k| cache.clusters[k].data.as_slice())
                .collect();
            self.storage
                .write_vectored_at(&pieces, at)
                .map_err(Meta::io_err(format!(
                    "writing compressed clusters to host clusters at {at:#x}"
                )))?;
            let end = at + (run_end - run_start) as u64 * cs;
            self.host_end = self.host_end.max(end);
            self.file_len = self.file_len.max(end);
            run_start = run_end;
        }
        let cache = self.compress.cache.as_mut().expect("cache on");
        for k in keys {
            if Some(k) == tail_cluster {
                if let Some(c) = cache.clusters.get_mut(&k) {
                    c.dirty = false;
                }
            } else {
                cache.clusters.remove(&k);
            }
        }
        Ok(())
    }

    /// Writes out everything the compressed-write cache holds, so that no L2 table
    /// depends on it any more. The caller flushes the host before writing L2 tables.
    pub(crate) fn flush_compressed_cache(&mut self) -> Result<()> {
        self.write_compressed_cache(true)?;
        self.compress.dependents.clear();
        Ok(())
    }

    /// Before the L2 table at `key` is written: when it points at bytes still only in
    /// the cache, write the cache out and flush the host (data before mapping).
    pub(crate) fn before_l2_write(&mut self, key: u64) -> Result<()> {
        if self.compress.dependents.contains(&key) {
            self.flush_compressed_cache()?;
            self.sync()?;
        }
        Ok(())
    }

    /// Stores clusters at guest `offset` (cluster-aligned) that must all be unallocated
    /// or zero without a host cluster: `compressed[i]` is the compressed form of
    /// `raw[i]` or `None` to store `raw[i]` as a normal cluster. Compressed clusters are
    /// packed back to back in the order given.
    pub(crate) fn write_compressed_clusters(
        &mut self,
        offset: u64,
        raw: &[&[u8]],
        compressed: &[Option<Vec<u8>>],
    ) -> Result<()> {
        let cs = self.cluster_size;
        self.refuse_compressed_if_encrypted()?;
        self.check_compressed_targets(offset, raw.len() as u64 * cs)?;
        self.mark_dirty(offset, raw.len() as u64 * cs);
        // A full cache that cannot be written out refuses the call before anything
        // changes; later write-outs that fail are retried by the next call or flush.
        if self.compressed_cache_full() {
            self.write_compressed_cache(false)?;
        }
        // All or nothing: a failure unmaps the clusters this call already stored, so
        // the same call succeeds once the cause is gone.
        let mut done: Vec<(u64, u64)> = Vec::new();
        for (i, (raw, c)) in raw.iter().zip(compressed).enumerate() {
            let guest = offset + i as u64 * cs;
            let stored = self.l2_entry(guest).and_then(|old| {
                match c {
                    Some(data) => self.store_one_compressed(guest, data)?,
                    None => self.write(raw, guest)?,
                }
                Ok(old)
            });
            match stored {
                Ok(old) => done.push((guest, old)),
                Err(e) => {
                    self.unmap_stored(&done);
                    return Err(e);
                }
            }
        }
        let _ = self.write_compressed_cache(false);
        Ok(())
    }

    fn compressed_cache_full(&self) -> bool {
        self.compress
            .cache
            .as_ref()
            .is_some_and(|c| c.clusters.len() as u64 * self.cluster_size >= c.limit)
    }

    /// Stores one compressed cluster at guest `guest` (unallocated or zero without a
    /// host cluster); on failure nothing changed.
    fn store_one_compressed(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        let (l1_index, _) = self.indexes(guest);
        let table = self.writable_l2_table(l1_index)?;
        self.load_l2_table(table)?;
        let tail = self.compress.tail;
        let (at, touched) = self.place_compressed(data.len() as u64)?;
        let entry = compressed::encode(at, data.len() as u64, self.cluster_bits);
        let stored = self
            .store_compressed(data, at)
            .and_then(|()| self.set_l2_entry(table, guest, entry));
        if let Err(e) = stored {
            for c in touched {
                self.release_unreferenced(c, 1);
            }
            self.compress.tail = tail;
            return Err(e);
        }
        if self.compress.cache.is_some() {
            self.compress.dependents.insert(table);
            if self.compressed_cache_full() {
                let _ = self.write_compressed_cache(false);
            }
        }
        Ok(())
    }

    /// Puts back the L2 entries `done` lists (guest offset, entry before the call),
    /// releasing what the call mapped there (best effort: an entry that cannot be
    /// put back keeps the new data, which is consistent too).
    pub(crate) fn unmap_stored(&mut self, done: &[(u64, u64)]) {
        for &(guest, old) in done.iter().rev() {
            let (l1_index, _) = self.indexes(guest);
            let Ok(now) = self.mapping(guest) else {
                continue;
            };
            let Ok(table) = self.writable_l2_table(l1_index) else {
                continue;
            };
            if self.set_l2_entry(table, guest, old).is_ok() {
                self.free_mapping_later(now);
            }
        }
    }

    /// Fails unless every cluster of guest `[offset, offset+len)` is unallocated or a
    /// zero cluster without a host cluster (QEMU's rule for compressed writes).
    pub(crate) fn check_compressed_targets(&mut self, offset: u64, len: u64) -> Result<()> {
        let cs = self.cluster_size;
        let mut guest = offset;
        while guest < offset + len {
            match self.mapping(guest)? {
                Mapping::Unallocated | Mapping::Zero { host: None, .. } => {}
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "compressed writes only go to unallocated clusters; the cluster at guest offset {guest:#x} is allocated"
                    )))
                }
            }
            guest += cs;
        }
        Ok(())
    }
}

/// Guest bytes compressed per step of a large compressed write (bounds the memory
/// the compressed copies take).
const BATCH_BYTES: u64 = 8 * 1024 * 1024;

impl Meta {
    /// Compressed clusters of an encrypted image would be stored in the clear (QEMU 10
    /// does that); cowdisk refuses to write them.
    pub(crate) fn refuse_compressed_if_encrypted(&self) -> Result<()> {
        if self.header.crypt_method != 0 {
            return Err(Error::Unsupported(
                "compressed writes into an encrypted image (they would be stored unencrypted)"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl super::Image {
    /// Writes `buf` at guest `offset` as compressed clusters, with the image's
    /// compression type. `offset` must be cluster-aligned and `buf` whole clusters
    /// (the image's last cluster may be partial: it is compressed zero-padded). Every
    /// target cluster must be unallocated or a zero cluster without a host cluster, as
    /// QEMU requires. Clusters are compressed on as many threads as there are cores;
    /// one that does not compress to less than a cluster minus one byte is stored as
    /// a normal cluster.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let (cs, kind) = self.compressed_write_check(buf.len() as u64, offset)?;
        let per_batch = (BATCH_BYTES / cs).max(1) as usize * cs as usize;
        for (b, chunk) in buf.chunks(per_batch).enumerate() {
            let at = offset + (b * per_batch) as u64;
            let raw: Vec<&[u8]> = chunk.chunks(cs as usize).collect();
            let last_padded: Option<Vec<u8>> =
                raw.last().filter(|l| l.len() < cs as usize).map(|l| {
                    let mut v = l.to_vec();
                    v.resize(cs as usize, 0);
                    v
                });
            let inputs: Vec<&[u8]> = raw
                .iter()
                .enumerate()
                .map(|(i, r)| match &last_padded {
                    Some(p) if i == raw.len() - 1 => &p[..],
                    _ => *r,
                })
                .collect();
            // Compression runs without the image lock: other calls go on meanwhile.
            let compressed = compress_clusters(kind, cs as usize, &inputs)?;
            self.modify("a compressed write", |meta| {
                meta.write_compressed_clusters(at, &raw, &compressed)
            })?;
        }
        Ok(())
    }
}

/// A compressor a caller keeps for many calls of [`super::Image::compress_clusters`]
/// (one per thread), so compression contexts are built once, not per batch.
pub struct ClusterCompressor {
    kind: CompressionType,
    inner: Compressor,
}

impl ClusterCompressor {
    /// A compressor for clusters of images with compression type `kind`.
    pub fn new(kind: CompressionType) -> Result<ClusterCompressor> {
        Ok(ClusterCompressor {
            kind,
            inner: Compressor::new(kind)?,
        })
    }
}

/// Whole clusters compressed ahead of storing them: made by
/// [`super::Image::compress_clusters`] on any thread, stored by
/// [`super::Image::store_compressed_clusters`].
pub struct CompressedClusters {
    offset: u64,
    /// Per cluster: its compressed form, or its raw bytes when it did not shrink.
    clusters: Vec<std::result::Result<Vec<u8>, Vec<u8>>>,
}

impl CompressedClusters {
    /// Guest offset of the first cluster.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Number of clusters.
    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    /// True when there are no clusters.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    /// Bytes the compressed forms take (raw clusters count whole).
    pub fn stored_bytes(&self) -> u64 {
        self.clusters
            .iter()
            .map(|c| match c {
                Ok(v) | Err(v) => v.len() as u64,
            })
            .sum()
    }
}

impl super::Image {
    /// Checks that `len` bytes at guest `offset` can be written compressed: in range,
    /// whole clusters (the last cluster of the disk may be partial), every target
    /// cluster unallocated or zero without a host cluster. Returns the cluster size
    /// and the image's compression type.
    fn compressed_write_check(&self, len: u64, offset: u64) -> Result<(u64, CompressionType)> {
        let mut meta = self.lock()?;
        meta.check_writable()?;
        meta.refuse_compressed_if_encrypted()?;
        super::Image::check_range64(&meta, len, offset, "compressed write")?;
        let cs = meta.cluster_size;
        let end = offset + len;
        if !offset.is_multiple_of(cs) || !(end.is_multiple_of(cs) || end == meta.header.size) {
            return Err(Error::InvalidArgument(format!(
                "compressed writes must cover whole clusters of {cs} bytes (only the \
                 image's last cluster may be partial): {len} bytes at offset {offset}"
            )));
        }
        meta.check_compressed_targets(offset, len.div_ceil(cs) * cs)?;
        Ok((cs, meta.compression_type()))
    }

    /// Compresses `buf`, meant for guest `offset`, on the calling thread with
    /// `compressor`, without holding the image lock: the first half of
    /// [`super::Image::write_compressed`], for callers that compress on threads of
    /// their own and store in an order they choose (the copy engine's workers). The
    /// same rules as `write_compressed` apply and are checked now and again when
    /// storing.
    pub fn compress_clusters(
        &self,
        compressor: &mut ClusterCompressor,
        buf: &[u8],
        offset: u64,
    ) -> Result<CompressedClusters> {
        let (cs, kind) = self.compressed_write_check(buf.len() as u64, offset)?;
        if kind != compressor.kind {
            compressor.inner = Compressor::new(kind)?;
            compressor.kind = kind;
        }
        let cs = cs as usize;
        let mut clusters = Vec::with_capacity(buf.len().div_ceil(cs));
        let mut padded = Vec::new();
        for raw in buf.chunks(cs) {
            let input = if raw.len() < cs {
                padded.clear();
                padded.extend_from_slice(raw);
                padded.resize(cs, 0);
                &padded[..]
            } else {
                raw
            };
            clusters.push(match compressor.inner.compress(input, cs - 1)? {
                Some(c) => Ok(c),
                None => Err(raw.to_vec()),
            });
        }
        Ok(CompressedClusters { offset, clusters })
    }

    /// Stores clusters compressed by [`super::Image::compress_clusters`] (all or
    /// nothing, as `write_compressed`). Their targets must still be unallocated.
    pub fn store_compressed_clusters(&self, prepared: &CompressedClusters) -> Result<()> {
        if prepared.clusters.is_empty() {
            return Ok(());
        }
        let raw: Vec<&[u8]> = prepared
            .clusters
            .iter()
            .map(|c| match c {
                Ok(_) => &[][..],
                Err(r) => &r[..],
            })
            .collect();
        let compressed: Vec<Option<Vec<u8>>> = prepared
            .clusters
            .iter()
            .map(|c| c.as_ref().ok().cloned())
            .collect();
        self.modify("a compressed write", |meta| {
            let cs = meta.cluster_size;
            let len = prepared.clusters.len() as u64 * cs;
            let size = meta.header.size;
            if prepared
                .offset
                .checked_add(len)
                .is_none_or(|end| end - cs >= size)
            {
                return Err(Error::InvalidArgument(format!(
                    "compressed clusters at offset {} lie past the virtual size {size}",
                    prepared.offset
                )));
            }
            meta.write_compressed_clusters(prepared.offset, &raw, &compressed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_decompressed_across_a_release_is_not_kept() {
        use crate::format::entry::Mapping;
        use crate::image::{CreateOptions, Image, OpenOptions};
        let storage = std::sync::Arc::new(crate::io::MemStorage::new());
        Image::create_on(storage.clone(), 1 << 20, &CreateOptions::default()).unwrap();
        // Without the write cache (clusters still in it are read under the lock).
        let opts = OpenOptions {
            compressed_cache_size: 0,
            ..OpenOptions::default()
        };
        let img = Image::open_storage(storage, &opts).unwrap();
        img.write_compressed(&sample(65536), 0).unwrap();
        img.write_compressed(&sample(65536), 65536).unwrap();
        img.flush().unwrap();
        let mut meta = img.lock().unwrap();
        let Mapping::Compressed { offset, len } = meta.mapping(0).unwrap() else {
            panic!("cluster 0 is not compressed");
        };
        for released in [false, true] {
            meta.compress.last = None;
            let read = meta
                .plan_compressed_read(offset, len)
                .unwrap()
                .expect("lock-free");
            // The read runs without the lock: meanwhile a host cluster may be released.
            let data = meta.data_io().decompress(&read).unwrap();
            assert_eq!(&data[..], &sample(65536)[..]);
            if released {
                meta.compressed_host_cluster_freed(1 << 20);
            }
            meta.keep_decompressed(read, data);
            assert_eq!(
                meta.compress.last.is_some(),
                !released,
                "released: {released}"
            );
        }
        // The kept cluster is served under the lock, not planned again.
        meta.decompressed(offset, len).unwrap();
        assert!(meta.plan_compressed_read(offset, len).unwrap().is_none());
    }

    fn sample(cs: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(cs);
        let text = b"the quick brown fox jumps over the lazy dog ";
        while v.len() < cs / 2 {
            v.extend_from_slice(text);
        }
        v.truncate(cs / 2);
        let mut x = 12345u32;
        while v.len() < cs * 3 / 4 {
            x = x.wrapping_mul(1103515245).wrapping_add(12345);
            v.push((x >> 16) as u8);
        }
        v.resize(cs, 0);
        v
    }

    #[test]
    fn round_trip_both_types_with_trailing_input() {
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            for cs in [512usize, 4096, 65536, 1 << 21] {
                let data = sample(cs);
                let mut c = Compressor::new(kind).unwrap();
                let mut z = c.compress(&data, cs - 1).unwrap().expect("compressible");
                // The next cluster's bytes follow in a real image.
                z.extend_from_slice(&[0xAB; 700]);
                let mut out = vec![0u8; cs];
                decompress(kind, &z, &mut out).unwrap();
                assert_eq!(out, data, "{kind:?} {cs}");
                // Too short an output stream is an error.
                let mut big = vec![0u8; cs * 2];
                assert!(decompress(kind, &z, &mut big).is_err());
                // Garbage is an error, not a panic.
                let mut out = vec![0u8; cs];
                assert!(decompress(kind, &[0xFF; 64], &mut out).is_err());
            }
        }
    }

    #[test]
    fn incompressible_data_does_not_fit() {
        let mut x = 99u64;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let out = compress_clusters(kind, 65536, &[&data, &data[..]]).unwrap();
            assert!(out.iter().all(|o| o.is_none()));
        }
    }

    #[test]
    fn parallel_keeps_order() {
        let cs = 4096;
        let clusters: Vec<Vec<u8>> = (0..37u8).map(|i| vec![i; cs]).collect();
        let refs: Vec<&[u8]> = clusters.iter().map(|c| &c[..]).collect();
        let out = compress_clusters(CompressionType::Zlib, cs, &refs).unwrap();
        for (i, o) in out.iter().enumerate() {
            let mut d = vec![0u8; cs];
            decompress(CompressionType::Zlib, o.as_ref().unwrap(), &mut d).unwrap();
            assert_eq!(d, clusters[i]);
        }
    }
}
