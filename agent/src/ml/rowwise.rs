//! Direct forms of the small element-wise and per-row operators that follow the matrix products
//! of tabular models.
//!
//! The graphs scikit-learn exports around a matrix product (PCA, SGD, MLPs, isolation forests)
//! end in operators on rows of a few values: arithmetic and comparisons with a constant row or
//! scalar, `Softmax` over a handful of classes, `ArgMax`. On such narrow rows tract's optimiser
//! keeps its generic forms: a binary operator broadcasts through a per-element iterator (about
//! 6 ns a value), `Softmax` calls three kernels per row, and `ArgMax` allocates a slice per row.
//! Measured per node on the corpus (`bench/run.sh --nodes`), they took most of those models'
//! time.
//!
//! [`direct`] swaps them, in an optimised model, for operators that loop over the rows in
//! place:
//! - [`ConstBinary`]: a float32 tensor with a float32 constant that is one row (or a scalar)
//!   repeated along the leading axes: `+ - × ÷ min max` and the six comparisons, with tract's
//!   semantics for each (NaN included).
//! - [`RowSoftmax`]: softmax over the last axis of a float32 tensor, when the rows are too
//!   short for tract's own row kernel (a length that is not a multiple of four).
//! - [`RowArgMax`]: the index of the first (or last) maximum over the last axis of a float32
//!   tensor, as tract's reducer picks it: from the lowest finite value, so NaN is never taken.
//!
//! Anything else keeps tract's operator. The swap runs after tract's optimiser, so the fusions
//! it makes come first.

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::logic::{CompEq, CompGT, CompGTE, CompLT, CompLTE, CompNE};
use tract_onnx::tract_core::ops::math::{Add, Div, Max, Min, Mul, Sub, SubF};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, Softmax, SoftmaxKind};

use super::post::exp_in_place;
use super::Floats;

/// Replace every eligible operator of the optimised `model`; returns how many were replaced.
/// On an error, `model` is left as it was.
pub fn direct(model: &mut TypedModel) -> TractResult<usize> {
    let mut swapped = model.clone();
    let mut replaced = 0;
    for id in swapped.eval_order()? {
        let node = swapped.node(id);
        let (op, inputs): (Box<dyn TypedOp>, TVec<OutletId>) = if let Some(bin) = node.op_as::<TypedBinOp>() {
            match ConstBinary::for_node(&swapped, node, bin)? {
                Some((op, input)) => (Box::new(op), tvec!(input)),
                None => continue,
            }
        } else if let Some(softmax) = node.op_as::<Softmax>() {
            match RowSoftmax::for_node(&swapped, node, softmax)? {
                Some(op) => (Box::new(op), tvec!(node.inputs[0])),
                None => continue,
            }
        } else if let Some(reduce) = node.op_as::<Reduce>() {
            match RowArgMax::for_node(&swapped, node, reduce)? {
                Some(op) => (Box::new(op), tvec!(node.inputs[0])),
                None => continue,
            }
        } else {
            continue;
        };
        let patch = TypedModelPatch::replace_single_op(&swapped, node, &inputs, op)?;
        patch.apply(&mut swapped)?;
        replaced += 1;
    }
    if replaced > 0 {
        swapped.compact()?;
        *model = swapped;
    }
    Ok(replaced)
}

/// The last axis of a float32 input of known length, when it is the only axis of `axes`.
fn last_axis(model: &TypedModel, node: &TypedNode, axes: &[usize]) -> TractResult<Option<usize>> {
    let fact = model.outlet_fact(node.inputs[0])?;
    if fact.datum_type != f32::datum_type() || fact.rank() == 0 || axes != [fact.rank() - 1] {
        return Ok(None);
    }
    Ok(fact.shape[fact.rank() - 1].to_usize().ok().filter(|n| *n > 0))
}

/// The operation of a [`ConstBinary`], `f(x, c)` with `x` from the tensor and `c` from the
/// constant (their order in the graph is in [`ConstBinary::konst_first`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinKind {
    Add,
    Sub,
    SubF,
    Mul,
    Div,
    Min,
    Max,
    Eq,
    Ne,
    Lt,
    Gt,
    Lte,
    Gte,
}

