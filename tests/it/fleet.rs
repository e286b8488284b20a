//! The fleet over the bus: several hive processes on one broker, lifecycle
//! jobs (downloads against a local hub in the Hugging Face layout, imports,
//! deletes, worker spawn/stop), keep-alive, placement, memory preflight,
//! drains and kills, version refusal, logs.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use rbee_schemas::ctl::CtlRequest;
use rbee_schemas::error::ErrorCode;
use rbee_schemas::event::{Event, EventBody, StopReason};
use rbee_schemas::hive::{HiveInfo, WorkerInfo};
use rbee_schemas::job::InferRequest;
use rbee_schemas::subjects;
use rustix::process::Signal;

use crate::harness::*;
use crate::hub::{Hub, HubFile};

const DEMO_SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Runs the `rbee` CLI against `url`.
async fn cli(url: &str, args: &[&str]) -> Output {
    let mut all = vec!["--nats-url".to_owned(), url.to_owned()];
    all.extend(args.iter().map(|s| s.to_string()));
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_path_buf();
    tokio::task::spawn_blocking(move || Command::new(bin("rbee")).args(&all).env("RBEE_HOME", h).output().expect("run rbee"))
        .await
        .unwrap()
}

fn ok_json(out: &Output) -> serde_json::Value {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("JSON on stdout ({e}): {stdout}"))
}

async fn ctl(client: &rbee::Client, hive: Option<&str>, req: CtlRequest) -> Vec<Event> {
    let mut job = client.submit_ctl(hive, &req, None).await.expect("submit lifecycle job");
    let events = collect(&mut job).await;
    assert_well_formed(&events);
    events
}

fn result(events: &[Event]) -> serde_json::Value {
    match &events.last().expect("events").body {
        EventBody::Done(d) => {
            assert_eq!(d.stop_reason, StopReason::Completed);
            d.result.clone().expect("a result")
        }
        other => panic!("expected done, got {other:?} in {events:?}"),
    }
}

