//! SMTP AUTH on listeners with real clients: Python's smtplib and swaks
//! from an address outside `relay_from`, AUTH refused before STARTTLS,
//! wrong passwords (535, then 421 for the address), a user's pinned pool,
//! and a throwaway Postfix relaying through us with STARTTLS and SASL.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use poolrelay_tests::delivery::strip_ansi;
use poolrelay_tests::postfix_upstream::{PostfixOptions, PostfixUpstream, RelayhostAuth};
use poolrelay_tests::secure_listener::{
    PASSWORD, SMTPLIB_PREAMBLE, STRANGER, Secured, TlsSmtp, USER, python, relay_received,
    smtplib_args, swaks,
};
use poolrelay_tests::{Relay, Sink, SmtpClient, message, metric_sum, parse_metrics, unique_id};

const DELIVERY: Duration = Duration::from_secs(30);

/// A relay whose main listener does STARTTLS and AUTH (`auth` = "optional"
/// unless `extra` says otherwise) and trusts only 127.0.0.1 without AUTH.
fn relay_with_auth(secured: &Secured, sink: &Sink, extra: &str) -> Relay {
    let keys = secured.listener_keys(&format!(
        "relay_from = [\"127.0.0.1/32\"]\n{}",
        if extra.contains("auth =") {
            extra.to_string()
        } else {
            format!("auth = \"optional\"\n{extra}")
        }
    ));
    Relay::start(|s| s.single_upstream(sink.addr(), &keys))
}

fn metric(relay: &Relay, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&parse_metrics(&relay.scrape()), name, labels).unwrap_or(-1.0)
}

#[test]
fn smtplib_from_a_stranger_relays_only_after_auth() {
    let secured = Secured::new();
    let sink = Sink::start();
    let relay = relay_with_auth(&secured, &sink, "");
    let script = format!(
        "{SMTPLIB_PREAMBLE}
s = connect()
s.ehlo()
print('auth before tls', s.has_extn('auth'))
print('starttls', code(s.starttls, context=ctx))
s.ehlo()
print('auth after tls', s.esmtp_features.get('auth'))
print('mail', code(s.mail, 'owner-news@lists.test'))
print('rcpt before auth', code(s.rcpt, 'member@example.test'))
s.rset()
print('login', code(s.login, sys.argv[5], sys.argv[6]))
s.sendmail('owner-news@lists.test', ['member@example.test'],
    'Subject: authenticated\\r\\nMessage-ID: <auth-1@test>\\r\\n\\r\\nhello\\r\\n')
s.quit()
"
    );
    let mut args = smtplib_args(relay.smtp_addr(), &secured.files.ca, STRANGER);
    args.extend([USER.to_string(), PASSWORD.to_string()]);
    let out = python(&script, &args);
    assert!(
        out.status.success(),
        "smtplib failed: {out}\n{}",
        relay.logs()
    );
    for want in [
        "auth before tls False",
        "starttls 220",
        "auth after tls  PLAIN LOGIN",
        "mail 250",
        "rcpt before auth 554",
        "login 235",
    ] {
        assert!(out.stdout.contains(want), "missing {want:?} in {out}");
    }
    let message = sink.wait_for_message_id("auth-1@test", DELIVERY);
    let received = relay_received(&message.raw);
    assert!(
        received.contains(" with ESMTPSA for ") && received.contains("([127.0.0.2])"),
        "Received: {received}"
    );
    let log = strip_ansi(&relay.log_text());
    let accepted = log
        .lines()
        .find(|l| l.contains("poolrelay::accept"))
        .unwrap_or_else(|| panic!("no accepted line\n{log}"));
    assert!(accepted.contains(&format!(" user={USER} ")), "{accepted}");
    assert!(
        !log.contains(PASSWORD),
        "the password is in the log:\n{log}"
    );
    assert_eq!(
        metric(
            &relay,
            "poolrelay_smtp_auth_total",
            &[("result", "success")]
        ),
        1.0
    );
}

