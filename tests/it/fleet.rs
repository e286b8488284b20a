//! The fleet over the bus: several hive processes on one broker, lifecycle
//! jobs (imports, deletes, worker spawn/stop), keep-alive, placement and
//! scale-out, drains and kills, version refusal, logs. Downloads are in
//! [`crate::downloads`], memory placement in [`crate::memory`]; the
//! helpers here serve all three.

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

pub(crate) const DEMO_SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Runs the `rbee` CLI against `url`.
pub(crate) async fn cli(url: &str, args: &[&str]) -> Output {
    let mut all = vec!["--nats-url".to_owned(), url.to_owned()];
    all.extend(args.iter().map(|s| s.to_string()));
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_path_buf();
    tokio::task::spawn_blocking(move || Command::new(bin("rbee")).args(&all).env("RBEE_HOME", h).output().expect("run rbee"))
        .await
        .unwrap()
}

pub(crate) fn ok_json(out: &Output) -> serde_json::Value {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("JSON on stdout ({e}): {stdout}"))
}

pub(crate) async fn ctl(client: &rbee::Client, hive: Option<&str>, req: CtlRequest) -> Vec<Event> {
    let mut job = client.submit_ctl(hive, &req, None).await.expect("submit lifecycle job");
    let events = collect(&mut job).await;
    assert_well_formed(&events);
    events
}

pub(crate) fn result(events: &[Event]) -> serde_json::Value {
    match &events.last().expect("events").body {
        EventBody::Done(d) => {
            assert_eq!(d.stop_reason, StopReason::Completed);
            d.result.clone().expect("a result")
        }
        other => panic!("expected done, got {other:?} in {events:?}"),
    }
}

pub(crate) fn error(events: &[Event]) -> (ErrorCode, String) {
    match &events.last().expect("events").body {
        EventBody::Error(e) => (e.code, e.message.clone()),
        other => panic!("expected an error, got {other:?}"),
    }
}

pub(crate) async fn hive_info(client: &rbee::Client, id: &str) -> HiveInfo {
    client.hives().await.unwrap().into_iter().find(|h| h.hive_id == id).expect("hive heartbeats")
}

pub(crate) async fn workers_of(client: &rbee::Client, hive: &str) -> Vec<WorkerInfo> {
    client.workers().await.unwrap().into_iter().filter(|w| w.hive == hive).collect()
}

/// Waits (at most 12 s: two heartbeats) until the hive's heartbeat satisfies `f`.
pub(crate) async fn until_heartbeat(client: &rbee::Client, id: &str, what: &str, f: impl Fn(&HiveInfo) -> bool) -> HiveInfo {
    until_heartbeat_within(client, id, Duration::from_secs(12), what, f).await
}

pub(crate) async fn until_heartbeat_within(client: &rbee::Client, id: &str, within: Duration, what: &str, f: impl Fn(&HiveInfo) -> bool) -> HiveInfo {
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

pub(crate) fn started(events: &[Event]) -> Vec<rbee_schemas::event::Started> {
    events.iter().filter_map(|e| match &e.body { EventBody::Started(s) => Some(s.clone()), _ => None }).collect()
}

pub(crate) async fn infer(client: &rbee::Client, model: &str, req: InferRequest) -> Vec<Event> {
    let mut job = client.submit(model, req, Default::default()).await.expect("submit");
    let events = collect(&mut job).await;
    assert_well_formed(&events);
    events
}

pub(crate) fn short(max_tokens: i64) -> InferRequest {
    InferRequest { prompt: Some("Hi".into()), max_tokens: Some(max_tokens), temperature: Some(0.0), ..Default::default() }
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

pub(crate) fn done(events: &[Event]) -> bool {
    matches!(events.last().map(|e| &e.body), Some(EventBody::Done(d)) if d.stop_reason != StopReason::Cancelled)
}

/// A worker binary in `dir` that waits 3 s before it starts the real one.
pub(crate) fn slow_worker_bin(dir: &std::path::Path) -> String {
    let slow = dir.join("slow-worker");
    std::fs::write(&slow, format!("#!/bin/sh\nsleep 3\nexec '{}' \"$@\"\n", bin("rbee-worker").display())).unwrap();
    std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    slow.to_str().unwrap().to_owned()
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
