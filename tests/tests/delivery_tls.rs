//! TLS and AUTH towards upstreams, against the harness's scripted SMTP
//! server: STARTTLS required (never sent in clear), verified against a test
//! CA by host name (`[server] hosts` maps `mx.test` to loopback), not
//! verified with `tls_verify = false`, implicit TLS, opportunistic STARTTLS,
//! AUTH PLAIN/LOGIN with `password_file`, never AUTH in clear unless
//! `auth_plaintext = true`.

use std::fs;
use std::time::Duration;

use poolrelay_tests::delivery::{attempts_for, deferred_and_nothing_sent, head_with_hosts};
use poolrelay_tests::scripted::{AuthRequirement, Scripted, ScriptedOptions, TestPki};
use poolrelay_tests::{Relay, RelaySetup, message, toml_str, unique_id};

const SENDER: &str = "owner-news@lists.test";
const RCPT: &str = "member@dest.test";
const DELIVERY: Duration = Duration::from_secs(20);
const CERT_NAME: &str = "mx.test";
const USER: &str = "relay-user";
const PASSWORD: &str = "c0rrect horse";

/// Sends one message to RCPT; returns (Message-ID, queue id).
fn send(relay: &Relay, tag: &str) -> (String, String) {
    let id = unique_id(tag);
    let reply = relay.send(
        SENDER,
        &[RCPT],
        &message(&id, SENDER, RCPT, tag, "tls test"),
    );
    let qid = reply
        .queue_id()
        .unwrap_or_else(|| panic!("no queue id in {reply}"))
        .to_string();
    (id, qid)
}

/// One upstream `mx.test:PORT` (mapped to the scripted server) serving
/// every pool, with `upstream_extra` key lines.
fn config(s: &RelaySetup, up: &Scripted, upstream_extra: &str) -> String {
    let port = up.addr().port();
    format!(
        "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n[pool.A]\n\n\
         [[upstream]]\nhost = \"{CERT_NAME}:{port}\"\n{upstream_extra}\n",
        head_with_hosts(s, &[(CERT_NAME, up.addr())]),
        s.listener("")
    )
}