#[test]
fn swaks_tls_auth_plain_relays_and_without_auth_is_refused() {
    let secured = Secured::new();
    let sink = Sink::start();
    let relay = relay_with_auth(&secured, &sink, "");
    let server = relay.smtp_addr().to_string();
    let base = [
        "--server",
        server.as_str(),
        "--local-interface",
        STRANGER,
        "--from",
        "owner-news@lists.test",
        "--to",
        "member@example.test",
        "--tls",
    ];
    let refused = swaks(&base);
    assert!(!refused.status.success(), "{refused}");
    assert!(refused.stdout.contains("<~* 554 5.7.1"), "{refused}");
    let id = unique_id("swaks");
    let header = format!("Message-Id: <{id}>");
    let mut args = base.to_vec();
    args.extend([
        "--auth",
        "PLAIN",
        "--auth-user",
        USER,
        "--auth-password",
        PASSWORD,
        "--header",
        header.as_str(),
    ]);
    let out = swaks(&args);
    assert!(
        out.status.success(),
        "swaks failed: {out}\n{}",
        relay.logs()
    );
    assert!(out.stdout.contains("<~  235 2.7.0"), "{out}");
    let message = sink.wait_for_message_id(&id, DELIVERY);
    assert!(relay_received(&message.raw).contains(" with ESMTPSA "));
    // LOGIN works as well.
    let mut args = base.to_vec();
    args.extend([
        "--auth",
        "LOGIN",
        "--auth-user",
        USER,
        "--auth-password",
        PASSWORD,
    ]);
    let out = swaks(&args);
    assert!(out.status.success(), "swaks AUTH LOGIN failed: {out}");
}

