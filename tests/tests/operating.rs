//! Operating poolrelay (issue 5): Prometheus metrics, the deploy/ files
//! (alert rules, scrape config, Grafana dashboard), the admin API and the
//! `poolrelay queue` CLI (hold, release, flush, delete, move, bounce),
//! reload on SIGHUP and via `poolrelay reload`, graceful shutdown on
//! SIGTERM, the admin token, /healthz and /readyz.
//!
//! Every test runs the built binary against our own sinks on loopback and
//! waits on conditions with deadlines; nothing sleeps hoping.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poolrelay_tests::{
    CommandOutput, POLL_INTERVAL, Relay, RelaySetup, Sample, Sink, SinkOptions, SmtpClient,
    SmtpError, data_bytes, free_addr, http_get, http_request, message, metric_names, metric_sum,
    parse_metrics, poll_until, poolrelay, promtool, toml_str, unique_id, workspace_root,
};
use serde_json::Value;

/// How long a message gets to reach its sink.
const DELIVERY: Duration = Duration::from_secs(30);
/// How long a CLI call or promtool run may take.
const COMMAND: Duration = Duration::from_secs(30);
/// The relay's grace period on SIGTERM (crates/poolrelay/src/main.rs `GRACE`).
const GRACE: Duration = Duration::from_secs(20);
/// What the process gets on top of the grace period to exit.
const EXIT_MARGIN: Duration = Duration::from_secs(10);
const RCPT: &str = "member@example.test";

/// The metric names DESIGN.md ("Observability") promises.
const DESIGN_METRICS: &[&str] = &[
    "poolrelay_received_messages_total",
    "poolrelay_delivered_recipients_total",
    "poolrelay_deferred_recipients_total",
    "poolrelay_bounced_recipients_total",
    "poolrelay_queue_messages",
    "poolrelay_queue_oldest_age_seconds",
    "poolrelay_delivery_seconds",
    "poolrelay_upstream_up",
    "poolrelay_upstream_connections",
    "poolrelay_spool_commit_seconds",
    "poolrelay_smtp_sessions",
    "poolrelay_smtp_rejections_total",
];

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Pools A and B. A's upstream `a` also serves `-`; B has its own upstream
/// `b`; `owner-b@*` routes to B, other `owner-*` senders go to A (the list
/// pool). `extra` is appended (more pools, upstreams, routes).
fn two_pools(s: &RelaySetup, a: SocketAddr, b: SocketAddr, retry: &str, extra: &str) -> String {
    format!(
        "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"{retry}\"]\n\n\
         [pool.A]\ndescription = \"list postings\"\n[pool.B]\ndescription = \"emergency\"\n\n\
         [[upstream]]\nhost = \"{a}\"\npools = [\"A\", \"-\"]\n\n\
         [[upstream]]\nhost = \"{b}\"\npools = [\"B\"]\n\n\
         [[route]]\npool = \"B\"\nsender = \"owner-b@*\"\n\n{extra}",
        s.head(),
        s.listener("")
    )
}

/// A sent message: its Message-ID (no brackets) and its queue id.
struct Sent {
    message_id: String,
    queue_id: String,
}

/// Sends one message from `from` to [`RCPT`]; panics unless 250 with a queue id.
fn send(relay: &Relay, from: &str, tag: &str) -> Sent {
    let message_id = unique_id(tag);
    let reply = relay.send(
        from,
        &[RCPT],
        &message(&message_id, from, RCPT, tag, "operating test\n"),
    );
    assert_eq!(reply.code, 250, "final dot for <{from}> got {reply}");
    let queue_id = reply
        .queue_id()
        .unwrap_or_else(|| panic!("no queue id in the reply {reply}"))
        .to_string();
    Sent {
        message_id,
        queue_id,
    }
}

/// `poolrelay queue ARGS --admin URL`.
fn queue_cli(relay: &Relay, args: &[&str]) -> CommandOutput {
    let url = relay.admin_url();
    let mut all = vec!["queue"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--admin", &url]);
    poolrelay(&all, COMMAND)
}

/// `poolrelay queue ARGS`; panics, with the relay's logs, unless it exits 0.
fn queue_ok(relay: &Relay, args: &[&str]) -> CommandOutput {
    let out = queue_cli(relay, args);
    assert!(
        out.status.success(),
        "poolrelay queue {args:?} failed:\n{out}\n{}",
        relay.logs()
    );
    out
}

/// Parses a command's stdout as JSON.
fn json_of(out: &CommandOutput, what: &str) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}):\n{out}"))
}

/// `GET path` on the admin API, parsed as JSON; panics unless 200.
fn api_json(relay: &Relay, path: &str) -> Value {
    let r = http_get(relay.admin_addr(), path)
        .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", relay.logs()));
    assert_eq!(r.status, 200, "GET {path}: {r}\n{}", relay.logs());
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {r}"))
}

/// The entry of `pool` in `GET /api/v1/pools` (or `queue summary --json`).
fn pool_entry<'a>(pools: &'a Value, pool: &str) -> &'a Value {
    pools
        .as_array()
        .and_then(|a| a.iter().find(|p| p["pool"] == pool))
        .unwrap_or_else(|| panic!("no pool {pool:?} in {pools:#}"))
}

/// The queued message `queue_id` of `pool` as the admin API lists it.
fn queued_message(relay: &Relay, pool: &str, queue_id: &str) -> Option<Value> {
    api_json(
        relay,
        &format!("/api/v1/pools/{}/messages?limit=10000", url_path(pool)),
    )
    .as_array()
    .and_then(|a| a.iter().find(|m| m["id"] == queue_id).cloned())
}

