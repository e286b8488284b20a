//! One worker child process and the tasks that own its pipes.
//!
//! - a writer task owns stdin and writes [`ToWorker`] frames from a channel;
//! - a reader task owns stdout and routes [`FromWorker`] frames to the job
//!   they belong to (bounded channels: a slow publisher slows the worker);
//! - a stderr task logs the worker's lines and keeps the last few for crash reports;
//! - a waiter task owns the [`Child`], reaps it, and tells every routed job
//!   that the worker is gone.
//!
//! Workers run in their own process group (a Ctrl-C in the hive's terminal is
//! the hive's to handle) and exit by themselves when their stdin closes, which
//! happens when the hive exits or is killed: no worker outlives its hive.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::job::GenerateParams;
use rbee_schemas::record::Resume;
use rbee_schemas::worker::{decode_frame, FromWorker, ModelInfo, Outcome, ToWorker, MAX_FRAME};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::lock;

/// Lines of stderr kept for crash reports.
const STDERR_TAIL: usize = 20;

/// What a running job hears from its worker.
#[derive(Debug)]
pub enum WorkerMsg {
    /// A sampled token (`u32::MAX`: text released at the end, no token) and its text.
    Token(u32, String),
    Finished(Outcome),
    Failed(JobError),
    /// The worker process is gone; the string says how.
    Exited(String),
}

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub worker_bin: PathBuf,
    pub model_path: PathBuf,
    pub backend: String,
    /// `--engine` for a model's worker (auto, fast or candle).
    pub engine: String,
    pub device: usize,
    /// Compute threads; `None` lets candle use every core.
    pub threads: Option<usize>,
    pub id: String,
    pub load_timeout: Duration,
    /// Run the no-op test engine with this time per token instead of a model.
    pub noop: Option<Duration>,
    /// Jobs the worker runs at once (continuous batching on the fast engine).
    pub slots: u32,
}

type Routes = Arc<Mutex<HashMap<u64, mpsc::Sender<WorkerMsg>>>>;

/// A running, loaded worker.
#[derive(Debug)]
pub struct WorkerProc {
    pub id: String,
    pub pid: u32,
    pub info: ModelInfo,
    pub started: Instant,
    /// One job at a time per worker.
    /// One permit per job the worker may run at once.
    pub busy: Arc<Semaphore>,
    pub slots: u32,
    pub jobs_served: AtomicU64,
    input: mpsc::Sender<ToWorker>,
    routes: Routes,
    exit: watch::Receiver<Option<String>>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    next_job: AtomicU64,
}

