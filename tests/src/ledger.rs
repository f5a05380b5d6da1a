//! A send ledger for load tests that interrupt the relay (kill -9,
//! SIGTERM): what each client knows about every message it sent, to check
//! afterwards that every acknowledged message arrived and that nothing
//! arrived that was never sent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// What the clients know, by Message-ID.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Data was (being) written after the 354: the message may be queued.
    pub in_flight: BTreeSet<String>,
    /// The final dot got a 250: the message must be delivered.
    pub acked: BTreeSet<String>,
    /// Why each client stopped, one line per client; lines of clients that
    /// failed in a way the test did not expect contain `UNEXPECTED`.
    pub stops: Vec<String>,
}

impl Ledger {
    /// The stop lines of clients that failed unexpectedly.
    pub fn unexpected_stops(&self) -> Vec<&str> {
        self.stops
            .iter()
            .map(String::as_str)
            .filter(|s| s.contains("UNEXPECTED"))
            .collect()
    }

    /// The delivered Message-IDs whose data no client ever sent.
    pub fn never_sent<'a>(&self, delivered: &'a BTreeMap<String, usize>) -> Vec<&'a String> {
        delivered
            .keys()
            .filter(|id| !self.in_flight.contains(*id))
            .collect()
    }
}

/// A [`Ledger`] shared by client threads; a panicking client does not
/// poison it for the others.
#[derive(Debug, Clone, Default)]
pub struct SharedLedger(Arc<Mutex<Ledger>>);

impl SharedLedger {
    /// An empty ledger.
    pub fn new() -> SharedLedger {
        SharedLedger::default()
    }

    /// The ledger, locked.
    pub fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the data of `id` is being written.
    pub fn data_sent(&self, id: &str) {
        self.lock().in_flight.insert(id.to_string());
    }

    /// Records that `id` got its 250.
    pub fn acked(&self, id: &str) {
        self.lock().acked.insert(id.to_string());
    }

    /// How many messages got their 250 so far.
    pub fn acked_count(&self) -> usize {
        self.lock().acked.len()
    }

    /// Records why client `client` stopped: `Ok` for an expected end (all
    /// sent, or the connection cut by the relay going away), `Err` otherwise.
    pub fn stopped(&self, client: usize, why: Result<String, String>) {
        let line = match why {
            Ok(s) => format!("client {client}: {s}"),
            Err(s) => format!("client {client}: UNEXPECTED {s}"),
        };
        self.lock().stops.push(line);
    }

    /// The ledger's contents, leaving it empty (once the clients stopped).
    pub fn take(&self) -> Ledger {
        std::mem::take(&mut *self.lock())
    }
}

/// How many times each id occurs in `ids`.
pub fn id_counts(ids: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for id in ids {
        *counts.entry(id).or_default() += 1;
    }
    counts
}
