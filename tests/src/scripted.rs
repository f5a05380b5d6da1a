//! Scripted SMTP upstreams: a small SMTP server, on std threads, that
//! answers what a test tells it to and records everything the relay sent.
//! For replies a real peer cannot be told to give: per-recipient RCPT
//! replies chosen by address, a 421 greeting, STARTTLS offered or not,
//! implicit TLS, AUTH PLAIN/LOGIN required with given credentials.
//!
//! - [`TestPki`]: a throwaway CA and a server certificate (rcgen, ring).
//! - [`Scripted`]: the server; [`Scripted::transactions`] and
//!   [`Scripted::commands`] say what it saw. Its replies can be changed
//!   while it runs ([`Scripted::set_greeting`], [`Scripted::set_rcpt_reply`]).
//!
//! Every socket has read and write timeouts; the listener and every open
//! connection are shut down when the [`Scripted`] is dropped.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::ports::free_addr;
use crate::process::set_mode;
use crate::wait::{POLL_INTERVAL, poll_until};

/// Read/write timeout of a scripted session's socket.
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest line accepted (a command or a line of content).
const MAX_LINE: usize = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Test PKI
// ---------------------------------------------------------------------------

/// A throwaway CA and one server certificate signed by it, for the names
/// given (DNS names; IP literals become IP SANs).
pub struct TestPki {
    /// The CA certificate, PEM (for `tls_ca_file`).
    pub ca_pem: String,
    /// The server certificate, PEM (leaf only).
    pub cert_pem: String,
    /// The server certificate's private key, PKCS#8 PEM.
    pub key_pem: String,
    server_config: Arc<rustls::ServerConfig>,
}

