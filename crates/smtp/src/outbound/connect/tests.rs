//! Session opening against a scripted upstream: greeting, EHLO/HELO,
//! STARTTLS and implicit TLS with and without verification, AUTH.

use super::super::testing::*;
use super::*;
use std::path::PathBuf;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

#[tokio::test]
async fn greeting_421_is_an_error() {
    let (listener, addr) = listener().await;
    tokio::spawn(async move {
        let mut p = Peer::accept(&listener).await;
        p.send("421 4.3.2 up.test busy\r\n").await;
        let _ = p.line().await;
    });
    let err = bounded(Client::connect(addr, "relay.test", quick()))
        .await
        .err()
        .unwrap();
    match err {
        ClientError::Rejected { stage, reply } => {
            assert_eq!(stage, stage::GREETING);
            assert_eq!(reply.code, 421);
            assert_eq!(reply.enhanced.as_deref(), Some("4.3.2"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn greeting_timeout() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf).await;
    });
    let t = Timeouts {
        greeting: Duration::from_millis(100),
        ..quick()
    };
    let err = bounded(Client::connect(addr, "relay.test", t))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            ClientError::Timeout {
                stage: stage::GREETING
            }
        ),
        "{err:?}"
    );
    server.abort();
}

#[tokio::test]
async fn connect_refused() {
    let (listener, addr) = listener().await;
    drop(listener);
    let err = bounded(Client::connect(addr, "relay.test", quick()))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
}

#[tokio::test]
async fn ehlo_refused_falls_back_to_helo() {
    let (listener, addr) = listener().await;
    tokio::spawn(async move {
        let mut p = Peer::accept(&listener).await;
        p.send("220 old.test\r\n").await;
        p.expect("EHLO relay.test").await;
        p.send("502 what\r\n").await;
        p.expect("HELO relay.test\r\n").await;
        p.send("250 old.test\r\n").await;
        let _ = p.line().await;
    });
    let client = bounded(Client::connect(addr, "relay.test", quick()))
        .await
        .unwrap();
    assert!(!client.capabilities().esmtp);
    assert!(!client.pipelining());
}

#[tokio::test]
async fn starttls_required_but_not_offered_sends_nothing() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&listener).await;
        p.greet(EHLO_PIPELINING).await;
        p.rest().await
    });
    let err = bounded(Client::connect_with(
        addr,
        "relay.test",
        &options(TlsMode::Required),
    ))
    .await
    .err()
    .unwrap();
    assert!(
        matches!(&err, ClientError::Tls(m) if m.contains("STARTTLS")),
        "{err:?}"
    );
    let rest = server.await.unwrap();
    assert!(rest.iter().all(|l| l == "QUIT\r\n"), "{rest:?}");
}

#[tokio::test]
async fn starttls_without_verification_delivers_encrypted() {
    let (listener, addr) = listener().await;
    let pki = pki();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&listener).await;
        p.greet(EHLO_STARTTLS).await;
        p.expect("STARTTLS\r\n").await;
        p.send("220 2.0.0 ready\r\n").await;
        let mut p = p.tls(&pki.acceptor).await.unwrap();
        p.expect("EHLO relay.test\r\n").await;
        p.send(EHLO_AFTER_TLS).await;
        let body = one_message(&mut p).await;
        p.expect("QUIT").await;
        p.send("221 bye\r\n").await;
        body
    });
    let opts = ConnectOptions {
        verify: false,
        server_name: "not-the-cert-name.test".into(),
        ..options(TlsMode::Required)
    };
    let mut client = bounded(Client::connect_with(addr, "relay.test", &opts))
        .await
        .unwrap();
    assert!(client.is_tls());
    // The capabilities are those of the EHLO after STARTTLS.
    assert!(client.pipelining() && !client.capabilities().starttls);
    assert_eq!(client.capabilities().auth, ["LOGIN", "PLAIN"]);
    let report = bounded(client.send(&envelope(&["a@x.test"]), b"secret\r\n"))
        .await
        .unwrap();
    assert_eq!(report.outcome(0).unwrap().code, 250);
    bounded(client.quit()).await;
    assert_eq!(server.await.unwrap(), b"secret\r\n.\r\n");
}

#[tokio::test]
async fn starttls_verified_with_ca_file_then_auth() {
    let (listener, addr) = listener().await;
    let pki = pki();
    let ca = TempFile::new("ca-ok", &pki.ca_pem);
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&listener).await;
        p.greet(EHLO_STARTTLS).await;
        p.expect("STARTTLS\r\n").await;
        p.send("220 2.0.0 ready\r\n").await;
        let mut p = p.tls(&pki.acceptor).await.unwrap();
        p.expect("EHLO relay.test\r\n").await;
        p.send(EHLO_AFTER_TLS).await;
        let auth = p.line().await;
        p.send("235 2.7.0 ok\r\n").await;
        p.expect("QUIT").await;
        p.send("221 bye\r\n").await;
        auth
    });
    let opts = ConnectOptions {
        ca_file: Some(ca.0.clone()),
        // The password may go: the session is encrypted.
        auth: Some(credentials(false)),
        ..options(TlsMode::Required)
    };
    let client = bounded(Client::connect_with(addr, "relay.test", &opts))
        .await
        .unwrap();
    assert!(client.is_tls());
    bounded(client.quit()).await;
    assert_eq!(server.await.unwrap(), "AUTH PLAIN AHVzZXIAc2VjcmV0\r\n");
}

