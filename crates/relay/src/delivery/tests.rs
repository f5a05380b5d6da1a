//! The delivery rules on plain values: no socket, no spool.

use super::*;
use poolrelay_spool::{Recipient, Ret};

const MIN: u64 = 60_000;
const ID: QueueId = 0x0001_0000_0000_0001;

fn r(text: &str) -> Reply {
    let (code, rest) = text.split_once(' ').unwrap_or((text, ""));
    let (enhanced, text) = match rest.split_once(' ') {
        Some((e, t)) if e.split('.').count() == 3 => (Some(e.to_string()), t.to_string()),
        _ => (None, rest.to_string()),
    };
    Reply {
        code: code.parse().unwrap(),
        enhanced,
        text,
    }
}

fn envelope(sender: &str, rcpts: usize) -> Envelope {
    let recipients = (0..rcpts)
        .map(|i| Recipient::pending(&format!("r{i}@x.test")))
        .collect();
    let mut env = Envelope::new("A", sender, recipients, 100, "l", "127.0.0.1:1");
    env.accepted_ms = 1_000_000;
    env
}

const RETRY: &[Duration] = &[
    Duration::from_secs(60),
    Duration::from_secs(300),
    Duration::from_secs(900),
];

fn policy() -> Policy<'static> {
    Policy {
        retry: RETRY,
        max_age: Duration::from_secs(5 * 86_400),
        delay_warning: None,
    }
}

/// `now` a given number of ms after acceptance.
fn at(env: &Envelope, after_ms: u64) -> u64 {
    env.accepted_ms + after_ms
}

fn answered(rcpt: &[&str], data: Option<&str>) -> Attempt {
    Attempt::Answered {
        host: "up.test:25".into(),
        rcpt: rcpt.iter().map(|t| r(t)).collect(),
        data: data.map(r),
    }
}

fn no_connection(every_host_down: bool) -> Attempt {
    Attempt::NoConnection {
        host: "up.test:25".into(),
        reason: "connect to up.test:25 failed: refused".into(),
        every_host_down,
    }
}

fn all(env: &Envelope) -> Vec<usize> {
    env.pending_indexes()
}

fn states(d: &Decision) -> Vec<RecipientState> {
    d.envelope.recipients.iter().map(|r| r.state).collect()
}

use RecipientState::{Bounced as B, Delivered as D, Pending as P};

// --- per-recipient replies -------------------------------------------------

/// One row: RCPT replies, DATA reply, then the expected recipient states and outcome.
struct Row {
    rcpt: &'static [&'static str],
    data: Option<&'static str>,
    states: &'static [RecipientState],
    outcome: Outcome,
}

#[test]
fn each_recipient_takes_the_state_its_reply_says() {
    let rows = [
        Row {
            rcpt: &["250 ok"],
            data: Some("250 2.0.0 queued"),
            states: &[D],
            outcome: Outcome::Delivered,
        },
        Row {
            rcpt: &["550 5.1.1 no such user"],
            data: None,
            states: &[B],
            outcome: Outcome::Bounced,
        },
        Row {
            rcpt: &["450 4.2.1 busy"],
            data: None,
            states: &[P],
            outcome: Outcome::Deferred,
        },
        Row {
            rcpt: &["250 ok", "550 5.1.1 no", "451 4.3.0 later"],
            data: Some("250 ok"),
            states: &[D, B, P],
            outcome: Outcome::Deferred,
        },
        Row {
            rcpt: &["250 ok", "550 5.1.1 no"],
            data: Some("250 ok"),
            states: &[D, B],
            outcome: Outcome::Bounced,
        },
        // The DATA reply covers exactly the recipients whose RCPT was accepted.
        Row {
            rcpt: &["250 ok", "250 ok", "550 5.1.1 no"],
            data: Some("554 5.7.1 content refused"),
            states: &[B, B, B],
            outcome: Outcome::Bounced,
        },
        Row {
            rcpt: &["250 ok", "450 4.2.1 busy"],
            data: Some("452 4.3.1 full"),
            states: &[P, P],
            outcome: Outcome::Deferred,
        },
        Row {
            rcpt: &["250 ok", "550 5.1.1 no"],
            data: Some("451 4.3.0 try later"),
            states: &[P, B],
            outcome: Outcome::Deferred,
        },
    ];
    for (n, row) in rows.iter().enumerate() {
        let env = envelope("s@x.test", row.rcpt.len());
        let d = decide(
            ID,
            &env,
            &all(&env),
            &answered(row.rcpt, row.data),
            &policy(),
            at(&env, 10),
        );
        assert_eq!(states(&d), row.states, "row {n}");
        assert_eq!(d.summary.outcome, row.outcome, "row {n}");
    }
}

