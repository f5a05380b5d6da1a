//! [`FjallSpool`]: the embedded spool on fjall (a pure-Rust LSM store):
//!
//! - keyspace `bodies`: queue id -> message bytes (key-value separated, so
//!   bodies sit in blob files and never in the index);
//! - keyspace `env.<pool>` per pool: queue id -> [`Envelope`] (JSON, a few
//!   hundred bytes), which carries everything retries need (recipient
//!   states, attempt count, next attempt time), so they survive a restart;
//! - keyspace `attempts`: queue id -> [`AttemptRecord`] (JSON, tens of
//!   bytes), what a deferral that decided nothing about any recipient
//!   changed. Written straight into fjall without an fsync (the next
//!   fsynced batch carries it to disk), applied over the envelope on every
//!   read, and removed in the batch that next rewrites or removes the
//!   envelope. A retry step over a million deferred messages so costs a
//!   million small buffered writes and no fsync, instead of a million
//!   fsynced envelope rewrites. A crash may lose the newest records:
//!   attempt counts and next attempt times then go back to an earlier
//!   record (a message is tried a little early), never a recipient outcome.
//! - keyspace `due`: `pool NUL next-attempt-ms id` -> MT-PRIORITY (one
//!   byte), one key per deferred message at its current next attempt time,
//!   written and removed in the same batch as the envelope or attempt
//!   record that sets the time: the relay keeps only the earliest deferred
//!   mail in memory and reads the rest from here in due order
//!   ([`Spool::due_list`]). A spool made before it existed gets it built
//!   from the envelopes at open.
//!
//! One writer thread owns every write. It batches whatever requests are
//! waiting when it wakes (group commit: while one batch is being fsynced the
//! next one accumulates, so no artificial delay is added) and answers each
//! request only after the batch holding it is fsynced. That is what lets the
//! listener send 250 only for durable mail.
//!
//! Faults: fjall refuses every write after a failed journal write or fsync
//! (a full disk, an I/O error). The writer then answers every request with
//! an error, and every second checks the free space; once it is above the
//! floor again it reopens the store in-process (fjall recovers from its
//! journal) and removes the messages of failed batches that recovery may
//! have brought back (their senders were told 452, so they will send again).
//! Below the floor (`server.spool_min_free`) new messages are refused before
//! anything is written, while outcomes and removals still go through.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, mpsc};
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, KvSeparationOptions, PersistMode};
use tokio::sync::oneshot;

use crate::{
    AttemptRecord, Body, Deferred, Durable, Envelope, Inserted, Listed, QueueId, Spool, SpoolError,
    format_id, now_ms,
};

impl From<fjall::Error> for SpoolError {
    fn from(e: fjall::Error) -> Self {
        SpoolError::Storage(e.to_string())
    }
}

enum Op {
    Append {
        envelope: Envelope,
        message: Vec<u8>,
        done: oneshot::Sender<Result<QueueId, SpoolError>>,
    },
    Insert {
        id: QueueId,
        envelope: Envelope,
        message: Vec<u8>,
        done: oneshot::Sender<Result<Inserted, SpoolError>>,
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
    Hold {
        pool: String,
        held: bool,
        done: oneshot::Sender<Result<(), SpoolError>>,
    },
}

/// Reply channels of one batch, answered after its fsync.
enum Done {
    Append(oneshot::Sender<Result<QueueId, SpoolError>>, QueueId),
    Insert(oneshot::Sender<Result<Inserted, SpoolError>>, Inserted),
    Unit(oneshot::Sender<Result<(), SpoolError>>),
}

struct Stores {
    db: Database,
    bodies: Keyspace,
    /// Pools the operator held: name -> empty. Created at open, like `bodies`.
    held: Keyspace,
    /// Attempt records: queue id -> [`AttemptRecord`], unsynced.
    attempts: Keyspace,
    /// Deferred messages by pool and due time: see the module doc.
    due: Keyspace,
    envelopes: RwLock<HashMap<String, Keyspace>>,
}

/// The free-space floor: bytes that must stay free, given the filesystem's
/// total size in bytes.
pub type MinFree = Box<dyn Fn(u64) -> u64 + Send + Sync>;

/// What the clones of one spool share.
struct Inner {
    /// The open store; `None` while it is being reopened after a failure.
    stores: RwLock<Option<Arc<Stores>>>,
    /// A write failed: fjall refuses writes until the store is reopened.
    failed: AtomicBool,
    /// Free space is below the floor: new messages are refused.
    low_space: AtomicBool,
    dir: PathBuf,
    min_free: MinFree,
    /// The highest id stored at open.
    opened_bound: QueueId,
}

impl Inner {
    fn stores(&self) -> Result<Arc<Stores>, SpoolError> {
        self.stores
            .read()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| {
                SpoolError::Storage("the spool is being reopened after a write failure".into())
            })
    }

    /// Free bytes and the floor, from statvfs; `None` if it cannot be read.
    fn space(&self) -> Option<(u64, u64)> {
        let (free, total) = free_space(&self.dir)?;
        Some((free, (self.min_free)(total)))
    }

