//! The convolutional fixtures (`fixtures/models/image_cnn` and `signal_cnn`, made by
//! `fixtures/cnn.py`): loaded with Lathe's ONNX loader with a free batch axis, optimised, and
//! run on their `.npy` inputs, whole and one sample at a time; every output must match
//! onnxruntime's within 1e-5 absolute plus 1e-4 relative.

use serde_json::Value;
use std::path::PathBuf;
use tract_onnx::prelude::*;

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models")
}

fn floats(t: &TValue) -> Vec<f32> {
    t.try_as_plain_ram()
        .expect("an output in memory")
        .as_slice::<f32>()
        .expect("float32 output")
        .to_vec()
}

fn check(name: &str) {
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

    let mut model = lathe::ml::onnx()
        .model_for_read(&mut std::io::Cursor::new(&onnx))
        .expect("parse");
    let n = model.symbols.sym("N");
    let mut dims: TVec<TDim> = tvec![n.into()];
    dims.extend(shape[1..].iter().map(|d| TDim::from(*d as i64)));
    model = model.with_input_fact(0, f32::fact(dims).into()).expect("input fact");
    let plan = model.into_optimized().expect("optimise").into_runnable().expect("plan");

    let per_sample: usize = shape[1..].iter().product();
    let batch = shape[0];
    let (out_name, out) = cases["outputs"]
        .as_object()
        .expect("outputs")
        .iter()
        .next()
        .expect("an output");
    let want: Vec<f64> = serde_json::from_value(out["values"].clone()).expect("values");
    let per_out = want.len() / batch;
    let compare = |got: &[f32], want: &[f64], what: &str| {
        assert_eq!(got.len(), want.len(), "{name} {what}: output length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let (g, w) = (*g as f64, *w);
            assert!(
                (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                "{name} {what}: {out_name}[{i}] is {g}, onnxruntime says {w}"
            );
        }
    };

    let whole = Tensor::from_shape(&shape, &inputs.values).expect("tensor");
    let got = plan.run(tvec!(whole.into_tvalue())).expect("run the batch");
    compare(&floats(&got[0]), &want, "batch");

    for s in 0..batch {
        let mut one_shape = shape.clone();
        one_shape[0] = 1;
        let x = &inputs.values[s * per_sample..(s + 1) * per_sample];
        let got = plan
            .run(tvec!(Tensor::from_shape(&one_shape, x).expect("tensor").into_tvalue()))
            .expect("run one sample");
        compare(
            &floats(&got[0]),
            &want[s * per_out..(s + 1) * per_out],
            &format!("sample {s}"),
        );
    }
}

#[test]
fn an_image_cnn_matches_onnxruntime() {
    check("image_cnn");
}

#[test]
fn a_signal_cnn_matches_onnxruntime() {
    check("signal_cnn");
}
