//! Delivery semantics end to end (README.md, "Delivery semantics"):
//! failover when the upstream refuses connections or greets with 421 and
//! the return to it, per-recipient outcomes (250 / 451 / 550), DSNs,
//! never bouncing a bounce, expiry with 4.4.7, and a kill -9 after a
//! partial delivery.
//!
//! Upstreams are our `poolrelay sink` and the scripted SMTP server of the
//! harness (for replies a real peer cannot be told to give). Loopback only;
//! every wait has a deadline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use poolrelay_tests::admin::try_api_json;
use poolrelay_tests::delivery::{attempts_for, field, parse_dsn};
use poolrelay_tests::scripted::{Scripted, Transaction};
use poolrelay_tests::{
    Relay, RelaySetup, Sink, SinkMessage, SinkOptions, free_addr, percent_encode, poll_until,
};

/// A list owner: unrouted `owner-*@` mail goes to `list_pool` A.
const SENDER: &str = "owner-news@lists.test";
const DELIVERY: Duration = Duration::from_secs(20);

/// Sends one message from `from` to `rcpts` with a fresh Message-ID;
/// returns (Message-ID, queue id).
fn send_from(relay: &Relay, from: &str, rcpts: &[&str], tag: &str) -> (String, String) {
    let sent = relay.send_tagged(from, rcpts, tag);
    (sent.message_id, sent.queue_id)
}

fn send(relay: &Relay, rcpts: &[&str], tag: &str) -> (String, String) {
    send_from(relay, SENDER, rcpts, tag)
}

/// `[defaults]` with list_pool A and `extra` lines, `[pool.A]`.
fn defaults(extra: &str) -> String {
    format!("[defaults]\nlist_pool = \"A\"\n{extra}\n[pool.A]\n\n")
}

/// Pool A through `a_host` (with `a_extra` lines in its `[[upstream]]`),
/// pool `-` (DSNs) through `dsn`.
fn two_lane_config(
    s: &RelaySetup,
    defaults_extra: &str,
    a_host: SocketAddr,
    a_extra: &str,
    dsn: SocketAddr,
) -> String {
    format!(
        "{}{}{}[[upstream]]\nhost = \"{a_host}\"\npools = [\"A\"]\n{a_extra}\n\n\
         [[upstream]]\nhost = \"{dsn}\"\npools = [\"-\"]\n",
        s.head(),
        s.listener(""),
        defaults(defaults_extra)
    )
}

/// Message-IDs of the transactions the scripted upstream accepted.
fn scripted_ids(up: &Scripted) -> Vec<String> {
    up.transactions()
        .iter()
        .filter(|t| t.delivered())
        .filter_map(|t| poolrelay_tests::delivery::message_id_of(&t.data))
        .collect()
}

/// Where a message is: the names of the destinations holding its
/// Message-ID (one entry per copy).
fn copies(id: &str, places: &[(&str, Vec<String>)]) -> Vec<String> {
    places
        .iter()
        .flat_map(|(name, ids)| ids.iter().filter(|i| *i == id).map(|_| name.to_string()))
        .collect()
}

