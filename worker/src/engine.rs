//! The inference engine: one GGUF model (llama, qwen2, qwen3, phi3, gemma2 or gemma3), its tokenizer
//! from the same file, and the generation loop for one job.
//!
//! The model runs on the fast CPU path or on candle's quantized models
//! ([`crate::backend`], `--engine auto|fast|candle`); the per-job logic
//! (sampling, stop strings, resume) is [`crate::generation`], shared with the
//! worker's batch loop. Synchronous and single-threaded from the caller's side
//! (the engines parallelise the matrix work internally). The worker process
//! drives it from its own thread; tests and benchmarks call it in-process with
//! the same parameters.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::Device;
use candle_transformers::models::quantized_llama::MAX_SEQ_LEN;
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::job::{GenerateParams, PromptInput};
use rbee_schemas::record::Resume;
use rbee_schemas::worker::{ModelInfo, Outcome};

use crate::backend::{Backend, Cache, EngineChoice, EngineKind};
use crate::chat::ChatTemplate;
use crate::generation::Generation;
use crate::tokenizer::GgufTokenizer;

// The hive sizes memory by the protocol's cap; it must be the one the worker applies.
const _: () = assert!(MAX_SEQ_LEN == rbee_schemas::worker::MAX_CONTEXT);

/// A loaded model, ready to generate.
#[derive(Debug)]
pub struct Engine {
    backend: Backend,
    text: TextSide,
    info: ModelInfo,
    context: usize,
    /// Why `auto` did not take the fast path, if it did not.
    fallback: Option<String>,
    /// The sequence [`Engine::logits`] extends.
    scratch: Option<Cache>,
}

/// Everything between a job's input and token ids: tokenizer and chat template.
#[derive(Debug)]
pub struct TextSide {
    pub tokenizer: GgufTokenizer,
    chat: Option<ChatTemplate>,
    context: usize,
}

/// Receives each sampled token (`Some(id)`) with the text it releases; text
/// released without a new token (when resuming) comes with `None`.
pub type OnToken<'a> = dyn FnMut(Option<u32>, &str) + 'a;

/// The tokenizer and chat template from a GGUF's `tokenizer.*` metadata.
fn text_of(ct: &Content) -> Result<(GgufTokenizer, Option<ChatTemplate>), String> {
    let tokenizer = GgufTokenizer::build(ct)?;
    let chat = match ct.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()) {
        Some(src) => Some(ChatTemplate::new(src, &tokenizer.bos_text, &tokenizer.eos_text)?),
        None => None,
    };
    Ok((tokenizer, chat))
}

fn load_failed(path: &Path, what: impl std::fmt::Display) -> JobError {
    JobError::new(ErrorCode::ModelLoadFailed, format!("cannot load {}: {what}", path.display()))
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

impl TextSide {
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

    /// Starts a job: renders and tokenizes its input (see [`Generation::new`]).
    pub fn start<'t>(
        &'t self,
        params: &GenerateParams,
        resume: Option<&Resume>,
        on_token: &mut OnToken<'_>,
    ) -> Result<Generation<'t>, JobError> {
        let text = self.render(&params.input)?;
        let prompt = self.tokenizer.prompt_ids(&text).map_err(JobError::internal)?;
        Generation::new(&self.tokenizer, prompt, self.context, params, resume, on_token)
    }
}

impl Engine {
    /// Loads the model at `path` onto `device`, on the fast path when it can
    /// run it (see [`EngineChoice::Auto`]).
    pub fn load(path: &Path, device: Device) -> Result<Self, JobError> {
        Self::load_with(path, device, EngineChoice::Auto)
    }

