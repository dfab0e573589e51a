//! The rollout test vectors in `protocol/testdata/rollout/` (SPEC.md §7): desired states and
//! key sets with their expected verdicts, and the chunk index of a bundle.
//!
//! `rollout.json` lists the cases. This test checks each verdict from the files alone, and that
//! the files are exactly what the generator below produces (signatures are deterministic). To
//! rewrite them after a deliberate format change:
//! `LATHE_REGEN_VECTORS=1 cargo test -p lathe-protocol --test rollout_vectors`.

use protocol::bundle;
use protocol::keys::{SigningKey, TrustStore};
use protocol::keyset::{self, KeySet};
use protocol::rollout::{self, Desired, DesiredModel, DesiredPolicy, Targets};
use serde_json::{json, Value};
use std::path::PathBuf;

const NOW: u64 = 1_800_000_000;
const CHUNK: u32 = 1024;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_seed(&[seed; 32])
}

/// The desired state every case varies: bearing v3 for press-7, from `valid.lbundle`.
fn desired(bundle_file: &[u8]) -> Desired {
    let (blob, _) = rollout::describe(bundle_file, CHUNK);
    Desired {
        format: rollout::DESIRED_FORMAT,
        fleet: "plant1".into(),
        targets: Targets {
            devices: vec!["press-7".into(), "press-8".into()],
            group: None,
        },
        counter: 1_799_999_000_000,
        created: 1_799_999_000,
        expires: 1_802_592_000,
        model: DesiredModel {
            name: "rul-linear".into(),
            version: 7,
            rollback: false,
            bundle: blob,
        },
        slot: None,
    }
}

fn message(env: &bundle::Envelope) -> Vec<u8> {
    serde_json::to_vec(env).expect("an envelope serializes")
}

/// (file, bytes, what the device holds, expected verdict)
type Case = (&'static str, Vec<u8>, Value, &'static str);

fn desired_cases(bundle_file: &[u8]) -> Vec<Case> {
    let (s, second, stranger) = (key(0x11), key(0x22), key(0x33));
    let sign = |d: &Desired, keys: &[&SigningKey]| rollout::sign_desired(d, keys).expect("signs");
    let fresh = json!({"last_counter": null, "high_water": null, "active": null});
    let base = desired(bundle_file);
    let mut v: Vec<Case> = vec![("desired-ok.json", sign(&base, &[&s]), fresh.clone(), "ok")];
    v.push((
        "desired-ok.json",
        sign(&base, &[&s]),
        json!({"last_counter": base.counter, "high_water": 6, "active": 6}),
        "ok",
    ));
    v.push((
        "desired-ok.json",
        sign(&base, &[&s]),
        json!({"last_counter": base.counter + 1, "high_water": null, "active": null}),
        "replayed",
    ));
    // Model slots (1.6): `holds.slot` is the slot of the topic the message came on.
    let mut slotted = base.clone();
    slotted.slot = Some("rul".into());
    v.push((
        "desired-slot.json",
        sign(&slotted, &[&s]),
        json!({"last_counter": null, "high_water": null, "active": null, "slot": "rul"}),
        "ok",
    ));
    v.push((
        "desired-slot.json",
        sign(&slotted, &[&s]),
        fresh.clone(),
        "not_targeted",
    ));
    v.push((
        "desired-ok.json",
        sign(&base, &[&s]),
        json!({"last_counter": null, "high_water": null, "active": null, "slot": "rul"}),
        "not_targeted",
    ));
    v.push((
        "desired-ok.json",
        sign(&base, &[&s]),
        json!({"last_counter": null, "high_water": 7, "active": 5}),
        "not_newer",
    ));
    v.push((
        "desired-ok.json",
        sign(&base, &[&s]),
        json!({"last_counter": null, "high_water": 9, "active": 7}),
        "ok",
    ));
    let mut group = base.clone();
    group.targets = Targets {
        devices: vec![],
        group: Some("line-2".into()),
    };
    v.push(("desired-group.json", sign(&group, &[&s, &second]), fresh.clone(), "ok"));
    let mut other_group = group.clone();
    other_group.targets.group = Some("line-3".into());
    v.push((
        "desired-other-group.json",
        sign(&other_group, &[&s]),
        fresh.clone(),
        "not_targeted",
    ));
    let mut other = base.clone();
    other.targets.devices = vec!["press-9".into()];
    v.push((
        "desired-other-device.json",
        sign(&other, &[&s]),
        fresh.clone(),
        "not_targeted",
    ));
    let mut fleet = base.clone();
    fleet.fleet = "plant2".into();
    v.push((
        "desired-other-fleet.json",
        sign(&fleet, &[&s]),
        fresh.clone(),
        "not_targeted",
    ));
    let mut expired = base.clone();
    expired.expires = NOW;
    v.push(("desired-expired.json", sign(&expired, &[&s]), fresh.clone(), "expired"));
    let mut rollback = base.clone();
    rollback.model.rollback = true;
    v.push((
        "desired-rollback.json",
        sign(&rollback, &[&s]),
        json!({"last_counter": null, "high_water": 9, "active": 8}),
        "ok",
    ));
    v.push((
        "desired-stranger.json",
        sign(&base, &[&stranger]),
        fresh.clone(),
        "signature_threshold",
    ));
    let mut loose = base.canonical_bytes();
    loose.insert(1, b' ');
    v.push((
        "desired-non-canonical.json",
        message(&bundle::sign_envelope(rollout::DESIRED_PAYLOAD_TYPE, &loose, &[&s])),
        fresh.clone(),
        "non_canonical_manifest",
    ));
    v.push((
        "desired-as-bundle.json",
        message(&bundle::sign_envelope(
            bundle::PAYLOAD_TYPE,
            &base.canonical_bytes(),
            &[&s],
        )),
        fresh.clone(),
        "wrong_payload_type",
    ));
    let mut small = serde_json::to_value(&base).expect("json");
    small["model"]["bundle"]["chunk_bytes"] = json!(100);
    let small = protocol::canonical::encode(&small).expect("canonical");
    v.push((
        "desired-small-chunks.json",
        message(&bundle::sign_envelope(rollout::DESIRED_PAYLOAD_TYPE, &small, &[&s])),
        fresh.clone(),
        "invalid_desired",
    ));
    let mut extra = serde_json::to_value(&base).expect("json");
    extra["note"] = json!("members not in §8.2 are refused");
    let extra = protocol::canonical::encode(&extra).expect("canonical");
    v.push((
        "desired-unknown-member.json",
        message(&bundle::sign_envelope(rollout::DESIRED_PAYLOAD_TYPE, &extra, &[&s])),
        fresh,
        "invalid_desired",
    ));
    v
}

