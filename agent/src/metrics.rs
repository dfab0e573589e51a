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
use protocol::messages::{Latency, ProcessHealth, StreamDepth, SystemHealth};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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

/// Durations in buckets a quarter power of two wide (within 19%), from 1 µs to about 70 s:
/// fixed memory, lock-free recording. Read and reset together by [`Latencies::take`].
#[derive(Debug)]
pub struct Latencies {
    buckets: [AtomicU64; Latencies::BUCKETS],
    rows: AtomicU64,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            rows: AtomicU64::new(0),
        }
    }
}

impl Latencies {
    const BUCKETS: usize = 105;

    fn bucket(us: u64) -> usize {
        if us <= 1 {
            return 0;
        }
        ((4.0 * (us as f64).log2()).ceil() as usize).min(Self::BUCKETS - 1)
    }

    /// The largest duration a bucket holds, in µs.
    fn upper(i: usize) -> u64 {
        2f64.powf(i as f64 / 4.0).round() as u64
    }

    pub fn record(&self, d: std::time::Duration, rows: u64) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        self.buckets[Self::bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows, Ordering::Relaxed);
    }

    /// (calls, rows, p50 µs, p99 µs) since the last take, and start again; `None` when there
    /// were no calls.
    pub fn take(&self) -> Option<(u64, u64, u64, u64)> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.swap(0, Ordering::Relaxed)).collect();
        Self::summary(&counts, self.rows.swap(0, Ordering::Relaxed))
    }

    /// As [`Latencies::take`], without starting again.
    pub fn peek(&self) -> Option<(u64, u64, u64, u64)> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        Self::summary(&counts, self.rows.load(Ordering::Relaxed))
    }

    fn summary(counts: &[u64], rows: u64) -> Option<(u64, u64, u64, u64)> {
        let calls: u64 = counts.iter().sum();
        if calls == 0 {
            return None;
        }
        let at = |q: f64| {
            let rank = ((q * calls as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Self::upper(i);
                }
            }
            Self::upper(Self::BUCKETS - 1)
        };
        Some((calls, rows, at(0.5), at(0.99)))
    }
}

/// A cumulative histogram of durations, in the fixed buckets the local API's `/metrics` shows
/// (seconds, upper bounds inclusive): lock-free, never reset.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; Histogram::BOUNDS.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Upper bounds in seconds, from 100 µs to 10 s.
    pub const BOUNDS: [f64; 14] = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
    ];

    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = Self::BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(Self::BOUNDS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (the last one is `+Inf`: every observation), and the sum
    /// in seconds.
    pub fn cumulative(&self) -> (Vec<u64>, f64) {
        let mut seen = 0;
        let counts = self
            .counts
            .iter()
            .map(|c| {
                seen += c.load(Ordering::Relaxed);
                seen
            })
            .collect();
        (counts, self.sum_us.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// What the local API served, by status code.
#[derive(Debug, Default)]
pub struct ApiCounters {
    by_code: Mutex<BTreeMap<u16, u64>>,
    pub duration: Histogram,
}

impl ApiCounters {
    pub fn served(&self, code: u16, took: std::time::Duration) {
        *self
            .by_code
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code)
            .or_default() += 1;
        self.duration.observe(took);
    }

    pub fn by_code(&self) -> BTreeMap<u16, u64> {
        self.by_code.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The last sample of the box and of the agent's process, and the outbox per stream: what
/// health messages and `lathe status` show.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    #[serde(default)]
    pub system: Option<SystemHealth>,
    #[serde(default)]
    pub process: Option<ProcessHealth>,
    #[serde(default)]
    pub outbox: Vec<StreamDepth>,
    /// Inference latency over the last health interval that had calls.
    #[serde(default)]
    pub latency: Option<Latency>,
    /// The same, of the models of the other slots (SPEC §8.8).
    #[serde(default)]
    pub latencies: Vec<Latency>,
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// How long inference calls of the first model slot take (each other slot has its own).
    pub latency: Arc<Latencies>,
    /// The last system sample and the outbox per stream.
    pub snapshot: Mutex<Snapshot>,
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
    /// Drift windows that closed in alert, every slot.
    pub drift_alerts: Counter,
    /// Inference calls, every slot.
    pub inference_seconds: Histogram,
    /// Connections made again after one was lost: the hub link's and the readings link's.
    pub reconnects_hub: Counter,
    pub reconnects_sensors: Counter,
    /// The local API.
    pub api: ApiCounters,
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

#[cfg(test)]
mod latency_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn percentiles_within_a_bucket() {
        let l = Latencies::default();
        assert_eq!(l.take(), None);
        for _ in 0..98 {
            l.record(Duration::from_micros(100), 2);
        }
        l.record(Duration::from_micros(5_000), 2);
        l.record(Duration::from_micros(5_000), 2);
        let (calls, rows, p50, p99) = l.take().expect("calls");
        assert_eq!((calls, rows), (100, 200));
        assert!((100..=119).contains(&p50), "{p50}");
        assert!((5_000..=5_950).contains(&p99), "{p99}");
        assert_eq!(l.take(), None, "taken and reset");
        l.record(Duration::from_micros(100), 1);
        assert_eq!(l.peek(), l.peek(), "a peek does not reset");
        assert_eq!(l.peek().map(|p| p.0), Some(1));
    }
}

#[cfg(test)]
mod histogram_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (counts, sum) = h.cumulative();
        assert_eq!(counts.len(), Histogram::BOUNDS.len() + 1);
        assert_eq!(&counts[..6], &[1, 2, 2, 2, 2, 3]);
        assert_eq!(counts[Histogram::BOUNDS.len() - 1], 3, "60 s is above the last bound");
        assert_eq!(counts[Histogram::BOUNDS.len()], 4, "+Inf holds every observation");
        assert!((sum - 60.003201).abs() < 1e-9, "{sum}");
    }
}
