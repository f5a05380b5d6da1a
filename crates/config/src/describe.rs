//! The human summary of a resolved config (`poolrelay check --print`).

use std::fmt::Write as _;

use crate::units::{format_bandwidth, format_duration, format_size};
use crate::{Config, DEFAULT_POOL, Route, Upstream};

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

/// A fraction as a percentage, e.g. 0.1 -> "10%".
fn percent(fraction: f64) -> String {
    format!("{}%", (fraction * 1000.0).round() / 10.0)
}

fn durations(steps: &[std::time::Duration]) -> String {
    steps
        .iter()
        .map(|d| format_duration(*d))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `sender X  and recipient Y ...` for a route's matchers.
fn matchers(r: &Route) -> String {
    let mut parts = Vec::new();
    if let Some(l) = &r.listener {
        parts.push(format!("listener {l}"));
    }
    if let Some(u) = &r.user {
        parts.push(format!("user {u}"));
    }
    if let Some(s) = &r.sender {
        if s.is_empty() {
            parts.push("sender <> (null sender)".to_string());
        } else {
            parts.push(format!("sender {s}"));
        }
    }
    if let Some(s) = &r.recipient {
        parts.push(format!("recipient {s}"));
    }
    if let Some(h) = &r.header {
        parts.push(format!("header {}: {}", h.name, h.value));
    }
    if let Some(range) = r.mt_priority {
        parts.push(format!("mt_priority {range}"));
    }
    if parts.is_empty() {
        "everything else (catch-all)".to_string()
    } else {
        parts.join(" and ")
    }
}

/// A listener's TLS and AUTH: `tls starttls (cert ..., key ...), require_tls  auth optional (3 users in ...)`.
fn security(l: &crate::Listener) -> String {
    let tls = match &l.tls {
        Some(t) => format!(
            "tls {} (cert {}, key {}){}",
            t.mode.name(),
            t.cert.display(),
            t.key.display(),
            if l.require_tls { ", require_tls" } else { "" }
        ),
        None => "tls off".to_string(),
    };
    let auth = match l.auth {
        crate::AuthPolicy::Off => "auth off".to_string(),
        policy => format!(
            "auth {} ({}){}",
            if policy == crate::AuthPolicy::Required {
                "required"
            } else {
                "optional"
            },
            match &l.users_file {
                Some(u) => format!("{} users in {}", u.len(), u.path.display()),
                None => "no users_file".to_string(),
            },
            if l.auth_plaintext {
                ", auth_plaintext: also without TLS"
            } else {
                ", after TLS only"
            }
        ),
    };
    format!("{tls}  {auth}")
}

/// How an upstream uses its window: `00:00-05:00 (else failover)` or `(idle outside)`.
fn window_note(u: &Upstream) -> Option<String> {
    let w = u.window?;
    let outside = if u.failover.is_empty() {
        "idle outside"
    } else {
        "failover hosts outside"
    };
    Some(format!("{w} ({outside})"))
}

/// The `upstream settings:` entry of one upstream. The password itself is
/// never shown, only the file it was read from.
fn upstream_settings(o: &mut String, u: &Upstream) {
    let _ = writeln!(o, "  {} (line {})", u.host, u.line);
    let _ = writeln!(
        o,
        "    tls {}  tls_verify {}  tls_ca_file {}  mx {}",
        u.tls,
        u.tls_verify,
        u.tls_ca_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".to_string()),
        u.mx
    );
    let _ = writeln!(
        o,
        "    max_messages_per_connection {}  idle_timeout {}",
        u.max_messages_per_connection,
        format_duration(u.idle_timeout)
    );
    let t = &u.timeouts;
    let _ = writeln!(
        o,
        "    connect_timeout {}  greeting_timeout {}  ehlo_timeout {}  mail_timeout {}  rcpt_timeout {}",
        format_duration(t.connect),
        format_duration(t.greeting),
        format_duration(t.ehlo),
        format_duration(t.mail),
        format_duration(t.rcpt)
    );
    let _ = writeln!(
        o,
        "    data_init_timeout {}  data_block_timeout {}  data_end_timeout {}",
        format_duration(t.data_init),
        format_duration(t.data_block),
        format_duration(t.data_end)
    );
    match &u.auth {
        None => {
            let _ = writeln!(o, "    auth none");
        }
        Some(a) => {
            let from = u
                .auth_password_file
                .as_ref()
                .map(|p| format!(", password from {}", p.display()))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "    auth as {}{from}, auth_plaintext {}",
                a.username, a.allow_plaintext
            );
        }
    }
}