fn url_path(pool: &str) -> String {
    pool.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Waits until the message has had a failed attempt whose reply mentions `code`.
fn wait_deferred(relay: &Relay, pool: &str, queue_id: &str, code: &str) -> Value {
    let mut seen = None;
    relay.wait_until(
        &format!("message {queue_id} of pool {pool} to be deferred with {code}"),
        DELIVERY,
        || {
            seen = queued_message(relay, pool, queue_id).filter(|m| {
                m["attempts"].as_u64().unwrap_or(0) >= 1
                    && m["last_reply"].as_str().is_some_and(|r| r.contains(code))
            });
            seen.is_some()
        },
    );
    seen.unwrap_or(Value::Null)
}

/// Every queue id `queue list --json` shows (every pool).
fn listed_ids(relay: &Relay) -> BTreeSet<String> {
    let out = queue_ok(relay, &["list", "--json"]);
    json_of(&out, "queue list --json")
        .as_array()
        .unwrap_or_else(|| panic!("queue list --json is not an array:\n{out}"))
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect()
}

/// Scrapes /metrics and parses it.
fn samples(relay: &Relay) -> Vec<Sample> {
    parse_metrics(&relay.scrape())
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(samples, name, labels).unwrap_or(0.0)
}

/// How many times `needle` occurs in the relay's log.
fn log_count(relay: &Relay, needle: &str) -> usize {
    relay.log_text().matches(needle).count()
}

/// Sends `sig` and waits until the relay logged `needle` once more than before.
fn signal_and_wait_for_log(relay: &mut Relay, sig: &str, needle: &str) {
    let before = log_count(relay, needle);
    relay.signal(sig);
    relay.wait_until(
        &format!("the relay to log {needle:?} after SIG{sig}"),
        Duration::from_secs(15),
        || log_count(relay, needle) > before,
    );
}

/// Appends `text` to the relay's config file (rewritten in place).
fn append_config(relay: &Relay, text: &str) {
    let path = relay.config_path();
    let mut config =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    config.push_str(text);
    fs::write(path, config).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn read_config(relay: &Relay) -> String {
    fs::read_to_string(relay.config_path())
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", relay.config_path().display()))
}

fn write_config(relay: &Relay, text: &str) {
    fs::write(relay.config_path(), text)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", relay.config_path().display()));
}

/// Sorted Message-IDs at a sink.
fn ids_at(sink: &Sink) -> BTreeSet<String> {
    sink.message_ids().into_iter().collect()
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

#[test]
fn metrics_count_what_flows_through_two_pools_and_pass_promtool_check_metrics() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    for i in 0..7 {
        send(&relay, "owner-lista@lists.test", &format!("metrics-a{i}"));
    }
    for i in 0..3 {
        send(&relay, "owner-b@lists.test", &format!("metrics-b{i}"));
    }

    let mut scraped = String::new();
    let settled = |text: &str| {
        let m = parse_metrics(text);
        let delivered = |pool| {
            value(
                &m,
                "poolrelay_delivered_recipients_total",
                &[("pool", pool)],
            )
        };
        let queued: f64 = ["A", "B"]
            .iter()
            .map(|p| value(&m, "poolrelay_queue_messages", &[("pool", p)]))
            .sum();
        delivered("A") == 7.0 && delivered("B") == 3.0 && queued == 0.0
    };
    if !poll_until(DELIVERY, POLL_INTERVAL, || {
        scraped = relay.scrape();
        settled(&scraped)
    }) {
        panic!(
            "the metrics never showed 7 recipients delivered in pool A, 3 in B and empty queues:\n{scraped}\n{}",
            relay.logs()
        );
    }
    let m = parse_metrics(&scraped);
    let ctx = || format!("--- scrape ---\n{scraped}\n{}", relay.logs());

    // Counters, per pool.
    let listener = relay.smtp_addr().to_string();
    for (pool, n) in [("A", 7.0), ("B", 3.0)] {
        assert_eq!(
            metric_sum(&m, "poolrelay_received_messages_total", &[("pool", pool)]),
            Some(n),
            "poolrelay_received_messages_total{{pool={pool:?}}}\n{}",
            ctx()
        );
        let upstream = if pool == "A" {
            sink_a.addr()
        } else {
            sink_b.addr()
        };
        assert_eq!(
            metric_sum(
                &m,
                "poolrelay_delivered_recipients_total",
                &[("pool", pool), ("upstream", &upstream.to_string())]
            ),
            Some(n),
            "poolrelay_delivered_recipients_total{{pool={pool:?},upstream=\"{upstream}\"}}\n{}",
            ctx()
        );
    }
    let received_listeners: BTreeSet<&str> = m
        .iter()
        .filter(|s| s.name == "poolrelay_received_messages_total")
        .filter_map(|s| s.labels.get("listener").map(String::as_str))
        .collect();
    assert_eq!(
        received_listeners,
        BTreeSet::from([listener.as_str()]),
        "the listener label of poolrelay_received_messages_total\n{}",
        ctx()
    );
    assert_eq!(
        value(&m, "poolrelay_deferred_recipients_total", &[])
            + value(&m, "poolrelay_bounced_recipients_total", &[]),
        0.0,
        "nothing was deferred or bounced\n{}",
        ctx()
    );

    // Gauges: every pool and state present, all 0 once delivered.
    for pool in ["A", "B", "-"] {
        for state in ["ready", "deferred", "held"] {
            assert_eq!(
                metric_sum(
                    &m,
                    "poolrelay_queue_messages",
                    &[("pool", pool), ("state", state)]
                ),
                Some(0.0),
                "poolrelay_queue_messages{{pool={pool:?},state={state:?}}} after delivery\n{}",
                ctx()
            );
        }
        assert_eq!(
            metric_sum(&m, "poolrelay_queue_oldest_age_seconds", &[("pool", pool)]),
            Some(0.0),
            "poolrelay_queue_oldest_age_seconds{{pool={pool:?}}} with an empty queue\n{}",
            ctx()
        );
    }
    for upstream in [sink_a.addr(), sink_b.addr()] {
        assert_eq!(
            metric_sum(
                &m,
                "poolrelay_upstream_up",
                &[("upstream", &upstream.to_string())]
            ),
            Some(1.0),
            "poolrelay_upstream_up for {upstream}\n{}",
            ctx()
        );
        assert!(
            metric_sum(
                &m,
                "poolrelay_upstream_connections",
                &[("upstream", &upstream.to_string())]
            )
            .is_some(),
            "poolrelay_upstream_connections for {upstream}\n{}",
            ctx()
        );
    }
    assert!(
        metric_sum(&m, "poolrelay_smtp_sessions", &[("listener", &listener)]).is_some(),
        "poolrelay_smtp_sessions{{listener=\"{listener}\"}}\n{}",
        ctx()
    );

    // Histograms with real buckets (not summaries).
    for (pool, n) in [("A", 7.0), ("B", 3.0)] {
        let les: BTreeSet<&str> = m
            .iter()
            .filter(|s| {
                s.name == "poolrelay_delivery_seconds_bucket" && s.matches(&[("pool", pool)])
            })
            .filter_map(|s| s.labels.get("le").map(String::as_str))
            .collect();
        assert!(
            les.len() >= 5 && les.contains("+Inf"),
            "poolrelay_delivery_seconds_bucket{{pool={pool:?}}} has buckets {les:?}\n{}",
            ctx()
        );
        assert_eq!(
            metric_sum(
                &m,
                "poolrelay_delivery_seconds_bucket",
                &[("pool", pool), ("le", "+Inf")]
            ),
            Some(n),
            "{}",
            ctx()
        );
        assert_eq!(
            metric_sum(&m, "poolrelay_delivery_seconds_count", &[("pool", pool)]),
            Some(n),
            "{}",
            ctx()
        );
    }
    let commit_buckets = m
        .iter()
        .filter(|s| s.name == "poolrelay_spool_commit_seconds_bucket")
        .count();
    assert!(
        commit_buckets >= 5 && value(&m, "poolrelay_spool_commit_seconds_count", &[]) >= 1.0,
        "poolrelay_spool_commit_seconds has {commit_buckets} bucket lines\n{}",
        ctx()
    );
    assert!(
        !scraped.contains("quantile="),
        "histograms must not be summaries\n{}",
        ctx()
    );

    // Process metrics and build info.
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "poolrelay_build_info",
    ] {
        assert!(
            metric_sum(&m, name, &[]).is_some_and(|v| v > 0.0),
            "{name} missing or 0\n{}",
            ctx()
        );
    }

    // Bounded cardinality: no label per message, recipient or client.
    let allowed: BTreeSet<&str> = BTreeSet::from([
        "listener", "pool", "state", "upstream", "reason", "le", "version",
    ]);
    let labels: BTreeSet<&str> = m
        .iter()
        .flat_map(|s| s.labels.keys().map(String::as_str))
        .collect();
    assert!(
        labels.is_subset(&allowed),
        "unexpected labels {:?}\n{}",
        labels.difference(&allowed).collect::<Vec<_>>(),
        ctx()
    );

    // The sinks agree.
    assert_eq!(sink_a.count(), 7, "messages at pool A's sink");
    assert_eq!(sink_b.count(), 3, "messages at pool B's sink");

    // promtool reads the scrape from stdin.
    let out = promtool(&["check", "metrics"], Some(scraped.as_bytes()), COMMAND);
    assert!(
        out.status.success() && out.stdout.trim().is_empty() && out.stderr.trim().is_empty(),
        "promtool check metrics on the scrape:\n{out}\n{}",
        ctx()
    );
}

/// DESIGN.md: "every series labelled by `pool` where it has one", e.g.
/// `poolrelay_upstream_connections{pool,upstream}`: a `pool` label holds one
/// pool name, so `sum by (pool)` and `pool=~"$pool"` work on every series.
/// Here A's upstream also serves `-` (as LISTSERV's `POOL=A-` does).
#[test]
fn every_pool_label_names_a_single_configured_pool() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    let a = send(&relay, "owner-lista@lists.test", "label-a");
    let b = send(&relay, "owner-b@lists.test", "label-b");
    sink_a.wait_for_message_id(&a.message_id, DELIVERY);
    sink_b.wait_for_message_id(&b.message_id, DELIVERY);
    let mut m = Vec::new();
    relay.wait_until(
        "poolrelay_upstream_connections for both upstreams",
        DELIVERY,
        || {
            m = samples(&relay);
            [sink_a.addr(), sink_b.addr()].iter().all(|u| {
                m.iter().any(|s| {
                    s.name == "poolrelay_upstream_connections"
                        && s.labels.get("upstream") == Some(&u.to_string())
                })
            })
        },
    );
    let pools = ["A", "B", "-"];
    let bad: Vec<String> = m
        .iter()
        .filter_map(|s| {
            let p = s.labels.get("pool")?;
            (!pools.contains(&p.as_str())).then(|| format!("{}{:?}", s.name, s.labels))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "series whose pool label is not one of the pools {pools:?}:\n{}",
        bad.join("\n")
    );
}

// ---------------------------------------------------------------------------
// deploy/: alert rules, scrape config, dashboard
// ---------------------------------------------------------------------------

#[test]
fn alert_rules_and_scrape_config_pass_promtool() {
    let root = workspace_root();
    let deploy = root.join("deploy/prometheus");
    for (args, what) in [
        (vec!["check", "rules", "alerts.yml"], "check rules"),
        (vec!["test", "rules", "alerts_test.yml"], "test rules"),
        (vec!["check", "config", "prometheus.yml"], "check config"),
    ] {
        let mut cmd_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let file = cmd_args.pop().unwrap_or_default();
        cmd_args.push(deploy.join(file).to_string_lossy().into_owned());
        let refs: Vec<&str> = cmd_args.iter().map(String::as_str).collect();
        let out = promtool(&refs, None, COMMAND);
        assert!(out.status.success(), "promtool {what}:\n{out}");
    }
    let text = read(&deploy.join("alerts.yml"));
    for alert in [
        "PoolrelayQueueOldestMessageTooOld",
        "PoolrelayUpstreamDown",
        "PoolrelayBounceSpike",
        "PoolrelaySpoolCommitSlow",
        "PoolrelayDown",
    ] {
        assert!(
            text.contains(&format!("alert: {alert}")),
            "deploy/prometheus/alerts.yml has no alert {alert}"
        );
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every `expr` (panel queries) and templating `query`/`definition` string.
fn dashboard_queries(v: &Value, key: Option<&str>, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, x) in map {
                dashboard_queries(x, Some(k), out);
            }
        }
        Value::Array(items) => {
            for x in items {
                dashboard_queries(x, key, out);
            }
        }
        Value::String(s) => {
            if let Some(k @ ("expr" | "query" | "definition")) = key {
                out.push((k.to_string(), s.clone()));
            }
        }
        _ => {}
    }
}

