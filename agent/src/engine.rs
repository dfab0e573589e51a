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
use tract_onnx::tract_core::runtime::{Runnable, State};
use tract_onnx::tract_hir::infer::Factoid;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model does not load: {0}")]
    Load(String),
    #[error("model cannot run here: {}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    CannotRun(Vec<Problem>),
    #[error("inference failed: {0}")]
    Run(String),
}

/// One reason a model cannot run on this engine. [`Engine::load`] finds every one of them; the
/// agent's deploy, `lathe model inspect`, `lathe model run` and `lathe-hub bundle pack` all use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// An operator the engine does not implement.
    Operator(UnsupportedOp),
    /// The model takes these inputs; `given` were described (by the manifest).
    Inputs { names: Vec<String>, given: usize },
    /// The input's element type is not float32.
    InputType { name: String, dtype: String },
    /// The input is declared with a rank other than the described one (`[N, shape…]`).
    InputRank { name: String, rank: usize, want: usize },
    /// The input declares dimensions other than the described ones.
    InputShape {
        name: String,
        /// The declared dimensions, batch axis first (`None`: free).
        declared: Vec<Option<i64>>,
        want: Vec<usize>,
    },
    /// The input's batch axis is fixed to more than one sample.
    FixedBatch { name: String, batch: i64 },
    /// An output holds values that are not numbers (string class labels).
    OutputType { name: String, dtype: String },
    /// The model loads but fails on rows of the right width.
    Fails(String),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Operator(op) => write!(f, "operator {op} is not supported"),
            Problem::Inputs { names, given } => write!(
                f,
                "the model has {} {} ({}) and {given} {} described: a tabular model has one \
                 float32 input [N, features] (skl2onnx: initial_types=[(\"X\", FloatTensorType([None, n]))]), \
                 a tensor model lists each of its inputs with its shape",
                names.len(),
                if names.len() == 1 { "input" } else { "inputs" },
                names.join(", "),
                if *given == 1 { "is" } else { "are" }
            ),
            Problem::InputType { name, dtype } => write!(
                f,
                "input {name:?} is {dtype}; Lathe feeds float32: export with a float32 input \
                 (skl2onnx: FloatTensorType, or X.astype(numpy.float32))"
            ),
            Problem::InputRank { name, rank, want } => write!(
                f,
                "input {name:?} has rank {rank}; it is described with rank {want} ([N, …]): \
                 a tabular input is [N, features], a tensor input lists its shape"
            ),
            Problem::InputShape { name, declared, want } => match (&declared[..], &want[..]) {
                ([_, Some(d)], [w]) => write!(f, "model input {name:?} takes {d} features; {w} were given"),
                _ => write!(
                    f,
                    "input {name:?} is declared [{}]; it is described as [N, {}]",
                    declared
                        .iter()
                        .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
                        .collect::<Vec<_>>()
                        .join(", "),
                    want.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
                ),
            },
            Problem::FixedBatch { name, batch } => write!(
                f,
                "input {name:?} has a fixed batch of {batch}; export it with a free batch axis \
                 (torch.onnx.export(..., dynamic_axes={{\"{name}\": {{0: \"N\"}}}})) or a batch of 1"
            ),
            Problem::OutputType { name, dtype } => write!(
                f,
                "output {name:?} is {dtype}; Lathe supports integer class labels only: \
                 encode the labels as integers (sklearn LabelEncoder) before fitting"
            ),
            Problem::Fails(e) => write!(f, "it fails on trial rows: {e}"),
        }
    }
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

/// ONNX operator sets of the default domain that Lathe's conformance corpus covers
/// (`fixtures/corpus/`). A model outside them is loaded, with a warning.
pub const TESTED_OPSETS: std::ops::RangeInclusive<i64> = 9..=22;

/// What a model file declares, read without loading it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// Operators by `domain:op_type`, with how many nodes use each.
    pub operators: BTreeMap<String, usize>,
    /// Operators this engine cannot run, with the node that uses each.
    pub unsupported: Vec<String>,
    /// The ONNX operator set of the default domain (0 when not declared).
    pub opset: i64,
    /// Every reason the model cannot run here, from the same check the agent's deploy makes
    /// (empty when it runs). Needs the input width; see [`inspect`].
    pub problems: Vec<String>,
    /// Whether the model was loaded and run on trial rows (it was, unless its input width is
    /// not declared or a problem was found before that).
    pub trial_run: bool,
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

fn opset(proto: &tract_onnx::pb::ModelProto) -> i64 {
    proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0)
}

/// The graph's real inputs: declared inputs that are not initializers.
fn graph_inputs(graph: &tract_onnx::pb::GraphProto) -> Vec<&tract_onnx::pb::ValueInfoProto> {
    let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect()
}

fn tensor_type(v: &tract_onnx::pb::ValueInfoProto) -> Option<&tract_onnx::pb::type_proto::Tensor> {
    use tract_onnx::pb::type_proto::Value as Ty;
    match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(Ty::TensorType(t)) => Some(t),
        None => None,
    }
}

/// What the model declares that Lathe cannot feed or read, found without loading it.
fn declared_problems(proto: &tract_onnx::pb::ModelProto) -> Vec<Problem> {
    const FLOAT: i32 = 1;
    const STRING: i32 = 8;
    let mut out: Vec<Problem> = unsupported(proto).into_iter().map(Problem::Operator).collect();
    let Some(graph) = &proto.graph else {
        out.push(Problem::Fails("the file holds no graph".into()));
        return out;
    };
    for input in graph_inputs(graph) {
        match tensor_type(input) {
            Some(t) if t.elem_type == FLOAT => {}
            t => out.push(Problem::InputType {
                name: input.name.clone(),
                dtype: t.map_or("non-tensor".into(), |t| onnx_dtype_name(t.elem_type)),
            }),
        }
    }
    for o in &graph.output {
        if tensor_type(o).is_some_and(|t| t.elem_type == STRING) {
            out.push(Problem::OutputType {
                name: o.name.clone(),
                dtype: "string".into(),
            });
        }
    }
    out
}

