//! From the raw TOML document to a validated [`Config`]: defaults, unit
//! parsing, cross-references, and errors that name the line and the fix.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

mod dkim;
mod messages;
mod security;
mod spool;
mod upstreams;

pub(crate) use messages::closest;
use messages::toml_error;

use crate::raw::{Int, Located, RawConfig, RawListener, RawPool, Str, Unit};
use crate::units::{
    is_host_name, is_ip_or_socket, normalize_host, parse_bandwidth, parse_duration,
    parse_mt_priority_range, parse_size, parse_window,
};
use crate::{
    Admin, Config, ConfigError, Credentials, DEFAULT_POOL, Defaults, HeaderMatch, Listener,
    MtPriorityPolicy, Pool, Route, Server, Timeouts, TlsMode, Upstream, is_valid_pool_name,
};

/// `defaults.lower_priority_share` when the config gives none: 10%.
pub(crate) const DEFAULT_LOWER_PRIORITY_SHARE: f64 = 0.10;

/// Description of the pool `-` when the config gives none.
pub(crate) const DEFAULT_POOL_DESCRIPTION: &str =
    "default pool: command replies, rejections, bounces";

const POOL_NAME_FORMS: &str = "name a pool with one letter A-Z, \"-\", or letters, digits and _ (e.g. [pool.B] or [pool.bulk])";

/// Parses and validates `text`; the first error in file order wins.
pub(crate) fn build(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(text, path, &e))?;
    let mut cx = Ctx {
        text,
        file: path,
        errors: Vec::new(),
    };
    let server = cx.server(raw.server);
    let pools = cx.pools(raw.pool);
    let listeners = cx.listeners(raw.listener, &pools);
    let admin = cx.admin(raw.admin, &listeners);
    let defaults = cx.defaults(raw.defaults, &pools);
    let upstreams = cx.upstreams(raw.upstream, &pools);
    let routes = cx.routes(raw.route, &pools, &listeners);
    let users = cx.users(raw.user, &pools);
    let dkim = cx.dkim(raw.dkim, &pools);
    let spool = cx.spool(raw.spool);
    if let Some(first) = cx.errors.into_iter().min_by_key(|e| (e.line == 0, e.line)) {
        return Err(first);
    }
    Ok(Config {
        source: path.to_path_buf(),
        server,
        listeners,
        admin,
        defaults,
        pools,
        upstreams,
        routes,
        users,
        dkim,
        spool,
    })
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Pool names in display order: named pools sorted, then `-`.
pub(crate) fn pool_order(pools: &BTreeMap<String, Pool>) -> Vec<String> {
    let mut names: Vec<String> = pools
        .keys()
        .filter(|n| n.as_str() != DEFAULT_POOL)
        .cloned()
        .collect();
    if pools.contains_key(DEFAULT_POOL) {
        names.push(DEFAULT_POOL.to_string());
    }
    names
}

