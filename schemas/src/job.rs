//! Inference jobs: the body published to `rbee.jobs.infer.<model key>`, its
//! documented limits, and validation into the parameters a worker runs.
//!
//! Decoding is two-step. [`JobProbe`] reads only `v`, `id`, `reply_to` and
//! `model` and tolerates anything else, so even a job that fails validation can
//! be answered on the right subject. [`InferRequest`] is the strict form: unknown
//! fields are rejected by name, and [`InferRequest::validate`] checks every limit
//! below and produces [`GenerateParams`].

use serde::{Deserialize, Serialize};

use crate::error::JobError;

/// Largest job body accepted (also the stream's `max_msg_size`).
pub const MAX_JOB_BYTES: usize = 1024 * 1024;
/// Largest prompt, or sum of chat message contents, in bytes.
pub const MAX_PROMPT_BYTES: usize = 256 * 1024;
/// Most chat messages in one job.
pub const MAX_MESSAGES: usize = 256;
/// `max_tokens` range; the model's context window may lower the upper bound.
pub const MAX_TOKENS_RANGE: (i64, i64) = (1, 8192);
/// `max_tokens` when the job does not say.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// `temperature` range; 0 means greedy decoding.
pub const TEMPERATURE_RANGE: (f64, f64) = (0.0, 2.0);
/// `temperature` when the job does not say.
pub const DEFAULT_TEMPERATURE: f64 = 0.8;
/// `top_p` range (exclusive of 0).
pub const TOP_P_RANGE: (f64, f64) = (0.0, 1.0);
/// `top_k` range.
pub const TOP_K_RANGE: (i64, i64) = (1, 1000);
/// `repeat_penalty` range; 1.0 disables it (the default).
pub const REPEAT_PENALTY_RANGE: (f64, f64) = (0.5, 2.0);
/// Tokens looked back over by `repeat_penalty`.
pub const REPEAT_LAST_N: usize = 64;
/// Most stop strings per job.
pub const MAX_STOP: usize = 8;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 128;
/// Longest job id.
pub const MAX_ID_LEN: usize = 128;
/// Longest `timeout_ms`: seven days.
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// One chat message. Roles: `system`, `user`, `assistant`, `tool`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The strict job body. Unknown fields are an error that names them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    /// Protocol version; absent means 1.
    #[serde(default = "crate::default_version")]
    pub v: u32,
    /// Job id, used when no `Nats-Msg-Id` header is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Model reference; must agree with the subject's model key when both are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Plain prompt, sent to the model as is. Exactly one of `prompt` and `messages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Chat messages, rendered with the model's chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f64>,
    /// Sampling seed; the same seed and parameters reproduce the same text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Generation stops before the first occurrence of any of these strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// Subject for the events; default `rbee.events.<job id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// The job must end within this many milliseconds of reaching the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The job must end before this Unix time, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// How long the model's worker stays loaded after this job while idle,
    /// in ms (like Ollama's `keep_alive`): 0 unloads it at once, -1 keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_ms: Option<i64>,
}

/// What every job body is read as first: only the fields needed to answer it,
/// each tolerated when absent or of the wrong type.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobProbe {
    #[serde(default, deserialize_with = "lenient::u32")]
    pub v: Option<u32>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub id: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub reply_to: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub model: Option<String>,
    #[serde(default, deserialize_with = "lenient::u64")]
    pub timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "lenient::u64")]
    pub deadline_ms: Option<u64>,
}

impl JobProbe {
    /// The deadline, as [`InferRequest::deadline`] computes it.
    pub fn deadline(&self, received_ms: u64) -> Option<u64> {
        InferRequest { timeout_ms: self.timeout_ms, deadline_ms: self.deadline_ms, ..InferRequest::default() }.deadline(received_ms)
    }
}

/// What the model is asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptInput {
    /// Raw text, tokenized as is.
    Prompt(String),
    /// Chat messages, rendered with the model's chat template plus the
    /// assistant generation prompt.
    Messages(Vec<ChatMessage>),
}

/// Sampling parameters after defaults are applied.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

/// A validated job, as a worker runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateParams {
    pub input: PromptInput,
    pub max_tokens: u32,
    pub sampling: Sampling,
    pub stop: Vec<String>,
}

/// A job's id: the `Nats-Msg-Id` header, else the body's `id`, else
/// `js-<stream sequence>` (stable across redeliveries of the same message).
pub fn job_id(header: Option<String>, body: Option<String>, stream_seq: u64) -> String {
    header.or(body).unwrap_or_else(|| format!("js-{stream_seq}"))
}

