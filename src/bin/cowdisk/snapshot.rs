//! `cowdisk snapshot`: list, create, apply and delete internal snapshots, like
//! `qemu-img snapshot`.

use crate::parse::human_size;
use crate::parse::FormatArg;
use crate::{CliError, CliResult, PathContext};
use clap::{ArgGroup, Args};
use cowdisk::{Image, OpenOptions, SnapshotInfo, SnapshotOptions};
use std::path::PathBuf;

/// Arguments of `cowdisk snapshot`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("action").required(true).args(["list", "create", "apply", "delete"])))]
pub struct SnapshotArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    #[command(flatten)]
    format: FormatArg,
    /// List the snapshots (opens the image read-only).
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot named NAME of the current contents.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Apply snapshot NAME (an id, or else a name): the image reverts to it.
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete snapshot NAME (an id, or else a name).
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// With -l: list even while another process writes the image.
    #[arg(short = 'U', long = "force-share", requires = "list")]
    force_share: bool,
    /// The image.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// The guest clock as qemu-img shows it: hours:minutes:seconds.milliseconds.
fn format_clock(nsec: u64) -> String {
    let ms = nsec / 1_000_000;
    let secs = ms / 1000;
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms % 1000
    )
}

/// A date in local time, `YYYY-MM-DD HH:MM:SS`.
fn format_date(sec: u32) -> String {
    let t = sec as libc::time_t;
    // SAFETY: localtime_r only writes the tm we pass.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return sec.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The heading line of the listing.
pub fn header_row() -> String {
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )
}

/// One line of the listing, in qemu-img's columns.
pub fn format_row(s: &SnapshotInfo) -> String {
    let icount = if s.icount < 0 {
        "--".to_string()
    } else {
        s.icount.to_string()
    };
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        s.id,
        s.name,
        human_size(s.vm_state_size),
        format_date(s.date_sec),
        format_clock(s.vm_clock_nsec),
        icount
    )
}

/// Runs `cowdisk snapshot`.
pub fn run(args: SnapshotArgs) -> CliResult {
    args.format.check()?;
    let opts = OpenOptions {
        read_only: args.list,
        force_share: args.force_share,
        metadata_only: true,
        secret: args.secret.secret(None)?,
        ..OpenOptions::default()
    };
    let img = Image::open(&args.file, &opts).path_context("open", &args.file)?;
    let name = args.file.display();
    if args.list {
        let list = img.snapshots()?;
        if !list.is_empty() {
            println!("Snapshot list:");
            println!("{}", header_row());
            for s in &list {
                println!("{}", format_row(s));
            }
        }
    } else if let Some(tag) = &args.create {
        img.snapshot_create(tag, &SnapshotOptions::default())
            .map_err(|e| {
                CliError(format!(
                    "could not create snapshot '{tag}' in '{name}': {e}"
                ))
            })?;
    } else if let Some(tag) = &args.apply {
        img.snapshot_goto(tag)
            .map_err(|e| CliError(format!("could not apply snapshot '{tag}' to '{name}': {e}")))?;
    } else if let Some(tag) = &args.delete {
        img.snapshot_delete(tag).map_err(|e| {
            CliError(format!(
                "could not delete snapshot '{tag}' of '{name}': {e}"
            ))
        })?;
    }
    img.close().path_context("close", &args.file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_like_qemu_img() {
        assert_eq!(format_clock(0), "0000:00:00.000");
        assert_eq!(format_clock(3_723_456_000_000), "0001:02:03.456");
    }

    #[test]
    fn row_columns() {
        let s = SnapshotInfo {
            id: "1".into(),
            name: "s1".into(),
            vm_state_size: 0,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            disk_size: 0,
            icount: 0,
        };
        let row = format_row(&s);
        assert!(
            row.starts_with("1       s1                    0 B "),
            "{row:?}"
        );
        assert!(row.ends_with(" 0000:00:00.000          0"), "{row:?}");
        let none = format_row(&SnapshotInfo { icount: -1, ..s });
        assert!(none.ends_with("         --"), "{none:?}");
    }
}
