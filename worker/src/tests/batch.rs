//! The batch loop ([`crate::batch::serve`]) driven in-process, as the worker
//! process drives it: the hive's messages in over a channel, frames out to a
//! byte buffer.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;

use rbee_schemas::event::StopReason;
use rbee_schemas::job::GenerateParams;
use rbee_schemas::worker::{read_frame, FromWorker, Outcome};

use super::{load, prompts, raw};
use crate::batch::{serve, Inbound, Job};
use crate::{Engine, EngineChoice};

/// What one job produced through the loop.
#[derive(Debug, Default)]
struct Seen {
    text: String,
    tokens: usize,
    /// Index of its first and last frame in the whole output.
    first: usize,
    last: usize,
    end: Option<Result<Outcome, String>>,
}

/// Runs `jobs` through `serve` with `slots`; each job's frames, by job id.
fn run(engine: &mut Engine, slots: usize, jobs: &[(u64, GenerateParams)], cancel_early: &[u64]) -> BTreeMap<u64, Seen> {
    let (tx, mut rx) = mpsc::channel();
    for &j in cancel_early {
        tx.send(Inbound::Cancel(j)).expect("send");
    }
    for (id, params) in jobs {
        tx.send(Inbound::Job(Job { id: *id, params: params.clone(), resume: None })).expect("send");
    }
    drop(tx);
    let mut out = Vec::new();
    serve(engine, slots, &mut rx, &mut out).expect("serve");
    let mut seen: BTreeMap<u64, Seen> = BTreeMap::new();
    let mut r = out.as_slice();
    let mut i = 0;
    while let Some(frame) = read_frame::<_, FromWorker>(&mut r).expect("frame") {
        let (job, end) = match frame {
            FromWorker::Token { job, text, .. } => {
                let s = seen.entry(job).or_insert_with(|| Seen { first: i, ..Seen::default() });
                s.text.push_str(&text);
                s.tokens += 1;
                (job, None)
            }
            FromWorker::Finished { job, outcome } => (job, Some(Ok(outcome))),
            FromWorker::Failed { job, error } => (job, Some(Err(error.message))),
            other => panic!("unexpected frame {other:?}"),
        };
        let s = seen.entry(job).or_insert_with(|| Seen { first: i, ..Seen::default() });
        assert!(s.end.is_none(), "job {job} has a frame after its end");
        s.end = end;
        s.last = i;
        i += 1;
    }
    seen
}

fn alone(engine: &mut Engine, params: &GenerateParams) -> (String, Outcome) {
    let mut text = String::new();
    let o = engine.generate(params, None, &AtomicBool::new(false), &mut |_, t| text.push_str(t)).expect("generate");
    (text, o)
}

#[test]
fn concurrent_jobs_get_the_text_they_get_alone() {
    let mut engine = load(EngineChoice::Fast);
    // Five jobs on four slots: the fifth starts when the first one ends, and
    // joins the others' decoding with its prompt. Different lengths so they
    // end at different steps.
    let jobs: Vec<(u64, GenerateParams)> = prompts()
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u64 + 10, GenerateParams { max_tokens: 16 + 8 * i as u32, ..p.clone() }))
        .collect();
    let want: Vec<(String, Outcome)> = jobs.iter().map(|(_, p)| alone(&mut engine, p)).collect();
    let seen = run(&mut engine, 4, &jobs, &[]);
    assert_eq!(seen.len(), jobs.len());
    for ((id, _), (text, outcome)) in jobs.iter().zip(&want) {
        let s = &seen[id];
        let got = s.end.clone().expect("the job ended").expect("the job finished");
        assert_eq!(&s.text, text, "job {id}: batched text differs from its text alone");
        assert_eq!(got.stop_reason, outcome.stop_reason, "job {id}");
        assert_eq!(got.usage, outcome.usage, "job {id}");
    }
    // They really ran together: the first four jobs' frames interleave, and
    // the fifth started before the longest of the first four ended.
    let (a, b, e) = (&seen[&10], &seen[&11], &seen[&14]);
    assert!(b.first < a.last && a.first < b.last, "jobs 10 and 11 did not overlap: {a:?} {b:?}");
    assert!(e.first < seen[&13].last, "job 14 waited for all others: {e:?}");
}

#[test]
fn one_slot_runs_jobs_one_after_another() {
    let mut engine = load(EngineChoice::Fast);
    let jobs: Vec<(u64, GenerateParams)> = (0..3).map(|i| (i, raw("The bee", 6 + i as i64))).collect();
    let seen = run(&mut engine, 1, &jobs, &[]);
    for w in [0u64, 1].iter().map(|i| (&seen[i], &seen[&(i + 1)])) {
        assert!(w.0.last < w.1.first, "with one slot job frames must not interleave: {w:?}");
    }
    for (id, params) in &jobs {
        let (text, _) = alone(&mut engine, params);
        assert_eq!(seen[id].text, text);
    }
}

#[test]
fn early_cancels_and_bad_jobs_end_alone() {
    let mut engine = load(EngineChoice::Fast);
    let jobs = vec![
        (1, raw("Once upon a time", 12)),
        (2, raw("Once upon a time", 12)),
        (3, raw(&"bee ".repeat(5000), 4)),
        (4, raw("Once upon a time", 12)),
    ];
    let seen = run(&mut engine, 4, &jobs, &[2]);
    let ended = |id: u64| seen[&id].end.clone().expect("ended");
    assert_eq!(ended(2).expect("finished").stop_reason, StopReason::Cancelled);
    assert_eq!(seen[&2].tokens, 0);
    let too_long = ended(3).expect_err("a prompt over the context fails");
    assert!(too_long.contains("context holds"), "{too_long}");
    for id in [1, 4] {
        let o = ended(id).expect("finished");
        assert_eq!(o.stop_reason, StopReason::MaxTokens);
        assert_eq!(o.usage.completion_tokens, 12);
        assert_eq!(seen[&id].text, seen[&1].text, "the same prompt gives the same text in any slot");
    }
}

#[test]
fn candle_takes_one_job_at_a_time_whatever_the_slots() {
    let mut engine = load(EngineChoice::Candle);
    let jobs: Vec<(u64, GenerateParams)> = (0..2).map(|i| (i, raw("The bee", 5))).collect();
    let seen = run(&mut engine, 4, &jobs, &[]);
    assert!(seen[&0].last < seen[&1].first, "candle jobs must not interleave");
    let (text, _) = alone(&mut engine, &jobs[0].1);
    assert_eq!(seen[&0].text, text);
    assert_eq!(seen[&1].text, text);
}
