//! Counters shared by the agent's tasks and reported in health messages and `lathe status`.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub predictions: Counter,
    /// Readings refused: bad JSON, a missing or non-numeric feature, no active model.
    pub rejected: Counter,
    /// Everything dropped by a when-full policy: readings, commands, outbox records.
    pub dropped: Counter,
    pub readings_dropped: Counter,
    /// Records in the outbox (a gauge).
    pub outbox_depth: Counter,
}
