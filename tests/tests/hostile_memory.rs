//! Message content in flight is bounded over all sessions
//! (`server.max_data_memory`): a crowd of clients each half-way through a
//! large DATA cannot take the relay's memory. Beyond the budget a message
//! is read to its end, kept nowhere and refused with 452 4.3.1.

use std::io::Write;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use poolrelay_tests::{Relay, Sink, SmtpClient};

const SESSIONS: usize = 100;
/// Content each session has sent when the relay's memory is measured.
const HALF_WAY: usize = 4 << 20;

/// Resident memory of a process, from /proc.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[test]
fn a_hundred_sessions_half_way_through_large_data_stay_within_the_memory_budget() {
    let sink = Sink::start();
    let relay = Relay::start(|s| {
        format!(
            "[server]\nhostname = \"relay.test\"\nspool_dir = \"{}\"\nmax_sessions_per_client = 200\n\
             max_data_memory = \"64MB\"\n\n[admin]\naddress = \"{}\"\n\n{}[defaults]\nlist_pool = \"A\"\n\n\
             [pool.A]\n\n[[upstream]]\nhost = \"{}\"\n",
            s.spool_dir.display(),
            s.admin,
            s.listener("max_message_size = \"50MB\""),
            sink.addr()
        )
    });
    let pid = relay.pid().expect("the relay's pid");
    let before = rss_mib(pid);
    let addr = relay.smtp_addr();
    let half_way = Arc::new(Barrier::new(SESSIONS + 1));
    let measured = Arc::new(Barrier::new(SESSIONS + 1));
    let line = format!("{}\r\n", "y".repeat(998));
    let clients: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let (half_way, measured, line) = (half_way.clone(), measured.clone(), line.clone());
            std::thread::spawn(move || {
                let mut c = SmtpClient::connect(addr).expect("connect");
                c.ehlo();
                let r = c.cmd("MAIL FROM:<owner-list@lists.test>");
                assert!(r.is_positive(), "{r}");
                let r = c.cmd(&format!("RCPT TO:<member{i}@example.test>"));
                assert!(r.is_positive(), "{r}");
                let r = c.cmd("DATA");
                assert_eq!(r.code, 354, "{r}");
                let chunk = line.repeat(64);
                let mut sent = 0;
                c.write_bytes(b"Subject: large\r\n\r\n").expect("header");
                while sent < HALF_WAY {
                    c.write_bytes(chunk.as_bytes()).expect("content");
                    sent += chunk.len();
                }
                half_way.wait();
                measured.wait();
                c.write_bytes(b".\r\n").expect("dot");
                let r = c.read_reply().expect("reply to the dot");
                c.quit();
                r.code
            })
        })
        .collect();
    half_way.wait();
    // Give the relay a moment to read what was written (bounded, then measured).
    std::thread::sleep(Duration::from_millis(500));
    let during = rss_mib(pid);
    measured.wait();
    let codes: Vec<u16> = clients
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect();
    let _ = std::io::stderr().flush();
    assert!(
        during < 200.0,
        "RSS {during:.0} MiB (from {before:.0}) with {SESSIONS} sessions each {} MiB into DATA\n{}",
        HALF_WAY >> 20,
        relay.logs()
    );
    assert!(
        codes.iter().all(|c| *c == 250 || *c == 452),
        "every message is either queued or refused with 452: {codes:?}"
    );
    let refused = codes.iter().filter(|c| **c == 452).count();
    assert!(
        refused > 0,
        "{SESSIONS} × {} MiB cannot fit a 64 MB budget, yet nothing was refused",
        HALF_WAY >> 20
    );
    let accepted = codes.len() - refused;
    assert!(accepted > 0, "some messages fit the budget");
    // The relay still takes mail afterwards: the budget was given back.
    let after = relay.send_tagged("owner-list@lists.test", &["m@example.test"], "after");
    sink.wait_for_message_id(&after.message_id, Duration::from_secs(60));
}
