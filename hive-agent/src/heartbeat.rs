//! Heartbeats: every few seconds the hive writes what it is and has into the
//! `rbee-hives` bucket under its id (version, protocol, slots, memory, models,
//! workers), re-writes its workers into `rbee-workers` and refreshes the
//! cold-start leases of the models it serves. The buckets' TTLs drop all of it
//! when the hive stops beating; a hive that stops cleanly deletes its key.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use rbee_schemas::codec::Encoding;
use rbee_schemas::hive::{HiveInfo, ModelSummary, HEARTBEAT_INTERVAL_SECS};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::fleet::Fleet;
use crate::job::now_ms;
use crate::pool::Pool;

#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub js: async_nats::jetstream::Context,
    pub store: kv::Store,
    pub base: HiveInfo,
    pub pool: Arc<Pool>,
    pub slots: Arc<Semaphore>,
    pub catalog: Arc<Catalog>,
    pub fleet: Arc<Fleet>,
    pub gpu: Option<Arc<crate::gpu::Gpu>>,
}

impl Heartbeat {
    /// The record as of now.
    pub fn snapshot(&self) -> HiveInfo {
        let (ram_total, ram_free) = crate::system::memory();
        let vram = self.gpu.as_ref().and_then(|g| g.memory());
        let models = self
            .catalog
            .list()
            .unwrap_or_default()
            .into_iter()
            .map(|e| ModelSummary {
                present: e.path.is_file(),
                key: e.key,
                source: e.source,
                format: e.format,
                architecture: e.architecture,
                quantization: e.quantization,
                size: e.size,
            })
            .collect();
        HiveInfo {
            updated_at_ms: now_ms(),
            busy: self.base.slots - self.slots.available_permits() as u32,
            ram_total,
            ram_free,
            vram_total: vram.map_or(0, |m| m.total),
            vram_free: vram.map_or(0, |m| m.free),
            memory_used: self.pool.memory_used(),
            workers: self.pool.summaries(),
            models,
            ..self.base.clone()
        }
    }

    pub async fn beat(&self) -> Result<(), kv::PutError> {
        let info = self.snapshot();
        self.store.put(&info.hive_id, Encoding::Json.encode(&info).into()).await?;
        self.pool.republish();
        self.fleet.refresh_leases(&self.pool.models()).await;
        Ok(())
    }

    /// Beats until `stop`, then deletes the hive's key.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(HEARTBEAT_INTERVAL_SECS));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.beat().await {
                        tracing::warn!(error = %e, "heartbeat failed; making sure the buckets exist");
                        // A restarted broker has lost the memory-backed buckets.
                        match rbee_broker::ensure_memory_buckets(&self.js).await {
                            Ok((hives, workers, leases)) => {
                                self.store = hives.clone();
                                self.pool.set_registry(workers);
                                self.fleet.replace_stores(hives, leases);
                                let _ = self.beat().await;
                            }
                            Err(e) => tracing::warn!(error = %e, "re-creating the buckets failed"),
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
