//! The compute behind an [`Engine`](crate::Engine): candle's quantized llama,
//! qwen2, qwen3 or phi3 (any device) or the fast CPU path ([`crate::fast`], which
//! also runs gemma2 and gemma3), picked once at load time, and the per-sequence state each keeps.
//!
//! `auto` takes the fast path when the model is a GGUF it can run
//! (weight types F32/F16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K, see
//! [`crate::fast::load`]),
//! the device is the CPU and the CPU has AVX2, FMA and F16C (the fast kernels
//! this build was compiled with); otherwise candle. Both give the same text up
//! to quantization noise in the logits (see `tests/engines.rs` in this crate).
//!
//! Concurrency: a backend is driven by one thread (`&mut self`). The fast path
//! runs several sequences in one step ([`Backend::forward`] with many caches);
//! candle's model holds its single key/value cache inside, so it runs one
//! sequence at a time ([`Backend::max_batch`] is 1).

use std::fs::File;

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_phi3, quantized_qwen2, quantized_qwen3};
use rbee_schemas::error::JobError;

use crate::fast::{FastModel, Sequence};

/// Which inference engine a worker runs (`--engine`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    /// The fast CPU path when the model and CPU support it, else candle.
    #[default]
    Auto,
    /// The fast CPU path; loading fails if it cannot run this model.
    Fast,
    /// candle's quantized models (CPU, CUDA or Metal).
    Candle,
}

/// The engine a model was loaded with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Fast,
    Candle,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Fast => "fast",
            EngineKind::Candle => "candle",
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether this process can run the fast path's SIMD kernels; `Err` says why not.
pub fn fast_cpu_support() -> Result<(), String> {
    if !crate::fast::simd::SIMD {
        return Err("this build has no AVX2 kernels (the workspace builds with target-cpu=native; \
                    the build machine lacked AVX2, FMA or F16C)"
            .to_owned());
    }
    #[cfg(target_arch = "x86_64")]
    {
        let have = [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("f16c", std::arch::is_x86_feature_detected!("f16c")),
        ];
        let missing: Vec<&str> = have.iter().filter(|(_, ok)| !ok).map(|(n, _)| *n).collect();
        if !missing.is_empty() {
            return Err(format!("this CPU lacks {}", missing.join(", ")));
        }
    }
    Ok(())
}

/// candle's model of the file's architecture.
pub enum CandleModel {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
    Qwen3(quantized_qwen3::ModelWeights),
    Phi3(quantized_phi3::ModelWeights),
}

impl std::fmt::Debug for CandleModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CandleModel::Llama(_) => "CandleModel::Llama",
            CandleModel::Qwen2(_) => "CandleModel::Qwen2",
            CandleModel::Qwen3(_) => "CandleModel::Qwen3",
            CandleModel::Phi3(_) => "CandleModel::Phi3",
        })
    }
}

impl CandleModel {
    pub(crate) fn load(ct: Content, file: &mut File, device: &Device) -> Result<Self, String> {
        use crate::fast::load::Arch;
        let name = ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
        let Some(arch) = name.as_deref().and_then(Arch::named) else {
            return Err(format!("architecture {name:?}: candle runs {} here", Arch::candle_names()));
        };
        crate::fast::load::refuse_long_rope(&ct)?;
        let model = match arch {
            Arch::Llama => quantized_llama::ModelWeights::from_gguf(ct, file, device).map(CandleModel::Llama),
            Arch::Qwen2 => quantized_qwen2::ModelWeights::from_gguf(ct, file, device).map(CandleModel::Qwen2),
            Arch::Qwen3 => quantized_qwen3::ModelWeights::from_gguf(ct, file, device).map(CandleModel::Qwen3),
            // candle's phi3 takes a flash-attention switch: off (not built).
            Arch::Phi3 => quantized_phi3::ModelWeights::from_gguf(false, ct, file, device).map(CandleModel::Phi3),
            Arch::Gemma2 => {
                return Err("candle has no quantized Gemma 2 model: gemma2 runs on the fast engine (CPU) only".to_owned())
            }
            Arch::Gemma3 => {
                return Err("candle's gemma3 gates the feed-forward with SiLU where Gemma uses GELU, so its answers \
                            would be wrong: gemma3 runs on the fast engine (CPU) only"
                    .to_owned())
            }
        };
        model.map_err(|e| e.to_string())
    }

    /// The logits after the last of `input`'s tokens, which start at `pos`
    /// (0 starts the model's cache afresh).
    pub(crate) fn forward(&mut self, input: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            CandleModel::Llama(m) => m.forward(input, pos),
            CandleModel::Qwen2(m) => m.forward(input, pos),
            CandleModel::Phi3(m) => m.forward(input, pos),
            CandleModel::Qwen3(m) => {
                if pos == 0 {
                    m.clear_kv_cache();
                }
                m.forward(input, pos)
            }
        }
    }
}

/// A loaded model on one of the engines.
#[derive(Debug)]
pub enum Backend {
    Candle { model: Box<CandleModel>, device: Device },
    Fast(Box<FastModel>),
}

/// One sequence's model state.
#[derive(Debug)]
pub enum Cache {
    /// candle keeps the keys and values inside the model; this is only the length.
    Candle { len: usize },
    Fast(Sequence),
}

