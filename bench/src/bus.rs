//! `rbee-bench bus`: what the bus costs, against its floor, in one run.
//!
//! Starts its own nats-server and `rbee-hive` processes (the binaries next to
//! this one, so `cargo build --release --workspace --bins` first) and measures:
//! 1. the raw JetStream floor: publish-with-ack and pull-and-ack throughput
//!    on a scratch work queue, and a publish → pull → reply round trip;
//! 2. warm time to first token: a no-op job through rbee, and the demo model
//!    through rbee vs the same engine called in this process, with the raw
//!    round trip again under the same conditions (right after a prompt, when
//!    the weights have just pushed every process's state out of the caches);
//! 3. dispatch throughput: no-op jobs per second with 1, 2 and 4 workers
//!    (one hive each), and real-model one-token jobs per second;
//! 4. token streaming: events per second for one job and for 16 jobs at once,
//!    and the CPU time per token of the worker and the hive;
//! 5. cold start: publish to first token with no worker, split into worker
//!    spawn, model load and first token.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use rbee_broker::server::{stop_child, LocalServer, ServerOptions};
use rbee_schemas::codec::Encoding;
use rbee_schemas::ctl::CtlRequest;
use rbee_schemas::event::{Event, EventBody};
use rbee_schemas::job::InferRequest;
use rbee_schemas::subjects;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sequential jobs per latency measurement (p50/p99).
    #[arg(long, default_value_t = 1000)]
    pub jobs: usize,
    /// Jobs per throughput run.
    #[arg(long, default_value_t = 5000)]
    pub burst: usize,
    /// Sequential jobs on the real model (warm TTFT, one-token jobs).
    #[arg(long, default_value_t = 200)]
    pub model_jobs: usize,
    /// Cold starts to average.
    #[arg(long, default_value_t = 5)]
    pub cold: usize,
    /// Jobs each hive (and its worker) runs at once.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// The GGUF to use (default: the demo model in the rbee models directory).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Stop after section 2 (the floor and warm time to first token): a
    /// quicker run for comparing builds on TTFT alone.
    #[arg(long)]
    pub ttft_only: bool,
    /// Threads of this process's async runtime, which is the producer (and
    /// the floor's responder). 1, the default, is a current-thread runtime,
    /// as in the `rbee` CLI: a first token is then not handed between
    /// threads at the producer, which the in-process twin's clock never
    /// sees either.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub producer_threads: u16,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn row(name: &str, v: &mut [f64]) {
    let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
    println!("  {name:<58} p50 {p50:>8.3} ms   p99 {p99:>8.3} ms   (n={})", v.len());
}

fn bin(name: &str) -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join(name))).unwrap_or_else(|| PathBuf::from(name))
}

struct HiveProc {
    id: String,
    child: Child,
    _home: tempfile::TempDir,
}

impl Drop for HiveProc {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}

impl HiveProc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

async fn start_hive(client: &rbee::Client, url: &str, id: &str, extra: &[&str]) -> Result<HiveProc> {
    let home = tempfile::tempdir()?;
    let child = Command::new(bin("rbee-hive"))
        .args(["--nats-url", url, "--hive-id", id, "--test-noop-model", "--keep-alive", "-1"])
        // Every hive here shares one machine, so a second worker for a model
        // would add no capacity; and the rows assume one serving hive.
        .args(["--scale-out-after", "0s"])
        .arg("--models-dir")
        .arg(rbee_broker::rbee_home().join("models"))
        .arg("--worker-bin")
        .arg(bin("rbee-worker"))
        .args(extra)
        .env("RBEE_HOME", home.path())
        .env("RBEE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (build with cargo build --release --workspace --bins)", bin("rbee-hive").display()))?;
    let hive = HiveProc { id: id.to_owned(), child, _home: home };
    let started = Instant::now();
    while !client.hives().await?.iter().any(|h| h.hive_id == id) {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("hive {id} did not come up");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(hive)
}

