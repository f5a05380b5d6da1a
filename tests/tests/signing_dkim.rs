//! DKIM signing and ARC sealing at acceptance, checked by an independent
//! verifier (Python dkimpy, DNS answered from the test's own records):
//! two pools with two domains' keys (RSA and Ed25519), the envelope
//! domain's key when From: has none (or no signature, as configured), one
//! signature however often a message is retried, and an ARC set that
//! verifies.

use std::time::Duration;

use poolrelay_tests::dkim::{TestKey, Verdict, count_fields, dkimpy, tamper_body, verify};
use poolrelay_tests::scripted::Scripted;
use poolrelay_tests::{
    Relay, Sink, message, metric_sum, new_tempdir, parse_metrics, poolrelay, unique_id,
};

const DELIVERY: Duration = Duration::from_secs(30);
const RCPT: &str = "member@example.test";

/// A message whose From: is `from`, sent with envelope sender `sender`.
fn send(relay: &Relay, sender: &str, from: &str, tag: &str) -> String {
    let id = unique_id(tag);
    let text = format!(
        "List-Id: <list.{tag}>\r\nList-Unsubscribe: <mailto:leave@lists.test>\r\n{}",
        message(&id, from, RCPT, tag, "a posting\n.leading dot line\nend")
    );
    let reply = relay.send(sender, &[RCPT], &text);
    assert_eq!(reply.code, 250, "final dot got {reply}");
    id
}

fn assert_passes(v: &Verdict, domain: &str, algorithm: &str) {
    assert_eq!(
        v.dkim,
        vec![(domain.to_string(), algorithm.to_string(), true)],
        "expected one passing {algorithm} signature of {domain}"
    );
}

#[test]
fn two_pools_with_two_domains_keys_sign_and_an_independent_verifier_passes_them() {
    dkimpy();
    let keys = new_tempdir("poolrelay-dkim-keys-");
    let org = TestKey::rsa(keys.path(), "example.org", "list2026");
    let com = TestKey::ed25519(keys.path(), "example.com", "ed2026");
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n[pool.A]\n[pool.B]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"A\", \"-\"]\n\n\
             [[upstream]]\nhost = \"{}\"\npools = [\"B\"]\n\n\
             [[route]]\npool = \"B\"\nsender = \"owner-com@*\"\n\n{}{}",
            s.head(),
            s.listener(""),
            sink_a.addr(),
            sink_b.addr(),
            org.config("pools = [\"A\"]"),
            com.config("pools = [\"B\"]"),
        )
    });
    let id_a = send(
        &relay,
        "owner-org@lists.example.org",
        "list@lists.example.org",
        "org",
    );
    let id_b = send(&relay, "owner-com@example.com", "list@example.com", "com");
    let at_a = sink_a.wait_for_message_id(&id_a, DELIVERY);
    let at_b = sink_b.wait_for_message_id(&id_b, DELIVERY);

    let v = verify(at_a.raw.as_bytes(), &[&org, &com]);
    assert_passes(&v, "example.org", "rsa-sha256");
    let v = verify(at_b.raw.as_bytes(), &[&org, &com]);
    assert_passes(&v, "example.com", "ed25519-sha256");

    let sig = at_a.header("DKIM-Signature").expect("a DKIM-Signature");
    let signed: Vec<String> = sig
        .split(';')
        .find_map(|t| t.trim().strip_prefix("h="))
        .expect("an h= tag")
        .split(':')
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    assert_eq!(
        signed.iter().filter(|h| *h == "from").count(),
        2,
        "From is oversigned: {sig}"
    );
    for h in [
        "to",
        "subject",
        "date",
        "message-id",
        "list-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
    ] {
        assert!(signed.iter().any(|x| x == h), "h= lacks {h}: {sig}");
    }

    for raw in [&at_a.raw, &at_b.raw] {
        let v = verify(tamper_body(raw).as_bytes(), &[&org, &com]);
        assert_eq!(v.dkim.len(), 1, "{v:?}");
        assert!(!v.dkim[0].2, "a changed body must fail: {v:?}");
    }

    let m = parse_metrics(&relay.scrape());
    for domain in ["example.org", "example.com"] {
        assert_eq!(
            metric_sum(
                &m,
                "poolrelay_signatures_total",
                &[("domain", domain), ("kind", "dkim")]
            ),
            Some(1.0),
            "{domain}"
        );
        assert_eq!(
            metric_sum(
                &m,
                "poolrelay_signing_failures_total",
                &[("domain", domain)]
            ),
            Some(0.0),
            "{domain}"
        );
    }
}

