//! Prometheus metrics of the admin address (README.md, "Operating" >
//! "Metrics and health"): what flows through two pools is counted per pool
//! and upstream, histograms have buckets, labels stay bounded, and
//! `promtool check metrics` accepts the scrape.

use std::collections::BTreeSet;

use poolrelay_tests::operating::{COMMAND, DELIVERY, samples, send, two_pools, value};
use poolrelay_tests::{
    POLL_INTERVAL, Relay, Sink, metric_sum, parse_metrics, poll_until, promtool,
};

#[test]
fn metrics_count_what_flows_through_two_pools_and_pass_promtool_check_metrics() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    for i in 0..7 {
        send(&relay, "owner-lista@lists.test", &format!("metrics-a{i}"));
    }
    for i in 0..3 {
        send(&relay, "owner-b@lists.test", &format!("metrics-b{i}"));
    }

    let mut scraped = String::new();
    let settled = |text: &str| {
        let m = parse_metrics(text);
        let delivered = |pool| {
            value(
                &m,
                "poolrelay_delivered_recipients_total",
                &[("pool", pool)],
            )
        };
        let queued: f64 = ["A", "B"]
            .iter()
            .map(|p| value(&m, "poolrelay_queue_messages", &[("pool", p)]))
            .sum();
        delivered("A") == 7.0 && delivered("B") == 3.0 && queued == 0.0
    };
    if !poll_until(DELIVERY, POLL_INTERVAL, || {
        scraped = relay.scrape();
        settled(&scraped)
    }) {
        panic!(
            "the metrics never showed 7 recipients delivered in pool A, 3 in B and empty queues:\n{scraped}\n{}",
            relay.logs()
        );
    }
    let m = parse_metrics(&scraped);
    let ctx = || format!("--- scrape ---\n{scraped}\n{}", relay.logs());

    // Counters, per pool.
    let listener = relay.smtp_addr().to_string();
    for (pool, n) in [("A", 7.0), ("B", 3.0)] {
        assert_eq!(
            metric_sum(&m, "poolrelay_received_messages_total", &[("pool", pool)]),
            Some(n),
            "poolrelay_received_messages_total{{pool={pool:?}}}\n{}",
            ctx()
        );
        let upstream = if pool == "A" {
            sink_a.addr()
        } else {
            sink_b.addr()
        };
        assert_eq!(
            metric_sum(
                &m,
                "poolrelay_delivered_recipients_total",
                &[("pool", pool), ("upstream", &upstream.to_string())]
            ),
            Some(n),
            "poolrelay_delivered_recipients_total{{pool={pool:?},upstream=\"{upstream}\"}}\n{}",
            ctx()
        );
    }
    let received_listeners: BTreeSet<&str> = m
        .iter()
        .filter(|s| s.name == "poolrelay_received_messages_total")
        .filter_map(|s| s.labels.get("listener").map(String::as_str))
        .collect();
    assert_eq!(
        received_listeners,
        BTreeSet::from([listener.as_str()]),
        "the listener label of poolrelay_received_messages_total\n{}",
        ctx()
    );
    assert_eq!(
        value(&m, "poolrelay_deferred_recipients_total", &[])
            + value(&m, "poolrelay_bounced_recipients_total", &[]),
        0.0,
        "nothing was deferred or bounced\n{}",
        ctx()
    );

    // Gauges: every pool and state present, all 0 once delivered.
    for pool in ["A", "B", "-"] {
        for state in ["ready", "deferred", "held"] {
            assert_eq!(
                metric_sum(
                    &m,
                    "poolrelay_queue_messages",
                    &[("pool", pool), ("state", state)]
                ),
                Some(0.0),
                "poolrelay_queue_messages{{pool={pool:?},state={state:?}}} after delivery\n{}",
                ctx()
            );
        }
        assert_eq!(
            metric_sum(&m, "poolrelay_queue_oldest_age_seconds", &[("pool", pool)]),
            Some(0.0),
            "poolrelay_queue_oldest_age_seconds{{pool={pool:?}}} with an empty queue\n{}",
            ctx()
        );
    }
    for upstream in [sink_a.addr(), sink_b.addr()] {
        assert_eq!(
            metric_sum(
                &m,
                "poolrelay_upstream_up",
                &[("upstream", &upstream.to_string())]
            ),
            Some(1.0),
            "poolrelay_upstream_up for {upstream}\n{}",
            ctx()
        );
        assert!(
            metric_sum(
                &m,
                "poolrelay_upstream_connections",
                &[("upstream", &upstream.to_string())]
            )
            .is_some(),
            "poolrelay_upstream_connections for {upstream}\n{}",
            ctx()
        );
    }
    assert!(
        metric_sum(&m, "poolrelay_smtp_sessions", &[("listener", &listener)]).is_some(),
        "poolrelay_smtp_sessions{{listener=\"{listener}\"}}\n{}",
        ctx()
    );

    // Histograms with real buckets (not summaries).
    for (pool, n) in [("A", 7.0), ("B", 3.0)] {
        let les: BTreeSet<&str> = m
            .iter()
            .filter(|s| {
                s.name == "poolrelay_delivery_seconds_bucket" && s.matches(&[("pool", pool)])
            })
            .filter_map(|s| s.labels.get("le").map(String::as_str))
            .collect();
        assert!(
            les.len() >= 5 && les.contains("+Inf"),
            "poolrelay_delivery_seconds_bucket{{pool={pool:?}}} has buckets {les:?}\n{}",
            ctx()
        );
        assert_eq!(
            metric_sum(
                &m,
                "poolrelay_delivery_seconds_bucket",
                &[("pool", pool), ("le", "+Inf")]
            ),
            Some(n),
            "{}",
            ctx()
        );
        assert_eq!(
            metric_sum(&m, "poolrelay_delivery_seconds_count", &[("pool", pool)]),
            Some(n),
            "{}",
            ctx()
        );
    }
    let commit_buckets = m
        .iter()
        .filter(|s| s.name == "poolrelay_spool_commit_seconds_bucket")
        .count();
    assert!(
        commit_buckets >= 5 && value(&m, "poolrelay_spool_commit_seconds_count", &[]) >= 1.0,
        "poolrelay_spool_commit_seconds has {commit_buckets} bucket lines\n{}",
        ctx()
    );
    assert!(
        !scraped.contains("quantile="),
        "histograms must not be summaries\n{}",
        ctx()
    );

    // Process metrics and build info.
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "poolrelay_build_info",
    ] {
        assert!(
            metric_sum(&m, name, &[]).is_some_and(|v| v > 0.0),
            "{name} missing or 0\n{}",
            ctx()
        );
    }

    // Bounded cardinality: no label per message, recipient or client.
    let allowed: BTreeSet<&str> = BTreeSet::from([
        "listener", "pool", "state", "upstream", "reason", "le", "version",
    ]);
    let labels: BTreeSet<&str> = m
        .iter()
        .flat_map(|s| s.labels.keys().map(String::as_str))
        .collect();
    assert!(
        labels.is_subset(&allowed),
        "unexpected labels {:?}\n{}",
        labels.difference(&allowed).collect::<Vec<_>>(),
        ctx()
    );

    // The sinks agree.
    assert_eq!(sink_a.count(), 7, "messages at pool A's sink");
    assert_eq!(sink_b.count(), 3, "messages at pool B's sink");

    // promtool reads the scrape from stdin.
    let out = promtool(&["check", "metrics"], Some(scraped.as_bytes()), COMMAND);
    assert!(
        out.status.success() && out.stdout.trim().is_empty() && out.stderr.trim().is_empty(),
        "promtool check metrics on the scrape:\n{out}\n{}",
        ctx()
    );
}

