//! A local nats-server with JetStream, for the embedded default, `rbee up` and
//! the tests. It runs Debian's `nats-server` (or `$RBEE_NATS_SERVER`) with the
//! single-node config in `broker-config/nats-server.conf`, a store directory of
//! the caller's choosing and, by default, a port the server picks itself (read
//! back from its ports file, so there is no race for a free port).
//!
//! Such a server shares its machine with the hive and its workers, whose
//! compute threads want every core. Go's scheduler, left at one thread per
//! core, keeps idle threads spinning for work after each message; on a
//! 2-core machine that cost the broker 30-50 % more CPU per job, on the cores
//! the workers compute on (docs/benchmarks.md, seventh pass). So the server runs
//! with `GOMAXPROCS` = a quarter of the cores (at least 1), unless
//! `GOMAXPROCS` is set in the environment, which is passed on as it is.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

/// The single-node default config, shipped inside the binaries.
pub const DEFAULT_CONFIG: &str = include_str!("../nats-server.conf");

/// How to start a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// JetStream store directory (created if missing).
    pub store_dir: PathBuf,
    /// Client port; `None` lets the server pick a free one.
    pub port: Option<u16>,
    /// Address to listen on.
    pub host: String,
    /// Log file; `None` discards the server's log.
    pub log_file: Option<PathBuf>,
    /// Put the server in its own process group, so a Ctrl-C in the terminal
    /// reaches only its owner, which stops it in order.
    pub own_process_group: bool,
    /// `GOMAXPROCS` for the server; `None` leaves it to the environment
    /// (or to Go: one per core). Defaults to [`go_max_procs`].
    pub go_max_procs: Option<usize>,
}

impl ServerOptions {
    pub fn new(store_dir: impl Into<PathBuf>) -> Self {
        Self {
            store_dir: store_dir.into(),
            port: None,
            host: "127.0.0.1".to_owned(),
            log_file: None,
            own_process_group: true,
            go_max_procs: go_max_procs(),
        }
    }
}

/// The `GOMAXPROCS` a server on this machine gets: `None` when the
/// environment sets one, else a quarter of the cores, at least 1.
pub fn go_max_procs() -> Option<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::env::var_os("GOMAXPROCS").is_none().then_some((cores / 4).max(1))
}

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot run {binary}: {source}. Install it (Debian/Ubuntu: sudo apt-get install -y nats-server) \
         or point RBEE_NATS_SERVER at a nats-server binary"
    )]
    NotInstalled { binary: String, source: std::io::Error },
    #[error("preparing {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("nats-server exited during start-up ({status}){log}")]
    Exited { status: String, log: String },
    #[error("nats-server did not report its port within {0:?}")]
    Timeout(Duration),
}

/// A running nats-server child. Stopped (SIGTERM, then SIGKILL) on drop unless detached.
#[derive(Debug)]
pub struct LocalServer {
    child: Option<Child>,
    url: String,
    port: u16,
    options: ServerOptions,
}

/// The nats-server binary to run.
pub fn binary() -> String {
    std::env::var("RBEE_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned())
}

impl LocalServer {
    /// Starts a server and waits until it has reported its client port.
    pub fn start(options: ServerOptions) -> Result<Self, ServerError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ServerError::Io { path, source }
        };
        std::fs::create_dir_all(&options.store_dir).map_err(io(&options.store_dir))?;
        let conf = options.store_dir.join("nats-server.conf");
        std::fs::write(&conf, DEFAULT_CONFIG).map_err(io(&conf))?;
        let ports_dir = options.store_dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).map_err(io(&ports_dir))?;

        let bin = binary();
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&conf)
            .arg("-js")
            .arg("-sd")
            .arg(&options.store_dir)
            .arg("-a")
            .arg(&options.host)
            .arg("-p")
            .arg(options.port.map_or_else(|| "-1".to_owned(), |p| p.to_string()))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(n) = options.go_max_procs {
            cmd.env("GOMAXPROCS", n.to_string());
        }
        match &options.log_file {
            Some(log) => {
                cmd.arg("-l").arg(log).stderr(Stdio::null());
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        if options.own_process_group {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().map_err(|source| ServerError::NotInstalled { binary: bin, source })?;
        let pid = child.id();
        let deadline = Duration::from_secs(15);
        let started = Instant::now();
        let port = loop {
            if let Some(port) = read_ports_file(&ports_dir, pid) {
                break port;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = options
                    .log_file
                    .as_ref()
                    .and_then(|l| std::fs::read_to_string(l).ok())
                    .map(|s| format!(":\n{}", tail(&s, 15)))
                    .unwrap_or_default();
                return Err(ServerError::Exited { status: status.to_string(), log });
            }
            if started.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ServerError::Timeout(deadline));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let url = format!("nats://{}:{port}", options.host);
        Ok(Self { child: Some(child), url, port, options })
    }

    /// `nats://host:port`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn store_dir(&self) -> &Path {
        &self.options.store_dir
    }

    /// Stops the server: SIGTERM (it flushes JetStream and exits), SIGKILL after `grace`.
    /// False if it had to be killed.
    pub fn stop(&mut self, grace: Duration) -> bool {
        match self.child.take() {
            Some(mut child) => stop_child(&mut child, grace),
            None => true,
        }
    }

    /// Kills the server at once, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store (after [`stop`](Self::stop) or [`kill`](Self::kill)).
    /// A running server is stopped gracefully first: it gets [`RESTART_GRACE`]
    /// to flush JetStream, since killing it could lose writes it acknowledged.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        if !self.stop(RESTART_GRACE) {
            tracing::warn!(port = self.port, "nats-server did not stop within {RESTART_GRACE:?}; killed it, which may lose acknowledged writes");
        }
        let options = ServerOptions { port: Some(self.port), ..self.options.clone() };
        let mut fresh = LocalServer::start(options)?;
        self.child = fresh.child.take();
        Ok(())
    }

    /// Leaves the server running after this value is dropped; returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// How long [`LocalServer::restart`] waits for a SIGTERMed server to exit.
pub const RESTART_GRACE: Duration = Duration::from_secs(30);

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the child. False
/// if it had to be killed.
pub fn stop_child(child: &mut Child, grace: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    if let Some(pid) = Pid::from_raw(child.id() as i32) {
        let _ = kill_process(pid, Signal::TERM);
    }
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

fn read_ports_file(dir: &Path, pid: u32) -> Option<u16> {
    let suffix = format!("_{pid}.ports");
    let entry = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().ends_with(&suffix))?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = v.get("nats")?.get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Connects to `url`, retrying until `timeout` (a server that was just started
/// may not accept connections yet).
pub async fn connect_with_retry(url: &str, timeout: Duration) -> Result<async_nats::Client, async_nats::ConnectError> {
    let start = Instant::now();
    loop {
        match async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2)).connect(url).await {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() > timeout => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
