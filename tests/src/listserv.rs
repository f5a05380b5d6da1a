//! Helpers for the LISTSERV parity tests (`tests/tests/listserv*.rs`; README.md,
//! "Coming from LISTSERV"):
//! the reference configurations, `poolrelay import-listserv` run against
//! them, a reader for `poolrelay check --print`, mail shaped as LISTSERV
//! sends it, a pipelined bulk sender, and "each message only at this sink".
//!
//! The reference inputs ("The three reference configurations") are kept with the importer's
//! golden files in `crates/config/tests/listserv/{ref1,ref2,ref3}/`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::command::{CommandOutput, poolrelay};
use crate::mail::unique_id;
use crate::process::workspace_root;
use crate::relay::{Relay, RelaySetup};
use crate::sink::Sink;
use crate::smtp_client::{IO_TIMEOUT, data_bytes};

/// How long a CLI run (import, check) may take.
pub const CLI_DEADLINE: Duration = Duration::from_secs(30);
/// How long a message may take to reach its sink in the routing tests.
pub const DELIVERY: Duration = Duration::from_secs(30);
/// The recipient of every test message.
pub const MEMBER: &str = "member@example.net";

// ---------------------------------------------------------------------------
// The reference configurations
// ---------------------------------------------------------------------------

/// One of the reference configurations.
#[derive(Debug, Clone)]
pub struct Reference {
    /// `ref1`, `ref2`, `ref3`.
    pub name: &'static str,
    /// Its `site.cfg`.
    pub site_cfg: PathBuf,
    /// Its list header files (`LISTNAME.list`), sorted.
    pub lists: Vec<PathBuf>,
    /// The golden TOML the importer must print with default options.
    pub expected_toml: PathBuf,
}

/// `crates/config/tests/listserv/NAME` as a [`Reference`].
pub fn reference(name: &'static str) -> Reference {
    let dir = workspace_root()
        .join("crates/config/tests/listserv")
        .join(name);
    let site_cfg = dir.join("site.cfg");
    assert!(
        site_cfg.is_file(),
        "the reference configuration {} is missing",
        site_cfg.display()
    );
    let mut lists: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "list"))
        .collect();
    lists.sort();
    Reference {
        name,
        site_cfg,
        lists,
        expected_toml: dir.join("expected.toml"),
    }
}

impl Reference {
    /// `SITE_CFG LIST...` as arguments.
    pub fn input_args(&self) -> Vec<String> {
        std::iter::once(&self.site_cfg)
            .chain(&self.lists)
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    }
}

/// Runs `poolrelay import-listserv ARGS`; panics unless it exits 0.
pub fn import_listserv(args: &[String]) -> CommandOutput {
    let mut all = vec!["import-listserv"];
    all.extend(args.iter().map(String::as_str));
    let out = poolrelay(&all, CLI_DEADLINE);
    assert!(
        out.status.success(),
        "poolrelay {} failed:\n{out}",
        all.join(" ")
    );
    out
}

/// The TOML `import-listserv` writes for `r` with the listener, admin and
/// spool of `setup` and `--host NAME=ADDR` for each of `hosts`. Panics when
/// the import warns: the reference configurations import cleanly.
pub fn import_for_relay(r: &Reference, setup: &RelaySetup, hosts: &[(&str, SocketAddr)]) -> String {
    let mut args = r.input_args();
    args.push("--listen".into());
    args.push(setup.listen.to_string());
    args.push("--admin".into());
    args.push(setup.admin.to_string());
    args.push("--spool-dir".into());
    args.push(setup.spool_dir.to_string_lossy().into_owned());
    for (name, addr) in hosts {
        args.push("--host".into());
        args.push(format!("{name}={addr}"));
    }
    let out = import_listserv(&args);
    assert!(
        !out.stderr.contains("warning"),
        "importing {} warned:\n{out}",
        r.name
    );
    out.stdout
}

/// Starts a relay on the config imported from `r`, its upstream host names
/// mapped to loopback sinks with `--host`.
pub fn start_imported(r: &Reference, hosts: &[(&str, &Sink)]) -> Relay {
    let hosts: Vec<(&str, SocketAddr)> = hosts.iter().map(|(n, s)| (*n, s.addr())).collect();
    Relay::start(|setup| import_for_relay(r, setup, &hosts))
}

// ---------------------------------------------------------------------------
// `poolrelay check --print`, read back
// ---------------------------------------------------------------------------

/// One line of the `upstreams:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrintedUpstream {
    /// `host:port`.
    pub host: String,
    /// Number of workers.
    pub workers: usize,
    /// Pools served, in order.
    pub pools: Vec<String>,
    /// Failover hosts.
    pub failover: Vec<String>,
    /// The window note (`00:00-05:00 (failover hosts outside)`), if any.
    pub window: Option<String>,
}

