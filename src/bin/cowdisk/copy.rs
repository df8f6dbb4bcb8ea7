//! `cowdisk convert`, `compare`, `measure`, `commit` and `rebase`: the copy engine's
//! commands, with qemu-img's options and output.

use crate::parse::{apply_create_options, parse_size, OptionExtras};
use crate::{CliError, CliResult, PathContext};
use clap::Args;
use cowdisk::convert::{
    self, CommitOptions, CompareOptions, Comparison, ConvertOptions, Format, OpenSpec,
    RebaseOptions, Source,
};
use cowdisk::CreateOptions;
use std::io::Write;
use std::path::PathBuf;

/// How progress is shown.
#[derive(Debug, Args)]
pub struct ProgressArgs {
    /// Show a progress bar on stderr.
    #[arg(short = 'p')]
    bar: bool,
    /// Progress on stderr: `bar` (as -p) or `json` (one JSON object per line:
    /// {"done": N, "total": N, "percent": F}).
    #[arg(long = "progress", value_name = "MODE", value_parser = ["bar", "json"])]
    mode: Option<String>,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
}

/// A progress reporter for the chosen mode.
struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    json: bool,
}

impl Reporter {
    fn new(args: &ProgressArgs) -> Reporter {
        let json = args.mode.as_deref() == Some("json");
        let bar = (!args.quiet && !json && (args.bar || args.mode.as_deref() == Some("bar"))).then(
            || {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b
            },
        );
        Reporter { bar, json }
    }

