//! Every metric poolrelay exports, declared once: name, kind, help text,
//! labels and histogram buckets. Code that counts uses these constants'
//! names; the exporter describes them from [`ALL`]; README's metric table
//! is checked against [`ALL`] by a test. No label carries a per-message,
//! per-recipient or per-client value, so cardinality stays bounded.

use poolrelay_config::Config;
use poolrelay_smtp::inbound::Rejection;

/// Prometheus metric kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

impl Kind {
    /// The word in the README table and in `# TYPE` lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Series name.
    pub name: &'static str,
    /// Kind.
    pub kind: Kind,
    /// `# HELP` text.
    pub help: &'static str,
    /// Label names, in order.
    pub labels: &'static [&'static str],
    /// Bucket bounds of a histogram, seconds.
    pub buckets: &'static [f64],
}

const fn metric(
    name: &'static str,
    kind: Kind,
    help: &'static str,
    labels: &'static [&'static str],
) -> Metric {
    Metric {
        name,
        kind,
        help,
        labels,
        buckets: &[],
    }
}

/// Latency buckets, seconds: 1 ms to 1 day (a message may wait a day).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0, 14400.0, 86400.0,
];
/// Spool commit buckets, seconds: 50 µs to 1 s (an fsync on a fast disk to a stalled one).
const COMMIT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Messages accepted (250 sent).
pub const RECEIVED_MESSAGES: Metric = metric(
    "poolrelay_received_messages_total",
    Kind::Counter,
    "Messages accepted (250 sent), by listener and pool.",
    &["listener", "pool"],
);
/// Recipients an upstream accepted.
pub const DELIVERED_RECIPIENTS: Metric = metric(
    "poolrelay_delivered_recipients_total",
    Kind::Counter,
    "Recipients an upstream accepted.",
    &["pool", "upstream"],
);
/// Recipient attempts that failed temporarily.
pub const DEFERRED_RECIPIENTS: Metric = metric(
    "poolrelay_deferred_recipients_total",
    Kind::Counter,
    "Recipient attempts that failed temporarily (including attempts that found every host down).",
    &["pool", "upstream"],
);
/// Recipients that failed permanently or expired.
pub const BOUNCED_RECIPIENTS: Metric = metric(
    "poolrelay_bounced_recipients_total",
    Kind::Counter,
    "Recipients that failed permanently or expired.",
    &["pool"],
);
/// Queued messages by pool and state.
pub const QUEUE_MESSAGES: Metric = metric(
    "poolrelay_queue_messages",
    Kind::Gauge,
    "Queued messages by pool and state (ready, deferred, held); on a replicated spool, the whole cluster's queue.",
    &["pool", "state"],
);
/// Age of the oldest queued message of each pool.
pub const QUEUE_OLDEST_AGE: Metric = metric(
    "poolrelay_queue_oldest_age_seconds",
    Kind::Gauge,
    "Age of the oldest queued message of each pool.",
    &["pool"],
);
/// Time from accept to the last recipient done.
pub const DELIVERY_SECONDS: Metric = Metric {
    buckets: LATENCY_BUCKETS,
    ..metric(
        "poolrelay_delivery_seconds",
        Kind::Histogram,
        "Time from accept to the last recipient done.",
        &["pool"],
    )
};
/// Whether an upstream host answers.
pub const UPSTREAM_UP: Metric = metric(
    "poolrelay_upstream_up",
    Kind::Gauge,
    "1 when the upstream host answers, 0 while it is marked down.",
    &["upstream"],
);
/// Open connections per upstream and pool served.
pub const UPSTREAM_CONNECTIONS: Metric = metric(
    "poolrelay_upstream_connections",
    Kind::Gauge,
    "Open connections to each upstream, by the pools its workers serve.",
    &["pool", "upstream"],
);
/// Time to commit and fsync one spool batch.
pub const SPOOL_COMMIT_SECONDS: Metric = Metric {
    buckets: COMMIT_BUCKETS,
    ..metric(
        poolrelay_spool::COMMIT_SECONDS,
        Kind::Histogram,
        "Time to commit and fsync one spool batch (jetstream: one append until the quorum acknowledged it).",
        &[],
    )
};
/// Inbound sessions open now.
pub const SMTP_SESSIONS: Metric = metric(
    "poolrelay_smtp_sessions",
    Kind::Gauge,
    "Inbound SMTP sessions open now.",
    &["listener"],
);
/// Inbound commands or messages refused.
pub const SMTP_REJECTIONS: Metric = metric(
    "poolrelay_smtp_rejections_total",
    Kind::Counter,
    "Inbound commands, messages or connections refused, by reason.",
    &["listener", "reason"],
);
/// Inbound sessions that started TLS.
pub const SMTP_TLS_SESSIONS: Metric = metric(
    "poolrelay_smtp_tls_sessions_total",
    Kind::Counter,
    "Inbound sessions that completed a TLS handshake (STARTTLS or implicit), by listener.",
    &["listener"],
);
/// AUTH attempts by outcome.
pub const SMTP_AUTH: Metric = metric(
    "poolrelay_smtp_auth_total",
    Kind::Counter,
    "Inbound AUTH attempts checked against the users_file, by listener and result (success, failure, blocked).",
    &["listener", "result"],
);
/// Signatures added at acceptance.
pub const SIGNATURES: Metric = metric(
    "poolrelay_signatures_total",
    Kind::Counter,
    "Signatures added to accepted messages, by signing domain and kind (dkim: a DKIM-Signature; arc: an ARC set).",
    &["domain", "kind"],
);
/// Signatures that failed (the message went out without them).
pub const SIGNING_FAILURES: Metric = metric(
    "poolrelay_signing_failures_total",
    Kind::Counter,
    "Signatures that could not be made; the message was relayed without them.",
    &["domain", "kind"],
);
/// Whether the relay takes mail.
pub const READY: Metric = metric(
    "poolrelay_ready",
    Kind::Gauge,
    "1 when the spool is writable and listeners are bound (what /readyz answers).",
    &[],
);
/// Progress of the recovery after a restart.
pub const RECOVERY_REMAINING: Metric = metric(
    "poolrelay_recovery_remaining_messages",
    Kind::Gauge,
    "Queued messages on disk only, not yet in the scheduler: what recovery has still to read after a restart, new mail past a full window, and deferred mail past a full window in the due-time index (an estimate; 0 when the scheduler holds every queued message).",
    &[],
);
/// Relays sharing a pool's rate limits.
pub const CLUSTER_NODES: Metric = metric(
    "poolrelay_cluster_nodes",
    Kind::Gauge,
    "Live relays draining the pool, this one included (1 with the embedded spool): each takes this share of the pool's rate limits.",
    &["pool"],
);
/// Build information.
pub const BUILD_INFO: Metric = metric(
    "poolrelay_build_info",
    Kind::Gauge,
    "Build information.",
    &["version"],
);
/// Resident memory.
pub const RESIDENT_MEMORY: Metric = metric(
    "process_resident_memory_bytes",
    Kind::Gauge,
    "Resident memory of the relay.",
    &[],
);
/// Open file descriptors.
pub const OPEN_FDS: Metric = metric(
    "process_open_fds",
    Kind::Gauge,
    "Open file descriptors of the relay.",
    &[],
);

