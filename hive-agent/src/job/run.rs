//! Running a claimed job and ending it: generation, cancel, deadline,
//! hand-back, retry with resume, dead letters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use rbee_broker::records::{Decision, Versioned};
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::event::{Done, Event, EventBody, Restarted, Started, StopReason, Timings, Token, Usage};
use rbee_schemas::job::GenerateParams;
use rbee_schemas::record::{JobRecord, JobState, Resume};
use rbee_schemas::subjects::{self, HEADER_LAST_ERROR, HEADER_ORIGINAL_SUBJECT};
use rbee_schemas::worker::Outcome;
use tokio_util::sync::CancellationToken;

use super::claim::Claim;
use super::{now_ms, Envelope, JobCtx, Prepared};
use crate::catalog::ModelEntry;
use crate::claimer::SlotGuard;
use crate::events::EventSink;
use crate::pool::Lease;
use crate::worker_proc::WorkerMsg;

/// How long a job runs before its record is updated with its worker.
const NOTE_WORKER_AFTER: Duration = Duration::from_millis(500);
/// How long a job's end waits for the record store (a broker restarting)
/// before it leaves the job for redelivery to record.
const TERMINAL_WRITE_FOR: Duration = Duration::from_secs(30);

/// How long a worker may take to stop a job it was asked to stop.
const STOP_GRACE: Duration = Duration::from_secs(5);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Why a running job is being stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancel,
    Deadline,
    HandBack,
}

/// How the generation part ended.
enum Ended {
    Finished(Outcome),
    Failed(JobError),
    Died(String),
    /// The worker did not stop in time and was killed.
    Stopped,
}

pub struct Run<'a> {
    pub ctx: &'a JobCtx,
    pub msg: &'a jetstream::Message,
    pub env: &'a Envelope,
    pub claimed: Instant,
    pub cancel: CancellationToken,
    /// Revision of the record as this task last wrote it (0: unknown), so
    /// the next write can compare-and-set without reading it first.
    written: AtomicU64,
}

/// A job handed to a warm worker before its claim, so the worker computes
/// while the record is written (a record round trip, ~0.2-0.5 ms on a busy
/// machine, no longer comes before the first token). Its output waits in
/// the route's channel until the claim says run; if the claim says anything
/// else, or the job is not a fresh first attempt, dropping it cancels the
/// worker's job and frees the slot.
#[derive(Debug)]
pub struct Early {
    lease: Option<Lease>,
    job: u64,
    rx: Option<tokio::sync::mpsc::Receiver<WorkerMsg>>,
}

impl Early {
    /// Starts `params` on a worker of `model` if one has a free slot now.
    pub async fn start(ctx: &JobCtx, model: &ModelEntry, prepared: &Prepared) -> Option<Early> {
        let lease = ctx.pool.try_lease(model, prepared.keep_alive_ms)?;
        let (job, rx) = lease.worker.run(prepared.params.clone(), None).await.ok()?;
        Some(Early { lease: Some(lease), job, rx: Some(rx) })
    }

    fn take(mut self) -> (Lease, u64, tokio::sync::mpsc::Receiver<WorkerMsg>) {
        let (lease, rx) = (self.lease.take(), self.rx.take());
        (lease.expect("taken once"), self.job, rx.expect("taken once"))
    }
}

impl Drop for Early {
    fn drop(&mut self) {
        if let Some(lease) = &self.lease {
            if !lease.worker.cancel_now(self.job) {
                tracing::warn!(worker = %lease.worker.id, "could not call off an early start; the worker finishes it for nobody");
            }
            lease.worker.release(self.job);
        }
    }
}

fn error_body(code: ErrorCode, message: impl Into<String>) -> EventBody {
    JobError::new(code, message).into()
}

fn sleep_until_ms(deadline_ms: Option<u64>) -> tokio::time::Sleep {
    let left = deadline_ms.map_or(Duration::from_secs(365 * 24 * 3600), |d| Duration::from_millis(d.saturating_sub(now_ms())));
    tokio::time::sleep(left)
}

