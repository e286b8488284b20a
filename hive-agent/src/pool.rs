//! The hive's workers: at most one per model, started on the first job that
//! needs it (cold start) and reused by the next ones (warm start).
//!
//! The registry is a map behind a short, never-awaited lock. Starting a worker
//! runs in its own task, so a job task that is cancelled while waiting cannot
//! leave a half-started entry behind; every job that needs the same model
//! waits on the same start. A watcher task removes a worker from the map when
//! its process exits, so the next job starts a fresh one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rbee_schemas::error::JobError;
use rbee_schemas::hive::WorkerSummary;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::catalog::ModelEntry;
use crate::worker_proc::{SpawnSpec, WorkerProc};

type StartResult = Option<Result<Arc<WorkerProc>, JobError>>;

#[derive(Debug, Clone)]
enum Slot {
    Starting(watch::Receiver<StartResult>),
    Ready(Arc<WorkerProc>),
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
}

#[derive(Debug)]
pub struct Pool {
    config: PoolConfig,
    slots: Mutex<HashMap<String, Slot>>,
    counter: AtomicU64,
}

/// A worker reserved for one job: the job holds the worker's only slot.
#[derive(Debug)]
pub struct Lease {
    pub worker: Arc<WorkerProc>,
    pub cold: bool,
    /// Time this job spent waiting for the worker to start and load.
    pub load_ms: f64,
    _permit: OwnedSemaphorePermit,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    pub fn new(config: PoolConfig) -> Arc<Self> {
        Arc::new(Self { config, slots: Mutex::new(HashMap::new()), counter: AtomicU64::new(1) })
    }

    /// A ready worker for `model`, started if none runs.
    pub async fn lease(self: &Arc<Self>, model: &ModelEntry) -> Result<Lease, JobError> {
        let began = Instant::now();
        let mut waited_for_start = false;
        loop {
            let slot = {
                let mut slots = lock(&self.slots);
                match slots.get(&model.key) {
                    Some(Slot::Ready(w)) if w.exit_reason().is_none() => Slot::Ready(w.clone()),
                    Some(Slot::Starting(rx)) => Slot::Starting(rx.clone()),
                    _ => {
                        let (tx, rx) = watch::channel(None);
                        slots.insert(model.key.clone(), Slot::Starting(rx.clone()));
                        tokio::spawn(self.clone().start(model.clone(), tx));
                        Slot::Starting(rx)
                    }
                }
            };
            let worker = match slot {
                Slot::Ready(w) => w,
                Slot::Starting(mut rx) => {
                    waited_for_start = true;
                    let result = loop {
                        if let Some(r) = rx.borrow_and_update().clone() {
                            break r;
                        }
                        if rx.changed().await.is_err() {
                            break Err(JobError::internal("worker start abandoned"));
                        }
                    };
                    result?
                }
            };
            let Ok(permit) = worker.busy.clone().acquire_owned().await else { continue };
            if worker.exit_reason().is_some() {
                continue; // died while we waited for it; start another
            }
            let load_ms = if waited_for_start { began.elapsed().as_secs_f64() * 1e3 } else { 0.0 };
            return Ok(Lease { worker, cold: waited_for_start, load_ms, _permit: permit });
        }
    }

    async fn start(self: Arc<Self>, model: ModelEntry, done: watch::Sender<StartResult>) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let spec = SpawnSpec {
            worker_bin: self.config.worker_bin.clone(),
            model_path: model.path.clone(),
            backend: self.config.backend.clone(),
            device: self.config.device,
            threads: self.config.threads,
            id: format!("{}-w{n}", self.config.hive_id),
            load_timeout: self.config.load_timeout,
            noop: (model.format == "noop").then_some(self.config.noop_token_delay),
        };
        let result = WorkerProc::spawn(spec).await;
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
        if let Ok(w) = &result {
            let pool = self.clone();
            let w = w.clone();
            let key = model.key.clone();
            tokio::spawn(async move {
                w.exited().await;
                let mut slots = lock(&pool.slots);
                if matches!(slots.get(&key), Some(Slot::Ready(cur)) if Arc::ptr_eq(cur, &w)) {
                    slots.remove(&key);
                }
            });
        }
        let _ = done.send(Some(result));
    }

    /// The ready workers, for heartbeats and status.
    pub fn workers(&self) -> Vec<(String, Arc<WorkerProc>)> {
        lock(&self.slots)
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Ready(w) => Some((k.clone(), w.clone())),
                Slot::Starting(_) => None,
            })
            .collect()
    }

    pub fn summaries(&self) -> Vec<WorkerSummary> {
        let mut out: Vec<WorkerSummary> = lock(&self.slots)
            .iter()
            .map(|(model, s)| match s {
                Slot::Ready(w) => WorkerSummary {
                    id: w.id.clone(),
                    model: model.clone(),
                    state: if w.busy.available_permits() == 0 { "busy" } else { "ready" }.to_owned(),
                    pid: w.pid,
                    jobs_served: w.jobs_served.load(Ordering::Relaxed),
                },
                Slot::Starting(_) => WorkerSummary {
                    id: String::new(),
                    model: model.clone(),
                    state: "starting".to_owned(),
                    pid: 0,
                    jobs_served: 0,
                },
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }

    /// Stops every worker: ask, then kill after `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        let workers = self.workers();
        lock(&self.slots).clear();
        let stops = workers.iter().map(|(_, w)| w.stop(grace));
        futures::future::join_all(stops).await;
    }
}
