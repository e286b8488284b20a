//! Stable, machine-readable error codes carried by `error` events.
//!
//! Codes are part of the public contract: a code is never renamed or reused.
//! Clients match on the code and show the message to people.

use serde::{Deserialize, Serialize};

/// Why a job failed. Serialized as `SCREAMING_SNAKE_CASE` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The job body is malformed, has unknown fields or values out of range.
    InvalidRequest,
    /// The job speaks a protocol version this hive does not.
    UnsupportedVersion,
    /// No catalog entry or known source for the model.
    UnknownModel,
    /// The prompt (plus `max_tokens`) does not fit the model's context window.
    ContextLengthExceeded,
    /// The model's source (the Hugging Face hub) could not be reached.
    ModelSourceUnreachable,
    /// The model file exists but the worker could not load it.
    ModelLoadFailed,
    /// A downloaded file did not match its size or sha256; it was deleted.
    ModelVerificationFailed,
    /// The model is in use by a worker (delete it with `force`).
    ModelInUse,
    /// No such worker on the hive.
    UnknownWorker,
    /// The worker did not become ready in time.
    ModelLoadTimeout,
    /// The model does not fit in the memory of any hive.
    InsufficientMemory,
    /// The hive's disk has no room for the model's file (less its `--disk-reserve`).
    InsufficientDisk,
    /// The worker crashed on every attempt the job was allowed.
    WorkerCrashed,
    /// The job's deadline passed before it finished.
    DeadlineExceeded,
    /// The job was cancelled.
    Cancelled,
    /// The queue is full; try again later.
    QueueFull,
    /// A bug or an unexpected failure inside rbee.
    Internal,
    /// A code from a newer rbee that this build does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::UnknownModel => "UNKNOWN_MODEL",
            ErrorCode::ContextLengthExceeded => "CONTEXT_LENGTH_EXCEEDED",
            ErrorCode::ModelSourceUnreachable => "MODEL_SOURCE_UNREACHABLE",
            ErrorCode::ModelLoadFailed => "MODEL_LOAD_FAILED",
            ErrorCode::ModelVerificationFailed => "MODEL_VERIFICATION_FAILED",
            ErrorCode::ModelInUse => "MODEL_IN_USE",
            ErrorCode::UnknownWorker => "UNKNOWN_WORKER",
            ErrorCode::ModelLoadTimeout => "MODEL_LOAD_TIMEOUT",
            ErrorCode::InsufficientMemory => "INSUFFICIENT_MEMORY",
            ErrorCode::InsufficientDisk => "INSUFFICIENT_DISK",
            ErrorCode::WorkerCrashed => "WORKER_CRASHED",
            ErrorCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            ErrorCode::Cancelled => "CANCELLED",
            ErrorCode::QueueFull => "QUEUE_FULL",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with its code, as the hive and worker pass it around before it
/// becomes an `error` event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{code}: {message}")]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
}

impl JobError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_screaming_snake_case_and_unknown_is_tolerated() {
        assert_eq!(serde_json::to_string(&ErrorCode::InvalidRequest).unwrap(), "\"INVALID_REQUEST\"");
        assert_eq!(serde_json::to_string(&ErrorCode::ModelLoadFailed).unwrap(), "\"MODEL_LOAD_FAILED\"");
        let code: ErrorCode = serde_json::from_str("\"SOMETHING_NEW\"").unwrap();
        assert_eq!(code, ErrorCode::Unknown);
        for code in [ErrorCode::InvalidRequest, ErrorCode::QueueFull, ErrorCode::Internal] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
