//! The hive's workers: at most one per model, started on the first job that
//! needs it (cold start) or by `rbee workers spawn`, reused by the next jobs
//! (warm start), stopped when idle past its keep-alive.
//!
//! The registry is a map behind a short, never-awaited lock. Starting a worker
//! runs in its own task, so a job task that is cancelled while waiting cannot
//! leave a half-started entry behind; every job that needs the same model
//! waits on the same start. A watcher task removes a worker from the map when
//! its process exits, so the next job starts a fresh one. A reaper task stops
//! idle workers whose keep-alive ran out: it takes all the worker's slots
//! first, so no job can start on a worker that is being stopped.
//!
//! Memory (what each worker is counted for, room, eviction) is in `memory.rs`.
//!
//! Every worker is mirrored in the `rbee-workers` bucket ([`WorkerInfo`]):
//! lifecycle states at once, busy/ready changes at most every 250 ms. A
//! worker whose last job just ended is written at once unless it was written
//! in the last 250 ms, so `rbee workers` right after a job says `ready`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use rbee_schemas::codec::Encoding;
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::hive::{WorkerInfo, WorkerState, WorkerSummary};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit};

use crate::catalog::ModelEntry;
use crate::job::now_ms;
use crate::lock;
use crate::worker_proc::{SpawnSpec, WorkerProc};

mod memory;
use memory::{wanted, Reserved};
pub use memory::{turn_is_over, Committed, Free, Reservation, Shortfall};

/// A device as the registry and heartbeats name it: `cpu`, `cuda:0`.
pub fn device_label(backend: &str, device: usize) -> String {
    if backend == "cpu" {
        "cpu".to_owned()
    } else {
        format!("{backend}:{device}")
    }
}

/// How often busy/ready changes reach the registry, at most (per worker, about).
const STATE_EVERY: Duration = Duration::from_millis(250);

type StartResult = Option<Result<Arc<Worker>, JobError>>;

#[derive(Debug, Clone)]
enum Slot {
    /// Its estimated memory counts from here on, before the process takes any.
    Starting { rx: watch::Receiver<StartResult>, memory: u64 },
    Ready(Arc<Worker>),
}

/// Settings shared by every worker this hive starts.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub hive_id: String,
    pub worker_bin: PathBuf,
    pub backend: String,
    /// The workers' `--engine` (auto, fast or candle).
    pub engine: String,
    pub device: usize,
    pub threads: Option<usize>,
    pub load_timeout: Duration,
    /// Time per token of the no-op test model.
    pub noop_token_delay: Duration,
    /// Default idle time before a worker exits, ms; negative = never.
    pub keep_alive_ms: i64,
    /// Jobs one worker runs at once.
    pub worker_slots: u32,
    /// The shortest turn a worker gets before it is drained for another
    /// model's waiting job (see [`turn_is_over`]).
    pub min_turn: Duration,
}

/// How to start one worker (defaults from [`PoolConfig`]).
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    pub backend: Option<String>,
    pub device: Option<usize>,
    pub keep_alive_ms: Option<i64>,
}

/// A worker process and what the hive tracks about it.
#[derive(Debug)]
pub struct Worker {
    pub proc: Arc<WorkerProc>,
    /// The catalog entry it was started from (`entry.key` is its model).
    pub entry: ModelEntry,
    pub backend: String,
    pub device: String,
    pub memory: u64,
    /// When it became ready, Unix ms.
    pub started_at_ms: u64,
    /// How long it took from spawn to ready, ms.
    pub load_ms: u64,
    keep_alive_ms: AtomicI64,
    last_activity_ms: AtomicU64,
    state: Mutex<WorkerState>,
    dirty: AtomicBool,
    /// When a job's end last wrote it to the registry at once, Unix ms.
    settled_ms: AtomicU64,
    /// The pool's signal that a worker's last job ended.
    settled: Arc<Notify>,
    /// Takes no new jobs: another model's job has waited too long for the
    /// room it holds ([`Pool::drain_for`]). Stopped once idle.
    draining: AtomicBool,
}

impl Worker {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn state(&self) -> WorkerState {
        *lock(&self.state)
    }

