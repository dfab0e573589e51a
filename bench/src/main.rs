//! Lathe's engine against onnxruntime, on the same models, in one run, on one thread.
//!
//! onnxruntime is driven through its C API (the `ort` crate), loading the shared library that
//! the onnxruntime PyPI wheel ships. For each model it measures the mean latency of one-row
//! calls and the throughput of 256-row batches, for Lathe's engine, for onnxruntime and, where
//! stock tract can load the model, for bare tract; and prints Lathe's time divided by
//! onnxruntime's.
//!
//! The engines are timed in alternating rounds (see [`ROUNDS`]) and each figure is the median
//! of its rounds, so that a noisy neighbour on a shared machine slows all of them alike.
//!
//! Tensor models (the convolutional fixtures in `fixtures/models`, `--cnn`) are timed for
//! Lathe's engine, bare tract and onnxruntime; `--nodes` shows where the engine's time goes.
//!
//! Usage: lathe-bench --ort-lib PATH [--secs S] [--cnn] [MODEL ...]   (models by corpus name)
//!        lathe-bench --nodes   (the time of each node of the engine's plan, tensor models)
//! `bench/run.sh` finds the library and runs it.

use anyhow::{bail, Context, Result};
use lathe::engine::Engine;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tract_onnx::prelude::*;

const DEFAULT_MODELS: &[&str] = &[
    "bench_rf_classifier_40",
    "bench_gb_regressor_100",
    "random_forest_regressor",
    "extra_trees_classifier_multiclass_nozipmap",
    "decision_tree_classifier_binary_nozipmap",
    "gradient_boosting_classifier_binary_nozipmap",
    "hist_gradient_boosting_classifier_multiclass_nozipmap",
    "isolation_forest",
    "lightgbm_regressor",
    "xgboost_classifier_binary_nozipmap",
    "logreg_binary_nozipmap",
    "logreg_multiclass_nozipmap",
    "linear_regression",
    "ridge",
    "sgd_classifier_binary_nozipmap",
    "pipeline_standard_scaler_logreg",
    "mlp_classifier_multiclass_nozipmap",
    "mlp_regressor",
];

const BATCH: usize = 256;

/// The tensor models (`fixtures/models/<name>.onnx` with `<name>.inputs.npy`).
const TENSOR_MODELS: &[&str] = &["image_cnn", "signal_cnn"];
/// Samples per batch for tensor models.
const TENSOR_BATCH: usize = 8;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/corpus")
}

/// Rounds each measurement is split into. The rounds of all engines alternate, so that a
/// noisy neighbour slows them alike; each figure is the median of its rounds.
const ROUNDS: usize = 7;

/// Mean seconds per call of `f`, called repeatedly for about `budget`.
fn time(budget: Duration, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed() < budget || n < 10 {
        f()?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() / n as f64)
}

/// Warm every runner up, then time them in alternating rounds; the median per runner.
fn measure(budget: Duration, runners: &mut [&mut dyn FnMut() -> Result<()>]) -> Result<Vec<f64>> {
    let round = budget / ROUNDS as u32;
    for r in runners.iter_mut() {
        time(round, *r)?;
    }
    let mut samples = vec![vec![]; runners.len()];
    for _ in 0..ROUNDS {
        for (r, s) in runners.iter_mut().zip(samples.iter_mut()) {
            s.push(time(round, *r)?);
        }
    }
    Ok(samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect())
}

struct Row {
    name: String,
    ours: (f64, f64),
    ort: (f64, f64),
    tract: Option<(f64, f64)>,
}

fn rows_of(name: &str) -> Result<(Vec<f32>, usize)> {
    let cases: Value = serde_json::from_slice(&std::fs::read(corpus().join(format!("{name}.cases.json")))?)?;
    let rows = cases["rows"].as_array().context("rows")?;
    let width = rows[0].as_array().context("row")?.len();
    // Finite rows only: the point is speed, not edge cases.
    let flat: Vec<Vec<f32>> = rows
        .iter()
        .filter_map(|r| {
            r.as_array().map(|r| {
                r.iter()
                    .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
                    .collect::<Vec<f32>>()
            })
        })
        .filter(|r| r.iter().all(|v| v.is_finite() && v.abs() < 1e6))
        .collect();
    if flat.is_empty() {
        bail!("{name}: no finite rows");
    }
    let batch: Vec<f32> = (0..BATCH).flat_map(|i| flat[i % flat.len()].clone()).collect();
    Ok((batch, width))
}

