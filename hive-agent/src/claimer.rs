//! Claiming jobs, never more than there are free slots, on top of [`Puller`].
//!
//! Inference ([`Claimer::run`]): an idle hive waits on both lanes. Once it
//! knows batch work is waiting (a batch job arrived for a slot already taken:
//! it is handed back at once, never started), each free slot is first offered
//! to the interactive lane with a no-wait pull, and only if that lane is empty
//! to the batch lane. Batch is not starved: after 3 interactive claims in a
//! row while batch work waits, the next free slot goes to the batch lane.
//!
//! A hive that has lately left a job for another hive ([`Leaves`]) keeps one
//! pull request per lane waiting, not one for every free slot. nats-server
//! 2.9 fills the oldest waiting request until its batch is used up, so a
//! request with room left stays first in line: the job the hive just left
//! came back to it until that request was used up (up to 4 times with the
//! default 4 slots). With
//! single-job requests the left job's request is used up, the hive's next one
//! queues behind the other hives' requests, and the job moves on.
//!
//! Lifecycle jobs ([`claim_ctl`]): the hive's own consumer and the shared
//! `any` consumer, each asked for the free lifecycle slots; an overflow is
//! handed back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::Client;
use rbee_schemas::subjects::Lane;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::lock;
use crate::puller::{hand_back, Pulled, Puller};

/// Interactive claims in a row, while batch work waits, before batch gets a slot.
pub const BATCH_EVERY: u32 = 4;

/// A job's hold on one of the hive's slots; dropping it frees the slot.
#[derive(Debug)]
pub struct SlotGuard {
    _permit: OwnedSemaphorePermit,
    freed: Arc<Notify>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.freed.notify_one();
    }
}

/// Slots and the signal that one was freed.
#[derive(Debug, Clone)]
pub struct Slots {
    pub permits: Arc<Semaphore>,
    pub freed: Arc<Notify>,
}

impl Slots {
    pub fn new(n: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(n)), freed: Arc::new(Notify::new()) }
    }

    fn free(&self) -> usize {
        self.permits.available_permits()
    }

    fn take(&self) -> Option<SlotGuard> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(SlotGuard { _permit: permit, freed: self.freed.clone() })
    }
}

/// How long a hive that left a job keeps asking for one job at a time.
pub const LEAVING_FOR: Duration = Duration::from_secs(30);

/// When this hive last left a job for another hive; shared by the job tasks
/// (which leave jobs) and the claimer (which asks for fewer at a time).
#[derive(Debug, Clone, Default)]
pub struct Leaves {
    last: Arc<Mutex<Option<Instant>>>,
}

impl Leaves {
    /// Notes that a job was just left for another hive.
    pub fn left(&self) {
        *lock(&self.last) = Some(Instant::now());
    }

    /// Whether a job was left within [`LEAVING_FOR`].
    pub fn recent(&self) -> bool {
        lock(&self.last).is_some_and(|t| t.elapsed() < LEAVING_FOR)
    }
}

/// The claiming side of the two lane consumers.
#[derive(Debug)]
pub struct Claimer {
    pub client: Client,
    pub js: jetstream::Context,
    pub stream: String,
    pub slots: Slots,
    pub leaves: Leaves,
}

const INTERACTIVE: usize = 0;
const BATCH: usize = 1;