/// Describe a model file: inputs, outputs, operators, and every reason it cannot run here.
///
/// The check is [`Engine::load`]'s: the declared problems, then a load and a run on trial rows
/// when the model declares every input's dimensions after its batch axis.
pub fn inspect(onnx: &[u8]) -> Result<ModelInfo, EngineError> {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
    let proto = parse(onnx)?;
    let graph = proto.graph.clone().unwrap_or_default();
    let tensor = |v: &tract_onnx::pb::ValueInfoProto| {
        let (dtype, shape) = match tensor_type(v) {
            Some(t) => (
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
    let mut operators = BTreeMap::new();
    for n in &graph.node {
        let domain = if n.domain.is_empty() { "ai.onnx" } else { &n.domain };
        *operators.entry(format!("{domain}:{}", n.op_type)).or_insert(0) += 1;
    }
    let inputs: Vec<TensorInfo> = graph_inputs(&graph).into_iter().map(tensor).collect();
    let mut problems: Vec<String> = declared_problems(&proto).iter().map(|p| p.to_string()).collect();
    let shapes: Option<Vec<Vec<usize>>> = inputs.iter().map(declared_sample_shape).collect();
    let mut trial_run = false;
    if let (true, Some(shapes)) = (problems.is_empty(), shapes) {
        trial_run = true;
        if let Err(e) = Engine::load_proto(&proto, &shapes) {
            problems.push(match e {
                EngineError::CannotRun(list) => list.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "),
                other => other.to_string(),
            });
        }
    }
    Ok(ModelInfo {
        inputs,
        outputs: graph.output.iter().map(tensor).collect(),
        operators,
        unsupported: unsupported(&proto).iter().map(|u| u.to_string()).collect(),
        opset: opset(&proto),
        problems,
        trial_run,
    })
}

/// An input's dimensions after its batch axis, when the model declares all of them.
pub fn declared_sample_shape(input: &TensorInfo) -> Option<Vec<usize>> {
    let dims = input.shape.get(1..).filter(|d| !d.is_empty())?;
    dims.iter()
        .map(|d| d.parse::<usize>().ok().filter(|d| *d > 0))
        .collect()
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

/// A tensor model whose weights take at most this many bytes also gets a plan for one sample
/// (see [`Engine`]): twice the plans, so only for models this small.
const MAX_SINGLE_PLAN_WEIGHTS: usize = 16 << 20;

/// A runnable plan and the run states kept for it.
struct Plan {
    runnable: Box<dyn Runnable>,
    states: Mutex<Vec<Box<dyn State>>>,
}

impl Plan {
    fn new(runnable: Box<dyn Runnable>) -> Plan {
        Plan {
            runnable,
            states: Mutex::new(vec![]),
        }
    }

    fn run(&self, inputs: TVec<TValue>) -> Result<TVec<TValue>, EngineError> {
        let pooled = self.states.lock().map(|mut s| s.pop()).unwrap_or(None);
        let mut state = match pooled {
            Some(s) => s,
            None => self.runnable.spawn().map_err(run_error)?,
        };
        let outputs = contained(|| state.run(inputs))?.map_err(run_error)?;
        if let Ok(mut pool) = self.states.lock() {
            if pool.len() < POOLED_STATES {
                pool.push(state);
            }
        }
        Ok(outputs)
    }
}

/// Where models run (`engine.device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The CPU, always.
    Cpu,
    /// The GPU through tract's CUDA runtime; the CPU when there is none, said in the log and
    /// in `lathe status`.
    Cuda,
    /// The GPU when this build has CUDA and the box a usable GPU, else the CPU.
    #[default]
    Auto,
}

/// Where models run on this box, decided once at start-up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    /// What the config asked for.
    pub requested: Device,
    /// `cpu` or `cuda`.
    pub used: String,
    /// Why the GPU is not used, when it was asked for (`cuda` or `auto`) and is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

static PLACEMENT: std::sync::OnceLock<Placement> = std::sync::OnceLock::new();

/// Decide where models run: the first call wins, and models loaded before any call (the
/// hub's packer, `lathe model`) run on the CPU. Never fails: without a usable GPU, the CPU.
pub fn place(requested: Device) -> &'static Placement {
    PLACEMENT.get_or_init(|| {
        let (used, reason) = match requested {
            Device::Cpu => ("cpu", None),
            // A CPU build has nothing to fall back from.
            Device::Auto if !cfg!(feature = "cuda") => ("cpu", None),
            Device::Cuda | Device::Auto => match gpu() {
                Ok(_) => ("cuda", None),
                Err(why) => ("cpu", Some(why)),
            },
        };
        Placement {
            requested,
            used: used.into(),
            reason,
        }
    })
}

fn placement() -> &'static Placement {
    place(Device::Cpu)
}

/// tract's CUDA runtime, when this build has it and it finds a usable GPU and CUDA libraries.
#[cfg(feature = "cuda")]
fn gpu() -> Result<&'static dyn tract_onnx::tract_core::runtime::Runtime, String> {
    // Linked for the runtime it registers.
    use tract_cuda as _;
    let rt = tract_onnx::tract_core::runtime::runtime_for_name("cuda")
        .map_err(|e| format!("no usable GPU: {e:#}"))?
        .ok_or("tract's CUDA runtime is not registered in this build")?;
    rt.check().map_err(|e| format!("no usable GPU: {e:#}"))?;
    Ok(rt)
}

#[cfg(not(feature = "cuda"))]
fn gpu() -> Result<&'static dyn tract_onnx::tract_core::runtime::Runtime, String> {
    Err("this lathe is built without GPU support (the `cuda` feature)".into())
}

/// One input of a loaded model: its name and the dimensions after its batch axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub name: String,
    pub shape: Vec<usize>,
}

