//! Time-of-day windows, LISTSERV's `SMTP_FORWARD_n=host(hh:mm-hh:mm);failover`:
//! inside the window an upstream delivers through its host; outside, through
//! its failover hosts; without failover hosts it idles and the mail waits.
//!
//! The windows are computed from the clock when the test runs, in UTC, with
//! `server.timezone = "UTC"` so the relay reads the clock the same way.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use poolrelay_tests::admin::api_json;
use poolrelay_tests::listserv::{DELIVERY, MEMBER};
use poolrelay_tests::{Relay, RelaySetup, Sink, message, poll_until, toml_str, unique_id};

/// The current minute of the day, UTC.
fn utc_minute_of_day() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    ((secs / 60) % 1440) as i64
}

/// `"hh:mm-hh:mm"` from `from` to `to` minutes after now (negative: before),
/// wrapping around midnight.
fn window(from: i64, to: i64) -> String {
    let now = utc_minute_of_day();
    let hhmm = |m: i64| {
        let m = (now + m).rem_euclid(1440);
        format!("{:02}:{:02}", m / 60, m % 60)
    };
    format!("{}-{}", hhmm(from), hhmm(to))
}

/// A window of one minute, two hours from now: closed for the whole test.
fn closed_window() -> String {
    window(120, 121)
}

/// Two hours around now: open for the whole test.
fn open_window() -> String {
    window(-60, 60)
}

/// Head with `timezone = "UTC"` and host names mapped to the sinks.
fn head(s: &RelaySetup, hosts: &[(&str, SocketAddr)]) -> String {
    let hosts: Vec<String> = hosts
        .iter()
        .map(|(n, a)| format!("{} = \"{a}\"", toml_str(n)))
        .collect();
    format!(
        "[server]\nhostname = \"relay.test\"\nspool_dir = {}\ntimezone = \"UTC\"\n\
         hosts = {{ {} }}\n\n[admin]\naddress = \"{}\"\n\n{}",
        toml_str(&s.spool_dir.to_string_lossy()),
        hosts.join(", "),
        s.admin,
        s.listener("")
    )
}

fn send_list_mail(relay: &Relay, tag: &str) -> String {
    let from = "owner-NIGHTLY@LISTSERV.EXAMPLE.ORG";
    let id = unique_id(tag);
    let r = relay.send(
        from,
        &[MEMBER],
        &message(&id, from, MEMBER, tag, "windowed"),
    );
    assert_eq!(r.code, 250, "{tag}: {r}");
    id
}

/// `upstream(window)`: pool A (and `-`) through PRIMARY inside `window`,
/// FAILOVER otherwise; a site fallback exists too (never needed here).
fn windowed_relay(window: &str, primary: &Sink, failover: &Sink, fallback: &Sink) -> Relay {
    Relay::start(|s| {
        format!(
            "{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\
             fallback = [\"fallback.example.org:25\"]\n\n[pool.A]\n\n\
             [[upstream]]\nhost = \"primary.example.org:25\"\nworkers = 2\npools = [\"A\", \"-\"]\n\
             failover = [\"failover.example.org:25\"]\nwindow = \"{window}\"\n",
            head(
                s,
                &[
                    ("primary.example.org", primary.addr()),
                    ("failover.example.org", failover.addr()),
                    ("fallback.example.org", fallback.addr()),
                ]
            )
        )
    })
}

fn assert_all_at(relay: &Relay, want: &Sink, ids: &[String], others: &[(&str, &Sink)]) {
    for id in ids {
        want.wait_for_message_id(id, DELIVERY);
    }
    for (name, s) in others {
        assert_eq!(
            s.count(),
            0,
            "nothing may go through {name}; it has {:?}\n{}",
            s.message_ids(),
            relay.logs()
        );
    }
}

#[test]
fn window_that_is_closed_sends_through_the_failover_host() {
    let (primary, failover, fallback) = (Sink::start(), Sink::start(), Sink::start());
    let w = closed_window();
    let relay = windowed_relay(&w, &primary, &failover, &fallback);
    let ids: Vec<String> = (0..3)
        .map(|i| send_list_mail(&relay, &format!("closed{i}")))
        .collect();
    assert_all_at(
        &relay,
        &failover,
        &ids,
        &[("the primary", &primary), ("the site fallback", &fallback)],
    );
    eprintln!("window {w} (UTC, closed): all through the failover host");
}