async fn spawn_worker(client: &rbee::Client, hive: &str, model: &str) -> Result<()> {
    let req = CtlRequest::WorkerSpawn { v: 1, model: model.to_owned(), backend: None, device: None, keep_alive_ms: Some(-1) };
    let mut job = client.submit_ctl(Some(hive), &req, None).await?;
    while let Some(e) = job.next().await {
        if let EventBody::Error(e) = e?.body {
            bail!("spawn on {hive}: {}: {}", e.code, e.message);
        }
    }
    Ok(())
}

async fn stop_workers(client: &rbee::Client) -> Result<()> {
    for w in client.workers().await? {
        let mut job = client.submit_ctl(Some(&w.hive), &CtlRequest::WorkerStop { v: 1, worker: w.id.clone() }, None).await?;
        while job.next().await.is_some() {}
    }
    Ok(())
}

fn req(prompt: &str, max_tokens: i64) -> InferRequest {
    InferRequest { prompt: Some(prompt.into()), max_tokens: Some(max_tokens), temperature: Some(0.0), ..Default::default() }
}

/// Submits one job; (ms to the first token at the producer, all events).
async fn timed_job(client: &rbee::Client, model: &str, r: InferRequest) -> Result<(f64, Vec<Event>)> {
    let t0 = Instant::now();
    let mut job = client.submit(model, r, Default::default()).await?;
    let mut first = None;
    let mut events = Vec::new();
    while let Some(e) = job.next().await {
        let e = e?;
        if first.is_none() && matches!(e.body, EventBody::Token(_)) {
            first = Some(t0.elapsed().as_secs_f64() * 1e3);
        }
        events.push(e);
    }
    match (first, events.last().map(|e| &e.body)) {
        (Some(f), Some(EventBody::Done(_))) => Ok((f, events)),
        (_, last) => bail!("job did not finish with tokens: {last:?}"),
    }
}

/// One raw JetStream job round trip (no rbee code), ms: publish to the
/// scratch work queue, the responder task pulls it and publishes a reply.
async fn round_trip(js: &jetstream::Context, replies: &mut async_nats::Subscriber) -> Result<f64> {
    let t = Instant::now();
    let _ack = js.send_publish("bench.jobs.x", jetstream::message::PublishMessage::build().payload(Bytes::from_static(b"{}"))).await?;
    replies.next().await.context("reply")?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// The worker's engine in this process, on a thread of its own (it is not
/// `Sync`), one greedy one-token job per request.
struct InProcess {
    jobs: std::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Result<(f64, f64)>>>,
}

impl InProcess {
    fn start(path: PathBuf, prompt: &'static str) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<Result<(f64, f64)>>>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let loaded = rbee_worker::Engine::load(&path, candle_core::Device::Cpu).map_err(|e| anyhow::anyhow!("{}", e.message));
            let params = req(prompt, 1).validate(0).map_err(|e| anyhow::anyhow!("{}", e.message));
            let (mut engine, params) = match (loaded, params) {
                (Ok(e), Ok(p)) => (e, p),
                (Err(e), _) | (_, Err(e)) => return ready_tx.send(Err(e)).unwrap_or(()),
            };
            let _ = ready_tx.send(Ok(()));
            for answer in rx {
                let t = Instant::now();
                let mut first = None;
                let ran = engine.generate(&params, None, &AtomicBool::new(false), &mut |_, _| {
                    first.get_or_insert_with(|| t.elapsed().as_secs_f64() * 1e3);
                });
                let _ = answer.send(ran.map(|o| (first.unwrap_or(0.0), o.prompt_ms)).map_err(|e| anyhow::anyhow!("{}", e.message)));
            }
        });
        ready_rx.recv().context("in-process engine thread")??;
        Ok(Self { jobs: tx })
    }

    /// Time to the first token of one job, and the engine's own prompt time, ms.
    async fn job(&self) -> Result<(f64, f64)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs.send(tx).ok().context("in-process engine thread gone")?;
        rx.await.context("in-process engine thread gone")?
    }
}

