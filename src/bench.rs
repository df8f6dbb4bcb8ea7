//! The benchmark service behind `cowdisk bench`: the workload of `qemu-img bench`
//! (count requests of one size, each `step` bytes after the previous, wrapping at the
//! end of the image), issued by `depth` threads at once; and the services behind
//! `cowdisk bench-compress` ([`compress_file`]: a raw file through compressed writes)
//! and `cowdisk bench-vmstate` ([`save_vmstate_stream`]: VM state in realistic pieces).

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
    /// Check host writes against the metadata (`--no-overlap-check` turns it off, to
    /// measure what the checks cost).
    pub overlap_checks: bool,
    /// The passphrase of an encrypted image.
    pub secret: Option<crate::crypto::Secret>,
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
        overlap_checks: cfg.overlap_checks,
        secret: cfg.secret.clone(),
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

/// What [`compress_file`] does: a raw file converted into a new compressed image, as
/// `qemu-img convert -c -O qcow2 -f raw` does.
#[derive(Debug, Clone)]
pub struct CompressConfig {
    /// Bypass the host page cache on the image (`-t none`); the raw file is read cached,
    /// as `qemu-img convert` reads its source by default.
    pub direct: bool,
    /// Memory of the compressed-write cache (0 = off: each compressed cluster is written
    /// on its own, as QEMU does).
    pub cache_size: u64,
    /// Compression type of the new image.
    pub compression_type: crate::CompressionType,
    /// Bytes of the raw file read and handed over per step (rounded up to clusters).
    pub chunk: u64,
}

impl Default for CompressConfig {
    /// Cached, default cache size, zlib, 32 MiB steps.
    fn default() -> Self {
        CompressConfig {
            direct: false,
            cache_size: OpenOptions::default().compressed_cache_size,
            compression_type: crate::CompressionType::Zlib,
            chunk: 32 << 20,
        }
    }
}

/// The outcome of [`compress_file`].
#[derive(Debug, Clone, Copy)]
pub struct CompressResult {
    /// Wall time from creating the image to the end of its close (flushed).
    pub elapsed: Duration,
    /// Part of `elapsed` spent reading the raw file.
    pub reading: Duration,
    /// Part of `elapsed` spent in `Image::write_compressed` (compressing and writing).
    pub compressing: Duration,
    /// Part of `elapsed` spent closing the image (writing out the cache and metadata).
    pub closing: Duration,
    /// Bytes of the raw file.
    pub bytes: u64,
    /// Clusters written compressed (or as normal clusters when they did not shrink).
    pub clusters_written: u64,
    /// All-zero clusters left unallocated, as `qemu-img convert` leaves them.
    pub zero_clusters: u64,
}

/// Converts the raw file `src` into a new qcow2 image at `image` (which must not
/// exist) of the same size, every cluster through [`Image::write_compressed`]: the raw
/// file is read in large steps and each run of clusters that are not all zeros is
/// handed over in one call (all-zero clusters stay unallocated, as `qemu-img convert`
/// leaves them in an image that starts out reading zeros). The image is flushed and
/// closed before the clock stops.
pub fn compress_file(src: &Path, image: &Path, cfg: &CompressConfig) -> Result<CompressResult> {
    use std::io::Read;
    let start = Instant::now();
    let mut raw = std::fs::File::open(src)
        .map_err(|e| Error::io(format!("cannot open '{}'", src.display()), e))?;
    let bytes = raw
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat '{}'", src.display()), e))?
        .len();
    let create = crate::CreateOptions {
        compression_type: cfg.compression_type,
        ..crate::CreateOptions::default()
    };
    Image::create(image, bytes, &create)?;
    let opts = OpenOptions {
        direct: cfg.direct,
        compressed_cache_size: cfg.cache_size,
        ..OpenOptions::default()
    };
    let img = Image::open(image, &opts)?;
    let cs = u64::from(img.info().cluster_size);
    let chunk = cfg.chunk.max(1).div_ceil(cs) * cs;
    let mut buf = vec![0u8; chunk as usize];
    let (mut reading, mut compressing) = (Duration::ZERO, Duration::ZERO);
    let (mut clusters_written, mut zero_clusters) = (0u64, 0u64);
    let mut offset = 0u64;
    while offset < bytes {
        let len = chunk.min(bytes - offset) as usize;
        let t = Instant::now();
        raw.read_exact(&mut buf[..len])
            .map_err(|e| Error::io(format!("cannot read '{}'", src.display()), e))?;
        reading += t.elapsed();
        let t = Instant::now();
        // Runs of clusters that are not all zeros, each in one call.
        let clusters: Vec<&[u8]> = buf[..len].chunks(cs as usize).collect();
        let mut i = 0;
        while i < clusters.len() {
            if clusters[i].iter().all(|&b| b == 0) {
                zero_clusters += 1;
                i += 1;
                continue;
            }
            let first = i;
            while i < clusters.len() && clusters[i].iter().any(|&b| b != 0) {
                i += 1;
            }
            let from = first * cs as usize;
            let to = (i * cs as usize).min(len);
            img.write_compressed(&buf[from..to], offset + from as u64)?;
            clusters_written += (i - first) as u64;
        }
        compressing += t.elapsed();
        offset += len as u64;
    }
    let t = Instant::now();
    img.close()?;
    let closing = t.elapsed();
    Ok(CompressResult {
        elapsed: start.elapsed(),
        reading,
        compressing,
        closing,
        bytes,
        clusters_written,
        zero_clusters,
    })
}

