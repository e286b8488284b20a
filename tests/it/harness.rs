//! Test harness: real nats-servers on ports they pick themselves, real
//! `rbee-hive` processes with their own data directories and ids, and
//! helpers to watch events, the queue and the process table.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use rbee_broker::server::{connect_with_retry, stop_child, LocalServer, ServerOptions};
use rbee_schemas::codec::Encoding;
use rbee_schemas::event::{Event, EventBody};
use rbee_schemas::subjects;
use rustix::process::{kill_process, Pid, Signal};

/// A test never waits longer than this for one job.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// `target/<profile>/` of the running test binary: where rbee, rbee-hive and rbee-worker are.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.is_file(), "{} is missing: build the workspace binaries first (cargo build --release)", p.display());
    p
}

/// The models directory holding the demo model (fetched by scripts/fetch-demo-model.sh).
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("RBEE_TEST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| rbee_broker::rbee_home().join("models"));
    let model = dir.join("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run scripts/fetch-demo-model.sh", model.display());
    dir
}

pub fn demo_model_path() -> PathBuf {
    models_dir().join("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A unique id for hives and jobs of one test.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", rbee::new_job_id())
}

/// A nats-server with JetStream in a temp dir.
pub struct Broker {
    pub server: LocalServer,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut opts = ServerOptions::new(dir.path().join("nats"));
        opts.log_file = Some(dir.path().join("nats.log"));
        let server = LocalServer::start(opts).expect("nats-server starts (apt-get install nats-server)");
        Self { server, _dir: dir }
    }

    pub fn url(&self) -> String {
        self.server.url().to_owned()
    }

    pub async fn client(&self) -> async_nats::Client {
        connect_with_retry(self.server.url(), Duration::from_secs(10)).await.expect("connect to the test broker")
    }
}

/// Options for a test hive.
#[derive(Clone)]
pub struct HiveOpts {
    pub id: String,
    /// `--slots`; 0 leaves the hive's default.
    pub slots: u32,
    pub args: Vec<String>,
    /// Default: the shared models directory with the demo model.
    pub models_dir: Option<PathBuf>,
    /// Environment for the hive (and so its workers), on top of the test's.
    pub env: Vec<(String, String)>,
}

impl Default for HiveOpts {
    fn default() -> Self {
        Self { id: unique("hive"), slots: 1, args: vec![], models_dir: None, env: vec![] }
    }
}

/// A real rbee-hive process.
pub struct Hive {
    pub id: String,
    pub child: Option<Child>,
    pub home: tempfile::TempDir,
}

impl Hive {
    pub fn log_path(&self) -> PathBuf {
        self.home.path().join("hive.log")
    }

    /// Starts a hive on `url` and waits for its first heartbeat.
    pub async fn start(url: &str, opts: HiveOpts) -> Self {
        let hive = Self::spawn(url, opts);
        hive.wait_ready(url).await;
        hive
    }

    /// Starts a hive on `url` without waiting for anything.
    pub fn spawn(url: &str, opts: HiveOpts) -> Self {
        let home = tempfile::tempdir().expect("temp dir");
        let log = std::fs::File::create(home.path().join("hive.log")).expect("log file");
        let slots = if opts.slots == 0 { vec![] } else { vec!["--slots".to_owned(), opts.slots.to_string()] };
        // The workspace's worker, unless the test names another.
        let worker_bin =
            if opts.args.iter().any(|a| a == "--worker-bin") { vec![] } else { vec!["--worker-bin".into(), bin("rbee-worker").into_os_string()] };
        let child = Command::new(bin("rbee-hive"))
            .arg("--nats-url")
            .arg(url)
            .arg("--hive-id")
            .arg(&opts.id)
            .args(&slots)
            .arg("--models-dir")
            .arg(opts.models_dir.clone().unwrap_or_else(models_dir))
            .args(&worker_bin)
            .args(&opts.args)
            .env("RBEE_HOME", home.path())
            .env("RBEE_LOG", "info,rbee_hive=debug")
            // Slots and scale-out come from `opts` (or the hive's defaults), not the caller's shell.
            .env_remove("RBEE_HIVE_SLOTS")
            .env_remove("RBEE_WORKER_SLOTS")
            .env_remove("RBEE_SCALE_OUT_AFTER")
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start rbee-hive");
        Self { id: opts.id, child: Some(child), home }
    }

