//! Options for creating and opening images, and the facts `info` reports.

pub use crate::crypto::{LuksCreateOptions, LuksInfo, Secret};

/// How compressed clusters of an image are encoded (header field `compression_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (zlib), QEMU's default.
    #[default]
    Zlib,
    /// One zstd frame per cluster.
    Zstd,
}

impl CompressionType {
    /// The on-disk code of this compression type.
    pub fn code(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }

    /// The name `qemu-img info` uses.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// How much of a new image [`crate::Image::create`] allocates up front (qemu-img's
/// `preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing: clusters are allocated when first written.
    #[default]
    Off,
    /// Every L2 table and a data cluster for every guest cluster, mapped in order;
    /// the file is only extended, so the data reads as zeros from holes.
    Metadata,
    /// `Metadata`, plus the data clusters' host space reserved (`fallocate`).
    Falloc,
    /// `Metadata`, plus zeros written over every data cluster.
    Full,
}

impl Preallocation {
    /// QEMU's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }

    /// The mode QEMU calls `name`.
    pub fn from_name(name: &str) -> Option<Preallocation> {
        Some(match name {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => return None,
        })
    }
}

/// Options of [`crate::Image::create`]. The defaults are QEMU's.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// qcow2 version: 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    /// Cluster size in bytes: a power of two from 512 to 2 MiB.
    pub cluster_size: u32,
    /// Refcount width in bits: a power of two from 1 to 64 (v2 allows only 16).
    pub refcount_bits: u32,
    /// Enable lazy refcounts (v3 only).
    pub lazy_refcounts: bool,
    /// Backing file name, stored as given (relative names resolve against the image's folder).
    pub backing_file: Option<String>,
    /// Backing format ("qcow2" or "raw"); probed when `None`.
    pub backing_format: Option<String>,
    /// Compression type for compressed clusters (v3 only for zstd).
    pub compression_type: CompressionType,
    /// Encrypt the new image (`encrypt.format=`); needs `secret`.
    pub encryption: Option<EncryptionFormat>,
    /// The passphrase of a new encrypted image.
    pub secret: Option<Secret>,
    /// Open the backing file to check it and learn its format and size (QEMU's
    /// default). `false` is `qemu-img create -u`: the name is stored unchecked, so a
    /// size and a backing format must be given.
    pub open_backing: bool,
    /// What to allocate up front (not with a backing file or encryption).
    pub preallocation: Preallocation,
}

/// How a new image is encrypted.
#[derive(Debug, Clone)]
pub enum EncryptionFormat {
    /// Legacy qcow AES-CBC (crypt method 1). Weak, deprecated by QEMU: only when asked
    /// for explicitly.
    LegacyAes,
    /// LUKS1 (crypt method 2) with these cipher and key-derivation settings.
    Luks(LuksCreateOptions),
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            backing_file: None,
            backing_format: None,
            compression_type: CompressionType::Zlib,
            encryption: None,
            secret: None,
            open_backing: true,
            preallocation: Preallocation::Off,
        }
    }
}

