//! The engine: listeners accept and classify, the queue (spool + scheduler)
//! keeps and orders, workers deliver, the decision core says what each
//! attempt means. Data flows one way:
//! listener -> classifier -> queue -> scheduler -> worker -> delivery -> result (DSN,
//! which re-enters through the queue).
//!
//! [`start`] wires them for one config and returns a [`Running`] relay.

pub mod auth;
pub mod classifier;
pub mod clock;
pub mod control;
pub mod delivery;
pub mod dsn;
pub mod limits;
pub mod listener;
pub mod metric;
pub mod queue;
pub mod scheduler;
pub mod signing;
pub mod upstream;
pub mod worker;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use poolrelay_config::{Config, SpoolBackend};
use poolrelay_spool::{
    FjallSpool, JetStreamOptions, JetStreamSpool, NODE_HEARTBEAT, Spool, now_ms,
};

use crate::queue::Queue;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::limits::{Limits, Membership};
use crate::listener::{Inbound, Rules};
use crate::scheduler::{PoolCounts, Scheduler};
use crate::upstream::{Dns, Health};
use crate::worker::{Generation, Shared};

/// The workers of one config generation.
struct Workers {
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<()>>,
    /// Their config, limits and clock; `None` once stopped.
    generation: Option<Arc<Generation>>,
}

/// A running relay.
pub struct Running {
    /// The spool and the index together.
    pub queue: Queue,
    /// The index, for the admin API and metrics.
    pub scheduler: Arc<Scheduler>,
    /// Upstream health, for metrics.
    pub health: Arc<Health>,
    inbound: Arc<Inbound>,
    shared: Arc<Shared>,
    stopping: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    workers: Mutex<Workers>,
    listeners_bound: bool,
    /// The recovery stream, stopped at shutdown.
    recovery: JoinHandle<()>,
    /// This relay's heartbeat on a shared spool, stopped at shutdown.
    membership: Option<JoinHandle<()>>,
}

impl Running {
    /// The config currently in force.
    pub fn config(&self) -> Arc<Config> {
        self.inbound.rules().config.clone()
    }

    /// The workers' current generation (config, limits, clock), if running.
    pub(crate) fn generation(&self) -> Option<Arc<Generation>> {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .generation
            .clone()
    }

    /// The live relays draining each pool, this one included.
    pub fn live_nodes(&self) -> limits::LiveNodes {
        self.shared.membership.nodes()
    }

    /// The spool, for reads.
    pub fn spool(&self) -> &dyn Spool {
        self.queue.spool()
    }

    /// Whether the relay can take mail: spool writable and listeners bound.
    pub fn ready(&self) -> bool {
        self.listeners_bound && self.spool().is_writable() && !*self.stopping.borrow()
    }

    /// Each pool's counts: the scheduler's. On a shared spool most mail
    /// waits in the cluster, in no relay's scheduler: ready, deferred and
    /// the oldest then count the cluster's whole queue (ready includes
    /// what any relay is sending); in flight and delivered stay this
    /// relay's (`SharedQueue::counts`: at most one scan per pool and second).
    pub fn counts(&self) -> HashMap<String, PoolCounts> {
        let mut counts = self.scheduler.counts();
        if let Some(shared) = self.spool().shared() {
            let now = now_ms();
            for pool in self.spool().pools() {
                let cluster = shared.counts(&pool, now);
                let held = self.scheduler.is_held(&pool);
                let c = counts.entry(pool).or_default();
                c.ready = (cluster.queued - cluster.deferred).max(c.in_flight);
                c.deferred = cluster.deferred;
                c.oldest = cluster.oldest;
                c.held = held;
            }
        }
        counts
    }

