//! Internal snapshots: reading and rewriting the snapshot table, and create, goto and
//! delete with QEMU's refcount rules.
//!
//! Refcounts count paths: a data cluster's refcount is the number of L1 tables (the
//! active one and each snapshot's) that reach it through some L2 table, so a table
//! shared by two L1 tables gives each of its clusters two references. Taking a
//! snapshot adds one to every L2 table and data cluster the active L1 reaches; dropping
//! an L1 table (goto replaces the active one, delete drops a snapshot's) subtracts one.
//! Afterwards COPIED is recomputed in the active tables: set exactly where the
//! refcount is 1.
//!
//! Write order: raised refcounts reach the disk before anything points to the new
//! references; a new L1 copy and a new snapshot table are written and flushed before
//! the header points to them; references are dropped on disk before refcounts fall.

use std::time::{SystemTime, UNIX_EPOCH};

use super::meta::Meta;
use super::Image;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::compressed;
use crate::format::entry::{self, Mapping, COPIED};
use crate::format::refcount::max_value;
use crate::format::snapshot::{
    self as codec, Parsed, SnapshotEntry, SnapshotTable, TableContext, MAX_SNAPSHOTS,
    MAX_TABLE_BYTES,
};

/// Longest snapshot name accepted by `snapshot_create` (QEMU's tables allow 65535
/// bytes, but its tools and our C info struct hold 1023).
pub const MAX_SNAPSHOT_NAME: usize = 1023;

/// Facts about one internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique id (a decimal number for snapshots QEMU or cowdisk made).
    pub id: String,
    /// Name (tag); several snapshots may share one.
    pub name: String,
    /// Bytes of VM state saved with the snapshot (0 = disk-only).
    pub vm_state_size: u64,
    /// Creation time: seconds since the Unix epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// Guest clock when the snapshot was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Instruction count (record/replay), -1 when none.
    pub icount: i64,
}

impl SnapshotInfo {
    fn from_entry(e: &SnapshotEntry) -> SnapshotInfo {
        SnapshotInfo {
            id: String::from_utf8_lossy(&e.id).into_owned(),
            name: String::from_utf8_lossy(&e.name).into_owned(),
            vm_state_size: e.vm_state_size,
            date_sec: e.date_sec,
            date_nsec: e.date_nsec,
            vm_clock_nsec: e.vm_clock_nsec,
            disk_size: e.disk_size,
            icount: e.icount,
        }
    }
}

/// What [`Image::snapshot_create`] records besides the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Bytes of VM state saved (with [`Image::save_vmstate`]) before the snapshot;
    /// 0 for a disk-only snapshot.
    pub vm_state_size: u64,
    /// Guest clock in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count for record/replay; -1 for none.
    pub icount: i64,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            vm_state_size: 0,
            vm_clock_nsec: 0,
            icount: -1,
        }
    }
}

impl Meta {
    /// Bytes of guest address space one L1 entry maps.
    pub(crate) fn l1_span(&self) -> u64 {
        1u64 << (self.cluster_bits + self.l2_bits)
    }

    /// Index of the first L1 entry past the virtual disk: where VM state begins.
    pub(crate) fn vmstate_l1_index(&self) -> u64 {
        self.header.size.div_ceil(self.l1_span())
    }

    /// Guest offset of the VM state area (the virtual size rounded up to an L1 span).
    pub(crate) fn vmstate_offset(&self) -> u64 {
        self.vmstate_l1_index() * self.l1_span()
    }

    /// Reads and validates the snapshot table the header names.
    pub(crate) fn read_snapshot_table(&self) -> Result<SnapshotTable> {
        let count = self.header.nb_snapshots;
        if count == 0 {
            return Ok(SnapshotTable::default());
        }
        let offset = self.header.snapshots_offset;
        let ctx = TableContext {
            cluster_bits: self.cluster_bits,
            file_size: self.host_end,
            disk_size: self.header.size,
        };
        let limit = MAX_TABLE_BYTES.min(self.host_end.saturating_sub(offset));
        let mut want = self.cluster_size.max(64 * 1024).min(limit);
        loop {
            let mut buf = vec![0u8; want as usize];
            self.storage
                .read_at(&mut buf, offset)
                .map_err(Meta::io_err(format!(
                    "reading the snapshot table at {offset:#x}"
                )))?;
            match codec::parse_table(&buf, count, &ctx)? {
                Parsed::Done(table) => return Ok(table),
                Parsed::NeedMore(n) if n > limit => {
                    return Err(corrupt!(
                        "snapshot table at {offset:#x} ({count} entries) extends past the end of the file"
                    ))
                }
                Parsed::NeedMore(n) => want = n.max(want.saturating_mul(2)).min(limit),
            }
        }
    }

