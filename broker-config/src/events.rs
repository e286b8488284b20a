//! Where a job's events are published, and how: every event goes to
//! `rbee.events.<job id>` (kept in `RBEE_EVENTS`), and also to the job's own
//! `reply_to` when it has one, in the encoding the job used.

use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use rbee_schemas::codec::Encoding;
use rbee_schemas::event::Event;
use rbee_schemas::subjects::{self, HEADER_CONTENT_TYPE};

/// The subjects one job's events go to.
#[derive(Debug, Clone)]
pub struct EventSubjects {
    pub kept: Subject,
    pub reply: Option<Subject>,
}

impl EventSubjects {
    pub fn new(job_id: &str, reply_to: &str) -> Self {
        let kept = subjects::events_subject(job_id);
        let reply = (reply_to != kept).then(|| Subject::from(reply_to));
        Self { kept: Subject::from(kept), reply }
    }

    /// Publishes `event` to every subject.
    pub async fn publish(&self, client: &Client, encoding: Encoding, event: &Event) -> Result<(), async_nats::PublishError> {
        let payload = Bytes::from(encoding.encode(event));
        publish_one(client, self.kept.clone(), encoding, payload.clone()).await?;
        if let Some(reply) = &self.reply {
            publish_one(client, reply.clone(), encoding, payload).await?;
        }
        Ok(())
    }
}

async fn publish_one(client: &Client, subject: Subject, encoding: Encoding, payload: Bytes) -> Result<(), async_nats::PublishError> {
    match encoding {
        Encoding::Json => client.publish(subject, payload).await,
        Encoding::Msgpack => {
            let mut headers = HeaderMap::new();
            headers.insert(HEADER_CONTENT_TYPE, encoding.content_type());
            client.publish_with_headers(subject, headers, payload).await
        }
    }
}
