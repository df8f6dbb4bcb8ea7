//! The write path: in-place writes to owned clusters, and allocating writes whose
//! copy-on-write regions (head and tail of the new cluster) are merged with the guest
//! data into one vectored host write.

use std::borrow::Cow;

use super::meta::Meta;
use crate::error::Result;
use crate::format::entry::{Mapping, COPIED};

/// A cluster's worth of zeros (the largest cluster is 2 MiB), for COW regions that read
/// as zero.
static ZEROS: [u8; 1 << 21] = [0; 1 << 21];

/// The old contents of a new cluster's head and tail (borrowed zeros when they read
/// as zero).
type CowRegions = (Cow<'static, [u8]>, Cow<'static, [u8]>);

/// Head and tail regions closer than this are read with a single request.
const COW_MERGE_GAP: u64 = 16 * 1024;

/// True when both COW regions are the borrowed zeros (they read as zero).
fn is_zero(regions: (&Cow<'static, [u8]>, &Cow<'static, [u8]>)) -> bool {
    matches!(regions.0, Cow::Borrowed(_)) && matches!(regions.1, Cow::Borrowed(_))
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
    /// Writes `buf` at guest `offset` (already range-checked). Runs of owned clusters
    /// that are contiguous on the host become one host write; runs of clusters that
    /// need allocation (within one L2 table) get one contiguous host run and one write.
    pub(crate) fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let cs = self.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let within = guest & (cs - 1);
            let first = ((cs - within) as usize).min(buf.len() - done);
            match self.mapping(guest)? {
                Mapping::Normal { host, copied: true } => {
                    let start = host + within;
                    let mut len = first;
                    while done + len < buf.len() {
                        match self.mapping(guest + len as u64)? {
                            Mapping::Normal {
                                host: h,
                                copied: true,
                            } if h == start + len as u64 => {
                                len += (cs as usize).min(buf.len() - done - len)
                            }
                            _ => break,
                        }
                    }
                    self.write_host("guest data", &buf[done..done + len], start)?;
                    done += len;
                }
                old => {
                    let mut olds = vec![old];
                    let mut len = first;
                    if allocates_plainly(old) {
                        let (l1_index, _) = self.indexes(guest);
                        while done + len < buf.len() {
                            let next = guest + len as u64;
                            if self.indexes(next).0 != l1_index {
                                break;
                            }
                            let m = self.mapping(next)?;
                            if !allocates_plainly(m) {
                                break;
                            }
                            olds.push(m);
                            len += (cs as usize).min(buf.len() - done - len);
                        }
                    }
                    if olds.len() == 1 {
                        self.allocating_write(old, &buf[done..done + len], guest)?;
                    } else {
                        self.allocating_run(&olds, &buf[done..done + len], guest)?;
                    }
                    done += len;
                }
            }
        }
        Ok(())
    }

    /// Writes `data` at `guest` over `olds.len()` (≥ 2) consecutive clusters that all
    /// need a new cluster: one contiguous host run, one write of head COW + data + tail
    /// COW, then the L2 entries are switched and the old references dropped.
    fn allocating_run(&mut self, olds: &[Mapping], data: &[u8], guest: u64) -> Result<()> {
        let cs = self.cluster_size;
        let n = olds.len() as u64;
        let cluster_start = guest & !(cs - 1);
        let head_len = guest - cluster_start;
        let end = guest + data.len() as u64;
        let last_start = cluster_start + (n - 1) * cs;
        let tail_start = end - last_start;
        let (l1_index, _) = self.indexes(guest);
        let table = self.writable_l2_table(l1_index)?;
        let (head, _) = self.cow_regions(olds[0], cluster_start, head_len, cs)?;
        let (_, tail) = self.cow_regions(olds[olds.len() - 1], last_start, 0, tail_start)?;
        let host = self.alloc_clusters(n)?;
        if let Err(e) =
            self.write_new_clusters(host, n, &head, data, &tail, is_zero((&head, &tail)))
        {
            // Give the clusters back; the old mappings still hold the old data.
            self.update_refcounts(host, n, false)?;
            return Err(e);
        }
        for (i, old) in olds.iter().enumerate() {
            let i = i as u64;
            self.set_l2_entry(table, cluster_start + i * cs, (host + i * cs) | COPIED)?;
            self.free_mapping_later(*old);
        }
        Ok(())
    }

    /// Writes `head` + `data` + `tail` to the `n` clusters at `host` in one request. A
    /// fresh run past the end of the file already reads as zeros, so when the COW
    /// regions are zeros only the guest data is written (QEMU zero-fills with
    /// fallocate instead).
    fn write_new_clusters(
        &mut self,
        host: u64,
        n: u64,
        head: &[u8],
        data: &[u8],
        tail: &[u8],
        cow_is_zero: bool,
    ) -> Result<()> {
        let run = n * self.cluster_size;
        let head_len = head.len() as u64;
        let fresh = cow_is_zero && host >= self.file_len;
        let written = if fresh {
            self.storage.write_at(data, host + head_len)
        } else {
            let pieces: Vec<&[u8]> = [head, data, tail]
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect();
            self.storage.write_vectored_at(&pieces, host)
        }
        .map_err(Meta::io_err(format!(
            "writing guest data to {n} cluster(s) at {host:#x}"
        )));
        self.host_end = self.host_end.max(host + run);
        // A failed write may still have reached part of the run: then it no longer
        // reads as zeros, so count the whole run as written.
        let written_end = if fresh && written.is_ok() {
            host + head_len + data.len() as u64
        } else {
            host + run
        };
        self.file_len = self.file_len.max(written_end);
        written
    }

    /// Writes into a cluster this image does not own alone: a new cluster receives
    /// head (old contents) + data + tail (old contents) in one request, then the L2
    /// entry is switched to it and the old cluster's reference is dropped.
    fn allocating_write(&mut self, old: Mapping, data: &[u8], guest: u64) -> Result<()> {
        let cs = self.cluster_size;
        let cluster_start = guest & !(cs - 1);
        let head_len = guest - cluster_start;
        let tail_start = head_len + data.len() as u64;
        let (l1_index, _) = self.indexes(guest);
        let table = self.writable_l2_table(l1_index)?;
        let (head, tail) = self.cow_regions(old, cluster_start, head_len, tail_start)?;
        let (host, reused) = match old {
            Mapping::Zero {
                host: Some(h),
                copied: true,
            } => (h, true),
            _ => (self.alloc_clusters(1)?, false),
        };
        if let Err(e) =
            self.write_new_clusters(host, 1, &head, data, &tail, is_zero((&head, &tail)))
        {
            if !reused {
                // Give the cluster back; the old mapping still holds the old data.
                self.update_refcounts(host, 1, false)?;
            }
            return Err(e);
        }
        self.set_l2_entry(table, guest, host | COPIED)?;
        if !reused {
            self.free_mapping_later(old);
        }
        Ok(())
    }

    /// Returns the old contents of the head `[0, head_len)` and tail
    /// `[tail_start, cluster_size)` of the cluster at guest `cluster_start`. Regions that
    /// read as zero cost no I/O; close regions are read with one request.
    fn cow_regions(
        &mut self,
        old: Mapping,
        cluster_start: u64,
        head_len: u64,
        tail_start: u64,
    ) -> Result<CowRegions> {
        let cs = self.cluster_size;
        let tail_len = cs - tail_start;
        let zeros = |len: u64| Cow::Borrowed(&ZEROS[..len as usize]);
        let (head_zero, tail_zero) = match old {
            Mapping::Zero { .. } => (true, true),
            Mapping::Normal { .. } | Mapping::Compressed { .. } => (head_len == 0, tail_len == 0),
            Mapping::Unallocated => (
                head_len == 0 || self.backing_reads_zero(cluster_start, head_len)?,
                tail_len == 0 || self.backing_reads_zero(cluster_start + tail_start, tail_len)?,
            ),
        };
        match (head_zero, tail_zero) {
            (true, true) => Ok((zeros(head_len), zeros(tail_len))),
            (false, true) => {
                let mut head = vec![0u8; head_len as usize];
                self.read_old(old, cluster_start, &mut head, 0)?;
                Ok((Cow::Owned(head), zeros(tail_len)))
            }
            (true, false) => {
                let mut tail = vec![0u8; tail_len as usize];
                self.read_old(old, cluster_start, &mut tail, tail_start)?;
                Ok((zeros(head_len), Cow::Owned(tail)))
            }
            (false, false) if tail_start - head_len <= COW_MERGE_GAP => {
                let mut all = vec![0u8; cs as usize];
                self.read_old(old, cluster_start, &mut all, 0)?;
                let tail = all.split_off(tail_start as usize);
                all.truncate(head_len as usize);
                Ok((Cow::Owned(all), Cow::Owned(tail)))
            }
            (false, false) => {
                let mut head = vec![0u8; head_len as usize];
                self.read_old(old, cluster_start, &mut head, 0)?;
                let mut tail = vec![0u8; tail_len as usize];
                self.read_old(old, cluster_start, &mut tail, tail_start)?;
                Ok((Cow::Owned(head), Cow::Owned(tail)))
            }
        }
    }

    /// Reads `buf.len()` bytes at `within` of a cluster's old contents (one request).
    fn read_old(
        &mut self,
        old: Mapping,
        cluster_start: u64,
        buf: &mut [u8],
        within: u64,
    ) -> Result<()> {
        match old {
            Mapping::Normal { host, .. } => {
                self.check_data_cluster(host)?;
                self.storage
                    .read_at(buf, host + within)
                    .map_err(Meta::io_err(format!(
                        "reading cluster at {host:#x} for copy-on-write"
                    )))
            }
            Mapping::Unallocated => self.read_backing(buf, cluster_start + within),
            Mapping::Compressed { offset, len } => {
                // Decompressed once per cluster: head and tail share the result.
                let data = self.decompressed(offset, len)?;
                buf.copy_from_slice(&data[within as usize..within as usize + buf.len()]);
                Ok(())
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}
