//! The bitmaps extension, the bitmap directory and bitmap tables (the spec's "Bitmaps
//! extension"): persistent dirty bitmaps. Pure codecs; every field is validated
//! against the spec's constraints and against what the file can hold.

use crate::corrupt;
use crate::error::{Error, Result};

/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1;

/// Most bitmaps an image may have (the spec's limit).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory (the spec's limit).
pub const MAX_DIRECTORY_SIZE: u64 = 64 << 20;
/// Longest bitmap name in bytes.
pub const MAX_NAME_SIZE: usize = 1023;
/// Smallest and largest granularity (log2 bytes), as QEMU enforces.
pub const MIN_GRANULARITY_BITS: u32 = 9;
/// See [`MIN_GRANULARITY_BITS`].
pub const MAX_GRANULARITY_BITS: u32 = 31;
/// Most entries of one bitmap table (QEMU's bound).
pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
/// Most bytes of bitmap data one bitmap may occupy (QEMU's bound: 512 MiB).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;

/// Directory entry flag: the bitmap was in use (being changed) and may be wrong.
pub const FLAG_IN_USE: u32 = 1;
/// Directory entry flag: the bitmap tracks writes (it is enabled).
pub const FLAG_AUTO: u32 = 2;
/// Directory entry flag: extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 4;
/// Bitmap type 1: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Bitmap table entry: no data cluster, every bit of the range set.
pub const ENTRY_ALL_ONES: u64 = 1;
const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Fixed part of a directory entry.
const ENTRY_FIXED: usize = 24;

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Bytes of the directory.
    pub directory_size: u64,
    /// Host offset of the directory (cluster aligned).
    pub directory_offset: u64,
}

impl BitmapsExtension {
    /// Decodes and validates the 24-byte extension.
    pub fn parse(data: &[u8], cluster_size: u64, file_size: u64) -> Result<BitmapsExtension> {
        if data.len() != 24 {
            return Err(corrupt!(
                "bitmaps extension is {} bytes (must be 24)",
                data.len()
            ));
        }
        let be32 = |o: usize| u32::from_be_bytes(data[o..o + 4].try_into().expect("4 bytes"));
        let be64 = |o: usize| u64::from_be_bytes(data[o..o + 8].try_into().expect("8 bytes"));
        let ext = BitmapsExtension {
            nb_bitmaps: be32(0),
            directory_size: be64(8),
            directory_offset: be64(16),
        };
        if be32(4) != 0 {
            return Err(corrupt!("bitmaps extension: reserved field is not zero"));
        }
        if ext.nb_bitmaps == 0 || ext.nb_bitmaps > MAX_BITMAPS {
            return Err(corrupt!(
                "bitmaps extension: {} bitmaps (must be 1..{MAX_BITMAPS})",
                ext.nb_bitmaps
            ));
        }
        if ext.directory_size == 0 || ext.directory_size > MAX_DIRECTORY_SIZE {
            return Err(corrupt!(
                "bitmap directory of {} bytes (must be 1..{MAX_DIRECTORY_SIZE})",
                ext.directory_size
            ));
        }
        if ext.directory_offset == 0 || !ext.directory_offset.is_multiple_of(cluster_size) {
            return Err(corrupt!(
                "bitmap directory at {:#x} is not at a cluster boundary",
                ext.directory_offset
            ));
        }
        if ext.directory_offset.saturating_add(ext.directory_size) > file_size {
            return Err(corrupt!(
                "bitmap directory at {:#x} ({} bytes) lies outside the file ({file_size} bytes)",
                ext.directory_offset,
                ext.directory_size
            ));
        }
        Ok(ext)
    }

    /// Encodes the extension's 24 bytes.
    pub fn serialize(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[0..4].copy_from_slice(&self.nb_bitmaps.to_be_bytes());
        out[8..16].copy_from_slice(&self.directory_size.to_be_bytes());
        out[16..24].copy_from_slice(&self.directory_offset.to_be_bytes());
        out
    }
}

