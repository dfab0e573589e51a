//! ONNX-ML operators (domain `ai.onnx.ml`) that tract lacks, as real tract operators.
//!
//! Each operator is registered with tract's ONNX loader and expands into tract core
//! operators when the model is typed, so models that use them optimise and batch like any
//! other. This module is the only place the engine's operator set is extended; [`onnx`] is the
//! loader every part of Lathe uses.

mod encoders;
mod post;
mod svm;
mod trees;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core;
use tract_onnx::tract_hir::internal::*;

/// tract's ONNX loader with Lathe's operators added.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    register(&mut onnx.op_register);
    onnx
}

pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert("ZipMap", zipmap);
    reg.insert("Scaler", scaler);
    reg.insert("Imputer", imputer);
    reg.insert("Binarizer", binarizer);
    // tract's own TreeEnsembleClassifier gives wrong labels for binary models; ours replaces it.
    reg.insert("TreeEnsembleClassifier", trees::classifier);
    reg.insert("TreeEnsembleRegressor", trees::regressor);
    reg.insert("LabelEncoder", encoders::label_encoder);
    reg.insert("OneHotEncoder", encoders::one_hot_encoder);
    reg.insert("SVMClassifier", svm::classifier);
    reg.insert("SVMRegressor", svm::regressor);
    // tract drops the last axis for a scalar index; onnxruntime keeps it ([N, 1]).
    reg.insert("ArrayFeatureExtractor", array_feature_extractor);
}

/// A per-feature (or single) float parameter as a `[1, n]` tensor, ready to broadcast.
fn row_param(values: &[f32]) -> TractResult<Arc<Tensor>> {
    Ok(tensor1(values).into_shape(&[1, values.len()])?.into_arc_tensor())
}

fn to_f32(prefix: &str, model: &mut TypedModel, x: OutletId) -> TractResult<OutletId> {
    if model.outlet_fact(x)?.datum_type == f32::datum_type() {
        return Ok(x);
    }
    Ok(model.wire_node(
        format!("{prefix}.to_f32"),
        tract_core::ops::cast::cast(f32::datum_type()),
        &[x],
    )?[0])
}

fn same_shape_f32<'r, 'p: 'r, 's: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    check_input_arity(inputs, 1)?;
    check_output_arity(outputs, 1)?;
    s.equals(&outputs[0].datum_type, f32::datum_type())?;
    s.equals(&outputs[0].shape, &inputs[0].shape)?;
    Ok(())
}

/// Output rules shared by the estimators: a regressor gives `[N, k]` float32; a classifier
/// gives labels `[N]` int64 and scores `[N, k]` float32.
fn estimator_rules<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
    classifier: bool,
    k: usize,
) -> InferenceResult {
    check_input_arity(inputs, 1)?;
    check_output_arity(outputs, if classifier { 2 } else { 1 })?;
    let scores = &outputs[outputs.len() - 1];
    if classifier {
        s.equals(&outputs[0].datum_type, i64::datum_type())?;
        s.equals(&outputs[0].rank, 1)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
    }
    s.equals(&scores.datum_type, f32::datum_type())?;
    s.equals(&scores.rank, 2)?;
    s.equals(&scores.shape[0], &inputs[0].shape[0])?;
    s.equals(&scores.shape[1], k.to_dim())?;
    Ok(())
}

/// ZipMap turns a probability tensor into a sequence of maps keyed by class. Lathe reports
/// every output as numbers per row, in class order, so the tensor itself is the answer.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct ZipMap;

fn zipmap(_: &ParsingContext, _: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(ZipMap), vec![]))
}

impl Expansion for ZipMap {
    fn name(&self) -> StaticName {
        "ZipMap".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, tract_core::ops::identity::Identity, &[inputs[0]])
    }
}

/// `Scaler`: y = (x - offset) * scale, per feature or for all.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Scaler {
    offset: Arc<Tensor>,
    scale: Arc<Tensor>,
}

fn scaler(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let offset: Vec<f32> = node.get_attr_opt_vec("offset")?.unwrap_or_else(|| vec![0.0]);
    let scale: Vec<f32> = node.get_attr_opt_vec("scale")?.unwrap_or_else(|| vec![1.0]);
    node.expect(
        !offset.is_empty() && !scale.is_empty(),
        "offset and scale are not empty",
    )?;
    Ok((
        expand(Scaler {
            offset: row_param(&offset)?,
            scale: row_param(&scale)?,
        }),
        vec![],
    ))
}

impl Expansion for Scaler {
    fn name(&self) -> StaticName {
        "Scaler".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_shape_f32(s, inputs, outputs)
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let x = to_f32(prefix, model, inputs[0])?;
        let offset = model.add_const(format!("{prefix}.offset"), self.offset.clone())?;
        let scale = model.add_const(format!("{prefix}.scale"), self.scale.clone())?;
        let centred = model.wire_node(format!("{prefix}.sub"), tract_core::ops::math::sub(), &[x, offset])?;
        model.wire_node(
            format!("{prefix}.mul"),
            tract_core::ops::math::mul(),
            &[centred[0], scale],
        )
    }
}

