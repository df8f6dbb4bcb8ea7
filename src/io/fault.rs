//! A [`Storage`] wrapper that counts and logs requests and injects failures, for tests:
//! "fail every write from the N-th on" simulates a crash at any point, "fail the N-th
//! write" (or a pseudo-random share of them) a transient error the caller recovers
//! from, "fail the next flush" a lost writeback, and a delay on every request makes a
//! slow disk, widening the windows concurrency bugs hide in.

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
    /// The one write (by count) that fails on its own, `u64::MAX` for none.
    fail_write_at: AtomicU64,
    /// Fail writes whose count hashes below this share of `u64::MAX` (0 = none).
    fail_share: AtomicU64,
    fail_seed: AtomicU64,
    /// Fail the next flush only.
    fail_next_flush: AtomicBool,
    /// The errno injected write failures carry.
    errno: std::sync::atomic::AtomicI32,
    /// Injected failures so far.
    failures: AtomicU64,
    /// Microseconds every read / write sleeps before reaching the inner storage.
    read_delay_us: AtomicU64,
    write_delay_us: AtomicU64,
    reads_seen: AtomicU64,
    /// The one read (by count) that fails, `u64::MAX` for none.
    fail_read_at: AtomicU64,
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
            fail_write_at: AtomicU64::new(u64::MAX),
            fail_share: AtomicU64::new(0),
            fail_seed: AtomicU64::new(0),
            fail_next_flush: AtomicBool::new(false),
            errno: std::sync::atomic::AtomicI32::new(libc::EIO),
            failures: AtomicU64::new(0),
            read_delay_us: AtomicU64::new(0),
            write_delay_us: AtomicU64::new(0),
            reads_seen: AtomicU64::new(0),
            fail_read_at: AtomicU64::new(u64::MAX),
        }
    }

    /// Makes the `n`-th read from now (0 = the next) fail with `EIO`, once.
    pub fn fail_one_read(&self, n: u64) {
        let seen = self.reads_seen.load(Ordering::SeqCst);
        self.fail_read_at.store(seen + n, Ordering::SeqCst);
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

    /// Makes the `n`-th write from now (0 = the next one) fail, and only that one: a
    /// transient error (set its errno with [`FaultStorage::set_errno`]).
    pub fn fail_one_write(&self, n: u64) {
        let seen = self.writes_seen.load(Ordering::SeqCst);
        self.fail_write_at.store(seen + n, Ordering::SeqCst);
    }

    /// Makes about one write in `one_in` fail (chosen by a hash of its count and
    /// `seed`, so a run can be replayed); 0 turns it off.
    pub fn fail_writes_randomly(&self, one_in: u64, seed: u64) {
        self.fail_seed.store(seed, Ordering::SeqCst);
        let share = u64::MAX.checked_div(one_in).unwrap_or(0);
        self.fail_share.store(share, Ordering::SeqCst);
    }

    /// Makes the next flush fail, as a failed writeback does; later flushes reach the
    /// inner storage again (and succeed, as Linux's do after a lost writeback).
    pub fn fail_next_flush(&self) {
        self.fail_next_flush.store(true, Ordering::SeqCst);
    }

    /// The errno of injected write failures (EIO by default; ENOSPC for a full disk).
    pub fn set_errno(&self, errno: i32) {
        self.errno.store(errno, Ordering::SeqCst);
    }

    /// How many failures were injected so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    /// Disarms all faults.
    pub fn heal(&self) {
        self.fail_writes_from.store(u64::MAX, Ordering::SeqCst);
        self.fail_flushes.store(false, Ordering::SeqCst);
        self.fail_write_at.store(u64::MAX, Ordering::SeqCst);
        self.fail_share.store(0, Ordering::SeqCst);
        self.fail_next_flush.store(false, Ordering::SeqCst);
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
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let share = self.fail_share.load(Ordering::SeqCst);
        let random = share > 0 && {
            let mut x = n ^ self.fail_seed.load(Ordering::SeqCst);
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (x ^ (x >> 31)) < share
        };
        if random || n == self.fail_write_at.load(Ordering::SeqCst) {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(
                self.errno.load(Ordering::SeqCst),
            ));
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
        if self.reads_seen.fetch_add(1, Ordering::SeqCst)
            == self.fail_read_at.load(Ordering::SeqCst)
        {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
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
        if self.fail_flushes.load(Ordering::SeqCst)
            || self.fail_next_flush.swap(false, Ordering::SeqCst)
        {
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