/// One line of the `routes` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrintedRoute {
    /// The matchers as printed (`sender owner-emergency@* and header Sender: *emergency@*`).
    pub matchers: String,
    /// The pool.
    pub pool: String,
}

/// What `check --print` (or `import-listserv --check`) shows.
#[derive(Debug, Clone, Default)]
pub struct Printed {
    /// The whole text, for failure messages.
    pub text: String,
    /// Pool name -> what follows `served by` (up to the retry column).
    pub pools: BTreeMap<String, String>,
    /// The `upstreams:` lines, in order.
    pub upstreams: Vec<PrintedUpstream>,
    /// The `fallback:` hosts.
    pub fallback: Vec<String>,
    /// `defaults: list_pool X`.
    pub list_pool: String,
    /// The numbered routes, in order.
    pub routes: Vec<PrintedRoute>,
    /// The `hosts (instead of DNS):` entries, name -> address.
    pub hosts: BTreeMap<String, String>,
    /// The `unmatched:` line, if printed.
    pub unmatched: Option<String>,
}

impl Printed {
    /// The upstream whose host is `host`; panics with the text when there is none.
    pub fn upstream(&self, host: &str) -> &PrintedUpstream {
        self.upstreams
            .iter()
            .find(|u| u.host == host)
            .unwrap_or_else(|| panic!("no upstream {host} in:\n{}", self.text))
    }

    /// `served by ...` of pool `name`; panics when the pool is not printed.
    pub fn served_by(&self, name: &str) -> &str {
        self.pools
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no pool {name} in:\n{}", self.text))
    }
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Reads the text of `check --print`. Panics on a section line it cannot read.
pub fn parse_printed(text: &str) -> Printed {
    let mut p = Printed {
        text: text.to_string(),
        ..Printed::default()
    };
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') {
            section = "";
            if let Some(rest) = line.strip_prefix("fallback: ") {
                if rest.trim() != "none" {
                    p.fallback = list(rest);
                }
            } else if let Some(rest) = line.strip_prefix("defaults: list_pool ") {
                p.list_pool = rest.split_whitespace().next().unwrap_or("").to_string();
            } else if let Some(rest) = line.strip_prefix("hosts (instead of DNS): ") {
                for entry in rest.split(", ") {
                    if let Some((n, a)) = entry.split_once(" -> ") {
                        p.hosts.insert(n.trim().to_string(), a.trim().to_string());
                    }
                }
            } else if line.starts_with("pools:") {
                section = "pools";
            } else if line.starts_with("upstreams:") {
                section = "upstreams";
            } else if line.starts_with("routes") {
                section = "routes";
            }
            continue;
        }
        let body = line.trim();
        match section {
            "pools" => {
                let name = body.split_whitespace().next().unwrap_or("").to_string();
                let served = body
                    .rsplit_once("served by ")
                    .map(|(_, s)| s.split("   ").next().unwrap_or("").trim().to_string())
                    .unwrap_or_else(|| body.to_string());
                p.pools.insert(name, served);
            }
            "upstreams" => {
                if body.starts_with("none") {
                    continue;
                }
                let fields: Vec<&str> = body.split("  ").map(str::trim).collect();
                let host = fields.first().copied().unwrap_or_default().to_string();
                let workers: usize = fields
                    .get(1)
                    .and_then(|f| f.split_whitespace().next())
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or_else(|| panic!("cannot read the upstream line {line:?}"));
                let mut u = PrintedUpstream {
                    host,
                    workers,
                    pools: Vec::new(),
                    failover: Vec::new(),
                    window: None,
                };
                for f in &fields[2..] {
                    if let Some(v) = f.strip_prefix("pools ") {
                        u.pools = list(v);
                    } else if let Some(v) = f.strip_prefix("failover ") {
                        u.failover = list(v);
                    } else if let Some(v) = f.strip_prefix("window ") {
                        u.window = Some(v.to_string());
                    }
                }
                p.upstreams.push(u);
            }
            "routes" => {
                if let Some(rest) = body.strip_prefix("unmatched: ") {
                    p.unmatched = Some(rest.to_string());
                    continue;
                }
                if body.starts_with("listener ") {
                    continue;
                }
                // "N. line L  MATCHERS  -> POOL"
                let (head, pool) = body
                    .rsplit_once("  -> ")
                    .unwrap_or_else(|| panic!("cannot read the route line {line:?}"));
                let matchers = head
                    .split_once("  ")
                    .map(|(_, m)| m.trim().to_string())
                    .unwrap_or_default();
                p.routes.push(PrintedRoute {
                    matchers,
                    pool: pool.trim().to_string(),
                });
            }
            _ => {}
        }
    }
    p
}

