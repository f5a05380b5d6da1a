//! Restart without downtime: the relay listens, accepts and delivers while
//! recovery still streams the spool into the scheduler; a kill -9 during
//! recovery or after it loses nothing and delivers nothing twice; the
//! operator's moves during recovery apply to mail not yet recovered, also
//! to mail beyond the index window (`POOLRELAY_INDEX_WINDOW` makes it small).
//!
//! The queue is filled with `poolrelay spool-load` (the listener's records,
//! written directly) and recovery is slowed to a step per 500 ms with
//! `POOLRELAY_RECOVERY_STEP_PAUSE_MS`, so "during recovery" lasts seconds
//! and every check below can see it.

use std::collections::BTreeSet;
use std::time::Duration;

use poolrelay_tests::admin::{api_json, pool_entry, queue_ok};
use poolrelay_tests::delivery::strip_ansi;
use poolrelay_tests::ledger::id_counts;
use poolrelay_tests::{
    Relay, RelaySetup, Sink, SinkOptions, free_addr, http_get, message, metric_sum, parse_metrics,
    unique_id,
};

/// Messages read per recovery step (the relay's `RECOVERY_CHUNK`).
const STEP: u64 = 1024;
const PAUSE: &str = "POOLRELAY_RECOVERY_STEP_PAUSE_MS";
/// Ready ids per pool the index keeps while the stream has more (test only).
const WINDOW: &str = "POOLRELAY_INDEX_WINDOW";
const DEADLINE: Duration = Duration::from_secs(120);

/// Pools A (bulk, where the load goes), B (priority 1, for mail sent
/// during recovery), C and D (read last); one upstream serving them all.
fn config(s: &RelaySetup, upstream: std::net::SocketAddr) -> String {
    config_retrying(s, upstream, "1s")
}

/// [`config`] with another retry step.
fn config_retrying(s: &RelaySetup, upstream: std::net::SocketAddr, retry: &str) -> String {
    format!(
        "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"{retry}\"]\n\n\
         [pool.A]\n[pool.B]\npriority = 1\n[pool.C]\n[pool.D]\n\n\
         [[upstream]]\nhost = \"{upstream}\"\n\n\
         [[route]]\npool = \"B\"\nsender = \"urgent@*\"\n\n\
         [[route]]\npool = \"A\"\n",
        s.head(),
        s.listener("")
    )
}

/// The `poolrelay_recovery_remaining_messages` gauge.
fn remaining(relay: &Relay) -> f64 {
    metric_sum(
        &parse_metrics(&relay.scrape()),
        "poolrelay_recovery_remaining_messages",
        &[],
    )
    .unwrap_or_else(|| panic!("no poolrelay_recovery_remaining_messages\n{}", relay.logs()))
}

/// Asserts that recovery is still running, saying what the test needed it for.
fn assert_recovering(relay: &Relay, what: &str) {
    let left = remaining(relay);
    assert!(
        left > 0.0,
        "recovery had already ended {what} (remaining {left}); the relay must listen before recovery ends\n{}",
        relay.logs()
    );
}

fn recovered_log_lines(relay: &Relay) -> usize {
    relay.log_count("spool recovered")
}

/// Waits for the (empty) first start to end its recovery, then kills it,
/// so the spool can be loaded.
fn stop_after_first_start(relay: &mut Relay) {
    relay.wait_until("recovery of the empty spool", DEADLINE, || {
        recovered_log_lines(relay) == 1
    });
    relay.kill9();
}

/// Sends one urgent message (pool B); returns its Message-ID.
fn send_urgent(relay: &Relay, tag: &str) -> String {
    let id = unique_id(tag);
    let from = "urgent@alerts.test";
    let r = relay.send(
        from,
        &["member@example.test"],
        &message(&id, from, "member@example.test", tag, "x\n"),
    );
    assert_eq!(r.code, 250, "sending {tag}: {r}\n{}", relay.logs());
    id
}