/// Options of [`crate::Image::open`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Refuse all writes.
    pub read_only: bool,
    /// Use O_DIRECT on the image file (and qcow2 backing files).
    pub direct: bool,
    /// Open the backing files the image names (QEMU's default). When false, reads of
    /// unallocated clusters of an image with a backing file fail with `ENOTSUP`.
    pub follow_backing: bool,
    /// Bytes of L2 tables to cache; 0 chooses enough to cover the disk, up to 32 MiB.
    pub l2_cache_size: u64,
    /// How many backing files deep a chain may go before open fails.
    pub max_backing_depth: u32,
    /// Punch host clusters out of the image file when they are freed (QEMU's
    /// `discard=unmap`), so discarded space goes back to the host file system.
    pub discard_unmap: bool,
    /// Memory for the compressed-write cache, which gathers compressed clusters into
    /// whole host clusters and writes those with aligned writes (0 = no cache: each
    /// compressed cluster is written on its own, as QEMU does).
    pub compressed_cache_size: u64,
    /// Read-only opens only: let other processes write the image meanwhile (QEMU's
    /// `force-share`, `qemu-img -U`). What is read may then be inconsistent.
    pub force_share: bool,
    /// Lock the image file (and its backing files) the way QEMU does, so that QEMU
    /// and cowdisk never write an image another process uses. Turn off only when the
    /// caller coordinates access itself (QEMU's `locking=off`).
    pub locking: bool,
    /// Open to check and repair ([`crate::Image::check`]), as `qemu-img check` does:
    /// an image marked corrupt opens read-write (its writes are refused until a
    /// repair leaves nothing to fix), and a dirty lazy-refcounts image is not
    /// rebuilt on open (the check reports and repairs it).
    pub check: bool,
    /// Check every host write against the image's metadata and refuse (marking the
    /// image corrupt) one that would overwrite it (see `overlap.rs`). Turning it off
    /// is QEMU's `overlap-check=none`: only for measuring what the checks cost.
    pub overlap_checks: bool,
    /// Read-only opens only: show the disk as the internal snapshot with this id or
    /// name recorded it (its contents and size) instead of the active image, as
    /// `qemu-img convert -l` does.
    pub snapshot: Option<String>,
    /// Skip every flush of the host file — write barriers, `flush` and `close` —
    /// as QEMU's `cache=unsafe` does. Nothing is durable until the caller syncs the
    /// file itself, and a crash may leave the image inconsistent: only for scratch
    /// images and one-shot copies that are redone after a crash (`convert -t unsafe`,
    /// qemu-img convert's default).
    pub no_flush: bool,
    /// The passphrase of an encrypted image (and of encrypted backing files). Without
    /// one, opening an encrypted image fails with [`Error::NoKey`](crate::error::Error::NoKey)
    /// unless `metadata_only`.
    pub secret: Option<Secret>,
    /// Open for metadata only (info, check, map without data): an encrypted image
    /// opens without its passphrase, and reading or writing its data then fails with
    /// `NoKey`. Implies nothing about writability by itself.
    pub metadata_only: bool,
    /// Read-write opens of an image whose persistent bitmaps cannot be kept (an
    /// unknown type or flag, a damaged directory): open anyway and give the bitmaps
    /// up, as a program without bitmap support would (their clusters leak until
    /// `check -r leaks`). Without it such an open fails and says why.
    pub drop_bitmaps: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            direct: false,
            follow_backing: true,
            l2_cache_size: 0,
            max_backing_depth: 32,
            discard_unmap: false,
            compressed_cache_size: super::compress::DEFAULT_COMPRESSED_CACHE_SIZE,
            force_share: false,
            locking: true,
            check: false,
            overlap_checks: true,
            snapshot: None,
            no_flush: false,
            secret: None,
            metadata_only: false,
            drop_bitmaps: false,
        }
    }
}

/// One image of a backing chain, as `info` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingInfo {
    /// The path that was opened (after resolving relative names).
    pub filename: String,
    /// "qcow2" or "raw".
    pub format: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
}

/// Facts about an open image.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Virtual (guest-visible) size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
    /// The dirty bit is set.
    pub dirty: bool,
    /// The corrupt bit is set.
    pub corrupt: bool,
    /// The handle refuses writes.
    pub read_only: bool,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Bytes of the image file in use: the end of the last cluster allocated. The
    /// file may be longer meanwhile (host space preallocated ahead for new clusters,
    /// given back on close).
    pub host_size: u64,
    /// The backing file name as stored in the image.
    pub backing_file: Option<String>,
    /// The backing format as stored in the image.
    pub backing_format: Option<String>,
    /// The opened backing chain, nearest first (empty when none or not followed).
    pub backing_chain: Vec<BackingInfo>,
    /// How the image is encrypted (readable without the passphrase), or `None`.
    pub encryption: Option<EncryptionInfo>,
}

/// How an image is encrypted, as `qemu-img info` reports it.
#[derive(Debug, Clone)]
pub enum EncryptionInfo {
    /// Legacy AES-CBC (crypt method 1).
    LegacyAes,
    /// LUKS (crypt method 2): the LUKS header's settings and key slots.
    Luks(LuksInfo),
}
