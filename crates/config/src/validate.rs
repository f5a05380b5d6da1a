//! From the raw TOML document to a validated [`Config`]: defaults, unit
//! parsing, cross-references, and errors that name the line and the fix.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use crate::raw::{Int, Located, RawConfig, RawListener, RawPool, Str, Unit};
use crate::units::{
    is_host_name, is_ip_or_socket, normalize_host, parse_bandwidth, parse_duration, parse_size,
    parse_window,
};
use crate::{
    Admin, Config, ConfigError, Credentials, DEFAULT_POOL, Defaults, HeaderMatch, Listener, Pool,
    Route, Server, Timeouts, TlsMode, Upstream, is_valid_pool_name,
};

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

/// A TOML syntax or shape error, reworded to say what to write instead.
fn toml_error(text: &str, path: &Path, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map_or(0, |s| line_of(text, s.start));
    let source_line = text.lines().nth(line.saturating_sub(1)).unwrap_or("");
    ConfigError {
        file: path.to_path_buf(),
        line,
        message: match e.message().trim() {
            // The TOML parser gives no reason for some bytes (a lone CR
            // at the start of a line): still say what to write.
            "" => "not valid TOML here (a control character such as a lone carriage return?); \
                   write key = value, a [table] header or a # comment"
                .to_string(),
            msg => reword(msg, source_line),
        },
    }
}

/// The names between backticks in a serde message, in order.
fn backticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

/// Rewords serde's messages about unknown, missing and mistyped keys.
fn reword(msg: &str, source_line: &str) -> String {
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let names = backticked(rest);
        let Some((key, valid)) = names.split_first() else {
            return msg.to_string();
        };
        if valid.is_empty() {
            return format!("unknown key `{key}`: this table takes no keys; remove it");
        }
        let hint = closest(key, valid.iter().copied())
            .map(|c| format!(" (did you mean `{c}`?)"))
            .unwrap_or_default();
        return format!(
            "unknown key `{key}`{hint}; remove it or use one of: {}",
            valid.join(", ")
        );
    }
    if let Some(rest) = msg.strip_prefix("missing field ") {
        let key = backticked(rest).first().copied().unwrap_or("");
        let example = match key {
            "address" => "address = \"127.0.0.1:2525\"",
            "host" => "host = \"smarthost.example.org:25\"",
            "pool" => "pool = \"A\" (the pool the route sends to)",
            "name" => "name = \"List-Id\" (header = { name = \"...\", value = \"glob\" })",
            "value" => "value = \"*glob*\" (header = { name = \"...\", value = \"glob\" })",
            _ => "it",
        };
        return format!("missing key `{key}`; add {example}");
    }
    if msg.contains("expected a borrowed string") {
        // A table made by dotted keys where a plain value was expected.
        return format!(
            "`{}` makes a table of a key that takes a plain value; write key = value \
             (dotted keys such as pool.A.description only work at the top of the file, before any [table])",
            source_line.split('=').next().unwrap_or("").trim()
        );
    }
    if msg.starts_with("invalid type:") || msg.starts_with("invalid value:") {
        let msg = plain_expectation(msg);
        let msg = msg.as_str();
        let header = source_line.trim();
        if msg.contains("expected a sequence")
            && header.starts_with('[')
            && !header.starts_with("[[")
        {
            let name = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim();
            return format!(
                "{msg}; [{name}] may appear several times: write [[{name}]] (double brackets) for each entry"
            );
        }
        let hint = if msg.contains("expected a string") {
            "; put the value in double quotes"
        } else if msg.contains("expected a sequence") {
            return match msg
                .strip_prefix("invalid type: string ")
                .and_then(|r| r.split_once(", expected"))
            {
                Some((quoted, _)) => format!("{msg}; write a list, e.g. [{quoted}]"),
                None => format!("{msg}; write a list, e.g. [\"a\", \"b\"]"),
            };
        } else if msg.contains("expected a whole number") || msg.contains("expected a number") {
            "; write a plain number without quotes"
        } else if msg.contains("expected a table") {
            "; write a [section] with keys below it, or an inline table { key = \"value\" }"
        } else {
            ""
        };
        return format!("{msg}{hint}");
    }
    // TOML syntax errors come on several lines.
    msg.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Replaces serde's Rust type names after "expected" with words.
fn plain_expectation(msg: &str) -> String {
    let Some((head, expected)) = msg.split_once(", expected ") else {
        return msg.to_string();
    };
    let words = match expected {
        "i64" | "u64" | "usize" => "a whole number",
        "f64" => "a number",
        "a spanned value" => "a table",
        e if e.starts_with("struct ") || e.starts_with("a map") => "a table",
        e => e,
    };
    format!("{head}, expected {words}")
}

