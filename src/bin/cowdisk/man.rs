//! `cowdisk generate-man-pages DIR`: the manual pages, written from the same clap
//! definition that parses the command line, so they cannot drift from `--help`.

use crate::{CliResult, Context};
use clap::{Args, Command};
use std::path::{Path, PathBuf};

/// Arguments of the hidden `generate-man-pages` subcommand (used by `make man`).
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write cowdisk.1 and cowdisk-SUBCOMMAND.1 into (must exist).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// Renders one page of section 1 into `dir/<name>.1`.
fn write_page(dir: &Path, command: Command) -> CliResult<()> {
    let path = dir.join(format!("{}.1", command.get_name()));
    let mut text = Vec::new();
    clap_mangen::Man::new(command)
        .section("1")
        .source(format!("cowdisk {}", env!("CARGO_PKG_VERSION")))
        .manual("cowdisk manual")
        .render(&mut text)
        .context(|| format!("could not render '{}'", path.display()))?;
    std::fs::write(&path, text).context(|| format!("could not write '{}'", path.display()))
}

/// Writes `cowdisk.1` and a page for every subcommand that is not hidden.
pub fn run(args: ManArgs, cli: Command) -> CliResult<()> {
    let cli = cli.disable_help_subcommand(true);
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("cowdisk-{}", sub.get_name());
        let page = sub.clone().bin_name(name.replace('-', " ")).name(name);
        write_page(&args.dir, page)?;
    }
    write_page(&args.dir, cli)
}