    /// Reports (done, total); always goes on.
    fn update(&mut self, done: u64, total: u64) -> bool {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
        }
        if self.json {
            let percent = if total == 0 {
                100.0
            } else {
                done as f64 * 100.0 / total as f64
            };
            let _ = writeln!(
                std::io::stderr(),
                "{{\"done\": {done}, \"total\": {total}, \"percent\": {percent:.2}}}"
            );
        }
        true
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// Parses a cache mode (`-t`/`-T`): true for O_DIRECT.
fn cache_direct(mode: &str) -> CliResult<bool> {
    match mode {
        "none" | "directsync" => Ok(true),
        "writeback" | "writethrough" | "unsafe" => Ok(false),
        other => Err(CliError(format!(
            "invalid cache mode '{other}' (none, directsync, writeback, writethrough or unsafe)"
        ))),
    }
}

/// Parses a format name.
fn format(name: &str) -> CliResult<Format> {
    Format::parse(name).map_err(|e| CliError(e.to_string()))
}

/// The snapshot `-l` names: `snapshot.name=NAME`, `snapshot.id=ID` or `NAME_OR_ID`.
fn snapshot_name(arg: &str) -> String {
    for prefix in ["snapshot.name=", "snapshot.id="] {
        if let Some(rest) = arg.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
    arg.to_string()
}

/// Arguments of `cowdisk convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// Source format: qcow2 or raw (probed when not given).
    #[arg(short = 'f', value_name = "FMT")]
    source_format: Option<String>,
    /// Target format: qcow2 (default) or raw.
    #[arg(short = 'O', value_name = "FMT", default_value = "qcow2")]
    target_format: String,
    /// Options of a new qcow2 target, as for `create` (cluster_size, compat,
    /// refcount_bits, compression_type, lazy_refcounts, backing_file, backing_fmt).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file of the new target: only what the source's top image allocates is
    /// copied (the rest is read through the backing file).
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the -B backing file.
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Write compressed clusters (zlib, or zstd with -o compression_type=zstd).
    #[arg(short = 'c')]
    compressed: bool,
    /// Write into an existing target instead of creating it.
    #[arg(short = 'n')]
    existing: bool,
    /// The existing target (-n) already reads as zeros.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Write chunks as soon as they are ready, not in guest order.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Parallel workers, 1 to 16.
    #[arg(short = 'm', value_name = "N", default_value_t = convert::DEFAULT_WORKERS)]
    workers: usize,
    /// Zero runs of at least this many bytes are not written as data (0: copy every
    /// byte, the target is fully allocated).
    #[arg(short = 'S', value_name = "SIZE", default_value = "4k")]
    min_sparse: String,
    /// Target cache mode: writeback (flushed once at the end), none (O_DIRECT, flushed
    /// at the end) or unsafe (never flushed, qemu-img convert's default: the copy is
    /// not durable when the command returns).
    #[arg(short = 't', value_name = "CACHE", default_value = "writeback")]
    target_cache: String,
    /// Source cache mode: none (O_DIRECT) or writeback.
    #[arg(short = 'T', value_name = "CACHE", default_value = "writeback")]
    source_cache: String,
    /// Convert an internal snapshot: snapshot.name=NAME, snapshot.id=ID or NAME.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Open the source even while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Copy the source's persistent dirty bitmaps into the (qcow2) target.
    #[arg(long = "bitmaps")]
    bitmaps: bool,
    /// With --bitmaps: leave out inconsistent bitmaps instead of failing.
    #[arg(long = "skip-broken-bitmaps", requires = "bitmaps")]
    skip_broken_bitmaps: bool,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The source image.
    #[arg(value_name = "SRC")]
    src: PathBuf,
    /// The target image.
    #[arg(value_name = "DST")]
    dst: PathBuf,
}

/// Runs `cowdisk convert`.
pub fn run_convert(args: ConvertArgs) -> CliResult {
    let mut create = CreateOptions::default();
    let mut extras = OptionExtras::default();
    for list in &args.options {
        apply_create_options(list, &mut create, &mut extras)?;
    }
    if args.backing.is_some() {
        create.backing_file = args.backing.clone();
    }
    if args.backing_format.is_some() {
        create.backing_format = args.backing_format.clone();
    }
    extras.apply_encryption(&mut create, &args.secret)?;
    let source_secret = args.secret.source_secret(extras.key_secret.as_deref())?;
    if args.existing && create.secret.is_none() {
        create.secret = source_secret.clone();
    }
    let target_format = format(&args.target_format)?;
    if target_format == Format::Raw && !args.options.is_empty() {
        return Err(CliError("raw targets take no -o options".into()));
    }
    let min_sparse = parse_size(&args.min_sparse).map_err(CliError)?;
    let opts = ConvertOptions {
        source: OpenSpec {
            format: args.source_format.as_deref().map(format).transpose()?,
            direct: cache_direct(&args.source_cache)?,
            snapshot: args.snapshot.as_deref().map(snapshot_name),
            force_share: args.force_share,
            no_flush: false,
            secret: source_secret,
        },
        target_format,
        create,
        existing_target: args.existing,
        target_is_zero: args.target_is_zero,
        target_direct: cache_direct(&args.target_cache)?,
        target_no_flush: args.target_cache == "unsafe",
        compressed: args.compressed,
        out_of_order: args.out_of_order,
        workers: args.workers,
        min_sparse,
        bitmaps: args.bitmaps,
        skip_broken_bitmaps: args.skip_broken_bitmaps,
    };
    let mut reporter = Reporter::new(&args.progress);
    let mut update = |d, t| reporter.update(d, t);
    let result = convert::convert(&args.src, &args.dst, &opts, Some(&mut update));
    reporter.finish();
    result.path_context("convert", &args.src)?;
    Ok(())
}

/// Arguments of `cowdisk compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// Format of the first image (probed when not given).
    #[arg(short = 'f', value_name = "FMT")]
    first_format: Option<String>,
    /// Format of the second image (probed when not given).
    #[arg(short = 'F', value_name = "FMT")]
    second_format: Option<String>,
    /// Strict: images of different sizes differ.
    #[arg(short = 's')]
    strict: bool,
    /// Open the images even while other processes write them.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Parallel readers, 1 to 16.
    #[arg(short = 'm', value_name = "N", default_value_t = convert::DEFAULT_WORKERS)]
    workers: usize,
    /// Print nothing; only the exit status tells.
    #[arg(short = 'q')]
    quiet: bool,
    /// The first image.
    first: PathBuf,
    /// The second image.
    second: PathBuf,
}

/// Runs `cowdisk compare`; exit 0 identical, 1 different, 2 error.
pub fn run_compare(args: CompareArgs) -> CliResult<u8> {
    let secret = args.secret.secret(None)?;
    let spec = |f: &Option<String>| -> CliResult<OpenSpec> {
        Ok(OpenSpec {
            format: f.as_deref().map(format).transpose()?,
            force_share: args.force_share,
            secret: secret.clone(),
            ..OpenSpec::default()
        })
    };
    let opts = CompareOptions {
        first: spec(&args.first_format)?,
        second: spec(&args.second_format)?,
        strict: args.strict,
        workers: args.workers,
    };
    let a = Source::open(&args.first, &opts.first).path_context("open", &args.first)?;
    let b = Source::open(&args.second, &opts.second).path_context("open", &args.second)?;
    let say = |m: &str| {
        if !args.quiet {
            println!("{m}");
        }
    };
    if !args.strict && a.size() != b.size() {
        say("Warning: Image size mismatch!");
    }
    let result = convert::compare_sources(a.into(), b.into(), args.strict, args.workers)?;
    Ok(match result {
        Comparison::Identical => {
            say("Images are identical.");
            0
        }
        Comparison::Differ { offset } => {
            say(&format!("Content mismatch at offset {offset}!"));
            1
        }
        Comparison::SizeMismatch { .. } => {
            say("Strict mode: Image size mismatch!");
            1
        }
    })
}

