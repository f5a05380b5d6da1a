//! The operator sees priorities: `queue summary` shows each pool's,
//! `queue list` and `queue show` each message's (its pool's), in the
//! tables and in the admin API's JSON.

use poolrelay_tests::Sink;
use poolrelay_tests::admin::{api_json, api_post, json_of, pool_entry, queue_ok};
use poolrelay_tests::priority::{BULK_FROM, RCPT, URGENT_FROM, shared_upstream_relay};
use serde_json::Value;

/// The whitespace-separated fields of the first line of `text` whose first
/// field is `first`.
fn row<'a>(text: &'a str, first: &str) -> Vec<&'a str> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row starting with {first:?} in:\n{text}"))
}

#[test]
fn queue_summary_list_and_show_give_the_priority() {
    let sink = Sink::start();
    let relay = shared_upstream_relay(&sink, 0);
    api_post(&relay, "/api/v1/pools/A/hold");
    api_post(&relay, "/api/v1/pools/B/hold");
    let urgent = relay.send_tagged(URGENT_FROM, &[RCPT], "urgent-view");
    relay.send_tagged(BULK_FROM, &[RCPT], "bulk-view");

    let pools = api_json(&relay, "/api/v1/pools");
    assert_eq!(pool_entry(&pools, "B")["priority"], 5, "{pools:#}");
    assert_eq!(pool_entry(&pools, "A")["priority"], 0, "{pools:#}");

    let table = queue_ok(&relay, &["summary"]).stdout;
    let header = row(&table, "POOL");
    let prio = header
        .iter()
        .position(|h| *h == "PRIO")
        .unwrap_or_else(|| panic!("no PRIO column in queue summary:\n{table}"));
    assert_eq!(row(&table, "B")[prio], "5", "{table}");
    assert_eq!(row(&table, "A")[prio], "0", "{table}");

    let listed = json_of(&queue_ok(&relay, &["list", "--json"]), "queue list --json");
    let by_pool = |pool: &str| -> Vec<Value> {
        listed
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["pool"] == pool)
            .cloned()
            .collect()
    };
    assert_eq!(by_pool("B").len(), 1, "{listed:#}");
    assert_eq!(by_pool("B")[0]["priority"], 5, "{listed:#}");
    assert_eq!(by_pool("A")[0]["priority"], 0, "{listed:#}");

    let table = queue_ok(&relay, &["list", "--pool", "B"]).stdout;
    let header = row(&table, "QUEUE");
    // "QUEUE ID" is two words in the heading, one in the rows.
    let prio = header
        .iter()
        .position(|h| *h == "PRIO")
        .unwrap_or_else(|| panic!("no PRIO column in queue list:\n{table}"))
        - 1;
    assert_eq!(row(&table, &urgent.queue_id)[prio], "5", "{table}");

    let shown = json_of(&queue_ok(&relay, &["show", &urgent.queue_id]), "queue show");
    assert_eq!(shown["priority"], 5, "{shown:#}");
}
