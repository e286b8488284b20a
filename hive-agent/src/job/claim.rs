//! Claiming a job in its record before anything else happens.
//!
//! Fast path: `create` a running record (one round trip) — the job is new.
//! Otherwise read the record and decide:
//! - ended already (done, failed, cancelled, expired, dead): do not run it again;
//! - running from another message with the same id: a duplicate submission;
//! - cancel requested while it waited for a retry: end it cancelled;
//! - its terminal event kept, though the record missed it (written while the
//!   broker was away): repair the record from the event, do not run it again;
//! - retrying, or running from this very message (its previous hive vanished
//!   without acking): take it over as the next attempt, continuing `seq` after
//!   the last event the `RBEE_EVENTS` stream kept.

use rbee_schemas::codec::Encoding;
use rbee_schemas::event::Event;
use rbee_schemas::record::{JobRecord, JobState, Resume};
use rbee_schemas::subjects::{self, HEADER_CONTENT_TYPE};

use super::{now_ms, Envelope, JobCtx, Prepared};

/// What the record says to do with this message.
#[derive(Debug)]
pub enum Claim {
    /// Run it: attempt number, first `seq`, what to continue from, the record
    /// written and its revision.
    Run { attempt: u32, next_seq: u64, resume: Option<Resume>, vanished: bool, record: JobRecord, revision: u64 },
    /// It ended before; here is its record.
    Ended(JobRecord),
    /// Another message with this id is being worked on.
    Duplicate,
    /// Cancelled while it waited: end it unstarted.
    Cancelled { record: JobRecord },
    /// The record store did not answer; hand the job back and try later.
    Unavailable(String),
}

pub async fn claim(ctx: &JobCtx, env: &Envelope, prepared: Option<&Prepared>) -> Claim {
    let mut fresh = JobRecord::new(&env.job_id, JobState::Running, &env.reply_to, now_ms());
    fresh.model = env.model_key.clone();
    fresh.lane = env.lane;
    fresh.hive = Some(ctx.hive_id.clone());
    fresh.attempts = 1;
    fresh.stream_seq = Some(env.stream_seq);
    fresh.submitted_at_ms = env.received_ms;
    fresh.deadline_ms = prepared.and_then(|p| p.deadline_ms);

    for _ in 0..16 {
        match ctx.records.create(&fresh).await {
            Ok(Some(revision)) => {
                return Claim::Run { attempt: 1, next_seq: 0, resume: None, vanished: false, record: fresh, revision };
            }
            Ok(None) => {}
            Err(e) => return Claim::Unavailable(e.to_string()),
        }
        let current = match ctx.records.get(&env.job_id).await {
            Ok(Some(v)) => v,
            Ok(None) => continue, // deleted in between: try to create again
            Err(e) => return Claim::Unavailable(e.to_string()),
        };
        let r = current.record;
        if r.state.is_terminal() {
            return Claim::Ended(r);
        }
        let same_message = r.stream_seq == Some(env.stream_seq);
        if r.state == JobState::Running && !same_message {
            return Claim::Duplicate;
        }
        let last = last_event(ctx, &env.job_id).await;
        // Its terminal event is kept but the record missed it (the broker
        // was away when the hive that ran it wrote its end): the job ended;
        // repair the record instead of running it again.
        if let Some((state, event)) = last.as_ref().and_then(|e| Some((JobState::ended_by(&e.body)?, e))) {
            let mut ended = r.clone();
            ended.end_with(state, event.clone(), now_ms());
            match ctx.records.update(&ended, current.revision).await {
                Ok(Some(_)) => {
                    tracing::warn!(state = state.as_str(), "the job's record missed its end; repaired it from the kept terminal event");
                    return Claim::Ended(ended);
                }
                Ok(None) => continue,
                Err(e) => return Claim::Unavailable(e.to_string()),
            }
        }
        if r.cancel_requested {
            return Claim::Cancelled { record: r };
        }
        // Take it over. A record still "running" for this message means its
        // hive vanished: events it sent after its last record write are in
        // the events stream, so continue after the last one kept there.
        let vanished = r.state == JobState::Running;
        let kept = last.map_or(0, |e| e.seq + 1);
        let next_seq = r.next_seq.max(kept);
        let mut next = r.clone();
        next.state = JobState::Running;
        next.hive = Some(ctx.hive_id.clone());
        next.worker = None;
        next.attempts = r.attempts + 1;
        next.next_seq = next_seq;
        next.stream_seq = Some(env.stream_seq);
        next.reply_to = env.reply_to.clone();
        next.deadline_ms = next.deadline_ms.or(fresh.deadline_ms);
        next.updated_at_ms = now_ms();
        // Tokens carried over only when the record knows exactly what was streamed.
        let resume = if vanished { None } else { r.resume.clone() };
        match ctx.records.update(&next, current.revision).await {
            Ok(Some(revision)) => {
                return Claim::Run { attempt: next.attempts, next_seq, resume, vanished, record: next, revision };
            }
            Ok(None) => {} // changed meanwhile: read it again
            Err(e) => return Claim::Unavailable(e.to_string()),
        }
    }
    Claim::Unavailable("the job record kept changing".to_owned())
}

/// The last event kept for `job_id` in `RBEE_EVENTS`.
async fn last_event(ctx: &JobCtx, job_id: &str) -> Option<Event> {
    let msg = ctx.events.get_last_raw_message_by_subject(&subjects::events_subject(job_id)).await.ok()?;
    let enc = Encoding::from_content_type(msg.headers.get(HEADER_CONTENT_TYPE).map(|v| v.as_str())).ok()?;
    enc.decode(&msg.payload).ok()
}
