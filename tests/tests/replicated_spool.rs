//! The replicated spool: relays sharing their pools' queues on a real
//! three-server JetStream cluster. Any relay accepts, any delivers, each
//! message exactly once; losing a relay or one server loses nothing; with
//! no quorum the relays answer 451, never 250.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use poolrelay_tests::admin::{api_post, try_api_json, wait_deferred};
use poolrelay_tests::ledger::{SharedLedger, id_counts};
use poolrelay_tests::nats::NatsCluster;
use poolrelay_tests::{
    POLL_INTERVAL, Relay, Sink, SinkOptions, SmtpClient, SmtpError, http_get, message, poll_until,
    unique_id,
};

const FROM: &str = "owner-list@lists.test";
const TO: &str = "member@example.test";

/// A relay on `cluster` delivering pool A (and `-`) to `upstream`, retrying
/// every second, whose 250 waits at most 2 s for the cluster.
fn relay_on(cluster: &NatsCluster, upstream: std::net::SocketAddr) -> Relay {
    let servers = cluster.servers_toml();
    Relay::start(|s| {
        format!(
            "{}\n[spool]\nbackend = \"jetstream\"\nservers = {servers}\nack_timeout = \"2s\"\n",
            s.single_upstream(upstream, "")
        )
    })
}

/// Waits until `relay` reached the cluster (`/readyz` 200).
fn wait_ready(relay: &Relay) {
    relay.wait_until(
        "the relay to reach the cluster",
        Duration::from_secs(20),
        || http_get(relay.admin_addr(), "/readyz").is_ok_and(|h| h.status == 200),
    );
}

/// A relay on `cluster` delivering pool A to `upstream`, retrying after
/// an hour: a deferred message waits in the cluster, in no relay's hands.
fn relay_retrying_hourly(cluster: &NatsCluster, upstream: std::net::SocketAddr) -> Relay {
    let servers = cluster.servers_toml();
    Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1h\"]\n\n[pool.A]\n\n[[upstream]]\nhost = \"{upstream}\"\n\n\
             [spool]\nbackend = \"jetstream\"\nservers = {servers}\n",
            s.head(),
            s.listener("")
        )
    })
}

/// Sends one tagged message through `relay`; its Message-ID and the
/// reply code to the final dot.
fn send(relay: &Relay, tag: &str) -> (String, u16) {
    let id = unique_id(tag);
    let mut client = SmtpClient::connect(relay.smtp_addr())
        .unwrap_or_else(|e| panic!("connect to the relay: {e}\n{}", relay.logs()));
    let code = match client.send_mail(FROM, &[TO], &message(&id, FROM, TO, tag, "shared\n")) {
        Ok(reply) => reply.code,
        Err(SmtpError::Rejected { stage, reply }) if stage == "final dot" => reply.code,
        Err(e) => panic!("sending {tag}: {e}\n{}", relay.logs()),
    };
    client.quit();
    (id, code)
}

/// Waits until every id of `expected` arrived at one of `sinks`.
fn wait_delivered(
    sinks: &[&Sink],
    expected: &BTreeSet<String>,
    deadline: Duration,
    logs: impl Fn() -> String,
) {
    let arrived = || {
        sinks
            .iter()
            .flat_map(|s| s.message_ids())
            .collect::<BTreeSet<String>>()
    };
    if !poll_until(deadline, POLL_INTERVAL, || arrived().is_superset(expected)) {
        let got = arrived();
        let missing: Vec<_> = expected.difference(&got).collect();
        panic!(
            "{} of {} acknowledged messages never arrived within {deadline:?}: {missing:?}\n{}",
            missing.len(),
            expected.len(),
            logs()
        );
    }
}

#[test]
fn two_relays_on_one_cluster_deliver_every_message_exactly_once() {
    let cluster = NatsCluster::start(3);
    let (sink1, sink2) = (Sink::start(), Sink::start());
    let relay1 = relay_on(&cluster, sink1.addr());
    let relay2 = relay_on(&cluster, sink2.addr());
    for r in [&relay1, &relay2] {
        wait_ready(r);
    }
    let mut sent = BTreeSet::new();
    for i in 0..40 {
        let relay = if i % 2 == 0 { &relay1 } else { &relay2 };
        let (id, code) = send(relay, &format!("shared-{i}"));
        assert_eq!(
            code,
            250,
            "message {i}\n{}\n{}",
            relay.logs(),
            cluster.logs()
        );
        sent.insert(id);
    }
    let logs = || format!("{}\n{}", relay1.logs(), relay2.logs());
    wait_delivered(&[&sink1, &sink2], &sent, Duration::from_secs(30), logs);
    let counts = id_counts(sink1.message_ids().into_iter().chain(sink2.message_ids()));
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "delivered more than once: {twice:?}\n{}",
        logs()
    );
    eprintln!(
        "[replicated] relay 1's upstream got {}, relay 2's got {}",
        sink1.count(),
        sink2.count()
    );
}