fn delivery_lines(relay: &Relay, qid: &str) -> String {
    attempts_for(&relay.log_text(), qid)
        .iter()
        .map(|a| a.line.clone())
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------
// Failover and the return to the primary
// ---------------------------------------------------------------------------

/// After the primary came back: sends one message at a time (paced) until
/// one lands at the primary, within 15 s (the probe backoff starts at 1 s,
/// doubling). Then one more must land there too. Every message must be
/// delivered exactly once over the two destinations. `primary_ids` and
/// `failover_ids` list the Message-IDs each destination received.
fn returns_to_primary(
    relay: &Relay,
    tag: &str,
    mut sent: Vec<String>,
    primary_ids: &dyn Fn() -> Vec<String>,
    failover_ids: &dyn Fn() -> Vec<String>,
) {
    let back = Instant::now();
    let deadline = back + Duration::from_secs(15);
    let mut returned = None;
    while returned.is_none() {
        assert!(
            Instant::now() < deadline,
            "no new message went to the primary within 15s of it coming back; sent {sent:?}\n{}",
            relay.logs()
        );
        let (id, _) = send(relay, &["member@dest.test"], tag);
        sent.push(id.clone());
        relay.wait_until(
            &format!("<{id}> at the primary or the failover"),
            DELIVERY,
            || primary_ids().contains(&id) || failover_ids().contains(&id),
        );
        if primary_ids().contains(&id) {
            returned = Some(back.elapsed());
        } else {
            // Paced, not hoped: the loop ends on the condition above.
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    println!(
        "{tag}: new mail went to the primary again {:?} after it came back",
        returned.unwrap_or_default()
    );
    // It stays there.
    let (id, _) = send(relay, &["member@dest.test"], tag);
    sent.push(id.clone());
    relay.wait_until(&format!("<{id}> at the primary"), DELIVERY, || {
        primary_ids().contains(&id) || failover_ids().contains(&id)
    });
    assert!(
        primary_ids().contains(&id),
        "after the primary took mail again, the next message went to the failover\n{}",
        relay.logs()
    );
    // Exactly once each, over both.
    let places = [("primary", primary_ids()), ("failover", failover_ids())];
    for id in &sent {
        let c = copies(id, &places);
        assert_eq!(c.len(), 1, "<{id}> delivered {} times: {c:?}", c.len());
    }
}

#[test]
fn upstream_refusing_connections_fails_over_within_5s_and_mail_returns_once_it_is_back() {
    let primary = free_addr(); // nothing listens here yet
    let failover = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}{}{}[[upstream]]\nhost = \"{primary}\"\nfailover = [\"{}\"]\n",
            s.head(),
            s.listener(""),
            defaults("retry = [\"1s\"]"),
            failover.addr()
        )
    });
    let start = Instant::now();
    let (id1, qid1) = send(&relay, &["member@dest.test"], "refused");
    relay.wait_until(
        "the first message at the failover host",
        Duration::from_secs(5),
        || failover.message_ids().contains(&id1),
    );
    println!("refused: failover delivery took {:?}", start.elapsed());
    let attempts = attempts_for(&relay.log_text(), &qid1);
    assert!(
        attempts
            .iter()
            .any(|a| a.status == "delivered" && a.upstream == failover.addr().to_string()),
        "expected a 'sent' attempt through the failover {} for {qid1}:\n{}",
        failover.addr(),
        delivery_lines(&relay, &qid1)
    );

    let primary_sink = Sink::start_with(SinkOptions {
        addr: Some(primary),
        ..SinkOptions::default()
    });
    returns_to_primary(
        &relay,
        "refused",
        vec![id1],
        &|| primary_sink.message_ids(),
        &|| failover.message_ids(),
    );
}

#[test]
fn upstream_greeting_421_fails_over_within_5s_and_mail_returns_once_it_greets_again() {
    let primary = Scripted::start_default();
    primary.set_greeting("421 4.3.2 scripted.test service not available, closing");
    let failover = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}{}{}[[upstream]]\nhost = \"{}\"\nfailover = [\"{}\"]\n",
            s.head(),
            s.listener(""),
            defaults("retry = [\"1s\"]"),
            primary.addr(),
            failover.addr()
        )
    });
    let start = Instant::now();
    let (id1, qid1) = send(&relay, &["member@dest.test"], "greet421");
    relay.wait_until(
        "the first message at the failover host",
        Duration::from_secs(5),
        || failover.message_ids().contains(&id1),
    );
    println!("421: failover delivery took {:?}", start.elapsed());
    // One message, one worker: the 421 marks the primary down for its
    // backoff, so the relay connects exactly once before failing over.
    assert_eq!(
        primary.sessions(),
        1,
        "connections to the primary greeting 421 before the failover delivered\n{}",
        relay.logs()
    );
    assert!(
        primary.commands().is_empty(),
        "after a 421 greeting the relay must not send commands: {:?}",
        primary.commands()
    );
    assert!(
        attempts_for(&relay.log_text(), &qid1)
            .iter()
            .any(|a| a.status == "delivered" && a.upstream == failover.addr().to_string()),
        "expected a 'sent' attempt through the failover for {qid1}:\n{}",
        delivery_lines(&relay, &qid1)
    );

    primary.set_greeting("220 scripted.test ESMTP back again");
    returns_to_primary(
        &relay,
        "greet421",
        vec![id1],
        &|| scripted_ids(&primary),
        &|| failover.message_ids(),
    );
}

