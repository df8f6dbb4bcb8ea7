//! LUKS1 key handling: information, unlocking and creation of a LUKS area.

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::data::DataCipher;
use super::{af, c_string, kdf, random_bytes, CipherAlg, CipherMode, CipherSpec, HashAlg, IvGen};
use crate::error::{Error, Result};
use crate::format::luks::{
    key_material_sectors, KeySlot, LuksHeader, DEFAULT_STRIPES, DIGEST_LEN, HEADER_LEN,
    HEADER_SECTORS, MAX_ITERATIONS, NUM_SLOTS, SALT_LEN, SECTOR_SIZE,
};
use crate::{corrupt, invalid, unsupported};

/// Most PBKDF2 work one [`luks_unlock`] call does before giving up, in HMAC
/// blocks (2^28: about 36 s of one core at 7.4 million HMAC-SHA256 blocks a second;
/// a slot costs its iterations × the blocks of a key_bytes output, plus the
/// master-key digest's iterations). Key slots are tried in order while the total
/// stays within it, so a header with eight slots of huge iteration counts is
/// refused after bounded work instead of keeping the caller for hours; a QEMU image
/// with its default 2 s per slot needs a few percent of it per slot.
pub const MAX_UNLOCK_WORK: u64 = 1 << 28;

/// QEMU's defaults and minimums.
const DEFAULT_ITER_TIME_MS: u32 = 2000;
const MIN_SLOT_ITERATIONS: u64 = 1000;
const MIN_MK_ITERATIONS: u64 = 1000;

/// One key slot as `qemu-img info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksSlotInfo {
    /// The slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations (active slots only, as QEMU shows them).
    pub iters: Option<u32>,
    /// Anti-forensic stripes (active slots only).
    pub stripes: Option<u32>,
    /// Offset of the key material in bytes from the start of the LUKS area.
    pub key_offset: u64,
}

/// What `qemu-img info` shows of a LUKS area (`format-specific.data.encrypt`, with
/// `"format": "luks"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksInfo {
    /// `cipher-alg`: `aes-256`.
    pub cipher_alg: CipherAlg,
    /// `cipher-mode`: `xts`.
    pub cipher_mode: CipherMode,
    /// `ivgen-alg`: `plain64` (its name; the ESSIV hash is `ivgen_hash_alg`).
    pub ivgen_alg: IvGen,
    /// `ivgen-hash-alg`: only for essiv.
    pub ivgen_hash_alg: Option<HashAlg>,
    /// `hash-alg`: the PBKDF2 and anti-forensic hash.
    pub hash_alg: HashAlg,
    /// `payload-offset`, in bytes (for qcow2, the length of the LUKS area).
    pub payload_offset: u64,
    /// `master-key-iters`.
    pub master_key_iters: u32,
    /// `uuid`.
    pub uuid: String,
    /// `slots`, all eight.
    pub slots: Vec<LuksSlotInfo>,
    /// `detached-header`: always false for a header inside the image (QEMU 10
    /// prints it for qcow2 too).
    pub detached_header: bool,
}

impl LuksInfo {
    /// The JSON object `qemu-img info --output=json` prints under
    /// `format-specific.data.encrypt`, `"format": "luks"` included.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let mut m = Map::new();
        m.insert("format".into(), json!("luks"));
        m.insert("cipher-alg".into(), json!(self.cipher_alg.name()));
        m.insert("cipher-mode".into(), json!(self.cipher_mode.name()));
        m.insert("ivgen-alg".into(), json!(self.ivgen_alg.name()));
        if let Some(h) = self.ivgen_hash_alg {
            m.insert("ivgen-hash-alg".into(), json!(h.name()));
        }
        m.insert("hash-alg".into(), json!(self.hash_alg.name()));
        m.insert("detached-header".into(), json!(self.detached_header));
        m.insert("payload-offset".into(), json!(self.payload_offset));
        m.insert("master-key-iters".into(), json!(self.master_key_iters));
        m.insert("uuid".into(), json!(self.uuid));
        let slots = self
            .slots
            .iter()
            .map(|s| {
                let mut o = Map::new();
                o.insert("active".into(), json!(s.active));
                if let Some(i) = s.iters {
                    o.insert("iters".into(), json!(i));
                }
                if let Some(st) = s.stripes {
                    o.insert("stripes".into(), json!(st));
                }
                o.insert("key-offset".into(), json!(s.key_offset));
                Value::Object(o)
            })
            .collect();
        m.insert("slots".into(), Value::Array(slots));
        Value::Object(m)
    }
}

