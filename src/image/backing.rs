//! Backing files: a qcow2 image or a raw file under an image, opened read-only, with
//! reads past their end returning zeros.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::status::{push_extent, Extent};
use super::{BackingInfo, Image, OpenOptions};
use crate::error::{Error, Result};
use crate::format::header::QCOW2_MAGIC;
use crate::io::{FileStorage, Storage};
use crate::unsupported;

/// The image below another one.
pub(crate) enum Backing {
    /// A qcow2 image (which may have a backing file of its own).
    Qcow2(Box<Image>),
    /// A raw file.
    Raw {
        storage: Arc<dyn Storage>,
        size: u64,
        filename: String,
    },
}

/// Resolves a backing file name stored in an image against the image's folder.
pub(crate) fn resolve_backing_path(image_path: Option<&Path>, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image_path.and_then(|ip| ip.parent()) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// Decides the format of a backing file: the stored name, or a probe of its magic.
pub(crate) fn backing_format(path: &Path, stored: Option<&str>) -> Result<&'static str> {
    match stored {
        Some("qcow2") => Ok("qcow2"),
        Some("raw") => Ok("raw"),
        Some(other) => Err(unsupported!(
            "backing file '{}' has format '{other}' (only qcow2 and raw are supported)",
            path.display()
        )),
        None => {
            let s = FileStorage::open(path, false, false).map_err(|e| {
                Error::io(format!("cannot open backing file '{}'", path.display()), e)
            })?;
            let mut magic = [0u8; 4];
            s.read_at(&mut magic, 0)
                .map_err(|e| Error::io(format!("probing backing file '{}'", path.display()), e))?;
            Ok(if u32::from_be_bytes(magic) == QCOW2_MAGIC {
                "qcow2"
            } else {
                "raw"
            })
        }
    }
}

impl Backing {
    /// Opens the backing file `name` of the image at `image_path`, `depth_left` levels
    /// from the chain limit.
    pub(crate) fn open(
        image_path: Option<&Path>,
        name: &str,
        stored_format: Option<&str>,
        opts: &OpenOptions,
        depth_left: u32,
    ) -> Result<Backing> {
        if depth_left == 0 {
            return Err(Error::ChainTooDeep(format!(
                "backing chain is deeper than {} images (at '{name}')",
                opts.max_backing_depth
            )));
        }
        let path = resolve_backing_path(image_path, name);
        match backing_format(&path, stored_format)? {
            "qcow2" => {
                let mut o = opts.clone();
                o.read_only = true;
                o.snapshot = None;
                o.no_flush = false;
                let img = Image::open_chain(&path, &o, depth_left - 1).map_err(|e| match e {
                    Error::Io { context, source } => {
                        // Name the file once: "cannot open backing file 'b'", not
                        // "backing file 'b': cannot open 'b'".
                        let shown = format!("'{}'", path.display());
                        let context = if context.contains(&shown) {
                            context.replacen(
                                &format!("cannot open {shown}"),
                                &format!("cannot open backing file {shown}"),
                                1,
                            )
                        } else {
                            format!("backing file {shown}: {context}")
                        };
                        Error::Io { context, source }
                    }
                    other => other,
                })?;
                Ok(Backing::Qcow2(Box::new(img)))
            }
            _ => {
                let storage = FileStorage::open(&path, false, false).map_err(|e| {
                    Error::io(format!("cannot open backing file '{}'", path.display()), e)
                })?;
                let mut o = opts.clone();
                o.read_only = true;
                o.snapshot = None;
                o.no_flush = false;
                super::lock_image_file(&storage, &path, &o)?;
                let size = storage
                    .len()
                    .map_err(|e| Error::io(format!("backing file '{}'", path.display()), e))?;
                Ok(Backing::Raw {
                    storage: Arc::new(storage),
                    size,
                    filename: path.display().to_string(),
                })
            }
        }
    }

    /// Virtual size of the backing image.
    pub(crate) fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(img) => img.size(),
            Backing::Raw { size, .. } => *size,
        }
    }

    /// Reads at `offset`; bytes past the backing image's end read as zeros.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail == 0 {
            return Ok(());
        }
        match self {
            Backing::Qcow2(img) => img.read_at(&mut buf[..avail], offset),
            Backing::Raw {
                storage, filename, ..
            } => storage
                .read_at(&mut buf[..avail], offset)
                .map_err(|e| Error::io(format!("reading backing file '{filename}'"), e)),
        }
    }

    /// True when `[offset, offset+len)` reads as zero, known from metadata alone.
    pub(crate) fn reads_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let size = self.size();
        if offset >= size {
            return Ok(true);
        }
        match self {
            Backing::Qcow2(img) => img.range_reads_zero(offset, len),
            Backing::Raw { .. } => Ok(false),
        }
    }

    /// Appends the status of `[offset, offset+len)` (within this backing image's size)
    /// at chain depth `depth`.
    pub(crate) fn block_status(
        &self,
        offset: u64,
        len: u64,
        depth: u32,
        out: &mut Vec<Extent>,
        limit: usize,
    ) -> Result<()> {
        match self {
            Backing::Qcow2(img) => img.lock()?.block_status(offset, len, depth, out, limit),
            Backing::Raw {
                storage, filename, ..
            } => {
                let end = offset + len;
                let mut pos = offset;
                while pos < end && out.len() <= limit {
                    let (data, run_end) = storage
                        .extent_at(pos)
                        .map_err(|e| Error::io(format!("mapping backing file '{filename}'"), e))?
                        .unwrap_or((true, end));
                    let n = run_end.clamp(pos + 1, end) - pos;
                    push_extent(
                        out,
                        Extent {
                            start: pos,
                            length: n,
                            depth,
                            present: true,
                            zero: !data,
                            data,
                            compressed: false,
                            offset: Some(pos),
                        },
                    );
                    pos += n;
                }
                Ok(())
            }
        }
    }

    /// The chain from this image down.
    pub(crate) fn chain(&self) -> Vec<BackingInfo> {
        match self {
            Backing::Qcow2(img) => {
                let info = img.info();
                let mut v = vec![BackingInfo {
                    filename: img.filename(),
                    format: "qcow2".into(),
                    virtual_size: info.virtual_size,
                }];
                v.extend(info.backing_chain);
                v
            }
            Backing::Raw { size, filename, .. } => vec![BackingInfo {
                filename: filename.clone(),
                format: "raw".into(),
                virtual_size: *size,
            }],
        }
    }
}