    /// Applies a new config without dropping sessions or queued mail: new
    /// routes at once, new workers (upstreams, windows, limits) after the
    /// old ones finish the message in hand. Refused, with the old config
    /// kept, when it removes a pool that still holds mail or changes listeners.
    pub async fn reload(&self, new: Config) -> Result<String, String> {
        let old = self.config();
        let counts = self.counts();
        let mut orphaned: Vec<String> = counts
            .iter()
            .filter(|(pool, c)| !new.pools.contains_key(*pool) && c.ready + c.deferred > 0)
            .map(|(pool, c)| format!("{pool} ({} messages)", c.ready + c.deferred))
            .collect();
        if self.scheduler.recovering() {
            // The index is still filling: ask the spool about the rest.
            for pool in self.spool().pools() {
                if !new.pools.contains_key(&pool)
                    && !counts.contains_key(&pool)
                    && self.spool().count(&pool).unwrap_or(0) > 0
                {
                    orphaned.push(format!("{pool} (being recovered)"));
                }
            }
        }
        if !orphaned.is_empty() {
            orphaned.sort();
            return Err(format!(
                "reload refused: the new config drops pools that still hold mail: {}; keep them (e.g. held, with no upstream) until they are empty, or move the mail first",
                orphaned.join(", ")
            ));
        }
        let old_listeners: BTreeSet<_> = old.listeners.iter().map(|l| l.address).collect();
        let new_listeners: BTreeSet<_> = new.listeners.iter().map(|l| l.address).collect();
        if old.spool != new.spool {
            return Err("reload refused: [spool] changed; that needs a restart".to_string());
        }
        if old_listeners != new_listeners {
            return Err(
                "reload refused: listener addresses changed; that needs a restart".to_string(),
            );
        }
        prepare_pools(self.spool(), &new);
        let new = Arc::new(new);
        *self
            .inbound
            .rules
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(Rules::new(new.clone()));
        let fresh = spawn_workers(&self.shared, &new, &self.health);
        let old_workers = {
            let mut guard = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *guard, fresh)
        };
        let _ = old_workers.stop.send(true);
        // Old workers finish the message in hand; the new ones start at once.
        tokio::spawn(async move {
            for h in old_workers.handles {
                let _ = h.await;
            }
        });
        self.scheduler.wake_all();
        Ok(format!(
            "reloaded {}: {} pools, {} upstreams, {} routes",
            new.source.display(),
            new.pools.len(),
            new.upstreams.len(),
            new.routes.len()
        ))
    }

    /// Graceful stop: new connections get 421 4.3.2, sessions get `grace`
    /// to finish their transaction, workers finish the message in flight.
    /// Everything that got a 250 is already fsynced, so an early exit is safe.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.stopping.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        let workers = {
            let mut guard = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(
                &mut *guard,
                Workers {
                    stop: watch::channel(true).0,
                    handles: Vec::new(),
                    generation: None,
                },
            )
        };
        let _ = workers.stop.send(true);
        let max = self.config().server.max_sessions;
        let sessions = self.inbound.sessions.clone();
        let drained = tokio::time::timeout_at(deadline, async {
            // Every permit back means every session has ended.
            let _all = sessions.acquire_many(max as u32).await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("grace period over with sessions still open; closing them");
        }
        for h in workers.handles {
            if tokio::time::timeout_at(deadline, h).await.is_err() {
                tracing::warn!("grace period over with a delivery in flight; it stays queued");
                break;
            }
        }
        for l in &self.listeners {
            l.abort();
        }
        self.recovery.abort();
        if let Some(membership) = &self.membership {
            membership.abort();
        }
        if let Some(shared) = self.spool().shared() {
            // The other relays take this one's share of the rate limits at
            // their next heartbeat, not when its entry expires.
            let withdrawn = shared.withdraw();
            if !matches!(
                tokio::time::timeout(Duration::from_secs(2), withdrawn).await,
                Ok(Ok(()))
            ) {
                tracing::warn!(
                    "cannot withdraw this relay from the cluster's live relays; the others count it out when its entry expires"
                );
            }
            // Other relays take what this one held at once, not when its
            // holds lapse.
            let handed = shared.hand_back_all();
            if !matches!(
                tokio::time::timeout(Duration::from_secs(2), handed).await,
                Ok(Ok(()))
            ) {
                tracing::warn!(
                    "cannot hand the tickets in hand back to the cluster; they come back when their holds lapse"
                );
            }
        }
        // Attempt records are written without an fsync: keep them.
        if let Err(e) = self.spool().sync() {
            tracing::warn!("cannot sync the spool at shutdown: {e}; attempt counts may go back");
        }
        tracing::info!("stopped");
    }
}