#[test]
fn a_message_larger_than_the_servers_max_payload_round_trips_and_delivered_mail_leaves_nothing_stored()
 {
    let cluster = NatsCluster::start(3);
    let sink = Sink::start();
    let relay = relay_on(&cluster, sink.addr());
    wait_ready(&relay);
    // 2.5 MiB of 100-byte lines: above the servers' 1 MiB max_payload.
    let line = format!("{}\n", "x".repeat(99));
    let body = line.repeat(25 * 1024 * 1024 / 1000);
    let id = unique_id("large");
    let reply = relay.send(FROM, &[TO], &message(&id, FROM, TO, "large", &body));
    assert_eq!(reply.code, 250, "{reply}\n{}", relay.logs());
    let got = sink.wait_for_message_id(&id, Duration::from_secs(30));
    assert!(
        got.raw.contains(&body.replace('\n', "\r\n")) || got.raw.contains(&body),
        "the body arrived changed ({} bytes, sent {})",
        got.raw.len(),
        body.len()
    );
    // Small mail (its body inline in its record) and mid-sized mail (one
    // chunk in the bodies stream) too.
    let mut sent = BTreeSet::new();
    for (i, size) in [10, 2_000, 100_000].into_iter().enumerate() {
        let id = unique_id(&format!("sized-{i}"));
        let reply = relay.send(
            FROM,
            &[TO],
            &message(&id, FROM, TO, "sized", &line.repeat(size / 100)),
        );
        assert_eq!(reply.code, 250, "{reply}\n{}", relay.logs());
        sent.insert(id);
    }
    wait_delivered(&[&sink], &sent, Duration::from_secs(30), || relay.logs());
    // Delivered mail is removed: its body chunks, its record and, once
    // every relay's watch has seen it, the record's delete marker.
    for stream in ["poolrelay_bodies", "KV_poolrelay_env"] {
        let empty = poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
            cluster.stream_messages(stream) == Some(0)
        });
        assert!(
            empty,
            "{stream} still holds {:?} messages after every message was delivered\n{}",
            cluster.stream_messages(stream),
            relay.logs()
        );
    }
}

#[test]
fn a_pool_held_through_one_relay_is_held_on_the_other() {
    let cluster = NatsCluster::start(3);
    let (sink1, sink2) = (Sink::start(), Sink::start());
    let relay1 = relay_on(&cluster, sink1.addr());
    let relay2 = relay_on(&cluster, sink2.addr());
    for r in [&relay1, &relay2] {
        wait_ready(r);
    }
    api_post(&relay1, "/api/v1/pools/A/hold");
    let held_on_2 = || {
        try_api_json(&relay2, "/api/v1/pools")
            .and_then(|p| {
                p.as_array()?
                    .iter()
                    .find(|e| e["pool"] == "A")
                    .map(|e| e["held"] == true)
            })
            .unwrap_or(false)
    };
    relay2.wait_until("pool A held on relay 2", Duration::from_secs(10), held_on_2);
    let (id, code) = send(&relay2, "held");
    assert_eq!(code, 250, "{}", relay2.logs());
    // Held everywhere: neither upstream gets it while the hold lasts.
    assert!(
        !poll_until(Duration::from_secs(3), POLL_INTERVAL, || {
            sink1.count() + sink2.count() > 0
        }),
        "a held pool's message was delivered\n{}\n{}",
        relay1.logs(),
        relay2.logs()
    );
    api_post(&relay2, "/api/v1/pools/A/release");
    let expected: BTreeSet<String> = [id].into();
    wait_delivered(
        &[&sink1, &sink2],
        &expected,
        Duration::from_secs(20),
        || format!("{}\n{}", relay1.logs(), relay2.logs()),
    );
}

#[test]
fn a_relay_starting_while_a_pool_is_held_sends_none_of_its_mail() {
    let cluster = NatsCluster::start(3);
    let (sink1, sink2) = (Sink::start(), Sink::start());
    let relay1 = relay_on(&cluster, sink1.addr());
    wait_ready(&relay1);
    api_post(&relay1, "/api/v1/pools/A/hold");
    let mut queued = BTreeSet::new();
    for i in 0..5 {
        let (id, code) = send(&relay1, &format!("held-at-start-{i}"));
        assert_eq!(code, 250, "{}", relay1.logs());
        queued.insert(id);
    }
    // Relay 2 is ready only once it knows the holds: from its first 200
    // it takes no ticket of pool A.
    let relay2 = relay_on(&cluster, sink2.addr());
    relay2.wait_until(
        "relay 2 to reach the cluster",
        Duration::from_secs(20),
        || http_get(relay2.admin_addr(), "/readyz").is_ok_and(|h| h.status == 200),
    );
    let held_on_2 = || {
        try_api_json(&relay2, "/api/v1/pools")
            .and_then(|p| {
                p.as_array()?
                    .iter()
                    .find(|e| e["pool"] == "A")
                    .map(|e| e["held"] == true)
            })
            .unwrap_or(false)
    };
    relay2.wait_until("pool A held on relay 2", Duration::from_secs(5), held_on_2);
    assert_eq!(
        sink1.count() + sink2.count(),
        0,
        "a held pool's message was delivered at a relay's start\n{}\n{}",
        relay1.logs(),
        relay2.logs()
    );
    api_post(&relay2, "/api/v1/pools/A/release");
    wait_delivered(&[&sink1, &sink2], &queued, Duration::from_secs(20), || {
        format!("{}\n{}", relay1.logs(), relay2.logs())
    });
}

