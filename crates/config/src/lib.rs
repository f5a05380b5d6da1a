//! The poolrelay configuration: the TOML file, parsed with line-accurate
//! errors and validated into a resolved [`Config`] that the engine can use
//! without further checks. Settings the SMTP client takes as they are
//! (TLS mode, stage timeouts, AUTH credentials) use the `poolrelay-smtp`
//! types, so there is one type per concept from file to wire.
//!
//! Sizes are strings such as `"50MB"`, durations strings such as `"5m"`,
//! bandwidths strings such as `"1.5Mbps"`. The unit parsers are public
//! ([`parse_size`], [`parse_duration`], [`parse_bandwidth`], [`parse_window`],
//! [`normalize_host`]) for tools that write configs, such as the LISTSERV importer
//! ([`import_listserv`]), which turns a LISTSERV `site.cfg` and list headers
//! into a commented config of this format.
//!
//! Conveniences: unit keys also take a bare TOML number
//! (`max_age = 3600` is seconds, `max_message_size = 1048576` bytes), a route
//! `sender = "<>"` means the null sender like `""`, and a window may end at `24:00`.

#![warn(missing_docs)]

mod describe;
mod dkim;
mod listserv;
mod raw;
mod units;
mod users;
mod validate;

pub use dkim::{
    DEFAULT_DKIM_HEADERS, Dkim, DkimAlgorithm, DkimKey, MIN_RSA_BITS, domain_within,
    signing_entries,
};
pub use listserv::{Import, ImportOptions, import_listserv, parse_list_arg};
pub use units::{
    format_bandwidth, format_duration, format_size, normalize_host, parse_bandwidth,
    parse_duration, parse_mt_priority_range, parse_size, parse_window,
};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use ipnet::IpNet;
pub use poolrelay_smtp::MtPriorityPolicy;
pub use poolrelay_smtp::inbound::AuthPolicy;
pub use poolrelay_smtp::outbound::{Credentials, Timeouts, TlsMode};
pub use users::{UsersFile, hash_password};

/// The name of the default pool: command replies, rejections, bounces.
pub const DEFAULT_POOL: &str = "-";

/// A configuration error, rendered as `FILE:LINE: what is wrong; what to
/// write instead` (or `FILE: ...` for an error about the whole file, such
/// as one that cannot be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the error is in.
    pub file: PathBuf,
    /// 1-based line of the offending key or table (0 when not tied to a line).
    pub line: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// `[server]`.
    pub server: Server,
    /// `[[listener]]`, in file order; at least one.
    pub listeners: Vec<Listener>,
    /// `[admin]`.
    pub admin: Admin,
    /// `[defaults]`.
    pub defaults: Defaults,
    /// Every pool: those declared with `[pool.X]` plus `-`, which always exists.
    pub pools: BTreeMap<String, Pool>,
    /// `[[upstream]]`, in file order.
    pub upstreams: Vec<Upstream>,
    /// `[[route]]`, in file order: first match wins.
    pub routes: Vec<Route>,
    /// `[user.NAME]`, by name.
    pub users: BTreeMap<String, User>,
    /// `[[dkim]]`, in file order: the signing keys.
    pub dkim: Vec<Dkim>,
    /// `[spool] backend`: where queued mail is kept.
    pub spool: SpoolBackend,
}

/// `[spool] backend`: the store behind the queue.
#[derive(Debug, Clone, PartialEq)]
pub enum SpoolBackend {
    /// `"fjall"` (the default): the embedded store in `server.spool_dir`.
    Fjall,
    /// `"jetstream"`: a NATS JetStream cluster several relays share.
    JetStream(JetStream),
}