    /// Whether a job's end wrote it to the registry within [`STATE_EVERY`] of `now_ms`.
    fn settled_lately(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.settled_ms.load(Ordering::Relaxed)) < STATE_EVERY.as_millis() as u64
    }

    fn set_state(&self, s: WorkerState) {
        *lock(&self.state) = s;
        self.dirty.store(true, Ordering::Relaxed);
    }

    pub fn info(&self, hive: &str) -> WorkerInfo {
        WorkerInfo {
            v: rbee_schemas::PROTOCOL_VERSION,
            id: self.proc.id.clone(),
            hive: hive.to_owned(),
            model: self.entry.key.clone(),
            state: self.state(),
            pid: self.proc.pid,
            backend: self.backend.clone(),
            device: self.device.clone(),
            started_at_ms: self.started_at_ms,
            jobs_served: self.proc.jobs_served.load(Ordering::Relaxed),
            last_activity_ms: self.last_activity_ms.load(Ordering::Relaxed),
            keep_alive_ms: self.keep_alive_ms.load(Ordering::Relaxed),
            memory: self.memory,
            slots: self.proc.slots,
            draining: self.is_draining(),
        }
    }
}

#[derive(Debug)]
pub struct Pool {
    config: PoolConfig,
    slots: Mutex<HashMap<String, Slot>>,
    counter: AtomicU64,
    registry: Mutex<Option<kv::Store>>,
    /// A worker went from busy to ready: write it now, not at the next tick.
    settled: Arc<Notify>,
    /// Memory set aside for workers about to start, by reservation id (see [`Pool::admit`]).
    reserved: Mutex<HashMap<u64, Reserved>>,
    next_reservation: AtomicU64,
    /// A worker started, became ready or is gone: the memory this hive
    /// offers changed, so the heartbeat goes out now ([`Pool::beat_signal`]).
    beat: Arc<Notify>,
}

/// A worker's slot reserved for one job.
#[derive(Debug)]
pub struct Lease {
    pub worker: Arc<WorkerProc>,
    pub cold: bool,
    /// Time this job spent waiting for the worker to start and load.
    pub load_ms: f64,
    entry: Arc<Worker>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let now = now_ms();
        self.entry.last_activity_ms.store(now, Ordering::Relaxed);
        // The last running job (its permit is released right after this).
        let last = self.entry.proc.busy.available_permits() + 1 >= self.entry.proc.slots as usize;
        if last && self.entry.state() == WorkerState::Busy {
            self.entry.set_state(WorkerState::Ready);
            // Only when the pool would write it now: short jobs in a row do
            // not wake the pool for each one.
            if !self.entry.settled_lately(now) {
                self.entry.settled.notify_one();
            }
        }
    }
}

/// Whether `w` is the ready worker of its model in `slots` (not one retired
/// or replaced since).
fn holds(slots: &HashMap<String, Slot>, w: &Arc<Worker>) -> bool {
    matches!(slots.get(&w.entry.key), Some(Slot::Ready(cur)) if Arc::ptr_eq(cur, w))
}