/// Writes the CA of `pki` into the relay's directory; returns its path as TOML.
fn ca_file(s: &RelaySetup, pki: &TestPki) -> String {
    let path = s.dir.join("test-ca.pem");
    fs::write(&path, &pki.ca_pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    toml_str(&path.to_string_lossy())
}

/// `auth = { ... }` with the password in a file in the relay's directory.
fn auth_line(s: &RelaySetup, password: &str) -> String {
    let path = s.dir.join("upstream.password");
    fs::write(&path, format!("{password}\n"))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    // Secret files must be private (the config refuses others).
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    format!(
        "auth = {{ username = {}, password_file = {} }}",
        toml_str(USER),
        toml_str(&path.to_string_lossy())
    )
}

fn scripted_with(f: impl FnOnce(&mut ScriptedOptions)) -> Scripted {
    let mut o = ScriptedOptions {
        hostname: CERT_NAME.into(),
        ..ScriptedOptions::default()
    };
    f(&mut o);
    Scripted::start(o)
}

fn auth_requirement(mechanisms: &[&str]) -> AuthRequirement {
    AuthRequirement {
        username: USER.into(),
        password: PASSWORD.into(),
        mechanisms: mechanisms.iter().map(|m| m.to_string()).collect(),
    }
}

/// Waits for a delivered transaction and checks it carried the message.
fn delivered(up: &Scripted, id: &str) -> poolrelay_tests::scripted::Transaction {
    let all = up.wait_for_delivered(1, DELIVERY);
    let t = all
        .into_iter()
        .find(|t| t.delivered())
        .unwrap_or_else(|| unreachable!());
    assert_eq!(
        poolrelay_tests::delivery::message_id_of(&t.data).as_deref(),
        Some(id),
        "{}",
        up.dump()
    );
    t
}

#[test]
fn starttls_required_against_an_upstream_without_starttls_is_deferred_and_nothing_goes_in_clear() {
    let up = scripted_with(|_| {});
    let relay = Relay::start(|s| config(s, &up, "tls = \"required\""));
    let (_, qid) = send(&relay, "notls");
    deferred_and_nothing_sent(&relay, &up, &qid, "tls = required, no STARTTLS offered");
    let a = attempts_for(&relay.log_text(), &qid);
    assert!(
        a[0].reply.to_ascii_lowercase().contains("starttls"),
        "the logged reason should name the missing STARTTLS: {}",
        a[0].line
    );
}

#[test]
fn starttls_required_with_the_test_ca_delivers_encrypted() {
    let pki = TestPki::new(&[CERT_NAME]);
    let up = scripted_with(|o| o.starttls = Some(pki.server_config()));
    let relay = Relay::start(|s| {
        let ca = ca_file(s, &pki);
        config(s, &up, &format!("tls = \"required\"\ntls_ca_file = {ca}"))
    });
    let (id, _) = send(&relay, "tlsca");
    let t = delivered(&up, &id);
    assert!(t.tls, "the transaction was not encrypted: {t}");
    let clear: Vec<String> = up
        .commands()
        .iter()
        .filter(|c| !c.tls)
        .map(|c| c.line.clone())
        .collect();
    assert!(
        clear.iter().all(|l| {
            let l = l.to_ascii_uppercase();
            l.starts_with("EHLO") || l.starts_with("STARTTLS")
        }),
        "only EHLO and STARTTLS may go in clear, saw {clear:?}"
    );
}

#[test]
fn starttls_required_with_tls_verify_false_delivers_encrypted_without_the_ca() {
    let pki = TestPki::new(&[CERT_NAME]);
    let up = scripted_with(|o| o.starttls = Some(pki.server_config()));
    let relay = Relay::start(|s| config(s, &up, "tls = \"required\"\ntls_verify = false"));
    let (id, _) = send(&relay, "noverify");
    let t = delivered(&up, &id);
    assert!(t.tls, "the transaction was not encrypted: {t}");
}

/// The control for the two above: verification is really on by default.
#[test]
fn starttls_required_with_a_certificate_from_an_unknown_ca_is_deferred() {
    let pki = TestPki::new(&[CERT_NAME]);
    let up = scripted_with(|o| o.starttls = Some(pki.server_config()));
    let relay = Relay::start(|s| config(s, &up, "tls = \"required\""));
    let (_, qid) = send(&relay, "unknownca");
    deferred_and_nothing_sent(&relay, &up, &qid, "certificate from an unknown CA");
}

/// The certificate names mx.test; the upstream is reached as another name
/// mapped to the same address: verification must fail on the name.
#[test]
fn starttls_required_with_a_certificate_for_another_name_is_deferred() {
    let pki = TestPki::new(&["other.test"]);
    let up = scripted_with(|o| o.starttls = Some(pki.server_config()));
    let relay = Relay::start(|s| {
        let ca = ca_file(s, &pki);
        config(s, &up, &format!("tls = \"required\"\ntls_ca_file = {ca}"))
    });
    let (_, qid) = send(&relay, "wrongname");
    deferred_and_nothing_sent(&relay, &up, &qid, "certificate for another name");
}

#[test]
fn implicit_tls_delivers_encrypted() {
    let pki = TestPki::new(&[CERT_NAME]);
    let up = scripted_with(|o| o.implicit_tls = Some(pki.server_config()));
    let relay = Relay::start(|s| {
        let ca = ca_file(s, &pki);
        config(s, &up, &format!("tls = \"implicit\"\ntls_ca_file = {ca}"))
    });
    let (id, _) = send(&relay, "implicit");
    let t = delivered(&up, &id);
    assert!(t.tls, "{t}");
    assert!(
        up.commands().iter().all(|c| c.tls),
        "implicit TLS: every command is encrypted\n{}",
        up.dump()
    );
}

#[test]
fn opportunistic_tls_uses_starttls_when_offered() {
    let pki = TestPki::new(&[CERT_NAME]);
    let up = scripted_with(|o| o.starttls = Some(pki.server_config()));
    // Default tls (opportunistic), no CA: encryption without authentication.
    let relay = Relay::start(|s| config(s, &up, ""));
    let (id, _) = send(&relay, "opportunistic");
    let t = delivered(&up, &id);
    assert!(t.tls, "STARTTLS was offered but not used: {t}");
}

#[test]
fn auth_plain_over_starttls_with_the_password_file_delivers() {
    let pki = TestPki::new(&[CERT_NAME]);
    let up = scripted_with(|o| {
        o.starttls = Some(pki.server_config());
        o.auth = Some(auth_requirement(&["PLAIN", "LOGIN"]));
    });
    let relay = Relay::start(|s| {
        let ca = ca_file(s, &pki);
        let auth = auth_line(s, PASSWORD);
        config(
            s,
            &up,
            &format!("tls = \"required\"\ntls_ca_file = {ca}\n{auth}"),
        )
    });
    let (id, _) = send(&relay, "authplain");
    let t = delivered(&up, &id);
    assert!(t.tls, "{t}");
    assert_eq!(t.auth_user.as_deref(), Some(USER), "{t}");
    assert_eq!(t.auth_mechanism.as_deref(), Some("PLAIN"), "{t}");
    assert!(
        up.commands()
            .iter()
            .filter(|c| c.line.to_ascii_uppercase().starts_with("AUTH"))
            .all(|c| c.tls),
        "AUTH went in clear\n{}",
        up.dump()
    );
}

#[test]
fn auth_login_without_tls_when_auth_plaintext_is_allowed() {
    let up = scripted_with(|o| o.auth = Some(auth_requirement(&["LOGIN"])));
    let relay = Relay::start(|s| {
        let auth = auth_line(s, PASSWORD);
        config(
            s,
            &up,
            &format!("tls = \"off\"\nauth_plaintext = true\n{auth}"),
        )
    });
    let (id, _) = send(&relay, "authlogin");
    let t = delivered(&up, &id);
    assert!(!t.tls, "{t}");
    assert_eq!(t.auth_user.as_deref(), Some(USER), "{t}");
    assert_eq!(t.auth_mechanism.as_deref(), Some("LOGIN"), "{t}");
}

/// The man-in-the-middle case: with AUTH and opportunistic TLS the
/// certificate is never checked, so the password could go to whoever
/// answers. Such a config is refused, naming the line of `auth`.
#[test]
fn a_config_with_auth_and_no_verified_tls_is_refused_naming_the_line() {
    let dir = poolrelay_tests::new_tempdir("poolrelay-authcheck-");
    let pw = dir.path().join("pw");
    fs::write(&pw, "secret\n").expect("write the password file");
    fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod the password file");
    let path = dir.path().join("poolrelay.toml");
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:2525\"\n\n[[upstream]]\nhost = \"smart.test:25\"\n\
         auth = {{ username = \"u\", password_file = {} }}\n",
        toml_str(&pw.to_string_lossy())
    );
    fs::write(&path, &text).expect("write the config");
    let config = path.to_string_lossy().to_string();
    let out = poolrelay_tests::poolrelay(&["check", "-c", &config], Duration::from_secs(10));
    assert!(
        !out.status.success(),
        "auth with opportunistic TLS must be refused:\n{out}"
    );
    assert!(
        out.stderr.contains(":6:") && out.stderr.contains("opportunistic"),
        "the error names the auth line and the reason:\n{out}"
    );
    // With STARTTLS required (certificate checked), the same is fine.
    fs::write(
        &path,
        text.replace("auth = ", "tls = \"required\"\nauth = "),
    )
    .expect("rewrite");
    let out = poolrelay_tests::poolrelay(&["check", "-c", &config], Duration::from_secs(10));
    assert!(out.status.success(), "{out}");
}

