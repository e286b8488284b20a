//! One claimed job, from the message to its ack. One task per job.
//!
//! The rules (docs/architecture.md has the whole table):
//! - The job record decides. The hive first claims the job in its record
//!   (compare-and-set, `claim`): a job that already ended is not run again
//!   (its terminal event is sent once more), a second message with the id of a
//!   running job is dropped as a duplicate, a cancelled job ends unstarted.
//! - A job that cannot run as sent (malformed, invalid, unknown model, wrong
//!   version) gets one `error` event and is terminated: never redelivered.
//! - A job that runs publishes `started`, `token`s and one terminal event.
//!   Terminal states are written to the record first (with the event), then
//!   published, then the message is acked, so a crash anywhere in between
//!   still ends the job exactly once.
//! - While it waits for a worker or generates, the hive sends in-progress acks
//!   every third of `ack_wait`; it stops a job at its deadline or on a cancel
//!   request within about one token (`run`).
//! - If the worker dies, the job gets `restarted` and is handed back (nak,
//!   with backoff) carrying the tokens generated so far, so the next attempt
//!   continues the text; after `max_attempts` it is dead: `WORKER_CRASHED`,
//!   and its original message goes to `RBEE_DEAD` for `rbee jobs retry`.

pub(crate) mod claim;
pub(crate) mod place;
pub(crate) mod run;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use async_nats::Client;
use rbee_broker::records::Records;
use rbee_schemas::codec::Encoding;
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::job::{is_valid_job_id, GenerateParams, InferRequest, JobProbe};
use rbee_schemas::model::ModelRef;
use rbee_schemas::subjects::{self, Lane, HEADER_CONTENT_TYPE, HEADER_MSG_ID};
use rbee_schemas::PROTOCOL_VERSION;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::catalog::Catalog;
use crate::claimer::SlotGuard;
use crate::fleet::Fleet;
use crate::pool::Pool;
use crate::running::Running;

/// What every job task shares.
#[derive(Debug)]
pub struct JobCtx {
    pub hive_id: String,
    pub client: Client,
    pub js: jetstream::Context,
    pub records: Records,
    pub events: jetstream::stream::Stream,
    pub catalog: Arc<Catalog>,
    pub pool: Arc<Pool>,
    pub fleet: Arc<Fleet>,
    pub running: Arc<Running>,
    /// Wakes the heartbeat at once: the catalog changed, and other hives
    /// (and `rbee models list`) should see it now, not at the next beat.
    pub beat_now: Arc<tokio::sync::Notify>,
    /// The hive's memory budget for workers, bytes; 0 = none.
    pub memory_limit: u64,
    /// The GPU a CUDA hive's workers load models into, when its memory can be read.
    pub gpu: Option<Arc<crate::gpu::Gpu>>,
    /// Where and how models are downloaded.
    pub downloader: crate::models::Downloader,
    pub ack_wait: Duration,
    pub max_attempts: u32,
    /// First retry delay; doubled per attempt, at most 30 s.
    pub retry_backoff: Duration,
    /// Cancelled when the drain deadline passes: running jobs are handed back.
    pub hand_back: CancellationToken,
    /// Told when a job is left for another hive.
    pub leaves: crate::claimer::Leaves,
    /// Workers started here because another hive's jobs waited.
    pub scaling: place::ScaleOut,
    /// Models another hive was just found to serve.
    pub served_elsewhere: place::ServedElsewhere,
}

/// Who to answer and how, known before the body is trusted.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub job_id: String,
    pub reply_to: String,
    pub encoding: Encoding,
    pub lane: Lane,
    pub model_key: String,
    pub stream_seq: u64,
    /// When the broker stored the job, Unix ms.
    pub received_ms: u64,
    pub queued_ms: f64,
}

/// A job that passed every check that needs no worker.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub model: ModelRef,
    pub params: GenerateParams,
    pub deadline_ms: Option<u64>,
    pub keep_alive_ms: Option<i64>,
}

impl Prepared {
    /// Whether the job's deadline has passed.
    pub fn expired(&self) -> bool {
        self.deadline_ms.is_some_and(|d| now_ms() >= d)
    }
}

pub use crate::catalog::now_ms;

