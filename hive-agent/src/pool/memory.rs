//! The memory a hive's workers are counted for, and making room.
//!
//! Every worker counts its estimate from the moment its model is placed
//! here ([`Pool::admit`] sets it aside; a starting worker carries it), not
//! once its process has taken it. Another model's job may stop idle workers
//! for room ([`Pool::evict_one`], least recently used first, never one with
//! keep-alive -1, nor one a placed job is about to use), and after waiting a
//! while drain busy ones ([`Pool::drain_for`]). The `reserved` map shares the
//! pool's short, never-awaited locks (order: `reserved`, then `slots`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rbee_schemas::hive::WorkerState;

use super::{Pool, Slot, Worker};
use crate::catalog::ModelEntry;
use crate::job::now_ms;
use crate::lock;

/// Memory set aside for a model's worker from the moment its placement
/// passed until the worker exists (or the job ends without one).
#[derive(Debug)]
pub(super) struct Reserved {
    model: String,
    bytes: u64,
    /// A promise rather than a reservation: room kept for a job that is
    /// waiting in the queue while workers drain for it ([`Pool::drain_for`]),
    /// until then. Other models may not take it; the job's own model
    /// still has to fit when it comes back.
    promised_until: Option<Instant>,
}

impl Reserved {
    fn counts(&self, now: Instant) -> bool {
        self.promised_until.is_none_or(|t| now < t)
    }
}

/// How long room promised to a waiting job is kept: it comes back at least
/// every second (the longest nak for memory), and renews the promise.
const PROMISE_FOR: Duration = Duration::from_secs(3);

/// A turn lasts at least this many times the worker's own load time: when
/// two models take turns, loading then takes at most a fifth of the time.
const TURN_PER_LOAD: u64 = 4;

/// Whether a worker that became ready at `ready_ms` after loading for
/// `load_ms` has had its turn by `now_ms`: it was up at least `min_turn`
/// (`--min-turn`) and `TURN_PER_LOAD` times its load time. When two
/// models' jobs both wait for each other's room, each then gets a turn
/// instead of one job per model load, and a model that takes a minute to
/// load keeps its worker for minutes, not seconds.
pub fn turn_is_over(ready_ms: u64, load_ms: u64, now_ms: u64, min_turn: Duration) -> bool {
    let turn = (min_turn.as_millis() as u64).max(load_ms.saturating_mul(TURN_PER_LOAD));
    now_ms.saturating_sub(ready_ms) >= turn
}

/// Memory set aside here for a model's worker by [`Pool::admit`]; given back
/// when dropped. It stops counting once the model has a worker here (the
/// worker counts instead), so holding it for the whole job is fine.
#[derive(Debug)]
pub struct Reservation {
    pool: Arc<Pool>,
    id: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        lock(&self.pool.reserved).remove(&self.id);
    }
}

/// The memory a new worker could take here, as the machine reports it.
#[derive(Debug, Clone, Copy)]
pub struct Free {
    /// Available RAM, bytes (0: unknown).
    pub ram: u64,
    /// Free memory of the GPU the workers run on, where the hive reads one.
    pub vram: Option<u64>,
    /// `--memory-limit` (0: none).
    pub limit: u64,
}

/// What this hive's workers are counted for, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Every worker, ready or starting, and every reservation of a model
    /// without one: what `--memory-limit` is compared with.
    pub total: u64,
    /// The part the machine's free memory does not show yet: workers
    /// starting, reservations.
    pub pending: u64,
}

/// Why a model does not fit here now, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shortfall {
    /// Room for a new worker now.
    pub here: u64,
    /// Held by idle workers that may be stopped to make room.
    pub idle: u64,
    /// Held by workers that are busy or starting (or reserved for): room
    /// once they are idle.
    pub busy: u64,
    /// Held by workers with keep-alive -1, which are never stopped for room.
    pub pinned: u64,
}

impl Free {
    /// Room for a new worker with `c` counted against it.
    pub fn room(&self, c: Committed) -> u64 {
        rbee_schemas::hive::memory_available(self.ram, self.vram, self.limit, c.total, c.pending)
    }
}

