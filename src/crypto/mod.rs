//! qcow2 encryption: the data ciphers and the key handling of QEMU's two qcow2
//! encryption methods. Self-contained (no I/O): the engine hands in the bytes of the
//! LUKS area and the sectors to process.
//!
//! Supported:
//! - **LUKS** (qcow2 `crypt_method` 2; the area the "full disk encryption header
//!   pointer" extension 0x0537be77 points at): LUKS1 with cipher `aes` (128/192/256
//!   bit keys), modes `xts` and `cbc`, IV generators `plain`, `plain64` and `essiv`
//!   (ESSIV hash sha256, the only one whose digest is an AES key length), PBKDF2 and
//!   anti-forensic hashes sha1, sha256 and sha512. [`luks_info`], [`luks_unlock`],
//!   [`luks_create`]. Other ciphers (twofish, serpent, cast5, sm4), modes (ecb, ctr)
//!   and hashes (md5, sha224, sha384, ripemd160, sm3) are
//!   [`Error::Unsupported`]; LUKS2 too.
//! - **Legacy AES** (qcow2 `crypt_method` 1): AES-128-CBC with a `plain64` IV and the
//!   passphrase itself as the key ([`legacy_aes`]).
//!
//! **The IV rule.** Both methods encrypt 512-byte sectors independently; a sector's
//! IV comes from its sector number, which the caller passes as `first_sector` to
//! [`DataCipher::encrypt`] / [`DataCipher::decrypt`]:
//! - LUKS in qcow2: the **host** sector, `host_offset / 512` (the offset of the data
//!   in the image file). A raw LUKS volume (QEMU's `luks` driver) uses the sector
//!   relative to the payload start instead.
//! - legacy AES: the **guest** sector, `guest_offset / 512`.
//!
//! `plain` keeps only the low 32 bits of the sector number (it wraps at 2 TiB of
//! host offset), `plain64` all 64, `essiv` encrypts the 64-bit little-endian sector
//! number with AES keyed by the hash of the key.
//!
//! Keys: passphrases, master keys, slot keys and split-key material live in
//! zeroizing buffers and are wiped when dropped (the AES round keys too, through the
//! `aes` crate's `zeroize` feature); no error message or `Debug` output holds key
//! bytes. As in QEMU, a passphrase is a C string: bytes from the first NUL on are
//! ignored.

mod af;
mod data;
mod kdf;
mod luks;
mod pool;
mod qemu_options;
mod secret;

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::{corrupt, invalid, unsupported};

pub use data::{DataCipher, PARALLEL_MIN_BYTES, SECTOR_SIZE};
pub use luks::{
    luks_area_len, luks_create, luks_info, luks_unlock, LuksCreateOptions, LuksInfo, LuksLayout,
    LuksSlotInfo, MAX_UNLOCK_WORK,
};
pub use qemu_options::luks_options_from_qemu;
pub use secret::Secret;

/// A block cipher (all AES: the only family implemented).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
}

impl CipherAlg {
    /// QEMU's name (`aes-128`, `aes-192`, `aes-256`), as `qemu-img info` prints it.
    pub const fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }

    /// Key length in bytes (16, 24, 32).
    pub const fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }

    /// The AES variant with a `len`-byte key.
    pub fn from_key_len(len: usize) -> Option<CipherAlg> {
        match len {
            16 => Some(CipherAlg::Aes128),
            24 => Some(CipherAlg::Aes192),
            32 => Some(CipherAlg::Aes256),
            _ => None,
        }
    }
}

impl fmt::Display for CipherAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CipherAlg {
    type Err = Error;
    /// Parses QEMU's option names (`encrypt.cipher-alg`): `aes-128`, `aes-192`,
    /// `aes-256`; anything else (`twofish-256`, `serpent-128`, `cast5-128`, `sm4`,
    /// ...) is unsupported.
    fn from_str(s: &str) -> Result<CipherAlg> {
        match s {
            "aes-128" => Ok(CipherAlg::Aes128),
            "aes-192" => Ok(CipherAlg::Aes192),
            "aes-256" => Ok(CipherAlg::Aes256),
            _ => Err(unsupported!(
                "cipher '{}' (only aes-128, aes-192 and aes-256 are implemented)",
                s.escape_default()
            )),
        }
    }
}

/// A block cipher mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherMode {
    /// XTS (IEEE 1619): the IV is the tweak; the key is two AES keys (data, tweak).
    Xts,
    /// CBC, chaining restarted with each sector's IV.
    Cbc,
}