/// In-progress acks for a job: the first a third of `ack_wait` from now.
///
/// Not `interval` + a first `tick().await`: that first tick completes only
/// on the timer's next millisecond turn (tokio rounds deadlines up), which
/// cost every job 1–2 ms before its first event.
pub fn progress_acks(ack_wait: Duration) -> tokio::time::Interval {
    let period = ack_wait / 3;
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// Runs one claimed job to its end. Never panics on bad input.
pub async fn handle(ctx: Arc<JobCtx>, msg: jetstream::Message, lane: Lane, slot: SlotGuard) {
    let claimed = Instant::now();
    let Some((env, probe, encoding_error)) = envelope(&msg, lane) else {
        let _ = msg.ack_with(AckKind::Term).await;
        return;
    };
    let span = tracing::info_span!("job", job_id = %env.job_id);
    // Instrumented, not entered: a guard held across `.await` would put
    // whatever else this thread polls meanwhile into this job's span.
    handle_in_span(ctx, msg, slot, claimed, env, probe, encoding_error).instrument(span).await
}

async fn handle_in_span(
    ctx: Arc<JobCtx>,
    msg: jetstream::Message,
    slot: SlotGuard,
    claimed: Instant,
    env: Envelope,
    probe: JobProbe,
    encoding_error: Option<String>,
) {
    let prepared = match encoding_error {
        Some(e) => Err(JobError::invalid(e)),
        None => prepare(&msg.subject, &msg.payload, &probe, &env),
    };
    // Placement comes before the record: a job left for another hive must
    // reach it untouched.
    // Held until the job ends (see `place::Decision::Go`).
    let mut _reservation = None;
    let prepared = match prepared {
        Ok(p) => match place::place(&ctx, &p.model, place::Mode::Job { queued: Duration::from_secs_f64(env.queued_ms / 1e3) }).await {
            place::Decision::Go(entry, reservation) => {
                _reservation = reservation;
                Ok((p, entry))
            }
            // A job past its deadline is not left again: it ends here, expired.
            place::Decision::Defer { .. } if p.expired() => {
                Err(JobError::new(ErrorCode::DeadlineExceeded, "the job's deadline passed while it waited in the queue"))
            }
            place::Decision::Defer { delay, why } => {
                ctx.leaves.left();
                place::leave(&ctx, &msg, delay, &why, "job").await;
                return;
            }
            place::Decision::Fail(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    // A first delivery for a warm worker with a free slot starts computing
    // now, while the claim is written; events wait for the claim.
    let first_delivery = msg.info().is_ok_and(|i| i.delivered == 1);
    let early = match &prepared {
        Ok((p, entry)) if first_delivery && !p.expired() => run::Early::start(&ctx, entry, p).await,
        _ => None,
    };
    // Registered before the record says "running", so no cancel request is missed.
    let registration = ctx.running.register(&env.job_id);
    let claim = claim::claim(&ctx, &env, prepared.as_ref().ok().map(|(p, _)| p)).await;
    let run = run::Run::new(&ctx, &msg, &env, claimed, registration.cancelled.clone());
    run.go(claim, prepared, slot, early).await;
}

/// Reads the job id, reply subject and encoding without trusting the body.
/// `None` when there is nowhere to answer (the message is terminated).
pub(crate) fn envelope(msg: &jetstream::Message, lane: Lane) -> Option<(Envelope, JobProbe, Option<String>)> {
    let (stream_seq, received_ms, queued_ms) = match msg.info() {
        Ok(i) => {
            let received = (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            let queued = (time::OffsetDateTime::now_utc() - i.published).as_seconds_f64().max(0.0) * 1e3;
            (i.stream_sequence, received, queued)
        }
        Err(e) => {
            tracing::error!(error = %e, subject = %msg.subject, "message without JetStream metadata; terminating it");
            return None;
        }
    };
    let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
    let (encoding, encoding_error) = match Encoding::from_content_type(header(HEADER_CONTENT_TYPE).as_deref()) {
        Ok(e) => (e, None),
        Err(e) => (Encoding::Json, Some(e)),
    };
    let probe: JobProbe = encoding.decode(&msg.payload).unwrap_or_default();
    let job_id = rbee_schemas::job::job_id(header(HEADER_MSG_ID), probe.id.clone(), stream_seq);
    let reply_to = match &probe.reply_to {
        Some(r) if subjects::is_valid_publish_subject(r) && is_valid_job_id(&job_id) => r.clone(),
        _ if is_valid_job_id(&job_id) => subjects::events_subject(&job_id),
        _ => {
            tracing::warn!(subject = %msg.subject, "job id {job_id:?} is not a valid subject token; terminating it unanswered");
            return None;
        }
    };
    let model_key = subjects::model_key_of(&msg.subject).unwrap_or_default().to_owned();
    let env = Envelope { job_id, reply_to, encoding, lane, model_key, stream_seq, received_ms, queued_ms };
    Some((env, probe, encoding_error))
}

/// Decodes and checks everything about the job that does not need a worker.
fn prepare(subject: &str, payload: &[u8], probe: &JobProbe, env: &Envelope) -> Result<Prepared, JobError> {
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
    let key = env.model_key.as_str();
    let model = ModelRef::from_subject_key(key).map_err(|e| JobError::invalid(format!("subject {subject}: {e}")))?;
    if let Some(m) = &req.model {
        let body_model = ModelRef::parse(m).map_err(|e| JobError::invalid(e.to_string()))?;
        if body_model.subject_key() != key {
            return Err(JobError::invalid(format!(
                "model {m:?} in the body does not match the subject's model key {key:?}; publish to {}",
                subjects::job_subject(env.lane, &body_model.subject_key())
            )));
        }
    }
    let params = req.validate(random_seed())?;
    Ok(Prepared { model, params, deadline_ms: req.deadline(env.received_ms), keep_alive_ms: req.keep_alive_ms })
}