/// README.md ("Delivery semantics"): "a `421` marks the host down", at any
/// stage. Here the
/// upstream greets fine and answers RCPT with 421 (closing the connection):
/// the message goes through the failover host at once, and is not deferred
/// or bounced.
#[test]
fn upstream_421_to_rcpt_fails_over_within_5s() {
    let primary = Scripted::start_default();
    primary.set_rcpt_reply("member", "421 4.3.2 scripted.test shutting down");
    let failover = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}{}{}[[upstream]]\nhost = \"{}\"\nfailover = [\"{}\"]\n",
            s.head(),
            s.listener(""),
            defaults("retry = [\"1m\"]"),
            primary.addr(),
            failover.addr()
        )
    });
    let (id, qid) = send(&relay, &["member@dest.test"], "rcpt421");
    relay.wait_until(
        "the message at the failover host",
        Duration::from_secs(5),
        || failover.message_ids().contains(&id),
    );
    assert!(
        primary.transactions().iter().all(|t| !t.delivered()),
        "{}",
        primary.dump()
    );
    let a = attempts_for(&relay.log_text(), &qid);
    assert!(
        a.iter().all(|a| a.bounced == 0),
        "a 421 must never bounce:\n{}",
        delivery_lines(&relay, &qid)
    );
}

/// README.md promises "connection reuse" (RSET between messages). While the
/// primary is down, mail through the failover host should reuse one
/// connection too, not open one per message. Allowed: one connection, plus
/// one per probe of the primary (the backoff starts at 1 s, doubling).
#[test]
fn while_the_primary_is_down_the_failover_connection_is_reused() {
    let primary = free_addr(); // nothing listens
    let failover = Scripted::start_default();
    let relay = Relay::start(|s| {
        format!(
            "{}{}{}[[upstream]]\nhost = \"{primary}\"\nfailover = [\"{}\"]\n",
            s.head(),
            s.listener(""),
            defaults("retry = [\"1s\"]"),
            failover.addr()
        )
    });
    let start = Instant::now();
    const N: usize = 10;
    for n in 0..N {
        let (id, _) = send(&relay, &["member@dest.test"], "reuse");
        relay.wait_until(&format!("message {n} at the failover"), DELIVERY, || {
            scripted_ids(&failover).contains(&id)
        });
    }
    let elapsed = start.elapsed();
    // Probes at ~1 s, 3 s, 7 s, ... after the first failure: at most
    // 1 + elapsed seconds of them, each of which may cost a reconnect.
    let allowed = 2 + elapsed.as_secs() as usize;
    let sessions = failover.sessions();
    println!("reuse: {N} messages through the failover in {elapsed:?} used {sessions} connections");
    assert!(
        sessions <= allowed,
        "{N} messages through the failover host (primary down) opened {sessions} connections \
         in {elapsed:?}; expected at most {allowed} (reuse, RSET between messages)\n{}",
        failover.dump()
    );
}

// ---------------------------------------------------------------------------
// Per-recipient outcomes and DSNs
// ---------------------------------------------------------------------------