/// Serves one TLS handshake after STARTTLS; what the client then sends.
async fn starttls_server(listener: TcpListener, pki: Pki) -> Option<Vec<String>> {
    let mut p = Peer::accept(&listener).await;
    p.greet(EHLO_STARTTLS).await;
    p.expect("STARTTLS\r\n").await;
    p.send("220 2.0.0 ready\r\n").await;
    let mut p = p.tls(&pki.acceptor).await.ok()?;
    Some(p.rest().await)
}

#[tokio::test]
async fn verification_fails_without_the_ca() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(starttls_server(listener, pki()));
    let err = bounded(Client::connect_with(
        addr,
        "relay.test",
        &options(TlsMode::Required),
    ))
    .await
    .err()
    .unwrap();
    assert!(
        matches!(&err, ClientError::Tls(m) if m.contains("certificate")),
        "{err:?}"
    );
    assert_eq!(server.await.unwrap(), None);
}

#[tokio::test]
async fn verification_fails_for_another_name() {
    let (listener, addr) = listener().await;
    let pki = pki();
    let ca = TempFile::new("ca-name", &pki.ca_pem);
    let server = tokio::spawn(starttls_server(listener, pki));
    let opts = ConnectOptions {
        ca_file: Some(ca.0.clone()),
        server_name: "other.test".into(),
        ..options(TlsMode::Required)
    };
    let err = bounded(Client::connect_with(addr, "relay.test", &opts))
        .await
        .err()
        .unwrap();
    assert!(matches!(&err, ClientError::Tls(_)), "{err:?}");
    assert_eq!(server.await.unwrap(), None);
}

#[tokio::test]
async fn bad_ca_file_fails_before_connecting() {
    let (listener, addr) = listener().await;
    drop(listener);
    let not_pem = TempFile::new("not-pem", "hello\n");
    for path in [not_pem.0.clone(), PathBuf::from("/nonexistent/ca.pem")] {
        let opts = ConnectOptions {
            ca_file: Some(path),
            ..options(TlsMode::Implicit)
        };
        let err = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ClientError::Tls(m) if m.contains("ca_file")),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn opportunistic_goes_on_in_clear_when_refused_and_skips_verification() {
    let (listener, addr) = listener().await;
    let pki = pki();
    let server = tokio::spawn(async move {
        // 1: STARTTLS refused -> same session, in clear.
        let mut p = Peer::accept(&listener).await;
        p.greet(EHLO_STARTTLS).await;
        p.expect("STARTTLS\r\n").await;
        p.send("454 4.7.0 TLS not available\r\n").await;
        let body = one_message(&mut p).await;
        // 2: offered -> encrypted, the unknown CA notwithstanding.
        let mut p = Peer::accept(&listener).await;
        p.greet(EHLO_STARTTLS).await;
        p.expect("STARTTLS\r\n").await;
        p.send("220 2.0.0 ready\r\n").await;
        let mut p = p.tls(&pki.acceptor).await.unwrap();
        p.expect("EHLO relay.test\r\n").await;
        p.send(EHLO_AFTER_TLS).await;
        p.rest().await;
        body
    });
    let opts = options(TlsMode::Opportunistic);
    let mut client = bounded(Client::connect_with(addr, "relay.test", &opts))
        .await
        .unwrap();
    assert!(!client.is_tls());
    let report = bounded(client.send(&envelope(&["a@x.test"]), b"m\r\n"))
        .await
        .unwrap();
    assert_eq!(report.outcome(0).unwrap().code, 250);
    drop(client);
    let client = bounded(Client::connect_with(addr, "relay.test", &opts))
        .await
        .unwrap();
    assert!(client.is_tls());
    bounded(client.quit()).await;
    assert_eq!(server.await.unwrap(), b"m\r\n.\r\n");
}

#[tokio::test]
async fn off_never_starts_tls() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&listener).await;
        p.greet(EHLO_STARTTLS).await;
        p.rest().await
    });
    let client = bounded(Client::connect_with(
        addr,
        "relay.test",
        &options(TlsMode::Off),
    ))
    .await
    .unwrap();
    assert!(!client.is_tls() && client.capabilities().starttls);
    bounded(client.quit()).await;
    assert_eq!(server.await.unwrap(), ["QUIT\r\n"]);
}

#[tokio::test]
async fn data_after_starttls_220_is_refused() {
    let (listener, addr) = listener().await;
    tokio::spawn(async move {
        let mut p = Peer::accept(&listener).await;
        p.greet(EHLO_STARTTLS).await;
        p.expect("STARTTLS\r\n").await;
        p.send("220 2.0.0 ready\r\n250 injected\r\n").await;
        p.rest().await;
    });
    let opts = ConnectOptions {
        verify: false,
        ..options(TlsMode::Required)
    };
    let err = bounded(Client::connect_with(addr, "relay.test", &opts))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, ClientError::Tls(m) if m.contains("after its 220")),
        "{err:?}"
    );
}

