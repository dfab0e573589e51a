//! Counters shared by the agent's tasks and reported in health messages and `lathe status`.
//!
//! Since-start counters, consistent with each other: every reading message received is
//! counted in `readings`, and each one refused whole (for any cause) also in `rejected`; rows
//! of accepted messages become predictions or count in `inference_failed`; every
//! record made durable is counted once (`predictions` for the predictions stream), and every
//! record lost (dropped by the when-full policy, refused for its size or for a full disk) is
//! counted once in `dropped`. Live copies skipped are not losses: the outbox copy remains.
//! Persistent per-cause totals live in the outbox's `losses` table.

use crate::store::Loss;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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

/// Losses counted where the outbox had no room to take them at once; the outbox task writes
/// them down at its next tick.
#[derive(Debug, Default)]
pub struct Tally(Mutex<Vec<Loss>>);

impl Tally {
    pub fn add(&self, l: Loss) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match v.iter_mut().find(|x| x.stream == l.stream && x.cause == l.cause) {
            Some(x) => x.count += l.count,
            None => v.push(l),
        }
    }

    pub fn take(&self) -> Vec<Loss> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// Reading messages received.
    pub readings: Counter,
    /// Reading messages refused whole, before inference: too large, malformed, no active
    /// model, queue full.
    pub rejected: Counter,
    /// Rows whose inference failed (their messages were accepted).
    pub inference_failed: Counter,
    /// When a prediction was last made durable (Unix ms; 0: never since start).
    pub last_prediction_ms: Counter,
    /// The last inference failure: when (Unix ms) and why.
    pub last_failure: Mutex<Option<(u64, String)>>,
    /// Reading messages refused because the readings queue was full (also in `rejected`).
    pub readings_dropped: Counter,
    /// Predictions made durable in the outbox.
    pub predictions: Counter,
    /// Records lost: dropped by the when-full policy, refused for their size, or unwritable.
    pub dropped: Counter,
    /// Live copies not published (link down or busy, uplink cap); not a loss.
    pub live_skipped: Counter,
    /// Acks not applied: above what was assigned, or naming a conflict.
    pub acks_refused: Counter,
    /// Gauges of the outbox.
    pub outbox_depth: Counter,
    pub outbox_bytes: Counter,
    /// Time of the oldest record waiting (0: none).
    pub oldest_ms: Counter,
    /// Free bytes on the state_dir's filesystem (u64::MAX: unknown).
    pub disk_free: Counter,
    pub tally: Tally,
    /// Every loss counter of the outbox (persistent totals), as of the last outbox tick.
    pub losses: Mutex<Vec<protocol::messages::LossTotal>>,
}

impl Metrics {
    pub fn set_last_failure(&self, ms: u64, reason: &str) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some((ms, reason.to_string()));
    }

    pub fn last_failure(&self) -> Option<(u64, String)> {
        self.last_failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn loss_totals(&self) -> Vec<protocol::messages::LossTotal> {
        self.losses.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