    /// Re-reads the free space; true when it is above the floor.
    fn check_space(&self) -> bool {
        let room = self.space().is_none_or(|(free, floor)| free >= floor);
        let was_low = self.low_space.swap(!room, Ordering::Relaxed);
        if was_low && room {
            tracing::info!(spool = %self.dir.display(), "spool free space is above the floor again; accepting mail");
        } else if !was_low && !room {
            tracing::warn!(spool = %self.dir.display(), "spool free space is below server.spool_min_free; refusing new mail with 452 4.3.1");
        }
        room
    }
}

/// Free and total bytes of the filesystem holding `dir`.
fn free_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes only into the struct we own; the path is a
    // valid NUL-terminated string for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    Some((st.f_bavail as u64 * unit, st.f_blocks as u64 * unit))
}

impl Stores {
    /// `envelope` with its attempt record, if any, applied.
    fn with_attempt(&self, id: QueueId, mut envelope: Envelope) -> Result<Envelope, SpoolError> {
        if let Some(bytes) = self.attempts.get(id.to_be_bytes())? {
            match serde_json::from_slice::<AttemptRecord>(&bytes) {
                Ok(record) => envelope.apply_attempt(&record),
                // The envelope alone is a valid, older state.
                Err(e) => {
                    tracing::warn!(queue_id = %format_id(id), "unreadable attempt record ignored: {e}")
                }
            }
        }
        Ok(envelope)
    }

    /// Decodes a stored envelope and applies its attempt record.
    fn read(&self, id: QueueId, bytes: &[u8]) -> Result<Envelope, SpoolError> {
        self.with_attempt(id, decode(id, bytes)?)
    }

    /// The next attempt time `id` has in `pool`'s keyspace now (its attempt
    /// record's, else its envelope's `stored` one, read here when not
    /// given), when it is deferred: where its key in `due` is. Unreadable
    /// records count as not deferred.
    fn current_due(
        &self,
        id: QueueId,
        envelopes: &Keyspace,
        stored: Option<&Envelope>,
    ) -> Option<u64> {
        let key = id.to_be_bytes();
        if let Ok(Some(bytes)) = self.attempts.get(key)
            && let Ok(record) = serde_json::from_slice::<AttemptRecord>(&bytes)
        {
            return Some(record.next_attempt_ms).filter(|&d| d > 0);
        }
        let due = match stored {
            Some(envelope) => envelope.next_attempt_ms,
            // A point read (of a record the worker has just read, so
            // cached), not a look at the pool's first due key: that walks
            // over every key of the pool removed since the last compaction.
            None => decode(id, &envelopes.get(key).ok()??).ok()?.next_attempt_ms,
        };
        Some(due).filter(|&d| d > 0)
    }

    /// Moves `id`'s key in `due` from where it is now in `old` (keyspace of
    /// `old_pool`, whose envelope of it is `stored` when the caller has
    /// read it) to `to` (pool, next attempt time, MT-PRIORITY), or removes
    /// it when `to` is `None` or not deferred.
    fn move_due(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        id: QueueId,
        (old_pool, old, stored): (&str, &Keyspace, Option<&Envelope>),
        to: Option<(&str, u64, i8)>,
    ) {
        let before = self.current_due(id, old, stored);
        let after = to.filter(|&(_, due, _)| due > 0);
        if let Some(due) = before
            && after.is_none_or(|(pool, d, _)| pool != old_pool || d != due)
        {
            batch.remove(&self.due, due_key(old_pool, due, id));
        }
        if let Some((pool, due, mt_priority)) = after {
            batch.insert(&self.due, due_key(pool, due, id), [mt_priority as u8]);
        }
    }

    /// The keyspace of `pool` if it exists: reads never create one (a GET
    /// for a made-up pool must not leave a keyspace on disk).
    fn existing(&self, pool: &str) -> Option<Keyspace> {
        self.envelopes.read().ok()?.get(pool).cloned()
    }

