//! Reading a llama-, qwen2-, qwen3-, phi3-, gemma2- or gemma3-architecture GGUF into the fast path's
//! weights: the hyper-parameters from the metadata (parsed by candle) and each
//! tensor's raw bytes, read straight from the file at the offsets candle's
//! parser found and repacked into one [`Arena`] in reading order.
//!
//! They differ only in small parts of attention and in how the file lays the
//! projections out (see [`Arch`]). Anything
//! the fast path cannot run exactly like candle's `quantized_llama`,
//! `quantized_qwen2`, `quantized_qwen3` or `quantized_phi3` (another architecture, mixture of
//! experts, an unsupported weight type, odd shapes) is an `Err` naming the
//! reason, so the caller can fall back to candle. Gemma 2 and 3 follow
//! llama.cpp's `gemma2` and `gemma3` graphs instead: candle has no quantized
//! Gemma 2, and its `quantized_gemma3` gates with SiLU where Gemma uses GELU,
//! so the worker runs them on this path only.
//! Runs once, on the caller's thread and as many loader threads as the model
//! will compute on: most of a load is the kernel zeroing the arena's fresh
//! pages as they are first written, then the copy and the repacking, and each
//! matrix's share of that runs on whichever thread is free.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::{Content, Value};

use super::arena::{Arena, Bytes};
use super::matmul::{pack_matrix, Matrix};
use super::quant::{dequantize_gguf_row, Src, QK};
pub use super::simd::Act;

/// The transformer families the fast path runs. They share the block
/// (RMSNorm, grouped-query attention with RoPE, a gated feed-forward); they
/// differ in attention's details, in Gemma's extra norms, scales and
/// activation, and in how the file lays the projections out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2-3, SmolLM, Mistral: RoPE on interleaved pairs (the converter
    /// permutes the query and key rows for it).
    Llama,
    /// Qwen 2 and 2.5: biases on the query, key and value projections; RoPE
    /// on the two halves of each head (GPT-NeoX's).
    Qwen2,
    /// Qwen 3: no biases; an RMSNorm over each query and key head before
    /// RoPE; NeoX RoPE; heads may be wider than `dim / heads`.
    Qwen3,
    /// Phi 3: llama's block with the query, key and value projections in one
    /// tensor and the gate and up projections in another; NeoX RoPE.
    Phi3,
    /// Gemma 2: embeddings scaled by `√dim`, a norm after attention and after
    /// the feed-forward, GELU (tanh) gating, NeoX RoPE, attention scores and
    /// logits soft-capped (`cap · tanh(x / cap)`), and a sliding window on
    /// every other layer.
    Gemma2,
    /// Gemma 3: Qwen 3's per-head norms and NeoX RoPE, plus embeddings
    /// scaled by `√dim`, a norm after attention and after the feed-forward,
    /// GELU (tanh) gating, and sliding-window attention on five layers of
    /// every six, with their own RoPE base.
    Gemma3,
}

impl Arch {
    pub const ALL: [Arch; 6] = [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Phi3, Arch::Gemma2, Arch::Gemma3];

    /// The architecture `general.architecture` names, if rbee runs it.
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.key() == name)
    }

    /// The names of [`Self::ALL`], for messages: "llama, qwen2, ...".
    pub fn names() -> String {
        Self::names_where(|_| true)
    }

    /// The names of the families candle runs here ([`Self::on_candle`]).
    pub fn candle_names() -> String {
        Self::names_where(Self::on_candle)
    }

    fn names_where(keep: impl Fn(Self) -> bool) -> String {
        Self::ALL.into_iter().filter(|a| keep(*a)).map(Self::key).collect::<Vec<_>>().join(", ")
    }

    /// Its `general.architecture` name; GGUF metadata keys start with it.
    pub fn key(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Phi3 => "phi3",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3",
        }
    }

    /// Whether candle has a model of this family that runs it as the file
    /// means (see the module's notes on Gemma).
    pub fn on_candle(self) -> bool {
        !self.gemma()
    }

    /// Gemma 2 or 3: the scaled embeddings, post-norms, GELU and soft caps.
    pub fn gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }

    /// Whether RoPE rotates `(j, j + hd/2)` in each head rather than `(2j, 2j + 1)`.
    pub fn neox_rope(self) -> bool {
        !matches!(self, Self::Llama)
    }
}

