//! The scikit-learn conformance corpus (`fixtures/corpus/`): every model is loaded as the agent
//! loads it and run over its cases; labels must equal onnxruntime's and scores must match within
//! 1e-5 relative (values below 1 compared absolutely at 1e-5).
//! Every model in the corpus must load and match. Models made only of Lathe's row operators run
//! as the agent runs them, without tract's plan (`ml::RowChain`).

use lathe::engine::Engine;
use serde_json::Value;
use std::path::PathBuf;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/corpus")
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn close(got: f64, want: f64) -> bool {
    (got.is_nan() && want.is_nan()) || (got - want).abs() <= 1e-5 * want.abs().max(1.0)
}

/// Check one model; returns the number of cases checked and whether the model ran as a chain
/// of Lathe's row operators (without tract's plan).
fn check(name: &str) -> Result<(usize, bool), String> {
    let dir = corpus();
    let onnx = std::fs::read(dir.join(format!("{name}.onnx"))).map_err(|e| e.to_string())?;
    let cases: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.cases.json"))).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let rows: Vec<Vec<f32>> = cases["rows"]
        .as_array()
        .ok_or("no rows")?
        .iter()
        .map(|r| {
            r.as_array()
                .map(|r| r.iter().map(|v| num(v) as f32).collect())
                .unwrap_or_default()
        })
        .collect();
    let engine = Engine::load(&onnx, rows[0].len()).map_err(|e| format!("load: {e}"))?;
    let batch = engine.run(&rows).map_err(|e| format!("run: {e}"))?;
    let expected = cases["expected"].as_array().ok_or("no expected")?;
    if batch.rows() != rows.len() {
        return Err(format!("{} rows in, {} out", rows.len(), batch.rows()));
    }
    for (i, want) in expected.iter().enumerate() {
        for (out, values) in want.as_object().ok_or("expected row is not an object")? {
            let g = batch
                .column(out)
                .ok_or_else(|| format!("row {i}: no output {out:?} (have {:?})", batch.row(i).keys()))?
                .row(i);
            let w: Vec<f64> = values.as_array().ok_or("values")?.iter().map(num).collect();
            if g.len() != w.len() || !g.iter().zip(&w).all(|(a, b)| close(*a, *b)) {
                return Err(format!(
                    "row {i} ({:?}) output {out}: got {g:?}, onnxruntime {w:?}",
                    cases["rows"][i]
                ));
            }
        }
    }
    Ok((rows.len(), engine.runs_direct()))
}

#[test]
fn corpus_matches_onnxruntime() {
    let index: Vec<Value> =
        serde_json::from_slice(&std::fs::read(corpus().join("index.json")).expect("fixtures/corpus/index.json"))
            .expect("json");
    let (mut checked, mut cases, mut direct, mut failures) = (0, 0, 0, vec![]);
    for m in &index {
        let name = m["name"].as_str().expect("name");
        match check(name) {
            Ok((n, chain)) => {
                checked += 1;
                cases += n;
                direct += usize::from(chain);
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    println!(
        "conformance: {checked} models ({cases} cases) match onnxruntime; {direct} ran as chains of row operators"
    );
    assert!(
        failures.is_empty(),
        "{} model(s) do not match onnxruntime:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(checked, index.len());
    assert!(checked >= 80, "the corpus shrank to {checked} models");
}
