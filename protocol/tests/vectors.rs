//! The test vectors in `protocol/testdata/`: every bundle file with its expected verdict.
//!
//! `vectors.json` lists the cases. This test checks each verdict, and that the files are exactly
//! what the generator below produces (signatures are deterministic). To rewrite them after a
//! deliberate format change: `LATHE_REGEN_VECTORS=1 cargo test -p lathe-protocol --test vectors`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use protocol::bundle::{self, Envelope, InputSchema, Manifest, OutputSchema, PayloadRef, Policy, Role, Signature};
use protocol::keys::{SigningKey, TrustStore};
use serde_json::{json, Value};
use std::path::PathBuf;

const NOW: u64 = 1_800_000_000;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn signer() -> SigningKey {
    SigningKey::from_seed(&[0x11; 32])
}
fn second() -> SigningKey {
    SigningKey::from_seed(&[0x22; 32])
}
fn stranger() -> SigningKey {
    SigningKey::from_seed(&[0x33; 32])
}

fn manifest(expires: u64) -> Manifest {
    Manifest {
        format: 1,
        name: "rul-linear".into(),
        version: 7,
        created: 1_700_000_000,
        expires,
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

fn model_ref() -> PayloadRef {
    PayloadRef {
        role: Role::Model,
        name: "model.onnx".into(),
        sha256: String::new(),
        size: 0,
    }
}

/// An envelope signed over arbitrary manifest bytes and payload type, for the malformed cases.
fn raw(payload_type: &str, body: &[u8], keys: &[&SigningKey], model: &[u8]) -> Vec<u8> {
    let signed = bundle::pae(payload_type, body);
    let env = Envelope {
        payload_type: payload_type.into(),
        payload: B64.encode(body),
        signatures: keys
            .iter()
            .map(|k| Signature {
                keyid: k.key_id().0,
                sig: B64.encode(k.sign(&signed)),
            })
            .collect(),
    };
    bundle::assemble(&env, [model])
}

/// (file, bytes, installed_version, threshold, expected verdict)
type Case = (&'static str, Vec<u8>, Option<u64>, usize, &'static str);

fn cases(model: &[u8]) -> Vec<Case> {
    let s = signer();
    let pack = |m: Manifest, keys: &[&SigningKey]| {
        bundle::pack(m, &[(model_ref(), model.to_vec())], keys).expect("vector packs")
    };
    let valid = pack(manifest(4_000_000_000), &[&s]);
    let mut v = vec![
        ("valid.lbundle", valid.clone(), None, 1, "ok"),
        ("valid.lbundle", valid.clone(), Some(6), 1, "ok"),
        ("valid.lbundle", valid.clone(), Some(7), 1, "not_newer"),
        ("valid.lbundle", valid.clone(), None, 2, "signature_threshold"),
        (
            "two-signers.lbundle",
            pack(manifest(4_000_000_000), &[&s, &second()]),
            None,
            2,
            "ok",
        ),
        (
            "expired.lbundle",
            pack(manifest(1_750_000_000), &[&s]),
            None,
            1,
            "expired",
        ),
        (
            "unknown-key.lbundle",
            pack(manifest(4_000_000_000), &[&stranger()]),
            None,
            1,
            "signature_threshold",
        ),
    ];

    // The signed manifest says version 7; the envelope now carries version 8 with the old signature.
    let (_, env) = bundle::inspect(&valid).expect("valid inspects");
    let mut forged = manifest(4_000_000_000);
    forged.payloads = bundle::inspect(&valid).expect("inspects").0.payloads;
    forged.version = 8;
    let forged_env = Envelope {
        payload: B64.encode(forged.canonical_bytes()),
        ..env.clone()
    };
    v.push((
        "tampered-manifest.lbundle",
        bundle::assemble(&forged_env, [model]),
        None,
        1,
        "signature_threshold",
    ));

    // A signature of the right key over other bytes.
    let mut bad_sig = env.clone();
    bad_sig.signatures[0].sig = B64.encode(s.sign(b"something else"));
    v.push((
        "bad-signature.lbundle",
        bundle::assemble(&bad_sig, [model]),
        None,
        1,
        "signature_threshold",
    ));

    let mut tampered_model = valid.clone();
    let last = tampered_model.len() - 1;
    tampered_model[last] ^= 0x01;
    v.push(("tampered-model.lbundle", tampered_model, None, 1, "digest_mismatch"));

    v.push((
        "truncated.lbundle",
        valid[..valid.len() - 1].to_vec(),
        None,
        1,
        "truncated",
    ));
    let mut trailing = valid.clone();
    trailing.push(0);
    v.push(("trailing.lbundle", trailing, None, 1, "trailing_data"));
    let mut magic = valid.clone();
    magic[0] = b'X';
    v.push(("bad-magic.lbundle", magic, None, 1, "bad_magic"));

    let mut with_digest = manifest(4_000_000_000);
    with_digest.payloads = forged.payloads.clone();
    let pretty = serde_json::to_vec_pretty(&with_digest).expect("serializes");
    v.push((
        "non-canonical.lbundle",
        raw(bundle::PAYLOAD_TYPE, &pretty, &[&s], model),
        None,
        1,
        "non_canonical_manifest",
    ));
    v.push((
        "wrong-payload-type.lbundle",
        raw("application/json", &with_digest.canonical_bytes(), &[&s], model),
        None,
        1,
        "wrong_payload_type",
    ));
    // A manifest edited as JSON, then signed as is (canonical, whatever it says).
    let edited = |m: &Manifest, edit: &dyn Fn(&mut Value)| {
        let mut value = serde_json::to_value(m).expect("to value");
        edit(&mut value);
        let body = protocol::canonical::encode(&value).expect("canonical");
        raw(bundle::PAYLOAD_TYPE, &body, &[&s], model)
    };
    v.push((
        "no-model.lbundle",
        edited(&with_digest, &|m| m["payloads"][0]["role"] = json!("baseline")),
        None,
        1,
        "invalid_manifest",
    ));
    // One rule for the signature limit (§4.3, §4.6): 17 signatures are refused, even valid ones.
    let many: Vec<SigningKey> = (0..17u8).map(|i| SigningKey::from_seed(&[0x40 + i; 32])).collect();
    let mut keys: Vec<&SigningKey> = vec![&s];
    keys.extend(many.iter().take(16));
    v.push((
        "seventeen-signatures.lbundle",
        raw(bundle::PAYLOAD_TYPE, &with_digest.canonical_bytes(), &keys, model),
        None,
        1,
        "malformed_envelope",
    ));
    // The digest's case is fixed (§4.4): uppercase hex is not the manifest's format.
    let upper = |m: &mut Value| {
        let digest = m["payloads"][0]["sha256"].as_str().expect("digest").to_uppercase();
        m["payloads"][0]["sha256"] = json!(digest);
    };
    v.push((
        "uppercase-digest.lbundle",
        edited(&with_digest, &upper),
        None,
        1,
        "invalid_manifest",
    ));

    // Format 2 (1.7): tensor inputs, one of them an image with its signed preprocessing.
    // Built on the manifest with the model's digest, so that it can also be signed as is.
    let tensor = || {
        let mut m = with_digest.clone();
        m.format = bundle::TENSOR_FORMAT;
        m.input = None;
        m.inputs = Some(vec![
            bundle::TensorSchema {
                name: "image".into(),
                dtype: "float32".into(),
                shape: vec![3, 64, 64],
                image: Some(bundle::ImageSchema {
                    channels: "rgb".into(),
                    layout: "nchw".into(),
                    mean: vec!["0.485".into(), "0.456".into(), "0.406".into()],
                    std: vec!["0.229".into(), "0.224".into(), "0.225".into()],
                }),
            },
            bundle::TensorSchema {
                name: "speed".into(),
                dtype: "float32".into(),
                shape: vec![1],
                image: None,
            },
        ]);
        m
    };
    v.push(("tensor.lbundle", pack(tensor(), &[&s]), None, 1, "ok"));
    // An image schema that does not fit its input's shape, signed as is.
    v.push((
        "tensor-image-shape.lbundle",
        edited(&tensor(), &|m| m["inputs"][0]["shape"] = json!([1, 64, 64])),
        None,
        1,
        "invalid_manifest",
    ));
    // Format 2 with a format 1 `input`.
    let input = serde_json::to_value(&with_digest.input).expect("input");
    v.push((
        "tensor-and-input.lbundle",
        edited(&tensor(), &|m| m["input"] = input.clone()),
        None,
        1,
        "invalid_manifest",
    ));
    v
}

#[test]
fn vectors_match_their_verdicts_and_files() {
    let d = dir();
    let model = std::fs::read(d.join("model.onnx")).expect("testdata/model.onnx");
    let regen = std::env::var_os("LATHE_REGEN_VECTORS").is_some();
    let cases = cases(&model);
    if regen {
        std::fs::write(d.join("signer.key"), signer().to_text()).expect("write");
        std::fs::write(d.join("second.key"), second().to_text()).expect("write");
        std::fs::write(d.join("stranger.key"), stranger().to_text()).expect("write");
        let trust = format!(
            "# trusted keys for the test vectors\n{} signer\n{} second\n",
            signer().public_key().to_text(),
            second().public_key().to_text()
        );
        std::fs::write(d.join("trust.keys"), trust).expect("write");
        let listing: Vec<Value> = cases
            .iter()
            .map(|(f, _, inst, th, verdict)| json!({"file": f, "installed_version": inst, "threshold": th, "verdict": verdict}))
            .collect();
        let doc = json!({"now": NOW, "trust": "trust.keys", "cases": listing});
        std::fs::write(
            d.join("vectors.json"),
            serde_json::to_string_pretty(&doc).expect("json") + "\n",
        )
        .expect("write");
        for (f, bytes, ..) in &cases {
            std::fs::write(d.join(f), bytes).expect("write");
        }
    }

    // The committed listing is what is checked, from the files alone, as another implementation would.
    let doc: Value =
        serde_json::from_slice(&std::fs::read(d.join("vectors.json")).expect("vectors.json")).expect("json");
    let trust = TrustStore::parse(&std::fs::read_to_string(d.join("trust.keys")).expect("trust.keys")).expect("parses");
    let listed = doc["cases"].as_array().expect("cases");
    assert_eq!(listed.len(), cases.len(), "vectors.json is out of date; regenerate");
    for (case, (file, bytes, ..)) in listed.iter().zip(&cases) {
        let on_disk = std::fs::read(d.join(case["file"].as_str().expect("file"))).expect("vector file");
        assert_eq!(case["file"], *file);
        assert_eq!(&on_disk, bytes, "{file} differs from the generator; regenerate");
        let installed = case["installed_version"].as_u64();
        let lookup = move |_: &str| installed;
        let policy = Policy {
            trust: &trust,
            threshold: case["threshold"].as_u64().expect("threshold") as usize,
            now: doc["now"].as_u64().expect("now"),
            installed_version: &lookup,
        };
        let verdict = match bundle::verify(&on_disk, &policy) {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        assert_eq!(verdict, case["verdict"].as_str().expect("verdict"), "{file}: {case}");
    }
    assert_eq!(
        signer().public_key(),
        SigningKey::from_text(&std::fs::read_to_string(d.join("signer.key")).expect("key"))
            .expect("parses")
            .public_key()
    );
}
