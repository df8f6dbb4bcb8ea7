//! QEMU's `encrypt.*` option names and values (`qemu-img create -o
//! encrypt.cipher-alg=aes-128,…`), turned into [`LuksCreateOptions`].

use super::{CipherAlg, CipherMode, HashAlg, IvGen, LuksCreateOptions};
use crate::error::{Error, Result};

fn hash(value: &str, what: &str) -> Result<HashAlg> {
    match value {
        "sha1" => Ok(HashAlg::Sha1),
        "sha256" => Ok(HashAlg::Sha256),
        "sha512" => Ok(HashAlg::Sha512),
        "md5" | "sha224" | "sha384" | "ripemd160" => Err(Error::Unsupported(format!(
            "{what} '{value}' (cowdisk supports sha1, sha256 and sha512)"
        ))),
        _ => Err(Error::InvalidArgument(format!("unknown {what} '{value}'"))),
    }
}

/// Builds LUKS create options from QEMU's option names without the `encrypt.` prefix
/// (`cipher-alg`, `cipher-mode`, `ivgen-alg`, `ivgen-hash-alg`, `hash-alg`,
/// `iter-time` in milliseconds), in any order; what is not given keeps QEMU's
/// default. Ciphers other than AES are refused by name.
pub fn luks_options_from_qemu(pairs: &[(&str, &str)]) -> Result<LuksCreateOptions> {
    let mut out = LuksCreateOptions::default();
    let mut ivgen_alg: Option<&str> = None;
    let mut ivgen_hash = HashAlg::Sha256;
    for &(key, value) in pairs {
        match key {
            "cipher-alg" => {
                out.cipher = match value {
                    "aes-128" => CipherAlg::Aes128,
                    "aes-192" => CipherAlg::Aes192,
                    "aes-256" => CipherAlg::Aes256,
                    v if v.starts_with("twofish")
                        || v.starts_with("serpent")
                        || v.starts_with("cast5")
                        || v.starts_with("sm4")
                        || v.starts_with("des") =>
                    {
                        return Err(Error::Unsupported(format!(
                            "cipher '{v}' (cowdisk supports aes-128, aes-192 and aes-256)"
                        )))
                    }
                    v => return Err(Error::InvalidArgument(format!("unknown cipher-alg '{v}'"))),
                }
            }
            "cipher-mode" => {
                out.mode = match value {
                    "xts" => CipherMode::Xts,
                    "cbc" => CipherMode::Cbc,
                    "ecb" | "ctr" => {
                        return Err(Error::Unsupported(format!(
                            "cipher mode '{value}' (cowdisk supports xts and cbc)"
                        )))
                    }
                    v => return Err(Error::InvalidArgument(format!("unknown cipher-mode '{v}'"))),
                }
            }
            "ivgen-alg" => match value {
                "plain" | "plain64" | "essiv" => ivgen_alg = Some(value),
                v => return Err(Error::InvalidArgument(format!("unknown ivgen-alg '{v}'"))),
            },
            "ivgen-hash-alg" => ivgen_hash = hash(value, "ivgen-hash-alg")?,
            "hash-alg" => out.hash = hash(value, "hash-alg")?,
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
    out.ivgen = match ivgen_alg {
        None => out.ivgen,
        Some("plain") => IvGen::Plain,
        Some("plain64") => IvGen::Plain64,
        Some(_) => IvGen::Essiv(ivgen_hash),
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
