//! Whole-model tests of the fast path on the demo model, against candle's
//! `quantized_llama` (the reference the worker used before) and against itself
//! (batched vs. one sequence at a time, one prompt vs. chunks).
//!
//! Both paths quantize activations to 8 bits per 32-block before each matmul
//! (candle with f16 scales, the fast path with f32) and the fast path keeps its
//! key/value cache in f16, so logits agree to a few hundredths, not bit for bit.


use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

use super::{FastConfig, FastModel, PoolKind, Sequence};

/// The demo model, where `scripts/fetch-demo-model.sh` puts it (as the
/// integration tests find it): `$RBEE_TEST_MODELS_DIR`, else the models
/// directory of the rbee home (`$RBEE_HOME`, else `~/.local/share/rbee`).
pub fn demo_model() -> std::path::PathBuf {
    std::env::var_os("RBEE_TEST_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| rbee_broker::rbee_home().join("models"))
        .join("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// `<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n`
const PROMPT: [u32; 15] = [1, 4093, 198, 19161, 253, 421, 30614, 563, 9356, 2, 198, 1, 520, 9531, 198];

/// Largest allowed |fast − candle| per (mean-centred) logit, relative to the
/// largest centred |logit|, and largest KL(candle ‖ fast) of the next-token
/// distributions. Measured on the demo model: up to 0.09 and 0.083 nats.
/// That is the noise of 8-bit activations, not a bias: candle itself is that
/// far from an f32 reference, and so is the fast path, in other directions
/// (see the last test); one rounding flip in either path moves the logits
/// by this much.
const REL_TOL: f32 = 0.12;
const KL_TOL: f64 = 0.15;

/// Two tokens whose logits differ by less than this are a near tie: either is
/// an acceptable top-1 (the quantization noise above is larger).
const TIE: f32 = 0.5;

fn open_demo() -> (gguf_file::Content, std::fs::File) {
    let path = demo_model();
    let mut file = std::fs::File::open(&path).unwrap_or_else(|e| {
        panic!("these tests need the demo model at {} ({e}): run scripts/fetch-demo-model.sh", path.display())
    });
    let ct = crate::gguf::read_header(&mut file).expect("demo model is a GGUF file");
    (ct, file)
}

/// The weights read on several threads are those read on one, byte for byte.
#[test]
fn weights_read_on_several_threads_are_those_read_on_one() {
    let (ct, file) = open_demo();
    let (one, three) = (super::load::load(&ct, &file, 1).expect("weights"), super::load::load(&ct, &file, 3).expect("weights"));
    fn matrices(w: &super::load::Weights) -> Vec<&super::matmul::Matrix> {
        let mut all = vec![&w.embd, w.output()];
        for l in &w.layers {
            all.extend([&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]);
        }
        all
    }
    let (a, b) = (matrices(&one), matrices(&three));
    assert_eq!(a.len(), 2 + 7 * one.cfg.n_layer);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!((x.t, x.rows, x.cols), (y.t, y.rows, y.cols), "matrix {i}");
        assert!(*x.data == *y.data, "matrix {i} differs");
    }
    assert_eq!(one.norm, three.norm);
}

fn fast(threads: usize) -> FastModel {
    let (ct, file) = open_demo();
    FastModel::load_with(&ct, &file, FastConfig { threads, pool: PoolKind::Spin }).expect("fast path loads the demo model")
}

fn candle() -> ModelWeights {
    let (ct, mut file) = open_demo();
    ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).expect("candle loads the demo model")
}

fn candle_logits(m: &mut ModelWeights, tokens: &[u32], pos: usize) -> Vec<f32> {
    let input = Tensor::new(tokens, &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("input");
    let out = m.forward(&input, pos).and_then(|l| l.squeeze(0)).expect("candle forward");
    out.to_vec1().expect("f32 logits")
}

/// The header of the GGUF at `path`, and the file.
fn open_gguf(path: &std::path::Path) -> (gguf_file::Content, std::fs::File) {
    let mut f = std::fs::File::open(path).expect("open");
    (gguf_file::Content::read(&mut f).expect("gguf"), f)
}

/// A GGUF of `meta` and `tensors` in a temporary file, deleted when the
/// returned path is dropped, also when a test panics (the demo-sized ones are
/// ~100 MB each).
pub(crate) fn temp_gguf(
    meta: Vec<(&str, &gguf_file::Value)>,
    tensors: &[(String, candle_core::quantized::QTensor)],
) -> tempfile::TempPath {
    let mut f = tempfile::Builder::new().prefix("rbee-test-").suffix(".gguf").tempfile().expect("temp file");
    let ts: Vec<(&str, &candle_core::quantized::QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(f.as_file_mut(), &meta, &ts).expect("write GGUF");
    f.into_temp_path()
}

/// candle's model of the file at `path`, picked by its architecture as the
/// worker picks it, as a function from (tokens, first position) to logits.
fn candle_of(path: &std::path::Path) -> impl FnMut(&[u32], usize) -> Vec<f32> {
    let (ct, mut f) = open_gguf(path);
    let mut m = crate::backend::CandleModel::load(ct, &mut f, &Device::Cpu).expect("candle loads it");
    move |tokens, pos| {
        let input = Tensor::new(tokens, &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("input");
        m.forward(&input, pos).and_then(|l| l.squeeze(0)).and_then(|l| l.to_vec1()).expect("candle forward")
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |b, (i, &x)| if x > v[b] { i } else { b })
}

/// (max |a − b|, max |b|) after subtracting each vector's mean: a shift of
/// all logits by one constant changes no probability, and the quantized paths
/// mostly differ from each other by such shifts.
fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let mean = |v: &[f32]| (v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64) as f32;
    let (ma, mb) = (mean(a), mean(b));
    let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max(((x - ma) - (y - mb)).abs()));
    (d, b.iter().fold(0f32, |m, y| m.max((y - mb).abs())))
}

/// KL(p ‖ q) of the softmax distributions of two logit vectors, in nats.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let logsm = |v: &[f32]| -> Vec<f64> {
        let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        v.iter().map(|&x| x as f64 - m - z).collect()
    };
    let (lp, lq) = (logsm(p), logsm(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

fn assert_close(what: &str, fast: &[f32], reference: &[f32], rel: f32) {
    let (d, scale) = diff(fast, reference);
    assert!(d <= rel * scale, "{what}: max |Δlogit| {d} exceeds {rel} × {scale}");
    let k = kl(reference, fast);
    assert!(k <= KL_TOL, "{what}: KL(reference ‖ fast) {k} exceeds {KL_TOL}");
}

/// The fast path's top-1 is the reference's, or a near tie in the reference.
fn assert_same_top1(what: &str, fast: &[f32], reference: &[f32]) {
    let (f, r) = (argmax(fast), argmax(reference));
    let gap = reference[r] - reference[f];
    assert!(f == r || gap < TIE, "{what}: top-1 {f} vs reference {r} (reference gap {gap})");
    if f != r {
        eprintln!("{what}: near tie, top-1 {f} vs {r} (gap {gap})");
    }
}

#[test]
fn prefill_and_decode_match_candle() {
    let mut reference = candle();
    let mut model = fast(2);
    let mut seq = model.new_sequence(128);
    let want = candle_logits(&mut reference, &PROMPT, 0);
    let got = model.forward(&mut seq, &PROMPT).expect("prefill");
    assert_close("prefill", &got, &want, REL_TOL);
    assert_same_top1("prefill", &got, &want);
    eprintln!("prefill: max |Δ| {:?}", diff(&got, &want));

    // Teacher forcing: both models get candle's greedy token each step.
    let mut next = argmax(&want) as u32;
    let mut worst = 0f32;
    for step in 0..20 {
        let pos = PROMPT.len() + step;
        let want = candle_logits(&mut reference, &[next], pos);
        let got = model.forward(&mut seq, &[next]).expect("decode");
        assert_close(&format!("decode step {step}"), &got, &want, REL_TOL);
        assert_same_top1(&format!("decode step {step}"), &got, &want);
        worst = worst.max(diff(&got, &want).0);
        next = argmax(&want) as u32;
    }
    assert_eq!(seq.len(), PROMPT.len() + 20);
    eprintln!("decode: worst max |Δ| {worst}");
}

#[test]
fn batched_decode_equals_one_sequence_at_a_time() {
    let mut model = fast(2);
    let prompts: [&[u32]; 4] = [&PROMPT, &PROMPT[..7], &[1, 4093, 198, 520], &PROMPT[3..]];
    let mut alone: Vec<Sequence> = prompts.iter().map(|_| model.new_sequence(64)).collect();
    let mut batched: Vec<Sequence> = prompts.iter().map(|_| model.new_sequence(64)).collect();
    let mut next: Vec<u32> = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let a = model.forward(&mut alone[i], p).expect("prefill alone");
        let b = model.forward(&mut batched[i], p).expect("prefill again");
        assert_eq!(a, b, "the same prefill twice gives the same logits");
        next.push(argmax(&a) as u32);
    }
    for step in 0..8 {
        let mut refs: Vec<&mut Sequence> = batched.iter_mut().collect();
        let got = model.forward_batch(&mut refs, &next).expect("batched step");
        for i in 0..4 {
            let want = model.forward(&mut alone[i], &[next[i]]).expect("alone step");
            assert_close(&format!("step {step} seq {i}"), &got[i], &want, 1e-4);
            assert_eq!(argmax(&got[i]), argmax(&want));
        }
        next = got.iter().map(|l| argmax(l) as u32).collect();
    }
    for (a, b) in alone.iter().zip(&batched) {
        assert_eq!(a.len(), b.len());
    }
}

#[test]
fn long_prompts_chunk_and_prefixes_reuse() {
    let mut model = fast(2);
    // 300 tokens (more than one step of MAX_ROWS) by cycling the prompt.
    let long: Vec<u32> = PROMPT.iter().cycle().take(300).copied().collect();
    let mut whole = model.new_sequence(400);
    let a = model.forward(&mut whole, &long).expect("whole prompt");
    let mut parts = model.new_sequence(400);
    model.forward(&mut parts, &long[..100]).expect("first part");
    let b = model.forward(&mut parts, &long[100..]).expect("second part");
    assert_close("chunked prefill", &b, &a, 1e-4);
    // Truncating back to 100 tokens and replaying the rest gives the same.
    parts.truncate(100);
    let c = model.forward(&mut parts, &long[100..]).expect("replay");
    assert_eq!(b, c);
    assert!(model.forward(&mut parts, &[0; 101]).is_err(), "the sequence's max_len is enforced");
    assert!(model.forward(&mut parts, &[u32::MAX]).is_err(), "tokens outside the vocabulary are refused");
}

#[test]
fn thread_counts_and_pools_agree() {
    let mut one = fast(1);
    let mut s1 = one.new_sequence(32);
    let want = one.forward(&mut s1, &PROMPT).expect("one thread");
    for (threads, pool) in [(2, PoolKind::Spin), (3, PoolKind::Spin), (2, PoolKind::Rayon)] {
        let mut m = one.share(FastConfig { threads, pool }).expect("share");
        let mut s = m.new_sequence(32);
        let got = m.forward(&mut s, &PROMPT).expect("forward");
        // Each output element is computed by exactly one thread, the same way.
        assert_eq!(got, want, "{threads} threads on {pool:?}");
    }
}

/// The forward pass (llama, qwen2, qwen3, phi3, gemma2, gemma3) in plain f32 over dequantized weights, all
/// positions at once: `logits[i]` follows `tokens[..=i]`. The "exact" answer
/// both quantized-activation paths approximate.
fn reference_logits(w: &super::load::Weights, tokens: &[u32]) -> Vec<Vec<f32>> {
    use super::matmul::Matrix;
    let c = &w.cfg;
    let n = tokens.len();
    let mm = |m: &Matrix, xs: &[Vec<f32>]| -> Vec<Vec<f32>> {
        let mut out = vec![vec![0f32; m.rows]; xs.len()];
        let mut row = vec![0f32; m.cols];
        for r in 0..m.rows {
            m.dequantize_row(r, &mut row);
            for (o, x) in out.iter_mut().zip(xs) {
                o[r] = row.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32;
            }
        }
        out
    };
    let norm = |xs: &[Vec<f32>], g: &[f32]| -> Vec<Vec<f32>> {
        xs.iter()
            .map(|x| {
                let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64;
                let inv = 1.0 / (ms + c.eps as f64).sqrt();
                x.iter().zip(g).map(|(v, g)| (*v as f64 * inv) as f32 * g).collect()
            })
            .collect()
    };
    let hd = c.head_dim;
    // Sliding-window layers: their own base and scaling, no factors.
    let rope = |v: &mut Vec<f32>, pos: usize, windowed: bool| {
        for head in v.chunks_mut(hd) {
            for j in 0..hd / 2 {
                let (base, factor, scale) = match (windowed, &c.swa) {
                    (true, Some(swa)) => (swa.rope_base, 1.0, swa.rope_scale),
                    _ => (c.rope_base, w.rope_factors.as_ref().map_or(1.0, |f| f[j]), c.rope_scale),
                };
                let a = pos as f32 * scale * (1f32 / base.powf((2 * j) as f32 / hd as f32) / factor);
                let (s, co) = a.sin_cos();
                // The pair: interleaved (llama) or the head's two halves (NeoX).
                let (i0, i1) = if c.arch.neox_rope() { (j, j + hd / 2) } else { (2 * j, 2 * j + 1) };
                let (x0, x1) = (head[i0], head[i1]);
                head[i0] = x0 * co - x1 * s;
                head[i1] = x0 * s + x1 * co;
            }
        }
    };
    let mut x: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| {
            let mut e = vec![0f32; c.dim];
            w.embd.dequantize_row(t as usize, &mut e);
            e.iter_mut().for_each(|v| *v *= c.embd_scale);
            e
        })
        .collect();
    for (li, l) in w.layers.iter().enumerate() {
        let windowed = c.swa.as_ref().is_some_and(|swa| swa.layers[li]);
        let window = c.swa.as_ref().filter(|_| windowed).map_or(usize::MAX, |swa| swa.window);
        let xn = norm(&x, &l.attn_norm);
        let (mut q, mut k, mut v) = (mm(&l.wq, &xn), mm(&l.wk, &xn), mm(&l.wv, &xn));
        if let Some([bq, bk, bv]) = &l.qkv_bias {
            for (xs, b) in [(&mut q, bq), (&mut k, bk), (&mut v, bv)] {
                xs.iter_mut().for_each(|x| x.iter_mut().zip(b.iter()).for_each(|(a, b)| *a += b));
            }
        }
        if let Some([nq, nk]) = &l.qk_norm {
            for (xs, g) in [(&mut q, nq), (&mut k, nk)] {
                for x in xs.iter_mut() {
                    let heads: Vec<Vec<f32>> = x.chunks(hd).map(|h| h.to_vec()).collect();
                    *x = norm(&heads, g).concat();
                }
            }
        }
        for i in 0..n {
            rope(&mut q[i], i, windowed);
            rope(&mut k[i], i, windowed);
        }
        let mut att = vec![vec![0f32; c.q_dim()]; n];
        for i in 0..n {
            for h in 0..c.n_head {
                let g = h / c.group();
                let qh = &q[i][h * hd..(h + 1) * hd];
                // Keys `i - window + 1 ..= i` (all of them without a window).
                let seen = (i + 1).saturating_sub(window)..=i;
                let s: Vec<f64> = seen
                    .clone()
                    .map(|j| {
                        let kj = &k[j][g * hd..(g + 1) * hd];
                        let s = qh.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * c.attn_scale as f64;
                        c.attn_softcap.map_or(s, |cap| cap as f64 * (s / cap as f64).tanh())
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    att[i][h * hd + d] =
                        seen.clone().zip(&e).map(|(j, e)| e / sum * v[j][g * hd + d] as f64).sum::<f64>() as f32;
                }
            }
        }
        let mut o = mm(&l.wo, &att);
        if let Some([post, _]) = &l.post_norm {
            o = norm(&o, post);
        }
        x.iter_mut().zip(&o).for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(p, q)| *p += q));
        let xn = norm(&x, &l.ffn_norm);
        let (g, u) = (mm(&l.gate, &xn), mm(&l.up, &xn));
        let hsw: Vec<Vec<f32>> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g.iter().zip(u).map(|(a, b)| (c.act.reference(*a as f64) * *b as f64) as f32).collect())
            .collect();
        let mut d = mm(&l.down, &hsw);
        if let Some([_, post]) = &l.post_norm {
            d = norm(&d, post);
        }
        x.iter_mut().zip(&d).for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(p, q)| *p += q));
    }
    let mut logits = mm(w.output(), &norm(&x, &w.norm));
    if let Some(cap) = c.logit_softcap {
        logits.iter_mut().flatten().for_each(|v| *v = cap * (*v / cap).tanh());
    }
    logits
}

