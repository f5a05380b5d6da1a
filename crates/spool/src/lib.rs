//! The durable queue: every accepted message lives here, in its pool's
//! keyspace, until every recipient is done.
//!
//! The [`Spool`] trait is what the engine needs; [`FjallSpool`] implements it
//! on fjall (an embedded pure-Rust LSM store):
//!
//! - keyspace `bodies`: queue id -> message bytes (key-value separated, so
//!   bodies sit in blob files and never in the index);
//! - keyspace `env.<pool>` per pool: queue id -> [`Envelope`] (JSON, a few
//!   hundred bytes), which carries everything retries need (recipient
//!   states, attempt count, next attempt time), so they survive a restart.
//!
//! One writer thread owns every write. It batches whatever requests are
//! waiting when it wakes (group commit: while one batch is being fsynced the
//! next one accumulates, so no artificial delay is added) and answers each
//! request only after the batch holding it is fsynced. That is what lets the
//! listener send 250 only for durable mail.
//!
//! Queue ids are `unix_millis << 16 | counter`: unique, and ordered by
//! acceptance, so key order is oldest first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, KvSeparationOptions, PersistMode};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// A queue id: unique per spool, ordered by acceptance time.
pub type QueueId = u64;

/// Message bytes as stored: a cheap reference-counted buffer.
pub type Body = fjall::Slice;

/// The text form of a queue id in replies, logs and the admin API.
pub fn format_id(id: QueueId) -> String {
    format!("{id:016X}")
}

/// Parses the text form of a queue id.
pub fn parse_id(text: &str) -> Option<QueueId> {
    u64::from_str_radix(text.trim(), 16).ok()
}

/// Milliseconds since the Unix epoch, the time unit of envelopes.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where one recipient of a queued message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientState {
    /// Not yet delivered: tried on the next attempt.
    Pending,
    /// An upstream accepted it.
    Delivered,
    /// Failed permanently (or expired); a DSN was queued if one was due.
    Bounced,
}

/// One recipient of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The address, without angle brackets.
    pub address: String,
    /// DSN ORCPT as received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    /// DSN NOTIFY flags as received (smtp-proto `RCPT_NOTIFY_*` bits, 0 = not given).
    #[serde(default)]
    pub notify: u64,
    /// Where it stands.
    pub state: RecipientState,
    /// The last upstream reply for it, for logs, the admin API and DSNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
}

/// Everything about a queued message except its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The pool the message is queued in.
    pub pool: String,
    /// Envelope sender; empty for the null sender.
    pub sender: String,
    /// Recipients with their states.
    pub recipients: Vec<Recipient>,
    /// When the 250 was sent, Unix ms.
    pub accepted_ms: u64,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Not to be tried before this time, Unix ms (0 = now).
    pub next_attempt_ms: u64,
    /// Message size in bytes.
    pub size: u64,
    /// Name of the listener that accepted it.
    pub listener: String,
    /// Client address that sent it.
    pub client: String,
    /// Line of the route that classified it (0 = no route matched).
    #[serde(default)]
    pub route_line: usize,
    /// DSN ENVID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    /// DSN RET=FULL was asked.
    #[serde(default)]
    pub ret_full: bool,
    /// BODY=8BITMIME was given.
    #[serde(default)]
    pub body_8bit: bool,
    /// SMTPUTF8 was given.
    #[serde(default)]
    pub smtputf8: bool,
    /// A "delayed" DSN was sent (at most one per message).
    #[serde(default)]
    pub delay_warned: bool,
}

impl Envelope {
    /// Recipients still to be delivered.
    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients
            .iter()
            .filter(|r| r.state == RecipientState::Pending)
    }

    /// Indexes of the recipients still to be delivered, in RCPT order.
    pub fn pending_indexes(&self) -> Vec<usize> {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RecipientState::Pending)
            .map(|(i, _)| i)
            .collect()
    }

    /// True when no recipient is pending: the message can leave the spool.
    pub fn is_done(&self) -> bool {
        self.pending().next().is_none()
    }
}

