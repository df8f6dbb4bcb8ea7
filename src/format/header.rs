//! The qcow2 header (cluster 0): fixed fields, header extensions and the backing file
//! name. Parsing validates everything that later code relies on; serialising writes
//! the extensions in QEMU's order and keeps what we do not understand.

use crate::error::{Error, Result};
use crate::{corrupt, unsupported};

/// `QFI\xfb`.
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Smallest supported cluster_bits (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported cluster_bits (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Size of the fixed v2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Size of the v3 header QEMU writes (with the compression type byte and padding).
pub const V3_HEADER_LEN: u32 = 112;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest L1 table QEMU accepts, in bytes.
pub const MAX_L1_BYTES: u64 = 32 * 1024 * 1024;
/// Largest refcount table QEMU accepts, in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 * 1024 * 1024;
/// Most internal snapshots an image may have.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Incompatible feature bit 0: the image was not closed cleanly (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is known to be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
/// The largest LUKS area accepted: a LUKS1 header with 8 slots of 4000 stripes of a
/// 64-byte key needs about 2 MiB; 64 MiB bounds what a hostile image makes us read.
pub const MAX_LUKS_AREA: u64 = 64 << 20;

/// Header extension: full-disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_BE77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// A header extension we carry through unchanged (bitmaps, unknown types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExtension {
    /// Extension type code.
    pub kind: u32,
    /// Extension payload (without padding).
    pub data: Vec<u8>,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Human-readable name.
    pub name: String,
}

/// The decoded header of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Compression type (0 deflate, 1 zstd).
    pub compression_type: u8,
    /// Header bytes past the fields we know (v3, offset 112 on), kept verbatim.
    pub unknown_header_bytes: Vec<u8>,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing format name from its extension.
    pub backing_format: Option<String>,
    /// Feature names read from the image (we write our own table).
    pub feature_names: Vec<FeatureName>,
    /// Where the LUKS area lies (the "full disk encryption header pointer"
    /// extension): host offset and length in bytes.
    pub crypto_header: Option<(u64, u64)>,
    /// The bitmaps extension (persistent dirty bitmaps), as found: whether it is
    /// consistent is the autoclear bit's to say (`format::bitmap::AUTOCLEAR_BITMAPS`).
    pub bitmaps: Option<crate::format::bitmap::BitmapsExtension>,
    /// Extensions we preserve unchanged, in their original order.
    pub preserved_extensions: Vec<RawExtension>,
}

/// `crypt_method`: legacy AES-CBC keyed from the passphrase, IV from the guest sector.
pub const CRYPT_AES: u32 = 1;
/// `crypt_method`: LUKS, IV from the host sector.
pub const CRYPT_LUKS: u32 = 2;

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Names of the features QEMU defines, used in error messages and our feature table.
const KNOWN_FEATURES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

impl Header {
    /// A fresh header as `create` writes it; tables are filled in by the caller.
    pub fn new(version: u32, cluster_bits: u32, size: u64, refcount_order: u32) -> Header {
        Header {
            version,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order,
            compression_type: 0,
            unknown_header_bytes: Vec::new(),
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            crypto_header: None,
            bitmaps: None,
            preserved_extensions: Vec::new(),
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Parses and validates the fixed part of a header from its first bytes, enough to
    /// learn the cluster size. `buf` must hold at least 104 bytes or the whole file.
    pub fn peek_cluster_bits(buf: &[u8]) -> Result<u32> {
        if buf.len() < 4 || be32(buf, 0) != QCOW2_MAGIC {
            return Err(Error::NotQcow2("not a qcow2 image (bad magic)".into()));
        }
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(corrupt!(
                "header truncated: file is {} bytes, the qcow2 header needs {}",
                buf.len(),
                V2_HEADER_LEN
            ));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt!(
                "cluster_bits {cluster_bits} out of range ({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})"
            ));
        }
        Ok(cluster_bits)
    }