/// The parsed header with its cipher and hash.
struct Parsed {
    header: LuksHeader,
    spec: CipherSpec,
    hash: HashAlg,
}

fn parse(area: &[u8]) -> Result<Parsed> {
    let header = LuksHeader::parse(area)?;
    let spec = CipherSpec::from_luks(&header.cipher_name, &header.cipher_mode, header.key_bytes)?;
    let hash: HashAlg = header.hash_spec.parse()?;
    Ok(Parsed { header, spec, hash })
}

/// What `qemu-img info` shows of the LUKS area `area` (only the 592-byte header is
/// read, so `area` may be just that). No passphrase needed. Errors as
/// [`LuksHeader::parse`], and [`Error::Unsupported`] for ciphers, modes and hashes
/// this crate does not implement.
pub fn luks_info(area: &[u8]) -> Result<LuksInfo> {
    let Parsed { header, spec, hash } = parse(area)?;
    Ok(LuksInfo {
        cipher_alg: spec.alg,
        cipher_mode: spec.mode,
        ivgen_alg: spec.ivgen,
        ivgen_hash_alg: spec.ivgen.hash(),
        hash_alg: hash,
        payload_offset: header.payload_offset as u64 * SECTOR_SIZE,
        master_key_iters: header.mk_digest_iterations,
        uuid: header.uuid.clone(),
        slots: header
            .slots
            .iter()
            .map(|s| LuksSlotInfo {
                active: s.active,
                iters: s.active.then_some(s.iterations),
                stripes: s.active.then_some(s.stripes),
                key_offset: s.key_material_offset as u64 * SECTOR_SIZE,
            })
            .collect(),
        detached_header: false,
    })
}

/// Unlocks the LUKS area `area` (as stored in the image: the header, then the key
/// material; the qcow2 extension 0x0537be77 gives its offset and length) with
/// `passphrase` and returns the data cipher.
///
/// Each active slot is tried in order: PBKDF2(hash, passphrase, slot salt, slot
/// iterations) gives the slot key; the slot's key material is decrypted with the
/// image's cipher, mode and IV generator keyed by it (IV sectors counted from 0 at
/// the start of the slot's material); the anti-forensic merge gives a candidate
/// master key, whose PBKDF2 digest is compared in constant time with the header's.
///
/// Errors: [`Error::KeyRejected`] when no active slot accepts the passphrase (or
/// none is active); [`Error::Corrupt`] for a malformed header or key material that
/// lies outside `area`; [`Error::Unsupported`] for unimplemented algorithms, or once
/// trying the next slot would exceed [`MAX_UNLOCK_WORK`].
pub fn luks_unlock(area: &[u8], passphrase: &[u8]) -> Result<DataCipher> {
    let Parsed { header, spec, hash } = parse(area)?;
    let pass = c_string(passphrase);
    let key_len = header.key_bytes as usize;
    let active = header.active_slots();
    if active == 0 {
        return Err(Error::KeyRejected(
            "the LUKS header has no active key slot: no passphrase can open it".into(),
        ));
    }
    for (i, slot) in header.slots.iter().enumerate().filter(|(_, s)| s.active) {
        let r = slot.material_range(header.key_bytes);
        if r.end > area.len() as u64 {
            return Err(corrupt!(
                "LUKS key slot {i} key material (bytes {}..{}) lies outside the {}-byte LUKS area",
                r.start,
                r.end,
                area.len()
            ));
        }
        if !(r.end - r.start).is_multiple_of(16) {
            return Err(corrupt!(
                "LUKS key slot {i} key material of {} bytes is not a whole number of AES blocks",
                r.end - r.start
            ));
        }
    }
    let slot_blocks = kdf::blocks(hash, key_len);
    let mk_blocks = kdf::blocks(hash, DIGEST_LEN);
    let mut work: u64 = 0;
    for (i, slot) in header.slots.iter().enumerate().filter(|(_, s)| s.active) {
        let cost =
            slot.iterations as u64 * slot_blocks + header.mk_digest_iterations as u64 * mk_blocks;
        if work + cost > MAX_UNLOCK_WORK {
            return Err(unsupported!(
                "giving up before LUKS key slot {i}: its PBKDF2 work ({} iterations) would bring this unlock to {} HMAC blocks, above the limit {MAX_UNLOCK_WORK}",
                slot.iterations,
                work + cost
            ));
        }
        work += cost;
        if let Some(mk) = try_slot(&header, spec, hash, slot, area, pass)? {
            return DataCipher::new(spec, &mk);
        }
    }
    Err(Error::KeyRejected(format!(
        "the passphrase opens none of the image's {active} active LUKS key slot{}",
        if active == 1 { "" } else { "s" }
    )))
}

