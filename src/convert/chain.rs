//! `commit` and `rebase`: moving data between the layers of a backing chain.
//!
//! - commit copies what the layers above a base allocate into the base (with the
//!   copy engine), flushes the base, and then — when the base is the image's own
//!   backing file and `-d` is not given — empties the top image, as qemu-img does.
//! - rebase (safe mode) writes into the image every cluster it does not allocate
//!   itself that reads differently through the new backing file, then names the new
//!   backing file; `-u` only names it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::endpoint::{Format, OpenSpec, Source, Target};
use super::{ConvertOptions, CopyReport, ProgressFn};
use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use crate::io::FileStorage;

/// What [`commit`] does.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// The image of the chain to commit into (`-b`; default: the image's backing
    /// file). A base given explicitly leaves the top image as it is (as `-d`).
    pub base: Option<PathBuf>,
    /// Keep the top image's data after the commit (`-d`).
    pub keep_top: bool,
    /// Worker threads (0 = the default).
    pub workers: usize,
    /// The passphrase of encrypted images of the chain.
    pub secret: Option<crate::crypto::Secret>,
}

/// Commits the image at `path` into a base of its backing chain (see the module
/// notes). `progress` is called on this thread with (bytes done, total).
pub fn commit(
    path: &Path,
    opts: &CommitOptions,
    progress: Option<&mut ProgressFn<'_>>,
) -> Result<CopyReport> {
    // The top image is held locked as a writer by a descriptor of its own, while the
    // chain is opened without locks: the base must be opened for writing below,
    // which the chain's reader locks would refuse.
    let guard = FileStorage::open(path, false, false)
        .map_err(|e| Error::io(format!("cannot open '{}'", path.display()), e))?;
    crate::image::lock_image_file(&guard, path, &OpenOptions::default())?;
    let top = Image::open(
        path,
        &OpenOptions {
            locking: false,
            secret: opts.secret.clone(),
            ..OpenOptions::default()
        },
    )?;
    let info = top.info();
    if info.backing_chain.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "'{}' has no backing file to commit into",
            path.display()
        )));
    }
    let (depth, base_info) = match &opts.base {
        None => (1, info.backing_chain[0].clone()),
        Some(b) => {
            let want = canonical(b)?;
            let found = info
                .backing_chain
                .iter()
                .enumerate()
                .find(|(_, l)| canonical(Path::new(&l.filename)).ok().as_ref() == Some(&want));
            match found {
                Some((i, l)) => (i as u32 + 1, l.clone()),
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "'{}' is not in the backing chain of '{}'",
                        b.display(),
                        path.display()
                    )))
                }
            }
        }
    };
    let base_path = PathBuf::from(&base_info.filename);
    let base = Target::open(
        &base_path,
        &OpenSpec {
            format: Some(Format::parse(&base_info.format)?),
            secret: opts.secret.clone(),
            ..OpenSpec::default()
        },
    )?;
    // A base smaller than the top grows to its size first, as QEMU's commit does.
    if base.size()? < top.size() {
        match &base {
            Target::Qcow2(img) => img.resize(top.size(), false)?,
            Target::Raw { storage: s, .. } => s
                .set_len(top.size())
                .map_err(|e| Error::io(format!("growing '{}'", base_path.display()), e))?,
        }
    }
    let source = Arc::new(Source::Qcow2(top));
    let target = Arc::new(base);
    let copy_opts = ConvertOptions {
        workers: if opts.workers == 0 {
            super::DEFAULT_WORKERS
        } else {
            opts.workers
        },
        existing_target: true,
        ..ConvertOptions::default()
    };
    let report = super::copy_planned(
        Arc::clone(&source),
        Arc::clone(&target),
        &copy_opts,
        Some(depth),
        false,
        progress,
    );
    let target = Arc::into_inner(target);
    let closed = target.map(Target::close).transpose();
    let report = report?;
    closed?;
    let Some(Source::Qcow2(top)) = Arc::into_inner(source) else {
        return Err(Error::InvalidArgument(
            "a copy worker still holds the image (a bug in cowdisk)".into(),
        ));
    };
    // The base holds the data durably now; only then may the top let go of it.
    if opts.base.is_none() && !opts.keep_top {
        top.make_empty()?;
    }
    top.close()?;
    drop(guard);
    Ok(report)
}

