//! The replicated spool: a NATS JetStream cluster several relays share.
//!
//! Layout (prefix `P`, `replicas` copies of everything):
//! - bucket `P_env`: one [`Record`] per message, key `<pool>.<id>`: the
//!   envelope (per-recipient outcomes, attempt count), the generation of
//!   its live ticket and where the body is: up to [`INLINE_MAX`], in the
//!   same value after the record ([`encode_value`]);
//! - stream `P_bodies`: larger bodies, subject
//!   `P.body.<id>-<origin>.<chunk>` (`origin`: the writing relay start's
//!   tag, so bodies of two relays never share a subject), chunks below the
//!   server's `max_payload`, removed by sequence;
//! - per pool, work-queue stream `P_q_<pool>` of tickets (subject
//!   `P.q.<pool>`) with one durable pull consumer all relays share: a
//!   relay holds a message while it holds its ticket (kept alive with
//!   progress acks), a deferral naks the ticket with the time left, so the
//!   server, not a poller, hands it out again when due;
//! - bucket `P_held`: held pools, watched by every relay.
//!
//! The engine calls happen on the relay's runtime; every call to the
//! cluster runs on this backend's own runtime thread, so the synchronous
//! reads of the admin API never block a runtime worker for a network
//! round trip except for a body not in memory. Envelopes are read from a
//! cache every relay keeps by watching `P_env`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    Body, ClusterCounts, Durable, Envelope, Inserted, Listed, QueueId, SharedQueue, Spool,
    SpoolError, format_id, now_ms, parse_id,
};

/// How to reach the cluster and name things in it (`[spool]`).
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// `nats://host:port` URLs.
    pub servers: Vec<String>,
    /// Copies of every stream and bucket.
    pub replicas: usize,
    /// Prefix of stream, bucket and subject names.
    pub stream_prefix: String,
    /// How long an append waits for the cluster's acknowledgements.
    pub ack_timeout: Duration,
    /// A NATS `.creds` file.
    pub credentials_file: Option<PathBuf>,
    /// PEM CA certificates for `tls://` servers.
    pub tls_ca_file: Option<PathBuf>,
    /// Bytes of message bodies this relay keeps in hand at most (one
    /// message always fits): `server.max_data_memory`.
    pub max_bodies_in_hand: u64,
}

/// The durable consumer every relay pulls a pool's tickets from.
const CONSUMER: &str = "relays";
/// How long the server waits for a ticket's ack (or progress) before it
/// hands the ticket to another relay.
const TICKET_ACK_WAIT: Duration = Duration::from_secs(30);
/// How often tickets in hand are kept alive (well within the ack wait).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// A ticket the server has not confirmed alive for this long (a relay cut
/// off from the cluster, or frozen) is no longer this relay's: the server
/// hands it to another relay once its ack wait lapses, so it is not
/// delivered here (a send already under way still completes).
const TICKET_LAPSE: Duration = TICKET_ACK_WAIT.saturating_sub(PROGRESS_EVERY);
/// How long a progress ack waits for the server's confirmation.
const PROGRESS_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Tickets a pool may have handed out and not acked, deferred ones
/// included (a nak with a delay keeps the ticket pending): high, so a
/// long retry queue never stops a pool.
const MAX_ACK_PENDING: i64 = 1_000_000;
/// Writes other than appends (outcomes, removals) wait this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The chunk size when the server says nothing of its `max_payload`.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// Room left in a chunk for the subject and headers of its message.
const CHUNK_HEADROOM: usize = 4 * 1024;
/// How long a removed envelope's delete marker stays for the watches.
const MARKER_PURGE_DELAY: Duration = Duration::from_secs(5);
/// A message due within this is taken now rather than naked again.
const DUE_SLACK_MS: u64 = 50;
/// A ticket whose envelope does not decode goes back for this long: never
/// acked (that would drop the message), left for the operator.
const CORRUPT_RETRY: Duration = Duration::from_secs(3600);
/// A ticket newer than its record (a flush or import writes the ticket
/// first, then the record) comes back this soon, so the record's write
/// it waits for is seen, not the deferral it replaces...
const AHEAD_RETRY: Duration = Duration::from_secs(1);
/// ...this many times; then it waits like its record (the write was
/// skipped or never made, and the older ticket is live).
const AHEAD_DELIVERIES: i64 = 5;
/// A first ticket fetched before its record exists: the record is looked
/// for again after these pauses (ms)...
const UNBORN_LOOKS_MS: [u64; 3] = [2, 5, 10];
/// ...then the ticket comes back this soon...
const UNBORN_RETRY: Duration = Duration::from_millis(20);
/// ...while it is younger than the append's deadline and this (then the
/// append failed, and took its record back or never made it).
const UNBORN_SLACK: Duration = Duration::from_secs(10);
/// How long what a refused append wrote is retried away.
const TAKE_BACK_TIMEOUT: Duration = Duration::from_secs(600);
/// When the ticket of a refused message being taken back comes back.
const TAKING_BACK_RETRY: Duration = Duration::from_millis(500);
/// Fresh ids an append tries when other relays hold the ones it picked.
const ID_TRIES: usize = 8;
/// How long a start waits to learn who leads the envelope bucket (a new
/// bucket elects its leader); then it stays where it connected.
const LEADER_WAIT: Duration = Duration::from_secs(2);
/// How long a start's connection to ask a server its name (or the close of
/// one it leaves) may take: a dead server costs this much, once.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A pool's cluster-wide counts are scanned at most this often.
const COUNTS_FOR_MS: u64 = 1000;
/// A whole `queue flush` of a pool gets this long.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// What `P_env` holds per message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    env: Envelope,
    /// The generation of the message's live ticket: a flush bumps it and
    /// publishes a fresh ticket; an older ticket is dropped when fetched.
    #[serde(default)]
    generation: u64,
    /// Body chunks in `P_bodies`.
    chunks: u32,
    /// The full tag of the relay start that wrote the body (part of its
    /// subjects); 0 for bodies under the plain id (imports).
    #[serde(default)]
    origin: u64,
    /// The stream sequence of each chunk, so a removal deletes exactly
    /// those (a purge by subject scans the whole stream on the server);
    /// empty for imports and older records, which are purged by subject.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    body_seqs: Vec<u64>,
    /// The body is in the record's own value, after it (see
    /// [`encode_value`]), not in `P_bodies`: one replicated write fewer
    /// per message, and none to remove it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    inline: bool,
}

/// A `P_env` value: the record's JSON, then, for an inline body, a NUL
/// byte and the body (JSON never holds a raw NUL, so the first one ends
/// it). A record names `inline` only with its body: a write without the
/// body would lose the message.
fn encode_value(record: &Record, body: Option<&[u8]>) -> Result<Bytes, SpoolError> {
    let mut value = serde_json::to_vec(record)
        .map_err(|e| SpoolError::Storage(format!("encoding an envelope: {e}")))?;
    match (record.inline, body) {
        (true, Some(body)) => {
            value.reserve(body.len() + 1);
            value.push(0);
            value.extend_from_slice(body);
        }
        (true, None) => {
            return Err(SpoolError::Storage(
                "an envelope with its body inline was to be written without it".into(),
            ));
        }
        (false, _) => {}
    }
    Ok(Bytes::from(value))
}

/// The record of a `P_env` value, and its inline body if it has one.
fn decode_value(value: &[u8]) -> Result<(Record, Option<&[u8]>), String> {
    let (json, body) = match value.iter().position(|b| *b == 0) {
        Some(at) => (&value[..at], Some(&value[at + 1..])),
        None => (value, None),
    };
    let record = serde_json::from_slice::<Record>(json).map_err(|e| e.to_string())?;
    match (record.inline, body) {
        (true, None) => Err("the record says its body is inline, and none follows".into()),
        (false, Some(_)) => Err("bytes follow a record whose body is not inline".into()),
        (_, body) => Ok((record, body)),
    }
}

/// Bodies up to this size are stored inline in their record.
const INLINE_MAX: usize = 64 * 1024;

/// A message as this relay last saw it in `P_env`.
#[derive(Debug, Clone)]
struct Cached {
    /// The KV revision it was read at: a write expects it still there.
    revision: u64,
    /// The record, or why its value does not decode.
    record: Result<Record, String>,
}

fn corrupt(id: QueueId, reason: &str) -> SpoolError {
    SpoolError::Corrupt {
        id: format_id(id),
        reason: reason.to_string(),
    }
}

/// What a worker's write becomes when the record moved on under it (a
/// flush, another relay): written over the current record only when no
/// recipient was decided elsewhere meanwhile, else dropped (the other
/// writer's state stands; at worst a recipient is sent twice, never lost).
fn rebase(held: &Record, ours: &Envelope, current: &Record) -> Option<Record> {
    (current.env.recipients == held.env.recipients).then(|| Record {
        env: ours.clone(),
        generation: current.generation,
        chunks: current.chunks,
        origin: current.origin,
        body_seqs: current.body_seqs.clone(),
        inline: current.inline,
    })
}

/// A ticket's payload.
#[derive(Debug, Serialize, Deserialize)]
struct Ticket {
    id: QueueId,
    generation: u64,
    /// The origin of the record it was published for (0: any, as in
    /// tickets of older versions): an append's ticket goes out beside its
    /// `create`, so it exists even when that `create` finds the id taken
    /// by another relay's message, which it must not deliver.
    #[serde(default)]
    origin: u64,
}

/// What a fetched ticket means, given its message's record as stored now.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// The message is gone (delivered, deleted, moved) or a flush gave it
    /// a newer ticket: ack and forget this one.
    Stale,
    /// Not due yet: hand the ticket back for this long.
    Later(Duration),
    /// Deliver it now.
    Due(Box<Record>),
}

/// A ticket's record as read: the record and its inline body, `None` when
/// the key has none.
type Look = Result<Option<(Cached, Option<Body>)>, SpoolError>;

/// Whether a ticket was stored recently enough that its append may still
/// be writing the record beside it.
fn ticket_is_young(msg: &jetstream::Message, ack_timeout: Duration) -> bool {
    let stored_ms = msg.info().map_or(0, |i| {
        u64::try_from(i.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
    });
    now_ms().saturating_sub(stored_ms) < (ack_timeout + UNBORN_SLACK).as_millis() as u64
}

/// `delivered`: how often the server handed out this ticket; `young`:
/// stored within an append's deadline (and some slack) of now.
fn verdict(
    ticket: &Ticket,
    record: Option<Record>,
    now_ms: u64,
    delivered: i64,
    young: bool,
) -> Verdict {
    let Some(record) = record else {
        // An append publishes its first ticket beside its `create`: the
        // ticket may be fetched before the record is there.
        if ticket.generation == 0 && young {
            return Verdict::Later(UNBORN_RETRY);
        }
        return Verdict::Stale;
    };
    if ticket.generation < record.generation
        || (ticket.origin != 0 && ticket.origin != record.origin)
    {
        return Verdict::Stale;
    }
    if record.env.next_attempt_ms > now_ms + DUE_SLACK_MS {
        let left = Duration::from_millis(record.env.next_attempt_ms - now_ms);
        if ticket.generation > record.generation && delivered < AHEAD_DELIVERIES {
            return Verdict::Later(left.min(AHEAD_RETRY));
        }
        return Verdict::Later(left);
    }
    Verdict::Due(Box::new(record))
}

/// A ticket this relay holds, with what the worker reads from memory.
struct InHand {
    pool: String,
    msg: jetstream::Message,
    record: Record,
    /// The KV revision `record` was read or written at.
    revision: u64,
    body: Body,
    /// When the server last confirmed the ticket held here (its fetch or
    /// a progress ack it answered).
    alive: Instant,
}

impl InHand {
    /// Whether the ticket is still this relay's (see [`TICKET_LAPSE`]).
    fn live(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.alive) < TICKET_LAPSE
    }
}

