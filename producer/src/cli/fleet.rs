//! `rbee models`, `rbee workers`, `rbee hives`, `rbee logs`: the fleet over the bus.
//!
//! Listings read the registries (hive heartbeats in `rbee-hives`, workers in
//! `rbee-workers`); changes are lifecycle jobs, followed like inference jobs,
//! with a progress bar for downloads and worker loads.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rbee_schemas::ctl::CtlRequest;
use rbee_schemas::event::EventBody;
use rbee_schemas::hive::HiveInfo;
use rbee_schemas::model::ModelRef;
use rbee_schemas::PROTOCOL_VERSION;
use serde_json::{json, Value};

use super::render::{age, table};
use crate::{Client, ClientError};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// The models of every hive (or one): which hive has what.
    List {
        #[arg(long)]
        hive: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One model: where it is, its size, format, quantization and hash.
    Get {
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Download a model (hf:org/repo[@revision][:file.gguf], or a known alias).
    // The brackets are the syntax `--help` shows, not links.
    #[allow(rustdoc::broken_intra_doc_links)]
    Download {
        model: String,
        /// Register it under this alias.
        #[arg(long)]
        alias: Option<String>,
        /// The hive to download to (default: whichever hive takes the job).
        #[arg(long)]
        hive: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Register a GGUF file that is on a hive's machine (used in place).
    Import {
        /// The file's path on the hive's machine.
        path: String,
        #[arg(long)]
        alias: String,
        /// The hive whose machine has the file (may be left out when only one hive is attached).
        #[arg(long)]
        hive: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a model from a hive (every hive that has it, without --hive).
    Delete {
        model: String,
        #[arg(long)]
        hive: Option<String>,
        /// Stop the workers that use it instead of refusing.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Cpu,
    Cuda,
    Metal,
}

#[derive(Debug, Subcommand)]
pub enum WorkersCommand {
    /// Every worker of every hive.
    List {
        #[arg(long)]
        hive: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Start (pre-warm) a worker for a model.
    Spawn {
        model: String,
        /// The hive to start it on (default: a hive that has the model and the memory).
        #[arg(long)]
        hive: Option<String>,
        #[arg(long, value_enum)]
        backend: Option<Backend>,
        #[arg(long)]
        device: Option<usize>,
        /// How long it may stay idle before it exits (e.g. 10m; -1 = never).
        #[arg(long, allow_hyphen_values = true)]
        keep_alive: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stop a worker (it finishes its current job first).
    Stop {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum HivesCommand {
    /// Every hive heartbeating now: version, backends, memory, workers.
    List {
        #[arg(long)]
        json: bool,
    },
}

fn gib(bytes: u64) -> String {
    match bytes {
        0 => "-".to_owned(),
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
        b => format!("{:.0} MiB", b as f64 / f64::from(1u32 << 20)),
    }
}

/// What a worker for one model needs on the hives that list it (each hive
/// estimates for its own backend and slots): one figure, or the range; "-"
/// where no hive says.
fn needs(memory: impl Iterator<Item = u64>) -> String {
    let known: Vec<u64> = memory.filter(|&m| m > 0).collect();
    match (known.iter().min(), known.iter().max()) {
        (Some(&lo), Some(&hi)) if gib(lo) != gib(hi) => format!("{}-{}", gib(lo), gib(hi)),
        (Some(&lo), _) => gib(lo),
        _ => "-".to_owned(),
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Follows a lifecycle job to its end: a progress bar on stderr (when it is a
/// terminal), the result on stdout. Ctrl-C cancels the job (exit 130).
async fn follow(client: &Client, job: crate::JobStream, json: bool, describe: impl Fn(&Value) -> String) -> anyhow::Result<ExitCode> {
    follow_to(client, job, json, false, describe).await
}

/// [`follow`], with the result on stderr when `to_stderr` (for a job run on
/// the way to another command's output).
async fn follow_to(
    client: &Client,
    mut job: crate::JobStream,
    json: bool,
    to_stderr: bool,
    describe: impl Fn(&Value) -> String,
) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() && !json { Some(ProgressBar::new(0)) } else { None };
    let job_id = job.job_id().to_owned();
    let code = loop {
        let event = tokio::select! {
            e = job.next() => e,
            _ = tokio::signal::ctrl_c() => {
                let _ = client.cancel(&job_id).await;
                if let Some(b) = &bar { b.abandon(); }
                eprintln!("cancelled job {job_id}");
                break ExitCode::from(130);
            }
        };
        let Some(event) = event else { anyhow::bail!(ClientError::Closed) };
        match event?.body {
            EventBody::Progress(p) => {
                if let Some(b) = &bar {
                    if p.stage == "download" && p.total > 0 {
                        b.set_style(
                            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
                                .unwrap_or_else(|_| ProgressStyle::default_bar()),
                        );
                        b.set_length(p.total);
                        b.set_position(p.done);
                        b.set_message("downloading");
                    } else {
                        b.set_style(ProgressStyle::default_spinner());
                        b.enable_steady_tick(Duration::from_millis(120));
                        b.set_message(p.message.unwrap_or(p.stage));
                    }
                } else if !json {
                    if let Some(m) = p.message {
                        eprintln!("{}: {m}", p.stage);
                    }
                }
            }
            EventBody::Done(d) => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                let result = d.result.unwrap_or(Value::Null);
                if json {
                    print_json(&json!({ "job_id": job_id, "stop_reason": d.stop_reason, "result": result }))?;
                } else {
                    let line = if d.stop_reason == rbee_schemas::event::StopReason::Cancelled { "cancelled".to_owned() } else { describe(&result) };
                    if to_stderr {
                        eprintln!("{line}");
                    } else {
                        println!("{line}");
                    }
                }
                break ExitCode::SUCCESS;
            }
            EventBody::Error(e) => {
                if let Some(b) = &bar {
                    b.abandon();
                }
                if json {
                    print_json(&json!({ "job_id": job_id, "error": { "code": e.code, "message": e.message } }))?;
                } else {
                    eprintln!("error: {}: {}", e.code, e.message);
                }
                break ExitCode::from(1);
            }
            _ => {}
        }
    };
    Ok(code)
}

/// What a finished `model.download` says.
fn downloaded(r: &Value) -> String {
    let verb = if r["already_present"].as_bool() == Some(true) { "already on" } else { "downloaded to" };
    format!("{} {verb} hive {} ({}, sha256 {})", field(r, "model"), field(r, "hive"), gib(r["size"].as_u64().unwrap_or(0)), field(r, "sha256"))
}

/// For `rbee infer`: downloads an `hf:` model that no attached hive has
/// (to whichever hive takes the download),
/// progress and result on stderr, then waits until a hive's heartbeat lists
/// it, so the job finds it. `None` when there was nothing to do or it
/// worked; the exit code when the download failed.
pub(super) async fn pull_if_missing(client: &Client, model: &str, hives: &[HiveInfo]) -> anyhow::Result<Option<ExitCode>> {
    let Ok(wanted @ ModelRef::Hf(_)) = ModelRef::parse(model) else { return Ok(None) };
    let key = wanted.to_string();
    let listed = |hs: &[HiveInfo]| hs.iter().any(|h| h.models.iter().any(|m| m.is_present(&wanted, &key)));
    if listed(hives) {
        return Ok(None);
    }
    eprintln!("no hive has {key} yet: downloading it first (--no-pull to fail instead)");
    let req = CtlRequest::ModelDownload { v: PROTOCOL_VERSION, model: key.clone(), alias: None };
    let job = client.submit_ctl(None, &req, None).await?;
    let code = follow_to(client, job, false, true, downloaded).await?;
    if code != ExitCode::SUCCESS {
        return Ok(Some(code));
    }
    // The hive beats as soon as its catalog changed; this is that beat's way here.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !listed(&client.hives().await?) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(None)
}

fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("?")
}

pub async fn models(client: &Client, cmd: ModelsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelsCommand::List { hive, json } => {
            let hives = match &hive {
                Some(h) => vec![client.hive(h).await?],
                None => client.hives().await?,
            };
            let rows: Vec<Value> = hives
                .iter()
                .flat_map(|h| h.models.iter().map(move |m| json!({ "hive": h.hive_id, "model": m })))
                .collect();
            if json {
                return print_json(&rows).map(|_| ExitCode::SUCCESS);
            }
            // Merged: one row per model, the hives that have it.
            let mut merged: BTreeMap<String, (Vec<String>, &rbee_schemas::hive::ModelSummary)> = BTreeMap::new();
            for h in &hives {
                for m in &h.models {
                    let e = merged.entry(m.key.clone()).or_insert_with(|| (vec![], m));
                    e.0.push(if m.present { h.hive_id.clone() } else { format!("{} (file missing)", h.hive_id) });
                }
            }
            if merged.is_empty() {
                println!("no models on {}", hive.as_deref().map_or("any hive".to_owned(), |h| format!("hive {h}")));
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = merged
                .iter()
                .map(|(k, (hs, m))| {
                    let needs = needs(hives.iter().flat_map(|h| h.models.iter().filter(|hm| hm.key == *k).map(|hm| hm.memory)));
                    vec![k.clone(), gib(m.size), needs, m.format.clone(), m.quantization.clone(), m.architecture.clone(), hs.join(", ")]
                })
                .collect();
            println!("{}", table(&["MODEL", "SIZE", "NEEDS", "FORMAT", "QUANT", "ARCH", "HIVES"], &rows));
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Get { model, json } => {
            let parsed = ModelRef::parse(&model).map_err(|e| ClientError::Usage(e.to_string()))?;
            let wanted = parsed.to_string();
            let hives = client.hives().await?;
            let found: Vec<Value> = hives
                .iter()
                .flat_map(|h| {
                    h.models
                        .iter()
                        .filter(|m| m.is_named_by(&parsed, &wanted))
                        .map(move |m| json!({ "hive": h.hive_id, "model": m }))
                })
                .collect();
            if found.is_empty() {
                eprintln!("error: UNKNOWN_MODEL: no hive has {wanted}; download it with: rbee models download {wanted}");
                return Ok(ExitCode::from(1));
            }
            if json {
                return print_json(&found).map(|_| ExitCode::SUCCESS);
            }
            for f in &found {
                let m = &f["model"];
                println!("{} on hive {}", field(m, "key"), field(f, "hive"));
                for k in ["source", "format", "architecture", "quantization", "sha256"] {
                    println!("  {k:<13} {}", field(m, k));
                }
                println!("  {:<13} {}", "size", gib(m["size"].as_u64().unwrap_or(0)));
                println!("  {:<13} {}", "needs", gib(m["memory"].as_u64().unwrap_or(0)));
                println!("  {:<13} {}", "present", m["present"]);
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Download { model, alias, hive, json } => {
            let req = CtlRequest::ModelDownload { v: PROTOCOL_VERSION, model, alias };
            let job = client.submit_ctl(hive.as_deref(), &req, None).await?;
            follow(client, job, json, downloaded).await
        }
        ModelsCommand::Import { path, alias, hive, json } => {
            let hive = match hive {
                Some(h) => h,
                None => only_hive(client).await?,
            };
            let req = CtlRequest::ModelImport { v: PROTOCOL_VERSION, path, alias };
            let job = client.submit_ctl(Some(&hive), &req, None).await?;
            follow(client, job, json, |r| {
                format!("imported {} on hive {} ({} {}, {})", field(r, "model"), field(r, "hive"), field(r, "architecture"), field(r, "quantization"), gib(r["size"].as_u64().unwrap_or(0)))
            })
            .await
        }
        ModelsCommand::Delete { model, hive, force, json } => {
            let targets: Vec<String> = match hive {
                Some(h) => vec![h],
                None => {
                    let parsed = ModelRef::parse(&model).map_err(|e| ClientError::Usage(e.to_string()))?;
                    let wanted = parsed.to_string();
                    let hs: Vec<String> = client
                        .hives()
                        .await?
                        .into_iter()
                        .filter(|h| h.models.iter().any(|m| m.is_named_by(&parsed, &wanted)))
                        .map(|h| h.hive_id)
                        .collect();
                    if hs.is_empty() {
                        eprintln!("error: UNKNOWN_MODEL: no hive has {wanted}");
                        return Ok(ExitCode::from(1));
                    }
                    hs
                }
            };
            let mut code = ExitCode::SUCCESS;
            for h in targets {
                let req = CtlRequest::ModelDelete { v: PROTOCOL_VERSION, model: model.clone(), force };
                let job = client.submit_ctl(Some(&h), &req, None).await?;
                let c = follow(client, job, json, |r| format!("deleted {} from hive {}", field(r, "model"), field(r, "hive"))).await?;
                if c != ExitCode::SUCCESS {
                    code = c;
                }
            }
            Ok(code)
        }
    }
}

async fn only_hive(client: &Client) -> anyhow::Result<String> {
    let hives = client.compatible_hives().await?;
    match hives.as_slice() {
        [one] => Ok(one.hive_id.clone()),
        many => {
            eprintln!(
                "error: several hives are attached ({}); name the one whose machine has the file with --hive",
                many.iter().map(|h| h.hive_id.as_str()).collect::<Vec<_>>().join(", ")
            );
            std::process::exit(2);
        }
    }
}

fn parse_keep_alive(s: &str) -> anyhow::Result<i64> {
    if s.trim() == "-1" {
        return Ok(-1);
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(d.as_millis() as i64),
        Err(e) => {
            eprintln!("error: --keep-alive {s:?}: {e} (use e.g. 30s, 10m, or -1 for never)");
            std::process::exit(2);
        }
    }
}

pub async fn workers(client: &Client, cmd: WorkersCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkersCommand::List { hive, json } => {
            let mut workers = client.workers().await?;
            if let Some(h) = &hive {
                workers.retain(|w| &w.hive == h);
            }
            if json {
                return print_json(&workers).map(|_| ExitCode::SUCCESS);
            }
            if workers.is_empty() {
                println!("no workers");
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = workers
                .iter()
                .map(|w| {
                    vec![
                        w.id.clone(),
                        w.hive.clone(),
                        w.model.clone(),
                        if w.draining { format!("{}, draining", w.state.as_str()) } else { w.state.as_str().to_owned() },
                        if w.slots == 0 { "-".to_owned() } else { w.slots.to_string() },
                        w.pid.to_string(),
                        format!("{}/{}", w.backend, w.device),
                        age(w.started_at_ms),
                        w.jobs_served.to_string(),
                        age(w.last_activity_ms),
                    ]
                })
                .collect();
            println!("{}", table(&["ID", "HIVE", "MODEL", "STATE", "SLOTS", "PID", "DEVICE", "UP", "JOBS", "LAST ACTIVE"], &rows));
            Ok(ExitCode::SUCCESS)
        }
        WorkersCommand::Spawn { model, hive, backend, device, keep_alive, json } => {
            let keep_alive_ms = keep_alive.as_deref().map(parse_keep_alive).transpose()?;
            let backend = backend.map(|b| match b {
                Backend::Cpu => "cpu".to_owned(),
                Backend::Cuda => "cuda".to_owned(),
                Backend::Metal => "metal".to_owned(),
            });
            let req = CtlRequest::WorkerSpawn { v: PROTOCOL_VERSION, model, backend, device, keep_alive_ms };
            let job = client.submit_ctl(hive.as_deref(), &req, None).await?;
            follow(client, job, json, |r| {
                let verb = if r["started"].as_bool() == Some(true) { "started" } else { "already running:" };
                format!("{verb} worker {} for {} on hive {} (pid {})", field(r, "id"), field(r, "model"), field(r, "hive"), r["pid"])
            })
            .await
        }
        WorkersCommand::Stop { id, json } => {
            let workers = client.workers().await?;
            let Some(w) = workers.iter().find(|w| w.id == id) else {
                let known = workers.iter().map(|w| w.id.as_str()).collect::<Vec<_>>().join(", ");
                eprintln!("error: UNKNOWN_WORKER: no worker {id}; workers: {}", if known.is_empty() { "none" } else { &known });
                return Ok(ExitCode::from(1));
            };
            let req = CtlRequest::WorkerStop { v: PROTOCOL_VERSION, worker: id.clone() };
            let job = client.submit_ctl(Some(&w.hive), &req, None).await?;
            follow(client, job, json, |r| format!("stopped worker {} on hive {}", field(r, "worker"), field(r, "hive"))).await
        }
    }
}

pub fn hive_rows(hives: &[HiveInfo]) -> Vec<Vec<String>> {
    hives
        .iter()
        .map(|h| {
            let compat = if h.protocol == PROTOCOL_VERSION { String::new() } else { format!(" (protocol v{}: incompatible)", h.protocol) };
            vec![
                h.hive_id.clone(),
                format!("{}{compat}", h.version),
                match h.gpu_name.as_str() {
                    "" => h.devices.join(","),
                    gpu => format!("{} ({gpu})", h.devices.join(",")),
                },
                format!("{}/{}", h.busy, h.slots),
                format!("{} free of {}", gib(h.ram_free), gib(h.ram_total)),
                if h.vram_total > 0 { format!("{} free of {}", gib(h.vram_free), gib(h.vram_total)) } else { "-".to_owned() },
                match (h.disk_free, h.disk_reserve) {
                    (0, _) => "-".to_owned(),
                    (free, 0) => format!("{} free", gib(free)),
                    (free, kept) => format!("{} free, {} kept", gib(free), gib(kept)),
                },
                if h.memory_limit > 0 { format!("{} of {}", gib(h.memory_used), gib(h.memory_limit)) } else { gib(h.memory_used) },
                h.workers.iter().map(|w| format!("{}({})", w.model, w.state)).collect::<Vec<_>>().join(" "),
                age(h.started_at_ms),
            ]
        })
        .collect()
}

pub const HIVE_HEADER: [&str; 10] = ["HIVE", "VERSION", "DEVICES", "BUSY", "RAM", "VRAM", "DISK", "WORKER MEM", "WORKERS", "UP"];

pub async fn hives(client: &Client, cmd: HivesCommand) -> anyhow::Result<ExitCode> {
    let HivesCommand::List { json } = cmd;
    let hives = client.hives().await?;
    if json {
        return print_json(&hives).map(|_| ExitCode::SUCCESS);
    }
    if hives.is_empty() {
        println!("no hive is attached");
    } else {
        println!("{}", table(&HIVE_HEADER, &hive_rows(&hives)));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn logs(client: &Client, hive: &str, follow: bool, json: bool) -> anyhow::Result<ExitCode> {
    let lines = client.logs(hive, follow).await?;
    futures::pin_mut!(lines);
    let mut any = false;
    while let Some(l) = lines.next().await {
        any = true;
        if json {
            println!("{}", serde_json::to_string(&l)?);
        } else {
            let ts = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(l.ts_ms) * 1_000_000)
                .map(|t| format!("{:02}:{:02}:{:02}.{:03}", t.hour(), t.minute(), t.second(), t.millisecond()))
                .unwrap_or_default();
            let who = l.worker.as_deref().map_or_else(|| l.hive.clone(), |w| format!("{}/{w}", l.hive));
            println!("{ts} {:<5} {who}: {}", l.level, l.message);
        }
    }
    if !any && !follow {
        eprintln!("no log lines from hive {hive} in the last hour");
    }
    Ok(ExitCode::SUCCESS)
}

/// What the bare command lists (`rbee models`, `rbee workers`, `rbee hives`).
impl ModelsCommand {
    pub fn list(json: bool) -> Self {
        ModelsCommand::List { hive: None, json }
    }
}

impl WorkersCommand {
    pub fn list(json: bool) -> Self {
        WorkersCommand::List { hive: None, json }
    }
}

impl HivesCommand {
    pub fn list(json: bool) -> Self {
        HivesCommand::List { json }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_is_one_figure_a_range_or_unknown() {
        assert_eq!(needs([300 << 20, 0, 300 << 20].into_iter()), "300 MiB", "older hives (0) do not count");
        assert_eq!(needs([300 << 20, 2 << 30].into_iter()), "300 MiB-2.0 GiB");
        assert_eq!(needs([0].into_iter()), "-");
    }
}
