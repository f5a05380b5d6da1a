//! Rate limits as token buckets: bandwidth per pool and server-wide (bits
//! per second, LISTSERV's `SMTP_RATE_LIMIT`), messages per second and
//! recipients per hour per pool (what smarthost providers impose).
//!
//! A bucket may go into debt: a message is sent when its buckets are not
//! negative, then its cost is taken. The long-run rate is exact, a large
//! message is never starved, and a limited pool simply becomes ineligible
//! for a while — workers take other pools' mail meanwhile. Nothing is ever
//! dropped or bounced for a limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use poolrelay_config::Config;

/// One token bucket.
#[derive(Debug, Clone)]
struct Bucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens it can hold (one second's worth: little burst).
    capacity: f64,
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn new(rate: f64, capacity: f64) -> Bucket {
        Bucket {
            rate,
            capacity,
            tokens: capacity,
            updated: Instant::now(),
        }
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
        }
    }

    /// How long `pool` must wait before its next message may go; zero = now.
    pub fn wait(&self, pool: &str) -> Duration {
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
}
