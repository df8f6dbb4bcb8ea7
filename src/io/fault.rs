//! A [`Storage`] wrapper that counts and logs requests and injects failures, for tests:
//! "fail every write from the N-th on" simulates a crash at any point, and a delay on
//! every request makes a slow disk, widening the windows concurrency bugs hide in.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Storage;

/// One request seen by a [`FaultStorage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoEvent {
    /// A read of `len` bytes at `offset`.
    Read {
        /// Start offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A (possibly vectored) write of `len` bytes at `offset` in `pieces` buffers.
    Write {
        /// Start offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Number of buffers in the request.
        pieces: usize,
    },
    /// A flush.
    Flush,
}

/// Counters of requests that reached the inner storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounts {
    /// Read requests.
    pub reads: u64,
    /// Write requests (a vectored write counts once).
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
}

/// Wraps a storage; logs every request and can fail writes from a chosen one on.
pub struct FaultStorage {
    inner: Arc<dyn Storage>,
    log: Mutex<Vec<IoEvent>>,
    writes_seen: AtomicU64,
    fail_writes_from: AtomicU64,
    fail_flushes: AtomicBool,
    /// Microseconds every read / write sleeps before reaching the inner storage.
    read_delay_us: AtomicU64,
    write_delay_us: AtomicU64,
}

impl FaultStorage {
    /// Wraps `inner` with no faults armed.
    pub fn new(inner: Arc<dyn Storage>) -> FaultStorage {
        FaultStorage {
            inner,
            log: Mutex::new(Vec::new()),
            writes_seen: AtomicU64::new(0),
            fail_writes_from: AtomicU64::new(u64::MAX),
            fail_flushes: AtomicBool::new(false),
            read_delay_us: AtomicU64::new(0),
            write_delay_us: AtomicU64::new(0),
        }
    }

    /// Makes every later read and write sleep `read` and `write` before reaching the
    /// inner storage (a slow disk).
    pub fn set_delays(&self, read: Duration, write: Duration) {
        self.read_delay_us
            .store(read.as_micros() as u64, Ordering::SeqCst);
        self.write_delay_us
            .store(write.as_micros() as u64, Ordering::SeqCst);
    }

    fn sleep(delay_us: &AtomicU64) {
        let us = delay_us.load(Ordering::Relaxed);
        if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
    }

    /// Makes the `n`-th write from now (0 = the next one) and every later one fail
    /// with EIO, without reaching the inner storage; flushes fail from then on too.
    pub fn fail_writes_after(&self, n: u64) {
        let seen = self.writes_seen.load(Ordering::SeqCst);
        self.fail_writes_from.store(seen + n, Ordering::SeqCst);
    }

    /// Disarms all faults.
    pub fn heal(&self) {
        self.fail_writes_from.store(u64::MAX, Ordering::SeqCst);
        self.fail_flushes.store(false, Ordering::SeqCst);
    }

    /// Writes attempted so far (including failed ones).
    pub fn writes_seen(&self) -> u64 {
        self.writes_seen.load(Ordering::SeqCst)
    }

    /// Takes the request log, leaving it empty.
    pub fn take_log(&self) -> Vec<IoEvent> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Counts the logged requests by kind.
    pub fn counts(&self) -> IoCounts {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = IoCounts::default();
        for e in log.iter() {
            match e {
                IoEvent::Read { .. } => c.reads += 1,
                IoEvent::Write { .. } => c.writes += 1,
                IoEvent::Flush => c.flushes += 1,
            }
        }
        c
    }

    fn record(&self, e: IoEvent) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(e);
    }

    fn check_write(&self) -> io::Result<()> {
        let n = self.writes_seen.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_writes_from.load(Ordering::SeqCst) {
            self.fail_flushes.store(true, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.record(IoEvent::Read {
            offset,
            len: buf.len() as u64,
        });
        FaultStorage::sleep(&self.read_delay_us);
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_vectored_at(&[buf], offset)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.check_write()?;
        self.record(IoEvent::Write {
            offset,
            len: bufs.iter().map(|b| b.len() as u64).sum(),
            pieces: bufs.len(),
        });
        FaultStorage::sleep(&self.write_delay_us);
        self.inner.write_vectored_at(bufs, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.fail_flushes.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.record(IoEvent::Flush);
        self.inner.flush()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_write()?;
        self.inner.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_write()?;
        self.inner.punch_hole(offset, len)
    }

    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        // It changes the file, so it can fail like a write; not logged as one.
        self.check_write()?;
        self.inner.preallocate(offset, len)
    }

    fn extent_at(&self, offset: u64) -> io::Result<Option<(bool, u64)>> {
        self.inner.extent_at(offset)
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.inner.allocated_size()
    }
}
