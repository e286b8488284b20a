//! `rbee`: submit inference jobs to rbee over NATS and stream their events.
//!
//! ```no_run
//! # async fn demo() -> Result<(), rbee::ClientError> {
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
//! acked), then yields events in `seq` order until the terminal one, filling
//! any gap from the kept events ([`stream`]). The job is published through
//! JetStream with the job id as `Nats-Msg-Id`; submitting an id again runs
//! nothing new and yields the first submission's events.
//!
//! [`jobs`] has the rest of the job API (show, list, cancel, retry, queue
//! depth); the crate also holds the `rbee` CLI ([`cli`]) and the local stack
//! it can start ([`local`]).

pub mod cli;
pub mod fleet;
pub mod jobs;
pub mod local;
pub mod stream;

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::FutureExt;
use rbee_schemas::codec::Encoding;
use rbee_schemas::hive::HiveInfo;
use rbee_schemas::job::{is_valid_job_id, InferRequest};
use rbee_schemas::model::ModelRef;
use rbee_schemas::subjects::{self, Lane, HEADER_CONTENT_TYPE};

pub use stream::JobStream;

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
    #[error("no hive is attached to this broker: the job would wait in the queue. Start one (rbee up, or rbee-hive --nats-url URL)")]
    NoHive,
    #[error("the job queue is full ({0})")]
    QueueFull(String),
    #[error("publishing the job failed: {0}")]
    Publish(String),
    #[error("subscribing to {subject} failed: {source}")]
    Subscribe { subject: String, source: async_nats::SubscribeError },
    #[error("reading the kept events failed: {0}")]
    Replay(String),
    #[error("the connection closed before the job ended")]
    Closed,
    #[error("events {from} to {to} of the job were lost by the broker (a crash before they were stored); the job's end follows")]
    Lost { from: u64, to: u64 },
    #[error("no job {0}: not in the queue and no record of it (records are kept 24 h)")]
    NotFound(String),
    #[error("{0}")]
    Broker(String),
    #[error("no hive {hive} is heartbeating on this broker; live hives: {live}")]
    UnknownHive { hive: String, live: String },
    #[error(
        "hive {hive} runs rbee {hive_version} (protocol v{hive_protocol}); this rbee is {ours} (protocol v{our_protocol}). \
         Upgrade the older side so both speak protocol v{newest}: install the same rbee release on the hive's machine and here"
    )]
    Incompatible { hive: String, hive_version: String, hive_protocol: u32, ours: String, our_protocol: u32, newest: u32 },
}

/// How to submit a job.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    /// Job id; default: the request's `id`, else a fresh unique one.
    pub job_id: Option<String>,
    /// Body encoding; events come back in the same one.
    pub encoding: Encoding,
    /// Priority lane.
    pub lane: Lane,
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

fn broker_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Broker(e.to_string())
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

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
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
        let subject = subjects::job_subject(opts.lane, &model_ref.subject_key());
        self.publish_job(subject, Bytes::from(opts.encoding.encode(&req)), job_id, opts.encoding).await
    }

    /// Subscribes to the job's events, then publishes it (with its id as
    /// `Nats-Msg-Id`); the stream yields the events in order.
    async fn publish_job(&self, subject: String, body: Bytes, job_id: String, encoding: Encoding) -> Result<JobStream, ClientError> {
        // Events always reach rbee.events.<id>; a custom reply_to gets them too.
        let live_subject = subjects::events_subject(&job_id);
        let live = self
            .nats
            .subscribe(live_subject.clone())
            .await
            .map_err(|source| ClientError::Subscribe { subject: live_subject, source })?;
        let mut publish = PublishMessage::build().payload(body).message_id(&job_id);
        if encoding == Encoding::Msgpack {
            publish = publish.header(HEADER_CONTENT_TYPE, encoding.content_type());
        }
        let ack = self.js.send_publish(subject.clone(), publish).await.map_err(|e| publish_error(&subject, e))?;
        let ack = async move { ack.await.map(|a| a.duplicate).map_err(|e| publish_error(&subject, e)) }.boxed();
        let kept = self.js.get_stream_no_info(subjects::EVENTS_STREAM).await.map_err(broker_err)?;
        Ok(JobStream::new(job_id, encoding, live, kept, Some(ack), 0))
    }

    /// The events of an existing job, replayed from `from_seq`, then live.
    pub async fn follow(&self, job_id: &str, from_seq: u64) -> Result<JobStream, ClientError> {
        let live_subject = subjects::events_subject(job_id);
        let live = self
            .nats
            .subscribe(live_subject.clone())
            .await
            .map_err(|source| ClientError::Subscribe { subject: live_subject, source })?;
        let kept = self.js.get_stream_no_info(subjects::EVENTS_STREAM).await.map_err(broker_err)?;
        Ok(JobStream::new(job_id.to_owned(), Encoding::Json, live, kept, None, from_seq).replay_first())
    }

    /// Every JSON value of a registry bucket that decodes as `T`; none if
    /// the bucket does not exist yet (no hive ever attached).
    async fn bucket_values<T: serde::de::DeserializeOwned>(&self, bucket: &str) -> Result<Vec<T>, ClientError> {
        let Ok(store) = self.js.get_key_value(bucket).await else {
            return Ok(vec![]);
        };
        let entries = rbee_broker::kv_json_values::<T>(&store).await.map_err(broker_err)?;
        Ok(entries.into_iter().map(|(_, value)| value).collect())
    }

    /// The hives heartbeating now.
    pub async fn hives(&self) -> Result<Vec<HiveInfo>, ClientError> {
        let mut out: Vec<HiveInfo> = self.bucket_values(subjects::HIVES_BUCKET).await?;
        out.sort_by(|a, b| a.hive_id.cmp(&b.hive_id));
        Ok(out)
    }
}

fn publish_error(subject: &str, e: jetstream::context::PublishError) -> ClientError {
    use jetstream::context::PublishErrorKind as K;
    let text = e.to_string();
    let source = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
    match e.kind() {
        K::StreamNotFound => ClientError::NoStream(subject.to_owned()),
        _ if [&text, &source].iter().any(|t| t.contains("maximum messages") || t.contains("maximum bytes")) => {
            ClientError::QueueFull(if source.is_empty() { text } else { source })
        }
        _ => ClientError::Publish(if source.is_empty() { text } else { format!("{text}: {source}") }),
    }
}