/// Arguments of `cowdisk measure`.
#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// Source format (probed when not given).
    #[arg(short = 'f', value_name = "FMT")]
    source_format: Option<String>,
    /// Target format: qcow2 (default) or raw.
    #[arg(short = 'O', value_name = "FMT", default_value = "qcow2")]
    target_format: String,
    /// Options of the target, as for `create`.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Measure an image of this virtual size instead of a source.
    #[arg(long = "size", value_name = "SIZE")]
    size: Option<String>,
    /// Measure an internal snapshot of the source.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Open the source even while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Output format: human or json.
    #[arg(long = "output", value_name = "FMT", default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// The source image (or --size).
    file: Option<PathBuf>,
}

/// Runs `cowdisk measure`.
pub fn run_measure(args: MeasureArgs) -> CliResult {
    let mut create = CreateOptions::default();
    let mut extras = OptionExtras::default();
    for list in &args.options {
        apply_create_options(list, &mut create, &mut extras)?;
    }
    let size = args
        .size
        .as_deref()
        .map(parse_size)
        .transpose()
        .map_err(CliError)?;
    let source = match &args.file {
        Some(f) => {
            let spec = OpenSpec {
                format: args.source_format.as_deref().map(format).transpose()?,
                snapshot: args.snapshot.as_deref().map(snapshot_name),
                force_share: args.force_share,
                ..OpenSpec::default()
            };
            Some(Source::open(f, &spec).path_context("open", f)?)
        }
        None => None,
    };
    if source.is_some() == size.is_some() {
        return Err(CliError(
            "give either a source image or --size, not both".into(),
        ));
    }
    let m = convert::measure(source.as_ref(), size, format(&args.target_format)?, &create)?;
    if args.output == "json" {
        println!("{{");
        if let Some(b) = m.bitmaps {
            println!("    \"bitmaps\": {b},");
        }
        println!("    \"required\": {},", m.required);
        println!("    \"fully-allocated\": {}", m.fully_allocated);
        println!("}}");
    } else {
        println!("required size: {}", m.required);
        println!("fully allocated size: {}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(())
}

/// Arguments of `cowdisk commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// Image format; only qcow2 images have backing files.
    #[arg(short = 'f', value_name = "FMT", default_value = "qcow2")]
    format: String,
    /// The image of the chain to commit into (default: the backing file). Implies -d.
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<PathBuf>,
    /// Keep the image's data after the commit (do not empty it).
    #[arg(short = 'd')]
    keep: bool,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The image to commit.
    file: PathBuf,
}

/// Runs `cowdisk commit`.
pub fn run_commit(args: CommitArgs) -> CliResult {
    if args.format != "qcow2" {
        return Err(CliError(format!(
            "'{}' images have no backing file to commit into",
            args.format
        )));
    }
    let opts = CommitOptions {
        base: args.base.clone(),
        keep_top: args.keep,
        workers: 0,
        secret: args.secret.secret(None)?,
    };
    let mut reporter = Reporter::new(&args.progress);
    let mut update = |d, t| reporter.update(d, t);
    let result = convert::commit(&args.file, &opts, Some(&mut update));
    reporter.finish();
    result.path_context("commit", &args.file)?;
    if !args.progress.quiet {
        println!("Image committed.");
    }
    Ok(())
}

/// Arguments of `cowdisk rebase`.
#[derive(Debug, Args)]
pub struct RebaseArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// Image format; only qcow2 images have backing files.
    #[arg(short = 'f', value_name = "FMT", default_value = "qcow2")]
    format: String,
    /// The new backing file ("" for none); relative names resolve against the
    /// image's folder.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: String,
    /// Format of the new backing file (probed when not given).
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Unsafe: only change the backing file name, copy nothing.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Open the new backing file even while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The image to rebase.
    file: PathBuf,
}

/// Runs `cowdisk rebase`.
pub fn run_rebase(args: RebaseArgs) -> CliResult {
    if args.format != "qcow2" {
        return Err(CliError(format!(
            "'{}' images have no backing file to rebase",
            args.format
        )));
    }
    let opts = RebaseOptions {
        backing_file: Some(args.backing.clone()),
        backing_format: args.backing_format.clone(),
        unsafe_mode: args.unsafe_mode,
        force_share: args.force_share,
        workers: 0,
        secret: args.secret.secret(None)?,
    };
    let mut reporter = Reporter::new(&args.progress);
    let mut update = |d, t| reporter.update(d, t);
    let result = convert::rebase(&args.file, &opts, Some(&mut update));
    reporter.finish();
    result.path_context("rebase", &args.file)?;
    Ok(())
}
