//! End-to-end test harness for poolrelay: the built binary against real SMTP
//! peers, on loopback only.
//!
//! What is here:
//! - [`binary`]: where the `poolrelay` binary under test is.
//! - [`free_addr`] / [`free_port`]: loopback ports for relays and sinks.
//! - [`Relay`]: a `poolrelay run` process with its own config, spool and logs
//!   in a temporary directory; [`Relay::kill9`] and [`Relay::restart`].
//! - [`Sink`]: our own `poolrelay sink`, which writes one `.eml` file per
//!   message; [`Sink::messages`] parses them.
//! - [`PostfixSink`] and [`smtp_source`]: Postfix's independent `smtp-sink`
//!   and `smtp-source` test programs.
//! - [`SmtpClient`]: a small blocking SMTP client with read timeouts, able to
//!   bind its local address (e.g. 127.0.0.2) and to write raw bytes.
//! - [`wait_until`]: polling with a deadline and a message saying what was
//!   waited for. Tests never sleep "hoping" something happened.
//!
//! Every process is stopped by its PID when its owner is dropped, and every
//! wait is bounded. When a wait fails, the panic message carries the tail of
//! the logs of the process concerned.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

/// How long a spawned process gets to start accepting TCP connections.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
/// How often [`wait_until`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Read/write timeout of [`SmtpClient`] sockets.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of a log shown when something fails.
const LOG_TAIL_LINES: usize = 60;

/// Where Postfix's test programs are.
pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
/// Where Postfix's test programs are.
pub const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";
const POSTFIX_MISSING: &str = "install Debian package postfix (apt-get install postfix)";

// ---------------------------------------------------------------------------
// The binary, ports, waiting
// ---------------------------------------------------------------------------

/// The `poolrelay` binary under test: `$POOLRELAY_BIN`, else
/// `$CARGO_TARGET_DIR/debug/poolrelay`, else `<workspace>/target/debug/poolrelay`.
/// Panics when it does not exist.
pub fn binary() -> PathBuf {
    let path = match (
        std::env::var_os("POOLRELAY_BIN"),
        std::env::var_os("CARGO_TARGET_DIR"),
    ) {
        (Some(p), _) if !p.is_empty() => PathBuf::from(p),
        (_, Some(t)) if !t.is_empty() => PathBuf::from(t).join("debug/poolrelay"),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/poolrelay"),
    };
    if !path.is_file() {
        panic!(
            "the poolrelay binary is not at {}; build it first: cargo build -p poolrelay \
             (or point POOLRELAY_BIN at it)",
            path.display()
        );
    }
    path
}

/// A free TCP port on 127.0.0.1.
///
/// The port is found by binding 127.0.0.1:0 and closing the listener again, so
/// there is a small race: another process may take the port between this call
/// and the moment the relay or sink binds it. Linux hands out ephemeral ports
/// in a spread-out order, which keeps that window harmless in practice; a
/// process that cannot bind fails its startup wait with its log shown.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr of a bound listener: {e}"))
        .port()
}

/// `127.0.0.1:<free port>`; see [`free_port`] for the race.
pub fn free_addr() -> SocketAddr {
    loopback(free_port())
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// True when something accepts TCP connections on `addr` right now.
pub fn accepts_tcp(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Polls `cond` every [`POLL_INTERVAL`] until it is true; false when
/// `deadline` passed first (the condition is checked once more at the end).
pub fn poll_until(deadline: Duration, interval: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return cond();
        }
        std::thread::sleep(interval);
    }
}

/// Polls `cond` every 20 ms until it is true; panics saying `what` was waited
/// for when `deadline` passes first.
pub fn wait_until(what: &str, deadline: Duration, cond: impl FnMut() -> bool) {
    if !poll_until(deadline, POLL_INTERVAL, cond) {
        panic!("timed out after {deadline:?} waiting for {what}");
    }
}

/// A name unique within this test run and across runs: `PREFIX.N.PID.NANOS@tests.poolrelay`.
/// Used for Message-IDs (without angle brackets).
pub fn unique_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}.{n}.{}.{nanos:x}@tests.poolrelay",
        std::process::id()
    )
}

/// A small RFC 5322 message with CRLF line endings. `message_id` is given
/// without angle brackets.
pub fn message(message_id: &str, from: &str, to: &str, subject: &str, body: &str) -> String {
    let mut m = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{message_id}>\r\n\
         Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n"
    );
    for line in body.lines() {
        m.push_str(line);
        m.push_str("\r\n");
    }
    m
}

/// A TOML basic string literal for `s` (quotes included).
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The last `n` lines of a file, or a note saying why it cannot be read.
pub fn file_tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            if lines.is_empty() {
                format!("({} is empty)", path.display())
            } else {
                lines[start..].join("\n")
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective uid of this process.
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn new_tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

/// On a failing test, keep the temporary directory (spool, logs, messages)
/// for inspection; also when `POOLRELAY_TEST_KEEP` is set.
fn keep_on_failure(dir: &mut TempDir, what: &str) {
    if std::thread::panicking() || std::env::var_os("POOLRELAY_TEST_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!(
            "[harness] kept the {what} directory {}",
            dir.path().display()
        );
    }
}

/// A child process that is killed (SIGKILL, by its PID) and reaped on drop.
struct Proc {
    child: Option<Child>,
}

impl Proc {
    fn spawn(cmd: Command, what: &str) -> Proc {
        Proc::spawn_with_stdin(cmd, what, Stdio::null())
    }

