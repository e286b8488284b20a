//! `rbee-hive`: the agent on every machine that runs models.
//!
//! It connects to NATS, makes sure the streams and buckets exist, and claims
//! inference jobs from the shared `rbee-infer` pull consumer, never more than
//! its free slots ([`claimer`]). Each job runs in its own task ([`job`]): it is
//! validated, its model found in the redb catalog ([`catalog`]), a worker
//! process leased from the pool ([`pool`], [`worker_proc`]) — started on a
//! cold start, reused on a warm one — and the worker's tokens are published as
//! the job's events ([`events`]). The hive heartbeats into the `rbee-hives`
//! bucket ([`heartbeat`]).
//!
//! Concurrency: one claimer task, one task per job (tracked), one heartbeat
//! task, and a handful of tasks per worker process. Shutdown (SIGTERM/Ctrl-C):
//! stop claiming, let running jobs finish within the drain timeout, hand the
//! rest back to the queue, stop the workers, remove the heartbeat, drain the
//! NATS connection.

pub mod catalog;
pub mod claimer;
pub mod ctl;
pub mod events;
pub mod fleet;
pub mod gpu;
pub mod heartbeat;
pub mod job;
pub mod logs;
pub mod models;
pub mod pool;
pub mod puller;
pub mod running;
pub mod sweeper;
pub mod system;
pub mod worker_proc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Parser;
use rbee_schemas::hive::HiveInfo;
use rbee_schemas::subjects;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Locks `m`. A panic while it was held leaves the data usable: every
/// critical section in this crate is one read, insert or remove.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// rbee's per-machine agent: claims inference jobs from NATS JetStream and runs them on worker processes.
#[derive(Debug, Clone, Parser)]
#[command(name = "rbee-hive", version)]
pub struct HiveArgs {
    /// NATS server to attach to.
    #[arg(long, env = "RBEE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// This hive's id (default: the host name, dots replaced by dashes). Unique in the fleet: a hive
    /// will not start under the id of a live one.
    #[arg(long, env = "RBEE_HIVE_ID")]
    pub hive_id: Option<String>,
    /// Data directory: catalog and models (default: $RBEE_HOME, else ~/.local/share/rbee).
    #[arg(long, env = "RBEE_HOME")]
    pub data_dir: Option<PathBuf>,
    /// Where model files live (default: the data directory's models/).
    #[arg(long, env = "RBEE_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// Jobs this hive runs at once. A worker on the fast engine steps its
    /// model's concurrent jobs through the weights together (up to
    /// --worker-slots), so four at once cost far less than four times one.
    #[arg(long, env = "RBEE_HIVE_SLOTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub slots: u32,
    /// The rbee-worker binary (default: next to rbee-hive).
    #[arg(long, env = "RBEE_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
    /// Jobs one worker runs at once, batched through the model (default: --slots).
    /// The candle engine and the no-op engine take them one after another.
    #[arg(long, env = "RBEE_WORKER_SLOTS", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub worker_slots: Option<u32>,
    /// Compute backend for workers.
    #[arg(long, env = "RBEE_BACKEND", default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    pub backend: String,
    /// Inference engine for this hive's workers: `auto` (rbee's fast CPU engine where the model and the
    /// CPU allow it, else candle), `fast` or `candle`. The fast engine holds Q4_K, Q5_0/Q5_1/Q5_K and
    /// Q6_K weights widened (up to ~1.6× the file in memory); candle keeps the file's size but runs
    /// several times slower on a CPU. Memory estimates follow the choice.
    #[arg(long, env = "RBEE_ENGINE", default_value = "auto", value_parser = ["auto", "fast", "candle"])]
    pub worker_engine: String,
    /// GPU index for cuda and metal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Compute threads per worker (default: all cores).
    #[arg(long, env = "RBEE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Attempts a job gets when its worker keeps dying.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Start a worker here for a model another hive serves once one of its jobs has waited this
    /// long in the queue (that hive is busy), if the model fits; at most one hive per model
    /// does so every 15 s. 0s: never (add workers with `rbee workers spawn`).
    #[arg(long, env = "RBEE_SCALE_OUT_AFTER", default_value = "2s", value_parser = humantime::parse_duration)]
    pub scale_out_after: Duration,
    /// On shutdown, how long running jobs may take to finish before they are handed back.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// How long a worker may take to load its model.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub load_timeout: Duration,
    /// Delay before the first retry of a job whose worker died; doubled per attempt (at most 30 s).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,
    /// Queue capacity (jobs) when this hive creates the jobs stream; a full queue refuses new jobs (QUEUE_FULL).
    #[arg(long, env = "RBEE_QUEUE_MAX_JOBS", default_value_t = 100_000)]
    pub queue_max_jobs: i64,
    /// How long a claimed job may go without an ack or progress before the broker redelivers it
    /// (when this hive creates the consumers).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub ack_wait: Duration,
    /// How long a job id is remembered for de-duplication, when this hive creates the jobs stream.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub dedup_window: Duration,
    /// Memory budget for this hive's workers (e.g. 8GiB, 512MB); 0 = only the machine's free memory.
    #[arg(long, env = "RBEE_MEMORY_LIMIT", default_value = "0", value_parser = parse_bytes)]
    pub memory_limit: u64,
    /// Free disk space a model download must leave where the models go (e.g. 10GiB): checked before
    /// it starts and while it runs; one that would leave less fails INSUFFICIENT_DISK (one sent to
    /// any hive goes to a hive with room for it, if there is one).
    #[arg(long, env = "RBEE_DISK_RESERVE", default_value = "1GiB", value_parser = parse_bytes)]
    pub disk_reserve: u64,
    /// How long an idle worker stays loaded (jobs may say otherwise with keep_alive_ms); "-1" = for ever,
    /// and never stopped to make room for another model.
    #[arg(long, env = "RBEE_KEEP_ALIVE", default_value = "5m", value_parser = parse_keep_alive, allow_hyphen_values = true)]
    pub keep_alive: i64,
    /// When models that do not fit here together both have jobs waiting, the shortest time a worker
    /// keeps serving before it is drained (no new jobs, stopped once idle) for the other model; a
    /// worker that took long to load keeps its turn four times its load time if that is longer.
    /// Workers with keep-alive -1 are never drained.
    #[arg(long, env = "RBEE_MIN_TURN", default_value = "5s", value_parser = humantime::parse_duration)]
    pub min_turn: Duration,
    /// The Hugging Face hub to download models from.
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub hf_endpoint: String,
    /// Lifecycle jobs (downloads, imports, worker spawns) this hive runs at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub ctl_slots: u32,
    /// Offer the no-op test model `noop` (no weights; emits " t0", " t1", ...). For tests and benchmarks.
    #[arg(long, hide = true)]
    pub test_noop_model: bool,
    /// Test mode for a CUDA hive: fixed GPU readings `NAME:TOTAL_MIB:FREE_MIB`
    /// instead of NVML's, to test placement by GPU memory without a GPU.
    #[arg(long, hide = true, value_parser = gpu::parse_test_gpu)]
    pub test_gpu: Option<(String, gpu::Memory)>,
    /// Test mode: this many bytes free where the models go, instead of what
    /// the disk says (downloads and heartbeats), to test placement by disk.
    #[arg(long, hide = true, value_parser = parse_bytes)]
    pub test_disk_free: Option<u64>,
    /// Time per token of the no-op test model.
    #[arg(long, hide = true, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub noop_token_delay: Duration,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size like 8GiB or 512MB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        u => return Err(format!("unknown unit {u:?} in {s:?}")),
    };
    Ok((n * mult) as u64)
}

