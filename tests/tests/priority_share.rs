//! No starvation: while the urgent pool B (priority 5) has a backlog of its
//! own, the bulk pool A still gets its `lower_priority_share` (10%) of the
//! shared workers' deliveries, and no more than a small multiple of it.

use std::time::Duration;

use poolrelay_tests::admin::{api_post, queued_in};
use poolrelay_tests::listserv::bulk_send;
use poolrelay_tests::priority::{
    BULK_FROM, RCPT, URGENT_FROM, arrivals, shared_upstream_relay, slow_sink,
};
use poolrelay_tests::{message, unique_id};

const BULK: usize = 300;
const URGENT: usize = 200;

#[test]
fn bulk_keeps_its_ten_percent_while_urgent_mail_has_a_backlog() {
    let sink = slow_sink();
    let relay = shared_upstream_relay(&sink, 0);
    api_post(&relay, "/api/v1/pools/A/hold");
    api_post(&relay, "/api/v1/pools/B/hold");
    for (from, n) in [(BULK_FROM, BULK), (URGENT_FROM, URGENT)] {
        let make = |i: usize| message(&unique_id(&format!("m{i}")), from, RCPT, "s", "x\n");
        bulk_send(relay.smtp_addr(), 2, n, from, &make);
    }
    relay.wait_until("both backlogs queued", Duration::from_secs(30), || {
        queued_in(&relay, "A") as usize == BULK && queued_in(&relay, "B") as usize == URGENT
    });
    // B first, so A gets nothing before B competes.
    api_post(&relay, "/api/v1/pools/B/release");
    api_post(&relay, "/api/v1/pools/A/release");
    relay.wait_until(
        "the urgent backlog delivered",
        Duration::from_secs(60),
        || queued_in(&relay, "B") == 0,
    );
    let arrived = arrivals(&sink);
    let last_urgent = arrived
        .iter()
        .filter(|a| a.from == URGENT_FROM)
        .map(|a| a.at)
        .max()
        .expect("urgent mail arrived");
    let before: Vec<_> = arrived.iter().filter(|a| a.at <= last_urgent).collect();
    let bulk = before.iter().filter(|a| a.from == BULK_FROM).count();
    let share = bulk as f64 / before.len() as f64;
    eprintln!(
        "while B had a backlog: {} deliveries, {bulk} of them bulk ({:.1}%)",
        before.len(),
        share * 100.0
    );
    assert!(
        (0.08..=0.20).contains(&share),
        "bulk gets about its 10% share while urgent mail has a backlog, \
         not nothing and not FIFO: {bulk} of {}",
        before.len()
    );
    relay.wait_until(
        "the bulk backlog delivered",
        Duration::from_secs(60),
        || sink.count() == BULK + URGENT,
    );
}
