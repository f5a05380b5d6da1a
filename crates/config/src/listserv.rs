//! `poolrelay import-listserv`: turns a LISTSERV `site.cfg` and list headers
//! into a commented poolrelay config with the same SMTP worker pools
//! (`DESIGN.md`, "Where the idea comes from").
//!
//! The result is TOML text rather than a [`Config`] because an operator
//! reviews and edits it before use: every setting carries a comment naming
//! the LISTSERV line it came from, and lines with no poolrelay equivalent are
//! kept as comments. The text is validated with [`Config::parse`] before it
//! is returned, so an import never hands out a config `poolrelay check` rejects.
//!
//! LISTSERV decides the pool itself; poolrelay has to recognise it from the
//! mail. The generated routes use only general matchers (envelope sender glob,
//! header glob), so the file shows exactly what happens:
//! null sender and `LISTSERV@` go to `-`; `owner-LIST@` with a `Sender:`
//! header naming `LIST@` is a posting (pool x of `Delivery-Pool= x,y`); other
//! mail from `owner-LIST@` is administrative mail (pool y); any other
//! `owner-*@` sender falls through to `defaults.list_pool` (`DEFAULT_LIST_POOL`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::units::{format_bandwidth, is_host_name, normalize_host, parse_bandwidth, parse_window};
use crate::validate::DEFAULT_POOL_DESCRIPTION;
use crate::{Config, ConfigError, DEFAULT_POOL, Window};

/// Options of `poolrelay import-listserv` beyond the input files. The
/// defaults give the config an operator starts from; the address and host
/// options let a test suite point the result at loopback sinks without
/// editing the generated text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// `--port N`: every upstream, failover and fallback host gets port N.
    pub port: Option<u16>,
    /// `--list NAME=FILE`: list header files not named `LISTNAME.list`.
    pub lists: Vec<(String, PathBuf)>,
    /// Entries for `server.hosts` (host name -> "ip" or "ip:port"), used
    /// instead of DNS for the upstream names.
    pub hosts: Vec<(String, String)>,
    /// Address of the generated `[[listener]]`; default `127.0.0.1:2525`.
    pub listen: Option<SocketAddr>,
    /// Address of `[admin]`; default `127.0.0.1:9025`.
    pub admin: Option<SocketAddr>,
    /// `server.spool_dir`; default `var/spool`.
    pub spool_dir: Option<PathBuf>,
}

/// The outcome of [`import_listserv`].
#[derive(Debug, Clone)]
pub struct Import {
    /// The commented poolrelay TOML (what the binary prints on stdout).
    pub toml: String,
    /// One line per thing not imported or worth checking, each starting
    /// with `FILE:LINE:` or `FILE:` (what the binary prints on stderr).
    pub warnings: Vec<String>,
    /// `toml` parsed and validated, for `--check` (e.g. [`Config::describe`]).
    pub config: Config,
}

/// Reads a LISTSERV `site.cfg` (or unix `go.user`) and list header files and
/// returns the equivalent poolrelay config.
///
/// `list_headers` are named `LISTNAME.list` (any case); `opts.lists` adds
/// files under an explicit list name. Errors name the file and line of the
/// malformed LISTSERV setting.
pub fn import_listserv(
    site_cfg: &Path,
    list_headers: &[PathBuf],
    opts: &ImportOptions,
) -> Result<Import, ConfigError> {
    let site = Source::read(site_cfg)?;
    let mut lists = Vec::new();
    for path in list_headers {
        let name = list_name_from_path(path).ok_or_else(|| ConfigError {
            file: path.clone(),
            line: 0,
            message: "cannot tell the list name from the file name; name the file LISTNAME.list \
                      or pass it as --list LISTNAME=FILE"
                .to_string(),
        })?;
        lists.push((name, Source::read(path)?));
    }
    for (name, path) in &opts.lists {
        lists.push((name.clone(), Source::read(path)?));
    }
    import_sources(&site, &lists, opts)
}

/// Parses a `--list NAME=FILE` argument into the list name and the file.
pub fn parse_list_arg(arg: &str) -> Result<(String, PathBuf), String> {
    match arg.split_once('=') {
        Some((name, file)) if !file.trim().is_empty() => {
            let name = name.trim();
            check_list_name(name)?;
            Ok((name.to_string(), PathBuf::from(file.trim())))
        }
        _ => Err(format!(
            "--list \"{arg}\" is not NAME=FILE; write e.g. --list EMERGENCY=headers/emergency.txt"
        )),
    }
}

/// The list name of `LISTNAME.list` (extension in any case), if the file is named so.
fn list_name_from_path(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let cut = name.len().checked_sub(".list".len())?;
    let (stem, ext) = (name.get(..cut)?, name.get(cut..)?);
    (ext.eq_ignore_ascii_case(".list") && check_list_name(stem).is_ok()).then(|| stem.to_string())
}

/// A list name must be usable inside a sender glob and a TOML string.
fn check_list_name(name: &str) -> Result<(), String> {
    let bad = |c: char| c.is_whitespace() || c.is_control() || "*?@\"\\".contains(c);
    if name.is_empty() || name.chars().any(bad) {
        return Err(format!(
            "\"{name}\" is not a list name; write the LISTSERV list name, e.g. EMERGENCY"
        ));
    }
    Ok(())
}

/// One input file: its path (for errors and warnings) and its text.
struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    /// Reads a file; bytes that are not UTF-8 are replaced, because list
    /// files copied from a LISTSERV server may hold Latin-1 subscriber names.
    fn read(path: &Path) -> Result<Source, ConfigError> {
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            message: format!("cannot read the file: {e}"),
        })?;
        Ok(Source {
            path: path.to_path_buf(),
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// The file name alone: comments in the generated config stay the same
    /// wherever the input files were.
    fn short(&self) -> String {
        let name = self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        c(&name)
    }

    fn err(&self, line: usize, message: String) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line,
            message,
        }
    }

    fn warn(&self, line: usize, message: &str) -> String {
        format!("{}:{line}: {message}", self.path.display())
    }
}

/// Where a setting came from, for the comment above it.
#[derive(Debug, Clone)]
struct Origin {
    line: usize,
    text: String,
}

/// An `SMTP_FORWARD_n` line.
#[derive(Debug)]
struct Forward {
    n: u64,
    origin: Origin,
    workers: usize,
    host: String,
    window: Option<Window>,
    failover: Vec<String>,
    /// `None`: every pool (`POOL=*` or no `POOL=`).
    pools: Option<Vec<String>>,
    /// `;KEY=value` suffixes other than `POOL=`, kept as comments.
    ignored: Vec<String>,
}

