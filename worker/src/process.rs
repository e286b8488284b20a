//! The worker process: command line, protocol pipe, reader thread and job loop.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use clap::Parser;
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::worker::{read_frame, write_frame, FromWorker, ToWorker};

use rbee_schemas::worker::ModelInfo;

use crate::backend::EngineChoice;
use crate::batch::{serve, Cancels, Frames, Job};
use crate::engine::{device_for, Engine};
use crate::noop::NoopEngine;

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

    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    let cancels = Arc::new(Mutex::new(Cancels::default()));
    spawn_reader(jobs_tx, cancels.clone());

    let mut engine = match load(&args) {
        Ok(e) => e,
        Err(error) => {
            tracing::error!(worker = %args.id, %error, "load failed");
            let _ = write_frame(&mut out, &FromWorker::LoadFailed { error });
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(worker = %args.id, load_ms = engine.info().load_ms, "ready");
    if write_frame(&mut out, &FromWorker::Ready { info: engine.info().clone() }).is_err() {
        return ExitCode::FAILURE;
    }

    let result = match &mut engine {
        Loaded::Llama(e) => serve(e, args.slots as usize, &jobs_rx, &cancels, &mut out),
        Loaded::Noop(e) => serve_noop(e, &jobs_rx, &cancels, &mut out),
    };
    if let Err(error) = result.and_then(|()| out.flush()) {
        tracing::error!(worker = %args.id, %error, "the protocol pipe broke; exiting");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The no-op engine's loop: one job at a time.
fn serve_noop(
    engine: &mut NoopEngine,
    jobs: &mpsc::Receiver<Job>,
    cancels: &Mutex<Cancels>,
    out: &mut impl Write,
) -> std::io::Result<()> {
    for job in jobs {
        let flag = cancels.lock().unwrap_or_else(|p| p.into_inner()).start(job.id);
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
        });
        pipe?;
        cancels.lock().unwrap_or_else(|p| p.into_inner()).end(job.id);
        frames.end(result);
        frames.flush(out)?;
    }
    Ok(())
}

fn load(args: &Args) -> Result<Loaded, JobError> {
    if args.noop {
        tracing::info!(worker = %args.id, "no-op test engine");
        return Ok(Loaded::Noop(NoopEngine::new(args.noop_token_delay)));
    }
    let device = device_for(&args.backend, args.device).map_err(|m| JobError::new(ErrorCode::ModelLoadFailed, m))?;
    let model = args.model.as_deref().ok_or_else(|| JobError::new(ErrorCode::ModelLoadFailed, "no --model given"))?;
    tracing::info!(worker = %args.id, model = %model.display(), backend = %args.backend, engine = ?args.engine, "loading");
    let engine = Engine::load_with(model, device, args.engine)?;
    match engine.fallback_reason() {
        Some(why) => tracing::info!(worker = %args.id, engine = %engine.kind(), "not on the fast engine: {why}"),
        None => tracing::info!(worker = %args.id, engine = %engine.kind(), "engine chosen"),
    }
    if args.slots > 1 && engine.kind() != crate::backend::EngineKind::Fast {
        tracing::warn!(worker = %args.id, slots = args.slots, "the candle engine runs one job at a time; --slots is ignored");
    }
    Ok(Loaded::Llama(Box::new(engine)))
}

/// Duplicates stdout into a file for the protocol and points fd 1 at stderr.
fn take_stdout() -> std::io::Result<File> {
    let proto = std::io::stdout().as_fd().try_clone_to_owned()?;
    rustix::stdio::dup2_stdout(std::io::stderr().as_fd())?;
    Ok(File::from(proto))
}

/// Reads frames from stdin until it closes. Stdin closing means the hive is
/// gone, and the worker exits immediately.
fn spawn_reader(jobs: mpsc::Sender<Job>, cancels: Arc<Mutex<Cancels>>) {
    std::thread::Builder::new()
        .name("rbee-worker-stdin".into())
        .spawn(move || {
            let mut input = BufReader::new(std::io::stdin().lock());
            let mut jobs = Some(jobs);
            loop {
                match read_frame::<_, ToWorker>(&mut input) {
                    Ok(Some(ToWorker::Generate { job, params, resume })) => {
                        if let Some(tx) = &jobs {
                            let _ = tx.send(Job { id: job, params, resume });
                        }
                    }
                    Ok(Some(ToWorker::Cancel { job })) => {
                        cancels.lock().unwrap_or_else(|p| p.into_inner()).cancel(job);
                    }
                    // Finish what was sent, then leave the job loop.
                    Ok(Some(ToWorker::Shutdown)) => jobs = None,
                    Ok(None) => std::process::exit(0),
                    Err(e) => {
                        tracing::error!(error = %e, "bad frame from the hive; exiting");
                        std::process::exit(2);
                    }
                }
            }
        })
        .expect("spawning the stdin reader thread");
}
