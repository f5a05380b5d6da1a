//! TLS on listeners: STARTTLS and implicit TLS with real clients (Python's
//! smtplib, openssl s_client, a rustls client), `require_tls`, bytes
//! pipelined behind STARTTLS, a certificate replaced on disk and served
//! after SIGHUP, and the config errors and `check --print` lines.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use poolrelay_tests::delivery::strip_ansi;
use poolrelay_tests::secure_listener::{
    SMTPLIB_PREAMBLE, Secured, TlsSmtp, der_of, python, relay_received, served_certificate,
    smtplib_args,
};
use poolrelay_tests::{Relay, Sink, metric_sum, parse_metrics, run_with_deadline, toml_str};

const DELIVERY: Duration = Duration::from_secs(30);

fn loopback() -> IpAddr {
    "127.0.0.1".parse().expect("ip")
}

/// A relay whose main listener has `tls_cert`/`tls_key` plus `extra`,
/// delivering to `sink`.
fn relay_with_tls(secured: &Secured, sink: &Sink, extra: &str) -> Relay {
    let keys = format!(
        "tls_cert = {}\ntls_key = {}\n{extra}",
        toml_str(&secured.files.cert_chain.to_string_lossy()),
        toml_str(&secured.files.key.to_string_lossy()),
    );
    Relay::start(|s| s.single_upstream(sink.addr(), &keys))
}

#[test]
fn smtplib_starttls_delivers_and_received_names_the_tls() {
    let secured = Secured::new();
    let sink = Sink::start();
    let relay = relay_with_tls(&secured, &sink, "");
    let script = format!(
        "{SMTPLIB_PREAMBLE}
s = connect()
s.ehlo()
print('offers', s.has_extn('starttls'))
print('starttls', code(s.starttls, context=ctx))
print('cipher', s.sock.version())
s.ehlo()
s.sendmail('owner-news@lists.test', ['member@example.test'],
    'Subject: over tls\\r\\nMessage-ID: <tls-1@test>\\r\\n\\r\\nhello\\r\\n')
s.quit()
"
    );
    let out = python(
        &script,
        &smtplib_args(relay.smtp_addr(), &secured.files.ca, "127.0.0.1"),
    );
    assert!(
        out.status.success(),
        "smtplib failed: {out}\n{}",
        relay.logs()
    );
    assert!(out.stdout.contains("offers True"), "{out}");
    assert!(out.stdout.contains("starttls 220"), "{out}");
    assert!(out.stdout.contains("cipher TLSv1.3"), "{out}");
    let message = sink.wait_for_message_id("tls-1@test", DELIVERY);
    let received = relay_received(&message.raw);
    assert!(
        received.contains("(using TLSv1.3 with cipher TLS13_")
            && received.contains(" with ESMTPS for "),
        "Received: {received}"
    );
    let log = strip_ansi(&relay.log_text());
    assert!(log.contains(" tls=TLSv1.3 "), "{}", relay.logs());
    let metrics = parse_metrics(&relay.scrape());
    assert_eq!(
        metric_sum(&metrics, "poolrelay_smtp_tls_sessions_total", &[]),
        Some(1.0)
    );
}

#[test]
fn tls_1_1_is_refused() {
    let secured = Secured::new();
    let sink = Sink::start();
    let relay = relay_with_tls(&secured, &sink, "");
    let mut cmd = Command::new("openssl");
    // SECLEVEL=0 lets openssl offer TLS 1.1: the refusal must be ours.
    cmd.args([
        "s_client",
        "-starttls",
        "smtp",
        "-tls1_1",
        "-cipher",
        "DEFAULT@SECLEVEL=0",
        "-connect",
    ])
    .arg(relay.smtp_addr().to_string());
    let out = run_with_deadline(cmd, "openssl s_client -tls1_1", Duration::from_secs(60));
    assert!(
        !out.stdout.contains("BEGIN CERTIFICATE"),
        "a TLS 1.1 handshake succeeded: {out}"
    );
    assert!(
        out.stderr.contains("SSL alert number"),
        "the relay did not answer TLS 1.1 with an alert: {out}"
    );
    // TLS 1.2 is still fine.
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-starttls", "smtp", "-tls1_2", "-connect"])
        .arg(relay.smtp_addr().to_string());
    let out = run_with_deadline(cmd, "openssl s_client -tls1_2", Duration::from_secs(60));
    assert!(
        out.stdout.contains("BEGIN CERTIFICATE"),
        "TLS 1.2 failed: {out}"
    );
}

