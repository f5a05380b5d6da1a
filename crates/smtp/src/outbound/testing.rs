//! The scripted server side shared by the outbound tests.

use super::types::{ConnectOptions, Credentials, OutboundEnvelope, Timeouts, TlsMode};
use super::wire::Stream;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

/// The server side of one scripted conversation, plain or TLS.
pub(super) struct Peer {
    pub(super) io: BufReader<Box<dyn Stream>>,
}

impl Peer {
    pub(super) async fn accept(listener: &TcpListener) -> Peer {
        let (stream, _) = listener.accept().await.unwrap();
        Peer {
            io: BufReader::new(Box::new(stream)),
        }
    }

    /// The server half of a TLS handshake (after 220 to STARTTLS, or
    /// at once for implicit TLS).
    pub(super) async fn tls(self, acceptor: &TlsAcceptor) -> std::io::Result<Peer> {
        assert!(self.io.buffer().is_empty(), "client spoke before TLS");
        let stream = acceptor.accept(self.io.into_inner()).await?;
        Ok(Peer {
            io: BufReader::new(Box::new(stream)),
        })
    }

    pub(super) async fn line(&mut self) -> String {
        let mut line = String::new();
        self.io.read_line(&mut line).await.unwrap();
        line
    }

    /// Every line until the client closes (or a read fails); QUIT is
    /// answered.
    pub(super) async fn rest(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.io.read_line(&mut line).await {
                Ok(0) | Err(_) => return lines,
                Ok(_) => {
                    if line == "QUIT\r\n" {
                        let _ = self.io.get_mut().write_all(b"221 bye\r\n").await;
                        let _ = self.io.get_mut().flush().await;
                    }
                    lines.push(line);
                }
            }
        }
    }

    pub(super) async fn expect(&mut self, prefix: &str) -> String {
        let line = self.line().await;
        assert!(
            line.starts_with(prefix),
            "expected {prefix:?}, got {line:?}"
        );
        assert!(line.ends_with("\r\n"), "{line:?}");
        line
    }

    pub(super) async fn send(&mut self, text: &str) {
        let io = self.io.get_mut();
        io.write_all(text.as_bytes()).await.unwrap();
        io.flush().await.unwrap();
    }

    /// Reads the content up to and including the final dot line.
    pub(super) async fn body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let mut line = Vec::new();
            self.io.read_until(b'\n', &mut line).await.unwrap();
            body.extend_from_slice(&line);
            if line == b".\r\n" || line.is_empty() {
                return body;
            }
        }
    }

    pub(super) async fn greet(&mut self, ehlo: &str) {
        self.send("220 up.test ESMTP\r\n").await;
        self.expect("EHLO relay.test").await;
        self.send(ehlo).await;
    }
}

pub(super) const EHLO_PIPELINING: &str = "250-up.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n\
250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-AUTH PLAIN login\r\n250 DSN\r\n";
pub(super) const EHLO_PLAIN: &str = "250-up.test\r\n250 8BITMIME\r\n";

pub(super) fn quick() -> Timeouts {
    let s = Duration::from_secs(5);
    Timeouts {
        connect: s,
        greeting: s,
        ehlo: s,
        mail: s,
        rcpt: s,
        data_init: s,
        data_block: s,
        data_end: s,
    }
}

pub(super) async fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

pub(super) fn envelope(recipients: &[&str]) -> OutboundEnvelope {
    OutboundEnvelope {
        sender: "owner-list@lists.test".into(),
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        body_8bit: true,
        smtputf8: false,
        ..OutboundEnvelope::default()
    }
}

/// Fails instead of hanging when the client does not pipeline.
pub(super) async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    timeout(Duration::from_secs(10), f)
        .await
        .expect("test conversation hung")
}

/// A CA, a leaf certificate for `up.test` signed by it, and a TLS
/// acceptor serving the leaf.
pub(super) struct Pki {
    pub(super) ca_pem: String,
    pub(super) acceptor: TlsAcceptor,
}

pub(super) fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "poolrelay test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, &ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["up.test".to_string()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "up.test");
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf_cert.der().clone(), ca_cert.der().clone()], key)
    .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        acceptor: TlsAcceptor::from(Arc::new(config)),
    }
}

/// A PEM file removed when dropped.
pub(super) struct TempFile(pub(super) PathBuf);

impl TempFile {
    pub(super) fn new(name: &str, contents: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("poolrelay-smtp-{}-{name}.pem", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) fn options(tls: TlsMode) -> ConnectOptions {
    ConnectOptions {
        tls,
        verify: true,
        server_name: "up.test".into(),
        ca_file: None,
        auth: None,
        timeouts: quick(),
    }
}

pub(super) fn credentials(allow_plaintext: bool) -> Credentials {
    Credentials {
        username: "user".into(),
        password: "secret".into(),
        allow_plaintext,
    }
}

pub(super) const EHLO_STARTTLS: &str =
    "250-up.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n";
pub(super) const EHLO_AFTER_TLS: &str =
    "250-up.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n";

/// Server side of one pipelined transaction with one recipient.
pub(super) async fn one_message(p: &mut Peer) -> Vec<u8> {
    p.expect("MAIL FROM:<owner-list@lists.test>").await;
    p.expect("RCPT TO:<a@x.test>").await;
    p.send("250 2.1.0 ok\r\n250 2.1.5 ok\r\n").await;
    p.expect("DATA").await;
    p.send("354 go\r\n").await;
    let body = p.body().await;
    p.send("250 2.0.0 queued\r\n").await;
    body
}
