//! Isolation survives an outage: in reference configuration 3 pool `-`
//! (command replies, bounces) leaves only through SHAGGY. The import gives
//! the pool `fallback = false`, so while SHAGGY is down that mail waits,
//! counted in `poolrelay_queue_oldest_age_seconds`, and SCOOBY (the site
//! fallback) receives none of it; once SHAGGY is back it is delivered.

use std::time::Duration;

use poolrelay_tests::admin::{api_json, pool_entry, queued_in};
use poolrelay_tests::listserv::{DELIVERY, command_reply, import_for_relay, reference, send};
use poolrelay_tests::operating::{samples, value};
use poolrelay_tests::{Relay, Sink, free_addr};

const HOST: &str = "LISTSERV.EXAMPLE.ORG";

#[test]
fn pool_dash_waits_for_shaggy_while_it_is_down_and_never_leaves_through_scooby() {
    let scooby = Sink::start();
    let scrappy = Sink::start();
    // SHAGGY's address, with nothing listening yet: down.
    let shaggy_addr = free_addr();
    let relay = Relay::start(|setup| {
        import_for_relay(
            &reference("ref3"),
            setup,
            &[
                ("scooby.example.org", scooby.addr()),
                ("scrappy.example.org", scrappy.addr()),
                ("shaggy.example.org", shaggy_addr),
            ],
        )
    });
    assert!(
        relay.config_text().contains("fallback = false"),
        "the import isolates pool \"-\":\n{}",
        relay.config_text()
    );

    let replies = [command_reply(HOST), command_reply(HOST)];
    for m in &replies {
        send(&relay, m);
    }
    // Long enough for several probes of SHAGGY (backoff 1 s, 2 s, ...).
    relay.wait_until("SHAGGY to be marked down", Duration::from_secs(15), || {
        relay.log_text().contains("marking it down")
    });
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        scooby.count(),
        0,
        "pool \"-\" leaked through the site fallback SCOOBY while SHAGGY was down: {:?}\n{}",
        scooby.message_ids(),
        relay.logs()
    );
    assert_eq!(queued_in(&relay, "-"), 2, "the command replies wait");
    let age = value(
        &samples(&relay),
        "poolrelay_queue_oldest_age_seconds",
        &[("pool", "-")],
    );
    assert!(
        age >= 3.0,
        "their wait is counted: poolrelay_queue_oldest_age_seconds{{pool=\"-\"}} = {age}"
    );
    let pools = api_json(&relay, "/api/v1/pools");
    let waiting = pool_entry(&pools, "-")["waiting"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        waiting.contains("shaggy.example.org") && !waiting.contains("scooby"),
        "queue summary says pool \"-\" waits for SHAGGY: {waiting:?}"
    );

    let shaggy = Sink::start_at(shaggy_addr);
    for m in &replies {
        shaggy.wait_for_message_id(&m.id, DELIVERY);
    }
    assert_eq!(scooby.count(), 0, "nothing of pool \"-\" at SCOOBY");
    assert_eq!(scrappy.count(), 0, "nothing of pool \"-\" at SCRAPPY");
}
