//! The one shape every Lathe operator takes: a function of rows of float32 features.
//!
//! An operator implements [`RowOp`]: what it outputs ([`Outputs`]) and how it evaluates a
//! row-major block of rows. [`row_op`] turns it into what tract's ONNX loader wants: an
//! expansion whose shape rules follow from [`Outputs`], which at typing time casts the input
//! to float32, gives a 1-D input its batch axis where the outputs are per row, and wires one
//! typed operator, [`Typed`], that evaluates straight from the input tensor's memory.

use tract_onnx::tract_core;
use tract_onnx::tract_core::ndarray::{ArrayD, IxDyn};
use tract_onnx::tract_hir::internal::*;

/// What an operator outputs for rows `[N, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outputs {
    /// float32, the input's shape (scalers, imputers, normalizers).
    Transform,
    /// float32 `[N, k]`.
    Regressor(usize),
    /// int64 labels `[N]` and float32 scores `[N, k]`.
    Classifier(usize),
}

/// What an evaluation computed: row-major values matching [`Outputs`].
pub enum Computed {
    Values(Vec<f32>),
    Classes { labels: Vec<i64>, scores: Vec<f32> },
}

/// An operator evaluated by Lathe over rows of float32 features.
pub trait RowOp: std::fmt::Debug + Clone + PartialEq + Eq + std::hash::Hash + Send + Sync + 'static {
    /// The name tract shows for the typed operator (`Lathe…`).
    fn name(&self) -> &'static str;
    fn outputs(&self) -> Outputs;
    /// Refuse rows this operator cannot read (too few features, wrong width).
    fn check_width(&self, width: usize) -> TractResult<()>;
    /// Evaluate `rows` rows of `width` values, row-major in `x`.
    fn eval(&self, x: &[f32], rows: usize, width: usize) -> TractResult<Computed>;
}

/// The loader's side of a [`RowOp`].
pub fn row_op<T: RowOp>(op: T) -> Box<dyn InferenceOp> {
    expand(Expand(op))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Expand<T>(T);

impl<T: RowOp> Expansion for Expand<T> {
    fn name(&self) -> StaticName {
        self.0.name().into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        let k = match self.0.outputs() {
            Outputs::Transform => {
                check_output_arity(outputs, 1)?;
                s.equals(&outputs[0].datum_type, f32::datum_type())?;
                s.equals(&outputs[0].shape, &inputs[0].shape)?;
                return Ok(());
            }
            Outputs::Regressor(k) => {
                check_output_arity(outputs, 1)?;
                k
            }
            Outputs::Classifier(k) => {
                check_output_arity(outputs, 2)?;
                s.equals(&outputs[0].datum_type, i64::datum_type())?;
                s.equals(&outputs[0].rank, 1)?;
                s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
                k
            }
        };
        let scores = &outputs[outputs.len() - 1];
        s.equals(&scores.datum_type, f32::datum_type())?;
        s.equals(&scores.rank, 2)?;
        s.equals(&scores.shape[0], &inputs[0].shape[0])?;
        s.equals(&scores.shape[1], k.to_dim())?;
        Ok(())
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(if matches!(self.0.outputs(), Outputs::Classifier(_)) {
            2
        } else {
            1
        })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let mut x = super::to_f32(prefix, model, inputs[0])?;
        if self.0.outputs() != Outputs::Transform && model.outlet_fact(x)?.rank() == 1 {
            x = model.wire_node(
                format!("{prefix}.batch"),
                tract_core::ops::change_axes::AxisOp::Add(0),
                &[x],
            )?[0];
        }
        model.wire_node(prefix, Typed(self.0.clone()), &[x])
    }
}

/// The row chain's step for a node whose operator is `Typed<T>`: its evaluation and outputs.
pub(super) fn step<T: RowOp>(node: &TypedNode) -> Option<(super::chain::EvalFn, Outputs)> {
    let op = node.op_as::<Typed<T>>()?;
    Some((eval_node::<T>, op.0.outputs()))
}

/// What [`Typed::eval`] does for a node of `Typed<T>`, on rows given as floats.
fn eval_node<T: RowOp>(node: &TypedNode, x: &[f32], rows: usize, width: usize) -> TractResult<Computed> {
    let op = node
        .op_as::<Typed<T>>()
        .ok_or_else(|| format_err!("node {} is not a {}", node.name, std::any::type_name::<T>()))?;
    op.0.check_width(width)?;
    op.0.eval(x, rows, width)
}

/// The typed operator: evaluates a [`RowOp`] on the input tensor in place.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Typed<T>(pub T);

impl<T: RowOp> Op for Typed<T> {
    fn name(&self) -> StaticName {
        self.0.name().into()
    }

    op_as_typed_op!();
}

fn shaped(shape: &[usize], values: Vec<f32>) -> TractResult<TValue> {
    Ok(ArrayD::from_shape_vec(IxDyn(shape), values)?.into_tvalue())
}

impl<T: RowOp> EvalOp for Typed<T> {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let x = input.cast_to::<f32>()?;
        let shape = x.shape();
        let width = *shape
            .last()
            .ok_or_else(|| format_err!("{}: input is a scalar; expected rows of features", self.0.name()))?;
        self.0.check_width(width)?;
        let rows = x.len().checked_div(width).unwrap_or(0);
        let plain = x.try_as_plain_ram()?;
        let computed = self.0.eval(plain.as_slice::<f32>()?, rows, width)?;
        Ok(match (self.0.outputs(), computed) {
            (Outputs::Transform, Computed::Values(v)) => tvec!(shaped(shape, v)?),
            (Outputs::Regressor(k), Computed::Values(v)) => tvec!(shaped(&[rows, k], v)?),
            (Outputs::Classifier(k), Computed::Classes { labels, scores }) => tvec!(
                ArrayD::from_shape_vec(IxDyn(&[rows]), labels)?.into_tvalue(),
                shaped(&[rows, k], scores)?
            ),
            (o, _) => bail!("{}: evaluation does not match its outputs {o:?}", self.0.name()),
        })
    }
}

impl<T: RowOp> TypedOp for Typed<T> {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let rows = || inputs[0].shape[0].clone();
        Ok(match self.0.outputs() {
            Outputs::Transform => tvec!(f32::fact(inputs[0].shape.clone())),
            Outputs::Regressor(k) => tvec!(f32::fact([rows(), k.to_dim()])),
            Outputs::Classifier(k) => tvec!(i64::fact([rows()]), f32::fact([rows(), k.to_dim()])),
        })
    }

    as_op!();
}
