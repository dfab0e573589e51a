//! `TreeEnsembleRegressor` and `TreeEnsembleClassifier`, with onnxruntime's semantics.
//!
//! The ensemble is flattened once at load: every node of every tree in one array (feature,
//! threshold, mode, the two children), leaves pointing into one array of (output, weight).
//! Evaluation is tree-major over the batch: each tree's nodes stay in cache while every row
//! walks it.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core;
use tract_onnx::tract_hir::internal::*;

use super::post::{logistic, probit, Post as PostTransform};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Leaf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

/// One node. For a leaf, `yes..no` is its range in `Forest::leaves`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Node {
    feature: u32,
    /// f32 bits of the threshold (kept as bits so the op can be hashed).
    value: u32,
    mode: Mode,
    missing_true: bool,
    yes: u32,
    no: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Forest {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    /// (output index, f32 bits of the weight)
    leaves: Vec<(u32, u32)>,
    n_outputs: usize,
    aggregate: Aggregate,
    /// f32 bits, one per output, or empty.
    base: Vec<u32>,
    max_feature: usize,
}

impl Forest {
    /// Parse the node and leaf attributes; `prefix` is `target` or `class`.
    fn parse(node: &NodeProto, prefix: &str, n_outputs: usize, aggregate: Aggregate) -> TractResult<Forest> {
        let name = &node.name;
        let tree_ids: Vec<i64> = node.get_attr_vec("nodes_treeids")?;
        let n = tree_ids.len();
        let get_i = |a: &str| -> TractResult<Vec<i64>> {
            let v: Vec<i64> = node.get_attr_vec(a)?;
            ensure!(
                v.len() == n,
                "node {name:?}: {a} has {} values, nodes_treeids {n}",
                v.len()
            );
            Ok(v)
        };
        let node_ids = get_i("nodes_nodeids")?;
        let features = get_i("nodes_featureids")?;
        let trues = get_i("nodes_truenodeids")?;
        let falses = get_i("nodes_falsenodeids")?;
        let values: Vec<f32> = match node.get_attr_opt_vec::<f32>("nodes_values")? {
            Some(v) => v,
            None => bail!("node {name:?}: nodes_values is required (nodes_values_as_tensor is not supported)"),
        };
        ensure!(
            values.len() == n,
            "node {name:?}: nodes_values has {} values, expected {n}",
            values.len()
        );
        let modes: Vec<&str> = node.get_attr_vec("nodes_modes")?;
        ensure!(
            modes.len() == n,
            "node {name:?}: nodes_modes has {} values, expected {n}",
            modes.len()
        );
        let missing: Vec<i64> = node
            .get_attr_opt_vec("nodes_missing_value_tracks_true")?
            .unwrap_or_else(|| vec![0; n]);
        ensure!(
            missing.len() == n,
            "node {name:?}: nodes_missing_value_tracks_true has the wrong length"
        );

        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (tree_ids[i], node_ids[i]));
        let index: std::collections::HashMap<(i64, i64), u32> = order
            .iter()
            .enumerate()
            .map(|(pos, &i)| ((tree_ids[i], node_ids[i]), pos as u32))
            .collect();
        ensure!(index.len() == n, "node {name:?}: duplicate (tree, node) ids");

        // Leaves: group (output, weight) by (tree, node).
        let l_trees: Vec<i64> = node.get_attr_vec(&format!("{prefix}_treeids"))?;
        let l_nodes: Vec<i64> = node.get_attr_vec(&format!("{prefix}_nodeids"))?;
        let l_ids: Vec<i64> = node.get_attr_vec(&format!("{prefix}_ids"))?;
        let l_weights: Vec<f32> = node.get_attr_vec(&format!("{prefix}_weights"))?;
        let m = l_trees.len();
        ensure!(
            l_nodes.len() == m && l_ids.len() == m && l_weights.len() == m,
            "node {name:?}: {prefix}_* attributes differ in length"
        );
        let mut by_leaf: std::collections::HashMap<u32, Vec<(u32, u32)>> = Default::default();
        for j in 0..m {
            let at = *index.get(&(l_trees[j], l_nodes[j])).ok_or_else(|| {
                format_err!(
                    "node {name:?}: {prefix} weight for unknown node {}/{}",
                    l_trees[j],
                    l_nodes[j]
                )
            })?;
            let out = usize::try_from(l_ids[j])
                .ok()
                .filter(|o| *o < n_outputs)
                .ok_or_else(|| {
                    format_err!(
                        "node {name:?}: {prefix}_ids value {} is outside 0..{n_outputs}",
                        l_ids[j]
                    )
                })?;
            by_leaf
                .entry(at)
                .or_default()
                .push((out as u32, l_weights[j].to_bits()));
        }

