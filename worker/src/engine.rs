//! The inference engine: one GGUF llama-architecture model loaded with candle's
//! quantized llama, its tokenizer from the same file, and the generation loop.
//!
//! Synchronous and single-threaded from the caller's side (candle parallelises
//! the matrix work internally). The worker process drives it from its own
//! thread; tests and benchmarks call it in-process with the same parameters.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::event::{StopReason, Usage};
use rbee_schemas::job::{GenerateParams, PromptInput, Sampling};
use rbee_schemas::record::Resume;
use rbee_schemas::worker::{ModelInfo, Outcome};

use crate::chat::ChatTemplate;
use crate::stream::{Push, StopMatcher};
use crate::tokenizer::GgufTokenizer;

/// A loaded model, ready to generate.
#[derive(Debug)]
pub struct Engine {
    model: ModelWeights,
    tokenizer: GgufTokenizer,
    chat: Option<ChatTemplate>,
    device: Device,
    info: ModelInfo,
    context: usize,
}

/// Receives each sampled token (`Some(id)`) with the text it releases; text
/// released without a new token (when resuming) comes with `None`.
pub type OnToken<'a> = dyn FnMut(Option<u32>, &str) + 'a;

fn load_failed(path: &Path, what: impl std::fmt::Display) -> JobError {
    JobError::new(ErrorCode::ModelLoadFailed, format!("cannot load {}: {what}", path.display()))
}

fn internal(e: candle_core::Error) -> JobError {
    JobError::internal(format!("inference failed: {e}"))
}

/// Picks the device for `backend` (`cpu`, `cuda`, `metal`) and device index.
pub fn device_for(backend: &str, ordinal: usize) -> Result<Device, String> {
    match backend {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(ordinal)
            .map_err(|e| format!("CUDA device {ordinal} is not available ({e}); build rbee-worker with --features cuda")),
        "metal" => Device::new_metal(ordinal)
            .map_err(|e| format!("Metal device {ordinal} is not available ({e}); build rbee-worker with --features metal")),
        other => Err(format!("unknown backend {other:?}: use cpu, cuda or metal")),
    }
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda(_) => "cuda".to_owned(),
        Device::Metal(_) => "metal".to_owned(),
    }
}

