//! Should this hive run the job, with no scheduler to ask?
//!
//! 1. The model must be known here (catalog, or a known model on disk). If
//!    not, but another live hive lists it, the job is left for that hive.
//! 2. A worker for it runs here: warm start, go (checked first: a warm job
//!    reads nothing, not even the catalog).
//! 3. Its estimated memory must fit here (free memory, and `--memory-limit`
//!    minus what this hive's workers take, those still starting included).
//!    The memory is set aside for it at once ([`Pool::admit`]), so two models
//!    placed at the same moment cannot both take the last room. If it does
//!    not fit, but fits another live hive, the job is left for it; else idle
//!    workers here are stopped for it, least recently used first, unless
//!    their keep-alive is -1; a job that would fit once busy workers here are
//!    idle waits in the queue (after 5 s they are drained for it: no new
//!    jobs, stopped once idle); one that fits nowhere even then ends
//!    `INSUFFICIENT_MEMORY` ([`make_room`]).
//! 4. Cold start only with the model's lease ([`crate::fleet`]): when another
//!    hive holds it (serves the model, or is starting a worker), the job is
//!    left in the queue for that hive. So a burst of jobs for an unserved
//!    model starts exactly one worker, and jobs go where one is warm.
//! 5. Scale-out: a job left for another hive that has already waited
//!    `--scale-out-after` in the queue means that hive is busy. If the model
//!    fits here, this hive starts a worker for it in the background (at most
//!    one hive per model every 15 s, [`crate::fleet::Fleet::take_scale_out`])
//!    and keeps leaving the model's jobs until the worker is ready.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use rbee_schemas::error::{ErrorCode, JobError};

use rbee_schemas::model::ModelRef;

use super::JobCtx;
use crate::catalog::ModelEntry;
use crate::fleet::Placement;
use crate::lock;
use crate::pool::{Free, Pool, Reservation, Shortfall, StartOptions};
use crate::system::human;

/// The longest a job left for another hive stays out of the queue (see
/// [`leave_delay`]). While the serving hive is busy, its queued jobs come back
/// only this often, so a slot it frees may idle up to this long: with 250 ms,
/// a saturated hive ran its model at ~57 % of its speed while other hives
/// were up, ~83 % with 100 ms and ~88 % with 50 ms. The visits this costs
/// the other hives stayed under 1 % of a core at 50 ms once a hive
/// remembers where a model is served ([`ServedElsewhere`]; docs/benchmarks.md,
/// fifth and sixth passes).
const LEAVE_FOR_WARM: Duration = Duration::from_millis(50);
const LEAVE_FOR_MEMORY: Duration = Duration::from_secs(1);
/// How long a job may wait in the queue for room that busy workers here
/// hold before they are drained for it ([`Pool::drain_for`]): without it, a
/// steady stream of one model's jobs would keep another model's job waiting
/// for ever.
const DRAIN_AFTER: Duration = Duration::from_secs(5);
/// The delay after a job's quick visits, doubled with each further delivery.
const FIRST_LEAVE: Duration = Duration::from_millis(10);

/// The nak delay for a job left for another hive on its `delivered`-th
/// delivery, with `hives` live hives: none while the job may not have seen
/// every other hive yet, then 10 ms, doubling with each delivery up to `most`.
///
/// Every hive with a free slot pulls from the same consumer, so a job left
/// here may well go to another hive that cannot run it either. A job left at
/// once goes to the next hive's waiting request (this hive's own request for
/// it is used up, see [`crate::claimer`]), so it finds the hive that serves its
/// model in about a millisecond per hive on the way. The doubling after that
/// keeps a job that no hive can take now (its model's hive is busy) from
/// circling faster than every 50 ms.
pub fn leave_delay(most: Duration, delivered: i64, hives: usize) -> Duration {
    // Deliveries after the one to the last hive not yet seen.
    let past_visits = delivered.saturating_sub(i64::try_from(hives).unwrap_or(i64::MAX)).saturating_add(1);
    if past_visits <= 0 {
        return Duration::ZERO;
    }
    let doublings = (past_visits - 1).clamp(0, 16) as u32;
    FIRST_LEAVE.saturating_mul(1 << doublings).min(most)
}