impl Input {
    /// Values in one sample of this input.
    pub fn values(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A loaded, optimised model.
///
/// A row (a sample) is the values of every input for one batch item, back to back in input
/// order, each input's values in row-major order: for a tabular model, its features.
///
/// A small tensor model on the CPU also gets a plan optimised for a single sample, which tract
/// runs faster. Kept beside the batch plan, it takes calls of one row; when at load it ran the
/// trial rows faster one by one than the batch plan ran them together (convolutions over
/// images often do), it replaces the batch plan and every call runs row by row.
pub struct Engine {
    plan: Plan,
    /// The plan's graph run without the plan, when it is made only of Lathe's row operators
    /// (`ml::RowChain`); proved equal to the plan on the trial rows at load.
    direct: Option<crate::ml::RowChain>,
    /// A plan for one sample beside the batch plan, for one-row calls.
    single: Option<Plan>,
    /// `cpu` or `cuda`: where this model runs.
    device: &'static str,
    /// Values per row, over every input.
    n_features: usize,
    inputs: Vec<Input>,
    /// `plan` is for one sample (the model's batch axis is fixed to 1, or one by one was
    /// faster): rows run one at a time.
    batch_of_one: bool,
    /// Shared, so that every result can name its columns without copying strings.
    output_names: Vec<Arc<str>>,
    output_types: Vec<String>,
    /// Each output's dimensions after the batch axis, where the model declares them all.
    output_dims: Vec<Option<Vec<usize>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("inputs", &self.inputs)
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

    pub fn into_columns(self) -> Vec<Column> {
        self.columns
    }

    /// The rows of several results of the same model, one after the other.
    pub fn concat(parts: Vec<Outputs>) -> Outputs {
        let mut parts = parts.into_iter();
        let Some(mut all) = parts.next() else {
            return Outputs {
                rows: 0,
                columns: vec![],
            };
        };
        for p in parts {
            all.rows += p.rows;
            for (c, more) in all.columns.iter_mut().zip(p.columns) {
                c.values.extend(more.values);
            }
        }
        all
    }

    /// Outputs built from (name, width, values) columns: for tests of what consumes outputs.
    pub fn of(columns: Vec<(&str, usize, Vec<f64>)>) -> Outputs {
        Outputs {
            rows: columns.first().map_or(0, |(_, w, v)| v.len() / w),
            columns: columns
                .into_iter()
                .map(|(name, width, values)| Column {
                    name: Arc::from(name),
                    width,
                    values,
                })
                .collect(),
        }
    }

    /// One output of one value per row: for tests.
    pub fn single(name: &str, values: Vec<f64>) -> Outputs {
        Outputs::of(vec![(name, 1, values)])
    }

    /// Row `i` as a map from output name to its values: the shape of a prediction.
    pub fn row(&self, i: usize) -> BTreeMap<String, Vec<f64>> {
        self.columns
            .iter()
            .map(|c| (c.name.to_string(), c.row(i).to_vec()))
            .collect()
    }
}

/// tract's plan for the CPU, with Lathe's direct convolutions and max pooling in place of
/// tract's lowering where they apply ([`crate::ml::direct_cnn`]). Public for the benchmark,
/// which times the same plan node by node.
pub fn optimised(model: TypedModel) -> TractResult<TypedModel> {
    let mut model = model.into_decluttered()?;
    // A speed-up only: should swapping the operators fail, the model is left as it was and
    // tract's own lowering runs.
    match crate::ml::direct_cnn(&mut model) {
        Ok(0) => {}
        Ok(n) => tracing::debug!(n, "direct convolutions and pooling"),
        Err(e) => tracing::debug!(error = %format!("{e:#}"), "no direct convolutions"),
    }
    let mut model = model.into_optimized()?;
    // After tract's optimiser, which fuses biases and ReLUs into matrix products first.
    match crate::ml::direct_rowwise(&mut model) {
        Ok(0) => {}
        Ok(n) => tracing::debug!(n, "direct row-wise operators"),
        Err(e) => tracing::debug!(error = %format!("{e:#}"), "no direct row-wise operators"),
    }
    Ok(model)
}

impl Engine {
    /// Load ONNX bytes for rows of `n_features` float32 features, with a symbolic batch axis.
    ///
    /// This is the one check that decides whether a model can run: every declared problem
    /// ([`Problem`]), then the optimised plan, then a run on trial rows of the right width.
    pub fn load(onnx: &[u8], n_features: usize) -> Result<Engine, EngineError> {
        Engine::load_shapes(onnx, &[vec![n_features]])
    }

    /// Load ONNX bytes for float32 inputs of shapes `[N, shape…]`, one per model input in the
    /// model's order: the same check as [`Engine::load`], for any tensor inputs.
    pub fn load_shapes(onnx: &[u8], shapes: &[Vec<usize>]) -> Result<Engine, EngineError> {
        Engine::load_proto(&parse(onnx)?, shapes)
    }

    fn load_proto(proto: &tract_onnx::pb::ModelProto, shapes: &[Vec<usize>]) -> Result<Engine, EngineError> {
        let load = |e: TractError| EngineError::Load(format!("{e:#}"));
        if shapes.is_empty() || shapes.iter().any(|s| s.is_empty() || s.contains(&0)) {
            return Err(EngineError::Load(format!(
                "every input needs at least one value per sample (shapes {shapes:?})"
            )));
        }
        let values = shapes.iter().try_fold(0usize, |total, s| {
            s.iter()
                .try_fold(1usize, |p, d| p.checked_mul(*d))
                .and_then(|v| total.checked_add(v))
        });
        if values.is_none_or(|v| v > protocol::bundle::MAX_SAMPLE_VALUES) {
            return Err(EngineError::Load(format!(
                "the inputs {shapes:?} hold more than {} values per sample",
                protocol::bundle::MAX_SAMPLE_VALUES
            )));
        }
        let mut problems = declared_problems(proto);
        if !problems.is_empty() {
            return Err(EngineError::CannotRun(problems));
        }
        let opset = opset(proto);
        if opset != 0 && !TESTED_OPSETS.contains(&opset) {
            tracing::warn!(
                opset,
                "the model uses ONNX operator set {opset}; Lathe is tested with {} to {}: \
                 compare its outputs with `lathe model run` before deploying",
                TESTED_OPSETS.start(),
                TESTED_OPSETS.end()
            );
        } else {
            tracing::debug!(opset, "ONNX operator set");
        }
        let mut model = crate::ml::onnx().model_for_proto_model(proto).map_err(load)?;
        let names: Vec<String> = model.inputs.iter().map(|o| model.node(o.node).name.clone()).collect();
        if names.len() != shapes.len() {
            problems.push(Problem::Inputs {
                names: names.clone(),
                given: shapes.len(),
            });
        }
        if !problems.is_empty() {
            return Err(EngineError::CannotRun(problems));
        }
        // Declared dimensions must be the described ones; a batch axis fixed to 1 runs rows
        // one at a time.
        let mut batch_of_one = false;
        for (i, (name, shape)) in names.iter().zip(shapes).enumerate() {
            let Ok(fact) = model.input_fact(i) else { continue };
            let declared: Vec<Option<i64>> = fact
                .shape
                .dims()
                .map(|d| d.concretize().and_then(|d| d.to_i64().ok()))
                .collect();
            if fact.shape.is_open() {
                continue;
            }
            if declared.len() != shape.len() + 1 {
                problems.push(Problem::InputRank {
                    name: name.clone(),
                    rank: declared.len(),
                    want: shape.len() + 1,
                });
                continue;
            }
            let differs = declared[1..]
                .iter()
                .zip(shape)
                .any(|(d, s)| d.is_some_and(|d| d != *s as i64));
            if differs {
                problems.push(Problem::InputShape {
                    name: name.clone(),
                    declared: declared.clone(),
                    want: shape.clone(),
                });
            }
            match declared[0] {
                Some(1) => batch_of_one = true,
                Some(b) => problems.push(Problem::FixedBatch {
                    name: name.clone(),
                    batch: b,
                }),
                None => {}
            }
        }
        if !problems.is_empty() {
            return Err(EngineError::CannotRun(problems));
        }
        let weights: usize = proto.graph.as_ref().map_or(0, |g| {
            g.initializer
                .iter()
                .map(|t| t.raw_data.len() + 4 * (t.float_data.len() + t.int32_data.len()) + 8 * t.int64_data.len())
                .sum()
        });
        let tensor = shapes.iter().any(|s| s.len() >= 2);
        let mut single = (tensor && !batch_of_one && weights <= MAX_SINGLE_PLAN_WEIGHTS && placement().used == "cpu")
            .then(|| model.clone());
        let n = model.symbols.sym("N");
        for (i, shape) in shapes.iter().enumerate() {
            let with = |batch: TDim| {
                let mut dims: TVec<TDim> = tvec![batch];
                dims.extend(shape.iter().map(|d| TDim::from(*d as i64)));
                f32::fact(dims).into()
            };
            let batch = if batch_of_one { 1.into() } else { n.clone().into() };
            model = model.with_input_fact(i, with(batch)).map_err(load)?;
            // The single-sample plan is a speed-up: any failure to make it only drops it.
            single = single.and_then(|m| m.with_input_fact(i, with(1.into())).ok());
        }
        // On the GPU, tract's CUDA runtime optimises the decluttered model its own way.
        let (typed, gpu) = match (placement().used == "cuda").then(gpu) {
            Some(Ok(rt)) => (
                model.into_typed().map_err(load)?.into_decluttered().map_err(load)?,
                Some(rt),
            ),
            _ => (optimised(model.into_typed().map_err(load)?).map_err(load)?, None),
        };
        let mut output_names = vec![];
        let mut output_types = vec![];
        let mut output_dims = vec![];
        let mut problems = vec![];
        for o in typed.output_outlets().map_err(load)? {
            let name: Arc<str> = Arc::from(
                typed
                    .outlet_label(*o)
                    .unwrap_or_else(|| typed.node(o.node).name.as_str()),
            );
            let fact = typed.outlet_fact(*o).map_err(load)?;
            let dt = fact.datum_type;
            output_dims.push(
                fact.shape
                    .iter()
                    .skip(1)
                    .map(|d| d.to_i64().ok().and_then(|v| usize::try_from(v).ok()))
                    .collect(),
            );
            if !dt.is_number() && dt != DatumType::Bool && dt != DatumType::TDim {
                problems.push(Problem::OutputType {
                    name: name.to_string(),
                    dtype: dtype_name(dt),
                });
            }
            output_names.push(name);
            output_types.push(dtype_name(dt));
        }
        if !problems.is_empty() {
            return Err(EngineError::CannotRun(problems));
        }
        let mut direct = None;
        let (plan, device): (Box<dyn Runnable>, &'static str) = match gpu {
            // tract's CUDA runtime panics when it cannot make a context: caught, it is a
            // failure like any other, and the model runs on the CPU.
            Some(rt) => match contained(|| rt.prepare(typed.clone())).and_then(|r| r.map_err(run_error)) {
                Ok(plan) => (plan, "cuda"),
                Err(e) => {
                    tracing::warn!(error = %e, "the model cannot run on the GPU: it runs on the CPU");
                    let plan = optimised(typed).map_err(load)?.into_runnable().map_err(load)?;
                    (Box::new(plan), "cpu")
                }
            },
            None => {
                let plan = typed.into_runnable().map_err(load)?;
                direct = crate::ml::RowChain::of(&plan);
                (Box::new(plan), "cpu")
            }
        };
        let single = single.and_then(
            |m| match m.into_typed().and_then(optimised).and_then(|t| t.into_runnable()) {
                Ok(p) => Some(Plan::new(Box::new(p))),
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "no plan for one sample");
                    None
                }
            },
        );
        let mut engine = Engine {
            plan: Plan::new(plan),
            direct: None,
            single,
            device,
            n_features: shapes.iter().map(|s| s.iter().product::<usize>()).sum(),
            inputs: names
                .into_iter()
                .zip(shapes)
                .map(|(name, shape)| Input {
                    name,
                    shape: shape.clone(),
                })
                .collect(),
            batch_of_one,
            output_names,
            output_types,
            output_dims,
        };
        let trial = trial_rows(engine.n_features);
        let fails = |e: EngineError| EngineError::CannotRun(vec![Problem::Fails(e.to_string())]);
        let whole = engine.run(&trial).map_err(fails)?;
        if let Some(chain) = direct {
            engine.direct = Some(chain);
            match engine.run(&trial) {
                Ok(d) if identical(&d, &whole) => tracing::debug!("runs as a chain of row operators"),
                Ok(_) => {
                    engine.direct = None;
                    tracing::warn!("the row operators' direct path differs from the plan: the plan runs the model");
                }
                Err(e) => {
                    engine.direct = None;
                    tracing::warn!(error = %e, "the row operators' direct path fails: the plan runs the model");
                }
            }
        }
        if let Some(single) = engine.single.take() {
            match engine.choose(single, &trial, &whole) {
                Ok(per_row) => tracing::debug!(per_row, "a plan for one sample"),
                Err(e) => tracing::debug!(error = %e, "no plan for one sample"),
            }
        }
        Ok(engine)
    }

