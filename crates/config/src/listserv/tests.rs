//! LISTSERV import tests: the reference configurations of README.md ("The
//! three reference configurations") parsed back into the resolved model, the
//! site.cfg and list header syntax, and errors that name the file and line.

use std::collections::HashMap;

use super::site::{substitute, unquote};
use super::*;
use crate::{DEFAULT_POOL, Route};

fn src(path: &str, text: &str) -> Source {
    Source {
        path: PathBuf::from(path),
        text: text.to_string(),
    }
}

/// Imports `site` (as `site.cfg`) with list headers `(NAME, text)` (as `NAME.list`).
fn try_import(
    site: &str,
    lists: &[(&str, &str)],
    opts: &ImportOptions,
) -> Result<Import, ConfigError> {
    let lists: Vec<(String, Source)> = lists
        .iter()
        .map(|(name, text)| (name.to_string(), src(&format!("{name}.list"), text)))
        .collect();
    import_sources(&src("site.cfg", site), &lists, opts)
}

#[track_caller]
fn import(site: &str, lists: &[(&str, &str)]) -> Import {
    match try_import(site, lists, &ImportOptions::default()) {
        Ok(i) => i,
        Err(e) => panic!("import failed: {e}"),
    }
}

/// The generated TOML parsed again, as `poolrelay check` would.
#[track_caller]
fn reparse(i: &Import) -> Config {
    match Config::parse(&i.toml, Path::new("imported.toml")) {
        Ok(c) => c,
        Err(e) => panic!("generated TOML does not parse: {e}\n{}", i.toml),
    }
}

/// The import error, asserting its file, line and that it names every `needles`.
#[track_caller]
fn import_err(site: &str, lists: &[(&str, &str)], file: &str, line: usize, needles: &[&str]) {
    let e = match try_import(site, lists, &ImportOptions::default()) {
        Ok(i) => panic!("expected an error at {file}:{line}, got:\n{}", i.toml),
        Err(e) => e,
    };
    assert_eq!((e.file.as_path(), e.line), (Path::new(file), line), "{e}");
    for n in needles {
        assert!(e.message.contains(n), "message lacks {n:?}: {e}");
    }
    assert!(
        e.to_string().starts_with(&format!("{file}:{line}: ")),
        "{e}"
    );
}

/// (host, workers, pools, failover, window) of each upstream.
type UpstreamShape = (String, usize, Vec<String>, Vec<String>, Option<String>);

fn upstreams(c: &Config) -> Vec<UpstreamShape> {
    c.upstreams
        .iter()
        .map(|u| {
            (
                u.host.clone(),
                u.workers,
                u.pools.clone(),
                u.failover.clone(),
                u.window.map(|w| w.to_string()),
            )
        })
        .collect()
}

#[track_caller]
fn up(
    host: &str,
    workers: usize,
    pools: &[&str],
    failover: &[&str],
    window: Option<&str>,
) -> UpstreamShape {
    (
        host.into(),
        workers,
        pools.iter().map(|p| p.to_string()).collect(),
        failover.iter().map(|h| h.to_string()).collect(),
        window.map(str::to_string),
    )
}

/// (pool, sender, header value) of each route; every generated header matcher is on `Sender`.
fn routes(c: &Config) -> Vec<(String, Option<String>, Option<String>)> {
    c.routes
        .iter()
        .map(|r| {
            if let Some(h) = &r.header {
                assert_eq!(h.name, "Sender");
            }
            assert!(r.recipient.is_none() && r.listener.is_none());
            (
                r.pool.clone(),
                r.sender.clone(),
                r.header.as_ref().map(|h| h.value.clone()),
            )
        })
        .collect()
}

fn route(
    pool: &str,
    sender: &str,
    header: Option<&str>,
) -> (String, Option<String>, Option<String>) {
    (pool.into(), Some(sender.into()), header.map(str::to_string))
}

/// The relay's glob (case-insensitive, `*` and `?`), repeated here because
/// the config crate must not depend on the engine.
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, _) => t.is_empty(),
            (Some('*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some(&pc), Some(&tc)) => (pc == '?' || pc == tc) && go(&p[1..], &t[1..]),
            (Some(_), None) => false,
        }
    }
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    go(&p, &t)
}

/// The pool the relay would pick, as README.md ("How a message is routed")
/// describes it: first matching route, else `list_pool` for `owner-*@`
/// senders, else `-`.
fn classify(c: &Config, sender: &str, sender_header: Option<&str>) -> String {
    let matches = |r: &Route| {
        let sender_ok = r.sender.as_deref().is_none_or(|s| {
            if s.is_empty() {
                sender.is_empty()
            } else {
                glob(s, sender)
            }
        });
        let header_ok = r.header.as_ref().is_none_or(|h| {
            h.name.eq_ignore_ascii_case("Sender")
                && sender_header.is_some_and(|v| glob(&h.value, v))
        });
        sender_ok && header_ok
    };
    match c.routes.iter().find(|r| matches(r)) {
        Some(r) => r.pool.clone(),
        None if glob("owner-*@*", sender) => c.defaults.list_pool.clone(),
        None => DEFAULT_POOL.to_string(),
    }
}

const REF1: &str = "DEFAULT_LIST_POOL=A
SMTP_FORWARD=SCOOBY.EXAMPLE.ORG
SMTP_FORWARD_1=2*SCOOBY.EXAMPLE.ORG;POOL=A-
SMTP_FORWARD_2=SCRAPPY.EXAMPLE.ORG;POOL=B
";

