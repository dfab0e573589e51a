//! `LinearClassifier` and `LinearRegressor`, fused: one pass over each row computes the scores,
//! the label and the post-transform, as onnxruntime does.
//!
//! tract has both operators, but expands them into a matrix product and five to eight small
//! operators around it (bias, transform, concat, arg-max, label lookup); for the one-row calls
//! a machine makes, that chain costs more than the arithmetic. It also omits `PROBIT` and
//! `SOFTMAX_ZERO`, and lays out single-model binary scores differently from onnxruntime.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::post::{probit, Post};
use super::rowop::{row_op, Computed, Outputs, RowOp};

/// Weights of `models` linear models over `features` inputs: `coefficients` row-major
/// `[models][features]`, f32 bits (so that the operator can be hashed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Weights {
    coefficients: Vec<u32>,
    intercepts: Vec<u32>,
    models: usize,
    features: usize,
}

impl Weights {
    fn parse(node: &NodeProto, models: usize) -> TractResult<Weights> {
        let name = &node.name;
        let coefficients: Vec<f32> = node.get_attr_vec("coefficients")?;
        ensure!(
            models > 0 && !coefficients.is_empty() && coefficients.len().is_multiple_of(models),
            "node {name:?}: {} coefficients do not split into {models} model(s)",
            coefficients.len()
        );
        let intercepts: Vec<f32> = node
            .get_attr_opt_vec("intercepts")?
            .unwrap_or_else(|| vec![0.0; models]);
        ensure!(
            intercepts.len() == models,
            "node {name:?}: {} intercepts for {models} model(s)",
            intercepts.len()
        );
        Ok(Weights {
            features: coefficients.len() / models,
            coefficients: coefficients.iter().map(|c| c.to_bits()).collect(),
            intercepts: intercepts.iter().map(|c| c.to_bits()).collect(),
            models,
        })
    }

    fn check_width(&self, width: usize) -> TractResult<()> {
        ensure!(
            width == self.features,
            "linear model input rows have {width} values; the model has {} features",
            self.features
        );
        Ok(())
    }

    /// Raw scores, `[rows][models]`.
    fn scores(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * self.models);
        for row in x.chunks_exact(self.features).take(rows) {
            for (m, coef) in self.coefficients.chunks_exact(self.features).enumerate() {
                out.push(f32::from_bits(self.intercepts[m]) + dot(row, coef));
            }
        }
        out
    }
}

/// A dot product of `a` with weights held as f32 bits, in eight lanes so that it vectorises.
fn dot(a: &[f32], b: &[u32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * f32::from_bits(*y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * f32::from_bits(y[i]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LinearClassifier {
    weights: Weights,
    labels: Vec<i64>,
    post: Post,
}

impl LinearClassifier {
    /// One model and two labels: onnxruntime reports `[1 - s, s]` for the raw score `s`.
    fn binary(&self) -> bool {
        self.weights.models == 1 && self.labels.len() == 2
    }
}

impl RowOp for LinearClassifier {
    fn name(&self) -> &'static str {
        "LatheLinearClassifier"
    }

    fn outputs(&self) -> Outputs {
        Outputs::Classifier(if self.binary() { 2 } else { self.weights.models })
    }

    fn check_width(&self, width: usize) -> TractResult<()> {
        self.weights.check_width(width)
    }

    fn eval(&self, x: &[f32], rows: usize, _width: usize) -> TractResult<Computed> {
        let raw = self.weights.scores(x, rows);
        let k = self.weights.models;
        let mut labels = Vec::with_capacity(rows);
        if k == 1 {
            // A single model votes by the sign of its raw score.
            let (neg, pos) = match self.labels.as_slice() {
                [neg, pos] => (*neg, *pos),
                _ => (0, 1),
            };
            labels.extend(raw.iter().map(|s| if *s > 0.0 { pos } else { neg }));
            if !self.binary() {
                let mut scores = raw;
                if self.post == Post::Probit {
                    scores.iter_mut().for_each(|s| *s = probit(*s));
                }
                return Ok(Computed::Classes { labels, scores });
            }
            let scores = raw
                .iter()
                .flat_map(|s| {
                    let s = if self.post == Post::Probit { probit(*s) } else { *s };
                    [1.0 - s, s]
                })
                .collect();
            return Ok(Computed::Classes { labels, scores });
        }
        let mut scores = raw;
        for row in scores.chunks_exact_mut(k) {
            // The first highest raw score wins, before any post-transform.
            let mut best = 0;
            for c in 1..k {
                if row[c] > row[best] {
                    best = c;
                }
            }
            labels.push(self.labels[best]);
            self.post.apply(row);
        }
        Ok(Computed::Classes { labels, scores })
    }
}

pub fn classifier(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let name = &node.name;
    let labels: Vec<i64> = match node.get_attr_opt_vec::<i64>("classlabels_ints")? {
        Some(l) if !l.is_empty() => l,
        _ => bail!(
            "node {name:?}: only integer class labels (classlabels_ints) are supported; train with integer labels"
        ),
    };
    let models = match node.get_attr_opt_vec::<f32>("intercepts")? {
        Some(i) => i.len(),
        None if labels.len() == 2 && node.get_attr_opt::<i64>("multi_class")?.unwrap_or(0) == 0 => 1,
        None => labels.len(),
    };
    let weights = Weights::parse(node, models)?;
    ensure!(
        models == 1 || labels.len() == models,
        "node {name:?}: {} class labels for {models} models",
        labels.len()
    );
    Ok((
        row_op(LinearClassifier {
            weights,
            labels,
            post: Post::parse(node)?,
        }),
        vec![],
    ))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LinearRegressor {
    weights: Weights,
    post: Post,
}

impl RowOp for LinearRegressor {
    fn name(&self) -> &'static str {
        "LatheLinearRegressor"
    }

    fn outputs(&self) -> Outputs {
        Outputs::Regressor(self.weights.models)
    }

    fn check_width(&self, width: usize) -> TractResult<()> {
        self.weights.check_width(width)
    }

    fn eval(&self, x: &[f32], rows: usize, _width: usize) -> TractResult<Computed> {
        let mut scores = self.weights.scores(x, rows);
        match self.weights.models {
            // onnxruntime applies only PROBIT to a single target.
            1 if self.post == Post::Probit => scores.iter_mut().for_each(|s| *s = probit(*s)),
            1 => {}
            k => scores.chunks_exact_mut(k).for_each(|row| self.post.apply(row)),
        }
        Ok(Computed::Values(scores))
    }
}

pub fn regressor(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let targets: i64 = node.get_attr_opt("targets")?.unwrap_or(1);
    ensure!(targets > 0, "node {:?}: targets must be positive", node.name);
    Ok((
        row_op(LinearRegressor {
            weights: Weights::parse(node, targets as usize)?,
            post: Post::parse(node)?,
        }),
        vec![],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_the_plain_sum() {
        for n in [0, 1, 7, 8, 9, 17, 64] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let bits: Vec<u32> = b.iter().map(|v| v.to_bits()).collect();
            assert!((dot(&a, &bits) - plain).abs() <= 1e-4 * plain.abs().max(1.0), "n={n}");
        }
    }
}