/// A spool failure. The listener turns it into `452 4.3.1`.
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
    /// The writer thread is gone (the spool is shutting down).
    #[error("spool writer has stopped")]
    Stopped,
}

impl From<fjall::Error> for SpoolError {
    fn from(e: fjall::Error) -> Self {
        SpoolError::Storage(e.to_string())
    }
}

/// The durable queue as the engine sees it.
pub trait Spool: Send + Sync + 'static {
    /// Stores a new message; the returned future resolves once it is fsynced.
    fn append(
        &self,
        envelope: Envelope,
        message: Vec<u8>,
    ) -> impl Future<Output = Result<QueueId, SpoolError>> + Send + 'static;

    /// Persists a changed envelope (attempt count, recipient states, pool);
    /// resolves once fsynced. A pool change moves the record between keyspaces.
    fn update(
        &self,
        id: QueueId,
        old_pool: &str,
        envelope: Envelope,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send + 'static;

    /// Removes a finished message; resolves once fsynced.
    fn remove(
        &self,
        id: QueueId,
        pool: &str,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send + 'static;

    /// Reads an envelope.
    fn envelope(&self, id: QueueId, pool: &str) -> Result<Option<Envelope>, SpoolError>;

    /// Reads a message's bytes.
    fn body(&self, id: QueueId) -> Result<Option<Body>, SpoolError>;

    /// Calls `visit` for every queued message, pool by pool, oldest first.
    fn recover(&self, visit: &mut dyn FnMut(QueueId, Envelope)) -> Result<(), SpoolError>;
}

enum Op {
    Append {
        envelope: Envelope,
        message: Vec<u8>,
        done: oneshot::Sender<Result<QueueId, SpoolError>>,
    },
    Update {
        id: QueueId,
        old_pool: String,
        envelope: Envelope,
        done: oneshot::Sender<Result<(), SpoolError>>,
    },
    Remove {
        id: QueueId,
        pool: String,
        done: oneshot::Sender<Result<(), SpoolError>>,
    },
}

/// Reply channels of one batch, answered after its fsync.
enum Done {
    Append(oneshot::Sender<Result<QueueId, SpoolError>>, QueueId),
    Unit(oneshot::Sender<Result<(), SpoolError>>),
}

struct Stores {
    db: Database,
    bodies: Keyspace,
    envelopes: RwLock<HashMap<String, Keyspace>>,
    /// Set when a commit failed: fjall refuses writes after a failed fsync.
    failed: AtomicBool,
}

impl Stores {
    fn envelopes_of(&self, pool: &str) -> Result<Keyspace, SpoolError> {
        if let Ok(map) = self.envelopes.read()
            && let Some(ks) = map.get(pool)
        {
            return Ok(ks.clone());
        }
        let ks = self.db.keyspace(&keyspace_name(pool), envelope_options)?;
        if let Ok(mut map) = self.envelopes.write() {
            map.insert(pool.to_string(), ks.clone());
        }
        Ok(ks)
    }
}

/// Memtable size of the bodies keyspace.
const BODY_MEMTABLE: u64 = 16 * 1024 * 1024;
/// Memtable size of each pool's envelope keyspace (envelopes are small).
const ENVELOPE_MEMTABLE: u64 = 4 * 1024 * 1024;

fn envelope_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default().max_memtable_size(ENVELOPE_MEMTABLE)
}

fn keyspace_name(pool: &str) -> String {
    format!("env.{pool}")
}

/// The fjall-backed spool. Cloning is cheap; all clones share one writer.
#[derive(Clone)]
pub struct FjallSpool {
    stores: Arc<Stores>,
    writer: mpsc::Sender<Op>,
    dir: PathBuf,
}

/// Most operations committed in one fsynced batch.
const MAX_BATCH: usize = 512;

