//! The local stack: a nats-server and a hive on this machine.
//!
//! - [`Embedded`]: what `rbee infer` starts when no broker is configured and no
//!   `rbee up` stack runs. Broker store under `<rbee home>/run/<pid>/`, removed
//!   afterwards; the hive keeps its catalog in `<rbee home>/hives/<id>/`.
//!   Everything is stopped (hive drained first) when the command ends.
//! - `rbee up` / `rbee down` ([`up`], [`down`]): the same two processes,
//!   detached and persistent (broker store `<rbee home>/nats`, logs in
//!   `<rbee home>/logs`), recorded in `<rbee home>/stack.json`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rbee_broker::server::{connect_with_retry, stop_child, LocalServer, ServerOptions};
use rbee_schemas::subjects;
use rustix::process::{kill_process, test_kill_process, Pid, Signal};
use serde::{Deserialize, Serialize};

/// How long a hive may take to come up.
const HIVE_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopping hive may take to drain (its default drain timeout plus margin).
const HIVE_STOP_TIMEOUT: Duration = Duration::from_secs(45);

/// What `rbee up` started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StackState {
    pub url: String,
    pub nats_pid: u32,
    pub hive_pid: u32,
    pub hive_id: String,
    pub started_at_ms: u64,
}

/// A binary that ships next to this one (`rbee-hive`, `rbee-worker`), else from `PATH`.
pub fn sibling_bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn alive(pid: u32) -> bool {
    Pid::from_raw(pid as i32).is_some_and(|p| test_kill_process(p).is_ok())
}

fn state_path(home: &Path) -> PathBuf {
    home.join("stack.json")
}

/// The `rbee up` stack, if it is running.
pub fn running_stack(home: &Path) -> Option<StackState> {
    let text = std::fs::read_to_string(state_path(home)).ok()?;
    let state: StackState = serde_json::from_str(&text).ok()?;
    (alive(state.nats_pid) && alive(state.hive_pid)).then_some(state)
}

fn spawn_hive(url: &str, home: &Path, hive_id: &str, log: &Path) -> anyhow::Result<Child> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let bin = sibling_bin("rbee-hive");
    use std::os::unix::process::CommandExt;
    Command::new(&bin)
        .arg("--nats-url")
        .arg(url)
        .arg("--hive-id")
        .arg(hive_id)
        .env("RBEE_HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} (build it with cargo build --release)", bin.display()))
}

/// Waits until `hive_id` heartbeats on the broker at `url`.
async fn wait_for_hive(url: &str, hive_id: &str, hive: &mut Child, log: &Path) -> anyhow::Result<()> {
    let client = connect_with_retry(url, Duration::from_secs(10)).await?;
    let js = async_nats::jetstream::new(client);
    let started = Instant::now();
    loop {
        if let Ok(store) = js.get_key_value(subjects::HIVES_BUCKET).await {
            if let Ok(Some(_)) = store.get(hive_id).await {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = hive.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("rbee-hive exited ({status}) while starting; {}:\n{}", log.display(), tail.join("\n"));
        }
        if started.elapsed() > HIVE_START_TIMEOUT {
            bail!("rbee-hive did not come up within {HIVE_START_TIMEOUT:?}; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A broker and a hive that live as long as this value (see module docs).
#[derive(Debug)]
pub struct Embedded {
    server: Option<LocalServer>,
    hive: Option<Child>,
    run_dir: PathBuf,
}

impl Embedded {
    pub async fn start(home: &Path) -> anyhow::Result<Self> {
        let run_dir = home.join("run").join(std::process::id().to_string());
        let mut opts = ServerOptions::new(run_dir.join("nats"));
        opts.log_file = Some(run_dir.join("nats.log"));
        let server = LocalServer::start(opts)?;
        let hive_id = rbee_broker::default_hive_id();
        let log = home.join("logs").join("hive-embedded.log");
        let mut hive = spawn_hive(server.url(), home, &hive_id, &log)?;
        let mut me = Self { server: Some(server), hive: None, run_dir };
        let url = me.url().to_owned();
        let ready = wait_for_hive(&url, &hive_id, &mut hive, &log).await;
        me.hive = Some(hive);
        ready?;
        Ok(me)
    }

    pub fn url(&self) -> &str {
        self.server.as_ref().map_or("", |s| s.url())
    }

    /// Stops the hive (it drains and stops its workers), then the broker.
    pub fn stop(&mut self) {
        if let Some(mut hive) = self.hive.take() {
            stop_child(&mut hive, HIVE_STOP_TIMEOUT);
        }
        if let Some(mut server) = self.server.take() {
            server.stop(Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `rbee up`: starts a persistent broker on `port` and a hive, detached.
pub async fn up(home: &Path, port: u16) -> anyhow::Result<StackState> {
    if let Some(state) = running_stack(home) {
        return Ok(state);
    }
    let mut opts = ServerOptions::new(home.join("nats"));
    opts.port = Some(port);
    opts.log_file = Some(home.join("logs").join("nats.log"));
    std::fs::create_dir_all(home.join("logs"))?;
    let server = LocalServer::start(opts).with_context(|| format!("starting nats-server on port {port}"))?;
    let url = server.url().to_owned();
    let hive_id = rbee_broker::default_hive_id();
    let log = home.join("logs").join("hive.log");
    let mut hive = spawn_hive(&url, home, &hive_id, &log)?;
    if let Err(e) = wait_for_hive(&url, &hive_id, &mut hive, &log).await {
        stop_child(&mut hive, Duration::from_secs(5));
        return Err(e); // the server is stopped when dropped
    }
    let state = StackState {
        url,
        nats_pid: server.detach().unwrap_or(0),
        hive_pid: hive.id(),
        hive_id,
        started_at_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    };
    std::fs::write(state_path(home), serde_json::to_vec_pretty(&state)?)?;
    Ok(state)
}

/// `rbee down`: stops what `rbee up` started. Returns false if nothing ran.
pub fn down(home: &Path) -> anyhow::Result<bool> {
    let path = state_path(home);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(false) };
    let state: StackState = serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    let mut any = false;
    for (pid, grace) in [(state.hive_pid, HIVE_STOP_TIMEOUT), (state.nats_pid, Duration::from_secs(10))] {
        if alive(pid) {
            any = true;
            terminate(pid, grace);
        }
    }
    std::fs::remove_file(&path)?;
    Ok(any)
}

/// SIGTERM a process that is not our child; SIGKILL after `grace`.
fn terminate(pid: u32, grace: Duration) {
    let Some(p) = Pid::from_raw(pid as i32) else { return };
    let _ = kill_process(p, Signal::TERM);
    let started = Instant::now();
    while started.elapsed() < grace {
        if !alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill_process(p, Signal::KILL);
}