    /// Reads an inactive L1 table, checking its place first.
    fn read_l1_table(&self, what: &str, offset: u64, entries: u32) -> Result<Vec<u64>> {
        if entries == 0 {
            return Ok(Vec::new());
        }
        self.check_table_location(what, offset, entries as u64 * 8)?;
        let mut buf = vec![0u8; entries as usize * 8];
        self.storage
            .read_at(&mut buf, offset)
            .map_err(Meta::io_err(format!("reading {what} at {offset:#x}")))?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// Writes the whole active L1 table in place (no barrier).
    fn write_active_l1(&mut self) -> Result<()> {
        let bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let offset = self.header.l1_table_offset;
        if bytes.is_empty() {
            return Ok(());
        }
        self.write_host("L1 table", &bytes, offset)
    }

    /// The host clusters an L2 table references, as (offset, count) runs, validated.
    fn l2_references(&mut self, table: u64) -> Result<Vec<(u64, u64)>> {
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
        for e in entries {
            match entry::classify_l2(e, self.cluster_bits)? {
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
        Ok(refs)
    }

    /// Visits what the L1 table `l1` references — each L2 table's clusters, then the
    /// table — calling `f` with (host offset, clusters). Stops after `limit` visits.
    /// Returns the number of visits made.
    fn walk_tree(
        &mut self,
        l1: &[u64],
        limit: usize,
        f: &mut dyn FnMut(&mut Meta, u64, u64) -> Result<()>,
    ) -> Result<usize> {
        let mut done = 0;
        for &l1_entry in l1 {
            let table = entry::l1_table_offset(l1_entry, self.cluster_bits)?;
            if table == 0 {
                continue;
            }
            for (offset, count) in self.l2_references(table)? {
                if done == limit {
                    return Ok(done);
                }
                f(self, offset, count)?;
                done += 1;
            }
            if done == limit {
                return Ok(done);
            }
            f(self, table, 1)?;
            done += 1;
        }
        Ok(done)
    }

    /// Adds one reference to everything `l1` reaches. Fails without changing anything
    /// when some refcount is already at the width's maximum.
    fn reference_tree(&mut self, l1: &[u64]) -> Result<()> {
        let max = max_value(self.header.refcount_order);
        let bits = 1u32 << self.header.refcount_order;
        let mut done = 0usize;
        let result = self.walk_tree(l1, usize::MAX, &mut |meta, offset, count| {
            let first = offset >> meta.cluster_bits;
            for cluster in first..first + count {
                let rc = meta.refcount(cluster)?;
                if rc >= max {
                    return Err(Error::Unsupported(format!(
                        "cluster at {:#x} already has {rc} references, the most {bits}-bit \
                         refcounts can count; no further snapshot can share it",
                        cluster << meta.cluster_bits
                    )));
                }
            }
            meta.update_refcounts(offset, count, true)?;
            done += 1;
            Ok(())
        });
        if let Err(e) = result {
            // Undo what was added (the failing step changed nothing).
            let undo = done;
            let _ = self.walk_tree(l1, undo, &mut |meta, offset, count| {
                meta.update_refcounts(offset, count, false)
            });
            return Err(e);
        }
        Ok(())
    }

    /// Drops one reference from everything `l1` reaches (no table on disk may point to
    /// `l1`'s tree through the dropped path any more). Freed L2 tables leave the cache.
    fn unreference_tree(&mut self, l1: &[u64]) -> Result<()> {
        self.walk_tree(l1, usize::MAX, &mut |meta, offset, count| {
            meta.update_refcounts(offset, count, false)?;
            for i in 0..count {
                let at = offset + (i << meta.cluster_bits);
                if meta.refcount(at >> meta.cluster_bits)? == 0 {
                    meta.l2_cache.remove(at);
                }
            }
            Ok(())
        })
        .map(|_| ())
    }

    /// Sets COPIED on exactly the active L1 and L2 entries whose cluster has a
    /// refcount of one. Changed L2 tables become dirty in the cache; returns whether
    /// the in-memory L1 changed (the caller writes it after the refcounts and L2
    /// tables are on disk).
    fn update_copied_flags(&mut self) -> Result<bool> {
        let mut l1_changed = false;
        for i in 0..self.l1.len() {
            let l1_entry = self.l1[i];
            let table = entry::l1_table_offset(l1_entry, self.cluster_bits)?;
            if table == 0 {
                continue;
            }
            self.load_l2_table(table)?;
            let entries: Vec<u64> = self
                .l2_cache
                .get(table)
                .expect("table just loaded")
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                .collect();
            let mut changes = Vec::new();
            for (j, &e) in entries.iter().enumerate() {
                let host = match entry::classify_l2(e, self.cluster_bits)? {
                    Mapping::Normal { host, .. }
                    | Mapping::Zero {
                        host: Some(host), ..
                    } => host,
                    _ => continue,
                };
                let owned = self.refcount(host >> self.cluster_bits)? == 1;
                let want = if owned { e | COPIED } else { e & !COPIED };
                if want != e {
                    changes.push((j, want));
                }
            }
            if !changes.is_empty() {
                self.load_l2_table(table)?;
                let data = self.l2_cache.get_mut(table).expect("table just loaded");
                for (j, v) in changes {
                    data[j * 8..j * 8 + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
            let owned = self.refcount(table >> self.cluster_bits)? == 1;
            let want = if owned {
                l1_entry | COPIED
            } else {
                l1_entry & !COPIED
            };
            if want != l1_entry {
                self.l1[i] = want;
                l1_changed = true;
            }
        }
        Ok(l1_changed)
    }

    /// Recomputes COPIED and writes everything in order: refcounts, L2 tables, then L1.
    fn settle_copied_flags(&mut self) -> Result<()> {
        let l1_changed = self.update_copied_flags()?;
        self.flush_metadata()?;
        if l1_changed {
            self.write_active_l1()?;
            self.sync()?;
        }
        Ok(())
    }

    /// Writes `entries` as the new snapshot table and points the header to it, then
    /// frees the old table.
    fn replace_snapshot_table(&mut self, entries: Vec<SnapshotEntry>) -> Result<()> {
        let bytes = codec::encode_table(&entries)?;
        let cs = self.cluster_size;
        let offset = if entries.is_empty() {
            0
        } else {
            let clusters = (bytes.len() as u64).div_ceil(cs);
            let offset = self.alloc_clusters(clusters)?;
            self.write_dirty_refcount_blocks()?;
            let mut padded = bytes.clone();
            padded.resize((clusters * cs) as usize, 0);
            self.write_host("snapshot table", &padded, offset)?;
            offset
        };
        self.sync()?;
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(entries.len() as u32).to_be_bytes());
        fields[4..].copy_from_slice(&offset.to_be_bytes());
        self.write_header_fields(60, &fields)?;
        self.sync()?;
        let old_offset = self.header.snapshots_offset;
        let old_size = self.snapshots.size;
        let had_table = self.header.nb_snapshots > 0;
        self.header.nb_snapshots = entries.len() as u32;
        self.header.snapshots_offset = offset;
        self.snapshots = SnapshotTable {
            entries,
            size: bytes.len() as u64,
        };
        if had_table && old_size > 0 {
            self.update_refcounts(old_offset, old_size.div_ceil(cs), false)?;
        }
        Ok(())
    }

    /// Checks a new snapshot named `name` can be added, without changing anything.
    pub(crate) fn snapshot_create_check(&self, name: &[u8]) -> Result<()> {
        if name.len() > MAX_SNAPSHOT_NAME || name.contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "snapshot names must be at most {MAX_SNAPSHOT_NAME} bytes without NUL"
            )));
        }
        let entries = &self.snapshots.entries;
        if entries.len() >= MAX_SNAPSHOTS {
            return Err(Error::InvalidArgument(format!(
                "the image already has {} snapshots, the most qcow2 allows",
                entries.len()
            )));
        }
        let id = codec::next_id(entries);
        let len = codec::table_len(entries).next_multiple_of(8)
            + (codec::ENTRY_HEADER_LEN + codec::KNOWN_EXTRA_LEN + id.len() + name.len()) as u64;
        if len > MAX_TABLE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "the snapshot table would exceed {MAX_TABLE_BYTES} bytes"
            )));
        }
        Ok(())
    }

    /// Creates a snapshot of the active image (see [`Image::snapshot_create`]).
    pub(crate) fn snapshot_create(
        &mut self,
        name: &[u8],
        opts: &SnapshotOptions,
    ) -> Result<SnapshotEntry> {
        self.snapshot_create_check(name)?;
        self.flush_metadata()?;
        let span = self.l1_span();
        // The snapshot's L1: the active one, without VM state beyond what it records.
        let vm_index = self.vmstate_l1_index();
        let keep = if opts.vm_state_size > 0 {
            (self.vmstate_offset().saturating_add(opts.vm_state_size)).div_ceil(span)
        } else {
            vm_index
        }
        .min(self.l1.len() as u64) as usize;
        let kept: Vec<u64> = self.l1[..keep].to_vec();

        // 1. Raise the refcounts, clear COPIED where they are no longer 1, and put
        //    both on disk (refcounts first).
        self.reference_tree(&kept)?;
        self.settle_copied_flags()?;

        // 2. The L1 copy, on disk before the table names it.
        let mut sn_l1 = vec![0u64; self.l1.len()];
        sn_l1[..keep].copy_from_slice(&self.l1[..keep]);
        let l1_offset = if sn_l1.is_empty() {
            0
        } else {
            let bytes: Vec<u8> = sn_l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            let clusters = (bytes.len() as u64).div_ceil(self.cluster_size);
            let offset = self.alloc_clusters(clusters)?;
            self.write_dirty_refcount_blocks()?;
            self.write_host("snapshot L1 table", &bytes, offset)?;
            offset
        };
        self.sync()?;

        // 3. The new table, then the header pointer; the old table is freed after.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let entry = SnapshotEntry {
            l1_table_offset: l1_offset,
            l1_size: sn_l1.len() as u32,
            id: codec::next_id(&self.snapshots.entries),
            name: name.to_vec(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: opts.vm_clock_nsec,
            vm_state_size: opts.vm_state_size,
            disk_size: self.header.size,
            icount: opts.icount,
            unknown_extra: Vec::new(),
        };
        let mut entries = self.snapshots.entries.clone();
        entries.push(entry.clone());
        self.replace_snapshot_table(entries)?;

        // 4. The VM state now belongs to the snapshot: drop it from the active image.
        self.drop_active_vmstate()?;
        self.flush_metadata()?;
        Ok(entry)
    }

    /// Removes every L1 entry past the virtual disk (the VM state area) from the
    /// active image, releasing what they referenced.
    pub(crate) fn drop_active_vmstate(&mut self) -> Result<()> {
        let first = self.vmstate_l1_index() as usize;
        if first >= self.l1.len() || self.l1[first..].iter().all(|&e| e == 0) {
            return Ok(());
        }
        self.flush_metadata()?;
        let dropped: Vec<u64> = self.l1[first..].to_vec();
        for e in &mut self.l1[first..] {
            *e = 0;
        }
        self.write_active_l1()?;
        self.sync()?;
        self.unreference_tree(&dropped)?;
        Ok(())
    }

    fn find_snapshot(&self, id_or_name: &[u8]) -> Result<usize> {
        codec::find(&self.snapshots.entries, id_or_name).ok_or_else(|| {
            Error::NotFound(format!(
                "no snapshot with id or name '{}'",
                String::from_utf8_lossy(id_or_name)
            ))
        })
    }

    /// Checks the snapshot exists, without changing anything.
    pub(crate) fn snapshot_lookup_check(&self, id_or_name: &[u8]) -> Result<()> {
        self.find_snapshot(id_or_name).map(|_| ())
    }

    /// Makes the active image what the snapshot recorded (see [`Image::snapshot_goto`]).
    pub(crate) fn snapshot_goto(&mut self, id_or_name: &[u8]) -> Result<()> {
        let sn = self.snapshots.entries[self.find_snapshot(id_or_name)?].clone();
        let sn_l1 = self.read_l1_table("snapshot L1 table", sn.l1_table_offset, sn.l1_size)?;
        let needed = sn.disk_size.div_ceil(self.l1_span());
        if (sn.l1_size as u64) < needed {
            return Err(corrupt!(
                "snapshot '{}' has an L1 table of {} entries, too small for its disk size {}",
                String::from_utf8_lossy(&sn.id),
                sn.l1_size,
                sn.disk_size
            ));
        }
        if !sn.disk_size.is_multiple_of(512) {
            return Err(corrupt!(
                "snapshot '{}' has a disk size of {} bytes, not a multiple of 512",
                String::from_utf8_lossy(&sn.id),
                sn.disk_size
            ));
        }
        self.flush_metadata()?;
        if sn_l1.len() > self.l1.len() {
            self.grow_l1(sn_l1.len() as u64)?;
        }
        // Refcounts for the snapshot's tree first, on disk.
        self.reference_tree(&sn_l1)?;
        self.write_dirty_refcount_blocks()?;
        self.sync()?;
        // Overwrite the active L1 in place.
        let mut new_l1 = sn_l1;
        new_l1.resize(self.l1.len(), 0);
        let old_l1 = std::mem::replace(&mut self.l1, new_l1);
        if let Err(e) = self.write_active_l1().and_then(|_| self.sync()) {
            self.l1 = old_l1;
            return Err(e);
        }
        if sn.disk_size != self.header.size {
            self.write_header_fields(24, &sn.disk_size.to_be_bytes())?;
            self.sync()?;
            self.header.size = sn.disk_size;
        }
        // The old tree lost its reference.
        self.unreference_tree(&old_l1)?;
        self.settle_copied_flags()
    }

    /// Deletes a snapshot (see [`Image::snapshot_delete`]).
    pub(crate) fn snapshot_delete(&mut self, id_or_name: &[u8]) -> Result<()> {
        let index = self.find_snapshot(id_or_name)?;
        let sn = self.snapshots.entries[index].clone();
        let sn_l1 = self.read_l1_table("snapshot L1 table", sn.l1_table_offset, sn.l1_size)?;
        self.flush_metadata()?;
        let mut entries = self.snapshots.entries.clone();
        entries.remove(index);
        self.replace_snapshot_table(entries)?;
        self.unreference_tree(&sn_l1)?;
        if sn.l1_size > 0 {
            let clusters = (sn.l1_size as u64 * 8).div_ceil(self.cluster_size);
            self.update_refcounts(sn.l1_table_offset, clusters, false)?;
        }
        self.settle_copied_flags()
    }
}

