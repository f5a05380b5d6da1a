//! One corrupt record in the spool (damaged here with the store's own
//! library while the relay is stopped) must not break its pool: listing and
//! delete-all skip it with a report, and `queue delete ID` removes it.

use std::time::Duration;

use poolrelay_tests::admin::{queue_cli, queue_ok};
use poolrelay_tests::{Relay, Sink};

const DEADLINE: Duration = Duration::from_secs(20);
/// A queue id whose text form is easy to spot.
const BAD_ID: u64 = 0x0000_0100_0000_0001;

#[test]
fn a_corrupt_record_is_listed_skipped_by_delete_all_and_deleted_by_id() {
    let sink = Sink::start();
    // The upstream is held off: pool A keeps its mail.
    let mut relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    queue_ok(&relay, &["hold", "--pool", "A"]);
    let a = relay.send_tagged("owner-list@lists.test", &["m@x.test"], "good-1");
    let b = relay.send_tagged("owner-list@lists.test", &["m@x.test"], "good-2");
    relay.kill9();
    {
        let spool = relay.dir().join("spool");
        let db = fjall::Database::builder(&spool)
            .open()
            .unwrap_or_else(|e| panic!("open the stopped relay's spool: {e}"));
        let ks = db
            .keyspace("env.A", fjall::KeyspaceCreateOptions::default)
            .unwrap_or_else(|e| panic!("keyspace env.A: {e}"));
        ks.insert(
            BAD_ID.to_be_bytes(),
            b"{ this is not an envelope".as_slice(),
        )
        .unwrap_or_else(|e| panic!("insert: {e}"));
        db.persist(fjall::PersistMode::SyncAll)
            .unwrap_or_else(|e| panic!("persist: {e}"));
    }
    relay.restart();
    let bad = format!("{BAD_ID:016X}");

    let listed = queue_ok(&relay, &["list", "--pool", "A"]);
    for id in [&a.queue_id, &b.queue_id, &bad] {
        assert!(
            listed.stdout.contains(id.as_str()),
            "{id} missing from:\n{listed}"
        );
    }
    assert!(listed.stdout.contains("CORRUPT"), "{listed}");

    let out = queue_cli(&relay, &["delete", "--pool", "A", "--all"]);
    assert!(out.stderr.contains("skipped 1 corrupt"), "{out}");
    assert!(out.stderr.contains(&bad), "{out}");
    let listed = queue_ok(&relay, &["list", "--pool", "A"]);
    assert!(!listed.stdout.contains(&a.queue_id), "{listed}");
    assert!(
        listed.stdout.contains(&bad),
        "delete-all must leave the corrupt record: {listed}"
    );

    let out = queue_ok(&relay, &["delete", &bad]);
    assert!(out.stdout.contains("deleted"), "{out}");
    let listed = queue_ok(&relay, &["list", "--pool", "A"]);
    assert!(!listed.stdout.contains(&bad), "{listed}");
    assert!(listed.stdout.contains("-- 0 messages"), "{listed}");
    // The relay still delivers.
    queue_ok(&relay, &["release", "--pool", "A"]);
    let c = relay.send_tagged("owner-list@lists.test", &["m@x.test"], "after");
    sink.wait_for_message_id(&c.message_id, DEADLINE);
}
