//! Subject, stream, consumer and KV bucket names: the one place they are spelled.
//!
//! | what | name |
//! |---|---|
//! | inference jobs | `rbee.jobs.infer.<model key>` |
//! | job events (default reply subject) | `rbee.events.<job id>` |
//! | jobs stream (work queue) | `RBEE_JOBS` over `rbee.jobs.>` |
//! | events stream (replay) | `RBEE_EVENTS` over `rbee.events.>` |
//! | the shared inference consumer | `rbee-infer` |
//! | hive heartbeats (KV, TTL) | `rbee-hives` |
//! | job records (KV) | `rbee-jobs` |

/// Prefix of every inference job subject; the last token is the model key.
pub const INFER_PREFIX: &str = "rbee.jobs.infer";
/// Filter that matches every inference job.
pub const INFER_FILTER: &str = "rbee.jobs.infer.>";
/// Prefix of the default per-job event subjects.
pub const EVENTS_PREFIX: &str = "rbee.events";

/// The work-queue stream that holds submitted jobs until a hive acks them.
pub const JOBS_STREAM: &str = "RBEE_JOBS";
/// Subjects captured by [`JOBS_STREAM`].
pub const JOBS_STREAM_SUBJECTS: &str = "rbee.jobs.>";
/// The events stream: every event on `rbee.events.>` is kept for replay.
pub const EVENTS_STREAM: &str = "RBEE_EVENTS";
/// Subjects captured by [`EVENTS_STREAM`].
pub const EVENTS_STREAM_SUBJECTS: &str = "rbee.events.>";
/// The durable pull consumer every hive claims inference jobs from.
pub const INFER_CONSUMER: &str = "rbee-infer";
/// KV bucket of live hives: key = hive id, value = [`crate::hive::HiveInfo`], with a TTL.
pub const HIVES_BUCKET: &str = "rbee-hives";
/// KV bucket of job records: key = job id, value = [`crate::record::JobRecord`].
pub const JOBS_BUCKET: &str = "rbee-jobs";

/// Message header carrying the job id (JetStream's dedup key).
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// Message header selecting the body encoding.
pub const HEADER_CONTENT_TYPE: &str = "Content-Type";

/// The subject a job for `model_key` is published to.
pub fn infer_subject(model_key: &str) -> String {
    format!("{INFER_PREFIX}.{model_key}")
}

/// The default subject for the events of `job_id`.
pub fn events_subject(job_id: &str) -> String {
    format!("{EVENTS_PREFIX}.{job_id}")
}

/// The model key of an inference subject: everything after `rbee.jobs.infer.`.
/// `None` when the subject is not an inference subject.
pub fn model_key_of(subject: &str) -> Option<&str> {
    subject
        .strip_prefix(INFER_PREFIX)
        .and_then(|rest| rest.strip_prefix('.'))
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
