//! The durable queue: every accepted message lives here, in its pool,
//! until no recipient is pending.
//!
//! [`Spool`] is what the engine needs of a store; it is object-safe so the
//! engine holds an `Arc<dyn Spool>` and a second, replicated backend can
//! implement it. [`FjallSpool`] is the embedded default (see `disk.rs`);
//! [`MemorySpool`] keeps everything in memory for tests of the code above it.
//!
//! Queue ids are `unix_millis << 16 | counter`: unique, and ordered by
//! acceptance, so key order is oldest first.

mod disk;
mod envelope;
mod jetstream;
mod memory;
mod nodes;
pub mod transfer;

use std::future::Future;
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

pub use disk::{FjallSpool, MinFree, is_storable_pool_name};
pub use envelope::{AttemptRecord, Envelope, Recipient, RecipientState};
pub use jetstream::{JetStreamOptions, JetStreamSpool};
pub use memory::MemorySpool;
pub use poolrelay_smtp::{Reply, Ret};

/// The histogram of commit (and fsync) times the embedded spool records,
/// and of append times (until the quorum's acks) the replicated one does;
/// declared with its help text in the relay's metric catalog.
pub const COMMIT_SECONDS: &str = "poolrelay_spool_commit_seconds";

/// The `listener` of messages the relay makes about mail it already
/// accepted (DSNs): stored even below the free-space floor, since refusing
/// them would lose a bounce.
pub const OUTCOME_LISTENER: &str = "dsn";

/// A queue id: unique per spool, ordered by acceptance time.
pub type QueueId = u64;

/// Message bytes as stored: a cheap reference-counted buffer.
pub type Body = fjall::Slice;

/// What the write calls of [`Spool`] return: resolves once the change is durable.
pub type Durable<T> = Pin<Box<dyn Future<Output = Result<T, SpoolError>> + Send + 'static>>;

/// The text form of a queue id in replies, logs and the admin API.
pub fn format_id(id: QueueId) -> String {
    format!("{id:016X}")
}

/// Parses the text form of a queue id.
pub fn parse_id(text: &str) -> Option<QueueId> {
    let text = text.trim();
    if text.is_empty() || text.len() > 16 {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

/// The acceptance time encoded in a queue id, Unix ms.
pub fn accepted_ms_of(id: QueueId) -> u64 {
    id >> 16
}

/// Milliseconds since the Unix epoch, the time unit of envelopes.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A spool failure. The listener turns it into `452 4.3.1`
/// ([`SpoolError::Unavailable`]: `451 4.3.0`).
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The store failed (disk full, I/O error, poisoned after a failed fsync).
    #[error("spool storage error: {0}")]
    Storage(String),
    /// An envelope on disk could not be decoded.
    #[error("spool record {id} is corrupt: {reason}")]
    Corrupt {
        /// The record's queue id.
        id: String,
        /// What failed.
        reason: String,
    },
    /// Free space is below the floor (`server.spool_min_free`): new mail
    /// is refused before anything is written.
    #[error("spool free space is below the configured minimum")]
    Full,
    /// The writer thread is gone (the spool is shutting down).
    #[error("spool writer has stopped")]
    Stopped,
    /// A replicated store did not acknowledge in time (no quorum, or the
    /// cluster cannot be reached): nothing was claimed, try again later.
    #[error("replicated spool unavailable: {0}")]
    Unavailable(String),
}

/// What [`Spool::insert_with_id`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The message is stored under the id given.
    Stored,
    /// The id already held the same bytes (an import repeated or resumed):
    /// nothing was written.
    AlreadyThere,
    /// The id already held another message: nothing was written.
    Conflict,
}

/// A deferred message as the due index has it ([`Spool::due_list`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deferred {
    /// Its next attempt time, Unix ms.
    pub due_ms: u64,
    /// Its queue id.
    pub id: QueueId,
    /// Its MT-PRIORITY (0 when it has none).
    pub mt_priority: i8,
}

/// One record of a listing: its id and its envelope, or why it cannot be read.
pub type Listed = (QueueId, Result<Envelope, SpoolError>);