    fn spawn_with_stdin(mut cmd: Command, what: &str, stdin: Stdio) -> Proc {
        cmd.stdin(stdin);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        Proc { child: Some(child) }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` when the process has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten(),
            None => None,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Child::kill sends SIGKILL to this child's PID only.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `what` and waits until every address in `addrs` accepts TCP.
/// Panics with `logs()` when it exits or the deadline passes first.
fn wait_started(proc: &mut Proc, addrs: &[SocketAddr], what: &str, logs: impl Fn() -> String) {
    let end = Instant::now() + STARTUP_DEADLINE;
    for &addr in addrs {
        loop {
            if let Some(status) = proc.exited() {
                panic!(
                    "{what} exited with {status} before accepting on {addr}\n{}",
                    logs()
                );
            }
            if accepts_tcp(addr) {
                break;
            }
            if Instant::now() >= end {
                panic!(
                    "{what} did not accept TCP on {addr} within {STARTUP_DEADLINE:?}\n{}",
                    logs()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

fn log_files(out: &File, err: &File) -> (Stdio, Stdio) {
    let o = out
        .try_clone()
        .unwrap_or_else(|e| panic!("dup log file: {e}"));
    let e = err
        .try_clone()
        .unwrap_or_else(|e| panic!("dup log file: {e}"));
    (Stdio::from(o), Stdio::from(e))
}

fn append_file(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Relay
// ---------------------------------------------------------------------------

/// What a test needs to write a relay config: the temporary directory, the
/// spool directory inside it, the main listener and admin addresses (already
/// allocated), and a way to allocate more listener addresses.
#[derive(Debug)]
pub struct RelaySetup {
    /// The relay's temporary directory (config, spool, logs).
    pub dir: PathBuf,
    /// `<dir>/spool`, to be used as `server.spool_dir`.
    pub spool_dir: PathBuf,
    /// The address of the first `[[listener]]`.
    pub listen: SocketAddr,
    /// The `[admin]` address.
    pub admin: SocketAddr,
    extra_listeners: Vec<SocketAddr>,
}

impl RelaySetup {
    /// Allocates one more listener address; the relay is considered started
    /// only once it accepts on this one too.
    pub fn extra_listener(&mut self) -> SocketAddr {
        let a = free_addr();
        self.extra_listeners.push(a);
        a
    }

    /// `[server]` (hostname `relay.test`, spool in the tempdir) and `[admin]`.
    pub fn head(&self) -> String {
        format!(
            "[server]\nhostname = \"relay.test\"\nspool_dir = {}\n\n[admin]\naddress = \"{}\"\n\n",
            toml_str(&self.spool_dir.to_string_lossy()),
            self.admin
        )
    }

    /// A `[[listener]]` table on `addr` followed by the `extra` key lines.
    pub fn listener_at(&self, addr: SocketAddr, extra: &str) -> String {
        let mut s = format!("[[listener]]\naddress = \"{addr}\"\n");
        if !extra.is_empty() {
            s.push_str(extra.trim_end());
            s.push('\n');
        }
        s.push('\n');
        s
    }

    /// The main `[[listener]]` (on [`RelaySetup::listen`]) with `extra` key lines.
    pub fn listener(&self, extra: &str) -> String {
        self.listener_at(self.listen, extra)
    }

    /// A complete config: head, main listener with `listener_extra`,
    /// `[defaults]` with `list_pool = "A"` and a 1 s retry, pool A, and one
    /// upstream serving every pool.
    pub fn single_upstream(&self, upstream: SocketAddr, listener_extra: &str) -> String {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n[pool.A]\n\n\
             [[upstream]]\nhost = \"{upstream}\"\n",
            self.head(),
            self.listener(listener_extra)
        )
    }
}

/// A running `poolrelay run -c FILE`, its config, spool and logs in a
/// temporary directory. Killed (SIGKILL by PID) and reaped on drop.
pub struct Relay {
    dir: TempDir,
    config_path: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    wait_addrs: Vec<SocketAddr>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    proc: Proc,
    starts: u32,
}

impl Relay {
    /// Writes the config that `build` returns (see [`RelaySetup`]) to
    /// `<tmp>/poolrelay.toml`, starts the relay and waits until all its
    /// listeners accept TCP.
    pub fn start(build: impl FnOnce(&mut RelaySetup) -> String) -> Relay {
        let dir = new_tempdir("poolrelay-relay-");
        let mut setup = RelaySetup {
            dir: dir.path().to_path_buf(),
            spool_dir: dir.path().join("spool"),
            listen: free_addr(),
            admin: free_addr(),
            extra_listeners: Vec::new(),
        };
        let text = build(&mut setup);
        let config_path = dir.path().join("poolrelay.toml");
        fs::write(&config_path, &text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let mut wait_addrs = vec![setup.listen];
        wait_addrs.extend(setup.extra_listeners.iter().copied());
        let mut relay = Relay {
            stdout_path: dir.path().join("relay.stdout.log"),
            stderr_path: dir.path().join("relay.stderr.log"),
            dir,
            config_path,
            listen: setup.listen,
            admin: setup.admin,
            wait_addrs,
            proc: Proc { child: None },
            starts: 0,
        };
        relay.spawn();
        relay
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let out = append_file(&self.stdout_path);
        let err = append_file(&self.stderr_path);
        for f in [&out, &err] {
            let _ = writeln!(&*f, "----- [harness] start #{} -----", self.starts);
        }
        let (o, e) = log_files(&out, &err);
        let mut cmd = Command::new(binary());
        cmd.arg("run")
            .arg("-c")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdout(o)
            .stderr(e);
        self.proc = Proc::spawn(cmd, "poolrelay run");
        let what = format!("poolrelay run -c {}", self.config_path.display());
        let addrs = self.wait_addrs.clone();
        let mut proc = std::mem::replace(&mut self.proc, Proc { child: None });
        wait_started(&mut proc, &addrs, &what, || self.logs());
        self.proc = proc;
    }

    /// The address of the first listener.
    pub fn smtp_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The temporary directory (config, spool, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The relay's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// A client connected to the first listener (greeting read).
    pub fn client(&self) -> SmtpClient {
        SmtpClient::connect(self.listen).unwrap_or_else(|e| {
            panic!(
                "cannot connect to the relay at {}: {e}\n{}",
                self.listen,
                self.logs()
            )
        })
    }

    /// Sends one message through the listener at `addr` on a fresh
    /// connection; returns the reply to the final dot. Panics, with the
    /// relay's logs, unless it is 2xx.
    pub fn send_via(&self, addr: SocketAddr, from: &str, rcpts: &[&str], message: &str) -> Reply {
        let mut c = SmtpClient::connect(addr).unwrap_or_else(|e| {
            panic!(
                "cannot connect to the relay at {addr}: {e}\n{}",
                self.logs()
            )
        });
        let r = c.send_mail(from, rcpts, message).unwrap_or_else(|e| {
            panic!(
                "sending <{from}> -> {rcpts:?} via {addr}: {e}\n{}",
                self.logs()
            )
        });
        c.quit();
        r
    }

    /// [`Relay::send_via`] the first listener.
    pub fn send(&self, from: &str, rcpts: &[&str], message: &str) -> Reply {
        self.send_via(self.listen, from, rcpts, message)
    }

    /// `http://<admin address>`, for `poolrelay queue --admin`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The relay's log (its stderr, where it logs) of every start so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    /// `GET /metrics` on the admin address; panics, with the logs, unless 200.
    pub fn scrape(&self) -> String {
        let r = http_get(self.admin, "/metrics").unwrap_or_else(|e| {
            panic!(
                "GET http://{}/metrics failed: {e}\n{}",
                self.admin,
                self.logs()
            )
        });
        assert_eq!(
            r.status,
            200,
            "GET /metrics answered {}: {}\n{}",
            r.status,
            r.body,
            self.logs()
        );
        r.body
    }

    /// Sends signal `sig` (a name kill(1) knows: `HUP`, `TERM`, `INT`) to
    /// the relay's PID. Panics when the relay is not running (so a stale PID
    /// is never signalled).
    pub fn signal(&mut self, sig: &str) {
        if let Some(status) = self.proc.exited() {
            panic!(
                "cannot send SIG{sig}: the relay already exited with {status}\n{}",
                self.logs()
            );
        }
        let pid = self
            .proc
            .pid()
            .unwrap_or_else(|| panic!("cannot send SIG{sig}: the relay is not running"));
        let mut cmd = Command::new("kill");
        cmd.arg("-s").arg(sig).arg(pid.to_string());
        let out = run_with_deadline(
            cmd,
            &format!("kill -s {sig} {pid}"),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "kill -s {sig} {pid}: {out}");
    }

    /// Waits until the relay process exits by itself; its exit status, or
    /// `None` when `deadline` passed first (it is still running then).
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let mut status = None;
        poll_until(deadline, POLL_INTERVAL, || {
            status = self.proc.exited();
            status.is_some()
        });
        status
    }

