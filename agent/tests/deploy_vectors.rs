//! The deploy test vectors in `protocol/testdata/deploy/`: bundles that verify (SPEC §4.6) and
//! must then be activated or refused by the deploy's checks (§4.7, §4.8), each with the
//! response code an agent gives.
//!
//! `deploy.json` lists the cases; this test checks each verdict with the agent's own deploy
//! check. The files are made by the generator below, which computes the self-tests' expected
//! outputs with the agent's engine, as `lathe-hub bundle pack` does. To rewrite them:
//! `LATHE_REGEN_VECTORS=1 cargo test -p lathe --test deploy_vectors`.

use lathe::engine::Engine;
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
        input: InputSchema {
            name: "X".into(),
            dtype: "float32".into(),
            features: vec!["rms".into(), "kurtosis".into(), "crest_factor".into(), "peak_hz".into()],
            accepts_missing: false,
        },
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

/// (file, bytes, the agent's verdict)
fn cases(model: &[u8], key: &SigningKey) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let pack = |m: Manifest, test: Option<Vec<u8>>| {
        let mut payloads = vec![(payload(Role::Model, "model.onnx"), model.to_vec())];
        if let Some(t) = test {
            payloads.push((payload(Role::Selftest, "selftest.json"), t));
        }
        bundle::pack(m, &payloads, &[key]).expect("vector packs")
    };
    let json = |t: &Selftest| serde_json::to_vec(t).expect("json");
    let good = selftest(model);
    let mut off = good.clone();
    off.expected.get_mut("variable").expect("variable")[2][0] += 1.0;
    let mut narrow = good.clone();
    narrow.rows[1].pop();
    let mut dtype = manifest();
    dtype.outputs[0].dtype = "int64".into();
    let mut input = manifest();
    input.input.name = "features".into();
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
        3,
        "ok, load_failed and selftest_failed are all covered: {verdicts:?}"
    );
}
