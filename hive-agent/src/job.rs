//! One claimed job, from the message to its ack. One task per job.
//!
//! The rules (see docs/architecture.md):
//! - A job that cannot run as sent (malformed, invalid, unknown model, wrong
//!   version) gets one `error` event where a reply subject can be determined,
//!   and is terminated: it is never redelivered.
//! - A job that runs publishes `started`, `token`s and one terminal event; the
//!   message is acked only after the terminal event is out. While it waits for
//!   a worker or generates, the hive sends in-progress acks every third of
//!   `ack_wait`.
//! - If its worker dies, the job gets a `restarted` event and is handed back
//!   (nak) for redelivery, to this hive or another. The job record carries the
//!   next `seq` across attempts; after `max_attempts` the job ends with
//!   `WORKER_CRASHED`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, AckKind};
use async_nats::Client;
use rbee_schemas::codec::Encoding;
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::event::{Done, EventBody, Restarted, Started, Timings, Token};
use rbee_schemas::job::{is_valid_job_id, GenerateParams, InferRequest, JobProbe};
use rbee_schemas::model::ModelRef;
use rbee_schemas::record::{JobRecord, JobState};
use rbee_schemas::subjects::{self, HEADER_CONTENT_TYPE, HEADER_MSG_ID};
use rbee_schemas::PROTOCOL_VERSION;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, ModelEntry};
use crate::claimer::SlotGuard;
use crate::events::EventSink;
use crate::pool::{Lease, Pool};
use crate::worker_proc::WorkerMsg;

/// What every job task shares.
#[derive(Debug)]
pub struct JobCtx {
    pub hive_id: String,
    pub client: Client,
    pub records: kv::Store,
    pub events: jetstream::stream::Stream,
    pub catalog: Arc<Catalog>,
    pub pool: Arc<Pool>,
    pub ack_wait: Duration,
    pub max_attempts: u32,
    /// Cancelled when the drain deadline passes: running jobs are handed back.
    pub hand_back: CancellationToken,
}

