//! Graceful shutdown on SIGTERM (README.md, "Operating" > "Reload and
//! shutdown"): open transactions finish, new connections get 421, idle
//! sessions do not hold the exit up, and every acknowledged message is
//! delivered after a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use poolrelay_tests::ledger::{SharedLedger, id_counts};
use poolrelay_tests::operating::{DELIVERY, EXIT_MARGIN, GRACE, RCPT, ids_at};
use poolrelay_tests::{
    POLL_INTERVAL, Relay, Sink, SinkOptions, SmtpClient, SmtpError, data_bytes, free_addr, message,
    poll_until, unique_id,
};

const LOAD_THREADS: usize = 5;
const LOAD_PER_THREAD: usize = 100;
/// Acknowledged messages to see before the SIGTERM.
const ACKED_BEFORE_TERM: usize = 150;

#[test]
fn sigterm_during_a_load_of_500_messages_exits_0_and_delivers_every_acknowledged_message() {
    // A slow upstream (20 ms per message) keeps deliveries in flight.
    let upstream = free_addr();
    let sink = Sink::start_with(SinkOptions {
        addr: Some(upstream),
        delay_ms: Some(20),
        ..SinkOptions::default()
    });
    let mut relay = Relay::start(|s| s.single_upstream(upstream, ""));
    let addr = relay.smtp_addr();

    let ledger = SharedLedger::new();
    let termed = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..LOAD_THREADS)
        .map(|t| {
            let ledger = ledger.clone();
            let termed = Arc::clone(&termed);
            std::thread::spawn(move || {
                let why = (|| {
                    let mut client =
                        SmtpClient::connect(addr).map_err(|e| format!("connect: {e}"))?;
                    for i in 0..LOAD_PER_THREAD {
                        let id = unique_id(&format!("term-{t}-{i}"));
                        let from = format!("owner-term{t}@lists.test");
                        let msg = message(&id, &from, RCPT, "sigterm test", "payload\n");
                        let result = client.send_mail_with(&from, &[RCPT], &msg, |_| {
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
                            Err(SmtpError::Rejected { stage, reply })
                                if termed.load(Ordering::SeqCst) && reply.code / 100 == 4 =>
                            {
                                return Ok(format!("message {i}: {stage} got {reply}"));
                            }
                            Err(e) => return Err(format!("message {i}: {e}")),
                        }
                    }
                    client.quit();
                    Ok(format!("sent all {LOAD_PER_THREAD}"))
                })();
                ledger.stopped(t, why);
            })
        })
        .collect();

    relay.wait_until(
        &format!("{ACKED_BEFORE_TERM} acknowledged messages before the SIGTERM"),
        Duration::from_secs(60),
        || ledger.acked_count() >= ACKED_BEFORE_TERM,
    );
    termed.store(true, Ordering::SeqCst);
    let termed_at = Instant::now();
    relay.signal("TERM");
    let status = relay.wait_exit(GRACE + EXIT_MARGIN);
    let took = termed_at.elapsed();
    for h in handles {
        let _ = h.join();
    }
    let status = status.unwrap_or_else(|| {
        panic!(
            "the relay did not exit within {:?} of SIGTERM (grace {GRACE:?})\n{}",
            GRACE + EXIT_MARGIN,
            relay.logs()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\n{}",
        relay.logs()
    );
    let ledger = ledger.take();
    let unexpected = ledger.unexpected_stops();
    assert!(
        unexpected.is_empty(),
        "a client failed: {unexpected:?}\n{}",
        relay.logs()
    );
    eprintln!(
        "[shutdown] SIGTERM: exited in {took:?}; acked {}, in flight {}, delivered before the restart {}; clients: {:?}",
        ledger.acked.len(),
        ledger.in_flight.len(),
        sink.count(),
        ledger.stops
    );

    relay.restart();
    let acked = &ledger.acked;
    if !poll_until(Duration::from_secs(90), POLL_INTERVAL, || {
        ids_at(&sink).is_superset(acked)
    }) {
        let arrived = ids_at(&sink);
        let missing: Vec<_> = acked.difference(&arrived).collect();
        panic!(
            "after the SIGTERM and a restart, {} of {} acknowledged messages never arrived: {missing:?}\n{}",
            missing.len(),
            acked.len(),
            relay.logs()
        );
    }
    let counts = id_counts(sink.message_ids());
    let never_sent = ledger.never_sent(&counts);
    assert!(
        never_sent.is_empty(),
        "messages delivered whose data was never sent: {never_sent:?}"
    );
    let twice = counts.values().filter(|n| **n > 1).count();
    if twice > 0 {
        eprintln!(
            "[shutdown] {twice} messages were delivered twice (allowed for in-flight deliveries)"
        );
    }
}

/// README.md ("Reload and shutdown") for a session in the middle of DATA at SIGTERM:
/// new connections get `421 4.3.2`, the open transaction finishes with its
/// 250, and the process then exits 0; the message is delivered.
#[test]
fn sigterm_lets_an_open_transaction_finish_and_refuses_new_connections() {
    let upstream = free_addr();
    let mut relay = Relay::start(|s| s.single_upstream(upstream, ""));
    let id = unique_id("term-open");
    let from = "owner-open@lists.test";
    let msg = message(
        &id,
        from,
        RCPT,
        "open transaction",
        "finished after SIGTERM\n",
    );
    let mut c = relay.client();
    c.ehlo();
    assert_eq!(c.cmd(&format!("MAIL FROM:<{from}>")).code, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<{RCPT}>")).code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    let data = data_bytes(&msg);
    let (head, tail) = data.split_at(data.len() / 2);
    c.write_bytes(head)
        .unwrap_or_else(|e| panic!("writing the first half of the data: {e}"));

    relay.signal_and_wait_for_log("TERM", "SIGTERM");
    // The log line comes a moment before the listener switches to 421: a
    // newcomer greeted with 220 in that moment quits and tries again.
    let mut last = String::new();
    let refused = poll_until(
        Duration::from_secs(10),
        POLL_INTERVAL,
        || match SmtpClient::connect(relay.smtp_addr()) {
            Ok(n) if n.greeting.code == 421 => {
                last = n.greeting.to_string();
                true
            }
            Ok(n) => {
                last = n.greeting.to_string();
                n.quit();
                false
            }
            Err(e) => panic!(
                "a new connection after SIGTERM failed ({e}): it should get 421 4.3.2 while the open session finishes\n{}",
                relay.logs()
            ),
        },
    );
    assert!(
        refused && last.starts_with("421 4.3.2"),
        "new connections after SIGTERM should get 421 4.3.2; the last got {last}\n{}",
        relay.logs()
    );
    let reply = c
        .write_bytes(tail)
        .and_then(|()| c.read_reply())
        .unwrap_or_else(|e| {
            panic!(
                "the transaction open at SIGTERM was cut off ({e}) instead of finishing within the grace period\n{}",
                relay.logs()
            )
        });
    assert_eq!(
        reply.code,
        250,
        "final dot of the transaction open at SIGTERM: {reply}\n{}",
        relay.logs()
    );
    c.quit();
    let status = relay
        .wait_exit(GRACE + EXIT_MARGIN)
        .unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", relay.logs()));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}\n{}",
        relay.logs()
    );

    let sink = Sink::start_at(upstream);
    relay.restart();
    sink.wait_for_message_id(&id, DELIVERY);
}

/// A session idle between transactions (LISTSERV keeps its SMTP
/// connections open) has no transaction to finish: SIGTERM must not wait
/// out the whole grace period for it.
#[test]
fn sigterm_does_not_wait_out_the_grace_period_for_an_idle_session() {
    let sink = Sink::start();
    let mut relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    let mut idle = relay.client();
    idle.ehlo();
    let sent = idle
        .send_mail(
            "owner-idle@lists.test",
            &[RCPT],
            &message(
                &unique_id("idle"),
                "owner-idle@lists.test",
                RCPT,
                "idle",
                "x\n",
            ),
        )
        .unwrap_or_else(|e| panic!("send: {e}"));
    assert_eq!(sent.code, 250);
    let started = Instant::now();
    relay.signal("TERM");
    let limit = Duration::from_secs(5);
    let status = relay.wait_exit(limit);
    assert!(
        status.is_some(),
        "the relay was still running {limit:?} after SIGTERM with one idle session open (grace {GRACE:?}): \
         a session with no transaction in progress should be closed (421) at once\n{}",
        relay.logs()
    );
    eprintln!("[shutdown] exited {:?} after SIGTERM", started.elapsed());
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", relay.logs());
    // The idle client sees the end: a 421 or a closed connection.
    if let Ok(r) = idle.try_cmd("NOOP") {
        assert_eq!(r.code, 421, "NOOP after the shutdown got {r}");
    }
}