    async fn wait_ready(&self, url: &str) {
        let js = jetstream::new(connect_with_retry(url, Duration::from_secs(10)).await.expect("connect"));
        let started = Instant::now();
        loop {
            if let Ok(kv) = js.get_key_value(subjects::HIVES_BUCKET).await {
                // Its own heartbeat: a hive killed under the same id may have left one.
                if let Ok(Some(v)) = kv.get(&self.id).await {
                    if Encoding::Json.decode::<rbee_schemas::hive::HiveInfo>(&v).is_ok_and(|h| h.pid == self.pid()) {
                        return;
                    }
                }
            }
            assert!(started.elapsed() < Duration::from_secs(30), "hive {} did not come up:\n{}", self.id, self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Worker processes started by this hive (by their `--id <hive>-wN`).
    pub fn worker_pids(&self) -> Vec<u32> {
        processes_with_arg(&format!("{}-w", self.id))
    }

    pub fn signal(&self, sig: Signal) {
        if let Some(pid) = Pid::from_raw(self.pid() as i32) {
            let _ = kill_process(pid, sig);
        }
    }

    /// Waits for the hive to exit; its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!("hive {} did not exit within {timeout:?}:\n{}", self.id, self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Hive {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(10));
        }
    }
}

/// Pids of live `rbee-worker` processes whose command line contains `needle`.
pub fn processes_with_arg(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = state.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'));
        if !zombie && cmd.contains("rbee-worker") && cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Pids of live processes whose environment has `RBEE_HOME=<home>` or whose
/// command line mentions `home`.
pub fn processes_using_home(home: &Path) -> Vec<u32> {
    let home = home.to_string_lossy().into_owned();
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == me {
            continue;
        }
        let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = state.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'));
        let env = String::from_utf8_lossy(&env);
        let cmd = String::from_utf8_lossy(&cmd);
        if !zombie && (env.split('\0').any(|kv| kv == format!("RBEE_HOME={home}")) || cmd.contains(&home)) {
            out.push(pid);
        }
    }
    out
}

/// Waits until `f` holds, up to `timeout`.
pub async fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < timeout, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Messages left in the jobs stream.
pub async fn queued_jobs(client: &async_nats::Client) -> u64 {
    let js = jetstream::new(client.clone());
    let mut s = js.get_stream(subjects::JOBS_STREAM).await.expect("jobs stream");
    s.info().await.expect("stream info").state.messages
}

/// Waits for the jobs stream to be empty (acks and terms are asynchronous).
pub async fn assert_queue_drains(client: &async_nats::Client) {
    let started = Instant::now();
    loop {
        let n = queued_jobs(client).await;
        if n == 0 {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{n} job(s) still in the queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A subscription to a job's events.
pub struct Events {
    sub: async_nats::Subscriber,
    encoding: Encoding,
}

impl Events {
    pub async fn subscribe(client: &async_nats::Client, subject: &str, encoding: Encoding) -> Self {
        let sub = client.subscribe(subject.to_owned()).await.expect("subscribe");
        client.flush().await.expect("flush");
        Self { sub, encoding }
    }

    /// The next event (panics after [`JOB_TIMEOUT`]).
    pub async fn next_event(&mut self) -> Option<Event> {
        let m = tokio::time::timeout(JOB_TIMEOUT, self.sub.next()).await.expect("an event in time")?;
        Some(self.encoding.decode(&m.payload).unwrap_or_else(|e| panic!("undecodable event: {e}")))
    }

    /// Events up to and including the terminal one.
    pub async fn until_terminal(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        let deadline = tokio::time::sleep(JOB_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                m = self.sub.next() => {
                    let m = m.expect("subscription open");
                    let e: Event = self.encoding.decode(&m.payload).unwrap_or_else(|e| panic!("undecodable event: {e}"));
                    let end = e.is_terminal();
                    out.push(e);
                    if end {
                        return out;
                    }
                }
                _ = &mut deadline => panic!("no terminal event within {JOB_TIMEOUT:?}; got {out:?}"),
            }
        }
    }

    /// Asserts that nothing more arrives within `quiet`.
    pub async fn assert_silent(&mut self, quiet: Duration) {
        if let Ok(Some(m)) = tokio::time::timeout(quiet, self.sub.next()).await {
            panic!("unexpected event after the terminal one: {}", String::from_utf8_lossy(&m.payload));
        }
    }
}

/// Checks the event-sequence invariants: seq 0, 1, 2, ... and exactly one terminal event, last.
pub fn assert_well_formed(events: &[Event]) {
    assert_well_formed_but_lost(events, &[]);
}

/// [`assert_well_formed`] for a stream whose `seq`s in the `lost` ranges
/// (`from..to`, as `ClientError::Lost` reports them) the broker never stored.
pub fn assert_well_formed_but_lost(events: &[Event], lost: &[(u64, u64)]) {
    let mut seqs = (0..).filter(|s| !lost.iter().any(|&(from, to)| (from..to).contains(s)));
    for e in events {
        assert_eq!(Some(e.seq), seqs.next(), "gap or repeat in seq (lost: {lost:?}): {events:?}");
        assert_eq!(e.v, rbee_schemas::PROTOCOL_VERSION);
    }
    let terminals = events.iter().filter(|e| e.is_terminal()).count();
    assert_eq!(terminals, 1, "expected exactly one terminal event: {events:?}");
    assert!(events.last().is_some_and(Event::is_terminal));
}

/// The concatenated token text of the events after the last `started`.
pub fn text_of(events: &[Event]) -> String {
    let from = events.iter().rposition(|e| matches!(e.body, EventBody::Started(_))).map_or(0, |i| i + 1);
    events[from..]
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Token(t) => Some(t.text.as_str()),
            _ => None,
        })
        .collect()
}

/// Publishes a raw job through JetStream and waits for the publish ack;
/// returns the message's stream sequence.
pub async fn publish_raw(client: &async_nats::Client, subject: &str, headers: &[(&str, &str)], body: &[u8]) -> u64 {
    let js = jetstream::new(client.clone());
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in headers {
        h.insert(*k, *v);
    }
    js.publish_with_headers(subject.to_owned(), h, bytes::Bytes::copy_from_slice(body))
        .await
        .expect("publish")
        .await
        .expect("publish ack")
        .sequence
}

/// A hive that offers only the no-op test model, `delay` per token.
pub async fn noop_hive(url: &str, slots: u32, delay: &str, extra: &[&str]) -> Hive {
    let mut args: Vec<String> = vec!["--test-noop-model".into(), "--noop-token-delay".into(), delay.into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    Hive::start(url, HiveOpts { slots, args, ..HiveOpts::default() }).await
}

/// An event as the `RBEE_EVENTS` stream kept it, in its own encoding.
fn kept_event(m: &jetstream::message::StreamMessage) -> Event {
    let enc = Encoding::from_content_type(m.headers.get("Content-Type").map(|v| v.as_str())).unwrap();
    enc.decode(&m.payload).expect("kept event decodes")
}

/// Every event the `RBEE_EVENTS` stream kept for `job_id`, in stream order
/// (repeats of a resent terminal event included).
pub async fn kept_events(client: &async_nats::Client, job_id: &str) -> Vec<Event> {
    let js = jetstream::new(client.clone());
    let stream = js.get_stream_no_info(subjects::EVENTS_STREAM).await.expect("events stream");
    let subject = subjects::events_subject(job_id);
    let mut out = Vec::new();
    let mut seq = 1;
    loop {
        match stream.direct_get_next_for_subject(subject.clone(), Some(seq)).await {
            Ok(m) => {
                seq = m.sequence + 1;
                out.push(kept_event(&m));
            }
            Err(_) => return out,
        }
    }
}

/// Every event the `RBEE_EVENTS` stream kept, of every job, in the order it
/// stored them: the order each hive published them in (one connection).
pub async fn all_kept_events(client: &async_nats::Client) -> Vec<Event> {
    let js = jetstream::new(client.clone());
    let mut stream = js.get_stream(subjects::EVENTS_STREAM).await.expect("events stream");
    let state = &stream.info().await.expect("events stream info").state;
    let (first, last) = (state.first_sequence, state.last_sequence);
    let mut out = Vec::new();
    for seq in first..=last {
        let Ok(m) = stream.get_raw_message(seq).await else { continue };
        out.push(kept_event(&m));
    }
    out
}

/// Drains a job stream to its end (panics after [`JOB_TIMEOUT`]).
pub async fn collect(job: &mut rbee::JobStream) -> Vec<Event> {
    let mut events = Vec::new();
    let deadline = Instant::now() + JOB_TIMEOUT;
    while let Some(e) = tokio::time::timeout_at(deadline.into(), job.next()).await.expect("job finishes in time") {
        events.push(e.expect("event"));
    }
    events
}