        let mut nodes = Vec::with_capacity(n);
        let mut leaves = Vec::with_capacity(m);
        let mut roots = vec![];
        let mut last_tree = None;
        for &i in &order {
            if last_tree != Some(tree_ids[i]) {
                roots.push(nodes.len() as u32);
                last_tree = Some(tree_ids[i]);
            }
            let mode = match modes[i] {
                "BRANCH_LEQ" => Mode::Leq,
                "BRANCH_LT" => Mode::Lt,
                "BRANCH_GTE" => Mode::Gte,
                "BRANCH_GT" => Mode::Gt,
                "BRANCH_EQ" => Mode::Eq,
                "BRANCH_NEQ" => Mode::Neq,
                "LEAF" => Mode::Leaf,
                other => bail!("node {name:?}: unknown node mode {other:?}"),
            };
            let pos = nodes.len() as u32;
            let (yes, no) = if mode == Mode::Leaf {
                let start = leaves.len() as u32;
                leaves.extend(by_leaf.remove(&pos).unwrap_or_default());
                (start, leaves.len() as u32)
            } else {
                let child = |c: i64| {
                    index.get(&(tree_ids[i], c)).copied().ok_or_else(|| {
                        format_err!(
                            "node {name:?}: tree {} node {} points to missing node {c}",
                            tree_ids[i],
                            node_ids[i]
                        )
                    })
                };
                (child(trues[i])?, child(falses[i])?)
            };
            let feature = if mode == Mode::Leaf {
                0
            } else {
                u32::try_from(features[i]).map_err(|_| format_err!("node {name:?}: negative feature id"))?
            };
            nodes.push(Node {
                feature,
                value: values[i].to_bits(),
                mode,
                missing_true: missing[i] != 0,
                yes,
                no,
            });
        }
        ensure!(
            by_leaf.is_empty(),
            "node {name:?}: {prefix} weights on nodes that are not leaves"
        );
        let max_feature = nodes
            .iter()
            .filter(|n| n.mode != Mode::Leaf)
            .map(|n| n.feature as usize)
            .max()
            .unwrap_or(0);
        let base: Vec<f32> = node.get_attr_opt_vec("base_values")?.unwrap_or_default();
        ensure!(
            base.is_empty() || base.len() == n_outputs || (prefix == "class" && base.len() == 1),
            "node {name:?}: base_values has {} values for {n_outputs} outputs",
            base.len()
        );
        // Walking a tree must end: children come after their parent in a well-formed export,
        // but check that no walk can loop.
        for (pos, nd) in nodes.iter().enumerate() {
            if nd.mode != Mode::Leaf && (nd.yes as usize <= pos || nd.no as usize <= pos) {
                bail!("node {name:?}: a node points back to an earlier node; refusing a tree that could loop");
            }
        }
        Ok(Forest {
            nodes,
            roots,
            leaves,
            n_outputs,
            aggregate,
            base: base.iter().map(|b| b.to_bits()).collect(),
            max_feature,
        })
    }

    /// Sum (or min, max) of leaf weights per row and output, with a flag for outputs that got
    /// any weight. Returns (scores, has_score), both `[rows * n_outputs]`.
    fn accumulate(&self, x: &[f32], rows: usize, width: usize) -> (Vec<f32>, Vec<bool>) {
        let k = self.n_outputs;
        let mut scores = vec![0f32; rows * k];
        let mut has = vec![false; rows * k];
        for &root in &self.roots {
            for r in 0..rows {
                let row = &x[r * width..(r + 1) * width];
                let mut i = root as usize;
                loop {
                    let nd = &self.nodes[i];
                    if nd.mode == Mode::Leaf {
                        for &(out, w) in &self.leaves[nd.yes as usize..nd.no as usize] {
                            let (slot, w) = (r * k + out as usize, f32::from_bits(w));
                            scores[slot] = match (self.aggregate, has[slot]) {
                                (Aggregate::Min, true) => scores[slot].min(w),
                                (Aggregate::Max, true) => scores[slot].max(w),
                                (Aggregate::Min | Aggregate::Max, false) => w,
                                _ => scores[slot] + w,
                            };
                            has[slot] = true;
                        }
                        break;
                    }
                    let v = row[nd.feature as usize];
                    let t = f32::from_bits(nd.value);
                    let go = if v.is_nan() {
                        nd.missing_true || nd.mode == Mode::Neq
                    } else {
                        match nd.mode {
                            Mode::Leq => v <= t,
                            Mode::Lt => v < t,
                            Mode::Gte => v >= t,
                            Mode::Gt => v > t,
                            Mode::Eq => v == t,
                            Mode::Neq => v != t,
                            Mode::Leaf => unreachable!("leaves are handled above"),
                        }
                    };
                    i = if go { nd.yes } else { nd.no } as usize;
                }
            }
        }
        if self.aggregate == Aggregate::Average {
            let n = self.roots.len().max(1) as f32;
            scores.iter_mut().for_each(|s| *s /= n);
        }
        (scores, has)
    }

    fn input(&self, input: &TValue) -> TractResult<(Vec<f32>, usize, usize)> {
        let x = input.cast_to::<f32>()?;
        let view = x.to_plain_array_view::<f32>()?;
        let shape = view.shape().to_vec();
        let (rows, width) = match shape.as_slice() {
            [w] => (1, *w),
            [r, w] => (*r, *w),
            other => bail!("tree ensemble input has shape {other:?}; expected [N, features]"),
        };
        ensure!(
            width > self.max_feature,
            "tree ensemble reads feature {} of rows that have {width}",
            self.max_feature
        );
        Ok((view.iter().copied().collect(), rows, width))
    }
}

