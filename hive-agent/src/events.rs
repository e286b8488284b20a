//! Publishing a job's events. One [`EventSink`] per job attempt, owned by the
//! job's task: the only writer of that job's sequence, so `seq` has no gaps.
//!
//! Every event goes to `rbee.events.<job id>`, which the `RBEE_EVENTS` stream
//! keeps for replay (`rbee jobs follow`, reattaching after a disconnect, a
//! resubmitted duplicate); a job with its own `reply_to` gets each event there
//! too.

use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use rbee_schemas::codec::Encoding;
use rbee_schemas::event::{Event, EventBody};
use rbee_schemas::subjects::{self, HEADER_CONTENT_TYPE};

#[derive(Debug)]
pub struct EventSink {
    client: Client,
    kept: Subject,
    reply: Option<Subject>,
    job_id: String,
    encoding: Encoding,
    next_seq: u64,
    ended: bool,
}

impl EventSink {
    pub fn new(client: Client, reply_to: &str, job_id: &str, encoding: Encoding, next_seq: u64) -> Self {
        let kept = subjects::events_subject(job_id);
        let reply = (reply_to != kept).then(|| Subject::from(reply_to));
        Self { client, kept: Subject::from(kept), reply, job_id: job_id.to_owned(), encoding, next_seq, ended: false }
    }

    /// The `seq` the next event will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq;
    }

    /// Publishes one event; returns it. Nothing is published after a terminal event.
    pub async fn emit(&mut self, body: EventBody) -> Result<Option<Event>, async_nats::PublishError> {
        if self.ended {
            tracing::error!(job_id = %self.job_id, kind = body.type_name(), "event after the terminal event dropped");
            return Ok(None);
        }
        let event = Event::new(self.job_id.clone(), self.next_seq, body);
        self.send(&event).await?;
        self.next_seq += 1;
        self.ended = event.is_terminal();
        Ok(Some(event))
    }

    /// Sends an event published before (a job's stored terminal event) once
    /// more, for a client that may have missed it; readers drop repeats by `seq`.
    pub async fn resend(&self, event: &Event) -> Result<(), async_nats::PublishError> {
        self.send(event).await
    }

    async fn send(&self, event: &Event) -> Result<(), async_nats::PublishError> {
        self.publish(self.kept.clone(), event).await?;
        if let Some(reply) = &self.reply {
            self.publish(reply.clone(), event).await?;
        }
        Ok(())
    }

    async fn publish(&self, subject: Subject, event: &Event) -> Result<(), async_nats::PublishError> {
        let payload = Bytes::from(self.encoding.encode(event));
        match self.encoding {
            Encoding::Json => self.client.publish(subject, payload).await,
            Encoding::Msgpack => {
                let mut headers = HeaderMap::new();
                headers.insert(HEADER_CONTENT_TYPE, self.encoding.content_type());
                self.client.publish_with_headers(subject, headers, payload).await
            }
        }
    }
}