impl FjallSpool {
    /// Opens (creating or recovering) the spool in `dir`, and starts its writer thread.
    pub fn open(dir: &Path) -> Result<FjallSpool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            SpoolError::Storage(format!(
                "cannot create spool directory {}: {e}",
                dir.display()
            ))
        })?;
        // Memory stays bounded however much is queued: small memtables
        // (fjall's default allows 64 MiB per keyspace, which made RSS grow
        // past 300 MiB with a million messages queued).
        let db = Database::builder(dir)
            .cache_size(32 * 1024 * 1024)
            .manual_journal_persist(true)
            .open()
            .map_err(|e| {
                SpoolError::Storage(format!("cannot open spool in {}: {e}", dir.display()))
            })?;
        let bodies = db.keyspace("bodies", || {
            KeyspaceCreateOptions::default()
                .max_memtable_size(BODY_MEMTABLE)
                .with_kv_separation(Some(
                    KvSeparationOptions::default().separation_threshold(512),
                ))
        })?;
        let mut envelopes = HashMap::new();
        for name in db.list_keyspace_names() {
            if let Some(pool) = name.strip_prefix("env.") {
                let ks = db.keyspace(&name, envelope_options)?;
                envelopes.insert(pool.to_string(), ks);
            }
        }
        let stores = Arc::new(Stores {
            db,
            bodies,
            envelopes: RwLock::new(envelopes),
            failed: AtomicBool::new(false),
        });
        let last_id = last_id(&stores)?;
        let (tx, rx) = mpsc::channel();
        let writer_stores = stores.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer(writer_stores, rx, last_id))
            .map_err(|e| SpoolError::Storage(format!("cannot start the spool writer: {e}")))?;
        Ok(FjallSpool {
            stores,
            writer: tx,
            dir: dir.to_path_buf(),
        })
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of messages queued in `pool`, counted from the store (O(n); for the admin API).
    pub fn count(&self, pool: &str) -> Result<usize, SpoolError> {
        Ok(self.stores.envelopes_of(pool)?.len()?)
    }

    /// The pools that have an envelope keyspace (held mail may be in pools no longer configured).
    pub fn pools(&self) -> Vec<String> {
        self.stores
            .envelopes
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Up to `limit` messages of `pool` with ids above `after`, oldest first
    /// (paging for the admin API).
    pub fn list(
        &self,
        pool: &str,
        after: Option<QueueId>,
        limit: usize,
    ) -> Result<Vec<(QueueId, Envelope)>, SpoolError> {
        let ks = self.stores.envelopes_of(pool)?;
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        for guard in ks.range(start.to_be_bytes()..) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = guard.into_inner()?;
            if let Some(id) = key_to_id(&key) {
                out.push((id, decode(id, &value)?));
            }
        }
        Ok(out)
    }

    /// Finds the pool a message is queued in, looking at every pool keyspace.
    pub fn find(&self, id: QueueId) -> Result<Option<Envelope>, SpoolError> {
        for pool in self.pools() {
            if let Some(env) = self.envelope(id, &pool)? {
                return Ok(Some(env));
            }
        }
        Ok(None)
    }

    /// Whether the store still accepts writes (false after a failed fsync).
    pub fn is_writable(&self) -> bool {
        !self.stores.failed.load(Ordering::Relaxed)
    }

    fn submit<T>(
        &self,
        op: Op,
        rx: oneshot::Receiver<Result<T, SpoolError>>,
    ) -> impl Future<Output = Result<T, SpoolError>> + Send + 'static
    where
        T: Send + 'static,
    {
        let sent = self.writer.send(op).is_ok();
        async move {
            if !sent {
                return Err(SpoolError::Stopped);
            }
            rx.await.unwrap_or(Err(SpoolError::Stopped))
        }
    }
}