/// Tokens `poolrelay_[a-z_]+` and `process_[a-z_]+`, `_bucket`/`_sum`/`_count` stripped.
fn metric_tokens(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in ["poolrelay_", "process_"] {
        let mut rest = text;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().next_back();
            let tail = &rest[i..];
            let len = tail
                .char_indices()
                .find(|(_, c)| !(c.is_ascii_lowercase() || *c == '_'))
                .map(|(j, _)| j)
                .unwrap_or(tail.len());
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                let mut name = &tail[..len];
                for suffix in ["_bucket", "_sum", "_count"] {
                    name = name.strip_suffix(suffix).unwrap_or(name);
                }
                out.insert(name.to_string());
            }
            rest = &tail[len.max(1)..];
        }
    }
    out
}

#[test]
fn dashboard_and_alerts_query_only_metrics_the_relay_exports() {
    // Traffic that makes every series appear: A delivers, D is deferred
    // (451), X bounces (550, a DSN then goes to "-" via A's upstream), and
    // one command out of sequence is rejected.
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let sink_451 = Sink::start_with(SinkOptions {
        reply: Some(451),
        ..SinkOptions::default()
    });
    let sink_550 = Sink::start_with(SinkOptions {
        reply: Some(550),
        ..SinkOptions::default()
    });
    let relay = Relay::start(|s| {
        two_pools(
            s,
            sink_a.addr(),
            sink_b.addr(),
            "1h",
            &format!(
                "[pool.D]\n[pool.X]\n\n\
                 [[upstream]]\nhost = \"{}\"\npools = [\"D\"]\n\n\
                 [[upstream]]\nhost = \"{}\"\npools = [\"X\"]\n\n\
                 [[route]]\npool = \"D\"\nsender = \"owner-d@*\"\n\n\
                 [[route]]\npool = \"X\"\nsender = \"owner-x@*\"\n",
                sink_451.addr(),
                sink_550.addr()
            ),
        )
    });
    send(&relay, "owner-lista@lists.test", "names-a");
    send(&relay, "owner-b@lists.test", "names-b");
    send(&relay, "owner-d@lists.test", "names-d");
    send(&relay, "owner-x@lists.test", "names-x");
    let mut c = relay.client();
    c.ehlo();
    let r = c.cmd(&format!("RCPT TO:<{RCPT}>"));
    assert_eq!(r.code / 100, 5, "RCPT before MAIL got {r}");
    c.quit();

    let mut m = Vec::new();
    relay.wait_until(
        "delivered, deferred, bounced and rejected series to appear",
        DELIVERY,
        || {
            m = samples(&relay);
            value(&m, "poolrelay_delivered_recipients_total", &[("pool", "A")]) >= 1.0
                && value(&m, "poolrelay_delivered_recipients_total", &[("pool", "B")]) >= 1.0
                && value(&m, "poolrelay_deferred_recipients_total", &[("pool", "D")]) >= 1.0
                && value(&m, "poolrelay_bounced_recipients_total", &[("pool", "X")]) >= 1.0
                && value(&m, "poolrelay_smtp_rejections_total", &[]) >= 1.0
                && metric_sum(&m, "poolrelay_delivery_seconds_count", &[]).is_some()
        },
    );
    let exported = metric_names(&m);
    let missing: Vec<&&str> = DESIGN_METRICS
        .iter()
        .filter(|n| !exported.contains(**n))
        .collect();
    assert!(
        missing.is_empty(),
        "DESIGN.md metrics the relay does not export: {missing:?}\nexported: {exported:?}"
    );

    // The dashboard.
    let root = workspace_root();
    let path = root.join("deploy/grafana/poolrelay-dashboard.json");
    let dashboard: Value = serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
            && dashboard["title"].is_string()
            && dashboard["uid"].is_string(),
        "{} does not look like a Grafana dashboard (title, uid, panels)",
        path.display()
    );
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, None, &mut queries);
    let exprs: Vec<&str> = queries
        .iter()
        .filter(|(k, _)| k == "expr")
        .map(|(_, q)| q.as_str())
        .collect();
    assert!(
        exprs.len() >= 10,
        "the dashboard has only {} queries",
        exprs.len()
    );
    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    for (_, q) in &queries {
        for name in metric_tokens(q) {
            if !exported.contains(&name) {
                unknown.push(format!("{name} in {q:?}"));
            }
            used.insert(name);
        }
    }
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics the relay does not export:\n{}\nexported: {exported:?}",
        unknown.join("\n")
    );
    let required = [
        "poolrelay_queue_messages",
        "poolrelay_queue_oldest_age_seconds",
        "poolrelay_delivery_seconds",
        "poolrelay_delivered_recipients_total",
        "poolrelay_deferred_recipients_total",
        "poolrelay_bounced_recipients_total",
        "poolrelay_upstream_up",
        "poolrelay_upstream_connections",
        "poolrelay_spool_commit_seconds",
        "poolrelay_smtp_sessions",
        "poolrelay_smtp_rejections_total",
    ];
    let not_shown: Vec<&str> = required
        .iter()
        .copied()
        .filter(|n| !used.contains(*n))
        .collect();
    assert!(
        not_shown.is_empty(),
        "the dashboard shows nothing of {not_shown:?}"
    );
    for q in [
        "histogram_quantile(0.5,",
        "histogram_quantile(0.9,",
        "histogram_quantile(0.99,",
    ] {
        assert!(
            exprs
                .iter()
                .any(|e| e.contains(q) && e.contains("poolrelay_delivery_seconds_bucket")),
            "no delivery latency panel query with {q}"
        );
    }

    // Every dashboard query is valid PromQL: promtool checks them as
    // recording rules, with Grafana's variables given plain values.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$job", ".+")
            .replace("$instance", ".+")
            .replace("$pool", ".+");
        let quoted = serde_json::to_string(&e).unwrap_or_default();
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempdir();
    let rules_path = dir.path().join("dashboard-queries.yml");
    fs::write(&rules_path, &rules).unwrap_or_else(|e| panic!("write rules: {e}"));
    let out = promtool(
        &["check", "rules", &rules_path.to_string_lossy()],
        None,
        COMMAND,
    );
    assert!(
        out.status.success(),
        "a dashboard query is not valid PromQL:\n{out}\n{rules}"
    );

    // The alert rules name only exported metrics too.
    let alerts = read(&root.join("deploy/prometheus/alerts.yml"));
    let unknown: Vec<String> = metric_tokens(&alerts)
        .into_iter()
        .filter(|n| !exported.contains(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "deploy/prometheus/alerts.yml names metrics the relay does not export: {unknown:?}"
    );
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("poolrelay-operating-")
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir: {e}"))
}

