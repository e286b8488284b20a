//! Prompt-processing and decode speed of candle's quantized llama, the fast
//! path (single and batched), and llama.cpp if installed, side by side with the
//! same thread count:
//!
//! `cargo run --release -p rbee-worker --example bench_engine -- MODEL [--threads N] [--reps R] [--rayon] [--no-candle]`
//!
//! pp = one forward over `-p` prompt tokens from an empty cache; tg = `-n`
//! single-token steps from an empty cache (like llama-bench's pp/tg tests);
//! batched = `--batch` sequences decoding `-n` tokens each in lock-step,
//! counted together. The engines take turns, one repetition each per round
//! (llama-bench with `-r 1`), so load from other processes on a shared
//! machine hits them alike; each number is the median of `--reps` rounds,
//! the best in brackets.
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use rbee_worker::fast::pool::{default_threads, Pool};
use rbee_worker::fast::{FastConfig, FastModel, PoolKind};

struct Args {
    model: String,
    threads: usize,
    prompt: usize,
    gen: usize,
    batch: usize,
    reps: usize,
    rayon: bool,
    candle: bool,
}

fn parse() -> Args {
    let mut a = Args {
        model: String::new(),
        threads: default_threads(),
        prompt: 128,
        gen: 64,
        batch: 4,
        reps: 3,
        rayon: false,
        candle: true,
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
            "--no-candle" => a.candle = false,
            _ if a.model.is_empty() => a.model = s,
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !a.model.is_empty(),
        "usage: bench_engine MODEL [--threads N] [-p 128] [-n 64] [--batch 4] [--reps 3] [--rayon] [--no-candle]"
    );
    a
}

/// Tokens per second of one run of `f`.
fn tps(tokens: usize, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    tokens as f64 / t.elapsed().as_secs_f64()
}

/// Median and best.
fn summary(v: &[f64]) -> Option<(f64, f64)> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    Some((*v.get(v.len() / 2)?, *v.last()?))
}

/// Deterministic "prompt" tokens (llama-bench uses random ones too).
fn prompt_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut x = 12345u32;
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

/// One engine's samples: pp, tg, batched tok/s.
#[derive(Default)]
struct Samples {
    pp: Vec<f64>,
    tg: Vec<f64>,
    batched: Vec<f64>,
}

