//! The in-memory index of the spool: per pool, which messages are ready
//! (highest MT-PRIORITY first, then oldest), which are deferred until
//! when, and whether the pool is held.
//!
//! Cost: about 40 bytes per queued message (an id in a `BTreeSet` or a
//! `(due, id, mt_priority)` in an ordered set); envelopes and bodies stay on disk. One mutex
//! guards the index; it is held only for set operations, never across I/O.
//!
//! The index is bounded: a pool keeps at most about a window
//! ([`DEFAULT_WINDOW`] ids) of ready mail in memory; the rest is its
//! backlog, id ranges whose mail is in the spool only, which the backlog
//! stream reads in key order (oldest first) once workers took half of the
//! window. A backlog comes from a restart (everything queued, read while
//! the relay already runs: [`Scheduler::begin_recovery`]) or from new mail
//! appended while the window was full (a spill: [`Scheduler::begin_append`]).
//! So ten million queued cost a window per pool in memory. The index
//! remembers how far the stream got in each pool, so an operator's move on
//! a message the stream has not reached yet applies to it (see
//! [`Scheduler::forget`], [`Scheduler::flush`]) and the stream does not
//! bring it back. Counts add the mail in backlogs (an estimate from the
//! spool after a restart, kept up to date as the stream, appends and the
//! operator change it).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use poolrelay_spool::{Deferred, QueueId, now_ms};
use tokio::sync::Notify;

/// A message handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Its queue id.
    pub id: QueueId,
    /// Its pool.
    pub pool: String,
    /// Its MT-PRIORITY (0 when it has none), kept so that putting it back
    /// needs no read of the envelope.
    pub mt_priority: i8,
}

/// The ready messages of one pool: a FIFO lane per MT-PRIORITY value, so
/// the next message is the oldest of the highest non-empty lane. Nearly
/// all mail has one priority, so there is usually a single lane and the
/// cost is that of one ordered set.
#[derive(Default)]
struct Ready {
    lanes: BTreeMap<i8, BTreeSet<QueueId>>,
    len: usize,
}

impl Ready {
    fn insert(&mut self, mt_priority: i8, id: QueueId) {
        if self.lanes.entry(mt_priority).or_default().insert(id) {
            self.len += 1;
        }
    }

    /// Removes `id` from whichever lane holds it (at most 19 lanes; for
    /// the operator's moves, where the priority is not at hand).
    fn remove(&mut self, id: QueueId) -> bool {
        let lane = self
            .lanes
            .iter()
            .find_map(|(p, ids)| ids.contains(&id).then_some(*p));
        lane.is_some_and(|p| self.remove_from(p, id))
    }

    /// Removes `id` from the lane of `mt_priority`.
    fn remove_from(&mut self, mt_priority: i8, id: QueueId) -> bool {
        let Some(ids) = self.lanes.get_mut(&mt_priority) else {
            return false;
        };
        if !ids.remove(&id) {
            return false;
        }
        if ids.is_empty() {
            self.lanes.remove(&mt_priority);
        }
        self.len -= 1;
        true
    }

    /// The message to deliver next and its MT-PRIORITY.
    fn next(&self) -> Option<(QueueId, i8)> {
        let (p, ids) = self.lanes.iter().next_back()?;
        ids.first().map(|id| (*id, *p))
    }

