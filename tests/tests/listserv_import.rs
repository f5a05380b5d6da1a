//! `poolrelay import-listserv` on the three reference configurations
//! (README.md, "The three reference configurations"):
//! the generated TOML is the golden file, passes `poolrelay check`, and
//! `check --print` shows the workers, pools and hosts README.md names.

use std::path::Path;

use poolrelay_tests::listserv::{
    CLI_DEADLINE, Printed, PrintedRoute, PrintedUpstream, Reference, import_listserv,
    parse_printed, reference,
};
use poolrelay_tests::{new_tempdir, poolrelay};

/// Imports `r` with default options into a temporary file; checks that the
/// text is the golden file and that `poolrelay check` accepts it; returns
/// what `check --print` shows.
fn import_and_check(r: &Reference, dir: &Path) -> Printed {
    let out = import_listserv(&r.input_args());
    assert!(
        out.stderr.trim().is_empty(),
        "{}: the reference configuration must import without warnings:\n{out}",
        r.name
    );
    let golden = std::fs::read_to_string(&r.expected_toml)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", r.expected_toml.display()));
    assert!(
        out.stdout == golden,
        "{}: import-listserv output differs from {}\n--- got ---\n{}",
        r.name,
        r.expected_toml.display(),
        out.stdout
    );
    let path = dir.join(format!("{}.toml", r.name));
    std::fs::write(&path, &out.stdout)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    let path = path.to_string_lossy().into_owned();

    let check = poolrelay(&["check", "-c", &path], CLI_DEADLINE);
    assert!(
        check.status.success() && check.stdout.contains("ok"),
        "{}: poolrelay check rejected the imported config:\n{check}\n--- config ---\n{}",
        r.name,
        out.stdout
    );
    let print = poolrelay(&["check", "-c", &path, "--print"], CLI_DEADLINE);
    assert!(
        print.status.success(),
        "{}: poolrelay check --print:\n{print}",
        r.name
    );

    // `import-listserv --check` reports the same resolved model (only the
    // first line, naming the source, differs).
    let mut args = r.input_args();
    args.push("--check".into());
    let report = import_listserv(&args);
    let tail = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(
        tail(&report.stdout),
        tail(&print.stdout),
        "{}: import-listserv --check and check --print of the written file disagree",
        r.name
    );
    parse_printed(&print.stdout)
}

fn upstream(host: &str, workers: usize, pools: &[&str]) -> PrintedUpstream {
    PrintedUpstream {
        host: host.to_string(),
        workers,
        pools: pools.iter().map(|p| p.to_string()).collect(),
        failover: Vec::new(),
        window: None,
    }
}

fn route(matchers: &str, pool: &str) -> PrintedRoute {
    PrintedRoute {
        matchers: matchers.to_string(),
        pool: pool.to_string(),
    }
}

fn pool_names(p: &Printed) -> Vec<&str> {
    p.pools.keys().map(String::as_str).collect()
}

/// ref1: 2 workers to SCOOBY serving A and `-`, 1 worker to SCRAPPY serving
/// B; the emergency list (Delivery-Pool=B) is pool B, postings and
/// administrative mail alike.
#[test]
fn ref1_imports_two_scooby_workers_for_a_and_default_and_one_scrappy_worker_for_b() {
    let dir = new_tempdir("poolrelay-import-");
    let p = import_and_check(&reference("ref1"), dir.path());
    assert_eq!(
        p.upstreams,
        vec![
            upstream("scooby.example.org:25", 2, &["A", "-"]),
            upstream("scrappy.example.org:25", 1, &["B"]),
        ],
        "{}",
        p.text
    );
    let mut names = pool_names(&p);
    names.sort();
    assert_eq!(names, vec!["-", "A", "B"], "{}", p.text);
    assert_eq!(p.served_by("A"), "scooby.example.org:25 (2 workers)");
    assert_eq!(p.served_by("-"), "scooby.example.org:25 (2 workers)");
    assert_eq!(p.served_by("B"), "scrappy.example.org:25 (1 worker)");
    assert_eq!(p.fallback, vec!["scooby.example.org:25"], "{}", p.text);
    assert_eq!(p.list_pool, "A", "{}", p.text);
    assert_eq!(
        p.routes,
        vec![
            route("sender <> (null sender)", "-"),
            route("sender listserv@*", "-"),
            route("sender owner-emergency@*", "B"),
        ],
        "{}",
        p.text
    );
    assert_eq!(
        p.unmatched.as_deref(),
        Some("owner-*@* -> A (defaults.list_pool), else -> -")
    );
}

