//! Lathe's engine against onnxruntime and compiled trees, on the same models, in one run, on
//! one thread.
//!
//! onnxruntime is driven through its C API (the `ort` crate), loading the shared library that
//! the onnxruntime PyPI wheel ships. The compiled peer is the model's tree ensemble compiled to
//! native code by treelite and tl2cgen, called one row at a time from a small C harness
//! (`bench/compiled/`), where the model is one tree ensemble.
//!
//! For each tabular model it measures one-row calls on one row repeated (the branch predictor
//! learns its path), one-row calls cycling through [`CYCLED`] distinct rows (it cannot), and
//! batches of [`BATCH`] distinct rows; and prints Lathe's time divided by onnxruntime's and by
//! the compiled peer's.
//!
//! The engines are timed in alternating rounds (see [`ROUNDS`]) and each figure is the median
//! of its rounds, so that a noisy neighbour on a shared machine slows all of them alike.
//!
//! Tensor models (the convolutional fixtures in `fixtures/models`, `--cnn`) are timed for
//! Lathe's engine, bare tract and onnxruntime; `--nodes` shows where the engine's time goes.
//!
//! Usage: lathe-bench --ort-lib PATH [--secs S] [--compiled DIR] [--cnn] [MODEL ...]
//!        (models by corpus name; --compiled: build the compiled peer into DIR and time it)
//!        lathe-bench --nodes [MODEL ...]   (the time of each node of the engine's plan: for
//!        a batch of the corpus models named, or for one sample of each tensor model)
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

/// The corpus's tree models (every estimator family, binary, multiclass and regression), then
/// the other families: linear models, a pipeline, SVMs, PCA, MLPs.
const DEFAULT_MODELS: &[&str] = &[
    "bench_rf_classifier_40",
    "bench_gb_regressor_100",
    "decision_tree_classifier_binary_nozipmap",
    "decision_tree_regressor",
    "random_forest_classifier_multiclass_nozipmap",
    "random_forest_regressor",
    "extra_trees_classifier_multiclass_nozipmap",
    "extra_trees_regressor",
    "gradient_boosting_classifier_binary_nozipmap",
    "gradient_boosting_classifier_multiclass_nozipmap",
    "gradient_boosting_regressor",
    "hist_gradient_boosting_classifier_binary_nozipmap",
    "hist_gradient_boosting_classifier_multiclass_nozipmap",
    "hist_gradient_boosting_regressor",
    "lightgbm_classifier_binary_nozipmap",
    "lightgbm_classifier_multiclass_nozipmap",
    "lightgbm_regressor",
    "xgboost_classifier_binary_nozipmap",
    "xgboost_classifier_multiclass_nozipmap",
    "xgboost_regressor",
    "isolation_forest",
    "logreg_binary_nozipmap",
    "logreg_multiclass_nozipmap",
    "linear_regression",
    "ridge",
    "sgd_classifier_binary_nozipmap",
    "pipeline_standard_scaler_logreg",
    "svr_rbf",
    "pca",
    "pipeline_scaler_pca_svc",
    "mlp_classifier_multiclass_nozipmap",
    "mlp_regressor",
];

const BATCH: usize = 256;

/// Distinct rows a cycled one-row measurement goes through; the first [`BATCH`] make the batch.
const CYCLED: usize = 4096;

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

/// A runner: given a time budget, calls its engine for about that long and returns the mean
/// seconds per call.
type Runner<'a> = Box<dyn FnMut(Duration) -> Result<f64> + 'a>;

/// Mean seconds per call of `f`, called for about `budget`: in blocks that double until a
/// block takes a millisecond, so that reading the clock adds nothing measurable to a call.
fn time(budget: Duration, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let (start, mut calls, mut block) = (Instant::now(), 0u64, 1u64);
    loop {
        let t0 = Instant::now();
        for _ in 0..block {
            f()?;
        }
        calls += block;
        if t0.elapsed() < Duration::from_millis(1) {
            block *= 2;
        }
        if start.elapsed() >= budget && calls >= 10 {
            return Ok(start.elapsed().as_secs_f64() / calls as f64);
        }
    }
}

/// A runner of an in-process call.
fn runner<'a>(mut f: impl FnMut() -> Result<()> + 'a) -> Runner<'a> {
    Box::new(move |budget| time(budget, &mut f))
}