/// `[spool]` with `backend = "jetstream"`.
#[derive(Debug, Clone, PartialEq)]
pub struct JetStream {
    /// `servers`: `nats://host:port` URLs of the cluster; at least one.
    pub servers: Vec<String>,
    /// `replicas`: copies of every stream and bucket, 1..=5. Default 3.
    pub replicas: usize,
    /// `stream_prefix`: prefix of every stream, bucket and subject name,
    /// `[A-Za-z0-9_-]`. Default `poolrelay`.
    pub stream_prefix: String,
    /// `ack_timeout`: how long an accepted message's 250 waits for the
    /// cluster's acknowledgement before the client gets `451 4.3.0`. Default 5s.
    pub ack_timeout: Duration,
    /// `credentials_file`: a NATS `.creds` file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// `tls_ca_file`: PEM CA certificates the servers' TLS certificates
    /// are checked against (for `tls://` servers).
    pub tls_ca_file: Option<PathBuf>,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    /// Banner, EHLO name, DSN sender domain. Default: the machine's host name, else `localhost`.
    pub hostname: String,
    /// Spool directory; relative paths are relative to the current directory. Default `var/spool`.
    pub spool_dir: PathBuf,
    /// Optional IANA time zone name for windows (`server.timezone`); `None` = local time.
    pub timezone: Option<String>,
    /// Cap on concurrent inbound SMTP sessions over all listeners. Default 1000.
    pub max_sessions: usize,
    /// Cap on concurrent inbound sessions from one client IP address. Default 20.
    pub max_sessions_per_client: usize,
    /// Idle time allowed between commands (`command_timeout`). Default 5m (RFC 5321 §4.5.3.2.7).
    pub command_timeout: Duration,
    /// Idle time allowed between data blocks (`data_timeout`). Default 3m.
    pub data_timeout: Duration,
    /// Longest command line accepted, CRLF included (`max_line_length`). Default 2048.
    pub max_line_length: usize,
    /// Most `Received:` fields an inbound message may carry (`max_hops`); beyond, a mail loop. Default 50.
    pub max_hops: usize,
    /// Test/migration aid (`hosts`): host name -> "ip:port" or "ip", used
    /// instead of DNS for upstream names (case-insensitive keys, stored lowercase).
    pub hosts: BTreeMap<String, String>,
    /// `dns_servers`: the name servers upstream names are resolved with
    /// (UDP and TCP); empty = the system's resolv.conf. Read once
    /// at start: a reload keeps the resolver the process started with.
    pub dns_servers: Vec<std::net::SocketAddr>,
    /// `spool_min_free`: below this much free space on the spool's
    /// filesystem, new mail is refused with 452 4.3.1 before anything is written.
    pub spool_min_free: MinFree,
    /// `max_data_memory`: message content held in memory over all sessions
    /// (DATA in progress and messages being written to the spool); beyond
    /// it a message is read to its end and refused with 452 4.3.1. Default 128MB.
    pub max_data_memory: u64,
}

/// A free-space floor: `"256MB"` or `"5%"` of the filesystem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    /// The default: 256 MB or 5% of the filesystem, whichever is smaller
    /// (so a small disk is not full from the start).
    Default,
    /// A size in bytes.
    Bytes(u64),
    /// A share of the filesystem's size, in percent.
    Percent(f64),
}

impl MinFree {
    /// The floor in bytes for a filesystem of `total` bytes.
    pub fn bytes_of(self, total: u64) -> u64 {
        let percent = |p: f64| (total as f64 * p / 100.0) as u64;
        match self {
            MinFree::Default => (256 << 20).min(percent(5.0)),
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => percent(p),
        }
    }
}

impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MinFree::Default => write!(f, "256MB or 5%, whichever is smaller"),
            MinFree::Bytes(b) => write!(f, "{b} bytes"),
            MinFree::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// `[[listener]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// `name`, default: the address as written. Used in metrics and routes.
    pub name: String,
    /// `address`.
    pub address: SocketAddr,
    /// `relay_from`: who may relay. Default loopback only (`127.0.0.0/8`, `::1/128`).
    pub relay_from: Vec<IpNet>,
    /// `pool`: everything accepted here goes to this pool.
    pub pool: Option<String>,
    /// `max_message_size` in bytes. Default 50MB.
    pub max_message_size: u64,
    /// `max_recipients` per envelope. Default 1000.
    pub max_recipients: usize,
    /// `tls_cert`, `tls_key`, `tls`: `None` when the listener speaks plain SMTP only.
    pub tls: Option<ListenerTls>,
    /// `require_tls`: MAIL before STARTTLS gets `530 5.7.0`. Default false.
    pub require_tls: bool,
    /// `auth`: off, optional or required. Default off.
    pub auth: AuthPolicy,
    /// `users_file`: who may AUTH, read with the config.
    pub users_file: Option<std::sync::Arc<UsersFile>>,
    /// `auth_plaintext`: offer AUTH without TLS. Default false.
    pub auth_plaintext: bool,
    /// `mt_priority`: the MT-PRIORITY policy advertised in EHLO (RFC 6710).
    /// None (the default): the extension is off.
    pub mt_priority: Option<MtPriorityPolicy>,
    /// `mt_priority_trusted`: clients whose MT-PRIORITY values above 0 are
    /// honoured (others are lowered to 0). Default: `relay_from`.
    pub mt_priority_trusted: Vec<IpNet>,
    /// Line of the `[[listener]]` header.
    pub line: usize,
}