impl CipherMode {
    /// QEMU's name (`xts`, `cbc`).
    pub const fn name(self) -> &'static str {
        match self {
            CipherMode::Xts => "xts",
            CipherMode::Cbc => "cbc",
        }
    }
}

impl fmt::Display for CipherMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CipherMode {
    type Err = Error;
    /// Parses `xts` or `cbc` (QEMU's `encrypt.cipher-mode`, and the mode part of a
    /// LUKS cipher_mode); `ecb`, `ctr` and others are unsupported.
    fn from_str(s: &str) -> Result<CipherMode> {
        match s {
            "xts" => Ok(CipherMode::Xts),
            "cbc" => Ok(CipherMode::Cbc),
            _ => Err(unsupported!(
                "cipher mode '{}' (only xts and cbc are implemented)",
                s.escape_default()
            )),
        }
    }
}

/// A hash, for PBKDF2, the anti-forensic splitter and ESSIV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// SHA-1 (20-byte digest).
    Sha1,
    /// SHA-256 (32-byte digest).
    Sha256,
    /// SHA-512 (64-byte digest).
    Sha512,
}

impl HashAlg {
    /// QEMU's and LUKS's name (`sha1`, `sha256`, `sha512`).
    pub const fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub const fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha256 => 32,
            HashAlg::Sha512 => 64,
        }
    }
}

impl fmt::Display for HashAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlg {
    type Err = Error;
    /// Parses `sha1`, `sha256`, `sha512` (QEMU's `encrypt.hash-alg` and
    /// `encrypt.ivgen-hash-alg`, LUKS hash_spec); md5, sha224, sha384, ripemd160,
    /// sm3 and others are unsupported.
    fn from_str(s: &str) -> Result<HashAlg> {
        match s {
            "sha1" => Ok(HashAlg::Sha1),
            "sha256" => Ok(HashAlg::Sha256),
            "sha512" => Ok(HashAlg::Sha512),
            _ => Err(unsupported!(
                "hash '{}' (only sha1, sha256 and sha512 are implemented)",
                s.escape_default()
            )),
        }
    }
}

/// How a sector's IV is derived from its sector number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IvGen {
    /// The low 32 bits of the sector number, little-endian, zero-padded.
    Plain,
    /// The 64-bit sector number, little-endian, zero-padded.
    Plain64,
    /// The 64-bit little-endian sector number, zero-padded to 16 bytes, encrypted
    /// with AES-ECB keyed by the hash of the key (AES-256 for sha256, whatever the
    /// data cipher's key size, as dm-crypt and QEMU do).
    Essiv(HashAlg),
}

impl IvGen {
    /// QEMU's name (`plain`, `plain64`, `essiv`); the ESSIV hash is [`IvGen::hash`].
    pub const fn name(self) -> &'static str {
        match self {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Essiv(_) => "essiv",
        }
    }

    /// The ESSIV hash, `None` for plain and plain64.
    pub const fn hash(self) -> Option<HashAlg> {
        match self {
            IvGen::Essiv(h) => Some(h),
            _ => None,
        }
    }

    /// From QEMU's options `encrypt.ivgen-alg` and `encrypt.ivgen-hash-alg`: the hash
    /// defaults to sha256 for essiv, as in QEMU, and is ignored for plain and plain64
    /// (QEMU accepts and ignores it too).
    pub fn from_qemu(alg: &str, hash: Option<&str>) -> Result<IvGen> {
        match alg {
            "plain" => Ok(IvGen::Plain),
            "plain64" => Ok(IvGen::Plain64),
            "essiv" => Ok(IvGen::Essiv(match hash {
                Some(h) => h.parse()?,
                None => HashAlg::Sha256,
            })),
            _ => Err(unsupported!(
                "IV generator '{}' (only plain, plain64 and essiv are implemented)",
                alg.escape_default()
            )),
        }
    }

    /// The AES key size ESSIV uses with this hash: the digest length, which must be
    /// an AES key length (QEMU refuses the others: "No AES cipher with key size 20").
    pub fn essiv_cipher(self) -> Result<Option<CipherAlg>> {
        match self {
            IvGen::Essiv(h) => match CipherAlg::from_key_len(h.digest_len()) {
                Some(c) => Ok(Some(c)),
                None => Err(unsupported!(
                    "essiv:{h}: its {}-byte digest is not an AES key length (16, 24 or 32), as QEMU also refuses",
                    h.digest_len()
                )),
            },
            _ => Ok(None),
        }
    }
}

impl fmt::Display for IvGen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IvGen::Essiv(h) => write!(f, "essiv:{h}"),
            g => f.write_str(g.name()),
        }
    }
}

