//! A relay listener with TLS and AUTH, and the real clients that talk to
//! it: a test CA and certificate for the listener's address
//! ([`crate::scripted::TestPki`]), a `users_file` written by
//! `poolrelay passwd`, Python's smtplib, swaks, `openssl s_client`, and a
//! small blocking STARTTLS client (rustls) for what the others cannot do,
//! such as pipelining bytes behind STARTTLS.

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tempfile::TempDir;

use crate::command::{CommandOutput, run_with_deadline, run_with_input};
use crate::ports::process_ip;
use crate::process::{binary, new_tempdir};
use crate::relay::toml_str;
use crate::scripted::{PkiFiles, TestPki};

/// The user every secured listener knows.
pub const USER: &str = "listserv";
/// Its password (a space on purpose: it must survive PLAIN and LOGIN).
pub const PASSWORD: &str = "c0rrect horse";
/// A client address outside the default `relay_from` these tests use
/// (`127.0.0.1/32`): it relays only after AUTH.
pub const STRANGER: &str = "127.0.0.2";

/// How long one client command (python, swaks, openssl) may run.
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);

/// Certificate, key and users file for a TLS + AUTH listener.
pub struct Secured {
    /// The test CA and certificate.
    pub pki: TestPki,
    /// Where they were written.
    pub files: PkiFiles,
    /// The users file (`USER:argon2id`).
    pub users_file: PathBuf,
    dir: TempDir,
}

impl Secured {
    /// A CA and a certificate for `relay.test` and this process's loopback
    /// address, and a users file with [`USER`].
    pub fn new() -> Secured {
        let dir = new_tempdir("poolrelay-tls-");
        let ip = process_ip().to_string();
        let pki = TestPki::new(&["relay.test", &ip]);
        let files = pki.write_to(dir.path());
        let users_file = dir.path().join("users");
        fs::write(&users_file, format!("{}\n", passwd_line(USER, PASSWORD)))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", users_file.display()));
        Secured {
            pki,
            files,
            users_file,
            dir,
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Listener key lines: `tls_cert`, `tls_key`, `users_file`, then `extra`.
    pub fn listener_keys(&self, extra: &str) -> String {
        format!(
            "tls_cert = {}\ntls_key = {}\nusers_file = {}\n{extra}",
            toml_str(&self.files.cert_chain.to_string_lossy()),
            toml_str(&self.files.key.to_string_lossy()),
            toml_str(&self.users_file.to_string_lossy()),
        )
    }

    /// Writes a new certificate (a new CA too) over the old files; returns it.
    pub fn replace_certificate(&self) -> TestPki {
        let ip = process_ip().to_string();
        let pki = TestPki::new(&["relay.test", &ip]);
        pki.write_to(self.dir.path());
        pki
    }
}

impl Default for Secured {
    fn default() -> Self {
        Secured::new()
    }
}

/// `poolrelay passwd USER` with `password` on stdin: the users_file line.
pub fn passwd_line(user: &str, password: &str) -> String {
    let mut cmd = Command::new(binary());
    cmd.arg("passwd").arg(user);
    let out = run_with_input(
        cmd,
        format!("{password}\n").as_bytes(),
        "poolrelay passwd",
        CLIENT_DEADLINE,
    );
    assert!(out.status.success(), "poolrelay passwd failed: {out}");
    let line = out.stdout.trim().to_string();
    assert!(
        line.starts_with(&format!("{user}:$argon2id$")),
        "poolrelay passwd printed {line:?}"
    );
    line
}

fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
        .unwrap_or(false);
    if !found {
        panic!("{program} is not installed: install the Debian package {package} (see .ci/run)");
    }
}

/// Runs a Python 3 script with `args` (sys.argv[1:]).
pub fn python(script: &str, args: &[String]) -> CommandOutput {
    require("python3", "python3");
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(script).args(args);
    run_with_deadline(cmd, "python3 smtplib client", CLIENT_DEADLINE)
}

/// Runs swaks with `args`; fails the test when swaks or its TLS module is missing.
pub fn swaks(args: &[&str]) -> CommandOutput {
    require("swaks", "swaks");
    let mut support = Command::new("swaks");
    support.arg("--support");
    let out = run_with_deadline(support, "swaks --support", CLIENT_DEADLINE);
    if !format!("{}{}", out.stdout, out.stderr).contains("=== TLS supported") {
        panic!(
            "swaks cannot do TLS: install the Debian package libnet-ssleay-perl (see .ci/run)\n{out}"
        );
    }
    let mut cmd = Command::new("swaks");
    cmd.args(args);
    run_with_deadline(cmd, "swaks", CLIENT_DEADLINE)
}

/// The certificate (PEM, leaf) that `openssl s_client` is served at
/// `addr`, over STARTTLS or implicit TLS.
pub fn served_certificate(addr: SocketAddr, starttls: bool) -> String {
    require("openssl", "openssl");
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-servername")
        .arg("relay.test");
    if starttls {
        cmd.arg("-starttls").arg("smtp");
    }
    let out = run_with_input(cmd, b"QUIT\r\n", "openssl s_client", CLIENT_DEADLINE);
    let begin = out.stdout.find("-----BEGIN CERTIFICATE-----");
    let end = out.stdout.find("-----END CERTIFICATE-----");
    match (begin, end) {
        (Some(b), Some(e)) => out.stdout[b..e + "-----END CERTIFICATE-----".len()].to_string(),
        _ => panic!("openssl s_client showed no certificate from {addr}: {out}"),
    }
}

/// The DER of the first certificate in `pem`.
pub fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap_or_else(|e| panic!("not a PEM certificate: {e}\n{pem}"))
        .to_vec()
}

