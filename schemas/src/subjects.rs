//! Subject, stream, consumer and KV bucket names: the one place they are spelled.
//!
//! | what | name |
//! |---|---|
//! | inference jobs, interactive lane | `rbee.jobs.infer.<model key>` |
//! | inference jobs, batch lane | `rbee.jobs.batch.<model key>` |
//! | job events (always kept here; also sent to `reply_to`) | `rbee.events.<job id>` |
//! | cancel requests (core NATS) | `rbee.cancel.<job id>` |
//! | jobs stream (work queue) | `RBEE_JOBS` over `rbee.jobs.>` |
//! | events stream (replay) | `RBEE_EVENTS` over `rbee.events.>` |
//! | dead letters (jobs out of attempts) | `RBEE_DEAD` over `rbee.dead.>` |
//! | the shared consumers | `rbee-infer`, `rbee-batch` |
//! | lifecycle jobs | `rbee.jobs.ctl.<hive id>`, `rbee.jobs.ctl.any` |
//! | hive heartbeats (KV, TTL) | `rbee-hives` |
//! | workers (KV, TTL) | `rbee-workers` |
//! | cold-start and scale-out leases (KV, TTL) | `rbee-leases` |
//! | job records (KV) | `rbee-jobs` |
//! | hive log lines | `rbee.logs.<hive id>`, kept in `RBEE_LOGS` |

/// Prefix of every inference job subject; the last token is the model key.
pub const INFER_PREFIX: &str = "rbee.jobs.infer";
/// Filter that matches every inference job.
pub const INFER_FILTER: &str = "rbee.jobs.infer.>";
/// Prefix of batch-lane inference jobs; the last token is the model key.
pub const BATCH_PREFIX: &str = "rbee.jobs.batch";
/// Filter that matches every batch-lane job.
pub const BATCH_FILTER: &str = "rbee.jobs.batch.>";
/// Prefix of the default per-job event subjects.
pub const EVENTS_PREFIX: &str = "rbee.events";
/// Prefix of cancel requests (core NATS, heard by every hive).
pub const CANCEL_PREFIX: &str = "rbee.cancel";
/// Prefix of dead letters: the original job of a job that ran out of attempts.
pub const DEAD_PREFIX: &str = "rbee.dead";

/// The work-queue stream that holds submitted jobs until a hive acks them.
pub const JOBS_STREAM: &str = "RBEE_JOBS";
/// Subjects captured by [`JOBS_STREAM`].
pub const JOBS_STREAM_SUBJECTS: &str = "rbee.jobs.>";
/// The events stream: every event on `rbee.events.>` is kept for replay.
pub const EVENTS_STREAM: &str = "RBEE_EVENTS";
/// Subjects captured by [`EVENTS_STREAM`].
pub const EVENTS_STREAM_SUBJECTS: &str = "rbee.events.>";
/// The durable pull consumer every hive claims interactive jobs from.
pub const INFER_CONSUMER: &str = "rbee-infer";
/// The durable pull consumer every hive claims batch jobs from.
pub const BATCH_CONSUMER: &str = "rbee-batch";
/// Dead letters, kept for `rbee jobs retry`.
pub const DEAD_STREAM: &str = "RBEE_DEAD";
/// Subjects captured by [`DEAD_STREAM`].
pub const DEAD_STREAM_SUBJECTS: &str = "rbee.dead.>";
/// KV bucket of live hives: key = hive id, value = [`crate::hive::HiveInfo`], with a TTL.
pub const HIVES_BUCKET: &str = "rbee-hives";
/// KV bucket of job records: key = job id, value = [`crate::record::JobRecord`].
pub const JOBS_BUCKET: &str = "rbee-jobs";
/// KV bucket of workers: key = worker id, value = [`crate::hive::WorkerInfo`], with a TTL.
pub const WORKERS_BUCKET: &str = "rbee-workers";
/// KV bucket of cold-start and scale-out leases: key = `cold.<hex of the model key>` or
/// `scale.<hex of the model key>`, value = hive id.
pub const LEASES_BUCKET: &str = "rbee-leases";
/// The stream that keeps hives' log lines (`rbee.logs.<hive id>`).
pub const LOGS_STREAM: &str = "RBEE_LOGS";
/// Prefix of log subjects.
pub const LOGS_PREFIX: &str = "rbee.logs";

/// Where `hive_id` publishes its (and its workers') log lines.
pub fn logs_subject(hive_id: &str) -> String {
    format!("{LOGS_PREFIX}.{hive_id}")
}

