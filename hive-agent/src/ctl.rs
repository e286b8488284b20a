//! Lifecycle jobs (`rbee.jobs.ctl.<hive>` and `rbee.jobs.ctl.any`): model
//! download, import and delete, worker spawn and stop.
//!
//! They keep the inference jobs' contract: the job is claimed in its record
//! first (so a redelivered or resubmitted job is not run twice), progress goes
//! out as `progress` events, and exactly one terminal event ends it: `done`
//! with stop reason `completed` and a `result` object, or `error`. The record
//! is written before the terminal event, the message acked after it. A job
//! that cannot run as sent is terminated, never redelivered. While one runs
//! the hive sends in-progress acks; it can be cancelled (`rbee jobs cancel`),
//! and a hive that drains hands it back (a download resumes where it stopped).
//!
//! `worker.spawn` sent to `any` is placed like an inference job: it is left
//! for a hive that has the model when this one does not, or for one with the
//! memory when it does not fit here.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use rbee_schemas::ctl::{CtlRequest, ANY_HIVE};
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::event::{Done, EventBody, Progress, StopReason, Timings, Usage};
use rbee_schemas::model::{HfRef, ModelRef};
use rbee_schemas::record::JobState;
use rbee_schemas::subjects::Lane;
use rbee_schemas::PROTOCOL_VERSION;
use serde_json::{json, Value};
use tracing::Instrument;

use crate::catalog::ModelEntry;
use crate::claimer::SlotGuard;
use crate::events::EventSink;
use crate::job::claim::{claim, Claim};
use crate::job::place::{place, Decision, Mode};
use crate::job::run::Run;
use crate::job::{envelope, JobCtx};
use crate::models::{self, Transfer};
use crate::pool::StartOptions;
use crate::system::human;

/// How often a running download reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// The longest a download left for a hive with more free disk stays out of the queue.
const LEAVE_FOR_DISK: Duration = Duration::from_secs(1);
/// How long a handed-back download's part file may stay locked by the try that just stopped.
const PART_LOCK_WAIT: Duration = Duration::from_secs(3);

enum Outcome {
    Done(Value),
    Failed(JobError),
    Cancelled,
    HandBack,
}

/// Runs one claimed lifecycle job to its end.
pub async fn handle(ctx: Arc<JobCtx>, msg: jetstream::Message, slot: SlotGuard) {
    let claimed = Instant::now();
    let to_any = msg.subject.rsplit('.').next() == Some(ANY_HIVE);
    let Some((env, _probe, encoding_error)) = envelope(&msg, Lane::Interactive) else {
        let _ = msg.ack_with(AckKind::Term).await;
        return;
    };
    let span = tracing::info_span!("ctl", job_id = %env.job_id);
    // Instrumented, not entered (see `job::handle`).
    handle_in_span(ctx, msg, slot, claimed, to_any, env, encoding_error).instrument(span).await
}

