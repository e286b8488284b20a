//! The threads that run the forward pass's parallel sections.
//!
//! A forward step is ~150 short sections per token (each matmul, each
//! attention), so the cost of starting and joining a section matters as much as
//! the work in it. [`Pool::run`] hands `n` tasks to the calling thread plus
//! `threads - 1` persistent workers and returns when every task is done.
//!
//! Claiming: the tasks are split into one run of consecutive indices per
//! thread ("span"), each with its own atomic cursor. A thread takes its own
//! span in order, then helps with the others' (so a thread that is preempted
//! on a busy machine simply takes fewer tasks). Matmul tasks are consecutive
//! row ranges, and the kernels prefetch past the end of a task, so a thread
//! that goes on to the next task of its own span finds its rows already
//! arriving; with one shared counter the two threads took alternate tasks and
//! each one began cold (on the 2-core dev VM: a 4-sequence step 12-25 % faster,
//! one-token decode 11-21 %; docs/benchmarks.md, twenty-second stop).
//!
//! Concurrency: the spin pool's workers wait on an epoch counter, spinning
//! briefly, then yielding, then sleeping on a condvar, so an idle model costs
//! no CPU. Workers *join* a job; the submitter waits only for those that did,
//! so on an oversubscribed machine a descheduled worker costs nothing (the
//! submitter runs its tasks) instead of a scheduler time slice per section. One `run` at a time (`&mut self` is not needed because the caller
//! is the only submitter: `Pool` is `Send` but not `Sync`). The rayon variant
//! exists only to measure against (see `examples/bench_engine.rs`).
//!
//! Why not rayon (kept selectable as [`PoolKind::Rayon`] to measure against):
//! on the dev box an empty 8-task section costs ~0.1-0.6 µs on the spin pool
//! and ~12-26 µs with `install` + `par_iter` (rayon's sleeping workers must be
//! woken, and the caller blocks instead of taking tasks), i.e. ~2-4 ms per
//! token over ~150 sections; two-thread decode of the demo model measured
//! ~171 tok/s (spin) vs ~143 (rayon) in the same run, prefill about equal.
//!
//! `unsafe` here: the job closure borrows the caller's stack, and workers see
//! it through a lifetime-erased pointer. `run` does not return (or unwind)
//! before every worker has finished with it, which is what makes that sound.
#![allow(unsafe_code)]

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Which implementation runs the parallel sections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PoolKind {
    /// Persistent workers on an atomic epoch (spin, then yield, then sleep).
    #[default]
    Spin,
    /// A dedicated rayon pool, `install` + `par_iter` per section.
    Rayon,
}

/// The thread count the fast path uses by default: `RAYON_NUM_THREADS` if set,
/// else the machine's available parallelism.
pub fn default_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs batches of independent tasks on a fixed set of threads.
#[derive(Debug)]
pub struct Pool {
    threads: usize,
    inner: Inner,
    /// Makes `Pool` `!Sync`: `run` assumes a single submitter.
    _not_sync: std::marker::PhantomData<Cell<()>>,
}

enum Inner {
    Serial,
    Spin(SpinPool),
    Rayon(rayon::ThreadPool),
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Inner::Serial => "Serial",
            Inner::Spin(_) => "Spin",
            Inner::Rayon(_) => "Rayon",
        })
    }
}