/// Who to answer and how, known before the body is trusted.
#[derive(Debug)]
struct Envelope {
    job_id: String,
    reply_to: String,
    encoding: Encoding,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs one claimed job to its end. Never panics on bad input.
pub async fn handle(ctx: Arc<JobCtx>, msg: jetstream::Message, slot: SlotGuard) {
    let claimed = Instant::now();
    let (stream_seq, delivered, queued_ms) = match msg.info() {
        Ok(i) => {
            let queued = (time::OffsetDateTime::now_utc() - i.published).as_seconds_f64().max(0.0) * 1e3;
            (i.stream_sequence, i.delivered, queued)
        }
        Err(e) => {
            tracing::error!(error = %e, subject = %msg.subject, "message without JetStream metadata; terminating it");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
    let (encoding, encoding_error) = match Encoding::from_content_type(header(HEADER_CONTENT_TYPE).as_deref()) {
        Ok(e) => (e, None),
        Err(e) => (Encoding::Json, Some(e)),
    };
    let probe: JobProbe = encoding.decode(&msg.payload).unwrap_or_default();
    let job_id = header(HEADER_MSG_ID)
        .or_else(|| probe.id.clone())
        .unwrap_or_else(|| format!("js-{stream_seq}"));
    let span = tracing::info_span!("job", job_id = %job_id, delivered);
    let _enter = span.enter();

    let default_reply = is_valid_job_id(&job_id).then(|| subjects::events_subject(&job_id));
    let reply_to = match &probe.reply_to {
        Some(r) if subjects::is_valid_publish_subject(r) => Some(r.clone()),
        _ => default_reply.clone(),
    };
    let Some(reply_to) = reply_to else {
        tracing::warn!(subject = %msg.subject, "job id {job_id:?} is not a valid subject token and there is no reply_to; terminating it unanswered");
        let _ = msg.ack_with(AckKind::Term).await;
        return;
    };
    let env = Envelope { job_id, reply_to, encoding };

    // A redelivered job may have ended already, or may continue a sequence.
    let prior = if delivered > 1 { read_record(&ctx, &env).await } else { None };
    if let Some(rec) = &prior {
        if rec.state.is_terminal() {
            tracing::info!("job already ended; acking the redelivery");
            let _ = msg.ack().await;
            return;
        }
    }
    let next_seq = match &prior {
        Some(rec) => rec.next_seq.max(last_event_seq(&ctx, &env).await.map_or(0, |s| s + 1)),
        None if delivered > 1 => last_event_seq(&ctx, &env).await.map_or(0, |s| s + 1),
        None => 0,
    };
    let attempt = prior.as_ref().map_or(1, |r| r.attempts + 1);
    let mut sink = EventSink::new(ctx.client.clone(), env.reply_to.clone(), env.job_id.clone(), encoding, next_seq);

    let prepared = match encoding_error {
        Some(e) => Err(JobError::invalid(e)),
        None => prepare(&msg.subject, &msg.payload, &probe, &env, default_reply.is_some()),
    };
    let (model, params) = match prepared {
        Ok(p) => p,
        Err(e) => return reject(&ctx, &msg, &env, &mut sink, e, attempt).await,
    };
    let catalog = ctx.catalog.clone();
    let hive = ctx.hive_id.clone();
    let lookup = model.clone();
    let entry = match tokio::task::spawn_blocking(move || catalog.resolve(&lookup, &hive)).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => return reject(&ctx, &msg, &env, &mut sink, e, attempt).await,
        Err(e) => return reject(&ctx, &msg, &env, &mut sink, JobError::internal(e.to_string()), attempt).await,
    };
    if attempt > ctx.max_attempts {
        let e = JobError::new(
            ErrorCode::WorkerCrashed,
            format!("the job's worker died on each of its {} attempts; see the hive's log for the crash reports", ctx.max_attempts),
        );
        return reject(&ctx, &msg, &env, &mut sink, e, attempt).await;
    }
    put_record(&ctx, &env, JobState::Running, attempt, sink.next_seq(), None);

    let lease = match with_progress(&msg, ctx.ack_wait, ctx.pool.lease(&entry)).await {
        Ok(l) => l,
        Err(e) => return reject(&ctx, &msg, &env, &mut sink, e, attempt).await,
    };
    let run = Run { ctx: &ctx, msg: &msg, env: &env, entry: &entry, claimed, queued_ms, attempt };
    run.generate(lease, params, &mut sink, slot).await;
}

/// Decodes and checks everything about the job that does not need a worker.
fn prepare(
    subject: &str,
    payload: &[u8],
    probe: &JobProbe,
    env: &Envelope,
    id_ok: bool,
) -> Result<(ModelRef, GenerateParams), JobError> {
    if !id_ok {
        return Err(JobError::invalid(format!(
            "job id {:?} must be 1 to {} characters of A-Z a-z 0-9 _ -",
            env.job_id,
            rbee_schemas::job::MAX_ID_LEN
        )));
    }
    if let Some(v) = probe.v {
        if v != PROTOCOL_VERSION {
            return Err(JobError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "the job speaks rbee protocol v{v}; this hive (rbee {}) speaks v{PROTOCOL_VERSION}. \
                     Upgrade the hive or submit with a client of the same protocol version",
                    rbee_schemas::RBEE_VERSION
                ),
            ));
        }
    }
    if let Some(r) = &probe.reply_to {
        if !subjects::is_valid_publish_subject(r) {
            return Err(JobError::invalid(format!("reply_to {r:?} is not a subject one can publish to")));
        }
    }
    let req: InferRequest = env
        .encoding
        .decode(payload)
        .map_err(|e| JobError::invalid(format!("invalid job body: {e}")))?;
    let key = subjects::model_key_of(subject).unwrap_or_default();
    let model = ModelRef::from_subject_key(key)
        .map_err(|e| JobError::invalid(format!("subject {subject}: {e}")))?;
    if let Some(m) = &req.model {
        let body_model = ModelRef::parse(m).map_err(|e| JobError::invalid(e.to_string()))?;
        if body_model.subject_key() != key {
            return Err(JobError::invalid(format!(
                "model {m:?} in the body does not match the subject's model key {key:?}; publish to {}",
                subjects::infer_subject(&body_model.subject_key())
            )));
        }
    }
    let params = req.validate(random_seed())?;
    Ok((model, params))
}

