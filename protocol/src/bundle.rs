//! Signed model bundles: the manifest, the DSSE envelope, the file layout and verification.
//!
//! A bundle is one file (SPEC.md §4):
//!
//! ```text
//! "LATHEB01"                   8 bytes, magic and format version
//! envelope length E            4 bytes, unsigned big-endian, 1 ..= MAX_ENVELOPE_LEN
//! envelope                     E bytes of JSON: {"payloadType","payload","signatures"}
//! payloads                     the payload files, concatenated in manifest order
//! ```
//!
//! The envelope's `payload` is the base64 of the manifest in canonical JSON. Each signature is
//! Ed25519 over the DSSE pre-authentication encoding of (payloadType, manifest bytes).
//!
//! Verification guarantees, in this order, that: the container is well formed; at least
//! `threshold` distinct trusted keys signed the manifest bytes; the manifest is canonical and
//! well formed; the file holds exactly the payloads the manifest lists, with their sizes and
//! SHA-256 digests; the bundle has not expired; its version is newer than the installed one.
//! Nothing in a bundle is interpreted before its signatures are checked.

use crate::canonical;
use crate::keys::{KeyId, SigningKey, TrustStore};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"LATHEB01";
pub const PAYLOAD_TYPE: &str = "application/vnd.lathe.manifest.v1+json";
pub const MANIFEST_FORMAT: u32 = 1;
/// The largest envelope a verifier accepts, in bytes.
pub const MAX_ENVELOPE_LEN: usize = 1 << 20;
/// The most signatures a verifier looks at.
pub const MAX_SIGNATURES: usize = 16;

/// What a payload is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The ONNX model. Exactly one per bundle.
    Model,
    /// The training baseline for drift tracking. At most one.
    Baseline,
    /// Self-test vectors. At most one.
    Selftest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadRef {
    pub role: Role,
    pub name: String,
    /// Lowercase hex SHA-256 of the payload bytes.
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSchema {
    /// The model's input tensor name.
    pub name: String,
    /// Element type; `float32` in format 1.
    pub dtype: String,
    /// Feature names, in the order of the tensor's last axis.
    pub features: Vec<String>,
    /// The model handles missing values (1.2): a reading's `null` becomes NaN in the row
    /// instead of being refused. Written only when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accepts_missing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSchema {
    pub name: String,
    pub dtype: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    /// Only ever increases for a given model name.
    pub version: u64,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds; the bundle is refused at or after this time.
    pub expires: u64,
    pub payloads: Vec<PayloadRef>,
    pub input: InputSchema,
    pub outputs: Vec<OutputSchema>,
}

impl Manifest {
    /// The canonical bytes of this manifest.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let v = serde_json::to_value(self).expect("a manifest always converts to JSON");
        canonical::encode(&v).expect("a manifest holds integers only")
    }

    fn check(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "format {} is not supported (expected {MANIFEST_FORMAT})",
                self.format
            ));
        }
        crate::topic::Name::new(self.name.clone()).map_err(|e| format!("name: {e}"))?;
        let count = |r: Role| self.payloads.iter().filter(|p| p.role == r).count();
        if count(Role::Model) != 1 {
            return Err("exactly one payload must have role \"model\"".into());
        }
        if count(Role::Baseline) > 1 || count(Role::Selftest) > 1 {
            return Err("at most one baseline and one selftest payload are allowed".into());
        }
        for p in &self.payloads {
            if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(format!("payload {:?}: sha256 must be 64 lowercase hex digits", p.name));
            }
        }
        if self.input.features.is_empty() {
            return Err("input.features is empty".into());
        }
        if self.input.dtype != "float32" {
            return Err(format!(
                "input.dtype {:?} is not supported (expected \"float32\")",
                self.input.dtype
            ));
        }
        if self.expires <= self.created {
            return Err("expires must be after created".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub keyid: String,
    /// Standard base64 of the 64-byte Ed25519 signature.
    pub sig: String,
}

/// The DSSE envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Standard base64 of the canonical manifest bytes.
    pub payload: String,
    pub signatures: Vec<Signature>,
}