fn spawn_workers(shared: &Arc<Shared>, config: &Arc<Config>, health: &Health) -> Workers {
    metric::export_zeros(config);
    shared.membership.set_own(limits::drained_pools(config));
    let (stop, stop_rx) = watch::channel(false);
    let generation = Arc::new(Generation {
        config: config.clone(),
        limits: Limits::new(config).following(shared.membership.subscribe()),
        clock: Clock::of(config),
        stop: stop_rx,
    });
    let mut handles = Vec::new();
    for upstream in &config.upstreams {
        health.register(&upstream.host);
        for h in &upstream.failover {
            health.register(h);
        }
        for i in 0..upstream.workers {
            handles.push(tokio::spawn(worker::run(
                shared.clone(),
                generation.clone(),
                upstream.clone(),
                i,
            )));
        }
    }
    for h in &config.defaults.fallback {
        health.register(h);
    }
    if shared.queue.spool().shared().is_some() {
        let mut workers_of: std::collections::BTreeMap<&str, usize> = Default::default();
        for upstream in &config.upstreams {
            for pool in &upstream.pools {
                *workers_of.entry(pool.as_str()).or_default() += upstream.workers;
            }
        }
        for (pool, workers) in workers_of {
            handles.push(tokio::spawn(feed(
                shared.queue.clone(),
                pool.to_string(),
                FEED_WINDOW_PER_WORKER * workers,
                generation.stop.clone(),
            )));
        }
    }
    Workers {
        stop,
        handles,
        generation: Some(generation),
    }
}

/// Opens the spool, binds the listeners, starts the workers, and streams
/// the queued mail into the scheduler in the background: the relay accepts
/// and delivers new mail while recovery runs (see `stream_backlogs`).
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let config = Arc::new(config);
    let spool_dir = config.server.spool_dir.clone();
    let min_free = config.server.spool_min_free;
    let spool: Arc<dyn Spool> = match &config.spool {
        SpoolBackend::Fjall => Arc::new(
            tokio::task::spawn_blocking(move || {
                FjallSpool::open_with(&spool_dir, Box::new(move |total| min_free.bytes_of(total)))
            })
            .await
            .map_err(|e| anyhow::anyhow!("spool open task failed: {e}"))??,
        ),
        SpoolBackend::JetStream(js) => Arc::new(JetStreamSpool::open(JetStreamOptions {
            servers: js.servers.clone(),
            replicas: js.replicas,
            stream_prefix: js.stream_prefix.clone(),
            ack_timeout: js.ack_timeout,
            credentials_file: js.credentials_file.clone(),
            tls_ca_file: js.tls_ca_file.clone(),
            max_bodies_in_hand: config.server.max_data_memory,
        })?),
    };
    prepare_pools(spool.as_ref(), &config);
    let scheduler = Arc::new(
        index_window()
            .map_or_else(Scheduler::new, Scheduler::with_window)
            .with_due_index(spool.has_due_index()),
    );
    let recovery_pools = if spool.shared().is_some() {
        // The cluster hands out the mail (see `feed`).
        tracing::info!(
            "shared spool: delivering what the cluster hands this relay; no local recovery"
        );
        None
    } else {
        // Holds first: no worker may see a held pool's mail as ready.
        for pool in spool.held_pools()? {
            tracing::info!(pool = %pool, "pool held (recorded before the restart); `poolrelay queue release --pool {pool}` releases it");
            scheduler.set_held(&pool, true);
        }
        // Before anything can append: ids above the bound are new mail, which
        // its append schedules, so the stream must not.
        let pools = recovery_order(&config, spool.pools());
        let estimates: Vec<(String, u64)> = pools
            .iter()
            .map(|p| (p.clone(), spool.approximate_count(p) as u64))
            .collect();
        scheduler.begin_recovery(spool.opened_bound(), &estimates);
        tracing::info!(
            spool = %config.server.spool_dir.display(),
            messages_estimate = estimates.iter().map(|(_, n)| n).sum::<u64>(),
            "recovering the queue in the background; listening meanwhile"
        );
        Some(pools)
    };
    let queue = Queue::new(spool.clone(), scheduler.clone());
    let bound = listener::bind_all(&config).await?;
    let (stopping, stopping_rx) = watch::channel(false);
    let inbound = Arc::new(Inbound {
        rules: RwLock::new(Arc::new(Rules::new(config.clone()))),
        queue: queue.clone(),
        sessions: Arc::new(Semaphore::new(config.server.max_sessions)),
        per_client: Arc::default(),
        stopping: stopping_rx,
        content: Arc::new(listener::ContentBudget::new(config.server.max_data_memory)),
        auth_failures: auth::Failures::default(),
    });
    let mut listeners = Vec::new();
    for (l, socket) in bound {
        tracing::info!(listener = %l.name, address = %l.address, pool = l.pool.as_deref().unwrap_or("(routes)"), "listening");
        listeners.push(tokio::spawn(listener::serve(inbound.clone(), l, socket)));
    }
    let health = Arc::new(Health::new());
    let shared = Arc::new(Shared {
        queue: queue.clone(),
        health: health.clone(),
        // Built once: a reload keeps these name servers (README, `dns_servers`).
        dns: Dns::new(&config.server.dns_servers),
        membership: Membership::alone(limits::drained_pools(&config)),
    });
    let workers = spawn_workers(&shared, &config, &health);
    let recovery = match recovery_pools {
        Some(pools) => tokio::spawn(stream_backlogs(
            spool.clone(),
            scheduler.clone(),
            pools,
            config.server.spool_dir.display().to_string(),
        )),
        // Holds follow the cluster's record as any relay changes it.
        None => tokio::spawn(follow_holds(spool.clone(), scheduler.clone())),
    };
    let membership = spool
        .shared()
        .is_some()
        .then(|| tokio::spawn(keep_membership(shared.clone())));
    Ok(Running {
        queue,
        scheduler,
        health,
        inbound,
        shared,
        stopping,
        listeners,
        workers: Mutex::new(workers),
        listeners_bound: true,
        recovery,
        membership,
    })
}