#[test]
fn fast_and_candle_are_equally_close_to_an_f32_reference() {
    let (ct, file) = open_demo();
    let weights = super::load::load(&ct, &file, 2).expect("weights");
    let mut reference = candle();
    let mut model = fast(2);
    // The prompt then 20 greedy tokens (candle's), all scored at once by the reference.
    let mut tokens = PROMPT.to_vec();
    let mut cand = vec![candle_logits(&mut reference, &PROMPT, 0)];
    for _ in 0..20 {
        let next = argmax(cand.last().expect("logits")) as u32;
        tokens.push(next);
        cand.push(candle_logits(&mut reference, &[next], tokens.len() - 1));
    }
    tokens.pop();
    cand.pop();
    let exact = reference_logits(&weights, &tokens);
    let mut seq = model.new_sequence(64);
    let mut fst = vec![model.forward(&mut seq, &PROMPT).expect("prefill")];
    for &t in &tokens[PROMPT.len()..] {
        fst.push(model.forward(&mut seq, &[t]).expect("decode"));
    }
    let (mut fast_kl, mut candle_kl) = (0f64, 0f64);
    for (i, (f, c)) in fst.iter().zip(&cand).enumerate() {
        let e = &exact[PROMPT.len() - 1 + i];
        let (fk, ck) = (kl(e, f), kl(e, c));
        assert!(fk <= 0.05, "position {i}: KL(f32 ‖ fast) {fk} (candle's: {ck})");
        assert_same_top1(&format!("position {i} vs f32"), f, e);
        fast_kl += fk;
        candle_kl += ck;
        eprintln!(
            "position {i}: KL(f32 ‖ fast) {fk:.5}, KL(f32 ‖ candle) {ck:.5}, centred max |Δ| fast {:.3} candle {:.3}",
            diff(f, e).0,
            diff(c, e).0
        );
    }
    // On average the fast path is about as far from exact as candle is
    // (measured: 0.0056 vs 0.0054 nats).
    fast_kl /= fst.len() as f64;
    candle_kl /= fst.len() as f64;
    assert!(fast_kl <= 2.0 * candle_kl + 0.002, "mean KL(f32 ‖ ·): fast {fast_kl} vs candle {candle_kl}");
}