/// One bitmap of the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Host offset of the bitmap table (cluster aligned).
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    /// `FLAG_*`.
    pub flags: u32,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u32,
    /// The bitmap's name (UTF-8, unique in the image).
    pub name: String,
}

/// Bytes of one directory entry with a name of `name_len` bytes.
pub fn entry_size(name_len: usize) -> usize {
    (ENTRY_FIXED + name_len).div_ceil(8) * 8
}

/// Bitmap table entries needed for a bitmap of `virtual_size` bytes at
/// `granularity_bits` in an image of `cluster_size` clusters.
pub fn table_size_for(virtual_size: u64, granularity_bits: u32, cluster_size: u64) -> u64 {
    let bits = virtual_size.div_ceil(1u64 << granularity_bits);
    bits.div_ceil(cluster_size * 8)
}

/// Whether a bitmap of `granularity_bits` fits the spec's and QEMU's bounds for an
/// image of `virtual_size` bytes; the error says why not.
pub fn check_geometry(
    name: &str,
    virtual_size: u64,
    granularity_bits: u32,
    cluster_size: u64,
) -> Result<()> {
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
        return Err(Error::InvalidArgument(format!(
            "bitmap '{name}': granularity 2^{granularity_bits} bytes is outside \
             {}..{} bytes",
            1u64 << MIN_GRANULARITY_BITS,
            1u64 << MAX_GRANULARITY_BITS
        )));
    }
    let bytes = virtual_size.div_ceil(1u64 << granularity_bits).div_ceil(8);
    if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE as u64 * cluster_size {
        return Err(Error::InvalidArgument(format!(
            "bitmap '{name}' would take {bytes} bytes; use a larger granularity"
        )));
    }
    if name.is_empty() || name.len() > MAX_NAME_SIZE {
        return Err(Error::InvalidArgument(format!(
            "bitmap name of {} bytes (must be 1..{MAX_NAME_SIZE})",
            name.len()
        )));
    }
    Ok(())
}