/// A blocking SMTP client that can switch to TLS after STARTTLS.
pub struct TlsSmtp {
    stream: Stream,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl TlsSmtp {
    /// Connects from `local` (port chosen by the kernel) to `addr` and
    /// reads the greeting.
    pub fn connect_from(local: IpAddr, addr: SocketAddr) -> (TlsSmtp, String) {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .unwrap_or_else(|e| panic!("socket: {e}"));
        socket
            .bind(&SocketAddr::new(local, 0).into())
            .unwrap_or_else(|e| panic!("bind {local}: {e}"));
        socket
            .connect_timeout(&addr.into(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let stream: TcpStream = socket.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("timeout: {e}"));
        let mut client = TlsSmtp {
            stream: Stream::Plain(stream),
        };
        let greeting = client.read_reply();
        (client, greeting)
    }

    /// Writes raw bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        let result = match &mut self.stream {
            Stream::Plain(s) => s.write_all(bytes),
            Stream::Tls(s) => s.write_all(bytes).and_then(|_| s.flush()),
        };
        result.unwrap_or_else(|e| panic!("write: {e}"));
    }

    /// Reads one (multi-line) reply, CRLFs included.
    pub fn read_reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while !line.ends_with(b"\n") {
                let n = match &mut self.stream {
                    Stream::Plain(s) => s.read(&mut byte),
                    Stream::Tls(s) => s.read(&mut byte),
                }
                .unwrap_or_else(|e| panic!("read after {reply:?}: {e}"));
                if n == 0 {
                    panic!("connection closed after {reply:?} {line:?}");
                }
                line.push(byte[0]);
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            let last = line.as_bytes().get(3) != Some(&b'-');
            reply.push_str(&line);
            if last {
                return reply;
            }
        }
    }

    /// Sends one command line (CRLF added) and reads its reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.write(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    /// Runs the TLS handshake (after the server's 220 to STARTTLS),
    /// trusting `ca_pem`; returns the server's leaf certificate (DER).
    pub fn handshake(&mut self, ca_pem: &str) -> Vec<u8> {
        let Stream::Plain(tcp) = &self.stream else {
            panic!("TLS is already on");
        };
        let tcp = tcp.try_clone().unwrap_or_else(|e| panic!("clone: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(
                CertificateDer::from_pem_slice(ca_pem.as_bytes())
                    .unwrap_or_else(|e| panic!("CA: {e}")),
            )
            .unwrap_or_else(|e| panic!("root: {e}"));
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("versions: {e}"))
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from("relay.test").unwrap_or_else(|e| panic!("name: {e}"));
        let conn = rustls::ClientConnection::new(Arc::new(config), name)
            .unwrap_or_else(|e| panic!("client: {e}"));
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .unwrap_or_else(|e| panic!("TLS handshake with the relay failed: {e}"));
        }
        let leaf = tls
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_else(|| panic!("the relay sent no certificate"));
        self.stream = Stream::Tls(Box::new(tls));
        leaf
    }
}

/// A Python preamble for smtplib scripts: `host port ca source` in argv,
/// `ctx` trusting the test CA, `code(fn, *args, **kwargs)` giving a reply code even
/// when smtplib raises, and `b64(text)`.
pub const SMTPLIB_PREAMBLE: &str = r#"
import base64, smtplib, ssl, sys
host, port, ca, source = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
def code(f, *a, **kw):
    try:
        r = f(*a, **kw)
        return r[0] if isinstance(r, tuple) else r
    except smtplib.SMTPResponseException as e:
        return e.smtp_code
def b64(s):
    return base64.b64encode(s.encode()).decode()
def connect():
    return smtplib.SMTP(host, port, source_address=(source, 0), timeout=30)
"#;

/// The argv for [`SMTPLIB_PREAMBLE`]: the relay's address, the CA file and
/// the client's source address.
pub fn smtplib_args(addr: SocketAddr, ca: &Path, source: &str) -> Vec<String> {
    vec![
        addr.ip().to_string(),
        addr.port().to_string(),
        ca.display().to_string(),
        source.to_string(),
    ]
}

/// The relay's own `Received:` field in `raw` (the one `by relay.test`),
/// unfolded; panics when there is none.
pub fn relay_received(raw: &str) -> String {
    let head = raw.split("\r\n\r\n").next().unwrap_or_default();
    let unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ");
    unfolded
        .split("\r\n")
        .find(|l| l.starts_with("Received:") && l.contains("by relay.test (poolrelay)"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no Received: by relay.test in\n{raw}"))
}
