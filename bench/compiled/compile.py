#!/usr/bin/env python3
"""The compiled-trees peer of lathe-bench: tree ensembles of the corpus compiled to native code.

For each model named, this reads fixtures/corpus/<name>.onnx, rebuilds its tree ensemble
(TreeEnsembleRegressor or TreeEnsembleClassifier, the same trees, thresholds and leaf values)
as a treelite model, proves it equal to the ONNX model on every row of <name>.cases.json
(onnxruntime's outputs there, within 1e-5, NaN rows included), and has tl2cgen generate C for
it. bench/compiled/build.sh then compiles that C with the system compiler into a harness
(harness.c) that calls it one row at a time.

A model that is not one tree ensemble whose output is the model's output, or whose rebuilt
trees do not match onnxruntime, is reported and skipped; lathe-bench then prints "n/a" for
its compiled column.

    python3 bench/compiled/compile.py OUT_DIR MODEL ...
Writes OUT_DIR/<model>/ (tl2cgen's C sources and header) and prints one line per model.
"""

import json
import math
import pathlib
import shutil
import sys

import numpy as np
import onnx
import tl2cgen
import treelite
from onnx import helper
from treelite.model_builder import (
    Metadata,
    ModelBuilder,
    PostProcessorFunc,
    TreeAnnotation,
)

CORPUS = pathlib.Path(__file__).resolve().parent.parent.parent / "fixtures" / "corpus"
TOLERANCE = 1e-5
# ONNX's branch modes as treelite's comparison operators: true goes left.
OPS = {"BRANCH_LEQ": "<=", "BRANCH_LT": "<", "BRANCH_GTE": ">=", "BRANCH_GT": ">", "BRANCH_EQ": "=="}


class Unsupported(Exception):
    pass


def attrs(node):
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode() for x in v]
        out[a.name] = v
    return out


def ensemble_node(model):
    """The one tree-ensemble node of the graph; every other node may only pass its outputs on."""
    trees = [n for n in model.graph.node if n.op_type in ("TreeEnsembleRegressor", "TreeEnsembleClassifier")]
    if len(trees) != 1:
        raise Unsupported(f"{len(trees)} tree-ensemble nodes (one is needed)")
    others = {n.op_type for n in model.graph.node} - {trees[0].op_type, "Identity", "Cast", "ZipMap"}
    if others:
        raise Unsupported(f"operators around the trees: {sorted(others)}")
    return trees[0]


def build(model):
    """A treelite model with the ONNX ensemble's trees; and how to read its output."""
    node = ensemble_node(model)
    a = attrs(node)
    classifier = node.op_type == "TreeEnsembleClassifier"
    post = a.get("post_transform", "NONE")
    if "nodes_values" not in a:
        raise Unsupported("thresholds not as nodes_values (float)")
    n_features = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    if n_features <= 0:
        raise Unsupported("the input's feature count is not fixed")

    tree_ids, node_ids = a["nodes_treeids"], a["nodes_nodeids"]
    missing = a.get("nodes_missing_value_tracks_true", [0] * len(tree_ids))

    if classifier:
        labels = a.get("classlabels_int64s") or a.get("classlabels_strings")
        n_classes = len(labels)
        l_tree, l_node, l_id, l_w = a["class_treeids"], a["class_nodeids"], a["class_ids"], a["class_weights"]
    else:
        n_classes = a.get("n_targets", 1)
        if n_classes != 1:
            raise Unsupported(f"{n_classes} targets")
        if post != "NONE":
            raise Unsupported(f"regressor post_transform {post}")
        if a.get("aggregate_function", "SUM") not in ("SUM", "AVERAGE"):
            raise Unsupported(f"aggregate_function {a['aggregate_function']}")
        l_tree, l_node, l_id, l_w = a["target_treeids"], a["target_nodeids"], a["target_ids"], a["target_weights"]
    scores_used = sorted(set(l_id))
    # One score column for two classes: onnxruntime's binary case, class 1's score.
    one_score = classifier and n_classes == 2 and len(scores_used) == 1
    width = 1 if (one_score or not classifier) else n_classes

    leaves = {}
    for t, n, c, w in zip(l_tree, l_node, l_id, l_w):
        leaves.setdefault((t, n), np.zeros(width, dtype=np.float64))[0 if width == 1 else c] += w

    # Each tree's score columns: one column per tree lets the compiled code add a scalar.
    trees = sorted(set(tree_ids))
    cols = {t: set() for t in trees}
    for t, _, c, _ in zip(l_tree, l_node, l_id, l_w):
        cols[t].add(0 if width == 1 else c)
    per_tree_class = width > 1 and all(len(c) == 1 for c in cols.values())

    base = list(a.get("base_values", [])) or [0.0] * width
    if one_score:
        if len(base) == 2:
            raise Unsupported("two base values with one score column")
        if post not in ("LOGISTIC", "NONE"):
            raise Unsupported(f"binary one-score post_transform {post}")
        task, num_class = "kBinaryClf", [1]
        post_fn = "sigmoid" if post == "LOGISTIC" else "identity"
    elif classifier:
        if post == "SOFTMAX":
            post_fn = "softmax"
        elif post == "NONE":
            post_fn = "identity_multiclass"
        else:
            raise Unsupported(f"classifier post_transform {post}")
        task, num_class = "kMultiClf", [n_classes]
    else:
        task, num_class, post_fn = "kRegressor", [1], "identity"
    if len(base) != width:
        raise Unsupported(f"{len(base)} base values for {width} scores")

    builder = ModelBuilder(
        threshold_type="float32",
        leaf_output_type="float32",
        metadata=Metadata(
            num_feature=n_features,
            task_type=task,
            average_tree_output=(not classifier and a.get("aggregate_function", "SUM") == "AVERAGE"),
            num_target=1,
            num_class=num_class,
            leaf_vector_shape=(1, 1 if (width == 1 or per_tree_class) else width),
        ),
        tree_annotation=TreeAnnotation(
            num_tree=len(trees),
            target_id=[0] * len(trees),
            class_id=[next(iter(cols[t])) if per_tree_class else (0 if width == 1 else -1) for t in trees],
        ),
        postprocessor=PostProcessorFunc(name=post_fn),
        base_scores=[float(b) for b in base],
    )
    modes = a["nodes_modes"]
    for t in trees:
        builder.start_tree()
        for i in (i for i, tid in enumerate(tree_ids) if tid == t):
            builder.start_node(node_ids[i])
            if modes[i] == "LEAF":
                v = leaves.get((t, node_ids[i]), np.zeros(width))
                if width == 1 or per_tree_class:
                    builder.leaf(float(v[0] if width == 1 else v[next(iter(cols[t]))]))
                else:
                    builder.leaf([float(x) for x in v])
            else:
                op = OPS.get(modes[i])
                if op is None:
                    raise Unsupported(f"branch mode {modes[i]}")
                builder.numerical_test(
                    a["nodes_featureids"][i],
                    float(np.float32(a["nodes_values"][i])),
                    default_left=bool(missing[i]),
                    opname=op,
                    left_child_key=a["nodes_truenodeids"][i],
                    right_child_key=a["nodes_falsenodeids"][i],
                )
            builder.end_node()
        builder.end_tree()
    return builder.commit(), classifier, one_score