/// A file with `rope_freqs.weight` (Llama 3.1+ RoPE scaling) runs with its
/// factors: the fast path follows the f32 reference that divides each pair's
/// frequency by them, and that reference is far from the one without.
#[test]
fn rope_frequency_factors_are_applied() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let (ct, mut file) = open_demo();
    let pairs = ct.metadata["llama.rope.dimension_count"].to_u32().expect("rope dims") as usize / 2;
    // Steeper than Llama 3's (1 for fast pairs, up to 32 for slow ones), so
    // that a 15-token prompt feels them.
    let factors: Vec<f32> = (0..pairs).map(|j| 1.0 + j as f32).collect();
    let mut tensors: Vec<(String, QTensor)> = ct
        .tensor_infos
        .keys()
        .map(|name| (name.clone(), ct.tensor(&mut file, name, &Device::Cpu).expect("tensor")))
        .collect();
    let t = Tensor::new(factors.as_slice(), &Device::Cpu).expect("factors");
    tensors.push((super::load::ROPE_FACTORS.to_owned(), QTensor::quantize(&t, GgmlDType::F32).expect("f32")));
    let path = temp_gguf(ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect(), &tensors);
    let (ct, f) = open_gguf(&path);

    let weights = super::load::load(&ct, &f, 2).expect("weights");
    assert_eq!(weights.rope_factors.as_deref(), Some(factors.as_slice()));
    let scaled = reference_logits(&weights, &PROMPT);
    let mut plain = weights;
    plain.rope_factors = None;
    let unscaled = reference_logits(&plain, &PROMPT);
    let mut model = FastModel::load_with(&ct, &f, FastConfig { threads: 2, pool: PoolKind::Spin }).expect("fast");
    let mut seq = model.new_sequence(64);
    let got = model.forward(&mut seq, &PROMPT).expect("prefill");
    let (with, without) = (kl(&scaled[PROMPT.len() - 1], &got), kl(&unscaled[PROMPT.len() - 1], &got));
    eprintln!("KL to the reference with the factors {with:.5}, without {without:.5}");
    assert!(with <= 0.05, "KL(f32 with factors ‖ fast) {with}");
    assert!(without >= 20.0 * with.max(0.005), "the factors changed too little to test: {without} vs {with}");
    assert_same_top1("with rope factors", &got, &scaled[PROMPT.len() - 1]);
}

