//! Which relays are alive on a shared spool, and what they drain: each
//! relay puts one entry into the `<prefix>_nodes` bucket every
//! [`HEARTBEAT`] (key: its node id; value: the pools it drains) and reads
//! the others'. The bucket forgets an entry [`NODE_TTL`] after its last put
//! (the stream's `max_age`), so a relay that died stops counting by itself;
//! a relay that stops gracefully deletes its entry at once.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// How often a relay renews its entry.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long an entry outlives its last renewal: a few heartbeats, so a
/// relay whose renewal is late (a busy machine, a leader election) is not
/// counted out.
pub const NODE_TTL: Duration = Duration::from_secs(5);

/// What a relay announces.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    pools: Vec<String>,
    /// The 8 bits of its tag its queue ids carry: a relay starting picks
    /// bits no live relay uses.
    #[serde(default)]
    tag: Option<u64>,
}

/// The id tag bits live relays other than `node` announced.
pub(crate) async fn tags_in_use(
    nodes: &kv::Store,
    node: &str,
) -> Result<std::collections::BTreeSet<u64>, String> {
    Ok(entries(nodes, node)
        .await?
        .into_iter()
        .filter_map(|e| e.tag)
        .collect())
}

/// Every live relay's entry but `node`'s.
async fn entries(nodes: &kv::Store, node: &str) -> Result<Vec<Entry>, String> {
    let mut keys = nodes
        .keys()
        .await
        .map_err(|e| format!("cannot list the nodes bucket: {e}"))?;
    let mut found = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| format!("cannot list the nodes bucket: {e}"))?;
        if key == node {
            continue;
        }
        // Gone between the listing and the read: not alive.
        let Some(value) = nodes
            .get(key.as_str())
            .await
            .map_err(|e| format!("cannot read relay {key}'s entry: {e}"))?
        else {
            continue;
        };
        match serde_json::from_slice::<Entry>(&value) {
            Ok(entry) => found.push(entry),
            Err(e) => tracing::debug!("relay {key}'s entry in the nodes bucket is unreadable: {e}"),
        }
    }
    Ok(found)
}

/// The bucket's name.
pub(crate) fn bucket(prefix: &str) -> String {
    format!("{prefix}_nodes")
}

/// Opens the nodes bucket, making it when no relay has yet. Its stream is
/// made directly, as the spool's other buckets are (the fields a 2.9
/// server knows): kept in memory (the cluster is repopulated within one
/// heartbeat after a full restart), replicated like the rest of the spool
/// so losing one server loses no entry, each entry dropped [`NODE_TTL`]
/// after its last put.
pub(crate) async fn open(
    js: &jetstream::Context,
    prefix: &str,
    replicas: usize,
) -> Result<kv::Store, String> {
    let name = bucket(prefix);
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    let made = js
        .create_stream(stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age: NODE_TTL,
            storage: stream::StorageType::Memory,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            num_replicas: replicas,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await;
    match js.get_key_value(&name).await {
        Ok(store) => Ok(store),
        // Another relay may have made it meanwhile: only a bucket that is
        // still missing is an error.
        Err(e) => Err(match made {
            Err(made) => format!("bucket {name}: {made}"),
            Ok(_) => format!("bucket {name}: {e}"),
        }),
    }
}

/// A node id unique to this process: a bucket key (`[-_A-Za-z0-9]`),
/// readable in logs.
pub(crate) fn node_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let host = if host.is_empty() {
        "relay".to_string()
    } else {
        host
    };
    format!("{host}-{}-{:x}", std::process::id(), nanos & 0xffff_ffff)
}

/// Renews `node`'s entry (draining `pools`, ids tagged `tag`), then
/// returns the pools of every other live relay, one entry per relay.
pub(crate) async fn announce(
    nodes: &kv::Store,
    node: &str,
    pools: &[String],
    tag: u64,
) -> Result<Vec<Vec<String>>, String> {
    let entry = serde_json::to_vec(&Entry {
        pools: pools.to_vec(),
        tag: Some(tag),
    })
    .map_err(|e| format!("cannot encode this relay's entry: {e}"))?;
    nodes
        .put(node, entry.into())
        .await
        .map_err(|e| format!("cannot renew this relay's entry in the nodes bucket: {e}"))?;
    Ok(entries(nodes, node)
        .await?
        .into_iter()
        .map(|e| e.pools)
        .collect())
}

/// Deletes `node`'s entry: the other relays take its share at their next
/// heartbeat instead of after [`NODE_TTL`].
pub(crate) async fn withdraw(nodes: &kv::Store, node: &str) -> Result<(), String> {
    nodes
        .delete(node)
        .await
        .map_err(|e| format!("cannot delete this relay's entry from the nodes bucket: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_id_is_a_valid_bucket_key_and_unique_per_process() {
        let id = node_id();
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{id}"
        );
        assert!(id.contains(&format!("-{}-", std::process::id())), "{id}");
    }

    #[test]
    fn an_entry_without_a_tag_still_counts_its_pools() {
        let old: Entry = serde_json::from_str(r#"{"pools":["A"]}"#).expect("decode");
        assert_eq!((old.pools, old.tag), (vec!["A".to_string()], None));
    }

    #[test]
    fn an_entry_outlives_several_missed_heartbeats() {
        assert!(NODE_TTL >= HEARTBEAT * 4);
        assert_eq!(bucket("poolrelay"), "poolrelay_nodes");
    }
}
