//! "250 means durable": kill -9 the relay while clients are sending, with
//! its upstream down; after a restart with the upstream up, every message
//! that got a 250 is delivered.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use poolrelay_tests::ledger::{SharedLedger, id_counts};
use poolrelay_tests::{
    POLL_INTERVAL, Relay, Sink, SmtpClient, SmtpError, free_addr, message, poll_until, unique_id,
};

const THREADS: usize = 5;
/// Upper bound per client, so the test is bounded even if the kill is late.
const MAX_PER_THREAD: usize = 400;
/// Acknowledged messages to see before pulling the plug.
const ACKED_BEFORE_KILL: usize = 50;

#[test]
fn every_message_acknowledged_before_kill9_is_delivered_after_restart() {
    // The upstream's port is chosen now, but nothing listens there until
    // after the kill: the relay can only queue.
    let upstream = free_addr();
    let mut relay = Relay::start(|s| s.single_upstream(upstream, ""));
    let addr = relay.smtp_addr();

    let ledger = SharedLedger::new();
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let ledger = ledger.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let why = (|| {
                    let mut client =
                        SmtpClient::connect(addr).map_err(|e| format!("connect: {e}"))?;
                    for i in 0..MAX_PER_THREAD {
                        if stop.load(Ordering::Relaxed) {
                            return Ok(format!("stopped after {i} messages"));
                        }
                        let id = unique_id(&format!("crash-{t}-{i}"));
                        let from = format!("owner-crash{t}@lists.test");
                        let msg =
                            message(&id, &from, "member@example.test", "crash test", "payload\n");
                        let result =
                            client.send_mail_with(&from, &["member@example.test"], &msg, |_| {
                                ledger.data_sent(&id);
                            });
                        match result {
                            Ok(r) if r.code == 250 => {
                                ledger.acked(&id);
                            }
                            Ok(r) => return Err(format!("message {i}: final dot got {r}")),
                            Err(e @ SmtpError::Io { .. }) => {
                                return Ok(format!("message {i}: {e}"));
                            }
                            Err(e) => return Err(format!("message {i}: {e}")),
                        }
                    }
                    Ok(format!("sent all {MAX_PER_THREAD}"))
                })();
                ledger.stopped(t, why);
            })
        })
        .collect();

    relay.wait_until(
        &format!("{ACKED_BEFORE_KILL} acknowledged messages before the kill"),
        Duration::from_secs(60),
        || ledger.acked_count() >= ACKED_BEFORE_KILL,
    );
    relay.kill9();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        // Each client stops at its next I/O error (bounded by its 10 s timeouts).
        let _ = h.join();
    }
    let ledger = ledger.take();
    let unexpected = ledger.unexpected_stops();
    assert!(
        unexpected.is_empty(),
        "a client failed before the kill: {unexpected:?}\n{}",
        relay.logs()
    );
    eprintln!(
        "[durability] acked {} / in flight {} at the kill; clients: {:?}",
        ledger.acked.len(),
        ledger.in_flight.len(),
        ledger.stops
    );

    let sink = Sink::start_at(upstream);
    relay.restart();

    let acked = &ledger.acked;
    let arrived_ids = || sink.message_ids().into_iter().collect::<BTreeSet<String>>();
    if !poll_until(Duration::from_secs(90), POLL_INTERVAL, || {
        arrived_ids().is_superset(acked)
    }) {
        let arrived = arrived_ids();
        let missing: Vec<_> = acked.difference(&arrived).collect();
        panic!(
            "after the restart, {} of {} acknowledged messages never reached the upstream within 90 s \
             (250 must mean durable): {missing:?}\n{}",
            missing.len(),
            acked.len(),
            relay.logs()
        );
    }

    let counts = id_counts(sink.message_ids());
    let acked_twice: Vec<_> = counts
        .iter()
        .filter(|(id, n)| **n > 1 && acked.contains(*id))
        .collect();
    let never_sent = ledger.never_sent(&counts);
    assert!(
        acked_twice.is_empty() && never_sent.is_empty(),
        "acknowledged messages delivered more than once: {acked_twice:?}\n\
         messages delivered whose data was never sent: {never_sent:?}\n{}",
        relay.logs()
    );
}
