//! The LUKS1 header codec: the 592-byte header at the start of a LUKS area (the
//! qcow2 "full disk encryption header" or a raw LUKS volume). Pure: no I/O and no
//! cryptography; [`crate::crypto`] does the key handling.
//!
//! The layout is the LUKS1 on-disk format (version 1, big-endian integers):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 6 | magic `LUKS\xba\xbe` |
//! | 6 | 2 | version (1) |
//! | 8 | 32 | cipher_name (`aes`) |
//! | 40 | 32 | cipher_mode (`xts-plain64`, `cbc-essiv:sha256`) |
//! | 72 | 32 | hash_spec (`sha256`) |
//! | 104 | 4 | payload_offset (512-byte sectors) |
//! | 108 | 4 | key_bytes |
//! | 112 | 20 | mk_digest |
//! | 132 | 32 | mk_digest_salt |
//! | 164 | 4 | mk_digest_iterations |
//! | 168 | 40 | uuid (ASCII) |
//! | 208 | 8 × 48 | key slots: active, iterations, salt\[32\], key_material_offset (sectors), stripes |
//!
//! [`LuksHeader::parse`] checks every field, including the checks QEMU makes when it
//! opens an image (slot states, stripes, key material inside the header area and not
//! overlapping), plus bounds on the work an untrusted header can ask for
//! ([`MAX_ITERATIONS`], [`MAX_STRIPES`], [`MAX_KEY_BYTES`]).

use crate::error::Result;
use crate::{corrupt, invalid, unsupported};

/// Length of the LUKS1 header (the key slots included), in bytes.
pub const HEADER_LEN: usize = 592;
/// The LUKS magic.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The only LUKS version this codec reads and writes.
pub const VERSION: u16 = 1;
/// The LUKS sector size: key material offsets and the payload offset count these.
pub const SECTOR_SIZE: u64 = 512;
/// Number of key slots in a LUKS1 header.
pub const NUM_SLOTS: usize = 8;
/// Length of the master-key digest.
pub const DIGEST_LEN: usize = 20;
/// Length of the salts (master-key digest and key slots).
pub const SALT_LEN: usize = 32;
/// Length of the string fields cipher_name, cipher_mode and hash_spec.
pub const NAME_LEN: usize = 32;
/// Length of the uuid field.
pub const UUID_LEN: usize = 40;
/// `active` value of a key slot that holds a key.
pub const SLOT_ENABLED: u32 = 0x00AC_71F3;
/// `active` value of an empty key slot.
pub const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// The stripe count LUKS1 (and QEMU) writes.
pub const DEFAULT_STRIPES: u32 = 4000;
/// Key material starts after this many sectors (4096 bytes: QEMU's and
/// cryptsetup's first key slot offset); key material areas are rounded up to a
/// multiple of it too.
pub const HEADER_SECTORS: u32 = 8;

/// Largest PBKDF2 iteration count accepted in a header (2^27 = 134,217,728). QEMU's
/// default of 2 s gives a few million on a current core (about 7.4 million HMAC-SHA256
/// blocks a second with SHA-NI), so this leaves room for iter-times well above a
/// minute while refusing headers whose only purpose is to make an open hang (a
/// u32 field allows 4.3 billion).
pub const MAX_ITERATIONS: u32 = 1 << 27;
/// Largest anti-forensic stripe count accepted (2^20; LUKS1 writes 4000).
pub const MAX_STRIPES: u32 = 1 << 20;
/// Largest key_bytes accepted by the codec (the ciphers we implement use at most 64).
pub const MAX_KEY_BYTES: u32 = 512;

/// One of the eight key slots.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// The slot holds an encrypted copy of the master key (`active` = 0x00AC71F3;
    /// 0x0000DEAD when empty; anything else is refused).
    pub active: bool,
    /// PBKDF2 iterations turning the passphrase into the slot key (QEMU writes 0 for
    /// empty slots; only checked for active ones).
    pub iterations: u32,
    /// PBKDF2 salt of the slot key (public, not secret).
    pub salt: [u8; SALT_LEN],
    /// Start of the slot's key material, in 512-byte sectors from the start of the
    /// LUKS area.
    pub key_material_offset: u32,
    /// Anti-forensic stripes: the key material is `key_bytes * stripes` bytes.
    pub stripes: u32,
}