/// Decodes and validates the directory: exactly `nb_bitmaps` entries filling
/// `bytes`, each within the spec's bounds, with unique names, tables inside the file
/// and, for bitmaps not in use, a table large enough for `virtual_size`.
pub fn parse_directory(
    bytes: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    virtual_size: u64,
    file_size: u64,
) -> Result<Vec<DirEntry>> {
    let mut out: Vec<DirEntry> = Vec::new();
    let mut off = 0usize;
    while off < bytes.len() {
        if out.len() as u64 >= nb_bitmaps as u64 {
            return Err(corrupt!(
                "bitmap directory holds more than the {nb_bitmaps} bitmaps the header names"
            ));
        }
        if off + ENTRY_FIXED > bytes.len() {
            return Err(corrupt!("bitmap directory entry at +{off:#x} is truncated"));
        }
        let e = &bytes[off..];
        let be16 = |o: usize| u16::from_be_bytes(e[o..o + 2].try_into().expect("2 bytes"));
        let be32 = |o: usize| u32::from_be_bytes(e[o..o + 4].try_into().expect("4 bytes"));
        let table_offset = u64::from_be_bytes(e[0..8].try_into().expect("8 bytes"));
        let table_size = be32(8);
        let flags = be32(12);
        let kind = e[16];
        let granularity_bits = e[17] as u32;
        let name_size = be16(18) as usize;
        let extra = be32(20) as usize;
        let size = (ENTRY_FIXED + extra + name_size).div_ceil(8) * 8;
        if off + size > bytes.len() {
            return Err(corrupt!(
                "bitmap directory entry at +{off:#x} ({size} bytes) overruns the directory"
            ));
        }
        let name_raw = &e[ENTRY_FIXED + extra..ENTRY_FIXED + extra + name_size];
        let name = std::str::from_utf8(name_raw)
            .map_err(|_| corrupt!("bitmap name at directory entry +{off:#x} is not UTF-8"))?
            .to_string();
        let what = format!("bitmap '{name}'");
        if extra != 0 {
            // QEMU defines no extra data; neither it nor we could keep it.
            return Err(Error::Unsupported(format!(
                "{what} has {extra} bytes of extra data, which is not supported"
            )));
        }
        if kind != TYPE_DIRTY_TRACKING {
            return Err(Error::Unsupported(format!(
                "{what} has type {kind} (only dirty tracking bitmaps, type 1, are known)"
            )));
        }
        if flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE) != 0 {
            return Err(Error::Unsupported(format!(
                "{what} has unknown flags {:#x}",
                flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE)
            )));
        }
        if name_size == 0 || name_size > MAX_NAME_SIZE {
            return Err(corrupt!(
                "bitmap name of {name_size} bytes at directory entry +{off:#x} (must be 1..{MAX_NAME_SIZE})"
            ));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return Err(corrupt!(
                "{what}: granularity 2^{granularity_bits} outside 2^{MIN_GRANULARITY_BITS}..2^{MAX_GRANULARITY_BITS}"
            ));
        }
        if table_size == 0 || table_size > MAX_TABLE_SIZE {
            return Err(corrupt!(
                "{what}: bitmap table of {table_size} entries (must be 1..{MAX_TABLE_SIZE})"
            ));
        }
        if table_offset == 0 || !table_offset.is_multiple_of(cluster_size) {
            return Err(corrupt!(
                "{what}: bitmap table at {table_offset:#x} is not at a cluster boundary"
            ));
        }
        let table_bytes = table_size as u64 * 8;
        if table_offset.saturating_add(table_bytes) > file_size {
            return Err(corrupt!(
                "{what}: bitmap table at {table_offset:#x} ({table_bytes} bytes) lies outside the file"
            ));
        }
        if table_size as u64 * cluster_size > MAX_PHYS_SIZE {
            return Err(corrupt!(
                "{what}: {table_size} bitmap clusters exceed {MAX_PHYS_SIZE} bytes"
            ));
        }
        if flags & FLAG_IN_USE == 0
            && (table_size as u64) < table_size_for(virtual_size, granularity_bits, cluster_size)
        {
            return Err(corrupt!(
                "{what}: a bitmap table of {table_size} entries cannot cover {virtual_size} bytes"
            ));
        }
        if out.iter().any(|b| b.name == name) {
            return Err(corrupt!("two bitmaps are named '{name}'"));
        }
        out.push(DirEntry {
            table_offset,
            table_size,
            flags,
            granularity_bits,
            name,
        });
        off += size;
    }
    if out.len() as u64 != nb_bitmaps as u64 {
        return Err(corrupt!(
            "bitmap directory holds {} bitmaps, the header names {nb_bitmaps}",
            out.len()
        ));
    }
    Ok(out)
}

/// Encodes a directory (entries without extra data).
pub fn serialize_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let start = out.len();
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(TYPE_DIRTY_TRACKING);
        out.push(e.granularity_bits as u8);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.resize(start + entry_size(e.name.len()), 0);
    }
    out
}

/// What one bitmap table entry says about its range of the bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// Every bit clear.
    Zeros,
    /// Every bit set.
    Ones,
    /// The bits are in the cluster at this host offset.
    Data(u64),
}

/// Decodes and validates a bitmap table entry (`index` is for the message).
pub fn decode_entry(
    raw: u64,
    cluster_size: u64,
    file_size: u64,
    index: usize,
) -> Result<TableEntry> {
    if raw & ENTRY_RESERVED_MASK != 0 {
        return Err(corrupt!(
            "bitmap table entry {index} ({raw:#x}) has reserved bits set"
        ));
    }
    let offset = raw & ENTRY_OFFSET_MASK;
    if offset == 0 {
        return Ok(if raw & ENTRY_ALL_ONES != 0 {
            TableEntry::Ones
        } else {
            TableEntry::Zeros
        });
    }
    if raw & ENTRY_ALL_ONES != 0 || !offset.is_multiple_of(cluster_size) {
        return Err(corrupt!(
            "bitmap table entry {index} ({raw:#x}) is not a cluster-aligned data offset"
        ));
    }
    if offset.saturating_add(cluster_size) > file_size {
        return Err(corrupt!(
            "bitmap data cluster at {offset:#x} lies outside the file ({file_size} bytes)"
        ));
    }
    Ok(TableEntry::Data(offset))
}

