//! The read path: guest ranges are split by cluster, classified, and contiguous pieces
//! of the same kind (adjacent host clusters, zeros, backing file) are read together.
//! Planning happens under the lock; host and backing I/O and decompression may run
//! without it.

use super::compress::CompressedRead;
use super::meta::Meta;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::entry::Mapping;

/// A piece of a read that needs I/O, run with or without the lock.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ReadTask {
    /// `len` bytes at host offset `host` (guest offset `guest`) into the buffer at
    /// `start`.
    Host {
        host: u64,
        guest: u64,
        start: usize,
        len: usize,
    },
    /// `len` unallocated bytes at guest offset `guest` from the backing chain (zeros
    /// without one) into the buffer at `start`.
    Backing {
        guest: u64,
        start: usize,
        len: usize,
    },
    /// `len` bytes at `within` of the compressed cluster `read` into the buffer at
    /// `start`.
    Compressed {
        read: CompressedRead,
        within: usize,
        start: usize,
        len: usize,
    },
}

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

    /// Reads guest bytes at `offset` (already range-checked) into `buf`, with the lock
    /// held throughout (internal callers; guest reads go through `Image::read_at`).
    pub(crate) fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let tasks = self.plan_read(buf, offset)?;
        if let Some((read, data)) = self.data_io().run_reads(buf, &tasks)? {
            self.keep_decompressed(read, data);
        }
        Ok(())
    }

    /// Resolves a read of guest bytes at `offset` (already range-checked): zeros (and
    /// compressed data cached or still in the write cache) are filled into `buf` now;
    /// what needs I/O is returned as tasks (contiguous pieces merged), which may run
    /// without the lock.
    pub(crate) fn plan_read(&mut self, buf: &mut [u8], offset: u64) -> Result<Vec<ReadTask>> {
        self.check_key()?;
        let cs = self.cluster_size;
        let mut tasks = Vec::new();
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
                Mapping::Unallocated => {
                    self.check_backing_opened(guest)?;
                    Source::Backing(guest)
                }
                Mapping::Compressed { offset, len } => Source::Compressed {
                    offset,
                    len,
                    within,
                },
            };
            run = match run {
                Some((s, start, len)) if continues(s, len, source) => Some((s, start, len + n)),
                Some((s, start, len)) => {
                    self.resolve_run(s, buf, offset, start, len, &mut tasks)?;
                    Some((source, done, n))
                }
                None => Some((source, done, n)),
            };
            done += n;
        }
        if let Some((s, start, len)) = run {
            self.resolve_run(s, buf, offset, start, len, &mut tasks)?;
        }
        Ok(tasks)
    }

    /// Fills `buf[start..start+len]` now (zeros, compressed data) or queues a task.
    fn resolve_run(
        &mut self,
        source: Source,
        buf: &mut [u8],
        offset: u64,
        start: usize,
        len: usize,
        tasks: &mut Vec<ReadTask>,
    ) -> Result<()> {
        match source {
            Source::Host(host) => tasks.push(ReadTask::Host {
                host,
                guest: offset + start as u64,
                start,
                len,
            }),
            Source::Backing(guest) => tasks.push(ReadTask::Backing { guest, start, len }),
            Source::Zero => buf[start..start + len].fill(0),
            Source::Compressed {
                offset,
                len: clen,
                within,
            } => {
                if let Some(read) = self.plan_compressed_read(offset, clen)? {
                    // Decompression runs without the lock too.
                    tasks.push(ReadTask::Compressed {
                        read,
                        within: within as usize,
                        start,
                        len,
                    });
                    return Ok(());
                }
                let data = self.decompressed(offset, clen)?;
                buf[start..start + len]
                    .copy_from_slice(&data[within as usize..within as usize + len]);
            }
        }
        Ok(())
    }

    /// Refuses to read unallocated bytes when the backing file was not opened.
    pub(crate) fn check_backing_opened(&self, guest: u64) -> Result<()> {
        if self.backing_refused {
            return Err(Error::Unsupported(format!(
                "guest offset {guest:#x} is not allocated in this image and its backing file '{}' was not opened (backing files disabled by the open options)",
                self.header.backing_file.as_deref().unwrap_or("")
            )));
        }
        Ok(())
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
