//! Heartbeats: every few seconds the hive writes what it is and runs into the
//! `rbee-hives` KV bucket under its id. The bucket's TTL drops a hive that
//! stops (see `rbee_schemas::hive`); a hive that stops cleanly deletes its key.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use rbee_schemas::codec::Encoding;
use rbee_schemas::hive::{HiveInfo, HEARTBEAT_INTERVAL_SECS};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::pool::Pool;

#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub js: async_nats::jetstream::Context,
    pub store: kv::Store,
    pub base: HiveInfo,
    pub pool: Arc<Pool>,
    pub slots: Arc<Semaphore>,
}

impl Heartbeat {
    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// The record as of now.
    pub fn snapshot(&self) -> HiveInfo {
        HiveInfo {
            updated_at_ms: Self::now_ms(),
            busy: self.base.slots - self.slots.available_permits() as u32,
            workers: self.pool.summaries(),
            ..self.base.clone()
        }
    }

    pub async fn beat(&self) -> Result<(), kv::PutError> {
        let info = self.snapshot();
        self.store.put(&info.hive_id, Encoding::Json.encode(&info).into()).await.map(|_| ())
    }

    /// Beats until `stop`, then deletes the hive's key.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(HEARTBEAT_INTERVAL_SECS));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.beat().await {
                        tracing::warn!(error = %e, "heartbeat failed; making sure the bucket exists");
                        // A restarted broker has lost the memory-backed bucket.
                        match rbee_broker::ensure_hives_bucket(&self.js).await {
                            Ok(store) => {
                                self.store = store;
                                let _ = self.beat().await;
                            }
                            Err(e) => tracing::warn!(error = %e, "re-creating the hives bucket failed"),
                        }
                    }
                }
                _ = stop.cancelled() => break,
            }
        }
        if let Err(e) = self.store.delete(&self.base.hive_id).await {
            tracing::warn!(error = %e, "removing the heartbeat failed");
        }
    }
}
