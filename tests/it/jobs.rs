//! Job semantics on the no-op test model (real hive and worker processes,
//! no model cost): cancel, deadlines, priorities, backpressure, duplicates,
//! dead letters and retry, reattaching.

use std::time::{Duration, Instant};

use rbee::jobs::CancelOutcome;
use rbee::{Client, SubmitOptions};
use rbee_schemas::error::ErrorCode;
use rbee_schemas::event::{Event, EventBody, StopReason};
use rbee_schemas::job::InferRequest;
use rbee_schemas::record::JobState;
use rbee_schemas::subjects::Lane;

use crate::harness::*;

const NOOP: &str = "noop";

fn job(tokens: i64) -> InferRequest {
    InferRequest { prompt: Some("hello there".into()), max_tokens: Some(tokens), ..Default::default() }
}

async fn submit(client: &Client, id: &str, req: InferRequest) -> rbee::JobStream {
    submit_in(client, id, req, Lane::Interactive).await
}

async fn submit_in(client: &Client, id: &str, req: InferRequest, lane: Lane) -> rbee::JobStream {
    let opts = SubmitOptions { job_id: Some(id.to_owned()), lane, ..Default::default() };
    let mut s = client.submit(NOOP, req, opts).await.expect("submit");
    s.published().await.expect("published");
    s
}

fn terminal(events: &[Event]) -> &EventBody {
    &events.last().expect("events").body
}

