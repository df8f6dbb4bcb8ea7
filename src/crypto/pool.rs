//! A small persistent thread pool for splitting one large encryption across the
//! CPUs. Scoped threads cost 40–190 µs to spawn and join on this 2-CPU machine (a
//! third or more of the time AES-XTS takes for 1 MiB), waking a parked worker a
//! fraction of that.
//!
//! The buffer is cut into parts that the calling thread and the workers claim one
//! at a time from a shared counter, so a worker that is slow to wake (its CPU busy
//! elsewhere) only means the caller does more of the parts itself: [`run`] waits
//! for the parts a worker has claimed, never for a worker to start. Workers (CPUs −
//! 1 of them, started on first use in each process, named `cowdisk-crypto-N`)
//! park on a channel between jobs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Pool {
    queue: Mutex<mpsc::Sender<Job>>,
    workers: usize,
    /// The process that started the workers: a child made by `fork()` (nbdkit
    /// forks into the background after the plugin opened its image) has none of
    /// them and starts its own.
    pid: u32,
}

impl Pool {
    fn start(pid: u32) -> Pool {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let want = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
        let mut workers = 0;
        for i in 0..want {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("cowdisk-crypto-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
            if spawned.is_ok() {
                workers += 1;
            }
        }
        Pool {
            queue: Mutex::new(tx),
            workers,
            pid,
        }
    }
}

/// This process's pool, started on first use.
fn pool() -> Arc<Pool> {
    static POOL: Mutex<Option<Arc<Pool>>> = Mutex::new(None);
    let pid = std::process::id();
    let mut current = POOL.lock().unwrap_or_else(|e| e.into_inner());
    match &*current {
        Some(p) if p.pid == pid => Arc::clone(p),
        _ => {
            let p = Arc::new(Pool::start(pid));
            // The parent's pool is left untouched (its channel's state belongs to
            // threads that do not exist here), not dropped.
            if let Some(old) = current.replace(Arc::clone(&p)) {
                std::mem::forget(old);
            }
            p
        }
    }
}

/// Worker threads available (0 if none could be started).
pub(super) fn workers() -> usize {
    pool().workers
}

/// What the caller and the workers share. It lives on the heap (a late worker may
/// look at it after `run` returned); the pointers in it lead into `run`'s caller and
/// are only followed for a part claimed before `run` returned.
struct Shared {
    next: AtomicUsize,
    parts: Vec<(*mut u8, usize)>,
    /// `&F`, type-erased.
    f: *const (),
    call: unsafe fn(*const (), usize, &mut [u8]),
    done: Mutex<usize>,
    cv: Condvar,
}

// SAFETY: the raw pointers are followed only under the protocol described in `run`
// (each part by the one thread that claimed it, `f` being `Sync`).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Claims and processes parts until none is left (a worker catches a panic of
    /// `f`, so that the part still counts as done; the caller lets it unwind).
    fn work(&self, worker: bool) {
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= self.parts.len() {
                return;
            }
            let (ptr, len) = self.parts[i];
            // SAFETY: part `i` was claimed by this thread alone; `run` has not
            // returned (it waits for every claimed part), so the buffer and `f` are
            // alive, and the parts are disjoint.
            let part = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            let f = self.f;
            let call = self.call;
            if worker {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
                    call(f, i, part)
                }));
                self.finish(1);
            } else {
                // Counted as done before `f` runs: if it panics, `Finish` still
                // waits for the workers' parts, and this one is ours alone.
                self.finish(1);
                unsafe { call(f, i, part) };
            }
        }
    }

    fn finish(&self, n: usize) {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        *d += n;
        if *d >= self.parts.len() {
            self.cv.notify_all();
        }
    }
}

/// Waits, even while unwinding, until every part is done or can no longer be
/// claimed.
struct Finish<'a>(&'a Shared);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        let s = self.0;
        // Parts nobody claimed yet are claimed (and skipped) here, so that no
        // worker can start one after we return.
        let mut skipped = 0;
        while s.next.fetch_add(1, Ordering::AcqRel) < s.parts.len() {
            skipped += 1;
        }
        if skipped > 0 {
            s.finish(skipped);
        }
        let mut d = s.done.lock().unwrap_or_else(|e| e.into_inner());
        while *d < s.parts.len() {
            d = s.cv.wait(d).unwrap_or_else(|e| e.into_inner());
        }
    }
}

unsafe fn call_erased<F: Fn(usize, &mut [u8]) + Sync>(f: *const (), i: usize, part: &mut [u8]) {
    // SAFETY: `f` is the `&F` that `run` erased, alive while `run` runs.
    let f = unsafe { &*(f as *const F) };
    f(i, part)
}

/// Runs `f(i, part_i)` for every part (disjoint pieces of one buffer) on the
/// calling thread and up to `helpers` pool workers; returns when all are done.
pub(super) fn run<F>(parts: Vec<&mut [u8]>, helpers: usize, f: &F)
where
    F: Fn(usize, &mut [u8]) + Sync,
{
    let n = parts.len();
    let shared = Arc::new(Shared {
        next: AtomicUsize::new(0),
        parts: parts
            .into_iter()
            .map(|p| (p.as_mut_ptr(), p.len()))
            .collect(),
        f: f as *const F as *const (),
        call: call_erased::<F>,
        done: Mutex::new(0),
        cv: Condvar::new(),
    });
    let finish = Finish(&shared);
    let pool = pool();
    let helpers = helpers.min(pool.workers).min(n.saturating_sub(1));
    if helpers > 0 {
        let queue = pool.queue.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..helpers {
            let s = Arc::clone(&shared);
            // A failed send means no worker is left: the caller does the parts.
            let _ = queue.send(Box::new(move || s.work(true)));
        }
    }
    shared.work(false);
    drop(finish);
}
