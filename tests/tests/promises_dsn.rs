//! DSNs (README.md, "Delivery semantics": RFC 3464 bounces; NOTIFY, ORCPT,
//! ENVID and RET honoured), read by an independent parser: Python's
//! standard `email` package, run as `python3` over the DSN our sink got.
//!
//! The upstream is scripted: it rejects `gone@` with `550 5.1.1` and
//! `plain@` with a bare `554` (no enhanced code: the DSN's Status must be
//! `5.0.0`), and accepts everyone else. DSNs leave through pool `-`'s own
//! upstream, a `poolrelay sink`.

use std::process::Command;
use std::time::Duration;

use poolrelay_tests::admin::queued_message;
use poolrelay_tests::scripted::Scripted;
use poolrelay_tests::{Relay, Sink, SinkMessage, data_bytes, message, run_with_input, unique_id};
use serde_json::Value;

const DSN_WAIT: Duration = Duration::from_secs(20);

/// Parses a message with Python's `email` package and prints what a DSN
/// reader needs as JSON: the top-level type and report-type, every part's
/// type, the delivery-status blocks, the returned content, and every
/// defect the parser found.
const PY_DSN: &str = r#"
import email, json, sys
raw = sys.stdin.buffer.read()
msg = email.message_from_bytes(raw)
defects = []
for part in msg.walk():
    defects += [type(d).__name__ for d in part.defects]
out = {
    "content_type": msg.get_content_type(),
    "report_type": msg.get_param("report-type"),
    "parts": [],
    "defects": defects,
}
if msg.is_multipart():
    for part in msg.get_payload():
        p = {"type": part.get_content_type()}
        if p["type"] == "text/plain":
            p["text"] = part.get_payload(decode=True).decode("utf-8", "replace")
        elif p["type"] == "message/delivery-status":
            blocks = part.get_payload()
            p["blocks"] = [[[k, str(v)] for k, v in b.items()] for b in blocks]
        elif p["type"] == "text/rfc822-headers":
            p["text"] = part.get_payload(decode=True).decode("utf-8", "replace")
        elif p["type"] == "message/rfc822":
            inner = part.get_payload(0)
            p["headers"] = [[k, str(v)] for k, v in inner.items()]
            p["body"] = inner.get_payload()
        out["parts"].append(p)
print(json.dumps(out))
"#;

/// The DSN as Python's `email` package sees it.
fn python_parse(m: &SinkMessage) -> Value {
    let found = Command::new("python3").arg("--version").output();
    if !found.is_ok_and(|o| o.status.success()) {
        panic!(
            "python3 is missing: install it (apt-get install python3) to parse DSNs independently"
        );
    }
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(PY_DSN);
    let out = run_with_input(
        cmd,
        m.raw.as_bytes(),
        "python3 email parser",
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "python3 could not parse the DSN:\n{out}\n{}",
        m.raw
    );
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("python3 printed no JSON ({e}):\n{out}"))
}

/// One field of a delivery-status block (case-insensitive), as Python read it.
fn field<'a>(block: &'a Value, name: &str) -> Option<&'a str> {
    block.as_array()?.iter().find_map(|kv| {
        let k = kv[0].as_str()?;
        k.eq_ignore_ascii_case(name)
            .then(|| kv[1].as_str())
            .flatten()
    })
}

/// `a; b` -> `a;b` (whitespace after the type is optional).
fn squash(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join("")
}

/// The per-recipient block whose Final-Recipient is `rfc822; addr`.
fn recipient_block<'a>(blocks: &'a [Value], addr: &str) -> Option<&'a Value> {
    blocks[1..].iter().find(|b| {
        field(b, "Final-Recipient")
            .is_some_and(|v| squash(v).eq_ignore_ascii_case(&format!("rfc822;{addr}")))
    })
}

/// Every Final-Recipient address of the per-recipient blocks.
fn final_recipients(blocks: &[Value]) -> Vec<String> {
    blocks[1..]
        .iter()
        .filter_map(|b| field(b, "Final-Recipient"))
        .map(|v| squash(v).trim_start_matches("rfc822;").to_string())
        .collect()
}

