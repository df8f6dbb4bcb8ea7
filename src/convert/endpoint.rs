//! The two ends of a copy: a source (a qcow2 image with its chain, an internal
//! snapshot of one, or a raw file) and a target (a qcow2 image or a raw file), each
//! reduced to the few operations the copy engine needs.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::{ClusterCompressor, CompressedClusters, Image, OpenOptions};
use crate::io::{FileStorage, Storage};

/// An image format the copy engine reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// qcow2 (through the engine, with its backing chain).
    Qcow2,
    /// A plain file holding the guest bytes.
    Raw,
}

impl Format {
    /// Parses a format name as qemu-img spells it.
    pub fn parse(name: &str) -> Result<Format> {
        match name {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            other => Err(Error::Unsupported(format!(
                "image format '{other}' (only qcow2 and raw are supported)"
            ))),
        }
    }

    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// The format of the file at `path`, from its first bytes (qcow2's magic, else raw).
    pub fn probe(path: &Path) -> Result<Format> {
        let s = FileStorage::open(path, false, false)
            .map_err(|e| Error::io(format!("cannot open '{}'", path.display()), e))?;
        let mut magic = [0u8; 4];
        s.read_at(&mut magic, 0)
            .map_err(|e| Error::io(format!("probing '{}'", path.display()), e))?;
        Ok(
            if u32::from_be_bytes(magic) == crate::format::header::QCOW2_MAGIC {
                Format::Qcow2
            } else {
                Format::Raw
            },
        )
    }
}

/// How to open an image file as a source or an existing target.
#[derive(Debug, Clone, Default)]
pub struct OpenSpec {
    /// Its format (`None`: probed from its first bytes).
    pub format: Option<Format>,
    /// O_DIRECT (`-T none` / `-t none`).
    pub direct: bool,
    /// Read an internal snapshot instead of the active image (qcow2 sources only).
    pub snapshot: Option<String>,
    /// Read-only opens: let other processes write the image meanwhile (`-U`).
    pub force_share: bool,
    /// Targets: never flush the file (`-t unsafe`, see `OpenOptions::no_flush`).
    pub no_flush: bool,
    /// The passphrase of an encrypted image (and its encrypted backing files).
    pub secret: Option<crate::crypto::Secret>,
}

/// Where guest bytes come from.
pub enum Source {
    /// A qcow2 image (reads go through its backing chain).
    Qcow2(Image),
    /// A raw file (its holes read as zeros).
    Raw {
        /// The file.
        storage: Arc<dyn Storage>,
        /// Its length: the virtual size.
        size: u64,
    },
}

/// Which bytes of a source span hold what, as the copy engine sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceSpan {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// The bytes read as zeros (known from metadata or file holes, not by reading).
    pub zero: bool,
    /// The layer of the chain that allocates these bytes (as data or zeros; 0 = the
    /// image itself), `None` where no layer does.
    pub layer: Option<u32>,
}

impl Source {
    /// Opens `path` read-only as a source.
    pub fn open(path: &Path, spec: &OpenSpec) -> Result<Source> {
        let format = match spec.format {
            Some(f) => f,
            None => Format::probe(path)?,
        };
        match format {
            Format::Qcow2 => {
                let opts = OpenOptions {
                    read_only: true,
                    direct: spec.direct,
                    force_share: spec.force_share,
                    snapshot: spec.snapshot.clone(),
                    secret: spec.secret.clone(),
                    ..OpenOptions::default()
                };
                Ok(Source::Qcow2(Image::open(path, &opts)?))
            }
            Format::Raw => {
                if spec.snapshot.is_some() {
                    return Err(Error::InvalidArgument(format!(
                        "'{}' is a raw file: it has no internal snapshots",
                        path.display()
                    )));
                }
                let storage = FileStorage::open(path, false, spec.direct)
                    .map_err(|e| Error::io(format!("cannot open '{}'", path.display()), e))?;
                Source::raw(Arc::new(storage))
            }
        }
    }

    /// A raw source over any storage (tests use fault-injecting storage).
    pub fn raw(storage: Arc<dyn Storage>) -> Result<Source> {
        let size = storage
            .len()
            .map_err(|e| Error::io("reading the size of the raw source", e))?;
        Ok(Source::Raw { storage, size })
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        match self {
            Source::Qcow2(img) => img.size(),
            Source::Raw { size, .. } => *size,
        }
    }

    /// Reads guest bytes (past the end: zeros).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        match self {
            Source::Qcow2(img) => img.read_at(&mut buf[..inside], offset),
            Source::Raw { storage, .. } => storage
                .read_at(&mut buf[..inside], offset)
                .map_err(|e| Error::io(format!("reading the raw source at {offset:#x}"), e)),
        }
    }

    /// The status of `[offset, offset+len)` (clamped to the size) as spans, at most
    /// `limit` of them, starting at `offset` and contiguous.
    pub fn spans(&self, offset: u64, len: u64, limit: usize) -> Result<Vec<SourceSpan>> {
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        match self {
            Source::Qcow2(img) => Ok(img
                .block_status(offset, end - offset, limit)?
                .into_iter()
                .map(|e| SourceSpan {
                    start: e.start,
                    length: e.length,
                    zero: e.zero,
                    layer: e.present.then_some(e.depth),
                })
                .collect()),
            Source::Raw { storage, .. } => {
                let mut out: Vec<SourceSpan> = Vec::new();
                let mut at = offset;
                while at < end && out.len() < limit.max(1) {
                    let (data, run_end) = storage
                        .extent_at(at)
                        .map_err(|e| Error::io("finding the holes of the raw source", e))?
                        .unwrap_or((true, end));
                    let run_end = run_end.clamp(at + 1, end);
                    out.push(SourceSpan {
                        start: at,
                        length: run_end - at,
                        zero: !data,
                        layer: Some(0),
                    });
                    at = run_end;
                }
                Ok(out)
            }
        }
    }
}

