//! Parsing and formatting helpers of the command line: sizes with suffixes, pattern
//! bytes, qemu-img style `-o` option lists, qemu's human-readable size strings, and the
//! `-f` option.

use crate::{CliError, CliResult};
use clap::Args;
use cowdisk::{CompressionType, CreateOptions, Preallocation};

/// The `-f` option every subcommand accepts for qemu-img compatibility.
#[derive(Debug, Args)]
pub struct FormatArg {
    /// Image format; only qcow2 is supported (accepted for qemu-img compatibility).
    #[arg(
        short = 'f',
        long = "format",
        value_name = "FMT",
        default_value = "qcow2"
    )]
    format: String,
}

impl FormatArg {
    /// Refuses image formats other than qcow2.
    pub fn check(&self) -> CliResult {
        if self.format == "qcow2" {
            Ok(())
        } else {
            Err(CliError(format!(
                "unsupported image format '{}' (cowdisk only handles qcow2)",
                self.format
            )))
        }
    }
}

/// The `-U` option of commands that only read an image, as in qemu-img.
#[derive(Debug, Args, Clone, Copy)]
pub struct ShareArg {
    /// Open the image even while another process (QEMU, cowdisk) writes it; what is
    /// read may then be inconsistent.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

/// Parses a size or offset: a decimal number with an optional suffix `b`/`B` (bytes)
/// or `k`, `M`, `G`, `T`, `P`, `E` (powers of 1024, case-insensitive), or a `0x` hex
/// number without suffix. A fraction is allowed with a suffix when the result is a
/// whole number of bytes (`1.5k` = 1536).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let bad = |why: &str| format!("invalid size '{text}': {why}");
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.starts_with('-') {
        return Err(bad("sizes cannot be negative"));
    }
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("not a hexadecimal number"));
        }
        return u64::from_str_radix(hex, 16).map_err(|_| bad("too large"));
    }
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let shift: u32 = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" | "KiB" => 10,
        "m" | "M" | "MiB" => 20,
        "g" | "G" | "GiB" => 30,
        "t" | "T" | "TiB" => 40,
        "p" | "P" | "PiB" => 50,
        "e" | "E" | "EiB" => 60,
        _ => return Err(bad("unknown suffix (use k, M, G, T, P or E)")),
    };
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (number, None),
    };
    if int_part.is_empty() || !int_part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("not a number"));
    }
    let int: u64 = int_part.parse().map_err(|_| bad("too large"))?;
    let whole = int
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("too large"))?;
    let Some(frac) = frac_part else {
        return Ok(whole);
    };
    if shift == 0 {
        return Err(bad("a fraction needs a unit suffix"));
    }
    if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("not a number"));
    }
    // frac / 10^len * 2^shift must be a whole number of bytes; compute exactly with
    // u128 (at most 18 fractional digits keep 10^len well inside u128).
    let frac = frac.trim_end_matches('0');
    if frac.len() > 18 {
        return Err(bad("too many fractional digits"));
    }
    let numerator = u128::from(frac.parse::<u64>().unwrap_or(0)) << shift;
    let denominator = 10u128.pow(frac.len() as u32);
    if !numerator.is_multiple_of(denominator) {
        return Err(bad("not a whole number of bytes"));
    }
    let frac_bytes = u64::try_from(numerator / denominator).map_err(|_| bad("too large"))?;
    whole
        .checked_add(frac_bytes)
        .ok_or_else(|| bad("too large"))
}

/// Parses a pattern byte: decimal (`205`) or hexadecimal (`0xcd`), 0 to 255.
pub fn parse_byte(text: &str) -> Result<u8, String> {
    let s = text.trim();
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => s.parse::<u8>(),
    };
    parsed.map_err(|_| format!("invalid pattern byte '{text}' (expected 0-255 or 0x00-0xff)"))
}

/// Parses a boolean option value the way QEMU does (`on`/`off`, `yes`/`no`, `true`/`false`).
pub fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!(
            "invalid value '{value}' for option '{key}' (expected on or off)"
        )),
    }
}

