//! `compare`: do two images (qcow2 or raw, any chain) read the same? Both sides are
//! read in parallel chunks; areas both know to read as zeros are not read at all.
//! With different sizes the extra part of the larger must read as zeros (unless
//! strict, where a size difference is a difference), as `qemu-img compare` says.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::endpoint::{OpenSpec, Source};
use super::CHUNK_SIZE;
use crate::error::{Error, Result};

/// What [`compare`] does.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// How the first image is opened (`-f`).
    pub first: OpenSpec,
    /// How the second image is opened (`-F`).
    pub second: OpenSpec,
    /// A size difference is a difference (`-s`).
    pub strict: bool,
    /// Reader threads (1 to 16).
    pub workers: usize,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            first: OpenSpec::default(),
            second: OpenSpec::default(),
            strict: false,
            workers: super::DEFAULT_WORKERS,
        }
    }
}

/// The outcome of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// Every byte reads the same (the larger image's extra part reads as zeros).
    Identical,
    /// The first difference is in the 512-byte sector at this byte offset (the unit
    /// `qemu-img compare` reports).
    Differ {
        /// Byte offset of the sector holding the first differing byte.
        offset: u64,
    },
    /// Strict mode: the sizes differ.
    SizeMismatch {
        /// Size of the first image.
        first: u64,
        /// Size of the second image.
        second: u64,
    },
}

/// Compares the images at `a` and `b`, both opened read-only.
pub fn compare(a: &Path, b: &Path, opts: &CompareOptions) -> Result<Comparison> {
    let first = Source::open(a, &opts.first)?;
    let second = Source::open(b, &opts.second)?;
    compare_sources(Arc::new(first), Arc::new(second), opts.strict, opts.workers)
}

/// Compares two open sources with `workers` reader threads.
pub fn compare_sources(
    a: Arc<Source>,
    b: Arc<Source>,
    strict: bool,
    workers: usize,
) -> Result<Comparison> {
    let (sa, sb) = (a.size(), b.size());
    if strict && sa != sb {
        return Ok(Comparison::SizeMismatch {
            first: sa,
            second: sb,
        });
    }
    let end = sa.max(sb);
    let next = Arc::new(AtomicU64::new(0));
    let first_diff = Arc::new(AtomicU64::new(u64::MAX));
    let error: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
    let mut handles = Vec::new();
    for i in 0..workers.clamp(1, super::MAX_WORKERS) {
        let (a, b) = (Arc::clone(&a), Arc::clone(&b));
        let (next, first_diff, slot) = (
            Arc::clone(&next),
            Arc::clone(&first_diff),
            Arc::clone(&error),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("cowdisk-compare-{i}"))
            .spawn(move || {
                let mut bufa = super::copy::AlignedBuf::new(CHUNK_SIZE as usize);
                let mut bufb = super::copy::AlignedBuf::new(CHUNK_SIZE as usize);
                let (ba, bb) = (bufa.as_mut_slice(), bufb.as_mut_slice());
                loop {
                    let start = next
                        .fetch_add(1, Ordering::Relaxed)
                        .saturating_mul(CHUNK_SIZE);
                    // Chunks past a difference found already cannot hold the first one.
                    if start >= end || start >= first_diff.load(Ordering::Relaxed) {
                        return;
                    }
                    if slot.lock().map(|e| e.is_some()).unwrap_or(true) {
                        return;
                    }
                    let len = CHUNK_SIZE.min(end - start);
                    match compare_chunk(&a, &b, start, len, ba, bb) {
                        Ok(Some(at)) => {
                            first_diff.fetch_min(at, Ordering::Relaxed);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            if let Ok(mut slot) = slot.lock() {
                                slot.get_or_insert(e);
                            }
                            return;
                        }
                    }
                }
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                if let Ok(mut slot) = error.lock() {
                    slot.get_or_insert(Error::io("starting a compare thread", e));
                }
                break;
            }
        }
    }
    for h in handles {
        if h.join().is_err() {
            return Err(Error::InvalidArgument(
                "a compare thread panicked (a bug in cowdisk)".into(),
            ));
        }
    }
    if let Some(e) = error.lock().ok().and_then(|mut e| e.take()) {
        return Err(e);
    }
    Ok(match first_diff.load(Ordering::Relaxed) {
        u64::MAX => Comparison::Identical,
        at => Comparison::Differ {
            offset: at / 512 * 512,
        },
    })
}

/// True when `source` knows from metadata that all of `[start, start+len)` reads as
/// zeros (past its end it does).
fn known_zero(source: &Source, start: u64, len: u64) -> Result<bool> {
    if start >= source.size() {
        return Ok(true);
    }
    let spans = source.spans(start, len, 64)?;
    let covered: u64 = spans.iter().map(|s| s.length).sum();
    Ok(spans.iter().all(|s| s.zero) && (covered >= len || start + covered >= source.size()))
}

/// The offset of the first differing byte of one chunk, if any.
fn compare_chunk(
    a: &Source,
    b: &Source,
    start: u64,
    len: u64,
    ba: &mut [u8],
    bb: &mut [u8],
) -> Result<Option<u64>> {
    if known_zero(a, start, len)? && known_zero(b, start, len)? {
        return Ok(None);
    }
    let (ba, bb) = (&mut ba[..len as usize], &mut bb[..len as usize]);
    a.read_at(ba, start)?;
    b.read_at(bb, start)?;
    if ba == bb {
        return Ok(None);
    }
    let i = ba
        .iter()
        .zip(bb.iter())
        .position(|(x, y)| x != y)
        .unwrap_or(0);
    Ok(Some(start + i as u64))
}
