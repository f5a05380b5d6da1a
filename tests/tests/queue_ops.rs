//! `poolrelay queue` against a running relay (README.md, "Operating" >
//! "The queue, like postqueue and kcli"): hold, release, summary, list,
//! flush, delete, move and bounce.

use std::collections::BTreeSet;

use poolrelay_tests::admin::{
    api_json, json_of, listed_ids, pool_entry, queue_cli, queue_ok, queued_message, wait_deferred,
};
use poolrelay_tests::delivery::{field, parse_dsn};
use poolrelay_tests::operating::{
    DELIVERY, RCPT, deferred_setup, held_pool_config, ids_at, samples, send, two_pools, value,
};
use poolrelay_tests::{
    POLL_INTERVAL, Relay, Sink, header_value, metric_sum, poll_until, strip_brackets,
};

// Queue operations

#[test]
fn a_held_pool_keeps_its_mail_until_released_while_other_pools_deliver() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    let out = queue_ok(&relay, &["hold", "--pool", "B"]);
    assert!(out.stdout.contains("held"), "queue hold: {out}");

    let b = send(&relay, "owner-b@lists.test", "held-b");
    let a = send(&relay, "owner-lista@lists.test", "held-a");
    sink_a.wait_for_message_id(&a.message_id, DELIVERY);
    assert_eq!(
        sink_b.count(),
        0,
        "pool B is held, yet its sink got mail\n{}",
        relay.logs()
    );

    // The table: B held, one message waiting.
    let out = queue_ok(&relay, &["summary"]);
    let row: Vec<&str> = out
        .stdout
        .lines()
        .map(str::split_whitespace)
        .map(Iterator::collect::<Vec<&str>>)
        .find(|t| t.first() == Some(&"B"))
        .unwrap_or_else(|| panic!("no row for pool B in queue summary:\n{out}"));
    assert!(
        row.len() >= 4 && row[1] == "1" && row[2] == "0" && row[3] == "yes",
        "queue summary row for B (POOL READY DEFERRED HELD ...) should be `B 1 0 yes ...`: {row:?}\n{out}"
    );
    // The JSON.
    let out = queue_ok(&relay, &["summary", "--json"]);
    let pools = json_of(&out, "queue summary --json");
    let pb = pool_entry(&pools, "B");
    assert_eq!(pb["held"], true, "pool B in {pools:#}");
    assert_eq!(pb["ready"], 1, "pool B in {pools:#}");
    assert_eq!(pb["deferred"], 0, "pool B in {pools:#}");
    assert_eq!(
        pool_entry(&pools, "A")["held"],
        false,
        "pool A in {pools:#}"
    );
    assert!(
        listed_ids(&relay).contains(&b.queue_id),
        "queue list --json does not show the held message {}",
        b.queue_id
    );
    let m = samples(&relay);
    assert_eq!(
        metric_sum(
            &m,
            "poolrelay_queue_messages",
            &[("pool", "B"), ("state", "held")]
        ),
        Some(1.0),
        "poolrelay_queue_messages{{pool=\"B\",state=\"held\"}}"
    );
    assert!(
        value(&m, "poolrelay_queue_oldest_age_seconds", &[("pool", "B")]) > 0.0,
        "poolrelay_queue_oldest_age_seconds{{pool=\"B\"}} with a held message"
    );

    let out = queue_ok(&relay, &["release", "--pool", "B"]);
    assert!(out.stdout.contains("released"), "queue release: {out}");
    sink_b.wait_for_message_id(&b.message_id, DELIVERY);
    let pools = json_of(&queue_ok(&relay, &["summary", "--json"]), "summary");
    assert_eq!(pool_entry(&pools, "B")["held"], false, "{pools:#}");
    assert_eq!(ids_at(&sink_a), BTreeSet::from([a.message_id]));
    assert_eq!(ids_at(&sink_b), BTreeSet::from([b.message_id]));
}

/// The human table of `queue summary`: each value ends under the end of its
/// (right-aligned) column heading.
#[test]
fn queue_summary_table_columns_line_up() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    queue_ok(&relay, &["hold", "--pool", "B"]);
    send(&relay, "owner-b@lists.test", "table-b");
    let out = queue_ok(&relay, &["summary"]);
    let ends = |line: &str| -> Vec<usize> {
        let mut v = Vec::new();
        let mut in_token = false;
        for (i, c) in line.char_indices() {
            if c.is_whitespace() {
                if in_token {
                    v.push(i);
                }
                in_token = false;
            } else {
                in_token = true;
            }
        }
        if in_token {
            v.push(line.len());
        }
        v
    };
    let mut lines = out.stdout.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("POOL"), "no header line:\n{out}");
    // POOL READY DEFERRED HELD INFLIGHT OLDEST SENT/MIN: columns 1..=6 are right-aligned.
    let head_ends = ends(header);
    let mut misaligned = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let row_ends = ends(line);
        if row_ends.len() < 7 || head_ends.len() < 7 || row_ends[1..7] != head_ends[1..7] {
            misaligned.push(line.to_string());
        }
    }
    assert!(
        misaligned.is_empty(),
        "queue summary rows whose READY..SENT/MIN values do not end under their headings:\n{}\n--- full output ---\n{}",
        misaligned.join("\n"),
        out.stdout
    );
}