/// Leaves `msg` (a job or a spawn, `what`) in the queue for another hive:
/// nak'ed with [`leave_delay`] of at most `most`.
pub async fn leave(ctx: &JobCtx, msg: &jetstream::Message, most: Duration, why: &str, what: &str) {
    let hives = ctx.fleet.others_count() + 1;
    let delay = leave_delay(most, msg.info().map_or(1, |i| i.delivered), hives);
    tracing::debug!(%why, ?delay, "leaving the {what} for another hive");
    // A plain nak for no delay: on 2.9 a nak with `{"delay":0}` came back
    // only after about 11 ms.
    let _ = msg.ack_with(AckKind::Nak((!delay.is_zero()).then_some(delay))).await;
}

/// Workers this hive starts to take load off another hive (placement step 5).
#[derive(Debug, Default)]
pub struct ScaleOut {
    /// How long a job left for another hive may have waited before this hive
    /// starts a worker for its model too; zero: never.
    pub after: Duration,
    /// Models whose scale-out worker is starting.
    starting: Arc<Mutex<HashSet<String>>>,
    /// When this hive last asked for each model's scale-out lease.
    asked: Mutex<HashMap<String, Instant>>,
}

/// How long a hive waits before it asks for a model's scale-out lease again:
/// while a backlog lasts, every job it leaves would otherwise cost the broker
/// a failed create.
const ASK_AGAIN: Duration = Duration::from_secs(5);

impl ScaleOut {
    pub fn new(after: Duration) -> Self {
        Self { after, starting: Arc::default(), asked: Mutex::default() }
    }

    /// Whether a job that waited `queued` may ask for `model_key`'s scale-out
    /// lease now (and notes that it does).
    fn may_ask(&self, model_key: &str, queued: Duration) -> bool {
        if self.after.is_zero() || queued < self.after {
            return false;
        }
        let mut asked = lock(&self.asked);
        let now = Instant::now();
        asked.retain(|_, t| now.duration_since(*t) < ASK_AGAIN);
        if asked.contains_key(model_key) {
            return false;
        }
        asked.insert(model_key.to_owned(), now);
        true
    }

    fn is_scaling(&self, model_key: &str) -> bool {
        lock(&self.starting).contains(model_key)
    }

    /// Starts a worker for `entry` in the background; until it is ready the
    /// model's jobs are left for the hive that serves it.
    fn start(&self, pool: &Arc<Pool>, entry: ModelEntry, reservation: Reservation) {
        if !lock(&self.starting).insert(entry.key.clone()) {
            return;
        }
        let (pool, starting) = (pool.clone(), self.starting.clone());
        tokio::spawn(async move {
            let started = pool.spawn(&entry, StartOptions::default()).await;
            drop(reservation);
            match started {
                Ok(_) => tracing::info!(model = %entry.key, "scale-out worker ready"),
                Err(e) => tracing::warn!(model = %entry.key, error = %e.message, "scale-out worker failed to start"),
            }
            lock(&starting).remove(&entry.key);
        });
    }
}

/// Models this hive just found served by another hive, for a moment: while
/// that hive's jobs keep coming by, each one would otherwise read the catalog
/// and ask the broker for the cold-start lease again, and the job would wait
/// for both before it is left (placement step 4).
#[derive(Debug, Default)]
pub struct ServedElsewhere(Mutex<HashMap<String, (ModelEntry, String, Instant)>>);

/// How long [`ServedElsewhere`] trusts what it saw. The lease it read lasts
/// 15 s after its holder stops, so this adds little to the time a model
/// whose hive died takes to start elsewhere.
const SERVED_ELSEWHERE_FOR: Duration = Duration::from_secs(1);

impl ServedElsewhere {
    fn get(&self, wanted: &str) -> Option<(ModelEntry, String)> {
        let seen = lock(&self.0);
        let (entry, hive, at) = seen.get(wanted)?;
        (at.elapsed() < SERVED_ELSEWHERE_FOR).then(|| (entry.clone(), hive.clone()))
    }

