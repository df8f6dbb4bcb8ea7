//! The cluster allocator: refcount lookups and updates through the refcount block
//! cache, first-fit allocation, new self-describing refcount blocks, refcount table
//! growth, and frees deferred until no table on disk references the cluster.

use super::meta::Meta;
use super::overlap::Kind;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::compressed;
use crate::format::entry::Mapping;
use crate::format::header::MAX_REFTABLE_BYTES;
use crate::format::refcount;

impl Meta {
    fn block_index(&self, cluster: u64) -> usize {
        (cluster >> self.rb_bits) as usize
    }

    fn block_offset(&self, index: usize) -> Result<Option<u64>> {
        let Some(&entry) = self.rc.table.get(index) else {
            return Ok(None);
        };
        if entry == 0 {
            return Ok(None);
        }
        if entry & 0x1ff != 0 {
            return Err(corrupt!(
                "refcount table entry {index} ({entry:#x}) has reserved bits set"
            ));
        }
        Ok(Some(entry))
    }

    /// Makes sure the refcount block at `offset` is cached, evicting (and writing) the
    /// least recently used one if needed.
    fn load_refcount_block(&mut self, offset: u64) -> Result<()> {
        if self.rc.blocks.contains(offset) {
            return Ok(());
        }
        let data = self.read_table("refcount block", offset)?;
        self.cache_refcount_block(offset, data)
    }

    /// Puts a clean refcount block into the cache, first writing out the least
    /// recently used one if the cache is full.
    fn cache_refcount_block(&mut self, offset: u64, data: Box<[u8]>) -> Result<()> {
        if let Some((victim, dirty)) = self.rc.blocks.victim() {
            if dirty {
                self.write_refcount_block(victim)?;
            }
            self.rc.blocks.remove(victim);
        }
        self.rc.blocks.insert(offset, data, false);
        Ok(())
    }

    fn write_refcount_block(&mut self, offset: u64) -> Result<()> {
        let data = self
            .rc
            .blocks
            .peek(offset)
            .ok_or_else(|| corrupt!("refcount block at {offset:#x} vanished from the cache"))?
            .to_vec();
        self.write_host_as(Kind::RefcountBlock as u16, "refcount block", &data, offset)?;
        self.rc.blocks.mark_clean(offset);
        Ok(())
    }

    /// Writes every dirty refcount block (no barrier).
    pub(crate) fn write_dirty_refcount_blocks(&mut self) -> Result<()> {
        for key in self.rc.blocks.dirty_keys() {
            self.write_refcount_block(key)?;
        }
        Ok(())
    }

