//! The in-memory index of the spool: per pool, which messages are ready
//! (oldest first), which are deferred until when, and whether the pool is held.
//!
//! Cost: about 40 bytes per queued message (an id in a `BTreeSet` or a
//! `(due, id)` in a heap); envelopes and bodies stay on disk. One mutex
//! guards the index; it is held only for set operations, never across I/O.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use poolrelay_spool::{QueueId, now_ms};
use tokio::sync::Notify;

/// A message handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Its queue id.
    pub id: QueueId,
    /// Its pool.
    pub pool: String,
}

struct PoolQueue {
    ready: BTreeSet<QueueId>,
    deferred: BinaryHeap<Reverse<(u64, QueueId)>>,
    in_flight: usize,
    held: bool,
    /// Messages finished per second over the last minute, as a ring indexed by second.
    recent: [u32; 60],
    /// The Unix second each ring slot was last written in.
    recent_at: [u64; 60],
}

impl Default for PoolQueue {
    fn default() -> Self {
        PoolQueue {
            ready: BTreeSet::new(),
            deferred: BinaryHeap::new(),
            in_flight: 0,
            held: false,
            recent: [0; 60],
            recent_at: [0; 60],
        }
    }
}

impl PoolQueue {
    fn count_delivered(&mut self, now_sec: u64) {
        let slot = (now_sec % 60) as usize;
        if self.recent_at[slot] != now_sec {
            self.recent_at[slot] = now_sec;
            self.recent[slot] = 0;
        }
        self.recent[slot] += 1;
    }

    fn delivered_last_minute(&self, now_sec: u64) -> u64 {
        (0..60)
            .filter(|&i| now_sec.saturating_sub(self.recent_at[i]) < 60)
            .map(|i| u64::from(self.recent[i]))
            .sum()
    }

    /// Moves every deferred message whose time has come to `ready`.
    fn promote(&mut self, now: u64) {
        while let Some(Reverse((due, id))) = self.deferred.peek().copied() {
            if due > now {
                break;
            }
            self.deferred.pop();
            self.ready.insert(id);
        }
    }
}

/// Counts of one pool, for metrics and the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Ready to be delivered now (including those in flight).
    pub ready: usize,
    /// Waiting for their next attempt time.
    pub deferred: usize,
    /// Being delivered right now.
    pub in_flight: usize,
    /// Whether the pool is held.
    pub held: bool,
    /// Oldest queued message id (ids encode the accept time).
    pub oldest: Option<QueueId>,
    /// Messages that left the queue delivered in the last 60 seconds.
    pub delivered_last_minute: u64,
}