#[test]
fn require_tls_refuses_mail_before_starttls() {
    let secured = Secured::new();
    let sink = Sink::start();
    let relay = relay_with_tls(&secured, &sink, "require_tls = true");
    let (mut c, greeting) = TlsSmtp::connect_from(loopback(), relay.smtp_addr());
    assert!(greeting.starts_with("220 "), "{greeting}");
    let ehlo = c.cmd("EHLO client.test");
    assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");
    let mail = c.cmd("MAIL FROM:<a@lists.test>");
    assert!(mail.starts_with("530 5.7.0 "), "{mail}");
    assert!(c.cmd("STARTTLS").starts_with("220 2.0.0"));
    c.handshake(&secured.pki.ca_pem);
    c.cmd("EHLO client.test");
    let mail = c.cmd("MAIL FROM:<a@lists.test>");
    assert!(mail.starts_with("250 "), "{mail}");
}

#[test]
fn commands_pipelined_behind_starttls_are_never_executed() {
    let secured = Secured::new();
    let sink = Sink::start();
    let relay = relay_with_tls(&secured, &sink, "");
    let (mut c, _) = TlsSmtp::connect_from(loopback(), relay.smtp_addr());
    c.cmd("EHLO client.test");
    // What a man in the middle would append to the client's STARTTLS.
    c.write(b"STARTTLS\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\n");
    let reply = c.read_reply();
    assert_eq!(reply, "220 2.0.0 Ready to start TLS\r\n");
    c.handshake(&secured.pki.ca_pem);
    // Had the injected MAIL run inside TLS, its 503 (no EHLO after the
    // reset) would come first; the first reply must be EHLO's.
    let ehlo = c.cmd("EHLO client.test");
    assert!(
        ehlo.starts_with("250-relay.test\r\n"),
        "first reply inside TLS: {ehlo}"
    );
    let rcpt = c.cmd("RCPT TO:<victim@example.test>");
    assert!(rcpt.starts_with("503 5.5.1 need MAIL"), "{rcpt}");
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 relay.test closing\r\n");
    let metrics = parse_metrics(&relay.scrape());
    assert_eq!(
        metric_sum(
            &metrics,
            "poolrelay_smtp_rejections_total",
            &[("reason", "sequence")]
        ),
        Some(1.0),
        "only our own RCPT was refused"
    );
}

#[test]
fn implicit_tls_with_smtp_ssl_and_openssl() {
    let secured = Secured::new();
    let sink = Sink::start();
    let relay = relay_with_tls(&secured, &sink, "tls = \"implicit\"");
    let script = format!(
        "{SMTPLIB_PREAMBLE}
s = smtplib.SMTP_SSL(host, port, context=ctx, source_address=(source, 0), timeout=30)
s.ehlo()
print('offers', s.has_extn('starttls'))
s.sendmail('owner-news@lists.test', ['member@example.test'],
    'Subject: implicit\\r\\nMessage-ID: <implicit-1@test>\\r\\n\\r\\nhello\\r\\n')
s.quit()
"
    );
    let out = python(
        &script,
        &smtplib_args(relay.smtp_addr(), &secured.files.ca, "127.0.0.1"),
    );
    assert!(
        out.status.success(),
        "SMTP_SSL failed: {out}\n{}",
        relay.logs()
    );
    assert!(out.stdout.contains("offers False"), "{out}");
    let message = sink.wait_for_message_id("implicit-1@test", DELIVERY);
    let received = relay_received(&message.raw);
    assert!(
        received.contains(" with ESMTPS for "),
        "Received: {received}"
    );
    // openssl speaks TLS first and gets our certificate and banner.
    let served = served_certificate(relay.smtp_addr(), false);
    assert_eq!(der_of(&served), der_of(&secured.pki.cert_pem));
}