#[test]
fn a_refused_transaction_applies_its_reply_to_every_recipient() {
    let env = envelope("s@x.test", 3);
    let refused = |text| Attempt::Refused {
        host: "up.test:25".into(),
        reply: r(text),
    };
    let d = decide(
        ID,
        &env,
        &all(&env),
        &refused("550 5.7.1 sender refused"),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(states(&d), [B, B, B]);
    assert_eq!(d.reports[0].recipients, vec![0, 1, 2]);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &refused("451 4.7.1 greylisted"),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(states(&d), [P, P, P]);
    assert_eq!(d.next, Next::RetryAt(d.envelope.next_attempt_ms));
}

#[test]
fn every_recipient_stores_the_reply_that_decided_it() {
    let env = envelope("s@x.test", 2);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(
            &["250 ok", "550 5.1.1 no such user"],
            Some("250 2.0.0 queued as X"),
        ),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(
        d.envelope.recipients[0].last_reply,
        Some(r("250 2.0.0 queued as X"))
    );
    assert_eq!(
        d.envelope.recipients[1].last_reply,
        Some(r("550 5.1.1 no such user"))
    );
}

#[test]
fn counts_say_what_this_attempt_did() {
    let env = envelope("s@x.test", 4);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(
            &["250 ok", "250 ok", "550 5.1.1 no", "451 4.3.0 later"],
            Some("250 ok"),
        ),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(
        (d.summary.delivered, d.summary.deferred, d.summary.bounced),
        (2, 1, 1)
    );
    assert!(d.summary.counted);
    assert_eq!(d.summary.attempt, 1);
}

#[test]
fn the_logged_reply_is_one_of_a_recipient_still_pending() {
    let env = envelope("s@x.test", 2);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["550 5.1.1 no", "451 4.3.0 later"], None),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(d.summary.reply, Some(r("451 4.3.0 later")));
}

#[test]
fn reply_text_is_stored_without_control_characters_and_bounded() {
    let env = envelope("s@x.test", 1);
    let long = format!("550 5.1.1 a\rFinal-Recipient: x{}", "y".repeat(100_000));
    let attempt = Attempt::Answered {
        host: "h:25".into(),
        rcpt: vec![r(&long)],
        data: None,
    };
    let d = decide(ID, &env, &all(&env), &attempt, &policy(), at(&env, 1));
    let stored = d.envelope.recipients[0].last_reply.clone().unwrap();
    assert!(!stored.text.contains('\r'));
    assert!(stored.text.len() <= poolrelay_smtp::reply::MAX_REPLY_TEXT);
}

// --- removal and retry ------------------------------------------------------

#[test]
fn a_message_with_every_recipient_done_is_removed() {
    let env = envelope("s@x.test", 2);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["250 ok", "550 5.1.1 no"], Some("250 ok")),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(d.next, Next::Remove);
}

#[test]
fn a_partly_delivered_message_is_retried_for_the_rest_only() {
    let env = envelope("s@x.test", 3);
    let first = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["250 ok", "451 4.3.0 later", "250 ok"], Some("250 ok")),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(first.envelope.pending_indexes(), vec![1]);
    let retry = first.envelope.pending_indexes();
    let second = decide(
        ID,
        &first.envelope,
        &retry,
        &answered(&["250 ok"], Some("250 ok")),
        &policy(),
        at(&env, 2 * MIN),
    );
    assert_eq!(states(&second), [D, D, D]);
    assert_eq!(second.next, Next::Remove);
    assert_eq!(
        second.summary.delivered, 1,
        "only the pending one was sent again"
    );
}