#[test]
fn auth_before_starttls_is_refused_and_not_offered() {
    let secured = Secured::new();
    let sink = Sink::start();
    let relay = relay_with_auth(&secured, &sink, "");
    let stranger: IpAddr = STRANGER.parse().expect("ip");
    let (mut c, _) = TlsSmtp::connect_from(stranger, relay.smtp_addr());
    let ehlo = c.cmd("EHLO client.test");
    assert!(
        ehlo.contains("250-STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    // "\0listserv\0c0rrect horse": right credentials, in the clear.
    let plain = c.cmd("AUTH PLAIN AGxpc3RzZXJ2AGMwcnJlY3QgaG9yc2U=");
    assert!(plain.starts_with("538 5.7.11 "), "{plain}");
    let login = c.cmd("AUTH LOGIN");
    assert!(login.starts_with("538 5.7.11 "), "{login}");
    let mail = c.cmd("MAIL FROM:<owner-news@lists.test>");
    assert!(mail.starts_with("250 "), "{mail}");
    let rcpt = c.cmd("RCPT TO:<member@example.test>");
    assert!(rcpt.starts_with("554 5.7.1 "), "{rcpt}");
    assert_eq!(
        metric(&relay, "poolrelay_smtp_auth_total", &[]),
        0.0,
        "no credentials may be checked before TLS"
    );
    // The same with auth = "required": MAIL itself is refused.
    let relay = relay_with_auth(&secured, &sink, "auth = \"required\"");
    let (mut c, _) = TlsSmtp::connect_from(stranger, relay.smtp_addr());
    c.cmd("EHLO client.test");
    let mail = c.cmd("MAIL FROM:<owner-news@lists.test>");
    assert!(mail.starts_with("530 5.7.0 "), "{mail}");
}

#[test]
fn wrong_passwords_get_535_with_a_delay_then_421_for_the_address() {
    let secured = Secured::new();
    let sink = Sink::start();
    let relay = relay_with_auth(&secured, &sink, "");
    // Raw AUTH PLAIN, so each attempt is exactly one failure.
    let script = format!(
        "{SMTPLIB_PREAMBLE}
import time
user, password = sys.argv[5], sys.argv[6]
s = connect()
s.ehlo(); s.starttls(context=ctx); s.ehlo()
for i in range(5):
    t = time.monotonic()
    c = code(s.docmd, 'AUTH', 'PLAIN ' + b64('\\0' + user + '\\0wrong' + str(i)))
    print('attempt', i + 1, c, round(time.monotonic() - t, 2))
    if c == 421:
        break
s.close()
# A new session from the same address: even the right password is refused.
s = connect()
s.ehlo(); s.starttls(context=ctx); s.ehlo()
print('blocked', code(s.docmd, 'AUTH', 'PLAIN ' + b64('\\0' + user + '\\0' + password)))
s.close()
# Another address is not affected.
s = smtplib.SMTP(host, port, source_address=('127.0.0.3', 0), timeout=30)
s.ehlo(); s.starttls(context=ctx); s.ehlo()
print('other address', code(s.docmd, 'AUTH', 'PLAIN ' + b64('\\0' + user + '\\0' + password)))
s.quit()
"
    );
    let mut args = smtplib_args(relay.smtp_addr(), &secured.files.ca, STRANGER);
    args.extend([USER.to_string(), PASSWORD.to_string()]);
    // Meanwhile another client's session is served without waiting.
    let started = Instant::now();
    let handle = std::thread::spawn(move || python(&script, &args));
    // The second failure is counted just before its delay; three more
    // delays follow, so the other session starts while one runs.
    poolrelay_tests::wait::wait_until(
        "the second AUTH failure in the metrics",
        Duration::from_secs(20),
        || {
            metric(
                &relay,
                "poolrelay_smtp_auth_total",
                &[("result", "failure")],
            ) >= 2.0
        },
    );
    let mut other = SmtpClient::connect(relay.smtp_addr()).expect("connect");
    let noop_started = Instant::now();
    let ehlo = other.ehlo();
    assert_eq!(ehlo.code, 250);
    assert!(
        noop_started.elapsed() < Duration::from_millis(500),
        "another session waited {:?} while AUTH failures were delayed",
        noop_started.elapsed()
    );
    let out = handle.join().expect("python thread");
    assert!(
        out.status.success(),
        "smtplib failed: {out}\n{}",
        relay.logs()
    );
    let attempts = attempts(&out.stdout);
    let codes: Vec<u32> = attempts.iter().map(|a| a.0).collect();
    assert_eq!(codes, vec![535, 535, 535, 535, 421], "{out}");
    // The delay grows: 0.25 s, 0.5 s, 1 s, 2 s.
    assert!(attempts[0].1 >= 0.2 && attempts[3].1 >= 1.9, "{out}");
    assert!(attempts[3].1 > attempts[1].1, "{out}");
    assert!(out.stdout.contains("blocked 421"), "{out}");
    assert!(out.stdout.contains("other address 235"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(
        metric(
            &relay,
            "poolrelay_smtp_auth_total",
            &[("result", "failure")]
        ),
        5.0
    );
    assert_eq!(
        metric(
            &relay,
            "poolrelay_smtp_auth_total",
            &[("result", "blocked")]
        ),
        1.0
    );
    let log = relay.log_text();
    assert!(!log.contains("wrong") && !log.contains(PASSWORD), "{log}");
}

#[test]
fn auths_the_session_refuses_itself_are_counted_delayed_and_limited() {
    let secured = Secured::new();
    let sink = Sink::start();
    let relay = relay_with_auth(&secured, &sink, "");
    // Malformed PLAIN, acting for another identity, a user name too long
    // or with a control character: no password is checked, but each costs
    // what a wrong password costs.
    let script = format!(
        "{SMTPLIB_PREAMBLE}
import time
user, password = sys.argv[5], sys.argv[6]
bad = ['PLAIN ' + b64('no nuls'), 'PLAIN ' + b64('root\\0' + user + '\\0x'),
       'PLAIN ' + b64('\\0' + 'u' * 256 + '\\0x'), 'PLAIN ' + b64('\\0b\\x01b\\0x'),
       'PLAIN ' + b64('no nuls')]
s = connect()
s.ehlo(); s.starttls(context=ctx); s.ehlo()
for i, r in enumerate(bad):
    t = time.monotonic()
    c = code(s.docmd, 'AUTH', r)
    print('attempt', i + 1, c, round(time.monotonic() - t, 2))
    if c == 421:
        break
s.close()
s = connect()
s.ehlo(); s.starttls(context=ctx); s.ehlo()
print('blocked', code(s.docmd, 'AUTH', 'PLAIN ' + b64('\\0' + user + '\\0' + password)))
s.close()
"
    );
    let mut args = smtplib_args(relay.smtp_addr(), &secured.files.ca, STRANGER);
    args.extend([USER.to_string(), PASSWORD.to_string()]);
    let out = python(&script, &args);
    assert!(
        out.status.success(),
        "smtplib failed: {out}\n{}",
        relay.logs()
    );
    let attempts = attempts(&out.stdout);
    let codes: Vec<u32> = attempts.iter().map(|a| a.0).collect();
    assert_eq!(codes, vec![501, 535, 535, 535, 421], "{out}");
    // Delayed like wrong passwords: 0.25 s, 0.5 s, 1 s, 2 s.
    assert!(attempts[0].1 >= 0.2 && attempts[3].1 >= 1.9, "{out}");
    assert!(out.stdout.contains("blocked 421"), "{out}");
    assert_eq!(
        metric(
            &relay,
            "poolrelay_smtp_auth_total",
            &[("result", "failure")]
        ),
        5.0
    );
}

#[test]
fn a_users_pool_and_user_routes_classify_authenticated_mail() {
    let secured = Secured::new();
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let keys = secured.listener_keys("relay_from = [\"127.0.0.1/32\"]\nauth = \"optional\"\n");
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nretry = [\"1s\"]\n\n[pool.A]\n[pool.B]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"A\", \"-\"]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"B\"]\n\n\
             [user.{USER}]\npool = \"B\"\n",
            s.head(),
            s.listener(&keys),
            sink_a.addr(),
            sink_b.addr()
        )
    });
    let script = format!(
        "{SMTPLIB_PREAMBLE}
s = connect()
s.ehlo(); s.starttls(context=ctx); s.ehlo()
s.login(sys.argv[5], sys.argv[6])
s.sendmail('joe@lists.test', ['member@example.test'],
    'Subject: pinned\\r\\nMessage-ID: <pinned-1@test>\\r\\n\\r\\nhello\\r\\n')
s.quit()
"
    );
    let mut args = smtplib_args(relay.smtp_addr(), &secured.files.ca, STRANGER);
    args.extend([USER.to_string(), PASSWORD.to_string()]);
    let out = python(&script, &args);
    assert!(out.status.success(), "{out}\n{}", relay.logs());
    sink_b.wait_for_message_id("pinned-1@test", DELIVERY);
    // Unauthenticated mail from the trusted address takes the default pool.
    let id = unique_id("trusted");
    let reply = relay.send(
        "joe@lists.test",
        &["member@example.test"],
        &message(
            &id,
            "joe@lists.test",
            "member@example.test",
            "trusted",
            "hi",
        ),
    );
    assert_eq!(reply.code, 250, "{reply}");
    sink_a.wait_for_message_id(&id, DELIVERY);
    let log = strip_ansi(&relay.log_text());
    assert!(log.contains("classified_by=\"user\""), "{log}");
}

#[test]
fn a_throwaway_postfix_relays_through_us_with_starttls_and_sasl() {
    let secured = Secured::new();
    let sink = Sink::start();
    // No address may relay without AUTH: Postfix connects from loopback.
    let keys = secured.listener_keys(
        "relay_from = [\"192.0.2.1/32\"]\nauth = \"required\"\nrequire_tls = true\n",
    );
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), &keys));
    let postfix = PostfixUpstream::start(PostfixOptions {
        relayhost_auth: Some(RelayhostAuth {
            username: USER.into(),
            password: PASSWORD.into(),
        }),
        hostname: "listserv.postfix.test".into(),
        ..PostfixOptions::relaying_to(relay.smtp_addr())
    });
    let id = unique_id("postfix-client");
    let mut c = SmtpClient::connect(postfix.addr()).expect("connect to postfix");
    let reply = c
        .send_mail(
            "owner-news@lists.test",
            &["member@example.test"],
            &message(
                &id,
                "owner-news@lists.test",
                "member@example.test",
                "via postfix",
                "hi",
            ),
        )
        .unwrap_or_else(|e| panic!("postfix refused the message: {e}\n{}", postfix.logs()));
    assert_eq!(reply.code, 250, "{reply}");
    if !poolrelay_tests::poll_until(DELIVERY, Duration::from_millis(100), || {
        sink.message_ids().contains(&id)
    }) {
        panic!(
            "the message did not come through Postfix and the relay\n{}\n{}",
            postfix.logs(),
            relay.logs()
        );
    }
    let message = sink.wait_for_message_id(&id, DELIVERY);
    let received = relay_received(&message.raw);
    assert!(
        received.starts_with("Received: from listserv.postfix.test")
            && received.contains("(using TLSv1.3 with cipher ")
            && received.contains(" with ESMTPSA "),
        "Received: {received}"
    );
    let log = postfix.log_text();
    assert!(
        log.contains("TLS connection established to"),
        "Postfix did not use TLS:\n{}",
        postfix.logs()
    );
    assert_eq!(
        metric(
            &relay,
            "poolrelay_smtp_auth_total",
            &[("result", "success")]
        ),
        1.0
    );
}

