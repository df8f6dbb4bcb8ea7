//! QEMU's `encrypt.*` option names and values (`qemu-img create -o
//! encrypt.cipher-alg=aes-128,…`), turned into [`LuksCreateOptions`].

use super::{IvGen, LuksCreateOptions};
use crate::error::{Error, Result};

/// Builds LUKS create options from QEMU's option names without the `encrypt.` prefix
/// (`cipher-alg`, `cipher-mode`, `ivgen-alg`, `ivgen-hash-alg`, `hash-alg`,
/// `iter-time` in milliseconds), in any order; what is not given keeps QEMU's
/// default. Values are parsed by the crypto types' own `FromStr`/`IvGen::from_qemu`:
/// ciphers other than AES are refused by name.
pub fn luks_options_from_qemu(pairs: &[(&str, &str)]) -> Result<LuksCreateOptions> {
    let mut out = LuksCreateOptions::default();
    let (mut ivgen_alg, mut ivgen_hash) = (None, None);
    for &(key, value) in pairs {
        match key {
            "cipher-alg" => out.cipher = value.parse()?,
            "cipher-mode" => out.mode = value.parse()?,
            "ivgen-alg" => ivgen_alg = Some(value),
            "ivgen-hash-alg" => ivgen_hash = Some(value),
            "hash-alg" => out.hash = value.parse()?,
            "iter-time" => {
                out.iter_time_ms = value.parse().map_err(|_| {
                    Error::InvalidArgument(format!("iter-time '{value}' is not a number of ms"))
                })?
            }
            k => {
                return Err(Error::InvalidArgument(format!(
                    "unknown encryption option 'encrypt.{k}'"
                )))
            }
        }
    }
    if let Some(alg) = ivgen_alg {
        out.ivgen = IvGen::from_qemu(alg, ivgen_hash)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{CipherAlg, CipherMode, HashAlg};

    #[test]
    fn qemu_names_map_to_options() {
        let o = luks_options_from_qemu(&[
            ("ivgen-hash-alg", "sha1"),
            ("cipher-alg", "aes-128"),
            ("cipher-mode", "cbc"),
            ("ivgen-alg", "essiv"),
            ("iter-time", "10"),
        ])
        .unwrap();
        assert_eq!(o.cipher, CipherAlg::Aes128);
        assert_eq!(o.mode, CipherMode::Cbc);
        assert_eq!(o.ivgen, IvGen::Essiv(HashAlg::Sha1));
        assert_eq!(o.iter_time_ms, 10);
        let e = luks_options_from_qemu(&[("cipher-alg", "twofish-256")]).unwrap_err();
        assert!(e.to_string().contains("twofish-256"), "{e}");
        assert!(luks_options_from_qemu(&[("bogus", "1")]).is_err());
    }
}
