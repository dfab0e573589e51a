//! Loading and running ONNX models with tract.
//!
//! A model is loaded once into an optimised plan whose batch dimension is symbolic, so one
//! plan serves any number of rows. The plan is shared (`Arc`) by every caller; each run takes
//! a run state from a small pool (or makes one), so that a one-row call does not rebuild it.
//! Results come back columnar: one flat array per model output. Running is CPU work: callers
//! run it off the async runtime.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::dims;
use tract_onnx::tract_hir::infer::Factoid;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model does not load: {0}")]
    Load(String),
    #[error("model uses {} operator(s) this engine does not support: {}", .0.len(), .0.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(", "))]
    Unsupported(Vec<UnsupportedOp>),
    #[error("model input {name:?} has {got} features, the manifest lists {want}")]
    Features { name: String, got: String, want: usize },
    #[error("inference failed: {0}")]
    Run(String),
}

/// An operator of the model that the engine cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedOp {
    pub op_type: String,
    pub domain: String,
    pub node: String,
}

impl std::fmt::Display for UnsupportedOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let domain = if self.domain.is_empty() {
            "ai.onnx"
        } else {
            &self.domain
        };
        write!(f, "{}:{} (node {:?})", domain, self.op_type, self.node)
    }
}

/// What a model file declares, read without loading it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// Operators by `domain:op_type`, with how many nodes use each.
    pub operators: BTreeMap<String, usize>,
    /// Operators this engine cannot run, with the node that uses each.
    pub unsupported: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorInfo {
    pub name: String,
    /// ONNX element type name, or `non-tensor` (sequences, maps).
    pub dtype: String,
    /// Dimensions: numbers, or names for free dimensions; empty when undeclared.
    pub shape: Vec<String>,
}

fn parse(onnx: &[u8]) -> Result<tract_onnx::pb::ModelProto, EngineError> {
    crate::ml::onnx()
        .proto_model_for_read(&mut std::io::Cursor::new(onnx))
        .map_err(|e| EngineError::Load(format!("not an ONNX model: {e:#}")))
}

fn unsupported(proto: &tract_onnx::pb::ModelProto) -> Vec<UnsupportedOp> {
    let register = &crate::ml::onnx().op_register;
    let mut out = vec![];
    if let Some(g) = &proto.graph {
        for n in &g.node {
            if !register.0.contains_key(&n.op_type) {
                out.push(UnsupportedOp {
                    op_type: n.op_type.clone(),
                    domain: n.domain.clone(),
                    node: n.name.clone(),
                });
            }
        }
    }
    out
}

/// Describe a model file: inputs, outputs, operators, and what this engine cannot run.
pub fn inspect(onnx: &[u8]) -> Result<ModelInfo, EngineError> {
    use tract_onnx::pb::{tensor_shape_proto::dimension::Value as Dim, type_proto::Value as Ty};
    let proto = parse(onnx)?;
    let graph = proto.graph.clone().unwrap_or_default();
    let tensor = |v: &tract_onnx::pb::ValueInfoProto| {
        let (dtype, shape) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(Ty::TensorType(t)) => (
                onnx_dtype_name(t.elem_type),
                t.shape
                    .as_ref()
                    .map(|s| {
                        s.dim
                            .iter()
                            .map(|d| match &d.value {
                                Some(Dim::DimValue(n)) => n.to_string(),
                                Some(Dim::DimParam(p)) => p.clone(),
                                None => "?".into(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            None => ("non-tensor".to_string(), vec![]),
        };
        TensorInfo {
            name: v.name.clone(),
            dtype,
            shape,
        }
    };
    let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut operators = BTreeMap::new();
    for n in &graph.node {
        let domain = if n.domain.is_empty() { "ai.onnx" } else { &n.domain };
        *operators.entry(format!("{domain}:{}", n.op_type)).or_insert(0) += 1;
    }
    Ok(ModelInfo {
        inputs: graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(tensor)
            .collect(),
        outputs: graph.output.iter().map(tensor).collect(),
        operators,
        unsupported: unsupported(&proto).iter().map(|u| u.to_string()).collect(),
    })
}

fn onnx_dtype_name(t: i32) -> String {
    match t {
        1 => "float32",
        2 => "uint8",
        3 => "int8",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "float64",
        _ => return format!("type {t}"),
    }
    .into()
}

/// Run states kept for reuse; more callers at once than this make their own.
const POOLED_STATES: usize = 4;

/// A loaded, optimised model.
pub struct Engine {
    plan: Arc<TypedRunnableModel>,
    states: Mutex<Vec<TypedSimpleState>>,
    n_features: usize,
    input_name: String,
    /// Shared, so that every result can name its columns without copying strings.
    output_names: Vec<Arc<str>>,
    output_types: Vec<String>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("n_features", &self.n_features)
            .field("outputs", &self.output_names)
            .finish()
    }
}

/// A batch's results: for each model output, every row's values flattened to numbers
/// (labels included), row after row.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    rows: usize,
    columns: Vec<Column>,
}

/// One model output over a batch: `width` numbers per row, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: Arc<str>,
    pub width: usize,
    pub values: Vec<f64>,
}

impl Column {
    /// Row `i`'s values.
    pub fn row(&self, i: usize) -> &[f64] {
        &self.values[i * self.width..(i + 1) * self.width]
    }
}

impl Outputs {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| &*c.name == name)
    }

    /// Row `i` as a map from output name to its values: the shape of a prediction.
    pub fn row(&self, i: usize) -> BTreeMap<String, Vec<f64>> {
        self.columns
            .iter()
            .map(|c| (c.name.to_string(), c.row(i).to_vec()))
            .collect()
    }
}

