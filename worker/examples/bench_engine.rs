//! Prompt-processing and decode speed of candle's quantized llama, the fast
//! path (single and batched), and llama.cpp if installed, side by side with the
//! same thread count:
//!
//! `cargo run --release -p rbee-worker --example bench_engine -- MODEL [--threads N] [--reps R] [--rayon]`
//!
//! pp = one forward over `-p` prompt tokens from an empty cache; tg = `-n`
//! single-token steps from an empty cache (like llama-bench's pp/tg tests).
//! Each number is the median of `--reps` runs (best in brackets).
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use rbee_worker::fast::{FastConfig, FastModel, PoolKind};

struct Args {
    model: String,
    threads: usize,
    prompt: usize,
    gen: usize,
    batch: usize,
    reps: usize,
    rayon: bool,
    skip_candle: bool,
}

fn parse() -> Args {
    let mut a = Args {
        model: String::new(),
        threads: rbee_worker::fast::pool::default_threads(),
        prompt: 128,
        gen: 64,
        batch: 4,
        reps: 3,
        rayon: false,
        skip_candle: false,
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> usize {
        v.and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{what} needs a number"))
    };
    while let Some(s) = it.next() {
        match s.as_str() {
            "--threads" | "-t" => a.threads = num(it.next(), "--threads"),
            "-p" => a.prompt = num(it.next(), "-p"),
            "-n" => a.gen = num(it.next(), "-n"),
            "--batch" => a.batch = num(it.next(), "--batch"),
            "--reps" | "-r" => a.reps = num(it.next(), "--reps").max(1),
            "--rayon" => a.rayon = true,
            "--no-candle" => a.skip_candle = true,
            _ if a.model.is_empty() => a.model = s,
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(!a.model.is_empty(), "usage: bench_engine MODEL [--threads N] [-p 128] [-n 64] [--batch 4] [--reps 3] [--rayon] [--no-candle]");
    a
}

/// Median and best of `reps` measurements of `tokens / seconds`.
fn measure(reps: usize, tokens: usize, mut run: impl FnMut()) -> (f64, f64) {
    let mut tps: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            run();
            tokens as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    tps.sort_by(f64::total_cmp);
    (tps[tps.len() / 2], tps[tps.len() - 1])
}

fn row(name: &str, pp: Option<(f64, f64)>, tg: Option<(f64, f64)>) {
    let f = |v: Option<(f64, f64)>| v.map_or("-".to_owned(), |(m, b)| format!("{m:8.1} ({b:6.1})"));
    println!("| {name:<34} | {:>17} | {:>17} |", f(pp), f(tg));
}

/// Deterministic "prompt" tokens (llama-bench uses random ones too).
fn prompt_tokens(n: usize, vocab: usize, seed: u32) -> Vec<u32> {
    let mut x = 12345u32.wrapping_add(seed);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            1 + x % (vocab as u32 - 1)
        })
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold(0, |b, (i, &x)| if x > v[b] { i } else { b }) as u32
}

fn bench_candle(a: &Args, vocab: usize) -> ((f64, f64), (f64, f64)) {
    let mut file = std::fs::File::open(&a.model).expect("open model");
    let ct = gguf_file::Content::read(&mut file).expect("gguf");
    let mut m = ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).expect("candle load");
    let prompt = prompt_tokens(a.prompt, vocab, 0);
    let mut fwd = |toks: &[u32], pos: usize| -> Vec<f32> {
        let x = Tensor::new(toks, &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("input");
        m.forward(&x, pos).and_then(|l| l.squeeze(0)).and_then(|l| l.to_vec1()).expect("forward")
    };
    fwd(&prompt[..8], 0); // warm-up
    let pp = measure(a.reps, a.prompt, || {
        fwd(&prompt, 0);
    });
    let tg = measure(a.reps, a.gen, || {
        let mut t = 1u32;
        for pos in 0..a.gen {
            t = argmax(&fwd(&[t], pos));
        }
    });
    (pp, tg)
}

fn bench_fast(a: &Args, m: &mut FastModel) -> ((f64, f64), (f64, f64), (f64, f64)) {
    let vocab = m.config().vocab;
    let prompt = prompt_tokens(a.prompt, vocab, 0);
    let mut warm = m.new_sequence(a.prompt + a.gen);
    m.forward(&mut warm, &prompt).expect("warm-up");
    let pp = measure(a.reps, a.prompt, || {
        let mut s = m.new_sequence(a.prompt);
        m.forward(&mut s, &prompt).expect("prefill");
    });
    let tg = measure(a.reps, a.gen, || {
        let mut s = m.new_sequence(a.gen);
        let mut t = 1u32;
        for _ in 0..a.gen {
            t = argmax(&m.forward(&mut s, &[t]).expect("decode"));
        }
    });
    // Batched decode: `batch` sequences, each with its own short prompt, then
    // `gen` steps with all of them in one forward_batch call.
    let batched = measure(a.reps, a.gen * a.batch, || {
        let mut seqs: Vec<_> = (0..a.batch).map(|_| m.new_sequence(a.gen + 1)).collect();
        let mut next: Vec<u32> = (0..a.batch as u32).map(|i| 1 + i).collect();
        for _ in 0..a.gen {
            let mut refs: Vec<_> = seqs.iter_mut().collect();
            let logits = m.forward_batch(&mut refs, &next).expect("batched decode");
            next = logits.iter().map(|l| argmax(l)).collect();
        }
    });
    (pp, tg, batched)
}

/// Runs llama-bench with the same settings; returns (pp, tg) tokens/s.
fn bench_llama_cpp(a: &Args) -> Option<((f64, f64), (f64, f64))> {
    let bin = Path::new("/root/.cache/rbee/llama.cpp/bin/llama-bench");
    if !bin.exists() {
        return None;
    }
    let out = std::process::Command::new(bin)
        .args(["-m", &a.model, "-t", &a.threads.to_string(), "-p", &a.prompt.to_string()])
        .args(["-n", &a.gen.to_string(), "-r", &a.reps.to_string(), "-o", "json"])
        .output()
        .ok()?;
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut pp = None;
    let mut tg = None;
    for r in runs.as_array()? {
        let avg = r["avg_ts"].as_f64()?;
        let best = r["samples_ts"].as_array().and_then(|s| s.iter().filter_map(|v| v.as_f64()).reduce(f64::max));
        let v = Some((avg, best.unwrap_or(avg)));
        if r["n_prompt"].as_u64() > Some(0) {
            pp = v;
        } else {
            tg = v;
        }
    }
    Some((pp?, tg?))
}

/// Median time (µs) of one parallel section of `threads * 4` small tasks
/// (a few µs of arithmetic each, like a decode step's matmul tasks).
fn section_time(threads: usize, kind: PoolKind) -> f64 {
    let pool = rbee_worker::fast::pool::Pool::new(threads, kind).expect("pool");
    let data: Vec<f32> = (0..4096).map(|i| i as f32 * 1e-3).collect();
    let sink = std::sync::Mutex::new(0f32);
    let task = |i: usize| {
        let mut acc = 0f32;
        for r in 0..4 {
            acc += data.iter().map(|v| v * (r + i) as f32).sum::<f32>();
        }
        *sink.lock().unwrap_or_else(|e| e.into_inner()) += acc;
    };
    let mut per: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..1000 {
                pool.run(threads * 4, &task);
            }
            t.elapsed().as_secs_f64() / 1000.0 * 1e6
        })
        .collect();
    per.sort_by(f64::total_cmp);
    per[per.len() / 2]
}