impl std::fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySlot")
            .field("active", &self.active)
            .field("iterations", &self.iterations)
            .field("key_material_offset", &self.key_material_offset)
            .field("stripes", &self.stripes)
            .finish_non_exhaustive()
    }
}

impl KeySlot {
    /// An empty slot as QEMU lays it out: disabled, zero salt and iterations, the
    /// given key material offset and [`DEFAULT_STRIPES`].
    pub fn empty(key_material_offset: u32) -> KeySlot {
        KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_material_offset,
            stripes: DEFAULT_STRIPES,
        }
    }

    /// Byte range of this slot's key material in the LUKS area (`key_bytes *
    /// stripes` bytes from `key_material_offset * 512`).
    pub fn material_range(&self, key_bytes: u32) -> std::ops::Range<u64> {
        let start = self.key_material_offset as u64 * SECTOR_SIZE;
        start..start + key_bytes as u64 * self.stripes as u64
    }
}

/// Sectors a key slot's material occupies in QEMU's and cryptsetup's layout: the
/// material rounded up to sectors, then to a multiple of [`HEADER_SECTORS`].
pub fn key_material_sectors(key_bytes: u32, stripes: u32) -> u64 {
    let sectors = (key_bytes as u64 * stripes as u64).div_ceil(SECTOR_SIZE);
    sectors.div_ceil(HEADER_SECTORS as u64) * HEADER_SECTORS as u64
}

/// A decoded LUKS1 header.
#[derive(Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// Cipher name (`aes`, `twofish`, ...).
    pub cipher_name: String,
    /// Cipher mode and IV generator (`xts-plain64`, `cbc-essiv:sha256`).
    pub cipher_mode: String,
    /// PBKDF2 and anti-forensic hash (`sha256`).
    pub hash_spec: String,
    /// Start of the payload in 512-byte sectors. For a qcow2 image this is the
    /// length of the LUKS area (the qcow2 clusters hold the data), for a raw LUKS
    /// volume where the encrypted payload begins.
    pub payload_offset: u32,
    /// Length of the master key in bytes (both halves for XTS).
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key, to recognise the right one.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of the master-key digest.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// PBKDF2 iterations of the master-key digest.
    pub mk_digest_iterations: u32,
    /// The volume UUID in its ASCII form.
    pub uuid: String,
    /// The eight key slots.
    pub slots: [KeySlot; NUM_SLOTS],
}

impl std::fmt::Debug for LuksHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The digest and salts are not secret, but nothing gains from printing them.
        f.debug_struct("LuksHeader")
            .field("cipher_name", &self.cipher_name)
            .field("cipher_mode", &self.cipher_mode)
            .field("hash_spec", &self.hash_spec)
            .field("payload_offset", &self.payload_offset)
            .field("key_bytes", &self.key_bytes)
            .field("mk_digest_iterations", &self.mk_digest_iterations)
            .field("uuid", &self.uuid)
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

/// A NUL-terminated printable-ASCII string field (the whole field may be used when
/// `allow_full` is set, as for the uuid, which QEMU reads with strndup).
fn string_field(b: &[u8], field: &str, allow_full: bool) -> Result<String> {
    let len = match b.iter().position(|&c| c == 0) {
        Some(n) => n,
        None if allow_full => b.len(),
        None => {
            return Err(corrupt!(
                "LUKS header field {field} is not NUL-terminated within its {} bytes",
                b.len()
            ))
        }
    };
    let s = &b[..len];
    if let Some(&c) = s.iter().find(|&&c| !(0x20..0x7f).contains(&c)) {
        return Err(corrupt!(
            "LUKS header field {field} holds a non-printable byte {c:#04x}"
        ));
    }
    // Printable ASCII is valid UTF-8.
    Ok(String::from_utf8_lossy(s).into_owned())
}

