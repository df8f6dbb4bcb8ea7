//! Metadata transactions: operations that change many tables at once (snapshot create,
//! goto and delete, dropping the VM state) build the new state in clusters that are
//! free both before and after, and switch to it with one write of the header's table
//! pointers.
//!
//! Why: qcow2 has no journal, and snapshot operations change refcounts and COPIED
//! flags that live in different clusters. Changed in place, some order of writes is
//! always caught half-way by a crash (QEMU's `qemu-img check` then reports OFLAG_COPIED
//! errors). Here nothing the old state references is written before the switch:
//!
//! - refcount blocks that change are written as copies, with a new refcount table
//!   pointing to them (blocks that do not change are shared);
//! - L2 tables whose entries change are written as copies;
//! - the new active L1 table and the new snapshot table go to new clusters too;
//! - bytes 24..72 of the header (size, L1, refcount table and snapshot table pointers)
//!   are rewritten in one write inside the first sector — the same assumption QEMU's
//!   12-byte pointer switches make.
//!
//! A crash before the switch leaves the old image, after it the new one, neither with
//! leaks. A failure before the switch changes nothing in memory either: the old state
//! stays in the caches, untouched, and the clusters the transaction used were never
//! counted by it.

use std::collections::BTreeMap;

use super::cache::TableCache;
use super::meta::Meta;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::compressed;
use crate::format::entry::{Mapping, COPIED};
use crate::format::header::MAX_REFTABLE_BYTES;
use crate::format::refcount::{self, max_value};
use crate::format::snapshot::{self as codec, SnapshotEntry, SnapshotTable};

/// A metadata transaction in progress. The image's own state (`Meta`) is the state
/// before; the transaction holds what differs.
pub(crate) struct Txn {
    /// Refcount blocks the transaction changed, by block index (copied from the old
    /// block on first change, or zeros where the old state had none).
    blocks: BTreeMap<usize, Box<[u8]>>,
    /// Where the next allocation search starts.
    hint: u64,
    /// End of the highest cluster the transaction allocated.
    end: u64,
    /// The new active L1 table (entries), if it changes.
    pub l1: Option<Vec<u64>>,
    /// The new snapshot table, if it changes.
    pub snapshots: Option<Vec<SnapshotEntry>>,
    /// The new virtual size, if it changes.
    pub size: Option<u64>,
}

/// The references an L2 table holds: its decoded entries and, per entry, the host
/// clusters it keeps (offset, count).
pub(crate) struct L2Refs {
    pub entries: Vec<u64>,
    pub refs: Vec<(u64, u64)>,
}

impl Meta {
    /// Starts a transaction. Everything dirty is written first, so that the caches
    /// hold exactly what the disk holds; the transaction never changes them.
    pub(crate) fn begin_txn(&mut self) -> Result<Txn> {
        self.flush_metadata()?;
        if !self.rc.pending_frees.is_empty() || !self.rc.orphans.is_empty() {
            return Err(corrupt!("internal: frees pending after a metadata flush"));
        }
        Ok(Txn {
            blocks: BTreeMap::new(),
            hint: self.rc.free_hint.max(1),
            end: 0,
            l1: None,
            snapshots: None,
            size: None,
        })
    }

    fn rc_within(&self, cluster: u64) -> usize {
        (cluster & ((1u64 << self.rb_bits) - 1)) as usize
    }

    /// The refcount of `cluster` before the transaction and in it.
    pub(crate) fn txn_refcounts(&mut self, t: &Txn, cluster: u64) -> Result<(u64, u64)> {
        let before = self.refcount(cluster)?;
        let index = (cluster >> self.rb_bits) as usize;
        let now = match t.blocks.get(&index) {
            Some(b) => refcount::get(b, self.rc_within(cluster), self.header.refcount_order),
            None => before,
        };
        Ok((before, now))
    }

    /// Refcount block `index` as it is before the transaction (zeros where none).
    fn block_before(&mut self, index: usize) -> Result<Box<[u8]>> {
        Ok(match self.rc.table.get(index).copied().unwrap_or(0) {
            0 => vec![0u8; self.cluster_size as usize].into_boxed_slice(),
            offset => {
                // Through the cache; it is clean, so evicting writes nothing.
                self.refcount((index as u64) << self.rb_bits)?;
                self.rc
                    .blocks
                    .peek(offset)
                    .ok_or_else(|| corrupt!("refcount block at {offset:#x} vanished"))?
                    .into()
            }
        })
    }