/// The durable queue as the engine sees it. Writes resolve only once
/// durable (fsynced, or acknowledged by a quorum for a replicated store);
/// reads never create anything.
pub trait Spool: Send + Sync + 'static {
    /// Stores a new message.
    fn append(&self, envelope: Envelope, message: Vec<u8>) -> Durable<QueueId>;

    /// Stores a message under an id chosen elsewhere: `poolrelay spool
    /// import` keeps the exporting spool's ids, so that importing a file
    /// twice, or again after a crash, finds what is already there instead
    /// of queueing it twice. Writes nothing when the id is taken (see
    /// [`Inserted`]); ids given by later appends stay above every id
    /// inserted. Like a new message, refused below the free-space floor.
    /// A backend that cannot choose its ids refuses every import.
    fn insert_with_id(
        &self,
        id: QueueId,
        envelope: Envelope,
        message: Vec<u8>,
    ) -> Durable<Inserted> {
        let _ = (id, envelope, message);
        Box::pin(async {
            Err(SpoolError::Storage(
                "this spool backend cannot store messages under their original queue ids".into(),
            ))
        })
    }

    /// Waits until this spool's reads show everything the store holds, at
    /// most `timeout`: a replicated store's local view follows the cluster
    /// after connecting, and `poolrelay spool export` / `import` must not
    /// read it half filled. A local store is current at once.
    fn catch_up(&self, timeout: std::time::Duration) -> Result<(), SpoolError> {
        let _ = timeout;
        Ok(())
    }

    /// Persists a changed envelope (attempt count, recipient states, pool).
    /// A pool change moves the record between pools.
    fn update(&self, id: QueueId, old_pool: &str, envelope: Envelope) -> Durable<()>;

    /// Records a deferral that changed only the attempt fields
    /// ([`Envelope::attempt_since`]). Resolves once written but, unlike
    /// the other writes, not once fsynced: the next fsynced write (any
    /// append, outcome or removal, or [`Spool::sync`]) makes it durable, and
    /// a crash before that takes the attempt count and next attempt time
    /// back to the previous record. Recipient outcomes never go this way.
    /// Reads return envelopes with the record applied.
    fn record_attempt(&self, id: QueueId, pool: &str, record: AttemptRecord) -> Durable<()> {
        match self.envelope(id, pool) {
            Ok(Some(mut envelope)) => {
                envelope.apply_attempt(&record);
                self.update(id, pool, envelope)
            }
            Ok(None) => Box::pin(async { Ok(()) }),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    /// Makes everything written so far durable (attempt records included):
    /// called on a graceful stop.
    fn sync(&self) -> Result<(), SpoolError> {
        Ok(())
    }

    /// Removes a message whose recipients are all done (or that the
    /// operator deleted).
    fn remove(&self, id: QueueId, pool: &str) -> Durable<()>;

    /// Reads an envelope.
    fn envelope(&self, id: QueueId, pool: &str) -> Result<Option<Envelope>, SpoolError>;

    /// Reads a message's bytes.
    fn body(&self, id: QueueId) -> Result<Option<Body>, SpoolError>;

    /// Calls `visit` for every queued message, pool by pool, oldest first.
    /// Records that cannot be decoded are logged and left untouched.
    fn recover(&self, visit: &mut dyn FnMut(QueueId, Envelope)) -> Result<(), SpoolError>;

    /// The highest queue id stored when the spool was opened. Every id
    /// appended since is above it, so a recovery that streams the spool
    /// while new mail arrives stops there.
    fn opened_bound(&self) -> QueueId;

    /// Number of messages queued in `pool`.
    fn count(&self, pool: &str) -> Result<usize, SpoolError>;

    /// About how many messages `pool` holds, cheaply (no scan): for
    /// progress reports, never for decisions.
    fn approximate_count(&self, pool: &str) -> usize {
        self.count(pool).unwrap_or(0)
    }

    /// The pools that hold or held mail (held mail may be in pools no
    /// longer configured), and those made ready by [`Spool::prepare_pool`].
    fn pools(&self) -> Vec<String>;

    /// Makes `pool`'s storage ready before its first message, so that
    /// message's 250 does not wait for it (creating a keyspace costs an
    /// fsync or more). Optional: a spool without such a cost does nothing.
    fn prepare_pool(&self, pool: &str) -> Result<(), SpoolError> {
        let _ = pool;
        Ok(())
    }

    /// Up to `limit` messages of `pool` with ids above `after`, oldest
    /// first (paging for the admin API). A record that cannot be decoded
    /// is returned as its error, so one bad record does not hide the rest.
    fn list(
        &self,
        pool: &str,
        after: Option<QueueId>,
        limit: usize,
    ) -> Result<Vec<Listed>, SpoolError>;

    /// Finds a message in whichever pool holds it.
    fn find(&self, id: QueueId) -> Result<Option<Envelope>, SpoolError> {
        for pool in self.pools() {
            if let Some(env) = self.envelope(id, &pool)? {
                return Ok(Some(env));
            }
        }
        Ok(None)
    }

    /// Whether deferred messages can be found by due time
    /// ([`Spool::due_list`]): then the relay keeps only the earliest of a
    /// pool's deferred mail in memory.
    fn has_due_index(&self) -> bool {
        false
    }

    /// Up to `limit` deferred messages of `pool` whose (next attempt time,
    /// id) is at or after `from`, in that order. Empty for a spool without
    /// a due index.
    fn due_list(
        &self,
        pool: &str,
        from: (u64, QueueId),
        limit: usize,
    ) -> Result<Vec<Deferred>, SpoolError> {
        let _ = (pool, from, limit);
        Ok(Vec::new())
    }

    /// The latest (next attempt time, id) among `pool`'s deferred messages.
    fn due_last(&self, pool: &str) -> Result<Option<(u64, QueueId)>, SpoolError> {
        let _ = pool;
        Ok(None)
    }

    /// Whether the store accepts new mail now (no failed write pending
    /// recovery, free space above the floor): what `/readyz` reports.
    fn is_writable(&self) -> bool;

    /// Whether a write failed and the store cannot record anything until
    /// it recovers: workers pause rather than deliver what they could not
    /// record.
    fn is_failed(&self) -> bool {
        !self.is_writable()
    }

    /// Records that the operator held (or released) `pool`, so a hold
    /// survives restarts like `postsuper -h`.
    fn set_held(&self, pool: &str, held: bool) -> Durable<()>;

    /// The pools recorded as held.
    fn held_pools(&self) -> Result<Vec<String>, SpoolError>;

    /// The queue several relays share, when this store is one: the
    /// cluster, not this relay, then decides who delivers which message.
    /// `None` (the default): this relay alone delivers what it stores.
    fn shared(&self) -> Option<&dyn SharedQueue> {
        None
    }
}

/// One pool of a shared queue, cluster-wide, as this relay's view of
/// the cluster's envelopes has it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterCounts {
    /// Every message of the pool (being delivered anywhere included).
    pub queued: usize,
    /// Those whose next attempt is still to come.
    pub deferred: usize,
    /// The oldest message (ids encode the accept time).
    pub oldest: Option<QueueId>,
}

