//! The worker's job loop with continuous batching: up to `slots` jobs run at
//! once, and every step of the model advances all of them together (a new
//! job's prompt joins the running decodes in the same step, in chunks), so
//! the weights are read once per step instead of once per job.
//!
//! [`serve`] owns the engine while it runs: it reads the hive's messages
//! from an [`Inbox`] itself, between steps (blocking only when idle), writes
//! each job's `Token`, `Finished` and `Failed` frames to the protocol pipe,
//! and returns after `Shutdown` (or the inbox closing) once the last job is
//! done. No other thread is involved, so a job's `Generate` frame reaches
//! the engine without a hand-off between threads, and a cancel takes effect
//! at the next step, as a cancel flag is only ever checked there. With candle
//! (one sequence at a time) or `slots = 1`, jobs run one after another.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use rbee_schemas::error::JobError;
use rbee_schemas::job::GenerateParams;
use rbee_schemas::record::Resume;
use rbee_schemas::worker::{write_frame, FromWorker};

use crate::backend::Cache;
use crate::generation::Generation;
use crate::Engine;

/// One `Generate` frame from the hive.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: u64,
    pub params: GenerateParams,
    pub resume: Option<Resume>,
}

/// One message from the hive, as the job loop sees it.
#[derive(Debug)]
pub enum Inbound {
    Job(Job),
    /// Stop this job at its next step, or as soon as it starts.
    Cancel(u64),
    /// No more jobs: finish the running ones, then return.
    Shutdown,
}

/// Where the job loop's messages come from: the hive's pipe in the worker
/// process, a channel in tests and benchmarks.
pub trait Inbox {
    /// The next message. With `wait`, blocks for one (`None`: the input
    /// closed); without, `None` when nothing has arrived yet.
    fn next(&mut self, wait: bool) -> Option<Inbound>;
}

impl Inbox for Receiver<Inbound> {
    fn next(&mut self, wait: bool) -> Option<Inbound> {
        if wait {
            self.recv().ok()
        } else {
            self.try_recv().ok()
        }
    }
}

/// What the job loop has read and not yet acted on.
#[derive(Debug)]
pub struct Queue {
    /// Jobs waiting for a slot, in arrival order.
    pub jobs: VecDeque<Job>,
    pub cancels: Cancels,
    /// Whether more jobs may come (no `Shutdown` yet, input not closed).
    pub open: bool,
}

impl Default for Queue {
    fn default() -> Self {
        Self { jobs: VecDeque::new(), cancels: Cancels::default(), open: true }
    }
}

impl Queue {
    /// Takes in every message that has arrived. When `idle` (no job running)
    /// and nothing is queued, first waits for a message.
    pub fn pump(&mut self, inbox: &mut impl Inbox, idle: bool) {
        loop {
            let wait = idle && self.jobs.is_empty() && self.open;
            match inbox.next(wait) {
                Some(Inbound::Job(j)) if self.open => self.jobs.push_back(j),
                // Sent after Shutdown: nobody will run it.
                Some(Inbound::Job(j)) => tracing::warn!(job = j.id, "a job after shutdown; dropped"),
                Some(Inbound::Cancel(job)) => self.cancels.cancel(job),
                Some(Inbound::Shutdown) => self.open = false,
                None if wait => self.open = false,
                None => return,
            }
        }
    }

    /// Whether the loop is done: nothing queued and no more to come.
    pub fn drained(&self) -> bool {
        self.jobs.is_empty() && !self.open
    }
}

/// The cancel flags of running jobs, and cancels that came before their job started.
#[derive(Debug, Default)]
pub struct Cancels {
    running: HashMap<u64, Arc<AtomicBool>>,
    early: HashSet<u64>,
}

impl Cancels {
    /// Cancels `job` now, or as soon as it starts.
    pub fn cancel(&mut self, job: u64) {
        match self.running.get(&job) {
            Some(flag) => flag.store(true, Ordering::Relaxed),
            None => {
                self.early.insert(job);
            }
        }
    }

    /// Registers `job` as running; its flag is already set if it was cancelled early.
    pub fn start(&mut self, job: u64) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(self.early.remove(&job)));
        self.running.insert(job, flag.clone());
        flag
    }

    pub fn end(&mut self, job: u64) {
        self.running.remove(&job);
    }
}

/// Turns one job's token callbacks into `Token` frames: text released
/// without a token (when resuming) rides along with the next token's frame.
#[derive(Debug)]
pub struct Frames {
    job: u64,
    carry: String,
    pub out: Vec<FromWorker>,
}

impl Frames {
    pub fn new(job: u64) -> Self {
        Self { job, carry: String::new(), out: Vec::new() }
    }

    pub fn token(&mut self, id: Option<u32>, text: &str) {
        let Some(id) = id else {
            self.carry.push_str(text);
            return;
        };
        let text = if self.carry.is_empty() { text.to_owned() } else { std::mem::take(&mut self.carry) + text };
        self.out.push(FromWorker::Token { job: self.job, id, text });
    }

