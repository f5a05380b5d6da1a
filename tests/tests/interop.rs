//! Interoperability with an independent SMTP implementation: Postfix's
//! `smtp-source` as the client and `smtp-sink` as the upstream.

use std::collections::BTreeSet;
use std::time::Duration;

use poolrelay_tests::{PostfixSink, Relay, metric_sum, parse_metrics, smtp_source};

const MESSAGES: usize = 2000;
const SESSIONS: usize = 10;

#[test]
fn postfix_smtp_source_through_relay_to_postfix_smtp_sink_delivers_all_2000() {
    let upstream = PostfixSink::start();
    let relay = Relay::start(|s| s.single_upstream(upstream.addr(), ""));

    let sessions = SESSIONS.to_string();
    let count = MESSAGES.to_string();
    let out = smtp_source(
        &[
            "-s",
            &sessions,
            "-m",
            &count,
            "-f",
            "owner-biglist@lists.test",
            "-t",
            "member@example.test",
        ],
        relay.smtp_addr(),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "smtp-source into the relay failed:\n{out}\n{}",
        relay.logs()
    );

    upstream.wait_for_distinct(MESSAGES, Duration::from_secs(120));
    // A duplicate may arrive after the last new message: count only once
    // the relay has nothing left to deliver and every dump is complete.
    relay.wait_until(
        "the relay's queue to be empty and every recipient reported delivered",
        Duration::from_secs(60),
        || {
            let m = parse_metrics(&relay.scrape());
            metric_sum(&m, "poolrelay_queue_messages", &[]) == Some(0.0)
                && metric_sum(&m, "poolrelay_delivered_recipients_total", &[])
                    .is_some_and(|n| n >= MESSAGES as f64)
        },
    );
    let ids = upstream.wait_for_complete_dumps(Duration::from_secs(30));
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), MESSAGES, "distinct messages at smtp-sink");
    assert_eq!(
        ids.len(),
        distinct.len(),
        "{} of {} arrivals at smtp-sink were duplicates",
        ids.len() - distinct.len(),
        ids.len()
    );
    let sample = upstream.messages();
    let first = sample
        .first()
        .unwrap_or_else(|| panic!("smtp-sink dumped no readable message"));
    assert!(
        first.mail_args.starts_with("<owner-biglist@lists.test>"),
        "envelope sender at smtp-sink: {:?}",
        first.mail_args
    );
    assert_eq!(
        first.rcpt_args.len(),
        1,
        "recipients at smtp-sink: {:?}",
        first.rcpt_args
    );
    assert!(
        first.rcpt_args[0].starts_with("<member@example.test>"),
        "recipient at smtp-sink: {:?}",
        first.rcpt_args
    );
}