/// Checks that `m` is a failure DSN for `original_id` sent from `<>` to
/// `sender`, reporting exactly `address` with a status starting `status_prefix`.
fn assert_dsn(
    m: &SinkMessage,
    sender: &str,
    original_id: &str,
    address: &str,
    status_prefix: &str,
) {
    assert_eq!(m.from, "", "a DSN goes from <>; got MAIL FROM:<{}>", m.from);
    assert_eq!(
        m.to,
        vec![sender.to_string()],
        "the DSN goes to the envelope sender"
    );
    let dsn =
        parse_dsn(&m.raw).unwrap_or_else(|e| panic!("the DSN does not parse: {e}\n{}", m.raw));
    assert_eq!(dsn.media_type, "multipart/report", "{}", m.raw);
    assert_eq!(
        dsn.report_type.as_deref(),
        Some("delivery-status"),
        "report-type\n{}",
        m.raw
    );
    assert!(
        field(&dsn.per_message, "Reporting-MTA").is_some(),
        "no Reporting-MTA in the per-message fields {:?}",
        dsn.per_message
    );
    assert_eq!(
        dsn.final_recipients(),
        vec![address.to_string()],
        "the DSN must report exactly the failed recipient\n{}",
        m.raw
    );
    let r = dsn
        .recipient(address)
        .unwrap_or_else(|| panic!("no Final-Recipient: rfc822; {address}\n{}", m.raw));
    let status = field(r, "Status").unwrap_or_else(|| panic!("no Status for {address}: {r:?}"));
    assert!(
        status.starts_with(status_prefix)
            && status.split('.').count() == 3
            && status
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        "Status {status:?} for {address}, expected {status_prefix}…\n{}",
        m.raw
    );
    assert_eq!(
        field(r, "Action").map(str::to_ascii_lowercase).as_deref(),
        Some("failed"),
        "Action for {address}: {r:?}"
    );
    assert!(
        dsn.parts
            .iter()
            .any(|p| p.body.contains(&format!("<{original_id}>"))),
        "the DSN does not return the original message's headers (Message-ID <{original_id}>)\n{}",
        m.raw
    );
}

