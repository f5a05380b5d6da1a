//! The one way into (and around) the queue: the spool keeps, the scheduler
//! orders. Every new message (accepted by a listener, or a DSN) and every
//! change of where a message stands (a retry time, an operator's move) goes
//! through [`Queue`], which writes the spool first and schedules only once
//! the write is durable, so the scheduler never holds an id the spool lost.
//!
//! On a shared spool ([`Spool::shared`]) nothing is scheduled here: the
//! cluster hands each message to one relay when it is due (the feed in
//! `lib.rs` puts it into the scheduler), and a message this relay is done
//! with for now goes back to the cluster with its due time.

use std::sync::Arc;

use poolrelay_spool::{Envelope, QueueId, Spool, SpoolError, now_ms};

use crate::scheduler::Scheduler;

/// How long a message this relay could not try (no host reachable) waits
/// before the cluster offers it again, to any relay.
const SHARED_REQUEUE_DELAY_MS: u64 = 1000;

/// The spool and the scheduler, used together.
#[derive(Clone)]
pub struct Queue {
    spool: Arc<dyn Spool>,
    scheduler: Arc<Scheduler>,
}

impl Queue {
    /// A queue over `spool`, ordered by `scheduler`.
    pub fn new(spool: Arc<dyn Spool>, scheduler: Arc<Scheduler>) -> Queue {
        Queue { spool, scheduler }
    }

    /// The store, for reads.
    pub fn spool(&self) -> &dyn Spool {
        &*self.spool
    }

    /// The index, for taking jobs and counts.
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// Stores a new message and makes it ready (in the index, or on disk
    /// behind its pool's backlog when the pool's window is full): resolves
    /// with its id once it is durable (what a 250 promises).
    pub async fn append(
        &self,
        envelope: Envelope,
        message: Vec<u8>,
    ) -> Result<QueueId, SpoolError> {
        let pool = envelope.pool.clone();
        let due = envelope.next_attempt_ms;
        let mt_priority = envelope.mt_priority_or_default();
        if self.spool.shared().is_some() {
            return self.spool.append(envelope, message).await;
        }
        // Begun before the write: the scheduler then knows whether the
        // backlog stream may already have brought this id (see `appended`).
        let appending = self.scheduler.begin_append();
        let id = self.spool.append(envelope, message).await?;
        appending.appended(id, &pool, due, mt_priority);
        Ok(id)
    }

    /// Stores a changed envelope (possibly in another pool) and schedules
    /// the message at its `next_attempt_ms`. On failure the old record is
    /// still on disk: the message is scheduled where it was, at
    /// `fallback_due`, so it is never forgotten.
    pub async fn store(
        &self,
        id: QueueId,
        old_pool: &str,
        envelope: Envelope,
        fallback_due: u64,
    ) -> Result<(), SpoolError> {
        let pool = envelope.pool.clone();
        let due = envelope.next_attempt_ms;
        // A store never changes the priority: the old record has the same.
        let mt_priority = envelope.mt_priority_or_default();
        match self.spool.update(id, old_pool, envelope).await {
            Ok(()) => {
                self.retry_at(id, &pool, due, mt_priority);
                Ok(())
            }
            Err(e) => {
                self.put_back(id, old_pool, fallback_due, mt_priority);
                Err(e)
            }
        }
    }

    /// Removes a message for good (all recipients done, or deleted).
    pub async fn remove(&self, id: QueueId, pool: &str) -> Result<(), SpoolError> {
        self.spool.remove(id, pool).await
    }

    /// Puts a message back as ready without writing anything (nothing
    /// about it changed), with its MT-PRIORITY (0 when it has none).
    pub fn requeue(&self, id: QueueId, pool: &str, mt_priority: i8) {
        match self.spool.shared() {
            // Soon, and to any relay: this one could not deliver it now.
            Some(shared) => shared.hand_back(id, pool, now_ms() + SHARED_REQUEUE_DELAY_MS),
            None => self.scheduler.enqueue(id, pool, 0, mt_priority),
        }
    }

    /// Schedules a message whose stored envelope (or attempt record) says
    /// it is due at `due_ms` to be tried then; on a shared spool, hands it
    /// back to the cluster, which gives it to some relay then.
    pub fn retry_at(&self, id: QueueId, pool: &str, due_ms: u64, mt_priority: i8) {
        match self.spool.shared() {
            Some(shared) => shared.hand_back(id, pool, due_ms),
            None => self.scheduler.retry_recorded(id, pool, due_ms, mt_priority),
        }
    }

    /// Schedules a message to be tried at `due_ms`, which the spool does
    /// not say (its write failed): kept in memory until then.
    pub fn put_back(&self, id: QueueId, pool: &str, due_ms: u64, mt_priority: i8) {
        match self.spool.shared() {
            Some(shared) => shared.hand_back(id, pool, due_ms),
            None => self.scheduler.enqueue(id, pool, due_ms, mt_priority),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use poolrelay_spool::{MemorySpool, Recipient};

    fn envelope(pool: &str) -> Envelope {
        Envelope::new(
            pool,
            "s@x.test",
            vec![Recipient::pending("r@x.test")],
            1,
            "l",
            "c",
        )
    }

    fn queue() -> (Queue, MemorySpool) {
        let spool = MemorySpool::new();
        (
            Queue::new(Arc::new(spool.clone()), Arc::new(Scheduler::new())),
            spool,
        )
    }

    const ALL: &(dyn Fn(&str) -> bool + Sync) = &|_| true;

    #[tokio::test]
    async fn an_appended_message_is_stored_then_ready() {
        let (q, spool) = queue();
        let id = q.append(envelope("A"), b"m".to_vec()).await.unwrap();
        assert!(spool.envelope(id, "A").unwrap().is_some());
        let job = q.scheduler().try_take(&["A".to_string()], ALL);
        assert_eq!(job.map(|j| j.id), Some(id));
    }

    #[tokio::test]
    async fn a_failed_append_schedules_nothing() {
        let (q, spool) = queue();
        spool.fail_writes(true);
        assert!(q.append(envelope("A"), b"m".to_vec()).await.is_err());
        assert_eq!(q.scheduler().try_take(&["A".to_string()], ALL), None);
    }

    #[tokio::test]
    async fn a_stored_move_schedules_in_the_new_pool() {
        let (q, spool) = queue();
        let id = q.append(envelope("A"), b"m".to_vec()).await.unwrap();
        assert!(q.scheduler().forget(id, "A"));
        let mut env = spool.envelope(id, "A").unwrap().unwrap();
        env.pool = "B".into();
        q.store(id, "A", env, 0).await.unwrap();
        assert!(spool.envelope(id, "B").unwrap().is_some());
        assert_eq!(
            q.scheduler()
                .try_take(&["B".to_string()], ALL)
                .map(|j| j.id),
            Some(id)
        );
    }

    #[tokio::test]
    async fn a_failed_store_keeps_the_message_scheduled_where_it_was() {
        let (q, spool) = queue();
        let id = q.append(envelope("A"), b"m".to_vec()).await.unwrap();
        assert!(q.scheduler().forget(id, "A"));
        let mut env = spool.envelope(id, "A").unwrap().unwrap();
        env.pool = "B".into();
        spool.fail_writes(true);
        assert!(q.store(id, "A", env, 0).await.is_err());
        assert_eq!(
            q.scheduler()
                .try_take(&["A".to_string()], ALL)
                .map(|j| j.id),
            Some(id)
        );
    }
}
