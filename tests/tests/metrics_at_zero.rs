//! Counters exist from the start, at 0, for every configured pool,
//! upstream, listener and rejection reason: `rate()` and alerts see a series
//! before its first event (Prometheus practice).

use poolrelay_tests::{Relay, Sink, metric_sum, parse_metrics};

#[test]
fn counters_are_exported_at_zero_before_the_first_event() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    let samples = parse_metrics(&relay.scrape());
    let upstream = sink.addr().to_string();
    for (name, labels) in [
        (
            "poolrelay_deferred_recipients_total",
            vec![("pool", "A"), ("upstream", upstream.as_str())],
        ),
        (
            "poolrelay_delivered_recipients_total",
            vec![("pool", "-"), ("upstream", upstream.as_str())],
        ),
        ("poolrelay_bounced_recipients_total", vec![("pool", "A")]),
        ("poolrelay_bounced_recipients_total", vec![("pool", "-")]),
        (
            "poolrelay_smtp_rejections_total",
            vec![("reason", "relay_denied")],
        ),
        (
            "poolrelay_smtp_rejections_total",
            vec![("reason", "too_many_sessions")],
        ),
        ("poolrelay_received_messages_total", vec![("pool", "A")]),
    ] {
        assert_eq!(
            metric_sum(&samples, name, &labels),
            Some(0.0),
            "{name}{labels:?} should be exported at 0 from the start:\n{}",
            relay.scrape()
        );
    }
    let ready = metric_sum(&samples, "poolrelay_ready", &[]);
    assert_eq!(ready, Some(1.0));
}
