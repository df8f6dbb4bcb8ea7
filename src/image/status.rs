//! Block status: which parts of a guest range are data, zeros or unallocated, in
//! which layer of the backing chain, at which host offset — with the same meaning and
//! merging rules as `qemu-img map --output=json`.

use super::meta::Meta;
use crate::error::Result;
use crate::format::entry::Mapping;

/// One run of guest bytes with the same status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer of the chain that decides these bytes (0 = this image). For bytes no layer
    /// has, the deepest layer whose size covers them.
    pub depth: u32,
    /// Some layer allocates these bytes (as data or as a zero cluster).
    pub present: bool,
    /// The bytes read as zeros.
    pub zero: bool,
    /// The bytes are stored as data.
    pub data: bool,
    /// The bytes are in a compressed cluster.
    pub compressed: bool,
    /// Host offset of the first byte in the file of layer `depth`, when it has one.
    pub offset: Option<u64>,
}

impl Extent {
    /// True when `next` continues this extent with the same status (qemu-img's rule).
    pub fn mergeable(&self, next: &Extent) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Appends `e` to `out`, merging it into the last extent when possible.
pub(crate) fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.mergeable(&e) {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}

impl Meta {
    /// QEMU's heuristic for metadata preallocation: noticeably more clusters are in
    /// use than the file physically occupies. Only then do data clusters' holes in the
    /// host file count as zeros (for which QEMU asks the file system). Damaged
    /// refcounts make the answer "no" rather than an error: mapping must work on them.
    fn looks_preallocated(&mut self) -> bool {
        if let Some(known) = self.preallocated {
            return known;
        }
        let real = self.storage.allocated_size().unwrap_or(None);
        let answer = match real {
            None => false,
            Some(bytes) => {
                let real_clusters = bytes / self.cluster_size;
                let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
                let end = self.file_len.div_ceil(self.cluster_size);
                let mut in_use = 0;
                let mut cluster = 0;
                while cluster < end && in_use < threshold {
                    match self.refcount(cluster) {
                        Ok(0) => {}
                        Ok(_) => in_use += 1,
                        Err(_) => break,
                    }
                    cluster += 1;
                }
                in_use >= threshold
            }
        };
        self.preallocated = Some(answer);
        answer
    }

    /// Where the run of L1 entries without an L2 table that holds guest `pos` ends
    /// (the guest offset of the next L2 table's span, or `u64::MAX`); always past
    /// `pos`'s own span.
    fn unmapped_until(&self, pos: u64) -> u64 {
        let span_bits = self.cluster_bits + self.l2_bits;
        let first = (pos >> span_bits) as usize;
        let mapped = |&e: &u64| e & crate::format::entry::OFFSET_MASK != 0;
        match self.l1.iter().skip(first + 1).position(mapped) {
            Some(k) => ((first + 1 + k) as u64) << span_bits,
            None => u64::MAX,
        }
    }

    /// Appends the status of guest `[offset, offset+len)` (within this layer's size) at
    /// chain depth `depth`, stopping early once `out` holds more than `limit` extents.
    pub(crate) fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        depth: u32,
        out: &mut Vec<Extent>,
        limit: usize,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let end = offset + len;
        let mut pos = offset;
        // The last data-or-hole run the host file reported: (start, end, is data).
        let mut hole_cache: Option<(u64, u64, bool)> = None;
        let ask_host = self.looks_preallocated();
        while pos < end && out.len() <= limit {
            let within = pos & (cs - 1);
            let mut n = (cs - within).min(end - pos);
            let unmapped = self.l2_offset(self.indexes(pos).0)? == 0;
            if unmapped {
                // No L2 table: the whole run of empty L1 entries in one step, so the
                // time follows what is mapped, not the virtual size.
                n = self.unmapped_until(pos).min(end) - pos;
            }
            let base = Extent {
                start: pos,
                length: n,
                depth,
                present: true,
                zero: false,
                data: false,
                compressed: false,
                offset: None,
            };
            match self.mapping(pos)? {
                Mapping::Normal { host, .. } => {
                    // Like QEMU, on images that look preallocated ask the host file
                    // whether the data is in a hole: then it also reads as zero.
                    let mut at = 0;
                    while at < n {
                        let h = host + within + at;
                        let (is_data, run_end) = match hole_cache {
                            Some((start, end, d)) if h >= start && h < end => (d, end),
                            _ if !ask_host => (true, u64::MAX),
                            _ => {
                                let found = self.storage.extent_at(h).unwrap_or(None);
                                let (d, end) = found.unwrap_or((true, u64::MAX));
                                hole_cache = Some((h, end, d));
                                (d, end)
                            }
                        };
                        let m = (run_end - h).min(n - at);
                        push_extent(
                            out,
                            Extent {
                                start: pos + at,
                                length: m,
                                data: true,
                                zero: !is_data,
                                offset: Some(h),
                                ..base
                            },
                        );
                        at += m;
                    }
                }
                Mapping::Zero { host, .. } => push_extent(
                    out,
                    Extent {
                        zero: true,
                        offset: host.map(|h| h + within),
                        ..base
                    },
                ),
                Mapping::Compressed { .. } => push_extent(
                    out,
                    Extent {
                        data: true,
                        compressed: true,
                        ..base
                    },
                ),
                Mapping::Unallocated => {
                    let covered = match &self.backing {
                        Some(b) => b.size().saturating_sub(pos).min(n),
                        None => 0,
                    };
                    if covered > 0 {
                        let b = self.backing.as_ref().expect("backing present");
                        b.block_status(pos, covered, depth + 1, out, limit)?;
                    }
                    push_extent(
                        out,
                        Extent {
                            start: pos + covered,
                            length: n - covered,
                            present: false,
                            zero: true,
                            ..base
                        },
                    );
                }
            }
            pos += n;
        }
        Ok(())
    }
}