    /// Keep the single-sample plan if it gives the batch plan's outputs on the trial rows:
    /// for one-row calls, or, when warm it runs the trial rows faster one by one (the median of
    /// three timings each way), for every call, in place of the batch plan, which is dropped.
    /// Returns whether it replaced the batch plan.
    fn choose(&mut self, single: Plan, trial: &[Vec<f32>], whole: &Outputs) -> Result<bool, EngineError> {
        let row = |i: usize| trial[i].as_slice();
        let each = |plan: &Plan| self.run_one_by_one(plan, trial.len(), row);
        if !close_outputs(&each(&single)?, whole) {
            return Err(EngineError::Run("its outputs differ from the batch plan's".into()));
        }
        let median = |f: &dyn Fn() -> Result<Outputs, EngineError>| -> Result<std::time::Duration, EngineError> {
            let mut t = vec![];
            for _ in 0..3 {
                let started = std::time::Instant::now();
                f()?;
                t.push(started.elapsed());
            }
            t.sort();
            Ok(t[1])
        };
        let batch = median(&|| self.run_batch(trial.len(), row))?;
        let one_by_one = median(&|| each(&single))?;
        let per_row = one_by_one < batch;
        if per_row {
            self.plan = single;
            self.batch_of_one = true;
        } else {
            self.single = Some(single);
        }
        Ok(per_row)
    }

