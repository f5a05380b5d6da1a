//! Priority between pools that share workers: one upstream, 2 workers,
//! pools B (priority 5) and A (0), a sink that holds each message 50 ms.
//! With a backlog of bulk mail in A, a burst of urgent mail to B waits for
//! at most one bulk transaction, while A keeps its share of the deliveries
//! and its backlog still drains.

use std::time::{Duration, SystemTime};

use poolrelay_tests::admin::queued_in;
use poolrelay_tests::priority::{
    BULK_FROM, SINK_DELAY_MS, percentiles, queue_backlog, send_burst, shared_upstream_relay,
    slow_sink, wait_for_burst,
};

/// Bulk messages queued in A: far more than the burst, and more than the
/// two workers deliver while the burst lasts (~40 a second).
const BACKLOG: usize = 1200;
/// Urgent messages sent to B, `GAP` apart.
const BURST: usize = 20;
const GAP: Duration = Duration::from_millis(100);
/// Slack for the relay's own work (spool reads, pipelined RSET/MAIL, the
/// sink writing its file) on a shared test machine.
const MARGIN: Duration = Duration::from_millis(60);

#[test]
fn urgent_mail_waits_for_at_most_one_bulk_transaction_while_bulk_keeps_its_share_and_drains() {
    let sink = slow_sink();
    let relay = shared_upstream_relay(&sink, 0);
    queue_backlog(&relay, BACKLOG);
    // Both workers busy with bulk mail, connections open.
    relay.wait_until("bulk deliveries under way", Duration::from_secs(30), || {
        sink.count() >= 20
    });

    let burst_start = SystemTime::now();
    let sent = send_burst(&relay, BURST, GAP);
    let left_after_burst = queued_in(&relay, "A") as usize;
    let (arrived, took) = wait_for_burst(&relay, &sink, &sent);
    let burst_end = sent
        .iter()
        .filter_map(|u| arrived.iter().find(|a| a.id == u.id))
        .map(|a| a.at)
        .max()
        .unwrap_or(burst_start);
    let during: Vec<_> = arrived
        .iter()
        .filter(|a| a.at >= burst_start && a.at <= burst_end)
        .collect();
    let bulk_during = during.iter().filter(|a| a.from == BULK_FROM).count();
    let (p50, p99, max) = percentiles(&took);
    let delay = Duration::from_millis(SINK_DELAY_MS);
    // Its own transaction, plus at most the rest of one bulk transaction.
    let bound = delay * 2 + MARGIN;
    eprintln!(
        "urgent latency from 250 to the sink (own transaction {delay:?} included): \
         p50 {p50:?} p99 {p99:?} max {max:?} (bound {bound:?}); all: {took:?}\n\
         during the burst: {} deliveries, {bulk_during} bulk ({:.0}%); \
         {left_after_burst} bulk still queued after the burst",
        during.len(),
        100.0 * bulk_during as f64 / during.len().max(1) as f64
    );
    assert!(
        left_after_burst > BACKLOG / 2,
        "the burst must meet a real backlog: only {left_after_burst} bulk messages were left"
    );
    assert!(
        max <= bound,
        "every urgent message must arrive within {bound:?} of its 250 \
         (one bulk transaction of {delay:?}, its own, {MARGIN:?} margin): {took:?}\n{}",
        relay.logs()
    );
    assert!(
        bulk_during * 10 >= during.len(),
        "bulk mail keeps at least 10% of the deliveries during the burst: \
         {bulk_during} of {}",
        during.len()
    );

    relay.wait_until(
        "the whole backlog delivered",
        Duration::from_secs(120),
        || sink.count() >= BACKLOG + BURST && queued_in(&relay, "A") == 0,
    );
    assert_eq!(sink.count(), BACKLOG + BURST, "each message delivered once");
}
