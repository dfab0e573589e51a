//! The direct path: a model made only of Lathe's row operators, run without tract's plan.
//!
//! A scikit-learn pipeline of scalers, imputers, a linear model or a tree ensemble optimises
//! to a graph of [`RowOp`](super::rowop::RowOp) nodes fed by one float32 input. tract's plan
//! runs such a graph correctly, but each call pays for its general machinery (tensors built
//! and freed per node, a session state, shape checks), which for one row costs more than the
//! model's own work. A [`RowChain`] runs the same nodes, in the plan's order, straight on the
//! caller's floats.
//!
//! It is a second way to run the very same operators, not a second implementation of them:
//! each step calls the operator the plan holds ([`RowOp::eval`](super::rowop::RowOp::eval)),
//! found in the plan by its type. A graph with any other node has no chain. The engine proves
//! each chain against the plan on its trial rows at load, bit for bit, and the conformance
//! corpus runs through the chain wherever one exists.

use super::rowop::{Computed, Outputs};
use std::sync::Arc;
use tract_onnx::tract_core;
use tract_onnx::tract_core::ops::source::TypedSource;
use tract_onnx::tract_hir::internal::*;

/// Evaluates the operator of a node of one known [`RowOp`](super::rowop::RowOp) type.
pub(super) type EvalFn = fn(&TypedNode, &[f32], usize, usize) -> TractResult<Computed>;

/// What a step does.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A row operator.
    Row { eval: EvalFn, outputs: Outputs },
    /// A cast of a classifier's labels or of float32 values to a type that holds them
    /// exactly (exports cast the label output), only ever a model output: its numbers are
    /// the values themselves.
    Cast,
}

/// One node of the chain.
#[derive(Debug)]
struct Step {
    node: usize,
    input: OutletId,
    kind: Kind,
}

/// What an outlet of the chain holds, known when the chain is made.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Holds {
    /// Rows of float32 values, this many per row.
    Rows(usize),
    /// A classifier's labels.
    Labels,
    /// Numbers for the caller only.
    Numbers,
}

/// A plan's graph of row operators, run without the plan.
#[derive(Debug)]
pub struct RowChain {
    plan: Arc<TypedRunnableModel>,
    source: usize,
    /// Values per row of the input.
    width: usize,
    steps: Vec<Step>,
    outputs: Vec<OutletId>,
}

/// What a step computed.
enum Value {
    Values {
        values: Vec<f32>,
        width: usize,
    },
    Classes {
        labels: Vec<i64>,
        scores: Vec<f32>,
        k: usize,
    },
    Numbers {
        values: Vec<f64>,
        width: usize,
    },
}

impl Value {
    /// Outlet `slot` of this value as numbers, if it has one: the labels (slot 0) or scores
    /// (slot 1) of a classifier, the values or numbers (slot 0) of anything else.
    fn column(&self, slot: usize) -> Option<Column> {
        let f64s = |v: &[f32]| v.iter().map(|x| *x as f64).collect();
        Some(match (self, slot) {
            (Value::Values { values, width }, 0) => Column {
                width: *width,
                values: f64s(values),
            },
            (Value::Classes { labels, .. }, 0) => Column {
                width: 1,
                values: labels.iter().map(|v| *v as f64).collect(),
            },
            (Value::Classes { scores, k, .. }, 1) => Column {
                width: *k,
                values: f64s(scores),
            },
            (Value::Numbers { values, width }, 0) => Column {
                width: *width,
                values: values.clone(),
            },
            _ => return None,
        })
    }
}

/// One output of a run: values per row, row-major, and how many per row.
#[derive(Debug, PartialEq)]
pub struct Column {
    pub width: usize,
    pub values: Vec<f64>,
}

