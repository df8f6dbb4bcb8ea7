//! The copy engine, a service over the engine's public API: `convert` (qcow2 or raw to
//! qcow2, compressed qcow2 or raw, with parallel workers), and on the same parts
//! `compare`, `measure`, `commit` and `rebase`, with qemu-img's meaning.
//!
//! How a convert runs: one block-status pass over the source gives the work list
//! (`plan.rs`: what is copied, what is zeroed, what is left alone) and the progress
//! total; workers (`copy.rs`) read chunks in parallel, skip or zero the zero runs they
//! find, compress where asked, and write in guest order (or as soon as ready); the
//! target is flushed once at the end.

mod bitmaps;
mod chain;
mod compare;
mod copy;
mod endpoint;
mod measure;
mod plan;

pub use chain::{commit, rebase, CommitOptions, RebaseOptions, RebaseReport};
pub use compare::{compare, compare_sources, CompareOptions, Comparison};
pub use copy::{CopyReport, ProgressFn};
pub use endpoint::{Format, OpenSpec, Source, SourceSpan, Target};
pub use measure::{measure, Measurement};

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::{CreateOptions, Image};
use crate::io::{FileStorage, Storage};

/// Default number of workers (qemu-img's `-m` default).
pub const DEFAULT_WORKERS: usize = 8;
/// Most workers allowed.
pub const MAX_WORKERS: usize = 16;
/// Default zero-detection threshold (qemu-img's `-S` default).
pub const DEFAULT_MIN_SPARSE: u64 = 4096;
/// Bytes each worker reads and writes per chunk.
pub const CHUNK_SIZE: u64 = 2 << 20;

/// What [`convert`] does. The defaults are qemu-img's.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// How the source is opened (format probed when `None`, `-T none`, `-l`, `-U`).
    pub source: OpenSpec,
    /// The target's format (`-O`).
    pub target_format: Format,
    /// Options of a new qcow2 target (`-o`, and `-B`/`-F` as its backing file).
    pub create: CreateOptions,
    /// Write into an existing target instead of creating it (`-n`).
    pub existing_target: bool,
    /// The existing target already reads as zeros (`--target-is-zero`, with `-n`).
    pub target_is_zero: bool,
    /// Open the target with O_DIRECT (`-t none`).
    pub target_direct: bool,
    /// Never flush the target (`-t unsafe`, qemu-img convert's default): the copy is
    /// not durable when the call returns. Off by default: the target is flushed
    /// once at the end.
    pub target_no_flush: bool,
    /// Write compressed clusters (`-c`, qcow2 targets).
    pub compressed: bool,
    /// Write chunks as soon as they are ready instead of in guest order (`-W`).
    pub out_of_order: bool,
    /// Worker threads (`-m`, 1 to 16).
    pub workers: usize,
    /// Zero runs of at least this many bytes are not written as data (`-S`; 0 = no
    /// zero detection: every byte is copied).
    pub min_sparse: u64,
    /// Carry the source's persistent dirty bitmaps into the (qcow2) target
    /// (`--bitmaps`).
    pub bitmaps: bool,
    /// With `bitmaps`: leave inconsistent bitmaps out instead of failing
    /// (`--skip-broken-bitmaps`).
    pub skip_broken_bitmaps: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            source: OpenSpec::default(),
            target_format: Format::Qcow2,
            create: CreateOptions::default(),
            existing_target: false,
            target_is_zero: false,
            target_direct: false,
            target_no_flush: false,
            compressed: false,
            out_of_order: false,
            workers: DEFAULT_WORKERS,
            min_sparse: DEFAULT_MIN_SPARSE,
            bitmaps: false,
            skip_broken_bitmaps: false,
        }
    }
}

impl ConvertOptions {
    fn validate(&self) -> Result<()> {
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(Error::InvalidArgument(format!(
                "the number of workers must be from 1 to {MAX_WORKERS}, not {}",
                self.workers
            )));
        }
        if self.compressed && self.target_format != Format::Qcow2 {
            return Err(Error::InvalidArgument(
                "compression needs a qcow2 target".into(),
            ));
        }
        if self.bitmaps && self.target_format != Format::Qcow2 {
            return Err(Error::InvalidArgument(
                "--bitmaps needs a qcow2 target".into(),
            ));
        }
        if self.skip_broken_bitmaps && !self.bitmaps {
            return Err(Error::InvalidArgument(
                "--skip-broken-bitmaps is for --bitmaps only".into(),
            ));
        }
        if self.target_is_zero && !self.existing_target {
            return Err(Error::InvalidArgument(
                "--target-is-zero is for existing targets (-n) only".into(),
            ));
        }
        if self.create.backing_file.is_some() && self.target_format != Format::Qcow2 {
            return Err(Error::InvalidArgument(
                "a backing file needs a qcow2 target".into(),
            ));
        }
        if self.create.backing_file.is_some() && self.existing_target {
            return Err(Error::InvalidArgument(
                "a backing file (-B) is for new targets; an existing target keeps its own".into(),
            ));
        }
        Ok(())
    }
}

