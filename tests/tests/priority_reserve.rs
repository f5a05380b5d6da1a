//! `reserve_workers = 1`: of an upstream's 2 workers, one serves only pools
//! above priority 0, so a burst of urgent mail to B (priority 5) waits for
//! no bulk transaction of A, however large A's backlog.

use std::time::{Duration, SystemTime};

use poolrelay_tests::admin::queued_in;
use poolrelay_tests::priority::{
    BULK_FROM, SINK_DELAY_MS, percentiles, queue_backlog, send_burst, shared_upstream_relay,
    slow_sink, wait_for_burst,
};

/// Bulk messages queued in A; the one worker left for bulk delivers ~20 a second.
const BACKLOG: usize = 600;
const BURST: usize = 20;
const GAP: Duration = Duration::from_millis(100);
/// Slack for the relay's own work; well under one bulk transaction
/// (`SINK_DELAY_MS`), so waiting for one would fail the test.
const MARGIN: Duration = Duration::from_millis(30);

#[test]
fn with_a_reserved_worker_urgent_mail_waits_for_no_bulk_transaction() {
    let sink = slow_sink();
    let relay = shared_upstream_relay(&sink, 1);
    queue_backlog(&relay, BACKLOG);
    relay.wait_until("bulk deliveries under way", Duration::from_secs(30), || {
        sink.count() >= 10
    });

    let burst_start = SystemTime::now();
    let sent = send_burst(&relay, BURST, GAP);
    let left_after_burst = queued_in(&relay, "A") as usize;
    let (arrived, took) = wait_for_burst(&relay, &sink, &sent);
    let bulk_during = arrived
        .iter()
        .filter(|a| a.at >= burst_start && a.from == BULK_FROM)
        .count();
    let (p50, p99, max) = percentiles(&took);
    let delay = Duration::from_millis(SINK_DELAY_MS);
    let bound = delay + MARGIN;
    eprintln!(
        "urgent latency from 250 to the sink (own transaction {delay:?} included), \
         1 of 2 workers reserved: p50 {p50:?} p99 {p99:?} max {max:?} (bound {bound:?}); \
         all: {took:?}\n{bulk_during} bulk deliveries meanwhile, {left_after_burst} bulk still queued"
    );
    assert!(
        left_after_burst > BACKLOG / 2,
        "the burst must meet a real backlog: only {left_after_burst} bulk messages were left"
    );
    assert!(
        bulk_during > 0,
        "the unreserved worker keeps delivering bulk mail during the burst"
    );
    assert!(
        max <= bound,
        "with a reserved worker every urgent message arrives within its own transaction \
         ({delay:?}) plus {MARGIN:?}, never after a bulk one: {took:?}\n{}",
        relay.logs()
    );
}
