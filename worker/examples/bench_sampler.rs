//! Time to pick one token from a vocabulary of logits: rbee's sampler
//! against candle's `LogitsProcessor` (its baseline), per sampling mode.
//! `cargo run --release -p rbee-worker --example bench_sampler [VOCAB]`
//! (default 49,152, the demo model's vocabulary).
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};
use rbee_schemas::job::{Sampling, REPEAT_LAST_N};
use rbee_worker::sampler::Sampler;

fn main() {
    let vocab: usize = std::env::args().nth(1).and_then(|v| v.parse().ok()).unwrap_or(49_152);
    // Logits shaped like a model's: a few likely tokens, a long tail.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let logits: Vec<f32> = (0..vocab)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32;
            -8.0 + 24.0 * u.powi(12)
        })
        .collect();
    let recent: Vec<u32> = (0..REPEAT_LAST_N).map(|i| (i * 97 % vocab) as u32).collect();
    println!("vocabulary {vocab}; µs per token, best of 5 runs of 200 (candle → rbee)");
    // (name, temperature, top-k, top-p, repeat penalty)
    type Mode = (&'static str, f64, Option<usize>, Option<f64>, f32);
    let modes: [Mode; 6] = [
        ("greedy", 0.0, None, None, 1.0),
        ("temperature 0.8 (the default)", 0.8, None, None, 1.0),
        ("temperature 0.8, top-k 40", 0.8, Some(40), None, 1.0),
        ("temperature 0.8, top-p 0.9", 0.8, None, Some(0.9), 1.0),
        ("temperature 0.8, top-k 40, top-p 0.9", 0.8, Some(40), Some(0.9), 1.0),
        ("temperature 0.8, repeat penalty 1.1", 0.8, None, None, 1.1),
    ];
    for (name, temperature, top_k, top_p, repeat_penalty) in modes {
        let s = Sampling { temperature, top_p, top_k, repeat_penalty, repeat_last_n: REPEAT_LAST_N, seed: 1 };
        let candle = match (temperature, top_k, top_p) {
            (t, _, _) if t <= 0.0 => CandleSampling::ArgMax,
            (t, None, None) => CandleSampling::All { temperature: t },
            (t, Some(k), None) => CandleSampling::TopK { k, temperature: t },
            (t, None, Some(p)) => CandleSampling::TopP { p, temperature: t },
            (t, Some(k), Some(p)) => CandleSampling::TopKThenTopP { k, p, temperature: t },
        };
        let mut lp = LogitsProcessor::from_sampling(1, candle);
        let theirs = best(|| {
            let mut t = Tensor::from_slice(&logits, vocab, &Device::Cpu).expect("tensor");
            if repeat_penalty != 1.0 {
                t = candle_transformers::utils::apply_repeat_penalty(&t, repeat_penalty, &recent).expect("penalty");
            }
            lp.sample(&t).expect("candle sample")
        });
        let mut ours = Sampler::new(1, &s);
        let mine = best(|| ours.sample(&logits, &recent).expect("sample"));
        println!("  {name:38} {theirs:8.1} → {mine:7.1}  ({:.1}×)", theirs / mine);
    }
}

/// Best mean over 5 runs of 200 calls, µs.
fn best(mut f: impl FnMut() -> u32) -> f64 {
    let mut best = f64::MAX;
    let mut sink = 0u64;
    for _ in 0..5 {
        let t0 = Instant::now();
        for _ in 0..200 {
            sink = sink.wrapping_add(u64::from(f()));
        }
        best = best.min(t0.elapsed().as_secs_f64() * 1e6 / 200.0);
    }
    std::hint::black_box(sink);
    best
}
