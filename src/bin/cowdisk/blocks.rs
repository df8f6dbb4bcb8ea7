//! `cowdisk map`, `zero`, `discard` and `resize`: block status and the operations
//! that change allocation, like `qemu-img map`, `qemu-io -c 'write -z'`,
//! `qemu-io -c discard` and `qemu-img resize`.

use crate::parse::parse_size;
use crate::parse::{FormatArg, ShareArg};
use crate::{CliError, CliResult, Context, PathContext};
use clap::{Args, ValueEnum};
use cowdisk::image::Extent;
use cowdisk::{Image, OpenOptions};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Extents asked of the library per call; longer maps are fetched in batches.
const BATCH: usize = 1024;

/// Output formats of `cowdisk map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MapFormat {
    /// A table of the data extents like `qemu-img map`.
    Human,
    /// Every extent, one JSON object a line, exactly like `qemu-img map --output=json`.
    Json,
}

/// Arguments of `cowdisk map`.
#[derive(Debug, Args)]
pub struct MapArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    #[command(flatten)]
    format: FormatArg,
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t = MapFormat::Human)]
    output: MapFormat,
    /// Guest offset to start at (suffixes k, M, G, T allowed).
    #[arg(long = "start-offset", value_name = "OFFSET", value_parser = parse_size, default_value = "0")]
    start_offset: u64,
    /// Largest number of bytes to map (default: to the end of the image).
    #[arg(long = "max-length", value_name = "LENGTH", value_parser = parse_size)]
    max_length: Option<u64>,
    #[command(flatten)]
    share: ShareArg,
    /// The image to map (opened read-only).
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// Arguments of `cowdisk zero`.
#[derive(Debug, Args)]
pub struct ZeroArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// Let whole zeroed clusters release their host clusters (like `write -z -u`).
    #[arg(short = 'u', long = "unmap")]
    unmap: bool,
    /// The image to write to.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Guest offset in bytes (suffixes k, M, G, T allowed).
    #[arg(value_name = "OFFSET", value_parser = parse_size)]
    offset: u64,
    /// Number of bytes to zero (suffixes allowed).
    #[arg(value_name = "LENGTH", value_parser = parse_size)]
    length: u64,
}

/// Arguments of `cowdisk discard`.
#[derive(Debug, Args)]
pub struct DiscardArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// Punch the freed clusters out of the image file (QEMU's `discard=unmap`).
    #[arg(long = "unmap")]
    unmap: bool,
    /// The image to discard in.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Guest offset in bytes (suffixes k, M, G, T allowed).
    #[arg(value_name = "OFFSET", value_parser = parse_size)]
    offset: u64,
    /// Number of bytes to discard (suffixes allowed); partial clusters at the edges
    /// are left unchanged.
    #[arg(value_name = "LENGTH", value_parser = parse_size)]
    length: u64,
}

/// Arguments of `cowdisk resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    #[command(flatten)]
    format: FormatArg,
    /// Allow shrinking the image (fails if data is allocated past the new end).
    #[arg(long = "shrink")]
    shrink: bool,
    /// Allow shrinking even over allocated data, which is discarded.
    #[arg(long = "force")]
    force: bool,
    /// The image to resize.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// New virtual size (suffixes k, M, G, T allowed), or `+N` / `-N` relative to the
    /// current size.
    #[arg(value_name = "SIZE", allow_hyphen_values = true)]
    size: String,
}

/// Opens an image with the given options.
fn open(
    path: &Path,
    read_only: bool,
    discard_unmap: bool,
    share: bool,
    secret: &crate::secret::SecretArgs,
) -> CliResult<Image> {
    let options = OpenOptions {
        secret: secret.secret(None)?,
        // Map reads metadata only: an encrypted image needs no passphrase for it.
        metadata_only: read_only,
        read_only,
        discard_unmap,
        force_share: share,
        ..OpenOptions::default()
    };
    Image::open(path, &options).path_context("open", path)
}

/// Closes (and so flushes) an image.
fn close(image: Image, path: &Path) -> CliResult {
    image
        .close()
        .context(|| format!("could not close '{}'", path.display()))
}

/// Refuses a request that does not fit inside the virtual disk.
fn check_range(image: &Image, what: &str, offset: u64, length: u64) -> CliResult {
    let size = image.size();
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(CliError(format!(
            "{what} of {length} bytes at offset {offset} is beyond the end of the image \
             (virtual size {size})"
        ))),
    }
}