#[test]
fn long_context_decode_split_over_threads_matches_one_thread() {
    // 700 cached tokens: with 2 threads each (kv head) task of a decode
    // step is split in two key ranges and merged; 1 thread never splits.
    // The merge is exact up to float rounding (see the attention tests), but
    // a last-bit difference can flip one 8-bit activation rounding, so the
    // logits agree to the quantization noise, like fast vs candle.
    let long: Vec<u32> = PROMPT.iter().cycle().take(700).copied().collect();
    let mut one = fast(1);
    let mut two = one.share(FastConfig { threads: 2, pool: PoolKind::Spin }).expect("share");
    let (mut s1, mut s2) = (one.new_sequence(720), two.new_sequence(720));
    one.forward(&mut s1, &long).expect("prefill 1");
    two.forward(&mut s2, &long).expect("prefill 2");
    for t in [17u32, 4093, 198] {
        let a = one.forward(&mut s1, &[t]).expect("decode 1");
        let b = two.forward(&mut s2, &[t]).expect("decode 2");
        assert_close("split decode", &b, &a, REL_TOL);
        assert_same_top1("split decode", &b, &a);
    }
}

/// The demo model with every `ffn_down` (the only matrices whose rows are a
/// multiple of 256) re-quantized by candle to `kinds[layer % kinds.len()]`,
/// written to a temporary GGUF.
fn requantized_demo(kinds: &[candle_core::quantized::GgmlDType]) -> tempfile::TempPath {
    use candle_core::quantized::QTensor;
    let (ct, mut file) = open_demo();
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in names {
        let t = ct.tensor(&mut file, name, &Device::Cpu).expect("tensor");
        let t = match name.strip_prefix("blk.").and_then(|r| r.strip_suffix(".ffn_down.weight")) {
            Some(layer) => {
                let kind = kinds[layer.parse::<usize>().expect("layer") % kinds.len()];
                QTensor::quantize(&t.dequantize(&Device::Cpu).expect("dequantize"), kind).expect("quantize")
            }
            None => t,
        };
        tensors.push((name.clone(), t));
    }
    temp_gguf(ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect(), &tensors)
}

#[test]
fn k_quant_weights_match_candle() {
    use candle_core::quantized::GgmlDType;
    requantized_matches_candle(&[GgmlDType::Q6K, GgmlDType::Q4K], "k-quant");
}

/// Q5_K, Q5_0 and Q5_1 (the fast path holds their values one per byte).
#[test]
fn five_bit_weights_match_candle() {
    use candle_core::quantized::GgmlDType;
    requantized_matches_candle(&[GgmlDType::Q5K, GgmlDType::Q5_0, GgmlDType::Q5_1], "5-bit");
}

/// The fast path on [`requantized_demo`] against candle on the same file:
/// a prompt and five greedy steps, logits within [`REL_TOL`], same top token.
fn requantized_matches_candle(kinds: &[candle_core::quantized::GgmlDType], tag: &str) {
    let path = requantized_demo(kinds);
    let load = || {
        let mut f = std::fs::File::open(&path).expect("open");
        (gguf_file::Content::read(&mut f).expect("gguf"), f)
    };
    let (ct, mut f) = load();
    let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).expect("candle");
    let (ct, f) = load();
    let mut model = FastModel::load_with(&ct, &f, FastConfig { threads: 2, pool: PoolKind::Spin }).expect("fast");
    let mut seq = model.new_sequence(64);
    let want = candle_logits(&mut reference, &PROMPT, 0);
    let got = model.forward(&mut seq, &PROMPT).expect("prefill");
    assert_close(&format!("{tag} prefill"), &got, &want, REL_TOL);
    assert_same_top1(&format!("{tag} prefill"), &got, &want);
    let mut next = argmax(&want) as u32;
    for step in 0..5 {
        let want = candle_logits(&mut reference, &[next], PROMPT.len() + step);
        let got = model.forward(&mut seq, &[next]).expect("decode");
        assert_close(&format!("{tag} step {step}"), &got, &want, REL_TOL);
        assert_same_top1(&format!("{tag} step {step}"), &got, &want);
        eprintln!("{tag} step {step}: KL {:.5}, centred max |Δ| {:?}", kl(&want, &got), diff(&got, &want));
        next = argmax(&want) as u32;
    }
}

