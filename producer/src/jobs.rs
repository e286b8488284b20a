//! The job API beyond submitting: look a job up, list jobs, cancel, retry a
//! dead one, and the queue depth per model.
//!
//! A job's state is its record in `rbee-jobs` once a hive claimed it; before
//! that it is a message in the queue (state `queued`). Cancelling follows the
//! records' compare-and-set rule: a queued job is cancelled by creating its
//! record in state `cancelled` (so no hive will start it), publishing its
//! terminal event and deleting its message; a running job gets
//! `cancel_requested` and a `rbee.cancel.<id>` message, and its hive ends it.

use async_nats::HeaderMap;
use rbee_broker::events::publish_once;
use rbee_broker::queue::{self, Queued};
use rbee_broker::records::{Decision, Records};
use rbee_schemas::codec::Encoding;
use rbee_schemas::event::{Done, Event, EventBody, StopReason, Timings, Usage};
use rbee_schemas::job::JobProbe;
use rbee_schemas::record::{JobRecord, JobState};
use rbee_schemas::subjects::{self, Lane, HEADER_CONTENT_TYPE, HEADER_MSG_ID, HEADER_ORIGINAL_SUBJECT};

use crate::{broker_err, Client, ClientError};

/// Queue entries looked through to find one job.
const FIND_LIMIT: usize = 100_000;

/// What a cancel request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was waiting in the queue: it will never start; its `done` (cancelled) event is out.
    Cancelled,
    /// It is running (or between attempts): its hive stops it within about one token.
    Requested { hive: Option<String> },
    /// It had ended already, in this state; nothing changed.
    AlreadyEnded(JobState),
}

/// Jobs waiting for one model in one lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub lane: Lane,
    pub model: String,
    /// Jobs in the stream (waiting, or claimed and not yet acked).
    pub jobs: u64,
    /// When the oldest arrived, Unix ms.
    pub oldest_ms: Option<u64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn queued_record(q: &Queued) -> JobRecord {
    let mut r = JobRecord::new(&q.job_id, JobState::Queued, &subjects::events_subject(&q.job_id), q.received_ms);
    r.model = q.model_key.clone();
    r.lane = q.lane;
    r.stream_seq = Some(q.seq);
    r.submitted_at_ms = q.received_ms;
    r
}

impl Client {
    async fn records(&self) -> Result<Records, ClientError> {
        let kv = self
            .jetstream()
            .get_key_value(subjects::JOBS_BUCKET)
            .await
            .map_err(|_| ClientError::Broker("no rbee job records on this broker: no hive has attached to it yet".into()))?;
        Ok(Records::new(kv))
    }

    async fn jobs_stream(&self) -> Result<async_nats::jetstream::stream::Stream, ClientError> {
        self.jetstream().get_stream(subjects::JOBS_STREAM).await.map_err(|_| ClientError::NoStream(subjects::JOBS_STREAM.into()))
    }

    /// One job: its record, or its queue entry as a `queued` record.
    pub async fn job(&self, job_id: &str) -> Result<JobRecord, ClientError> {
        if let Some(v) = self.records().await?.get(job_id).await.map_err(broker_err)? {
            return Ok(v.record);
        }
        let jobs = self.jobs_stream().await?;
        match queue::find(&jobs, job_id, FIND_LIMIT).await.map_err(broker_err)? {
            Some(q) => Ok(queued_record(&q)),
            None => Err(ClientError::NotFound(job_id.to_owned())),
        }
    }

    /// Every job with a record, and up to `queued_limit` waiting ones; newest first.
    pub async fn jobs(&self, queued_limit: usize) -> Result<Vec<JobRecord>, ClientError> {
        let mut out = self.records().await?.list().await.map_err(broker_err)?;
        let jobs = self.jobs_stream().await?;
        for q in queue::scan(&jobs, 1, queued_limit).await.map_err(broker_err)? {
            if !out.iter().any(|r| r.job_id == q.job_id) {
                out.push(queued_record(&q));
            }
        }
        out.sort_by(|a, b| b.submitted_at_ms.cmp(&a.submitted_at_ms).then(b.updated_at_ms.cmp(&a.updated_at_ms)));
        Ok(out)
    }

    /// Jobs in the queue per lane and model, with the age of the oldest.
    pub async fn queue_depth(&self) -> Result<Vec<QueueDepth>, ClientError> {
        let mut jobs = self.jobs_stream().await?;
        let depth = queue::depth(&mut jobs).await.map_err(broker_err)?;
        Ok(depth.into_iter().map(|((lane, model), (jobs, oldest_ms))| QueueDepth { lane, model, jobs, oldest_ms }).collect())
    }