/// STARTTLS required with the certificate checked: an upstream whose
/// certificate the relay cannot verify (no `tls_ca_file` naming the test CA)
/// never sees AUTH, nor the message.
#[test]
fn auth_is_never_sent_to_an_upstream_whose_certificate_is_not_verified() {
    let pki = TestPki::new(&[CERT_NAME]);
    let up = scripted_with(|o| {
        o.starttls = Some(pki.server_config());
        o.auth = Some(auth_requirement(&["PLAIN", "LOGIN"]));
    });
    let relay = Relay::start(|s| {
        let auth = auth_line(s, PASSWORD);
        config(s, &up, &format!("tls = \"required\"\n{auth}"))
    });
    let (_, qid) = send(&relay, "nomitm");
    deferred_and_nothing_sent(
        &relay,
        &up,
        &qid,
        "AUTH configured, certificate not verifiable",
    );
}

#[test]
fn auth_with_a_wrong_password_is_deferred_not_bounced() {
    let pki = TestPki::new(&[CERT_NAME]);
    let up = scripted_with(|o| {
        o.starttls = Some(pki.server_config());
        o.auth = Some(auth_requirement(&["PLAIN"]));
    });
    let relay = Relay::start(|s| {
        let auth = auth_line(s, "wrong password");
        config(
            s,
            &up,
            &format!("tls = \"required\"\ntls_verify = false\n{auth}"),
        )
    });
    let (_, qid) = send(&relay, "badauth");
    relay.wait_until("a deferred attempt after the failed AUTH", DELIVERY, || {
        attempts_for(&relay.log_text(), &qid)
            .iter()
            .any(|a| a.status == "deferred")
    });
    let a = attempts_for(&relay.log_text(), &qid);
    assert!(
        a.iter().all(|a| a.status == "deferred" && a.bounced == 0),
        "a refused AUTH is our configuration's problem: defer, never bounce:\n{}",
        a.iter()
            .map(|a| a.line.clone())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(up.transactions().is_empty(), "{}", up.dump());
    assert!(
        up.commands()
            .iter()
            .any(|c| c.tls && c.line.to_ascii_uppercase().starts_with("AUTH PLAIN")),
        "the relay did not try AUTH PLAIN over TLS\n{}",
        up.dump()
    );
}

/// Opportunistic TLS promises delivery, not secrecy: when the STARTTLS
/// handshake fails, the relay tries once more in clear (as Postfix does at
/// `may`) instead of leaving the host unreachable for ever.
#[test]
fn a_failed_opportunistic_handshake_is_retried_in_clear() {
    let pki = TestPki::new(&[CERT_NAME]);
    let up = scripted_with(|o| o.starttls = Some(pki.server_config_requiring_client_certs()));
    let relay = Relay::start(|s| config(s, &up, ""));
    let (id, _) = send(&relay, "tlsfallback");
    let t = delivered(&up, &id);
    assert!(!t.tls, "delivered in clear after the failed handshake: {t}");
    assert!(
        up.commands()
            .iter()
            .any(|c| c.line.to_ascii_uppercase().starts_with("STARTTLS")),
        "the relay tried STARTTLS first\n{}",
        up.dump()
    );
    assert!(
        relay.log_count("retrying in clear") >= 1,
        "{}",
        relay.logs()
    );
}