fn error_code(events: &[Event]) -> ErrorCode {
    match terminal(events) {
        EventBody::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn stop_reason(events: &[Event]) -> StopReason {
    match terminal(events) {
        EventBody::Done(d) => d.stop_reason,
        other => panic!("expected done, got {other:?}"),
    }
}

/// Waits for the first token of a job.
async fn first_token(job: &mut rbee::JobStream) -> Vec<Event> {
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &Event| matches!(e.body, EventBody::Token(_))) {
        seen.push(job.next().await.expect("more events").expect("event"));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_stops_it_within_a_token() {
    let broker = Broker::start();
    let hive = noop_hive(&broker.url(), 1, "20ms", &[]).await;
    let client = Client::from_nats(broker.client().await);
    let id = unique("cancel-running");
    let mut j = submit(&client, &id, job(1000)).await;
    let mut events = first_token(&mut j).await;
    let asked = Instant::now();
    assert!(matches!(client.cancel(&id).await.unwrap(), CancelOutcome::Requested { .. }));
    events.extend(collect(&mut j).await);
    let took = asked.elapsed();
    assert_well_formed(&events);
    assert_eq!(stop_reason(&events), StopReason::Cancelled);
    assert!(took < Duration::from_millis(500), "stopped {took:?} after the cancel");
    let tokens = events.iter().filter(|e| matches!(e.body, EventBody::Token(_))).count();
    assert!(tokens < 30, "{tokens} tokens: generation went on");
    assert_eq!(client.job(&id).await.unwrap().state, JobState::Cancelled);
    // Idempotent, the slot is free again and the worker serves the next job.
    assert_eq!(client.cancel(&id).await.unwrap(), CancelOutcome::AlreadyEnded(JobState::Cancelled));
    let next = collect(&mut submit(&client, &unique("after"), job(3)).await).await;
    assert_eq!(stop_reason(&next), StopReason::MaxTokens);
    assert_eq!(hive.worker_pids().len(), 1);
    assert_queue_drains(client.nats()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_queued_job_never_starts() {
    let broker = Broker::start();
    let _hive = noop_hive(&broker.url(), 1, "10ms", &[]).await;
    let client = Client::from_nats(broker.client().await);
    let busy_id = unique("busy");
    let mut busy = submit(&client, &busy_id, job(60)).await;
    first_token(&mut busy).await;
    let queued_id = unique("queued");
    let mut queued = submit(&client, &queued_id, job(5)).await;
    assert_eq!(client.job(&queued_id).await.unwrap().state, JobState::Queued);
    assert_eq!(client.cancel(&queued_id).await.unwrap(), CancelOutcome::Cancelled);
    let events = collect(&mut queued).await;
    assert_eq!(events.len(), 1, "only the terminal event: {events:?}");
    assert_eq!(stop_reason(&events), StopReason::Cancelled);
    // The busy job finishes; the cancelled one still never starts.
    assert_eq!(stop_reason(&collect(&mut busy).await), StopReason::MaxTokens);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept = kept_events(client.nats(), &queued_id).await;
    assert!(kept.iter().all(|e| !matches!(e.body, EventBody::Started(_))), "{kept:?}");
    let rec = client.job(&queued_id).await.unwrap();
    assert_eq!((rec.state, rec.next_seq, rec.cancel_requested), (JobState::Cancelled, 1, true));
    let terminal = rec.terminal.as_ref().map(|e| (&e.body, e.seq));
    assert!(matches!(terminal, Some((EventBody::Done(d), 0)) if d.stop_reason == StopReason::Cancelled), "{rec:?}");
    assert_eq!(client.cancel(&queued_id).await.unwrap(), CancelOutcome::AlreadyEnded(JobState::Cancelled));
    assert!(matches!(client.cancel("no-such-job").await, Err(rbee::ClientError::NotFound(_))));
    assert_queue_drains(client.nats()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_queued_and_running_jobs() {
    let broker = Broker::start();
    let _hive = noop_hive(&broker.url(), 1, "20ms", &[]).await;
    let client = Client::from_nats(broker.client().await);

    // Running past its deadline: stopped, DEADLINE_EXCEEDED.
    let running_id = unique("late");
    let started = Instant::now();
    let mut running = submit(&client, &running_id, InferRequest { timeout_ms: Some(400), ..job(1000) }).await;
    // Queued behind it with a shorter deadline: expires in the queue, never starts.
    let queued_id = unique("expired");
    let mut queued = submit(&client, &queued_id, InferRequest { timeout_ms: Some(200), ..job(5) }).await;

    let events = collect(&mut running).await;
    assert_well_formed(&events);
    assert_eq!(error_code(&events), ErrorCode::DeadlineExceeded);
    assert!(events.iter().any(|e| matches!(e.body, EventBody::Token(_))), "it ran before it expired");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(client.job(&running_id).await.unwrap().state, JobState::Expired);

    let events = collect(&mut queued).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(error_code(&events), ErrorCode::DeadlineExceeded);
    assert_eq!(client.job(&queued_id).await.unwrap().state, JobState::Expired);
    assert_queue_drains(client.nats()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_jobs_go_first_and_batch_is_not_starved() {
    let broker = Broker::start();
    let hive = noop_hive(&broker.url(), 1, "5ms", &[]).await;
    let client = Client::from_nats(broker.client().await);
    let busy_id = unique("busy");
    let mut busy = submit(&client, &busy_id, job(2000)).await;
    first_token(&mut busy).await;
    // While the slot is taken: 2 batch jobs, then 6 interactive ones. The
    // slot is freed (the busy job cancelled) only once all are queued: on a
    // loaded machine eight submits can outlast a short job.
    let mut streams = Vec::new();
    for i in 0..2 {
        streams.push(submit_in(&client, &format!("{}-b{i}", unique("lane")), job(2), Lane::Batch).await);
    }
    for i in 0..6 {
        streams.push(submit_in(&client, &format!("{}-i{i}", unique("lane")), job(2), Lane::Interactive).await);
    }
    client.cancel(&busy_id).await.expect("cancel the busy job");
    collect(&mut busy).await;
    for s in &mut streams {
        collect(s).await;
    }
    // Claim order: when each job reached the broker plus how long it waited.
    let mut claimed: Vec<(u64, String)> = Vec::new();
    for s in &streams {
        let r = client.job(s.job_id()).await.unwrap();
        assert_eq!(r.state, JobState::Done);
        let t = r.submitted_at_ms + r.timings.map_or(0.0, |t| t.queued_ms) as u64;
        claimed.push((t, s.job_id().to_owned()));
    }
    claimed.sort();
    // The lane is the suffix this test appends (`-b0`, `-i3`): the unique
    // part before it is random and may itself contain "-b".
    let is_batch = |id: &str| id.rsplit_once('-').is_some_and(|(_, tail)| tail.starts_with('b'));
    let order: String = claimed.iter().map(|(_, id)| if is_batch(id) { 'B' } else { 'I' }).collect();
    assert!(order.starts_with("III"), "interactive first: {order}\n{claimed:?}\n{}", hive.log());
    let first_batch = order.find('B').unwrap();
    assert!(first_batch <= 3, "a batch job gets at least every 4th claim: {order}");
    assert_eq!(order.matches('B').count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_fails_fast_and_the_cli_retries_with_backoff() {
    let broker = Broker::start();
    let _hive = noop_hive(&broker.url(), 1, "10ms", &["--queue-max-jobs", "2"]).await;
    let client = Client::from_nats(broker.client().await);
    let mut a = submit(&client, &unique("a"), job(50)).await;
    first_token(&mut a).await;
    let mut b = submit(&client, &unique("b"), job(1)).await;
    // Queue: a (claimed, not yet acked) and b: full.
    let mut c = client.submit(NOOP, job(1), SubmitOptions::default()).await.unwrap();
    let started = Instant::now();
    match c.published().await {
        Err(rbee::ClientError::QueueFull(why)) => assert!(why.contains("maximum messages"), "{why}"),
        other => panic!("expected QUEUE_FULL, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1), "fails fast");

    let url = broker.url();
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_path_buf();
    let cli = |extra: &'static [&'static str]| {
        let (url, h) = (url.clone(), h.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin("rbee"))
                .args(["--nats-url", &url, "infer", "--model", NOOP, "--raw", "--max-tokens", "2", "-v"])
                .args(extra)
                .arg("hi")
                .env("RBEE_HOME", h)
                .output()
                .unwrap()
        })
    };
    let no_retry = cli(&["--no-retry"]).await.unwrap();
    assert_eq!(no_retry.status.code(), Some(1));
    let err = String::from_utf8_lossy(&no_retry.stderr);
    assert!(err.contains("QUEUE_FULL") && err.contains("--queue-max-jobs"), "{err}");
    // With retries it gets in once the queue drains.
    let retried = cli(&["--retries", "10"]);
    collect(&mut a).await;
    collect(&mut b).await;
    let retried = retried.await.unwrap();
    let err = String::from_utf8_lossy(&retried.stderr);
    assert_eq!(retried.status.code(), Some(0), "{err}");
    assert!(err.contains("queue full") && err.contains("retry 1/10"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_to_queue_when_no_hive_is_attached() {
    let broker = Broker::start();
    let home = tempfile::tempdir().unwrap();
    let url = broker.url();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin("rbee"))
            .args(["--nats-url", &url, "infer", "--max-tokens", "2", "hi"])
            .env("RBEE_HOME", home.path())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no hive is attached"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_job_id_runs_once_within_and_after_the_dedup_window() {
    let broker = Broker::start();
    let hive = noop_hive(&broker.url(), 1, "1ms", &["--dedup-window", "1s"]).await;
    let client = Client::from_nats(broker.client().await);
    let id = unique("dup");
    let first = collect(&mut submit(&client, &id, job(5)).await).await;
    assert_well_formed(&first);
    // Within the window: the broker drops the message; the events are replayed.
    let second = collect(&mut submit(&client, &id, job(5)).await).await;
    assert_eq!(second, first);
    // After the window: a new message; the hive recognises the ended job and does not run it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let third = collect(&mut submit(&client, &id, job(5)).await).await;
    assert_eq!(third, first);
    // The third message went to the warm worker before its claim said
    // "ended" (an early start): that start was called off and the hive's
    // only slot is free for the next job.
    let next = collect(&mut submit(&client, &unique("after-dup"), job(3)).await).await;
    assert_eq!(stop_reason(&next), StopReason::MaxTokens);
    assert_queue_drains(client.nats()).await;
    let kept = kept_events(client.nats(), &id).await;
    let starts = kept.iter().filter(|e| matches!(e.body, EventBody::Started(_))).count();
    assert_eq!(starts, 1, "ran once: {kept:?}");
    let mut terminal_seqs: Vec<u64> = kept.iter().filter(|e| e.is_terminal()).map(|e| e.seq).collect();
    terminal_seqs.dedup();
    assert_eq!(terminal_seqs.len(), 1, "one terminal event (sent again, same seq): {kept:?}");
    let _ = hive;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_crashing_its_worker_is_dead_and_can_be_retried() {
    let broker = Broker::start();
    let hive = noop_hive(&broker.url(), 1, "1ms", &["--max-attempts", "2", "--retry-backoff", "50ms"]).await;
    let client = Client::from_nats(broker.client().await);
    let id = unique("poison");
    let req = InferRequest { prompt: Some("please rbee:crash now".into()), max_tokens: Some(10), ..Default::default() };
    let events = collect(&mut submit(&client, &id, req).await).await;
    assert_well_formed(&events);
    assert_eq!(error_code(&events), ErrorCode::WorkerCrashed);
    let restarts = events.iter().filter(|e| matches!(e.body, EventBody::Restarted(_))).count();
    assert_eq!(restarts, 1, "two attempts, one restart between: {events:?}");
    let EventBody::Error(e) = terminal(&events) else { unreachable!() };
    assert!(e.message.contains("rbee jobs retry"), "{}", e.message);
    let rec = client.job(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempts), (JobState::Dead, 2));
    assert_queue_drains(client.nats()).await;
    let dead: Vec<_> = client.jobs(100).await.unwrap().into_iter().filter(|j| j.state == JobState::Dead).collect();
    assert_eq!(dead.len(), 1);

    let new_id = client.retry(&id).await.unwrap();
    assert_eq!(new_id, format!("{id}-retry1"));
    let again = collect(&mut client.follow(&new_id, 0).await.unwrap()).await;
    assert!(again.iter().any(|e| matches!(e.body, EventBody::Started(_))), "the resubmitted job ran");
    assert_eq!(error_code(&again), ErrorCode::WorkerCrashed);
    assert!(client.job(&id).await.unwrap().error_message.unwrap().contains(&new_id));
    eventually(Duration::from_secs(5), "the crashed workers are gone", || hive.worker_pids().len() <= 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_disconnects_reattaches_without_gaps_or_repeats() {
    let broker = Broker::start();
    let _hive = noop_hive(&broker.url(), 1, "15ms", &[]).await;
    let id = unique("reattach");
    let first_part = {
        let client = Client::from_nats(broker.client().await);
        let mut j = submit(&client, &id, job(40)).await;
        let mut seen = first_token(&mut j).await;
        seen.push(j.next().await.unwrap().unwrap());
        client.nats().drain().await.unwrap();
        seen
    };
    let client = Client::from_nats(broker.client().await);
    let next = first_part.last().unwrap().seq + 1;
    let rest = collect(&mut client.follow(&id, next).await.unwrap()).await;
    let mut all = first_part.clone();
    all.extend(rest);
    assert_well_formed(&all);
    assert_eq!(stop_reason(&all), StopReason::MaxTokens);
    // From the start: the same events again.
    let replayed = collect(&mut client.follow(&id, 0).await.unwrap()).await;
    assert_eq!(replayed, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_listing_ends_and_lists_each_key_once_while_a_key_is_rewritten() {
    use rbee_schemas::hive::{WorkerInfo, WorkerState};
    let broker = Broker::start();
    let nats = broker.client().await;
    let (_, workers, _) = rbee_broker::ensure_memory_buckets(&async_nats::jetstream::new(nats)).await.unwrap();
    let info = |id: &str, served: u64| WorkerInfo {
        v: 1,
        id: id.into(),
        hive: "h".into(),
        model: "noop".into(),
        state: WorkerState::Ready,
        pid: 1,
        backend: "cpu".into(),
        device: "cpu".into(),
        started_at_ms: 0,
        jobs_served: served,
        last_activity_ms: 0,
        keep_alive_ms: 0,
        memory: 0,
        slots: 1,
        draining: false,
    };
    for id in ["w0", "w1", "w2", "w3", "w4"] {
        workers.put(id, serde_json::to_vec(&info(id, 0)).unwrap().into()).await.unwrap();
    }
    // One worker's entry rewritten about every millisecond, as heartbeats and
    // state changes do on a busy fleet.
    let writer = {
        let workers = workers.clone();
        tokio::spawn(async move {
            for n in 1.. {
                let _ = workers.put("w0", serde_json::to_vec(&info("w0", n)).unwrap().into()).await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    // async-nats's `keys()` failed this within a few tries: its listing
    // followed the rewrites for ever, yielding w0 each time.
    for _ in 0..50 {
        let listed = tokio::time::timeout(Duration::from_secs(5), client.workers()).await.expect("the listing ends").unwrap();
        let ids: Vec<&str> = listed.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["w0", "w1", "w2", "w3", "w4"]);
    }
    writer.abort();
}