const REF2: &str = "DEFAULT_LIST_POOL=A
SMTP_FORWARD=MTA.EXAMPLE.ORG
SMTP_FORWARD_1=MTA.EXAMPLE.ORG;POOL=A-
SMTP_FORWARD_2=MTA.EXAMPLE.COM;POOL=B
MYDOMAIN=LISTSERV.EXAMPLE.ORG LISTSERV.EXAMPLE.COM
";

const REF3: &str = "DEFAULT_LIST_POOL=A
SMTP_FORWARD=SCOOBY.EXAMPLE.ORG
SMTP_FORWARD_1=2*SCOOBY.EXAMPLE.ORG;POOL=A
SMTP_FORWARD_2=SCRAPPY.EXAMPLE.ORG;POOL=B
SMTP_FORWARD_3=SHAGGY.EXAMPLE.ORG;POOL=-
";

#[test]
fn reference_1_emergency_list_through_scrappy() {
    let i = import(REF1, &[("EMERGENCY", "* Delivery-Pool=B\n")]);
    let c = reparse(&i);
    let mut own = i.config.clone();
    own.source = PathBuf::from("imported.toml");
    assert_eq!(c, own);
    assert_eq!(
        upstreams(&c),
        [
            up("scooby.example.org:25", 2, &["A", "-"], &[], None),
            up("scrappy.example.org:25", 1, &["B"], &[], None),
        ]
    );
    assert_eq!(c.pool_names(), ["A", "B", "-"]);
    assert_eq!(c.defaults.fallback, ["scooby.example.org:25"]);
    assert_eq!(c.defaults.list_pool, "A");
    assert_eq!(c.defaults.rate_limit, None);
    assert!(c.pools.values().all(|p| p.rate_limit.is_none()));
    assert_eq!(
        routes(&c),
        [
            route("-", "", None),
            route("-", "listserv@*", None),
            route("B", "owner-emergency@*", None),
        ]
    );
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].address.to_string(), "127.0.0.1:2525");
    assert_eq!(c.listeners[0].pool, None);
    assert_eq!(c.admin.address.to_string(), "127.0.0.1:9025");
    assert_eq!(c.server.spool_dir, Path::new("var/spool"));
    assert!(
        c.pools["B"].description.contains("EMERGENCY"),
        "{:?}",
        c.pools["B"]
    );
    assert!(c.pools["A"].description.contains("DEFAULT_LIST_POOL"));
    assert!(c.pools["-"].description.contains("command replies"));
    // What LISTSERV sends, and where it goes.
    let posting = Some("Emergency list <EMERGENCY@LISTSERV.EXAMPLE.ORG>");
    assert_eq!(
        classify(&c, "owner-EMERGENCY@LISTSERV.EXAMPLE.ORG", posting),
        "B"
    );
    assert_eq!(
        classify(&c, "owner-EMERGENCY@LISTSERV.EXAMPLE.ORG", None),
        "B"
    );
    assert_eq!(classify(&c, "owner-NEWS@LISTSERV.EXAMPLE.ORG", None), "A");
    assert_eq!(classify(&c, "LISTSERV@LISTSERV.EXAMPLE.ORG", None), "-");
    assert_eq!(classify(&c, "", None), "-");
    assert!(i.warnings.is_empty(), "{:?}", i.warnings);
    // The pinned-listener alternative is shown, commented out.
    assert!(
        i.toml
            .contains("# [[listener]]\n# address = \"127.0.0.2:2525\"\n# pool = \"B\"")
    );
    assert!(i.toml.contains("(SMTP_FORWARD_2)"));
}

#[test]
fn reference_2_virtual_domains() {
    let i = import(
        REF2,
        &[
            (
                "ORGLIST",
                "* List-Address=LISTSERV.EXAMPLE.ORG\n* Delivery-Pool=A\n",
            ),
            (
                "COMLIST",
                "* List-Address=LISTSERV.EXAMPLE.COM\n* Delivery-Pool=B\n",
            ),
        ],
    );
    let c = reparse(&i);
    assert_eq!(
        upstreams(&c),
        [
            up("mta.example.org:25", 1, &["A", "-"], &[], None),
            up("mta.example.com:25", 1, &["B"], &[], None),
        ]
    );
    assert_eq!(c.server.hostname, "listserv.example.org");
    assert_eq!(c.pool_names(), ["A", "B", "-"]);
    assert_eq!(c.defaults.fallback, ["mta.example.org:25"]);
    assert_eq!(c.defaults.list_pool, "A");
    assert_eq!(
        routes(&c),
        [
            route("-", "", None),
            route("-", "listserv@listserv.example.org", None),
            route("-", "listserv@listserv.example.com", None),
            route("A", "owner-orglist@listserv.example.org", None),
            route("B", "owner-comlist@listserv.example.com", None),
        ]
    );
    let com = Some("<COMLIST@LISTSERV.EXAMPLE.COM>");
    assert_eq!(classify(&c, "owner-COMLIST@LISTSERV.EXAMPLE.COM", com), "B");
    assert_eq!(
        classify(&c, "owner-ORGLIST@LISTSERV.EXAMPLE.ORG", None),
        "A"
    );
    assert_eq!(classify(&c, "LISTSERV@LISTSERV.EXAMPLE.COM", None), "-");
    assert!(i.warnings.is_empty(), "{:?}", i.warnings);
}