/// The `-o` options `create` understands, with a one-line description each (for `-o help`).
pub const CREATE_OPTIONS_HELP: &[(&str, &str)] = &[
    ("size", "Virtual disk size (suffixes k, M, G, T)"),
    ("compat", "qcow2 version: 0.10 (or v2) or 1.1 (or v3)"),
    ("backing_file", "File name of a base image"),
    ("backing_fmt", "Format of the base image: qcow2 or raw"),
    (
        "cluster_size",
        "qcow2 cluster size: a power of two from 512 to 2M",
    ),
    (
        "refcount_bits",
        "Width of a reference count entry in bits: 1, 2, 4, ..., 64",
    ),
    ("lazy_refcounts", "Postpone refcount updates: on or off"),
    (
        "compression_type",
        "Compression of compressed clusters: zlib or zstd",
    ),
    ("extended_l2", "Extended L2 entries: only off is supported"),
    (
        "preallocation",
        "Preallocation mode: off, metadata, falloc or full",
    ),
    (
        "encrypt.format",
        "Encrypt the image: luks, or aes (legacy, weak)",
    ),
    (
        "encrypt.key-secret",
        "Id of the --object secret holding the passphrase",
    ),
    (
        "encrypt.cipher-alg",
        "LUKS cipher: aes-128, aes-192 or aes-256",
    ),
    ("encrypt.cipher-mode", "LUKS cipher mode: xts or cbc"),
    (
        "encrypt.ivgen-alg",
        "LUKS IV generator: plain, plain64 or essiv",
    ),
    (
        "encrypt.ivgen-hash-alg",
        "Hash of the essiv IV generator: sha1, sha256, sha512",
    ),
    (
        "encrypt.hash-alg",
        "LUKS key derivation hash: sha1, sha256 or sha512",
    ),
    (
        "encrypt.iter-time",
        "Milliseconds of key derivation work (default 2000)",
    ),
];

/// What a set of `-o` option lists asks for, on top of the [`CreateOptions`] it fills.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OptionExtras {
    /// `size=` given in the option list.
    pub size: Option<u64>,
    /// `compat=` was given explicitly (shown in the `Formatting` line, as qemu-img does).
    pub compat_given: bool,
    /// `-o help` (or `?`) was asked for.
    pub help: bool,
    /// `preallocation=` was given explicitly (shown in the `Formatting` line).
    pub preallocation_given: bool,
    /// `encrypt.format=` (luks or aes).
    pub encrypt_format: Option<String>,
    /// `encrypt.key-secret=`: the id of the `--object secret` with the passphrase.
    pub key_secret: Option<String>,
    /// The other `encrypt.*` options, without the prefix (cipher-alg, iter-time, ...).
    pub encrypt_options: Vec<(String, String)>,
}

