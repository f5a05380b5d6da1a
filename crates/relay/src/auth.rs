//! Checking AUTH credentials for the listeners: the users_file lookup off
//! the async threads, a delay that grows with each failure, and a limit on
//! failures per client address. The delay is awaited by the failing
//! session only; other sessions go on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poolrelay_config::UsersFile;
use poolrelay_smtp::inbound::{AuthAttempt, AuthVerdict};

use crate::metric;

/// Failed AUTHs from one address before it gets `421 4.7.0`.
pub const MAX_FAILURES: u32 = 5;
/// How long failures from an address are remembered after its last one.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(15 * 60);
/// At most this many addresses are remembered; beyond, the stalest go.
const MAX_TRACKED: usize = 65_536;
/// Password checks running at once over all sessions: argon2id takes 19 MiB
/// and tens of milliseconds each, so a crowd of AUTHs queues here instead
/// of taking the relay's memory and every core.
const MAX_CONCURRENT_CHECKS: usize = 4;
static CHECKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONCURRENT_CHECKS);

/// Failed AUTHs per client address, over all sessions and listeners.
#[derive(Debug, Default)]
pub struct Failures {
    by_address: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Failures {
    /// True when `ip` had [`MAX_FAILURES`] within [`FAILURE_MEMORY`]:
    /// its credentials are not even checked.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> bool {
        let map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&ip).is_some_and(|(n, last)| {
            *n >= MAX_FAILURES && now.duration_since(*last) < FAILURE_MEMORY
        })
    }

    /// Records a failure; returns how many `ip` has now.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> u32 {
        let mut map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (_, last)| now.duration_since(*last) < FAILURE_MEMORY);
            if map.len() >= MAX_TRACKED {
                map.clear();
            }
        }
        let entry = map.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= FAILURE_MEMORY {
            entry.0 = 0;
        }
        entry.0 += 1;
        entry.1 = now;
        entry.0
    }

    /// A success forgets the address's failures.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&ip);
    }
}

/// How long the `n`th failure waits before its `535`: 250 ms, doubling,
/// at most 8 s.
pub fn delay(n: u32) -> Duration {
    Duration::from_millis(250u64 << n.saturating_sub(1).min(5))
}

/// Checks `attempt` against `users`; counts, delays and limits failures
/// of `ip`. Never logs the password; the user name only on success.
pub async fn check(
    failures: &Failures,
    users: Option<&Arc<UsersFile>>,
    listener: &str,
    ip: IpAddr,
    attempt: &AuthAttempt,
) -> AuthVerdict {
    let count = |result: &'static str| {
        metrics::counter!(metric::SMTP_AUTH.name, "listener" => listener.to_string(), "result" => result)
            .increment(1);
    };
    if failures.blocked(ip, Instant::now()) {
        count("blocked");
        return AuthVerdict::TooManyFailures;
    }
    let valid = match users {
        Some(users) => {
            let users = users.clone();
            let username = attempt.username.clone();
            let password = attempt.password.clone();
            match CHECKS.acquire().await {
                // The permit goes with the check: a session that leaves
                // meanwhile does not free it early.
                Ok(permit) => tokio::task::spawn_blocking(move || {
                    let valid = users.verify(&username, &password);
                    drop(permit);
                    valid
                })
                .await
                .unwrap_or(false),
                Err(_) => false,
            }
        }
        None => false,
    };
    if valid {
        failures.succeeded(ip);
        count("success");
        return AuthVerdict::Accepted;
    }
    count("failure");
    let n = failures.failed(ip, Instant::now());
    tracing::warn!(
        target: "poolrelay::auth",
        client = %ip,
        listener,
        failures = n,
        "AUTH failed"
    );
    if n >= MAX_FAILURES {
        return AuthVerdict::TooManyFailures;
    }
    tokio::time::sleep(delay(n)).await;
    AuthVerdict::Refused
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_block_an_address_until_forgotten() {
        let f = Failures::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for n in 1..MAX_FAILURES {
            assert_eq!(f.failed(a, t0), n);
            assert!(!f.blocked(a, t0));
        }
        assert_eq!(f.failed(a, t0), MAX_FAILURES);
        assert!(f.blocked(a, t0));
        assert!(!f.blocked(b, t0));
        assert!(f.blocked(a, t0 + FAILURE_MEMORY - Duration::from_secs(1)));
        assert!(!f.blocked(a, t0 + FAILURE_MEMORY));
        // A failure after the memory starts counting again.
        assert_eq!(f.failed(a, t0 + FAILURE_MEMORY), 1);
        f.failed(b, t0);
        f.succeeded(b);
        assert_eq!(f.failed(b, t0), 1);
    }

    #[test]
    fn the_delay_grows_and_is_bounded() {
        assert_eq!(delay(1), Duration::from_millis(250));
        assert_eq!(delay(2), Duration::from_millis(500));
        assert_eq!(delay(4), Duration::from_secs(2));
        assert_eq!(delay(6), Duration::from_secs(8));
        assert_eq!(delay(100), Duration::from_secs(8));
    }
}