/// onnxruntime on one thread with all graph optimisations, and the name of its first input.
fn ort_session(path: &Path) -> Result<(std::cell::RefCell<Session>, String)> {
    let session = Session::builder()?
        .with_optimization_level(GraphOptimizationLevel::Level3)?
        .with_intra_threads(1)?
        .with_inter_threads(1)?
        .with_parallel_execution(false)?
        .commit_from_file(path)?;
    let input = session.inputs[0].name.clone();
    Ok((std::cell::RefCell::new(session), input))
}

fn bench(name: &str, budget: Duration) -> Result<Row> {
    let path = corpus().join(format!("{name}.onnx"));
    let onnx = std::fs::read(&path).with_context(|| path.display().to_string())?;
    let (batch, width) = rows_of(name)?;
    let one = &batch[..width];

    // Lathe's engine, exactly as the agent loads it and as the agent calls it.
    let engine = Engine::load(&onnx, width)?;
    let r1: Vec<Vec<f32>> = vec![one.to_vec()];
    let rb: Vec<Vec<f32>> = batch.chunks(width).map(<[f32]>::to_vec).collect();
    let mut ours1 = || engine.run(&r1).map(|_| ()).map_err(Into::into);
    let mut oursb = || engine.run(&rb).map(|_| ()).map_err(Into::into);

    let (session, input) = ort_session(&path)?;
    let ort_run = |data: &[f32], n: usize| -> Result<()> {
        let t = TensorRef::from_array_view(([n, width], data))?;
        let _ = session.borrow_mut().run(ort::inputs![input.as_str() => t])?;
        Ok(())
    };
    let mut ort1 = || ort_run(one, 1);
    let mut ortb = || ort_run(&batch, BATCH);

    // Bare tract, when stock tract can load the model.
    let bare = || -> TractResult<Arc<TypedRunnableModel>> {
        let mut m = tract_onnx::onnx().model_for_read(&mut std::io::Cursor::new(&onnx))?;
        let n = m.symbols.sym("N");
        m = m.with_input_fact(0, f32::fact(tract_onnx::tract_core::dims!(n, width)).into())?;
        m.into_optimized()?.into_runnable()
    };
    let plan = bare().ok();
    let t1 = Tensor::from_shape(&[1, width], one)?;
    let tb = Tensor::from_shape(&[BATCH, width], &batch)?;
    let tract_run = |t: &Tensor| -> Result<()> {
        let plan = plan.as_ref().expect("only timed when tract loads the model");
        plan.run(tvec!(t.clone().into_tvalue()))?;
        Ok(())
    };
    let mut tract1 = || tract_run(&t1);
    let mut tractb = || tract_run(&tb);

    let (ours, ort, tract) = if plan.is_some() {
        let t = measure(
            budget,
            &mut [&mut ours1, &mut ort1, &mut tract1, &mut oursb, &mut ortb, &mut tractb],
        )?;
        ((t[0], t[3]), (t[1], t[4]), Some((t[2], t[5])))
    } else {
        let t = measure(budget, &mut [&mut ours1, &mut ort1, &mut oursb, &mut ortb])?;
        ((t[0], t[2]), (t[1], t[3]), None)
    };
    Ok(Row {
        name: name.into(),
        ours,
        ort,
        tract,
    })
}