/// The files [`TestPki::write_to`] wrote.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The server certificate followed by the CA certificate.
    pub cert_chain: PathBuf,
    /// The server key.
    pub key: PathBuf,
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestPki {
    /// A CA named "poolrelay test CA" and a certificate for `names`.
    pub fn new(names: &[&str]) -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().unwrap_or_else(|e| panic!("rcgen CA key: {e}"));
        let mut ca = CertificateParams::new(Vec::<String>::new())
            .unwrap_or_else(|e| panic!("rcgen CA params: {e}"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "poolrelay test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca
            .self_signed(&ca_key)
            .unwrap_or_else(|e| panic!("rcgen CA certificate: {e}"));
        let issuer = Issuer::new(ca, &ca_key);
        let leaf_key = KeyPair::generate().unwrap_or_else(|e| panic!("rcgen key: {e}"));
        let mut leaf =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap_or_else(|e| panic!("rcgen params for {names:?}: {e}"));
        if let Some(first) = names.first() {
            leaf.distinguished_name.push(DnType::CommonName, *first);
        }
        let leaf_cert = leaf
            .signed_by(&leaf_key, &issuer)
            .unwrap_or_else(|e| panic!("rcgen certificate for {names:?}: {e}"));
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let chain: Vec<CertificateDer<'static>> =
            vec![leaf_cert.der().clone(), ca_cert.der().clone()];
        let server_config = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("rustls protocol versions: {e}"))
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap_or_else(|e| panic!("rustls server certificate: {e}"));
        TestPki {
            ca_pem: ca_cert.pem(),
            cert_pem: leaf_cert.pem(),
            key_pem: leaf_key.serialize_pem(),
            server_config: Arc::new(server_config),
        }
    }

    /// The rustls server config presenting the certificate (and the CA).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config.clone()
    }

    /// A server config that demands a client certificate signed by the
    /// test CA: a relay (which presents none) fails the handshake, as it
    /// would against a broken or picky TLS stack.
    pub fn server_config_requiring_client_certs(&self) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .unwrap_or_else(|e| panic!("test CA PEM: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone())
            .unwrap_or_else(|e| panic!("test CA as a root: {e}"));
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), ring())
                .build()
                .unwrap_or_else(|e| panic!("client verifier: {e}"));
        let leaf = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .unwrap_or_else(|e| panic!("leaf PEM: {e}"));
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .unwrap_or_else(|e| panic!("key PEM: {e}"));
        let config = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("rustls protocol versions: {e}"))
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![leaf, ca], key)
            .unwrap_or_else(|e| panic!("rustls server certificate: {e}"));
        Arc::new(config)
    }

    /// Writes `ca.pem`, `cert.pem` (leaf then CA) and `key.pem` (mode 0644,
    /// so an unprivileged daemon can read them) into `dir`.
    pub fn write_to(&self, dir: &Path) -> PkiFiles {
        let files = PkiFiles {
            ca: dir.join("ca.pem"),
            cert_chain: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        let write = |p: &Path, text: &str| {
            fs::write(p, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
            set_mode(p, 0o644);
        };
        write(&files.ca, &self.ca_pem);
        write(
            &files.cert_chain,
            &format!("{}{}", self.cert_pem, self.ca_pem),
        );
        write(&files.key, &self.key_pem);
        files
    }
}

// ---------------------------------------------------------------------------
// What the scripted upstream records
// ---------------------------------------------------------------------------

/// One command line the scripted upstream received.
#[derive(Debug, Clone)]
pub struct Command {
    /// The session (connection) number, from 0.
    pub session: usize,
    /// Whether the session was encrypted when the line arrived.
    pub tls: bool,
    /// The line without CRLF (AUTH responses included, as sent).
    pub line: String,
}

/// One mail transaction (MAIL FROM to the end of DATA, RSET, QUIT or the
/// end of the connection).
#[derive(Debug, Clone)]
pub struct Transaction {
    /// The session (connection) number, from 0.
    pub session: usize,
    /// When the transaction ended.
    pub at: Instant,
    /// Whether the session was encrypted.
    pub tls: bool,
    /// The user name that authenticated, if any.
    pub auth_user: Option<String>,
    /// The AUTH mechanism used, if any.
    pub auth_mechanism: Option<String>,
    /// The MAIL FROM address, without angle brackets (`""` for `<>`).
    pub mail_from: String,
    /// The ESMTP parameters after the MAIL FROM path, as sent
    /// (e.g. `SIZE=120 MT-PRIORITY=6`).
    pub mail_params: String,
    /// Every RCPT address, in order, with the reply given.
    pub rcpts: Vec<(String, String)>,
    /// The recipients accepted (2xx).
    pub accepted: Vec<String>,
    /// The content (dot-stuffing undone, CRLF kept), empty without DATA.
    pub data: Vec<u8>,
    /// The reply to the final dot; `None` when DATA did not complete.
    pub data_reply: Option<String>,
}

impl Transaction {
    /// True when the content was accepted (2xx to the final dot).
    pub fn delivered(&self) -> bool {
        self.data_reply
            .as_deref()
            .is_some_and(|r| r.starts_with('2'))
    }

    /// The RCPT addresses sent, whatever the reply.
    pub fn rcpt_addresses(&self) -> Vec<String> {
        self.rcpts.iter().map(|(a, _)| a.clone()).collect()
    }

    /// The content as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

impl fmt::Display for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "session {} tls={} auth={:?} MAIL <{}> {} RCPT {:?} -> data reply {:?} ({} bytes)",
            self.session,
            self.tls,
            self.auth_user,
            self.mail_from,
            self.mail_params,
            self.rcpts,
            self.data_reply,
            self.data.len()
        )
    }
}

// ---------------------------------------------------------------------------
// Options and the changeable script
// ---------------------------------------------------------------------------

/// AUTH the scripted upstream requires before MAIL.
#[derive(Debug, Clone)]
pub struct AuthRequirement {
    /// Expected user name.
    pub username: String,
    /// Expected password.
    pub password: String,
    /// Mechanisms offered, e.g. `["PLAIN", "LOGIN"]`.
    pub mechanisms: Vec<String>,
}

