//! `TreeEnsembleRegressor` and `TreeEnsembleClassifier`, with onnxruntime's semantics.
//!
//! The ensemble is flattened once at load: every node of every tree in one array of 16-byte
//! nodes (mode, feature, threshold, the two children; a leaf is its own child), and beside it
//! each leaf's weight (or its range in one array of (output, weight) when it has several).
//! The walk is specialised for the branch mode when the whole forest uses one (scikit-learn:
//! `<=`). Evaluation is tree-major over the batch: each tree's nodes stay in cache while the
//! rows walk it, eight at a time so that their walks overlap.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::post::{logistic, probit, Post as PostTransform};
use super::rowop::{row_op, Computed, Outputs, RowOp};

/// Branch modes, in the order of [`cmp`]; leaves come after them.
const LEQ: u32 = 0;
const LT: u32 = 1;
const GTE: u32 = 2;
const GT: u32 = 3;
const EQ: u32 = 4;
const NEQ: u32 = 5;
/// A leaf with one (output, weight): `Forest::payload` holds them.
const LEAF_ONE: u32 = 6;
/// A leaf whose (output, weight) pairs are `Forest::leaves[start..end]`, with (start, end) in
/// `Forest::payload`.
const LEAF_MANY: u32 = 7;
/// A forest whose branches use more than one mode.
const MIXED: u32 = 15;

const MODE_SHIFT: u32 = 24;
const INDEX_MASK: u32 = (1 << MODE_SHIFT) - 1;
/// A NaN feature takes the `yes` branch.
const MISSING_YES: u32 = 1 << 28;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

/// One node in 16 bytes. `tag` holds the mode (bits 24..28), [`MISSING_YES`], and the
/// feature index; `value` is the threshold, as f32 bits (bits, so that the operator can be
/// hashed). A leaf reads feature 0 and both its children are itself, so a walk can step
/// through it without asking whether it is a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Node {
    tag: u32,
    value: u32,
    yes: u32,
    no: u32,
}

impl Node {
    fn mode(self) -> u32 {
        (self.tag >> MODE_SHIFT) & 0xF
    }
}

/// `v` against threshold `t` by branch mode `M`, or by `mode` when `M` is [`MIXED`].
#[inline(always)]
fn cmp<const M: u32>(mode: u32, v: f32, t: f32) -> bool {
    match if M == MIXED { mode } else { M } {
        LEQ => v <= t,
        LT => v < t,
        GTE => v >= t,
        GT => v > t,
        EQ => v == t,
        _ => v != t,
    }
}

/// One step down a tree for `row` from `nd`: the child to go to. A leaf steps to itself.
#[inline(always)]
fn step<const M: u32>(nd: Node, row: &[f32]) -> usize {
    let v = row[(nd.tag & INDEX_MASK) as usize];
    let go = cmp::<M>(nd.mode(), v, f32::from_bits(nd.value)) | (v.is_nan() & (nd.tag & MISSING_YES != 0));
    (if go { nd.yes } else { nd.no }) as usize
}

/// Walk one tree from `root` for `row`; the index of the leaf reached.
#[inline(always)]
fn walk<const M: u32>(nodes: &[Node], root: u32, row: &[f32]) -> usize {
    let mut i = root as usize;
    loop {
        let next = step::<M>(nodes[i], row);
        if next == i {
            return i;
        }
        i = next;
    }
}

/// Rows walked together through a tree.
const LANES: usize = 8;