async fn handle_in_span(
    ctx: Arc<JobCtx>,
    msg: jetstream::Message,
    slot: SlotGuard,
    claimed: Instant,
    to_any: bool,
    mut env: crate::job::Envelope,
    encoding_error: Option<String>,
) {
    let mut req = match encoding_error {
        Some(e) => Err(JobError::invalid(e)),
        None => decode(&env, &msg.payload),
    };
    if let Ok(r) = &req {
        env.model_key = match r {
            CtlRequest::ModelDownload { model, .. } | CtlRequest::ModelDelete { model, .. } | CtlRequest::WorkerSpawn { model, .. } => {
                model.clone()
            }
            CtlRequest::ModelImport { alias, .. } => alias.clone(),
            CtlRequest::WorkerStop { worker, .. } => worker.clone(),
        };
    }
    // A spawn is placed before the record is touched: one left for another
    // hive must reach it untouched.
    let mut spawn_entry = None;
    // Memory set aside for the worker, held until the spawn is done.
    let mut _reservation = None;
    if let Ok(CtlRequest::WorkerSpawn { model, .. }) = &req {
        let mode = if to_any { Mode::SpawnAny } else { Mode::SpawnHere };
        match ModelRef::parse(model) {
            Ok(m) => match place(&ctx, &m, mode).await {
                Decision::Go(entry, reservation) => {
                    spawn_entry = Some(entry);
                    _reservation = reservation;
                }
                Decision::Defer { delay, why } => {
                    crate::job::place::leave(&ctx, &msg, delay, &why, "spawn").await;
                    return;
                }
                Decision::Fail(e) => req = Err(e),
            },
            Err(e) => req = Err(JobError::invalid(e.to_string())),
        }
    }
    // A download sent to `any` that this hive's disk has no room for goes
    // to a hive with more room, untouched, as a spawn does: when this disk
    // is below its reserve, or when an earlier try here found the file
    // bigger than the room (see the end of this function).
    if let (Ok(CtlRequest::ModelDownload { model, alias, .. }), true) = (&req, to_any) {
        let need = ctx.downloader.too_big(&env.job_id).map(|t| t.size);
        if let Some(room) = ctx.downloader.short_of(need.unwrap_or(0)) {
            // A model already here needs no disk (the job answers
            // `already_present`), and a bad request fails here as anywhere.
            let here = match Target::of(model, alias.clone()) {
                Ok(t) => already_here(&ctx, &t).await,
                Err(e) => Err(e),
            };
            if let (Ok(None), Some(h)) = (here, roomier_hive(&ctx, room, need.unwrap_or(0))) {
                let file = need.map(|n| format!("the file is {}, ", human(n))).unwrap_or_default();
                let why = format!("{file}the disk here has room for {}; hive {} has {}", human(room), h.hive_id, human(h.disk_room()));
                crate::job::place::leave(&ctx, &msg, LEAVE_FOR_DISK, &why, "download").await;
                return;
            }
        }
    }
    let registration = ctx.running.register(&env.job_id);
    let claimed_record = claim(&ctx, &env, None).await;
    let run = Run::new(&ctx, &msg, &env, claimed, registration.cancelled.clone());
    let Claim::Run { next_seq, record, revision, .. } = claimed_record else {
        // Ended before, duplicate, cancelled while waiting, records unavailable:
        // handled as for any job.
        return run.go(claimed_record, Err(JobError::internal("not run")), slot, None).await;
    };
    run.wrote(revision);
    let mut sink = EventSink::new(ctx.client.clone(), &env.reply_to, &env.job_id, env.encoding, next_seq);
    let outcome = match req {
        Err(e) => Outcome::Failed(e),
        Ok(req) => {
            tracing::info!(op = req.op(), "lifecycle job");
            let op = execute(&ctx, req, spawn_entry, &env.job_id, &mut sink);
            tokio::pin!(op);
            let mut progress = crate::job::progress_acks(ctx.ack_wait);
            loop {
                tokio::select! {
                    r = &mut op => break r,
                    _ = progress.tick() => { let _ = msg.ack_with(AckKind::Progress).await; }
                    _ = run.cancel.cancelled() => break Outcome::Cancelled,
                    _ = ctx.hand_back.cancelled() => break Outcome::HandBack,
                }
            }
        }
    };
    let timings = Timings { queued_ms: env.queued_ms, ..Timings::default() };
    match outcome {
        Outcome::Done(result) => {
            let done = Done { timings, ..Done::completed(result) };
            run.end(&mut sink, record, JobState::Done, EventBody::Done(done), AckKind::Ack).await;
        }
        // Too big for this disk once its size was known: a download sent to
        // `any` goes back to the queue for a hive with room, which takes it
        // over as its next attempt; this hive now leaves it (above).
        Outcome::Failed(e)
            if to_any
                && e.code == ErrorCode::InsufficientDisk
                && ctx.downloader.too_big(&env.job_id).is_some_and(|t| roomier_hive(&ctx, ctx.downloader.room().unwrap_or(0), t.size).is_some()) =>
        {
            tracing::info!(message = %e.message, "handing the download back for a hive with more room");
            sink.flush().await;
            crate::job::place::leave(&ctx, &msg, LEAVE_FOR_DISK, &e.message, "download").await;
            // What it wrote here would hold the disk this hive is short of.
            if let Some(t) = ctx.downloader.too_big(&env.job_id) {
                let downloader = ctx.downloader.clone();
                if let Ok(Some(freed)) = blocking(move || Ok(downloader.drop_partial(&t.hf, t.size, PART_LOCK_WAIT))).await {
                    tracing::info!(freed = %human(freed), "deleted the unfinished download's part file");
                }
            }
        }
        Outcome::Failed(e) => {
            tracing::info!(code = %e.code, message = %e.message, "lifecycle job failed");
            run.end(&mut sink, record, JobState::Failed, e.into(), AckKind::Term).await;
        }
        Outcome::Cancelled => {
            let done = Done::generation(StopReason::Cancelled, Usage::default(), timings, 0);
            run.end(&mut sink, record, JobState::Cancelled, EventBody::Done(done), AckKind::Term).await;
        }
        Outcome::HandBack => {
            sink.flush().await;
            let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
        }
    }
    drop(slot);
}