/// How a listener starts TLS (`tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerTlsMode {
    /// `starttls`: plain first, TLS after the client's STARTTLS (RFC 3207).
    Starttls,
    /// `implicit`: TLS from the first byte (port 465, RFC 8314).
    Implicit,
}

impl ListenerTlsMode {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            ListenerTlsMode::Starttls => "starttls",
            ListenerTlsMode::Implicit => "implicit",
        }
    }
}

/// A listener's TLS: its files and the certificate read from them when
/// the config was loaded (again on every reload).
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    /// `tls`.
    pub mode: ListenerTlsMode,
    /// `tls_cert`: PEM chain, leaf first.
    pub cert: PathBuf,
    /// `tls_key`: PEM private key.
    pub key: PathBuf,
    /// The loaded certificate and key.
    pub server: poolrelay_smtp::ServerTls,
}

/// `[user.NAME]`: settings of a user who authenticates with AUTH.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// `pool`: everything this user sends goes to this pool (before the
    /// listener's pool and the routes).
    pub pool: Option<String>,
    /// Line of the `[user.NAME]` header.
    pub line: usize,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    /// `address`, default `127.0.0.1:9025`.
    pub address: SocketAddr,
    /// `token_file`: bearer token every `/api/v1` call must carry.
    pub token_file: Option<PathBuf>,
    /// `allow_unauthenticated`: accept a non-loopback `address` without a
    /// `token_file`. Default false.
    pub allow_unauthenticated: bool,
}

/// `[defaults]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    /// `list_pool`: pool for `owner-*@` senders no route claims; always a known pool.
    /// Default `A` when `[pool.A]` is declared, else `-`.
    pub list_pool: String,
    /// `fallback`: site-wide fallback hosts ("host:port"; port defaults to 25).
    pub fallback: Vec<String>,
    /// `retry`: the retry schedule; the last step repeats. Default 1m 5m 15m 30m 1h 2h 4h.
    pub retry: Vec<Duration>,
    /// `max_age`. Default 5d.
    pub max_age: Duration,
    /// `rate_limit`: server-wide bandwidth in bits per second.
    pub rate_limit: Option<u64>,
    /// `delay_warning`: send a "delayed" DSN once a message has waited this
    /// long (to recipients that asked NOTIFY=DELAY, or by default). Off when None.
    pub delay_warning: Option<Duration>,
    /// `lower_priority_share`: the share of a shared worker's deliveries a
    /// pool with ready mail keeps while higher-priority pools have ready
    /// mail too, as a fraction. Default 0.10 (`"10%"`).
    pub lower_priority_share: f64,
}

/// `[pool.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// The pool name: `A`-`Z`, `-`, or `[A-Za-z0-9_]+`.
    pub name: String,
    /// `description`.
    pub description: String,
    /// `rate_limit` in bits per second.
    pub rate_limit: Option<u64>,
    /// `retry`, overriding `defaults.retry`.
    pub retry: Option<Vec<Duration>>,
    /// `max_age`, overriding `defaults.max_age`.
    pub max_age: Option<Duration>,
    /// `max_messages_per_second`.
    pub max_messages_per_second: Option<f64>,
    /// `max_recipients_per_hour`.
    pub max_recipients_per_hour: Option<u64>,
    /// `priority`, -9 to 9, default 0: a worker serving several pools takes
    /// mail of its highest-priority pool first.
    pub priority: i8,
    /// `lower_priority_share`, overriding `defaults.lower_priority_share`.
    pub lower_priority_share: Option<f64>,
    /// `fallback`: whether this pool's mail may leave through
    /// `defaults.fallback` when its upstreams' hosts are down. Default true.
    pub fallback: bool,
    /// `arc_seal`: add an ARC set (RFC 8617) to this pool's mail at
    /// acceptance, with the first RSA `[[dkim]]` entry naming this pool. Default false.
    pub arc_seal: bool,
    /// Line of the `[pool.X]` header (0 for the implicit `-`).
    pub line: usize,
}

