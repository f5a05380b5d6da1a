//! Metrics set-up and the gauges computed at scrape time (queue depth,
//! oldest age, process figures), so they are current whenever Prometheus looks.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use poolrelay_relay::{Running, metric};

/// Installs the Prometheus recorder with the catalog's help texts and
/// histogram buckets (`poolrelay_relay::metric`).
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new();
    for m in metric::ALL
        .iter()
        .filter(|m| m.kind == metric::Kind::Histogram)
    {
        builder = builder.set_buckets_for_metric(Matcher::Full(m.name.into()), m.buckets)?;
    }
    let handle = builder.install_recorder()?;
    metric::describe();
    metrics::gauge!(metric::BUILD_INFO.name, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// Folds recorded histogram samples into their buckets every few seconds,
/// so memory stays bounded between scrapes (the exporter's upkeep).
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// Updates the scrape-time gauges.
pub fn refresh(relay: &Running) {
    for pool in relay.pool_summaries() {
        let (ready, held) = if pool.held {
            (0, pool.ready)
        } else {
            (pool.ready, 0)
        };
        for (state, value) in [
            ("ready", ready),
            ("deferred", pool.deferred),
            ("held", held),
        ] {
            metrics::gauge!(metric::QUEUE_MESSAGES.name, "pool" => pool.pool.clone(), "state" => state).set(value as f64);
        }
        metrics::gauge!(metric::QUEUE_OLDEST_AGE.name, "pool" => pool.pool.clone())
            .set(pool.oldest_age_seconds);
    }
    let nodes = relay.live_nodes();
    for pool in relay.config().pool_names() {
        metrics::gauge!(metric::CLUSTER_NODES.name, "pool" => pool.clone())
            .set(nodes.draining(&pool) as f64);
    }
    metrics::gauge!(metric::READY.name).set(if relay.ready() { 1.0 } else { 0.0 });
    metrics::gauge!(metric::RECOVERY_REMAINING.name)
        .set(relay.scheduler.recovery_remaining() as f64);
    if let Some(rss) = resident_bytes() {
        metrics::gauge!(metric::RESIDENT_MEMORY.name).set(rss as f64);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!(metric::OPEN_FDS.name).set(fds.count() as f64);
    }
}

fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