/// The demo model's weights written as a `qwen2`, `qwen3`, `phi3` or `gemma3`
/// file: its metadata under the new architecture's keys, plus the tensors the
/// family adds (Qwen 2's projection biases, Qwen 3's and Gemma 3's per-head
/// norms, Gemma 3's post-norms), filled with fixed pseudo-random values, or
/// (Phi 3) its projections fused as Phi 3 stores them, in Q8_0, and an output
/// head of its own; Gemma 3's with an 8-key sliding window. Not a model that
/// says anything sensible, but every number the family's extra steps see is
/// a real one.
pub(crate) fn demo_as(arch: &str) -> tempfile::TempPath {
    use candle_core::quantized::{GgmlDType, QTensor};
    let (ct, mut file) = open_demo();
    let mut meta: Vec<(String, gguf_file::Value)> = ct
        .metadata
        .iter()
        .map(|(k, v)| match k.strip_prefix("llama.") {
            Some(rest) => (format!("{arch}.{rest}"), v.clone()),
            None => (k.clone(), v.clone()),
        })
        .collect();
    meta.retain(|(k, _)| k != "general.architecture");
    meta.push(("general.architecture".into(), gguf_file::Value::String(arch.into())));
    let hd = (ct.metadata["llama.embedding_length"].to_u32().expect("dim")
        / ct.metadata["llama.attention.head_count"].to_u32().expect("heads")) as usize;
    if arch == "phi3" {
        // candle's phi3 uses 10,000 whatever the file says (as Phi 3's files say).
        meta.retain(|(k, _)| k != "phi3.rope.freq_base");
        meta.push(("phi3.rope.freq_base".into(), gguf_file::Value::F32(10_000.0)));
    }
    if arch == "qwen3" {
        meta.push(("qwen3.attention.key_length".into(), gguf_file::Value::U32(hd as u32)));
        // candle's qwen3 computes in f16 unless told f32.
        meta.push(("general.dtype".into(), gguf_file::Value::U32(0)));
    }
    if arch == "gemma3" {
        // A window shorter than the tests' prompts, and scaled RoPE on the
        // full-attention layers (every sixth).
        meta.extend([
            ("gemma3.attention.key_length".into(), gguf_file::Value::U32(hd as u32)),
            ("gemma3.attention.value_length".into(), gguf_file::Value::U32(hd as u32)),
            ("gemma3.attention.sliding_window".into(), gguf_file::Value::U32(8)),
            ("gemma3.rope.scaling.type".into(), gguf_file::Value::String("linear".into())),
            ("gemma3.rope.scaling.factor".into(), gguf_file::Value::F32(4.0)),
        ]);
    }
    let mut tensors: Vec<(String, QTensor)> = ct
        .tensor_infos
        .keys()
        .map(|name| (name.clone(), ct.tensor(&mut file, name, &Device::Cpu).expect("tensor")))
        .collect();
    let mut seed = 0x9e37_79b9u32;
    let mut noise = |len: usize, centre: f32, spread: f32| -> QTensor {
        let v: Vec<f32> = (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                centre + spread * ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
            })
            .collect();
        QTensor::quantize(&Tensor::new(v.as_slice(), &Device::Cpu).expect("tensor"), GgmlDType::F32).expect("f32")
    };
    let layers = ct.metadata["llama.block_count"].to_u32().expect("layers");
    if arch == "phi3" {
        let mut take = |name: String| -> Tensor {
            let at = tensors.iter().position(|(n, _)| *n == name).expect("tensor");
            tensors.remove(at).1.dequantize(&Device::Cpu).expect("dequantize")
        };
        let mut fused = Vec::new();
        for i in 0..layers {
            let p = format!("blk.{i}");
            let qkv = [take(format!("{p}.attn_q.weight")), take(format!("{p}.attn_k.weight")), take(format!("{p}.attn_v.weight"))];
            let up = [take(format!("{p}.ffn_gate.weight")), take(format!("{p}.ffn_up.weight"))];
            fused.push((format!("{p}.attn_qkv.weight"), Tensor::cat(&qkv, 0).expect("cat")));
            fused.push((format!("{p}.ffn_up.weight"), Tensor::cat(&up, 0).expect("cat")));
        }
        let embd = ct.tensor(&mut file, "token_embd.weight", &Device::Cpu).expect("embd");
        fused.push(("output.weight".into(), embd.dequantize(&Device::Cpu).expect("dequantize")));
        for (name, t) in fused {
            tensors.push((name, QTensor::quantize(&t, GgmlDType::Q8_0).expect("Q8_0")));
        }
    }
    for i in (0..layers).filter(|_| arch != "phi3") {
        let width = |n: &str| ct.tensor_infos[&format!("blk.{i}.attn_{n}.weight")].shape.dims()[0];
        match arch {
            "qwen2" => {
                for n in ["q", "k", "v"] {
                    tensors.push((format!("blk.{i}.attn_{n}.bias"), noise(width(n), 0.0, 1.0)));
                }
            }
            _ => {
                for n in ["q", "k"] {
                    tensors.push((format!("blk.{i}.attn_{n}_norm.weight"), noise(hd, 1.0, 0.5)));
                }
            }
        }
        if arch == "gemma3" {
            let dim = ct.tensor_infos["token_embd.weight"].shape.dims()[1];
            for n in ["post_attention_norm", "post_ffw_norm"] {
                tensors.push((format!("blk.{i}.{n}.weight"), noise(dim, 1.0, 0.5)));
            }
        }
    }
    temp_gguf(meta.iter().map(|(k, v)| (k.as_str(), v)).collect(), &tensors)
}

/// Qwen 2, Qwen 3 and Phi 3 (biases, per-head norms, fused projections,
/// NeoX RoPE) on the fast path against candle's model of the same
/// architecture on the same file and against the f32 reference: a prompt,
/// then five greedy steps.
#[test]
fn qwen2_qwen3_and_phi3_match_candle_and_the_f32_reference() {
    for arch in ["qwen2", "qwen3", "phi3"] {
        let path = demo_as(arch);
        let mut reference = candle_of(&path);
        let (ct, f) = open_gguf(&path);
        let weights = super::load::load(&ct, &f, 2).expect("weights");
        assert_eq!(weights.cfg.arch.key(), arch);
        let mut model = FastModel::load_with(&ct, &f, FastConfig { threads: 2, pool: PoolKind::Spin }).expect("fast");
        let mut seq = model.new_sequence(64);
        let mut tokens = PROMPT.to_vec();
        let want = reference(&PROMPT, 0);
        let got = model.forward(&mut seq, &PROMPT).expect("prefill");
        let mut steps = vec![(want, got)];
        for step in 0..5 {
            let next = argmax(&steps.last().expect("step").0) as u32;
            tokens.push(next);
            let want = reference(&[next], PROMPT.len() + step);
            let got = model.forward(&mut seq, &[next]).expect("decode");
            steps.push((want, got));
        }
        let exact = reference_logits(&weights, &tokens);
        for (i, (want, got)) in steps.iter().enumerate() {
            let what = format!("{arch} position {}", PROMPT.len() - 1 + i);
            let e = &exact[PROMPT.len() - 1 + i];
            eprintln!("{what}: KL(candle ‖ fast) {:.5}, KL(f32 ‖ fast) {:.5}", kl(want, got), kl(e, got));
            assert_close(&format!("{what} vs candle"), got, want, REL_TOL);
            assert_same_top1(&format!("{what} vs candle"), got, want);
            assert!(kl(e, got) <= 0.05, "{what}: KL(f32 ‖ fast) {}", kl(e, got));
        }
    }
}