struct Setup {
    up: Scripted,
    dsn_sink: Sink,
    relay: Relay,
}

fn setup() -> Setup {
    let up = Scripted::start_default();
    up.set_rcpt_reply("gone", "550 5.1.1 <gone@dest.test> no such user");
    up.set_rcpt_reply("plain", "554 mailbox unavailable");
    let dsn_sink = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n[pool.A]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"A\"]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"-\"]\n",
            s.head(),
            s.listener(""),
            up.addr(),
            dsn_sink.addr()
        )
    });
    Setup {
        up,
        dsn_sink,
        relay,
    }
}

/// One transaction with raw MAIL and RCPT parameters; returns (Message-ID,
/// body marker, queue id).
fn send_raw(
    relay: &Relay,
    from: &str,
    mail_params: &str,
    rcpts: &[&str],
) -> (String, String, String) {
    let id = unique_id("dsn");
    let marker = format!("BODY-MARKER-{}", unique_id("body").replace(['@', '.'], "-"));
    let mut c = relay.client();
    c.ehlo();
    let r = c.cmd(format!("MAIL FROM:<{from}> {mail_params}").trim_end());
    assert_eq!(
        r.code,
        250,
        "MAIL FROM:<{from}> {mail_params}: {r}\n{}",
        relay.logs()
    );
    for rcpt in rcpts {
        let r = c.cmd(&format!("RCPT TO:{rcpt}"));
        assert_eq!(r.code, 250, "RCPT TO:{rcpt}: {r}\n{}", relay.logs());
    }
    let r = c.cmd("DATA");
    assert_eq!(r.code, 354, "DATA: {r}");
    let text = message(
        &id,
        from,
        "member@dest.test",
        "dsn test",
        &format!("{marker}\nsecond line\n"),
    );
    c.write_bytes(&data_bytes(&text))
        .unwrap_or_else(|e| panic!("writing the message: {e}"));
    let r = c
        .read_reply()
        .unwrap_or_else(|e| panic!("reply to the final dot: {e}\n{}", relay.logs()));
    assert_eq!(r.code, 250, "final dot: {r}");
    let qid = r
        .queue_id()
        .unwrap_or_else(|| panic!("no queue id in {r}"))
        .to_string();
    c.quit();
    (id, marker, qid)
}

/// Waits for the DSN addressed to `sender`; checks its envelope.
fn dsn_for(dsn_sink: &Sink, relay: &Relay, sender: &str) -> SinkMessage {
    relay.wait_until(&format!("a DSN to <{sender}>"), DSN_WAIT, || {
        dsn_sink.messages().iter().any(|m| m.to == [sender])
    });
    let all: Vec<SinkMessage> = dsn_sink
        .messages()
        .into_iter()
        .filter(|m| m.to == [sender])
        .collect();
    assert_eq!(all.len(), 1, "one DSN to <{sender}>, got {}", all.len());
    let m = all.into_iter().next().unwrap_or_else(|| unreachable!());
    assert_eq!(m.from, "", "a DSN is sent from <>; got <{}>", m.from);
    m
}

/// The three parts of a DSN as Python saw them; checks the multipart/report
/// frame and that the parser found no defect.
fn report_parts(dsn: &Value, raw: &str) -> (Value, Vec<Value>, Value) {
    assert_eq!(dsn["content_type"], "multipart/report", "{dsn:#}\n{raw}");
    assert_eq!(dsn["report_type"], "delivery-status", "{dsn:#}\n{raw}");
    assert_eq!(
        dsn["defects"].as_array().map(Vec::len),
        Some(0),
        "Python's email parser found defects: {}\n{raw}",
        dsn["defects"]
    );
    let parts = dsn["parts"].as_array().cloned().unwrap_or_default();
    assert_eq!(parts.len(), 3, "a DSN has three parts: {dsn:#}");
    assert_eq!(parts[0]["type"], "text/plain", "part 1: {dsn:#}");
    assert_eq!(
        parts[1]["type"], "message/delivery-status",
        "part 2: {dsn:#}"
    );
    let blocks = parts[1]["blocks"].as_array().cloned().unwrap_or_default();
    assert!(
        blocks.len() >= 2,
        "per-message and per-recipient fields: {dsn:#}"
    );
    assert_eq!(
        field(&blocks[0], "Reporting-MTA").map(squash).as_deref(),
        Some("dns;relay.test"),
        "Reporting-MTA: {:#}",
        blocks[0]
    );
    (parts[0].clone(), blocks, parts[2].clone())
}

