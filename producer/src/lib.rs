//! `rbee`: submit inference jobs to rbee over NATS and stream their events.
//!
//! ```no_run
//! # async fn demo() -> Result<(), rbee::ClientError> {
//! use futures::StreamExt;
//! use rbee_schemas::event::EventBody;
//! use rbee_schemas::job::InferRequest;
//!
//! let client = rbee::Client::connect("nats://127.0.0.1:4222").await?;
//! let mut job = client.submit("smollm2-135m", InferRequest::prompt("Hello"), Default::default()).await?;
//! while let Some(event) = job.next().await {
//!     if let EventBody::Token(t) = event?.body {
//!         print!("{}", t.text);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! [`Client::submit`] subscribes to the job's event subject *before* it
//! publishes the job (a fast hive can answer before the publish is even
//! acked), then yields events in `seq` order until the terminal one. The job
//! is published through JetStream with the job id as `Nats-Msg-Id`, so a
//! retried submission of the same id is de-duplicated by the broker.
//!
//! The crate also holds the `rbee` CLI ([`cli`]) and the local stack it can
//! start ([`local`]).

pub mod cli;
pub mod local;

use std::pin::Pin;
use std::task::{Context, Poll};

use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::Subscriber;
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use rbee_schemas::codec::Encoding;
use rbee_schemas::event::Event;
use rbee_schemas::job::{is_valid_job_id, InferRequest};
use rbee_schemas::model::ModelRef;
use rbee_schemas::subjects::{self, HEADER_CONTENT_TYPE};

/// What can go wrong on the client side. Job failures are not errors here:
/// they arrive as `error` events with their code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach NATS at {url}: {source}. Is nats-server running? (rbee up starts a local one)")]
    Connect { url: String, source: async_nats::ConnectError },
    #[error("{0}")]
    Usage(String),
    #[error(
        "no rbee job stream on this broker ({0}): no hive has attached to it yet. Start one (rbee up, or rbee-hive --nats-url URL)"
    )]
    NoStream(String),
    #[error("the job queue is full ({0}); try again later")]
    QueueFull(String),
    #[error("publishing the job failed: {0}")]
    Publish(String),
    #[error("subscribing to {subject} failed: {source}")]
    Subscribe { subject: String, source: async_nats::SubscribeError },
    #[error("event {got} arrived while {want} was expected: events were lost (the subscriber was too slow)")]
    Gap { want: u64, got: u64 },
    #[error("an event could not be decoded: {0}")]
    Decode(String),
    #[error("the connection closed before the job ended")]
    Closed,
}

/// How to submit a job.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    /// Job id; default: the request's `id`, else a fresh unique one.
    pub job_id: Option<String>,
    /// Body encoding; events come back in the same one.
    pub encoding: Encoding,
}

/// A connection to the rbee bus.
#[derive(Debug, Clone)]
pub struct Client {
    nats: async_nats::Client,
    js: jetstream::Context,
}

/// A fresh job id: 22 characters of `[0-9A-Za-z]`.
pub fn new_job_id() -> String {
    nuid::next().to_string()
}

impl Client {
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let nats = async_nats::ConnectOptions::new()
            .name("rbee")
            .connect(url)
            .await
            .map_err(|source| ClientError::Connect { url: url.to_owned(), source })?;
        Ok(Self::from_nats(nats))
    }

    /// Wraps an existing connection.
    pub fn from_nats(nats: async_nats::Client) -> Self {
        let js = jetstream::new(nats.clone());
        Self { nats, js }
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Submits a job for `model` (an alias or `hf:` reference) and returns
    /// the stream of its events.
    pub async fn submit(&self, model: &str, mut req: InferRequest, opts: SubmitOptions) -> Result<JobStream, ClientError> {
        let model_ref = ModelRef::parse(model).map_err(|e| ClientError::Usage(e.to_string()))?;
        let job_id = opts.job_id.or_else(|| req.id.clone()).unwrap_or_else(new_job_id);
        if !is_valid_job_id(&job_id) {
            return Err(ClientError::Usage(format!("job id {job_id:?} may only contain A-Z a-z 0-9 _ - (at most 128)")));
        }
        if req.model.is_none() {
            req.model = Some(model_ref.to_string());
        }
        let reply = req.reply_to.clone().unwrap_or_else(|| subjects::events_subject(&job_id));
        let events = self
            .nats
            .subscribe(reply.clone())
            .await
            .map_err(|source| ClientError::Subscribe { subject: reply.clone(), source })?;
        let mut publish = PublishMessage::build()
            .payload(Bytes::from(opts.encoding.encode(&req)))
            .message_id(&job_id);
        if opts.encoding == Encoding::Msgpack {
            publish = publish.header(HEADER_CONTENT_TYPE, opts.encoding.content_type());
        }
        let subject = subjects::infer_subject(&model_ref.subject_key());
        let ack = self.js.send_publish(subject.clone(), publish).await.map_err(|e| publish_error(&subject, e))?;
        let ack = async move { ack.await.map(|_| ()).map_err(|e| publish_error(&subject, e)) }.boxed();
        Ok(JobStream { job_id, encoding: opts.encoding, events, ack: Some(ack), next_seq: 0, ended: false })
    }
}

fn publish_error(subject: &str, e: jetstream::context::PublishError) -> ClientError {
    use jetstream::context::PublishErrorKind as K;
    let text = e.to_string();
    match e.kind() {
        K::StreamNotFound => ClientError::NoStream(subject.to_owned()),
        _ if text.contains("maximum messages") || text.contains("maximum bytes") => ClientError::QueueFull(text),
        _ => ClientError::Publish(text),
    }
}

/// The events of one job, in order, ending with its terminal event.
pub struct JobStream {
    job_id: String,
    encoding: Encoding,
    events: Subscriber,
    ack: Option<futures::future::BoxFuture<'static, Result<(), ClientError>>>,
    next_seq: u64,
    ended: bool,
}

impl std::fmt::Debug for JobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStream").field("job_id", &self.job_id).field("next_seq", &self.next_seq).finish()
    }
}

impl JobStream {
    pub fn job_id(&self) -> &str {
        &self.job_id
    }
}

impl Stream for JobStream {
    type Item = Result<Event, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(ack) = self.ack.as_mut() {
            if let Poll::Ready(result) = ack.poll_unpin(cx) {
                self.ack = None;
                if let Err(e) = result {
                    self.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
        loop {
            let msg = match self.events.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(ClientError::Closed)));
                }
                Poll::Ready(Some(m)) => m,
            };
            let event: Event = match self.encoding.decode(&msg.payload) {
                Ok(e) => e,
                Err(e) => return Poll::Ready(Some(Err(ClientError::Decode(e)))),
            };
            if event.job_id != self.job_id || event.seq < self.next_seq {
                continue; // another job on a shared reply subject, or a repeat
            }
            if event.seq > self.next_seq {
                self.ended = true;
                return Poll::Ready(Some(Err(ClientError::Gap { want: self.next_seq, got: event.seq })));
            }
            self.next_seq += 1;
            if event.is_terminal() {
                self.ended = true;
            }
            return Poll::Ready(Some(Ok(event)));
        }
    }
}
