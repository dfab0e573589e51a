//! Loading and running ONNX models with tract.
//!
//! A model is loaded once into an optimised plan whose batch dimension is symbolic, so one
//! plan serves any number of rows. The plan is shared (`Arc`) by every caller; each run gets
//! its own state. Running is CPU work: callers run it off the async runtime.

use std::collections::BTreeMap;
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::dims;
use tract_onnx::tract_hir::infer::Factoid;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model does not load: {0}")]
    Load(String),
    #[error("model input {name:?} has {got} features, the manifest lists {want}")]
    Features { name: String, got: String, want: usize },
    #[error("inference failed: {0}")]
    Run(String),
}

/// A loaded, optimised model.
pub struct Engine {
    plan: Arc<TypedRunnableModel>,
    n_features: usize,
    input_name: String,
    output_names: Vec<String>,
    output_types: Vec<String>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("n_features", &self.n_features).field("outputs", &self.output_names).finish()
    }
}

/// One row's outputs: each model output flattened to numbers.
pub type Outputs = BTreeMap<String, Vec<f64>>;

impl Engine {
    /// Load ONNX bytes for rows of `n_features` float32 features, with a symbolic batch axis.
    pub fn load(onnx: &[u8], n_features: usize) -> Result<Engine, EngineError> {
        let load = |e: TractError| EngineError::Load(format!("{e:#}"));
        let mut model = tract_onnx::onnx().model_for_read(&mut std::io::Cursor::new(onnx)).map_err(load)?;
        if model.inputs.len() != 1 {
            return Err(EngineError::Load(format!("model has {} inputs; Lathe runs models with one", model.inputs.len())));
        }
        let input_name = model.node(model.inputs[0].node).name.clone();
        // A declared last axis must match the manifest's feature count.
        if let Ok(fact) = model.input_fact(0) {
            let last = fact.shape.dims().last().and_then(|d| d.concretize()).and_then(|d| d.to_i64().ok()).map(|d| d as usize);
            if let Some(last) = last.filter(|l| *l != n_features) {
                return Err(EngineError::Features { name: input_name, got: last.to_string(), want: n_features });
            }
        }
        let n = model.symbols.sym("N");
        model = model.with_input_fact(0, f32::fact(dims!(n, n_features)).into()).map_err(load)?;
        let typed = model.into_optimized().map_err(load)?;
        let mut output_names = vec![];
        let mut output_types = vec![];
        for o in typed.output_outlets().map_err(load)? {
            output_names.push(typed.outlet_label(*o).map(str::to_string).unwrap_or_else(|| typed.node(o.node).name.clone()));
            output_types.push(dtype_name(typed.outlet_fact(*o).map_err(load)?.datum_type));
        }
        let plan = typed.into_runnable().map_err(load)?;
        Ok(Engine { plan, n_features, input_name, output_names, output_types })
    }

    pub fn n_features(&self) -> usize {
        self.n_features
    }

    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    /// The model's input tensor name.
    pub fn input_name(&self) -> &str {
        &self.input_name
    }

    /// Output names with their element types (`float32`, `int64`, …).
    pub fn outputs(&self) -> Vec<(String, String)> {
        self.output_names.iter().cloned().zip(self.output_types.iter().cloned()).collect()
    }

    /// Run a batch of rows, each of `n_features` values. Returns one [`Outputs`] per row.
    pub fn run(&self, rows: &[Vec<f32>]) -> Result<Vec<Outputs>, EngineError> {
        let run = |e: TractError| EngineError::Run(format!("{e:#}"));
        let n = rows.len();
        if n == 0 {
            return Ok(vec![]);
        }
        let mut flat = Vec::with_capacity(n * self.n_features);
        for r in rows {
            if r.len() != self.n_features {
                return Err(EngineError::Run(format!("row has {} values, model takes {}", r.len(), self.n_features)));
            }
            flat.extend_from_slice(r);
        }
        let input = Tensor::from_shape(&[n, self.n_features], &flat).map_err(run)?;
        let outputs = self.plan.run(tvec!(input.into_tvalue())).map_err(run)?;
        let mut per_row: Vec<Outputs> = vec![BTreeMap::new(); n];
        for (name, value) in self.output_names.iter().zip(outputs.iter()) {
            let as_f64 = value.cast_to::<f64>().map_err(run)?;
            let view = as_f64.to_plain_array_view::<f64>().map_err(run)?;
            let shape = view.shape();
            if shape.first().copied() != Some(n) {
                return Err(EngineError::Run(format!("output {name:?} has shape {shape:?}, expected {n} rows first")));
            }
            let per = if n == 0 { 0 } else { view.len() / n };
            let values: Vec<f64> = view.iter().copied().collect();
            for (i, row) in per_row.iter_mut().enumerate() {
                row.insert(name.clone(), values[i * per..(i + 1) * per].to_vec());
            }
        }
        Ok(per_row)
    }
}

/// ONNX-style names of element types.
fn dtype_name(dt: DatumType) -> String {
    match dt {
        DatumType::F32 => "float32".into(),
        DatumType::F64 => "float64".into(),
        DatumType::F16 => "float16".into(),
        DatumType::I64 => "int64".into(),
        DatumType::I32 => "int32".into(),
        DatumType::I8 => "int8".into(),
        DatumType::U8 => "uint8".into(),
        DatumType::Bool => "bool".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::path::PathBuf;

    fn fixture(name: &str) -> (Vec<u8>, Value) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
        let onnx = std::fs::read(dir.join(format!("{name}.onnx"))).expect("fixture model");
        let cases = serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.cases.json"))).expect("cases"))
            .expect("cases json");
        (onnx, cases)
    }

    /// Run every fixture case in one batch and one at a time; compare with onnxruntime.
    fn check(name: &str) {
        let (onnx, cases) = fixture(name);
        let rows: Vec<Vec<f32>> = cases["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| r.as_array().expect("row").iter().map(|v| v.as_f64().expect("number") as f32).collect())
            .collect();
        let engine = Engine::load(&onnx, rows[0].len()).expect("loads");
        let batch = engine.run(&rows).expect("runs");
        for (i, (got, want)) in batch.iter().zip(cases["expected"].as_array().expect("expected")).enumerate() {
            let single = engine.run(&rows[i..=i]).expect("runs one");
            assert_eq!(&single[0], got, "{name} row {i}: batch and single differ");
            for (out, values) in want.as_object().expect("object") {
                let g = &got[out];
                let w: Vec<f64> = values.as_array().expect("array").iter().map(|v| v.as_f64().expect("num")).collect();
                assert_eq!(g.len(), w.len(), "{name} row {i} output {out}");
                for (a, b) in g.iter().zip(&w) {
                    let tol = 1e-5 * b.abs().max(1.0);
                    assert!((a - b).abs() <= tol, "{name} row {i} output {out}: {a} vs onnxruntime {b}");
                }
            }
        }
    }

    #[test]
    fn fixtures_match_onnxruntime() {
        check("vibration_logreg");
        check("rul_linear");
        check("health_mlp");
    }

    #[test]
    fn wrong_feature_count_is_refused() {
        let (onnx, _) = fixture("rul_linear");
        let err = Engine::load(&onnx, 3).expect_err("model takes 4 features");
        assert!(err.to_string().contains("features") || err.to_string().contains("load"), "{err}");
    }

    #[test]
    fn garbage_is_a_load_error() {
        let err = Engine::load(b"not an onnx model", 4).expect_err("garbage");
        assert!(matches!(err, EngineError::Load(_)), "{err}");
    }
}
