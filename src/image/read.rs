//! The read path: guest ranges are split by cluster, classified, and contiguous pieces
//! of the same kind (adjacent host clusters, zeros, backing file) are read together.

use super::meta::Meta;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::entry::Mapping;

/// Where a run of guest bytes comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Host(u64),
    Zero,
    Backing(u64),
    /// A compressed cluster (descriptor offset and length) and the first byte wanted.
    Compressed {
        offset: u64,
        len: u64,
        within: u64,
    },
}

impl Meta {
    /// Checks that a data cluster starts inside the file.
    pub(crate) fn check_data_cluster(&self, host: u64) -> Result<()> {
        if host >= self.host_end {
            return Err(corrupt!(
                "data cluster at {host:#x} lies outside the file ({} bytes)",
                self.host_end
            ));
        }
        Ok(())
    }

    /// Reads guest bytes at `offset` (already range-checked) into `buf`.
    pub(crate) fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.cluster_size;
        let mut run: Option<(Source, usize, usize)> = None; // (source, buf start, len)
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let within = guest & (cs - 1);
            let n = ((cs - within) as usize).min(buf.len() - done);
            let source = match self.mapping(guest)? {
                Mapping::Normal { host, .. } => {
                    self.check_data_cluster(host)?;
                    Source::Host(host + within)
                }
                Mapping::Zero { .. } => Source::Zero,
                Mapping::Unallocated => Source::Backing(guest),
                Mapping::Compressed { offset, len } => Source::Compressed {
                    offset,
                    len,
                    within,
                },
            };
            run = match run {
                Some((s, start, len)) if continues(s, len, source) => Some((s, start, len + n)),
                Some((s, start, len)) => {
                    self.read_run(s, &mut buf[start..start + len])?;
                    Some((source, done, n))
                }
                None => Some((source, done, n)),
            };
            done += n;
        }
        if let Some((s, start, len)) = run {
            self.read_run(s, &mut buf[start..start + len])?;
        }
        Ok(())
    }

    fn read_run(&mut self, source: Source, buf: &mut [u8]) -> Result<()> {
        match source {
            Source::Host(host) => self
                .storage
                .read_at(buf, host)
                .map_err(Meta::io_err(format!(
                    "reading guest data at host {host:#x}"
                ))),
            Source::Zero => {
                buf.fill(0);
                Ok(())
            }
            Source::Backing(guest) => self.read_backing(buf, guest),
            Source::Compressed {
                offset,
                len,
                within,
            } => {
                let data = self.decompressed(offset, len)?;
                buf.copy_from_slice(&data[within as usize..within as usize + buf.len()]);
                Ok(())
            }
        }
    }

    /// Reads unallocated guest bytes from the backing chain (zeros where it has none).
    pub(crate) fn read_backing(&mut self, buf: &mut [u8], guest: u64) -> Result<()> {
        if self.backing_refused {
            return Err(Error::Unsupported(format!(
                "guest offset {guest:#x} is not allocated in this image and its backing file '{}' was not opened (backing files disabled by the open options)",
                self.header.backing_file.as_deref().unwrap_or("")
            )));
        }
        match &self.backing {
            Some(b) => b.read_at(buf, guest),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// True when unallocated guest bytes at `guest` read as zero without reading data.
    pub(crate) fn backing_reads_zero(&mut self, guest: u64, len: u64) -> Result<bool> {
        match &self.backing {
            Some(b) => b.reads_zero(guest, len),
            None => Ok(!self.backing_refused),
        }
    }

    /// True when every byte of `[guest, guest+len)` reads as zero through the whole
    /// chain, decided from metadata alone (allocated data counts as non-zero).
    pub(crate) fn range_reads_zero(&mut self, guest: u64, len: u64) -> Result<bool> {
        let size = self.header.size;
        let end = (guest + len).min(size);
        let cs = self.cluster_size;
        let mut pos = guest;
        while pos < end {
            let next = ((pos | (cs - 1)) + 1).min(end);
            let zero = match self.mapping(pos)? {
                Mapping::Zero { .. } => true,
                Mapping::Unallocated => self.backing_reads_zero(pos, next - pos)?,
                _ => false,
            };
            if !zero {
                return Ok(false);
            }
            pos = next;
        }
        Ok(true)
    }
}

fn continues(run: Source, run_len: usize, next: Source) -> bool {
    match (run, next) {
        (Source::Host(a), Source::Host(b)) => a + run_len as u64 == b,
        (Source::Zero, Source::Zero) => true,
        (Source::Backing(a), Source::Backing(b)) => a + run_len as u64 == b,
        _ => false,
    }
}
