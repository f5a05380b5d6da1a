//! A window edge crossed while the test runs (README.md, `[[upstream]]
//! window`): with `server.timezone = "UTC"` and a window opening at the
//! next whole minute, mail queued before the edge is not delivered before
//! it, and is delivered shortly after it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use poolrelay_tests::scripted::Scripted;
use poolrelay_tests::{Relay, poll_until, toml_str};

/// The least time before the edge for the test to start and queue its mail.
const LEAD: Duration = Duration::from_secs(6);
/// How soon after the edge the mail must arrive (workers re-check the
/// window every 500 ms).
const AFTER_EDGE: Duration = Duration::from_secs(5);

#[test]
fn mail_queued_before_a_window_opens_is_delivered_just_after_the_edge_and_not_before() {
    let up = Scripted::start_default();
    // The next whole UTC minute, at least LEAD from now.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut edge_secs = (now.as_secs() / 60 + 1) * 60;
    if Duration::from_secs(edge_secs) - now < LEAD {
        edge_secs += 60;
    }
    let until_edge = Duration::from_secs(edge_secs) - now;
    // The edge as an Instant, to compare with the upstream's arrival times.
    let edge = Instant::now() + until_edge;
    let minute = (edge_secs / 60) % 1440;
    let hhmm = |m: u64| format!("{:02}:{:02}", (m % 1440) / 60, m % 60);
    let window = format!("{}-{}", hhmm(minute), hhmm(minute + 10));
    let relay = Relay::start(|s| {
        format!(
            "[server]\nhostname = \"relay.test\"\nspool_dir = {}\ntimezone = \"UTC\"\n\n\
             [admin]\naddress = \"{}\"\n\n{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n\
             [pool.A]\n\n[[upstream]]\nhost = \"{}\"\nwindow = \"{window}\"\n",
            toml_str(&s.spool_dir.to_string_lossy()),
            s.admin,
            s.listener(""),
            up.addr()
        )
    });
    let sent = relay.send_tagged("owner-news@lists.test", &["member@dest.test"], "edge");
    let queued_before = edge.saturating_duration_since(Instant::now());
    assert!(
        queued_before > Duration::from_secs(1),
        "test bug: the message was queued only {queued_before:?} before the edge"
    );
    println!("window {window} (UTC): message queued {queued_before:?} before the edge");
    // Bounded proof that nothing happens before the edge: watch until just
    // before it (the arrival times below also cover the last instant).
    let early = poll_until(
        edge.saturating_duration_since(Instant::now() + Duration::from_millis(200)),
        Duration::from_millis(50),
        || !up.transactions().is_empty(),
    );
    assert!(
        !early,
        "the upstream got mail before its window {window} opened:\n{}\n{}",
        up.dump(),
        relay.logs()
    );
    up.wait_for_delivered(
        1,
        edge.saturating_duration_since(Instant::now()) + AFTER_EDGE,
    );
    let t = up
        .transactions()
        .into_iter()
        .find(|t| t.delivered())
        .unwrap_or_else(|| panic!("no delivered transaction\n{}", up.dump()));
    // The relay reads the same system clock; allow 50 ms of clock reading.
    assert!(
        t.at + Duration::from_millis(50) >= edge,
        "delivered {:?} before the window {window} opened",
        edge - t.at
    );
    let late = t.at.saturating_duration_since(edge);
    assert!(
        late <= AFTER_EDGE,
        "delivered {late:?} after the window opened (at most {AFTER_EDGE:?})"
    );
    assert_eq!(
        poolrelay_tests::delivery::message_id_of(&t.data).as_deref(),
        Some(sent.message_id.as_str()),
        "{}",
        up.dump()
    );
    println!("window {window}: delivered {late:?} after the edge");
}
