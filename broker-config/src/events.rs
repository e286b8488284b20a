//! Where a job's events are published, and how.
//!
//! Every event goes to `rbee.events.<job id>` through JetStream, so the
//! `RBEE_EVENTS` stream acknowledges that it kept it: a live subscriber sees
//! it at once, and a client that missed it (slow, reconnecting, late) replays
//! it from the stream. An event whose store was not acknowledged (the broker
//! went away) is published again; readers drop repeats by `seq`. A job with
//! its own `reply_to` gets each event there too, as a plain publish.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use rbee_schemas::codec::Encoding;
use rbee_schemas::event::Event;
use rbee_schemas::subjects::{self, HEADER_CONTENT_TYPE};

/// How long [`EventPublisher::flush`] keeps republishing before it gives up.
pub const FLUSH_PATIENCE: Duration = Duration::from_secs(120);

type Ack = BoxFuture<'static, Result<(), String>>;

/// Publishes the events of one job and tracks the stream's acknowledgements.
/// Events whose store is unconfirmed before `publish` waits for the oldest
/// (well under async-nats's 5,000 ack permits per JetStream context).
const MAX_IN_FLIGHT: usize = 1024;

pub struct EventPublisher {
    client: Client,
    js: jetstream::Context,
    kept: Subject,
    reply: Option<Subject>,
    encoding: Encoding,
    /// Events sent to the stream whose store is not confirmed yet.
    pending: VecDeque<(Bytes, Ack)>,
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher").field("kept", &self.kept).field("pending", &self.pending.len()).finish()
    }
}

impl EventPublisher {
    pub fn new(client: Client, job_id: &str, reply_to: &str, encoding: Encoding) -> Self {
        let kept = subjects::events_subject(job_id);
        let reply = (reply_to != kept).then(|| Subject::from(reply_to));
        let js = jetstream::new(client.clone());
        Self { client, js, kept: Subject::from(kept), reply, encoding, pending: VecDeque::new() }
    }

    fn headers(&self) -> Option<HeaderMap> {
        (self.encoding == Encoding::Msgpack).then(|| {
            let mut h = HeaderMap::new();
            h.insert(HEADER_CONTENT_TYPE, self.encoding.content_type());
            h
        })
    }

    // `&mut self`, not `&self`: the future must not need `EventPublisher: Sync`.
    async fn send_kept(&mut self, payload: Bytes) -> Result<Ack, String> {
        let mut msg = PublishMessage::build().payload(payload);
        if let Some(h) = self.headers() {
            msg = msg.headers(h);
        }
        let fut: PublishAckFuture = self.js.send_publish(self.kept.clone(), msg).await.map_err(|e| e.to_string())?;
        Ok(async move { fut.await.map(|_| ()).map_err(|e| e.to_string()) }.boxed())
    }

    /// Publishes one event. Does not wait for the stream's ack (see [`flush`](Self::flush)).
    pub async fn publish(&mut self, event: &Event) -> Result<(), async_nats::PublishError> {
        let payload = Bytes::from(self.encoding.encode(event));
        if let Some(reply) = &self.reply {
            match self.headers() {
                Some(h) => self.client.publish_with_headers(reply.clone(), h, payload.clone()).await?,
                None => self.client.publish(reply.clone(), payload.clone()).await?,
            }
        }
        // Each unconfirmed event holds one of the context's ack permits until
        // its future is dropped: wait for the oldest before there are too
        // many, or `send_publish` would wait for a permit only we can free.
        while self.pending.len() >= MAX_IN_FLIGHT {
            let Some((old, ack)) = self.pending.pop_front() else { break };
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "an event was not stored; publishing it again");
                let again = match self.send_kept(old.clone()).await {
                    Ok(a) => a,
                    Err(e) => async move { Err(e) }.boxed(),
                };
                self.pending.push_back((old, again));
            }
        }
        match self.send_kept(payload.clone()).await {
            Ok(ack) => self.pending.push_back((payload, ack)),
            Err(e) => {
                tracing::warn!(error = %e, "publishing an event failed; it is sent again before the job ends");
                self.pending.push_back((payload, async { Err("not sent".to_owned()) }.boxed()));
            }
        }
        self.reap().await;
        Ok(())
    }

    /// Collects the acks that are in; republishes events whose store failed.
    async fn reap(&mut self) {
        while let Some((_, ack)) = self.pending.front_mut() {
            match ack.now_or_never() {
                None => break,
                Some(Ok(())) => {
                    self.pending.pop_front();
                }
                Some(Err(e)) => {
                    let (payload, _) = self.pending.pop_front().expect("front exists");
                    tracing::warn!(error = %e, "an event was not stored; publishing it again");
                    let ack = match self.send_kept(payload.clone()).await {
                        Ok(a) => a,
                        Err(e) => async move { Err(e) }.boxed(),
                    };
                    self.pending.push_back((payload, ack));
                    break;
                }
            }
        }
    }

    /// Waits until the stream has every event published so far, republishing
    /// any whose store failed, for up to [`FLUSH_PATIENCE`]. False if it gave up.
    pub async fn flush(&mut self) -> bool {
        let started = Instant::now();
        while let Some((payload, ack)) = self.pending.pop_front() {
            if ack.await.is_ok() {
                continue;
            }
            if started.elapsed() > FLUSH_PATIENCE {
                tracing::error!("the events stream did not take this job's events for {FLUSH_PATIENCE:?}; giving up");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let ack = match self.send_kept(payload.clone()).await {
                Ok(a) => a,
                Err(e) => async move { Err(e) }.boxed(),
            };
            self.pending.push_front((payload, ack));
        }
        true
    }
}

/// Publishes one event (a terminal event decided outside a running job) and
/// waits until it is kept.
pub async fn publish_once(client: &Client, job_id: &str, reply_to: &str, encoding: Encoding, event: &Event) -> bool {
    let mut p = EventPublisher::new(client.clone(), job_id, reply_to, encoding);
    if p.publish(event).await.is_err() {
        return false;
    }
    p.flush().await
}