/// Options of [`Scripted::start`].
#[derive(Clone)]
pub struct ScriptedOptions {
    /// Listen here instead of on a fresh loopback port.
    pub addr: Option<SocketAddr>,
    /// The name in the greeting and the EHLO reply.
    pub hostname: String,
    /// Advertise PIPELINING.
    pub pipelining: bool,
    /// Offer STARTTLS with this server config.
    pub starttls: Option<Arc<rustls::ServerConfig>>,
    /// TLS from the first byte (port 465 style) with this server config.
    pub implicit_tls: Option<Arc<rustls::ServerConfig>>,
    /// Require AUTH before MAIL.
    pub auth: Option<AuthRequirement>,
    /// The SIZE limit the EHLO reply advertises (not enforced: the test
    /// looks at what the relay chose to send).
    pub size: u64,
    /// More EHLO keywords to advertise, as lines (e.g. `MT-PRIORITY MIXER`);
    /// their parameters are recorded, never acted on.
    pub extensions: Vec<String>,
}

impl Default for ScriptedOptions {
    fn default() -> Self {
        ScriptedOptions {
            addr: None,
            hostname: "scripted.test".into(),
            pipelining: true,
            starttls: None,
            implicit_tls: None,
            auth: None,
            size: 104_857_600,
            extensions: Vec::new(),
        }
    }
}

/// The replies that can change while the server runs.
struct Script {
    /// The greeting line (without CRLF). Anything but 2xx: sent, then the
    /// connection is closed.
    greeting: String,
    /// RCPT replies by lower-case address or lower-case local part.
    rcpt: HashMap<String, String>,
    /// Reply to the final dot; `None`: `250 2.0.0 Ok: queued as S<n>`.
    data_reply: Option<String>,
}

struct State {
    options: ScriptedOptions,
    script: Mutex<Script>,
    commands: Mutex<Vec<Command>>,
    transactions: Mutex<Vec<Transaction>>,
    streams: Mutex<Vec<TcpStream>>,
    sessions: AtomicUsize,
    queued: AtomicUsize,
    stop: AtomicBool,
}

/// A running scripted SMTP upstream on loopback.
pub struct Scripted {
    addr: SocketAddr,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

impl Scripted {
    /// A scripted upstream with default options: accepts everything, offers
    /// PIPELINING, no TLS, no AUTH.
    pub fn start_default() -> Scripted {
        Scripted::start(ScriptedOptions::default())
    }