// ---------------------------------------------------------------------------
// Mail as LISTSERV sends it
// ---------------------------------------------------------------------------

/// One message as LISTSERV would hand it to its smarthost.
#[derive(Debug, Clone)]
pub struct ListservMail {
    /// What it is, for failure messages (`posting to EMERGENCY`).
    pub what: String,
    /// Envelope sender (`""` = `<>`).
    pub envelope_from: String,
    /// The message (headers and body, CRLF).
    pub text: String,
    /// Its Message-ID, without brackets.
    pub id: String,
}

fn rfc5322(id: &str, headers: &[String], body: &str) -> String {
    let mut m = String::new();
    for h in headers {
        m.push_str(h);
        m.push_str("\r\n");
    }
    m.push_str(&format!(
        "Message-ID: <{id}>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ));
    for line in body.lines() {
        m.push_str(line);
        m.push_str("\r\n");
    }
    m
}

/// How a posting names its list in `Sender:`.
#[derive(Debug, Clone, Copy)]
pub enum SenderForm {
    /// `Sender: LIST@HOST`
    Bare,
    /// `Sender: "LIST list" <LIST@HOST>`
    Named,
}

/// A posting to `list` at `host`: envelope `owner-LIST@HOST`, `Sender:`
/// naming `LIST@HOST`, `From:` the member who wrote it.
pub fn posting(list: &str, host: &str, form: SenderForm) -> ListservMail {
    let id = unique_id(&format!("posting-{}", list.to_ascii_lowercase()));
    let sender = match form {
        SenderForm::Bare => format!("Sender: {list}@{host}"),
        SenderForm::Named => format!("Sender: \"{list} list\" <{list}@{host}>"),
    };
    let headers = vec![
        "From: Jane Doe <jane@example.net>".to_string(),
        sender,
        format!("Reply-To: {list}@{host}"),
        format!("To: {list}@{host}"),
        format!("Subject: posting to {list} ({form:?} Sender)"),
    ];
    ListservMail {
        what: format!("posting to {list}@{host} ({form:?} Sender)"),
        envelope_from: format!("owner-{list}@{host}"),
        text: rfc5322(&id, &headers, "A posting distributed by LISTSERV."),
        id,
    }
}

/// Administrative mail of `list` (a welcome message): envelope
/// `owner-LIST@HOST`, no `Sender:` header, `From:` LISTSERV itself.
pub fn admin_mail(list: &str, host: &str) -> ListservMail {
    let id = unique_id(&format!("admin-{}", list.to_ascii_lowercase()));
    let headers = vec![
        format!("From: \"L-Soft list server at {host}\" <LISTSERV@{host}>"),
        "To: Jane Doe <jane@example.net>".to_string(),
        format!("Subject: You are now subscribed to the {list} list"),
    ];
    ListservMail {
        what: format!("administrative mail of {list}@{host}"),
        envelope_from: format!("owner-{list}@{host}"),
        text: rfc5322(&id, &headers, "Welcome to the list."),
        id,
    }
}

/// A command reply: envelope `LISTSERV@HOST`.
pub fn command_reply(host: &str) -> ListservMail {
    let id = unique_id("command-reply");
    let headers = vec![
        format!("From: \"L-Soft list server at {host}\" <LISTSERV@{host}>"),
        "To: Jane Doe <jane@example.net>".to_string(),
        "Subject: Output of your job \"jane\"".to_string(),
    ];
    ListservMail {
        what: format!("command reply from LISTSERV@{host}"),
        envelope_from: format!("LISTSERV@{host}"),
        text: rfc5322(
            &id,
            &headers,
            "> SUBSCRIBE EMERGENCY\nYou are now subscribed.",
        ),
        id,
    }
}

/// A bounce: envelope sender `<>`.
pub fn null_sender_mail(host: &str) -> ListservMail {
    let id = unique_id("null-sender");
    let headers = vec![
        format!("From: Mail Delivery Subsystem <MAILER-DAEMON@{host}>"),
        "To: Jane Doe <jane@example.net>".to_string(),
        "Subject: Undelivered Mail Returned to Sender".to_string(),
    ];
    ListservMail {
        what: "bounce from <>".to_string(),
        envelope_from: String::new(),
        text: rfc5322(&id, &headers, "The message could not be delivered."),
        id,
    }
}

/// Sends `mail` to [`MEMBER`] through the relay's first listener.
pub fn send(relay: &Relay, mail: &ListservMail) {
    let r = relay.send(&mail.envelope_from, &[MEMBER], &mail.text);
    assert_eq!(r.code, 250, "{}: the final dot got {r}", mail.what);
}

/// Where one message arrived: the sink's name, envelope sender and recipients.
type Arrival<'a> = (&'a str, String, Vec<String>);

/// Waits until every one of `mails` arrived at some sink, then checks that
/// each arrived exactly once, only at the sink named with it, with its
/// envelope sender and recipient intact, and that nothing else arrived.
pub fn assert_only_at(relay: &Relay, sinks: &[(&str, &Sink)], mails: &[(&ListservMail, &str)]) {
    let total = || sinks.iter().map(|(_, s)| s.count()).sum::<usize>();
    relay.wait_until(
        &format!("{} messages to arrive over the sinks", mails.len()),
        DELIVERY,
        || total() >= mails.len(),
    );
    let mut found: BTreeMap<String, Vec<Arrival>> = BTreeMap::new();
    for (name, sink) in sinks {
        for m in sink.messages() {
            let id = m
                .message_id()
                .unwrap_or_else(|| format!("(no Message-ID in {})", m.file.display()));
            found.entry(id).or_default().push((name, m.from, m.to));
        }
    }
    let mut problems = Vec::new();
    for (mail, want) in mails {
        match found.get(&mail.id).map(Vec::as_slice) {
            Some([(got, from, to)]) if got == want => {
                if from != &mail.envelope_from || to != &[MEMBER.to_string()] {
                    problems.push(format!(
                        "{}: arrived at {want} as <{from}> -> {to:?}, expected <{}> -> [{MEMBER}]",
                        mail.what, mail.envelope_from
                    ));
                }
            }
            got => {
                let at: Vec<&str> = got
                    .unwrap_or_default()
                    .iter()
                    .map(|(sink, _, _)| *sink)
                    .collect();
                problems.push(format!(
                    "{} <{}>: expected only at {want}, found at {at:?}",
                    mail.what, mail.id
                ));
            }
        }
    }
    for (id, at) in &found {
        if !mails.iter().any(|(m, _)| &m.id == id) {
            let at: Vec<&str> = at.iter().map(|(sink, _, _)| *sink).collect();
            problems.push(format!("unexpected message <{id}> at {at:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "mail left through the wrong host:\n{}\n{}",
        problems.join("\n"),
        relay.logs()
    );
}

// ---------------------------------------------------------------------------
// A pipelined bulk sender
// ---------------------------------------------------------------------------

/// Sends `count` messages from `from` to [`MEMBER`] over `connections`
/// parallel connections, each using PIPELINING (RFC 2920): the message
/// content, the next MAIL, RCPT and DATA go out in one write, so a message
/// costs one round trip. `make(i)` gives message `i`. Panics on any reply
/// that is not the expected one. Returns how long it took.
pub fn bulk_send(
    addr: SocketAddr,
    connections: usize,
    count: usize,
    from: &str,
    make: &(dyn Fn(usize) -> String + Sync),
) -> Duration {
    let start = Instant::now();
    let connections = connections.max(1);
    std::thread::scope(|scope| {
        for c in 0..connections {
            let mine: Vec<usize> = (0..count).filter(|i| i % connections == c).collect();
            scope.spawn(move || pipelined_connection(addr, from, &mine, make));
        }
    });
    start.elapsed()
}

fn pipelined_connection(
    addr: SocketAddr,
    from: &str,
    indices: &[usize],
    make: &(dyn Fn(usize) -> String + Sync),
) {
    if indices.is_empty() {
        return;
    }
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("bulk sender: cannot connect to {addr}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok();
    stream.set_write_timeout(Some(IO_TIMEOUT)).ok();
    stream.set_nodelay(true).ok();
    let mut writer = stream
        .try_clone()
        .unwrap_or_else(|e| panic!("bulk sender: {e}"));
    let mut reader = BufReader::new(stream);
    let mut read = |what: &str, want: u16| {
        loop {
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("bulk sender: no reply to {what} from {addr}: {e}"));
            assert!(n > 0, "bulk sender: {addr} closed the connection at {what}");
            let code: u16 = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            if line.as_bytes().get(3) != Some(&b'-') {
                assert_eq!(code, want, "bulk sender: {what} got {:?}", line.trim_end());
                return;
            }
        }
    };
    let mut send = |bytes: &[u8]| {
        writer
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("bulk sender: cannot write to {addr}: {e}"))
    };
    read("the greeting", 220);
    send(b"EHLO bulk.test\r\n");
    read("EHLO", 250);
    let envelope = format!("MAIL FROM:<{from}>\r\nRCPT TO:<{MEMBER}>\r\nDATA\r\n");
    send(envelope.as_bytes());
    for (k, &i) in indices.iter().enumerate() {
        read("MAIL", 250);
        read("RCPT", 250);
        read("DATA", 354);
        let mut group = data_bytes(&make(i));
        let last = k + 1 == indices.len();
        if !last {
            group.extend_from_slice(envelope.as_bytes());
        }
        send(&group);
        read("the final dot", 250);
    }
    send(b"QUIT\r\n");
}
