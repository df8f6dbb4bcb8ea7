//! The C option and info structs and their conversion to the engine's types.

use std::ffi::{c_char, c_void, CStr};

use crate::crypto::{luks_options_from_qemu, Secret};
use crate::error::{Error, Result};
use crate::image::{
    CompressionType, CreateOptions, EncryptionFormat, EncryptionInfo, ImageInfo, OpenOptions,
};

use super::{
    COWDISK_COMPRESSION_ZLIB, COWDISK_COMPRESSION_ZSTD, COWDISK_CREATE_LAZY_REFCOUNTS,
    COWDISK_CREATE_NO_BACKING_CHECK, COWDISK_ENCRYPT_AES, COWDISK_ENCRYPT_LUKS,
    COWDISK_ENCRYPT_NONE, COWDISK_INFO_CORRUPT, COWDISK_INFO_DIRTY, COWDISK_INFO_LAZY_REFCOUNTS,
    COWDISK_INFO_READONLY, COWDISK_OPEN_CHECK, COWDISK_OPEN_DIRECT, COWDISK_OPEN_DISCARD_UNMAP,
    COWDISK_OPEN_DROP_BITMAPS, COWDISK_OPEN_FORCE_SHARE, COWDISK_OPEN_METADATA_ONLY,
    COWDISK_OPEN_NO_BACKING, COWDISK_OPEN_NO_COMPRESSED_CACHE, COWDISK_OPEN_NO_LOCK,
    COWDISK_OPEN_READONLY,
};

/// Copies a caller's passphrase (`ptr`, `len`) into a zeroed-on-drop [`Secret`].
///
/// # Safety
/// `ptr` must be NULL or valid for `len` readable bytes.
pub(super) unsafe fn c_secret(ptr: *const c_void, len: usize) -> Result<Option<Secret>> {
    if ptr.is_null() {
        if len != 0 {
            return Err(Error::InvalidArgument(format!(
                "secret is NULL but secret_len is {len}"
            )));
        }
        return Ok(None);
    }
    Ok(Some(Secret::new(
        std::slice::from_raw_parts(ptr as *const u8, len).to_vec(),
    )))
}

/// Options for `cowdisk_create()`. Zero fields mean "default".
#[repr(C)]
#[derive(Clone, Copy)]
pub struct cowdisk_create_opts {
    /// Set to `sizeof(cowdisk_create_opts)`.
    pub struct_size: u32,
    /// qcow2 version: 2 or 3 (0 = 3).
    pub version: u32,
    /// Cluster size in bytes, a power of two from 512 to 2097152 (0 = 65536).
    pub cluster_size: u32,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64 (0 = 16).
    pub refcount_bits: u32,
    /// `COWDISK_CREATE_*` flags.
    pub flags: u32,
    /// `COWDISK_COMPRESSION_*`: 0 = zlib, 1 = zstd.
    pub compression_type: u32,
    /// Backing file name stored in the image, or NULL. Borrowed for the call only.
    pub backing_file: *const c_char,
    /// Backing format ("qcow2" or "raw"), or NULL to probe. Borrowed for the call only.
    pub backing_format: *const c_char,
    /// Passphrase bytes of an encrypted image (not NUL-terminated; `secret_len`
    /// bytes), or NULL. Borrowed for the call only; cowdisk keeps no copy past it.
    pub secret: *const c_void,
    /// Length of `secret` in bytes.
    pub secret_len: usize,
    /// `COWDISK_ENCRYPT_*`: 0 none, 1 legacy AES, 2 LUKS (needs `secret`).
    pub encrypt_format: u32,
    /// LUKS: milliseconds of PBKDF2 work for the key slot (0 = QEMU's 2000).
    pub iter_time_ms: u32,
    /// LUKS cipher, QEMU's names: "aes-128", "aes-192", "aes-256" (NULL = aes-256).
    pub cipher_alg: *const c_char,
    /// LUKS cipher mode: "xts" or "cbc" (NULL = xts).
    pub cipher_mode: *const c_char,
    /// LUKS IV generator: "plain", "plain64" or "essiv" (NULL = plain64).
    pub ivgen_alg: *const c_char,
    /// Hash of the essiv IV generator: "sha1", "sha256", "sha512" (NULL = sha256).
    pub ivgen_hash_alg: *const c_char,
    /// PBKDF2 hash: "sha1", "sha256", "sha512" (NULL = sha256).
    pub hash_alg: *const c_char,
}