/// Ends a job that cannot run: one `error` event, then `Term`.
async fn reject(ctx: &JobCtx, msg: &jetstream::Message, env: &Envelope, sink: &mut EventSink, e: JobError, attempt: u32) {
    tracing::info!(code = %e.code, message = %e.message, "job rejected");
    let event = match sink.emit(e.into()).await {
        Ok(ev) => ev,
        Err(err) => {
            tracing::error!(error = %err, "publishing the error event failed");
            None
        }
    };
    put_record(ctx, env, JobState::Failed, attempt, sink.next_seq(), event);
    if let Err(err) = msg.ack_with(AckKind::Term).await {
        tracing::error!(error = %err, "terminating the job failed");
    }
}

/// A job that has a worker.
struct Run<'a> {
    ctx: &'a Arc<JobCtx>,
    msg: &'a jetstream::Message,
    env: &'a Envelope,
    entry: &'a ModelEntry,
    claimed: Instant,
    queued_ms: f64,
    attempt: u32,
}

enum End {
    Finished(rbee_schemas::worker::Outcome),
    Failed(JobError),
    Retry(String),
}

impl Run<'_> {
    async fn generate(self, lease: Lease, params: GenerateParams, sink: &mut EventSink, slot: SlotGuard) {
        let worker = lease.worker.clone();
        let started = EventBody::Started(Started {
            hive: self.ctx.hive_id.clone(),
            worker: worker.id.clone(),
            model: self.entry.key.clone(),
            cold: lease.cold,
            attempt: self.attempt,
        });
        let seed = params.sampling.seed;
        let mut first_token: Option<Instant> = None;
        let end = match sink.emit(started).await {
            Err(e) => End::Retry(format!("publishing failed: {e}")),
            Ok(_) => match worker.run(params).await {
                Err(reason) => End::Retry(reason),
                Ok((job, mut rx)) => {
                    let mut progress = tokio::time::interval(self.ctx.ack_wait / 3);
                    progress.tick().await;
                    let end = loop {
                        tokio::select! {
                            m = rx.recv() => match m {
                                Some(WorkerMsg::Token(text)) => {
                                    first_token.get_or_insert_with(Instant::now);
                                    if let Err(e) = sink.emit(EventBody::Token(Token { text })).await {
                                        worker.cancel(job).await;
                                        break End::Retry(format!("publishing failed: {e}"));
                                    }
                                }
                                Some(WorkerMsg::Finished(o)) => break End::Finished(o),
                                Some(WorkerMsg::Failed(e)) => break End::Failed(e),
                                Some(WorkerMsg::Exited(reason)) => break End::Retry(reason),
                                None => break End::Retry(worker.exit_reason().unwrap_or_else(|| "worker gone".to_owned())),
                            },
                            _ = progress.tick() => {
                                let _ = self.msg.ack_with(AckKind::Progress).await;
                            }
                            _ = self.ctx.hand_back.cancelled() => {
                                worker.cancel(job).await;
                                break End::Retry(format!("hive {} is shutting down", self.ctx.hive_id));
                            }
                        }
                    };
                    worker.release(job);
                    end
                }
            },
        };
        let load_ms = lease.load_ms;
        // The worker is free for the next job as soon as this one is over.
        drop(lease);
        match end {
            End::Finished(o) => {
                let now = Instant::now();
                let timings = Timings {
                    queued_ms: self.queued_ms,
                    load_ms,
                    ttft_ms: ms(first_token.unwrap_or(now) - self.claimed),
                    total_ms: ms(now - self.claimed),
                    prompt_tps: if o.prompt_ms > 0.0 { o.usage.prompt_tokens as f64 / (o.prompt_ms / 1e3) } else { 0.0 },
                    decode_tps: o.decode_tps,
                };
                let done = EventBody::Done(Done { stop_reason: o.stop_reason, usage: o.usage, timings, seed });
                self.finish(sink, done, JobState::Done, slot).await;
            }
            End::Failed(e) => {
                tracing::info!(code = %e.code, message = %e.message, "job failed in the worker");
                self.finish(sink, e.into(), JobState::Failed, slot).await;
            }
            End::Retry(reason) => {
                tracing::warn!(%reason, attempt = self.attempt, "attempt failed; handing the job back");
                let restarted = EventBody::Restarted(Restarted { attempt: self.attempt, reason, resume: false });
                let _ = sink.emit(restarted).await;
                drop(slot);
                put_record_now(self.ctx, self.env, JobState::Retrying, self.attempt, sink.next_seq(), None).await;
                if let Err(e) = self.msg.ack_with(AckKind::Nak(None)).await {
                    tracing::error!(error = %e, "handing the job back failed; it returns after ack_wait");
                }
            }
        }
    }

    /// Terminal event, then the record, then the ack.
    async fn finish(&self, sink: &mut EventSink, body: EventBody, state: JobState, slot: SlotGuard) {
        let event = match sink.emit(body).await {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "publishing the terminal event failed; handing the job back");
                drop(slot);
                let _ = self.msg.ack_with(AckKind::Nak(None)).await;
                return;
            }
        };
        drop(slot);
        put_record_now(self.ctx, self.env, state, self.attempt, sink.next_seq(), event).await;
        if let Err(e) = self.msg.ack().await {
            tracing::error!(error = %e, "acking the finished job failed");
        }
        tracing::debug!(total_ms = ms(self.claimed.elapsed()), "job finished");
    }
}