/// The lease key for cold-starting `model_key` (KV keys allow no `%`, `:`).
pub fn cold_start_lease_key(model_key: &str) -> String {
    format!("cold.{}", hex(model_key))
}

/// The key a hive creates to start a second worker for `model_key`, which
/// another hive serves (one such start per model per bucket TTL).
pub fn scale_out_key(model_key: &str) -> String {
    format!("scale.{}", hex(model_key))
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Message header carrying the job id (JetStream's dedup key).
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// Message header selecting the body encoding.
pub const HEADER_CONTENT_TYPE: &str = "Content-Type";
/// Dead-letter header: the subject the job was first published to.
pub const HEADER_ORIGINAL_SUBJECT: &str = "Rbee-Original-Subject";
/// Dead-letter header: the job's last error code.
pub const HEADER_LAST_ERROR: &str = "Rbee-Last-Error";

/// A job's priority lane, chosen by its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// `rbee.jobs.infer.*`: served first.
    #[default]
    Interactive,
    /// `rbee.jobs.batch.*`: served when no interactive job waits, and at
    /// least every fourth claim when both lanes have work.
    Batch,
}

impl Lane {
    pub fn prefix(self) -> &'static str {
        match self {
            Lane::Interactive => INFER_PREFIX,
            Lane::Batch => BATCH_PREFIX,
        }
    }

    pub fn consumer(self) -> &'static str {
        match self {
            Lane::Interactive => INFER_CONSUMER,
            Lane::Batch => BATCH_CONSUMER,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Interactive => "interactive",
            Lane::Batch => "batch",
        }
    }
}

/// The subject a job for `model_key` is published to in `lane`.
pub fn job_subject(lane: Lane, model_key: &str) -> String {
    format!("{}.{model_key}", lane.prefix())
}

/// The lane and model key of a job subject.
pub fn parse_job_subject(subject: &str) -> Option<(Lane, &str)> {
    for lane in [Lane::Interactive, Lane::Batch] {
        if let Some(key) = subject.strip_prefix(lane.prefix()).and_then(|r| r.strip_prefix('.')) {
            return Some((lane, key));
        }
    }
    None
}

/// Where cancel requests for `job_id` go.
pub fn cancel_subject(job_id: &str) -> String {
    format!("{CANCEL_PREFIX}.{job_id}")
}

/// Where the dead letter of `job_id` is kept.
pub fn dead_subject(job_id: &str) -> String {
    format!("{DEAD_PREFIX}.{job_id}")
}

/// The subject a job for `model_key` is published to.
pub fn infer_subject(model_key: &str) -> String {
    format!("{INFER_PREFIX}.{model_key}")
}

/// The default subject for the events of `job_id`.
pub fn events_subject(job_id: &str) -> String {
    format!("{EVENTS_PREFIX}.{job_id}")
}

/// The model key of a job subject of either lane.
pub fn model_key_of(subject: &str) -> Option<&str> {
    parse_job_subject(subject).map(|(_, key)| key)
}

/// Whether `subject` is a valid subject to publish to: non-empty tokens, no
/// wildcards, no whitespace, at most 256 bytes.
pub fn is_valid_publish_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.len() <= 256
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.chars().any(|c| c.is_whitespace() || c == '\0')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_built_and_parsed() {
        assert_eq!(infer_subject("smollm2-135m"), "rbee.jobs.infer.smollm2-135m");
        assert_eq!(events_subject("job-1"), "rbee.events.job-1");
        assert_eq!(model_key_of("rbee.jobs.infer.smollm2-135m"), Some("smollm2-135m"));
        assert_eq!(model_key_of("rbee.jobs.inferx"), None);
        assert_eq!(model_key_of("rbee.jobs.other.x"), None);
        assert_eq!(parse_job_subject("rbee.jobs.batch.m"), Some((Lane::Batch, "m")));
        assert_eq!(parse_job_subject("rbee.jobs.infer.m"), Some((Lane::Interactive, "m")));
        assert_eq!(job_subject(Lane::Batch, "m"), "rbee.jobs.batch.m");
        assert_eq!(cancel_subject("j"), "rbee.cancel.j");
    }

    #[test]
    fn publish_subjects_are_validated() {
        assert!(is_valid_publish_subject("_INBOX.abc.def"));
        assert!(!is_valid_publish_subject(""));
        assert!(!is_valid_publish_subject("a..b"));
        assert!(!is_valid_publish_subject("a.*"));
        assert!(!is_valid_publish_subject("a.>"));
        assert!(!is_valid_publish_subject("a b"));
        assert!(!is_valid_publish_subject(&"a".repeat(257)));
    }
}