/// Where guest bytes go.
pub enum Target {
    /// A qcow2 image.
    Qcow2(Image),
    /// A raw file.
    Raw {
        /// The file.
        storage: Arc<dyn Storage>,
        /// Never flush it (`-t unsafe`).
        no_flush: bool,
    },
}

impl Target {
    /// Opens an existing target read-write.
    pub fn open(path: &Path, spec: &OpenSpec) -> Result<Target> {
        let format = match spec.format {
            Some(f) => f,
            None => Format::probe(path)?,
        };
        match format {
            Format::Qcow2 => {
                let opts = OpenOptions {
                    direct: spec.direct,
                    no_flush: spec.no_flush,
                    secret: spec.secret.clone(),
                    ..OpenOptions::default()
                };
                Ok(Target::Qcow2(Image::open(path, &opts)?))
            }
            Format::Raw => {
                let storage = FileStorage::open(path, true, spec.direct)
                    .map_err(|e| Error::io(format!("cannot open '{}'", path.display()), e))?;
                Ok(Target::Raw {
                    storage: Arc::new(storage),
                    no_flush: spec.no_flush,
                })
            }
        }
    }

    /// The virtual size.
    pub fn size(&self) -> Result<u64> {
        match self {
            Target::Qcow2(img) => Ok(img.size()),
            Target::Raw { storage: s, .. } => s
                .len()
                .map_err(|e| Error::io("reading the size of the raw target", e)),
        }
    }

    /// The unit zero detection works in: whole clusters of a qcow2 target (a
    /// partly zero cluster is written as data, as qemu-img does), 4 KiB blocks of a
    /// raw one.
    pub fn granularity(&self) -> u64 {
        match self {
            Target::Qcow2(img) => u64::from(img.info().cluster_size),
            Target::Raw { .. } => 4096,
        }
    }

    /// True when the target has a backing file (unwritten areas do not read as zeros).
    pub fn has_backing(&self) -> bool {
        match self {
            Target::Qcow2(img) => img.info().backing_file.is_some(),
            Target::Raw { .. } => false,
        }
    }

    /// Writes guest bytes.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Target::Qcow2(img) => img.write_at(buf, offset),
            Target::Raw { storage: s, .. } => s
                .write_at(buf, offset)
                .map_err(|e| Error::io(format!("writing the raw target at {offset:#x}"), e)),
        }
    }

    /// Makes `[offset, offset+len)` read as zeros: zero clusters (host clusters
    /// released) in qcow2, a hole in a raw file (zeros written where the file system
    /// cannot punch one).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Target::Qcow2(img) => img.write_zeroes(offset, len, true),
            Target::Raw { storage: s, .. } => {
                let err = |e| Error::io(format!("zeroing the raw target at {offset:#x}"), e);
                s.punch_hole(offset, len).map_err(err)?;
                if let Some((false, hole_end)) = s.extent_at(offset).map_err(err)? {
                    if hole_end >= offset + len {
                        return Ok(());
                    }
                }
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(zeros.len() as u64) as usize;
                    s.write_at(&zeros[..n], at).map_err(err)?;
                    at += n as u64;
                }
                Ok(())
            }
        }
    }

    /// Compresses whole clusters on the calling thread (qcow2 targets only).
    pub fn compress(
        &self,
        compressor: &mut ClusterCompressor,
        buf: &[u8],
        offset: u64,
    ) -> Result<CompressedClusters> {
        match self {
            Target::Qcow2(img) => img.compress_clusters(compressor, buf, offset),
            Target::Raw { .. } => Err(Error::InvalidArgument(
                "compression needs a qcow2 target".into(),
            )),
        }
    }

    /// Stores clusters compressed by [`Target::compress`].
    pub fn store_compressed(&self, clusters: &CompressedClusters) -> Result<()> {
        match self {
            Target::Qcow2(img) => img.store_compressed_clusters(clusters),
            Target::Raw { .. } => Err(Error::InvalidArgument(
                "compression needs a qcow2 target".into(),
            )),
        }
    }

    /// Makes everything written durable (unless opened with `no_flush`).
    pub fn flush(&self) -> Result<()> {
        match self {
            Target::Qcow2(img) => img.flush(),
            Target::Raw { no_flush: true, .. } => Ok(()),
            Target::Raw { storage: s, .. } => s
                .flush()
                .map_err(|e| Error::io("flushing the raw target", e)),
        }
    }

    /// Flushes and closes.
    pub fn close(self) -> Result<()> {
        match self {
            Target::Qcow2(img) => img.close(),
            raw => raw.flush(),
        }
    }
}