/// The connection once the streams and buckets exist.
struct Conn {
    client: async_nats::Client,
    js: jetstream::Context,
    env: kv::Store,
    /// The stream under `env`, to remove the delete markers of removed
    /// envelopes.
    env_stream: stream::Stream,
    /// Whether `env_stream` lets a marker be deleted by its sequence
    /// (buckets made before it did are purged by subject).
    markers_by_seq: bool,
    held: kv::Store,
    /// Live relays and the pools they drain (`nodes.rs`).
    nodes: kv::Store,
    bodies: stream::Stream,
    chunk: usize,
    consumers: tokio::sync::Mutex<HashMap<String, consumer::PullConsumer>>,
}

struct Inner {
    opts: JetStreamOptions,
    rt: tokio::runtime::Handle,
    conn: OnceLock<Conn>,
    /// Every message of the cluster by pool, from the watch of `P_env`
    /// (and this relay's own writes at once).
    cache: RwLock<BTreeMap<String, BTreeMap<QueueId, Cached>>>,
    in_hand: Mutex<HashMap<QueueId, InHand>>,
    /// Refused appends whose writes are being taken back: a ticket of one
    /// that got through waits, so the message answered 451 is not sent.
    taking_back: Mutex<HashSet<QueueId>>,
    /// The size of the last due message handed back for want of room
    /// ([`JetStreamOptions::max_bodies_in_hand`]); 0 once one fits again.
    refused_size: AtomicU64,
    /// The last [`SharedQueue::counts`] per pool and when it was taken.
    counted: Mutex<HashMap<String, (u64, ClusterCounts)>>,
    /// Pools configured here: their ticket streams are made at connect.
    wanted: Mutex<BTreeSet<String>>,
    held_tx: watch::Sender<BTreeSet<String>>,
    /// Counts tickets leaving this relay's hands ([`SharedQueue::released_watch`]).
    released_tx: watch::Sender<u64>,
    node_tag: AtomicU64,
    /// The 8 bits of the tag in ids, when `POOLRELAY_ID_TAG` sets them
    /// (tests of two relays picking the same ids; never set in service).
    id_tag: Option<u64>,
    /// This relay's key in the nodes bucket.
    node_id: String,
    last_id: Mutex<QueueId>,
    ready: AtomicBool,
    /// The watches of `P_env` and of `P_held` delivered what the buckets
    /// held when they started ([`Spool::catch_up`] waits for both).
    env_current: AtomicBool,
    held_current: AtomicBool,
}

/// The replicated spool; see the module documentation.
#[derive(Clone)]
pub struct JetStreamSpool {
    inner: Arc<Inner>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Unavailable(format!("{what}: {e}"))
}

impl JetStreamSpool {
    /// Starts the backend's runtime thread and, in the background, the
    /// connection to the cluster, retried until it succeeds: until then
    /// the spool is not writable (`/readyz` says 503) and appends fail.
    pub fn open(opts: JetStreamOptions) -> Result<JetStreamSpool, SpoolError> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("spool-jetstream".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("spool-jetstream-rt")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                // The runtime lives as long as the process.
                rt.block_on(std::future::pending::<()>());
            })
            .map_err(|e| SpoolError::Storage(format!("cannot start the spool thread: {e}")))?;
        let rt = rx
            .recv()
            .map_err(|e| SpoolError::Storage(format!("spool thread failed: {e}")))?
            .map_err(|e| SpoolError::Storage(format!("cannot start the spool runtime: {e}")))?;
        let inner = Arc::new(Inner {
            opts,
            rt,
            conn: OnceLock::new(),
            cache: RwLock::default(),
            in_hand: Mutex::default(),
            taking_back: Mutex::default(),
            refused_size: AtomicU64::new(0),
            counted: Mutex::default(),
            wanted: Mutex::default(),
            held_tx: watch::channel(BTreeSet::new()).0,
            released_tx: watch::channel(0).0,
            node_tag: AtomicU64::new(0),
            id_tag: std::env::var("POOLRELAY_ID_TAG")
                .ok()
                .and_then(|v| v.parse::<u8>().ok())
                .map(u64::from),
            node_id: crate::nodes::node_id(),
            last_id: Mutex::new(0),
            ready: AtomicBool::new(false),
            env_current: AtomicBool::new(false),
            held_current: AtomicBool::new(false),
        });
        let spool = JetStreamSpool { inner };
        let connecting = spool.inner.clone();
        spool
            .inner
            .rt
            .spawn(async move { connecting.connect_loop().await });
        Ok(spool)
    }

    /// Runs `fut` on the backend's runtime; the returned future may be
    /// awaited on any runtime.
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, SpoolError>> + Send + 'static,
    ) -> Durable<T> {
        let handle = self.inner.rt.spawn(fut);
        Box::pin(async move {
            handle
                .await
                .map_err(|e| SpoolError::Storage(format!("spool task failed: {e}")))?
        })
    }

    /// Runs `fut` on the backend's runtime and waits for it on this thread.
    fn block<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, SpoolError>> + Send + 'static,
    ) -> Result<T, SpoolError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.inner.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(WRITE_TIMEOUT + Duration::from_secs(1))
            .map_err(|_| unavailable("reading the replicated spool", "timed out"))?
    }
}

impl Inner {
    fn conn(&self) -> Result<&Conn, SpoolError> {
        self.conn.get().ok_or_else(|| {
            SpoolError::Unavailable("not connected to the JetStream cluster yet".into())
        })
    }

    fn prefix(&self) -> &str {
        &self.opts.stream_prefix
    }

    fn key(pool: &str, id: QueueId) -> String {
        format!("{pool}.{}", format_id(id))
    }

    /// Where a message's body chunks live: `P.body.<id>-<origin>`, so two
    /// relays that ever pick the same id (their 8-bit tags wrapped) never
    /// read, overwrite or purge each other's bytes; `P.body.<id>` for
    /// origin 0 (imports, whose ids are checked against what is stored).
    fn body_key(&self, id: QueueId, origin: u64) -> String {
        if origin == 0 {
            format!("{}.body.{}", self.prefix(), format_id(id))
        } else {
            format!("{}.body.{}-{origin}", self.prefix(), format_id(id))
        }
    }

    fn body_subject(&self, id: QueueId, origin: u64, chunk: u32) -> String {
        format!("{}.{chunk}", self.body_key(id, origin))
    }

    /// Purges a body (every chunk).
    async fn purge_body(&self, conn: &Conn, id: QueueId, origin: u64) -> Result<(), SpoolError> {
        conn.bodies
            .purge()
            .filter(format!("{}.>", self.body_key(id, origin)))
            .await
            .map(|_| ())
            .map_err(|e| unavailable("removing a body", e))
    }

    /// Publishes `message` in chunks under (`id`, `origin`); each chunk's
    /// stream sequence. Each chunk's subject is its `Nats-Msg-Id`: a chunk
    /// published again (a retried write, a resumed import) is a duplicate
    /// the server drops.
    async fn publish_body(
        &self,
        conn: &Conn,
        id: QueueId,
        origin: u64,
        message: Vec<u8>,
    ) -> Result<Vec<u64>, SpoolError> {
        let body = Bytes::from(message);
        let mut seqs = Vec::new();
        for start in (0..body.len()).step_by(conn.chunk) {
            let chunk = body.slice(start..(start + conn.chunk).min(body.len()));
            let subject = self.body_subject(id, origin, seqs.len() as u32);
            let seq = retrying("publishing the body", || {
                publish_acked(&conn.js, subject.clone(), &subject, chunk.clone())
            })
            .await?;
            seqs.push(seq);
        }
        Ok(seqs)
    }

    /// Removes the body of `record`: its chunks by sequence when the
    /// record names them, else every message under its subjects.
    async fn remove_body(
        &self,
        conn: &Conn,
        id: QueueId,
        record: &Record,
    ) -> Result<(), SpoolError> {
        if record.inline {
            // Gone with the record's value.
            return Ok(());
        }
        if record.body_seqs.is_empty() || record.body_seqs.len() != record.chunks as usize {
            return self.purge_body(conn, id, record.origin).await;
        }
        let stream = &conn.bodies.cached_info().config.name;
        for seq in &record.body_seqs {
            delete_seq(&conn.js, stream, *seq).await?;
        }
        Ok(())
    }

    /// The subject of `key` in `P_env`'s stream.
    fn env_subject(&self, key: &str) -> String {
        format!("$KV.{}_env.{key}", self.prefix())
    }

    fn ticket_subject(&self, pool: &str) -> String {
        format!("{}.q.{pool}", self.prefix())
    }

    fn ticket_stream(&self, pool: &str) -> String {
        format!("{}_q_{pool}", self.prefix())
    }

    /// Moves this relay's next id `n` further on, within the counter byte
    /// (past it: the next millisecond), never into the tag bits.
    fn skip_ids(&self, n: u64) {
        let tag = self.id_tag_bits();
        let mut last = self.last_id.lock().unwrap_or_else(|e| e.into_inner());
        let counter = (*last & 0xff) + n;
        *last = if counter <= 0xff {
            (*last & !0xff) | counter
        } else {
            (((*last >> 16) + 1) << 16) | (tag << 8)
        };
    }

    /// The tag bits this relay's ids carry.
    fn id_tag_bits(&self) -> u64 {
        self.id_tag
            .unwrap_or_else(|| self.node_tag.load(Ordering::Relaxed) & 0xff)
    }

    /// Ids are `unix_ms << 16 | node << 8 | counter`: the node tag (from
    /// a cluster-wide counter at connect) keeps two relays' ids apart.
    fn next_id(&self) -> QueueId {
        let tag = self.id_tag_bits();
        let mut last = self.last_id.lock().unwrap_or_else(|e| e.into_inner());
        let base = (now_ms() << 16) | (tag << 8);
        let id = if base > *last {
            base
        } else if (*last & 0xff) < 0xff {
            *last + 1
        } else {
            // 256 ids in one millisecond: borrow the next millisecond.
            (((*last >> 16) + 1) << 16) | (tag << 8)
        };
        *last = id;
        id
    }

