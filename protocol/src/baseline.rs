//! The drift baseline payload (`role: "baseline"`, SPEC §4.9) and the drift measures (§6.2).
//!
//! A baseline describes the training data a model was fitted on: for each input feature its
//! quantile bins with the reference histogram, mean, standard deviation, range and missing
//! rate; for each model output the distribution of its scores (bins, per column) or of its
//! labels (classes). An agent counts live values into the same bins and compares.
//!
//! Bin rule (the same everywhere): with interior edges `e[0] < … < e[k-1]`, a value `x` falls
//! in bin `i` = the number of edges strictly below `x`, so bin `i` holds
//! `e[i-1] < x <= e[i]`, the first bin everything up to `e[0]` and the last everything above
//! `e[k-1]`. This is numpy's `searchsorted(edges, x, side="left")`.

use crate::bundle::Manifest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `format` of this payload.
pub const FORMAT: u32 = 1;
/// Bins per distribution a packer makes by default.
pub const DEFAULT_BINS: usize = 10;
/// The most bins a distribution may have.
pub const MAX_BINS: usize = 100;
/// The most classes a label output may list.
pub const MAX_CLASSES: usize = 1000;
/// The most columns of one score output a baseline describes.
pub const MAX_COLUMNS: usize = 64;
/// The largest baseline payload an agent parses, in bytes.
pub const MAX_BYTES: usize = 8 << 20;
/// The floor under each proportion in PSI, so that an empty bin does not make it infinite.
pub const EPSILON: f64 = 1e-4;

/// A reference distribution of numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dist {
    /// Interior bin edges, strictly increasing and finite: `edges.len() + 1` bins.
    pub edges: Vec<f64>,
    /// Reference values per bin.
    pub counts: Vec<u64>,
    pub mean: f64,
    /// Population standard deviation (ddof 0).
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

/// One input feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureRef {
    pub name: String,
    /// Share of training rows where the feature was missing, 0 to 1.
    pub missing_rate: f64,
    pub dist: Dist,
}

/// One model output: `columns` for scores (one distribution per value of a row, at most
/// [`MAX_COLUMNS`]), or `classes` for labels (count per label, the integer as a decimal string).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<Dist>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<BTreeMap<String, u64>>,
}

/// `baseline.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    pub format: u32,
    /// Training rows the baseline was computed from.
    pub rows: u64,
    /// One per manifest feature, in the manifest's order.
    pub features: Vec<FeatureRef>,
    /// Some or all of the manifest's outputs, each at most once.
    pub outputs: Vec<OutputRef>,
}

impl Dist {
    /// The bin of `x` (see the module's bin rule).
    pub fn bin(&self, x: f64) -> usize {
        self.edges.partition_point(|e| *e < x)
    }

    /// The reference distribution of finite `values` in at most `bins` quantile bins.
    ///
    /// Edge `i` (1 ≤ i < bins) is the value at index `⌊i·n/bins⌋` of the sorted values;
    /// repeated edges are merged and edges at the maximum dropped, so that no bin is empty.
    pub fn from_values(values: &[f64], bins: usize) -> Result<Dist, String> {
        if values.is_empty() {
            return Err("no values".into());
        }
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(format!("{v} is not a finite number"));
        }
        if !(1..=MAX_BINS).contains(&bins) {
            return Err(format!("{bins} bins; 1 to {MAX_BINS} are allowed"));
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let (min, max) = (sorted[0], sorted[n - 1]);
        let mut edges: Vec<f64> = Vec::with_capacity(bins);
        for i in 1..bins {
            let e = sorted[i * n / bins];
            if e < max && edges.last().is_none_or(|l| *l < e) {
                edges.push(e);
            }
        }
        let mut d = Dist {
            counts: vec![0; edges.len() + 1],
            edges,
            mean: 0.0,
            std: 0.0,
            min,
            max,
        };
        for v in &sorted {
            let b = d.bin(*v);
            d.counts[b] += 1;
        }
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let var = sorted.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        d.mean = mean;
        d.std = var.sqrt();
        Ok(d)
    }

    fn check(&self) -> Result<(), String> {
        if self.edges.len() + 1 > MAX_BINS {
            return Err(format!("{} bins; at most {MAX_BINS}", self.edges.len() + 1));
        }
        if self.counts.len() != self.edges.len() + 1 {
            return Err(format!(
                "{} counts for {} edges; there is one count more than edges",
                self.counts.len(),
                self.edges.len()
            ));
        }
        if self.edges.iter().any(|e| !e.is_finite()) || self.edges.windows(2).any(|w| w[0] >= w[1]) {
            return Err("edges must be finite and strictly increasing".into());
        }
        if self.counts.iter().sum::<u64>() == 0 {
            return Err("the reference histogram is empty".into());
        }
        if ![self.mean, self.std, self.min, self.max].iter().all(|v| v.is_finite()) {
            return Err("mean, std, min and max must be finite".into());
        }
        if self.std < 0.0 || self.min > self.max {
            return Err("std must not be negative, and min not above max".into());
        }
        Ok(())
    }
}