#[test]
fn reference_3_backscatter_isolation_with_posting_and_admin_pools() {
    let i = import(REF3, &[("EMERGENCY", "* Delivery-Pool=B,A\n")]);
    let c = reparse(&i);
    assert_eq!(
        upstreams(&c),
        [
            up("scooby.example.org:25", 2, &["A"], &[], None),
            up("scrappy.example.org:25", 1, &["B"], &[], None),
            up("shaggy.example.org:25", 1, &["-"], &[], None),
        ]
    );
    assert_eq!(c.pool_names(), ["A", "B", "-"]);
    assert_eq!(c.defaults.fallback, ["scooby.example.org:25"]);
    assert_eq!(c.defaults.list_pool, "A");
    assert_eq!(
        routes(&c),
        [
            route("-", "", None),
            route("-", "listserv@*", None),
            route("B", "owner-emergency@*", Some("emergency@*")),
            route("B", "owner-emergency@*", Some("*<emergency@*>")),
            route("A", "owner-emergency@*", None),
        ]
    );
    let sender = "owner-EMERGENCY@LISTSERV.EXAMPLE.ORG";
    let posting = Some("Emergency alerts <EMERGENCY@LISTSERV.EXAMPLE.ORG>");
    assert_eq!(classify(&c, sender, posting), "B");
    // Welcome messages, error reports: no Sender: naming the list.
    assert_eq!(classify(&c, sender, None), "A");
    assert_eq!(classify(&c, sender, Some("someone@example.net")), "A");
    assert_eq!(classify(&c, "LISTSERV@LISTSERV.EXAMPLE.ORG", None), "-");
    assert_eq!(classify(&c, "", None), "-");
    assert!(c.pools["B"].description.contains("postings of EMERGENCY"));
    assert!(
        c.pools["A"]
            .description
            .contains("administrative mail of EMERGENCY")
    );
    assert!(i.warnings.is_empty(), "{:?}", i.warnings);
}

#[test]
fn window_failover_quoted_value_and_rate_limits() {
    let i = import(
        "SMTP_FORWARD_1=\"2*UNIXSERVER.BAR.COM(00:00-05:00);SMTP.BAZ.NET;POOL=A\"\n\
         SMTP_RATE_LIMIT=12Mbps AB:1.5Mbps C:150kbps\n",
        &[],
    );
    let c = reparse(&i);
    assert_eq!(
        upstreams(&c),
        [up(
            "unixserver.bar.com:25",
            2,
            &["A"],
            &["smtp.baz.net:25"],
            Some("00:00-05:00")
        )]
    );
    let w = c.upstreams[0].window.unwrap();
    assert_eq!((w.start_minute, w.end_minute), (0, 300));
    assert_eq!(c.defaults.rate_limit, Some(12_000_000));
    let rate = |p: &str| c.pools[p].rate_limit;
    assert_eq!(rate("A"), Some(1_500_000));
    assert_eq!(rate("B"), Some(1_500_000));
    assert_eq!(rate("C"), Some(150_000));
    assert_eq!(rate("-"), None);
    assert_eq!(c.pool_names(), ["A", "B", "C", "-"]);
    // No DEFAULT_LIST_POOL: list mail stays in "-", as in LISTSERV.
    assert_eq!(c.defaults.list_pool, "-");
    assert!(c.defaults.fallback.is_empty());
    // B, C and - have no worker: said on stderr and in the file.
    for p in ["B", "C", "-"] {
        assert!(
            i.warnings
                .iter()
                .any(|w| w.contains(&format!("pool {p} is served by no SMTP_FORWARD_n"))),
            "{p}: {:?}",
            i.warnings
        );
    }
    assert!(i.toml.contains("rate_limit = \"150kbps\""));
    assert!(
        i.toml
            .contains("Inside 00:00-05:00 (local time) through unixserver.bar.com:25")
    );
}

#[test]
fn suffixes_in_any_order_and_lower_case_keywords() {
    let i = import(
        "smtp_forward_1=HOST.EXAMPLE.ORG;pool=B;BACKUP.EXAMPLE.ORG\n\
         Smtp_Forward_2='3*Relay.Example.Org;Fail.Example.Org;Pool=a-'\n\
         default_list_pool=b\n\
         Smtp_Forward=Fallback.Example.Org\n",
        &[],
    );
    let c = reparse(&i);
    assert_eq!(
        upstreams(&c),
        [
            up(
                "host.example.org:25",
                1,
                &["B"],
                &["backup.example.org:25"],
                None
            ),
            up(
                "relay.example.org:25",
                3,
                &["A", "-"],
                &["fail.example.org:25"],
                None
            ),
        ]
    );
    assert_eq!(c.defaults.list_pool, "B");
    assert_eq!(c.defaults.fallback, ["fallback.example.org:25"]);
    assert!(i.warnings.is_empty(), "{:?}", i.warnings);
}

#[test]
fn pool_star_or_no_pool_serves_every_pool() {
    let i = import(
        "SMTP_FORWARD_1=A.EXAMPLE.ORG;POOL=*\nSMTP_FORWARD_2=B.EXAMPLE.ORG\nDEFAULT_LIST_POOL=C\n",
        &[("NEWS", "* Delivery-Pool= D\n")],
    );
    assert!(!i.toml.contains("pools ="), "{}", i.toml);
    let c = reparse(&i);
    for u in &c.upstreams {
        assert_eq!(u.pools, ["C", "D", "-"]);
    }
    assert!(i.warnings.is_empty(), "{:?}", i.warnings);
}

