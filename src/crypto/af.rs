//! The LUKS anti-forensic information splitter (AF split / merge): the master key is
//! stored as `stripes` blocks of its length, all but the last random; merging XORs
//! each block into an accumulator and diffuses it with the hash, and the last block
//! XOR the accumulator is the key. Losing any stripe loses the key.

use sha2::Digest;
use zeroize::Zeroizing;

use super::HashAlg;
use crate::error::Result;

/// The diffusion step: the block is cut in digest-sized pieces (the last may be
/// shorter) and piece `i` is replaced by the first bytes of
/// `H(be32(i) || piece)`.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    fn run<D: Digest>(block: &mut [u8], dl: usize) {
        for (i, piece) in block.chunks_mut(dl).enumerate() {
            let mut h = D::new();
            h.update((i as u32).to_be_bytes());
            h.update(&*piece);
            let mut d = h.finalize();
            let n = piece.len();
            piece.copy_from_slice(&d[..n]);
            d.iter_mut().for_each(|b| *b = 0);
        }
    }
    let dl = hash.digest_len();
    match hash {
        HashAlg::Sha1 => run::<sha1::Sha1>(block, dl),
        HashAlg::Sha256 => run::<sha2::Sha256>(block, dl),
        HashAlg::Sha512 => run::<sha2::Sha512>(block, dl),
    }
}

fn xor_into(acc: &mut [u8], x: &[u8]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a ^= b);
}

/// Recovers the key from `material` (`stripes` blocks of `key_len` bytes; the
/// caller checked the length).
pub(super) fn merge(
    hash: HashAlg,
    key_len: usize,
    stripes: usize,
    material: &[u8],
) -> Zeroizing<Vec<u8>> {
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    let mut blocks = material.chunks_exact(key_len).take(stripes);
    for _ in 1..stripes {
        if let Some(b) = blocks.next() {
            xor_into(&mut acc, b);
            diffuse(hash, &mut acc);
        }
    }
    if let Some(last) = blocks.next() {
        xor_into(&mut acc, last);
    }
    acc
}

/// Splits `key` into `stripes` blocks, the first `stripes - 1` from `random`.
pub(super) fn split(
    hash: HashAlg,
    key: &[u8],
    stripes: usize,
    random: impl Fn(&mut [u8]) -> Result<()>,
) -> Result<Zeroizing<Vec<u8>>> {
    if stripes == 0 {
        return Err(crate::invalid!("anti-forensic split into 0 stripes"));
    }
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    let mut acc = Zeroizing::new(vec![0u8; n]);
    for i in 0..stripes.saturating_sub(1) {
        let b = &mut out[i * n..(i + 1) * n];
        random(b)?;
        xor_into(&mut acc, b);
        diffuse(hash, &mut acc);
    }
    let last = &mut out[(stripes - 1) * n..];
    last.copy_from_slice(key);
    xor_into(last, &acc);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_merge_round_trip() {
        let key: Vec<u8> = (0..64u8).collect();
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            for (len, stripes) in [(16, 1), (20, 2), (24, 7), (32, 4000), (64, 13)] {
                let k = &key[..len];
                let s = split(hash, k, stripes, super::super::random_bytes).unwrap();
                assert_eq!(s.len(), len * stripes);
                assert_eq!(
                    &merge(hash, len, stripes, &s)[..],
                    k,
                    "{hash} {len} {stripes}"
                );
                if stripes > 1 {
                    let mut bad = s.clone();
                    bad[3] ^= 1;
                    assert_ne!(&merge(hash, len, stripes, &bad)[..], k);
                }
            }
        }
    }

    /// With stripes 2 and a zero first stripe, the key is the second stripe XOR
    /// the diffusion of zeros: H(be32(0) || 0^n) for a one-piece block.
    #[test]
    fn diffusion_definition() {
        let mut material = vec![0u8; 64];
        material[32..].fill(0xff);
        let k = merge(HashAlg::Sha256, 32, 2, &material);
        let mut h = sha2::Sha256::new();
        h.update([0u8; 4]);
        h.update([0u8; 32]);
        let d = h.finalize();
        let want: Vec<u8> = d.iter().map(|b| b ^ 0xff).collect();
        assert_eq!(&k[..], &want[..]);
    }
}