/// The typed operator: one input, one output (regressor) or two (classifier).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TreeEnsemble {
    forest: Forest,
    post: PostTransform,
    /// For classifiers, the int64 class labels.
    labels: Option<Vec<i64>>,
}

impl TreeEnsemble {
    fn regress(&self, x: &[f32], rows: usize, width: usize) -> Tensor {
        let k = self.forest.n_outputs;
        let (mut scores, _) = self.forest.accumulate(x, rows, width);
        for r in 0..rows {
            let row = &mut scores[r * k..(r + 1) * k];
            for (o, b) in self.forest.base.iter().enumerate() {
                row[o] += f32::from_bits(*b);
            }
            self.post.apply(row);
        }
        tensor1(&scores).into_shape(&[rows, k]).expect("rows * outputs values")
    }

    fn classify(&self, labels: &[i64], x: &[f32], rows: usize, width: usize) -> (Tensor, Tensor) {
        let k = self.forest.n_outputs;
        let (mut scores, has) = self.forest.accumulate(x, rows, width);
        let used: std::collections::BTreeSet<u32> = self.forest.leaves.iter().map(|l| l.0).collect();
        let binary = k == 2 && used.len() == 1;
        let all_positive = self.forest.leaves.iter().all(|l| f32::from_bits(l.1) >= 0.0);
        let base: Vec<f32> = self.forest.base.iter().map(|b| f32::from_bits(*b)).collect();
        let mut out_labels = Vec::with_capacity(rows);
        let mut out_scores = Vec::with_capacity(rows * k);
        for r in 0..rows {
            let row = &mut scores[r * k..(r + 1) * k];
            if !binary {
                if base.len() == k {
                    row.iter_mut().zip(&base).for_each(|(s, b)| *s += b);
                }
                let best = (0..k)
                    .filter(|&c| has[r * k + c] || base.len() == k)
                    .fold(None, |best: Option<usize>, c| match best {
                        Some(b) if row[b] >= row[c] => Some(b),
                        _ => Some(c),
                    })
                    .unwrap_or(0);
                out_labels.push(labels[best]);
                self.post.apply(row);
                out_scores.extend_from_slice(row);
            } else {
                let c = *used.iter().next().expect("binary case has one class id") as usize;
                let mut s = row[c];
                match base.len() {
                    1 => s += base[0],
                    2 => s += base[c],
                    _ => {}
                }
                let positive = if all_positive { s > 0.5 } else { s > 0.0 };
                out_labels.push(labels[positive as usize]);
                let pair = match (self.post, all_positive) {
                    (PostTransform::Probit, _) => {
                        let p = probit(s);
                        [1.0 - p, p]
                    }
                    (_, true) => [1.0 - s, s],
                    (PostTransform::Logistic, false) => [logistic(-s), logistic(s)],
                    (_, false) => [-s, s],
                };
                out_scores.extend_from_slice(&pair);
            }
        }
        (
            tensor1(&out_labels),
            tensor1(&out_scores)
                .into_shape(&[rows, k])
                .expect("rows * classes values"),
        )
    }
}