/// The model's shape and numerics, as candle's quantized models read them.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_layer: usize,
    pub dim: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub eps: f32,
    pub rope_base: f32,
    /// `<arch>.context_length` (0 if absent).
    pub context: usize,
    /// Each token's embedding is multiplied by this (Gemma: `√dim`; else 1).
    pub embd_scale: f32,
    /// Attention scores are `q·k` times this: `1/√head_dim`, except Gemma 3
    /// 27B's `1/√(dim/heads)` (as llama.cpp, which knows it by its 62 layers).
    pub attn_scale: f32,
    /// The feed-forward gate's activation.
    pub act: Act,
    /// Positions are multiplied by this before RoPE on full-attention layers:
    /// `1 / rope.scaling.factor` of linear scaling (Gemma 3 4B and up), else 1.
    pub rope_scale: f32,
    /// Sliding-window attention (Gemma 2 and 3), `None` for full attention everywhere.
    pub swa: Option<Swa>,
    /// Attention scores become `cap · tanh(score / cap)` (Gemma 2's
    /// `attn_logit_softcapping`, on the scaled scores).
    pub attn_softcap: Option<f32>,
    /// Logits become `cap · tanh(logits / cap)` (`final_logit_softcapping`).
    pub logit_softcap: Option<f32>,
}

/// Sliding-window attention: layer `i` attends to its last `window`
/// positions (its own included) where `layers[i]`, and RoPE's base and
/// position scale there are `rope_base` and `rope_scale`; the other layers
/// attend to everything.
#[derive(Clone, Debug, PartialEq)]
pub struct Swa {
    pub window: usize,
    pub rope_base: f32,
    pub rope_scale: f32,
    pub layers: Vec<bool>,
}

impl Config {
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.n_head / self.n_kv_head
    }
}

/// One transformer block's weights.
#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
    /// Biases added to the query, key and value projections (Qwen 2).
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    /// Weights of the RMSNorm over each query and each key head (Qwen 3, Gemma 3).
    pub qk_norm: Option<[Vec<f32>; 2]>,
    /// Weights of the RMSNorms over the attention's and the feed-forward's
    /// outputs, before each is added to the residual (Gemma 3).
    pub post_norm: Option<[Vec<f32>; 2]>,
}

/// All weights, read-only after loading (shared between threads and models).
#[derive(Debug)]
pub struct Weights {
    pub cfg: Config,
    pub embd: Matrix,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `None`: the output head is tied to `embd` (no `output.weight`).
    pub output: Option<Matrix>,
    /// `rope_freqs.weight`, one divisor per rotary frequency (Llama 3.1+
    /// RoPE scaling, written out by the converter); `None` when absent.
    pub rope_factors: Option<Vec<f32>>,
}

impl Weights {
    pub fn output(&self) -> &Matrix {
        self.output.as_ref().unwrap_or(&self.embd)
    }
}

/// Largest head size and query-heads-per-kv-head the attention kernel's stack buffers hold.
pub const MAX_HEAD_DIM: usize = 256;
pub const MAX_GROUP: usize = 16;

fn meta<'a>(ct: &'a Content, key: &str) -> Result<&'a Value, String> {
    ct.metadata.get(key).ok_or_else(|| format!("metadata {key} is missing"))
}

