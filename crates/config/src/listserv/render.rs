//! Writing the imported config as commented TOML, one function per section.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::list::List;
use super::routes::build_routes;
use super::site::{Site, Skipped};
use super::{ImportOptions, Origin, Source};
use crate::units::format_bandwidth;
use crate::validate::DEFAULT_POOL_DESCRIPTION;
use crate::{DEFAULT_POOL, Window};

/// A TOML string value. The `toml` crate picks the form: a basic string
/// (`"..."`) for everything the import normally writes, a literal or escaped
/// string for values with quotes, backslashes or control characters.
pub(super) fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Text safe inside a TOML comment (no control characters but tab).
pub(super) fn c(s: &str) -> String {
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

/// What the sections are written from: the parsed input, and what is derived
/// from it once (pool uses, worker groups) because several sections need it.
struct Plan<'a> {
    src: &'a Source,
    /// The site.cfg file name, as comments cite it.
    file: String,
    site: &'a Site,
    lists: &'a [List],
    opts: &'a ImportOptions,
    uses: BTreeMap<String, PoolUse>,
    /// Per list: (postings, administrative) pools when it needs routes.
    list_pools: Vec<Option<(String, String)>>,
    /// Named pools sorted, then `-`.
    pool_names: Vec<String>,
    upstreams: Vec<UpstreamOut<'a>>,
    /// Pools no worker group serves.
    unserved: Vec<String>,
}

impl Plan<'_> {
    /// `site.cfg:N`, the citation of a setting's origin.
    fn at(&self, o: &Origin) -> String {
        format!("{}:{}", self.file, o.line)
    }
}

/// Writes the config. Infallible: the caller validates the text.
pub(super) fn render(
    src: &Source,
    site: &Site,
    lists: &[List],
    opts: &ImportOptions,
    warnings: &mut Vec<String>,
) -> String {
    let p = plan(src, site, lists, opts, warnings);
    let mut o = String::new();
    header(&mut o, &p);
    server(&mut o, &p);
    listeners(&mut o, &p);
    admin(&mut o, &p);
    defaults(&mut o, &p, warnings);
    pools(&mut o, &p);
    upstreams(&mut o, &p);
    routes(&mut o, &p);
    dkim(&mut o, &p);
    not_imported(&mut o, &p);
    o
}

/// Derives pool uses and worker groups, warning about what cannot work.
fn plan<'a>(
    src: &'a Source,
    site: &'a Site,
    lists: &'a [List],
    opts: &'a ImportOptions,
    warnings: &mut Vec<String>,
) -> Plan<'a> {
    let file = src.short();
    let at = |o: &Origin| format!("{file}:{}", o.line);
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
    let pool_names: Vec<String> = uses
        .keys()
        .filter(|p| p.as_str() != DEFAULT_POOL)
        .chain(uses.keys().filter(|p| p.as_str() == DEFAULT_POOL))
        .cloned()
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
    let unserved: Vec<String> = pool_names
        .iter()
        .filter(|p| {
            !serves_all
                && !upstreams.is_empty()
                && !upstreams
                    .iter()
                    .any(|u| u.pools.is_some_and(|ps| ps.contains(p)))
        })
        .cloned()
        .collect();
    for p in &unserved {
        warnings.push(format!(
            "{}: pool {p} is served by no SMTP_FORWARD_n, so its mail would wait in the queue; add {p} to a POOL= (or an [[upstream]] for it)",
            src.path.display()
        ));
    }
    Plan {
        src,
        file,
        site,
        lists,
        opts,
        uses,
        list_pools,
        pool_names,
        upstreams,
        unserved,
    }
}

/// The opening comment: where the config comes from.
fn header(o: &mut String, p: &Plan<'_>) {
    let mut sources = vec![p.file.clone()];
    sources.extend(p.lists.iter().map(|l| l.file.clone()));
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
    if let Some(port) = p.opts.port {
        let _ = writeln!(o, "# --port {port}: every upstream host uses port {port}.");
    }
}