#[test]
fn port_option_applies_to_every_host() {
    let opts = ImportOptions {
        port: Some(2601),
        ..ImportOptions::default()
    };
    let i = try_import(
        "SMTP_FORWARD=SCOOBY.EXAMPLE.ORG\nSMTP_FORWARD_1=2*SCOOBY.EXAMPLE.ORG:26(22:00-06:00);BACKUP.EXAMPLE.ORG;POOL=A-\n",
        &[],
        &opts,
    )
    .unwrap();
    let c = reparse(&i);
    assert_eq!(
        upstreams(&c),
        [up(
            "scooby.example.org:2601",
            2,
            &["A", "-"],
            &["backup.example.org:2601"],
            Some("22:00-06:00")
        )]
    );
    assert_eq!(c.defaults.fallback, ["scooby.example.org:2601"]);
    assert_eq!(
        try_import(
            REF1,
            &[],
            &ImportOptions {
                port: Some(0),
                ..ImportOptions::default()
            }
        )
        .unwrap_err()
        .line,
        0
    );
}

#[test]
fn address_and_host_options_for_test_runs() {
    let opts = ImportOptions {
        hosts: vec![
            ("SCOOBY.EXAMPLE.ORG".into(), "127.0.0.1:2601".into()),
            ("scrappy.example.org".into(), "127.0.0.2".into()),
        ],
        listen: Some("127.0.0.1:3525".parse().unwrap()),
        admin: Some("127.0.0.1:3900".parse().unwrap()),
        spool_dir: Some(PathBuf::from("/tmp/spool dir")),
        ..ImportOptions::default()
    };
    let i = try_import(REF1, &[], &opts).unwrap();
    let c = reparse(&i);
    assert_eq!(c.server.hosts["scooby.example.org"], "127.0.0.1:2601");
    assert_eq!(c.server.hosts["scrappy.example.org"], "127.0.0.2");
    assert_eq!(c.listeners[0].address.to_string(), "127.0.0.1:3525");
    assert_eq!(c.admin.address.to_string(), "127.0.0.1:3900");
    assert_eq!(c.server.spool_dir, Path::new("/tmp/spool dir"));
    // A bad option makes the result invalid: reported, not returned.
    let bad = ImportOptions {
        hosts: vec![("scooby.example.org".into(), "not-an-ip".into())],
        ..ImportOptions::default()
    };
    let e = try_import(REF1, &[], &bad).unwrap_err();
    assert!(e.message.contains("not-an-ip"), "{e}");
}

#[test]
fn unknown_lines_are_kept_as_comments_with_a_warning() {
    let i = import(
        "* LISTSERV site configuration\n\
         # written by hand\n\
         \n\
         NODE=LISTSERV.EXAMPLE.COM\n\
         SMTP_FORWARD_1=MTA.EXAMPLE.COM\n\
         this line means nothing\n\
         MAXBSMTP=\"100\"\n\
         export NODE SMTP_FORWARD_1 MAXBSMTP\n",
        &[],
    );
    assert!(
        i.toml
            .contains("\n# not imported: NODE=LISTSERV.EXAMPLE.COM\n"),
        "{}",
        i.toml
    );
    assert!(
        i.toml
            .contains("\n# not imported: this line means nothing\n")
    );
    // MAXBSMTP is read now (it fits in the default max_recipients).
    assert!(
        i.toml.contains("\n# MAXBSMTP=\"100\"  (site.cfg:7)\n"),
        "{}",
        i.toml
    );
    assert!(!i.toml.contains("export"));
    assert_eq!(i.warnings.len(), 2, "{:?}", i.warnings);
    assert!(
        i.warnings[0].starts_with("site.cfg:4: not imported"),
        "{:?}",
        i.warnings
    );
    assert!(i.warnings[0].contains("NODE"));
    assert!(i.warnings[1].starts_with("site.cfg:6: "));
    reparse(&i);
}

#[test]
fn a_keyword_set_twice_keeps_the_later_value() {
    let i = import(
        "SMTP_FORWARD_1=OLD.EXAMPLE.ORG;POOL=A-\nDEFAULT_LIST_POOL=B\nSMTP_FORWARD_1=NEW.EXAMPLE.ORG;POOL=A-\nDEFAULT_LIST_POOL=A\n",
        &[],
    );
    let c = reparse(&i);
    assert_eq!(
        upstreams(&c),
        [up("new.example.org:25", 1, &["A", "-"], &[], None)]
    );
    assert_eq!(c.defaults.list_pool, "A");
    assert!(
        i.toml
            .contains("# overridden by line 3: SMTP_FORWARD_1=OLD.EXAMPLE.ORG;POOL=A-")
    );
    assert!(
        i.toml
            .contains("# overridden by line 4: DEFAULT_LIST_POOL=B")
    );
    assert_eq!(i.warnings.len(), 2, "{:?}", i.warnings);
    assert!(i.warnings[0].starts_with("site.cfg:1: SMTP_FORWARD_1 is set again on line 3"));
}

#[test]
fn variables_are_substituted() {
    let i = import(
        "NODE=\"LISTSERV.EXAMPLE.ORG\"\nMYDOMAIN=\"$NODE ${NODE}X.NET %NODE%.example.com\"\nSMTP_FORWARD_1=MTA.EXAMPLE.ORG\n",
        &[],
    );
    let c = reparse(&i);
    assert_eq!(c.server.hostname, "listserv.example.org");
    let senders: Vec<_> = c.routes.iter().filter_map(|r| r.sender.clone()).collect();
    assert_eq!(
        senders,
        [
            "",
            "listserv@listserv.example.org",
            "listserv@listserv.example.orgx.net",
            "listserv@listserv.example.org.example.com",
        ]
    );
    import_err(
        "MYDOMAIN=\"$NODE lists.example.org\"\n",
        &[],
        "site.cfg",
        1,
        &["$NODE", "set NODE above"],
    );
}