fn canonical(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).map_err(|e| Error::io(format!("cannot find '{}'", p.display()), e))
}

/// What [`rebase`] does.
#[derive(Debug, Clone, Default)]
pub struct RebaseOptions {
    /// The new backing file name as stored (relative names resolve against the
    /// image's folder); `None` or empty: no backing file.
    pub backing_file: Option<String>,
    /// Its format (`-F`; probed when `None`).
    pub backing_format: Option<String>,
    /// Only rename the backing file, copying nothing (`-u`).
    pub unsafe_mode: bool,
    /// Open the new backing file even when another process writes it (`-U`).
    pub force_share: bool,
    /// Worker threads (0 = the default).
    pub workers: usize,
    /// The passphrase of the image and of encrypted backing files.
    pub secret: Option<crate::crypto::Secret>,
}

/// What a safe rebase did.
#[derive(Debug, Clone, Copy, Default)]
pub struct RebaseReport {
    /// Bytes examined (what the image does not allocate itself).
    pub total: u64,
    /// Bytes written into the image because they read differently through the new
    /// backing file.
    pub written: u64,
}

/// Rebases the image at `path` onto a new backing file (see the module notes).
/// `progress` is called on this thread with (bytes done, total).
pub fn rebase(
    path: &Path,
    opts: &RebaseOptions,
    progress: Option<&mut ProgressFn<'_>>,
) -> Result<RebaseReport> {
    let new_name = opts.backing_file.as_deref().filter(|n| !n.is_empty());
    if opts.unsafe_mode {
        let img = Image::open(
            path,
            &OpenOptions {
                follow_backing: false,
                metadata_only: true,
                ..OpenOptions::default()
            },
        )?;
        img.set_backing_file(new_name, opts.backing_format.as_deref())?;
        img.close()?;
        return Ok(RebaseReport::default());
    }
    let img = Arc::new(Image::open(
        path,
        &OpenOptions {
            secret: opts.secret.clone(),
            ..OpenOptions::default()
        },
    )?);
    let new_backing = match new_name {
        None => None,
        Some(name) => {
            let resolved = match Path::new(name).is_absolute() {
                true => PathBuf::from(name),
                false => path.parent().unwrap_or(Path::new(".")).join(name),
            };
            let spec = OpenSpec {
                format: opts
                    .backing_format
                    .as_deref()
                    .map(Format::parse)
                    .transpose()?,
                force_share: opts.force_share,
                secret: opts.secret.clone(),
                ..OpenSpec::default()
            };
            Some(Arc::new(Source::open(&resolved, &spec)?))
        }
    };
    let workers = if opts.workers == 0 {
        super::DEFAULT_WORKERS
    } else {
        opts.workers
    };
    let report = rewrite_differences(&img, new_backing.clone(), workers, progress)?;
    drop(new_backing);
    img.set_backing_file(new_name, opts.backing_format.as_deref())?;
    let img = Arc::into_inner(img).ok_or_else(|| {
        Error::InvalidArgument("a rebase worker still holds the image (a bug in cowdisk)".into())
    })?;
    img.close()?;
    Ok(report)
}

