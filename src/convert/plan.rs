//! The work list of a copy: one block-status pass over the source says which target
//! ranges get data, which get zeros and which are left alone; a cursor then hands the
//! list out as numbered chunks.

use super::endpoint::Source;
use crate::error::Result;

/// What a range of the target gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The source's bytes (read, scanned for zeros, written).
    Copy,
    /// Zeros, written as zeros (the target does not read as zero there by itself).
    Zero,
}

/// A range of the target and what it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// What it gets.
    pub action: Action,
}

/// How the source's status turns into work.
#[derive(Debug, Clone, Copy)]
pub struct PlanRules {
    /// The target reads as zeros wherever nothing is written (a new image without a
    /// backing file, a raw file just created, or the caller says so).
    pub target_reads_zero: bool,
    /// Only what layers of the source above this one allocate is copied (the
    /// target's backing file holds the rest): `Some(1)` copies the top image alone
    /// (`convert -B`), `Some(d)` what lies above the layer at depth `d` (`commit -b`).
    pub above_layer: Option<u32>,
    /// Zero detection is on (qemu-img's `-S` is not 0): areas known to read as zeros
    /// are not read; with it off every byte is copied as data.
    pub detect_zeroes: bool,
    /// Copy ranges are widened to whole units of this many bytes (compressed targets
    /// take whole clusters), 1 for none.
    pub align: u64,
}

/// Spans fetched per block-status call.
const SPANS_PER_CALL: usize = 4096;

/// Builds the work list over the whole source, merged and in guest order.
pub fn plan(source: &Source, rules: &PlanRules) -> Result<Vec<Work>> {
    let size = source.size();
    let mut works: Vec<Work> = Vec::new();
    let mut at = 0;
    while at < size {
        let spans = source.spans(at, size - at, SPANS_PER_CALL)?;
        if spans.is_empty() {
            break;
        }
        for s in &spans {
            let skipped = rules
                .above_layer
                .is_some_and(|d| s.layer.is_none_or(|l| l >= d));
            let action = if skipped {
                None
            } else if !rules.detect_zeroes {
                Some(Action::Copy)
            } else if s.zero {
                (!rules.target_reads_zero).then_some(Action::Zero)
            } else {
                Some(Action::Copy)
            };
            if let Some(action) = action {
                push(&mut works, s.start, s.length, action);
            }
            at = s.start + s.length;
        }
    }
    if rules.align > 1 {
        works = align_copies(works, rules.align, size);
    }
    Ok(works)
}

/// Appends a range, merging it into the last one when it continues it.
fn push(works: &mut Vec<Work>, start: u64, length: u64, action: Action) {
    if length == 0 {
        return;
    }
    if let Some(last) = works.last_mut() {
        if last.action == action && last.start + last.length == start {
            last.length += length;
            return;
        }
    }
    works.push(Work {
        start,
        length,
        action,
    });
}

/// Widens every copy range to whole `align` units (clamped to `size`); zero ranges
/// lose what the copies now cover (the copy reads those bytes and finds the zeros).
fn align_copies(works: Vec<Work>, align: u64, size: u64) -> Vec<Work> {
    let mut copies: Vec<(u64, u64)> = Vec::new();
    for w in works.iter().filter(|w| w.action == Action::Copy) {
        let start = w.start / align * align;
        let end = (w.start + w.length)
            .div_ceil(align)
            .saturating_mul(align)
            .min(size);
        match copies.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => copies.push((start, end)),
        }
    }
    let mut out = Vec::new();
    let mut c = 0;
    let mut events: Vec<Work> = Vec::new();
    for w in works.iter().filter(|w| w.action == Action::Zero) {
        // Zero range minus the copy ranges (both sorted).
        let (mut start, end) = (w.start, w.start + w.length);
        while c < copies.len() && copies[c].1 <= start {
            c += 1;
        }
        let mut k = c;
        while start < end {
            match copies.get(k) {
                Some(&(cs, ce)) if cs < end => {
                    if cs > start {
                        events.push(Work {
                            start,
                            length: cs - start,
                            action: Action::Zero,
                        });
                    }
                    start = start.max(ce);
                    k += 1;
                }
                _ => {
                    events.push(Work {
                        start,
                        length: end - start,
                        action: Action::Zero,
                    });
                    start = end;
                }
            }
        }
    }
    events.extend(copies.into_iter().map(|(s, e)| Work {
        start: s,
        length: e - s,
        action: Action::Copy,
    }));
    events.sort_by_key(|w| w.start);
    for w in events {
        push(&mut out, w.start, w.length, w.action);
    }
    out
}

/// One piece of work handed to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Position in guest order (writes in order go by it).
    pub seq: u64,
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// What it gets.
    pub action: Action,
}

/// Hands the work list out as chunks in guest order: copy ranges cut at multiples
/// of `chunk` (so chunks of compressed targets stay whole clusters), zero ranges in
/// pieces of at most `zero_chunk`.
pub struct Cursor {
    works: Vec<Work>,
    index: usize,
    offset: u64,
    seq: u64,
    chunk: u64,
    zero_chunk: u64,
}

impl Cursor {
    /// A cursor over `works`.
    pub fn new(works: Vec<Work>, chunk: u64, zero_chunk: u64) -> Cursor {
        Cursor {
            works,
            index: 0,
            offset: 0,
            seq: 0,
            chunk: chunk.max(1),
            zero_chunk: zero_chunk.max(1),
        }
    }

    /// Bytes the whole list covers (the progress total).
    pub fn total(&self) -> u64 {
        self.works.iter().map(|w| w.length).sum()
    }

    /// The next chunk, or `None` at the end.
    pub fn next_chunk(&mut self) -> Option<Chunk> {
        let w = *self.works.get(self.index)?;
        let start = w.start + self.offset;
        let end = w.start + w.length;
        let stop = match w.action {
            Action::Copy => ((start / self.chunk + 1) * self.chunk).min(end),
            Action::Zero => start.saturating_add(self.zero_chunk).min(end),
        };
        self.offset += stop - start;
        if stop == end {
            self.index += 1;
            self.offset = 0;
        }
        let seq = self.seq;
        self.seq += 1;
        Some(Chunk {
            seq,
            start,
            length: stop - start,
            action: w.action,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(start: u64, length: u64, action: Action) -> Work {
        Work {
            start,
            length,
            action,
        }
    }

    #[test]
    fn copies_widen_to_whole_units_and_zeros_give_way() {
        let works = vec![
            w(0, 1000, Action::Zero),
            w(1000, 100, Action::Copy),
            w(1100, 5000, Action::Zero),
            w(6100, 10, Action::Copy),
        ];
        let out = align_copies(works, 1024, 6200);
        assert_eq!(
            out,
            vec![
                w(0, 2048, Action::Copy),
                w(2048, 3072, Action::Zero),
                w(5120, 1024, Action::Copy),
            ]
        );
    }

    #[test]
    fn the_cursor_cuts_copies_at_chunk_multiples_in_order() {
        let mut c = Cursor::new(
            vec![w(100, 300, Action::Copy), w(400, 1000, Action::Zero)],
            128,
            600,
        );
        assert_eq!(c.total(), 1300);
        let got: Vec<(u64, u64, u64)> = std::iter::from_fn(|| c.next_chunk())
            .map(|k| (k.seq, k.start, k.length))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 100, 28),
                (1, 128, 128),
                (2, 256, 128),
                (3, 384, 16),
                (4, 400, 600),
                (5, 1000, 400)
            ]
        );
    }
}