#[test]
fn without_a_key_for_the_from_domain_the_envelope_domain_signs_or_nobody_as_configured() {
    dkimpy();
    let keys = new_tempdir("poolrelay-dkim-keys-");
    let org = TestKey::rsa(keys.path(), "example.org", "s1");
    let net = TestKey::ed25519(keys.path(), "example.net", "s2");
    let sink = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}\n{}{}",
            s.single_upstream(sink.addr(), ""),
            org.config(""),
            net.config("envelope_fallback = false"),
        )
    });
    // From: a domain without a key; envelope sender in example.org.
    let fallback = send(
        &relay,
        "owner-x@lists.example.org",
        "someone@elsewhere.test",
        "fallback",
    );
    // From: without a key; the envelope domain's entry says envelope_fallback = false.
    let unsigned = send(
        &relay,
        "owner-y@example.net",
        "someone@elsewhere.test",
        "unsigned",
    );
    // From: aligned with example.net wins over the envelope domain.
    let aligned = send(&relay, "owner-z@example.org", "list@example.net", "aligned");

    let m = sink.wait_for_message_id(&fallback, DELIVERY);
    assert_passes(
        &verify(m.raw.as_bytes(), &[&org, &net]),
        "example.org",
        "rsa-sha256",
    );
    let m = sink.wait_for_message_id(&unsigned, DELIVERY);
    assert_eq!(count_fields(&m.raw, "DKIM-Signature"), 0, "{}", m.raw);
    let m = sink.wait_for_message_id(&aligned, DELIVERY);
    assert_passes(
        &verify(m.raw.as_bytes(), &[&org, &net]),
        "example.net",
        "ed25519-sha256",
    );
}

#[test]
fn a_retried_message_carries_exactly_the_one_signature_made_at_acceptance() {
    dkimpy();
    let keys = new_tempdir("poolrelay-dkim-keys-");
    let org = TestKey::rsa(keys.path(), "example.org", "s1");
    let upstream = Scripted::start_default();
    upstream.set_data_reply(Some("451 4.3.0 try again"));
    let relay = Relay::start(|s| {
        format!(
            "{}\n{}",
            s.single_upstream(upstream.addr(), ""),
            org.config("")
        )
    });
    send(&relay, "owner-x@example.org", "list@example.org", "retry");
    upstream.wait_for("the first attempt's 451", DELIVERY, |t| {
        t.iter().any(|t| {
            t.data_reply
                .as_deref()
                .is_some_and(|r| r.starts_with("451"))
        })
    });
    // The signature's t= has one-second resolution: a re-signing would show.
    std::thread::sleep(Duration::from_millis(1100));
    upstream.set_data_reply(None);
    let seen = upstream.wait_for_delivered(1, DELIVERY);
    let first = seen
        .iter()
        .find(|t| !t.delivered())
        .expect("the refused attempt");
    let last = seen
        .iter()
        .find(|t| t.delivered())
        .expect("the delivered attempt");
    assert_eq!(
        count_fields(&last.text(), "DKIM-Signature"),
        1,
        "{}",
        last.text()
    );
    assert_eq!(
        first.data, last.data,
        "the retry must send the stored, signed bytes unchanged"
    );
    assert_passes(&verify(&last.data, &[&org]), "example.org", "rsa-sha256");
}

#[test]
fn an_arc_sealed_pool_adds_a_set_that_verifies() {
    dkimpy();
    let keys = new_tempdir("poolrelay-dkim-keys-");
    let org = TestKey::rsa(keys.path(), "example.org", "arc");
    let sink = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\n\n[pool.A]\narc_seal = true\n\n\
             [[upstream]]\nhost = \"{}\"\n\n{}",
            s.head(),
            s.listener(""),
            sink.addr(),
            org.config("pools = [\"A\"]"),
        )
    });
    let id = send(
        &relay,
        "owner-list@example.org",
        "author@example.org",
        "arc",
    );
    let m = sink.wait_for_message_id(&id, DELIVERY);
    for h in [
        "ARC-Seal",
        "ARC-Message-Signature",
        "ARC-Authentication-Results",
        "DKIM-Signature",
    ] {
        assert_eq!(count_fields(&m.raw, h), 1, "{h} in {}", m.raw);
    }
    let aar = m.header("ARC-Authentication-Results").unwrap_or_default();
    assert!(aar.starts_with("i=1; relay.test; auth=none"), "{aar}");
    assert!(aar.contains("smtp.remote-ip="), "{aar}");
    let v = verify(m.raw.as_bytes(), &[&org]);
    assert_passes(&v, "example.org", "rsa-sha256");
    assert_eq!(v.arc, "pass", "ARC chain: {v:?}");
    let v = verify(tamper_body(&m.raw).as_bytes(), &[&org]);
    assert_eq!(v.arc, "fail", "a changed body breaks the seal's AMS: {v:?}");
    let m = parse_metrics(&relay.scrape());
    assert_eq!(
        metric_sum(
            &m,
            "poolrelay_signatures_total",
            &[("domain", "example.org"), ("kind", "arc")]
        ),
        Some(1.0)
    );
}