/// Keeps this relay among the shared spool's live relays and the count of
/// live relays per pool current, so each relay takes its share of the
/// pools' rate limits (`limits::Membership`). While the cluster cannot be
/// reached the last count stays: no relay takes more than its share.
async fn keep_membership(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(NODE_HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let spool = shared.queue.spool();
        let Some(queue) = spool.shared() else {
            return;
        };
        if !spool.is_writable() && !failing {
            // Still connecting: the spool logs that itself.
            continue;
        }
        let announced =
            tokio::time::timeout(NODE_HEARTBEAT * 3, queue.announce(shared.membership.own())).await;
        match announced {
            Ok(Ok(others)) => {
                if failing {
                    tracing::info!(
                        node = queue.node_id(),
                        "announcing this relay to the cluster again"
                    );
                    failing = false;
                }
                if shared.membership.set_others(others) {
                    let nodes = shared.membership.nodes();
                    tracing::info!(
                        node = queue.node_id(),
                        relays = nodes.total,
                        pools = %nodes.describe(),
                        "live relays per pool changed; each takes its share of the pools' rate limits"
                    );
                }
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(
                        node = queue.node_id(),
                        "cannot announce this relay to the cluster: {e}; the rate limits keep the last count of live relays"
                    );
                    failing = true;
                }
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(
                        node = queue.node_id(),
                        "announcing this relay to the cluster timed out; the rate limits keep the last count of live relays"
                    );
                    failing = true;
                }
            }
        }
    }
}

/// Tickets a shared pool's feed keeps in hand per worker serving the
/// pool: enough that a worker never waits for a fetch, few enough that
/// mail is spread over the relays.
const FEED_WINDOW_PER_WORKER: usize = 2;
/// How long one fetch of tickets waits for one to arrive.
const FEED_FETCH_WAIT: Duration = Duration::from_secs(1);