/// Publish acks still to come, at most [`Window::MAX`]: each holds one of
/// the JetStream context's ack permits (5,000), and a publisher holding them
/// all waits for ever for the next.
#[derive(Default)]
struct Window(std::collections::VecDeque<jetstream::context::PublishAckFuture>);

impl Window {
    const MAX: usize = 1024;

    async fn push(&mut self, ack: jetstream::context::PublishAckFuture) -> Result<()> {
        if self.0.len() >= Self::MAX {
            if let Some(oldest) = self.0.pop_front() {
                oldest.await?;
            }
        }
        self.0.push_back(ack);
        Ok(())
    }

    async fn drain(&mut self) -> Result<()> {
        while let Some(ack) = self.0.pop_front() {
            ack.await?;
        }
        Ok(())
    }
}

/// CPU time of process `pid`, all its threads (exited ones too), ms. Read
/// from the process's CPU-time clock, in ns: `/proc/<pid>/stat` counts in
/// 10 ms ticks, too coarse for a worker that streams 8,192 no-op tokens in
/// ~10 ms of CPU (it read 0.00 µs per token). That file is the fallback.
#[allow(unsafe_code)]
fn cpu_ms(pid: u32) -> f64 {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return stat_cpu_ms(pid) };
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: each call writes only its out-parameter, a local of this frame.
    let read = unsafe { libc::clock_getcpuclockid(pid, &mut clock) == 0 && libc::clock_gettime(clock, &mut ts) == 0 };
    if read {
        ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
    } else {
        stat_cpu_ms(pid as u32)
    }
}

fn stat_cpu_ms(pid: u32) -> f64 {
    // utime + stime, fields 14 and 15 of /proc/<pid>/stat, in clock ticks (100 Hz).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) * 10.0
}

fn worker_pid(hive: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("rbee-worker") && cmd.contains(&format!("{hive}-w")) {
            return Some(pid);
        }
    }
    None
}

pub fn run(a: &Args) -> Result<()> {
    let rt = match a.producer_threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n.into()).enable_all().build()?,
    };
    rt.block_on(async {
        // On SIGTERM or Ctrl-C the run is dropped, not the process killed:
        // its nats-server and hives are stopped by their `Drop`s.
        tokio::select! {
            r = run_async(a) => r,
            s = stop_signal() => bail!("stopped by {s}; the bench's nats-server and hives are stopped"),
        }
    })
}

async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