#[test]
fn retries_follow_the_schedule_and_its_last_step_repeats() {
    let p = policy();
    let expected = [60_000u64, 300_000, 900_000, 900_000, 900_000];
    let mut env = envelope("s@x.test", 1);
    let mut now = at(&env, 0);
    for (n, step) in expected.iter().enumerate() {
        let d = decide(
            ID,
            &env,
            &all(&env),
            &answered(&["451 4.3.0 later"], None),
            &p,
            now,
        );
        let Next::RetryAt(due) = d.next else {
            panic!("attempt {n}: {:?}", d.next)
        };
        let wait = due - now;
        assert!(
            wait >= step - step / 10 && wait <= step + step / 10,
            "attempt {n}: waited {wait} for a step of {step}"
        );
        assert_eq!(d.envelope.attempts, n as u32 + 1);
        assert_eq!(d.envelope.next_attempt_ms, due);
        env = d.envelope;
        now = due;
    }
}

#[test]
fn retry_jitter_stays_within_ten_percent_and_spreads_messages() {
    let p = policy();
    let delays: std::collections::BTreeSet<u64> =
        (0..50u64).map(|id| retry_delay(&p, 1, id << 16)).collect();
    assert!(delays.iter().all(|&d| (54_000..=66_000).contains(&d)));
    assert!(delays.len() > 10, "jitter spreads a burst: {delays:?}");
    assert_eq!(
        retry_delay(&p, 1, 7),
        retry_delay(&p, 1, 7),
        "deterministic"
    );
}

#[test]
fn an_empty_schedule_waits_a_minute() {
    let p = Policy {
        retry: &[],
        ..policy()
    };
    let d = retry_delay(&p, 3, 1);
    assert!((54_000..=66_000).contains(&d));
}

#[test]
fn a_deferral_counts_as_an_attempt() {
    let env = envelope("s@x.test", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["421 4.4.2 bye"], None),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(d.envelope.attempts, 1);
    assert!(d.summary.counted);
}

// --- every host down ----------------------------------------------------------

#[test]
fn an_attempt_that_found_every_host_down_does_not_count() {
    let mut env = envelope("s@x.test", 2);
    env.attempts = 3;
    let d = decide(
        ID,
        &env,
        &all(&env),
        &no_connection(true),
        &policy(),
        at(&env, MIN),
    );
    assert_eq!(d.next, Next::Requeue);
    assert_eq!(d.envelope, env, "nothing to write");
    assert!(!d.summary.counted);
    assert_eq!(d.summary.attempt, 3);
    assert_eq!(d.summary.deferred, 2);
    assert!(d.reports.is_empty());
}

#[test]
fn a_failed_connection_to_a_host_still_up_counts_and_defers() {
    let env = envelope("s@x.test", 2);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &no_connection(false),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(d.envelope.attempts, 1);
    assert!(matches!(d.next, Next::RetryAt(_)));
    let reply = d.envelope.recipients[0].last_reply.clone().unwrap();
    assert_eq!(reply.status(), "4.4.1");
    assert!(reply.text.contains("refused"));
}

#[test]
fn a_message_whose_hosts_are_never_reachable_still_expires() {
    let p = policy();
    let env = envelope("s@x.test", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &no_connection(true),
        &p,
        at(&env, 5 * 86_400_000),
    );
    assert_eq!(d.summary.outcome, Outcome::Expired);
    assert_eq!(d.next, Next::Remove);
    assert_eq!(d.reports.len(), 1);
    assert_eq!(
        d.envelope.recipients[0]
            .last_reply
            .as_ref()
            .map(Reply::status),
        Some("4.4.7".to_string())
    );
}

// --- max_age ------------------------------------------------------------------

