//! `cowdisk write` and `cowdisk read`: guest-data I/O on an image, like
//! `qemu-io -c write` and `qemu-io -c read`.

use crate::parse::{parse_byte, parse_size};
use crate::{CliError, CliResult, Context, PathContext};
use clap::Args;
use cowdisk::{Image, OpenOptions};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Bytes moved per library call; large requests are split so memory stays bounded.
const CHUNK: usize = 1 << 20;

/// Arguments of `cowdisk write`.
#[derive(Debug, Args)]
pub struct WriteArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// Fill byte, decimal or 0x hex (default 0xcd).
    #[arg(short = 'P', value_name = "BYTE", value_parser = parse_byte, conflicts_with = "from")]
    pattern: Option<u8>,
    /// Write the contents of FILE instead of a pattern (LENGTH defaults to its length).
    #[arg(long = "from", value_name = "FILE")]
    from: Option<PathBuf>,
    /// Flush the image to stable storage before closing it.
    #[arg(long = "flush")]
    flush: bool,
    /// Store the data as compressed clusters (the image's compression type, zlib or
    /// zstd). OFFSET must be cluster-aligned and LENGTH whole clusters (the image's last
    /// cluster may be partial); the clusters must be unallocated in the image.
    #[arg(short = 'c', long = "compressed")]
    compressed: bool,
    /// The image to write to.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
    /// Guest offset in bytes (suffixes k, M, G, T allowed).
    #[arg(value_name = "OFFSET", value_parser = parse_size)]
    offset: u64,
    /// Number of bytes to write (suffixes allowed); required without --from.
    #[arg(value_name = "LENGTH", value_parser = parse_size)]
    length: Option<u64>,
}

/// Arguments of `cowdisk read`.
#[derive(Debug, Args)]
pub struct ReadArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// Verify that every byte read equals BYTE (decimal or 0x hex); exit 1 naming the
    /// first mismatching offset otherwise.
    #[arg(short = 'P', value_name = "BYTE", value_parser = parse_byte)]
    pattern: Option<u8>,
    /// Save the bytes read to FILE (`-` for stdout) instead of printing a hexdump.
    #[arg(long = "to", value_name = "FILE")]
    to: Option<PathBuf>,
    /// Largest number of bytes to hexdump; longer reads show only the beginning.
    #[arg(long = "dump-limit", value_name = "SIZE", value_parser = parse_size, default_value = "64k")]
    dump_limit: u64,
    #[command(flatten)]
    share: crate::parse::ShareArg,
    /// The image to read from (opened read-only).
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
    /// Guest offset in bytes (suffixes k, M, G, T allowed).
    #[arg(value_name = "OFFSET", value_parser = parse_size)]
    offset: u64,
    /// Number of bytes to read (suffixes allowed).
    #[arg(value_name = "LENGTH", value_parser = parse_size)]
    length: u64,
}