/// Keeps the scheduler supplied with a shared pool's due messages: takes
/// tickets from the cluster while fewer than `window` are in hand here
/// (ready or being delivered) and the pool is not held.
async fn feed(queue: Queue, pool: String, window: usize, mut stop: watch::Receiver<bool>) {
    let mut failing = false;
    let Some(mut released) = queue.spool().shared().map(|s| s.released_watch()) else {
        return;
    };
    loop {
        if *stop.borrow() {
            return;
        }
        let Some(shared) = queue.spool().shared() else {
            return;
        };
        let in_hand = shared.held_tickets(&pool);
        // The spool's held set too: the scheduler follows it a moment later.
        let held = queue.scheduler().is_held(&pool)
            || queue.spool().held_pools().is_ok_and(|h| h.contains(&pool));
        // Tickets are fetched once half the window is free: one fetch for
        // several tickets, and the workers still have the other half
        // meanwhile.
        let pause = if held || !queue.spool().is_writable() {
            Some(Duration::from_millis(200))
        } else if in_hand > window / 2 || shared.bodies_full() {
            Some(Duration::from_millis(20))
        } else {
            None
        };
        if let Some(d) = pause {
            released.borrow_and_update();
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                gone = released.changed(), if !held => {
                    if gone.is_err() {
                        return;
                    }
                }
                _ = stop.changed() => {}
            }
            continue;
        }
        // Not cut short by a stop: tickets taken are in this relay's hands
        // and must reach the scheduler (the next generation's workers, or
        // the hand-back at shutdown); a take lasts about FEED_FETCH_WAIT.
        match shared.take(&pool, window - in_hand, FEED_FETCH_WAIT).await {
            Ok(messages) => {
                if failing {
                    tracing::info!(pool = %pool, "taking mail from the shared queue again");
                    failing = false;
                }
                for (id, envelope) in messages {
                    queue
                        .scheduler()
                        .enqueue(id, &pool, 0, envelope.mt_priority_or_default());
                }
            }
            Err(e) => {
                if !failing {
                    tracing::error!(pool = %pool, "cannot take mail from the shared queue: {e}; trying again every second");
                    failing = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// Applies the held pools of a shared spool to this relay's scheduler,
/// as any relay holds or releases them.
async fn follow_holds(spool: Arc<dyn Spool>, scheduler: Arc<Scheduler>) {
    let Some(shared) = spool.shared() else {
        return;
    };
    let mut held = shared.held_watch();
    let mut applied = BTreeSet::new();
    loop {
        let now: BTreeSet<String> = held.borrow_and_update().clone();
        for pool in now.difference(&applied) {
            tracing::info!(pool = %pool, "pool held (recorded in the shared spool)");
            scheduler.set_held(pool, true);
        }
        for pool in applied.difference(&now) {
            tracing::info!(pool = %pool, "pool released (recorded in the shared spool)");
            scheduler.set_held(pool, false);
        }
        applied = now;
        if held.changed().await.is_err() {
            return;
        }
    }
}

/// The pools of the spool in the order recovery reads them: highest
/// `priority` first (urgent mail is deliverable soonest), then by name.
fn recovery_order(config: &Config, mut pools: Vec<String>) -> Vec<String> {
    pools.sort_by(|a, b| {
        config
            .priority_of(b)
            .cmp(&config.priority_of(a))
            .then_with(|| a.cmp(b))
    });
    pools
}

/// Makes every configured pool's storage ready, so the first message of a
/// pool (an emergency lane's first message after a deploy) does not wait
/// for its keyspace to be created. A failure only costs that wait later.
fn prepare_pools(spool: &dyn Spool, config: &Config) {
    for pool in config.pools.keys() {
        if let Err(e) = spool.prepare_pool(pool) {
            tracing::warn!(pool = %pool, "cannot prepare the pool's spool storage now: {e}; it is made with its first message");
        }
    }
}

/// The ready ids per pool the index keeps while the stream has more to
/// read, when `POOLRELAY_INDEX_WINDOW` sets it (tests of mail outside the
/// window; never set in service, where it is [`scheduler::DEFAULT_WINDOW`]).
fn index_window() -> Option<usize> {
    std::env::var("POOLRELAY_INDEX_WINDOW")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// Messages read from the spool per step of the recovery stream: each step
/// is one blocking read, so the scheduler's lock and the runtime are never
/// held long.
const RECOVERY_CHUNK: usize = 1024;

/// A pause between recovery steps, for tests that need to act while
/// recovery runs (`POOLRELAY_RECOVERY_STEP_PAUSE_MS`; never set in service).
fn recovery_pause() -> Option<Duration> {
    std::env::var("POOLRELAY_RECOVERY_STEP_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
}

/// Streams the mail that waits on disk into the scheduler for as long as
/// the relay runs. First every queued message with a pending recipient
/// after a start (recovery), pool by pool (highest priority first), oldest
/// first, while listeners and workers already run; then whatever a pool
/// spilled later, when its ready window was full as new mail came in
/// ([`Scheduler::begin_append`]). Removes records whose recipients were
/// all done (a crash between the last delivery and the removal leaves
/// them behind), and hands over nothing the operator took meanwhile
/// ([`Scheduler::recovered`]). A pool whose ready window is full
/// ([`Scheduler::has_room`]) is passed over until workers have taken half
/// of it, so memory holds a window per pool however long the backlog. A
/// pool that cannot be read (the store reopening after a failed write, a
/// disk error) is tried again later, from where it stopped, with a growing
/// pause: mail that got a 250 is never left out until the next start.
async fn stream_backlogs(
    spool: Arc<dyn Spool>,
    scheduler: Arc<Scheduler>,
    order: Vec<String>,
    dir: String,
) {
    let started = std::time::Instant::now();
    let pause = recovery_pause();
    // A step never takes more than half a window, so a pool holds at most
    // a window and a half of ready ids.
    let chunk = RECOVERY_CHUNK.min(scheduler.window() / 2).max(1);
    let mut tally = RecoveryTally::default();
    // Pools whose backlog (or due index) could not be read: when to try
    // again, and the pause after that.
    let mut retry: Retry = HashMap::new();
    let mut due_retry: Retry = HashMap::new();
    let mut recovering = true;
    let mut window_reached = false;
    // Pools with a backlog at the last look, to log each spill once.
    let mut spilled: HashSet<String> = HashSet::new();
    loop {
        // Registered before looking, so room made meanwhile is not missed.
        let room = scheduler.room().notified();
        tokio::pin!(room);
        room.as_mut().enable();
        // Deferred mail the due index holds, for pools whose deferred set
        // in memory is down to half a window.
        for (pool, from) in scheduler.due_wanted() {
            if due_retry
                .get(&pool)
                .is_some_and(|&(at, _)| at > tokio::time::Instant::now())
            {
                scheduler.due_read_failed(&pool);
                continue;
            }
            let reader = spool.clone();
            let name = pool.clone();
            let read = tokio::task::spawn_blocking(move || reader.due_list(&name, from, chunk))
                .await
                .map_err(|e| format!("spool read task failed: {e}"))
                .and_then(|r| r.map_err(|e| e.to_string()));
            match read {
                Ok(items) => {
                    due_retry.remove(&pool);
                    scheduler.due_read(&pool, &items, items.len() < chunk);
                }
                Err(e) => {
                    scheduler.due_read_failed(&pool);
                    let backoff = back_off(&mut due_retry, &pool);
                    tracing::error!(pool = %pool, "cannot read the pool's deferred mail from the spool's due index: {e}; trying again in {backoff:?}");
                }
            }
        }
        let mut pools = scheduler.backlog_pools();
        if pools.is_empty() && recovering {
            recovering = false;
            tracing::info!(
                spool = %dir,
                messages = tally.recovered,
                finished_removed = tally.finished,
                read_errors = tally.read_errors,
                seconds = format_args!("{:.3}", started.elapsed().as_secs_f64()),
                "spool recovered: recovery finished"
            );
        }
        if !recovering {
            for pool in pools.iter().filter(|p| !spilled.contains(*p)) {
                tracing::info!(pool = %pool, window = scheduler.window(), "the pool's ready mail fills its index window; new mail waits in the spool until workers catch up");
            }
        }
        spilled = pools.iter().cloned().collect();
        let rank = |p: &String| order.iter().position(|o| o == p).unwrap_or(order.len());
        pools.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
        retry.retain(|p, _| pools.contains(p));
        let now = tokio::time::Instant::now();
        let next = pools
            .iter()
            .find(|p| retry.get(*p).is_none_or(|&(at, _)| at <= now) && scheduler.has_room(p));
        let Some(pool) = next else {
            if recovering && !window_reached && retry.is_empty() {
                window_reached = true;
                tracing::info!(
                    spool = %dir,
                    messages = tally.recovered,
                    pools = pools.len(),
                    window = scheduler.window(),
                    seconds = format_args!("{:.3}", started.elapsed().as_secs_f64()),
                    "spool recovery reached the index window; the rest is read as workers take mail"
                );
            }
            let until = retry
                .values()
                .map(|&(at, _)| at)
                .min()
                .unwrap_or(now + ROOM_RECHECK)
                .min(now + ROOM_RECHECK);
            tokio::select! {
                _ = &mut room => {}
                _ = tokio::time::sleep_until(until) => {}
            }
            continue;
        };
        match backlog_step(&spool, &scheduler, pool, chunk, &mut tally).await {
            Ok(ended) => {
                retry.remove(pool);
                if ended && !recovering {
                    tracing::info!(pool = %pool, "the pool's mail waiting in the spool is all in the index again");
                }
                if let Some(p) = pause {
                    tokio::time::sleep(p).await;
                }
            }
            Err(e) => {
                tally.read_errors += 1;
                let backoff = back_off(&mut retry, pool);
                tracing::error!(pool = %pool, "cannot read the pool's mail from the spool: {e}; trying again in {backoff:?}");
            }
        }
    }
}

/// How often the stream looks again at pools whose window was full, in
/// case no worker's take signalled room (an operator's delete, a reload).
const ROOM_RECHECK: Duration = Duration::from_secs(1);

/// First pause before reading a pool again after a read error; doubles up
/// to [`RECOVERY_RETRY_MAX`].
const RECOVERY_RETRY_FIRST: Duration = Duration::from_millis(500);
const RECOVERY_RETRY_MAX: Duration = Duration::from_secs(30);

/// Per pool, when to read it again after a read error, and the pause after that.
type Retry = HashMap<String, (tokio::time::Instant, Duration)>;

/// A read of `pool` failed: it waits (0.5 s, doubling up to 30 s per
/// failure in a row) before the next; returns the wait.
fn back_off(retry: &mut Retry, pool: &str) -> Duration {
    let backoff = retry.get(pool).map_or(RECOVERY_RETRY_FIRST, |&(_, b)| b);
    retry.insert(
        pool.to_string(),
        (
            tokio::time::Instant::now() + backoff,
            (backoff * 2).min(RECOVERY_RETRY_MAX),
        ),
    );
    backoff
}

/// What the recovery did, for its closing log line.
#[derive(Default)]
struct RecoveryTally {
    recovered: usize,
    finished: usize,
    read_errors: usize,
}

/// Reads one chunk of `pool`'s backlog where the scheduler says it stands
/// and hands it over; the scheduler moves its cursor with each id, so an
/// error leaves it where the next try starts. True once the pool's
/// backlog ended (every range read to its end).
async fn backlog_step(
    spool: &Arc<dyn Spool>,
    scheduler: &Scheduler,
    pool: &str,
    chunk: usize,
    tally: &mut RecoveryTally,
) -> Result<bool, String> {
    let Some((after, to)) = scheduler.next_read(pool) else {
        return Ok(true);
    };
    let reader = spool.clone();
    let name = pool.to_string();
    let from = (after > 0).then_some(after);
    let records = tokio::task::spawn_blocking(move || reader.list(&name, from, chunk))
        .await
        .map_err(|e| format!("spool read task failed: {e}"))?
        .map_err(|e| e.to_string())?;
    let mut reached_end = records.len() < chunk;
    let now = now_ms();
    let mut finished = Vec::new();
    for (id, envelope) in records {
        if id > to {
            reached_end = true;
            break;
        }
        match envelope {
            // Handed over first, so an operator's delete cannot race the removal.
            Ok(env) if env.is_done() => {
                if scheduler.recovered_done(id, pool) {
                    finished.push(id);
                }
            }
            Ok(env) => {
                let due = if env.next_attempt_ms > now {
                    env.next_attempt_ms
                } else {
                    0
                };
                if scheduler.recovered(id, pool, due, env.mt_priority_or_default()) {
                    tally.recovered += 1;
                }
            }
            // Kept on disk for inspection; never delete what we cannot read.
            Err(e) => {
                scheduler.passed(id, pool);
                tracing::error!("{e}; left in the spool untouched");
            }
        }
    }
    for id in finished {
        if let Err(e) = spool.remove(id, pool).await {
            tracing::warn!(queue_id = %poolrelay_spool::format_id(id), "cannot remove a finished message: {e}; removed at the next start");
        } else {
            tally.finished += 1;
        }
    }
    Ok(reached_end && scheduler.finish_range(pool, to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use poolrelay_spool::{Envelope, MemorySpool, Recipient};

    #[tokio::test]
    async fn recovery_reads_a_pool_again_after_a_read_error_instead_of_leaving_it_out() {
        let memory = MemorySpool::new();
        let spool: Arc<dyn Spool> = Arc::new(memory.clone());
        for pool in ["A", "A", "B"] {
            let envelope = Envelope::new(pool, "s@x", vec![Recipient::pending("r@y")], 1, "l", "c");
            spool.append(envelope, b"m".to_vec()).await.expect("append");
        }
        // The first read of A fails (a store reopening after a failed write).
        memory.fail_next_lists(1);
        let scheduler = Arc::new(Scheduler::new());
        let pools = vec!["A".to_string(), "B".to_string()];
        scheduler.begin_recovery(
            spool.opened_bound(),
            &[("A".to_string(), 2), ("B".to_string(), 1)],
        );
        let stream = tokio::spawn(stream_backlogs(
            spool,
            scheduler.clone(),
            pools,
            "mem".into(),
        ));
        wait_until("recovery ends once the pool reads again", || {
            !scheduler.recovering()
        })
        .await;
        stream.abort();
        let counts = scheduler.counts();
        assert_eq!((counts["A"].ready, counts["B"].ready), (2, 1));
    }

    #[tokio::test]
    async fn recovery_keeps_a_window_of_ready_mail_and_reads_on_as_workers_take_it() {
        let spool: Arc<dyn Spool> = Arc::new(MemorySpool::new());
        let mut ids = Vec::new();
        for _ in 0..50 {
            let envelope = Envelope::new("A", "s@x", vec![Recipient::pending("r@y")], 1, "l", "c");
            ids.push(spool.append(envelope, b"m".to_vec()).await.expect("append"));
        }
        let scheduler = Arc::new(Scheduler::with_window(8));
        scheduler.begin_recovery(spool.opened_bound(), &[("A".to_string(), 50)]);
        let stream = tokio::spawn(stream_backlogs(
            spool,
            scheduler.clone(),
            vec!["A".to_string()],
            "mem".into(),
        ));
        let pools = ["A".to_string()];
        let mut taken = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while taken.len() < ids.len() && tokio::time::Instant::now() < deadline {
            assert!(
                scheduler.in_memory("A") <= 12,
                "a window and a half at most"
            );
            match scheduler.try_take(&pools, &|_| true) {
                Some(job) => {
                    scheduler.finished(&job);
                    taken.push(job.id);
                }
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        assert_eq!(taken, ids, "every message once, oldest first");
        wait_until("the backlog ends once the pool is read", || {
            !scheduler.recovering()
        })
        .await;
        stream.abort();
    }

    /// Waits up to 10 s for `done`, failing with `what`.
    async fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
