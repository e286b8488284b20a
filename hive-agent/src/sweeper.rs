//! The sweeper keeps the queue honest without a central process:
//! - deadlines: a job whose deadline passes while it waits in the queue must
//!   end with `DEADLINE_EXCEEDED` and never start, even when no hive is free
//!   to claim it. Every hive looks at the head of the queue every two seconds;
//!   the record's compare-and-set makes exactly one of them end each expired
//!   job (publish its error event, delete its message);
//! - leftovers: a message older than twice `ack_wait` whose job has ended is
//!   deleted, after its terminal event is published once more. Normally
//!   acking removes it; a broker crash can leave it behind with its consumer
//!   already past it, and then nothing else ever would; a hive that died
//!   between its job's terminal record and terminal event leaves it too.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use rbee_broker::events::publish_once;
use rbee_broker::queue;
use rbee_broker::records::Decision;
use rbee_schemas::codec::Encoding;
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::event::Event;
use rbee_schemas::job::JobProbe;
use rbee_schemas::record::{JobRecord, JobState};
use rbee_schemas::subjects::{self, HEADER_CONTENT_TYPE};
use tokio_util::sync::CancellationToken;

use crate::job::{now_ms, JobCtx};

/// Queue entries looked at per sweep.
const SWEEP_LIMIT: usize = 256;

pub async fn run(ctx: Arc<JobCtx>, jobs: Stream, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last_leftover_sweep = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if last_leftover_sweep.elapsed() >= ctx.ack_wait {
            last_leftover_sweep = std::time::Instant::now();
            sweep_leftovers(&ctx, &jobs).await;
        }
        let queued = match queue::scan(&jobs, 1, SWEEP_LIMIT).await {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(error = %e, "sweep: reading the queue failed");
                continue;
            }
        };
        let now = now_ms();
        for q in queued {
            let encoding = Encoding::from_content_type(q.message.headers.get(HEADER_CONTENT_TYPE).map(|v| v.as_str())).unwrap_or_default();
            let probe: JobProbe = encoding.decode(&q.message.payload).unwrap_or_default();
            if probe.deadline(q.received_ms).is_none_or(|d| now < d) || !rbee_schemas::job::is_valid_job_id(&q.job_id) {
                continue;
            }
            expire(&ctx, &jobs, &q, probe, encoding).await;
        }
    }
}

async fn expire(ctx: &JobCtx, jobs: &Stream, q: &queue::Queued, probe: JobProbe, encoding: Encoding) {
    let reply_to = probe
        .reply_to
        .filter(|r| subjects::is_valid_publish_subject(r))
        .unwrap_or_else(|| subjects::events_subject(&q.job_id));
    let error = JobError::new(ErrorCode::DeadlineExceeded, "the job's deadline passed while it waited in the queue; it never started");
    let build = |base: Option<&JobRecord>| {
        let mut r = base.cloned().unwrap_or_else(|| JobRecord::new(&q.job_id, JobState::Expired, &reply_to, now_ms()));
        let event = Event::new(q.job_id.clone(), r.next_seq, error.clone().into());
        r.model = q.model_key.clone();
        r.lane = q.lane;
        r.stream_seq = Some(q.seq);
        r.submitted_at_ms = q.received_ms;
        r.end_with(JobState::Expired, event.clone(), now_ms());
        (r, event)
    };
    let decided = ctx
        .records
        .transition(&q.job_id, |cur| match cur {
            None => {
                let (r, e) = build(None);
                Decision::Write(r, Some(e))
            }
            Some(v) if v.record.state == JobState::Retrying => {
                let (r, e) = build(Some(&v.record));
                Decision::Write(r, Some(e))
            }
            // Running: its hive enforces the deadline. Ended: nothing to do.
            Some(_) => Decision::Keep(None),
        })
        .await;
    if let Ok((Some(event), _)) = decided {
        tracing::info!(job_id = %q.job_id, "deadline passed in the queue; job expired");
        publish_once(&ctx.client, &q.job_id, &reply_to, encoding, &event).await;
        if let Err(e) = jobs.delete_message(q.seq).await {
            tracing::debug!(error = %e, "sweep: deleting the expired job's message failed (a hive may hold it)");
        }
    }
}

async fn sweep_leftovers(ctx: &JobCtx, jobs: &Stream) {
    let Ok(queued) = queue::scan(jobs, 1, SWEEP_LIMIT).await else { return };
    let old_before = now_ms().saturating_sub(2 * ctx.ack_wait.as_millis() as u64);
    for q in queued.iter().filter(|q| q.received_ms < old_before) {
        let Ok(Some(v)) = ctx.records.get(&q.job_id).await else { continue };
        if !v.record.state.is_terminal() {
            continue;
        }
        // The hive that ended it may have died between writing the record
        // and publishing the terminal event (or be stuck publishing it): send
        // it again, readers drop repeats by `seq`. Its redelivery would have
        // done the same, had the message not been removed here.
        if let Some(terminal) = &v.record.terminal {
            let encoding = Encoding::from_content_type(q.message.headers.get(HEADER_CONTENT_TYPE).map(|v| v.as_str())).unwrap_or_default();
            publish_once(&ctx.client, &q.job_id, &v.record.reply_to, encoding, terminal).await;
        }
        if jobs.delete_message(q.seq).await.is_ok() {
            tracing::info!(job_id = %q.job_id, seq = q.seq, state = v.record.state.as_str(), "removed a leftover message of an ended job");
        }
    }
}