fn meta_usize(ct: &Content, key: &str) -> Result<usize, String> {
    let v = meta(ct, key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .map_err(|e| format!("metadata {key}: {e}"))
}

/// `key` as a count if the file has it; `Err` if it has it as something else.
fn meta_usize_opt(ct: &Content, key: &str) -> Result<Option<usize>, String> {
    ct.metadata.get(key).map(|_| meta_usize(ct, key)).transpose()
}

fn meta_f32(ct: &Content, key: &str) -> Result<Option<f32>, String> {
    ct.metadata.get(key).map(|v| v.to_f32().map_err(|e| format!("metadata {key}: {e}"))).transpose()
}

fn config(ct: &Content) -> Result<Config, String> {
    let name = meta(ct, "general.architecture")?.to_string().map_err(|e| e.to_string())?;
    let arch = Arch::named(name)
        .ok_or_else(|| format!("architecture {name:?}: the fast path runs {}", Arch::names()))?;
    let key = |k: &str| format!("{}.{k}", arch.key());
    refuse_long_rope(ct)?;
    if meta_usize(ct, &key("expert_count")).unwrap_or(0) > 1 {
        return Err("mixture-of-experts models are not supported by the fast path".to_owned());
    }
    let n_head = meta_usize(ct, &key("attention.head_count"))?;
    let n_kv_head = meta_usize(ct, &key("attention.head_count_kv"))?;
    let dim = meta_usize(ct, &key("embedding_length"))?;
    let eps = meta(ct, &key("attention.layer_norm_rms_epsilon"))?.to_f32().map_err(|e| e.to_string())?;
    let rope_base = ct.metadata.get(&key("rope.freq_base")).and_then(|v| v.to_f32().ok()).unwrap_or(10_000.0);
    // Qwen 3 says how wide a head is; the others have `dim / heads`.
    let head_dim = match meta_usize_opt(ct, &key("attention.key_length"))? {
        Some(width) => width,
        None if n_head > 0 && dim % n_head == 0 => dim / n_head,
        None => 0,
    };
    if n_head == 0 || n_kv_head == 0 || head_dim == 0 || n_head % n_kv_head != 0 {
        return Err(format!("inconsistent head counts: dim {dim}, {n_head} heads, {n_kv_head} kv heads"));
    }
    let n_layer = meta_usize(ct, &key("block_count"))?;
    if let Some(v) = ct.metadata.get(&key("attention.value_length")) {
        if v.to_u32().ok() != Some(head_dim as u32) {
            return Err("value heads narrower or wider than key heads are not supported".to_owned());
        }
    }
    let rope_dim = meta_usize_opt(ct, &key("rope.dimension_count"))?.unwrap_or(head_dim);
    if rope_dim != head_dim {
        return Err(format!("partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"));
    }
    if head_dim > MAX_HEAD_DIM || n_head / n_kv_head > MAX_GROUP || head_dim % 2 != 0 {
        return Err(format!("head size {head_dim} or group {} is beyond the fast path's limits", n_head / n_kv_head));
    }
    let embd = ct.tensor_infos.get("token_embd.weight").ok_or("tensor token_embd.weight is missing")?;
    let vocab = embd.shape.dims().first().copied().unwrap_or(0);
    let ffn = match ct.tensor_infos.get("blk.0.ffn_gate.weight") {
        Some(t) => t.shape.dims().first().copied().unwrap_or(0),
        None => meta_usize(ct, &key("feed_forward_length"))?,
    };
    let gemma = arch.gemma();
    let rope_scale = match gemma {
        true => rope_linear_scale(ct, &key)?,
        false => 1.0,
    };
    // As llama.cpp reads them. Gemma 3: no window unless the file says, every
    // sixth layer global, its own RoPE base (unscaled) on windowed layers.
    // Gemma 2: a 4096-key window unless the file says, every other layer
    // global, the same RoPE everywhere; both soft caps on by default.
    let (swa, attn_softcap, logit_softcap) = match arch {
        Arch::Gemma3 => {
            let swa = sliding_window(ct, &key, n_layer, SwaDefaults { window: 0, period: 6, rope_base: 10_000.0, rope_scale: 1.0 })?;
            (swa, None, meta_f32(ct, &key("final_logit_softcapping"))?)
        }
        Arch::Gemma2 => {
            let swa = sliding_window(ct, &key, n_layer, SwaDefaults { window: 4096, period: 2, rope_base, rope_scale })?;
            let attn = meta_f32(ct, &key("attn_logit_softcapping"))?.unwrap_or(50.0);
            (swa, Some(attn), Some(meta_f32(ct, &key("final_logit_softcapping"))?.unwrap_or(30.0)))
        }
        _ => (None, None, None),
    };
    let positive = |cap: Option<f32>| cap.filter(|c| *c > 0.0);
    let (attn_softcap, logit_softcap) = (positive(attn_softcap), positive(logit_softcap));
    Ok(Config {
        arch,
        n_layer,
        dim,
        n_head,
        n_kv_head,
        head_dim,
        ffn,
        vocab,
        eps,
        rope_base,
        context: meta_usize(ct, &key("context_length")).unwrap_or(0),
        embd_scale: if gemma { (dim as f32).sqrt() } else { 1.0 },
        attn_scale: match (arch, n_layer) {
            (Arch::Gemma2, GEMMA2_27B_LAYERS) | (Arch::Gemma3, GEMMA3_27B_LAYERS) => 1.0 / ((dim / n_head) as f32).sqrt(),
            _ => 1.0 / (head_dim as f32).sqrt(),
        },
        act: if gemma { Act::GeluTanh } else { Act::Silu },
        rope_scale,
        swa,
        attn_softcap,
        logit_softcap,
    })
}

/// Gemma 2 and 3 27B's layer counts: llama.cpp scales their queries by
/// `1/√(dim/heads)` (Gemma's `query_pre_attn_scalar`, which the converter does
/// not write), the other sizes by `1/√head_dim`.
const GEMMA2_27B_LAYERS: usize = 46;
const GEMMA3_27B_LAYERS: usize = 62;

/// What a Gemma file's sliding window is where its metadata is silent.
struct SwaDefaults {
    window: usize,
    period: usize,
    rope_base: f32,
    rope_scale: f32,
}

/// `1 / rope.scaling.factor` for linear scaling (none: 1); other kinds of
/// scaling are refused rather than run with the wrong positions.
fn rope_linear_scale(ct: &Content, key: &dyn Fn(&str) -> String) -> Result<f32, String> {
    let kind = match ct.metadata.get(&key("rope.scaling.type")) {
        Some(v) => v.to_string().map_err(|e| format!("metadata {}: {e}", key("rope.scaling.type")))?.clone(),
        None => "linear".to_owned(),
    };
    let factor = meta_f32(ct, &key("rope.scaling.factor"))?.unwrap_or(0.0);
    match kind.as_str() {
        "none" => Ok(1.0),
        _ if factor == 0.0 => Ok(1.0),
        "linear" if factor.is_finite() && factor > 0.0 => Ok(1.0 / factor),
        "linear" => Err(format!("{} is {factor}: it must be a positive number", key("rope.scaling.factor"))),
        other => Err(format!("RoPE scaling {other:?} is not supported yet (linear is)")),
    }
}

/// Gemma's sliding window, as llama.cpp reads it: `attention.sliding_window`
/// (0: none), and which layers use it from `attention.sliding_window_pattern`:
/// one flag per layer, or a period `n` (every `n`th layer attends to
/// everything); `rope.freq_base_swa`; `defaults` where they are absent.
fn sliding_window(
    ct: &Content,
    key: &dyn Fn(&str) -> String,
    n_layer: usize,
    defaults: SwaDefaults,
) -> Result<Option<Swa>, String> {
    let window = meta_usize_opt(ct, &key("attention.sliding_window"))?.unwrap_or(defaults.window);
    if window == 0 {
        return Ok(None);
    }
    let pattern_key = key("attention.sliding_window_pattern");
    let layers = match ct.metadata.get(&pattern_key) {
        Some(Value::Array(flags)) => {
            let flags: Result<Vec<bool>, _> = flags.iter().map(|f| f.to_bool()).collect();
            let flags = flags.map_err(|e| format!("metadata {pattern_key}: {e}"))?;
            if flags.len() != n_layer {
                return Err(format!("metadata {pattern_key} has {} flags for {n_layer} layers", flags.len()));
            }
            flags
        }
        Some(_) => period(meta_usize(ct, &pattern_key)?, n_layer),
        None => period(defaults.period, n_layer),
    };
    let rope_base = meta_f32(ct, &key("rope.freq_base_swa"))?.unwrap_or(defaults.rope_base);
    Ok(Some(Swa { window, rope_base, rope_scale: defaults.rope_scale, layers }))
}

/// Every `n`th layer global, the others windowed (`n` = 0: all windowed).
fn period(n: usize, n_layer: usize) -> Vec<bool> {
    (0..n_layer).map(|i| n == 0 || i % n < n - 1).collect()
}

/// Checks tensor `name` has shape `dims` (candle's order: outermost first,
/// so a matrix is `[rows, cols]`) and a supported type; returns the type,
/// the file offset and the byte size.
fn locate(ct: &Content, name: &str, dims: &[usize]) -> Result<(Src, u64, usize), String> {
    let info = ct.tensor_infos.get(name).ok_or_else(|| format!("tensor {name} is missing"))?;
    if info.shape.dims() != dims {
        return Err(format!("tensor {name} has shape {:?}, expected {dims:?}", info.shape.dims()));
    }
    let t = Src::from_ggml(info.ggml_dtype).map_err(|e| format!("{name}: {e}"))?;
    // Blocks run along the innermost dimension (a row).
    if dims.last().is_none_or(|&n| n % t.block_elems() != 0) {
        return Err(format!("tensor {name}: rows of {dims:?} do not fill whole {t:?} blocks"));
    }
    let elems: usize = dims.iter().product();
    Ok((t, ct.tensor_data_offset + info.offset, elems / t.block_elems() * t.block_bytes()))
}

fn read_at(file: &File, name: &str, at: u64, out: &mut [u8]) -> Result<(), String> {
    file.read_exact_at(out, at).map_err(|e| format!("reading {name}: {e}"))
}

fn vector(ct: &Content, file: &File, name: &str, len: usize) -> Result<Vec<f32>, String> {
    let (t, at, size) = locate(ct, name, &[len])?;
    let mut bytes = vec![0u8; size];
    read_at(file, name, at, &mut bytes)?;
    let mut out = vec![0f32; len];
    dequantize_gguf_row(t, &bytes, &mut out);
    Ok(out)
}

/// One matrix to place in the arena.
struct Slot {
    name: String,
    rows: usize,
    cols: usize,
    src: Src,
    file_at: u64,
    file_len: usize,
    arena_at: usize,
    len: usize,
}

/// Reads every weight the forward pass uses: the matrices, repacked,
/// into one arena in the order a forward step reads them, on `threads`
/// threads in all (the caller's included); the norms as f32.
pub fn load(ct: &Content, file: &File, threads: usize) -> Result<Weights, String> {
    let cfg = config(ct)?;
    let (d, f, kv, qd, hd) = (cfg.dim, cfg.ffn, cfg.kv_dim(), cfg.q_dim(), cfg.head_dim);
    if d % QK != 0 || f % QK != 0 {
        return Err(format!("embedding {d} or feed-forward {f} size is not a multiple of {QK}"));
    }
    // Each matrix as (tensor, its first row, rows, columns, the tensor's
    // rows): Phi 3 stores the query, key and value rows in one tensor, and the
    // gate's rows then the up projection's in another.
    let mut shapes: Vec<(String, usize, usize, usize, usize)> = Vec::new();
    let whole = |name: String, rows: usize, cols: usize| (name, 0, rows, cols, rows);
    for i in 0..cfg.n_layer {
        let p = format!("blk.{i}");
        if cfg.arch == Arch::Phi3 {
            let (qkv, all) = (format!("{p}.attn_qkv.weight"), qd + 2 * kv);
            shapes.push((qkv.clone(), 0, qd, d, all));
            shapes.push((qkv.clone(), qd, kv, d, all));
            shapes.push((qkv, qd + kv, kv, d, all));
        } else {
            shapes.push(whole(format!("{p}.attn_q.weight"), qd, d));
            shapes.push(whole(format!("{p}.attn_k.weight"), kv, d));
            shapes.push(whole(format!("{p}.attn_v.weight"), kv, d));
        }
        shapes.push(whole(format!("{p}.attn_output.weight"), d, qd));
        if cfg.arch == Arch::Phi3 {
            let up = format!("{p}.ffn_up.weight");
            shapes.push((up.clone(), f, f, d, 2 * f));
            shapes.push((up, 0, f, d, 2 * f));
        } else {
            shapes.push(whole(format!("{p}.ffn_up.weight"), f, d));
            shapes.push(whole(format!("{p}.ffn_gate.weight"), f, d));
        }
        shapes.push(whole(format!("{p}.ffn_down.weight"), d, f));
    }
    let tied = !ct.tensor_infos.contains_key("output.weight");
    if !tied {
        shapes.push(whole("output.weight".to_owned(), cfg.vocab, d));
    }
    shapes.push(whole("token_embd.weight".to_owned(), cfg.vocab, d));
    let mut slots = Vec::with_capacity(shapes.len());
    let mut size = 0usize;
    for (name, first, rows, cols, all) in shapes {
        let (src, at, bytes) = locate(ct, &name, &[all, cols])?;
        let (file_at, file_len) = (at + (first * bytes / all) as u64, rows * bytes / all);
        let name = if rows == all { name } else { format!("{name} rows {first}..{}", first + rows) };
        let len = rows * src.packed().row_bytes(cols);
        Matrix::check(src.packed(), rows, cols, len).map_err(|e| format!("{name}: {e}"))?;
        slots.push(Slot { name, rows, cols, src, file_at, file_len, arena_at: size, len });
        size = (size + len).next_multiple_of(64);
    }
    let mut arena = Arena::new(size);
    fill(&slots, &mut arena, file, threads)?;
    let arena = Arc::new(arena);
    let mut mats = slots.iter().map(|s| {
        Matrix::packed(s.src.packed(), s.rows, s.cols, Bytes::new(Arc::clone(&arena), s.arena_at, s.len))
            .map_err(|e| format!("{}: {e}", s.name))
    });
    let mut next = || mats.next().unwrap_or_else(|| Err("internal: too few matrices".to_owned()));
    let mut layers = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        let p = format!("blk.{i}");
        let (wq, wk, wv, wo) = (next()?, next()?, next()?, next()?);
        let (up, gate, down) = (next()?, next()?, next()?);
        layers.push(Layer {
            attn_norm: vector(ct, file, &format!("{p}.attn_norm.weight"), d)?,
            wq,
            wk,
            wv,
            wo,
            ffn_norm: vector(ct, file, &format!("{p}.ffn_norm.weight"), d)?,
            gate,
            up,
            down,
            qkv_bias: match cfg.arch {
                Arch::Qwen2 => Some([
                    vector(ct, file, &format!("{p}.attn_q.bias"), qd)?,
                    vector(ct, file, &format!("{p}.attn_k.bias"), kv)?,
                    vector(ct, file, &format!("{p}.attn_v.bias"), kv)?,
                ]),
                _ => None,
            },
            qk_norm: match cfg.arch {
                Arch::Qwen3 | Arch::Gemma3 => Some([
                    vector(ct, file, &format!("{p}.attn_q_norm.weight"), hd)?,
                    vector(ct, file, &format!("{p}.attn_k_norm.weight"), hd)?,
                ]),
                _ => None,
            },
            post_norm: match cfg.arch.gemma() {
                true => Some([
                    vector(ct, file, &format!("{p}.post_attention_norm.weight"), d)?,
                    vector(ct, file, &format!("{p}.post_ffw_norm.weight"), d)?,
                ]),
                false => None,
            },
        });
    }
    let output = if tied { None } else { Some(next()?) };
    let embd = next()?;
    let norm = vector(ct, file, "output_norm.weight", d)?;
    let rope_factors = match ct.tensor_infos.contains_key(ROPE_FACTORS) {
        true => Some(rope_factors(ct, file, cfg.head_dim / 2)?),
        false => None,
    };
    Ok(Weights { cfg, embd, layers, norm, output, rope_factors })
}

