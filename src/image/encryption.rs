//! Encrypted images on the engine's side: unlocking at open, the LUKS area at create,
//! the cipher applied to guest data on its way to and from the host, and the
//! 512-byte alignment encryption needs (unaligned guest requests become
//! read-modify-write of whole sectors).
//!
//! The ciphers, key slots and the LUKS header codec live in `crate::crypto` and
//! `crate::format::luks`; here only where and with which sector number they apply.
//! LUKS uses the host sector number as IV, so data that moves to a new cluster (any
//! copy-on-write) is decrypted from its old place and encrypted for its new one;
//! legacy AES uses the guest sector number. Compressed clusters are stored
//! unencrypted, as QEMU stores them; compressed writes are refused.

use std::path::Path;
use std::sync::Arc;

use super::meta::Meta;
use super::{EncryptionFormat, EncryptionInfo, Image, OpenOptions};
use crate::crypto::{self, DataCipher, Secret};
use crate::error::{Error, Result};
use crate::format::header::{Header, CRYPT_AES, CRYPT_LUKS};
use crate::io::Storage;

/// Encryption works on sectors of this size.
pub(crate) const SECTOR: u64 = 512;

/// The unlocked cipher of an image and the rule for its IVs.
pub(crate) struct Encryption {
    cipher: DataCipher,
    /// LUKS: IVs from host sectors; legacy AES: from guest sectors.
    by_host: bool,
}

impl Encryption {
    fn sector(&self, host: u64, guest: u64) -> u64 {
        if self.by_host {
            host / SECTOR
        } else {
            guest / SECTOR
        }
    }

    /// Encrypts `buf` (whole sectors) for host offset `host`, guest offset `guest`.
    pub(crate) fn encrypt(&self, host: u64, guest: u64, buf: &mut [u8]) -> Result<()> {
        self.cipher.encrypt(self.sector(host, guest), buf)
    }

    /// Decrypts `buf` (whole sectors) read from host offset `host` (guest `guest`).
    pub(crate) fn decrypt(&self, host: u64, guest: u64, buf: &mut [u8]) -> Result<()> {
        self.cipher.decrypt(self.sector(host, guest), buf)
    }
}

/// What an image's encryption looks like once opened: `crypto` is `None` when the
/// image is not encrypted, or when it was opened for metadata only without a key.
pub(crate) struct Unlocked {
    pub crypto: Option<Arc<Encryption>>,
    pub info: Option<EncryptionInfo>,
}

fn describe(path: Option<&Path>) -> String {
    path.map_or_else(|| "the image".to_string(), |p| format!("'{}'", p.display()))
}

/// Reads the LUKS area an image's header points at.
fn read_luks_area(storage: &dyn Storage, header: &Header) -> Result<Vec<u8>> {
    let (offset, length) = header
        .crypto_header
        .ok_or_else(|| crate::corrupt!("LUKS image without an encryption header pointer"))?;
    let mut area = vec![0u8; length as usize];
    storage
        .read_at(&mut area, offset)
        .map_err(|e| Error::io(format!("reading the LUKS header at {offset:#x}"), e))?;
    Ok(area)
}

/// Unlocks an encrypted image with the open options' secret (see [`Unlocked`]).
pub(crate) fn unlock(
    storage: &dyn Storage,
    header: &Header,
    opts: &OpenOptions,
    path: Option<&Path>,
) -> Result<Unlocked> {
    let (info, by_host) = match header.crypt_method {
        0 => {
            return Ok(Unlocked {
                crypto: None,
                info: None,
            })
        }
        CRYPT_AES => (EncryptionInfo::LegacyAes, false),
        CRYPT_LUKS => {
            let area = read_luks_area(storage, header)?;
            let info = crypto::luks_info(&area)
                .map_err(|e| e.with_note(&format!("in the LUKS header of {}", describe(path))))?;
            if !header.size.is_multiple_of(SECTOR) {
                return Err(crate::corrupt!(
                    "encrypted image size {} is not a multiple of {SECTOR}",
                    header.size
                ));
            }
            let Some(secret) = &opts.secret else {
                return no_key(EncryptionInfo::Luks(info), opts, path);
            };
            let cipher = crypto::luks_unlock(&area, secret.as_bytes())
                .map_err(|e| e.with_note(&format!("opening {}", describe(path))))?;
            return Ok(Unlocked {
                crypto: Some(Arc::new(Encryption {
                    cipher,
                    by_host: true,
                })),
                info: Some(EncryptionInfo::Luks(info)),
            });
        }
        m => return Err(crate::corrupt!("unknown crypt_method {m}")),
    };
    let Some(secret) = &opts.secret else {
        return no_key(info, opts, path);
    };
    let cipher = crypto::legacy_aes(secret.as_bytes())?;
    Ok(Unlocked {
        crypto: Some(Arc::new(Encryption { cipher, by_host })),
        info: Some(info),
    })
}

fn no_key(info: EncryptionInfo, opts: &OpenOptions, path: Option<&Path>) -> Result<Unlocked> {
    if opts.metadata_only {
        return Ok(Unlocked {
            crypto: None,
            info: Some(info),
        });
    }
    let kind = match info {
        EncryptionInfo::LegacyAes => "legacy AES",
        EncryptionInfo::Luks(_) => "LUKS",
    };
    Err(Error::NoKey(format!(
        "{} is encrypted ({kind}): a passphrase is needed to open it (a secret; --secret-file on the command line)",
        describe(path)
    )))
}