    async fn connect_loop(self: Arc<Self>) {
        let mut pause = Duration::from_millis(500);
        let mut logged = false;
        loop {
            match self.try_connect().await {
                Ok(conn) => {
                    let _ = self.conn.set(conn);
                    let mut pause = Duration::from_millis(500);
                    while let Err(e) = self.start_watches().await {
                        tracing::error!(
                            "replicated spool: cannot watch the cluster's buckets: {e}; retrying (not ready meanwhile)"
                        );
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    // Ready (and so taking tickets) only once the holds are
                    // known: a held pool's mail is never sent at a start.
                    while !self.held_current.load(Ordering::Acquire) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    self.ready.store(true, Ordering::Release);
                    tracing::info!(servers = %self.opts.servers.join(","), server = %self.conn().map(|c| c.client.server_info().server_name).unwrap_or_default(), "replicated spool: connected to the JetStream cluster");
                    let keeper = self.clone();
                    tokio::spawn(async move { keeper.keep_tickets_alive().await });
                    return;
                }
                Err(e) => {
                    if !logged {
                        tracing::error!(servers = %self.opts.servers.join(","), "replicated spool: cannot reach the JetStream cluster: {e}; retrying (not ready meanwhile)");
                        logged = true;
                    } else {
                        tracing::debug!("replicated spool: still cannot reach the cluster: {e}");
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn try_connect(&self) -> Result<Conn, String> {
        let mut options = async_nats::ConnectOptions::new()
            .name("poolrelay")
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None);
        if let Some(path) = &self.opts.credentials_file {
            options = options.credentials_file(path).await.map_err(|e| {
                format!("cannot read spool.credentials_file {}: {e}", path.display())
            })?;
        }
        if let Some(path) = &self.opts.tls_ca_file {
            options = options.add_root_certificates(path.clone());
        }
        let addrs: Vec<async_nats::ServerAddr> = self
            .opts
            .servers
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("bad server address: {e}"))?;
        let mut client = options
            .clone()
            .connect(addrs.clone())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // Every append writes to the envelope bucket: connected to its
        // stream's leader, a write and its watch echo skip a hop between
        // servers (the servers spent about 6% less per append). Where
        // the leader is at connect time; a later election only costs the
        // hop again.
        let bucket = format!("{}_env", self.prefix());
        let mut js = jetstream::new(client.clone());
        js.set_timeout(self.opts.ack_timeout);
        ensure_bucket(&js, &bucket, self.opts.replicas).await?;
        if let Some(first) = leader_first(&js, &client, &options, &addrs, &bucket).await {
            match options.clone().retain_servers_order().connect(first).await {
                Ok(near) => {
                    let _ = tokio::time::timeout(PROBE_TIMEOUT, client.drain()).await;
                    client = near;
                }
                Err(e) => tracing::debug!(
                    "replicated spool: cannot connect to the envelope bucket's leader: {e}; staying where connected"
                ),
            }
        }
        let max_payload = client.server_info().max_payload;
        let max_payload = if max_payload == 0 {
            DEFAULT_MAX_PAYLOAD
        } else {
            max_payload
        };
        let chunk = max_payload.saturating_sub(CHUNK_HEADROOM).max(1024);
        let mut js = jetstream::new(client.clone());
        js.set_timeout(self.opts.ack_timeout);
        let replicas = self.opts.replicas;
        let env = ensure_bucket(&js, &bucket, replicas).await?;
        let held = ensure_bucket(&js, &format!("{}_held", self.prefix()), replicas).await?;
        let nodes = crate::nodes::open(&js, self.prefix(), replicas).await?;
        let bodies = js
            .get_or_create_stream(stream::Config {
                name: format!("{}_bodies", self.prefix()),
                subjects: vec![format!("{}.body.>", self.prefix())],
                num_replicas: replicas,
                allow_direct: true,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("bodies stream: {e}"))?;
        // A revision of `node.tag`, unique per relay start; its low 8 bits
        // go into ids, so bits a live relay announced are passed over
        // (they wrap after 256 starts), and claimed at once.
        let in_use = crate::nodes::tags_in_use(&nodes, &self.node_id)
            .await
            .unwrap_or_default();
        let mut tag = 0;
        for _ in 0..=in_use.len() {
            tag = held
                .put("node.tag", Bytes::from(now_ms().to_string()))
                .await
                .map_err(|e| format!("node tag: {e}"))?;
            if !in_use.contains(&(tag & 0xff)) {
                break;
            }
        }
        self.node_tag.store(tag, Ordering::Relaxed);
        crate::nodes::announce(&nodes, &self.node_id, &[], self.id_tag_bits())
            .await
            .map_err(|e| format!("claiming the id tag: {e}"))?;
        let env_stream = js
            .get_stream(format!("KV_{}_env", self.prefix()))
            .await
            .map_err(|e| format!("envelope bucket's stream: {e}"))?;
        let markers_by_seq = !env_stream.cached_info().config.deny_delete;
        let conn = Conn {
            client,
            js,
            env,
            env_stream,
            markers_by_seq,
            held,
            nodes,
            bodies,
            chunk,
            consumers: tokio::sync::Mutex::default(),
        };
        let wanted: Vec<String> = self
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        for pool in wanted {
            self.consumer_in(&conn, &pool)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(conn)
    }

    /// Fills the envelope cache and the held set, and keeps them current.
    async fn start_watches(self: &Arc<Self>) -> Result<(), String> {
        let conn = self.conn().map_err(|e| e.to_string())?;
        // An empty bucket's watch delivers nothing to say it is current.
        let empty = |mut stream: stream::Stream| async move {
            stream
                .info()
                .await
                .map(|info| info.state.messages == 0)
                .map_err(|e| format!("reading a bucket's state: {e}"))
        };
        if empty(conn.env.stream.clone()).await? {
            self.env_current.store(true, Ordering::Release);
        }
        if empty(conn.held.stream.clone()).await? {
            self.held_current.store(true, Ordering::Release);
        }
        // With history: what the buckets hold already, then every change.
        let envs = conn
            .env
            .watch_with_history(">")
            .await
            .map_err(|e| format!("watch envelopes: {e}"))?;
        let holds = conn
            .held
            .watch_with_history(">")
            .await
            .map_err(|e| format!("watch holds: {e}"))?;
        tokio::spawn(self.clone().follow_envelopes(envs));
        tokio::spawn(self.clone().follow_holds(holds));
        Ok(())
    }

    /// Applies `P_env`'s changes to the cache; a watch that ends is made
    /// again (with history, so what changed meanwhile is applied; a delete
    /// whose marker was purged meanwhile stays in the view until restart).
    async fn follow_envelopes(self: Arc<Self>, mut envs: kv::Watch) {
        loop {
            while let Some(entry) = envs.next().await {
                match entry {
                    Ok(entry) => {
                        // The last of what the bucket held when the watch
                        // started: current once it is applied.
                        let last = entry.delta == 0;
                        self.apply_entry(entry);
                        if last {
                            self.env_current.store(true, Ordering::Release);
                        }
                    }
                    Err(e) => tracing::warn!("replicated spool: envelope watch: {e}"),
                }
            }
            tracing::warn!("replicated spool: the envelope watch ended; watching again");
            envs = self.watch_again("envelopes", |conn| conn.env.clone()).await;
        }
    }

    /// Applies `P_held`'s changes to the held set; a watch that ends is
    /// made again.
    async fn follow_holds(self: Arc<Self>, mut holds: kv::Watch) {
        loop {
            while let Some(entry) = holds.next().await {
                let Ok(entry) = entry else { continue };
                if !entry.key.contains('.') {
                    let held = entry.operation == kv::Operation::Put;
                    self.held_tx.send_if_modified(|set| {
                        if held {
                            set.insert(entry.key.clone())
                        } else {
                            set.remove(&entry.key)
                        }
                    });
                }
                // Current only once the last entry is applied.
                if entry.delta == 0 {
                    self.held_current.store(true, Ordering::Release);
                }
            }
            tracing::warn!("replicated spool: the hold watch ended; watching again");
            holds = self.watch_again("holds", |conn| conn.held.clone()).await;
        }
    }

    async fn watch_again(&self, what: &str, bucket: impl Fn(&Conn) -> kv::Store) -> kv::Watch {
        let mut pause = Duration::from_millis(500);
        loop {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
            let Ok(conn) = self.conn() else { continue };
            match bucket(conn).watch_with_history(">").await {
                Ok(w) => return w,
                Err(e) => tracing::warn!("replicated spool: cannot watch {what} again: {e}"),
            }
        }
    }

    fn apply_entry(&self, entry: kv::Entry) {
        let Some((pool, id)) = entry.key.split_once('.') else {
            return;
        };
        let Some(id) = parse_id(id) else { return };
        if entry.operation == kv::Operation::Put {
            // The cache keeps records, never bodies.
            let record = decode_value(&entry.value).map(|(r, _)| r).map_err(|e| {
                tracing::error!(queue_id = %format_id(id), pool = %pool, "replicated spool: undecodable envelope: {e}; listed as corrupt, its ticket never acked");
                e
            });
            self.cache_put(pool, id, entry.revision, record);
        } else {
            let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = cache.get_mut(pool)
                && p.get(&id).is_some_and(|c| c.revision <= entry.revision)
            {
                p.remove(&id);
            }
        }
    }

    /// Keeps what is newest: the watch may deliver a revision this relay
    /// has already written past.
    fn cache_put(&self, pool: &str, id: QueueId, revision: u64, record: Result<Record, String>) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        let p = cache.entry(pool.to_string()).or_default();
        if p.get(&id).is_none_or(|c| c.revision <= revision) {
            p.insert(id, Cached { revision, record });
        }
    }

    fn cache_remove(&self, pool: &str, id: QueueId) {
        if let Some(p) = self
            .cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(pool)
        {
            p.remove(&id);
        }
    }

    fn cached(&self, pool: &str, id: QueueId) -> Option<Cached> {
        self.cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pool)
            .and_then(|p| p.get(&id))
            .cloned()
    }

    /// The record of `pool`/`id` as the bucket's leader holds it now, never
    /// a replica (as a direct get may ask): a replica a moment behind would
    /// not have the envelope of a message just accepted. `None`: gone.
    async fn read_record(
        &self,
        conn: &Conn,
        pool: &str,
        id: QueueId,
    ) -> Result<Option<Cached>, SpoolError> {
        Ok(self.read_value(conn, pool, id).await?.map(|(c, _)| c))
    }

    /// [`Inner::read_record`], with the inline body when there is one.
    async fn read_value(
        &self,
        conn: &Conn,
        pool: &str,
        id: QueueId,
    ) -> Result<Option<(Cached, Option<Body>)>, SpoolError> {
        let subject = self.env_subject(&Self::key(pool, id));
        match conn
            .env_stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            // A delete or purge marker: the message is gone.
            Ok(m) if m.headers.get("KV-Operation").is_some() => Ok(None),
            Ok(m) => {
                let (record, body) = match decode_value(&m.payload) {
                    Ok((r, body)) => (Ok(r), body.map(Body::from)),
                    Err(e) => (Err(e), None),
                };
                Ok(Some((
                    Cached {
                        revision: m.sequence,
                        record,
                    },
                    body,
                )))
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable("reading an envelope", e)),
        }
    }

    /// Whether `key` of `P_env` has any message, a delete marker included.
    async fn key_has_history(&self, conn: &Conn, key: &str) -> Result<bool, SpoolError> {
        let subject = self.env_subject(key);
        match conn
            .env_stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(unavailable("reading an envelope", e)),
        }
    }

    /// The body `record` (of `pool`/`id`) needs written with it: none for
    /// a body in `P_bodies`, else `known` or the key's stored one (a
    /// message's body never changes, whatever its revision).
    async fn inline_body(
        &self,
        conn: &Conn,
        pool: &str,
        id: QueueId,
        record: &Record,
        known: Option<Body>,
    ) -> Result<Option<Body>, SpoolError> {
        if !record.inline || known.is_some() {
            return Ok(known.filter(|_| record.inline));
        }
        match self.read_value(conn, pool, id).await? {
            Some((_, Some(body))) => Ok(Some(body)),
            _ => Err(SpoolError::Storage(format!(
                "the inline body of {} is not stored",
                Self::key(pool, id)
            ))),
        }
    }

    /// The body of `record` (of `pool`/`id`): inline in the key's value,
    /// or in `P_bodies`.
    async fn body_of(
        &self,
        conn: &Conn,
        pool: &str,
        id: QueueId,
        record: &Record,
    ) -> Result<Body, SpoolError> {
        if record.inline {
            return self
                .inline_body(conn, pool, id, record, None)
                .await
                .map(Option::unwrap_or_default);
        }
        self.read_body(id, record.origin, record.chunks).await
    }

    /// The pool's ticket stream and consumer, made when missing.
    async fn consumer_in(
        &self,
        conn: &Conn,
        pool: &str,
    ) -> Result<consumer::PullConsumer, SpoolError> {
        let mut consumers = conn.consumers.lock().await;
        if let Some(c) = consumers.get(pool) {
            return Ok(c.clone());
        }
        let stream = conn
            .js
            .get_or_create_stream(stream::Config {
                name: self.ticket_stream(pool),
                subjects: vec![self.ticket_subject(pool)],
                retention: stream::RetentionPolicy::WorkQueue,
                num_replicas: self.opts.replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("creating the pool's ticket stream", e))?;
        let consumer = stream
            .get_or_create_consumer(
                CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(CONSUMER.to_string()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: TICKET_ACK_WAIT,
                    max_deliver: -1,
                    max_ack_pending: MAX_ACK_PENDING,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| unavailable("creating the pool's ticket consumer", e))?;
        consumers.insert(pool.to_string(), consumer.clone());
        Ok(consumer)
    }

    async fn publish_ticket(
        &self,
        conn: &Conn,
        pool: &str,
        id: QueueId,
        generation: u64,
        origin: u64,
    ) -> Result<(), SpoolError> {
        self.consumer_in(conn, pool).await?;
        let payload = Bytes::from(
            serde_json::to_vec(&Ticket {
                id,
                generation,
                origin,
            })
            .map_err(|e| SpoolError::Storage(format!("encoding a ticket: {e}")))?,
        );
        // The pool is in it: a message moved A -> B -> A within the
        // server's duplicate window still gets its ticket. The origin
        // too: two relays' appends under one id each publish a ticket
        // before either knows which `create` won, and the winner's must
        // not be dropped as a copy of the loser's.
        let msg_id = format!("{}-{pool}-{generation}-{origin}", format_id(id));
        retrying("publishing a ticket", || {
            publish_acked(
                &conn.js,
                self.ticket_subject(pool),
                &msg_id,
                payload.clone(),
            )
        })
        .await
        .map(|_| ())
    }

    /// Writes `record` if the key is still at `revision`: its new revision,
    /// or `None` when the record moved on (another writer, or gone). A
    /// retry whose first try got through finds its own bytes there:
    /// written. An inline body is `body`, or read from the key.
    async fn write_record(
        &self,
        conn: &Conn,
        pool: &str,
        id: QueueId,
        record: &Record,
        body: Option<Body>,
        revision: u64,
    ) -> Result<Option<u64>, SpoolError> {
        let body = match (record.inline, body) {
            (false, _) => None,
            (true, Some(body)) => Some(body),
            (true, None) => match self.read_value(conn, pool, id).await? {
                Some((_, Some(body))) => Some(body),
                _ => return Ok(None),
            },
        };
        let value = encode_value(record, body.as_deref())?;
        let written = retrying("storing an envelope", || async {
            match conn
                .env
                .update(Self::key(pool, id), value.clone(), revision)
                .await
            {
                Ok(rev) => Ok(Some(rev)),
                // The bucket, not the error's kind, says whether the record
                // moved on: still at `revision` means try again.
                Err(e) => match self.read_record(conn, pool, id).await? {
                    Some(c) if c.record.as_ref() == Ok(record) => Ok(Some(c.revision)),
                    Some(c) if c.revision == revision => Err(unavailable("storing an envelope", e)),
                    _ => Ok(None),
                },
            }
        })
        .await?;
        if let Some(rev) = written {
            self.cache_put(pool, id, rev, Ok(record.clone()));
        }
        Ok(written)
    }

    /// Makes the key `pool`/`id` with `record` (and `body`, when inline);
    /// a key already there with the same record (an earlier try got
    /// through) counts as made; `None`: another message has it.
    async fn create_record(
        &self,
        conn: &Conn,
        pool: &str,
        id: QueueId,
        record: &Record,
        body: Option<&[u8]>,
    ) -> Result<Option<u64>, SpoolError> {
        let value = encode_value(record, body)?;
        retrying("storing an envelope", || async {
            match conn.env.create(Self::key(pool, id), value.clone()).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    match self.read_record(conn, pool, id).await? {
                        Some(c) if c.record.as_ref() == Ok(record) => Ok(Some(c.revision)),
                        _ => Ok(None),
                    }
                }
                Err(e) => Err(unavailable("storing an envelope", e)),
            }
        })
        .await
        .inspect(|made| {
            if let Some(rev) = made {
                self.cache_put(pool, id, *rev, Ok(record.clone()));
            }
        })
    }

    /// [`Inner::create_record`] where an id taken by another message is an
    /// error.
    async fn create_record_or_fail(
        &self,
        conn: &Conn,
        pool: &str,
        id: QueueId,
        record: &Record,
        body: Option<&[u8]>,
    ) -> Result<u64, SpoolError> {
        self.create_record(conn, pool, id, record, body)
            .await?
            .ok_or_else(|| {
                SpoolError::Storage(format!(
                    "{} exists with other contents",
                    Self::key(pool, id)
                ))
            })
    }

    async fn append(
        self: Arc<Self>,
        envelope: Envelope,
        message: Vec<u8>,
    ) -> Result<QueueId, SpoolError> {
        let conn = self.conn()?;
        let pool = envelope.pool.clone();
        let origin = self.node_tag.load(Ordering::Relaxed);
        let started = std::time::Instant::now();
        let mut id = self.next_id();
        let inline = message.len() <= INLINE_MAX.min(conn.chunk);
        let written = tokio::time::timeout(self.opts.ack_timeout, async {
            retrying("making the pool's ticket stream", || {
                self.consumer_in(conn, &pool)
            })
            .await?;
            let body = message;
            let mut record = Record {
                env: envelope,
                generation: 0,
                chunks: 0,
                origin,
                body_seqs: Vec::new(),
                inline,
            };
            // An id another relay took (8-bit tags wrap after 256 relay
            // starts) is refused by `create`: a body in `P_bodies`, under
            // this relay's own subjects, is taken back and the message
            // stored again under a fresh id.
            for _ in 0..ID_TRIES {
                if !inline {
                    record.body_seqs = self.publish_body(conn, id, origin, body.clone()).await?;
                    record.chunks = record.body_seqs.len() as u32;
                }
                let value = inline.then_some(body.as_slice());
                // The ticket beside the envelope, not after it: one round
                // trip to the quorum per 250 instead of two. A ticket
                // fetched before its record is there comes back soon
                // (`verdict`); one whose `create` found the id taken names
                // this relay's origin, not the record's, and is dropped.
                let (made, ticket) = tokio::join!(
                    self.create_record(conn, &pool, id, &record, value),
                    self.publish_ticket(conn, &pool, id, 0, origin)
                );
                if made?.is_some() {
                    return ticket;
                }
                tracing::warn!(queue_id = %format_id(id), pool = %pool, "replicated spool: another relay holds this id; storing the message under a fresh one");
                if !inline {
                    tokio::spawn(self.clone().take_back(pool.clone(), id, origin, false, true));
                }
                // A random step, so two relays counting in step part ways.
                self.skip_ids(1 + u64::from(std::process::id() ^ now_nanos()) % 32);
                id = self.next_id();
            }
            Err(SpoolError::Storage(format!(
                "{ID_TRIES} ids in a row were taken by other relays"
            )))
        })
        .await;
        let result = match written {
            Ok(r) => r,
            Err(_) => Err(SpoolError::Unavailable(format!(
                "the cluster did not acknowledge within {:?} (no quorum?)",
                self.opts.ack_timeout
            ))),
        };
        match result {
            Ok(()) => {
                metrics::histogram!(crate::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
                Ok(id)
            }
            Err(e) => {
                // Nothing is claimed: take back whatever was written, so a
                // ticket that did get through finds no envelope and is dropped.
                // Before the 451: a quorum that comes back may still
                // commit the writes, and this relay's feed is waiting for
                // the ticket.
                self.taking_back
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id);
                tokio::spawn(self.clone().take_back(pool, id, origin, true, !inline));
                Err(e)
            }
        }
    }

    /// Takes back what a failed append wrote, retried until the cluster
    /// answers again (the quorum may be what failed): a ticket that got
    /// through then finds no envelope and is dropped. The envelope goes
    /// only when it is this append's (`envelope`, and its origin is this
    /// relay's): an id another relay holds keeps its message.
    async fn take_back(
        self: Arc<Self>,
        pool: String,
        id: QueueId,
        origin: u64,
        envelope: bool,
        body: bool,
    ) {
        let ours = |c: &Cached| c.record.as_ref().is_ok_and(|r| r.origin == origin);
        if envelope && self.cached(&pool, id).is_some_and(|c| ours(&c)) {
            // Not listed here meanwhile; the bucket follows below.
            self.cache_remove(&pool, id);
        }
        let Ok(conn) = self.conn() else { return };
        let work = async {
            if envelope {
                let key = Self::key(&pool, id);
                let removed = retrying("taking back an envelope", || async {
                    match self.read_record(conn, &pool, id).await? {
                        Some(c) if ours(&c) => self
                            .delete_key(conn, &key, Some(c.revision))
                            .await
                            .map(Some),
                        // Never written yet: the append's `create` may still
                        // be on its way (sent before the deadline, applied
                        // after a leader election). A marker where the key
                        // has no message at all fences it out (a create
                        // expects none); one written meanwhile fails this
                        // and is read again.
                        None if !self.key_has_history(conn, &key).await? => {
                            self.delete_key(conn, &key, Some(0)).await.map(Some)
                        }
                        // Gone, or another relay's message under this id.
                        _ => Ok(None),
                    }
                })
                .await;
                if let Ok(Some(marker)) = removed {
                    self.cache_remove(&pool, id);
                    self.clone().purge_marker_later(key, marker);
                }
            }
            if body {
                let _ = retrying("taking back a body", || self.purge_body(conn, id, origin)).await;
            }
        };
        if tokio::time::timeout(TAKE_BACK_TIMEOUT, work).await.is_err() {
            tracing::error!(queue_id = %format_id(id), pool = %pool, "replicated spool: could not take back a refused message within {TAKE_BACK_TIMEOUT:?}; its envelope may remain (listed, and delivered if a ticket got through)");
        }
        if envelope {
            self.taking_back
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }

    /// [`Spool::insert_with_id`]: like an append under a given id. An id
    /// already stored with the same bytes gets a fresh ticket (a newer
    /// generation: an older ticket is dropped when fetched), so an import
    /// stopped between an envelope and its ticket leaves no message that
    /// no relay is ever handed.
    async fn insert(
        self: Arc<Self>,
        id: QueueId,
        envelope: Envelope,
        message: Vec<u8>,
    ) -> Result<Inserted, SpoolError> {
        let conn = self.conn()?;
        let existing = {
            let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
            cache
                .iter()
                .find_map(|(pool, p)| p.get(&id).map(|c| (pool.clone(), c.clone())))
        };
        let written = tokio::time::timeout(self.opts.ack_timeout, async {
            if let Some((pool, cached)) = existing {
                let Ok(mut record) = cached.record else {
                    return Ok(Inserted::Conflict);
                };
                let stored = self.body_of(conn, &pool, id, &record).await?;
                if *stored != *message.as_slice() {
                    return Ok(Inserted::Conflict);
                }
                // The ticket first, as a flush's: the record never names a
                // generation no ticket carries.
                record.generation += 1;
                self.publish_ticket(conn, &pool, id, record.generation, record.origin)
                    .await?;
                self.write_record(conn, &pool, id, &record, Some(stored), cached.revision)
                    .await?;
                return Ok(Inserted::AlreadyThere);
            }
            {
                let mut last = self.last_id.lock().unwrap_or_else(|e| e.into_inner());
                *last = (*last).max(id);
            }
            let pool = envelope.pool.clone();
            retrying("making the pool's ticket stream", || {
                self.consumer_in(conn, &pool)
            })
            .await?;
            // Under the plain id (origin 0): a resumed import publishes the
            // same subjects again, duplicates the server drops.
            // No sequences kept: a resumed import past the server's
            // duplicate window may have stored a chunk twice, so its
            // removal purges by subject.
            let chunks = self.publish_body(conn, id, 0, message).await?.len() as u32;
            let record = Record {
                env: envelope,
                generation: 0,
                chunks,
                origin: 0,
                body_seqs: Vec::new(),
                inline: false,
            };
            self.create_record_or_fail(conn, &pool, id, &record, None)
                .await?;
            self.publish_ticket(conn, &pool, id, 0, 0).await?;
            Ok(Inserted::Stored)
        })
        .await;
        written.unwrap_or_else(|_| {
            Err(SpoolError::Unavailable(format!(
                "the cluster did not acknowledge within {:?} (no quorum?)",
                self.opts.ack_timeout
            )))
        })
    }

    /// [`Spool::catch_up`]: connected, and both watches delivered what
    /// the buckets held when they started.
    async fn catch_up(self: Arc<Self>) -> Result<(), SpoolError> {
        while !(self.ready.load(Ordering::Acquire)
            && self.env_current.load(Ordering::Acquire)
            && self.held_current.load(Ordering::Acquire))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn read_body(&self, id: QueueId, origin: u64, chunks: u32) -> Result<Body, SpoolError> {
        let conn = self.conn()?;
        let mut bytes = Vec::new();
        for i in 0..chunks {
            let subject = self.body_subject(id, origin, i);
            // Any replica answers a direct get, so a stream electing a
            // leader still serves bodies; the leader is asked when a
            // replica lags behind.
            let payload = match conn.bodies.direct_get_last_for_subject(&subject).await {
                Ok(m) => m.payload,
                Err(_) => {
                    conn.bodies
                        .get_last_raw_message_by_subject(&subject)
                        .await
                        .map_err(|e| {
                            unavailable(&format!("reading body chunk {i} of {}", format_id(id)), e)
                        })?
                        .payload
                }
            };
            bytes.extend_from_slice(&payload);
        }
        Ok(Body::from(bytes))
    }

    async fn take(
        self: Arc<Self>,
        pool: String,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<(QueueId, Envelope)>, SpoolError> {
        let conn = self.conn()?;
        let consumer = self.consumer_in(conn, &pool).await?;
        let mut taken = Vec::new();
        // What is there now, at once; when nothing is, wait for one ticket
        // (a long poll: no relay polls an idle queue in a loop).
        // A pull request the server lost (its stream's leader died) is
        // never answered: never wait for one longer than this.
        let patience = wait + Duration::from_secs(2);
        let now = tokio::time::timeout(
            patience,
            consumer.fetch().max_messages(max.max(1)).messages(),
        )
        .await
        .map_err(|_| unavailable("fetching tickets", "timed out"))?
        .map_err(|e| unavailable("fetching tickets", e))?;
        let fetched = self
            .accept_batch(conn, &pool, now, patience, &mut taken)
            .await;
        if fetched == 0 {
            let waited = tokio::time::timeout(
                patience,
                consumer.batch().max_messages(1).expires(wait).messages(),
            )
            .await
            .map_err(|_| unavailable("waiting for tickets", "timed out"))?
            .map_err(|e| unavailable("waiting for tickets", e))?;
            self.accept_batch(conn, &pool, waited, patience, &mut taken)
                .await;
        }
        Ok(taken)
    }

    /// Accepts the tickets of one pull request; how many arrived. The
    /// records of a batch's tickets are read side by side (one after the
    /// other, a batch waited a round trip per ticket before any worker had
    /// mail); what each ticket means is then decided in order, so the
    /// bound on bodies in hand and a second ticket for one id see the
    /// decisions before them.
    async fn accept_batch(
        &self,
        conn: &Conn,
        pool: &str,
        mut batch: consumer::pull::Batch,
        patience: Duration,
        taken: &mut Vec<(QueueId, Envelope)>,
    ) -> usize {
        let mut fetched = Vec::new();
        while let Ok(Some(msg)) = tokio::time::timeout(patience, batch.next()).await {
            match msg {
                Ok(m) => fetched.push(m),
                Err(e) => {
                    tracing::debug!("replicated spool: ticket fetch: {e}");
                    break;
                }
            }
        }
        let arrived = fetched.len();
        let mut ids = HashSet::new();
        let tickets: Vec<(jetstream::Message, Option<Ticket>, bool)> = fetched
            .into_iter()
            .map(|msg| {
                let ticket = serde_json::from_slice::<Ticket>(&msg.payload).ok();
                let first = ticket.as_ref().is_some_and(|t| ids.insert(t.id));
                (msg, ticket, first)
            })
            .collect();
        let looks = join_all(tickets.iter().map(|(msg, ticket, first)| async move {
            match ticket {
                Some(t) if *first && !self.holds_in_hand(t.id) => {
                    Some(self.look(conn, pool, t, msg).await)
                }
                _ => None,
            }
        }))
        .await;
        for ((msg, ticket, _), look) in tickets.into_iter().zip(looks) {
            if let Some(t) = self.accept_ticket(conn, pool, msg, ticket, look).await {
                taken.push(t);
            }
        }
        arrived
    }

    /// Whether this relay holds `id`'s ticket.
    fn holds_in_hand(&self, id: QueueId) -> bool {
        self.in_hand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&id)
    }

    /// Reads a ticket's record (and inline body). An append's ticket can
    /// arrive a moment before the record written beside it: while young,
    /// looked for again at once, a few times, rather than handed back
    /// (urgent mail would wait the whole retry).
    async fn look(
        &self,
        conn: &Conn,
        pool: &str,
        ticket: &Ticket,
        msg: &jetstream::Message,
    ) -> Look {
        let young = ticket_is_young(msg, self.opts.ack_timeout);
        let mut read = self.read_value(conn, pool, ticket.id).await;
        for pause_ms in UNBORN_LOOKS_MS {
            if ticket.generation != 0 || !young || !matches!(read, Ok(None)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            read = self.read_value(conn, pool, ticket.id).await;
        }
        read
    }

    /// Decides what a fetched ticket means: a due message (read and kept
    /// in hand), or one to drop or to hand back for later.
    async fn accept_ticket(
        &self,
        conn: &Conn,
        pool: &str,
        msg: jetstream::Message,
        ticket: Option<Ticket>,
        look: Option<Look>,
    ) -> Option<(QueueId, Envelope)> {
        let Some(ticket) = ticket else {
            tracing::error!(pool = %pool, "replicated spool: undecodable ticket dropped");
            let _ = msg.ack().await;
            return None;
        };
        let id = ticket.id;
        // The same message again (our hold lapsed, or a flush): the newest
        // delivery is the live one, and the message is scheduled already.
        let again = self
            .in_hand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .map(|held| held.record.generation);
        if let Some(generation) = again {
            if ticket.generation >= generation {
                if let Some(held) = self
                    .in_hand
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(&id)
                {
                    held.msg = msg;
                    held.alive = Instant::now();
                }
            } else {
                let _ = msg.ack().await;
            }
            return None;
        }
        if self
            .taking_back
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
        {
            tracing::debug!(queue_id = %format_id(id), "replicated spool: the ticket of a refused message waits for its take-back");
            let _ = msg.ack_with(AckKind::Nak(Some(TAKING_BACK_RETRY))).await;
            return None;
        }
        let delivered = msg.info().map_or(1, |i| i.delivered);
        let young = ticket_is_young(&msg, self.opts.ack_timeout);
        let read = match look {
            Some(read) => read,
            None => self.look(conn, pool, &ticket, &msg).await,
        };
        let (cached, inline) = match read {
            Ok(Some((c, body))) => (Some(c), body),
            Ok(None) => (None, None),
            Err(e) => {
                tracing::warn!(queue_id = %format_id(id), "replicated spool: {e}; ticket back in 1s");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return None;
            }
        };
        let (revision, record) = match cached {
            None => (0, None),
            Some(Cached {
                revision,
                record: Ok(record),
            }) => (revision, Some(record)),
            Some(Cached {
                revision,
                record: Err(reason),
            }) => {
                // Acking would drop the message: it waits for the operator.
                tracing::error!(queue_id = %format_id(id), pool = %pool, "replicated spool: undecodable envelope: {reason}; its ticket goes back for {CORRUPT_RETRY:?}, the record is listed as corrupt");
                self.cache_put(pool, id, revision, Err(reason));
                let _ = msg.ack_with(AckKind::Nak(Some(CORRUPT_RETRY))).await;
                return None;
            }
        };
        let record = match verdict(&ticket, record, now_ms(), delivered, young) {
            Verdict::Stale => {
                let _ = msg.ack().await;
                return None;
            }
            Verdict::Later(delay) => {
                let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                return None;
            }
            Verdict::Due(record) => *record,
        };
        // Bodies in hand are bounded like content in flight: a message
        // that does not fit goes back for another relay (or for this one
        // once bodies leave), and the feed waits (`bodies_full`).
        let in_hand_bytes = self.bytes_in_hand();
        if in_hand_bytes > 0
            && in_hand_bytes.saturating_add(record.env.size) > self.opts.max_bodies_in_hand
        {
            self.refused_size
                .store(record.env.size.max(1), Ordering::Relaxed);
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return None;
        }
        self.refused_size.store(0, Ordering::Relaxed);
        let read = match inline {
            Some(body) => Ok(body),
            None => self.read_body(id, record.origin, record.chunks).await,
        };
        let body = match read {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(queue_id = %format_id(id), "replicated spool: {e}; ticket back in 1s");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return None;
            }
        };
        let envelope = record.env.clone();
        self.cache_put(pool, id, revision, Ok(record.clone()));
        self.in_hand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                InHand {
                    pool: pool.to_string(),
                    msg,
                    record,
                    revision,
                    body,
                    alive: Instant::now(),
                },
            );
        Some((id, envelope))
    }

    /// Progress acks for the tickets in hand, each confirmed by the server;
    /// a ticket unconfirmed for [`TICKET_LAPSE`] is let go first, before
    /// any ack could make it look alive again after a freeze.
    async fn keep_tickets_alive(self: Arc<Self>) {
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            let msgs: Vec<(QueueId, jetstream::Message)> = {
                let mut in_hand = self.in_hand.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let before = in_hand.len();
                in_hand.retain(|id, h| {
                    let live = h.live(now);
                    if !live {
                        tracing::warn!(queue_id = %format_id(*id), pool = %h.pool, "replicated spool: the cluster has not confirmed this ticket for {TICKET_LAPSE:?}: let go, another relay delivers it");
                    }
                    live
                });
                if in_hand.len() < before {
                    self.released_tx.send_modify(|n| *n = n.wrapping_add(1));
                }
                in_hand.iter().map(|(id, h)| (*id, h.msg.clone())).collect()
            };
            let acks = msgs.into_iter().map(|(id, m)| async move {
                let acked =
                    tokio::time::timeout(PROGRESS_ACK_TIMEOUT, m.double_ack_with(AckKind::Progress))
                        .await;
                match acked {
                    Ok(Ok(())) => Some(id),
                    Ok(Err(e)) => {
                        tracing::debug!(queue_id = %format_id(id), "replicated spool: progress ack: {e}");
                        None
                    }
                    Err(_) => None,
                }
            });
            let confirmed = futures_util::future::join_all(acks).await;
            let now = Instant::now();
            let mut in_hand = self.in_hand.lock().unwrap_or_else(|e| e.into_inner());
            for id in confirmed.into_iter().flatten() {
                if let Some(h) = in_hand.get_mut(&id) {
                    h.alive = now;
                }
            }
        }
    }

    /// [`SharedQueue::counts`] of `pool`, scanned now.
    fn count_now(&self, pool: &str, now_ms: u64) -> ClusterCounts {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let Some(messages) = cache.get(pool) else {
            return ClusterCounts::default();
        };
        ClusterCounts {
            queued: messages.len(),
            deferred: messages
                .values()
                .filter(|c| {
                    c.record
                        .as_ref()
                        .is_ok_and(|r| r.env.next_attempt_ms > now_ms)
                })
                .count(),
            oldest: messages.keys().next().copied(),
        }
    }

    /// Bytes of the bodies in this relay's hands.
    fn bytes_in_hand(&self) -> u64 {
        self.in_hand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|h| h.body.len() as u64)
            .sum()
    }

    /// The record a worker's write starts from: its copy in hand, else
    /// this relay's view.
    fn held_copy(&self, pool: &str, id: QueueId) -> Option<(Record, u64)> {
        let in_hand = self
            .in_hand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .map(|h| (h.record.clone(), h.revision));
        in_hand.or_else(|| {
            self.cached(pool, id)
                .and_then(|c| c.record.ok().map(|r| (r, c.revision)))
        })
    }

    /// The body of `pool`/`id` if this relay holds its ticket.
    fn body_in_hand(&self, id: QueueId, pool: &str) -> Option<Body> {
        self.in_hand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .filter(|h| h.pool == pool)
            .map(|h| h.body.clone())
    }

    /// Forgets a copy whose record moved on: its ticket is not acked, so
    /// whoever holds the live one decides.
    fn drop_copy(&self, id: QueueId, pool: &str, what: &str) {
        tracing::warn!(queue_id = %format_id(id), pool = %pool, "replicated spool: the envelope changed under this relay ({what}); its copy is dropped, the stored state stands");
        self.release(id, pool);
    }

    /// Takes `id` out of this relay's hands if what it holds is the
    /// ticket of `pool`: after a pool move, the feed may already hold the
    /// new pool's ticket, which must not be acked with the old one.
    fn release(&self, id: QueueId, pool: &str) -> Option<InHand> {
        let mut in_hand = self.in_hand.lock().unwrap_or_else(|e| e.into_inner());
        let released = if in_hand.get(&id).is_some_and(|h| h.pool == pool) {
            in_hand.remove(&id)
        } else {
            None
        };
        drop(in_hand);
        if released.is_some() {
            self.released_tx.send_modify(|n| *n = n.wrapping_add(1));
        }
        released
    }

    async fn update(
        self: Arc<Self>,
        id: QueueId,
        old_pool: String,
        envelope: Envelope,
    ) -> Result<(), SpoolError> {
        let conn = self.conn()?;
        let new_pool = envelope.pool.clone();
        let Some((previous, revision)) = self.held_copy(&old_pool, id) else {
            return Ok(());
        };
        let write = async {
            if new_pool != old_pool {
                return self
                    .clone()
                    .move_pool(conn, id, &old_pool, previous, envelope)
                    .await;
            }
            let mut record = Record {
                env: envelope.clone(),
                ..previous.clone()
            };
            let mut revision = revision;
            let body = self.body_in_hand(id, &old_pool);
            let written = loop {
                if let Some(rev) = self
                    .write_record(conn, &new_pool, id, &record, body.clone(), revision)
                    .await?
                {
                    break Some(rev);
                }
                // Someone wrote since: apply ours only when no recipient
                // was decided elsewhere.
                let current = self.read_record(conn, &new_pool, id).await?;
                match current {
                    Some(Cached {
                        revision: now_at,
                        record: Ok(current),
                    }) => match rebase(&previous, &envelope, &current) {
                        Some(rebased) => {
                            record = rebased;
                            revision = now_at;
                        }
                        None => break None,
                    },
                    _ => break None,
                }
            };
            match written {
                Some(rev) => {
                    let mut in_hand = self.in_hand.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(h) = in_hand.get_mut(&id) {
                        h.record = record;
                        h.revision = rev;
                    }
                }
                None => self.drop_copy(id, &old_pool, "outcome not written"),
            }
            Ok(())
        };
        tokio::time::timeout(WRITE_TIMEOUT, write)
            .await
            .map_err(|_| unavailable("updating an envelope", "timed out"))?
    }

    /// A pool move: the new record and its ticket (a new generation, so
    /// the server's duplicate window never drops it) exist before the old
    /// key goes and the old ticket is acked. A crash in between leaves the
    /// message in both pools (sent twice at worst), never in none.
    async fn move_pool(
        self: Arc<Self>,
        conn: &Conn,
        id: QueueId,
        old_pool: &str,
        previous: Record,
        envelope: Envelope,
    ) -> Result<(), SpoolError> {
        let new_pool = envelope.pool.clone();
        let body = self
            .inline_body(
                conn,
                old_pool,
                id,
                &previous,
                self.body_in_hand(id, old_pool),
            )
            .await?;
        let record = Record {
            env: envelope,
            generation: previous.generation + 1,
            ..previous
        };
        self.create_record_or_fail(conn, &new_pool, id, &record, body.as_deref())
            .await?;
        self.publish_ticket(conn, &new_pool, id, record.generation, record.origin)
            .await?;
        let old_key = Self::key(old_pool, id);
        let marker = retrying("removing the old envelope", || {
            self.delete_key(conn, &old_key, None)
        })
        .await?;
        self.cache_remove(old_pool, id);
        self.clone().purge_marker_later(old_key, marker);
        if let Some(old) = self.release(id, old_pool) {
            let _ = old.msg.ack().await;
        }
        Ok(())
    }

    /// Deletes `key` from `P_env` (at revision `expect`, when given): the
    /// delete marker's sequence. A KV delete is a marker message; made
    /// here rather than by the bucket's call, which does not say where
    /// the marker went.
    async fn delete_key(
        &self,
        conn: &Conn,
        key: &str,
        expect: Option<u64>,
    ) -> Result<u64, SpoolError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("KV-Operation", "DEL");
        if let Some(revision) = expect {
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                revision.to_string().as_str(),
            );
        }
        let ack = conn
            .js
            .publish_with_headers(self.env_subject(key), headers, Bytes::new())
            .await
            .map_err(|e| unavailable("removing an envelope", e))?
            .await
            .map_err(|e| unavailable("removing an envelope", e))?;
        Ok(ack.sequence)
    }

    /// A KV delete leaves a marker per key, forever: one per message ever
    /// delivered. Once every relay's watch has seen it (seconds), the
    /// marker (sequence `marker`) is deleted; in a bucket that refuses
    /// deletes (made by an older version) the key's subject is purged,
    /// which the server pays for with a scan of the bucket. A relay whose
    /// watch was cut meanwhile may keep the envelope in its admin view
    /// until it restarts; deliveries read the bucket itself, never that
    /// view.
    fn purge_marker_later(self: Arc<Self>, key: String, marker: u64) {
        tokio::spawn(async move {
            tokio::time::sleep(MARKER_PURGE_DELAY).await;
            let Ok(conn) = self.conn() else { return };
            let removed = if conn.markers_by_seq {
                let stream = &conn.env_stream.cached_info().config.name;
                delete_seq(&conn.js, stream, marker).await
            } else {
                let subject = self.env_subject(&key);
                conn.env_stream
                    .purge()
                    .filter(subject)
                    .await
                    .map(|_| ())
                    .map_err(|e| unavailable("purging", e))
            };
            if let Err(e) = removed {
                tracing::debug!("replicated spool: cannot remove a delete marker: {e}");
            }
        });
    }

    async fn remove(self: Arc<Self>, id: QueueId, pool: String) -> Result<(), SpoolError> {
        let conn = self.conn()?;
        let held = self.held_copy(&pool, id);
        let write = async {
            // Where the body is (its chunks' sequences, or its subjects,
            // which name its writer).
            let body_of = match &held {
                Some((record, _)) => Some(record.clone()),
                None => self
                    .read_record(conn, &pool, id)
                    .await?
                    .and_then(|c| c.record.ok()),
            };
            // Deleted only at the revision this relay decided on (or a
            // later one where no recipient was decided elsewhere).
            let mut expect = held.as_ref().map(|(_, rev)| *rev);
            let key = Self::key(&pool, id);
            let marker = loop {
                match self.delete_key(conn, &key, expect).await {
                    Ok(marker) => break Some(marker),
                    Err(e) => {
                        let current = self.read_record(conn, &pool, id).await?;
                        match (current, &held) {
                            (None, _) => break None,
                            (Some(c), Some((previous, rev))) if c.revision != *rev => {
                                let same = c
                                    .record
                                    .as_ref()
                                    .is_ok_and(|r| r.env.recipients == previous.env.recipients);
                                if !same {
                                    self.drop_copy(id, &pool, "removal not written");
                                    return Ok(());
                                }
                                expect = Some(c.revision);
                            }
                            _ => {
                                tracing::debug!(
                                    "replicated spool: removing an envelope: {e}; trying again"
                                );
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                }
            };
            self.cache_remove(&pool, id);
            if let Some(marker) = marker {
                self.clone().purge_marker_later(key, marker);
            }
            // The envelope is gone, so the message is: the ticket's ack and
            // the body's removal no longer depend on each other.
            let held = self.release(id, &pool);
            let ack = async {
                if let Some(h) = held {
                    let _ = h.msg.double_ack().await;
                }
            };
            let purge = retrying("removing a body", || async {
                match &body_of {
                    Some(record) => self.remove_body(conn, id, record).await,
                    None => self.purge_body(conn, id, 0).await,
                }
            });
            let ((), purged) = tokio::join!(ack, purge);
            purged
        };
        tokio::time::timeout(WRITE_TIMEOUT, write)
            .await
            .map_err(|_| unavailable("removing a message", "timed out"))?
    }

    /// `queue flush` (of a pool, or of `only`): per deferred message not in hand, a ticket of the
    /// next generation first, then the record (generation + 1, due now)
    /// at the revision read. A crash between the two leaves an extra
    /// ticket (handed back as not due), never a record whose ticket is
    /// gone; a record changed meanwhile (delivered, removed, in another
    /// relay's hands) is skipped, never overwritten.
    async fn flush(
        self: Arc<Self>,
        pool: String,
        only: Option<QueueId>,
    ) -> Result<usize, SpoolError> {
        let conn = self.conn()?;
        let now = now_ms();
        let deferred: Vec<(QueueId, u64, Record)> = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pool)
            .map(|p| {
                p.iter()
                    .filter(|(id, _)| only.is_none_or(|o| o == **id))
                    .filter_map(|(id, c)| {
                        let r = c.record.as_ref().ok()?;
                        (r.env.next_attempt_ms > now + DUE_SLACK_MS)
                            .then(|| (*id, c.revision, r.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let total = deferred.len();
        let flushed = AtomicU64::new(0);
        let work = async {
            for (id, revision, mut record) in deferred {
                if self
                    .in_hand
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&id)
                {
                    continue;
                }
                record.generation += 1;
                record.env.next_attempt_ms = 0;
                self.publish_ticket(conn, &pool, id, record.generation, record.origin)
                    .await?;
                match self
                    .write_record(conn, &pool, id, &record, None, revision)
                    .await?
                {
                    Some(_) => {
                        flushed.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        tracing::info!(queue_id = %format_id(id), pool = %pool, "replicated spool: flush skips a message whose envelope changed meanwhile");
                    }
                }
            }
            Ok::<(), SpoolError>(())
        };
        match tokio::time::timeout(FLUSH_TIMEOUT, work).await {
            Ok(Ok(())) => Ok(flushed.load(Ordering::Relaxed) as usize),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(unavailable(
                "flushing",
                format!(
                    "{} of {total} flushed within {FLUSH_TIMEOUT:?}",
                    flushed.load(Ordering::Relaxed)
                ),
            )),
        }
    }
}

/// The sub-second nanoseconds of the clock: a cheap source of jitter.
fn now_nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// Runs `op` until it succeeds: a stream whose leader is being elected
/// answers at once with an error, so the write is tried again while the
/// caller's deadline (its `timeout`) lasts.
async fn retrying<T, F, Fut>(what: &str, mut op: F) -> Result<T, SpoolError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SpoolError>>,
{
    let mut pause = Duration::from_millis(25);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                tracing::debug!("replicated spool: {what}: {e}; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(400));
            }
        }
    }
}

/// Publishes `payload` to a stream and waits for its ack; `msg_id` lets
/// the server drop the copy a retry may publish again (and answer with
/// the first copy's sequence, which this returns).
async fn publish_acked(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    payload: Bytes,
) -> Result<u64, SpoolError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    let ack = js
        .publish_with_headers(subject, headers, payload)
        .await
        .map_err(|e| unavailable("publishing", e))?
        .await
        .map_err(|e| unavailable("not acknowledged", e))?;
    Ok(ack.sequence)
}

/// Deletes message `seq` of stream `stream` (without overwriting its
/// bytes: they are gone with their block); one already gone counts as
/// deleted (a retry whose first try got through).
async fn delete_seq(js: &jetstream::Context, stream: &str, seq: u64) -> Result<(), SpoolError> {
    use async_nats::jetstream::response::Response;
    #[derive(Deserialize)]
    struct Deleted {}
    let asked: Result<Response<Deleted>, _> = js
        .request(
            format!("STREAM.MSG.DELETE.{stream}"),
            &serde_json::json!({ "seq": seq, "no_erase": true }),
        )
        .await;
    match asked {
        Ok(Response::Ok(_)) => Ok(()),
        Ok(Response::Err { error })
            if error.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND
                || error.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_DELETE_FAILED =>
        {
            Ok(())
        }
        Ok(Response::Err { error }) => Err(unavailable("deleting a stored message", error)),
        Err(e) => Err(unavailable("deleting a stored message", e)),
    }
}

/// The configured servers with the one leading `bucket`'s stream first,
/// when the client is not on it already and one of them is it (each other
/// server asked its name over a connection of its own, closed at once).
async fn leader_first(
    js: &jetstream::Context,
    client: &async_nats::Client,
    options: &async_nats::ConnectOptions,
    addrs: &[async_nats::ServerAddr],
    bucket: &str,
) -> Option<Vec<async_nats::ServerAddr>> {
    if addrs.len() < 2 {
        return None;
    }
    let mut stream = js.get_stream(format!("KV_{bucket}")).await.ok()?;
    // A bucket made a moment ago (by this relay or one starting beside
    // it) may still be electing its leader.
    let leader = tokio::time::timeout(LEADER_WAIT, async {
        loop {
            let leader = stream
                .info()
                .await
                .ok()
                .and_then(|i| i.cluster.as_ref()?.leader.clone())
                .filter(|l| !l.is_empty());
            if leader.is_some() {
                return leader;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .ok()
    .flatten()?;
    if client.server_info().server_name == leader {
        return None;
    }
    for (i, addr) in addrs.iter().enumerate() {
        let probe = options
            .clone()
            .max_reconnects(Some(0))
            .connect(addr.clone());
        let Ok(Ok(probe)) = tokio::time::timeout(PROBE_TIMEOUT, probe).await else {
            continue;
        };
        let name = probe.server_info().server_name;
        let _ = tokio::time::timeout(PROBE_TIMEOUT, probe.drain()).await;
        if name == leader {
            return Some(leader_first_order(addrs, i));
        }
    }
    None
}

/// `addrs` with the one at `first` moved to the front, the rest in order.
fn leader_first_order(
    addrs: &[async_nats::ServerAddr],
    first: usize,
) -> Vec<async_nats::ServerAddr> {
    let mut ordered = Vec::with_capacity(addrs.len());
    ordered.extend(addrs.get(first).cloned());
    ordered.extend(
        addrs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != first)
            .map(|(_, a)| a.clone()),
    );
    ordered
}

/// The bucket `name`, made when missing. Made as its stream (what
/// async-nats' `create_key_value` makes) because that call first reads the
/// account info in a shape nats-server 2.9 does not send.
async fn ensure_bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let made = js
        .create_stream(stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            storage: stream::StorageType::File,
            allow_rollup: true,
            // Delete markers are removed by sequence once seen.
            deny_delete: false,
            allow_direct: true,
            num_replicas: replicas,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await;
    match js.get_key_value(name).await {
        Ok(store) => Ok(store),
        Err(e) => Err(match made {
            Err(made) => format!("bucket {name}: {made}"),
            Ok(_) => format!("bucket {name}: {e}"),
        }),
    }
}

impl Spool for JetStreamSpool {
    fn append(&self, envelope: Envelope, message: Vec<u8>) -> Durable<QueueId> {
        self.run(self.inner.clone().append(envelope, message))
    }

    fn insert_with_id(
        &self,
        id: QueueId,
        envelope: Envelope,
        message: Vec<u8>,
    ) -> Durable<Inserted> {
        self.run(self.inner.clone().insert(id, envelope, message))
    }

    fn catch_up(&self, timeout: Duration) -> Result<(), SpoolError> {
        let inner = self.inner.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.inner.rt.spawn(async move {
            let _ = tx.send(inner.catch_up().await);
        });
        rx.recv_timeout(timeout).map_err(|_| {
            unavailable(
                "catching up with the JetStream cluster",
                format!("not done within {timeout:?} (is the cluster up?)"),
            )
        })?
    }

    fn update(&self, id: QueueId, old_pool: &str, envelope: Envelope) -> Durable<()> {
        self.run(
            self.inner
                .clone()
                .update(id, old_pool.to_string(), envelope),
        )
    }

    fn remove(&self, id: QueueId, pool: &str) -> Durable<()> {
        self.run(self.inner.clone().remove(id, pool.to_string()))
    }

    fn envelope(&self, id: QueueId, pool: &str) -> Result<Option<Envelope>, SpoolError> {
        if let Some(h) = self
            .inner
            .in_hand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .filter(|h| h.pool == pool)
        {
            return Ok(Some(h.record.env.clone()));
        }
        match self.inner.cached(pool, id) {
            None => Ok(None),
            Some(Cached { record: Ok(r), .. }) => Ok(Some(r.env)),
            Some(Cached {
                record: Err(reason),
                ..
            }) => Err(corrupt(id, &reason)),
        }
    }

    fn body(&self, id: QueueId) -> Result<Option<Body>, SpoolError> {
        if let Some(h) = self
            .inner
            .in_hand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Ok(Some(h.body.clone()));
        }
        let found = {
            let cache = self.inner.cache.read().unwrap_or_else(|e| e.into_inner());
            match cache
                .iter()
                .find_map(|(pool, p)| p.get(&id).map(|c| (pool, c)))
            {
                None => None,
                Some((pool, Cached { record: Ok(r), .. })) => Some((pool.clone(), r.clone())),
                Some((
                    _,
                    Cached {
                        record: Err(reason),
                        ..
                    },
                )) => return Err(corrupt(id, reason)),
            }
        };
        let Some((pool, record)) = found else {
            return Ok(None);
        };
        let inner = self.inner.clone();
        self.block(async move {
            let conn = inner.conn()?;
            inner.body_of(conn, &pool, id, &record).await
        })
        .map(Some)
    }

    fn recover(&self, _visit: &mut dyn FnMut(QueueId, Envelope)) -> Result<(), SpoolError> {
        // The cluster hands messages out by ticket; nothing to scan.
        Ok(())
    }

    fn opened_bound(&self) -> QueueId {
        0
    }

    fn count(&self, pool: &str) -> Result<usize, SpoolError> {
        Ok(self
            .inner
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pool)
            .map_or(0, BTreeMap::len))
    }

    fn pools(&self) -> Vec<String> {
        let mut pools: BTreeSet<String> = self
            .inner
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        pools.extend(
            self.inner
                .wanted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        pools.into_iter().collect()
    }

    fn prepare_pool(&self, pool: &str) -> Result<(), SpoolError> {
        self.inner
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pool.to_string());
        if self.inner.conn.get().is_some() {
            let inner = self.inner.clone();
            let pool = pool.to_string();
            self.inner.rt.spawn(async move {
                if let Ok(conn) = inner.conn()
                    && let Err(e) = inner.consumer_in(conn, &pool).await
                {
                    tracing::warn!(pool = %pool, "replicated spool: cannot make the pool's ticket stream now: {e}; made with its first message");
                }
            });
        }
        Ok(())
    }

    fn list(
        &self,
        pool: &str,
        after: Option<QueueId>,
        limit: usize,
    ) -> Result<Vec<Listed>, SpoolError> {
        let cache = self.inner.cache.read().unwrap_or_else(|e| e.into_inner());
        let Some(p) = cache.get(pool) else {
            return Ok(Vec::new());
        };
        let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        Ok(p.range((start, std::ops::Bound::Unbounded))
            .take(limit)
            .map(|(id, c)| {
                let env = c
                    .record
                    .as_ref()
                    .map(|r| r.env.clone())
                    .map_err(|reason| corrupt(*id, reason));
                (*id, env)
            })
            .collect())
    }

    fn find(&self, id: QueueId) -> Result<Option<Envelope>, SpoolError> {
        let cache = self.inner.cache.read().unwrap_or_else(|e| e.into_inner());
        match cache.values().find_map(|p| p.get(&id)) {
            None => Ok(None),
            Some(Cached { record: Ok(r), .. }) => Ok(Some(r.env.clone())),
            Some(Cached {
                record: Err(reason),
                ..
            }) => Err(corrupt(id, reason)),
        }
    }

    fn is_writable(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
            && self.inner.conn.get().is_some_and(|c| {
                c.client.connection_state() == async_nats::connection::State::Connected
            })
    }

    fn is_failed(&self) -> bool {
        // Outcomes wait in the worker until the cluster answers again.
        false
    }

    fn set_held(&self, pool: &str, held: bool) -> Durable<()> {
        let inner = self.inner.clone();
        let pool = pool.to_string();
        self.run(async move {
            let conn = inner.conn()?;
            if held {
                conn.held
                    .put(pool.as_str(), Bytes::from_static(b"1"))
                    .await
                    .map_err(|e| unavailable("recording a hold", e))?;
            } else {
                conn.held
                    .delete(pool.as_str())
                    .await
                    .map_err(|e| unavailable("recording a release", e))?;
            }
            inner.held_tx.send_if_modified(|set| {
                if held {
                    set.insert(pool.clone())
                } else {
                    set.remove(&pool)
                }
            });
            Ok(())
        })
    }

    fn held_pools(&self) -> Result<Vec<String>, SpoolError> {
        Ok(self.inner.held_tx.borrow().iter().cloned().collect())
    }

    fn shared(&self) -> Option<&dyn SharedQueue> {
        Some(self)
    }
}

impl SharedQueue for JetStreamSpool {
    fn take(&self, pool: &str, max: usize, wait: Duration) -> Durable<Vec<(QueueId, Envelope)>> {
        self.run(self.inner.clone().take(pool.to_string(), max, wait))
    }

    fn counts(&self, pool: &str, now_ms: u64) -> ClusterCounts {
        // A scan of the pool's envelopes: at most one per pool and
        // second, however often `/metrics` or the API is asked.
        let mut counted = self.inner.counted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, counts)) = counted.get(pool)
            && now_ms.wrapping_sub(*at) < COUNTS_FOR_MS
        {
            return *counts;
        }
        let counts = self.inner.count_now(pool, now_ms);
        counted.insert(pool.to_string(), (now_ms, counts));
        counts
    }

    fn held_tickets(&self, pool: &str) -> usize {
        self.inner
            .in_hand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|h| h.pool == pool)
            .count()
    }

    fn bodies_full(&self) -> bool {
        let refused = self.inner.refused_size.load(Ordering::Relaxed);
        refused > 0
            && self.inner.bytes_in_hand().saturating_add(refused)
                > self.inner.opts.max_bodies_in_hand
    }

    fn holds(&self, id: QueueId) -> bool {
        self.inner
            .in_hand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .is_some_and(|h| h.live(Instant::now()))
    }

    fn hand_back(&self, id: QueueId, pool: &str, due_ms: u64) {
        let Some(held) = self.inner.release(id, pool) else {
            return;
        };
        let now = now_ms();
        let delay = (due_ms > now).then(|| Duration::from_millis(due_ms - now));
        self.inner.rt.spawn(async move {
            if let Err(e) = held.msg.ack_with(AckKind::Nak(delay)).await {
                tracing::warn!(queue_id = %format_id(id), "replicated spool: cannot hand a ticket back: {e}; it comes back when its hold lapses");
            }
        });
    }

    fn hand_back_all(&self) -> Durable<()> {
        let held: Vec<InHand> = self
            .inner
            .in_hand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, h)| h)
            .collect();
        self.run(async move {
            for h in held {
                let _ = h.msg.ack_with(AckKind::Nak(None)).await;
            }
            Ok(())
        })
    }

    fn flush(&self, pool: &str, only: Option<QueueId>) -> Durable<usize> {
        self.run(self.inner.clone().flush(pool.to_string(), only))
    }

    fn held_watch(&self) -> watch::Receiver<BTreeSet<String>> {
        self.inner.held_tx.subscribe()
    }

    fn released_watch(&self) -> watch::Receiver<u64> {
        self.inner.released_tx.subscribe()
    }

    fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    fn announce(&self, pools: Vec<String>) -> Durable<Vec<Vec<String>>> {
        let inner = self.inner.clone();
        self.run(async move {
            let conn = inner.conn()?;
            crate::nodes::announce(&conn.nodes, &inner.node_id, &pools, inner.id_tag_bits())
                .await
                .map_err(SpoolError::Unavailable)
        })
    }

    fn withdraw(&self) -> Durable<()> {
        let inner = self.inner.clone();
        self.run(async move {
            let conn = inner.conn()?;
            crate::nodes::withdraw(&conn.nodes, &inner.node_id)
                .await
                .map_err(SpoolError::Unavailable)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Recipient;

    fn record(generation: u64, next_attempt_ms: u64) -> Record {
        let mut env = Envelope::new(
            "A",
            "s@x.test",
            vec![Recipient::pending("r@y.test")],
            1,
            "l",
            "c",
        );
        env.next_attempt_ms = next_attempt_ms;
        Record {
            env,
            generation,
            chunks: 1,
            origin: 7,
            body_seqs: vec![11],
            inline: false,
        }
    }

    #[test]
    fn a_ticket_is_due_stale_or_handed_back_with_the_time_left() {
        let t = |generation| Ticket {
            id: 1,
            generation,
            origin: 7,
        };
        assert_eq!(verdict(&t(0), None, 1_000, 1, false), Verdict::Stale);
        // An append's ticket fetched before its record is written: back
        // soon while the append may still be under way; a flush's never.
        assert_eq!(
            verdict(&t(0), None, 1_000, 1, true),
            Verdict::Later(UNBORN_RETRY)
        );
        assert_eq!(verdict(&t(1), None, 1_000, 1, true), Verdict::Stale);
        // A ticket published for an id another relay's message holds.
        let foreign = Ticket {
            id: 1,
            generation: 0,
            origin: 8,
        };
        assert_eq!(
            verdict(&foreign, Some(record(0, 0)), 1_000, 1, true),
            Verdict::Stale
        );
        let any = Ticket {
            id: 1,
            generation: 0,
            origin: 0,
        };
        assert_eq!(
            verdict(&any, Some(record(0, 0)), 1_000, 1, false),
            Verdict::Due(Box::new(record(0, 0)))
        );
        assert_eq!(
            verdict(&t(0), Some(record(1, 0)), 1_000, 1, false),
            Verdict::Stale
        );
        assert_eq!(
            verdict(&t(1), Some(record(1, 0)), 1_000, 1, false),
            Verdict::Due(Box::new(record(1, 0)))
        );
        assert_eq!(
            verdict(&t(0), Some(record(0, 61_000)), 1_000, 1, false),
            Verdict::Later(Duration::from_secs(60))
        );
        // A flush's ticket ahead of its record: back soon, to see the
        // record's write; after a few tries, as its record says.
        assert_eq!(
            verdict(&t(1), Some(record(0, 61_000)), 1_000, 1, false),
            Verdict::Later(Duration::from_secs(1))
        );
        assert_eq!(
            verdict(
                &t(1),
                Some(record(0, 61_000)),
                1_000,
                AHEAD_DELIVERIES,
                false
            ),
            Verdict::Later(Duration::from_secs(60))
        );
        // Due within the slack: taken now rather than naked for a few ms.
        assert_eq!(
            verdict(&t(0), Some(record(0, 1_020)), 1_000, 1, false),
            Verdict::Due(Box::new(record(0, 1_020)))
        );
    }

    #[test]
    fn a_write_over_a_changed_record_applies_only_when_no_recipient_was_decided_elsewhere() {
        let held = record(1, 0);
        let mut ours = held.env.clone();
        ours.attempts = 1;
        ours.next_attempt_ms = 9_000;
        // A flush since: generation 2, due now; the deferral still applies,
        // under the flush's generation (its ticket stays the live one).
        let flushed = record(2, 0);
        assert_eq!(
            rebase(&held, &ours, &flushed),
            Some(Record {
                env: ours.clone(),
                generation: 2,
                chunks: 1,
                origin: 7,
                body_seqs: vec![11],
                inline: false,
            })
        );
        // Another relay delivered the recipient: ours is dropped.
        let mut delivered = record(1, 0);
        delivered.env.recipients[0].state = crate::RecipientState::Delivered;
        assert_eq!(rebase(&held, &ours, &delivered), None);
    }

    #[test]
    fn the_leaders_address_goes_first_and_the_others_keep_their_order() {
        let addrs: Vec<async_nats::ServerAddr> = ["nats://a:1", "nats://b:2", "nats://c:3"]
            .iter()
            .map(|a| a.parse().expect("a valid address"))
            .collect();
        let hosts = |v: Vec<async_nats::ServerAddr>| -> Vec<String> {
            v.iter().map(|a| a.host().to_string()).collect()
        };
        assert_eq!(hosts(leader_first_order(&addrs, 2)), ["c", "a", "b"]);
        assert_eq!(hosts(leader_first_order(&addrs, 0)), ["a", "b", "c"]);
        assert_eq!(hosts(leader_first_order(&addrs, 1)), ["b", "a", "c"]);
    }

    #[test]
    fn records_round_trip_and_older_ones_without_a_generation_or_origin_load() {
        let r = record(3, 5);
        let text = serde_json::to_vec(&r).expect("encode");
        assert_eq!(serde_json::from_slice::<Record>(&text).expect("decode"), r);
        let mut value: serde_json::Value = serde_json::from_slice(&text).expect("json");
        let fields = value.as_object_mut().expect("object");
        fields.remove("generation");
        fields.remove("origin");
        fields.remove("body_seqs");
        let old: Record = serde_json::from_value(value).expect("decode without them");
        assert_eq!((old.generation, old.origin), (0, 0));
        assert!(old.body_seqs.is_empty());
        assert!(!old.inline);
    }

    #[test]
    fn an_inline_body_follows_its_record_and_is_never_written_without_it() {
        let mut r = record(0, 0);
        r.inline = true;
        r.chunks = 0;
        r.body_seqs.clear();
        // Bodies are bytes: NULs and all.
        let body = b"Subject: x\r\n\r\n\0 binary \0\r\n".to_vec();
        let value = encode_value(&r, Some(&body)).expect("encode");
        let (back, stored) = decode_value(&value).expect("decode");
        assert_eq!(back, r);
        assert_eq!(stored, Some(body.as_slice()));
        // Written without its body, the message would be lost: refused.
        assert!(encode_value(&r, None).is_err());
        // A record whose body is in P_bodies carries nothing after it.
        let plain = record(0, 0);
        let value = encode_value(&plain, Some(&body)).expect("encode");
        assert_eq!(decode_value(&value).expect("decode"), (plain, None));
        // A value that says one thing and holds another is corrupt.
        let mut lying = serde_json::to_vec(&r).expect("json");
        assert!(decode_value(&lying).is_err());
        lying = serde_json::to_vec(&record(0, 0)).expect("json");
        lying.extend_from_slice(b"\0stray");
        assert!(decode_value(&lying).is_err());
    }
}