impl<'a> Run<'a> {
    pub fn new(ctx: &'a JobCtx, msg: &'a jetstream::Message, env: &'a Envelope, claimed: Instant, cancel: CancellationToken) -> Self {
        Self { ctx, msg, env, claimed, cancel, written: AtomicU64::new(0) }
    }

    /// Notes the revision this task just wrote the record at.
    pub fn wrote(&self, revision: u64) {
        self.written.store(revision, Ordering::Relaxed);
    }

    /// The record as this task last wrote it, if it knows the revision (the
    /// next write is then tried without a read; see [`rbee_broker::records::Records::transition_from`]).
    fn guess(&self, rec: &JobRecord) -> Option<Versioned> {
        match self.written.swap(0, Ordering::Relaxed) {
            0 => None,
            revision => Some(Versioned { record: rec.clone(), revision }),
        }
    }

    pub async fn go(self, claim: Claim, prepared: Result<(Prepared, ModelEntry), JobError>, slot: SlotGuard, early: Option<Early>) {
        let sink = |seq| EventSink::new(self.ctx.client.clone(), &self.env.reply_to, &self.env.job_id, self.env.encoding, seq);
        match claim {
            Claim::Run { attempt, next_seq, resume, vanished, record, revision } => {
                self.wrote(revision);
                let mut s = sink(next_seq);
                // A worker that already started the job serves only a fresh first attempt.
                let early = early.filter(|_| attempt == 1 && next_seq == 0 && resume.is_none() && !vanished);
                self.run(&mut s, attempt, resume, vanished, record, prepared, slot, early).await;
            }
            Claim::Ended(rec) => {
                drop(early);
                tracing::info!(state = rec.state.as_str(), "job ended before; not running it again");
                if let Some(t) = &rec.terminal {
                    let _ = sink(t.seq).resend(t).await;
                }
                let _ = self.msg.ack().await;
            }
            Claim::Duplicate => {
                tracing::info!("a message with this job id is already being worked on; dropping the duplicate");
                let _ = self.msg.ack().await;
            }
            Claim::Cancelled { record, .. } => {
                let mut s = sink(record.next_seq);
                let timings = Timings { queued_ms: self.env.queued_ms, ..Timings::default() };
                let done = cancelled_done(Usage::default(), timings, 0);
                self.end(&mut s, record, JobState::Cancelled, done, AckKind::Term).await;
            }
            Claim::Unavailable(e) => {
                tracing::warn!(error = %e, "job records unavailable; handing the job back");
                let _ = self.msg.ack_with(AckKind::Nak(Some(Duration::from_secs(2)))).await;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        sink: &mut EventSink,
        attempt: u32,
        resume: Option<Resume>,
        vanished: bool,
        rec: JobRecord,
        prepared: Result<(Prepared, ModelEntry), JobError>,
        slot: SlotGuard,
        early: Option<Early>,
    ) {
        let (prepared, entry) = match prepared {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(code = %e.code, message = %e.message, "job rejected");
                let state = if e.code == ErrorCode::DeadlineExceeded { JobState::Expired } else { JobState::Failed };
                return self.end(sink, rec, state, e.into(), AckKind::Term).await;
            }
        };
        if prepared.expired() {
            let e = error_body(ErrorCode::DeadlineExceeded, "the job's deadline passed before it could start");
            return self.end(sink, rec, JobState::Expired, e, AckKind::Term).await;
        }
        if attempt > self.ctx.max_attempts {
            return self.dead(sink, rec, attempt - 1).await;
        }
        if vanished && sink.next_seq() > 0 {
            let reason = "the previous attempt's hive stopped without handing the job back".to_owned();
            let _ = sink.emit(EventBody::Restarted(Restarted { attempt: attempt - 1, reason, resume: false })).await;
        }

        if let Some(early) = early {
            let (lease, job, rx) = early.take();
            return self.generate(sink, lease, attempt, rec, &prepared, resume, &entry.key, slot, Some((job, rx))).await;
        }

        // Wait for a worker, sending in-progress acks; a cancel or deadline ends the wait.
        let lease = {
            let lease = self.ctx.pool.lease(&entry, prepared.keep_alive_ms);
            tokio::pin!(lease);
            let deadline = sleep_until_ms(prepared.deadline_ms);
            tokio::pin!(deadline);
            let mut progress = super::progress_acks(self.ctx.ack_wait);
            loop {
                tokio::select! {
                    l = &mut lease => break l,
                    _ = progress.tick() => { let _ = self.msg.ack_with(AckKind::Progress).await; }
                    _ = self.cancel.cancelled() => {
                        let done = cancelled_done(Usage::default(), self.timings(None, 0.0, None), prepared.params.sampling.seed);
                        return self.end(sink, rec, JobState::Cancelled, done, AckKind::Ack).await;
                    }
                    _ = &mut deadline => {
                        let e = error_body(ErrorCode::DeadlineExceeded, "the job's deadline passed while its model was loading");
                        return self.end(sink, rec, JobState::Expired, e, AckKind::Ack).await;
                    }
                    _ = self.ctx.hand_back.cancelled() => {
                        return self.retry(sink, rec, attempt, "the hive is shutting down".into(), resume, true).await;
                    }
                }
            }
        };
        let lease = match lease {
            Ok(l) => l,
            Err(e) => return self.end(sink, rec, JobState::Failed, e.into(), AckKind::Term).await,
        };
        self.generate(sink, lease, attempt, rec, &prepared, resume, &entry.key, slot, None).await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn generate(
        &self,
        sink: &mut EventSink,
        lease: Lease,
        attempt: u32,
        mut rec: JobRecord,
        prepared: &Prepared,
        resume: Option<Resume>,
        model: &str,
        slot: SlotGuard,
        running: Option<(u64, tokio::sync::mpsc::Receiver<WorkerMsg>)>,
    ) {
        let worker = lease.worker.clone();
        let params: &GenerateParams = &prepared.params;
        let started = EventBody::Started(Started {
            hive: self.ctx.hive_id.clone(),
            worker: worker.id.clone(),
            model: model.to_owned(),
            cold: lease.cold,
            attempt,
        });
        rec.worker = Some(worker.id.clone());
        let noting = self.note_worker(&worker.id);
        let mut tokens = resume.as_ref().map(|r| r.tokens.clone()).unwrap_or_default();
        let mut streamed = resume.as_ref().map_or(0, |r| r.streamed_bytes);
        let mut first_token: Option<Instant> = None;
        let mut stopping: Option<(Stop, Instant)> = None;
        let ended = match sink.emit(started).await {
            Err(e) => Ended::Died(format!("publishing failed: {e}")),
            // A job started early is on the worker already.
            Ok(_) => match if let Some(r) = running { Ok(r) } else { worker.run(params.clone(), resume).await } {
                Err(reason) => Ended::Died(reason),
                Ok((job, mut rx)) => {
                    let mut progress = super::progress_acks(self.ctx.ack_wait);
                    let deadline = sleep_until_ms(prepared.deadline_ms);
                    tokio::pin!(deadline);
                    let grace = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
                    tokio::pin!(grace);
                    let end = loop {
                        let stop = tokio::select! {
                            m = rx.recv() => match m {
                                Some(WorkerMsg::Token(id, text)) => {
                                    if id != u32::MAX {
                                        tokens.push(id);
                                    }
                                    if !text.is_empty() {
                                        first_token.get_or_insert_with(Instant::now);
                                        streamed += text.len() as u64;
                                        if let Err(e) = sink.emit(EventBody::Token(Token { text })).await {
                                            worker.cancel(job).await;
                                            break Ended::Died(format!("publishing failed: {e}"));
                                        }
                                    }
                                    None
                                }
                                Some(WorkerMsg::Finished(o)) => break Ended::Finished(o),
                                Some(WorkerMsg::Failed(e)) => break Ended::Failed(e),
                                Some(WorkerMsg::Exited(reason)) => break Ended::Died(reason),
                                None => break Ended::Died(worker.exit_reason().unwrap_or_else(|| "worker gone".to_owned())),
                            },
                            _ = progress.tick() => { let _ = self.msg.ack_with(AckKind::Progress).await; None }
                            _ = self.cancel.cancelled(), if stopping.is_none() => Some(Stop::Cancel),
                            _ = &mut deadline, if stopping.is_none() => Some(Stop::Deadline),
                            _ = self.ctx.hand_back.cancelled(), if stopping.is_none() => Some(Stop::HandBack),
                            _ = &mut grace, if stopping.is_some() => {
                                tracing::warn!(worker = %worker.id, "worker did not stop the job in time; killing it");
                                worker.kill();
                                break Ended::Stopped;
                            }
                        };
                        if let Some(stop) = stop {
                            worker.cancel(job).await;
                            stopping = Some((stop, Instant::now()));
                            grace.as_mut().reset(tokio::time::Instant::now() + STOP_GRACE);
                        }
                    };
                    worker.release(job);
                    end
                }
            },
        };
        drop(noting);
        let load_ms = lease.load_ms;
        drop(lease); // the worker is free for the next job
        let timings = |o: Option<&Outcome>| self.timings(first_token, load_ms, o);
        let stop = stopping.map(|s| s.0);
        let resume_now = Resume { tokens, streamed_bytes: streamed };
        match (ended, stop) {
            (Ended::Finished(o), None) | (Ended::Finished(o), Some(_)) if o.stop_reason != StopReason::Cancelled => {
                let done = EventBody::Done(Done::generation(o.stop_reason, o.usage, timings(Some(&o)), params.sampling.seed));
                self.finish(sink, rec, JobState::Done, done, slot).await;
            }
            (Ended::Failed(e), None) => {
                tracing::info!(code = %e.code, message = %e.message, "job failed in the worker");
                self.finish(sink, rec, JobState::Failed, e.into(), slot).await;
            }
            (Ended::Died(reason), None) => {
                drop(slot);
                self.retry(sink, rec, attempt, reason, Some(resume_now), false).await;
            }
            (_, Some(Stop::HandBack)) => {
                drop(slot);
                self.retry(sink, rec, attempt, "the hive is shutting down".into(), Some(resume_now), true).await;
            }
            (end, Some(Stop::Deadline)) => {
                let _ = end;
                let e = error_body(ErrorCode::DeadlineExceeded, "the job's deadline passed while it was generating");
                self.finish(sink, rec, JobState::Expired, e, slot).await;
            }
            (end, _) => {
                // Cancelled (the worker reports stop reason `cancelled`, or died while stopping).
                let (usage, o) = match &end {
                    Ended::Finished(o) => (o.usage, Some(o)),
                    _ => (Usage::default(), None),
                };
                let done = cancelled_done(usage, timings(o), params.sampling.seed);
                self.finish(sink, rec, JobState::Cancelled, done, slot).await;
            }
        }
    }

    fn timings(&self, first_token: Option<Instant>, load_ms: f64, o: Option<&Outcome>) -> Timings {
        let now = Instant::now();
        Timings {
            queued_ms: self.env.queued_ms,
            load_ms,
            ttft_ms: ms(first_token.unwrap_or(now) - self.claimed),
            total_ms: ms(now - self.claimed),
            prompt_tps: o.map_or(0.0, |o| if o.prompt_ms > 0.0 { o.usage.prompt_tokens as f64 / (o.prompt_ms / 1e3) } else { 0.0 }),
            decode_tps: o.map_or(0.0, |o| o.decode_tps),
        }
    }

    /// Records which worker runs the job (for `rbee jobs show`), off the hot
    /// path: only once the job has run for [`NOTE_WORKER_AFTER`], so a short
    /// job costs no extra record writes (its terminal record names the worker)
    /// and a long one's write does not compete with its first token. Dropping
    /// the guard (the job ended) calls it off.
    fn note_worker(&self, worker: &str) -> tokio_util::sync::DropGuard {
        let records = self.ctx.records.clone();
        let (job_id, worker) = (self.env.job_id.clone(), worker.to_owned());
        let ended = CancellationToken::new();
        let called_off = ended.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = called_off.cancelled() => return,
                _ = tokio::time::sleep(NOTE_WORKER_AFTER) => {}
            }
            let _ = records
                .transition(&job_id, |cur| match cur {
                    Some(v) if v.record.state == JobState::Running && v.record.worker.as_deref() != Some(&worker) => {
                        let mut r = v.record.clone();
                        r.worker = Some(worker.clone());
                        Decision::Write(r, ())
                    }
                    _ => Decision::Keep(()),
                })
                .await;
        });
        ended.drop_guard()
    }

    /// Ends a job that ran: the slot is freed once the terminal event is out.
    async fn finish(&self, sink: &mut EventSink, rec: JobRecord, state: JobState, body: EventBody, slot: SlotGuard) {
        let recorded = self.end_inner(sink, rec, state, body).await;
        drop(slot);
        if recorded {
            if let Err(e) = self.msg.ack().await {
                tracing::error!(error = %e, "acking the finished job failed");
            }
        }
    }

    /// Ends a job: terminal record first (with its event), then the event, then `ack`.
    pub(crate) async fn end(&self, sink: &mut EventSink, rec: JobRecord, state: JobState, body: EventBody, ack: AckKind) {
        if self.end_inner(sink, rec, state, body).await {
            if let Err(e) = self.msg.ack_with(ack).await {
                tracing::error!(error = %e, "acknowledging the ended job failed");
            }
        }
    }

    /// Waits until the job's earlier events are kept, writes the terminal
    /// record, then publishes its event. False when the
    /// record could not be written (the broker stayed away for
    /// [`TERMINAL_WRITE_FOR`]): the event is published anyway, for the
    /// producer waiting on it, and the job's message is left unacknowledged,
    /// so that its redelivery repairs the record from the kept event (see
    /// [`super::claim`]).
    async fn end_inner(&self, sink: &mut EventSink, rec: JobRecord, state: JobState, body: EventBody) -> bool {
        // Every earlier event is kept before the record says the job ended.
        // A hive that dies in between (its broker away, republishing) then
        // leaves a running record, and the job is taken over and resumed;
        // the other order left an ended job whose stream lacked its last
        // tokens, and a client following it waited for them for ever.
        sink.flush().await;
        let event = Event::new(self.env.job_id.clone(), sink.next_seq(), body.clone());
        let mut guess = self.guess(&rec);
        let mut terminal = rec;
        terminal.end_with(state, event, now_ms());
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        let written = loop {
            let written = self
                .ctx
                .records
                .transition_from(&self.env.job_id, guess.take(), |cur| match cur {
                    Some(v) if v.record.state.is_terminal() => Decision::Keep(Some(v.record.clone())),
                    Some(v) => {
                        let mut t = terminal.clone();
                        t.cancel_requested = v.record.cancel_requested;
                        Decision::Write(t, None)
                    }
                    None => Decision::Write(terminal.clone(), None),
                })
                .await;
            match written {
                // A broker restarting, or its JetStream not back yet: the
                // record is the job's fate, so wait for it (keeping the
                // message ours) rather than leave it running forever.
                Err(e) if started.elapsed() < TERMINAL_WRITE_FOR => {
                    tracing::warn!(error = %e, "writing the terminal job record failed; trying again");
                    let _ = self.msg.ack_with(AckKind::Progress).await;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                written => break written,
            }
        };
        let recorded = match written {
            // None: written now. The same terminal: written by a try that
            // timed out but had reached the broker.
            Ok((None, _)) => true,
            Ok((Some(other), _)) if other.terminal == terminal.terminal => true,
            Ok((Some(other), _)) => {
                tracing::warn!(state = other.state.as_str(), "the job had already ended elsewhere");
                if let Some(t) = &other.terminal {
                    let _ = sink.resend(t).await;
                }
                return true;
            }
            Err(e) => {
                tracing::error!(error = %e, "writing the terminal job record failed; publishing the event anyway and leaving the job for redelivery to record");
                false
            }
        };
        if let Err(e) = sink.emit(body).await {
            tracing::error!(error = %e, "publishing the terminal event failed");
        }
        // A job that went well is in its record and its events; a line for it
        // on the log bus would be one more stream write per job. On stderr
        // with RBEE_LOG=debug.
        match state {
            JobState::Done => tracing::debug!(state = state.as_str(), total_ms = ms(self.claimed.elapsed()), "job ended"),
            _ => tracing::info!(state = state.as_str(), total_ms = ms(self.claimed.elapsed()), "job ended"),
        }
        recorded
    }

    /// Hands the job back for another attempt, carrying what was generated.
    async fn retry(&self, sink: &mut EventSink, rec: JobRecord, attempt: u32, reason: String, resume: Option<Resume>, shutdown: bool) {
        if !shutdown && attempt >= self.ctx.max_attempts {
            let mut rec = rec;
            rec.error_message = Some(reason);
            return self.dead(sink, rec, attempt).await;
        }
        tracing::warn!(%reason, attempt, "attempt failed; handing the job back");
        let resumable = resume.as_ref().is_some_and(|r| !r.tokens.is_empty());
        let restarted = EventBody::Restarted(Restarted { attempt, reason: reason.clone(), resume: resumable });
        let _ = sink.emit(restarted).await;
        // The next attempt continues after the last kept event: keep them all first.
        sink.flush().await;
        let guess = self.guess(&rec);
        let mut next = rec;
        next.state = JobState::Retrying;
        next.next_seq = sink.next_seq();
        next.resume = if resumable { resume } else { None };
        next.worker = None;
        next.updated_at_ms = now_ms();
        if shutdown {
            next.attempts = attempt.saturating_sub(1); // a hand-back is not a failed attempt
        } else {
            next.error_code = Some(ErrorCode::WorkerCrashed);
            next.error_message = Some(reason);
        }
        let written = self
            .ctx
            .records
            .transition_from(&self.env.job_id, guess, |cur| match cur {
                Some(v) if v.record.state.is_terminal() => Decision::Keep(()),
                Some(v) => {
                    let mut n = next.clone();
                    n.cancel_requested = v.record.cancel_requested;
                    Decision::Write(n, ())
                }
                None => Decision::Write(next.clone(), ()),
            })
            .await;
        if let Err(e) = written {
            // Still handed back: the next claim finds the record "running" from
            // this same message and takes the job over as vanished (a restart
            // from the kept events, without resume tokens).
            tracing::warn!(error = %e, "could not mark the job retrying in its record; the next attempt takes it over as vanished");
        }
        let backoff = if shutdown {
            None
        } else {
            let base = self.ctx.retry_backoff.saturating_mul(1 << attempt.saturating_sub(1).min(5));
            Some(base.min(Duration::from_secs(30)))
        };
        if let Err(e) = self.msg.ack_with(AckKind::Nak(backoff)).await {
            tracing::error!(error = %e, "handing the job back failed; it returns after ack_wait");
        }
    }

    /// Out of attempts: keep the original job as a dead letter, end with `WORKER_CRASHED`.
    async fn dead(&self, sink: &mut EventSink, rec: JobRecord, attempts: u32) {
        let last = rec.error_message.clone().unwrap_or_else(|| "its hive or worker kept dying".to_owned());
        let mut headers = self.msg.headers.clone().unwrap_or_default();
        headers.insert(HEADER_ORIGINAL_SUBJECT, self.msg.subject.as_str());
        headers.insert(HEADER_LAST_ERROR, ErrorCode::WorkerCrashed.as_str());
        let js = jetstream::new(self.ctx.client.clone());
        let kept = match js.publish_with_headers(subjects::dead_subject(&self.env.job_id), headers, self.msg.payload.clone()).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if !kept {
            tracing::error!("could not keep the dead job in RBEE_DEAD; it cannot be retried with rbee jobs retry");
        }
        let e = error_body(
            ErrorCode::WorkerCrashed,
            format!("the job failed on all {attempts} attempts (last: {last}); resubmit it with: rbee jobs retry {}", self.env.job_id),
        );
        self.end(sink, rec, JobState::Dead, e, AckKind::Term).await;
    }
}

fn cancelled_done(usage: Usage, timings: Timings, seed: u64) -> EventBody {
    EventBody::Done(Done::generation(StopReason::Cancelled, usage, timings, seed))
}
