//! Publishing a job's events. One [`EventSink`] per job attempt, owned by the
//! job's task: the only writer of that job's sequence, so `seq` has no gaps.
//! Where and how events go is [`rbee_broker::events`]: always to the kept
//! `rbee.events.<job id>` (with the stream's ack; republished if lost), and
//! to the job's `reply_to` too.

use async_nats::Client;
use rbee_broker::events::EventPublisher;
use rbee_schemas::codec::Encoding;
use rbee_schemas::event::{Event, EventBody};

#[derive(Debug)]
pub struct EventSink {
    publisher: EventPublisher,
    job_id: String,
    next_seq: u64,
    ended: bool,
}

impl EventSink {
    pub fn new(client: Client, reply_to: &str, job_id: &str, encoding: Encoding, next_seq: u64) -> Self {
        let publisher = EventPublisher::new(client, job_id, reply_to, encoding);
        Self { publisher, job_id: job_id.to_owned(), next_seq, ended: false }
    }

    /// The `seq` the next event will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Publishes one event; returns it. Nothing is published after a terminal
    /// event, and a terminal event goes out only once every earlier one is kept.
    pub async fn emit(&mut self, body: EventBody) -> Result<Option<Event>, async_nats::PublishError> {
        if self.ended {
            tracing::error!(job_id = %self.job_id, kind = body.type_name(), "event after the terminal event dropped");
            return Ok(None);
        }
        let event = Event::new(self.job_id.clone(), self.next_seq, body);
        if event.is_terminal() {
            self.publisher.flush().await;
        }
        self.publisher.publish(&event).await?;
        if event.is_terminal() {
            self.publisher.flush().await;
        }
        self.next_seq += 1;
        self.ended = event.is_terminal();
        Ok(Some(event))
    }

    /// Waits until every event so far is kept (before a job is handed back).
    pub async fn flush(&mut self) {
        self.publisher.flush().await;
    }

    /// Sends an event published before (a job's stored terminal event) once
    /// more, for a client that may have missed it; readers drop repeats by `seq`.
    pub async fn resend(&mut self, event: &Event) -> Result<(), async_nats::PublishError> {
        self.publisher.publish(event).await?;
        self.publisher.flush().await;
        Ok(())
    }
}
