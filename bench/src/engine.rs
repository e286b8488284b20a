//! `rbee-bench engine`: the same GGUF on rbee's fast engine, rbee's candle
//! engine and llama.cpp, with the same threads, in interleaved rounds (each
//! round runs every engine once, so load from other processes on a shared
//! machine hits them alike); each figure is the median of the rounds, the
//! best in brackets.
//!
//! pp = one forward over `-p` prompt tokens from an empty cache; tg = `-n`
//! single-token greedy steps from an empty cache, like llama-bench's tests.
//! rbee's engines are measured through `Engine::logits`, the worker's own
//! entry point. The job-loop rows run whole greedy jobs through the worker's
//! batch loop (`rbee_worker::batch::serve`): one job alone (on candle, the
//! worker's engine before the fast one, and on the fast engine), one job
//! that samples as clients usually ask (temperature 0.8, top-p 0.9), then
//! `--jobs` concurrent ones on as many slots (fast engine); tokens/s counts every generated token of
//! every job over the wall time (short prompts included).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rbee_schemas::job::{GenerateParams, InferRequest};
use rbee_schemas::worker::{read_frame, FromWorker};
use rbee_worker::batch::{serve, Inbound, Job};
use rbee_worker::{Engine, EngineChoice, EngineKind};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF model [default: the demo model, SmolLM2-135M-Instruct Q4_1, where `rbee` downloads it].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Threads for every engine (rbee's engines via RAYON_NUM_THREADS, llama-bench -t) [default: all cores].
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Prompt tokens for pp.
    #[arg(short = 'p', default_value_t = 128)]
    prompt: usize,
    /// Generated tokens for tg and per job in the job-loop rows.
    #[arg(short = 'n', default_value_t = 64)]
    gen: usize,
    /// Rounds.
    #[arg(long, short = 'r', default_value_t = 3)]
    reps: usize,
    /// Concurrent jobs in the batched job-loop row.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// llama-bench binary [default: where scripts/build-llama-cpp.sh puts it].
    #[arg(long)]
    llama_bench: Option<PathBuf>,
    /// Skip the candle engine (slow).
    #[arg(long)]
    no_candle: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Samples of one row.
#[derive(Debug, Default)]
struct Samples {
    pp: Vec<f64>,
    tg: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Stat {
    median: f64,
    best: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    engine: String,
    pp: Option<Stat>,
    tg: Option<Stat>,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    threads: usize,
    prompt: usize,
    gen: usize,
    rounds: usize,
    rows: Vec<Row>,
    /// Why llama.cpp has no row, if it has none.
    llama_cpp_missing: Option<String>,
    job_loop: Vec<Row>,
}

fn stat(v: &[f64]) -> Option<Stat> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    Some(Stat { median: *v.get(v.len() / 2)?, best: *v.last()? })
}

fn demo_model() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("rbee/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Deterministic pseudo-random prompt tokens (llama-bench uses random ones too).
fn prompt_tokens(n: usize, vocab: u32) -> Vec<u32> {
    let mut x = 12345u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            1 + x % (vocab - 1)
        })
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold(0, |b, (i, &x)| if x > v[b] { i } else { b }) as u32
}

/// One pp and one tg measurement through `Engine::logits`.
fn round_engine(e: &mut Engine, prompt: &[u32], gen: usize, out: &mut Samples) -> Result<()> {
    let t = Instant::now();
    e.logits(prompt, 0)?;
    out.pp.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
    let t = Instant::now();
    let mut tok = 1u32;
    for pos in 0..gen {
        tok = argmax(&e.logits(&[tok], pos)?);
    }
    out.tg.push(gen as f64 / t.elapsed().as_secs_f64());
    Ok(())
}

/// Story openings, so greedy jobs run their full length rather than stop early.
const OPENINGS: [&str; 8] = [
    "Once upon a time",
    "The history of the honey bee begins",
    "In a small village by the sea",
    "The old lighthouse keeper",
    "Long ago, in a kingdom of glass,",
    "The first thing she noticed",
    "Deep in the forest there lived",
    "It was the coldest winter",
];

/// How the job-loop rows' jobs pick tokens.
#[derive(Clone, Copy)]
enum Pick {
    Greedy,
    /// Temperature 0.8 (the default) and top-p 0.9, fixed seeds.
    Sampled,
}

/// Generated tokens per second of `jobs` jobs through the worker's batch loop.
fn round_job_loop(e: &mut Engine, jobs: usize, gen: usize, pick: Pick) -> Result<f64> {
    let (tx, mut rx) = mpsc::channel();
    for i in 0..jobs {
        let (temperature, top_p, seed) = match pick {
            Pick::Greedy => (0.0, None, None),
            Pick::Sampled => (0.8, Some(0.9), Some(i as u64)),
        };
        let req = InferRequest {
            prompt: Some(OPENINGS[i % OPENINGS.len()].to_owned()),
            max_tokens: Some(gen as i64),
            temperature: Some(temperature),
            top_p,
            seed,
            ..Default::default()
        };
        let params: GenerateParams = req.validate(0)?;
        tx.send(Inbound::Job(Job { id: i as u64, params, resume: None }))?;
    }
    drop(tx);
    let mut frames = Vec::new();
    let t = Instant::now();
    serve(e, jobs, &mut rx, &mut frames)?;
    let secs = t.elapsed().as_secs_f64();
    let mut tokens = 0u64;
    let mut r = frames.as_slice();
    while let Some(f) = read_frame::<_, FromWorker>(&mut r)? {
        match f {
            FromWorker::Finished { outcome, .. } => tokens += u64::from(outcome.usage.completion_tokens),
            FromWorker::Failed { job, error } => bail!("job {job} failed: {}", error.message),
            _ => {}
        }
    }
    Ok(tokens as f64 / secs)
}

