//! `LabelEncoder` (numeric keys and values) and `OneHotEncoder` (integer categories).

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

/// Lookup table from integer or float keys to integer or float values, keys compared by
/// value (floats by their bits, so NaN keys work as onnxruntime's do).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabelEncoder {
    keys_are_floats: bool,
    /// Sorted (key bits, value bits).
    table: Vec<(u64, u64)>,
    values_are_floats: bool,
    default: u64,
}

fn key_bits(v: f64, floats: bool) -> u64 {
    if floats {
        (v as f32).to_bits() as u64
    } else {
        v as i64 as u64
    }
}

pub fn label_encoder(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let name = &node.name;
    let (keys, keys_are_floats): (Vec<u64>, bool) = match (
        node.get_attr_opt_vec::<i64>("keys_int64s")?,
        node.get_attr_opt_vec::<f32>("keys_floats")?,
    ) {
        (Some(k), None) => (k.into_iter().map(|k| k as u64).collect(), false),
        (None, Some(k)) => (k.into_iter().map(|k| k.to_bits() as u64).collect(), true),
        _ => bail!("node {name:?}: LabelEncoder supports keys_int64s or keys_floats (string keys are not supported)"),
    };
    let (values, values_are_floats): (Vec<u64>, bool) = match (
        node.get_attr_opt_vec::<i64>("values_int64s")?,
        node.get_attr_opt_vec::<f32>("values_floats")?,
    ) {
        (Some(v), None) => (v.into_iter().map(|v| v as u64).collect(), false),
        (None, Some(v)) => (v.into_iter().map(|v| v.to_bits() as u64).collect(), true),
        _ => bail!(
            "node {name:?}: LabelEncoder supports values_int64s or values_floats (string values are not supported)"
        ),
    };
    ensure!(
        keys.len() == values.len(),
        "node {name:?}: {} keys for {} values",
        keys.len(),
        values.len()
    );
    let default = if values_are_floats {
        node.get_attr_opt::<f32>("default_float")?.unwrap_or(-0.0).to_bits() as u64
    } else {
        node.get_attr_opt::<i64>("default_int64")?.unwrap_or(-1) as u64
    };
    let mut table: Vec<(u64, u64)> = keys.into_iter().zip(values).collect();
    table.sort();
    Ok((
        expand(Expand(Custom::Label(LabelEncoder {
            keys_are_floats,
            table,
            values_are_floats,
            default,
        }))),
        vec![],
    ))
}

impl LabelEncoder {
    fn eval(&self, input: TValue) -> TractResult<Tensor> {
        let x = input.cast_to::<f64>()?;
        let view = x.to_plain_array_view::<f64>()?;
        let look = |v: f64| {
            let k = key_bits(v, self.keys_are_floats);
            self.table
                .binary_search_by_key(&k, |e| e.0)
                .map(|i| self.table[i].1)
                .unwrap_or(self.default)
        };
        let shape = view.shape().to_vec();
        Ok(if self.values_are_floats {
            let out: Vec<f32> = view.iter().map(|v| f32::from_bits(look(*v) as u32)).collect();
            tensor1(&out).into_shape(&shape)?
        } else {
            let out: Vec<i64> = view.iter().map(|v| look(*v) as i64).collect();
            tensor1(&out).into_shape(&shape)?
        })
    }

    fn datum_type(&self) -> DatumType {
        if self.values_are_floats {
            f32::datum_type()
        } else {
            i64::datum_type()
        }
    }
}

/// One-hot over integer categories: `[.., C]` in, `[.., C, n_categories]` out, as floats.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OneHotEncoder {
    categories: Vec<i64>,
    /// When false, an unknown category is an error instead of a row of zeros.
    zeros: bool,
}

pub fn one_hot_encoder(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let categories = node.get_attr_opt_vec::<i64>("cats_int64s")?.ok_or_else(|| {
        format_err!(
            "node {:?}: OneHotEncoder supports cats_int64s (string categories are not supported)",
            node.name
        )
    })?;
    let zeros = node.get_attr_opt::<i64>("zeros")?.unwrap_or(1) != 0;
    Ok((
        expand(Expand(Custom::OneHot(OneHotEncoder { categories, zeros }))),
        vec![],
    ))
}

impl OneHotEncoder {
    fn eval(&self, input: TValue) -> TractResult<Tensor> {
        let x = input.cast_to::<f64>()?;
        let view = x.to_plain_array_view::<f64>()?;
        let k = self.categories.len();
        let mut out = vec![0f32; view.len() * k];
        for (i, v) in view.iter().enumerate() {
            match self.categories.iter().position(|c| !v.is_nan() && *c == *v as i64) {
                Some(j) => out[i * k + j] = 1.0,
                None if self.zeros => {}
                None => bail!("OneHotEncoder: value {v} is not a known category and zeros=0"),
            }
        }
        let mut shape = view.shape().to_vec();
        shape.push(k);
        tensor1(&out).into_shape(&shape)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Custom {
    Label(LabelEncoder),
    OneHot(OneHotEncoder),
}

impl Op for Custom {
    fn name(&self) -> StaticName {
        match self {
            Custom::Label(_) => "LatheLabelEncoder".into(),
            Custom::OneHot(_) => "LatheOneHotEncoder".into(),
        }
    }

    op_as_typed_op!();
}

impl EvalOp for Custom {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let out = match self {
            Custom::Label(l) => l.eval(input)?,
            Custom::OneHot(o) => o.eval(input)?,
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Custom {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(match self {
            Custom::Label(l) => tvec!(l.datum_type().fact(inputs[0].shape.clone())),
            Custom::OneHot(o) => {
                let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
                shape.push(o.categories.len().to_dim());
                tvec!(f32::fact(shape))
            }
        })
    }

    as_op!();
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Expand(Custom);

impl Expansion for Expand {
    fn name(&self) -> StaticName {
        self.0.name()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        match &self.0 {
            Custom::Label(l) => {
                s.equals(&outputs[0].datum_type, l.datum_type())?;
                s.equals(&outputs[0].shape, &inputs[0].shape)?;
            }
            Custom::OneHot(_) => {
                s.equals(&outputs[0].datum_type, f32::datum_type())?;
                s.equals(&outputs[0].rank, inputs[0].rank.bex() + 1)?;
            }
        }
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.0.clone(), inputs)
    }
}