// ---------------------------------------------------------------------------
// Queue operations
// ---------------------------------------------------------------------------

#[test]
fn a_held_pool_keeps_its_mail_until_released_while_other_pools_deliver() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    let out = queue_ok(&relay, &["hold", "--pool", "B"]);
    assert!(out.stdout.contains("held"), "queue hold: {out}");

    let b = send(&relay, "owner-b@lists.test", "held-b");
    let a = send(&relay, "owner-lista@lists.test", "held-a");
    sink_a.wait_for_message_id(&a.message_id, DELIVERY);
    assert_eq!(
        sink_b.count(),
        0,
        "pool B is held, yet its sink got mail\n{}",
        relay.logs()
    );

    // The table: B held, one message waiting.
    let out = queue_ok(&relay, &["summary"]);
    let row: Vec<&str> = out
        .stdout
        .lines()
        .map(str::split_whitespace)
        .map(Iterator::collect::<Vec<&str>>)
        .find(|t| t.first() == Some(&"B"))
        .unwrap_or_else(|| panic!("no row for pool B in queue summary:\n{out}"));
    assert!(
        row.len() >= 4 && row[1] == "1" && row[2] == "0" && row[3] == "yes",
        "queue summary row for B (POOL READY DEFERRED HELD ...) should be `B 1 0 yes ...`: {row:?}\n{out}"
    );
    // The JSON.
    let out = queue_ok(&relay, &["summary", "--json"]);
    let pools = json_of(&out, "queue summary --json");
    let pb = pool_entry(&pools, "B");
    assert_eq!(pb["held"], true, "pool B in {pools:#}");
    assert_eq!(pb["ready"], 1, "pool B in {pools:#}");
    assert_eq!(pb["deferred"], 0, "pool B in {pools:#}");
    assert_eq!(
        pool_entry(&pools, "A")["held"],
        false,
        "pool A in {pools:#}"
    );
    assert!(
        listed_ids(&relay).contains(&b.queue_id),
        "queue list --json does not show the held message {}",
        b.queue_id
    );
    let m = samples(&relay);
    assert_eq!(
        metric_sum(
            &m,
            "poolrelay_queue_messages",
            &[("pool", "B"), ("state", "held")]
        ),
        Some(1.0),
        "poolrelay_queue_messages{{pool=\"B\",state=\"held\"}}"
    );
    assert!(
        value(&m, "poolrelay_queue_oldest_age_seconds", &[("pool", "B")]) > 0.0,
        "poolrelay_queue_oldest_age_seconds{{pool=\"B\"}} with a held message"
    );

    let out = queue_ok(&relay, &["release", "--pool", "B"]);
    assert!(out.stdout.contains("released"), "queue release: {out}");
    sink_b.wait_for_message_id(&b.message_id, DELIVERY);
    let pools = json_of(&queue_ok(&relay, &["summary", "--json"]), "summary");
    assert_eq!(pool_entry(&pools, "B")["held"], false, "{pools:#}");
    assert_eq!(ids_at(&sink_a), BTreeSet::from([a.message_id]));
    assert_eq!(ids_at(&sink_b), BTreeSet::from([b.message_id]));
}

