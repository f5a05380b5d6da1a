//! Deferral without rewriting: with an upstream that answers 451 to every
//! message, a retry step writes small attempt records and fsyncs nothing
//! (the spool's commit count stands still), and a restart resumes the
//! attempt counts where they were.

use std::collections::BTreeMap;
use std::time::Duration;

use poolrelay_tests::admin::pool_messages;
use poolrelay_tests::delivery::delivery_attempts;
use poolrelay_tests::{Relay, Sink, SinkOptions, metric_sum, parse_metrics};

const MESSAGES: usize = 40;
const DEADLINE: Duration = Duration::from_secs(90);

/// Fsynced spool batches so far (`poolrelay_spool_commit_seconds_count`).
fn commits(relay: &Relay) -> f64 {
    metric_sum(
        &parse_metrics(&relay.scrape()),
        "poolrelay_spool_commit_seconds_count",
        &[],
    )
    .unwrap_or(0.0)
}

/// Attempts per queue id of pool A, as the admin API lists them.
fn attempts(relay: &Relay) -> BTreeMap<String, u64> {
    pool_messages(relay, "A")
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or_default().to_string(),
                m["attempts"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn wait_all_attempted(relay: &Relay, at_least: u64) -> BTreeMap<String, u64> {
    let mut seen = BTreeMap::new();
    relay.wait_until(
        &format!("{MESSAGES} messages with at least {at_least} attempts"),
        DEADLINE,
        || {
            seen = attempts(relay);
            seen.len() == MESSAGES && seen.values().all(|&a| a >= at_least)
        },
    );
    seen
}

#[test]
fn retry_steps_fsync_nothing_and_a_restart_resumes_the_attempt_counts() {
    let sink = Sink::start_with(SinkOptions {
        reply: Some(451),
        ..SinkOptions::default()
    });
    let mut relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    for i in 0..MESSAGES {
        relay.send_tagged(
            "owner-list@lists.test",
            &["member@example.test"],
            &format!("defer-{i}"),
        );
    }
    wait_all_attempted(&relay, 1);
    let before = commits(&relay);
    // Two more retry steps of every message (retry = 1s).
    wait_all_attempted(&relay, 3);
    let during = commits(&relay) - before;
    assert!(
        during <= 2.0,
        "{during} fsynced commits during two retry steps of {MESSAGES} deferred messages: \
         a deferral must not rewrite the envelope\n{}",
        relay.logs()
    );

    relay.signal("TERM");
    relay
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", relay.logs()));
    let stopped = attempts_after_restart(&mut relay);
    let at_stop = wait_all_attempted(&relay, 0);
    for (id, n) in &stopped {
        assert!(
            at_stop.get(id).is_some_and(|now| now >= n),
            "message {id} had {n} attempts before the restart, {:?} after\n{}",
            at_stop.get(id),
            relay.logs()
        );
    }
}

/// The attempt counts the relay logged last before it stopped, per queue
/// id, then restarts it.
fn attempts_after_restart(relay: &mut Relay) -> BTreeMap<String, u64> {
    let last: BTreeMap<String, u64> = delivery_attempts(&relay.log_text())
        .into_iter()
        .map(|a| (a.queue_id, a.attempt as u64))
        .collect();
    assert_eq!(
        last.len(),
        MESSAGES,
        "attempt log lines per message\n{}",
        relay.logs()
    );
    relay.restart();
    last
}