#[test]
fn passwd_prints_an_argon2id_line_and_refuses_bad_input() {
    use poolrelay_tests::run_with_input;
    use std::process::Command;
    let run = |user: &str, input: &str| {
        let mut cmd = Command::new(poolrelay_tests::binary());
        cmd.arg("passwd").arg(user);
        run_with_input(cmd, input.as_bytes(), "poolrelay passwd", DELIVERY)
    };
    let out = run("alice", "open sesame\n");
    assert!(out.status.success(), "{out}");
    let line = out.stdout.trim();
    let hash = line
        .strip_prefix("alice:")
        .unwrap_or_else(|| panic!("{line}"));
    assert!(hash.starts_with("$argon2id$v=19$"), "{line}");
    // A fresh salt every time.
    assert_ne!(run("alice", "open sesame\n").stdout.trim(), line);
    for (user, input, why) in [
        ("al:ice", "pw\n", "colon"),
        ("al ice", "pw\n", "space"),
        ("alice", "\n", "empty"),
        (&"u".repeat(256), "pw\n", "user name too long for AUTH"),
        (
            "alice",
            &format!("{}\n", "p".repeat(1025)),
            "password too long for AUTH",
        ),
    ] {
        let out = run(user, input);
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "{why}: {out}"
        );
        assert!(out.stderr.starts_with("poolrelay passwd: "), "{why}: {out}");
    }
}

/// The `attempt N CODE SECONDS` lines a script printed: (code, seconds).
fn attempts(stdout: &str) -> Vec<(u32, f64)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("attempt "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1].parse().expect("code"), f[2].parse().expect("seconds"))
        })
        .collect()
}
