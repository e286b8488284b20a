//! The job record kept under the job id in the `rbee-jobs` KV bucket. A hive
//! writes it when it claims a job, when the job is handed back and when it ends;
//! the next attempt (on any hive) reads it to continue the event sequence and to
//! recognise a job that already ended.

use serde::{Deserialize, Serialize};

use crate::event::Event;

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    /// Handed back to the queue after a failed attempt.
    Retrying,
    Done,
    Failed,
    #[serde(other)]
    Unknown,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    #[serde(default = "crate::default_version")]
    pub v: u32,
    pub job_id: String,
    pub state: JobState,
    /// The hive of the latest attempt.
    pub hive: String,
    /// Attempts started so far.
    pub attempts: u32,
    /// The `seq` the next event of this job must carry.
    pub next_seq: u64,
    /// Where the events go.
    pub reply_to: String,
    /// Unix time in milliseconds.
    pub updated_at_ms: u64,
    /// The terminal event, once the job ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<Event>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoding;
    use crate::error::JobError;

    #[test]
    fn job_record_round_trips() {
        let rec = JobRecord {
            v: 1,
            job_id: "j".into(),
            state: JobState::Failed,
            hive: "h".into(),
            attempts: 2,
            next_seq: 9,
            reply_to: "rbee.events.j".into(),
            updated_at_ms: 5,
            terminal: Some(Event::new("j", 8, JobError::internal("x").into())),
        };
        for enc in [Encoding::Json, Encoding::Msgpack] {
            assert_eq!(enc.decode::<JobRecord>(&enc.encode(&rec)).unwrap(), rec);
        }
        assert!(rec.state.is_terminal());
    }
}