#[test]
fn readyz_is_503_while_the_cluster_is_unreachable_and_200_once_it_is() {
    let mut cluster = NatsCluster::start(3);
    for i in 0..3 {
        cluster.stop(i);
    }
    let sink = Sink::start();
    let relay = relay_on(&cluster, sink.addr());
    let status = || {
        http_get(relay.admin_addr(), "/readyz")
            .map(|r| r.status)
            .unwrap_or(0)
    };
    assert_eq!(status(), 503, "{}", relay.logs());
    let (_, code) = send(&relay, "unreachable");
    assert_eq!(code, 451, "a message without a cluster\n{}", relay.logs());
    relay.wait_until(
        "the log to say the cluster is unreachable",
        Duration::from_secs(10),
        || {
            relay
                .log_text()
                .contains("cannot reach the JetStream cluster")
        },
    );
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_meta_leader(Duration::from_secs(45));
    relay.wait_until(
        "/readyz 200 once the cluster is back",
        Duration::from_secs(40),
        || status() == 200,
    );
    let (id, code) = send(&relay, "reachable");
    assert_eq!(code, 250, "{}", relay.logs());
    sink.wait_for_message_id(&id, Duration::from_secs(20));
}

#[test]
fn relays_connect_to_the_server_leading_the_envelope_bucket() {
    let cluster = NatsCluster::start(3);
    let sink = Sink::start();
    let relays = [
        relay_on(&cluster, sink.addr()),
        relay_on(&cluster, sink.addr()),
    ];
    for relay in &relays {
        wait_ready(relay);
    }
    let leader = cluster
        .stream_leader("KV_poolrelay_env")
        .unwrap_or_else(|| panic!("no server leads the envelope bucket\n{}", cluster.logs()));
    let placed = || {
        (0..cluster.len())
            .map(|i| {
                let names = cluster.client_names(i);
                names.iter().filter(|n| *n == "poolrelay").count()
            })
            .collect::<Vec<usize>>()
    };
    let wanted: Vec<usize> = (0..cluster.len())
        .map(|i| if i == leader { 2 } else { 0 })
        .collect();
    let ok = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        placed() == wanted
    });
    assert!(
        ok,
        "relays per server {:?}, the leader is server {leader}\n{}",
        placed(),
        relays[0].logs()
    );
    for (n, relay) in relays.iter().enumerate() {
        let (id, code) = send(relay, &format!("near-{n}"));
        assert_eq!(code, 250, "{}", relay.logs());
        sink.wait_for_message_id(&id, Duration::from_secs(20));
    }
}

/// Clients sending `tag`-ged messages to `relay` until `stop`, recording
/// everything in `ledger`; 451 replies are counted as refused, not acked.
fn clients(
    relay: &Relay,
    tag: &str,
    n: usize,
    ledger: &SharedLedger,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let addr = relay.smtp_addr();
    (0..n)
        .map(|t| {
            let (ledger, stop, tag) = (ledger.clone(), stop.clone(), format!("{tag}-{t}"));
            std::thread::spawn(move || {
                let why = (|| {
                    let mut client =
                        SmtpClient::connect(addr).map_err(|e| format!("connect: {e}"))?;
                    for i in 0..2000 {
                        if stop.load(Ordering::Relaxed) {
                            return Ok(format!("stopped after {i}"));
                        }
                        let id = unique_id(&format!("{tag}-{i}"));
                        let msg = message(&id, FROM, TO, &tag, "payload\n");
                        match client.send_mail_with(FROM, &[TO], &msg, |_| ledger.data_sent(&id)) {
                            Ok(r) if r.code == 250 => ledger.acked(&id),
                            Ok(r) => return Err(format!("message {i}: {r}")),
                            Err(SmtpError::Rejected { reply, .. }) if reply.code == 451 => {}
                            Err(e @ SmtpError::Io { .. }) => {
                                return Ok(format!("message {i}: {e}"));
                            }
                            Err(e) => return Err(format!("message {i}: {e}")),
                        }
                    }
                    Ok("sent all".to_string())
                })();
                ledger.stopped(t, why);
            })
        })
        .collect()
}

