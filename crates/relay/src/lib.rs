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

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use poolrelay_config::Config;
use poolrelay_spool::{FjallSpool, Spool, now_ms};

use crate::queue::Queue;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::limits::Limits;
use crate::listener::{Inbound, Rules};
use crate::scheduler::Scheduler;
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

    /// The spool, for reads.
    pub fn spool(&self) -> &dyn Spool {
        self.queue.spool()
    }

    /// Whether the relay can take mail: spool writable and listeners bound.
    pub fn ready(&self) -> bool {
        self.listeners_bound && self.spool().is_writable() && !*self.stopping.borrow()
    }

    /// Applies a new config without dropping sessions or queued mail: new
    /// routes at once, new workers (upstreams, windows, limits) after the
    /// old ones finish the message in hand. Refused, with the old config
    /// kept, when it removes a pool that still holds mail or changes listeners.
    pub async fn reload(&self, new: Config) -> Result<String, String> {
        let old = self.config();
        let counts = self.scheduler.counts();
        let mut orphaned: Vec<String> = counts
            .iter()
            .filter(|(pool, c)| !new.pools.contains_key(*pool) && c.ready + c.deferred > 0)
            .map(|(pool, c)| format!("{pool} ({} messages)", c.ready + c.deferred))
            .collect();
        if !orphaned.is_empty() {
            orphaned.sort();
            return Err(format!(
                "reload refused: the new config drops pools that still hold mail: {}; keep them (e.g. held, with no upstream) until they are empty, or move the mail first",
                orphaned.join(", ")
            ));
        }
        let old_listeners: BTreeSet<_> = old.listeners.iter().map(|l| l.address).collect();
        let new_listeners: BTreeSet<_> = new.listeners.iter().map(|l| l.address).collect();
        if old_listeners != new_listeners {
            return Err(
                "reload refused: listener addresses changed; that needs a restart".to_string(),
            );
        }
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
        tracing::info!("stopped");
    }
}

fn spawn_workers(shared: &Arc<Shared>, config: &Arc<Config>, health: &Health) -> Workers {
    metric::export_zeros(config);
    let (stop, stop_rx) = watch::channel(false);
    let generation = Arc::new(Generation {
        config: config.clone(),
        limits: Limits::new(config),
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
    Workers {
        stop,
        handles,
        generation: Some(generation),
    }
}

/// Opens the spool, recovers its mail into the scheduler, binds the
/// listeners and starts the workers.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let config = Arc::new(config);
    let spool_dir = config.server.spool_dir.clone();
    let min_free = config.server.spool_min_free;
    let spool: Arc<dyn Spool> = Arc::new(
        tokio::task::spawn_blocking(move || {
            FjallSpool::open_with(&spool_dir, Box::new(move |total| min_free.bytes_of(total)))
        })
        .await
        .map_err(|e| anyhow::anyhow!("spool open task failed: {e}"))??,
    );
    let scheduler = Arc::new(Scheduler::new());
    // Holds first: no worker may see a held pool's mail as ready.
    for pool in spool.held_pools()? {
        tracing::info!(pool = %pool, "pool held (recorded before the restart); `poolrelay queue release --pool {pool}` releases it");
        scheduler.set_held(&pool, true);
    }
    let queue = Queue::new(spool.clone(), scheduler.clone());
    let started = std::time::Instant::now();
    let recovered = recover(&spool, &scheduler).await?;
    tracing::info!(
        spool = %config.server.spool_dir.display(),
        messages = recovered,
        seconds = format_args!("{:.3}", started.elapsed().as_secs_f64()),
        "spool recovered"
    );
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
    });
    let workers = spawn_workers(&shared, &config, &health);
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
    })
}
/// Loads every queued message with a pending recipient into the scheduler,
/// and removes records whose recipients were all done (a crash between the
/// last delivery and the removal leaves them behind).
async fn recover(spool: &Arc<dyn Spool>, scheduler: &Arc<Scheduler>) -> anyhow::Result<usize> {
    let reader = spool.clone();
    let index = scheduler.clone();
    let (count, finished) = tokio::task::spawn_blocking(move || {
        let mut count = 0usize;
        let mut finished = Vec::new();
        let now = now_ms();
        reader.recover(&mut |id, envelope| {
            if envelope.is_done() {
                finished.push((id, envelope.pool));
                return;
            }
            let due = if envelope.next_attempt_ms > now {
                envelope.next_attempt_ms
            } else {
                0
            };
            index.enqueue(id, &envelope.pool, due, envelope.mt_priority_or_default());
            count += 1;
        })?;
        Ok::<_, poolrelay_spool::SpoolError>((count, finished))
    })
    .await
    .map_err(|e| anyhow::anyhow!("spool recovery task failed: {e}"))??;
    for (id, pool) in finished {
        spool.remove(id, &pool).await?;
    }
    Ok(count)
}