/// Sends `n` list messages (pool A), one per session; returns their Message-IDs.
fn send_list_mail(relay: &Relay, tag: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let id = unique_id(&format!("{tag}-{i}"));
            let from = "list@lists.test";
            let r = relay.send(
                from,
                &["member@example.test"],
                &message(&id, from, "member@example.test", tag, "x\n"),
            );
            assert_eq!(r.code, 250, "sending {tag} {i}: {r}\n{}", relay.logs());
            id
        })
        .collect()
}

/// Asserts that the sinks got each `expected` Message-ID exactly once, and nothing else.
fn assert_each_once(relay: &Relay, expected: &BTreeSet<String>, delivered: Vec<String>) {
    let counts = id_counts(delivered);
    let got: BTreeSet<String> = counts.keys().cloned().collect();
    let missing: Vec<_> = expected.difference(&got).take(10).collect();
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(10).collect();
    let unknown: Vec<_> = got.difference(expected).take(10).collect();
    assert!(
        missing.is_empty() && twice.is_empty() && unknown.is_empty(),
        "missing {missing:?}, delivered twice {twice:?}, unexpected {unknown:?}\n{}",
        relay.logs()
    );
}

#[test]
fn mail_is_accepted_and_delivered_during_recovery_and_kill9_loses_nothing_nor_doubles() {
    let n = 10 * STEP;
    let upstream = free_addr(); // down until phase 3
    let mut relay = Relay::start(|s| config(s, upstream));
    stop_after_first_start(&mut relay);
    let loaded = relay.load_spool("A", n, "rec", &[]);
    assert_eq!(loaded["count"], n, "{loaded}");
    let mut expected: BTreeSet<String> = (0..n).map(|i| format!("rec-{i}@load.test")).collect();

    // Phase 1: upstream down; listening during recovery; kill -9 in the middle.
    let ended = recovered_log_lines(&relay);
    relay.set_env(PAUSE, "500");
    relay.restart(); // returns once the listener accepts
    assert_recovering(&relay, "when the listener accepted");
    let ready = http_get(relay.admin_addr(), "/readyz").expect("GET /readyz");
    assert_eq!(
        ready.status,
        200,
        "/readyz during recovery: {ready}\n{}",
        relay.logs()
    );
    expected.insert(send_urgent(&relay, "during-recovery-1"));
    assert_recovering(&relay, "after a message was accepted");
    relay.kill9();
    assert_eq!(
        recovered_log_lines(&relay),
        ended,
        "recovery finished before the kill\n{}",
        relay.logs()
    );

    // Phase 2: still down; recovery ends (logged with its duration); kill -9 after.
    relay.set_env(PAUSE, "0");
    relay.restart();
    relay.wait_until("the end of recovery in the log", DEADLINE, || {
        recovered_log_lines(&relay) == ended + 1
    });
    let line = strip_ansi(
        relay
            .log_text()
            .lines()
            .rfind(|l| l.contains("spool recovered"))
            .unwrap_or_default(),
    );
    assert!(
        line.contains(&format!("messages={}", n + 1)) && line.contains("seconds="),
        "{line}"
    );
    assert_eq!(
        remaining(&relay),
        0.0,
        "the gauge after recovery\n{}",
        relay.logs()
    );
    expected.insert(send_urgent(&relay, "after-recovery"));
    relay.kill9();

    // Phase 3: upstream up; slow recovery again; urgent mail sent now is
    // delivered while recovery still runs; then everything, once.
    let sink = Sink::start_at(upstream);
    relay.set_env(PAUSE, "500");
    relay.restart();
    let during = send_urgent(&relay, "during-recovery-3");
    expected.insert(during.clone());
    sink.wait_for_message_id(&during, DEADLINE);
    assert_recovering(&relay, "when mail sent during recovery was delivered");

    relay.wait_until(
        &format!("{} messages at the sink", expected.len()),
        DEADLINE,
        || sink.count() >= expected.len(),
    );
    relay.wait_until("the end of recovery", DEADLINE, || {
        recovered_log_lines(&relay) == ended + 2
    });
    assert_each_once(&relay, &expected, sink.message_ids());
}