    /// Stale entries go here, so the map holds only what was seen in the last second.
    fn note(&self, wanted: &str, entry: &ModelEntry, hive: &str) {
        let mut seen = lock(&self.0);
        seen.retain(|_, (_, _, at)| at.elapsed() < SERVED_ELSEWHERE_FOR);
        seen.insert(wanted.to_owned(), (entry.clone(), hive.to_owned(), Instant::now()));
    }
}

/// What is being placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An inference job that has waited `queued` since it was published: may
    /// be left for another hive; cold starts need the lease.
    Job { queued: Duration },
    /// `worker.spawn` sent to `any`: may be left for a hive that has the model or the memory.
    SpawnAny,
    /// `worker.spawn` sent to this hive: here or not at all.
    SpawnHere,
}

#[derive(Debug)]
pub enum Decision {
    /// Run it here. Keep the reservation until the job ends: it sets the
    /// worker's memory aside when the model has no worker here yet, and
    /// keeps the worker from being stopped before the job takes a slot.
    Go(ModelEntry, Option<Reservation>),
    Defer { delay: Duration, why: String },
    Fail(JobError),
}

pub async fn place(ctx: &JobCtx, model: &ModelRef, mode: Mode) -> Decision {
    let wanted = model.to_string();
    if let Some(entry) = ctx.pool.warm_entry(&wanted) {
        let held = ctx.pool.hold(&entry.key);
        return Decision::Go(entry, Some(held));
    }
    if let Mode::Job { queued } = mode {
        match ctx.served_elsewhere.get(&wanted) {
            Some((entry, hive)) if !ctx.pool.has(&entry.key) => return left_for(ctx, entry, &hive, queued).await,
            _ => {}
        }
    }
    let may_defer = mode != Mode::SpawnHere;
    let catalog = ctx.catalog.clone();
    let hive = ctx.hive_id.clone();
    let to_resolve = model.clone();
    let entry = match tokio::task::spawn_blocking(move || catalog.resolve(&to_resolve, &hive)).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            let elsewhere = ctx.fleet.others().into_iter().find(|h| h.models.iter().any(|m| m.is_present(model, &wanted)));
            return match elsewhere {
                Some(h) if may_defer && matches!(e.code, ErrorCode::UnknownModel | ErrorCode::ModelSourceUnreachable) => {
                    Decision::Defer { delay: LEAVE_FOR_WARM, why: format!("hive {} has {wanted}", h.hive_id) }
                }
                _ => Decision::Fail(e),
            };
        }
        Err(e) => return Decision::Fail(JobError::internal(e.to_string())),
    };
    if ctx.pool.is_draining(&entry.key) {
        return Decision::Defer { delay: LEAVE_FOR_MEMORY, why: format!("the worker for {} here is stopping to make room for another model", entry.key) };
    }
    if ctx.pool.has(&entry.key) {
        // A worker starting to take load off another hive: until it is
        // ready, that hive still runs the model's jobs sooner.
        if matches!(mode, Mode::Job { .. }) && ctx.scaling.is_scaling(&entry.key) {
            return Decision::Defer { delay: LEAVE_FOR_WARM, why: format!("a worker for {} is starting here to scale out", entry.key) };
        }
        let held = ctx.pool.hold(&entry.key);
        return Decision::Go(entry, Some(held));
    }
    let need = ctx.pool.memory_for(&entry);
    let reservation = match ctx.pool.admit(&entry.key, need, free_here(ctx)) {
        Ok(r) => r,
        Err(short) => return make_room(ctx, entry, need, short, mode).await,
    };
    let Mode::Job { queued } = mode else {
        // An explicit spawn starts a worker whoever holds the lease.
        return Decision::Go(entry, Some(reservation));
    };
    match ctx.fleet.place(&entry.key).await {
        Ok(Placement::Here) => Decision::Go(entry, Some(reservation)),
        Ok(Placement::Elsewhere { hive }) => {
            drop(reservation);
            ctx.served_elsewhere.note(&wanted, &entry, &hive);
            left_for(ctx, entry, &hive, queued).await
        }
        Err(e) => {
            tracing::warn!(error = %e, "cold-start lease unavailable; starting a worker here");
            Decision::Go(entry, Some(reservation))
        }
    }
}