    /// Loads the model at `path` onto `device` with the engine `choice` asks for.
    pub fn load_with(path: &Path, device: Device, choice: EngineChoice) -> Result<Self, JobError> {
        let started = Instant::now();
        let mut file = std::fs::File::open(path).map_err(|e| load_failed(path, e))?;
        // The header here; the weights later, straight from the file at their offsets.
        let mut content = crate::gguf::read_header(&mut file)
            .map_err(|e| load_failed(path, format!("not a GGUF file ({e})")))?;
        let meta_str = |k: &str| content.metadata.get(k).and_then(|v| v.to_string().ok()).cloned();
        let architecture = meta_str("general.architecture").unwrap_or_default();
        use crate::fast::load::Arch;
        if Arch::named(&architecture).is_none() {
            let names = Arch::names();
            return Err(load_failed(path, format!("architecture {architecture:?} is not supported yet (supported: {names})")));
        }
        let context_length = content
            .metadata
            .get(&format!("{architecture}.context_length"))
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(MAX_SEQ_LEN as u32);
        let vocab_size = content
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map_or(0, |v| v.len() as u32);
        let quantization = dominant_weight_type(&content);
        let name = meta_str("general.name").unwrap_or_default();
        // The tokenizer (~40 ms for the demo model's 49k tokens and merges)
        // is built on a thread of its own while the weights load: the
        // weights need none of its metadata, so it is moved out to it.
        let text_keys: Vec<String> = content.metadata.keys().filter(|k| k.starts_with("tokenizer.")).cloned().collect();
        let text_meta = text_keys.iter().filter_map(|k| content.metadata.remove_entry(k)).collect();
        let text_side = Content { metadata: text_meta, tensor_infos: Default::default(), ..content };
        let (text, loaded) = std::thread::scope(|s| {
            let text = std::thread::Builder::new().name("rbee-tokenizer".into()).spawn_scoped(s, || text_of(&text_side));
            let loaded = Backend::load(content, &mut file, &device, choice);
            let text = match text {
                Ok(t) => t.join().unwrap_or_else(|_| Err("building the tokenizer panicked".to_owned())),
                // No thread to be had: build it here, after the weights.
                Err(_) => text_of(&text_side),
            };
            (text, loaded)
        });
        let (tokenizer, chat) = text.map_err(|e| load_failed(path, e))?;
        let (backend, fallback) = loaded.map_err(|e| load_failed(path, e))?;
        // Both engines get candle's limit, so a job fits the same on either.
        let context = (context_length as usize).min(MAX_SEQ_LEN);
        let info = ModelInfo {
            architecture,
            name,
            context_length: context as u32,
            vocab_size,
            quantization,
            device: device_name(&device),
            load_ms: started.elapsed().as_secs_f64() * 1e3,
            // The job loop that runs it says (see `process`).
            slots: 0,
        };
        let text = TextSide { tokenizer, chat, context };
        Ok(Self { backend, text, info, context, fallback, scratch: None })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The engine the model runs on.
    pub fn kind(&self) -> EngineKind {
        self.backend.kind()
    }

    /// Sequences one step can take (1 on engines that run one at a time).
    pub fn max_batch(&self) -> usize {
        self.backend.max_batch()
    }

    /// Why `auto` chose candle, when it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.text.tokenizer
    }

    /// The text side and the model, borrowed apart (a batch of jobs reads the
    /// first while stepping the second).
    pub fn parts(&mut self) -> (&TextSide, &mut Backend) {
        (&self.text, &mut self.backend)
    }

    /// Runs `tokens` at positions `index_pos..` through the model (extending
    /// the sequence an earlier call left; position 0 starts afresh) and returns
    /// the logits after the last one.
    pub fn logits(&mut self, tokens: &[u32], index_pos: usize) -> Result<Vec<f32>, JobError> {
        let cache = match self.scratch.take() {
            Some(c) if index_pos > 0 && index_pos == c.len() => c,
            Some(c) if index_pos > 0 => {
                let have = c.len();
                self.scratch = Some(c);
                return Err(JobError::internal(format!(
                    "position {index_pos} does not follow the {have} tokens run so far (continue at {have}, or start at 0)"
                )));
            }
            None if index_pos > 0 => return Err(JobError::internal("no tokens run yet: start at position 0")),
            _ => self.backend.new_cache(self.context),
        };
        let cache = self.scratch.insert(cache);
        let mut out = self.backend.forward(&mut [cache], &[tokens])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// The exact text the model is given for `input`.
    pub fn render(&self, input: &PromptInput) -> Result<String, JobError> {
        self.text.render(input)
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
        // The scratch sequence of `logits` is gone (candle's internal cache is reused).
        self.scratch = None;
        let (text, backend) = (&self.text, &mut self.backend);
        let mut job = text.start(params, resume, on_token)?;
        let mut cache = backend.new_cache(job.max_len());
        while !job.check_cancel(cancel) {
            let input = job.pending();
            let n = input.len();
            let mut logits = backend.forward(&mut [&mut cache], &[input])?;
            job.consume(n);
            job.advance(&logits.pop().unwrap_or_default(), on_token)?;
        }
        Ok(job.finish(on_token))
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