/// Walk one tree for [`LANES`] rows at once (`block` holds them back to back); the leaf each
/// reaches. Every lane steps until none moves, leaves included, so the only branch is the
/// loop's end.
#[inline(always)]
fn walk_lanes<const M: u32>(nodes: &[Node], root: u32, block: &[f32], width: usize) -> [usize; LANES] {
    let mut at = [root as usize; LANES];
    loop {
        let mut moved = false;
        for (l, i) in at.iter_mut().enumerate() {
            let next = step::<M>(nodes[*i], &block[l * width..(l + 1) * width]);
            moved |= next != *i;
            *i = next;
        }
        if !moved {
            return at;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Forest {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    /// Per node: for a [`LEAF_ONE`], (output index, f32 bits of the weight); for a
    /// [`LEAF_MANY`], its range in `leaves`; for a branch, unused.
    payload: Vec<(u32, u32)>,
    /// (output index, f32 bits of the weight) of [`LEAF_MANY`] leaves.
    leaves: Vec<(u32, u32)>,
    n_outputs: usize,
    aggregate: Aggregate,
    /// f32 bits, one per output, or empty.
    base: Vec<u32>,
    max_feature: usize,
    /// The branch mode every branch uses, or [`MIXED`].
    mode: u32,
    /// Output indices that some leaf adds weight to, ascending.
    used: Vec<u32>,
    /// Every leaf weight is >= 0.
    all_positive: bool,
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

        let used: Vec<u32> = by_leaf
            .values()
            .flatten()
            .map(|l| l.0)
            .collect::<std::collections::BTreeSet<u32>>()
            .into_iter()
            .collect();
        let all_positive = by_leaf.values().flatten().all(|l| f32::from_bits(l.1) >= 0.0);
        ensure!(
            n_outputs <= INDEX_MASK as usize,
            "node {name:?}: {n_outputs} outputs is more than Lathe supports"
        );

        let mut nodes = Vec::with_capacity(n);
        let mut leaves = Vec::with_capacity(m);
        let mut payload = Vec::with_capacity(n);
        let mut roots = vec![];
        let mut last_tree = None;
        let mut modes_seen = std::collections::BTreeSet::new();
        for &i in &order {
            if last_tree != Some(tree_ids[i]) {
                roots.push(nodes.len() as u32);
                last_tree = Some(tree_ids[i]);
            }
            let mode = match modes[i] {
                "BRANCH_LEQ" => LEQ,
                "BRANCH_LT" => LT,
                "BRANCH_GTE" => GTE,
                "BRANCH_GT" => GT,
                "BRANCH_EQ" => EQ,
                "BRANCH_NEQ" => NEQ,
                "LEAF" => LEAF_MANY,
                other => bail!("node {name:?}: unknown node mode {other:?}"),
            };
            let pos = nodes.len() as u32;
            if mode == LEAF_MANY {
                let mine = by_leaf.remove(&pos).unwrap_or_default();
                let (kind, data) = match mine.as_slice() {
                    [one] => (LEAF_ONE, *one),
                    _ => {
                        let start = leaves.len() as u32;
                        leaves.extend(mine);
                        (LEAF_MANY, (start, leaves.len() as u32))
                    }
                };
                nodes.push(Node {
                    tag: kind << MODE_SHIFT,
                    value: 0,
                    yes: pos,
                    no: pos,
                });
                payload.push(data);
                continue;
            }
            modes_seen.insert(mode);
            let child = |c: i64| {
                index.get(&(tree_ids[i], c)).copied().ok_or_else(|| {
                    format_err!(
                        "node {name:?}: tree {} node {} points to missing node {c}",
                        tree_ids[i],
                        node_ids[i]
                    )
                })
            };
            let feature = u32::try_from(features[i])
                .ok()
                .filter(|f| *f <= INDEX_MASK)
                .ok_or_else(|| format_err!("node {name:?}: feature id {} is out of range", features[i]))?;
            // NaN != t holds, so NEQ sends missing values to `yes` whatever the flag says.
            let missing = if missing[i] != 0 || mode == NEQ { MISSING_YES } else { 0 };
            nodes.push(Node {
                tag: (mode << MODE_SHIFT) | missing | feature,
                value: values[i].to_bits(),
                yes: child(trues[i])?,
                no: child(falses[i])?,
            });
            payload.push((0, 0));
        }
        ensure!(
            by_leaf.is_empty(),
            "node {name:?}: {prefix} weights on nodes that are not leaves"
        );
        let max_feature = nodes
            .iter()
            .filter(|n| n.mode() < LEAF_ONE)
            .map(|n| (n.tag & INDEX_MASK) as usize)
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
            if nd.mode() < LEAF_ONE && (nd.yes as usize <= pos || nd.no as usize <= pos) {
                bail!("node {name:?}: a node points back to an earlier node; refusing a tree that could loop");
            }
        }
        let mode = match modes_seen.len() {
            1 => *modes_seen.iter().next().expect("one mode"),
            _ => MIXED,
        };
        Ok(Forest {
            nodes,
            roots,
            payload,
            leaves,
            n_outputs,
            aggregate,
            base: base.iter().map(|b| b.to_bits()).collect(),
            max_feature,
            mode,
            used,
            all_positive,
        })
    }

    /// Sum (or average, min, max) of leaf weights per row and output. With `track`, also
    /// flags the outputs that got any weight. Returns (scores, has_score), `[rows * n_outputs]`
    /// each (`has_score` empty without `track`).
    fn accumulate(&self, x: &[f32], rows: usize, width: usize, track: bool) -> (Vec<f32>, Vec<bool>) {
        match self.mode {
            LEQ => self.accumulate_as::<LEQ>(x, rows, width, track),
            LT => self.accumulate_as::<LT>(x, rows, width, track),
            GTE => self.accumulate_as::<GTE>(x, rows, width, track),
            GT => self.accumulate_as::<GT>(x, rows, width, track),
            _ => self.accumulate_as::<MIXED>(x, rows, width, track),
        }
    }

    fn accumulate_as<const M: u32>(&self, x: &[f32], rows: usize, width: usize, track: bool) -> (Vec<f32>, Vec<bool>) {
        let k = self.n_outputs;
        let track = track || matches!(self.aggregate, Aggregate::Min | Aggregate::Max);
        let mut scores = vec![0f32; rows * k];
        let mut has = if track { vec![false; rows * k] } else { vec![] };
        let mut add = |slot: usize, w: u32| {
            let w = f32::from_bits(w);
            scores[slot] = match self.aggregate {
                Aggregate::Sum | Aggregate::Average => scores[slot] + w,
                Aggregate::Min if has[slot] => scores[slot].min(w),
                Aggregate::Max if has[slot] => scores[slot].max(w),
                Aggregate::Min | Aggregate::Max => w,
            };
            if track {
                has[slot] = true;
            }
        };
        let mut leaf_of = |r: usize, leaf: usize| {
            let (a, b) = self.payload[leaf];
            if self.nodes[leaf].mode() == LEAF_ONE {
                add(r * k + a as usize, b);
            } else {
                for &(out, w) in &self.leaves[a as usize..b as usize] {
                    add(r * k + out as usize, w);
                }
            }
        };
        // Tree-major: one tree's nodes stay in cache while every row walks it, LANES rows
        // at a time so that their walks overlap in the CPU.
        let blocked = rows - rows % LANES;
        for &root in &self.roots {
            for first in (0..blocked).step_by(LANES) {
                let block = &x[first * width..(first + LANES) * width];
                for (l, leaf) in walk_lanes::<M>(&self.nodes, root, block, width).into_iter().enumerate() {
                    leaf_of(first + l, leaf);
                }
            }
            for r in blocked..rows {
                leaf_of(r, walk::<M>(&self.nodes, root, &x[r * width..(r + 1) * width]));
            }
        }
        if self.aggregate == Aggregate::Average {
            let n = self.roots.len().max(1) as f32;
            scores.iter_mut().for_each(|s| *s /= n);
        }
        (scores, has)
    }
}

/// `TreeEnsembleRegressor` (no labels) or `TreeEnsembleClassifier`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TreeEnsemble {
    forest: Forest,
    post: PostTransform,
    /// For classifiers, the int64 class labels.
    labels: Option<Vec<i64>>,
}