    /// The transaction's copy of refcount block `index`, made on first use.
    fn txn_block<'t>(&mut self, t: &'t mut Txn, index: usize) -> Result<&'t mut [u8]> {
        if let std::collections::btree_map::Entry::Vacant(slot) = t.blocks.entry(index) {
            slot.insert(self.block_before(index)?);
        }
        Ok(t.blocks.get_mut(&index).expect("just inserted"))
    }

    /// Clusters the old state used that the transaction leaves with refcount 0.
    fn txn_freed(&mut self, t: &Txn) -> Result<Vec<u64>> {
        let order = self.header.refcount_order;
        let per_block = 1usize << self.rb_bits;
        let mut freed = Vec::new();
        for (&index, data) in &t.blocks {
            let before = self.block_before(index)?;
            for i in 0..per_block {
                if refcount::get(&before, i, order) > 0 && refcount::get(data, i, order) == 0 {
                    freed.push(((index as u64) << self.rb_bits) + i as u64);
                }
            }
        }
        Ok(freed)
    }

    fn txn_set(&mut self, t: &mut Txn, cluster: u64, value: u64) -> Result<()> {
        let order = self.header.refcount_order;
        let within = self.rc_within(cluster);
        let block = self.txn_block(t, (cluster >> self.rb_bits) as usize)?;
        refcount::set(block, within, order, value).map_err(|_| {
            Error::Unsupported(format!(
                "cluster at {:#x} would need more references than {}-bit refcounts can \
                 count",
                cluster << self.cluster_bits,
                1u32 << order
            ))
        })
    }

    /// Adds one reference to (or drops one from) `count` clusters at `offset`.
    pub(crate) fn txn_add(
        &mut self,
        t: &mut Txn,
        offset: u64,
        count: u64,
        increase: bool,
    ) -> Result<()> {
        let max = max_value(self.header.refcount_order);
        let first = offset >> self.cluster_bits;
        for cluster in first..first + count {
            let (_, now) = self.txn_refcounts(t, cluster)?;
            let value = if increase {
                if now >= max {
                    return Err(Error::Unsupported(format!(
                        "cluster at {:#x} already has {now} references, the most {}-bit \
                         refcounts can count",
                        cluster << self.cluster_bits,
                        1u32 << self.header.refcount_order
                    )));
                }
                now + 1
            } else {
                now.checked_sub(1).ok_or_else(|| {
                    corrupt!(
                        "cluster at {:#x} loses a reference but its refcount is already 0",
                        cluster << self.cluster_bits
                    )
                })?
            };
            self.txn_set(t, cluster, value)?;
        }
        Ok(())
    }

    /// Allocates `count` contiguous clusters free both before and in the transaction.
    pub(crate) fn txn_alloc(&mut self, t: &mut Txn, count: u64) -> Result<u64> {
        let file_clusters = self.host_end.div_ceil(self.cluster_size);
        let mut start = t.hint;
        let mut len = 0u64;
        let mut cluster = t.hint;
        while len < count {
            let (before, now) = self.txn_refcounts(t, cluster)?;
            if before == 0 && now == 0 {
                if len == 0 {
                    start = cluster;
                }
                len += 1;
            } else {
                if cluster > file_clusters + (1u64 << self.rb_bits) {
                    return Err(corrupt!(
                        "refcount of cluster at {:#x}, far beyond the end of the file, is {before}",
                        cluster << self.cluster_bits
                    ));
                }
                len = 0;
            }
            cluster += 1;
        }
        let end = (start + count) << self.cluster_bits;
        if end > 1u64 << 56 {
            return Err(Error::NoSpace("host offsets would exceed 2^56".into()));
        }
        self.check_overlap(start << self.cluster_bits, count << self.cluster_bits, 0)?;
        for c in start..start + count {
            self.txn_set(t, c, 1)?;
        }
        t.hint = start + count;
        t.end = t.end.max(end);
        Ok(start << self.cluster_bits)
    }

    /// Writes `bytes` (zero-padded to whole clusters) to clusters the transaction
    /// allocated.
    pub(crate) fn txn_write(&mut self, what: &str, bytes: &[u8], offset: u64) -> Result<()> {
        let mut padded = bytes.to_vec();
        padded.resize(
            (bytes.len() as u64).next_multiple_of(self.cluster_size) as usize,
            0,
        );
        self.write_host(what, &padded, offset)
    }

    /// Allocates and writes a new table of `bytes`; returns its offset.
    pub(crate) fn txn_new_table(&mut self, t: &mut Txn, what: &str, bytes: &[u8]) -> Result<u64> {
        let clusters = (bytes.len() as u64).div_ceil(self.cluster_size).max(1);
        let offset = self.txn_alloc(t, clusters)?;
        self.txn_write(what, bytes, offset)?;
        Ok(offset)
    }

    /// The entries of the L2 table at `table` and the host clusters each keeps,
    /// validated.
    pub(crate) fn l2_refs(&mut self, table: u64) -> Result<L2Refs> {
        self.load_l2_table(table)?;
        let entries: Vec<u64> = self
            .l2_cache
            .get(table)
            .expect("table just loaded")
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let file_clusters = self.host_end.div_ceil(self.cluster_size);
        let mut refs = Vec::new();
        for &e in &entries {
            match self.classify(e)? {
                Mapping::Normal { host, .. }
                | Mapping::Zero {
                    host: Some(host), ..
                } => {
                    self.check_data_cluster(host)?;
                    refs.push((host, 1));
                }
                Mapping::Compressed { offset, len } => {
                    let (first, count) = compressed::host_clusters(offset, len, self.cluster_bits);
                    if (first >> self.cluster_bits) + count > file_clusters {
                        return Err(corrupt!(
                            "compressed cluster at {offset:#x} ({len} bytes) lies outside the file"
                        ));
                    }
                    refs.push((first, count));
                }
                Mapping::Zero { host: None, .. } | Mapping::Unallocated => {}
            }
        }
        Ok(L2Refs { entries, refs })
    }

    /// One more (or one fewer) L1 table references the L2 table at `table`: the
    /// table and every cluster it maps gain (or lose) a reference (refcounts count
    /// paths from L1 tables).
    pub(crate) fn txn_reference_l2(
        &mut self,
        t: &mut Txn,
        table: u64,
        increase: bool,
    ) -> Result<()> {
        let refs = self.l2_refs(table)?.refs;
        for (offset, count) in refs {
            self.txn_add(t, offset, count, increase)?;
        }
        self.txn_add(t, table, 1, increase)
    }

    /// The L2 table `table` as an active table: shared as it is when its COPIED flags
    /// already say "shared" (the caller then counts the new reference), or else a
    /// copy with COPIED set exactly where `owned` says a data cluster has one
    /// reference, which the active L1 owns. Returns the L1 entry for it and whether it
    /// is a copy (a copy takes over the references the caller passes to it).
    pub(crate) fn txn_active_table(
        &mut self,
        t: &mut Txn,
        table: u64,
        owned: &mut dyn FnMut(&mut Meta, &mut Txn, u64) -> Result<bool>,
        shareable: bool,
    ) -> Result<(u64, bool)> {
        let L2Refs { entries, .. } = self.l2_refs(table)?;
        let mut fixed = Vec::with_capacity(entries.len());
        let mut changed = false;
        for e in entries {
            let host = match self.classify(e)? {
                Mapping::Normal { host, .. }
                | Mapping::Zero {
                    host: Some(host), ..
                } => Some(host),
                _ => None,
            };
            let want = match host {
                Some(h) if owned(self, t, h)? => e | COPIED,
                Some(_) => e & !COPIED,
                None => e,
            };
            changed |= want != e;
            fixed.push(want);
        }
        if !changed && shareable {
            return Ok((table, false));
        }
        let bytes: Vec<u8> = fixed.iter().flat_map(|e| e.to_be_bytes()).collect();
        let copy = self.txn_new_table(t, "L2 table copy", &bytes)?;
        Ok((copy | COPIED, true))
    }

    /// Writes the new refcount structure and switches the header to everything the
    /// transaction built. On failure before the switch nothing changed.
    pub(crate) fn commit_txn(&mut self, mut t: Txn) -> Result<()> {
        let cs = self.cluster_size;
        // The new snapshot table and active L1 table.
        let mut snapshot_table = None;
        if let Some(entries) = t.snapshots.take() {
            let bytes = codec::encode_table(&entries)?;
            if self.header.nb_snapshots > 0 && self.snapshots.size > 0 {
                let old = self.header.snapshots_offset;
                self.txn_add(&mut t, old, self.snapshots.size.div_ceil(cs), false)?;
            }
            let offset = if entries.is_empty() {
                0
            } else {
                self.txn_new_table(&mut t, "snapshot table", &bytes)?
            };
            snapshot_table = Some((entries, bytes.len() as u64, offset));
        }
        let mut l1_table = None;
        if let Some(l1) = t.l1.take() {
            if self.header.l1_size > 0 {
                let clusters = (self.header.l1_size as u64 * 8).div_ceil(cs);
                self.txn_add(&mut t, self.header.l1_table_offset, clusters, false)?;
            }
            let offset = if l1.is_empty() {
                0
            } else {
                let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.txn_new_table(&mut t, "L1 table", &bytes)?
            };
            l1_table = Some((l1, offset));
        }
        // Changed refcount blocks move to new clusters, the old ones are freed, and a
        // new refcount table points to them: iterate until every change is placed.
        let old_table = self.header.refcount_table_offset;
        let old_clusters = self.header.refcount_table_clusters as u64;
        if !t.blocks.is_empty() {
            self.txn_add(&mut t, old_table, old_clusters, false)?;
        }
        let mut placed: BTreeMap<usize, u64> = BTreeMap::new();
        let mut reftable: Option<(u64, u64)> = None;
        loop {
            let unplaced: Vec<usize> = t
                .blocks
                .keys()
                .filter(|b| !placed.contains_key(b))
                .copied()
                .collect();
            if !unplaced.is_empty() {
                for index in unplaced {
                    let at = self.txn_alloc(&mut t, 1)?;
                    placed.insert(index, at);
                    if let Some(&old) = self.rc.table.get(index).filter(|&&o| o != 0) {
                        self.txn_add(&mut t, old, 1, false)?;
                    }
                }
                continue;
            }
            if placed.is_empty() {
                break;
            }
            let entries = self
                .rc
                .table
                .len()
                .max(placed.keys().last().map_or(0, |&b| b + 1));
            let clusters = (entries as u64 * 8).div_ceil(cs);
            if clusters * cs > MAX_REFTABLE_BYTES {
                return Err(Error::NoSpace(format!(
                    "the refcount table would grow beyond {MAX_REFTABLE_BYTES} bytes"
                )));
            }
            match reftable {
                Some((_, n)) if n == clusters => break,
                Some((at, n)) => self.txn_add(&mut t, at, n, false)?,
                None => {}
            }
            reftable = Some((self.txn_alloc(&mut t, clusters)?, clusters));
        }
        let mut new_reftable = self.rc.table.clone();
        if let Some((at, clusters)) = reftable {
            new_reftable.resize((clusters * cs / 8) as usize, 0);
            for (&index, &offset) in &placed {
                self.txn_write("refcount block copy", &t.blocks[&index], offset)?;
                new_reftable[index] = offset;
            }
            let bytes: Vec<u8> = new_reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.txn_write("refcount table", &bytes, at)?;
        }
        let freed = self.txn_freed(&t)?;
        self.sync()?;

        // The switch: one write of header bytes 24..72.
        let mut header = self.header.clone();
        if let Some(size) = t.size {
            header.size = size;
        }
        if let Some((l1, offset)) = &l1_table {
            header.l1_size = l1.len() as u32;
            header.l1_table_offset = *offset;
        }
        if let Some((at, clusters)) = reftable {
            header.refcount_table_offset = at;
            header.refcount_table_clusters = clusters as u32;
        }
        if let Some((entries, _, offset)) = &snapshot_table {
            header.nb_snapshots = entries.len() as u32;
            header.snapshots_offset = *offset;
        }
        let new = header.serialize()?;
        let old = self.header.serialize()?;
        self.write_header_fields(24, &new[24..72], &old[24..72])?;

        // The new state is the image's now.
        self.header.size = header.size;
        self.header.l1_size = header.l1_size;
        self.header.l1_table_offset = header.l1_table_offset;
        self.header.refcount_table_offset = header.refcount_table_offset;
        self.header.refcount_table_clusters = header.refcount_table_clusters;
        self.header.nb_snapshots = header.nb_snapshots;
        self.header.snapshots_offset = header.snapshots_offset;
        if let Some((l1, _)) = l1_table {
            self.l1 = l1;
        }
        if let Some((entries, size, _)) = snapshot_table {
            self.snapshots = SnapshotTable { entries, size };
        }
        if reftable.is_some() {
            self.rc.table = new_reftable;
            let mut cache = TableCache::new(super::open::REFCOUNT_CACHE_BLOCKS);
            for (index, data) in std::mem::take(&mut t.blocks) {
                if let Some((victim, _)) = cache.victim() {
                    cache.remove(victim);
                }
                cache.insert(placed[&index], data, false);
            }
            self.rc.blocks = cache;
        }
        self.host_end = self.host_end.max(t.end);
        if !freed.is_empty() {
            self.drain_data_io();
        }
        self.rebuild_metadata_index();
        for &cluster in &freed {
            let at = cluster << self.cluster_bits;
            self.l2_cache.remove(at);
            self.compressed_host_cluster_freed(at);
            self.rc.free_hint = self.rc.free_hint.min(cluster);
            if self.discard_unmap && self.check_overlap(at, cs, 0).is_ok() {
                let _ = self.storage.punch_hole(at, cs);
            }
        }
        self.sync()
    }
}