def expected(cases, classifier):
    """The output the trees make: a classifier's probabilities (its second output), else the first."""
    out_name = cases["outputs"][1 if classifier else 0]["name"]
    return out_name, [e[out_name] for e in cases["expected"]]


def check(name, tl_model, classifier, one_score):
    """Rows of the corpus through treelite's own evaluator, against onnxruntime's outputs."""
    cases = json.loads((CORPUS / f"{name}.cases.json").read_text())
    x = np.array([[math.nan if v is None else v for v in r] for r in cases["rows"]], dtype=np.float32)
    out_name, want = expected(cases, classifier)
    got = treelite.gtil.predict(tl_model, x).reshape(len(x), -1)
    worst, compiled_want = 0.0, []
    for i, w in enumerate(want):
        w = np.array(list(w.values()) if isinstance(w, dict) else w, dtype=np.float64).reshape(-1)
        # What the compiled code outputs: class 1's probability alone in the one-score case.
        compiled_want.append(w[1:] if one_score else w)
        g = got[i].astype(np.float64)
        if one_score:
            g = np.array([1.0 - g[0], g[0]])
        if g.shape != w.shape:
            raise Unsupported(f"{out_name}: {g.shape} values against {w.shape}")
        both_nan = np.isnan(g) & np.isnan(w)
        err = np.where(both_nan, 0.0, np.abs(g - w) / np.maximum(1.0, np.abs(w)))
        worst = max(worst, float(np.nanmax(err)) if err.size else 0.0)
        if np.isnan(err).any():
            raise Unsupported(f"row {i}: NaN against a number")
    if worst > TOLERANCE:
        raise Unsupported(f"does not match onnxruntime (worst relative error {worst:.2e})")
    return x, np.array(compiled_want, dtype=np.float32), worst


def write_rows(path, x):
    """The harness's rows file: rows and features as two little-endian uint32, then float32."""
    with open(path, "wb") as f:
        f.write(np.array(x.shape, dtype="<u4").tobytes())
        f.write(x.astype("<f4").tobytes())


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[2:]:
        # Nothing of an earlier build stays: a model that no longer compiles has no harness.
        shutil.rmtree(out / name, ignore_errors=True)
        try:
            tl_model, classifier, one_score = build(onnx.load(CORPUS / f"{name}.onnx"))
            x, want, worst = check(name, tl_model, classifier, one_score)
            d = out / name
            tl2cgen.generate_c_code(tl_model, dirpath=d, params={})
            # For the harness's own check: the compiled code against onnxruntime's outputs.
            write_rows(d / "check.rows", x)
            (d / "check.expected").write_bytes(want.astype("<f4").tobytes())
            rows = len(x)
            print(f"{name}: compiled, {tl_model.num_tree} trees, matches onnxruntime on {rows} rows (worst {worst:.1e})")
        except Unsupported as e:
            print(f"{name}: not compiled: {e}")
        except Exception as e:  # noqa: BLE001 - one odd model must not stop the others
            print(f"{name}: not compiled: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
