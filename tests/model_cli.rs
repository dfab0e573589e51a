//! `lathe model run` over the whole scikit-learn corpus: the real binary, a CSV in, one JSON
//! object per row out, compared with onnxruntime's outputs.

use lathe_e2e::*;
use serde_json::Value;
use std::process::Command;

fn close(got: f64, want: f64) -> bool {
    (got.is_nan() && want.is_nan()) || (got - want).abs() <= 1e-5 * want.abs().max(1.0)
}

#[test]
fn every_corpus_model_runs_through_lathe_model_run() {
    let corpus = repo_root().join("fixtures/corpus");
    let index: Vec<Value> =
        serde_json::from_slice(&std::fs::read(corpus.join("index.json")).expect("index")).expect("json");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut failures = vec![];
    for m in &index {
        let name = m["name"].as_str().expect("name");
        let cases: Value =
            serde_json::from_slice(&std::fs::read(corpus.join(format!("{name}.cases.json"))).expect("cases"))
                .expect("json");
        let features: Vec<String> = serde_json::from_value(cases["features"].clone()).expect("features");
        let mut csv = features.join(",") + "\n";
        for row in cases["rows"].as_array().expect("rows") {
            let cells: Vec<String> = row
                .as_array()
                .expect("row")
                .iter()
                .map(|v| v.as_f64().map(|f| format!("{f:?}")).unwrap_or_else(|| "nan".into()))
                .collect();
            csv += &(cells.join(",") + "\n");
        }
        let csv_path = dir.path().join(format!("{name}.csv"));
        std::fs::write(&csv_path, csv).expect("write csv");
        let (code, out, err) = run(Command::new(&bins().0)
            .args(["model", "run", "--json", "--input"])
            .arg(&csv_path)
            .arg(corpus.join(format!("{name}.onnx"))));
        if code != 0 {
            failures.push(format!("{name}: exit {code}: {err}"));
            continue;
        }
        let lines: Vec<&str> = out.lines().collect();
        let expected = cases["expected"].as_array().expect("expected");
        if lines.len() != expected.len() {
            failures.push(format!("{name}: {} rows out, {} expected", lines.len(), expected.len()));
            continue;
        }
        'rows: for (i, (line, want)) in lines.iter().zip(expected).enumerate() {
            let got: Value = serde_json::from_str(line).expect("each line is JSON");
            for (output, values) in want.as_object().expect("object") {
                let g: Vec<f64> = got[output]
                    .as_array()
                    .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect())
                    .unwrap_or_default();
                let w: Vec<f64> = values
                    .as_array()
                    .expect("values")
                    .iter()
                    .map(|v| v.as_f64().unwrap_or(f64::NAN))
                    .collect();
                if g.len() != w.len() || !g.iter().zip(&w).all(|(a, b)| close(*a, *b)) {
                    failures.push(format!("{name} row {i} output {output}: {g:?} vs onnxruntime {w:?}"));
                    break 'rows;
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