    /// SIGKILL the relay (no chance to clean up) and reap it.
    pub fn kill9(&mut self) {
        self.proc.kill();
    }

    /// Starts the relay again with the same config and spool (after
    /// [`Relay::kill9`]; kills a still-running one first).
    pub fn restart(&mut self) {
        self.proc.kill();
        self.spawn();
    }

    /// The tail of the relay's stdout and stderr, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- relay config {} ---\n{}\n--- relay stdout (tail) ---\n{}\n--- relay stderr (tail) ---\n{}\n",
            self.config_path.display(),
            fs::read_to_string(&self.config_path).unwrap_or_default(),
            file_tail(&self.stdout_path, LOG_TAIL_LINES),
            file_tail(&self.stderr_path, LOG_TAIL_LINES)
        )
    }

    /// Like [`wait_until`], with the relay's logs in the panic message.
    pub fn wait_until(&self, what: &str, deadline: Duration, cond: impl FnMut() -> bool) {
        if !poll_until(deadline, POLL_INTERVAL, cond) {
            panic!(
                "timed out after {deadline:?} waiting for {what}\n{}",
                self.logs()
            );
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.proc.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        keep_on_failure(&mut self.dir, "relay");
    }
}

// ---------------------------------------------------------------------------
// Our own sink: poolrelay sink
// ---------------------------------------------------------------------------

/// Options of [`Sink::start_with`].
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// Listen here instead of on a fresh port (e.g. a port allocated up front).
    pub addr: Option<SocketAddr>,
    /// `--reply CODE`: the reply the sink gives to the final dot.
    pub reply: Option<u16>,
    /// `--delay MS`: wait before replying.
    pub delay_ms: Option<u64>,
}

/// A message as `poolrelay sink` stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkMessage {
    /// The file it was read from.
    pub file: PathBuf,
    /// Envelope sender, `""` for the null sender.
    pub from: String,
    /// Envelope recipients, in order.
    pub to: Vec<String>,
    /// The message as received (headers and body).
    pub raw: String,
}

impl SinkMessage {
    /// The first header field `name` (case-insensitive), unfolded and trimmed.
    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.raw, name)
    }

    /// The Message-ID without angle brackets.
    pub fn message_id(&self) -> Option<String> {
        self.header("Message-ID").map(|v| strip_brackets(&v))
    }

    /// The Subject.
    pub fn subject(&self) -> Option<String> {
        self.header("Subject")
    }
}

/// The first header field `name` of `raw` (case-insensitive), unfolded and trimmed.
pub fn header_value(raw: &str, name: &str) -> Option<String> {
    let mut found: Option<String> = None;
    for line in raw.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break; // end of the header section
        }
        if line.starts_with([' ', '\t']) {
            if let Some(v) = found.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if found.is_some() {
            break;
        }
        if let Some((n, v)) = line.split_once(':')
            && n.trim().eq_ignore_ascii_case(name)
        {
            found = Some(v.trim().to_string());
        }
    }
    found
}

/// `<x>` -> `x`.
pub fn strip_brackets(s: &str) -> String {
    let s = s.trim();
    s.strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(s)
        .to_string()
}

/// Parses one sink file: `X-Sink-From: <sender>`, one `X-Sink-To: <rcpt>`
/// per recipient, then the raw message.
pub fn parse_sink_file(file: &Path, bytes: &[u8]) -> SinkMessage {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let mut from: Option<String> = None;
    let mut to = Vec::new();
    let mut pos = 0;
    while pos < text.len() {
        let end = text[pos..]
            .find('\n')
            .map(|i| pos + i + 1)
            .unwrap_or(text.len());
        let line = text[pos..end].trim_end_matches(['\r', '\n']);
        if let Some(v) = line.strip_prefix("X-Sink-From:") {
            from = Some(strip_brackets(v));
        } else if let Some(v) = line.strip_prefix("X-Sink-To:") {
            to.push(strip_brackets(v));
        } else {
            break;
        }
        pos = end;
    }
    let from = from.unwrap_or_else(|| {
        panic!(
            "sink file {} does not start with an X-Sink-From line; it starts with: {:?}",
            file.display(),
            &text[..text.len().min(200)]
        )
    });
    SinkMessage {
        file: file.to_path_buf(),
        from,
        to,
        raw: text[pos..].to_string(),
    }
}

