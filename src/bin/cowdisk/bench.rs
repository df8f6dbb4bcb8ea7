//! `cowdisk bench`: `qemu-img bench`'s workload through cowdisk, with the same options.

use std::path::PathBuf;

use clap::Args;

use crate::parse;
use crate::{CliResult, PathContext};

/// Arguments of `cowdisk bench` (the meanings are `qemu-img bench`'s).
#[derive(Debug, Args)]
pub struct BenchArgs {
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
    /// Image format (only qcow2; accepted for qemu-img compatibility).
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    /// Byte pattern of written data.
    #[arg(long, default_value = "0")]
    pattern: String,
    /// Flush after every N requests (0 = never).
    #[arg(long = "flush-interval", default_value = "0")]
    flush_interval: u64,
    /// Print only the elapsed seconds.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    file: PathBuf,
}

/// Runs the benchmark and prints `qemu-img bench`'s summary lines.
pub fn run(args: BenchArgs) -> CliResult {
    if args.format != "qcow2" {
        return Err(format!("unsupported format '{}' (only qcow2)", args.format).into());
    }
    let direct = match args.cache.as_str() {
        "none" | "directsync" => true,
        "writeback" | "writethrough" | "unsafe" => false,
        other => return Err(format!("unknown cache mode '{other}'").into()),
    };
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