pub fn run(a: &Args) -> Result<()> {
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Both rbee engines size their thread pools from this; set before either starts.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let model = a.model.clone().unwrap_or_else(demo_model);
    if !model.exists() {
        bail!("no model at {} (download the demo model with `rbee`, or pass --model)", model.display());
    }
    let load = |c: EngineChoice| Engine::load_with(&model, candle_core::Device::Cpu, c).map_err(|e| anyhow::anyhow!(e.message));
    let mut fast = load(EngineChoice::Fast).context("the fast engine cannot load this model")?;
    if fast.kind() != EngineKind::Fast {
        bail!("expected the fast engine");
    }
    let mut candle = if a.no_candle { None } else { Some(load(EngineChoice::Candle)?) };
    let prompt = prompt_tokens(a.prompt, fast.info().vocab_size.max(2));
    let llama_bench = a.llama_bench.clone().unwrap_or_else(crate::llama_cpp::default_path);
    let mut llama_err = (!llama_bench.exists()).then(|| {
        format!(
            "{} not found: build it with scripts/build-llama-cpp.sh (about 10 minutes), or pass --llama-bench",
            llama_bench.display()
        )
    });

    // Warm-up: page the weights in, grow scratch buffers.
    fast.logits(&prompt, 0)?;
    round_job_loop(&mut fast, 1, 4, Pick::Greedy)?;
    if let Some(c) = candle.as_mut() {
        c.logits(&prompt[..8], 0)?;
    }

    let (mut f, mut c, mut l) = (Samples::default(), Samples::default(), Samples::default());
    let (mut one, mut many, mut candle_one, mut sampled) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..a.reps.max(1) {
        eprint!("\rround {}/{}", round + 1, a.reps.max(1));
        if let Some(e) = candle.as_mut() {
            round_engine(e, &prompt, a.gen, &mut c)?;
            candle_one.push(round_job_loop(e, 1, a.gen, Pick::Greedy)?);
        }
        round_engine(&mut fast, &prompt, a.gen, &mut f)?;
        if llama_err.is_none() {
            match crate::llama_cpp::run_once(&llama_bench, &model, threads, a.prompt, a.gen) {
                Ok((pp, tg)) => {
                    l.pp.push(pp);
                    l.tg.push(tg);
                }
                Err(e) => llama_err = Some(format!("{e:#}")),
            }
        }
        sampled.push(round_job_loop(&mut fast, 1, a.gen, Pick::Sampled)?);
        one.push(round_job_loop(&mut fast, 1, a.gen, Pick::Greedy)?);
        many.push(round_job_loop(&mut fast, a.jobs, a.gen, Pick::Greedy)?);
    }
    eprintln!();

    let mut rows = vec![Row { engine: "rbee fast".into(), pp: stat(&f.pp), tg: stat(&f.tg) }];
    if candle.is_some() {
        rows.push(Row { engine: "rbee candle".into(), pp: stat(&c.pp), tg: stat(&c.tg) });
    }
    if llama_err.is_none() {
        rows.push(Row { engine: "llama.cpp (llama-bench -r 1)".into(), pp: stat(&l.pp), tg: stat(&l.tg) });
    }
    let mut job_loop = Vec::new();
    if candle.is_some() {
        job_loop.push(Row { engine: "rbee candle, worker loop, 1 job".into(), pp: None, tg: stat(&candle_one) });
    }
    job_loop.extend([
        Row { engine: "rbee fast, worker loop, 1 sampling job".into(), pp: None, tg: stat(&sampled) },
        Row { engine: "rbee fast, worker loop, 1 job".into(), pp: None, tg: stat(&one) },
        Row { engine: format!("rbee fast, worker loop, {} jobs on {0} slots", a.jobs), pp: None, tg: stat(&many) },
    ]);
    let report = Report {
        model: model.display().to_string(),
        threads,
        prompt: a.prompt,
        gen: a.gen,
        rounds: a.reps.max(1),
        rows,
        llama_cpp_missing: llama_err,
        job_loop,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, &model);
    }
    Ok(())
}

fn print_table(r: &Report, model: &Path) {
    let cell = |s: &Option<Stat>| s.as_ref().map_or("-".to_owned(), |s| format!("{:.1} ({:.1})", s.median, s.best));
    let name = model.file_name().map_or(r.model.clone(), |n| n.to_string_lossy().into_owned());
    println!(
        "{name}, {} threads; tokens/s, median of {} interleaved rounds (best)\n",
        r.threads, r.rounds
    );
    println!("| {:<30} | {:>16} | {:>16} |", "engine", format!("pp{}", r.prompt), format!("tg{}", r.gen));
    println!("|{}|{}:|{}:|", "-".repeat(32), "-".repeat(17), "-".repeat(17));
    for row in &r.rows {
        println!("| {:<30} | {:>16} | {:>16} |", row.engine, cell(&row.pp), cell(&row.tg));
    }
    if let Some(why) = &r.llama_cpp_missing {
        println!("\n(no llama.cpp row: {why})");
    }
    println!("\n| {:<45} | {:>28} |", "worker job loop, greedy unless said", format!("generated tokens/s ({}/job)", r.gen));
    println!("|{}|{}:|", "-".repeat(47), "-".repeat(29));
    for row in &r.job_loop {
        println!("| {:<45} | {:>28} |", row.engine, cell(&row.tg));
    }
    if let [.., one, many] = &r.job_loop[..] {
        if let (Some(o), Some(m)) = (&one.tg, &many.tg) {
            println!("\nconcurrent jobs vs one: {:.2}× aggregate tokens/s (medians)", m.median / o.median);
        }
    }
}
