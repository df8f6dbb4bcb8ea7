//! The write path: in-place writes to owned clusters, and allocating writes whose
//! copy-on-write regions (head and tail of the new clusters) are merged with the guest
//! data into one vectored host write.
//!
//! A write is planned one step at a time under the lock ([`Meta::plan_write`]); the
//! step's I/O may then run without it. An allocating step reserves its host clusters
//! and registers its guest clusters as in flight, so no other write touches them until
//! [`Meta::finish_allocation`] switches the L2 entries; readers meanwhile see the old
//! mapping, hence the old data.

use std::borrow::Cow;

use super::inflight::DataIo;
use super::meta::Meta;
use crate::corrupt;
use crate::error::Result;
use crate::format::entry::{Mapping, COPIED};

/// A cluster's worth of zeros (the largest cluster is 2 MiB), for COW regions that read
/// as zero.
static ZEROS: [u8; 1 << 21] = [0; 1 << 21];

/// Host space is preallocated this far past the newest cluster (see
/// [`Meta::preallocate_ahead`]).
const PREALLOCATE_STEP: u64 = 8 << 20;

/// Head and tail regions closer than this are read with a single request.
const COW_MERGE_GAP: u64 = 16 * 1024;

/// The next step of a write, decided under the lock.
pub(crate) enum WriteStep {
    /// `len` bytes go in place to owned clusters, contiguous on the host from `host`.
    InPlace { host: u64, len: usize },
    /// New clusters are reserved for the next bytes: fill them, then finish.
    Allocate(Allocation),
    /// A cluster the write needs is being allocated by another write, or an exclusive
    /// operation waits for allocations to end: wait for a finished allocation and plan
    /// again.
    Wait,
}

/// The old contents of a new cluster run's head and tail.
type CowRegions<'a> = (Cow<'a, [u8]>, Cow<'a, [u8]>);

/// Where the old contents of a copy-on-write region come from.
#[derive(Debug, PartialEq, Eq)]
enum OldData {
    /// They read as zero: nothing to read.
    Zero,
    /// The old host cluster at this offset.
    Host(u64),
    /// The backing chain (at the region's guest offset).
    Backing,
    /// Already decompressed under the lock (the region's bytes).
    Bytes(Vec<u8>),
}

/// Reserved clusters for `len` guest bytes at `guest`: `n` consecutive guest clusters
/// get `n` contiguous host clusters at `host`, written as head COW + data + tail COW.
pub(crate) struct Allocation {
    guest: u64,
    len: usize,
    cluster_size: u64,
    host: u64,
    n: u64,
    /// The host cluster is the cluster's own preallocated zero cluster (nothing was
    /// allocated, nothing is released).
    reused: bool,
    /// The mappings being replaced, one per cluster.
    olds: Vec<Mapping>,
    head: OldData,
    tail: OldData,
    /// The host run lies past the end of the file and both COW regions read as zero:
    /// only the data needs writing.
    fresh: bool,
}

