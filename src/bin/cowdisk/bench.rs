//! `cowdisk bench`: `qemu-img bench`'s workload through cowdisk, with the same options;
//! `cowdisk bench-compress` and `cowdisk bench-vmstate`: compressed writes and VM state saves.

use crate::parse::FormatArg;
use std::path::PathBuf;

use clap::Args;

use crate::parse;
use crate::{CliResult, PathContext};

/// Arguments of `cowdisk bench` (the meanings are `qemu-img bench`'s).
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// Write requests instead of reads.
    #[arg(short = 'w')]
    write: bool,
    /// Number of requests.
    #[arg(short = 'c', default_value = "75000")]
    count: u64,
    /// Requests in flight at once (cowdisk: worker threads).
    #[arg(short = 'd', default_value = "64")]
    depth: u32,
    /// Offset of the first request (suffixes allowed).
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Request size (suffixes allowed).
    #[arg(short = 's', default_value = "4k")]
    size: String,
    /// Distance between the offsets of consecutive requests (default: the request size).
    #[arg(short = 'S')]
    step: Option<String>,
    /// Cache mode: `none` (O_DIRECT) or `writeback`.
    #[arg(short = 't', default_value = "writeback")]
    cache: String,
    #[command(flatten)]
    format: FormatArg,
    /// Byte pattern of written data.
    #[arg(long, default_value = "0")]
    pattern: String,
    /// Flush after every N requests (0 = never).
    #[arg(long = "flush-interval", default_value = "0")]
    flush_interval: u64,
    /// Do not check host writes against the metadata (to measure what the checks
    /// cost; QEMU's overlap-check=none).
    #[arg(long = "no-overlap-check")]
    no_overlap_check: bool,
    /// Print only the elapsed seconds.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    file: PathBuf,
}

/// Runs the benchmark and prints `qemu-img bench`'s summary lines.
pub fn run(args: BenchArgs) -> CliResult {
    args.format.check()?;
    let direct = direct_mode(&args.cache)?;
    let size = parse::parse_size(&args.size)?;
    let cfg = cowdisk::bench::BenchConfig {
        write: args.write,
        count: args.count,
        size,
        step: match &args.step {
            Some(s) => parse::parse_size(s)?,
            None => size,
        },
        offset: parse::parse_size(&args.offset)?,
        depth: args.depth,
        direct,
        pattern: parse::parse_byte(&args.pattern)?,
        flush_interval: args.flush_interval,
        overlap_checks: !args.no_overlap_check,
        secret: args.secret.secret(None)?,
    };
    if !args.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            cfg.count,
            if cfg.write { "write" } else { "read" },
            cfg.size,
            cfg.depth,
            cfg.offset,
            cfg.step
        );
    }
    let result = cowdisk::bench::run(&args.file, &cfg).path_context("benchmark", &args.file)?;
    if args.quiet {
        println!("{:.3}", result.elapsed.as_secs_f64());
    } else {
        println!(
            "Run completed in {:.3} seconds.",
            result.elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// Turns a `-t` cache mode into "bypass the page cache".
fn direct_mode(cache: &str) -> CliResult<bool> {
    match cache {
        "none" | "directsync" => Ok(true),
        "writeback" | "writethrough" | "unsafe" => Ok(false),
        other => Err(format!("unknown cache mode '{other}'").into()),
    }
}

/// Arguments of `cowdisk bench-compress`.
#[derive(Debug, Args)]
pub struct BenchCompressArgs {
    /// Cache mode of the image: `none` (O_DIRECT) or `writeback`.
    #[arg(short = 't', default_value = "writeback")]
    cache: String,
    /// Turn the compressed-write cache off (each compressed cluster written on its own).
    #[arg(long = "no-cache")]
    no_cache: bool,
    /// Memory of the compressed-write cache (suffixes allowed; default 4 MiB).
    #[arg(long = "cache-size")]
    cache_size: Option<String>,
    /// Compression type of the new image: `zlib` or `zstd`.
    #[arg(long = "compression-type", default_value = "zlib")]
    compression_type: String,
    /// Print the time breakdown (reading, compressing and writing, closing).
    #[arg(short = 'v')]
    verbose: bool,
    /// The raw file to compress.
    raw: PathBuf,
    /// The qcow2 image to create (must not exist).
    image: PathBuf,
}

/// Converts a raw file into a new compressed image (like `qemu-img convert -c -O qcow2
/// -f raw RAW IMAGE`) and prints the time as `qemu-img bench` does.
pub fn run_compress(args: BenchCompressArgs) -> CliResult {
    let mut cfg = cowdisk::bench::CompressConfig {
        direct: direct_mode(&args.cache)?,
        compression_type: match args.compression_type.as_str() {
            "zlib" => cowdisk::CompressionType::Zlib,
            "zstd" => cowdisk::CompressionType::Zstd,
            other => return Err(format!("unknown compression type '{other}'").into()),
        },
        ..Default::default()
    };
    if let Some(size) = &args.cache_size {
        cfg.cache_size = parse::parse_size(size)?;
    }
    if args.no_cache {
        cfg.cache_size = 0;
    }
    let r = cowdisk::bench::compress_file(&args.raw, &args.image, &cfg)
        .path_context("compress into", &args.image)?;
    if args.verbose {
        println!(
            "{} bytes: {} clusters compressed, {} zero clusters skipped; reading {:.3} s, \
             compressing and writing {:.3} s, closing {:.3} s",
            r.bytes,
            r.clusters_written,
            r.zero_clusters,
            r.reading.as_secs_f64(),
            r.compressing.as_secs_f64(),
            r.closing.as_secs_f64()
        );
    }
    println!("Run completed in {:.3} seconds.", r.elapsed.as_secs_f64());
    Ok(())
}

/// Arguments of `cowdisk bench-vmstate`.
#[derive(Debug, Args)]
pub struct BenchVmstateArgs {
    /// Cache mode: `none` (O_DIRECT) or `writeback`.
    #[arg(short = 't', default_value = "writeback")]
    cache: String,
    /// Save straight through the cluster path, as QEMU does, instead of the write pool.
    #[arg(long)]
    unbuffered: bool,
    /// Bytes of VM state to save (suffixes allowed).
    #[arg(long, default_value = "2G")]
    size: String,
    /// Seed of the piece sizes and the data.
    #[arg(long, default_value = "1")]
    seed: u64,
    /// Print the time breakdown (saves, finalize, flush).
    #[arg(short = 'v')]
    verbose: bool,
    /// The image (existing; its VM state area is overwritten).
    file: PathBuf,
}

/// Saves a VM state stream in realistic pieces, finalizes, flushes, and prints the time
/// as `qemu-img bench` does.
pub fn run_vmstate(args: BenchVmstateArgs) -> CliResult {
    let cfg = cowdisk::bench::VmstateConfig {
        size: parse::parse_size(&args.size)?,
        direct: direct_mode(&args.cache)?,
        unbuffered: args.unbuffered,
        seed: args.seed,
    };
    let r = cowdisk::bench::save_vmstate_stream(&args.file, &cfg)
        .path_context("save VM state into", &args.file)?;
    if args.verbose {
        println!(
            "{} bytes in {} pieces: saves {:.3} s, finalize {:.3} s, flush {:.3} s",
            cfg.size,
            r.pieces,
            r.saving.as_secs_f64(),
            r.finalizing.as_secs_f64(),
            r.flushing.as_secs_f64()
        );
    }
    println!("Run completed in {:.3} seconds.", r.elapsed.as_secs_f64());
    Ok(())
}