/// `DEFAULT_LIST_POOL= x [y]`.
#[derive(Debug)]
struct ListPool {
    postings: String,
    admin: String,
    origin: Origin,
}

/// Per-pool caps of `SMTP_RATE_LIMIT`, in bits per second, in the order written.
type PoolCaps = Vec<(String, u64)>;

/// `SMTP_RATE_LIMIT`.
#[derive(Debug)]
struct Rates {
    server: Option<u64>,
    pools: PoolCaps,
    origin: Origin,
}

/// A site.cfg line that is not imported, kept as a comment.
#[derive(Debug)]
struct Skipped {
    origin: Origin,
    /// `Some(n)`: the same keyword is set again on line n.
    overridden_by: Option<usize>,
}

/// What site.cfg says, after parsing.
#[derive(Debug, Default)]
struct Site {
    fallback: Option<(String, Origin)>,
    forwards: BTreeMap<u64, Forward>,
    list_pool: Option<ListPool>,
    rates: Option<Rates>,
    domains: Option<(Vec<String>, Origin)>,
    skipped: Vec<Skipped>,
}

const FORWARD_FORM: &str = "write SMTP_FORWARD_n=[count*]host[(hh:mm-hh:mm)][;failoverhost][;POOL=letters], \
     e.g. SMTP_FORWARD_1=2*SMTP.EXAMPLE.ORG(00:00-05:00);BACKUP.EXAMPLE.ORG;POOL=A-";
const POOL_FORM: &str =
    "pools are the letters A-Z and - (the default pool), e.g. POOL=A- for pools A and -";
const RATE_FORM: &str = "write SMTP_RATE_LIMIT=12Mbps AB:1.5Mbps C:150kbps (a server-wide cap, \
     then pool letters with their cap; units bps, kbps, Mbps or Gbps)";

/// `[A-Za-z_][A-Za-z0-9_]*`: a site.cfg keyword or a variable name.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Strips the quotes unix site.cfg (a shell script) puts around values.
fn unquote(value: &str) -> Result<&str, String> {
    for quote in ['"', '\''] {
        if let Some(rest) = value.strip_prefix(quote) {
            return rest.strip_suffix(quote).ok_or_else(|| {
                format!("the value starts with {quote} but does not end with it; close the quote")
            });
        }
    }
    Ok(value)
}

/// Replaces `$NAME`, `${NAME}` (unix) and `%NAME%` (Windows) with values set
/// earlier in the file, as LISTSERV's manual shows for `MYDOMAIN="$NODE ..."`.
/// `Err` carries the name of a variable the file does not set.
fn substitute(value: &str, vars: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(pos) = rest.find(['$', '%']) {
        out.push_str(&rest[..pos]);
        let sigil = &rest[pos..=pos];
        let after = &rest[pos + 1..];
        let reference = if sigil == "$" {
            match after.strip_prefix('{') {
                Some(inner) => inner.split_once('}'),
                None => {
                    let end = after
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(after.len());
                    Some(after.split_at(end))
                }
            }
        } else {
            after.split_once('%')
        };
        match reference {
            Some((name, tail)) if is_identifier(name) => {
                let v = vars
                    .get(&name.to_ascii_uppercase())
                    .ok_or_else(|| name.to_string())?;
                out.push_str(v);
                rest = tail;
            }
            // A lone `$` or `%` is just a character.
            _ => {
                out.push_str(sigil);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A pool letter: `A`-`Z` in any case (stored upper case) or `-`.
fn pool_letter(c: char) -> Option<String> {
    if c.is_ascii_alphabetic() {
        Some(c.to_ascii_uppercase().to_string())
    } else if c == '-' {
        Some(DEFAULT_POOL.to_string())
    } else {
        None
    }
}

/// A single pool letter written as a word (`B`, `-`).
fn pool_word(s: &str) -> Option<String> {
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => pool_letter(c),
        _ => None,
    }
}

/// An upstream host as `host:port`, lowercased; `port` overrides the one written.
fn upstream_host(raw: &str, port: Option<u16>) -> Result<String, String> {
    let host = normalize_host(raw)?;
    Ok(match (port, host.rsplit_once(':')) {
        (Some(p), Some((name, _))) => format!("{name}:{p}"),
        _ => host,
    })
}

/// The value of `SMTP_FORWARD_n` without its line.
fn parse_forward(value: &str, port: Option<u16>) -> Result<ForwardSpec, String> {
    let mut parts = value.split(';');
    let first = parts.next().unwrap_or("").trim();
    let (workers, rest) = match first.split_once('*') {
        Some((count, rest)) => {
            let count = count.trim();
            let n = Some(count)
                .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|c| c.parse::<usize>().ok())
                .filter(|&n| n >= 1)
                .ok_or_else(|| {
                    format!("worker count \"{count}\" is not a number of 1 or more; {FORWARD_FORM}")
                })?;
            (n, rest.trim())
        }
        None => (1, first),
    };
    let (host, window) = match rest.split_once('(') {
        Some((host, w)) => {
            let inner = w.trim_end().strip_suffix(')').ok_or_else(|| {
                format!("the time window \"({w}\" must end with ')' right after it; {FORWARD_FORM}")
            })?;
            let window = parse_window(inner).map_err(|e| format!("time window: {e}"))?;
            (host.trim(), Some(window))
        }
        None => (rest, None),
    };
    if host.is_empty() {
        return Err(format!("the host is empty; {FORWARD_FORM}"));
    }
    let host = upstream_host(host, port)?;
    let mut spec = ForwardSpec {
        workers,
        host,
        window,
        failover: Vec::new(),
        pools: None,
        ignored: Vec::new(),
    };
    let mut pool_seen = false;
    for part in parts {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!(
                "an empty ';' part (a failover host is missing, or a ';' too many); {FORWARD_FORM}"
            ));
        }
        match part.split_once('=') {
            Some((key, letters)) if key.trim().eq_ignore_ascii_case("POOL") => {
                if pool_seen {
                    return Err(
                        "POOL= is given twice; put every letter in one POOL=, e.g. POOL=AB-"
                            .to_string(),
                    );
                }
                pool_seen = true;
                spec.pools = parse_pools(letters.trim())?;
            }
            // LISTSERV has tuning suffixes poolrelay does not know; they are
            // reported and kept as a comment rather than refused.
            Some(_) => spec.ignored.push(part.to_string()),
            None if part.contains('(') => {
                return Err(format!(
                    "a time window applies to the first host only, not to the failover host \"{part}\"; {FORWARD_FORM}"
                ));
            }
            None => spec
                .failover
                .push(upstream_host(part, port).map_err(|e| format!("failover host: {e}"))?),
        }
    }
    Ok(spec)
}

