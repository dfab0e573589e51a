//! The convolutional fixtures of `fixtures/cnn.py`, as the tests read them.
// Each test binary uses part of this module.
#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;

pub fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models")
}

/// A convolutional fixture: the model, its `.npy` inputs (batch axis first), and its one
/// output's name and onnxruntime's values for those inputs, flattened.
pub struct Cnn {
    pub onnx: Vec<u8>,
    pub inputs: lathe::npy::Tensor,
    pub output: String,
    pub want: Vec<f64>,
}

pub fn cnn(name: &str) -> Cnn {
    let dir = models();
    let onnx = std::fs::read(dir.join(format!("{name}.onnx"))).expect("model");
    let inputs = lathe::npy::read_f32(&std::fs::read(dir.join(format!("{name}.inputs.npy"))).expect("inputs"))
        .expect("a float32 .npy");
    let cases: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.cases.json"))).expect("cases")).expect("json");
    let shape: Vec<usize> = serde_json::from_value(cases["input"]["shape"].clone()).expect("shape");
    assert_eq!(
        inputs.shape, shape,
        "{name}: the inputs are the ones the references were made from"
    );
    let (output, out) = cases["outputs"]
        .as_object()
        .expect("outputs")
        .iter()
        .next()
        .expect("an output");
    Cnn {
        onnx,
        inputs,
        output: output.clone(),
        want: serde_json::from_value(out["values"].clone()).expect("values"),
    }
}
