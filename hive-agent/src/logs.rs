//! The hive's log lines (its own and its workers' stderr) on
//! `rbee.logs.<hive id>`, for `rbee logs`.
//!
//! A tracing layer formats each event into a [`LogLine`] and hands it to a
//! bounded channel without blocking; one task publishes them. Until the hive
//! is connected, and when the channel is full (the broker is slow or gone),
//! lines are dropped from the bus: stderr still has them. The NATS client's
//! own events are not forwarded (they would feed on themselves).

use std::fmt::Write as _;
use std::sync::OnceLock;

use rbee_schemas::log::LogLine;
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

static SINK: OnceLock<(String, mpsc::Sender<LogLine>)> = OnceLock::new();

/// Lines waiting to be published before new ones are dropped.
const BACKLOG: usize = 4096;

/// The layer to add to the subscriber; it forwards once [`start`] ran.
#[derive(Debug, Clone, Copy, Default)]
pub struct BusLayer;

struct Fields {
    message: String,
    worker: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "worker" => self.worker = Some(value.to_owned()),
            name => {
                let _ = write!(self.message, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "worker" => self.worker = Some(format!("{value:?}")),
            name => {
                let _ = write!(self.message, " {name}={value:?}");
            }
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for BusLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let Some((hive, tx)) = SINK.get() else { return };
        let meta = event.metadata();
        if meta.target().starts_with("async_nats") || *meta.level() > tracing::Level::INFO {
            return;
        }
        let mut fields = Fields { message: String::new(), worker: None };
        event.record(&mut fields);
        let line = LogLine {
            ts_ms: crate::catalog::now_ms(),
            level: meta.level().to_string(),
            hive: hive.clone(),
            worker: fields.worker,
            target: meta.target().to_owned(),
            message: fields.message,
        };
        let _ = tx.try_send(line);
    }
}

/// Starts publishing log lines of this hive (once per process).
pub fn start(client: async_nats::Client, hive_id: &str) {
    let (tx, mut rx) = mpsc::channel::<LogLine>(BACKLOG);
    if SINK.set((hive_id.to_owned(), tx)).is_err() {
        return;
    }
    let subject = rbee_schemas::subjects::logs_subject(hive_id);
    tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            let Ok(body) = serde_json::to_vec(&line) else { continue };
            if client.publish(subject.clone(), body.into()).await.is_err() {
                break;
            }
        }
    });
}
