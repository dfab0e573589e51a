//! `TreeEnsembleRegressor` and `TreeEnsembleClassifier`, with onnxruntime's semantics.
//!
//! The ensemble is flattened once at load: every node of every tree in one array of 16-byte
//! nodes (mode, feature, threshold, the two children; a leaf is its own child, and holds its
//! weight when it has one), and beside them each leaf's output (or its range in one array of
//! (output, weight) when it has several). When the whole forest uses one ordering branch
//! mode (scikit-learn: `<=`) and its trees are shallow, they are also laid out as perfect binary
//! trees ([`Perfect`]), whose walk needs neither child pointers nor a test for a leaf; other
//! forests walk the nodes. The walks are specialised for the branch mode.
//!
//! Walks are done eight at a time so that they overlap in the CPU: one row walks eight trees
//! together, and a batch walks tree by tree, eight rows together (from blocks stored feature
//! by feature), so that each tree stays in cache while the rows walk it. Leaves are added in
//! tree order either way, so every way of walking gives the same sums, bit for bit.

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
/// hashed), or a [`LEAF_ONE`]'s weight, which is then read from the node the walk ended on.
/// A leaf reads feature 0 and both its children are itself, so a walk can step
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

/// Whether a branch sends value `v` to its `yes` side: `v` against the threshold (f32 bits)
/// by branch mode `M` (or `mode`, for [`MIXED`]), or a missing `v` where the branch's `tag`
/// has [`MISSING_YES`].
#[inline(always)]
fn goes_yes<const M: u32>(mode: u32, tag: u32, v: f32, threshold: u32) -> bool {
    cmp::<M>(mode, v, f32::from_bits(threshold)) | (v.is_nan() & (tag & MISSING_YES != 0))
}

/// One step down a tree from `nd`, reading feature `f` as `value(f)`: the child to go to. A
/// leaf steps to itself.
#[inline(always)]
fn step<const M: u32>(nd: Node, value: impl Fn(usize) -> f32) -> usize {
    let v = value((nd.tag & INDEX_MASK) as usize);
    (if goes_yes::<M>(nd.mode(), nd.tag, v, nd.value) {
        nd.yes
    } else {
        nd.no
    }) as usize
}

/// Walks done together: one row's walks down [`LANES`] trees, or [`LANES`] rows' walks down
/// one tree.
const LANES: usize = 8;