    /// The keyspace of `pool`, created on first write.
    fn envelopes_of(&self, pool: &str) -> Result<Keyspace, SpoolError> {
        if let Some(ks) = self.existing(pool) {
            return Ok(ks);
        }
        if !is_storable_pool_name(pool) {
            return Err(SpoolError::Storage(format!(
                "invalid pool name {pool:?} (letters, digits, _ or -, at most 64)"
            )));
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

/// Whether the spool stores a pool of this name: letters, digits, `_` or
/// `-`, at most 64 (every name the config allows); anything else never
/// names a keyspace.
pub fn is_storable_pool_name(pool: &str) -> bool {
    !pool.is_empty()
        && pool.len() <= 64
        && pool
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn keyspace_name(pool: &str) -> String {
    format!("env.{pool}")
}

/// The fjall-backed spool. Cloning is cheap; all clones share one writer.
#[derive(Clone)]
pub struct FjallSpool {
    inner: Arc<Inner>,
    writer: mpsc::Sender<Op>,
}

/// Most operations committed in one fsynced batch.
const MAX_BATCH: usize = 512;

impl FjallSpool {
    /// Opens (creating or recovering) the spool in `dir`, and starts its
    /// writer thread. No free-space floor: see [`FjallSpool::open_with`].
    pub fn open(dir: &Path) -> Result<FjallSpool, SpoolError> {
        FjallSpool::open_with(dir, Box::new(|_| 0))
    }

    /// Opens the spool with a free-space floor: below `min_free(total)`
    /// free bytes, new messages are refused before anything is written.
    /// The directory is created (or narrowed to) mode 0700.
    pub fn open_with(dir: &Path, min_free: MinFree) -> Result<FjallSpool, SpoolError> {
        create_private_dir(dir)?;
        let stores = Arc::new(open_stores(dir)?);
        let last_id = last_id(&stores)?;
        let inner = Arc::new(Inner {
            stores: RwLock::new(Some(stores)),
            failed: AtomicBool::new(false),
            low_space: AtomicBool::new(false),
            dir: dir.to_path_buf(),
            min_free,
            opened_bound: last_id,
        });
        inner.check_space();
        let (tx, rx) = mpsc::channel();
        let writer_inner = inner.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer(writer_inner, rx, last_id))
            .map_err(|e| SpoolError::Storage(format!("cannot start the spool writer: {e}")))?;
        Ok(FjallSpool { inner, writer: tx })
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn submit<T>(&self, op: Op, rx: oneshot::Receiver<Result<T, SpoolError>>) -> Durable<T>
    where
        T: Send + 'static,
    {
        let sent = self.writer.send(op).is_ok();
        Box::pin(async move {
            if !sent {
                return Err(SpoolError::Stopped);
            }
            rx.await.unwrap_or(Err(SpoolError::Stopped))
        })
    }
}

impl Spool for FjallSpool {
    fn append(&self, envelope: Envelope, message: Vec<u8>) -> Durable<QueueId> {
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

    fn insert_with_id(
        &self,
        id: QueueId,
        envelope: Envelope,
        message: Vec<u8>,
    ) -> Durable<Inserted> {
        let (done, rx) = oneshot::channel();
        self.submit(
            Op::Insert {
                id,
                envelope,
                message,
                done,
            },
            rx,
        )
    }

    fn update(&self, id: QueueId, old_pool: &str, envelope: Envelope) -> Durable<()> {
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

    fn remove(&self, id: QueueId, pool: &str) -> Durable<()> {
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
        let stores = self.inner.stores()?;
        let Some(ks) = stores.existing(pool) else {
            return Ok(None);
        };
        match ks.get(id.to_be_bytes())? {
            Some(bytes) => stores.read(id, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn record_attempt(&self, id: QueueId, pool: &str, record: AttemptRecord) -> Durable<()> {
        let result = if self.inner.failed.load(Ordering::Relaxed) {
            Err(SpoolError::Storage(
                "the spool cannot be written (a write failed; retrying)".into(),
            ))
        } else {
            // Serialising numbers and replies cannot fail.
            let value = serde_json::to_vec(&record).unwrap_or_default();
            self.inner.stores().and_then(|stores| {
                // Unsynced like the record, and in one batch with it, so the
                // due index and the record never disagree after a crash.
                let mut batch = stores.db.batch();
                if let Some(ks) = stores.existing(pool) {
                    // One read of the envelope: its MT-PRIORITY, and its
                    // time when no attempt record says one.
                    let stored = ks
                        .get(id.to_be_bytes())
                        .ok()
                        .flatten()
                        .and_then(|bytes| decode(id, &bytes).ok());
                    let mt_priority = stored.as_ref().map_or(0, |e| e.mt_priority_or_default());
                    stores.move_due(
                        &mut batch,
                        id,
                        (pool, &ks, stored.as_ref()),
                        Some((pool, record.next_attempt_ms, mt_priority)),
                    );
                }
                batch.insert(&stores.attempts, id.to_be_bytes(), value);
                batch.commit().map_err(SpoolError::from)
            })
        };
        Box::pin(async move { result })
    }

    fn sync(&self) -> Result<(), SpoolError> {
        Ok(self.inner.stores()?.db.persist(PersistMode::SyncData)?)
    }

    fn body(&self, id: QueueId) -> Result<Option<Body>, SpoolError> {
        Ok(self.inner.stores()?.bodies.get(id.to_be_bytes())?)
    }

    fn recover(&self, visit: &mut dyn FnMut(QueueId, Envelope)) -> Result<(), SpoolError> {
        let stores = self.inner.stores()?;
        let keyspaces: Vec<Keyspace> = stores
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
                match stores.read(id, &value) {
                    Ok(env) => visit(id, env),
                    // Keep the record on disk for inspection; never delete what we cannot read.
                    Err(e) => tracing::error!("{e}; left in the spool untouched"),
                }
            }
        }
        Ok(())
    }

    fn opened_bound(&self) -> QueueId {
        self.inner.opened_bound
    }

    fn count(&self, pool: &str) -> Result<usize, SpoolError> {
        match self.inner.stores()?.existing(pool) {
            Some(ks) => Ok(ks.len()?),
            None => Ok(0),
        }
    }

    fn approximate_count(&self, pool: &str) -> usize {
        self.inner
            .stores()
            .ok()
            .and_then(|s| s.existing(pool))
            .map_or(0, |ks| ks.approximate_len())
    }

    fn prepare_pool(&self, pool: &str) -> Result<(), SpoolError> {
        self.inner.stores()?.envelopes_of(pool).map(|_| ())
    }

    fn pools(&self) -> Vec<String> {
        let Ok(stores) = self.inner.stores() else {
            return Vec::new();
        };
        stores
            .envelopes
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn list(
        &self,
        pool: &str,
        after: Option<QueueId>,
        limit: usize,
    ) -> Result<Vec<Listed>, SpoolError> {
        let stores = self.inner.stores()?;
        let Some(ks) = stores.existing(pool) else {
            return Ok(Vec::new());
        };
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        for guard in ks.range(start.to_be_bytes()..) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = guard.into_inner()?;
            if let Some(id) = key_to_id(&key) {
                out.push((id, stores.read(id, &value)));
            }
        }
        Ok(out)
    }

    fn is_writable(&self) -> bool {
        !self.inner.failed.load(Ordering::Relaxed) && !self.inner.low_space.load(Ordering::Relaxed)
    }

    fn has_due_index(&self) -> bool {
        true
    }

    fn due_list(
        &self,
        pool: &str,
        from: (u64, QueueId),
        limit: usize,
    ) -> Result<Vec<Deferred>, SpoolError> {
        let stores = self.inner.stores()?;
        let mut out = Vec::new();
        for guard in stores.due.range(due_range(pool, from)) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = guard.into_inner()?;
            if let Some((due, id)) = parse_due_key(pool, &key) {
                let mt_priority = value.first().map_or(0, |&b| b as i8);
                out.push(Deferred {
                    due_ms: due,
                    id,
                    mt_priority,
                });
            }
        }
        Ok(out)
    }

    fn due_last(&self, pool: &str) -> Result<Option<(u64, QueueId)>, SpoolError> {
        let stores = self.inner.stores()?;
        match stores.due.range(due_range(pool, (0, 0))).next_back() {
            Some(guard) => Ok(parse_due_key(pool, &guard.key()?)),
            None => Ok(None),
        }
    }

    fn is_failed(&self) -> bool {
        self.inner.failed.load(Ordering::Relaxed)
    }

    fn set_held(&self, pool: &str, held: bool) -> Durable<()> {
        let (done, rx) = oneshot::channel();
        self.submit(
            Op::Hold {
                pool: pool.to_string(),
                held,
                done,
            },
            rx,
        )
    }

    fn held_pools(&self) -> Result<Vec<String>, SpoolError> {
        let mut pools = Vec::new();
        for guard in self.inner.stores()?.held.iter() {
            let key = guard.key()?;
            pools.push(String::from_utf8_lossy(&key).into_owned());
        }
        Ok(pools)
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

/// How often the writer re-reads the free space while idle, and tries to
/// reopen a failed store.
const CHECK_EVERY: Duration = Duration::from_secs(1);

fn writer(inner: Arc<Inner>, rx: mpsc::Receiver<Op>, mut last_id: QueueId) {
    let mut ops = Vec::with_capacity(MAX_BATCH);
    // Messages of failed batches, to remove if recovery brings them back.
    let mut orphans: Vec<(QueueId, String)> = Vec::new();
    let mut checked = Instant::now();
    loop {
        let first = match rx.recv_timeout(CHECK_EVERY) {
            Ok(op) => Some(op),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if first.is_none() {
            // Idle: keep the floor (and so /readyz) current without writes.
            inner.check_space();
        }
        if inner.failed.load(Ordering::Relaxed)
            && (first.is_none() || checked.elapsed() >= CHECK_EVERY)
        {
            checked = Instant::now();
            reopen(&inner, &mut orphans);
        }
        let Some(first) = first else { continue };
        ops.push(first);
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let stores = if inner.failed.load(Ordering::Relaxed) {
            None
        } else {
            inner.stores().ok()
        };
        match stores {
            Some(stores) => {
                // One statvfs per batch: cheap next to its fsync, and a
                // floor crossed a moment ago counts at once.
                let room = inner.check_space();
                if let Err(e) = commit_batch(&stores, &mut ops, &mut last_id, room, &mut orphans) {
                    tracing::error!(spool = %inner.dir.display(), "spool write failed: {e}; refusing writes until the store can be reopened");
                    inner.failed.store(true, Ordering::Relaxed);
                }
            }
            None => {
                for op in ops.drain(..) {
                    op.fail(SpoolError::Storage(
                        "the spool cannot be written (a write failed; retrying)".into(),
                    ));
                }
            }
        }
    }
    // All senders are gone: make sure what was written is on disk.
    if let Ok(stores) = inner.stores()
        && let Err(e) = stores.db.persist(PersistMode::SyncAll)
    {
        tracing::error!("spool: final sync failed: {e}");
    }
}

/// After a failed write: once there is room again, drop the poisoned store,
/// open it afresh and remove what failed batches may have left behind.
fn reopen(inner: &Inner, orphans: &mut Vec<(QueueId, String)>) {
    if inner
        .space()
        .is_some_and(|(free, floor)| free < floor.max(1))
    {
        return;
    }
    let old = inner.stores.write().ok().and_then(|mut s| s.take());
    // fjall holds a lock file until every handle of the old store is gone.
    drop(old);
    let stores = match open_stores(&inner.dir) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::warn!(spool = %inner.dir.display(), "cannot reopen the spool yet: {e}");
            return;
        }
    };
    let mut batch = stores.db.batch().durability(Some(PersistMode::SyncData));
    for (id, pool) in orphans.iter() {
        let key = id.to_be_bytes();
        batch.remove(&stores.bodies, key);
        if let Some(ks) = stores.existing(pool) {
            stores.move_due(&mut batch, *id, (pool, &ks, None), None);
            batch.remove(&ks, key);
        }
    }
    if let Err(e) = batch.commit() {
        tracing::warn!(spool = %inner.dir.display(), "reopened the spool but cannot clean up failed writes yet: {e}");
        return;
    }
    orphans.clear();
    if let Ok(mut slot) = inner.stores.write() {
        *slot = Some(stores);
    }
    inner.failed.store(false, Ordering::Relaxed);
    tracing::info!(spool = %inner.dir.display(), "spool reopened after a write failure; accepting mail again");
}

impl Op {
    /// Answers the request with an error, writing nothing.
    fn fail(self, e: SpoolError) {
        match self {
            Op::Append { done, .. } => {
                let _ = done.send(Err(e));
            }
            Op::Insert { done, .. } => {
                let _ = done.send(Err(e));
            }
            Op::Update { done, .. } | Op::Remove { done, .. } | Op::Hold { done, .. } => {
                let _ = done.send(Err(e));
            }
        }
    }
}

/// Opens the fjall store in `dir` with its fixed keyspaces and every pool's.
fn open_stores(dir: &Path) -> Result<Stores, SpoolError> {
    // Memory stays bounded however much is queued: small memtables
    // (fjall's default allows 64 MiB per keyspace, which made RSS grow
    // past 300 MiB with a million messages queued).
    let db = Database::builder(dir)
        .cache_size(32 * 1024 * 1024)
        .manual_journal_persist(true)
        // The journal holds every body until the memtables it covers are
        // flushed; fjall's default lets it grow to 512 MiB, which made the
        // spool 1.37x the queued bytes at 100,000 x 4 KB. At 64 MiB (fjall's
        // minimum) the small envelope memtables are flushed sooner instead.
        .max_journaling_size(64 * 1024 * 1024)
        .open()
        .map_err(|e| match e {
            // fjall's lock file: the relay holds it as long as it runs.
            fjall::Error::Locked => SpoolError::Storage(format!(
                "the spool in {} is in use by another process (a running relay?)",
                dir.display()
            )),
            e => SpoolError::Storage(format!("cannot open spool in {}: {e}", dir.display())),
        })?;
    let bodies = db.keyspace("bodies", || {
        KeyspaceCreateOptions::default()
            .max_memtable_size(BODY_MEMTABLE)
            .with_kv_separation(Some(
                KvSeparationOptions::default().separation_threshold(512),
            ))
    })?;
    let held = db.keyspace("held", KeyspaceCreateOptions::default)?;
    let attempts = db.keyspace("attempts", || {
        KeyspaceCreateOptions::default().max_memtable_size(ENVELOPE_MEMTABLE)
    })?;
    let due = db.keyspace("due", || {
        KeyspaceCreateOptions::default().max_memtable_size(ENVELOPE_MEMTABLE)
    })?;
    let mut envelopes = HashMap::new();
    for name in db.list_keyspace_names() {
        if let Some(pool) = name.strip_prefix("env.") {
            let ks = db.keyspace(&name, envelope_options)?;
            envelopes.insert(pool.to_string(), ks);
        }
    }
    let stores = Stores {
        db,
        bodies,
        held,
        attempts,
        due,
        envelopes: RwLock::new(envelopes),
    };
    // Built (again, over a build a crash cut short) until its marker says
    // it is whole; a new spool has nothing to build.
    if !stores.due.contains_key(DUE_BUILT)? {
        let started = Instant::now();
        let n = build_due_index(&stores)?;
        stores.due.insert(DUE_BUILT, b"")?;
        stores.db.persist(PersistMode::SyncAll)?;
        if n > 0 {
            tracing::info!(spool = %dir.display(), deferred = n, seconds = format_args!("{:.3}", started.elapsed().as_secs_f64()), "spool: built the due-time index of deferred mail (once, for a spool made by an older version)");
        }
    }
    Ok(stores)
}

/// Creates `dir` (mode 0700), or narrows an existing one to 0700: the spool
/// holds other people's mail.
fn create_private_dir(dir: &Path) -> Result<(), SpoolError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |what: &str, e: std::io::Error| {
        SpoolError::Storage(format!(
            "cannot {what} spool directory {}: {e}",
            dir.display()
        ))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| err("create", e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| err("set mode 0700 on", e))
}

fn next_id(last_id: &mut QueueId) -> QueueId {
    let candidate = now_ms() << 16;
    *last_id = candidate.max(*last_id + 1);
    *last_id
}

/// The `due` key saying the index is whole (built at open for a spool made
/// before it): no pool's keys start with a NUL.
const DUE_BUILT: &[u8] = b"\0built";

/// The key of `id` in the `due` keyspace: pool, NUL, due time, id (big
/// endian, so keys sort by pool, then due time, then id). Pool names never
/// hold a NUL ([`is_storable_pool_name`]).
fn due_key(pool: &str, due: u64, id: QueueId) -> Vec<u8> {
    let mut key = Vec::with_capacity(pool.len() + 17);
    key.extend_from_slice(pool.as_bytes());
    key.push(0);
    key.extend_from_slice(&due.to_be_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The keys of `pool` in `due` from (due time, id) `from` on.
fn due_range(pool: &str, from: (u64, QueueId)) -> std::ops::Range<Vec<u8>> {
    let mut end = pool.as_bytes().to_vec();
    end.push(1);
    due_key(pool, from.0, from.1)..end
}

/// The due time and id of a `due` key of `pool`, if it is one.
fn parse_due_key(pool: &str, key: &[u8]) -> Option<(u64, QueueId)> {
    let rest = key.strip_prefix(pool.as_bytes())?.strip_prefix(&[0])?;
    let due = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let id = u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?);
    (rest.len() == 16).then_some((due, id))
}

/// Indexes a new message by due time when it is stored deferred.
fn add_due(stores: &Stores, batch: &mut fjall::OwnedWriteBatch, id: QueueId, envelope: &Envelope) {
    if envelope.next_attempt_ms > 0 {
        batch.insert(
            &stores.due,
            due_key(&envelope.pool, envelope.next_attempt_ms, id),
            [envelope.mt_priority_or_default() as u8],
        );
    }
}

/// Builds the `due` keyspace of a spool made before it existed: one key per
/// deferred message, from the envelopes (and attempt records).
fn build_due_index(stores: &Stores) -> Result<usize, SpoolError> {
    let keyspaces: Vec<Keyspace> = stores
        .envelopes
        .read()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    let mut indexed = 0;
    for ks in keyspaces {
        let mut batch = stores.db.batch();
        for guard in ks.iter() {
            let (key, value) = guard.into_inner()?;
            let Some(id) = key_to_id(&key) else { continue };
            if let Ok(envelope) = stores.read(id, &value)
                && envelope.next_attempt_ms > 0
            {
                add_due(stores, &mut batch, id, &envelope);
                indexed += 1;
            }
            if batch.len() >= 10_000 {
                std::mem::replace(&mut batch, stores.db.batch()).commit()?;
            }
        }
        batch.commit()?;
    }
    Ok(indexed)
}

/// Removes the attempt record of `key` in `batch`, if there is one (most
/// messages never had one: no tombstone for them).
fn forget_attempt(stores: &Stores, batch: &mut fjall::OwnedWriteBatch, key: [u8; 8]) {
    if stores.attempts.contains_key(key).unwrap_or(true) {
        batch.remove(&stores.attempts, key);
    }
}

/// Commits one batch and answers its requests. New messages are refused
/// without writing when `room` is false. Returns the commit error after
/// answering every request with it; the appends of a failed batch are
/// added to `orphans`.
fn commit_batch(
    stores: &Stores,
    ops: &mut Vec<Op>,
    last_id: &mut QueueId,
    room: bool,
    orphans: &mut Vec<(QueueId, String)>,
) -> Result<(), SpoolError> {
    let mut batch = stores.db.batch().durability(Some(PersistMode::SyncData));
    let mut done = Vec::with_capacity(ops.len());
    let mut appended = Vec::new();
    // Ids inserted by this batch, not yet readable from the store.
    let mut inserted: HashMap<QueueId, Body> = HashMap::new();
    let mut failed: Option<SpoolError> = None;
    for op in ops.drain(..) {
        match op {
            Op::Append {
                done: reply,
                envelope,
                ..
            } if !room && envelope.listener != crate::OUTCOME_LISTENER => {
                let _ = reply.send(Err(SpoolError::Full));
            }
            Op::Insert { done: reply, .. } if !room => {
                let _ = reply.send(Err(SpoolError::Full));
            }
            Op::Insert {
                id,
                envelope,
                message,
                done: reply,
            } => match insert(stores, &mut batch, &mut inserted, id, &envelope, message) {
                Ok(outcome) => {
                    if outcome == Inserted::Stored {
                        *last_id = (*last_id).max(id);
                        appended.push((id, envelope.pool.clone()));
                    }
                    done.push(Done::Insert(reply, outcome));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
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
                    add_due(stores, &mut batch, id, &envelope);
                    appended.push((id, envelope.pool.clone()));
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
                        stores.move_due(
                            &mut batch,
                            id,
                            (&old_pool, &old, None),
                            Some((
                                &envelope.pool,
                                envelope.next_attempt_ms,
                                envelope.mt_priority_or_default(),
                            )),
                        );
                        // The envelope now carries what the record said.
                        forget_attempt(stores, &mut batch, key);
                        batch.insert(&new, key, encode(&envelope));
                        done.push(Done::Unit(reply));
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Op::Hold {
                pool,
                held,
                done: reply,
            } => {
                if held {
                    batch.insert(&stores.held, pool.as_bytes(), b"".as_slice());
                } else {
                    batch.remove(&stores.held, pool.as_bytes());
                }
                done.push(Done::Unit(reply));
            }
            Op::Remove {
                id,
                pool,
                done: reply,
            } => match stores.envelopes_of(&pool) {
                Ok(ks) => {
                    let key = id.to_be_bytes();
                    stores.move_due(&mut batch, id, (&pool, &ks, None), None);
                    batch.remove(&ks, key);
                    batch.remove(&stores.bodies, key);
                    forget_attempt(stores, &mut batch, key);
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
    metrics::histogram!(crate::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
    if let Err(e) = committed {
        failed = Some(SpoolError::Storage(e.to_string()));
        orphans.extend(appended);
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
            Done::Insert(reply, outcome) => {
                let _ = reply.send(result.map(|()| outcome));
            }
            Done::Unit(reply) => {
                let _ = reply.send(result);
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Adds message `id` to `batch` unless the id is taken, in the store or
/// earlier in the same batch (`inserted`, which keeps the bytes of each).
fn insert(
    stores: &Stores,
    batch: &mut fjall::OwnedWriteBatch,
    inserted: &mut HashMap<QueueId, Body>,
    id: QueueId,
    envelope: &Envelope,
    message: Vec<u8>,
) -> Result<Inserted, SpoolError> {
    let key = id.to_be_bytes();
    let existing = match inserted.get(&id) {
        Some(bytes) => Some(**bytes == *message.as_slice()),
        None => stores
            .bodies
            .get(key)?
            .map(|bytes| *bytes == *message.as_slice()),
    };
    match existing {
        Some(true) => return Ok(Inserted::AlreadyThere),
        Some(false) => return Ok(Inserted::Conflict),
        None => {}
    }
    let ks = stores.envelopes_of(&envelope.pool)?;
    let body = Body::from(message);
    batch.insert(&stores.bodies, key, body.clone());
    batch.insert(&ks, key, encode(envelope));
    add_due(stores, batch, id, envelope);
    // A record left by a message once stored under this id must not apply.
    forget_attempt(stores, batch, key);
    inserted.insert(id, body);
    Ok(Inserted::Stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Recipient;

    fn envelope(pool: &str) -> Envelope {
        Envelope::new(
            pool,
            "owner-list@example.org",
            vec![Recipient::pending("a@example.com")],
            5,
            "l",
            "127.0.0.1:1",
        )
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
    fn a_prepared_pool_exists_before_its_first_message_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = FjallSpool::open(dir.path()).unwrap();
            spool.prepare_pool("B").unwrap();
            assert_eq!(spool.pools(), ["B"]);
            assert!(spool.prepare_pool("../x").is_err(), "never a path");
        }
        let spool = FjallSpool::open(dir.path()).unwrap();
        assert_eq!(
            (spool.pools(), spool.count("B").unwrap()),
            (vec!["B".to_string()], 0)
        );
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
    fn attempt_records_apply_over_the_envelope_until_it_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let id = rt().block_on(async {
            let spool = FjallSpool::open(dir.path()).unwrap();
            let id = spool.append(envelope("A"), b"x".to_vec()).await.unwrap();
            let record = AttemptRecord {
                attempts: 2,
                next_attempt_ms: 77,
                replies: vec![(0, poolrelay_smtp::Reply::local(451, "4.3.0", "later"))],
            };
            spool.record_attempt(id, "A", record).await.unwrap();
            spool.sync().unwrap();
            id
        });
        // Reopened: the record is still applied, by every read.
        let spool = FjallSpool::open(dir.path()).unwrap();
        let env = spool.envelope(id, "A").unwrap().unwrap();
        assert_eq!((env.attempts, env.next_attempt_ms), (2, 77));
        assert_eq!(
            env.recipients[0].last_reply.as_ref().map(|r| r.code),
            Some(451)
        );
        let listed = spool.list("A", None, 10).unwrap();
        assert_eq!(listed[0].1.as_ref().unwrap().attempts, 2);
        let mut seen = Vec::new();
        spool.recover(&mut |_, e| seen.push(e.attempts)).unwrap();
        assert_eq!(seen, vec![2]);
        // A rewrite of the envelope carries the values and drops the record.
        rt().block_on(async {
            let mut moved = env.clone();
            moved.pool = "B".into();
            spool.update(id, "A", moved).await.unwrap();
            assert!(
                spool
                    .inner
                    .stores()
                    .unwrap()
                    .attempts
                    .get(id.to_be_bytes())
                    .unwrap()
                    .is_none()
            );
            assert_eq!(spool.envelope(id, "B").unwrap().unwrap().attempts, 2);
            spool.remove(id, "B").await.unwrap();
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
    fn an_inserted_id_is_kept_found_again_and_stays_below_new_ids() {
        let dir = tempfile::tempdir().unwrap();
        let id = (now_ms() + 60_000) << 16;
        rt().block_on(async {
            let spool = FjallSpool::open(dir.path()).unwrap();
            // Twice in one batch, then again: stored once.
            let first = spool.insert_with_id(id, envelope("B"), b"x".to_vec());
            let twin = spool.insert_with_id(id, envelope("B"), b"x".to_vec());
            assert_eq!(first.await.unwrap(), Inserted::Stored);
            assert_eq!(twin.await.unwrap(), Inserted::AlreadyThere);
            let again = spool.insert_with_id(id, envelope("B"), b"x".to_vec());
            assert_eq!(again.await.unwrap(), Inserted::AlreadyThere);
            let other = spool.insert_with_id(id, envelope("B"), b"y".to_vec());
            assert_eq!(other.await.unwrap(), Inserted::Conflict);
            let next = spool.append(envelope("A"), b"z".to_vec()).await.unwrap();
            assert!(next > id, "appends stay above inserted ids");
        });
        let spool = FjallSpool::open(dir.path()).unwrap();
        assert_eq!(spool.envelope(id, "B").unwrap().unwrap().pool, "B");
        assert_eq!(&*spool.body(id).unwrap().unwrap(), b"x");
        assert_eq!(spool.count("B").unwrap(), 1);
    }

    #[test]
    fn a_spool_in_use_is_refused_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        let _running = FjallSpool::open(dir.path()).unwrap();
        let error = FjallSpool::open(dir.path()).err().unwrap().to_string();
        assert!(error.contains("in use by another process"), "{error}");
    }

    #[test]
    fn held_pools_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let spool = FjallSpool::open(dir.path()).unwrap();
            spool.set_held("B", true).await.unwrap();
            spool.set_held("C", true).await.unwrap();
            spool.set_held("C", false).await.unwrap();
        });
        let spool = FjallSpool::open(dir.path()).unwrap();
        assert_eq!(spool.held_pools().unwrap(), vec!["B".to_string()]);
    }

    fn due_of(spool: &FjallSpool, pool: &str) -> Vec<(u64, QueueId)> {
        spool
            .due_list(pool, (0, 0), 100)
            .unwrap()
            .into_iter()
            .map(|d| (d.due_ms, d.id))
            .collect()
    }

    fn attempt(attempts: u32, next_attempt_ms: u64) -> AttemptRecord {
        AttemptRecord {
            attempts,
            next_attempt_ms,
            replies: Vec::new(),
        }
    }

    #[test]
    fn the_due_index_follows_every_deferral_move_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = rt().block_on(async {
            let spool = FjallSpool::open(dir.path()).unwrap();
            let mut deferred = envelope("A");
            deferred.next_attempt_ms = 5_000;
            deferred.mt_priority = Some(3);
            let a = spool.append(deferred, b"x".to_vec()).await.unwrap();
            let b = spool.append(envelope("A"), b"y".to_vec()).await.unwrap();
            assert_eq!(due_of(&spool, "A"), [(5_000, a)]);
            let listed = spool.due_list("A", (0, 0), 10).unwrap();
            assert_eq!(listed[0].mt_priority, 3);
            spool
                .record_attempt(b, "A", attempt(1, 7_000))
                .await
                .unwrap();
            spool
                .record_attempt(a, "A", attempt(2, 9_000))
                .await
                .unwrap();
            assert_eq!(due_of(&spool, "A"), [(7_000, b), (9_000, a)]);
            assert_eq!(
                due_of(&spool, "A")[1..],
                spool
                    .due_list("A", (7_000, b + 1), 10)
                    .unwrap()
                    .iter()
                    .map(|d| (d.due_ms, d.id))
                    .collect::<Vec<_>>()[..]
            );
            // A pool change with a new time moves the key.
            let mut moved = spool.envelope(b, "A").unwrap().unwrap();
            moved.pool = "B".into();
            moved.next_attempt_ms = 8_000;
            spool.update(b, "A", moved).await.unwrap();
            assert_eq!(due_of(&spool, "A"), [(9_000, a)]);
            assert_eq!(due_of(&spool, "B"), [(8_000, b)]);
            assert_eq!(spool.due_last("B").unwrap(), Some((8_000, b)));
            spool.remove(a, "A").await.unwrap();
            assert!(due_of(&spool, "A").is_empty());
            assert_eq!(spool.due_last("A").unwrap(), None);
            (a, b)
        });
        let spool = FjallSpool::open(dir.path()).unwrap();
        assert!(due_of(&spool, "A").is_empty(), "{a} is gone");
        assert_eq!(due_of(&spool, "B"), [(8_000, b)], "kept across a reopen");
        // Its time is in the envelope only now (the update dropped the record).
        rt().block_on(spool.remove(b, "B")).unwrap();
        assert!(due_of(&spool, "B").is_empty());
    }

    #[test]
    fn a_spool_made_before_the_due_index_gets_it_built_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = rt().block_on(async {
            let spool = FjallSpool::open(dir.path()).unwrap();
            let mut deferred = envelope("A");
            deferred.next_attempt_ms = 5_000;
            let a = spool.append(deferred, b"x".to_vec()).await.unwrap();
            let b = spool.append(envelope("A"), b"y".to_vec()).await.unwrap();
            spool
                .record_attempt(b, "A", attempt(1, 7_000))
                .await
                .unwrap();
            spool.sync().unwrap();
            (a, b)
        });
        // Wait for the writer to let go of the store, then drop the index
        // as an older version never had it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let db = loop {
            match Database::builder(dir.path()).open() {
                Ok(db) => break db,
                Err(e) => {
                    assert!(Instant::now() < deadline, "store still locked: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let due = db.keyspace("due", KeyspaceCreateOptions::default).unwrap();
        db.delete_keyspace(due).unwrap();
        // A build cut short by a crash: one key there, no marker.
        let due = db.keyspace("due", KeyspaceCreateOptions::default).unwrap();
        due.insert(due_key("A", 5_000, a), [0]).unwrap();
        db.persist(PersistMode::SyncAll).unwrap();
        drop((due, db));
        let spool = loop {
            match FjallSpool::open(dir.path()) {
                Ok(spool) => break spool,
                Err(e) => {
                    assert!(Instant::now() < deadline, "store still locked: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        assert_eq!(due_of(&spool, "A"), [(5_000, a), (7_000, b)]);
    }

    #[test]
    fn reads_of_unknown_pools_create_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = FjallSpool::open(dir.path()).unwrap();
        assert!(spool.envelope(1, "nosuch").unwrap().is_none());
        assert!(spool.list("nosuch", None, 10).unwrap().is_empty());
        assert_eq!(spool.count("nosuch").unwrap(), 0);
        assert!(spool.pools().is_empty());
        let long = "x".repeat(252);
        assert!(
            rt().block_on(spool.append(envelope(&long), b"x".to_vec()))
                .is_err()
        );
    }
}
