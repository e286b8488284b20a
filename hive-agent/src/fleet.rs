//! What this hive knows of the others, for placement without a scheduler.
//!
//! - A view of the live hives (heartbeats: catalogs, free memory, protocol),
//!   followed in the `rbee-hives` bucket with a KV watch (its current values
//!   first, then each change), so each heartbeat reaches every hive once as
//!   it is written (the broker pushes ~hives²/5 messages a second
//!   fleet-wide, where polling every 2 s cost hives²/2 `get` requests).
//!   Entries older than the heartbeat TTL are treated as gone: keys that
//!   expire leave no marker in a watch.
//! - Cold-start leases in `rbee-leases`: the key of a model names the hive
//!   that serves it (or is starting a worker for it). A hive without a worker
//!   for a model may start one only by *creating* that key (compare-and-set):
//!   so under a burst of jobs for an unserved model exactly one hive
//!   cold-starts, and the others leave the jobs in the queue for it (warm
//!   first). Holders refresh their leases with every heartbeat; the bucket's
//!   TTL frees the lease of a hive that died.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use rbee_schemas::hive::{HiveInfo, HIVE_TTL_SECS};
use rbee_schemas::subjects;

use crate::job::now_ms;
use crate::lock;

/// Whether this hive may serve a model it runs no worker for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Yes: it holds the model's lease.
    Here,
    /// No: `hive` serves it (or is starting a worker for it).
    Elsewhere { hive: String },
}

#[derive(Debug)]
pub struct Fleet {
    hive_id: String,
    hives_kv: Mutex<kv::Store>,
    leases: Mutex<kv::Store>,
    hives: Mutex<HashMap<String, HiveInfo>>,
    /// Leases this hive holds, and when it last served or took each.
    held: Mutex<HashMap<String, std::time::Instant>>,
    /// Woken when the buckets were recreated: the watch starts again on them.
    replaced: tokio::sync::Notify,
    /// This process (host, pid) and when it started: a heartbeat under this
    /// hive's id from another process, newer than that, is a second hive
    /// using the id ([`Fleet::check_own_id`]).
    me: (String, u32, u64),
    /// When that was last reported.
    collision_reported: Mutex<Option<std::time::Instant>>,
}

/// How often a hive repeats that another one uses its id.
const COLLISION_REPORT_EVERY: Duration = Duration::from_secs(30);

/// A lease held this long with no worker for its model is given up.
const UNUSED_LEASE: Duration = Duration::from_secs(15);

/// A watch that delivers nothing for this long is started again: this hive's
/// own heartbeat alone comes every 5 s. Catches a watch left behind by a
/// broker restart (the memory bucket it followed is gone) or stalled otherwise.
const WATCH_SILENT: Duration = Duration::from_secs(12);

/// Hives whose last heartbeat is this old are dropped from the view.
const FORGET_AFTER_MS: u64 = 4 * HIVE_TTL_SECS * 1000;

impl Fleet {
    pub fn new(hive_id: &str, hives_kv: kv::Store, leases: kv::Store) -> Self {
        Self {
            hive_id: hive_id.to_owned(),
            hives_kv: Mutex::new(hives_kv),
            leases: Mutex::new(leases),
            hives: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            replaced: tokio::sync::Notify::new(),
            me: (crate::hostname(), std::process::id(), now_ms()),
            collision_reported: Mutex::new(None),
        }
    }

    /// A heartbeat under this hive's own id: one from another process,
    /// written after this one started, means a second hive uses the id (its
    /// check at start missed this one, e.g. the broker was out of reach).
    /// Both then share a heartbeat key, a lifecycle consumer, worker ids and
    /// leases; said loudly, every 30 s, as neither can tell which should go.
    /// A killed predecessor's last beat is older than this process: ignored.
    fn check_own_id(&self, value: &[u8]) {
        let Ok(h) = serde_json::from_slice::<HiveInfo>(value) else { return };
        let (host, pid, started) = &self.me;
        if (&h.hostname == host && h.pid == *pid) || h.updated_at_ms < *started {
            return;
        }
        let mut reported = lock(&self.collision_reported);
        if reported.is_some_and(|t| t.elapsed() < COLLISION_REPORT_EVERY) {
            return;
        }
        *reported = Some(std::time::Instant::now());
        tracing::error!(
            host = %h.hostname, pid = h.pid,
            "another hive is running under this hive's id {}: jobs, downloads and workers meant for one may go to the other; \
             stop one of them, or restart it with another --hive-id (RBEE_HIVE_ID)",
            self.hive_id
        );
    }

    /// After a broker restart the memory-backed buckets are new.
    pub fn replace_stores(&self, hives_kv: kv::Store, leases: kv::Store) {
        *lock(&self.hives_kv) = hives_kv;
        *lock(&self.leases) = leases;
        self.replaced.notify_waiters();
    }