/// All extents of guest `[offset, offset+length)` (clamped to the virtual size),
/// fetched in batches and merged across batch boundaries.
pub fn extents(image: &Image, offset: u64, length: u64) -> CliResult<Vec<Extent>> {
    let size = image.size();
    if offset > size {
        return Err(CliError(format!(
            "start offset {offset} is past the end of the image (virtual size {size})"
        )));
    }
    let end = offset.saturating_add(length).min(size);
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let batch = image
            .block_status(pos, end - pos, BATCH)
            .context(|| format!("could not get the block status at offset {pos}"))?;
        let Some(last) = batch.last() else {
            return Err(CliError(format!(
                "the library returned no extents at offset {pos}"
            )));
        };
        let next = last.start + last.length;
        if batch[0].start != pos || next <= pos {
            return Err(CliError(format!(
                "the library returned extents that do not continue at offset {pos}"
            )));
        }
        for e in batch {
            match out.last_mut() {
                Some(prev) if prev.mergeable(&e) => prev.length += e.length,
                _ => out.push(e),
            }
        }
        pos = next;
    }
    Ok(out)
}

/// One extent as a line of `qemu-img map --output=json`.
fn extent_json(e: &Extent) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
         \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(offset) = e.offset {
        let _ = write!(s, ", \"offset\": {offset}");
    }
    s.push('}');
    s
}

/// The whole `qemu-img map --output=json` text of a list of extents. Like qemu-img,
/// an empty map prints one all-false extent of length 0.
pub fn map_json(extents: &[Extent]) -> String {
    let empty = [Extent {
        start: 0,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
    }];
    let list = if extents.is_empty() { &empty } else { extents };
    let lines: Vec<String> = list.iter().map(extent_json).collect();
    format!("[{}]\n", lines.join(",\n"))
}

/// A number as C's `%#x` prints it (`0` without prefix).
fn hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

/// The message qemu-img gives when an extent with data has no host offset.
const NO_OFFSET: &str = "File contains external, encrypted or compressed clusters.";

/// The `qemu-img map` table: one line per extent with data, naming the file of its
/// layer (`files[depth]`). Like qemu-img, the table stops at the first extent with
/// data but no host offset (compressed data); the flag then is false.
pub fn map_human(extents: &[Extent], files: &[String]) -> (String, bool) {
    let mut out = format!(
        "{:<16}{:<16}{:<16}{}\n",
        "Offset", "Length", "Mapped to", "File"
    );
    for e in extents.iter().filter(|e| e.data && !e.zero) {
        let Some(offset) = e.offset else {
            return (out, false);
        };
        let file = files
            .get(e.depth as usize)
            .map(String::as_str)
            .unwrap_or("");
        let _ = writeln!(
            out,
            "{:<16}{:<16}{:<16}{file}",
            hex(e.start),
            hex(e.length),
            hex(offset)
        );
    }
    (out, true)
}

/// Runs `cowdisk map`.
pub fn run_map(args: MapArgs) -> CliResult {
    args.format.check()?;
    let image = open(
        &args.file,
        true,
        false,
        args.share.force_share,
        &args.secret,
    )?;
    let length = args.max_length.unwrap_or(u64::MAX);
    let found = extents(&image, args.start_offset, length)?;
    let (text, complete) = match args.output {
        MapFormat::Json => (map_json(&found), true),
        MapFormat::Human => {
            let mut files = vec![args.file.display().to_string()];
            files.extend(image.info().backing_chain.into_iter().map(|b| b.filename));
            map_human(&found, &files)
        }
    };
    close(image, &args.file)?;
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context(|| "could not write to stdout".to_string())?;
    if complete {
        Ok(())
    } else {
        Err(CliError(NO_OFFSET.to_string()))
    }
}

/// Runs `cowdisk zero`.
pub fn run_zero(args: ZeroArgs) -> CliResult {
    let image = open(&args.file, false, false, false, &args.secret)?;
    check_range(&image, "write_zeroes", args.offset, args.length)?;
    image
        .write_zeroes(args.offset, args.length, args.unmap)
        .context(|| {
            format!(
                "write_zeroes of {} bytes at offset {} failed",
                args.length, args.offset
            )
        })?;
    close(image, &args.file)?;
    println!("zeroed {} bytes at offset {}", args.length, args.offset);
    Ok(())
}

/// Runs `cowdisk discard`.
pub fn run_discard(args: DiscardArgs) -> CliResult {
    let image = open(&args.file, false, args.unmap, false, &args.secret)?;
    check_range(&image, "discard", args.offset, args.length)?;
    image.discard(args.offset, args.length).context(|| {
        format!(
            "discard of {} bytes at offset {} failed",
            args.length, args.offset
        )
    })?;
    close(image, &args.file)?;
    println!("discarded {} bytes at offset {}", args.length, args.offset);
    Ok(())
}

/// A `resize` SIZE argument: absolute, or relative to the current size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeArg {
    /// `N`: the new size.
    Absolute(u64),
    /// `+N`: grow by N bytes.
    Grow(u64),
    /// `-N`: shrink by N bytes.
    Shrink(u64),
}

