//! `lathe model run`, `lathe model inspect` and `lathe-hub bundle pack` as the real binaries:
//! the whole scikit-learn corpus through `model run`, compared with onnxruntime's outputs, and
//! the one check that decides whether a model can run, seen from every command that uses it.

use lathe_e2e::*;
use protocol::bundle::{self, PayloadRef, Role};
use protocol::keys::SigningKey;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    let mut ran_missing = 0;
    for m in &index {
        let name = m["name"].as_str().expect("name");
        let cases: Value =
            serde_json::from_slice(&std::fs::read(corpus.join(format!("{name}.cases.json"))).expect("cases"))
                .expect("json");
        let features: Vec<String> = serde_json::from_value(cases["features"].clone()).expect("features");
        // A missing value is an empty cell. A model that handles missing values runs them (as
        // the agent runs a reading's null); any other refuses them, and runs the complete rows.
        let all: Vec<usize> = (0..cases["rows"].as_array().expect("rows").len()).collect();
        let complete: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| cases["rows"][i].as_array().expect("row").iter().all(Value::is_number))
            .collect();
        let model_run = |rows: &[usize]| {
            let mut csv = features.join(",") + "\n";
            for &i in rows {
                let cells: Vec<String> = cases["rows"][i]
                    .as_array()
                    .expect("row")
                    .iter()
                    .map(|v| v.as_f64().map(|f| format!("{f:?}")).unwrap_or_default())
                    .collect();
                csv += &(cells.join(",") + "\n");
            }
            let csv_path = dir.path().join(format!("{name}.csv"));
            std::fs::write(&csv_path, csv).expect("write csv");
            run(Command::new(&bins().0)
                .args(["model", "run", "--json", "--input"])
                .arg(&csv_path)
                .arg(corpus.join(format!("{name}.onnx"))))
        };
        let (mut code, mut out, mut err) = model_run(&all);
        let mut used = all.clone();
        if code != 0 && complete.len() < all.len() && err.contains("does not take missing values") {
            (code, out, err) = model_run(&complete);
            used = complete.clone();
        }
        if code != 0 {
            failures.push(format!("{name}: exit {code}: {err}"));
            continue;
        }
        if used.len() > complete.len() {
            ran_missing += 1;
        }
        let lines: Vec<&str> = out.lines().collect();
        let expected: Vec<&Value> = used.iter().map(|&i| &cases["expected"][i]).collect();
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
    assert!(
        ran_missing > 0,
        "no model of the corpus ran its rows with missing values"
    );
}