#[test]
fn past_max_age_pending_recipients_bounce_with_4_4_7() {
    let env = envelope("s@x.test", 2);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["250 ok", "451 4.3.0 later"], Some("250 ok")),
        &policy(),
        at(&env, 6 * 86_400_000),
    );
    assert_eq!(states(&d), [D, B]);
    assert_eq!(d.summary.outcome, Outcome::Expired);
    assert_eq!(d.summary.bounced, 1);
    let reply = d.envelope.recipients[1].last_reply.clone().unwrap();
    assert_eq!(reply.status(), "4.4.7");
    assert!(
        reply.text.contains("451 4.3.0 later"),
        "keeps the last reply: {reply}"
    );
    assert_eq!(
        d.reports,
        vec![Report {
            action: Action::Failed,
            recipients: vec![1]
        }]
    );
    assert_eq!(d.next, Next::Remove);
}

#[test]
fn just_before_max_age_a_message_is_still_retried() {
    let env = envelope("s@x.test", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["451 4.3.0 later"], None),
        &policy(),
        at(&env, 5 * 86_400_000 - 1),
    );
    assert_eq!(d.summary.outcome, Outcome::Deferred);
    assert!(matches!(d.next, Next::RetryAt(_)));
}

#[test]
fn a_delivered_message_past_max_age_is_not_expired() {
    let env = envelope("s@x.test", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["250 ok"], Some("250 ok")),
        &policy(),
        at(&env, 6 * 86_400_000),
    );
    assert_eq!(d.summary.outcome, Outcome::Delivered);
    assert!(d.reports.is_empty());
}

#[test]
fn the_pool_max_age_is_the_one_applied() {
    let p = Policy {
        max_age: Duration::from_secs(60),
        ..policy()
    };
    let env = envelope("s@x.test", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["451 4.3.0 x"], None),
        &p,
        at(&env, 61_000),
    );
    assert_eq!(d.summary.outcome, Outcome::Expired);
}

// --- DSNs -------------------------------------------------------------------------

#[test]
fn a_failure_dsn_names_exactly_the_recipients_bounced_now() {
    let mut env = envelope("s@x.test", 4);
    env.recipients[3].state = RecipientState::Bounced; // bounced by an earlier attempt
    let d = decide(
        ID,
        &env,
        &[0, 1, 2],
        &answered(&["550 5.1.1 a", "250 ok", "550 5.1.1 c"], Some("250 ok")),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(
        d.reports,
        vec![Report {
            action: Action::Failed,
            recipients: vec![0, 2]
        }]
    );
}

#[test]
fn mail_from_the_null_sender_is_never_bounced() {
    let env = envelope("", 2);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["550 5.1.1 no", "550 5.1.1 no"], None),
        &policy(),
        at(&env, 1),
    );
    assert!(d.reports.is_empty());
    assert!(d.summary.bounce_dropped);
    assert_eq!(d.next, Next::Remove);
}

#[test]
fn an_expired_message_from_the_null_sender_is_dropped_without_a_dsn() {
    let env = envelope("", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &no_connection(true),
        &policy(),
        at(&env, 6 * 86_400_000),
    );
    assert!(d.reports.is_empty());
    assert!(d.summary.bounce_dropped);
    assert_eq!(d.next, Next::Remove);
}

#[test]
fn delivered_mail_gets_no_dsn() {
    let env = envelope("s@x.test", 2);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["250 ok", "250 ok"], Some("250 ok")),
        &policy(),
        at(&env, 1),
    );
    assert!(d.reports.is_empty());
    assert!(!d.summary.bounce_dropped);
}

fn warning_policy() -> Policy<'static> {
    Policy {
        delay_warning: Some(Duration::from_secs(4 * 3600)),
        ..policy()
    }
}

#[test]
fn a_delayed_dsn_is_sent_once_the_message_is_older_than_delay_warning() {
    let env = envelope("s@x.test", 2);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["250 ok", "451 4.3.0 later"], Some("250 ok")),
        &warning_policy(),
        at(&env, 4 * 3_600_000),
    );
    assert_eq!(
        d.reports,
        vec![Report {
            action: Action::Delayed,
            recipients: vec![1]
        }]
    );
    assert!(d.envelope.delay_warned);
}

