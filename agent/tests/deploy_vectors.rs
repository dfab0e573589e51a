//! The deploy test vectors in `protocol/testdata/deploy/`: bundles that verify (SPEC §4.6) and
//! must then be activated or refused by the deploy's checks (§4.7, §4.8), each with the
//! response code an agent gives.
//!
//! `deploy.json` lists the cases; this test checks each verdict with the agent's own deploy
//! check. The files are made by the generator below, which computes the self-tests' expected
//! outputs with the agent's engine, as `lathe-hub bundle pack` does. To rewrite them:
//! `LATHE_REGEN_VECTORS=1 cargo test -p lathe --test deploy_vectors`.

use lathe::engine::Engine;
use protocol::baseline::{self, Baseline, OutputValues};
use protocol::bundle::{self, InputSchema, Manifest, OutputSchema, PayloadRef, Policy, Role};
use protocol::keys::{SigningKey, TrustStore};
use protocol::selftest::{Selftest, Tolerance};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

const NOW: u64 = 1_800_000_000;

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../protocol/testdata")
}

fn manifest() -> Manifest {
    Manifest {
        format: bundle::MANIFEST_FORMAT,
        name: "rul-linear".into(),
        version: 7,
        created: 1_700_000_000,
        expires: 4_000_000_000,
        payloads: vec![],
        input: Some(InputSchema {
            name: "X".into(),
            dtype: "float32".into(),
            features: vec!["rms".into(), "kurtosis".into(), "crest_factor".into(), "peak_hz".into()],
            accepts_missing: false,
        }),
        inputs: None,
        outputs: vec![OutputSchema {
            name: "variable".into(),
            dtype: "float32".into(),
        }],
    }
}

fn payload(role: Role, name: &str) -> PayloadRef {
    PayloadRef {
        role,
        name: name.into(),
        sha256: String::new(),
        size: 0,
    }
}

/// A self-test of four rows with the engine's outputs as the expected ones, as a packer makes it.
fn selftest(model: &[u8]) -> Selftest {
    let rows = vec![
        vec![0.9, 3.1, 3.2, 120.0],
        vec![1.8, 5.5, 4.8, 310.0],
        vec![0.0, 0.0, 0.0, 0.0],
        vec![-1.0, 2.0, -3.0, 4.0],
    ];
    let engine = Engine::load(model, 4).expect("the vector model loads");
    lathe::deploy::make_selftest(&engine, rows, Tolerance::default()).expect("runs")
}

/// A baseline of 200 spread rows and the model's outputs on them, as a packer builds it.
fn baseline(model: &[u8]) -> Baseline {
    let rows: Vec<Vec<f32>> = (0..200)
        .map(|i| {
            let x = i as f32 / 200.0;
            vec![0.5 + x, 2.5 + 3.0 * x, 3.0 + 2.0 * x, 100.0 + 250.0 * x]
        })
        .collect();
    let engine = Engine::load(model, 4).expect("the vector model loads");
    let out = engine.run(&rows).expect("runs");
    let scores = out.column("variable").expect("variable");
    let columns: Vec<Vec<f64>> = (0..4).map(|j| rows.iter().map(|r| f64::from(r[j])).collect()).collect();
    let outputs = vec![OutputValues::Scores {
        name: "variable".into(),
        columns: vec![(0..rows.len()).map(|i| scores.row(i)[0]).collect()],
    }];
    baseline::build(
        &manifest().input.expect("tabular").features,
        &columns,
        outputs,
        baseline::DEFAULT_BINS,
    )
    .expect("builds")
}

fn bjson(b: &Baseline) -> Vec<u8> {
    serde_json::to_vec(b).expect("json")
}