/// The tensor llama.cpp's converter writes for Llama 3.1+ RoPE scaling.
pub const ROPE_FACTORS: &str = "rope_freqs.weight";

/// The tensors of LongRoPE scaling (Phi 3's 128k-context models).
const LONG_ROPE: [&str; 2] = ["rope_factors_long.weight", "rope_factors_short.weight"];

/// `Err` for a file with LongRoPE scaling, which neither engine applies: such
/// files fail to load rather than run with the wrong positions.
pub fn refuse_long_rope(ct: &Content) -> Result<(), String> {
    match LONG_ROPE.iter().find(|t| ct.tensor_infos.contains_key(**t)) {
        Some(t) => Err(format!("{t}: LongRoPE scaling (Phi 3 and 3.5 with 128k contexts) is not supported yet")),
        None => Ok(()),
    }
}

fn rope_factors(ct: &Content, file: &File, len: usize) -> Result<Vec<f32>, String> {
    let f = vector(ct, file, ROPE_FACTORS, len)?;
    match f.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
        Some(bad) => Err(format!("{ROPE_FACTORS} holds {bad}: every factor must be a positive number")),
        None => Ok(f),
    }
}

/// Reads and repacks every slot's matrix into its part of `arena`, each part
/// taken by the next free thread of `threads` (the caller's included; fewer
/// if the OS gives none). The first error is the answer.
fn fill(slots: &[Slot], arena: &mut Arena, file: &File, threads: usize) -> Result<(), String> {
    let mut parts = Vec::with_capacity(slots.len());
    let (mut rest, mut at) = (arena.bytes_mut(), 0);
    for s in slots {
        let (part, tail) = std::mem::take(&mut rest)[s.arena_at - at..].split_at_mut(s.len);
        parts.push((s, part));
        (rest, at) = (tail, s.arena_at + s.len);
    }
    let queue = Mutex::new(parts.into_iter());
    let work = || -> Result<(), String> {
        let mut gguf = Vec::new();
        loop {
            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
            let Some((s, part)) = next else { return Ok(()) };
            gguf.resize(s.file_len, 0);
            read_at(file, &s.name, s.file_at, &mut gguf)?;
            pack_matrix(s.src, &gguf, s.rows, s.cols, part);
        }
    };
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads.min(slots.len()))
            .map_while(|i| std::thread::Builder::new().name(format!("rbee-load-{i}")).spawn_scoped(scope, work).ok())
            .collect();
        let mine = work();
        helpers
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a weight loading thread panicked".to_owned())))
            .fold(mine, Result::and)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;

    fn content(meta: &[(&str, Value)]) -> Content {
        let metadata = meta.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        Content { magic: VersionedMagic::GgufV3, metadata, tensor_infos: Default::default(), tensor_data_offset: 0 }
    }

    /// Gemma 3's window and RoPE scaling read as llama.cpp reads them: the
    /// window's layers from a period, from flags or by default every sixth
    /// layer global; linear scaling only.
    #[test]
    fn sliding_windows_and_rope_scaling_read_as_llama_cpp_does() {
        let key = |k: &str| format!("gemma3.{k}");
        let window = ("gemma3.attention.sliding_window", Value::U32(512));
        let gemma3 = || SwaDefaults { window: 0, period: 6, rope_base: 10_000.0, rope_scale: 1.0 };
        let swa = |meta: &[(&str, Value)], n| sliding_window(&content(meta), &key, n, gemma3());
        let by_default = swa(std::slice::from_ref(&window), 12).unwrap().unwrap();
        assert_eq!(by_default.layers, [true, true, true, true, true, false].repeat(2));
        assert_eq!((by_default.window, by_default.rope_base), (512, 10_000.0));
        let pattern = ("gemma3.attention.sliding_window_pattern", Value::U32(3));
        let base = ("gemma3.rope.freq_base_swa", Value::F32(1_000.0));
        let every_third = swa(&[window.clone(), pattern, base], 6).unwrap().unwrap();
        assert_eq!(every_third.layers, [true, true, false, true, true, false]);
        assert_eq!(every_third.rope_base, 1_000.0);
        let flags = Value::Array(vec![Value::Bool(false), Value::Bool(true)]);
        let flagged = swa(&[window.clone(), ("gemma3.attention.sliding_window_pattern", flags.clone())], 2).unwrap();
        assert_eq!(flagged.unwrap().layers, [false, true]);
        let short = swa(&[window, ("gemma3.attention.sliding_window_pattern", flags)], 3).unwrap_err();
        assert!(short.contains("2 flags for 3 layers"), "{short}");
        assert_eq!(swa(&[("gemma3.attention.sliding_window", Value::U32(0))], 6).unwrap(), None);
        assert_eq!(swa(&[], 6).unwrap(), None);
        // Gemma 2's defaults: a 4096-key window on every other layer.
        let gemma2 = SwaDefaults { window: 4096, period: 2, rope_base: 10_000.0, rope_scale: 0.5 };
        let g2 = sliding_window(&content(&[]), &key, 4, gemma2).unwrap().unwrap();
        assert_eq!(g2, Swa { window: 4096, rope_base: 10_000.0, rope_scale: 0.5, layers: vec![true, false, true, false] });

        let scale = |meta: &[(&str, Value)]| rope_linear_scale(&content(meta), &key);
        let factor = |f: f32| ("gemma3.rope.scaling.factor", Value::F32(f));
        let kind = |k: &str| ("gemma3.rope.scaling.type", Value::String(k.into()));
        assert_eq!(scale(&[]).unwrap(), 1.0);
        assert_eq!(scale(&[factor(8.0)]).unwrap(), 0.125);
        assert_eq!(scale(&[kind("linear"), factor(8.0)]).unwrap(), 0.125);
        assert_eq!(scale(&[kind("none"), factor(8.0)]).unwrap(), 1.0);
        assert!(scale(&[kind("yarn"), factor(4.0)]).unwrap_err().contains("\"yarn\" is not supported"));
        assert!(scale(&[kind("linear"), factor(-2.0)]).unwrap_err().contains("positive"));
    }
}