#[tokio::test]
async fn implicit_tls_from_the_first_byte() {
    let (listener, addr) = listener().await;
    let pki = pki();
    let ca = TempFile::new("ca-implicit", &pki.ca_pem);
    let server = tokio::spawn(async move {
        let p = Peer::accept(&listener).await;
        let mut p = p.tls(&pki.acceptor).await.unwrap();
        p.greet(EHLO_AFTER_TLS).await;
        let body = one_message(&mut p).await;
        p.expect("QUIT").await;
        p.send("221 bye\r\n").await;
        body
    });
    let opts = ConnectOptions {
        ca_file: Some(ca.0.clone()),
        ..options(TlsMode::Implicit)
    };
    let mut client = bounded(Client::connect_with(addr, "relay.test", &opts))
        .await
        .unwrap();
    assert!(client.is_tls());
    assert_eq!(client.greeting().code, 220);
    let report = bounded(client.send(&envelope(&["a@x.test"]), b"465\r\n"))
        .await
        .unwrap();
    assert_eq!(report.outcome(0).unwrap().code, 250);
    bounded(client.quit()).await;
    assert_eq!(server.await.unwrap(), b"465\r\n.\r\n");
}

#[tokio::test]
async fn auth_plain_on_the_wire() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&listener).await;
        p.greet("250-up.test\r\n250 AUTH LOGIN PLAIN\r\n").await;
        let auth = p.line().await;
        p.send("235 2.7.0 Authentication successful\r\n").await;
        let rest = p.rest().await;
        (auth, rest)
    });
    let opts = ConnectOptions {
        auth: Some(credentials(true)),
        ..options(TlsMode::Off)
    };
    let client = bounded(Client::connect_with(addr, "relay.test", &opts))
        .await
        .unwrap();
    bounded(client.quit()).await;
    let (auth, rest) = server.await.unwrap();
    assert_eq!(auth, "AUTH PLAIN AHVzZXIAc2VjcmV0\r\n");
    assert_eq!(rest, ["QUIT\r\n"]);
}

#[tokio::test]
async fn auth_login_on_the_wire() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&listener).await;
        p.greet("250-up.test\r\n250 AUTH=LOGIN\r\n").await;
        let mut lines = vec![p.line().await];
        p.send("334 VXNlcm5hbWU6\r\n").await;
        lines.push(p.line().await);
        p.send("334 UGFzc3dvcmQ6\r\n").await;
        lines.push(p.line().await);
        p.send("235 2.7.0 ok\r\n").await;
        lines
    });
    let opts = ConnectOptions {
        auth: Some(credentials(true)),
        ..options(TlsMode::Opportunistic)
    };
    let client = bounded(Client::connect_with(addr, "relay.test", &opts))
        .await
        .unwrap();
    assert!(!client.is_tls());
    assert_eq!(
        server.await.unwrap(),
        ["AUTH LOGIN\r\n", "dXNlcg==\r\n", "c2VjcmV0\r\n"]
    );
}

#[tokio::test]
async fn auth_failure_is_an_auth_error() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&listener).await;
        p.greet("250-up.test\r\n250 AUTH PLAIN\r\n").await;
        p.expect("AUTH PLAIN ").await;
        p.send("535 5.7.8 Authentication credentials invalid\r\n")
            .await;
        p.expect("QUIT").await;
        p.send("221 bye\r\n").await;
    });
    let opts = ConnectOptions {
        auth: Some(credentials(true)),
        ..options(TlsMode::Off)
    };
    let err = bounded(Client::connect_with(addr, "relay.test", &opts))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, ClientError::Auth(m) if m.starts_with("535 5.7.8")),
        "{err:?}"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn auth_refused_in_clear_and_without_offer() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        for ehlo in [EHLO_PIPELINING, EHLO_PLAIN] {
            let mut p = Peer::accept(&listener).await;
            p.greet(ehlo).await;
            seen.push(p.rest().await);
        }
        seen
    });
    // 1: AUTH offered, no TLS, plaintext not allowed.
    let opts = ConnectOptions {
        auth: Some(credentials(false)),
        ..options(TlsMode::Opportunistic)
    };
    let err = bounded(Client::connect_with(addr, "relay.test", &opts))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, ClientError::Auth(m) if m.starts_with("refusing to send the password in clear")),
        "{err:?}"
    );
    // 2: plaintext allowed, but no AUTH offered.
    let opts = ConnectOptions {
        auth: Some(credentials(true)),
        ..options(TlsMode::Opportunistic)
    };
    let err = bounded(Client::connect_with(addr, "relay.test", &opts))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, ClientError::Auth(m) if m == "upstream offers no AUTH"),
        "{err:?}"
    );
    // The password never went out: only QUIT followed EHLO.
    assert_eq!(server.await.unwrap(), [["QUIT\r\n"], ["QUIT\r\n"]]);
}
