//! The worker process: command line, protocol pipe, reader thread and job loop.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use clap::Parser;
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::job::GenerateParams;
use rbee_schemas::worker::{read_frame, write_frame, FromWorker, ToWorker};

use rbee_schemas::record::Resume;
use rbee_schemas::worker::{ModelInfo, Outcome};

use crate::engine::{device_for, Engine, OnToken};
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

    fn generate(
        &mut self,
        params: &GenerateParams,
        resume: Option<&Resume>,
        cancel: &AtomicBool,
        on_token: &mut OnToken<'_>,
    ) -> Result<Outcome, JobError> {
        match self {
            Loaded::Llama(e) => e.generate(params, resume, cancel, on_token),
            Loaded::Noop(e) => e.generate(params, resume, cancel, on_token),
        }
    }
}

type Job = (u64, GenerateParams, Option<Resume>);

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
}

/// Jobs waiting for the generation thread and the cancel flags of started ones.
#[derive(Debug, Default)]
struct Cancels {
    running: HashMap<u64, Arc<AtomicBool>>,
    early: HashSet<u64>,
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

    for (job, params, resume) in jobs_rx {
        let flag = Arc::new(AtomicBool::new(false));
        {
            let mut c = cancels.lock().unwrap_or_else(|p| p.into_inner());
            if c.early.remove(&job) {
                flag.store(true, Ordering::Relaxed);
            }
            c.running.insert(job, flag.clone());
        }
        let mut pipe_ok = true;
        let mut carry = String::new();
        let result = engine.generate(&params, resume.as_ref(), &flag, &mut |id, text| {
            let Some(id) = id else {
                carry.push_str(text); // released without a token: goes with the next frame
                return;
            };
            let text = if carry.is_empty() { text.to_owned() } else { std::mem::take(&mut carry) + text };
            if pipe_ok && write_frame(&mut out, &FromWorker::Token { job, id, text }).is_err() {
                pipe_ok = false;
                // The hive is gone: stop generating for nobody.
                flag.store(true, Ordering::Relaxed);
            }
        });
        if pipe_ok && !carry.is_empty() {
            // Text released at the very end (held back for a stop string that never came).
            pipe_ok = write_frame(&mut out, &FromWorker::Token { job, id: u32::MAX, text: carry }).is_ok();
        }
        cancels.lock().unwrap_or_else(|p| p.into_inner()).running.remove(&job);
        let frame = match result {
            Ok(outcome) => FromWorker::Finished { job, outcome },
            Err(error) => FromWorker::Failed { job, error },
        };
        if !pipe_ok || write_frame(&mut out, &frame).is_err() {
            return ExitCode::FAILURE;
        }
    }
    let _ = out.flush();
    ExitCode::SUCCESS
}

fn load(args: &Args) -> Result<Loaded, JobError> {
    if args.noop {
        tracing::info!(worker = %args.id, "no-op test engine");
        return Ok(Loaded::Noop(NoopEngine::new(args.noop_token_delay)));
    }
    let device = device_for(&args.backend, args.device).map_err(|m| JobError::new(ErrorCode::ModelLoadFailed, m))?;
    let model = args.model.as_deref().ok_or_else(|| JobError::new(ErrorCode::ModelLoadFailed, "no --model given"))?;
    tracing::info!(worker = %args.id, model = %model.display(), backend = %args.backend, "loading");
    Engine::load(model, device).map(|e| Loaded::Llama(Box::new(e)))
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
                            let _ = tx.send((job, params, resume));
                        }
                    }
                    Ok(Some(ToWorker::Cancel { job })) => {
                        let mut c = cancels.lock().unwrap_or_else(|p| p.into_inner());
                        match c.running.get(&job) {
                            Some(flag) => flag.store(true, Ordering::Relaxed),
                            None => {
                                c.early.insert(job);
                            }
                        }
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