impl Allocation {
    /// Guest bytes handled by this step.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn cluster_start(&self) -> u64 {
        self.guest & !(self.cluster_size - 1)
    }

    fn head_len(&self) -> u64 {
        self.guest - self.cluster_start()
    }

    /// Guest offset where the tail region starts, and its length.
    fn tail(&self) -> (u64, u64) {
        let start = self.guest + self.len as u64;
        (
            start,
            self.cluster_start() + self.n * self.cluster_size - start,
        )
    }

    /// Fills the reserved clusters: reads the COW regions (one request when head and
    /// tail of one cluster are close) and writes head + data + tail in one request.
    /// Runs with or without the lock; `data` is this step's guest bytes.
    pub(crate) fn fill(&self, io: &DataIo, data: &[u8]) -> Result<()> {
        if let Some(c) = io.cipher()? {
            // Encrypted: the whole run is sealed for its new place, head and tail
            // included (zeros on the host would not decrypt to zeros).
            let (head, tail) = self.cow_regions(io)?;
            let mut whole = Vec::with_capacity(head.len() + data.len() + tail.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(data);
            whole.extend_from_slice(&tail);
            c.encrypt(self.host, self.cluster_start(), &mut whole)?;
            return io
                .storage
                .write_at(&whole, self.host)
                .map_err(Meta::io_err(format!(
                    "writing guest data to {} cluster(s) at {:#x}",
                    self.n, self.host
                )));
        }
        let written = if self.fresh {
            io.storage.write_at(data, self.host + self.head_len())
        } else {
            let (head, tail) = self.cow_regions(io)?;
            let pieces: Vec<&[u8]> = [&head[..], data, &tail[..]]
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect();
            io.storage.write_vectored_at(&pieces, self.host)
        };
        written.map_err(Meta::io_err(format!(
            "writing guest data to {} cluster(s) at {:#x}",
            self.n, self.host
        )))
    }

    fn cow_regions(&self, io: &DataIo) -> Result<CowRegions<'_>> {
        let cs = self.cluster_size;
        let start = self.cluster_start();
        let head_len = self.head_len();
        let (tail_at, tail_len) = self.tail();
        let gap = self.len as u64;
        if self.n == 1 && self.head == self.tail && head_len > 0 && tail_len > 0 {
            // Both regions of one cluster from the same place: one request when close.
            let whole = match &self.head {
                OldData::Host(h) if gap <= COW_MERGE_GAP => {
                    Some(io.read_data(cs, *h, start, "copy-on-write")?)
                }
                OldData::Backing if gap <= COW_MERGE_GAP => {
                    let mut all = vec![0u8; cs as usize];
                    io.read_backing(&mut all, start)?;
                    Some(all)
                }
                _ => None,
            };
            if let Some(mut all) = whole {
                let tail = all.split_off((cs - tail_len) as usize);
                all.truncate(head_len as usize);
                return Ok((Cow::Owned(all), Cow::Owned(tail)));
            }
        }
        let head = region(io, &self.head, head_len, 0, start)?;
        let tail = region(io, &self.tail, tail_len, cs - tail_len, tail_at)?;
        Ok((head, tail))
    }
}

/// The old contents of one COW region of `len` bytes at `within` of its cluster
/// (guest offset `guest`).
fn region<'a>(
    io: &DataIo,
    old: &'a OldData,
    len: u64,
    within: u64,
    guest: u64,
) -> Result<Cow<'a, [u8]>> {
    Ok(match old {
        _ if len == 0 => Cow::Borrowed(&[]),
        OldData::Zero => Cow::Borrowed(&ZEROS[..len as usize]),
        OldData::Bytes(b) => Cow::Borrowed(&b[..]),
        OldData::Host(h) => Cow::Owned(io.read_data(len, h + within, guest, "copy-on-write")?),
        OldData::Backing => {
            let mut buf = vec![0u8; len as usize];
            io.read_backing(&mut buf, guest)?;
            Cow::Owned(buf)
        }
    })
}

/// True for mappings whose cluster simply gets a new host cluster on write (not an
/// owned cluster, not a reusable zero-allocated one, not compressed data).
fn allocates_plainly(m: Mapping) -> bool {
    match m {
        Mapping::Unallocated => true,
        Mapping::Zero { host: None, .. } => true,
        Mapping::Zero { copied, .. } => !copied,
        Mapping::Normal { copied, .. } => !copied,
        Mapping::Compressed { .. } => false,
    }
}