/// A running `poolrelay sink --listen ADDR --dir DIR`. Killed by PID on drop.
pub struct Sink {
    dir: TempDir,
    msg_dir: PathBuf,
    addr: SocketAddr,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    proc: Proc,
}

impl Sink {
    /// A sink on a fresh loopback port, accepting everything.
    pub fn start() -> Sink {
        Sink::start_with(SinkOptions::default())
    }

    /// A sink on `addr` (allocated earlier with [`free_addr`]).
    pub fn start_at(addr: SocketAddr) -> Sink {
        Sink::start_with(SinkOptions {
            addr: Some(addr),
            ..SinkOptions::default()
        })
    }

    /// A sink with options; waits until it accepts TCP.
    pub fn start_with(opts: SinkOptions) -> Sink {
        let dir = new_tempdir("poolrelay-sink-");
        let msg_dir = dir.path().join("messages");
        fs::create_dir_all(&msg_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", msg_dir.display()));
        let addr = opts.addr.unwrap_or_else(free_addr);
        let stdout_path = dir.path().join("sink.stdout.log");
        let stderr_path = dir.path().join("sink.stderr.log");
        let (o, e) = log_files(&append_file(&stdout_path), &append_file(&stderr_path));
        let mut cmd = Command::new(binary());
        cmd.arg("sink")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--dir")
            .arg(&msg_dir);
        if let Some(code) = opts.reply {
            cmd.arg("--reply").arg(code.to_string());
        }
        if let Some(ms) = opts.delay_ms {
            cmd.arg("--delay").arg(ms.to_string());
        }
        cmd.current_dir(dir.path()).stdout(o).stderr(e);
        let mut sink = Sink {
            proc: Proc::spawn(cmd, "poolrelay sink"),
            dir,
            msg_dir,
            addr,
            stdout_path,
            stderr_path,
        };
        let mut proc = std::mem::replace(&mut sink.proc, Proc { child: None });
        wait_started(
            &mut proc,
            &[addr],
            &format!("poolrelay sink on {addr}"),
            || sink.logs(),
        );
        sink.proc = proc;
        sink
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The directory the `.eml` files land in.
    pub fn dir(&self) -> &Path {
        &self.msg_dir
    }

    fn eml_files(&self) -> Vec<PathBuf> {
        let rd = fs::read_dir(&self.msg_dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", self.msg_dir.display()));
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        files.sort();
        files
    }

    /// Number of complete messages received.
    pub fn count(&self) -> usize {
        self.eml_files().len()
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<SinkMessage> {
        self.eml_files()
            .into_iter()
            .map(|p| {
                let bytes =
                    fs::read(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
                parse_sink_file(&p, &bytes)
            })
            .collect()
    }

    /// The Message-IDs of every message received so far (one entry per message).
    pub fn message_ids(&self) -> Vec<String> {
        self.messages()
            .iter()
            .map(|m| {
                m.message_id()
                    .unwrap_or_else(|| format!("(no Message-ID in {})", m.file.display()))
            })
            .collect()
    }

    /// Waits until at least `n` messages arrived; returns them all.
    pub fn wait_for_count(&self, n: usize, deadline: Duration) -> Vec<SinkMessage> {
        if !poll_until(deadline, POLL_INTERVAL, || self.count() >= n) {
            panic!(
                "timed out after {deadline:?} waiting for {n} messages at the sink on {}: it has {}\n{}",
                self.addr,
                self.count(),
                self.logs()
            );
        }
        self.messages()
    }

    /// Waits until a message with this Message-ID arrived; returns it.
    pub fn wait_for_message_id(&self, id: &str, deadline: Duration) -> SinkMessage {
        let mut found = None;
        let ok = poll_until(deadline, POLL_INTERVAL, || {
            found = self
                .messages()
                .into_iter()
                .find(|m| m.message_id().as_deref() == Some(id));
            found.is_some()
        });
        match found {
            Some(m) if ok => m,
            _ => panic!(
                "timed out after {deadline:?} waiting for Message-ID <{id}> at the sink on {}; it has {:?}\n{}",
                self.addr,
                self.message_ids(),
                self.logs()
            ),
        }
    }

    /// The tail of the sink's output.
    pub fn logs(&self) -> String {
        format!(
            "--- sink {} stdout (tail) ---\n{}\n--- sink {} stderr (tail) ---\n{}\n",
            self.addr,
            file_tail(&self.stdout_path, LOG_TAIL_LINES),
            self.addr,
            file_tail(&self.stderr_path, LOG_TAIL_LINES)
        )
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.proc.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        keep_on_failure(&mut self.dir, "sink");
    }
}

// ---------------------------------------------------------------------------
// Postfix smtp-sink / smtp-source
// ---------------------------------------------------------------------------

fn postfix_tool(path: &str) -> PathBuf {
    let p = PathBuf::from(path);
    if !p.is_file() {
        panic!("{path} is missing: {POSTFIX_MISSING}");
    }
    p
}

/// An unprivileged user for `smtp-sink -u` when running as root.
fn unprivileged_user() -> &'static str {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    for user in ["nobody", "postfix"] {
        if passwd.lines().any(|l| l.split(':').next() == Some(user)) {
            return user;
        }
    }
    panic!(
        "running as root, smtp-sink needs -u USER, and neither nobody nor postfix exists in /etc/passwd"
    );
}

/// A message as Postfix's `smtp-sink -d` dumped it.
#[derive(Debug, Clone)]
pub struct PostfixMessage {
    /// The dump file.
    pub file: PathBuf,
    /// `X-Mail-Args:` (the MAIL FROM arguments, e.g. `<a@b> SIZE=123`).
    pub mail_args: String,
    /// `X-Rcpt-Args:` lines, in order.
    pub rcpt_args: Vec<String>,
    /// Everything after smtp-sink's own headers (its three-line `Received:` included).
    pub raw: String,
}

impl PostfixMessage {
    /// The first header field `name` of the message proper (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.raw, name)
    }

    /// The Message-ID without angle brackets.
    pub fn message_id(&self) -> Option<String> {
        self.header("Message-ID").map(|v| strip_brackets(&v))
    }
}

fn parse_postfix_dump(file: &Path, text: &str) -> PostfixMessage {
    let mut mail_args = String::new();
    let mut rcpt_args = Vec::new();
    let mut pos = 0;
    while pos < text.len() {
        let end = text[pos..]
            .find('\n')
            .map(|i| pos + i + 1)
            .unwrap_or(text.len());
        let line = text[pos..end].trim_end_matches(['\r', '\n']);
        if let Some(v) = line.strip_prefix("X-Mail-Args:") {
            mail_args = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("X-Rcpt-Args:") {
            rcpt_args.push(v.trim().to_string());
        } else if !line.starts_with("X-Client-") && !line.starts_with("X-Helo-Args:") {
            break;
        }
        pos = end;
    }
    // smtp-sink's own Received: header: "Received: ..." plus two folded lines.
    let mut rest = &text[pos..];
    if rest.starts_with("Received:") {
        let mut cut = rest.find('\n').map(|i| i + 1).unwrap_or(rest.len());
        while rest[cut..].starts_with([' ', '\t']) {
            cut = rest[cut..]
                .find('\n')
                .map(|i| cut + i + 1)
                .unwrap_or(rest.len());
        }
        rest = &rest[cut..];
    }
    PostfixMessage {
        file: file.to_path_buf(),
        mail_args,
        rcpt_args,
        raw: rest.to_string(),
    }
}

/// Postfix's `smtp-sink`, an independent SMTP server, dumping every
/// transaction to its own file (`-d DIR/%M%S.` plus a random suffix).
///
/// As root, smtp-sink requires `-u USER` and writes its dumps as that user,
/// so the dump directory is made world-writable (and its parent traversable).
/// smtp-sink writes a dump file while the transaction is in progress, so a
/// message counts as received only once its `Message-ID` header can be read.
pub struct PostfixSink {
    dir: TempDir,
    dump_dir: PathBuf,
    addr: SocketAddr,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    proc: Proc,
    /// file -> Message-ID, for files already seen complete.
    seen: Mutex<BTreeMap<PathBuf, String>>,
}

impl PostfixSink {
    /// Starts `/usr/sbin/smtp-sink` on a fresh loopback port and waits until
    /// it accepts. Panics (the test fails) when Postfix is not installed.
    pub fn start() -> PostfixSink {
        let bin = postfix_tool(SMTP_SINK);
        let dir = new_tempdir("poolrelay-smtp-sink-");
        set_mode(dir.path(), 0o755);
        let dump_dir = dir.path().join("dump");
        fs::create_dir_all(&dump_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dump_dir.display()));
        set_mode(&dump_dir, 0o777);
        let addr = free_addr();
        let stdout_path = dir.path().join("smtp-sink.stdout.log");
        let stderr_path = dir.path().join("smtp-sink.stderr.log");
        let (o, e) = log_files(&append_file(&stdout_path), &append_file(&stderr_path));
        let mut cmd = Command::new(bin);
        if is_root() {
            cmd.arg("-u").arg(unprivileged_user());
        }
        cmd.arg("-d")
            .arg(format!("{}/%M%S.", dump_dir.display()))
            .arg(format!("{addr}"))
            .arg("1000")
            .current_dir(dir.path())
            .stdout(o)
            .stderr(e);
        let mut sink = PostfixSink {
            proc: Proc::spawn(cmd, "smtp-sink"),
            dir,
            dump_dir,
            addr,
            stdout_path,
            stderr_path,
            seen: Mutex::new(BTreeMap::new()),
        };
        let mut proc = std::mem::replace(&mut sink.proc, Proc { child: None });
        wait_started(&mut proc, &[addr], &format!("smtp-sink on {addr}"), || {
            sink.logs()
        });
        sink.proc = proc;
        sink
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn dump_files(&self) -> Vec<PathBuf> {
        let rd = fs::read_dir(&self.dump_dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", self.dump_dir.display()));
        let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        v.sort();
        v
    }

    /// Every dumped message whose headers are complete.
    pub fn messages(&self) -> Vec<PostfixMessage> {
        self.dump_files()
            .into_iter()
            .filter_map(|p| {
                let bytes = fs::read(&p).ok()?;
                let text = String::from_utf8_lossy(&bytes);
                let m = parse_postfix_dump(&p, &text);
                m.message_id().is_some().then_some(m)
            })
            .collect()
    }

    /// Message-IDs received so far, one entry per dump file whose headers are
    /// complete (files already seen are not read again).
    pub fn message_ids(&self) -> Vec<String> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for p in self.dump_files() {
            if seen.contains_key(&p) {
                continue;
            }
            if let Ok(bytes) = fs::read(&p) {
                let text = String::from_utf8_lossy(&bytes);
                if let Some(id) = parse_postfix_dump(&p, &text).message_id() {
                    seen.insert(p, id);
                }
            }
        }
        seen.values().cloned().collect()
    }

    /// Waits (checking every 200 ms) until `n` distinct Message-IDs arrived;
    /// returns every Message-ID received (duplicates included).
    pub fn wait_for_distinct(&self, n: usize, deadline: Duration) -> Vec<String> {
        let distinct = |ids: &[String]| ids.iter().collect::<BTreeSet<_>>().len();
        if !poll_until(deadline, Duration::from_millis(200), || {
            distinct(&self.message_ids()) >= n
        }) {
            let ids = self.message_ids();
            panic!(
                "timed out after {deadline:?} waiting for {n} distinct messages at smtp-sink on {}: \
                 it has {} files, {} distinct Message-IDs\n{}",
                self.addr,
                ids.len(),
                distinct(&ids),
                self.logs()
            );
        }
        self.message_ids()
    }

    /// The tail of smtp-sink's output.
    pub fn logs(&self) -> String {
        format!(
            "--- smtp-sink {} stdout (tail) ---\n{}\n--- smtp-sink stderr (tail) ---\n{}\n",
            self.addr,
            file_tail(&self.stdout_path, 20),
            file_tail(&self.stderr_path, 20)
        )
    }
}

impl Drop for PostfixSink {
    fn drop(&mut self) {
        self.proc.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        keep_on_failure(&mut self.dir, "smtp-sink");
    }
}

/// The outcome of a finished command ([`run_with_deadline`], [`smtp_source`]).
#[derive(Debug)]
pub struct CommandOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl fmt::Display for CommandOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` (stdin empty, stdout and stderr captured to files) and waits
/// for it; kills it and panics when it runs longer than `deadline`.
pub fn run_with_deadline(cmd: Command, what: &str, deadline: Duration) -> CommandOutput {
    run_command(cmd, Stdio::null(), what, deadline)
}

fn run_command(mut cmd: Command, stdin: Stdio, what: &str, deadline: Duration) -> CommandOutput {
    let dir = new_tempdir("poolrelay-cmd-");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let (o, e) = log_files(&append_file(&out_path), &append_file(&err_path));
    cmd.stdout(o).stderr(e);
    let mut proc = Proc::spawn_with_stdin(cmd, what, stdin);
    let mut status = None;
    let finished = poll_until(deadline, POLL_INTERVAL, || {
        status = proc.exited();
        status.is_some()
    });
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    match status {
        Some(status) if finished => CommandOutput {
            status,
            stdout: read(&out_path),
            stderr: read(&err_path),
        },
        _ => {
            proc.kill();
            panic!(
                "{what} did not finish within {deadline:?}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
                file_tail(&out_path, 20),
                file_tail(&err_path, 20)
            );
        }
    }
}

/// Like [`run_with_deadline`], with `input` on the command's stdin.
pub fn run_with_input(cmd: Command, input: &[u8], what: &str, deadline: Duration) -> CommandOutput {
    let dir = new_tempdir("poolrelay-cmd-");
    let in_path = dir.path().join("stdin");
    fs::write(&in_path, input)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", in_path.display()));
    let stdin =
        File::open(&in_path).unwrap_or_else(|e| panic!("cannot open {}: {e}", in_path.display()));
    run_command(cmd, Stdio::from(stdin), what, deadline)
}

/// Where Prometheus's `promtool` is.
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// Runs `promtool ARGS` (with `stdin`, if any) and waits at most `deadline`.
/// Panics (the test fails) when promtool is not installed.
pub fn promtool(args: &[&str], stdin: Option<&[u8]>, deadline: Duration) -> CommandOutput {
    if !Path::new(PROMTOOL).is_file() {
        panic!(
            "{PROMTOOL} is missing: install Debian package prometheus (apt-get install prometheus)"
        );
    }
    let mut cmd = Command::new(PROMTOOL);
    cmd.args(args);
    let what = format!("promtool {}", args.join(" "));
    match stdin {
        Some(input) => run_with_input(cmd, input, &what, deadline),
        None => run_with_deadline(cmd, &what, deadline),
    }
}

/// The workspace root (where `deploy/`, `crates/` and `tests/` are).
pub fn workspace_root() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    p.canonicalize().unwrap_or(p)
}

/// Runs `/usr/sbin/smtp-source ARGS 127.0.0.1:PORT` (e.g. `["-s", "10",
/// "-m", "2000", "-f", "a@b", "-t", "c@d"]`) and waits for it to finish;
/// kills it and panics when it takes longer than `deadline`. Panics (the
/// test fails) when Postfix is not installed.
pub fn smtp_source(args: &[&str], target: SocketAddr, deadline: Duration) -> CommandOutput {
    let bin = postfix_tool(SMTP_SOURCE);
    let mut cmd = Command::new(bin);
    cmd.args(args).arg(target.to_string());
    run_with_deadline(
        cmd,
        &format!("smtp-source {} {target}", args.join(" ")),
        deadline,
    )
}

/// Runs `poolrelay ARGS` to completion (at most `deadline`).
pub fn poolrelay(args: &[&str], deadline: Duration) -> CommandOutput {
    let mut cmd = Command::new(binary());
    cmd.args(args);
    run_with_deadline(cmd, &format!("poolrelay {}", args.join(" ")), deadline)
}

// ---------------------------------------------------------------------------
// HTTP (the admin API) and the Prometheus text format
// ---------------------------------------------------------------------------

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header fields, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (chunked transfer coding removed).
    pub body: String,
}

impl HttpResponse {
    /// The first header field `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for HttpResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.body.trim_end())
    }
}

/// One HTTP/1.1 request over a plain `TcpStream` (`Connection: close`,
/// empty body, 10 s timeouts), with extra header lines `headers`.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method != "GET" && method != "HEAD" {
        request.push_str("Content-Length: 0\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

/// `GET path` (see [`http_request`]).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    http_request(addr, "GET", path, &[])
}

fn parse_http_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let bad = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "malformed HTTP response ({why}): {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            ),
        )
    };
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of header"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else {
        body.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&rest[..eol]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// One sample of the Prometheus text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, e.g. `poolrelay_delivery_seconds_bucket`.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// True when every `(name, value)` of `want` is one of its labels.
    pub fn matches(&self, want: &[(&str, &str)]) -> bool {
        want.iter()
            .all(|(k, v)| self.labels.get(*k).map(String::as_str) == Some(*v))
    }
}

