//! The internal snapshot table: a sequence of variable-length entries, each starting
//! 8-aligned (no padding after the last), pointed to by the header's
//! `nb_snapshots`/`snapshots_offset` pair.
//!
//! Entry layout (big-endian): l1_table_offset u64, l1_size u32, id_str_size u16,
//! name_size u16, date_sec u32, date_nsec u32, vm_clock_nsec u64, vm_state_size u32,
//! extra_data_size u32, then the extra data {vm_state_size_large u64, disk_size u64,
//! icount i64, unknown bytes…}, the id string and the name. Extra data we do not know
//! is kept and written back; shorter extra data is upgraded to the 24 known bytes, as
//! QEMU does.

use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::header::MAX_L1_BYTES;

/// Most snapshots an image may have (QEMU's limit).
pub const MAX_SNAPSHOTS: usize = 65536;
/// Largest snapshot table QEMU accepts, in bytes.
pub const MAX_TABLE_BYTES: u64 = 64 * 1024 * 1024;
/// Most extra data bytes per entry QEMU accepts.
pub const MAX_EXTRA_DATA: u32 = 1024;
/// Size of the fixed part of an entry.
pub const ENTRY_HEADER_LEN: usize = 40;
/// Extra data bytes whose meaning we know (vm_state_size_large, disk_size, icount).
pub const KNOWN_EXTRA_LEN: usize = 24;
/// Longest id or name the 16-bit size fields can describe.
pub const MAX_STRING_LEN: usize = u16::MAX as usize;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// The unique id (QEMU uses decimal numbers), raw bytes.
    pub id: Vec<u8>,
    /// The name (tag), raw bytes; names need not be unique.
    pub name: Vec<u8>,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of VM state saved with the snapshot (0 = disk-only snapshot).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Instruction count for record/replay; -1 when none.
    pub icount: i64,
    /// Extra data past the 24 bytes we know, kept verbatim.
    pub unknown_extra: Vec<u8>,
}

/// The decoded table and the bytes it occupies on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotTable {
    /// Entries in table order.
    pub entries: Vec<SnapshotEntry>,
    /// Length of the table on disk in bytes (0 when there is none).
    pub size: u64,
}

/// What the decoder needs to know about the image to validate entries.
#[derive(Debug, Clone, Copy)]
pub struct TableContext {
    /// Cluster size of the image, log2.
    pub cluster_bits: u32,
    /// Length of the image file (L1 tables must lie inside).
    pub file_size: u64,
    /// Virtual size of the image, used for entries without a disk_size field.
    pub disk_size: u64,
    /// Accept entries whose L1 table is misplaced (to check and repair the image:
    /// the check reports them); the table's own structure is still validated.
    pub lenient: bool,
}

