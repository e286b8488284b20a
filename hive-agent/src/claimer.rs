//! Claiming jobs from the two lanes' pull consumers, never more than there are free slots.
//!
//! One task owns both consumers. Per lane it keeps pull requests outstanding
//! for `free slots - credits already requested`, each request with its own
//! reply subject (`<inbox>.<lane>.<n>`) so it knows which request a message or
//! a `408 Request Timeout` answers. A claimed job takes a slot permit at once;
//! when the job finishes, dropping its [`SlotGuard`] wakes the claimer.
//!
//! Priority: an idle hive waits on both lanes. Once it knows batch work is
//! waiting (a batch job arrived for a slot already taken: it is handed back at
//! once, never started), each free slot is first offered to the interactive
//! lane with a no-wait pull, and only if that lane is empty to the batch lane.
//! Batch is not starved: after 3 interactive claims in a row while batch work
//! waits, the next free slot goes to the batch lane.
//!
//! This is the raw JetStream pull protocol (`$JS.API.CONSUMER.MSG.NEXT`)
//! rather than the client's pull stream, whose bookkeeping was seen to stall a
//! job for 35 s under load (shared/NATS-NOTES.md), and whose default batch of
//! 200 would claim far more jobs than a hive can run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, StatusCode};
use futures::StreamExt;
use rbee_schemas::subjects::Lane;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How long one pull request waits on the server for messages.
pub const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Interactive claims in a row, while batch work waits, before batch gets a slot.
pub const BATCH_EVERY: u32 = 4;

/// A job's hold on one of the hive's slots; dropping it frees the slot.
#[derive(Debug)]
pub struct SlotGuard {
    _permit: OwnedSemaphorePermit,
    freed: Arc<Notify>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.freed.notify_one();
    }
}

#[derive(Debug)]
struct Request {
    remaining: usize,
    deadline: Instant,
}

/// What to ask a lane for.
#[derive(Debug, Clone, Copy)]
struct Pull {
    lane: Lane,
    batch: usize,
    no_wait: bool,
}

#[derive(Debug, Default)]
struct LaneState {
    requests: HashMap<u64, Request>,
    credits: usize,
}

impl LaneState {
    fn forget(&mut self, id: u64) {
        if let Some(r) = self.requests.remove(&id) {
            self.credits -= r.remaining;
        }
    }