impl TreeEnsemble {
    fn regress(&self, x: &[f32], rows: usize, width: usize) -> Vec<f32> {
        let k = self.forest.n_outputs;
        let (mut scores, _) = self.forest.accumulate(x, rows, width, false);
        for row in scores.chunks_exact_mut(k) {
            for (o, b) in self.forest.base.iter().enumerate() {
                row[o] += f32::from_bits(*b);
            }
            self.post.apply(row);
        }
        scores
    }

    /// A binary model: two classes, and weights for only one of them.
    fn binary_class(&self) -> Option<usize> {
        match self.forest.used.as_slice() {
            [c] if self.forest.n_outputs == 2 => Some(*c as usize),
            _ => None,
        }
    }

    fn classify(&self, labels: &[i64], x: &[f32], rows: usize, width: usize) -> (Vec<i64>, Vec<f32>) {
        let k = self.forest.n_outputs;
        let binary = self.binary_class();
        let (mut scores, has) = self.forest.accumulate(x, rows, width, binary.is_none());
        let all_positive = self.forest.all_positive;
        let base: Vec<f32> = self.forest.base.iter().map(|b| f32::from_bits(*b)).collect();
        let mut out_labels = Vec::with_capacity(rows);
        for (r, row) in scores.chunks_exact_mut(k).enumerate() {
            match binary {
                None => {
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
                }
                Some(c) => {
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
                    row.copy_from_slice(&pair);
                }
            }
        }
        (out_labels, scores)
    }
}

impl RowOp for TreeEnsemble {
    fn name(&self) -> &'static str {
        if self.labels.is_some() {
            "LatheTreeEnsembleClassifier"
        } else {
            "LatheTreeEnsembleRegressor"
        }
    }

    fn outputs(&self) -> Outputs {
        match self.labels {
            Some(_) => Outputs::Classifier(self.forest.n_outputs),
            None => Outputs::Regressor(self.forest.n_outputs),
        }
    }

    fn check_width(&self, width: usize) -> TractResult<()> {
        ensure!(
            width > self.forest.max_feature,
            "tree ensemble reads feature {} of rows that have {width}",
            self.forest.max_feature
        );
        Ok(())
    }

    fn eval(&self, x: &[f32], rows: usize, width: usize) -> TractResult<Computed> {
        Ok(match &self.labels {
            None => Computed::Values(self.regress(x, rows, width)),
            Some(labels) => {
                let (labels, scores) = self.classify(labels, x, rows, width);
                Computed::Classes { labels, scores }
            }
        })
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
        row_op(TreeEnsemble {
            forest,
            post: PostTransform::parse(node)?,
            labels: None,
        }),
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
        row_op(TreeEnsemble {
            forest,
            post: PostTransform::parse(node)?,
            labels: Some(labels),
        }),
        vec![],
    ))
}
