//! `measure`: how large a new image converted from a source (or of a given virtual
//! size) will be, with qemu-img's figures: the size a convert needs ("required") and
//! the size with every cluster allocated ("fully allocated").

use super::endpoint::{Format, Source};
use crate::error::{Error, Result};
use crate::image::CreateOptions;

/// Sizes [`measure`] reports, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes a converted image needs: metadata for the whole disk plus the clusters
    /// the source holds data in.
    pub required: u64,
    /// Bytes of the image with every cluster allocated (metadata included).
    pub fully_allocated: u64,
    /// Bytes of persistent bitmaps carried over (`Some(0)`: a qcow2 source to a qcow2
    /// target, as qemu-img prints it; `None`: not reported).
    pub bitmaps: Option<u64>,
}

/// Measures a `target` image of the source's size (or `size` when there is no
/// source) created with `create`.
pub fn measure(
    source: Option<&Source>,
    size: Option<u64>,
    target: Format,
    create: &CreateOptions,
) -> Result<Measurement> {
    let virtual_size = match (source, size) {
        (Some(s), None) => s.size(),
        (None, Some(n)) => n,
        _ => {
            return Err(Error::InvalidArgument(
                "measure takes either a source image or a size".into(),
            ))
        }
    };
    if target == Format::Raw {
        return Ok(Measurement {
            required: virtual_size,
            fully_allocated: virtual_size,
            bitmaps: None,
        });
    }
    let cs = u64::from(create.cluster_size);
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(Error::InvalidArgument(format!(
            "cluster size {cs} is not a power of two from 512 to 2 MiB"
        )));
    }
    let aligned = virtual_size.div_ceil(cs).saturating_mul(cs);
    let fully = full_size(aligned, cs, create.refcount_bits)?;
    let data = match source {
        Some(s) => data_clusters_bytes(s, cs)?,
        None => 0,
    };
    Ok(Measurement {
        required: fully - aligned + data,
        fully_allocated: fully,
        bitmaps: source.filter(|s| matches!(s, Source::Qcow2(_))).map(|_| 0),
    })
}

/// Bytes of the target clusters (`cs`) the source stores data in (zeros and
/// unallocated areas need none).
fn data_clusters_bytes(source: &Source, cs: u64) -> Result<u64> {
    let size = source.size();
    let (mut at, mut counted_to, mut bytes) = (0u64, 0u64, 0u64);
    while at < size {
        let spans = source.spans(at, size - at, 4096)?;
        if spans.is_empty() {
            break;
        }
        for s in &spans {
            at = s.start + s.length;
            if s.zero {
                continue;
            }
            let from = (s.start / cs * cs).max(counted_to);
            let to = at.div_ceil(cs) * cs;
            if to > from {
                bytes += to - from;
                counted_to = to;
            }
        }
    }
    Ok(bytes)
}

/// The size of a fully allocated image of `aligned` bytes (whole clusters): the
/// header cluster, L2 tables for every cluster, the L1 table, and refcount blocks
/// and table for all of it.
fn full_size(aligned: u64, cs: u64, refcount_bits: u32) -> Result<u64> {
    let entries_per_cluster = cs / 8;
    let l2_entries = (aligned / cs).div_ceil(entries_per_cluster) * entries_per_cluster;
    let l2_bytes = l2_entries * 8;
    let l1_entries = (l2_bytes / cs).div_ceil(entries_per_cluster) * entries_per_cluster;
    let meta = cs + l2_bytes + l1_entries * 8;
    let refcount = refcount_metadata((meta + aligned) / cs, cs, u64::from(refcount_bits.max(1)))?;
    meta.checked_add(refcount)
        .and_then(|m| m.checked_add(aligned))
        .ok_or_else(|| Error::InvalidArgument("the image would be too large".into()))
}

/// Bytes of refcount blocks and table that count `clusters` clusters and themselves
/// (a fixed point: the structure counts its own clusters too).
fn refcount_metadata(clusters: u64, cs: u64, refcount_bits: u64) -> Result<u64> {
    let per_block = cs * 8 / refcount_bits;
    let per_table_cluster = cs / 8;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    for _ in 0..64 {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return Ok((blocks + table) * cs);
        }
    }
    Err(Error::InvalidArgument(
        "the refcount structure size does not settle".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_sizes_match_qemu_img_measure() {
        // `qemu-img measure -O qcow2 --size 100M` and `--size 1G -o cluster_size=4k`.
        assert_eq!(full_size(100 << 20, 65536, 16).unwrap(), 105185280);
        assert_eq!(full_size(1 << 30, 4096, 16).unwrap(), 1076379648);
    }
}