/// A time-of-day window, `"hh:mm-hh:mm"`; may cross midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Start, minutes after midnight.
    pub start_minute: u16,
    /// End, minutes after midnight (exclusive).
    pub end_minute: u16,
}

/// `[[upstream]]`: a group of workers delivering through one host.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// `host`, normalised to "host:port" (port 25 when omitted).
    pub host: String,
    /// `workers`, default 1.
    pub workers: usize,
    /// `reserve_workers`: how many of `workers` serve only pools above
    /// priority 0. Default 0.
    pub reserve_workers: usize,
    /// `pools` served; omitted = every pool.
    pub pools: Vec<String>,
    /// `failover` hosts in order, "host:port".
    pub failover: Vec<String>,
    /// `window`.
    pub window: Option<Window>,
    /// `tls`.
    pub tls: TlsMode,
    /// `max_messages_per_connection`, default 100.
    pub max_messages_per_connection: usize,
    /// `idle_timeout`: close an unused connection after this long. Default 10s.
    pub idle_timeout: Duration,
    /// Timeouts per SMTP stage, each field from the key of its name plus
    /// `_timeout` (`connect_timeout`, `greeting_timeout`, `ehlo_timeout`,
    /// `mail_timeout`, `rcpt_timeout`, `data_init_timeout`,
    /// `data_block_timeout`, `data_end_timeout`); [`Timeouts::default`]
    /// (RFC 5321 §4.5.3.2) for those not given.
    pub timeouts: Timeouts,
    /// `tls_verify`: check the upstream's certificate against its name. Default true.
    pub tls_verify: bool,
    /// `tls_ca_file`: extra trusted CA certificates (PEM) for a private smarthost.
    pub tls_ca_file: Option<PathBuf>,
    /// `auth = { username, password_file }`: AUTH PLAIN/LOGIN towards
    /// this upstream. The password is read from `password_file` when the
    /// config is loaded (so at start and on reload; a trailing newline is
    /// ignored); `allow_plaintext` is `auth_plaintext` (allow AUTH without
    /// TLS, default false).
    pub auth: Option<Credentials>,
    /// `auth.password_file` as written, for messages about the password.
    pub auth_password_file: Option<PathBuf>,
    /// `mx`: when `host` has no port, deliver to its MX hosts. Default false.
    pub mx: bool,
    /// Line of the `[[upstream]]` header.
    pub line: usize,
}

/// A header matcher of a route: `header = { name = "Sender", value = "*@x" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Header field name, matched case-insensitively.
    pub name: String,
    /// Case-insensitive glob on the unfolded value.
    pub value: String,
}

/// A route's `mt_priority` matcher: the MT-PRIORITY values it matches,
/// both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MtPriorityRange {
    /// Lowest value matched, -9 or more.
    pub min: i8,
    /// Highest value matched, 9 or less.
    pub max: i8,
}

impl MtPriorityRange {
    /// Whether `value` is in the range.
    pub fn contains(self, value: i8) -> bool {
        (self.min..=self.max).contains(&value)
    }
}

impl std::fmt::Display for MtPriorityRange {
    /// In the matcher syntax: `5`, `>= 5`, `<= -1` or `3..9`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.min, self.max) {
            (a, b) if a == b => write!(f, "{a}"),
            (a, 9) => write!(f, ">= {a}"),
            (-9, b) => write!(f, "<= {b}"),
            (a, b) => write!(f, "{a}..{b}"),
        }
    }
}

impl Route {
    /// A route without matchers takes every message.
    pub fn is_catch_all(&self) -> bool {
        self.sender.is_none()
            && self.recipient.is_none()
            && self.header.is_none()
            && self.listener.is_none()
            && self.user.is_none()
            && self.mt_priority.is_none()
    }
}

