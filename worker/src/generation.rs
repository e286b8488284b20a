//! One job's generation, independent of the engine that computes the logits:
//! the token budget, resume, sampling, detokenizing, stop strings, timings.
//!
//! A [`Generation`] is a small state machine the caller drives: feed
//! [`Generation::pending`] tokens to the model (all at once or in chunks,
//! [`Generation::consume`]), hand the logits after the last one to
//! [`Generation::advance`], repeat until [`Generation::is_done`], then
//! [`Generation::finish`]. [`crate::Engine::generate`] drives one job this way;
//! the worker's batch loop ([`crate::batch`]) drives several, stepping them
//! through the model together. Synchronous; owned by the driving thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::event::{StopReason, Usage};
use rbee_schemas::job::GenerateParams;
use rbee_schemas::record::Resume;
use rbee_schemas::worker::Outcome;
use tokenizers::{DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper};

use crate::engine::OnToken;
use crate::sampler::Sampler;
use crate::stream::{Push, StopMatcher};
use crate::tokenizer::GgufTokenizer;

type DecodeStream<'t> =
    tokenizers::DecodeStream<'t, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

/// One job in progress.
pub struct Generation<'t> {
    tokenizer: &'t GgufTokenizer,
    decoder: DecodeStream<'t>,
    sampler: Sampler,
    stops: StopMatcher,
    /// Prompt, resumed and generated tokens.
    all: Vec<u32>,
    /// How many of `all` the model has seen.
    fed: usize,
    prompt_len: usize,
    resumed: usize,
    budget: usize,
    generated: usize,
    started: Instant,
    prompt_ms: f64,
    first_token_ms: f64,
    first_token_at: Option<Instant>,
    done: Option<StopReason>,
}

impl std::fmt::Debug for Generation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("tokens", &self.all.len())
            .field("fed", &self.fed)
            .field("generated", &self.generated)
            .field("budget", &self.budget)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

fn detok(e: impl std::fmt::Display) -> JobError {
    JobError::internal(format!("detokenizing: {e}"))
}

impl<'t> Generation<'t> {
    /// Starts a job whose prompt is `prompt` (token ids) on a model whose
    /// context holds `context` tokens. With `resume`, the job continues after
    /// the tokens an earlier attempt generated; text of those the client has
    /// not seen yet goes to `on_token` now (and may already end the job).
    pub fn new(
        tokenizer: &'t GgufTokenizer,
        prompt: Vec<u32>,
        context: usize,
        params: &GenerateParams,
        resume: Option<&Resume>,
        on_token: &mut OnToken<'_>,
    ) -> Result<Self, JobError> {
        let started = Instant::now();
        let resumed: &[u32] = resume.map_or(&[], |r| r.tokens.as_slice());
        if prompt.is_empty() && resumed.is_empty() {
            return Err(JobError::invalid("the prompt is empty and this model adds no BOS token: send some text"));
        }
        if prompt.len() + resumed.len() >= context {
            return Err(JobError::new(
                ErrorCode::ContextLengthExceeded,
                format!(
                    "the prompt is {} tokens; this model's context holds {context} (shorten the prompt)",
                    prompt.len(),
                ),
            ));
        }
        let budget = (params.max_tokens as usize)
            .saturating_sub(resumed.len())
            .min(context - prompt.len() - resumed.len());
        // A resumed job must not replay the random stream of its first attempt.
        let seed = params.sampling.seed.wrapping_add(resumed.len() as u64);
        let prompt_len = prompt.len();
        let mut all = prompt;
        all.extend_from_slice(resumed);
        let mut g = Self {
            tokenizer,
            decoder: tokenizer.inner.decode_stream(true),
            sampler: Sampler::new(seed, &params.sampling),
            stops: StopMatcher::new(&params.stop),
            all,
            fed: 0,
            prompt_len,
            resumed: resumed.len(),
            budget,
            generated: 0,
            started,
            prompt_ms: 0.0,
            first_token_ms: 0.0,
            first_token_at: None,
            done: (budget == 0).then_some(StopReason::MaxTokens),
        };
        // Text of the resumed tokens the client has not seen yet goes back
        // into the stop matcher, exactly as the first attempt held it back.
        if let Some(r) = resume {
            let mut produced = String::new();
            for &id in resumed {
                if let Some(t) = g.decoder.step(id).map_err(detok)? {
                    produced.push_str(&t);
                }
            }
            let from = (r.streamed_bytes as usize).min(produced.len());
            let from = (from..=produced.len()).find(|i| produced.is_char_boundary(*i)).unwrap_or(produced.len());
            match g.stops.push(&produced[from..]) {
                Push::Continue(t) if !t.is_empty() => on_token(None, t),
                Push::Stop(t) => {
                    if !t.is_empty() {
                        on_token(None, t);
                    }
                    g.done = Some(StopReason::Stop);
                }
                _ => {}
            }
        }
        Ok(g)
    }

