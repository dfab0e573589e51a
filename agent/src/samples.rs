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
    /// A tabular model's features.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub features: BTreeMap<&'a str, Option<f32>>,
    /// A tensor model's inputs (1.7).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<&'a str, TensorSample>,
    pub outputs: BTreeMap<&'a str, &'a [f64]>,
}

/// One input of a tensor model in a sample: its shape after the batch axis and its values as
/// base64 of little-endian float32.
#[derive(Debug, Serialize)]
pub struct TensorSample {
    pub shape: Vec<usize>,
    pub b64: String,
}

/// A row held for a window that may alert. Its buffers are reused when a later row takes its
/// place, so that holding rows allocates nothing once the reservoir is full.
#[derive(Debug, Clone, Default)]
struct Slot {
    ts_ms: u64,
    source: Option<std::sync::Arc<str>>,
    values: Vec<f32>,
    /// Every output's values for the row, back to back, in the layout of [`Sampler::layout`].
    outputs: Vec<f64>,
}

/// A held row of a window that alerted, handed back to be written as a sample.
#[derive(Debug, Clone, PartialEq)]
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
    /// A uniform sample of the open drift window's rows (the first `held` slots), how many rows
    /// it was drawn from, and the outputs' names and widths.
    reservoir: Vec<Slot>,
    held: usize,
    window_rows: u64,
    layout: Vec<(std::sync::Arc<str>, usize)>,
    /// xorshift64 state for the reservoir: cheap, and good enough to pick rows uniformly.
    rng: u64,
    /// Algorithm L once the reservoir is full: the row that replaces a held one next, and the
    /// running weight; the rows in between cost one comparison each.
    next_row: u64,
    weight: f64,
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
            held: 0,
            window_rows: 0,
            layout: vec![],
            rng: rand::random::<u64>() | 1,
            next_row: 0,
            weight: 0.0,
        }
    }

    /// Whether row `i` of a batch is kept, and why. `values` is the row; `outside` says whether
    /// it is outside the baseline's range, when the drift window already found out.
    #[inline]
    pub fn pick(
        &mut self,
        values: &[f32],
        outputs: &Outputs,
        i: usize,
        baseline: Option<&Baseline>,
        outside: Option<bool>,
    ) -> Option<Reason> {
        if self.cfg.every > 0 {
            self.count += 1;
            if self.count >= self.cfg.every {
                self.count = 0;
                return Some(Reason::Every);
            }
        }
        if self.cfg.out_of_range {
            let outside = outside.unwrap_or_else(|| {
                baseline.is_some_and(|b| {
                    values
                        .iter()
                        .zip(&b.features)
                        .any(|(v, f)| !v.is_nan() && (f64::from(*v) < f.dist.min || f64::from(*v) > f.dist.max))
                })
            });
            if outside {
                return Some(Reason::OutOfRange);
            }
        }
        if self.cfg.low_confidence > 0.0 && low_confidence(outputs, i, self.cfg.low_confidence) {
            return Some(Reason::LowConfidence);
        }
        None
    }

    /// Offer row `i` of a batch, part of the open drift window, to the reservoir (algorithm R).
    #[inline]
    pub fn hold(&mut self, ts_ms: u64, source: &std::sync::Arc<str>, row: &[f32], outputs: &Outputs, i: usize) {
        if self.cfg.alert_rows == 0 {
            return;
        }
        self.window_rows += 1;
        let k = self.cfg.alert_rows;
        let slot = if self.held < k {
            if self.held == 0 {
                self.layout = outputs.columns().iter().map(|c| (c.name.clone(), c.width)).collect();
            }
            if self.reservoir.len() == self.held {
                self.reservoir.push(Slot::default());
            }
            self.held += 1;
            if self.held == k {
                self.weight = (self.uniform().ln() / k as f64).exp();
                self.skip();
            }
            self.held - 1
        } else {
            if self.window_rows != self.next_row {
                return;
            }
            let j = ((u128::from(self.random()) * k as u128) >> 64) as usize;
            self.weight *= (self.uniform().ln() / k as f64).exp();
            self.skip();
            j
        };
        let s = &mut self.reservoir[slot];
        s.ts_ms = ts_ms;
        s.source = Some(source.clone());
        s.values.clear();
        s.values.extend_from_slice(row);
        s.outputs.clear();
        for c in outputs.columns() {
            s.outputs.extend_from_slice(c.row(i));
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.random() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Algorithm L: the next row that takes a place in the full reservoir.
    fn skip(&mut self) {
        let gap = (self.uniform().ln() / (1.0 - self.weight).ln()).floor();
        self.next_row = self.window_rows + 1 + if gap.is_finite() { gap.min(1e15) as u64 } else { 0 };
    }

    /// The window closed: its held rows if it alerted; the reservoir starts again empty.
    pub fn window_closed(&mut self, alerted: bool) -> Vec<Held> {
        let held = std::mem::take(&mut self.held);
        self.window_rows = 0;
        if !alerted {
            return vec![];
        }
        self.reservoir[..held]
            .iter()
            .map(|s| {
                let mut at = 0;
                let outputs = self
                    .layout
                    .iter()
                    .map(|(name, width)| {
                        let v = s.outputs.get(at..at + width).unwrap_or_default().to_vec();
                        at += width;
                        (name.to_string(), v)
                    })
                    .collect();
                Held {
                    ts_ms: s.ts_ms,
                    source: s.source.clone().unwrap_or_else(|| std::sync::Arc::from("")),
                    values: s.values.clone(),
                    outputs,
                }
            })
            .collect()
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
        let pick = |s: &mut Sampler, v: f32, o: &Outputs| s.pick(&[v], o, 0, Some(&b), None);
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
        let source: std::sync::Arc<str> = "t".into();
        let out = |k: f64| Outputs::of(vec![("label", 1, vec![k]), ("p", 2, vec![0.25, 0.75])]);
        for k in 0..1000 {
            s.hold(k, &source, &[k as f32], &out(k as f64), 0);
        }
        assert_eq!((s.held, s.reservoir.len()), (4, 4));
        assert!(
            s.reservoir.iter().any(|h| h.values[0] >= 4.0),
            "later rows replace earlier ones"
        );
        assert_eq!(s.window_closed(false).len(), 0);
        for k in 0..3 {
            s.hold(k, &source, &[k as f32], &out(k as f64), 0);
        }
        let held = s.window_closed(true);
        assert_eq!(held.len(), 3);
        assert_eq!(
            held[2],
            Held {
                ts_ms: 2,
                source: source.clone(),
                values: vec![2.0],
                outputs: vec![("label".into(), vec![2.0]), ("p".into(), vec![0.25, 0.75])],
            }
        );
        assert_eq!(s.reservoir.len(), 4, "the buffers are kept for the next window");
    }

    /// Every row of a window is as likely to be held: over 2,000 windows of 100 rows, the
    /// first and the second half of a window each give about half the held rows, and so do
    /// the first 10 rows (the reservoir's initial fill) a tenth.
    #[test]
    fn the_reservoir_is_a_uniform_sample() {
        let mut s = Sampler::new(cfg());
        let source: std::sync::Arc<str> = "t".into();
        let out = Outputs::single("y", vec![0.0]);
        let (mut first_half, mut first_tenth, mut all) = (0, 0, 0);
        for _ in 0..2000 {
            for k in 0..100 {
                s.hold(k, &source, &[k as f32], &out, 0);
            }
            for h in s.window_closed(true) {
                all += 1;
                first_half += usize::from(h.ts_ms < 50);
                first_tenth += usize::from(h.ts_ms < 10);
            }
        }
        assert_eq!(all, 8000);
        let share = |n: usize| n as f64 / all as f64;
        assert!((0.45..0.55).contains(&share(first_half)), "{}", share(first_half));
        assert!((0.07..0.13).contains(&share(first_tenth)), "{}", share(first_tenth));
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
