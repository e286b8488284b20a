//! Runs the fast path in a loop for profiling (`perf record`):
//! `profile_fast MODEL [decode|prefill|prefill-long|batch|decode-long|idle] [--threads N] [--seconds S] [--seqs N]`
//! (`--seqs`: sequences stepped together in `batch`, default 4).
use std::time::Instant;

use candle_core::quantized::gguf_file;
use rbee_worker::fast::{FastConfig, FastModel, PoolKind};

fn main() {
    let mut args = std::env::args().skip(1);
    let model = args.next().expect("usage: profile_fast MODEL [decode|prefill|prefill-long|batch|decode-long|idle] [--threads N] [--seconds S] [--seqs N]");
    let mut mode = "decode".to_owned();
    let mut threads = rbee_worker::fast::pool::default_threads();
    let mut seconds = 10.0;
    let mut pool = PoolKind::Spin;
    let mut nseq = 4usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => threads = args.next().and_then(|v| v.parse().ok()).expect("--threads N"),
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).expect("--seconds S"),
            "--seqs" => nseq = args.next().and_then(|v| v.parse().ok()).expect("--seqs N"),
            "--rayon" => pool = PoolKind::Rayon,
            m => mode = m.to_owned(),
        }
    }
    let mut file = std::fs::File::open(&model).expect("open");
    let ct = gguf_file::Content::read(&mut file).expect("gguf");
    let mut m = FastModel::load_with(&ct, &file, FastConfig { threads, pool }).expect("load");
    if mode == "idle" {
        // CPU the process burns while the model sits idle after a step
        // (workers should go to sleep within ~1 ms).
        let mut s = m.new_sequence(8);
        m.forward(&mut s, &[1, 2, 3]).expect("forward");
        let cpu = || -> f64 {
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
            let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (ticks(11) + ticks(12)) / 100.0 // utime + stime, in clock ticks
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        let before = cpu();
        std::thread::sleep(std::time::Duration::from_secs(2));
        println!("idle: {:.3} s of CPU in 2 s", cpu() - before);
        return;
    }
    let started = Instant::now();
    let mut tokens = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        match mode.as_str() {
            "prefill" => {
                let mut s = m.new_sequence(128);
                let p: Vec<u32> = (0..128).map(|i| 100 + i * 7).collect();
                m.forward(&mut s, &p).expect("prefill");
                tokens += 128;
            }
            "prefill-long" => {
                // One 1,024-token prompt: attention is a large share here.
                let mut s = m.new_sequence(1024);
                let p: Vec<u32> = (0..1024).map(|i| 100 + i * 7 % 40000).collect();
                m.forward(&mut s, &p).expect("prefill");
                tokens += 1024;
            }
            "batch" => {
                let mut seqs: Vec<_> = (0..nseq).map(|_| m.new_sequence(64)).collect();
                for i in 0..64 {
                    let mut refs: Vec<_> = seqs.iter_mut().collect();
                    let next: Vec<u32> = (1..=nseq as u32).map(|j| j + i).collect();
                    m.forward_batch(&mut refs, &next).expect("batch");
                    tokens += nseq;
                }
            }
            "decode-long" => {
                // Decode speed at ~1000 tokens of context (attention-heavy).
                let mut s = m.new_sequence(1100);
                let p: Vec<u32> = (0..1000).map(|i| 100 + i * 7 % 40000).collect();
                m.forward(&mut s, &p).expect("prefill");
                let t0 = Instant::now();
                for i in 0..64 {
                    m.forward(&mut s, &[1 + i]).expect("decode");
                }
                println!("decode at 1000: {:.1} tokens/s", 64.0 / t0.elapsed().as_secs_f64());
            }
            _ => {
                let mut s = m.new_sequence(64);
                for i in 0..64 {
                    m.forward(&mut s, &[1 + i]).expect("decode");
                    tokens += 1;
                }
            }
        }
    }
    println!("{mode}: {:.1} tokens/s", tokens as f64 / started.elapsed().as_secs_f64());
}