/// Lathe's engine, bare tract (its plan optimised for a free batch axis, and one optimised for
/// the batch size of the call) and onnxruntime on a tensor model: one sample per call, and
/// batches of [`TENSOR_BATCH`]. Seconds per call: `[lathe, free, fixed, ort]` for one sample,
/// then for a batch.
fn bench_tensor(name: &str, budget: Duration) -> Result<Vec<f64>> {
    let (path, x) = tensor_fixture(name)?;
    let onnx = std::fs::read(&path).with_context(|| path.display().to_string())?;
    let sample: Vec<usize> = x.shape[1..].to_vec();
    let per: usize = sample.iter().product();
    let n_in = x.shape[0];
    let batch: Vec<f32> = (0..TENSOR_BATCH)
        .flat_map(|i| x.values[(i % n_in) * per..(i % n_in + 1) * per].to_vec())
        .collect();
    let one = &batch[..per];
    let shape = |n: usize| -> Vec<usize> { std::iter::once(n).chain(sample.iter().copied()).collect() };

    let read = || tract_onnx::onnx().model_for_read(&mut std::io::Cursor::new(&onnx));
    let mut m = read()?;
    let n = m.symbols.sym("N");
    let mut dims: TVec<TDim> = tvec![n.into()];
    dims.extend(sample.iter().map(|d| TDim::from(*d as i64)));
    m = m.with_input_fact(0, f32::fact(dims).into())?;
    let plan = m.into_optimized()?.into_runnable()?;
    let fixed = |n: usize| -> Result<Arc<TypedRunnableModel>> {
        read()?
            .with_input_fact(0, f32::fact(shape(n)).into())?
            .into_optimized()?
            .into_runnable()
    };
    let (fixed1, fixedb) = (fixed(1)?, fixed(TENSOR_BATCH)?);
    let engine = lathe::engine::Engine::load_shapes(&onnx, std::slice::from_ref(&sample))?;
    let lathe_run = |x: &[f32]| -> Result<()> {
        engine.run_flat(x)?;
        Ok(())
    };
    let t1 = Tensor::from_shape(&shape(1), one)?;
    let tb = Tensor::from_shape(&shape(TENSOR_BATCH), &batch)?;
    let tract_run = |p: &Arc<TypedRunnableModel>, t: &Tensor| -> Result<()> {
        p.run(tvec!(t.clone().into_tvalue()))?;
        Ok(())
    };

    let (session, input) = ort_session(&path)?;
    let ort_run = |data: &[f32], n: usize| -> Result<()> {
        let t = TensorRef::from_array_view((shape(n), data))?;
        let _ = session.borrow_mut().run(ort::inputs![input.as_str() => t])?;
        Ok(())
    };
    measure(
        budget,
        &mut [
            &mut || lathe_run(one),
            &mut || tract_run(&plan, &t1),
            &mut || tract_run(&fixed1, &t1),
            &mut || ort_run(one, 1),
            &mut || lathe_run(&batch),
            &mut || tract_run(&plan, &tb),
            &mut || tract_run(&fixedb, &tb),
            &mut || ort_run(&batch, TENSOR_BATCH),
        ],
    )
}

/// A convolutional fixture of `fixtures/models`: the model's path and its inputs.
fn tensor_fixture(name: &str) -> Result<(PathBuf, lathe::npy::Tensor)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
    let inputs = lathe::npy::read_files(&[dir.join(format!("{name}.inputs.npy"))]).map_err(anyhow::Error::msg)?;
    let x = inputs.into_iter().next().context("one input file")?;
    Ok((dir.join(format!("{name}.onnx")), x))
}

