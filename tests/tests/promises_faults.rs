//! When the upstream never answers: `max_age` still expires the message
//! (README.md: "then remaining recipients bounce with 4.4.7"; ARCHITECTURE.md:
//! "every host down is not an attempt … `max_age` still applies"), and
//! `poolrelay queue list` says why a message waits (the host down since
//! when; the pool held).

use std::time::{Duration, Instant};

use poolrelay_tests::admin::{queue_ok, queued_message};
use poolrelay_tests::delivery::{attempts_for, field, parse_dsn};
use poolrelay_tests::{Relay, RelaySetup, Sink, free_addr};

const SENDER: &str = "owner-news@lists.test";
const RCPT: &str = "member@dest.test";

/// Pool A through `a_host` only, pool `-` (DSNs) through `dsn`.
fn config(s: &RelaySetup, defaults_extra: &str, a_host: &str, dsn: &str) -> String {
    format!(
        "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n{defaults_extra}\n\n[pool.A]\n\n\
         [[upstream]]\nhost = \"{a_host}\"\npools = [\"A\"]\n\n\
         [[upstream]]\nhost = \"{dsn}\"\npools = [\"-\"]\n",
        s.head(),
        s.listener("")
    )
}

#[test]
fn max_age_expires_a_message_whose_host_is_never_reachable_with_a_4_4_7_dsn() {
    let never = free_addr(); // nothing ever listens here
    let dsn_sink = Sink::start();
    let relay = Relay::start(|s| {
        config(
            s,
            "max_age = \"3s\"",
            &never.to_string(),
            &dsn_sink.addr().to_string(),
        )
    });
    let start = Instant::now();
    let sent = relay.send_tagged(SENDER, &[RCPT], "never-reachable");
    // The host is probed at ~0, 1, 3, 7 s (backoff doubling): the first
    // probe after 3 s finds the message expired.
    let dsns = dsn_sink.wait_for_count(1, Duration::from_secs(30));
    let waited = start.elapsed();
    println!("never-reachable: DSN after {waited:?}");
    assert!(
        waited >= Duration::from_secs(3),
        "the DSN came {waited:?} after sending, before max_age (3s)"
    );
    let m = &dsns[0];
    assert_eq!(m.from, "", "a DSN is sent from <>");
    assert_eq!(m.to, vec![SENDER.to_string()], "to the envelope sender");
    let dsn =
        parse_dsn(&m.raw).unwrap_or_else(|e| panic!("the DSN does not parse: {e}\n{}", m.raw));
    assert_eq!(dsn.final_recipients(), vec![RCPT.to_string()], "{}", m.raw);
    let r = dsn
        .recipient(RCPT)
        .unwrap_or_else(|| panic!("no block for {RCPT}\n{}", m.raw));
    assert_eq!(field(r, "Status"), Some("4.4.7"), "{}", m.raw);
    assert_eq!(field(r, "Action"), Some("failed"), "{}", m.raw);
    assert!(
        dsn.parts
            .iter()
            .any(|p| p.body.contains(&format!("<{}>", sent.message_id))),
        "the DSN returns the original headers\n{}",
        m.raw
    );
    relay.wait_until(
        "the expired message to leave the queue",
        Duration::from_secs(10),
        || queued_message(&relay, "A", &sent.queue_id).is_none(),
    );
    let attempts = attempts_for(&relay.log_text(), &sent.queue_id);
    assert_eq!(
        attempts.last().map(|a| a.status.as_str()),
        Some("expired"),
        "the last attempt is logged as expired: {attempts:#?}"
    );
}

#[test]
fn queue_list_says_a_message_waits_for_its_down_host_and_since_when_then_for_the_held_pool() {
    let down = free_addr(); // nothing listens
    let dsn_sink = Sink::start();
    let relay = Relay::start(|s| config(s, "", &down.to_string(), &dsn_sink.addr().to_string()));
    let sent = relay.send_tagged(SENDER, &[RCPT], "why-waiting");
    let host = down.to_string();
    let waiting_line = |out: &str| -> Option<String> {
        let mut lines = out.lines();
        lines.find(|l| l.starts_with(&sent.queue_id))?;
        lines
            .take_while(|l| !l.starts_with("--") && l.starts_with(' '))
            .find_map(|l| l.trim().strip_prefix("waiting: ").map(str::to_string))
    };
    let mut last = String::new();
    relay.wait_until(
        "queue list to say the message waits for its down host",
        Duration::from_secs(15),
        || {
            last = queue_ok(&relay, &["list", "--pool", "A"]).stdout;
            waiting_line(&last).is_some_and(|w| w.contains(&host) && w.contains("down since"))
        },
    );
    let w = waiting_line(&last).unwrap_or_default();
    println!("queue list (host down): waiting: {w}");
    // "down since" an RFC 3339 UTC time, and why.
    let since = w
        .split("down since ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default();
    assert!(
        since.len() >= 20 && since.ends_with('Z') && since.contains('T'),
        "down since {since:?}: expected an RFC 3339 UTC time\n{last}"
    );
    assert!(
        w.to_ascii_lowercase().contains("refused"),
        "the reason (connection refused) is given: {w}\n{last}"
    );

    queue_ok(&relay, &["hold", "--pool", "A"]);
    let out = queue_ok(&relay, &["list", "--pool", "A"]).stdout;
    let w = waiting_line(&out).unwrap_or_default();
    println!("queue list (pool held): waiting: {w}");
    assert!(
        w.contains("held"),
        "with the pool held, the message waits because it is held: {w:?}\n{out}"
    );
}