/// Step every lane down its tree from node `at[l]`, lane `l` reading feature `f` as
/// `value(l, f)`, until each is at a leaf. Every lane takes `fewest` steps unchecked (no
/// lane's leaf is nearer), then steps until none moves or `most` steps are taken (no lane's
/// leaf is further). Lanes are independent walks, so the CPU overlaps them; the only branches
/// are the loops' ends.
#[inline(always)]
fn walk_lanes<const M: u32>(
    nodes: &[Node],
    at: &mut [usize; LANES],
    value: impl Fn(usize, usize) -> f32,
    fewest: u32,
    most: u32,
) {
    for _ in 0..fewest {
        for (l, i) in at.iter_mut().enumerate() {
            *i = step::<M>(nodes[*i], |f| value(l, f));
        }
    }
    for _ in fewest..most {
        let mut moved = false;
        for (l, i) in at.iter_mut().enumerate() {
            let next = step::<M>(nodes[*i], |f| value(l, f));
            moved |= next != *i;
            *i = next;
        }
        if !moved {
            return;
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
    /// Per tree: the fewest and the most steps from its root to a leaf.
    depths: Vec<(u32, u32)>,
    /// One output, summed (or averaged), every leaf with one weight: the common case, whose
    /// leaves are added without their payload.
    plain: bool,
    /// The trees as perfect trees, when the forest has one ordering branch mode and they are small.
    perfect: Option<Perfect>,
}

/// The forest's trees as perfect binary trees, all of one depth: a leaf above the bottom is
/// pushed down through branches whose two sides lead to it. A walk then needs no child
/// pointers (the children of branch `j` are `2j + 1`, yes, and `2j + 2`, no) and no check for
/// a leaf (every walk takes `depth` steps), so each step is a few instructions. Built when the
/// forest has one ordering branch mode and the padding stays small ([`Perfect::build`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Perfect {
    depth: u32,
    /// Per tree, `2^depth - 1` branches in breadth-first order: (feature | [`MISSING_YES`],
    /// threshold as f32 bits).
    branches: Vec<(u32, u32)>,
    /// Per tree, `2^depth` bottom slots: the index in `Forest::nodes` of the leaf each one
    /// stands for.
    slots: Vec<u32>,
}

/// The deepest forest laid out as perfect trees.
const PERFECT_DEPTH: u32 = 12;

impl Perfect {
    /// Branches per tree: `2^depth - 1` (the slots are one more).
    fn n_branches(&self) -> usize {
        (1usize << self.depth) - 1
    }

    /// The perfect layout of `nodes` (trees from `roots`, `most` the deepest leaf), when its
    /// depth is at most [`PERFECT_DEPTH`] and it takes at most four times the bytes of the
    /// nodes, plus 64 KiB.
    fn build(nodes: &[Node], roots: &[u32], most: u32) -> Option<Perfect> {
        if most > PERFECT_DEPTH {
            return None;
        }
        let mut p = Perfect {
            depth: most,
            branches: vec![],
            slots: vec![],
        };
        let n_branches = p.n_branches();
        let bytes = roots.len() * (n_branches * 8 + (n_branches + 1) * 4);
        if bytes > 4 * nodes.len() * std::mem::size_of::<Node>() + (64 << 10) {
            return None;
        }
        p.branches = vec![(0, 0); roots.len() * n_branches];
        p.slots = vec![0; roots.len() * (n_branches + 1)];
        for (t, &root) in roots.iter().enumerate() {
            p.fill(nodes, root as usize, t, 0, 0);
        }
        Some(p)
    }

    /// Lay out the subtree of `nodes[at]` from breadth-first position `j` at depth `d` of tree
    /// `t`.
    fn fill(&mut self, nodes: &[Node], at: usize, t: usize, j: usize, d: u32) {
        let n_branches = self.n_branches();
        if d == self.depth {
            self.slots[t * (n_branches + 1) + j - n_branches] = at as u32;
            return;
        }
        let nd = nodes[at];
        let (yes, no) = if nd.mode() >= LEAF_ONE {
            // Feature 0 against 0: either way leads to this leaf.
            (at, at)
        } else {
            self.branches[t * n_branches + j] = (nd.tag & (INDEX_MASK | MISSING_YES), nd.value);
            (nd.yes as usize, nd.no as usize)
        };
        self.fill(nodes, yes, t, 2 * j + 1, d + 1);
        self.fill(nodes, no, t, 2 * j + 2, d + 1);
    }

    /// Walk `L` trees at once, lane `l` down tree `tree(l)` reading feature `f` as
    /// `value(l, f)`: the leaf (its index in `Forest::nodes`) each reaches.
    #[inline(always)]
    #[allow(unsafe_code)]
    fn walk<const M: u32, const L: usize>(
        &self,
        tree: impl Fn(usize) -> usize,
        value: impl Fn(usize, usize) -> f32,
    ) -> [usize; L] {
        let n_branches = self.n_branches();
        let ids: [usize; L] = std::array::from_fn(|l| {
            let t = tree(l);
            assert!(t * (n_branches + 1) < self.slots.len(), "tree {t} is not in the forest");
            t
        });
        let mut j = [0usize; L];
        for _ in 0..self.depth {
            for (l, j) in j.iter_mut().enumerate() {
                // SAFETY: tree `ids[l]` exists (asserted above), so its branches are
                // `branches[ids[l] * n_branches..][..n_branches]`; after `d < depth` steps,
                // `j < 2^d - 1 < n_branches`.
                let (tag, t) = unsafe { *self.branches.get_unchecked(ids[l] * n_branches + *j) };
                let go = goes_yes::<M>(M, tag, value(l, (tag & INDEX_MASK) as usize), t);
                *j = 2 * *j + 2 - go as usize;
            }
        }
        std::array::from_fn(|l| self.slots[ids[l] * (n_branches + 1) + j[l] - n_branches] as usize)
    }
}

/// Per tree (its nodes from its root to the next tree's): the fewest and the most steps from
/// the root to a leaf it reaches. Children come after their parents (checked at parse), so one
/// pass in order sees every parent of a node before the node.
fn depths(nodes: &[Node], roots: &[u32]) -> Vec<(u32, u32)> {
    let ends = roots.iter().skip(1).map(|r| *r as usize).chain([nodes.len()]);
    roots
        .iter()
        .zip(ends)
        .map(|(&root, end)| {
            let root = root as usize;
            // (fewest, most) steps to each node of the tree, once reached.
            let mut at: Vec<Option<(u32, u32)>> = vec![None; end - root];
            at[0] = Some((0, 0));
            let (mut fewest, mut most) = (u32::MAX, 0);
            for pos in root..end {
                let Some((lo, hi)) = at[pos - root] else { continue };
                let nd = nodes[pos];
                if nd.mode() >= LEAF_ONE {
                    fewest = fewest.min(lo);
                    most = most.max(hi);
                    continue;
                }
                for child in [nd.yes as usize, nd.no as usize] {
                    let d = at[child - root].get_or_insert((lo + 1, hi + 1));
                    *d = (d.0.min(lo + 1), d.1.max(hi + 1));
                }
            }
            (fewest.min(most), most)
        })
        .collect()
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
                    // A leaf has no threshold: one weight is kept here, beside the walk's
                    // last read.
                    value: if kind == LEAF_ONE { data.1 } else { 0 },
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
        let depths = depths(&nodes, &roots);
        let plain = n_outputs == 1
            && matches!(aggregate, Aggregate::Sum | Aggregate::Average)
            && nodes.iter().all(|n| n.mode() != LEAF_MANY);
        let most = depths.iter().map(|d| d.1).max().unwrap_or(0);
        // The walks specialised for one mode (EQ and NEQ forests take the mixed walk).
        let perfect = matches!(mode, LEQ | LT | GTE | GT)
            .then(|| Perfect::build(&nodes, &roots, most))
            .flatten();
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
            depths,
            plain,
            perfect,
        })
    }

    /// Sum (or average, min, max) of leaf weights per row and output. With `track`, also
    /// flags the outputs that got any weight. Returns (scores, has_score), `[rows * n_outputs]`
    /// each (`has_score` empty without `track`).
    fn accumulate(&self, x: &[f32], rows: usize, width: usize, track: bool) -> TractResult<(Vec<f32>, Vec<bool>)> {
        // What makes the walks' unchecked reads of a row sound.
        ensure!(
            width > self.max_feature && rows.checked_mul(width) == Some(x.len()),
            "tree ensemble reads feature {} of {} values given as {rows} rows of {width}",
            self.max_feature,
            x.len()
        );
        Ok(match self.mode {
            LEQ => self.accumulate_as::<LEQ>(x, rows, width, track),
            LT => self.accumulate_as::<LT>(x, rows, width, track),
            GTE => self.accumulate_as::<GTE>(x, rows, width, track),
            GT => self.accumulate_as::<GT>(x, rows, width, track),
            _ => self.accumulate_as::<MIXED>(x, rows, width, track),
        })
    }

    /// Add the weights of `leaves`, reached by rows `first..`, to `scores` (and flag them in
    /// `has` when it is not empty).
    #[inline(always)]
    fn add_leaves(&self, scores: &mut [f32], has: &mut [bool], first: usize, leaves: &[usize]) {
        let k = self.n_outputs;
        if self.plain && has.is_empty() {
            // One output, summed, one weight per leaf, kept in the leaf node.
            for (s, &leaf) in scores[first..first + leaves.len()].iter_mut().zip(leaves) {
                *s += f32::from_bits(self.nodes[leaf].value);
            }
            return;
        }
        let track = !has.is_empty();
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
        for (r, &leaf) in (first..).zip(leaves) {
            let nd = self.nodes[leaf];
            if nd.mode() == LEAF_ONE {
                add(r * k + self.payload[leaf].0 as usize, nd.value);
            } else {
                let (a, b) = self.payload[leaf];
                for &(out, w) in &self.leaves[a as usize..b as usize] {
                    add(r * k + out as usize, w);
                }
            }
        }
    }

    /// [`Forest::accumulate`] for branch mode `M`, once `x` is known to hold `rows` rows of
    /// `width > max_feature` values.
    #[allow(unsafe_code)]
    fn accumulate_as<const M: u32>(&self, x: &[f32], rows: usize, width: usize, track: bool) -> (Vec<f32>, Vec<bool>) {
        let k = self.n_outputs;
        let track = track || matches!(self.aggregate, Aggregate::Min | Aggregate::Max);
        let mut scores = vec![0f32; rows * k];
        let mut has = if track { vec![false; rows * k] } else { vec![] };
        let trees = self.roots.len();
        // SAFETY (every unchecked read of a row below): a walk reads features of branches
        // only, each at most `max_feature`, and `max_feature < width` (checked by the caller).
        if rows < LANES {
            // Row by row, each row down LANES trees at a time; the last lanes of the last
            // group walk the group's first tree again, and are not read.
            for r in 0..rows {
                let row = &x[r * width..(r + 1) * width];
                let value = |_: usize, f: usize| unsafe { *row.get_unchecked(f) };
                for first in (0..trees).step_by(LANES) {
                    let n = LANES.min(trees - first);
                    let lanes: [usize; LANES] = std::array::from_fn(|l| first + if l < n { l } else { 0 });
                    let mut add = |leaves: &[usize]| {
                        for &leaf in leaves {
                            self.add_leaves(&mut scores, &mut has, r, &[leaf]);
                        }
                    };
                    match (&self.perfect, M == MIXED) {
                        // Fewer trees than lanes (a single tree, a small forest's last
                        // group): fewer lanes, rather than lanes that walk for nothing.
                        (Some(p), false) if n == 1 => add(&p.walk::<M, 1>(|_| first, value)),
                        (Some(p), false) if n <= 4 => add(&p.walk::<M, 4>(|l| lanes[l], value)[..n]),
                        (Some(p), false) => add(&p.walk::<M, LANES>(|l| lanes[l], value)[..n]),
                        _ => {
                            let (fewest, most) = self.depths[first..first + n]
                                .iter()
                                .fold((u32::MAX, 0), |(a, b), d| (a.min(d.0), b.max(d.1)));
                            let mut at: [usize; LANES] = std::array::from_fn(|l| self.roots[lanes[l]] as usize);
                            walk_lanes::<M>(&self.nodes, &mut at, value, fewest, most);
                            add(&at[..n]);
                        }
                    }
                }
            }
        } else {
            // Tree by tree, so that a tree's nodes stay in cache while every row walks it,
            // LANES rows at a time, from blocks of LANES rows stored feature by feature.
            let blocks = blocks(x, rows, width);
            for t in 0..trees {
                for (b, block) in blocks.chunks_exact(width * LANES).enumerate() {
                    // SAFETY: as above; a block holds `width` values for each of LANES lanes.
                    let value = |l: usize, f: usize| unsafe { *block.get_unchecked(f * LANES + l) };
                    let leaves = match (&self.perfect, M == MIXED) {
                        (Some(p), false) => p.walk::<M, LANES>(|_| t, value),
                        _ => {
                            let mut at = [self.roots[t] as usize; LANES];
                            walk_lanes::<M>(&self.nodes, &mut at, value, self.depths[t].0, self.depths[t].1);
                            at
                        }
                    };
                    let first = b * LANES;
                    self.add_leaves(&mut scores, &mut has, first, &leaves[..LANES.min(rows - first)]);
                }
            }
        }
        if self.aggregate == Aggregate::Average {
            let n = self.roots.len().max(1) as f32;
            scores.iter_mut().for_each(|s| *s /= n);
        }
        (scores, has)
    }
}