/// Pool A's upstream answers 451 to every message (retry in 1 h); the
/// message `tag` is sent and waits deferred. Returns it.
#[test]
fn flush_retries_deferred_mail_now() {
    let (relay, upstream, refusing, first) = deferred_setup("flush-1");
    let second = send(&relay, "owner-lista@lists.test", "flush-2");
    wait_deferred(&relay, "A", &second.queue_id, "451", DELIVERY);
    // The upstream now accepts, on the same address.
    drop(refusing);
    let sink = Sink::start_at(upstream);

    // One message by id: it goes, the other keeps waiting for its retry.
    let out = queue_ok(&relay, &["flush", &first.queue_id]);
    assert!(out.stdout.contains("flushed"), "queue flush ID: {out}");
    sink.wait_for_message_id(&first.message_id, DELIVERY);
    assert!(
        queued_message(&relay, "A", &second.queue_id).is_some(),
        "flushing {} also sent {}\n{}",
        first.queue_id,
        second.queue_id,
        relay.logs()
    );
    assert!(!ids_at(&sink).contains(&second.message_id));

    // The whole pool.
    let out = queue_ok(&relay, &["flush", "--pool", "A"]);
    assert!(
        out.stdout.contains("flushed"),
        "queue flush --pool A: {out}"
    );
    sink.wait_for_message_id(&second.message_id, DELIVERY);
    relay.wait_until("pool A to be empty", DELIVERY, || {
        queued_message(&relay, "A", &second.queue_id).is_none()
    });
    assert_eq!(sink.count(), 2, "{:?}", sink.message_ids());
}

#[test]
fn delete_removes_a_deferred_message_for_good() {
    let (relay, upstream, refusing, doomed) = deferred_setup("delete-me");
    let out = queue_ok(&relay, &["delete", &doomed.queue_id]);
    assert!(out.stdout.contains("deleted"), "queue delete: {out}");
    assert!(
        !listed_ids(&relay).contains(&doomed.queue_id),
        "queue list --json still shows the deleted {}",
        doomed.queue_id
    );
    let again = queue_cli(&relay, &["delete", &doomed.queue_id]);
    assert!(
        !again.status.success(),
        "deleting {} twice should fail (exit codes scripts can trust):\n{again}",
        doomed.queue_id
    );
    let show = queue_cli(&relay, &["show", &doomed.queue_id]);
    assert!(
        !show.status.success(),
        "queue show of a deleted message:\n{show}"
    );

    // The upstream accepts again; a flush and a later message go through,
    // the deleted one never does.
    drop(refusing);
    let sink = Sink::start_at(upstream);
    queue_ok(&relay, &["flush", "--pool", "A"]);
    let marker = send(&relay, "owner-lista@lists.test", "after-delete");
    sink.wait_for_message_id(&marker.message_id, DELIVERY);
    assert_eq!(
        ids_at(&sink),
        BTreeSet::from([marker.message_id]),
        "the deleted message was delivered\n{}",
        relay.logs()
    );
    // The sink has the message before the relay has recorded it: wait for
    // the relay to finish it, then nothing may be left.
    let empty = poll_until(DELIVERY, POLL_INTERVAL, || {
        let pools = api_json(&relay, "/api/v1/pools");
        let pa = pool_entry(&pools, "A");
        pa["ready"] == 0 && pa["deferred"] == 0 && pa["in_flight"] == 0
    });
    let pools = api_json(&relay, "/api/v1/pools");
    assert!(
        empty,
        "pool A after the delete: {:#}",
        pool_entry(&pools, "A")
    );
}

/// Pools A, B and H (held); H's mail would go through A's upstream.
#[test]
fn move_sends_a_held_message_through_the_target_pool() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let sink_dash = Sink::start();
    let relay =
        Relay::start(|s| held_pool_config(s, sink_a.addr(), sink_b.addr(), sink_dash.addr()));
    queue_ok(&relay, &["hold", "--pool", "H"]);
    let sent = send(&relay, "owner-h@lists.test", "move-me");
    let m = queued_message(&relay, "H", &sent.queue_id)
        .unwrap_or_else(|| panic!("{} is not listed in pool H", sent.queue_id));
    assert_eq!(m["pool"], "H");

    let out = queue_ok(&relay, &["move", &sent.queue_id, "--to", "B"]);
    assert!(out.stdout.contains("moved"), "queue move: {out}");
    sink_b.wait_for_message_id(&sent.message_id, DELIVERY);
    relay.wait_until("the moved message to leave the queue", DELIVERY, || {
        !listed_ids(&relay).contains(&sent.queue_id)
    });
    assert_eq!(sink_a.count(), 0, "pool H's upstream got mail");
    assert_eq!(sink_dash.count(), 0, "a DSN was sent for a moved message");
    let bad = queue_cli(&relay, &["move", "0000000000000000", "--to", "B"]);
    assert!(!bad.status.success(), "moving an unknown id:\n{bad}");
}