#[test]
fn after_a_kill9_of_one_relay_the_other_delivers_everything_it_acknowledged() {
    let cluster = NatsCluster::start(3);
    // Relay 1's upstream is slow: tickets are in its hands when it dies.
    let slow = Sink::start_with(SinkOptions {
        delay_ms: Some(1500),
        ..Default::default()
    });
    let fast = Sink::start();
    let mut relay1 = relay_on(&cluster, slow.addr());
    let relay2 = relay_on(&cluster, fast.addr());
    for r in [&relay1, &relay2] {
        wait_ready(r);
    }
    let (ledger1, ledger2) = (SharedLedger::new(), SharedLedger::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = clients(&relay1, "to-1", 2, &ledger1, &stop);
    handles.extend(clients(&relay2, "to-2", 2, &ledger2, &stop));
    relay1.wait_until(
        "30 messages acknowledged by relay 1",
        Duration::from_secs(30),
        || ledger1.acked_count() >= 30,
    );
    relay1.kill9();
    relay2.wait_until(
        "10 more messages acknowledged by relay 2",
        Duration::from_secs(30),
        || ledger2.acked_count() >= 10,
    );
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let (l1, l2) = (ledger1.take(), ledger2.take());
    assert!(
        l2.unexpected_stops().is_empty(),
        "{:?}\n{}",
        l2.stops,
        relay2.logs()
    );
    let acked: BTreeSet<String> = l1.acked.union(&l2.acked).cloned().collect();
    // Relay 1's tickets come back when its holds lapse (30 s).
    wait_delivered(&[&slow, &fast], &acked, Duration::from_secs(60), || {
        relay2.logs()
    });
    let counts = id_counts(slow.message_ids().into_iter().chain(fast.message_ids()));
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    // At most what relay 1 was handing to its upstream at the kill (one
    // worker) can arrive twice: it never recorded that delivery.
    assert!(
        twice.len() <= 1,
        "delivered more than once: {twice:?}\n{}",
        relay2.logs()
    );
    eprintln!(
        "[replicated] relay 1 acked {}, relay 2 acked {}; delivered twice: {}",
        l1.acked.len(),
        l2.acked.len(),
        twice.len()
    );
}

#[test]
fn losing_one_server_keeps_accepting_and_losing_two_answers_451_until_quorum_returns() {
    let mut cluster = NatsCluster::start(3);
    let sink = Sink::start();
    let relay = relay_on(&cluster, sink.addr());
    wait_ready(&relay);
    let mut acked = BTreeSet::new();
    let (id, code) = send(&relay, "before");
    assert_eq!(code, 250, "{}", relay.logs());
    acked.insert(id);
    let leader = cluster
        .stream_leader("poolrelay_q_A")
        .unwrap_or_else(|| panic!("no leader for pool A's ticket stream\n{}", cluster.logs()));
    cluster.kill9(leader);
    // One server gone: a new leader is elected and acceptance goes on
    // (a message during the election may get 451, never a lost 250).
    let mut accepted_after = 0;
    let mut refused = 0;
    let mut i = 0;
    relay.wait_until(
        "5 messages accepted with one server down",
        Duration::from_secs(20),
        || {
            i += 1;
            let (id, code) = send(&relay, &format!("one-down-{i}"));
            assert!(code == 250 || code == 451, "got {code}\n{}", relay.logs());
            if code == 250 {
                acked.insert(id);
                accepted_after += 1;
            } else {
                refused += 1;
            }
            accepted_after >= 5
        },
    );
    eprintln!("[replicated] one server down: {accepted_after} accepted, {refused} answered 451");
    let second = (0..3).find(|&i| i != leader).unwrap_or(0);
    cluster.kill9(second);
    let mut refused_ids = BTreeSet::new();
    for i in 0..3 {
        let (id, code) = send(&relay, &format!("two-down-{i}"));
        assert_eq!(
            code,
            451,
            "without a quorum the relay must not answer 250\n{}",
            relay.logs()
        );
        refused_ids.insert(id);
    }
    cluster.restart(leader);
    cluster.restart(second);
    cluster.wait_meta_leader(Duration::from_secs(30));
    let mut back = false;
    relay.wait_until(
        "a 250 once the quorum is back",
        Duration::from_secs(40),
        || {
            let (id, code) = send(&relay, "quorum-back");
            if code == 250 {
                acked.insert(id);
                back = true;
            }
            back
        },
    );
    wait_delivered(&[&sink], &acked, Duration::from_secs(40), || relay.logs());
    // What was answered 451 is taken back, never delivered: once the
    // cluster holds no message of the pool, none of them arrived.
    relay.wait_until(
        "the pool's queue empty in the cluster",
        Duration::from_secs(40),
        || {
            try_api_json(&relay, "/api/v1/pools/A/messages").is_some_and(|v| {
                v.as_array()
                    .or_else(|| v["messages"].as_array())
                    .is_some_and(|l| l.is_empty())
            })
        },
    );
    let arrived: BTreeSet<String> = sink.message_ids().into_iter().collect();
    let leaked: Vec<_> = refused_ids.intersection(&arrived).collect();
    assert!(
        leaked.is_empty(),
        "messages answered 451 were delivered: {leaked:?}\n{}",
        relay.logs()
    );
}

#[test]
fn a_flush_makes_a_message_deferred_for_an_hour_due_at_once() {
    let cluster = NatsCluster::start(3);
    let refusing = Sink::start_with(SinkOptions {
        reply: Some(451),
        ..Default::default()
    });
    let upstream = refusing.addr();
    let relay = relay_retrying_hourly(&cluster, upstream);
    wait_ready(&relay);
    let sent = relay.send_tagged(FROM, &[TO], "flushed");
    // Deferred for an hour: its ticket is back in the cluster with that delay.
    wait_deferred(&relay, "A", &sent.queue_id, "451", Duration::from_secs(20));
    drop(refusing);
    let accepting = Sink::start_at(upstream);
    api_post(&relay, "/api/v1/pools/A/flush");
    accepting.wait_for_message_id(&sent.message_id, Duration::from_secs(20));
}

#[test]
fn a_message_deferred_in_the_cluster_is_deleted_through_another_relay() {
    let cluster = NatsCluster::start(3);
    let refusing = Sink::start_with(SinkOptions {
        reply: Some(451),
        ..Default::default()
    });
    let upstream = refusing.addr();
    let start = || relay_retrying_hourly(&cluster, upstream);
    let (relay1, relay2) = (start(), start());
    for r in [&relay1, &relay2] {
        wait_ready(r);
    }
    let sent = relay1.send_tagged(FROM, &[TO], "deleted-elsewhere");
    // Deferred for an hour: its ticket waits in the cluster, in no relay's hands.
    wait_deferred(&relay1, "A", &sent.queue_id, "451", Duration::from_secs(20));
    api_post(
        &relay2,
        &format!("/api/v1/messages/{}/delete", sent.queue_id),
    );
    for r in [&relay1, &relay2] {
        r.wait_until(
            "the deleted message gone from the pool's listing",
            Duration::from_secs(10),
            || {
                try_api_json(r, "/api/v1/pools/A/messages").is_some_and(|v| {
                    v.as_array()
                        .or_else(|| v["messages"].as_array())
                        .is_some_and(|l| l.is_empty())
                })
            },
        );
    }
}

#[test]
fn a_deferral_recorded_after_a_delete_elsewhere_does_not_bring_the_message_back() {
    let cluster = NatsCluster::start(3);
    // Slow and refusing: relay 1 holds the message for seconds, then defers it.
    let slow = Sink::start_with(SinkOptions {
        reply: Some(451),
        delay_ms: Some(6000),
        ..Default::default()
    });
    let upstream = slow.addr();
    let start = || relay_retrying_hourly(&cluster, upstream);
    let relay1 = start();
    wait_ready(&relay1);
    // Relay 1 alone takes tickets: the message is in its hands once its
    // worker is connected to the slow upstream.
    let sent = relay1.send_tagged(FROM, &[TO], "deleted-while-held");
    relay1.wait_until(
        "relay 1 to be sending the message",
        Duration::from_secs(20),
        || {
            poolrelay_tests::metric_sum(
                &poolrelay_tests::parse_metrics(&relay1.scrape()),
                "poolrelay_upstream_connections",
                &[],
            )
            .is_some_and(|n| n >= 1.0)
        },
    );
    let relay2 = start();
    let listed = |r: &Relay| {
        try_api_json(r, "/api/v1/pools/A/messages").is_some_and(|v| {
            v.as_array()
                .or_else(|| v["messages"].as_array())
                .is_some_and(|l| l.iter().any(|m| m["id"] == sent.queue_id.as_str()))
        })
    };
    relay2.wait_until(
        "relay 2 to see the message",
        Duration::from_secs(20),
        || listed(&relay2),
    );
    api_post(
        &relay2,
        &format!("/api/v1/messages/{}/delete", sent.queue_id),
    );
    // Relay 1's deferral finds the envelope gone and drops its copy.
    relay1.wait_until("relay 1 to drop its copy", Duration::from_secs(30), || {
        relay1
            .logs()
            .contains("the envelope changed under this relay")
    });
    for r in [&relay1, &relay2] {
        r.wait_until(
            "the deleted message gone from the pool's listing",
            Duration::from_secs(10),
            || !listed(r),
        );
    }
    assert!(
        !relay1.logs().contains("reading body chunk"),
        "a deleted message came back without its body\n{}",
        relay1.logs()
    );
}

#[test]
fn a_message_moved_to_another_pool_and_back_in_the_cluster_is_delivered() {
    let cluster = NatsCluster::start(3);
    let refusing = Sink::start_with(SinkOptions {
        reply: Some(451),
        ..Default::default()
    });
    let upstream = refusing.addr();
    let servers = cluster.servers_toml();
    // Pool B is served by no upstream: a message there waits.
    let start = || {
        Relay::start(|s| {
            format!(
                "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1h\"]\n\n[pool.A]\n[pool.B]\n\n\
                 [[upstream]]\nhost = \"{upstream}\"\npools = [\"A\"]\n\n\
                 [spool]\nbackend = \"jetstream\"\nservers = {servers}\n",
                s.head(),
                s.listener("")
            )
        })
    };
    let (relay1, relay2) = (start(), start());
    for r in [&relay1, &relay2] {
        wait_ready(r);
    }
    let sent = relay1.send_tagged(FROM, &[TO], "moved-and-back");
    wait_deferred(&relay1, "A", &sent.queue_id, "451", Duration::from_secs(20));
    drop(refusing);
    let accepting = Sink::start_at(upstream);
    let listed_in = |r: &Relay, pool: &str| {
        try_api_json(r, &format!("/api/v1/pools/{pool}/messages")).is_some_and(|v| {
            v.as_array()
                .or_else(|| v["messages"].as_array())
                .is_some_and(|l| l.iter().any(|m| m["id"] == sent.queue_id.as_str()))
        })
    };
    // A -> B through relay 2 (the message is in neither relay's hands)...
    api_post(
        &relay2,
        &format!("/api/v1/messages/{}/move?to=B", sent.queue_id),
    );
    relay1.wait_until("the message listed in B", Duration::from_secs(10), || {
        listed_in(&relay1, "B") && !listed_in(&relay1, "A")
    });
    // ...and back within the server's duplicate window: its new ticket
    // in A is a new one, not a duplicate of the first.
    api_post(
        &relay1,
        &format!("/api/v1/messages/{}/move?to=A", sent.queue_id),
    );
    accepting.wait_for_message_id(&sent.message_id, Duration::from_secs(20));
}

#[test]
fn a_relay_stopping_gracefully_hands_its_tickets_to_the_other_at_once() {
    let cluster = NatsCluster::start(3);
    // Relay 1's upstream is slow, so tickets wait in its hands.
    let slow = Sink::start_with(SinkOptions {
        delay_ms: Some(1000),
        ..Default::default()
    });
    let mut relay1 = relay_on(&cluster, slow.addr());
    wait_ready(&relay1);
    let mut sent = BTreeSet::new();
    for i in 0..6 {
        let (id, code) = send(&relay1, &format!("handed-{i}"));
        assert_eq!(code, 250, "{}", relay1.logs());
        sent.insert(id);
    }
    let fast = Sink::start();
    let relay2 = relay_on(&cluster, fast.addr());
    relay1.signal("TERM");
    assert!(
        relay1.wait_exit(Duration::from_secs(30)).is_some(),
        "relay 1 did not stop\n{}",
        relay1.logs()
    );
    // Well within the 30 s a lapsed hold takes: the tickets were handed back.
    wait_delivered(&[&slow, &fast], &sent, Duration::from_secs(15), || {
        format!("{}\n{}", relay1.logs(), relay2.logs())
    });
}

#[test]
fn an_undecodable_envelope_is_listed_as_corrupt_and_its_ticket_never_dropped() {
    let cluster = NatsCluster::start(3);
    let sink = Sink::start();
    let relay = relay_on(&cluster, sink.addr());
    wait_ready(&relay);
    // An envelope no relay can decode, and a ticket for it.
    let id = "00000000000000AB";
    cluster.publish_acked(&format!("$KV.poolrelay_env.A.{id}"), b"not json");
    cluster.publish_acked("poolrelay.q.A", b"{\"id\":171,\"generation\":0}");
    relay.wait_until(
        "the undecodable envelope listed as corrupt",
        Duration::from_secs(20),
        || {
            try_api_json(&relay, "/api/v1/pools/A/messages").is_some_and(|v| {
                let list = v.as_array().or_else(|| v["messages"].as_array());
                list.is_some_and(|l| l.iter().any(|m| m["id"] == id && !m["corrupt"].is_null()))
            })
        },
    );
    // Its ticket went back for the operator, not acked away.
    relay.wait_until(
        "the corrupt envelope's ticket handed back",
        Duration::from_secs(20),
        || relay.logs().contains("its ticket goes back for"),
    );
    // The relay keeps delivering the rest.
    let (message_id, code) = send(&relay, "after-corrupt");
    assert_eq!(code, 250, "{}", relay.logs());
    sink.wait_for_message_id(&message_id, Duration::from_secs(20));
}

#[test]
fn a_relay_sees_the_whole_cluster_queue_and_flushes_and_bounces_mail_waiting_there() {
    let cluster = NatsCluster::start(3);
    let refusing = Sink::start_with(SinkOptions {
        reply: Some(451),
        ..Default::default()
    });
    let upstream = refusing.addr();
    let start = || relay_retrying_hourly(&cluster, upstream);
    let (relay1, relay2) = (start(), start());
    for r in [&relay1, &relay2] {
        wait_ready(r);
    }
    let sent: Vec<_> = (0..3)
        .map(|i| relay1.send_tagged(FROM, &[TO], &format!("cluster-queue-{i}")))
        .collect();
    // Deferred for an hour, their tickets in no relay's hands.
    for s in &sent {
        wait_deferred(&relay1, "A", &s.queue_id, "451", Duration::from_secs(20));
    }
    let deferred_in = |r: &Relay| {
        try_api_json(r, "/api/v1/pools").and_then(|v| {
            v.as_array()?
                .iter()
                .find(|p| p["pool"] == "A")
                .and_then(|p| p["deferred"].as_u64())
        })
    };
    // Counted by both relays, whichever accepted or tried them.
    for r in [&relay1, &relay2] {
        r.wait_until(
            "pool A to count the cluster's 3 deferred messages",
            Duration::from_secs(10),
            || deferred_in(r) == Some(3),
        );
    }
    drop(refusing);
    let accepting = Sink::start_at(upstream);
    api_post(
        &relay2,
        &format!("/api/v1/messages/{}/flush", sent[0].queue_id),
    );
    accepting.wait_for_message_id(&sent[0].message_id, Duration::from_secs(20));
    api_post(
        &relay2,
        &format!("/api/v1/messages/{}/bounce", sent[1].queue_id),
    );
    let dsn_arrived = || {
        accepting
            .messages()
            .iter()
            .any(|m| m.from.is_empty() && m.to == [FROM])
    };
    relay2.wait_until(
        "the bounce's report to reach the sender",
        Duration::from_secs(20),
        dsn_arrived,
    );
    for r in [&relay1, &relay2] {
        r.wait_until(
            "only the third message left, deferred",
            Duration::from_secs(10),
            || {
                deferred_in(r) == Some(1)
                    && try_api_json(r, "/api/v1/pools/A/messages").is_some_and(|v| {
                        v.as_array()
                            .or_else(|| v["messages"].as_array())
                            .is_some_and(|l| {
                                l.len() == 1 && l[0]["id"].as_str() == Some(&sent[2].queue_id)
                            })
                    })
            },
        );
    }
    let ids = accepting.message_ids();
    assert!(
        !ids.contains(&sent[2].message_id) && !ids.contains(&sent[1].message_id),
        "only the flushed message was sent: {ids:?}"
    );
}

#[test]
fn a_relay_frozen_past_its_tickets_hold_does_not_deliver_what_the_other_took() {
    let cluster = NatsCluster::start(3);
    // Relay 1's upstream is slow: with two workers it holds four tickets,
    // two of them waiting in its scheduler, when it is frozen.
    let slow = Sink::start_with(SinkOptions {
        delay_ms: Some(2000),
        ..Default::default()
    });
    let servers = cluster.servers_toml();
    let slow_addr = slow.addr();
    let mut relay1 = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\n\n[pool.A]\n\n[[upstream]]\nhost = \"{slow_addr}\"\nworkers = 2\n\n\
             [spool]\nbackend = \"jetstream\"\nservers = {servers}\n",
            s.head(),
            s.listener("")
        )
    });
    wait_ready(&relay1);
    let mut sent = BTreeSet::new();
    for i in 0..8 {
        let (id, code) = send(&relay1, &format!("frozen-{i}"));
        assert_eq!(code, 250, "{}", relay1.logs());
        sent.insert(id);
    }
    relay1.wait_until(
        "relay 1 to hold tickets waiting for a worker",
        Duration::from_secs(10),
        || {
            try_api_json(&relay1, "/api/v1/pools").is_some_and(|v| {
                v.as_array().into_iter().flatten().any(|p| {
                    p["pool"] == "A"
                        && p["in_flight"].as_u64() == Some(2)
                        && p["ready"].as_u64().is_some_and(|r| r >= 4)
                })
            })
        },
    );
    relay1.signal("STOP");
    let fast = Sink::start();
    let relay2 = relay_on(&cluster, fast.addr());
    // Relay 1's tickets lapse after 30 s; relay 2 delivers everything
    // relay 1 had not finished.
    wait_delivered(&[&slow, &fast], &sent, Duration::from_secs(60), || {
        relay2.logs()
    });
    relay1.signal("CONT");
    relay1.wait_until(
        "relay 1 to let go of the tickets it held while frozen",
        Duration::from_secs(20),
        || {
            relay1.log_count("no longer holds its ticket") >= 2
                || relay1.log_count("let go, another relay delivers it") >= 2
        },
    );
    // What relay 1 was sending at the freeze completes (two workers);
    // what waited in its scheduler is not sent again.
    relay1.wait_until(
        "relay 1's sends in flight at the freeze to end",
        Duration::from_secs(20),
        || {
            try_api_json(&relay1, "/api/v1/pools").is_some_and(|v| {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["pool"] == "A" && p["in_flight"].as_u64() == Some(0))
            })
        },
    );
    let counts = id_counts(slow.message_ids().into_iter().chain(fast.message_ids()));
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.len() <= 2,
        "delivered more than once: {twice:?}\n{}",
        relay1.logs()
    );
}

