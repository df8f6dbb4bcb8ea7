//! write_zeroes and discard: whole clusters become zero clusters (v3) or unallocated
//! clusters, unaligned heads and tails become zero clusters when the rest of their
//! cluster already reads as zero, and zeros are written as data only as a last resort.

use super::meta::Meta;
use crate::error::Result;
use crate::format::entry::{Mapping, COPIED, ZERO};

/// What to do with one whole cluster.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Make it read as zeros in this layer (v3 zero flag).
    Zero { may_unmap: bool },
    /// Drop it: unallocated (reads from the backing file, or zeros without one).
    Unallocate,
}

impl Meta {
    fn has_backing_file(&self) -> bool {
        self.header.backing_file.is_some()
    }

    /// Splits `[offset, offset+len)` into per-cluster pieces: (cluster start, piece
    /// start, piece end, covers the whole visible cluster).
    fn cluster_pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, u64, bool)> {
        let cs = self.cluster_size;
        let size = self.header.size;
        let end = offset + len;
        let mut pieces = Vec::new();
        let mut pos = offset;
        while pos < end {
            let cluster = pos & !(cs - 1);
            let piece_end = (cluster + cs).min(end);
            let visible_end = (cluster + cs).min(size);
            let whole = pos == cluster && piece_end >= visible_end;
            pieces.push((cluster, pos, piece_end, whole));
            pos = piece_end;
        }
        pieces
    }

    /// Zeroes guest `[offset, offset+len)` (range-checked by the caller). Afterwards
    /// the range reads as zeros whatever the backing chain holds, now or later.
    pub(crate) fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.mark_dirty(offset, len);
        for (cluster, start, end, whole) in self.cluster_pieces(offset, len) {
            if whole {
                self.zero_whole_cluster(cluster, may_unmap)?;
                continue;
            }
            // The rest of the cluster (within the virtual size) must already read as
            // zero for the whole cluster to become a zero cluster.
            let visible_end = (cluster + self.cluster_size).min(self.header.size);
            let rest_is_zero = self.range_reads_zero(cluster, start - cluster)?
                && self.range_reads_zero(end, visible_end - end)?;
            if rest_is_zero {
                self.zero_whole_cluster(cluster, false)?;
            } else {
                self.write_zero_data(start, end - start)?;
            }
        }
        Ok(())
    }

    fn write_zero_data(&mut self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len as usize];
        self.write_sectors(&zeros, offset)
    }

    fn zero_whole_cluster(&mut self, cluster: u64, may_unmap: bool) -> Result<()> {
        if self.header.version >= 3 {
            self.set_cluster(cluster, Target::Zero { may_unmap })
        } else if self.has_backing_file() {
            // v2 cannot say "zero" over a backing file: store the zeros as data.
            let n = self.cluster_size.min(self.header.size - cluster);
            self.write_zero_data(cluster, n)
        } else {
            self.set_cluster(cluster, Target::Unallocate)
        }
    }

    /// Discards guest `[offset, offset+len)`: whole clusters are released (reading as
    /// zeros, or as the backing file on v2); partial clusters are left alone.
    pub(crate) fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.mark_dirty(offset, len);
        let zero_over_backing = self.header.version >= 3 && self.has_backing_file();
        for (cluster, _, _, whole) in self.cluster_pieces(offset, len) {
            if !whole {
                continue;
            }
            let target = if zero_over_backing {
                Target::Zero { may_unmap: true }
            } else {
                Target::Unallocate
            };
            self.set_cluster(cluster, target)?;
        }
        Ok(())
    }

    /// Drops every mapping of guest clusters from `offset` (cluster-aligned) to `end`,
    /// leaving them unallocated whatever the backing file holds (used by shrinking).
    pub(crate) fn unallocate_range(&mut self, offset: u64, end: u64) -> Result<()> {
        let mut pos = offset;
        while pos < end {
            self.set_cluster(pos, Target::Unallocate)?;
            pos += self.cluster_size;
        }
        Ok(())
    }

    /// Rewrites the L2 entry of the cluster at guest `cluster`, releasing the host
    /// cluster it drops (deferred until the new entry is on disk).
    fn set_cluster(&mut self, cluster: u64, target: Target) -> Result<()> {
        let old_entry = self.l2_entry(cluster)?;
        let old = self.mapping(cluster)?;
        let (new_entry, release) = match (target, old) {
            (Target::Unallocate, Mapping::Unallocated) => (0, None),
            (Target::Unallocate, _) => (0, Some(old)),
            (Target::Zero { .. }, Mapping::Unallocated) => (ZERO, None),
            (Target::Zero { .. }, Mapping::Compressed { .. }) => (ZERO, Some(old)),
            (Target::Zero { may_unmap: true }, Mapping::Zero { host: Some(_), .. })
            | (Target::Zero { may_unmap: true }, Mapping::Normal { .. }) => (ZERO, Some(old)),
            (Target::Zero { may_unmap: false }, Mapping::Normal { host, copied })
            | (
                Target::Zero { may_unmap: false },
                Mapping::Zero {
                    host: Some(host),
                    copied,
                },
            ) => {
                // Keep the allocation for a later write (QEMU's "zero-allocated").
                (host | ZERO | if copied { COPIED } else { 0 }, None)
            }
            (Target::Zero { .. }, Mapping::Zero { host: None, .. }) => (ZERO, None),
        };
        if new_entry == old_entry {
            return Ok(());
        }
        if old_entry == 0 && self.l2_offset(self.indexes(cluster).0)? == 0 && new_entry == 0 {
            return Ok(());
        }
        let (l1_index, _) = self.indexes(cluster);
        let table = self.writable_l2_table(l1_index)?;
        self.set_l2_entry(table, cluster, new_entry)?;
        if let Some(old) = release {
            self.free_mapping_later(old);
        }
        Ok(())
    }
}
