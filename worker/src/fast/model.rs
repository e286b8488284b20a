//! The forward pass (llama, qwen2, qwen3, phi3, gemma2, gemma3) over any mix of sequences: a prompt (many tokens of
//! one sequence), a decode step of many sequences (one token each), or both.
//!
//! Every token in a step is one "row"; all rows go through each weight matrix
//! together, so weights are streamed once per step, not once per sequence.
//! Attention is per row against its own sequence's cache. Scratch buffers live
//! in the model and only grow (no allocation per token once warm).
//!
//! Concurrency: a `FastModel` is driven by one thread at a time (`&mut self`);
//! inside a step its [`Pool`] runs each matmul and the attention as parallel
//! sections. Weights sit behind an `Arc` and are never written after loading,
//! so several models (e.g. one per engine thread) can share them via
//! [`FastModel::share`].

use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::attention::{attend_partial, block_rows, merge, partial_len, KvView, Queries, MAX_BLOCK_ROWS};
use super::load::{Config, Weights};
use super::matmul::{matmul, matmul_gated, Acts, Plan};
use super::pool::{default_threads, Pool, PoolKind};
use super::quant::{Q8Buf, QK};
use super::simd::quantize_q8;

/// Rows (tokens) per step: longer prompts are processed in chunks this big,
/// which bounds the scratch memory (~40 KB per row for a 7B model).
pub const MAX_ROWS: usize = 256;

/// How a model runs its parallel sections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastConfig {
    /// Threads in all, the calling thread included.
    pub threads: usize,
    pub pool: PoolKind,
}

impl Default for FastConfig {
    /// `RAYON_NUM_THREADS` (else all cores) threads on the spin pool.
    fn default() -> Self {
        Self { threads: default_threads(), pool: PoolKind::Spin }
    }
}

/// One sequence's state: its key/value cache (f16) and length.
#[derive(Clone, Debug)]
pub struct Sequence {
    len: usize,
    max_len: usize,
    kv_dim: usize,
    /// Per layer, `positions × kv_dim`.
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

impl Sequence {
    /// Tokens in the cache (the position the next token gets).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    /// Forgets all but the first `len` tokens (e.g. to reuse a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            for c in self.k.iter_mut().chain(self.v.iter_mut()) {
                c.truncate(len * self.kv_dim);
            }
        }
    }
    /// Grows each layer's cache to hold `n` more positions: doubling, capped
    /// at `max_len`, so appends allocate O(log n) times in all.
    fn reserve(&mut self, n: usize) {
        let need = (self.len + n) * self.kv_dim;
        let cap = self.max_len * self.kv_dim;
        for c in self.k.iter_mut().chain(self.v.iter_mut()) {
            // Drops entries a step that panicked half-way may have left.
            c.truncate(self.len * self.kv_dim);
            if c.capacity() < need {
                let target = need.max(c.capacity() * 2).max(64 * self.kv_dim).min(cap);
                c.reserve_exact(target - c.len());
            }
        }
    }
}

/// One token of a step: which sequence, at which position.
#[derive(Clone, Copy, Debug)]
struct Row {
    seq: usize,
    pos: usize,
    token: u32,
}

/// Buffers for one step, `rows × features` each (grown on demand).
#[derive(Debug, Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    xq: Q8Buf,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    h: Vec<f32>,
    h2: Vec<f32>,
    hq: Q8Buf,
    /// Per row, `head_dim / 2` (cos, sin) pairs for its position; then the
    /// same for sliding-window layers, where the model has them.
    rope: Vec<(f32, f32)>,
    rope_swa: Vec<(f32, f32)>,
    logits: Vec<f32>,
    /// Attention partial states, `blocks × kv heads × splits × block rows ×
    /// group × (hd + 2)` (see [`row_blocks`]).
    parts: Vec<f32>,
    /// Runs of consecutive rows of one sequence that attend together: (first row, rows).
    blocks: Vec<(usize, usize)>,
    /// The same for sliding-window layers, where a row whose window has
    /// moved off key 0 is a block of its own (its keys start at its own key).
    blocks_swa: Vec<(usize, usize)>,
    rows: Vec<Row>,
    /// Rows whose logits are wanted, with the output slot each fills.
    outs: Vec<(usize, usize)>,
    plan: Plan,
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// A model on the fast CPU path.
#[derive(Debug)]
pub struct FastModel {
    w: Arc<Weights>,
    pool: Pool,
    s: Scratch,
    /// `1 / base^(2i / head_dim)`, as candle computes it (over the file's RoPE
    /// factors, if any, and times its linear scaling); then the same for
    /// sliding-window layers (their own base and scaling), empty without them.
    inv_freq: Vec<f32>,
    inv_freq_swa: Vec<f32>,
}