impl Engine {
    /// Load ONNX bytes for rows of `n_features` float32 features, with a symbolic batch axis.
    pub fn load(onnx: &[u8], n_features: usize) -> Result<Engine, EngineError> {
        let load = |e: TractError| EngineError::Load(format!("{e:#}"));
        if n_features == 0 {
            return Err(EngineError::Load("the model must take at least one feature".into()));
        }
        let proto = parse(onnx)?;
        let missing = unsupported(&proto);
        if !missing.is_empty() {
            return Err(EngineError::Unsupported(missing));
        }
        let mut model = crate::ml::onnx().model_for_proto_model(&proto).map_err(load)?;
        if model.inputs.len() != 1 {
            return Err(EngineError::Load(format!(
                "model has {} inputs; Lathe runs models with one",
                model.inputs.len()
            )));
        }
        let input_name = model.node(model.inputs[0].node).name.clone();
        // A declared last axis must match the manifest's feature count.
        if let Ok(fact) = model.input_fact(0) {
            let last = fact
                .shape
                .dims()
                .last()
                .and_then(|d| d.concretize())
                .and_then(|d| d.to_i64().ok())
                .map(|d| d as usize);
            if let Some(last) = last.filter(|l| *l != n_features) {
                return Err(EngineError::Features {
                    name: input_name,
                    got: last.to_string(),
                    want: n_features,
                });
            }
        }
        let n = model.symbols.sym("N");
        model = model
            .with_input_fact(0, f32::fact(dims!(n, n_features)).into())
            .map_err(load)?;
        let typed = model.into_optimized().map_err(load)?;
        let mut output_names = vec![];
        let mut output_types = vec![];
        for o in typed.output_outlets().map_err(load)? {
            output_names.push(Arc::from(
                typed
                    .outlet_label(*o)
                    .unwrap_or_else(|| typed.node(o.node).name.as_str()),
            ));
            output_types.push(dtype_name(typed.outlet_fact(*o).map_err(load)?.datum_type));
        }
        let plan = typed.into_runnable().map_err(load)?;
        Ok(Engine {
            plan,
            states: Mutex::new(vec![]),
            n_features,
            input_name,
            output_names,
            output_types,
        })
    }

    pub fn n_features(&self) -> usize {
        self.n_features
    }

    pub fn output_names(&self) -> &[Arc<str>] {
        &self.output_names
    }

    /// The model's input tensor name.
    pub fn input_name(&self) -> &str {
        &self.input_name
    }

    /// Output names with their element types (`float32`, `int64`, …).
    pub fn outputs(&self) -> Vec<(String, String)> {
        self.output_names
            .iter()
            .map(|n| n.to_string())
            .zip(self.output_types.iter().cloned())
            .collect()
    }

    /// Run a batch of rows, each of `n_features` values.
    pub fn run(&self, rows: &[Vec<f32>]) -> Result<Outputs, EngineError> {
        if let Some(bad) = rows.iter().find(|r| r.len() != self.n_features) {
            return Err(EngineError::Run(format!(
                "row has {} values, model takes {}",
                bad.len(),
                self.n_features
            )));
        }
        let mut input = Tensor::zero::<f32>(&[rows.len(), self.n_features]).map_err(run_error)?;
        if !rows.is_empty() {
            let mut plain = input.try_as_plain_ram_mut().map_err(run_error)?;
            let dst = plain.as_slice_mut::<f32>().map_err(run_error)?;
            for (d, r) in dst.chunks_exact_mut(self.n_features).zip(rows) {
                d.copy_from_slice(r);
            }
        }
        self.run_tensor(input, rows.len())
    }

