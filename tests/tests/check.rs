//! `poolrelay check`: validation with file:line errors, and `--print`.

use std::time::Duration;

use poolrelay_tests::listserv::{PrintedRoute, parse_printed};
use poolrelay_tests::{new_tempdir, poolrelay};

const DEADLINE: Duration = Duration::from_secs(30);

/// A valid config with two pools, two upstreams and a route; `-` and the
/// worker count of the second upstream are left to the defaults.
const CONFIG: &str = r#"[server]
hostname = "relay.test"
spool_dir = "spool"

[[listener]]
address = "127.0.0.1:2525"

[admin]
address = "127.0.0.1:9025"

[defaults]
list_pool = "bulk_lane"

[pool.bulk_lane]
description = "list postings"
[pool.urgent]
description = "emergency lists"

[[upstream]]
host = "127.0.0.1:2601"
workers = 2
pools = ["bulk_lane", "-"]

[[upstream]]
host = "127.0.0.1:2602"
pools = ["urgent"]

[[route]]
pool = "urgent"
sender = "owner-emergency@*"
"#;

/// The 1-based number of the last line of `text` that is `needle` (trimmed).
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == needle)
        .map(|(i, _)| i + 1)
        .last()
        .unwrap_or_else(|| panic!("{needle:?} not in the test config"))
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("poolrelay.toml");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.to_string_lossy().into_owned()
}

#[test]
fn check_print_shows_pools_upstreams_and_routes() {
    let dir = new_tempdir("poolrelay-check-");
    let path = write_config(&dir, CONFIG);
    let out = poolrelay(&["check", "-c", &path, "--print"], DEADLINE);
    assert!(
        out.status.success(),
        "poolrelay check --print on a valid config:\n{out}"
    );
    // What the config does not say and `check` works out: who serves the
    // default pool `-`, the default worker count, where unmatched mail
    // goes, and the file lines of the tables.
    let p = parse_printed(&out.stdout);
    assert_eq!(
        p.served_by("-"),
        "127.0.0.1:2601 (2 workers)",
        "the default pool is served by the upstream listing \"-\":\n{out}"
    );
    assert_eq!(
        p.served_by("urgent"),
        "127.0.0.1:2602 (1 worker)",
        "an upstream without `workers` gets one:\n{out}"
    );
    assert_eq!(
        p.served_by("bulk_lane"),
        "127.0.0.1:2601 (2 workers)",
        "{out}"
    );
    assert_eq!(
        p.upstream("127.0.0.1:2602").workers,
        1,
        "default worker count:\n{out}"
    );
    assert_eq!(
        p.routes,
        vec![PrintedRoute {
            matchers: "sender owner-emergency@*".into(),
            pool: "urgent".into(),
        }],
        "{out}"
    );
    assert_eq!(
        p.unmatched.as_deref(),
        Some("owner-*@* -> bulk_lane (defaults.list_pool), else -> -"),
        "where mail no route matches goes:\n{out}"
    );
    let route_line = line_of(CONFIG, "[[route]]");
    assert!(
        out.stdout.lines().any(|l| l
            .trim_start()
            .starts_with(&format!("1. line {route_line} "))),
        "the route should be shown with its line {route_line}:\n{out}"
    );
    let upstream_line = line_of(CONFIG, "[[upstream]]");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("127.0.0.1:2602 ")
                && l.trim_end().ends_with(&format!("(line {upstream_line})"))),
        "the second upstream should be shown with its line {upstream_line}:\n{out}"
    );
}

#[test]
fn check_reports_unknown_pool_in_route_with_file_and_line() {
    let dir = new_tempdir("poolrelay-check-");
    let text = r#"[server]
hostname = "relay.test"
spool_dir = "spool"

[[listener]]
address = "127.0.0.1:2525"

[defaults]
list_pool = "A"

[pool.A]

[[upstream]]
host = "127.0.0.1:2601"
pools = ["A", "-"]

[[route]]
pool = "A"
sender = "owner-biglist@*"

[[route]]
pool = "Q"
sender = "owner-emergency@*"
"#;
    let path = write_config(&dir, text);
    // The second [[route]] and its pool key: either line names the mistake.
    let route_line = line_of(text, "[[route]]");
    let pool_line = line_of(text, "pool = \"Q\"");
    let out = poolrelay(&["check", "-c", &path], DEADLINE);
    assert!(
        !out.status.success(),
        "check must fail on a route naming an unknown pool:\n{out}"
    );
    assert!(
        !out.stderr.contains("panicked"),
        "check must report, not panic:\n{out}"
    );
    let at_route = format!("{path}:{route_line}");
    let at_pool = format!("{path}:{pool_line}");
    assert!(
        out.stderr.contains(&format!("{at_route}:")) || out.stderr.contains(&format!("{at_pool}:")),
        "stderr must name {at_route} (the [[route]]) or {at_pool} (its pool key):\n{out}"
    );
    assert!(
        out.stderr
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|word| word == "Q"),
        "the error should name the unknown pool Q:\n{out}"
    );
}
