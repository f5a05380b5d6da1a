//! Rate limits and the emergency lane with relays sharing a replicated
//! spool on a real three-server JetStream cluster: a pool's limit holds for
//! the whole cluster whatever the number of live relays, and urgent mail
//! still overtakes a bulk backlog the cluster holds.

use std::time::{Duration, SystemTime};

use poolrelay_tests::admin::{api_post, pool_entry, try_api_json};
use poolrelay_tests::listserv::bulk_send;
use poolrelay_tests::nats::NatsCluster;
use poolrelay_tests::priority::{
    Arrival, BULK_FROM, RCPT, arrivals, latencies, percentiles, send_burst,
};
use poolrelay_tests::prometheus::{metric_sum, parse_metrics};
use poolrelay_tests::{Relay, Sink, SinkOptions, http_get, message, unique_id};

/// The cluster-wide limit of pool A.
const RATE: f64 = 100.0;
/// How far the measured rate may be from it.
const TOLERANCE: f64 = 0.10;

/// A relay on `cluster`: its own `[[upstream]]` entries `upstreams` and
/// pools `pools` (TOML), urgent mail routed to B, the rest to A.
fn relay_on(cluster: &NatsCluster, pools: &str, upstreams: &str) -> Relay {
    let servers = cluster.servers_toml();
    Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n{pools}\n{upstreams}\n\
             [[route]]\npool = \"B\"\nsender = \"urgent@*\"\n\n\
             [[route]]\npool = \"A\"\n\n\
             [spool]\nbackend = \"jetstream\"\nservers = {servers}\nack_timeout = \"5s\"\n",
            s.head(),
            s.listener("")
        )
    })
}

/// Waits until `relay` reached the cluster (`/readyz` answers 200).
fn wait_ready(relay: &Relay) {
    relay.wait_until(
        "the relay to reach the cluster",
        Duration::from_secs(30),
        || http_get(relay.admin_addr(), "/readyz").is_ok_and(|h| h.status == 200),
    );
}

/// `poolrelay_cluster_nodes{pool}` as `relay` exports it.
fn nodes_seen(relay: &Relay, pool: &str) -> Option<f64> {
    metric_sum(
        &parse_metrics(&relay.scrape()),
        "poolrelay_cluster_nodes",
        &[("pool", pool)],
    )
}

/// Waits until `relay` counts `n` live relays draining `pool`.
fn wait_nodes(relay: &Relay, pool: &str, n: usize, deadline: Duration) {
    relay.wait_until(
        &format!("{n} live relays draining pool {pool}"),
        deadline,
        || nodes_seen(relay, pool) == Some(n as f64),
    );
}

/// Whether `relay` sees pool `pool` held.
fn held_on(relay: &Relay, pool: &str) -> bool {
    try_api_json(relay, "/api/v1/pools")
        .is_some_and(|pools| pool_entry(&pools, pool)["held"].as_bool() == Some(true))
}

/// Queues `n` bulk messages in pool A, held on every relay meanwhile, half
/// through each of `relays`, so the whole backlog is in the cluster before
/// the first delivery.
fn queue_held_backlog(relays: &[&Relay], n: usize) {
    api_post(relays[0], "/api/v1/pools/A/hold");
    for r in relays {
        r.wait_until(
            "pool A held on every relay",
            Duration::from_secs(10),
            || held_on(r, "A"),
        );
    }
    let make = |i: usize| {
        message(
            &unique_id(&format!("bulk{i}")),
            BULK_FROM,
            RCPT,
            "bulk",
            "newsletter\n",
        )
    };
    let share = n.div_ceil(relays.len());
    let took = std::thread::scope(|scope| {
        let sending: Vec<_> = relays
            .iter()
            .map(|r| scope.spawn(move || bulk_send(r.smtp_addr(), 4, share, BULK_FROM, &make)))
            .collect();
        sending
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .max()
            .unwrap_or_default()
    });
    eprintln!(
        "[replicated limits] {} bulk messages acknowledged by the cluster in {took:?} ({:.0} msg/s)",
        share * relays.len(),
        (share * relays.len()) as f64 / took.as_secs_f64()
    );
}