impl Baseline {
    /// Parse and check a baseline against the manifest it is signed with.
    pub fn parse(bytes: &[u8], manifest: &Manifest) -> Result<Baseline, String> {
        if bytes.len() > MAX_BYTES {
            return Err(format!("{} bytes; a baseline is at most {MAX_BYTES}", bytes.len()));
        }
        let b: Baseline = serde_json::from_slice(bytes).map_err(|e| format!("not a baseline: {e}"))?;
        b.check(manifest)?;
        Ok(b)
    }

    /// The rules of SPEC §4.9.
    pub fn check(&self, manifest: &Manifest) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format {} is not supported (expected {FORMAT})", self.format));
        }
        let Some(input) = manifest.features() else {
            return Err("a baseline describes named features: this model's inputs are tensors (format 2)".into());
        };
        let names: Vec<&str> = self.features.iter().map(|f| f.name.as_str()).collect();
        if names != input.features.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(format!(
                "features {names:?} differ from the manifest's {:?} (same names, same order)",
                input.features
            ));
        }
        for f in &self.features {
            if !(0.0..=1.0).contains(&f.missing_rate) {
                return Err(format!("feature {:?}: missing_rate must be 0 to 1", f.name));
            }
            f.dist.check().map_err(|e| format!("feature {:?}: {e}", f.name))?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for o in &self.outputs {
            if !manifest.outputs.iter().any(|m| m.name == o.name) {
                return Err(format!("output {:?} is not one of the manifest's", o.name));
            }
            if !seen.insert(o.name.as_str()) {
                return Err(format!("output {:?} is described twice", o.name));
            }
            match (&o.classes, o.columns.len()) {
                (Some(c), 0) => {
                    if c.is_empty() || c.len() > MAX_CLASSES {
                        return Err(format!("output {:?}: 1 to {MAX_CLASSES} classes", o.name));
                    }
                    if let Some(k) = c.keys().find(|k| k.parse::<i64>().is_err()) {
                        return Err(format!("output {:?}: class {k:?} is not an integer", o.name));
                    }
                    if c.values().sum::<u64>() == 0 {
                        return Err(format!("output {:?}: the class counts are all zero", o.name));
                    }
                }
                (None, 1..=MAX_COLUMNS) => {
                    for (i, d) in o.columns.iter().enumerate() {
                        d.check().map_err(|e| format!("output {:?} column {i}: {e}", o.name))?;
                    }
                }
                _ => {
                    return Err(format!(
                        "output {:?}: give either classes or 1 to {MAX_COLUMNS} columns",
                        o.name
                    ))
                }
            }
        }
        Ok(())
    }
}

/// What a packer measured of one model output over the training rows.
pub enum OutputValues {
    /// Labels (integer outputs): one per row.
    Labels { name: String, values: Vec<f64> },
    /// Scores: the values of each column, one per row.
    Scores { name: String, columns: Vec<Vec<f64>> },
}

/// Build a baseline from training data: one column per feature (NaN = missing), and the
/// model's outputs on the same rows.
pub fn build(
    features: &[String],
    columns: &[Vec<f64>],
    outputs: Vec<OutputValues>,
    bins: usize,
) -> Result<Baseline, String> {
    let rows = columns.first().map_or(0, Vec::len);
    if rows == 0 {
        return Err("no training rows".into());
    }
    let mut fs = Vec::with_capacity(features.len());
    for (name, col) in features.iter().zip(columns) {
        let present: Vec<f64> = col.iter().copied().filter(|v| !v.is_nan()).collect();
        let dist = Dist::from_values(&present, bins).map_err(|e| format!("feature {name:?}: {e}"))?;
        fs.push(FeatureRef {
            name: name.clone(),
            missing_rate: (rows - present.len()) as f64 / rows as f64,
            dist,
        });
    }
    let mut os = vec![];
    for o in outputs {
        match o {
            OutputValues::Labels { name, values } => {
                let mut classes = BTreeMap::new();
                for v in values.iter().filter(|v| v.is_finite()) {
                    *classes.entry(format!("{}", *v as i64)).or_insert(0u64) += 1;
                }
                if classes.len() > MAX_CLASSES {
                    return Err(format!(
                        "output {name:?} has {} classes; a baseline describes at most {MAX_CLASSES}",
                        classes.len()
                    ));
                }
                if classes.is_empty() {
                    return Err(format!("output {name:?} has no finite label"));
                }
                os.push(OutputRef {
                    name,
                    columns: vec![],
                    classes: Some(classes),
                });
            }
            OutputValues::Scores { name, columns } => {
                let mut dists = vec![];
                for (i, c) in columns.iter().take(MAX_COLUMNS).enumerate() {
                    let finite: Vec<f64> = c.iter().copied().filter(|v| v.is_finite()).collect();
                    dists.push(
                        Dist::from_values(&finite, bins).map_err(|e| format!("output {name:?} column {i}: {e}"))?,
                    );
                }
                os.push(OutputRef {
                    name,
                    columns: dists,
                    classes: None,
                });
            }
        }
    }
    Ok(Baseline {
        format: FORMAT,
        rows: rows as u64,
        features: fs,
        outputs: os,
    })
}