#[test]
fn window_that_is_open_sends_through_the_primary_host() {
    let (primary, failover, fallback) = (Sink::start(), Sink::start(), Sink::start());
    let w = open_window();
    let relay = windowed_relay(&w, &primary, &failover, &fallback);
    let ids: Vec<String> = (0..3)
        .map(|i| send_list_mail(&relay, &format!("open{i}")))
        .collect();
    assert_all_at(
        &relay,
        &primary,
        &ids,
        &[
            ("the failover host", &failover),
            ("the site fallback", &fallback),
        ],
    );
    eprintln!("window {w} (UTC, open): all through the primary host");
}

/// Without failover hosts, an upstream outside its window idles: its pool's
/// mail waits in the queue (not even the site fallback takes it), while
/// another pool's upstream keeps delivering.
#[test]
fn window_that_is_closed_without_failover_keeps_the_mail_queued() {
    let (primary, other, fallback) = (Sink::start(), Sink::start(), Sink::start());
    let w = closed_window();
    let relay = Relay::start(|s| {
        format!(
            "{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\
             fallback = [\"fallback.example.org:25\"]\n\n[pool.A]\n[pool.B]\n\n\
             [[upstream]]\nhost = \"primary.example.org:25\"\npools = [\"A\"]\nwindow = \"{w}\"\n\n\
             [[upstream]]\nhost = \"other.example.org:25\"\npools = [\"B\", \"-\"]\n\n\
             [[route]]\npool = \"B\"\nsender = \"owner-emergency@*\"\n",
            head(
                s,
                &[
                    ("primary.example.org", primary.addr()),
                    ("other.example.org", other.addr()),
                    ("fallback.example.org", fallback.addr()),
                ]
            )
        )
    });
    let waiting = send_list_mail(&relay, "idle-window");
    let from = "owner-EMERGENCY@LISTSERV.EXAMPLE.ORG";
    let id = unique_id("other-pool");
    relay.send(from, &[MEMBER], &message(&id, from, MEMBER, "other", "b"));
    other.wait_for_message_id(&id, DELIVERY);
    // The other pool is delivered; pool A's message must still be queued a
    // while later (the workers re-check the window every 500 ms).
    let leaked = poll_until(Duration::from_secs(2), Duration::from_millis(50), || {
        primary.count() + fallback.count() > 0
    });
    assert!(
        !leaked,
        "outside its window, without failover, pool A must not deliver: primary has {:?}, \
         fallback has {:?}\n{}",
        primary.message_ids(),
        fallback.message_ids(),
        relay.logs()
    );
    let v = api_json(&relay, "/api/v1/pools/A/messages");
    let n = v
        .as_array()
        .or_else(|| v["messages"].as_array())
        .map(Vec::len);
    assert_eq!(
        n,
        Some(1),
        "pool A keeps the message <{waiting}> while its window is closed: {v:#}"
    );
    eprintln!("window {w} (UTC, closed, no failover): the message waits in pool A");
}

/// `server.timezone` decides whose clock a window reads. Kathmandu is
/// UTC+05:45 all year; a window open there now (±30 min) is closed in UTC
/// and in any zone five or more hours away from it, so mail goes through
/// the primary only if the relay reads the window in Kathmandu time.
#[test]
fn window_is_read_in_the_configured_timezone() {
    let zone = "Asia/Kathmandu";
    assert!(
        std::path::Path::new("/usr/share/zoneinfo")
            .join(zone)
            .is_file(),
        "/usr/share/zoneinfo/{zone} is missing: install Debian package tzdata"
    );
    let (primary, failover, fallback) = (Sink::start(), Sink::start(), Sink::start());
    let offset = 5 * 60 + 45;
    let w = window(offset - 30, offset + 30);
    let relay = Relay::start(|s| {
        head(
            s,
            &[
                ("primary.example.org", primary.addr()),
                ("failover.example.org", failover.addr()),
                ("fallback.example.org", fallback.addr()),
            ],
        )
        .replace("timezone = \"UTC\"", &format!("timezone = \"{zone}\""))
            + &format!(
                "[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n[pool.A]\n\n\
                 [[upstream]]\nhost = \"primary.example.org:25\"\npools = [\"A\", \"-\"]\n\
                 failover = [\"failover.example.org:25\"]\nwindow = \"{w}\"\n"
            )
    });
    let id = send_list_mail(&relay, "kathmandu");
    assert_all_at(
        &relay,
        &primary,
        &[id],
        &[
            ("the failover host", &failover),
            ("the site fallback", &fallback),
        ],
    );
    eprintln!("window {w} ({zone}, open there, closed in UTC): through the primary host");
}