/// Options for `cowdisk_open()`. Zero fields mean "default".
#[repr(C)]
#[derive(Clone, Copy)]
pub struct cowdisk_open_opts {
    /// Set to `sizeof(cowdisk_open_opts)`.
    pub struct_size: u32,
    /// `COWDISK_OPEN_*` flags.
    pub flags: u32,
    /// Bytes of L2 cache (0 = cover the whole disk, up to 32 MiB).
    pub l2_cache_size: u64,
    /// Maximum backing chain depth (0 = 32).
    pub max_backing_depth: u32,
    /// Reserved, set to 0.
    pub reserved: u32,
    /// Bytes of memory for the compressed-write cache (0 = 4 MiB; see
    /// `COWDISK_OPEN_NO_COMPRESSED_CACHE` to turn it off).
    pub compressed_cache_size: u64,
    /// Passphrase bytes of an encrypted image and of encrypted backing files (not
    /// NUL-terminated; `secret_len` bytes), or NULL. Borrowed for the call only: the
    /// handle keeps only the derived key, zeroed when closed.
    pub secret: *const c_void,
    /// Length of `secret` in bytes.
    pub secret_len: usize,
    /// Id or name of an internal snapshot to show instead of the active image (its
    /// contents and size, as `qemu-img convert -l` and `qemu-nbd -l` do), or NULL.
    /// Needs `COWDISK_OPEN_READONLY` (`-EINVAL` otherwise); `-ENOENT` when the image
    /// has no such snapshot. Borrowed for the call only.
    pub snapshot: *const c_char,
}

/// Facts about an open image, filled by `cowdisk_get_info`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct cowdisk_info {
    /// Set by the caller to `sizeof(cowdisk_info)`.
    pub struct_size: u32,
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// `COWDISK_INFO_*` flags.
    pub flags: u32,
    /// `COWDISK_COMPRESSION_*`: 0 = zlib, 1 = zstd.
    pub compression_type: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Number of opened backing images below this one.
    pub backing_depth: u32,
    /// Bytes of the image file in use: the end of the last cluster allocated (the
    /// file may be longer while host space is preallocated ahead; close gives that
    /// back).
    pub host_size: u64,
    /// Backing file name as stored in the image, NUL-terminated ("" when none).
    pub backing_file: [c_char; 1024],
    /// Backing format as stored in the image, NUL-terminated ("" when none).
    pub backing_format: [c_char; 32],
    /// `COWDISK_ENCRYPT_*`: how the image is encrypted.
    pub encrypt_format: u32,
    /// Reserved, 0.
    pub reserved: u32,
}

/// Reads a caller's struct that starts with `struct_size`, accepting older (shorter)
/// versions: missing trailing fields keep their zero defaults.
///
/// # Safety
/// `ptr` must be NULL or point to at least `struct_size` readable bytes.
pub(super) unsafe fn read_versioned<T: Copy>(ptr: *const T, name: &str) -> Result<Option<T>> {
    if ptr.is_null() {
        return Ok(None);
    }
    let declared = *(ptr as *const u32) as usize;
    if declared < 8 {
        return Err(Error::InvalidArgument(format!(
            "{name}.struct_size is {declared}; set it to sizeof({name})"
        )));
    }
    let mut value: T = std::mem::zeroed();
    let n = declared.min(std::mem::size_of::<T>());
    std::ptr::copy_nonoverlapping(ptr as *const u8, &mut value as *mut T as *mut u8, n);
    Ok(Some(value))
}

/// # Safety
/// `s` must be NULL or a valid NUL-terminated string.
pub(super) unsafe fn opt_string(s: *const c_char, what: &str) -> Result<Option<String>> {
    if s.is_null() {
        return Ok(None);
    }
    let text = CStr::from_ptr(s)
        .to_str()
        .map_err(|_| Error::InvalidArgument(format!("{what} is not valid UTF-8")))?;
    Ok(if text.is_empty() {
        None
    } else {
        Some(text.to_string())
    })
}