/// The master key if `pass` opens `slot`.
fn try_slot(
    header: &LuksHeader,
    spec: CipherSpec,
    hash: HashAlg,
    slot: &KeySlot,
    area: &[u8],
    pass: &[u8],
) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let key_len = header.key_bytes as usize;
    let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
    kdf::pbkdf2(hash, pass, &slot.salt, slot.iterations, &mut slot_key);
    let r = slot.material_range(header.key_bytes);
    let mut material = Zeroizing::new(area[r.start as usize..r.end as usize].to_vec());
    DataCipher::new(spec, &slot_key)?.process_material(&mut material, false)?;
    let mk = af::merge(hash, key_len, slot.stripes as usize, &material);
    let mut digest = Zeroizing::new([0u8; DIGEST_LEN]);
    kdf::pbkdf2(
        hash,
        &mk,
        &header.mk_digest_salt,
        header.mk_digest_iterations,
        &mut digest[..],
    );
    if bool::from(digest.ct_eq(&header.mk_digest)) {
        Ok(Some(mk))
    } else {
        Ok(None)
    }
}

/// How to create a LUKS area; [`Default`] is QEMU's default (aes-256, xts,
/// plain64, sha256, 2000 ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksCreateOptions {
    /// `encrypt.cipher-alg`.
    pub cipher: CipherAlg,
    /// `encrypt.cipher-mode`.
    pub mode: CipherMode,
    /// `encrypt.ivgen-alg` (and `encrypt.ivgen-hash-alg` for essiv).
    pub ivgen: IvGen,
    /// `encrypt.hash-alg`: PBKDF2 and anti-forensic hash.
    pub hash: HashAlg,
    /// `encrypt.iter-time`: milliseconds of PBKDF2 to spend opening the slot; 0
    /// means QEMU's default, 2000.
    pub iter_time_ms: u32,
}

impl Default for LuksCreateOptions {
    fn default() -> Self {
        LuksCreateOptions {
            cipher: CipherAlg::Aes256,
            mode: CipherMode::Xts,
            ivgen: IvGen::Plain64,
            hash: HashAlg::Sha256,
            iter_time_ms: DEFAULT_ITER_TIME_MS,
        }
    }
}

impl LuksCreateOptions {
    /// Cipher, mode and IV generator.
    pub fn spec(&self) -> CipherSpec {
        CipherSpec {
            alg: self.cipher,
            mode: self.mode,
            ivgen: self.ivgen,
        }
    }
}

/// Where QEMU puts things in a LUKS area it creates: the header in the first 4096
/// bytes (8 sectors), then eight key material areas of `key_bytes * 4000` bytes
/// each rounded up to a multiple of 8 sectors, then the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksLayout {
    /// Master key length (both XTS halves).
    pub key_bytes: u32,
    /// Anti-forensic stripes per slot (4000).
    pub stripes: u32,
    /// Sectors reserved for each slot's key material.
    pub key_material_sectors: u32,
    /// Each slot's key material offset, in sectors.
    pub slot_offsets: [u32; NUM_SLOTS],
    /// Payload offset in sectors: the area's length.
    pub payload_offset: u32,
}