#[test]
fn at_most_one_delayed_dsn_per_message() {
    let env = envelope("s@x.test", 1);
    let p = warning_policy();
    let first = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["451 4.3.0 x"], None),
        &p,
        at(&env, 5 * 3_600_000),
    );
    assert_eq!(first.reports.len(), 1);
    let second = decide(
        ID,
        &first.envelope,
        &all(&first.envelope),
        &answered(&["451 4.3.0 x"], None),
        &p,
        at(&env, 6 * 3_600_000),
    );
    assert!(second.reports.is_empty());
}

#[test]
fn no_delayed_dsn_before_delay_warning_or_without_it() {
    let env = envelope("s@x.test", 1);
    let early = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["451 4.3.0 x"], None),
        &warning_policy(),
        at(&env, 3_600_000),
    );
    assert!(early.reports.is_empty());
    assert!(!early.envelope.delay_warned);
    let off = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["451 4.3.0 x"], None),
        &policy(),
        at(&env, 86_400_000),
    );
    assert!(off.reports.is_empty());
}

#[test]
fn no_delayed_dsn_for_a_message_finished_by_this_attempt() {
    let env = envelope("s@x.test", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["250 ok"], Some("250 ok")),
        &warning_policy(),
        at(&env, 5 * 3_600_000),
    );
    assert!(d.reports.is_empty());
}

#[test]
fn no_delayed_dsn_to_the_null_sender() {
    let env = envelope("", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["451 4.3.0 x"], None),
        &warning_policy(),
        at(&env, 5 * 3_600_000),
    );
    assert!(d.reports.is_empty());
    assert!(
        d.envelope.delay_warned,
        "decided once, not on every attempt"
    );
}

#[test]
fn an_uncounted_attempt_sends_no_delayed_dsn() {
    let env = envelope("s@x.test", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &no_connection(true),
        &warning_policy(),
        at(&env, 5 * 3_600_000),
    );
    assert!(d.reports.is_empty());
}

#[test]
fn a_bounce_and_a_delay_warning_can_be_due_together() {
    let env = envelope("s@x.test", 2);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["550 5.1.1 no", "451 4.3.0 later"], None),
        &warning_policy(),
        at(&env, 5 * 3_600_000),
    );
    assert_eq!(
        d.reports,
        vec![
            Report {
                action: Action::Failed,
                recipients: vec![0]
            },
            Report {
                action: Action::Delayed,
                recipients: vec![1]
            },
        ]
    );
}

// --- too many recipients -------------------------------------------------------

#[test]
fn recipients_refused_as_too_many_are_sent_again_at_once() {
    let env = envelope("s@x.test", 4);
    let now = at(&env, 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(
            &[
                "250 ok",
                "250 ok",
                "452 4.5.3 too many recipients",
                "452 4.5.3 too many recipients",
            ],
            Some("250 ok"),
        ),
        &policy(),
        now,
    );
    assert_eq!(d.next, Next::RetryAt(now));
    assert_eq!(d.envelope.pending_indexes(), vec![2, 3]);
    assert_eq!(
        d.envelope.attempts, 0,
        "a full transaction does not spend a retry step"
    );
}

#[test]
fn too_many_recipients_with_nothing_accepted_waits_for_the_schedule() {
    let env = envelope("s@x.test", 2);
    let now = at(&env, 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["452 4.5.3 too many", "452 4.5.3 too many"], None),
        &policy(),
        now,
    );
    assert!(matches!(d.next, Next::RetryAt(due) if due > now + 50_000));
    assert_eq!(d.envelope.attempts, 1);
}

#[test]
fn too_many_recipients_beside_another_deferral_waits_for_the_schedule() {
    let env = envelope("s@x.test", 3);
    let now = at(&env, 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(
            &["250 ok", "451 4.3.0 later", "452 4.5.3 too many"],
            Some("250 ok"),
        ),
        &policy(),
        now,
    );
    assert!(matches!(d.next, Next::RetryAt(due) if due > now + 50_000));
}