impl FastModel {
    /// Reads a GGUF (`ct` parsed from `file`) for the fast path, with the
    /// default threads. `Err` says why this model cannot use it.
    pub fn load(ct: &candle_core::quantized::gguf_file::Content, file: &std::fs::File) -> Result<Self, String> {
        Self::load_with(ct, file, FastConfig::default())
    }

    /// The weights are read on as many threads as the model computes on.
    pub fn load_with(
        ct: &candle_core::quantized::gguf_file::Content,
        file: &std::fs::File,
        config: FastConfig,
    ) -> Result<Self, String> {
        Self::from_weights(Arc::new(super::load::load(ct, file, config.threads)?), config)
    }

    fn from_weights(w: Arc<Weights>, config: FastConfig) -> Result<Self, String> {
        let hd = w.cfg.head_dim;
        let inv_freq = inv_freq(w.cfg.rope_base, hd, w.rope_factors.as_deref(), w.cfg.rope_scale);
        let inv_freq_swa =
            w.cfg.swa.as_ref().map_or_else(Vec::new, |swa| self::inv_freq(swa.rope_base, hd, None, swa.rope_scale));
        Ok(Self { w, pool: Pool::new(config.threads, config.pool)?, s: Scratch::default(), inv_freq, inv_freq_swa })
    }

    /// Another model over the same weights (no copy) with its own threads and scratch.
    pub fn share(&self, config: FastConfig) -> Result<Self, String> {
        Self::from_weights(Arc::clone(&self.w), config)
    }