/// The shape of a made-up model for [`random_model`].
struct Shape {
    arch: &'static str,
    dim: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// A two-layer model of `shape` with random Q8_0 weights (f32 norms and
/// biases), written to a temporary GGUF: for the head shapes and groups the
/// demo model does not have. A `gemma2` or `gemma3` one has a sliding window
/// of `window` keys on its first layer (not its second), RoPE scaled
/// linearly by 4 (Gemma 3: on the second only), logits soft-capped at 30,
/// and (Gemma 2) attention scores at 5.
fn random_model(shape: &Shape, window: usize) -> tempfile::TempPath {
    random_model_with(shape, window, 512, Vec::new())
}

/// [`random_model`] with `vocab` tokens and the metadata `more` besides
/// (e.g. a tokenizer, for llama.cpp to run it).
fn random_model_with(
    shape: &Shape,
    window: usize,
    vocab: usize,
    more: Vec<(String, gguf_file::Value)>,
) -> tempfile::TempPath {
    use candle_core::quantized::{GgmlDType, QTensor};
    use gguf_file::Value;
    let Shape { arch, dim, heads, kv_heads, head_dim } = *shape;
    let (ffn, layers, qd, kvd) = (512usize, 2u32, heads * head_dim, kv_heads * head_dim);
    let mut seed = 0x2545_f491u32 ^ (dim * 31 + heads * 7 + head_dim) as u32;
    let mut draw = |n: usize, centre: f32, spread: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                centre + spread * (seed as f32 / u32::MAX as f32 - 0.5)
            })
            .collect()
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put = |name: String, dims: &[usize], v: Vec<f32>, q: GgmlDType| {
        let t = Tensor::new(v.as_slice(), &Device::Cpu).and_then(|t| t.reshape(dims)).expect("tensor");
        tensors.push((name, QTensor::quantize(&t, q).expect("quantize")));
    };
    let m = |_rows: usize, cols: usize| 2.0 * (3.0 / cols as f32).sqrt();
    // Gemma multiplies embeddings by √dim: its are that much smaller, or the
    // blocks' normed outputs would be small beside them.
    let gemma = arch.starts_with("gemma");
    let embd_spread = if gemma { 2.0 / (dim as f32).sqrt() } else { 2.0 };
    put("token_embd.weight".into(), &[vocab, dim], draw(vocab * dim, 0.0, embd_spread), GgmlDType::Q8_0);
    // Gemma 2's output head is its (small) embedding: a louder final norm
    // gives its logits the spread of the other models'.
    let out_gain = if arch == "gemma2" { 8.0 } else { 1.0 };
    put("output_norm.weight".into(), &[dim], draw(dim, out_gain, 0.2 * out_gain), GgmlDType::F32);
    let output = draw(vocab * dim, 0.0, 4.0 * m(vocab, dim));
    // Gemma 2's output is the embedding, always (llama.cpp refuses a file
    // with an output.weight of its own).
    if arch != "gemma2" {
        put("output.weight".into(), &[vocab, dim], output, GgmlDType::Q8_0);
    }
    for i in 0..layers {
        let p = format!("blk.{i}");
        // Queries and keys 3× an even spread, so attention is sharp and its
        // details (RoPE, norms, which head sees which keys) show in the logits.
        let [q, k, v] = [(qd, 3.0), (kvd, 3.0), (kvd, 1.0)].map(|(rows, gain)| draw(rows * dim, 0.0, gain * m(rows, dim)));
        let [gate, up] = [0, 1].map(|_| draw(ffn * dim, 0.0, m(ffn, dim)));
        if arch == "phi3" {
            // Phi 3 keeps them fused: query, key, value rows; gate, up rows.
            put(format!("{p}.attn_qkv.weight"), &[qd + 2 * kvd, dim], [q, k, v].concat(), GgmlDType::Q8_0);
            put(format!("{p}.ffn_up.weight"), &[2 * ffn, dim], [gate, up].concat(), GgmlDType::Q8_0);
        } else {
            for (n, rows, w) in [("attn_q", qd, q), ("attn_k", kvd, k), ("attn_v", kvd, v)] {
                put(format!("{p}.{n}.weight"), &[rows, dim], w, GgmlDType::Q8_0);
            }
            put(format!("{p}.ffn_gate.weight"), &[ffn, dim], gate, GgmlDType::Q8_0);
            put(format!("{p}.ffn_up.weight"), &[ffn, dim], up, GgmlDType::Q8_0);
        }
        put(format!("{p}.attn_output.weight"), &[dim, qd], draw(dim * qd, 0.0, m(dim, qd)), GgmlDType::Q8_0);
        put(format!("{p}.ffn_down.weight"), &[dim, ffn], draw(dim * ffn, 0.0, m(dim, ffn)), GgmlDType::Q8_0);
        put(format!("{p}.attn_norm.weight"), &[dim], draw(dim, 1.0, 0.2), GgmlDType::F32);
        put(format!("{p}.ffn_norm.weight"), &[dim], draw(dim, 1.0, 0.2), GgmlDType::F32);
        if arch == "qwen2" {
            for (n, len) in [("attn_q", qd), ("attn_k", kvd), ("attn_v", kvd)] {
                put(format!("{p}.{n}.bias"), &[len], draw(len, 0.0, 1.0), GgmlDType::F32);
            }
        }
        if arch == "qwen3" || arch == "gemma3" {
            for n in ["attn_q_norm", "attn_k_norm"] {
                put(format!("{p}.{n}.weight"), &[head_dim], draw(head_dim, 1.0, 1.5), GgmlDType::F32);
            }
        }
        if gemma {
            // Gemma 2's output head is its embedding: blocks 3× louder than
            // Gemma 3's keep the last token's own embedding from winning.
            let gain = if arch == "gemma2" { 3.0 } else { 1.0 };
            for n in ["post_attention_norm", "post_ffw_norm"] {
                put(format!("{p}.{n}.weight"), &[dim], draw(dim, gain, 0.2 * gain), GgmlDType::F32);
            }
        }
    }
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.dtype".into(), Value::U32(0)),
        (key("block_count"), Value::U32(layers)),
        (key("embedding_length"), Value::U32(dim as u32)),
        (key("feed_forward_length"), Value::U32(ffn as u32)),
        (key("attention.head_count"), Value::U32(heads as u32)),
        (key("attention.head_count_kv"), Value::U32(kv_heads as u32)),
        (key("attention.key_length"), Value::U32(head_dim as u32)),
        (key("attention.value_length"), Value::U32(head_dim as u32)),
        (key("rope.dimension_count"), Value::U32(head_dim as u32)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (key("rope.freq_base"), Value::F32(10_000.0)),
        (key("context_length"), Value::U32(4096)),
    ];
    if gemma {
        meta.extend([
            (key("attention.sliding_window"), Value::U32(window as u32)),
            (key("attention.sliding_window_pattern"), Value::Array(vec![Value::Bool(true), Value::Bool(false)])),
            (key("rope.scaling.type"), Value::String("linear".into())),
            (key("rope.scaling.factor"), Value::F32(4.0)),
            (key("final_logit_softcapping"), Value::F32(30.0)),
        ]);
    }
    match arch {
        // Gemma 3's windowed layers have a RoPE of their own; Gemma 2's are
        // the global layers' (scaled by 4 here too).
        "gemma3" => meta.push((key("rope.freq_base_swa"), Value::F32(1_000.0))),
        // Gemma 2's files say 50; lower, so that random scores feel it.
        "gemma2" => meta.push((key("attn_logit_softcapping"), Value::F32(5.0))),
        _ => {}
    }
    meta.extend(more);
    temp_gguf(meta.iter().map(|(k, v)| (k.as_str(), v)).collect(), &tensors)
}