    /// Run rows given back to back in one array of `rows * n_features` values.
    pub fn run_flat(&self, x: &[f32]) -> Result<Outputs, EngineError> {
        if x.len() % self.n_features != 0 {
            return Err(EngineError::Run(format!(
                "{} values do not make rows of {}",
                x.len(),
                self.n_features
            )));
        }
        let n = x.len() / self.n_features;
        let input = Tensor::from_shape(&[n, self.n_features], x).map_err(run_error)?;
        self.run_tensor(input, n)
    }

    fn run_tensor(&self, input: Tensor, n: usize) -> Result<Outputs, EngineError> {
        let run = run_error;
        if n == 0 {
            return Ok(Outputs {
                rows: 0,
                columns: self
                    .output_names
                    .iter()
                    .map(|name| Column {
                        name: name.clone(),
                        width: 0,
                        values: vec![],
                    })
                    .collect(),
            });
        }
        let pooled = self.states.lock().map(|mut s| s.pop()).unwrap_or(None);
        let mut state = match pooled {
            Some(s) => s,
            None => self.plan.spawn().map_err(run)?,
        };
        let outputs = state.run(tvec!(input.into_tvalue())).map_err(run)?;
        if let Ok(mut pool) = self.states.lock() {
            if pool.len() < POOLED_STATES {
                pool.push(state);
            }
        }
        let mut columns = Vec::with_capacity(outputs.len());
        for (name, value) in self.output_names.iter().zip(outputs.iter()) {
            let shape = value.shape();
            if shape.first().copied() != Some(n) {
                return Err(EngineError::Run(format!(
                    "output {name:?} has shape {shape:?}, expected {n} rows first"
                )));
            }
            columns.push(Column {
                name: name.clone(),
                width: value.len() / n,
                values: as_f64(value).map_err(run)?,
            });
        }
        Ok(Outputs { rows: n, columns })
    }
}

fn run_error(e: TractError) -> EngineError {
    EngineError::Run(format!("{e:#}"))
}

/// A tensor's values as f64, in order.
fn as_f64(t: &Tensor) -> TractResult<Vec<f64>> {
    let plain = t.try_as_plain_ram()?;
    Ok(match t.datum_type() {
        DatumType::F32 => plain.as_slice::<f32>()?.iter().map(|v| *v as f64).collect(),
        DatumType::I64 => plain.as_slice::<i64>()?.iter().map(|v| *v as f64).collect(),
        DatumType::F64 => plain.as_slice::<f64>()?.to_vec(),
        // ONNX int64 casts can come out of tract's optimiser as symbolic dimensions.
        DatumType::TDim => plain
            .as_slice::<TDim>()?
            .iter()
            .map(|d| d.to_i64().map(|v| v as f64).map_err(|e| anyhow::anyhow!("{e:?}")))
            .collect::<TractResult<Vec<f64>>>()?,
        _ => {
            let cast = t.cast_to::<f64>()?;
            let view = cast.to_plain_array_view::<f64>()?;
            view.iter().copied().collect()
        }
    })
}

