//! An image's place in its backing chain: naming a new backing file (what `rebase`
//! and `rebase -u` end with) and emptying the image so that it reads as its backing
//! file again (what `commit` ends with).

use super::backing::Backing;
use super::Image;
use crate::error::{Error, Result};
use crate::image::OpenOptions;

impl Image {
    /// Stores `file` (with `format`, probed when `None`) as the backing file name in
    /// the header, or removes the backing file when `file` is `None`; nothing else
    /// changes, so what the image reads changes wherever it does not allocate (a
    /// `rebase -u`). A handle that follows its backing chain opens the new backing
    /// file (relative names resolve against this image's folder) before the header
    /// changes, and reads through it afterwards.
    pub fn set_backing_file(&self, file: Option<&str>, format: Option<&str>) -> Result<()> {
        let file = file.filter(|f| !f.is_empty());
        if file.is_none() && format.is_some() {
            return Err(Error::InvalidArgument(
                "a backing format needs a backing file".into(),
            ));
        }
        if let Some(f) = format {
            if f != "qcow2" && f != "raw" {
                return Err(Error::Unsupported(format!(
                    "backing format '{f}' (only qcow2 and raw are supported)"
                )));
            }
        }
        let follow = {
            let meta = self.lock()?;
            meta.check_writable()?;
            !meta.backing_disabled
        };
        let backing = match file {
            Some(name) if follow => {
                let opts = OpenOptions {
                    read_only: true,
                    ..OpenOptions::default()
                };
                let depth = opts.max_backing_depth;
                Some(Backing::open(
                    self.path.as_deref(),
                    name,
                    format,
                    &opts,
                    depth,
                )?)
            }
            _ => None,
        };
        self.modify("setting the backing file", |meta| {
            let old = meta.header.clone();
            meta.header.backing_file = file.map(str::to_string);
            meta.header.backing_format = format.map(str::to_string);
            if meta.header.serialize().is_err() {
                meta.header = old;
                return Err(Error::InvalidArgument(format!(
                    "the backing file name '{}' does not fit in the header cluster",
                    file.unwrap_or_default()
                )));
            }
            meta.switch_header(&old)?;
            meta.sync()?;
            meta.backing = backing.map(std::sync::Arc::new);
            // A new name the open options said not to follow stays unopened.
            meta.backing_refused = file.is_some() && !follow;
            Ok(())
        })
    }

    /// Drops every cluster this image allocates (data, zero and compressed clusters),
    /// so that it reads as its backing file (zeros without one), as QEMU empties the
    /// top image after a commit. Internal snapshots keep their clusters.
    pub fn make_empty(&self) -> Result<()> {
        self.modify("emptying the image", |meta| {
            let span = meta.l1_span();
            let size = meta.header.size;
            for (i, &e) in meta.l1.clone().iter().enumerate() {
                if crate::format::entry::l1_table_offset(e, meta.cluster_bits)? == 0 {
                    continue;
                }
                let start = i as u64 * span;
                if start >= size {
                    break;
                }
                let end = (start + span).min(size.div_ceil(meta.cluster_size) * meta.cluster_size);
                meta.unallocate_range(start, end)?;
            }
            Ok(())
        })
    }
}
