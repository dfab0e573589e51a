//! The convolutional fixtures (`fixtures/models/image_cnn` and `signal_cnn`, made by
//! `fixtures/cnn.py`): loaded by Lathe's engine for their tensor shapes with a free batch axis,
//! and run on their `.npy` inputs, whole and one sample at a time; every output must match
//! onnxruntime's within 1e-5 absolute plus 1e-4 relative. The image readings of
//! `fixtures/images/` (made by `fixtures/images.py`) decode to Pillow's pixels and, through
//! the bundle's preprocessing, give onnxruntime's outputs.

mod common;

use common::{cnn, models};
use serde_json::Value;
use std::path::PathBuf;

fn check(name: &str) {
    let common::Cnn {
        onnx,
        inputs,
        output: out_name,
        want,
    } = cnn(name);
    let shape = inputs.shape.clone();

    let engine = lathe::engine::Engine::load_shapes(&onnx, &[shape[1..].to_vec()]).expect("the engine loads it");
    let per_sample: usize = shape[1..].iter().product();
    let batch = shape[0];
    let per_out = want.len() / batch;
    let compare = |got: &[f64], want: &[f64], what: &str| {
        assert_eq!(got.len(), want.len(), "{name} {what}: output length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let (g, w) = (*g, *w);
            assert!(
                (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                "{name} {what}: {out_name}[{i}] is {g}, onnxruntime says {w}"
            );
        }
    };

    let got = engine.run_flat(&inputs.values).expect("run the batch");
    compare(&got.columns()[0].values, &want, "batch");

    for s in 0..batch {
        let x = &inputs.values[s * per_sample..(s + 1) * per_sample];
        let got = engine.run_flat(x).expect("run one sample");
        compare(
            &got.columns()[0].values,
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

/// How far Lathe's JPEG decoder's pixels may be from Pillow's (libjpeg-turbo): IDCT and chroma
/// upsampling round differently. Measured on the fixtures: at most 3 levels.
const JPEG_LEVELS: i32 = 4;
/// How far a JPEG's probabilities may then be from onnxruntime's on Pillow's pixels. Measured on
/// the fixtures: under 0.001.
const JPEG_OUTPUTS: f64 = 0.005;

#[test]
fn image_readings_decode_and_preprocess_as_onnxruntime_saw_them() {
    use protocol::bundle::ImageSchema;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/images");
    let doc: Value = serde_json::from_slice(&std::fs::read(dir.join("cases.json")).expect("cases")).expect("json");
    let schema: ImageSchema = serde_json::from_value(doc["image"].clone()).expect("image schema");
    let plan = schema.plan(&[3, 64, 64]).expect("fits the model's input");
    let onnx = std::fs::read(models().join("image_cnn.onnx")).expect("model");
    let engine = lathe::engine::Engine::load_shapes(&onnx, &[vec![3, 64, 64]]).expect("loads");
    let cases = doc["cases"].as_array().expect("cases");
    assert!(cases.len() >= 5);
    let probabilities = |rgb: &lathe::image::Rgb| {
        let mut x = vec![0f32; 3 * 64 * 64];
        lathe::image::to_tensor(rgb, &plan, &mut x);
        engine.run_flat(&x).expect("runs").columns()[0].values.clone()
    };
    let (mut worst_levels, mut worst_output) = (0, 0f64);
    for case in cases {
        let file = case["file"].as_str().expect("file");
        let want: Vec<f64> = serde_json::from_value(case["probabilities"].clone()).expect("probabilities");
        // The lossless file holds the very pixels onnxruntime saw: the outputs match.
        let lossless = lathe::image::decode(
            &std::fs::read(dir.join(case["lossless"].as_str().expect("lossless"))).expect("image"),
            1 << 20,
        )
        .expect("decodes");
        assert_eq!(
            [lossless.height, lossless.width],
            [
                case["size"][0].as_u64().expect("a number") as usize,
                case["size"][1].as_u64().expect("a number") as usize
            ],
            "{file}"
        );
        assert_eq!(
            protocol::sha256_hex(&lossless.pixels),
            case["rgb_sha256"].as_str().expect("a string"),
            "{file}: the pixels differ from the ones onnxruntime saw"
        );
        for (g, w) in probabilities(&lossless).iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                "{file}: {g} where onnxruntime gave {w}"
            );
        }
        // The JPEG itself: pixels and outputs within the decoders' rounding.
        let rgb = lathe::image::decode(&std::fs::read(dir.join(file)).expect("image"), 1 << 20).expect("decodes");
        let levels = rgb
            .pixels
            .iter()
            .zip(&lossless.pixels)
            .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
            .max()
            .unwrap_or(0);
        let output = probabilities(&rgb)
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f64, f64::max);
        assert!(
            levels <= JPEG_LEVELS,
            "{file}: a pixel is {levels} levels from Pillow's"
        );
        assert!(
            output <= JPEG_OUTPUTS,
            "{file}: a probability is {output} from onnxruntime's"
        );
        worst_levels = worst_levels.max(levels);
        worst_output = worst_output.max(output);
    }
    println!("JPEG against Pillow: at most {worst_levels} levels per pixel, {worst_output:.5} per probability");
}

/// A model exported with a batch of 1 runs any number of rows, one at a time, with the outputs
/// of the same model with a free batch.
#[test]
fn a_model_with_a_batch_of_one_runs_its_rows_one_at_a_time() {
    let onnx = std::fs::read(models().join("signal_cnn_b1.onnx")).expect("model");
    let engine = lathe::engine::Engine::load_shapes(&onnx, &[vec![1, 1024]]).expect("loads");
    let common::Cnn { inputs, want, .. } = cnn("signal_cnn");
    let got = engine.run_flat(&inputs.values).expect("four rows");
    assert_eq!(got.rows(), 4);
    for (g, w) in got.columns()[0].values.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 + 1e-4 * w.abs(), "{g} vs {w}");
    }
}

