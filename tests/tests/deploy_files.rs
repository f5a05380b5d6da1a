//! The deploy/ files (README.md, "Operating" > "Metrics and health"):
//! alert rules, scrape config and Grafana dashboard pass promtool and query
//! only metrics the relay exports.

use std::collections::BTreeSet;
use std::fs;

use poolrelay_tests::operating::{
    COMMAND, DELIVERY, RCPT, read_file, samples, send, two_pools, value,
};
use poolrelay_tests::{
    Relay, Sink, SinkOptions, metric_names, metric_sum, new_tempdir, promtool, workspace_root,
};
use serde_json::Value;

/// The metrics table of README.md ("Operating" > "Metrics and health").
const README_METRICS: &[&str] = &[
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
    let text = read_file(&deploy.join("alerts.yml"));
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
    let missing: Vec<&&str> = README_METRICS
        .iter()
        .filter(|n| !exported.contains(**n))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics of the README table the relay does not export: {missing:?}\nexported: {exported:?}"
    );

    // The dashboard.
    let root = workspace_root();
    let path = root.join("deploy/grafana/poolrelay-dashboard.json");
    let dashboard: Value = serde_json::from_str(&read_file(&path))
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
    let dir = new_tempdir("poolrelay-deploy-");
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
    let alerts = read_file(&root.join("deploy/prometheus/alerts.yml"));
    let unknown: Vec<String> = metric_tokens(&alerts)
        .into_iter()
        .filter(|n| !exported.contains(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "deploy/prometheus/alerts.yml names metrics the relay does not export: {unknown:?}"
    );
}
