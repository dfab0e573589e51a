//! Drift measured by the agent against the same measures computed with numpy and scipy
//! (`fixtures/drift.py`): the baseline built from `train.csv` must have the script's bins,
//! and every case window must give its PSI, KS distance, mean shift, range counts, verdict and
//! label PSI. Feature measures agree within 1e-9; the label PSI within 1e-6 (the labels are
//! tract's and onnxruntime's, which agree on every row here).

use lathe::drift::{Tracker, Verdict, Window};
use lathe::engine::Engine;
use protocol::baseline::{self, Baseline, OutputValues};
use protocol::messages::ModelRef;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn features() -> Vec<String> {
    ["rms", "kurtosis", "crest_factor", "peak_hz"]
        .map(String::from)
        .to_vec()
}

fn rows(name: &str) -> Vec<Vec<f32>> {
    let text = std::fs::read_to_string(dir().join("drift").join(format!("{name}.csv"))).expect("csv");
    lathe::engine::parse_training_csv(&text, &features(), false).expect("rows")
}

fn engine() -> Engine {
    Engine::load(
        &std::fs::read(dir().join("models/vibration_logreg.onnx")).expect("model"),
        4,
    )
    .expect("loads")
}

fn labels(engine: &Engine, rows: &[Vec<f32>]) -> Vec<f64> {
    let out = engine.run(rows).expect("runs");
    let c = out.column("label").expect("label");
    (0..rows.len()).map(|i| c.row(i)[0]).collect()
}

/// The baseline as `lathe-hub bundle pack --baseline train.csv` builds it (features and the
/// label output).
fn build(engine: &Engine) -> Baseline {
    let train = rows("train");
    let columns: Vec<Vec<f64>> = (0..4)
        .map(|j| train.iter().map(|r| f64::from(r[j])).collect())
        .collect();
    let outputs = vec![OutputValues::Labels {
        name: "label".into(),
        values: labels(engine, &train),
    }];
    baseline::build(&features(), &columns, outputs, baseline::DEFAULT_BINS).expect("builds")
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol * want.abs().max(1.0),
        "{what}: agent {got}, scipy {want}"
    );
}

fn window(engine: &Engine, b: &Arc<Baseline>, rows: &[Vec<f32>]) -> Window {
    // The defaults: windows of 1,000 rows, judged from 500.
    let policy = lathe::config::DriftConfig::default().policy();
    let model = ModelRef {
        name: "vibration".into(),
        version: 1,
    };
    let mut t = Tracker::new(model, b.clone(), policy, 0);
    for chunk in rows.chunks(256) {
        let flat: Vec<f32> = chunk.iter().flatten().copied().collect();
        t.add(&flat, &engine.run(chunk).expect("runs"), 0);
    }
    t.close(1, "count")
}

#[test]
fn the_agent_measures_drift_as_numpy_and_scipy_do() {
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir().join("drift/expected.json")).expect("expected")).expect("json");
    let engine = engine();
    let b = build(&engine);
    for (j, f) in b.features.iter().enumerate() {
        let r = &expected["reference"][&f.name];
        let edges: Vec<f64> = serde_json::from_value(r["edges"].clone()).expect("edges");
        let counts: Vec<u64> = serde_json::from_value(r["counts"].clone()).expect("counts");
        assert_eq!(f.dist.edges, edges, "feature {j} {} edges", f.name);
        assert_eq!(f.dist.counts, counts, "feature {} counts", f.name);
        for k in ["mean", "std", "min", "max"] {
            let got = match k {
                "mean" => f.dist.mean,
                "std" => f.dist.std,
                "min" => f.dist.min,
                _ => f.dist.max,
            };
            close(&format!("{} {k}", f.name), got, r[k].as_f64().expect("number"), 1e-9);
        }
    }
    let classes = b.outputs[0].classes.clone().expect("label classes");
    let want: std::collections::BTreeMap<String, u64> =
        serde_json::from_value(expected["labels"].clone()).expect("labels");
    assert_eq!(classes, want, "label counts of the training rows");

    let b = Arc::new(b);
    let cases = expected["cases"].as_object().expect("cases");
    assert!(cases.len() >= 5);
    for (name, case) in cases {
        let w = window(&engine, &b, &rows(name));
        assert_eq!(w.rows, case["rows"].as_u64().expect("rows"));
        for m in &w.features {
            let e = &case["features"][&m.name];
            let num = |k: &str| e[k].as_f64().expect("number");
            close(&format!("{name} {} PSI", m.name), m.psi.expect("psi"), num("psi"), 1e-9);
            close(&format!("{name} {} KS", m.name), m.ks.expect("ks"), num("ks"), 1e-9);
            close(
                &format!("{name} {} mean", m.name),
                m.mean.expect("mean"),
                num("mean"),
                1e-9,
            );
            close(
                &format!("{name} {} mean shift", m.name),
                m.mean_shift.expect("shift"),
                num("mean_shift"),
                1e-9,
            );
            assert_eq!(
                (m.below, m.above),
                (e["below"].as_u64().expect("below"), e["above"].as_u64().expect("above")),
                "{name} {} range counts",
                m.name
            );
            let verdict = serde_json::to_value(m.status).expect("verdict");
            assert_eq!(verdict, e["verdict"], "{name} {}: {:?}", m.name, m.reasons);
        }
        let label = &w.outputs[0];
        close(
            &format!("{name} label PSI"),
            label.psi.expect("psi"),
            case["label_psi"].as_f64().expect("label psi"),
            1e-6,
        );
        let status = serde_json::to_value(w.features.iter().map(|m| m.status).max().unwrap_or(Verdict::FewRows))
            .expect("status");
        assert_eq!(status, case["status"], "{name}");
    }
    assert_eq!(cases["control"]["status"], "ok");
    assert_eq!(cases["peak_recalibrated"]["features"]["peak_hz"]["verdict"], "alert");
}

/// The defaults raise no alert on windows drawn from the training data itself: 400 windows of
/// 1,000 rows resampled from `train.csv` (a fixed generator, so the test is repeatable). The
/// script's own measurement over 2,000 fresh control windows is in `control_rates.json`.
#[test]
fn windows_like_the_training_data_do_not_alert() {
    let engine = engine();
    let b = Arc::new(build(&engine));
    let train = rows("train");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut by_verdict = std::collections::BTreeMap::new();
    for _ in 0..400 {
        let sample: Vec<Vec<f32>> = (0..1000)
            .map(|_| train[(next() % train.len() as u64) as usize].clone())
            .collect();
        let w = window(&engine, &b, &sample);
        *by_verdict.entry(w.status).or_insert(0u32) += 1;
    }
    assert_eq!(by_verdict.get(&Verdict::Alert), None, "{by_verdict:?}");
    assert!(
        by_verdict.get(&Verdict::Warn).copied().unwrap_or(0) <= 4,
        "{by_verdict:?}"
    );
    let rates: Value =
        serde_json::from_slice(&std::fs::read(dir().join("drift/control_rates.json")).expect("rates")).expect("json");
    for r in rates.as_array().expect("array") {
        assert_eq!(r["false_alert_rate"], 0.0, "{r}");
    }
}