/// Parses Prometheus text format (comments skipped). Panics on a line it
/// cannot read, quoting it.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(
            parse_sample(line).unwrap_or_else(|| panic!("cannot parse the metrics line {line:?}")),
        );
    }
    out
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let mut end = None;
        loop {
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = Some(*i + 1);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key.trim().to_string(), value);
        }
        rest = &r[end?..];
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The sum of the samples named `name` whose labels include `labels`;
/// `None` when there is no such sample.
pub fn metric_sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = false;
    let sum = samples
        .iter()
        .filter(|s| s.name == name && s.matches(labels))
        .inspect(|_| found = true)
        .map(|s| s.value)
        .sum();
    found.then_some(sum)
}

/// The metric family names in a scrape: every sample name, and for
/// histogram and summary series also the name without `_bucket`, `_sum`
/// or `_count`.
pub fn metric_names(samples: &[Sample]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for s in samples {
        names.insert(s.name.clone());
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = s.name.strip_suffix(suffix) {
                names.insert(base.to_string());
            }
        }
    }
    names
}

// ---------------------------------------------------------------------------
// A small blocking SMTP client
// ---------------------------------------------------------------------------

/// One SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The text of every line after the code, joined with `\n`.
    pub text: String,
}

impl Reply {
    /// The enhanced status code (`5.7.1`) at the start of the text, if any.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.text.split_whitespace().next()?;
        let parts: Vec<&str> = first.split('.').collect();
        (parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
        .then_some(first)
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The queue id of a `250 2.0.0 Ok: queued as ID` reply.
    pub fn queue_id(&self) -> Option<&str> {
        let i = self.text.find("queued as ")?;
        self.text[i + "queued as ".len()..]
            .split_whitespace()
            .next()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text.replace('\n', " / "))
    }
}

