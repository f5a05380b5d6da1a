//! Rate limits as token buckets: bandwidth per pool and server-wide (bits
//! per second, LISTSERV's `SMTP_RATE_LIMIT`), messages per second and
//! recipients per hour per pool (what smarthost providers impose).
//!
//! A bucket may go into debt: a message is sent when its buckets are not
//! negative, then its cost is taken. The long-run rate is exact, a large
//! message is never starved, and a limited pool simply becomes ineligible
//! for a while — workers take other pools' mail meanwhile. Nothing is ever
//! dropped or bounced for a limit.
//!
//! Limits are cluster-wide. When several relays drain a pool (the
//! replicated spool), each takes an even share of the pool's limits: the
//! configured rate divided by the live relays draining that pool
//! ([`LiveNodes`], counted from their heartbeats), and the server-wide
//! `rate_limit` divided by the live relays draining anything. No message
//! waits for a round trip to a peer; the cost is a few seconds of over- or
//! under-shoot while a relay joins or after one dies.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use poolrelay_config::Config;

/// This relay's share of a cluster-wide `limit` when `nodes` live relays
/// enforce it (this one included; 0 counts as 1: a relay that sees no
/// heartbeat, its own included, still holds the whole limit alone).
pub fn share(limit: f64, nodes: usize) -> f64 {
    limit / nodes.max(1) as f64
}

/// How many live relays share each limit, this one included.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LiveNodes {
    /// Live relays draining at least one pool: they share the server-wide
    /// `rate_limit`.
    pub total: usize,
    /// Per pool: the live relays whose `[[upstream]]` entries serve it.
    pub pools: BTreeMap<String, usize>,
}

