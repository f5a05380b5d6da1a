//! Hostile or limited upstreams, against the harness's scripted SMTP server:
//! huge replies stay bounded in what the relay stores, logs and bounces;
//! mail an upstream cannot take (SMTPUTF8 without SMTPUTF8) bounces with
//! 5.6.7 instead of being sent broken.

use std::time::Duration;

use poolrelay_tests::delivery::{field, parse_dsn};
use poolrelay_tests::scripted::{Scripted, ScriptedOptions};
use poolrelay_tests::{Relay, message, unique_id};

const DELIVERY: Duration = Duration::from_secs(20);
const SENDER: &str = "owner-news@lists.test";

/// Waits for the DSN to SENDER at the scripted upstream (the relay sends
/// pool `-` through the same upstream) and returns it.
fn dsn_at(up: &Scripted) -> String {
    let all = up.wait_for("a DSN to the sender", DELIVERY, |ts| {
        ts.iter().any(|t| t.mail_from.is_empty() && t.delivered())
    });
    let t = all
        .into_iter()
        .find(|t| t.mail_from.is_empty() && t.delivered())
        .unwrap_or_else(|| unreachable!());
    String::from_utf8_lossy(&t.data).into_owned()
}

#[test]
fn a_huge_upstream_reply_is_kept_to_512_bytes_in_the_log_and_the_dsn() {
    let up = Scripted::start_default();
    let huge = format!("550 5.1.1 {}", "x".repeat(500_000));
    let rcpts: Vec<String> = (0..5).map(|i| format!("gone{i}@dest.test")).collect();
    for r in &rcpts {
        up.set_rcpt_reply(r, &huge);
    }
    let relay = Relay::start(|s| s.single_upstream(up.addr(), ""));
    let id = unique_id("huge-reply");
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    relay.send(
        SENDER,
        &refs,
        &message(&id, SENDER, refs[0], "huge", "body"),
    );
    let dsn = dsn_at(&up);
    assert!(
        dsn.len() < 20_000,
        "a DSN for 5 recipients with 500 KB replies is {} bytes",
        dsn.len()
    );
    let parsed = parse_dsn(&dsn).unwrap_or_else(|e| panic!("{e}\n{dsn}"));
    let r = parsed
        .recipient(&rcpts[0])
        .unwrap_or_else(|| panic!("no group for {}\n{dsn}", rcpts[0]));
    assert_eq!(field(r, "Status"), Some("5.1.1"));
    assert!(dsn.split("\r\n").all(|l| l.len() <= 998), "a line over 998");
    let longest = relay.log_text().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4_000, "a log line of {longest} bytes");
}

#[test]
fn smtputf8_mail_to_an_upstream_without_smtputf8_bounces_with_5_6_7() {
    let up = Scripted::start_default();
    let relay = Relay::start(|s| s.single_upstream(up.addr(), ""));
    let id = unique_id("utf8");
    let mut c = relay.client();
    c.ehlo();
    let r = c.cmd(&format!("MAIL FROM:<{SENDER}> SMTPUTF8"));
    assert!(r.is_positive(), "{r}");
    let r = c.cmd("RCPT TO:<m\u{fc}ller@dest.test>");
    assert!(r.is_positive(), "{r}");
    let r = c.cmd("DATA");
    assert_eq!(r.code, 354, "{r}");
    c.write_bytes(&poolrelay_tests::data_bytes(&message(
        &id,
        SENDER,
        "m\u{fc}ller@dest.test",
        "utf8",
        "gr\u{fc}\u{df}e",
    )))
    .expect("write the message");
    let r = c.read_reply().expect("reply to the dot");
    assert!(r.is_positive(), "{r}");
    c.quit();
    let dsn = dsn_at(&up);
    let parsed = parse_dsn(&dsn).unwrap_or_else(|e| panic!("{e}\n{dsn}"));
    let status: Vec<&str> = parsed
        .recipients
        .iter()
        .filter_map(|g| field(g, "Status"))
        .collect();
    assert_eq!(status, vec!["5.6.7"], "{dsn}");
    assert!(
        up.transactions().iter().all(|t| t.mail_from.is_empty()),
        "the SMTPUTF8 message itself must not be sent: {}",
        up.dump()
    );
}

/// RET=FULL asks for the whole message back, but a DSN larger than the
/// upstream's SIZE would be refused and the bounce lost: it goes with the
/// original's headers only.
#[test]
fn a_ret_full_dsn_larger_than_the_upstream_size_goes_with_headers_only() {
    let up = Scripted::start(ScriptedOptions {
        size: 60_000,
        ..ScriptedOptions::default()
    });
    up.set_rcpt_reply("gone@dest.test", "550 5.1.1 no such user");
    let relay = Relay::start(|s| s.single_upstream(up.addr(), ""));
    let id = unique_id("retfull");
    let body = "0123456789abcdef".repeat(8_000);
    let mut c = relay.client();
    c.ehlo();
    assert!(
        c.cmd(&format!("MAIL FROM:<{SENDER}> RET=FULL"))
            .is_positive()
    );
    assert!(c.cmd("RCPT TO:<ok@dest.test>").is_positive());
    assert!(c.cmd("RCPT TO:<gone@dest.test>").is_positive());
    assert_eq!(c.cmd("DATA").code, 354);
    c.write_bytes(&poolrelay_tests::data_bytes(&message(
        &id,
        SENDER,
        "ok@dest.test",
        "big",
        &body,
    )))
    .expect("write the message");
    assert!(c.read_reply().expect("reply").is_positive());
    c.quit();
    let dsn = dsn_at(&up);
    assert!(dsn.len() < 60_000, "the DSN is {} bytes", dsn.len());
    assert!(dsn.contains("text/rfc822-headers"), "{dsn}");
    assert!(dsn.contains(&id), "the original's headers are returned");
    let parsed = parse_dsn(&dsn).unwrap_or_else(|e| panic!("{e}\n{dsn}"));
    let r = parsed
        .recipient("gone@dest.test")
        .expect("the bounced recipient");
    assert_eq!(field(r, "Status"), Some("5.1.1"));
}