#[test]
fn two_relays_picking_the_same_ids_lose_nothing_and_mix_no_bodies() {
    // Ids carry 8 bits of a relay's start tag, which wrap after 256 relay
    // starts: both relays here get the same bits, so appends in the same
    // millisecond pick the same id.
    let cluster = NatsCluster::start(3);
    let sink = Sink::start();
    let mut relays = [
        relay_on(&cluster, sink.addr()),
        relay_on(&cluster, sink.addr()),
    ];
    for r in relays.iter_mut() {
        r.set_env("POOLRELAY_ID_TAG", "7");
        r.restart();
        wait_ready(r);
    }
    let [relay1, relay2] = &relays;
    let (ledger1, ledger2) = (SharedLedger::new(), SharedLedger::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = clients(relay1, "same-id-1", 3, &ledger1, &stop);
    handles.extend(clients(relay2, "same-id-2", 3, &ledger2, &stop));
    let collided = || {
        relay1.log_count("another relay holds this id")
            + relay2.log_count("another relay holds this id")
    };
    relay1.wait_until(
        "appends of both relays to pick the same id 5 times",
        Duration::from_secs(60),
        || collided() >= 5,
    );
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let (l1, l2) = (ledger1.take(), ledger2.take());
    for (l, r) in [(&l1, relay1), (&l2, relay2)] {
        assert!(
            l.unexpected_stops().is_empty(),
            "{:?}\n{}",
            l.stops,
            r.logs()
        );
    }
    let acked: BTreeSet<String> = l1.acked.union(&l2.acked).cloned().collect();
    // Every acknowledged message arrives, each with its own body (its
    // Message-ID is in it), and once.
    wait_delivered(&[&sink], &acked, Duration::from_secs(60), || {
        format!("{}\n{}", relay1.logs(), relay2.logs())
    });
    let counts = id_counts(sink.message_ids());
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    eprintln!(
        "[replicated] same id tag: {} + {} acked, {} ids picked twice",
        l1.acked.len(),
        l2.acked.len(),
        collided()
    );
}

#[test]
fn a_relay_starting_passes_over_the_id_tag_bits_a_live_relay_uses() {
    let cluster = NatsCluster::start(3);
    let sink = Sink::start();
    let tag_bits = |queue_id: &str| {
        u64::from_str_radix(queue_id, 16)
            .map(|id| (id >> 8) & 0xff)
            .unwrap_or_else(|e| panic!("queue id {queue_id:?}: {e}"))
    };
    // Relay starts are counted by the revision of one key (`node.tag`);
    // relay 1 announces the bits the next start after its own will get,
    // as if 256 starts had passed since it began.
    let mut relay1 = relay_on(&cluster, sink.addr());
    wait_ready(&relay1);
    let seq = cluster.publish_acked("$KV.poolrelay_held.node.tag", b"0");
    let first = (seq + 2) & 0xff;
    relay1.set_env("POOLRELAY_ID_TAG", &first.to_string());
    relay1.restart();
    wait_ready(&relay1);
    assert_eq!(
        tag_bits(&relay1.send_tagged(FROM, &[TO], "tag-1").queue_id),
        first
    );
    let relay2 = relay_on(&cluster, sink.addr());
    wait_ready(&relay2);
    let second = tag_bits(&relay2.send_tagged(FROM, &[TO], "tag-2").queue_id);
    assert_ne!(
        first,
        second,
        "relay 2 took the id tag bits relay 1 uses\n{}",
        relay2.logs()
    );
}

#[test]
fn a_relay_holds_no_more_message_bodies_than_max_data_memory() {
    let cluster = NatsCluster::start(3);
    // Relay 1 sends slowly with four workers: without a bound on the
    // bodies in its hands it would hold all eight messages (two tickets
    // per worker) while relay 2 idles.
    let slow = Sink::start_with(SinkOptions {
        delay_ms: Some(30_000),
        ..Default::default()
    });
    let servers = cluster.servers_toml();
    let slow_addr = slow.addr();
    let relay1 = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\n\n[pool.A]\n\n[[upstream]]\nhost = \"{slow_addr}\"\nworkers = 4\n\n\
             [spool]\nbackend = \"jetstream\"\nservers = {servers}\n",
            s.head()
                .replace("[server]\n", "[server]\nmax_data_memory = \"3MB\"\n"),
            s.listener("")
        )
    });
    wait_ready(&relay1);
    let line = format!("{}\n", "x".repeat(75));
    let body = line.repeat(1_000_000 / line.len());
    let mut sent = BTreeSet::new();
    for i in 0..8 {
        let id = unique_id(&format!("big-{i}"));
        relay1
            .client()
            .send_mail(FROM, &[TO], &message(&id, FROM, TO, "big", &body))
            .unwrap_or_else(|e| panic!("sending message {i}: {e}\n{}", relay1.logs()));
        sent.insert(id);
    }
    let fast = Sink::start();
    let relay2 = relay_on(&cluster, fast.addr());
    // Relay 1 holds three 1 MB bodies at most (3 MB); relay 2 gets the
    // other five long before relay 1's upstream answers its first.
    relay2.wait_until(
        "relay 2 to deliver the five messages relay 1 had no room for",
        Duration::from_secs(20),
        || fast.count() >= 5,
    );
    let got: BTreeSet<String> = fast.message_ids().into_iter().collect();
    assert!(got.is_subset(&sent), "{got:?}");
}
