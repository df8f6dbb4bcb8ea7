//! VM state for internal snapshots, saved through an asynchronous write pool.
//!
//! The state lives in the active image past the virtual disk, at QEMU's offset (the
//! virtual size rounded up to one L1 entry's span), and is written through the normal
//! cluster path (the L1 table grows as needed).
//!
//! A hypervisor hands the state over piece by piece, mostly in tiny pieces. Sequential
//! saves are copied into a buffer of `max(1 MiB, cluster size)` (buffers end on chunk
//! boundaries of the state, so they start cluster-aligned after the first); each full
//! buffer goes to a pool of up to [`MAX_WORKERS`] threads that write it while the
//! caller goes on. At most `MAX_WORKERS` buffers are in flight: a save that would need
//! another blocks until a worker is done, so memory stays at `MAX_WORKERS + 1` buffers.
//! A save that is not sequential hands the buffer over and goes straight through.
//! Writes never overlap one still in flight, so the last save of a byte wins.
//!
//! A worker writing fresh clusters (the usual case) allocates them and their L2 tables
//! under the image lock, writes the data without it (one request per buffer), and maps
//! the clusters under the lock again. Any other case goes through the ordinary write
//! path.
//!
//! The first error is kept: every later save, `finalize` and a snapshot recording VM
//! state fail with it, for the life of the handle (reopen the image to try again).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::meta::Meta;
use super::Image;
use crate::error::{Error, Result};
use crate::format::entry::{Mapping, COPIED};
use crate::format::header::MAX_L1_BYTES;

/// Most worker threads writing VM state at once.
pub const MAX_WORKERS: usize = 8;
/// Smallest VM state buffer (and read-ahead) size.
pub const MIN_CHUNK: usize = 1 << 20;

fn lock_meta(meta: &Mutex<Meta>) -> Result<MutexGuard<'_, Meta>> {
    meta.lock()
        .map_err(|_| Error::Broken("an earlier call panicked while updating the image".into()))
}

/// Marks the handle broken when `result` failed in a way that may have left the
/// metadata half-updated (the rule of `Image::modify`).
fn judge<T>(meta: &mut Meta, result: Result<T>) -> Result<T> {
    result.map_err(|e| meta.judge("saving VM state", e))
}

/// What a write of VM state needs after the first, locked step.
enum Plan {
    /// Written through the ordinary path already.
    Done,
    /// Fresh host clusters are reserved for the guest clusters from `guest` on, as
    /// runs of (host offset, clusters).
    Fresh { runs: Vec<(u64, u64)>, guest: u64 },
}

impl Meta {
    /// The most VM state bytes this image can address.
    pub(crate) fn vmstate_limit(&self) -> u64 {
        let max_entries = MAX_L1_BYTES / 8;
        (max_entries * self.l1_span()).saturating_sub(self.vmstate_offset())
    }

    /// Grows the L1 table (by at least half) so it covers guest bytes below `end`.
    fn cover_with_l1(&mut self, end: u64) -> Result<()> {
        let needed = end.div_ceil(self.l1_span());
        let len = self.l1.len() as u64;
        if needed > len {
            let grown = (len + len / 2).min(MAX_L1_BYTES / 8);
            self.grow_l1(needed.max(grown))?;
        }
        Ok(())
    }

    /// First, locked step of writing `data` at VM state position `pos`: writes it
    /// through the ordinary path, or reserves fresh clusters (and their L2 tables) for
    /// a write without the lock when every target cluster is unallocated and whatever
    /// the write does not cover reads as zero.
    fn vmstate_prepare(&mut self, data: &[u8], pos: u64) -> Result<Plan> {
        let guest = self.vmstate_offset() + pos;
        let end = guest + data.len() as u64;
        self.cover_with_l1(end)?;
        let cs = self.cluster_size;
        let mut fresh = guest.is_multiple_of(cs);
        let mut at = guest;
        while fresh && at < end {
            fresh = match self.mapping(at)? {
                Mapping::Zero { host: None, .. } => true,
                Mapping::Unallocated => {
                    let cluster_end = at + cs;
                    cluster_end <= end || self.backing_reads_zero(end, cluster_end - end)?
                }
                _ => false,
            };
            at += cs;
        }
        if !fresh {
            self.write(data, guest)?;
            return Ok(Plan::Done);
        }
        let clusters = (end - guest).div_ceil(cs);
        let (first_l1, _) = self.indexes(guest);
        let (last_l1, _) = self.indexes(end - 1);
        for l1_index in first_l1..=last_l1 {
            self.writable_l2_table(l1_index)?;
        }
        let host = self.alloc_clusters(clusters)?;
        if let Err(e) = self.check_overlap(host, clusters * cs, crate::image::overlap::NONE) {
            self.release_unreferenced(host, clusters);
            return Err(e);
        }
        let runs = vec![(host, clusters)];
        Ok(Plan::Fresh { runs, guest })
    }

