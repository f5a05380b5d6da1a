//! Checking AUTH credentials for the listeners: the users_file lookup off
//! the async threads, a delay that grows with each failure, and a limit on
//! failures per client (an IPv4 address, or an IPv6 /64: one host's
//! allocation). The delay is awaited by the failing session only; other
//! sessions go on.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poolrelay_config::UsersFile;
use poolrelay_smtp::inbound::{AuthAttempt, AuthVerdict};

use crate::metric;

/// Failed AUTHs from one client before it gets `421 4.7.0`.
pub const MAX_FAILURES: u32 = 5;
/// How long failures from a client are remembered after its last one.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(15 * 60);
/// At most this many clients are remembered. When full, forgotten first
/// are the stale ones, then the oldest that are not blocked; a blocked
/// client is never forgotten early, so when every entry is blocked a new
/// client's AUTH is refused unchecked until one ages out.
const MAX_TRACKED: usize = 65_536;
/// Password checks running at once over all sessions: argon2id takes 19 MiB
/// and tens of milliseconds each, so a crowd of AUTHs queues here instead
/// of taking the relay's memory and every core.
const MAX_CONCURRENT_CHECKS: usize = 4;
/// How long an attempt waits for its client's other checks to end before
/// it is refused with `421 4.7.0`.
const BUSY_WAIT: Duration = Duration::from_secs(30);
static CHECKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONCURRENT_CHECKS);

/// Whom failures are counted against: an IPv4 address (an IPv4-mapped
/// IPv6 address counts as its IPv4 address), or the /64 of an IPv6
/// address, since one host commonly holds a whole /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// One client's record.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Failures within [`FAILURE_MEMORY`] of `last`.
    failures: u32,
    /// Attempts being checked now: counted against the limit before the
    /// check, so parallel sessions cannot exceed it.
    pending: u32,
    /// The last failure (or when the entry was made).
    last: Instant,
}

impl Entry {
    fn stale(&self, now: Instant) -> bool {
        self.pending == 0 && now.duration_since(self.last) >= FAILURE_MEMORY
    }

    fn blocked(&self, now: Instant) -> bool {
        !self.stale(now) && self.failures >= MAX_FAILURES
    }
}

/// Why an attempt is refused without checking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client reached [`MAX_FAILURES`].
    Blocked,
    /// The table is full of blocked clients; a new client is refused until
    /// one ages out.
    Full,
    /// The client's failures and the attempts being checked reach
    /// [`MAX_FAILURES`]: the attempt waits for one of those checks to end.
    Busy,
}

/// Failed AUTHs per client, over all sessions and listeners.
#[derive(Debug, Default)]
pub struct Failures {
    by_client: Mutex<HashMap<IpAddr, Entry>>,
}

impl Failures {
    /// True when `ip`'s client had [`MAX_FAILURES`] within
    /// [`FAILURE_MEMORY`]: its credentials are not checked.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> bool {
        let map = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&client_key(ip)).is_some_and(|e| e.blocked(now))
    }

    /// Starts an attempt from `ip`: counts it against the limit before it
    /// is checked. Every `Ok` must be followed by [`Failures::failed`] or
    /// [`Failures::succeeded`] (see `Attempt`).
    pub fn begin(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let key = client_key(ip);
        let mut map = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&key) && map.len() >= MAX_TRACKED {
            map.retain(|_, e| !e.stale(now));
            if map.len() >= MAX_TRACKED {
                let oldest = map
                    .iter()
                    .filter(|(_, e)| e.pending == 0 && !e.blocked(now))
                    .min_by_key(|(_, e)| e.last)
                    .map(|(k, _)| *k);
                match oldest {
                    Some(k) => {
                        map.remove(&k);
                    }
                    None => return Err(Refusal::Full),
                }
            }
        }
        let entry = map.entry(key).or_insert(Entry {
            failures: 0,
            pending: 0,
            last: now,
        });
        if entry.stale(now) {
            entry.failures = 0;
        }
        if entry.blocked(now) {
            return Err(Refusal::Blocked);
        }
        if entry.failures + entry.pending >= MAX_FAILURES {
            return Err(Refusal::Busy);
        }
        entry.pending += 1;
        Ok(())
    }

    /// Ends an attempt begun with [`Failures::begin`] as a failure; returns
    /// how many failures `ip`'s client has now.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> u32 {
        let mut map = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(client_key(ip)).or_insert(Entry {
            failures: 0,
            pending: 1,
            last: now,
        });
        entry.pending = entry.pending.saturating_sub(1);
        entry.failures += 1;
        entry.last = now;
        entry.failures
    }

    /// Ends an attempt begun with [`Failures::begin`] as a success: the
    /// attempt is taken back, earlier failures stay (they age out), so one
    /// valid account does not buy guesses at others.
    pub fn succeeded(&self, ip: IpAddr) {
        let key = client_key(ip);
        let mut map = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = map.get_mut(&key) {
            entry.pending = entry.pending.saturating_sub(1);
            if entry.pending == 0 && entry.failures == 0 {
                map.remove(&key);
            }
        }
    }
}

/// An attempt counted by [`Failures::begin`]; dropped unfinished (the
/// session went away during the check) it counts as a failure.
struct Attempt<'a> {
    failures: &'a Failures,
    ip: IpAddr,
    done: bool,
}

impl Attempt<'_> {
    fn failed(mut self) -> u32 {
        self.done = true;
        self.failures.failed(self.ip, Instant::now())
    }

    fn succeeded(mut self) {
        self.done = true;
        self.failures.succeeded(self.ip);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.failures.failed(self.ip, Instant::now());
        }
    }
}