#[test]
fn holds_flushes_deletes_and_moves_during_recovery_apply_to_mail_not_yet_recovered() {
    let n = 6 * STEP;
    let sink = Sink::start();
    let mut relay = Relay::start(|s| config(s, sink.addr()));
    stop_after_first_start(&mut relay);
    let a = relay.load_spool("A", n, "a", &[]);
    // B: deferred for an hour (as after an outage); C: due now.
    let b = relay.load_spool("B", 50, "b", &["--deferred-for", "3600"]);
    relay.load_spool("C", 20, "c", &[]);
    // D: deferred for an hour, read last, so the move and the flush below
    // act on mail the stream has not reached.
    let d = relay.load_spool("D", 10, "d", &["--deferred-for", "3600"]);
    let deleted = a["last"].as_str().expect("last id").to_string();
    let moved = b["first"].as_str().expect("first id").to_string();
    let moved_unread = d["first"].as_str().expect("first id").to_string();

    let ended = recovered_log_lines(&relay);
    relay.set_env(PAUSE, "500");
    relay.restart();
    // Recovery reads B first (priority 1), then A, then C: A's last
    // message and C are seconds away.
    queue_ok(&relay, &["hold", "--pool", "C"]);
    queue_ok(&relay, &["delete", &deleted]);
    queue_ok(&relay, &["move", &moved, "--to", "A"]);
    queue_ok(&relay, &["flush", "--pool", "B"]);
    queue_ok(&relay, &["move", &moved_unread, "--to", "B"]);
    queue_ok(&relay, &["flush", "--pool", "D"]);
    assert_recovering(&relay, "when the operator's moves were done");

    let expected = n - 1 + 50 + 10;
    relay.wait_until(
        &format!("{expected} messages at the sink (A but the deleted one, B and D flushed)"),
        DEADLINE,
        || sink.count() as u64 >= expected,
    );
    relay.wait_until("the end of recovery", DEADLINE, || {
        recovered_log_lines(&relay) == ended + 1
    });
    let pools = api_json(&relay, "/api/v1/pools");
    let c = pool_entry(&pools, "C");
    assert_eq!(
        (c["held"].as_bool(), c["ready"].as_u64()),
        (Some(true), Some(20)),
        "pool C held during recovery: {c}\n{}",
        relay.logs()
    );
    let ids = id_counts(sink.message_ids());
    let last = format!("a-{}@load.test", n - 1);
    assert!(
        !ids.contains_key(&last),
        "the message deleted during recovery was delivered\n{}",
        relay.logs()
    );
    assert_eq!(
        ids.get("b-0@load.test"),
        Some(&1),
        "the moved message, once\n{}",
        relay.logs()
    );
    assert_eq!(
        ids.get("d-0@load.test"),
        Some(&1),
        "the message moved before recovery reached it, once\n{}",
        relay.logs()
    );
    let twice: Vec<_> = ids.iter().filter(|(_, c)| **c > 1).take(10).collect();
    assert!(
        twice.is_empty(),
        "delivered twice: {twice:?}\n{}",
        relay.logs()
    );
    assert!(
        !ids.keys().any(|k| k.starts_with("c-")),
        "held pool C delivered\n{}",
        relay.logs()
    );

    queue_ok(&relay, &["release", "--pool", "C"]);
    relay.wait_until("held pool C delivered after its release", DEADLINE, || {
        sink.count() as u64 >= expected + 20
    });
}

