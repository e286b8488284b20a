//! The raw JetStream pull protocol over several consumers of one stream, with
//! per-consumer credit accounting. Owned by one task (a claimer).
//!
//! Every pull request (`$JS.API.CONSUMER.MSG.NEXT`) gets its own reply
//! subject `<inbox>.<consumer index>.<request id>`, so a `408 Request Timeout`
//! or `404 No Messages` says which request ended. Job messages, though, arrive
//! with their own stream subject; they are matched to the oldest outstanding
//! request of the consumer named in their ack subject (the server fills a
//! consumer's waiting requests in order). Requests that never answer (lost in
//! a broker restart) are forgotten after their expiry.
//!
//! This is used instead of the client's pull stream, whose bookkeeping was seen
//! to stall a job for 35 s under load (shared/NATS-NOTES.md), and whose default
//! batch of 200 would claim far more jobs than a hive can run.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, StatusCode, Subscriber};
use futures::StreamExt;

/// How long one waiting pull request stays on the server.
pub const PULL_EXPIRES: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Request {
    remaining: usize,
    deadline: Instant,
}

#[derive(Debug)]
struct ConsumerState {
    name: String,
    requests: HashMap<u64, Request>,
    credits: usize,
}

/// What [`Puller::next`] saw.
// Moved once per pulled message; boxing the message would add an allocation per job.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Pulled {
    /// A job from consumer `.0`.
    Job(usize, jetstream::Message),
    /// A request of consumer `consumer` ended; `empty` when the consumer had
    /// nothing (404 on a no-wait pull, or 408 after waiting).
    Ended { consumer: usize, empty: bool },
    /// Nothing to report (a heartbeat, an unknown message, expired requests forgotten).
    Idle,
    /// The connection closed for good.
    Closed,
}

#[derive(Debug)]
pub struct Puller {
    client: Client,
    js: jetstream::Context,
    stream: String,
    inbox: String,
    sub: Subscriber,
    consumers: Vec<ConsumerState>,
    next_id: u64,
    tick: tokio::time::Interval,
}

impl Puller {
    pub async fn new(client: Client, js: jetstream::Context, stream: &str, consumers: &[&str]) -> Result<Self, async_nats::Error> {
        let inbox = client.new_inbox();
        let sub = client.subscribe(format!("{inbox}.*.*")).await?;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let consumers = consumers
            .iter()
            .map(|c| ConsumerState { name: (*c).to_owned(), requests: HashMap::new(), credits: 0 })
            .collect();
        Ok(Self { client, js, stream: stream.to_owned(), inbox, sub, consumers, next_id: 0, tick })
    }

    /// Jobs asked of consumer `i` and not yet delivered.
    pub fn credits(&self, i: usize) -> usize {
        self.consumers[i].credits
    }

    /// Asks consumer `i` for up to `batch` jobs; with `no_wait` the server
    /// answers at once (404 when it has none), else it waits [`PULL_EXPIRES`].
    pub async fn request(&mut self, i: usize, batch: usize, no_wait: bool) {
        if batch == 0 {
            return;
        }
        self.next_id += 1;
        let id = self.next_id;
        let state = &mut self.consumers[i];
        let subject = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", self.stream, state.name);
        let reply = format!("{}.{i}.{id}", self.inbox);
        let body = if no_wait {
            format!(r#"{{"batch":{batch},"no_wait":true}}"#)
        } else {
            format!(r#"{{"batch":{batch},"expires":{}}}"#, PULL_EXPIRES.as_nanos())
        };
        match self.client.publish_with_reply(subject, reply, body.into()).await {
            Ok(()) => {
                let deadline = Instant::now() + PULL_EXPIRES + Duration::from_secs(1);
                state.requests.insert(id, Request { remaining: batch, deadline });
                state.credits += batch;
            }
            Err(e) => tracing::warn!(error = %e, consumer = %state.name, "pull request failed; retrying"),
        }
    }

    /// The next thing that happened.
    pub async fn next(&mut self) -> Pulled {
        tokio::select! {
            msg = self.sub.next() => {
                let Some(msg) = msg else { return Pulled::Closed };
                match msg.status {
                    Some(StatusCode::IDLE_HEARTBEAT) => Pulled::Idle,
                    Some(status) if status != StatusCode::OK => {
                        // Status messages come on the request's own reply subject.
                        let mut parts = msg.subject.rsplit('.');
                        let id: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                        let Some(i) = parts.next().and_then(|s| s.parse::<usize>().ok()).filter(|i| *i < self.consumers.len()) else {
                            return Pulled::Idle;
                        };
                        let state = &mut self.consumers[i];
                        if let Some(r) = state.requests.remove(&id) {
                            state.credits -= r.remaining;
                        }
                        if status != StatusCode::TIMEOUT && status != StatusCode::NOT_FOUND {
                            tracing::debug!(%status, description = ?msg.description, "pull request ended");
                        }
                        Pulled::Ended { consumer: i, empty: status == StatusCode::TIMEOUT || status == StatusCode::NOT_FOUND }
                    }
                    _ => {
                        let job = jetstream::Message { message: msg, context: self.js.clone() };
                        let Some(i) = job.info().ok().and_then(|info| self.consumers.iter().position(|c| c.name == info.consumer)) else {
                            tracing::warn!(subject = %job.subject, "a message from an unknown consumer; handing it back");
                            hand_back(&job).await;
                            return Pulled::Idle;
                        };
                        let state = &mut self.consumers[i];
                        if let Some(id) = state.requests.keys().min().copied() {
                            if let Some(r) = state.requests.get_mut(&id) {
                                r.remaining -= 1;
                                state.credits -= 1;
                                if r.remaining == 0 {
                                    state.requests.remove(&id);
                                }
                            }
                        }
                        Pulled::Job(i, job)
                    }
                }
            }
            _ = self.tick.tick() => {
                let now = Instant::now();
                for state in &mut self.consumers {
                    let mut lost = 0;
                    state.requests.retain(|_, r| {
                        let keep = r.deadline > now;
                        if !keep {
                            lost += r.remaining;
                        }
                        keep
                    });
                    state.credits -= lost;
                }
                Pulled::Idle
            }
        }
    }

    /// Stops pulling: unsubscribing makes the server drop the outstanding
    /// requests (it checks a request's interest before delivering to it;
    /// verified on 2.9), and jobs already on their way are handed back.
    pub async fn close(mut self) -> Result<(), async_nats::Error> {
        self.sub.unsubscribe().await?;
        self.client.flush().await?;
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(50), self.sub.next()).await {
            if msg.status.is_none() || msg.status == Some(StatusCode::OK) {
                hand_back(&jetstream::Message { message: msg, context: self.js.clone() }).await;
            }
        }
        Ok(())
    }
}

/// Returns a job to the queue at once, unstarted.
pub async fn hand_back(job: &jetstream::Message) {
    if let Err(e) = job.ack_with(AckKind::Nak(None)).await {
        tracing::warn!(error = %e, "handing back a job failed; it returns after ack_wait");
    }
}