impl FromStr for IvGen {
    type Err = Error;
    /// Parses `plain`, `plain64`, `essiv` (sha256) or `essiv:HASH`, the form of the
    /// LUKS cipher_mode suffix. A hash after plain/plain64 is ignored, as QEMU and
    /// dm-crypt ignore it.
    fn from_str(s: &str) -> Result<IvGen> {
        match s.split_once(':') {
            Some((alg, hash)) => IvGen::from_qemu(alg, Some(hash)),
            None => IvGen::from_qemu(s, None),
        }
    }
}

/// Cipher, mode and IV generator of a data cipher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CipherSpec {
    /// The block cipher.
    pub alg: CipherAlg,
    /// The mode.
    pub mode: CipherMode,
    /// The IV generator.
    pub ivgen: IvGen,
}

impl CipherSpec {
    /// Key length in bytes: the AES key length, twice that for XTS.
    pub const fn key_len(&self) -> usize {
        match self.mode {
            CipherMode::Xts => 2 * self.alg.key_len(),
            CipherMode::Cbc => self.alg.key_len(),
        }
    }

    /// Checks the combination (the ESSIV hash must give an AES key length).
    pub fn validate(&self) -> Result<()> {
        self.ivgen.essiv_cipher().map(|_| ())
    }

    /// The LUKS cipher_mode string: `xts-plain64`, `cbc-essiv:sha256`.
    pub fn luks_mode(&self) -> String {
        format!("{}-{}", self.mode, self.ivgen)
    }

    /// From the LUKS header fields cipher_name (`aes`), cipher_mode
    /// (`MODE-IVGEN[:HASH]`) and key_bytes (which sets the AES key size: halved for
    /// XTS). Non-aes ciphers, other modes and key sizes are unsupported; a
    /// cipher_mode without `-` is corrupt.
    pub fn from_luks(cipher_name: &str, cipher_mode: &str, key_bytes: u32) -> Result<CipherSpec> {
        if cipher_name != "aes" {
            return Err(unsupported!(
                "LUKS cipher '{}' (only aes is implemented)",
                cipher_name.escape_default()
            ));
        }
        let Some((mode, ivgen)) = cipher_mode.split_once('-') else {
            return Err(corrupt!(
                "LUKS cipher_mode '{}' is not of the form MODE-IVGEN",
                cipher_mode.escape_default()
            ));
        };
        let mode: CipherMode = mode.parse()?;
        let ivgen: IvGen = ivgen.parse()?;
        let aes_key = match mode {
            CipherMode::Xts if key_bytes.is_multiple_of(2) => key_bytes / 2,
            CipherMode::Xts => 0,
            CipherMode::Cbc => key_bytes,
        };
        let Some(alg) = CipherAlg::from_key_len(aes_key as usize) else {
            return Err(unsupported!(
                "LUKS aes-{mode} with a {key_bytes}-byte key (key_bytes must be {})",
                if mode == CipherMode::Xts {
                    "32, 48 or 64"
                } else {
                    "16, 24 or 32"
                }
            ));
        };
        let spec = CipherSpec { alg, mode, ivgen };
        spec.validate()?;
        Ok(spec)
    }
}

impl fmt::Display for CipherSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.alg, self.mode, self.ivgen)
    }
}

/// The cipher of QEMU's legacy qcow2 "AES" encryption (crypt_method 1): AES-128-CBC,
/// `plain64` IVs of the **guest** sector number, and as key the passphrase's first 16
/// bytes, zero-padded if shorter (QEMU copies `min(strlen, 16)` bytes of the secret
/// into a zeroed 16-byte buffer: no key derivation, bytes after 16 are ignored, and so
/// is anything from a NUL on). Broken by design (no KDF, predictable IVs); for reading
/// old images.
pub fn legacy_aes(passphrase: &[u8]) -> Result<DataCipher> {
    let pass = c_string(passphrase);
    let mut key = Zeroizing::new([0u8; 16]);
    let n = pass.len().min(16);
    key[..n].copy_from_slice(&pass[..n]);
    DataCipher::new(
        CipherSpec {
            alg: CipherAlg::Aes128,
            mode: CipherMode::Cbc,
            ivgen: IvGen::Plain64,
        },
        &key[..],
    )
}

/// The passphrase as QEMU sees it: up to the first NUL.
fn c_string(p: &[u8]) -> &[u8] {
    match p.iter().position(|&c| c == 0) {
        Some(n) => &p[..n],
        None => p,
    }
}