impl WorkerProc {
    /// Starts the worker and waits until its model is loaded; `spawned` hears
    /// the pid as soon as the process runs (it is loading from then on).
    pub async fn spawn(spec: SpawnSpec, spawned: impl FnOnce(u32) + Send) -> Result<Arc<WorkerProc>, JobError> {
        let mut cmd = Command::new(&spec.worker_bin);
        match spec.noop {
            Some(delay) => cmd.arg("--noop").arg("--noop-token-delay").arg(format!("{}us", delay.as_micros())),
            None => cmd.arg("--model").arg(&spec.model_path).arg("--engine").arg(&spec.engine),
        };
        cmd.arg("--backend")
            .arg(&spec.backend)
            .arg("--device")
            .arg(spec.device.to_string())
            .arg("--id")
            .arg(&spec.id)
            .arg("--slots")
            .arg(spec.slots.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if let Some(n) = spec.threads {
            cmd.env("RAYON_NUM_THREADS", n.to_string());
        }
        let order = std::env::var(crate::gpu::CUDA_DEVICE_ORDER).ok();
        if let Some((key, value)) = crate::gpu::worker_env(&spec.backend, order.as_deref()) {
            cmd.env(key, value);
        }
        let mut child = cmd.spawn().map_err(|e| {
            JobError::new(
                ErrorCode::ModelLoadFailed,
                format!("cannot start worker {}: {e}; set --worker-bin or RBEE_WORKER_BIN", spec.worker_bin.display()),
            )
        })?;
        let pid = child.id().unwrap_or(0);
        spawned(pid);
        let (Some(stdin), Some(mut stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(JobError::internal("worker pipes missing"));
        };
        tracing::info!(worker = %spec.id, pid, model = %spec.model_path.display(), "worker starting");

        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        tokio::spawn(log_stderr(spec.id.clone(), stderr, tail.clone()));

        let first = tokio::time::timeout(spec.load_timeout, read_frame(&mut stdout)).await;
        let info = match first {
            Ok(Ok(Some(FromWorker::Ready { info }))) => info,
            Ok(Ok(Some(FromWorker::LoadFailed { error }))) => {
                let _ = child.wait().await;
                return Err(error);
            }
            Ok(other) => {
                let status = child.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                let how = match other {
                    Ok(Some(frame)) => format!("sent {frame:?} before Ready"),
                    Ok(None) => format!("exited ({status})"),
                    Err(e) => format!("broke its pipe ({e}; {status})"),
                };
                return Err(JobError::new(
                    ErrorCode::ModelLoadFailed,
                    format!("worker {} {how} while loading {}{}", spec.id, spec.model_path.display(), tail_text(&tail)),
                ));
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(JobError::new(
                    ErrorCode::ModelLoadTimeout,
                    format!(
                        "worker {} did not load {} within {:?}; it was stopped (raise the hive's --load-timeout for big models)",
                        spec.id,
                        spec.model_path.display(),
                        spec.load_timeout
                    ),
                ));
            }
        };
        // A worker that runs fewer jobs at once than asked (candle: one) gets
        // only that many leases; the rest wait here, not started, and not in
        // its pipe.
        let slots = if info.slots > 0 { spec.slots.min(info.slots) } else { spec.slots }.max(1);
        tracing::info!(worker = %spec.id, pid, load_ms = info.load_ms, device = %info.device, slots, "worker ready");

        let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
        let (input_tx, input_rx) = mpsc::channel(64);
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel();
        tokio::spawn(write_frames(stdin, input_rx));
        let router = tokio::spawn(route_frames(spec.id.clone(), stdout, routes.clone()));
        tokio::spawn(reap(spec.id.clone(), child, kill_rx, exit_tx, routes.clone(), tail, router));
        Ok(Arc::new(WorkerProc {
            id: spec.id,
            pid,
            info,
            started: Instant::now(),
            busy: Arc::new(Semaphore::new(slots as usize)),
            slots,
            jobs_served: AtomicU64::new(0),
            input: input_tx,
            routes,
            exit: exit_rx,
            kill: Mutex::new(Some(kill_tx)),
            next_job: AtomicU64::new(1),
        }))
    }

    /// Sends a job; its messages arrive on the returned receiver.
    pub async fn run(&self, params: GenerateParams, resume: Option<Resume>) -> Result<(u64, mpsc::Receiver<WorkerMsg>), String> {
        let job = self.next_job.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(256);
        lock(&self.routes).insert(job, tx);
        if let Some(reason) = self.exit_reason() {
            lock(&self.routes).remove(&job);
            return Err(reason);
        }
        if self.input.send(ToWorker::Generate { job, params, resume }).await.is_err() {
            lock(&self.routes).remove(&job);
            return Err(self.exit_reason().unwrap_or_else(|| "worker input closed".to_owned()));
        }
        self.jobs_served.fetch_add(1, Ordering::Relaxed);
        // Let the input task write the frame now: the hive's runtime has one
        // thread, and the caller's next steps (the claim's record write, the
        // started event) would otherwise come first while the worker waits.
        tokio::task::yield_now().await;
        Ok((job, rx))
    }

    /// Asks the worker to stop a job at its next token.
    pub async fn cancel(&self, job: u64) {
        let _ = self.input.send(ToWorker::Cancel { job }).await;
    }

    /// [`cancel`](Self::cancel) without waiting (for `Drop`); false if the
    /// worker's input queue was full or closed.
    pub fn cancel_now(&self, job: u64) -> bool {
        self.input.try_send(ToWorker::Cancel { job }).is_ok()
    }

    /// Forgets a job's route (its task is done with it).
    pub fn release(&self, job: u64) {
        lock(&self.routes).remove(&job);
    }

    /// `Some(how)` once the process has exited.
    pub fn exit_reason(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// Resolves when the process has exited.
    pub async fn exited(&self) -> String {
        let mut rx = self.exit.clone();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return "worker supervisor gone".to_owned();
            }
        }
    }

    /// Kills the process now.
    pub fn kill(&self) {
        if let Some(tx) = lock(&self.kill).take() {
            let _ = tx.send(());
        }
    }

    /// Asks the worker to exit after its current job; kills it after `grace`.
    pub async fn stop(&self, grace: Duration) {
        let _ = self.input.send(ToWorker::Shutdown).await;
        if tokio::time::timeout(grace, self.exited()).await.is_err() {
            tracing::warn!(worker = %self.id, "worker did not stop in time; killing it");
            self.kill();
            self.exited().await;
        }
    }
}

async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<FromWorker>> {
    let len = match r.read_u32().await {
        Ok(n) => n as usize,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    decode_frame(&body).map(Some)
}

async fn write_frames(mut stdin: tokio::process::ChildStdin, mut rx: mpsc::Receiver<ToWorker>) {
    while let Some(msg) = rx.recv().await {
        let Ok(body) = rmp_serde::to_vec_named(&msg) else { continue };
        let mut buf = Vec::with_capacity(body.len() + 4);
        buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
        buf.extend_from_slice(&body);
        if stdin.write_all(&buf).await.is_err() || stdin.flush().await.is_err() {
            break;
        }
    }
}

async fn route_frames(id: String, stdout: ChildStdout, routes: Routes) {
    // Buffered: a streaming worker's frames arrive many per read.
    let mut stdout = BufReader::with_capacity(64 * 1024, stdout);
    loop {
        let frame = match read_frame(&mut stdout).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(worker = %id, error = %e, "bad frame from worker");
                return;
            }
        };
        let (job, msg) = match frame {
            FromWorker::Token { job, id, text } => (job, WorkerMsg::Token(id, text)),
            FromWorker::Finished { job, outcome } => (job, WorkerMsg::Finished(outcome)),
            FromWorker::Failed { job, error } => (job, WorkerMsg::Failed(error)),
            other => {
                tracing::warn!(worker = %id, frame = ?other, "unexpected frame from worker");
                continue;
            }
        };
        let tx = lock(&routes).get(&job).cloned();
        if let Some(tx) = tx {
            // A job whose task is gone simply drops its messages.
            let _ = tx.send(msg).await;
        }
    }
}