#[test]
fn smtp_forward_alone_becomes_the_only_upstream() {
    let i = import("SMTP_FORWARD=MTA.EXAMPLE.ORG\n", &[]);
    let c = reparse(&i);
    assert_eq!(
        upstreams(&c),
        [up("mta.example.org:25", 1, &["-"], &[], None)]
    );
    assert_eq!(c.defaults.fallback, ["mta.example.org:25"]);
    assert!(
        i.warnings[0].contains("no SMTP_FORWARD_n"),
        "{:?}",
        i.warnings
    );

    let i = import("DEFAULT_LIST_POOL=A\n", &[]);
    assert!(reparse(&i).upstreams.is_empty());
    assert!(
        i.warnings.iter().any(|w| w.contains("delivers nothing")),
        "{:?}",
        i.warnings
    );
}

#[test]
fn malformed_smtp_forward_lines_name_file_and_line() {
    let cases: &[(&str, &[&str])] = &[
        (
            "SMTP_FORWARD_2=x*HOST.EXAMPLE.ORG",
            &["worker count \"x\"", "[count*]host"],
        ),
        ("SMTP_FORWARD_2=0*HOST.EXAMPLE.ORG", &["worker count \"0\""]),
        ("SMTP_FORWARD_2=*HOST.EXAMPLE.ORG", &["worker count \"\""]),
        (
            "SMTP_FORWARD_2=HOST.EXAMPLE.ORG(00:00-25:00)",
            &["time window", "hh:mm-hh:mm"],
        ),
        (
            "SMTP_FORWARD_2=HOST.EXAMPLE.ORG(00:00-05:00",
            &["must end with ')'"],
        ),
        ("SMTP_FORWARD_2=", &["SMTP_FORWARD_2 is empty"]),
        ("SMTP_FORWARD_2=2*", &["the host is empty"]),
        ("SMTP_FORWARD_2=;POOL=A", &["the host is empty"]),
        (
            "SMTP_FORWARD_2=HOST.EXAMPLE.ORG;;POOL=A",
            &["empty ';' part"],
        ),
        (
            "SMTP_FORWARD_2=HOST.EXAMPLE.ORG;POOL=A1",
            &["\"1\" is not a pool", "POOL=A-"],
        ),
        (
            "SMTP_FORWARD_2=HOST.EXAMPLE.ORG;POOL=",
            &["POOL= names no pool"],
        ),
        (
            "SMTP_FORWARD_2=HOST.EXAMPLE.ORG;POOL=A;POOL=B",
            &["POOL= is given twice"],
        ),
        ("SMTP_FORWARD_2=BAD HOST", &["\"BAD HOST\" is not a host"]),
        (
            "SMTP_FORWARD_2=H.EXAMPLE.ORG;B.EXAMPLE.ORG(01:00-02:00)",
            &["first host only"],
        ),
        ("SMTP_FORWARD_2=\"HOST.EXAMPLE.ORG", &["close the quote"]),
        ("DEFAULT_LIST_POOL=AB", &["not one or two pools"]),
        ("DEFAULT_LIST_POOL=A B C", &["not one or two pools"]),
        ("SMTP_RATE_LIMIT=12Mbps 1Mbps", &["second server-wide cap"]),
        ("SMTP_RATE_LIMIT=A:fast", &["not a bandwidth"]),
        ("SMTP_RATE_LIMIT=A:0kbps", &["cap of zero"]),
        ("SMTP_RATE_LIMIT=A1:1Mbps", &["\"1\" is not a pool letter"]),
        (
            "SMTP_RATE_LIMIT=AB:1Mbps B:2Mbps",
            &["pool B is given two caps"],
        ),
        ("MYDOMAIN=bad_host!", &["is not a host name"]),
        ("SMTP_FORWARD=", &["SMTP_FORWARD is empty"]),
    ];
    for (line, needles) in cases {
        import_err(&format!("* comment\n{line}\n"), &[], "site.cfg", 2, needles);
    }
}

#[test]
fn unknown_forward_suffix_is_kept_with_a_warning() {
    let i = import("SMTP_FORWARD_1=MTA.EXAMPLE.ORG;POOL=A;MAXCONN=5\n", &[]);
    assert!(i.toml.contains("# not imported: ;MAXCONN=5"), "{}", i.toml);
    assert!(i.warnings[0].starts_with("site.cfg:1: SMTP_FORWARD_1: \";MAXCONN=5\" not imported"));
    assert_eq!(
        upstreams(&reparse(&i)),
        [up("mta.example.org:25", 1, &["A"], &[], None)]
    );
}

