//! Which rows are captured, with their outputs, into the `samples` stream for retraining
//! (SPEC §6.5).
//!
//! A row is kept when it is the `every`-th, when a feature lies outside the baseline's
//! training range, when the model's top class probability is below `low_confidence`, or when
//! the drift window it belongs to alerts (a uniform sample of the window of at most
//! `alert_rows` rows, held in fixed memory until the window closes). At most `max_per_minute`
//! are kept a minute; the rest are counted as lost, never dropped silently.
//!
//! No I/O: the inference task asks and writes.

use crate::config::SamplesConfig;
use crate::engine::Outputs;
use protocol::baseline::Baseline;
use protocol::messages::ModelRef;
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// Why a row was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Every,
    OutOfRange,
    LowConfidence,
    DriftAlert,
}

/// One sample: a record of stream `samples`. Features by name, `null` when missing.
#[derive(Debug, Serialize)]
pub struct Sample<'a> {
    pub ts_ms: u64,
    pub model: &'a ModelRef,
    pub reason: Reason,
    pub source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reading_id: Option<&'a RawValue>,
    pub features: BTreeMap<&'a str, Option<f32>>,
    pub outputs: BTreeMap<&'a str, &'a [f64]>,
}

/// A row held for a window that may alert.
#[derive(Debug, Clone)]
pub struct Held {
    pub ts_ms: u64,
    pub source: std::sync::Arc<str>,
    pub values: Vec<f32>,
    pub outputs: Vec<(String, Vec<f64>)>,
}

#[derive(Debug)]
pub struct Sampler {
    cfg: SamplesConfig,
    /// Rows seen since the last `every` pick.
    count: u64,
    /// When the current minute of the allowance started.
    minute_start_ms: Option<u64>,
    this_minute: u64,
    /// A uniform sample of the open drift window's rows, and how many rows it was drawn from.
    reservoir: Vec<Held>,
    window_rows: u64,
}

/// Whether any output row looks like class probabilities whose top value is below `floor`.
fn low_confidence(outputs: &Outputs, i: usize, floor: f64) -> bool {
    outputs.columns().iter().any(|c| {
        let r = c.row(i);
        r.len() >= 2
            && r.iter().all(|p| (0.0..=1.0).contains(p))
            && (r.iter().sum::<f64>() - 1.0).abs() < 1e-3
            && r.iter().copied().fold(0.0, f64::max) < floor
    })
}

impl Sampler {
    pub fn new(cfg: SamplesConfig) -> Sampler {
        Sampler {
            cfg,
            count: 0,
            minute_start_ms: None,
            this_minute: 0,
            reservoir: vec![],
            window_rows: 0,
        }
    }

    /// Whether row `i` of a batch is kept, and why. `values` is the row.
    pub fn pick(&mut self, values: &[f32], outputs: &Outputs, i: usize, baseline: Option<&Baseline>) -> Option<Reason> {
        if self.cfg.every > 0 {
            self.count += 1;
            if self.count >= self.cfg.every {
                self.count = 0;
                return Some(Reason::Every);
            }
        }
        if self.cfg.out_of_range {
            if let Some(b) = baseline {
                let outside = values
                    .iter()
                    .zip(&b.features)
                    .any(|(v, f)| !v.is_nan() && (f64::from(*v) < f.dist.min || f64::from(*v) > f.dist.max));
                if outside {
                    return Some(Reason::OutOfRange);
                }
            }
        }
        if self.cfg.low_confidence > 0.0 && low_confidence(outputs, i, self.cfg.low_confidence) {
            return Some(Reason::LowConfidence);
        }
        None
    }

    /// Offer a row of the open drift window to the reservoir (algorithm R).
    pub fn hold(&mut self, make: impl FnOnce() -> Held) {
        if self.cfg.alert_rows == 0 {
            return;
        }
        self.window_rows += 1;
        if self.reservoir.len() < self.cfg.alert_rows {
            self.reservoir.push(make());
        } else {
            let j = rand::random::<u64>() % self.window_rows;
            if (j as usize) < self.cfg.alert_rows {
                self.reservoir[j as usize] = make();
            }
        }
    }