async fn log_stderr(id: String, stderr: tokio::process::ChildStderr, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "rbee_worker", worker = %id, "{line}");
        let mut t = lock(&tail);
        if t.len() == STDERR_TAIL {
            t.pop_front();
        }
        t.push_back(line);
    }
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    let t = lock(tail);
    if t.is_empty() {
        String::new()
    } else {
        format!("; its last stderr lines:\n{}", t.iter().cloned().collect::<Vec<_>>().join("\n"))
    }
}

async fn reap(
    id: String,
    mut child: Child,
    kill: oneshot::Receiver<()>,
    exit: watch::Sender<Option<String>>,
    routes: Routes,
    tail: Arc<Mutex<VecDeque<String>>>,
    router: tokio::task::JoinHandle<()>,
) {
    let status = tokio::select! {
        s = child.wait() => s,
        _ = kill => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    // Frames the worker wrote before it died are delivered before the news of its death.
    let _ = tokio::time::timeout(Duration::from_secs(2), router).await;
    let (how, clean) = match status {
        Ok(s) => (format!("worker {id} exited ({s})"), s.success()),
        Err(e) => (format!("worker {id} could not be waited for ({e})"), false),
    };
    if clean {
        tracing::info!(worker = %id, "{how}");
    } else {
        tracing::warn!(worker = %id, "{how}{}", tail_text(&tail));
    }
    let _ = exit.send(Some(how.clone()));
    let txs: Vec<_> = lock(&routes).drain().map(|(_, tx)| tx).collect();
    for tx in txs {
        let _ = tx.send(WorkerMsg::Exited(how.clone())).await;
    }
}