/// The head shapes real models have and the demo does not (its group is 3,
/// its heads 64 wide): MHA with 128-wide heads (Llama 2), groups of 7 (Qwen
/// 2.5 0.5B) and 8 (TinyLlama), heads wider than `dim / heads` (Qwen 3),
/// fused projections with 96-wide heads (Phi 3 mini), and llama heads
/// wider than `dim / heads` (Mistral Nemo), and Gemma 3 1B's (one kv head
/// for four 256-wide query heads, wider than `dim / heads`) and Gemma 2's
/// (256-wide heads, soft-capped scores). The fast path against candle on the
/// same random file, a prompt and three steps, and against the f32 reference
/// (only that for the last three: candle's llama takes the head width to be
/// `dim / heads`, candle's gemma3 gates with SiLU, candle has no Gemma 2).
#[test]
fn other_head_shapes_match_candle() {
    let f32_only = [
        ("nemo-heads", Shape { arch: "llama", dim: 320, heads: 4, kv_heads: 2, head_dim: 128 }),
        ("gemma3-256", Shape { arch: "gemma3", dim: 384, heads: 4, kv_heads: 1, head_dim: 256 }),
        ("gemma2-256", Shape { arch: "gemma2", dim: 256, heads: 4, kv_heads: 2, head_dim: 256 }),
    ];
    let shapes = [
        ("mha-128", Shape { arch: "llama", dim: 512, heads: 4, kv_heads: 4, head_dim: 128 }),
        ("group-8", Shape { arch: "llama", dim: 512, heads: 8, kv_heads: 1, head_dim: 64 }),
        ("group-7", Shape { arch: "qwen2", dim: 896, heads: 14, kv_heads: 2, head_dim: 64 }),
        ("wide-heads", Shape { arch: "qwen3", dim: 256, heads: 4, kv_heads: 2, head_dim: 128 }),
        ("phi3-96", Shape { arch: "phi3", dim: 384, heads: 4, kv_heads: 4, head_dim: 96 }),
    ];
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 512).collect();
    for (tag, shape) in shapes.iter().chain(&f32_only) {
        let path = random_model(shape, 24);
        let mut reference = match f32_only.iter().any(|(t, _)| t == tag) {
            true => Box::new(|_: &[u32], _: usize| Vec::new()) as Box<dyn FnMut(&[u32], usize) -> Vec<f32>>,
            false => Box::new(candle_of(&path)),
        };
        let (ct, f) = open_gguf(&path);
        let weights = super::load::load(&ct, &f, 2).expect("weights");
        let mut model = FastModel::load_with(&ct, &f, FastConfig { threads: 2, pool: PoolKind::Spin }).expect("fast");
        let mut seq = model.new_sequence(64);
        let (prompt, steps) = tokens.split_at(37);
        let mut pairs = vec![(reference(prompt, 0), model.forward(&mut seq, prompt).expect("prefill"))];
        for (i, &t) in steps.iter().enumerate() {
            pairs.push((reference(&[t], prompt.len() + i), model.forward(&mut seq, &[t]).expect("decode")));
        }
        let exact = reference_logits(&weights, &tokens);
        // Against the f32 reference at every position, each run as a prompt of
        // its own (so every prompt length from 1 to 40). Random weights with
        // sharp attention leave the odd position sensitive to rounding (KL
        // 0.26 at one of Nemo's 40 positions, 0.06 at one of Llama 2's), so
        // the bound is on the mean, with a cap on each.
        let prompted: Vec<Vec<f32>> = (0..tokens.len())
            .map(|p| model.forward(&mut model.new_sequence(64), &tokens[..=p]).expect("prompt"))
            .collect();
        let kls: Vec<f64> = prompted.iter().zip(&exact).map(|(got, e)| kl(e, got)).collect();
        let mean = kls.iter().sum::<f64>() / kls.len() as f64;
        let worst = kls.iter().cloned().fold(0.0, f64::max);
        eprintln!("{tag}: KL(f32 ‖ fast) over 40 prompt lengths: mean {mean:.5}, worst {worst:.5}");
        assert!(mean <= 0.02 && worst <= 0.3, "{tag}: KL(f32 ‖ fast) mean {mean}, worst {worst}");
        for (i, (want, got)) in pairs.iter().enumerate() {
            let what = format!("{tag} position {}", prompt.len() - 1 + i);
            // A step after the prompt computes what the longer prompt does, up
            // to the float order of the two attention paths.
            let same = kl(&prompted[prompt.len() - 1 + i], got);
            assert!(same < 0.01, "{what}: decoding vs prompting, KL {same}");
            if !want.is_empty() {
                eprintln!("{what}: KL(candle ‖ fast) {:.5}", kl(want, got));
                assert_close(&format!("{what} vs candle"), got, want, REL_TOL);
            }
        }
    }
}

/// Gemma 3's metadata is read as llama.cpp reads it, and its sliding window
/// and scaled RoPE are applied: the f32 reference without either is far from
/// the fast path where the reference with them is close. Then over a context
/// longer than a 600-key window, where a decoding row's window is split
/// between threads.
#[test]
fn gemma3_windows_and_rope_scaling_are_applied() {
    use super::load::{Act, Swa};
    let shape = Shape { arch: "gemma3", dim: 256, heads: 4, kv_heads: 1, head_dim: 256 };
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 512).collect();
    let path = random_model(&shape, 16);
    let (ct, f) = open_gguf(&path);
    let mut weights = super::load::load(&ct, &f, 2).expect("weights");
    let swa = Swa { window: 16, rope_base: 1_000.0, rope_scale: 1.0, layers: vec![true, false] };
    assert_eq!(weights.cfg.swa.as_ref(), Some(&swa));
    assert_eq!((weights.cfg.rope_scale, weights.cfg.act, weights.cfg.embd_scale), (0.25, Act::GeluTanh, 16.0));
    assert_eq!(weights.cfg.attn_scale, 1.0 / 16.0);
    let mut model = FastModel::load_with(&ct, &f, FastConfig { threads: 2, pool: PoolKind::Spin }).expect("fast");
    let mut seq = model.new_sequence(64);
    let mut got = vec![model.forward(&mut seq, &tokens[..30]).expect("prefill")];
    for &t in &tokens[30..] {
        got.push(model.forward(&mut seq, &[t]).expect("decode"));
    }
    let exact = reference_logits(&weights, &tokens);
    weights.cfg.swa = None;
    let unwindowed = reference_logits(&weights, &tokens);
    weights.cfg.swa = Some(swa);
    weights.cfg.rope_scale = 1.0;
    let unscaled = reference_logits(&weights, &tokens);
    for (i, got) in got.iter().enumerate() {
        let p = 29 + i;
        let (with, no_window, no_scale) = (kl(&exact[p], got), kl(&unwindowed[p], got), kl(&unscaled[p], got));
        eprintln!("position {p}: KL to the reference {with:.5}, without the window {no_window:.5}, unscaled {no_scale:.5}");
        assert!(with <= 0.05, "position {p}: KL(f32 ‖ fast) {with}");
        assert!(no_window >= 10.0 * with.max(0.001), "position {p}: the window changed too little: {no_window} vs {with}");
        assert!(no_scale >= 10.0 * with.max(0.001), "position {p}: the scaling changed too little: {no_scale} vs {with}");
    }

    // 700 tokens of prompt (three steps of rows), then one decoding step whose
    // windowed layer sees keys 101..701, split in two ranges on two threads.
    let path = random_model(&shape, 600);
    let (ct, f) = open_gguf(&path);
    let weights = super::load::load(&ct, &f, 2).expect("weights");
    let tokens: Vec<u32> = (0..701).map(|i| (i * 37 + 11) % 512).collect();
    let exact = reference_logits(&weights, &tokens);
    let mut model = FastModel::load_with(&ct, &f, FastConfig { threads: 2, pool: PoolKind::Spin }).expect("fast");
    let mut seq = model.new_sequence(800);
    let prompted = model.forward(&mut seq, &tokens[..700]).expect("prefill");
    let decoded = model.forward(&mut seq, &tokens[700..]).expect("decode");
    for (what, got, want) in [("prompt", &prompted, &exact[699]), ("decode", &decoded, &exact[700])] {
        let k = kl(want, got);
        eprintln!("700-token context, {what}: KL(f32 ‖ fast) {k:.5}");
        assert!(k <= 0.05, "{what} after 700 tokens: KL(f32 ‖ fast) {k}");
        assert_same_top1(what, got, want);
    }
}