#[test]
fn dsn_for_ret_hdrs_is_rfc3464_with_envid_orcpt_enhanced_status_and_headers_only() {
    let Setup {
        up,
        dsn_sink,
        relay,
    } = setup();
    let sender = "owner-hdrs@lists.test";
    let envid = "ENV-hdrs-42";
    let (id, marker, _qid) = send_raw(
        &relay,
        sender,
        &format!("RET=HDRS ENVID={envid}"),
        &[
            "<gone@dest.test> NOTIFY=FAILURE ORCPT=rfc822;gone-orig@lists.test",
            "<plain@dest.test> NOTIFY=FAILURE ORCPT=rfc822;plain-orig@lists.test",
            "<ok@dest.test>",
        ],
    );
    let m = dsn_for(&dsn_sink, &relay, sender);
    let dsn = python_parse(&m);
    let (human, blocks, returned) = report_parts(&dsn, &m.raw);
    assert!(
        human["text"]
            .as_str()
            .is_some_and(|t| t.contains("gone@dest.test")),
        "the human-readable part names the failed recipient: {human:#}"
    );
    assert_eq!(
        field(&blocks[0], "Original-Envelope-Id"),
        Some(envid),
        "Original-Envelope-Id: {:#}",
        blocks[0]
    );
    let mut got = final_recipients(&blocks);
    got.sort();
    assert_eq!(
        got,
        ["gone@dest.test", "plain@dest.test"],
        "exactly the two rejected recipients are reported (not ok@): {dsn:#}"
    );
    for (addr, orig, status, code) in [
        ("gone@dest.test", "gone-orig@lists.test", "5.1.1", "550"),
        ("plain@dest.test", "plain-orig@lists.test", "5.0.0", "554"),
    ] {
        let b = recipient_block(&blocks, addr)
            .unwrap_or_else(|| panic!("no block for {addr}: {dsn:#}"));
        assert_eq!(
            field(b, "Original-Recipient").map(squash),
            Some(format!("rfc822;{orig}")),
            "Original-Recipient of {addr}: {b:#}"
        );
        assert_eq!(
            field(b, "Action"),
            Some("failed"),
            "Action of {addr}: {b:#}"
        );
        assert_eq!(field(b, "Status"), Some(status), "Status of {addr}: {b:#}");
        let diag = field(b, "Diagnostic-Code").map(squash).unwrap_or_default();
        assert!(
            diag.to_ascii_lowercase()
                .starts_with(&format!("smtp;{code}")),
            "Diagnostic-Code of {addr} should be the upstream's reply {code}: {b:#}"
        );
    }
    assert_eq!(
        returned["type"], "text/rfc822-headers",
        "RET=HDRS: part 3 {dsn:#}"
    );
    let headers = returned["text"].as_str().unwrap_or_default();
    assert!(
        headers.contains(&format!("<{id}>")),
        "part 3 holds the original headers (Message-ID <{id}>): {headers}"
    );
    assert!(
        !headers.contains(&marker),
        "RET=HDRS: the body text must not be returned: {headers}"
    );
    // ok@ got the message itself.
    assert_eq!(up.delivered_to("ok@dest.test"), 1, "{}", up.dump());
}