async fn run_async(a: &Args) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = LocalServer::start(ServerOptions::new(dir.path().join("nats")))?;
    let url = server.url().to_owned();
    let nats = async_nats::connect(&url).await?;
    let js = jetstream::new(nats.clone());
    let procs = rbee_broker::server::go_max_procs().map_or_else(|| std::env::var("GOMAXPROCS").unwrap_or_default(), |n| n.to_string());
    println!(
        "rbee-bench bus: {} slot(s) per hive; nats-server {} on this machine (GOMAXPROCS {procs}), {} CPUs; producer on {} thread(s)",
        a.slots,
        rbee_broker::server::binary(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        a.producer_threads
    );

    // 1. The floor.
    println!("\n1. raw JetStream floor (no rbee code)");
    let s = js
        .get_or_create_stream(stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.jobs.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let c = s
        .get_or_create_consumer("bench", consumer::pull::Config { durable_name: Some("bench".into()), ack_policy: consumer::AckPolicy::Explicit, ..Default::default() })
        .await?;
    let n = a.burst;
    let t = Instant::now();
    let mut acks = Window::default();
    for i in 0..n {
        acks.push(js.publish("bench.jobs.x", Bytes::from(format!("{{\"prompt\":\"x\",\"i\":{i}}}"))).await?).await?;
    }
    acks.drain().await?;
    let publish_rate = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut msgs = c.messages().await?;
    for _ in 0..n {
        let m = msgs.next().await.context("pull")?.map_err(|e| anyhow::anyhow!("{e}"))?;
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let pull_rate = n as f64 / t.elapsed().as_secs_f64();
    println!("  {:<58} {publish_rate:>10.0} msgs/s", "publish with acks (async, pipelined)");
    println!("  {:<58} {pull_rate:>10.0} msgs/s", "pull and ack");
    // Round trip: publish → pull → core publish of a reply → subscriber.
    let mut replies = nats.subscribe("bench.reply").await?;
    let responder = {
        let nats = nats.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = msgs.next().await {
                let _ = nats.publish("bench.reply", m.payload.clone()).await;
                let _ = m.ack().await;
            }
        })
    };
    let mut floor = Vec::new();
    for _ in 0..a.jobs {
        floor.push(round_trip(&js, &mut replies).await?);
    }
    row("publish → pull → reply event (round trip)", &mut floor);
    let floor50 = pct(&mut floor, 0.5);

    // 2. Warm time to first token.
    let client = rbee::Client::connect(&url).await?;
    println!("\n2. warm time to first token (publish → first token event at the producer)");
    let hive = start_hive(&client, &url, "bench-a", &["--slots", &a.slots.to_string()]).await?;
    spawn_worker(&client, &hive.id, "noop").await?;
    let mut noop = Vec::new();
    for _ in 0..a.jobs {
        noop.push(timed_job(&client, "noop", req("x", 1)).await?.0);
    }
    row("no-op job through rbee", &mut noop);
    let model_path = a.model.clone().unwrap_or_else(|| rbee_broker::rbee_home().join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let model = "smollm2-135m";
    spawn_worker(&client, &hive.id, model).await?;
    let prompt = "The capital of France is";
    // The same engine in this process, on its own thread; jobs alternate
    // between it and the bus so both see the same machine.
    let local = InProcess::start(model_path.clone(), prompt)?;
    let (mut bus, mut in_process, mut at_hive, mut in_worker) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut in_process_prompt = Vec::new();
    let mut cold_floor = Vec::new();
    // Every timed thing here comes right after a prompt on this machine, as a
    // real job's first token does: ~90 MB of weights have just gone through
    // the caches, so every process on the path starts cold. The two engines
    // hold separate copies of the weights and strictly take turns (bus, then
    // in-process, then the floor), so each one's copy has been pushed out of
    // the caches by exactly one prompt of the other's. With an untimed
    // in-process prompt before each bus job as well, the worker's copy met
    // two and the in-process one one: that alone put ~0.35 ms into the
    // paired figure, and giving the extra prompt to the bus side instead took
    // ~0.35 ms off it (docs/benchmarks.md, twenty-fourth stop).
    local.job().await?;
    for _ in 0..a.model_jobs {
        let (ttft, evs) = timed_job(&client, model, req(prompt, 1)).await?;
        bus.push(ttft);
        if let Some(EventBody::Done(d)) = evs.last().map(|e| &e.body) {
            at_hive.push(d.timings.ttft_ms);
            if d.timings.prompt_tps > 0.0 {
                in_worker.push(d.usage.prompt_tokens as f64 / d.timings.prompt_tps * 1e3);
            }
        }
        let (ttft, prompt_ms) = local.job().await?;
        in_process.push(ttft);
        in_process_prompt.push(prompt_ms);
        cold_floor.push(round_trip(&js, &mut replies).await?);
    }
    responder.abort();
    let mut paired: Vec<f64> = bus.iter().zip(&in_process).map(|(b, i)| b - i).collect();
    let (b50, i50) = (pct(&mut bus, 0.5), pct(&mut in_process, 0.5));
    row(&format!("{model} through rbee (prompt {:?})", prompt), &mut bus);
    row(&format!("{model} in-process, same engine and prompt"), &mut in_process);
    println!("  {:<58} {:>+8.3} ms at p50", "bus overhead (difference of the p50s)", b50 - i50);
    println!("  {:<58} {:>+8.3} ms", "bus overhead (p50 of each job minus its in-process twin)", pct(&mut paired, 0.5));
    println!("    {:<56} {:>8.3} ms", "of that p50: the hive's claim → first token to NATS", pct(&mut at_hive, 0.5));
    if !in_worker.is_empty() {
        println!("    {:<56} {:>8.3} ms", "            the worker's prompt processing (its clock)", pct(&mut in_worker, 0.5));
        println!("    {:<56} {:>8.3} ms", "            the same, in-process (its clock)", pct(&mut in_process_prompt, 0.5));
    }
    let overhead = pct(&mut paired, 0.5);
    row("floor round trip (as in 1.), each right after a prompt", &mut cold_floor);
    let cold50 = pct(&mut cold_floor, 0.5);
    println!("    {:<56} {:>+8.3} ms", "the floor's own cost of following a prompt", cold50 - floor50);
    println!("  {:<58} {:>+8.3} ms", "bus overhead above that floor (rbee's own hops)", overhead - cold50);
    if a.ttft_only {
        return Ok(());
    }

    // 2b. The same worker, one job at a time vs as many as it has slots (up
    // to 4): what batching gives a user of the whole system. Only bench-a is
    // up, so no job is pulled (and left, 250 ms) by a hive without the model.
    println!("\n2b. batching through the bus (one worker, greedy 64-token jobs)");
    let at_once = (a.slots as usize).clamp(1, 4);
    let alone = model_tokens_per_s(&client, model, 2 * at_once, 1).await?;
    let batched = model_tokens_per_s(&client, model, 2 * at_once, at_once).await?;
    println!("  {:<58} {alone:>10.1} tokens/s", format!("{model}, one job at a time"));
    println!("  {:<58} {batched:>10.1} tokens/s ({:.2}×)", format!("{model}, {at_once} jobs at once"), batched / alone);
    // Twice as many jobs as slots: half of them wait in the queue for a slot.
    let queued = model_tokens_per_s(&client, model, 4 * at_once, 2 * at_once).await?;
    println!("  {:<58} {queued:>10.1} tokens/s", format!("{model}, {} jobs at once (half of them queued)", 2 * at_once));

    // 4. Streaming, one job (only bench-a is up).
    println!("\n4. token streaming (no-op engine, no delay)");
    let (w, h) = (worker_pid("bench-a").context("bench-a's worker")?, hive.pid());
    let (w0, h0) = (cpu_ms(w), cpu_ms(h));
    let t = Instant::now();
    let (_, evs) = timed_job(&client, "noop", req("x", 8192)).await?;
    let secs = t.elapsed().as_secs_f64();
    let tokens = evs.iter().filter(|e| matches!(e.body, EventBody::Token(_))).count();
    let server_hive = evs.iter().find_map(|e| match &e.body { EventBody::Started(s) => Some(s.hive.clone()), _ => None }).unwrap_or_default();
    println!("  {:<58} {:>10.0} events/s", format!("one job, {tokens} tokens (hive {server_hive})"), tokens as f64 / secs);
    let (wc, hc) = (cpu_ms(w) - w0, cpu_ms(h) - h0);
    println!("  {:<58} {:>10.2} µs/token", "worker CPU per token (no-op engine: framing, pipe)", wc * 1e3 / tokens as f64);
    println!("  {:<58} {:>10.2} µs/token", "hive CPU per token (routing, publishing events)", hc * 1e3 / tokens as f64);
    // 3. Dispatch throughput.
    println!("\n3. dispatch throughput (submit, claim, started, one token, done, ack)");
    let mut events = nats.subscribe("rbee.events.>").await?;
    let mut hives = vec![hive];
    for workers in [1usize, 2, 4] {
        while hives.len() < workers {
            let h = start_hive(&client, &url, &format!("bench-{}", hives.len()), &["--slots", &a.slots.to_string()]).await?;
            spawn_worker(&client, &h.id, "noop").await?;
            hives.push(h);
        }
        let pids = |f: &dyn Fn(&HiveProc) -> Option<u32>| hives.iter().filter_map(f).collect::<Vec<_>>();
        let (hive_pids, worker_pids) = (pids(&|h| Some(h.pid())), pids(&|h| worker_pid(&h.id)));
        let parts = [vec![server.pid().unwrap_or(0)], hive_pids, worker_pids, vec![std::process::id()]];
        let before: Vec<f64> = parts.iter().map(|p| p.iter().map(|&p| cpu_ms(p)).sum()).collect();
        let rate = burst(&js, &mut events, "noop", a.burst, 1).await?;
        println!("  {:<58} {rate:>10.0} jobs/s", format!("no-op jobs, {workers} worker(s), {} jobs", a.burst));
        let per_job: Vec<String> = parts
            .iter()
            .zip(&before)
            .map(|(p, b)| format!("{:.0}", (p.iter().map(|&p| cpu_ms(p)).sum::<f64>() - b) * 1e3 / a.burst as f64))
            .collect();
        println!("    CPU µs per job: nats-server {}, hives {}, workers {}, producer (this process) {}", per_job[0], per_job[1], per_job[2], per_job[3]);
    }
    let rate = burst(&js, &mut events, model, a.model_jobs, 1).await?;
    println!("  {:<58} {rate:>10.1} jobs/s", format!("{model}, max_tokens 1, 1 worker, {} jobs", a.model_jobs));
    // Hives without the model's worker pull its jobs too, and leave them for
    // the one that serves it: what that costs a job, one at a time.
    let (mut fleet, mut in_queue) = (Vec::new(), Vec::new());
    for _ in 0..(a.model_jobs / 2).max(20) {
        let (ttft, evs) = timed_job(&client, model, req(prompt, 1)).await?;
        fleet.push(ttft);
        if let Some(EventBody::Done(d)) = evs.last().map(|e| &e.body) {
            in_queue.push(d.timings.queued_ms);
        }
    }
    row(&format!("{model}, 1-token jobs in turn, {} hives, 1 serving it", hives.len()), &mut fleet);
    // The prompt dominates the row above and swings with the VM; this is the
    // part placement adds: publish → the serving hive has the job.
    row("  of that: in the queue (publish → the serving hive has it)", &mut in_queue);
    // As 2b's last row, with the other hives pulling (and leaving) the queued jobs.
    let others: Vec<u32> = hives.iter().skip(1).map(HiveProc::pid).collect();
    let (busy0, t) = (others.iter().map(|&p| cpu_ms(p)).sum::<f64>(), Instant::now());
    let queued = model_tokens_per_s(&client, model, 4 * at_once, 2 * at_once).await?;
    let busy = (others.iter().map(|&p| cpu_ms(p)).sum::<f64>() - busy0) / t.elapsed().as_secs_f64() / 10.0;
    println!("  {:<58} {queued:>10.1} tokens/s", format!("{model}, {} 64-token jobs at once, {} hives, 1 serving it", 2 * at_once, hives.len()));
    println!("    CPU of the {} hives that leave its jobs: {busy:.1} % of a core", others.len());

    println!("\n4b. token streaming, 16 jobs at once");
    let t = Instant::now();
    let mut subs = Vec::new();
    for _ in 0..16 {
        subs.push(client.submit("noop", req("x", 1024), Default::default()).await?);
    }
    let mut total = 0usize;
    for mut j in subs {
        while let Some(e) = j.next().await {
            if matches!(e?.body, EventBody::Token(_)) {
                total += 1;
            }
        }
    }
    println!("  {:<58} {:>10.0} events/s", format!("16 jobs at once over {} workers, {total} tokens", hives.len()), total as f64 / t.elapsed().as_secs_f64());

    // 5. Cold start.
    println!("\n5. cold start (publish → first token, no worker running)");
    drop(hives.split_off(1));
    let mut split = Vec::new();
    for m in ["noop", model] {
        let mut s = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..a.cold {
            stop_workers(&client).await?;
            let (ttft, evs) = timed_job(&client, m, req(prompt, 1)).await?;
            let Some(EventBody::Done(d)) = evs.last().map(|e| &e.body) else { bail!("no done") };
            s.0.push(ttft);
            s.1.push(d.timings.load_ms);
            s.2.push(d.timings.ttft_ms - d.timings.load_ms);
        }
        split.push(s);
    }
    let med = |v: &mut Vec<f64>| pct(v, 0.5);
    let (mut noop_s, mut real) = (split.remove(0), split.remove(0));
    let spawn = med(&mut noop_s.1);
    let load = med(&mut real.1);
    println!("  {:<58} {:>10.1} ms", "worker spawn (no-op worker: process start to ready)", spawn);
    println!("  {:<58} {:>10.1} ms", format!("model load ({model}, spawn excluded)"), load - spawn);
    println!("  {:<58} {:>10.1} ms", "prompt and first token", med(&mut real.2));
    println!("  {:<58} {:>10.1} ms", "total at the producer", med(&mut real.0));
    Ok(())
}

/// Generated tokens per second over `jobs` greedy 64-token jobs (each its
/// own prompt), submitted `at_once` at a time, each group waited for.
async fn model_tokens_per_s(client: &rbee::Client, model: &str, jobs: usize, at_once: usize) -> Result<f64> {
    let t = Instant::now();
    let mut tokens = 0u64;
    let mut next = 0;
    while next < jobs {
        let mut running = Vec::new();
        for _ in 0..at_once.min(jobs - next) {
            let prompt = format!("Story {next}: once upon a time, in a quiet village,");
            running.push(client.submit(model, req(&prompt, 64), Default::default()).await?);
            next += 1;
        }
        for mut job in running {
            while let Some(e) = job.next().await {
                match e?.body {
                    EventBody::Done(d) => tokens += u64::from(d.usage.completion_tokens),
                    EventBody::Error(err) => bail!("job failed: {}: {}", err.code, err.message),
                    _ => {}
                }
            }
        }
    }
    Ok(tokens as f64 / t.elapsed().as_secs_f64())
}

/// Publishes `n` jobs as fast as acks allow; jobs per second until the last terminal event.
async fn burst(js: &jetstream::Context, events: &mut async_nats::Subscriber, model: &str, n: usize, max_tokens: u32) -> Result<f64> {
    let run = nuid::next().to_string();
    let subject = subjects::infer_subject(model);
    let body = Bytes::from(format!("{{\"prompt\":\"The capital of France is\",\"max_tokens\":{max_tokens},\"temperature\":0}}"));
    let t = Instant::now();
    let publishing = {
        let js = js.clone();
        let run = run.clone();
        tokio::spawn(async move {
            let mut acks = Window::default();
            for i in 0..n {
                let msg = jetstream::message::PublishMessage::build().payload(body.clone()).message_id(format!("{run}-{i}"));
                acks.push(js.send_publish(subject.clone(), msg).await?).await?;
            }
            acks.drain().await?;
            Ok::<_, anyhow::Error>(())
        })
    };
    let mut ended = 0;
    while ended < n {
        let m = tokio::time::timeout(Duration::from_secs(60), events.next()).await.context("events stalled")?.context("closed")?;
        if !m.subject.as_str().contains(&run) {
            continue;
        }
        let e: Event = Encoding::Json.decode(&m.payload).map_err(|e| anyhow::anyhow!(e))?;
        match e.body {
            EventBody::Done(_) => ended += 1,
            EventBody::Error(err) => bail!("job failed: {}: {}", err.code, err.message),
            _ => {}
        }
    }
    publishing.await??;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}