    /// The window closed: its held rows if it alerted; the reservoir starts again empty.
    pub fn window_closed(&mut self, alerted: bool) -> Vec<Held> {
        self.window_rows = 0;
        let held = std::mem::take(&mut self.reservoir);
        if alerted {
            held
        } else {
            vec![]
        }
    }

    /// Take room for one sample this minute; false when the minute's allowance is spent.
    pub fn admit(&mut self, now_ms: u64) -> bool {
        if self.minute_start_ms.is_none_or(|m| now_ms.saturating_sub(m) >= 60_000) {
            self.minute_start_ms = Some(now_ms);
            self.this_minute = 0;
        }
        if self.this_minute >= self.cfg.max_per_minute {
            return false;
        }
        self.this_minute += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::baseline::{Dist, FeatureRef};

    fn cfg() -> SamplesConfig {
        SamplesConfig {
            every: 3,
            out_of_range: true,
            low_confidence: 0.6,
            alert_rows: 4,
            max_per_minute: 5,
        }
    }

    fn baseline() -> Baseline {
        Baseline {
            format: 1,
            rows: 3,
            features: vec![FeatureRef {
                name: "a".into(),
                missing_rate: 0.0,
                dist: Dist::from_values(&[0.0, 1.0, 2.0], 2).expect("dist"),
            }],
            outputs: vec![],
        }
    }

    #[test]
    fn rows_are_kept_by_count_range_and_confidence() {
        let mut s = Sampler::new(cfg());
        let b = baseline();
        let sure = Outputs::single("label", vec![1.0]);
        let pick = |s: &mut Sampler, v: f32, o: &Outputs| s.pick(&[v], o, 0, Some(&b));
        assert_eq!(pick(&mut s, 1.0, &sure), None);
        assert_eq!(pick(&mut s, 1.0, &sure), None);
        assert_eq!(pick(&mut s, 1.0, &sure), Some(Reason::Every));
        assert_eq!(pick(&mut s, 2.5, &sure), Some(Reason::OutOfRange));
        assert_eq!(pick(&mut s, f32::NAN, &sure), None, "missing is not out of range");
        // Probabilities [0.55, 0.45]: top class below 0.6.
        let mut s = Sampler::new(SamplesConfig { every: 0, ..cfg() });
        let two = Outputs::of(vec![("p", 1, vec![0.55]), ("q", 1, vec![0.45])]);
        assert_eq!(
            pick(&mut s, 1.0, &two),
            None,
            "two one-wide outputs are not one distribution"
        );
        let unsure = Outputs::of(vec![("probabilities", 2, vec![0.55, 0.45])]);
        assert_eq!(pick(&mut s, 1.0, &unsure), Some(Reason::LowConfidence));
        let sure = Outputs::of(vec![("probabilities", 2, vec![0.9, 0.1])]);
        assert_eq!(pick(&mut s, 1.0, &sure), None);
    }

    #[test]
    fn the_reservoir_is_bounded_and_kept_only_for_alerts() {
        let mut s = Sampler::new(cfg());
        let row = |k: f32| Held {
            ts_ms: 0,
            source: "t".into(),
            values: vec![k],
            outputs: vec![],
        };
        for k in 0..1000 {
            s.hold(|| row(k as f32));
        }
        assert_eq!(s.reservoir.len(), 4);
        assert!(
            s.reservoir.iter().any(|h| h.values[0] >= 4.0),
            "later rows replace earlier ones"
        );
        assert_eq!(s.window_closed(false).len(), 0);
        for k in 0..3 {
            s.hold(|| row(k as f32));
        }
        assert_eq!(s.window_closed(true).len(), 3);
    }

    #[test]
    fn at_most_max_per_minute() {
        let mut s = Sampler::new(cfg());
        let admitted = (0..8).filter(|_| s.admit(1_000)).count();
        assert_eq!(admitted, 5);
        assert!(!s.admit(60_999));
        assert!(s.admit(61_000), "a new minute");
    }
}