/// The human table of `queue summary`: each value ends under the end of its
/// (right-aligned) column heading.
#[test]
fn queue_summary_table_columns_line_up() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    queue_ok(&relay, &["hold", "--pool", "B"]);
    send(&relay, "owner-b@lists.test", "table-b");
    let out = queue_ok(&relay, &["summary"]);
    let ends = |line: &str| -> Vec<usize> {
        let mut v = Vec::new();
        let mut in_token = false;
        for (i, c) in line.char_indices() {
            if c.is_whitespace() {
                if in_token {
                    v.push(i);
                }
                in_token = false;
            } else {
                in_token = true;
            }
        }
        if in_token {
            v.push(line.len());
        }
        v
    };
    let mut lines = out.stdout.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("POOL"), "no header line:\n{out}");
    // POOL READY DEFERRED HELD INFLIGHT OLDEST SENT/MIN: columns 1..=6 are right-aligned.
    let head_ends = ends(header);
    let mut misaligned = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let row_ends = ends(line);
        if row_ends.len() < 7 || head_ends.len() < 7 || row_ends[1..7] != head_ends[1..7] {
            misaligned.push(line.to_string());
        }
    }
    assert!(
        misaligned.is_empty(),
        "queue summary rows whose READY..SENT/MIN values do not end under their headings:\n{}\n--- full output ---\n{}",
        misaligned.join("\n"),
        out.stdout
    );
}

/// Pool A's upstream answers 451 to every message (retry in 1 h); the
/// message `tag` is sent and waits deferred. Returns it.
fn deferred_setup(tag: &str) -> (Relay, SocketAddr, Sink, Sent) {
    let upstream = free_addr();
    let refusing = Sink::start_with(SinkOptions {
        addr: Some(upstream),
        reply: Some(451),
        ..SinkOptions::default()
    });
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1h\"]\n\n[pool.A]\n\n\
             [[upstream]]\nhost = \"{upstream}\"\npools = [\"A\", \"-\"]\n",
            s.head(),
            s.listener("")
        )
    });
    let sent = send(&relay, "owner-lista@lists.test", tag);
    let m = wait_deferred(&relay, "A", &sent.queue_id, "451");
    assert!(
        m["next_attempt_in_seconds"].as_f64().unwrap_or(0.0) > 600.0,
        "the deferred message should wait an hour: {m:#}"
    );
    (relay, upstream, refusing, sent)
}

#[test]
fn flush_retries_deferred_mail_now() {
    let (relay, upstream, refusing, first) = deferred_setup("flush-1");
    let second = send(&relay, "owner-lista@lists.test", "flush-2");
    wait_deferred(&relay, "A", &second.queue_id, "451");
    // The upstream now accepts, on the same address.
    drop(refusing);
    let sink = Sink::start_at(upstream);

    // One message by id: it goes, the other keeps waiting for its retry.
    let out = queue_ok(&relay, &["flush", &first.queue_id]);
    assert!(out.stdout.contains("flushed"), "queue flush ID: {out}");
    sink.wait_for_message_id(&first.message_id, DELIVERY);
    assert!(
        queued_message(&relay, "A", &second.queue_id).is_some(),
        "flushing {} also sent {}\n{}",
        first.queue_id,
        second.queue_id,
        relay.logs()
    );
    assert!(!ids_at(&sink).contains(&second.message_id));

    // The whole pool.
    let out = queue_ok(&relay, &["flush", "--pool", "A"]);
    assert!(
        out.stdout.contains("flushed"),
        "queue flush --pool A: {out}"
    );
    sink.wait_for_message_id(&second.message_id, DELIVERY);
    relay.wait_until("pool A to be empty", DELIVERY, || {
        queued_message(&relay, "A", &second.queue_id).is_none()
    });
    assert_eq!(sink.count(), 2, "{:?}", sink.message_ids());
}

#[test]
fn delete_removes_a_deferred_message_for_good() {
    let (relay, upstream, refusing, doomed) = deferred_setup("delete-me");
    let out = queue_ok(&relay, &["delete", &doomed.queue_id]);
    assert!(out.stdout.contains("deleted"), "queue delete: {out}");
    assert!(
        !listed_ids(&relay).contains(&doomed.queue_id),
        "queue list --json still shows the deleted {}",
        doomed.queue_id
    );
    let again = queue_cli(&relay, &["delete", &doomed.queue_id]);
    assert!(
        !again.status.success(),
        "deleting {} twice should fail (exit codes scripts can trust):\n{again}",
        doomed.queue_id
    );
    let show = queue_cli(&relay, &["show", &doomed.queue_id]);
    assert!(
        !show.status.success(),
        "queue show of a deleted message:\n{show}"
    );

    // The upstream accepts again; a flush and a later message go through,
    // the deleted one never does.
    drop(refusing);
    let sink = Sink::start_at(upstream);
    queue_ok(&relay, &["flush", "--pool", "A"]);
    let marker = send(&relay, "owner-lista@lists.test", "after-delete");
    sink.wait_for_message_id(&marker.message_id, DELIVERY);
    assert_eq!(
        ids_at(&sink),
        BTreeSet::from([marker.message_id]),
        "the deleted message was delivered\n{}",
        relay.logs()
    );
    let pools = api_json(&relay, "/api/v1/pools");
    let pa = pool_entry(&pools, "A");
    assert!(
        pa["ready"] == 0 && pa["deferred"] == 0,
        "pool A after the delete: {pa:#}"
    );
}

/// Pools A, B and H (held); H's mail would go through A's upstream.
fn held_pool_config(s: &RelaySetup, a: SocketAddr, b: SocketAddr, dash: SocketAddr) -> String {
    format!(
        "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n\
         [pool.A]\n[pool.B]\n[pool.H]\n\n\
         [[upstream]]\nhost = \"{a}\"\npools = [\"A\", \"H\"]\n\n\
         [[upstream]]\nhost = \"{b}\"\npools = [\"B\"]\n\n\
         [[upstream]]\nhost = \"{dash}\"\npools = [\"-\"]\n\n\
         [[route]]\npool = \"H\"\nsender = \"owner-h@*\"\n",
        s.head(),
        s.listener("")
    )
}

#[test]
fn move_sends_a_held_message_through_the_target_pool() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let sink_dash = Sink::start();
    let relay =
        Relay::start(|s| held_pool_config(s, sink_a.addr(), sink_b.addr(), sink_dash.addr()));
    queue_ok(&relay, &["hold", "--pool", "H"]);
    let sent = send(&relay, "owner-h@lists.test", "move-me");
    let m = queued_message(&relay, "H", &sent.queue_id)
        .unwrap_or_else(|| panic!("{} is not listed in pool H", sent.queue_id));
    assert_eq!(m["pool"], "H");

    let out = queue_ok(&relay, &["move", &sent.queue_id, "--to", "B"]);
    assert!(out.stdout.contains("moved"), "queue move: {out}");
    sink_b.wait_for_message_id(&sent.message_id, DELIVERY);
    relay.wait_until("the moved message to leave the queue", DELIVERY, || {
        !listed_ids(&relay).contains(&sent.queue_id)
    });
    assert_eq!(sink_a.count(), 0, "pool H's upstream got mail");
    assert_eq!(sink_dash.count(), 0, "a DSN was sent for a moved message");
    let bad = queue_cli(&relay, &["move", "0000000000000000", "--to", "B"]);
    assert!(!bad.status.success(), "moving an unknown id:\n{bad}");
}