/// Encodes a bitmap table entry.
pub fn encode_entry(entry: TableEntry) -> u64 {
    match entry {
        TableEntry::Zeros => 0,
        TableEntry::Ones => ENTRY_ALL_ONES,
        TableEntry::Data(offset) => offset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32) -> DirEntry {
        DirEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags,
            granularity_bits: 16,
            name: name.into(),
        }
    }

    #[test]
    fn directory_roundtrip() {
        let dir = vec![entry("a", FLAG_AUTO), entry("checkpoint-2", FLAG_IN_USE)];
        let bytes = serialize_directory(&dir);
        assert_eq!(bytes.len(), 32 + 40);
        let back = parse_directory(&bytes, 2, 65536, 1 << 30, 1 << 20).unwrap();
        assert_eq!(back, dir);
    }

    #[test]
    fn refuses_what_the_spec_forbids() {
        let good = serialize_directory(&[entry("a", FLAG_AUTO)]);
        let parse = |b: &[u8], n| parse_directory(b, n, 65536, 1 << 30, 1 << 20);
        assert!(parse(&good, 2).unwrap_err().to_string().contains("holds 1"));
        let mut b = good.clone();
        b[12..16].copy_from_slice(&0x10u32.to_be_bytes());
        assert!(parse(&b, 1)
            .unwrap_err()
            .to_string()
            .contains("unknown flags"));
        let mut b = good.clone();
        b[17] = 8;
        assert!(parse(&b, 1)
            .unwrap_err()
            .to_string()
            .contains("granularity"));
        let mut b = good.clone();
        b[16] = 2;
        assert!(parse(&b, 1).unwrap_err().to_string().contains("type 2"));
        let mut b = good.clone();
        b[0..8].copy_from_slice(&0x30200u64.to_be_bytes());
        assert!(parse(&b, 1)
            .unwrap_err()
            .to_string()
            .contains("cluster boundary"));
        let mut b = good.clone();
        b[0..8].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(parse(&b, 1)
            .unwrap_err()
            .to_string()
            .contains("outside the file"));
        let mut b = good.clone();
        b[18..20].copy_from_slice(&200u16.to_be_bytes());
        assert!(parse(&b, 1).unwrap_err().to_string().contains("overruns"));
        // A table too small for the disk, unless the bitmap is in use anyway.
        let big = |flags| {
            parse_directory(
                &serialize_directory(&[entry("a", flags)]),
                1,
                65536,
                1 << 40,
                1 << 20,
            )
        };
        assert!(big(FLAG_AUTO)
            .unwrap_err()
            .to_string()
            .contains("cannot cover"));
        assert!(big(FLAG_IN_USE).is_ok());
        let two = serialize_directory(&[entry("a", 0), entry("a", 0)]);
        assert!(parse(&two, 2)
            .unwrap_err()
            .to_string()
            .contains("two bitmaps"));
    }

    #[test]
    fn table_entries() {
        let cs = 65536;
        assert_eq!(decode_entry(0, cs, 1 << 20, 0).unwrap(), TableEntry::Zeros);
        assert_eq!(decode_entry(1, cs, 1 << 20, 0).unwrap(), TableEntry::Ones);
        assert_eq!(
            decode_entry(0x20000, cs, 1 << 20, 0).unwrap(),
            TableEntry::Data(0x20000)
        );
        assert!(decode_entry(0x20001, cs, 1 << 20, 0).is_err());
        assert!(decode_entry(0x20200, cs, 1 << 20, 0).is_err());
        assert!(decode_entry(0x2, cs, 1 << 20, 0).is_err());
        assert!(decode_entry(0x200000, cs, 1 << 20, 0).is_err());
        assert_eq!(table_size_for(1 << 30, 16, cs), 1);
        assert_eq!(
            table_size_for((1 << 35) + 1, 9, 512),
            (1u64 << 26).div_ceil(4096) + 1
        );
    }
}
