//! `cowdisk`: a command-line tool over the cowdisk qcow2 library, modelled on
//! `qemu-img` (`create`, `info`, `map`, `resize`) and `qemu-io` (`read`, `write`,
//! `zero`, `discard`).
//!
//! Errors print `cowdisk: <message>` on stderr and exit with status 1.

/// `cowdisk amend`.
mod amend;
/// `cowdisk bench`, `bench-compress` and `bench-vmstate`.
mod bench;
/// `cowdisk bitmap`.
mod bitmap;
/// `cowdisk map`, `zero`, `discard` and `resize`.
mod blocks;
/// `cowdisk check`.
mod check;
/// `cowdisk convert`, `compare`, `measure`, `commit` and `rebase`.
mod copy;
/// `cowdisk create`.
mod create;
/// `cowdisk info`.
mod info;
/// `cowdisk generate-man-pages` (hidden): the manual pages.
mod man;
/// Size, pattern and option parsing; size formatting.
mod parse;
/// `cowdisk read` and `cowdisk write`.
mod rw;
/// `--secret-file` and `--object secret,…`: passphrases of encrypted images.
mod secret;
/// `cowdisk snapshot`.
mod snapshot;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::fmt;
use std::process::ExitCode;

/// Create, inspect, read, write, map and resize qcow2 images.
#[derive(Debug, Parser)]
#[command(name = "cowdisk", version, propagate_version = true)]
struct Cli {
    /// The operation to perform.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands of `cowdisk`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new qcow2 image (like `qemu-img create -f qcow2`).
    Create(create::CreateArgs),
    /// Show facts about an image (like `qemu-img info`); opens it read-only.
    Info(info::InfoArgs),
    /// Write a byte pattern or a file's contents into an image (like `qemu-io -c write`).
    Write(rw::WriteArgs),
    /// Read from an image: verify a pattern, save to a file, or hexdump (like `qemu-io -c read`).
    Read(rw::ReadArgs),
    /// Show how guest bytes map to the files of the chain (like `qemu-img map`); opens it read-only.
    Map(blocks::MapArgs),
    /// Make a range read as zeros (like `qemu-io -c 'write -z'`).
    Zero(blocks::ZeroArgs),
    /// Release the whole clusters of a range (like `qemu-io -c discard`).
    Discard(blocks::DiscardArgs),
    /// Change the virtual size (like `qemu-img resize`).
    Resize(blocks::ResizeArgs),
    /// Time a stream of reads or writes (like `qemu-img bench`, same options).
    Bench(bench::BenchArgs),
    /// Time compressing a raw file into a new image (like `qemu-img convert -c`).
    BenchCompress(bench::BenchCompressArgs),
    /// Time saving a VM state stream in realistic pieces, finalize included.
    BenchVmstate(bench::BenchVmstateArgs),
    /// List, create, apply or delete internal snapshots (like `qemu-img snapshot`).
    Snapshot(snapshot::SnapshotArgs),
    /// Check an image's metadata and repair it (like `qemu-img check`; exit 0 clean,
    /// 1 check not completed, 2 corruptions, 3 leaks only).
    Check(check::CheckArgs),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps (like
    /// `qemu-img bitmap`), or print a bitmap's dirty runs (`--dirty`, cowdisk's own).
    Bitmap(bitmap::BitmapArgs),
    /// Change an image's version, lazy refcounts or refcount width in place (like
    /// `qemu-img amend`).
    Amend(amend::AmendArgs),
    /// Copy an image into a new or existing qcow2 or raw image, in parallel (like
    /// `qemu-img convert`).
    Convert(copy::ConvertArgs),
    /// Compare the contents of two images (like `qemu-img compare`; exit 0
    /// identical, 1 different, 2 error).
    Compare(copy::CompareArgs),
    /// Compute the size an image needs (like `qemu-img measure`).
    Measure(copy::MeasureArgs),
    /// Copy an image's data into its backing file (like `qemu-img commit`).
    Commit(copy::CommitArgs),
    /// Change an image's backing file, keeping what it reads (like `qemu-img rebase`).
    Rebase(copy::RebaseArgs),
    /// Write the manual pages into a directory (used by `make man`).
    #[command(hide = true)]
    GenerateManPages(man::ManArgs),
}

/// A failure of a subcommand: the message printed after `cowdisk: `.
#[derive(Debug)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    /// Writes the message alone.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for CliError {
    /// Wraps a message.
    fn from(message: String) -> Self {
        CliError(message)
    }
}

impl From<cowdisk::Error> for CliError {
    /// Uses the library error's message.
    fn from(error: cowdisk::Error) -> Self {
        CliError(error.to_string())
    }
}

/// The result of a subcommand.
pub type CliResult<T = ()> = Result<T, CliError>;

/// Adds what the tool was doing to a library error.
pub trait Context<T> {
    /// Prefixes the error message with `what` (computed only on failure).
    fn context(self, what: impl FnOnce() -> String) -> CliResult<T>;
}