impl Op for TreeEnsemble {
    fn name(&self) -> StaticName {
        if self.labels.is_some() {
            "LatheTreeEnsembleClassifier"
        } else {
            "LatheTreeEnsembleRegressor"
        }
        .into()
    }

    op_as_typed_op!();
}

impl EvalOp for TreeEnsemble {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let (x, rows, width) = self.forest.input(&input)?;
        Ok(match &self.labels {
            None => tvec!(self.regress(&x, rows, width).into_tvalue()),
            Some(labels) => {
                let (l, s) = self.classify(labels, &x, rows, width);
                tvec!(l.into_tvalue(), s.into_tvalue())
            }
        })
    }
}

impl TypedOp for TreeEnsemble {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = inputs[0].shape[0].clone();
        let k = self.forest.n_outputs.to_dim();
        Ok(match self.labels {
            None => tvec!(f32::fact([n, k])),
            Some(_) => tvec!(i64::fact([n.clone()]), f32::fact([n, k])),
        })
    }

    as_op!();
}

/// The inference-time wrapper that the ONNX loader builds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TreeExpansion(TreeEnsemble);

impl Expansion for TreeExpansion {
    fn name(&self) -> StaticName {
        self.0.name()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        super::estimator_rules(s, inputs, outputs, self.0.labels.is_some(), self.0.forest.n_outputs)
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(if self.0.labels.is_some() { 2 } else { 1 })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let mut x = inputs[0];
        if model.outlet_fact(x)?.rank() == 1 {
            x = model.wire_node(
                format!("{prefix}.batch"),
                tract_core::ops::change_axes::AxisOp::Add(0),
                &[x],
            )?[0];
        }
        model.wire_node(prefix, self.0.clone(), &[x])
    }
}

pub fn regressor(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let n_targets: i64 = node.get_attr_opt("n_targets")?.unwrap_or(1);
    ensure!(n_targets > 0, "node {:?}: n_targets must be positive", node.name);
    let aggregate = match node.get_attr_opt::<&str>("aggregate_function")?.unwrap_or("SUM") {
        "SUM" => Aggregate::Sum,
        "AVERAGE" => Aggregate::Average,
        "MIN" => Aggregate::Min,
        "MAX" => Aggregate::Max,
        other => bail!("node {:?}: unknown aggregate_function {other:?}", node.name),
    };
    let forest = Forest::parse(node, "target", n_targets as usize, aggregate)?;
    Ok((
        expand(TreeExpansion(TreeEnsemble {
            forest,
            post: PostTransform::parse(node)?,
            labels: None,
        })),
        vec![],
    ))
}

pub fn classifier(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let labels: Vec<i64> = match node.get_attr_opt_vec::<i64>("classlabels_int64s")? {
        Some(l) if !l.is_empty() => l,
        _ => bail!(
            "node {:?}: only integer class labels (classlabels_int64s) are supported; train with integer labels",
            node.name
        ),
    };
    let forest = Forest::parse(node, "class", labels.len(), Aggregate::Sum)?;
    Ok((
        expand(TreeExpansion(TreeEnsemble {
            forest,
            post: PostTransform::parse(node)?,
            labels: Some(labels),
        })),
        vec![],
    ))
}