impl Image {
    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let meta = self.lock()?;
        Ok(meta
            .snapshots
            .entries
            .iter()
            .map(SnapshotInfo::from_entry)
            .collect())
    }

    /// Creates an internal snapshot named `name` of the active image, with the next
    /// free numeric id. With `opts.vm_state_size > 0` the VM state saved so far (see
    /// [`Image::save_vmstate`]; buffered state is finalized first) is recorded in the
    /// snapshot and dropped from the active image. Fails without recording anything
    /// when saving VM state failed.
    pub fn snapshot_create(&self, name: &str, opts: &SnapshotOptions) -> Result<SnapshotInfo> {
        let mut vm = self.vmstate.quiesce(opts.vm_state_size > 0)?;
        {
            let meta = self.lock()?;
            meta.check_writable()?;
            meta.snapshot_create_check(name.as_bytes())?;
        }
        let mut created = None;
        let result = self.modify("snapshot create", |meta| {
            created = Some(meta.snapshot_create(name.as_bytes(), opts)?);
            Ok(())
        });
        vm.invalidate();
        result?;
        Ok(SnapshotInfo::from_entry(
            created.as_ref().expect("set on success"),
        ))
    }

    /// Reverts the active image to snapshot `id_or_name` (an id first, then a name):
    /// its data, its virtual size and its VM state (read it with
    /// [`Image::load_vmstate`]). What the active image held is released.
    pub fn snapshot_goto(&self, id_or_name: &str) -> Result<()> {
        let mut vm = self.vmstate.quiesce(false)?;
        {
            let meta = self.lock()?;
            meta.check_writable()?;
            meta.snapshot_lookup_check(id_or_name.as_bytes())?;
        }
        let result = self.modify("snapshot goto", |meta| {
            meta.snapshot_goto(id_or_name.as_bytes())
        });
        vm.invalidate();
        result
    }

    /// Deletes snapshot `id_or_name` (an id first, then a name; the first match),
    /// releasing the clusters only it referenced.
    pub fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        let mut vm = self.vmstate.quiesce(false)?;
        {
            let meta = self.lock()?;
            meta.check_writable()?;
            meta.snapshot_lookup_check(id_or_name.as_bytes())?;
        }
        let result = self.modify("snapshot delete", |meta| {
            meta.snapshot_delete(id_or_name.as_bytes())
        });
        vm.invalidate();
        result
    }
}