    /// Starts the server; it accepts connections when this returns.
    pub fn start(options: ScriptedOptions) -> Scripted {
        let addr = options.addr.unwrap_or_else(free_addr);
        let listener = TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("scripted upstream: cannot bind {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("scripted upstream: set_nonblocking: {e}"));
        let greeting = format!("220 {} ESMTP scripted", options.hostname);
        let state = Arc::new(State {
            options,
            script: Mutex::new(Script {
                greeting,
                rcpt: HashMap::new(),
                data_reply: None,
            }),
            commands: Mutex::new(Vec::new()),
            transactions: Mutex::new(Vec::new()),
            streams: Mutex::new(Vec::new()),
            sessions: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        let accept = std::thread::Builder::new()
            .name(format!("scripted-{addr}"))
            .spawn(move || accept_loop(st, listener))
            .unwrap_or_else(|e| panic!("cannot spawn the scripted upstream thread: {e}"));
        Scripted {
            addr,
            state,
            accept: Some(accept),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Greets new connections with `line` (e.g. `421 4.3.2 busy`, or a 220
    /// again). Anything but 2xx is sent and the connection closed.
    pub fn set_greeting(&self, line: &str) {
        lock(&self.state.script).greeting = line.to_string();
    }

    /// Answers RCPT for `who` (a whole address, or a local part matching any
    /// domain; case-insensitive) with `reply` (e.g. `451 4.2.0 later`). A
    /// 421 reply also closes the connection, as RFC 5321 §3.8 says.
    pub fn set_rcpt_reply(&self, who: &str, reply: &str) {
        lock(&self.state.script)
            .rcpt
            .insert(who.to_ascii_lowercase(), reply.to_string());
    }

    /// Answers the final dot with `reply` (`None`: 250).
    pub fn set_data_reply(&self, reply: Option<&str>) {
        lock(&self.state.script).data_reply = reply.map(str::to_string);
    }

    /// Every transaction so far, in the order they ended.
    pub fn transactions(&self) -> Vec<Transaction> {
        lock(&self.state.transactions).clone()
    }

    /// Every command line so far, in arrival order.
    pub fn commands(&self) -> Vec<Command> {
        lock(&self.state.commands).clone()
    }

    /// Connections accepted so far.
    pub fn sessions(&self) -> usize {
        self.state.sessions.load(Ordering::SeqCst)
    }

    /// How many accepted transactions (2xx to the dot) included `address`
    /// among their accepted recipients.
    pub fn delivered_to(&self, address: &str) -> usize {
        self.transactions()
            .iter()
            .filter(|t| t.delivered() && t.accepted.iter().any(|a| a.eq_ignore_ascii_case(address)))
            .count()
    }

    /// Waits until `cond(transactions)` holds; panics with what was seen.
    pub fn wait_for(
        &self,
        what: &str,
        deadline: Duration,
        mut cond: impl FnMut(&[Transaction]) -> bool,
    ) -> Vec<Transaction> {
        if !poll_until(deadline, POLL_INTERVAL, || cond(&self.transactions())) {
            panic!(
                "timed out after {deadline:?} waiting for {what} at the scripted upstream {}\n{}",
                self.addr,
                self.dump()
            );
        }
        self.transactions()
    }

    /// Waits until at least `n` transactions were accepted (2xx to the dot).
    pub fn wait_for_delivered(&self, n: usize, deadline: Duration) -> Vec<Transaction> {
        self.wait_for(&format!("{n} accepted transactions"), deadline, |t| {
            t.iter().filter(|t| t.delivered()).count() >= n
        })
    }

    /// Everything seen, for failure messages.
    pub fn dump(&self) -> String {
        let mut out = format!(
            "--- scripted upstream {} ({} sessions) ---\ncommands:\n",
            self.addr,
            self.sessions()
        );
        for c in self.commands() {
            out.push_str(&format!(
                "  [{}{}] {}\n",
                c.session,
                if c.tls { " tls" } else { "" },
                c.line
            ));
        }
        out.push_str("transactions:\n");
        for t in self.transactions() {
            out.push_str(&format!("  {t}\n"));
        }
        out
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        for s in lock(&self.state.streams).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
        }
    }
}

fn accept_loop(state: Arc<State>, listener: TcpListener) {
    while !state.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let id = state.sessions.fetch_add(1, Ordering::SeqCst);
                if let Ok(clone) = stream.try_clone() {
                    lock(&state.streams).push(clone);
                }
                let st = state.clone();
                let _ = std::thread::Builder::new()
                    .name(format!("scripted-session-{id}"))
                    .spawn(move || {
                        let _ = serve(&st, stream, id);
                    });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---------------------------------------------------------------------------
// The wire: plain or TLS, line reads, DATA
// ---------------------------------------------------------------------------

trait Io: Read + Write + Send {}
impl<T: Read + Write + Send> Io for T {}

struct Wire {
    io: Box<dyn Io>,
    buf: Vec<u8>,
}

impl Wire {
    fn new(io: Box<dyn Io>) -> Wire {
        Wire {
            io,
            buf: Vec::new(),
        }
    }

    fn tls(config: &Arc<rustls::ServerConfig>, tcp: TcpStream) -> io::Result<Wire> {
        let conn = rustls::ServerConnection::new(config.clone())
            .map_err(|e| io::Error::other(format!("rustls: {e}")))?;
        Ok(Wire::new(Box::new(rustls::StreamOwned::new(conn, tcp))))
    }

    fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.io.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// One line without its CRLF (or LF); `None` at the end of the stream.
    fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::other("line too long"));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// The content up to the `.` line, dot-stuffing undone, CRLF line ends.
    fn read_data(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut data = Vec::new();
        loop {
            let Some(line) = self.read_line()? else {
                return Ok(None);
            };
            if line == b"." {
                return Ok(Some(data));
            }
            let line = line.strip_prefix(b".").unwrap_or(&line);
            data.extend_from_slice(line);
            data.extend_from_slice(b"\r\n");
        }
    }

    fn send(&mut self, text: &str) -> io::Result<()> {
        self.io.write_all(text.as_bytes())?;
        self.io.flush()
    }
}

// ---------------------------------------------------------------------------
// One session
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Session {
    tls: bool,
    helo: bool,
    auth_user: Option<String>,
    auth_mechanism: Option<String>,
    mail: Option<String>,
    mail_params: String,
    rcpts: Vec<(String, String)>,
    accepted: Vec<String>,
}

impl Session {
    /// Records the open transaction, if any, and clears it.
    fn end_transaction(&mut self, state: &State, id: usize, data: Vec<u8>, reply: Option<String>) {
        if let Some(from) = self.mail.take() {
            lock(&state.transactions).push(Transaction {
                session: id,
                at: Instant::now(),
                tls: self.tls,
                auth_user: self.auth_user.clone(),
                auth_mechanism: self.auth_mechanism.clone(),
                mail_from: from,
                mail_params: std::mem::take(&mut self.mail_params),
                rcpts: std::mem::take(&mut self.rcpts),
                accepted: std::mem::take(&mut self.accepted),
                data,
                data_reply: reply,
            });
        }
        self.rcpts.clear();
        self.accepted.clear();
    }
}

/// The address inside `<...>` after `FROM:` / `TO:`.
fn path_of(args: &str) -> Option<String> {
    let start = args.find('<')?;
    let end = args[start..].find('>')? + start;
    Some(args[start + 1..end].to_string())
}

fn serve(state: &State, tcp: TcpStream, id: usize) -> io::Result<()> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(SESSION_TIMEOUT))?;
    tcp.set_write_timeout(Some(SESSION_TIMEOUT))?;
    tcp.set_nodelay(true)?;
    let opts = &state.options;
    let mut s = Session::default();
    let mut wire = match &opts.implicit_tls {
        Some(cfg) => {
            s.tls = true;
            Wire::tls(cfg, tcp.try_clone()?)?
        }
        None => Wire::new(Box::new(tcp.try_clone()?)),
    };
    let greeting = lock(&state.script).greeting.clone();
    wire.send(&format!("{greeting}\r\n"))?;
    if !greeting.starts_with('2') {
        let _ = tcp.shutdown(Shutdown::Both);
        return Ok(());
    }
    let result = session_loop(state, &tcp, id, &mut s, &mut wire);
    s.end_transaction(state, id, Vec::new(), None);
    result
}

fn session_loop(
    state: &State,
    tcp: &TcpStream,
    id: usize,
    s: &mut Session,
    wire: &mut Wire,
) -> io::Result<()> {
    let opts = &state.options;
    loop {
        let Some(raw) = wire.read_line()? else {
            return Ok(());
        };
        let line = String::from_utf8_lossy(&raw).into_owned();
        lock(&state.commands).push(Command {
            session: id,
            tls: s.tls,
            line: line.clone(),
        });
        let (verb, args) = match line.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_string()),
            None => (line.trim().to_ascii_uppercase(), String::new()),
        };
        match verb.as_str() {
            "EHLO" => {
                s.end_transaction(state, id, Vec::new(), None);
                s.helo = true;
                let mut lines = vec![opts.hostname.clone()];
                if opts.pipelining {
                    lines.push("PIPELINING".into());
                }
                lines.extend([format!("SIZE {}", opts.size), "8BITMIME".into()]);
                lines.push("ENHANCEDSTATUSCODES".into());
                lines.extend(opts.extensions.iter().cloned());
                if opts.starttls.is_some() && !s.tls {
                    lines.push("STARTTLS".into());
                }
                if let Some(auth) = &opts.auth {
                    lines.push(format!("AUTH {}", auth.mechanisms.join(" ")));
                }
                let n = lines.len();
                let mut reply = String::new();
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i + 1 == n { ' ' } else { '-' };
                    reply.push_str(&format!("250{sep}{l}\r\n"));
                }
                wire.io.write_all(reply.as_bytes())?;
                wire.io.flush()?;
            }
            "HELO" => {
                s.helo = true;
                wire.send(&format!("250 {}\r\n", opts.hostname))?;
            }
            "STARTTLS" => {
                let Some(cfg) = opts.starttls.as_ref().filter(|_| !s.tls) else {
                    wire.send("502 5.5.1 STARTTLS not offered\r\n")?;
                    continue;
                };
                if !wire.buf.is_empty() {
                    // Pipelined after STARTTLS: the injection of CVE-2011-0411.
                    wire.send("554 5.5.1 no pipelining after STARTTLS\r\n")?;
                    return Ok(());
                }
                wire.send("220 2.0.0 Ready to start TLS\r\n")?;
                *wire = Wire::tls(cfg, tcp.try_clone()?)?;
                *s = Session {
                    tls: true,
                    ..Session::default()
                };
            }
            "AUTH" => auth(state, id, s, wire, &args)?,
            "MAIL" => {
                if opts.auth.is_some() && s.auth_user.is_none() {
                    wire.send("530 5.7.0 Authentication required\r\n")?;
                    continue;
                }
                if s.mail.is_some() {
                    wire.send("503 5.5.1 Error: nested MAIL command\r\n")?;
                    continue;
                }
                match path_of(&args) {
                    Some(from) => {
                        s.mail = Some(from);
                        s.mail_params = args
                            .split_once('>')
                            .map(|(_, rest)| rest.trim().to_string())
                            .unwrap_or_default();
                        wire.send("250 2.1.0 Ok\r\n")?;
                    }
                    None => wire.send("501 5.5.4 Syntax: MAIL FROM:<address>\r\n")?,
                }
            }
            "RCPT" => {
                if s.mail.is_none() {
                    wire.send("503 5.5.1 Error: need MAIL command\r\n")?;
                    continue;
                }
                let Some(to) = path_of(&args) else {
                    wire.send("501 5.5.4 Syntax: RCPT TO:<address>\r\n")?;
                    continue;
                };
                let lower = to.to_ascii_lowercase();
                let local = lower.split('@').next().unwrap_or("").to_string();
                let reply = {
                    let script = lock(&state.script);
                    script
                        .rcpt
                        .get(&lower)
                        .or_else(|| script.rcpt.get(&local))
                        .cloned()
                        .unwrap_or_else(|| "250 2.1.5 Ok".to_string())
                };
                if reply.starts_with('2') {
                    s.accepted.push(to.clone());
                }
                s.rcpts.push((to, reply.clone()));
                wire.send(&format!("{reply}\r\n"))?;
                if reply.starts_with("421") {
                    // RFC 5321 §3.8: 421 closes the transmission channel.
                    s.end_transaction(state, id, Vec::new(), None);
                    let _ = tcp.shutdown(Shutdown::Both);
                    return Ok(());
                }
            }
            "DATA" => {
                if s.mail.is_none() {
                    wire.send("503 5.5.1 Error: need RCPT command\r\n")?;
                    continue;
                }
                if s.accepted.is_empty() {
                    wire.send("554 5.5.1 Error: no valid recipients\r\n")?;
                    continue;
                }
                wire.send("354 End data with <CR><LF>.<CR><LF>\r\n")?;
                let Some(data) = wire.read_data()? else {
                    return Ok(());
                };
                let reply = lock(&state.script).data_reply.clone().unwrap_or_else(|| {
                    let n = state.queued.fetch_add(1, Ordering::SeqCst);
                    format!("250 2.0.0 Ok: queued as S{n}")
                });
                s.end_transaction(state, id, data, Some(reply.clone()));
                wire.send(&format!("{reply}\r\n"))?;
                if reply.starts_with("421") {
                    let _ = tcp.shutdown(Shutdown::Both);
                    return Ok(());
                }
            }
            "RSET" => {
                s.end_transaction(state, id, Vec::new(), None);
                wire.send("250 2.0.0 Ok\r\n")?;
            }
            "NOOP" => wire.send("250 2.0.0 Ok\r\n")?,
            "QUIT" => {
                s.end_transaction(state, id, Vec::new(), None);
                wire.send("221 2.0.0 Bye\r\n")?;
                return Ok(());
            }
            _ => wire.send("502 5.5.2 Error: command not recognized\r\n")?,
        }
    }
}

/// AUTH PLAIN (with or without an initial response) and AUTH LOGIN.
fn auth(state: &State, id: usize, s: &mut Session, wire: &mut Wire, args: &str) -> io::Result<()> {
    let Some(req) = &state.options.auth else {
        return wire.send("502 5.5.1 AUTH not offered\r\n");
    };
    if s.auth_user.is_some() {
        return wire.send("503 5.5.1 Already authenticated\r\n");
    }
    let mut words = args.split_whitespace();
    let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
    let initial = words.next().map(str::to_string);
    if !req
        .mechanisms
        .iter()
        .any(|m| m.eq_ignore_ascii_case(&mechanism))
    {
        return wire.send("504 5.5.4 Unrecognized authentication type\r\n");
    }
    let next_line = |wire: &mut Wire, prompt: &str| -> io::Result<Option<String>> {
        wire.send(&format!("334 {prompt}\r\n"))?;
        let line = wire
            .read_line()?
            .map(|l| String::from_utf8_lossy(&l).into_owned());
        if let Some(l) = &line {
            lock(&state.commands).push(Command {
                session: id,
                tls: s.tls,
                line: l.clone(),
            });
        }
        Ok(line)
    };
    let (user, pass) = match mechanism.as_str() {
        "PLAIN" => {
            let token = match initial {
                Some(t) => t,
                None => match next_line(wire, "")? {
                    Some(t) => t,
                    None => return Ok(()),
                },
            };
            let Some(decoded) = base64_decode(&token) else {
                return wire.send("501 5.5.2 Cannot decode response\r\n");
            };
            let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
            if parts.len() != 3 {
                return wire.send("501 5.5.2 Malformed PLAIN response\r\n");
            }
            (
                String::from_utf8_lossy(parts[1]).into_owned(),
                String::from_utf8_lossy(parts[2]).into_owned(),
            )
        }
        _ => {
            // LOGIN: "Username:" and "Password:" prompts, base64.
            let user = match initial {
                Some(t) => t,
                None => match next_line(wire, "VXNlcm5hbWU6")? {
                    Some(t) => t,
                    None => return Ok(()),
                },
            };
            let pass = match next_line(wire, "UGFzc3dvcmQ6")? {
                Some(t) => t,
                None => return Ok(()),
            };
            match (base64_decode(&user), base64_decode(&pass)) {
                (Some(u), Some(p)) => (
                    String::from_utf8_lossy(&u).into_owned(),
                    String::from_utf8_lossy(&p).into_owned(),
                ),
                _ => return wire.send("501 5.5.2 Cannot decode response\r\n"),
            }
        }
    };
    if user == req.username && pass == req.password {
        s.auth_user = Some(user);
        s.auth_mechanism = Some(mechanism);
        wire.send("235 2.7.0 Authentication successful\r\n")
    } else {
        wire.send("535 5.7.8 Error: authentication failed\r\n")
    }
}

/// Standard base64 with padding; `None` when malformed.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a') as u32 + 26,
            b'0'..=b'9' => (c - b'0') as u32 + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    }
    let bytes = text.trim().as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&b| b == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        assert_eq!(
            base64_decode("AHVzZXIAc2VjcmV0").unwrap(),
            b"\0user\0secret"
        );
        assert_eq!(base64_decode("VXNlcm5hbWU6").unwrap(), b"Username:");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
        assert!(base64_decode("YQ=").is_none());
        assert!(base64_decode("Y!==").is_none());
    }

    #[test]
    fn paths() {
        assert_eq!(path_of("FROM:<a@b> SIZE=1").as_deref(), Some("a@b"));
        assert_eq!(path_of("FROM:<>").as_deref(), Some(""));
        assert_eq!(path_of("TO:x"), None);
    }
}