fn decode(env: &crate::job::Envelope, payload: &[u8]) -> Result<CtlRequest, JobError> {
    let req: CtlRequest = env.encoding.decode(payload).map_err(|e| JobError::invalid(format!("invalid lifecycle job body: {e}")))?;
    let v = req.version();
    if v != PROTOCOL_VERSION {
        return Err(JobError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "the job speaks rbee protocol v{v}; this hive (rbee {}) speaks v{PROTOCOL_VERSION}. \
                 Upgrade the older side so both speak the same protocol",
                rbee_schemas::RBEE_VERSION
            ),
        ));
    }
    req.validate()?;
    Ok(req)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, JobError> + Send + 'static) -> Result<T, JobError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| JobError::internal(e.to_string()))?
}

fn summary(hive: &str, e: &ModelEntry) -> Value {
    json!({
        "hive": hive,
        "model": e.key,
        "source": e.source,
        "path": e.path,
        "format": e.format,
        "architecture": e.architecture,
        "quantization": e.quantization,
        "size": e.size,
        "sha256": e.sha256,
    })
}

async fn progress(sink: &mut EventSink, stage: &str, done: u64, total: u64, rate: f64, message: Option<String>) {
    let _ = sink.emit(EventBody::Progress(Progress { stage: stage.to_owned(), done, total, rate, message })).await;
}

async fn execute(ctx: &JobCtx, req: CtlRequest, spawn_entry: Option<ModelEntry>, job_id: &str, sink: &mut EventSink) -> Outcome {
    let changes_catalog = matches!(req, CtlRequest::ModelDownload { .. } | CtlRequest::ModelImport { .. } | CtlRequest::ModelDelete { .. });
    let r = match req {
        CtlRequest::ModelDownload { model, alias, .. } => download(ctx, &model, alias, job_id, sink).await,
        CtlRequest::ModelImport { path, alias, .. } => import(ctx, path, alias).await,
        CtlRequest::ModelDelete { model, force, .. } => delete(ctx, &model, force).await,
        CtlRequest::WorkerSpawn { backend, device, keep_alive_ms, .. } => match spawn_entry {
            Some(entry) => spawn(ctx, entry, StartOptions { backend, device, keep_alive_ms }, sink).await,
            None => Err(JobError::internal("spawn without a placed model")),
        },
        CtlRequest::WorkerStop { worker, .. } => ctx
            .pool
            .stop(&worker)
            .await
            .map(|w| json!({ "hive": ctx.hive_id, "worker": w.proc.id, "model": w.entry.key, "stopped": true })),
    };
    match r {
        Ok(v) => {
            if changes_catalog {
                ctx.beat_now.notify_one();
            }
            Outcome::Done(v)
        }
        Err(e) => Outcome::Failed(e),
    }
}

