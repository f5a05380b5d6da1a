//! Many concurrent clients: every accepted message arrives exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use poolrelay_tests::{Relay, Sink, SmtpClient, message, unique_id};

const THREADS: usize = 10;
const PER_THREAD: usize = 10;

#[test]
fn hundred_messages_from_ten_concurrent_clients_arrive_exactly_once() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    let addr = relay.smtp_addr();

    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || -> Result<Vec<String>, String> {
                let mut client =
                    SmtpClient::connect(addr).map_err(|e| format!("client {t}: connect: {e}"))?;
                let mut sent = Vec::new();
                for i in 0..PER_THREAD {
                    let id = unique_id(&format!("conc-{t}-{i}"));
                    let from = format!("owner-list{t}@lists.test");
                    let rcpt = format!("member{i}@example.test");
                    let msg = message(
                        &id,
                        &from,
                        &rcpt,
                        &format!("client {t} message {i}"),
                        "hello",
                    );
                    let reply = client
                        .send_mail(&from, &[&rcpt], &msg)
                        .map_err(|e| format!("client {t} message {i}: {e}"))?;
                    if reply.code != 250 {
                        return Err(format!("client {t} message {i}: final dot got {reply}"));
                    }
                    sent.push(id);
                }
                client.quit();
                Ok(sent)
            })
        })
        .collect();

    let mut sent = BTreeSet::new();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(ids)) => sent.extend(ids),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("a client thread panicked".to_string()),
        }
    }
    assert!(
        errors.is_empty(),
        "not every message got its 250:\n{}\n{}",
        errors.join("\n"),
        relay.logs()
    );
    assert_eq!(
        sent.len(),
        THREADS * PER_THREAD,
        "distinct Message-IDs sent"
    );

    let total = THREADS * PER_THREAD;
    relay.wait_until(
        &format!("{total} messages at the sink"),
        Duration::from_secs(60),
        || sink.count() >= total,
    );

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for id in sink.message_ids() {
        *counts.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let arrived: BTreeSet<String> = counts.keys().cloned().collect();
    let missing: Vec<_> = sent.difference(&arrived).collect();
    let unexpected: Vec<_> = arrived.difference(&sent).collect();
    assert!(
        twice.is_empty() && missing.is_empty() && unexpected.is_empty(),
        "delivered more than once: {twice:?}\nmissing: {missing:?}\nnever sent: {unexpected:?}\n{}",
        relay.logs()
    );
}
