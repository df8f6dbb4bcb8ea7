//! `check` and repair: every reference the image's metadata makes is counted and
//! compared with the refcounts, with `qemu-img check`'s rules, counts and wording, so
//! that scripts and people reading either tool see the same thing.
//!
//! The walk reads the tables from the file itself, tolerantly: an entry with reserved
//! bits, an unaligned table or a reference past the end of the file is reported and
//! counted, never an error that stops the check. Repairs (`Repair::Leaks`,
//! `Repair::All`) go through the engine's own refcount and table paths, so the write
//! order and the overlap checks hold for them too. A refcount structure that cannot
//! be trusted (a refcount of 0 for a referenced cluster, a broken refcount table
//! entry) is rebuilt from the counted references (`repair.rs`).

use super::meta::Meta;
use super::Image;
use crate::error::{Error, Result};
use crate::format::compressed;
use crate::format::entry::{COMPRESSED, COPIED, L1_RESERVED, L2_RESERVED, OFFSET_MASK, ZERO};
use crate::format::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_L1_BYTES};
use crate::format::refcount;

/// What a check may repair (`qemu-img check -r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Only report.
    None,
    /// Give back leaked clusters (refcounts higher than the references).
    Leaks,
    /// Everything repairable: leaks, refcounts lower than the references (rebuilding
    /// the refcount structure when it cannot be trusted), COPIED flags, misaligned
    /// preallocated zero clusters.
    All,
}

/// What a check found (and repaired), with `qemu-img check`'s meaning of each count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies left that may corrupt data.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Failures that kept parts of the image from being checked (I/O errors).
    pub check_errors: u64,
    /// Corruptions this check repaired.
    pub corruptions_fixed: u64,
    /// Leaks this check repaired.
    pub leaks_fixed: u64,
    /// End of the last cluster in use (by refcount or by reference).
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters with a host cluster or compressed data in the active image.
    pub allocated_clusters: u64,
    /// Allocated clusters not right after the previous one on the host.
    pub fragmented_clusters: u64,
    /// Compressed clusters in the active image.
    pub compressed_clusters: u64,
    /// One line per finding, in qemu-img's words (what it prints on stderr).
    pub messages: Vec<String>,
    /// The check could not finish (a repair that needs what the mode does not
    /// allow): why. The counts are then incomplete.
    pub failed: Option<String>,
}

impl CheckReport {
    fn error(&mut self, line: String) {
        self.corruptions += 1;
        self.messages.push(line);
    }
}

/// The references counted so far: one counter per host cluster of the file.
struct Counts {
    per_cluster: Vec<u64>,
    cluster_bits: u32,
    file_len: u64,
    max: u64,
}

impl Counts {
    /// One reference to every cluster `[offset, offset+len)` touches.
    fn add(&mut self, r: &mut CheckReport, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let cs = 1u64 << self.cluster_bits;
        let end = offset.saturating_add(len);
        if end.saturating_sub(self.file_len) >= cs {
            r.error(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {len:#x}"
            ));
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (end - 1) >> self.cluster_bits;
        for c in first..=last {
            let Some(slot) = self.per_cluster.get_mut(c as usize) else {
                // The last cluster partly past the end of the file (tolerated).
                continue;
            };
            if *slot >= self.max {
                r.error(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    c << self.cluster_bits
                ));
                r.messages.push(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img \
                     convert to create a clean copy if the image cannot be opened for writing"
                        .into(),
                );
            } else {
                *slot += 1;
            }
        }
    }

    fn get(&self, cluster: u64) -> u64 {
        self.per_cluster.get(cluster as usize).copied().unwrap_or(0)
    }
}

/// State of the walk over one image.
struct Walk {
    counts: Counts,
    /// The refcount structure needs a rebuild.
    rebuild: bool,
}

/// Reports the share of the check done, from 0.0 to 1.0.
pub type Progress<'a> = &'a mut dyn FnMut(f64);