/// Every metric, in README order.
pub const ALL: &[Metric] = &[
    RECEIVED_MESSAGES,
    DELIVERED_RECIPIENTS,
    DEFERRED_RECIPIENTS,
    BOUNCED_RECIPIENTS,
    QUEUE_MESSAGES,
    QUEUE_OLDEST_AGE,
    DELIVERY_SECONDS,
    UPSTREAM_UP,
    UPSTREAM_CONNECTIONS,
    SPOOL_COMMIT_SECONDS,
    SMTP_SESSIONS,
    SMTP_REJECTIONS,
    SMTP_TLS_SESSIONS,
    SMTP_AUTH,
    SIGNATURES,
    SIGNING_FAILURES,
    READY,
    RECOVERY_REMAINING,
    CLUSTER_NODES,
    BUILD_INFO,
    RESIDENT_MEMORY,
    OPEN_FDS,
];

/// The rejection reason of a connection refused at `max_sessions`.
pub const TOO_MANY_SESSIONS: &str = "too_many_sessions";
/// The rejection reason of a connection refused at `max_sessions_per_client`.
pub const TOO_MANY_SESSIONS_PER_CLIENT: &str = "too_many_sessions_per_client";

/// Every `result` label of [`SMTP_AUTH`]: accepted, wrong credentials,
/// refused unchecked because the address had too many failures.
pub const AUTH_RESULTS: [&str; 3] = ["success", "failure", "blocked"];

/// Every `reason` label of [`SMTP_REJECTIONS`].
pub fn rejection_reasons() -> Vec<&'static str> {
    Rejection::ALL
        .iter()
        .map(|r| r.label())
        .chain([TOO_MANY_SESSIONS, TOO_MANY_SESSIONS_PER_CLIENT])
        .collect()
}