impl Claimer {
    /// Claims inference jobs until `stop`, handing each to `on_job` with its lane and slot.
    pub async fn run<F>(self, stop: CancellationToken, mut on_job: F) -> Result<(), async_nats::Error>
    where
        F: FnMut(jetstream::Message, Lane, SlotGuard),
    {
        let consumers = [Lane::Interactive.consumer(), Lane::Batch.consumer()];
        let mut puller = Puller::new(self.client.clone(), self.js.clone(), &self.stream, &consumers).await?;
        let mut interactive_streak = 0u32;
        let mut batch_waiting = false;
        let mut interactive_empty = false;
        loop {
            let free = self.slots.free();
            // Jobs to ask for at once (see the module doc on leaving).
            let ask = if self.leaves.recent() { free.min(1) } else { free };
            let (i, b) = (puller.credits(INTERACTIVE), puller.credits(BATCH));
            if !batch_waiting {
                // Idle or interactive-only: wait on both lanes.
                puller.request(INTERACTIVE, top_up(ask, i), false).await;
                puller.request(BATCH, top_up(ask, b), false).await;
            } else if interactive_streak + 1 >= BATCH_EVERY || interactive_empty {
                // Batch's turn, or no interactive job waits: one lane at a time.
                if i == 0 {
                    puller.request(BATCH, ask.saturating_sub(b), false).await;
                }
            } else if b == 0 {
                puller.request(INTERACTIVE, ask.saturating_sub(i), true).await;
            }
            tokio::select! {
                pulled = puller.next() => match pulled {
                    Pulled::Closed => return Ok(()),
                    Pulled::Idle => {}
                    Pulled::Ended { consumer, empty } => match consumer {
                        BATCH if empty => batch_waiting = false,
                        INTERACTIVE if empty => interactive_empty = true,
                        _ => {}
                    },
                    Pulled::Job(consumer, job) => {
                        let lane = if consumer == BATCH { Lane::Batch } else { Lane::Interactive };
                        let Some(slot) = self.slots.take() else {
                            // Both lanes answered for one slot: hand it back unstarted.
                            if lane == Lane::Batch {
                                batch_waiting = true;
                            }
                            hand_back(&job).await;
                            continue;
                        };
                        match lane {
                            Lane::Interactive if batch_waiting => interactive_streak += 1,
                            Lane::Interactive => {}
                            Lane::Batch => {
                                interactive_streak = 0;
                                interactive_empty = false;
                                batch_waiting = job.info().map(|i| i.pending > 0).unwrap_or(false);
                            }
                        }
                        on_job(job, lane, slot);
                    }
                },
                _ = self.slots.freed.notified() => {}
                _ = stop.cancelled() => return puller.close().await,
            }
        }
    }
}

/// How many more jobs to ask a lane for, with `free` slots and `credits`
/// asked for already: none while at least half the slots are still asked
/// for, so a busy hive sends one pull request per several jobs, not one per
/// job; but never leaves a lane with nothing asked.
fn top_up(free: usize, credits: usize) -> usize {
    let want = free.saturating_sub(credits);
    if credits == 0 || want * 2 >= free {
        want
    } else {
        0
    }
}

/// Claims lifecycle jobs from `consumers` until `stop`.
pub async fn claim_ctl<F>(
    client: Client,
    js: jetstream::Context,
    stream: &str,
    consumers: &[&str],
    slots: Slots,
    stop: CancellationToken,
    mut on_job: F,
) -> Result<(), async_nats::Error>
where
    F: FnMut(jetstream::Message, SlotGuard),
{
    let mut puller = Puller::new(client, js, stream, consumers).await?;
    loop {
        let free = slots.free();
        for c in 0..consumers.len() {
            let have = puller.credits(c);
            puller.request(c, free.saturating_sub(have), false).await;
        }
        tokio::select! {
            pulled = puller.next() => match pulled {
                Pulled::Closed => return Ok(()),
                Pulled::Job(_, job) => match slots.take() {
                    Some(slot) => on_job(job, slot),
                    None => hand_back(&job).await,
                },
                _ => {}
            },
            _ = slots.freed.notified() => {}
            _ = stop.cancelled() => return puller.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::top_up;

    #[test]
    fn pull_requests_are_batched_but_a_lane_is_never_left_unasked() {
        assert_eq!(top_up(1, 0), 1);
        assert_eq!(top_up(1, 1), 0);
        assert_eq!(top_up(16, 0), 16);
        assert_eq!(top_up(16, 15), 0); // 15 still asked for: wait
        assert_eq!(top_up(16, 9), 0);
        assert_eq!(top_up(16, 8), 8); // half gone: ask for them in one request
        assert_eq!(top_up(4, 3), 0);
        assert_eq!(top_up(4, 2), 2);
        assert_eq!(top_up(0, 0), 0);
        assert_eq!(top_up(2, 5), 0);
    }
}