/// (file, bytes, the agent's verdict)
fn cases(model: &[u8], key: &SigningKey) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let pack_with = |m: Manifest, role: Role, name: &str, data: Option<Vec<u8>>| {
        let mut payloads = vec![(payload(Role::Model, "model.onnx"), model.to_vec())];
        if let Some(t) = data {
            payloads.push((payload(role, name), t));
        }
        bundle::pack(m, &payloads, &[key]).expect("vector packs")
    };
    let pack = |m: Manifest, test: Option<Vec<u8>>| pack_with(m, Role::Selftest, "selftest.json", test);
    let with_baseline = |b: Vec<u8>| pack_with(manifest(), Role::Baseline, "baseline.json", Some(b));
    let base = baseline(model);
    let mut unordered = base.clone();
    unordered.features[1].dist.edges.reverse();
    let mut renamed_feature = base.clone();
    renamed_feature.features[0].name = "rms_g".into();
    let mut short = base.clone();
    short.features[2].dist.counts.pop();
    let json = |t: &Selftest| serde_json::to_vec(t).expect("json");
    let good = selftest(model);
    let mut off = good.clone();
    off.expected.get_mut("variable").expect("variable")[2][0] += 1.0;
    let mut narrow = good.clone();
    narrow.rows[1].pop();
    let mut dtype = manifest();
    dtype.outputs[0].dtype = "int64".into();
    let mut input = manifest();
    input.input.as_mut().expect("tabular").name = "features".into();
    let mut renamed = manifest();
    renamed.outputs[0].name = "rul_hours".into();
    vec![
        ("selftest-pass.lbundle", pack(manifest(), Some(json(&good))), "ok"),
        (
            "selftest-mismatch.lbundle",
            pack(manifest(), Some(json(&off))),
            "selftest_failed",
        ),
        (
            "selftest-malformed.lbundle",
            pack(manifest(), Some(json(&narrow))),
            "selftest_failed",
        ),
        (
            "selftest-not-json.lbundle",
            pack(manifest(), Some(b"rows,expected\n".to_vec())),
            "selftest_failed",
        ),
        ("output-dtype.lbundle", pack(dtype, None), "load_failed"),
        ("output-name.lbundle", pack(renamed, None), "load_failed"),
        ("input-name.lbundle", pack(input, None), "load_failed"),
        ("baseline-pass.lbundle", with_baseline(bjson(&base)), "ok"),
        (
            "baseline-unordered-edges.lbundle",
            with_baseline(bjson(&unordered)),
            "baseline_invalid",
        ),
        (
            "baseline-other-features.lbundle",
            with_baseline(bjson(&renamed_feature)),
            "baseline_invalid",
        ),
        (
            "baseline-counts.lbundle",
            with_baseline(bjson(&short)),
            "baseline_invalid",
        ),
        (
            "baseline-not-json.lbundle",
            with_baseline(b"rms,kurtosis\n".to_vec()),
            "baseline_invalid",
        ),
    ]
}

#[test]
fn deploy_vectors_match_their_verdicts() {
    let d = testdata();
    let deploy = d.join("deploy");
    let model = std::fs::read(d.join("model.onnx")).expect("testdata/model.onnx");
    let key = SigningKey::from_text(&std::fs::read_to_string(d.join("signer.key")).expect("signer.key")).expect("key");
    if std::env::var_os("LATHE_REGEN_VECTORS").is_some() {
        std::fs::create_dir_all(&deploy).expect("mkdir");
        let cases = cases(&model, &key);
        let listing: Vec<Value> = cases.iter().map(|(f, _, v)| json!({"file": f, "verdict": v})).collect();
        let doc = json!({"now": NOW, "trust": "../trust.keys", "threshold": 1, "cases": listing});
        std::fs::write(
            deploy.join("deploy.json"),
            serde_json::to_string_pretty(&doc).expect("json") + "\n",
        )
        .expect("write");
        for (f, bytes, _) in &cases {
            std::fs::write(deploy.join(f), bytes).expect("write");
        }
    }
    // The committed files are what is checked, as another implementation would check them.
    let doc: Value =
        serde_json::from_slice(&std::fs::read(deploy.join("deploy.json")).expect("deploy.json")).expect("json");
    let trust = TrustStore::parse(&std::fs::read_to_string(d.join("trust.keys")).expect("trust.keys")).expect("trust");
    let policy = Policy {
        trust: &trust,
        threshold: 1,
        now: doc["now"].as_u64().expect("now"),
        installed_version: &bundle::none_installed,
    };
    let listed = doc["cases"].as_array().expect("cases");
    assert_eq!(
        listed.len(),
        cases(&model, &key).len(),
        "deploy.json is out of date; regenerate"
    );
    let mut verdicts = BTreeMap::new();
    for case in listed {
        let file = case["file"].as_str().expect("file");
        let bytes = std::fs::read(deploy.join(file)).expect("vector file");
        let verified = bundle::verify(&bytes, &policy).unwrap_or_else(|e| panic!("{file} must verify: {e}"));
        let got = match lathe::deploy::load_model(verified) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.code(),
        };
        assert_eq!(got, case["verdict"].as_str().expect("verdict"), "{file}");
        *verdicts.entry(got).or_insert(0) += 1;
    }
    assert_eq!(
        verdicts.len(),
        4,
        "ok, load_failed, selftest_failed and baseline_invalid are all covered: {verdicts:?}"
    );
}