/// DSSE pre-authentication encoding: the exact bytes each signature covers.
///
/// `"DSSEv1" SP len(type) SP type SP len(body) SP body`, lengths in ASCII decimal.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {} {} ", payload_type.len(), payload_type, body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// Why a bundle was refused. `code()` is the stable verdict name used in SPEC.md and the test
/// vectors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("not a Lathe bundle: bad magic (expected \"LATHEB01\")")]
    BadMagic,
    #[error("bundle is truncated: {0}")]
    Truncated(String),
    #[error("bundle envelope is malformed: {0}")]
    MalformedEnvelope(String),
    #[error("bundle payload type is {0:?}, expected \"{PAYLOAD_TYPE}\"")]
    WrongPayloadType(String),
    #[error("{}", threshold_message(.valid, .required, .unknown, .invalid, .trusted))]
    SignatureThreshold {
        valid: usize,
        required: usize,
        unknown: Vec<String>,
        invalid: Vec<String>,
        trusted: Vec<String>,
    },
    #[error("bundle manifest is not canonical JSON; re-pack the bundle")]
    NonCanonicalManifest,
    #[error("bundle manifest is invalid: {0}")]
    InvalidManifest(String),
    #[error("bundle has {0} bytes after its last payload")]
    TrailingData(u64),
    #[error("payload {name:?} does not match its sha256 in the manifest")]
    DigestMismatch { name: String },
    #[error(
        "bundle {name} v{version} expired at {expires} (now {now}); re-sign with a later expiry or check the clock"
    )]
    Expired {
        name: String,
        version: u64,
        expires: u64,
        now: u64,
    },
    #[error("bundle {name} v{version} is not newer than installed v{installed}")]
    NotNewer { name: String, version: u64, installed: u64 },
}

fn threshold_message(
    valid: &usize,
    required: &usize,
    unknown: &[String],
    invalid: &[String],
    trusted: &[String],
) -> String {
    let mut m = format!("bundle has {valid} valid signature(s) from trusted keys, {required} required");
    if !unknown.is_empty() {
        m += &format!("; signed by unknown key(s) {}", unknown.join(", "));
    }
    if !invalid.is_empty() {
        m += &format!("; bad signature(s) from {}", invalid.join(", "));
    }
    m += &format!(
        " (trusted: {})",
        if trusted.is_empty() {
            "none".to_string()
        } else {
            trusted.join(", ")
        }
    );
    if !unknown.is_empty() {
        m += "; add the key to the trust store or re-sign";
    }
    m
}

impl VerifyError {
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::BadMagic => "bad_magic",
            VerifyError::Truncated(_) => "truncated",
            VerifyError::MalformedEnvelope(_) => "malformed_envelope",
            VerifyError::WrongPayloadType(_) => "wrong_payload_type",
            VerifyError::SignatureThreshold { .. } => "signature_threshold",
            VerifyError::NonCanonicalManifest => "non_canonical_manifest",
            VerifyError::InvalidManifest(_) => "invalid_manifest",
            VerifyError::TrailingData(_) => "trailing_data",
            VerifyError::DigestMismatch { .. } => "digest_mismatch",
            VerifyError::Expired { .. } => "expired",
            VerifyError::NotNewer { .. } => "not_newer",
        }
    }
}

/// What the verifier checks a bundle against.
#[derive(Clone, Copy)]
pub struct Policy<'a> {
    pub trust: &'a TrustStore,
    /// Distinct trusted keys that must have signed; at least 1.
    pub threshold: usize,
    /// Unix seconds.
    pub now: u64,
    /// The highest version ever activated of a model name, if any. Called only with the name
    /// of a manifest whose signatures have been checked (step 8).
    pub installed_version: &'a dyn Fn(&str) -> Option<u64>,
}

impl std::fmt::Debug for Policy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("trust", &self.trust)
            .field("threshold", &self.threshold)
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

/// For [`Policy::installed_version`]: no version of any name was ever activated.
pub fn none_installed(_: &str) -> Option<u64> {
    None
}

/// A bundle whose signatures, digests and policy checks passed.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    /// The key ids whose signatures were valid and counted.
    pub signed_by: Vec<String>,
    /// The bundle file, whose payloads are at `ranges`, in manifest order: held once, not
    /// copied per payload.
    bytes: Vec<u8>,
    ranges: Vec<std::ops::Range<usize>>,
}