/// ref2: virtual domains. MTA.EXAMPLE.ORG serves A and `-`, MTA.EXAMPLE.COM
/// serves B; each list is recognised by its own domain (List-Address), and
/// LISTSERV@ of each MYDOMAIN host goes to `-`.
#[test]
fn ref2_imports_one_mta_per_virtual_domain() {
    let dir = new_tempdir("poolrelay-import-");
    let p = import_and_check(&reference("ref2"), dir.path());
    assert_eq!(
        p.upstreams,
        vec![
            upstream("mta.example.org:25", 1, &["A", "-"]),
            upstream("mta.example.com:25", 1, &["B"]),
        ],
        "{}",
        p.text
    );
    assert_eq!(p.served_by("A"), "mta.example.org:25 (1 worker)");
    assert_eq!(p.served_by("-"), "mta.example.org:25 (1 worker)");
    assert_eq!(p.served_by("B"), "mta.example.com:25 (1 worker)");
    assert_eq!(p.fallback, vec!["mta.example.org:25"], "{}", p.text);
    assert_eq!(p.list_pool, "A");
    assert!(
        p.text.contains("hostname: listserv.example.org"),
        "the first MYDOMAIN host becomes server.hostname:\n{}",
        p.text
    );
    assert_eq!(
        p.routes,
        vec![
            route("sender <> (null sender)", "-"),
            route("sender listserv@listserv.example.org", "-"),
            route("sender listserv@listserv.example.com", "-"),
            route("sender owner-comlist@listserv.example.com", "B"),
            route("sender owner-orglist@listserv.example.org", "A"),
        ],
        "{}",
        p.text
    );
}

/// ref3: backscatter isolation. SHAGGY alone serves `-`; the list with
/// Delivery-Pool=B,A has its postings (Sender: naming the list) in B via
/// SCRAPPY and its administrative mail in A via SCOOBY.
#[test]
fn ref3_imports_shaggy_alone_for_the_default_pool_and_splits_postings_from_admin_mail() {
    let dir = new_tempdir("poolrelay-import-");
    let p = import_and_check(&reference("ref3"), dir.path());
    assert_eq!(
        p.upstreams,
        vec![
            upstream("scooby.example.org:25", 2, &["A"]),
            upstream("scrappy.example.org:25", 1, &["B"]),
            upstream("shaggy.example.org:25", 1, &["-"]),
        ],
        "{}",
        p.text
    );
    assert_eq!(p.served_by("A"), "scooby.example.org:25 (2 workers)");
    assert_eq!(p.served_by("B"), "scrappy.example.org:25 (1 worker)");
    assert_eq!(p.served_by("-"), "shaggy.example.org:25 (1 worker)");
    assert_eq!(p.fallback, vec!["scooby.example.org:25"], "{}", p.text);
    assert_eq!(p.list_pool, "A");
    assert_eq!(
        p.routes,
        vec![
            route("sender <> (null sender)", "-"),
            route("sender listserv@*", "-"),
            route(
                "sender owner-emergency@* and header Sender: emergency@*",
                "B"
            ),
            route(
                "sender owner-emergency@* and header Sender: *<emergency@*>",
                "B"
            ),
            route("sender owner-emergency@*", "A"),
        ],
        "{}",
        p.text
    );
}

/// The options that point an import at a test bed (or a staging host)
/// show up in the resolved model: listener, admin, spool, hosts, port.
#[test]
fn import_options_set_listener_admin_spool_and_host_addresses() {
    let dir = new_tempdir("poolrelay-import-");
    let r = reference("ref3");
    let spool = dir.path().join("spool");
    let mut args = r.input_args();
    for a in [
        "--listen",
        "127.0.0.1:3525",
        "--admin",
        "127.0.0.1:3026",
        "--spool-dir",
        &spool.to_string_lossy(),
        // Upper case as in site.cfg: names are case-insensitive.
        "--host",
        "SCOOBY.EXAMPLE.ORG=127.0.0.1:3601",
        "--host",
        "scrappy.example.org=127.0.0.1:3602",
        "--host",
        "shaggy.example.org=127.0.0.1",
        "--port",
        "2600",
        "--check",
    ] {
        args.push(a.to_string());
    }
    let out = import_listserv(&args);
    let p = parse_printed(&out.stdout);
    assert!(
        p.text.contains("listeners:\n  127.0.0.1:3525 "),
        "{}",
        p.text
    );
    assert!(p.text.contains("admin: 127.0.0.1:3026 "), "{}", p.text);
    assert!(
        p.text
            .contains(&format!("spool: {}   ", spool.to_string_lossy())),
        "{}",
        p.text
    );
    let hosts: Vec<(&str, &str)> = p
        .hosts
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        hosts,
        vec![
            ("scooby.example.org", "127.0.0.1:3601"),
            ("scrappy.example.org", "127.0.0.1:3602"),
            ("shaggy.example.org", "127.0.0.1"),
        ],
        "{}",
        p.text
    );
    let hosts: Vec<&str> = p.upstreams.iter().map(|u| u.host.as_str()).collect();
    assert_eq!(
        hosts,
        vec![
            "scooby.example.org:2600",
            "scrappy.example.org:2600",
            "shaggy.example.org:2600"
        ],
        "--port gives every upstream that port:\n{}",
        p.text
    );
    assert_eq!(p.fallback, vec!["scooby.example.org:2600"], "{}", p.text);
}
