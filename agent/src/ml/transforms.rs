//! Element-wise and per-row transforms: `Scaler`, `Imputer`, `Binarizer` and `Normalizer`,
//! each one pass over the input, as onnxruntime computes them.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::rowop::{row_op, Computed, Outputs, RowOp};

/// Per-feature parameters (or one for every feature), as f32 bits so the operator hashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PerFeature(Vec<u32>);

impl PerFeature {
    fn new(what: &str, node: &NodeProto, v: &[f32]) -> TractResult<PerFeature> {
        ensure!(!v.is_empty(), "node {:?}: {what} is empty", node.name);
        Ok(PerFeature(v.iter().map(|f| f.to_bits()).collect()))
    }

    fn check_width(&self, op: &str, width: usize) -> TractResult<()> {
        ensure!(
            self.0.len() == 1 || self.0.len() == width,
            "{op}: {} parameters for rows of {width} features",
            self.0.len()
        );
        Ok(())
    }

    /// The parameter of every column, `width` long.
    fn expand(&self, width: usize) -> Vec<f32> {
        (0..width)
            .map(|j| f32::from_bits(self.0[if self.0.len() == 1 { 0 } else { j }]))
            .collect()
    }
}

/// Apply `f(value, column)` to every value of every row.
fn per_column(x: &[f32], width: usize, f: impl Fn(f32, usize) -> f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(width.max(1)) {
        out.extend(row.iter().enumerate().map(|(j, v)| f(*v, j)));
    }
    out
}

/// `Scaler`: y = (x - offset) * scale.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scaler {
    offset: PerFeature,
    scale: PerFeature,
}

impl RowOp for Scaler {
    fn name(&self) -> &'static str {
        "LatheScaler"
    }

    fn outputs(&self) -> Outputs {
        Outputs::Transform
    }

    fn check_width(&self, width: usize) -> TractResult<()> {
        self.offset.check_width("Scaler offset", width)?;
        self.scale.check_width("Scaler scale", width)
    }

    fn eval(&self, x: &[f32], _rows: usize, width: usize) -> TractResult<Computed> {
        let (offset, scale) = (self.offset.expand(width), self.scale.expand(width));
        Ok(Computed::Values(per_column(x, width, |v, j| {
            (v - offset[j]) * scale[j]
        })))
    }
}

pub fn scaler(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let offset: Vec<f32> = node.get_attr_opt_vec("offset")?.unwrap_or_else(|| vec![0.0]);
    let scale: Vec<f32> = node.get_attr_opt_vec("scale")?.unwrap_or_else(|| vec![1.0]);
    Ok((
        row_op(Scaler {
            offset: PerFeature::new("offset", node, &offset)?,
            scale: PerFeature::new("scale", node, &scale)?,
        }),
        vec![],
    ))
}

/// `Imputer`: replaces `replaced_value_float` (NaN in scikit-learn exports) with the imputed
/// value of its feature.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Imputer {
    imputed: PerFeature,
    /// f32 bits of the replaced value; NaN matches any NaN.
    replaced: u32,
}

impl RowOp for Imputer {
    fn name(&self) -> &'static str {
        "LatheImputer"
    }

    fn outputs(&self) -> Outputs {
        Outputs::Transform
    }

    fn check_width(&self, width: usize) -> TractResult<()> {
        self.imputed.check_width("Imputer imputed_value_floats", width)
    }

    fn eval(&self, x: &[f32], _rows: usize, width: usize) -> TractResult<Computed> {
        let imputed = self.imputed.expand(width);
        let replaced = f32::from_bits(self.replaced);
        let hit = |v: f32| if replaced.is_nan() { v.is_nan() } else { v == replaced };
        Ok(Computed::Values(per_column(x, width, |v, j| {
            if hit(v) {
                imputed[j]
            } else {
                v
            }
        })))
    }
}

pub fn imputer(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let imputed: Vec<f32> = node
        .get_attr_opt_vec("imputed_value_floats")?
        .ok_or_else(|| format_err!("Imputer {:?}: only imputed_value_floats is supported", node.name))?;
    let replaced: f32 = node.get_attr_opt("replaced_value_float")?.unwrap_or(0.0);
    Ok((
        row_op(Imputer {
            imputed: PerFeature::new("imputed_value_floats", node, &imputed)?,
            replaced: replaced.to_bits(),
        }),
        vec![],
    ))
}

/// `Binarizer`: 1 where x > threshold, else 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Binarizer {
    threshold: u32,
}

impl RowOp for Binarizer {
    fn name(&self) -> &'static str {
        "LatheBinarizer"
    }

    fn outputs(&self) -> Outputs {
        Outputs::Transform
    }

    fn check_width(&self, _width: usize) -> TractResult<()> {
        Ok(())
    }

    fn eval(&self, x: &[f32], _rows: usize, _width: usize) -> TractResult<Computed> {
        let t = f32::from_bits(self.threshold);
        Ok(Computed::Values(
            x.iter().map(|v| if *v > t { 1.0 } else { 0.0 }).collect(),
        ))
    }
}

pub fn binarizer(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let threshold: f32 = node.get_attr_opt("threshold")?.unwrap_or(0.0);
    Ok((
        row_op(Binarizer {
            threshold: threshold.to_bits(),
        }),
        vec![],
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Norm {
    Max,
    L1,
    L2,
}

/// `Normalizer`: each row divided by its maximum (not its largest absolute value, as in
/// onnxruntime), its L1 norm or its L2 norm; a row whose divisor is 0 is left as it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Normalizer {
    norm: Norm,
}

impl RowOp for Normalizer {
    fn name(&self) -> &'static str {
        "LatheNormalizer"
    }

    fn outputs(&self) -> Outputs {
        Outputs::Transform
    }

    fn check_width(&self, _width: usize) -> TractResult<()> {
        Ok(())
    }

    fn eval(&self, x: &[f32], _rows: usize, width: usize) -> TractResult<Computed> {
        let mut out = x.to_vec();
        for row in out.chunks_exact_mut(width.max(1)) {
            let d = match self.norm {
                Norm::Max => row.iter().copied().fold(f32::MIN, f32::max),
                Norm::L1 => row.iter().map(|v| v.abs()).sum(),
                Norm::L2 => row.iter().map(|v| v * v).sum(),
            };
            if d == 0.0 {
                continue;
            }
            match self.norm {
                Norm::Max | Norm::L1 => row.iter_mut().for_each(|v| *v /= d),
                Norm::L2 => row.iter_mut().for_each(|v| {
                    let r = (*v * *v / d).sqrt();
                    *v = if *v < 0.0 { -r } else { r };
                }),
            }
        }
        Ok(Computed::Values(out))
    }
}

pub fn normalizer(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let norm = match node.get_attr_opt::<&str>("norm")?.unwrap_or("MAX") {
        "MAX" => Norm::Max,
        "L1" => Norm::L1,
        "L2" => Norm::L2,
        other => bail!("node {:?}: unknown norm {other:?}", node.name),
    };
    Ok((row_op(Normalizer { norm }), vec![]))
}