impl Cache {
    /// Tokens in the cache (the position the next token gets).
    pub fn len(&self) -> usize {
        match self {
            Cache::Candle { len } => *len,
            Cache::Fast(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn internal(e: impl std::fmt::Display) -> JobError {
    JobError::internal(format!("inference failed: {e}"))
}

impl Backend {
    /// Loads `ct` (read from `file`) with the engine `choice` asks for on
    /// `device`. With `Auto`, the reason the fast path was not taken (if any)
    /// comes back alongside, for the log.
    pub fn load(
        ct: Content,
        file: &mut File,
        device: &Device,
        choice: EngineChoice,
    ) -> Result<(Self, Option<String>), String> {
        let fast_ok = || -> Result<(), String> {
            if !device.is_cpu() {
                return Err("the fast path runs on the CPU only".to_owned());
            }
            fast_cpu_support()
        };
        let candle = |ct: Content, file: &mut File| -> Result<Self, String> {
            if ct.tensor_infos.contains_key(crate::fast::load::ROPE_FACTORS) {
                tracing::warn!(
                    "candle's llama does not apply this model's RoPE scaling ({}, Llama 3.1 and later): its answers \
                     will drift from the model's, more so in long contexts; the fast engine (CPU) applies it",
                    crate::fast::load::ROPE_FACTORS
                );
            }
            let model = CandleModel::load(ct, file, device)?;
            Ok(Backend::Candle { model: Box::new(model), device: device.clone() })
        };
        match choice {
            EngineChoice::Candle => Ok((candle(ct, file)?, None)),
            EngineChoice::Fast => {
                if !device.is_cpu() {
                    return Err("--engine fast runs on the CPU only: use --engine candle with --backend cuda or metal"
                        .to_owned());
                }
                if let Err(why) = fast_cpu_support() {
                    tracing::warn!("fast engine without SIMD kernels ({why}): expect it to be slow");
                }
                let m = FastModel::load(&ct, file).map_err(|e| format!("the fast engine cannot run this model: {e}"))?;
                Ok((Backend::Fast(Box::new(m)), None))
            }
            EngineChoice::Auto => {
                let why = match fast_ok() {
                    Ok(()) => match FastModel::load(&ct, file) {
                        Ok(m) => return Ok((Backend::Fast(Box::new(m)), None)),
                        Err(e) => e,
                    },
                    Err(e) => e,
                };
                match candle(ct, file) {
                    Ok(b) => Ok((b, Some(why))),
                    Err(e) if e == why => Err(e),
                    Err(e) => Err(format!("the fast engine cannot run this model ({why}), nor can candle ({e})")),
                }
            }
        }
    }

    pub fn kind(&self) -> EngineKind {
        match self {
            Backend::Candle { .. } => EngineKind::Candle,
            Backend::Fast(_) => EngineKind::Fast,
        }
    }

    /// How many sequences one [`Self::forward`] can advance together.
    pub fn max_batch(&self) -> usize {
        match self {
            Backend::Candle { .. } => 1,
            Backend::Fast(_) => usize::MAX,
        }
    }

    /// How many prompt tokens of one sequence a step should take while other
    /// sequences are decoding, so a long prompt does not stall them for long.
    pub fn prompt_chunk(&self) -> usize {
        match self {
            Backend::Candle { .. } => usize::MAX,
            Backend::Fast(_) => crate::fast::model::MAX_ROWS,
        }
    }

    /// An empty sequence that can hold `max_len` tokens.
    pub fn new_cache(&self, max_len: usize) -> Cache {
        match self {
            Backend::Candle { .. } => Cache::Candle { len: 0 },
            Backend::Fast(m) => Cache::Fast(m.new_sequence(max_len)),
        }
    }

    /// Appends `tokens[i]` (at least one each) to `caches[i]` and returns the
    /// logits after each one's last token. candle takes one cache at a time,
    /// and starts its internal cache afresh when that cache is empty.
    pub fn forward(&mut self, caches: &mut [&mut Cache], tokens: &[&[u32]]) -> Result<Vec<Vec<f32>>, JobError> {
        match self {
            Backend::Candle { model, device } => {
                let ([cache], [toks]) = (caches, tokens) else {
                    return Err(JobError::internal("candle runs one sequence per step"));
                };
                let Cache::Candle { len } = &mut **cache else {
                    return Err(JobError::internal("a fast-path cache was given to candle"));
                };
                let input = Tensor::new(*toks, device).and_then(|t| t.unsqueeze(0)).map_err(internal)?;
                let logits = model.forward(&input, *len).and_then(|l| l.squeeze(0)).map_err(internal)?;
                let logits = logits.to_dtype(candle_core::DType::F32).and_then(|l| l.to_vec1()).map_err(internal)?;
                *len += toks.len();
                Ok(vec![logits])
            }
            Backend::Fast(model) => {
                let mut seqs = Vec::with_capacity(caches.len());
                for c in caches.iter_mut() {
                    match &mut **c {
                        Cache::Fast(s) => seqs.push(s),
                        Cache::Candle { .. } => return Err(JobError::internal("a candle cache was given to the fast path")),
                    }
                }
                model.forward_many(&mut seqs, tokens).map_err(internal)
            }
        }
    }
}