pub(crate) fn describe(c: &Config) -> String {
    let mut o = String::new();
    // Writing to a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(o, "config: {}", c.source.display());
    let s = &c.server;
    let _ = writeln!(
        o,
        "spool: {}   hostname: {}   timezone: {}",
        s.spool_dir.display(),
        s.hostname,
        s.timezone.as_deref().unwrap_or("local")
    );
    let _ = match &c.spool {
        crate::SpoolBackend::Fjall => {
            writeln!(o, "spool backend: fjall (embedded, in the spool directory)")
        }
        crate::SpoolBackend::JetStream(js) => writeln!(
            o,
            "spool backend: jetstream   servers: {}   replicas: {}   stream prefix: {}   ack timeout: {}{}{}",
            js.servers.join(", "),
            js.replicas,
            js.stream_prefix,
            format_duration(js.ack_timeout),
            js.credentials_file
                .as_ref()
                .map(|p| format!("   credentials: {}", p.display()))
                .unwrap_or_default(),
            js.tls_ca_file
                .as_ref()
                .map(|p| format!("   tls ca: {}", p.display()))
                .unwrap_or_default(),
        ),
    };
    let _ = writeln!(
        o,
        "sessions: max {} ({} per client)   command timeout {}   data timeout {}   max line {} bytes   max hops {}",
        s.max_sessions,
        s.max_sessions_per_client,
        format_duration(s.command_timeout),
        format_duration(s.data_timeout),
        s.max_line_length,
        s.max_hops
    );
    if !s.hosts.is_empty() {
        let hosts: Vec<String> = s.hosts.iter().map(|(k, v)| format!("{k} -> {v}")).collect();
        let _ = writeln!(o, "hosts (instead of DNS): {}", hosts.join(", "));
    }
    let _ = writeln!(
        o,
        "dns servers: {}",
        if s.dns_servers.is_empty() {
            "the system's (resolv.conf)".to_string()
        } else {
            let servers: Vec<String> = s.dns_servers.iter().map(|a| a.to_string()).collect();
            servers.join(", ")
        }
    );
    let _ = writeln!(
        o,
        "admin: {}   {}   allow_unauthenticated {}",
        c.admin.address,
        match &c.admin.token_file {
            Some(p) => format!("token from {}", p.display()),
            None => "no token_file".to_string(),
        },
        c.admin.allow_unauthenticated
    );

    let _ = writeln!(o, "listeners:");
    for l in &c.listeners {
        let addr = l.address.to_string();
        let title = if l.name == addr {
            addr
        } else {
            format!("{} ({addr})", l.name)
        };
        let nets: Vec<String> = l.relay_from.iter().map(|n| n.to_string()).collect();
        let pinned = l
            .pool
            .as_deref()
            .map(|p| format!("  pool {p} (pinned)"))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  {title}{pinned}  relay_from {}  max {}, {} rcpts",
            if nets.is_empty() {
                "nobody".to_string()
            } else {
                nets.join(", ")
            },
            format_size(l.max_message_size),
            l.max_recipients
        );
        let _ = writeln!(o, "    {}", security(l));
        if let Some(policy) = l.mt_priority {
            let trusted: Vec<String> = l
                .mt_priority_trusted
                .iter()
                .map(|n| n.to_string())
                .collect();
            let _ = writeln!(
                o,
                "    mt_priority {}  trusted above 0: {}",
                policy.config_name(),
                if trusted.is_empty() {
                    "nobody".to_string()
                } else {
                    trusted.join(", ")
                }
            );
        }
    }

    let _ = writeln!(o, "pools:");
    let names = c.pool_names();
    let name_w = names.iter().map(|n| n.len()).max().unwrap_or(1).max(3);
    let desc_w = c
        .pools
        .values()
        .map(|p| p.description.chars().count())
        .max()
        .unwrap_or(0)
        .min(40);
    for name in &names {
        let Some(p) = c.pools.get(name) else { continue };
        let serving: Vec<&Upstream> = c.upstreams_for(name).collect();
        let served = if serving.is_empty() {
            "served by nobody: mail waits".to_string()
        } else {
            let total: usize = serving.iter().map(|u| u.workers).sum();
            let each: Vec<String> = serving
                .iter()
                .map(|u| match u.window {
                    Some(w) => format!(
                        "{} ({}, {w})",
                        u.host,
                        plural(u.workers, "worker", "workers")
                    ),
                    None => format!("{} ({})", u.host, plural(u.workers, "worker", "workers")),
                })
                .collect();
            if serving.len() == 1 {
                format!("served by {}", each.join(", "))
            } else {
                format!(
                    "served by {} = {}",
                    each.join(", "),
                    plural(total, "worker", "workers")
                )
            }
        };
        let mut extra = String::new();
        // Shown only when set, so configs without priorities read as before.
        if p.priority != 0 {
            let _ = write!(extra, "   priority {}", p.priority);
        }
        if let Some(share) = p.lower_priority_share {
            let _ = write!(extra, "   lower_priority_share {}", percent(share));
        }
        if !p.fallback {
            let _ = write!(extra, "   no fallback");
        }
        if let Some(k) = c.arc_key_for(name) {
            let _ = write!(extra, "   arc_seal {}._domainkey.{}", k.selector, k.domain);
        }
        if let Some(r) = p.rate_limit {
            let _ = write!(extra, "   rate {}", format_bandwidth(r));
        }
        if let Some(m) = p.max_messages_per_second {
            let _ = write!(extra, "   max {m} msg/s");
        }
        if let Some(m) = p.max_recipients_per_hour {
            let _ = write!(extra, "   max {m} rcpts/h");
        }
        let _ = writeln!(
            o,
            "  {name:<name_w$}  {:<desc_w$}  {served}{extra}   retry {}   max_age {}",
            p.description,
            durations(c.retry_for(name)),
            format_duration(c.max_age_for(name)),
        );
    }

    let _ = writeln!(o, "upstreams:");
    if c.upstreams.is_empty() {
        let _ = writeln!(o, "  none: no pool is delivered");
    }
    for u in &c.upstreams {
        let mut line = format!(
            "  {}  {}  pools {}",
            u.host,
            plural(u.workers, "worker", "workers"),
            u.pools.join(", ")
        );
        if u.reserve_workers > 0 {
            let _ = write!(
                line,
                "  reserve_workers {} (priority above 0 only)",
                u.reserve_workers
            );
        }
        if !u.failover.is_empty() {
            let _ = write!(line, "  failover {}", u.failover.join(", "));
        }
        if let Some(w) = window_note(u) {
            let _ = write!(line, "  window {w}");
        }
        let _ = write!(
            line,
            "  tls {}  {} msgs/connection, idle {}, connect {}  (line {})",
            u.tls,
            u.max_messages_per_connection,
            format_duration(u.idle_timeout),
            format_duration(u.timeouts.connect),
            u.line
        );
        let _ = writeln!(o, "{line}");
    }
    // Every remaining upstream key, under the names it has in the file. A
    // section of its own keeps each `upstreams:` entry on one line, which
    // scripts reading this output rely on.
    if !c.upstreams.is_empty() {
        let _ = writeln!(o, "upstream settings:");
    }
    for u in &c.upstreams {
        upstream_settings(&mut o, u);
    }

    let d = &c.defaults;
    let _ = writeln!(
        o,
        "fallback: {}",
        if d.fallback.is_empty() {
            "none".to_string()
        } else {
            d.fallback.join(", ")
        }
    );
    let _ = writeln!(
        o,
        "defaults: list_pool {}   retry {} (last step repeats)   max_age {}   rate_limit {}   delay_warning {}   lower_priority_share {}",
        d.list_pool,
        durations(&d.retry),
        format_duration(d.max_age),
        d.rate_limit
            .map(|r| format!("{} server-wide", format_bandwidth(r)))
            .unwrap_or_else(|| "none".to_string()),
        d.delay_warning
            .map(format_duration)
            .unwrap_or_else(|| "off".to_string()),
        percent(d.lower_priority_share)
    );

    let _ = writeln!(o, "routes (first match wins):");
    for (name, u) in &c.users {
        if let Some(pool) = &u.pool {
            let _ = writeln!(o, "  user {name} -> {pool} (pinned by [user.{name}])");
        }
    }
    for l in c.listeners.iter().filter(|l| l.pool.is_some()) {
        let _ = writeln!(
            o,
            "  listener {} -> {} (pinned by the listener)",
            l.name,
            l.pool.as_deref().unwrap_or(DEFAULT_POOL)
        );
    }
    for (i, r) in c.routes.iter().enumerate() {
        let _ = writeln!(
            o,
            "  {}. line {}  {}  -> {}",
            i + 1,
            r.line,
            matchers(r),
            r.pool
        );
    }
    let catch_all = c.routes.last().is_some_and(Route::is_catch_all);
    if !catch_all {
        let _ = writeln!(
            o,
            "  unmatched: owner-*@* -> {} (defaults.list_pool), else -> {DEFAULT_POOL}",
            d.list_pool
        );
    }
    dkim(&mut o, c);
    o
}