/// `rows` rows of `width` values as blocks of [`LANES`] rows, each block feature by feature
/// (`[block][feature][lane]`); the last block's lanes past the last row repeat it.
fn blocks(x: &[f32], rows: usize, width: usize) -> Vec<f32> {
    let n = rows.div_ceil(LANES);
    let mut out = vec![0f32; n * width * LANES];
    for (b, block) in out.chunks_exact_mut(width * LANES).enumerate() {
        let lanes: [&[f32]; LANES] = std::array::from_fn(|l| {
            let r = (b * LANES + l).min(rows - 1);
            &x[r * width..(r + 1) * width]
        });
        for (f, to) in block.chunks_exact_mut(LANES).enumerate() {
            for (to, lane) in to.iter_mut().zip(lanes) {
                *to = lane[f];
            }
        }
    }
    out
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
    fn regress(&self, x: &[f32], rows: usize, width: usize) -> TractResult<Vec<f32>> {
        let k = self.forest.n_outputs;
        let (mut scores, _) = self.forest.accumulate(x, rows, width, false)?;
        if !self.forest.base.is_empty() || self.post != PostTransform::None {
            for row in scores.chunks_exact_mut(k) {
                for (o, b) in self.forest.base.iter().enumerate() {
                    row[o] += f32::from_bits(*b);
                }
                self.post.apply(row);
            }
        }
        Ok(scores)
    }

    /// A binary model: two classes, and weights for only one of them.
    fn binary_class(&self) -> Option<usize> {
        match self.forest.used.as_slice() {
            [c] if self.forest.n_outputs == 2 => Some(*c as usize),
            _ => None,
        }
    }

    fn classify(&self, labels: &[i64], x: &[f32], rows: usize, width: usize) -> TractResult<(Vec<i64>, Vec<f32>)> {
        let k = self.forest.n_outputs;
        let binary = self.binary_class();
        let (mut scores, has) = self.forest.accumulate(x, rows, width, binary.is_none())?;
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
        Ok((out_labels, scores))
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
            None => Computed::Values(self.regress(x, rows, width)?),
            Some(labels) => {
                let (labels, scores) = self.classify(labels, x, rows, width)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::attribute_proto::AttributeType;
    use tract_onnx::pb::AttributeProto;

    /// A small deterministic generator (xorshift).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn value(&mut self) -> f32 {
            (self.below(2001) as f32 - 1000.0) / 100.0
        }
    }

    /// One node of a generated tree, as the ONNX attributes give it.
    struct Spec {
        tree: i64,
        id: i64,
        feature: i64,
        value: f32,
        mode: &'static str,
        yes: i64,
        no: i64,
        missing: i64,
        /// A leaf's weight.
        weight: Option<f32>,
    }

    /// Grow a node of `tree` (whose nodes start at `out[first]`) at `depth`: a leaf at `deep`,
    /// or by chance from `shallow` on. Nodes are numbered in preorder, so children come after
    /// their parents.
    #[allow(clippy::too_many_arguments)]
    fn grow(
        rng: &mut Rng,
        out: &mut Vec<Spec>,
        (tree, first): (i64, usize),
        depth: u32,
        shallow: u32,
        deep: u32,
        width: u64,
        modes: &[&'static str],
    ) -> i64 {
        let id = (out.len() - first) as i64;
        let leaf = depth == deep || (depth >= shallow && rng.below(3) == 0);
        out.push(Spec {
            tree,
            id,
            feature: rng.below(width) as i64,
            value: rng.value(),
            mode: if leaf {
                "LEAF"
            } else {
                modes[rng.below(modes.len() as u64) as usize]
            },
            yes: 0,
            no: 0,
            missing: rng.below(2) as i64,
            weight: leaf.then(|| rng.value()),
        });
        let at = out.len() - 1;
        if !leaf {
            out[at].yes = grow(rng, out, (tree, first), depth + 1, shallow, deep, width, modes);
            out[at].no = grow(rng, out, (tree, first), depth + 1, shallow, deep, width, modes);
        }
        id
    }

    fn ints(name: &str, v: impl Iterator<Item = i64>) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: v.collect(),
            ..Default::default()
        }
    }

    fn floats(name: &str, v: impl Iterator<Item = f32>) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Floats as i32,
            floats: v.collect(),
            ..Default::default()
        }
    }

    fn node(specs: &[Spec]) -> NodeProto {
        let leaves: Vec<&Spec> = specs.iter().filter(|s| s.weight.is_some()).collect();
        NodeProto {
            name: "forest".into(),
            op_type: "TreeEnsembleRegressor".into(),
            attribute: vec![
                ints("nodes_treeids", specs.iter().map(|s| s.tree)),
                ints("nodes_nodeids", specs.iter().map(|s| s.id)),
                ints("nodes_featureids", specs.iter().map(|s| s.feature)),
                floats("nodes_values", specs.iter().map(|s| s.value)),
                AttributeProto {
                    name: "nodes_modes".into(),
                    r#type: AttributeType::Strings as i32,
                    strings: specs.iter().map(|s| s.mode.as_bytes().to_vec()).collect(),
                    ..Default::default()
                },
                ints("nodes_truenodeids", specs.iter().map(|s| s.yes)),
                ints("nodes_falsenodeids", specs.iter().map(|s| s.no)),
                ints("nodes_missing_value_tracks_true", specs.iter().map(|s| s.missing)),
                ints("target_treeids", leaves.iter().map(|s| s.tree)),
                ints("target_nodeids", leaves.iter().map(|s| s.id)),
                ints("target_ids", leaves.iter().map(|_| 0)),
                floats("target_weights", leaves.iter().map(|s| s.weight.unwrap_or(0.0))),
            ],
            ..Default::default()
        }
    }

    /// ONNX's semantics, walked node by node from the attributes: the sum of the trees'
    /// weights, in tree order.
    fn reference(specs: &[Spec], trees: i64, row: &[f32]) -> f32 {
        let by_id: std::collections::HashMap<(i64, i64), &Spec> = specs.iter().map(|s| ((s.tree, s.id), s)).collect();
        let mut sum = 0f32;
        for tree in 0..trees {
            let find = |id: i64| by_id[&(tree, id)];
            let mut at = find(0);
            while at.weight.is_none() {
                let (v, t) = (row[at.feature as usize], at.value);
                let go = if v.is_nan() && at.missing == 1 {
                    true
                } else {
                    match at.mode {
                        "BRANCH_LEQ" => v <= t,
                        "BRANCH_LT" => v < t,
                        "BRANCH_GTE" => v >= t,
                        "BRANCH_GT" => v > t,
                        "BRANCH_EQ" => v == t,
                        _ => v != t,
                    }
                };
                at = find(if go { at.yes } else { at.no });
            }
            sum += at.weight.unwrap_or(0.0);
        }
        sum
    }

    /// Forests that take each way of walking: perfect trees (deep and shallow, one tree and
    /// many), and the node walk (mixed branch modes; trees too deep to lay out perfectly),
    /// give ONNX's result bit for bit on rows with missing values, one row at a time and in
    /// batches that are and are not whole blocks of lanes.
    #[test]
    fn every_walk_gives_onnx_results() {
        let width = 5u64;
        // (trees, shallowest leaf, deepest leaf, modes, laid out as perfect trees)
        let cases: [(i64, u32, u32, &[&'static str], bool); 7] = [
            (1, 4, 4, &["BRANCH_LEQ"], true),
            (3, 1, 9, &["BRANCH_LT"], true),
            (21, 2, 6, &["BRANCH_GTE"], true),
            (40, 0, 3, &["BRANCH_GT"], true),
            (5, 1, 7, &["BRANCH_LEQ", "BRANCH_LT", "BRANCH_EQ", "BRANCH_NEQ"], false),
            (1, PERFECT_DEPTH + 1, PERFECT_DEPTH + 1, &["BRANCH_LEQ"], false),
            (3, 1, 6, &["BRANCH_EQ"], false),
        ];
        let mut rng = Rng(0x5eed_1a7e);
        for (trees, shallow, deep, modes, perfect) in cases {
            let mut specs = vec![];
            for tree in 0..trees {
                let first = specs.len();
                grow(&mut rng, &mut specs, (tree, first), 0, shallow, deep, width, modes);
            }
            let forest = Forest::parse(&node(&specs), "target", 1, Aggregate::Sum).expect("parses");
            assert_eq!(
                forest.perfect.is_some(),
                perfect,
                "{trees} trees to depth {deep}, {modes:?}"
            );
            for rows in [1, 3, 8, 13, 64] {
                let x: Vec<f32> = (0..rows * width as usize)
                    .map(|_| if rng.below(8) == 0 { f32::NAN } else { rng.value() })
                    .collect();
                let (got, _) = forest.accumulate(&x, rows, width as usize, false).expect("runs");
                for (r, row) in x.chunks_exact(width as usize).enumerate() {
                    let want = reference(&specs, trees, row);
                    assert_eq!(
                        got[r].to_bits(),
                        want.to_bits(),
                        "{trees} trees, {rows} rows, row {r}: {row:?}"
                    );
                }
            }
        }
    }

    /// A tree far deeper than a perfect layout allows (a chain: each branch's `yes` is a
    /// leaf) parses, and walks the nodes to ONNX's leaf.
    #[test]
    fn a_chain_of_a_hundred_branches_walks_the_nodes() {
        let (deep, width) = (100i64, 3usize);
        let mut specs = vec![];
        for k in 0..deep {
            let branch = Spec {
                tree: 0,
                id: 2 * k,
                feature: k % width as i64,
                value: k as f32 - 50.0,
                mode: "BRANCH_LEQ",
                yes: 2 * k + 1,
                no: 2 * k + 2,
                missing: k % 2,
                weight: None,
            };
            let leaf = Spec {
                id: 2 * k + 1,
                mode: "LEAF",
                weight: Some(k as f32),
                ..branch
            };
            specs.extend([branch, leaf]);
        }
        specs.push(Spec {
            tree: 0,
            id: 2 * deep,
            feature: 0,
            value: 0.0,
            mode: "LEAF",
            yes: 0,
            no: 0,
            missing: 0,
            weight: Some(-1.0),
        });
        let forest = Forest::parse(&node(&specs), "target", 1, Aggregate::Sum).expect("parses");
        assert!(forest.perfect.is_none());
        let rows: Vec<[f32; 3]> = vec![[100.0; 3], [-100.0; 3], [f32::NAN; 3], [10.0, 20.0, f32::NAN]];
        let x: Vec<f32> = rows.iter().flatten().copied().collect();
        for n in [1, rows.len()] {
            let (got, _) = forest.accumulate(&x[..n * width], n, width, false).expect("runs");
            for (r, row) in rows[..n].iter().enumerate() {
                assert_eq!(got[r].to_bits(), reference(&specs, 1, row).to_bits(), "row {row:?}");
            }
        }
    }

    #[test]
    fn rows_too_narrow_for_the_features_are_refused() {
        let mut specs = vec![];
        grow(&mut Rng(7), &mut specs, (0, 0), 0, 2, 2, 5, &["BRANCH_LEQ"]);
        let forest = Forest::parse(&node(&specs), "target", 1, Aggregate::Sum).expect("parses");
        let w = forest.max_feature;
        let err = forest.accumulate(&vec![0.0; w], 1, w, false).expect_err("too narrow");
        assert!(err.to_string().contains("reads feature"), "{err}");
        let err = forest
            .accumulate(&[0.0; 7], 2, w + 1, false)
            .expect_err("not whole rows");
        assert!(err.to_string().contains("rows of"), "{err}");
    }
}