/// Memory reserved (or promised) for models with no worker here yet, but
/// `except`'s promises. One reservation per model counts: jobs for the same
/// model share its worker.
fn reserved_for_new(reserved: &HashMap<u64, Reserved>, slots: &HashMap<String, Slot>, except: Option<&str>) -> u64 {
    let now = Instant::now();
    let mut models: HashMap<&str, u64> = HashMap::new();
    let counted = |r: &&Reserved| r.counts(now) && !(r.promised_until.is_some() && except == Some(r.model.as_str()));
    for r in reserved.values().filter(counted).filter(|r| !slots.contains_key(&r.model)) {
        let m = models.entry(&r.model).or_default();
        *m = (*m).max(r.bytes);
    }
    models.values().sum()
}

/// Models that jobs placed here hold (see [`Pool::hold`] and [`Pool::admit`]).
pub(super) fn wanted(reserved: &HashMap<u64, Reserved>) -> std::collections::HashSet<&str> {
    reserved.values().filter(|r| r.promised_until.is_none()).map(|r| r.model.as_str()).collect()
}

/// Whether a worker may be stopped to make room for another model: any
/// but one whose keep-alive says never.
fn evictable(w: &Worker) -> bool {
    w.keep_alive_ms.load(Ordering::Relaxed) >= 0
}

fn is_idle(w: &Worker) -> bool {
    w.proc.busy.available_permits() >= w.proc.slots as usize
}

impl Pool {
    /// Memory a worker of this hive for `model` is estimated to need (with
    /// the KV cache of its `--worker-slots`), on the hive's own backend.
    pub fn memory_for(&self, model: &ModelEntry) -> u64 {
        self.memory_on(model, &self.config.backend)
    }

    /// Before the worker says how many jobs it runs at once: a GPU worker
    /// (candle) runs one, a CPU worker up to `--worker-slots`.
    pub(super) fn memory_on(&self, model: &ModelEntry, backend: &str) -> u64 {
        self.memory_with(model, backend, &self.config.engine)
    }

    fn memory_with(&self, model: &ModelEntry, backend: &str, engine: &str) -> u64 {
        let slots = if backend == "cpu" { self.config.worker_slots } else { 1 };
        crate::system::worker_memory(model, slots, backend, engine)
    }

    /// What a worker for `model` would need here on the candle engine,
    /// where that is less than [`Self::memory_for`]: a CPU hive whose workers
    /// run the fast engine, which widens some weight types (Q4_K, the 5-bit
    /// types, Q6_K) when it loads them, and candle does not.
    pub fn memory_on_candle(&self, model: &ModelEntry) -> Option<u64> {
        let backend = &self.config.backend;
        let lean = self.memory_with(model, backend, "candle");
        (lean < self.memory_on(model, backend)).then_some(lean)
    }

    pub fn committed(&self) -> Committed {
        self.committed_with(&lock(&self.reserved), None)
    }

    /// Counting for a placement of `except` (whose own promise is not
    /// counted against it). Lock order: `reserved`, then `slots`.
    fn committed_with(&self, reserved: &HashMap<u64, Reserved>, except: Option<&str>) -> Committed {
        let slots = lock(&self.slots);
        let mut c = Committed::default();
        for slot in slots.values() {
            match slot {
                Slot::Ready(w) => c.total += w.memory,
                Slot::Starting { memory, .. } => {
                    c.total += memory;
                    c.pending += memory;
                }
            }
        }
        let held = reserved_for_new(reserved, &slots, except);
        c.total += held;
        c.pending += held;
        c
    }

