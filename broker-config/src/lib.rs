//! rbee's broker side: the JetStream streams, the shared consumer and the KV
//! buckets, defined here and nowhere else, created idempotently by every hive
//! at start ([`ensure`]); and [`server`], which runs a local nats-server for the
//! embedded default, `rbee up` and the tests.
//!
//! Everything works on nats-server 2.9 (Debian bookworm): no multi-filter
//! consumers, no priority groups, no per-message TTL.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use rbee_schemas::subjects;

pub mod events;
pub mod queue;
pub mod records;
pub mod server;

/// Tunable limits of the streams and buckets. [`Limits::default`] is the
/// documented single-node default (broker-config/README.md).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most jobs waiting in the queue; past it, publishing fails (QUEUE_FULL).
    pub jobs_max_msgs: i64,
    /// Most bytes of jobs waiting in the queue.
    pub jobs_max_bytes: i64,
    /// How long a job id (`Nats-Msg-Id`) is remembered for de-duplication.
    pub duplicate_window: Duration,
    /// How long events are kept for replay.
    pub events_max_age: Duration,
    /// Most bytes of events kept.
    pub events_max_bytes: i64,
    /// How long a claimed job may go without an ack or progress before the
    /// broker hands it to another hive.
    pub ack_wait: Duration,
    /// How long job records are kept.
    pub job_records_max_age: Duration,
    /// How long dead letters are kept for `rbee jobs retry`.
    pub dead_max_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            jobs_max_msgs: 100_000,
            jobs_max_bytes: 1024 * 1024 * 1024,
            duplicate_window: Duration::from_secs(120),
            events_max_age: Duration::from_secs(3600),
            events_max_bytes: 1024 * 1024 * 1024,
            ack_wait: Duration::from_secs(30),
            job_records_max_age: Duration::from_secs(24 * 3600),
            dead_max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The jobs stream: a work queue on file storage. A job leaves it when a hive
