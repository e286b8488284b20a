//! Reading the job queue without claiming from it: what waits, per model and
//! lane, and finding one job by id. Work-queue streams allow no second
//! consumer over the same subjects, so this walks the stream with direct gets
//! (`next_by_subj`, which takes wildcards on 2.9).

use std::collections::BTreeMap;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::Stream;
use rbee_schemas::codec::Encoding;
use rbee_schemas::job::JobProbe;
use rbee_schemas::subjects::{self, Lane, HEADER_CONTENT_TYPE, HEADER_MSG_ID};

/// A job waiting (or being worked on) in the jobs stream.
#[derive(Debug, Clone)]
pub struct Queued {
    pub seq: u64,
    pub subject: String,
    pub lane: Lane,
    pub model_key: String,
    pub job_id: String,
    pub received_ms: u64,
    pub message: StreamMessage,
}

fn unix_ms(t: time::OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

impl Queued {
    fn from_message(message: StreamMessage) -> Option<Self> {
        let (lane, key) = subjects::parse_job_subject(&message.subject)?;
        let header = |n: &str| message.headers.get(n).map(|v| v.as_str().to_owned());
        let encoding = Encoding::from_content_type(header(HEADER_CONTENT_TYPE).as_deref()).unwrap_or_default();
        let probe: JobProbe = encoding.decode(&message.payload).unwrap_or_default();
        let job_id = rbee_schemas::job::job_id(header(HEADER_MSG_ID), probe.id, message.sequence);
        Some(Self {
            seq: message.sequence,
            subject: message.subject.to_string(),
            lane,
            model_key: key.to_owned(),
            job_id,
            received_ms: unix_ms(message.time),
            message,
        })
    }
}

/// Up to `limit` jobs from stream sequence `from` on, oldest first.
pub async fn scan(jobs: &Stream, from: u64, limit: usize) -> Result<Vec<Queued>, async_nats::Error> {
    let mut out = Vec::new();
    let mut seq = from.max(1);
    while out.len() < limit {
        let msg = match jobs.direct_get_next_for_subject(subjects::JOBS_STREAM_SUBJECTS, Some(seq)).await {
            Ok(m) => m,
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(e.into()),
        };
        seq = msg.sequence + 1;
        if let Some(q) = Queued::from_message(msg) {
            out.push(q);
        }
    }
    Ok(out)
}

/// Finds the queued job with `job_id` among the first `limit` messages.
pub async fn find(jobs: &Stream, job_id: &str, limit: usize) -> Result<Option<Queued>, async_nats::Error> {
    let mut from = 1;
    let mut seen = 0;
    while seen < limit {
        let batch = scan(jobs, from, 256.min(limit - seen)).await?;
        let Some(last) = batch.last() else { return Ok(None) };
        from = last.seq + 1;
        seen += batch.len();
        if let Some(q) = batch.into_iter().find(|q| q.job_id == job_id) {
            return Ok(Some(q));
        }
    }
    Ok(None)
}

/// Per lane and model: jobs in the stream (waiting or being worked on) and
/// when the oldest arrived (Unix ms).
pub async fn depth(jobs: &mut Stream) -> Result<BTreeMap<(Lane, String), (u64, Option<u64>)>, async_nats::Error> {
    let info = jobs.info_with_subjects(subjects::JOBS_STREAM_SUBJECTS).await?;
    let mut subjects_counts = Vec::new();
    let mut info = info;
    while let Some(entry) = futures::StreamExt::next(&mut info).await {
        subjects_counts.push(entry?);
    }
    let mut out = BTreeMap::new();
    for (subject, count) in subjects_counts {
        let Some((lane, key)) = subjects::parse_job_subject(&subject) else { continue };
        let oldest = jobs.direct_get_first_for_subject(subject.clone()).await.ok().map(|m| unix_ms(m.time));
        out.insert((lane, key.to_owned()), (count as u64, oldest));
    }
    Ok(out)
}