fn keyset_cases() -> Vec<Case> {
    let (s, second, stranger) = (key(0x11), key(0x22), key(0x33));
    let set = |counter: u64, threshold: usize, keys: &[&SigningKey]| KeySet {
        format: keyset::KEYS_FORMAT,
        fleet: "plant1".into(),
        counter,
        created: counter / 1000,
        threshold,
        keys: keys.iter().map(|k| k.public_key().to_text()).collect(),
    };
    let sign = |k: &KeySet, by: &[&SigningKey]| keyset::sign_key_set(k, by).expect("signs");
    let first = json!({"last_counter": null});
    // {second, stranger} at threshold 1: `signer` is revoked, `stranger` added.
    let rotate = set(1_799_999_500_000, 1, &[&second, &stranger]);
    let mut v: Vec<Case> = vec![("keys-rotate.json", sign(&rotate, &[&s]), first.clone(), "ok")];
    v.push((
        "keys-rotate.json",
        sign(&rotate, &[&s]),
        json!({"last_counter": rotate.counter}),
        "replayed",
    ));
    v.push((
        "keys-by-stranger.json",
        sign(&rotate, &[&stranger]),
        first.clone(),
        "signature_threshold",
    ));
    let mut other = rotate.clone();
    other.fleet = "plant2".into();
    v.push((
        "keys-other-fleet.json",
        sign(&other, &[&s]),
        first.clone(),
        "not_targeted",
    ));
    let bad = set(1_799_999_500_000, 3, &[&second, &stranger]);
    let body = serde_json::to_vec(&bad).expect("json");
    let body = protocol::canonical::encode(&serde_json::from_slice(&body).expect("json")).expect("canonical");
    v.push((
        "keys-threshold-too-high.json",
        message(&bundle::sign_envelope(keyset::KEYS_PAYLOAD_TYPE, &body, &[&s])),
        first,
        "invalid_keys",
    ));
    v
}