/// acks (done) or terminates (rejected) it. `discard: new` makes a full queue
/// refuse new jobs instead of silently dropping old ones.
pub fn jobs_stream(l: &Limits) -> stream::Config {
    stream::Config {
        name: subjects::JOBS_STREAM.to_owned(),
        description: Some("rbee jobs waiting for a hive (work queue)".to_owned()),
        subjects: vec![subjects::JOBS_STREAM_SUBJECTS.to_owned()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        max_messages: l.jobs_max_msgs,
        max_bytes: l.jobs_max_bytes,
        max_message_size: rbee_schemas::job::MAX_JOB_BYTES as i32,
        duplicate_window: l.duplicate_window,
        allow_direct: true,
        ..Default::default()
    }
}

/// Dead letters: the original job (headers and body) of every job that ran
/// out of attempts, under `rbee.dead.<job id>`, for `rbee jobs retry`.
pub fn dead_stream(l: &Limits) -> stream::Config {
    stream::Config {
        name: subjects::DEAD_STREAM.to_owned(),
        description: Some("rbee jobs that ran out of attempts".to_owned()),
        subjects: vec![subjects::DEAD_STREAM_SUBJECTS.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        max_age: l.dead_max_age,
        max_messages_per_subject: 1,
        allow_direct: true,
        ..Default::default()
    }
}

/// The events stream: every event published on `rbee.events.>` is kept for
/// `events_max_age`, so a client can replay a job's events from `seq` 0.
pub fn events_stream(l: &Limits) -> stream::Config {
    stream::Config {
        name: subjects::EVENTS_STREAM.to_owned(),
        description: Some("rbee job events, kept for replay".to_owned()),
        subjects: vec![subjects::EVENTS_STREAM_SUBJECTS.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        max_age: l.events_max_age,
        max_bytes: l.events_max_bytes,
        allow_direct: true,
        ..Default::default()
    }
}

/// The durable pull consumer of one lane, shared by every hive. Hives bound
/// their own pulls by their free slots; `max_deliver` is unlimited because
/// the hive itself ends a job that ran out of attempts (a message stuck at
/// `max_deliver` would otherwise stay in the work queue for ever).
pub fn lane_consumer(l: &Limits, lane: subjects::Lane) -> consumer::pull::Config {
    let filter = match lane {
        subjects::Lane::Interactive => subjects::INFER_FILTER,
        subjects::Lane::Batch => subjects::BATCH_FILTER,
    };
    consumer::pull::Config {
        durable_name: Some(lane.consumer().to_owned()),
        description: Some(format!("rbee hives claim {} jobs here", lane.as_str())),
        filter_subject: filter.to_owned(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: l.ack_wait,
        max_deliver: -1,
        max_ack_pending: 10_000,
        max_waiting: 512,
        ..Default::default()
    }
}

/// Live hives, one key each, removed by the TTL when heartbeats stop.
pub fn hives_bucket() -> kv::Config {
    kv::Config {
        bucket: subjects::HIVES_BUCKET.to_owned(),
        description: "rbee hives (heartbeats)".to_owned(),
        history: 1,
        max_age: Duration::from_secs(rbee_schemas::hive::HIVE_TTL_SECS),
        storage: stream::StorageType::Memory,
        ..Default::default()
    }
}

/// Workers of every hive, one key each (worker id), refreshed by their hive
/// with each heartbeat and on every state change; the TTL drops the workers
/// of a hive that died with it.
pub fn workers_bucket() -> kv::Config {
    kv::Config {
        bucket: subjects::WORKERS_BUCKET.to_owned(),
        description: "rbee workers (state, pid, model)".to_owned(),
        history: 1,
        max_age: Duration::from_secs(rbee_schemas::hive::HIVE_TTL_SECS),
        storage: stream::StorageType::Memory,
        ..Default::default()
    }
}

/// Cold-start leases: the one hive that may start a worker for a model no
/// worker serves yet. Expire by themselves if their holder dies.
pub fn leases_bucket() -> kv::Config {
    kv::Config {
        bucket: subjects::LEASES_BUCKET.to_owned(),
        description: "rbee cold-start leases".to_owned(),
        history: 1,
        max_age: Duration::from_secs(rbee_schemas::hive::HIVE_TTL_SECS),
        storage: stream::StorageType::Memory,
        ..Default::default()
    }
}

/// Hives' log lines, the last hour, for `rbee logs`.
pub fn logs_stream() -> stream::Config {
    stream::Config {
        name: subjects::LOGS_STREAM.to_owned(),
        description: Some("rbee hive and worker log lines".to_owned()),
        subjects: vec![format!("{}.>", subjects::LOGS_PREFIX)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        max_age: Duration::from_secs(3600),
        max_messages_per_subject: 10_000,
        max_bytes: 256 * 1024 * 1024,
        allow_direct: true,
        ..Default::default()
    }
}

/// A pull consumer for lifecycle jobs: `target` is a hive id (its own jobs)
/// or `any` (shared by all hives).
pub fn ctl_consumer(l: &Limits, target: &str) -> consumer::pull::Config {
    let name = if target == rbee_schemas::ctl::ANY_HIVE {
        rbee_schemas::ctl::CTL_ANY_CONSUMER.to_owned()
    } else {
        rbee_schemas::ctl::ctl_consumer(target)
    };
    consumer::pull::Config {
        durable_name: Some(name),
        description: Some(format!("rbee lifecycle jobs for {target}")),
        filter_subject: rbee_schemas::ctl::ctl_subject(target),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: l.ack_wait,
        max_deliver: -1,
        max_ack_pending: 1000,
        // A hive's own consumer lives as long as the hive is seen.
        inactive_threshold: if target == rbee_schemas::ctl::ANY_HIVE { Duration::ZERO } else { Duration::from_secs(7 * 24 * 3600) },
        ..Default::default()
    }
}

/// Job records, for continuing a job on another attempt and for status.
pub fn jobs_bucket(l: &Limits) -> kv::Config {
    kv::Config {
        bucket: subjects::JOBS_BUCKET.to_owned(),
        description: "rbee job records".to_owned(),
        history: 1,
        max_age: l.job_records_max_age,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Why [`ensure`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("creating or reading stream {name}: {source} (is JetStream enabled on this nats-server?)")]
    Stream { name: String, source: async_nats::Error },
    #[error(
        "stream {name} exists with {what}; rbee needs {want}. Delete it (nats stream rm {name}) or fix it by hand, see broker-config/README.md"
    )]
    Mismatch { name: String, what: String, want: String },
    #[error("creating or reading consumer {name}: {source}")]
    Consumer { name: String, source: async_nats::Error },
    #[error("creating or reading KV bucket {name}: {source}")]
    Bucket { name: String, source: async_nats::Error },
}

/// Handles to everything [`ensure`] made sure of.
#[derive(Debug, Clone)]
pub struct Broker {
    pub jobs: stream::Stream,
    pub events: stream::Stream,
    pub dead: stream::Stream,
    pub logs: stream::Stream,
    pub infer: consumer::PullConsumer,
    pub batch: consumer::PullConsumer,
    pub hives: kv::Store,
    pub workers: kv::Store,
    pub leases: kv::Store,
    pub job_records: kv::Store,
}

/// Creates whatever is missing; leaves what exists alone (an operator may
/// have tuned its limits) unless its retention or subjects make rbee unsafe.
pub async fn ensure(js: &jetstream::Context, limits: &Limits) -> Result<Broker, BrokerError> {
    let jobs = ensure_stream(js, jobs_stream(limits)).await?;
    let events = ensure_stream(js, events_stream(limits)).await?;
    let dead = ensure_stream(js, dead_stream(limits)).await?;
    let logs = ensure_stream(js, logs_stream()).await?;
    let mut consumers = Vec::new();
    for lane in [subjects::Lane::Interactive, subjects::Lane::Batch] {
        let c = jobs
            .get_or_create_consumer(lane.consumer(), lane_consumer(limits, lane))
            .await
            .map_err(|e| BrokerError::Consumer { name: lane.consumer().to_owned(), source: e.into() })?;
        consumers.push(c);
    }
    let batch = consumers.pop().ok_or_else(|| BrokerError::Consumer { name: "rbee-batch".into(), source: "missing".into() })?;
    let infer = consumers.pop().ok_or_else(|| BrokerError::Consumer { name: "rbee-infer".into(), source: "missing".into() })?;
    ensure_consumer(&jobs, ctl_consumer(limits, rbee_schemas::ctl::ANY_HIVE)).await?;
    let hives = ensure_bucket(js, hives_bucket()).await?;
    let workers = ensure_bucket(js, workers_bucket()).await?;
    let leases = ensure_bucket(js, leases_bucket()).await?;
    let job_records = ensure_bucket(js, jobs_bucket(limits)).await?;
    Ok(Broker { jobs, events, dead, logs, infer, batch, hives, workers, leases, job_records })
}

/// Creates a pull consumer if missing.
pub async fn ensure_consumer(jobs: &stream::Stream, config: consumer::pull::Config) -> Result<consumer::PullConsumer, BrokerError> {
    let name = config.durable_name.clone().unwrap_or_default();
    jobs.get_or_create_consumer(&name, config)
        .await
        .map_err(|e| BrokerError::Consumer { name, source: e.into() })
}

async fn ensure_stream(js: &jetstream::Context, want: stream::Config) -> Result<stream::Stream, BrokerError> {
    let name = want.name.clone();
    let mut s = js
        .get_or_create_stream(want.clone())
        .await
        .map_err(|e| BrokerError::Stream { name: name.clone(), source: e.into() })?;
    let have = &s.info().await.map_err(|e| BrokerError::Stream { name: name.clone(), source: e.into() })?.config;
    if have.retention != want.retention {
        return Err(BrokerError::Mismatch {
            name,
            what: format!("retention {:?}", have.retention),
            want: format!("retention {:?}", want.retention),
        });
    }
    if have.subjects != want.subjects {
        return Err(BrokerError::Mismatch {
            name,
            what: format!("subjects {:?}", have.subjects),
            want: format!("subjects {:?}", want.subjects),
        });
    }
    if want.allow_direct && !have.allow_direct {
        // rbee reads the queue with direct gets; turn them on (a mutable setting).
        let cfg = stream::Config { allow_direct: true, ..have.clone() };
        js.update_stream(cfg).await.map_err(|e| BrokerError::Stream { name: name.clone(), source: e.into() })?;
    }
    Ok(s)
}

/// Creates a KV bucket's backing stream ourselves: async-nats's
/// `create_key_value` first reads the account info, whose 2.9 form lacks
/// fields the client requires ("data did not match any variant of untagged
/// enum Response"). The stream follows the KV conventions (ADR-8), so
/// `get_key_value` and the `nats kv` tools treat it as a bucket.
fn kv_stream(c: &kv::Config) -> stream::Config {
    stream::Config {
        name: format!("KV_{}", c.bucket),
        description: Some(c.description.clone()),
        subjects: vec![format!("$KV.{}.>", c.bucket)],
        max_messages_per_subject: c.history.max(1),
        max_bytes: c.max_bytes,
        max_age: c.max_age,
        max_message_size: c.max_value_size,
        storage: c.storage,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        duplicate_window: if c.max_age > Duration::ZERO && c.max_age < Duration::from_secs(120) {
            c.max_age
        } else {
            Duration::from_secs(120)
        },
        ..Default::default()
    }
}

/// The memory-backed buckets (`rbee-hives`, `rbee-workers`, `rbee-leases`),
/// created if missing: a broker restart empties them, and hives call this
/// when a heartbeat fails.
pub async fn ensure_memory_buckets(js: &jetstream::Context) -> Result<(kv::Store, kv::Store, kv::Store), BrokerError> {
    Ok((ensure_bucket(js, hives_bucket()).await?, ensure_bucket(js, workers_bucket()).await?, ensure_bucket(js, leases_bucket()).await?))
}

async fn ensure_bucket(js: &jetstream::Context, want: kv::Config) -> Result<kv::Store, BrokerError> {
    let name = want.bucket.clone();
    let err = |e: async_nats::Error| BrokerError::Bucket { name: name.clone(), source: e };
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    js.get_or_create_stream(kv_stream(&want)).await.map_err(|e| err(e.into()))?;
    js.get_key_value(&name).await.map_err(|e| err(e.into()))
}

/// The keys of a KV bucket, each once, in order; keys deleted or purged are
/// included (their marker is the last entry), so readers skip what `get`
/// does not find.
///
/// Not async-nats's `Store::keys`: that reads a live consumer until a
/// message says nothing is pending, and while one key is rewritten every
/// millisecond or so it can miss that moment and follow the new writes for
/// ever (a test saw one key 2,236 times in 5 s). Heartbeats rewrite the
/// registry buckets all the time, so a hive's view of the fleet, or
/// `rbee hives`, could hang. The stream's per-subject counts come from
/// bounded requests instead.
pub async fn kv_keys(store: &kv::Store) -> Result<Vec<String>, async_nats::Error> {
    let mut subjects = store.stream.info_with_subjects(format!("{}>", store.prefix)).await?;
    let mut keys = std::collections::BTreeSet::new();
    while let Some(entry) = futures::StreamExt::next(&mut subjects).await {
        let (subject, _) = entry?;
        if let Some(key) = subject.strip_prefix(&store.prefix) {
            keys.insert(key.to_owned());
        }
    }
    Ok(keys.into_iter().collect())
}

/// Every entry of a registry bucket whose value decodes from JSON as `T`,
/// by key ([`kv_keys`], then a read of each; keys deleted meanwhile and
/// values that do not decode are skipped).
pub async fn kv_json_values<T: serde::de::DeserializeOwned>(store: &kv::Store) -> Result<Vec<(String, T)>, async_nats::Error> {
    let mut out = Vec::new();
    for key in kv_keys(store).await? {
        if let Ok(Some(v)) = store.get(&key).await {
            if let Ok(value) = rbee_schemas::codec::Encoding::Json.decode::<T>(&v) {
                out.push((key, value));
            }
        }
    }
    Ok(out)
}

/// rbee's data directory: `$RBEE_HOME`, else `$XDG_DATA_HOME/rbee`
/// (`~/.local/share/rbee` on Linux, `~/Library/Application Support/rbee` on macOS).
pub fn rbee_home() -> std::path::PathBuf {
    if let Some(home) = std::env::var_os("RBEE_HOME") {
        return home.into();
    }
    dirs::data_dir().unwrap_or_else(std::env::temp_dir).join("rbee")
}

/// The default hive id: the host name, with anything outside `A-Z a-z 0-9 _ -`
/// replaced by `-` (so `box.example.com` becomes `box-example-com`).
pub fn default_hive_id() -> String {
    let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
    let id: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .take(64)
        .collect();
    if id.is_empty() {
        "hive".to_owned()
    } else {
        id
    }
}