    /// The refcount of the cluster with index `cluster` (0 where no block exists).
    pub(crate) fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let index = self.block_index(cluster);
        let Some(offset) = self.block_offset(index)? else {
            return Ok(0);
        };
        self.load_refcount_block(offset)?;
        let block = self.rc.blocks.get(offset).expect("block just loaded");
        let within = (cluster & ((1u64 << self.rb_bits) - 1)) as usize;
        Ok(refcount::get(block, within, self.header.refcount_order))
    }

    /// Sets the refcount of cluster index `cluster`, creating its block if needed.
    pub(crate) fn set_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        let index = self.block_index(cluster);
        let offset = match self.block_offset(index)? {
            Some(off) => off,
            None if value == 0 => return Ok(()),
            None => self.create_refcount_block(index)?,
        };
        // About to change it: it must be a refcount block and nothing else.
        self.check_overlap(offset, self.cluster_size, Kind::RefcountBlock as u16)?;
        self.load_refcount_block(offset)?;
        let order = self.header.refcount_order;
        let within = (cluster & ((1u64 << self.rb_bits) - 1)) as usize;
        let block = self.rc.blocks.get_mut(offset).expect("block just loaded");
        refcount::set(block, within, order, value).map_err(|_| {
            Error::NoSpace(format!(
                "refcount of cluster {cluster} would exceed the {}-bit refcount width",
                1u32 << order
            ))
        })
    }

    /// Adds one to (or, with `increase` false, takes one from) the refcounts of `count`
    /// clusters starting at host `offset`. On failure the clusters before the failing
    /// one are done and the rest untouched (see [`Meta::adjust_refcounts`]).
    pub(crate) fn update_refcounts(
        &mut self,
        offset: u64,
        count: u64,
        increase: bool,
    ) -> Result<()> {
        self.adjust_refcounts(offset, count, increase)
            .map_err(|(_, e)| e)
    }

    /// Gives back `count` clusters at `offset` that nothing references, in memory or
    /// on disk (an allocation that failed). Never fails: what cannot be released now
    /// is kept as an orphan and released by the next flush.
    pub(crate) fn release_unreferenced(&mut self, offset: u64, count: u64) {
        if self.in_doubt {
            // The disk may reference them after all: leaking is the safe side.
            return;
        }
        match self.adjust_refcounts(offset, count, false) {
            Ok(()) => {
                // The last clusters of the file given back: it no longer needs them.
                if offset + (count << self.cluster_bits) == self.host_end {
                    self.host_end = offset;
                }
            }
            Err((done, _)) => self
                .rc
                .orphans
                .push((offset + (done << self.cluster_bits), count - done)),
        }
    }

    /// Releases the orphans (see [`Meta::release_unreferenced`]); those that still
    /// cannot be released stay for the next try.
    pub(crate) fn release_orphans(&mut self) -> Result<()> {
        while let Some((offset, count)) = self.rc.orphans.pop() {
            if let Err((done, e)) = self.adjust_refcounts(offset, count, false) {
                self.rc
                    .orphans
                    .push((offset + (done << self.cluster_bits), count - done));
                return Err(e);
            }
        }
        Ok(())
    }

    /// [`Meta::update_refcounts`], telling on failure how many clusters were done.
    pub(crate) fn adjust_refcounts(
        &mut self,
        offset: u64,
        count: u64,
        increase: bool,
    ) -> std::result::Result<(), (u64, Error)> {
        let first = offset >> self.cluster_bits;
        let mut drained = false;
        for cluster in first..first + count {
            self.adjust_refcount(cluster, increase, &mut drained)
                .map_err(|e| (cluster - first, e))?;
        }
        Ok(())
    }

    fn adjust_refcount(&mut self, cluster: u64, increase: bool, drained: &mut bool) -> Result<()> {
        let rc = self.refcount(cluster)?;
        let new = if increase {
            rc + 1
        } else {
            rc.checked_sub(1).ok_or_else(|| {
                corrupt!(
                    "cluster at {:#x} is freed but its refcount is already 0",
                    cluster << self.cluster_bits
                )
            })?
        };
        if new == 0 && !*drained {
            // No read or write planned against an old mapping may still be running
            // when the cluster becomes free for reuse.
            self.drain_data_io();
            *drained = true;
        }
        self.set_refcount(cluster, new)?;
        if new == 0 {
            self.compressed_host_cluster_freed(cluster << self.cluster_bits);
            self.rc.free_hint = self.rc.free_hint.min(cluster);
            if self.discard_unmap {
                // Only saves host space: a cluster that stays allocated is harmless
                // (and live metadata with a zeroed refcount is never punched).
                let at = cluster << self.cluster_bits;
                if self.check_overlap(at, self.cluster_size, 0).is_ok() {
                    let _ = self.storage.punch_hole(at, self.cluster_size);
                }
            }
        }
        Ok(())
    }

    /// Places a new, empty refcount block for block `index` at the first cluster of the
    /// range it describes (free, since a missing block means every count there is 0),
    /// so the block describes itself. Written and flushed before the table points to it.
    fn create_refcount_block(&mut self, index: usize) -> Result<u64> {
        if index == 0 {
            return Err(corrupt!(
                "refcount block 0 is missing (it must describe the header)"
            ));
        }
        if index >= self.rc.table.len() {
            self.grow_refcount_table(index + 1)?;
            if let Some(off) = self.block_offset(index)? {
                return Ok(off); // the growth placed this block already
            }
        }
        let offset = (index as u64) << (self.rb_bits + self.cluster_bits);
        let mut block = vec![0u8; self.cluster_size as usize].into_boxed_slice();
        refcount::set(&mut block, 0, self.header.refcount_order, 1)?;
        self.write_host("new refcount block", &block, offset)?;
        self.sync()?;
        let entry_off = self.header.refcount_table_offset + index as u64 * 8;
        // Until the entry is written nothing points to the block: a failure leaves
        // the image as it was (the block describes only itself).
        self.write_pointer(
            Kind::RefcountTable as u16,
            "refcount table entry",
            entry_off,
            &offset.to_be_bytes(),
            &[0; 8],
        )?;
        self.rc.table[index] = offset;
        self.overlaps
            .add(offset >> self.cluster_bits, 1, Kind::RefcountBlock);
        // Not cached (the cache had no room)? It is on disk and loads when needed.
        let _ = self.cache_refcount_block(offset, block);
        Ok(offset)
    }

    /// Replaces the refcount table with a larger one holding at least `min_entries`,
    /// placed after the end of the file together with any blocks needed to describe it.
    fn grow_refcount_table(&mut self, min_entries: usize) -> Result<()> {
        let cs = self.cluster_size;
        let entries_per_cluster = (cs / 8) as usize;
        let old_len = self.rc.table.len();
        let start = self.host_end.div_ceil(cs);
        let mut want = min_entries.max(old_len + old_len / 2).max(1);
        let mut table_clusters = want.div_ceil(entries_per_cluster) as u64;
        let mut new_blocks: Vec<usize> = Vec::new();
        loop {
            let end = start + table_clusters + new_blocks.len() as u64;
            let needed: Vec<usize> = (self.block_index(start)..=self.block_index(end - 1))
                .filter(|&b| b >= old_len || self.rc.table[b] == 0)
                .collect();
            if let Some(&last) = needed.last() {
                want = want.max(last + 1);
            }
            let clusters = want.div_ceil(entries_per_cluster) as u64;
            if needed == new_blocks && clusters == table_clusters {
                break;
            }
            new_blocks = needed;
            table_clusters = clusters;
        }
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace(format!(
                "the refcount table would grow beyond {MAX_REFTABLE_BYTES} bytes"
            )));
        }
        let table_offset = start * cs;
        let mut table = self.rc.table.clone();
        table.resize((table_clusters * cs / 8) as usize, 0);
        let mut blocks: Vec<(usize, u64, Box<[u8]>)> = new_blocks
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let off = (start + table_clusters + i as u64) * cs;
                table[b] = off;
                (b, off, vec![0u8; cs as usize].into_boxed_slice())
            })
            .collect();
        let end = start + table_clusters + blocks.len() as u64;
        let order = self.header.refcount_order;
        let mask = (1u64 << self.rb_bits) - 1;
        // Clusters of the new structure counted in existing blocks: given back if the
        // switch does not happen.
        let mut counted = Vec::new();
        let mut result = Ok(());
        for cluster in start..end {
            let b = self.block_index(cluster);
            if let Some((_, _, data)) = blocks.iter_mut().find(|(idx, _, _)| *idx == b) {
                refcount::set(data, (cluster & mask) as usize, order, 1)?;
            } else {
                result = self.set_refcount(cluster, 1);
                if result.is_err() {
                    break;
                }
                counted.push(cluster);
            }
        }
        let old_offset = self.header.refcount_table_offset;
        let old_clusters = self.header.refcount_table_clusters as u64;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_offset.to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        let mut old_fields = [0u8; 12];
        old_fields[..8].copy_from_slice(&old_offset.to_be_bytes());
        old_fields[8..].copy_from_slice(&(old_clusters as u32).to_be_bytes());
        let result = result.and_then(|()| {
            for (_, off, data) in &blocks {
                self.write_host("new refcount block", data, *off)?;
            }
            self.write_dirty_refcount_blocks()?;
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.write_host("new refcount table", &bytes, table_offset)?;
            self.sync()?;
            self.write_header_fields(48, &fields, &old_fields)
        });
        if let Err(e) = result {
            for cluster in counted {
                self.release_unreferenced(cluster << self.cluster_bits, 1);
            }
            return Err(e);
        }
        self.header.refcount_table_offset = table_offset;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.rc.table = table;
        let cb = self.cluster_bits;
        self.overlaps
            .remove(old_offset >> cb, old_clusters, Kind::RefcountTable);
        self.overlaps
            .add(table_offset >> cb, table_clusters, Kind::RefcountTable);
        for (_, off, _) in &blocks {
            self.overlaps.add(off >> cb, 1, Kind::RefcountBlock);
        }
        for (_, off, data) in blocks {
            // Not cached? The block is on disk and loads when needed.
            let _ = self.cache_refcount_block(off, data);
        }
        self.sync()?;
        // Nothing points to the old table any more.
        self.release_unreferenced(old_offset, old_clusters);
        Ok(())
    }

    /// Finds `count` consecutive free clusters at or after the allocation hint.
    fn find_free_run(&mut self, count: u64) -> Result<u64> {
        let per_block = 1u64 << self.rb_bits;
        let covered = (self.rc.table.len() as u64) << self.rb_bits;
        let mut cluster = self.rc.free_hint.max(1);
        let mut run_start = cluster;
        let mut run_len = 0u64;
        let mut first_free = None;
        while run_len < count {
            if cluster >= covered {
                if run_len == 0 {
                    run_start = cluster;
                }
                first_free.get_or_insert(run_start);
                break;
            }
            if self.block_offset(self.block_index(cluster))?.is_none() {
                // A whole missing block: every cluster it would describe is free.
                let block_end = (cluster | (per_block - 1)) + 1;
                if run_len == 0 {
                    run_start = cluster;
                }
                first_free.get_or_insert(cluster);
                run_len += block_end - cluster;
                cluster = block_end;
                continue;
            }
            let rc = self.refcount(cluster)?;
            if rc != 0 && cluster > self.host_end.div_ceil(self.cluster_size) + per_block {
                // Only a corrupt image claims clusters far past the end of its file;
                // scanning on could take hours.
                return Err(corrupt!(
                    "refcount of cluster at {:#x}, far beyond the end of the file, is {rc}",
                    cluster << self.cluster_bits
                ));
            }
            if rc == 0 {
                if run_len == 0 {
                    run_start = cluster;
                }
                first_free.get_or_insert(cluster);
                run_len += 1;
            } else {
                run_len = 0;
            }
            cluster += 1;
        }
        self.rc.free_hint = first_free.unwrap_or(run_start);
        Ok(run_start)
    }

    /// Allocates `count` contiguous clusters with refcount 1 and returns the host offset
    /// of the first. The refcounts are in the cache; they reach the disk before any L2
    /// table that points to them (see `flush_metadata`).
    pub(crate) fn alloc_clusters(&mut self, count: u64) -> Result<u64> {
        let per_block = 1u64 << self.rb_bits;
        // Clusters wanted after the run for refcount blocks that cannot describe
        // themselves (see below).
        let mut extra = 0u64;
        loop {
            let start = self.find_free_run(count + extra)?;
            if !self.rc.pending_frees.is_empty()
                && (start + count + extra) << self.cluster_bits > self.host_end
            {
                // The file would grow while freed clusters wait for a metadata flush:
                // flush now so they can be reused.
                self.flush_metadata()?;
                continue;
            }
            let last = start + count + extra - 1;
            let mut missing = Vec::new();
            for index in self.block_index(start)..=self.block_index(last) {
                if self.block_offset(index)?.is_none() {
                    missing.push(index);
                }
            }
            if !missing.is_empty() {
                if count < per_block {
                    // Self-describing blocks at the start of their ranges; the run
                    // still fits in a range after its block.
                    for &index in &missing {
                        self.create_refcount_block(index)?;
                    }
                    continue; // new blocks may sit inside the run we found: look again
                }
                // A run longer than a block's range cannot step over blocks at the
                // start of each range: the new blocks go right after the run.
                let last_index = *missing.last().expect("not empty");
                if last_index >= self.rc.table.len() {
                    self.grow_refcount_table(last_index + 1)?;
                    continue;
                }
                if missing.len() as u64 > extra {
                    extra = missing.len() as u64;
                    continue;
                }
                self.place_refcount_blocks(&missing, start + count)?;
            }
            if (start + count) << self.cluster_bits > 1u64 << 56 {
                return Err(Error::NoSpace("host offsets would exceed 2^56".into()));
            }
            // Whatever the refcounts say, live metadata is never handed out.
            self.check_overlap(start << self.cluster_bits, count << self.cluster_bits, 0)?;
            for cluster in start..start + count {
                let taken = match self.refcount(cluster) {
                    Ok(0) => self.set_refcount(cluster, 1),
                    Ok(_) => Err(corrupt!(
                        "allocator picked cluster {cluster} that is in use"
                    )),
                    Err(e) => Err(e),
                };
                if let Err(e) = taken {
                    // All or nothing: give back what this call took.
                    if cluster > start {
                        self.release_unreferenced(start << self.cluster_bits, cluster - start);
                    }
                    return Err(e);
                }
            }
            let offset = start << self.cluster_bits;
            let end = offset + (count << self.cluster_bits);
            self.host_end = self.host_end.max(end);
            self.rc.free_hint = start + count;
            return Ok(offset);
        }
    }

    /// Places new, empty refcount blocks for the block indexes `indexes` (missing, and
    /// inside the refcount table) at the free clusters from cluster `at` on; each is
    /// counted in whichever block describes its own cluster (one of the new ones, or
    /// an existing one). Blocks are written and flushed before the table points to
    /// them.
    fn place_refcount_blocks(&mut self, indexes: &[usize], at: u64) -> Result<()> {
        let order = self.header.refcount_order;
        let mask = (1u64 << self.rb_bits) - 1;
        let mut blocks: Vec<(usize, u64, Box<[u8]>)> = indexes
            .iter()
            .enumerate()
            .map(|(k, &index)| {
                let block = vec![0u8; self.cluster_size as usize].into_boxed_slice();
                (index, at + k as u64, block)
            })
            .collect();
        let mut counted = Vec::new();
        let mut result = Ok(());
        for k in 0..blocks.len() {
            let cluster = blocks[k].1;
            let describing = self.block_index(cluster);
            match blocks.iter().position(|(index, _, _)| *index == describing) {
                Some(j) => refcount::set(&mut blocks[j].2, (cluster & mask) as usize, order, 1)?,
                None => {
                    result = self.set_refcount(cluster, 1);
                    if result.is_err() {
                        break;
                    }
                    counted.push(cluster);
                }
            }
        }
        let result = result.and_then(|()| {
            for (_, cluster, data) in &blocks {
                self.write_host("new refcount block", data, cluster << self.cluster_bits)?;
            }
            self.write_dirty_refcount_blocks()?;
            self.sync()
        });
        if let Err(e) = result {
            for cluster in counted {
                self.release_unreferenced(cluster << self.cluster_bits, 1);
            }
            return Err(e);
        }
        // The entries switch one by one; the blocks may count each other, so a failure
        // switches the ones already done back (and gives every block's cluster back).
        let mut switched: Vec<(usize, u64)> = Vec::new();
        for (index, cluster, _) in &blocks {
            let offset = cluster << self.cluster_bits;
            let entry_off = self.header.refcount_table_offset + *index as u64 * 8;
            let result = self.write_pointer(
                Kind::RefcountTable as u16,
                "refcount table entry",
                entry_off,
                &offset.to_be_bytes(),
                &[0; 8],
            );
            if let Err(e) = result {
                for &(i, off) in switched.iter().rev() {
                    let at = self.header.refcount_table_offset + i as u64 * 8;
                    let back = self.write_pointer(
                        Kind::RefcountTable as u16,
                        "refcount table entry",
                        at,
                        &[0; 8],
                        &off.to_be_bytes(),
                    );
                    if back.is_err() {
                        // Half switched on disk: stop writing anything.
                        self.broken = Some(format!("placing refcount blocks failed: {e}"));
                        self.in_doubt = true;
                        return Err(e);
                    }
                }
                for &c in &counted {
                    self.release_unreferenced(c << self.cluster_bits, 1);
                }
                return Err(e);
            }
            switched.push((*index, offset));
        }
        for (index, cluster, data) in blocks {
            let offset = cluster << self.cluster_bits;
            self.rc.table[index] = offset;
            self.overlaps
                .add(offset >> self.cluster_bits, 1, Kind::RefcountBlock);
            let _ = self.cache_refcount_block(offset, data);
        }
        Ok(())
    }

    /// Schedules a refcount decrement for `count` clusters at `offset`, applied at the
    /// next metadata flush, after the tables that dropped the reference are on disk.
    pub(crate) fn free_later(&mut self, offset: u64, count: u64) {
        self.rc.pending_frees.push((offset, count));
    }

    /// Schedules the release of every host cluster a dropped mapping used: a data or
    /// preallocated zero cluster, or each host cluster a compressed cluster touches.
    pub(crate) fn free_mapping_later(&mut self, old: Mapping) {
        match old {
            Mapping::Normal { host, .. }
            | Mapping::Zero {
                host: Some(host), ..
            } => self.free_later(host, 1),
            Mapping::Compressed { offset, len } => {
                let (first, count) = compressed::host_clusters(offset, len, self.cluster_bits);
                self.free_later(first, count)
            }
            Mapping::Zero { host: None, .. } | Mapping::Unallocated => {}
        }
    }

    /// Applies the deferred decrements (caller has flushed the L2 tables first). On
    /// failure what was not applied stays pending.
    pub(crate) fn apply_pending_frees(&mut self) -> Result<()> {
        let mut frees = std::mem::take(&mut self.rc.pending_frees);
        frees.reverse();
        while let Some((offset, count)) = frees.pop() {
            let done = self.adjust_refcounts(offset, count, false);
            let applied = match &done {
                Ok(()) => count,
                Err((n, _)) => *n,
            };
            for i in 0..applied {
                // A freed cluster may have been an L2 table: forget any cached copy.
                let at = offset + (i << self.cluster_bits);
                if self.refcount(at >> self.cluster_bits).unwrap_or(1) == 0 {
                    self.l2_cache.remove(at);
                }
            }
            if let Err((n, e)) = done {
                frees.push((offset + (n << self.cluster_bits), count - n));
                frees.reverse();
                self.rc.pending_frees.extend(frees);
                return Err(e);
            }
        }
        Ok(())
    }
}