fn lathe(args: &[&str]) -> (i32, String, String) {
    run(Command::new(&bins().0).args(args))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// The fixture's first rows as CSV, columns in `order` (indices into its features).
fn vibration_csv(dir: &Path, name: &str, order: &[usize], rows: usize) -> PathBuf {
    let c = cases();
    let mut csv = order
        .iter()
        .map(|&i| c.features[i].as_str())
        .collect::<Vec<_>>()
        .join(",")
        + "\n";
    for row in &c.rows[..rows] {
        csv += &(order
            .iter()
            .map(|&i| format!("{:?}", row[i]))
            .collect::<Vec<_>>()
            .join(",")
            + "\n");
    }
    let path = dir.join(name);
    std::fs::write(&path, csv).expect("write csv");
    path
}

/// Regressions: columns were taken by position, non-finite cells ran, a bundle could not be
/// run, errors spoke of a manifest where there was none, and `| head` made it panic.
#[test]
fn model_run_behaves_as_the_agent() {
    let f = Fleet::new();
    let d = f.device("bench-1", f.hub_broker.port, &[]);
    let model = fixture("vibration_logreg.onnx");
    let features = cases().features.join(",");
    let straight = vibration_csv(f.path(), "straight.csv", &[0, 1, 2, 3], 5);
    let reordered = vibration_csv(f.path(), "reordered.csv", &[3, 1, 0, 2], 5);

    let (code, want, err) = lathe(&["model", "run", "--json", "--input", s(&straight), s(&model)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(want.lines().count(), 5);
    for (what, args) in [
        (
            "onnx, reordered, --features",
            vec!["--features", &features, "--input", s(&reordered), s(&model)],
        ),
        (
            "bundle, reordered",
            vec!["--config", s(&d.config), "--input", s(&reordered), s(&f.bundle)],
        ),
    ] {
        let mut all = vec!["model", "run", "--json"];
        all.extend(args);
        let (code, out, err) = lathe(&all);
        assert_eq!((code, out.as_str()), (0, want.as_str()), "{what}: {err}");
    }

    let failing = |name: &str, csv: &str, extra: &[&str], message: &str| {
        let path = f.path().join(name);
        std::fs::write(&path, csv).expect("write csv");
        let mut all = vec!["model", "run", "--input", s(&path)];
        all.extend_from_slice(extra);
        let (code, out, err) = lathe(&all);
        assert_eq!(code, 1, "{name}: {out}{err}");
        assert!(err.contains(message), "{name}: {err}");
        assert!(!err.contains("manifest"), "{name}: no manifest is involved: {err}");
    };
    let header = "rms,kurtosis,crest_factor,peak_hz\n";
    let m = s(&model);
    failing(
        "nan.csv",
        &format!("{header}1,3,3,nan\n"),
        &["--features", &features, m],
        "peak_hz\": nan is not a finite",
    );
    failing(
        "inf.csv",
        &format!("{header}1,3,inf,100\n"),
        &["--features", &features, m],
        "not a finite float32",
    );
    failing(
        "missing.csv",
        "rms,kurtosis\n1,3\n",
        &["--features", &features, m],
        "no column for feature(s) crest_factor, peak_hz",
    );
    failing(
        "narrow.csv",
        "rms,kurtosis\n1,3\n",
        &[m],
        "takes 4 features; 2 were given",
    );

    // A reader that goes away ends the command quietly.
    let mut child = Command::new(&bins().0)
        .args([
            "model",
            "run",
            "--json",
            "--features",
            &features,
            "--input",
            s(&straight),
            s(&model),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lathe");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Regression: a float64 model packed, signed and deployed as healthy, then failed every
/// reading; `model inspect` listed no problem for it, for string labels or for a DataFrame
/// export. Each is now refused by pack and by the agent's deploy, for one reason, and by
/// inspect, except the DataFrame export, whose five one-value inputs run as a tensor model.
#[test]
fn a_model_that_cannot_run_is_refused_by_every_command() {
    let f = Fleet::new();
    let d = f.device("press-3", f.hub_broker.port, &[]);
    let _agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let (code, out) = f.deploy(&d, &f.bundle);
    assert_eq!(code, 0, "{out}");
    let key = SigningKey::from_text(&std::fs::read_to_string(f.path().join("k1.key")).expect("key")).expect("key");
    let four = "rms,kurtosis,crest_factor,peak_hz";
    for (model, features, reason) in [
        ("logreg_f64", four, "input \"X\" is float64; Lathe feeds float32"),
        (
            "string_labels",
            four,
            "output \"label\" is string; Lathe supports integer class labels only",
        ),
        (
            "dataframe_inputs",
            "rms,kurtosis,crest_factor,peak_hz,load",
            "the model has 5 inputs",
        ),
    ] {
        let path = fixture(&format!("{model}.onnx"));
        let (code, out, err) = lathe(&["model", "inspect", s(&path)]);
        if model == "dataframe_inputs" {
            // Five inputs of one value each run as a tensor model; as a tabular one they do not.
            assert_eq!(code, 0, "{model}: {out}{err}");
            assert!(out.contains("loads and runs on trial rows"), "{out}");
        } else {
            assert_eq!(code, 1, "{model}: {out}{err}");
            assert!(out.contains("CANNOT RUN") && out.contains(reason), "{model}: {out}");
            let (code, out, err) = lathe(&["model", "inspect", "--json", s(&path)]);
            let info: Value = serde_json::from_str(&out).expect("inspect --json");
            assert_eq!(code, 1, "{err}");
            assert!(info["problems"].to_string().contains("Lathe"), "{model}: {info}");
        }

        let (code, out, bundle_path) = f.pack_model(&path, model, 1, features, &[]);
        assert_eq!(code, 1, "{model}: {out}");
        assert!(
            out.contains("refusing to sign") && out.contains(reason),
            "{model}: {out}"
        );
        assert!(!bundle_path.exists());

        // Signed anyway, by a packer that does not check: the agent refuses it for the same reason.
        let bytes = signed(&key, model, &std::fs::read(&path).expect("model"), features, None);
        std::fs::write(&bundle_path, bytes).expect("write bundle");
        let (code, out) = f.deploy(&d, &bundle_path);
        assert_eq!(code, 1, "{model}: {out}");
        assert!(
            out.contains("refused (load_failed)") && out.contains(reason),
            "{model}: {out}"
        );
        assert!(
            out.contains("active: bearing v1"),
            "{model}: the active model stays: {out}"
        );
    }
}

/// A bundle signed without the hub's checks: the model, its features, its outputs as the
/// engine names them, and an optional self-test payload.
fn signed(key: &SigningKey, name: &str, model: &[u8], features: &str, selftest: Option<&[u8]>) -> Vec<u8> {
    let manifest = bundle::Manifest {
        format: bundle::MANIFEST_FORMAT,
        name: name.into(),
        version: 1,
        created: 1_700_000_000,
        expires: 4_000_000_000,
        payloads: vec![],
        input: Some(bundle::InputSchema {
            name: "X".into(),
            dtype: "float32".into(),
            features: features.split(',').map(str::to_string).collect(),
            accepts_missing: false,
        }),
        inputs: None,
        outputs: vec![
            bundle::OutputSchema {
                name: "label".into(),
                dtype: "int64".into(),
            },
            bundle::OutputSchema {
                name: "probabilities".into(),
                dtype: "float32".into(),
            },
        ],
    };
    let r = |role, name: &str| PayloadRef {
        role,
        name: name.into(),
        sha256: String::new(),
        size: 0,
    };
    let mut payloads = vec![(r(Role::Model, "model.onnx"), model.to_vec())];
    if let Some(t) = selftest {
        payloads.push((r(Role::Selftest, "selftest.json"), t.to_vec()));
    }
    bundle::pack(manifest, &payloads, &[key]).expect("pack")
}

/// `--selftest` rows are run at pack time and again by the agent before it activates the
/// bundle; a self-test the model does not pass is refused with `selftest_failed`, naming the
/// output and row. A training CSV without every feature is refused.
#[test]
fn the_selftest_runs_at_pack_time_and_before_activation() {
    let f = Fleet::new();
    let d = f.device("press-4", f.hub_broker.port, &[]);
    let rows = vibration_csv(f.path(), "selftest.csv", &[2, 0, 1, 3], 8);
    let features = cases().features.join(",");
    let pack = |extra: &[&str]| f.pack_model(&fixture("vibration_logreg.onnx"), "bearing", 2, &features, extra);
    // A training CSV that lacks a feature is refused before anything is signed.
    let partial = f.path().join("partial.csv");
    std::fs::write(&partial, "rms,kurtosis,crest_factor,target\n1,3,3,0\n").expect("csv");
    let (code, out, _) = pack(&["--baseline", s(&partial)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("--baseline") && out.contains("no column for feature(s) peak_hz"),
        "{out}"
    );
    let (code, out, tested) = pack(&["--selftest", s(&rows)]);
    assert_eq!(code, 0, "{out}");

    let bytes = std::fs::read(&tested).expect("bundle");
    let (_, _) = bundle::inspect(&bytes).expect("inspect");
    let trust =
        protocol::keys::TrustStore::parse(&std::fs::read_to_string(f.path().join("trust.keys")).expect("trust"))
            .expect("trust");
    let policy = bundle::Policy {
        trust: &trust,
        threshold: 1,
        now: 0,
        installed_version: &bundle::none_installed,
    };
    let v = bundle::verify(&bytes, &policy).expect("verifies");
    let test: protocol::selftest::Selftest =
        serde_json::from_slice(v.payload(Role::Selftest).expect("a selftest payload")).expect("selftest.json");
    let c = cases();
    assert_eq!(test.rows.len(), 8);
    assert_eq!(
        test.rows[3],
        c.rows[3].iter().map(|v| *v as f32).collect::<Vec<_>>(),
        "rows in feature order"
    );
    assert_eq!(test.expected["label"][3], c.expected[3]["label"]);

    // The same rows with one expected value changed, signed: the agent refuses it.
    let mut bad = test.clone();
    bad.expected.get_mut("probabilities").expect("probabilities")[5][1] += 0.01;
    let key = SigningKey::from_text(&std::fs::read_to_string(f.path().join("k1.key")).expect("key")).expect("key");
    let forged = f.path().join("forged.lbundle");
    let model = std::fs::read(fixture("vibration_logreg.onnx")).expect("model");
    std::fs::write(
        &forged,
        signed(
            &key,
            "bearing",
            &model,
            &c.features.join(","),
            Some(&serde_json::to_vec(&bad).expect("json")),
        ),
    )
    .expect("write");
    let (code, _, err) = lathe(&[
        "model",
        "run",
        "--config",
        s(&d.config),
        "--input",
        s(&rows),
        s(&forged),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("self-test failed: output \"probabilities\" row 5 value 1"),
        "{err}"
    );

    let _agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let (code, o) = f.deploy(&d, &forged);
    assert_eq!(code, 1, "{o}");
    assert!(o.contains("refused (selftest_failed)") && o.contains("row 5"), "{o}");
    assert!(o.contains("active: none"), "{o}");
    let (code, o) = f.deploy(&d, &tested);
    assert_eq!(code, 0, "{o}");
    assert!(o.contains("active: bearing v2"), "{o}");
}