/// Why [`SmtpClient::send_mail`] did not get its 250.
#[derive(Debug)]
pub enum SmtpError {
    /// The connection failed (closed, reset, timed out).
    Io {
        /// The command or stage.
        stage: String,
        /// The error.
        error: io::Error,
    },
    /// The server answered with an unexpected code.
    Rejected {
        /// The command or stage (`MAIL`, `RCPT <x>`, `DATA`, `final dot`).
        stage: String,
        /// Its reply.
        reply: Reply,
    },
}

impl fmt::Display for SmtpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmtpError::Io { stage, error } => write!(f, "I/O error at {stage}: {error}"),
            SmtpError::Rejected { stage, reply } => write!(f, "{stage} got {reply}"),
        }
    }
}

impl std::error::Error for SmtpError {}

/// The wire form of a message for DATA: line endings made CRLF, lines
/// starting with `.` dot-stuffed, and the terminating `.` line appended.
pub fn data_bytes(message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 16);
    let body = message
        .strip_suffix('\n')
        .map(|m| m.strip_suffix('\r').unwrap_or(m))
        .unwrap_or(message);
    if !body.is_empty() {
        for line in body.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.starts_with('.') {
                out.push(b'.');
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// A blocking SMTP client with 10 s read and write timeouts.
pub struct SmtpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The server's greeting.
    pub greeting: Reply,
    greeted: bool,
}

impl SmtpClient {
    /// Connects to `addr` and reads the greeting.
    pub fn connect(addr: SocketAddr) -> io::Result<SmtpClient> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        SmtpClient::from_stream(stream)
    }

    /// Connects to `addr` from `local` (e.g. 127.0.0.2: the whole of
    /// 127.0.0.0/8 is on the loopback interface) and reads the greeting.
    pub fn connect_from(local: IpAddr, addr: SocketAddr) -> io::Result<SmtpClient> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(local, 0).into())?;
        socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
        SmtpClient::from_stream(socket.into())
    }

    fn from_stream(stream: TcpStream) -> io::Result<SmtpClient> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let greeting = read_reply_from(&mut reader)?;
        Ok(SmtpClient {
            reader,
            writer,
            greeting,
            greeted: false,
        })
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.writer.local_addr()
    }

    /// Writes raw bytes, as they are (no CRLF added, no dot-stuffing).
    pub fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }

    /// Reads one (possibly multi-line) reply.
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        read_reply_from(&mut self.reader)
    }

    /// Sends `line` + CRLF and reads the reply.
    pub fn try_cmd(&mut self, line: &str) -> io::Result<Reply> {
        self.write_bytes(format!("{line}\r\n").as_bytes())?;
        self.read_reply()
    }

    /// Sends `line` + CRLF and reads the reply; panics on I/O errors.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.try_cmd(line)
            .unwrap_or_else(|e| panic!("SMTP command {line:?}: no reply: {e}"))
    }

    /// `EHLO client.test`; panics unless 250.
    pub fn ehlo(&mut self) -> Reply {
        let r = self.cmd("EHLO client.test");
        assert_eq!(r.code, 250, "EHLO got {r}");
        self.greeted = true;
        r
    }

    /// One whole transaction: EHLO (once per connection), MAIL FROM, RCPT TO
    /// for each recipient, DATA, the message (see [`data_bytes`]). Returns
    /// the reply to the final dot when it is 2xx (e.g. `250 2.0.0 Ok: queued
    /// as ID`). On a rejected MAIL or RCPT the transaction is RSET so the
    /// connection can be reused.
    pub fn send_mail(
        &mut self,
        from: &str,
        rcpts: &[&str],
        message: &str,
    ) -> Result<Reply, SmtpError> {
        self.send_mail_with(from, rcpts, message, |_| {})
    }

    /// Like [`SmtpClient::send_mail`], calling `before_data(message)` right
    /// before the message bytes are written (after the 354): from then on
    /// the message may be queued even if no reply is seen.
    pub fn send_mail_with(
        &mut self,
        from: &str,
        rcpts: &[&str],
        message: &str,
        before_data: impl FnOnce(&str),
    ) -> Result<Reply, SmtpError> {
        let io = |stage: &str| {
            let stage = stage.to_string();
            move |error| SmtpError::Io { stage, error }
        };
        if !self.greeted {
            let r = self.try_cmd("EHLO client.test").map_err(io("EHLO"))?;
            if r.code != 250 {
                return Err(SmtpError::Rejected {
                    stage: "EHLO".into(),
                    reply: r,
                });
            }
            self.greeted = true;
        }
        let r = self
            .try_cmd(&format!("MAIL FROM:<{from}>"))
            .map_err(io("MAIL"))?;
        if !r.is_positive() {
            return Err(SmtpError::Rejected {
                stage: "MAIL".into(),
                reply: r,
            });
        }
        for rcpt in rcpts {
            let r = self
                .try_cmd(&format!("RCPT TO:<{rcpt}>"))
                .map_err(io("RCPT"))?;
            if !r.is_positive() {
                let _ = self.try_cmd("RSET");
                return Err(SmtpError::Rejected {
                    stage: format!("RCPT <{rcpt}>"),
                    reply: r,
                });
            }
        }
        let r = self.try_cmd("DATA").map_err(io("DATA"))?;
        if r.code != 354 {
            return Err(SmtpError::Rejected {
                stage: "DATA".into(),
                reply: r,
            });
        }
        before_data(message);
        self.write_bytes(&data_bytes(message))
            .map_err(io("message data"))?;
        let r = self.read_reply().map_err(io("final dot"))?;
        if !r.is_positive() {
            return Err(SmtpError::Rejected {
                stage: "final dot".into(),
                reply: r,
            });
        }
        Ok(r)
    }

    /// `QUIT`, ignoring errors.
    pub fn quit(mut self) {
        let _ = self.try_cmd("QUIT");
    }
}