impl OptionExtras {
    /// Sets the encryption of `opts` from the `encrypt.*` options and the passphrase
    /// given on the command line.
    pub fn apply_encryption(
        &self,
        opts: &mut CreateOptions,
        secret: &crate::secret::SecretArgs,
    ) -> Result<(), String> {
        let format = match self.encrypt_format.as_deref() {
            None if self.encrypt_options.is_empty() && self.key_secret.is_none() => return Ok(()),
            None | Some("luks") => {
                let pairs: Vec<(&str, &str)> = self
                    .encrypt_options
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let luks =
                    cowdisk::crypto::luks_options_from_qemu(&pairs).map_err(|e| e.to_string())?;
                cowdisk::EncryptionFormat::Luks(luks)
            }
            Some("aes") => {
                if !self.encrypt_options.is_empty() {
                    return Err("legacy AES encryption takes no encrypt.* options".into());
                }
                cowdisk::EncryptionFormat::LegacyAes
            }
            Some(f) => return Err(format!("unknown encrypt.format '{f}' (luks or aes)")),
        };
        opts.encryption = Some(format);
        opts.secret = secret.secret(self.key_secret.as_deref()).map_err(|e| e.0)?;
        if opts.secret.is_none() {
            return Err(
                "an encrypted image needs a passphrase: --secret-file FILE, or --object \
                 secret,id=ID,file=FILE with -o encrypt.key-secret=ID"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Splits a qemu-style option list on commas; `,,` stands for a literal comma.
pub fn split_option_list(list: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    items
}

/// Applies one comma-separated `-o` option list (`cluster_size=64k,compat=v3,...`) to
/// `opts`. Unknown options and malformed values are errors naming the option.
pub fn apply_create_options(
    list: &str,
    opts: &mut CreateOptions,
    extras: &mut OptionExtras,
) -> Result<(), String> {
    for item in split_option_list(list) {
        if item.is_empty() {
            continue;
        }
        if item == "help" || item == "?" {
            extras.help = true;
            continue;
        }
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v)),
            None => (item.trim(), None),
        };
        let need = || value.ok_or_else(|| format!("option '{key}' needs a value"));
        match key {
            "size" => extras.size = Some(parse_size(need()?)?),
            "compat" => {
                opts.version = match need()? {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    v => {
                        return Err(format!(
                            "invalid compat level '{v}' (expected 0.10, v2, 1.1 or v3)"
                        ))
                    }
                };
                extras.compat_given = true;
            }
            "backing_file" => {
                let v = need()?;
                opts.backing_file = (!v.is_empty()).then(|| v.to_string());
            }
            "backing_fmt" => {
                let v = need()?;
                opts.backing_format = match v {
                    "" => None,
                    "qcow2" | "raw" => Some(v.to_string()),
                    _ => {
                        return Err(format!(
                            "unsupported backing format '{v}' (expected qcow2 or raw)"
                        ))
                    }
                };
            }
            "cluster_size" => {
                let v = parse_size(need()?)?;
                opts.cluster_size = u32::try_from(v)
                    .map_err(|_| format!("cluster size {v} is too large (at most 2M)"))?;
            }
            "refcount_bits" => {
                let v = need()?;
                opts.refcount_bits = v.trim().parse().map_err(|_| {
                    format!("invalid refcount_bits '{v}' (expected 1, 2, 4, ..., 64)")
                })?;
            }
            "lazy_refcounts" => opts.lazy_refcounts = parse_bool(key, value.unwrap_or("on"))?,
            "compression_type" => {
                opts.compression_type = match need()? {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    v => {
                        return Err(format!(
                            "invalid compression type '{v}' (expected zlib or zstd)"
                        ))
                    }
                }
            }
            "encrypt.format" => extras.encrypt_format = Some(need()?.to_string()),
            "encrypt.key-secret" => extras.key_secret = Some(need()?.to_string()),
            k if k.starts_with("encrypt.") => extras
                .encrypt_options
                .push((k["encrypt.".len()..].to_string(), need()?.to_string())),
            "extended_l2" => {
                if parse_bool(key, value.unwrap_or("on"))? {
                    return Err("extended_l2=on is not supported".to_string());
                }
            }
            "preallocation" => {
                let v = need()?;
                opts.preallocation = Preallocation::from_name(v).ok_or_else(|| {
                    format!(
                        "invalid preallocation mode '{v}' (expected off, metadata, falloc or full)"
                    )
                })?;
                extras.preallocation_given = true;
            }
            _ => {
                let known: Vec<&str> = CREATE_OPTIONS_HELP.iter().map(|(k, _)| *k).collect();
                return Err(format!(
                    "unknown option '{key}' for format qcow2 (supported: {})",
                    known.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// Formats a number with C's `%.3g`: three significant digits, trailing zeros dropped,
/// scientific notation for exponents below -4 or from 3 up.
fn format_g3(value: f64) -> String {
    if value == 0.0 {
        return "0".to_string();
    }
    let sci = format!("{value:.2e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let strip = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip(mantissa), exp.abs())
    } else {
        let decimals = (2 - exp) as usize;
        strip(&format!("{value:.decimals$}"))
    }
}

/// Formats a byte count like QEMU's `size_to_str`: `1 GiB`, `1.5 MiB`, `196 KiB`.
pub fn human_size(bytes: u64) -> String {
    /// Binary unit prefixes, by power of 1024.
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(bytes * 1024 / 1000) exponent, minus one, divided by ten.
    let x = bytes as f64 / (1000.0 / 1024.0);
    let frexp_exp = if x == 0.0 {
        0
    } else {
        ((x.to_bits() >> 52) & 0x7ff) as i32 - 1022
    };
    let i = ((frexp_exp - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(bytes as f64 / div), SUFFIXES[i])
}

/// Unit tests of the parsers and formatters.
#[cfg(test)]
mod tests {
    use super::*;

    /// Plain, suffixed, fractional and hex sizes parse.
    #[test]
    fn sizes_plain_and_suffixed() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("0.5G"), Ok(1 << 29));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size(" 8k "), Ok(8192));
    }

    /// Malformed and overflowing sizes are errors.
    #[test]
    fn sizes_rejected() {
        for bad in [
            "",
            "k",
            "-1",
            "12Q",
            "1.5",
            "0.3k",
            "1..5k",
            "0x",
            "0xZZ",
            "1e3",
            "abc",
            "16E",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(parse_size("15E"), Ok(15 << 60));
    }

    /// Pattern bytes accept decimal and hex within 0..=255.
    #[test]
    fn pattern_bytes() {
        assert_eq!(parse_byte("0xcd"), Ok(0xcd));
        assert_eq!(parse_byte("0XAB"), Ok(0xab));
        assert_eq!(parse_byte("171"), Ok(171));
        assert_eq!(parse_byte("0"), Ok(0));
        assert!(parse_byte("256").is_err());
        assert!(parse_byte("0x100").is_err());
        assert!(parse_byte("-1").is_err());
        assert!(parse_byte("x").is_err());
    }

    /// Applies one option list to default options.
    fn apply(list: &str) -> Result<(CreateOptions, OptionExtras), String> {
        let mut opts = CreateOptions::default();
        let mut extras = OptionExtras::default();
        apply_create_options(list, &mut opts, &mut extras)?;
        Ok((opts, extras))
    }

    /// Every supported option lands in the right field.
    #[test]
    fn create_options_all() {
        let (o, e) = apply(
            "cluster_size=4k,refcount_bits=8,compat=1.1,lazy_refcounts=on,\
             backing_file=base.qcow2,backing_fmt=qcow2,compression_type=zstd,size=1G",
        )
        .unwrap();
        assert_eq!(o.cluster_size, 4096);
        assert_eq!(o.refcount_bits, 8);
        assert_eq!(o.version, 3);
        assert!(o.lazy_refcounts);
        assert_eq!(o.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(o.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(o.compression_type, CompressionType::Zstd);
        assert_eq!(e.size, Some(1 << 30));
        assert!(e.compat_given);
        assert!(!e.help);
    }

    /// compat aliases and QEMU boolean spellings.
    #[test]
    fn create_options_compat_aliases_and_bools() {
        assert_eq!(apply("compat=0.10").unwrap().0.version, 2);
        assert_eq!(apply("compat=v2").unwrap().0.version, 2);
        assert_eq!(apply("compat=v3").unwrap().0.version, 3);
        assert!(apply("compat=2").is_err());
        assert!(apply("lazy_refcounts").unwrap().0.lazy_refcounts);
        assert!(!apply("lazy_refcounts=off").unwrap().0.lazy_refcounts);
        assert!(apply("lazy_refcounts=maybe").is_err());
        assert!(apply("extended_l2=off,preallocation=off").is_ok());
        assert!(apply("extended_l2=on").is_err());
        assert_eq!(
            apply("preallocation=full").unwrap().0.preallocation,
            Preallocation::Full
        );
        assert_eq!(
            apply("preallocation=metadata").unwrap().0.preallocation,
            Preallocation::Metadata
        );
        assert!(apply("preallocation=sparse").is_err());
    }

    /// Errors name the offending option.
    #[test]
    fn create_options_errors_name_the_option() {
        let err = apply("cluster_size=64k,frobnicate=1").unwrap_err();
        assert!(err.contains("frobnicate"), "{err}");
        let err = apply("refcount_bits=lots").unwrap_err();
        assert!(err.contains("refcount_bits"), "{err}");
        assert!(apply("cluster_size").unwrap_err().contains("cluster_size"));
        assert!(apply("cluster_size=8G").is_err());
        assert!(apply("compression_type=lz4").is_err());
        assert!(apply("backing_fmt=vmdk").is_err());
    }

    /// `,,` escapes a comma; `help` and `?` ask for help.
    #[test]
    fn create_options_escaped_comma_and_help() {
        let (o, _) = apply("backing_file=a,,b.qcow2,cluster_size=512").unwrap();
        assert_eq!(o.backing_file.as_deref(), Some("a,b.qcow2"));
        assert_eq!(o.cluster_size, 512);
        assert!(apply("help").unwrap().1.help);
        assert!(apply("?").unwrap().1.help);
        assert!(apply("").is_ok());
        assert_eq!(apply("backing_file=").unwrap().0.backing_file, None);
    }

    /// Sizes format as qemu-img prints them.
    #[test]
    fn human_sizes_like_qemu() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1000), "0.977 KiB");
        assert_eq!(human_size(1024), "1 KiB");
        assert_eq!(human_size(200_704), "196 KiB");
        assert_eq!(human_size(197_120), "192 KiB");
        assert_eq!(human_size(1_572_864), "1.5 MiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(104_857_600), "100 MiB");
        assert_eq!(human_size(10 << 40), "10 TiB");
        assert_eq!(human_size(u64::MAX), "16 EiB");
    }

    /// `%.3g` formatting, including its scientific switch.
    #[test]
    fn g3_formatting() {
        assert_eq!(format_g3(1.0), "1");
        assert_eq!(format_g3(1.5), "1.5");
        assert_eq!(format_g3(0.9765625), "0.977");
        assert_eq!(format_g3(999.6), "1e+03");
        assert_eq!(format_g3(123.4), "123");
    }
}
