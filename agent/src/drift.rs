//! Drift against the training baseline signed into the bundle (SPEC §6).
//!
//! Guarantees:
//! - memory per model is fixed by its baseline, whatever the traffic: per feature and per
//!   score column a count per bin and a handful of sums, per label output a count per class
//!   the baseline knows and one for the rest;
//! - every value of every row that reaches the model is counted: a missing value in
//!   `missing`, a value outside the training range in `below` or `above` as well as in its
//!   bin;
//! - a window closes after `window_rows` rows, or once it is `window_secs` old and holds at
//!   least `min_rows` rows, or on an operator schedule, or when the model changes; a window
//!   with fewer than `min_rows` rows is reported but never judged (`few_rows`), so small
//!   windows cannot raise alerts on noise.
//!
//! This module does no I/O: the inference task feeds it rows and outputs, and writes what it
//! returns.

use crate::engine::Outputs;
use protocol::baseline::{self, Baseline, Dist};
use protocol::messages::ModelRef;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A warn and an alert level for one measure; a value at or above a level reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Levels {
    pub warn: f64,
    pub alert: f64,
}

impl Levels {
    fn judge(&self, v: f64) -> Verdict {
        if v >= self.alert {
            Verdict::Alert
        } else if v >= self.warn {
            Verdict::Warn
        } else {
            Verdict::Ok
        }
    }
}

/// `[drift.thresholds]`. Defaults: PSI 0.1 / 0.25 (the common rule of thumb), KS 0.1 / 0.2,
/// mean shift 0.5 / 1 reference standard deviations, values outside the training range 1% /
/// 5% of a window, missing values 5 / 20 points above the training rate.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    pub psi: Levels,
    pub ks: Levels,
    pub mean_shift: Levels,
    pub out_of_range: Levels,
    pub missing: Levels,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            psi: Levels { warn: 0.1, alert: 0.25 },
            ks: Levels { warn: 0.1, alert: 0.2 },
            mean_shift: Levels { warn: 0.5, alert: 1.0 },
            out_of_range: Levels {
                warn: 0.01,
                alert: 0.05,
            },
            missing: Levels { warn: 0.05, alert: 0.2 },
        }
    }
}

impl Thresholds {
    /// The first pair whose levels are not `0 < warn <= alert`.
    pub fn invalid(&self) -> Option<&'static str> {
        [
            ("psi", self.psi),
            ("ks", self.ks),
            ("mean_shift", self.mean_shift),
            ("out_of_range", self.out_of_range),
            ("missing", self.missing),
        ]
        .into_iter()
        .find(|(_, l)| !(l.warn > 0.0 && l.warn <= l.alert && l.alert.is_finite()))
        .map(|(n, _)| n)
    }
}

/// How a window, a feature or an output compares with the baseline; ordered from least to
/// most worrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Too few rows to judge: the measures are reported, not judged.
    FewRows,
    Ok,
    Warn,
    Alert,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::FewRows => "few rows",
            Verdict::Ok => "ok",
            Verdict::Warn => "WARN",
            Verdict::Alert => "ALERT",
        }
    }
}

/// One feature, or one column of a score output, over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measures {
    pub name: String,
    /// The column of a score output with several values per row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    pub status: Verdict,
    /// Values counted in the bins (present and not NaN).
    pub values: u64,
    /// Missing values (a feature's `null`), or NaN values of an output.
    pub missing: u64,
    /// Values below the training minimum, and above the training maximum.
    pub below: u64,
    pub above: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psi: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ks: Option<f64>,
    /// (window mean - training mean) / training standard deviation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_shift: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    /// What reached a level, in words: `"PSI 0.41 >= 0.25"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

/// A closed window: a record of stream `drift` (SPEC §6.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub ts_ms: u64,
    pub model: ModelRef,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Rows the model ran on in this window.
    pub rows: u64,
    /// `count`, `time`, `schedule`, `model_change` or `shutdown`.
    pub closed_by: String,
    /// The worst of the features and outputs.
    pub status: Verdict,
    pub features: Vec<Measures>,
    pub outputs: Vec<Measures>,
}

impl Window {
    /// The features, the most worrying first (by verdict, then PSI), then the outputs in the
    /// same order: an input that moved is the cause, the outputs' drift its effect.
    pub fn worst(&self) -> Vec<&Measures> {
        let mut all = worst_first(&self.features);
        all.extend(worst_first(&self.outputs));
        all
    }
}