#[test]
fn recipients_answered_250_451_550_are_delivered_once_retried_alone_and_bounced_with_a_dsn() {
    let up = Scripted::start_default();
    up.set_rcpt_reply(
        "later",
        "451 4.2.0 <later@dest.test> mailbox busy, try later",
    );
    up.set_rcpt_reply("gone", "550 5.1.1 <gone@dest.test> no such user");
    let dsn_sink = Sink::start();
    let relay =
        Relay::start(|s| two_lane_config(s, "retry = [\"1s\"]", up.addr(), "", dsn_sink.addr()));
    let rcpts = ["ok@dest.test", "later@dest.test", "gone@dest.test"];
    let (id, qid) = send(&relay, &rcpts, "outcomes");

    // First attempt: all three RCPTs, only ok accepted.
    let first = up.wait_for_delivered(1, DELIVERY);
    let first: Transaction = first
        .into_iter()
        .find(|t| t.delivered())
        .unwrap_or_else(|| unreachable!());
    assert_eq!(first.rcpt_addresses(), rcpts.to_vec(), "{}", up.dump());
    assert_eq!(
        first.accepted,
        vec!["ok@dest.test".to_string()],
        "{}",
        up.dump()
    );
    // The retry is due ~1 s later; let it succeed.
    up.set_rcpt_reply("later", "250 2.1.5 Ok");

    relay.wait_until("the first attempt in the log", DELIVERY, || {
        !attempts_for(&relay.log_text(), &qid).is_empty()
    });
    let a1 = attempts_for(&relay.log_text(), &qid).remove(0);
    assert_eq!(
        (
            a1.delivered,
            a1.deferred,
            a1.bounced,
            a1.status.as_str(),
            a1.attempt
        ),
        (1, 1, 1, "deferred", 1),
        "first attempt: {}",
        a1.line
    );

    // The 550 one: a DSN at pool -'s upstream.
    let dsns = dsn_sink.wait_for_count(1, DELIVERY);
    assert_dsn(&dsns[0], SENDER, &id, "gone@dest.test", "5.");

    // The 451 one: again after its retry time, alone.
    let all = up.wait_for_delivered(2, DELIVERY);
    let retry = all
        .iter()
        .filter(|t| t.delivered())
        .nth(1)
        .unwrap_or_else(|| unreachable!())
        .clone();
    assert_eq!(
        retry.rcpt_addresses(),
        vec!["later@dest.test".to_string()],
        "the retry must carry only the deferred recipient\n{}",
        up.dump()
    );
    let gap = retry.at.duration_since(first.at);
    assert!(
        gap >= Duration::from_millis(850),
        "the deferred recipient was retried after {gap:?}, before its 1s retry time\n{}",
        relay.logs()
    );
    println!("outcomes: the 451 recipient was retried {gap:?} after the first attempt");

    relay.wait_until(
        "the message to be finished (status=delivered)",
        DELIVERY,
        || {
            attempts_for(&relay.log_text(), &qid)
                .iter()
                .any(|a| a.status == "delivered")
        },
    );
    let attempts = attempts_for(&relay.log_text(), &qid);
    assert_eq!(
        attempts.len(),
        2,
        "attempts:\n{}",
        delivery_lines(&relay, &qid)
    );
    assert_eq!(
        (
            attempts[1].delivered,
            attempts[1].deferred,
            attempts[1].bounced,
            attempts[1].attempt
        ),
        (1, 0, 0, 2),
        "second attempt: {}",
        attempts[1].line
    );
    assert_eq!(up.delivered_to("ok@dest.test"), 1, "{}", up.dump());
    assert_eq!(up.delivered_to("later@dest.test"), 1, "{}", up.dump());
    assert_eq!(up.delivered_to("gone@dest.test"), 0, "{}", up.dump());
    let gone_rcpts = up
        .transactions()
        .iter()
        .flat_map(|t| t.rcpt_addresses())
        .filter(|a| a == "gone@dest.test")
        .count();
    assert_eq!(
        gone_rcpts,
        1,
        "a bounced recipient must not be tried again\n{}",
        up.dump()
    );
    assert_eq!(
        dsn_sink.count(),
        1,
        "exactly one DSN: {:?}",
        dsn_sink.message_ids()
    );
}

#[test]
fn a_message_from_the_null_sender_that_gets_550_produces_no_dsn() {
    let up = Scripted::start_default();
    up.set_rcpt_reply("gone", "550 5.1.1 <gone@dest.test> no such user");
    let dsn_sink = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "{}[[route]]\npool = \"A\"\nsender = \"\"\n",
            two_lane_config(s, "retry = [\"1s\"]", up.addr(), "", dsn_sink.addr())
        )
    });
    let (_, qid) = send_from(&relay, "", &["gone@dest.test"], "nullsender");
    relay.wait_until("the bounce of <> to be logged as dropped", DELIVERY, || {
        poolrelay_tests::delivery::strip_ansi(&relay.log_text())
            .lines()
            .any(|l| l.contains(&qid) && l.contains("dropped"))
    });
    let attempts = attempts_for(&relay.log_text(), &qid);
    assert!(
        attempts
            .iter()
            .any(|a| a.status == "bounced" && a.bounced == 1),
        "expected a bounced attempt:\n{}",
        delivery_lines(&relay, &qid)
    );
    // A marker through pool - after the drop: any DSN would have been
    // queued before it.
    let (marker, _) = send_from(
        &relay,
        "someone@example.test",
        &["postmaster@dest.test"],
        "marker",
    );
    dsn_sink.wait_for_message_id(&marker, DELIVERY);
    let ids = dsn_sink.message_ids();
    assert_eq!(
        ids,
        vec![marker.clone()],
        "pool -'s upstream must get only the marker, no DSN for a message from <>\n{}",
        relay.logs()
    );
    // Counted by MAIL commands: the upstream records a refused transaction
    // only when the next command ends it, and the relay sends that RSET
    // pipelined with its next MAIL.
    assert_eq!(
        up.commands()
            .iter()
            .filter(|c| c.line.starts_with("MAIL FROM:<>"))
            .count(),
        1,
        "the <> message was tried once\n{}",
        up.dump()
    );
}

