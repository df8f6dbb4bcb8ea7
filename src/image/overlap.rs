//! Overlap checks: before any host write, the target range is checked against the
//! image's live metadata, so that a damaged image (an L2 entry pointing into a
//! refcount block, an L1 entry pointing at the refcount table, a zeroed refcount
//! handed out by the allocator…) is not damaged further. A hit refuses the write,
//! marks the image corrupt (incompatible bit 1, as QEMU does) and makes the handle
//! refuse writes; reads go on.
//!
//! The index is kept as tables are allocated and freed, so the hot path pays one
//! ordered-map probe, not a scan. It knows the header, the active L1 table, the
//! refcount table, every refcount block, every active L2 table, the snapshot table and
//! the snapshots' L1 tables, the persistent bitmaps' directory, tables and data and, read once when the snapshot table changes (up to
//! [`MAX_SNAPSHOT_L1_BYTES`] of them), the snapshots' L2 tables.

use std::collections::BTreeMap;

use super::meta::Meta;
use crate::error::{Error, Result};
use crate::format::entry;
use crate::format::header::INCOMPAT_CORRUPT;

/// A kind of metadata, as a bit so that sets of kinds are masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub(crate) enum Kind {
    Header = 1,
    ActiveL1 = 2,
    ActiveL2 = 4,
    RefcountTable = 8,
    RefcountBlock = 16,
    SnapshotTable = 32,
    SnapshotL1 = 64,
    SnapshotL2 = 128,
    LuksHeader = 256,
    BitmapDirectory = 512,
    BitmapTable = 1024,
    BitmapData = 2048,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Header => "qcow2 header",
            Kind::ActiveL1 => "active L1 table",
            Kind::ActiveL2 => "active L2 table",
            Kind::RefcountTable => "refcount table",
            Kind::RefcountBlock => "refcount block",
            Kind::SnapshotTable => "snapshot table",
            Kind::SnapshotL1 => "inactive L1 table",
            Kind::SnapshotL2 => "inactive L2 table",
            Kind::LuksHeader => "LUKS header",
            Kind::BitmapDirectory => "bitmap directory",
            Kind::BitmapTable => "bitmap table",
            Kind::BitmapData => "bitmap data",
        }
    }
}

/// Kinds a write may overlap because it rewrites that very structure (QEMU's `ign`).
pub(crate) type Allowed = u16;

/// No metadata may be overlapped (guest data, new tables).
pub(crate) const NONE: Allowed = 0;

/// Snapshot L1 tables read to index the snapshots' L2 tables, at most (QEMU checks
/// inactive L2 tables only when asked to; this covers the usual images cheaply).
pub(crate) const MAX_SNAPSHOT_L1_BYTES: u64 = 16 << 20;

/// Live metadata ranges by first cluster: (clusters, kind), possibly several per
/// start on a damaged image.
#[derive(Default)]
pub(crate) struct MetadataIndex {
    ranges: BTreeMap<u64, Vec<(u64, Kind)>>,
    /// The longest range, in clusters: how far back a probe must look.
    longest: u64,
}

impl MetadataIndex {
    pub(crate) fn add(&mut self, cluster: u64, clusters: u64, kind: Kind) {
        if clusters == 0 {
            return;
        }
        self.ranges
            .entry(cluster)
            .or_default()
            .push((clusters, kind));
        self.longest = self.longest.max(clusters);
    }

    pub(crate) fn remove(&mut self, cluster: u64, clusters: u64, kind: Kind) {
        if let Some(v) = self.ranges.get_mut(&cluster) {
            if let Some(i) = v.iter().position(|&(n, k)| n == clusters && k == kind) {
                v.swap_remove(i);
            }
            if v.is_empty() {
                self.ranges.remove(&cluster);
            }
        }
    }

    /// The first metadata range (not of an allowed kind) that clusters
    /// `[first, first + n)` touch: (its kind, its first cluster).
    pub(crate) fn find(&self, first: u64, n: u64, allowed: Allowed) -> Option<(Kind, u64)> {
        let from = first.saturating_sub(self.longest.saturating_sub(1));
        let end = first.saturating_add(n);
        for (&start, v) in self.ranges.range(from..end) {
            for &(len, kind) in v {
                if start + len > first && allowed & kind as u16 == 0 {
                    return Some((kind, start));
                }
            }
        }
        None
    }
}

