//! Hostile input inside a session: mail loops, BDAT chunks that must not
//! run as commands, control characters in ENVID/ORCPT, addresses and log
//! lines, and quoted local parts that must go out as they came in.

use std::time::Duration;

use poolrelay_tests::{Relay, Sink, SmtpClient, data_bytes, message, unique_id};

const DELIVERY: Duration = Duration::from_secs(30);
const FROM: &str = "owner-hostile@lists.test";
const TO: &str = "member@example.test";

/// Sends a proper message and waits for it: once it is at the sink,
/// anything queued earlier had its chance to arrive too. Returns the ids
/// the sink holds.
fn control_message(relay: &Relay, sink: &Sink) -> (String, Vec<String>) {
    let id = unique_id("control");
    relay.send(FROM, &[TO], &message(&id, FROM, TO, "control", "ok"));
    sink.wait_for_message_id(&id, DELIVERY);
    (id, sink.message_ids())
}

fn greeted(relay: &Relay) -> SmtpClient {
    let mut c = relay.client();
    c.ehlo();
    c
}

#[test]
fn a_message_with_more_received_fields_than_max_hops_is_refused_and_not_queued() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    let looped = unique_id("looped");
    let mut headers = String::new();
    for i in 0..51 {
        headers.push_str(&format!(
            "Received: from hop{i}.example.test\n\tby hop{}.example.test; Mon, 1 Jan 2024 00:00:00 +0000\n",
            i + 1
        ));
    }
    let mut c = greeted(&relay);
    let r = c.send_mail(
        FROM,
        &[TO],
        &format!("{headers}{}", message(&looped, FROM, TO, "loop", "x")),
    );
    match r {
        Err(poolrelay_tests::SmtpError::Rejected { stage, reply })
            if stage == "final dot" && reply.code == 554 && reply.enhanced() == Some("5.4.6") => {}
        other => panic!(
            "a message with 51 Received: fields (max_hops 50) got {other:?}; expected 554 5.4.6 at the final dot\n{}",
            relay.logs()
        ),
    }
    // Exactly max_hops is still fine.
    let at_limit = unique_id("fifty-hops");
    let fifty: String = headers.split_inclusive('\n').skip(2).collect();
    let r = c.send_mail(
        FROM,
        &[TO],
        &format!("{fifty}{}", message(&at_limit, FROM, TO, "50", "x")),
    );
    assert!(r.is_ok(), "50 Received: fields: {r:?}\n{}", relay.logs());
    c.quit();
    sink.wait_for_message_id(&at_limit, DELIVERY);
    let (control, ids) = control_message(&relay, &sink);
    assert!(
        !ids.contains(&looped) && ids.len() == 2,
        "the sink holds {ids:?}; expected only <{at_limit}> and <{control}>"
    );
}

#[test]
fn bytes_after_an_unoffered_bdat_are_never_run_as_commands() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    let smuggled = unique_id("bdat-chunk");
    let mut c = greeted(&relay);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    let chunk = format!(
        "RCPT TO:<victim@example.test>\r\nDATA\r\nMessage-ID: <{smuggled}>\r\nSubject: chunk\r\n\r\nx\r\n.\r\n"
    );
    let mut bytes = format!("BDAT {} LAST\r\n", chunk.len()).into_bytes();
    bytes.extend_from_slice(chunk.as_bytes());
    // The relay may close before reading it all: a failed write is fine.
    let _ = c.write_bytes(&bytes);
    let mut replies = Vec::new();
    while let Ok(r) = c.read_reply() {
        replies.push(r.to_string());
    }
    let ran = replies
        .iter()
        .any(|r| r.starts_with("250") || r.starts_with("354"));
    assert!(
        !ran && replies
            .first()
            .is_some_and(|r| r.starts_with("502") || r.starts_with("503")),
        "BDAT (not offered) then a chunk holding RCPT/DATA got {replies:?}; expected 502 (and 421), \
         with no line of the chunk run as a command\n{}",
        relay.logs()
    );
    let (control, ids) = control_message(&relay, &sink);
    assert_eq!(
        ids,
        vec![control],
        "the chunk's message must never be queued"
    );
}