    /// Last, locked step: maps the written fresh clusters.
    fn vmstate_map(&mut self, runs: &[(u64, u64)], guest: u64) -> Result<()> {
        let cs = self.cluster_size;
        let hosts = runs
            .iter()
            .flat_map(|&(host, n)| (0..n).map(move |i| host + i * cs));
        for (i, host) in hosts.enumerate() {
            let g = guest + i as u64 * cs;
            let (l1_index, _) = self.indexes(g);
            let table = self.writable_l2_table(l1_index)?;
            let old = self.mapping(g)?;
            self.set_l2_entry(table, g, host | COPIED)?;
            self.free_mapping_later(old);
        }
        Ok(())
    }
}

/// Writes `data` at VM state position `pos` through the image's cluster path.
fn write_state(meta: &Mutex<Meta>, data: &[u8], pos: u64) -> Result<()> {
    let (plan, storage, cs) = {
        let mut m = lock_meta(meta)?;
        m.check_writable()?;
        let plan = m.vmstate_prepare(data, pos);
        let plan = judge(&mut m, plan)?;
        (plan, m.storage.clone(), m.cluster_size)
    };
    let Plan::Fresh { runs, guest } = plan else {
        return Ok(());
    };
    let mut written = Ok(());
    let mut rest = data;
    for &(host, n) in &runs {
        let len = ((n * cs) as usize).min(rest.len());
        let pad = (n * cs) as usize - len;
        let result = if pad == 0 {
            storage.write_at(&rest[..len], host)
        } else {
            storage.write_vectored_at(&[&rest[..len], &vec![0u8; pad]], host)
        };
        rest = &rest[len..];
        if let Err(e) = result {
            written = Err(Error::io(
                format!("writing VM state to clusters at {host:#x}"),
                e,
            ));
            break;
        }
    }
    let mut m = lock_meta(meta)?;
    // Even a failed write may have reached part of the clusters: they no longer
    // read as the zeros past the end of the file.
    let end = runs
        .iter()
        .map(|&(host, n)| host + n * cs)
        .max()
        .unwrap_or(0);
    m.file_len = m.file_len.max(end);
    match written {
        Ok(()) => {
            let mapped = m.vmstate_map(&runs, guest);
            judge(&mut m, mapped)
        }
        Err(e) => {
            // Nothing points to the clusters yet: give them back.
            for &(host, n) in &runs {
                m.release_unreferenced(host, n);
            }
            Err(e)
        }
    }
}

/// The pool's shared state.
struct PoolState {
    /// Buffers waiting for a worker: (position, bytes).
    queue: VecDeque<(u64, Vec<u8>)>,
    /// Ranges queued or being written: (position, length).
    in_flight: Vec<(u64, u64)>,
    /// Workers waiting for a job.
    idle: usize,
    workers: Vec<JoinHandle<()>>,
    /// The first failure.
    error: Option<Error>,
    shutdown: bool,
    /// Written buffers kept for reuse.
    spare: Vec<Vec<u8>>,
}

struct Pool {
    meta: Arc<Mutex<Meta>>,
    /// Ranges conflict when they touch the same cluster, not only the same bytes: a
    /// fresh-cluster write pads its last cluster with zeros.
    cluster_size: u64,
    state: Mutex<PoolState>,
    changed: Condvar,
}