/// A queue shared by several relays: every stored message has one ticket
/// that one relay at a time holds while it delivers; a ticket handed back
/// with a delay comes back, to any relay, when the message is due.
pub trait SharedQueue: Send + Sync {
    /// Takes up to `max` tickets of `pool` whose messages are due, waiting
    /// up to `wait` for one; returns their ids and envelopes. Tickets of
    /// messages not yet due are handed back with the time left. The
    /// envelope and body of a taken message are served from memory until
    /// its ticket is handed back or the message is removed.
    fn take(
        &self,
        pool: &str,
        max: usize,
        wait: std::time::Duration,
    ) -> Durable<Vec<(QueueId, Envelope)>>;

    /// The whole cluster's queue of `pool` at `now_ms`.
    fn counts(&self, pool: &str, now_ms: u64) -> ClusterCounts;

    /// Tickets of `pool` this relay holds now (taken, not yet handed back).
    fn held_tickets(&self, pool: &str) -> usize;

    /// Whether the bodies in this relay's hands leave no room for the
    /// last message refused for room: take no tickets until some leave.
    fn bodies_full(&self) -> bool;

    /// Whether this relay holds the live ticket of `id` now: taken, not
    /// handed back, and confirmed by the cluster recently enough that no
    /// other relay can have it. A worker delivers only what it holds.
    fn holds(&self, id: QueueId) -> bool;

    /// Hands the ticket of `id` back, to come back (to any relay) at
    /// `due_ms` (0 = at once). Without a ticket in hand, does nothing.
    fn hand_back(&self, id: QueueId, pool: &str, due_ms: u64);

    /// Hands back every ticket in hand, due at once: on a graceful stop,
    /// so other relays take them without waiting for them to time out.
    fn hand_back_all(&self) -> Durable<()>;

    /// Makes every deferred message of `pool` (or only `only`) due now,
    /// on every relay; how many were made due.
    fn flush(&self, pool: &str, only: Option<QueueId>) -> Durable<usize>;

    /// The held pools as every relay sees them; changes when any relay
    /// holds or releases a pool.
    fn held_watch(&self) -> tokio::sync::watch::Receiver<std::collections::BTreeSet<String>>;

    /// Changes whenever a ticket leaves this relay's hands (the message
    /// removed, handed back, or its hold lapsed): a feed waiting for room
    /// looks again at once instead of at its next poll.
    fn released_watch(&self) -> tokio::sync::watch::Receiver<u64>;

    /// This relay's name among the relays sharing the queue (in logs).
    fn node_id(&self) -> &str;

    /// Records this relay as alive, draining `pools`, for a few seconds
    /// (renewed every [`NODE_HEARTBEAT`]), and returns the pools of every
    /// other live relay, one entry per relay: they share the pools' rate
    /// limits.
    fn announce(&self, pools: Vec<String>) -> Durable<Vec<Vec<String>>>;

    /// Removes this relay from the live ones at once (a graceful stop).
    fn withdraw(&self) -> Durable<()>;
}

/// How often a relay sharing a queue calls [`SharedQueue::announce`].
pub const NODE_HEARTBEAT: std::time::Duration = nodes::HEARTBEAT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_round_trip_through_text() {
        assert_eq!(parse_id(&format_id(0x1234_ABCD)), Some(0x1234_ABCD));
        assert_eq!(parse_id("zz"), None);
        assert_eq!(parse_id(&"F".repeat(252)), None);
        assert_eq!(parse_id(""), None);
    }
}
