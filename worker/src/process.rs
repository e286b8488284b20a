//! The worker process: command line, protocol pipe and job loop.
//!
//! Two threads: the job loop, which reads the hive's frames itself between
//! steps (`HiveInbox`), and a watcher that only waits for the hive's end
//! of stdin to close and then exits the process at once, even mid-step.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::Parser;
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::worker::{read_frame, write_frame, FromWorker, ToWorker};

use rbee_schemas::worker::ModelInfo;

use crate::backend::EngineChoice;
use crate::batch::{serve, Frames, Inbound, Inbox, Job, Queue};
use crate::engine::{device_for, Engine};
use crate::noop::NoopEngine;
use rustix::event::{poll, PollFd, PollFlags};

/// The engine this process runs.
#[derive(Debug)]
enum Loaded {
    Llama(Box<Engine>),
    Noop(NoopEngine),
}

impl Loaded {
    fn info(&self) -> &ModelInfo {
        match self {
            Loaded::Llama(e) => e.info(),
            Loaded::Noop(e) => e.info(),
        }
    }
}

/// rbee's inference process. Started and driven by `rbee-hive`; not meant to be run by hand.
#[derive(Debug, Parser)]
#[command(name = "rbee-worker", version)]
pub struct Args {
    /// Path of the GGUF model file.
    #[arg(long, required_unless_present = "noop")]
    pub model: Option<PathBuf>,
    /// Test mode: load no model; emit `max_tokens` tokens (" t0", " t1", ...).
    #[arg(long, hide = true)]
    pub noop: bool,
    /// Test mode: time per token.
    #[arg(long, hide = true, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub noop_token_delay: std::time::Duration,
    /// Compute backend.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    pub backend: String,
    /// GPU index for cuda and metal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Worker id, for log lines.
    #[arg(long, default_value = "worker")]
    pub id: String,
    /// Inference engine: `fast` (rbee's AVX2 CPU path for llama GGUF), `candle`,
    /// or `auto`: fast when the model, device and CPU allow it, else candle.
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto, env = "RBEE_ENGINE")]
    pub engine: EngineChoice,
    /// Jobs this process runs at once, stepped through the model together
    /// (continuous batching; the fast engine only, candle runs one at a time).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256), env = "RBEE_SLOTS")]
    pub slots: u16,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RBEE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
    // The protocol owns the original stdout; anything printed from here on
    // (by us or by a library) goes to stderr instead of corrupting frames.
    let proto = match take_stdout() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("rbee-worker: cannot set up the protocol pipe: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = BufWriter::new(proto);
    let mut inbox = match HiveInbox::open() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("rbee-worker: cannot set up the protocol pipe: {e}");
            return ExitCode::FAILURE;
        }
    };
    spawn_hangup_watch();

    let mut engine = match load(&args) {
        Ok(e) => e,
        Err(error) => {
            tracing::error!(worker = %args.id, %error, "load failed");
            let _ = write_frame(&mut out, &FromWorker::LoadFailed { error });
            return ExitCode::FAILURE;
        }
    };
    let (engine_name, slots) = match &engine {
        // What `serve` will run at once.
        Loaded::Llama(e) => (e.kind().name(), usize::from(args.slots).clamp(1, e.max_batch()) as u16),
        // The no-op engine runs its jobs in turn but takes as many as asked
        // into its queue, as a batching worker would: it stands in for one
        // when the bench measures dispatch.
        Loaded::Noop(_) => ("noop", args.slots),
    };
    tracing::info!(worker = %args.id, load_ms = engine.info().load_ms, engine = engine_name, slots, "ready");
    let info = ModelInfo { slots: u32::from(slots), ..engine.info().clone() };
    if write_frame(&mut out, &FromWorker::Ready { info }).is_err() {
        return ExitCode::FAILURE;
    }

    let result = match &mut engine {
        Loaded::Llama(e) => serve(e, args.slots as usize, &mut inbox, &mut out),
        Loaded::Noop(e) => serve_noop(e, &mut inbox, &mut out),
    };
    if let Err(error) = result.and_then(|()| out.flush()) {
        tracing::error!(worker = %args.id, %error, "the protocol pipe broke; exiting");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The no-op engine's loop: one job at a time, reading the hive's frames
/// after each token (so a cancel lands within a token, as with a model).
fn serve_noop(engine: &mut NoopEngine, inbox: &mut impl Inbox, out: &mut impl Write) -> std::io::Result<()> {
    let mut q = Queue::default();
    loop {
        q.pump(inbox, true);
        let Some(job) = q.jobs.pop_front() else {
            if q.drained() {
                return Ok(());
            }
            continue;
        };
        let flag = q.cancels.start(job.id);
        let mut frames = Frames::new(job.id);
        let mut pipe = Ok(());
        let result = engine.generate(&job.params, job.resume.as_ref(), &flag, &mut |id, text| {
            frames.token(id, text);
            if pipe.is_ok() {
                pipe = frames.flush(out);
                if pipe.is_err() {
                    // The hive is gone: stop generating for nobody.
                    flag.store(true, Ordering::Relaxed);
                }
            }
            q.pump(inbox, false);
        });
        pipe?;
        q.cancels.end(job.id);
        frames.end(result);
        frames.flush(out)?;
    }
}

fn load(args: &Args) -> Result<Loaded, JobError> {
    if args.noop {
        tracing::info!(worker = %args.id, "no-op test engine");
        return Ok(Loaded::Noop(NoopEngine::new(args.noop_token_delay)));
    }
    let device = device_for(&args.backend, args.device).map_err(|m| JobError::new(ErrorCode::ModelLoadFailed, m))?;
    let model = args.model.as_deref().ok_or_else(|| JobError::new(ErrorCode::ModelLoadFailed, "no --model given"))?;
    tracing::info!(worker = %args.id, model = %model.display(), backend = %args.backend, engine = ?args.engine, "loading");
    let on_gpu = !device.is_cpu();
    let mut engine = Engine::load_with(model, device, args.engine)?;
    if on_gpu {
        warm_up(&mut engine, &args.id)?;
    }
    match engine.fallback_reason() {
        Some(why) => tracing::info!(worker = %args.id, engine = %engine.kind(), "not on the fast engine: {why}"),
        None => tracing::info!(worker = %args.id, engine = %engine.kind(), "engine chosen"),
    }
    if args.slots > 1 && engine.kind() != crate::backend::EngineKind::Fast {
        tracing::warn!(worker = %args.id, slots = args.slots, "the candle engine runs one job at a time; --slots is ignored");
    }
    Ok(Loaded::Llama(Box::new(engine)))
}

/// Runs two short jobs on a GPU before the worker says it is ready: one
/// sampled with the default settings, one greedy (each picks its tokens with
/// other kernels). The driver compiles candle's kernels at their first use:
/// ~10 s of PTX on a fresh H200. Paid here, it is part of loading (within
/// `--load-timeout`, and while a cold start's job waits for the load anyway),
/// not some job's first token, and a worker spawned ahead of time is ready
/// when it says so.
fn warm_up(engine: &mut Engine, id: &str) -> Result<(), JobError> {
    let started = std::time::Instant::now();
    let cancel = std::sync::atomic::AtomicBool::new(false);
    // Longer than most chat prompts' first turn: some kernels are chosen by length.
    let prompt = "Say hello. ".repeat(24);
    for temperature in [None, Some(0.0)] {
        let req = rbee_schemas::job::InferRequest { prompt: Some(prompt.clone()), max_tokens: Some(4), temperature, ..Default::default() };
        let params = req.validate(0)?;
        engine.generate(&params, None, &cancel, &mut |_, _| {}).map_err(|e| {
            JobError::new(ErrorCode::ModelLoadFailed, format!("the model loaded but a first step on the GPU failed: {}", e.message))
        })?;
    }
    tracing::info!(worker = %id, ms = started.elapsed().as_millis() as u64, "warmed up the GPU kernels");
    Ok(())
}

/// Duplicates stdout into a file for the protocol and points fd 1 at stderr.
fn take_stdout() -> std::io::Result<File> {
    let proto = std::io::stdout().as_fd().try_clone_to_owned()?;
    rustix::stdio::dup2_stdout(std::io::stderr().as_fd())?;
    Ok(File::from(proto))
}

/// The hive's frames on stdin, read by the job loop itself. Its own buffer
/// (not std's stdin, whose buffer cannot be looked into), so "has anything
/// arrived?" is the buffer, then a zero-timeout `poll` of the pipe.
struct HiveInbox {
    input: BufReader<File>,
}

impl HiveInbox {
    fn open() -> std::io::Result<Self> {
        let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
        Ok(Self { input: BufReader::with_capacity(64 * 1024, File::from(fd)) })
    }

    fn arrived(&self) -> bool {
        if !self.input.buffer().is_empty() {
            return true;
        }
        let mut fds = [PollFd::new(self.input.get_ref(), PollFlags::IN)];
        let now = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
        // Readable, or closed: either way the read below returns at once.
        matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
    }
}

impl Inbox for HiveInbox {
    /// Stdin closing means the hive is gone: the worker exits at once (the
    /// hangup watch usually sees it first).
    fn next(&mut self, wait: bool) -> Option<Inbound> {
        if !wait && !self.arrived() {
            return None;
        }
        match read_frame::<_, ToWorker>(&mut self.input) {
            Ok(Some(ToWorker::Generate { job, params, resume })) => Some(Inbound::Job(Job { id: job, params, resume })),
            Ok(Some(ToWorker::Cancel { job })) => Some(Inbound::Cancel(job)),
            Ok(Some(ToWorker::Shutdown)) => Some(Inbound::Shutdown),
            Ok(None) => std::process::exit(0),
            Err(e) => {
                tracing::error!(error = %e, "bad frame from the hive; exiting");
                std::process::exit(2);
            }
        }
    }
}

/// Exits the process as soon as the hive's end of stdin closes (the hive
/// is gone), whatever the job loop is doing: `poll` with no events still
/// reports a hangup, and reads nothing, so the job loop's reads are untouched.
fn spawn_hangup_watch() {
    std::thread::Builder::new()
        .name("rbee-worker-hangup".into())
        .spawn(|| {
            let stdin = std::io::stdin();
            loop {
                let mut fds = [PollFd::new(&stdin, PollFlags::empty())];
                match poll(&mut fds, None) {
                    Ok(_) if !fds[0].revents().is_empty() => std::process::exit(0),
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "cannot watch stdin; the worker exits when the hive's next frame fails");
                        return;
                    }
                }
            }
        })
        .expect("spawning the stdin hangup watch thread");
}