/// Population Stability Index of `window` against `reference` (same bins):
/// `Σ (w - r) · ln(w / r)` over the bins' proportions, each floored at [`EPSILON`].
/// `None` when the window is empty.
pub fn psi(reference: &[u64], window: &[u64]) -> Option<f64> {
    let (rt, wt) = totals(reference, window)?;
    Some(
        reference
            .iter()
            .zip(window)
            .map(|(r, w)| {
                let (r, w) = ((*r as f64 / rt).max(EPSILON), (*w as f64 / wt).max(EPSILON));
                (w - r) * (w / r).ln()
            })
            .sum(),
    )
}

/// The totals of two histograms of the same bins, as floats; `None` when the window is empty
/// or the bins differ.
fn totals(reference: &[u64], window: &[u64]) -> Option<(f64, f64)> {
    let (rt, wt) = (reference.iter().sum::<u64>(), window.iter().sum::<u64>());
    (wt > 0 && rt > 0 && reference.len() == window.len()).then_some((rt as f64, wt as f64))
}

/// Kolmogorov–Smirnov distance of `window` against `reference` (same bins): the largest
/// difference between their cumulative proportions at the bin edges. `None` when the window
/// is empty.
pub fn ks(reference: &[u64], window: &[u64]) -> Option<f64> {
    let (rt, wt) = totals(reference, window)?;
    let (mut cr, mut cw, mut d) = (0u64, 0u64, 0.0f64);
    for (r, w) in reference.iter().zip(window) {
        cr += r;
        cw += w;
        d = d.max((cr as f64 / rt - cw as f64 / wt).abs());
    }
    Some(d)
}

/// The shift of the window's mean in reference standard deviations; `None` when the
/// reference has no spread.
pub fn mean_shift(reference: &Dist, window_mean: f64) -> Option<f64> {
    (reference.std > 0.0 && window_mean.is_finite()).then(|| (window_mean - reference.mean) / reference.std)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bins(values: &[f64], n: usize, edges: &[f64], counts: &[u64]) {
        let d = Dist::from_values(values, n).expect("dist");
        assert_eq!(d.edges, edges, "{values:?}");
        assert_eq!(d.counts, counts, "{values:?}");
        assert_eq!(d.counts.iter().sum::<u64>(), values.len() as u64);
    }

    #[test]
    fn quantile_bins_are_never_empty() {
        bins(&[1.0, 2.0, 3.0, 4.0], 4, &[2.0, 3.0], &[2, 1, 1]);
        bins(
            &(0..100).map(f64::from).collect::<Vec<_>>(),
            4,
            &[25.0, 50.0, 75.0],
            &[26, 25, 25, 24],
        );
        // A binary feature: two bins, split between its values.
        bins(&[0.0, 0.0, 0.0, 1.0, 1.0], 10, &[0.0], &[3, 2]);
        // A constant: one bin.
        bins(&[7.0; 5], 10, &[], &[5]);
        assert!(Dist::from_values(&[], 10).is_err());
        assert!(Dist::from_values(&[f64::NAN], 10).is_err());
    }

    #[test]
    fn values_fall_in_the_bin_of_the_first_edge_not_below_them() {
        let d = Dist::from_values(&[1.0, 2.0, 3.0, 4.0], 4).expect("dist");
        let check = |x: f64, b: usize| assert_eq!(d.bin(x), b, "{x}");
        check(-1e9, 0);
        check(2.0, 0);
        check(2.000001, 1);
        check(3.0, 1);
        check(3.5, 2);
        check(f64::INFINITY, 2);
    }

    fn close(a: Option<f64>, b: f64) {
        let a = a.expect("a value");
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn measures() {
        close(psi(&[50, 50], &[50, 50]), 0.0);
        // (0.9-0.5)ln(0.9/0.5) + (0.1-0.5)ln(0.1/0.5)
        close(psi(&[50, 50], &[90, 10]), 0.4 * (1.8f64).ln() - 0.4 * (0.2f64).ln());
        // An empty bin is floored at EPSILON, not infinite.
        close(
            psi(&[100, 0], &[50, 50]),
            (0.5 - 1.0) * (0.5f64).ln() + (0.5 - EPSILON) * (0.5 / EPSILON).ln(),
        );
        assert_eq!(psi(&[1, 1], &[0, 0]), None);
        close(ks(&[25, 25, 25, 25], &[25, 25, 25, 25]), 0.0);
        close(ks(&[25, 25, 25, 25], &[0, 0, 50, 50]), 0.5);
        close(ks(&[10, 0], &[0, 10]), 1.0);
        let d = Dist::from_values(&[1.0, 3.0], 2).expect("dist");
        close(mean_shift(&d, 4.0), 2.0);
        assert_eq!(mean_shift(&Dist::from_values(&[5.0], 2).expect("dist"), 4.0), None);
    }
}