impl Meta {
    /// Builds the index from the header, the tables in memory and the snapshot table.
    pub(crate) fn rebuild_metadata_index(&mut self) {
        let cb = self.cluster_bits;
        let cs = self.cluster_size;
        let clusters = |bytes: u64| bytes.div_ceil(cs);
        let mut ix = MetadataIndex::default();
        ix.add(0, 1, Kind::Header);
        let h = &self.header;
        ix.add(
            h.l1_table_offset >> cb,
            clusters(h.l1_size as u64 * 8),
            Kind::ActiveL1,
        );
        ix.add(
            h.refcount_table_offset >> cb,
            h.refcount_table_clusters as u64,
            Kind::RefcountTable,
        );
        for &e in &self.rc.table {
            let off = e & !0x1ff;
            if off != 0 {
                ix.add(off >> cb, 1, Kind::RefcountBlock);
            }
        }
        for &e in &self.l1 {
            if let Ok(table) = entry::l1_table_offset(e, cb) {
                if table != 0 {
                    ix.add(table >> cb, 1, Kind::ActiveL2);
                }
            }
        }
        if let Some((offset, length)) = h.crypto_header {
            ix.add(offset >> cb, clusters(length), Kind::LuksHeader);
        }
        for (offset, len, kind) in self.bitmaps.clusters(cs) {
            ix.add(offset >> cb, clusters(len), kind);
        }
        if h.nb_snapshots > 0 {
            ix.add(
                h.snapshots_offset >> cb,
                clusters(self.snapshots.size),
                Kind::SnapshotTable,
            );
        }
        let mut budget = MAX_SNAPSHOT_L1_BYTES;
        for s in &self.snapshots.entries {
            let bytes = s.l1_size as u64 * 8;
            ix.add(s.l1_table_offset >> cb, clusters(bytes), Kind::SnapshotL1);
            if bytes > budget || s.l1_table_offset % cs != 0 {
                continue;
            }
            budget -= bytes;
            let mut buf = vec![0u8; bytes as usize];
            if self.storage.read_at(&mut buf, s.l1_table_offset).is_err() {
                continue;
            }
            for raw in buf.chunks_exact(8) {
                let e = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
                if let Ok(table) = entry::l1_table_offset(e, cb) {
                    if table != 0 {
                        ix.add(table >> cb, 1, Kind::SnapshotL2);
                    }
                }
            }
        }
        self.overlaps = ix;
    }

    /// Fails (marking the image corrupt) when a write of `len` bytes at host `offset`
    /// would overwrite live metadata other than the `allowed` kinds.
    pub(crate) fn check_overlap(&mut self, offset: u64, len: u64, allowed: Allowed) -> Result<()> {
        if len == 0 || !self.overlap_checks {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let n = ((offset + len - 1) >> self.cluster_bits) - first + 1;
        match self.overlaps.find(first, n, allowed) {
            None => Ok(()),
            Some((kind, at)) => Err(self.signal_corruption(format!(
                "Preventing invalid write on metadata (overlaps with {} at {:#x}): \
                 {len} bytes at host offset {offset:#x}",
                kind.name(),
                at << self.cluster_bits
            ))),
        }
    }

    /// Records that the image is corrupt: the handle refuses writes from now on and,
    /// on v3 images, incompatible bit 1 is set on disk (best effort) so that nothing
    /// opens the image read-write until it is repaired. Returns the error to report.
    pub(crate) fn signal_corruption(&mut self, what: String) -> Error {
        self.mark_corrupt(&what);
        Error::Corrupt(what)
    }

    /// The state change of [`Meta::signal_corruption`].
    pub(crate) fn mark_corrupt(&mut self, what: &str) {
        if self.broken.is_none() && !self.read_only {
            self.broken = Some(format!(
                "the image is marked corrupt ({what}); repair it with `check -r all`"
            ));
            if self.header.version >= 3 && self.header.incompatible_features & INCOMPAT_CORRUPT == 0
            {
                let old = self.header.incompatible_features;
                let new = old | INCOMPAT_CORRUPT;
                let written = self
                    .write_host_as(
                        Kind::Header as u16,
                        "header incompatible features",
                        &new.to_be_bytes(),
                        72,
                    )
                    .and_then(|()| self.sync());
                if written.is_ok() {
                    self.header.incompatible_features = new;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ranges_that_touch_and_ignores_allowed_kinds() {
        let mut ix = MetadataIndex::default();
        ix.add(0, 1, Kind::Header);
        ix.add(3, 2, Kind::ActiveL1);
        ix.add(10, 1, Kind::ActiveL2);
        assert_eq!(ix.find(1, 2, NONE), None);
        assert_eq!(ix.find(4, 1, NONE), Some((Kind::ActiveL1, 3)));
        assert_eq!(ix.find(2, 2, NONE), Some((Kind::ActiveL1, 3)));
        assert_eq!(ix.find(10, 1, Kind::ActiveL2 as u16), None);
        assert_eq!(ix.find(9, 5, NONE), Some((Kind::ActiveL2, 10)));
        ix.remove(10, 1, Kind::ActiveL2);
        assert_eq!(ix.find(9, 5, NONE), None);
        // Two kinds at one cluster (a damaged image): the other one is still found.
        ix.add(3, 1, Kind::ActiveL2);
        assert_eq!(
            ix.find(3, 1, Kind::ActiveL2 as u16),
            Some((Kind::ActiveL1, 3))
        );
    }
}
