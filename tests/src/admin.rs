//! The relay's admin API read as JSON, and the `poolrelay queue` CLI run
//! against it, the two ways operators look at and change the queue.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use crate::command::{CommandOutput, poolrelay};
use crate::http::{http_get, http_request, percent_encode};
use crate::relay::Relay;

/// How long a CLI call may take.
pub const CLI_DEADLINE: Duration = Duration::from_secs(30);

/// `GET path` on the admin API, parsed as JSON; panics, with the relay's
/// logs, unless it answers 200 with JSON.
pub fn api_json(relay: &Relay, path: &str) -> Value {
    let r = http_get(relay.admin_addr(), path)
        .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", relay.logs()));
    assert_eq!(r.status, 200, "GET {path}: {r}\n{}", relay.logs());
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {r}"))
}

/// Like [`api_json`], `None` instead of a panic: for polling while the
/// relay may be restarting or the resource may be gone.
pub fn try_api_json(relay: &Relay, path: &str) -> Option<Value> {
    let r = http_get(relay.admin_addr(), path).ok()?;
    if r.status != 200 {
        return None;
    }
    serde_json::from_str(&r.body).ok()
}

/// `POST path` on the admin API (no token); panics unless 2xx.
pub fn api_post(relay: &Relay, path: &str) {
    let r = http_request(relay.admin_addr(), "POST", path, &[])
        .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", relay.logs()));
    assert!(
        (200..300).contains(&r.status),
        "POST {path}: {r}\n{}",
        relay.logs()
    );
}

/// The entry of `pool` in `GET /api/v1/pools` (or `queue summary --json`).
pub fn pool_entry<'a>(pools: &'a Value, pool: &str) -> &'a Value {
    pools
        .as_array()
        .and_then(|a| a.iter().find(|p| p["pool"] == pool))
        .unwrap_or_else(|| panic!("no pool {pool:?} in {pools:#}"))
}

/// Messages of `pool` waiting in the queue (ready + deferred); 0 when the
/// API does not answer.
pub fn queued_in(relay: &Relay, pool: &str) -> u64 {
    try_api_json(relay, "/api/v1/pools")
        .as_ref()
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|p| p["pool"].as_str() == Some(pool))
        .map(|p| p["ready"].as_u64().unwrap_or(0) + p["deferred"].as_u64().unwrap_or(0))
        .sum()
}

/// The queued messages of `pool` as the admin API lists them.
pub fn pool_messages(relay: &Relay, pool: &str) -> Value {
    api_json(
        relay,
        &format!(
            "/api/v1/pools/{}/messages?limit=10000",
            percent_encode(pool)
        ),
    )
}

/// The queued message `queue_id` of `pool` as the admin API lists it.
pub fn queued_message(relay: &Relay, pool: &str, queue_id: &str) -> Option<Value> {
    pool_messages(relay, pool)
        .as_array()
        .and_then(|a| a.iter().find(|m| m["id"] == queue_id).cloned())
}

/// Waits until the message has had a failed attempt whose reply mentions
/// `code`; returns it as the admin API lists it.
pub fn wait_deferred(
    relay: &Relay,
    pool: &str,
    queue_id: &str,
    code: &str,
    deadline: Duration,
) -> Value {
    let mut seen = None;
    relay.wait_until(
        &format!("message {queue_id} of pool {pool} to be deferred with {code}"),
        deadline,
        || {
            seen = queued_message(relay, pool, queue_id).filter(|m| {
                m["attempts"].as_u64().unwrap_or(0) >= 1
                    && m["last_reply"].as_str().is_some_and(|r| r.contains(code))
            });
            seen.is_some()
        },
    );
    seen.unwrap_or(Value::Null)
}

/// `poolrelay queue ARGS --admin URL`.
pub fn queue_cli(relay: &Relay, args: &[&str]) -> CommandOutput {
    let url = relay.admin_url();
    let mut all = vec!["queue"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--admin", &url]);
    poolrelay(&all, CLI_DEADLINE)
}

/// `poolrelay queue ARGS`; panics, with the relay's logs, unless it exits 0.
pub fn queue_ok(relay: &Relay, args: &[&str]) -> CommandOutput {
    let out = queue_cli(relay, args);
    assert!(
        out.status.success(),
        "poolrelay queue {args:?} failed:\n{out}\n{}",
        relay.logs()
    );
    out
}

/// A command's stdout parsed as JSON.
pub fn json_of(out: &CommandOutput, what: &str) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}):\n{out}"))
}

/// Every queue id `queue list --json` shows (every pool).
pub fn listed_ids(relay: &Relay) -> BTreeSet<String> {
    let out = queue_ok(relay, &["list", "--json"]);
    json_of(&out, "queue list --json")
        .as_array()
        .unwrap_or_else(|| panic!("queue list --json is not an array:\n{out}"))
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect()
}