/// Validation state: the source for line numbers and the errors found so far.
struct Ctx<'a> {
    text: &'a str,
    file: &'a Path,
    errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        line_of(self.text, span.start)
    }

    fn at_line(&mut self, line: usize, message: String) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            message,
        });
    }

    fn at<T>(&mut self, v: &Spanned<T>, message: String) {
        let line = self.line(&v.span());
        self.at_line(line, message);
    }

    /// A unit value through `parse`; on error records `KEY: why; forms`.
    fn unit<T>(&mut self, key: &str, v: &Unit, parse: fn(&str) -> Result<T, String>) -> Option<T> {
        match parse(&v.get_ref().0) {
            Ok(x) => Some(x),
            Err(e) => {
                self.at(v, format!("{key}: {e}"));
                None
            }
        }
    }

    /// A duration that must be longer than zero.
    fn positive_duration(&mut self, key: &str, v: &Unit) -> Option<Duration> {
        let d = self.unit(key, v, parse_duration)?;
        if d.is_zero() {
            self.at(
                v,
                format!(
                    "{key} = \"{}\" is zero; write a duration longer than zero, e.g. \"30s\"",
                    v.get_ref().0
                ),
            );
            return None;
        }
        Some(d)
    }

    /// A bandwidth that must be above zero.
    fn rate(&mut self, key: &str, v: &Unit) -> Option<u64> {
        let bps = self.unit(key, v, parse_bandwidth)?;
        if bps == 0 {
            self.at(
                v,
                format!("{key} = \"{}\" is zero; write a bandwidth above zero such as \"12Mbps\", or omit {key} for no cap", v.get_ref().0),
            );
            return None;
        }
        Some(bps)
    }

    /// A retry schedule: a non-empty list of durations above zero.
    fn retry(&mut self, key: &str, v: &Spanned<Vec<Unit>>) -> Option<Vec<Duration>> {
        if v.get_ref().is_empty() {
            self.at(
                v,
                format!("{key} is empty; list at least one delay, e.g. retry = [\"1m\", \"5m\", \"15m\", \"1h\"] (the last step repeats)"),
            );
            return None;
        }
        let mut steps = Vec::new();
        for step in v.get_ref() {
            steps.push(self.positive_duration(key, step)?);
        }
        Some(steps)
    }

    /// An integer at least `min`, as usize/u64 via `T`.
    fn int<T: TryFrom<i64>>(&mut self, key: &str, v: &Int, min: i64, hint: &str) -> Option<T> {
        let n = *v.get_ref();
        if n < min {
            self.at(
                v,
                format!("{key} = {n} is too small; write {key} = {min} or more{hint}"),
            );
            return None;
        }
        match T::try_from(n) {
            Ok(x) => Some(x),
            Err(_) => {
                self.at(
                    v,
                    format!("{key} = {n} is too large; write a smaller number"),
                );
                None
            }
        }
    }

    /// An upstream or fallback host, normalised to `host:port`.
    fn host(&mut self, key: &str, v: &Str) -> Option<String> {
        match normalize_host(v.get_ref()) {
            Ok(h) => Some(h),
            Err(e) => {
                self.at(v, format!("{key}: {e}"));
                None
            }
        }
    }

    /// A socket address to listen on.
    fn listen_address(&mut self, key: &str, v: &Str) -> Option<SocketAddr> {
        match v.get_ref().trim().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.at(
                    v,
                    format!(
                        "{key} \"{}\" is not an IP address with a port; write e.g. \"127.0.0.1:2525\", \"0.0.0.0:25\" or \"[::1]:2525\" (host names are not accepted here)",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// A non-empty path.
    fn path(&mut self, key: &str, v: &Str) -> Option<PathBuf> {
        if v.get_ref().trim().is_empty() {
            self.at(v, format!("{key} is empty; write a path, or omit {key}"));
            return None;
        }
        Some(PathBuf::from(v.get_ref()))
    }

    /// The password in `path` (key `v`), without its trailing newline.
    /// Read here rather than at connect time so that a missing or empty
    /// file is a config error at start or reload, not a deferral later.
    fn password(&mut self, v: &Str, path: &Path) -> Option<String> {
        let what = format!("upstream auth.password_file \"{}\"", path.display());
        match std::fs::read_to_string(path) {
            Ok(text) => {
                if let Err(e) = crate::check_private_file("upstream auth.password_file", path) {
                    self.at(v, e);
                    return None;
                }
                let password = text.trim_end_matches(['\r', '\n']);
                if password.is_empty() {
                    self.at(
                        v,
                        format!("{what} is empty; write the password in it, on one line"),
                    );
                    return None;
                }
                Some(password.to_string())
            }
            Err(e) => {
                self.at(
                    v,
                    format!("{what} cannot be read: {e}; create it with the password on one line, or fix the path"),
                );
                None
            }
        }
    }

    /// `what "X" is not a known pool; declare [pool.X] or use one of: ...`, if unknown.
    fn known_pool(&mut self, what: &str, v: &Str, pools: &BTreeMap<String, Pool>) -> bool {
        let name = v.get_ref();
        if pools.contains_key(name) {
            return true;
        }
        let order = pool_order(pools);
        let known = order.join(", ");
        let hint = closest(name, order.iter().map(String::as_str))
            .map(|c| format!(" (did you mean \"{c}\"?)"))
            .unwrap_or_default();
        let message = if is_valid_pool_name(name) {
            format!(
                "{what} \"{name}\" is not a known pool{hint}; declare [pool.{name}] or use one of: {known}"
            )
        } else {
            format!(
                "{what} \"{name}\" is not a pool name{hint}; use one of: {known} ({POOL_NAME_FORMS})"
            )
        };
        self.at(v, message);
        false
    }

    fn server(&mut self, raw: Option<crate::raw::RawServer>) -> Server {
        let mut s = Server {
            hostname: String::new(),
            spool_dir: PathBuf::from("var/spool"),
            timezone: None,
            max_sessions: 1000,
            max_sessions_per_client: 20,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            max_line_length: 2048,
            max_hops: 50,
            hosts: BTreeMap::new(),
            dns_servers: Vec::new(),
            spool_min_free: crate::MinFree::Default,
            max_data_memory: 128 << 20,
        };
        let Some(raw) = raw else {
            s.hostname = default_hostname();
            return s;
        };
        s.hostname = match &raw.hostname {
            Some(h) => {
                let name = h.get_ref().trim();
                if !is_host_name(name.strip_suffix('.').unwrap_or(name)) {
                    self.at(
                        h,
                        format!("server.hostname \"{}\" is not a host name; write the relay's fully qualified name, e.g. hostname = \"relay.example.org\"", h.get_ref()),
                    );
                }
                name.to_string()
            }
            None => default_hostname(),
        };
        if let Some(v) = &raw.spool_dir
            && let Some(p) = self.path("server.spool_dir", v)
        {
            s.spool_dir = p;
        }
        if let Some(v) = &raw.timezone {
            let tz = v.get_ref().trim();
            if tz.is_empty() || jiff::tz::TimeZone::get(tz).is_err() {
                self.at(
                    v,
                    format!("server.timezone \"{}\" is not a known time zone name; write an IANA name such as \"Europe/Paris\" or \"UTC\", or omit it for local time", v.get_ref()),
                );
            } else {
                s.timezone = Some(tz.to_string());
            }
        }
        if let Some(v) = &raw.max_data_memory
            && let Some(size) = self.unit("server.max_data_memory", v, parse_size)
        {
            if size < 1 << 20 {
                self.at(
                    v,
                    "server.max_data_memory is under 1MB; write a size such as \"128MB\""
                        .to_string(),
                );
            } else {
                s.max_data_memory = size;
            }
        }
        if let Some(v) = &raw.spool_min_free {
            let text = v.get_ref().0.trim().to_string();
            let parsed = match text.strip_suffix('%') {
                Some(p) => p
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=50.0).contains(p))
                    .map(crate::MinFree::Percent)
                    .ok_or_else(|| format!("server.spool_min_free: {text:?} is not a share from 0% to 50%; write e.g. \"5%\" or a size such as \"256MB\"")),
                None => parse_size(&text)
                    .map(crate::MinFree::Bytes)
                    .map_err(|e| format!("server.spool_min_free: {e}")),
            };
            match parsed {
                Ok(m) => s.spool_min_free = m,
                Err(e) => self.at(v, e),
            }
        }
        if let Some(v) = &raw.max_sessions {
            s.max_sessions = self.int("max_sessions", v, 1, "").unwrap_or(s.max_sessions);
        }
        if let Some(v) = &raw.max_sessions_per_client {
            s.max_sessions_per_client = self
                .int("max_sessions_per_client", v, 1, "")
                .unwrap_or(s.max_sessions_per_client);
        }
        if let Some(v) = &raw.max_hops {
            s.max_hops = self.int("max_hops", v, 1, "").unwrap_or(s.max_hops);
        }
        if let Some(v) = &raw.command_timeout {
            s.command_timeout = self
                .positive_duration("command_timeout", v)
                .unwrap_or(s.command_timeout);
        }
        if let Some(v) = &raw.data_timeout {
            s.data_timeout = self
                .positive_duration("data_timeout", v)
                .unwrap_or(s.data_timeout);
        }
        if let Some(v) = &raw.max_line_length {
            s.max_line_length = self
                .int("max_line_length", v, 512, " (RFC 5321 requires 512)")
                .unwrap_or(s.max_line_length);
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (name, addr) in raw.hosts.iter().flatten() {
            let key = name.trim().to_ascii_lowercase();
            let line = self.line(&addr.span());
            let key = key.strip_suffix('.').unwrap_or(&key).to_string();
            if !is_host_name(&key) {
                self.at_line(line, format!("server.hosts: \"{name}\" is not a host name; write hosts = {{ \"smarthost.example.org\" = \"192.0.2.1:25\" }}"));
                continue;
            }
            if !is_ip_or_socket(addr.get_ref().trim()) {
                self.at(
                    addr,
                    format!("server.hosts: \"{}\" for {name} is not an IP address; write \"192.0.2.1\", \"192.0.2.1:2525\" or \"[2001:db8::1]:25\"", addr.get_ref()),
                );
                continue;
            }
            if let Some(first) = seen.insert(key.clone(), line) {
                self.at_line(line, format!("server.hosts: \"{name}\" is listed twice (also on line {first}; names are case-insensitive); keep one entry"));
                continue;
            }
            s.hosts.insert(key, addr.get_ref().trim().to_string());
        }
        for v in raw.dns_servers.iter().flatten() {
            let text = v.get_ref().trim();
            let addr = text.parse::<std::net::SocketAddr>().ok().or_else(|| {
                text.parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| std::net::SocketAddr::new(ip, 53))
            });
            match addr {
                Some(addr) if addr.port() != 0 => {
                    if s.dns_servers.contains(&addr) {
                        self.at(v, format!("server.dns_servers: {addr} is listed twice; keep one entry"));
                    } else {
                        s.dns_servers.push(addr);
                    }
                }
                _ => self.at(
                    v,
                    format!("server.dns_servers: \"{}\" is not a name server address; write an IP address with an optional port (53 if omitted), e.g. dns_servers = [\"192.0.2.53\", \"127.0.0.1:5353\", \"[2001:db8::53]:53\"]", v.get_ref()),
                ),
            }
        }
        s
    }

    fn pools(&mut self, raw: Option<BTreeMap<String, Located<RawPool>>>) -> BTreeMap<String, Pool> {
        let mut pools = BTreeMap::new();
        for (name, located) in raw.into_iter().flatten() {
            let line = match &located.span {
                Some(span) => self.line(span),
                None => first_pool_line(self.text, &located.value),
            };
            let raw = located.value;
            if !is_valid_pool_name(&name) {
                self.at_line(
                    line,
                    format!("pool name \"{name}\" is not valid; {POOL_NAME_FORMS}"),
                );
                continue;
            }
            let description = match &raw.description {
                Some(d) => d.get_ref().clone(),
                None if name == DEFAULT_POOL => DEFAULT_POOL_DESCRIPTION.to_string(),
                None => String::new(),
            };
            let key = |k: &str| format!("pool.{name}.{k}");
            let mut pool = Pool {
                name: name.clone(),
                description,
                rate_limit: None,
                retry: None,
                max_age: None,
                max_messages_per_second: None,
                max_recipients_per_hour: None,
                priority: 0,
                lower_priority_share: None,
                fallback: true,
                arc_seal: false,
                line,
            };
            if let Some(v) = &raw.rate_limit {
                pool.rate_limit = self.rate(&key("rate_limit"), v);
            }
            if let Some(v) = &raw.retry {
                pool.retry = self.retry(&key("retry"), v);
            }
            if let Some(v) = &raw.max_age {
                pool.max_age = self.positive_duration(&key("max_age"), v);
            }
            if let Some(v) = &raw.max_messages_per_second {
                let x = *v.get_ref();
                if x.is_finite() && x > 0.0 {
                    pool.max_messages_per_second = Some(x);
                } else {
                    self.at(v, format!("{} = {x} must be above zero; write e.g. 50 or 0.5, or omit it for no cap", key("max_messages_per_second")));
                }
            }
            if let Some(v) = &raw.max_recipients_per_hour {
                pool.max_recipients_per_hour = self.int(
                    &key("max_recipients_per_hour"),
                    v,
                    1,
                    ", or omit it for no cap",
                );
            }
            if let Some(v) = &raw.priority {
                let n = *v.get_ref();
                if (-9..=9).contains(&n) {
                    pool.priority = n as i8;
                } else {
                    self.at(v, format!("{} = {n} is out of range; write a whole number from -9 to 9 (higher goes first; default 0)", key("priority")));
                }
            }
            if let Some(v) = &raw.lower_priority_share {
                pool.lower_priority_share = self.share(&key("lower_priority_share"), v);
            }
            if let Some(v) = &raw.fallback {
                pool.fallback = *v.get_ref();
            }
            if let Some(v) = &raw.arc_seal {
                pool.arc_seal = *v.get_ref();
            }
            pools.insert(name, pool);
        }
        pools
            .entry(DEFAULT_POOL.to_string())
            .or_insert_with(|| Pool {
                name: DEFAULT_POOL.to_string(),
                description: DEFAULT_POOL_DESCRIPTION.to_string(),
                rate_limit: None,
                retry: None,
                max_age: None,
                max_messages_per_second: None,
                max_recipients_per_hour: None,
                priority: 0,
                lower_priority_share: None,
                fallback: true,
                arc_seal: false,
                line: 0,
            });
        pools
    }

    fn listeners(
        &mut self,
        raw: Option<Vec<Spanned<RawListener>>>,
        pools: &BTreeMap<String, Pool>,
    ) -> Vec<Listener> {
        let raw = raw.unwrap_or_default();
        if raw.is_empty() {
            self.at_line(
                line_of(self.text, self.text.trim_end().len()),
                "no [[listener]] is configured, so no mail could come in; add one, e.g. [[listener]] with address = \"127.0.0.1:2525\"".to_string(),
            );
        }
        let mut listeners: Vec<Listener> = Vec::new();
        for item in &raw {
            let line = self.line(&item.span());
            let r = item.get_ref();
            let Some(address) = self.listen_address("listener address", &r.address) else {
                continue;
            };
            let name = match &r.name {
                Some(n) => {
                    if n.get_ref().trim().is_empty() {
                        self.at(n, "listener name is empty; write a name such as name = \"inbound\", or omit it to use the address".to_string());
                    }
                    n.get_ref().clone()
                }
                None => r.address.get_ref().clone(),
            };
            if let Some(other) = listeners.iter().find(|l| l.address == address) {
                let msg = format!(
                    "listener address {address} is already used by the listener on line {}; give each [[listener]] its own address or port",
                    other.line
                );
                self.at(&r.address, msg);
            } else if let Some(other) = listeners.iter().find(|l| l.name == name) {
                let msg = format!(
                    "listener name \"{name}\" is already used by the listener on line {}; give this one another name = \"...\"",
                    other.line
                );
                match &r.name {
                    Some(n) => self.at(n, msg),
                    None => self.at(&r.address, msg),
                }
            }
            let mut relay_from = loopback();
            if let Some(list) = &r.relay_from {
                if list.is_empty() {
                    self.at_line(line, "relay_from is empty, so this listener would refuse every client; list who may relay, e.g. relay_from = [\"192.0.2.0/24\"], or omit it for loopback only".to_string());
                }
                relay_from = list
                    .iter()
                    .filter_map(|n| self.network("relay_from", n))
                    .collect();
            }
            let pool = match &r.pool {
                Some(p) => self
                    .known_pool("listener pool", p, pools)
                    .then(|| p.get_ref().clone()),
                None => None,
            };
            let max_message_size = match &r.max_message_size {
                Some(v) => match self.unit("max_message_size", v, parse_size) {
                    Some(0) => {
                        self.at(
                            v,
                            "max_message_size is zero; write a size such as \"50MB\"".to_string(),
                        );
                        0
                    }
                    Some(n) => n,
                    None => 0,
                },
                None => 50 << 20,
            };
            let max_recipients = match &r.max_recipients {
                Some(v) => self
                    .int("max_recipients", v, 1, " (RFC 5321 asks for at least 100)")
                    .unwrap_or(0),
                None => 1000,
            };
            let security = self.listener_security(r, line, address);
            let mt_priority = r.mt_priority.as_ref().and_then(|v| {
                let policy = MtPriorityPolicy::from_name(v.get_ref());
                if policy.is_none() {
                    let names: Vec<String> = MtPriorityPolicy::ALL
                        .iter()
                        .map(|p| format!("\"{}\"", p.config_name()))
                        .collect();
                    self.at(v, format!("listener mt_priority \"{}\" is not an MT-PRIORITY policy; write one of {} (RFC 6710), or omit it to leave the extension off", v.get_ref(), names.join(", ")));
                }
                policy
            });
            let mt_priority_trusted = match &r.mt_priority_trusted {
                Some(list) => {
                    if r.mt_priority.is_none() {
                        self.at_line(line, "mt_priority_trusted is set but mt_priority is not, so no client can give a priority here; add mt_priority = \"mixer\" (or \"stanag4406\", \"nsep\"), or remove mt_priority_trusted".to_string());
                    }
                    list.iter()
                        .filter_map(|n| self.network("mt_priority_trusted", n))
                        .collect()
                }
                None => relay_from.clone(),
            };
            listeners.push(Listener {
                name,
                address,
                relay_from,
                pool,
                max_message_size,
                max_recipients,
                tls: security.tls,
                require_tls: security.require_tls,
                auth: security.auth,
                users_file: security.users_file,
                auth_plaintext: security.auth_plaintext,
                mt_priority,
                mt_priority_trusted,
                line,
            });
        }
        listeners
    }

    /// An entry of `key` (`relay_from`, `mt_priority_trusted`): a CIDR
    /// network, or a bare address as /32 or /128.
    fn network(&mut self, key: &str, v: &Str) -> Option<IpNet> {
        let s = v.get_ref().trim();
        let parsed = if s.contains('/') {
            s.parse::<IpNet>().ok()
        } else {
            s.parse::<IpAddr>().ok().map(IpNet::from)
        };
        if parsed.is_none() {
            self.at(
                v,
                format!("{key} entry \"{}\" is not an IP network; write an address such as \"192.0.2.1\" or a network such as \"192.0.2.0/24\" or \"2001:db8::/32\"", v.get_ref()),
            );
        }
        parsed
    }

    fn admin(&mut self, raw: Option<crate::raw::RawAdmin>, listeners: &[Listener]) -> Admin {
        let mut admin = Admin {
            address: SocketAddr::from(([127, 0, 0, 1], 9025)),
            token_file: None,
            allow_unauthenticated: false,
        };
        let Some(raw) = raw else {
            return admin;
        };
        if let Some(v) = &raw.address
            && let Some(a) = self.listen_address("admin address", v)
        {
            admin.address = a;
            if let Some(l) = listeners.iter().find(|l| l.address == a) {
                let msg = format!(
                    "admin address {a} is also the address of the listener on line {}; give [admin] its own port, e.g. \"127.0.0.1:9025\"",
                    l.line
                );
                self.at(v, msg);
            }
        }
        if let Some(v) = &raw.token_file {
            admin.token_file = self.path("admin.token_file", v);
            // A missing file is reported when the relay starts and reads it.
            if let Some(path) = &admin.token_file
                && path.exists()
                && let Err(e) = crate::check_private_file("admin.token_file", path)
            {
                self.at(v, e);
            }
        }
        if let Some(v) = &raw.allow_unauthenticated {
            admin.allow_unauthenticated = *v.get_ref();
        }
        if let Some(v) = &raw.address
            && !admin.address.ip().to_canonical().is_loopback()
            && raw.token_file.is_none()
            && !admin.allow_unauthenticated
        {
            let a = admin.address;
            self.at(
                v,
                format!(
                    "admin address {a} is not loopback and no admin.token_file is set: anyone who can reach it could read and change the queue; \
                     add token_file = \"/etc/poolrelay/admin.token\" (a file only the relay's user can read), \
                     or listen on \"127.0.0.1:{}\", or add allow_unauthenticated = true",
                    a.port()
                ),
            );
        }
        admin
    }

    fn defaults(
        &mut self,
        raw: Option<crate::raw::RawDefaults>,
        pools: &BTreeMap<String, Pool>,
    ) -> Defaults {
        let default_list_pool = if pools.contains_key("A") {
            "A"
        } else {
            DEFAULT_POOL
        };
        let mut d = Defaults {
            list_pool: default_list_pool.to_string(),
            fallback: Vec::new(),
            retry: [60, 300, 900, 1800, 3600, 7200, 14400]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            max_age: Duration::from_secs(5 * 86400),
            rate_limit: None,
            delay_warning: None,
            lower_priority_share: DEFAULT_LOWER_PRIORITY_SHARE,
        };
        let Some(raw) = raw else {
            return d;
        };
        if let Some(v) = &raw.list_pool
            && self.known_pool("defaults.list_pool", v, pools)
        {
            d.list_pool = v.get_ref().clone();
        }
        d.fallback = raw
            .fallback
            .iter()
            .flatten()
            .filter_map(|h| self.host("defaults.fallback", h))
            .collect();
        if let Some(v) = &raw.retry
            && let Some(r) = self.retry("defaults.retry", v)
        {
            d.retry = r;
        }
        if let Some(v) = &raw.max_age {
            d.max_age = self
                .positive_duration("defaults.max_age", v)
                .unwrap_or(d.max_age);
        }
        if let Some(v) = &raw.rate_limit {
            d.rate_limit = self.rate("defaults.rate_limit", v);
        }
        if let Some(v) = &raw.delay_warning {
            d.delay_warning = self.positive_duration("defaults.delay_warning", v);
        }
        if let Some(v) = &raw.lower_priority_share
            && let Some(share) = self.share("defaults.lower_priority_share", v)
        {
            d.lower_priority_share = share;
        }
        d
    }

    /// A `lower_priority_share`: a percentage above 0 and at most 50, as a
    /// fraction. Zero is refused: it would let a higher pool starve a lower one.
    fn share(&mut self, key: &str, v: &Str) -> Option<f64> {
        let text = v.get_ref().trim();
        let percent = text
            .strip_suffix('%')
            .and_then(|p| p.trim().parse::<f64>().ok())
            .filter(|p| p.is_finite() && *p > 0.0 && *p <= 50.0);
        match percent {
            Some(p) => Some(p / 100.0),
            None => {
                self.at(v, format!("{key} = {text:?} is not a share above 0% and at most 50%; write e.g. \"10%\" (a lower-priority pool with ready mail gets at least this share of a shared worker's deliveries)"));
                None
            }
        }
    }
}