/// The check names what does not fit: a shape other than the declared one, a rank, the number
/// of inputs.
#[test]
fn tensor_shapes_that_do_not_fit_the_model_are_refused_with_the_reason() {
    let dir = models();
    let onnx = std::fs::read(dir.join("image_cnn.onnx")).expect("model");
    let refused = |shapes: &[Vec<usize>], why: &str| {
        let e = lathe::engine::Engine::load_shapes(&onnx, shapes)
            .expect_err(why)
            .to_string();
        assert!(e.contains(why), "{shapes:?}: {e}");
    };
    refused(
        &[vec![3, 32, 32]],
        "input \"image\" is declared [?, 3, 64, 64]; it is described as [N, 3, 32, 32]",
    );
    refused(
        &[vec![12288]],
        "input \"image\" has rank 4; it is described with rank 2",
    );
    refused(
        &[vec![3, 64, 64], vec![2]],
        "the model has 1 input (image) and 2 are described",
    );
    // A tabular description of a tensor model says so in a tabular user's words.
    let logreg = std::fs::read(dir.join("vibration_logreg.onnx")).expect("model");
    let e = lathe::engine::Engine::load(&logreg, 3).expect_err("3 of 4").to_string();
    assert!(e.contains("model input \"X\" takes 4 features; 3 were given"), "{e}");
    // Five one-value inputs (a DataFrame export) run as a tensor model of five inputs.
    let frame = std::fs::read(dir.join("dataframe_inputs.onnx")).expect("model");
    let engine = lathe::engine::Engine::load_shapes(&frame, &vec![vec![1]; 5]).expect("five inputs");
    assert_eq!(engine.inputs().len(), 5);
    assert_eq!(engine.n_features(), 5);
    let e = lathe::engine::Engine::load(&frame, 5)
        .expect_err("one tabular input")
        .to_string();
    assert!(e.contains("the model has 5 inputs"), "{e}");
}