async fn download(ctx: &JobCtx, model: &str, alias: Option<String>, job_id: &str, sink: &mut EventSink) -> Result<Value, JobError> {
    let target = Target::of(model, alias)?;
    if let Some(e) = already_here(ctx, &target).await? {
        let mut v = summary(&ctx.hive_id, &e);
        v["already_present"] = json!(true);
        return Ok(v);
    }
    let Target { hf, known, key, .. } = target;

    let transfer = Transfer::default();
    ctx.downloader.check_room(&transfer)?;
    let fetch = ctx.downloader.fetch(&hf, &transfer);
    tokio::pin!(fetch);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    // No room once the size is known (the check, or a full disk): noted, so
    // a download sent to `any` can go to a hive with room (`handle_in_span`).
    let too_big = |e: JobError| {
        let size = transfer.total.load(Ordering::Relaxed);
        if e.code == ErrorCode::InsufficientDisk && size > 0 {
            ctx.downloader.note_too_big(job_id, &hf, size);
        }
        e
    };
    let (path, size, sha, file) = loop {
        tokio::select! {
            r = &mut fetch => break r.map_err(too_big)?,
            _ = tick.tick() => {
                // Dropping the download (returning) stops it.
                ctx.downloader.check_room(&transfer).map_err(too_big)?;
                let (done, total) = (transfer.done.load(Ordering::Relaxed), transfer.total.load(Ordering::Relaxed));
                if total > 0 && done != last.1 {
                    let rate = (done.saturating_sub(last.1)) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
                    last = (Instant::now(), done);
                    progress(sink, "download", done, total, rate, None).await;
                }
            }
        }
    };
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    progress(sink, "download", size, size, transfer.done.load(Ordering::Relaxed) as f64 / secs, Some("verified".to_owned())).await;
    if let Some(k) = known {
        if sha != k.sha256 {
            let _ = std::fs::remove_file(&path);
            return Err(JobError::new(
                ErrorCode::ModelVerificationFailed,
                format!("the download of {} has sha256 {sha}, rbee expects {}; it was deleted", k.alias, k.sha256),
            ));
        }
    }
    let source = ModelRef::Hf(HfRef { file: Some(file), ..hf.clone() }).to_string();
    let catalog = ctx.catalog.clone();
    let entry = blocking(move || models::register(&catalog, &key, &source, path, size, sha)).await?;
    tracing::info!(model = %entry.key, size = entry.size, "model downloaded and registered");
    let mut v = summary(&ctx.hive_id, &entry);
    v["already_present"] = json!(false);
    Ok(v)
}

/// The live hive with the most room for downloads, if it has more than
/// `room` (this hive's) and at least `need` bytes.
fn roomier_hive(ctx: &JobCtx, room: u64, need: u64) -> Option<rbee_schemas::hive::HiveInfo> {
    ctx.fleet.others().into_iter().filter(|h| h.disk_room() > room && h.disk_room() >= need).max_by_key(|h| h.disk_room())
}

/// What a download job fetches, and the catalog key it is saved under.
struct Target {
    reference: ModelRef,
    hf: HfRef,
    known: Option<&'static crate::catalog::KnownModel>,
    key: String,
}

impl Target {
    fn of(model: &str, alias: Option<String>) -> Result<Self, JobError> {
        let reference = ModelRef::parse(model).map_err(|e| JobError::invalid(e.to_string()))?;
        let (hf, known) = models::download_target(&reference)?;
        let key = alias.or_else(|| known.map(|k| k.alias.to_owned())).unwrap_or_else(|| reference.to_string());
        Ok(Self { reference, hf, known, key })
    }
}