/// Runs `fut`, sending in-progress acks meanwhile (model loads can be long).
async fn with_progress<T>(
    msg: &jetstream::Message,
    ack_wait: Duration,
    fut: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(ack_wait / 3);
    tick.tick().await;
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = tick.tick() => {
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
    }
}

fn record(ctx: &JobCtx, env: &Envelope, state: JobState, attempts: u32, next_seq: u64, terminal: Option<rbee_schemas::event::Event>) -> JobRecord {
    JobRecord {
        v: PROTOCOL_VERSION,
        job_id: env.job_id.clone(),
        state,
        hive: ctx.hive_id.clone(),
        attempts,
        next_seq,
        reply_to: env.reply_to.clone(),
        updated_at_ms: now_ms(),
        terminal,
    }
}

async fn put_record_now(ctx: &JobCtx, env: &Envelope, state: JobState, attempts: u32, next_seq: u64, terminal: Option<rbee_schemas::event::Event>) {
    if !is_valid_job_id(&env.job_id) {
        return;
    }
    let rec = record(ctx, env, state, attempts, next_seq, terminal);
    if let Err(e) = ctx.records.put(&env.job_id, Encoding::Json.encode(&rec).into()).await {
        tracing::warn!(error = %e, "writing the job record failed");
    }
}

/// Writes the record without waiting for the broker's ack.
fn put_record(ctx: &JobCtx, env: &Envelope, state: JobState, attempts: u32, next_seq: u64, terminal: Option<rbee_schemas::event::Event>) {
    if !is_valid_job_id(&env.job_id) {
        return;
    }
    let rec = record(ctx, env, state, attempts, next_seq, terminal);
    let store = ctx.records.clone();
    let key = env.job_id.clone();
    tokio::spawn(async move {
        if let Err(e) = store.put(&key, Encoding::Json.encode(&rec).into()).await {
            tracing::warn!(error = %e, "writing the job record failed");
        }
    });
}

async fn read_record(ctx: &JobCtx, env: &Envelope) -> Option<JobRecord> {
    if !is_valid_job_id(&env.job_id) {
        return None;
    }
    match ctx.records.get(&env.job_id).await {
        Ok(Some(bytes)) => Encoding::Json.decode(&bytes).ok(),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "reading the job record failed");
            None
        }
    }
}

/// The `seq` of the last event kept in the events stream for this job's
/// default subject (events to a custom `reply_to` are not kept).
async fn last_event_seq(ctx: &JobCtx, env: &Envelope) -> Option<u64> {
    if !env.reply_to.starts_with(subjects::EVENTS_PREFIX) {
        return None;
    }
    let msg = ctx.events.get_last_raw_message_by_subject(&env.reply_to).await.ok()?;
    let enc = Encoding::from_content_type(msg.headers.get(HEADER_CONTENT_TYPE).map(|v| v.as_str())).ok()?;
    let event: rbee_schemas::event::Event = enc.decode(&msg.payload).ok()?;
    Some(event.seq)
}