/// `[server]`: host name, spool and the `--host` entries.
fn server(o: &mut String, p: &Plan<'_>) {
    let _ = writeln!(o, "\n[server]");
    let hostname =
        p.site.domains.as_ref().and_then(|(hosts, origin)| {
            hosts.iter().find(|h| !h.contains('*')).map(|h| (h, origin))
        });
    match hostname {
        Some((h, origin)) => {
            let _ = writeln!(
                o,
                "# Banner, EHLO name and DSN sender domain: the first MYDOMAIN host ({}).",
                p.at(origin)
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
    let spool = p
        .opts
        .spool_dir
        .as_ref()
        .map_or_else(|| "var/spool".to_string(), |p| p.display().to_string());
    let _ = writeln!(o, "spool_dir = {}", q(&spool));
    if !p.opts.hosts.is_empty() {
        let entries: Vec<String> = p
            .opts
            .hosts
            .iter()
            .map(|(name, addr)| format!("{} = {}", q(&name.to_ascii_lowercase()), q(addr)))
            .collect();
        let _ = writeln!(o, "# Addresses used instead of DNS for these host names.");
        let _ = writeln!(o, "hosts = {{ {} }}", entries.join(", "));
    }
}

/// `[[listener]]`, plus the pool-by-address alternative as a comment.
fn listeners(o: &mut String, p: &Plan<'_>) {
    let listen = p
        .opts
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
    if let Some((n, origin)) = &p.site.max_bsmtp {
        let _ = writeln!(o, "# {}  ({})", c(&origin.text), p.at(origin));
        if *n > DEFAULT_MAX_RECIPIENTS {
            let _ = writeln!(
                o,
                "# LISTSERV puts up to {n} recipients in one envelope: raised from the default"
            );
            let _ = writeln!(
                o,
                "# {DEFAULT_MAX_RECIPIENTS}, or its bundles would get 452 4.5.3 and be sent again in parts."
            );
            let _ = writeln!(o, "max_recipients = {n}");
        } else {
            let _ = writeln!(
                o,
                "# Up to {n} recipients per envelope: within max_recipients (default {DEFAULT_MAX_RECIPIENTS})."
            );
        }
    }
    let example = p
        .uses
        .keys()
        .find(|p| p.as_str() == "B")
        .or_else(|| p.uses.keys().find(|p| p.as_str() != DEFAULT_POOL))
        .map_or(DEFAULT_POOL, String::as_str);
    let example_forward = p
        .site
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
}

/// The listener's `max_recipients` when the config gives none.
const DEFAULT_MAX_RECIPIENTS: usize = 1000;

/// `[admin]`.
fn admin(o: &mut String, p: &Plan<'_>) {
    let admin = p
        .opts
        .admin
        .map_or_else(|| "127.0.0.1:9025".to_string(), |a| a.to_string());
    let _ = writeln!(o, "\n# /metrics, /healthz and the queue API.");
    let _ = writeln!(o, "[admin]\naddress = {}", q(&admin));
}

/// `[defaults]`: list pool, site fallback, server-wide cap.
fn defaults(o: &mut String, p: &Plan<'_>, warnings: &mut Vec<String>) {
    let _ = writeln!(o, "\n[defaults]");
    match &p.site.list_pool {
        Some(lp) => {
            let _ = writeln!(o, "# {}  ({})", c(&lp.origin.text), p.at(&lp.origin));
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
                warnings.push(p.src.warn(
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
    if let Some((host, origin)) = &p.site.fallback {
        let _ = writeln!(o, "# {}  ({})", c(&origin.text), p.at(origin));
        let _ = writeln!(
            o,
            "# The site fallback, used when a worker's own hosts cannot be reached."
        );
        let _ = writeln!(o, "fallback = [{}]", q(host));
    }
    if let Some(r) = &p.site.rates
        && let Some(bps) = r.server
    {
        let _ = writeln!(o, "# {}  ({})", c(&r.origin.text), p.at(&r.origin));
        let _ = writeln!(
            o,
            "# The server-wide cap; each message is held to it and to its pool's cap,"
        );
        let _ = writeln!(o, "# whichever is stricter at the moment.");
        let _ = writeln!(o, "rate_limit = {}", q(&format_bandwidth(bps)));
    }
    if p.site.rates.is_some() && p.site.fallback.is_some() {
        let _ = writeln!(
            o,
            "# LISTSERV's synchronous delivery through SMTP_FORWARD ignores SMTP_RATE_LIMIT;"
        );
        let _ = writeln!(
            o,
            "# poolrelay holds every delivery to these caps, through the fallback too."
        );
    }
    let _ = writeln!(
        o,
        "# retry and max_age keep poolrelay's defaults (1m 5m 15m 30m 1h 2h 4h, 5d)."
    );
}

/// `[pool.X]` for every pool the import names.
fn pools(o: &mut String, p: &Plan<'_>) {
    let _ = writeln!(
        o,
        "\n# Pools: LISTSERV's letters A-Z that the import names, plus the default pool \"-\"."
    );
    for name in &p.pool_names {
        let Some(u) = p.uses.get(name) else { continue };
        let _ = writeln!(o, "[pool.{}]", pool_key(name));
        let _ = writeln!(o, "description = {}", q(&u.description(name)));
        if let (Some(bps), Some(r)) = (u.rate, &p.site.rates) {
            let _ = writeln!(
                o,
                "rate_limit = {}   # SMTP_RATE_LIMIT ({})",
                q(&format_bandwidth(bps)),
                p.at(&r.origin)
            );
        }
        shared_priority(o, p, name);
        if let Some(own) = isolated_host(p, name) {
            let _ = writeln!(
                o,
                "# {} gives this pool a smarthost of its own. LISTSERV uses the",
                u.forwards.join(", ")
            );
            let _ = writeln!(
                o,
                "# SMTP_FORWARD fallback only when workers cannot start, not while a host is"
            );
            let _ = writeln!(o, "# down, so this pool's mail waits for {own} instead.");
            let _ = writeln!(o, "fallback = false");
        }
        if p.unserved.contains(name) {
            let _ = writeln!(
                o,
                "# No [[upstream]] serves this pool: its mail waits until one does."
            );
        }
    }
}

/// Whether `pool` is a lane of its own: the Delivery-Pool of an imported
/// list's postings, not the default list pool nor `-`.
fn is_lane(p: &Plan<'_>, pool: &str) -> bool {
    p.uses.get(pool).is_some_and(|u| {
        pool != DEFAULT_POOL
            && !u.default_postings
            && !(u.whole.is_empty() && u.postings.is_empty())
    })
}

/// `priority` for a pool that shares an SMTP_FORWARD_n line with a lane
/// (see [`is_lane`]): LISTSERV's workers take the oldest message of any of
/// their pools, so the lane would wait behind bulk; here it goes first.
fn shared_priority(o: &mut String, p: &Plan<'_>, pool: &str) {
    let serves = |u: &UpstreamOut<'_>, x: &str| u.pools.is_none_or(|ps| ps.iter().any(|y| y == x));
    let mut partners: Vec<&str> = Vec::new();
    for u in p.upstreams.iter().filter(|u| serves(u, pool)) {
        for other in &p.pool_names {
            if other != pool && serves(u, other) && !partners.contains(&other.as_str()) {
                partners.push(other);
            }
        }
    }
    let lanes: Vec<&str> = partners.iter().copied().filter(|x| is_lane(p, x)).collect();
    let quoted =
        |names: &[&str]| -> String { names.iter().map(|n| q(n)).collect::<Vec<_>>().join(", ") };
    if is_lane(p, pool) && !partners.is_empty() {
        let u = &p.uses[pool];
        let lists: Vec<String> = u.whole.iter().chain(&u.postings).cloned().collect();
        let _ = writeln!(
            o,
            "# Shares its workers with {}; LISTSERV's take the oldest message of any of them.",
            quoted(&partners)
        );
        let _ = writeln!(
            o,
            "# As the lane of {} it goes first here; the others keep 10% of the deliveries.",
            some_names(&lists)
        );
        let _ = writeln!(o, "priority = {LANE_PRIORITY}");
    } else if !lanes.is_empty() {
        let _ = writeln!(
            o,
            "# Shares its workers with {}, which goes first (priority {LANE_PRIORITY}); this pool",
            quoted(&lanes)
        );
        let _ = writeln!(
            o,
            "# keeps at least 10% of their deliveries while that mail waits (lower_priority_share)."
        );
        let _ = writeln!(o, "priority = 0");
    }
}

/// The priority the import gives a lane that shares its workers.
const LANE_PRIORITY: i8 = 5;

/// The host of `pool` when its SMTP_FORWARD_n lines isolate it: they serve
/// it alone, through hosts no other line uses and that are not the site
/// fallback (with which falling back would change nothing).
fn isolated_host(p: &Plan<'_>, pool: &str) -> Option<String> {
    let (fallback, _) = p.site.fallback.as_ref()?;
    let hosts = |u: &UpstreamOut<'_>| -> Vec<String> {
        std::iter::once(u.host)
            .chain(u.failover.iter().map(String::as_str))
            .map(str::to_ascii_lowercase)
            .collect()
    };
    let (own, others): (Vec<&UpstreamOut<'_>>, Vec<&UpstreamOut<'_>>) = p
        .upstreams
        .iter()
        .partition(|u| u.pools.is_none_or(|ps| ps.iter().any(|x| x == pool)));
    let alone = !own.is_empty() && own.iter().all(|u| u.pools.is_some_and(|ps| ps.len() == 1));
    let own_hosts: Vec<String> = own.iter().flat_map(|u| hosts(u)).collect();
    let shared = others
        .iter()
        .flat_map(|u| hosts(u))
        .chain(std::iter::once(fallback.to_ascii_lowercase()))
        .any(|h| own_hosts.contains(&h));
    (alone && !shared).then(|| own.iter().map(|u| u.host).collect::<Vec<_>>().join(", "))
}

/// `[[upstream]]`, one per worker group.
fn upstreams(o: &mut String, p: &Plan<'_>) {
    let _ = writeln!(
        o,
        "\n# Worker groups, one per SMTP_FORWARD_n line. An upstream without `pools` serves every pool."
    );
    for u in &p.upstreams {
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
}

/// `[[route]]`s, then how unrouted list mail is handled.
fn routes(o: &mut String, p: &Plan<'_>) {
    let routes = build_routes(p.site, p.lists, &p.list_pools, &|origin| p.at(origin));
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
    let list_pool = p
        .site
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
    let plain: Vec<String> = p
        .lists
        .iter()
        .zip(&p.list_pools)
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
}

/// A commented `[[dkim]]` skeleton per MYDOMAIN host: list mail comes
/// `From:` those hosts, so their keys align with it (README "Signing").
fn dkim(o: &mut String, p: &Plan<'_>) {
    let Some((hosts, origin)) = p.site.domains.as_ref() else {
        return;
    };
    let hosts: Vec<String> = hosts
        .iter()
        .filter(|h| !h.contains('*'))
        .map(|h| h.to_ascii_lowercase())
        .collect();
    if hosts.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\n# DKIM signing for the MYDOMAIN hosts ({}): list mail is From: them, so a",
        p.at(origin)
    );
    let _ = writeln!(
        o,
        "# key of each aligns with it (DMARC). Make the key, publish its TXT record at"
    );
    let _ = writeln!(
        o,
        "# SELECTOR._domainkey.DOMAIN, uncomment, and check (README \"Signing\"):"
    );
    for host in &hosts {
        let key = format!("/etc/poolrelay/dkim/{host}.pem");
        let _ = writeln!(
            o,
            "#   poolrelay dkim keygen --domain {host} --selector poolrelay --out {key}"
        );
        let _ = writeln!(o, "# [[dkim]]");
        let _ = writeln!(o, "# domain = {}", q(host));
        let _ = writeln!(o, "# selector = \"poolrelay\"");
        let _ = writeln!(o, "# key_file = {}", q(&key));
    }
}

/// The site.cfg lines with no poolrelay equivalent, as comments.
fn not_imported(o: &mut String, p: &Plan<'_>) {
    if !p.site.skipped.is_empty() {
        let mut skipped: Vec<&Skipped> = p.site.skipped.iter().collect();
        skipped.sort_by_key(|s| s.origin.line);
        let _ = writeln!(
            o,
            "\n# Lines of {} with no poolrelay equivalent (each also reported as a warning):",
            c(&p.file)
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
}
