//! Fixtures shared by the operating tests (`tests/tests/{metrics,
//! deploy_files,queue_ops,reload,shutdown,admin_api}.rs`): a two-pool
//! relay, a deferred message, and the timings they wait with.

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::admin::wait_deferred;
use crate::ports::free_addr;
use crate::prometheus::{Sample, metric_sum, parse_metrics};
use crate::relay::{Relay, RelaySetup, Sent};
use crate::sink::{Sink, SinkOptions};

/// How long a message gets to reach its sink.
pub const DELIVERY: Duration = Duration::from_secs(30);
/// How long a CLI call or promtool run may take.
pub const COMMAND: Duration = Duration::from_secs(30);
/// The relay's grace period on SIGTERM (`GRACE` in crates/poolrelay/src/main.rs).
pub const GRACE: Duration = Duration::from_secs(20);
/// What the process gets on top of the grace period to exit.
pub const EXIT_MARGIN: Duration = Duration::from_secs(10);
/// The recipient of every operating test message.
pub const RCPT: &str = "member@example.test";

/// Pools A and B. A's upstream `a` also serves `-`; B has its own upstream
/// `b`; `owner-b@*` routes to B, other `owner-*` senders go to A (the list
/// pool). `extra` is appended (more pools, upstreams, routes).
pub fn two_pools(s: &RelaySetup, a: SocketAddr, b: SocketAddr, retry: &str, extra: &str) -> String {
    format!(
        "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"{retry}\"]\n\n\
         [pool.A]\ndescription = \"list postings\"\n[pool.B]\ndescription = \"emergency\"\n\n\
         [[upstream]]\nhost = \"{a}\"\npools = [\"A\", \"-\"]\n\n\
         [[upstream]]\nhost = \"{b}\"\npools = [\"B\"]\n\n\
         [[route]]\npool = \"B\"\nsender = \"owner-b@*\"\n\n{extra}",
        s.head(),
        s.listener("")
    )
}

/// Pools A, B and H; H's mail goes through A's upstream, `-` has its own
/// (so a DSN is seen apart from the mail).
pub fn held_pool_config(s: &RelaySetup, a: SocketAddr, b: SocketAddr, dash: SocketAddr) -> String {
    format!(
        "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n\
         [pool.A]\n[pool.B]\n[pool.H]\n\n\
         [[upstream]]\nhost = \"{a}\"\npools = [\"A\", \"H\"]\n\n\
         [[upstream]]\nhost = \"{b}\"\npools = [\"B\"]\n\n\
         [[upstream]]\nhost = \"{dash}\"\npools = [\"-\"]\n\n\
         [[route]]\npool = \"H\"\nsender = \"owner-h@*\"\n",
        s.head(),
        s.listener("")
    )
}

/// Sends one message from `from` to [`RCPT`]; panics unless 250 with a queue id.
pub fn send(relay: &Relay, from: &str, tag: &str) -> Sent {
    relay.send_tagged(from, &[RCPT], tag)
}

/// Pool A's upstream answers 451 to every message (retry in 1 h); the
/// message `tag` is sent and waits deferred. Returns the relay, the
/// upstream's address (to start an accepting sink there later), the
/// refusing sink and the message.
pub fn deferred_setup(tag: &str) -> (Relay, SocketAddr, Sink, Sent) {
    let upstream = free_addr();
    let refusing = Sink::start_with(SinkOptions {
        addr: Some(upstream),
        reply: Some(451),
        ..SinkOptions::default()
    });
    let relay = Relay::start(|s| {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1h\"]\n\n[pool.A]\n\n\
             [[upstream]]\nhost = \"{upstream}\"\npools = [\"A\", \"-\"]\n",
            s.head(),
            s.listener("")
        )
    });
    let sent = send(&relay, "owner-lista@lists.test", tag);
    let m = wait_deferred(&relay, "A", &sent.queue_id, "451", DELIVERY);
    assert!(
        m["next_attempt_in_seconds"].as_f64().unwrap_or(0.0) > 600.0,
        "the deferred message should wait an hour: {m:#}"
    );
    (relay, upstream, refusing, sent)
}

/// Scrapes /metrics and parses it.
pub fn samples(relay: &Relay) -> Vec<Sample> {
    parse_metrics(&relay.scrape())
}

/// The sum of the matching samples, 0 when there is none.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(samples, name, labels).unwrap_or(0.0)
}

/// The Message-IDs at a sink, as a set.
pub fn ids_at(sink: &Sink) -> BTreeSet<String> {
    sink.message_ids().into_iter().collect()
}

/// A file's text; panics naming the file.
pub fn read_file(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}