/// Result of [`parse_table`] on a buffer that may not yet hold the whole table.
#[derive(Debug)]
pub enum Parsed {
    /// The whole table was decoded.
    Done(SnapshotTable),
    /// The buffer ends inside the table: at least this many bytes are needed.
    NeedMore(u64),
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Decodes `count` entries from `buf`, which holds the table from its first byte on.
/// Every entry is validated: extra data at most 1024 bytes, the table within 64 MiB,
/// each L1 table cluster-aligned, at most 32 MiB and inside the file.
pub fn parse_table(buf: &[u8], count: u32, ctx: &TableContext) -> Result<Parsed> {
    if count as usize > MAX_SNAPSHOTS {
        return Err(corrupt!("{count} snapshots (at most {MAX_SNAPSHOTS})"));
    }
    let mut entries = Vec::with_capacity((count as usize).min(1024));
    let mut pos = 0u64;
    for i in 0..count {
        pos = pos.next_multiple_of(8);
        let fixed_end = pos + ENTRY_HEADER_LEN as u64;
        if fixed_end > MAX_TABLE_BYTES {
            return Err(corrupt!(
                "snapshot table is larger than {MAX_TABLE_BYTES} bytes"
            ));
        }
        if fixed_end > buf.len() as u64 {
            return Ok(Parsed::NeedMore(fixed_end));
        }
        let h = &buf[pos as usize..fixed_end as usize];
        let id_len = be16(h, 12) as u64;
        let name_len = be16(h, 14) as u64;
        let extra_len = be32(h, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(corrupt!(
                "snapshot table entry {i} has {extra_len} bytes of extra data (at most {MAX_EXTRA_DATA})"
            ));
        }
        let end = fixed_end + extra_len as u64 + id_len + name_len;
        if end > MAX_TABLE_BYTES {
            return Err(corrupt!(
                "snapshot table is larger than {MAX_TABLE_BYTES} bytes"
            ));
        }
        if end > buf.len() as u64 {
            return Ok(Parsed::NeedMore(end));
        }
        let extra = &buf[fixed_end as usize..fixed_end as usize + extra_len as usize];
        let strings_at = fixed_end as usize + extra_len as usize;
        let mut e = SnapshotEntry {
            l1_table_offset: be64(h, 0),
            l1_size: be32(h, 8),
            id: buf[strings_at..strings_at + id_len as usize].to_vec(),
            name: buf[strings_at + id_len as usize..end as usize].to_vec(),
            date_sec: be32(h, 16),
            date_nsec: be32(h, 20),
            vm_clock_nsec: be64(h, 24),
            vm_state_size: be32(h, 32) as u64,
            disk_size: ctx.disk_size,
            icount: -1,
            unknown_extra: Vec::new(),
        };
        if extra.len() >= 8 {
            e.vm_state_size = be64(extra, 0);
        }
        if extra.len() >= 16 {
            e.disk_size = be64(extra, 8);
        }
        if extra.len() >= 24 {
            e.icount = be64(extra, 16) as i64;
        }
        if extra.len() > KNOWN_EXTRA_LEN {
            e.unknown_extra = extra[KNOWN_EXTRA_LEN..].to_vec();
        }
        if !ctx.lenient {
            validate_entry(&e, i, ctx)?;
        }
        entries.push(e);
        pos = end;
    }
    Ok(Parsed::Done(SnapshotTable { entries, size: pos }))
}

fn validate_entry(e: &SnapshotEntry, i: u32, ctx: &TableContext) -> Result<()> {
    let cs = 1u64 << ctx.cluster_bits;
    let what = || {
        format!(
            "L1 table of snapshot {i} ('{}')",
            String::from_utf8_lossy(&e.id)
        )
    };
    if e.l1_size as u64 * 8 > MAX_L1_BYTES {
        return Err(corrupt!(
            "{} has {} entries (at most {})",
            what(),
            e.l1_size,
            MAX_L1_BYTES / 8
        ));
    }
    if !e.l1_table_offset.is_multiple_of(cs) {
        return Err(corrupt!(
            "{} at {:#x} is not cluster-aligned",
            what(),
            e.l1_table_offset
        ));
    }
    if e.l1_size > 0 {
        let end = e.l1_table_offset.saturating_add(e.l1_size as u64 * 8);
        if e.l1_table_offset == 0 || end > ctx.file_size {
            return Err(corrupt!(
                "{} at {:#x} ({} entries) lies outside the file ({} bytes)",
                what(),
                e.l1_table_offset,
                e.l1_size,
                ctx.file_size
            ));
        }
    }
    if e.disk_size > 1u64 << 56 {
        return Err(corrupt!(
            "snapshot {i} has a disk size of {} bytes",
            e.disk_size
        ));
    }
    Ok(())
}

/// The on-disk length of a table of `entries`.
pub fn table_len(entries: &[SnapshotEntry]) -> u64 {
    entries
        .iter()
        .fold(0u64, |pos, e| pos.next_multiple_of(8) + entry_len(e) as u64)
}

fn entry_len(e: &SnapshotEntry) -> usize {
    ENTRY_HEADER_LEN + KNOWN_EXTRA_LEN + e.unknown_extra.len() + e.id.len() + e.name.len()
}

/// Encodes a table (entries 8-aligned, no padding after the last). Fails when an id
/// or name does not fit its 16-bit size, extra data exceeds 1024 bytes or the table
/// 64 MiB.
pub fn encode_table(entries: &[SnapshotEntry]) -> Result<Vec<u8>> {
    if entries.len() > MAX_SNAPSHOTS {
        return Err(Error::NoSpace(format!(
            "an image can hold at most {MAX_SNAPSHOTS} snapshots"
        )));
    }
    let len = table_len(entries);
    if len > MAX_TABLE_BYTES {
        return Err(Error::NoSpace(format!(
            "the snapshot table would exceed {MAX_TABLE_BYTES} bytes"
        )));
    }
    let mut out = Vec::with_capacity(len as usize);
    for e in entries {
        if e.id.len() > MAX_STRING_LEN || e.name.len() > MAX_STRING_LEN {
            return Err(Error::InvalidArgument(format!(
                "snapshot id and name must be at most {MAX_STRING_LEN} bytes"
            )));
        }
        let extra_len = KNOWN_EXTRA_LEN + e.unknown_extra.len();
        if extra_len > MAX_EXTRA_DATA as usize {
            return Err(Error::InvalidArgument(format!(
                "snapshot extra data of {extra_len} bytes exceeds {MAX_EXTRA_DATA}"
            )));
        }
        out.resize(out.len().next_multiple_of(8), 0);
        out.extend_from_slice(&e.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&e.l1_size.to_be_bytes());
        out.extend_from_slice(&(e.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&e.date_sec.to_be_bytes());
        out.extend_from_slice(&e.date_nsec.to_be_bytes());
        out.extend_from_slice(&e.vm_clock_nsec.to_be_bytes());
        // Older readers see a disk-only snapshot rather than a truncated state size.
        let small = u32::try_from(e.vm_state_size).unwrap_or(0);
        out.extend_from_slice(&small.to_be_bytes());
        out.extend_from_slice(&(extra_len as u32).to_be_bytes());
        out.extend_from_slice(&e.vm_state_size.to_be_bytes());
        out.extend_from_slice(&e.disk_size.to_be_bytes());
        out.extend_from_slice(&e.icount.to_be_bytes());
        out.extend_from_slice(&e.unknown_extra);
        out.extend_from_slice(&e.id);
        out.extend_from_slice(&e.name);
    }
    debug_assert_eq!(out.len() as u64, len);
    Ok(out)
}

/// QEMU's next id: one more than the largest number any id starts with.
pub fn next_id(entries: &[SnapshotEntry]) -> Vec<u8> {
    let max = entries
        .iter()
        .map(|e| {
            e.id.iter()
                .take_while(|b| b.is_ascii_digit())
                .fold(0u64, |acc, &b| {
                    acc.saturating_mul(10).saturating_add((b - b'0') as u64)
                })
        })
        .max()
        .unwrap_or(0);
    max.saturating_add(1).to_string().into_bytes()
}

/// Finds a snapshot by id first, then by name (the first match), as QEMU does.
pub fn find(entries: &[SnapshotEntry], id_or_name: &[u8]) -> Option<usize> {
    entries
        .iter()
        .position(|e| e.id == id_or_name)
        .or_else(|| entries.iter().position(|e| e.name == id_or_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> TableContext {
        TableContext {
            lenient: false,
            cluster_bits: 16,
            file_size: 1 << 30,
            disk_size: 1 << 26,
        }
    }

    fn entry(id: &str, name: &str) -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0x50000,
            l1_size: 3,
            id: id.as_bytes().to_vec(),
            name: name.as_bytes().to_vec(),
            date_sec: 1_700_000_000,
            date_nsec: 123,
            vm_clock_nsec: 42,
            vm_state_size: 5 << 32,
            disk_size: 1 << 26,
            icount: -1,
            unknown_extra: Vec::new(),
        }
    }

    fn parse_all(buf: &[u8], n: u32) -> SnapshotTable {
        match parse_table(buf, n, &ctx()).unwrap() {
            Parsed::Done(t) => t,
            Parsed::NeedMore(n) => panic!("needs {n}"),
        }
    }

    #[test]
    fn round_trip_with_alignment_and_unknown_extra() {
        let mut b = entry("1", "first");
        b.unknown_extra = vec![7; 9];
        let entries = vec![entry("12", "a"), b, entry("3", "")];
        let bytes = encode_table(&entries).unwrap();
        // First entry: 40 + 24 + 2 + 1 = 67 bytes; the second starts at 72.
        assert_eq!(&bytes[72..80], &0x50000u64.to_be_bytes());
        let t = parse_all(&bytes, 3);
        assert_eq!(t.entries, entries);
        assert_eq!(t.size, bytes.len() as u64);
        // A large state size does not fit the 32-bit field: it reads 0 there.
        assert_eq!(&bytes[32..36], &[0, 0, 0, 0]);
    }

    #[test]
    fn short_extra_data_takes_defaults() {
        let mut bytes = encode_table(&[entry("1", "x")]).unwrap();
        // Rewrite as an old entry with 8 bytes of extra data.
        bytes[36..40].copy_from_slice(&8u32.to_be_bytes());
        bytes.drain(48..64);
        let t = parse_all(&bytes, 1);
        let e = &t.entries[0];
        assert_eq!(e.vm_state_size, 5 << 32);
        assert_eq!(e.disk_size, ctx().disk_size);
        assert_eq!(e.icount, -1);
        assert_eq!(e.name, b"x");
    }

    #[test]
    fn needs_more_then_done() {
        let bytes = encode_table(&[entry("1", "a"), entry("2", "b")]).unwrap();
        match parse_table(&bytes[..50], 2, &ctx()).unwrap() {
            Parsed::NeedMore(n) => assert!(n > 50),
            Parsed::Done(_) => panic!(),
        }
    }

    #[test]
    fn rejects_bad_entries() {
        let good = encode_table(&[entry("1", "a")]).unwrap();
        let mut b = good.clone();
        b[36..40].copy_from_slice(&2000u32.to_be_bytes());
        assert!(parse_table(&b, 1, &ctx()).is_err(), "extra data too large");
        let mut b = good.clone();
        b[0..8].copy_from_slice(&0x50200u64.to_be_bytes());
        assert!(parse_table(&b, 1, &ctx()).is_err(), "unaligned L1");
        let mut b = good.clone();
        b[0..8].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(parse_table(&b, 1, &ctx()).is_err(), "L1 outside the file");
        let mut b = good.clone();
        b[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_table(&b, 1, &ctx()).is_err(), "L1 too large");
        assert!(parse_table(&good, 70000, &ctx()).is_err(), "too many");
    }

    #[test]
    fn ids_and_lookup() {
        let entries = vec![entry("1", "x"), entry("7abc", "y"), entry("foo", "1")];
        assert_eq!(next_id(&entries), b"8");
        assert_eq!(next_id(&[]), b"1");
        assert_eq!(find(&entries, b"1"), Some(0), "id wins over name");
        assert_eq!(find(&entries, b"y"), Some(1));
        assert_eq!(find(&entries, b"nope"), None);
    }
}
