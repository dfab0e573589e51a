//! The watch period after an activation (SPEC.md §8.4): how a newly activated model behaves,
//! counted by the inference task for exactly the model that ran, and judged by [`Rules`]
//! without I/O.
//!
//! - A [`Trial`] lives inside the model it watches (`ActiveModel::trial`), so rows are counted
//!   for the model that ran them, whatever was switched while they ran.
//! - An output is *out of range* when it falls outside what the bundle's training baseline saw
//!   (§4.9), widened by `range_margin` of its span on each side, or is a label the training data
//!   never had. A model without a baseline is judged on failures, non-finite outputs and latency
//!   only.
//! - The trial only counts; [`judge`] decides. An early verdict can fail a model once it has
//!   enough rows; only the end of the period commits one.

use crate::engine::Outputs;
use crate::metrics::{Counter, Latencies};
use protocol::baseline::Baseline;
use std::collections::BTreeSet;
use std::time::Duration;

/// The share of an output's training span an output may stray past it on each side, unless
/// configured (`rollout.watch.range_margin`).
pub const DEFAULT_RANGE_MARGIN: f64 = 0.25;

/// What an output may be, from the training baseline.
#[derive(Debug, Clone, PartialEq)]
enum Range {
    /// Each value of a row within `[lo, hi]`, by position (positions past the list are free).
    Values(Vec<(f64, f64)>),
    /// A label among these.
    Classes(BTreeSet<i64>),
}

/// The counts of one model since it was activated.
#[derive(Debug, Default)]
pub struct Trial {
    rows: Counter,
    failed: Counter,
    non_finite: Counter,
    out_of_range: Counter,
    latency: Latencies,
    ranges: Vec<(String, Range)>,
}

/// A reading of a [`Trial`].
pub use protocol::rollout::WatchCounts as Counts;