/// The memory a new worker could take on this hive, read now.
fn free_here(ctx: &JobCtx) -> Free {
    let (_, ram) = crate::system::memory();
    Free { ram, vram: ctx.gpu.as_ref().and_then(|g| g.memory()).map(|m| m.free), limit: ctx.memory_limit }
}

/// The model does not fit here as things stand (step 3). In order:
/// - another live hive has the room: leave the job for it;
/// - idle workers here hold enough: stop them, least recently used first,
///   and start this one (a job first takes the model's lease, so no worker is
///   stopped for a model another hive serves);
/// - busy or starting workers hold enough: a job waits in the queue until they
///   are idle, and after [`DRAIN_AFTER`] they take no new jobs, so they will be
///   (an explicit spawn fails, saying so);
/// - not even then (the model is too big, or workers with keep-alive -1 hold
///   the room): `INSUFFICIENT_MEMORY`.
async fn make_room(ctx: &JobCtx, entry: ModelEntry, need: u64, mut short: Shortfall, mode: Mode) -> Decision {
    if mode != Mode::SpawnHere {
        if let Some(h) = ctx.fleet.others().into_iter().find(|h| h.memory_available() >= need) {
            return Decision::Defer { delay: LEAVE_FOR_MEMORY, why: format!("{} needs {} and fits hive {}", entry.key, human(need), h.hive_id) };
        }
    }
    if need <= short.here + short.idle {
        if let Mode::Job { queued } = mode {
            match ctx.fleet.place(&entry.key).await {
                Ok(Placement::Here) => {}
                Ok(Placement::Elsewhere { hive }) => return left_for(ctx, entry, &hive, queued).await,
                Err(e) => tracing::warn!(error = %e, "cold-start lease unavailable; making room here"),
            }
        }
        while ctx.pool.evict_one(&entry.key).await.is_some() {
            match ctx.pool.admit(&entry.key, need, free_here(ctx)) {
                Ok(r) => return Decision::Go(entry, Some(r)),
                Err(s) => short = s,
            }
        }
    }
    let wait = need <= short.here + short.idle + short.busy;
    if let (true, Mode::Job { queued }) = (wait, mode) {
        if queued >= DRAIN_AFTER {
            ctx.pool.drain_for(&entry.key, need.saturating_sub(short.here), need);
        }
        return Decision::Defer { delay: LEAVE_FOR_MEMORY, why: format!("{} needs {}; waiting for busy workers here to be idle", entry.key, human(need)) };
    }
    Decision::Fail(insufficient(ctx, &entry, need, short, wait))
}

fn insufficient(ctx: &JobCtx, entry: &ModelEntry, need: u64, short: Shortfall, busy: bool) -> JobError {
    let on_gpu = match &ctx.gpu {
        Some(g) if g.memory().is_some() => format!(" of GPU memory on {}", g.label),
        _ => String::new(),
    };
    let limit = if ctx.memory_limit > 0 { format!(" (limit {})", human(ctx.memory_limit)) } else { String::new() };
    let held = if busy {
        format!("; busy workers here hold {}: try again when they are idle", human(short.busy))
    } else if short.pinned > 0 {
        format!("; workers with keep-alive -1 hold {} and are not stopped for other models", human(short.pinned))
    } else {
        String::new()
    };
    let candle = candle_hint(ctx.pool.memory_on_candle(entry), short.here + short.idle);
    JobError::new(
        ErrorCode::InsufficientMemory,
        format!(
            "model {} needs about {} of memory; hive {} has {}{on_gpu} available{limit}{held}, and no other hive has more. \
             Free memory, raise --memory-limit, or use a smaller quantization{candle}",
            entry.key,
            human(need),
            ctx.hive_id,
            human(short.here + short.idle),
        ),
    )
}