fn round_candle(a: &Args, m: &mut ModelWeights, prompt: &[u32], out: &mut Samples) {
    let mut fwd = |toks: &[u32], pos: usize| -> Vec<f32> {
        let x = Tensor::new(toks, &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("input");
        m.forward(&x, pos).and_then(|l| l.squeeze(0)).and_then(|l| l.to_vec1()).expect("forward")
    };
    out.pp.push(tps(a.prompt, || {
        fwd(prompt, 0);
    }));
    out.tg.push(tps(a.gen, || {
        let mut t = 1u32;
        for pos in 0..a.gen {
            t = argmax(&fwd(&[t], pos));
        }
    }));
}

fn round_fast(a: &Args, m: &mut FastModel, prompt: &[u32], out: &mut Samples) {
    out.pp.push(tps(a.prompt, || {
        let mut s = m.new_sequence(a.prompt);
        m.forward(&mut s, prompt).expect("prefill");
    }));
    out.tg.push(tps(a.gen, || {
        let mut s = m.new_sequence(a.gen);
        let mut t = 1u32;
        for _ in 0..a.gen {
            t = argmax(&m.forward(&mut s, &[t]).expect("decode"));
        }
    }));
    out.batched.push(tps(a.gen * a.batch, || {
        let mut seqs: Vec<_> = (0..a.batch).map(|_| m.new_sequence(a.gen)).collect();
        let mut next: Vec<u32> = (1..=a.batch as u32).collect();
        for _ in 0..a.gen {
            let mut refs: Vec<_> = seqs.iter_mut().collect();
            let logits = m.forward_batch(&mut refs, &next).expect("batched decode");
            next = logits.iter().map(|l| argmax(l)).collect();
        }
    }));
}

/// One llama-bench repetition with the same settings; pushes its pp and tg.
fn round_llama_cpp(a: &Args, bin: &Path, out: &mut Samples) -> Result<(), String> {
    let res = std::process::Command::new(bin)
        .args(["-m", &a.model, "-t", &a.threads.to_string(), "-p", &a.prompt.to_string()])
        .args(["-n", &a.gen.to_string(), "-r", "1", "-o", "json"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let runs: serde_json::Value =
        serde_json::from_slice(&res.stdout).map_err(|e| format!("llama-bench printed no JSON ({e})"))?;
    for r in runs.as_array().ok_or("llama-bench JSON is not a list")? {
        let ts = r["avg_ts"].as_f64().ok_or("llama-bench JSON lacks avg_ts")?;
        if r["n_prompt"].as_u64().unwrap_or(0) > 0 {
            out.pp.push(ts);
        } else {
            out.tg.push(ts);
        }
    }
    Ok(())
}

/// Median time (µs) of one parallel section of `threads * 4` small tasks
/// (a few µs of arithmetic each, like a decode step's matmul tasks).
fn section_time(threads: usize, kind: PoolKind) -> f64 {
    let pool = Pool::new(threads, kind).expect("pool");
    let data: Vec<f32> = (0..4096).map(|i| i as f32 * 1e-3).collect();
    let sink = std::sync::Mutex::new(0f32);
    let task = |i: usize| {
        let acc: f32 = (0..4).map(|r| data.iter().map(|v| v * (r + i) as f32).sum::<f32>()).sum();
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

fn row(name: &str, pp: Option<(f64, f64)>, tg: Option<(f64, f64)>) {
    let f = |v: Option<(f64, f64)>| v.map_or("-".to_owned(), |(m, b)| format!("{m:8.1} ({b:6.1})"));
    println!("| {name:<40} | {:>17} | {:>17} |", f(pp), f(tg));
}

fn main() {
    let a = parse();
    // candle sizes its matmul threads from this; set before anything starts rayon.
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let open = || {
        let mut file = std::fs::File::open(&a.model).expect("open model");
        let ct = gguf_file::Content::read(&mut file).expect("not a GGUF file");
        (ct, file)
    };
    let (ct, file) = open();
    let config = FastConfig { threads: a.threads, pool: PoolKind::Spin };
    let mut fast = FastModel::load_with(&ct, &file, config).expect("the fast path cannot load this model");
    let mut rayon = a.rayon.then(|| fast.share(FastConfig { pool: PoolKind::Rayon, ..config }).expect("rayon pool"));
    let mut candle = a.candle.then(|| {
        let (ct, mut file) = open();
        ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).expect("candle cannot load this model")
    });
    // Where scripts/build-llama-cpp.sh puts it.
    let llama_bench = &std::env::var_os("RBEE_LLAMA_CPP_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/rbee/llama.cpp"))
        .join("bin/llama-bench");
    let prompt = prompt_tokens(a.prompt, fast.config().vocab);

    // Warm-up: page in the weights, grow scratch buffers.
    let mut s = fast.new_sequence(a.prompt);
    fast.forward(&mut s, &prompt).expect("warm-up");
    if let Some(m) = candle.as_mut() {
        let x = Tensor::new(&prompt[..8], &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("input");
        m.forward(&x, 0).expect("warm-up");
    }

    let (mut c, mut f, mut r, mut l) = (Samples::default(), Samples::default(), Samples::default(), Samples::default());
    let mut llama_err = (!llama_bench.exists()).then(|| format!("{} not found", llama_bench.display()));
    for round in 0..a.reps {
        eprint!("\rround {}/{}", round + 1, a.reps);
        if let Some(m) = candle.as_mut() {
            round_candle(&a, m, &prompt, &mut c);
        }
        round_fast(&a, &mut fast, &prompt, &mut f);
        if let Some(m) = rayon.as_mut() {
            round_fast(&a, m, &prompt, &mut r);
        }
        if llama_err.is_none() {
            llama_err = round_llama_cpp(&a, llama_bench, &mut l).err();
        }
    }
    eprintln!();
    println!(
        "model {} | {} threads | pp{} and tg{} in tokens/s: median of {} interleaved rounds (best)",
        a.model, a.threads, a.prompt, a.gen, a.reps
    );
    println!("| {:<40} | {:>17} | {:>17} |", "engine", format!("pp{}", a.prompt), format!("tg{}", a.gen));
    println!("|{}|{}|{}|", "-".repeat(42), "-".repeat(19), "-".repeat(19));
    if a.candle {
        row("candle quantized_llama", summary(&c.pp), summary(&c.tg));
    }
    row("fast path", summary(&f.pp), summary(&f.tg));
    row(&format!("fast path, {} sequences batched (sum)", a.batch), None, summary(&f.batched));
    if a.rayon {
        row("fast path on rayon", summary(&r.pp), summary(&r.tg));
        row(&format!("fast path on rayon, {} batched (sum)", a.batch), None, summary(&r.batched));
    }
    match llama_err {
        None => row("llama.cpp llama-bench (-r 1 per round)", summary(&l.pp), summary(&l.tg)),
        Some(e) => println!("(no llama.cpp row: {e})"),
    }
    if a.rayon {
        drop((fast, rayon));
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
}