#[test]
fn a_recipient_deferred_until_max_age_bounces_with_4_4_7() {
    let up = Sink::start_with(SinkOptions {
        reply: Some(451),
        ..SinkOptions::default()
    });
    let dsn_sink = Sink::start();
    let relay = Relay::start(|s| {
        two_lane_config(
            s,
            "retry = [\"1s\"]\nmax_age = \"3s\"",
            up.addr(),
            "",
            dsn_sink.addr(),
        )
    });
    let sent = Instant::now();
    let (id, qid) = send(&relay, &["slow@dest.test"], "expiry");
    let dsns = dsn_sink.wait_for_count(1, Duration::from_secs(30));
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_secs(3),
        "the DSN came {waited:?} after sending, before max_age (3s)"
    );
    assert_dsn(&dsns[0], SENDER, &id, "slow@dest.test", "4.4.7");
    let attempts = attempts_for(&relay.log_text(), &qid);
    let last = attempts
        .last()
        .unwrap_or_else(|| panic!("no delivery attempt logged for {qid}\n{}", relay.logs()));
    assert_eq!(last.status, "expired", "last attempt: {}", last.line);
    assert!(
        attempts.len() >= 2
            && attempts[..attempts.len() - 1]
                .iter()
                .all(|a| a.status == "deferred"),
        "expected deferred attempts on the 1s schedule before expiry:\n{}",
        delivery_lines(&relay, &qid)
    );
    println!(
        "expiry: {} attempts, DSN {waited:?} after sending",
        attempts.len()
    );
    assert_eq!(
        up.count(),
        0,
        "the upstream answered 451; nothing may be stored there"
    );
}

/// What dsn::failure promises ("recipients …
/// that have not been reported yet"): a recipient reported in one DSN is not
/// reported again in the DSN of a later attempt.
#[test]
fn a_later_dsn_does_not_report_recipients_already_reported() {
    let up = Scripted::start_default();
    up.set_rcpt_reply("gone", "550 5.1.1 <gone@dest.test> no such user");
    up.set_rcpt_reply("later", "451 4.2.0 <later@dest.test> try later");
    let dsn_sink = Sink::start();
    let relay =
        Relay::start(|s| two_lane_config(s, "retry = [\"1s\"]", up.addr(), "", dsn_sink.addr()));
    let (_, qid) = send(&relay, &["gone@dest.test", "later@dest.test"], "twodsn");
    let first = dsn_sink.wait_for_count(1, DELIVERY);
    let d1 = parse_dsn(&first[0].raw).unwrap_or_else(|e| panic!("first DSN: {e}"));
    assert_eq!(d1.final_recipients(), vec!["gone@dest.test".to_string()]);
    // Now the deferred one fails permanently too.
    up.set_rcpt_reply("later", "550 5.1.1 <later@dest.test> gone as well");
    let both = dsn_sink.wait_for_count(2, DELIVERY);
    relay.wait_until("the message to be finished", DELIVERY, || {
        attempts_for(&relay.log_text(), &qid)
            .iter()
            .any(|a| a.status == "bounced")
    });
    let mut reported: BTreeMap<String, usize> = BTreeMap::new();
    for m in &both {
        let d = parse_dsn(&m.raw).unwrap_or_else(|e| panic!("DSN: {e}\n{}", m.raw));
        for r in d.final_recipients() {
            *reported.entry(r).or_default() += 1;
        }
    }
    assert_eq!(
        reported.get("gone@dest.test"),
        Some(&1),
        "gone@dest.test was reported in {} DSNs (expected 1): {reported:?}\n{}",
        reported.get("gone@dest.test").copied().unwrap_or(0),
        both.iter()
            .map(|m| m.raw.clone())
            .collect::<Vec<_>>()
            .join("\n=====\n")
    );
    assert_eq!(reported.get("later@dest.test"), Some(&1), "{reported:?}");
}

