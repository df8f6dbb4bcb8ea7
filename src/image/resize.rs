//! Resizing: growing the L1 table (new table written and flushed before the header
//! points to it), zeroing what becomes visible past the old end, and shrinking only
//! over unallocated clusters unless forced.

use super::meta::Meta;
use crate::error::{Error, Result};
use crate::format::entry::Mapping;
use crate::format::header::MAX_L1_BYTES;
use crate::invalid;

impl Meta {
    /// Changes the virtual size (see `Image::resize`).
    pub(crate) fn resize(&mut self, new_size: u64, force: bool) -> Result<()> {
        let old_size = self.header.size;
        if !new_size.is_multiple_of(512) {
            return Err(invalid!(
                "new size {new_size} is not a multiple of 512 bytes"
            ));
        }
        let max = 1u64 << (2 * self.cluster_bits + 19).min(56);
        if new_size > max {
            return Err(invalid!(
                "new size {new_size} exceeds the maximum {max} for {}-byte clusters",
                self.cluster_size
            ));
        }
        if new_size != old_size {
            self.check_bitmaps_resizable(new_size)?;
        }
        match new_size.cmp(&old_size) {
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Greater => self.grow(old_size, new_size),
            std::cmp::Ordering::Less => self.shrink(new_size, force),
        }
        .inspect(|()| {
            if new_size != old_size {
                self.resized_bitmaps(new_size)
            }
        })
    }

    fn grow(&mut self, old_size: u64, new_size: u64) -> Result<()> {
        // VM state past the old end would become guest data (its area moves anyway).
        self.drop_active_vmstate()?;
        let needed = new_size.div_ceil(1u64 << (self.cluster_bits + self.l2_bits));
        if needed > self.l1.len() as u64 {
            self.grow_l1(needed)?;
        }
        self.set_size(new_size)?;
        // What becomes visible must read as zeros: the stale tail of the old last
        // cluster, and (over a backing file) everything the backing file would show.
        let tail_end = old_size.next_multiple_of(self.cluster_size).min(new_size);
        let mut zeroed_to = old_size;
        if tail_end > old_size {
            if let Mapping::Normal { .. } | Mapping::Compressed { .. } = self.mapping(old_size)? {
                self.write_sectors(&vec![0u8; (tail_end - old_size) as usize], old_size)?;
                zeroed_to = tail_end;
            }
        }
        // An unallocated old last cluster shows the backing file from the old end on,
        // so zeroing starts there, not at the next cluster.
        if let Some(b) = &self.backing {
            let backing_end = b.size().min(new_size);
            if backing_end > zeroed_to {
                self.write_zeroes(zeroed_to, backing_end - zeroed_to, false)?;
            }
        }
        Ok(())
    }

    fn shrink(&mut self, new_size: u64, force: bool) -> Result<()> {
        if self.header.nb_snapshots > 0 {
            return Err(Error::Unsupported(
                "cannot shrink an image that has internal snapshots".into(),
            ));
        }
        let cs = self.cluster_size;
        let first_dropped = new_size.next_multiple_of(cs);
        let old_end = self.header.size.next_multiple_of(cs);
        let mut pos = first_dropped;
        while pos < old_end {
            let (l1i, _) = self.indexes(pos);
            if self.l2_offset(l1i)? == 0 {
                pos = (pos | (self.l1_span_bytes() - 1)) + 1;
                continue;
            }
            if self.mapping(pos)? != Mapping::Unallocated && !force {
                return Err(invalid!(
                    "guest offset {pos:#x} past the new size {new_size} is allocated; \
                     shrinking would discard it (use force)"
                ));
            }
            pos += cs;
        }
        self.drop_active_vmstate()?; // its area moves with the size
        self.unallocate_range(first_dropped, old_end)?;
        // L2 tables wholly past the new end are dropped too.
        let keep = first_dropped.div_ceil(self.l1_span_bytes()) as usize;
        for index in keep..self.l1.len() {
            let table = self.l2_offset(index)?;
            if table != 0 {
                self.flush_metadata()?; // the table's cleared entries reach disk first
                let old = self.l1[index];
                self.l1[index] = 0;
                self.write_l1_entry(index, old)?;
                self.overlaps.remove(
                    table >> self.cluster_bits,
                    1,
                    super::overlap::Kind::ActiveL2,
                );
                self.sync()?;
                self.l2_cache.remove(table);
                self.free_later(table, 1);
            }
        }
        self.flush_metadata()?;
        self.set_size(new_size)
    }

    fn l1_span_bytes(&self) -> u64 {
        1u64 << (self.cluster_bits + self.l2_bits)
    }

    fn set_size(&mut self, new_size: u64) -> Result<()> {
        let old = self.header.size.to_be_bytes();
        self.write_header_fields(24, &new_size.to_be_bytes(), &old)?;
        self.header.size = new_size;
        self.sync()
    }

    /// Replaces the L1 table with one of `entries` entries (copying the old ones).
    pub(crate) fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries * 8 > MAX_L1_BYTES {
            return Err(Error::NoSpace(format!(
                "an L1 table of {entries} entries exceeds {MAX_L1_BYTES} bytes"
            )));
        }
        let old_offset = self.header.l1_table_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(self.cluster_size);
        let clusters = (entries * 8).div_ceil(self.cluster_size);
        let offset = self.alloc_clusters(clusters)?;
        let mut table = self.l1.clone();
        table.resize(entries as usize, 0);
        let mut bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        bytes.resize((clusters * self.cluster_size) as usize, 0);
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        fields[4..].copy_from_slice(&offset.to_be_bytes());
        let mut old_fields = [0u8; 12];
        old_fields[..4].copy_from_slice(&self.header.l1_size.to_be_bytes());
        old_fields[4..].copy_from_slice(&old_offset.to_be_bytes());
        let switched = self
            .write_host("new L1 table", &bytes, offset)
            .and_then(|()| self.write_dirty_refcount_blocks())
            .and_then(|()| self.sync())
            .and_then(|()| self.write_header_fields(36, &fields, &old_fields));
        if let Err(e) = switched {
            self.release_unreferenced(offset, clusters);
            return Err(e);
        }
        self.header.l1_size = entries as u32;
        self.header.l1_table_offset = offset;
        self.l1 = table;
        let cb = self.cluster_bits;
        self.overlaps.remove(
            old_offset >> cb,
            old_clusters,
            super::overlap::Kind::ActiveL1,
        );
        self.overlaps
            .add(offset >> cb, clusters, super::overlap::Kind::ActiveL1);
        self.sync()?;
        if old_clusters > 0 {
            self.release_unreferenced(old_offset, old_clusters);
        }
        Ok(())
    }
}
