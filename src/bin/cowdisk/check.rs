//! `cowdisk check`: like `qemu-img check` — the same findings on stderr, the same
//! summary (human or JSON) on stdout, the same exit codes: 0 clean, 1 check not
//! completed, 2 corruptions, 3 leaks only.

use crate::parse::FormatArg;
use crate::{CliError, CliResult, PathContext};
use clap::{Args, ValueEnum};
use cowdisk::image::{CheckReport, Repair};
use cowdisk::{Image, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;

/// What `-r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    /// Leaked clusters only.
    Leaks,
    /// Everything that can be repaired.
    All,
}

/// Output formats of `cowdisk check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckFormat {
    /// qemu-img's text summary.
    Human,
    /// qemu-img's JSON object.
    Json,
}

/// Arguments of `cowdisk check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    #[command(flatten)]
    format: FormatArg,
    /// Repair leaks, or all repairable problems (opens the image read-write).
    #[arg(short = 'r', long = "repair", value_enum)]
    repair: Option<RepairArg>,
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t = CheckFormat::Human)]
    output: CheckFormat,
    /// Check even while another process writes the image (not with -r).
    #[arg(short = 'U', long = "force-share", conflicts_with = "repair")]
    force_share: bool,
    /// Show progress on stderr.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Print nothing on stdout.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image to check.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further \
                 writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                 space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let a = r.allocated_clusters as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// qemu-img's JSON, keys in its order, counts only when non-zero.
fn json(r: &CheckReport, filename: &str) -> String {
    let mut fields: Vec<(&str, serde_json::Value)> = Vec::new();
    let mut count = |k: &'static str, v: u64, always: bool| {
        if always || v != 0 {
            fields.push((k, v.into()));
        }
    };
    count("image-end-offset", r.image_end_offset, false);
    count("compressed-clusters", r.compressed_clusters, false);
    count("total-clusters", r.total_clusters, false);
    count("corruptions", r.corruptions, false);
    count("corruptions-fixed", r.corruptions_fixed, false);
    count("check-errors", r.check_errors, true);
    count("leaks", r.leaks, false);
    count("leaks-fixed", r.leaks_fixed, false);
    count("allocated-clusters", r.allocated_clusters, false);
    fields.push(("filename", filename.into()));
    fields.push(("format", "qcow2".into()));
    if r.fragmented_clusters != 0 {
        fields.push(("fragmented-clusters", r.fragmented_clusters.into()));
    }
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("    \"{k}\": {v}"))
        .collect();
    format!("{{\n{}\n}}\n", body.join(",\n"))
}

fn print_messages(r: &CheckReport) {
    let mut err = std::io::stderr().lock();
    for m in &r.messages {
        let _ = writeln!(err, "{m}");
    }
}

/// Runs `cowdisk check`; returns the exit code.
pub fn run(args: CheckArgs) -> CliResult<u8> {
    args.format.check()?;
    let repair = match args.repair {
        None => Repair::None,
        Some(RepairArg::Leaks) => Repair::Leaks,
        Some(RepairArg::All) => Repair::All,
    };
    let opts = OpenOptions {
        read_only: repair == Repair::None,
        force_share: args.force_share,
        follow_backing: false,
        check: true,
        metadata_only: true,
        secret: args.secret.secret(None)?,
        ..OpenOptions::default()
    };
    let img = Image::open(&args.file, &opts).path_context("open", &args.file)?;
    let show = args.progress;
    let mut progress = |done: f64| {
        if show {
            eprint!("    ({:.2}/100%)\r", done * 100.0);
        }
    };
    let first = img
        .check_with_progress(repair, &mut progress)
        .map_err(|e| CliError(format!("Check failed: {e}")))?;
    print_messages(&first);
    if let Some(why) = &first.failed {
        return Err(CliError(format!("Check failed: {why}")));
    }
    let filename = args.file.display().to_string();
    let mut out = String::new();
    let report = if repair != Repair::None && (first.corruptions_fixed + first.leaks_fixed) > 0 {
        if args.output == CheckFormat::Human {
            out.push_str(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked \
                 clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                first.leaks_fixed, first.corruptions_fixed
            ));
        }
        let mut again = img
            .check(Repair::None)
            .map_err(|e| CliError(format!("Check failed: {e}")))?;
        print_messages(&again);
        again.leaks_fixed = first.leaks_fixed;
        again.corruptions_fixed = first.corruptions_fixed;
        again
    } else {
        first
    };
    img.close()
        .map_err(|e| CliError(format!("could not close '{filename}': {e}")))?;
    out.push_str(&match args.output {
        CheckFormat::Human => human(&report),
        CheckFormat::Json => json(&report, &filename),
    });
    if !args.quiet {
        print!("{out}");
    }
    Ok(if report.check_errors > 0 {
        eprintln!(
            "cowdisk: Check failed: {} check errors",
            report.check_errors
        );
        1
    } else if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}
