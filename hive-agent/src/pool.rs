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
//! Memory: every worker counts its estimate from the moment its model is
//! placed here ([`Pool::admit`] sets it aside; a starting worker carries it),
//! not once its process has taken it. Another model's job may stop idle
//! workers for room ([`Pool::evict_one`], least recently used first, never
//! one with keep-alive -1, nor one a placed job is about to use), and after
//! waiting a while drain busy ones ([`Pool::drain_for`]).
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

/// Memory set aside for a model's worker from the moment its placement
/// passed until the worker exists (or the job ends without one).
#[derive(Debug)]
struct Reserved {
    model: String,
    bytes: u64,
    /// A promise rather than a reservation: room kept for a job that is
    /// waiting in the queue while workers drain for it ([`Pool::drain_for`]),
    /// until then. Other models may not take it; the job's own model
    /// still has to fit when it comes back.
    promised_until: Option<Instant>,
}

impl Reserved {
    fn counts(&self, now: Instant) -> bool {
        self.promised_until.is_none_or(|t| now < t)
    }
}

/// How long room promised to a waiting job is kept: it comes back at least
/// every second (the longest nak for memory), and renews the promise.
const PROMISE_FOR: Duration = Duration::from_secs(3);

/// A turn lasts at least this many times the worker's own load time: when
/// two models take turns, loading then takes at most a fifth of the time.
const TURN_PER_LOAD: u64 = 4;

/// Whether a worker that became ready at `ready_ms` after loading for
/// `load_ms` has had its turn by `now_ms`: it was up at least `min_turn`
/// (`--min-turn`) and [`TURN_PER_LOAD`] times its load time. When two
/// models' jobs both wait for each other's room, each then gets a turn
/// instead of one job per model load, and a model that takes a minute to
/// load keeps its worker for minutes, not seconds.
pub fn turn_is_over(ready_ms: u64, load_ms: u64, now_ms: u64, min_turn: Duration) -> bool {
    let turn = (min_turn.as_millis() as u64).max(load_ms.saturating_mul(TURN_PER_LOAD));
    now_ms.saturating_sub(ready_ms) >= turn
}

/// Memory set aside here for a model's worker by [`Pool::admit`]; given back
/// when dropped. It stops counting once the model has a worker here (the
/// worker counts instead), so holding it for the whole job is fine.
#[derive(Debug)]
pub struct Reservation {
    pool: Arc<Pool>,
    id: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        lock(&self.pool.reserved).remove(&self.id);
    }
}

/// The memory a new worker could take here, as the machine reports it.
#[derive(Debug, Clone, Copy)]
pub struct Free {
    /// Available RAM, bytes (0: unknown).
    pub ram: u64,
    /// Free memory of the GPU the workers run on, where the hive reads one.
    pub vram: Option<u64>,
    /// `--memory-limit` (0: none).
    pub limit: u64,
}

/// What this hive's workers are counted for, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Every worker, ready or starting, and every reservation of a model
    /// without one: what `--memory-limit` is compared with.
    pub total: u64,
    /// The part the machine's free memory does not show yet: workers
    /// starting, reservations.
    pub pending: u64,
}

/// Why a model does not fit here now, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shortfall {
    /// Room for a new worker now.
    pub here: u64,
    /// Held by idle workers that may be stopped to make room.
    pub idle: u64,
    /// Held by workers that are busy or starting (or reserved for): room
    /// once they are idle.
    pub busy: u64,
    /// Held by workers with keep-alive -1, which are never stopped for room.
    pub pinned: u64,
}

impl Free {
    /// Room for a new worker with `c` counted against it.
    pub fn room(&self, c: Committed) -> u64 {
        rbee_schemas::hive::memory_available(self.ram, self.vram, self.limit, c.total, c.pending)
    }
}

/// Memory reserved (or promised) for models with no worker here yet, but
/// `except`'s promises. One reservation per model counts: jobs for the same
/// model share its worker.
fn reserved_for_new(reserved: &HashMap<u64, Reserved>, slots: &HashMap<String, Slot>, except: Option<&str>) -> u64 {
    let now = Instant::now();
    let mut models: HashMap<&str, u64> = HashMap::new();
    let counted = |r: &&Reserved| r.counts(now) && !(r.promised_until.is_some() && except == Some(r.model.as_str()));
    for r in reserved.values().filter(counted).filter(|r| !slots.contains_key(&r.model)) {
        let m = models.entry(&r.model).or_default();
        *m = (*m).max(r.bytes);
    }
    models.values().sum()
}