/// What [`save_vmstate_stream`] saves.
#[derive(Debug, Clone)]
pub struct VmstateConfig {
    /// Bytes of VM state in the stream.
    pub size: u64,
    /// Bypass the host page cache (`-t none`).
    pub direct: bool,
    /// Save through [`Image::save_vmstate_unbuffered`] (QEMU's way) instead of the
    /// buffer and the write pool.
    pub unbuffered: bool,
    /// Seed of the piece sizes and the data.
    pub seed: u64,
}

/// The outcome of [`save_vmstate_stream`].
#[derive(Debug, Clone, Copy)]
pub struct VmstateResult {
    /// Wall time from the first save to the end of the flush after finalize.
    pub elapsed: Duration,
    /// Part of `elapsed` spent in the save calls.
    pub saving: Duration,
    /// Part of `elapsed` spent in [`Image::finalize_vmstate`].
    pub finalizing: Duration,
    /// Part of `elapsed` spent in the final [`Image::flush`].
    pub flushing: Duration,
    /// Number of save calls.
    pub pieces: u64,
}

/// A xorshift generator: reproducible piece sizes and data without a dependency.
struct XorShift(u64);

impl XorShift {
    /// The next 64 random bits.
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Largest piece of the stream (see [`vmstate_pieces`]).
const MAX_PIECE: u64 = 4 << 20;

/// The piece sizes of a VM state stream of `size` bytes, with the distribution of
/// `tests/snapshots.rs`: 60 % are 1–100 bytes, 38 % are 4096 + 8 (a page and its
/// header), 1.9 % are up to 256 KiB and 0.1 % up to 4 MiB.
pub fn vmstate_pieces(size: u64, seed: u64) -> Vec<u32> {
    let mut rng = XorShift(seed | 1);
    let mut pieces = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let len = match rng.below(1000) {
            0..=599 => 1 + rng.below(100),
            600..=979 => 4096 + 8,
            980..=998 => 1 + rng.below(256 * 1024),
            _ => 1 + rng.below(MAX_PIECE),
        }
        .min(size - pos);
        pieces.push(len as u32);
        pos += len;
    }
    pieces
}

/// Saves a VM state stream of `cfg.size` bytes into the image at `path` in realistic
/// pieces ([`vmstate_pieces`]), then finalizes and flushes; the clock covers the saves,
/// finalize and the flush (so cached runs include writing the page cache out, like
/// `dd conv=fsync`). Piece sizes and data (a 64 MiB random buffer the pieces are cut
/// from in turn) are prepared before the clock starts. The state is not recorded in a
/// snapshot.
pub fn save_vmstate_stream(path: &Path, cfg: &VmstateConfig) -> Result<VmstateResult> {
    const DATA: u64 = 64 << 20;
    let pieces = vmstate_pieces(cfg.size, cfg.seed);
    let mut rng = XorShift(cfg.seed.rotate_left(17) | 1);
    let data: Vec<u8> = (0..(DATA + MAX_PIECE) / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let opts = OpenOptions {
        direct: cfg.direct,
        ..OpenOptions::default()
    };
    let image = Image::open(path, &opts)?;
    let start = Instant::now();
    let mut pos = 0u64;
    for &len in &pieces {
        let from = (pos % DATA) as usize;
        let piece = &data[from..from + len as usize];
        if cfg.unbuffered {
            image.save_vmstate_unbuffered(piece, pos)?;
        } else {
            image.save_vmstate(piece, pos)?;
        }
        pos += u64::from(len);
    }
    let saving = start.elapsed();
    let t = Instant::now();
    image.finalize_vmstate()?;
    let finalizing = t.elapsed();
    let t = Instant::now();
    image.flush()?;
    let flushing = t.elapsed();
    let elapsed = start.elapsed();
    image.close()?;
    Ok(VmstateResult {
        elapsed,
        saving,
        finalizing,
        flushing,
        pieces: pieces.len() as u64,
    })
}