/// Converts the image at `src` into `dst` (created unless `existing_target`), calling
/// `progress` on this thread with (bytes done, total) as the copy advances; it may
/// return false to cancel ([`Error::Cancelled`]). A failed or cancelled convert
/// removes a target it created; an existing target keeps what was written (the
/// error says so).
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: Option<&mut ProgressFn<'_>>,
) -> Result<CopyReport> {
    opts.validate()?;
    let source = Arc::new(Source::open(src, &opts.source)?);
    let carried = bitmaps::collect(&source, opts)?;
    if opts.existing_target {
        let spec = OpenSpec {
            format: Some(opts.target_format),
            direct: opts.target_direct,
            no_flush: opts.target_no_flush,
            secret: opts.create.secret.clone(),
            ..OpenSpec::default()
        };
        let target = Target::open(dst, &spec)?;
        let size = target.size()?;
        if size < source.size() {
            return Err(Error::InvalidArgument(format!(
                "the target '{}' is smaller ({size} bytes) than the source ({} bytes)",
                dst.display(),
                source.size()
            )));
        }
        return copy_and_close(source, target, opts, &carried, progress).map_err(|e| {
            e.with_note(&format!(
                "the existing target '{}' keeps what was written before the failure",
                dst.display()
            ))
        });
    }
    if dst.exists() {
        // qemu-img overwrites; a library call should not silently destroy a file.
        std::fs::remove_file(dst)
            .map_err(|e| Error::io(format!("cannot replace '{}'", dst.display()), e))?;
    }
    let result = create_target(dst, source.size(), opts)
        .and_then(|target| copy_and_close(source, target, opts, &carried, progress));
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// Creates the target file and opens it.
fn create_target(dst: &Path, size: u64, opts: &ConvertOptions) -> Result<Target> {
    match opts.target_format {
        Format::Qcow2 => {
            Image::create(dst, size, &opts.create)?;
            let spec = OpenSpec {
                format: Some(Format::Qcow2),
                direct: opts.target_direct,
                no_flush: opts.target_no_flush,
                secret: opts.create.secret.clone(),
                ..OpenSpec::default()
            };
            Target::open(dst, &spec)
        }
        Format::Raw => {
            let storage = FileStorage::create(dst)
                .map_err(|e| Error::io(format!("cannot create '{}'", dst.display()), e))?;
            storage
                .set_len(size)
                .map_err(|e| Error::io(format!("sizing '{}'", dst.display()), e))?;
            drop(storage);
            let spec = OpenSpec {
                format: Some(Format::Raw),
                direct: opts.target_direct,
                no_flush: opts.target_no_flush,
                secret: opts.create.secret.clone(),
                ..OpenSpec::default()
            };
            Target::open(dst, &spec)
        }
    }
}

fn copy_and_close(
    source: Arc<Source>,
    target: Target,
    opts: &ConvertOptions,
    carried: &bitmaps::Carried,
    progress: Option<&mut ProgressFn<'_>>,
) -> Result<CopyReport> {
    let target = Arc::new(target);
    let report = copy_between(source, Arc::clone(&target), opts, progress).and_then(|report| {
        carried.store(&target)?;
        Ok(report)
    });
    let target = Arc::into_inner(target).ok_or_else(|| {
        Error::InvalidArgument("a copy worker still holds the target (a bug in cowdisk)".into())
    })?;
    let closed = target.close();
    let report = report?;
    closed?;
    Ok(report)
}

/// The copy itself between an open source and target, as [`convert`] runs it; the
/// caller flushes or closes the target. A new target (`opts.existing_target`
/// false) is taken to read as zeros unless it has a backing file.
pub fn copy_between(
    source: Arc<Source>,
    target: Arc<Target>,
    opts: &ConvertOptions,
    progress: Option<&mut ProgressFn<'_>>,
) -> Result<CopyReport> {
    opts.validate()?;
    let above_layer = (target.has_backing() && !opts.existing_target).then_some(1);
    let target_reads_zero = if opts.existing_target {
        opts.target_is_zero
    } else {
        !target.has_backing()
    };
    copy_planned(
        source,
        target,
        opts,
        above_layer,
        target_reads_zero,
        progress,
    )
}

/// Plans and runs a copy: only layers above `above_layer` of the source (all when
/// `None`); `target_reads_zero` says zeros need not be written.
pub(crate) fn copy_planned(
    source: Arc<Source>,
    target: Arc<Target>,
    opts: &ConvertOptions,
    above_layer: Option<u32>,
    target_reads_zero: bool,
    progress: Option<&mut ProgressFn<'_>>,
) -> Result<CopyReport> {
    let granularity = target.granularity();
    if opts.compressed && !matches!(&*target, Target::Qcow2(_)) {
        return Err(Error::InvalidArgument(
            "compression needs a qcow2 target".into(),
        ));
    }
    let rules = plan::PlanRules {
        target_reads_zero,
        above_layer,
        detect_zeroes: opts.min_sparse > 0,
        align: if opts.compressed { granularity } else { 1 },
    };
    let works = plan::plan(&source, &rules)?;
    let chunk = CHUNK_SIZE.max(granularity).div_ceil(granularity) * granularity;
    let rules = copy::CopyRules {
        workers: opts.workers,
        out_of_order: opts.out_of_order,
        min_sparse: opts.min_sparse,
        granularity: if opts.min_sparse > 0 && !opts.compressed && granularity == 4096 {
            // Raw targets: holes as small as -S allows (qemu-img aligns to it).
            prev_power_of_two(opts.min_sparse).clamp(512, 4096)
        } else {
            granularity
        },
        target_reads_zero,
        compressed: opts.compressed,
        chunk,
    };
    copy::run(source, target, works, rules, progress)
}

fn prev_power_of_two(n: u64) -> u64 {
    if n == 0 {
        1
    } else {
        1 << (63 - n.leading_zeros())
    }
}
