//! `convert --bitmaps`: the source's persistent dirty bitmaps carried into a qcow2
//! target, as `qemu-img convert --bitmaps` does. Checked before any data is copied
//! (an inconsistent bitmap fails the convert unless skipped); added to the target
//! after the data, so the copy's own writes do not dirty them.

use super::endpoint::{Source, Target};
use super::ConvertOptions;
use crate::bitmap::DirtyBitmap;
use crate::error::{Error, Result};
use crate::image::BitmapInfo;

/// The bitmaps to carry, with their bits, read before the copy starts.
pub(crate) struct Carried(Vec<(BitmapInfo, DirtyBitmap)>);

/// Reads the bitmaps `opts` asks to carry from `source` (none without `--bitmaps`).
pub(crate) fn collect(source: &Source, opts: &ConvertOptions) -> Result<Carried> {
    if !opts.bitmaps {
        return Ok(Carried(Vec::new()));
    }
    let Source::Qcow2(img) = source else {
        return Err(Error::InvalidArgument(
            "--bitmaps needs a qcow2 source".into(),
        ));
    };
    if opts.source.snapshot.is_some() {
        return Err(Error::InvalidArgument(
            "--bitmaps cannot be used with a snapshot source: bitmaps describe the active disk"
                .into(),
        ));
    }
    let mut out = Vec::new();
    for info in img.bitmaps()? {
        if info.inconsistent {
            if opts.skip_broken_bitmaps {
                continue;
            }
            return Err(Error::Unsupported(format!(
                "bitmap '{}' is inconsistent and cannot be copied; use \
                 --skip-broken-bitmaps to leave it out",
                info.name
            )));
        }
        let bits = img.bitmap_contents(&info.name)?;
        out.push((info, bits));
    }
    Ok(Carried(out))
}

impl Carried {
    /// Adds the bitmaps to the target with the source's bits, names, granularity
    /// and enabled state.
    pub(crate) fn store(&self, target: &Target) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let Target::Qcow2(img) = target else {
            return Err(Error::InvalidArgument(
                "--bitmaps needs a qcow2 target".into(),
            ));
        };
        for (info, bits) in &self.0 {
            img.bitmap_add(&info.name, info.granularity, info.enabled)?;
            img.bitmap_merge(&info.name, bits)?;
        }
        Ok(())
    }
}
