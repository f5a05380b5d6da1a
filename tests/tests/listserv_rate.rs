//! Pool bandwidth limits (LISTSERV's `SMTP_RATE_LIMIT=A:400kbps`): a pool
//! at its limit delivers at that rate, ±20% over 10 s, while another pool
//! served by the same workers runs unlimited.

use std::time::{Duration, SystemTime};

use poolrelay_tests::listserv::{MEMBER, bulk_send};
use poolrelay_tests::{Relay, Sink, SinkMessage, message, unique_id};

/// Pool A's limit, bits per second.
const LIMIT_BPS: f64 = 400_000.0;
/// Body bytes of each message: about 10 KB, so A runs at ~5 messages a second.
const BODY_BYTES: usize = 10_000;
/// Messages queued in each pool.
const PER_POOL: usize = 100;
/// The measuring window.
const WINDOW: Duration = Duration::from_secs(10);
/// Arrivals of A skipped before the window starts: the bucket starts full
/// (one second's worth), so the first messages leave at once.
const SKIP: usize = 8;

const FROM_A: &str = "owner-NEWSLETTER@LISTSERV.EXAMPLE.ORG";
const FROM_B: &str = "owner-ANNOUNCE@LISTSERV.EXAMPLE.ORG";

fn body() -> String {
    // 100 lines of 98 characters + CRLF = 10,000 bytes.
    let line = "x".repeat(98);
    std::iter::repeat_n(line.as_str(), BODY_BYTES / 100)
        .collect::<Vec<_>>()
        .join("\n")
}

fn mtime(m: &SinkMessage) -> SystemTime {
    std::fs::metadata(&m.file)
        .and_then(|md| md.modified())
        .unwrap_or_else(|e| panic!("mtime of {}: {e}", m.file.display()))
}

/// A's bandwidth over [`WINDOW`], measured from the sink's file times
/// once [`SKIP`] messages from `from` arrived: (messages, bytes, bits per
/// second, how many had arrived in all at the end).
fn measure(relay: &Relay, sink: &Sink, from: &str) -> (usize, usize, f64, usize) {
    let arrivals = || {
        let mut v: Vec<(SystemTime, usize)> = sink
            .messages()
            .into_iter()
            .filter(|m| m.from.eq_ignore_ascii_case(from))
            .map(|m| (mtime(&m), m.raw.len()))
            .collect();
        v.sort();
        v
    };
    relay.wait_until(
        &format!("{SKIP} messages from <{from}>"),
        Duration::from_secs(30),
        || arrivals().len() >= SKIP,
    );
    let start = arrivals()[SKIP - 1].0;
    let end = start + WINDOW;
    relay.wait_until(
        "the 10 s measuring window to pass",
        WINDOW + Duration::from_secs(5),
        || SystemTime::now() > end + Duration::from_millis(300),
    );
    let all = arrivals();
    let in_window: Vec<&(SystemTime, usize)> = all
        .iter()
        .filter(|(t, _)| *t > start && *t <= end)
        .collect();
    let bytes: usize = in_window.iter().map(|(_, n)| n).sum();
    let bps = bytes as f64 * 8.0 / WINDOW.as_secs_f64();
    (in_window.len(), bytes, bps, all.len())
}

fn assert_near_limit(relay: &Relay, what: &str, bps: f64, arrived: usize) {
    assert!(
        arrived < PER_POOL,
        "{what}: mail must still be queued at the end of the window (else the rate measured \
         is not the limit's): all {PER_POOL} arrived"
    );
    assert!(
        (LIMIT_BPS * 0.8..=LIMIT_BPS * 1.2).contains(&bps),
        "{what}: delivered {:.0} kbps over {WINDOW:?}; the limit is {:.0} kbps (±20%)\n{}",
        bps / 1000.0,
        LIMIT_BPS / 1000.0,
        relay.logs()
    );
}

fn maker(from: &'static str, body: &str) -> impl Fn(usize) -> String + Sync {
    let body = body.to_string();
    move |i: usize| message(&unique_id(&format!("rate{i}")), from, MEMBER, "rate", &body)
}

#[test]
fn pool_at_its_bandwidth_limit_delivers_at_that_rate_while_another_pool_runs_unlimited() {
    let sink = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n\
             [pool.A]\nrate_limit = \"400kbps\"\n[pool.B]\n\n\
             [[upstream]]\nhost = \"{}\"\nworkers = 2\npools = [\"A\", \"B\", \"-\"]\n\n\
             [[route]]\npool = \"B\"\nsender = \"owner-announce@*\"\n",
            s.head(),
            s.listener(""),
            sink.addr()
        )
    });
    let body = body();
    let took_a = bulk_send(
        relay.smtp_addr(),
        2,
        PER_POOL,
        FROM_A,
        &maker(FROM_A, &body),
    );
    let b_start = std::time::Instant::now();
    let took_b = bulk_send(
        relay.smtp_addr(),
        2,
        PER_POOL,
        FROM_B,
        &maker(FROM_B, &body),
    );
    let count_b = || {
        sink.messages()
            .iter()
            .filter(|m| m.from.eq_ignore_ascii_case(FROM_B))
            .count()
    };
    // B, unlimited, shares A's workers and is not held back by A's limit.
    relay.wait_until("all of pool B to arrive", Duration::from_secs(30), || {
        count_b() >= PER_POOL
    });
    let b_all = b_start.elapsed();
    let (n, bytes, bps, arrived) = measure(&relay, &sink, FROM_A);
    eprintln!(
        "queued {PER_POOL} A in {took_a:?}, {PER_POOL} B in {took_b:?}; all of B arrived {b_all:?} \
         after B's sending began; A in 10 s: {n} messages, {bytes} bytes = {:.0} kbps (limit {:.0} kbps)",
        bps / 1000.0,
        LIMIT_BPS / 1000.0
    );
    assert_near_limit(&relay, "pool A (rate_limit 400kbps)", bps, arrived);
    assert!(
        b_all <= Duration::from_secs(5),
        "pool B (unlimited) took {b_all:?} to deliver {PER_POOL} messages while A was limited\n{}",
        relay.logs()
    );
}

/// LISTSERV semantics: each message obeys its pool's limit and the
/// server-wide one, whichever is stricter. Pool A allows 2 Mbps, the server
/// 400 kbps: A delivers at 400 kbps.
#[test]
fn server_wide_limit_caps_a_pool_whose_own_limit_is_higher() {
    let sink = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\nrate_limit = \"400kbps\"\n\n\
             [pool.A]\nrate_limit = \"2Mbps\"\n\n\
             [[upstream]]\nhost = \"{}\"\nworkers = 2\n",
            s.head(),
            s.listener(""),
            sink.addr()
        )
    });
    let took = bulk_send(
        relay.smtp_addr(),
        2,
        PER_POOL,
        FROM_A,
        &maker(FROM_A, &body()),
    );
    let (n, bytes, bps, arrived) = measure(&relay, &sink, FROM_A);
    eprintln!(
        "queued {PER_POOL} A in {took:?}; A in 10 s: {n} messages, {bytes} bytes = {:.0} kbps \
         (pool 2 Mbps, server-wide {:.0} kbps)",
        bps / 1000.0,
        LIMIT_BPS / 1000.0
    );
    assert_near_limit(
        &relay,
        "pool A (2Mbps) under a 400kbps server-wide limit",
        bps,
        arrived,
    );
}
