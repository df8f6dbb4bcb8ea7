//! The worker pool of a copy: N workers take chunks from the cursor, read them from
//! the source in parallel, find zero runs, compress them (compressed targets), and
//! write them — in guest order (each waits for the chunk before it) or as soon as
//! they are ready. The calling thread only watches: it reports progress, lets the
//! caller cancel, and collects the first error.
//!
//! Memory is bounded by the workers: each holds one chunk buffer (and its compressed
//! form), so at most `workers × chunk` bytes are in flight.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::endpoint::{Source, Target};
use super::plan::{Action, Chunk, Cursor, Work};
use crate::error::{Error, Result};
use crate::image::ClusterCompressor;

/// How the workers copy.
#[derive(Debug, Clone, Copy)]
pub struct CopyRules {
    /// Worker threads (1 to 16).
    pub workers: usize,
    /// Write each chunk as soon as it is ready instead of in guest order (`-W`).
    pub out_of_order: bool,
    /// Zero runs of at least this many bytes inside data are not written as data
    /// (0: no zero detection).
    pub min_sparse: u64,
    /// The unit zero detection works in (the target's cluster size or 4 KiB).
    pub granularity: u64,
    /// The target reads as zeros where nothing is written: zero runs are skipped
    /// rather than written as zeros.
    pub target_reads_zero: bool,
    /// Write data compressed (qcow2 targets).
    pub compressed: bool,
    /// Bytes per data chunk (a multiple of the target's cluster size when compressed).
    pub chunk: u64,
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyReport {
    /// Bytes the work list covered (the progress total).
    pub total: u64,
    /// Bytes written as data.
    pub data_bytes: u64,
    /// Bytes made zero by zero writes (zero runs of data included).
    pub zeroed_bytes: u64,
    /// Bytes found to be zeros inside data and left unwritten.
    pub skipped_zero_bytes: u64,
    /// The most target writes that ran at the same moment (1 when in order).
    pub peak_concurrent_writes: usize,
    /// Wall time.
    pub elapsed: Duration,
}

/// Called on the calling thread with (bytes done, total); return false to cancel.
pub type ProgressFn<'a> = dyn FnMut(u64, u64) -> bool + 'a;

/// Shared by the workers and the watching thread.
struct State {
    cursor: Cursor,
    /// The sequence number of the chunk whose writes go next (in-order mode).
    next_write: u64,
    done: u64,
    error: Option<Error>,
    stop: bool,
    workers_left: usize,
    writing: usize,
    report: CopyReport,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    source: Arc<Source>,
    target: Arc<Target>,
    rules: CopyRules,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the first failure and stops everyone.
    fn fail(&self, e: Error) {
        let mut st = self.lock();
        if st.error.is_none() {
            st.error = Some(e);
        }
        st.stop = true;
        self.changed.notify_all();
    }
}

/// Ends a worker's life in the shared state even if it panics.
struct WorkerExit<'a>(&'a Shared);

impl Drop for WorkerExit<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        if std::thread::panicking() && st.error.is_none() {
            st.error = Some(Error::InvalidArgument(
                "a copy worker panicked (a bug in cowdisk)".into(),
            ));
            st.stop = true;
        }
        st.workers_left -= 1;
        self.0.changed.notify_all();
    }
}

/// Copies `works` from `source` to `target` (which the caller flushes or closes).
pub fn run(
    source: Arc<Source>,
    target: Arc<Target>,
    works: Vec<Work>,
    rules: CopyRules,
    progress: Option<&mut ProgressFn<'_>>,
) -> Result<CopyReport> {
    let started = Instant::now();
    let workers = rules.workers.clamp(1, 16);
    let cursor = Cursor::new(works, rules.chunk, ZERO_CHUNK);
    let total = cursor.total();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            cursor,
            next_write: 0,
            done: 0,
            error: None,
            stop: false,
            workers_left: 0,
            writing: 0,
            report: CopyReport {
                total,
                ..CopyReport::default()
            },
        }),
        changed: Condvar::new(),
        source,
        target,
        rules,
    });
    let mut handles = Vec::new();
    for i in 0..workers {
        let s = Arc::clone(&shared);
        shared.lock().workers_left += 1;
        let spawned = std::thread::Builder::new()
            .name(format!("cowdisk-copy-{i}"))
            .spawn(move || {
                let _exit = WorkerExit(&s);
                if let Err(e) = work(&s) {
                    s.fail(e);
                }
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                shared.lock().workers_left -= 1;
                shared.fail(Error::io("starting a copy worker", e));
                break;
            }
        }
    }
    watch(&shared, total, progress);
    for h in handles {
        let _ = h.join();
    }
    let mut st = shared.lock();
    if let Some(e) = st.error.take() {
        return Err(e);
    }
    let mut report = st.report;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// How often progress is reported while nothing else happens.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Zero ranges are handed out in pieces of this size (progress moves, and a cancel
