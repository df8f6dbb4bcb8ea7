//! [`DirtyBitmap`]: one bit per `granularity` bytes of the disk, held sparsely in
//! chunks of one bitmap data cluster each (the unit of the on-disk bitmap table), so
//! memory follows what is dirty, not the disk size: an untouched chunk costs nothing
//! and an all-ones chunk (a table entry with the "all ones" flag) costs one marker.

use std::collections::BTreeMap;

/// One chunk's bits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    /// Every bit set.
    Ones,
    /// The bits, 64 per word, bit `i` of the chunk in word `i / 64` at bit `i % 64`.
    Bits(Box<[u64]>),
}

/// How one chunk is to be stored (see [`DirtyBitmap::chunk`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirtyChunk {
    /// No bit set.
    Zeros,
    /// Every bit set.
    Ones,
    /// The serialised cluster: bit `i` in byte `i / 8` at bit `i % 8` (LSB first).
    Data(Vec<u8>),
}

/// A dirty bitmap over a disk of `size` bytes.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    granularity_bits: u32,
    size: u64,
    /// log2 of the bits one chunk holds (cluster bits + 3).
    chunk_bits: u32,
    chunks: BTreeMap<u64, Chunk>,
    /// The bit range `[first, end)` marked last, known to be set: consecutive small
    /// writes mostly fall in the same granule and then cost two comparisons.
    last_marked: (u64, u64),
}

impl DirtyBitmap {
    /// An empty bitmap of one bit per `1 << granularity_bits` bytes over `size` bytes,
    /// in chunks of `chunk_bytes` bytes (the image's cluster size).
    pub fn new(granularity_bits: u32, size: u64, chunk_bytes: u64) -> DirtyBitmap {
        DirtyBitmap {
            granularity_bits,
            size,
            chunk_bits: chunk_bytes.trailing_zeros() + 3,
            chunks: BTreeMap::new(),
            last_marked: (0, 0),
        }
    }

    /// Bytes one bit covers.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// log2 of [`DirtyBitmap::granularity`].
    pub fn granularity_bits(&self) -> u32 {
        self.granularity_bits
    }

    /// The disk size the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bits of the whole bitmap.
    fn nbits(&self) -> u64 {
        self.size.div_ceil(self.granularity())
    }

    /// Chunks of the whole bitmap (entries of its bitmap table).
    pub fn nchunks(&self) -> u64 {
        self.nbits().div_ceil(1 << self.chunk_bits)
    }

    fn words_per_chunk(&self) -> usize {
        1usize << (self.chunk_bits - 6)
    }

    /// Sets the bits of bit range `[first, end)`.
    fn set_bits(&mut self, first: u64, end: u64) {
        let cb = self.chunk_bits;
        let per = 1u64 << cb;
        let words = self.words_per_chunk();
        let mut bit = first;
        while bit < end {
            let chunk = bit >> cb;
            let stop = end.min((chunk + 1) << cb);
            let (lo, hi) = (bit & (per - 1), ((stop - 1) & (per - 1)) + 1);
            // The hot path (a write into a chunk already dirty) is one lookup.
            let entry = match self.chunks.get_mut(&chunk) {
                Some(e) => e,
                None => self
                    .chunks
                    .entry(chunk)
                    .or_insert_with(|| Chunk::Bits(vec![0u64; words].into_boxed_slice())),
            };
            if let Chunk::Bits(w) = entry {
                set_range(w, lo, hi);
                // Only a mark covering the whole chunk makes it a marker: scanning
                // the words on every write would cost more than it saves.
                if hi - lo == per {
                    *entry = Chunk::Ones;
                }
            }
            bit = stop;
        }
    }

