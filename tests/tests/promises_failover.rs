//! Failover promises of README.md ("Delivery semantics", the config table):
//! the site fallback after the host and its failover hosts; the probe of a
//! down host after its backoff, and the backoff doubling (1 s, 2 s, 4 s…);
//! a reload that changes an upstream moves queued mail to the new one.
//!
//! "Down" here means nothing listens on the address (connection refused),
//! or, for counting probes, a listener that accepts and closes at once.

use std::time::{Duration, Instant};

use poolrelay_tests::accept_counter::AcceptCounter;
use poolrelay_tests::admin::{queue_ok, wait_deferred};
use poolrelay_tests::delivery::attempts_for;
use poolrelay_tests::{Relay, RelaySetup, Sink, SinkOptions, free_addr, poolrelay};

const SENDER: &str = "owner-news@lists.test";
const RCPT: &str = "member@dest.test";

/// Head, listener, `[defaults]` (list_pool A, 1 s retry, `defaults_extra`),
/// pool A, and one upstream serving every pool with `upstream` lines.
fn config(s: &RelaySetup, defaults_extra: &str, upstream: &str) -> String {
    format!(
        "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n{defaults_extra}\n\n[pool.A]\n\n\
         [[upstream]]\n{upstream}\n",
        s.head(),
        s.listener("")
    )
}

/// Attempts of `qid` the relay logged as "no host reachable, not counted".
fn uncounted_attempts(relay: &Relay, qid: &str) -> usize {
    attempts_for(&relay.log_text(), qid)
        .iter()
        .filter(|a| a.line.contains("attempt not counted"))
        .count()
}

#[test]
fn site_fallback_receives_mail_when_the_host_and_its_failover_hosts_are_all_down() {
    let host = free_addr(); // nothing listens
    let failover1 = free_addr(); // nothing listens
    let failover2 = free_addr(); // nothing listens
    let fallback = Sink::start();
    let relay = Relay::start(|s| {
        config(
            s,
            &format!("fallback = [\"{}\"]", fallback.addr()),
            &format!("host = \"{host}\"\nfailover = [\"{failover1}\", \"{failover2}\"]"),
        )
    });
    let sent = relay.send_tagged(SENDER, &[RCPT], "site-fallback");
    let m = fallback.wait_for_message_id(&sent.message_id, Duration::from_secs(15));
    assert_eq!(m.to, vec![RCPT.to_string()], "{}", relay.logs());
    let attempts = attempts_for(&relay.log_text(), &sent.queue_id);
    assert!(
        attempts
            .iter()
            .any(|a| a.status == "delivered" && a.upstream == fallback.addr().to_string()),
        "expected a delivered attempt through the site fallback {}:\n{:#?}",
        fallback.addr(),
        attempts
    );
    // The fallback was reached only after the three others were tried.
    let log = relay.log_text();
    for down in [host, failover1, failover2] {
        assert!(
            log.lines()
                .any(|l| l.contains(&down.to_string()) && l.contains("marking it down")),
            "the relay should have tried and marked down {down} first\n{}",
            relay.logs()
        );
    }
}

#[test]
fn down_host_is_probed_again_when_its_backoff_expires_and_gets_the_queued_mail() {
    let upstream = free_addr(); // nothing listens yet
    let relay = Relay::start(|s| config(s, "", &format!("host = \"{upstream}\"")));
    let sent = relay.send_tagged(SENDER, &[RCPT], "backoff-expiry");
    // Down for two probes (at ~0 s and ~1 s): the backoff is now 2 s.
    relay.wait_until(
        "two failed attempts (host down, not counted)",
        Duration::from_secs(15),
        || uncounted_attempts(&relay, &sent.queue_id) >= 2,
    );
    let up_at = Instant::now();
    let sink = Sink::start_with(SinkOptions {
        addr: Some(upstream),
        ..SinkOptions::default()
    });
    // The next probe is due at most 4 s later (backoff 2 s, or 4 s if a
    // third probe failed meanwhile); 10 s leaves room for a loaded machine.
    sink.wait_for_message_id(&sent.message_id, Duration::from_secs(10));
    println!(
        "backoff-expiry: delivered {:?} after the upstream came up",
        up_at.elapsed()
    );
}