    /// Whether the model handles missing values: on rows with a NaN in one feature (each
    /// feature in turn, up to 64 of them spread over the row) and on a row of NaN only, every
    /// output is finite. Trees that learned where missing values go, and imputers, do; linear
    /// models and networks do not.
    pub fn handles_missing(&self) -> bool {
        let w = self.n_features;
        let k = w.min(64);
        let mut rows: Vec<Vec<f32>> = (0..k)
            .map(|i| {
                let mut r = vec![0.0; w];
                r[i * w / k] = f32::NAN;
                r
            })
            .collect();
        rows.push(vec![f32::NAN; w]);
        match self.run(&rows) {
            Ok(o) => o.columns().iter().all(|c| c.values.iter().all(|v| v.is_finite())),
            Err(_) => false,
        }
    }

    /// Whether the model runs as a chain of Lathe's row operators, without tract's plan.
    pub fn runs_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Values per row, over every input: a tabular model's feature count.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Where the model runs: `cpu` or `cuda`.
    pub fn device(&self) -> &'static str {
        self.device
    }

    /// The model's inputs, in its order.
    pub fn inputs(&self) -> &[Input] {
        &self.inputs
    }

    pub fn output_names(&self) -> &[Arc<str>] {
        &self.output_names
    }

    /// The model's first input tensor name: a tabular model's one input.
    pub fn input_name(&self) -> &str {
        &self.inputs[0].name
    }

    /// Output names with their element types (`float32`, `int64`, …).
    pub fn outputs(&self) -> Vec<(String, String)> {
        self.output_names
            .iter()
            .map(|n| n.to_string())
            .zip(self.output_types.iter().cloned())
            .collect()
    }

    /// An output's dimensions after the batch axis, when the model declares them all (`[]`
    /// for one value per row).
    pub fn output_dims(&self, name: &str) -> Option<&[usize]> {
        let i = self.output_names.iter().position(|n| &**n == name)?;
        self.output_dims[i].as_deref()
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
        self.run_rows(rows.len(), |i| rows[i].as_slice())
    }

    /// Run rows given back to back in one array of `rows * n_features` values.
    pub fn run_flat(&self, x: &[f32]) -> Result<Outputs, EngineError> {
        let w = self.n_features;
        if !x.len().is_multiple_of(w) {
            return Err(EngineError::Run(format!("{} values do not make rows of {w}", x.len())));
        }
        match &self.direct {
            // Rows back to back are what a chain reads: no copy.
            Some(chain) => self.run_direct(chain, x.len() / w, x),
            None => self.run_rows(x.len() / w, |i| &x[i * w..(i + 1) * w]),
        }
    }

    /// Run `n` rows, row `i` being `row(i)`: as one batch, or one at a time for a model whose
    /// batch axis is fixed to 1 or that runs faster so.
    fn run_rows<'a>(&self, n: usize, row: impl Fn(usize) -> &'a [f32]) -> Result<Outputs, EngineError> {
        if let Some(chain) = &self.direct {
            // One row is read where it is; more are copied into one block.
            let block: Vec<f32>;
            let x = if n == 1 {
                row(0)
            } else {
                let mut all = Vec::with_capacity(n * self.n_features);
                (0..n).for_each(|i| all.extend_from_slice(row(i)));
                block = all;
                &block
            };
            return self.run_direct(chain, n, x);
        }
        if n == 1 || self.batch_of_one {
            self.run_one_by_one(self.single.as_ref().unwrap_or(&self.plan), n, row)
        } else {
            self.run_batch(n, row)
        }
    }

    /// Run `n` rows, back to back in `x`, through the chain of row operators.
    fn run_direct(&self, chain: &crate::ml::RowChain, n: usize, x: &[f32]) -> Result<Outputs, EngineError> {
        if n == 0 {
            return self.run_tensors(&self.plan, tvec![], 0);
        }
        let columns = contained(|| chain.run(x, n))?.map_err(run_error)?;
        Ok(Outputs {
            rows: n,
            columns: self
                .output_names
                .iter()
                .zip(columns)
                .map(|(name, c)| Column {
                    name: name.clone(),
                    width: c.width,
                    values: c.values,
                })
                .collect(),
        })
    }

    /// Run `n` rows as one batch on the batch plan.
    fn run_batch<'a>(&self, n: usize, row: impl Fn(usize) -> &'a [f32]) -> Result<Outputs, EngineError> {
        self.run_tensors(&self.plan, self.input_tensors(n, &row)?, n)
    }

    /// Run `n` rows one at a time on `plan`.
    fn run_one_by_one<'a>(
        &self,
        plan: &Plan,
        n: usize,
        row: impl Fn(usize) -> &'a [f32],
    ) -> Result<Outputs, EngineError> {
        if n == 0 {
            return self.run_tensors(plan, tvec![], 0);
        }
        let mut all = self.run_tensors(plan, self.input_tensors(1, |_| row(0))?, 1)?;
        for i in 1..n {
            let one = self.run_tensors(plan, self.input_tensors(1, |_| row(i))?, 1)?;
            for (c, o) in all.columns.iter_mut().zip(one.columns) {
                if o.width != c.width {
                    return Err(EngineError::Run(format!(
                        "output {:?} has {} values for one row and {} for another",
                        c.name, c.width, o.width
                    )));
                }
                c.values.extend(o.values);
            }
            all.rows += 1;
        }
        Ok(all)
    }

    /// The input tensors `[n, shape…]` of `n` rows, each row holding every input's values.
    fn input_tensors<'a>(&self, n: usize, row: impl Fn(usize) -> &'a [f32]) -> Result<TVec<TValue>, EngineError> {
        let mut out = tvec![];
        let mut offset = 0;
        for input in &self.inputs {
            let k = input.values();
            let mut dims = Vec::with_capacity(input.shape.len() + 1);
            dims.push(n);
            dims.extend_from_slice(&input.shape);
            let mut t = Tensor::zero::<f32>(&dims).map_err(run_error)?;
            if n > 0 {
                let mut plain = t.try_as_plain_ram_mut().map_err(run_error)?;
                let dst = plain.as_slice_mut::<f32>().map_err(run_error)?;
                for (i, d) in dst.chunks_exact_mut(k).enumerate() {
                    d.copy_from_slice(&row(i)[offset..offset + k]);
                }
            }
            out.push(t.into_tvalue());
            offset += k;
        }
        Ok(out)
    }

    fn run_tensors(&self, plan: &Plan, inputs: TVec<TValue>, n: usize) -> Result<Outputs, EngineError> {
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
        let outputs = plan.run(inputs)?;
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

std::thread_local! {
    /// Set while this thread runs a model: a panic there becomes an error, not a crash report.
    static RUNNING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f`, turning a panic inside the engine into an error. Some of tract's operators panic
/// on values they cannot handle (a Gather index out of range); a model that does so fails
/// those rows, as any other inference failure, and the agent carries on. The panic hook is
/// silent for such panics, so that a model failing every reading does not flood the log: the
/// failure is reported where inference failures are, rate-limited.
fn contained<T>(f: impl FnOnce() -> T) -> Result<T, EngineError> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !RUNNING.with(|r| r.get()) {
                previous(info);
            }
        }));
    });
    RUNNING.with(|r| r.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    RUNNING.with(|r| r.set(false));
    result.map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        EngineError::Run(format!("the engine failed on these rows: {why}"))
    })
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

/// The same outputs, bit for bit (NaN included).
fn identical(a: &Outputs, b: &Outputs) -> bool {
    a.rows == b.rows
        && a.columns.len() == b.columns.len()
        && a.columns.iter().zip(&b.columns).all(|(x, y)| {
            x.name == y.name
                && x.width == y.width
                && x.values.len() == y.values.len()
                && x.values.iter().zip(&y.values).all(|(p, q)| p.to_bits() == q.to_bits())
        })
}

/// Whether two runs of the same rows agree, as plans of one model optimised for different
/// batch sizes do: same shapes, values within 1e-5 + 1e-4 relative.
fn close_outputs(a: &Outputs, b: &Outputs) -> bool {
    a.rows == b.rows
        && a.columns.len() == b.columns.len()
        && a.columns.iter().zip(&b.columns).all(|(x, y)| {
            x.width == y.width
                && x.values.len() == y.values.len()
                && x.values
                    .iter()
                    .zip(&y.values)
                    .all(|(p, q)| (p - q).abs() <= 1e-5 + 1e-4 * q.abs() || (p.is_nan() && q.is_nan()))
        })
}

/// A feature value as the agent takes it from a reading: a number finite in float32.
pub fn feature_value(x: f64) -> Option<f32> {
    let v = x as f32;
    v.is_finite().then_some(v)
}

/// The column names in the header row of CSV text.
pub fn csv_header(text: &str) -> Result<Vec<String>, String> {
    let head = text.lines().find(|l| !l.trim().is_empty()).ok_or("no header row")?;
    let header: Vec<String> = head.split(',').map(|c| c.trim().to_string()).collect();
    if header.iter().any(String::is_empty) {
        return Err("line 1: empty column name".into());
    }
    Ok(header)
}

/// Rows from CSV text for a model that takes `features`, in that order.
///
/// The header row names the columns; they are matched to the features by name, in any order,
/// and a missing, extra or repeated column is an error. Every cell must be a number finite in
/// float32, as the agent requires of a reading: `nan` or `inf` is refused, and so is an empty
/// cell (or `null`) unless the model accepts missing values, where it is NaN as a reading's
/// `null` is.
pub fn parse_csv(text: &str, features: &[String], accepts_missing: bool) -> Result<Vec<Vec<f32>>, String> {
    csv_rows(text, features, accepts_missing, false)
}

/// Like [`parse_csv`], for training data: columns that are not features (a target, an id) are
/// skipped.
pub fn parse_training_csv(text: &str, features: &[String], accepts_missing: bool) -> Result<Vec<Vec<f32>>, String> {
    csv_rows(text, features, accepts_missing, true)
}

fn csv_rows(text: &str, features: &[String], accepts_missing: bool, skip_extra: bool) -> Result<Vec<Vec<f32>>, String> {
    let header = csv_header(text)?;
    let mut position = std::collections::HashMap::new();
    for (i, h) in header.iter().enumerate() {
        if position.insert(h.as_str(), i).is_some() {
            return Err(format!("line 1: column {h:?} appears twice"));
        }
    }
    let missing: Vec<&str> = features
        .iter()
        .filter(|f| !position.contains_key(f.as_str()))
        .map(String::as_str)
        .collect();
    let extra: Vec<&str> = header
        .iter()
        .filter(|h| !skip_extra && !features.contains(h))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        let mut parts = vec![];
        if !missing.is_empty() {
            parts.push(format!("no column for feature(s) {}", missing.join(", ")));
        }
        if !extra.is_empty() {
            parts.push(format!("column(s) {} are not features of the model", extra.join(", ")));
        }
        return Err(format!(
            "line 1: {} (the model takes {})",
            parts.join("; "),
            features.join(", ")
        ));
    }
    let order: Vec<usize> = features.iter().map(|f| position[f.as_str()]).collect();
    let mut rows = vec![];
    let lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).skip(1);
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
        let row = order
            .iter()
            .map(|&p| {
                let (c, h) = (cells[p], &header[p]);
                if c.is_empty() || c == "null" {
                    return if accepts_missing {
                        Ok(f32::NAN)
                    } else {
                        Err(format!(
                            "line {}: column {h:?} is empty; this model does not take missing values",
                            i + 1
                        ))
                    };
                }
                let x = c
                    .parse::<f64>()
                    .map_err(|_| format!("line {}: column {h:?}: {c:?} is not a number", i + 1))?;
                feature_value(x).ok_or_else(|| {
                    format!(
                        "line {}: column {h:?}: {c} is not a finite float32 number, which the agent refuses",
                        i + 1
                    )
                })
            })
            .collect::<Result<Vec<f32>, String>>()?;
        rows.push(row);
    }
    Ok(rows)
}

/// Rows a model is tried on before it is accepted: zeros, ones, negatives and a spread of
/// magnitudes, so that a model that cannot run fails at load and not on the first reading.
fn trial_rows(width: usize) -> Vec<Vec<f32>> {
    let spread = |row: usize| -> Vec<f32> {
        (0..width)
            .map(|i| {
                let k = (i * 7 + row * 3) % 11;
                (k as f32 - 5.0) * 10f32.powi((i % 5) as i32 - 2)
            })
            .collect()
    };
    vec![
        vec![0.0; width],
        vec![1.0; width],
        vec![-1.0; width],
        spread(0),
        spread(1),
    ]
}

/// ONNX-style names of element types (symbolic dimensions are int64 at the model's boundary).
fn dtype_name(dt: DatumType) -> String {
    match dt {
        DatumType::TDim => "int64".into(),
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
        model_in("../fixtures/models", name)
    }

    /// A model of a fixtures directory (relative to the crate), its cases and their rows
    /// (`null` as NaN).
    fn model_in(dir: &str, name: &str) -> (Vec<u8>, Value, Vec<Vec<f32>>) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir);
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
                    .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
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
        assert_eq!(
            err.to_string(),
            "model cannot run here: model input \"X\" takes 4 features; 3 were given"
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

    fn csv(text: &str, want: Result<Vec<Vec<f32>>, &str>) {
        let features = ["a".to_string(), "b".to_string()];
        match (parse_csv(text, &features, false), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{text:?}"),
            (Err(got), Err(want)) => assert!(got.contains(want), "{text:?}: {got}"),
            (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn csv_columns_are_matched_by_name_and_cells_must_be_finite() {
        csv("a, b\n1,2.5\n\n-3,4e2\n", Ok(vec![vec![1.0, 2.5], vec![-3.0, 400.0]]));
        // Regression: reordered columns were taken by position and changed the predictions.
        csv("b,a\n2.5,1\n", Ok(vec![vec![1.0, 2.5]]));
        csv(
            "a\n1\n",
            Err("line 1: no column for feature(s) b (the model takes a, b)"),
        );
        csv("a,b,c\n1,2,3\n", Err("column(s) c are not features of the model"));
        csv("a,a,b\n1,2,3\n", Err("column \"a\" appears twice"));
        csv("a,b\n1\n", Err("line 2: 1 values, header has 2"));
        csv("a,b\n1,x\n", Err("line 2: column \"b\": \"x\" is not a number"));
        // Regression: nan, inf and empty cells ran here although the agent refuses them.
        csv(
            "a,b\n1,nan\n",
            Err("line 2: column \"b\": nan is not a finite float32 number"),
        );
        csv("a,b\n1,-inf\n", Err("-inf is not a finite float32 number"));
        csv("a,b\n1,1e39\n", Err("1e39 is not a finite float32 number"));
        csv("a,b\n,1\n", Err("line 2: column \"a\" is empty"));
        let nan = parse_csv("a,b\n,1\nnull,2\n", &["a".into(), "b".into()], true).expect("missing allowed");
        assert!(nan[0][0].is_nan() && nan[1][0].is_nan() && nan[1][1] == 2.0);
        assert!(parse_csv("a,b\nnan,1\n", &["a".into(), "b".into()], true).is_err());
        csv("", Err("no header row"));
        csv(",b\n", Err("empty column name"));
    }

    #[test]
    fn unsupported_operators_are_named_with_their_node() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/unsupported_op.onnx");
        let onnx = std::fs::read(path).expect("fixture model");
        let err = Engine::load(&onnx, 4).expect_err("nobody implements FeatureHasher");
        let msg = err.to_string();
        assert!(
            matches!(&err, EngineError::CannotRun(p) if matches!(p[..], [Problem::Operator(_)])),
            "{msg}"
        );
        assert!(
            msg.contains("com.example.lathe:FeatureHasher") && msg.contains("hash_features"),
            "{msg}"
        );
        let info = inspect(&onnx).expect("inspects");
        assert_eq!(info.unsupported.len(), 1, "{:?}", info.unsupported);
    }

    /// A model that onnxruntime runs but Lathe cannot is refused by load and by inspect, each
    /// with the same reason (regression: a float64 model deployed as healthy and then failed
    /// every reading with `Sigmoid does not support F64`, while inspect listed no problem).
    fn refused(name: &str, width: usize, reason: &str) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../fixtures/models/{name}.onnx"));
        let onnx = std::fs::read(path).expect("fixture model");
        let err = Engine::load(&onnx, width).expect_err(name).to_string();
        assert!(err.contains(reason), "{name}: {err}");
        let info = inspect(&onnx).expect("inspects");
        assert!(
            info.problems.iter().any(|p| p.contains(reason)),
            "{name}: {:?}",
            info.problems
        );
    }

    #[test]
    fn models_that_cannot_run_are_refused_with_their_reason() {
        refused("logreg_f64", 4, "input \"X\" is float64; Lathe feeds float32");
        refused(
            "string_labels",
            4,
            "output \"label\" is string; Lathe supports integer class labels only",
        );
        refused("unsupported_op", 4, "com.example.lathe:FeatureHasher");
        // A DataFrame export's five one-value inputs cannot be one tabular input, and run as
        // a tensor model: inspect finds no problem with them.
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/dataframe_inputs.onnx");
        let onnx = std::fs::read(path).expect("fixture model");
        let err = Engine::load(&onnx, 5).expect_err("five inputs").to_string();
        assert!(
            err.contains("the model has 5 inputs (rms, kurtosis, crest_factor, peak_hz, load) and 1 is described"),
            "{err}"
        );
        let info = inspect(&onnx).expect("inspects");
        assert!(info.problems.is_empty() && info.trial_run, "{:?}", info.problems);
    }

    #[test]
    fn inspect_runs_the_model_it_can() {
        let (onnx, _, _) = fixture("health_mlp");
        let info = inspect(&onnx).expect("inspects");
        assert!(info.problems.is_empty(), "{:?}", info.problems);
        assert!(info.trial_run);
        assert!(TESTED_OPSETS.contains(&info.opset), "{}", info.opset);
    }

    #[test]
    fn models_that_handle_missing_values_are_told_apart() {
        let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/corpus");
        let load = |name: &str| {
            let onnx = std::fs::read(corpus.join(format!("{name}.onnx"))).expect("corpus model");
            let cases: Value =
                serde_json::from_slice(&std::fs::read(corpus.join(format!("{name}.cases.json"))).expect("cases"))
                    .expect("json");
            let width = cases["features"].as_array().expect("features").len();
            Engine::load(&onnx, width).expect(name)
        };
        for (name, handles) in [
            ("hist_gradient_boosting_regressor", true),
            ("pipeline_scaler_imputer_rf", true),
            ("linear_regression", false),
        ] {
            assert_eq!(load(name).handles_missing(), handles, "{name}");
        }
        let (onnx, _, rows) = fixture("vibration_logreg");
        let engine = Engine::load(&onnx, rows[0].len()).expect("loads");
        assert!(!engine.handles_missing(), "a linear model gives NaN for NaN");
    }

    /// Regression: tract panics on a Gather index out of range, which took `lathe model run`
    /// down; a panic in the engine is an inference failure of those rows.
    #[test]
    fn a_panic_in_the_engine_fails_the_rows_and_the_engine_goes_on() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/fails_on_large.onnx");
        let engine = Engine::load(&std::fs::read(path).expect("fixture"), 4).expect("passes its trial rows");
        let err = engine.run(&[vec![25_000.0, 1.0, 1.0, 1.0]]).expect_err("index 2 of 2");
        assert!(err.to_string().contains("the engine failed on these rows"), "{err}");
        let ok = engine.run(&[vec![1.0, 2.0, 3.0, 4.0]]).expect("still runs");
        assert_eq!(ok.row(0)["Y"], vec![4.0]);
    }

    #[test]
    fn trial_rows_have_the_width_and_finite_values() {
        for w in [1, 4, 33] {
            let rows = trial_rows(w);
            assert!(rows.iter().all(|r| r.len() == w && r.iter().all(|v| v.is_finite())));
        }
    }

    /// Every corpus model that runs as a chain of row operators gives, through the chain,
    /// exactly the plan's outputs, bit for bit: in one batch and one row at a time.
    #[test]
    fn row_chains_give_the_plans_outputs_bit_for_bit() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/corpus");
        let index: Vec<Value> =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("corpus index")).expect("json");
        let mut chains = vec![];
        for m in &index {
            let name = m["name"].as_str().expect("name");
            let (onnx, _, rows) = model_in("../fixtures/corpus", name);
            let mut engine = Engine::load(&onnx, rows[0].len()).expect("corpus model loads");
            if !engine.runs_direct() {
                continue;
            }
            let direct = engine.run(&rows).expect("chain runs");
            let one_by_one: Vec<Outputs> = rows
                .iter()
                .map(|r| engine.run(std::slice::from_ref(r)).expect("chain runs"))
                .collect();
            engine.direct = None;
            let planned = engine.run(&rows).expect("plan runs");
            assert!(
                identical(&direct, &planned),
                "{name}: the chain's batch differs from the plan's"
            );
            assert!(
                identical(&Outputs::concat(one_by_one), &planned),
                "{name}: the chain's single rows differ from the plan's batch"
            );
            chains.push(name.to_string());
        }
        // The corpus's estimators of Lathe's own operators: trees, linear models, SVMs, and
        // pipelines of scalers, imputers and normalizers before them.
        for name in [
            "bench_rf_classifier_40",
            "bench_gb_regressor_100",
            "hist_gradient_boosting_classifier_multiclass_nozipmap",
            "xgboost_classifier_binary_zipmap",
            "logreg_multiclass_nozipmap",
            "pipeline_standard_scaler_logreg",
            "pipeline_normalizer_logreg",
            "standard_scaler",
            "svr_rbf",
        ] {
            assert!(
                chains.iter().any(|c| c == name),
                "{name} does not run as a chain; chains: {chains:?}"
            );
        }
    }

    #[test]
    fn garbage_is_a_load_error() {
        let err = Engine::load(b"not an onnx model", 4).expect_err("garbage");
        assert!(matches!(err, EngineError::Load(_)), "{err}");
    }
}
