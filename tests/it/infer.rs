//! Inference through the bus: round trip, warm start, any client, bad input,
//! a worker killed mid-job.

use std::time::{Duration, Instant};

use rbee_schemas::codec::Encoding;
use rbee_schemas::error::ErrorCode;
use rbee_schemas::event::{Event, EventBody, StopReason};
use rbee_schemas::job::InferRequest;
use rbee_schemas::subjects;
use rustix::process::{kill_process, Pid, Signal};

use crate::engine::{generate, user};
use crate::harness::*;

const MODEL: &str = "smollm2-135m";

async fn run(client: &rbee::Client, req: InferRequest) -> Vec<Event> {
    let mut job = client.submit(MODEL, req, Default::default()).await.expect("submit");
    let mut events = Vec::new();
    let deadline = Instant::now() + JOB_TIMEOUT;
    while let Some(e) = tokio::time::timeout_at(deadline.into(), job.next()).await.expect("job finishes in time") {
        events.push(e.expect("event"));
    }
    events
}

fn done(events: &[Event]) -> &rbee_schemas::event::Done {
    match &events.last().expect("events").body {
        EventBody::Done(d) => d,
        other => panic!("expected done, got {other:?} in {events:?}"),
    }
}

fn started(e: &Event) -> &rbee_schemas::event::Started {
    match &e.body {
        EventBody::Started(s) => s,
        other => panic!("expected started, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_streams_tokens_equal_to_the_engine_in_process() {
    let broker = Broker::start();
    let hive = Hive::start(&broker.url(), HiveOpts::default()).await;
    let nats = broker.client().await;
    let client = rbee::Client::from_nats(nats.clone());
    let req = InferRequest {
        messages: Some(user("Write a haiku about bees")),
        max_tokens: Some(24),
        temperature: Some(0.7),
        top_p: Some(0.9),
        seed: Some(42),
        ..Default::default()
    };
    let events = run(&client, req.clone()).await;
    assert_well_formed(&events);
    let s = started(&events[0]);
    assert_eq!((s.hive.as_str(), s.model.as_str(), s.cold, s.attempt), (hive.id.as_str(), MODEL, true, 1));
    assert!(events[1..events.len() - 1].iter().all(|e| matches!(e.body, EventBody::Token(_))));
    let d = done(&events);
    assert_eq!(d.seed, 42);
    assert!(d.usage.prompt_tokens > 10 && d.usage.completion_tokens >= 1);
    assert!(d.timings.ttft_ms > 0.0 && d.timings.total_ms >= d.timings.ttft_ms);

    let (expected, outcome) = generate(&req.validate(0).unwrap()).unwrap();
    assert_eq!(text_of(&events), expected);
    assert_eq!(d.usage, outcome.usage);
    assert_eq!(d.stop_reason, outcome.stop_reason);
    assert_queue_drains(&nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_job_reuses_the_warm_worker() {
    let broker = Broker::start();
    let hive = Hive::start(&broker.url(), HiveOpts::default()).await;
    let client = rbee::Client::from_nats(broker.client().await);
    let req = InferRequest { prompt: Some("The bee".into()), max_tokens: Some(4), seed: Some(1), ..Default::default() };

    let t0 = Instant::now();
    let first = run(&client, req.clone()).await;
    let first_ms = t0.elapsed();
    let workers = hive.worker_pids();
    assert_eq!(workers.len(), 1, "one worker after the first job");

    let t1 = Instant::now();
    let second = run(&client, req).await;
    let second_ms = t1.elapsed();
    assert_well_formed(&first);
    assert_well_formed(&second);
    assert!(started(&first[0]).cold);
    assert!(!started(&second[0]).cold);
    assert_eq!(hive.worker_pids(), workers, "no second worker process");
    let (cold, warm) = (done(&first).timings, done(&second).timings);
    assert!(warm.ttft_ms < cold.ttft_ms, "warm ttft {} ms !< cold {} ms", warm.ttft_ms, cold.ttft_ms);
    assert_eq!(warm.load_ms, 0.0);
    assert!(cold.load_ms > 0.0);
    assert!(second_ms < first_ms, "warm job {second_ms:?} !< cold {first_ms:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_json_and_msgpack_jobs_from_any_client_complete() {
    let broker = Broker::start();
    let _hive = Hive::start(&broker.url(), HiveOpts::default()).await;
    let nats = broker.client().await;
    let subject = subjects::infer_subject(MODEL);

    // JSON, exactly as `nats pub` would send it.
    let id = unique("json");
    let mut events = Events::subscribe(&nats, &subjects::events_subject(&id), Encoding::Json).await;
    publish_raw(&nats, &subject, &[("Nats-Msg-Id", &id)], br#"{"prompt":"Hello","max_tokens":8}"#).await;
    let got = events.until_terminal().await;
    assert_well_formed(&got);
    assert_eq!(done(&got).usage.completion_tokens, 8);
    assert!(!text_of(&got).is_empty());

    // MessagePack, built from a plain map, with the id in the body and a custom reply subject.
    let id = unique("mp");
    let reply = format!("my.app.replies.{id}");
    let body = serde_json::json!({"id": id, "reply_to": reply, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6});
    let mut events = Events::subscribe(&nats, &reply, Encoding::Msgpack).await;
    publish_raw(&nats, &subject, &[("Content-Type", "application/msgpack")], &rmp_serde::to_vec_named(&body).unwrap()).await;
    let got = events.until_terminal().await;
    assert_well_formed(&got);
    assert!(got.iter().all(|e| e.job_id == id));
    assert!(matches!(done(&got).stop_reason, StopReason::MaxTokens | StopReason::Eos));
    assert_queue_drains(&nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_get_one_error_each_and_leave_nothing_in_the_queue() {
    let broker = Broker::start();
    let hive = Hive::start(&broker.url(), HiveOpts::default()).await;
    let nats = broker.client().await;
    let demo = subjects::infer_subject(MODEL);
    let cases: Vec<(&str, String, &[u8], ErrorCode, &str)> = vec![
        ("malformed", demo.clone(), br#"{"prompt": "Hel"#, ErrorCode::InvalidRequest, "invalid job body"),
        ("no-prompt", demo.clone(), br#"{"max_tokens": 8}"#, ErrorCode::InvalidRequest, "missing prompt"),
        ("range", demo.clone(), br#"{"prompt":"x","max_tokens":100000}"#, ErrorCode::InvalidRequest, "max_tokens must be between 1 and 8192"),
        ("typo", demo.clone(), br#"{"prompt":"x","max_token":8}"#, ErrorCode::InvalidRequest, "unknown field `max_token`"),
        ("unknown-model", subjects::infer_subject("no-such-model"), br#"{"prompt":"x"}"#, ErrorCode::UnknownModel, "no model \"no-such-model\""),
        ("mismatch", demo.clone(), br#"{"prompt":"x","model":"other"}"#, ErrorCode::InvalidRequest, "does not match the subject"),
        ("version", demo.clone(), br#"{"v":2,"prompt":"x"}"#, ErrorCode::UnsupportedVersion, "protocol v2; this hive"),
        ("not-json", demo.clone(), b"\xff\xfe", ErrorCode::InvalidRequest, "invalid job body"),
    ];
    for (name, subject, body, code, needle) in cases {
        let id = unique(name);
        let mut events = Events::subscribe(&nats, &subjects::events_subject(&id), Encoding::Json).await;
        publish_raw(&nats, &subject, &[("Nats-Msg-Id", &id)], body).await;
        let got = events.until_terminal().await;
        assert_eq!(got.len(), 1, "{name}: exactly one event: {got:?}");
        match &got[0].body {
            EventBody::Error(e) => {
                assert_eq!(e.code, code, "{name}: {}", e.message);
                assert!(e.message.contains(needle), "{name}: {:?} lacks {needle:?}", e.message);
            }
            other => panic!("{name}: expected an error, got {other:?}"),
        }
        events.assert_silent(Duration::from_millis(200)).await;
    }
    // Terminated, not redelivered: the queue is empty and the hive still serves.
    assert_queue_drains(&nats).await;
    let client = rbee::Client::from_nats(nats.clone());
    let ok = run(&client, InferRequest { prompt: Some("Hi".into()), max_tokens: Some(2), ..Default::default() }).await;
    assert_well_formed(&ok);
    done(&ok);
    assert!(!hive.log().contains("panicked"));
}

/// An error the worker finds (not the hive): a prompt longer than the
/// model's context. One error event, the job's record failed, nothing left in
/// the queue; the worker keeps serving, and leaves with its hive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_worker_refuses_ends_once_and_the_worker_serves_on() {
    let broker = Broker::start();
    let mut hive = Hive::start(&broker.url(), HiveOpts::default()).await;
    let nats = broker.client().await;
    let client = rbee::Client::from_nats(nats.clone());
    let long = InferRequest { prompt: Some("bee ".repeat(5000)), max_tokens: Some(4), ..Default::default() };
    let events = run(&client, long).await;
    assert_well_formed(&events);
    let EventBody::Error(e) = &events.last().unwrap().body else { panic!("expected an error: {events:?}") };
    assert_eq!(e.code, ErrorCode::ContextLengthExceeded, "{}", e.message);
    assert!(e.message.contains("context holds 4096") && e.message.contains("shorten the prompt"), "{}", e.message);
    let record = client.job(&events[0].job_id).await.unwrap();
    assert_eq!(record.state, rbee_schemas::record::JobState::Failed);
    assert_queue_drains(&nats).await;

    let workers = hive.worker_pids();
    assert_eq!(workers.len(), 1, "the worker that refused the job is still up");
    done(&run(&client, InferRequest { prompt: Some("Hi".into()), max_tokens: Some(2), ..Default::default() }).await);
    assert_eq!(hive.worker_pids(), workers, "the same worker served the next job");
    hive.signal(Signal::TERM);
    assert_eq!(hive.wait(Duration::from_secs(30)), Some(0));
    eventually(Duration::from_secs(5), "worker processes exit with their hive", || hive.worker_pids().is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_is_replaced_and_the_job_completes() {
    let broker = Broker::start();
    let mut hive = Hive::start(&broker.url(), HiveOpts::default()).await;
    let nats = broker.client().await;
    let id = unique("kill");
    let mut sub = Events::subscribe(&nats, &subjects::events_subject(&id), Encoding::Json).await;
    let body = serde_json::json!({"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0.0});
    publish_raw(&nats, &subjects::infer_subject(MODEL), &[("Nats-Msg-Id", &id)], body.to_string().as_bytes()).await;

    // Wait for the first token, then kill the worker.
    let victim = loop {
        let pids = hive.worker_pids();
        if let [pid] = pids[..] {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &Event| matches!(e.body, EventBody::Token(_))) {
        seen.extend(sub.next_event().await);
    }
    kill_process(Pid::from_raw(victim as i32).unwrap(), Signal::KILL).unwrap();
    seen.extend(sub.until_terminal().await);

    assert_well_formed(&seen);
    let restarted = seen.iter().position(|e| matches!(e.body, EventBody::Restarted(_))).expect("a restarted event");
    let EventBody::Restarted(r) = &seen[restarted].body else { unreachable!() };
    assert_eq!(r.attempt, 1);
    assert!(r.reason.contains("signal: 9"), "{}", r.reason);
    assert!(r.resume, "the job continues where it stopped");
    let again = started(&seen[restarted + 1]);
    assert_eq!((again.attempt, again.cold), (2, true));
    let d = done(&seen);
    assert_eq!(d.usage.completion_tokens, 48);

    // The text of both attempts together is the greedy answer: no gap, no repeat.
    let (expected, _) = generate(&InferRequest { prompt: Some("Once upon a time".into()), max_tokens: Some(48), temperature: Some(0.0), ..Default::default() }.validate(0).unwrap()).unwrap();
    let all_text: String = seen.iter().filter_map(|e| match &e.body { EventBody::Token(t) => Some(t.text.as_str()), _ => None }).collect();
    assert_eq!(all_text, expected);
    assert_queue_drains(&nats).await;

    // The killed worker is gone, its replacement serves; after the hive stops, nothing is left.
    let workers = hive.worker_pids();
    assert_eq!(workers.len(), 1);
    assert_ne!(workers[0], victim);
    hive.signal(Signal::TERM);
    assert_eq!(hive.wait(Duration::from_secs(30)), Some(0));
    eventually(Duration::from_secs(5), "worker processes exit with their hive", || hive.worker_pids().is_empty()).await;
}

/// Out of the box (no `--slots`), a hive runs four jobs at once and its
/// worker steps them through the model together, each with the text it
/// gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_runs_concurrent_jobs_batched_with_the_same_text_as_alone() {
    let broker = Broker::start();
    let hive = Hive::start(&broker.url(), HiveOpts { slots: 0, ..HiveOpts::default() }).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Bees are"];
    let req = |p: &str| InferRequest { prompt: Some(p.into()), max_tokens: Some(24), temperature: Some(0.0), ..Default::default() };
    let mut jobs = Vec::new();
    for p in prompts {
        jobs.push(client.submit(MODEL, req(p), Default::default()).await.unwrap());
    }
    let mut workers = std::collections::BTreeSet::new();
    for (p, mut job) in prompts.into_iter().zip(jobs) {
        let events = collect(&mut job).await;
        assert_well_formed(&events);
        workers.insert(started(&events[0]).worker.clone());
        let (expected, _) = generate(&req(p).validate(0).unwrap()).unwrap();
        assert_eq!(text_of(&events), expected, "prompt {p:?}");
    }
    // In the order the hive published them: all four started before any ended.
    let log = all_kept_events(&broker.client().await).await;
    let first_end = log.iter().position(Event::is_terminal).expect("jobs ended");
    let started_before = log[..first_end].iter().filter(|e| matches!(e.body, EventBody::Started(_))).count();
    assert_eq!(started_before, prompts.len(), "every job started before the first one ended");
    assert_eq!(workers.len(), 1, "one worker served all four: {workers:?}");
    assert_eq!(hive.worker_pids().len(), 1);
    let listed = client.workers().await.unwrap();
    assert_eq!(listed.iter().map(|w| w.slots).collect::<Vec<_>>(), [4], "the registry shows the worker's slots");
}

/// A worker that runs one job at a time (candle) says so, and the hive gives
/// it one job at a time: the others wait in the hive, not started, instead of
/// in the worker's pipe under a `started` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_runs_one_job_at_a_time_gets_one_at_a_time() {
    let broker = Broker::start();
    let env = vec![("RBEE_ENGINE".to_owned(), "candle".to_owned())];
    let hive = Hive::start(&broker.url(), HiveOpts { slots: 0, env, ..HiveOpts::default() }).await;
    let client = rbee::Client::connect(&broker.url()).await.unwrap();
    let req = InferRequest { prompt: Some("Bees are".into()), max_tokens: Some(6), temperature: Some(0.0), ..Default::default() };
    let mut jobs = Vec::new();
    for _ in 0..3 {
        jobs.push(client.submit(MODEL, req.clone(), Default::default()).await.unwrap());
    }
    let mut texts = Vec::new();
    for mut job in jobs {
        let events = collect(&mut job).await;
        assert_well_formed(&events);
        texts.push(text_of(&events));
    }
    assert!(texts.iter().all(|t| t == &texts[0] && !t.is_empty()), "greedy jobs, same text: {texts:?}");
    // In the order the hive published them: a job starts only after the one
    // before it streamed its last token (its terminal event may come after:
    // the worker is free once the last token is out).
    let log = all_kept_events(&broker.client().await).await;
    // Per job: where it started and where its last token is.
    let mut spans = std::collections::BTreeMap::new();
    for (at, e) in log.iter().enumerate() {
        match e.body {
            EventBody::Started(_) => {
                spans.insert(e.job_id.as_str(), (at, at));
            }
            EventBody::Token(_) => spans.get_mut(e.job_id.as_str()).expect("a token after its job started").1 = at,
            _ => {}
        }
    }
    let mut spans: Vec<(usize, usize)> = spans.into_values().collect();
    spans.sort();
    assert_eq!(spans.len(), 3);
    for w in spans.windows(2) {
        assert!(w[0].1 < w[1].0, "a job started while the one before was streaming: {spans:?}");
    }
    let listed = client.workers().await.unwrap();
    assert_eq!(listed.iter().map(|w| w.slots).collect::<Vec<_>>(), [1], "candle runs one job at a time: {listed:?}");
    // Its estimate counts one KV cache, not one per --worker-slots: weights
    // (98,362,432 B), a tenth, 64 MiB, and 4,096 tokens of 23,040 B.
    assert_eq!(listed[0].memory, 98_362_432 + 9_836_243 + (64 << 20) + 4096 * 23_040, "{listed:?}");
    assert_eq!(hive.worker_pids().len(), 1);
}