#[test]
fn operator_moves_apply_to_mail_outside_the_index_window_and_counts_include_it() {
    // A window of 20 ready ids per pool: A's 200 messages are mostly on disk only.
    let n = 200;
    let sink = Sink::start();
    let mut relay = Relay::start(|s| config(s, sink.addr()));
    // A held (recorded in the spool): its window fills and stays full.
    queue_ok(&relay, &["hold", "--pool", "A"]);
    stop_after_first_start(&mut relay);
    relay.load_spool("A", n, "w", &[]);
    relay.load_spool("C", 30, "wc", &["--deferred-for", "3600"]);
    relay.set_env(WINDOW, "20");
    relay.restart();
    relay.wait_until("the stream to fill the windows", DEADLINE, || {
        relay.log_count("spool recovery reached the index window") == 1
    });
    assert_recovering(&relay, "with A's mail beyond its window");
    let ids: Vec<String> = api_json(&relay, "/api/v1/pools/A/messages?limit=1000")
        .as_array()
        .expect("a list of messages")
        .iter()
        .map(|m| m["id"].as_str().expect("an id").to_string())
        .collect();
    assert_eq!(ids.len(), n as usize, "{ids:?}");
    let ready = |relay: &Relay, pool: &str| {
        pool_entry(&api_json(relay, "/api/v1/pools"), pool)["ready"].as_u64()
    };
    assert_eq!(
        ready(&relay, "A"),
        Some(n),
        "counts include mail not yet read\n{}",
        relay.logs()
    );

    // Far beyond the window: delete one, move one, bounce one, flush one.
    queue_ok(&relay, &["delete", &ids[199]]);
    queue_ok(&relay, &["move", &ids[150], "--to", "B"]);
    queue_ok(&relay, &["bounce", &ids[160]]);
    queue_ok(&relay, &["flush", &ids[170]]);
    queue_ok(&relay, &["flush", "--pool", "C"]);
    assert_eq!(
        ready(&relay, "A"),
        Some(n - 3),
        "counts follow the operator's moves\n{}",
        relay.logs()
    );
    let moved = "w-150@load.test";
    sink.wait_for_message_id(moved, DEADLINE);

    queue_ok(&relay, &["release", "--pool", "A"]);
    // A but the deleted and the bounced one (the moved one included), and C flushed.
    let delivered = |prefix: &str| {
        id_counts(sink.message_ids())
            .keys()
            .filter(|k| k.starts_with(prefix))
            .count()
    };
    relay.wait_until(
        &format!("{} of A's messages and C's 30 at the sink", n - 2),
        DEADLINE,
        || delivered("w-") >= n as usize - 2 && delivered("wc-") >= 30,
    );
    relay.wait_until("the end of the stream", DEADLINE, || {
        relay.log_count("spool recovered") == 2
    });
    let counts = id_counts(sink.message_ids());
    for gone in ["w-199@load.test", "w-160@load.test"] {
        assert!(
            !counts.contains_key(gone),
            "{gone} was deleted or bounced, yet delivered\n{}",
            relay.logs()
        );
    }
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(10).collect();
    assert!(
        twice.is_empty(),
        "delivered twice: {twice:?}\n{}",
        relay.logs()
    );
    assert_eq!(
        (delivered("w-"), delivered("wc-")),
        (n as usize - 2, 30),
        "{counts:?}\n{}",
        relay.logs()
    );
    assert_eq!(ready(&relay, "A"), Some(0), "{}", relay.logs());
}

#[test]
fn new_mail_past_a_full_window_waits_on_disk_and_is_delivered_once_across_kill9() {
    // A window of 20 ready ids per pool, the upstream down: of 120 new
    // messages about 100 wait in the spool only, not in memory.
    let n = 120;
    let window = 20.0;
    let upstream = free_addr();
    let mut relay = Relay::start(|s| config(s, upstream));
    stop_after_first_start(&mut relay);
    relay.set_env(WINDOW, "20");
    relay.restart();
    relay.wait_until("the end of the (empty) recovery", DEADLINE, || {
        recovered_log_lines(&relay) == 2
    });
    let ready =
        |relay: &Relay| pool_entry(&api_json(relay, "/api/v1/pools"), "A")["ready"].as_u64();
    let check_spilled = |relay: &Relay, queued: usize| {
        let left = remaining(relay);
        assert!(
            left >= queued as f64 - window - 4.0 && left <= queued as f64 - window,
            "{left} of {queued} messages on disk only with a window of {window}\n{}",
            relay.logs()
        );
        assert_eq!(
            ready(relay),
            Some(queued as u64),
            "counts include mail on disk only\n{}",
            relay.logs()
        );
    };

    // Phase 1: the spill, then the upstream back: all delivered once.
    let mut expected: BTreeSet<String> = send_list_mail(&relay, "spill-1", n).into_iter().collect();
    check_spilled(&relay, n);
    relay.wait_until("the spill in the log", DEADLINE, || {
        relay.log_count("new mail waits in the spool") == 1
    });
    let sink = Sink::start_at(upstream);
    relay.wait_until(&format!("{n} messages at the sink"), DEADLINE, || {
        sink.count() >= n
    });
    relay.wait_until("the spilled mail read back", DEADLINE, || {
        relay.log_count("all in the index again") == 1 && remaining(&relay) == 0.0
    });
    let mut delivered = sink.message_ids();
    drop(sink);

    // Phase 2: spilled again, kill -9, restarted with the upstream back.
    expected.extend(send_list_mail(&relay, "spill-2", n));
    check_spilled(&relay, n);
    relay.kill9();
    let sink = Sink::start_at(upstream);
    relay.restart();
    relay.wait_until(&format!("{n} more messages at the sink"), DEADLINE, || {
        sink.count() >= n
    });
    relay.wait_until("the end of recovery", DEADLINE, || {
        recovered_log_lines(&relay) == 3
    });
    delivered.extend(sink.message_ids());
    assert_each_once(&relay, &expected, delivered);
}