impl RowChain {
    /// The chain of `plan`, when its graph is one float32 input of rows `[N, width]` and
    /// nothing after it but row operators (each reading rows of float32) and casts of their
    /// outputs to the model's outputs.
    pub fn of(plan: &Arc<TypedRunnableModel>) -> Option<RowChain> {
        let model = plan.model();
        let [source] = model.input_outlets().ok()? else {
            return None;
        };
        let fact = model.outlet_fact(*source).ok()?;
        if fact.datum_type != f32::datum_type() || fact.rank() != 2 {
            return None;
        }
        let width = fact.shape[1].to_usize().ok()?;
        let mut holds: Vec<(OutletId, Holds)> = vec![(*source, Holds::Rows(width))];
        let held = |holds: &[(OutletId, Holds)], o: OutletId| holds.iter().find(|(h, _)| *h == o).map(|(_, h)| *h);
        let mut steps = vec![];
        for &id in plan.order_without_consts() {
            let node = model.node(id);
            if id == source.node {
                node.op_as::<TypedSource>()?;
                continue;
            }
            let [input] = node.inputs.as_slice() else { return None };
            let kind = match (super::row_step(node), held(&holds, *input)?) {
                (Some((eval, outputs)), Holds::Rows(w)) => {
                    let made = match outputs {
                        Outputs::Transform => vec![Holds::Rows(w)],
                        Outputs::Regressor(k) => vec![Holds::Rows(k)],
                        Outputs::Classifier(k) => vec![Holds::Labels, Holds::Rows(k)],
                    };
                    holds.extend(
                        made.into_iter()
                            .enumerate()
                            .map(|(slot, h)| (OutletId::new(id, slot), h)),
                    );
                    Kind::Row { eval, outputs }
                }
                // A cast of the model's input is not a row operator's output: no chain.
                (None, _) if input == source => return None,
                (None, from) => {
                    let to = node.op_as::<tract_core::ops::cast::Cast>()?.to;
                    let exact = match from {
                        Holds::Labels => [DatumType::I64, DatumType::TDim, DatumType::F64].contains(&to),
                        Holds::Rows(_) => [DatumType::F32, DatumType::F64].contains(&to),
                        Holds::Numbers => false,
                    };
                    if !exact {
                        return None;
                    }
                    holds.push((OutletId::new(id, 0), Holds::Numbers));
                    Kind::Cast
                }
                _ => return None,
            };
            steps.push(Step {
                node: id,
                input: *input,
                kind,
            });
        }
        let outputs = model.output_outlets().ok()?.to_vec();
        // Every output comes from a step: a model that hands its input back has no chain.
        if outputs
            .iter()
            .any(|o| o.node == source.node || held(&holds, *o).is_none())
        {
            return None;
        }
        Some(RowChain {
            plan: plan.clone(),
            source: source.node,
            width,
            steps,
            outputs,
        })
    }

    /// Run `rows` rows of the input's width, row-major in `x`: the model's outputs in order.
    pub fn run(&self, x: &[f32], rows: usize) -> TractResult<Vec<Column>> {
        ensure!(
            x.len() == rows * self.width,
            "{} values are not {rows} rows of {}",
            x.len(),
            self.width
        );
        let model = self.plan.model();
        // Each step's result, by node; a chain has a handful of steps.
        let mut done: TVec<(usize, Value)> = tvec![];
        for step in &self.steps {
            let from = done.iter().find(|(n, _)| *n == step.input.node).map(|(_, v)| v);
            let value = match step.kind {
                Kind::Row { eval, outputs } => {
                    let (input, width) = match (from, step.input.slot) {
                        (None, _) if step.input.node == self.source => (x, self.width),
                        (Some(Value::Values { values, width }), 0) => (values.as_slice(), *width),
                        (Some(Value::Classes { scores, k, .. }), 1) => (scores.as_slice(), *k),
                        _ => bail!("node {}: its input {:?} is not rows of float32", step.node, step.input),
                    };
                    match (eval(model.node(step.node), input, rows, width)?, outputs) {
                        (Computed::Values(values), Outputs::Transform) => Value::Values { values, width },
                        (Computed::Values(values), Outputs::Regressor(k)) => Value::Values { values, width: k },
                        (Computed::Classes { labels, scores }, Outputs::Classifier(k)) => {
                            Value::Classes { labels, scores, k }
                        }
                        (_, o) => bail!("node {}: evaluation does not match its outputs {o:?}", step.node),
                    }
                }
                Kind::Cast => match from.and_then(|v| v.column(step.input.slot)) {
                    Some(Column { width, values }) => Value::Numbers { values, width },
                    None => bail!("node {}: its input {:?} cannot be cast here", step.node, step.input),
                },
            };
            done.push((step.node, value));
        }
        self.outputs
            .iter()
            .map(|o| {
                // Numbers made for one output are handed over, not copied.
                let once = self.outputs.iter().filter(|p| *p == o).count() == 1;
                let value = done.iter_mut().find(|(n, _)| *n == o.node).map(|(_, v)| v);
                let column = match (value, o.slot) {
                    (Some(Value::Numbers { values, width }), 0) if once => Column {
                        width: *width,
                        values: std::mem::take(values),
                    },
                    (Some(v), slot) => v
                        .column(slot)
                        .ok_or_else(|| format_err!("output {o:?} was not computed"))?,
                    (None, _) => bail!("output {o:?} was not computed"),
                };
                ensure!(
                    column.values.len() == rows * column.width,
                    "output {o:?}: {} values for {rows} rows of {}",
                    column.values.len(),
                    column.width
                );
                Ok(column)
            })
            .collect()
    }
}