#[test]
fn bounce_returns_a_message_to_its_sender_as_a_dsn() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let sink_dash = Sink::start();
    let relay =
        Relay::start(|s| held_pool_config(s, sink_a.addr(), sink_b.addr(), sink_dash.addr()));
    queue_ok(&relay, &["hold", "--pool", "H"]);
    let sent = send(&relay, "owner-h@lists.test", "bounce-me");

    let out = queue_ok(&relay, &["bounce", &sent.queue_id]);
    assert!(out.stdout.contains("bounced"), "queue bounce: {out}");
    let dsns = sink_dash.wait_for_count(1, DELIVERY);
    let dsn = &dsns[0];
    assert_eq!(dsn.from, "", "a DSN comes from the null sender: {dsn:?}");
    assert_eq!(
        dsn.to,
        vec!["owner-h@lists.test".to_string()],
        "the DSN goes to the original envelope sender"
    );
    // The recipient and the original's Message-ID also occur in the returned
    // original, so each is looked for in its own MIME part only.
    let report =
        parse_dsn(&dsn.raw).unwrap_or_else(|e| panic!("the DSN does not parse: {e}\n{}", dsn.raw));
    assert_eq!(
        report.report_type.as_deref(),
        Some("delivery-status"),
        "the DSN's top-level Content-Type\n{}",
        dsn.raw
    );
    assert_eq!(
        report.final_recipients(),
        vec![RCPT.to_string()],
        "the message/delivery-status part should report exactly {RCPT}\n{}",
        dsn.raw
    );
    let group = report
        .recipient(RCPT)
        .unwrap_or_else(|| panic!("no Final-Recipient: rfc822; {RCPT}\n{}", dsn.raw));
    assert_eq!(
        field(group, "Action")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("failed"),
        "Action for {RCPT} in the message/delivery-status part: {group:?}"
    );
    assert_ne!(
        dsn.message_id(),
        Some(sent.message_id.clone()),
        "the DSN's own Message-ID is the original's"
    );
    let original = report
        .parts
        .iter()
        .find(|p| {
            matches!(
                p.media_type().as_str(),
                "message/rfc822" | "text/rfc822-headers"
            )
        })
        .unwrap_or_else(|| {
            panic!(
                "the DSN returns no original (message/rfc822 or text/rfc822-headers part)\n{}",
                dsn.raw
            )
        });
    assert_eq!(
        header_value(&original.body, "Message-ID").map(|v| strip_brackets(&v)),
        Some(sent.message_id.clone()),
        "the returned original's Message-ID\n{}",
        dsn.raw
    );
    assert!(
        !listed_ids(&relay).contains(&sent.queue_id),
        "the bounced message is still queued"
    );
    assert_eq!(sink_a.count(), 0, "the bounced message was delivered");
    assert_eq!(sink_b.count(), 0);
}

/// A hold is recorded in the spool (like `postsuper -h`): after a kill -9
/// and a restart the pool is still held and keeps its mail until released,
/// while other pools deliver.
#[test]
fn a_held_pool_stays_held_across_kill_9_and_a_restart() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let mut relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    queue_ok(&relay, &["hold", "--pool", "B"]);
    let b = send(&relay, "owner-b@lists.test", "held-across-restart");
    relay.kill9();
    relay.restart();
    // Mail for A flows after the restart, so workers are running...
    let a = send(&relay, "owner-lista@lists.test", "after-restart-a");
    sink_a.wait_for_message_id(&a.message_id, DELIVERY);
    // ...and B is still held with its message.
    assert_eq!(
        sink_b.count(),
        0,
        "pool B was held before the restart, yet its sink got mail\n{}",
        relay.logs()
    );
    let pools = json_of(&queue_ok(&relay, &["summary", "--json"]), "summary");
    assert_eq!(pool_entry(&pools, "B")["held"], true, "{pools:#}");
    assert_eq!(pool_entry(&pools, "B")["ready"], 1, "{pools:#}");
    let listed = queue_ok(&relay, &["list", "--pool", "B"]);
    assert!(
        listed.stdout.contains("waiting: pool held"),
        "queue list says why the message waits: {listed}"
    );
    queue_ok(&relay, &["release", "--pool", "B"]);
    sink_b.wait_for_message_id(&b.message_id, DELIVERY);
    relay.kill9();
    relay.restart();
    let pools = json_of(&queue_ok(&relay, &["summary", "--json"]), "summary");
    assert_eq!(
        pool_entry(&pools, "B")["held"],
        false,
        "a release is recorded too: {pools:#}"
    );
}