fn put_string(out: &mut [u8], s: &str, field: &str, need_nul: bool) -> Result<()> {
    let max = if need_nul { out.len() - 1 } else { out.len() };
    if s.len() > max {
        return Err(invalid!(
            "LUKS header field {field} '{s}' is longer than {max} bytes"
        ));
    }
    if s.bytes().any(|c| !(0x20..0x7f).contains(&c)) {
        return Err(invalid!(
            "LUKS header field {field} '{}' is not printable ASCII",
            s.escape_default()
        ));
    }
    out[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

impl LuksHeader {
    /// Decodes and validates the header at the start of `buf` (at least
    /// [`HEADER_LEN`] bytes; the rest is ignored).
    ///
    /// Refuses, naming the field and value: a short buffer, a wrong magic, a version
    /// other than 1 (LUKS2 is [`crate::Error::Unsupported`]), string fields that are not
    /// NUL-terminated printable ASCII, key_bytes 0 or above [`MAX_KEY_BYTES`],
    /// master-key iterations 0 or above [`MAX_ITERATIONS`], a slot state other than
    /// enabled/disabled, stripes 0 or above [`MAX_STRIPES`], an active slot with 0 or
    /// too many iterations, key material overlapping the header, the payload or
    /// another slot's material. Corruption is [`crate::Error::Corrupt`]; valid values
    /// beyond our bounds are [`crate::Error::Unsupported`].
    pub fn parse(buf: &[u8]) -> Result<LuksHeader> {
        if buf.len() < HEADER_LEN {
            return Err(corrupt!(
                "LUKS header truncated: {} bytes, a LUKS1 header has {HEADER_LEN}",
                buf.len()
            ));
        }
        if buf[..6] != MAGIC {
            return Err(corrupt!(
                "bad LUKS magic {:02x?} (expected \"LUKS\\xba\\xbe\")",
                &buf[..6]
            ));
        }
        let version = be16(buf, 6);
        if version != VERSION {
            return Err(unsupported!(
                "LUKS version {version} (only LUKS version 1 is supported)"
            ));
        }
        let cipher_name = string_field(&buf[8..40], "cipher_name", false)?;
        let cipher_mode = string_field(&buf[40..72], "cipher_mode", false)?;
        let hash_spec = string_field(&buf[72..104], "hash_spec", false)?;
        let payload_offset = be32(buf, 104);
        let key_bytes = be32(buf, 108);
        if key_bytes == 0 {
            return Err(corrupt!("LUKS header key_bytes is 0"));
        }
        if key_bytes > MAX_KEY_BYTES {
            return Err(corrupt!(
                "LUKS header key_bytes {key_bytes} is absurd (limit {MAX_KEY_BYTES})"
            ));
        }
        let mk_digest = array::<DIGEST_LEN>(buf, 112);
        let mk_digest_salt = array::<SALT_LEN>(buf, 132);
        let mk_digest_iterations = be32(buf, 164);
        check_iterations(mk_digest_iterations, "mk_digest_iterations")?;
        let uuid = string_field(&buf[168..208], "uuid", true)?;

        let mut slots: [KeySlot; NUM_SLOTS] = std::array::from_fn(|_| KeySlot::empty(0));
        for (i, slot) in slots.iter_mut().enumerate() {
            let b = &buf[208 + i * 48..208 + (i + 1) * 48];
            let state = be32(b, 0);
            let active = match state {
                SLOT_ENABLED => true,
                SLOT_DISABLED => false,
                v => {
                    return Err(corrupt!(
                    "LUKS key slot {i} state {v:#010x} is neither enabled (0x00ac71f3) nor disabled (0x0000dead)"
                ))
                }
            };
            *slot = KeySlot {
                active,
                iterations: be32(b, 4),
                salt: array::<SALT_LEN>(b, 8),
                key_material_offset: be32(b, 40),
                stripes: be32(b, 44),
            };
            if slot.stripes == 0 {
                return Err(corrupt!("LUKS key slot {i} stripes is 0"));
            }
            if slot.stripes > MAX_STRIPES {
                return Err(unsupported!(
                    "LUKS key slot {i} stripes {} exceeds the limit {MAX_STRIPES}",
                    slot.stripes
                ));
            }
            if active {
                check_iterations(slot.iterations, &format!("key slot {i} iterations"))?;
            }
            // The material must not overlap the 592-byte header itself.
            if (slot.key_material_offset as u64) * SECTOR_SIZE < HEADER_LEN as u64 {
                return Err(corrupt!(
                    "LUKS key slot {i} key material offset {} (sectors) overlaps the header",
                    slot.key_material_offset
                ));
            }
        }
        // QEMU's layout checks: every slot's (rounded) material ends before the
        // payload, and no two slots overlap.
        for i in 0..NUM_SLOTS {
            let a = &slots[i];
            let a_start = a.key_material_offset as u64;
            let a_end = a_start + key_material_sectors(key_bytes, a.stripes);
            if a_end > payload_offset as u64 {
                return Err(corrupt!(
                    "LUKS key slot {i} key material (sectors {a_start}..{a_end}) runs past the payload offset {payload_offset}"
                ));
            }
            for (j, b) in slots.iter().enumerate().skip(i + 1) {
                let b_start = b.key_material_offset as u64;
                let b_end = b_start + key_material_sectors(key_bytes, b.stripes);
                if a_end > b_start && b_end > a_start {
                    return Err(corrupt!(
                        "LUKS key slots {i} and {j} have overlapping key material (sectors {a_start}..{a_end} and {b_start}..{b_end})"
                    ));
                }
            }
        }
        Ok(LuksHeader {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iterations,
            uuid,
            slots,
        })
    }

    /// Encodes the header ([`HEADER_LEN`] bytes; unused string bytes are zero).
    /// Fails only if a string field does not fit its slot (cipher_name, cipher_mode
    /// and hash_spec at most 31 bytes, uuid at most 40) or is not printable ASCII.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; HEADER_LEN];
        out[..6].copy_from_slice(&MAGIC);
        out[6..8].copy_from_slice(&VERSION.to_be_bytes());
        put_string(&mut out[8..40], &self.cipher_name, "cipher_name", true)?;
        put_string(&mut out[40..72], &self.cipher_mode, "cipher_mode", true)?;
        put_string(&mut out[72..104], &self.hash_spec, "hash_spec", true)?;
        out[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        out[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        out[112..132].copy_from_slice(&self.mk_digest);
        out[132..164].copy_from_slice(&self.mk_digest_salt);
        out[164..168].copy_from_slice(&self.mk_digest_iterations.to_be_bytes());
        put_string(&mut out[168..208], &self.uuid, "uuid", false)?;
        for (i, s) in self.slots.iter().enumerate() {
            let b = &mut out[208 + i * 48..208 + (i + 1) * 48];
            let state = if s.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            b[0..4].copy_from_slice(&state.to_be_bytes());
            b[4..8].copy_from_slice(&s.iterations.to_be_bytes());
            b[8..40].copy_from_slice(&s.salt);
            b[40..44].copy_from_slice(&s.key_material_offset.to_be_bytes());
            b[44..48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        Ok(out)
    }

    /// Number of active key slots.
    pub fn active_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.active).count()
    }

    /// End (in bytes from the start of the area) of the key material of the
    /// active slots: the least a caller must read to unlock. 592 with no active slot.
    pub fn key_material_end(&self) -> u64 {
        self.slots
            .iter()
            .filter(|s| s.active)
            .map(|s| s.material_range(self.key_bytes).end)
            .max()
            .unwrap_or(HEADER_LEN as u64)
            .max(HEADER_LEN as u64)
    }
}

fn check_iterations(n: u32, field: &str) -> Result<()> {
    if n == 0 {
        return Err(corrupt!("LUKS header {field} is 0"));
    }
    if n > MAX_ITERATIONS {
        return Err(unsupported!(
            "LUKS header {field} {n} exceeds the limit {MAX_ITERATIONS} (refused to bound the work of an open)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn sample() -> LuksHeader {
        let split = key_material_sectors(64, DEFAULT_STRIPES) as u32;
        let mut slots: [KeySlot; NUM_SLOTS] =
            std::array::from_fn(|i| KeySlot::empty(HEADER_SECTORS + i as u32 * split));
        slots[0].active = true;
        slots[0].iterations = 1000;
        slots[0].salt = [7; SALT_LEN];
        LuksHeader {
            cipher_name: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            hash_spec: "sha256".into(),
            payload_offset: HEADER_SECTORS + 8 * split,
            key_bytes: 64,
            mk_digest: [1; DIGEST_LEN],
            mk_digest_salt: [2; SALT_LEN],
            mk_digest_iterations: 1000,
            uuid: "5ff1364d-ba95-46bf-b67c-cc85d41ffebf".into(),
            slots,
        }
    }

    #[test]
    fn roundtrip() {
        let h = sample();
        let b = h.serialize().unwrap();
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(LuksHeader::parse(&b).unwrap(), h);
        assert_eq!(h.payload_offset, 4040);
        assert_eq!(h.slots[7].key_material_offset, 8 + 7 * 504);
        assert_eq!(h.key_material_end(), 4096 + 64 * 4000);
    }

    fn expect(buf: &[u8], kind: &str, words: &str) {
        match LuksHeader::parse(buf) {
            Ok(_) => panic!("accepted a header that should fail with {words}"),
            Err(e) => {
                let ok = matches!(
                    (&e, kind),
                    (Error::Corrupt(_), "corrupt") | (Error::Unsupported(_), "unsupported")
                );
                assert!(ok, "wrong error kind for {words}: {e}");
                assert!(e.to_string().contains(words), "{e} lacks {words}");
            }
        }
    }

    #[test]
    fn malformed_headers() {
        let good = sample().serialize().unwrap();
        let set32 = |off: usize, v: u32| {
            let mut b = good.clone();
            b[off..off + 4].copy_from_slice(&v.to_be_bytes());
            b
        };
        expect(&good[..591], "corrupt", "truncated");
        expect(&[], "corrupt", "truncated");
        let mut b = good.clone();
        b[4] = 0xbb;
        expect(&b, "corrupt", "magic");
        let mut b = good.clone();
        b[7] = 2;
        expect(&b, "unsupported", "version 2");
        expect(&set32(108, 0), "corrupt", "key_bytes is 0");
        expect(&set32(108, 0x1000_0000), "corrupt", "key_bytes 268435456");
        expect(&set32(164, 0), "corrupt", "mk_digest_iterations is 0");
        expect(
            &set32(164, u32::MAX),
            "unsupported",
            "mk_digest_iterations 4294967295",
        );
        let slot0 = 208;
        expect(&set32(slot0, 0x1234), "corrupt", "state 0x00001234");
        expect(
            &set32(slot0 + 4, 0),
            "corrupt",
            "key slot 0 iterations is 0",
        );
        expect(
            &set32(slot0 + 4, MAX_ITERATIONS + 1),
            "unsupported",
            "key slot 0 iterations 134217729",
        );
        expect(&set32(slot0 + 44, 0), "corrupt", "stripes is 0");
        expect(
            &set32(slot0 + 44, 1 << 21),
            "unsupported",
            "stripes 2097152",
        );
        // A slot whose material would run past the payload / off the area.
        expect(
            &set32(208 + 7 * 48 + 40, 4000),
            "corrupt",
            "key slot 7 key material",
        );
        expect(&set32(208 + 3 * 48 + 40, u32::MAX), "corrupt", "key slot 3");
        // Overlapping slots and material on top of the header.
        expect(&set32(208 + 48 + 40, 8), "corrupt", "overlapping");
        expect(&set32(slot0 + 40, 0), "corrupt", "overlaps the header");
        // Stripes that make the material run into the next slot.
        expect(&set32(slot0 + 44, 5000), "corrupt", "overlapping");
        // Strings.
        let mut b = good.clone();
        b[8..40].fill(b'a');
        expect(&b, "corrupt", "cipher_name is not NUL-terminated");
        let mut b = good.clone();
        b[41] = 0x01;
        expect(&b, "corrupt", "cipher_mode holds a non-printable byte 0x01");
        // The codec accepts other cipher names (the crypto layer refuses them).
        let mut h = sample();
        h.cipher_name = "twofish".into();
        let b = h.serialize().unwrap();
        assert_eq!(LuksHeader::parse(&b).unwrap().cipher_name, "twofish");
    }

    #[test]
    fn inactive_slots_need_no_iterations() {
        let h = sample();
        assert_eq!(h.slots[1].iterations, 0);
        assert!(LuksHeader::parse(&h.serialize().unwrap()).is_ok());
    }

    #[test]
    fn serialize_refuses_long_strings() {
        let mut h = sample();
        h.cipher_mode = "x".repeat(32);
        assert!(matches!(h.serialize(), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn debug_hides_salts() {
        let s = format!("{:?}", sample());
        assert!(!s.contains("salt"), "{s}");
    }
}