/// Whether `id` is a valid job id: 1 to 128 of `A-Z a-z 0-9 _ -`
/// (it becomes a subject token and a KV key).
pub fn is_valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn out_of_range<T: std::fmt::Display>(field: &str, value: T, lo: T, hi: T) -> JobError {
    JobError::invalid(format!("{field} must be between {lo} and {hi} (got {value})"))
}

impl Default for InferRequest {
    fn default() -> Self {
        Self {
            v: crate::PROTOCOL_VERSION,
            id: None,
            model: None,
            prompt: None,
            messages: None,
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            repeat_penalty: None,
            seed: None,
            stop: None,
            reply_to: None,
            timeout_ms: None,
            deadline_ms: None,
            keep_alive_ms: None,
        }
    }
}

impl InferRequest {
    /// When the job must end, in Unix milliseconds: the earlier of
    /// `deadline_ms` and `received_ms + timeout_ms` (`received_ms` = when the
    /// broker stored the job).
    pub fn deadline(&self, received_ms: u64) -> Option<u64> {
        let by_timeout = self.timeout_ms.map(|t| received_ms.saturating_add(t));
        match (self.deadline_ms, by_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A plain-prompt job with every other field at its default.
    pub fn prompt(prompt: impl Into<String>) -> Self {
        Self { prompt: Some(prompt.into()), ..Self::default() }
    }

    /// Checks every documented limit and applies defaults. `default_seed` is
    /// used when the job names no seed (the hive picks one and reports it).
    pub fn validate(&self, default_seed: u64) -> Result<GenerateParams, JobError> {
        let input = match (&self.prompt, &self.messages) {
            (Some(_), Some(_)) => return Err(JobError::invalid("give either prompt or messages, not both")),
            (None, None) => return Err(JobError::invalid("missing prompt: give prompt (text) or messages (chat)")),
            (Some(p), None) => {
                if p.is_empty() {
                    return Err(JobError::invalid("prompt is empty"));
                }
                if p.len() > MAX_PROMPT_BYTES {
                    return Err(JobError::invalid(format!(
                        "prompt is {} bytes; the limit is {MAX_PROMPT_BYTES}",
                        p.len()
                    )));
                }
                PromptInput::Prompt(p.clone())
            }
            (None, Some(msgs)) => {
                if msgs.is_empty() {
                    return Err(JobError::invalid("messages is empty"));
                }
                if msgs.len() > MAX_MESSAGES {
                    return Err(JobError::invalid(format!(
                        "{} messages; the limit is {MAX_MESSAGES}",
                        msgs.len()
                    )));
                }
                let total: usize = msgs.iter().map(|m| m.content.len()).sum();
                if total > MAX_PROMPT_BYTES {
                    return Err(JobError::invalid(format!(
                        "messages hold {total} bytes of content; the limit is {MAX_PROMPT_BYTES}"
                    )));
                }
                for (i, m) in msgs.iter().enumerate() {
                    if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                        return Err(JobError::invalid(format!(
                            "messages[{i}].role is {:?}; use system, user, assistant or tool",
                            m.role
                        )));
                    }
                }
                PromptInput::Messages(msgs.clone())
            }
        };

        let max_tokens = match self.max_tokens {
            None => DEFAULT_MAX_TOKENS,
            Some(n) if (MAX_TOKENS_RANGE.0..=MAX_TOKENS_RANGE.1).contains(&n) => n as u32,
            Some(n) => return Err(out_of_range("max_tokens", n, MAX_TOKENS_RANGE.0, MAX_TOKENS_RANGE.1)),
        };
        let temperature = match self.temperature {
            None => DEFAULT_TEMPERATURE,
            Some(t) if (TEMPERATURE_RANGE.0..=TEMPERATURE_RANGE.1).contains(&t) => t,
            Some(t) => return Err(out_of_range("temperature", t, TEMPERATURE_RANGE.0, TEMPERATURE_RANGE.1)),
        };
        let top_p = match self.top_p {
            None => None,
            Some(p) if p > TOP_P_RANGE.0 && p <= TOP_P_RANGE.1 => Some(p),
            Some(p) => return Err(JobError::invalid(format!("top_p must be greater than 0 and at most 1 (got {p})"))),
        };
        let top_k = match self.top_k {
            None => None,
            Some(k) if (TOP_K_RANGE.0..=TOP_K_RANGE.1).contains(&k) => Some(k as usize),
            Some(k) => return Err(out_of_range("top_k", k, TOP_K_RANGE.0, TOP_K_RANGE.1)),
        };
        let repeat_penalty = match self.repeat_penalty {
            None => 1.0,
            Some(r) if (REPEAT_PENALTY_RANGE.0..=REPEAT_PENALTY_RANGE.1).contains(&r) => r as f32,
            Some(r) => {
                return Err(out_of_range("repeat_penalty", r, REPEAT_PENALTY_RANGE.0, REPEAT_PENALTY_RANGE.1))
            }
        };
        let stop = self.stop.clone().unwrap_or_default();
        if stop.len() > MAX_STOP {
            return Err(JobError::invalid(format!("{} stop strings; the limit is {MAX_STOP}", stop.len())));
        }
        if let Some(s) = stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            return Err(JobError::invalid(format!(
                "stop string {s:?} must be 1 to {MAX_STOP_BYTES} bytes"
            )));
        }
        if let Some(t) = self.timeout_ms {
            if t == 0 || t > MAX_TIMEOUT_MS {
                return Err(out_of_range("timeout_ms", t, 1, MAX_TIMEOUT_MS));
            }
        }
        if let Some(k) = self.keep_alive_ms {
            if k < -1 || k > MAX_TIMEOUT_MS as i64 {
                return Err(JobError::invalid(format!(
                    "keep_alive_ms must be -1 (keep loaded), 0 (unload at once) or up to {MAX_TIMEOUT_MS} (got {k})"
                )));
            }
        }
        if self.deadline_ms == Some(0) {
            return Err(JobError::invalid("deadline_ms must be a Unix time in milliseconds"));
        }
        if let Some(id) = &self.id {
            if !is_valid_job_id(id) {
                return Err(JobError::invalid(format!(
                    "id {id:?} must be 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 _ -"
                )));
            }
        }
        Ok(GenerateParams {
            input,
            max_tokens,
            sampling: Sampling {
                temperature,
                top_p,
                top_k,
                repeat_penalty,
                repeat_last_n: REPEAT_LAST_N,
                seed: self.seed.unwrap_or(default_seed),
            },
            stop,
        })
    }
}