fn error(events: &[Event]) -> (ErrorCode, String) {
    match &events.last().expect("events").body {
        EventBody::Error(e) => (e.code, e.message.clone()),
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn hive_info(client: &rbee::Client, id: &str) -> HiveInfo {
    client.hives().await.unwrap().into_iter().find(|h| h.hive_id == id).expect("hive heartbeats")
}

async fn workers_of(client: &rbee::Client, hive: &str) -> Vec<WorkerInfo> {
    client.workers().await.unwrap().into_iter().filter(|w| w.hive == hive).collect()
}

/// Waits (at most 12 s: two heartbeats) until the hive's heartbeat satisfies `f`.
async fn until_heartbeat(client: &rbee::Client, id: &str, what: &str, f: impl Fn(&HiveInfo) -> bool) -> HiveInfo {
    until_heartbeat_within(client, id, Duration::from_secs(12), what, f).await
}

async fn until_heartbeat_within(client: &rbee::Client, id: &str, within: Duration, what: &str, f: impl Fn(&HiveInfo) -> bool) -> HiveInfo {
    let deadline = std::time::Instant::now() + within;
    loop {
        let h = hive_info(client, id).await;
        if f(&h) {
            return h;
        }
        assert!(std::time::Instant::now() < deadline, "hive {id}: {what}; last heartbeat: {h:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn started(events: &[Event]) -> Vec<rbee_schemas::event::Started> {
    events.iter().filter_map(|e| match &e.body { EventBody::Started(s) => Some(s.clone()), _ => None }).collect()
}

async fn infer(client: &rbee::Client, model: &str, req: InferRequest) -> Vec<Event> {
    let mut job = client.submit(model, req, Default::default()).await.expect("submit");
    let events = collect(&mut job).await;
    assert_well_formed(&events);
    events
}

fn short(max_tokens: i64) -> InferRequest {
    InferRequest { prompt: Some("Hi".into()), max_tokens: Some(max_tokens), temperature: Some(0.0), ..Default::default() }
}

fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.filter_map(Result::ok) {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            out.extend(files_under(&p));
        } else if meta.is_file() {
            out.push((p, meta.len()));
        }
    }
    out
}

/// A broker and one hive that downloads from `hub` into a temporary models
/// directory, and a client.
async fn hive_on_hub(hub: &Hub) -> (Broker, tempfile::TempDir, Hive, rbee::Client) {
    hive_on_hub_with(hub, &[]).await
}

async fn hive_on_hub_with(hub: &Hub, extra: &[&str]) -> (Broker, tempfile::TempDir, Hive, rbee::Client) {
    let broker = Broker::start();
    let models = tempfile::tempdir().unwrap();
    let mut args = vec!["--hf-endpoint".into(), hub.url.clone()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let hive = Hive::start(&broker.url(), HiveOpts { args, models_dir: Some(models.path().to_path_buf()), ..HiveOpts::default() }).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    (broker, models, hive, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_resumes_after_an_interruption_is_verified_registered_and_runs() {
    let (hub, size) = demo_hub().await;
    // Hang up in the 4th 10 MB chunk: the first three are kept.
    hub.interrupt_at(35_000_000);
    let (broker, models, hive, client) = hive_on_hub(&hub).await;

    // Whichever hive takes it (the only one); the file is named by the hub listing.
    let req = CtlRequest::ModelDownload { v: 1, model: "hf:rbee-test/SmolLM2-GGUF".into(), alias: Some("tiny".into()) };
    let events = ctl(&client, None, req).await;
    let r = result(&events);
    assert_eq!(r["model"], "tiny");
    assert_eq!(r["hive"], hive.id.as_str());
    assert_eq!(r["sha256"], DEMO_SHA);
    assert_eq!(r["size"], size);
    assert_eq!(r["architecture"], "llama");
    assert_eq!(r["quantization"], "q4_1");
    assert_eq!(r["source"], "hf:rbee-test/SmolLM2-GGUF:smollm2.Q4_1.gguf");

    // It resumed at the last whole chunk instead of starting over.
    let starts = hub.range_starts("smollm2.Q4_1.gguf");
    assert_eq!(starts.iter().filter(|s| **s == 0).count(), 1, "downloaded from the start once: {starts:?}");
    assert_eq!(starts.iter().filter(|s| **s == 30_000_000).count(), 2, "the cut chunk was asked for again: {starts:?}");
    // The failed try's chunk tasks (hf-hub spawns them all up front) went
    // with its runtime: besides the cut chunk, at most the one that took its
    // place before the runtime stopped came twice (this fixture counts a
    // chunk's bytes as it starts to send them).
    assert!(hub.body_bytes() < size + 20_000_000, "two chunks again at most: {} of {size}", hub.body_bytes());

    // Progress events carried bytes done and in all, rising to the size.
    let progress: Vec<_> = events.iter().filter_map(|e| match &e.body { EventBody::Progress(p) => Some(p.clone()), _ => None }).collect();
    assert!(!progress.is_empty(), "progress events");
    assert!(progress.iter().all(|p| p.stage == "download" && p.total == size && p.done <= size), "{progress:?}");
    assert_eq!(progress.last().unwrap().done, size);

    // Registered: listed by the CLI (from the heartbeat, which the hive
    // sends at once when its catalog changes, not at the next 5 s beat), and it runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !hive_info(&client, &hive.id).await.models.iter().any(|m| m.key == "tiny" && m.present) {
        assert!(std::time::Instant::now() < deadline, "the heartbeat did not list tiny within 2 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = ok_json(&cli(&broker.url(), &["models", "list", "--json"]).await);
    let row = listed.as_array().unwrap().iter().find(|r| r["model"]["key"] == "tiny").expect("tiny listed");
    assert_eq!(row["hive"], hive.id.as_str());
    assert_eq!(row["model"]["size"], size);
    // What a worker for it needs here, as placement counts it: the weights
    // (Q4_1 is held as it is), a tenth for activations, 64 MiB for the
    // process, and its one slot's KV cache at 4,096 tokens of 23,040 bytes.
    let needs = size + size / 10 + (64 << 20) + 4096 * 23_040;
    assert_eq!(row["model"]["memory"], needs);
    assert_eq!(row["model"]["sha256"], DEMO_SHA);
    let table = cli(&broker.url(), &["models", "list"]).await;
    let text = String::from_utf8_lossy(&table.stdout);
    let line = text.lines().find(|l| l.starts_with("tiny")).expect("tiny in the table");
    assert!(text.contains("NEEDS") && line.contains(&format!("{:.0} MiB", needs as f64 / f64::from(1u32 << 20))), "{text}");
    let events = infer(&client, "tiny", short(4)).await;
    assert!(matches!(events.last().unwrap().body, EventBody::Done(_)), "{events:?}");

    // Downloading it again finds it present and fetches nothing.
    let served = hub.body_bytes();
    let again = ok_json(&cli(&broker.url(), &["models", "download", "hf:rbee-test/SmolLM2-GGUF:smollm2.Q4_1.gguf", "--alias", "tiny", "--json"]).await);
    assert_eq!(again["result"]["already_present"], true);
    assert_eq!(hub.body_bytes(), served);

    // In use: refused; with --force the worker stops and the downloaded file goes.
    let refused = cli(&broker.url(), &["models", "delete", "tiny", "--hive", &hive.id]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("MODEL_IN_USE"), "{refused:?}");
    // The repo alone names it too, in the CLI as in jobs (it was downloaded under an alias).
    let got = ok_json(&cli(&broker.url(), &["models", "get", "hf:rbee-test/SmolLM2-GGUF", "--json"]).await);
    assert_eq!(got[0]["model"]["key"], "tiny", "{got}");
    let deleted = ok_json(&cli(&broker.url(), &["models", "delete", "hf:rbee-test/SmolLM2-GGUF", "--force", "--json"]).await);
    assert_eq!(deleted["result"]["model"], "tiny");
    assert_eq!(deleted["result"]["file_removed"], true);
    eventually(Duration::from_secs(10), "the worker stopped", || hive.worker_pids().is_empty()).await;
    assert!(files_under(&models.path().join("hf")).iter().all(|(_, len)| *len < 1_000_000), "no model file left");
}

/// A hub that serves the demo model as `hf:rbee-test/SmolLM2-GGUF`
/// (`smollm2.Q4_1.gguf`), and its size.
async fn demo_hub() -> (Hub, u64) {
    let demo = Arc::new(std::fs::read(demo_model_path()).expect("the demo model (scripts/fetch-demo-model.sh)"));
    let size = demo.len() as u64;
    let hub = Hub::start(vec![HubFile { repo: "rbee-test/SmolLM2-GGUF".into(), name: "smollm2.Q4_1.gguf".into(), bytes: demo, corrupt: false }]).await;
    (hub, size)
}

/// One heartbeat, as if from hive `id` (otherwise `like`), with `disk_free`
/// bytes free and no reserve: a hive the others see and that takes no jobs,
/// for 15 s. Returns the hives bucket, once the CLI's view lists it.
async fn beat_as_hive_with_disk(broker: &Broker, client: &rbee::Client, like: &HiveInfo, id: &str, disk_free: u64) -> async_nats::jetstream::kv::Store {
    let mut ghost = like.clone();
    ghost.hive_id = id.into();
    (ghost.disk_free, ghost.disk_reserve) = (disk_free, 0);
    ghost.updated_at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let js = async_nats::jetstream::new(broker.client().await);
    let (hives, _, _) = rbee_broker::ensure_memory_buckets(&js).await.unwrap();
    hives.put(id, serde_json::to_vec(&ghost).unwrap().into()).await.unwrap();
    while !client.hives().await.unwrap().iter().any(|h| h.hive_id == id) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hives
}

/// A download that would leave less than the hive's `--disk-reserve` free
/// fails `INSUFFICIENT_DISK`, saying what to do, before it fetches anything
/// (how much is left once the hub has said the size: a unit test). One sent
/// to `any` goes to a hive with more free disk instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_that_would_leave_too_little_disk_fails_or_goes_where_there_is_room() {
    let (hub, _) = demo_hub().await;
    let (broker, models, full, client) = hive_on_hub_with(&hub, &["--disk-reserve", "1000TiB"]).await;
    let req = CtlRequest::ModelDownload { v: 1, model: "hf:rbee-test/SmolLM2-GGUF".into(), alias: Some("tiny".into()) };
    let (code, message) = error(&ctl(&client, Some(&full.id), req.clone()).await);
    assert_eq!(code, ErrorCode::InsufficientDisk);
    assert!(message.contains("(--disk-reserve)") && message.contains("rbee models delete"), "{message}");
    assert_eq!(hub.body_bytes(), 0, "nothing fetched");
    assert!(files_under(models.path()).is_empty(), "nothing written");
    assert!(hive_info(&client, &full.id).await.disk_free > 0, "the heartbeat carries the disk's free space");

    // Sent to `any`: the hive with room takes it, whichever hive is offered it first.
    let roomy_models = tempfile::tempdir().unwrap();
    let args = vec!["--hf-endpoint".into(), hub.url.clone()];
    let roomy = Hive::start(&broker.url(), HiveOpts { args, models_dir: Some(roomy_models.path().to_path_buf()), ..HiveOpts::default() }).await;
    until_heartbeat(&client, &roomy.id, "reports its free disk", |h| h.disk_free > 0).await;
    let done = result(&ctl(&client, None, req).await);
    assert_eq!(done["hive"], roomy.id.as_str());
    assert!(files_under(models.path()).is_empty(), "nothing written on the full hive");
    let listed = cli(&broker.url(), &["hives", "list"]).await;
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(table.contains("DISK") && table.contains(" kept"), "free disk and the reserve: {table}");

    // A model the full hive already has needs no disk: it answers the
    // download itself, though a hive with more free disk is beating.
    drop(roomy);
    let path = demo_model_path().display().to_string();
    ok_json(&cli(&broker.url(), &["models", "import", &path, "--alias", "tiny", "--hive", &full.id, "--json"]).await);
    let like = hive_info(&client, &full.id).await;
    let hives = beat_as_hive_with_disk(&broker, &client, &like, "roomier", like.disk_free.max(1).saturating_mul(1000)).await;
    let answered = tokio::time::timeout(Duration::from_secs(5), ctl(&client, None, CtlRequest::ModelDownload { v: 1, model: "hf:rbee-test/SmolLM2-GGUF".into(), alias: Some("tiny".into()) }))
        .await
        .expect("the full hive answers a download it needs no disk for, instead of leaving it");
    let present = result(&answered);
    assert_eq!((present["hive"].as_str(), present["already_present"].as_bool()), (Some(full.id.as_str()), Some(true)), "{present}");
    hives.delete("roomier").await.unwrap();
    assert_queue_drains(&broker.client().await).await;
}

/// A download whose file turns out bigger than its hive's room (free disk
/// above `--disk-reserve`, known only once the hub gave the size) fails
/// `INSUFFICIENT_DISK` when sent to that hive; sent to `any`, it goes back to
/// the queue for a hive with room, which takes it over, and the first hive
/// leaves it from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_any_download_too_big_for_its_hive_goes_back_to_a_hive_with_room() {
    let (hub, size) = demo_hub().await;
    // Slow enough that the hive's first room check (250 ms) comes before the bytes.
    hub.slow(Duration::from_millis(500));
    let broker = Broker::start();
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let small_models = tempfile::tempdir().unwrap();
    let free = (size / 2).to_string();
    let args = ["--hf-endpoint", hub.url.as_str(), "--disk-reserve", "0", "--test-disk-free", free.as_str()].map(String::from).to_vec();
    let small = Hive::start(&broker.url(), HiveOpts { args, models_dir: Some(small_models.path().to_path_buf()), ..HiveOpts::default() }).await;
    let info = until_heartbeat(&client, &small.id, "reports its disk and reserve", |h| h.disk_free == size / 2).await;
    assert_eq!((info.disk_reserve, info.disk_room()), (0, size / 2));
    let req = CtlRequest::ModelDownload { v: 1, model: "hf:rbee-test/SmolLM2-GGUF".into(), alias: Some("tiny".into()) };
    // Sent to it by name: it fails once the hub has said the size.
    let (code, message) = error(&ctl(&client, Some(&small.id), req.clone()).await);
    assert_eq!(code, ErrorCode::InsufficientDisk);
    assert!(message.contains("the download needs 93.8 MiB more") && message.contains("46.9 MiB free"), "{message}");
    // That one keeps its part file, for a resume once there is room.
    let parts = || files_under(small_models.path()).into_iter().filter(|(p, _)| p.to_string_lossy().ends_with(".sync.part")).count();
    assert_eq!(parts(), 1);

    // A hive with room that takes no jobs yet, so the small hive runs the
    // download first, finds the file too big and hands it back.
    beat_as_hive_with_disk(&broker, &client, &info, "roomy-soon", 1 << 40).await;
    let mut job = client.submit_ctl(None, &req, None).await.expect("submit the download");
    eventually(Duration::from_secs(20), "the small hive hands the download back", || small.log().contains("handing the download back")).await;
    // The part it wrote is no use to it now, and takes disk it is short of.
    eventually(Duration::from_secs(10), "the small hive deletes its part file", || small.log().contains("deleted the unfinished download's part file")).await;
    assert_eq!(parts(), 0);
    eventually(Duration::from_secs(10), "the small hive leaves it when it comes back", || small.log().contains("the file is")).await;

    // A real hive with room: it takes the job over and downloads the file.
    let roomy_models = tempfile::tempdir().unwrap();
    let args = vec!["--hf-endpoint".into(), hub.url.clone()];
    let roomy = Hive::start(&broker.url(), HiveOpts { args, models_dir: Some(roomy_models.path().to_path_buf()), ..HiveOpts::default() }).await;
    let events = collect(&mut job).await;
    assert_well_formed(&events);
    let done = result(&events);
    assert_eq!((done["hive"].as_str(), done["size"].as_u64()), (Some(roomy.id.as_str()), Some(size)), "{done}");
    assert!(hive_info(&client, &small.id).await.models.is_empty(), "nothing registered on the small hive");
    assert_queue_drains(&broker.client().await).await;
}

/// `rbee infer` with an `hf:` model that no hive has downloads it first
/// (progress and result on stderr, only the answer on stdout), then runs it;
/// the next time there is nothing to download. `--no-pull` fails as the
/// hive does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbee_infer_downloads_an_hf_model_no_hive_has_then_runs_it() {
    let (hub, size) = demo_hub().await;
    let (broker, _models, hive, _client) = hive_on_hub(&hub).await;
    let infer = |model: &'static str, pull: bool| {
        let url = broker.url();
        async move {
            let mut args = vec!["infer", "--model", model, "--max-tokens", "4", "--temperature", "0", "Hi"];
            if !pull {
                args.insert(1, "--no-pull");
            }
            let out = cli(&url, &args).await;
            (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    let model = "hf:rbee-test/SmolLM2-GGUF";

    let (code, _, stderr) = infer(model, false).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("MODEL_SOURCE_UNREACHABLE") && stderr.contains("rbee models download"), "{stderr}");
    assert_eq!(hub.body_bytes(), 0);

    let (code, stdout, stderr) = infer(model, true).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("downloading it first") && stderr.contains(&format!("downloaded to hive {}", hive.id)), "{stderr}");
    assert!(!stdout.trim().is_empty() && !stdout.contains("downloaded"), "the answer alone on stdout: {stdout:?}");
    let served = hub.body_bytes();
    assert!(served >= size, "{served} of {size}");

    // Present now, by the bare repo and by the full reference: nothing to download.
    for m in [model, "hf:rbee-test/SmolLM2-GGUF:smollm2.Q4_1.gguf"] {
        let (code, stdout, stderr) = infer(m, true).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert!(!stderr.contains("downloading"), "{stderr}");
        assert!(!stdout.trim().is_empty());
    }
    assert_eq!(hub.body_bytes(), served);
    // The refused job, the download and the three answered jobs all left the queue.
    assert_queue_drains(&broker.client().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_missing_and_unreachable_downloads_fail_clearly_and_register_nothing() {
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let hub = Hub::start(vec![HubFile { repo: "rbee-test/broken".into(), name: "model.gguf".into(), bytes: Arc::new(bytes), corrupt: true }]).await;
    let broker = Broker::start();
    let models = tempfile::tempdir().unwrap();
    let online = Hive::start(
        &broker.url(),
        HiveOpts { args: vec!["--hf-endpoint".into(), hub.url.clone()], models_dir: Some(models.path().to_path_buf()), ..HiveOpts::default() },
    )
    .await;
    // Port 9 (discard) is closed here: the hub is unreachable from this hive.
    let offline = Hive::start(
        &broker.url(),
        HiveOpts { args: vec!["--hf-endpoint".into(), "http://127.0.0.1:9".into()], models_dir: Some(models.path().join("offline")), ..HiveOpts::default() },
    )
    .await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();

    let req = CtlRequest::ModelDownload { v: 1, model: "hf:rbee-test/broken:model.gguf".into(), alias: Some("broken".into()) };
    let (code, message) = error(&ctl(&client, Some(&online.id), req).await);
    assert_eq!(code, ErrorCode::ModelVerificationFailed, "{message}");
    assert!(message.contains("sha256"), "{message}");
    assert!(files_under(&models.path().join("hf")).iter().all(|(_, len)| *len < 1_000_000), "the bad file is gone");

    let req = CtlRequest::ModelDownload { v: 1, model: "hf:rbee-test/broken:nope.gguf".into(), alias: None };
    let (code, message) = error(&ctl(&client, Some(&online.id), req).await);
    assert_eq!(code, ErrorCode::UnknownModel, "{message}");

    let out = cli(&broker.url(), &["models", "download", "hf:rbee-test/broken:model.gguf", "--hive", &offline.id]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MODEL_SOURCE_UNREACHABLE") && stderr.contains("rbee models import"), "{stderr}");

    // Nothing was registered anywhere.
    tokio::time::sleep(Duration::from_secs(6)).await; // a heartbeat
    for h in client.hives().await.unwrap() {
        assert!(h.models.iter().all(|m| m.key != "broken"), "{:?}", h.models);
    }
    // Lifecycle jobs leave no message behind.
    assert_queue_drains(&broker.client().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_download_stops_fetching() {
    // Six 10 MB chunks, 300 ms each: hf-hub asks for them one after another.
    let bytes: Vec<u8> = (0..60_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let file = HubFile { repo: "rbee-test/big".into(), name: "model.gguf".into(), bytes: Arc::new(bytes), corrupt: false };
    let hub = Hub::start(vec![file]).await;
    hub.slow(Duration::from_millis(300));
    let (broker, _models, hive, client) = hive_on_hub(&hub).await;
    let req = CtlRequest::ModelDownload { v: 1, model: "hf:rbee-test/big:model.gguf".into(), alias: Some("big".into()) };
    let mut job = client.submit_ctl(Some(&hive.id), &req, None).await.unwrap();
    eventually(Duration::from_secs(10), "the download started", || !hub.range_starts("model.gguf").is_empty()).await;
    client.cancel(job.job_id()).await.unwrap();
    let events = collect(&mut job).await;
    assert_well_formed(&events);
    match &events.last().unwrap().body {
        EventBody::Done(d) => assert_eq!(d.stop_reason, StopReason::Cancelled),
        other => panic!("{other:?}"),
    }
    // hf-hub spawns a task per chunk up front; left running, they would go
    // on to fetch the whole file after the job ended.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = hub.range_starts("model.gguf");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(hub.range_starts("model.gguf"), asked, "chunks asked for after the cancel");
    assert!(asked.len() < 6, "{asked:?}");
    assert_queue_drains(&broker.client().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_get_spawn_and_stop_across_two_hives() {
    let broker = Broker::start();
    let a = Hive::start(&broker.url(), HiveOpts::default()).await;
    let b = Hive::start(&broker.url(), HiveOpts::default()).await;
    let url = broker.url();
    let client = rbee::Client::connect(&url).await.unwrap();

    // Import the demo file on b under a new alias; its GGUF header says what it is.
    let path = demo_model_path().display().to_string();
    let imported = ok_json(&cli(&url, &["models", "import", &path, "--alias", "smol-local", "--hive", &b.id, "--json"]).await);
    assert_eq!(imported["result"]["architecture"], "llama");
    assert_eq!(imported["result"]["quantization"], "q4_1");
    assert_eq!(imported["result"]["sha256"], DEMO_SHA);
    until_heartbeat(&client, &b.id, "lists smol-local", |h| h.models.iter().any(|m| m.key == "smol-local")).await;
    let got = ok_json(&cli(&url, &["models", "get", "smol-local", "--json"]).await);
    assert_eq!(got.as_array().unwrap().len(), 1);
    assert_eq!(got[0]["hive"], b.id.as_str());
    // Importing without --hive is ambiguous with two hives: a usage error.
    assert_eq!(cli(&url, &["models", "import", &path, "--alias", "x"]).await.status.code(), Some(2));

    // Spawn one worker per hive; both listed with their hive, pid and state.
    let wa = ok_json(&cli(&url, &["workers", "spawn", "smollm2-135m", "--hive", &a.id, "--json"]).await);
    let wb = ok_json(&cli(&url, &["workers", "spawn", "smol-local", "--hive", &b.id, "--json"]).await);
    assert_eq!(wa["result"]["started"], true);
    assert_eq!(wa["result"]["state"], "ready");
    assert_eq!(wb["result"]["hive"], b.id.as_str());
    let listed = ok_json(&cli(&url, &["workers", "list", "--json"]).await);
    let ids: BTreeSet<(String, String)> =
        listed.as_array().unwrap().iter().map(|w| (w["hive"].as_str().unwrap().to_owned(), w["model"].as_str().unwrap().to_owned())).collect();
    assert!(ids.contains(&(a.id.clone(), "smollm2-135m".to_owned())) && ids.contains(&(b.id.clone(), "smol-local".to_owned())), "{listed}");
    assert_eq!(a.worker_pids().len(), 1);
    assert_eq!(b.worker_pids().len(), 1);
    // Spawning again reuses it.
    let again = ok_json(&cli(&url, &["workers", "spawn", "smollm2-135m", "--hive", &a.id, "--json"]).await);
    assert_eq!(again["result"]["started"], false);
    assert_eq!(a.worker_pids().len(), 1);

    // A job for the pre-warmed model starts warm.
    let events = infer(&client, "smollm2-135m", short(3)).await;
    let s = &started(&events)[0];
    assert_eq!((s.hive.as_str(), s.cold), (a.id.as_str(), false));

    // Stop by id (the CLI finds the hive); unknown ids are refused.
    let id = wa["result"]["id"].as_str().unwrap().to_owned();
    let stopped = ok_json(&cli(&url, &["workers", "stop", &id, "--json"]).await);
    assert_eq!(stopped["result"]["worker"], id.as_str());
    eventually(Duration::from_secs(10), "a's worker exits", || a.worker_pids().is_empty()).await;
    assert!(workers_of(&client, &a.id).await.is_empty());
    let unknown = cli(&url, &["workers", "stop", "no-such-worker"]).await;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("UNKNOWN_WORKER"));

    // The fleet at a glance, and the hives' logs over the bus.
    let hives = ok_json(&cli(&url, &["hives", "list", "--json"]).await);
    assert_eq!(hives.as_array().unwrap().len(), 2);
    for h in hives.as_array().unwrap() {
        assert_eq!(h["protocol"], rbee_schemas::PROTOCOL_VERSION);
        assert!(h["ram_total"].as_u64().unwrap() > 0, "{h}");
    }
    let status = cli(&url, &["status"]).await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&a.id) && text.contains(&b.id) && text.contains("RAM"), "{text}");
    let logs = cli(&url, &["logs", "--hive", &b.id]).await;
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains("hive ready"), "{text}");
    assert!(text.contains("model imported"), "{text}");
    assert!(text.contains(&format!("{}/{}-w", b.id, b.id)), "worker lines: {text}");
}

/// `rbee workers` right after a job says `ready`, as a script that runs
/// `rbee infer` then `rbee workers` expects: a worker whose last job ended is
/// written to the registry at once, not at the next 250 ms tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_listed_ready_right_after_its_last_job() {
    let broker = Broker::start();
    let hive = noop_hive(&broker.url(), 1, "40ms", &[]).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    for round in 0..3 {
        // 400 ms of tokens: a tick writes the worker busy during the job.
        let events = infer(&client, "noop", short(10)).await;
        assert!(matches!(events.last().map(|e| &e.body), Some(EventBody::Done(_))), "{events:?}");
        let listed = ok_json(&cli(&broker.url(), &["workers", "list", "--json"]).await);
        let states: Vec<&str> = listed.as_array().unwrap().iter().map(|w| w["state"].as_str().unwrap()).collect();
        assert_eq!(states, ["ready"], "round {round}: {listed}");
    }
    assert_eq!(hive.worker_pids().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_for_an_unserved_model_cold_starts_once_and_warm_workers_share_the_load() {
    let broker = Broker::start();
    // No scale-out: on a slow machine the burst could wait long enough for one.
    let a = noop_hive(&broker.url(), 2, "20ms", &["--scale-out-after", "0s"]).await;
    let b = noop_hive(&broker.url(), 2, "20ms", &["--scale-out-after", "0s"]).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();

    // 20 jobs at once for a model no worker serves: exactly one worker starts in the fleet.
    let mut jobs = Vec::new();
    for _ in 0..20 {
        jobs.push(client.submit("noop", short(3), Default::default()).await.unwrap());
    }
    let mut all = Vec::new();
    for j in &mut jobs {
        all.push(collect(j).await);
    }
    let starts: Vec<_> = all.iter().flat_map(|e| started(e)).collect();
    assert_eq!(starts.len(), 20);
    // One worker started in the fleet; the jobs that waited for it (at most
    // the slots of its hive) report a cold start, every later one a warm one.
    let workers: BTreeSet<_> = starts.iter().map(|s| s.worker.clone()).collect();
    assert_eq!(workers.len(), 1, "{workers:?}");
    let cold = starts.iter().filter(|s| s.cold).count();
    assert!((1..=2).contains(&cold), "{starts:?}");
    assert_eq!(a.worker_pids().len() + b.worker_pids().len(), 1);

    // With a warm worker on each hive, jobs spread over both.
    let other = if a.worker_pids().is_empty() { &a } else { &b };
    let spawned = ctl(&client, Some(&other.id), CtlRequest::WorkerSpawn { v: 1, model: "noop".into(), backend: None, device: None, keep_alive_ms: None }).await;
    assert_eq!(result(&spawned)["started"], true);
    let mut jobs = Vec::new();
    for _ in 0..20 {
        jobs.push(client.submit("noop", short(10), Default::default()).await.unwrap());
    }
    let mut hives = BTreeSet::new();
    for j in &mut jobs {
        let events = collect(j).await;
        let s = &started(&events)[0];
        assert!(!s.cold, "{s:?}");
        hives.insert(s.hive.clone());
    }
    assert_eq!(hives.len(), 2, "both hives served: {hives:?}");
    assert_queue_drains(&broker.client().await).await;
}

/// How many times `hive` left job `job_id` for another hive (its debug log).
fn times_left(hive: &Hive, job_id: &str) -> usize {
    let span = format!("job_id={job_id}");
    hive.log().lines().filter(|l| l.contains(&span) && l.contains("leaving the job for another hive")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_another_hives_worker_passes_each_hive_without_it_once_at_most() {
    // Every hive pulls from the same consumer, and nats-server 2.9 fills the
    // oldest waiting pull request until its batch is used up: a hive that
    // left a job while asking for 4 got the same job back up to 4 times.
    let broker = Broker::start();
    let serving = noop_hive(&broker.url(), 4, "1ms", &[]).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    // Alone, it starts the worker and takes the model's lease.
    let events = infer(&client, "noop", short(2)).await;
    assert!(started(&events)[0].cold);
    let others = [noop_hive(&broker.url(), 4, "1ms", &[]).await, noop_hive(&broker.url(), 4, "1ms", &[]).await];

    // The first jobs may meet requests asked before any job was left.
    for _ in 0..3 {
        let events = infer(&client, "noop", short(2)).await;
        assert_eq!(started(&events)[0].hive, serving.id);
    }
    let mut left = Vec::new();
    for _ in 0..12 {
        let mut job = client.submit("noop", short(2), Default::default()).await.unwrap();
        let events = collect(&mut job).await;
        let s = &started(&events)[0];
        assert_eq!((s.hive.as_str(), s.cold), (serving.id.as_str(), false), "{events:?}");
        assert_well_formed(&events);
        left.push(others.iter().map(|h| times_left(h, job.job_id())).collect::<Vec<_>>());
    }
    assert!(left.iter().flatten().all(|&n| n <= 1), "times each job was left, per hive without the worker: {left:?}");
    // It is pulled by the other hives at all (else this test shows nothing).
    assert!(left.iter().flatten().any(|&n| n == 1), "{left:?}");
    assert_queue_drains(&broker.client().await).await;
}

/// A hive serving `noop` with one slot at 50 ms a token (its first job
/// cold-started the worker), which never scales out itself.
async fn busy_noop_hive(broker: &Broker) -> (Hive, rbee::Client) {
    let serving = noop_hive(&broker.url(), 1, "50ms", &["--scale-out-after", "0s"]).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let events = infer(&client, "noop", short(1)).await;
    assert_eq!((started(&events)[0].hive.as_str(), started(&events)[0].cold), (serving.id.as_str(), true));
    (serving, client)
}

/// Twelve 4-token `noop` jobs at once: ~2.4 s of work for one slot.
async fn noop_backlog(client: &rbee::Client) -> Vec<rbee::JobStream> {
    let mut jobs = Vec::new();
    for _ in 0..12 {
        jobs.push(client.submit("noop", short(4), Default::default()).await.unwrap());
    }
    jobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_for_a_busy_hive_starts_one_more_worker_on_another() {
    let broker = Broker::start();
    let (serving, client) = busy_noop_hive(&broker).await;
    let other = noop_hive(&broker.url(), 1, "50ms", &["--scale-out-after", "500ms"]).await;
    let third = noop_hive(&broker.url(), 1, "50ms", &["--scale-out-after", "500ms"]).await;

    let mut jobs = noop_backlog(&client).await;
    let mut by_hive: BTreeMap<String, usize> = BTreeMap::new();
    for j in &mut jobs {
        let events = collect(j).await;
        assert_well_formed(&events);
        let s = &started(&events)[0];
        // Jobs wait for the new worker elsewhere, never on it while it loads.
        assert!(!s.cold, "{s:?}");
        *by_hive.entry(s.hive.clone()).or_default() += 1;
    }
    // Exactly one of the two idle hives started a worker (the scale-out
    // lease), and it took part of the backlog.
    let scaled: Vec<&Hive> = [&other, &third].into_iter().filter(|h| !h.worker_pids().is_empty()).collect();
    assert_eq!(scaled.len(), 1, "jobs per hive: {by_hive:?}");
    assert!(by_hive.get(&scaled[0].id).is_some_and(|&n| n > 0), "jobs per hive: {by_hive:?}");
    assert!(scaled[0].log().contains("starting a worker here too"));
    assert_eq!(serving.worker_pids().len(), 1);
    assert_queue_drains(&broker.client().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_out_worker_that_cannot_start_leaves_the_backlog_to_the_serving_hive() {
    let broker = Broker::start();
    let (serving, client) = busy_noop_hive(&broker).await;
    // This hive's workers exit at once, before they are ready.
    let broken = noop_hive(&broker.url(), 1, "50ms", &["--scale-out-after", "300ms", "--worker-bin", "/bin/false"]).await;

    let mut jobs = noop_backlog(&client).await;
    for j in &mut jobs {
        let events = collect(j).await;
        assert_well_formed(&events);
        assert!(matches!(events.last().unwrap().body, EventBody::Done(_)), "{events:?}");
        let s = &started(&events)[0];
        assert_eq!((s.hive.as_str(), s.cold), (serving.id.as_str(), false), "{s:?}");
    }
    let log = broken.log();
    assert!(log.contains("scale-out worker failed to start"), "{log}");
    // One try per scale-out lease (15 s), not one per job it left.
    assert_eq!(log.matches("starting a worker here too").count(), 1, "{log}");
    assert!(broken.worker_pids().is_empty());
    assert_eq!(serving.worker_pids().len(), 1);
    assert_queue_drains(&broker.client().await).await;
}

/// A scale-out worker still starting does not take the model's cold-start
/// lease from the hive that serves it, though its hive beats as it starts:
/// had it, and had the worker then failed, that hive would cold-start the
/// model's next jobs itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_scale_out_worker_leaves_the_lease_with_the_serving_hive() {
    let broker = Broker::start();
    let (serving, client) = busy_noop_hive(&broker).await;
    let dir = tempfile::tempdir().unwrap();
    let slow = slow_worker_bin(dir.path());
    let other = noop_hive(&broker.url(), 1, "50ms", &["--scale-out-after", "300ms", "--worker-bin", &slow]).await;
    let (_, _, leases) = rbee_broker::ensure_memory_buckets(&async_nats::jetstream::new(broker.client().await)).await.unwrap();

    let mut jobs = noop_backlog(&client).await;
    until_heartbeat(&client, &other.id, "beats as its scale-out worker starts", |h| h.memory_pending > 0).await;
    // The lease would be written right after that heartbeat.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let holder = leases.get(subjects::cold_start_lease_key("noop")).await.unwrap().expect("the lease");
    assert_eq!(String::from_utf8_lossy(&holder), serving.id, "the serving hive keeps the lease");
    for j in &mut jobs {
        let events = collect(j).await;
        assert!(matches!(events.last().unwrap().body, EventBody::Done(_)), "{events:?}");
    }
    assert_queue_drains(&broker.client().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_exit_after_their_keep_alive() {
    let broker = Broker::start();
    let hive = noop_hive(&broker.url(), 1, "0ms", &["--keep-alive", "1s"]).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let events = infer(&client, "noop", short(2)).await;
    assert!(started(&events)[0].cold);
    assert_eq!(hive.worker_pids().len(), 1);
    eventually(Duration::from_secs(6), "the idle worker exits after 1 s", || hive.worker_pids().is_empty()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !workers_of(&client, &hive.id).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the exited worker leaves the registry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The next job cold-starts; one that asks for a longer keep-alive keeps its worker.
    let req = InferRequest { keep_alive_ms: Some(60_000), ..short(2) };
    let events = infer(&client, "noop", req).await;
    assert!(started(&events)[0].cold);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(hive.worker_pids().len(), 1, "keep_alive_ms of the job wins");
    let w = &workers_of(&client, &hive.id).await[0];
    assert_eq!(w.keep_alive_ms, 60_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_too_big_for_every_hive_fails_with_insufficient_memory() {
    let broker = Broker::start();
    let _hive = Hive::start(&broker.url(), HiveOpts { args: vec!["--memory-limit".into(), "50MB".into()], ..HiveOpts::default() }).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let events = infer(&client, "smollm2-135m", short(2)).await;
    let (code, message) = error(&events);
    assert_eq!(code, ErrorCode::InsufficientMemory);
    assert!(message.contains("needs about") && message.contains("available") && message.contains("limit"), "{message}");
    assert!(started(&events).is_empty());
    assert_queue_drains(&broker.client().await).await;
}

/// What the demo model's worker is estimated to take (its registry entry) on
/// a hive with 2 slots, from one without a memory limit that then stops
/// cleanly: its heartbeat key and its lease on the model go with it, so the
/// next hive takes the model's jobs at once.
async fn demo_worker_memory(broker: &Broker, client: &rbee::Client) -> u64 {
    let mut probe = noop_hive(&broker.url(), 2, "0ms", &[]).await;
    let events = infer(client, "smollm2-135m", short(1)).await;
    assert!(matches!(events.last().map(|e| &e.body), Some(EventBody::Done(_))), "{events:?}");
    let worker = workers_of(client, &probe.id).await.into_iter().find(|w| w.model == "smollm2-135m").expect("the demo model's worker");
    probe.signal(Signal::TERM);
    assert_eq!(probe.wait(Duration::from_secs(30)), Some(0));
    let js = async_nats::jetstream::new(broker.client().await);
    let leases = js.get_key_value(subjects::LEASES_BUCKET).await.unwrap();
    let lease = leases.get(subjects::cold_start_lease_key("smollm2-135m")).await.unwrap();
    assert_eq!(lease, None, "a hive that stops gives up its models' leases");
    assert!(worker.memory > 64 << 20, "{worker:?}");
    worker.memory
}

/// A broker, a client and a hive (2 slots, a no-op token every `delay`)
/// with room for the demo model's worker or the no-op model's (64 MiB), not
/// both.
async fn hive_with_room_for_one_model(delay: &str, extra: &[&str]) -> (Broker, rbee::Client, Hive) {
    let broker = Broker::start();
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let limit = (demo_worker_memory(&broker, &client).await + (32 << 20)).to_string();
    let args: Vec<&str> = ["--memory-limit", &limit].into_iter().chain(extra.iter().copied()).collect();
    let hive = noop_hive(&broker.url(), 2, delay, &args).await;
    (broker, client, hive)
}

/// Runs a job in the background, once `hive` has started a worker for it.
async fn infer_in_background(client: &rbee::Client, hive: &Hive, model: &'static str, req: InferRequest) -> tokio::task::JoinHandle<Vec<Event>> {
    let job = {
        let client = client.clone();
        tokio::spawn(async move { infer(&client, model, req).await })
    };
    eventually(Duration::from_secs(10), "the background job's worker starts", || !hive.worker_pids().is_empty()).await;
    job
}

fn done(events: &[Event]) -> bool {
    matches!(events.last().map(|e| &e.body), Some(EventBody::Done(d)) if d.stop_reason != StopReason::Cancelled)
}

/// A hive with room for one model at a time. An idle worker is stopped to make room
/// for another model's job, least recently used first; one with keep-alive -1
/// is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_makes_room_for_another_model_unless_its_keep_alive_is_never() {
    let (broker, client, hive) = hive_with_room_for_one_model("0ms", &[]).await;

    assert!(done(&infer(&client, "noop", short(2)).await));
    let noop_pid = hive.worker_pids();
    assert_eq!(noop_pid.len(), 1);
    let events = infer(&client, "smollm2-135m", short(2)).await;
    assert!(done(&events), "{events:?}");
    assert!(started(&events)[0].cold);
    let pids = hive.worker_pids();
    assert_eq!(pids.len(), 1, "the no-op worker made room");
    assert_ne!(pids, noop_pid);
    assert!(hive.log().contains("stopping an idle worker to make room for smollm2-135m"), "{}", hive.log());
    // And back: the demo model's worker makes room for the no-op model.
    assert!(done(&infer(&client, "noop", InferRequest { keep_alive_ms: Some(-1), ..short(2) }).await));
    let models: Vec<String> = workers_of(&client, &hive.id).await.into_iter().map(|w| w.model).collect();
    assert_eq!(models, ["noop"]);

    // The no-op worker now has keep-alive -1: it stays, and the demo model does not fit.
    let events = infer(&client, "smollm2-135m", short(2)).await;
    let (code, message) = error(&events);
    assert_eq!(code, ErrorCode::InsufficientMemory);
    assert!(message.contains("keep-alive -1 hold 64.0 MiB"), "{message}");
    assert!(started(&events).is_empty());
    let models: Vec<String> = workers_of(&client, &hive.id).await.into_iter().map(|w| w.model).collect();
    assert_eq!(models, ["noop"]);
    assert_queue_drains(&broker.client().await).await;
}

/// The same hive; a job for the no-op model comes while the demo model's
/// worker is loading. A worker used to count only once it was ready, so
/// both started. Now its memory counts from when its job was placed: the
/// no-op job waits in the queue while the demo model's runs, then its worker
/// replaces the idle one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_for_two_models_that_fit_one_at_a_time_take_turns() {
    let (broker, client, hive) = hive_with_room_for_one_model("10ms", &[]).await;
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let most = {
        let (watching, id) = (watching.clone(), hive.id.clone());
        std::thread::spawn(move || {
            let mut most = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(processes_with_arg(&format!("{id}-w")).len());
                std::thread::sleep(Duration::from_millis(5));
            }
            most
        })
    };
    let demo = infer_in_background(&client, &hive, "smollm2-135m", short(2)).await;
    let b = infer(&client, "noop", short(5)).await;
    let a = demo.await.unwrap();
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(done(&a), "{a:?}");
    assert!(done(&b), "{b:?}");
    assert_eq!(most.join().unwrap(), 1, "never two workers at once");
    assert_queue_drains(&broker.client().await).await;
}

/// A steady stream of no-op jobs keeps that model's worker busy for good.
/// A demo-model job waiting for its room gets it anyway: after 5 s the busy
/// worker takes no new jobs and is stopped once idle; the stream's jobs wait
/// meanwhile, and all of them end well too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_of_one_model_does_not_starve_another() {
    let (broker, client, hive) = hive_with_room_for_one_model("10ms", &[]).await;
    let draining_shown = draining_shown(&broker, "noop").await;
    let streaming = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Four submitters for a 2-slot hive: its worker is never idle.
    let submitters: Vec<_> = (0..4)
        .map(|_| {
            let (client, streaming) = (client.clone(), streaming.clone());
            tokio::spawn(async move {
                let mut ended = Vec::new();
                while streaming.load(std::sync::atomic::Ordering::Relaxed) {
                    ended.push(done(&infer(&client, "noop", short(5)).await));
                }
                ended
            })
        })
        .collect();
    eventually(Duration::from_secs(10), "the stream's worker starts", || !hive.worker_pids().is_empty()).await;
    let began = std::time::Instant::now();
    let events = infer(&client, "smollm2-135m", short(2)).await;
    let waited = began.elapsed();
    assert!(done(&events), "{events:?}");
    assert!(waited < Duration::from_secs(20), "the demo-model job waited {waited:?}");
    assert!(hive.log().contains("waited for room: the worker takes no new jobs"), "{}", hive.log());
    let shown = tokio::time::timeout(Duration::from_secs(5), draining_shown).await;
    assert!(matches!(shown, Ok(Ok(true))), "the registry showed the stream's worker draining: {shown:?}");
    // The stream goes on afterwards (its worker comes back), then stops.
    tokio::time::sleep(Duration::from_secs(1)).await;
    streaming.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut jobs = 0;
    for s in submitters {
        let ended = s.await.unwrap();
        assert!(ended.iter().all(|ok| *ok), "every stream job ended done");
        jobs += ended.len();
    }
    assert!(jobs > 20, "{jobs} stream jobs");
    assert_queue_drains(&broker.client().await).await;
}

/// Follows the workers registry until an entry of `model`'s worker says it
/// is draining (true), or the watch ends (false).
async fn draining_shown(broker: &Broker, model: &'static str) -> tokio::task::JoinHandle<bool> {
    use futures::StreamExt as _;
    let js = async_nats::jetstream::new(broker.client().await);
    let (_, workers, _) = rbee_broker::ensure_memory_buckets(&js).await.unwrap();
    let mut watch = workers.watch_all().await.unwrap();
    tokio::spawn(async move {
        while let Some(Ok(entry)) = watch.next().await {
            if let Ok(w) = serde_json::from_slice::<WorkerInfo>(&entry.value) {
                if w.model == model && w.draining {
                    return true;
                }
            }
        }
        false
    })
}

/// A worker binary in `dir` that waits 3 s before it starts the real one.
fn slow_worker_bin(dir: &std::path::Path) -> String {
    let slow = dir.join("slow-worker");
    std::fs::write(&slow, format!("#!/bin/sh\nsleep 3\nexec '{}' \"$@\"\n", bin("rbee-worker").display())).unwrap();
    std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    slow.to_str().unwrap().to_owned()
}

/// While a worker loads, the machine's free memory does not show what it
/// will take yet: the heartbeat carries it as `memory_pending`, and goes
/// out as the worker starts, as it is ready and as it is gone, not at the
/// next 5 s tick. Other hives subtract it (`HiveInfo::memory_available`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hives_heartbeat_counts_a_loading_worker_at_once() {
    let broker = Broker::start();
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let slow = slow_worker_bin(dir.path());
    let hive = noop_hive(&broker.url(), 1, "0ms", &["--worker-bin", &slow, "--keep-alive", "1s"]).await;
    let idle = hive_info(&client, &hive.id).await;
    assert_eq!((idle.memory_used, idle.memory_pending), (0, 0));

    let job = {
        let client = client.clone();
        tokio::spawn(async move { infer(&client, "noop", short(2)).await })
    };
    let at_once = Duration::from_millis(1500);
    let loading = until_heartbeat_within(&client, &hive.id, at_once, "counts the loading worker", |h| h.memory_pending > 0).await;
    assert_eq!(loading.memory_pending, loading.memory_used, "all it uses is still loading: {loading:?}");
    assert!(!job.is_finished(), "the worker was still loading");
    assert!(done(&job.await.unwrap()));
    let ready = until_heartbeat_within(&client, &hive.id, at_once, "the worker is ready", |h| h.memory_pending == 0 && h.memory_used > 0).await;
    assert_eq!(ready.memory_used, loading.memory_used);
    // Keep-alive 1 s: the worker goes, and the heartbeat says so.
    until_heartbeat_within(&client, &hive.id, Duration::from_secs(3), "the worker is gone", |h| h.memory_used == 0).await;
    assert!(hive.worker_pids().is_empty());
}

/// With `--min-turn` longer than the job can wait, the busy worker is not
/// drained for another model: the job waits in the queue until its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_keeps_its_turn_for_min_turn() {
    let (broker, client, hive) = hive_with_room_for_one_model("100ms", &["--min-turn", "1h"]).await;
    // Ten seconds of no-op tokens keep the no-op worker busy past the 5 s a job waits before draining.
    let busy = infer_in_background(&client, &hive, "noop", short(100)).await;
    let events = infer(&client, "smollm2-135m", InferRequest { timeout_ms: Some(6_500), ..short(2) }).await;
    assert_eq!(error(&events).0, ErrorCode::DeadlineExceeded, "{events:?}");
    assert!(!hive.log().contains("takes no new jobs"), "{}", hive.log());
    assert!(client.workers().await.unwrap().iter().all(|w| !w.draining));
    let busy = busy.await.unwrap();
    assert!(done(&busy), "the busy worker's job was left alone: {busy:?}");
    assert_queue_drains(&broker.client().await).await;
}

/// A job that waits in the queue for room (busy workers hold it) ends
/// `DEADLINE_EXCEEDED` once its deadline passes, instead of waiting on; a
/// `worker.spawn` for it fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_for_room_ends_at_its_deadline() {
    let (broker, client, hive) = hive_with_room_for_one_model("100ms", &[]).await;
    // Two seconds of no-op tokens keep the no-op worker busy.
    let busy = infer_in_background(&client, &hive, "noop", short(20)).await;
    let events = infer(&client, "smollm2-135m", InferRequest { timeout_ms: Some(300), ..short(2) }).await;
    let (code, message) = error(&events);
    assert_eq!(code, ErrorCode::DeadlineExceeded);
    assert!(message.contains("waited in the queue"), "{message}");
    assert!(started(&events).is_empty());
    let job = client.job(&events[0].job_id).await.unwrap();
    assert_eq!(job.state, rbee_schemas::record::JobState::Expired);
    assert!(hive.log().contains("waiting for busy workers here to be idle"), "{}", hive.log());
    // An explicit spawn does not wait: it fails at once, saying why.
    let spawn = CtlRequest::WorkerSpawn { v: 1, model: "smollm2-135m".into(), backend: None, device: None, keep_alive_ms: None };
    let (code, message) = error(&ctl(&client, Some(&hive.id), spawn).await);
    assert_eq!(code, ErrorCode::InsufficientMemory);
    assert!(message.contains("busy workers here hold 64.0 MiB: try again when they are idle"), "{message}");
    assert!(done(&busy.await.unwrap()), "the busy job was left alone");
    assert_queue_drains(&broker.client().await).await;
}

/// Two hives under one id would share a heartbeat key, a lifecycle
/// consumer, worker ids and leases. A second one is refused while the first
/// is alive; a hive started under the id of one that was killed takes it
/// over once that one's heartbeat has stopped changing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_hive_under_a_live_hives_id_is_refused_and_a_killed_ones_is_taken_over() {
    let broker = Broker::start();
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let mut first = noop_hive(&broker.url(), 1, "0ms", &[]).await;
    let id = first.id.clone();
    let same_id = || HiveOpts { id: id.clone(), args: vec!["--test-noop-model".into()], ..HiveOpts::default() };

    let mut second = Hive::spawn(&broker.url(), same_id());
    assert_eq!(second.wait(Duration::from_secs(30)), Some(1), "{}", second.log());
    let log = second.log();
    assert!(log.contains("is in use by a live hive on host") && log.contains(&format!("pid {}", first.pid())), "{log}");
    assert_eq!(hive_info(&client, &first.id).await.pid, first.pid(), "the first hive carries on");
    // The refused hive wrote nothing into the live one's `rbee logs`.
    let logs = cli(&broker.url(), &["logs", "--hive", &id]).await;
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains("hive ready") && !text.contains("waiting up to") && !text.contains("is in use"), "{text}");
    // Ctrl-C while it waits to see whether the id's hive is alive: it stops at once, cleanly.
    let mut interrupted = Hive::spawn(&broker.url(), same_id());
    eventually(Duration::from_secs(10), "the hive waits for the id", || interrupted.log().contains("waiting up to")).await;
    interrupted.signal(Signal::INT);
    assert_eq!(interrupted.wait(Duration::from_secs(3)), Some(0), "{}", interrupted.log());
    assert!(done(&infer(&client, "noop", short(2)).await));
    assert_queue_drains(&broker.client().await).await; // acked before the kill

    first.signal(Signal::KILL);
    first.wait(Duration::from_secs(10));
    // Waits for the new hive's own heartbeat (up to 30 s).
    let third = Hive::start(&broker.url(), same_id()).await;
    assert!(third.log().contains("stopped without signing off; taking it over"), "{}", third.log());
    let logs = cli(&broker.url(), &["logs", "--hive", &id]).await;
    assert!(String::from_utf8_lossy(&logs.stdout).contains("taking it over"), "{logs:?}");
    assert!(!third.log().contains("another hive is running under"), "the killed hive's last beat is no live hive: {}", third.log());
    assert!(done(&infer(&client, "noop", short(2)).await));
    assert_queue_drains(&broker.client().await).await;
}

/// A second hive under a hive's id that its start-up check missed (the
/// broker was out of reach, say) is reported by the running hive as soon as
/// a heartbeat of the other appears under its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hive_reports_another_hive_beating_under_its_id() {
    let broker = Broker::start();
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let hive = noop_hive(&broker.url(), 1, "0ms", &[]).await;
    let mut other = hive_info(&client, &hive.id).await;
    other.hostname = "elsewhere".into();
    other.pid = 4242;
    other.updated_at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let js = async_nats::jetstream::new(broker.client().await);
    let (hives, _, _) = rbee_broker::ensure_memory_buckets(&js).await.unwrap();
    hives.put(&hive.id, serde_json::to_vec(&other).unwrap().into()).await.unwrap();
    eventually(Duration::from_secs(5), "the hive reports the other", || hive.log().contains("another hive is running under this hive's id")).await;
    assert!(hive.log().contains("host=elsewhere pid=4242"), "{}", hive.log());
    assert!(done(&infer(&client, "noop", short(2)).await), "it carries on");
}

/// A CUDA hive places models by its GPU's free memory, not the machine's
/// RAM, and another hive judges it by the same numbers. No GPU here: the
/// hive's hidden `--test-gpu` gives it fixed readings in NVML's place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cuda_hive_places_models_by_its_gpu_memory() {
    let broker = Broker::start();
    let gpu_args = ["--backend", "cuda", "--test-gpu", "Test GPU:1024:40"].map(String::from).to_vec();
    let gpu = Hive::start(&broker.url(), HiveOpts { args: gpu_args, ..HiveOpts::default() }).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let info = until_heartbeat(&client, &gpu.id, "reports its GPU", |h| h.vram_total > 0).await;
    assert_eq!((info.vram_total, info.vram_free), (1024 << 20, 40 << 20));
    assert_eq!(info.gpu_name, "Test GPU");
    assert_eq!(info.devices, ["cuda:0"]);
    assert_eq!(info.memory_available(), 40 << 20, "GPU memory, not the machine's RAM");
    let listed = cli(&broker.url(), &["hives", "list"]).await;
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(table.contains("Test GPU") && table.contains("40 MiB free of 1.0 GiB"), "{table}");

    // The demo model on CUDA needs far more than 40 MiB; the machine's RAM would hold it.
    let events = infer(&client, "smollm2-135m", short(2)).await;
    let (code, message) = error(&events);
    assert_eq!(code, ErrorCode::InsufficientMemory);
    assert!(message.contains("of GPU memory on cuda:0 (Test GPU)"), "{message}");
    assert!(started(&events).is_empty());

    // A CPU hive beside it: the CUDA hive leaves the model's jobs to it.
    let cpu = Hive::start(&broker.url(), HiveOpts::default()).await;
    until_heartbeat(&client, &cpu.id, "heartbeats", |_| true).await;
    for _ in 0..2 {
        let events = infer(&client, "smollm2-135m", short(2)).await;
        assert!(matches!(events.last().map(|e| &e.body), Some(EventBody::Done(_))), "{events:?}");
        assert_eq!(started(&events).iter().map(|s| s.hive.as_str()).collect::<Vec<_>>(), [cpu.id.as_str()]);
    }
    assert!(gpu.worker_pids().is_empty(), "no worker was started on the CUDA hive");
    assert_queue_drains(&broker.client().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_running_job_and_sigkill_leaves_no_worker() {
    let broker = Broker::start();
    let mut hive = noop_hive(&broker.url(), 1, "100ms", &[]).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let mut job = client.submit("noop", short(20), Default::default()).await.unwrap();
    let mut events = Vec::new();
    while !events.iter().any(|e: &Event| matches!(e.body, EventBody::Token(_))) {
        events.push(job.next().await.unwrap().unwrap());
    }
    hive.signal(Signal::TERM);
    events.extend(collect(&mut job).await);
    assert_well_formed(&events);
    match &events.last().unwrap().body {
        EventBody::Done(d) => assert_eq!(d.usage.completion_tokens, 20, "finished during the drain"),
        other => panic!("{other:?}"),
    }
    assert_eq!(hive.wait(Duration::from_secs(30)), Some(0));
    // Its lease on the model goes with it: another hive takes the model's
    // jobs at once, not when the lease expires (15 s).
    let js = async_nats::jetstream::new(broker.client().await);
    let leases = js.get_key_value(subjects::LEASES_BUCKET).await.unwrap();
    assert_eq!(leases.get(subjects::cold_start_lease_key("noop")).await.unwrap(), None);
    eventually(Duration::from_secs(5), "no worker left after the drain", || hive.worker_pids().is_empty()).await;

    // SIGKILL: the hive cannot clean up; its workers notice and exit on their own.
    let hive = noop_hive(&broker.url(), 1, "0ms", &[]).await;
    infer(&client, "noop", short(2)).await;
    let pids = hive.worker_pids();
    assert_eq!(pids.len(), 1);
    hive.signal(Signal::KILL);
    eventually(Duration::from_secs(5), "the worker of a killed hive exits", || processes_with_arg(&format!("{}-w", hive.id)).is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_an_incompatible_hive_naming_both_versions() {
    let broker = Broker::start();
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    // A hive of a future protocol heartbeats (written as such a hive would).
    let js = async_nats::jetstream::new(broker.client().await);
    rbee_broker::ensure(&js, &rbee_broker::Limits::default()).await.unwrap();
    let kv = js.get_key_value(subjects::HIVES_BUCKET).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let future = serde_json::json!({
        "v": 2, "hive_id": "future-hive", "version": "9.0.0", "protocol": 2, "hostname": "h", "pid": 1,
        "started_at_ms": now, "updated_at_ms": now, "slots": 1, "busy": 0,
    });
    kv.put("future-hive", serde_json::to_vec(&future).unwrap().into()).await.unwrap();

    let out = cli(&broker.url(), &["models", "list", "--hive", "future-hive"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rbee 9.0.0 (protocol v2)") && stderr.contains(&format!("protocol v{}", rbee_schemas::PROTOCOL_VERSION)), "{stderr}");
    assert!(stderr.contains("Upgrade"), "{stderr}");
    let out = cli(&broker.url(), &["infer", "--max-tokens", "2", "hi"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("protocol v2"), "{out:?}");

    // And a hive refuses a lifecycle job of another protocol, naming both.
    let hive = noop_hive(&broker.url(), 1, "0ms", &[]).await;
    let nats = broker.client().await;
    let mut sub = Events::subscribe(&nats, &subjects::events_subject("ctl-v9"), rbee_schemas::codec::Encoding::Json).await;
    let body = br#"{"op":"worker.stop","v":9,"worker":"x"}"#;
    publish_raw(&nats, &rbee_schemas::ctl::ctl_subject(&hive.id), &[("Nats-Msg-Id", "ctl-v9")], body).await;
    let events = sub.until_terminal().await;
    let (code, message) = error(&events);
    assert_eq!(code, ErrorCode::UnsupportedVersion);
    assert!(message.contains("v9") && message.contains(&format!("v{}", rbee_schemas::PROTOCOL_VERSION)), "{message}");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_stream_at_full_speed_ends_with_every_token() {
    // 8192 events as fast as the no-op engine makes them: more than the
    // client's ack permits could hold if the hive let unconfirmed events pile up.
    let broker = Broker::start();
    let _hive = noop_hive(&broker.url(), 4, "0ms", &[]).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let mut jobs = Vec::new();
    for _ in 0..2 {
        jobs.push(client.submit("noop", short(8192), Default::default()).await.unwrap());
    }
    for mut job in jobs {
        let events = collect(&mut job).await;
        assert_well_formed(&events);
        assert_eq!(events.iter().filter(|e| matches!(e.body, EventBody::Token(_))).count(), 8192);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_a_hive_still_sees_what_another_gains() {
    // A hive's view of the others is a watch on a memory bucket, which a
    // broker restart loses: the view must follow the recreated bucket, or
    // the hive places jobs by what it saw before the restart.
    let mut broker = Broker::start();
    let url = broker.url();
    let a = Hive::start(&url, HiveOpts::default()).await;
    let b = Hive::start(&url, HiveOpts::default()).await;
    broker.server.restart().expect("the broker restarts on its port and store");
    let client = rbee::Client::connect(&url).await.unwrap();
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let started_at = std::time::Instant::now();
    loop {
        let hives = client.hives().await.unwrap_or_default();
        if [&a, &b].iter().all(|h| hives.iter().any(|i| i.hive_id == h.id && i.updated_at_ms > since)) {
            break;
        }
        assert!(started_at.elapsed() < Duration::from_secs(20), "both hives beat again after the restart: {hives:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A model only b has, and only since the restart.
    let path = demo_model_path().display().to_string();
    ok_json(&cli(&url, &["models", "import", &path, "--alias", "smol-after", "--hive", &b.id, "--json"]).await);
    let on_b = format!("hive={}", b.id);
    let seen = || a.log().lines().any(|l| l.contains("the fleet view has this hive's models") && l.contains(&on_b) && l.contains("smol-after"));
    eventually(Duration::from_secs(30), "a's view lists smol-after on b", seen).await;

    let mut left = 0;
    for _ in 0..4 {
        let mut job = client.submit("smol-after", short(2), Default::default()).await.unwrap();
        let events = collect(&mut job).await;
        assert_well_formed(&events);
        assert_eq!(started(&events)[0].hive, b.id, "a job a pulled must be left for b, not failed: {events:?}");
        left += times_left(&a, job.job_id());
    }
    // a pulled some of them and left them by its view (else this shows nothing).
    assert!(left > 0, "a never pulled a smol-after job:\n{}", a.log());
    assert_queue_drains(&broker.client().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbee_logs_without_follow_ends_while_the_hive_keeps_logging() {
    use futures::StreamExt;
    let broker = Broker::start();
    let hive = Hive::start(&broker.url(), HiveOpts::default()).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let nats = broker.client().await;
    let id = hive.id.clone();
    let line = move |n: u64| {
        let l = rbee_schemas::log::LogLine {
            ts_ms: n,
            level: "INFO".into(),
            hive: id.clone(),
            worker: None,
            target: "test".into(),
            message: format!("line {n}"),
        };
        bytes::Bytes::from(serde_json::to_vec(&l).unwrap())
    };
    let subject = subjects::logs_subject(&hive.id);
    let test_lines = |lines: &[rbee_schemas::log::LogLine]| lines.iter().filter(|l| l.target == "test").map(|l| l.ts_ms).collect::<Vec<u64>>();

    // A hive with no kept line: nothing, and no consumer made for it.
    let js = async_nats::jetstream::new(nats.clone());
    let mut logs = js.get_stream(subjects::LOGS_STREAM).await.unwrap();
    let consumers = logs.info().await.unwrap().state.consumer_count;
    let none: Vec<_> = client.logs("no-such-hive", false).await.unwrap().collect().await;
    assert!(none.is_empty(), "{none:?}");
    assert_eq!(logs.info().await.unwrap().state.consumer_count, consumers);

    // Every kept line, once, in order. Published with the stream's ack, so
    // all are kept before the listing starts (a flushed plain publish can
    // still be on its way into the stream).
    let mut acks = Vec::new();
    for n in 0..2000 {
        acks.push(js.publish(subject.clone(), line(n)).await.unwrap());
    }
    for ack in acks {
        ack.await.expect("the logs stream keeps the line");
    }
    let lines: Vec<_> = client.logs(&hive.id, false).await.unwrap().collect().await;
    assert_eq!(test_lines(&lines), (0..2000).collect::<Vec<_>>());

    // A hive logging while the listing reads: it ends, with every line
    // kept when it was called and none sent after. Each line is sent with
    // the stream's ack, so a line counted before the call is kept.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let flood = |acked: bool| {
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(2000)));
        let task = tokio::spawn({
            let (nats, js, subject, line, stop, sent) = (nats.clone(), js.clone(), subject.clone(), line.clone(), stop.clone(), sent.clone());
            async move {
                while !stop.load(Relaxed) {
                    for _ in 0..500 {
                        let l = line(sent.load(Relaxed));
                        if acked {
                            js.publish(subject.clone(), l).await.unwrap().await.unwrap();
                        } else {
                            let _ = nats.publish(subject.clone(), l).await;
                        }
                        sent.fetch_add(1, Relaxed);
                    }
                    tokio::task::yield_now().await;
                }
            }
        });
        (stop, sent, task)
    };
    let listing = |sent: Arc<AtomicU64>| {
        let (client, id) = (client.clone(), hive.id.clone());
        async move {
            let kept = sent.load(Relaxed);
            let listing = client.logs(&id, false).await.unwrap();
            let called = sent.load(Relaxed);
            let lines = tokio::time::timeout(Duration::from_secs(20), listing.collect::<Vec<_>>()).await;
            (kept, called, lines.expect("rbee logs (no --follow) ends while lines keep coming"))
        }
    };
    let (stop, sent, task) = flood(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (kept, called, lines) = listing(sent.clone()).await;
    stop.store(true, Relaxed);
    task.await.unwrap();
    let seen = test_lines(&lines);
    // Fewer than the stream's 10,000 per hive were sent: none was dropped.
    assert!(called < 10_000 && kept > 2000, "{kept}, {called}");
    assert!(seen.len() as u64 >= kept && seen.len() as u64 <= called + 1, "{} lines, {kept} kept before the call, {called} sent by its end", seen.len());
    assert_eq!(seen, (0..seen.len() as u64).collect::<Vec<_>>(), "every line once, in order");

    // Lines sent as fast as they go: the stream drops its oldest faster
    // than they can be read, and the listing still ends.
    let (stop, sent, task) = flood(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, called, lines) = listing(sent).await;
    stop.store(true, Relaxed);
    task.await.unwrap();
    let seen = test_lines(&lines);
    assert!(seen.windows(2).all(|w| w[0] < w[1]) && seen.iter().all(|&n| n <= called), "in order, none sent after the call");
}

/// A model that imports (its header is a llama's) but cannot load (it has
/// no weights): the job gets one `MODEL_LOAD_FAILED` error saying why, the
/// queue keeps nothing and no worker process is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_cannot_load_fails_its_job_once_and_leaves_nothing() {
    use candle_core::quantized::gguf_file;
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("no-weights.gguf");
    let mut demo = std::fs::File::open(demo_model_path()).unwrap();
    let header = gguf_file::Content::read(&mut std::io::BufReader::new(&mut demo)).unwrap();
    let meta: Vec<(&str, &gguf_file::Value)> = header.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(&broken).unwrap(), &meta, &[]).unwrap();

    let broker = Broker::start();
    let hive = Hive::start(&broker.url(), HiveOpts::default()).await;
    let path = broken.display().to_string();
    ok_json(&cli(&broker.url(), &["models", "import", &path, "--alias", "broken", "--hive", &hive.id, "--json"]).await);
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let mut job = client.submit("broken", short(2), Default::default()).await.unwrap();
    let events = collect(&mut job).await;
    assert_well_formed(&events);
    match &events.last().unwrap().body {
        EventBody::Error(e) => {
            assert_eq!(e.code, ErrorCode::ModelLoadFailed, "{}", e.message);
            assert!(e.message.contains("token_embd.weight"), "says why: {}", e.message);
        }
        other => panic!("expected MODEL_LOAD_FAILED, got {other:?}"),
    }
    assert_queue_drains(&broker.client().await).await;
    eventually(Duration::from_secs(5), "no worker process is left", || processes_with_arg(&path).is_empty()).await;
    assert!(!hive.log().contains("panicked"));
}
