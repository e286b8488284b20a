//! Claiming jobs from the shared pull consumer, never more than there are free slots.
//!
//! One task owns the consumer side. It keeps pull requests outstanding for
//! exactly `free slots - credits already requested` messages, each request
//! with its own reply subject (`<inbox>.<n>`) so it knows which request a
//! message or a `408 Request Timeout` answers. A claimed job takes a slot
//! permit at once; when the job finishes, dropping its [`SlotGuard`] wakes the
//! claimer, which asks for one more.
//!
//! This is the raw JetStream pull protocol (`$JS.API.CONSUMER.MSG.NEXT`) rather
//! than the client's pull stream, whose bookkeeping was seen to stall a job for
//! 35 s under load (shared/NATS-NOTES.md), and whose default batch of 200 would
//! claim far more jobs than a hive can run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, StatusCode};
use futures::StreamExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How long one pull request waits on the server for messages.
pub const PULL_EXPIRES: Duration = Duration::from_secs(5);

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

/// The claiming side of one consumer.
#[derive(Debug)]
pub struct Claimer {
    pub client: Client,
    pub js: jetstream::Context,
    pub stream: String,
    pub consumer: String,
    pub slots: Arc<Semaphore>,
    pub freed: Arc<Notify>,
}

impl Claimer {
    /// Claims jobs until `stop` is cancelled, handing each to `on_job` with its slot.
    /// On `stop` it unsubscribes its inbox, which makes the server drop the
    /// outstanding pull requests (nats-server checks a request's interest
    /// before delivering to it; verified on 2.9), and hands back (naks) any job
    /// already on its way.
    pub async fn run<F>(self, stop: CancellationToken, mut on_job: F) -> Result<(), async_nats::Error>
    where
        F: FnMut(jetstream::Message, SlotGuard),
    {
        let inbox = self.client.new_inbox();
        let mut sub = self.client.subscribe(format!("{inbox}.*")).await?;
        let next_subject = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", self.stream, self.consumer);
        let mut requests: HashMap<u64, Request> = HashMap::new();
        let mut credits = 0usize;
        let mut next_id = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            {
                let free = self.slots.available_permits();
                if free > credits {
                    let batch = free - credits;
                    next_id += 1;
                    let body = format!(r#"{{"batch":{batch},"expires":{}}}"#, PULL_EXPIRES.as_nanos());
                    match self
                        .client
                        .publish_with_reply(next_subject.clone(), format!("{inbox}.{next_id}"), body.into())
                        .await
                    {
                        Ok(()) => {
                            requests.insert(
                                next_id,
                                Request { remaining: batch, deadline: Instant::now() + PULL_EXPIRES + Duration::from_secs(1) },
                            );
                            credits += batch;
                        }
                        Err(e) => tracing::warn!(error = %e, "pull request failed; retrying"),
                    }
                }
            }
            tokio::select! {
                msg = sub.next() => {
                    let Some(msg) = msg else { return Ok(()) };
                    let id: u64 = msg.subject.rsplit('.').next().and_then(|s| s.parse().ok()).unwrap_or(0);
                    match msg.status {
                        Some(StatusCode::IDLE_HEARTBEAT) => {}
                        Some(status) if status != StatusCode::OK => {
                            // 408 expired, 409 terminated, 404 none: the request is over.
                            if let Some(r) = requests.remove(&id) {
                                credits -= r.remaining;
                            }
                            if status != StatusCode::TIMEOUT {
                                tracing::debug!(%status, description = ?msg.description, "pull request ended");
                            }
                        }
                        _ => {
                            if let Some(r) = requests.get_mut(&id) {
                                r.remaining -= 1;
                                credits -= 1;
                                if r.remaining == 0 {
                                    requests.remove(&id);
                                }
                            }
                            let job = jetstream::Message { message: msg, context: self.js.clone() };
                            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                                // A late answer to a request we gave up on: hand it back.
                                hand_back(&job).await;
                                continue;
                            };
                            on_job(job, SlotGuard { _permit: permit, freed: self.freed.clone() });
                        }
                    }
                }
                _ = self.freed.notified() => {}
                _ = tick.tick() => {
                    // Requests lost with a broker restart never answer; forget them.
                    let now = Instant::now();
                    requests.retain(|_, r| {
                        let keep = r.deadline > now;
                        if !keep {
                            credits -= r.remaining;
                        }
                        keep
                    });
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
