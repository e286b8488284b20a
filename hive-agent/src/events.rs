//! Publishing a job's events. One [`EventSink`] per job attempt, owned by the
//! job's task: the only writer of that job's sequence, so `seq` has no gaps.
//! Where events go is [`rbee_broker::events`]: always `rbee.events.<job id>`
//! (kept for replay), and the job's `reply_to` too.

use async_nats::Client;
use rbee_broker::events::EventSubjects;
use rbee_schemas::codec::Encoding;
use rbee_schemas::event::{Event, EventBody};

#[derive(Debug)]
pub struct EventSink {
    client: Client,
    subjects: EventSubjects,
    job_id: String,
    encoding: Encoding,
    next_seq: u64,
    ended: bool,
}

impl EventSink {
    pub fn new(client: Client, reply_to: &str, job_id: &str, encoding: Encoding, next_seq: u64) -> Self {
        let subjects = EventSubjects::new(job_id, reply_to);
        Self { client, subjects, job_id: job_id.to_owned(), encoding, next_seq, ended: false }
    }

    /// The `seq` the next event will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Publishes one event; returns it. Nothing is published after a terminal event.
    pub async fn emit(&mut self, body: EventBody) -> Result<Option<Event>, async_nats::PublishError> {
        if self.ended {
            tracing::error!(job_id = %self.job_id, kind = body.type_name(), "event after the terminal event dropped");
            return Ok(None);
        }
        let event = Event::new(self.job_id.clone(), self.next_seq, body);
        self.subjects.publish(&self.client, self.encoding, &event).await?;
        self.next_seq += 1;
        self.ended = event.is_terminal();
        Ok(Some(event))
    }

    /// Sends an event published before (a job's stored terminal event) once
    /// more, for a client that may have missed it; readers drop repeats by `seq`.
    pub async fn resend(&self, event: &Event) -> Result<(), async_nats::PublishError> {
        self.subjects.publish(&self.client, self.encoding, event).await
    }
}