    /// Cancels a job (idempotent; see the module docs).
    pub async fn cancel(&self, job_id: &str) -> Result<CancelOutcome, ClientError> {
        let records = self.records().await?;
        for _ in 0..8 {
            match records.get(job_id).await.map_err(broker_err)? {
                Some(v) if v.record.state.is_terminal() => return Ok(CancelOutcome::AlreadyEnded(v.record.state)),
                Some(v) => {
                    if !v.record.cancel_requested {
                        let mut r = v.record.clone();
                        r.cancel_requested = true;
                        r.updated_at_ms = now_ms();
                        if records.update(&r, v.revision).await.map_err(broker_err)?.is_none() {
                            continue; // it moved on: look again
                        }
                    }
                    self.nats()
                        .publish(subjects::cancel_subject(job_id), Bytes::from_static(br#"{"v":1}"#))
                        .await
                        .map_err(broker_err)?;
                    let _ = self.nats().flush().await;
                    return Ok(CancelOutcome::Requested { hive: v.record.hive });
                }
                None => {
                    let jobs = self.jobs_stream().await?;
                    let Some(q) = queue::find(&jobs, job_id, FIND_LIMIT).await.map_err(broker_err)? else {
                        return Err(ClientError::NotFound(job_id.to_owned()));
                    };
                    let encoding = Encoding::from_content_type(q.message.headers.get(HEADER_CONTENT_TYPE).map(|v| v.as_str())).unwrap_or_default();
                    let probe: JobProbe = encoding.decode(&q.message.payload).unwrap_or_default();
                    let reply_to = probe
                        .reply_to
                        .filter(|r| subjects::is_valid_publish_subject(r))
                        .unwrap_or_else(|| subjects::events_subject(job_id));
                    let event = Event::new(
                        job_id,
                        0,
                        EventBody::Done(Done::generation(StopReason::Cancelled, Usage::default(), Timings::default(), 0)),
                    );
                    let mut r = queued_record(&q);
                    r.reply_to = reply_to.clone();
                    r.cancel_requested = true;
                    r.end_with(JobState::Cancelled, event.clone(), now_ms());
                    if records.create(&r).await.map_err(broker_err)?.is_none() {
                        continue; // a hive claimed it just now: cancel it as running
                    }
                    if !publish_once(self.nats(), job_id, &reply_to, encoding, &event).await {
                        return Err(ClientError::Broker("the cancelled event could not be published".into()));
                    }
                    // Gone from the queue; had a hive got it meanwhile, its record check stops it.
                    let _ = jobs.delete_message(q.seq).await;
                    return Ok(CancelOutcome::Cancelled);
                }
            }
        }
        Err(ClientError::Broker(format!("job {job_id} kept changing while it was being cancelled; try again")))
    }

    /// Resubmits a dead job (one that ran out of attempts) under a new id, which is returned.
    pub async fn retry(&self, job_id: &str) -> Result<String, ClientError> {
        let dead = self.jetstream().get_stream_no_info(subjects::DEAD_STREAM).await.map_err(broker_err)?;
        let msg = dead.get_last_raw_message_by_subject(&subjects::dead_subject(job_id)).await.map_err(|_| {
            ClientError::NotFound(format!(
                "{job_id} among dead jobs (only jobs that ran out of attempts can be retried; they are kept 7 days)"
            ))
        })?;
        let original = msg
            .headers
            .get(HEADER_ORIGINAL_SUBJECT)
            .map(|v| v.as_str().to_owned())
            .ok_or_else(|| ClientError::Broker(format!("dead letter of {job_id} has no {HEADER_ORIGINAL_SUBJECT}")))?;
        let records = self.records().await?;
        let mut new_id = None;
        for n in 1..=100 {
            let candidate = format!("{job_id}-retry{n}");
            if candidate.len() <= rbee_schemas::job::MAX_ID_LEN && records.get(&candidate).await.map_err(broker_err)?.is_none() {
                new_id = Some(candidate);
                break;
            }
        }
        let new_id = new_id.ok_or_else(|| ClientError::Usage(format!("no free retry id for {job_id}")))?;
        let mut headers = HeaderMap::new();
        for (name, values) in msg.headers.iter() {
            let n: &str = name.as_ref();
            if n.starts_with("Nats-") || n.starts_with("Rbee-") {
                continue;
            }
            for v in values {
                headers.append(n, v.as_str());
            }
        }
        headers.insert(HEADER_MSG_ID, new_id.as_str());
        self.jetstream()
            .publish_with_headers(original, headers, msg.payload.clone())
            .await
            .map_err(broker_err)?
            .await
            .map_err(broker_err)?;
        // Mark the dead job as retried, for `rbee jobs show`.
        let _ = records
            .transition(job_id, |cur| match cur {
                Some(v) if v.record.state == JobState::Dead => {
                    let mut r = v.record.clone();
                    r.error_message = Some(format!("{} (retried as {new_id})", r.error_message.clone().unwrap_or_default()));
                    Decision::Write(r, ())
                }
                _ => Decision::Keep(()),
            })
            .await;
        Ok(new_id)
    }
}

use bytes::Bytes;