    pub fn config(&self) -> &Config {
        &self.w.cfg
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// An empty sequence that can hold `max_len` tokens (its cache grows as it fills).
    pub fn new_sequence(&self, max_len: usize) -> Sequence {
        let n = self.w.cfg.n_layer;
        Sequence { len: 0, max_len, kv_dim: self.w.cfg.kv_dim(), k: vec![Vec::new(); n], v: vec![Vec::new(); n] }
    }

    /// Appends `tokens` (a prompt, or one decode token) to `seq`; returns the
    /// logits after the last one.
    pub fn forward(&mut self, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<f32>, String> {
        let mut out = self.forward_many(&mut [seq], &[tokens])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// One decode step for several sequences at once: `tokens[i]` is appended
    /// to `seqs[i]`; returns the logits of each.
    pub fn forward_batch(&mut self, seqs: &mut [&mut Sequence], tokens: &[u32]) -> Result<Vec<Vec<f32>>, String> {
        if seqs.len() != tokens.len() {
            return Err(format!("{} sequences but {} tokens", seqs.len(), tokens.len()));
        }
        self.forward_with(seqs, |i| std::slice::from_ref(&tokens[i]))
    }

    /// The general step: `tokens[i]` (any number, at least one) is appended to
    /// `seqs[i]`, all sequences going through the weights together (so a new
    /// prompt can join running decodes); returns each sequence's last logits.
    pub fn forward_many(&mut self, seqs: &mut [&mut Sequence], tokens: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        if seqs.len() != tokens.len() {
            return Err(format!("{} sequences but {} token lists", seqs.len(), tokens.len()));
        }
        self.forward_with(seqs, |i| tokens[i])
    }

    /// [`Self::forward_many`] with sequence `i`'s tokens given by `tokens(i)`.
    /// Allocates only the returned logits.
    fn forward_with<'t>(
        &mut self,
        seqs: &mut [&mut Sequence],
        tokens: impl Fn(usize) -> &'t [u32],
    ) -> Result<Vec<Vec<f32>>, String> {
        let cfg = &self.w.cfg;
        for (i, s) in seqs.iter().enumerate() {
            let t = tokens(i);
            if t.is_empty() {
                return Err("a sequence was given no tokens".to_owned());
            }
            if s.kv_dim != cfg.kv_dim() || s.k.len() != cfg.n_layer {
                return Err("this sequence belongs to a different model".to_owned());
            }
            if s.len + t.len() > s.max_len {
                return Err(format!("{} + {} tokens exceed the sequence's {} positions", s.len, t.len(), s.max_len));
            }
            if let Some(bad) = t.iter().find(|&&x| x as usize >= cfg.vocab) {
                return Err(format!("token {bad} is outside the vocabulary ({})", cfg.vocab));
            }
        }
        for (i, s) in seqs.iter_mut().enumerate() {
            s.reserve(tokens(i).len());
        }
        let vocab = cfg.vocab;
        let mut logits = vec![Vec::new(); seqs.len()];
        // Walk all tokens, sequence by sequence, in steps of at most MAX_ROWS.
        let (mut si, mut off) = (0, 0);
        while si < seqs.len() {
            self.s.rows.clear();
            self.s.outs.clear();
            while si < seqs.len() && self.s.rows.len() < MAX_ROWS {
                let t = tokens(si);
                let r = self.s.rows.len();
                self.s.rows.push(Row { seq: si, pos: seqs[si].len + off, token: t[off] });
                off += 1;
                if off == t.len() {
                    self.s.outs.push((r, si));
                    (si, off) = (si + 1, 0);
                }
            }
            self.step(seqs);
            for (o, &(_, seq)) in self.s.outs.iter().enumerate() {
                logits[seq] = self.s.logits[o * vocab..(o + 1) * vocab].to_vec();
            }
        }
        for (i, s) in seqs.iter_mut().enumerate() {
            s.len += tokens(i).len();
        }
        Ok(logits)
    }

    /// Runs `self.s.rows` through the model, appending to the caches, and
    /// leaves the logits of `self.s.outs` rows in `self.s.logits`.
    fn step(&mut self, seqs: &mut [&mut Sequence]) {
        let w = &*self.w;
        let cfg = &w.cfg;
        let pool = &self.pool;
        let s = &mut self.s;
        let n = s.rows.len();
        let (dim, qd, kvd, ffn, hd) = (cfg.dim, cfg.q_dim(), cfg.kv_dim(), cfg.ffn, cfg.head_dim);
        let x = grow(&mut s.x, n * dim);
        let xn = grow(&mut s.xn, n * dim);
        let xq = &mut s.xq;
        let q = grow(&mut s.q, n * qd);
        let k = grow(&mut s.k, n * kvd);
        let v = grow(&mut s.v, n * kvd);
        let att = grow(&mut s.att, n * qd);
        let tmp = grow(&mut s.tmp, n * dim);
        let h = grow(&mut s.h, n * ffn);
        let h2 = grow(&mut s.h2, n * ffn);
        let hq = &mut s.hq;
        let rope = grow(&mut s.rope, n * hd / 2);
        let rope_swa = grow(&mut s.rope_swa, n * self.inv_freq_swa.len());
        let rows = &s.rows;
        let plan = &mut s.plan;
        let most_rows = block_rows(cfg.group());
        let window = cfg.swa.as_ref().map_or(usize::MAX, |swa| swa.window);
        row_blocks(rows, most_rows, usize::MAX, &mut s.blocks);
        match cfg.swa {
            Some(_) => row_blocks(rows, most_rows, window, &mut s.blocks_swa),
            None => s.blocks_swa.clear(),
        }

        for (i, r) in rows.iter().enumerate() {
            let xr = &mut x[i * dim..(i + 1) * dim];
            w.embd.dequantize_row(r.token as usize, xr);
            if cfg.embd_scale != 1.0 {
                xr.iter_mut().for_each(|v| *v *= cfg.embd_scale);
            }
            for (table, inv) in [(&mut *rope, &self.inv_freq), (&mut *rope_swa, &self.inv_freq_swa)] {
                for (cs, f) in table[i * inv.len()..(i + 1) * inv.len()].iter_mut().zip(inv) {
                    let a = r.pos as f32 * f;
                    *cs = (a.cos(), a.sin());
                }
            }
        }
        let scale = cfg.attn_scale;
        let group = cfg.group();
        let splits = key_splits(s.blocks.len(), rows, usize::MAX, cfg.n_kv_head, pool.threads());
        let splits_swa = key_splits(s.blocks_swa.len(), rows, window, cfg.n_kv_head, pool.threads());
        for (li, l) in w.layers.iter().enumerate() {
            // Sliding-window layers: their own RoPE, and each row's keys
            // start `window` before its own (rows past the window's first
            // reach attend one per block).
            let windowed = cfg.swa.as_ref().is_some_and(|swa| swa.layers[li]);
            let (rope, blocks, splits, window) = match windowed {
                true => (&*rope_swa, &s.blocks_swa, splits_swa, window),
                false => (&*rope, &s.blocks, splits, usize::MAX),
            };
            // Attention block.
            rms_norm(x, &l.attn_norm, cfg.eps, xn, dim);
            quantize_q8(xn, xq);
            let xa = Acts { f: xn, q: xq.view(n * dim / QK), n, k: dim };
            matmul(pool, plan, &[&l.wq, &l.wk, &l.wv], &mut [&mut *q, &mut *k, &mut *v], xa);
            if let Some([bq, bk, bv]) = &l.qkv_bias {
                add_rows(q, bq);
                add_rows(k, bk);
                add_rows(v, bv);
            }
            if let Some([nq, nk]) = &l.qk_norm {
                norm_heads(q, nq, cfg.eps);
                norm_heads(k, nk, cfg.eps);
            }
            let rotate = if cfg.arch.neox_rope() { rope_neox } else { rope_i };
            for i in 0..n {
                let cs = &rope[i * hd / 2..(i + 1) * hd / 2];
                rotate(&mut q[i * qd..(i + 1) * qd], cs, hd);
                rotate(&mut k[i * kvd..(i + 1) * kvd], cs, hd);
            }
            for (i, r) in rows.iter().enumerate() {
                let sq = &mut *seqs[r.seq];
                assert_eq!(sq.k[li].len(), r.pos * kvd, "rows of a sequence arrive in order");
                append_f16(&mut sq.k[li], &k[i * kvd..(i + 1) * kvd]);
                append_f16(&mut sq.v[li], &v[i * kvd..(i + 1) * kvd]);
            }
            // One task per (block of rows, kv head, key range); long contexts
            // with few rows are split so every thread has work, then merged.
            let seqs_ro: &[&mut Sequence] = seqs;
            let q_ro: &[f32] = q;
            let nkv = cfg.n_kv_head;
            let pl = partial_len(hd);
            let chunk = most_rows * group * pl;
            let parts = grow(&mut s.parts, blocks.len() * nkv * splits * chunk);
            pool.run_chunks(parts, chunk, &|t, out| {
                let (b, g, sp) = (t / (nkv * splits), t / splits % nkv, t % splits);
                let (first, len) = blocks[b];
                let mut keys = [0usize; MAX_BLOCK_ROWS];
                for (kk, r) in keys.iter_mut().zip(&rows[first..first + len]) {
                    *kk = r.pos + 1;
                }
                // Rows of a block are consecutive positions: the last sees the most.
                let most = keys[len - 1];
                // On a windowed layer a block whose keys do not start at 0 is
                // one row (`window` is usize::MAX elsewhere): its window is
                // what is split.
                let first_key = most.saturating_sub(window);
                let span = most - first_key;
                let range = first_key + span * sp / splits..first_key + span * (sp + 1) / splits;
                let sq = &*seqs_ro[rows[first].seq];
                let kv = KvView { k: &sq.k[li], v: &sq.v[li], kv_dim: kvd };
                let q = &q_ro[first * qd + g * group * hd..];
                let qs = Queries { q, stride: qd, keys: &keys[..len], softcap: cfg.attn_softcap };
                attend_partial(qs, kv, g * hd, range, hd, scale, &mut out[..len * group * pl]);
            });
            for (b, &(first, len)) in blocks.iter().enumerate() {
                for r in 0..len {
                    let row_out = &mut att[(first + r) * qd..][..qd];
                    for (h, o) in row_out.chunks_exact_mut(hd).enumerate() {
                        let (g, j) = (h / group, h % group);
                        let base = (b * nkv + g) * splits;
                        merge((0..splits).map(|sp| &parts[(base + sp) * chunk + (r * group + j) * pl..][..pl]), o);
                    }
                }
            }
            quantize_q8(att, xq);
            let xa = Acts { f: att, q: xq.view(n * qd / QK), n, k: qd };
            matmul(pool, plan, &[&l.wo], &mut [&mut *tmp], xa);
            add_residual(x, tmp, l.post_norm.as_ref().map(|[a, _]| a.as_slice()), cfg.eps, xn, dim);

            // Feed-forward block.
            rms_norm(x, &l.ffn_norm, cfg.eps, xn, dim);
            quantize_q8(xn, xq);
            let xa = Acts { f: xn, q: xq.view(n * dim / QK), n, k: dim };
            matmul_gated(pool, plan, (&l.gate, &l.up, cfg.act), h, h2, xa);
            quantize_q8(h, hq);
            let ha = Acts { f: h, q: hq.view(n * ffn / QK), n, k: ffn };
            matmul(pool, plan, &[&l.down], &mut [&mut *tmp], ha);
            add_residual(x, tmp, l.post_norm.as_ref().map(|[_, f]| f.as_slice()), cfg.eps, xn, dim);
        }

        // Output head, only for the rows whose logits are wanted.
        let no = s.outs.len();
        for (o, &(i, _)) in s.outs.iter().enumerate() {
            let src = &x[i * dim..(i + 1) * dim];
            let dst = &mut xn[o * dim..(o + 1) * dim];
            rms_norm_row(src, &w.norm, cfg.eps, dst);
        }
        quantize_q8(&xn[..no * dim], xq);
        let out_m = w.output();
        let logits = grow(&mut s.logits, no * out_m.rows);
        let xa = Acts { f: &xn[..no * dim], q: xq.view(no * dim / QK), n: no, k: dim };
        matmul(pool, plan, &[out_m], &mut [&mut *logits], xa);
        if let Some(cap) = cfg.logit_softcap {
            logits.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
    }
}

/// `x += out`, or `x += rms_norm(out)` with the block's post-norm weights
/// (Gemma 3), using `scratch` for the normalised rows.
fn add_residual(x: &mut [f32], out: &[f32], post_norm: Option<&[f32]>, eps: f32, scratch: &mut [f32], dim: usize) {
    let out = match post_norm {
        Some(w) => {
            rms_norm(out, w, eps, scratch, dim);
            &*scratch
        }
        None => out,
    };
    x.iter_mut().zip(out).for_each(|(a, b)| *a += b);
}

/// Key ranges per (block of rows, kv head): 1, unless there are fewer such tasks than
/// twice the threads and the longest context (at most `window` keys) is long
/// enough (≥ 256 keys per range) to be worth splitting.
fn key_splits(blocks: usize, rows: &[Row], window: usize, n_kv: usize, threads: usize) -> usize {
    let tasks = blocks * n_kv;
    let longest = rows.iter().map(|r| r.pos + 1).max().unwrap_or(1).min(window);
    if threads == 1 || tasks == 0 || tasks >= 2 * threads {
        return 1;
    }
    (2 * threads).div_ceil(tasks).min(longest / 256).max(1)
}

/// Groups `rows` into runs of consecutive positions of one sequence (a
/// prompt's rows), each at most `most` long, into `blocks`. Rows of
/// a block attend together, so each key is converted once for all of them.
/// A row at position `window` or later (a sliding-window layer's row whose
/// keys no longer start at 0) is a block of its own, as its keys start where
/// no other row's do. `most` ([`block_rows`]) does not depend on the thread
/// count: how a row's attention is summed must not either (a model gives the
/// same logits on any threads).
fn row_blocks(rows: &[Row], most: usize, window: usize, blocks: &mut Vec<(usize, usize)>) {
    blocks.clear();
    for (i, r) in rows.iter().enumerate() {
        match blocks.last_mut() {
            Some((first, len))
                if *len < most && r.pos < window && rows[*first].seq == r.seq && rows[*first].pos + *len == r.pos =>
            {
                *len += 1
            }
            _ => blocks.push((i, 1)),
        }
    }
}

fn append_f16(cache: &mut Vec<f16>, src: &[f32]) {
    let at = cache.len();
    cache.resize(at + src.len(), f16::ZERO);
    cache[at..].convert_from_f32_slice(src);
}

/// `1 / √(mean(x²) + eps)`: what RMSNorm scales `x` by, before its weights.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (sum_squares(x) / x.len() as f32 + eps).sqrt()
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let inv = inv_rms(x, eps);
    for ((o, &a), &b) in out.iter_mut().zip(x).zip(w) {
        *o = a * inv * b;
    }
}

/// `Σ v²` in 16 running sums, which the compiler keeps in vector registers
/// (one sum in order would be a chain of dependent adds, ~1 µs per 576-wide
/// row, on the one thread between parallel sections).
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|v| v * v).sum::<f32>()
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], dim: usize) {
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        rms_norm_row(xr, w, eps, or);
    }
}

