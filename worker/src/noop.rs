//! The no-op engine: a test and benchmark mode that loads no model and emits
//! `max_tokens` tokens (" t0", " t1", ...) at a fixed pace, honouring stop
//! strings, cancellation and resume exactly like the real engine. It lets the
//! queue, the hive and the event path be measured and fault-tested without
//! the model's cost. Hives offer it only when started with `--test-noop-model`.
//!
//! Fault seam: a prompt containing `rbee:crash` makes the process abort after
//! its first token, as a worker crash would (for dead-letter tests).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rbee_schemas::error::JobError;
use rbee_schemas::event::{StopReason, Usage};
use rbee_schemas::job::{GenerateParams, PromptInput};
use rbee_schemas::record::Resume;
use rbee_schemas::worker::{ModelInfo, Outcome};

use crate::engine::OnToken;
use crate::stream::{Push, StopMatcher};

#[derive(Debug)]
pub struct NoopEngine {
    token_delay: Duration,
    info: ModelInfo,
}

impl NoopEngine {
    pub fn new(token_delay: Duration) -> Self {
        let info = ModelInfo {
            architecture: "noop".into(),
            name: "noop".into(),
            context_length: 1 << 20,
            vocab_size: 0,
            quantization: "none".into(),
            device: "cpu".into(),
            load_ms: 0.0,
            slots: 0,
        };
        Self { token_delay, info }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn generate(
        &mut self,
        params: &GenerateParams,
        resume: Option<&Resume>,
        cancel: &AtomicBool,
        on_token: &mut OnToken<'_>,
    ) -> Result<Outcome, JobError> {
        let started = Instant::now();
        let prompt_tokens = match &params.input {
            PromptInput::Prompt(p) => p.split_whitespace().count(),
            PromptInput::Messages(m) => m.iter().map(|m| m.content.split_whitespace().count() + 2).sum(),
        };
        let first = resume.map_or(0, |r| r.tokens.len());
        let mut stops = StopMatcher::new(&params.stop);
        let mut n = first;
        let mut first_token_ms = 0.0;
        let reason = loop {
            if cancel.load(Ordering::Relaxed) {
                break StopReason::Cancelled;
            }
            if n >= params.max_tokens as usize {
                break StopReason::MaxTokens;
            }
            if !self.token_delay.is_zero() {
                std::thread::sleep(self.token_delay);
            }
            let text = format!(" t{n}");
            if n == first {
                first_token_ms = started.elapsed().as_secs_f64() * 1e3;
            }
            n += 1;
            let crash = n == first + 1 && prompt_says_crash(&params.input);
            match stops.push(&text) {
                Push::Continue(t) => on_token(Some(n as u32 - 1), t),
                Push::Stop(t) => {
                    on_token(Some(n as u32 - 1), t);
                    break StopReason::Stop;
                }
            }
            if crash {
                tracing::error!("rbee:crash in the prompt: aborting, as a crashing worker would");
                std::process::abort();
            }
        };
        if reason != StopReason::Stop {
            let rest = stops.finish();
            if !rest.is_empty() {
                on_token(None, &rest);
            }
        }
        let generated = n - first;
        let elapsed = started.elapsed().as_secs_f64();
        Ok(Outcome {
            stop_reason: reason,
            usage: Usage { prompt_tokens: prompt_tokens as u32, completion_tokens: n as u32 },
            prompt_ms: 0.0,
            first_token_ms,
            decode_tps: if generated > 1 && elapsed > 0.0 { (generated - 1) as f64 / elapsed } else { 0.0 },
        })
    }
}

fn prompt_says_crash(input: &PromptInput) -> bool {
    match input {
        PromptInput::Prompt(p) => p.contains("rbee:crash"),
        PromptInput::Messages(m) => m.iter().any(|m| m.content.contains("rbee:crash")),
    }
}
