//! `poolrelay queue delete --pool P --all` while a message of P is being
//! delivered: that message cannot be deleted, so the command must not
//! report success. It exits 1 and says how many were left and why.

use std::time::Duration;

use poolrelay_tests::{
    Relay, Sink, SinkOptions, http_get, message, poll_until, poolrelay, unique_id,
};
use serde_json::Value;

/// How long a CLI call may take.
const COMMAND: Duration = Duration::from_secs(30);
/// How long the first message gets to reach the slow upstream.
const IN_FLIGHT: Duration = Duration::from_secs(30);
/// The upstream's pause before it answers the final dot: far longer than
/// the test, so the first message stays in flight throughout.
const UPSTREAM_DELAY_MS: u64 = 120_000;

fn pool_a(relay: &Relay) -> Value {
    let r = http_get(relay.admin_addr(), "/api/v1/pools")
        .unwrap_or_else(|e| panic!("GET /api/v1/pools: {e}\n{}", relay.logs()));
    assert_eq!(r.status, 200, "GET /api/v1/pools: {r}\n{}", relay.logs());
    let pools: Value = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("GET /api/v1/pools is not JSON ({e}): {}", r.body));
    pools
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["pool"] == "A")
        .cloned()
        .unwrap_or_else(|| panic!("no pool A in {pools:#}"))
}

fn queued(relay: &Relay) -> u64 {
    let a = pool_a(relay);
    a["ready"].as_u64().unwrap_or(0) + a["deferred"].as_u64().unwrap_or(0)
}

#[test]
fn delete_all_with_a_message_in_flight_exits_nonzero_and_counts_it() {
    let upstream = Sink::start_with(SinkOptions {
        delay_ms: Some(UPSTREAM_DELAY_MS),
        ..SinkOptions::default()
    });
    let relay = Relay::start(|s| s.single_upstream(upstream.addr(), ""));
    let from = "owner-lista@lists.test";
    let rcpt = "member@example.test";
    let send = |tag: &str| {
        let id = unique_id(tag);
        relay.send(from, &[rcpt], &message(&id, from, rcpt, tag, "body"));
    };
    // One worker: the first message is taken and held by the slow upstream,
    // the two after it wait in the queue.
    send("busy");
    relay.wait_until(
        "a message of pool A in flight to the slow upstream",
        IN_FLIGHT,
        || pool_a(&relay)["in_flight"].as_u64().unwrap_or(0) >= 1,
    );
    send("waiting-1");
    send("waiting-2");
    relay.wait_until("three messages queued in pool A", IN_FLIGHT, || {
        queued(&relay) == 3
    });

    let url = relay.admin_url();
    let out = poolrelay(
        &["queue", "delete", "--pool", "A", "--all", "--admin", &url],
        COMMAND,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "queue delete --all left a message being delivered, so it must exit 1:\n{out}\n{}",
        relay.logs()
    );
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains("deleted 2 "),
        "queue delete --all should say it deleted the two waiting messages:\n{out}"
    );
    assert!(
        said.contains("1 not deleted") && said.contains("being delivered"),
        "queue delete --all should say that 1 message was not deleted because it is \
         being delivered:\n{out}"
    );
    // Only the message in flight is left.
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
            queued(&relay) == 1
        }),
        "after delete --all, pool A should hold only the message in flight: {:#}\n{}",
        pool_a(&relay),
        relay.logs()
    );
}