/// The parsed value of an `SMTP_FORWARD_n` line.
struct ForwardSpec {
    workers: usize,
    host: String,
    window: Option<Window>,
    failover: Vec<String>,
    pools: Option<Vec<String>>,
    ignored: Vec<String>,
}

/// `POOL=` letters; `None` for `*` (every pool).
fn parse_pools(letters: &str) -> Result<Option<Vec<String>>, String> {
    if letters == "*" {
        return Ok(None);
    }
    if letters.is_empty() {
        return Err(format!(
            "POOL= names no pool; {POOL_FORM}, or POOL=* for every pool"
        ));
    }
    let mut pools: Vec<String> = Vec::new();
    for c in letters.chars() {
        let p = pool_letter(c).ok_or_else(|| {
            format!(
                "POOL={letters}: \"{c}\" is not a pool; {POOL_FORM}, or POOL=* alone for every pool"
            )
        })?;
        if !pools.contains(&p) {
            pools.push(p);
        }
    }
    Ok(Some(pools))
}

/// A bandwidth cap above zero.
fn cap(s: &str) -> Result<u64, String> {
    match parse_bandwidth(s)? {
        0 => Err(format!(
            "\"{s}\" is a cap of zero, which would stop delivery; {RATE_FORM}"
        )),
        bps => Ok(bps),
    }
}

/// `SMTP_RATE_LIMIT=12Mbps AB:1.5Mbps C:150kbps`.
fn parse_rates(value: &str) -> Result<(Option<u64>, PoolCaps), String> {
    let mut server = None;
    let mut pools: PoolCaps = Vec::new();
    for token in value.split_whitespace() {
        match token.split_once(':') {
            Some((letters, bw)) => {
                if letters.is_empty() || bw.is_empty() {
                    return Err(format!(
                        "\"{token}\" lacks pool letters or a cap; {RATE_FORM}"
                    ));
                }
                let bps = cap(bw)?;
                for c in letters.chars() {
                    let p = pool_letter(c).ok_or_else(|| {
                        format!("\"{token}\": \"{c}\" is not a pool letter; {RATE_FORM}")
                    })?;
                    if pools.iter().any(|(q, _)| *q == p) {
                        return Err(format!(
                            "pool {p} is given two caps; give each pool one cap"
                        ));
                    }
                    pools.push((p, bps));
                }
            }
            None if server.is_some() => {
                return Err(format!(
                    "\"{token}\" is a second server-wide cap; keep one, and prefix pool caps with their letters ({RATE_FORM})"
                ));
            }
            None => server = Some(cap(token)?),
        }
    }
    if server.is_none() && pools.is_empty() {
        return Err(format!("no cap is given; {RATE_FORM}"));
    }
    Ok((server, pools))
}

/// `MYDOMAIN=host1 host2`: lowercase host names (LISTSERV allows `*` wildcards).
fn parse_domains(value: &str) -> Result<Vec<String>, String> {
    let mut hosts: Vec<String> = Vec::new();
    for token in value.split(|c: char| c.is_whitespace() || c == ',') {
        if token.is_empty() {
            continue;
        }
        let lower = token.to_ascii_lowercase();
        let host = lower.strip_suffix('.').unwrap_or(&lower).to_string();
        if !is_host_name(&host.replace('*', "x")) {
            return Err(format!(
                "\"{token}\" is not a host name; write MYDOMAIN=LISTSERV.EXAMPLE.ORG LISTS.EXAMPLE.COM"
            ));
        }
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    }
    if hosts.is_empty() {
        return Err(
            "no host is given; write MYDOMAIN=LISTSERV.EXAMPLE.ORG, or remove the line".to_string(),
        );
    }
    Ok(hosts)
}

/// `DEFAULT_LIST_POOL= x [y]` and `Delivery-Pool= x[,y]`: postings and
/// administrative pool; `y` defaults to `x`.
fn parse_pool_pair(value: &str, form: &str) -> Result<(String, String), String> {
    let words: Vec<&str> = value
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    let pools: Option<Vec<String>> = words.iter().map(|w| pool_word(w)).collect();
    match pools.as_deref() {
        Some([x]) => Ok((x.clone(), x.clone())),
        Some([x, y]) => Ok((x.clone(), y.clone())),
        _ => Err(format!(
            "\"{value}\" is not one or two pools; {form} (pools A-Z, or - for the default pool)"
        )),
    }
}

/// Parses site.cfg. Warnings are pushed in line order.
fn parse_site(
    src: &Source,
    port: Option<u16>,
    warnings: &mut Vec<String>,
) -> Result<Site, ConfigError> {
    let mut site = Site::default();
    let mut vars: HashMap<String, String> = HashMap::new();
    // Line of the last assignment of each imported keyword, to report overrides.
    let mut set_on: HashMap<String, usize> = HashMap::new();
    for (i, raw) in src.text.lines().enumerate() {
        let no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('*') || line.starts_with('#') {
            continue;
        }
        let origin = Origin {
            line: no,
            text: line.to_string(),
        };
        // Unix site.cfg is a shell script: `export NAME...` only makes the
        // variables visible to LISTSERV and carries no setting.
        let assignment = match line
            .strip_prefix("export")
            .filter(|r| r.is_empty() || r.starts_with([' ', '\t']))
        {
            Some(rest) if rest.contains('=') => rest.trim(),
            Some(_) => continue,
            None => line,
        };
        let Some((key, value)) = assignment
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(k, _)| is_identifier(k))
        else {
            skip(src, &mut site, origin, "not a KEYWORD=value line", warnings);
            continue;
        };
        let upper = key.to_ascii_uppercase();
        let forward_n = upper
            .strip_prefix("SMTP_FORWARD_")
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u64>().ok());
        let imported = forward_n.is_some()
            || matches!(
                upper.as_str(),
                "SMTP_FORWARD" | "DEFAULT_LIST_POOL" | "SMTP_RATE_LIMIT" | "MYDOMAIN"
            );
        if !imported {
            // Remembered for `$NAME` in later lines (e.g. NODE in MYDOMAIN).
            if let Ok(v) = unquote(value) {
                let v = substitute(v, &vars).unwrap_or_else(|_| v.to_string());
                vars.insert(upper, v);
            }
            let why = format!("poolrelay has no setting for {key}");
            skip(src, &mut site, origin, &why, warnings);
            continue;
        }
        let value = unquote(value).map_err(|m| src.err(no, format!("{key}: {m}")))?;
        let value = substitute(value, &vars).map_err(|name| {
            src.err(
                no,
                format!(
                    "{key} refers to ${name}, which this file does not set above this line; set {name} above it or write the value out"
                ),
            )
        })?;
        vars.insert(upper.clone(), value.clone());
        let value = value.trim();
        if value.is_empty() {
            return Err(src.err(
                no,
                format!("{key} is empty; give it a value or remove the line"),
            ));
        }
        let slot = match forward_n {
            Some(n) => format!("SMTP_FORWARD_{n}"),
            None => upper.clone(),
        };
        if let Some(earlier) = set_on.insert(slot.clone(), no) {
            override_earlier(src, &mut site, &slot, earlier, no, warnings);
        }
        match (forward_n, upper.as_str()) {
            (Some(n), _) => {
                let spec =
                    parse_forward(value, port).map_err(|m| src.err(no, format!("{slot}: {m}")))?;
                for part in &spec.ignored {
                    warnings.push(src.warn(
                        no,
                        &format!("{slot}: \";{part}\" not imported (poolrelay has no such setting; kept as a comment)"),
                    ));
                }
                site.forwards.insert(
                    n,
                    Forward {
                        n,
                        origin,
                        workers: spec.workers,
                        host: spec.host,
                        window: spec.window,
                        failover: spec.failover,
                        pools: spec.pools,
                        ignored: spec.ignored,
                    },
                );
            }
            (None, "SMTP_FORWARD") => {
                let host =
                    upstream_host(value, port).map_err(|m| src.err(no, format!("{key}: {m}")))?;
                site.fallback = Some((host, origin));
            }
            (None, "DEFAULT_LIST_POOL") => {
                let (postings, admin) =
                    parse_pool_pair(value, "write DEFAULT_LIST_POOL=A, or DEFAULT_LIST_POOL=A B for postings in A and administrative mail in B")
                        .map_err(|m| src.err(no, format!("{key}: {m}")))?;
                site.list_pool = Some(ListPool {
                    postings,
                    admin,
                    origin,
                });
            }
            (None, "SMTP_RATE_LIMIT") => {
                let (server, pools) =
                    parse_rates(value).map_err(|m| src.err(no, format!("{key}: {m}")))?;
                site.rates = Some(Rates {
                    server,
                    pools,
                    origin,
                });
            }
            _ => {
                let hosts = parse_domains(value).map_err(|m| src.err(no, format!("{key}: {m}")))?;
                site.domains = Some((hosts, origin));
            }
        }
    }
    Ok(site)
}

