//! Reading `site.cfg` (Windows) or `go.user` (unix): the SMTP worker lines,
//! the list pools, rate limits and MYDOMAIN, with `$NAME`/`%NAME%` substituted.

use std::collections::{BTreeMap, HashMap};

use super::{Origin, Source};
use crate::units::{is_host_name, normalize_host, parse_bandwidth, parse_window};
use crate::{ConfigError, DEFAULT_POOL, Window};

/// An `SMTP_FORWARD_n` line.
#[derive(Debug)]
pub(super) struct Forward {
    pub(super) n: u64,
    pub(super) origin: Origin,
    pub(super) workers: usize,
    pub(super) host: String,
    pub(super) window: Option<Window>,
    pub(super) failover: Vec<String>,
    /// `None`: every pool (`POOL=*` or no `POOL=`).
    pub(super) pools: Option<Vec<String>>,
    /// `;KEY=value` suffixes other than `POOL=`, kept as comments.
    pub(super) ignored: Vec<String>,
}

/// `DEFAULT_LIST_POOL= x [y]`.
#[derive(Debug)]
pub(super) struct ListPool {
    pub(super) postings: String,
    pub(super) admin: String,
    pub(super) origin: Origin,
}

/// Per-pool caps of `SMTP_RATE_LIMIT`, in bits per second, in the order written.
pub(super) type PoolCaps = Vec<(String, u64)>;

/// `SMTP_RATE_LIMIT`.
#[derive(Debug)]
pub(super) struct Rates {
    pub(super) server: Option<u64>,
    pub(super) pools: PoolCaps,
    pub(super) origin: Origin,
}

/// A site.cfg line that is not imported, kept as a comment.
#[derive(Debug)]
pub(super) struct Skipped {
    pub(super) origin: Origin,
    /// `Some(n)`: the same keyword is set again on line n.
    pub(super) overridden_by: Option<usize>,
}

/// What site.cfg says, after parsing.
#[derive(Debug, Default)]
pub(super) struct Site {
    pub(super) fallback: Option<(String, Origin)>,
    pub(super) forwards: BTreeMap<u64, Forward>,
    pub(super) list_pool: Option<ListPool>,
    pub(super) rates: Option<Rates>,
    pub(super) domains: Option<(Vec<String>, Origin)>,
    /// `MAXBSMTP`: most recipients LISTSERV puts in one envelope.
    pub(super) max_bsmtp: Option<(usize, Origin)>,
    pub(super) skipped: Vec<Skipped>,
}

pub(super) const FORWARD_FORM: &str = "write SMTP_FORWARD_n=[count*]host[(hh:mm-hh:mm)][;failoverhost][;POOL=letters], \
     e.g. SMTP_FORWARD_1=2*SMTP.EXAMPLE.ORG(00:00-05:00);BACKUP.EXAMPLE.ORG;POOL=A-";
pub(super) const POOL_FORM: &str =
    "pools are the letters A-Z and - (the default pool), e.g. POOL=A- for pools A and -";
pub(super) const RATE_FORM: &str = "write SMTP_RATE_LIMIT=12Mbps AB:1.5Mbps C:150kbps (a server-wide cap, \
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
pub(super) fn unquote(value: &str) -> Result<&str, String> {
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
pub(super) fn substitute(value: &str, vars: &HashMap<String, String>) -> Result<String, String> {
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
        not_hosts: Vec::new(),
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
            // A bare word (no domain, no address) is more likely one of
            // LISTSERV's tuning tokens than a host: reported, not used.
            None if !part.contains(['.', ':', '[']) => {
                spec.ignored.push(part.to_string());
                spec.not_hosts.push(part.to_string());
            }
            None => spec
                .failover
                .push(upstream_host(part, port).map_err(|e| format!("failover host: {e}"))?),
        }
    }
    Ok(spec)
}

/// The parsed value of an `SMTP_FORWARD_n` line.
pub(super) struct ForwardSpec {
    pub(super) workers: usize,
    pub(super) host: String,
    pub(super) window: Option<Window>,
    pub(super) failover: Vec<String>,
    pub(super) pools: Option<Vec<String>>,
    pub(super) ignored: Vec<String>,
    /// Bare `;word` parts that are not host names (also in `ignored`).
    pub(super) not_hosts: Vec<String>,
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
pub(super) fn parse_pool_pair(value: &str, form: &str) -> Result<(String, String), String> {
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
pub(super) fn parse_site(
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
                "SMTP_FORWARD" | "DEFAULT_LIST_POOL" | "SMTP_RATE_LIMIT" | "MYDOMAIN" | "MAXBSMTP"
            );
        if upper == "DEFAULT_DIST_POOL" {
            // Its own advice: the generic "no setting" would hide that
            // option (b) of README keeps LISTSERV's choice for DISTRIBUTE.
            warnings.push(src.warn(
                no,
                &format!(
                    "not imported (kept as a comment): {key}={value}: which mail is DISTRIBUTE traffic cannot be seen in the mail, so no route can send it to its pool; \
                     to keep LISTSERV's choice, pin it by listener (README \"Choosing the pool\", option (b)): a second [[listener]] with pool = the pool, and LISTSERV's workers of that pool pointed at it"
                ),
            ));
            site.skipped.push(Skipped {
                origin,
                overridden_by: None,
            });
            continue;
        }
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
                    let why = if spec.not_hosts.contains(part) {
                        "is not a host name (no domain), so it is not taken as a failover host; kept as a comment. If it is a host, write its full name"
                    } else {
                        "not imported (poolrelay has no such setting; kept as a comment)"
                    };
                    warnings.push(src.warn(no, &format!("{slot}: \";{part}\" {why}")));
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
            (None, "MAXBSMTP") => {
                let n = value
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| {
                        src.err(
                            no,
                            format!("{key}: \"{value}\" is not a number of 1 or more; write e.g. MAXBSMTP=100"),
                        )
                    })?;
                site.max_bsmtp = Some((n, origin));
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
        "MAXBSMTP" => site.max_bsmtp.take().map(|(_, o)| o),
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