    /// The oldest ready message, whatever its priority.
    fn oldest(&self) -> Option<QueueId> {
        self.lanes
            .values()
            .filter_map(|ids| ids.first())
            .min()
            .copied()
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

struct PoolQueue {
    ready: Ready,
    /// By due time, then id (then MT-PRIORITY, carried to its ready lane):
    /// the earliest first, and a message whose due time is known is found
    /// without a scan.
    deferred: BTreeSet<(u64, QueueId, i8)>,
    /// The oldest deferred id, kept up to date on insert and recomputed
    /// (one pass) only after it left: `None` while unknown.
    oldest_deferred: Option<Option<QueueId>>,
    in_flight: usize,
    held: bool,
    /// The highest id of this pool the index has held or the stream
    /// passed: a backlog starts above it, so the stream never brings back
    /// what the index already had.
    known_to: QueueId,
    /// Once the deferred set held a window (and the spool has a due
    /// index): every deferred message of the pool at or after this (due
    /// time, id) is in the spool's due index only, not here.
    disk_from: Option<(u64, QueueId)>,
    /// How many deferred messages are in the due index only (counted).
    disk_deferred: u64,
    /// Ids in memory whose due key may still be at or after `disk_from`
    /// (deferred while the due stream read, or taken by the operator from
    /// the due index): the due stream skips them.
    due_skip: HashSet<QueueId>,
    /// The due stream is reading this pool's due index now.
    due_reading: bool,
    /// Flushed while mail waited in the due index: keys up to this one
    /// come back ready.
    due_flushed_to: Option<(u64, QueueId)>,
    /// Deferred ids put here at a time the spool does not have (its write
    /// failed, or an operator's put-back): never moved to the due index.
    unrecorded: HashSet<QueueId>,
    /// Messages finished per second over the last minute, as a ring indexed by second.
    recent: [u32; 60],
    /// The Unix second each ring slot was last written in.
    recent_at: [u64; 60],
}

impl Default for PoolQueue {
    fn default() -> Self {
        PoolQueue {
            ready: Ready::default(),
            deferred: BTreeSet::new(),
            oldest_deferred: Some(None),
            in_flight: 0,
            held: false,
            known_to: 0,
            disk_from: None,
            disk_deferred: 0,
            due_skip: HashSet::new(),
            due_reading: false,
            due_flushed_to: None,
            unrecorded: HashSet::new(),
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
        while let Some(&(due, id, mt_priority)) = self.deferred.first() {
            if due > now {
                break;
            }
            self.deferred.pop_first();
            self.left_deferred(id);
            self.ready.insert(mt_priority, id);
        }
    }

    /// Defers a message until `due`.
    fn defer(&mut self, due: u64, id: QueueId, mt_priority: i8) {
        self.deferred.insert((due, id, mt_priority));
        if let Some(oldest) = self.oldest_deferred.as_mut() {
            *oldest = Some(oldest.map_or(id, |o| o.min(id)));
        }
    }

    fn left_deferred(&mut self, id: QueueId) {
        if self.oldest_deferred == Some(Some(id)) {
            self.oldest_deferred = None;
        }
    }

    /// Takes `id` out of the deferred set: found at once when `due` is the
    /// time it was deferred until, else by a scan when `scan` allows it.
    fn undefer(&mut self, id: QueueId, due: Option<u64>, scan: bool) -> bool {
        let known = due.and_then(|due| {
            self.deferred
                .range((due, id, i8::MIN)..=(due, id, i8::MAX))
                .next()
                .copied()
        });
        let found = match known {
            Some(entry) => self.deferred.remove(&entry),
            None if !scan => false,
            None => {
                let before = self.deferred.len();
                self.deferred.retain(|&(_, i, _)| i != id);
                self.deferred.len() != before
            }
        };
        if found {
            self.left_deferred(id);
        }
        found
    }

    /// The oldest deferred id (one pass over the deferred set only when
    /// the previous oldest left it since the last call).
    fn oldest_deferred(&mut self) -> Option<QueueId> {
        if self.oldest_deferred.is_none() {
            self.oldest_deferred = Some(self.deferred.iter().map(|&(_, id, _)| id).min());
        }
        self.oldest_deferred.flatten()
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

/// Ready ids kept in memory per pool while mail of it waits on disk (the
/// recovery after a start, or a spill): about 4 MB of index per pool at
/// most, ten seconds of delivery at the measured drain rate.
pub const DEFAULT_WINDOW: usize = 100_000;

/// A pool's mail that is in the spool but not in the index: the backlog
/// stream reads it in key order (oldest first) as the window empties.
#[derive(Default)]
struct Backlog {
    /// Id ranges `(after, to]` whose mail of this pool is on disk only,
    /// oldest first; the stream reads the first. Only the last one grows
    /// (a spilled append extends it), so they stay ordered and disjoint.
    ranges: VecDeque<(QueueId, QueueId)>,
    /// The last id the stream handed over or passed in the first range.
    cursor: QueueId,
    /// About how many messages the ranges still hold (an estimate from the
    /// spool at a start, exact for spilled appends); counts add it.
    unread: u64,
    /// The window filled: the stream reads on only once the ready lanes
    /// are down to half of it.
    paused: bool,
    /// Flushed while it waited on disk: what the stream still brings is
    /// ready now.
    flushed: bool,
}

impl Backlog {
    /// Whether the stream has still to reach `id` in this pool.
    fn ahead(&self, id: QueueId) -> bool {
        self.ranges
            .iter()
            .any(|&(after, to)| id > after.max(self.cursor) && id <= to)
    }

    /// Whether `id` lies in one of the ranges, read already or not.
    fn covers(&self, id: QueueId) -> bool {
        self.ranges
            .iter()
            .any(|&(after, to)| id > after && id <= to)
    }
}

/// A range the stream finished, kept while an append that began before
/// it ended is still in progress: such an append's id may lie in it, and
/// then the stream handed it over already (see [`Scheduler::appended`]).
struct Closed {
    after: QueueId,
    to: QueueId,
    /// The append epoch the range closed in.
    epoch: u64,
}

/// The index and the backlogs the stream still has to read.
struct Index {
    pools: HashMap<String, PoolQueue>,
    /// Per pool, the mail on disk and not in the index. Empty in a relay
    /// whose queue fits the window.
    backlogs: HashMap<String, Backlog>,
    /// Ids the operator took (deleted, moved, bounced, flushed), or put in
    /// the index, before the stream reached them: the stream skips them, in
    /// any pool. Dropped when no backlog is left.
    claimed: HashSet<QueueId>,
    /// Ranges the stream finished, per pool, while appends that began
    /// before may still name ids in them.
    closed: HashMap<String, Vec<Closed>>,
    /// Appends in progress by the epoch they began in (the epoch steps on
    /// each time a range closes).
    appending: BTreeMap<u64, usize>,
    epoch: u64,
    /// Ready ids (and deferred ones, when `due_index`) per pool in memory.
    window: usize,
    /// The spool finds deferred mail by due time: deferred mail past the
    /// window may wait there only.
    due_index: bool,
}

impl Index {
    fn new(window: usize) -> Index {
        Index {
            pools: HashMap::new(),
            backlogs: HashMap::new(),
            claimed: HashSet::new(),
            closed: HashMap::new(),
            appending: BTreeMap::new(),
            epoch: 0,
            window,
            due_index: false,
        }
    }

    /// Inserts `id` into `pool`'s ready lanes or deferred set. A deferral
    /// the spool `recorded` at `due_ms` (so its due index has it there)
    /// stays on disk only when it is not among the pool's earliest
    /// window of deferred mail.
    fn insert(&mut self, id: QueueId, pool: &str, due_ms: u64, mt_priority: i8, recorded: bool) {
        let (window, due_index) = (self.window, self.due_index);
        let q = self.pools.entry(pool.to_string()).or_default();
        q.known_to = q.known_to.max(id);
        if due_ms <= now_ms() {
            q.ready.insert(mt_priority, id);
            return;
        }
        if due_index && !recorded {
            q.unrecorded.insert(id);
        }
        if due_index && recorded {
            q.unrecorded.remove(&id);
            let key = (due_ms, id);
            if q.disk_from.is_some_and(|from| key >= from) {
                if !q.due_reading {
                    // A skip left from an earlier key of it must not hide this one.
                    q.due_skip.remove(&id);
                    q.disk_deferred += 1;
                    return;
                }
                // The due stream may be bringing it too: it skips it.
                q.due_skip.insert(id);
            } else if !q.due_reading && q.deferred.len() >= window {
                // The window is full: the latest of it and this one waits
                // on disk, unless that is one the spool does not have there.
                match q.deferred.last().copied() {
                    Some((d, i, _)) if (d, i) < key => {
                        q.due_skip.remove(&id);
                        q.disk_from = Some(key);
                        q.disk_deferred += 1;
                        return;
                    }
                    Some((d, i, p)) if !q.unrecorded.contains(&i) => {
                        q.deferred.remove(&(d, i, p));
                        q.left_deferred(i);
                        // It may be one deferred while the stream read,
                        // already past `disk_from`: that stays where it is.
                        q.due_skip.remove(&i);
                        q.disk_from = Some(q.disk_from.map_or((d, i), |f| f.min((d, i))));
                        q.disk_deferred += 1;
                    }
                    _ => {}
                }
            }
        }
        q.defer(due_ms, id, mt_priority);
    }

    /// The stream reached `id` of `pool` (handed over, skipped or left).
    fn passed(&mut self, id: QueueId, pool: &str) {
        if let Some(b) = self.backlogs.get_mut(pool) {
            b.cursor = b.cursor.max(id);
        }
        let q = self.pools.entry(pool.to_string()).or_default();
        q.known_to = q.known_to.max(id);
    }

    /// Whether the stream may hand over `id` of `pool`: it is ahead and the
    /// operator did not take it. Moves the cursor and the unread count.
    fn take_from_backlog(&mut self, id: QueueId, pool: &str) -> bool {
        let ahead = self.backlogs.get(pool).is_some_and(|b| b.ahead(id));
        self.passed(id, pool);
        if !ahead || self.claimed.contains(&id) {
            return false;
        }
        if let Some(b) = self.backlogs.get_mut(pool) {
            b.unread = b.unread.saturating_sub(1);
        }
        true
    }

    /// Drops what only an open backlog needs.
    fn backlog_ended(&mut self, pool: &str) {
        self.backlogs.remove(pool);
        if self.backlogs.is_empty() {
            self.claimed = HashSet::new();
        }
    }
}

/// An append in progress, from before its write to its scheduling
/// ([`Scheduler::begin_append`]); dropped unscheduled (a failed write, a
/// dropped session) it only ends.
pub struct Appending {
    scheduler: Arc<Scheduler>,
    epoch: u64,
    ended: bool,
}

impl Appending {
    /// The write is durable: schedule the message (in memory, or left on
    /// disk for the backlog stream when its pool has a backlog or a full window).
    pub fn appended(mut self, id: QueueId, pool: &str, due_ms: u64, mt_priority: i8) {
        self.ended = true;
        self.scheduler
            .appended(self.epoch, id, pool, due_ms, mt_priority);
    }
}

impl Drop for Appending {
    fn drop(&mut self) {
        if !self.ended {
            self.scheduler
                .with_index(|index| end_append(index, self.epoch));
        }
    }
}

fn end_append(index: &mut Index, epoch: u64) {
    if let Some(n) = index.appending.get_mut(&epoch) {
        *n -= 1;
        if *n == 0 {
            index.appending.remove(&epoch);
        }
    }
}

/// The scheduler shared by the listeners (which add mail) and the workers (which take it).
pub struct Scheduler {
    index: Mutex<Index>,
    wake: Notify,
    /// Signalled when a paused pool's window has room again (the stream waits on it).
    room: Notify,
    /// Ready ids per pool kept in memory while the pool has a backlog.
    window: usize,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler::with_window(DEFAULT_WINDOW)
    }
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new() -> Scheduler {
        Scheduler::default()
    }

    /// An empty scheduler that keeps at most about `window` ready ids per
    /// pool in memory (at least 1); the rest waits on disk.
    pub fn with_window(window: usize) -> Scheduler {
        let window = window.max(1);
        Scheduler {
            index: Mutex::new(Index::new(window)),
            wake: Notify::new(),
            room: Notify::new(),
            window,
        }
    }

    /// Lets deferred mail past the window wait in the spool's due index
    /// only (when the spool has one: [`poolrelay_spool::Spool::has_due_index`]).
    pub fn with_due_index(self, due_index: bool) -> Scheduler {
        self.with_index(|index| index.due_index = due_index);
        self
    }

    /// Ready ids per pool the index keeps in memory.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Notified when a pool's window has room again, for the stream.
    pub(crate) fn room(&self) -> &Notify {
        &self.room
    }

    /// Whether the stream may read more of `pool` now: its ready lanes are
    /// below the window, and, once it filled, down to half of it again.
    pub fn has_room(&self, pool: &str) -> bool {
        let window = self.window;
        self.with_index(|index| {
            let ready = index.pools.get(pool).map_or(0, |q| q.ready.len());
            let Some(b) = index.backlogs.get_mut(pool) else {
                return true;
            };
            if b.paused {
                if ready > window / 2 {
                    return false;
                }
                b.paused = false;
                true
            } else if ready >= window {
                b.paused = true;
                false
            } else {
                true
            }
        })
    }

    /// Ready ids of `pool` held in memory (the window, plus what was
    /// enqueued besides the stream).
    #[cfg(test)]
    pub(crate) fn in_memory(&self, pool: &str) -> usize {
        self.with(|pools| pools.get(pool).map_or(0, |q| q.ready.len()))
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, PoolQueue>) -> T) -> T {
        self.with_index(|index| f(&mut index.pools))
    }

    fn with_index<T>(&self, f: impl FnOnce(&mut Index) -> T) -> T {
        // A poisoned lock only means a panic elsewhere; the sets are still consistent.
        let mut guard = self.index.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Starts a recovery: the spool held ids up to `bound` when it was
    /// opened, about `estimate` of them in each pool. Each pool gets a
    /// backlog of everything up to the bound; ids above it are new mail.
    pub fn begin_recovery(&self, bound: QueueId, pools: &[(String, u64)]) {
        self.with_index(|index| {
            for (pool, estimate) in pools {
                let b = index.backlogs.entry(pool.clone()).or_default();
                b.ranges.push_front((0, bound));
                b.unread += estimate;
            }
        });
    }

    /// Pools with mail the stream has still to read, in no order.
    pub fn backlog_pools(&self) -> Vec<String> {
        self.with_index(|index| index.backlogs.keys().cloned().collect())
    }

    /// Where the stream reads `pool` next: after the first id, up to the
    /// second (included). `None` when the pool has no backlog.
    pub fn next_read(&self, pool: &str) -> Option<(QueueId, QueueId)> {
        self.with_index(|index| {
            let b = index.backlogs.get(pool)?;
            let &(after, to) = b.ranges.front()?;
            Some((after.max(b.cursor), to))
        })
    }

    /// The stream read the first range of `pool`, which ended at `to` when
    /// it began reading, to its end: closes it unless an append extended
    /// it meanwhile (then false: read on). True when the pool's backlog ended.
    pub fn finish_range(&self, pool: &str, to: QueueId) -> bool {
        self.with_index(|index| {
            let Some(b) = index.backlogs.get_mut(pool) else {
                return true;
            };
            match b.ranges.front() {
                Some(&(after, end)) if end == to => {
                    b.ranges.pop_front();
                    b.cursor = b.cursor.max(to);
                    let epoch = index.epoch;
                    index.epoch += 1;
                    index
                        .closed
                        .entry(pool.to_string())
                        .or_default()
                        .push(Closed { after, to, epoch });
                    let q = index.pools.entry(pool.to_string()).or_default();
                    q.known_to = q.known_to.max(to);
                }
                Some(_) => return false,
                None => {}
            }
            let ended = index.backlogs.get(pool).is_none_or(|b| b.ranges.is_empty());
            if ended {
                index.backlog_ended(pool);
            }
            ended
        })
    }

    /// The stream hands over a message it read from the spool: scheduled
    /// at `due_ms` unless the operator took it meanwhile (then false).
    pub fn recovered(&self, id: QueueId, pool: &str, due_ms: u64, mt_priority: i8) -> bool {
        let scheduled = self.with_index(|index| {
            if !index.take_from_backlog(id, pool) {
                return false;
            }
            let flushed = index.backlogs.get(pool).is_some_and(|b| b.flushed);
            // Its due time is the envelope's, which the due index has.
            index.insert(
                id,
                pool,
                if flushed { 0 } else { due_ms },
                mt_priority,
                !flushed,
            );
            true
        });
        if scheduled {
            self.wake.notify_waiters();
        }
        scheduled
    }

    /// The stream read a message whose recipients are all done: true when
    /// it may remove it (the operator did not take it meanwhile).
    pub fn recovered_done(&self, id: QueueId, pool: &str) -> bool {
        self.with_index(|index| index.take_from_backlog(id, pool))
    }

    /// The stream read a record it cannot decode and leaves it on disk.
    pub fn passed(&self, id: QueueId, pool: &str) {
        self.with_index(|index| index.passed(id, pool));
    }

    /// Whether mail waits on disk for the stream (after a start, or spilled).
    pub fn recovering(&self) -> bool {
        self.with_index(|index| !index.backlogs.is_empty())
    }

    /// Messages on disk the stream has still to read (an estimate), 0 when
    /// every queued message is in the index.
    pub fn recovery_remaining(&self) -> u64 {
        self.with_index(|index| {
            index.backlogs.values().map(|b| b.unread).sum::<u64>()
                + index.pools.values().map(|q| q.disk_deferred).sum::<u64>()
        })
    }

    /// An append is about to write: call before the write, then
    /// [`Appending::appended`] once it is durable.
    pub fn begin_append(self: &Arc<Self>) -> Appending {
        let epoch = self.with_index(|index| {
            let epoch = index.epoch;
            *index.appending.entry(epoch).or_default() += 1;
            epoch
        });
        Appending {
            scheduler: self.clone(),
            epoch,
            ended: false,
        }
    }

    /// Schedules a new message, durable as `id`, whose append began in
    /// `epoch`. Into the index while its pool's ready lanes have room and
    /// nothing of the pool waits on disk; else it is left on disk for the
    /// stream, behind the older mail there (a spill), so memory holds a
    /// window per pool however fast mail comes in.
    ///
    /// Ids are made durable in order but scheduled in any order: an id in
    /// a range the stream reads, or closed since this append began, is the
    /// stream's (it was on disk before the range's last id); one below the
    /// ids the index already knows goes to memory even past the window.
    fn appended(&self, epoch: u64, id: QueueId, pool: &str, due_ms: u64, mt_priority: i8) {
        let window = self.window;
        let in_memory = self.with_index(|index| {
            end_append(index, epoch);
            let oldest_appending = index.appending.keys().next().copied();
            if let Some(closed) = index.closed.get_mut(pool) {
                let in_closed = closed.iter().any(|c| id > c.after && id <= c.to);
                closed.retain(|c| oldest_appending.is_some_and(|e| e <= c.epoch));
                if closed.is_empty() {
                    index.closed.remove(pool);
                }
                if in_closed {
                    return false;
                }
            }
            if let Some(b) = index.backlogs.get_mut(pool)
                && b.covers(id)
            {
                if b.ahead(id) {
                    b.unread += 1;
                }
                return false;
            }
            if mt_priority > 0 {
                // MT-PRIORITY above normal is not made to wait behind the
                // pool's older mail on disk: into memory, past the window
                // (a backlog then goes on above it).
                index.insert(id, pool, due_ms, mt_priority, true);
                return true;
            }
            // Behind an open backlog, or past a full window: on disk,
            // above every id the index knows.
            let (known_to, ready) = index
                .pools
                .get(pool)
                .map_or((0, 0), |q| (q.known_to, q.ready.len()));
            let backlog = index.backlogs.get(pool);
            let floor = backlog.map_or(known_to, |b| known_to.max(b.cursor));
            if (backlog.is_some() || ready >= window) && id > floor {
                let b = index
                    .backlogs
                    .entry(pool.to_string())
                    .or_insert_with(|| Backlog {
                        cursor: known_to,
                        paused: true,
                        ..Backlog::default()
                    });
                match b.ranges.back_mut() {
                    Some(last) if last.1 >= floor => last.1 = last.1.max(id),
                    _ => b.ranges.push_back((floor, id)),
                }
                b.unread += 1;
                return false;
            }
            index.insert(id, pool, due_ms, mt_priority, true);
            true
        });
        if in_memory {
            self.wake.notify_waiters();
        }
    }

    /// Adds a message the index already knew (an operator's put-back, a
    /// retry the spool could not record), ready at `due_ms` (0 or past =
    /// now): always into memory. Within its pool, ready messages of a
    /// higher `mt_priority` go first (give 0 for a message without
    /// MT-PRIORITY), then the oldest. New mail goes through
    /// [`Scheduler::begin_append`], a recorded retry through
    /// [`Scheduler::retry_recorded`].
    pub fn enqueue(&self, id: QueueId, pool: &str, due_ms: u64, mt_priority: i8) {
        self.put(id, pool, due_ms, mt_priority, false);
    }

    /// A retry the spool recorded at `due_ms` (its envelope or attempt
    /// record, and so its due index, say so): like [`Scheduler::enqueue`],
    /// except that deferred mail past the pool's earliest window waits in
    /// the spool's due index only.
    pub fn retry_recorded(&self, id: QueueId, pool: &str, due_ms: u64, mt_priority: i8) {
        self.put(id, pool, due_ms, mt_priority, true);
    }

    fn put(&self, id: QueueId, pool: &str, due_ms: u64, mt_priority: i8, recorded: bool) {
        self.with_index(|index| {
            // In memory now: the stream must not bring it again from the
            // pool's backlog.
            if index.backlogs.get(pool).is_some_and(|b| b.ahead(id)) {
                index.claimed.insert(id);
            }
            index.insert(id, pool, due_ms, mt_priority, recorded);
        });
        self.wake.notify_waiters();
    }

    /// Pools whose deferred mail in memory is down to half a window while
    /// more waits in the due index (or whose flushed mail waits there),
    /// with where to read: the due stream reads them now (each marked as
    /// being read until [`Scheduler::due_read`]).
    pub fn due_wanted(&self) -> Vec<(String, (u64, QueueId))> {
        let half = self.window / 2;
        let window = self.window;
        self.with_index(|index| {
            let mut wanted = Vec::new();
            for (name, q) in index.pools.iter_mut() {
                let Some(from) = q.disk_from else { continue };
                let room = q.deferred.len() <= half
                    || q.due_flushed_to.is_some() && q.ready.len() < window;
                if room && !q.due_reading {
                    q.due_reading = true;
                    wanted.push((name.clone(), from));
                }
            }
            wanted
        })
    }

    /// The due stream read `items` of `pool`'s due index from where
    /// [`Scheduler::due_wanted`] said (`complete`: nothing more there):
    /// brings them into memory, except those the index has already or the
    /// recovery stream has still to hand over.
    pub fn due_read(&self, pool: &str, items: &[Deferred], complete: bool) {
        let now = now_ms();
        self.with_index(|index| {
            let backlog = index.backlogs.get(pool);
            let Some(q) = index.pools.get_mut(pool) else {
                return;
            };
            q.due_reading = false;
            for d in items {
                if q.due_skip.remove(&d.id) || backlog.is_some_and(|b| b.ahead(d.id)) {
                    continue;
                }
                q.disk_deferred = q.disk_deferred.saturating_sub(1);
                let key = (d.due_ms, d.id);
                let flushed = q.due_flushed_to.is_some_and(|to| key <= to);
                if flushed || d.due_ms <= now {
                    q.ready.insert(d.mt_priority, d.id);
                } else {
                    q.defer(d.due_ms, d.id, d.mt_priority);
                }
            }
            let last = items.last().map(|d| (d.due_ms, d.id));
            if complete {
                q.disk_from = None;
                q.disk_deferred = 0;
                q.due_skip = HashSet::new();
                q.due_flushed_to = None;
            } else if let Some((due, id)) = last {
                q.disk_from = Some(match id.checked_add(1) {
                    Some(next) => (due, next),
                    None => (due.saturating_add(1), 0),
                });
                if q.due_flushed_to.is_some_and(|to| (due, id) >= to) {
                    q.due_flushed_to = None;
                }
            }
        });
        self.wake.notify_waiters();
    }

    /// The due stream could not read `pool`'s due index: it tries again later.
    pub fn due_read_failed(&self, pool: &str) {
        self.with(|pools| {
            if let Some(q) = pools.get_mut(pool) {
                q.due_reading = false;
            }
        });
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

    /// Makes every deferred message of `pool` ready now, including those
    /// the stream has still to hand over and those in the due index up to
    /// `due_last` (its latest key when the flush was asked).
    pub fn flush(&self, pool: &str, due_last: Option<(u64, QueueId)>) {
        self.with_index(|index| {
            if let Some(b) = index.backlogs.get_mut(pool) {
                b.flushed = true;
            }
            if let Some(q) = index.pools.get_mut(pool) {
                q.promote(u64::MAX);
                if q.disk_from.is_some() {
                    q.due_flushed_to = q.due_flushed_to.max(due_last);
                }
            }
        });
        self.wake.notify_waiters();
    }

    /// Takes a message out of the index (deleted or moved by the operator).
    /// Returns false if it is not queued there or is being delivered.
    /// A message still on disk for the stream can be taken too; the stream
    /// then skips it.
    pub fn forget(&self, id: QueueId, pool: &str) -> bool {
        self.forget_due(id, pool, None)
    }

    /// [`Scheduler::forget`] for a message whose envelope says it is due
    /// at `due_ms`: found without scanning the pool's deferred mail.
    pub fn forget_due(&self, id: QueueId, pool: &str, due_ms: Option<u64>) -> bool {
        self.with_index(|index| {
            // A message the stream has not reached is in the index only if
            // something put it there (then under its due time): no scan for
            // it, so taking a whole backlog stays linear.
            let ahead = index.backlogs.get(pool).is_some_and(|b| b.ahead(id));
            let taken = index
                .pools
                .get_mut(pool)
                .is_some_and(|q| q.ready.remove(id) || q.undefer(id, due_ms, !ahead));
            if !ahead {
                // Deferred in the due index only: the due stream skips it.
                if !taken
                    && let (Some(q), Some(due)) = (index.pools.get_mut(pool), due_ms)
                    && q.disk_from.is_some_and(|from| (due, id) >= from)
                    && q.due_skip.insert(id)
                {
                    q.disk_deferred = q.disk_deferred.saturating_sub(1);
                    return true;
                }
                return taken;
            }
            if index.claimed.insert(id)
                && !taken
                && let Some(b) = index.backlogs.get_mut(pool)
            {
                b.unread = b.unread.saturating_sub(1);
            }
            true
        })
    }

    /// Whether `pool` is held (no scan, unlike [`Scheduler::counts`]).
    pub fn is_held(&self, pool: &str) -> bool {
        self.with(|pools| pools.get(pool).is_some_and(|q| q.held))
    }

    /// Counts per pool.
    pub fn counts(&self) -> HashMap<String, PoolCounts> {
        let now = now_ms();
        self.with_index(|index| {
            let backlogs = &index.backlogs;
            let unread = |pool: &str| backlogs.get(pool).map_or(0, |b| b.unread as usize);
            let mut all = index
                .pools
                .iter_mut()
                .map(|(name, q)| {
                    q.promote(now);
                    let oldest_deferred = q.oldest_deferred();
                    let oldest = match (q.ready.oldest(), oldest_deferred) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let counts = PoolCounts {
                        ready: q.ready.len() + q.in_flight + unread(name),
                        deferred: q.deferred.len() + q.disk_deferred as usize,
                        in_flight: q.in_flight,
                        held: q.held,
                        oldest,
                        delivered_last_minute: q.delivered_last_minute(now / 1000),
                    };
                    (name.clone(), counts)
                })
                .collect::<HashMap<_, _>>();
            // A pool the stream has not read anything of yet.
            for (pool, b) in backlogs {
                all.entry(pool.clone()).or_insert_with(|| PoolCounts {
                    ready: b.unread as usize,
                    ..PoolCounts::default()
                });
            }
            all
        })
    }

    /// Takes the oldest ready message of the given pools for which
    /// `eligible` says yes (rate limits), or None when none is ready. The
    /// pools are taken as equals: no priority between them.
    pub fn try_take(&self, pools: &[String], eligible: &dyn Fn(&str) -> bool) -> Option<Job> {
        let mut picker = Picker::new(pools.iter().map(|p| Lane::new(p, 0, 0.0)), false);
        self.take(&mut picker, eligible)
    }

    /// Takes the message `picker` chooses among the ready, eligible
    /// messages of its pools, or None when none is ready. Each pool offers
    /// its next message (highest MT-PRIORITY, then oldest); the picker
    /// chooses between pools by their `priority` and those messages' age.
    pub fn take(&self, picker: &mut Picker, eligible: &dyn Fn(&str) -> bool) -> Option<Job> {
        let now = now_ms();
        let half = self.window / 2;
        let (job, room) = self
            .with_index(|index| {
                let all = &mut index.pools;
                let next: Vec<Option<(QueueId, i8)>> = picker
                    .lanes
                    .iter()
                    .map(|lane| {
                        let q = all.get_mut(&lane.pool)?;
                        if q.held || q.ready.is_empty() && q.deferred.is_empty() {
                            return None;
                        }
                        q.promote(now);
                        q.ready.next().filter(|_| eligible(&lane.pool))
                    })
                    .collect();
                let ids: Vec<Option<QueueId>> = next.iter().map(|n| n.map(|(id, _)| id)).collect();
                let chosen = picker.choose(&ids)?;
                let (id, mt_priority) = next[chosen]?;
                let name = picker.lanes[chosen].pool.clone();
                let q = all.get_mut(&name)?;
                q.ready.remove_from(mt_priority, id);
                q.in_flight += 1;
                let room = q.ready.len() <= half
                    && index.backlogs.get(&name).is_some_and(|b| b.paused)
                    || q.disk_from.is_some() && q.deferred.len() <= half && !q.due_reading;
                Some((
                    Job {
                        id,
                        pool: name,
                        mt_priority,
                    },
                    room,
                ))
            })
            .unzip();
        if room == Some(true) {
            self.room.notify_waiters();
        }
        job
    }

    /// Time until the earliest deferred message of these pools is due.
    fn next_due_in(&self, pools: &[String]) -> Option<Duration> {
        let now = now_ms();
        self.with(|all| {
            pools
                .iter()
                .filter_map(|p| all.get(p))
                .filter(|q| !q.held)
                .filter_map(|q| q.deferred.first().map(|&(due, _, _)| due))
                .min()
                .map(|due| Duration::from_millis(due.saturating_sub(now)))
        })
    }

    /// Waits for a ready, eligible message of the given pools, at most
    /// `idle` long, re-checking at least every `recheck` (for rate limits
    /// and windows, which change with time rather than with events).
    pub async fn next(
        &self,
        picker: &mut Picker,
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
            if let Some(job) = self.take(picker, eligible) {
                return Some(job);
            }
            let mut until = deadline.min(tokio::time::Instant::now() + recheck);
            if let Some(due) = self.next_due_in(&picker.pools()) {
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

/// Credits are counted in millionths of a pick, so shares add up exactly.
const WHOLE_PICK: u64 = 1_000_000;

/// The most that pools below the top priority get together, in millionths:
/// however many lower pools and shares, the highest pool keeps half.
const LOWER_TOTAL_MAX: u64 = WHOLE_PICK / 2;

/// One pool as a [`Picker`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lane {
    pool: String,
    priority: i8,
    /// `lower_priority_share`, in millionths of a pick.
    share: u64,
}

impl Lane {
    /// A pool with its priority and its `lower_priority_share` (a fraction).
    pub fn new(pool: &str, priority: i8, share: f64) -> Lane {
        Lane {
            pool: pool.to_string(),
            priority,
            share: (share.clamp(0.0, 1.0) * WHOLE_PICK as f64).round() as u64,
        }
    }
}

/// How one worker chooses among the pools it serves: the oldest message of
/// its highest-priority pool with ready mail, except that each lower pool
/// with ready mail earns its `lower_priority_share` of a pick on every
/// pick, and is taken once it has earned a whole one. So a burst of urgent
/// mail goes first without starving the bulk behind it.
///
/// Credit is earned only while a pool waits behind a higher one and is
/// dropped when it stops waiting, so an idle pool cannot save up a burst.
/// Pure: the scheduler feeds it which pools have ready mail.
#[derive(Debug, Clone)]
pub struct Picker {
    lanes: Vec<Lane>,
    credit: Vec<u64>,
}

impl Picker {
    /// A picker over `lanes`. A `reserved` worker serves only the pools
    /// above priority 0 (`reserve_workers`).
    pub fn new(lanes: impl IntoIterator<Item = Lane>, reserved: bool) -> Picker {
        let lanes: Vec<Lane> = lanes
            .into_iter()
            .filter(|l| !reserved || l.priority > 0)
            .collect();
        Picker {
            credit: vec![0; lanes.len()],
            lanes,
        }
    }

    /// The pools it serves.
    pub fn pools(&self) -> Vec<String> {
        self.lanes.iter().map(|l| l.pool.clone()).collect()
    }

    /// Given the next ready message of each lane (None: nothing ready or
    /// not eligible now), the lane to take from.
    fn choose(&mut self, oldest: &[Option<QueueId>]) -> Option<usize> {
        let ready = |i: usize| oldest.get(i).copied().flatten();
        let top = (0..self.lanes.len())
            .filter_map(|i| ready(i).map(|id| (i, id)))
            .max_by(|(a, ida), (b, idb)| {
                // Highest priority, then the oldest message.
                self.lanes[*a]
                    .priority
                    .cmp(&self.lanes[*b].priority)
                    .then(idb.cmp(ida))
            })
            .map(|(i, _)| i)?;
        let top_priority = self.lanes[top].priority;
        let waiting: Vec<usize> = (0..self.lanes.len())
            .filter(|&i| ready(i).is_some() && self.lanes[i].priority < top_priority)
            .collect();
        let total: u64 = waiting.iter().map(|&i| self.lanes[i].share).sum();
        for i in 0..self.lanes.len() {
            if !waiting.contains(&i) {
                self.credit[i] = 0;
            }
        }
        for &i in &waiting {
            let share = self.lanes[i].share;
            let earned = if total > LOWER_TOTAL_MAX {
                share * LOWER_TOTAL_MAX / total
            } else {
                share
            };
            self.credit[i] += earned;
        }
        let due = waiting
            .iter()
            .copied()
            .filter(|&i| self.credit[i] >= WHOLE_PICK)
            .max_by(|&a, &b| {
                self.credit[a]
                    .cmp(&self.credit[b])
                    .then(self.lanes[a].priority.cmp(&self.lanes[b].priority))
            });
        match due {
            Some(i) => {
                self.credit[i] -= WHOLE_PICK;
                Some(i)
            }
            None => Some(top),
        }
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
        s.enqueue(30, "A", 0, 0);
        s.enqueue(10, "B", 0, 0);
        s.enqueue(20, "A", 0, 0);
        assert_eq!(s.try_take(&pools(&["A"]), &ALL).map(|j| j.id), Some(20));
        assert_eq!(
            s.try_take(&pools(&["A", "B"]), &ALL).map(|j| j.id),
            Some(10)
        );
        assert_eq!(s.try_take(&pools(&["B"]), &ALL), None);
    }

    #[test]
    fn within_a_pool_higher_mt_priority_first_then_oldest() {
        let s = Scheduler::new();
        for (id, mt_priority) in [(1, 0), (2, 0), (3, 5), (4, -2), (5, 5), (6, 9)] {
            s.enqueue(id, "A", 0, mt_priority);
        }
        let mut order = Vec::new();
        while let Some(job) = s.try_take(&pools(&["A"]), &ALL) {
            order.push((job.id, job.mt_priority));
        }
        assert_eq!(order, [(6, 9), (3, 5), (5, 5), (1, 0), (2, 0), (4, -2)]);
    }

    #[test]
    fn mt_priority_survives_deferral_and_lanes_stay_consistent() {
        let s = Scheduler::new();
        s.enqueue(1, "A", 0, 0);
        s.enqueue(2, "A", now_ms() + 60_000, 7);
        s.enqueue(3, "A", 0, -1);
        s.enqueue(4, "A", 0, 3);
        let c = s.counts()["A"];
        assert_eq!((c.ready, c.deferred, c.oldest), (3, 1, Some(1)));
        // The oldest is reported whatever its lane; forget finds any lane.
        assert!(s.forget(1, "A"));
        assert!(!s.forget(1, "A"));
        assert_eq!(s.counts()["A"].oldest, Some(2));
        s.flush("A", None);
        assert_eq!(
            s.try_take(&pools(&["A"]), &ALL)
                .map(|j| (j.id, j.mt_priority)),
            Some((2, 7))
        );
        assert!(s.forget(4, "A"));
        assert_eq!(s.try_take(&pools(&["A"]), &ALL).map(|j| j.id), Some(3));
        assert_eq!(s.try_take(&pools(&["A"]), &ALL), None);
        assert_eq!(s.counts()["A"].ready, 2, "two in flight");
    }

    #[test]
    fn mt_priority_orders_within_a_pool_not_between_pools() {
        // Pools of equal priority still alternate by age: a message's
        // MT-PRIORITY does not jump it ahead of an older one in another pool.
        let s = Scheduler::new();
        s.enqueue(1, "A", 0, 0);
        s.enqueue(2, "B", 0, 9);
        s.enqueue(3, "A", 0, 9);
        let take = || s.try_take(&pools(&["A", "B"]), &ALL).map(|j| j.id);
        assert_eq!((take(), take(), take()), (Some(2), Some(3), Some(1)));
    }

    #[test]
    fn deferred_mail_does_not_block_ready_mail() {
        let s = Scheduler::new();
        s.enqueue(1, "A", now_ms() + 60_000, 0);
        s.enqueue(2, "A", 0, 0);
        assert_eq!(s.try_take(&pools(&["A"]), &ALL).map(|j| j.id), Some(2));
        assert_eq!(s.try_take(&pools(&["A"]), &ALL), None);
        s.flush("A", None);
        assert_eq!(s.try_take(&pools(&["A"]), &ALL).map(|j| j.id), Some(1));
    }

    #[test]
    fn held_pools_deliver_nothing_until_released() {
        let s = Scheduler::new();
        s.enqueue(1, "B", 0, 0);
        s.set_held("B", true);
        assert_eq!(s.try_take(&pools(&["B"]), &ALL), None);
        assert_eq!(s.counts()["B"].ready, 1);
        s.set_held("B", false);
        assert!(s.try_take(&pools(&["B"]), &ALL).is_some());
    }

    #[test]
    fn counts_keep_the_oldest_and_deferred_mail_is_found_by_its_due_time() {
        let s = Scheduler::new();
        let later = now_ms() + 3_600_000;
        s.enqueue(5, "A", later, 0);
        s.enqueue(3, "A", later + 1, 0);
        s.enqueue(9, "A", 0, 0);
        assert_eq!(s.counts()["A"].oldest, Some(3));
        assert!(s.forget_due(3, "A", Some(later + 1)));
        assert_eq!(s.counts()["A"].oldest, Some(5));
        assert!(!s.forget_due(3, "A", Some(later + 1)));
        assert!(
            s.forget_due(5, "A", Some(1)),
            "a wrong due time falls back to a scan"
        );
        let c = s.counts()["A"];
        assert_eq!((c.oldest, c.deferred, c.ready), (Some(9), 0, 1));
        assert!(!s.is_held("A"));
        s.set_held("A", true);
        assert!(s.is_held("A"));
    }

    fn backlogs(pools: &[(&str, u64)]) -> Vec<(String, u64)> {
        pools.iter().map(|(p, n)| (p.to_string(), *n)).collect()
    }

    /// A new message of `pool`, durable as `id`, scheduled.
    fn append(s: &Arc<Scheduler>, id: QueueId, pool: &str) {
        s.begin_append().appended(id, pool, 0, 0);
    }

    /// Takes every ready message of `pool` it can, in order.
    fn drain(s: &Scheduler, pool: &str) -> Vec<QueueId> {
        std::iter::from_fn(|| s.try_take(&pools(&[pool]), &ALL))
            .map(|job| {
                s.finished(&job);
                job.id
            })
            .collect()
    }

    #[test]
    fn during_recovery_the_operator_can_take_mail_the_stream_has_not_reached() {
        let s = Scheduler::new();
        s.begin_recovery(100, &backlogs(&[("A", 3), ("B", 0), ("C", 1)]));
        assert!(s.recovered(10, "A", 0, 0));
        // 10 was handed over and is being delivered: busy.
        assert!(s.try_take(&pools(&["A"]), &ALL).is_some());
        assert!(!s.forget(10, "A"));
        // 50 is still ahead in A: taken, and the stream skips it later,
        // in A or in the pool it was moved to.
        assert!(s.forget(50, "A"));
        assert!(!s.recovered(50, "B", 0, 0));
        // Above the bound: new mail, which its append scheduled.
        assert!(!s.forget(200, "A"));
        // A pool flushed during recovery gets what the stream still brings as ready.
        s.flush("C", None);
        assert!(s.recovered(60, "C", now_ms() + 3_600_000, 0));
        assert_eq!(s.counts()["C"].ready, 1);
        assert_eq!(s.next_read("A"), Some((10, 100)));
        assert!(s.finish_range("A", 100), "A had one range");
        assert!(!s.forget(70, "A"), "A is fully recovered: 70 is not queued");
        assert!(s.finish_range("B", 100));
        assert!(s.recovering(), "C is still being read");
        assert!(s.finish_range("C", 100));
        assert_eq!(s.recovery_remaining(), 0);
        assert!(!s.recovering());
        assert!(!s.forget(80, "C"));
    }

    #[test]
    fn the_stream_fills_a_window_then_waits_for_half_of_it_to_be_taken() {
        let s = Scheduler::with_window(4);
        s.begin_recovery(100, &backlogs(&[("A", 10)]));
        let mut id = 0;
        while s.has_room("A") {
            id += 1;
            assert!(s.recovered(id, "A", 0, 0));
        }
        assert_eq!(id, 4, "filled to the window");
        assert_eq!(s.counts()["A"].ready, 10, "counts include the unread six");
        s.try_take(&pools(&["A"]), &ALL);
        assert!(!s.has_room("A"), "3 of 4 ready: not yet");
        s.try_take(&pools(&["A"]), &ALL);
        assert!(s.has_room("A"), "half of the window taken");
        assert!(s.has_room("A"), "and room until it is full again");
        // The operator takes one the stream has not reached: counted at once.
        assert!(s.forget(50, "A"));
        assert_eq!(s.counts()["A"].ready, 9);
        assert!(s.finish_range("A", 100));
        assert!(s.has_room("A"), "no backlog, no window");
    }

    #[test]
    fn new_mail_past_a_full_window_waits_on_disk_and_comes_back_oldest_first() {
        let s = Arc::new(Scheduler::with_window(4));
        for id in 1..=7 {
            append(&s, id, "A");
        }
        assert_eq!(s.in_memory("A"), 4, "the window, not more");
        assert!(s.recovering());
        assert_eq!(s.recovery_remaining(), 3);
        assert_eq!(
            s.counts()["A"].ready,
            7,
            "counts include what waits on disk"
        );
        assert_eq!(s.next_read("A"), Some((4, 7)));
        assert!(!s.has_room("A"), "the window is full");
        // Appends behind a backlog join it, even with room in memory:
        // older mail on disk goes first.
        assert_eq!(
            std::iter::from_fn(|| s.try_take(&pools(&["A"]), &ALL))
                .take(2)
                .map(|j| j.id)
                .collect::<Vec<_>>(),
            [1, 2]
        );
        append(&s, 8, "A");
        assert_eq!(s.in_memory("A"), 2);
        assert_eq!(s.next_read("A"), Some((4, 8)));
        assert!(s.has_room("A"), "half of the window taken");
        for id in 5..=8 {
            assert!(s.recovered(id, "A", 0, 0));
        }
        assert!(s.finish_range("A", 8));
        assert!(!s.recovering());
        assert_eq!(s.recovery_remaining(), 0);
        assert_eq!(drain(&s, "A"), [3, 4, 5, 6, 7, 8]);
        // Memory again, nothing waits on disk.
        append(&s, 9, "A");
        assert!(!s.recovering());
        assert_eq!(drain(&s, "A"), [9]);
    }

    #[test]
    fn urgent_mt_priority_is_not_spilled_behind_older_mail() {
        let s = Arc::new(Scheduler::with_window(2));
        append(&s, 1, "A");
        append(&s, 2, "A");
        append(&s, 3, "A");
        s.begin_append().appended(4, "A", 0, 5);
        append(&s, 5, "A");
        assert_eq!(s.in_memory("A"), 3, "1, 2 and the urgent 4");
        assert_eq!(s.next_read("A"), Some((2, 3)));
        assert!(s.recovered(3, "A", 0, 0));
        assert!(!s.finish_range("A", 3), "5 is still on disk");
        assert_eq!(s.next_read("A"), Some((4, 5)), "4 is not read again");
        assert!(s.recovered(5, "A", 0, 0));
        assert!(s.finish_range("A", 5));
        assert_eq!(drain(&s, "A"), [4, 1, 2, 3, 5]);
    }

    #[test]
    fn an_append_extending_a_range_being_read_keeps_the_range_open() {
        let s = Arc::new(Scheduler::with_window(2));
        for id in 1..=3 {
            append(&s, id, "A");
        }
        // The stream reads (2, 3] and finds its end; 4 lands meanwhile.
        assert_eq!(s.next_read("A"), Some((2, 3)));
        assert!(s.recovered(3, "A", 0, 0));
        append(&s, 4, "A");
        assert!(!s.finish_range("A", 3), "4 is in the range now: read on");
        assert_eq!(s.next_read("A"), Some((3, 4)));
        assert!(s.recovered(4, "A", 0, 0));
        assert!(s.finish_range("A", 4));
        assert_eq!(drain(&s, "A"), [1, 2, 3, 4]);
    }

    #[test]
    fn an_append_scheduled_after_the_stream_brought_it_is_not_scheduled_twice() {
        // Ids become durable in order but their appends finish in any
        // order: 3 is on disk (the stream reads it) before its append is
        // scheduled, and the range closes in between.
        let s = Arc::new(Scheduler::with_window(2));
        append(&s, 1, "A");
        append(&s, 2, "A");
        let three = s.begin_append();
        append(&s, 4, "A");
        assert_eq!(s.next_read("A"), Some((2, 4)));
        assert!(s.recovered(3, "A", 0, 0));
        assert!(s.recovered(4, "A", 0, 0));
        assert!(s.finish_range("A", 4));
        three.appended(3, "A", 0, 0);
        assert_eq!(drain(&s, "A"), [1, 2, 3, 4], "3 once");
        // Once no append that began before it is in progress, the closed
        // range is forgotten.
        append(&s, 5, "A");
        assert!(s.with_index(|i| i.closed.is_empty() && i.appending.is_empty()));
        // A dropped append (a failed write) ends too.
        drop(s.begin_append());
        assert!(s.with_index(|i| i.appending.is_empty()));
    }

    #[test]
    fn an_append_below_what_the_index_holds_goes_to_memory_past_the_window() {
        let s = Arc::new(Scheduler::with_window(3));
        append(&s, 1, "A");
        append(&s, 2, "A");
        let three = s.begin_append();
        append(&s, 4, "A");
        append(&s, 5, "A");
        assert_eq!(s.next_read("A"), Some((4, 5)), "the backlog starts above 4");
        // 3 is below the ids the index holds: the stream will not read it.
        three.appended(3, "A", 0, 0);
        assert_eq!(s.in_memory("A"), 4);
        assert!(s.recovered(5, "A", 0, 0));
        assert!(s.finish_range("A", 5));
        assert_eq!(drain(&s, "A"), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn mail_moved_into_a_pool_with_a_backlog_is_not_brought_twice() {
        let s = Arc::new(Scheduler::with_window(2));
        append(&s, 1, "A");
        append(&s, 2, "A");
        append(&s, 3, "B");
        append(&s, 4, "A");
        append(&s, 5, "A");
        assert_eq!(s.next_read("A"), Some((2, 5)));
        // The operator moves 3 into A: its record is now in A's range.
        assert!(s.forget(3, "B"));
        s.enqueue(3, "A", 0, 0);
        for id in 3..=5 {
            // The stream reads 3, 4, 5 from A's keyspace: 3 it skips.
            assert_eq!(s.recovered(id, "A", 0, 0), id != 3, "id {id}");
        }
        assert!(s.finish_range("A", 5));
        assert_eq!(drain(&s, "A"), [1, 2, 3, 4, 5]);
        // Above what A holds now, a move into A is in memory; a spill
        // after it starts above it.
        append(&s, 6, "B");
        append(&s, 7, "A");
        append(&s, 8, "A");
        assert!(s.forget(6, "B"));
        s.enqueue(6, "A", 0, 0);
        append(&s, 9, "A");
        assert_eq!(
            s.next_read("A"),
            Some((8, 9)),
            "6 is in memory: not read again"
        );
    }

    #[test]
    fn a_flush_reaches_deferred_mail_waiting_on_disk() {
        let s = Arc::new(Scheduler::with_window(1));
        append(&s, 1, "A");
        append(&s, 2, "A");
        s.flush("A", None);
        assert!(s.recovered(2, "A", now_ms() + 3_600_000, 0));
        assert!(s.finish_range("A", 2));
        assert_eq!(drain(&s, "A"), [1, 2]);
    }

    fn deferred_in_memory(s: &Scheduler, pool: &str) -> usize {
        s.with(|pools| pools.get(pool).map_or(0, |q| q.deferred.len()))
    }

    fn deferred(due_ms: u64, id: QueueId) -> Deferred {
        Deferred {
            due_ms,
            id,
            mt_priority: 0,
        }
    }

    #[test]
    fn deferred_mail_past_a_window_waits_in_the_due_index_and_comes_back() {
        let s = Scheduler::with_window(4).with_due_index(true);
        let later = now_ms() + 3_600_000;
        for id in 1..=10 {
            s.retry_recorded(id, "A", later + id, 0);
        }
        assert_eq!(deferred_in_memory(&s, "A"), 4, "the earliest window");
        assert_eq!(s.counts()["A"].deferred, 10, "counts include the due index");
        assert_eq!(s.recovery_remaining(), 6);
        assert!(s.due_wanted().is_empty(), "the window is full");
        // A retry the spool could not record stays in memory.
        s.enqueue(20, "A", later + 20, 0);
        assert_eq!(deferred_in_memory(&s, "A"), 5);
        // Down to half a window: the due stream reads from the first on disk.
        for id in [1, 2, 20] {
            assert!(s.forget_due(id, "A", Some(later + id)));
        }
        assert_eq!(s.due_wanted(), [("A".to_string(), (later + 5, 5))]);
        assert!(s.due_wanted().is_empty(), "being read");
        // A deferral recorded while the stream reads: in memory, skipped
        // if the read brings it too.
        s.retry_recorded(11, "A", later + 11, 0);
        let read: Vec<Deferred> = (5..=7).map(|id| deferred(later + id, id)).collect();
        s.due_read("A", &read, false);
        assert_eq!(deferred_in_memory(&s, "A"), 6, "3, 4, 5, 6, 7 and 11");
        // The operator takes one still on disk: the stream skips it.
        assert!(s.forget_due(9, "A", Some(later + 9)));
        assert_eq!(s.counts()["A"].deferred, 8);
        // A flush brings the rest, up to the due index's last key, as ready.
        s.flush("A", Some((later + 11, 11)));
        assert_eq!(s.due_wanted(), [("A".to_string(), (later + 7, 8))]);
        let read: Vec<Deferred> = (8..=11).map(|id| deferred(later + id, id)).collect();
        s.due_read("A", &read, true);
        assert_eq!(
            drain(&s, "A"),
            [3, 4, 5, 6, 7, 8, 10, 11],
            "9 taken, 11 once"
        );
        assert_eq!(s.recovery_remaining(), 0);
        assert_eq!(s.counts()["A"].deferred, 0);
        assert!(s.due_wanted().is_empty(), "nothing left on disk");
    }

    #[test]
    fn retry_times_out_of_order_keep_the_earliest_window_in_memory() {
        let s = Scheduler::with_window(2).with_due_index(true);
        let later = now_ms() + 3_600_000;
        s.retry_recorded(1, "A", later + 10, 0);
        s.retry_recorded(2, "A", later + 30, 0);
        // Earlier than the latest in memory: 2 goes to disk instead.
        s.retry_recorded(3, "A", later + 20, 0);
        // Between memory and disk: to disk, where the disk part now starts.
        s.retry_recorded(4, "A", later + 25, 0);
        assert_eq!(deferred_in_memory(&s, "A"), 2);
        assert_eq!(s.recovery_remaining(), 2);
        // A time the spool does not have is never moved to disk.
        s.enqueue(5, "A", later + 5, 0);
        s.enqueue(6, "A", later + 50, 0);
        s.retry_recorded(7, "A", later + 1, 0);
        assert_eq!(deferred_in_memory(&s, "A"), 5, "1, 3, 5, 6, 7: 6 stays");
        for id in [1, 3, 5, 6, 7] {
            assert!(s.forget(id, "A"));
        }
        assert_eq!(s.due_wanted(), [("A".to_string(), (later + 25, 4))]);
        s.due_read(
            "A",
            &[deferred(later + 25, 4), deferred(later + 30, 2)],
            true,
        );
        s.flush("A", None);
        assert_eq!(drain(&s, "A"), [2, 4]);
    }

    #[test]
    fn a_message_taken_from_the_due_index_and_deferred_again_comes_back() {
        let s = Scheduler::with_window(1).with_due_index(true);
        let later = now_ms() + 3_600_000;
        s.retry_recorded(1, "A", later + 1, 0);
        s.retry_recorded(2, "A", later + 2, 0);
        // The operator flushes 2 (in the due index only): it is tried now...
        assert!(s.forget_due(2, "A", Some(later + 2)));
        s.enqueue(2, "A", 0, 0);
        assert_eq!(drain(&s, "A"), [2]);
        // ...and deferred again, to the due index: not skipped there.
        s.retry_recorded(2, "A", later + 3, 0);
        assert!(s.forget(1, "A"));
        assert_eq!(s.due_wanted(), [("A".to_string(), (later + 2, 2))]);
        s.due_read("A", &[deferred(later + 3, 2)], true);
        assert_eq!(deferred_in_memory(&s, "A"), 1);
    }

    #[test]
    fn without_a_due_index_deferred_mail_stays_in_memory() {
        let s = Scheduler::with_window(2);
        let later = now_ms() + 3_600_000;
        for id in 1..=5 {
            s.retry_recorded(id, "A", later + id, 0);
        }
        assert_eq!(deferred_in_memory(&s, "A"), 5);
        assert_eq!(s.recovery_remaining(), 0);
    }

    #[test]
    fn the_due_stream_leaves_mail_the_recovery_stream_has_still_to_hand_over() {
        let s = Scheduler::with_window(2).with_due_index(true);
        s.begin_recovery(100, &backlogs(&[("A", 4)]));
        let later = now_ms() + 3_600_000;
        // The recovery stream reads 10, 20, 30 (all deferred): 30 is past
        // the window of deferred mail, so in the due index only.
        for id in [10, 20, 30] {
            assert!(s.recovered(id, "A", later + id, 0));
        }
        assert_eq!(deferred_in_memory(&s, "A"), 2);
        assert!(s.forget_due(10, "A", Some(later + 10)));
        assert!(s.forget_due(20, "A", Some(later + 20)));
        assert_eq!(s.due_wanted(), [("A".to_string(), (later + 30, 30))]);
        // The due index also has 40 (earlier due), which recovery has not
        // read yet: the due stream leaves it to recovery.
        s.due_read(
            "A",
            &[deferred(later + 30, 30), deferred(later + 35, 40)],
            true,
        );
        assert_eq!(deferred_in_memory(&s, "A"), 1);
        assert!(s.recovered(40, "A", later + 35, 0));
        assert!(s.finish_range("A", 100));
        assert_eq!(deferred_in_memory(&s, "A"), 2, "30 and 40, once each");
        s.flush("A", None);
        assert_eq!(drain(&s, "A"), [30, 40]);
    }

    #[tokio::test]
    async fn a_waiting_worker_wakes_on_enqueue() {
        let s = std::sync::Arc::new(Scheduler::new());
        let s2 = s.clone();
        let waiter = tokio::spawn(async move {
            s2.next(
                &mut Picker::new([Lane::new("A", 0, 0.1)], false),
                Duration::from_secs(10),
                Duration::from_secs(10),
                &|_| true,
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.enqueue(7, "A", 0, 0);
        let job = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert_eq!(
            job.ok().and_then(|r| r.ok()).flatten().map(|j| j.id),
            Some(7)
        );
    }

    /// Picks `n` times with every lane always ready (the oldest ids fixed);
    /// returns how often each lane was taken.
    fn picks(picker: &mut Picker, n: usize) -> Vec<usize> {
        let mut taken = vec![0; picker.lanes.len()];
        let oldest: Vec<Option<QueueId>> = (0..picker.lanes.len() as u64).map(Some).collect();
        for _ in 0..n {
            let i = picker.choose(&oldest).expect("something is ready");
            taken[i] += 1;
        }
        taken
    }

    #[test]
    fn the_highest_priority_pool_goes_first_then_the_oldest_among_equals() {
        let s = Scheduler::new();
        s.enqueue(1, "A", 0, 0);
        s.enqueue(2, "A", 0, 0);
        s.enqueue(3, "C", 0, 0);
        s.enqueue(4, "B", 0, 0);
        let mut p = Picker::new(
            [
                Lane::new("A", 0, 0.1),
                Lane::new("B", 5, 0.1),
                Lane::new("C", 5, 0.1),
            ],
            false,
        );
        let order: Vec<QueueId> = std::iter::from_fn(|| s.take(&mut p, &ALL).map(|j| j.id))
            .take(4)
            .collect();
        assert_eq!(order, [3, 4, 1, 2]);
    }

    #[test]
    fn a_waiting_lower_pool_gets_its_share_of_picks_exactly() {
        let mut p = Picker::new([Lane::new("B", 5, 0.1), Lane::new("A", 0, 0.1)], false);
        assert_eq!(picks(&mut p, 1000), [900, 100]);
        let mut p = Picker::new([Lane::new("B", 5, 0.1), Lane::new("A", 0, 0.25)], false);
        assert_eq!(picks(&mut p, 1000), [750, 250]);
    }

    #[test]
    fn the_share_of_the_higher_pool_does_not_matter_only_the_waiting_one() {
        let mut p = Picker::new([Lane::new("B", 5, 0.5), Lane::new("A", 0, 0.1)], false);
        assert_eq!(picks(&mut p, 100), [90, 10]);
    }

    #[test]
    fn equal_priorities_take_the_oldest_and_earn_no_credit() {
        let mut p = Picker::new([Lane::new("A", 0, 0.5), Lane::new("Z", 0, 0.5)], false);
        for _ in 0..10 {
            assert_eq!(p.choose(&[Some(1), Some(2)]), Some(0));
        }
        assert_eq!(p.choose(&[Some(3), Some(2)]), Some(1));
    }

    #[test]
    fn a_reserved_worker_serves_only_pools_above_priority_zero() {
        let p = Picker::new(
            [
                Lane::new("B", 5, 0.1),
                Lane::new("A", 0, 0.1),
                Lane::new("L", -3, 0.1),
            ],
            true,
        );
        assert_eq!(p.pools(), ["B"]);
        let s = Scheduler::new();
        s.enqueue(1, "A", 0, 0);
        let mut p = p;
        assert_eq!(
            s.take(&mut p, &ALL),
            None,
            "bulk mail is not for a reserved worker"
        );
        s.enqueue(2, "B", 0, 0);
        assert_eq!(s.take(&mut p, &ALL).map(|j| j.id), Some(2));
    }

    #[test]
    fn an_idle_lower_pool_saves_no_credit_for_a_burst() {
        let mut p = Picker::new([Lane::new("B", 5, 0.1), Lane::new("A", 0, 0.5)], false);
        // A alone for a long time: it is the top, it earns nothing.
        for _ in 0..100 {
            assert_eq!(p.choose(&[None, Some(1)]), Some(1));
        }
        // B arrives: B first; A gets its share from now on, not a backlog of picks.
        assert_eq!(p.choose(&[Some(2), Some(1)]), Some(0));
        assert_eq!(p.choose(&[Some(2), Some(1)]), Some(1));
        assert_eq!(p.choose(&[Some(2), Some(1)]), Some(0));
        // B drained for a moment: A's credit is dropped.
        p.choose(&[Some(2), None]);
        assert_eq!(p.choose(&[Some(2), Some(1)]), Some(0));
    }

    #[test]
    fn no_pool_starves_over_many_picks_whatever_the_shares() {
        let lanes = [
            Lane::new("top", 9, 0.5),
            Lane::new("mid", 0, 0.01),
            Lane::new("low", -9, 0.5),
            Lane::new("low2", -9, 0.5),
        ];
        let mut p = Picker::new(lanes, false);
        let n = 100_000;
        let taken = picks(&mut p, n);
        assert!(
            taken.iter().all(|&t| t > 0),
            "every pool is served: {taken:?}"
        );
        // The lower pools together get at most half; the top keeps the rest.
        assert!(taken[0] >= n / 2, "{taken:?}");
        // Each lower pool its share, scaled down to fit that half.
        let total = 0.01 + 0.5 + 0.5;
        for (i, share) in [(1, 0.01), (2, 0.5), (3, 0.5)] {
            let expected = n as f64 * share * 0.5 / total;
            assert!(
                (taken[i] as f64 - expected).abs() <= 2.0,
                "lane {i}: {taken:?}"
            );
        }
        // And no long wait: a waiting pool is taken at least every 1/share picks.
        let mut p = Picker::new([Lane::new("B", 9, 0.1), Lane::new("A", -9, 0.1)], false);
        let mut since_a = 0;
        for _ in 0..10_000 {
            match p.choose(&[Some(1), Some(0)]) {
                Some(1) => since_a = 0,
                _ => since_a += 1,
            }
            assert!(since_a < 10, "A waited {since_a} picks");
        }
    }

    #[test]
    fn lanes_not_eligible_now_are_passed_over() {
        let s = Scheduler::new();
        s.enqueue(1, "B", 0, 0);
        s.enqueue(2, "A", 0, 0);
        let mut p = Picker::new([Lane::new("B", 5, 0.1), Lane::new("A", 0, 0.1)], false);
        let not_b = |pool: &str| pool != "B";
        assert_eq!(s.take(&mut p, &not_b).map(|j| j.id), Some(2));
        assert_eq!(s.take(&mut p, &not_b), None);
        assert_eq!(s.take(&mut p, &ALL).map(|j| j.id), Some(1));
    }
}