/// The mean time of each node of the engine's CPU plan for one sample of a tensor model, over
/// `calls` calls: where a model's time goes.
fn node_times(name: &str, calls: u32) -> Result<Vec<(String, Duration)>> {
    let (path, x) = tensor_fixture(name)?;
    let mut shape = x.shape.clone();
    shape[0] = 1;
    let per: usize = shape.iter().product();
    let model = lathe::ml::onnx()
        .model_for_path(&path)?
        .with_input_fact(0, f32::fact(&shape).into())?
        .into_typed()?;
    let plan = tract_onnx::tract_core::plan::SimplePlan::new(lathe::engine::optimised(model)?)?;
    let mut state = tract_onnx::tract_core::plan::SimpleState::new(&plan)?;
    let input = Tensor::from_shape(&shape, &x.values[..per])?;
    let mut times: Vec<(String, Duration)> = plan
        .model()
        .nodes()
        .iter()
        .map(|n| (format!("{} {}", n.op().name(), n.name), Duration::ZERO))
        .collect();
    for _ in 0..calls {
        state.run_plan_with_eval(tvec!(input.clone().into_tvalue()), |ctx, op_state, node, inputs| {
            let started = Instant::now();
            let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
            times[node.id].1 += started.elapsed();
            out
        })?;
    }
    Ok(times.into_iter().map(|(n, d)| (n, d / calls)).collect())
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut lib, mut secs, mut models, mut cnn) = (None::<PathBuf>, 0.5f64, vec![], false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ort-lib" => lib = args.next().map(PathBuf::from),
            "--secs" => secs = args.next().context("--secs needs a value")?.parse()?,
            "--cnn" => cnn = true,
            "--nodes" => {
                for m in TENSOR_MODELS {
                    println!("{m}: mean µs per node of the engine's CPU plan, one sample, 2000 calls");
                    for (node, t) in node_times(m, 2000)? {
                        println!("{:>9.2}  {node}", t.as_secs_f64() * 1e6);
                    }
                }
                return Ok(());
            }
            m => models.push(m.to_string()),
        }
    }
    let lib = lib.context("--ort-lib PATH (libonnxruntime.so from the onnxruntime wheel) is required")?;
    ort::init_from(lib.display().to_string())
        .commit()
        .with_context(|| format!("loading {}", Path::new(&lib).display()))?;
    let budget = Duration::from_secs_f64(secs);
    if cnn {
        println!(
            "one thread; latency = mean of 1-sample calls; throughput = samples/s in {TENSOR_BATCH}-sample batches; median of {ROUNDS} alternating rounds"
        );
        println!("lathe: the agent's engine; tract N: bare tract, plan for a free batch axis; tract {TENSOR_BATCH}/1: plan for the call's batch size; ratio = lathe / onnxruntime");
        println!(
            "{:<12} {:>9} {:>9} {:>9} {:>9} {:>6} | {:>9} {:>9} {:>9} {:>9} {:>6}",
            "model",
            "lathe µs",
            "tract N",
            "tract 1",
            "ort µs",
            "ratio",
            "lathe s/s",
            "tract N",
            "tract 8",
            "ort s/s",
            "ratio"
        );
        for m in TENSOR_MODELS {
            match bench_tensor(m, budget) {
                Ok(t) => {
                    let sps = |s: f64| format!("{:.0}", TENSOR_BATCH as f64 / s);
                    println!(
                        "{m:<12} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>6.2} | {:>9} {:>9} {:>9} {:>9} {:>6.2}",
                        t[0] * 1e6,
                        t[1] * 1e6,
                        t[2] * 1e6,
                        t[3] * 1e6,
                        t[0] / t[3],
                        sps(t[4]),
                        sps(t[5]),
                        sps(t[6]),
                        sps(t[7]),
                        t[4] / t[7]
                    );
                }
                Err(e) => println!("{m:<16} failed: {e:#}"),
            }
        }
        return Ok(());
    }
    if models.is_empty() {
        models = DEFAULT_MODELS.iter().map(|s| s.to_string()).collect();
    }
    println!(
        "one thread; latency = mean of 1-row calls; throughput = 256-row batches; median of {ROUNDS} alternating rounds; ratio = Lathe / onnxruntime"
    );
    println!(
        "{:<48} {:>10} {:>10} {:>10} {:>7} | {:>10} {:>10} {:>10} {:>7}",
        "model", "lathe µs", "ort µs", "tract µs", "ratio", "lathe r/s", "ort r/s", "tract r/s", "ratio"
    );
    for m in &models {
        match bench(m, budget) {
            Ok(r) => {
                let us = |s: f64| format!("{:.1}", s * 1e6);
                let rps = |s: f64| format!("{:.0}", BATCH as f64 / s);
                println!(
                    "{:<48} {:>10} {:>10} {:>10} {:>7.2} | {:>10} {:>10} {:>10} {:>7.2}",
                    r.name,
                    us(r.ours.0),
                    us(r.ort.0),
                    r.tract.map(|t| us(t.0)).unwrap_or_else(|| "n/a".into()),
                    r.ours.0 / r.ort.0,
                    rps(r.ours.1),
                    rps(r.ort.1),
                    r.tract.map(|t| rps(t.1)).unwrap_or_else(|| "n/a".into()),
                    r.ours.1 / r.ort.1,
                );
            }
            Err(e) => println!("{m:<48} failed: {e:#}"),
        }
    }
    Ok(())
}
