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

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::event::{StopReason, Usage};
use rbee_schemas::job::{GenerateParams, Sampling};
use rbee_schemas::record::Resume;
use rbee_schemas::worker::Outcome;
use tokenizers::{DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper};

use crate::engine::OnToken;
use crate::stream::{Push, StopMatcher};
use crate::tokenizer::GgufTokenizer;

type DecodeStream<'t> =
    tokenizers::DecodeStream<'t, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

/// One job in progress.
pub struct Generation<'t> {
    tokenizer: &'t GgufTokenizer,
    decoder: DecodeStream<'t>,
    sampler: LogitsProcessor,
    /// Temperature 0 and no repeat penalty: the next token is the argmax,
    /// read straight off the logits.
    plain_argmax: bool,
    repeat_penalty: f32,
    repeat_last_n: usize,
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
            sampler: LogitsProcessor::from_sampling(seed, candle_sampling(&params.sampling)),
            plain_argmax: params.sampling.temperature <= 0.0 && params.sampling.repeat_penalty == 1.0,
            repeat_penalty: params.sampling.repeat_penalty,
            repeat_last_n: params.sampling.repeat_last_n,
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
        if self.plain_argmax {
            return Ok(argmax(logits));
        }
        let internal = |e: candle_core::Error| JobError::internal(format!("sampling failed: {e}"));
        let mut t = Tensor::from_slice(logits, logits.len(), &Device::Cpu).map_err(internal)?;
        if self.repeat_penalty != 1.0 {
            let from = self.all.len().saturating_sub(self.repeat_last_n);
            t = candle_transformers::utils::apply_repeat_penalty(&t, self.repeat_penalty, &self.all[from..])
                .map_err(internal)?;
        }
        self.sampler.sample(&t).map_err(internal)
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

/// Index of the first largest logit, as candle's `argmax` picks it (a NaN
/// never wins, unless it is first), without copying the vocabulary-sized
/// logits into a tensor and back for every token. The maximum is found in
/// 16 independent lanes (vectorized), then its first position.
fn argmax(logits: &[f32]) -> u32 {
    let Some(&first) = logits.first() else { return 0 };
    if first.is_nan() {
        return 0;
    }
    let mut lanes = [first; 16];
    let chunks = logits.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = rest.iter().chain(&lanes).fold(first, |m, &v| if v > m { v } else { m });
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

fn candle_sampling(s: &Sampling) -> CandleSampling {
    if s.temperature <= 0.0 {
        return CandleSampling::ArgMax;
    }
    let temperature = s.temperature;
    match (s.top_k, s.top_p) {
        (None, None) => CandleSampling::All { temperature },
        (Some(k), None) => CandleSampling::TopK { k, temperature },
        (None, Some(p)) => CandleSampling::TopP { p, temperature },
        (Some(k), Some(p)) => CandleSampling::TopKThenTopP { k, p, temperature },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candle_argmax(logits: &[f32]) -> u32 {
        let t = Tensor::from_slice(logits, logits.len(), &Device::Cpu).unwrap();
        LogitsProcessor::from_sampling(0, CandleSampling::ArgMax).sample(&t).unwrap()
    }

    #[test]
    fn argmax_picks_what_candle_picks() {
        // A fixed pseudo-random vocabulary of logits, then the awkward cases.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<f32> = (0..49_152)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / 1e5 - 80.0
            })
            .collect();
        let mut tail_max = random[..49_151].to_vec();
        tail_max[49_150] = 1e9;
        let cases: [&[f32]; 9] = [
            &random,
            &tail_max,
            &[1.0, 3.0, 3.0, 2.0],
            &[-1.0, -1.0],
            &[0.5, f32::NAN, 0.7, 0.1],
            &[f32::NAN, 0.7, 0.9],
            &[f32::NAN, f32::NAN],
            &[f32::NEG_INFINITY, -3.0],
            &[7.0],
        ];
        for logits in cases {
            assert_eq!(argmax(logits), candle_argmax(logits), "logits {:?}", &logits[..logits.len().min(4)]);
        }
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1, "the first of equal maxima");
    }
}