/// Registers the help texts with the installed recorder.
pub fn describe() {
    for m in ALL {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// Exports every counter of the config's known pools, upstreams,
/// listeners and reasons at 0 (adding nothing to counters that exist), so
/// dashboards and `rate()` see a series before its first event.
pub fn export_zeros(config: &Config) {
    let pools = config.pool_names();
    for pool in &pools {
        metrics::counter!(BOUNCED_RECIPIENTS.name, "pool" => pool.clone()).increment(0);
    }
    for upstream in &config.upstreams {
        let served: Vec<&String> = if upstream.pools.is_empty() {
            pools.iter().collect()
        } else {
            upstream.pools.iter().collect()
        };
        let hosts = std::iter::once(&upstream.host)
            .chain(&upstream.failover)
            .chain(&config.defaults.fallback);
        for host in hosts {
            for pool in &served {
                for m in [DELIVERED_RECIPIENTS, DEFERRED_RECIPIENTS] {
                    metrics::counter!(m.name, "pool" => (*pool).clone(), "upstream" => host.clone())
                        .increment(0);
                }
            }
        }
    }
    for d in &config.dkim {
        for m in [SIGNATURES, SIGNING_FAILURES] {
            metrics::counter!(m.name, "domain" => d.domain.clone(), "kind" => "dkim").increment(0);
        }
    }
    for pool in &pools {
        if let Some(d) = config.arc_key_for(pool) {
            for m in [SIGNATURES, SIGNING_FAILURES] {
                metrics::counter!(m.name, "domain" => d.domain.clone(), "kind" => "arc")
                    .increment(0);
            }
        }
    }
    for listener in &config.listeners {
        for reason in rejection_reasons() {
            metrics::counter!(SMTP_REJECTIONS.name, "listener" => listener.name.clone(), "reason" => reason)
                .increment(0);
        }
        if listener.tls.is_some() {
            metrics::counter!(SMTP_TLS_SESSIONS.name, "listener" => listener.name.clone())
                .increment(0);
        }
        if listener.auth != poolrelay_config::AuthPolicy::Off {
            for result in AUTH_RESULTS {
                metrics::counter!(SMTP_AUTH.name, "listener" => listener.name.clone(), "result" => result)
                    .increment(0);
            }
        }
        let targets: Vec<&String> = match &listener.pool {
            Some(p) => pools.iter().filter(|n| *n == p).collect(),
            None => pools.iter().collect(),
        };
        for pool in targets {
            metrics::counter!(RECEIVED_MESSAGES.name, "listener" => listener.name.clone(), "pool" => pool.clone())
                .increment(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's metric table: (names, kind, labels) per row.
    fn readme_rows() -> Vec<(Vec<String>, String, String)> {
        let readme = include_str!("../../../README.md");
        readme
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("| `poolrelay_") || l.starts_with("| `process_"))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
                let names = cells[0]
                    .split(',')
                    .map(|n| n.trim().trim_matches('`').to_string())
                    .collect();
                (
                    names,
                    cells[1].to_string(),
                    cells.get(2).unwrap_or(&"").to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn the_readme_table_lists_every_metric_with_its_kind_and_labels() {
        let rows = readme_rows();
        for m in ALL {
            let row = rows
                .iter()
                .find(|(names, _, _)| names.iter().any(|n| n == m.name))
                .unwrap_or_else(|| panic!("README's metric table lacks {}", m.name));
            assert_eq!(row.1, m.kind.as_str(), "kind of {}", m.name);
            for label in m.labels {
                assert!(
                    row.2.contains(label),
                    "README names no label {label} for {}: {:?}",
                    m.name,
                    row.2
                );
            }
        }
        for (names, _, _) in &rows {
            for n in names {
                assert!(
                    ALL.iter().any(|m| m.name == n),
                    "README lists {n}, which the relay does not declare"
                );
            }
        }
    }

    #[test]
    fn histograms_have_buckets_and_others_none() {
        for m in ALL {
            assert_eq!(
                m.kind == Kind::Histogram,
                !m.buckets.is_empty(),
                "{}",
                m.name
            );
        }
    }

    #[test]
    fn every_rejection_reason_is_a_short_stable_label() {
        let reasons = rejection_reasons();
        assert!(reasons.contains(&"relay_denied"));
        assert!(reasons.contains(&TOO_MANY_SESSIONS));
        assert!(reasons.contains(&TOO_MANY_SESSIONS_PER_CLIENT));
        assert!(
            reasons
                .iter()
                .all(|r| r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        );
    }
}