/// True when the byte ranges `a` and `b` share a cluster of `cs` bytes.
fn overlaps(a: (u64, u64), b: (u64, u64), cs: u64) -> bool {
    let span = |r: (u64, u64)| (r.0 / cs * cs, (r.0 + r.1).div_ceil(cs) * cs);
    let (a0, a1) = span(a);
    let (b0, b1) = span(b);
    a0 < b1 && b0 < a1
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self) -> Option<Error> {
        self.lock().error.as_ref().map(Error::duplicate)
    }

    fn set_error(&self, e: Error) -> Error {
        let mut st = self.lock();
        let copy = e.duplicate();
        st.error.get_or_insert(e);
        self.changed.notify_all();
        copy
    }

    /// A buffer for the caller to fill.
    fn take_buffer(&self, chunk: usize) -> Vec<u8> {
        self.lock()
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(chunk))
    }

    /// Waits until nothing in flight overlaps `[pos, pos+len)` (and, for a new job,
    /// until fewer than `MAX_WORKERS` buffers are in flight).
    fn wait_for_room<'a>(
        &'a self,
        mut st: MutexGuard<'a, PoolState>,
        range: (u64, u64),
        job: bool,
    ) -> Result<MutexGuard<'a, PoolState>> {
        loop {
            if let Some(e) = &st.error {
                return Err(e.duplicate());
            }
            let cs = self.cluster_size;
            let busy = st.in_flight.iter().any(|&r| overlaps(r, range, cs))
                || (job && st.in_flight.len() >= MAX_WORKERS);
            if !busy {
                return Ok(st);
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Hands a full buffer to the workers, blocking while all are busy.
    fn submit(self: &Arc<Self>, pos: u64, buf: Vec<u8>) -> Result<()> {
        let st = self.lock();
        let mut st = self.wait_for_room(st, (pos, buf.len() as u64), true)?;
        st.in_flight.push((pos, buf.len() as u64));
        st.queue.push_back((pos, buf));
        if st.idle < st.queue.len() && st.workers.len() < MAX_WORKERS {
            let pool = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("cowdisk-vmstate".into())
                .spawn(move || pool.work());
            match spawned {
                Ok(handle) => st.workers.push(handle),
                Err(e) if st.workers.is_empty() => {
                    st.queue.pop_back();
                    st.in_flight.pop();
                    return Err(Error::io("starting a VM state writer thread", e));
                }
                Err(_) => {} // the running workers will take the job
            }
        }
        self.changed.notify_all();
        Ok(())
    }

    /// Writes `data` right away, after anything in flight that overlaps it.
    fn write_now(&self, pos: u64, data: &[u8]) -> Result<()> {
        drop(self.wait_for_room(self.lock(), (pos, data.len() as u64), false)?);
        write_state(&self.meta, data, pos).map_err(|e| self.set_error(e))
    }

    /// Waits until every buffer is written; returns the first error, if any.
    fn wait_idle(&self) -> Result<()> {
        let mut st = self.lock();
        while !st.in_flight.is_empty() {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.spare.clear();
        match &st.error {
            Some(e) => Err(e.duplicate()),
            None => Ok(()),
        }
    }

    fn work(&self) {
        loop {
            let (pos, mut buf) = {
                let mut st = self.lock();
                loop {
                    if let Some(job) = st.queue.pop_front() {
                        break job;
                    }
                    if st.shutdown {
                        return;
                    }
                    st.idle += 1;
                    st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                    st.idle -= 1;
                }
            };
            // After a failure nothing more is written. A panic (a bug) must not leave
            // the job in flight forever: it becomes the pool's error.
            let result = match self.error() {
                Some(_) => Ok(()),
                None => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    write_state(&self.meta, &buf, pos)
                }))
                .unwrap_or_else(|_| {
                    Err(Error::Broken(
                        "a VM state writer thread panicked (please report)".into(),
                    ))
                }),
            };
            let mut st = self.lock();
            if let Some(i) = st
                .in_flight
                .iter()
                .position(|&r| r == (pos, buf.len() as u64))
            {
                st.in_flight.swap_remove(i);
            }
            if let Err(e) = result {
                st.error.get_or_insert(e);
            }
            if st.spare.len() < MAX_WORKERS {
                buf.clear();
                st.spare.push(buf);
            }
            self.changed.notify_all();
        }
    }

    /// Stops and joins the workers (after they drain the queue).
    fn stop(&self) {
        let workers = {
            let mut st = self.lock();
            st.shutdown = true;
            self.changed.notify_all();
            std::mem::take(&mut st.workers)
        };
        for w in workers {
            let _ = w.join();
        }
        let mut st = self.lock();
        st.shutdown = false;
        st.spare.clear();
    }
}

/// The caller's side: the buffer being filled and the read-ahead.
struct Writer {
    buf: Vec<u8>,
    /// VM state position of `buf[0]`.
    buf_pos: u64,
    /// Where the next save must start to count as sequential (None: anywhere).
    next_pos: Option<u64>,
    /// Bytes the image can address past the VM state offset (refreshed per buffer).
    limit: u64,
    /// (guest offset of the VM state area, position, bytes) last read ahead.
    readahead: Option<(u64, u64, Vec<u8>)>,
}

