//! A job's events, in `seq` order, with no gaps and no repeats, live or replayed.
//!
//! Events arrive live on a core subscription to `rbee.events.<job id>` (the
//! fast path). They are also kept in the `RBEE_EVENTS` stream, which is read
//! ("replay") whenever the live path may have missed something:
//! - at the start of `rbee jobs follow` (from `--from-seq`),
//! - when the job turned out to be a duplicate (its events happened before),
//! - when an event arrives with a `seq` past the expected one (a slow
//!   consumer dropped messages, or the connection was lost and restored),
//! - when nothing arrived for a while but the stream holds newer events (a
//!   terminal event missed during a reconnect would otherwise hang us).
//!
//! Events from either path are merged by `seq`; each is yielded once.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::stream::DirectGetErrorKind;

type JsStream = async_nats::jetstream::stream::Stream<()>;
use async_nats::Subscriber;
use futures::future::BoxFuture;
use futures::StreamExt;
use rbee_schemas::codec::Encoding;
use rbee_schemas::event::Event;
use rbee_schemas::subjects::{self, HEADER_CONTENT_TYPE};

use crate::ClientError;

/// Silence after which the kept events are checked for newer ones.
const PROBE_AFTER: Duration = Duration::from_secs(1);
/// How long a gap before a known terminal event may stay unfilled before the
/// missing events are reported lost (a broker crash can lose writes it had
/// acknowledged but not yet stored).
const GIVE_UP_GAP_AFTER: Duration = Duration::from_secs(10);

/// Outcome of the publish, while it is still awaited.
pub(crate) type AckFuture = BoxFuture<'static, Result<bool, ClientError>>;

/// The events of one job (see the module docs).
pub struct JobStream {
    job_id: String,
    encoding: Encoding,
    live: Subscriber,
    kept: JsStream,
    /// Stream sequence after the last kept event read.
    kept_cursor: u64,
    ack: Option<AckFuture>,
    next_seq: u64,
    early: BTreeMap<u64, Event>,
    /// Set before a replay and cleared after it, so an interrupted replay is redone.
    need_replay: bool,
    /// Since when a terminal event is known but earlier ones are missing.
    stalled_since: Option<std::time::Instant>,
    ended: bool,
}

impl std::fmt::Debug for JobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStream").field("job_id", &self.job_id).field("next_seq", &self.next_seq).finish()
    }
}

impl JobStream {
    pub(crate) fn new(job_id: String, encoding: Encoding, live: Subscriber, kept: JsStream, ack: Option<AckFuture>, from_seq: u64) -> Self {
        Self {
            job_id,
            encoding,
            live,
            kept,
            kept_cursor: 1,
            ack,
            next_seq: from_seq,
            early: BTreeMap::new(),
            need_replay: false,
            stalled_since: None,
            ended: false,
        }
    }

    /// Reads the kept events before anything live (for `rbee jobs follow`).
    pub(crate) fn replay_first(mut self) -> Self {
        self.need_replay = true;
        self
    }

    /// Waits for the broker's publish ack. `Ok(true)`: the job id was
    /// submitted before (a duplicate); its events are replayed. Events that
    /// arrive meanwhile are kept for [`next`](Self::next).
    pub async fn published(&mut self) -> Result<bool, ClientError> {
        let Some(ack) = self.ack.take() else { return Ok(false) };
        let duplicate = ack.await?;
        self.need_replay |= duplicate;
        Ok(duplicate)
    }

    /// The events as a `futures::Stream`.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Event, ClientError>> {
        futures::stream::unfold(self, |mut s| async move { s.next().await.map(|e| (e, s)) })
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The `seq` the next event will have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The next event; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        loop {
            if self.ended {
                return None;
            }
            if self.need_replay {
                if let Err(e) = self.replay().await {
                    return Some(Err(e));
                }
            }
            if let Some(e) = self.early.remove(&self.next_seq) {
                self.stalled_since = None;
                return Some(Ok(self.deliver(e)));
            }
            if let Some(t) = self.early.values().find(|e| e.is_terminal()).map(|e| e.seq) {
                let since = *self.stalled_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > GIVE_UP_GAP_AFTER {
                    let lost = ClientError::Lost { from: self.next_seq, to: t };
                    self.next_seq = t;
                    self.stalled_since = None;
                    return Some(Err(lost));
                }
            }
            let probe = tokio::time::sleep(PROBE_AFTER);
            let (ack, live) = (&mut self.ack, &mut self.live);
            let waiting_for_ack = ack.is_some();
            tokio::select! {
                biased;
                acked = async { ack.as_mut().expect("guarded by waiting_for_ack").await }, if waiting_for_ack => {
                    self.ack = None;
                    match acked {
                        Err(e) => {
                            self.ended = true;
                            return Some(Err(e));
                        }
                        // A duplicate: the job ran (or runs) from an earlier
                        // submission; its events so far are in the stream.
                        Ok(true) => self.need_replay = true,
                        Ok(false) => {}
                    }
                }
                msg = live.next() => {
                    let Some(msg) = msg else {
                        self.ended = true;
                        return Some(Err(ClientError::Closed));
                    };
                    let Some(e) = self.decode(&msg.payload, msg.headers.as_ref().and_then(|h| h.get(HEADER_CONTENT_TYPE)).map(|v| v.as_str())) else { continue };
                    if e.seq < self.next_seq {
                        continue;
                    }
                    self.need_replay |= e.seq > self.next_seq;
                    self.early.insert(e.seq, e);
                }
                _ = probe => self.need_replay = self.kept_has_newer().await,
            }
        }
    }

    fn deliver(&mut self, e: Event) -> Event {
        self.next_seq = e.seq + 1;
        if e.is_terminal() {
            self.ended = true;
        }
        e
    }

    fn decode(&self, payload: &[u8], content_type: Option<&str>) -> Option<Event> {
        let enc = match content_type {
            Some(ct) => Encoding::from_content_type(Some(ct)).unwrap_or(self.encoding),
            None => self.encoding,
        };
        let e: Event = enc.decode(payload).ok()?;
        (e.job_id == self.job_id).then_some(e)
    }

    /// Whether the kept events hold one at or past `next_seq`. Takes `&mut`
    /// (not `&self`) so the future stays `Send` without `JobStream: Sync`.
    async fn kept_has_newer(&mut self) -> bool {
        let last = self.kept.get_last_raw_message_by_subject(&subjects::events_subject(&self.job_id)).await;
        match last {
            Ok(m) => {
                let ct = m.headers.get(HEADER_CONTENT_TYPE).map(|v| v.as_str().to_owned());
                self.decode(&m.payload, ct.as_deref()).is_some_and(|e| e.seq >= self.next_seq)
            }
            Err(_) => false,
        }
    }

    /// Reads the kept events from where the last replay stopped.
    async fn replay(&mut self) -> Result<(), ClientError> {
        let subject = subjects::events_subject(&self.job_id);
        loop {
            let msg = match self.kept.direct_get_next_for_subject(subject.clone(), Some(self.kept_cursor)).await {
                Ok(m) => m,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
                    self.need_replay = false;
                    return Ok(());
                }
                Err(e) => return Err(ClientError::Replay(e.to_string())),
            };
            self.kept_cursor = msg.sequence + 1;
            let ct = msg.headers.get(HEADER_CONTENT_TYPE).map(|v| v.as_str().to_owned());
            if let Some(e) = self.decode(&msg.payload, ct.as_deref()) {
                if e.seq >= self.next_seq {
                    self.early.entry(e.seq).or_insert(e);
                }
            }
        }
    }
}