/// The backoff between probes of a down host is 1 s, then 2 s, 4 s, 8 s
/// (doubling up to 5 min). The upstream accepts TCP and closes at once, so
/// every probe is one accepted connection; the gaps between them must
/// double, not stay constant (no backoff growth) or grow linearly.
#[test]
fn down_host_probe_backoff_doubles_from_one_second() {
    let counter = AcceptCounter::start();
    let relay = Relay::start(|s| config(s, "", &format!("host = \"{}\"", counter.addr())));
    let _sent = relay.send_tagged(SENDER, &[RCPT], "backoff-doubles");
    // Probes at about 0, 1, 3, 7 and 15 s: five accepts in ~15 s.
    relay.wait_until(
        "five connections to the failing upstream",
        Duration::from_secs(30),
        || counter.accepts().len() >= 5,
    );
    let accepts = counter.accepts();
    let gaps: Vec<f64> = accepts
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64())
        .collect();
    println!("backoff-doubles: gaps between probes {gaps:.2?}");
    for (k, gap) in gaps.iter().take(4).enumerate() {
        let want = f64::from(1u32 << k);
        // Never early (the backoff is a floor); late by at most 1 s of
        // scheduling (the workers re-check at most every second).
        assert!(
            *gap >= want * 0.9 && *gap <= want + 1.0,
            "gap {} between probes was {gap:.2}s, expected {want}s (1 s doubling): all gaps {gaps:.2?}\n{}",
            k + 1,
            relay.logs()
        );
    }
    // And in the same time a constant 1 s backoff would have probed ~16
    // times: count the accepts within 14 s of the first one.
    let first = accepts[0];
    let within = accepts
        .iter()
        .filter(|t| t.duration_since(first) < Duration::from_secs(14))
        .count();
    assert!(
        (4..=5).contains(&within),
        "{within} probes within 14 s of the first; doubling from 1 s gives 4 (0, 1, 3, 7 s)"
    );
}

/// Pool A through `old_host` (nothing listening there): the message waits,
/// then the config is changed to send through `new` and reloaded.
fn reload_moves_queued_mail(via_sighup: bool) {
    let old_host = free_addr(); // nothing listens
    let new = Sink::start();
    let mut relay = Relay::start(|s| config(s, "", &format!("host = \"{old_host}\"")));
    let sent = relay.send_tagged(SENDER, &[RCPT], "reload-upstream");
    relay.wait_until(
        "a failed attempt through the unreachable upstream",
        Duration::from_secs(15),
        || uncounted_attempts(&relay, &sent.queue_id) >= 1,
    );
    assert_eq!(new.count(), 0, "test bug: the new upstream got mail early");
    let text = relay.config_text().replace(
        &format!("host = \"{old_host}\""),
        &format!("host = \"{}\"", new.addr()),
    );
    relay.write_config(&text);
    if via_sighup {
        relay.signal_and_wait_for_log("HUP", "SIGHUP: reloaded");
    } else {
        let out = poolrelay(
            &["reload", "--admin", &relay.admin_url()],
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "poolrelay reload:\n{out}\n{}",
            relay.logs()
        );
    }
    // The old host's backoff is at 2 s or more by now; the new workers must
    // not wait for it: 10 s is plenty, and the message must leave the queue.
    new.wait_for_message_id(&sent.message_id, Duration::from_secs(10));
    relay.wait_until(
        "the message to leave the queue",
        Duration::from_secs(10),
        || poolrelay_tests::admin::queued_message(&relay, "A", &sent.queue_id).is_none(),
    );
}

#[test]
fn sighup_changing_the_upstream_sends_mail_queued_for_the_unreachable_one_to_the_new_one() {
    reload_moves_queued_mail(true);
}

#[test]
fn reload_cli_changing_the_upstream_sends_mail_queued_for_the_unreachable_one_to_the_new_one() {
    reload_moves_queued_mail(false);
}

/// A message deferred with a 451 (retry in 1 h) waits for its retry time;
/// after a reload to another upstream, `poolrelay queue flush` sends it
/// there now.
#[test]
fn reload_then_queue_flush_sends_deferred_mail_to_the_new_upstream() {
    let refusing = Sink::start_with(SinkOptions {
        reply: Some(451),
        ..SinkOptions::default()
    });
    let new = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1h\"]\n\n[pool.A]\n\n\
             [[upstream]]\nhost = \"{}\"\n",
            s.head(),
            s.listener(""),
            refusing.addr()
        )
    });
    let sent = relay.send_tagged(SENDER, &[RCPT], "reload-flush");
    wait_deferred(&relay, "A", &sent.queue_id, "451", Duration::from_secs(15));
    let text = relay.config_text().replace(
        &format!("host = \"{}\"", refusing.addr()),
        &format!("host = \"{}\"", new.addr()),
    );
    relay.write_config(&text);
    let out = poolrelay(
        &["reload", "--admin", &relay.admin_url()],
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "poolrelay reload:\n{out}\n{}",
        relay.logs()
    );
    queue_ok(&relay, &["flush", &sent.queue_id]);
    new.wait_for_message_id(&sent.message_id, Duration::from_secs(10));
}