/// Converts C create options (NULL = defaults) to [`CreateOptions`].
///
/// # Safety
/// `opts` must be NULL or valid as documented on `cowdisk_create_opts`.
pub(super) unsafe fn create_options(opts: *const cowdisk_create_opts) -> Result<CreateOptions> {
    let mut out = CreateOptions::default();
    let Some(c) = read_versioned(opts, "cowdisk_create_opts")? else {
        return Ok(out);
    };
    if c.version != 0 {
        out.version = c.version;
    }
    if c.cluster_size != 0 {
        out.cluster_size = c.cluster_size;
    }
    if c.refcount_bits != 0 {
        out.refcount_bits = c.refcount_bits;
    } else if out.version == 2 {
        out.refcount_bits = 16;
    }
    let known = COWDISK_CREATE_LAZY_REFCOUNTS | COWDISK_CREATE_NO_BACKING_CHECK;
    if c.flags & !known != 0 {
        return Err(Error::InvalidArgument(format!(
            "unknown create flags {:#x}",
            c.flags & !known
        )));
    }
    out.lazy_refcounts = c.flags & COWDISK_CREATE_LAZY_REFCOUNTS != 0;
    out.open_backing = c.flags & COWDISK_CREATE_NO_BACKING_CHECK == 0;
    out.compression_type = match c.compression_type {
        COWDISK_COMPRESSION_ZLIB => CompressionType::Zlib,
        COWDISK_COMPRESSION_ZSTD => CompressionType::Zstd,
        n => {
            return Err(Error::InvalidArgument(format!(
                "unknown compression type {n} (0 = zlib, 1 = zstd)"
            )))
        }
    };
    out.backing_file = opt_string(c.backing_file, "backing_file")?;
    out.backing_format = opt_string(c.backing_format, "backing_format")?;
    out.secret = c_secret(c.secret, c.secret_len)?;
    out.encryption = match c.encrypt_format {
        COWDISK_ENCRYPT_NONE => None,
        COWDISK_ENCRYPT_AES => Some(EncryptionFormat::LegacyAes),
        COWDISK_ENCRYPT_LUKS => {
            let mut pairs = Vec::new();
            for (key, ptr) in [
                ("cipher-alg", c.cipher_alg),
                ("cipher-mode", c.cipher_mode),
                ("ivgen-alg", c.ivgen_alg),
                ("ivgen-hash-alg", c.ivgen_hash_alg),
                ("hash-alg", c.hash_alg),
            ] {
                if let Some(v) = opt_string(ptr, key)? {
                    pairs.push((key, v));
                }
            }
            let iter = c.iter_time_ms.to_string();
            if c.iter_time_ms != 0 {
                pairs.push(("iter-time", iter));
            }
            let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            Some(EncryptionFormat::Luks(luks_options_from_qemu(&borrowed)?))
        }
        n => {
            return Err(Error::InvalidArgument(format!(
                "unknown encrypt_format {n} (0 none, 1 legacy AES, 2 LUKS)"
            )))
        }
    };
    Ok(out)
}