impl SizeArg {
    /// Parses `N`, `+N` or `-N` (N with the usual suffixes).
    pub fn parse(text: &str) -> Result<SizeArg, String> {
        let t = text.trim();
        if let Some(rest) = t.strip_prefix('+') {
            parse_size(rest).map(SizeArg::Grow)
        } else if let Some(rest) = t.strip_prefix('-') {
            parse_size(rest).map(SizeArg::Shrink)
        } else {
            parse_size(t).map(SizeArg::Absolute)
        }
    }

    /// The new size given the current one.
    pub fn apply(self, current: u64) -> Result<u64, String> {
        match self {
            SizeArg::Absolute(n) => Ok(n),
            SizeArg::Grow(n) => current
                .checked_add(n)
                .ok_or_else(|| format!("growing {current} bytes by {n} overflows")),
            SizeArg::Shrink(n) => current.checked_sub(n).ok_or_else(|| {
                format!("cannot shrink by {n} bytes: the image has only {current} bytes")
            }),
        }
    }
}

/// Runs `cowdisk resize`.
pub fn run_resize(args: ResizeArgs) -> CliResult {
    args.format.check()?;
    let size_arg = SizeArg::parse(&args.size)?;
    let image = open(&args.file, false, false, false, &args.secret)?;
    let current = image.size();
    let new_size = size_arg.apply(current)?;
    if new_size < current && !(args.shrink || args.force) {
        return Err(CliError(format!(
            "shrinking '{}' from {current} to {new_size} bytes deletes everything past the \
             new end; use --shrink to perform a shrink operation",
            args.file.display()
        )));
    }
    image.resize(new_size, args.force).context(|| {
        format!(
            "could not resize '{}' to {new_size} bytes",
            args.file.display()
        )
    })?;
    close(image, &args.file)?;
    println!("Image resized.");
    Ok(())
}

/// Unit tests of the formatting and size parsing.
#[cfg(test)]
mod tests {
    use super::*;

    /// An extent for the tests.
    fn ext(start: u64, length: u64, depth: u32, data: bool, offset: Option<u64>) -> Extent {
        Extent {
            start,
            length,
            depth,
            present: true,
            zero: !data,
            data,
            compressed: false,
            offset,
        }
    }

    /// JSON lines are byte-identical to qemu-img's.
    #[test]
    fn json_like_qemu_img() {
        let text = map_json(&[
            ext(0, 65536, 0, true, Some(327680)),
            ext(65536, 4096, 1, false, None),
        ]);
        assert_eq!(
            text,
            "[{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \
             \"data\": true, \"compressed\": false, \"offset\": 327680},\n\
             { \"start\": 65536, \"length\": 4096, \"depth\": 1, \"present\": true, \"zero\": true, \
             \"data\": false, \"compressed\": false}]\n"
        );
        assert_eq!(
            map_json(&[]),
            "[{ \"start\": 0, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \
             \"data\": false, \"compressed\": false}]\n"
        );
    }

    /// The table lists data extents only, with `%#-16x` columns.
    #[test]
    fn human_like_qemu_img() {
        let files = vec!["top.qcow2".to_string(), "base.raw".to_string()];
        let (text, complete) = map_human(
            &[
                ext(0, 0x10000, 0, true, Some(0x50000)),
                ext(0x10000, 0x10000, 0, false, None),
                ext(0x20000, 0x70000, 1, true, Some(0x20000)),
            ],
            &files,
        );
        assert!(complete);
        assert_eq!(
            text,
            "Offset          Length          Mapped to       File\n\
             0               0x10000         0x50000         top.qcow2\n\
             0x20000         0x70000         0x20000         base.raw\n"
        );
        let mut compressed = ext(0, 512, 0, true, None);
        compressed.compressed = true;
        let (text, complete) = map_human(&[compressed], &files);
        assert!(!complete);
        assert_eq!(text.lines().count(), 1, "only the header: {text}");
    }

    /// Absolute and relative resize sizes.
    #[test]
    fn resize_sizes() {
        assert_eq!(SizeArg::parse("1M"), Ok(SizeArg::Absolute(1 << 20)));
        assert_eq!(SizeArg::parse("+64k"), Ok(SizeArg::Grow(65536)));
        assert_eq!(SizeArg::parse("-512"), Ok(SizeArg::Shrink(512)));
        assert!(SizeArg::parse("+").is_err());
        assert!(SizeArg::parse("-x").is_err());
        assert_eq!(SizeArg::Grow(10).apply(5), Ok(15));
        assert_eq!(SizeArg::Shrink(5).apply(15), Ok(10));
        assert!(SizeArg::Shrink(16).apply(15).is_err());
        assert!(SizeArg::Grow(1).apply(u64::MAX).is_err());
    }
}