/// The error for data I/O on an encrypted image opened without its key.
pub(crate) fn key_needed() -> Error {
    Error::NoKey(
        "the image is encrypted and was opened without its passphrase (metadata only)".into(),
    )
}

/// Checks the create options' encryption and returns the header's crypt method.
pub(crate) fn validate_create(
    format: Option<&EncryptionFormat>,
    secret: Option<&Secret>,
) -> Result<u32> {
    match (format, secret) {
        (None, None) => Ok(0),
        (None, Some(_)) => Err(crate::invalid!(
            "a secret was given but no encryption format (encrypt.format=luks or aes)"
        )),
        (Some(_), None) => Err(Error::NoKey(
            "an encrypted image needs a passphrase (encrypt.key-secret / --secret-file)".into(),
        )),
        (Some(EncryptionFormat::LegacyAes), Some(_)) => Ok(CRYPT_AES),
        (Some(EncryptionFormat::Luks(_)), Some(_)) => Ok(CRYPT_LUKS),
    }
}

impl Meta {
    /// Makes the new image's LUKS area (clusters allocated after the L1 table, as QEMU
    /// places them) and points the header at it.
    pub(crate) fn create_luks_area(
        &mut self,
        opts: &crypto::LuksCreateOptions,
        secret: &Secret,
    ) -> Result<()> {
        let (area, _cipher) = crypto::luks_create(opts, secret.as_bytes())?;
        let len = area.len() as u64;
        let clusters = len.div_ceil(self.cluster_size);
        let offset = self.alloc_clusters(clusters)?;
        // Like QEMU, the whole clusters are written: the file ends after the last.
        let mut padded = area;
        padded.resize((clusters * self.cluster_size) as usize, 0);
        self.write_host("the LUKS header", &padded, offset)?;
        self.write_dirty_refcount_blocks()?;
        self.sync()?;
        self.header.crypto_header = Some((offset, len));
        self.header.crypt_method = CRYPT_LUKS;
        self.write_header()?;
        self.sync()
    }

    /// Fails when the image is encrypted but its key is not at hand.
    pub(crate) fn check_key(&self) -> Result<()> {
        if self.header.crypt_method != 0 && self.crypto.is_none() {
            return Err(key_needed());
        }
        Ok(())
    }

    /// Writes `buf` at guest `offset` with the lock held, sector-aligned for an
    /// encrypted image by reading the partial sectors at either end first.
    pub(crate) fn write_sectors(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let (start, end) = aligned(offset, buf.len());
        if start == offset && end == offset + buf.len() as u64 {
            return self.write(buf, offset);
        }
        let mut whole = vec![0u8; (end - start) as usize];
        self.read(&mut whole, start)?;
        let at = (offset - start) as usize;
        whole[at..at + buf.len()].copy_from_slice(buf);
        self.write(&whole, start)
    }
}

/// The 512-byte-aligned range covering `len` bytes at `offset`.
fn aligned(offset: u64, len: usize) -> (u64, u64) {
    let start = offset / SECTOR * SECTOR;
    let end = (offset + len as u64).div_ceil(SECTOR) * SECTOR;
    (start, end)
}

/// True when a request needs the sector read-modify-write of an encrypted image.
pub(crate) fn unaligned(offset: u64, len: usize) -> bool {
    !offset.is_multiple_of(SECTOR) || !(len as u64).is_multiple_of(SECTOR)
}

impl Image {
    /// A read of an encrypted image that is not sector-aligned: the covering sectors
    /// are read (and decrypted) into a bounce buffer.
    pub(crate) fn read_unaligned_sectors(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_sector_range(buf.len(), offset, "read")?;
        let (start, end) = aligned(offset, buf.len());
        let mut whole = vec![0u8; (end - start) as usize];
        self.read_aligned(&mut whole, start)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&whole[at..at + buf.len()]);
        Ok(())
    }

    /// A write into an encrypted image that is not sector-aligned: the partial sectors
    /// at either end are read, patched and written whole. Such writes hold the
    /// sector lock exclusively, aligned ones share it, so no write lands between the
    /// read and the write of a partial sector.
    pub(crate) fn write_unaligned_sectors(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_sector_range(buf.len(), offset, "write")?;
        let _rmw = self.sector_rmw.write().unwrap_or_else(|e| e.into_inner());
        let (start, end) = aligned(offset, buf.len());
        let mut whole = vec![0u8; (end - start) as usize];
        let head = (offset - start) as usize;
        let tail_at = head + buf.len();
        let sector = SECTOR as usize;
        if head > 0 {
            self.read_aligned(&mut whole[..sector], start)?;
        }
        // A single sector partial at both ends was read just above.
        if tail_at < whole.len() && !(head > 0 && whole.len() == sector) {
            let last = whole.len() - sector;
            self.read_aligned(&mut whole[last..], end - SECTOR)?;
        }
        whole[head..tail_at].copy_from_slice(buf);
        self.write_aligned(&whole, start)
    }

    /// Range check of an unaligned request, in the caller's terms.
    fn check_sector_range(&self, len: usize, offset: u64, what: &str) -> Result<()> {
        let meta = self.lock()?;
        Image::check_range(&meta, len, offset, what)
    }
}