/// Bulk arrivals at `sinks` within `[from, from + span)`.
fn arrived_within(sinks: &[&Sink], from: SystemTime, span: Duration) -> (usize, Vec<usize>) {
    let per_sink: Vec<usize> = sinks
        .iter()
        .map(|s| {
            arrivals(s)
                .iter()
                .filter(|a: &&Arrival| a.from == BULK_FROM && a.at >= from && a.at < from + span)
                .count()
        })
        .collect();
    (per_sink.iter().sum(), per_sink)
}

/// Waits until `at` has passed.
fn wait_for_time(at: SystemTime) {
    if let Ok(left) = at.duration_since(SystemTime::now()) {
        std::thread::sleep(left);
    }
}

/// Asserts that `count` arrivals over `span` are the limit, within the tolerance.
fn assert_rate(what: &str, count: usize, span: Duration, logs: impl Fn() -> String) -> f64 {
    let rate = count as f64 / span.as_secs_f64();
    eprintln!("[replicated limits] {what}: {count} messages in {span:?} = {rate:.1} msg/s");
    assert!(
        (rate - RATE).abs() <= RATE * TOLERANCE,
        "{what}: {rate:.1} msg/s, the limit is {RATE} ± {}%\n{}",
        TOLERANCE * 100.0,
        logs()
    );
    rate
}

#[test]
fn a_pool_limit_holds_for_the_whole_cluster_with_two_relays_then_one() {
    let cluster = NatsCluster::start(3);
    let (sink1, sink2) = (Sink::start(), Sink::start());
    let pools = format!("[pool.A]\nmax_messages_per_second = {RATE}\n[pool.B]\n");
    // Each delivery also waits for the cluster to record it: enough
    // workers that each relay alone could deliver well above the limit.
    let upstream =
        |sink: &Sink| format!("[[upstream]]\nhost = \"{}\"\nworkers = 16\n", sink.addr());
    let relay1 = relay_on(&cluster, &pools, &upstream(&sink1));
    let mut relay2 = relay_on(&cluster, &pools, &upstream(&sink2));
    wait_ready(&relay1);
    wait_ready(&relay2);
    for r in [&relay1, &relay2] {
        wait_nodes(r, "A", 2, Duration::from_secs(15));
    }
    // 13 s at the full rate with two relays, about 6 s at half of it while
    // the dead relay still counts, then 8 s alone, with room to spare.
    queue_held_backlog(&[&relay1, &relay2], 3_000);
    api_post(&relay1, "/api/v1/pools/A/release");
    let released = SystemTime::now();
    let logs = || format!("{}\n{}\n{}", relay1.logs(), relay2.logs(), cluster.logs());

    // Two relays: the first seconds may burst (each bucket starts full);
    // then the pair delivers the one limit between them.
    let window = Duration::from_secs(10);
    let from = released + Duration::from_secs(3);
    wait_for_time(from + window + Duration::from_millis(500));
    let (both, per_relay) = arrived_within(&[&sink1, &sink2], from, window);
    eprintln!("[replicated limits] per relay: {per_relay:?}");
    assert_rate("two relays", both, window, logs);
    assert!(
        per_relay.iter().all(|n| *n as f64 >= 0.25 * both as f64),
        "each relay takes its share of the limit: {per_relay:?}\n{}",
        logs()
    );

    // One relay dies: the other counts it out and takes the whole limit.
    relay2.kill9();
    let killed = SystemTime::now();
    wait_nodes(&relay1, "A", 1, Duration::from_secs(15));
    let counted_out = SystemTime::now();
    eprintln!(
        "[replicated limits] relay 2 killed; relay 1 counted it out {:?} later",
        counted_out.duration_since(killed).unwrap_or_default()
    );
    let window = Duration::from_secs(8);
    let from = counted_out + Duration::from_secs(1);
    wait_for_time(from + window + Duration::from_millis(500));
    let (alone, _) = arrived_within(&[&sink1], from, window);
    assert_rate("one relay after the other died", alone, window, || {
        format!("{}\n{}", relay1.logs(), cluster.logs())
    });
}