#[test]
fn bounce_returns_a_message_to_its_sender_as_a_dsn() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let sink_dash = Sink::start();
    let relay =
        Relay::start(|s| held_pool_config(s, sink_a.addr(), sink_b.addr(), sink_dash.addr()));
    queue_ok(&relay, &["hold", "--pool", "H"]);
    let sent = send(&relay, "owner-h@lists.test", "bounce-me");

    let out = queue_ok(&relay, &["bounce", &sent.queue_id]);
    assert!(out.stdout.contains("bounced"), "queue bounce: {out}");
    let dsns = sink_dash.wait_for_count(1, DELIVERY);
    let dsn = &dsns[0];
    assert_eq!(dsn.from, "", "a DSN comes from the null sender: {dsn:?}");
    assert_eq!(
        dsn.to,
        vec!["owner-h@lists.test".to_string()],
        "the DSN goes to the original envelope sender"
    );
    let content_type = dsn.header("Content-Type").unwrap_or_default();
    assert!(
        content_type
            .to_ascii_lowercase()
            .contains("multipart/report")
            && content_type
                .to_ascii_lowercase()
                .contains("report-type=delivery-status"),
        "DSN Content-Type: {content_type:?}\n{}",
        dsn.raw
    );
    assert!(
        dsn.raw.contains(RCPT) && dsn.raw.to_ascii_lowercase().contains("action: failed"),
        "the DSN should report {RCPT} as failed:\n{}",
        dsn.raw
    );
    assert!(
        !listed_ids(&relay).contains(&sent.queue_id),
        "the bounced message is still queued"
    );
    assert_eq!(sink_a.count(), 0, "the bounced message was delivered");
    assert_eq!(sink_b.count(), 0);
}

// ---------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------

const NEW_ROUTE: &str = "\n[[route]]\npool = \"B\"\nsender = \"owner-new@*\"\n";

#[test]
fn sighup_with_a_new_route_sends_new_mail_to_the_new_pool() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let mut relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    let before = send(&relay, "owner-new@lists.test", "before-hup");
    sink_a.wait_for_message_id(&before.message_id, DELIVERY);

    append_config(&relay, NEW_ROUTE);
    signal_and_wait_for_log(&mut relay, "HUP", "SIGHUP: reloaded");
    let after = send(&relay, "owner-new@lists.test", "after-hup");
    sink_b.wait_for_message_id(&after.message_id, DELIVERY);
    assert!(
        !ids_at(&sink_a).contains(&after.message_id),
        "after the reload the new route's mail also went to A"
    );
    // The rest of the config still holds.
    let a = send(&relay, "owner-lista@lists.test", "after-hup-a");
    sink_a.wait_for_message_id(&a.message_id, DELIVERY);
    assert!(
        relay.wait_exit(Duration::ZERO).is_none(),
        "the relay exited"
    );
}

#[test]
fn sighup_with_a_broken_config_keeps_the_old_one_running() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let mut relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    let good = read_config(&relay);

    // Not TOML at all.
    write_config(&relay, &format!("{good}\nthis is not toml\n"));
    signal_and_wait_for_log(&mut relay, "HUP", "SIGHUP: reload refused");
    // Valid TOML, invalid config: a route to an undeclared pool.
    write_config(
        &relay,
        &format!("{good}\n[[route]]\npool = \"NOPE\"\nsender = \"owner-new@*\"\n"),
    );
    signal_and_wait_for_log(&mut relay, "HUP", "SIGHUP: reload refused");
    let log = relay.log_text();
    assert!(
        log.contains("NOPE"),
        "the refusal should say what is wrong (the unknown pool NOPE)\n{}",
        relay.logs()
    );

    assert!(
        relay.wait_exit(Duration::ZERO).is_none(),
        "the relay exited\n{}",
        relay.logs()
    );
    let b = send(&relay, "owner-b@lists.test", "broken-b");
    let a = send(&relay, "owner-new@lists.test", "broken-a");
    sink_b.wait_for_message_id(&b.message_id, DELIVERY);
    sink_a.wait_for_message_id(&a.message_id, DELIVERY);
    let r = http_get(relay.admin_addr(), "/readyz").unwrap_or_else(|e| panic!("/readyz: {e}"));
    assert_eq!(r.status, 200, "/readyz after a refused reload: {r}");
}

#[test]
fn reload_cli_applies_a_new_config_via_the_api_and_refuses_a_broken_one() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    let url = relay.admin_url();

    append_config(&relay, NEW_ROUTE);
    let out = poolrelay(&["reload", "--admin", &url], COMMAND);
    assert!(
        out.status.success() && out.stdout.contains("reloaded"),
        "poolrelay reload:\n{out}\n{}",
        relay.logs()
    );
    let routed = send(&relay, "owner-new@lists.test", "cli-reload");
    sink_b.wait_for_message_id(&routed.message_id, DELIVERY);

    let good = read_config(&relay);
    write_config(&relay, &format!("{good}\nthis is not toml\n"));
    let out = poolrelay(&["reload", "--admin", &url], COMMAND);
    assert_eq!(
        out.status.code(),
        Some(1),
        "poolrelay reload of a broken config should exit 1:\n{out}"
    );
    assert!(
        out.stderr.contains("refused"),
        "poolrelay reload should say the reload was refused:\n{out}"
    );
    // The last good config (with the new route) still runs.
    let still = send(&relay, "owner-new@lists.test", "cli-reload-kept");
    sink_b.wait_for_message_id(&still.message_id, DELIVERY);
    assert_eq!(sink_a.count(), 0, "{:?}", sink_a.message_ids());
}

#[test]
fn reload_refuses_to_drop_a_pool_that_still_holds_mail() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let mut relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    queue_ok(&relay, &["hold", "--pool", "B"]);
    let held = send(&relay, "owner-b@lists.test", "orphan");
    let good = read_config(&relay);
    // The same config without pool B, its upstream and its route.
    let without_b = good
        .replace("[pool.B]\ndescription = \"emergency\"\n", "")
        .replace(
            &format!(
                "[[upstream]]\nhost = \"{}\"\npools = [\"B\"]\n",
                sink_b.addr()
            ),
            "",
        )
        .replace("[[route]]\npool = \"B\"\nsender = \"owner-b@*\"\n", "");
    assert!(
        !without_b.contains("\"B\""),
        "test bug: B left in\n{without_b}"
    );
    write_config(&relay, &without_b);
    signal_and_wait_for_log(&mut relay, "HUP", "SIGHUP: reload refused");
    assert!(
        queued_message(&relay, "B", &held.queue_id).is_some(),
        "the held message of pool B is gone after the refused reload\n{}",
        relay.logs()
    );
    write_config(&relay, &good);
    queue_ok(&relay, &["release", "--pool", "B"]);
    sink_b.wait_for_message_id(&held.message_id, DELIVERY);
}