impl Meta {
    /// Writes `buf` at guest `offset` (already range-checked) with the lock held
    /// throughout (internal callers; guest writes go through `Image::write_at`).
    pub(crate) fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.plan_write(&buf[done..], offset + done as u64, true)? {
                WriteStep::InPlace { host, len } => {
                    let guest = offset + done as u64;
                    match &self.crypto {
                        Some(c) => {
                            let mut sealed = buf[done..done + len].to_vec();
                            c.encrypt(host, guest, &mut sealed)?;
                            self.write_host("guest data", &sealed, host)?;
                        }
                        None => self.write_host("guest data", &buf[done..done + len], host)?,
                    }
                    done += len;
                }
                WriteStep::Allocate(a) => {
                    let filled = a.fill(&self.data_io(), &buf[done..done + a.len()]);
                    self.finish_allocation(&a, filled)?;
                    done += a.len();
                }
                WriteStep::Wait => {
                    return Err(corrupt!(
                        "internal: a write with the image lock held met a cluster being \
                         allocated at guest offset {:#x}",
                        offset + done as u64
                    ))
                }
            }
        }
        Ok(())
    }

    /// Plans the first step of writing `buf` at guest `offset`: a run of owned clusters
    /// contiguous on the host is written in place; a run of clusters needing a new
    /// cluster (within one L2 table) gets one contiguous host run, reserved here.
    ///
    /// `locked`: the caller keeps the lock until the step is finished (an exclusive
    /// operation, or VM state), so it need not give way to exclusive operations
    /// waiting for the lock — they cannot run before it is released anyway.
    pub(crate) fn plan_write(
        &mut self,
        buf: &[u8],
        offset: u64,
        locked: bool,
    ) -> Result<WriteStep> {
        self.check_key()?;
        let cs = self.cluster_size;
        let within = offset & (cs - 1);
        let first = ((cs - within) as usize).min(buf.len());
        let old = self.mapping(offset)?;
        if let Mapping::Normal { host, copied: true } = old {
            let start = host + within;
            let mut len = first;
            while len < buf.len() {
                match self.mapping(offset + len as u64)? {
                    Mapping::Normal {
                        host: h,
                        copied: true,
                    } if h == start + len as u64 => len += (cs as usize).min(buf.len() - len),
                    _ => break,
                }
            }
            self.check_overlap(start, len as u64, crate::image::overlap::NONE)?;
            // Bytes written past the recorded end of the file are no longer zeros.
            self.file_len = self.file_len.max(start + len as u64);
            return Ok(WriteStep::InPlace { host: start, len });
        }
        let cluster = offset >> self.cluster_bits;
        if (!locked && self.inflight.exclusive_waiting()) || self.inflight.busy(cluster, 1) {
            return Ok(WriteStep::Wait);
        }
        let mut olds = vec![old];
        let mut len = first;
        if allocates_plainly(old) {
            let (l1_index, _) = self.indexes(offset);
            while len < buf.len() {
                let next = offset + len as u64;
                if self.indexes(next).0 != l1_index
                    || self.inflight.busy(next >> self.cluster_bits, 1)
                {
                    break;
                }
                let m = self.mapping(next)?;
                if !allocates_plainly(m) {
                    break;
                }
                olds.push(m);
                len += (cs as usize).min(buf.len() - len);
            }
        }
        let a = self.reserve(olds, offset, len)?;
        self.inflight.register(cluster, a.n);
        Ok(WriteStep::Allocate(a))
    }

    /// Prepares a writable L2 table, decides where the COW regions come from and
    /// reserves the host clusters for `len` bytes at `guest` over the clusters whose
    /// mappings are `olds`.
    fn reserve(&mut self, olds: Vec<Mapping>, guest: u64, len: usize) -> Result<Allocation> {
        let cs = self.cluster_size;
        let n = olds.len() as u64;
        let cluster_start = guest & !(cs - 1);
        let head_len = guest - cluster_start;
        let tail_at = guest + len as u64;
        let tail_len = cluster_start + n * cs - tail_at;
        self.writable_l2_table(self.indexes(guest).0)?;
        let last_start = cluster_start + (n - 1) * cs;
        let head = self.old_data(olds[0], cluster_start, 0, head_len)?;
        let tail = self.old_data(olds[olds.len() - 1], last_start, cs - tail_len, tail_len)?;
        let (host, reused) = match olds[..] {
            [Mapping::Zero {
                host: Some(h),
                copied: true,
            }] => (h, true),
            _ => (self.alloc_clusters(n)?, false),
        };
        let fresh = head == OldData::Zero && tail == OldData::Zero && host >= self.file_len;
        // A preallocated zero cluster is reused in place: it must not be metadata.
        if let Err(e) = self
            .check_overlap(host, n * cs, crate::image::overlap::NONE)
            .and_then(|()| self.preallocate_ahead(host + n * cs))
        {
            if !reused {
                self.release_unreferenced(host, n);
            }
            return Err(e);
        }
        Ok(Allocation {
            guest,
            len,
            cluster_size: cs,
            host,
            n,
            reused,
            olds,
            head,
            tail,
            fresh,
        })
    }

    /// Makes sure the file's blocks are allocated up to `end`, preallocating
    /// [`PREALLOCATE_STEP`] at a time past it. Writes into allocated blocks inside the
    /// file need no block allocation and do not move the end of the file, so file
    /// systems let them run in parallel (ext4 and XFS serialise O_DIRECT writes that
    /// extend a file); new clusters past the written end still read as zeros.
    ///
    /// The look-ahead is best effort: when the file system cannot give it, only what
    /// the write needs is reserved, so `ENOSPC` means the disk really is full.
    fn preallocate_ahead(&mut self, end: u64) -> Result<()> {
        if end <= self.preallocated_end {
            return Ok(());
        }
        let from = self.preallocated_end.max(self.file_len);
        if end <= from {
            return Ok(());
        }
        // Small images get no more than their own size ahead.
        let step = PREALLOCATE_STEP.min(self.header.size.next_multiple_of(self.cluster_size));
        let ahead = end + step;
        let to = match self.storage.preallocate(from, ahead - from) {
            Ok(()) => ahead,
            Err(_) => {
                self.storage
                    .preallocate(from, end - from)
                    .map_err(Meta::io_err(format!(
                        "reserving host space for new clusters at {from:#x}"
                    )))?;
                end
            }
        };
        self.preallocated_end = to;
        Ok(())
    }

    /// Gives back host space preallocated past the last cluster (on close).
    pub(crate) fn trim_preallocation(&mut self) -> Result<()> {
        if self.preallocated_end <= self.host_end {
            return Ok(());
        }
        let end = self.host_end;
        let len = self
            .storage
            .len()
            .map_err(Meta::io_err("reading the length of the image file"))?;
        if len > end {
            self.storage.set_len(end).map_err(Meta::io_err(format!(
                "trimming the image file to {end} bytes"
            )))?;
        }
        self.preallocated_end = end;
        Ok(())
    }

    /// Where the old contents of `len` bytes at `within` of the cluster at guest
    /// `cluster_start` (mapped by `old`) come from. Compressed data is decompressed now.
    fn old_data(
        &mut self,
        old: Mapping,
        cluster_start: u64,
        within: u64,
        len: u64,
    ) -> Result<OldData> {
        if len == 0 {
            return Ok(OldData::Zero);
        }
        Ok(match old {
            Mapping::Zero { .. } => OldData::Zero,
            Mapping::Normal { host, .. } => {
                self.check_data_cluster(host)?;
                OldData::Host(host)
            }
            Mapping::Unallocated => {
                if self.backing_reads_zero(cluster_start + within, len)? {
                    OldData::Zero
                } else {
                    self.check_backing_opened(cluster_start + within)?;
                    OldData::Backing
                }
            }
            Mapping::Compressed { offset, len: clen } => {
                let data = self.decompressed(offset, clen)?;
                OldData::Bytes(data[within as usize..(within + len) as usize].to_vec())
            }
        })
    }

    /// Ends an allocation whose clusters were filled with result `filled`: on success
    /// the L2 entries switch to the new clusters and the old references are dropped;
    /// on failure the clusters are given back (the old mappings still hold the old
    /// data). Either way the guest clusters stop being in flight.
    pub(crate) fn finish_allocation(&mut self, a: &Allocation, filled: Result<()>) -> Result<()> {
        let cs = a.cluster_size;
        let start = a.cluster_start();
        self.inflight.unregister(start >> self.cluster_bits, a.n);
        // The run is written (or preallocated) to its end; a failed write may have
        // reached any part of it. Either way it no longer lies past the end of the file.
        self.file_len = self.file_len.max(a.host + a.n * cs);
        if let Err(e) = filled {
            if !a.reused {
                self.release_unreferenced(a.host, a.n);
            }
            return Err(e);
        }
        // The table was made writable by `reserve`, and nothing else switches it while
        // clusters under it are in flight; loading it (it may have been evicted) is the
        // last thing that can fail.
        let table = self
            .writable_l2_table(self.indexes(start).0)
            .and_then(|t| self.load_l2_table(t).map(|()| t));
        let table = match table {
            Ok(t) => t,
            Err(e) => {
                if !a.reused {
                    self.release_unreferenced(a.host, a.n);
                }
                return Err(e);
            }
        };
        for (i, old) in a.olds.iter().enumerate() {
            let guest = start + i as u64 * cs;
            let now = self.mapping(guest)?;
            if now != *old {
                return Err(corrupt!(
                    "internal: the mapping of guest cluster {guest:#x} changed during its \
                     allocation ({old:?} became {now:?})"
                ));
            }
            self.set_l2_entry(table, guest, (a.host + i as u64 * cs) | COPIED)?;
            if !a.reused {
                self.free_mapping_later(*old);
            }
        }
        Ok(())
    }
}