    /// Starts following the hives bucket, for as long as the hive runs (a
    /// watch that fails or goes quiet is started again, from the bucket's
    /// current values), and returns once the heartbeats the bucket held have
    /// been applied, or after `patience`: a new hive places its first jobs
    /// knowing the others. The watch's first delivery is the only read of
    /// the bucket.
    pub async fn follow_from_start(self: std::sync::Arc<Self>, patience: Duration) {
        let (tx, caught_up) = tokio::sync::oneshot::channel();
        let store = lock(&self.hives_kv).clone();
        // An empty bucket has nothing to deliver first; so has one we cannot read.
        let held = store.status().await.map_or(0, |s| s.values());
        tokio::spawn(async move {
            let mut caught_up = Some(tx);
            loop {
                let why = self.follow(&mut caught_up).await;
                tracing::debug!(%why, "the hives watch stopped; starting it again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        if held > 0 && tokio::time::timeout(patience, caught_up).await.is_err() {
            tracing::warn!("the other hives' heartbeats did not all arrive within {patience:?}; placing with what came");
        }
    }

    /// Applies the bucket's current values, then each change as it comes;
    /// returns why it stopped. `caught_up` is told (once) when the current
    /// values are all in.
    async fn follow(&self, caught_up: &mut Option<tokio::sync::oneshot::Sender<()>>) -> String {
        let store = lock(&self.hives_kv).clone();
        let mut watch = match store.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => return e.to_string(),
        };
        tracing::debug!("following the hives bucket");
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(WATCH_SILENT, watch.next()) => next,
                () = self.replaced.notified() => return "the buckets were recreated".to_owned(),
            };
            match next {
                Err(_) => return format!("nothing came for {WATCH_SILENT:?}"),
                Ok(None) => return "the watch ended".to_owned(),
                Ok(Some(Err(e))) => return e.to_string(),
                Ok(Some(Ok(entry))) => {
                    let value = (entry.operation == kv::Operation::Put).then_some(&entry.value[..]);
                    if let (true, Some(v)) = (entry.key == self.hive_id, value) {
                        self.check_own_id(v);
                    }
                    apply(&mut lock(&self.hives), entry.key, value, now_ms());
                    // `delta`: how many of the values there at the start are still to come.
                    if entry.delta == 0 {
                        if let Some(tx) = caught_up.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            }
        }
    }

    /// Live hives other than this one.
    pub fn others(&self) -> Vec<HiveInfo> {
        let cutoff = now_ms().saturating_sub(HIVE_TTL_SECS * 1000);
        lock(&self.hives).values().filter(|h| self.is_live_other(h, cutoff)).cloned().collect()
    }

    /// How many hives [`Self::others`] would list, without copying them.
    pub fn others_count(&self) -> usize {
        let cutoff = now_ms().saturating_sub(HIVE_TTL_SECS * 1000);
        lock(&self.hives).values().filter(|h| self.is_live_other(h, cutoff)).count()
    }

    fn is_live_other(&self, h: &HiveInfo, cutoff_ms: u64) -> bool {
        h.hive_id != self.hive_id && h.updated_at_ms >= cutoff_ms
    }

    /// May this hive start a worker for `model_key`? Takes the lease if it is free.
    pub async fn place(&self, model_key: &str) -> Result<Placement, String> {
        let key = subjects::cold_start_lease_key(model_key);
        let store = lock(&self.leases).clone();
        for _ in 0..4 {
            match store.get(&key).await {
                Ok(Some(holder)) => {
                    let holder = String::from_utf8_lossy(&holder).into_owned();
                    if holder == self.hive_id {
                        lock(&self.held).entry(model_key.to_owned()).or_insert_with(std::time::Instant::now);
                        return Ok(Placement::Here);
                    }
                    return Ok(Placement::Elsewhere { hive: holder });
                }
                Ok(None) => match store.create(&key, self.hive_id.clone().into()).await {
                    Ok(_) => {
                        lock(&self.held).insert(model_key.to_owned(), std::time::Instant::now());
                        return Ok(Placement::Here);
                    }
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {} // taken meanwhile: read it again
                    Err(e) => return Err(e.to_string()),
                },
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("the lease kept changing".to_owned())
    }

    /// May this hive start a worker for `model_key`, which another hive
    /// serves, to take load off it? Creates `scale.<model>` in the leases
    /// bucket, which only one hive can, until it expires with the bucket's TTL
    /// (15 s): so a backlog adds one worker at a time to the fleet.
    pub async fn take_scale_out(&self, model_key: &str) -> bool {
        let key = subjects::scale_out_key(model_key);
        let store = lock(&self.leases).clone();
        match store.create(&key, self.hive_id.clone().into()).await {
            Ok(_) => true,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
            Err(e) => {
                tracing::warn!(error = %e, "scale-out lease unavailable; not scaling out");
                false
            }
        }
    }

    /// Keeps the leases of the models this hive serves alive (`ready`
    /// workers), and of those it took the lease for and is still starting a
    /// worker for (a load may outlast the lease's 15 s TTL); gives up those it
    /// took but has had no worker for since `UNUSED_LEASE` (a worker that
    /// failed to load, or exited). A worker starting without the lease (a
    /// scale-out, an explicit spawn) does not take it: until it is ready the
    /// model's jobs go to the hive that serves it, and if it fails to start
    /// this hive must not have taken them over.
    pub async fn refresh_leases(&self, ready: &[String], starting: &[String]) {
        let store = lock(&self.leases).clone();
        let (model_keys, stale): (Vec<String>, Vec<String>) = {
            let mut held = lock(&self.held);
            let now = std::time::Instant::now();
            let model_keys: Vec<String> =
                ready.iter().chain(starting.iter().filter(|m| held.contains_key(m.as_str()))).cloned().collect();
            for m in &model_keys {
                held.insert(m.clone(), now);
            }
            let stale: Vec<String> = held.iter().filter(|(m, t)| !model_keys.contains(m) && t.elapsed() > UNUSED_LEASE).map(|(m, _)| m.clone()).collect();
            for m in &stale {
                held.remove(m);
            }
            (model_keys, stale)
        };
        for m in &model_keys {
            let _ = store.put(subjects::cold_start_lease_key(m), self.hive_id.clone().into()).await;
        }
        for m in stale {
            self.release(&m).await;
        }
    }

    /// Gives up every lease this hive holds: it is stopping, and its
    /// models' jobs should go to another hive now, not once the leases
    /// expire (15 s).
    pub async fn release_all(&self) {
        let held: Vec<String> = lock(&self.held).drain().map(|(m, _)| m).collect();
        for m in held {
            self.release(&m).await;
        }
    }

    /// Gives up the lease of a model this hive no longer serves.
    pub async fn release(&self, model_key: &str) {
        let key = subjects::cold_start_lease_key(model_key);
        let store = lock(&self.leases).clone();
        if let Ok(Some(holder)) = store.get(&key).await {
            if holder.as_ref() == self.hive_id.as_bytes() {
                let _ = store.purge(&key).await;
            }
        }
    }
}

/// One change of the hives bucket: `value` is the new heartbeat, `None` a
/// deleted key (a hive that stopped). Hives not heard from for
/// [`FORGET_AFTER_MS`] are dropped, so the view does not grow with every hive
/// that ever ran.
fn apply(hives: &mut HashMap<String, HiveInfo>, key: String, value: Option<&[u8]>, now_ms: u64) {
    match value.map(serde_json::from_slice::<HiveInfo>) {
        Some(Ok(h)) => {
            // What placement sees of the others' catalogs, for "why was my job left?".
            let models = |h: &HiveInfo| h.models.iter().filter(|m| m.present).map(|m| m.key.clone()).collect::<Vec<_>>();
            let now = models(&h);
            if hives.get(&key).map(models).as_ref() != Some(&now) {
                tracing::debug!(hive = %key, models = ?now, "the fleet view has this hive's models");
            }
            hives.insert(key, h);
        }
        Some(Err(e)) => tracing::debug!(%key, error = %e, "a heartbeat that does not decode; ignored"),
        None => {
            hives.remove(&key);
        }
    }
    let forget = now_ms.saturating_sub(FORGET_AFTER_MS);
    hives.retain(|_, h| h.updated_at_ms >= forget);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: &str, at_ms: u64) -> Vec<u8> {
        let h = serde_json::json!({
            "hive_id": id, "version": "0", "protocol": 1, "hostname": "h", "pid": 1,
            "started_at_ms": 0, "updated_at_ms": at_ms, "slots": 1, "busy": 0,
        });
        serde_json::to_vec(&h).expect("encodes")
    }

    #[test]
    fn the_view_takes_heartbeats_drops_stopped_hives_and_forgets_silent_ones() {
        let mut view = HashMap::new();
        let now = 1_000_000;
        apply(&mut view, "a".into(), Some(&beat("a", now)), now);
        apply(&mut view, "b".into(), Some(&beat("b", now - 1000)), now);
        assert_eq!(view.len(), 2);
        // A newer heartbeat replaces the older one.
        apply(&mut view, "b".into(), Some(&beat("b", now)), now);
        assert_eq!(view["b"].updated_at_ms, now);
        // A stopped hive deletes its key.
        apply(&mut view, "a".into(), None, now);
        assert!(!view.contains_key("a"));
        // Garbage is ignored, and leaves the rest alone.
        apply(&mut view, "c".into(), Some(b"not json"), now);
        assert_eq!(view.keys().collect::<Vec<_>>(), vec!["b"]);
        // A hive whose key expired (no marker) is forgotten once it is old enough.
        let later = now + FORGET_AFTER_MS + 1;
        apply(&mut view, "d".into(), Some(&beat("d", later)), later);
        assert_eq!(view.keys().collect::<Vec<_>>(), vec!["d"]);
    }
}