/// The end of `len` bytes of VM state at `pos`, if the image can hold them.
fn room_for(w: &Writer, len: usize, pos: u64) -> Result<u64> {
    pos.checked_add(len as u64)
        .filter(|&e| e <= w.limit)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "VM state of {len} bytes at position {pos} exceeds the {} bytes this image can hold",
                w.limit
            ))
        })
}

/// The VM state machinery of one image.
pub(crate) struct VmState {
    chunk: usize,
    writer: Mutex<Writer>,
    pool: Arc<Pool>,
}

/// The VM state quiesced for a snapshot operation: no save runs until it is dropped.
pub(crate) struct Quiesced<'a> {
    writer: MutexGuard<'a, Writer>,
}

impl Quiesced<'_> {
    /// Forgets the read-ahead and the sequential position (the state area changed).
    pub(crate) fn invalidate(&mut self) {
        self.writer.readahead = None;
        self.writer.next_pos = None;
    }
}

impl VmState {
    pub(crate) fn new(meta: Arc<Mutex<Meta>>, cluster_size: u64) -> VmState {
        VmState {
            chunk: MIN_CHUNK.max(cluster_size as usize),
            writer: Mutex::new(Writer {
                buf: Vec::new(),
                buf_pos: 0,
                next_pos: None,
                limit: 0,
                readahead: None,
            }),
            pool: Arc::new(Pool {
                meta,
                cluster_size,
                state: Mutex::new(PoolState {
                    queue: VecDeque::new(),
                    in_flight: Vec::new(),
                    idle: 0,
                    workers: Vec::new(),
                    error: None,
                    shutdown: false,
                    spare: Vec::new(),
                }),
                changed: Condvar::new(),
            }),
        }
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks the image takes writes and refreshes the addressable limit.
    fn refresh_limit(&self, w: &mut Writer) -> Result<()> {
        let m = lock_meta(&self.pool.meta)?;
        m.check_writable()?;
        w.limit = m.vmstate_limit();
        Ok(())
    }

    fn save(&self, data: &[u8], pos: u64) -> Result<()> {
        let mut w = self.writer();
        if let Some(e) = self.pool.error() {
            return Err(e);
        }
        if data.is_empty() {
            return Ok(());
        }
        w.readahead = None;
        let sequential = w.next_pos.is_none_or(|p| p == pos);
        if !sequential {
            self.hand_over(&mut w)?;
        }
        if w.buf.is_empty() {
            self.refresh_limit(&mut w)?;
        }
        let end = room_for(&w, data.len(), pos)?;
        if !sequential {
            w.next_pos = Some(end);
            return self.pool.write_now(pos, data);
        }
        let chunk = self.chunk as u64;
        let mut rest = data;
        let mut at = pos;
        while !rest.is_empty() {
            if w.buf.is_empty() {
                if w.buf.capacity() == 0 {
                    w.buf = self.pool.take_buffer(self.chunk);
                }
                w.buf_pos = at;
            }
            let cap = (chunk - w.buf_pos % chunk) as usize;
            let n = (cap - w.buf.len()).min(rest.len());
            w.buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            at += n as u64;
            w.next_pos = Some(at);
            if w.buf.len() == cap {
                let full = std::mem::take(&mut w.buf);
                let full_pos = w.buf_pos;
                self.pool.submit(full_pos, full)?;
            }
        }
        Ok(())
    }

    /// Writes straight through, like a save that is not sequential.
    fn save_unbuffered(&self, data: &[u8], pos: u64) -> Result<()> {
        let mut w = self.writer();
        if let Some(e) = self.pool.error() {
            return Err(e);
        }
        w.readahead = None;
        self.hand_over(&mut w)?;
        self.refresh_limit(&mut w)?;
        let end = room_for(&w, data.len(), pos)?;
        w.next_pos = Some(end);
        self.pool.write_now(pos, data)
    }

    /// Hands the buffered bytes to the pool.
    fn hand_over(&self, w: &mut Writer) -> Result<()> {
        if w.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut w.buf);
        self.pool.submit(w.buf_pos, buf)
    }

    /// Writes what is buffered and waits for every worker.
    fn finish(&self, w: &mut Writer) -> Result<()> {
        let handed = self.hand_over(w);
        w.next_pos = None;
        let waited = self.pool.wait_idle();
        handed.and(waited)
    }

    fn finalize(&self) -> Result<()> {
        let mut w = self.writer();
        self.finish(&mut w)
    }