#[test]
fn dsn_for_ret_full_returns_the_whole_message_as_message_rfc822() {
    let Setup {
        up: _up,
        dsn_sink,
        relay,
    } = setup();
    let sender = "owner-full@lists.test";
    let (id, marker, _qid) = send_raw(
        &relay,
        sender,
        "RET=FULL ENVID=ENV-full-7",
        &["<gone@dest.test>", "<ok@dest.test>"],
    );
    let m = dsn_for(&dsn_sink, &relay, sender);
    let dsn = python_parse(&m);
    let (_, blocks, returned) = report_parts(&dsn, &m.raw);
    assert_eq!(final_recipients(&blocks), ["gone@dest.test"], "{dsn:#}");
    let b = recipient_block(&blocks, "gone@dest.test").unwrap_or_else(|| unreachable!());
    assert_eq!(field(b, "Status"), Some("5.1.1"), "{b:#}");
    assert_eq!(
        field(b, "Original-Recipient"),
        None,
        "no ORCPT was given, so no Original-Recipient: {b:#}"
    );
    assert_eq!(
        field(&blocks[0], "Original-Envelope-Id"),
        Some("ENV-full-7")
    );
    assert_eq!(
        returned["type"], "message/rfc822",
        "RET=FULL: part 3 {dsn:#}"
    );
    let mid = returned["headers"]
        .as_array()
        .and_then(|h| {
            h.iter().find(|kv| {
                kv[0]
                    .as_str()
                    .is_some_and(|k| k.eq_ignore_ascii_case("Message-ID"))
            })
        })
        .and_then(|kv| kv[1].as_str())
        .unwrap_or_default();
    assert_eq!(
        mid,
        format!("<{id}>"),
        "the returned message's Message-ID: {dsn:#}"
    );
    assert!(
        returned["body"]
            .as_str()
            .is_some_and(|b| b.contains(&marker)),
        "RET=FULL returns the body too ({marker}): {dsn:#}"
    );
}

#[test]
fn notify_never_gets_no_dsn_and_notify_failure_on_one_recipient_reports_only_that_one() {
    let Setup {
        up,
        dsn_sink,
        relay,
    } = setup();
    // NOTIFY=NEVER on the rejected recipient: no DSN at all.
    let never = "owner-never@lists.test";
    let (_, _, never_qid) = send_raw(
        &relay,
        never,
        "",
        &["<gone@dest.test> NOTIFY=NEVER", "<ok@dest.test>"],
    );
    // Two rejected recipients; only gone@ asked for failure reports
    // (plain@ asked for delay reports only).
    let one = "owner-one@lists.test";
    let (_, _, _) = send_raw(
        &relay,
        one,
        "",
        &[
            "<gone@dest.test> NOTIFY=FAILURE",
            "<plain@dest.test> NOTIFY=DELAY",
        ],
    );
    let m = dsn_for(&dsn_sink, &relay, one);
    let dsn = python_parse(&m);
    let (_, blocks, _) = report_parts(&dsn, &m.raw);
    assert_eq!(
        final_recipients(&blocks),
        ["gone@dest.test"],
        "only the NOTIFY=FAILURE recipient is reported: {dsn:#}"
    );

    // The NOTIFY=NEVER message is done (bounced recipient, ok@ delivered):
    // its DSN, had one been made, was queued before it left the queue.
    relay.wait_until(
        "the NOTIFY=NEVER message to leave the queue",
        DSN_WAIT,
        || queued_message(&relay, "A", &never_qid).is_none(),
    );
    assert!(up.delivered_to("ok@dest.test") >= 1, "{}", up.dump());
    let log = relay.log_text();
    assert!(
        !log.lines()
            .any(|l| l.contains("DSN queued") && l.contains(&never_qid)),
        "a DSN was queued for the NOTIFY=NEVER message {never_qid}\n{}",
        relay.logs()
    );
    // And the pool `-` queue is empty: nothing for <owner-never@> waits.
    relay.wait_until("pool - to be empty", DSN_WAIT, || {
        poolrelay_tests::admin::queued_in(&relay, "-") == 0
    });
    assert!(
        dsn_sink.messages().iter().all(|m| m.to != [never]),
        "NOTIFY=NEVER got a DSN anyway"
    );
}