impl Verified {
    pub fn payload(&self, role: Role) -> Option<&[u8]> {
        self.manifest
            .payloads
            .iter()
            .position(|p| p.role == role)
            .map(|i| &self.bytes[self.ranges[i].clone()])
    }

    pub fn model(&self) -> &[u8] {
        self.payload(Role::Model)
            .expect("a verified manifest has exactly one model payload")
    }
}

/// The parts of a bundle file, before any check beyond the layout.
struct Container<'a> {
    envelope: &'a [u8],
    rest: &'a [u8],
}

fn split(bytes: &[u8]) -> Result<Container<'_>, VerifyError> {
    if bytes.len() < 8 {
        return Err(if MAGIC.starts_with(bytes) {
            VerifyError::Truncated("shorter than the 12-byte header".into())
        } else {
            VerifyError::BadMagic
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(VerifyError::BadMagic);
    }
    if bytes.len() < 12 {
        return Err(VerifyError::Truncated("shorter than the 12-byte header".into()));
    }
    let len = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if len == 0 || len > MAX_ENVELOPE_LEN {
        return Err(VerifyError::MalformedEnvelope(format!(
            "envelope length {len} is outside 1..={MAX_ENVELOPE_LEN}"
        )));
    }
    let end = 12 + len;
    if bytes.len() < end {
        return Err(VerifyError::Truncated(format!(
            "envelope needs {len} bytes, {} present",
            bytes.len() - 12
        )));
    }
    Ok(Container {
        envelope: &bytes[12..end],
        rest: &bytes[end..],
    })
}

/// The payload of an envelope message (a desired state, a key set), decoded without checking
/// anything: for reports and display only, never for a decision. `None` when the message has
/// no base64 `payload`.
pub fn unverified_payload(message: &[u8]) -> Option<Vec<u8>> {
    #[derive(Deserialize)]
    struct Env {
        payload: String,
    }
    let env: Env = serde_json::from_slice(message).ok()?;
    B64.decode(env.payload).ok()
}

/// Read the manifest without verifying anything. For display only (`bundle inspect`).
pub fn inspect(bytes: &[u8]) -> Result<(Manifest, Envelope), VerifyError> {
    let c = split(bytes)?;
    let env: Envelope =
        serde_json::from_slice(c.envelope).map_err(|e| VerifyError::MalformedEnvelope(e.to_string()))?;
    let body = B64
        .decode(&env.payload)
        .map_err(|e| VerifyError::MalformedEnvelope(format!("payload: {e}")))?;
    let m: Manifest = serde_json::from_slice(&body).map_err(|e| VerifyError::InvalidManifest(e.to_string()))?;
    Ok((m, env))
}

/// Steps 1 to 3 of verification for any DSSE envelope of Lathe (a bundle's, a desired
/// state's): the payload type, the base64 payload, at most [`MAX_SIGNATURES`] signatures, and
/// at least `threshold` distinct trusted keys whose signature verifies over the PAE. Returns
/// the payload bytes and the key ids counted; nothing in the payload is read.
pub fn check_signatures(
    env: &Envelope,
    payload_type: &str,
    trust: &TrustStore,
    threshold: usize,
) -> Result<(Vec<u8>, Vec<String>), VerifyError> {
    if env.payload_type != payload_type {
        return Err(VerifyError::WrongPayloadType(env.payload_type.clone()));
    }
    let body = B64
        .decode(&env.payload)
        .map_err(|e| VerifyError::MalformedEnvelope(format!("payload: {e}")))?;
    if env.signatures.len() > MAX_SIGNATURES {
        return Err(VerifyError::MalformedEnvelope(format!(
            "{} signatures, at most {MAX_SIGNATURES} allowed",
            env.signatures.len()
        )));
    }
    let signed = pae(payload_type, &body);
    let (mut valid, mut unknown, mut invalid) = (Vec::<String>::new(), Vec::new(), Vec::new());
    for s in &env.signatures {
        match trust.get(&KeyId(s.keyid.clone())) {
            None => unknown.push(s.keyid.clone()),
            Some(pk) => {
                let ok = B64.decode(&s.sig).map(|sig| pk.verify(&signed, &sig)).unwrap_or(false);
                if !ok {
                    invalid.push(s.keyid.clone());
                } else if !valid.contains(&s.keyid) {
                    valid.push(s.keyid.clone());
                }
            }
        }
    }
    let required = threshold.max(1);
    if valid.len() < required {
        return Err(VerifyError::SignatureThreshold {
            valid: valid.len(),
            required,
            unknown,
            invalid,
            trusted: trust.ids().into_iter().map(|k| k.0).collect(),
        });
    }
    Ok((body, valid))
}

/// A DSSE envelope over `body`, one signature per key, in the order given.
pub fn sign_envelope(payload_type: &str, body: &[u8], keys: &[&SigningKey]) -> Envelope {
    let signed = pae(payload_type, body);
    Envelope {
        payload_type: payload_type.into(),
        payload: B64.encode(body),
        signatures: keys
            .iter()
            .map(|k| Signature {
                keyid: k.key_id().0,
                sig: B64.encode(k.sign(&signed)),
            })
            .collect(),
    }
}

/// Verify a bundle file against a policy.
pub fn verify(bytes: &[u8], policy: &Policy<'_>) -> Result<Verified, VerifyError> {
    let (manifest, signed_by, ranges) = check(bytes, policy)?;
    Ok(Verified {
        manifest,
        signed_by,
        bytes: bytes.to_vec(),
        ranges,
    })
}

/// [`verify`] a bundle file the caller owns, keeping it without a copy: what a device does
/// with a bundle it activates, so that a large one is in memory once.
pub fn verify_owned(bytes: Vec<u8>, policy: &Policy<'_>) -> Result<Verified, VerifyError> {
    let (manifest, signed_by, ranges) = check(&bytes, policy)?;
    Ok(Verified {
        manifest,
        signed_by,
        bytes,
        ranges,
    })
}

type Checked = (Manifest, Vec<String>, Vec<std::ops::Range<usize>>);

fn check(bytes: &[u8], policy: &Policy<'_>) -> Result<Checked, VerifyError> {
    let c = split(bytes)?;
    let env: Envelope =
        serde_json::from_slice(c.envelope).map_err(|e| VerifyError::MalformedEnvelope(e.to_string()))?;
    let (body, valid) = check_signatures(&env, PAYLOAD_TYPE, policy.trust, policy.threshold)?;
    let (manifest, ranges) = contents(&body, &c)?;

    if policy.now >= manifest.expires {
        return Err(VerifyError::Expired {
            name: manifest.name.clone(),
            version: manifest.version,
            expires: manifest.expires,
            now: policy.now,
        });
    }
    if let Some(installed) = (policy.installed_version)(&manifest.name) {
        if manifest.version <= installed {
            return Err(VerifyError::NotNewer {
                name: manifest.name.clone(),
                version: manifest.version,
                installed,
            });
        }
    }
    Ok((manifest, valid, ranges))
}

/// Open a bundle file that was verified in full before and whose SHA-256 the caller recorded
/// then: the file must still have that digest, and steps 1, 2 and 4 to 6 of verification pass
/// (layout, canonical and valid manifest, payload digests). Signatures are not counted: a
/// device keeps running a bundle it verified when its trust policy changes later (SPEC §4.6).
pub fn reopen(bytes: Vec<u8>, recorded_sha256: &str) -> Result<Verified, VerifyError> {
    if crate::sha256_hex(&bytes) != recorded_sha256 {
        return Err(VerifyError::DigestMismatch {
            name: "the bundle file".into(),
        });
    }
    let c = split(&bytes)?;
    let env: Envelope =
        serde_json::from_slice(c.envelope).map_err(|e| VerifyError::MalformedEnvelope(e.to_string()))?;
    if env.payload_type != PAYLOAD_TYPE {
        return Err(VerifyError::WrongPayloadType(env.payload_type));
    }
    let body = B64
        .decode(&env.payload)
        .map_err(|e| VerifyError::MalformedEnvelope(format!("payload: {e}")))?;
    let (manifest, ranges) = contents(&body, &c)?;
    Ok(Verified {
        manifest,
        signed_by: vec![],
        bytes,
        ranges,
    })
}

/// Steps 4 to 6: the manifest is canonical and valid, and the payloads are exactly its own.
fn contents(body: &[u8], c: &Container<'_>) -> Result<(Manifest, Vec<std::ops::Range<usize>>), VerifyError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| VerifyError::InvalidManifest(e.to_string()))?;
    if canonical::encode(&value).ok().as_deref() != Some(body) {
        return Err(VerifyError::NonCanonicalManifest);
    }
    let manifest: Manifest = serde_json::from_value(value).map_err(|e| VerifyError::InvalidManifest(e.to_string()))?;
    manifest.check().map_err(VerifyError::InvalidManifest)?;

    let mut ranges = Vec::with_capacity(manifest.payloads.len());
    let mut rest = c.rest;
    let mut at = 12 + c.envelope.len();
    for p in &manifest.payloads {
        let size = usize::try_from(p.size).unwrap_or(usize::MAX);
        if rest.len() < size {
            return Err(VerifyError::Truncated(format!(
                "payload {:?} needs {} bytes, {} present",
                p.name,
                p.size,
                rest.len()
            )));
        }
        let (data, tail) = rest.split_at(size);
        if crate::sha256_hex(data) != p.sha256 {
            return Err(VerifyError::DigestMismatch { name: p.name.clone() });
        }
        ranges.push(at..at + size);
        at += size;
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(VerifyError::TrailingData(rest.len() as u64));
    }
    Ok((manifest, ranges))
}

/// Build a bundle file: fill in payload digests and sizes, sign, and lay out the bytes.
///
/// `payloads` pairs each manifest payload reference (digest and size are overwritten) with its
/// bytes. Every key in `keys` adds one signature.
pub fn pack(
    mut manifest: Manifest,
    payloads: &[(PayloadRef, Vec<u8>)],
    keys: &[&SigningKey],
) -> Result<Vec<u8>, String> {
    manifest.payloads = payloads
        .iter()
        .map(|(r, data)| PayloadRef {
            role: r.role,
            name: r.name.clone(),
            sha256: crate::sha256_hex(data),
            size: data.len() as u64,
        })
        .collect();
    manifest.check()?;
    if keys.is_empty() {
        return Err("at least one signing key is needed".into());
    }
    let body = manifest.canonical_bytes();
    let env = sign_envelope(PAYLOAD_TYPE, &body, keys);
    Ok(assemble(&env, payloads.iter().map(|(_, d)| d.as_slice())))
}

/// Lay out a bundle file from an envelope and payload bytes, without checking anything.
pub fn assemble<'a>(env: &Envelope, payloads: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let env_bytes = serde_json::to_vec(env).expect("an envelope always serializes");
    let mut out = Vec::with_capacity(12 + env_bytes.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(env_bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&env_bytes);
    for p in payloads {
        out.extend_from_slice(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_seed(&[seed; 32])
    }

    fn manifest(version: u64) -> Manifest {
        Manifest {
            format: 1,
            name: "m".into(),
            version,
            created: 1000,
            expires: 2000,
            payloads: vec![],
            input: InputSchema {
                name: "x".into(),
                dtype: "float32".into(),
                features: vec!["a".into()],
                accepts_missing: false,
            },
            outputs: vec![OutputSchema {
                name: "y".into(),
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

    #[test]
    fn threshold_counts_distinct_trusted_keys() {
        let (k1, k2, k3) = (key(1), key(2), key(3));
        let trust = TrustStore::new([k1.public_key(), k2.public_key()]);
        let b = pack(manifest(1), &[(model_ref(), b"onnx".to_vec())], &[&k1, &k1, &k3]).expect("packs");
        let policy = |threshold| Policy {
            trust: &trust,
            threshold,
            now: 1500,
            installed_version: &none_installed,
        };
        assert!(verify(&b, &policy(1)).is_ok());
        let err = verify(&b, &policy(2)).expect_err("one distinct trusted key only");
        assert_eq!(err.code(), "signature_threshold");
        let msg = err.to_string();
        assert!(msg.contains(&k3.key_id().0) && msg.contains("unknown"), "{msg}");
        let b2 = pack(manifest(1), &[(model_ref(), b"onnx".to_vec())], &[&k1, &k2]).expect("packs");
        assert_eq!(verify(&b2, &policy(2)).expect("two keys").signed_by.len(), 2);
    }

    #[test]
    fn a_recorded_bundle_reopens_without_its_signatures_only_while_unchanged() {
        let b = pack(manifest(1), &[(model_ref(), b"onnx".to_vec())], &[&key(3)]).expect("packs");
        let sha = crate::sha256_hex(&b);
        let v = reopen(b.clone(), &sha).expect("the recorded file reopens");
        assert_eq!((v.manifest.version, v.model()), (1, &b"onnx"[..]));
        let mut flipped = b.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            reopen(flipped.clone(), &sha).expect_err("changed").code(),
            "digest_mismatch"
        );
        // Recorded after the change (a store written by someone else): the payload's own digest.
        let err = reopen(flipped.clone(), &crate::sha256_hex(&flipped)).expect_err("payload");
        assert_eq!(
            err,
            VerifyError::DigestMismatch {
                name: "model.onnx".into()
            }
        );
    }

    #[test]
    fn every_truncation_is_refused() {
        let k = key(7);
        let trust = TrustStore::new([k.public_key()]);
        let b = pack(manifest(1), &[(model_ref(), b"0123456789".to_vec())], &[&k]).expect("packs");
        let p = Policy {
            trust: &trust,
            threshold: 1,
            now: 1500,
            installed_version: &none_installed,
        };
        for n in 0..b.len() {
            assert!(verify(&b[..n], &p).is_err(), "prefix of {n} bytes accepted");
        }
        assert!(verify(&b, &p).is_ok());
    }

    #[test]
    fn single_bit_flips_are_refused() {
        let k = key(9);
        let trust = TrustStore::new([k.public_key()]);
        let b = pack(manifest(1), &[(model_ref(), b"model-bytes".to_vec())], &[&k]).expect("packs");
        let p = Policy {
            trust: &trust,
            threshold: 1,
            now: 1500,
            installed_version: &none_installed,
        };
        for i in 0..b.len() {
            let mut t = b.clone();
            t[i] ^= 0x01;
            assert!(verify(&t, &p).is_err(), "flip at byte {i} accepted");
        }
    }

    /// Regression: the agent read the manifest of an unverified bundle to find the installed
    /// version (SPEC §4.6 step 3). The version lookup now runs inside `verify`, after the
    /// signatures, and only with the verified manifest's name.
    #[test]
    fn installed_version_is_looked_up_only_after_the_signatures() {
        let (k, stranger) = (key(1), key(2));
        let trust = TrustStore::new([k.public_key()]);
        let asked = std::cell::RefCell::new(Vec::<String>::new());
        let lookup = |name: &str| {
            asked.borrow_mut().push(name.to_string());
            Some(1)
        };
        let p = Policy {
            trust: &trust,
            threshold: 1,
            now: 1500,
            installed_version: &lookup,
        };
        let unsigned = pack(manifest(2), &[(model_ref(), b"onnx".to_vec())], &[&stranger]).expect("packs");
        assert_eq!(
            verify(&unsigned, &p).expect_err("unknown key").code(),
            "signature_threshold"
        );
        assert!(
            asked.borrow().is_empty(),
            "the manifest of an unverified bundle was read"
        );
        let signed = pack(manifest(2), &[(model_ref(), b"onnx".to_vec())], &[&k]).expect("packs");
        assert!(verify(&signed, &p).is_ok());
        assert_eq!(*asked.borrow(), vec!["m".to_string()]);
        let old = pack(manifest(1), &[(model_ref(), b"onnx".to_vec())], &[&k]).expect("packs");
        assert_eq!(verify(&old, &p).expect_err("not newer").code(), "not_newer");
    }

    #[test]
    fn pae_matches_dsse() {
        assert_eq!(pae("t", b"body"), b"DSSEv1 1 t 4 body".to_vec());
    }
}
