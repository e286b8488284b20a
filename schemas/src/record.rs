//! The job record, kept under the job id in the `rbee-jobs` KV bucket.
//!
//! The record is where a job's fate is decided: every change of state is a
//! compare-and-set on it (create when a hive first claims the job, update with
//! the revision read), so exactly one party (a hive, a canceller, the deadline
//! sweeper) moves a job into a terminal state, and only that party publishes
//! the terminal event. A job still waiting in the queue has no record yet
//! (`rbee jobs` shows it as queued from the stream itself).

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::event::{Event, EventBody, StopReason, Timings, Usage};
use crate::subjects::Lane;

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting in the queue (derived from the stream; records start at `running`).
    Queued,
    Running,
    /// Handed back to the queue after a failed attempt; will run again.
    Retrying,
    Done,
    /// Ended with an error that retrying would not fix (bad input, unknown model, ...).
    Failed,
    Cancelled,
    /// Its deadline passed.
    Expired,
    /// Ran out of attempts; its job is kept in `RBEE_DEAD` for `rbee jobs retry`.
    Dead,
    #[serde(other)]
    Unknown,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Cancelled | JobState::Expired | JobState::Dead)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Expired => "expired",
            JobState::Dead => "dead",
            JobState::Unknown => "unknown",
        }
    }

    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Running,
        JobState::Retrying,
        JobState::Done,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Expired,
        JobState::Dead,
    ];
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown state {s:?}: use one of queued, running, retrying, done, failed, cancelled, expired, dead"))
    }
}

/// What a new attempt needs to continue a job whose worker died.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    /// Every token generated so far (including any whose text was not sent yet).
    pub tokens: Vec<u32>,
    /// Bytes of text already sent to the client.
    pub streamed_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    #[serde(default = "crate::default_version")]
    pub v: u32,
    pub job_id: String,
    /// The model key from the job's subject.
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub lane: Lane,
    pub state: JobState,
    /// The hive of the latest attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hive: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Attempts started so far.
    pub attempts: u32,
    /// The `seq` the next event of this job must carry.
    pub next_seq: u64,
    /// Where the events go (besides `rbee.events.<job id>`).
    pub reply_to: String,
    /// The jobs-stream sequence of the message this record follows: another
    /// message with the same job id (a resubmission after the de-duplication
    /// window) is recognised as a duplicate and not run twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_seq: Option<u64>,
    /// When the broker received the job, Unix ms.
    #[serde(default)]
    pub submitted_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Someone asked for the job to be cancelled.
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// The last error (of a failed attempt, or the one that ended the job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// For continuing after a worker crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
    /// The terminal event, once the job ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<Event>,
}

impl JobRecord {
    /// A fresh record in `state`.
    pub fn new(job_id: &str, state: JobState, reply_to: &str, now_ms: u64) -> Self {
        Self {
            v: crate::PROTOCOL_VERSION,
            job_id: job_id.to_owned(),
            model: String::new(),
            lane: Lane::Interactive,
            state,
            hive: None,
            worker: None,
            attempts: 0,
            next_seq: 0,
            reply_to: reply_to.to_owned(),
            stream_seq: None,
            submitted_at_ms: 0,
            updated_at_ms: now_ms,
            deadline_ms: None,
            cancel_requested: false,
            usage: None,
            timings: None,
            error_code: None,
            error_message: None,
            resume: None,
            terminal: None,
        }
    }

    /// Moves the record into terminal `state` with the job's last event:
    /// what that event carries (usage, timings, the error) goes into the
    /// record, and `next_seq` past it.
    pub fn end_with(&mut self, state: JobState, event: Event, now_ms: u64) {
        match &event.body {
            EventBody::Done(d) => {
                self.usage = Some(d.usage);
                self.timings = Some(d.timings);
            }
            EventBody::Error(e) => {
                self.error_code = Some(e.code);
                self.error_message = Some(e.message.clone());
            }
            _ => {}
        }
        self.state = state;
        self.next_seq = event.seq + 1;
        self.updated_at_ms = now_ms;
        self.resume = None;
        self.terminal = Some(event);
    }
}

impl JobState {
    /// The state a job is in after this terminal event; `None` for an event
    /// that does not end a job. Used to repair a record from the events
    /// stream when its terminal write was lost.
    pub fn ended_by(body: &EventBody) -> Option<JobState> {
        Some(match body {
            EventBody::Done(d) if d.stop_reason == StopReason::Cancelled => JobState::Cancelled,
            EventBody::Done(_) => JobState::Done,
            EventBody::Error(e) => match e.code {
                ErrorCode::Cancelled => JobState::Cancelled,
                ErrorCode::DeadlineExceeded => JobState::Expired,
                // Only a job out of attempts ends with WORKER_CRASHED.
                ErrorCode::WorkerCrashed => JobState::Dead,
                _ => JobState::Failed,
            },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoding;
    use crate::error::JobError;

    #[test]
    fn a_terminal_event_names_the_state_it_ends_in_and_fills_the_record() {
        use crate::event::Done;
        let done = |r| EventBody::Done(Done::generation(r, Usage::default(), Timings::default(), 1));
        let error = |c| EventBody::from(JobError::new(c, "x"));
        assert_eq!(JobState::ended_by(&done(StopReason::Eos)), Some(JobState::Done));
        assert_eq!(JobState::ended_by(&done(StopReason::Cancelled)), Some(JobState::Cancelled));
        assert_eq!(JobState::ended_by(&error(ErrorCode::Cancelled)), Some(JobState::Cancelled));
        assert_eq!(JobState::ended_by(&error(ErrorCode::DeadlineExceeded)), Some(JobState::Expired));
        assert_eq!(JobState::ended_by(&error(ErrorCode::WorkerCrashed)), Some(JobState::Dead));
        assert_eq!(JobState::ended_by(&error(ErrorCode::UnknownModel)), Some(JobState::Failed));
        assert_eq!(JobState::ended_by(&EventBody::Token(crate::event::Token { text: "a".into() })), None);

        let mut rec = JobRecord::new("j", JobState::Running, "rbee.events.j", 5);
        rec.resume = Some(Resume { tokens: vec![1], streamed_bytes: 1 });
        let event = Event::new("j", 7, error(ErrorCode::UnknownModel));
        let state = JobState::ended_by(&event.body).unwrap();
        rec.end_with(state, event.clone(), 9);
        assert_eq!((rec.state, rec.next_seq, rec.updated_at_ms), (JobState::Failed, 8, 9));
        assert_eq!(rec.error_code, Some(ErrorCode::UnknownModel));
        assert!(rec.resume.is_none());
        assert_eq!(rec.terminal, Some(event));
    }

    #[test]
    fn job_record_round_trips() {
        let mut rec = JobRecord::new("j", JobState::Dead, "rbee.events.j", 5);
        rec.attempts = 3;
        rec.next_seq = 9;
        rec.error_code = Some(ErrorCode::WorkerCrashed);
        rec.resume = Some(Resume { tokens: vec![1, 2, 3], streamed_bytes: 7 });
        rec.terminal = Some(Event::new("j", 8, JobError::internal("x").into()));
        for enc in [Encoding::Json, Encoding::Msgpack] {
            assert_eq!(enc.decode::<JobRecord>(&enc.encode(&rec)).unwrap(), rec);
        }
        assert!(rec.state.is_terminal());
        assert!(!JobState::Retrying.is_terminal());
        assert_eq!("dead".parse::<JobState>().unwrap(), JobState::Dead);
        assert!("zombie".parse::<JobState>().is_err());
    }
}