/// Each rotary pair's angle per position: `base^(−2j/hd)`, divided by the
/// file's factor for pair `j` where it has them (as ggml's `rope` does), times
/// `scale` (linear RoPE scaling: positions count `scale` each).
fn inv_freq(base: f32, hd: usize, factors: Option<&[f32]>, scale: f32) -> Vec<f32> {
    (0..hd / 2)
        .map(|j| 1f32 / base.powf((2 * j) as f32 / hd as f32) / factors.map_or(1.0, |f| f[j]) * scale)
        .collect()
}

/// Adds `b` to each row of `x` (rows of `b.len()`).
fn add_rows(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    }
}

/// RMSNorm over each head of `x` (heads of `w.len()`), in place.
fn norm_heads(x: &mut [f32], w: &[f32], eps: f32) {
    for head in x.chunks_exact_mut(w.len()) {
        let inv = inv_rms(head, eps);
        head.iter_mut().zip(w).for_each(|(a, g)| *a *= inv * g);
    }
}

/// candle's `rope` (GPT-NeoX's): in each head, pair `(j, j + hd/2)` rotates by angle `j`.
fn rope_neox(v: &mut [f32], cs: &[(f32, f32)], hd: usize) {
    for head in v.chunks_exact_mut(hd) {
        let (lo, hi) = head.split_at_mut(hd / 2);
        for ((a, b), &(c, s)) in lo.iter_mut().zip(hi).zip(cs) {
            (*a, *b) = (*a * c - *b * s, *a * s + *b * c);
        }
    }
}

/// candle's `rope_i`: in each head, pair `(2j, 2j+1)` rotates by angle `j`.
fn rope_i(v: &mut [f32], cs: &[(f32, f32)], hd: usize) {
    for head in v.chunks_exact_mut(hd) {
        for (p, &(c, s)) in head.chunks_exact_mut(2).zip(cs) {
            let (a, b) = (p[0], p[1]);
            p[0] = a * c - b * s;
            p[1] = a * s + b * c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_squares_matches_f64_over_ragged_lengths() {
        for n in [0, 1, 5, 16, 17, 576, 1001] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let got = sum_squares(&x) as f64;
            assert!((got - want).abs() <= 1e-6 * want.max(1.0), "n={n}: {got} vs {want}");
        }
    }
}