/// `Imputer`: replaces `replaced_value_float` (NaN by default in scikit-learn exports) with
/// the imputed value of its feature.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Imputer {
    imputed: Arc<Tensor>,
    /// `None` when the replaced value is NaN.
    replaced: Option<Arc<Tensor>>,
}

fn imputer(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let imputed: Vec<f32> = node
        .get_attr_opt_vec("imputed_value_floats")?
        .ok_or_else(|| format_err!("Imputer {:?}: only imputed_value_floats is supported", node.name))?;
    node.expect(!imputed.is_empty(), "imputed_value_floats is not empty")?;
    let replaced: f32 = node.get_attr_opt("replaced_value_float")?.unwrap_or(0.0);
    let replaced = if replaced.is_nan() {
        None
    } else {
        Some(row_param(&[replaced])?)
    };
    Ok((
        expand(Imputer {
            imputed: row_param(&imputed)?,
            replaced,
        }),
        vec![],
    ))
}

impl Expansion for Imputer {
    fn name(&self) -> StaticName {
        "Imputer".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_shape_f32(s, inputs, outputs)
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let x = to_f32(prefix, model, inputs[0])?;
        let mask = match &self.replaced {
            None => model.wire_node(format!("{prefix}.is_nan"), tract_core::ops::math::is_nan(), &[x])?[0],
            Some(r) => {
                let r = model.add_const(format!("{prefix}.replaced"), r.clone())?;
                let eq = tract_core::ops::binary::TypedBinOp(tract_core::ops::logic::comp_eq(), None);
                model.wire_node(format!("{prefix}.is_replaced"), eq, &[x, r])?[0]
            }
        };
        // Iff needs its branches at full shape: imputed + 0 * x broadcasts the imputed row.
        let imputed = model.add_const(format!("{prefix}.imputed"), self.imputed.clone())?;
        let shape = model.outlet_fact(x)?.shape.to_tvec();
        let full = model.wire_node(
            format!("{prefix}.imputed_full"),
            tract_core::ops::array::MultiBroadcastTo::new(shape.into()),
            &[imputed],
        )?[0];
        model.wire_node(format!("{prefix}.iff"), tract_core::ops::logic::Iff, &[mask, full, x])
    }
}

/// `Binarizer`: 1 where x > threshold, else 0.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Binarizer {
    threshold: Arc<Tensor>,
}

fn binarizer(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let threshold: f32 = node.get_attr_opt("threshold")?.unwrap_or(0.0);
    Ok((
        expand(Binarizer {
            threshold: row_param(&[threshold])?,
        }),
        vec![],
    ))
}

impl Expansion for Binarizer {
    fn name(&self) -> StaticName {
        "Binarizer".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_shape_f32(s, inputs, outputs)
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let x = to_f32(prefix, model, inputs[0])?;
        let t = model.add_const(format!("{prefix}.threshold"), self.threshold.clone())?;
        let gt = tract_core::ops::binary::TypedBinOp(tract_core::ops::logic::comp_gt(), None);
        let above = model.wire_node(format!("{prefix}.gt"), gt, &[x, t])?;
        model.wire_node(
            format!("{prefix}.to_f32"),
            tract_core::ops::cast::cast(f32::datum_type()),
            &above,
        )
    }
}

/// `ArrayFeatureExtractor`: picks entries of the last axis, as onnxruntime does: the indices
/// are taken flat; the output keeps every axis of the input, the last one sized by the number
/// of indices; a 1-D input gives `[1, n]`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct ArrayFeatureExtractor;

fn array_feature_extractor(_: &ParsingContext, _: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(ArrayFeatureExtractor), vec![]))
}

impl Expansion for ArrayFeatureExtractor {
    fn name(&self) -> StaticName {
        "ArrayFeatureExtractor".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.given(&inputs[0].rank, move |s, rank| {
            s.equals(&outputs[0].rank, rank.max(2))?;
            for axis in 0..(rank as usize).saturating_sub(1) {
                s.equals(&outputs[0].shape[axis], &inputs[0].shape[axis])?;
            }
            Ok(())
        })?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let rank = model.outlet_fact(inputs[0])?.rank();
        ensure!(rank >= 1, "ArrayFeatureExtractor needs an input of rank 1 or more");
        let mut idx = inputs[1];
        let idx_fact = model.outlet_fact(idx)?.clone();
        match idx_fact.rank() {
            0 => idx = model.wire_node(format!("{prefix}.index_as_list"), AxisOp::Add(0), &[idx])?[0],
            1 => {}
            _ => {
                let from: TVec<TDim> = idx_fact.shape.to_tvec();
                let n: TDim = from.iter().product();
                idx = model.wire_node(
                    format!("{prefix}.flat_index"),
                    AxisOp::Reshape(0, from, tvec!(n)),
                    &[idx],
                )?[0];
            }
        }
        if idx_fact.datum_type != i64::datum_type() {
            idx = model.wire_node(
                format!("{prefix}.index_i64"),
                tract_core::ops::cast::cast(i64::datum_type()),
                &[idx],
            )?[0];
        }
        let picked = model.wire_node(
            format!("{prefix}.gather"),
            tract_core::ops::array::Gather::new(rank - 1),
            &[inputs[0], idx],
        )?;
        if rank == 1 {
            model.wire_node(prefix, AxisOp::Add(0), &picked)
        } else {
            Ok(picked)
        }
    }
}