impl Pool {
    /// A pool of `threads` threads in all, the caller included.
    pub fn new(threads: usize, kind: PoolKind) -> Result<Self, String> {
        let threads = threads.max(1);
        let inner = if threads == 1 {
            Inner::Serial
        } else {
            match kind {
                PoolKind::Spin => Inner::Spin(SpinPool::new(threads - 1)?),
                PoolKind::Rayon => Inner::Rayon(
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(|i| format!("rbee-fast-{i}"))
                        .build()
                        .map_err(|e| format!("cannot start {threads} threads: {e}"))?,
                ),
            }
        };
        Ok(Self { threads, inner, _not_sync: std::marker::PhantomData })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(t)` once for every `t` in `0..n`, spread over the pool's
    /// threads; returns when all calls have returned. A panic in any task is
    /// re-raised here after all threads are done.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        match &self.inner {
            _ if n <= 1 => (0..n).for_each(f),
            Inner::Serial => (0..n).for_each(f),
            Inner::Spin(p) => p.run(n, f),
            Inner::Rayon(p) => {
                use rayon::prelude::*;
                p.install(|| (0..n).into_par_iter().with_min_len(1).for_each(f))
            }
        }
    }

    /// Splits `data` into consecutive chunks of `chunk` elements (the last may
    /// be shorter) and calls `f(i, chunk_i)` for each, in parallel.
    pub fn run_chunks<T: Send>(&self, data: &mut [T], chunk: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
        let chunk = chunk.max(1);
        let len = data.len();
        let base = SendPtr(data.as_mut_ptr());
        let base = &base;
        self.run(len.div_ceil(chunk), &|i| {
            let start = i * chunk;
            let end = (start + chunk).min(len);
            // SAFETY: task `i` is run exactly once, and chunk `i` covers
            // `start..end`, disjoint from every other chunk and inside `data`,
            // which stays mutably borrowed (by us) until `run` returns.
            let part = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
            f(i, part)
        });
    }
}

struct SendPtr<T>(*mut T);
// SAFETY: only used by `run_chunks`, which hands out disjoint chunks.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// The job being run: a lifetime-erased pointer to the caller's closure.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync + 'static),
}

/// One thread's run of task indices: `next..end` are left. A cache line of
/// its own, so threads claiming from their spans do not contend.
#[derive(Default)]
#[repr(align(128))]
struct Span {
    next: AtomicUsize,
    end: AtomicUsize,
}

/// `ctl` layout: job epoch in the high 32 bits, the CLOSED flag, and in the
/// low bits the number of workers that joined the job and have not finished.
const CLOSED: u64 = 1 << 31;
const COUNT: u64 = CLOSED - 1;
const EPOCH: u64 = 1 << 32;

struct Shared {
    /// See the constants above. A worker may only read `job` after joining
    /// (incrementing the count while the epoch is current and not closed);
    /// the submitter closes the job once every task is claimed and then waits
    /// only for the workers that joined. So a worker the OS has not scheduled
    /// never holds up a section: the submitter just runs its share.
    ctl: AtomicU64,
    /// Written by the submitter only while no worker can have joined (before
    /// the new epoch is published).
    job: UnsafeCell<Job>,
    /// One per thread, the submitter's first; set with `job`.
    spans: Box<[Span]>,
    panicked: AtomicBool,
    quit: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is only written while no worker can read it (see its doc); all
// other fields are atomics or sync primitives.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer in `job` is only dereferenced by workers
// that joined a job, which `run` waits for.
unsafe impl Send for Shared {}

struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Sections left to run on the caller alone after a straggler (see `run`).
    solo: Cell<u32>,
    /// How many the next straggler buys (see [`Backoff`]).
    backoff: Cell<Backoff>,
}

/// A wait for joined workers longer than this, and than 4× the caller's own
/// mean task time, means one of them was preempted mid-task: the machine is
/// oversubscribed.
const STRAGGLER: Duration = Duration::from_micros(200);
/// At most this many sections then run on the calling thread alone before
/// trying workers again (about half a decode step of the demo model).
const SOLO_SECTIONS: u32 = 64;
/// The fewest: what one straggler buys when they are rare.
const SOLO_MIN: u32 = 2;

/// How long to run alone after a straggler. One straggler is usually one
/// short preemption (the broker or the hive woke for a message): running
/// 64 sections alone for it cost a job's prompt ~15 % on the demo machine.
/// Stragglers in a row mean an oversubscribed machine: the solo run doubles
/// with each, up to [`SOLO_SECTIONS`], and halves with each clean section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backoff(u32);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(SOLO_MIN)
    }
}

impl Backoff {
    /// After a straggler: sections to run alone, and the next backoff.
    fn straggled(self) -> (u32, Backoff) {
        (self.0, Backoff((self.0 * 2).min(SOLO_SECTIONS)))
    }

    /// After a parallel section nobody held up.
    fn clean(self) -> Backoff {
        Backoff((self.0 / 2).max(SOLO_MIN))
    }
}

/// How long an idle worker spins, then yields, before it sleeps on the condvar.
const SPIN_FOR: Duration = Duration::from_micros(50);
const YIELD_FOR: Duration = Duration::from_micros(500);

fn noop(_: usize) {}

impl SpinPool {
    fn new(workers: usize) -> Result<Self, String> {
        let shared = Arc::new(Shared {
            ctl: AtomicU64::new(CLOSED),
            job: UnsafeCell::new(Job { f: &noop as &(dyn Fn(usize) + Sync) }),
            spans: (0..=workers).map(|_| Span::default()).collect(),
            panicked: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let s = Arc::clone(&shared);
            let h = std::thread::Builder::new()
                .name(format!("rbee-fast-{}", i + 1))
                .spawn(move || worker(&s))
                .map_err(|e| format!("cannot start worker thread: {e}"))?;
            handles.push(h);
        }
        Ok(Self { shared, workers: handles, solo: Cell::new(0), backoff: Cell::new(Backoff::default()) })
    }

    /// Runs the section; if joined workers kept the caller waiting much longer
    /// than a task takes (see [`STRAGGLER`]: one was descheduled holding a
    /// task), the next few sections run on the caller alone ([`Backoff`]). On a busy machine a
    /// preempted worker would otherwise cost a scheduler time slice per
    /// section, making two threads slower than one; on a quiet one this never
    /// triggers.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let solo = self.solo.get();
        if solo > 0 {
            self.solo.set(solo - 1);
            return (0..n).for_each(f);
        }
        let (waited, task) = self.run_parallel(n, f);
        let backoff = self.backoff.get();
        if waited > STRAGGLER.max(4 * task) {
            let (solo, next) = backoff.straggled();
            self.solo.set(solo);
            self.backoff.set(next);
        } else {
            self.backoff.set(backoff.clean());
        }
    }

    /// Runs the section on the caller and any workers that join; returns how
    /// long the caller waited for joined workers after its own share, and the
    /// mean time of the caller's own tasks.
    fn run_parallel(&self, n: usize, f: &(dyn Fn(usize) + Sync)) -> (Duration, Duration) {
        let s = &*self.shared;
        // SAFETY: erases the closure's lifetime. Workers only call it after
        // joining this job, and we wait for every joined worker to leave
        // before returning or unwinding (a panic in our own share of the tasks
        // is caught and re-raised after the wait).
        let f_static: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        let epoch = (s.ctl.load(Ordering::Relaxed) & !(CLOSED | COUNT)).wrapping_add(EPOCH);
        // SAFETY: the previous job is closed and its joined workers have left
        // (we waited), and nobody can join before the store below publishes
        // the new epoch.
        unsafe { *s.job.get() = Job { f: f_static } };
        s.split(n);
        s.ctl.store(epoch, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let started = Instant::now();
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| claim(s, f, 0)));
        let task = started.elapsed() / (*mine.as_ref().unwrap_or(&1)).max(1) as u32;
        // Every task is claimed: close the job and wait for the joined workers.
        let mut ctl = s.ctl.fetch_or(CLOSED, Ordering::AcqRel) | CLOSED;
        let mut spins = 0u32;
        let mut waited = Duration::ZERO;
        if ctl & COUNT != 0 {
            let since = Instant::now();
            while ctl & COUNT != 0 {
                spins += 1;
                if spins < 256 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                ctl = s.ctl.load(Ordering::Acquire);
            }
            waited = since.elapsed();
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a fast-path worker thread panicked (see its message above)");
        }
        (waited, task)
    }
}

impl Shared {
    /// Splits tasks `0..n` into one span per thread, in order. Only while no
    /// worker can claim (before a job's epoch is published).
    fn split(&self, n: usize) {
        let threads = self.spans.len();
        for (i, span) in self.spans.iter().enumerate() {
            span.next.store(n * i / threads, Ordering::Relaxed);
            span.end.store(n * (i + 1) / threads, Ordering::Relaxed);
        }
    }
}

/// Runs tasks until none are left, span `slot`'s first, then the others'
/// in turn; returns how many this thread ran.
fn claim(s: &Shared, f: &(dyn Fn(usize) + Sync), slot: usize) -> usize {
    let mut ran = 0;
    let k = s.spans.len();
    for span in (0..k).map(|i| &s.spans[(slot + i) % k]) {
        let end = span.end.load(Ordering::Relaxed);
        // Each claim past `end` raises `next` by one more: at most one per
        // thread and section, far from overflowing.
        while span.next.load(Ordering::Relaxed) < end {
            let t = span.next.fetch_add(1, Ordering::Relaxed);
            if t >= end {
                break;
            }
            f(t);
            ran += 1;
        }
    }
    ran
}

/// Joins the current job if it is still open; returns the span to start
/// with (1 + the workers already in), if we did. Two workers may get the same
/// one (one left before the other joined); spans are only where to start.
fn join(s: &Shared, mut ctl: u64) -> Option<usize> {
    loop {
        if ctl & CLOSED != 0 {
            return None;
        }
        match s.ctl.compare_exchange_weak(ctl, ctl + 1, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => return Some(1 + (ctl & COUNT) as usize % (s.spans.len() - 1)),
            Err(now) if now & !(CLOSED | COUNT) == ctl & !(CLOSED | COUNT) => ctl = now,
            Err(_) => return None, // a newer job; the outer loop will see it
        }
    }
}

fn worker(s: &Shared) {
    let mut seen = s.ctl.load(Ordering::Acquire) & !(CLOSED | COUNT);
    loop {
        let idle_since = Instant::now();
        let mut spins = 0u32;
        let ctl = loop {
            let ctl = s.ctl.load(Ordering::Acquire);
            if ctl & !(CLOSED | COUNT) != seen {
                break ctl;
            }
            if s.quit.load(Ordering::Relaxed) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let idle = idle_since.elapsed();
            if idle < SPIN_FOR {
                std::hint::spin_loop();
            } else if idle < YIELD_FOR {
                std::thread::yield_now();
            } else {
                let g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                let now = s.ctl.load(Ordering::SeqCst);
                if now & !(CLOSED | COUNT) == seen && !s.quit.load(Ordering::SeqCst) {
                    drop(s.wake.wait(g).unwrap_or_else(|e| e.into_inner()));
                } else {
                    drop(g);
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        };
        seen = ctl & !(CLOSED | COUNT);
        if s.quit.load(Ordering::Acquire) {
            return;
        }
        let Some(slot) = join(s, ctl) else { continue };
        // SAFETY: we joined the job, so `job` was written before its epoch was
        // published (SeqCst store / Acquire CAS) and the submitter keeps the
        // closure alive until we leave below.
        let job = unsafe { *s.job.get() };
        let f = unsafe { &*job.f };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| claim(s, f, slot))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.ctl.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_straggler_costs_little_and_a_run_of_them_backs_off() {
        let b = Backoff::default();
        let (solo, b) = b.straggled();
        assert_eq!(solo, SOLO_MIN);
        // A clean section forgets it.
        assert_eq!(b.clean(), Backoff::default());
        // Stragglers in a row double the solo run, up to the cap.
        let mut b = Backoff::default();
        let mut runs = Vec::new();
        for _ in 0..8 {
            let (solo, next) = b.straggled();
            runs.push(solo);
            b = next;
        }
        assert_eq!(runs, [2, 4, 8, 16, 32, 64, 64, 64]);
        assert_eq!(b.clean().clean(), Backoff(16));
    }

    #[test]
    fn every_task_runs_once_on_both_kinds() {
        for kind in [PoolKind::Spin, PoolKind::Rayon] {
            for threads in [1, 2, 3] {
                let pool = Pool::new(threads, kind).expect("pool");
                for n in [0, 1, 2, 7, 100] {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    for _ in 0..50 {
                        pool.run(n, &|t| {
                            hits[t].fetch_add(1, Ordering::Relaxed);
                        });
                    }
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50), "{kind:?} {threads} {n}");
                }
                let mut data = vec![0usize; 103];
                pool.run_chunks(&mut data, 10, &|i, part| part.iter_mut().for_each(|v| *v += i + 1));
                assert!(data.iter().enumerate().all(|(j, &v)| v == j / 10 + 1));
            }
        }
    }

    #[test]
    fn a_thread_takes_its_own_span_in_order_then_the_others_each_task_once() {
        let pool = SpinPool::new(2).expect("pool");
        let s = &*pool.shared;
        // 3 spans over 10 tasks: 0..3, 3..6, 6..10.
        s.split(10);
        let order = Mutex::new(Vec::new());
        let ran = claim(s, &|t| order.lock().unwrap().push(t), 1);
        assert_eq!(ran, 10);
        assert_eq!(*order.lock().unwrap(), [3, 4, 5, 6, 7, 8, 9, 0, 1, 2]);
        // Nothing is left for a thread that comes later.
        assert_eq!(claim(s, &|t| panic!("task {t} ran twice"), 0), 0);
    }

    #[test]
    fn a_panicking_task_is_reraised_and_the_pool_survives() {
        let pool = Pool::new(2, PoolKind::Spin).expect("pool");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(64, &|t| assert!(t != 40, "task 40 fails"));
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(64, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 64);
    }
}