/// Converts C open options (NULL = defaults) to [`OpenOptions`].
///
/// # Safety
/// `opts` must be NULL or valid as documented on `cowdisk_open_opts`.
pub(super) unsafe fn open_options(opts: *const cowdisk_open_opts) -> Result<OpenOptions> {
    let mut out = OpenOptions::default();
    let Some(c) = read_versioned(opts, "cowdisk_open_opts")? else {
        return Ok(out);
    };
    let known = COWDISK_OPEN_READONLY
        | COWDISK_OPEN_DIRECT
        | COWDISK_OPEN_NO_BACKING
        | COWDISK_OPEN_DISCARD_UNMAP
        | COWDISK_OPEN_NO_COMPRESSED_CACHE
        | COWDISK_OPEN_FORCE_SHARE
        | COWDISK_OPEN_NO_LOCK
        | COWDISK_OPEN_CHECK
        | COWDISK_OPEN_METADATA_ONLY
        | COWDISK_OPEN_DROP_BITMAPS;
    if c.flags & !known != 0 {
        return Err(Error::InvalidArgument(format!(
            "unknown open flags {:#x}",
            c.flags & !known
        )));
    }
    out.read_only = c.flags & COWDISK_OPEN_READONLY != 0;
    out.direct = c.flags & COWDISK_OPEN_DIRECT != 0;
    out.follow_backing = c.flags & COWDISK_OPEN_NO_BACKING == 0;
    out.discard_unmap = c.flags & COWDISK_OPEN_DISCARD_UNMAP != 0;
    out.force_share = c.flags & COWDISK_OPEN_FORCE_SHARE != 0;
    out.locking = c.flags & COWDISK_OPEN_NO_LOCK == 0;
    out.check = c.flags & COWDISK_OPEN_CHECK != 0;
    out.metadata_only = c.flags & COWDISK_OPEN_METADATA_ONLY != 0;
    out.drop_bitmaps = c.flags & COWDISK_OPEN_DROP_BITMAPS != 0;
    out.secret = c_secret(c.secret, c.secret_len)?;
    out.snapshot = opt_string(c.snapshot, "snapshot")?;
    out.l2_cache_size = c.l2_cache_size;
    if c.max_backing_depth != 0 {
        out.max_backing_depth = c.max_backing_depth;
    }
    if c.flags & COWDISK_OPEN_NO_COMPRESSED_CACHE != 0 {
        out.compressed_cache_size = 0;
    } else if c.compressed_cache_size != 0 {
        out.compressed_cache_size = c.compressed_cache_size;
    }
    Ok(out)
}

fn copy_c_string(dst: &mut [c_char], src: Option<&str>) {
    dst.fill(0);
    if let Some(s) = src {
        let n = s.len().min(dst.len() - 1);
        for (d, b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
            *d = *b as c_char;
        }
    }
}

/// Writes `info` into the caller's struct, honouring its `struct_size`.
///
/// # Safety
/// `out` must be NULL or point to at least `out->struct_size` writable bytes.
pub(super) unsafe fn write_info(info: &ImageInfo, out: *mut cowdisk_info) -> Result<()> {
    if out.is_null() {
        return Err(Error::InvalidArgument("out is NULL".into()));
    }
    let declared = *(out as *const u32) as usize;
    if declared < 8 {
        return Err(Error::InvalidArgument(format!(
            "cowdisk_info.struct_size is {declared}; set it to sizeof(cowdisk_info)"
        )));
    }
    let mut c: cowdisk_info = std::mem::zeroed();
    c.struct_size = declared.min(std::mem::size_of::<cowdisk_info>()) as u32;
    c.version = info.version;
    c.virtual_size = info.virtual_size;
    c.cluster_size = info.cluster_size;
    c.refcount_bits = info.refcount_bits;
    let mut flags = 0;
    if info.read_only {
        flags |= COWDISK_INFO_READONLY;
    }
    if info.lazy_refcounts {
        flags |= COWDISK_INFO_LAZY_REFCOUNTS;
    }
    if info.dirty {
        flags |= COWDISK_INFO_DIRTY;
    }
    if info.corrupt {
        flags |= COWDISK_INFO_CORRUPT;
    }
    c.flags = flags;
    c.compression_type = info.compression_type.code() as u32;
    c.nb_snapshots = info.nb_snapshots;
    c.backing_depth = info.backing_chain.len() as u32;
    c.host_size = info.host_size;
    copy_c_string(&mut c.backing_file, info.backing_file.as_deref());
    copy_c_string(&mut c.backing_format, info.backing_format.as_deref());
    c.encrypt_format = match info.encryption {
        None => COWDISK_ENCRYPT_NONE,
        Some(EncryptionInfo::LegacyAes) => COWDISK_ENCRYPT_AES,
        Some(EncryptionInfo::Luks(_)) => COWDISK_ENCRYPT_LUKS,
    };
    let n = (c.struct_size as usize).min(std::mem::size_of::<cowdisk_info>());
    std::ptr::copy_nonoverlapping(&c as *const cowdisk_info as *const u8, out as *mut u8, n);
    Ok(())
}