    /// Sets `need` bytes aside for a worker of `model` if they fit in what
    /// `free` leaves once every worker and reservation here is counted;
    /// otherwise says what holds the memory. A model that already has a
    /// worker or a reservation here needs no more. Check and reservation are
    /// one step, so two models placed at once cannot both take the last room.
    pub fn admit(self: &Arc<Self>, model: &str, need: u64, free: Free) -> Result<Reservation, Shortfall> {
        let mut reserved = lock(&self.reserved);
        let now = Instant::now();
        reserved.retain(|_, r| r.counts(now));
        let known = reserved.values().any(|r| r.model == model && r.promised_until.is_none()) || lock(&self.slots).contains_key(model);
        if !known {
            let here = free.room(self.committed_with(&reserved, Some(model)));
            if need > here {
                return Err(self.shortfall(here, &reserved, model));
            }
        }
        // What was promised to this model is taken now.
        reserved.retain(|_, r| !(r.model == model && r.promised_until.is_some()));
        let id = self.next_reservation.fetch_add(1, Ordering::Relaxed);
        reserved.insert(id, Reserved { model: model.to_owned(), bytes: need, promised_until: None });
        Ok(Reservation { pool: self.clone(), id })
    }

    /// Marks `model`'s worker here as wanted by a job placed on it, until
    /// the reservation is dropped: between placement and the job taking a
    /// slot (a round trip to the broker for the claim) the worker looks idle,
    /// and neither the keep-alive reaper nor [`Pool::evict_one`] may stop it
    /// then, or the job would start it again without a memory check.
    pub fn hold(self: &Arc<Self>, model: &str) -> Reservation {
        let id = self.next_reservation.fetch_add(1, Ordering::Relaxed);
        lock(&self.reserved).insert(id, Reserved { model: model.to_owned(), bytes: 0, promised_until: None });
        Reservation { pool: self.clone(), id }
    }

    fn shortfall(&self, here: u64, reserved: &HashMap<u64, Reserved>, model: &str) -> Shortfall {
        let slots = lock(&self.slots);
        let wanted = wanted(reserved);
        let mut s = Shortfall { here, ..Shortfall::default() };
        for (model, slot) in slots.iter() {
            match slot {
                Slot::Ready(w) if !evictable(w) => s.pinned += w.memory,
                Slot::Ready(w) if is_idle(w) && !wanted.contains(model.as_str()) => s.idle += w.memory,
                Slot::Ready(w) => s.busy += w.memory,
                Slot::Starting { memory, .. } => s.busy += memory,
            }
        }
        s.busy += reserved_for_new(reserved, &slots, Some(model));
        s
    }

    /// Whether `model`'s worker here is draining (see [`Pool::drain_for`]).
    pub fn is_draining(&self, model: &str) -> bool {
        matches!(lock(&self.slots).get(model), Some(Slot::Ready(w)) if w.is_draining())
    }

    /// A job for another model has waited too long for room that busy
    /// workers hold: marks the least recently used busy workers that may be
    /// stopped for room (see `evictable`) as draining, until they hold
    /// `short_by` bytes (those draining already count), among those whose
    /// turn is over ([`turn_is_over`]). A draining worker
    /// takes no new jobs, finishes those it runs, and is stopped once idle;
    /// its model's jobs wait in the queue meanwhile. So two models that do
    /// not fit together take turns instead of one starving the other.
    ///
    /// The room, `need` bytes, is promised to `for_model` for `PROMISE_FOR`
    /// (renewed by each call), so other models' jobs cannot take it while
    /// the job waits to come back.
    pub fn drain_for(&self, for_model: &str, short_by: u64, need: u64) {
        let mut reserved = lock(&self.reserved);
        reserved.retain(|_, r| !(r.model == for_model && r.promised_until.is_some()));
        let id = self.next_reservation.fetch_add(1, Ordering::Relaxed);
        reserved.insert(id, Reserved { model: for_model.to_owned(), bytes: need, promised_until: Some(Instant::now() + PROMISE_FOR) });
        let slots = lock(&self.slots);
        let now = now_ms();
        let had_turn = |w: &Worker| turn_is_over(w.started_at_ms, w.load_ms, now, self.config.min_turn);
        let mut busy: Vec<&Arc<Worker>> = slots
            .values()
            .filter_map(|s| match s {
                Slot::Ready(w) if evictable(w) && w.proc.exit_reason().is_none() && had_turn(w) => Some(w),
                _ => None,
            })
            .collect();
        let mut freed: u64 = busy.iter().filter(|w| w.is_draining()).map(|w| w.memory).sum();
        busy.sort_by_key(|w| w.last_activity_ms.load(Ordering::Relaxed));
        for w in busy {
            if freed >= short_by {
                break;
            }
            if !w.is_draining() {
                tracing::info!(worker = %w.proc.id, model = %w.entry.key, "a job for {for_model} waited for room: the worker takes no new jobs and stops once idle");
                w.draining.store(true, Ordering::Relaxed);
                w.dirty.store(true, Ordering::Relaxed);
                freed += w.memory;
            }
        }
    }

