//! `mx = true` with `tls = "required"`: the relay asks the name servers of
//! `[server] dns_servers` (the harness's name server, `src/dns.rs`) for the
//! domain's MX host, connects to it and verifies the certificate against
//! the MX host's name (`mx.example.test`), not the domain's
//! (`example.test`). No `[server] hosts` entry: the names are resolved by DNS.

use std::fs;
use std::time::Duration;

use poolrelay_tests::delivery::{deferred_and_nothing_sent, message_id_of};
use poolrelay_tests::dns::{DnsServer, MxZone, Query};
use poolrelay_tests::scripted::{Scripted, ScriptedOptions, TestPki};
use poolrelay_tests::{Relay, RelaySetup, message, toml_str, unique_id};

const SENDER: &str = "owner-news@lists.test";
const RCPT: &str = "member@example.test";
const DOMAIN: &str = "example.test";
const MX_HOST: &str = "mx.example.test";
const DELIVERY: Duration = Duration::from_secs(20);

/// A scripted upstream offering STARTTLS with `pki`'s certificate, and a
/// name server saying `example.test` has the MX host `mx.example.test` at
/// the upstream's address.
fn upstream_behind_mx(pki: &TestPki) -> (Scripted, DnsServer) {
    let up = Scripted::start(ScriptedOptions {
        hostname: MX_HOST.into(),
        starttls: Some(pki.server_config()),
        ..ScriptedOptions::default()
    });
    let dns = DnsServer::start(MxZone {
        domain: DOMAIN.into(),
        mx_host: MX_HOST.into(),
        ip: up.addr().ip(),
    });
    (up, dns)
}

/// One upstream `example.test:PORT` with `mx = true`, `tls = "required"`
/// and the test CA, resolved through `dns` only.
fn config(s: &RelaySetup, up: &Scripted, dns: &DnsServer, pki: &TestPki) -> String {
    let ca = s.dir.join("test-ca.pem");
    fs::write(&ca, &pki.ca_pem).unwrap_or_else(|e| panic!("write {}: {e}", ca.display()));
    let head = s.head().replacen(
        "[server]\n",
        &format!("[server]\ndns_servers = [\"{}\"]\n", dns.addr()),
        1,
    );
    format!(
        "{head}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n[pool.A]\n\n\
         [[upstream]]\nhost = \"{DOMAIN}:{}\"\nmx = true\ntls = \"required\"\ntls_ca_file = {}\n",
        s.listener(""),
        up.addr().port(),
        toml_str(&ca.to_string_lossy())
    )
}

/// Sends one message to RCPT; returns (Message-ID, queue id).
fn send(relay: &Relay, tag: &str) -> (String, String) {
    let id = unique_id(tag);
    let reply = relay.send(SENDER, &[RCPT], &message(&id, SENDER, RCPT, tag, "mx test"));
    let qid = reply
        .queue_id()
        .unwrap_or_else(|| panic!("no queue id in {reply}"))
        .to_string();
    (id, qid)
}

fn asked_for_the_mx(dns: &DnsServer) {
    let q = dns.queries();
    assert!(
        q.contains(&Query {
            name: DOMAIN.into(),
            kind: "MX".into()
        }),
        "the relay never asked for the MX of {DOMAIN}: {q:?}"
    );
}

#[test]
fn mx_upstream_with_tls_required_verifies_the_certificate_against_the_mx_host_name() {
    let pki = TestPki::new(&[MX_HOST]);
    let (up, dns) = upstream_behind_mx(&pki);
    let relay = Relay::start(|s| config(s, &up, &dns, &pki));
    let (id, _) = send(&relay, "mxname");
    let all = up.wait_for_delivered(1, DELIVERY);
    let t = all
        .into_iter()
        .find(|t| t.delivered())
        .unwrap_or_else(|| unreachable!());
    assert_eq!(
        message_id_of(&t.data).as_deref(),
        Some(id.as_str()),
        "{}",
        up.dump()
    );
    assert!(t.tls, "the transaction was not encrypted: {t}");
    asked_for_the_mx(&dns);
}

/// The control: a certificate valid for the domain only does not do for
/// its MX host; the attempt is deferred before anything is sent.
#[test]
fn mx_upstream_with_a_certificate_for_the_domain_only_is_deferred_and_nothing_is_sent() {
    let pki = TestPki::new(&[DOMAIN]);
    let (up, dns) = upstream_behind_mx(&pki);
    let relay = Relay::start(|s| config(s, &up, &dns, &pki));
    let (_, qid) = send(&relay, "domainname");
    deferred_and_nothing_sent(
        &relay,
        &up,
        &qid,
        "a certificate for the domain, not for the MX host",
    );
    // It got as far as the MX host (so DNS worked) and failed on TLS.
    asked_for_the_mx(&dns);
}