    /// Finalizes and holds off further saves; fails with the pool's error only when
    /// `need_state` (the caller is about to record the state).
    pub(crate) fn quiesce(&self, need_state: bool) -> Result<Quiesced<'_>> {
        let mut w = self.writer();
        let result = self.finish(&mut w);
        if need_state {
            result?;
        }
        Ok(Quiesced { writer: w })
    }

    fn load(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let mut w = self.writer();
        let pending = !w.buf.is_empty() || !self.pool.lock().in_flight.is_empty();
        if pending {
            // What is still buffered or being written must be read back.
            self.finish(&mut w)?;
        }
        let (base, limit) = {
            let m = lock_meta(&self.pool.meta)?;
            (m.vmstate_offset(), m.vmstate_limit())
        };
        if pos.checked_add(buf.len() as u64).is_none_or(|e| e > limit) {
            return Err(Error::InvalidArgument(format!(
                "VM state of {} bytes at position {pos} exceeds the {limit} bytes this image can hold",
                buf.len()
            )));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = pos + done as u64;
            if let Some((ra_base, ra_pos, data)) = &w.readahead {
                if *ra_base == base && at >= *ra_pos && at < ra_pos + data.len() as u64 {
                    let from = (at - ra_pos) as usize;
                    let n = (data.len() - from).min(buf.len() - done);
                    buf[done..done + n].copy_from_slice(&data[from..from + n]);
                    done += n;
                    continue;
                }
            }
            let rest = buf.len() - done;
            if rest >= self.chunk {
                let mut m = lock_meta(&self.pool.meta)?;
                return m.read(&mut buf[done..], base + at);
            }
            let n = (self.chunk as u64).min(limit - at) as usize;
            let mut data = match w.readahead.take() {
                Some((_, _, mut v)) => {
                    v.resize(n, 0);
                    v
                }
                None => vec![0u8; n],
            };
            lock_meta(&self.pool.meta)?.read(&mut data, base + at)?;
            w.readahead = Some((base, at, data));
        }
        Ok(())
    }

    /// Finalizes outstanding state and stops the workers (on close). Returns an error
    /// only for state that was still unwritten.
    pub(crate) fn shutdown(&self) -> Result<()> {
        let mut w = self.writer();
        let pending = !w.buf.is_empty() || !self.pool.lock().in_flight.is_empty();
        let result = self.finish(&mut w);
        self.pool.stop();
        w.readahead = None;
        if pending {
            result
        } else {
            Ok(())
        }
    }
}

impl Image {
    /// Saves `buf` as VM state at position `pos` (bytes from the start of the state).
    ///
    /// Sequential saves are buffered and written by background workers; a save at
    /// another position first hands over what is buffered, then is written before the
    /// call returns. Call [`Image::finalize_vmstate`] to make sure everything is
    /// written and learn about failures, then [`Image::snapshot_create`] with
    /// `vm_state_size` to record the state. After a failure every later save fails
    /// with the same error.
    pub fn save_vmstate(&self, buf: &[u8], pos: u64) -> Result<()> {
        self.refuse_vmstate_if_encrypted()?;
        self.vmstate.save(buf, pos)
    }

    /// Saves VM state the way QEMU does: straight through the cluster path before
    /// returning, without the buffer and the pool (for comparisons and benchmarks;
    /// [`Image::save_vmstate`] is the fast way).
    pub fn save_vmstate_unbuffered(&self, buf: &[u8], pos: u64) -> Result<()> {
        self.refuse_vmstate_if_encrypted()?;
        self.vmstate.save_unbuffered(buf, pos)
    }

    /// Writes the buffered VM state, waits for the workers and returns the first
    /// error any save met.
    pub fn finalize_vmstate(&self) -> Result<()> {
        self.refuse_vmstate_if_encrypted()?;
        self.vmstate.finalize()
    }

    /// Reads `buf.len()` bytes of VM state at position `pos` of the active image (after
    /// [`Image::snapshot_goto`]: the snapshot's state). Unsaved bytes read as zeros.
    /// Small reads are served from a read-ahead of one buffer size.
    pub fn load_vmstate(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        self.refuse_vmstate_if_encrypted()?;
        self.vmstate.load(buf, pos)
    }
}

impl Image {
    /// VM state of encrypted images is not supported (QEMU encrypts it like data;
    /// cowdisk's VM-state pool writes clusters directly).
    fn refuse_vmstate_if_encrypted(&self) -> Result<()> {
        if self.encrypted {
            return Err(Error::Unsupported(
                "VM state in encrypted images is not supported".into(),
            ));
        }
        Ok(())
    }
}