impl LuksLayout {
    /// The layout for a cipher spec.
    pub fn for_spec(spec: &CipherSpec) -> LuksLayout {
        let key_bytes = spec.key_len() as u32;
        let per = key_material_sectors(key_bytes, DEFAULT_STRIPES) as u32;
        LuksLayout {
            key_bytes,
            stripes: DEFAULT_STRIPES,
            key_material_sectors: per,
            slot_offsets: std::array::from_fn(|i| HEADER_SECTORS + i as u32 * per),
            payload_offset: HEADER_SECTORS + NUM_SLOTS as u32 * per,
        }
    }

    /// Length of the LUKS area in bytes: what QEMU stores as the length in the
    /// qcow2 extension 0x0537be77 (QEMU then allocates it rounded up to clusters
    /// and zero-fills the rest).
    pub fn area_len(&self) -> u64 {
        self.payload_offset as u64 * SECTOR_SIZE
    }
}

/// Length in bytes of the LUKS area [`luks_create`] makes for `spec` (2,068,480 for
/// QEMU's default aes-256-xts: 4040 sectors).
pub fn luks_area_len(spec: &CipherSpec) -> u64 {
    LuksLayout::for_spec(spec).area_len()
}

/// Scales QEMU's count (iterations per second of an `nblocks` output) to
/// `iter_time_ms`, as QEMU does: `iters * iter_time / 1000`.
fn scale(per_second: u64, iter_time_ms: u32) -> Result<u64> {
    per_second
        .checked_mul(iter_time_ms as u64)
        .map(|v| v / 1000)
        .ok_or_else(|| invalid!("PBKDF2 iterations {per_second} too large to scale"))
}