/// The candidate closest to `word` by edit distance, if close enough to be a typo.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let w = word.to_ascii_lowercase();
    candidates
        .map(|c| (edit_distance(&w, &c.to_ascii_lowercase()), c))
        .filter(|&(d, c)| d <= 2.max(c.len() / 4) && d < c.len())
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
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
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            max_line_length: 2048,
            hosts: BTreeMap::new(),
            spool_min_free: crate::MinFree::Default,
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
                relay_from = list.iter().filter_map(|n| self.network(n)).collect();
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
            listeners.push(Listener {
                name,
                address,
                relay_from,
                pool,
                max_message_size,
                max_recipients,
                line,
            });
        }
        listeners
    }

    /// A `relay_from` entry: a CIDR network, or a bare address as /32 or /128.
    fn network(&mut self, v: &Str) -> Option<IpNet> {
        let s = v.get_ref().trim();
        let parsed = if s.contains('/') {
            s.parse::<IpNet>().ok()
        } else {
            s.parse::<IpAddr>().ok().map(IpNet::from)
        };
        if parsed.is_none() {
            self.at(
                v,
                format!("relay_from entry \"{}\" is not an IP network; write an address such as \"192.0.2.1\" or a network such as \"192.0.2.0/24\" or \"2001:db8::/32\"", v.get_ref()),
            );
        }
        parsed
    }

    fn admin(&mut self, raw: Option<crate::raw::RawAdmin>, listeners: &[Listener]) -> Admin {
        let mut admin = Admin {
            address: SocketAddr::from(([127, 0, 0, 1], 9025)),
            token_file: None,
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
        d
    }

    fn upstreams(
        &mut self,
        raw: Option<Vec<Spanned<crate::raw::RawUpstream>>>,
        pools: &BTreeMap<String, Pool>,
    ) -> Vec<Upstream> {
        let mut out = Vec::new();
        for item in raw.iter().flatten() {
            let line = self.line(&item.span());
            let r = item.get_ref();
            let host = self.host("upstream host", &r.host).unwrap_or_default();
            let workers = match &r.workers {
                Some(v) if *v.get_ref() < 1 => {
                    let msg = format!(
                        "upstream workers = {} leaves {} without workers; write workers = 1 or more, or remove this [[upstream]]",
                        v.get_ref(),
                        r.host.get_ref()
                    );
                    self.at(v, msg);
                    1
                }
                Some(v) => self.int("workers", v, 1, "").unwrap_or(1),
                None => 1,
            };
            let pool_list = match &r.pools {
                None => pool_order(pools),
                Some(list) if list.get_ref().is_empty() => {
                    self.at(list, "upstream serves no pool: pools = [] is empty; list the pools it delivers, e.g. pools = [\"A\", \"-\"], or omit pools to serve every pool".to_string());
                    Vec::new()
                }
                Some(list) => {
                    let mut names: Vec<String> = Vec::new();
                    for p in list.get_ref() {
                        let name = p.get_ref();
                        if name == "*" {
                            self.at(p, "upstream pools entry \"*\": omit pools to serve every pool, or list the pools, e.g. pools = [\"A\", \"-\"]".to_string());
                        } else if names.contains(name) {
                            self.at(
                                p,
                                format!("upstream pools lists \"{name}\" twice; keep one"),
                            );
                        } else if self.known_pool("upstream pools entry", p, pools) {
                            names.push(name.clone());
                        }
                    }
                    names
                }
            };
            let failover = r
                .failover
                .iter()
                .flatten()
                .filter_map(|h| self.host("upstream failover", h))
                .collect();
            let window = match &r.window {
                Some(v) => match parse_window(v.get_ref()) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        self.at(v, format!("upstream window: {e}"));
                        None
                    }
                },
                None => None,
            };
            let tls = match &r.tls {
                Some(v) => match v.get_ref().trim().to_ascii_lowercase().as_str() {
                    "opportunistic" => TlsMode::Opportunistic,
                    "required" => TlsMode::Required,
                    "implicit" => TlsMode::Implicit,
                    "off" => TlsMode::Off,
                    _ => {
                        self.at(v, format!("upstream tls \"{}\" is not a TLS mode; write \"opportunistic\" (STARTTLS when offered), \"required\" (STARTTLS or retry later), \"implicit\" (TLS from the first byte, port 465) or \"off\"", v.get_ref()));
                        TlsMode::Opportunistic
                    }
                },
                None => TlsMode::Opportunistic,
            };
            let max_messages_per_connection = match &r.max_messages_per_connection {
                Some(v) => self
                    .int("max_messages_per_connection", v, 1, "")
                    .unwrap_or(100),
                None => 100,
            };
            let idle_timeout = match &r.idle_timeout {
                Some(v) => self
                    .unit("idle_timeout", v, parse_duration)
                    .unwrap_or_default(),
                None => Duration::from_secs(10),
            };
            let defaults = Timeouts::default();
            let mut stage = |key: &str, v: &Option<Unit>, default: Duration| match v {
                Some(v) => self.positive_duration(key, v).unwrap_or(default),
                None => default,
            };
            let timeouts = Timeouts {
                connect: stage("connect_timeout", &r.connect_timeout, defaults.connect),
                greeting: stage("greeting_timeout", &r.greeting_timeout, defaults.greeting),
                ehlo: stage("ehlo_timeout", &r.ehlo_timeout, defaults.ehlo),
                mail: stage("mail_timeout", &r.mail_timeout, defaults.mail),
                rcpt: stage("rcpt_timeout", &r.rcpt_timeout, defaults.rcpt),
                data_init: stage(
                    "data_init_timeout",
                    &r.data_init_timeout,
                    defaults.data_init,
                ),
                data_block: stage(
                    "data_block_timeout",
                    &r.data_block_timeout,
                    defaults.data_block,
                ),
                data_end: stage("data_end_timeout", &r.data_end_timeout, defaults.data_end),
            };
            let tls_ca_file = r
                .tls_ca_file
                .as_ref()
                .and_then(|v| self.path("upstream tls_ca_file", v));
            if let Some(a) = &r.auth {
                let plaintext = r.auth_plaintext.as_ref().is_some_and(|v| *v.get_ref());
                let problem = match tls {
                    TlsMode::Opportunistic => Some(
                        "auth with tls = \"opportunistic\" would send the password to whoever answers, unverified (a man in the middle can offer any certificate); write tls = \"required\" (STARTTLS, certificate checked) or \"implicit\" (port 465); for a private smarthost without a valid certificate add tls_verify = false",
                    ),
                    TlsMode::Off if !plaintext => Some(
                        "auth with tls = \"off\" sends the password in clear; write tls = \"required\" or \"implicit\", or set auth_plaintext = true if the path to the smarthost is trusted (e.g. loopback)",
                    ),
                    _ => None,
                };
                if let Some(problem) = problem {
                    self.at(&a.value.username, format!("upstream {}: {problem}", host));
                }
            }
            let auth_password_file = r
                .auth
                .as_ref()
                .and_then(|a| self.path("upstream auth.password_file", &a.value.password_file));
            let auth = match (&r.auth, &auth_password_file) {
                (Some(a), Some(path)) => {
                    self.password(&a.value.password_file, path)
                        .map(|password| Credentials {
                            username: a.value.username.get_ref().clone(),
                            password,
                            allow_plaintext: r
                                .auth_plaintext
                                .as_ref()
                                .is_some_and(|v| *v.get_ref()),
                        })
                }
                _ => None,
            };
            out.push(Upstream {
                timeouts,
                tls_verify: r.tls_verify.as_ref().is_none_or(|v| *v.get_ref()),
                tls_ca_file,
                auth,
                auth_password_file,
                mx: r.mx.as_ref().is_some_and(|v| *v.get_ref()),
                host,
                workers,
                pools: pool_list,
                failover,
                window,
                tls,
                max_messages_per_connection,
                idle_timeout,
                line,
            });
        }
        out
    }

    fn routes(
        &mut self,
        raw: Option<Vec<Spanned<crate::raw::RawRoute>>>,
        pools: &BTreeMap<String, Pool>,
        listeners: &[Listener],
    ) -> Vec<Route> {
        let raw = raw.unwrap_or_default();
        let lines: Vec<usize> = raw.iter().map(|r| self.line(&r.span())).collect();
        let mut out = Vec::new();
        for (i, item) in raw.iter().enumerate() {
            let line = lines[i];
            let r = item.get_ref();
            self.known_pool("route pool", &r.pool, pools);
            let sender = r.sender.as_ref().map(|s| match s.get_ref().trim() {
                "<>" => String::new(),
                other => other.to_string(),
            });
            let recipient = r.recipient.as_ref().map(|s| s.get_ref().trim().to_string());
            if let (Some(v), Some("")) = (&r.recipient, recipient.as_deref()) {
                self.at(v, "route recipient = \"\" matches no recipient; write a glob such as \"*@example.org\", or omit recipient".to_string());
            }
            let header = match &r.header {
                Some(h) => {
                    let name = h.value.name.get_ref().trim();
                    let valid =
                        !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
                    if !valid {
                        self.at(&h.value.name, format!("route header name \"{}\" is not a header field name; write it without the colon, e.g. header = {{ name = \"List-Id\", value = \"*news*\" }}", h.value.name.get_ref()));
                    }
                    Some(HeaderMatch {
                        name: name.to_string(),
                        value: h.value.value.get_ref().clone(),
                    })
                }
                None => None,
            };
            let listener = match &r.listener {
                Some(v) => {
                    if !listeners.iter().any(|l| &l.name == v.get_ref()) {
                        let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
                        let hint = closest(v.get_ref(), names.iter().copied())
                            .map(|c| format!(" (did you mean \"{c}\"?)"))
                            .unwrap_or_default();
                        self.at(v, format!("route listener \"{}\" names no listener{hint}; use the name of a [[listener]] (its `name`, by default its address): {}", v.get_ref(), names.join(", ")));
                    }
                    Some(v.get_ref().clone())
                }
                None => None,
            };
            let catch_all =
                sender.is_none() && recipient.is_none() && header.is_none() && listener.is_none();
            if catch_all && let Some(next) = lines.get(i + 1) {
                self.at_line(line, format!("route has no matcher, so it takes every message and the route on line {next} can never match; add sender, recipient, header or listener, or move it to the end as the catch-all"));
            }
            out.push(Route {
                pool: r.pool.get_ref().clone(),
                sender,
                recipient,
                header,
                listener,
                line,
            });
        }
        out
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
