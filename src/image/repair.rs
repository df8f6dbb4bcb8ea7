//! Rebuilding refcounts from the metadata that references clusters — what opening a
//! lazy-refcounts image that was not closed cleanly (dirty bit set) requires before
//! anything may be allocated. The new refcount table and blocks are written after the
//! end of the file and switched to in one header update; the old ones become free.

use super::meta::Meta;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::compressed;
use crate::format::entry::{self, Mapping};
use crate::format::header::{INCOMPAT_DIRTY, MAX_REFTABLE_BYTES};
use crate::format::refcount;

/// Expected refcount of every host cluster of the file.
struct Counts {
    per_cluster: Vec<u64>,
    cluster_bits: u32,
}

impl Counts {
    /// Adds one reference to every cluster touched by `[offset, offset+len)`.
    fn add(&mut self, what: &str, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        if last as usize >= self.per_cluster.len() {
            return Err(corrupt!(
                "{what} at {offset:#x} lies outside the file; cannot rebuild refcounts"
            ));
        }
        for c in first..=last {
            self.per_cluster[c as usize] += 1;
        }
        Ok(())
    }
}

impl Meta {
    fn count_l1(&mut self, counts: &mut Counts, l1: &[u64], what: &str) -> Result<()> {
        let cs = self.cluster_size;
        for &e in l1 {
            let table = entry::l1_table_offset(e, self.cluster_bits)?;
            if table == 0 {
                continue;
            }
            counts.add(&format!("L2 table of {what}"), table, cs)?;
            let data = self.read_table("L2 table", table)?;
            for raw in data.chunks_exact(8) {
                let e = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
                match self.classify(e)? {
                    Mapping::Normal { host, .. }
                    | Mapping::Zero {
                        host: Some(host), ..
                    } => counts.add("data cluster", host, cs)?,
                    Mapping::Compressed { offset, len } => {
                        let (first, n) = compressed::host_clusters(offset, len, self.cluster_bits);
                        counts.add("compressed cluster", first, n << self.cluster_bits)?
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Recomputes every refcount from the references in the image, writes a fresh
    /// refcount structure after the end of the file, switches the header to it and
    /// clears the dirty bit.
    pub(crate) fn rebuild_refcounts(&mut self) -> Result<()> {
        if let Some(e) = &self.bitmaps.error {
            return Err(Error::Unsupported(format!(
                "cannot rebuild the refcounts: the persistent bitmaps cannot be read ({e})"
            )));
        }
        let cs = self.cluster_size;
        let file_clusters = self.file_len.div_ceil(cs);
        // A cluster past the end of the file may be referenced by a crash between the
        // metadata and data writes; count it too (it reads as zeros).
        let mut counts = Counts {
            per_cluster: vec![0; (file_clusters + 1) as usize],
            cluster_bits: self.cluster_bits,
        };
        counts.add("header", 0, cs)?;
        if let Some((offset, length)) = self.header.crypto_header {
            counts.add("LUKS header", offset, length)?;
        }
        counts.add(
            "L1 table",
            self.header.l1_table_offset,
            self.header.l1_size as u64 * 8,
        )?;
        let l1 = self.l1.clone();
        self.count_l1(&mut counts, &l1, "the active L1 table")?;
        if self.header.nb_snapshots > 0 {
            counts.add(
                "snapshot table",
                self.header.snapshots_offset,
                self.snapshots.size,
            )?;
            let snapshots: Vec<(u64, u32)> = self
                .snapshots
                .entries
                .iter()
                .map(|s| (s.l1_table_offset, s.l1_size))
                .collect();
            for (offset, size) in snapshots {
                counts.add("snapshot L1 table", offset, size as u64 * 8)?;
                let mut bytes = vec![0u8; size as usize * 8];
                self.storage
                    .read_at(&mut bytes, offset)
                    .map_err(Meta::io_err(format!(
                        "reading snapshot L1 table at {offset:#x}"
                    )))?;
                let table: Vec<u64> = bytes
                    .chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                self.count_l1(&mut counts, &table, "a snapshot")?;
            }
        }

        for (offset, len, kind) in self.bitmaps.clusters(cs) {
            counts.add(kind.name(), offset, len)?;
        }
        self.rebuild_refcounts_from(counts.per_cluster)
    }

    /// Writes a fresh refcount structure holding `per_cluster[i]` for cluster `i`
    /// after the end of the file (sized to describe itself too), switches the header
    /// to it (clearing the dirty bit) and drops the old one from memory: nothing
    /// references the old table and blocks any more, so they read as free.
    pub(crate) fn rebuild_refcounts_from(&mut self, per_cluster: Vec<u64>) -> Result<()> {
        let order = self.header.refcount_order;
        self.rebuild_refcounts_with(per_cluster, order)
    }

    /// [`Meta::rebuild_refcounts_from`] with refcounts `1 << order` bits wide (amend
    /// changes the width this way).
    pub(crate) fn rebuild_refcounts_with(
        &mut self,
        per_cluster: Vec<u64>,
        order: u32,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let mut counts = Counts {
            per_cluster,
            cluster_bits: self.cluster_bits,
        };
        // Lay out the new structure after everything: table, then blocks, sized to
        // describe themselves too (iterate to a fixed point).
        let start = counts.per_cluster.len() as u64;
        let rb_bits = self.cluster_bits + 3 - order;
        let per_block = 1u64 << rb_bits;
        let (mut table_clusters, mut blocks) = (1u64, 1u64);
        loop {
            let total = start + table_clusters + blocks;
            let need_blocks = total.div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cs);
            if need_blocks == blocks && need_table == table_clusters {
                break;
            }
            blocks = need_blocks;
            table_clusters = need_table;
        }
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace(
                "the rebuilt refcount table would exceed 8 MiB".into(),
            ));
        }
        let end = start + table_clusters + blocks;
        counts.per_cluster.resize(end as usize, 0);
        for c in start..end {
            counts.per_cluster[c as usize] = 1;
        }
        let table_offset = start * cs;
        let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
        for b in 0..blocks {
            let block_offset = (start + table_clusters + b) * cs;
            table[b as usize] = block_offset;
            let mut block = vec![0u8; cs as usize];
            for i in 0..per_block {
                let c = b * per_block + i;
                let value = counts.per_cluster.get(c as usize).copied().unwrap_or(0);
                refcount::set(&mut block, i as usize, order, value).map_err(|_| {
                    Error::NoSpace(format!(
                        "cluster {c} has {value} references, more than {}-bit refcounts hold",
                        1u32 << order
                    ))
                })?;
            }
            self.write_host("rebuilt refcount block", &block, block_offset)?;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_host("rebuilt refcount table", &bytes, table_offset)?;
        self.sync()?;
        let old = self.header.clone();
        self.header.refcount_table_offset = table_offset;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.header.refcount_order = order;
        self.header.incompatible_features &= !INCOMPAT_DIRTY;
        self.switch_header(&old)?;
        self.rb_bits = rb_bits;
        self.host_end = self.host_end.max(end * cs);
        self.rc.table = table;
        self.rc.blocks = super::cache::TableCache::new(super::open::REFCOUNT_CACHE_BLOCKS);
        self.rc.free_hint = 0;
        self.rc.pending_frees.clear();
        self.rc.orphans.clear();
        self.rebuild_metadata_index();
        self.sync()
    }
}