/// Creates a LUKS area as QEMU does: a random master key, salts and UUID from the
/// OS, key slot 0 holding the master key under `passphrase`, slots 1–7 empty (with
/// their offsets and 4000 stripes), the layout of [`LuksLayout`]. Returns the area as
/// it must be stored (header, zeros, slot 0's key material, zeros; its length is
/// [`luks_area_len`], what QEMU stores in the extension) and the data cipher of the
/// new master key.
///
/// Iterations are calibrated like QEMU: PBKDF2 iterations per second of thread CPU
/// time are measured (see below), the slot gets `rate(key_bytes output) × iter_time
/// / 1000` (at least 1000) and the master-key digest `rate(20-byte output) ×
/// iter_time / 1000 / 8` (at least 1000). Where QEMU measures twice (once per
/// output length, ≥ 0.5 s each), this measures a one-block output once and divides
/// by the number of HMAC blocks of each output, which is what the second
/// measurement would find. Counts above [`MAX_ITERATIONS`] (which
/// [`luks_unlock`] would refuse) are an [`Error::InvalidArgument`].
///
/// aes-192-cbc is [`Error::Unsupported`]: its 96,000 bytes of key material are not
/// whole sectors, and QEMU 10 aborts on such images (an assertion in its sector
/// loop), so it could not open what we made.
pub fn luks_create(opts: &LuksCreateOptions, passphrase: &[u8]) -> Result<(Vec<u8>, DataCipher)> {
    let spec = opts.spec();
    spec.validate()?;
    let layout = LuksLayout::for_spec(&spec);
    let material_len = layout.key_bytes as usize * layout.stripes as usize;
    if !material_len.is_multiple_of(SECTOR_SIZE as usize) {
        return Err(unsupported!(
            "creating {spec}: its {material_len} bytes of key material are not whole 512-byte sectors, which QEMU cannot open"
        ));
    }
    let pass = c_string(passphrase);
    let hash = opts.hash;
    let iter_time = if opts.iter_time_ms == 0 {
        DEFAULT_ITER_TIME_MS
    } else {
        opts.iter_time_ms
    };
    let key_len = layout.key_bytes as usize;

    let mut mk = Zeroizing::new(vec![0u8; key_len]);
    random_bytes(&mut mk)?;
    let mut mk_salt = [0u8; SALT_LEN];
    random_bytes(&mut mk_salt)?;
    let mut slot_salt = [0u8; SALT_LEN];
    random_bytes(&mut slot_salt)?;
    let uuid = random_uuid()?;

    // QEMU measures for 500 ms; a quarter of a shorter iter-time is precise enough.
    let window_ms = (u64::from(iter_time) / 4).clamp(20, 500);
    let rate = kdf::iterations_per_second(hash, pass, &slot_salt, window_ms);
    let slot_iters =
        (scale(rate / kdf::blocks(hash, key_len), iter_time)?).max(MIN_SLOT_ITERATIONS);
    let mk_iters =
        (scale(rate / kdf::blocks(hash, DIGEST_LEN), iter_time)? / 8).max(MIN_MK_ITERATIONS);
    for (what, n) in [("key slot", slot_iters), ("master-key digest", mk_iters)] {
        if n > MAX_ITERATIONS as u64 {
            return Err(invalid!(
                "iter-time {iter_time} ms needs {n} PBKDF2 iterations for the {what}, above the {MAX_ITERATIONS} this library opens"
            ));
        }
    }

    let mut mk_digest = [0u8; DIGEST_LEN];
    kdf::pbkdf2(hash, &mk, &mk_salt, mk_iters as u32, &mut mk_digest);

    let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
    kdf::pbkdf2(hash, pass, &slot_salt, slot_iters as u32, &mut slot_key);
    let mut material = af::split(hash, &mk, layout.stripes as usize, random_bytes)?;
    DataCipher::new(spec, &slot_key)?.process_material(&mut material, true)?;

    let mut slots: [KeySlot; NUM_SLOTS] =
        std::array::from_fn(|i| KeySlot::empty(layout.slot_offsets[i]));
    slots[0].active = true;
    slots[0].iterations = slot_iters as u32;
    slots[0].salt = slot_salt;
    let header = LuksHeader {
        cipher_name: "aes".into(),
        cipher_mode: spec.luks_mode(),
        hash_spec: hash.name().into(),
        payload_offset: layout.payload_offset,
        key_bytes: layout.key_bytes,
        mk_digest,
        mk_digest_salt: mk_salt,
        mk_digest_iterations: mk_iters as u32,
        uuid,
        slots,
    };
    let mut area = vec![0u8; layout.area_len() as usize];
    area[..HEADER_LEN].copy_from_slice(&header.serialize()?);
    let start = layout.slot_offsets[0] as usize * SECTOR_SIZE as usize;
    area[start..start + material.len()].copy_from_slice(&material);
    let cipher = DataCipher::new(spec, &mk)?;
    Ok((area, cipher))
}

