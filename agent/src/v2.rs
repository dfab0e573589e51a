//! The Open Inference Protocol (KServe V2) over REST, as the local API speaks it: the bodies
//! of requests and responses, and how a request becomes rows for a model. No I/O.
//!
//! - JSON only. Tensor data is given as a flat or nested array of numbers, in row-major order;
//!   the binary tensor extension is refused with a clear error.
//! - Every model input is given once, as `[n, …]` with the model's dimensions after the batch
//!   axis, and any numeric datatype (the values are converted to float32, which the engine
//!   runs).
//! - Unknown members (`parameters` and the like) are skipped, never kept.

use crate::deploy::ActiveModel;
use crate::engine::Outputs;
use crate::inference::Rows;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use std::fmt;

/// `POST v2/models/{model}/infer`.
#[derive(Debug, Deserialize)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    pub inputs: Vec<RequestInput>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<u64>,
    pub datatype: String,
    /// Absent when the client sent the tensor in binary (refused).
    #[serde(default)]
    pub data: Option<Data>,
}

#[derive(Debug, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
}

/// Tensor data: every number of a flat or nested array, in order, as float32.
#[derive(Debug, Default)]
pub struct Data(pub Vec<f32>);

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Data, D::Error> {
        let mut out = Vec::new();
        d.deserialize_any(Flatten(&mut out))?;
        Ok(Data(out))
    }
}

/// Appends every number of a (nested) array to its vector.
struct Flatten<'a>(&'a mut Vec<f32>);

impl Flatten<'_> {
    fn push<E: de::Error>(self, v: f64) -> Result<(), E> {
        let x = v as f32;
        if !x.is_finite() {
            return Err(E::custom(format_args!("{v} is outside float32's range")));
        }
        self.0.push(x);
        Ok(())
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of numbers")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(v as f64)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.push(if v { 1.0 } else { 0.0 })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// The numeric datatypes a request may use, all run as float32.
const NUMERIC: [&str; 11] = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64",
];

/// The V2 datatype of an engine output type.
pub fn datatype(engine: &str) -> &'static str {
    match engine {
        "float32" => "FP32",
        "float64" => "FP64",
        "float16" => "FP16",
        "int64" | "tdim" => "INT64",
        "int32" => "INT32",
        "int16" => "INT16",
        "int8" => "INT8",
        "uint8" => "UINT8",
        "uint16" => "UINT16",
        "uint32" => "UINT32",
        "uint64" => "UINT64",
        "bool" => "BOOL",
        _ => "FP64",
    }
}

/// A request's rows for `model`: every input in the model's order, row by row, and the
/// request's id echoed on each row (cut to `max_id` bytes). Returns the rows and their count.
pub fn rows(model: &ActiveModel, req: &mut InferRequest, max_id: usize) -> Result<Rows, String> {
    let inputs = model.engine.inputs();
    let outputs = model.engine.output_names();
    if let Some(bad) = req
        .outputs
        .iter()
        .flatten()
        .find(|o| !outputs.iter().any(|n| **n == *o.name))
    {
        return Err(format!(
            "unknown output {:?}; the model's outputs are {outputs:?}",
            bad.name
        ));
    }
    if let Some(extra) = req.inputs.iter().find(|i| !inputs.iter().any(|m| m.name == i.name)) {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(format!(
            "unknown input {:?}; the model's inputs are {names:?}",
            extra.name
        ));
    }
    let mut given = Vec::with_capacity(inputs.len());
    let mut n = None;
    for m in inputs {
        let mut found = req.inputs.iter_mut().filter(|i| i.name == m.name);
        let (Some(i), None) = (found.next(), found.next()) else {
            return Err(format!("input {:?} must be given exactly once", m.name));
        };
        if !NUMERIC.contains(&i.datatype.as_str()) {
            return Err(format!(
                "input {:?} has datatype {:?}; this model takes numbers ({})",
                m.name,
                i.datatype,
                NUMERIC.join(", ")
            ));
        }
        let want: Vec<u64> = m.shape.iter().map(|d| *d as u64).collect();
        let rows = match i.shape.split_first() {
            Some((rows, rest)) if *rows >= 1 && rest == want.as_slice() => *rows as usize,
            _ => {
                return Err(format!(
                    "input {:?} has shape {:?}; the model takes [n, {}] with n at least 1",
                    m.name,
                    i.shape,
                    want.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
                ))
            }
        };
        if n.is_some_and(|n| n != rows) {
            return Err(format!(
                "input {:?} has {rows} rows, another input {} rows",
                m.name,
                n.unwrap_or(0)
            ));
        }
        n = Some(rows);
        let Some(data) = i.data.take() else {
            return Err(format!(
                "input {:?} has no data: binary tensor data is not supported; send the values as JSON",
                m.name
            ));
        };
        let expected = rows.saturating_mul(m.values());
        if data.0.len() != expected {
            return Err(format!(
                "input {:?} of shape {:?} needs {expected} values; it has {}",
                m.name,
                i.shape,
                data.0.len()
            ));
        }
        given.push((data.0, m.values()));
    }
    let n = n.unwrap_or(0);
    let mut out = Rows::default();
    out.values.reserve(n * given.iter().map(|g| g.1).sum::<usize>());
    for r in 0..n {
        for (data, width) in &given {
            out.values.extend_from_slice(&data[r * width..(r + 1) * width]);
        }
    }
    let id = req.id.as_deref().map(|id| {
        let cut = protocol::messages::echo(id, max_id.max(8));
        RawValue::from_string(serde_json::to_string(&cut).expect("a string serializes")).expect("a JSON string is JSON")
    });
    out.ids = vec![id; n];
    Ok(out)
}

