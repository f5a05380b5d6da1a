//! Metrics set-up and the gauges computed at scrape time (queue depth,
//! oldest age, process figures), so they are current whenever Prometheus looks.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use poolrelay_relay::Running;

/// Buckets for latency histograms, seconds: 1 ms to 1 day.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0, 14400.0, 86400.0,
];
/// Buckets for spool commits, seconds: 50 µs to 1 s.
const COMMIT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Installs the Prometheus recorder; histograms get real buckets.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("poolrelay_delivery_seconds".into()),
            LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("poolrelay_spool_commit_seconds".into()),
            COMMIT_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    metrics::gauge!("poolrelay_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "poolrelay_received_messages_total",
        "Messages accepted (250 sent), by listener and pool."
    );
    describe_counter!(
        "poolrelay_delivered_recipients_total",
        "Recipients an upstream accepted."
    );
    describe_counter!(
        "poolrelay_deferred_recipients_total",
        "Recipient attempts that failed temporarily."
    );
    describe_counter!(
        "poolrelay_bounced_recipients_total",
        "Recipients that failed permanently or expired."
    );
    describe_gauge!(
        "poolrelay_queue_messages",
        "Queued messages by pool and state (ready, deferred, held)."
    );
    describe_gauge!(
        "poolrelay_queue_oldest_age_seconds",
        "Age of the oldest queued message of each pool."
    );
    describe_histogram!(
        "poolrelay_delivery_seconds",
        "Time from accept to the last recipient done."
    );
    describe_gauge!(
        "poolrelay_upstream_up",
        "1 when the upstream host answers, 0 while it is marked down."
    );
    describe_gauge!(
        "poolrelay_upstream_connections",
        "Open connections to each upstream, by the pools its workers serve."
    );
    describe_histogram!(
        "poolrelay_spool_commit_seconds",
        "Time to commit and fsync one spool batch."
    );
    describe_gauge!("poolrelay_smtp_sessions", "Inbound SMTP sessions open now.");
    describe_counter!(
        "poolrelay_smtp_rejections_total",
        "Inbound commands or messages refused, by reason."
    );
    describe_gauge!("poolrelay_build_info", "Build information.");
    describe_gauge!(
        "poolrelay_ready",
        "1 when the spool is writable and listeners are bound (what /readyz answers)."
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        "Resident memory of the relay."
    );
    describe_gauge!("process_open_fds", "Open file descriptors of the relay.");
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
            metrics::gauge!("poolrelay_queue_messages", "pool" => pool.pool.clone(), "state" => state).set(value as f64);
        }
        metrics::gauge!("poolrelay_queue_oldest_age_seconds", "pool" => pool.pool.clone())
            .set(pool.oldest_age_seconds);
    }
    metrics::gauge!("poolrelay_ready").set(if relay.ready() { 1.0 } else { 0.0 });
    if let Some(rss) = resident_bytes() {
        metrics::gauge!("process_resident_memory_bytes").set(rss as f64);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(fds.count() as f64);
    }
}

fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
