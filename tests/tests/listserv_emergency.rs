//! The emergency lane of reference configuration 1: with thousands of
//! messages queued for SCOOBY's slow smarthost, a posting to the emergency
//! list (Delivery-Pool=B) reaches SCRAPPY within a second of its 250.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use poolrelay_tests::admin::queued_in;
use poolrelay_tests::listserv::{SenderForm, bulk_send, posting, reference, start_imported};
use poolrelay_tests::{Relay, Sink, SinkOptions, message, poll_until, unique_id};

const HOST: &str = "LISTSERV.EXAMPLE.ORG";
/// Messages queued for SCOOBY.
const BACKLOG: usize = 5_000;
/// SCOOBY's sink waits this long before answering each final dot: its two
/// workers deliver about 6-7 messages a second, so the backlog stays.
const SCOOBY_DELAY_MS: u64 = 300;
/// The promise.
const EMERGENCY_WITHIN: Duration = Duration::from_secs(1);

/// Sends one emergency posting; returns its Message-ID and the instant its
/// 250 was read.
fn send_emergency(relay: &Relay) -> (String, Instant) {
    let m = posting("EMERGENCY", HOST, SenderForm::Named);
    let r = relay.send(
        &m.envelope_from,
        &[poolrelay_tests::listserv::MEMBER],
        &m.text,
    );
    let at = Instant::now();
    assert_eq!(r.code, 250, "emergency posting: {r}");
    (m.id, at)
}

/// Waits (polling every 5 ms) for `id` at `sink`; returns the time from
/// `since` to its arrival, or panics after 10 s.
fn arrival(relay: &Relay, sink: &Sink, id: &str, since: Instant) -> Duration {
    let mut took = None;
    let ok = poll_until(Duration::from_secs(10), Duration::from_millis(5), || {
        if sink.message_ids().iter().any(|m| m == id) {
            took = Some(since.elapsed());
            true
        } else {
            false
        }
    });
    match took {
        Some(t) if ok => t,
        _ => panic!(
            "the emergency posting <{id}> did not reach SCRAPPY within 10 s\n{}{}",
            sink.logs(),
            relay.logs()
        ),
    }
}

#[test]
fn emergency_posting_reaches_scrappy_within_one_second_behind_5000_queued_for_scooby() {
    let scooby = Sink::start_with(SinkOptions {
        delay_ms: Some(SCOOBY_DELAY_MS),
        ..SinkOptions::default()
    });
    let scrappy = Sink::start();
    let relay = start_imported(
        &reference("ref1"),
        &[
            ("scooby.example.org", &scooby),
            ("scrappy.example.org", &scrappy),
        ],
    );
    let bulk_from = format!("owner-BIGLIST@{HOST}");
    let make = |i: usize| {
        let id = unique_id(&format!("bulk{i}"));
        let mut m = message(&id, &bulk_from, "member@example.net", "bulk", "newsletter");
        m = format!("Sender: BIGLIST@{HOST}\r\n{m}");
        m
    };

    // One emergency posting while the flood is still arriving...
    let flooding = AtomicBool::new(true);
    let (during, flood_took) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            let took = bulk_send(relay.smtp_addr(), 4, BACKLOG, &bulk_from, &make);
            flooding.store(false, Ordering::SeqCst);
            took
        });
        // Let a good part of the flood be queued first.
        relay.wait_until(
            "a few hundred bulk messages to be accepted",
            Duration::from_secs(60),
            || !flooding.load(Ordering::SeqCst) || queued_in(&relay, "A") >= 500,
        );
        let still_flooding = flooding.load(Ordering::SeqCst);
        let (id, at) = send_emergency(&relay);
        let took = arrival(&relay, &scrappy, &id, at);
        let flood_took = flood
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        ((took, still_flooding), flood_took)
    });
    eprintln!(
        "{BACKLOG} bulk messages accepted in {flood_took:?} ({:.0} msg/s); emergency posting \
         during the flood (still flooding: {}) arrived {:?} after its 250",
        BACKLOG as f64 / flood_took.as_secs_f64(),
        during.1,
        during.0
    );

    // ...and one with the whole backlog queued.
    let delivered_to_scooby = scooby.count();
    assert!(
        delivered_to_scooby + 1000 < BACKLOG,
        "the backlog must still be there: SCOOBY already has {delivered_to_scooby} of {BACKLOG}"
    );
    let (id, at) = send_emergency(&relay);
    let after = arrival(&relay, &scrappy, &id, at);
    eprintln!(
        "emergency posting with {} still queued for SCOOBY arrived {after:?} after its 250",
        BACKLOG - delivered_to_scooby
    );

    assert!(
        during.0 <= EMERGENCY_WITHIN && after <= EMERGENCY_WITHIN,
        "emergency postings must reach SCRAPPY within {EMERGENCY_WITHIN:?} of their 250: \
         during the flood {:?}, behind the backlog {after:?}\n{}",
        during.0,
        relay.logs()
    );
    assert_eq!(
        scrappy.count(),
        2,
        "only the two emergency postings go through SCRAPPY"
    );
    assert!(
        scooby
            .messages()
            .iter()
            .all(|m| m.from.eq_ignore_ascii_case(&bulk_from)),
        "only bulk mail goes through SCOOBY"
    );
}
