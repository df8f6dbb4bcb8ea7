//! `cowdisk create`: makes a new qcow2 image, like `qemu-img create -f qcow2`.

use crate::parse::FormatArg;
use crate::parse::{apply_create_options, parse_size, OptionExtras, CREATE_OPTIONS_HELP};
use crate::{CliError, CliResult, Context, PathContext};
use clap::Args;
use cowdisk::{CreateOptions, Image, OpenOptions};
use std::path::{Path, PathBuf};

/// Arguments of `cowdisk create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    #[command(flatten)]
    format: FormatArg,
    /// Comma-separated format options, e.g. `cluster_size=64k,compat=1.1`
    /// (`-o help` lists them). May be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file (same as `-o backing_file=`); relative names resolve against
    /// the folder of FILE.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file: qcow2 or raw (same as `-o backing_fmt=`).
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Unsafe: do not open the backing file, store its name as given (SIZE and -F
    /// are then required).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet: do not print the `Formatting ...` line.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image file to create. If it already exists, nothing is written and
    /// create fails with "File exists" (unlike qemu-img, which overwrites it).
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    /// Virtual size in bytes, or with a suffix k, M, G, T (powers of 1024).
    /// Optional with a backing file: the backing file's size is then used.
    #[arg(value_name = "SIZE")]
    size: Option<String>,
}

/// Prints the options `-o` accepts.
fn print_option_help() {
    println!("Supported options for format qcow2:");
    for (name, help) in CREATE_OPTIONS_HELP {
        println!("  {name:<18} - {help}");
    }
}

/// Sets a string option from its flag, refusing a different value from `-o`.
fn merge_flag(
    slot: &mut Option<String>,
    flag: Option<String>,
    flag_name: &str,
    option_name: &str,
) -> CliResult {
    if let Some(value) = flag {
        match slot {
            Some(existing) if *existing != value => {
                return Err(CliError(format!(
                    "{flag_name} '{value}' conflicts with -o {option_name}={existing}"
                )))
            }
            _ => *slot = Some(value),
        }
    }
    Ok(())
}

/// The path a backing file name refers to: relative names resolve against the
/// folder of the image.
fn resolve_backing(image: &Path, backing: &str) -> PathBuf {
    let backing = Path::new(backing);
    if backing.is_absolute() {
        return backing.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(backing),
        _ => backing.to_path_buf(),
    }
}

/// Runs `cowdisk create`.
pub fn run(args: CreateArgs) -> CliResult {
    args.format.check()?;
    let mut opts = CreateOptions::default();
    let mut extras = OptionExtras::default();
    for list in &args.options {
        apply_create_options(list, &mut opts, &mut extras)?;
    }
    if extras.help {
        print_option_help();
        return Ok(());
    }
    extras.apply_encryption(&mut opts, &args.secret)?;
    let file = args
        .file
        .ok_or_else(|| CliError("missing FILE to create".to_string()))?;
    merge_flag(&mut opts.backing_file, args.backing, "-b", "backing_file")?;
    if let Some(fmt) = &args.backing_format {
        if fmt != "qcow2" && fmt != "raw" {
            return Err(CliError(format!(
                "unsupported backing format '{fmt}' (expected qcow2 or raw)"
            )));
        }
    }
    merge_flag(
        &mut opts.backing_format,
        args.backing_format,
        "-F",
        "backing_fmt",
    )?;
    if opts.backing_file.is_none() && opts.backing_format.is_some() {
        return Err(CliError(
            "a backing format was given without a backing file".to_string(),
        ));
    }

    let positional_size = args.size.as_deref().map(parse_size).transpose()?;
    let size = match (positional_size, extras.size) {
        (Some(a), Some(b)) if a != b => {
            return Err(CliError(format!("SIZE {a} conflicts with -o size={b}")))
        }
        (Some(a), _) | (None, Some(a)) => Some(a),
        (None, None) => None,
    };
    if let Some(backing) = &opts.backing_file {
        if args.unsafe_backing {
            if size.is_none() {
                return Err(CliError(
                    "SIZE must be given with -u (the backing file is not opened)".to_string(),
                ));
            }
            if opts.backing_format.is_none() {
                return Err(CliError(
                    "-F must be given with -u (the backing file is not opened)".to_string(),
                ));
            }
            opts.open_backing = false;
        } else {
            let path = resolve_backing(&file, backing);
            std::fs::metadata(&path)
                .context(|| format!("could not open backing file '{}'", path.display()))?;
        }
    } else if size.is_none() {
        return Err(CliError(
            "missing SIZE (it is optional only with a backing file)".to_string(),
        ));
    }

    // Like qemu-img, round the size up to whole 512-byte sectors (the library
    // requires a multiple of 512).
    let size = size
        .map(|s| {
            s.checked_next_multiple_of(512)
                .ok_or_else(|| CliError(format!("size {s} is too large")))
        })
        .transpose()?;
    Image::create(&file, size.unwrap_or(0), &opts).path_context("create", &file)?;

    let final_size = match size {
        Some(s) => s,
        None => {
            // The library took the size from the backing file; read it back.
            let open = OpenOptions {
                read_only: true,
                follow_backing: false,
                metadata_only: true,
                ..OpenOptions::default()
            };
            let image = Image::open(&file, &open).path_context("open the new image", &file)?;
            let s = image.info().virtual_size;
            image
                .close()
                .context(|| format!("could not close '{}'", file.display()))?;
            s
        }
    };
    if !args.quiet {
        println!("{}", formatting_line(&file, final_size, &opts, &extras));
    }
    Ok(())
}

/// The `Formatting '...'` line qemu-img prints, with the same option order.
fn formatting_line(file: &Path, size: u64, opts: &CreateOptions, extras: &OptionExtras) -> String {
    let compat_given = extras.compat_given;
    let mut encrypt = String::new();
    if let Some(f) = &extras.encrypt_format {
        encrypt += &format!(" encrypt.format={f}");
    }
    if let Some(id) = &extras.key_secret {
        encrypt += &format!(" encrypt.key-secret={id}");
    }
    for (k, v) in &extras.encrypt_options {
        encrypt += &format!(" encrypt.{k}={v}");
    }
    let prealloc = if extras.preallocation_given {
        format!(" preallocation={}", opts.preallocation.name())
    } else {
        String::new()
    };
    let mut line = format!(
        "Formatting '{}', fmt=qcow2{encrypt} cluster_size={} extended_l2=off{prealloc} compression_type={} size={}",
        file.display(),
        opts.cluster_size,
        opts.compression_type.name(),
        size
    );
    if let Some(b) = &opts.backing_file {
        line.push_str(&format!(" backing_file={b}"));
    }
    if let Some(f) = &opts.backing_format {
        line.push_str(&format!(" backing_fmt={f}"));
    }
    if compat_given || opts.version == 2 {
        let compat = if opts.version == 2 { "0.10" } else { "1.1" };
        line.push_str(&format!(" compat={compat}"));
    }
    line.push_str(&format!(
        " lazy_refcounts={} refcount_bits={}",
        if opts.lazy_refcounts { "on" } else { "off" },
        opts.refcount_bits
    ));
    line
}