    /// A job arrived for this lane. Job messages carry their own subject, not
    /// the request's reply subject, so which request it answers is not known;
    /// the server fills a consumer's waiting requests in order, so it is the
    /// oldest one.
    fn delivered(&mut self) {
        if let Some(id) = self.requests.keys().min().copied() {
            if let Some(r) = self.requests.get_mut(&id) {
                r.remaining -= 1;
                self.credits -= 1;
                if r.remaining == 0 {
                    self.requests.remove(&id);
                }
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let mut lost = 0;
        self.requests.retain(|_, r| {
            let keep = r.deadline > now;
            if !keep {
                lost += r.remaining;
            }
            keep
        });
        self.credits -= lost;
    }
}

/// The claiming side of the two lane consumers.
#[derive(Debug)]
pub struct Claimer {
    pub client: Client,
    pub js: jetstream::Context,
    pub stream: String,
    pub slots: Arc<Semaphore>,
    pub freed: Arc<Notify>,
}

fn lane_index(lane: Lane) -> usize {
    match lane {
        Lane::Interactive => 0,
        Lane::Batch => 1,
    }
}



impl Claimer {
    /// Claims jobs until `stop` is cancelled, handing each to `on_job` with its
    /// lane and slot. On `stop` it unsubscribes its inbox, which makes the
    /// server drop the outstanding pull requests (nats-server checks a
    /// request's interest before delivering to it; verified on 2.9), and hands
    /// back (naks) any job already on its way.
    pub async fn run<F>(self, stop: CancellationToken, mut on_job: F) -> Result<(), async_nats::Error>
    where
        F: FnMut(jetstream::Message, Lane, SlotGuard),
    {
        let inbox = self.client.new_inbox();
        let mut sub = self.client.subscribe(format!("{inbox}.*.*")).await?;
        let mut lanes = [LaneState::default(), LaneState::default()];
        let mut next_id = 0u64;
        // Priority bookkeeping.
        let mut interactive_streak = 0u32;
        let mut batch_waiting = false;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let mut interactive_empty = false;
        loop {
            let free = self.slots.available_permits();
            let [i, b] = [lanes[0].credits, lanes[1].credits];
            let mut pulls: Vec<Pull> = Vec::with_capacity(2);
            if !batch_waiting {
                // Idle or interactive-only: wait on both lanes.
                for (lane, have) in [(Lane::Interactive, i), (Lane::Batch, b)] {
                    if free > have {
                        pulls.push(Pull { lane, batch: free - have, no_wait: false });
                    }
                }
            } else if interactive_streak + 1 >= BATCH_EVERY || interactive_empty {
                // Batch's turn, or no interactive job waits: one lane at a time.
                if free > b && i == 0 {
                    pulls.push(Pull { lane: Lane::Batch, batch: free - b, no_wait: false });
                }
            } else if free > i && b == 0 {
                pulls.push(Pull { lane: Lane::Interactive, batch: free - i, no_wait: true });
            }
            for pull in pulls {
                let state = &mut lanes[lane_index(pull.lane)];
                next_id += 1;
                let subject = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", self.stream, pull.lane.consumer());
                let reply = format!("{inbox}.{}.{next_id}", lane_index(pull.lane));
                let body = if pull.no_wait {
                    format!(r#"{{"batch":{},"no_wait":true}}"#, pull.batch)
                } else {
                    format!(r#"{{"batch":{},"expires":{}}}"#, pull.batch, PULL_EXPIRES.as_nanos())
                };
                match self.client.publish_with_reply(subject, reply, body.into()).await {
                    Ok(()) => {
                        let deadline = Instant::now() + PULL_EXPIRES + Duration::from_secs(1);
                        state.requests.insert(next_id, Request { remaining: pull.batch, deadline });
                        state.credits += pull.batch;
                    }
                    Err(e) => tracing::warn!(error = %e, "pull request failed; retrying"),
                }
            }
            tokio::select! {
                msg = sub.next() => {
                    let Some(msg) = msg else { return Ok(()) };
                    match msg.status {
                        Some(StatusCode::IDLE_HEARTBEAT) => {}
                        Some(status) if status != StatusCode::OK => {
                            // Status messages come on the request's own reply subject.
                            let mut parts = msg.subject.rsplit('.');
                            let id: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                            let lane = if parts.next() == Some("1") { Lane::Batch } else { Lane::Interactive };
                            let state = &mut lanes[lane_index(lane)];
                            // 408 expired, 409 terminated, 404 none: the request is over.
                            state.forget(id);
                            let empty = status == StatusCode::TIMEOUT || status == StatusCode::NOT_FOUND;
                            match lane {
                                Lane::Batch if empty => batch_waiting = false,
                                Lane::Interactive if empty => interactive_empty = true,
                                _ => {}
                            }
                        }
                        _ => {
                            let job = jetstream::Message { message: msg, context: self.js.clone() };
                            let lane = match job.info() {
                                Ok(i) if i.consumer == Lane::Batch.consumer() => Lane::Batch,
                                _ => Lane::Interactive,
                            };
                            lanes[lane_index(lane)].delivered();
                            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                                // Both lanes answered for one slot, or a late answer to a
                                // request we gave up on: hand it back unstarted.
                                if lane == Lane::Batch {
                                    batch_waiting = true;
                                }
                                hand_back(&job).await;
                                continue;
                            };
                            match lane {
                                Lane::Interactive if batch_waiting => interactive_streak += 1,
                                Lane::Interactive => {}
                                Lane::Batch => {
                                    interactive_streak = 0;
                                    interactive_empty = false;
                                    batch_waiting = job.info().map(|i| i.pending > 0).unwrap_or(false);
                                }
                            }
                            on_job(job, lane, SlotGuard { _permit: permit, freed: self.freed.clone() });
                        }
                    }
                }
                _ = self.freed.notified() => {}
                _ = tick.tick() => {
                    // Requests lost with a broker restart never answer; forget them.
                    let now = Instant::now();
                    for l in &mut lanes {
                        l.expire(now);
                    }
                }
                _ = stop.cancelled() => {
                    sub.unsubscribe().await?;
                    self.client.flush().await?;
                    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(50), sub.next()).await {
                        if msg.status.is_none() || msg.status == Some(StatusCode::OK) {
                            hand_back(&jetstream::Message { message: msg, context: self.js.clone() }).await;
                        }
                    }
                    return Ok(());
                }
            }
        }
    }
}

async fn hand_back(job: &jetstream::Message) {
    if let Err(e) = job.ack_with(AckKind::Nak(None)).await {
        tracing::warn!(error = %e, "handing back a job failed; it returns after ack_wait");
    }
}