#[test]
fn list_header_with_several_keywords_on_one_line() {
    let header = "PUT NEWS LIST PW=XXXXXXXX\n\
                  * Example news list\n\
                  *\n\
                  * Review= Public  Subscription= Open,Confirm  Send= Editor,Hold\n\
                  * Owner= news-owner@example.org (News Team)\n\
                  * Delivery-Pool= B, A  List-Address= News@LISTSERV.EXAMPLE.COM  Notebook= Yes,A,Monthly,Public\n\
                  * .SE stuff\n\
                  Delivery-Pool= C\n\
                  joe@example.net Joe Subscriber\n";
    let i = import(REF3, &[("NEWS", header)]);
    let c = reparse(&i);
    assert_eq!(
        routes(&c)[2..],
        [
            route(
                "B",
                "owner-news@listserv.example.com",
                Some("news@listserv.example.com")
            ),
            route(
                "B",
                "owner-news@listserv.example.com",
                Some("*<news@listserv.example.com>")
            ),
            route("A", "owner-news@listserv.example.com", None),
        ]
    );
    assert_eq!(i.warnings.len(), 2, "{:?}", i.warnings);
    assert!(
        i.warnings[0].starts_with("NEWS.list:8: ignored"),
        "{:?}",
        i.warnings
    );
    assert_eq!(
        i.warnings[1],
        "NEWS.list: list NEWS: keywords with no relay meaning were skipped: Review, Subscription, Send, Owner, Notebook"
    );
    let posting = Some("Example news <NEWS@LISTSERV.EXAMPLE.COM>");
    assert_eq!(
        classify(&c, "owner-news@listserv.example.com", posting),
        "B"
    );
    assert_eq!(classify(&c, "owner-news@listserv.example.com", None), "A");
}

#[test]
fn list_address_forms_and_mydomain_hosts() {
    let site = "SMTP_FORWARD_1=MTA.EXAMPLE.ORG\nMYDOMAIN=A.EXAMPLE.ORG B.EXAMPLE.ORG\n";
    // No List-Address: one pair of routes per MYDOMAIN host.
    let i = import(site, &[("ALERTS", "* delivery-pool=c,d\n")]);
    assert_eq!(
        routes(&reparse(&i))[3..],
        [
            route(
                "C",
                "owner-alerts@a.example.org",
                Some("alerts@a.example.org")
            ),
            route(
                "C",
                "owner-alerts@a.example.org",
                Some("*<alerts@a.example.org>")
            ),
            route("D", "owner-alerts@a.example.org", None),
            route(
                "C",
                "owner-alerts@b.example.org",
                Some("alerts@b.example.org")
            ),
            route(
                "C",
                "owner-alerts@b.example.org",
                Some("*<alerts@b.example.org>")
            ),
            route("D", "owner-alerts@b.example.org", None),
        ]
    );
    // A host alone: the list address is LISTNAME@host.
    let i = import(
        site,
        &[(
            "ALERTS",
            "* Delivery-Pool=C\n* List-Address= LISTS.EXAMPLE.NET.\n",
        )],
    );
    assert_eq!(
        routes(&reparse(&i))[3..],
        [route("C", "owner-alerts@lists.example.net", None)]
    );
    // Without Delivery-Pool the list needs no route.
    let i = import(site, &[("ALERTS", "* List-Address= LISTS.EXAMPLE.NET\n")]);
    assert_eq!(reparse(&i).routes.len(), 3);
    assert!(i.toml.contains("# Imported lists that rely on it: ALERTS."));
}

#[test]
fn default_list_pool_with_an_admin_pool() {
    let i = import(
        "SMTP_FORWARD_1=MTA.EXAMPLE.ORG\nDEFAULT_LIST_POOL=A B\n",
        &[("NEWS", "* Title\n"), ("ALERTS", "* Delivery-Pool=C\n")],
    );
    let c = reparse(&i);
    assert_eq!(c.defaults.list_pool, "A");
    assert_eq!(
        routes(&c)[2..],
        [
            route("A", "owner-news@*", Some("news@*")),
            route("A", "owner-news@*", Some("*<news@*>")),
            route("B", "owner-news@*", None),
            route("C", "owner-alerts@*", None),
        ]
    );
    assert!(
        i.warnings[0].starts_with("site.cfg:2: DEFAULT_LIST_POOL"),
        "{:?}",
        i.warnings
    );
}

#[test]
fn malformed_list_headers_name_file_and_line() {
    let cases: &[(&str, &[&str])] = &[
        (
            "* Delivery-Pool= B,A,C",
            &["not one or two pools", "Delivery-Pool= B,A"],
        ),
        ("* Delivery-Pool= BB", &["not one or two pools"]),
        ("* Delivery-Pool=", &["not one or two pools"]),
        ("* List-Address= two words", &["not a list address"]),
        ("* List-Address= @host.example.org", &["not a list name"]),
        ("* List-Address= x@", &["not a list address"]),
    ];
    for (line, needles) in cases {
        import_err(
            REF3,
            &[("L", &format!("* L list\n{line}\n"))],
            "L.list",
            2,
            needles,
        );
    }
    let e = try_import(REF3, &[("L", ""), ("l", "")], &ImportOptions::default()).unwrap_err();
    assert!(e.message.contains("given twice"), "{e}");
}

#[test]
fn list_names_and_list_arguments() {
    assert_eq!(
        list_name_from_path(Path::new("dir/EMERGENCY.list")),
        Some("EMERGENCY".into())
    );
    assert_eq!(
        list_name_from_path(Path::new("news.LIST")),
        Some("news".into())
    );
    assert_eq!(list_name_from_path(Path::new("news.txt")), None);
    assert_eq!(list_name_from_path(Path::new(".list")), None);
    assert_eq!(
        parse_list_arg("EMERGENCY=headers/em.txt"),
        Ok(("EMERGENCY".into(), PathBuf::from("headers/em.txt")))
    );
    assert!(
        parse_list_arg("EMERGENCY")
            .unwrap_err()
            .contains("NAME=FILE")
    );
    assert!(parse_list_arg("EMERGENCY=").is_err());
    assert!(
        parse_list_arg("A B=x")
            .unwrap_err()
            .contains("not a list name")
    );
}

