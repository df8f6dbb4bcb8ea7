//! `cowdisk bitmap`: add, remove, clear, enable, disable and merge the persistent
//! dirty bitmaps of an image, like `qemu-img bitmap`; and `--dirty`, cowdisk's own,
//! to print a bitmap's dirty and clean runs the way `nbdinfo --map` prints them.
//!
//! As with qemu-img, the operations run in the order given on the command line, on
//! the one bitmap named; the first that fails stops the rest, and what the ones
//! before it did is kept.

use crate::parse::{parse_size, FormatArg};
use crate::{CliError, CliResult, PathContext};
use clap::{ArgAction, ArgMatches, Args, ValueEnum};
use cowdisk::{Image, OpenOptions};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Output formats of `cowdisk bitmap --dirty`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DirtyOutput {
    /// Text like `nbdinfo --map`: start, length, 1 or 0, dirty or clean.
    Human,
    /// A JSON array of {start, length, dirty}.
    Json,
}

/// Arguments of `cowdisk bitmap`.
#[derive(Debug, Args)]
#[command(
    after_help = "Operations run in the order given, e.g. `--add --disable` adds a \
                  bitmap that does not record writes. The first that fails stops the \
                  rest; the changes of the ones before it are kept, as with qemu-img."
)]
pub struct BitmapArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    #[command(flatten)]
    format: FormatArg,
    /// Add BITMAP, empty and recording writes (a later --disable stops it).
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true",
          help_heading = "Operations")]
    add: Vec<bool>,
    /// Remove BITMAP.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true",
          help_heading = "Operations")]
    remove: Vec<bool>,
    /// Clear every bit of BITMAP (start a new checkpoint).
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true",
          help_heading = "Operations")]
    clear: Vec<bool>,
    /// Make BITMAP record writes.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true",
          help_heading = "Operations")]
    enable: Vec<bool>,
    /// Make BITMAP stop recording writes.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true",
          help_heading = "Operations")]
    disable: Vec<bool>,
    /// Set in BITMAP every bit set in bitmap SOURCE, of this image or, with -b, of
    /// SOURCE_FILE (granularities may differ).
    #[arg(long, value_name = "SOURCE", help_heading = "Operations")]
    merge: Vec<String>,
    /// Bytes one bit of an added bitmap covers: a power of two from 512 to 2G, with
    /// an optional suffix (64k); default the cluster size within 4k..64k.
    #[arg(short = 'g', long = "granularity", value_name = "GRANULARITY",
          value_parser = parse_granularity, overrides_with = "granularity")]
    granularity: Option<u64>,
    /// The image holding the bitmaps to --merge (default: FILE itself).
    #[arg(
        short = 'b',
        value_name = "SOURCE_FILE",
        overrides_with = "source_file"
    )]
    source_file: Option<PathBuf>,
    /// Format of SOURCE_FILE; only qcow2.
    #[arg(
        short = 'F',
        value_name = "SOURCE_FMT",
        overrides_with = "source_format"
    )]
    source_format: Option<String>,
    /// cowdisk extension (not in qemu-img): print the dirty and clean runs of BITMAP,
    /// as `nbdinfo --map=qemu:dirty-bitmap:BITMAP` prints them; opens FILE read-only.
    #[arg(long, conflicts_with_all = ["add", "remove", "clear", "enable", "disable", "merge",
                                      "granularity", "source_file", "source_format"])]
    dirty: bool,
    /// Output format of --dirty: nbdinfo's text, or a JSON array of
    /// {start, length, dirty}.
    #[arg(long = "output", value_enum, default_value_t = DirtyOutput::Human,
          requires = "dirty")]
    output: DirtyOutput,
    #[command(flatten)]
    share: crate::parse::ShareArg,
    /// The image whose bitmap to change.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The bitmap's name.
    #[arg(value_name = "BITMAP")]
    bitmap: String,
}

/// Parses `-g`: a size that is a power of two from 512 bytes to 2 GiB.
fn parse_granularity(text: &str) -> Result<u64, String> {
    let g = parse_size(text)?;
    if !g.is_power_of_two() || !(512..=1 << 31).contains(&g) {
        return Err(format!(
            "invalid granularity '{text}': must be a power of two from 512 to 2G"
        ));
    }
    Ok(g)
}

/// One operation of the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Op {
    /// The operation's name in error messages (qemu-img's).
    fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

/// The operations in command-line order, from where clap saw each occurrence.
fn ordered_ops(args: &BitmapArgs, matches: Option<&ArgMatches>) -> Vec<Op> {
    let mut ops: Vec<(usize, Op)> = Vec::new();
    let flags: [(&str, usize, Op); 5] = [
        ("add", args.add.len(), Op::Add),
        ("remove", args.remove.len(), Op::Remove),
        ("clear", args.clear.len(), Op::Clear),
        ("enable", args.enable.len(), Op::Enable),
        ("disable", args.disable.len(), Op::Disable),
    ];
    let indices = |id: &str, n: usize| -> Vec<usize> {
        matches
            .and_then(|m| m.indices_of(id))
            .map(|i| i.collect())
            .unwrap_or_else(|| (0..n).collect())
    };
    for (id, n, op) in flags {
        for i in indices(id, n) {
            ops.push((i, op.clone()));
        }
    }
    for (i, source) in indices("merge", args.merge.len())
        .into_iter()
        .zip(&args.merge)
    {
        ops.push((i, Op::Merge(source.clone())));
    }
    ops.sort_by_key(|(i, _)| *i);
    ops.into_iter().map(|(_, op)| op).collect()
}