/// Models that jobs placed here hold (see [`Pool::hold`] and [`Pool::admit`]).
fn wanted(reserved: &HashMap<u64, Reserved>) -> std::collections::HashSet<&str> {
    reserved.values().filter(|r| r.promised_until.is_none()).map(|r| r.model.as_str()).collect()
}

/// Whether a worker may be stopped to make room for another model: any
/// but one whose keep-alive says never.
fn evictable(w: &Worker) -> bool {
    w.keep_alive_ms.load(Ordering::Relaxed) >= 0
}

fn is_idle(w: &Worker) -> bool {
    w.proc.busy.available_permits() >= w.proc.slots as usize
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
            let memory = crate::system::worker_memory(&model, proc.slots, &backend);
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

    /// Memory a worker of this hive for `model` is estimated to need (with
    /// the KV cache of its `--worker-slots`), on the hive's own backend.
    pub fn memory_for(&self, model: &ModelEntry) -> u64 {
        self.memory_on(model, &self.config.backend)
    }

    /// Before the worker says how many jobs it runs at once: a GPU worker
    /// (candle) runs one, a CPU worker up to `--worker-slots`.
    fn memory_on(&self, model: &ModelEntry, backend: &str) -> u64 {
        let slots = if backend == "cpu" { self.config.worker_slots } else { 1 };
        crate::system::worker_memory(model, slots, backend)
    }

    pub fn committed(&self) -> Committed {
        self.committed_with(&lock(&self.reserved), None)
    }

    /// Counting for a placement of `except` (whose own promise is not
    /// counted against it). Lock order: `reserved`, then `slots`.
    fn committed_with(&self, reserved: &HashMap<u64, Reserved>, except: Option<&str>) -> Committed {
        let slots = lock(&self.slots);
        let mut c = Committed::default();
        for slot in slots.values() {
            match slot {
                Slot::Ready(w) => c.total += w.memory,
                Slot::Starting { memory, .. } => {
                    c.total += memory;
                    c.pending += memory;
                }
            }
        }
        let held = reserved_for_new(reserved, &slots, except);
        c.total += held;
        c.pending += held;
        c
    }

    /// Sets `need` bytes aside for a worker of `model` if they fit in what
    /// `free` leaves once every worker and reservation here is counted;
    /// otherwise says what holds the memory. A model that already has a
    /// worker or a reservation here needs no more. Check and reservation are
    /// one step, so two models placed at once cannot both take the last room.
    pub fn admit(self: &Arc<Self>, model: &str, need: u64, free: Free) -> Result<Reservation, Shortfall> {
        let mut reserved = lock(&self.reserved);
        let now = Instant::now();
        reserved.retain(|_, r| r.counts(now));
        let known = reserved.values().any(|r| r.model == model && r.promised_until.is_none()) || lock(&self.slots).contains_key(model);
        if !known {
            let here = free.room(self.committed_with(&reserved, Some(model)));
            if need > here {
                return Err(self.shortfall(here, &reserved, model));
            }
        }
        // What was promised to this model is taken now.
        reserved.retain(|_, r| !(r.model == model && r.promised_until.is_some()));
        let id = self.next_reservation.fetch_add(1, Ordering::Relaxed);
        reserved.insert(id, Reserved { model: model.to_owned(), bytes: need, promised_until: None });
        Ok(Reservation { pool: self.clone(), id })
    }

    /// Marks `model`'s worker here as wanted by a job placed on it, until
    /// the reservation is dropped: between placement and the job taking a
    /// slot (a round trip to the broker for the claim) the worker looks idle,
    /// and neither the keep-alive reaper nor [`Pool::evict_one`] may stop it
    /// then, or the job would start it again without a memory check.
    pub fn hold(self: &Arc<Self>, model: &str) -> Reservation {
        let id = self.next_reservation.fetch_add(1, Ordering::Relaxed);
        lock(&self.reserved).insert(id, Reserved { model: model.to_owned(), bytes: 0, promised_until: None });
        Reservation { pool: self.clone(), id }
    }

    fn shortfall(&self, here: u64, reserved: &HashMap<u64, Reserved>, model: &str) -> Shortfall {
        let slots = lock(&self.slots);
        let wanted = wanted(reserved);
        let mut s = Shortfall { here, ..Shortfall::default() };
        for (model, slot) in slots.iter() {
            match slot {
                Slot::Ready(w) if !evictable(w) => s.pinned += w.memory,
                Slot::Ready(w) if is_idle(w) && !wanted.contains(model.as_str()) => s.idle += w.memory,
                Slot::Ready(w) => s.busy += w.memory,
                Slot::Starting { memory, .. } => s.busy += memory,
            }
        }
        s.busy += reserved_for_new(reserved, &slots, Some(model));
        s
    }

    /// Whether `model`'s worker here is draining (see [`Pool::drain_for`]).
    pub fn is_draining(&self, model: &str) -> bool {
        matches!(lock(&self.slots).get(model), Some(Slot::Ready(w)) if w.is_draining())
    }

    /// A job for another model has waited too long for room that busy
    /// workers hold: marks the least recently used busy workers that may be
    /// stopped for room (see [`evictable`]) as draining, until they hold
    /// `short_by` bytes (those draining already count), among those whose
    /// turn is over ([`turn_is_over`]). A draining worker
    /// takes no new jobs, finishes those it runs, and is stopped once idle;
    /// its model's jobs wait in the queue meanwhile. So two models that do
    /// not fit together take turns instead of one starving the other.
    ///
    /// The room, `need` bytes, is promised to `for_model` for [`PROMISE_FOR`]
    /// (renewed by each call), so other models' jobs cannot take it while
    /// the job waits to come back.
    pub fn drain_for(&self, for_model: &str, short_by: u64, need: u64) {
        let mut reserved = lock(&self.reserved);
        reserved.retain(|_, r| !(r.model == for_model && r.promised_until.is_some()));
        let id = self.next_reservation.fetch_add(1, Ordering::Relaxed);
        reserved.insert(id, Reserved { model: for_model.to_owned(), bytes: need, promised_until: Some(Instant::now() + PROMISE_FOR) });
        let slots = lock(&self.slots);
        let now = now_ms();
        let had_turn = |w: &Worker| turn_is_over(w.started_at_ms, w.load_ms, now, self.config.min_turn);
        let mut busy: Vec<&Arc<Worker>> = slots
            .values()
            .filter_map(|s| match s {
                Slot::Ready(w) if evictable(w) && w.proc.exit_reason().is_none() && had_turn(w) => Some(w),
                _ => None,
            })
            .collect();
        let mut freed: u64 = busy.iter().filter(|w| w.is_draining()).map(|w| w.memory).sum();
        busy.sort_by_key(|w| w.last_activity_ms.load(Ordering::Relaxed));
        for w in busy {
            if freed >= short_by {
                break;
            }
            if !w.is_draining() {
                tracing::info!(worker = %w.proc.id, model = %w.entry.key, "a job for {for_model} waited for room: the worker takes no new jobs and stops once idle");
                w.draining.store(true, Ordering::Relaxed);
                w.dirty.store(true, Ordering::Relaxed);
                freed += w.memory;
            }
        }
    }

    /// Stops the least recently used idle worker that may be stopped for
    /// room (see [`evictable`]) and waits for its process to exit, so its
    /// memory is free when this returns. `None` when there is no such worker.
    pub async fn evict_one(&self, for_model: &str) -> Option<Arc<Worker>> {
        let (w, permit) = {
            let reserved = lock(&self.reserved);
            let wanted = wanted(&reserved);
            let mut slots = lock(&self.slots);
            let oldest = slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Ready(w) if evictable(w) && is_idle(w) && !wanted.contains(k.as_str()) && w.proc.exit_reason().is_none() => {
                        Some((k, w))
                    }
                    _ => None,
                })
                .min_by_key(|(_, w)| w.last_activity_ms.load(Ordering::Relaxed))
                .map(|(k, w)| (k.clone(), w.clone()));
            let (key, w) = oldest?;
            // All its slots: no job can start on it from here on.
            let permit = w.proc.busy.clone().try_acquire_many_owned(w.proc.slots).ok()?;
            slots.remove(&key);
            (w, permit)
        };
        tracing::info!(worker = %w.proc.id, model = %w.entry.key, "stopping an idle worker to make room for {for_model}");
        w.set_state(WorkerState::Stopping);
        self.publish(w.info(&self.config.hive_id));
        w.proc.stop(Duration::from_secs(5)).await;
        drop(permit);
        Some(w)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Arc<Pool> {
        Pool::new(PoolConfig {
            hive_id: "h".into(),
            worker_bin: PathBuf::new(),
            backend: "cpu".into(),
            device: 0,
            threads: None,
            load_timeout: Duration::from_secs(1),
            noop_token_delay: Duration::ZERO,
            keep_alive_ms: 0,
            worker_slots: 1,
            min_turn: Duration::from_secs(5),
        })
    }

    #[test]
    fn a_turn_lasts_the_minimum_or_four_loads_whichever_is_longer() {
        let five = Duration::from_secs(5);
        // A quick load: the minimum turn.
        assert!(!turn_is_over(1_000, 300, 5_999, five));
        assert!(turn_is_over(1_000, 300, 6_000, five));
        // A minute's load: four minutes' turn, whatever the minimum.
        assert!(!turn_is_over(0, 60_000, 239_999, five));
        assert!(turn_is_over(0, 60_000, 240_000, five));
        // No minimum: still four loads.
        assert!(!turn_is_over(0, 300, 1_199, Duration::ZERO));
        assert!(turn_is_over(0, 300, 1_200, Duration::ZERO));
        // A clock that went back is no turn over.
        assert!(!turn_is_over(10_000, 0, 9_000, five));
    }

    #[test]
    fn memory_is_set_aside_once_per_model_until_its_reservations_are_dropped() {
        let pool = pool();
        let free = Free { ram: 1000, vram: None, limit: 0 };
        let a = pool.admit("a", 600, free).expect("fits");
        let a_again = pool.admit("a", 600, free).expect("a second job for the same model shares its worker");
        assert_eq!(pool.committed(), Committed { total: 600, pending: 600 });
        // Another model no longer fits: the room is set aside for "a", which is not idle.
        assert_eq!(pool.admit("b", 600, free).expect_err("no room left"), Shortfall { here: 400, busy: 600, ..Shortfall::default() });
        assert!(pool.admit("c", 400, free).is_ok(), "what is left still fits");
        drop(a);
        assert_eq!(pool.committed().total, 600, "one job for \"a\" still holds it");
        drop(a_again);
        assert_eq!(pool.committed(), Committed::default());
        assert!(pool.admit("b", 600, free).is_ok());
        // A job placed on a running worker holds it, but sets no memory aside.
        let held = pool.hold("warm");
        assert_eq!(pool.committed(), Committed::default());
        assert!(wanted(&lock(&pool.reserved)).contains("warm"));
        drop(held);
        assert!(wanted(&lock(&pool.reserved)).is_empty());
    }

    #[test]
    fn room_promised_to_a_waiting_model_is_kept_from_others_and_taken_by_it() {
        let pool = pool();
        let free = Free { ram: 1000, vram: None, limit: 0 };
        pool.drain_for("b", 600, 600);
        assert_eq!(pool.committed().total, 600, "the promise counts");
        // Another model must wait: the room is promised.
        assert_eq!(pool.admit("c", 600, free).expect_err("promised to b"), Shortfall { here: 400, busy: 600, ..Shortfall::default() });
        // Its own promise does not count against "b", which takes it.
        let b = pool.admit("b", 600, free).expect("its own room");
        assert_eq!(pool.committed().total, 600, "the promise became b's reservation");
        drop(b);
        assert_eq!(pool.committed(), Committed::default());
        // A promise whose job went away (cancelled, expired, run elsewhere)
        // lapses: once it is past, it holds nothing and is cleared.
        pool.drain_for("b", 600, 600);
        for r in lock(&pool.reserved).values_mut() {
            r.promised_until = Some(Instant::now() - Duration::from_millis(1));
        }
        assert_eq!(pool.committed(), Committed::default());
        let c = pool.admit("c", 600, free).expect("the lapsed promise holds nothing");
        assert_eq!(lock(&pool.reserved).len(), 1, "the lapsed promise is gone, c's reservation stays");
        drop(c);
    }

    #[test]
    fn room_is_the_least_of_free_memory_less_what_is_pending_and_the_limit_less_what_is_committed() {
        let c = Committed { total: 300, pending: 100 };
        assert_eq!(Free { ram: 1000, vram: None, limit: 0 }.room(c), 900);
        assert_eq!(Free { ram: 1000, vram: None, limit: 500 }.room(c), 200);
        assert_eq!(Free { ram: 1000, vram: Some(150), limit: 0 }.room(c), 50, "GPU memory, not RAM");
        assert_eq!(Free { ram: 0, vram: None, limit: 500 }.room(c), 200, "RAM unknown: the limit alone");
        assert_eq!(Free { ram: 50, vram: None, limit: 0 }.room(c), 0, "all of it pending: none left, not unknown");
    }
}
