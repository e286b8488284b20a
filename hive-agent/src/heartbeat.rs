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

/// How long a hive that finds its id's heartbeat written by another process
/// watches for that one to beat again before it takes the id over: two
/// heartbeat intervals and a second, so one late beat is not taken for a
/// stopped hive.
const ID_TAKEOVER_WAIT: Duration = Duration::from_secs(2 * HEARTBEAT_INTERVAL_SECS + 1);

/// Refuses to run a second hive under the id of a live one: they would share
/// one heartbeat key, one lifecycle consumer (a download or stop meant for
/// one machine could run on the other), worker ids and cold-start leases.
///
/// A hive that stops cleanly deletes its key. One that was killed leaves it
/// until the bucket's TTL (15 s) removes it; its heartbeat no longer changes,
/// so a hive restarted under the same id waits up to `ID_TAKEOVER_WAIT`
/// to see, then takes the id over. A heartbeat from this very host and pid
/// is a previous run of this process slot (a restarted container): no wait.
/// Returns the heartbeat of the killed hive whose id this one takes over.
pub async fn ensure_id_free(store: &kv::Store, hive_id: &str, hostname: &str, pid: u32) -> anyhow::Result<Option<HiveInfo>> {
    use futures::StreamExt;
    let decode = |e: &kv::Entry| (e.operation == kv::Operation::Put).then(|| Encoding::Json.decode::<HiveInfo>(&e.value).ok()).flatten();
    let Some(found) = store.entry(hive_id).await?.as_ref().and_then(decode) else { return Ok(None) };
    if found.hostname == hostname && found.pid == pid {
        return Ok(None);
    }
    tracing::info!(
        host = %found.hostname, pid = found.pid,
        "a heartbeat for hive id {hive_id} is in the registry; waiting up to {}s to see whether that hive is alive",
        ID_TAKEOVER_WAIT.as_secs()
    );
    let mut changes = store.watch(hive_id).await?;
    let beat = tokio::time::timeout(ID_TAKEOVER_WAIT, async {
        while let Some(Ok(e)) = changes.next().await {
            if let Some(info) = decode(&e) {
                return Some(info);
            }
        }
        None
    })
    .await;
    match beat {
        Ok(Some(live)) => anyhow::bail!(
            "hive id {hive_id:?} is in use by a live hive on host {} (pid {}, rbee {}); \
             start this one with another --hive-id (or RBEE_HIVE_ID), or stop that one first",
            live.hostname,
            live.pid,
            live.version
        ),
        _ => Ok(Some(found)),
    }
}

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
    /// A beat out of turn (see `JobCtx::beat_now`).
    pub beat_now: Arc<tokio::sync::Notify>,
    /// Where its models go: the heartbeat carries that filesystem's free space.
    pub downloader: crate::models::Downloader,
}

impl Heartbeat {
    /// The record as of now.
    pub fn snapshot(&self) -> HiveInfo {
        let (ram_total, ram_free) = crate::system::memory();
        let vram = self.gpu.as_ref().and_then(|g| g.memory());
        let committed = self.pool.committed();
        let models = self
            .catalog
            .list()
            .unwrap_or_default()
            .into_iter()
            .map(|e| ModelSummary {
                memory: self.pool.memory_for(&e),
                present: e.path.is_file(),
                key: e.key,
                source: e.source,
                format: e.format,
                architecture: e.architecture,
                quantization: e.quantization,
                size: e.size,
                sha256: e.sha256,
            })
            .collect();
        HiveInfo {
            updated_at_ms: now_ms(),
            busy: self.base.slots - self.slots.available_permits() as u32,
            ram_total,
            ram_free,
            vram_total: vram.map_or(0, |m| m.total),
            vram_free: vram.map_or(0, |m| m.free),
            disk_free: self.downloader.free().unwrap_or(0),
            memory_used: committed.total,
            memory_pending: committed.pending,
            workers: self.pool.summaries(),
            models,
            ..self.base.clone()
        }
    }

    pub async fn beat(&self) -> Result<(), kv::PutError> {
        // The snapshot reads the catalog (redb), /proc, the disk's statvfs
        // and NVML: blocking calls, kept off the runtime that carries jobs.
        let hb = self.clone();
        let info = match tokio::task::spawn_blocking(move || hb.snapshot()).await {
            Ok(info) => info,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down: no beat to send.
            Err(_) => return Ok(()),
        };
        self.store.put(&info.hive_id, Encoding::Json.encode(&info).into()).await?;
        self.pool.republish();
        let (ready, starting) = self.pool.models();
        self.fleet.refresh_leases(&ready, &starting).await;
        Ok(())
    }

    /// Beats until `stop`, then deletes the hive's key.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(HEARTBEAT_INTERVAL_SECS));
        loop {
            // On the tick, or out of turn (the catalog changed).
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.beat_now.notified() => {}
                _ = stop.cancelled() => break,
            }
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
        if let Err(e) = self.store.delete(&self.base.hive_id).await {
            tracing::warn!(error = %e, "removing the heartbeat failed");
        }
    }
}
