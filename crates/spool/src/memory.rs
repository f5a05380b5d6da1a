//! [`MemorySpool`]: the [`Spool`] contract kept in memory, for tests of the
//! engine (queue, control) that must not touch a disk. Nothing survives the
//! process; writes can be made to fail to play a full disk.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Body, Durable, Envelope, Inserted, Listed, QueueId, Spool, SpoolError, now_ms};

#[derive(Default)]
struct State {
    pools: HashMap<String, BTreeMap<QueueId, Envelope>>,
    bodies: HashMap<QueueId, Body>,
    held: std::collections::BTreeSet<String>,
}

/// An in-memory spool. Cloning shares the same contents.
#[derive(Clone, Default)]
pub struct MemorySpool {
    state: Arc<Mutex<State>>,
    last_id: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    failing_lists: Arc<AtomicU64>,
}

impl MemorySpool {
    /// An empty spool.
    pub fn new() -> MemorySpool {
        MemorySpool::default()
    }

    /// While true, every write fails as a full disk would.
    pub fn fail_writes(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    /// The next `n` calls of [`Spool::list`] fail, as reads do while a
    /// store reopens after a failed write.
    pub fn fail_next_lists(&self, n: u64) {
        self.failing_lists.store(n, Ordering::Relaxed);
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    fn write<T: Send + 'static>(&self, f: impl FnOnce(&mut State) -> T) -> Durable<T> {
        let result = if self.failing.load(Ordering::Relaxed) {
            Err(SpoolError::Storage(
                "no space left on device (simulated)".into(),
            ))
        } else {
            Ok(self.with(f))
        };
        Box::pin(async move { result })
    }
}

impl Spool for MemorySpool {
    fn append(&self, envelope: Envelope, message: Vec<u8>) -> Durable<QueueId> {
        let candidate = now_ms() << 16;
        let id = self
            .last_id
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(candidate.max(last + 1))
            })
            .map_or(candidate, |last| candidate.max(last + 1));
        self.write(move |s| {
            s.bodies.insert(id, Body::from(message));
            s.pools
                .entry(envelope.pool.clone())
                .or_default()
                .insert(id, envelope);
            id
        })
    }

    fn insert_with_id(
        &self,
        id: QueueId,
        envelope: Envelope,
        message: Vec<u8>,
    ) -> Durable<Inserted> {
        self.last_id.fetch_max(id, Ordering::Relaxed);
        self.write(move |s| match s.bodies.get(&id) {
            Some(body) if **body == *message.as_slice() => Inserted::AlreadyThere,
            Some(_) => Inserted::Conflict,
            None => {
                s.bodies.insert(id, Body::from(message));
                s.pools
                    .entry(envelope.pool.clone())
                    .or_default()
                    .insert(id, envelope);
                Inserted::Stored
            }
        })
    }

    fn update(&self, id: QueueId, old_pool: &str, envelope: Envelope) -> Durable<()> {
        let old_pool = old_pool.to_string();
        self.write(move |s| {
            if let Some(p) = s.pools.get_mut(&old_pool) {
                p.remove(&id);
            }
            s.pools
                .entry(envelope.pool.clone())
                .or_default()
                .insert(id, envelope);
        })
    }

    fn remove(&self, id: QueueId, pool: &str) -> Durable<()> {
        let pool = pool.to_string();
        self.write(move |s| {
            if let Some(p) = s.pools.get_mut(&pool) {
                p.remove(&id);
            }
            s.bodies.remove(&id);
        })
    }

    fn envelope(&self, id: QueueId, pool: &str) -> Result<Option<Envelope>, SpoolError> {
        Ok(self.with(|s| s.pools.get(pool).and_then(|p| p.get(&id).cloned())))
    }

    fn body(&self, id: QueueId) -> Result<Option<Body>, SpoolError> {
        Ok(self.with(|s| s.bodies.get(&id).cloned()))
    }

    fn recover(&self, visit: &mut dyn FnMut(QueueId, Envelope)) -> Result<(), SpoolError> {
        let all: Vec<(QueueId, Envelope)> = self.with(|s| {
            s.pools
                .values()
                .flat_map(|p| p.iter().map(|(id, e)| (*id, e.clone())))
                .collect()
        });
        for (id, env) in all {
            visit(id, env);
        }
        Ok(())
    }

    /// A memory spool is never reopened: its bound is the newest id so far.
    fn opened_bound(&self) -> QueueId {
        self.last_id.load(Ordering::Relaxed)
    }

    fn count(&self, pool: &str) -> Result<usize, SpoolError> {
        Ok(self.with(|s| s.pools.get(pool).map_or(0, BTreeMap::len)))
    }

    fn pools(&self) -> Vec<String> {
        self.with(|s| s.pools.keys().cloned().collect())
    }

    fn list(
        &self,
        pool: &str,
        after: Option<QueueId>,
        limit: usize,
    ) -> Result<Vec<Listed>, SpoolError> {
        let failing = self
            .failing_lists
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(SpoolError::Storage("store reopening (simulated)".into()));
        }
        let start = after.map_or(0, |a| a.saturating_add(1));
        Ok(self.with(|s| {
            s.pools
                .get(pool)
                .map(|p| {
                    p.range(start..)
                        .take(limit)
                        .map(|(id, e)| (*id, Ok(e.clone())))
                        .collect()
                })
                .unwrap_or_default()
        }))
    }

    fn is_writable(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    fn set_held(&self, pool: &str, held: bool) -> Durable<()> {
        let pool = pool.to_string();
        self.write(move |s| {
            if held {
                s.held.insert(pool);
            } else {
                s.held.remove(&pool);
            }
        })
    }

    fn held_pools(&self) -> Result<Vec<String>, SpoolError> {
        Ok(self.with(|s| s.held.iter().cloned().collect()))
    }
}
