//! The benchmark service behind `cowdisk bench`: the workload of `qemu-img bench`
//! (count requests of one size, each `step` bytes after the previous, wrapping at the
//! end of the image), issued by `depth` threads at once.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};

/// What to run; the meaning of each field is `qemu-img bench`'s.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Write instead of read (`-w`).
    pub write: bool,
    /// Number of requests (`-c`).
    pub count: u64,
    /// Request size in bytes (`-s`).
    pub size: u64,
    /// Distance between request offsets (`-S`; 0 = `size`, sequential).
    pub step: u64,
    /// Offset of the first request (`-o`).
    pub offset: u64,
    /// Requests in flight at once: worker threads (`-d`).
    pub depth: u32,
    /// Bypass the host page cache (`-t none`).
    pub direct: bool,
    /// Byte written by write requests (`--pattern`).
    pub pattern: u8,
    /// Flush after every this many requests (`--flush-interval`; 0 = never).
    pub flush_interval: u64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Copy)]
pub struct BenchResult {
    /// Wall time from the first request to the last completion.
    pub elapsed: Duration,
    /// Requests completed.
    pub requests: u64,
}

/// Runs the workload on the image at `path` (opened read-only for reads).
pub fn run(path: &Path, cfg: &BenchConfig) -> Result<BenchResult> {
    if cfg.size == 0 || cfg.depth == 0 {
        return Err(Error::InvalidArgument(
            "request size and depth must be positive".into(),
        ));
    }
    let opts = OpenOptions {
        read_only: !cfg.write,
        direct: cfg.direct,
        ..OpenOptions::default()
    };
    let image = Image::open(path, &opts)?;
    let image_size = image.size();
    if cfg.size > image_size {
        return Err(Error::InvalidArgument(format!(
            "request size {} is larger than the image ({image_size} bytes)",
            cfg.size
        )));
    }
    let step = if cfg.step == 0 { cfg.size } else { cfg.step };
    let next = AtomicU64::new(0);
    let failure = std::sync::Mutex::new(None::<Error>);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..cfg.depth {
            scope.spawn(|| {
                // Page-aligned buffers, as QEMU's are, so O_DIRECT needs no bounce copy.
                let mut backing = vec![cfg.pattern; cfg.size as usize + 4096];
                let skip = backing.as_ptr().align_offset(4096);
                let buf = &mut backing[skip..skip + cfg.size as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= cfg.count {
                        break;
                    }
                    // qemu-img bench wraps the offset at the end of the image.
                    let mut off = (cfg.offset + i.wrapping_mul(step)) % image_size;
                    if off + cfg.size > image_size {
                        off = 0;
                    }
                    let result = if cfg.write {
                        image.write_at(buf, off)
                    } else {
                        image.read_at(buf, off)
                    };
                    let result = result.and_then(|()| {
                        if cfg.flush_interval > 0 && (i + 1).is_multiple_of(cfg.flush_interval) {
                            image.flush()
                        } else {
                            Ok(())
                        }
                    });
                    if let Err(e) = result {
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        next.store(cfg.count, Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
    });
    let elapsed = start.elapsed();
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    image.close()?;
    Ok(BenchResult {
        elapsed,
        requests: cfg.count,
    })
}