#[test]
fn a_certificate_replaced_on_disk_is_served_after_sighup_to_new_sessions() {
    let secured = Secured::new();
    let sink = Sink::start();
    let mut relay = relay_with_tls(&secured, &sink, "");
    let first = served_certificate(relay.smtp_addr(), true);
    assert_eq!(der_of(&first), der_of(&secured.pki.cert_pem));
    // A session opened before the reload keeps the certificate it started with.
    let (mut old, _) = TlsSmtp::connect_from(loopback(), relay.smtp_addr());
    old.cmd("EHLO client.test");
    let renewed = secured.replace_certificate();
    // Not yet reloaded: still the first one.
    let before = served_certificate(relay.smtp_addr(), true);
    assert_eq!(der_of(&before), der_of(&secured.pki.cert_pem));
    relay.signal_and_wait_for_log("HUP", "SIGHUP: reloaded");
    let after = served_certificate(relay.smtp_addr(), true);
    assert_eq!(
        der_of(&after),
        der_of(&renewed.cert_pem),
        "the new certificate is not served after SIGHUP\n{}",
        relay.logs()
    );
    assert!(old.cmd("STARTTLS").starts_with("220 "));
    let leaf = old.handshake(&secured.pki.ca_pem);
    assert_eq!(leaf, der_of(&secured.pki.cert_pem));
    // `poolrelay reload` (the admin API) does the same.
    let third = secured.replace_certificate();
    let out = poolrelay_tests::poolrelay(
        &["reload", "--admin", &relay.admin_url()],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "poolrelay reload: {out}");
    let served = served_certificate(relay.smtp_addr(), true);
    assert_eq!(der_of(&served), der_of(&third.cert_pem));
}

#[test]
fn a_broken_certificate_on_reload_keeps_the_old_one() {
    let secured = Secured::new();
    let sink = Sink::start();
    let mut relay = relay_with_tls(&secured, &sink, "");
    std::fs::write(&secured.files.cert_chain, "not a certificate\n").expect("write");
    relay.signal_and_wait_for_log("HUP", "reload refused");
    let log = relay.log_text();
    assert!(
        log.contains(&format!("{}:", relay.config_path().display())) && log.contains("tls_cert"),
        "the refusal names neither the config line nor the key\n{}",
        relay.logs()
    );
    let served = served_certificate(relay.smtp_addr(), true);
    assert_eq!(der_of(&served), der_of(&secured.pki.cert_pem));
}