#[test]
fn a_plain_452_is_insufficient_storage_not_too_many_recipients() {
    let env = envelope("s@x.test", 2);
    let now = at(&env, 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(
            &["250 ok", "452 4.3.1 insufficient storage"],
            Some("250 ok"),
        ),
        &policy(),
        now,
    );
    assert!(matches!(d.next, Next::RetryAt(due) if due > now + 50_000));
}

// --- status words and odd inputs ------------------------------------------------------

#[test]
fn outcome_words_are_the_metric_words() {
    assert_eq!(Outcome::Delivered.as_str(), "delivered");
    assert_eq!(Outcome::Deferred.as_str(), "deferred");
    assert_eq!(Outcome::Bounced.as_str(), "bounced");
    assert_eq!(Outcome::Expired.as_str(), "expired");
}

#[test]
fn recipients_already_done_are_never_changed() {
    let mut env = envelope("s@x.test", 2);
    env.recipients[0].state = RecipientState::Delivered;
    let d = decide(
        ID,
        &env,
        &[0, 1],
        &answered(&["550 5.1.1 no", "250 ok"], Some("250 ok")),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(states(&d), [D, D]);
    assert!(d.reports.is_empty());
}

#[test]
fn fewer_replies_than_recipients_leave_the_rest_pending() {
    let env = envelope("s@x.test", 3);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["250 ok"], Some("250 ok")),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(states(&d), [D, P, P]);
    assert!(matches!(d.next, Next::RetryAt(_)));
}

#[test]
fn an_accepted_rcpt_without_a_data_reply_is_transient() {
    let env = envelope("s@x.test", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["250 ok"], None),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(states(&d), [P]);
}

#[test]
fn a_reply_with_an_enhanced_code_of_another_class_keeps_its_basic_class() {
    let env = envelope("s@x.test", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["450 5.1.1 odd"], None),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(states(&d), [P]);
    assert_eq!(
        d.envelope.recipients[0]
            .last_reply
            .as_ref()
            .map(Reply::status),
        Some("4.0.0".into())
    );
}

#[test]
fn the_host_of_the_attempt_is_reported() {
    assert_eq!(answered(&[], None).host(), "up.test:25");
    assert_eq!(no_connection(true).host(), "up.test:25");
}

#[test]
fn ret_and_dsn_parameters_are_carried_unchanged() {
    let mut env = envelope("s@x.test", 1);
    env.ret = Some(Ret::Headers);
    env.envid = Some("E1".into());
    env.recipients[0].notify = 2;
    env.recipients[0].orcpt = Some("rfc822;o@x".into());
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["451 4.3.0 x"], None),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(d.envelope.ret, Some(Ret::Headers));
    assert_eq!(d.envelope.envid.as_deref(), Some("E1"));
    assert_eq!(d.envelope.recipients[0].notify, 2);
    assert_eq!(
        d.envelope.recipients[0].orcpt.as_deref(),
        Some("rfc822;o@x")
    );
}

#[test]
fn a_removed_message_keeps_its_final_states_for_the_dsn() {
    let env = envelope("s@x.test", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["550 5.1.1 gone"], None),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(d.next, Next::Remove);
    assert_eq!(d.envelope.recipients[0].state, RecipientState::Bounced);
    assert_eq!(
        d.envelope.recipients[0].last_reply,
        Some(r("550 5.1.1 gone"))
    );
}

#[test]
fn a_421_to_rcpt_defers_that_recipient() {
    let env = envelope("s@x.test", 2);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["250 ok", "421 4.3.2 closing"], Some("250 ok")),
        &policy(),
        at(&env, 1),
    );
    assert_eq!(states(&d), [D, P]);
}

#[test]
fn clock_before_acceptance_is_treated_as_age_zero() {
    let env = envelope("s@x.test", 1);
    let d = decide(
        ID,
        &env,
        &all(&env),
        &answered(&["451 4.3.0 x"], None),
        &policy(),
        0,
    );
    assert_eq!(d.summary.outcome, Outcome::Deferred);
}