#[test]
fn models_and_sequences_can_move_between_threads() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<FastModel>();
    send::<Sequence>();
    sync::<Sequence>();
}


/// A Gemma 3 1B-shaped random model (one kv head for four 256-wide heads, an
/// 8-key window on the first layer, RoPE scaled by 4 on the second), or a
/// Gemma 2 one (two kv heads), with the demo model's tokenizer, so that
/// llama.cpp can run it too.
pub(crate) fn gemma_for_llama_cpp(arch: &'static str) -> tempfile::TempPath {
    let (ct, _) = open_demo();
    let tokenizer = ct.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer."));
    let more = tokenizer.map(|(k, v)| (k.clone(), v.clone())).collect();
    let vocab = ct.tensor_infos["token_embd.weight"].shape.dims()[0];
    let kv_heads = if arch == "gemma2" { 2 } else { 1 };
    let shape = Shape { arch, dim: 256, heads: 4, kv_heads, head_dim: 256 };
    random_model_with(&shape, 8, vocab, more)
}

/// llama.cpp's own runs of [`gemma_for_llama_cpp`]: its greedy path after the
/// ChatML prompt (`scripts/llama-cpp-greedy.cpp`, llama-cpp-python 0.3.36's
/// vendored llama.cpp, 2 threads), and its margin over the runner-up at each
/// step. An independent check of Gemma 2's and 3's graphs, which candle cannot
/// give: see [`agrees_with_llama_cpp`].
#[test]
fn gemma_agrees_with_llama_cpp_along_its_greedy_path() {
    let runs: [(&str, [u32; 32], [f32; 32]); 2] = [
        (
            "gemma3",
            [
                2007, 48370, 47529, 27926, 23521, 42262, 25170, 42205, 816, 10000, 4160, 27376, 13930, 43078, 23878,
                34462, 49095, 12537, 28443, 35024, 16351, 7941, 20355, 19144, 44635, 6318, 44937, 32416, 34636, 14137,
                40002, 13055,
            ],
            [
                0.0855, 0.1943, 0.2472, 1.0288, 0.0398, 0.6034, 0.6354, 0.4475, 0.1634, 1.3249, 2.2730, 0.3269, 0.3029,
                1.4582, 0.1662, 0.6752, 0.0287, 0.4968, 0.2911, 1.6898, 2.0761, 0.2585, 0.6953, 0.1649, 0.3866, 2.0928,
                0.6349, 0.0684, 0.3554, 0.0825, 0.7758, 1.3094,
            ],
        ),
        (
            "gemma2",
            [
                48593, 40694, 44625, 12088, 2344, 42290, 24288, 42381, 11484, 42419, 35025, 47678, 10518, 22284, 31658,
                5662, 10493, 40056, 23396, 4599, 19440, 39210, 17220, 39065, 21723, 6807, 30615, 45727, 9450, 9450, 15497,
                24840,
            ],
            [
                0.4624, 1.2733, 1.7729, 0.3394, 0.7868, 0.7271, 1.0019, 0.9633, 0.4115, 0.1432, 2.1677, 0.6813, 0.3062,
                1.4511, 0.2570, 0.1184, 0.3194, 0.0959, 1.9494, 0.5797, 0.3661, 1.1675, 2.2490, 0.3863, 2.3841, 1.1563,
                0.0202, 2.2304, 0.3817, 0.2374, 0.1978, 1.5931,
            ],
        ),
    ];
    for (arch, llama_cpp, margins) in &runs {
        agrees_with_llama_cpp(arch, llama_cpp, margins);
    }
}

/// Teacher-forcing llama.cpp's greedy tokens on [`gemma_for_llama_cpp`]`(arch)`:
/// every one must be within 0.5 logits of the fast path's own best choice
/// (margins over the runner-up go down to 0.02, so greedy text alone would
/// part at a near tie), at least 3 in 4 its best; where they are, the margin
/// over the runner-up must be llama.cpp's within rounding noise, and the
/// margins in all its (no scale between the two: the soft caps).
fn agrees_with_llama_cpp(arch: &'static str, llama_cpp: &[u32; 32], margins: &[f32; 32]) {
    let path = gemma_for_llama_cpp(arch);
    let (ct, f) = open_gguf(&path);
    let mut model = FastModel::load_with(&ct, &f, FastConfig { threads: 2, pool: PoolKind::Spin }).expect("fast");
    let mut seq = model.new_sequence(64);
    let mut logits = model.forward(&mut seq, &PROMPT).expect("prefill");
    let (mut worst, mut same, mut worst_margin, mut sums) = (0f32, 0, 0f32, (0f32, 0f32));
    for (i, (&want, &margin)) in llama_cpp.iter().zip(margins).enumerate() {
        let best = argmax(&logits);
        let gap = logits[best] - logits[want as usize];
        assert!(gap <= 0.5, "{arch} step {i}: llama.cpp's token {want} is {gap} logits below the fast path's best ({best})");
        worst = worst.max(gap);
        same += usize::from(best == want as usize);
        if best == want as usize {
            let second = logits.iter().enumerate().filter(|(j, _)| *j != best).fold(f32::MIN, |m, (_, &v)| m.max(v));
            worst_margin = worst_margin.max((logits[best] - second - margin).abs());
            sums = (sums.0 + logits[best] - second, sums.1 + margin);
        }
        logits = model.forward(&mut seq, &[want]).expect("decode");
    }
    let ratio = sums.0 / sums.1;
    eprintln!(
        "{arch} vs llama.cpp: {same} of 32 the same top-1, largest gap {worst:.3}; margins within {worst_margin:.4} \
         logits, {ratio:.4} × llama.cpp's in all"
    );
    assert!(same >= 24, "{arch}: only {same} of 32 steps chose llama.cpp's token");
    // Each margin within the two paths' rounding noise (8-bit activations in
    // both: up to 0.13 measured), and no scale in all.
    assert!(worst_margin <= 0.2, "{arch}: a margin differs from llama.cpp's by {worst_margin} logits");
    assert!((ratio - 1.0).abs() <= 0.03, "{arch}: the margins are {ratio} × llama.cpp's in all");
}