fn check(config: &str) -> poolrelay_tests::CommandOutput {
    let dir = poolrelay_tests::new_tempdir("poolrelay-tls-check-");
    let path = dir.path().join("poolrelay.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = Command::new(poolrelay_tests::binary());
    cmd.arg("check").arg("--print").arg("-c").arg(&path);
    run_with_deadline(cmd, "poolrelay check", Duration::from_secs(30))
}

#[test]
fn missing_or_wrong_files_are_config_errors_with_their_line() {
    let secured = Secured::new();
    let cert = toml_str(&secured.files.cert_chain.to_string_lossy());
    let key = toml_str(&secured.files.key.to_string_lossy());
    let missing = toml_str(&secured.dir().join("nope.pem").to_string_lossy());
    let out = check(&format!(
        "[[listener]]\naddress = \"127.0.0.1:2525\"\ntls_cert = {missing}\ntls_key = {key}\n"
    ));
    assert!(!out.status.success(), "{out}");
    assert!(
        out.stderr.contains("poolrelay.toml:3:") && out.stderr.contains("cannot be read"),
        "{out}"
    );
    let out = check(&format!(
        "[[listener]]\naddress = \"127.0.0.1:2525\"\ntls_cert = {cert}\ntls_key = {missing}\n"
    ));
    assert!(
        out.stderr.contains("poolrelay.toml:4:") && out.stderr.contains("tls_key"),
        "{out}"
    );
    // The CA's certificate with the leaf's key: they do not fit.
    let ca = toml_str(&secured.files.ca.to_string_lossy());
    let out = check(&format!(
        "[[listener]]\naddress = \"127.0.0.1:2525\"\ntls_cert = {ca}\ntls_key = {key}\n"
    ));
    assert!(out.stderr.contains("does not fit"), "{out}");
    let out = check(&format!(
        "[[listener]]\naddress = \"127.0.0.1:2525\"\ntls_cert = {cert}\n"
    ));
    assert!(
        out.stderr.contains("poolrelay.toml:1:") && out.stderr.contains("no tls_key"),
        "{out}"
    );
    let out = check("[[listener]]\naddress = \"127.0.0.1:2525\"\nrequire_tls = true\n");
    assert!(
        out.stderr.contains("poolrelay.toml:3:") && out.stderr.contains("require_tls"),
        "{out}"
    );
    let out = check("[[listener]]\naddress = \"127.0.0.1:2525\"\ntls = \"always\"\n");
    assert!(
        out.stderr.contains("poolrelay.toml:3:") && out.stderr.contains("\"starttls\""),
        "{out}"
    );
}

#[test]
fn check_print_shows_each_listeners_tls_and_auth() {
    let secured = Secured::new();
    let out = check(&format!(
        "[[listener]]\nname = \"plain\"\naddress = \"127.0.0.1:2525\"\n\n\
         [[listener]]\nname = \"submission\"\naddress = \"127.0.0.1:2587\"\n{}\n\
         [[listener]]\nname = \"smtps\"\naddress = \"127.0.0.1:465\"\n{}\n",
        secured.listener_keys("auth = \"optional\"\nrequire_tls = true\n"),
        secured.listener_keys("auth = \"required\"\n"),
    ));
    assert!(out.status.success(), "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    let after = |name: &str| {
        let i = lines
            .iter()
            .position(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no listener {name} in\n{}", out.stdout));
        lines[i + 1].trim().to_string()
    };
    assert_eq!(after("plain"), "tls off  auth off");
    let submission = after("submission");
    assert!(
        submission.starts_with("tls starttls (cert ")
            && submission.contains(", require_tls  auth optional (1 users in ")
            && submission.ends_with("), after TLS only"),
        "{submission}"
    );
    // Port 465 means implicit TLS unless tls says otherwise.
    let smtps = after("smtps");
    assert!(
        smtps.starts_with("tls implicit (cert ") && smtps.contains("auth required (1 users"),
        "{smtps}"
    );
}

#[test]
fn a_large_pipelined_batch_and_a_large_message_inside_tls() {
    let secured = Secured::new();
    let sink = Sink::start();
    let relay = relay_with_tls(&secured, &sink, "");
    let (mut c, _) = TlsSmtp::connect_from(loopback(), relay.smtp_addr());
    c.cmd("EHLO client.test");
    c.cmd("STARTTLS");
    c.handshake(&secured.pki.ca_pem);
    c.cmd("EHLO client.test");
    // About 30 KB of replies for one write: more than the session lets
    // pile up unwritten, so the driver writes, flushes TLS and resumes.
    let mut batch = String::from("MAIL FROM:<owner-big@lists.test>\r\n");
    for n in 0..1000 {
        batch.push_str(&format!("RCPT TO:<member{n}@example.test>\r\n"));
    }
    c.write(batch.as_bytes());
    assert!(c.read_reply().starts_with("250 "));
    for n in 0..1000 {
        let reply = c.read_reply();
        assert!(reply.starts_with("250 "), "RCPT {n}: {reply}");
    }
    assert!(c.cmd("DATA").starts_with("354 "));
    let line = "x".repeat(998);
    let mut content = String::from("Subject: big\r\nMessage-ID: <big-tls@test>\r\n\r\n");
    while content.len() < 3 << 20 {
        content.push_str(&line);
        content.push_str("\r\n");
    }
    content.push_str(".\r\n");
    c.write(content.as_bytes());
    let reply = c.read_reply();
    assert!(reply.starts_with("250 2.0.0 Ok: queued"), "{reply}");
    let message = sink.wait_for_message_id("big-tls@test", DELIVERY);
    assert!(message.raw.len() >= 3 << 20);
}
