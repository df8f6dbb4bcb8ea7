//! A plain model of a dirty bitmap (one bool per granule), and the runs cowdisk
//! reports, for the bitmap tests and the differential test.

use cowdisk::Image;

/// Which granules of a disk are dirty: a plain model of one bitmap.
#[derive(Clone)]
pub struct Model {
    pub granularity: u64,
    pub size: u64,
    pub bits: Vec<bool>,
}

impl Model {
    pub fn new(granularity: u64, size: u64) -> Model {
        Model {
            granularity,
            size,
            bits: vec![false; size.div_ceil(granularity) as usize],
        }
    }

    pub fn mark(&mut self, offset: u64, len: u64) {
        let end = (offset + len).min(self.size);
        if len == 0 || offset >= end {
            return;
        }
        for i in offset / self.granularity..=(end - 1) / self.granularity {
            self.bits[i as usize] = true;
        }
    }

    /// (start, length, dirty) runs over the whole disk.
    pub fn runs(&self) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for (i, &d) in self.bits.iter().enumerate() {
            let start = i as u64 * self.granularity;
            let len = self.granularity.min(self.size - start);
            match out.last_mut() {
                Some(l) if l.2 == d => l.1 += len,
                _ => out.push((start, len, d)),
            }
        }
        out
    }
}

/// The dirty extents cowdisk reports for a bitmap, over the whole disk.
pub fn cowdisk_runs(img: &Image, name: &str) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let size = img.size();
    let mut at = 0;
    while at < size {
        let ext = img.dirty_extents(name, at, size - at, 7).unwrap();
        assert!(!ext.is_empty());
        assert_eq!(ext[0].start, at, "extents start where asked");
        for e in ext {
            match out.last_mut() {
                Some(l) if l.2 == e.dirty => l.1 += e.length,
                _ => out.push((e.start, e.length, e.dirty)),
            }
            at = e.start + e.length;
        }
    }
    out
}

impl Model {
    /// The disk changed size: bits past it go, new ones are clean (QEMU's rule).
    pub fn resize(&mut self, size: u64) {
        self.size = size;
        self.bits
            .resize(size.div_ceil(self.granularity) as usize, false);
    }
}