impl BinKind {
    fn of(op: &TypedBinOp) -> Option<BinKind> {
        let m = &op.0;
        let kinds: [(bool, BinKind); 13] = [
            (m.is::<Add>(), BinKind::Add),
            (m.is::<Sub>(), BinKind::Sub),
            (m.is::<SubF>(), BinKind::SubF),
            (m.is::<Mul>(), BinKind::Mul),
            (m.is::<Div>(), BinKind::Div),
            (m.is::<Min>(), BinKind::Min),
            (m.is::<Max>(), BinKind::Max),
            (m.is::<CompEq>(), BinKind::Eq),
            (m.is::<CompNE>(), BinKind::Ne),
            (m.is::<CompLT>(), BinKind::Lt),
            (m.is::<CompGT>(), BinKind::Gt),
            (m.is::<CompLTE>(), BinKind::Lte),
            (m.is::<CompGTE>(), BinKind::Gte),
        ];
        kinds.into_iter().find(|(is, _)| *is).map(|(_, k)| k)
    }

    fn compares(self) -> bool {
        matches!(
            self,
            BinKind::Eq | BinKind::Ne | BinKind::Lt | BinKind::Gt | BinKind::Lte | BinKind::Gte
        )
    }
}

/// A binary operator between a float32 tensor and a float32 constant that is one row of its
/// trailing axes (or a single value), repeated over the leading axes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConstBinary {
    kind: BinKind,
    /// The constant's values: one row of the tensor's trailing axes.
    konst: Floats,
    /// Whether the constant is the operator's first operand.
    konst_first: bool,
}

impl ConstBinary {
    /// The direct form of `bin` and the tensor it takes, or `None` when it does not qualify.
    fn for_node(
        model: &TypedModel,
        node: &TypedNode,
        bin: &TypedBinOp,
    ) -> TractResult<Option<(ConstBinary, OutletId)>> {
        let Some(kind) = BinKind::of(bin) else { return Ok(None) };
        if node.inputs.len() != 2 {
            return Ok(None);
        }
        let facts = model.node_input_facts(node.id)?;
        let konst_first = match (facts[0].konst.is_some(), facts[1].konst.is_some()) {
            (true, false) => true,
            (false, true) => false,
            _ => return Ok(None),
        };
        let (x, c) = if konst_first {
            (facts[1], facts[0])
        } else {
            (facts[0], facts[1])
        };
        let Some(konst) = c.konst.as_ref() else { return Ok(None) };
        let out = if kind.compares() {
            bool::datum_type()
        } else {
            f32::datum_type()
        };
        if x.datum_type != f32::datum_type()
            || konst.datum_type() != f32::datum_type()
            || bin.1.is_some_and(|dt| dt != out)
            || x.rank() != konst.rank()
            || x.rank() == 0
            || konst.len() == 0
        {
            return Ok(None);
        }
        // The constant's axes: ones, then the tensor's own trailing axes.
        let lead = konst.shape().iter().take_while(|d| **d == 1).count();
        let row = (lead..x.rank()).all(|a| x.shape[a].to_usize().ok() == Some(konst.shape()[a]));
        if !row {
            return Ok(None);
        }
        let values = Floats::new(konst.try_as_plain_ram()?.as_slice::<f32>()?);
        let input = node.inputs[usize::from(konst_first)];
        Ok(Some((
            ConstBinary {
                kind,
                konst: values,
                konst_first,
            },
            input,
        )))
    }

    /// `x` with every value replaced by `f(value, constant)`, in place.
    fn arith(&self, mut x: Tensor, f: impl Fn(f32, f32) -> f32) -> TractResult<Tensor> {
        let k = self.konst.get();
        let mut plain = x.try_as_plain_ram_mut()?;
        let values = plain.as_slice_mut::<f32>()?;
        ensure!(
            values.len().is_multiple_of(k.len()),
            "ConstBinary: unexpected tensor size"
        );
        if self.konst_first {
            for row in values.chunks_exact_mut(k.len()) {
                for (v, c) in row.iter_mut().zip(k) {
                    *v = f(*c, *v);
                }
            }
        } else {
            for row in values.chunks_exact_mut(k.len()) {
                for (v, c) in row.iter_mut().zip(k) {
                    *v = f(*v, *c);
                }
            }
        }
        Ok(x)
    }

    /// `compare(value, constant)` for every value of `x`.
    fn compare(&self, x: &Tensor, f: impl Fn(f32, f32) -> bool) -> TractResult<Tensor> {
        let k = self.konst.get();
        let plain = x.try_as_plain_ram()?;
        let values = plain.as_slice::<f32>()?;
        ensure!(
            values.len().is_multiple_of(k.len()),
            "ConstBinary: unexpected tensor size"
        );
        let mut out = Vec::with_capacity(values.len());
        for row in values.chunks_exact(k.len()) {
            if self.konst_first {
                out.extend(row.iter().zip(k).map(|(v, c)| f(*c, *v)));
            } else {
                out.extend(row.iter().zip(k).map(|(v, c)| f(*v, *c)));
            }
        }
        Tensor::from_shape(x.shape(), &out)
    }
}

