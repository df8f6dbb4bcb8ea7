//! Compressed cluster descriptors (the L2 entries with bit 62 set).
//!
//! With `x = 62 - (cluster_bits - 8)`, bits `0..x` hold the host *byte* offset of the
//! compressed data and bits `x..62` the number of 512-byte sectors it covers beyond the
//! first. A reader reads from the offset to the end of the last sector named; the
//! compressed stream may end before that (the rest is padding or the next cluster).

use super::entry::COMPRESSED;

/// Granularity of the descriptor's length field.
pub const SECTOR: u64 = 512;

/// Number of offset bits (`x`) of a compressed descriptor for `cluster_bits`.
pub fn offset_bits(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

/// The L2 entry for `len` compressed bytes stored at host byte `offset`.
///
/// The sector count follows QEMU's writer: `(offset + len - 1) / 512 - offset / 512`
/// additional sectors. `len` must be at least 1 and at most one cluster, and `offset`
/// must fit in `x` bits.
pub fn encode(offset: u64, len: u64, cluster_bits: u32) -> u64 {
    debug_assert!(len >= 1 && len <= 1u64 << cluster_bits);
    let x = offset_bits(cluster_bits);
    debug_assert!(offset < 1u64 << x);
    let extra_sectors = (offset + len - 1) / SECTOR - offset / SECTOR;
    COMPRESSED | (extra_sectors << x) | offset
}

/// The host clusters `[first, first + count)` (as a byte offset of the first and a
/// count) that the compressed bytes `[offset, offset+len)` touch. Each holds one
/// reference per compressed cluster that touches it.
pub fn host_clusters(offset: u64, len: u64, cluster_bits: u32) -> (u64, u64) {
    let first = offset >> cluster_bits;
    let last = (offset + len.max(1) - 1) >> cluster_bits;
    (first << cluster_bits, last - first + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::entry::{classify_l2, Mapping};

    #[test]
    fn round_trips_through_the_classifier() {
        for cluster_bits in [9u32, 12, 16, 21] {
            let cs = 1u64 << cluster_bits;
            for (offset, len) in [
                (cs, 1),
                (cs + 511, 2),
                (3 * cs + 100, cs - 1),
                (5 * cs - 7, 300),
                (0x7654_3210 & !(cs - 1), cs),
            ] {
                let e = encode(offset, len, cluster_bits);
                match classify_l2(e, cluster_bits).unwrap() {
                    Mapping::Compressed { offset: o, len: l } => {
                        assert_eq!(o, offset);
                        // The reader covers the data up to the end of its last sector.
                        assert!(l >= len, "{cluster_bits} {offset:#x} {len}: {l}");
                        assert_eq!((o + l) % SECTOR, 0);
                        assert!(l - len < SECTOR);
                    }
                    m => panic!("{m:?}"),
                }
            }
        }
    }

    #[test]
    fn touched_clusters() {
        assert_eq!(host_clusters(0x10000, 100, 16), (0x10000, 1));
        assert_eq!(host_clusters(0x1ff00, 0x100, 16), (0x10000, 1));
        assert_eq!(host_clusters(0x1ff00, 0x101, 16), (0x10000, 2));
        assert_eq!(host_clusters(0x1ff00, 0x10000, 16), (0x10000, 2));
    }
}