impl Pool {
    pub fn new(config: PoolConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            slots: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(1),
            registry: Mutex::new(None),
            settled: Arc::new(Notify::new()),
            reserved: Mutex::new(HashMap::new()),
            next_reservation: AtomicU64::new(1),
            beat: Arc::new(Notify::new()),
        })
    }

    /// Notified whenever a worker starts, becomes ready or is gone: other
    /// hives place models by this hive's heartbeat, and a load in progress
    /// takes memory the free reading does not show yet.
    pub fn beat_signal(&self) -> Arc<Notify> {
        self.beat.clone()
    }

    /// Mirrors workers into this `rbee-workers` bucket from now on.
    pub fn set_registry(&self, store: kv::Store) {
        *lock(&self.registry) = Some(store);
    }

    fn publish(&self, info: WorkerInfo) {
        let Some(store) = lock(&self.registry).clone() else { return };
        tokio::spawn(async move {
            if let Err(e) = store.put(&info.id, Encoding::Json.encode(&info).into()).await {
                tracing::debug!(error = %e, worker = %info.id, "writing the worker registry failed");
            }
        });
    }

    fn unpublish(&self, id: &str) {
        let Some(store) = lock(&self.registry).clone() else { return };
        let id = id.to_owned();
        tokio::spawn(async move {
            let _ = store.purge(&id).await;
        });
    }

    /// Whether a worker for `model_key` runs here (or is starting).
    pub fn has(&self, model_key: &str) -> bool {
        lock(&self.slots).contains_key(model_key)
    }

    /// The catalog entry of a live worker's model, found by the job's model
    /// reference (its key or its source): a warm job needs no catalog read.
    pub fn warm_entry(&self, wanted: &str) -> Option<ModelEntry> {
        lock(&self.slots).values().find_map(|slot| match slot {
            Slot::Ready(w) if w.proc.exit_reason().is_none() && !w.is_draining() && (w.entry.key == wanted || w.entry.source == wanted) => {
                Some(w.entry.clone())
            }
            _ => None,
        })
    }

    /// A lease on a ready worker for `model` if one has a free slot right
    /// now; never starts or waits for a worker.
    pub fn try_lease(&self, model: &ModelEntry, keep_alive_ms: Option<i64>) -> Option<Lease> {
        let worker = match lock(&self.slots).get(&model.key) {
            Some(Slot::Ready(w)) if w.proc.exit_reason().is_none() && !w.is_draining() => w.clone(),
            _ => return None,
        };
        let permit = worker.proc.busy.clone().try_acquire_owned().ok()?;
        Some(self.grant(worker, permit, keep_alive_ms, None))
    }

    /// Hands out a slot of `worker` that `permit` holds; `load_ms` when the
    /// job waited for the worker to start.
    fn grant(&self, worker: Arc<Worker>, permit: OwnedSemaphorePermit, keep_alive_ms: Option<i64>, load_ms: Option<f64>) -> Lease {
        worker.keep_alive_ms.store(keep_alive_ms.unwrap_or(self.config.keep_alive_ms), Ordering::Relaxed);
        worker.set_state(WorkerState::Busy);
        Lease { worker: worker.proc.clone(), cold: load_ms.is_some(), load_ms: load_ms.unwrap_or(0.0), entry: worker, _permit: permit }
    }

    /// A ready worker for `model`, started if none runs.
    pub async fn lease(self: &Arc<Self>, model: &ModelEntry, keep_alive_ms: Option<i64>) -> Result<Lease, JobError> {
        let began = Instant::now();
        let mut waited_for_start = false;
        loop {
            let slot = self.slot_for(model, StartOptions::default());
            let worker = match slot {
                Slot::Ready(w) => w,
                Slot::Starting { rx, .. } => {
                    waited_for_start = true;
                    wait_started(rx).await?
                }
            };
            let Ok(permit) = worker.proc.busy.clone().acquire_owned().await else { continue };
            if worker.proc.exit_reason().is_some() || !self.is_current(&worker) {
                continue; // died or was retired while we waited for it; start another
            }
            let load_ms = waited_for_start.then(|| began.elapsed().as_secs_f64() * 1e3);
            return Ok(self.grant(worker, permit, keep_alive_ms, load_ms));
        }
    }

    /// Starts a worker for `model` (or finds the running one) without a job:
    /// `rbee workers spawn`. True when this call started it.
    pub async fn spawn(self: &Arc<Self>, model: &ModelEntry, opts: StartOptions) -> Result<(Arc<Worker>, bool), JobError> {
        let keep = opts.keep_alive_ms;
        match self.slot_for(model, opts) {
            Slot::Ready(w) => {
                if let Some(k) = keep {
                    w.keep_alive_ms.store(k, Ordering::Relaxed);
                }
                Ok((w, false))
            }
            Slot::Starting { rx, .. } => wait_started(rx).await.map(|w| (w, true)),
        }
    }

    fn is_current(&self, w: &Arc<Worker>) -> bool {
        holds(&lock(&self.slots), w)
    }

    fn slot_for(self: &Arc<Self>, model: &ModelEntry, opts: StartOptions) -> Slot {
        let mut slots = lock(&self.slots);
        match slots.get(&model.key) {
            Some(Slot::Ready(w)) if w.proc.exit_reason().is_none() => Slot::Ready(w.clone()),
            Some(s @ Slot::Starting { .. }) => s.clone(),
            _ => {
                let (tx, rx) = watch::channel(None);
                let memory = self.memory_on(model, opts.backend.as_deref().unwrap_or(&self.config.backend));
                let slot = Slot::Starting { rx, memory };
                slots.insert(model.key.clone(), slot.clone());
                tokio::spawn(self.clone().start(model.clone(), opts, tx));
                slot
            }
        }
    }

    async fn start(self: Arc<Self>, model: ModelEntry, opts: StartOptions, done: watch::Sender<StartResult>) {
        let began = now_ms();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-w{n}", self.config.hive_id);
        let backend = opts.backend.clone().unwrap_or_else(|| self.config.backend.clone());
        let device = opts.device.unwrap_or(self.config.device);
        let device_name = device_label(&backend, device);
        let memory = self.memory_on(&model, &backend);
        let placeholder = |state, pid| WorkerInfo {
            v: rbee_schemas::PROTOCOL_VERSION,
            id: id.clone(),
            hive: self.config.hive_id.clone(),
            model: model.key.clone(),
            state,
            pid,
            backend: backend.clone(),
            device: device_name.clone(),
            started_at_ms: now_ms(),
            jobs_served: 0,
            last_activity_ms: now_ms(),
            keep_alive_ms: opts.keep_alive_ms.unwrap_or(self.config.keep_alive_ms),
            memory,
            slots: 0,
            draining: false,
        };
        self.publish(placeholder(WorkerState::Starting, 0));
        self.beat.notify_one();
        let spec = SpawnSpec {
            worker_bin: self.config.worker_bin.clone(),
            model_path: model.path.clone(),
            backend: backend.clone(),
            engine: self.config.engine.clone(),
            device,
            threads: self.config.threads,
            id: id.clone(),
            load_timeout: self.config.load_timeout,
            noop: (model.format == "noop").then_some(self.config.noop_token_delay),
            slots: self.config.worker_slots,
        };
        let pool = self.clone();
        let loading = placeholder(WorkerState::Loading, 0);
        let result = WorkerProc::spawn(spec, move |pid| pool.publish(WorkerInfo { pid, ..loading })).await;
        let result = result.map(|proc| {
            // Its KV caches: as many as the jobs it said it runs at once.
            let memory = crate::system::worker_memory(&model, proc.slots, &backend, &self.config.engine);
            let ready = now_ms();
            Arc::new(Worker {
                proc,
                entry: model.clone(),
                backend: backend.clone(),
                device: device_name.clone(),
                memory,
                started_at_ms: ready,
                load_ms: ready.saturating_sub(began),
                keep_alive_ms: AtomicI64::new(opts.keep_alive_ms.unwrap_or(self.config.keep_alive_ms)),
                last_activity_ms: AtomicU64::new(now_ms()),
                state: Mutex::new(WorkerState::Ready),
                dirty: AtomicBool::new(false),
                settled_ms: AtomicU64::new(0),
                settled: self.settled.clone(),
                draining: AtomicBool::new(false),
            })
        });
        {
            let mut slots = lock(&self.slots);
            match &result {
                Ok(w) => {
                    slots.insert(model.key.clone(), Slot::Ready(w.clone()));
                }
                Err(_) => {
                    slots.remove(&model.key);
                }
            }
        }
        self.beat.notify_one();
        match &result {
            Ok(w) => {
                self.publish(w.info(&self.config.hive_id));
                let pool = self.clone();
                let w = w.clone();
                tokio::spawn(async move {
                    w.proc.exited().await;
                    {
                        let mut slots = lock(&pool.slots);
                        if holds(&slots, &w) {
                            slots.remove(&w.entry.key);
                        }
                    }
                    pool.unpublish(&w.proc.id);
                    pool.beat.notify_one();
                });
            }
            Err(_) => self.unpublish(&id),
        }
        let _ = done.send(Some(result));
    }

    /// Stops idle workers whose keep-alive ran out; writes changed states.
    /// Runs every 250 ms until the pool is dropped.
    pub async fn maintain(self: Arc<Self>) {
        let mut tick = tokio::time::interval(STATE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.settled.notified() => {
                    self.write_states(false);
                    continue;
                }
            }
            let now = now_ms();
            let mut retire = Vec::new();
            {
                let reserved = lock(&self.reserved);
                let wanted = wanted(&reserved);
                let mut slots = lock(&self.slots);
                slots.retain(|model, slot| {
                    let Slot::Ready(w) = slot else { return true };
                    if wanted.contains(model.as_str()) {
                        return true;
                    }
                    let keep = w.keep_alive_ms.load(Ordering::Relaxed);
                    let idle_for = now.saturating_sub(w.last_activity_ms.load(Ordering::Relaxed));
                    // A draining worker goes once idle, whoever asked for its room.
                    if !w.is_draining() && (keep < 0 || idle_for < keep as u64) {
                        return true;
                    }
                    // Take all its slots: no job runs or can start on it from here on.
                    match w.proc.busy.clone().try_acquire_many_owned(w.proc.slots) {
                        Ok(permit) => {
                            retire.push((w.clone(), permit));
                            false
                        }
                        Err(_) => true,
                    }
                });
            }
            for (w, permit) in retire {
                tracing::info!(worker = %w.proc.id, model = %w.entry.key, "idle past its keep-alive; stopping it");
                w.set_state(WorkerState::Stopping);
                self.publish(w.info(&self.config.hive_id));
                tokio::spawn(async move {
                    w.proc.stop(Duration::from_secs(5)).await;
                    drop(permit);
                });
            }
            self.write_states(true);
        }
    }

    /// Writes the workers whose state changed: on a tick all of them; when
    /// a job ended, those not written that way within [`STATE_EVERY`] (so
    /// a stream of short jobs is not a stream of writes; the tick has the rest).
    fn write_states(&self, tick: bool) {
        let now = now_ms();
        for (_, w) in self.workers() {
            if !tick && w.settled_lately(now) {
                continue;
            }
            if w.dirty.swap(false, Ordering::Relaxed) {
                if !tick {
                    w.settled_ms.store(now, Ordering::Relaxed);
                }
                self.publish(w.info(&self.config.hive_id));
            }
        }
    }

    /// Writes every worker to the registry (with each heartbeat, so entries outlive their TTL).
    pub fn republish(&self) {
        for (_, w) in self.workers() {
            self.publish(w.info(&self.config.hive_id));
        }
    }

    /// The ready workers, by model.
    pub fn workers(&self) -> Vec<(String, Arc<Worker>)> {
        lock(&self.slots)
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Ready(w) => Some((k.clone(), w.clone())),
                Slot::Starting { .. } => None,
            })
            .collect()
    }

    /// The models with a worker here: ready ones, and ones still starting.
    pub fn models(&self) -> (Vec<String>, Vec<String>) {
        let slots = lock(&self.slots);
        let (mut ready, mut starting) = (Vec::new(), Vec::new());
        for (model, slot) in slots.iter() {
            match slot {
                Slot::Ready(_) => ready.push(model.clone()),
                Slot::Starting { .. } => starting.push(model.clone()),
            }
        }
        (ready, starting)
    }

    pub fn summaries(&self) -> Vec<WorkerSummary> {
        let mut out: Vec<WorkerSummary> = lock(&self.slots)
            .iter()
            .map(|(model, s)| match s {
                Slot::Ready(w) => WorkerSummary {
                    id: w.proc.id.clone(),
                    model: model.clone(),
                    state: w.state().as_str().to_owned(),
                    pid: w.proc.pid,
                    jobs_served: w.proc.jobs_served.load(Ordering::Relaxed),
                },
                Slot::Starting { .. } => WorkerSummary { id: String::new(), model: model.clone(), state: "starting".to_owned(), pid: 0, jobs_served: 0 },
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }

    /// Stops one worker by id (it finishes its current job first).
    pub async fn stop(&self, worker_id: &str) -> Result<Arc<Worker>, JobError> {
        let found = {
            let mut slots = lock(&self.slots);
            let key = slots
                .iter()
                .find(|(_, s)| matches!(s, Slot::Ready(w) if w.proc.id == worker_id))
                .map(|(k, _)| k.clone());
            key.and_then(|k| match slots.remove(&k) {
                Some(Slot::Ready(w)) => Some(w),
                _ => None,
            })
        };
        let Some(w) = found else {
            return Err(JobError::new(ErrorCode::UnknownWorker, format!("no worker {worker_id} on hive {}", self.config.hive_id)));
        };
        w.set_state(WorkerState::Stopping);
        self.publish(w.info(&self.config.hive_id));
        // Waits for its current jobs (all slots) before asking it to exit.
        let permit = w.proc.busy.clone().acquire_many_owned(w.proc.slots).await;
        w.proc.stop(Duration::from_secs(10)).await;
        drop(permit);
        Ok(w)
    }

    /// Stops the workers of `model_key`; true if there were any.
    pub async fn stop_model(&self, model_key: &str) -> bool {
        let ids: Vec<String> = self.workers().into_iter().filter(|(m, _)| m == model_key).map(|(_, w)| w.proc.id.clone()).collect();
        for id in &ids {
            let _ = self.stop(id).await;
        }
        !ids.is_empty()
    }

    /// Stops every worker: ask, then kill after `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        let workers = self.workers();
        lock(&self.slots).clear();
        for (_, w) in &workers {
            w.set_state(WorkerState::Stopping);
        }
        let stops = workers.iter().map(|(_, w)| w.proc.stop(grace));
        futures::future::join_all(stops).await;
        for (_, w) in &workers {
            self.unpublish(&w.proc.id);
        }
    }
}

async fn wait_started(mut rx: watch::Receiver<StartResult>) -> Result<Arc<Worker>, JobError> {
    loop {
        if let Some(r) = rx.borrow_and_update().clone() {
            return r;
        }
        if rx.changed().await.is_err() {
            return Err(JobError::internal("worker start abandoned"));
        }
    }
}