/// README.md ("Metrics and health"): "Every series of a pool carries a
/// `pool` label", e.g.
/// `poolrelay_upstream_connections{pool,upstream}`: a `pool` label holds one
/// pool name, so `sum by (pool)` and `pool=~"$pool"` work on every series.
/// Here A's upstream also serves `-` (as LISTSERV's `POOL=A-` does).
#[test]
fn every_pool_label_names_a_single_configured_pool() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    let a = send(&relay, "owner-lista@lists.test", "label-a");
    let b = send(&relay, "owner-b@lists.test", "label-b");
    sink_a.wait_for_message_id(&a.message_id, DELIVERY);
    sink_b.wait_for_message_id(&b.message_id, DELIVERY);
    let mut m = Vec::new();
    relay.wait_until(
        "poolrelay_upstream_connections for both upstreams",
        DELIVERY,
        || {
            m = samples(&relay);
            [sink_a.addr(), sink_b.addr()].iter().all(|u| {
                m.iter().any(|s| {
                    s.name == "poolrelay_upstream_connections"
                        && s.labels.get("upstream") == Some(&u.to_string())
                })
            })
        },
    );
    let pools = ["A", "B", "-"];
    let bad: Vec<String> = m
        .iter()
        .filter_map(|s| {
            let p = s.labels.get("pool")?;
            (!pools.contains(&p.as_str())).then(|| format!("{}{:?}", s.name, s.labels))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "series whose pool label is not one of the pools {pools:?}:\n{}",
        bad.join("\n")
    );
}

// deploy/: alert rules, scrape config, dashboard