/// Deserializers that never fail: a value of the wrong type reads as `None`.
mod lenient {
    use serde::{de::IgnoredAny, Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Maybe<T> {
        Value(T),
        Other(IgnoredAny),
    }

    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(match Maybe::<String>::deserialize(d)? {
            Maybe::Value(s) => Some(s),
            Maybe::Other(_) => None,
        })
    }

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(match Maybe::<u64>::deserialize(d)? {
            Maybe::Value(v) => Some(v),
            Maybe::Other(_) => None,
        })
    }

    pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Ok(match Maybe::<u32>::deserialize(d)? {
            Maybe::Value(v) => Some(v),
            Maybe::Other(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoding;
    use crate::error::ErrorCode;

    fn job(json: &str) -> Result<InferRequest, String> {
        Encoding::Json.decode(json.as_bytes())
    }

    #[test]
    fn minimal_job_gets_documented_defaults() {
        let req = job(r#"{"prompt":"Hello","max_tokens":16}"#).unwrap();
        assert_eq!(req.v, 1);
        let p = req.validate(7).unwrap();
        assert_eq!(p.input, PromptInput::Prompt("Hello".into()));
        assert_eq!(p.max_tokens, 16);
        assert_eq!(p.sampling.temperature, DEFAULT_TEMPERATURE);
        assert_eq!(p.sampling.seed, 7);
        assert_eq!(p.sampling.repeat_penalty, 1.0);
        assert!(p.stop.is_empty());
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let e = job(r#"{"prompt":"Hello","max_token":16}"#).unwrap_err();
        assert!(e.contains("unknown field `max_token`"), "{e}");
        let e = job(r#"{"messages":[{"role":"user","content":"x","name":"y"}]}"#).unwrap_err();
        assert!(e.contains("unknown field `name`"), "{e}");
    }

    #[test]
    fn limits_are_enforced_with_clear_messages() {
        let cases = [
            (r#"{"max_tokens":16}"#, "missing prompt"),
            (r#"{"prompt":"x","messages":[{"role":"user","content":"y"}]}"#, "not both"),
            (r#"{"prompt":""}"#, "prompt is empty"),
            (r#"{"prompt":"x","max_tokens":0}"#, "max_tokens must be between 1 and 8192 (got 0)"),
            (r#"{"prompt":"x","max_tokens":100000}"#, "max_tokens must be between 1 and 8192"),
            (r#"{"prompt":"x","max_tokens":-5}"#, "max_tokens must be between"),
            (r#"{"prompt":"x","temperature":3}"#, "temperature must be between 0 and 2"),
            (r#"{"prompt":"x","top_p":0}"#, "top_p must be greater than 0"),
            (r#"{"prompt":"x","top_k":0}"#, "top_k must be between 1 and 1000"),
            (r#"{"prompt":"x","repeat_penalty":9}"#, "repeat_penalty must be between"),
            (r#"{"prompt":"x","stop":["a","b","c","d","e","f","g","h","i"]}"#, "9 stop strings"),
            (r#"{"prompt":"x","stop":[""]}"#, "stop string"),
            (r#"{"prompt":"x","id":"has.dot"}"#, "id \"has.dot\""),
            (r#"{"messages":[]}"#, "messages is empty"),
            (r#"{"prompt":"x","timeout_ms":0}"#, "timeout_ms must be between 1 and"),
            (r#"{"prompt":"x","deadline_ms":0}"#, "deadline_ms must be"),
            (r#"{"prompt":"x","keep_alive_ms":-5}"#, "keep_alive_ms must be -1"),
            (r#"{"messages":[{"role":"robot","content":"x"}]}"#, "messages[0].role"),
        ];
        for (body, want) in cases {
            let e = job(body).unwrap().validate(0).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{body}");
            assert!(e.message.contains(want), "{body}: {} does not contain {want}", e.message);
        }
        let big = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(MAX_PROMPT_BYTES + 1));
        assert!(job(&big).unwrap().validate(0).unwrap_err().message.contains("limit is"));
    }

    #[test]
    fn the_deadline_is_the_earlier_of_both_forms() {
        let mut r = InferRequest::prompt("x");
        assert_eq!(r.deadline(1000), None);
        r.timeout_ms = Some(500);
        assert_eq!(r.deadline(1000), Some(1500));
        r.deadline_ms = Some(1200);
        assert_eq!(r.deadline(1000), Some(1200));
        r.timeout_ms = None;
        assert_eq!(r.deadline(1000), Some(1200));
    }

    #[test]
    fn probe_tolerates_anything_and_reads_what_it_can() {
        let p: JobProbe = Encoding::Json.decode(br#"{"id":5,"reply_to":"r.s","v":"x","max_token":1}"#).unwrap();
        assert_eq!(p.id, None);
        assert_eq!(p.reply_to.as_deref(), Some("r.s"));
        assert_eq!(p.v, None);
        let p: JobProbe = Encoding::Json.decode(br#"{"v":2,"id":"a"}"#).unwrap();
        assert_eq!((p.v, p.id.as_deref()), (Some(2), Some("a")));
    }

    #[test]
    fn jobs_round_trip_in_both_encodings() {
        let req = InferRequest {
            id: Some("job-1".into()),
            model: Some("smollm2-135m".into()),
            messages: Some(vec![ChatMessage { role: "user".into(), content: "Hi".into() }]),
            max_tokens: Some(8),
            temperature: Some(0.0),
            top_p: Some(0.9),
            top_k: Some(40),
            repeat_penalty: Some(1.1),
            seed: Some(42),
            stop: Some(vec!["\n".into()]),
            reply_to: Some("_INBOX.x".into()),
            timeout_ms: Some(5000),
            deadline_ms: Some(1_900_000_000_000),
            keep_alive_ms: Some(60_000),
            ..InferRequest::prompt("unused")
        };
        let req = InferRequest { prompt: None, ..req };
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let back: InferRequest = enc.decode(&enc.encode(&req)).unwrap();
            assert_eq!(back, req, "{enc:?}");
            let probe: JobProbe = enc.decode(&enc.encode(&req)).unwrap();
            assert_eq!(probe.id.as_deref(), Some("job-1"));
        }
        // MessagePack is written with field names, never as a positional array.
        let bytes = Encoding::Msgpack.encode(&req);
        assert!(bytes.windows(10).any(|w| w == b"max_tokens"));
        let params = req.validate(0).unwrap();
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let back: GenerateParams = enc.decode(&enc.encode(&params)).unwrap();
            assert_eq!(back, params);
        }
    }
}