#[test]
fn files_are_read_and_errors_name_them() {
    let dir = std::env::temp_dir().join(format!("poolrelay-listserv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let site = dir.join("site.cfg");
    std::fs::write(&site, REF3).unwrap();
    // Latin-1 subscriber names must not stop the import.
    let list = dir.join("Emergency.List");
    std::fs::write(&list, b"* Delivery-Pool=B,A\nJos\xe9 jose@example.org\n").unwrap();
    let other = dir.join("alerts-header.txt");
    std::fs::write(&other, "* Delivery-Pool=B\n").unwrap();
    let opts = ImportOptions {
        lists: vec![("ALERTS".into(), other.clone())],
        ..ImportOptions::default()
    };
    let i = import_listserv(&site, std::slice::from_ref(&list), &opts).unwrap();
    assert_eq!(
        routes(&i.config)[2..],
        [
            route("B", "owner-emergency@*", Some("emergency@*")),
            route("B", "owner-emergency@*", Some("*<emergency@*>")),
            route("A", "owner-emergency@*", None),
            route("B", "owner-alerts@*", None),
        ]
    );
    assert!(
        i.toml
            .contains("# Sources: site.cfg, Emergency.List, alerts-header.txt.")
    );
    let e = import_listserv(
        &site,
        std::slice::from_ref(&other),
        &ImportOptions::default(),
    )
    .unwrap_err();
    assert_eq!((e.file.clone(), e.line), (other.clone(), 0));
    assert!(e.message.contains("--list LISTNAME=FILE"), "{e}");
    let missing = dir.join("missing.cfg");
    let e = import_listserv(&missing, &[], &ImportOptions::default()).unwrap_err();
    assert_eq!(e.file, missing);
    assert!(e.message.contains("cannot read"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn crlf_and_odd_characters_stay_valid_toml() {
    let i = import(
        "SMTP_FORWARD_1=MTA.EXAMPLE.ORG\r\nWEIRD=\"quote\" \\ back\u{1}slash\r\n",
        &[],
    );
    assert!(
        i.toml
            .contains("# not imported: WEIRD=\"quote\" \\ back?slash\n"),
        "{}",
        i.toml
    );
    reparse(&i);
}

#[test]
fn substitution_and_unquoting() {
    let vars: HashMap<String, String> = [("NODE".to_string(), "x.org".to_string())].into();
    assert_eq!(substitute("$NODE y", &vars).as_deref(), Ok("x.org y"));
    assert_eq!(substitute("${node}", &vars).as_deref(), Ok("x.org"));
    assert_eq!(substitute("%NODE%", &vars).as_deref(), Ok("x.org"));
    assert_eq!(
        substitute("50% $ %a b%", &vars).as_deref(),
        Ok("50% $ %a b%")
    );
    assert_eq!(substitute("$OTHER", &vars), Err("OTHER".to_string()));
    assert_eq!(unquote("\"a b\""), Ok("a b"));
    assert_eq!(unquote("'a'"), Ok("a"));
    assert_eq!(unquote("a\""), Ok("a\""));
    assert!(unquote("\"a").is_err());
    assert!(unquote("\"").is_err());
}

#[test]
fn quoted_strings_parse_back_to_the_same_value() {
    #[derive(serde::Deserialize)]
    struct V {
        v: String,
    }
    for s in [
        "plain",
        "say \"hi\"",
        "back\\slash",
        "both ' and \"",
        "'\"\\",
        "tab\tnew\nline\r\u{1}\u{7f}",
        "",
        "-",
    ] {
        let text = format!("v = {}", render::q(s));
        let back: V = toml::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(back.v, s, "{text}");
    }
    // The forms the golden files hold stay basic strings.
    assert_eq!(render::q("owner-news@*"), "\"owner-news@*\"");
    assert_eq!(render::q("-"), "\"-\"");
}

#[test]
fn maxbsmtp_above_the_default_raises_max_recipients() {
    let i = import("SMTP_FORWARD_1=MTA.EXAMPLE.ORG\nMAXBSMTP=5000\n", &[]);
    assert!(i.warnings.is_empty(), "{:?}", i.warnings);
    assert!(
        i.toml.contains("# MAXBSMTP=5000  (site.cfg:2)") && i.toml.contains("452 4.5.3"),
        "{}",
        i.toml
    );
    assert_eq!(reparse(&i).listeners[0].max_recipients, 5000);
    let i = import("SMTP_FORWARD_1=MTA.EXAMPLE.ORG\nMAXBSMTP=100\n", &[]);
    assert_eq!(reparse(&i).listeners[0].max_recipients, 1000);
    import_err(
        "SMTP_FORWARD_1=MTA.EXAMPLE.ORG\nMAXBSMTP=many\n",
        &[],
        "site.cfg",
        2,
        &["MAXBSMTP", "\"many\"", "MAXBSMTP=100"],
    );
}

#[test]
fn default_dist_pool_warns_with_the_listener_pinning_advice() {
    let i = import("SMTP_FORWARD_1=MTA.EXAMPLE.ORG\nDEFAULT_DIST_POOL=D\n", &[]);
    assert_eq!(i.warnings.len(), 1, "{:?}", i.warnings);
    let w = &i.warnings[0];
    assert!(w.starts_with("site.cfg:2: "), "{w}");
    for needle in [
        "DEFAULT_DIST_POOL=D",
        "DISTRIBUTE",
        "option (b)",
        "[[listener]]",
    ] {
        assert!(w.contains(needle), "warning lacks {needle:?}: {w}");
    }
    assert!(!w.contains("no setting"), "{w}");
    assert!(
        i.toml.contains("# not imported: DEFAULT_DIST_POOL=D"),
        "{}",
        i.toml
    );
    reparse(&i);
}

#[test]
fn a_bare_word_after_a_semicolon_is_reported_not_taken_as_a_failover_host() {
    let i = import(
        "SMTP_FORWARD_1=MTA.EXAMPLE.ORG;NOQUEUE;BACKUP.EXAMPLE.ORG;POOL=A-\n",
        &[],
    );
    assert_eq!(
        upstreams(&reparse(&i)),
        [up(
            "mta.example.org:25",
            1,
            &["A", "-"],
            &["backup.example.org:25"],
            None
        )]
    );
    assert_eq!(i.warnings.len(), 1, "{:?}", i.warnings);
    assert!(
        i.warnings[0].starts_with("site.cfg:1: SMTP_FORWARD_1: \";NOQUEUE\" is not a host name"),
        "{:?}",
        i.warnings
    );
    assert!(i.toml.contains("# not imported: ;NOQUEUE"), "{}", i.toml);
}

#[test]
fn rate_limits_say_the_fallback_is_capped_too() {
    let i = import(
        "SMTP_FORWARD=MTA.EXAMPLE.ORG\nSMTP_FORWARD_1=MTA.EXAMPLE.ORG;POOL=A\nSMTP_RATE_LIMIT=12Mbps A:1Mbps\n",
        &[],
    );
    assert!(
        i.toml.contains("ignores SMTP_RATE_LIMIT") && i.toml.contains("through the fallback too"),
        "{}",
        i.toml
    );
}

#[test]
fn a_lane_sharing_its_workers_goes_first_and_the_others_say_so() {
    let i = import(
        "DEFAULT_LIST_POOL=A\nSMTP_FORWARD=SCOOBY.EXAMPLE.ORG\n\
         SMTP_FORWARD_1=2*SCOOBY.EXAMPLE.ORG;POOL=AB-\n",
        &[("EMERGENCY", "* Delivery-Pool=B\n")],
    );
    let c = reparse(&i);
    assert_eq!(c.priority_of("B"), 5, "{}", i.toml);
    assert_eq!(c.priority_of("A"), 0);
    assert_eq!(c.priority_of("-"), 0);
    assert!(
        i.toml
            .contains("As the lane of EMERGENCY it goes first here"),
        "{}",
        i.toml
    );
    assert_eq!(
        i.toml.matches("which goes first (priority 5)").count(),
        2,
        "A and - say why: {}",
        i.toml
    );
    // Sharing the fallback host is not isolation: every pool may fall back.
    assert!(!i.toml.contains("fallback = false"), "{}", i.toml);
    // A lane with workers of its own needs no priority.
    let i = import(
        "DEFAULT_LIST_POOL=A\nSMTP_FORWARD_1=SCOOBY.EXAMPLE.ORG;POOL=A-\n\
         SMTP_FORWARD_2=SCRAPPY.EXAMPLE.ORG;POOL=B\n",
        &[("EMERGENCY", "* Delivery-Pool=B\n")],
    );
    assert!(!i.toml.contains("priority"), "{}", i.toml);
}

#[test]
fn a_commented_dkim_skeleton_per_mydomain_host_that_parses_once_uncommented() {
    let key = std::env::temp_dir().join(format!(
        "poolrelay-listserv-dkim-{}.pem",
        std::process::id()
    ));
    std::fs::write(&key, include_str!("../testdata/dkim-rsa2048.pem")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let i = import(
        "SMTP_FORWARD_1=MTA.EXAMPLE.ORG\nMYDOMAIN=LISTS.EXAMPLE.ORG *.EXAMPLE.NET LISTS.EXAMPLE.COM\n",
        &[],
    );
    assert!(
        reparse(&i).dkim.is_empty(),
        "commented out: nothing signs yet"
    );
    for host in ["lists.example.org", "lists.example.com"] {
        assert!(
            i.toml.contains(&format!("# domain = \"{host}\"")),
            "{}",
            i.toml
        );
    }
    assert!(
        !i.toml.contains("# domain = \"*"),
        "no key for a wildcard: {}",
        i.toml
    );
    assert!(i.toml.contains("(site.cfg:2)"), "{}", i.toml);
    let uncommented = i
        .toml
        .lines()
        .map(|l| {
            let l = l.strip_prefix("# ").filter(|l| {
                ["[[dkim]]", "domain =", "selector =", "key_file ="]
                    .iter()
                    .any(|k| l.starts_with(k))
            });
            match l {
                Some(l) if l.starts_with("key_file") => {
                    format!("key_file = \"{}\"", key.display())
                }
                Some(l) => l.to_string(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let text = format!("{}\n{uncommented}", i.toml);
    let c =
        Config::parse(&text, Path::new("imported.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let _ = std::fs::remove_file(&key);
    let domains: Vec<&str> = c.dkim.iter().map(|d| d.domain.as_str()).collect();
    assert_eq!(domains, ["lists.example.org", "lists.example.com"]);
}