/// Keeps a line as a `# not imported:` comment and warns about it.
fn skip(src: &Source, site: &mut Site, origin: Origin, why: &str, warnings: &mut Vec<String>) {
    warnings.push(src.warn(
        origin.line,
        &format!("not imported ({why}; kept as a comment): {}", origin.text),
    ));
    site.skipped.push(Skipped {
        origin,
        overridden_by: None,
    });
}

/// The keyword `slot` was set on line `earlier` and again on `now`: the later
/// value wins, so the earlier one becomes a comment.
fn override_earlier(
    src: &Source,
    site: &mut Site,
    slot: &str,
    earlier: usize,
    now: usize,
    warnings: &mut Vec<String>,
) {
    let origin = match slot {
        "SMTP_FORWARD" => site.fallback.take().map(|(_, o)| o),
        "DEFAULT_LIST_POOL" => site.list_pool.take().map(|l| l.origin),
        "SMTP_RATE_LIMIT" => site.rates.take().map(|r| r.origin),
        "MYDOMAIN" => site.domains.take().map(|(_, o)| o),
        _ => slot
            .strip_prefix("SMTP_FORWARD_")
            .and_then(|n| n.parse::<u64>().ok())
            .and_then(|n| site.forwards.remove(&n))
            .map(|f| f.origin),
    };
    if let Some(origin) = origin {
        warnings.push(src.warn(
            earlier,
            &format!("{slot} is set again on line {now}; the later value is used and this line is kept as a comment"),
        ));
        site.skipped.push(Skipped {
            origin,
            overridden_by: Some(now),
        });
    }
}

/// A list and what its header says.
#[derive(Debug)]
struct List {
    name: String,
    file: String,
    /// `Delivery-Pool= x,y`: (postings, admin, line).
    delivery: Option<(String, String, usize)>,
    /// `List-Address=`: (local part if given, host, line).
    address: Option<(Option<String>, String, usize)>,
}

/// `Keyword=` at the start of a token: the keyword and the rest of the token.
fn keyword_token(token: &str) -> Option<(&str, &str)> {
    let (kw, rest) = token.split_once('=')?;
    let mut chars = kw.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    ok.then_some((kw, rest))
}

/// The `Keyword= value` pairs of one list header line (after the `*`): a
/// value runs until the next `Keyword=` token, as LISTSERV writes several
/// keywords on one line.
fn keyword_pairs(body: &str) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for token in body.split_whitespace() {
        if let Some((kw, rest)) = keyword_token(token) {
            pairs.push((kw.to_string(), rest.to_string()));
        } else if let Some((_, value)) = pairs.last_mut() {
            if !value.is_empty() {
                value.push(' ');
            }
            value.push_str(token);
        }
        // Text before the first keyword is the list title or a comment.
    }
    pairs
}

/// `List-Address= name@host` or `List-Address= host`.
fn parse_list_address(value: &str) -> Result<(Option<String>, String), String> {
    const FORM: &str =
        "write List-Address= LISTNAME@LISTS.EXAMPLE.ORG or List-Address= LISTS.EXAMPLE.ORG";
    let v = value.trim();
    let (local, host) = match v.split_once('@') {
        Some((local, host)) => {
            check_list_name(local).map_err(|e| format!("{e}; {FORM}"))?;
            (Some(local.to_ascii_lowercase()), host)
        }
        None => (None, v),
    };
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    if !is_host_name(host) {
        return Err(format!("\"{value}\" is not a list address; {FORM}"));
    }
    Ok((local, host.to_string()))
}