// ---------------------------------------------------------------------------
// kill -9 after a partial delivery
// ---------------------------------------------------------------------------

/// The envelope of a queued message from the admin API, or None when it is
/// not (or no longer) queued.
fn envelope(relay: &Relay, qid: &str) -> Option<serde_json::Value> {
    try_api_json(relay, &format!("/api/v1/messages/{}", percent_encode(qid)))?
        .get("envelope")
        .cloned()
}

fn recipient_state(env: &serde_json::Value, address: &str) -> Option<String> {
    env.get("recipients")?
        .as_array()?
        .iter()
        .find(|r| r.get("address").and_then(|a| a.as_str()) == Some(address))?
        .get("state")?
        .as_str()
        .map(str::to_string)
}

#[test]
fn after_kill_9_following_a_partial_delivery_only_the_remaining_recipient_is_delivered() {
    let up = Scripted::start_default();
    up.set_rcpt_reply("later", "451 4.2.0 <later@dest.test> try later");
    let dsn_sink = Sink::start();
    let mut relay =
        Relay::start(|s| two_lane_config(s, "retry = [\"2s\"]", up.addr(), "", dsn_sink.addr()));
    let (id, qid) = send(&relay, &["ok@dest.test", "later@dest.test"], "kill9");
    up.wait_for_delivered(1, DELIVERY);
    // Wait until the partial outcome is recorded in the spool (the admin
    // API reads the envelope from it), then kill.
    relay.wait_until(
        "the spool to record ok@ delivered, later@ pending",
        DELIVERY,
        || {
            envelope(&relay, &qid).is_some_and(|e| {
                recipient_state(&e, "ok@dest.test").as_deref() == Some("delivered")
                    && recipient_state(&e, "later@dest.test").as_deref() == Some("pending")
            })
        },
    );
    relay.kill9();
    up.set_rcpt_reply("later", "250 2.1.5 Ok");
    relay.restart();

    let all = up.wait_for_delivered(2, DELIVERY);
    relay.wait_until(
        "the message to be finished after the restart",
        DELIVERY,
        || {
            attempts_for(&relay.log_text(), &qid)
                .iter()
                .any(|a| a.status == "delivered")
        },
    );
    let delivered: Vec<&Transaction> = all.iter().filter(|t| t.delivered()).collect();
    assert_eq!(
        delivered[1].rcpt_addresses(),
        vec!["later@dest.test".to_string()],
        "after the restart only the remaining recipient may be tried\n{}",
        up.dump()
    );
    assert_eq!(
        poolrelay_tests::delivery::message_id_of(&delivered[1].data).as_deref(),
        Some(id.as_str())
    );
    assert_eq!(
        up.delivered_to("ok@dest.test"),
        1,
        "ok@ got it again\n{}",
        up.dump()
    );
    assert_eq!(up.delivered_to("later@dest.test"), 1, "{}", up.dump());
    let sent = attempts_for(&relay.log_text(), &qid)
        .into_iter()
        .find(|a| a.status == "delivered")
        .unwrap_or_else(|| unreachable!());
    assert_eq!(
        sent.attempt, 2,
        "the attempt count must survive the restart: {}",
        sent.line
    );
    // Give nothing a chance to be sent twice: the message is gone from the queue.
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
            envelope(&relay, &qid).is_none()
        }),
        "the finished message is still queued: {:?}",
        envelope(&relay, &qid)
    );
    assert_eq!(dsn_sink.count(), 0, "nothing bounced, no DSN expected");
}