/// `poolrelay dkim keygen` as an operator runs it: the key it writes signs,
/// and the TXT record it prints verifies the signature.
#[test]
fn keygen_writes_a_key_whose_printed_record_verifies_its_signatures() {
    dkimpy();
    let dir = new_tempdir("poolrelay-dkim-keygen-");
    let mut keys = Vec::new();
    for (domain, algorithm) in [
        ("example.org", "rsa-sha256"),
        ("example.com", "ed25519-sha256"),
    ] {
        let path = dir.path().join(format!("{domain}.pem"));
        let p = path.to_string_lossy().into_owned();
        let args = [
            "dkim",
            "keygen",
            "--domain",
            domain,
            "--selector",
            "gen",
            "--algorithm",
            algorithm,
            "--out",
            &p,
        ];
        let out = poolrelay(&args, Duration::from_secs(60));
        assert!(out.status.success(), "{out}");
        // Zone-file strings of at most 255 bytes each, joined as DNS does.
        let line = out
            .stdout
            .lines()
            .find_map(|l| l.split_once(" IN TXT ").map(|(_, v)| v.to_string()))
            .unwrap_or_else(|| panic!("no TXT record printed: {out}"));
        let strings: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert!(
            !strings.is_empty() && strings.iter().all(|s| s.len() <= 255),
            "TXT strings over 255 bytes: {line}"
        );
        let txt = strings.concat();
        assert!(out.stdout.contains("[[dkim]]"), "{out}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("the key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        // Never over an existing key.
        let again = poolrelay(&args, Duration::from_secs(60));
        assert!(
            !again.status.success() && again.stderr.contains("never overwritten"),
            "{again}"
        );
        keys.push(TestKey {
            domain: domain.to_string(),
            selector: "gen".to_string(),
            path,
            algorithm: if algorithm == "rsa-sha256" {
                "rsa-sha256"
            } else {
                "ed25519-sha256"
            },
            txt,
        });
    }
    let sink = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}\n{}{}",
            s.single_upstream(sink.addr(), ""),
            keys[0].config(""),
            keys[1].config("")
        )
    });
    let org = send(&relay, "owner-a@example.org", "list@example.org", "genorg");
    let com = send(&relay, "owner-b@example.com", "list@example.com", "gencom");
    let m = sink.wait_for_message_id(&org, DELIVERY);
    assert_passes(
        &verify(m.raw.as_bytes(), &[&keys[0], &keys[1]]),
        "example.org",
        "rsa-sha256",
    );
    let m = sink.wait_for_message_id(&com, DELIVERY);
    assert_passes(
        &verify(m.raw.as_bytes(), &[&keys[0], &keys[1]]),
        "example.com",
        "ed25519-sha256",
    );
}

#[test]
fn a_message_that_cannot_be_signed_within_the_memory_budget_goes_out_unsigned_and_counted() {
    dkimpy();
    let keys = new_tempdir("poolrelay-dkim-keys-");
    let org = TestKey::rsa(keys.path(), "example.org", "budget");
    let sink = Sink::start();
    // 1 MB for content in transit: a 600 KB message fits once (the
    // session's charge), not twice more (the signing copy).
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\n\n[pool.A]\n\n\
             [[upstream]]\nhost = \"{}\"\n\n{}",
            s.head()
                .replacen("[server]\n", "[server]\nmax_data_memory = \"1MB\"\n", 1),
            s.listener(""),
            sink.addr(),
            org.config(""),
        )
    });
    let small = send(&relay, "owner-org@example.org", "list@example.org", "small");
    let id = unique_id("big");
    let body = vec!["x".repeat(76); 8_000].join("\n");
    let text = message(&id, "list@example.org", RCPT, "big", &body);
    let reply = relay.send("owner-org@example.org", &[RCPT], &text);
    assert_eq!(reply.code, 250, "final dot got {reply}");
    let at_small = sink.wait_for_message_id(&small, DELIVERY);
    let at_big = sink.wait_for_message_id(&id, DELIVERY);
    assert_passes(
        &verify(at_small.raw.as_bytes(), &[&org]),
        "example.org",
        "rsa-sha256",
    );
    assert_eq!(
        count_fields(&at_big.raw, "DKIM-Signature"),
        0,
        "a message over the signing budget went out signed"
    );
    let failures = metric_sum(
        &parse_metrics(&relay.scrape()),
        "poolrelay_signing_failures_total",
        &[("domain", "example.org"), ("kind", "dkim")],
    );
    assert_eq!(failures, Some(1.0), "{}", relay.logs());
    assert!(
        relay.log_text().contains("max_data_memory is spent"),
        "{}",
        relay.logs()
    );
}
