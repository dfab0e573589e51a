//! Where models run (`engine.device`, SPEC-free: a property of the box). Asked for the GPU, a
//! build with the `cuda` feature on a box with a usable GPU runs the convolutional fixtures
//! there, and they match onnxruntime; on a box without one (CI) it falls back to the CPU and says
//! why; a build without the feature runs on the CPU and says it has no GPU support. Either way
//! the agent never fails to start for want of a GPU.
//!
//! One test in its own binary: the placement is decided once per process.

mod common;

use lathe::engine::{place, Device, Engine};

#[test]
fn models_run_on_the_gpu_or_fall_back_to_the_cpu_and_say_why() {
    let p = place(Device::Cuda).clone();
    match (p.used.as_str(), &p.reason) {
        ("cuda", None) => println!("models run on the GPU"),
        ("cpu", Some(why)) if cfg!(feature = "cuda") => {
            println!("no GPU: {why}");
            // The runtime is in the build; only the box lacks a GPU.
            assert!(
                !why.contains("built without") && !why.contains("not registered"),
                "{why}"
            );
        }
        ("cpu", Some(why)) => assert!(why.contains("built without GPU support"), "{why}"),
        other => panic!("unexpected placement {other:?}"),
    }
    assert_eq!(place(Device::Cpu), &p, "the first placement stays");

    for name in ["image_cnn", "signal_cnn"] {
        let common::Cnn {
            onnx, inputs: x, want, ..
        } = common::cnn(name);
        let engine = Engine::load_shapes(&onnx, &[x.shape[1..].to_vec()]).expect("loads");
        println!("{name} runs on the {}", engine.device());
        if p.used == "cpu" {
            assert_eq!(engine.device(), "cpu");
        }
        let got = engine.run_flat(&x.values).expect("runs");
        // A GPU sums in another order (and may use TF32): a looser bound than the CPU's.
        let (abs, rel) = if engine.device() == "cuda" {
            (1e-3, 1e-2)
        } else {
            (1e-5, 1e-4)
        };
        for (g, w) in got.columns()[0].values.iter().zip(&want) {
            assert!(
                (g - w).abs() <= abs + rel * w.abs(),
                "{name}: {g} where onnxruntime gave {w}"
            );
        }
    }
}
