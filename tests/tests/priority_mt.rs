//! MT-PRIORITY (RFC 6710, RFC 6758) end to end: a listener with
//! `mt_priority` advertises it, checks the value, lowers an untrusted
//! client's raise to 0; the value picks the pool through a route's
//! `mt_priority` matcher, orders mail within its pool, and reaches the
//! upstream as `MT-PRIORITY=N` when it offers the extension, else as an
//! `MT-Priority: N` header field replacing the message's own.
//!
//! Clients are Python's smtplib (an independent implementation of the
//! parameter) and the suite's own SMTP client for raw command lines.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use poolrelay_tests::admin::{api_json, api_post, json_of, queue_ok, queued_in};
use poolrelay_tests::scripted::{Scripted, ScriptedOptions, Transaction};
use poolrelay_tests::{
    Relay, Reply, SmtpClient, data_bytes, header_value, message, poolrelay, run_with_input,
    unique_id,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const FROM: &str = "alerts@example.org";

/// A scripted upstream; `offers` says whether its EHLO offers MT-PRIORITY.
fn upstream(offers: bool) -> Scripted {
    Scripted::start(ScriptedOptions {
        extensions: if offers {
            vec!["MT-PRIORITY MIXER".into()]
        } else {
            Vec::new()
        },
        ..ScriptedOptions::default()
    })
}

/// Sends one message through Python's smtplib with `mail_options` on MAIL
/// FROM; returns its Message-ID. Panics unless the relay queued it.
fn python_send(addr: SocketAddr, rcpt: &str, mail_options: &[&str], extra_header: &str) -> String {
    let found = Command::new("python3").arg("--version").output();
    if !found.is_ok_and(|o| o.status.success()) {
        panic!("python3 is missing: install it (apt-get install python3) to send with smtplib");
    }
    let id = unique_id("mtp");
    let text = format!(
        "{extra_header}{}",
        message(&id, FROM, rcpt, "priority", "body line\n.leading dot\n")
    );
    const PY: &str = r#"
import smtplib, sys
host, port, rcpt, sender = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
opts = [o for o in sys.argv[5:]]
msg = sys.stdin.buffer.read()
with smtplib.SMTP(host, port, timeout=20) as s:
    s.ehlo("python.test")
    if not s.has_extn("mt-priority"):
        sys.exit("the relay does not offer MT-PRIORITY: " + repr(s.esmtp_features))
    s.sendmail(sender, [rcpt], msg, mail_options=opts)
print("sent")
"#;
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(PY)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(rcpt)
        .arg(FROM)
        .args(mail_options);
    let out = run_with_input(cmd, text.as_bytes(), "python3 smtplib", WAIT);
    assert!(
        out.status.success() && out.stdout.contains("sent"),
        "smtplib could not send with {mail_options:?}:\n{out}"
    );
    id
}

/// One transaction with raw MAIL parameters; the reply to MAIL when it is
/// refused, else the reply to the final dot.
fn send_raw(addr: SocketAddr, rcpt: &str, params: &str, id: &str) -> Reply {
    let mut c = SmtpClient::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.ehlo();
    let r = c.cmd(&format!("MAIL FROM:<{FROM}> {params}"));
    if !r.is_positive() {
        c.quit();
        return r;
    }
    assert_eq!(c.cmd(&format!("RCPT TO:<{rcpt}>")).code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    let text = message(id, FROM, rcpt, id, "hello\n");
    c.write_bytes(&data_bytes(&text)).unwrap();
    let r = c.read_reply().unwrap();
    c.quit();
    r
}

/// The transaction at `up` carrying Message-ID `id`.
fn arrived(up: &Scripted, id: &str) -> Transaction {
    let ts = up.wait_for(&format!("message <{id}>"), WAIT, |ts| {
        ts.iter().any(|t| t.delivered() && t.text().contains(id))
    });
    ts.into_iter()
        .find(|t| t.delivered() && t.text().contains(id))
        .unwrap_or_else(|| unreachable!())
}

/// Every `MT-Priority:` field value of a message's header section.
fn mt_priority_fields(t: &Transaction) -> Vec<String> {
    let text = t.text();
    let header = text.split("\r\n\r\n").next().unwrap_or_default();
    header
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("MT-Priority"))
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

#[test]
fn ehlo_advertises_it_and_bad_values_are_refused() {
    let up = upstream(false);
    let mut plain = None;
    let relay = Relay::start(|s| {
        let addr = s.extra_listener();
        plain = Some(addr);
        format!(
            "{}{}{}[[upstream]]\nhost = \"{}\"\n",
            s.head(),
            s.listener("mt_priority = \"stanag4406\""),
            s.listener_at(addr, "name = \"plain\""),
            up.addr()
        )
    });
    let plain = plain.unwrap_or_else(|| unreachable!());

    let mut c = SmtpClient::connect(relay.smtp_addr()).unwrap();
    let ehlo = c.ehlo();
    assert!(
        ehlo.text.lines().any(|l| l == "MT-PRIORITY STANAG4406"),
        "EHLO: {ehlo}"
    );
    for params in [
        "MT-PRIORITY=12",
        "MT-PRIORITY=-10",
        "MT-PRIORITY=high",
        "MT-PRIORITY=",
        "MT-PRIORITY=3 MT-PRIORITY=3",
    ] {
        let r = c.cmd(&format!("MAIL FROM:<{FROM}> {params}"));
        assert_eq!(
            (r.code, r.enhanced()),
            (501, Some("5.5.4")),
            "{params}: {r}"
        );
    }
    let r = c.cmd(&format!("MAIL FROM:<{FROM}> MT-PRIORITY=-9"));
    assert_eq!(r.code, 250, "{r}");
    c.quit();

    // A listener without it neither offers nor takes it, like any
    // parameter it does not know.
    let mut c = SmtpClient::connect(plain).unwrap();
    let ehlo = c.ehlo();
    assert!(!ehlo.text.contains("MT-PRIORITY"), "EHLO: {ehlo}");
    for params in ["MT-PRIORITY=6", "FOO=1"] {
        let r = c.cmd(&format!("MAIL FROM:<{FROM}> {params}"));
        assert_eq!(
            (r.code, r.enhanced()),
            (555, Some("5.5.4")),
            "{params}: {r}"
        );
    }
    c.quit();
    assert!(
        up.transactions().is_empty(),
        "nothing was queued: {}",
        up.dump()
    );

    // `check --print` shows the listener's settings.
    let path = relay.config_path().to_string_lossy().into_owned();
    let out = poolrelay(&["check", "-c", &path, "--print"], WAIT);
    assert!(out.status.success(), "{out}");
    assert!(
        out.stdout
            .contains("    mt_priority stanag4406  trusted above 0: 127.0.0.0/8, ::1/128\n"),
        "{out}"
    );
    assert_eq!(out.stdout.matches("mt_priority").count(), 1, "{out}");
}

#[test]
fn priority_routes_and_reaches_upstreams_as_parameter_or_header() {
    let offers = upstream(true);
    let plain = upstream(false);
    let rest = upstream(true);
    let mut untrusted = None;
    let relay = Relay::start(|s| {
        let addr = s.extra_listener();
        untrusted = Some(addr);
        format!(
            "{}{}{}[pool.B]\n[pool.C]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"B\"]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"C\"]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"-\"]\n\n\
             [[route]]\npool = \"B\"\nmt_priority = \">= 5\"\nrecipient = \"*@ext.test\"\n\n\
             [[route]]\npool = \"C\"\nmt_priority = \"5..9\"\nrecipient = \"*@plain.test\"\n",
            s.head(),
            s.listener("mt_priority = \"mixer\""),
            // Loopback may relay here but is not trusted with a raise.
            s.listener_at(
                addr,
                "name = \"untrusted\"\nmt_priority = \"mixer\"\nmt_priority_trusted = [\"192.0.2.1\"]"
            ),
            offers.addr(),
            plain.addr(),
            rest.addr()
        )
    });
    let untrusted = untrusted.unwrap_or_else(|| unreachable!());
    let trusted = relay.smtp_addr();

    // Trusted 6 to an upstream that offers the extension: the parameter,
    // and the client's own (forged) field removed, so no reader downstream
    // honours a 9 the relay never granted.
    let id = python_send(
        trusted,
        "x@ext.test",
        &["MT-PRIORITY=6"],
        "MT-Priority: 9\r\n",
    );
    let t = arrived(&offers, &id);
    assert!(t.mail_params.contains("MT-PRIORITY=6"), "{t}");
    assert!(
        mt_priority_fields(&t).is_empty(),
        "no MT-Priority field may pass: {}",
        t.text()
    );

    // Trusted 6 to one that does not: the header, the old one gone, the
    // body (a dot-stuffed line included) as sent.
    let id = python_send(
        trusted,
        "y@plain.test",
        &["MT-PRIORITY=+6"],
        "MT-Priority: 2\r\nmt-priority:\r\n 3\r\n",
    );
    let t = arrived(&plain, &id);
    assert!(!t.mail_params.contains("MT-PRIORITY"), "{t}");
    assert_eq!(mt_priority_fields(&t), ["6"], "{}", t.text());
    assert!(
        t.text().ends_with("\r\n\r\nbody line\r\n.leading dot\r\n"),
        "{}",
        t.text()
    );
    assert_eq!(
        header_value(&t.text(), "Message-ID"),
        Some(format!("<{id}>"))
    );

    // 4 is below the matcher's 5: the default pool, the value passed on.
    let id = python_send(trusted, "x@ext.test", &["MT-PRIORITY=4"], "");
    assert!(arrived(&rest, &id).mail_params.contains("MT-PRIORITY=4"));

    // No MT-PRIORITY: matches as 0, relayed without one.
    let id = unique_id("none");
    assert_eq!(send_raw(trusted, "x@ext.test", "", &id).code, 250);
    let t = arrived(&rest, &id);
    assert!(!t.mail_params.contains("MT-PRIORITY"), "{t}");
    // Nor does a field of the client's own pass without one.
    let id = python_send(trusted, "x@ext.test", &[], "MT-Priority: 9\r\n");
    let t = arrived(&rest, &id);
    assert!(!t.mail_params.contains("MT-PRIORITY"), "{t}");
    assert!(mt_priority_fields(&t).is_empty(), "{}", t.text());

    // Untrusted: 6 becomes 0 (so no route for >= 5 takes it), and its
    // field claiming 9 is gone; lowering is always allowed.
    let id = python_send(
        untrusted,
        "x@ext.test",
        &["MT-PRIORITY=6"],
        "MT-Priority: 9\r\n",
    );
    let t = arrived(&rest, &id);
    assert!(t.mail_params.contains("MT-PRIORITY=0"), "{t}");
    assert!(mt_priority_fields(&t).is_empty(), "{}", t.text());
    let id = python_send(untrusted, "x@ext.test", &["MT-PRIORITY=-3"], "");
    assert!(arrived(&rest, &id).mail_params.contains("MT-PRIORITY=-3"));

    assert_eq!(offers.transactions().len(), 1, "{}", offers.dump());
    assert_eq!(plain.transactions().len(), 1, "{}", plain.dump());
}

#[test]
fn within_a_pool_higher_priority_goes_first_and_the_queue_shows_it() {
    let up = upstream(true);
    let relay = Relay::start(|s| {
        format!(
            "{}{}[[upstream]]\nhost = \"{}\"\nworkers = 1\n",
            s.head(),
            s.listener("mt_priority = \"nsep\""),
            up.addr()
        )
    });
    api_post(&relay, "/api/v1/pools/-/hold");
    // Queued low first, so the order at the upstream is the relay's doing.
    let sends: [(&str, &str); 5] = [
        ("low", "MT-PRIORITY=-2"),
        ("none", ""),
        ("zero", "MT-PRIORITY=0"),
        ("high", "MT-PRIORITY=7"),
        ("mid", "MT-PRIORITY=3"),
    ];
    let mut ids = Vec::new();
    for (tag, params) in sends {
        let id = unique_id(tag);
        let r = send_raw(relay.smtp_addr(), "x@dest.test", params, &id);
        assert_eq!(r.code, 250, "{tag}: {r}");
        ids.push((tag, id, r.queue_id().unwrap_or_default().to_string()));
    }
    relay.wait_until("5 messages queued", WAIT, || queued_in(&relay, "-") == 5);

    // The queue views give each message's MT-PRIORITY beside its pool's.
    let listed = json_of(&queue_ok(&relay, &["list", "--json"]), "queue list --json");
    let mt_of = |queue_id: &str| -> Value {
        listed
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["id"] == queue_id)
            .map(|m| m["mt_priority"].clone())
            .unwrap_or_else(|| panic!("{queue_id} not listed: {listed:#}"))
    };
    assert_eq!(mt_of(&ids[3].2), 7, "{listed:#}");
    assert_eq!(mt_of(&ids[0].2), -2, "{listed:#}");
    assert_eq!(mt_of(&ids[1].2), Value::Null, "{listed:#}");
    let table = queue_ok(&relay, &["list"]).stdout;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let col = header
        .iter()
        .position(|h| *h == "MTP")
        .unwrap_or_else(|| panic!("no MTP column in queue list:\n{table}"))
        - 1; // "QUEUE ID" is two words in the heading
    let row = |queue_id: &str| -> Vec<String> {
        table
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .find(|f| f.first().map(String::as_str) == Some(queue_id))
            .unwrap_or_else(|| panic!("no row for {queue_id}:\n{table}"))
    };
    assert_eq!(row(&ids[3].2)[col], "7", "{table}");
    assert_eq!(row(&ids[1].2)[col], "-", "{table}");
    let shown = api_json(&relay, &format!("/api/v1/messages/{}", ids[4].2));
    assert_eq!(
        (shown["mt_priority"].clone(), shown["priority"].clone()),
        (3.into(), 0.into()),
        "{shown:#}"
    );
    assert_eq!(shown["envelope"]["mt_priority"], 3, "{shown:#}");

    api_post(&relay, "/api/v1/pools/-/release");
    let ts = up.wait_for_delivered(5, WAIT);
    let order: Vec<&str> = ts
        .iter()
        .filter(|t| t.delivered())
        .filter_map(|t| ids.iter().find(|(_, id, _)| t.text().contains(id.as_str())))
        .map(|(tag, _, _)| *tag)
        .collect();
    // Highest first; equal priorities (none counts as 0) oldest first.
    assert_eq!(
        order,
        ["high", "mid", "none", "zero", "low"],
        "{}",
        up.dump()
    );
}