/// A random (version 4) UUID in its lowercase hyphenated form, as QEMU writes it.
fn random_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    random_bytes(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast(cipher: CipherAlg, mode: CipherMode, ivgen: IvGen, hash: HashAlg) -> LuksCreateOptions {
        LuksCreateOptions {
            cipher,
            mode,
            ivgen,
            hash,
            iter_time_ms: 1,
        }
    }

    #[test]
    fn default_layout_matches_qemu() {
        let l = LuksLayout::for_spec(&LuksCreateOptions::default().spec());
        assert_eq!(l.key_bytes, 64);
        assert_eq!(l.key_material_sectors, 504);
        assert_eq!(l.slot_offsets[1], 512);
        assert_eq!(l.payload_offset, 4040);
        assert_eq!(l.area_len(), 2_068_480);
        let aes128cbc = CipherSpec {
            alg: CipherAlg::Aes128,
            mode: CipherMode::Cbc,
            ivgen: IvGen::Plain64,
        };
        assert_eq!(luks_area_len(&aes128cbc), (8 + 8 * 128) * 512);
    }

    #[test]
    fn create_then_unlock() {
        // One combination per mode/size/hash (each create calibrates: ~0.5-1 s).
        for opts in [
            fast(
                CipherAlg::Aes256,
                CipherMode::Xts,
                IvGen::Plain64,
                HashAlg::Sha256,
            ),
            fast(
                CipherAlg::Aes128,
                CipherMode::Cbc,
                IvGen::Essiv(HashAlg::Sha256),
                HashAlg::Sha1,
            ),
            fast(
                CipherAlg::Aes192,
                CipherMode::Xts,
                IvGen::Plain,
                HashAlg::Sha512,
            ),
        ] {
            let (area, cipher) = luks_create(&opts, b"secret").unwrap();
            assert_eq!(area.len() as u64, luks_area_len(&opts.spec()));
            let info = luks_info(&area).unwrap();
            assert_eq!(info.cipher_alg, opts.cipher);
            assert_eq!(info.ivgen_alg, opts.ivgen);
            assert_eq!(info.hash_alg, opts.hash);
            assert!(info.slots[0].active && !info.slots[1].active);
            assert!(info.slots[0].iters.unwrap() >= 1000);
            assert!(info.master_key_iters >= 1000);
            let opened = luks_unlock(&area, b"secret").unwrap();
            let mut a = vec![0x42u8; 4096];
            let mut b = a.clone();
            cipher.encrypt(99, &mut a).unwrap();
            opened.encrypt(99, &mut b).unwrap();
            assert_eq!(a, b);
            // NUL ends a passphrase, as in QEMU.
            luks_unlock(&area, b"secret\0ignored").unwrap();
            match luks_unlock(&area, b"wrong") {
                Err(Error::KeyRejected(m)) => assert!(m.contains("1 active"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn refuses_aes192_cbc_and_essiv_sha1() {
        let e = luks_create(
            &fast(
                CipherAlg::Aes192,
                CipherMode::Cbc,
                IvGen::Plain64,
                HashAlg::Sha256,
            ),
            b"x",
        )
        .unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        let e = luks_create(
            &fast(
                CipherAlg::Aes128,
                CipherMode::Cbc,
                IvGen::Essiv(HashAlg::Sha1),
                HashAlg::Sha256,
            ),
            b"x",
        )
        .unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
    }

    /// Headers crafted to cost: eight slots at the iteration limit are refused by the
    /// work bound at once (no PBKDF2 runs: the first slot alone is over it).
    #[test]
    fn bounded_work() {
        let layout = LuksLayout::for_spec(&LuksCreateOptions::default().spec());
        let mut slots: [KeySlot; NUM_SLOTS] =
            std::array::from_fn(|i| KeySlot::empty(layout.slot_offsets[i]));
        for s in slots.iter_mut() {
            s.active = true;
            s.iterations = MAX_ITERATIONS;
        }
        let h = LuksHeader {
            cipher_name: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            hash_spec: "sha256".into(),
            payload_offset: layout.payload_offset,
            key_bytes: 64,
            mk_digest: [0; DIGEST_LEN],
            mk_digest_salt: [0; SALT_LEN],
            mk_digest_iterations: MAX_ITERATIONS,
            uuid: String::new(),
            slots,
        };
        let mut area = vec![0u8; layout.area_len() as usize];
        area[..HEADER_LEN].copy_from_slice(&h.serialize().unwrap());
        let t = std::time::Instant::now();
        let e = luks_unlock(&area, b"x").unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("key slot 0"), "{e}");
        assert!(t.elapsed().as_secs() < 2);
        // Key material outside the area: Corrupt, before any PBKDF2.
        let e = luks_unlock(&area[..100_000], b"x").unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e}");
        // No active slot.
        let mut h2 = h.clone();
        h2.slots.iter_mut().for_each(|s| s.active = false);
        area[..HEADER_LEN].copy_from_slice(&h2.serialize().unwrap());
        assert!(matches!(
            luks_unlock(&area, b"x"),
            Err(Error::KeyRejected(_))
        ));
        // Unsupported cipher in an otherwise valid header.
        let mut h3 = h2.clone();
        h3.cipher_name = "twofish".into();
        area[..HEADER_LEN].copy_from_slice(&h3.serialize().unwrap());
        let e = luks_info(&area).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains("twofish"));
    }

    #[test]
    fn uuid_form() {
        let u = random_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_eq!(u.matches('-').count(), 4);
    }
}