/// Warm every runner up, then time them in alternating rounds; the median per runner.
fn measure(budget: Duration, runners: &mut [Runner<'_>]) -> Result<Vec<f64>> {
    let round = budget / ROUNDS as u32;
    for r in runners.iter_mut() {
        r(round)?;
    }
    let mut samples = vec![vec![]; runners.len()];
    for _ in 0..ROUNDS {
        for (r, s) in runners.iter_mut().zip(samples.iter_mut()) {
            s.push(r(round)?);
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

/// One tabular model's figures: seconds per call of one repeated row, of one row cycled
/// through [`CYCLED`] distinct rows, and of a batch of [`BATCH`] rows.
struct Row {
    name: String,
    lathe: [f64; 3],
    ort: [f64; 3],
    /// The compiled peer, when the model is one tree ensemble it could compile.
    compiled: Option<[f64; 3]>,
}

/// The distinct rows of the model's corpus cases with only finite values (the point is speed,
/// not edge cases), then rows made from them up to [`CYCLED`] distinct rows: each feature of a
/// made row is that feature of a corpus row drawn at random (seeded by the model's name, so
/// every run and every engine sees the same rows). Each feature keeps its values and their
/// spread; the branch predictor cannot learn a path per row.
fn cycled_rows(name: &str) -> Result<(Vec<Vec<f32>>, usize)> {
    let cases: Value = serde_json::from_slice(&std::fs::read(corpus().join(format!("{name}.cases.json")))?)?;
    let corpus_rows = cases["rows"].as_array().context("rows")?;
    let width = corpus_rows[0].as_array().context("row")?.len();
    let mut seen = std::collections::HashSet::new();
    let mut rows: Vec<Vec<f32>> = corpus_rows
        .iter()
        .filter_map(|r| {
            r.as_array().map(|r| {
                r.iter()
                    .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
                    .collect::<Vec<f32>>()
            })
        })
        .filter(|r: &Vec<f32>| r.len() == width && r.iter().all(|v| v.is_finite() && v.abs() < 1e6))
        .filter(|r| seen.insert(bits(r)))
        .collect();
    if rows.is_empty() {
        bail!("{name}: no finite rows");
    }
    let base = rows.len();
    // xorshift64*, seeded with the FNV-1a hash of the name.
    let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    let mut draw = |n: usize| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    };
    // Few features with few values may not make CYCLED distinct rows; stop trying after a while.
    let mut tries = 0;
    while rows.len() < CYCLED && tries < 50 * CYCLED {
        tries += 1;
        let row: Vec<f32> = (0..width).map(|f| rows[draw(base)][f]).collect();
        if seen.insert(bits(&row)) {
            rows.push(row);
        }
    }
    if rows.len() < BATCH {
        bail!(
            "{name}: only {} distinct rows, fewer than a batch of {BATCH}",
            rows.len()
        );
    }
    Ok((rows, width))
}

fn bits(row: &[f32]) -> Vec<u32> {
    row.iter().map(|v| v.to_bits()).collect()
}

/// The rows as the compiled peer's harness reads them: rows and features as two
/// little-endian u32, then the values as little-endian f32.
fn rows_file(rows: &[Vec<f32>], width: usize) -> Result<tempfile::NamedTempFile> {
    let mut bytes = Vec::with_capacity(8 + rows.len() * width * 4);
    bytes.extend_from_slice(&u32::try_from(rows.len())?.to_le_bytes());
    bytes.extend_from_slice(&u32::try_from(width)?.to_le_bytes());
    for v in rows.iter().flatten() {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let mut file = tempfile::NamedTempFile::new()?;
    std::io::Write::write_all(&mut file, &bytes)?;
    Ok(file)
}

/// The compiled peer: its harness, run for about the budget in one of its modes (`repeat`,
/// `cycle`, `batch`), prints the mean seconds per call.
fn harness_runner<'a>(harness: &'a Path, rows: &'a Path, mode: &'static str) -> Runner<'a> {
    Box::new(move |budget| {
        let out = std::process::Command::new(harness)
            .arg("time")
            .arg(rows)
            .arg(mode)
            .arg(budget.as_secs_f64().to_string())
            .output()
            .with_context(|| format!("running {}", harness.display()))?;
        if !out.status.success() {
            bail!("{}: {}", harness.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .parse()
            .with_context(|| format!("{}: printed {text:?}", harness.display()))
    })
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

fn bench(name: &str, budget: Duration, compiled: Option<&Path>) -> Result<Row> {
    let path = corpus().join(format!("{name}.onnx"));
    let onnx = std::fs::read(&path).with_context(|| path.display().to_string())?;
    let (rows, width) = cycled_rows(name)?;
    let flat: Vec<f32> = rows.concat();
    let (rows, flat) = (&rows, &flat);

    // Lathe's engine, exactly as the agent loads it and as the agent calls it: rows back to
    // back in one array (`run_flat`).
    let engine = Engine::load(&onnx, width)?;
    let engine = &engine;
    let (session, input) = ort_session(&path)?;
    let ort_run = |data: &[f32], n: usize| -> Result<()> {
        let t = TensorRef::from_array_view(([n, width], data))?;
        let _ = session.borrow_mut().run(ort::inputs![input.as_str() => t])?;
        Ok(())
    };
    let ort_run = &ort_run;
    let harness = compiled.map(|d| d.join(name).join("harness")).filter(|h| h.exists());
    let file = harness.as_ref().map(|_| rows_file(rows, width)).transpose()?;

    // One row per call, each call the next of the distinct rows.
    let (mut a, mut b) = (0, 0);
    let lathe_cycled = move || {
        a = (a + 1) % rows.len();
        engine
            .run_flat(&flat[a * width..][..width])
            .map(|_| ())
            .map_err(Into::into)
    };
    let ort_cycled = move || {
        b = (b + 1) % rows.len();
        ort_run(&flat[b * width..][..width], 1)
    };
    let peer = harness.as_deref().zip(file.as_ref().map(|f| f.path()));
    let compiled = |mode| peer.map(|(h, f)| harness_runner(h, f, mode));
    // Per measurement (repeated, cycled, batch): Lathe, onnxruntime, then the compiled peer.
    let mut runners: Vec<Runner<'_>> = vec![
        runner(move || engine.run_flat(&flat[..width]).map(|_| ()).map_err(Into::into)),
        runner(move || ort_run(&flat[..width], 1)),
    ];
    runners.extend(compiled("repeat"));
    runners.push(runner(lathe_cycled));
    runners.push(runner(ort_cycled));
    runners.extend(compiled("cycle"));
    runners.push(runner(move || {
        engine.run_flat(&flat[..BATCH * width]).map(|_| ()).map_err(Into::into)
    }));
    runners.push(runner(move || ort_run(&flat[..BATCH * width], BATCH)));
    runners.extend(compiled("batch"));
    let t = measure(budget, &mut runners)?;
    let per = 2 + usize::from(peer.is_some());
    let at = |engine: usize| [t[engine], t[per + engine], t[2 * per + engine]];
    Ok(Row {
        name: name.into(),
        lathe: at(0),
        ort: at(1),
        compiled: peer.map(|_| at(2)),
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
    let (lathe_run, tract_run, ort_run) = (&lathe_run, &tract_run, &ort_run);
    let (batch, plan, fixed1, fixedb, t1, tb) = (&batch, &plan, &fixed1, &fixedb, &t1, &tb);
    let times = measure(
        budget,
        &mut [
            runner(move || lathe_run(one)),
            runner(move || tract_run(plan, t1)),
            runner(move || tract_run(fixed1, t1)),
            runner(move || ort_run(one, 1)),
            runner(move || lathe_run(batch)),
            runner(move || tract_run(plan, tb)),
            runner(move || tract_run(fixedb, tb)),
            runner(move || ort_run(batch, TENSOR_BATCH)),
        ],
    );
    times
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
        .with_input_fact(0, f32::fact(&shape).into())?;
    plan_node_times(model, Tensor::from_shape(&shape, &x.values[..per])?, calls)
}

/// The same for a corpus model, on a batch of [`BATCH`] of its rows, through the plan the
/// engine makes for it (a free batch axis).
fn corpus_node_times(name: &str, calls: u32) -> Result<Vec<(String, Duration)>> {
    let (rows, width) = cycled_rows(name)?;
    let mut model = lathe::ml::onnx().model_for_path(corpus().join(format!("{name}.onnx")))?;
    let n = model.symbols.sym("N");
    model = model.with_input_fact(0, f32::fact([TDim::from(n), TDim::from(width as i64)]).into())?;
    let batch = Tensor::from_shape(&[BATCH, width], &rows[..BATCH].concat())?;
    plan_node_times(model, batch, calls)
}

fn plan_node_times(model: InferenceModel, input: Tensor, calls: u32) -> Result<Vec<(String, Duration)>> {
    let plan = tract_onnx::tract_core::plan::SimplePlan::new(lathe::engine::optimised(model.into_typed()?)?)?;
    let mut state = tract_onnx::tract_core::plan::SimpleState::new(&plan)?;
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
    let (mut compiled, mut nodes) = (None::<PathBuf>, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ort-lib" => lib = args.next().map(PathBuf::from),
            "--secs" => secs = args.next().context("--secs needs a value")?.parse()?,
            "--cnn" => cnn = true,
            "--compiled" => compiled = Some(args.next().context("--compiled needs a directory")?.into()),
            "--nodes" => nodes = true,
            m => models.push(m.to_string()),
        }
    }
    if nodes {
        let print = |times: Vec<(String, Duration)>| {
            for (node, t) in times {
                println!("{:>9.2}  {node}", t.as_secs_f64() * 1e6);
            }
        };
        for m in &models {
            println!("{m}: mean µs per node of the engine's plan, a batch of {BATCH} rows, 1000 calls");
            print(corpus_node_times(m, 1000)?);
        }
        if models.is_empty() {
            for m in TENSOR_MODELS {
                println!("{m}: mean µs per node of the engine's CPU plan, one sample, 2000 calls");
                print(node_times(m, 2000)?);
            }
        }
        return Ok(());
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
    if let Some(dir) = &compiled {
        build_compiled(dir, &models)?;
    }
    println!(
        "one thread; median of {ROUNDS} alternating rounds; ns per row: one-row calls on one row repeated, one-row calls cycling through {CYCLED} distinct rows, {BATCH}-row batches of distinct rows"
    );
    println!("compiled: the model's trees compiled to C by treelite + tl2cgen, cc -O3, called one row at a time from a C harness");
    println!(
        "{:<54} | {:>24} | {:>24} | {:>24}",
        "", "one row, repeated", "one row, cycled", "batch, per row"
    );
    println!(
        "{:<54} | {:>7} {:>7} {:>8} | {:>7} {:>7} {:>8} | {:>7} {:>7} {:>8}",
        "model", "lathe", "ort", "compiled", "lathe", "ort", "compiled", "lathe", "ort", "compiled"
    );
    let mut done = vec![];
    for m in &models {
        match bench(m, budget, compiled.as_deref()) {
            Ok(r) => {
                let ns = |s: f64, i: usize| format!("{:.0}", s * 1e9 / if i == 2 { BATCH as f64 } else { 1.0 });
                let cell = |i: usize| {
                    format!(
                        "{:>7} {:>7} {:>8}",
                        ns(r.lathe[i], i),
                        ns(r.ort[i], i),
                        r.compiled.map(|c| ns(c[i], i)).unwrap_or_else(|| "n/a".into())
                    )
                };
                println!("{:<54} | {} | {} | {}", r.name, cell(0), cell(1), cell(2));
                done.push(r);
            }
            Err(e) => println!("{m:<54} failed: {e:#}"),
        }
    }
    println!();
    println!("ratios: Lathe's time / onnxruntime's, / the compiled peer's (below 1: Lathe is faster);");
    println!("per call: Lathe's one repeated row less its time per row in a batch, ns (the fixed cost of a call)");
    println!(
        "{:<54} | {:>15} | {:>15} | {:>15} | {:>8}",
        "", "repeated", "cycled", "batch", ""
    );
    println!(
        "{:<54} | {:>7} {:>7} | {:>7} {:>7} | {:>7} {:>7} | {:>8}",
        "model", "/ort", "/comp", "/ort", "/comp", "/ort", "/comp", "per call"
    );
    for r in &done {
        let cell = |i: usize| {
            format!(
                "{:>7.2} {:>7}",
                r.lathe[i] / r.ort[i],
                r.compiled
                    .map(|c| format!("{:.2}", r.lathe[i] / c[i]))
                    .unwrap_or_else(|| "n/a".into())
            )
        };
        let per_call = (r.lathe[0] - r.lathe[2] / BATCH as f64) * 1e9;
        println!(
            "{:<54} | {} | {} | {} | {per_call:>8.0}",
            r.name,
            cell(0),
            cell(1),
            cell(2)
        );
    }
    Ok(())
}

/// Builds the compiled peer for the models into `dir` (`bench/compiled/build.sh`: treelite,
/// tl2cgen and the system C compiler). A model it cannot compile is named, with why.
fn build_compiled(dir: &Path, models: &[String]) -> Result<()> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("compiled/build.sh");
    let status = std::process::Command::new(&script)
        .arg(dir)
        .args(models)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!(
            "{} failed ({status}): the compiled peer could not be built",
            script.display()
        );
    }
    Ok(())
}
