//! The fleet API: lifecycle jobs (models and workers), the worker registry,
//! hive versions, and hive log lines.
//!
//! ```no_run
//! # async fn demo() -> Result<(), rbee::ClientError> {
//! use rbee_schemas::ctl::CtlRequest;
//! let client = rbee::Client::connect("nats://127.0.0.1:4222").await?;
//! let req = CtlRequest::ModelDownload { v: 1, model: "hf:org/repo:model.gguf".into(), alias: Some("m".into()) };
//! let mut job = client.submit_ctl(None, &req, None).await?; // whichever hive takes it
//! while let Some(event) = job.next().await {
//!     println!("{:?}", event?.body);
//! }
//! # Ok(()) }
//! ```

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use bytes::Bytes;
use futures::StreamExt;
use rbee_schemas::codec::Encoding;
use rbee_schemas::ctl::{ctl_subject, CtlRequest, ANY_HIVE};
use rbee_schemas::hive::{HiveInfo, WorkerInfo};
use rbee_schemas::job::is_valid_job_id;
use rbee_schemas::log::LogLine;
use rbee_schemas::subjects;
use rbee_schemas::{PROTOCOL_VERSION, RBEE_VERSION};

use crate::{broker_err, new_job_id, Client, ClientError, JobStream};

/// Whether this client can talk to `hive`.
pub fn check_compatible(hive: &HiveInfo) -> Result<(), ClientError> {
    if hive.protocol == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(ClientError::Incompatible {
        hive: hive.hive_id.clone(),
        hive_version: hive.version.clone(),
        hive_protocol: hive.protocol,
        ours: RBEE_VERSION.to_owned(),
        our_protocol: PROTOCOL_VERSION,
        newest: hive.protocol.max(PROTOCOL_VERSION),
    })
}

impl Client {
    /// The live hive `id`, if this client can talk to it.
    pub async fn hive(&self, id: &str) -> Result<HiveInfo, ClientError> {
        let hives = self.hives().await?;
        match hives.iter().find(|h| h.hive_id == id) {
            Some(h) => {
                check_compatible(h)?;
                Ok(h.clone())
            }
            None => Err(ClientError::UnknownHive {
                hive: id.to_owned(),
                live: if hives.is_empty() { "none".to_owned() } else { hives.iter().map(|h| h.hive_id.as_str()).collect::<Vec<_>>().join(", ") },
            }),
        }
    }

    /// The live hives this client can talk to; an error naming the versions
    /// when every live hive is incompatible, [`ClientError::NoHive`] when none lives.
    pub async fn compatible_hives(&self) -> Result<Vec<HiveInfo>, ClientError> {
        let hives = self.hives().await?;
        let (ok, bad): (Vec<_>, Vec<_>) = hives.into_iter().partition(|h| check_compatible(h).is_ok());
        match (ok.is_empty(), bad.first()) {
            (false, _) => Ok(ok),
            (true, Some(h)) => Err(check_compatible(h).err().unwrap_or(ClientError::NoHive)),
            (true, None) => Err(ClientError::NoHive),
        }
    }

    /// Submits a lifecycle job to hive `target`, or to whichever hive takes
    /// it (`None`). Checks the target hive's version first.
    pub async fn submit_ctl(&self, target: Option<&str>, req: &CtlRequest, job_id: Option<String>) -> Result<JobStream, ClientError> {
        req.validate().map_err(|e| ClientError::Usage(e.message))?;
        match target {
            Some(h) => {
                self.hive(h).await?;
            }
            None => {
                self.compatible_hives().await?;
            }
        }
        let job_id = job_id.unwrap_or_else(new_job_id);
        if !is_valid_job_id(&job_id) {
            return Err(ClientError::Usage(format!("job id {job_id:?} may only contain A-Z a-z 0-9 _ - (at most 128)")));
        }
        let subject = ctl_subject(target.unwrap_or(ANY_HIVE));
        self.publish_job(subject, Bytes::from(Encoding::Json.encode(req)), job_id, Encoding::Json).await
    }

    /// Every worker in the registry, all hives.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, ClientError> {
        let mut out: Vec<WorkerInfo> = self.bucket_values(subjects::WORKERS_BUCKET).await?;
        out.sort_by(|a, b| (&a.hive, &a.id).cmp(&(&b.hive, &b.id)));
        Ok(out)
    }

    /// The kept log lines of `hive` (the last hour), then, with `follow`, new
    /// ones as they come. Without `follow` the stream ends at the last line
    /// kept when it was called: a hive that logs faster than this reads
    /// cannot keep it going (reading "until nothing is pending" could), nor
    /// can a stream that drops old lines as fast as they are read (counting
    /// the lines kept then could: a current server delivers the survivors of
    /// such churn more slowly than they come).
    pub async fn logs(&self, hive: &str, follow: bool) -> Result<impl futures::Stream<Item = LogLine>, ClientError> {
        let stream = self.jetstream().get_stream_no_info(subjects::LOGS_STREAM).await.map_err(broker_err)?;
        let subject = subjects::logs_subject(hive);
        // Without `follow`: the stream sequence of the last line to read.
        let last = if follow {
            u64::MAX
        } else {
            match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => m.sequence,
                Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => 0,
                Err(e) => return Err(broker_err(e)),
            }
        };
        // No kept line and no `follow`: nothing to list, nothing to create.
        let messages = if follow || last > 0 {
            let config = consumer::pull::OrderedConfig { filter_subject: subject, deliver_policy: DeliverPolicy::All, ..Default::default() };
            let consumer = stream.create_consumer(config).await.map_err(broker_err)?;
            Some(consumer.messages().await.map_err(broker_err)?)
        } else {
            None
        };
        // The state: what is left to read, `None` once the listing has ended.
        Ok(futures::stream::unfold(messages, move |messages| async move {
            let mut messages = messages?;
            loop {
                let next = if follow {
                    messages.next().await
                } else {
                    // The last line dropped by the stream's limits meanwhile,
                    // and nothing after it: nothing comes.
                    tokio::time::timeout(std::time::Duration::from_secs(2), messages.next()).await.ok()?
                };
                let Some(Ok(msg)) = next else { return None };
                let seq = msg.info().map_or(0, |i| i.stream_sequence);
                if seq > last {
                    return None;
                }
                if let Ok(line) = serde_json::from_slice::<LogLine>(&msg.payload) {
                    return Some((line, (seq != last).then_some(messages)));
                }
                if seq == last {
                    return None;
                }
            }
        }))
    }
}