/// Parse CSV of numbers: a header row of column names, then one row of values per line.
/// Empty cells and `nan` (any case) are NaN. Returns the header and the rows.
pub fn parse_csv(text: &str) -> Result<(Vec<String>, Vec<Vec<f32>>), String> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, head) = lines.next().ok_or("no header row")?;
    let header: Vec<String> = head.split(',').map(|c| c.trim().to_string()).collect();
    if header.iter().any(String::is_empty) {
        return Err("line 1: empty column name".into());
    }
    let mut rows = vec![];
    for (i, line) in lines {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != header.len() {
            return Err(format!(
                "line {}: {} values, header has {}",
                i + 1,
                cells.len(),
                header.len()
            ));
        }
        let row = cells
            .iter()
            .zip(&header)
            .map(|(c, h)| {
                if c.is_empty() || c.eq_ignore_ascii_case("nan") {
                    Ok(f32::NAN)
                } else {
                    c.parse::<f32>()
                        .map_err(|_| format!("line {}: column {h}: {c:?} is not a number", i + 1))
                }
            })
            .collect::<Result<Vec<f32>, String>>()?;
        rows.push(row);
    }
    Ok((header, rows))
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

    fn fixture(name: &str) -> (Vec<u8>, Value, Vec<Vec<f32>>) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
        let onnx = std::fs::read(dir.join(format!("{name}.onnx"))).expect("fixture model");
        let cases: Value =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.cases.json"))).expect("cases"))
                .expect("cases json");
        let rows = cases["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                r.as_array()
                    .expect("row")
                    .iter()
                    .map(|v| v.as_f64().expect("number") as f32)
                    .collect()
            })
            .collect();
        (onnx, cases, rows)
    }

    /// Run every fixture case in one batch and one at a time; compare with onnxruntime.
    fn check(name: &str) {
        let (onnx, cases, rows) = fixture(name);
        let engine = Engine::load(&onnx, rows[0].len()).expect("loads");
        let batch = engine.run(&rows).expect("runs");
        assert_eq!(batch.rows(), rows.len());
        for (i, want) in cases["expected"].as_array().expect("expected").iter().enumerate() {
            let got = batch.row(i);
            let single = engine.run(&rows[i..=i]).expect("runs one");
            assert_eq!(single.row(0), got, "{name} row {i}: batch and single differ");
            for (out, values) in want.as_object().expect("object") {
                let g = &got[out];
                let w: Vec<f64> = values
                    .as_array()
                    .expect("array")
                    .iter()
                    .map(|v| v.as_f64().expect("num"))
                    .collect();
                assert_eq!(g.len(), w.len(), "{name} row {i} output {out}");
                for (a, b) in g.iter().zip(&w) {
                    let tol = 1e-5 * b.abs().max(1.0);
                    assert!(
                        (a - b).abs() <= tol,
                        "{name} row {i} output {out}: {a} vs onnxruntime {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn fixtures_match_onnxruntime() {
        check("vibration_logreg");
        check("rul_linear");
        check("health_mlp");
        check("forest_regressor");
    }

    #[test]
    fn flat_rows_and_empty_batches() {
        let (onnx, _, rows) = fixture("vibration_logreg");
        let engine = Engine::load(&onnx, rows[0].len()).expect("loads");
        let flat: Vec<f32> = rows.concat();
        let (a, b) = (
            engine.run(&rows).expect("runs"),
            engine.run_flat(&flat).expect("runs flat"),
        );
        assert_eq!(a, b);
        assert_eq!(a.columns().iter().map(|c| c.width).collect::<Vec<_>>(), vec![1, 2]);
        let err = engine.run_flat(&flat[1..]).expect_err("a partial row");
        assert!(err.to_string().contains("do not make rows"), "{err}");
        let err = engine.run(&[vec![1.0]]).expect_err("a short row");
        assert!(err.to_string().contains("row has 1 values"), "{err}");
        let empty = engine.run(&[]).expect("no rows");
        assert_eq!(empty.rows(), 0);
        assert_eq!(empty.columns().len(), 2);
        assert!(Engine::load(&onnx, 0).is_err());
    }

    #[test]
    fn wrong_feature_count_is_refused() {
        let (onnx, _, _) = fixture("rul_linear");
        let err = Engine::load(&onnx, 3).expect_err("model takes 4 features");
        assert!(
            err.to_string().contains("features") || err.to_string().contains("load"),
            "{err}"
        );
    }

    #[test]
    fn inspect_lists_operators_and_io() {
        let (onnx, _, _) = fixture("vibration_logreg");
        let info = inspect(&onnx).expect("inspects");
        assert_eq!(info.inputs.len(), 1);
        assert_eq!(info.inputs[0].dtype, "float32");
        assert_eq!(
            info.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(),
            vec!["label", "probabilities"]
        );
        assert!(
            info.operators.contains_key("ai.onnx.ml:LinearClassifier"),
            "{:?}",
            info.operators
        );
        assert!(info.unsupported.is_empty());
    }

    #[test]
    fn csv_parsing() {
        let (h, rows) = parse_csv("a, b\n1,2.5\n\n,NaN\n").expect("parses");
        assert_eq!(h, vec!["a", "b"]);
        assert_eq!(rows[0], vec![1.0, 2.5]);
        assert!(rows[1][0].is_nan() && rows[1][1].is_nan());
        assert!(parse_csv("a,b\n1\n").expect_err("short row").contains("line 2"));
        assert!(parse_csv("a,b\n1,x\n").expect_err("bad cell").contains("column b"));
        assert!(parse_csv("").is_err());
    }

    #[test]
    fn unsupported_operators_are_named_with_their_node() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/unsupported_op.onnx");
        let onnx = std::fs::read(path).expect("fixture model");
        let err = Engine::load(&onnx, 4).expect_err("nobody implements FeatureHasher");
        let msg = err.to_string();
        assert!(matches!(err, EngineError::Unsupported(_)), "{msg}");
        assert!(
            msg.contains("com.example.lathe:FeatureHasher") && msg.contains("hash_features"),
            "{msg}"
        );
        let info = inspect(&onnx).expect("inspects");
        assert_eq!(info.unsupported.len(), 1, "{:?}", info.unsupported);
    }

    #[test]
    fn garbage_is_a_load_error() {
        let err = Engine::load(b"not an onnx model", 4).expect_err("garbage");
        assert!(matches!(err, EngineError::Load(_)), "{err}");
    }
}