fn worst_first(v: &[Measures]) -> Vec<&Measures> {
    let mut v: Vec<&Measures> = v.iter().collect();
    v.sort_by(|a, b| {
        b.status
            .cmp(&a.status)
            .then(b.psi.unwrap_or(0.0).total_cmp(&a.psi.unwrap_or(0.0)))
    });
    v
}

/// Streaming counts of numbers against a reference distribution.
#[derive(Debug, Clone)]
struct Numbers {
    /// For a float32 input with at most 16 edges: the edges rounded down to float32 and padded
    /// with +inf, so that a bin is 16 compares the compiler can vectorise. For a float32 `x`,
    /// `e < x` holds exactly when `round_down_f32(e) < x`, so the bins are the same.
    fast: Option<[f32; 16]>,
    counts: Vec<u64>,
    missing: u64,
    below: u64,
    above: u64,
    /// Sum of (x - reference mean): summing deviations keeps the precision of the mean.
    sum_dev: f64,
}

impl Numbers {
    fn new(d: &Dist) -> Numbers {
        let fast = (d.edges.len() <= 16).then(|| {
            let mut edges = [f32::INFINITY; 16];
            for (slot, e) in edges.iter_mut().zip(&d.edges) {
                let f = *e as f32;
                *slot = if f64::from(f) > *e { f.next_down() } else { f };
            }
            edges
        });
        Numbers {
            fast,
            counts: vec![0; d.counts.len()],
            missing: 0,
            below: 0,
            above: 0,
            sum_dev: 0.0,
        }
    }

    /// Count a float32 feature value: the fast bins when there are few edges.
    /// Whether the value was outside the training range.
    #[inline]
    fn add_f32(&mut self, d: &Dist, x: f32) -> bool {
        let Some(edges) = &self.fast else {
            return self.add(d, f64::from(x));
        };
        if x.is_nan() {
            self.missing += 1;
            return false;
        }
        let bin: u32 = edges.iter().map(|e| u32::from(*e < x)).sum();
        self.counts[bin as usize] += 1;
        self.range(d, f64::from(x))
    }

    /// Count `x` against the range and the mean; whether it was outside the range.
    #[inline]
    fn range(&mut self, d: &Dist, x: f64) -> bool {
        self.sum_dev += x - d.mean;
        if x < d.min {
            self.below += 1;
            true
        } else if x > d.max {
            self.above += 1;
            true
        } else {
            false
        }
    }

    /// Whether the value was outside the training range.
    #[inline]
    fn add(&mut self, d: &Dist, x: f64) -> bool {
        if x.is_nan() {
            self.missing += 1;
            return false;
        }
        // The bin rule of `Dist::bin`: the edges below x. Counted without branches, which is
        // faster than a binary search for the few edges a baseline has.
        let bin = if d.edges.len() <= 32 {
            d.edges.iter().map(|e| usize::from(*e < x)).sum()
        } else {
            d.bin(x)
        };
        self.counts[bin] += 1;
        self.range(d, x)
    }