    /// The job's last frame, after any text released at the very end (held
    /// back for a stop string that never came) as a token frame with id `u32::MAX`.
    pub fn end(&mut self, result: Result<rbee_schemas::worker::Outcome, JobError>) {
        if !self.carry.is_empty() {
            let text = std::mem::take(&mut self.carry);
            self.out.push(FromWorker::Token { job: self.job, id: u32::MAX, text });
        }
        self.out.push(match result {
            Ok(outcome) => FromWorker::Finished { job: self.job, outcome },
            Err(error) => FromWorker::Failed { job: self.job, error },
        });
    }

    /// Writes and forgets the frames gathered so far.
    pub fn flush(&mut self, w: &mut impl Write) -> io::Result<()> {
        for f in self.out.drain(..) {
            write_frame(w, &f)?;
        }
        Ok(())
    }
}

/// A job holding a slot.
struct Active<'t> {
    job: Generation<'t>,
    cache: Cache,
    cancel: Arc<AtomicBool>,
    frames: Frames,
}

/// Runs the jobs from `inbox`, up to `slots` at once (1 on engines that run
/// one sequence at a time), writing their frames to `out`. Returns after
/// `Shutdown` (or the inbox closing) once the last job is done, or with the
/// error of a failed write (the hive is gone).
pub fn serve(engine: &mut Engine, slots: usize, inbox: &mut impl Inbox, out: &mut impl Write) -> io::Result<()> {
    let (text, backend) = engine.parts();
    let slots = slots.clamp(1, backend.max_batch());
    let chunk = backend.prompt_chunk();
    let mut active: Vec<Active<'_>> = Vec::with_capacity(slots);
    let mut q = Queue::default();
    loop {
        // Read what the hive sent (waiting only when there is nothing to
        // run), then admit jobs into free slots.
        q.pump(inbox, active.is_empty());
        while active.len() < slots {
            let Some(j) = q.jobs.pop_front() else { break };
            let cancel = q.cancels.start(j.id);
            let mut frames = Frames::new(j.id);
            let _span = tracing::debug_span!("job", job = j.id).entered();
            match text.start(&j.params, j.resume.as_ref(), &mut |id, t| frames.token(id, t)) {
                Ok(job) => {
                    let cache = backend.new_cache(job.max_len());
                    tracing::debug!(running = active.len() + 1, "started");
                    active.push(Active { job, cache, cancel, frames });
                }
                Err(e) => {
                    q.cancels.end(j.id);
                    frames.end(Err(e));
                    frames.flush(out)?;
                }
            }
        }
        if active.is_empty() {
            if q.drained() {
                return Ok(());
            }
            continue;
        }

        // One step over every job that still runs.
        let mut caches: Vec<&mut Cache> = Vec::with_capacity(active.len());
        let mut inputs: Vec<&[u32]> = Vec::with_capacity(active.len());
        let others_decoding = active.iter().any(|a| a.job.pending().len() == 1);
        for a in active.iter_mut() {
            if a.job.check_cancel(&a.cancel) {
                continue;
            }
            let p = a.job.pending();
            // A long prompt goes in chunks while other jobs wait for their next token.
            let n = if others_decoding { p.len().min(chunk) } else { p.len() };
            caches.push(&mut a.cache);
            inputs.push(&p[..n]);
        }
        let fed: Vec<usize> = inputs.iter().map(|i| i.len()).collect();
        let result = if caches.is_empty() { Ok(Vec::new()) } else { backend.forward(&mut caches, &inputs) };
        drop((caches, inputs));
        match result {
            Ok(logits) => {
                let mut logits = logits.into_iter();
                let mut fed = fed.into_iter();
                for a in active.iter_mut().filter(|a| !a.job.is_done()) {
                    let (Some(l), Some(n)) = (logits.next(), fed.next()) else { break };
                    let frames = &mut a.frames;
                    if a.job.consume(n) {
                        if let Err(e) = a.job.advance(&l, &mut |id, t| frames.token(id, t)) {
                            // This job alone fails; the others go on.
                            frames.end(Err(e));
                            a.cancel.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
            Err(e) => {
                // The step failed for all of them.
                tracing::error!(error = %e.message, jobs = active.len(), "model step failed");
                for a in &mut active {
                    if !a.job.is_done() {
                        a.frames.end(Err(e.clone()));
                        a.cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
        }

        // Send what the step produced; retire finished jobs.
        let mut i = 0;
        while i < active.len() {
            let a = &mut active[i];
            let failed = matches!(a.frames.out.last(), Some(FromWorker::Failed { .. }));
            if !failed && !a.job.is_done() && !a.cancel.load(Ordering::Relaxed) {
                a.frames.flush(out)?;
                i += 1;
                continue;
            }
            let Active { job, mut frames, .. } = active.swap_remove(i);
            if !failed {
                let frames_ref = &mut frames;
                let outcome = job.finish(&mut |id, t| frames_ref.token(id, t));
                frames.end(Ok(outcome));
            }
            q.cancels.end(frames.job);
            frames.flush(out)?;
        }
    }
}