/// The end of an `INSUFFICIENT_MEMORY` message where the candle engine
/// would fit a model that the fast engine's widened weights do not: `lean`
/// is what a candle worker needs ([`Pool::memory_on_candle`]), `room` what
/// the hive could free. Empty otherwise.
fn candle_hint(lean: Option<u64>, room: u64) -> String {
    match lean {
        Some(lean) if lean <= room => format!(
            "; or start the hive with --worker-engine candle (RBEE_ENGINE=candle): candle keeps this model's weights \
             as the file stores them and needs about {} here, but runs several times slower",
            human(lean)
        ),
        _ => String::new(),
    }
}

/// A job for `entry`, which `hive` serves: left for it, after starting a
/// worker here too if the job waited long enough (placement step 5).
async fn left_for(ctx: &JobCtx, entry: ModelEntry, hive: &str, queued: Duration) -> Decision {
    if ctx.scaling.may_ask(&entry.key, queued) {
        // Only where the model fits as things stand: scale-out stops no worker.
        let room = ctx.pool.admit(&entry.key, ctx.pool.memory_for(&entry), free_here(ctx));
        if let Ok(reservation) = room {
            if ctx.fleet.take_scale_out(&entry.key).await {
                tracing::info!(model = %entry.key, %hive, ?queued, "a job waited for hive {hive}; starting a worker here too");
                ctx.scaling.start(&ctx.pool, entry.clone(), reservation);
            }
        }
    }
    Decision::Defer { delay: LEAVE_FOR_WARM, why: format!("hive {hive} serves {}", entry.key) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insufficient_memory_names_the_candle_engine_only_where_it_would_fit() {
        let hint = candle_hint(Some(300 << 20), 400 << 20);
        assert!(hint.contains("--worker-engine candle") && hint.contains("300.0 MiB"), "{hint}");
        assert_eq!(candle_hint(Some(500 << 20), 400 << 20), "", "candle would not fit either");
        assert_eq!(candle_hint(None, 400 << 20), "", "no smaller figure (not widened, GPU, or already candle)");
    }

    #[test]
    fn only_a_job_that_waited_asks_for_the_scale_out_lease_and_not_again_soon() {
        let scale = ScaleOut::new(Duration::from_secs(2));
        assert!(!scale.may_ask("m", Duration::from_millis(1999)));
        assert!(scale.may_ask("m", Duration::from_secs(2)));
        assert!(!scale.may_ask("m", Duration::from_secs(9)), "asked a moment ago");
        assert!(scale.may_ask("other", Duration::from_secs(3)));
        let off = ScaleOut::new(Duration::ZERO);
        assert!(!off.may_ask("m", Duration::from_secs(3600)));
    }

    #[test]
    fn a_job_left_for_another_hive_visits_each_hive_at_once_then_comes_back_less_often() {
        let ms = |d: Duration| d.as_millis();
        // Four hives: three quick visits, then the doubling.
        let delays: Vec<u128> = (1..=10).map(|n| ms(leave_delay(LEAVE_FOR_WARM, n, 4))).collect();
        assert_eq!(delays, [0, 0, 0, 10, 20, 40, 50, 50, 50, 50]);
        assert_eq!(ms(leave_delay(LEAVE_FOR_MEMORY, 12, 4)), 1000);
        // Alone, or with no delivery info: the doubling starts at once.
        assert_eq!(ms(leave_delay(LEAVE_FOR_WARM, 1, 1)), 10);
        assert_eq!(ms(leave_delay(LEAVE_FOR_WARM, 2, 1)), 20);
        assert_eq!(ms(leave_delay(LEAVE_FOR_WARM, 0, 1)), 0);
        // A huge count, or a huge fleet, stays in range.
        assert_eq!(ms(leave_delay(LEAVE_FOR_WARM, i64::MAX, 4)), 50);
        assert_eq!(ms(leave_delay(LEAVE_FOR_WARM, 3, usize::MAX)), 0);
    }
}