    /// Stops the least recently used idle worker that may be stopped for
    /// room (see `evictable`) and waits for its process to exit, so its
    /// memory is free when this returns. `None` when there is no such worker.
    pub async fn evict_one(&self, for_model: &str) -> Option<Arc<Worker>> {
        let (w, permit) = {
            let reserved = lock(&self.reserved);
            let wanted = wanted(&reserved);
            let mut slots = lock(&self.slots);
            let oldest = slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Ready(w) if evictable(w) && is_idle(w) && !wanted.contains(k.as_str()) && w.proc.exit_reason().is_none() => {
                        Some((k, w))
                    }
                    _ => None,
                })
                .min_by_key(|(_, w)| w.last_activity_ms.load(Ordering::Relaxed))
                .map(|(k, w)| (k.clone(), w.clone()));
            let (key, w) = oldest?;
            // All its slots: no job can start on it from here on.
            let permit = w.proc.busy.clone().try_acquire_many_owned(w.proc.slots).ok()?;
            slots.remove(&key);
            (w, permit)
        };
        tracing::info!(worker = %w.proc.id, model = %w.entry.key, "stopping an idle worker to make room for {for_model}");
        w.set_state(WorkerState::Stopping);
        self.publish(w.info(&self.config.hive_id));
        w.proc.stop(Duration::from_secs(5)).await;
        drop(permit);
        Some(w)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::PoolConfig;
    use super::*;

    fn pool() -> Arc<Pool> {
        pool_on("cpu", "auto")
    }

    fn pool_on(backend: &str, engine: &str) -> Arc<Pool> {
        Pool::new(PoolConfig {
            hive_id: "h".into(),
            worker_bin: PathBuf::new(),
            backend: backend.into(),
            engine: engine.into(),
            device: 0,
            threads: None,
            load_timeout: Duration::from_secs(1),
            noop_token_delay: Duration::ZERO,
            keep_alive_ms: 0,
            worker_slots: 1,
            min_turn: Duration::from_secs(5),
        })
    }

    /// The candle engine's smaller figure exists where the fast engine
    /// would widen the model's weights: a CPU hive not already on candle.
    #[test]
    fn a_candle_worker_needs_less_only_where_the_fast_engine_widens() {
        let k = crate::catalog::KNOWN_MODELS[0];
        let demo = k.entry(k.file.into(), 0);
        let widened = ModelEntry { weight_bytes: k.size * 8 / 5, ..demo.clone() };
        let auto = pool();
        let lean = auto.memory_on_candle(&widened).expect("smaller on candle");
        let (wide, file) = (widened.weight_bytes, k.size);
        assert_eq!(auto.memory_for(&widened) - lean, (wide + wide / 10) - (file + file / 10), "the widening and its tenth");
        assert_eq!(auto.memory_on_candle(&demo), None, "Q4_1 is held as it is");
        assert_eq!(pool_on("cpu", "candle").memory_on_candle(&widened), None, "already candle");
        assert_eq!(pool_on("cuda", "auto").memory_on_candle(&widened), None, "candle on a GPU keeps the file's blocks");
    }

    #[test]
    fn a_turn_lasts_the_minimum_or_four_loads_whichever_is_longer() {
        let five = Duration::from_secs(5);
        // A quick load: the minimum turn.
        assert!(!turn_is_over(1_000, 300, 5_999, five));
        assert!(turn_is_over(1_000, 300, 6_000, five));
        // A minute's load: four minutes' turn, whatever the minimum.
        assert!(!turn_is_over(0, 60_000, 239_999, five));
        assert!(turn_is_over(0, 60_000, 240_000, five));
        // No minimum: still four loads.
        assert!(!turn_is_over(0, 300, 1_199, Duration::ZERO));
        assert!(turn_is_over(0, 300, 1_200, Duration::ZERO));
        // A clock that went back is no turn over.
        assert!(!turn_is_over(10_000, 0, 9_000, five));
    }

    #[test]
    fn memory_is_set_aside_once_per_model_until_its_reservations_are_dropped() {
        let pool = pool();
        let free = Free { ram: 1000, vram: None, limit: 0 };
        let a = pool.admit("a", 600, free).expect("fits");
        let a_again = pool.admit("a", 600, free).expect("a second job for the same model shares its worker");
        assert_eq!(pool.committed(), Committed { total: 600, pending: 600 });
        // Another model no longer fits: the room is set aside for "a", which is not idle.
        assert_eq!(pool.admit("b", 600, free).expect_err("no room left"), Shortfall { here: 400, busy: 600, ..Shortfall::default() });
        assert!(pool.admit("c", 400, free).is_ok(), "what is left still fits");
        drop(a);
        assert_eq!(pool.committed().total, 600, "one job for \"a\" still holds it");
        drop(a_again);
        assert_eq!(pool.committed(), Committed::default());
        assert!(pool.admit("b", 600, free).is_ok());
        // A job placed on a running worker holds it, but sets no memory aside.
        let held = pool.hold("warm");
        assert_eq!(pool.committed(), Committed::default());
        assert!(wanted(&lock(&pool.reserved)).contains("warm"));
        drop(held);
        assert!(wanted(&lock(&pool.reserved)).is_empty());
    }

    #[test]
    fn room_promised_to_a_waiting_model_is_kept_from_others_and_taken_by_it() {
        let pool = pool();
        let free = Free { ram: 1000, vram: None, limit: 0 };
        pool.drain_for("b", 600, 600);
        assert_eq!(pool.committed().total, 600, "the promise counts");
        // Another model must wait: the room is promised.
        assert_eq!(pool.admit("c", 600, free).expect_err("promised to b"), Shortfall { here: 400, busy: 600, ..Shortfall::default() });
        // Its own promise does not count against "b", which takes it.
        let b = pool.admit("b", 600, free).expect("its own room");
        assert_eq!(pool.committed().total, 600, "the promise became b's reservation");
        drop(b);
        assert_eq!(pool.committed(), Committed::default());
        // A promise whose job went away (cancelled, expired, run elsewhere)
        // lapses: once it is past, it holds nothing and is cleared.
        pool.drain_for("b", 600, 600);
        for r in lock(&pool.reserved).values_mut() {
            r.promised_until = Some(Instant::now() - Duration::from_millis(1));
        }
        assert_eq!(pool.committed(), Committed::default());
        let c = pool.admit("c", 600, free).expect("the lapsed promise holds nothing");
        assert_eq!(lock(&pool.reserved).len(), 1, "the lapsed promise is gone, c's reservation stays");
        drop(c);
    }

    #[test]
    fn room_is_the_least_of_free_memory_less_what_is_pending_and_the_limit_less_what_is_committed() {
        let c = Committed { total: 300, pending: 100 };
        assert_eq!(Free { ram: 1000, vram: None, limit: 0 }.room(c), 900);
        assert_eq!(Free { ram: 1000, vram: None, limit: 500 }.room(c), 200);
        assert_eq!(Free { ram: 1000, vram: Some(150), limit: 0 }.room(c), 50, "GPU memory, not RAM");
        assert_eq!(Free { ram: 0, vram: None, limit: 500 }.room(c), 200, "RAM unknown: the limit alone");
        assert_eq!(Free { ram: 50, vram: None, limit: 0 }.room(c), 0, "all of it pending: none left, not unknown");
    }
}
