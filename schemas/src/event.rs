//! Job events: what a job streams back to its reply subject.
//!
//! Every event is one small object `{"v":1,"type":...,"job_id":...,"seq":N, ...}`
//! in the encoding the job used. `seq` counts 0, 1, 2, ... with no gaps over
//! the whole life of the job, across restarts. A job ends with exactly one
//! terminal event (`done` or `error`); nothing follows it.
//!
//! - `started`: a hive and worker took the job (cold or warm start).
//! - `token`: a text delta; never splits a UTF-8 character.
//! - `restarted`: the worker died; the job was handed back and will run again.
//!   When `resume` is false the text streamed so far is void: the next attempt
//!   starts over after a new `started`.
//! - `progress`: a lifecycle job's progress (download bytes, loading).
//! - `done`: why generation stopped, token usage and timings; for a
//!   lifecycle job, stop reason `completed` and its `result`.
//! - `error`: a stable [`ErrorCode`] and a message a person can act on.

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, JobError};

/// One event of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(default = "crate::default_version")]
    pub v: u32,
    pub job_id: String,
    pub seq: u64,
    #[serde(flatten)]
    pub body: EventBody,
}

/// The type-specific part of an event, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    Started(Started),
    Token(Token),
    Restarted(Restarted),
    Progress(Progress),
    Done(Done),
    Error(ErrorEvent),
    /// An event type from a newer rbee; clients skip it.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    /// The hive that claimed the job.
    pub hive: String,
    /// The worker process that runs it.
    pub worker: String,
    /// The model reference as the hive resolved it.
    pub model: String,
    /// True when the worker had to be started (and the model loaded) for this job.
    pub cold: bool,
    /// 1 on the first run, 2 after one restart, ...
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Token {
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Restarted {
    /// The attempt that failed.
    pub attempt: u32,
    /// What happened, e.g. "worker exited with signal 9".
    pub reason: String,
    /// True when the next attempt continues the text; false when it starts over.
    #[serde(default)]
    pub resume: bool,
}

/// How far a lifecycle job is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// `download`, `verify`, `load`, ...
    pub stage: String,
    /// Units done (bytes for downloads).
    pub done: u64,
    /// Units in all; 0 when unknown.
    pub total: u64,
    /// Units per second.
    #[serde(default)]
    pub rate: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced its end-of-sequence token.
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
    /// A stop string was produced (it is not part of the text).
    Stop,
    /// The job was cancelled.
    Cancelled,
    /// A lifecycle job finished (its `result` says what it did).
    Completed,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// Timings of one job, in milliseconds unless named otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From the job's arrival in the stream to its claim by a hive.
    pub queued_ms: f64,
    /// Spent waiting for the worker to start and load the model (0 when warm).
    pub load_ms: f64,
    /// From the claim to the first token.
    pub ttft_ms: f64,
    /// From the claim to the end.
    pub total_ms: f64,
    /// Prompt processing speed, tokens per second.
    #[serde(default)]
    pub prompt_tps: f64,
    /// Generation speed after the first token, tokens per second.
    pub decode_tps: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub stop_reason: StopReason,
    #[serde(default)]
    pub usage: Usage,
    #[serde(default)]
    pub timings: Timings,
    /// The seed that was used: resubmit with it to reproduce the text.
    #[serde(default)]
    pub seed: u64,
    /// What a lifecycle job did (the model registered, the worker started, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Done {
    /// The `done` of an inference job.
    pub fn generation(stop_reason: StopReason, usage: Usage, timings: Timings, seed: u64) -> Self {
        Self { stop_reason, usage, timings, seed, result: None }
    }

    /// The `done` of a lifecycle job.
    pub fn completed(result: serde_json::Value) -> Self {
        Self { stop_reason: StopReason::Completed, usage: Usage::default(), timings: Timings::default(), seed: 0, result: Some(result) }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEvent {
    pub code: ErrorCode,
    pub message: String,
}

impl From<JobError> for EventBody {
    fn from(e: JobError) -> Self {
        EventBody::Error(ErrorEvent { code: e.code, message: e.message })
    }
}

impl Event {
    pub fn new(job_id: impl Into<String>, seq: u64, body: EventBody) -> Self {
        Self { v: crate::PROTOCOL_VERSION, job_id: job_id.into(), seq, body }
    }

    /// Whether this is the job's last event.
    pub fn is_terminal(&self) -> bool {
        self.body.is_terminal()
    }
}

impl EventBody {
    /// `done` and `error` end a job.
    pub fn is_terminal(&self) -> bool {
        matches!(self, EventBody::Done(_) | EventBody::Error(_))
    }

    /// The wire name of the event type.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventBody::Started(_) => "started",
            EventBody::Token(_) => "token",
            EventBody::Restarted(_) => "restarted",
            EventBody::Progress(_) => "progress",
            EventBody::Done(_) => "done",
            EventBody::Error(_) => "error",
            EventBody::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoding;

    fn samples() -> Vec<Event> {
        vec![
            Event::new(
                "job-1",
                0,
                EventBody::Started(Started {
                    hive: "h1".into(),
                    worker: "w1".into(),
                    model: "smollm2-135m".into(),
                    cold: true,
                    attempt: 1,
                }),
            ),
            Event::new("job-1", 1, EventBody::Token(Token { text: "Hé".into() })),
            Event::new(
                "job-1",
                2,
                EventBody::Restarted(Restarted { attempt: 1, reason: "worker exited with signal 9".into(), resume: false }),
            ),
            Event::new(
                "job-1",
                3,
                EventBody::Done(Done::generation(
                    StopReason::MaxTokens,
                    Usage { prompt_tokens: 5, completion_tokens: 16 },
                    Timings { queued_ms: 1.5, load_ms: 300.0, ttft_ms: 320.0, total_ms: 800.0, prompt_tps: 100.0, decode_tps: 35.5 },
                    42,
                )),
            ),
            Event::new("job-3", 1, EventBody::Progress(Progress { stage: "download".into(), done: 10, total: 100, rate: 5.5, message: None })),
            Event::new("job-3", 2, EventBody::Done(Done::completed(serde_json::json!({"model": "m"})))),
            Event::new("job-2", 0, JobError::invalid("missing prompt").into()),
        ]
    }

    #[test]
    fn every_event_round_trips_in_both_encodings() {
        for event in samples() {
            for enc in [Encoding::Json, Encoding::Msgpack] {
                let back: Event = enc.decode(&enc.encode(&event)).unwrap();
                assert_eq!(back, event, "{enc:?}");
            }
        }
    }

    #[test]
    fn json_shape_is_flat_with_type_tag() {
        let e = Event::new("job-1", 1, EventBody::Token(Token { text: "hi".into() }));
        let v: serde_json::Value = serde_json::from_slice(&Encoding::Json.encode(&e)).unwrap();
        assert_eq!(v, serde_json::json!({"v":1,"job_id":"job-1","seq":1,"type":"token","text":"hi"}));
        let err = Event::new("j", 0, JobError::invalid("bad").into());
        let v: serde_json::Value = serde_json::from_slice(&Encoding::Json.encode(&err)).unwrap();
        assert_eq!(v["code"], "INVALID_REQUEST");
        assert!(err.is_terminal());
    }

    #[test]
    fn unknown_event_types_and_fields_are_tolerated() {
        let e: Event = Encoding::Json
            .decode(br#"{"v":1,"job_id":"j","seq":4,"type":"thinking","percent":5}"#)
            .unwrap();
        assert_eq!(e.body, EventBody::Unknown);
        let e: Event = Encoding::Json
            .decode(br#"{"v":1,"job_id":"j","seq":1,"type":"token","text":"a","logprob":-0.5}"#)
            .unwrap();
        assert_eq!(e.body, EventBody::Token(Token { text: "a".into() }));
    }
}