    fn values(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn clear(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        (self.missing, self.below, self.above, self.sum_dev) = (0, 0, 0, 0.0);
    }

    fn measure(
        &self,
        name: &str,
        column: Option<usize>,
        d: &Dist,
        ref_missing: f64,
        judge: Option<&Thresholds>,
    ) -> Measures {
        let values = self.values();
        let mean = (values > 0).then(|| d.mean + self.sum_dev / values as f64);
        let mut m = Measures {
            name: name.to_string(),
            column,
            status: Verdict::FewRows,
            values,
            missing: self.missing,
            below: self.below,
            above: self.above,
            psi: baseline::psi(&d.counts, &self.counts),
            ks: baseline::ks(&d.counts, &self.counts),
            mean_shift: mean.and_then(|m| baseline::mean_shift(d, m)),
            mean,
            reasons: vec![],
        };
        if let Some(t) = judge {
            let total = values + self.missing;
            let outside = (values > 0).then(|| (self.below + self.above) as f64 / values as f64);
            let missing_rise = (total > 0).then(|| self.missing as f64 / total as f64 - ref_missing);
            let checks = [
                ("PSI", m.psi, t.psi, ""),
                ("KS", m.ks, t.ks, ""),
                ("mean shift", m.mean_shift.map(f64::abs), t.mean_shift, " sd"),
                ("outside the training range", outside, t.out_of_range, " of values"),
                ("missing above the training rate", missing_rise, t.missing, " of rows"),
            ];
            m.status = Verdict::Ok;
            for (what, v, levels, unit) in checks {
                let Some(v) = v else { continue };
                let verdict = levels.judge(v);
                if verdict > Verdict::Ok {
                    let level = if verdict == Verdict::Alert {
                        levels.alert
                    } else {
                        levels.warn
                    };
                    m.reasons.push(if unit == " sd" || unit.is_empty() {
                        format!("{what} {v:.3}{unit} >= {level}")
                    } else {
                        format!("{what} {:.1}%{unit} >= {:.1}%", v * 100.0, level * 100.0)
                    });
                }
                m.status = m.status.max(verdict);
            }
        }
        m
    }
}

/// Streaming counts of labels against the baseline's classes.
#[derive(Debug, Clone)]
struct Labels {
    /// The baseline's classes, ascending, and their reference counts (then 0 for "other").
    classes: Vec<i64>,
    reference: Vec<u64>,
    /// One per class, then one for labels the baseline never saw.
    counts: Vec<u64>,
    nan: u64,
}

impl Labels {
    fn new(classes: &std::collections::BTreeMap<String, u64>) -> Labels {
        let mut pairs: Vec<(i64, u64)> = classes
            .iter()
            .filter_map(|(k, v)| k.parse::<i64>().ok().map(|k| (k, *v)))
            .collect();
        pairs.sort_unstable();
        let mut reference: Vec<u64> = pairs.iter().map(|p| p.1).collect();
        reference.push(0);
        Labels {
            counts: vec![0; pairs.len() + 1],
            classes: pairs.into_iter().map(|p| p.0).collect(),
            reference,
            nan: 0,
        }
    }

    #[inline]
    fn add(&mut self, x: f64) {
        if x.is_nan() {
            self.nan += 1;
            return;
        }
        let label = x as i64;
        let i = if self.classes.len() <= 8 {
            self.classes
                .iter()
                .position(|c| *c == label)
                .unwrap_or(self.classes.len())
        } else {
            self.classes.binary_search(&label).unwrap_or(self.classes.len())
        };
        self.counts[i] += 1;
    }

    fn measure(&self, name: &str, judge: Option<&Thresholds>) -> Measures {
        let psi = baseline::psi(&self.reference, &self.counts);
        let values = self.counts.iter().sum();
        let unseen = self.counts[self.classes.len()];
        let mut m = Measures {
            name: name.to_string(),
            column: None,
            status: Verdict::FewRows,
            values,
            missing: self.nan,
            below: 0,
            above: unseen,
            psi,
            ks: None,
            mean_shift: None,
            mean: None,
            reasons: vec![],
        };
        if let (Some(t), Some(p)) = (judge, psi) {
            m.status = t.psi.judge(p);
            if m.status > Verdict::Ok {
                let level = if m.status == Verdict::Alert {
                    t.psi.alert
                } else {
                    t.psi.warn
                };
                m.reasons.push(format!("PSI {p:.3} >= {level} (label mix)"));
            }
        }
        m
    }
}

#[derive(Debug, Clone)]
enum OutputCounts {
    Scores(Vec<Numbers>),
    Labels(Labels),
}

/// What closes windows, and how they are judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub window_rows: u64,
    pub window_ms: u64,
    pub min_rows: u64,
    pub thresholds: Thresholds,
}

/// The open window of one model.
#[derive(Debug)]
pub struct Tracker {
    pub model: ModelRef,
    baseline: Arc<Baseline>,
    policy: Policy,
    features: Vec<Numbers>,
    outputs: Vec<OutputCounts>,
    rows: u64,
    start_ms: u64,
    /// For each row of the last `add`: whether a feature was outside the training range.
    outside: Vec<bool>,
}

impl Tracker {
    pub fn new(model: ModelRef, baseline: Arc<Baseline>, policy: Policy, now_ms: u64) -> Tracker {
        let features = baseline.features.iter().map(|f| Numbers::new(&f.dist)).collect();
        let outputs = baseline
            .outputs
            .iter()
            .map(|o| match &o.classes {
                Some(c) => OutputCounts::Labels(Labels::new(c)),
                None => OutputCounts::Scores(o.columns.iter().map(Numbers::new).collect()),
            })
            .collect();
        Tracker {
            model,
            baseline,
            policy,
            features,
            outputs,
            rows: 0,
            start_ms: now_ms,
            outside: vec![],
        }
    }