// ---------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------

const LOAD_THREADS: usize = 5;
const LOAD_PER_THREAD: usize = 100;
/// Acknowledged messages to see before the SIGTERM.
const ACKED_BEFORE_TERM: usize = 150;

#[derive(Default)]
struct Ledger {
    /// Message-IDs whose data was (being) written: may be queued.
    in_flight: BTreeSet<String>,
    /// Message-IDs whose final dot got a 250: must be delivered.
    acked: BTreeSet<String>,
    /// Why each client stopped.
    stops: Vec<String>,
}

fn lock(ledger: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn sigterm_during_a_load_of_500_messages_exits_0_and_delivers_every_acknowledged_message() {
    // A slow upstream (20 ms per message) keeps deliveries in flight.
    let upstream = free_addr();
    let sink = Sink::start_with(SinkOptions {
        addr: Some(upstream),
        delay_ms: Some(20),
        ..SinkOptions::default()
    });
    let mut relay = Relay::start(|s| s.single_upstream(upstream, ""));
    let addr = relay.smtp_addr();

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let termed = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..LOAD_THREADS)
        .map(|t| {
            let ledger = Arc::clone(&ledger);
            let termed = Arc::clone(&termed);
            std::thread::spawn(move || {
                let why = (|| {
                    let mut client =
                        SmtpClient::connect(addr).map_err(|e| format!("connect: {e}"))?;
                    for i in 0..LOAD_PER_THREAD {
                        let id = unique_id(&format!("term-{t}-{i}"));
                        let from = format!("owner-term{t}@lists.test");
                        let msg = message(&id, &from, RCPT, "sigterm test", "payload\n");
                        let result = client.send_mail_with(&from, &[RCPT], &msg, |_| {
                            lock(&ledger).in_flight.insert(id.clone());
                        });
                        match result {
                            Ok(r) if r.code == 250 => {
                                lock(&ledger).acked.insert(id);
                            }
                            Ok(r) => return Err(format!("message {i}: final dot got {r}")),
                            Err(e @ SmtpError::Io { .. }) => {
                                return Ok(format!("message {i}: {e}"));
                            }
                            Err(SmtpError::Rejected { stage, reply })
                                if termed.load(Ordering::SeqCst) && reply.code / 100 == 4 =>
                            {
                                return Ok(format!("message {i}: {stage} got {reply}"));
                            }
                            Err(e) => return Err(format!("message {i}: {e}")),
                        }
                    }
                    client.quit();
                    Ok(format!("sent all {LOAD_PER_THREAD}"))
                })();
                let line = match why {
                    Ok(s) => format!("client {t}: {s}"),
                    Err(s) => format!("client {t}: UNEXPECTED {s}"),
                };
                lock(&ledger).stops.push(line);
            })
        })
        .collect();

    relay.wait_until(
        &format!("{ACKED_BEFORE_TERM} acknowledged messages before the SIGTERM"),
        Duration::from_secs(60),
        || lock(&ledger).acked.len() >= ACKED_BEFORE_TERM,
    );
    termed.store(true, Ordering::SeqCst);
    let termed_at = Instant::now();
    relay.signal("TERM");
    let status = relay.wait_exit(GRACE + EXIT_MARGIN);
    let took = termed_at.elapsed();
    for h in handles {
        let _ = h.join();
    }
    let status = status.unwrap_or_else(|| {
        panic!(
            "the relay did not exit within {:?} of SIGTERM (grace {GRACE:?})\n{}",
            GRACE + EXIT_MARGIN,
            relay.logs()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\n{}",
        relay.logs()
    );
    let ledger = std::mem::take(&mut *lock(&ledger));
    let unexpected: Vec<_> = ledger
        .stops
        .iter()
        .filter(|s| s.contains("UNEXPECTED"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "a client failed: {unexpected:?}\n{}",
        relay.logs()
    );
    eprintln!(
        "[operating] SIGTERM: exited in {took:?}; acked {}, in flight {}, delivered before the restart {}; clients: {:?}",
        ledger.acked.len(),
        ledger.in_flight.len(),
        sink.count(),
        ledger.stops
    );

    relay.restart();
    let acked = &ledger.acked;
    if !poll_until(Duration::from_secs(90), POLL_INTERVAL, || {
        ids_at(&sink).is_superset(acked)
    }) {
        let arrived = ids_at(&sink);
        let missing: Vec<_> = acked.difference(&arrived).collect();
        panic!(
            "after the SIGTERM and a restart, {} of {} acknowledged messages never arrived: {missing:?}\n{}",
            missing.len(),
            acked.len(),
            relay.logs()
        );
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for id in sink.message_ids() {
        *counts.entry(id).or_default() += 1;
    }
    let never_sent: Vec<_> = counts
        .keys()
        .filter(|id| !ledger.in_flight.contains(*id))
        .collect();
    assert!(
        never_sent.is_empty(),
        "messages delivered whose data was never sent: {never_sent:?}"
    );
    let twice = counts.values().filter(|n| **n > 1).count();
    if twice > 0 {
        eprintln!(
            "[operating] {twice} messages were delivered twice (allowed for in-flight deliveries)"
        );
    }
}

/// The promise of issue 5 for a session in the middle of DATA at SIGTERM:
/// new connections get `421 4.3.2`, the open transaction finishes with its
/// 250, and the process then exits 0; the message is delivered.
#[test]
fn sigterm_lets_an_open_transaction_finish_and_refuses_new_connections() {
    let upstream = free_addr();
    let mut relay = Relay::start(|s| s.single_upstream(upstream, ""));
    let id = unique_id("term-open");
    let from = "owner-open@lists.test";
    let msg = message(
        &id,
        from,
        RCPT,
        "open transaction",
        "finished after SIGTERM\n",
    );
    let mut c = relay.client();
    c.ehlo();
    assert_eq!(c.cmd(&format!("MAIL FROM:<{from}>")).code, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<{RCPT}>")).code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    let data = data_bytes(&msg);
    let (head, tail) = data.split_at(data.len() / 2);
    c.write_bytes(head)
        .unwrap_or_else(|e| panic!("writing the first half of the data: {e}"));

    signal_and_wait_for_log(&mut relay, "TERM", "SIGTERM");
    // The log line comes a moment before the listener switches to 421: a
    // newcomer greeted with 220 in that moment quits and tries again.
    let mut last = String::new();
    let refused = poll_until(
        Duration::from_secs(10),
        POLL_INTERVAL,
        || match SmtpClient::connect(relay.smtp_addr()) {
            Ok(n) if n.greeting.code == 421 => {
                last = n.greeting.to_string();
                true
            }
            Ok(n) => {
                last = n.greeting.to_string();
                n.quit();
                false
            }
            Err(e) => panic!(
                "a new connection after SIGTERM failed ({e}): it should get 421 4.3.2 while the open session finishes\n{}",
                relay.logs()
            ),
        },
    );
    assert!(
        refused && last.starts_with("421 4.3.2"),
        "new connections after SIGTERM should get 421 4.3.2; the last got {last}\n{}",
        relay.logs()
    );
    let reply = c
        .write_bytes(tail)
        .and_then(|()| c.read_reply())
        .unwrap_or_else(|e| {
            panic!(
                "the transaction open at SIGTERM was cut off ({e}) instead of finishing within the grace period\n{}",
                relay.logs()
            )
        });
    assert_eq!(
        reply.code,
        250,
        "final dot of the transaction open at SIGTERM: {reply}\n{}",
        relay.logs()
    );
    c.quit();
    let status = relay
        .wait_exit(GRACE + EXIT_MARGIN)
        .unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", relay.logs()));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}\n{}",
        relay.logs()
    );

    let sink = Sink::start_at(upstream);
    relay.restart();
    sink.wait_for_message_id(&id, DELIVERY);
}

/// A session idle between transactions (LISTSERV keeps its SMTP
/// connections open) has no transaction to finish: SIGTERM must not wait
/// out the whole grace period for it.
#[test]
fn sigterm_does_not_wait_out_the_grace_period_for_an_idle_session() {
    let sink = Sink::start();
    let mut relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    let mut idle = relay.client();
    idle.ehlo();
    let sent = idle
        .send_mail(
            "owner-idle@lists.test",
            &[RCPT],
            &message(
                &unique_id("idle"),
                "owner-idle@lists.test",
                RCPT,
                "idle",
                "x\n",
            ),
        )
        .unwrap_or_else(|e| panic!("send: {e}"));
    assert_eq!(sent.code, 250);
    let started = Instant::now();
    relay.signal("TERM");
    let limit = Duration::from_secs(5);
    let status = relay.wait_exit(limit);
    assert!(
        status.is_some(),
        "the relay was still running {limit:?} after SIGTERM with one idle session open (grace {GRACE:?}): \
         a session with no transaction in progress should be closed (421) at once\n{}",
        relay.logs()
    );
    eprintln!("[operating] exited {:?} after SIGTERM", started.elapsed());
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", relay.logs());
    // The idle client sees the end: a 421 or a closed connection.
    if let Ok(r) = idle.try_cmd("NOOP") {
        assert_eq!(r.code, 421, "NOOP after the shutdown got {r}");
    }
}

// ---------------------------------------------------------------------------
// Admin token, health
// ---------------------------------------------------------------------------

#[test]
fn mutating_api_calls_need_the_token_when_a_token_file_is_set() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let token = "s3cret-operating-token";
    let relay = Relay::start(|s| {
        let token_file = s.dir.join("admin.token");
        fs::write(&token_file, format!("{token}\n")).unwrap_or_else(|e| panic!("token: {e}"));
        let text = two_pools(s, sink_a.addr(), sink_b.addr(), "1s", "");
        text.replacen(
            &format!("[admin]\naddress = \"{}\"\n", s.admin),
            &format!(
                "[admin]\naddress = \"{}\"\ntoken_file = {}\n",
                s.admin,
                toml_str(&token_file.to_string_lossy())
            ),
            1,
        )
    });
    let admin = relay.admin_addr();
    let bearer = format!("Bearer {token}");
    let call = |method: &str, path: &str, auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        http_request(admin, method, path, &headers)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", relay.logs()))
    };

    for path in [
        "/api/v1/pools/A/hold",
        "/api/v1/pools/A/release",
        "/api/v1/pools/A/flush",
        "/api/v1/pools/A/delete-all",
        "/api/v1/messages/0000000000000000/delete",
        "/api/v1/messages/0000000000000000/bounce",
        "/api/v1/messages/0000000000000000/move?to=B",
        "/api/v1/reload",
    ] {
        let r = call("POST", path, None);
        assert_eq!(r.status, 401, "POST {path} without a token: {r}");
        let r = call("POST", path, Some("Bearer wrong-token"));
        assert_eq!(r.status, 401, "POST {path} with a wrong token: {r}");
    }
    let pools = api_json(&relay, "/api/v1/pools");
    assert_eq!(
        pool_entry(&pools, "A")["held"],
        false,
        "a refused hold held the pool"
    );

    let r = call("POST", "/api/v1/pools/A/hold", Some(&bearer));
    assert_eq!(r.status, 200, "POST hold with the token: {r}");
    let pools = api_json(&relay, "/api/v1/pools");
    assert_eq!(pool_entry(&pools, "A")["held"], true, "{pools:#}");
    let r = call("POST", "/api/v1/pools/A/release", Some(&bearer));
    assert_eq!(r.status, 200, "POST release with the token: {r}");

    // Reading needs no token.
    for path in [
        "/api/v1/pools",
        "/api/v1/pools/A/messages",
        "/metrics",
        "/healthz",
        "/readyz",
    ] {
        let r = call("GET", path, None);
        assert_eq!(r.status, 200, "GET {path} without a token: {r}");
    }

    // The CLI: refused without the token, works with --token-file or with
    // the config's admin.token_file.
    let url = relay.admin_url();
    let out = poolrelay(&["queue", "hold", "--pool", "B", "--admin", &url], COMMAND);
    assert_eq!(
        out.status.code(),
        Some(1),
        "queue hold without a token:\n{out}"
    );
    assert!(
        out.stderr.contains("401"),
        "queue hold without a token:\n{out}"
    );
    let token_file = relay.dir().join("admin.token");
    let out = poolrelay(
        &[
            "queue",
            "hold",
            "--pool",
            "B",
            "--admin",
            &url,
            "--token-file",
            &token_file.to_string_lossy(),
        ],
        COMMAND,
    );
    assert!(out.status.success(), "queue hold --token-file:\n{out}");
    let config = relay.config_path().to_string_lossy().into_owned();
    let out = poolrelay(&["queue", "release", "--pool", "B", "-c", &config], COMMAND);
    assert!(out.status.success(), "queue release -c CONFIG:\n{out}");
    let pools = api_json(&relay, "/api/v1/pools");
    assert_eq!(pool_entry(&pools, "B")["held"], false, "{pools:#}");
    let out = poolrelay(&["queue", "summary", "--admin", &url], COMMAND);
    assert!(
        out.status.success(),
        "queue summary without a token:\n{out}"
    );
}

#[test]
fn healthz_and_readyz_answer_200_while_running() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    for path in ["/healthz", "/readyz"] {
        let r = http_get(relay.admin_addr(), path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", relay.logs()));
        assert_eq!(r.status, 200, "GET {path}: {r}\n{}", relay.logs());
    }
    let r = http_get(relay.admin_addr(), "/no-such-page")
        .unwrap_or_else(|e| panic!("GET /no-such-page: {e}"));
    assert_eq!(r.status, 404, "{r}");
}