fn main() {
    let a = parse();
    // candle sizes its matmul threads from this; set before anything starts rayon.
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let mut file = std::fs::File::open(&a.model).expect("open model");
    let ct = gguf_file::Content::read(&mut file).expect("gguf");
    let mut fast = FastModel::load_with(&ct, &mut file, FastConfig { threads: a.threads, pool: PoolKind::Spin })
        .expect("the fast path cannot load this model");
    let vocab = fast.config().vocab;
    println!(
        "model {} | threads {} | pp{} / tg{} tokens/s, median of {} runs (best)",
        a.model, a.threads, a.prompt, a.gen, a.reps
    );
    println!("| {:<34} | {:>17} | {:>17} |", "engine", format!("pp{}", a.prompt), format!("tg{}", a.gen));
    println!("|{}|{}|{}|", "-".repeat(36), "-".repeat(19), "-".repeat(19));
    if !a.skip_candle {
        let (pp, tg) = bench_candle(&a, vocab);
        row("candle quantized_llama", Some(pp), Some(tg));
    }
    let (pp, tg, batched) = bench_fast(&a, &mut fast);
    row("fast (spin pool)", Some(pp), Some(tg));
    row(&format!("fast, {} sequences batched (sum)", a.batch), None, Some(batched));
    if a.rayon {
        let mut r = fast.share(FastConfig { threads: a.threads, pool: PoolKind::Rayon }).expect("rayon pool");
        let (pp, tg, batched) = bench_fast(&a, &mut r);
        row("fast (rayon pool)", Some(pp), Some(tg));
        row(&format!("fast (rayon), {} batched (sum)", a.batch), None, Some(batched));
    }
    if a.rayon {
        let serial = section_time(1, PoolKind::Spin);
        println!(
            "one section of {} small tasks: {serial:.1} µs on 1 thread (ideal on {}: {:.1}); spin pool {:.1} µs, rayon {:.1} µs",
            a.threads * 4,
            a.threads,
            serial / a.threads as f64,
            section_time(a.threads, PoolKind::Spin),
            section_time(a.threads, PoolKind::Rayon)
        );
    }
    drop(fast);
    match bench_llama_cpp(&a) {
        Some((pp, tg)) => row("llama.cpp llama-bench (mean, best)", Some(pp), Some(tg)),
        None => println!("(llama-bench not found or failed: no llama.cpp row)"),
    }
}