#[test]
fn deferred_mail_past_a_full_window_waits_in_the_due_index_and_is_delivered_once() {
    // A window of 20 per pool, an upstream answering 451 to everything and
    // a retry step of an hour: of 120 deferred messages about 100 wait in
    // the spool's due index only, not in memory.
    let n = 120;
    let upstream = free_addr();
    let refusing = || {
        Sink::start_with(SinkOptions {
            addr: Some(upstream),
            reply: Some(451),
            ..SinkOptions::default()
        })
    };
    let mut relay = Relay::start(|s| config_retrying(s, upstream, "1h"));
    stop_after_first_start(&mut relay);
    relay.set_env(WINDOW, "20");
    relay.restart();
    let deferred =
        |relay: &Relay| pool_entry(&api_json(relay, "/api/v1/pools"), "A")["deferred"].as_u64();
    let send_deferred = |relay: &Relay, tag: &str| -> Vec<String> {
        let ids = send_list_mail(relay, tag, n);
        relay.wait_until(&format!("{n} deferred"), DEADLINE, || {
            deferred(relay) == Some(n as u64)
        });
        ids
    };
    let check_on_disk = |relay: &Relay| {
        let left = remaining(relay);
        assert!(
            (50.0..=(n as f64 - 20.0)).contains(&left),
            "{left} of {n} deferred messages in the due index only with a window of 20\n{}",
            relay.logs()
        );
    };

    // Phase 1: deferred past the window, then the upstream back and a flush.
    let sink = refusing();
    let mut expected: BTreeSet<String> = send_deferred(&relay, "due-1").into_iter().collect();
    check_on_disk(&relay);
    drop(sink);
    let sink = Sink::start_at(upstream);
    queue_ok(&relay, &["flush", "--pool", "A"]);
    relay.wait_until(&format!("{n} messages at the sink"), DEADLINE, || {
        sink.count() >= n
    });
    relay.wait_until("nothing left in the due index", DEADLINE, || {
        remaining(&relay) == 0.0 && deferred(&relay) == Some(0)
    });
    let mut delivered = sink.message_ids();
    drop(sink);

    // Phase 2: deferred again, kill -9, restarted with the upstream back.
    let sink = refusing();
    expected.extend(send_deferred(&relay, "due-2"));
    check_on_disk(&relay);
    relay.kill9();
    drop(sink);
    let sink = Sink::start_at(upstream);
    relay.restart();
    relay.wait_until("the end of recovery", DEADLINE, || {
        recovered_log_lines(&relay) == 3
    });
    check_on_disk(&relay);
    queue_ok(&relay, &["flush", "--pool", "A"]);
    relay.wait_until(&format!("{n} more messages at the sink"), DEADLINE, || {
        sink.count() >= n
    });
    delivered.extend(sink.message_ids());
    assert_each_once(&relay, &expected, delivered);
}