/// Parses one list header file.
fn parse_list(name: &str, src: &Source, warnings: &mut Vec<String>) -> Result<List, ConfigError> {
    check_list_name(name).map_err(|m| src.err(0, m))?;
    let mut list = List {
        name: name.to_string(),
        file: src.short(),
        delivery: None,
        address: None,
    };
    let mut skipped: Vec<String> = Vec::new();
    for (i, raw) in src.text.lines().enumerate() {
        let no = i + 1;
        let line = raw.trim();
        let Some(body) = line.strip_prefix('*') else {
            // Subscriber records and `PUT` lines are expected here; only a
            // keyword without its `*` is probably a mistake worth reporting.
            if line
                .split_whitespace()
                .next()
                .and_then(keyword_token)
                .is_some()
            {
                warnings.push(src.warn(
                    no,
                    &format!("ignored: \"{line}\" is not a list header line (header lines start with '*', e.g. * Delivery-Pool= B,A)"),
                ));
            }
            continue;
        };
        for (kw, value) in keyword_pairs(body) {
            match kw.to_ascii_lowercase().as_str() {
                "delivery-pool" => {
                    let (x, y) = parse_pool_pair(
                        &value,
                        "write Delivery-Pool= x or Delivery-Pool= x,y (postings to x, administrative mail to y), e.g. Delivery-Pool= B,A",
                    )
                    .map_err(|m| src.err(no, format!("Delivery-Pool: {m}")))?;
                    if let Some((_, _, earlier)) = list.delivery.replace((x, y, no)) {
                        warnings.push(src.warn(
                            earlier,
                            &format!(
                                "Delivery-Pool is given again on line {no}; the later one is used"
                            ),
                        ));
                    }
                }
                "list-address" => {
                    let (local, host) = parse_list_address(&value)
                        .map_err(|m| src.err(no, format!("List-Address: {m}")))?;
                    if let Some((_, _, earlier)) = list.address.replace((local, host, no)) {
                        warnings.push(src.warn(
                            earlier,
                            &format!(
                                "List-Address is given again on line {no}; the later one is used"
                            ),
                        ));
                    }
                }
                _ => {
                    if !skipped.iter().any(|s| s.eq_ignore_ascii_case(&kw)) {
                        skipped.push(kw);
                    }
                }
            }
        }
    }
    if !skipped.is_empty() {
        warnings.push(format!(
            "{}: list {name}: keywords with no relay meaning were skipped: {}",
            src.path.display(),
            skipped.join(", ")
        ));
    }
    Ok(list)
}

/// Parses everything and renders the TOML; the testable core of [`import_listserv`].
fn import_sources(
    site_src: &Source,
    lists: &[(String, Source)],
    opts: &ImportOptions,
) -> Result<Import, ConfigError> {
    if opts.port == Some(0) {
        return Err(site_src.err(0, "--port 0 is not a port; use 1-65535".to_string()));
    }
    let mut warnings = Vec::new();
    let site = parse_site(site_src, opts.port, &mut warnings)?;
    let mut parsed: Vec<List> = Vec::new();
    for (name, src) in lists {
        let list = parse_list(name, src, &mut warnings)?;
        if let Some(other) = parsed
            .iter()
            .find(|l| l.name.eq_ignore_ascii_case(&list.name))
        {
            return Err(src.err(
                0,
                format!(
                    "list {} is given twice (also {}); give each list once",
                    list.name, other.file
                ),
            ));
        }
        parsed.push(list);
    }
    let toml = render(site_src, &site, &parsed, opts, &mut warnings);
    let source = PathBuf::from(format!("{} (imported)", site_src.path.display()));
    let config = Config::parse(&toml, &source).map_err(|e| {
        site_src.err(
            0,
            format!(
                "the imported config is not valid on its line {}: {} (check the import options)",
                e.line, e.message
            ),
        )
    })?;
    Ok(Import {
        toml,
        warnings,
        config,
    })
}

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Text safe inside a TOML comment (no control characters but tab).
fn c(s: &str) -> String {
    s.chars()
        .map(|ch| {
            if ch.is_control() && ch != '\t' {
                '?'
            } else {
                ch
            }
        })
        .collect()
}

/// A TOML key for a pool table: `A` bare, `-` quoted.
fn pool_key(p: &str) -> String {
    if p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        p.to_string()
    } else {
        q(p)
    }
}

/// `pool A`, `pools A and "-"`, `pools A, B and "-"`, `every pool`.
fn pools_phrase(pools: Option<&[String]>) -> String {
    let Some(pools) = pools else {
        return "every pool".to_string();
    };
    let names: Vec<String> = pools
        .iter()
        .map(|p| if p == DEFAULT_POOL { q(p) } else { p.clone() })
        .collect();
    match names.as_slice() {
        [one] => format!("pool {one}"),
        [init @ .., last] => format!("pools {} and {last}", init.join(", ")),
        [] => "no pool".to_string(),
    }
}

/// Up to three names, then a count, so a pool serving hundreds of lists
/// keeps a readable description.
fn some_names(names: &[String]) -> String {
    if names.len() <= 3 {
        names.join(", ")
    } else {
        format!("{} and {} more", names[..3].join(", "), names.len() - 3)
    }
}

/// What one pool carries and where it is named, for its description.
#[derive(Debug, Default)]
struct PoolUse {
    default_postings: bool,
    default_admin: bool,
    /// Lists whose postings and administrative mail both go here.
    whole: Vec<String>,
    postings: Vec<String>,
    admin: Vec<String>,
    forwards: Vec<String>,
    rate: Option<u64>,
}

impl PoolUse {
    fn description(&self, name: &str) -> String {
        let mut parts: Vec<String> = Vec::new();
        if name == DEFAULT_POOL {
            parts.push(DEFAULT_POOL_DESCRIPTION.to_string());
        }
        match (self.default_postings, self.default_admin) {
            (true, true) => {
                parts.push("list mail of lists without Delivery-Pool (DEFAULT_LIST_POOL)".into());
            }
            (true, false) => {
                parts.push("postings of lists without Delivery-Pool (DEFAULT_LIST_POOL)".into());
            }
            (false, true) => parts.push(
                "administrative mail of lists without Delivery-Pool (DEFAULT_LIST_POOL)".into(),
            ),
            (false, false) => {}
        }
        if !self.whole.is_empty() {
            parts.push(format!(
                "list mail of {} (Delivery-Pool)",
                some_names(&self.whole)
            ));
        }
        if !self.postings.is_empty() {
            parts.push(format!(
                "postings of {} (Delivery-Pool)",
                some_names(&self.postings)
            ));
        }
        if !self.admin.is_empty() {
            parts.push(format!(
                "administrative mail of {} (Delivery-Pool)",
                some_names(&self.admin)
            ));
        }
        if parts.is_empty() {
            // Named only by worker lines or rate limits: say so rather than
            // leave the description empty.
            parts.push(format!("LISTSERV pool {name}"));
        }
        if !self.forwards.is_empty() {
            parts.push(format!("served by {}", some_names(&self.forwards)));
        }
        if self.rate.is_some() {
            parts.push("capped by SMTP_RATE_LIMIT".to_string());
        }
        parts.join("; ")
    }
}

/// A worker group to write as `[[upstream]]`.
struct UpstreamOut<'a> {
    comment: Vec<String>,
    host: &'a str,
    workers: usize,
    pools: Option<&'a [String]>,
    failover: &'a [String],
    window: Option<Window>,
}

/// A `[[route]]` to write.
struct RouteOut {
    comment: Vec<String>,
    pool: String,
    sender: String,
    /// The `Sender:` header glob of a posting route.
    header: Option<String>,
}