impl Meta {
    fn read_raw(&self, len: u64, offset: u64) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.storage.read_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Counts an L1 table's references (`frag`: the active one, which the
    /// allocation statistics describe). Misaligned preallocated zero clusters are
    /// repaired with `fix_errors`.
    fn check_l1(
        &mut self,
        w: &mut Walk,
        r: &mut CheckReport,
        l1: &[u64],
        frag: bool,
        fix_errors: bool,
        progress: Progress,
    ) {
        let cs = self.cluster_size;
        for (k, &e) in l1.iter().enumerate() {
            if frag && k % 64 == 0 {
                progress(0.5 * k as f64 / l1.len() as f64);
            }
            if e == 0 {
                continue;
            }
            if e & L1_RESERVED != 0 {
                r.error(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
                continue;
            }
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            w.counts.add(r, l2, cs);
            if !l2.is_multiple_of(cs) {
                r.error(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            if l2.saturating_add(cs) > w.counts.file_len + cs {
                continue; // reported above; nothing to read
            }
            let table = match self.read_raw(cs, l2) {
                Ok(t) => t,
                Err(_) => {
                    r.check_errors += 1;
                    r.messages
                        .push("ERROR: I/O error in check_refcounts_l2".into());
                    continue;
                }
            };
            self.check_l2(w, r, l2, &table, frag, fix_errors);
        }
    }

    fn check_l2(
        &mut self,
        w: &mut Walk,
        r: &mut CheckReport,
        l2: u64,
        table: &[u8],
        frag: bool,
        fix_errors: bool,
    ) {
        let cs = self.cluster_size;
        let mut next = 0u64;
        for (i, raw) in table.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
            if e & COMPRESSED != 0 {
                if e & COPIED != 0 {
                    let (off, _) = compressed_range(e, self.cluster_bits);
                    r.error(format!(
                        "ERROR: coffset={off:#x}: copied flag must never be set for compressed clusters"
                    ));
                }
                let (off, len) = compressed_range(e, self.cluster_bits);
                w.counts.add(r, off, len);
                if frag {
                    r.allocated_clusters += 1;
                    r.compressed_clusters += 1;
                    r.fragmented_clusters += 1;
                }
                continue;
            }
            if e & L2_RESERVED != 0 {
                r.error(format!(
                    "ERROR found l2 entry with reserved bits set: {e:x}"
                ));
            }
            let offset = e & OFFSET_MASK;
            if offset == 0 {
                continue; // unallocated or a plain zero cluster
            }
            if !offset.is_multiple_of(cs) {
                if e & ZERO != 0 {
                    if fix_errors {
                        let at = l2 + i as u64 * 8;
                        let fixed = self
                            .write_host_as(
                                super::overlap::Kind::ActiveL2 as u16
                                    | super::overlap::Kind::SnapshotL2 as u16,
                                "repaired L2 entry",
                                &ZERO.to_be_bytes(),
                                at,
                            )
                            .map(|()| self.l2_cache.remove(l2));
                        if fixed.is_ok() {
                            r.corruptions_fixed += 1;
                            r.messages.push(format!(
                                "Repairing offset={offset:x}: Preallocated cluster is not properly \
                                 aligned; L2 entry corrupted."
                            ));
                        } else {
                            r.check_errors += 1;
                            r.messages
                                .push("ERROR: Failed to overwrite L2 table entry".into());
                        }
                        continue;
                    }
                    r.error(format!(
                        "ERROR offset={offset:x}: Preallocated cluster is not properly aligned; \
                         L2 entry corrupted."
                    ));
                } else {
                    r.error(format!(
                        "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 \
                         entry corrupted."
                    ));
                }
            }
            if frag {
                r.allocated_clusters += 1;
                if next != 0 && offset != next {
                    r.fragmented_clusters += 1;
                }
                next = offset + cs;
            }
            w.counts.add(r, offset, cs);
        }
    }

    /// Counts the refcount blocks; a broken refcount table entry asks for a rebuild.
    fn check_refblocks(&mut self, w: &mut Walk, r: &mut CheckReport) {
        let cs = self.cluster_size;
        let nb_clusters = w.counts.file_len.div_ceil(cs);
        for (i, &e) in self.rc.table.clone().iter().enumerate() {
            if e & 0x1ff != 0 {
                r.error(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                w.rebuild = true;
                continue;
            }
            if e == 0 {
                continue;
            }
            if e % cs != 0 {
                r.error(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                w.rebuild = true;
                continue;
            }
            if e >> self.cluster_bits >= nb_clusters {
                r.error(format!("ERROR refcount block {i} is outside image"));
                w.rebuild = true;
                continue;
            }
            w.counts.add(r, e, cs);
            let n = w.counts.get(e >> self.cluster_bits);
            if n != 1 {
                r.error(format!("ERROR refcount block {i} refcount={n}"));
                w.rebuild = true;
            }
        }
    }

    /// Counts every reference the image makes.
    fn count_references(
        &mut self,
        r: &mut CheckReport,
        fix_errors: bool,
        progress: Progress,
    ) -> Result<Walk> {
        let cs = self.cluster_size;
        let file_len = self
            .storage
            .len()
            .map_err(Meta::io_err("reading the image size"))?;
        let nb_clusters = file_len.div_ceil(cs);
        if nb_clusters > i32::MAX as u64 {
            r.check_errors += 1;
            return Err(Error::Unsupported(format!(
                "the image file holds {nb_clusters} clusters, more than a check can count"
            )));
        }
        let max = refcount::max_value(self.header.refcount_order);
        let mut w = Walk {
            counts: Counts {
                per_cluster: vec![0; nb_clusters as usize],
                cluster_bits: self.cluster_bits,
                file_len,
                max,
            },
            rebuild: false,
        };
        // One slot past the file: a last cluster referenced partly past the end.
        w.counts.per_cluster.push(0);
        w.counts.add(r, 0, cs);
        let h = self.header.clone();
        w.counts.add(r, h.l1_table_offset, h.l1_size as u64 * 8);
        let l1 = self.l1.clone();
        self.check_l1(&mut w, r, &l1, true, fix_errors, progress);
        for s in self.snapshots.entries.clone() {
            let id = String::from_utf8_lossy(&s.id).into_owned();
            let name = String::from_utf8_lossy(&s.name).into_owned();
            if s.l1_table_offset % cs != 0 {
                r.error(format!(
                    "ERROR snapshot {id} ({name}) l1_offset={:#x}: L1 table is not cluster \
                     aligned; snapshot table entry corrupted",
                    s.l1_table_offset
                ));
                continue;
            }
            if s.l1_size as u64 * 8 > MAX_L1_BYTES {
                r.error(format!(
                    "ERROR snapshot {id} ({name}) l1_size={:#x}: L1 table is too large; \
                     snapshot table entry corrupted",
                    s.l1_size
                ));
                continue;
            }
            w.counts.add(r, s.l1_table_offset, s.l1_size as u64 * 8);
            match self.read_raw(s.l1_size as u64 * 8, s.l1_table_offset) {
                Ok(bytes) => {
                    let table: Vec<u64> = bytes
                        .chunks_exact(8)
                        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                        .collect();
                    self.check_l1(&mut w, r, &table, false, fix_errors, &mut |_| {});
                }
                Err(_) => {
                    r.check_errors += 1;
                    r.messages
                        .push("ERROR: I/O error in check_refcounts_l1".into());
                }
            }
        }
        if h.nb_snapshots > 0 {
            w.counts.add(r, h.snapshots_offset, self.snapshots.size);
        }
        if let Some(e) = &self.bitmaps.error {
            r.error(format!("ERROR persistent bitmaps: {e}"));
        }
        for (offset, len, _) in self.bitmaps.clusters(cs) {
            w.counts.add(r, offset, len);
        }
        if let Some((offset, length)) = h.crypto_header {
            w.counts.add(r, offset, length);
        }
        w.counts.add(
            r,
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
        );
        self.check_refblocks(&mut w, r);
        Ok(w)
    }

    /// The refcount on disk of every cluster, read tolerantly: `None` where the
    /// refcount table entry cannot be used.
    fn disk_refcounts(&self, nb_clusters: u64) -> Vec<Option<u64>> {
        let per_block = 1u64 << self.rb_bits;
        let order = self.header.refcount_order;
        let cs = self.cluster_size;
        let mut out = Vec::with_capacity(nb_clusters as usize);
        let mut block: Option<(usize, Option<Vec<u8>>)> = None;
        for c in 0..nb_clusters {
            let index = (c / per_block) as usize;
            if block.as_ref().is_none_or(|(i, _)| *i != index) {
                let data = match self.rc.table.get(index).copied().unwrap_or(0) {
                    0 => Some(vec![0u8; cs as usize]),
                    e if e & 0x1ff != 0 || e % cs != 0 => None,
                    e => self.read_raw(cs, e).ok(),
                };
                block = Some((index, data));
            }
            let (_, data) = block.as_ref().expect("just set");
            out.push(
                data.as_ref()
                    .map(|d| refcount::get(d, (c % per_block) as usize, order)),
            );
        }
        out
    }

    /// Compares refcounts with references, repairing what `repair` allows. Returns
    /// whether the refcount structure needs a rebuild.
    fn compare_refcounts(
        &mut self,
        w: &Walk,
        r: &mut CheckReport,
        repair: Repair,
        quiet: bool,
        progress: Progress,
    ) -> bool {
        // Clusters past the end of the file are not compared (QEMU's rule).
        let nb = w.counts.file_len.div_ceil(self.cluster_size);
        let disk = self.disk_refcounts(nb);
        let mut rebuild = false;
        let mut highest = None;
        for c in 0..nb {
            if c % 65536 == 0 {
                progress(0.5 + 0.5 * c as f64 / nb as f64);
            }
            let Some(rc1) = disk[c as usize] else {
                r.check_errors += 1;
                if !quiet {
                    r.messages.push(format!(
                        "Can't get refcount for cluster {c}: Input/output error"
                    ));
                }
                continue;
            };
            let rc2 = w.counts.get(c);
            if rc1 > 0 || rc2 > 0 {
                highest = Some(c);
            }
            if rc1 == rc2 {
                continue;
            }
            if rc1 == 0 {
                rebuild = true;
            }
            let fixable = (rc1 > rc2 && repair != Repair::None)
                || (rc1 < rc2 && rc1 != 0 && repair == Repair::All);
            let word = if fixable {
                "Repairing"
            } else if rc1 < rc2 {
                "ERROR"
            } else {
                "Leaked"
            };
            if !quiet {
                r.messages
                    .push(format!("{word} cluster {c} refcount={rc1} reference={rc2}"));
            }
            let fixed = fixable && self.set_refcount(c, rc2).is_ok();
            match (fixed, rc1 > rc2) {
                (true, true) => r.leaks_fixed += 1,
                (true, false) => r.corruptions_fixed += 1,
                (false, true) => r.leaks += 1,
                (false, false) => r.corruptions += 1,
            }
        }
        r.image_end_offset = highest.map_or(0, |c| (c + 1) << self.cluster_bits);
        rebuild
    }

    /// COPIED flags of the active tables against the refcounts (after repairs).
    fn check_copied(&mut self, r: &mut CheckReport, repair: bool) -> Result<()> {
        let cs = self.cluster_size;
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let l2 = e & OFFSET_MASK;
            if l2 == 0 || e & L1_RESERVED != 0 || !l2.is_multiple_of(cs) {
                continue;
            }
            let Ok(rc) = self.refcount(l2 >> self.cluster_bits) else {
                continue;
            };
            if (rc == 1) != (e & COPIED != 0) {
                let word = if repair { "Repairing" } else { "ERROR" };
                r.messages.push(format!(
                    "{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
                let fixed = repair && {
                    self.l1[i] = if rc == 1 { e | COPIED } else { e & !COPIED };
                    self.write_l1_entry(i, e).is_ok()
                };
                if fixed {
                    r.corruptions_fixed += 1;
                } else {
                    r.corruptions += 1;
                }
            }
            let Ok(table) = self.read_raw(cs, l2) else {
                r.check_errors += 1;
                r.messages
                    .push("ERROR: Could not read L2 table: Input/output error".into());
                continue;
            };
            let mut fixed_table = table.clone();
            let mut changes = 0;
            for (j, raw) in table.chunks_exact(8).enumerate() {
                let le = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
                let host = le & OFFSET_MASK;
                if le & COMPRESSED != 0
                    || host == 0
                    || !host.is_multiple_of(cs)
                    || le & L2_RESERVED != 0
                {
                    continue;
                }
                let Ok(rc) = self.refcount(host >> self.cluster_bits) else {
                    continue;
                };
                if (rc == 1) != (le & COPIED != 0) {
                    let word = if repair { "Repairing" } else { "ERROR" };
                    r.messages.push(format!(
                        "{word} OFLAG_COPIED data cluster: l2_entry={le:x} refcount={rc}"
                    ));
                    let want = if rc == 1 { le | COPIED } else { le & !COPIED };
                    fixed_table[j * 8..j * 8 + 8].copy_from_slice(&want.to_be_bytes());
                    changes += 1;
                }
            }
            if changes == 0 {
                continue;
            }
            let fixed = repair
                && self
                    .write_host_as(
                        // A table the active image shares with a snapshot too.
                        super::overlap::Kind::ActiveL2 as u16
                            | super::overlap::Kind::SnapshotL2 as u16,
                        "repaired L2 table",
                        &fixed_table,
                        l2,
                    )
                    .is_ok();
            if fixed {
                self.l2_cache.remove(l2);
                r.corruptions_fixed += changes;
            } else {
                if repair {
                    r.check_errors += 1;
                    r.messages.push("ERROR: Could not write L2 table".into());
                }
                r.corruptions += changes;
            }
        }
        Ok(())
    }

    /// One check pass (see [`Image::check`]).
    pub(crate) fn check(&mut self, repair: Repair, progress: Progress) -> Result<CheckReport> {
        let mut r = CheckReport {
            total_clusters: self.header.size.div_ceil(self.cluster_size),
            ..CheckReport::default()
        };
        if self.in_doubt && repair != Repair::None {
            return Err(Error::Broken(
                "the handle cannot tell what the disk holds; reopen the image (with check) \
                 to repair it"
                    .into(),
            ));
        }
        // The check reads the file: what is only in the caches goes there first (on a
        // handle that met corruption too: its memory is consistent, only the disk is
        // not).
        if !self.read_only && !self.in_doubt {
            self.flush_metadata()?;
        }
        let fix_errors = repair == Repair::All;
        let w = self.count_references(&mut r, fix_errors, progress)?;
        let before = r.clone();
        let rebuild =
            self.compare_refcounts(&w, &mut r, Repair::None, false, progress) || w.rebuild;
        if rebuild && repair == Repair::All {
            r.messages.push("Rebuilding refcount structure".into());
            let counts = w.counts.per_cluster.clone();
            self.rebuild_refcounts_from(counts)?;
            // What the old structure claimed is gone; count again on the new one.
            let mut again = CheckReport::default();
            let w2 = self.count_references(&mut again, false, &mut |_| {})?;
            let mut freed = CheckReport::default();
            if self.compare_refcounts(&w2, &mut freed, Repair::Leaks, false, &mut |_| {}) {
                r.messages
                    .push("ERROR rebuilt refcount structure is still broken".into());
                r.check_errors += 1;
            }
            r.messages.extend(freed.messages);
            let mut after = CheckReport::default();
            self.compare_refcounts(&w2, &mut after, Repair::None, true, &mut |_| {});
            let (found_corruptions, found_leaks) = (r.corruptions, r.leaks);
            r.corruptions = after.corruptions + again.corruptions;
            r.leaks = after.leaks;
            r.corruptions_fixed += found_corruptions.saturating_sub(r.corruptions);
            r.leaks_fixed += found_leaks.saturating_sub(r.leaks);
            r.check_errors += after.check_errors + again.check_errors;
            r.image_end_offset = after.image_end_offset;
        } else if repair != Repair::None {
            if rebuild {
                r.messages
                    .push("ERROR need to rebuild refcount structures".into());
                r.check_errors += 1;
                r.failed =
                    Some("the refcount structure must be rebuilt, which only `-r all` does".into());
                return Ok(r);
            }
            if r.leaks > 0 || r.corruptions > 0 {
                // The second pass, repairing (QEMU prints the lines again).
                let messages = std::mem::take(&mut r.messages);
                let mut second = before.clone();
                second.messages = messages;
                self.compare_refcounts(&w, &mut second, repair, false, &mut |_| {});
                r = second;
            }
        }
        let copied_repair = repair == Repair::All
            || (repair == Repair::Leaks
                && r.check_errors == 0
                && r.corruptions == 0
                && r.leaks == 0);
        self.check_copied(&mut r, copied_repair)?;
        progress(1.0);
        if repair != Repair::None {
            self.flush_metadata()?;
            if r.corruptions == 0 && r.check_errors == 0 {
                let bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
                if self.header.incompatible_features & bits != 0 {
                    let old = self.header.incompatible_features;
                    let new = old & !bits;
                    self.write_header_fields(72, &new.to_be_bytes(), &old.to_be_bytes())?;
                    self.sync()?;
                    self.header.incompatible_features = new;
                    self.broken = None;
                }
            }
        }
        Ok(r)
    }
}

/// The host byte range of a compressed L2 entry (not validated).
fn compressed_range(e: u64, cluster_bits: u32) -> (u64, u64) {
    let x = compressed::offset_bits(cluster_bits);
    let offset = e & ((1u64 << x) - 1);
    let sectors = (e & !COPIED & !COMPRESSED) >> x;
    (offset, (sectors + 1) * compressed::SECTOR - (offset & 511))
}

impl Image {
    /// Checks the image's metadata the way `qemu-img check` does and repairs what
    /// `repair` allows (a handle opened read-write; an image marked corrupt is
    /// writable again once a repair leaves nothing to fix). Like `qemu-img check -r`,
    /// call it once more without repairing to see what is left. Waits for other
    /// calls' writes in flight, then holds the image for the check.
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        self.check_with_progress(repair, &mut |_| {})
    }

    /// [`Image::check`], calling `progress` with the share done (0.0 to 1.0).
    pub fn check_with_progress(&self, repair: Repair, progress: Progress) -> Result<CheckReport> {
        // VM state being written holds clusters not mapped yet: finish it first.
        let _vm = self.vmstate.quiesce(false)?;
        let mut meta = self.exclusive()?;
        if repair != Repair::None && meta.read_only {
            return Err(Error::ReadOnly(
                "repairing needs a read-write handle".into(),
            ));
        }
        meta.check(repair, progress)
    }
}
