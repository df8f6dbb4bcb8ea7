//! `cowdisk amend`: change an image's version, lazy refcounts flag or refcount width
//! in place, like `qemu-img amend -f qcow2 -o ...`.

use crate::parse::{parse_bool, split_option_list, FormatArg};
use crate::{CliError, CliResult, PathContext};
use clap::Args;
use cowdisk::image::AmendOptions;
use cowdisk::{Image, OpenOptions};
use std::path::PathBuf;

/// Arguments of `cowdisk amend`.
#[derive(Debug, Args)]
pub struct AmendArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    #[command(flatten)]
    format: FormatArg,
    /// Options to change: compat=0.10|1.1, lazy_refcounts=on|off, refcount_bits=N.
    #[arg(short = 'o', value_name = "OPTIONS", required = true)]
    options: Vec<String>,
    /// Accepted for qemu-img compatibility (amend is quick; nothing is shown).
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing on success (the default; for qemu-img compatibility).
    #[arg(short = 'q')]
    quiet: bool,
    /// The image to change.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// Parses amend's `-o` lists.
fn parse(lists: &[String]) -> CliResult<AmendOptions> {
    let mut o = AmendOptions::default();
    for list in lists {
        for item in split_option_list(list) {
            if item.is_empty() {
                continue;
            }
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v)),
                None => (item.trim(), None),
            };
            let need = || value.ok_or_else(|| CliError(format!("option '{key}' needs a value")));
            match key {
                "compat" => {
                    o.version = Some(match need()? {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        v => return Err(CliError(format!("Unknown compatibility level {v}"))),
                    })
                }
                "lazy_refcounts" => {
                    o.lazy_refcounts = Some(parse_bool(key, value.unwrap_or("on"))?)
                }
                "refcount_bits" => {
                    let v = need()?;
                    o.refcount_bits = Some(v.trim().parse().map_err(|_| {
                        CliError(
                            "Refcount width must be a power of two and may not exceed 64 bits"
                                .into(),
                        )
                    })?)
                }
                "cluster_size" | "compression_type" | "extended_l2" | "preallocation" => {
                    return Err(CliError(format!(
                        "Invalid parameter '{key}': this option is only supported for image \
                         creation"
                    )))
                }
                "backing_file" | "backing_fmt" => {
                    return Err(CliError(
                        "Cannot amend the backing file (use rebase instead)".into(),
                    ))
                }
                _ => return Err(CliError(format!("Invalid parameter '{key}'"))),
            }
        }
    }
    Ok(o)
}

/// Runs `cowdisk amend`.
pub fn run(args: AmendArgs) -> CliResult {
    args.format.check()?;
    let _ = (args.progress, args.quiet);
    let opts = parse(&args.options)?;
    let img = Image::open(
        &args.file,
        &OpenOptions {
            follow_backing: false,
            metadata_only: true,
            secret: args.secret.secret(None)?,
            ..OpenOptions::default()
        },
    )
    .path_context("open", &args.file)?;
    img.amend(&opts).path_context("amend", &args.file)?;
    img.close().path_context("close", &args.file)
}
