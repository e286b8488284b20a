//! Publishing a job's events. One [`EventSink`] per job attempt, owned by the
//! job's task: the only writer of that job's sequence, so `seq` has no gaps.

use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use rbee_schemas::codec::Encoding;
use rbee_schemas::event::{Event, EventBody};
use rbee_schemas::subjects::HEADER_CONTENT_TYPE;

#[derive(Debug)]
pub struct EventSink {
    client: Client,
    subject: Subject,
    job_id: String,
    encoding: Encoding,
    next_seq: u64,
    ended: bool,
}

impl EventSink {
    pub fn new(client: Client, subject: String, job_id: String, encoding: Encoding, next_seq: u64) -> Self {
        Self { client, subject: Subject::from(subject), job_id, encoding, next_seq, ended: false }
    }

    /// The `seq` the next event will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Publishes one event; returns it. Nothing is published after a terminal event.
    pub async fn emit(&mut self, body: EventBody) -> Result<Option<Event>, async_nats::PublishError> {
        if self.ended {
            tracing::error!(job_id = %self.job_id, kind = body.type_name(), "event after the terminal event dropped");
            return Ok(None);
        }
        let event = Event::new(self.job_id.clone(), self.next_seq, body);
        let payload = Bytes::from(self.encoding.encode(&event));
        match self.encoding {
            Encoding::Json => self.client.publish(self.subject.clone(), payload).await?,
            Encoding::Msgpack => {
                let mut headers = HeaderMap::new();
                headers.insert(HEADER_CONTENT_TYPE, self.encoding.content_type());
                self.client.publish_with_headers(self.subject.clone(), headers, payload).await?
            }
        }
        self.next_seq += 1;
        self.ended = event.is_terminal();
        Ok(Some(event))
    }
}