impl LiveNodes {
    /// Counts the relays draining each pool: this relay, draining `own`,
    /// and the other live relays, each draining the pools of one entry of
    /// `others`. A relay draining nothing counts nowhere.
    pub fn count<'a>(
        own: &'a [String],
        others: impl IntoIterator<Item = &'a [String]>,
    ) -> LiveNodes {
        let mut nodes = LiveNodes::default();
        for pools in std::iter::once(own).chain(others) {
            if pools.is_empty() {
                continue;
            }
            nodes.total += 1;
            let distinct: std::collections::BTreeSet<&String> = pools.iter().collect();
            for pool in distinct {
                *nodes.pools.entry(pool.clone()).or_default() += 1;
            }
        }
        nodes
    }

    /// The live relays sharing `pool`'s limits (at least 1).
    pub fn of(&self, pool: &str) -> usize {
        self.pools.get(pool).copied().unwrap_or(1).max(1)
    }

    /// The live relays draining `pool`, 0 when none does.
    pub fn draining(&self, pool: &str) -> usize {
        self.pools.get(pool).copied().unwrap_or(0)
    }

    /// `A=2 B=1 -=1`, for a log line.
    pub fn describe(&self) -> String {
        self.pools
            .iter()
            .map(|(pool, n)| format!("{pool}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The pools this relay drains: every pool its `[[upstream]]` entries serve.
pub fn drained_pools(config: &Config) -> Vec<String> {
    let mut pools: Vec<String> = config
        .upstreams
        .iter()
        .flat_map(|u| u.pools.iter().cloned())
        .collect();
    pools.sort();
    pools.dedup();
    pools
}

/// Which relays are alive and what they drain, as last heard: this
/// relay's own pools (from the config in force) and the other relays'
/// (from their heartbeats). Publishes the [`LiveNodes`] count every
/// config generation's [`Limits`] follows.
#[derive(Debug)]
pub struct Membership {
    heard: Mutex<(Vec<String>, Vec<Vec<String>>)>,
    nodes: watch::Sender<LiveNodes>,
}

impl Membership {
    /// A relay alone, draining `own`.
    pub fn alone(own: Vec<String>) -> Membership {
        let nodes = LiveNodes::count(&own, std::iter::empty::<&[String]>());
        Membership {
            heard: Mutex::new((own, Vec::new())),
            nodes: watch::channel(nodes).0,
        }
    }

    /// The pools this relay drains.
    pub fn own(&self) -> Vec<String> {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// A reload changed the pools this relay drains.
    pub fn set_own(&self, own: Vec<String>) {
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        heard.0 = own;
        self.publish(&heard);
    }

    /// The other live relays' pools, one entry per relay; returns whether
    /// any count changed.
    pub fn set_others(&self, others: Vec<Vec<String>>) -> bool {
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        heard.1 = others;
        self.publish(&heard)
    }

    fn publish(&self, heard: &(Vec<String>, Vec<Vec<String>>)) -> bool {
        let nodes = LiveNodes::count(&heard.0, heard.1.iter().map(Vec::as_slice));
        self.nodes.send_if_modified(|current| {
            if *current == nodes {
                false
            } else {
                *current = nodes;
                true
            }
        })
    }

    /// The current count.
    pub fn nodes(&self) -> LiveNodes {
        self.nodes.borrow().clone()
    }

    /// Follows the count as it changes.
    pub fn subscribe(&self) -> watch::Receiver<LiveNodes> {
        self.nodes.subscribe()
    }
}

/// One token bucket.
#[derive(Debug, Clone)]
struct Bucket {
    /// The configured rate, for the whole cluster.
    limit: f64,
    /// The configured capacity, for the whole cluster.
    limit_capacity: f64,
    /// Tokens added per second: this relay's share of `limit`.
    rate: f64,
    /// Most tokens it can hold (one second's worth: little burst).
    capacity: f64,
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn new(rate: f64, capacity: f64) -> Bucket {
        Bucket {
            limit: rate,
            limit_capacity: capacity,
            rate,
            capacity,
            tokens: capacity,
            updated: Instant::now(),
        }
    }

    /// Takes this relay's share of the cluster-wide limit when `nodes`
    /// relays enforce it. A debt is kept; a surplus beyond the new
    /// capacity is dropped, so a shrinking share does not burst.
    fn share_among(&mut self, nodes: usize, now: Instant) {
        self.refill(now);
        self.rate = share(self.limit, nodes);
        // At least one message's worth, as at start, so a small share
        // still lets a message go.
        self.capacity = share(self.limit_capacity, nodes).max(self.limit_capacity.min(1.0));
        self.tokens = self.tokens.min(self.capacity);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.updated = now;
    }

    /// Time until the bucket is no longer in debt.
    fn wait(&self) -> Duration {
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[derive(Debug, Default)]
struct PoolBuckets {
    bits: Option<Bucket>,
    messages: Option<Bucket>,
    recipients: Option<Bucket>,
}

/// All buckets of one config.
#[derive(Debug, Default)]
pub struct Limits {
    server_bits: Mutex<Option<Bucket>>,
    pools: Mutex<HashMap<String, PoolBuckets>>,
    /// The live relays sharing the limits, when they are followed.
    nodes: Mutex<Option<watch::Receiver<LiveNodes>>>,
}

impl Limits {
    /// Buckets for the limits `config` sets.
    pub fn new(config: &Config) -> Limits {
        let server = config
            .defaults
            .rate_limit
            .map(|bps| Bucket::new(bps as f64, bps as f64));
        let mut pools = HashMap::new();
        for (name, pool) in &config.pools {
            let buckets = PoolBuckets {
                bits: pool
                    .rate_limit
                    .map(|bps| Bucket::new(bps as f64, bps as f64)),
                messages: pool
                    .max_messages_per_second
                    .map(|rate| Bucket::new(rate, rate.max(1.0))),
                recipients: pool.max_recipients_per_hour.map(|per_hour| {
                    let rate = per_hour as f64 / 3600.0;
                    // Allow one minute's worth at once, at least one recipient.
                    Bucket::new(rate, (rate * 60.0).max(1.0))
                }),
            };
            pools.insert(name.clone(), buckets);
        }
        Limits {
            server_bits: Mutex::new(server),
            pools: Mutex::new(pools),
            nodes: Mutex::new(None),
        }
    }

    /// Shares the limits with the other live relays `nodes` counts, now
    /// and whenever the count changes.
    pub fn following(self, mut nodes: watch::Receiver<LiveNodes>) -> Limits {
        let current = nodes.borrow_and_update().clone();
        self.share_among(&current);
        *self.nodes.lock().unwrap_or_else(|e| e.into_inner()) = Some(nodes);
        self
    }

    /// Applies a changed count of live relays, if any.
    fn follow(&self) {
        let changed = {
            let mut guard = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_mut() {
                Some(rx) if rx.has_changed().unwrap_or(false) => {
                    Some(rx.borrow_and_update().clone())
                }
                _ => None,
            }
        };
        if let Some(nodes) = changed {
            self.share_among(&nodes);
        }
    }

    /// Takes this relay's share of every limit, `nodes` saying how many
    /// live relays share each one.
    pub fn share_among(&self, nodes: &LiveNodes) {
        let now = Instant::now();
        if let Some(b) = self
            .server_bits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            b.share_among(nodes.total, now);
        }
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        for (name, p) in pools.iter_mut() {
            let n = nodes.of(name);
            for b in [&mut p.bits, &mut p.messages, &mut p.recipients]
                .into_iter()
                .flatten()
            {
                b.share_among(n, now);
            }
        }
    }

    /// How long `pool` must wait before its next message may go; zero = now.
    pub fn wait(&self, pool: &str) -> Duration {
        self.follow();
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        if let Some(b) = self
            .server_bits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            b.refill(now);
            wait = wait.max(b.wait());
        }
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pools.get_mut(pool) {
            for b in [&mut p.bits, &mut p.messages, &mut p.recipients]
                .into_iter()
                .flatten()
            {
                b.refill(now);
                wait = wait.max(b.wait());
            }
        }
        wait
    }

    /// Takes the cost of one message of `bytes` to `recipients` recipients.
    pub fn charge(&self, pool: &str, bytes: u64, recipients: usize) {
        let bits = bytes as f64 * 8.0;
        let now = Instant::now();
        if let Some(b) = self
            .server_bits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            b.refill(now);
            b.tokens -= bits;
        }
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pools.get_mut(pool) {
            let costs = [
                (&mut p.bits, bits),
                (&mut p.messages, 1.0),
                (&mut p.recipients, recipients as f64),
            ];
            for (bucket, cost) in costs {
                if let Some(b) = bucket {
                    b.refill(now);
                    b.tokens -= cost;
                }
            }
        }
    }

    /// Whether any limit is configured (workers then poll more often).
    pub fn any(&self) -> bool {
        self.server_bits
            .lock()
            .map(|b| b.is_some())
            .unwrap_or(false)
            || self
                .pools
                .lock()
                .map(|p| {
                    p.values()
                        .any(|b| b.bits.is_some() || b.messages.is_some() || b.recipients.is_some())
                })
                .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_in_debt_waits_in_proportion_to_its_debt() {
        let mut b = Bucket::new(1000.0, 1000.0);
        b.tokens -= 3000.0;
        let w = b.wait();
        assert!(
            w > Duration::from_millis(1900) && w <= Duration::from_millis(2000),
            "{w:?}"
        );
        b.refill(b.updated + Duration::from_secs(2));
        assert_eq!(b.wait(), Duration::ZERO);
    }

    fn pools(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_limit_is_shared_evenly_and_never_divided_by_zero() {
        assert_eq!(share(100.0, 1), 100.0);
        assert_eq!(share(100.0, 2), 50.0);
        assert_eq!(share(100.0, 3), 100.0 / 3.0);
        assert_eq!(share(100.0, 0), 100.0);
    }

    #[test]
    fn relays_are_counted_per_pool_they_drain() {
        let a = pools(&["A", "B"]);
        let b = pools(&["A"]);
        let idle = pools(&[]);
        let twice = pools(&["B", "B"]);
        let nodes = LiveNodes::count(
            &pools(&["A", "-"]),
            [
                a.as_slice(),
                b.as_slice(),
                idle.as_slice(),
                twice.as_slice(),
            ],
        );
        assert_eq!(nodes.total, 4, "the relay draining nothing is not counted");
        assert_eq!(nodes.of("A"), 3);
        assert_eq!(nodes.of("B"), 2, "a pool named twice counts its relay once");
        assert_eq!(nodes.of("-"), 1);
        assert_eq!(
            nodes.of("C"),
            1,
            "a pool nobody drains keeps its whole limit"
        );
    }

    #[test]
    fn a_relay_alone_keeps_every_limit_whole() {
        let nodes = LiveNodes::count(&pools(&["A"]), std::iter::empty::<&[String]>());
        assert_eq!(nodes.total, 1);
        assert_eq!(nodes.of("A"), 1);
    }

    #[test]
    fn a_bucket_takes_its_share_and_back_the_whole_when_alone_again() {
        let start = Instant::now();
        let mut b = Bucket::new(100.0, 100.0);
        b.share_among(2, start);
        assert_eq!(b.rate, 50.0);
        assert_eq!(b.capacity, 50.0);
        assert!(b.tokens <= 50.0, "no burst above the new share");
        b.tokens = -10.0;
        b.share_among(1, b.updated);
        assert_eq!(b.rate, 100.0);
        assert_eq!(b.capacity, 100.0);
        assert!(b.tokens < 0.0, "a debt survives a change of share");
    }

    #[test]
    fn limits_follow_the_count_of_live_relays() {
        let membership = Membership::alone(pools(&["A"]));
        let config = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:2525\"\n[pool.A]\nmax_messages_per_second = 100\n[[upstream]]\nhost = \"127.0.0.1:25\"\npools = [\"A\"]\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(drained_pools(&config), pools(&["A"]));
        let limits = Limits::new(&config).following(membership.subscribe());
        let rate = |limits: &Limits| {
            limits.wait("A");
            limits.pools.lock().unwrap()["A"]
                .messages
                .as_ref()
                .unwrap()
                .rate
        };
        assert_eq!(rate(&limits), 100.0);
        assert!(membership.set_others(vec![pools(&["A", "B"])]));
        assert_eq!(rate(&limits), 50.0);
        assert!(
            !membership.set_others(vec![pools(&["B", "A"])]),
            "the same relays heard again: no change"
        );
        assert_eq!(membership.nodes().total, 2);
        membership.set_others(Vec::new());
        assert_eq!(rate(&limits), 100.0);
    }

    #[test]
    fn a_small_share_still_lets_one_message_go() {
        let mut b = Bucket::new(0.5, 1.0);
        b.share_among(4, Instant::now());
        assert_eq!(b.rate, 0.125);
        assert_eq!(b.capacity, 1.0);
    }
}