#[test]
fn urgent_mail_overtakes_a_bulk_backlog_the_cluster_holds() {
    // An R3 cluster sharing two cores with both relays, the load and the
    // sinks acknowledged the 10,000 in 58 s (the whole test: 69 s).
    const BACKLOG: usize = 10_000;
    const URGENT: usize = 20;
    const P99_WITHIN: Duration = Duration::from_millis(50);
    let cluster = NatsCluster::start(3);
    // The bulk smarthost holds each message 200 ms: the backlog stays.
    let slow = Sink::start_with(SinkOptions {
        delay_ms: Some(200),
        ..SinkOptions::default()
    });
    let urgent = Sink::start();
    let pools =
        "[pool.A]\ndescription = \"bulk\"\n[pool.B]\ndescription = \"urgent\"\npriority = 5\n";
    let upstreams = format!(
        "[[upstream]]\nhost = \"{}\"\nworkers = 2\npools = [\"A\", \"-\"]\n\n\
         [[upstream]]\nhost = \"{}\"\nworkers = 1\npools = [\"B\"]\n",
        slow.addr(),
        urgent.addr()
    );
    let relay1 = relay_on(&cluster, pools, &upstreams);
    let relay2 = relay_on(&cluster, pools, &upstreams);
    wait_ready(&relay1);
    wait_ready(&relay2);
    let logs = || format!("{}\n{}\n{}", relay1.logs(), relay2.logs(), cluster.logs());
    let make = |i: usize| {
        message(
            &unique_id(&format!("bulk{i}")),
            BULK_FROM,
            RCPT,
            "bulk",
            "newsletter\n",
        )
    };
    let took = std::thread::scope(|scope| {
        let sending: Vec<_> = [&relay1, &relay2]
            .into_iter()
            .map(|r| {
                scope.spawn(move || bulk_send(r.smtp_addr(), 4, BACKLOG / 2, BULK_FROM, &make))
            })
            .collect();
        sending
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .max()
            .unwrap_or_default()
    });
    let delivered = slow.count();
    eprintln!(
        "[replicated emergency] {BACKLOG} bulk messages acknowledged in {took:?}; {delivered} delivered meanwhile"
    );
    assert!(
        delivered + 1_000 < BACKLOG,
        "the backlog must still be there: the slow smarthost already has {delivered} of {BACKLOG}"
    );

    let sent = send_burst(&relay1, URGENT, Duration::from_millis(250));
    let mut arrived = Vec::new();
    relay1.wait_until(
        "every urgent message at its smarthost",
        Duration::from_secs(30),
        || {
            arrived = arrivals(&urgent);
            latencies(&sent, &arrived).iter().all(Option::is_some)
        },
    );
    let took: Vec<Duration> = latencies(&sent, &arrived).into_iter().flatten().collect();
    let (p50, p99, max) = percentiles(&took);
    eprintln!(
        "[replicated emergency] {URGENT} urgent messages behind {} queued bulk: p50 {p50:?}, p99 {p99:?}, max {max:?}",
        BACKLOG - slow.count()
    );
    assert!(
        p99 <= P99_WITHIN,
        "urgent mail must reach its smarthost within {P99_WITHIN:?} of its 250 (p99): {took:?}\n{}",
        logs()
    );
    assert!(
        slow.messages().iter().all(|m| m.from == BULK_FROM),
        "only bulk mail goes through the slow smarthost"
    );
}
