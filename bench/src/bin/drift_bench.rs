//! The cost of drift tracking per prediction, as a share of the cost of the prediction itself,
//! on the 8-feature tree models of the corpus, in one run on one thread.
//!
//! For each model it times, in alternating rounds (median of 7), per row:
//! - inference: the engine on a batch, as the inference task calls it;
//! - window: counting the same rows into the open drift window (every feature and output
//!   against the baseline's bins), the window closed and measured every 1,000 rows, as by
//!   default;
//! - samples: the sampler's checks with the default `[samples]` (rows outside the training
//!   range kept) and the reservoir of rows held for an alert.
//!
//! Usage: lathe-drift-bench [--secs S] [--batch N]

use anyhow::{Context, Result};
use lathe::config::SamplesConfig;
use lathe::drift::Tracker;
use lathe::engine::Engine;
use lathe::samples::Sampler;
use protocol::baseline::{self, OutputValues};
use protocol::messages::ModelRef;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MODELS: &[&str] = &["bench_rf_classifier_40", "bench_gb_regressor_100"];
const ROUNDS: usize = 7;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/corpus")
}

fn time(budget: Duration, f: &mut dyn FnMut()) -> f64 {
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed() < budget || n < 10 {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Rows around the corpus cases: each case row with a deterministic spread, `n` in all.
fn rows(cases: &[Vec<f32>], n: usize) -> Vec<Vec<f32>> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|i| {
            cases[i % cases.len()]
                .iter()
                .map(|v| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let jitter = ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.2;
                    (f64::from(*v) * (1.0 + jitter)) as f32
                })
                .collect()
        })
        .collect()
}

fn main() -> Result<()> {
    let mut secs = 3.0f64;
    let mut batch = 64usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().context("--secs S")?.parse()?,
            "--batch" => batch = args.next().context("--batch N")?.parse()?,
            other => anyhow::bail!("unknown argument {other}; usage: lathe-drift-bench [--secs S] [--batch N]"),
        }
    }
    let budget = Duration::from_secs_f64(secs / ROUNDS as f64);
    println!("drift tracking per prediction, batches of {batch} rows, one thread, median of {ROUNDS} rounds");
    println!("ns per row: the engine's call, the drift window, the sampler; then both as a share of the call");
    println!(
        "{:<26} {:>10} {:>10} {:>10} {:>10}",
        "model", "inference", "window", "samples", "drift/inf"
    );
    for name in MODELS {
        let onnx = std::fs::read(corpus().join(format!("{name}.onnx")))?;
        let cases: Value = serde_json::from_slice(&std::fs::read(corpus().join(format!("{name}.cases.json")))?)?;
        // Missing values (null) are NaN, as a reading's null is for a model that takes them.
        let case_rows: Vec<Vec<f32>> = serde_json::from_value::<Vec<Vec<Option<f32>>>>(cases["rows"].clone())?
            .into_iter()
            .map(|r| r.into_iter().map(|v| v.unwrap_or(f32::NAN)).collect())
            .collect();
        let features: Vec<String> = serde_json::from_value(cases["features"].clone())?;
        let width = features.len();
        let engine = Engine::load(&onnx, width)?;
        // The baseline, as a packer builds it from 5,000 training rows.
        let train = rows(&case_rows, 5000);
        let out = engine.run(&train)?;
        let columns: Vec<Vec<f64>> = (0..width)
            .map(|j| train.iter().map(|r| f64::from(r[j])).collect())
            .collect();
        let outputs = out
            .columns()
            .iter()
            .map(|c| {
                if c.width == 1 && (0..train.len()).all(|i| c.row(i)[0].fract() == 0.0) {
                    OutputValues::Labels {
                        name: c.name.to_string(),
                        values: (0..train.len()).map(|i| c.row(i)[0]).collect(),
                    }
                } else {
                    OutputValues::Scores {
                        name: c.name.to_string(),
                        columns: (0..c.width)
                            .map(|k| (0..train.len()).map(|i| c.row(i)[k]).collect())
                            .collect(),
                    }
                }
            })
            .collect();
        let b = Arc::new(
            baseline::build(&features, &columns, outputs, baseline::DEFAULT_BINS).map_err(anyhow::Error::msg)?,
        );
        let live: Vec<f32> = rows(&case_rows, batch).into_iter().flatten().collect();
        let outputs = engine.run_flat(&live)?;
        // The defaults: windows of 1,000 rows, judged from 500.
        let policy = lathe::config::DriftConfig::default().policy();
        let model = ModelRef {
            name: name.to_string(),
            version: 1,
        };
        let mut tracker = Tracker::new(model, b.clone(), policy, 0);
        let mut sampler = Sampler::new(SamplesConfig::default());
        let mut kept = 0usize;
        let source: Arc<str> = Arc::from("bench");
        let mut infer = || {
            std::hint::black_box(engine.run_flat(std::hint::black_box(&live)).expect("runs"));
        };
        let outside: Vec<bool> = {
            let mut t = Tracker::new(tracker.model.clone(), b.clone(), policy, 0);
            t.add(&live, &outputs, 0);
            t.outside().to_vec()
        };
        // The window: every row counted against the baseline, closed every 1,000 rows.
        let mut windows = || {
            tracker.add(&live, &outputs, 0);
            if tracker.due(0).is_some() {
                std::hint::black_box(tracker.close(0, "count"));
            }
        };
        // The sampler, as the inference task calls it for each row (the window's range flags
        // of the same rows are at hand).
        let mut window_rows = 0;
        let mut samples = || {
            for (i, row) in live.chunks_exact(width).enumerate() {
                if sampler.pick(row, &outputs, i, Some(&b), Some(outside[i])).is_some() {
                    kept += 1;
                }
                sampler.hold(0, &source, row, &outputs, i);
            }
            window_rows += batch;
            if window_rows >= 1000 {
                window_rows = 0;
                std::hint::black_box(sampler.window_closed(false));
            }
        };
        time(budget, &mut infer);
        time(budget, &mut windows);
        time(budget, &mut samples);
        let (mut inf, mut win, mut sam) = (vec![], vec![], vec![]);
        for _ in 0..ROUNDS {
            inf.push(time(budget, &mut infer));
            win.push(time(budget, &mut windows));
            sam.push(time(budget, &mut samples));
        }
        let per_row = |v: Vec<f64>| median(v) / batch as f64 * 1e9;
        let (inf, win, sam) = (per_row(inf), per_row(win), per_row(sam));
        println!(
            "{name:<26} {inf:>10.0} {win:>10.0} {sam:>10.0} {:>9.1}%",
            (win + sam) / inf * 100.0
        );
        std::hint::black_box(kept);
    }
    Ok(())
}
