//! `SVMClassifier` and `SVMRegressor`, with onnxruntime's semantics: libsvm one-vs-one
//! voting, Platt probabilities with pairwise coupling, and onnxruntime's binary-case layout.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::post::{exp_in_place, logistic, probit, Post};
use super::rowop::{row_op, Computed, Outputs, RowOp};
use super::Floats;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kernel {
    Linear,
    Poly,
    Rbf,
    Sigmoid,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Params {
    kernel: Kernel,
    /// gamma, coef0, degree
    kp: Floats,
}

impl Params {
    fn parse(node: &NodeProto) -> TractResult<Params> {
        let kernel = match node.get_attr_opt::<&str>("kernel_type")?.unwrap_or("LINEAR") {
            "LINEAR" => Kernel::Linear,
            "POLY" => Kernel::Poly,
            "RBF" => Kernel::Rbf,
            "SIGMOID" => Kernel::Sigmoid,
            other => bail!("node {:?}: unknown kernel_type {other:?}", node.name),
        };
        let kp: Vec<f32> = node.get_attr_opt_vec("kernel_params")?.unwrap_or_default();
        let kp = if kp.is_empty() { vec![0.0, 0.0, 0.0] } else { kp };
        ensure!(
            kp.len() == 3,
            "node {:?}: kernel_params must hold gamma, coef0, degree",
            node.name
        );
        Ok(Params {
            kernel,
            kp: Floats::new(&kp),
        })
    }

    /// Kernel values of one row against `n` vectors of `k` features; `c` is added to linear
    /// kernels (onnxruntime passes rho there in linear mode).
    fn kernels(&self, x: &[f32], vectors: &[f32], k: usize, c: f32) -> Vec<f32> {
        let mut out = Vec::new();
        self.support_kernels(x, &by_feature(vectors, k), &mut out);
        if self.kernel == Kernel::Linear {
            out.iter_mut().for_each(|o| *o += c);
        }
        out
    }

    /// Kernel values of one row against the support vectors, held feature by feature
    /// (`support[f * n + v]`), into `out`. Each feature's term is added for every vector in one
    /// pass, and the RBF kernel's exponentials are taken in one pass, so that both vectorise;
    /// the terms are added in feature order, as [`Params::kernels`] adds them.
    fn support_kernels(&self, x: &[f32], support: &[f32], out: &mut Vec<f32>) {
        let kp = self.kp.get();
        let (gamma, coef0, degree) = (kp[0], kp[1], kp[2]);
        let n = support.len() / x.len().max(1);
        out.clear();
        out.resize(n, 0.0);
        let columns = x.iter().zip(support.chunks_exact(n.max(1)));
        match self.kernel {
            Kernel::Rbf => {
                for (a, column) in columns {
                    for (o, b) in out.iter_mut().zip(column) {
                        *o += (a - b) * (a - b);
                    }
                }
                out.iter_mut().for_each(|o| *o *= -gamma);
                exp_in_place(out);
            }
            kernel => {
                for (a, column) in columns {
                    for (o, b) in out.iter_mut().zip(column) {
                        *o += a * b;
                    }
                }
                match kernel {
                    Kernel::Poly => out.iter_mut().for_each(|o| *o = poly(gamma * *o + coef0, degree)),
                    Kernel::Sigmoid => out.iter_mut().for_each(|o| *o = (gamma * *o + coef0).tanh()),
                    Kernel::Linear | Kernel::Rbf => {}
                }
            }
        }
    }
}

fn poly(s: f32, degree: f32) -> f32 {
    match degree as i32 {
        2 if degree == 2.0 => s * s,
        3 if degree == 3.0 => s * s * s,
        _ => s.powf(degree),
    }
}

/// Vectors of `features` values, one after another, rearranged feature by feature.
fn by_feature(values: &[f32], features: usize) -> Vec<f32> {
    let n = values.len() / features.max(1);
    (0..features)
        .flat_map(|f| (0..n).map(move |v| values[v * features + f]))
        .collect()
}

/// Pairwise coupling (Wu, Lin and Weng), as libsvm and onnxruntime compute it, in f32.
fn multiclass_probability(k: usize, r: &[f32]) -> Vec<f32> {
    let mut q = vec![0f32; k * k];
    let mut qp = vec![0f32; k];
    let mut p = vec![1.0 / k as f32; k];
    let eps = 0.005 / k as f32;
    for i in 0..k {
        for j in 0..i {
            q[i * k + i] += r[j * k + i] * r[j * k + i];
            q[i * k + j] = q[j * k + i];
        }
        for j in i + 1..k {
            q[i * k + i] += r[j * k + i] * r[j * k + i];
            q[i * k + j] = -r[j * k + i] * r[i * k + j];
        }
    }
    for _ in 0..100 {
        let mut pqp = 0f32;
        for i in 0..k {
            qp[i] = (0..k).map(|j| q[i * k + j] * p[j]).fold(0.0, |a, b| a + b);
            pqp += p[i] * qp[i];
        }
        let max_error = qp.iter().map(|v| (v - pqp).abs()).fold(0f32, f32::max);
        if max_error < eps {
            break;
        }
        for i in 0..k {
            let diff = (-qp[i] + pqp) / q[i * k + i];
            p[i] += diff;
            pqp = (pqp + diff * (diff * q[i * k + i] + 2.0 * qp[i])) / (1.0 + diff) / (1.0 + diff);
            for j in 0..k {
                qp[j] = (qp[j] + diff * q[i * k + j]) / (1.0 + diff);
                p[j] /= 1.0 + diff;
            }
        }
    }
    p
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Classifier {
    params: Params,
    post: Post,
    labels: Vec<i64>,
    vectors_per_class: Vec<usize>,
    support: Floats,
    coefficients: Floats,
    rho: Floats,
    prob_a: Floats,
    prob_b: Floats,
    features: usize,
}

impl Classifier {
    fn parse(node: &NodeProto) -> TractResult<Classifier> {
        let name = &node.name;
        let labels: Vec<i64> = node
            .get_attr_opt_vec("classlabels_ints")?
            .filter(|l: &Vec<i64>| !l.is_empty())
            .ok_or_else(|| format_err!("node {name:?}: only integer class labels (classlabels_ints) are supported"))?;
        let vpc: Vec<i64> = node.get_attr_opt_vec("vectors_per_class")?.unwrap_or_default();
        let support: Vec<f32> = node.get_attr_opt_vec("support_vectors")?.unwrap_or_default();
        let coefficients: Vec<f32> = node.get_attr_vec("coefficients")?;
        let rho: Vec<f32> = node.get_attr_vec("rho")?;
        let prob_a: Vec<f32> = node.get_attr_opt_vec("prob_a")?.unwrap_or_default();
        let prob_b: Vec<f32> = node.get_attr_opt_vec("prob_b")?.unwrap_or_default();
        let classes = labels.len();
        let vectors: usize = vpc.iter().map(|v| *v as usize).sum();
        ensure!(classes >= 2, "node {name:?}: at least two classes are needed");
        ensure!(!rho.is_empty(), "node {name:?}: rho is empty");
        let features = if vectors > 0 {
            ensure!(
                vpc.len() == classes,
                "node {name:?}: vectors_per_class has {} entries for {classes} classes",
                vpc.len()
            );
            ensure!(
                support.len().is_multiple_of(vectors),
                "node {name:?}: support_vectors do not divide into {vectors} vectors"
            );
            ensure!(
                coefficients.len() == (classes - 1) * vectors,
                "node {name:?}: coefficients have the wrong size"
            );
            let pairs = classes * (classes - 1) / 2;
            ensure!(rho.len() >= pairs, "node {name:?}: rho needs {pairs} values");
            ensure!(
                prob_a.is_empty() || (prob_a.len() >= pairs && prob_b.len() >= pairs),
                "node {name:?}: prob_a/prob_b need {pairs} values"
            );
            support.len() / vectors
        } else {
            ensure!(
                coefficients.len().is_multiple_of(classes),
                "node {name:?}: coefficients do not divide into {classes} classes"
            );
            coefficients.len() / classes
        };
        ensure!(
            features > 0,
            "node {name:?}: the model has no features (empty support vectors or coefficients)"
        );
        Ok(Classifier {
            params: Params::parse(node)?,
            post: Post::parse(node)?,
            labels,
            vectors_per_class: vpc.iter().map(|v| *v as usize).collect(),
            support: Floats::new(&by_feature(&support, features)),
            coefficients: Floats::new(&coefficients),
            rho: Floats::new(&rho),
            prob_a: Floats::new(&prob_a),
            prob_b: Floats::new(&prob_b),
            features,
        })
    }

    /// Columns of the scores output.
    fn score_width(&self) -> usize {
        let c = self.labels.len();
        if !self.vectors_per_class.is_empty() && self.prob_a.0.is_empty() {
            if c > 2 {
                c * (c - 1) / 2
            } else {
                2
            }
        } else {
            c
        }
    }

    fn eval(&self, x: &[f32], rows: usize) -> (Vec<i64>, Vec<f32>) {
        let c = self.labels.len();
        let f = self.features;
        let coef = self.coefficients.get();
        let rho = self.rho.get();
        let all_positive = coef.iter().all(|v| *v >= 0.0);
        let have_proba = !self.prob_a.0.is_empty();
        let svc = !self.vectors_per_class.is_empty();
        let width = self.score_width();
        let (mut labels, mut out) = (Vec::with_capacity(rows), Vec::with_capacity(rows * width));
        let support = self.support.get();
        let (pa, pb) = (self.prob_a.get(), self.prob_b.get());
        let mut starts = vec![0usize; c];
        for i in 1..c {
            starts[i] = starts[i - 1] + self.vectors_per_class[i - 1];
        }
        let vectors: usize = self.vectors_per_class.iter().sum();
        let (mut k, mut votes, mut pair) = (Vec::new(), vec![0i64; c], Vec::new());
        for r in 0..rows {
            let row = &x[r * f..(r + 1) * f];
            let (mut scores, maxclass, max_weight): (Vec<f32>, usize, f32);
            if !svc {
                scores = self.params.kernels(row, coef, f, rho[0]);
                let (m, w) =
                    scores.iter().enumerate().fold(
                        (0, f32::NEG_INFINITY),
                        |(bi, bw), (i, w)| if *w > bw { (i, *w) } else { (bi, bw) },
                    );
                maxclass = m;
                max_weight = w;
            } else {
                self.params.support_kernels(row, support, &mut k);
                votes.fill(0);
                pair.clear();
                let mut idx = 0;
                for i in 0..c - 1 {
                    for j in i + 1..c {
                        let mut sum = 0f64;
                        for m in 0..self.vectors_per_class[i] {
                            sum += (coef[(j - 1) * vectors + starts[i] + m] * k[starts[i] + m]) as f64;
                        }
                        for m in 0..self.vectors_per_class[j] {
                            sum += (coef[i * vectors + starts[j] + m] * k[starts[j] + m]) as f64;
                        }
                        sum += rho[idx] as f64;
                        idx += 1;
                        pair.push(sum as f32);
                        votes[if sum > 0.0 { i } else { j }] += 1;
                    }
                }
                scores = if have_proba {
                    let mut r2 = vec![0f32; c * c];
                    let mut index = 0;
                    for i in 0..c - 1 {
                        for j in i + 1..c {
                            let p = (1.0 - logistic(pair[index] * pa[index] + pb[index])).clamp(1e-7, 1.0 - 1e-7);
                            r2[i * c + j] = p;
                            r2[j * c + i] = 1.0 - p;
                            index += 1;
                        }
                    }
                    multiclass_probability(c, &r2)
                } else {
                    pair.clone()
                };
                maxclass = votes
                    .iter()
                    .enumerate()
                    .fold(0, |b, (i, v)| if *v > votes[b] { i } else { b });
                max_weight = 0.0;
            }
            let label = if c == 2 {
                if !have_proba {
                    if (all_positive && max_weight >= 0.5) || (max_weight > 0.0 && !all_positive) {
                        self.labels[1]
                    } else {
                        self.labels[maxclass]
                    }
                } else {
                    self.labels[maxclass]
                }
            } else {
                self.labels[maxclass]
            };
            labels.push(label);
            if svc && !have_proba && c == 2 {
                let s = scores[0];
                let pair = match self.post {
                    Post::Probit => [probit(s), 0.0],
                    Post::None => [-s, s],
                    _ => [1.0 - s, s],
                };
                out.extend_from_slice(&pair);
            } else {
                if scores.len() > 1 {
                    self.post.apply(&mut scores);
                } else if self.post == Post::Probit {
                    scores[0] = probit(scores[0]);
                }
                out.extend_from_slice(&scores);
            }
        }
        (labels, out)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Regressor {
    params: Params,
    post: Post,
    support: Floats,
    coefficients: Floats,
    rho: Floats,
    one_class: bool,
    features: usize,
}

impl Regressor {
    fn parse(node: &NodeProto) -> TractResult<Regressor> {
        let name = &node.name;
        let n_supports: i64 = node.get_attr_opt("n_supports")?.unwrap_or(0);
        let support: Vec<f32> = node.get_attr_opt_vec("support_vectors")?.unwrap_or_default();
        let coefficients: Vec<f32> = node.get_attr_vec("coefficients")?;
        let rho: Vec<f32> = node.get_attr_vec("rho")?;
        ensure!(!rho.is_empty(), "node {name:?}: rho is empty");
        let features = if n_supports > 0 {
            ensure!(
                support.len().is_multiple_of(n_supports as usize),
                "node {name:?}: support_vectors do not divide into n_supports"
            );
            ensure!(
                coefficients.len() == n_supports as usize,
                "node {name:?}: one coefficient per support vector is needed"
            );
            support.len() / n_supports as usize
        } else {
            coefficients.len()
        };
        ensure!(
            features > 0,
            "node {name:?}: the model has no features (empty support vectors or coefficients)"
        );
        Ok(Regressor {
            params: Params::parse(node)?,
            post: Post::parse(node)?,
            support: Floats::new(&by_feature(&support, features)),
            coefficients: Floats::new(&coefficients),
            rho: Floats::new(&rho),
            one_class: node.get_attr_opt::<i64>("one_class")?.unwrap_or(0) != 0,
            features,
        })
    }

    fn eval(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let f = self.features;
        let coef = self.coefficients.get();
        let rho = self.rho.get()[0];
        let support = self.support.get();
        let mut k = Vec::new();
        (0..rows)
            .map(|r| {
                let row = &x[r * f..(r + 1) * f];
                let mut s = if support.is_empty() {
                    self.params.kernels(row, coef, f, rho)[0]
                } else {
                    self.params.support_kernels(row, support, &mut k);
                    k.iter().zip(coef).map(|(a, b)| a * b).sum::<f32>() + rho
                };
                if self.one_class {
                    s = if s > 0.0 { 1.0 } else { -1.0 };
                }
                if self.post == Post::Probit {
                    s = probit(s);
                }
                s
            })
            .collect()
    }
}

fn check_features(features: usize, width: usize) -> TractResult<()> {
    ensure!(
        width == features,
        "SVM input rows have {width} values; the model has {features} features"
    );
    Ok(())
}

impl RowOp for Classifier {
    fn name(&self) -> &'static str {
        "LatheSVMClassifier"
    }

    fn outputs(&self) -> Outputs {
        Outputs::Classifier(self.score_width())
    }

    fn check_width(&self, width: usize) -> TractResult<()> {
        check_features(self.features, width)
    }

    fn eval(&self, x: &[f32], rows: usize, _width: usize) -> TractResult<Computed> {
        let (labels, scores) = Classifier::eval(self, x, rows);
        Ok(Computed::Classes { labels, scores })
    }
}

impl RowOp for Regressor {
    fn name(&self) -> &'static str {
        "LatheSVMRegressor"
    }

    fn outputs(&self) -> Outputs {
        Outputs::Regressor(1)
    }

    fn check_width(&self, width: usize) -> TractResult<()> {
        check_features(self.features, width)
    }

    fn eval(&self, x: &[f32], rows: usize, _width: usize) -> TractResult<Computed> {
        Ok(Computed::Values(Regressor::eval(self, x, rows)))
    }
}

pub fn classifier(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((row_op(Classifier::parse(node)?), vec![]))
}

pub fn regressor(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((row_op(Regressor::parse(node)?), vec![]))
}