/// Line of a pool table written with dotted keys: its first key's line.
fn first_pool_line(text: &str, p: &RawPool) -> usize {
    let spans = [
        p.description.as_ref().map(|v| v.span()),
        p.rate_limit.as_ref().map(|v| v.span()),
        p.retry.as_ref().map(|v| v.span()),
        p.max_age.as_ref().map(|v| v.span()),
        p.max_messages_per_second.as_ref().map(|v| v.span()),
        p.max_recipients_per_hour.as_ref().map(|v| v.span()),
        p.priority.as_ref().map(|v| v.span()),
        p.lower_priority_share.as_ref().map(|v| v.span()),
        p.fallback.as_ref().map(|v| v.span()),
        p.arc_seal.as_ref().map(|v| v.span()),
    ];
    spans
        .into_iter()
        .flatten()
        .map(|s| line_of(text, s.start))
        .min()
        .unwrap_or(0)
}

/// The machine's host name from `/etc/hostname`, else `localhost`.
fn default_hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| is_host_name(s))
        .unwrap_or_else(|| "localhost".to_string())
}

/// The default `relay_from`: `127.0.0.0/8` and `::1/128`.
fn loopback() -> Vec<IpNet> {
    [
        IpNet::new(IpAddr::from([127, 0, 0, 0]), 8),
        IpNet::new(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]), 128),
    ]
    .into_iter()
    .filter_map(Result::ok)
    .collect()
}
