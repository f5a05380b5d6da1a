//! A reload the relay refuses is logged by the relay at ERROR level with its
//! reason, whether it came through the admin API (`poolrelay reload`) or
//! SIGHUP: the operator reading the relay's log must see it, not only the
//! person who ran the command.

use std::fs;
use std::time::Duration;

use poolrelay_tests::{Relay, Sink, poolrelay};

/// How long a CLI call may take.
const COMMAND: Duration = Duration::from_secs(30);
/// How long a log line gets to appear.
const LOGGED: Duration = Duration::from_secs(10);

/// Lines of the relay's log at ERROR level that contain every one of `words`.
fn error_lines(relay: &Relay, words: &[&str]) -> Vec<String> {
    relay
        .log_text()
        .lines()
        .filter(|l| l.contains("ERROR") && words.iter().all(|w| l.contains(w)))
        .map(str::to_string)
        .collect()
}

/// Writes `good` plus a route to an undeclared pool: valid TOML, invalid config.
fn break_config(relay: &Relay, good: &str, pool: &str) {
    fs::write(
        relay.config_path(),
        format!("{good}\n[[route]]\npool = \"{pool}\"\nsender = \"owner-x@*\"\n"),
    )
    .unwrap_or_else(|e| panic!("cannot write {}: {e}", relay.config_path().display()));
}

#[test]
fn a_refused_reload_is_logged_by_the_relay_with_its_reason() {
    let sink = Sink::start();
    let mut relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    let good = fs::read_to_string(relay.config_path())
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", relay.config_path().display()));

    break_config(&relay, &good, "NOPE_VIA_API");
    let out = poolrelay(&["reload", "--admin", &relay.admin_url()], COMMAND);
    assert_eq!(
        out.status.code(),
        Some(1),
        "poolrelay reload of a broken config should exit 1:\n{out}"
    );
    relay.wait_until(
        "an ERROR line in the relay's log naming the refused reload and its reason (NOPE_VIA_API)",
        LOGGED,
        || !error_lines(&relay, &["reload", "NOPE_VIA_API"]).is_empty(),
    );

    // SIGHUP with another broken config: logged the same way.
    break_config(&relay, &good, "NOPE_VIA_HUP");
    relay.signal("HUP");
    relay.wait_until(
        "an ERROR line in the relay's log naming the refused SIGHUP reload (NOPE_VIA_HUP)",
        LOGGED,
        || !error_lines(&relay, &["SIGHUP", "NOPE_VIA_HUP"]).is_empty(),
    );
    assert!(
        relay.wait_exit(Duration::ZERO).is_none(),
        "the relay exited after a refused reload\n{}",
        relay.logs()
    );
}