impl Engine {
    /// Loads the model at `path` onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<Self, JobError> {
        let started = Instant::now();
        let mut file = std::fs::File::open(path).map_err(|e| load_failed(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| load_failed(path, format!("not a GGUF file ({e})")))?;
        let meta_str = |k: &str| content.metadata.get(k).and_then(|v| v.to_string().ok()).cloned();
        let architecture = meta_str("general.architecture").unwrap_or_default();
        if architecture != "llama" {
            return Err(load_failed(
                path,
                format!("architecture {architecture:?} is not supported yet (supported: llama)"),
            ));
        }
        let tokenizer = GgufTokenizer::build(&content).map_err(|e| load_failed(path, e))?;
        let chat = match meta_str("tokenizer.chat_template") {
            Some(src) => Some(
                ChatTemplate::new(&src, &tokenizer.bos_text, &tokenizer.eos_text).map_err(|e| load_failed(path, e))?,
            ),
            None => None,
        };
        let context_length = content
            .metadata
            .get("llama.context_length")
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(MAX_SEQ_LEN as u32);
        let vocab_size = content
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map_or(0, |v| v.len() as u32);
        let quantization = dominant_weight_type(&content);
        let name = meta_str("general.name").unwrap_or_default();
        let model = ModelWeights::from_gguf(content, &mut file, &device).map_err(|e| load_failed(path, e))?;
        let context = (context_length as usize).min(MAX_SEQ_LEN);
        let info = ModelInfo {
            architecture,
            name,
            context_length: context as u32,
            vocab_size,
            quantization,
            device: device_name(&device),
            load_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        Ok(Self { model, tokenizer, chat, device, info, context })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.tokenizer
    }

    /// Runs `tokens` at positions `index_pos..` through the model (extending its
    /// KV cache; position 0 starts afresh) and returns the logits after the last one.
    pub fn logits(&mut self, tokens: &[u32], index_pos: usize) -> Result<Vec<f32>, JobError> {
        let input = Tensor::new(tokens, &self.device).and_then(|t| t.unsqueeze(0)).map_err(internal)?;
        let logits = self.model.forward(&input, index_pos).and_then(|l| l.squeeze(0)).map_err(internal)?;
        logits.to_dtype(candle_core::DType::F32).and_then(|l| l.to_vec1()).map_err(internal)
    }

    /// The exact text the model is given for `input`.
    pub fn render(&self, input: &PromptInput) -> Result<String, JobError> {
        match input {
            PromptInput::Prompt(p) => Ok(p.clone()),
            PromptInput::Messages(msgs) => match &self.chat {
                Some(t) => t.render(msgs).map_err(JobError::invalid),
                None => Err(JobError::invalid(
                    "this model has no chat template: send a plain prompt instead of messages",
                )),
            },
        }
    }

    /// Runs one job. `on_token` receives each sampled token and the text that
    /// is safe to send; `cancel` is checked before every token. With `resume`,
    /// the job continues after tokens generated by an earlier attempt whose
    /// first `streamed_bytes` of text the client already has.
    pub fn generate(
        &mut self,
        params: &GenerateParams,
        resume: Option<&Resume>,
        cancel: &AtomicBool,
        on_token: &mut OnToken<'_>,
    ) -> Result<Outcome, JobError> {
        let started = Instant::now();
        let text = self.render(&params.input)?;
        let prompt = self.tokenizer.prompt_ids(&text).map_err(JobError::internal)?;
        let resumed: &[u32] = resume.map_or(&[], |r| r.tokens.as_slice());
        if prompt.len() + resumed.len() >= self.context {
            return Err(JobError::new(
                ErrorCode::ContextLengthExceeded,
                format!(
                    "the prompt is {} tokens; this model's context holds {} (shorten the prompt)",
                    prompt.len(),
                    self.context
                ),
            ));
        }
        let budget = (params.max_tokens as usize)
            .saturating_sub(resumed.len())
            .min(self.context - prompt.len() - resumed.len());
        // A resumed job must not replay the random stream of its first attempt.
        let seed = params.sampling.seed.wrapping_add(resumed.len() as u64);
        let mut sampler = LogitsProcessor::from_sampling(seed, candle_sampling(&params.sampling));
        let mut stops = StopMatcher::new(&params.stop);
        let mut decoder = self.tokenizer.inner.decode_stream(true);
        let mut all: Vec<u32> = prompt.clone();
        all.extend_from_slice(resumed);

        // Text of the resumed tokens the client has not seen yet goes back
        // into the stop matcher, exactly as the first attempt held it back.
        if let Some(r) = resume {
            let mut produced = String::new();
            for &id in resumed {
                if let Some(t) = decoder.step(id).map_err(|e| JobError::internal(format!("detokenizing: {e}")))? {
                    produced.push_str(&t);
                }
            }
            let from = (r.streamed_bytes as usize).min(produced.len());
            let from = (from..=produced.len()).find(|i| produced.is_char_boundary(*i)).unwrap_or(produced.len());
            match stops.push(&produced[from..]) {
                Push::Continue(t) if !t.is_empty() => on_token(None, t),
                Push::Stop(t) => {
                    if !t.is_empty() {
                        on_token(None, t);
                    }
                    return Ok(self.outcome(StopReason::Stop, prompt.len(), resumed.len(), 0.0, 0.0, None, 0));
                }
                _ => {}
            }
        }

        let input = Tensor::new(all.as_slice(), &self.device).and_then(|t| t.unsqueeze(0)).map_err(internal)?;
        let mut logits = self.model.forward(&input, 0).and_then(|l| l.squeeze(0)).map_err(internal)?;
        let prompt_ms = started.elapsed().as_secs_f64() * 1e3;

        let mut generated = 0usize;
        let mut first_token_ms = 0.0;
        let mut first_token_at = None;
        let stop_reason = loop {
            if cancel.load(Ordering::Relaxed) {
                break StopReason::Cancelled;
            }
            if generated == budget {
                break StopReason::MaxTokens;
            }
            let s = &params.sampling;
            let scored = if s.repeat_penalty != 1.0 {
                let from = all.len().saturating_sub(s.repeat_last_n);
                candle_transformers::utils::apply_repeat_penalty(&logits, s.repeat_penalty, &all[from..])
                    .map_err(internal)?
            } else {
                logits.clone()
            };
            let next = sampler.sample(&scored).map_err(internal)?;
            generated += 1;
            if first_token_at.is_none() {
                first_token_at = Some(Instant::now());
                first_token_ms = started.elapsed().as_secs_f64() * 1e3;
            }
            if self.tokenizer.is_eos(next) {
                break StopReason::Eos;
            }
            all.push(next);
            let delta = decoder.step(next).map_err(|e| JobError::internal(format!("detokenizing: {e}")))?;
            match stops.push(delta.as_deref().unwrap_or("")) {
                Push::Continue(t) => on_token(Some(next), t),
                Push::Stop(t) => {
                    on_token(Some(next), t);
                    break StopReason::Stop;
                }
            }
            if generated == budget {
                break StopReason::MaxTokens;
            }
            let input = Tensor::new(&[next], &self.device).and_then(|t| t.unsqueeze(0)).map_err(internal)?;
            logits = self
                .model
                .forward(&input, all.len() - 1)
                .and_then(|l| l.squeeze(0))
                .map_err(internal)?;
        };
        if stop_reason != StopReason::Stop {
            let rest = stops.finish();
            if !rest.is_empty() {
                on_token(None, &rest);
            }
        }
        Ok(self.outcome(stop_reason, prompt.len(), resumed.len(), prompt_ms, first_token_ms, first_token_at, generated))
    }

    #[allow(clippy::too_many_arguments)]
    fn outcome(
        &self,
        stop_reason: StopReason,
        prompt_tokens: usize,
        resumed: usize,
        prompt_ms: f64,
        first_token_ms: f64,
        first_token_at: Option<Instant>,
        generated: usize,
    ) -> Outcome {
        let decode_tps = match first_token_at {
            Some(t) if generated > 1 => (generated - 1) as f64 / t.elapsed().as_secs_f64().max(1e-9),
            _ => 0.0,
        };
        Outcome {
            stop_reason,
            usage: Usage { prompt_tokens: prompt_tokens as u32, completion_tokens: (resumed + generated) as u32 },
            prompt_ms,
            first_token_ms,
            decode_tps,
        }
    }
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

/// The weight type most of the model's matrices use, e.g. `q4_1`.
fn dominant_weight_type(content: &gguf_file::Content) -> String {
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for info in content.tensor_infos.values() {
        if info.shape.rank() >= 2 {
            *counts.entry(format!("{:?}", info.ggml_dtype).to_lowercase()).or_default() += 1;
        }
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(t, _)| t).unwrap_or_default()
}