fn parse_keep_alive(s: &str) -> Result<i64, String> {
    if s.trim() == "-1" {
        return Ok(-1);
    }
    humantime::parse_duration(s).map(|d| d.as_millis() as i64).map_err(|e| e.to_string())
}

/// Logs to stderr (`RBEE_LOG` sets the filter, default `info`) and, once
/// connected, to `rbee.logs.<hive id>` at info and above ([`logs`]).
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("RBEE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    use std::io::IsTerminal;
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter);
    let bus = logs::BusLayer.with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let _ = tracing_subscriber::registry().with(stderr).with(bus).try_init();
}

/// A token cancelled on SIGTERM or Ctrl-C (SIGINT).
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("interrupted: shutting down"),
        }
        t.cancel();
    });
    token
}

pub(crate) fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

fn default_worker_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("rbee-worker")))
        .unwrap_or_else(|| PathBuf::from("rbee-worker"))
}

async fn connect(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    let started = Instant::now();
    loop {
        let opts = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(3))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    async_nats::Event::SlowConsumer(sid) => tracing::warn!(sid, "slow consumer: messages dropped"),
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            });
        match opts.connect(url).await {
            Ok(c) => return Ok(c),
            Err(e) if started.elapsed() > Duration::from_secs(30) => {
                return Err(e).with_context(|| format!("cannot reach NATS at {url} (is nats-server running? set --nats-url or RBEE_NATS_URL)"))
            }
            Err(e) => {
                tracing::debug!(error = %e, "NATS not reachable yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Runs the hive until `shutdown` is cancelled, then shuts down in order.
pub async fn run(args: HiveArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let hive_id = args.hive_id.clone().unwrap_or_else(rbee_broker::default_hive_id);
    anyhow::ensure!(
        rbee_schemas::job::is_valid_job_id(&hive_id) && hive_id != rbee_schemas::ctl::ANY_HIVE,
        "hive id {hive_id:?} may only contain A-Z a-z 0-9 _ - and may not be \"any\" (set --hive-id)"
    );
    let home = args.data_dir.clone().unwrap_or_else(rbee_broker::rbee_home);
    let models_dir = args.models_dir.clone().unwrap_or_else(|| home.join("models"));
    let catalog_path = home.join("hives").join(&hive_id).join("catalog.redb");
    let mut catalog = catalog::Catalog::open(&catalog_path, &models_dir).map_err(anyhow::Error::msg)?;
    if args.test_noop_model {
        catalog.enable_noop_model();
    }
    let catalog = Arc::new(catalog);
    // Entries from before rbee counted the weights' loaded size.
    let filled = {
        let catalog = Arc::clone(&catalog);
        tokio::task::spawn_blocking(move || models::fill_weight_sizes(&catalog)).await
    };
    match filled {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(models = n, "counted the loaded size of models registered before this version"),
        Ok(Err(e)) => tracing::warn!(error = %e.message, "could not update the catalog's model sizes; their memory estimates use the file size"),
        Err(e) => tracing::warn!(error = %e, "could not update the catalog's model sizes"),
    }

    let client = connect(&args.nats_url, &format!("rbee-hive {hive_id}")).await?;
    let js = jetstream::new(client.clone());
    let limits = rbee_broker::Limits {
        jobs_max_msgs: args.queue_max_jobs,
        duplicate_window: args.dedup_window,
        ack_wait: args.ack_wait,
        ..rbee_broker::Limits::default()
    };
    let broker = rbee_broker::ensure(&js, &limits).await?;
    let host = hostname();
    let taken_over = tokio::select! {
        free = heartbeat::ensure_id_free(&broker.hives, &hive_id, &host, std::process::id()) => free?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    // Only once the id is this hive's: a hive refused for a live one's id
    // must not write into that one's `rbee logs`.
    logs::start(client.clone(), &hive_id);
    if let Some(old) = taken_over {
        tracing::warn!(
            host = %old.hostname, pid = old.pid,
            "hive id {hive_id} was last used by a hive that stopped without signing off; taking it over"
        );
    }
    let mut infer = broker.infer.clone();
    let ack_wait = infer.info().await.map(|i| i.config.ack_wait).unwrap_or(Duration::from_secs(30));
    let running = Arc::new(running::Running::default());
    running::listen(client.clone(), running.clone()).await?;

    // Models go to this GPU's memory on a CUDA hive whose VRAM can be read.
    let gpu = match &args.test_gpu {
        Some((name, memory)) if args.backend == "cuda" => Some(gpu::Gpu::fixed(args.device, name, *memory)),
        _ => gpu::Gpu::open(&args.backend, args.device),
    }
    .map(Arc::new);
    let pool = pool::Pool::new(pool::PoolConfig {
        hive_id: hive_id.clone(),
        worker_bin: args.worker_bin.clone().unwrap_or_else(default_worker_bin),
        backend: args.backend.clone(),
        engine: args.worker_engine.clone(),
        device: args.device,
        threads: args.worker_threads,
        load_timeout: args.load_timeout,
        noop_token_delay: args.noop_token_delay,
        keep_alive_ms: args.keep_alive,
        worker_slots: args.worker_slots.unwrap_or(args.slots).min(64),
        min_turn: args.min_turn,
    });
    pool.set_registry(broker.workers.clone());
    tokio::spawn(pool.clone().maintain());
    let fleet = Arc::new(fleet::Fleet::new(&hive_id, broker.hives.clone(), broker.leases.clone()));
    fleet.clone().follow_from_start(Duration::from_secs(2)).await;
    let slots = claimer::Slots::new(args.slots as usize);
    // Also notified by the pool when a worker starts, is ready or is gone.
    let beat_now = pool.beat_signal();
    let hand_back = CancellationToken::new();
    let ctx = Arc::new(job::JobCtx {
        hive_id: hive_id.clone(),
        client: client.clone(),
        js: js.clone(),
        records: rbee_broker::records::Records::new(broker.job_records.clone()),
        events: broker.events.clone(),
        catalog,
        pool: pool.clone(),
        fleet: fleet.clone(),
        running,
        beat_now: beat_now.clone(),
        memory_limit: args.memory_limit,
        gpu: gpu.clone(),
        downloader: models::Downloader {
            endpoint: args.hf_endpoint.trim_end_matches('/').to_owned(),
            cache_dir: models_dir.join("hf"),
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
            attempts: 4,
            disk_reserve: args.disk_reserve,
            fixed_free: args.test_disk_free,
            too_big: Default::default(),
        },
        ack_wait,
        max_attempts: args.max_attempts,
        retry_backoff: args.retry_backoff,
        hand_back: hand_back.clone(),
        leaves: claimer::Leaves::default(),
        scaling: job::place::ScaleOut::new(args.scale_out_after),
        served_elsewhere: job::place::ServedElsewhere::default(),
    });
    let sweep_stop = CancellationToken::new();
    let sweeping = tokio::spawn(sweeper::run(ctx.clone(), broker.jobs.clone(), sweep_stop.clone()));

    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let heartbeat = heartbeat::Heartbeat {
        js: js.clone(),
        store: broker.hives.clone(),
        base: HiveInfo {
            v: rbee_schemas::PROTOCOL_VERSION,
            hive_id: hive_id.clone(),
            version: rbee_schemas::RBEE_VERSION.to_owned(),
            protocol: rbee_schemas::PROTOCOL_VERSION,
            hostname: hostname(),
            pid: std::process::id(),
            started_at_ms: now_ms,
            updated_at_ms: now_ms,
            slots: args.slots,
            busy: 0,
            backends: vec![args.backend.clone()],
            devices: vec![pool::device_label(&args.backend, args.device)],
            gpu_name: gpu.as_ref().map(|g| g.name.clone()).unwrap_or_default(),
            ram_total: 0,
            ram_free: 0,
            memory_limit: args.memory_limit,
            memory_used: 0,
            memory_pending: 0,
            vram_total: 0,
            vram_free: 0,
            disk_free: 0,
            disk_reserve: args.disk_reserve,
            workers: vec![],
            models: vec![],
        },
        downloader: ctx.downloader.clone(),
        pool: pool.clone(),
        slots: slots.permits.clone(),
        catalog: ctx.catalog.clone(),
        fleet: fleet.clone(),
        gpu: gpu.clone(),
        beat_now: beat_now.clone(),
    };
    let beat_stop = CancellationToken::new();
    let beats = tokio::spawn(heartbeat.clone().run(beat_stop.clone()));

    let tracker = TaskTracker::new();
    let claimer = claimer::Claimer { client: client.clone(), js: js.clone(), stream: subjects::JOBS_STREAM.to_owned(), slots, leaves: ctx.leaves.clone() };
    let jobs = tracker.clone();
    let job_ctx = ctx.clone();
    let claiming = tokio::spawn(claimer.run(shutdown.clone(), move |msg, lane, slot| {
        jobs.spawn(job::handle(job_ctx.clone(), msg, lane, slot));
    }));
    // Lifecycle jobs: this hive's own consumer and the shared `any` one.
    let own_ctl = rbee_schemas::ctl::ctl_consumer(&hive_id);
    rbee_broker::ensure_consumer(&broker.jobs, rbee_broker::ctl_consumer(&limits, &hive_id)).await?;
    let ctl_jobs = tracker.clone();
    let ctl_ctx = ctx.clone();
    let ctl_client = client.clone();
    let ctl_js = js.clone();
    let ctl_stop = shutdown.clone();
    let ctl_slots = claimer::Slots::new(args.ctl_slots as usize);
    let ctl_claiming = tokio::spawn(async move {
        let consumers = [own_ctl.as_str(), rbee_schemas::ctl::CTL_ANY_CONSUMER];
        claimer::claim_ctl(ctl_client, ctl_js, subjects::JOBS_STREAM, &consumers, ctl_slots, ctl_stop, move |msg, slot| {
            ctl_jobs.spawn(ctl::handle(ctl_ctx.clone(), msg, slot));
        })
        .await
    });
    match gpu.as_ref().and_then(|g| Some((g, g.memory()?))) {
        Some((g, m)) => tracing::info!(
            hive = %hive_id, nats = %args.nats_url, slots = args.slots, gpu = %g.label,
            vram_free = %system::human(m.free), vram_total = %system::human(m.total), "hive ready; models are placed by GPU memory"
        ),
        None => tracing::info!(hive = %hive_id, nats = %args.nats_url, slots = args.slots, "hive ready"),
    }

    shutdown.cancelled().await;
    tracing::info!(timeout = ?args.drain_timeout, "draining: no new jobs; waiting for running ones");
    let drained = tokio::time::timeout(args.drain_timeout, async {
        match claiming.await {
            Ok(Err(e)) => tracing::error!(error = %e, "claimer stopped with an error"),
            Err(e) => tracing::error!(error = %e, "claimer task failed"),
            Ok(Ok(())) => {}
        }
        match ctl_claiming.await {
            Ok(Err(e)) => tracing::error!(error = %e, "lifecycle claimer stopped with an error"),
            Err(e) => tracing::error!(error = %e, "lifecycle claimer task failed"),
            Ok(Ok(())) => {}
        }
        tracker.close();
        tracker.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("drain timeout: handing running jobs back to the queue");
        hand_back.cancel();
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await.is_err() {
            tracing::error!("jobs did not hand back in time; their messages return after ack_wait");
        }
    }
    pool.shutdown(Duration::from_secs(5)).await;
    fleet.release_all().await;
    sweep_stop.cancel();
    let _ = sweeping.await;
    beat_stop.cancel();
    let _ = beats.await;
    client.drain().await.context("draining the NATS connection")?;
    tracing::info!("hive stopped");
    Ok(())
}