/// How long the `n`th failure waits before its `535`: 250 ms, doubling,
/// at most 8 s.
pub fn delay(n: u32) -> Duration {
    Duration::from_millis(250u64 << n.saturating_sub(1).min(5))
}

/// Checks `attempt` against `users`; counts, delays and limits failures
/// of `ip`'s client. An attempt the session refused itself
/// ([`AuthAttempt::refused`]) is not checked but counts as a failure.
/// Never logs the password; the user name only on success.
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
    let waited = Instant::now();
    loop {
        match failures.begin(ip, Instant::now()) {
            Ok(()) => break,
            // Parallel sessions of one client queue here rather than each
            // getting a guess past the limit.
            Err(Refusal::Busy) if waited.elapsed() < BUSY_WAIT => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => {
                count("blocked");
                return AuthVerdict::TooManyFailures;
            }
        }
    }
    let pending = Attempt {
        failures,
        ip,
        done: false,
    };
    let valid = match users {
        Some(users) if !attempt.refused => {
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
        // No users, or refused by the session: nothing to check, but a
        // failure like any other.
        _ => false,
    };
    if valid {
        pending.succeeded();
        count("success");
        return AuthVerdict::Accepted;
    }
    count("failure");
    let n = pending.failed();
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

    /// One whole attempt that fails.
    fn fail(f: &Failures, ip: IpAddr, now: Instant) -> Result<u32, Refusal> {
        f.begin(ip, now)?;
        Ok(f.failed(ip, now))
    }

    #[test]
    fn failures_block_an_address_until_forgotten() {
        let f = Failures::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for n in 1..MAX_FAILURES {
            assert_eq!(fail(&f, a, t0), Ok(n));
            assert!(!f.blocked(a, t0));
        }
        assert_eq!(fail(&f, a, t0), Ok(MAX_FAILURES));
        assert!(f.blocked(a, t0));
        assert_eq!(f.begin(a, t0), Err(Refusal::Blocked));
        assert!(!f.blocked(b, t0));
        assert!(f.blocked(a, t0 + FAILURE_MEMORY - Duration::from_secs(1)));
        assert!(!f.blocked(a, t0 + FAILURE_MEMORY));
        // A failure after the memory starts counting again.
        assert_eq!(fail(&f, a, t0 + FAILURE_MEMORY), Ok(1));
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let f = Failures::default();
        let t0 = Instant::now();
        for n in 0..MAX_FAILURES {
            let ip: IpAddr = format!("2001:db8:1:2:{n}::{n}").parse().unwrap();
            fail(&f, ip, t0).unwrap();
        }
        assert!(f.blocked("2001:db8:1:2:ffff::1".parse().unwrap(), t0));
        assert!(!f.blocked("2001:db8:1:3::1".parse().unwrap(), t0));
        // An IPv4-mapped address is its IPv4 address.
        for _ in 0..MAX_FAILURES {
            fail(&f, "::ffff:192.0.2.7".parse().unwrap(), t0).unwrap();
        }
        assert!(f.blocked("192.0.2.7".parse().unwrap(), t0));
        assert!(!f.blocked("192.0.2.8".parse().unwrap(), t0));
    }

    #[test]
    fn a_full_table_never_forgets_a_blocked_client() {
        let f = Failures::default();
        let t0 = Instant::now();
        let blocked: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            fail(&f, blocked, t0).unwrap();
        }
        // Many other clients, one failure each, some later.
        let other = |i: usize| {
            IpAddr::V6(Ipv6Addr::from(
                (0x2001_0db8_u128 << 96) | ((i as u128) << 64),
            ))
        };
        for i in 0..MAX_TRACKED {
            let at = t0 + Duration::from_secs(1 + (i % 60) as u64);
            fail(&f, other(i), at).unwrap();
        }
        let later = t0 + Duration::from_secs(120);
        assert!(f.blocked(blocked, later));
        // Every client blocked: a new one is refused, none is forgotten.
        let g = Failures::default();
        for i in 0..MAX_TRACKED {
            for _ in 0..MAX_FAILURES {
                fail(&g, other(i), t0).unwrap();
            }
        }
        assert_eq!(g.begin(blocked, later), Err(Refusal::Full));
        assert!((0..MAX_TRACKED).all(|i| g.blocked(other(i), later)));
        // Once they age out, there is room again.
        assert_eq!(g.begin(blocked, t0 + FAILURE_MEMORY), Ok(()));
    }

    #[test]
    fn a_success_does_not_forget_failures() {
        let f = Failures::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 1..MAX_FAILURES {
            fail(&f, a, t0).unwrap();
        }
        f.begin(a, t0).unwrap();
        f.succeeded(a);
        assert_eq!(fail(&f, a, t0), Ok(MAX_FAILURES));
        assert!(f.blocked(a, t0));
    }

    #[test]
    fn parallel_attempts_cannot_pass_the_limit() {
        let f = Failures::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES {
            f.begin(a, t0).unwrap();
        }
        // A sixth waits for one of the five checks to end.
        assert_eq!(f.begin(a, t0), Err(Refusal::Busy));
        f.succeeded(a);
        f.begin(a, t0).unwrap();
        for n in 1..=MAX_FAILURES {
            assert_eq!(f.failed(a, t0), n);
        }
        assert_eq!(f.begin(a, t0), Err(Refusal::Blocked));
    }

    #[test]
    fn an_attempt_dropped_unfinished_counts_as_a_failure() {
        let f = Failures::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        f.begin(a, Instant::now()).unwrap();
        drop(Attempt {
            failures: &f,
            ip: a,
            done: false,
        });
        assert_eq!(fail(&f, a, Instant::now()), Ok(2));
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
