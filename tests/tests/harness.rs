//! The harness itself against Postfix's independent test programs, without
//! the poolrelay binary: when these fail, the other tests' failures say
//! nothing about poolrelay.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use poolrelay_tests::{PostfixSink, SmtpClient, message, smtp_source, unique_id};

#[test]
fn harness_client_delivers_to_postfix_smtp_sink() {
    let sink = PostfixSink::start();
    let local = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut c = SmtpClient::connect_from(local, sink.addr())
        .unwrap_or_else(|e| panic!("connect to smtp-sink from {local}: {e}"));
    assert_eq!(c.local_addr().map(|a| a.ip()).ok(), Some(local));
    assert_eq!(c.greeting.code, 220, "greeting {}", c.greeting);
    let id = unique_id("harness");
    let msg = message(
        &id,
        "a@b.test",
        "c@d.test",
        "harness",
        ".leading dot\nline two",
    );
    let r = c
        .send_mail("a@b.test", &["c@d.test", "e@f.test"], &msg)
        .unwrap_or_else(|e| panic!("send to smtp-sink: {e}"));
    assert_eq!(r.code, 250, "final dot: {r}");
    c.quit();
    let ids = sink.wait_for_distinct(1, Duration::from_secs(10));
    assert_eq!(ids, vec![id.clone()]);
    let m = &sink.messages()[0];
    assert_eq!(m.mail_args, "<a@b.test>");
    assert_eq!(
        m.rcpt_args,
        vec!["<c@d.test>".to_string(), "<e@f.test>".to_string()]
    );
    assert!(
        m.raw.contains("\n.leading dot"),
        "dot-unstuffed body at smtp-sink: {:?}",
        m.raw
    );
    assert_eq!(m.header("Subject").as_deref(), Some("harness"));
}

#[test]
fn harness_smtp_source_reaches_postfix_smtp_sink() {
    let sink = PostfixSink::start();
    let out = smtp_source(
        &["-s", "5", "-m", "100", "-f", "a@b.test", "-t", "c@d.test"],
        sink.addr(),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "smtp-source: {out}");
    let ids = sink.wait_for_distinct(100, Duration::from_secs(30));
    assert_eq!(ids.len(), 100, "smtp-sink dump files");
}

#[test]
fn harness_nats_cluster_elects_a_leader_again_after_a_kill_and_restart() {
    let mut cluster = poolrelay_tests::nats::NatsCluster::start(3);
    assert_eq!(cluster.urls().len(), 3);
    cluster.kill9(0);
    cluster.wait_meta_leader(Duration::from_secs(30));
    cluster.restart(0);
    cluster.wait_meta_leader(Duration::from_secs(30));
    cluster.stop(1);
    cluster.wait_meta_leader(Duration::from_secs(30));
}