impl<T> Context<T> for Result<T, cowdisk::Error> {
    /// Prefixes the error with `what`.
    fn context(self, what: impl FnOnce() -> String) -> CliResult<T> {
        self.map_err(|e| CliError(format!("{}: {e}", what())))
    }
}

/// Adds the file name to a library error unless the message already names it.
pub trait PathContext<T> {
    /// On failure, reports `could not <verb> '<path>': <error>`, or just the error
    /// when its message already mentions `path`.
    fn path_context(self, verb: &str, path: &std::path::Path) -> CliResult<T>;
}

impl<T> PathContext<T> for Result<T, cowdisk::Error> {
    /// Names the file unless the library message already does.
    fn path_context(self, verb: &str, path: &std::path::Path) -> CliResult<T> {
        self.map_err(|e| {
            let message = e.to_string();
            let name = path.display().to_string();
            if message.contains(&format!("'{name}'")) {
                CliError(message)
            } else {
                CliError(format!("could not {verb} '{name}': {message}"))
            }
        })
    }
}

impl<T> Context<T> for std::io::Result<T> {
    /// Prefixes the error with `what`, without Rust's ` (os error N)` suffix.
    fn context(self, what: impl FnOnce() -> String) -> CliResult<T> {
        self.map_err(|e| CliError(format!("{}: {}", what(), io_message(&e))))
    }
}

/// An I/O error's message without Rust's ` (os error N)` suffix.
pub fn io_message(error: &std::io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

/// One line saying what is wrong with the command line: a negative size or offset
/// (which clap takes for an unknown option) says so, a value that does not parse
/// gives the parser's reason once, anything else clap's first line (without its
/// usage and tips).
fn usage_message(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let strings = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        _ => Vec::new(),
    };
    let arg = strings(ContextKind::InvalidArg).into_iter().next();
    match (e.kind(), arg.as_deref()) {
        (ErrorKind::UnknownArgument, Some(a))
            if a.starts_with('-') && a[1..].starts_with(|c: char| c.is_ascii_digit()) =>
        {
            // clap reports `-1` of `-1G`: name the whole word as typed.
            let word = std::env::args()
                .skip(1)
                .find(|w| w.starts_with(a))
                .unwrap_or_else(|| a.to_string());
            return format!("invalid size '{word}': sizes cannot be negative");
        }
        (ErrorKind::ValueValidation, Some(a)) => {
            if let Some(source) = std::error::Error::source(e) {
                return format!("{a}: {source}");
            }
        }
        (ErrorKind::MissingRequiredArgument, _) => {
            return format!(
                "missing required argument: {}",
                strings(ContextKind::InvalidArg).join(", ")
            );
        }
        (ErrorKind::InvalidValue, Some(a)) => {
            let value = strings(ContextKind::InvalidValue).join("");
            let valid = strings(ContextKind::ValidValue);
            if !valid.is_empty() {
                return format!(
                    "invalid value '{value}' for '{a}' (possible values: {})",
                    valid.join(", ")
                );
            }
        }
        _ => {}
    }
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("invalid command line");
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Parses the command line, runs the subcommand, and turns errors into `cowdisk: ...` on stderr with exit status 1.
fn main() -> ExitCode {
    // Like other Unix tools, die quietly when stdout is closed (`cowdisk info | head`).
    // SAFETY: restoring the default disposition of a signal at startup.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // The matches are kept for `bitmap`, whose operations run in command-line order.
    let parsed = Cli::command().try_get_matches().and_then(|m| {
        Cli::from_arg_matches(&m)
            .map(|cli| (cli, m))
            .map_err(|e| e.format(&mut Cli::command()))
    });
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            // Help and --version go to stdout with status 0; usage errors are
            // reported like every other error, `cowdisk: ...`, and exit 1.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::FAILURE;
            }
            eprintln!("cowdisk: {}", usage_message(&e));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Create(args) => create::run(args),
        Command::Info(args) => info::run(args),
        Command::Write(args) => rw::run_write(args),
        Command::Read(args) => rw::run_read(args),
        Command::Map(args) => blocks::run_map(args),
        Command::Zero(args) => blocks::run_zero(args),
        Command::Discard(args) => blocks::run_discard(args),
        Command::Resize(args) => blocks::run_resize(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchCompress(args) => bench::run_compress(args),
        Command::BenchVmstate(args) => bench::run_vmstate(args),
        Command::Snapshot(args) => snapshot::run(args),
        Command::Amend(args) => amend::run(args),
        Command::Bitmap(args) => bitmap::run(args, matches.subcommand_matches("bitmap")),
        Command::Convert(args) => copy::run_convert(args),
        Command::Measure(args) => copy::run_measure(args),
        Command::Commit(args) => copy::run_commit(args),
        Command::Rebase(args) => copy::run_rebase(args),
        Command::GenerateManPages(args) => man::run(args, Cli::command()),
        Command::Compare(args) => match copy::run_compare(args) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => {
                eprintln!("cowdisk: {e}");
                return ExitCode::from(2);
            }
        },
        Command::Check(args) => match check::run(args) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cowdisk: {e}");
            ExitCode::FAILURE
        }
    }
}