#[test]
fn envid_and_orcpt_with_control_characters_are_refused() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    let mut c = greeted(&relay);
    let mut wrong = Vec::new();
    for params in [
        "ENVID=x+0D+0AInjected:+20yes",
        "ENVID=x+1B[31m",
        "ENVID=x+ZZ",
        "ENVID=x+0",
    ] {
        let r = c.cmd(&format!("MAIL FROM:<{FROM}> {params}"));
        if r.code != 501 || r.enhanced() != Some("5.5.4") {
            wrong.push(format!("MAIL {params}: {r}"));
        }
        if r.code == 250 {
            c.cmd("RSET");
        }
    }
    assert_eq!(
        c.cmd(&format!("MAIL FROM:<{FROM}> ENVID=ok+2Bfine")).code,
        250
    );
    for params in [
        "ORCPT=rfc822;a+0D+0Ab@example.test",
        "ORCPT=rfc822;a+00b@example.test",
        "ORCPT=rfc822;a+Gb@x",
    ] {
        let r = c.cmd(&format!("RCPT TO:<{TO}> {params}"));
        if r.code != 501 || r.enhanced() != Some("5.5.4") {
            wrong.push(format!("RCPT {params}: {r}"));
        }
    }
    c.quit();
    assert!(
        wrong.is_empty(),
        "expected 501 5.5.4 for each:\n{}\n{}",
        wrong.join("\n"),
        relay.logs()
    );
}

#[test]
fn quoted_local_parts_are_passed_on_as_received() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    let id = unique_id("quoted");
    let from = "\"owner list\"@lists.test";
    let rcpts = ["\"john doe\"@example.test", "\"a@evil.test\"@example.test"];
    let mut c = greeted(&relay);
    let r = c.send_mail(from, &rcpts, &message(&id, FROM, TO, "quoted", "x"));
    assert!(r.is_ok(), "quoted local parts: {r:?}\n{}", relay.logs());
    c.quit();
    let got = sink.wait_for_message_id(&id, DELIVERY);
    assert_eq!(got.from, from, "sender at the upstream\n{}", relay.logs());
    assert_eq!(
        got.to,
        rcpts,
        "recipients at the upstream\n{}",
        relay.logs()
    );
}

#[test]
fn control_characters_in_addresses_are_refused() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    let mut c = greeted(&relay);
    let mut wrong = Vec::new();
    for (path, want) in [
        ("\"a\x1bb\"@lists.test", "5.1.7"),
        ("\"a\x0bb\"@lists.test", "5.1.7"),
        ("\"a\rb\"@lists.test", "5.1.7"),
    ] {
        let r = c.cmd(&format!("MAIL FROM:<{path}>"));
        if r.code != 501 || r.enhanced() != Some(want) {
            wrong.push(format!("MAIL FROM:<{path:?}>: {r}"));
            c.cmd("RSET");
        }
    }
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    for path in [
        "\"x\x1by\"@example.test",
        "\"x\x01y\"@example.test",
        "\"x\ry\"@example.test",
    ] {
        let r = c.cmd(&format!("RCPT TO:<{path}>"));
        if r.code != 501 || r.enhanced() != Some("5.1.3") {
            wrong.push(format!("RCPT TO:<{path:?}>: {r}"));
        }
    }
    let r = c.cmd("DATA");
    if r.code == 354 {
        let _ = c.write_bytes(&data_bytes(&message(
            &unique_id("ctl"),
            FROM,
            TO,
            "ctl",
            "x",
        )));
        let _ = c.read_reply();
        wrong.push("DATA got 354: a recipient was accepted".into());
    }
    c.quit();
    assert!(
        wrong.is_empty(),
        "expected 501 5.1.7 (MAIL) / 501 5.1.3 (RCPT):\n{}\n{}",
        wrong.join("\n"),
        relay.logs()
    );
}

#[test]
fn client_text_cannot_forge_log_lines() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    let id = unique_id("log");
    let mut c = relay.client();
    assert_eq!(c.cmd("EHLO evil\x0bname\x1b[2J.test").code, 250);
    // Refused or accepted, its text must not reach the log raw.
    let r = c.cmd("MAIL FROM:<\"x\x0b\x1b[1Ay\"@lists.test>");
    if r.code == 250 {
        assert_eq!(c.cmd(&format!("RCPT TO:<{TO}>")).code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        c.write_bytes(&data_bytes(&message(
            &unique_id("raw"),
            FROM,
            TO,
            "raw",
            "x",
        )))
        .expect("data");
        let _ = c.read_reply();
    }
    // A message on the same session: its accepted line names the HELO.
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<{TO}>")).code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.write_bytes(&data_bytes(&message(&id, FROM, TO, "log", "x")))
        .expect("data");
    let r = c.read_reply().expect("reply to the final dot");
    assert_eq!(r.code, 250, "{r}");
    c.quit();
    sink.wait_for_message_id(&id, DELIVERY);
    let log = relay.log_text();
    // (The log's own colours are escape sequences too; the client's are these.)
    let raw: Vec<&str> = log
        .lines()
        .filter(|l| {
            ['\x0b', '\r'].iter().any(|c| l.contains(*c))
                || l.contains("\x1b[2J")
                || l.contains("\x1b[1A")
        })
        .collect();
    assert!(
        raw.is_empty(),
        "log lines holding raw control characters sent by the client:\n{raw:?}"
    );
    assert!(
        log.contains("evil\\u{b}name"),
        "the accepted line should name the HELO, escaped:\n{log}"
    );
}
