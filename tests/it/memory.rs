//! Memory placement over the bus: a model too big for every hive, idle
//! workers making room for another model (unless their keep-alive says
//! never), models that fit one at a time taking turns, a steady stream not
//! starving another model, a loading worker counted at once, a busy
//! worker's minimum turn, and a job that waits for room until its deadline.

use std::sync::Arc;
use std::time::Duration;

use rbee_schemas::ctl::CtlRequest;
use rbee_schemas::error::ErrorCode;
use rbee_schemas::event::{Event, EventBody};
use rbee_schemas::hive::WorkerInfo;
use rbee_schemas::job::InferRequest;
use rbee_schemas::subjects;
use rustix::process::Signal;

use crate::fleet::*;
use crate::harness::*;

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