fn read_reply_from(reader: &mut impl BufRead) -> io::Result<Reply> {
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let mut raw = Vec::new();
        let n = reader.by_ref().take(4096).read_until(b'\n', &mut raw)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed by the server (reply so far: {lines:?})"),
            ));
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\r', '\n']);
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed SMTP reply line {line:?}"),
            )
        };
        let c: u16 = line.get(..3).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
        if code.is_some_and(|prev| prev != c) {
            return Err(bad());
        }
        code = Some(c);
        let sep = line.as_bytes().get(3).copied();
        lines.push(line.get(4..).unwrap_or("").to_string());
        match sep {
            Some(b'-') => continue,
            None | Some(b' ') => break,
            Some(_) => return Err(bad()),
        }
    }
    Ok(Reply {
        code: code.unwrap_or(0),
        text: lines.join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_parsing_and_enhanced_codes() {
        let mut r = io::Cursor::new(
            b"250-relay.test\r\n250-SIZE 100\r\n250 2.0.0 Ok: queued as ABC123\r\n".to_vec(),
        );
        let reply = read_reply_from(&mut r).expect("reply");
        assert_eq!(reply.code, 250);
        assert_eq!(reply.queue_id(), Some("ABC123"));
        let r2 = Reply {
            code: 554,
            text: "5.7.1 Relay access denied".into(),
        };
        assert_eq!(r2.enhanced(), Some("5.7.1"));
        let r3 = Reply {
            code: 250,
            text: "Ok".into(),
        };
        assert_eq!(r3.enhanced(), None);
    }

    #[test]
    fn data_bytes_stuffs_dots_and_uses_crlf() {
        assert_eq!(
            data_bytes("a\n.b\r\nc\n"),
            b"a\r\n..b\r\nc\r\n.\r\n".to_vec()
        );
        assert_eq!(data_bytes(""), b".\r\n".to_vec());
    }

    #[test]
    fn sink_file_parsing() {
        let f = Path::new("x.eml");
        let m = parse_sink_file(
            f,
            b"X-Sink-From: <>\r\nX-Sink-To: <a@b>\r\nX-Sink-To: <c@d>\r\nSubject: hi\r\n there\r\nMessage-ID: <id@x>\r\n\r\nbody\r\n",
        );
        assert_eq!(m.from, "");
        assert_eq!(m.to, vec!["a@b".to_string(), "c@d".to_string()]);
        assert_eq!(m.subject().as_deref(), Some("hi there"));
        assert_eq!(m.message_id().as_deref(), Some("id@x"));
    }

    #[test]
    fn metrics_and_http_parsing() {
        let text = "# HELP x y\n# TYPE a_total counter\na_total{pool=\"A\",up=\"h:1\"} 7\n\
                    a_total{pool=\"B\",up=\"h:2\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\n\
                    g{l=\"q\\\"x\"} +Inf\nbare 1 1700000000\n";
        let m = parse_metrics(text);
        assert_eq!(m.len(), 6);
        assert_eq!(metric_sum(&m, "a_total", &[("pool", "A")]), Some(7.0));
        assert_eq!(metric_sum(&m, "a_total", &[]), Some(10.0));
        assert_eq!(metric_sum(&m, "a_total", &[("pool", "C")]), None);
        assert_eq!(m[4].labels["l"], "q\"x");
        assert_eq!(m[4].value, f64::INFINITY);
        assert_eq!(metric_sum(&m, "bare", &[]), Some(1.0));
        let names = metric_names(&m);
        assert!(names.contains("h") && names.contains("h_bucket") && names.contains("a_total"));
        let r = parse_http_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .expect("response");
        assert_eq!((r.status, r.body.as_str()), (200, "abcde"));
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    }

    #[test]
    fn postfix_dump_parsing() {
        let text = "X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Helo-Args: relay.test\n\
                    X-Mail-Args: <a@b> SIZE=12\nX-Rcpt-Args: <c@d>\nReceived: from relay.test ([127.0.0.1])\n\
                    \tby smtp-sink (smtp-sink) with ESMTP id 1234;\n\tSat, 28 Nov 2026 13:52:18 +0000 (UTC)\n\
                    Received: by relay.test\nMessage-Id: <1.2.3@vm>\n\nLa de da\n\n";
        let m = parse_postfix_dump(Path::new("d"), text);
        assert_eq!(m.mail_args, "<a@b> SIZE=12");
        assert_eq!(m.rcpt_args, vec!["<c@d>".to_string()]);
        assert_eq!(m.message_id().as_deref(), Some("1.2.3@vm"));
        assert!(m.raw.starts_with("Received: by relay.test"), "{:?}", m.raw);
    }
}

// ---------------------------------------------------------------------------
// Delivery engine tests (issue 3): scripted upstreams, a throwaway Postfix
// as upstream, delivery log lines and DSN parsing. Each lives in its own
// module file.
// ---------------------------------------------------------------------------

pub mod delivery;
pub mod postfix_upstream;
pub mod scripted;

// ---------------------------------------------------------------------------
// LISTSERV parity tests (issue 4): reference configurations, import-listserv,
// LISTSERV-shaped mail and a pipelined bulk sender. In its own module file.
// ---------------------------------------------------------------------------

pub mod listserv;