/// Random bytes from the OS.
fn random_bytes(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        let source = match e.raw_os_error() {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => std::io::Error::other(e.to_string()),
        };
        Error::io("reading random bytes from the OS", source)
    })
}

/// Checks a caller-supplied key length without printing the key.
fn check_key_len(spec: &CipherSpec, key: &[u8]) -> Result<()> {
    if key.len() != spec.key_len() {
        return Err(invalid!(
            "{spec} needs a {}-byte key, got {} bytes",
            spec.key_len(),
            key.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256] {
            assert_eq!(a.name().parse::<CipherAlg>().unwrap(), a);
        }
        for m in [CipherMode::Xts, CipherMode::Cbc] {
            assert_eq!(m.name().parse::<CipherMode>().unwrap(), m);
        }
        for h in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            assert_eq!(h.name().parse::<HashAlg>().unwrap(), h);
        }
        assert_eq!("plain".parse::<IvGen>().unwrap(), IvGen::Plain);
        assert_eq!("plain64".parse::<IvGen>().unwrap(), IvGen::Plain64);
        assert_eq!(
            "essiv".parse::<IvGen>().unwrap(),
            IvGen::Essiv(HashAlg::Sha256)
        );
        assert_eq!(
            IvGen::from_qemu("essiv", Some("sha1")).unwrap(),
            IvGen::Essiv(HashAlg::Sha1)
        );
        assert_eq!("plain64:sha224".parse::<IvGen>().unwrap(), IvGen::Plain64);
    }

    #[test]
    fn luks_strings() {
        let s = CipherSpec::from_luks("aes", "xts-plain64", 64).unwrap();
        assert_eq!(
            s,
            CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Xts,
                ivgen: IvGen::Plain64
            }
        );
        assert_eq!(s.luks_mode(), "xts-plain64");
        assert_eq!(s.to_string(), "aes-256-xts-plain64");
        let s = CipherSpec::from_luks("aes", "cbc-essiv:sha256", 16).unwrap();
        assert_eq!(s.alg, CipherAlg::Aes128);
        assert_eq!(s.ivgen, IvGen::Essiv(HashAlg::Sha256));
        assert_eq!(s.luks_mode(), "cbc-essiv:sha256");
        assert_eq!(s.key_len(), 16);
        assert_eq!(
            CipherSpec::from_luks("aes", "xts-plain", 48).unwrap().alg,
            CipherAlg::Aes192
        );
        for (name, mode, kb, words) in [
            ("twofish", "xts-plain64", 64, "twofish"),
            ("serpent", "cbc-plain", 32, "serpent"),
            ("cast5", "cbc-plain", 16, "cast5"),
            ("sm4", "cbc-plain", 16, "sm4"),
            ("aes", "ecb-plain", 16, "ecb"),
            ("aes", "ctr-plain64", 16, "ctr"),
            ("aes", "xts-plain64", 40, "40-byte"),
            ("aes", "xts-plain64", 33, "33-byte"),
            ("aes", "cbc-plain", 64, "64-byte"),
            ("aes", "cbc-essiv:sha1", 16, "essiv:sha1"),
            ("aes", "cbc-essiv:sha512", 16, "essiv:sha512"),
            ("aes", "cbc-essiv:md5", 16, "md5"),
            ("aes", "cbc-lmk", 16, "lmk"),
        ] {
            let e = CipherSpec::from_luks(name, mode, kb).unwrap_err();
            assert!(matches!(e, Error::Unsupported(_)), "{e}");
            assert!(e.to_string().contains(words), "{e} lacks {words}");
        }
        assert!(matches!(
            CipherSpec::from_luks("aes", "xts", 64),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn legacy_key_is_the_passphrase() {
        // Same cipher for "pass", "pass\0junk"; different for a 17th byte? no: ignored.
        let mut a = vec![0x11u8; 1024];
        let mut b = a.clone();
        legacy_aes(b"pass").unwrap().encrypt(3, &mut a).unwrap();
        legacy_aes(b"pass\0junk")
            .unwrap()
            .encrypt(3, &mut b)
            .unwrap();
        assert_eq!(a, b);
        let mut c = vec![0x11u8; 1024];
        let mut d = c.clone();
        legacy_aes(b"0123456789abcdefX")
            .unwrap()
            .encrypt(0, &mut c)
            .unwrap();
        legacy_aes(b"0123456789abcdefY")
            .unwrap()
            .encrypt(0, &mut d)
            .unwrap();
        assert_eq!(c, d);
        assert_eq!(
            legacy_aes(b"k").unwrap().spec().to_string(),
            "aes-128-cbc-plain64"
        );
    }
}
