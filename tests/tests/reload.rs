//! Reload on SIGHUP and via `poolrelay reload` (README.md, "Operating" >
//! "Reload and shutdown"): a good config applies, a broken one is refused
//! and the old one keeps running.

use std::time::Duration;

use poolrelay_tests::admin::{queue_ok, queued_message};
use poolrelay_tests::operating::{COMMAND, DELIVERY, ids_at, send, two_pools};
use poolrelay_tests::{Relay, Sink, http_get, poolrelay};

// Reload

const NEW_ROUTE: &str = "\n[[route]]\npool = \"B\"\nsender = \"owner-new@*\"\n";

#[test]
fn sighup_with_a_new_route_sends_new_mail_to_the_new_pool() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let mut relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    let before = send(&relay, "owner-new@lists.test", "before-hup");
    sink_a.wait_for_message_id(&before.message_id, DELIVERY);

    relay.append_config(NEW_ROUTE);
    relay.signal_and_wait_for_log("HUP", "SIGHUP: reloaded");
    let after = send(&relay, "owner-new@lists.test", "after-hup");
    sink_b.wait_for_message_id(&after.message_id, DELIVERY);
    assert!(
        !ids_at(&sink_a).contains(&after.message_id),
        "after the reload the new route's mail also went to A"
    );
    // The rest of the config still holds.
    let a = send(&relay, "owner-lista@lists.test", "after-hup-a");
    sink_a.wait_for_message_id(&a.message_id, DELIVERY);
    assert!(
        relay.wait_exit(Duration::ZERO).is_none(),
        "the relay exited"
    );
}

#[test]
fn sighup_with_a_broken_config_keeps_the_old_one_running() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let mut relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    let good = relay.config_text();

    // Not TOML at all.
    relay.write_config(&format!("{good}\nthis is not toml\n"));
    relay.signal_and_wait_for_log("HUP", "SIGHUP: reload refused");
    // Valid TOML, invalid config: a route to an undeclared pool.
    relay.write_config(&format!(
        "{good}\n[[route]]\npool = \"NOPE\"\nsender = \"owner-new@*\"\n"
    ));
    relay.signal_and_wait_for_log("HUP", "SIGHUP: reload refused");
    let log = relay.log_text();
    assert!(
        log.contains("NOPE"),
        "the refusal should say what is wrong (the unknown pool NOPE)\n{}",
        relay.logs()
    );

    assert!(
        relay.wait_exit(Duration::ZERO).is_none(),
        "the relay exited\n{}",
        relay.logs()
    );
    let b = send(&relay, "owner-b@lists.test", "broken-b");
    let a = send(&relay, "owner-new@lists.test", "broken-a");
    sink_b.wait_for_message_id(&b.message_id, DELIVERY);
    sink_a.wait_for_message_id(&a.message_id, DELIVERY);
    let r = http_get(relay.admin_addr(), "/readyz").unwrap_or_else(|e| panic!("/readyz: {e}"));
    assert_eq!(r.status, 200, "/readyz after a refused reload: {r}");
}

#[test]
fn reload_cli_applies_a_new_config_via_the_api_and_refuses_a_broken_one() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    let url = relay.admin_url();

    relay.append_config(NEW_ROUTE);
    let out = poolrelay(&["reload", "--admin", &url], COMMAND);
    assert!(
        out.status.success() && out.stdout.contains("reloaded"),
        "poolrelay reload:\n{out}\n{}",
        relay.logs()
    );
    let routed = send(&relay, "owner-new@lists.test", "cli-reload");
    sink_b.wait_for_message_id(&routed.message_id, DELIVERY);

    let good = relay.config_text();
    relay.write_config(&format!("{good}\nthis is not toml\n"));
    let out = poolrelay(&["reload", "--admin", &url], COMMAND);
    assert_eq!(
        out.status.code(),
        Some(1),
        "poolrelay reload of a broken config should exit 1:\n{out}"
    );
    assert!(
        out.stderr.contains("refused"),
        "poolrelay reload should say the reload was refused:\n{out}"
    );
    // The last good config (with the new route) still runs.
    let still = send(&relay, "owner-new@lists.test", "cli-reload-kept");
    sink_b.wait_for_message_id(&still.message_id, DELIVERY);
    assert_eq!(sink_a.count(), 0, "{:?}", sink_a.message_ids());
}

#[test]
fn reload_refuses_to_drop_a_pool_that_still_holds_mail() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let mut relay = Relay::start(|s| two_pools(s, sink_a.addr(), sink_b.addr(), "1s", ""));
    queue_ok(&relay, &["hold", "--pool", "B"]);
    let held = send(&relay, "owner-b@lists.test", "orphan");
    let good = relay.config_text();
    // The same config without pool B, its upstream and its route.
    let without_b = good
        .replace("[pool.B]\ndescription = \"emergency\"\n", "")
        .replace(
            &format!(
                "[[upstream]]\nhost = \"{}\"\npools = [\"B\"]\n",
                sink_b.addr()
            ),
            "",
        )
        .replace("[[route]]\npool = \"B\"\nsender = \"owner-b@*\"\n", "");
    assert!(
        !without_b.contains("\"B\""),
        "test bug: B left in\n{without_b}"
    );
    relay.write_config(&without_b);
    relay.signal_and_wait_for_log("HUP", "SIGHUP: reload refused");
    assert!(
        queued_message(&relay, "B", &held.queue_id).is_some(),
        "the held message of pool B is gone after the refused reload\n{}",
        relay.logs()
    );
    relay.write_config(&good);
    queue_ok(&relay, &["release", "--pool", "B"]);
    sink_b.wait_for_message_id(&held.message_id, DELIVERY);
}