impl Op for ConstBinary {
    fn name(&self) -> StaticName {
        "ConstBinary".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} with a constant of {} values{}",
            self.kind,
            self.konst.get().len(),
            if self.konst_first { ", the constant first" } else { "" }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for ConstBinary {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let out = match self.kind {
            BinKind::Add => self.arith(x.into_tensor(), |a, b| a + b)?,
            BinKind::Sub => self.arith(x.into_tensor(), |a, b| a - b)?,
            BinKind::SubF => self.arith(x.into_tensor(), |a, b| b - a)?,
            BinKind::Mul => self.arith(x.into_tensor(), |a, b| a * b)?,
            BinKind::Div => self.arith(x.into_tensor(), |a, b| a / b)?,
            BinKind::Min => self.arith(x.into_tensor(), f32::min)?,
            BinKind::Max => self.arith(x.into_tensor(), f32::max)?,
            BinKind::Eq => self.compare(&x, |a, b| a == b)?,
            BinKind::Ne => self.compare(&x, |a, b| a != b)?,
            BinKind::Lt => self.compare(&x, |a, b| a < b)?,
            BinKind::Gt => self.compare(&x, |a, b| a > b)?,
            BinKind::Lte => self.compare(&x, |a, b| a <= b)?,
            BinKind::Gte => self.compare(&x, |a, b| a >= b)?,
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for ConstBinary {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let dt = if self.kind.compares() {
            bool::datum_type()
        } else {
            f32::datum_type()
        };
        Ok(tvec!(dt.fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Softmax over the last axis of a float32 tensor, row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSoftmax {
    width: usize,
}

impl RowSoftmax {
    fn for_node(model: &TypedModel, node: &TypedNode, softmax: &Softmax) -> TractResult<Option<RowSoftmax>> {
        if softmax.kind != SoftmaxKind::Softmax || softmax.quant_output_dt.is_some() {
            return Ok(None);
        }
        // tract's row kernel takes rows of a multiple of four values, and is faster on long ones.
        Ok(last_axis(model, node, &softmax.axes)?
            .filter(|w| !w.is_multiple_of(4))
            .map(|width| RowSoftmax { width }))
    }
}

impl Op for RowSoftmax {
    fn name(&self) -> StaticName {
        "RowSoftmax".into()
    }

    op_as_typed_op!();
}

impl EvalOp for RowSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut x = args_1!(inputs).into_tensor();
        let mut plain = x.try_as_plain_ram_mut()?;
        let values = plain.as_slice_mut::<f32>()?;
        ensure!(
            values.len().is_multiple_of(self.width),
            "RowSoftmax: unexpected tensor size"
        );
        // Three passes over the whole tensor, so that the exponentials are taken in one loop
        // the compiler vectorises, however short the rows.
        for row in values.chunks_exact_mut(self.width) {
            // The maximum as tract's kernel finds it: NaN is not taken, and makes the row NaN.
            let max = row.iter().fold(f32::NEG_INFINITY, |m, v| if *v > m { *v } else { m });
            for v in row.iter_mut() {
                *v -= max;
            }
        }
        exp_in_place(values);
        for row in values.chunks_exact_mut(self.width) {
            let scale = row.iter().sum::<f32>().recip();
            for v in row.iter_mut() {
                *v *= scale;
            }
        }
        Ok(tvec!(x.into_tvalue()))
    }
}

impl TypedOp for RowSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// The index of the maximum over the last axis of a float32 tensor, kept as an axis of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowArgMax {
    width: usize,
    /// Ties go to the last maximum (`select_last_index`), else to the first.
    last: bool,
}

impl RowArgMax {
    fn for_node(model: &TypedModel, node: &TypedNode, reduce: &Reduce) -> TractResult<Option<RowArgMax>> {
        let Reducer::ArgMax(last) = reduce.reducer else {
            return Ok(None);
        };
        Ok(last_axis(model, node, &reduce.axes)?.map(|width| RowArgMax { width, last }))
    }
}

impl Op for RowArgMax {
    fn name(&self) -> StaticName {
        "RowArgMax".into()
    }

    op_as_typed_op!();
}

impl EvalOp for RowArgMax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let plain = x.try_as_plain_ram()?;
        let values = plain.as_slice::<f32>()?;
        ensure!(
            values.len().is_multiple_of(self.width),
            "RowArgMax: unexpected tensor size"
        );
        // As tract's reducer: from (0, the lowest finite value), a value is taken when greater
        // (or equal, for the last index); NaN never is.
        let pick = |row: &[f32]| {
            let mut best = (0usize, f32::MIN);
            for (i, v) in row.iter().enumerate() {
                if *v > best.1 || (self.last && *v == best.1) {
                    best = (i, *v);
                }
            }
            best.0 as i64
        };
        let out: Vec<i64> = values.chunks_exact(self.width).map(pick).collect();
        let mut shape: TVec<usize> = x.shape().into();
        if let Some(d) = shape.last_mut() {
            *d = 1;
        }
        Ok(tvec!(Tensor::from_shape(&shape, &out)?.into_tvalue()))
    }
}

impl TypedOp for RowArgMax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        if let Some(d) = shape.last_mut() {
            *d = 1.into();
        }
        Ok(tvec!(i64::fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::binary::BinMiniOp;
    use tract_onnx::tract_core::ops::{logic, math};

    /// Values with what trips arithmetic up: NaN, both infinities, both zeros, ties, the
    /// lowest finite value, and ordinary numbers of both signs.
    fn awkward(n: usize) -> Vec<f32> {
        let special = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1.5,
            1.5,
            f32::MIN,
            -3.25,
            7.0,
        ];
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if i % 3 == 0 {
                    special[(s >> 33) as usize % special.len()]
                } else {
                    ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
                }
            })
            .collect()
    }

    /// A model of one operator `wire` puts after a source of `shape` (a symbolic batch first).
    fn model(
        shape: &[usize],
        wire: impl FnOnce(&mut TypedModel, OutletId) -> TractResult<TVec<OutletId>>,
    ) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let n = model.symbols.sym("N");
        let mut dims: TVec<TDim> = tvec![n.into()];
        dims.extend(shape.iter().map(|d| d.to_dim()));
        let x = model.add_source("x", f32::fact(dims))?;
        let y = wire(&mut model, x)?;
        model.select_output_outlets(&y)?;
        Ok(model)
    }

    fn run(model: &TypedModel, input: &Tensor) -> TractResult<Tensor> {
        let plan = model.clone().into_runnable()?;
        Ok(plan.run(tvec!(input.clone().into_tvalue()))?.remove(0).into_tensor())
    }

    /// `model` and its direct form give the same tensor on `rows` rows of awkward values,
    /// compared with `same`; returns how many operators were replaced.
    fn compare(model: TypedModel, shape: &[usize], rows: usize, same: impl Fn(&Tensor, &Tensor)) -> TractResult<usize> {
        let mut direct_model = model.clone();
        let replaced = direct(&mut direct_model)?;
        let mut full = vec![rows];
        full.extend(shape);
        let input = Tensor::from_shape(&full, &awkward(full.iter().product()))?;
        same(&run(&model, &input)?, &run(&direct_model, &input)?);
        Ok(replaced)
    }

    fn floats(t: &Tensor) -> Vec<f32> {
        t.try_as_plain_ram()
            .expect("plain memory")
            .as_slice::<f32>()
            .expect("float32")
            .to_vec()
    }

    fn bitwise(a: &Tensor, b: &Tensor) {
        assert_eq!(a.shape(), b.shape());
        assert_eq!(a.datum_type(), b.datum_type());
        if a.datum_type() == f32::datum_type() {
            let bits = |t: &Tensor| floats(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(a), bits(b));
        } else {
            assert_eq!(a, b);
        }
    }

    /// Every arithmetic and comparison operator, the constant on either side, as a row of the
    /// trailing axes or a single value, on rank 1 to 3: tract's results bit for bit, NaN
    /// and signed zeros included.
    #[test]
    fn constant_operands_give_tracts_results() -> TractResult<()> {
        type MakeOp = fn() -> Box<dyn BinMiniOp>;
        let ops: Vec<(&str, MakeOp)> = vec![
            ("add", || Box::new(math::Add)),
            ("sub", || Box::new(math::Sub)),
            ("subf", || Box::new(math::SubF)),
            ("mul", || Box::new(math::Mul)),
            ("div", || Box::new(math::Div)),
            ("min", || Box::new(math::Min)),
            ("max", || Box::new(math::Max)),
            ("eq", || Box::new(logic::CompEq)),
            ("ne", || Box::new(logic::CompNE)),
            ("lt", || Box::new(logic::CompLT)),
            ("gt", || Box::new(logic::CompGT)),
            ("lte", || Box::new(logic::CompLTE)),
            ("gte", || Box::new(logic::CompGTE)),
        ];
        // (the tensor's shape after the batch, the constant's shape)
        let shapes: [(&[usize], &[usize]); 5] = [
            (&[6], &[1, 6]),
            (&[3], &[1, 1]),
            (&[], &[1]),
            (&[2, 5], &[1, 2, 5]),
            (&[2, 5], &[1, 1, 5]),
        ];
        for (name, op) in &ops {
            for (shape, kshape) in shapes {
                for konst_first in [false, true] {
                    let k: usize = kshape.iter().product();
                    let konst = Tensor::from_shape(kshape, &awkward(k + 7)[7..])?;
                    let m = model(shape, |m, x| {
                        let c = m.add_const("c", konst)?;
                        let inputs = if konst_first { [c, x] } else { [x, c] };
                        m.wire_node("op", TypedBinOp(op(), None), &inputs)
                    })?;
                    let replaced = compare(m, shape, 37, bitwise)?;
                    assert_eq!(replaced, 1, "{name} {shape:?} {kshape:?} constant first: {konst_first}");
                }
            }
        }
        Ok(())
    }

    /// A constant that broadcasts the other way (wider than the tensor), two tensors, or an
    /// integer tensor keep tract's operator.
    #[test]
    fn other_binary_operators_are_kept() -> TractResult<()> {
        let wider = model(&[1], |m, x| {
            let c = m.add_const("c", Tensor::from_shape(&[1, 4], &[1f32, 2.0, 3.0, 4.0])?)?;
            m.wire_node("op", math::add(), &[x, c])
        })?;
        let two = model(&[3], |m, x| m.wire_node("op", math::mul(), &[x, x]))?;
        let ints = model(&[3], |m, x| {
            let x = m.wire_node("cast", tract_onnx::tract_core::ops::cast::cast(i64::datum_type()), &[x])?[0];
            let c = m.add_const("c", Tensor::from_shape(&[1, 3], &[1i64, 2, 3])?)?;
            m.wire_node("op", math::add(), &[x, c])
        })?;
        for mut m in [wider, two, ints] {
            assert_eq!(direct(&mut m)?, 0);
        }
        Ok(())
    }

    /// Softmax over short rows: tract's results within 1e-6 (both approximate the exponential),
    /// NaN where tract has NaN; rows of a multiple of four keep tract's row kernel.
    #[test]
    fn softmax_gives_tracts_results() -> TractResult<()> {
        for width in [1, 2, 3, 5, 7, 10] {
            let m = model(&[width], |m, x| {
                m.wire_node(
                    "softmax",
                    Softmax {
                        axes: tvec![1],
                        quant_output_dt: None,
                        kind: SoftmaxKind::Softmax,
                    },
                    &[x],
                )
            })?;
            let replaced = compare(m, &[width], 41, |a, b| {
                assert_eq!(a.shape(), b.shape());
                for (x, y) in floats(a).iter().zip(&floats(b)) {
                    assert_eq!(x.is_nan(), y.is_nan(), "width {width}: {x} against {y}");
                    assert!(x.is_nan() || (x - y).abs() <= 1e-6, "width {width}: {x} against {y}");
                }
            })?;
            assert_eq!(replaced, 1, "width {width}");
        }
        let mut four = model(&[4], |m, x| {
            m.wire_node("softmax", Softmax::new(tvec![1], None, SoftmaxKind::Softmax), &[x])
        })?;
        assert_eq!(direct(&mut four)?, 0);
        Ok(())
    }

    /// ArgMax over the last axis, first or last of tied maxima: tract's indices exactly,
    /// with NaN, infinities, ties and rows of the lowest finite value.
    #[test]
    fn argmax_gives_tracts_indices() -> TractResult<()> {
        for width in [1, 2, 3, 8] {
            for last in [false, true] {
                let m = model(&[width], |m, x| {
                    m.wire_node(
                        "argmax",
                        Reduce {
                            axes: tvec![1],
                            reducer: Reducer::ArgMax(last),
                        },
                        &[x],
                    )
                })?;
                assert_eq!(compare(m, &[width], 53, bitwise)?, 1);
            }
        }
        // Over another axis than the last: kept.
        let mut m = model(&[3, 2], |m, x| {
            m.wire_node(
                "argmax",
                Reduce {
                    axes: tvec![1],
                    reducer: Reducer::ArgMax(false),
                },
                &[x],
            )
        })?;
        assert_eq!(direct(&mut m)?, 0);
        Ok(())
    }
}
