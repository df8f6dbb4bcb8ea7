//! L1 and L2 table entries: bit layout and classification.

use crate::corrupt;
use crate::error::Result;

/// Host offset bits of L1 and standard L2 entries (bits 9..55).
pub const OFFSET_MASK: u64 = 0x00FF_FFFF_FFFF_FE00;
/// Bit 63: the referenced cluster has refcount exactly 1 (active tables only).
pub const COPIED: u64 = 1 << 63;
/// L2 bit 62: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 bit 0: the cluster reads as zeros (v3).
pub const ZERO: u64 = 1;
/// Bits of an L1 entry that must be zero.
pub const L1_RESERVED: u64 = 0x7F00_0000_0000_01FF;
/// Bits of a standard L2 entry that must be zero.
pub const L2_RESERVED: u64 = 0x3F00_0000_0000_01FE;

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: read from the backing file (or zeros).
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster kept for reuse, if any.
    Zero {
        /// The preallocated host cluster, if any.
        host: Option<u64>,
        /// COPIED flag (the preallocated cluster may be reused in place).
        copied: bool,
    },
    /// Guest data at a cluster-aligned host offset.
    Normal {
        /// Host offset of the cluster.
        host: u64,
        /// COPIED flag: refcount is 1, the cluster may be written in place.
        copied: bool,
    },
    /// A compressed cluster.
    Compressed {
        /// Host byte offset of the compressed data.
        offset: u64,
        /// Bytes to read (up to the end of the last 512-byte sector named).
        len: u64,
    },
}

/// Classifies an L2 entry of an image with `cluster_bits`, rejecting corrupt ones.
pub fn classify_l2(entry: u64, cluster_bits: u32) -> Result<Mapping> {
    if entry & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = (entry & !COPIED & !COMPRESSED) >> x;
        let len = (sectors + 1) * 512 - (offset & 511);
        if entry & COPIED != 0 {
            return Err(corrupt!(
                "compressed L2 entry {entry:#x} has the COPIED flag set"
            ));
        }
        return Ok(Mapping::Compressed { offset, len });
    }
    if entry & L2_RESERVED != 0 {
        return Err(corrupt!("L2 entry {entry:#x} has reserved bits set"));
    }
    let host = entry & OFFSET_MASK;
    let copied = entry & COPIED != 0;
    if host & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(corrupt!(
            "L2 entry {entry:#x} points to unaligned host offset {host:#x}"
        ));
    }
    if entry & ZERO != 0 {
        return Ok(Mapping::Zero {
            host: (host != 0).then_some(host),
            copied,
        });
    }
    if host == 0 {
        if copied {
            return Err(corrupt!(
                "L2 entry {entry:#x} has COPIED set but no host offset"
            ));
        }
        return Ok(Mapping::Unallocated);
    }
    Ok(Mapping::Normal { host, copied })
}

/// Extracts and checks the L2 table offset from an L1 entry (0 = no table).
pub fn l1_table_offset(entry: u64, cluster_bits: u32) -> Result<u64> {
    if entry & L1_RESERVED != 0 {
        return Err(corrupt!("L1 entry {entry:#x} has reserved bits set"));
    }
    let off = entry & OFFSET_MASK;
    if off & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(corrupt!(
            "L1 entry {entry:#x} points to unaligned L2 table offset {off:#x}"
        ));
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_entries() {
        assert_eq!(classify_l2(0, 16).unwrap(), Mapping::Unallocated);
        assert_eq!(
            classify_l2(0x50000 | COPIED, 16).unwrap(),
            Mapping::Normal {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(
            classify_l2(ZERO, 16).unwrap(),
            Mapping::Zero {
                host: None,
                copied: false
            }
        );
        assert!(classify_l2(0x50200, 16).is_err(), "unaligned data cluster");
        assert!(classify_l2(0x50000 | 2, 16).is_err(), "reserved bit");
        assert!(classify_l2(COPIED, 16).is_err());
    }

    #[test]
    fn compressed_descriptor() {
        // 64 KiB clusters: x = 54; offset 0x12345, 3 additional sectors.
        let entry = COMPRESSED | (3u64 << 54) | 0x12345;
        match classify_l2(entry, 16).unwrap() {
            Mapping::Compressed { offset, len } => {
                assert_eq!(offset, 0x12345);
                assert_eq!(len, 4 * 512 - 0x145);
            }
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn l1_entry_checks() {
        assert_eq!(l1_table_offset(0x70000 | COPIED, 16).unwrap(), 0x70000);
        assert!(l1_table_offset(0x70000 | 1, 16).is_err());
        assert!(l1_table_offset(0x70200, 16).is_err());
    }
}
