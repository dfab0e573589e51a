//! Decoders of untrusted bytes never panic, and no mutation of a valid bundle verifies unless
//! it leaves the signed and hashed bytes intact.

use proptest::prelude::*;
use protocol::bundle::{self, InputSchema, Manifest, OutputSchema, PayloadRef, Policy, Role};
use protocol::keys::{SigningKey, TrustStore};
use protocol::messages::{Ack, ReceivedCommand, SyncBatch};

fn valid() -> (Vec<u8>, TrustStore) {
    let k = SigningKey::from_seed(&[5; 32]);
    let m = Manifest {
        format: 1,
        name: "m".into(),
        version: 2,
        created: 10,
        expires: 1 << 40,
        payloads: vec![],
        input: Some(InputSchema {
            name: "x".into(),
            dtype: "float32".into(),
            features: vec!["a".into(), "b".into()],
            accepts_missing: false,
        }),
        inputs: None,
        outputs: vec![OutputSchema {
            name: "y".into(),
            dtype: "float32".into(),
        }],
    };
    let r = PayloadRef {
        role: Role::Model,
        name: "model.onnx".into(),
        sha256: String::new(),
        size: 0,
    };
    let b = bundle::pack(m, &[(r, b"not really onnx, but hashed".to_vec())], &[&k]).expect("packs");
    (b, TrustStore::new([k.public_key()]))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn verify_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let (_, trust) = valid();
        let p = Policy { trust: &trust, threshold: 1, now: 100, installed_version: &bundle::none_installed };
        let _ = bundle::verify(&bytes, &p);
        let _ = bundle::inspect(&bytes);
    }

    #[test]
    fn mutated_bundles_are_refused(pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let (b, trust) = valid();
        let i = pos.index(b.len());
        prop_assume!(b[i] != byte);
        let mut t = b.clone();
        t[i] = byte;
        let p = Policy { trust: &trust, threshold: 1, now: 100, installed_version: &bundle::none_installed };
        prop_assert!(bundle::verify(&t, &p).is_err(), "byte {} set to {} was accepted", i, byte);
    }

    #[test]
    fn message_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = ReceivedCommand::parse(&bytes);
        let _ = protocol::sync::decode(&bytes, 1 << 16);
        let _ = serde_json::from_slice::<SyncBatch>(&bytes);
        let _ = serde_json::from_slice::<Ack>(&bytes);
        let _ = serde_json::from_slice::<protocol::messages::Health>(&bytes);
    }

    /// A baseline parses and checks without panicking whatever its bytes, and one that passes
    /// its rules can be measured against any window.
    #[test]
    fn baselines_never_panic(s in r#"\{"format":1,"rows":[0-9]{1,3},"features":\[\{"name":"(a|b)","missing_rate":[0-9.]{1,4},"dist":\{"edges":\[[0-9.,-]{0,12}\],"counts":\[[0-9,]{0,12}\],"mean":[0-9.-]{1,4},"std":[0-9.-]{1,4},"min":[0-9.-]{1,4},"max":[0-9.-]{1,4}\}\}[],]{0,2}.{0,8}"#) {
        let (b, _) = valid();
        let (m, _) = bundle::inspect(&b).expect("inspect");
        if let Ok(base) = protocol::baseline::Baseline::parse(s.as_bytes(), &m) {
            for f in &base.features {
                let window = vec![1u64; f.dist.counts.len()];
                let psi = protocol::baseline::psi(&f.dist.counts, &window).expect("a value");
                prop_assert!(psi.is_finite() && psi >= 0.0);
                let ks = protocol::baseline::ks(&f.dist.counts, &window).expect("a value");
                prop_assert!((0.0..=1.0 + 1e-12).contains(&ks));
                let _ = f.dist.bin(f64::NAN);
            }
        }
    }
}

/// A signed desired state and a signed key set, and the store that trusts their signer.
fn signed_documents() -> (Vec<u8>, Vec<u8>, TrustStore) {
    use protocol::rollout::{describe, sign_desired, Desired, DesiredModel, Targets, DESIRED_FORMAT};
    let k = SigningKey::from_seed(&[5; 32]);
    let (bundle, _) = describe(&[7u8; 5000], 1024);
    let desired = Desired {
        format: DESIRED_FORMAT,
        fleet: "f".into(),
        targets: Targets {
            devices: vec!["d".into()],
            group: None,
        },
        counter: 5,
        created: 10,
        expires: 1 << 40,
        model: DesiredModel {
            name: "m".into(),
            version: 2,
            rollback: false,
            bundle,
        },
        slot: None,
    };
    let keys = protocol::keyset::KeySet {
        format: protocol::keyset::KEYS_FORMAT,
        fleet: "f".into(),
        counter: 9,
        created: 10,
        threshold: 1,
        keys: vec![SigningKey::from_seed(&[6; 32]).public_key().to_text()],
    };
    (
        sign_desired(&desired, &[&k]).expect("signs"),
        protocol::keyset::sign_key_set(&keys, &[&k]).expect("signs"),
        TrustStore::new([k.public_key()]),
    )
}

fn check_desired(bytes: &[u8], trust: &TrustStore) -> bool {
    let none = |_: &str| None;
    let policy = protocol::rollout::DesiredPolicy {
        trust,
        threshold: 1,
        now: 100,
        fleet: "f",
        device: "d",
        groups: &[],
        slot: None,
        last_counter: None,
        high_water: &none,
        active: &none,
        max_bundle_bytes: 1 << 20,
    };
    protocol::rollout::verify_desired(bytes, &policy).is_ok()
}

fn check_keys(bytes: &[u8], trust: &TrustStore) -> bool {
    protocol::keyset::verify_key_set(bytes, trust, 1, "f", None).is_ok()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The rollout decoders of untrusted bytes (SPEC §8) never panic.
    #[test]
    fn rollout_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let (_, _, trust) = signed_documents();
        prop_assert!(!check_desired(&bytes, &trust));
        prop_assert!(!check_keys(&bytes, &trust));
        let _ = protocol::keyset::parse_body(&bytes);
        let _ = serde_json::from_slice::<protocol::rollout::Reported>(&bytes);
    }

    /// Any byte changed in a signed desired state or key set is refused.
    #[test]
    fn mutated_rollout_documents_are_refused(pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let (desired, keys, trust) = signed_documents();
        prop_assert!(check_desired(&desired, &trust) && check_keys(&keys, &trust));
        for (doc, check) in [(desired, check_desired as fn(&[u8], &TrustStore) -> bool), (keys, check_keys)] {
            let i = pos.index(doc.len());
            prop_assume!(doc[i] != byte);
            let mut t = doc.clone();
            t[i] = byte;
            prop_assert!(!check(&t, &trust), "byte {} set to {} was accepted", i, byte);
        }
    }
}

#[test]
fn a_baseline_round_trips_exactly() {
    let values: Vec<f64> = (0..1000).map(|i| (i as f64 * 0.7919).sin() * 1e3 + 1.0 / 3.0).collect();
    let d = protocol::baseline::Dist::from_values(&values, 10).expect("dist");
    let json = serde_json::to_vec(&d).expect("json");
    let back: protocol::baseline::Dist = serde_json::from_slice(&json).expect("parse");
    assert_eq!(
        back, d,
        "edges must come back bit for bit: values on an edge stay in its bin"
    );
}