/// `POST …/infer`, answered.
#[derive(Debug, Serialize)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<ResponseOutput>,
}

#[derive(Debug, Serialize)]
pub struct ResponseOutput {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<usize>,
    pub data: OutputData,
}

/// An output's values, written as its datatype says: integers, booleans or floats.
#[derive(Debug)]
pub struct OutputData {
    datatype: &'static str,
    values: Vec<f64>,
}

impl Serialize for OutputData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.values.len()))?;
        for v in &self.values {
            match self.datatype {
                "BOOL" => seq.serialize_element(&(*v != 0.0))?,
                "FP32" | "FP16" => seq.serialize_element(&(*v as f32))?,
                "FP64" => seq.serialize_element(v)?,
                _ if v.fract() == 0.0 && v.abs() < 9.0e18 => seq.serialize_element(&(*v as i64))?,
                _ => seq.serialize_element(v)?,
            }
        }
        seq.end()
    }
}

/// The response to a request whose rows gave `outputs`: every output, or those asked for
/// (checked by [`rows`]).
pub fn response(model: &ActiveModel, req: &InferRequest, outputs: Outputs) -> InferResponse {
    let types = model.engine.outputs();
    let wanted = |name: &str| req.outputs.as_ref().is_none_or(|a| a.iter().any(|o| o.name == name));
    let dtype_of = |name: &str| {
        types
            .iter()
            .find(|(n, _)| n == name)
            .map_or("FP64", |(_, t)| datatype(t))
    };
    let mut out = vec![];
    let (rows, mut columns) = (outputs.rows(), outputs_into_columns(outputs));
    for (name, width, values) in columns.drain(..) {
        if !wanted(&name) {
            continue;
        }
        let mut shape = vec![rows];
        match model.engine.output_dims(&name) {
            Some(dims) if dims.iter().product::<usize>() == width => shape.extend_from_slice(dims),
            _ => shape.push(width),
        }
        let datatype = dtype_of(&name);
        out.push(ResponseOutput {
            name,
            datatype,
            shape,
            data: OutputData { datatype, values },
        });
    }
    InferResponse {
        model_name: model.manifest.name.clone(),
        model_version: model.manifest.version.to_string(),
        id: req.id.clone(),
        outputs: out,
    }
}

fn outputs_into_columns(o: Outputs) -> Vec<(String, usize, Vec<f64>)> {
    o.into_columns()
        .into_iter()
        .map(|c| (c.name.to_string(), c.width, c.values))
        .collect()
}

/// `GET v2/models/{model}`.
#[derive(Debug, Serialize)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: &'static str,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

#[derive(Debug, Serialize)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: &'static str,
    /// -1 for the batch axis and for any dimension the model leaves free.
    pub shape: Vec<i64>,
}

pub fn metadata(model: &ActiveModel) -> ModelMetadata {
    let e = &model.engine;
    ModelMetadata {
        name: model.manifest.name.clone(),
        versions: vec![model.manifest.version.to_string()],
        platform: "onnx_onnxv1",
        inputs: e
            .inputs()
            .iter()
            .map(|i| TensorMetadata {
                name: i.name.clone(),
                datatype: "FP32",
                shape: std::iter::once(-1).chain(i.shape.iter().map(|d| *d as i64)).collect(),
            })
            .collect(),
        outputs: e
            .outputs()
            .into_iter()
            .map(|(name, t)| TensorMetadata {
                shape: match e.output_dims(&name) {
                    Some(dims) => std::iter::once(-1).chain(dims.iter().map(|d| *d as i64)).collect(),
                    None => vec![-1, -1],
                },
                datatype: datatype(&t),
                name,
            })
            .collect(),
    }
}

/// `GET v2`.
#[derive(Debug, Serialize)]
pub struct ServerMetadata {
    pub name: &'static str,
    pub version: &'static str,
    pub extensions: Vec<&'static str>,
}

pub fn server_metadata() -> ServerMetadata {
    ServerMetadata {
        name: "lathe",
        version: env!("CARGO_PKG_VERSION"),
        extensions: vec![],
    }
}

/// An error body: `{"error": "…"}`.
pub fn error_body(message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": message })).expect("an error serializes")
}
