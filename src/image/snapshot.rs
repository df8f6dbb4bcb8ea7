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
use crate::format::entry::{self, COPIED};
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
            lenient: self.check_mode,
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

    /// Creates a snapshot of the active image (see [`Image::snapshot_create`]), in
    /// one metadata transaction (see `txn.rs`): the snapshot takes over the active
    /// image's L2 tables; the active image keeps them where they already say
    /// "shared" and gets copies with COPIED cleared where they do not.
    pub(crate) fn snapshot_create(
        &mut self,
        name: &[u8],
        opts: &SnapshotOptions,
    ) -> Result<SnapshotEntry> {
        self.snapshot_create_check(name)?;
        let mut t = self.begin_txn()?;
        let span = self.l1_span();
        // The snapshot's L1 holds the disk and the VM state it records; state past
        // that is dropped, and the active image keeps no VM state (QEMU's rule).
        let vm_index = self.vmstate_l1_index() as usize;
        let keep = if opts.vm_state_size > 0 {
            (self.vmstate_offset().saturating_add(opts.vm_state_size)).div_ceil(span)
        } else {
            vm_index as u64
        }
        .min(self.l1.len() as u64) as usize;
        let old_l1 = self.l1.clone();
        let mut active = vec![0u64; old_l1.len()];
        let mut sn_l1 = vec![0u64; old_l1.len()];
        for (i, &e) in old_l1.iter().enumerate() {
            let table = entry::l1_table_offset(e, self.cluster_bits)?;
            if table == 0 || i < keep {
                continue;
            }
            // Unrecorded VM state: the active L1's reference goes away.
            self.txn_reference_l2(&mut t, table, false)?;
        }
        for (i, &e) in old_l1.iter().enumerate().take(keep) {
            let table = entry::l1_table_offset(e, self.cluster_bits)?;
            if table == 0 {
                continue;
            }
            // The snapshot takes over the active L1's reference to the table.
            sn_l1[i] = table;
            if i >= vm_index {
                continue; // recorded VM state leaves the active image
            }
            // The active image reaches everything under it once more.
            let (entry, copy) =
                self.txn_active_table(&mut t, table, &mut |_, _, _| Ok(false), true)?;
            for (offset, count) in self.l2_refs(table)?.refs {
                self.txn_add(&mut t, offset, count, true)?;
            }
            if !copy {
                self.txn_add(&mut t, table, 1, true)?;
            }
            active[i] = entry;
        }
        let l1_offset = if sn_l1.is_empty() {
            0
        } else {
            let bytes: Vec<u8> = sn_l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.txn_new_table(&mut t, "snapshot L1 table", &bytes)?
        };
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
        t.snapshots = Some(entries);
        t.l1 = Some(active);
        self.commit_txn(t)?;
        Ok(entry)
    }

    /// Removes every L1 entry past the virtual disk (the VM state area) from the
    /// active image, releasing what they referenced (one transaction).
    pub(crate) fn drop_active_vmstate(&mut self) -> Result<()> {
        let first = self.vmstate_l1_index() as usize;
        if first >= self.l1.len() || self.l1[first..].iter().all(|&e| e == 0) {
            return Ok(());
        }
        let mut t = self.begin_txn()?;
        let mut active = self.l1.clone();
        for e in &mut active[first..] {
            let table = entry::l1_table_offset(*e, self.cluster_bits)?;
            if table != 0 {
                self.txn_reference_l2(&mut t, table, false)?;
            }
            *e = 0;
        }
        t.l1 = Some(active);
        self.commit_txn(t)
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

    /// Turns this read-only handle into a view of an internal snapshot: reads see the
    /// disk as the snapshot recorded it (its L1 table and disk size), as
    /// `qemu-img convert -l` reads it. Nothing on disk changes.
    pub(crate) fn view_snapshot(&mut self, id_or_name: &[u8]) -> Result<()> {
        if !self.read_only {
            return Err(Error::InvalidArgument(
                "an internal snapshot can only be opened read-only".into(),
            ));
        }
        let sn = self.snapshots.entries[self.find_snapshot(id_or_name)?].clone();
        let mut sn_l1 = self.read_l1_table("snapshot L1 table", sn.l1_table_offset, sn.l1_size)?;
        let needed = sn.disk_size.div_ceil(self.l1_span());
        if (sn.l1_size as u64) < needed {
            return Err(corrupt!(
                "snapshot '{}' has an L1 table of {} entries, too small for its disk size {}",
                String::from_utf8_lossy(&sn.id),
                sn.l1_size,
                sn.disk_size
            ));
        }
        for &e in &sn_l1 {
            entry::l1_table_offset(e, self.cluster_bits)?;
        }
        sn_l1.truncate(needed as usize);
        self.l1 = sn_l1;
        self.header.size = sn.disk_size;
        Ok(())
    }

    /// Makes the active image what the snapshot recorded (see [`Image::snapshot_goto`]),
    /// in one metadata transaction: the active L1 shares the snapshot's L2 tables
    /// (copies where their COPIED flags would claim sole ownership), and the old
    /// active tree loses its references.
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
        let resized = sn.disk_size != self.header.size;
        if resized {
            // The disk changes size, and the bitmaps with it (as on resize).
            self.check_bitmaps_resizable(sn.disk_size)?;
        }
        let mut t = self.begin_txn()?;
        // The old active tree's references go first (so a cluster both trees reach
        // never counts past the width on the way).
        for e in self.l1.clone() {
            let table = entry::l1_table_offset(e, self.cluster_bits)?;
            if table != 0 {
                self.txn_reference_l2(&mut t, table, false)?;
            }
        }
        let mut active = vec![0u64; sn_l1.len().max(self.l1.len())];
        for (j, &e) in sn_l1.iter().enumerate() {
            let table = entry::l1_table_offset(e, self.cluster_bits)?;
            if table == 0 {
                continue;
            }
            // Shared with the snapshot from now on: nothing under it is owned alone.
            let (entry, copy) =
                self.txn_active_table(&mut t, table, &mut |_, _, _| Ok(false), true)?;
            for (offset, count) in self.l2_refs(table)?.refs {
                self.txn_add(&mut t, offset, count, true)?;
            }
            if !copy {
                self.txn_add(&mut t, table, 1, true)?;
            }
            active[j] = entry;
        }
        t.l1 = Some(active);
        if resized {
            t.size = Some(sn.disk_size);
        }
        self.commit_txn(t)?;
        if resized {
            self.resized_bitmaps(sn.disk_size);
        }
        Ok(())
    }

    /// Deletes a snapshot (see [`Image::snapshot_delete`]) in one metadata
    /// transaction: its tree loses a reference, and active tables that the active
    /// image now owns alone get COPIED back (copies where entries change).
    pub(crate) fn snapshot_delete(&mut self, id_or_name: &[u8]) -> Result<()> {
        let index = self.find_snapshot(id_or_name)?;
        let sn = self.snapshots.entries[index].clone();
        let sn_l1 = self.read_l1_table("snapshot L1 table", sn.l1_table_offset, sn.l1_size)?;
        let mut t = self.begin_txn()?;
        let mut entries = self.snapshots.entries.clone();
        entries.remove(index);
        t.snapshots = Some(entries);
        if sn.l1_size > 0 {
            let clusters = (sn.l1_size as u64 * 8).div_ceil(self.cluster_size);
            self.txn_add(&mut t, sn.l1_table_offset, clusters, false)?;
        }
        for &e in &sn_l1 {
            let table = entry::l1_table_offset(e, self.cluster_bits)?;
            if table != 0 {
                self.txn_reference_l2(&mut t, table, false)?;
            }
        }
        let old_l1 = self.l1.clone();
        let mut active = old_l1.clone();
        let bits = self.cluster_bits;
        for (i, &e) in old_l1.iter().enumerate() {
            let table = entry::l1_table_offset(e, bits)?;
            if table == 0 {
                continue;
            }
            let (_, now) = self.txn_refcounts(&t, table >> bits)?;
            if now != 1 {
                // Still shared: so is everything under it; nothing changes.
                active[i] = table;
                continue;
            }
            let (entry, copy) = self.txn_active_table(
                &mut t,
                table,
                &mut |m, t, host| Ok(m.txn_refcounts(t, host >> bits)?.1 == 1),
                true,
            )?;
            if copy {
                // The copy takes over the active reference (same clusters under it).
                self.txn_add(&mut t, table, 1, false)?;
            }
            active[i] = entry | COPIED;
        }
        if active != old_l1 {
            t.l1 = Some(active);
        }
        self.commit_txn(t)
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
