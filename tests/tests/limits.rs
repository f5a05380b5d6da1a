//! Listener policy: relay_from, max_message_size, max_recipients.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use poolrelay_tests::{Relay, Reply, Sink, SmtpClient, SmtpError, message, unique_id};

const DELIVERY: Duration = Duration::from_secs(30);

fn assert_reply(r: &Reply, code: u16, enhanced: &str, what: &str, relay: &Relay) {
    assert!(
        r.code == code && r.enhanced() == Some(enhanced),
        "{what}: expected {code} {enhanced}, got {r}\n{}",
        relay.logs()
    );
}

/// Sends a proper message from 127.0.0.1 and waits for it, then checks that
/// it is the only message the sink ever got.
fn assert_only_control_message_arrives(relay: &Relay, sink: &Sink) {
    let id = unique_id("control");
    let from = "owner-control@lists.test";
    relay.send(
        from,
        &["member@example.test"],
        &message(&id, from, "member@example.test", "control", "ok"),
    );
    sink.wait_for_message_id(&id, DELIVERY);
    let ids = sink.message_ids();
    assert_eq!(
        ids,
        vec![id],
        "the sink must hold only the control message\n{}",
        relay.logs()
    );
}

#[test]
fn client_outside_relay_from_is_refused_with_554_5_7_1() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), "relay_from = [\"127.0.0.1/32\"]"));

    let outside = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut c = SmtpClient::connect_from(outside, relay.smtp_addr())
        .unwrap_or_else(|e| panic!("connect from {outside}: {e}\n{}", relay.logs()));
    assert_eq!(
        c.local_addr().map(|a| a.ip()).ok(),
        Some(outside),
        "client bound to {outside}"
    );
    assert_eq!(c.greeting.code, 220, "greeting: {}", c.greeting);
    assert_eq!(c.cmd("EHLO outside.test").code, 250, "EHLO from outside");
    let r = c.cmd("MAIL FROM:<someone@outside.test>");
    assert_eq!(r.code, 250, "MAIL FROM from outside relay_from: {r}");
    let r = c.cmd("RCPT TO:<victim@example.test>");
    assert_reply(&r, 554, "5.7.1", "RCPT from outside relay_from", &relay);
    // Without an accepted recipient DATA must not start a transaction.
    let r = c.cmd("DATA");
    if r.code == 354 {
        let id = unique_id("outside");
        c.write_bytes(&poolrelay_tests::data_bytes(&message(
            &id,
            "someone@outside.test",
            "victim@example.test",
            "x",
            "x",
        )))
        .unwrap_or_else(|e| panic!("writing data: {e}"));
        let r = c
            .read_reply()
            .unwrap_or_else(|e| panic!("reply to the final dot: {e}"));
        panic!(
            "DATA after a refused RCPT got 354 and the final dot got {r}\n{}",
            relay.logs()
        );
    }
    assert!(r.code >= 500, "DATA with no accepted recipient got {r}");
    c.quit();

    assert_only_control_message_arrives(&relay, &sink);
}

#[test]
fn size_parameter_over_max_message_size_is_refused_at_mail() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), "max_message_size = \"10KB\""));
    let mut c = relay.client();
    let ehlo = c.ehlo();
    assert!(
        ehlo.text
            .lines()
            .any(|l| l.to_ascii_uppercase().starts_with("SIZE")),
        "EHLO must advertise SIZE: {ehlo}"
    );
    let r = c.cmd("MAIL FROM:<a@b.test> SIZE=20000");
    assert_reply(
        &r,
        552,
        "5.3.4",
        "MAIL FROM with SIZE=20000 over a 10KB limit",
        &relay,
    );
    let r = c.cmd("MAIL FROM:<a@b.test> SIZE=5000");
    assert_eq!(
        r.code, 250,
        "MAIL FROM with SIZE=5000 under a 10KB limit: {r}"
    );
    c.quit();
}

#[test]
fn oversized_message_without_size_is_refused_after_the_dot() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), "max_message_size = \"10KB\""));
    let id = unique_id("oversized");
    let from = "owner-big@lists.test";
    let body =
        "0123456789 abcdefghijklmnopqrstuvwxyz 0123456789 abcdefghijklmnopqrstuvwxyz\n".repeat(270);
    let msg = message(&id, from, "member@example.test", "too big", &body);
    assert!(msg.len() > 20_000, "test message is {} bytes", msg.len());
    let mut c = relay.client();
    match c.send_mail(from, &["member@example.test"], &msg) {
        Err(SmtpError::Rejected { stage, reply }) if stage == "final dot" => assert_reply(
            &reply,
            552,
            "5.3.4",
            "final dot of a 20 KB message over a 10KB limit",
            &relay,
        ),
        other => panic!(
            "a 20 KB message over a 10KB limit: expected 552 5.3.4 after the dot, got {other:?}\n{}",
            relay.logs()
        ),
    }
    c.quit();
    assert_only_control_message_arrives(&relay, &sink);
}

#[test]
fn fourth_recipient_over_max_recipients_gets_452_and_three_get_the_message() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), "max_recipients = 3"));
    let rcpts = [
        "r1@example.test",
        "r2@example.test",
        "r3@example.test",
        "r4@example.test",
    ];
    let from = "owner-many@lists.test";
    let id = unique_id("max-rcpt");
    let mut c = relay.client();
    c.ehlo();
    assert_eq!(c.cmd(&format!("MAIL FROM:<{from}>")).code, 250, "MAIL FROM");
    for r in &rcpts[..3] {
        let reply = c.cmd(&format!("RCPT TO:<{r}>"));
        assert_eq!(reply.code, 250, "RCPT {r} (within max_recipients): {reply}");
    }
    let reply = c.cmd(&format!("RCPT TO:<{}>", rcpts[3]));
    assert_reply(
        &reply,
        452,
        "4.5.3",
        "the 4th RCPT over max_recipients = 3",
        &relay,
    );
    let reply = c.cmd("DATA");
    assert_eq!(reply.code, 354, "DATA: {reply}");
    c.write_bytes(&poolrelay_tests::data_bytes(&message(
        &id,
        from,
        "list@example.test",
        "three",
        "hi",
    )))
    .unwrap_or_else(|e| panic!("writing data: {e}"));
    let reply = c
        .read_reply()
        .unwrap_or_else(|e| panic!("reply to the final dot: {e}\n{}", relay.logs()));
    assert_eq!(reply.code, 250, "final dot: {reply}");
    c.quit();

    let want: BTreeSet<String> = rcpts[..3].iter().map(|s| s.to_string()).collect();
    let got = || -> Vec<String> {
        sink.messages()
            .into_iter()
            .filter(|m| m.message_id().as_deref() == Some(id.as_str()))
            .flat_map(|m| m.to)
            .collect()
    };
    relay.wait_until(
        "the three accepted recipients at the sink",
        DELIVERY,
        || {
            got()
                .into_iter()
                .collect::<BTreeSet<_>>()
                .is_superset(&want)
        },
    );
    let got = got();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        want.iter().cloned().collect::<Vec<_>>(),
        "the upstream must get exactly the three accepted recipients, once each (got {got:?})"
    );
}
