//! Model downloads over the bus, against a local hub in the Hugging Face
//! layout: resuming after an interruption, verification and registration,
//! disk preflight (`--disk-reserve`) and where an `any` download goes,
//! `rbee infer` pulling a model no hive has, failures that register nothing,
//! and cancelling.

use std::sync::Arc;
use std::time::Duration;

use rbee_schemas::ctl::CtlRequest;
use rbee_schemas::error::ErrorCode;
use rbee_schemas::event::{EventBody, StopReason};
use rbee_schemas::hive::HiveInfo;

use crate::fleet::*;
use crate::harness::*;
use crate::hub::{Hub, HubFile};

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
