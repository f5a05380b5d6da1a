//! Classification end to end: each message lands at the upstream of its pool.

use std::collections::BTreeMap;
use std::time::Duration;

use poolrelay_tests::{Relay, Sink, message, unique_id};

const DELIVERY: Duration = Duration::from_secs(30);
const RCPT: &str = "member@example.test";

/// Sends one message from `from` with a fresh Message-ID; returns the ID.
fn send_from(relay: &Relay, addr: std::net::SocketAddr, from: &str, tag: &str) -> String {
    let id = unique_id(tag);
    let reply = relay.send_via(
        addr,
        from,
        &[RCPT],
        &message(&id, from, RCPT, tag, "routing test"),
    );
    assert_eq!(reply.code, 250, "final dot for <{from}> got {reply}");
    id
}

/// Waits until `expected.len()` messages arrived over all `sinks`, then
/// checks that each Message-ID is at exactly the sink named in `expected`
/// and nowhere else.
fn assert_placement(relay: &Relay, sinks: &[(&str, &Sink)], expected: &[(&str, &str)]) {
    let total = || sinks.iter().map(|(_, s)| s.count()).sum::<usize>();
    relay.wait_until(
        &format!("{} messages to arrive over the sinks", expected.len()),
        DELIVERY,
        || total() >= expected.len(),
    );
    let mut found: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (name, sink) in sinks {
        for id in sink.message_ids() {
            found.entry(id).or_default().push(name);
        }
    }
    let mut problems = Vec::new();
    for (id, want) in expected {
        match found.get(*id).map(Vec::as_slice) {
            Some([got]) if got == want => {}
            got => problems.push(format!(
                "<{id}>: expected only at sink {want}, found at {got:?}"
            )),
        }
    }
    for id in found.keys() {
        if !expected.iter().any(|(e, _)| e == id) {
            problems.push(format!("unexpected message <{id}> at {:?}", found[id]));
        }
    }
    assert!(
        problems.is_empty(),
        "misrouted mail:\n{}\n{}",
        problems.join("\n"),
        relay.logs()
    );
}

/// Pools A and B; A's upstream also serves `-`; owner-emergency@* routes to B.
#[test]
fn emergency_sender_lands_at_its_own_upstream() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n[pool.A]\n[pool.B]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"A\", \"-\"]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"B\"]\n\n\
             [[route]]\npool = \"B\"\nsender = \"owner-emergency@*\"\n",
            s.head(),
            s.listener(""),
            sink_a.addr(),
            sink_b.addr()
        )
    });
    let addr = relay.smtp_addr();
    let emergency = send_from(&relay, addr, "owner-emergency@lists.test", "emergency");
    let biglist = send_from(&relay, addr, "owner-biglist@lists.test", "biglist");
    let other = send_from(&relay, addr, "someone@else.test", "other");
    assert_placement(
        &relay,
        &[("A", &sink_a), ("B", &sink_b)],
        &[(&emergency, "B"), (&biglist, "A"), (&other, "A")],
    );
    let em = sink_b.wait_for_message_id(&emergency, DELIVERY);
    assert_eq!(
        em.from, "owner-emergency@lists.test",
        "envelope sender at the upstream"
    );
    assert_eq!(
        em.to,
        vec![RCPT.to_string()],
        "envelope recipients at the upstream"
    );
}

/// Each of A, B and `-` has its own upstream, so the default pool is seen
/// apart from the list pool: an unmatched owner-* sender goes to
/// `list_pool`, any other sender (the null sender too) to `-`.
#[test]
fn unmatched_senders_go_to_list_pool_or_default_pool() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let sink_default = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n[pool.A]\n[pool.B]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"A\"]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"B\"]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"-\"]\n\n\
             [[route]]\npool = \"B\"\nsender = \"owner-emergency@*\"\n",
            s.head(),
            s.listener(""),
            sink_a.addr(),
            sink_b.addr(),
            sink_default.addr()
        )
    });
    let addr = relay.smtp_addr();
    let emergency = send_from(
        &relay,
        addr,
        "OWNER-EMERGENCY@Lists.Test",
        "emergency-upper",
    );
    let biglist = send_from(&relay, addr, "owner-biglist@lists.test", "biglist");
    let other = send_from(&relay, addr, "someone@else.test", "other");
    let bounce = send_from(&relay, addr, "", "null-sender");
    assert_placement(
        &relay,
        &[("A", &sink_a), ("B", &sink_b), ("-", &sink_default)],
        &[
            (&emergency, "B"),
            (&biglist, "A"),
            (&other, "-"),
            (&bounce, "-"),
        ],
    );
    let b = sink_default.wait_for_message_id(&bounce, DELIVERY);
    assert_eq!(b.from, "", "the null sender must reach the upstream as <>");
}

/// A second listener with `pool = "B"` pins everything it accepts to B, even
/// senders a route or the list_pool rule would send elsewhere; the first
/// listener keeps routing normally.
#[test]
fn pinned_listener_sends_everything_to_its_pool() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let mut pinned = None;
    let relay = Relay::start(|s| {
        let p = s.extra_listener();
        pinned = Some(p);
        format!(
            "{}{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n[pool.A]\n[pool.B]\n[pool.C]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"A\", \"C\", \"-\"]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"B\"]\n\n\
             [[route]]\npool = \"C\"\nsender = \"owner-special@*\"\n",
            s.head(),
            s.listener(""),
            s.listener_at(p, "pool = \"B\""),
            sink_a.addr(),
            sink_b.addr()
        )
    });
    let pinned = pinned.expect("the pinned listener address");
    let main = relay.smtp_addr();
    let routed = send_from(&relay, pinned, "owner-special@lists.test", "pinned-routed");
    let list = send_from(&relay, pinned, "owner-biglist@lists.test", "pinned-list");
    let other = send_from(&relay, pinned, "someone@else.test", "pinned-other");
    let control_routed = send_from(&relay, main, "owner-special@lists.test", "main-routed");
    let control_list = send_from(&relay, main, "owner-biglist@lists.test", "main-list");
    assert_placement(
        &relay,
        &[("A", &sink_a), ("B", &sink_b)],
        &[
            (&routed, "B"),
            (&list, "B"),
            (&other, "B"),
            (&control_routed, "A"),
            (&control_list, "A"),
        ],
    );
}