/// is seen, during a long run of zero writes).
const ZERO_CHUNK: u64 = 1 << 30;

/// The calling thread's part: report progress until the workers end; cancel them
/// when the callback says so.
fn watch(shared: &Shared, total: u64, mut progress: Option<&mut ProgressFn<'_>>) {
    // The first call always says 0, however fast the workers are.
    let mut reported = Some(0);
    if let Some(p) = progress.as_mut() {
        if !p(0, total) {
            let mut st = shared.lock();
            if st.error.is_none() {
                st.error = Some(Error::Cancelled(
                    "the progress callback asked to stop".into(),
                ));
            }
            st.stop = true;
            shared.changed.notify_all();
        }
    }
    let mut st = shared.lock();
    loop {
        let done = st.done;
        let finished = st.workers_left == 0;
        let failed = st.error.is_some();
        if let Some(p) = progress.as_mut() {
            // Once the callback asked to stop it is not called again.
            if reported != Some(done) && !(finished && failed) && !st.stop {
                drop(st);
                let go_on = p(done, total);
                reported = Some(done);
                st = shared.lock();
                if !go_on && !finished {
                    if st.error.is_none() {
                        st.error = Some(Error::Cancelled(
                            "the progress callback asked to stop".into(),
                        ));
                    }
                    st.stop = true;
                    shared.changed.notify_all();
                }
                continue;
            }
        }
        if finished {
            return;
        }
        st = shared
            .changed
            .wait_timeout(st, PROGRESS_EVERY)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// One worker: take chunks until the cursor is empty or the copy stops.
fn work(shared: &Shared) -> Result<()> {
    let rules = shared.rules;
    let mut buffer = AlignedBuf::new(rules.chunk as usize);
    let buf = buffer.as_mut_slice();
    let mut compressor = match (rules.compressed, &*shared.target) {
        (true, Target::Qcow2(img)) => Some(ClusterCompressor::new(img.info().compression_type)?),
        _ => None,
    };
    loop {
        let chunk = {
            let mut st = shared.lock();
            if st.stop {
                return Ok(());
            }
            match st.cursor.next_chunk() {
                Some(c) => c,
                None => return Ok(()),
            }
        };
        let prepared = prepare(shared, &chunk, buf, compressor.as_mut())?;
        if !wait_turn(shared, &chunk) {
            return Ok(());
        }
        let written = write(shared, &chunk, buf, &prepared);
        let mut st = shared.lock();
        st.writing -= 1;
        if !rules.out_of_order {
            st.next_write = chunk.seq + 1;
        }
        shared.changed.notify_all();
        written?;
        st.done += chunk.length;
        let r = &mut st.report;
        r.data_bytes += prepared.data_bytes;
        r.zeroed_bytes += prepared.zeroed_bytes;
        r.skipped_zero_bytes += prepared.skipped_bytes;
    }
}

/// A page-aligned buffer: copies between the page cache and a buffer whose address
/// is not page-aligned run several times slower in the kernel (measured: reads of
/// 2 MiB chunks took 5× the CPU time of qemu-img's aligned ones).
pub(crate) struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes starting on a 4 KiB boundary.
    pub(crate) fn new(len: usize) -> AlignedBuf {
        const ALIGN: usize = 4096;
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf { raw, start, len }
    }

    /// The buffer.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// A run of a data chunk: bytes to write, or zeros.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Offset in the chunk.
    at: usize,
    len: usize,
    zero: bool,
}

/// What a chunk will write, worked out before its turn.
#[derive(Default)]
struct Prepared {
    runs: Vec<Run>,
    compressed: Vec<crate::image::CompressedClusters>,
    data_bytes: u64,
    zeroed_bytes: u64,
    skipped_bytes: u64,
}

/// Reads, scans and compresses a chunk (no ordering needed for any of it).
fn prepare(
    shared: &Shared,
    chunk: &Chunk,
    buf: &mut [u8],
    compressor: Option<&mut ClusterCompressor>,
) -> Result<Prepared> {
    let rules = &shared.rules;
    let mut p = Prepared::default();
    if chunk.action == Action::Zero {
        p.zeroed_bytes = chunk.length;
        return Ok(p);
    }
    let len = chunk.length as usize;
    let data = &mut buf[..len];
    shared.source.read_at(data, chunk.start)?;
    p.runs = if rules.min_sparse == 0 {
        vec![Run {
            at: 0,
            len,
            zero: false,
        }]
    } else {
        zero_runs(data, chunk.start, rules.granularity, rules.min_sparse)
    };
    for r in &p.runs {
        if !r.zero {
            p.data_bytes += r.len as u64;
        } else if rules.target_reads_zero {
            p.skipped_bytes += r.len as u64;
        } else {
            p.zeroed_bytes += r.len as u64;
        }
    }
    if let Some(c) = compressor {
        for r in p.runs.iter().filter(|r| !r.zero) {
            let at = chunk.start + r.at as u64;
            p.compressed
                .push(shared.target.compress(c, &data[r.at..r.at + r.len], at)?);
        }
    }
    Ok(p)
}

/// Waits until this chunk may write (in order: the chunk before it has written);
/// false when the copy stopped meanwhile.
fn wait_turn(shared: &Shared, chunk: &Chunk) -> bool {
    let mut st = shared.lock();
    while !shared.rules.out_of_order && st.next_write != chunk.seq && !st.stop {
        st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    if st.stop {
        return false;
    }
    st.writing += 1;
    st.report.peak_concurrent_writes = st.report.peak_concurrent_writes.max(st.writing);
    true
}

fn write(shared: &Shared, chunk: &Chunk, buf: &[u8], p: &Prepared) -> Result<()> {
    let target = &shared.target;
    if chunk.action == Action::Zero {
        return target.write_zeroes(chunk.start, chunk.length);
    }
    let mut compressed = p.compressed.iter();
    for r in &p.runs {
        let at = chunk.start + r.at as u64;
        if r.zero {
            if !shared.rules.target_reads_zero {
                target.write_zeroes(at, r.len as u64)?;
            }
        } else if let Some(c) = compressed.next().filter(|_| shared.rules.compressed) {
            target.store_compressed(c)?;
        } else {
            target.write_at(&buf[r.at..r.at + r.len], at)?;
        }
    }
    Ok(())
}

/// Splits `data` (at guest `start`) into data and zero runs: units of `unit` bytes
/// aligned in guest space that hold only zeros form zero runs when together they are
/// at least `min_sparse` bytes; partial units at the edges are data.
fn zero_runs(data: &[u8], start: u64, unit: u64, min_sparse: u64) -> Vec<Run> {
    let unit = unit.max(512);
    let mut runs: Vec<Run> = Vec::new();
    let push = |runs: &mut Vec<Run>, at: usize, len: usize, zero: bool| {
        if len == 0 {
            return;
        }
        match runs.last_mut() {
            Some(last) if last.zero == zero => last.len += len,
            _ => runs.push(Run { at, len, zero }),
        }
    };
    let head = ((start.div_ceil(unit) * unit - start) as usize).min(data.len());
    push(&mut runs, 0, head, false);
    let mut at = head;
    while at < data.len() {
        let n = (unit as usize).min(data.len() - at);
        let zero = n == unit as usize && is_zero(&data[at..at + n]);
        push(&mut runs, at, n, zero);
        at += n;
    }
    // Zero runs too short to count are data.
    let mut out: Vec<Run> = Vec::new();
    for r in runs {
        let r = if r.zero && (r.len as u64) < min_sparse {
            Run { zero: false, ..r }
        } else {
            r
        };
        match out.last_mut() {
            Some(last) if last.zero == r.zero => last.len += r.len,
            _ => out.push(r),
        }
    }
    out
}

/// True when every byte is zero (word at a time).
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets.
    let (head, words, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_follow_units_and_min_sparse() {
        let mut d = vec![1u8; 8192];
        d[1024..4096].fill(0);
        // Units of 1 KiB starting at guest 512: head 512 bytes of data.
        let runs = zero_runs(&d, 512, 1024, 1024);
        let got: Vec<(usize, usize, bool)> = runs.iter().map(|r| (r.at, r.len, r.zero)).collect();
        assert_eq!(
            got,
            vec![(0, 1536, false), (1536, 2048, true), (3584, 4608, false)]
        );
        // A min_sparse larger than the run keeps it data.
        let runs = zero_runs(&d, 512, 1024, 4096);
        assert_eq!(runs.len(), 1);
        assert!(!runs[0].zero);
    }

    #[test]
    fn is_zero_sees_any_byte() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        for i in [0, 1, 17, 2048, 4098] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
    }
}