/// `[[route]]`: every matcher given must match; first matching route wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `pool` the message goes to.
    pub pool: String,
    /// `sender`: case-insensitive glob on the envelope sender; `""` = the null sender.
    pub sender: Option<String>,
    /// `recipient`: case-insensitive glob; matches when any recipient matches.
    pub recipient: Option<String>,
    /// `header`.
    pub header: Option<HeaderMatch>,
    /// `listener`: name of the listener the message came in on.
    pub listener: Option<String>,
    /// `user`: case-insensitive glob on the user the client authenticated
    /// as; never matches mail sent without AUTH.
    pub user: Option<String>,
    /// `mt_priority`: the message's MT-PRIORITY (0 when it has none, as
    /// RFC 6710 says) is in this range.
    pub mt_priority: Option<MtPriorityRange>,
    /// Line of the `[[route]]` header, shown in logs as the route that matched.
    pub line: usize,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            message: format!("cannot read the config file: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` is used in errors only.
    /// Upstream password files named in it are read.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        validate::build(text, path)
    }

    /// The human summary `poolrelay check --print` shows: listeners, pools
    /// with the upstreams and workers that serve them, upstreams, routes in order.
    pub fn describe(&self) -> String {
        describe::describe(self)
    }

    /// Pool names in display order: named pools sorted, then `-`.
    pub fn pool_names(&self) -> Vec<String> {
        validate::pool_order(&self.pools)
    }

    /// The upstreams whose workers serve `pool`, in file order.
    pub fn upstreams_for<'a>(&'a self, pool: &'a str) -> impl Iterator<Item = &'a Upstream> + 'a {
        self.upstreams
            .iter()
            .filter(move |u| u.pools.iter().any(|p| p == pool))
    }

    /// Retry schedule of a pool (its own or the defaults).
    pub fn retry_for(&self, pool: &str) -> &[Duration] {
        self.pools
            .get(pool)
            .and_then(|p| p.retry.as_deref())
            .unwrap_or(&self.defaults.retry)
    }

    /// `priority` of a pool (0 for a pool not in the config).
    pub fn priority_of(&self, pool: &str) -> i8 {
        self.pools.get(pool).map_or(0, |p| p.priority)
    }

    /// `lower_priority_share` of a pool (its own or the defaults), a fraction.
    pub fn lower_priority_share_of(&self, pool: &str) -> f64 {
        self.pools
            .get(pool)
            .and_then(|p| p.lower_priority_share)
            .unwrap_or(self.defaults.lower_priority_share)
    }

    /// Whether a pool's mail may leave through `defaults.fallback`.
    pub fn fallback_allowed(&self, pool: &str) -> bool {
        self.pools.get(pool).is_none_or(|p| p.fallback)
    }

    /// The `[[dkim]]` entry that ARC-seals mail of `pool`: with
    /// `arc_seal = true`, the first RSA entry whose `pools` names it.
    pub fn arc_key_for(&self, pool: &str) -> Option<&Dkim> {
        if !self.pools.get(pool).is_some_and(|p| p.arc_seal) {
            return None;
        }
        self.dkim
            .iter()
            .find(|d| d.algorithm == DkimAlgorithm::RsaSha256 && d.pools.iter().any(|p| p == pool))
    }

    /// `max_age` of a pool (its own or the defaults).
    pub fn max_age_for(&self, pool: &str) -> Duration {
        self.pools
            .get(pool)
            .and_then(|p| p.max_age)
            .unwrap_or(self.defaults.max_age)
    }
}

/// Checks that a secret file (admin token, upstream password, private key)
/// is readable by its owner only. The error names the file (as `what`) and
/// the `chmod 600` to run.
pub fn check_private_file(what: &str, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("{what} \"{}\" cannot be read: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} \"{}\" is accessible by group or others (mode {:04o}); run chmod 600 {}",
            path.display(),
            mode & 0o7777,
            shell_word(&path.to_string_lossy())
        ));
    }
    Ok(())
}

/// `s` as one shell word: as it is when plain, else single-quoted.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:=@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Whether `name` is a valid pool name: `-`, or one or more of `[A-Za-z0-9_]`
/// (LISTSERV's pools are the single letters `A`-`Z`).
pub fn is_valid_pool_name(name: &str) -> bool {
    name == DEFAULT_POOL
        || (!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
}

#[cfg(test)]
mod tests;