    /// Marks guest bytes `[offset, offset + len)` dirty (clamped to the size).
    pub fn mark(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return;
        }
        let g = self.granularity_bits;
        let (first, stop) = (offset >> g, ((end - 1) >> g) + 1);
        let (a, b) = self.last_marked;
        if first >= a && stop <= b {
            return;
        }
        self.set_bits(first, stop);
        self.last_marked = (first, stop);
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.last_marked = (0, 0);
        self.chunks.clear();
    }

    /// Whether the bit covering guest byte `offset` is set.
    pub fn is_dirty(&self, offset: u64) -> bool {
        let bit = offset >> self.granularity_bits;
        match self.chunks.get(&(bit >> self.chunk_bits)) {
            None => false,
            Some(Chunk::Ones) => offset < self.size,
            Some(Chunk::Bits(w)) => {
                let i = bit & ((1 << self.chunk_bits) - 1);
                w[(i / 64) as usize] >> (i % 64) & 1 != 0
            }
        }
    }

    /// Runs of equal state covering `[offset, offset + len)` (clamped to the size):
    /// `(start, length, dirty)`, contiguous, alternating, at most `limit` of them.
    pub fn extents(&self, offset: u64, len: u64, limit: usize) -> Vec<(u64, u64, bool)> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let g = self.granularity_bits;
        let push = |out: &mut Vec<(u64, u64, bool)>, start: u64, stop: u64, dirty: bool| {
            let (start, stop) = (start.max(offset), stop.min(end));
            if start >= stop {
                return;
            }
            match out.last_mut() {
                Some(last) if last.2 == dirty && last.0 + last.1 == start => last.1 += stop - start,
                _ => out.push((start, stop - start, dirty)),
            }
        };
        if offset >= end {
            return out;
        }
        let per = 1u64 << self.chunk_bits;
        let chunk_span = per << g;
        let mut at = offset;
        while at < end && out.len() <= limit {
            let chunk = (at >> g) >> self.chunk_bits;
            let base = chunk * chunk_span;
            match self.chunks.get(&chunk) {
                None => {
                    // Skip every absent chunk up to the next present one.
                    let next = self
                        .chunks
                        .range(chunk + 1..)
                        .next()
                        .map_or(end, |(&c, _)| (c * chunk_span).min(end));
                    push(&mut out, at, next, false);
                    at = next;
                }
                Some(Chunk::Ones) => {
                    push(&mut out, at, base + chunk_span, true);
                    at = base + chunk_span;
                }
                Some(Chunk::Bits(w)) => {
                    let mut i = (at >> g) - chunk * per;
                    while i < per && base + (i << g) < end {
                        let word = w[(i / 64) as usize];
                        let dirty = word >> (i % 64) & 1 != 0;
                        // Extend over equal bits, a whole word at a time when possible.
                        let mut j = i + 1;
                        while j < per {
                            let wj = w[(j / 64) as usize];
                            if j.is_multiple_of(64)
                                && (wj == 0 && !dirty || wj == u64::MAX && dirty)
                            {
                                j += 64;
                                continue;
                            }
                            if (wj >> (j % 64) & 1 != 0) != dirty {
                                break;
                            }
                            j += 1;
                        }
                        push(&mut out, base + (i << g), base + (j << g), dirty);
                        i = j;
                    }
                    at = base + chunk_span;
                }
            }
        }
        out.truncate(limit.max(1));
        out
    }

    /// Bytes covered by set bits (the last bit counts only up to the size).
    pub fn dirty_bytes(&self) -> u64 {
        let per = 1u64 << self.chunk_bits;
        let bits: u64 = self
            .chunks
            .iter()
            .map(|(&c, chunk)| match chunk {
                Chunk::Ones => per.min(self.nbits().saturating_sub(c * per)),
                Chunk::Bits(w) => w.iter().map(|x| x.count_ones() as u64).sum(),
            })
            .sum();
        let mut bytes = bits << self.granularity_bits;
        let nbits = self.nbits();
        if nbits > 0 && self.is_dirty((nbits - 1) << self.granularity_bits) {
            bytes -= (nbits << self.granularity_bits) - self.size;
        }
        bytes
    }

    /// Sets every bit that `other` has set (any granularity; ranges past this
    /// bitmap's size are ignored).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        let mut at = 0;
        while at < other.size {
            let runs = other.extents(at, other.size - at, 4096);
            let Some(&(s, l, _)) = runs.last() else { break };
            for (start, len, dirty) in runs {
                if dirty {
                    self.mark(start, len);
                }
            }
            at = s + l;
        }
    }

    /// Changes the covered size: bits past a smaller size are dropped, a larger size
    /// adds clear bits (QEMU's rule for bitmaps on resize).
    pub fn resize(&mut self, size: u64) {
        self.last_marked = (0, 0);
        self.size = size;
        let nbits = self.nbits();
        let per = 1u64 << self.chunk_bits;
        let keep = nbits.div_ceil(per);
        self.chunks.retain(|&c, _| c < keep);
        if !nbits.is_multiple_of(per) {
            let last = nbits / per;
            let words = self.words_per_chunk();
            if let Some(chunk) = self.chunks.get_mut(&last) {
                if let Chunk::Ones = chunk {
                    let mut w = vec![0u64; words].into_boxed_slice();
                    set_range(&mut w, 0, per);
                    *chunk = Chunk::Bits(w);
                }
                if let Chunk::Bits(w) = chunk {
                    clear_from(w, nbits % per);
                }
            }
        }
    }

    /// Chunk `index` as it is to be stored.
    pub fn chunk(&self, index: u64) -> DirtyChunk {
        match self.chunks.get(&index) {
            None => DirtyChunk::Zeros,
            Some(Chunk::Ones) => DirtyChunk::Ones,
            Some(Chunk::Bits(w)) => {
                DirtyChunk::Data(w.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        }
    }

    /// Indexes of the chunks with any bit set, in order.
    pub fn dirty_chunks(&self) -> Vec<u64> {
        self.chunks.keys().copied().collect()
    }

    /// Loads chunk `index` from its stored form; bits past the size are dropped.
    pub fn load_chunk(&mut self, index: u64, stored: DirtyChunk) {
        let per = 1u64 << self.chunk_bits;
        if index >= self.nchunks() {
            return;
        }
        let chunk = match stored {
            DirtyChunk::Zeros => {
                self.last_marked = (0, 0);
                self.chunks.remove(&index);
                return;
            }
            DirtyChunk::Ones => Chunk::Ones,
            DirtyChunk::Data(bytes) => {
                let mut w: Box<[u64]> = bytes
                    .chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect();
                self.last_marked = (0, 0);
                if w.iter().all(|&x| x == 0) {
                    self.chunks.remove(&index);
                    return;
                }
                if w.len() != self.words_per_chunk() {
                    let mut full = vec![0u64; self.words_per_chunk()];
                    let n = full.len().min(w.len());
                    full[..n].copy_from_slice(&w[..n]);
                    w = full.into_boxed_slice();
                }
                Chunk::Bits(w)
            }
        };
        self.chunks.insert(index, chunk);
        // The last chunk keeps no bits past the size.
        let nbits = self.nbits();
        if index == nbits / per && !nbits.is_multiple_of(per) {
            let size = self.size;
            self.resize(size);
        }
    }
}

/// Sets bits `[lo, hi)` of `w`.
fn set_range(w: &mut [u64], lo: u64, hi: u64) {
    let mut i = lo;
    while i < hi {
        let word = (i / 64) as usize;
        let bit = i % 64;
        let n = (64 - bit).min(hi - i);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        w[word] |= mask;
        i += n;
    }
}

/// Clears bits `from..` of `w`.
fn clear_from(w: &mut [u64], from: u64) {
    let word = (from / 64) as usize;
    if word < w.len() {
        w[word] &= (1u64 << (from % 64)) - 1;
        w[word + 1..].iter_mut().for_each(|x| *x = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain model: one bool per granule.
    fn model_extents(bits: &[bool], g: u64, size: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for (i, &d) in bits.iter().enumerate() {
            let start = i as u64 * g;
            let len = g.min(size - start);
            match out.last_mut() {
                Some(l) if l.2 == d => l.1 += len,
                _ => out.push((start, len, d)),
            }
        }
        out
    }

    #[test]
    fn marks_match_a_plain_model() {
        let mut seed = 0x1234_5678u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for &(g_bits, chunk) in &[(9u32, 512u64), (16, 512), (12, 4096)] {
            let size = 3 * ((chunk * 8) << g_bits) + 12345;
            let g = 1u64 << g_bits;
            let mut b = DirtyBitmap::new(g_bits, size, chunk);
            let mut model = vec![false; size.div_ceil(g) as usize];
            for _ in 0..200 {
                let off = rnd(size);
                let long = rnd(4) == 0;
                let len = 1 + rnd(if long { size / 2 } else { 4 * g });
                b.mark(off, len);
                let end = (off + len).min(size);
                for i in off / g..=(end - 1) / g {
                    model[i as usize] = true;
                }
            }
            assert_eq!(
                b.extents(0, size, usize::MAX),
                model_extents(&model, g, size)
            );
            let count: u64 = model_extents(&model, g, size)
                .iter()
                .filter(|e| e.2)
                .map(|e| e.1)
                .sum();
            assert_eq!(b.dirty_bytes(), count);
            // Round trip through the stored form.
            let mut c = DirtyBitmap::new(g_bits, size, chunk);
            for i in 0..b.nchunks() {
                c.load_chunk(i, b.chunk(i));
            }
            assert_eq!(
                c.extents(0, size, usize::MAX),
                b.extents(0, size, usize::MAX)
            );
            // A sub-range starts and ends where asked.
            let sub = b.extents(g / 2 + 7, size / 3, usize::MAX);
            assert_eq!(sub[0].0, g / 2 + 7);
            assert_eq!(sub.iter().map(|e| e.1).sum::<u64>(), size / 3);
        }
    }

    #[test]
    fn merge_resize_and_ones() {
        let mut a = DirtyBitmap::new(16, 10 << 20, 512);
        let mut b = DirtyBitmap::new(9, 10 << 20, 65536);
        b.mark(1000, 10);
        b.mark(5 << 20, 1 << 20);
        a.merge(&b);
        assert_eq!(
            a.extents(0, 10 << 20, 10),
            vec![
                (0, 65536, true),
                (65536, (5 << 20) - 65536, false),
                (5 << 20, 1 << 20, true),
                (6 << 20, 4 << 20, false)
            ]
        );
        a.mark(0, 10 << 20);
        assert_eq!(a.dirty_bytes(), 10 << 20);
        a.resize((3 << 20) + 100);
        assert_eq!(a.dirty_bytes(), (3 << 20) + 100);
        a.resize(4 << 20);
        assert_eq!(
            a.extents(0, 4 << 20, 10),
            vec![
                (0, (3 << 20) + 65536, true),
                ((3 << 20) + 65536, (1 << 20) - 65536, false)
            ]
        );
        a.clear();
        assert_eq!(a.dirty_bytes(), 0);
    }
}