impl Trial {
    /// A trial judged against `baseline`'s outputs, widened by `margin` of each span.
    pub fn new(baseline: Option<&Baseline>, margin: f64) -> Trial {
        let ranges = baseline
            .map(|b| {
                b.outputs
                    .iter()
                    .map(|o| {
                        let range = match &o.classes {
                            Some(c) => Range::Classes(c.keys().filter_map(|k| k.parse().ok()).collect()),
                            None => Range::Values(
                                o.columns
                                    .iter()
                                    .map(|d| {
                                        let pad = (d.max - d.min) * margin;
                                        (d.min - pad, d.max + pad)
                                    })
                                    .collect(),
                            ),
                        };
                        (o.name.clone(), range)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Trial {
            ranges,
            ..Trial::default()
        }
    }

    /// Count a successful inference call of `took` and its outputs.
    pub fn ran(&self, outputs: &Outputs, took: Duration) {
        let rows = outputs.rows();
        self.latency.record(took, rows as u64);
        self.rows.add(rows as u64);
        // Each output's range, looked up once per call, not per row.
        let columns: Vec<_> = outputs
            .columns()
            .iter()
            .map(|c| (c, self.ranges.iter().find(|(n, _)| **n == *c.name).map(|(_, r)| r)))
            .collect();
        let (mut non_finite, mut out_of_range) = (0, 0);
        for i in 0..rows {
            let mut nan = false;
            let mut outside = false;
            for (c, range) in &columns {
                let row = c.row(i);
                nan |= row.iter().any(|v| !v.is_finite());
                outside |= match range {
                    None => false,
                    Some(Range::Values(bounds)) => row
                        .iter()
                        .zip(bounds)
                        .any(|(v, (lo, hi))| v.is_finite() && (v < lo || v > hi)),
                    Some(Range::Classes(labels)) => row
                        .iter()
                        .any(|v| v.is_finite() && (v.fract() != 0.0 || !labels.contains(&(*v as i64)))),
                };
            }
            non_finite += nan as u64;
            out_of_range += outside as u64;
        }
        self.non_finite.add(non_finite);
        self.out_of_range.add(out_of_range);
    }

    /// Count `n` rows whose inference failed.
    pub fn failed(&self, n: u64) {
        self.failed.add(n);
    }

    pub fn counts(&self) -> Counts {
        Counts {
            rows: self.rows.get(),
            failed: self.failed.get(),
            non_finite: self.non_finite.get(),
            out_of_range: self.out_of_range.get(),
            p99_us: self.latency.peek().map_or(0, |(_, _, _, p99)| p99),
        }
    }
}

/// What a watched model must keep to (`[rollout.watch]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    /// How long a new model is watched; zero: not watched, committed at activation.
    pub period: Duration,
    /// The most rows that may fail, as a share of the rows tried.
    pub max_failed_ratio: f64,
    /// The most rows with a NaN or infinite output, as a share of the rows run.
    pub max_non_finite_ratio: f64,
    /// The most rows with an output outside the training range, as a share of the rows run.
    pub max_out_of_range_ratio: f64,
    /// The slowest an inference call may be at the 99th percentile.
    pub max_latency: Duration,
    /// Rows needed before the watch may fail a model before its period ends.
    pub early_rows: u64,
    /// The share of an output's training span it may stray past it on each side.
    pub range_margin: f64,
}

/// Whether a watched model keeps to the rules: `Err` says which rule it broke. Before the end
/// (`end` false) only a model with `early_rows` rows tried can fail; a model without any row
/// passes at the end, with nothing against it.
pub fn judge(c: &Counts, r: &Rules, end: bool) -> Result<(), String> {
    let tried = c.rows + c.failed;
    if !end && tried < r.early_rows {
        return Ok(());
    }
    let share = |n: u64, of: u64| if of == 0 { 0.0 } else { n as f64 / of as f64 };
    let ratios = [
        (c.failed, tried, r.max_failed_ratio, "rows whose inference failed"),
        (
            c.non_finite,
            c.rows,
            r.max_non_finite_ratio,
            "rows with a NaN or infinite output",
        ),
        (
            c.out_of_range,
            c.rows,
            r.max_out_of_range_ratio,
            "rows with an output outside the training baseline's range",
        ),
    ];
    for (n, of, max, what) in ratios {
        if share(n, of) > max {
            return Err(format!(
                "{what}: {n} of {of} ({:.1}%, at most {:.1}% allowed)",
                100.0 * share(n, of),
                100.0 * max
            ));
        }
    }
    if c.p99_us > r.max_latency.as_micros() as u64 {
        return Err(format!(
            "inference took {} ms at the 99th percentile (at most {} ms allowed)",
            c.p99_us.div_ceil(1000),
            r.max_latency.as_millis()
        ));
    }
    Ok(())
}

/// The counts in a sentence, for a commit's event.
pub fn summary(c: &Counts) -> String {
    format!(
        "{} rows, {} failed, {} non-finite, {} out of range, p99 {} µs",
        c.rows, c.failed, c.non_finite, c.out_of_range, c.p99_us
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::baseline::{Dist, OutputRef};

    fn dist(min: f64, max: f64) -> Dist {
        Dist {
            edges: vec![],
            counts: vec![1],
            mean: (min + max) / 2.0,
            std: 0.0,
            min,
            max,
        }
    }

    fn baseline() -> Baseline {
        Baseline {
            format: 1,
            rows: 10,
            features: vec![],
            outputs: vec![
                OutputRef {
                    name: "label".into(),
                    columns: vec![],
                    classes: Some([("0".to_string(), 5), ("1".to_string(), 5)].into()),
                },
                OutputRef {
                    name: "score".into(),
                    columns: vec![dist(0.0, 1.0), dist(10.0, 20.0)],
                    classes: None,
                },
            ],
        }
    }

    fn rules() -> Rules {
        Rules {
            period: Duration::from_secs(60),
            max_failed_ratio: 0.01,
            max_non_finite_ratio: 0.0,
            max_out_of_range_ratio: 0.1,
            max_latency: Duration::from_millis(100),
            early_rows: 100,
            range_margin: 0.25,
        }
    }

    /// One row of (label, [score0, score1]) per case; the counts it gives.
    fn check(rows: &[(f64, [f64; 2])], want: (u64, u64)) {
        let t = Trial::new(Some(&baseline()), 0.25);
        let outputs = Outputs::of(vec![
            ("label", 1, rows.iter().map(|r| r.0).collect()),
            ("score", 2, rows.iter().flat_map(|r| r.1).collect()),
        ]);
        t.ran(&outputs, Duration::from_micros(50));
        let c = t.counts();
        assert_eq!(c.rows, rows.len() as u64);
        assert_eq!((c.non_finite, c.out_of_range), want, "{rows:?}");
    }

    #[test]
    fn outputs_are_held_to_the_training_range() {
        check(&[(0.0, [0.5, 15.0]), (1.0, [0.0, 20.0])], (0, 0));
        // Within the margin (a quarter of the span on each side), and just past it.
        check(&[(1.0, [1.25, 7.5])], (0, 0));
        check(&[(1.0, [1.26, 15.0])], (0, 1));
        check(&[(1.0, [0.5, 22.6])], (0, 1));
        // A label the training data never had, or not a whole number.
        check(&[(2.0, [0.5, 15.0])], (0, 1));
        check(&[(0.5, [0.5, 15.0])], (0, 1));
        // NaN counts as non-finite, not as out of range; two bad outputs are one bad row.
        check(&[(0.0, [f64::NAN, 15.0]), (0.0, [f64::INFINITY, 99.0])], (2, 1));
        check(&[(7.0, [9.0, 99.0])], (0, 1));
    }

    #[test]
    fn a_model_without_a_baseline_is_held_to_finite_outputs_only() {
        let t = Trial::new(None, 0.25);
        t.ran(
            &Outputs::single("score", vec![1e9, -1e9, f64::NAN]),
            Duration::from_micros(10),
        );
        t.failed(2);
        let c = t.counts();
        assert_eq!((c.rows, c.failed, c.non_finite, c.out_of_range), (3, 2, 1, 0));
    }

    fn counts(rows: u64, failed: u64, non_finite: u64, out_of_range: u64, p99_us: u64) -> Counts {
        Counts {
            rows,
            failed,
            non_finite,
            out_of_range,
            p99_us,
        }
    }

    #[test]
    fn the_rules_decide() {
        let r = rules();
        let ok = |c: Counts, end| judge(&c, &r, end).is_ok();
        assert!(ok(counts(1000, 10, 0, 100, 100_000), true), "at every limit");
        assert!(!ok(counts(1000, 11, 0, 0, 0), true), "failures");
        assert!(!ok(counts(1000, 0, 1, 0, 0), true), "one NaN");
        assert!(!ok(counts(1000, 0, 0, 101, 0), true), "out of range");
        assert!(!ok(counts(1000, 0, 0, 0, 100_001), true), "slow");
        assert!(ok(counts(0, 0, 0, 0, 0), true), "nothing ran: nothing against it");
        // Before the end, a model fails only once it has enough rows.
        assert!(ok(counts(50, 49, 0, 0, 0), false));
        assert!(!ok(counts(50, 50, 0, 0, 0), false));
        assert!(!ok(counts(0, 100, 0, 0, 0), false), "every row failing fails early");
        let e = judge(&counts(90, 10, 0, 0, 0), &r, true).expect_err("fails");
        assert_eq!(
            e,
            "rows whose inference failed: 10 of 100 (10.0%, at most 1.0% allowed)"
        );
    }
}