/// Runs `cowdisk bitmap`; `matches` are the subcommand's (for the order of the
/// operations).
pub fn run(args: BitmapArgs, matches: Option<&ArgMatches>) -> CliResult {
    args.format.check()?;
    if args.dirty {
        return print_dirty(&args);
    }
    let ops = ordered_ops(&args, matches);
    if ops.is_empty() {
        return Err(CliError(
            "need at least one of --add, --remove, --clear, --enable, --disable, --merge \
             or --dirty"
                .into(),
        ));
    }
    if args.granularity.is_some() && !ops.contains(&Op::Add) {
        return Err(CliError("granularity only supported with --add".into()));
    }
    let merges = ops.iter().any(|o| matches!(o, Op::Merge(_)));
    if args.source_file.is_some() && !merges {
        return Err(CliError(
            "merge bitmap source file only supported with --merge".into(),
        ));
    }
    if args.source_format.is_some() && args.source_file.is_none() {
        return Err(CliError("-F only supported with -b".into()));
    }
    if let Some(f) = args.source_format.as_deref() {
        if f != "qcow2" {
            return Err(CliError(format!(
                "unsupported source format '{f}' (cowdisk only handles qcow2)"
            )));
        }
    }
    let secret = args.secret.secret(None)?;
    let source = match &args.source_file {
        Some(path) => Some((path, open(path, true, secret.clone())?)),
        None => None,
    };
    let img = open(&args.file, false, secret)?;
    let name = args.bitmap.as_str();
    let mut failure = None;
    for op in &ops {
        let result = match op {
            Op::Add => img
                .bitmap_add(name, args.granularity.unwrap_or(0), true)
                .map_err(|e| e.to_string()),
            Op::Remove => img.bitmap_remove(name).map_err(|e| e.to_string()),
            Op::Clear => img.bitmap_clear(name).map_err(|e| e.to_string()),
            Op::Enable => img
                .bitmap_set_enabled(name, true)
                .map_err(|e| e.to_string()),
            Op::Disable => img
                .bitmap_set_enabled(name, false)
                .map_err(|e| e.to_string()),
            Op::Merge(from) => {
                let contents = match &source {
                    Some((_, src)) => src.bitmap_contents(from),
                    None => img.bitmap_contents(from),
                };
                contents.map_err(|e| e.to_string()).and_then(|c| {
                    // qemu-img refuses to merge bitmaps of different sizes.
                    let size = img.size();
                    if c.size() != size {
                        return Err(format!(
                            "bitmaps are of different sizes (destination size is {size}, \
                             source size is {}) and can't be merged",
                            c.size()
                        ));
                    }
                    img.bitmap_merge(name, &c).map_err(|e| e.to_string())
                })
            }
        };
        if let Err(e) = result {
            failure = Some(CliError(format!(
                "operation {} on bitmap '{name}' failed: {e}",
                op.name()
            )));
            break;
        }
    }
    if let Some((path, src)) = source {
        src.close().path_context("close", path)?;
    }
    // What the operations before a failure did is kept, as with qemu-img.
    let closed = img.close().path_context("close", &args.file);
    match failure {
        Some(e) => Err(e),
        None => closed,
    }
}

/// Opens an image for its bitmaps only (no data is read or written).
fn open(path: &Path, read_only: bool, secret: Option<cowdisk::crypto::Secret>) -> CliResult<Image> {
    Image::open(
        path,
        &OpenOptions {
            read_only,
            follow_backing: false,
            metadata_only: true,
            secret,
            ..OpenOptions::default()
        },
    )
    .path_context("open", path)
}

/// `--dirty`: the runs of the bitmap over the whole disk.
fn print_dirty(args: &BitmapArgs) -> CliResult {
    let img = Image::open(
        &args.file,
        &OpenOptions {
            read_only: true,
            follow_backing: false,
            metadata_only: true,
            force_share: args.share.force_share,
            ..OpenOptions::default()
        },
    )
    .path_context("open", &args.file)?;
    let extents = img
        .dirty_extents(&args.bitmap, 0, u64::MAX, usize::MAX)
        .map_err(|e| CliError(e.to_string()))?;
    img.close().path_context("close", &args.file)?;
    match args.output {
        DirtyOutput::Human => {
            for e in &extents {
                println!(
                    "{:>10}  {:>10}  {:>3}  {}",
                    e.start,
                    e.length,
                    u8::from(e.dirty),
                    if e.dirty { "dirty" } else { "clean" }
                );
            }
        }
        DirtyOutput::Json => {
            let list: Vec<_> = extents
                .iter()
                .map(|e| json!({ "start": e.start, "length": e.length, "dirty": e.dirty }))
                .collect();
            let text = serde_json::to_string_pretty(&list)
                .map_err(|e| CliError(format!("could not format JSON: {e}")))?;
            println!("{text}");
        }
    }
    Ok(())
}