/// Writes the config. Infallible: the caller validates the text.
fn render(
    src: &Source,
    site: &Site,
    lists: &[List],
    opts: &ImportOptions,
    warnings: &mut Vec<String>,
) -> String {
    let file = src.short();
    let at = |o: &Origin| format!("{file}:{}", o.line);
    let mut o = String::new();

    // Pools and what they carry.
    let mut uses: BTreeMap<String, PoolUse> = BTreeMap::new();
    uses.entry(DEFAULT_POOL.to_string()).or_default();
    if let Some(lp) = &site.list_pool {
        uses.entry(lp.postings.clone())
            .or_default()
            .default_postings = true;
        uses.entry(lp.admin.clone()).or_default().default_admin = true;
    }
    for f in site.forwards.values() {
        for p in f.pools.iter().flatten() {
            let u = uses.entry(p.clone()).or_default();
            u.forwards.push(format!("SMTP_FORWARD_{}", f.n));
        }
    }
    if let Some(r) = &site.rates {
        for (p, bps) in &r.pools {
            uses.entry(p.clone()).or_default().rate = Some(*bps);
        }
    }
    // A list's pools: its Delivery-Pool, else DEFAULT_LIST_POOL when that
    // splits postings from administrative mail (a single default needs no
    // route: defaults.list_pool catches it).
    let list_pools: Vec<Option<(String, String)>> = lists
        .iter()
        .map(|l| match (&l.delivery, &site.list_pool) {
            (Some((x, y, _)), _) => Some((x.clone(), y.clone())),
            (None, Some(lp)) if lp.postings != lp.admin => {
                Some((lp.postings.clone(), lp.admin.clone()))
            }
            _ => None,
        })
        .collect();
    for (l, pools) in lists.iter().zip(&list_pools) {
        if let (Some((x, y)), Some(_)) = (pools, &l.delivery) {
            if x == y {
                uses.entry(x.clone())
                    .or_default()
                    .whole
                    .push(l.name.clone());
            } else {
                uses.entry(x.clone())
                    .or_default()
                    .postings
                    .push(l.name.clone());
                uses.entry(y.clone())
                    .or_default()
                    .admin
                    .push(l.name.clone());
            }
        }
    }
    let pool_names: Vec<&String> = uses
        .keys()
        .filter(|p| p.as_str() != DEFAULT_POOL)
        .chain(uses.keys().filter(|p| p.as_str() == DEFAULT_POOL))
        .collect();

    // Worker groups; with no SMTP_FORWARD_n LISTSERV delivers everything
    // itself through SMTP_FORWARD, so that host becomes the one upstream.
    let mut upstreams: Vec<UpstreamOut<'_>> = Vec::new();
    for f in site.forwards.values() {
        let mut comment = vec![format!("{}  ({})", c(&f.origin.text), at(&f.origin))];
        let workers = if f.workers == 1 {
            "1 worker".to_string()
        } else {
            format!("{} workers", f.workers)
        };
        comment.push(format!(
            "{workers} for {} through {}.",
            pools_phrase(f.pools.as_deref()),
            f.host
        ));
        let failover = f.failover.join(", then ");
        match (f.window, f.failover.is_empty()) {
            (Some(w), false) => {
                comment.push(format!(
                    "Inside {w} (local time) through {}; the rest of the day,",
                    f.host
                ));
                comment.push(format!("and whenever it is down, through {failover}."));
            }
            (Some(w), true) => comment.push(format!(
                "Only inside {w} (local time); outside it these workers idle and their mail waits."
            )),
            (None, false) => comment.push(format!("When {} is down: {failover}.", f.host)),
            (None, true) => {}
        }
        for part in &f.ignored {
            comment.push(format!("not imported: ;{}", c(part)));
        }
        upstreams.push(UpstreamOut {
            comment,
            host: &f.host,
            workers: f.workers,
            pools: f.pools.as_deref(),
            failover: &f.failover,
            window: f.window,
        });
    }
    if upstreams.is_empty() {
        if let Some((host, origin)) = &site.fallback {
            warnings.push(src.warn(
                origin.line,
                "no SMTP_FORWARD_n line: LISTSERV delivers all mail through SMTP_FORWARD itself, so it becomes one upstream with 1 worker for every pool",
            ));
            upstreams.push(UpstreamOut {
                comment: vec![
                    format!("{}  ({})", c(&origin.text), at(origin)),
                    "No SMTP_FORWARD_n: LISTSERV delivers all mail itself through SMTP_FORWARD;"
                        .to_string(),
                    "here 1 worker does it for every pool. Raise workers for more throughput."
                        .to_string(),
                ],
                host,
                workers: 1,
                pools: None,
                failover: &[],
                window: None,
            });
        } else {
            warnings.push(format!(
                "{}: neither SMTP_FORWARD nor SMTP_FORWARD_n is set, so the config has no [[upstream]] and delivers nothing; add one",
                src.path.display()
            ));
        }
    }
    let serves_all = upstreams.iter().any(|u| u.pools.is_none());
    let unserved: Vec<&String> = pool_names
        .iter()
        .copied()
        .filter(|p| {
            !serves_all
                && !upstreams.is_empty()
                && !upstreams
                    .iter()
                    .any(|u| u.pools.is_some_and(|ps| ps.contains(p)))
        })
        .collect();
    for p in &unserved {
        warnings.push(format!(
            "{}: pool {p} is served by no SMTP_FORWARD_n, so its mail would wait in the queue; add {p} to a POOL= (or an [[upstream]] for it)",
            src.path.display()
        ));
    }

    // Header.
    let mut sources = vec![file.clone()];
    sources.extend(lists.iter().map(|l| l.file.clone()));
    let _ = writeln!(
        o,
        "# poolrelay config imported from LISTSERV by `poolrelay import-listserv`."
    );
    let _ = writeln!(o, "# Sources: {}.", c(&sources.join(", ")));
    let _ = writeln!(
        o,
        "# Each setting names the LISTSERV line it comes from; lines with no poolrelay"
    );
    let _ = writeln!(
        o,
        "# equivalent are kept as comments at the end. Check it with `poolrelay check --print`."
    );
    if let Some(p) = opts.port {
        let _ = writeln!(o, "# --port {p}: every upstream host uses port {p}.");
    }

    // [server]
    let _ = writeln!(o, "\n[server]");
    let hostname = site
        .domains
        .as_ref()
        .and_then(|(hosts, origin)| hosts.iter().find(|h| !h.contains('*')).map(|h| (h, origin)));
    match hostname {
        Some((h, origin)) => {
            let _ = writeln!(
                o,
                "# Banner, EHLO name and DSN sender domain: the first MYDOMAIN host ({}).",
                at(origin)
            );
            let _ = writeln!(o, "hostname = {}", q(h));
        }
        None => {
            let _ = writeln!(
                o,
                "# hostname (banner, EHLO name, DSN sender domain) defaults to this machine's name."
            );
        }
    }
    let spool = opts
        .spool_dir
        .as_ref()
        .map_or_else(|| "var/spool".to_string(), |p| p.display().to_string());
    let _ = writeln!(o, "spool_dir = {}", q(&spool));
    if !opts.hosts.is_empty() {
        let entries: Vec<String> = opts
            .hosts
            .iter()
            .map(|(name, addr)| format!("{} = {}", q(&name.to_ascii_lowercase()), q(addr)))
            .collect();
        let _ = writeln!(o, "# Addresses used instead of DNS for these host names.");
        let _ = writeln!(o, "hosts = {{ {} }}", entries.join(", "));
    }

    // [[listener]]
    let listen = opts
        .listen
        .map_or_else(|| "127.0.0.1:2525".to_string(), |a| a.to_string());
    let _ = writeln!(
        o,
        "\n# LISTSERV hands its mail here: point SMTP_FORWARD and the SMTP_FORWARD_n workers"
    );
    let _ = writeln!(
        o,
        "# at this address, and the routes below choose the pool as LISTSERV would."
    );
    let _ = writeln!(o, "[[listener]]\naddress = {}", q(&listen));
    let example = uses
        .keys()
        .find(|p| p.as_str() == "B")
        .or_else(|| uses.keys().find(|p| p.as_str() != DEFAULT_POOL))
        .map_or(DEFAULT_POOL, String::as_str);
    let example_forward = site
        .forwards
        .values()
        .find(|f| f.pools.as_deref() == Some(&[example.to_string()]))
        .map(|f| format!(" (SMTP_FORWARD_{})", f.n))
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "\n# Pool by listener address, the alternative where LISTSERV keeps choosing the pool:"
    );
    let _ = writeln!(
        o,
        "# give poolrelay a second address and point LISTSERV's pool-{example} workers at it{example_forward}."
    );
    let _ = writeln!(
        o,
        "# Everything accepted there goes to pool {example}, whatever the routes say:"
    );
    let _ = writeln!(
        o,
        "# [[listener]]\n# address = \"127.0.0.2:2525\"\n# pool = {}",
        q(example)
    );

    // [admin]
    let admin = opts
        .admin
        .map_or_else(|| "127.0.0.1:9025".to_string(), |a| a.to_string());
    let _ = writeln!(o, "\n# /metrics, /healthz and the queue API.");
    let _ = writeln!(o, "[admin]\naddress = {}", q(&admin));

    // [defaults]
    let _ = writeln!(o, "\n[defaults]");
    match &site.list_pool {
        Some(lp) => {
            let _ = writeln!(o, "# {}  ({})", c(&lp.origin.text), at(&lp.origin));
            let _ = writeln!(
                o,
                "# The pool of list mail (owner-*@ senders) that no route below claims."
            );
            if lp.postings != lp.admin {
                let _ = writeln!(
                    o,
                    "# Its administrative pool {} applies through routes to the lists imported below only.",
                    q(&lp.admin)
                );
                warnings.push(src.warn(
                    lp.origin.line,
                    &format!(
                        "DEFAULT_LIST_POOL: administrative mail of lists not imported goes to {} with their postings; import their headers to route it to {}",
                        lp.postings, lp.admin
                    ),
                ));
            }
            let _ = writeln!(o, "list_pool = {}", q(&lp.postings));
        }
        None => {
            let _ = writeln!(
                o,
                "# No DEFAULT_LIST_POOL: LISTSERV puts list mail in the default pool \"-\"."
            );
            let _ = writeln!(o, "list_pool = {}", q(DEFAULT_POOL));
        }
    }
    if let Some((host, origin)) = &site.fallback {
        let _ = writeln!(o, "# {}  ({})", c(&origin.text), at(origin));
        let _ = writeln!(
            o,
            "# The site fallback, used when a worker's own hosts cannot be reached."
        );
        let _ = writeln!(o, "fallback = [{}]", q(host));
    }
    if let Some(r) = &site.rates
        && let Some(bps) = r.server
    {
        let _ = writeln!(o, "# {}  ({})", c(&r.origin.text), at(&r.origin));
        let _ = writeln!(
            o,
            "# The server-wide cap; each message is held to it and to its pool's cap,"
        );
        let _ = writeln!(o, "# whichever is stricter at the moment.");
        let _ = writeln!(o, "rate_limit = {}", q(&format_bandwidth(bps)));
    }
    let _ = writeln!(
        o,
        "# retry and max_age keep poolrelay's defaults (1m 5m 15m 30m 1h 2h 4h, 5d)."
    );

    // Pools.
    let _ = writeln!(
        o,
        "\n# Pools: LISTSERV's letters A-Z that the import names, plus the default pool \"-\"."
    );
    for name in &pool_names {
        let Some(u) = uses.get(*name) else { continue };
        let _ = writeln!(o, "[pool.{}]", pool_key(name));
        let _ = writeln!(o, "description = {}", q(&u.description(name)));
        if let (Some(bps), Some(r)) = (u.rate, &site.rates) {
            let _ = writeln!(
                o,
                "rate_limit = {}   # SMTP_RATE_LIMIT ({})",
                q(&format_bandwidth(bps)),
                at(&r.origin)
            );
        }
        if unserved.contains(name) {
            let _ = writeln!(
                o,
                "# No [[upstream]] serves this pool: its mail waits until one does."
            );
        }
    }

    // Upstreams.
    let _ = writeln!(
        o,
        "\n# Worker groups, one per SMTP_FORWARD_n line. An upstream without `pools` serves every pool."
    );
    for u in &upstreams {
        for line in &u.comment {
            let _ = writeln!(o, "# {line}");
        }
        let _ = writeln!(o, "[[upstream]]\nhost = {}", q(u.host));
        let _ = writeln!(o, "workers = {}", u.workers);
        if let Some(pools) = u.pools {
            let list: Vec<String> = pools.iter().map(|p| q(p)).collect();
            let _ = writeln!(o, "pools = [{}]", list.join(", "));
        }
        if !u.failover.is_empty() {
            let list: Vec<String> = u.failover.iter().map(|h| q(h)).collect();
            let _ = writeln!(o, "failover = [{}]", list.join(", "));
        }
        if let Some(w) = u.window {
            let _ = writeln!(o, "window = {}", q(&w.to_string()));
        }
        let _ = writeln!(o);
    }

    // Routes.
    let routes = build_routes(site, lists, &list_pools, &at);
    let _ = writeln!(
        o,
        "# Routes: the first that matches wins. They reproduce LISTSERV's choice of pool with"
    );
    let _ = writeln!(
        o,
        "# general matchers: envelope sender and header globs, both case-insensitive."
    );
    for r in &routes {
        let _ = writeln!(o);
        for line in &r.comment {
            let _ = writeln!(o, "# {line}");
        }
        let _ = writeln!(
            o,
            "[[route]]\npool = {}\nsender = {}",
            q(&r.pool),
            q(&r.sender)
        );
        if let Some(h) = &r.header {
            let _ = writeln!(o, "header = {{ name = \"Sender\", value = {} }}", q(h));
        }
    }
    let list_pool = site
        .list_pool
        .as_ref()
        .map_or(DEFAULT_POOL, |lp| lp.postings.as_str());
    let _ = writeln!(
        o,
        "\n# Lists without Delivery-Pool need no route: mail from any other owner-*@ sender goes"
    );
    let _ = writeln!(
        o,
        "# to defaults.list_pool ({}), everything else to the default pool \"-\".",
        q(list_pool)
    );
    let plain: Vec<String> = lists
        .iter()
        .zip(&list_pools)
        .filter(|(_, p)| p.is_none())
        .map(|(l, _)| l.name.clone())
        .collect();
    if !plain.is_empty() {
        let _ = writeln!(
            o,
            "# Imported lists that rely on it: {}.",
            c(&plain.join(", "))
        );
    }

    // Not imported.
    if !site.skipped.is_empty() {
        let mut skipped: Vec<&Skipped> = site.skipped.iter().collect();
        skipped.sort_by_key(|s| s.origin.line);
        let _ = writeln!(
            o,
            "\n# Lines of {} with no poolrelay equivalent (each also reported as a warning):",
            c(&file)
        );
        for s in skipped {
            match s.overridden_by {
                Some(n) => {
                    let _ = writeln!(o, "# overridden by line {n}: {}", c(&s.origin.text));
                }
                None => {
                    let _ = writeln!(o, "# not imported: {}", c(&s.origin.text));
                }
            }
        }
    }
    o
}

