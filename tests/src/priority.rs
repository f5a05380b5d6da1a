//! Helpers for the priority tests (`tests/tests/priority_*.rs`): a relay
//! whose one upstream serves an urgent pool B (priority 5) and a bulk pool
//! A (priority 0) through a slow sink, a backlog of bulk mail, a burst of
//! urgent mail, and when each message reached the sink.

use std::fs;
use std::time::{Duration, SystemTime};

use crate::admin::{api_post, queued_in};
use crate::listserv::bulk_send;
use crate::mail::{message, unique_id};
use crate::relay::Relay;
use crate::sink::{Sink, SinkOptions, parse_sink_file};

/// How long the sink holds each message before answering its final dot:
/// the time of one bulk transaction, give or take the relay's own work.
pub const SINK_DELAY_MS: u64 = 50;
/// Envelope sender of bulk mail (pool A).
pub const BULK_FROM: &str = "bulk@lists.example.org";
/// Envelope sender of urgent mail (pool B).
pub const URGENT_FROM: &str = "urgent@alerts.example.org";
/// The recipient of every message.
pub const RCPT: &str = "member@example.net";

/// The slow sink.
pub fn slow_sink() -> Sink {
    Sink::start_with(SinkOptions {
        delay_ms: Some(SINK_DELAY_MS),
        ..SinkOptions::default()
    })
}

/// A relay with one upstream of 2 workers (`reserve_workers` of them kept
/// for pools above priority 0) serving pools A (bulk) and B (priority 5).
pub fn shared_upstream_relay(sink: &Sink, reserve_workers: usize) -> Relay {
    let upstream = sink.addr();
    Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n\
             [pool.A]\ndescription = \"bulk\"\n\
             [pool.B]\ndescription = \"urgent\"\npriority = 5\n\n\
             [[upstream]]\nhost = \"{upstream}\"\nworkers = 2\nreserve_workers = {reserve_workers}\n\
             pools = [\"B\", \"A\"]\n\n\
             [[route]]\npool = \"B\"\nsender = \"urgent@*\"\n\n\
             [[route]]\npool = \"A\"\n",
            s.head(),
            s.listener("")
        )
    })
}

/// Queues `n` bulk messages in pool A while it is held, then releases it,
/// so the whole backlog is there before the first delivery.
pub fn queue_backlog(relay: &Relay, n: usize) {
    api_post(relay, "/api/v1/pools/A/hold");
    let make = |i: usize| {
        message(
            &unique_id(&format!("bulk{i}")),
            BULK_FROM,
            RCPT,
            "bulk",
            "newsletter\n",
        )
    };
    let took = bulk_send(relay.smtp_addr(), 4, n, BULK_FROM, &make);
    relay.wait_until(
        &format!("{n} bulk messages queued in pool A"),
        Duration::from_secs(30),
        || queued_in(relay, "A") as usize >= n,
    );
    eprintln!("{n} bulk messages queued in {took:?}");
    api_post(relay, "/api/v1/pools/A/release");
}

/// One urgent message: its Message-ID and when its 250 was read.
#[derive(Debug, Clone)]
pub struct Urgent {
    /// Message-ID without brackets.
    pub id: String,
    /// When the relay answered 250 to its final dot.
    pub accepted: SystemTime,
}

/// Sends `count` urgent messages `gap` apart, each on its own connection.
pub fn send_burst(relay: &Relay, count: usize, gap: Duration) -> Vec<Urgent> {
    let mut sent = Vec::new();
    for i in 0..count {
        let id = unique_id(&format!("urgent{i}"));
        let text = message(&id, URGENT_FROM, RCPT, "urgent", "evacuate\n");
        let mut client = relay.client();
        let r = client
            .send_mail(URGENT_FROM, &[RCPT], &text)
            .unwrap_or_else(|e| panic!("urgent message {i}: {e}\n{}", relay.logs()));
        // The clock starts at the 250, not after QUIT.
        let accepted = SystemTime::now();
        client.quit();
        assert_eq!(r.code, 250, "urgent message {i}: {r}");
        sent.push(Urgent { id, accepted });
        std::thread::sleep(gap);
    }
    sent
}

/// A message at the sink: its Message-ID, envelope sender and when the
/// sink stored it (after holding it, just before its 250). The time is the
/// file's modification time, which the kernel keeps at its coarse tick: a
/// few milliseconds early at most.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Message-ID without brackets.
    pub id: String,
    /// Envelope sender.
    pub from: String,
    /// The file's modification time.
    pub at: SystemTime,
}

/// Every message at `sink`, in no particular order.
pub fn arrivals(sink: &Sink) -> Vec<Arrival> {
    let mut out = Vec::new();
    for entry in fs::read_dir(sink.dir()).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "eml") {
            continue;
        }
        let (Ok(bytes), Ok(meta)) = (fs::read(&path), entry.metadata()) else {
            continue;
        };
        let m = parse_sink_file(&path, &bytes);
        out.push(Arrival {
            id: m.message_id().unwrap_or_default(),
            from: m.from,
            at: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    out
}

/// For each urgent message, the time from its 250 to its arrival; None for
/// one that has not arrived.
pub fn latencies(sent: &[Urgent], arrived: &[Arrival]) -> Vec<Option<Duration>> {
    sent.iter()
        .map(|u| {
            arrived
                .iter()
                .find(|a| a.id == u.id)
                .map(|a| a.at.duration_since(u.accepted).unwrap_or_default())
        })
        .collect()
}

/// Waits (bounded) until every message of `sent` reached the sink;
/// returns every arrival then (bulk included) and each urgent message's
/// latency from its 250.
pub fn wait_for_burst(
    relay: &Relay,
    sink: &Sink,
    sent: &[Urgent],
) -> (Vec<Arrival>, Vec<Duration>) {
    let mut arrived = Vec::new();
    relay.wait_until(
        "every urgent message at the sink",
        Duration::from_secs(30),
        || {
            arrived = arrivals(sink);
            latencies(sent, &arrived).iter().all(Option::is_some)
        },
    );
    let took = latencies(sent, &arrived).into_iter().flatten().collect();
    (arrived, took)
}

/// p50, p99 and max of `values` (nearest rank).
pub fn percentiles(values: &[Duration]) -> (Duration, Duration, Duration) {
    let mut v = values.to_vec();
    v.sort();
    let rank = |p: f64| {
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    (rank(0.50), rank(0.99), v[v.len() - 1])
}