/// The scheduler shared by the listeners (which add mail) and the workers (which take it).
#[derive(Default)]
pub struct Scheduler {
    pools: Mutex<HashMap<String, PoolQueue>>,
    wake: Notify,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new() -> Scheduler {
        Scheduler::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, PoolQueue>) -> T) -> T {
        // A poisoned lock only means a panic elsewhere; the sets are still consistent.
        let mut guard = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Adds a message, ready at `due_ms` (0 or past = now).
    pub fn enqueue(&self, id: QueueId, pool: &str, due_ms: u64) {
        self.with(|pools| {
            let q = pools.entry(pool.to_string()).or_default();
            if due_ms <= now_ms() {
                q.ready.insert(id);
            } else {
                q.deferred.push(Reverse((due_ms, id)));
            }
        });
        self.wake.notify_waiters();
    }

    /// A worker finished with a job (whatever the outcome; re-enqueue separately).
    pub fn finished(&self, job: &Job) {
        self.with(|pools| {
            if let Some(q) = pools.get_mut(&job.pool) {
                q.in_flight = q.in_flight.saturating_sub(1);
            }
        });
    }

    /// Counts a message of `pool` delivered, for the last-minute rate.
    pub fn delivered(&self, pool: &str) {
        let now_sec = now_ms() / 1000;
        self.with(|pools| {
            pools
                .entry(pool.to_string())
                .or_default()
                .count_delivered(now_sec)
        });
    }

    /// Holds or releases a pool. Held pools keep their mail and deliver nothing.
    pub fn set_held(&self, pool: &str, held: bool) {
        self.with(|pools| pools.entry(pool.to_string()).or_default().held = held);
        self.wake.notify_waiters();
    }

    /// Makes every deferred message of `pool` ready now.
    pub fn flush(&self, pool: &str) {
        self.with(|pools| {
            if let Some(q) = pools.get_mut(pool) {
                q.promote(u64::MAX);
            }
        });
        self.wake.notify_waiters();
    }

    /// Takes a message out of the index (deleted or moved by the operator).
    /// Returns false if it is not queued there or is being delivered.
    pub fn forget(&self, id: QueueId, pool: &str) -> bool {
        self.with(|pools| {
            let Some(q) = pools.get_mut(pool) else {
                return false;
            };
            if q.ready.remove(&id) {
                return true;
            }
            let before = q.deferred.len();
            q.deferred.retain(|Reverse((_, i))| *i != id);
            q.deferred.len() != before
        })
    }

    /// Counts per pool.
    pub fn counts(&self) -> HashMap<String, PoolCounts> {
        let now = now_ms();
        self.with(|pools| {
            pools
                .iter_mut()
                .map(|(name, q)| {
                    q.promote(now);
                    let oldest_deferred = q.deferred.iter().map(|Reverse((_, id))| *id).min();
                    let oldest = match (q.ready.first().copied(), oldest_deferred) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let counts = PoolCounts {
                        ready: q.ready.len() + q.in_flight,
                        deferred: q.deferred.len(),
                        in_flight: q.in_flight,
                        held: q.held,
                        oldest,
                        delivered_last_minute: q.delivered_last_minute(now / 1000),
                    };
                    (name.clone(), counts)
                })
                .collect()
        })
    }

    /// Takes the oldest ready message of the given pools for which
    /// `eligible` says yes (rate limits), or None when none is ready.
    pub fn try_take(&self, pools: &[String], eligible: &dyn Fn(&str) -> bool) -> Option<Job> {
        let now = now_ms();
        self.with(|all| {
            let mut best: Option<(QueueId, &str)> = None;
            for name in pools {
                let Some(q) = all.get_mut(name) else { continue };
                if q.held || q.ready.is_empty() && q.deferred.is_empty() {
                    continue;
                }
                q.promote(now);
                if q.ready.is_empty() || !eligible(name) {
                    continue;
                }
                if let Some(&id) = q.ready.first()
                    && best.is_none_or(|(b, _)| id < b)
                {
                    best = Some((id, name.as_str()));
                }
            }
            let (id, name) = best?;
            let name = name.to_string();
            let q = all.get_mut(&name)?;
            q.ready.remove(&id);
            q.in_flight += 1;
            Some(Job { id, pool: name })
        })
    }

    /// Time until the earliest deferred message of these pools is due.
    fn next_due_in(&self, pools: &[String]) -> Option<Duration> {
        let now = now_ms();
        self.with(|all| {
            pools
                .iter()
                .filter_map(|p| all.get(p))
                .filter(|q| !q.held)
                .filter_map(|q| q.deferred.peek().map(|Reverse((due, _))| *due))
                .min()
                .map(|due| Duration::from_millis(due.saturating_sub(now)))
        })
    }

    /// Waits for a ready, eligible message of the given pools, at most
    /// `idle` long, re-checking at least every `recheck` (for rate limits
    /// and windows, which change with time rather than with events).
    pub async fn next(
        &self,
        pools: &[String],
        idle: Duration,
        recheck: Duration,
        eligible: &(dyn Fn(&str) -> bool + Sync),
    ) -> Option<Job> {
        let deadline = tokio::time::Instant::now() + idle;
        loop {
            // Register for wake-ups before looking, so an enqueue between the
            // look and the wait is not missed.
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(job) = self.try_take(pools, eligible) {
                return Some(job);
            }
            let mut until = deadline.min(tokio::time::Instant::now() + recheck);
            if let Some(due) = self.next_due_in(pools) {
                until = until.min(tokio::time::Instant::now() + due);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Wakes every waiting worker (after a hold is released, a window opens...).
    pub fn wake_all(&self) {
        self.wake.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: fn(&str) -> bool = |_| true;

    fn pools(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn oldest_ready_message_of_the_served_pools_comes_first() {
        let s = Scheduler::new();
        s.enqueue(30, "A", 0);
        s.enqueue(10, "B", 0);
        s.enqueue(20, "A", 0);
        assert_eq!(s.try_take(&pools(&["A"]), &ALL).map(|j| j.id), Some(20));
        assert_eq!(
            s.try_take(&pools(&["A", "B"]), &ALL).map(|j| j.id),
            Some(10)
        );
        assert_eq!(s.try_take(&pools(&["B"]), &ALL), None);
    }

    #[test]
    fn deferred_mail_does_not_block_ready_mail() {
        let s = Scheduler::new();
        s.enqueue(1, "A", now_ms() + 60_000);
        s.enqueue(2, "A", 0);
        assert_eq!(s.try_take(&pools(&["A"]), &ALL).map(|j| j.id), Some(2));
        assert_eq!(s.try_take(&pools(&["A"]), &ALL), None);
        s.flush("A");
        assert_eq!(s.try_take(&pools(&["A"]), &ALL).map(|j| j.id), Some(1));
    }

    #[test]
    fn held_pools_deliver_nothing_until_released() {
        let s = Scheduler::new();
        s.enqueue(1, "B", 0);
        s.set_held("B", true);
        assert_eq!(s.try_take(&pools(&["B"]), &ALL), None);
        assert_eq!(s.counts()["B"].ready, 1);
        s.set_held("B", false);
        assert!(s.try_take(&pools(&["B"]), &ALL).is_some());
    }

    #[tokio::test]
    async fn a_waiting_worker_wakes_on_enqueue() {
        let s = std::sync::Arc::new(Scheduler::new());
        let s2 = s.clone();
        let waiter = tokio::spawn(async move {
            s2.next(
                &pools(&["A"]),
                Duration::from_secs(10),
                Duration::from_secs(10),
                &|_| true,
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.enqueue(7, "A", 0);
        let job = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert_eq!(
            job.ok().and_then(|r| r.ok()).flatten().map(|j| j.id),
            Some(7)
        );
    }
}
