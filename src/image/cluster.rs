//! Guest-to-host mapping: L1 lookups, the L2 table cache, and preparing a writable
//! (COPIED) L2 table — allocating a new one or copying one shared with a snapshot.

use super::meta::Meta;
use super::overlap::Kind;
use crate::error::Result;
use crate::format::entry::{self, Mapping, COPIED};

impl Meta {
    /// L1 and L2 indexes of a guest offset.
    pub(crate) fn indexes(&self, guest: u64) -> (usize, usize) {
        let cluster = guest >> self.cluster_bits;
        (
            (cluster >> self.l2_bits) as usize,
            (cluster & ((1u64 << self.l2_bits) - 1)) as usize,
        )
    }

    /// Makes sure the L2 table at `offset` is cached. Evicting a dirty table first
    /// writes the refcount blocks and a barrier (rule 1 of the write order).
    pub(crate) fn load_l2_table(&mut self, offset: u64) -> Result<()> {
        if self.l2_cache.contains(offset) {
            return Ok(());
        }
        self.make_l2_room()?;
        let data = self.read_table("L2 table", offset)?;
        self.l2_cache.insert(offset, data, false);
        Ok(())
    }

    fn make_l2_room(&mut self) -> Result<()> {
        if let Some((victim, dirty)) = self.l2_cache.victim() {
            if dirty {
                self.write_dirty_refcount_blocks()?;
                self.sync()?;
                self.write_l2_table(victim)?;
            }
            self.l2_cache.remove(victim);
        }
        Ok(())
    }

    /// The L2 table offset for L1 index `l1_index` (0 when none).
    pub(crate) fn l2_offset(&self, l1_index: usize) -> Result<u64> {
        match self.l1.get(l1_index) {
            Some(&e) => entry::l1_table_offset(e, self.cluster_bits),
            None => Ok(0),
        }
    }

    /// The raw L2 entry mapping `guest` (0 when no L2 table covers it).
    pub(crate) fn l2_entry(&mut self, guest: u64) -> Result<u64> {
        let (l1i, l2i) = self.indexes(guest);
        let table = self.l2_offset(l1i)?;
        if table == 0 {
            return Ok(0);
        }
        self.load_l2_table(table)?;
        let data = self.l2_cache.get(table).expect("table just loaded");
        Ok(u64::from_be_bytes(
            data[l2i * 8..l2i * 8 + 8].try_into().expect("8 bytes"),
        ))
    }

    /// What the active tables say about the cluster containing `guest`.
    pub(crate) fn mapping(&mut self, guest: u64) -> Result<Mapping> {
        let e = self.l2_entry(guest)?;
        self.classify(e)
    }

    /// Decodes an L2 entry of this image: v2 images have no zero flag, so an entry
    /// with it is corruption there (as QEMU reads it), not zeros.
    pub(crate) fn classify(&self, e: u64) -> Result<Mapping> {
        let m = entry::classify_l2(e, self.cluster_bits)?;
        if self.header.version < 3 && matches!(m, Mapping::Zero { .. }) {
            return Err(crate::corrupt!(
                "zero cluster entry {e:#x} found in a version 2 image"
            ));
        }
        Ok(m)
    }

    /// Sets the L2 entry mapping `guest`; its table must be writable (see
    /// [`Self::writable_l2_table`]). The table becomes dirty in the cache.
    pub(crate) fn set_l2_entry(&mut self, table: u64, guest: u64, value: u64) -> Result<()> {
        let (_, l2i) = self.indexes(guest);
        self.load_l2_table(table)?;
        let data = self.l2_cache.get_mut(table).expect("table just loaded");
        data[l2i * 8..l2i * 8 + 8].copy_from_slice(&value.to_be_bytes());
        Ok(())
    }

    /// Returns the offset of an L2 table for `l1_index` that this image owns alone
    /// (COPIED), allocating an empty one or copying a shared one first. The new table
    /// and its refcount are on disk before the L1 entry points to it (rule 3).
    pub(crate) fn writable_l2_table(&mut self, l1_index: usize) -> Result<u64> {
        let old_entry = self.l1[l1_index];
        let old = entry::l1_table_offset(old_entry, self.cluster_bits)?;
        if old != 0 && old_entry & COPIED != 0 {
            // About to change it: it must be an L2 table and nothing else.
            self.check_overlap(old, self.cluster_size, Kind::ActiveL2 as u16)?;
            return Ok(old);
        }
        let contents: Box<[u8]> = if old == 0 {
            vec![0u8; self.cluster_size as usize].into_boxed_slice()
        } else {
            self.load_l2_table(old)?;
            self.l2_cache.get(old).expect("table just loaded").into()
        };
        // Room first, so that nothing can fail once the L1 entry points to the table.
        self.make_l2_room()?;
        let new = self.alloc_clusters(1)?;
        let written = self
            .write_dirty_refcount_blocks()
            .and_then(|()| self.write_host("new L2 table", &contents, new))
            .and_then(|()| self.sync());
        if let Err(e) = written {
            self.release_unreferenced(new, 1);
            return Err(e);
        }
        self.l1[l1_index] = new | COPIED;
        if let Err(e) = self.write_l1_entry(l1_index, old_entry) {
            self.release_unreferenced(new, 1);
            return Err(e);
        }
        let cb = self.cluster_bits;
        self.overlaps.add(new >> cb, 1, Kind::ActiveL2);
        if old != 0 {
            self.overlaps.remove(old >> cb, 1, Kind::ActiveL2);
        }
        // The table is on disk: if the cache cannot take it now, it loads when needed.
        if self.l2_cache.victim().is_none() || self.make_l2_room().is_ok() {
            self.l2_cache.insert(new, contents, false);
        }
        if old != 0 {
            self.l2_cache.remove(old);
            self.free_later(old, 1);
        }
        Ok(new)
    }
}