/// Opens an image for `read` or `write`.
fn open(
    path: &Path,
    read_only: bool,
    share: bool,
    secret: &crate::secret::SecretArgs,
) -> CliResult<Image> {
    let options = OpenOptions {
        read_only,
        force_share: share,
        secret: secret.secret(None)?,
        ..OpenOptions::default()
    };
    Image::open(path, &options).path_context("open", path)
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

/// Runs `cowdisk write`.
pub fn run_write(args: WriteArgs) -> CliResult {
    let mut source = match &args.from {
        Some(path) => {
            let file =
                File::open(path).context(|| format!("could not open '{}'", path.display()))?;
            let len = file
                .metadata()
                .context(|| format!("could not stat '{}'", path.display()))?
                .len();
            if let Some(want) = args.length {
                if want > len {
                    return Err(CliError(format!(
                        "'{}' holds only {len} bytes, fewer than LENGTH {want}",
                        path.display()
                    )));
                }
            }
            Some((file, len, path))
        }
        None => None,
    };
    let length = match (&source, args.length) {
        (_, Some(l)) => l,
        (Some((_, len, _)), None) => *len,
        (None, None) => {
            return Err(CliError(
                "missing LENGTH (required unless --from is given)".to_string(),
            ))
        }
    };
    let pattern = args.pattern.unwrap_or(0xcd);

    let image = open(&args.image, false, false, &args.secret)?;
    check_range(&image, "write", args.offset, length)?;
    // Compressed writes go by whole clusters: chunks are a multiple of the cluster size.
    let cs = image.info().cluster_size as usize;
    let chunk = if args.compressed {
        (CHUNK / cs).max(1) * cs
    } else {
        CHUNK
    };
    let mut buf = vec![pattern; chunk.min(usize::try_from(length).unwrap_or(chunk))];
    let mut done = 0u64;
    while done < length {
        let n = (length - done).min(buf.len() as u64) as usize;
        if let Some((file, _, path)) = &mut source {
            file.read_exact(&mut buf[..n])
                .context(|| format!("could not read '{}'", path.display()))?;
        }
        let at = args.offset + done;
        let written = if args.compressed {
            image.write_compressed(&buf[..n], at)
        } else {
            image.write_at(&buf[..n], at)
        };
        written.context(|| format!("write of {n} bytes at offset {at} failed"))?;
        done += n as u64;
    }
    if args.flush {
        image.flush().context(|| "flush failed".to_string())?;
    }
    image
        .close()
        .context(|| format!("could not close '{}'", args.image.display()))?;
    let how = if args.compressed { " compressed" } else { "" };
    println!("wrote {length} bytes{how} at offset {}", args.offset);
    Ok(())
}

/// Where the bytes of `cowdisk read` go.
enum Sink {
    /// Compare against a pattern only.
    Verify,
    /// Save to a file or stdout.
    Save(Box<dyn Write>),
    /// Hexdump (up to the limit) on stdout.
    Dump,
}

/// Runs `cowdisk read`.
pub fn run_read(args: ReadArgs) -> CliResult {
    let to_stdout = args.to.as_deref() == Some(Path::new("-"));
    let mut sink = match &args.to {
        Some(_) if to_stdout => Sink::Save(Box::new(std::io::stdout().lock())),
        Some(path) => Sink::Save(Box::new(std::io::BufWriter::new(
            File::create(path).context(|| format!("could not create '{}'", path.display()))?,
        ))),
        None if args.pattern.is_some() => Sink::Verify,
        None => Sink::Dump,
    };
    let to_name = || {
        args.to
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };

    let image = open(&args.image, true, args.share.force_share, &args.secret)?;
    check_range(&image, "read", args.offset, args.length)?;
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(args.length).unwrap_or(CHUNK))];
    let mut done = 0u64;
    let mut dumped = 0u64;
    let stdout = std::io::stdout();
    while done < args.length {
        let n = (args.length - done).min(buf.len() as u64) as usize;
        let at = args.offset + done;
        let chunk = &mut buf[..n];
        image
            .read_at(chunk, at)
            .context(|| format!("read of {n} bytes at offset {at} failed"))?;
        if let Some(p) = args.pattern {
            if let Some(i) = chunk.iter().position(|&b| b != p) {
                let bad = at + i as u64;
                return Err(CliError(format!(
                    "pattern verification failed at offset {bad} (0x{bad:x}): \
                     expected 0x{p:02x}, found 0x{:02x}",
                    chunk[i]
                )));
            }
        }
        match &mut sink {
            Sink::Verify => {}
            Sink::Save(w) => w
                .write_all(chunk)
                .context(|| format!("could not write '{}'", to_name()))?,
            Sink::Dump => {
                let take = (args.dump_limit - dumped).min(n as u64) as usize;
                if take > 0 {
                    let text = hexdump(&chunk[..take], at);
                    stdout
                        .lock()
                        .write_all(text.as_bytes())
                        .context(|| "could not write to stdout".to_string())?;
                    dumped += take as u64;
                }
            }
        }
        done += n as u64;
    }
    if let Sink::Save(w) = &mut sink {
        w.flush()
            .context(|| format!("could not write '{}'", to_name()))?;
    }
    image
        .close()
        .context(|| format!("could not close '{}'", args.image.display()))?;
    if matches!(sink, Sink::Dump) && dumped < args.length {
        println!(
            "(hexdump limited to {dumped} of {} bytes; use --dump-limit to see more)",
            args.length
        );
    }
    let status = format!("read {} bytes at offset {}", args.length, args.offset);
    if to_stdout {
        eprintln!("{status}");
    } else {
        println!("{status}");
    }
    Ok(())
}

/// Hexdump of `data` as `qemu-io read -v` prints it: 16 bytes a line, each line led
/// by its guest offset, followed by the alphanumeric characters (others as `.`).
pub fn hexdump(data: &[u8], offset: u64) -> String {
    let mut out = String::with_capacity(data.len() / 16 * 75 + 75);
    for (i, line) in data.chunks(16).enumerate() {
        out += &format!("{:08x}:  ", offset + (i as u64) * 16);
        for b in line {
            out += &format!("{b:02x} ");
        }
        for _ in line.len()..16 {
            out += "   ";
        }
        out.push(' ');
        out.extend(line.iter().map(|&b| {
            if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            }
        }));
        out.push('\n');
    }
    out
}

/// Unit tests of the hexdump layout.
#[cfg(test)]
mod tests {
    use super::hexdump;

    /// Full and partial lines look like `qemu-io read -v` output.
    #[test]
    fn hexdump_matches_qemu_io_layout() {
        let data = [0xabu8; 16];
        assert_eq!(
            hexdump(&data, 0),
            "00000000:  ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab  ................\n"
        );
        let text = hexdump(b"Hello, qcow2 world!", 0x10);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("00000010:  48 65 6c 6c 6f 2c "));
        assert!(lines[0].ends_with("  Hello..qcow2.wor"));
        assert_eq!(
            lines[1],
            format!("00000020:  6c 64 21 {} ld.", "   ".repeat(13))
        );
        assert_eq!(hexdump(&[], 0), "");
    }
}
