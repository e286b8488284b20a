//! The hive <-> worker pipe protocol. Internal: only `rbee-hive` and
//! `rbee-worker` of the same build speak it, so it may change between versions.
//!
//! The hive writes [`ToWorker`] frames to the worker's stdin; the worker writes
//! [`FromWorker`] frames to its protocol pipe (its original stdout; anything
//! else it prints goes to stderr). A frame is a 4-byte big-endian length and a
//! MessagePack body with named fields, at most [`MAX_FRAME`] bytes. The worker
//! never publishes to NATS itself: the hive is the single writer of every job's
//! event sequence, so `seq` stays gap-free even when a worker dies mid-token.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::JobError;
use crate::event::{StopReason, Usage};
use crate::job::GenerateParams;
use crate::record::Resume;

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// The most tokens a worker holds for one job, prompt included: the context
/// a model was trained for, capped here (candle's `MAX_SEQ_LEN`, which both
/// engines follow). The hive sizes a worker's KV cache by it.
pub const MAX_CONTEXT: usize = 4096;

/// Hive to worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToWorker {
    /// Run one job. `job` is the hive's local handle for it. With `resume`,
    /// continue after the given generated tokens instead of starting afresh.
    Generate {
        job: u64,
        params: GenerateParams,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Resume>,
    },
    /// Stop a running job at the next token; it finishes with `cancelled`.
    Cancel { job: u64 },
    /// Finish nothing more and exit.
    Shutdown,
}

/// Worker to hive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromWorker {
    /// The model is loaded; jobs may be sent.
    Ready { info: ModelInfo },
    /// The model could not be loaded; the worker exits after this frame.
    LoadFailed { error: JobError },
    /// One sampled token of a running job and the text it releases (possibly
    /// empty: an incomplete UTF-8 character or a possible stop string is held back).
    Token { job: u64, id: u32, text: String },
    /// The job ended normally.
    Finished { job: u64, outcome: Outcome },
    /// The job failed (e.g. prompt longer than the context); the worker lives on.
    Failed { job: u64, error: JobError },
}

/// What a loaded model is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub architecture: String,
    pub name: String,
    pub context_length: u32,
    pub vocab_size: u32,
    /// Dominant weight type, e.g. `q4_1`.
    pub quantization: String,
    /// `cpu`, `cuda:0`, `metal:0`.
    pub device: String,
    /// Time spent loading weights and tokenizer, in ms.
    pub load_ms: f64,
    /// Jobs the worker steps through the model at once: its `--slots` on
    /// the fast engine, 1 on engines that run one sequence at a time. 0 from
    /// workers that do not say.
    #[serde(default)]
    pub slots: u32,
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub stop_reason: StopReason,
    pub usage: Usage,
    /// Prompt processing time, ms.
    pub prompt_ms: f64,
    /// From the start of the job in the worker to its first token, ms.
    pub first_token_ms: f64,
    /// Decode speed after the first token, tokens per second.
    pub decode_tps: f64,
}

/// Writes one frame and flushes.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let body = rmp_serde::to_vec_named(msg).map_err(io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame larger than MAX_FRAME"));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes is over the limit")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode_frame(&body).map(Some)
}

/// Decodes a frame body (without its length prefix).
pub fn decode_frame<T: DeserializeOwned>(body: &[u8]) -> io::Result<T> {
    rmp_serde::from_slice(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::InferRequest;

    #[test]
    fn frames_round_trip_over_a_byte_pipe() {
        let params = InferRequest::prompt("Hello").validate(3).unwrap();
        let to = vec![
            ToWorker::Generate { job: 1, params: params.clone(), resume: None },
            ToWorker::Generate { job: 2, params, resume: Some(Resume { tokens: vec![5, 6], streamed_bytes: 3 }) },
            ToWorker::Cancel { job: 1 },
            ToWorker::Shutdown,
        ];
        let from = vec![
            FromWorker::Token { job: 1, id: 9, text: "Hi".into() },
            FromWorker::Failed { job: 2, error: JobError::invalid("too long") },
            FromWorker::Finished {
                job: 1,
                outcome: Outcome {
                    stop_reason: StopReason::Eos,
                    usage: Usage { prompt_tokens: 3, completion_tokens: 1 },
                    prompt_ms: 1.0,
                    first_token_ms: 2.0,
                    decode_tps: 0.0,
                },
            },
        ];
        let mut buf = Vec::new();
        for m in &to {
            write_frame(&mut buf, m).unwrap();
        }
        let mut r = &buf[..];
        for m in &to {
            assert_eq!(read_frame::<_, ToWorker>(&mut r).unwrap().as_ref(), Some(m));
        }
        assert_eq!(read_frame::<_, ToWorker>(&mut r).unwrap(), None);

        let mut buf = Vec::new();
        for m in &from {
            write_frame(&mut buf, m).unwrap();
        }
        let mut r = &buf[..];
        for m in &from {
            assert_eq!(read_frame::<_, FromWorker>(&mut r).unwrap().as_ref(), Some(m));
        }
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut bytes = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 8]);
        assert!(read_frame::<_, ToWorker>(&mut &bytes[..]).is_err());
    }
}