impl Spool for FjallSpool {
    fn append(
        &self,
        envelope: Envelope,
        message: Vec<u8>,
    ) -> impl Future<Output = Result<QueueId, SpoolError>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        self.submit(
            Op::Append {
                envelope,
                message,
                done,
            },
            rx,
        )
    }

    fn update(
        &self,
        id: QueueId,
        old_pool: &str,
        envelope: Envelope,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        self.submit(
            Op::Update {
                id,
                old_pool: old_pool.to_string(),
                envelope,
                done,
            },
            rx,
        )
    }

    fn remove(
        &self,
        id: QueueId,
        pool: &str,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        self.submit(
            Op::Remove {
                id,
                pool: pool.to_string(),
                done,
            },
            rx,
        )
    }

    fn envelope(&self, id: QueueId, pool: &str) -> Result<Option<Envelope>, SpoolError> {
        let ks = self.stores.envelopes_of(pool)?;
        match ks.get(id.to_be_bytes())? {
            Some(bytes) => decode(id, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn body(&self, id: QueueId) -> Result<Option<Body>, SpoolError> {
        Ok(self.stores.bodies.get(id.to_be_bytes())?)
    }

    fn recover(&self, visit: &mut dyn FnMut(QueueId, Envelope)) -> Result<(), SpoolError> {
        let keyspaces: Vec<Keyspace> = self
            .stores
            .envelopes
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for ks in keyspaces {
            for guard in ks.iter() {
                let (key, value) = guard.into_inner()?;
                let Some(id) = key_to_id(&key) else {
                    tracing::warn!("spool: skipping a record with a malformed key");
                    continue;
                };
                match decode(id, &value) {
                    Ok(env) => visit(id, env),
                    // Keep the record on disk for inspection; never delete what we cannot read.
                    Err(e) => tracing::error!("{e}; left in the spool untouched"),
                }
            }
        }
        Ok(())
    }
}

fn key_to_id(key: &[u8]) -> Option<QueueId> {
    let arr: [u8; 8] = key.try_into().ok()?;
    Some(u64::from_be_bytes(arr))
}

fn decode(id: QueueId, bytes: &[u8]) -> Result<Envelope, SpoolError> {
    serde_json::from_slice(bytes).map_err(|e| SpoolError::Corrupt {
        id: format_id(id),
        reason: e.to_string(),
    })
}

fn encode(envelope: &Envelope) -> Vec<u8> {
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_vec(envelope).unwrap_or_default()
}

/// The highest queue id in the store, so new ids stay unique after a restart
/// even if the clock went backwards.
fn last_id(stores: &Stores) -> Result<QueueId, SpoolError> {
    let mut last = 0;
    if let Some(guard) = stores.bodies.last_key_value() {
        let key = guard.key()?;
        last = key_to_id(&key).unwrap_or(0);
    }
    Ok(last)
}

fn writer(stores: Arc<Stores>, rx: mpsc::Receiver<Op>, mut last_id: QueueId) {
    let mut ops = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        ops.push(first);
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        commit_batch(&stores, &mut ops, &mut last_id);
    }
    // All senders are gone: make sure what was written is on disk.
    if let Err(e) = stores.db.persist(PersistMode::SyncAll) {
        tracing::error!("spool: final sync failed: {e}");
    }
}

fn next_id(last_id: &mut QueueId) -> QueueId {
    let candidate = now_ms() << 16;
    *last_id = candidate.max(*last_id + 1);
    *last_id
}

fn commit_batch(stores: &Stores, ops: &mut Vec<Op>, last_id: &mut QueueId) {
    let mut batch = stores.db.batch().durability(Some(PersistMode::SyncData));
    let mut done = Vec::with_capacity(ops.len());
    let mut failed: Option<SpoolError> = None;
    for op in ops.drain(..) {
        match op {
            Op::Append {
                envelope,
                message,
                done: reply,
            } => match stores.envelopes_of(&envelope.pool) {
                Ok(ks) => {
                    let id = next_id(last_id);
                    let key = id.to_be_bytes();
                    batch.insert(&stores.bodies, key, message);
                    batch.insert(&ks, key, encode(&envelope));
                    done.push(Done::Append(reply, id));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Op::Update {
                id,
                old_pool,
                envelope,
                done: reply,
            } => {
                let key = id.to_be_bytes();
                let stores_of = (
                    stores.envelopes_of(&old_pool),
                    stores.envelopes_of(&envelope.pool),
                );
                match stores_of {
                    (Ok(old), Ok(new)) => {
                        if old_pool != envelope.pool {
                            batch.remove(&old, key);
                        }
                        batch.insert(&new, key, encode(&envelope));
                        done.push(Done::Unit(reply));
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Op::Remove {
                id,
                pool,
                done: reply,
            } => match stores.envelopes_of(&pool) {
                Ok(ks) => {
                    let key = id.to_be_bytes();
                    batch.remove(&ks, key);
                    batch.remove(&stores.bodies, key);
                    done.push(Done::Unit(reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
        }
    }
    let started = std::time::Instant::now();
    let committed = batch.commit();
    metrics::histogram!("poolrelay_spool_commit_seconds").record(started.elapsed().as_secs_f64());
    if let Err(e) = committed {
        tracing::error!("spool: commit failed: {e}");
        stores.failed.store(true, Ordering::Relaxed);
        failed = Some(SpoolError::Storage(e.to_string()));
    }
    for d in done {
        let result = match &failed {
            Some(e) => Err(SpoolError::Storage(e.to_string())),
            None => Ok(()),
        };
        match d {
            Done::Append(reply, id) => {
                let _ = reply.send(result.map(|()| id));
            }
            Done::Unit(reply) => {
                let _ = reply.send(result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(pool: &str) -> Envelope {
        Envelope {
            pool: pool.into(),
            sender: "owner-list@example.org".into(),
            recipients: vec![Recipient {
                address: "a@example.com".into(),
                orcpt: None,
                notify: 0,
                state: RecipientState::Pending,
                last_reply: None,
            }],
            accepted_ms: now_ms(),
            attempts: 0,
            next_attempt_ms: 0,
            size: 5,
            listener: "l".into(),
            client: "127.0.0.1:1".into(),
            route_line: 0,
            envid: None,
            ret_full: false,
            body_8bit: false,
            smtputf8: false,
            delay_warned: false,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn appended_mail_is_recovered_after_reopen_in_its_pool() {
        let dir = tempfile::tempdir().unwrap();
        let ids = rt().block_on(async {
            let spool = FjallSpool::open(dir.path()).unwrap();
            let a = spool
                .append(envelope("A"), b"hello".to_vec())
                .await
                .unwrap();
            let b = spool
                .append(envelope("-"), b"world".to_vec())
                .await
                .unwrap();
            assert!(b > a, "ids grow with acceptance");
            vec![a, b]
        });
        let spool = FjallSpool::open(dir.path()).unwrap();
        let mut seen = Vec::new();
        spool
            .recover(&mut |id, env| seen.push((id, env.pool)))
            .unwrap();
        seen.sort();
        assert_eq!(
            seen,
            vec![(ids[0], "A".to_string()), (ids[1], "-".to_string())]
        );
        assert_eq!(&*spool.body(ids[0]).unwrap().unwrap(), b"hello");
    }

    #[test]
    fn update_moves_between_pools_and_remove_forgets() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let spool = FjallSpool::open(dir.path()).unwrap();
            let id = spool.append(envelope("A"), b"x".to_vec()).await.unwrap();
            let mut env = spool.envelope(id, "A").unwrap().unwrap();
            env.pool = "B".into();
            env.attempts = 3;
            spool.update(id, "A", env).await.unwrap();
            assert!(spool.envelope(id, "A").unwrap().is_none());
            assert_eq!(spool.envelope(id, "B").unwrap().unwrap().attempts, 3);
            spool.remove(id, "B").await.unwrap();
            assert!(spool.envelope(id, "B").unwrap().is_none());
            assert!(spool.body(id).unwrap().is_none());
        });
    }

    #[test]
    fn new_ids_stay_above_recovered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let first = rt().block_on(async {
            let spool = FjallSpool::open(dir.path()).unwrap();
            spool.append(envelope("A"), b"x".to_vec()).await.unwrap()
        });
        let second = rt().block_on(async {
            let spool = FjallSpool::open(dir.path()).unwrap();
            spool.append(envelope("A"), b"y".to_vec()).await.unwrap()
        });
        assert!(second > first);
    }

    #[test]
    fn queue_ids_round_trip_through_text() {
        assert_eq!(parse_id(&format_id(0x1234_ABCD)), Some(0x1234_ABCD));
        assert_eq!(parse_id("zz"), None);
    }
}