/// Writes into `img` every cluster it does not allocate itself whose bytes through
/// its current chain differ from `new` (zeros when `None`), on `workers` threads.
fn rewrite_differences(
    img: &Arc<Image>,
    new: Option<Arc<Source>>,
    workers: usize,
    mut progress: Option<&mut ProgressFn<'_>>,
) -> Result<RebaseReport> {
    let size = img.size();
    let cs = u64::from(img.info().cluster_size);
    // Cluster-aligned ranges the image does not allocate itself.
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut at = 0;
    while at < size {
        let extents = img.block_status(at, size - at, 4096)?;
        if extents.is_empty() {
            break;
        }
        for e in &extents {
            at = e.start + e.length;
            if e.depth == 0 && e.present {
                continue;
            }
            let (s, t) = (e.start / cs * cs, (at.div_ceil(cs) * cs).min(size));
            match ranges.last_mut() {
                Some(last) if last.1 >= s => last.1 = last.1.max(t),
                _ => ranges.push((s, t)),
            }
        }
    }
    let total: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
    let chunk = super::CHUNK_SIZE.div_ceil(cs) * cs;
    // Work items: pieces of at most one chunk.
    let mut items: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        let mut p = s;
        while p < e {
            let n = chunk.min(e - p);
            items.push((p, n));
            p += n;
        }
    }
    let shared = Arc::new(RebaseShared {
        items,
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
        written: AtomicU64::new(0),
        failure: Mutex::new(None),
    });
    let mut handles = Vec::new();
    for i in 0..workers.clamp(1, super::MAX_WORKERS) {
        let (worker, img, new) = (Arc::clone(&shared), Arc::clone(img), new.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("cowdisk-rebase-{i}"))
            .spawn(move || {
                let mut old_buf = super::copy::AlignedBuf::new(chunk as usize);
                let mut new_buf = super::copy::AlignedBuf::new(chunk as usize);
                let (old, newb) = (old_buf.as_mut_slice(), new_buf.as_mut_slice());
                while !worker.failed() {
                    let k = worker.next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&(start, len)) = worker.items.get(k) else {
                        return;
                    };
                    match rebase_chunk(&img, new.as_deref(), start, len, cs, old, newb) {
                        Ok(n) => {
                            worker.written.fetch_add(n, Ordering::Relaxed);
                            worker.done.fetch_add(len, Ordering::Relaxed);
                        }
                        Err(e) => worker.fail(e),
                    }
                }
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                shared.fail(Error::io("starting a rebase worker", e));
                break;
            }
        }
    }
    // This thread reports progress and lets the caller cancel.
    // The first call always says 0, however fast the workers are.
    let mut last = Some(0);
    if let Some(p) = progress.as_mut() {
        if !p(0, total) {
            shared.fail(Error::Cancelled(
                "the progress callback asked to stop".into(),
            ));
        }
    }
    while handles.iter().any(|h| !h.is_finished()) {
        let d = shared.done.load(Ordering::Relaxed);
        if let Some(p) = progress.as_mut() {
            // Once the callback asked to stop (or a worker failed) it is not called again.
            if last != Some(d) && !shared.failed() {
                last = Some(d);
                if !p(d, total) {
                    shared.fail(Error::Cancelled(
                        "the progress callback asked to stop".into(),
                    ));
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for h in handles {
        if h.join().is_err() {
            shared.fail(Error::InvalidArgument(
                "a rebase worker panicked (a bug in cowdisk)".into(),
            ));
        }
    }
    if let Some(e) = shared.failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(e);
    }
    if let Some(p) = progress.as_mut() {
        p(total, total);
    }
    Ok(RebaseReport {
        total,
        written: shared.written.load(Ordering::Relaxed),
    })
}

/// What the rebase workers share.
struct RebaseShared {
    items: Vec<(u64, u64)>,
    next: AtomicU64,
    done: AtomicU64,
    written: AtomicU64,
    failure: Mutex<Option<Error>>,
}

impl RebaseShared {
    fn failed(&self) -> bool {
        self.failure.lock().map(|f| f.is_some()).unwrap_or(true)
    }

    fn fail(&self, e: Error) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(e);
        }
    }
}

/// Rewrites the clusters of one chunk that differ; returns the bytes written.
fn rebase_chunk(
    img: &Image,
    new: Option<&Source>,
    start: u64,
    len: u64,
    cs: u64,
    old: &mut [u8],
    newb: &mut [u8],
) -> Result<u64> {
    let (old, newb) = (&mut old[..len as usize], &mut newb[..len as usize]);
    img.read_at(old, start)?;
    match new {
        Some(n) => n.read_at(newb, start)?,
        None => newb.fill(0),
    }
    let mut written = 0;
    let mut i = 0;
    while i < len as usize {
        let n = (cs as usize).min(len as usize - i);
        if old[i..i + n] != newb[i..i + n] {
            // Whole runs of differing clusters in one write.
            let mut j = i + n;
            while j < len as usize {
                let m = (cs as usize).min(len as usize - j);
                if old[j..j + m] == newb[j..j + m] {
                    break;
                }
                j += m;
            }
            img.write_at(&old[i..j], start + i as u64)?;
            written += (j - i) as u64;
            i = j;
        } else {
            i += n;
        }
    }
    Ok(written)
}
