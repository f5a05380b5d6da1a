//! [`FjallSpool`]: the embedded spool on fjall (a pure-Rust LSM store):
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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, mpsc};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, KvSeparationOptions, PersistMode};
use tokio::sync::oneshot;

use crate::{Body, Durable, Envelope, Listed, QueueId, Spool, SpoolError, format_id, now_ms};

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
    Unit(oneshot::Sender<Result<(), SpoolError>>),
}

struct Stores {
    db: Database,
    bodies: Keyspace,
    /// Pools the operator held: name -> empty. Created at open, like `bodies`.
    held: Keyspace,
    envelopes: RwLock<HashMap<String, Keyspace>>,
    /// Set when a commit failed: fjall refuses writes after a failed fsync.
    failed: AtomicBool,
}

impl Stores {
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
        if !valid_pool_name(pool) {
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

/// Pool names as the config allows them; anything else never names a keyspace.
fn valid_pool_name(pool: &str) -> bool {
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
        let held = db.keyspace("held", KeyspaceCreateOptions::default)?;
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
            held,
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
        let Some(ks) = self.stores.existing(pool) else {
            return Ok(None);
        };
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

    fn count(&self, pool: &str) -> Result<usize, SpoolError> {
        match self.stores.existing(pool) {
            Some(ks) => Ok(ks.len()?),
            None => Ok(0),
        }
    }

    fn pools(&self) -> Vec<String> {
        self.stores
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
        let Some(ks) = self.stores.existing(pool) else {
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
                out.push((id, decode(id, &value)));
            }
        }
        Ok(out)
    }

    fn is_writable(&self) -> bool {
        !self.stores.failed.load(Ordering::Relaxed)
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
        for guard in self.stores.held.iter() {
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
    metrics::histogram!(crate::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
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
    use crate::{Recipient, RecipientState};

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
            ret: None,
            legacy_ret_full: false,
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
