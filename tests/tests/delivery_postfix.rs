//! A real MTA as the upstream: a throwaway Postfix instance (own config,
//! queue and data directories under a temp dir, smtpd on a loopback port,
//! `relayhost` pointing at our sink). Mail goes relay -> Postfix smtpd ->
//! Postfix queue -> our sink. Fails (does not skip) when Postfix is missing:
//! install Debian package postfix.

use std::collections::BTreeMap;
use std::time::Duration;

use poolrelay_tests::delivery::{attempts_for, head_with_hosts, header_values};
use poolrelay_tests::postfix_upstream::{PostfixOptions, PostfixUpstream};
use poolrelay_tests::scripted::TestPki;
use poolrelay_tests::{Relay, Sink, message, new_tempdir, toml_str, unique_id};

const SENDER: &str = "owner-news@lists.test";
const RCPT: &str = "member@dest.test";
const DELIVERY: Duration = Duration::from_secs(60);

/// The Received field Postfix added (its `by HOST (Postfix)` one).
fn postfix_received(raw: &str, host: &str) -> Option<String> {
    header_values(raw, "Received")
        .into_iter()
        .find(|v| v.contains(&format!("by {host} (Postfix)")))
}

#[test]
fn mail_passes_through_a_real_postfix_upstream_each_message_once() {
    let sink = Sink::start();
    let postfix = PostfixUpstream::start(PostfixOptions::relaying_to(sink.addr()));
    let relay = Relay::start(|s| s.single_upstream(postfix.addr(), ""));
    let mut sent = Vec::new();
    let mut qids = Vec::new();
    for n in 0..20 {
        let id = unique_id("postfix");
        let reply = relay.send(
            SENDER,
            &[RCPT],
            &message(&id, SENDER, RCPT, &format!("through postfix {n}"), "hello"),
        );
        qids.push(reply.queue_id().unwrap_or_default().to_string());
        sent.push(id);
    }
    let arrived = |sink: &Sink| {
        let ids = sink.message_ids();
        sent.iter().filter(|id| ids.contains(id)).count()
    };
    if !poolrelay_tests::poll_until(DELIVERY, Duration::from_millis(100), || {
        arrived(&sink) == 20
    }) {
        panic!(
            "only {} of 20 messages arrived through Postfix within {DELIVERY:?}\n{}\n{}",
            arrived(&sink),
            postfix.logs(),
            relay.logs()
        );
    }
    // Each once: the relay finished every message in one attempt, and
    // Postfix's queue is empty, so nothing more can arrive.
    relay.wait_until("every message logged as sent", DELIVERY, || {
        let log = relay.log_text();
        qids.iter().all(|q| {
            attempts_for(&log, q)
                .iter()
                .any(|a| a.status == "delivered")
        })
    });
    let log = relay.log_text();
    for q in &qids {
        let a = attempts_for(&log, q);
        assert_eq!(a.len(), 1, "{q} took {} attempts", a.len());
        assert_eq!(a[0].upstream, postfix.addr().to_string(), "{}", a[0].line);
    }
    relay.wait_until("Postfix's queue to be empty", DELIVERY, || {
        postfix.queued() == 0
    });
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in sink.messages() {
        let id = m.message_id().unwrap_or_default();
        assert!(
            postfix_received(&m.raw, "upstream.postfix.test").is_some(),
            "<{id}> did not pass through Postfix:\n{}",
            m.raw
        );
        assert_eq!(m.from, SENDER, "envelope sender kept");
        assert_eq!(m.to, vec![RCPT.to_string()], "envelope recipient kept");
        *counts.entry(id).or_default() += 1;
    }
    for id in &sent {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "<{id}> arrived {:?} times",
            counts.get(id)
        );
    }
    assert_eq!(
        counts.len(),
        20,
        "unexpected messages at the sink: {counts:?}"
    );
}

#[test]
fn starttls_to_a_real_postfix_upstream_is_encrypted_and_verified() {
    let sink = Sink::start();
    let pki = TestPki::new(&["mx.test"]);
    let pki_dir = new_tempdir("poolrelay-pki-");
    let files = pki.write_to(pki_dir.path());
    let postfix = PostfixUpstream::start(PostfixOptions {
        tls: Some((files.cert_chain.clone(), files.key.clone())),
        ..PostfixOptions::relaying_to(sink.addr())
    });
    let port = postfix.addr().port();
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n[pool.A]\n\n\
             [[upstream]]\nhost = \"mx.test:{port}\"\ntls = \"required\"\ntls_ca_file = {}\n",
            head_with_hosts(s, &[("mx.test", postfix.addr())]),
            s.listener(""),
            toml_str(&files.ca.to_string_lossy())
        )
    });
    let mut sent = Vec::new();
    for n in 0..3 {
        let id = unique_id("postfix-tls");
        relay.send(
            SENDER,
            &[RCPT],
            &message(
                &id,
                SENDER,
                RCPT,
                &format!("tls through postfix {n}"),
                "hello",
            ),
        );
        sent.push(id);
    }
    for id in &sent {
        let m = sink.wait_for_message_id(id, DELIVERY);
        let received = postfix_received(&m.raw, "upstream.postfix.test").unwrap_or_else(|| {
            panic!(
                "<{id}> has no Received field from Postfix:\n{}\n{}",
                m.raw,
                postfix.logs()
            )
        });
        assert!(
            received.contains("with ESMTPS"),
            "the relay's session to Postfix was not TLS: Received: {received}\n{}",
            postfix.logs()
        );
    }
    assert!(
        postfix
            .log_text()
            .contains("TLS connection established from"),
        "Postfix logged no TLS connection\n{}",
        postfix.logs()
    );
}