/// The catalog entry a download of `target` would find already here, with
/// its file on disk. A known model whose file is on disk but not yet in the
/// catalog is registered by the lookup.
async fn already_here(ctx: &JobCtx, target: &Target) -> Result<Option<crate::catalog::ModelEntry>, JobError> {
    let (catalog, hive, key, m) = (ctx.catalog.clone(), ctx.hive_id.clone(), target.key.clone(), target.reference.clone());
    blocking(move || match catalog.find(&key)? {
        Some(e) if e.path.is_file() => Ok(Some(e)),
        _ if matches!(m, ModelRef::Alias(_)) || known_file_on_disk(&catalog, &m) => catalog.resolve(&m, &hive).map(Some).or(Ok(None)),
        _ => Ok(None),
    })
    .await
}

fn known_file_on_disk(catalog: &crate::catalog::Catalog, m: &ModelRef) -> bool {
    let s = m.to_string();
    crate::catalog::KNOWN_MODELS
        .iter()
        .any(|k| (k.hf == s || k.alias == s) && catalog.models_dir().join(k.alias).join(k.file).is_file())
}

async fn import(ctx: &JobCtx, path: String, alias: String) -> Result<Value, JobError> {
    let catalog = ctx.catalog.clone();
    let hive = ctx.hive_id.clone();
    let entry = blocking(move || {
        if let Some(e) = catalog.get(&alias)? {
            let same = std::fs::canonicalize(&path).is_ok_and(|p| p == e.path);
            if !same {
                return Err(JobError::invalid(format!(
                    "hive {hive} already has a model {alias:?} ({}); delete it first or pick another alias",
                    e.source
                )));
            }
        }
        models::import(&catalog, std::path::Path::new(&path), &alias)
    })
    .await?;
    tracing::info!(model = %entry.key, path = %entry.path.display(), "model imported");
    Ok(summary(&ctx.hive_id, &entry))
}

async fn delete(ctx: &JobCtx, model: &str, force: bool) -> Result<Value, JobError> {
    let catalog = ctx.catalog.clone();
    let m = model.to_owned();
    let Some(entry) = blocking(move || catalog.find(&m)).await? else {
        return Err(JobError::new(ErrorCode::UnknownModel, format!("hive {} has no model {model}", ctx.hive_id)));
    };
    let users: Vec<String> = ctx.pool.workers().into_iter().filter(|(k, _)| *k == entry.key).map(|(_, w)| w.proc.id.clone()).collect();
    if !users.is_empty() && !force {
        return Err(JobError::new(
            ErrorCode::ModelInUse,
            format!(
                "model {} on hive {} is in use by worker {}; stop it first (rbee workers stop ID) or delete with --force",
                entry.key,
                ctx.hive_id,
                users.join(", ")
            ),
        ));
    }
    if !users.is_empty() {
        ctx.pool.stop_model(&entry.key).await;
    }
    let catalog = ctx.catalog.clone();
    let e = entry.clone();
    let file_removed = blocking(move || models::delete(&catalog, &e)).await?;
    tracing::info!(model = %entry.key, file_removed, "model deleted");
    Ok(json!({ "hive": ctx.hive_id, "model": entry.key, "file_removed": file_removed, "workers_stopped": users }))
}

async fn spawn(ctx: &JobCtx, entry: ModelEntry, opts: StartOptions, sink: &mut EventSink) -> Result<Value, JobError> {
    progress(sink, "load", 0, entry.size, 0.0, Some(format!("starting a worker for {} on hive {}", entry.key, ctx.hive_id))).await;
    let started = Instant::now();
    let (worker, fresh) = ctx.pool.spawn(&entry, opts).await?;
    progress(sink, "load", entry.size, entry.size, 0.0, Some("ready".to_owned())).await;
    let mut v = serde_json::to_value(worker.info(&ctx.hive_id)).map_err(|e| JobError::internal(e.to_string()))?;
    v["started"] = json!(fresh);
    v["load_ms"] = json!(started.elapsed().as_secs_f64() * 1e3);
    Ok(v)
}
