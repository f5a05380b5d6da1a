//! The engine: listeners accept and classify, the spool keeps, the
//! scheduler orders, workers deliver. Data flows one way:
//! listener -> classifier -> spool -> scheduler -> worker -> result (DSN).
//!
//! [`start`] wires them for one config and returns a [`Running`] relay.

pub mod classifier;
pub mod dsn;
pub mod listener;
pub mod scheduler;
pub mod upstream;
pub mod worker;

use std::sync::Arc;

use poolrelay_config::Config;
use poolrelay_spool::{FjallSpool, Spool, now_ms};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::classifier::Classifier;
use crate::listener::{Inbound, OnQueued};
use crate::scheduler::Scheduler;
use crate::upstream::Health;
use crate::worker::Shared;

/// A running relay.
pub struct Running {
    /// The spool, for the admin API.
    pub spool: FjallSpool,
    /// The index, for the admin API and metrics.
    pub scheduler: Arc<Scheduler>,
    /// Upstream health, for metrics.
    pub health: Arc<Health>,
    /// The config it runs.
    pub config: Arc<Config>,
    stop: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, stops the workers, and lets the spool writer finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for l in self.listeners {
            let _ = l.await;
        }
        for w in &self.workers {
            w.abort();
        }
        for w in self.workers {
            let _ = w.await;
        }
    }
}

/// Opens the spool, recovers its mail into the scheduler, binds the
/// listeners and starts the workers.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let config = Arc::new(config);
    let spool_dir = config.server.spool_dir.clone();
    let spool = tokio::task::spawn_blocking(move || FjallSpool::open(&spool_dir))
        .await
        .map_err(|e| anyhow::anyhow!("spool open task failed: {e}"))??;
    let scheduler = Arc::new(Scheduler::new());
    let recovered = recover(&spool, &scheduler).await?;
    tracing::info!(
        spool = %config.server.spool_dir.display(),
        messages = recovered,
        "spool recovered"
    );
    let bound = listener::bind_all(&config).await?;
    let (stop, stopping) = watch::channel(false);
    let on_queued: OnQueued = {
        let scheduler = scheduler.clone();
        Arc::new(move |id, pool| scheduler.enqueue(id, pool, 0))
    };
    let inbound = Arc::new(Inbound {
        config: config.clone(),
        classifier: Classifier::new(&config),
        spool: spool.clone(),
        on_queued,
        sessions: Arc::new(Semaphore::new(config.server.max_sessions)),
        stopping,
    });
    let mut listeners = Vec::new();
    for (l, socket) in bound {
        tracing::info!(listener = %l.name, address = %l.address, pool = l.pool.as_deref().unwrap_or("(routes)"), "listening");
        listeners.push(tokio::spawn(listener::serve(inbound.clone(), l, socket)));
    }
    let health = Arc::new(Health::new());
    let shared = Arc::new(Shared {
        config: config.clone(),
        spool: spool.clone(),
        scheduler: scheduler.clone(),
        health: health.clone(),
    });
    let mut workers = Vec::new();
    for upstream in &config.upstreams {
        for i in 0..upstream.workers {
            workers.push(tokio::spawn(worker::run(
                shared.clone(),
                upstream.clone(),
                i,
            )));
        }
    }
    Ok(Running {
        spool,
        scheduler,
        health,
        config,
        stop,
        listeners,
        workers,
    })
}

/// Loads every queued message with a pending recipient into the scheduler.
async fn recover(spool: &FjallSpool, scheduler: &Arc<Scheduler>) -> anyhow::Result<usize> {
    let spool = spool.clone();
    let scheduler = scheduler.clone();
    let count = tokio::task::spawn_blocking(move || {
        let mut count = 0usize;
        let now = now_ms();
        spool.recover(&mut |id, envelope| {
            if envelope.is_done() {
                return;
            }
            let due = if envelope.next_attempt_ms > now {
                envelope.next_attempt_ms
            } else {
                0
            };
            scheduler.enqueue(id, &envelope.pool, due);
            count += 1;
        })?;
        Ok::<_, poolrelay_spool::SpoolError>(count)
    })
    .await
    .map_err(|e| anyhow::anyhow!("spool recovery task failed: {e}"))??;
    Ok(count)
}