    /// Parses the header from the image's first cluster (`buf`, which may be shorter
    /// when the file is). Validates every field; offsets against `file_size`.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header> {
        let cluster_bits = Header::peek_cluster_bits(buf)?;
        let cluster_size = 1u64 << cluster_bits;
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(unsupported!(
                "qcow2 version {version} (only versions 2 and 3 are supported)"
            ));
        }
        let header_length = if version == 2 {
            V2_HEADER_LEN
        } else {
            if buf.len() < 104 {
                return Err(corrupt!("v3 header truncated at {} bytes", buf.len()));
            }
            let len = be32(buf, 100);
            if len < 104 || len as u64 > cluster_size || len as usize > buf.len() {
                return Err(corrupt!(
                    "header_length {len} invalid (must be 104..{cluster_size} and inside the file)"
                ));
            }
            len
        };
        let mut h = Header::new(version, cluster_bits, be64(buf, 24), 4);
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        h.crypt_method = be32(buf, 32);
        h.l1_size = be32(buf, 36);
        h.l1_table_offset = be64(buf, 40);
        h.refcount_table_offset = be64(buf, 48);
        h.refcount_table_clusters = be32(buf, 56);
        h.nb_snapshots = be32(buf, 60);
        h.snapshots_offset = be64(buf, 64);
        if version == 3 {
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            if header_length > 104 {
                h.compression_type = buf[104];
            }
            if header_length > V3_HEADER_LEN {
                h.unknown_header_bytes =
                    buf[V3_HEADER_LEN as usize..header_length as usize].to_vec();
            }
        }

        // Extensions and names first: they give the feature names for error messages.
        // Extensions end at the backing file name, or with the header cluster — and in
        // any case with the bytes the file has (a short file ends early).
        let ext_end = if backing_file_offset != 0 && backing_file_offset < cluster_size {
            backing_file_offset as usize
        } else {
            cluster_size as usize
        }
        .min(buf.len());
        h.parse_extensions(buf, header_length as usize, ext_end, file_size)?;

        if backing_file_offset != 0 {
            if backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt!(
                    "backing file name is {backing_file_size} bytes (at most {MAX_BACKING_NAME})"
                ));
            }
            let end = backing_file_offset.saturating_add(backing_file_size as u64);
            if end > cluster_size || end as usize > buf.len() {
                return Err(corrupt!(
                    "backing file name at {backing_file_offset:#x}+{backing_file_size} lies outside the header cluster"
                ));
            }
            let raw = &buf[backing_file_offset as usize..end as usize];
            let name = std::str::from_utf8(raw)
                .map_err(|_| unsupported!("backing file name is not valid UTF-8"))?;
            if !name.is_empty() {
                h.backing_file = Some(name.to_string());
            }
        }
        h.validate(file_size)?;
        Ok(h)
    }

    fn parse_extensions(
        &mut self,
        buf: &[u8],
        start: usize,
        end: usize,
        file_size: u64,
    ) -> Result<()> {
        let mut off = start;
        while off + 8 <= end {
            let kind = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let data_start = off + 8;
            if data_start + len > end {
                return Err(corrupt!(
                    "header extension {kind:#x} at {off:#x} (length {len}) overruns the header area"
                ));
            }
            let data = &buf[data_start..data_start + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    let name = std::str::from_utf8(data)
                        .map_err(|_| corrupt!("backing format name is not valid UTF-8"))?
                        .trim_end_matches('\0');
                    if name.len() >= 16 {
                        return Err(corrupt!("backing format name '{name}' is too long"));
                    }
                    self.backing_format = Some(name.to_string());
                }
                EXT_CRYPTO => {
                    if len != 16 {
                        return Err(corrupt!(
                            "encryption header pointer extension is {len} bytes (must be 16)"
                        ));
                    }
                    if self.crypto_header.is_some() {
                        return Err(corrupt!("two encryption header pointer extensions"));
                    }
                    self.crypto_header = Some((be64(data, 0), be64(data, 8)));
                }
                // Without the autoclear bit the extension is stale (a writer that does
                // not know bitmaps changed the image): ignored, as QEMU does.
                crate::format::bitmap::EXT_BITMAPS
                    if self.version >= 3
                        && self.autoclear_features & crate::format::bitmap::AUTOCLEAR_BITMAPS
                            != 0 =>
                {
                    if self.bitmaps.is_some() {
                        return Err(corrupt!("two bitmaps extensions"));
                    }
                    self.bitmaps = Some(crate::format::bitmap::BitmapsExtension::parse(
                        data,
                        1u64 << self.cluster_bits,
                        file_size,
                    )?);
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let name_bytes = &entry[2..48];
                        let n = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
                        self.feature_names.push(FeatureName {
                            kind: entry[0],
                            bit: entry[1],
                            name: String::from_utf8_lossy(&name_bytes[..n]).into_owned(),
                        });
                    }
                }
                _ => self.preserved_extensions.push(RawExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            off = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// The name of feature bit `bit` of `kind`, from the image's table or QEMU's list.
    pub fn feature_name(&self, kind: u8, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| f.name.clone())
            .or_else(|| {
                KNOWN_FEATURES
                    .iter()
                    .find(|(k, b, _)| *k == kind && *b == bit)
                    .map(|(_, _, n)| n.to_string())
            })
            .unwrap_or_else(|| format!("unknown feature bit {bit}"))
    }

    fn validate(&self, file_size: u64) -> Result<()> {
        let cs = self.cluster_size();
        if self.version == 2 && self.refcount_order != 4 {
            return Err(corrupt!(
                "v2 image with refcount_order {}",
                self.refcount_order
            ));
        }
        if self.refcount_order > 6 {
            return Err(corrupt!(
                "refcount_order {} out of range (0..6)",
                self.refcount_order
            ));
        }
        match (self.crypt_method, self.crypto_header) {
            (0 | CRYPT_AES, None) => {}
            (0 | CRYPT_AES, Some(_)) => {
                return Err(corrupt!(
                    "an encryption header pointer extension in an image that is not LUKS-encrypted (crypt_method {})",
                    self.crypt_method
                ))
            }
            (CRYPT_LUKS, None) => {
                return Err(corrupt!(
                    "LUKS-encrypted image without its encryption header pointer extension"
                ))
            }
            (CRYPT_LUKS, Some((offset, length))) => {
                let cs = self.cluster_size();
                if offset == 0 || offset % cs != 0 {
                    return Err(corrupt!(
                        "LUKS header at {offset:#x} is not at a cluster boundary after the header"
                    ));
                }
                if length == 0 || offset.checked_add(length).is_none_or(|end| end > file_size) {
                    return Err(corrupt!(
                        "LUKS header at {offset:#x} (length {length}) lies outside the file ({file_size} bytes)"
                    ));
                }
                if length > MAX_LUKS_AREA {
                    return Err(corrupt!(
                        "LUKS header length {length} is larger than any LUKS1 header ({MAX_LUKS_AREA})"
                    ));
                }
            }
            (m, _) => return Err(corrupt!("unknown crypt_method {m}")),
        }
        let known_incompat = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
        let unknown = self.incompatible_features & !known_incompat;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| self.feature_name(0, b as u8))
                .collect();
            return Err(unsupported!(
                "image uses incompatible feature(s): {}",
                names.join(", ")
            ));
        }
        let compression_flag = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match (self.compression_type, compression_flag) {
            (0, false) | (1, true) => {}
            (0, true) => {
                return Err(corrupt!(
                    "compression type bit set but compression_type is zlib"
                ))
            }
            (1, false) => {
                return Err(corrupt!(
                    "compression_type is zstd but the compression type bit is not set"
                ))
            }
            (t, _) => return Err(unsupported!("unknown compression type {t}")),
        }
        let max_size = 1u64 << (2 * self.cluster_bits + 19).min(63);
        if self.size > max_size.min(1u64 << 56) {
            return Err(corrupt!(
                "virtual size {} exceeds the maximum {} for {}-byte clusters",
                self.size,
                max_size.min(1u64 << 56),
                cs
            ));
        }
        let l2_bits = self.cluster_bits - 3;
        let l1_span = 1u64 << (self.cluster_bits + l2_bits);
        let needed_l1 = self.size.div_ceil(l1_span);
        if self.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(corrupt!(
                "L1 table of {} entries is too large (at most {})",
                self.l1_size,
                MAX_L1_BYTES / 8
            ));
        }
        if (self.l1_size as u64) < needed_l1 {
            return Err(corrupt!(
                "L1 table has {} entries but the virtual size needs {needed_l1}",
                self.l1_size
            ));
        }
        if self.l1_size > 0 {
            self.check_table(
                "L1 table",
                self.l1_table_offset,
                self.l1_size as u64 * 8,
                file_size,
            )?;
        }
        if self.refcount_table_clusters == 0 {
            return Err(corrupt!("refcount table has zero clusters"));
        }
        let rt_bytes = self.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt!(
                "refcount table of {} clusters is too large (at most {} bytes)",
                self.refcount_table_clusters,
                MAX_REFTABLE_BYTES
            ));
        }
        self.check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            file_size,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt!(
                "{} snapshots (at most {MAX_SNAPSHOTS})",
                self.nb_snapshots
            ));
        }
        if self.nb_snapshots > 0 {
            self.check_table("snapshot table", self.snapshots_offset, 1, file_size)?;
        }
        Ok(())
    }

    fn check_table(&self, what: &str, offset: u64, len: u64, file_size: u64) -> Result<()> {
        let cs = self.cluster_size();
        if offset == 0 {
            return Err(corrupt!("{what} at offset 0 overlaps the header"));
        }
        if !offset.is_multiple_of(cs) {
            return Err(corrupt!("{what} at {offset:#x} is not cluster-aligned"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= file_size => Ok(()),
            _ => Err(corrupt!(
                "{what} at {offset:#x} ({len} bytes) lies outside the file ({file_size} bytes)"
            )),
        }
    }

    /// Encodes the whole header area (fixed fields, extensions, backing name).
    /// Fails if it does not fit in the first cluster.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(&QCOW2_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset, patched below
        out.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size, patched below
        out.extend_from_slice(&self.cluster_bits.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crypt_method.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            out.extend_from_slice(&self.incompatible_features.to_be_bytes());
            out.extend_from_slice(&self.compatible_features.to_be_bytes());
            out.extend_from_slice(&self.autoclear_features.to_be_bytes());
            out.extend_from_slice(&self.refcount_order.to_be_bytes());
            let len = V3_HEADER_LEN as usize + self.unknown_header_bytes.len();
            out.extend_from_slice(&(len as u32).to_be_bytes());
            out.push(self.compression_type);
            out.extend_from_slice(&[0u8; 7]);
            out.extend_from_slice(&self.unknown_header_bytes);
        }
        let push_ext = |out: &mut Vec<u8>, kind: u32, data: &[u8]| {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(8) * 8, 0);
        };
        out.resize(out.len().div_ceil(8) * 8, 0);
        if let Some((offset, length)) = self.crypto_header {
            let mut data = [0u8; 16];
            data[..8].copy_from_slice(&offset.to_be_bytes());
            data[8..].copy_from_slice(&length.to_be_bytes());
            push_ext(&mut out, EXT_CRYPTO, &data);
        }
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut out, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        if self.version >= 3 {
            let mut table = Vec::with_capacity(KNOWN_FEATURES.len() * 48);
            for (kind, bit, name) in KNOWN_FEATURES {
                let mut entry = [0u8; 48];
                entry[0] = *kind;
                entry[1] = *bit;
                entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
                table.extend_from_slice(&entry);
            }
            // Like QEMU, leave the table out when it would crowd a tiny first cluster.
            let rest: usize = self
                .preserved_extensions
                .iter()
                .map(|e| 8 + e.data.len().div_ceil(8) * 8)
                .sum::<usize>()
                + 8
                + self.crypto_header.map_or(0, |_| 24)
                + self.bitmaps.map_or(0, |_| 32)
                + self.backing_file.as_ref().map_or(0, |b| b.len());
            if out.len() + 8 + table.len() + rest <= cs {
                push_ext(&mut out, EXT_FEATURE_TABLE, &table);
            }
        }
        if let Some(b) = &self.bitmaps {
            push_ext(&mut out, crate::format::bitmap::EXT_BITMAPS, &b.serialize());
        }
        for ext in &self.preserved_extensions {
            push_ext(&mut out, ext.kind, &ext.data);
        }
        push_ext(&mut out, EXT_END, &[]);
        if let Some(name) = &self.backing_file {
            let off = out.len() as u64;
            out[8..16].copy_from_slice(&off.to_be_bytes());
            out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() > cs {
            return Err(Error::NoSpace(format!(
                "header and extensions need {} bytes but a cluster holds {cs}",
                out.len()
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let mut h = Header::new(3, 16, 1 << 30, 4);
        h.l1_size = 2;
        h.l1_table_offset = 0x30000;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h
    }

    #[test]
    fn roundtrip_with_backing_and_unknown_extension() {
        let mut h = sample();
        h.backing_file = Some("base.qcow2".into());
        h.backing_format = Some("qcow2".into());
        h.preserved_extensions.push(RawExtension {
            kind: 0x1234_5678,
            data: vec![1, 2, 3],
        });
        h.unknown_header_bytes = vec![9; 8];
        let mut buf = h.serialize().unwrap();
        buf.resize(0x40000, 0);
        let parsed = Header::parse(&buf, 0x40000).unwrap();
        assert_eq!(parsed.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(parsed.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(parsed.preserved_extensions, h.preserved_extensions);
        assert_eq!(parsed.unknown_header_bytes, vec![9; 8]);
        assert_eq!(parsed.feature_names.len(), KNOWN_FEATURES.len());
        assert_eq!(parsed.l1_table_offset, 0x30000);
    }

    #[test]
    fn v2_roundtrip() {
        let mut h = sample();
        h.version = 2;
        let mut buf = h.serialize().unwrap();
        assert_eq!(
            &buf[72..80],
            &[0u8; 8],
            "end marker right after the v2 header"
        );
        buf.resize(0x40000, 0);
        let parsed = Header::parse(&buf, 0x40000).unwrap();
        assert_eq!(parsed.version, 2);
        assert_eq!(parsed.refcount_order, 4);
    }

    #[test]
    fn rejects_bad_fields_with_clear_messages() {
        let mut buf = sample().serialize().unwrap();
        buf.resize(0x40000, 0);
        let mut bad = buf.clone();
        bad[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert!(Header::parse(&bad, 0x40000)
            .unwrap_err()
            .to_string()
            .contains("cluster_bits"));
        let mut bad = buf.clone();
        bad[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Header::parse(&bad, 0x40000)
            .unwrap_err()
            .to_string()
            .contains("too large"));
        let mut bad = buf.clone();
        bad[48..56].copy_from_slice(&0u64.to_be_bytes());
        assert!(Header::parse(&bad, 0x40000)
            .unwrap_err()
            .to_string()
            .contains("overlaps the header"));
        let err = Header::parse(&buf, 0x30008).unwrap_err().to_string();
        assert!(err.contains("L1 table at 0x30000"), "{err}");
        assert!(err.contains("outside the file"), "{err}");
        let mut bad = buf.clone();
        bad[72..80].copy_from_slice(&(1u64 << 4).to_be_bytes());
        let err = Header::parse(&bad, 0x40000).unwrap_err();
        assert!(err.to_string().contains("extended L2"), "{err}");
        assert_eq!(err.errno(), libc::ENOTSUP);
        assert!(matches!(Header::parse(b"QFI", 3), Err(Error::NotQcow2(_))));
        assert!(Header::parse(&buf[..50], 50)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }
}
