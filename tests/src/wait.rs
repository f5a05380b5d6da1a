//! Bounded waits on conditions: tests never sleep hoping something happened.

use std::time::{Duration, Instant};

/// How often [`wait_until`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `cond` every `interval` until it is true; false when
/// `deadline` passed first (the condition is checked once more at the end).
pub fn poll_until(deadline: Duration, interval: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return cond();
        }
        std::thread::sleep(interval);
    }
}

/// Polls `cond` every 20 ms until it is true; panics saying `what` was waited
/// for when `deadline` passes first.
pub fn wait_until(what: &str, deadline: Duration, cond: impl FnMut() -> bool) {
    if !poll_until(deadline, POLL_INTERVAL, cond) {
        panic!("timed out after {deadline:?} waiting for {what}");
    }
}