    pub fn is_done(&self) -> bool {
        self.done.is_some()
    }

    /// Ends the job as cancelled if `cancel` is set; true when it is done.
    pub fn check_cancel(&mut self, cancel: &AtomicBool) -> bool {
        if self.done.is_none() && cancel.load(Ordering::Relaxed) {
            self.done = Some(StopReason::Cancelled);
        }
        self.is_done()
    }

    /// Tokens the model has not seen yet: the prompt (and resumed tokens) at
    /// first, then the last sampled token. Empty once done.
    pub fn pending(&self) -> &[u32] {
        if self.is_done() {
            &[]
        } else {
            &self.all[self.fed..]
        }
    }

    /// Positions the model's cache needs for this job at most.
    pub fn max_len(&self) -> usize {
        self.prompt_len + self.resumed + self.budget
    }

    /// Records that the model has seen the first `n` pending tokens; true when
    /// none are left (the logits of that step are the ones to sample from).
    pub fn consume(&mut self, n: usize) -> bool {
        self.fed = (self.fed + n).min(self.all.len());
        self.fed == self.all.len()
    }

    /// Samples the next token from `logits` (the model's output after all
    /// pending tokens) and hands its text to `on_token`.
    pub fn advance(&mut self, logits: &[f32], on_token: &mut OnToken<'_>) -> Result<(), JobError> {
        if self.done.is_some() {
            return Ok(());
        }
        if self.first_token_at.is_none() {
            self.prompt_ms = self.started.elapsed().as_secs_f64() * 1e3;
        }
        let next = self.sample(logits)?;
        self.generated += 1;
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
            self.first_token_ms = self.started.elapsed().as_secs_f64() * 1e3;
        }
        if self.tokenizer.is_eos(next) {
            self.done = Some(StopReason::Eos);
            return Ok(());
        }
        self.all.push(next);
        let delta = self.decoder.step(next).map_err(detok)?;
        match self.stops.push(delta.as_deref().unwrap_or("")) {
            Push::Continue(t) => on_token(Some(next), t),
            Push::Stop(t) => {
                on_token(Some(next), t);
                self.done = Some(StopReason::Stop);
                return Ok(());
            }
        }
        if self.generated == self.budget {
            self.done = Some(StopReason::MaxTokens);
        }
        Ok(())
    }

    fn sample(&mut self, logits: &[f32]) -> Result<u32, JobError> {
        self.sampler.sample(logits, &self.all).map_err(JobError::internal)
    }

    /// Ends the job (done, or failed half-way: then as if cancelled), releases
    /// text held back for a stop string that never came, and sums it up.
    pub fn finish(mut self, on_token: &mut OnToken<'_>) -> Outcome {
        let stop_reason = self.done.unwrap_or(StopReason::Cancelled);
        if stop_reason != StopReason::Stop {
            let rest = self.stops.finish();
            if !rest.is_empty() {
                on_token(None, &rest);
            }
        }
        let decode_tps = match self.first_token_at {
            Some(t) if self.generated > 1 => (self.generated - 1) as f64 / t.elapsed().as_secs_f64().max(1e-9),
            _ => 0.0,
        };
        Outcome {
            stop_reason,
            usage: Usage {
                prompt_tokens: self.prompt_len as u32,
                completion_tokens: (self.resumed + self.generated) as u32,
            },
            prompt_ms: self.prompt_ms,
            first_token_ms: self.first_token_ms,
            decode_tps,
        }
    }
}