    /// For each row of the last [`Tracker::add`]: whether a feature was outside the range.
    pub fn outside(&self) -> &[bool] {
        &self.outside
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Count rows: `values` holds them back to back in feature order, `outputs` the model's
    /// outputs for a batch in which they are rows `first..`.
    #[inline]
    pub fn add(&mut self, values: &[f32], outputs: &Outputs, first: usize) {
        let width = self.features.len();
        if width == 0 {
            return;
        }
        let n = values.len() / width;
        // Row by row, so that the counters of one feature are not bumped back to back.
        self.outside.clear();
        for row in values.chunks_exact(width) {
            let mut outside = false;
            for ((acc, f), x) in self.features.iter_mut().zip(&self.baseline.features).zip(row) {
                outside |= acc.add_f32(&f.dist, *x);
            }
            self.outside.push(outside);
        }
        for (acc, o) in self.outputs.iter_mut().zip(&self.baseline.outputs) {
            let Some(col) = outputs.column(&o.name) else { continue };
            for i in first..(first + n).min(outputs.rows()) {
                let v = col.row(i);
                match acc {
                    OutputCounts::Labels(l) => {
                        if let Some(x) = v.first() {
                            l.add(*x)
                        }
                    }
                    OutputCounts::Scores(cols) => {
                        for ((c, d), x) in cols.iter_mut().zip(&o.columns).zip(v) {
                            c.add(d, *x);
                        }
                    }
                }
            }
        }
        self.rows += n as u64;
    }

    /// Rows the open window takes before it closes on count.
    pub fn room(&self) -> u64 {
        self.policy.window_rows.saturating_sub(self.rows)
    }

    /// Whether the window should close now, and why.
    pub fn due(&self, now_ms: u64) -> Option<&'static str> {
        if self.rows >= self.policy.window_rows {
            Some("count")
        } else if self.rows >= self.policy.min_rows && now_ms.saturating_sub(self.start_ms) >= self.policy.window_ms {
            Some("time")
        } else {
            None
        }
    }

    /// When the window reaches its age, if it then holds enough rows to close on time.
    pub fn deadline_ms(&self) -> Option<u64> {
        (self.rows >= self.policy.min_rows).then(|| self.start_ms + self.policy.window_ms)
    }

    /// Close the window: measure and judge it, and start the next one empty.
    pub fn close(&mut self, now_ms: u64, closed_by: &str) -> Window {
        let judge = (self.rows >= self.policy.min_rows).then_some(&self.policy.thresholds);
        let features: Vec<Measures> = self
            .features
            .iter()
            .zip(&self.baseline.features)
            .map(|(acc, f)| acc.measure(&f.name, None, &f.dist, f.missing_rate, judge))
            .collect();
        let mut outputs = vec![];
        for (acc, o) in self.outputs.iter().zip(&self.baseline.outputs) {
            match acc {
                OutputCounts::Labels(l) => outputs.push(l.measure(&o.name, judge)),
                OutputCounts::Scores(cols) => {
                    let several = cols.len() > 1;
                    for (i, (c, d)) in cols.iter().zip(&o.columns).enumerate() {
                        outputs.push(c.measure(&o.name, several.then_some(i), d, 0.0, judge));
                    }
                }
            }
        }
        let status = features
            .iter()
            .chain(&outputs)
            .map(|m| m.status)
            .max()
            .unwrap_or(Verdict::FewRows);
        let w = Window {
            ts_ms: now_ms,
            model: self.model.clone(),
            start_ms: self.start_ms,
            end_ms: now_ms,
            rows: self.rows,
            closed_by: closed_by.to_string(),
            status,
            features,
            outputs,
        };
        self.reset(now_ms);
        w
    }

    /// Start the next window empty from `now_ms`, keeping the counters' memory.
    pub fn reset(&mut self, now_ms: u64) {
        for n in self.features.iter_mut() {
            n.clear();
        }
        for o in self.outputs.iter_mut() {
            match o {
                OutputCounts::Scores(cols) => cols.iter_mut().for_each(Numbers::clear),
                OutputCounts::Labels(l) => {
                    l.counts.iter_mut().for_each(|c| *c = 0);
                    l.nan = 0;
                }
            }
        }
        self.rows = 0;
        self.start_ms = now_ms;
    }
}

/// When an alert becomes an event: at once when a model enters alert, then at most once per
/// `repeat_ms` while it stays there.
#[derive(Debug, Default)]
pub struct Alerts {
    last_ms: Option<u64>,
}