/// The routes, in the order that gives LISTSERV's semantics under first-match-wins.
fn build_routes(
    site: &Site,
    lists: &[List],
    list_pools: &[Option<(String, String)>],
    at: &dyn Fn(&Origin) -> String,
) -> Vec<RouteOut> {
    let dash = DEFAULT_POOL.to_string();
    let domains: Vec<String> = site
        .domains
        .as_ref()
        .map_or_else(|| vec!["*".to_string()], |(hosts, _)| hosts.clone());
    let mut out = vec![RouteOut {
        comment: vec![
            "The null sender <>: bounces, and replies LISTSERV sends without a return path,"
                .to_string(),
            "always go to the default pool \"-\".".to_string(),
        ],
        pool: dash.clone(),
        sender: String::new(),
        header: None,
    }];
    for (i, host) in domains.iter().enumerate() {
        let comment = if i > 0 {
            Vec::new()
        } else {
            let whence = match &site.domains {
                Some((_, origin)) => format!("one route per MYDOMAIN host, {}", at(origin)),
                None => "no MYDOMAIN in site.cfg, so any host".to_string(),
            };
            vec![
                "Command replies and posting rejections come from LISTSERV@ and always go to the"
                    .to_string(),
                format!("default pool \"-\" ({whence})."),
            ]
        };
        out.push(RouteOut {
            comment,
            pool: dash.clone(),
            sender: format!("listserv@{host}"),
            header: None,
        });
    }
    for (l, pools) in lists.iter().zip(list_pools) {
        let Some((x, y)) = pools else { continue };
        let local = l
            .address
            .as_ref()
            .and_then(|(local, _, _)| local.clone())
            .unwrap_or_else(|| l.name.to_ascii_lowercase());
        let (hosts, whence) = match (&l.address, &site.domains) {
            (Some((_, host, line)), _) => (
                vec![host.clone()],
                format!("Host: its List-Address ({}:{line}).", l.file),
            ),
            (None, Some((hosts, _))) => (
                hosts.clone(),
                "Hosts: each MYDOMAIN host (no List-Address).".to_string(),
            ),
            (None, None) => (
                vec!["*".to_string()],
                "Host: any (no List-Address, no MYDOMAIN).".to_string(),
            ),
        };
        let why = match (&l.delivery, &site.list_pool) {
            (Some((_, _, line)), _) if x == y => {
                format!("Delivery-Pool= {x} ({}:{line})", l.file)
            }
            (Some((_, _, line)), _) => format!("Delivery-Pool= {x},{y} ({}:{line})", l.file),
            (None, Some(lp)) => format!(
                "no Delivery-Pool, so {}  ({})",
                c(&lp.origin.text),
                at(&lp.origin)
            ),
            (None, None) => String::new(),
        };
        for (i, host) in hosts.iter().enumerate() {
            let sender = format!("owner-{local}@{host}");
            let first = i == 0;
            if x == y {
                let mut comment = Vec::new();
                if first {
                    comment.push(format!("List {}: {why}. {whence}", l.name));
                    comment.push(format!(
                        "Postings and administrative mail both come from owner-{local}@: pool {x}."
                    ));
                }
                out.push(RouteOut {
                    comment,
                    pool: x.clone(),
                    sender,
                    header: None,
                });
                continue;
            }
            // Anchored globs: `Sender: LIST@host` or `Sender: Name <LIST@host>`,
            // never `owner-LIST@host` (which must stay administrative mail).
            let address = format!("{local}@{host}");
            let mut comment = Vec::new();
            if first {
                comment.push(format!("List {}: {why}. {whence}", l.name));
                comment.push(format!(
                    "Postings come from owner-{local}@ with a Sender: header naming {local}@: pool {x}."
                ));
                comment.push(
                    "Two routes: a bare Sender: address, then one with a display name.".to_string(),
                );
            } else {
                comment.push(format!("List {}, postings via {host}: pool {x}.", l.name));
            }
            out.push(RouteOut {
                comment,
                pool: x.clone(),
                sender: sender.clone(),
                header: Some(address.clone()),
            });
            out.push(RouteOut {
                comment: Vec::new(),
                pool: x.clone(),
                sender: sender.clone(),
                header: Some(format!("*<{address}>")),
            });
            out.push(RouteOut {
                comment: vec![
                    format!(
                        "Other mail from owner-{local}@{host} is the list's administrative mail (welcome"
                    ),
                    format!("messages, error reports, bounces it processed): pool {y}."),
                ],
                pool: y.clone(),
                sender,
                header: None,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests;