/// The `[[dkim]]` entries: where each key is published, what it signs;
/// the key file's name and the key's kind, never the key.
fn dkim(o: &mut String, c: &Config) {
    if c.dkim.is_empty() {
        let _ = writeln!(o, "dkim: none (mail is relayed unsigned)");
        return;
    }
    let _ = writeln!(
        o,
        "dkim (signs with every key aligned with From:, else the envelope domain's where envelope_fallback):"
    );
    for d in &c.dkim {
        let pools = if d.pools.is_empty() {
            "every pool".to_string()
        } else {
            format!("pools {}", d.pools.join(", "))
        };
        let _ = writeln!(
            o,
            "  line {}  {}._domainkey.{}  {}  {} ({})  {}  envelope_fallback {}",
            d.line,
            d.selector,
            d.domain,
            d.algorithm.as_str(),
            d.key_file.display(),
            d.key.kind(),
            pools,
            d.envelope_fallback
        );
        let _ = writeln!(o, "    headers {}", d.headers.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::Config;

    /// A password file removed when dropped.
    struct PasswordFile(PathBuf);

    impl PasswordFile {
        fn new(name: &str, contents: &str) -> PasswordFile {
            let path = std::env::temp_dir().join(format!(
                "poolrelay-describe-{}-{name}.pw",
                std::process::id()
            ));
            std::fs::write(&path, contents).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            PasswordFile(path)
        }
    }

    impl Drop for PasswordFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const HEAD: &str = "[[listener]]\naddress = \"127.0.0.1:2525\"\n\n";

    /// An upstream with every setting away from its default.
    fn everything_set(password_file: &Path) -> String {
        format!(
            "{HEAD}[defaults]\ndelay_warning = \"4h\"\n\n\
             [[upstream]]\nhost = \"smart.test\"\ntls = \"required\"\ntls_verify = false\n\
             tls_ca_file = \"/etc/poolrelay/ca.pem\"\nmx = true\n\
             max_messages_per_connection = 7\nidle_timeout = \"3s\"\n\
             connect_timeout = \"11s\"\ngreeting_timeout = \"12s\"\nehlo_timeout = \"13s\"\n\
             mail_timeout = \"14s\"\nrcpt_timeout = \"15s\"\ndata_init_timeout = \"16s\"\n\
             data_block_timeout = \"17s\"\ndata_end_timeout = \"18s\"\n\
             auth = {{ username = \"relayuser\", password_file = \"{}\" }}\n\
             auth_plaintext = true\n",
            password_file.display()
        )
    }

    fn described(text: &str) -> String {
        Config::parse(text, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
            .describe()
    }

    #[test]
    fn every_upstream_setting_is_shown_with_its_value() {
        let pw = PasswordFile::new("shown", "not-to-be-shown\n");
        let d = described(&everything_set(&pw.0));
        for needle in [
            "upstream settings:",
            "  smart.test:25 (line 7)",
            "tls required",
            "tls_verify false",
            "tls_ca_file /etc/poolrelay/ca.pem",
            "mx true",
            "max_messages_per_connection 7",
            "idle_timeout 3s",
            "connect_timeout 11s",
            "greeting_timeout 12s",
            "ehlo_timeout 13s",
            "mail_timeout 14s",
            "rcpt_timeout 15s",
            "data_init_timeout 16s",
            "data_block_timeout 17s",
            "data_end_timeout 18s",
            &format!(
                "auth as relayuser, password from {}, auth_plaintext true",
                pw.0.display()
            ),
            "delay_warning 4h",
        ] {
            assert!(d.contains(needle), "describe lacks {needle:?}:\n{d}");
        }
        assert!(
            !d.contains("not-to-be-shown"),
            "the password is shown:\n{d}"
        );
    }

    #[test]
    fn priorities_reserve_and_fallback_are_shown_when_set() {
        let d = described(&format!(
            "{HEAD}[defaults]\nlower_priority_share = \"5%\"\n\
             [pool.A]\n[pool.B]\npriority = 5\nlower_priority_share = \"12.5%\"\nfallback = false\n\
             [[upstream]]\nhost = \"127.0.0.1:2601\"\nworkers = 2\nreserve_workers = 1\n"
        ));
        for needle in [
            "priority 5   lower_priority_share 12.5%   no fallback",
            "2 workers  pools A, B, -  reserve_workers 1 (priority above 0 only)",
            "lower_priority_share 5%",
        ] {
            assert!(d.contains(needle), "describe lacks {needle:?}:\n{d}");
        }
        let a = d
            .lines()
            .find(|l| l.starts_with("  A "))
            .unwrap_or_default();
        assert!(
            !a.contains("priority"),
            "pool A has the default priority: {a}"
        );
    }

    #[test]
    fn defaults_are_shown_too() {
        let d = described(&format!("{HEAD}[[upstream]]\nhost = \"127.0.0.1:2601\"\n"));
        for needle in [
            "  127.0.0.1:2601 (line 4)",
            "tls opportunistic  tls_verify true  tls_ca_file none  mx false",
            "max_messages_per_connection 100  idle_timeout 10s",
            "connect_timeout 30s  greeting_timeout 5m  ehlo_timeout 5m  mail_timeout 5m  rcpt_timeout 5m",
            "data_init_timeout 2m  data_block_timeout 3m  data_end_timeout 10m",
            "    auth none",
            "delay_warning off",
            "lower_priority_share 10%",
        ] {
            assert!(d.contains(needle), "describe lacks {needle:?}:\n{d}");
        }
    }

    #[test]
    fn upstream_entries_stay_on_one_line_each() {
        // Tools read each `upstreams:` entry as one line; the settings that
        // take more room live in `upstream settings:` instead.
        let pw = PasswordFile::new("one-line", "pw\n");
        let d = described(&everything_set(&pw.0));
        let section: Vec<&str> = d
            .lines()
            .skip_while(|l| *l != "upstreams:")
            .skip(1)
            .take_while(|l| l.starts_with(' '))
            .collect();
        assert_eq!(section.len(), 1, "{d}");
        assert!(section[0].starts_with("  smart.test:25  1 worker"), "{d}");
    }

    #[test]
    fn no_upstream_settings_section_without_upstreams() {
        let d = described(HEAD);
        assert!(!d.contains("upstream settings:"), "{d}");
    }
}