impl Alerts {
    pub fn due(&mut self, w: &Window, repeat_ms: u64) -> bool {
        if w.status != Verdict::Alert {
            if w.status != Verdict::FewRows {
                self.last_ms = None;
            }
            return false;
        }
        if self.last_ms.is_some_and(|t| w.end_ms.saturating_sub(t) < repeat_ms) {
            return false;
        }
        self.last_ms = Some(w.end_ms);
        true
    }
}

/// The event message of an alert: the model, then the alerting features, worst first.
pub fn alert_message(w: &Window) -> String {
    let bad: Vec<String> = w
        .worst()
        .into_iter()
        .filter(|m| m.status == Verdict::Alert)
        .take(5)
        .map(|m| {
            let name = match m.column {
                Some(c) => format!("{}[{c}]", m.name),
                None => m.name.clone(),
            };
            format!("{name}: {}", m.reasons.join(", "))
        })
        .collect();
    let count = w
        .features
        .iter()
        .chain(&w.outputs)
        .filter(|m| m.status == Verdict::Alert)
        .count();
    format!(
        "{} v{} has drifted from its training data in the last {} rows: {count} alert(s); {}",
        w.model.name,
        w.model.version,
        w.rows,
        bad.join("; ")
    )
}

/// What `lathe status` shows of drift: written to the store when a window closes or the model
/// changes (meta `drift`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftState {
    pub model: ModelRef,
    /// False when the active bundle has no baseline: drift is off for it.
    pub baseline: bool,
    /// False when `drift.enabled` is off.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// When the open window started.
    #[serde(default)]
    pub window_start_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Window>,
}

fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Outputs;
    use protocol::baseline::{FeatureRef, OutputRef};

    fn baseline() -> Arc<Baseline> {
        let uniform: Vec<f64> = (0..1000).map(|i| i as f64 / 1000.0).collect();
        let dist = Dist::from_values(&uniform, 10).expect("dist");
        Arc::new(Baseline {
            format: 1,
            rows: 1000,
            features: vec![
                FeatureRef {
                    name: "a".into(),
                    missing_rate: 0.0,
                    dist: dist.clone(),
                },
                FeatureRef {
                    name: "b".into(),
                    missing_rate: 0.0,
                    dist,
                },
            ],
            outputs: vec![OutputRef {
                name: "label".into(),
                columns: vec![],
                classes: Some([("0".to_string(), 500), ("1".to_string(), 500)].into()),
            }],
        })
    }

    fn policy() -> Policy {
        Policy {
            window_rows: 1000,
            window_ms: 600_000,
            min_rows: 500,
            thresholds: Thresholds::default(),
        }
    }

    fn feed(
        t: &mut Tracker,
        a: impl Fn(usize) -> f32,
        b: impl Fn(usize) -> f32,
        label: impl Fn(usize) -> f64,
        n: usize,
    ) {
        let values: Vec<f32> = (0..n).flat_map(|i| [a(i), b(i)]).collect();
        let labels: Vec<f64> = (0..n).map(label).collect();
        t.add(&values, &Outputs::single("label", labels), 0);
    }

    fn model() -> ModelRef {
        ModelRef {
            name: "m".into(),
            version: 1,
        }
    }

    #[test]
    fn a_window_like_the_training_data_is_ok_and_a_shifted_feature_alerts() {
        let mut t = Tracker::new(model(), baseline(), policy(), 0);
        feed(
            &mut t,
            |i| (i % 1000) as f32 / 1000.0,
            |i| ((i * 7) % 1000) as f32 / 1000.0,
            |i| (i % 2) as f64,
            1000,
        );
        assert_eq!(t.due(1), Some("count"));
        let w = t.close(1, "count");
        assert_eq!(w.status, Verdict::Ok, "{w:#?}");
        assert!(w.features.iter().all(|f| f.psi.expect("psi") < 0.01), "{w:#?}");
        assert_eq!(t.rows(), 0, "the next window starts empty");

        // b moves up by half its range: PSI, KS, the mean and the range all say so.
        feed(
            &mut t,
            |i| (i % 1000) as f32 / 1000.0,
            |i| 0.5 + (i % 1000) as f32 / 1000.0,
            |i| (i % 2) as f64,
            1000,
        );
        let w = t.close(2, "count");
        assert_eq!(w.status, Verdict::Alert);
        let b = &w.features[1];
        assert_eq!((b.name.as_str(), b.status), ("b", Verdict::Alert));
        // 0.5 + k/1000 for k = 499..999 is above 0.999 (k = 499 by float32 rounding).
        assert_eq!(b.above, 501, "values above the training maximum 0.999");
        assert!((b.mean.expect("mean") - 0.9995).abs() < 1e-4, "{b:?}");
        assert!((b.ks.expect("ks") - 0.5).abs() < 0.01, "{b:?}");
        assert!(b.reasons.iter().any(|r| r.starts_with("PSI")), "{:?}", b.reasons);
        assert_eq!(w.features[0].status, Verdict::Ok);
        assert_eq!(w.worst()[0].name, "b", "worst first");
        assert!(alert_message(&w).contains("b: PSI"), "{}", alert_message(&w));
    }

    #[test]
    fn labels_missing_values_and_few_rows() {
        let mut t = Tracker::new(model(), baseline(), policy(), 0);
        // All one class, with a label never seen in training, and a missing `a` in each row.
        feed(
            &mut t,
            |_| f32::NAN,
            |i| (i % 1000) as f32 / 1000.0,
            |i| if i % 10 == 0 { 7.0 } else { 1.0 },
            600,
        );
        assert_eq!(t.due(1), None, "600 rows: not yet by count");
        assert_eq!(t.due(600_000), Some("time"), "old enough, and enough rows");
        let w = t.close(600_000, "time");
        let a = &w.features[0];
        assert_eq!((a.missing, a.values, a.status), (600, 0, Verdict::Alert), "{a:?}");
        let label = &w.outputs[0];
        assert_eq!(label.above, 60, "labels the baseline never saw");
        assert_eq!(label.status, Verdict::Alert, "{label:?}");

        feed(&mut t, |_| 5.0, |_| 5.0, |_| 3.0, 10);
        assert_eq!(t.due(u64::MAX), None, "10 rows never close on time");
        let w = t.close(700_000, "schedule");
        assert_eq!(w.status, Verdict::FewRows, "too few rows are reported, not judged");
        assert!(w.features.iter().all(|f| f.reasons.is_empty()));
        assert_eq!(w.features[0].above, 10);
    }

    #[test]
    fn alerts_are_sent_on_entry_then_at_most_once_per_repeat() {
        let w = |status, end_ms| Window {
            ts_ms: end_ms,
            model: model(),
            start_ms: 0,
            end_ms,
            rows: 1000,
            closed_by: "count".into(),
            status,
            features: vec![],
            outputs: vec![],
        };
        let mut a = Alerts::default();
        let check = |a: &mut Alerts, s, t, want| assert_eq!(a.due(&w(s, t), 1000), want, "{s:?} at {t}");
        check(&mut a, Verdict::Alert, 0, true);
        check(&mut a, Verdict::Alert, 500, false);
        check(&mut a, Verdict::FewRows, 700, false);
        check(&mut a, Verdict::Alert, 1000, true);
        check(&mut a, Verdict::Ok, 1100, false);
        check(&mut a, Verdict::Alert, 1200, true);
    }

    /// The float32 bins give every value the bin of the spec's rule, edges that are not
    /// float32 values included.
    #[test]
    fn fast_bins_are_the_bins_of_the_rule() {
        let d = Dist {
            edges: vec![-1.0, 0.1, 0.30000001192092896, 1.0 / 3.0, 2.5, 1e30],
            counts: vec![1; 7],
            mean: 0.0,
            std: 1.0,
            min: -5.0,
            max: 5.0,
        };
        let mut fast = Numbers::new(&d);
        assert!(fast.fast.is_some());
        let mut xs: Vec<f32> = vec![-1.0, 0.1, 0.3, 1.0 / 3.0, 2.5, 1e30, f32::MAX, -f32::MAX, 0.0];
        for e in &d.edges {
            let f = *e as f32;
            xs.extend([f, f.next_up(), f.next_down()]);
        }
        for x in xs {
            let want = d.bin(f64::from(x));
            let before = fast.counts.clone();
            fast.add_f32(&d, x);
            let got = fast
                .counts
                .iter()
                .zip(&before)
                .position(|(a, b)| a != b)
                .expect("counted");
            assert_eq!(got, want, "{x}");
        }
    }

    #[test]
    fn thresholds_must_be_ordered() {
        assert_eq!(Thresholds::default().invalid(), None);
        let t = Thresholds {
            ks: Levels { warn: 0.3, alert: 0.2 },
            ..Thresholds::default()
        };
        assert_eq!(t.invalid(), Some("ks"));
    }
}