/// The verdict of one case, from the files alone, as another implementation would reach it.
fn verdict(kind: &str, bytes: &[u8], trust: &TrustStore, doc: &Value, holds: &Value) -> &'static str {
    let threshold = doc["threshold"].as_u64().expect("threshold") as usize;
    let fleet = doc["fleet"].as_str().expect("fleet");
    let last = holds["last_counter"].as_u64();
    match kind {
        "desired" => {
            let groups: Vec<String> = doc["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .map(|g| g.as_str().expect("group").to_string())
                .collect();
            let (hw, active) = (holds["high_water"].as_u64(), holds["active"].as_u64());
            let high_water = move |_: &str| hw;
            let active = move |_: &str| active;
            let policy = DesiredPolicy {
                trust,
                threshold,
                now: doc["now"].as_u64().expect("now"),
                fleet,
                device: doc["device"].as_str().expect("device"),
                groups: &groups,
                slot: holds["slot"].as_str(),
                last_counter: last,
                high_water: &high_water,
                active: &active,
                max_bundle_bytes: 256 << 20,
            };
            match rollout::verify_desired(bytes, &policy) {
                Ok(_) => "ok",
                Err(e) => e.code(),
            }
        }
        "keys" => match keyset::verify_key_set(bytes, trust, threshold, fleet, last) {
            Ok(_) => "ok",
            Err(e) => e.code(),
        },
        other => panic!("unknown kind {other}"),
    }
}

#[test]
fn rollout_vectors_match_their_verdicts_and_files() {
    let d = dir();
    let out = d.join("rollout");
    let bundle_file = std::fs::read(d.join("valid.lbundle")).expect("testdata/valid.lbundle");
    let (blob, index) = rollout::describe(&bundle_file, CHUNK);
    let cases: Vec<(&str, Case)> = desired_cases(&bundle_file)
        .into_iter()
        .map(|c| ("desired", c))
        .chain(keyset_cases().into_iter().map(|c| ("keys", c)))
        .collect();
    if std::env::var_os("LATHE_REGEN_VECTORS").is_some() {
        std::fs::create_dir_all(&out).expect("mkdir");
        let listing: Vec<Value> = cases
            .iter()
            .map(|(kind, (f, _, holds, v))| json!({"kind": kind, "file": f, "holds": holds, "verdict": v}))
            .collect();
        let doc = json!({
            "now": NOW,
            "trust": "../trust.keys",
            "threshold": 1,
            "fleet": "plant1",
            "device": "press-7",
            "groups": ["line-2"],
            "cases": listing,
            "chunks": {
                "object": "../valid.lbundle",
                "size": blob.size,
                "sha256": blob.sha256,
                "chunk_bytes": blob.chunk_bytes,
                "chunks": blob.chunks(),
                "index": "valid.lbundle.index",
                "index_sha256": blob.index_sha256,
            },
        });
        std::fs::write(
            out.join("rollout.json"),
            serde_json::to_string_pretty(&doc).expect("json") + "\n",
        )
        .expect("write");
        for (_, (f, bytes, ..)) in &cases {
            std::fs::write(out.join(f), bytes).expect("write");
        }
        std::fs::write(out.join("valid.lbundle.index"), &index).expect("write");
    }

    let doc: Value =
        serde_json::from_slice(&std::fs::read(out.join("rollout.json")).expect("rollout.json")).expect("json");
    let trust = TrustStore::parse(&std::fs::read_to_string(d.join("trust.keys")).expect("trust.keys")).expect("parses");
    let listed = doc["cases"].as_array().expect("cases");
    assert_eq!(listed.len(), cases.len(), "rollout.json is out of date; regenerate");
    for (case, (kind, (file, bytes, holds, want))) in listed.iter().zip(&cases) {
        assert_eq!(case["file"], *file);
        assert_eq!(case["kind"], *kind);
        assert_eq!(&case["holds"], holds);
        let on_disk = std::fs::read(out.join(file)).expect("vector file");
        assert_eq!(&on_disk, bytes, "{file} differs from the generator; regenerate");
        let got = verdict(kind, &on_disk, &trust, &doc, &case["holds"]);
        assert_eq!(got, case["verdict"].as_str().expect("verdict"), "{file}: {case}");
        assert_eq!(got, *want, "{file}");
    }
    // The chunk index: the raw SHA-256 of each chunk of the object, in order.
    let c = &doc["chunks"];
    let object = std::fs::read(out.join(c["object"].as_str().expect("object"))).expect("object");
    let on_disk = std::fs::read(out.join(c["index"].as_str().expect("index"))).expect("index");
    assert_eq!(on_disk, index, "the chunk index differs from the generator; regenerate");
    assert_eq!(c["size"], object.len() as u64);
    assert_eq!(c["sha256"], protocol::sha256_hex(&object));
    assert_eq!(c["chunks"], on_disk.len() as u64 / 32);
    assert_eq!(c["index_sha256"], protocol::sha256_hex(&on_disk));
    for (i, chunk) in object
        .chunks(c["chunk_bytes"].as_u64().expect("chunk_bytes") as usize)
        .enumerate()
    {
        let digest = protocol::sha256_hex(chunk);
        assert_eq!(digest, protocol::hex(&on_disk[i * 32..i * 32 + 32]), "chunk {i}");
    }
}
