//! ONNX-ML operators (domain `ai.onnx.ml`) that tract lacks or gets wrong, as real tract
//! operators.
//!
//! Each operator is registered with tract's ONNX loader. The estimators and transforms are
//! [`rowop::RowOp`]s: one typed tract operator each, evaluated over the batch in one pass, so
//! models that use them optimise and batch like any other. The rest (ZipMap, the encoders,
//! ArrayFeatureExtractor) expand into tract core operators. This module is the only place
//! the engine's operator set is extended; [`onnx`] is the loader every part of Lathe uses.

mod chain;
mod cnn;
mod encoders;
mod linear;
mod post;
mod rowop;
mod rowwise;
mod svm;
mod transforms;
mod trees;

pub use chain::{Column as ChainColumn, RowChain};
pub use cnn::direct as direct_cnn;
pub use rowwise::direct as direct_rowwise;
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
    reg.insert("Scaler", transforms::scaler);
    reg.insert("Imputer", transforms::imputer);
    reg.insert("Binarizer", transforms::binarizer);
    // tract has these three, as chains of small operators; ours are fused, and follow
    // onnxruntime where tract differs (binary scores, PROBIT, SOFTMAX_ZERO, Normalizer MAX).
    reg.insert("LinearClassifier", linear::classifier);
    reg.insert("LinearRegressor", linear::regressor);
    reg.insert("Normalizer", transforms::normalizer);
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

/// The row chain's step for `node`, when its operator is one of Lathe's row operators.
fn row_step(node: &TypedNode) -> Option<(chain::EvalFn, rowop::Outputs)> {
    rowop::step::<trees::TreeEnsemble>(node)
        .or_else(|| rowop::step::<linear::LinearClassifier>(node))
        .or_else(|| rowop::step::<linear::LinearRegressor>(node))
        .or_else(|| rowop::step::<transforms::Scaler>(node))
        .or_else(|| rowop::step::<transforms::Imputer>(node))
        .or_else(|| rowop::step::<transforms::Binarizer>(node))
        .or_else(|| rowop::step::<transforms::Normalizer>(node))
        .or_else(|| rowop::step::<svm::Classifier>(node))
        .or_else(|| rowop::step::<svm::Regressor>(node))
}

/// f32 values, compared and hashed by their bits, so that an operator holding them can be.
#[derive(Debug, Clone, Default)]
pub(crate) struct Floats(Vec<f32>);

impl Floats {
    pub(crate) fn new(v: &[f32]) -> Floats {
        Floats(v.to_vec())
    }
    pub(crate) fn get(&self) -> &[f32] {
        &self.0
    }
    fn bits(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().map(|f| f.to_bits())
    }
}

impl PartialEq for Floats {
    fn eq(&self, other: &Self) -> bool {
        self.bits().eq(other.bits())
    }
}

impl Eq for Floats {}

impl std::hash::Hash for Floats {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.len().hash(state);
        self.bits().for_each(|b| b.hash(state));
    }
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
