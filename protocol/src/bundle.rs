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
/// The manifest format of a model with one tabular input (`input`, with feature names).
pub const MANIFEST_FORMAT: u32 = 1;
/// The manifest format of a model with tensor inputs (`inputs`, with shapes; SPEC §4.4, 1.7).
pub const TENSOR_FORMAT: u32 = 2;
/// The most inputs a format 2 manifest lists.
pub const MAX_INPUTS: usize = 8;
/// The most dimensions an input has after its batch axis.
pub const MAX_RANK: usize = 8;
/// The most values one sample of a model holds, over all its inputs (16 MiB of float32).
pub const MAX_SAMPLE_VALUES: usize = 1 << 22;
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

/// One input of a format 2 manifest (1.7): a tensor of shape `[N, shape…]` with a free batch
/// axis `N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSchema {
    /// The model's input tensor name.
    pub name: String,
    /// Element type; `float32`.
    pub dtype: String,
    /// The dimensions after the batch axis, each at least 1.
    pub shape: Vec<u64>,
    /// How an image becomes this input, for an image input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSchema>,
}

impl TensorSchema {
    /// Values in one sample of this input.
    pub fn values(&self) -> usize {
        self.shape.iter().map(|d| *d as usize).product()
    }
}

/// How an image (JPEG or PNG) becomes an input tensor (SPEC §4.4, 1.7): it is decoded, resized
/// to the input's height and width (bilinear, pixel centres aligned), its channels put in
/// `channels` order and laid out as `layout` says, and each value is
/// `(pixel / 255 - mean[c]) / std[c]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSchema {
    /// `rgb`, `bgr` or `gray`.
    pub channels: String,
    /// `nchw` (the input's shape is `[C, H, W]`) or `nhwc` (`[H, W, C]`).
    pub layout: String,
    /// One decimal number per channel, as a string: canonical JSON has no fractions.
    pub mean: Vec<String>,
    /// One decimal number per channel, each above 0, as a string.
    pub std: Vec<String>,
}

/// An [`ImageSchema`] checked against its input's shape, ready to use.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePlan {
    pub height: usize,
    pub width: usize,
    pub channels: Channels,
    /// `true` for `nchw`, `false` for `nhwc`.
    pub planar: bool,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channels {
    Rgb,
    Bgr,
    Gray,
}

impl Channels {
    pub fn count(self) -> usize {
        match self {
            Channels::Gray => 1,
            _ => 3,
        }
    }
}

/// The largest height or width of an image input.
pub const MAX_IMAGE_SIDE: u64 = 8192;

impl ImageSchema {
    /// Check the schema against the input's shape (after the batch axis).
    pub fn plan(&self, shape: &[u64]) -> Result<ImagePlan, String> {
        let channels = match self.channels.as_str() {
            "rgb" => Channels::Rgb,
            "bgr" => Channels::Bgr,
            "gray" => Channels::Gray,
            c => return Err(format!("image.channels {c:?} is not rgb, bgr or gray")),
        };
        let (planar, [c, h, w]) = match (self.layout.as_str(), shape) {
            ("nchw", &[c, h, w]) => (true, [c, h, w]),
            ("nhwc", &[h, w, c]) => (false, [c, h, w]),
            ("nchw" | "nhwc", _) => {
                return Err(format!(
                    "an image input has 3 dimensions after the batch axis, not {shape:?}"
                ))
            }
            (l, _) => return Err(format!("image.layout {l:?} is not nchw or nhwc")),
        };
        if c != channels.count() as u64 {
            return Err(format!(
                "image.channels {:?} has {} channel(s); the input's shape {shape:?} has {c}",
                self.channels,
                channels.count()
            ));
        }
        if h > MAX_IMAGE_SIDE || w > MAX_IMAGE_SIDE {
            return Err(format!("an image input is at most {MAX_IMAGE_SIDE} pixels on a side"));
        }
        let numbers = |what: &str, list: &[String], positive: bool| -> Result<Vec<f32>, String> {
            if list.len() != channels.count() {
                return Err(format!(
                    "image.{what} has {} value(s); {} channel(s) need one each",
                    list.len(),
                    channels.count()
                ));
            }
            list.iter()
                .map(|t| {
                    t.parse::<f32>()
                        .ok()
                        .filter(|v| t.len() <= 32 && v.is_finite() && (!positive || *v > 0.0))
                        .ok_or_else(|| {
                            format!(
                                "image.{what} {t:?} is not a decimal number{}",
                                if positive { " above 0" } else { "" }
                            )
                        })
                })
                .collect()
        };
        Ok(ImagePlan {
            height: h as usize,
            width: w as usize,
            channels,
            planar,
            mean: numbers("mean", &self.mean, false)?,
            std: numbers("std", &self.std, true)?,
        })
    }
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
    /// Format 1: the one tabular input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputSchema>,
    /// Format 2: the tensor inputs, in the model's input order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Vec<TensorSchema>>,
    pub outputs: Vec<OutputSchema>,
}

impl Manifest {
    /// The canonical bytes of this manifest.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let v = serde_json::to_value(self).expect("a manifest always converts to JSON");
        canonical::encode(&v).expect("a manifest holds integers only")
    }

    /// The tabular input of a format 1 manifest: its feature names name the values of a row.
    pub fn features(&self) -> Option<&InputSchema> {
        self.input.as_ref()
    }

    /// Every input as a tensor, in model order: a format 1 input is `[N, len(features)]`.
    pub fn tensors(&self) -> Vec<TensorSchema> {
        match (&self.input, &self.inputs) {
            (Some(i), _) => vec![TensorSchema {
                name: i.name.clone(),
                dtype: i.dtype.clone(),
                shape: vec![i.features.len() as u64],
                image: None,
            }],
            (None, Some(inputs)) => inputs.clone(),
            (None, None) => vec![],
        }
    }

    /// Values in one sample (one row), over every input in model order.
    pub fn width(&self) -> usize {
        self.tensors().iter().map(TensorSchema::values).sum()
    }

    fn check(&self) -> Result<(), String> {
        match (self.format, &self.input, &self.inputs) {
            (MANIFEST_FORMAT, Some(input), None) => check_tabular(input)?,
            (TENSOR_FORMAT, None, Some(inputs)) => check_tensors(inputs)?,
            (MANIFEST_FORMAT, _, _) => return Err("format 1 has `input` and no `inputs`".into()),
            (TENSOR_FORMAT, _, _) => return Err("format 2 has `inputs` and no `input`".into()),
            (f, _, _) => {
                return Err(format!(
                    "format {f} is not supported (expected {MANIFEST_FORMAT} or {TENSOR_FORMAT})"
                ))
            }
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
        if self.expires <= self.created {
            return Err("expires must be after created".into());
        }
        Ok(())
    }
}

fn check_dtype(what: &str, dtype: &str) -> Result<(), String> {
    if dtype != "float32" {
        return Err(format!(
            "{what}.dtype {dtype:?} is not supported (expected \"float32\")"
        ));
    }
    Ok(())
}

fn check_tabular(input: &InputSchema) -> Result<(), String> {
    if input.features.is_empty() {
        return Err("input.features is empty".into());
    }
    if input.features.len() > MAX_SAMPLE_VALUES {
        return Err(format!("input has more than {MAX_SAMPLE_VALUES} features"));
    }
    check_dtype("input", &input.dtype)
}

fn check_tensors(inputs: &[TensorSchema]) -> Result<(), String> {
    if inputs.is_empty() || inputs.len() > MAX_INPUTS {
        return Err(format!("{} inputs; a manifest lists 1 to {MAX_INPUTS}", inputs.len()));
    }
    let mut total = 0usize;
    for (i, t) in inputs.iter().enumerate() {
        if t.name.is_empty() || t.name == "id" {
            return Err(format!(
                "inputs[{i}].name is {:?}: a reading's `id` member is its id, not an input; rename the input",
                t.name
            ));
        }
        if inputs[..i].iter().any(|o| o.name == t.name) {
            return Err(format!("input {:?} is listed twice", t.name));
        }
        check_dtype(&format!("input {:?}", t.name), &t.dtype)?;
        if t.shape.is_empty() || t.shape.len() > MAX_RANK {
            return Err(format!(
                "input {:?} has {} dimensions after the batch axis; 1 to {MAX_RANK} are allowed",
                t.name,
                t.shape.len()
            ));
        }
        let mut values = 1usize;
        for d in &t.shape {
            let d = usize::try_from(*d).ok().filter(|d| *d >= 1 && *d <= MAX_SAMPLE_VALUES);
            values = d
                .and_then(|d| values.checked_mul(d))
                .filter(|v| *v <= MAX_SAMPLE_VALUES)
                .ok_or_else(|| {
                    format!(
                        "input {:?} has shape {:?}; each dimension is at least 1 and a sample holds at most {MAX_SAMPLE_VALUES} values",
                        t.name, t.shape
                    )
                })?;
        }
        if let Some(image) = &t.image {
            image.plan(&t.shape).map_err(|e| format!("input {:?}: {e}", t.name))?;
        }
        total += values;
        if total > MAX_SAMPLE_VALUES {
            return Err(format!(
                "the inputs hold more than {MAX_SAMPLE_VALUES} values per sample"
            ));
        }
    }
    Ok(())
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
            input: Some(InputSchema {
                name: "x".into(),
                dtype: "float32".into(),
                features: vec!["a".into()],
                accepts_missing: false,
            }),
            inputs: None,
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

    fn tensor_manifest(shapes: &[(&str, Vec<u64>)]) -> Manifest {
        Manifest {
            format: TENSOR_FORMAT,
            input: None,
            inputs: Some(
                shapes
                    .iter()
                    .map(|(n, s)| TensorSchema {
                        name: n.to_string(),
                        dtype: "float32".into(),
                        shape: s.clone(),
                        image: None,
                    })
                    .collect(),
            ),
            ..manifest(1)
        }
    }

    #[test]
    fn tensor_manifests_are_checked() {
        let (k, trust) = (key(4), TrustStore::new([key(4).public_key()]));
        let p = Policy {
            trust: &trust,
            threshold: 1,
            now: 1500,
            installed_version: &none_installed,
        };
        let m = tensor_manifest(&[("image", vec![3, 64, 64]), ("meta", vec![2])]);
        assert_eq!(m.width(), 3 * 64 * 64 + 2);
        assert!(m.features().is_none());
        let b = pack(m, &[(model_ref(), b"onnx".to_vec())], &[&k]).expect("packs");
        let v = verify(&b, &p).expect("verifies");
        assert_eq!(v.manifest.tensors()[0].shape, vec![3, 64, 64]);
        // A format 1 manifest is the tensor [N, len(features)].
        let t = manifest(1).tensors();
        assert_eq!((t[0].name.as_str(), t[0].shape.clone()), ("x", vec![1]));

        let refused = |m: Manifest, why: &str| {
            let e = pack(m, &[(model_ref(), b"onnx".to_vec())], &[&k]).expect_err("refused");
            assert!(e.contains(why), "{e:?} does not say {why:?}");
        };
        refused(tensor_manifest(&[]), "1 to 8");
        refused(tensor_manifest(&[("a", vec![])]), "dimensions after the batch axis");
        refused(tensor_manifest(&[("a", vec![3, 0])]), "at least 1");
        refused(tensor_manifest(&[("a", vec![1 << 20, 1 << 20])]), "at most");
        refused(tensor_manifest(&[("a", vec![2]), ("a", vec![2])]), "listed twice");
        refused(tensor_manifest(&[("id", vec![2])]), "not an input");
        refused(
            Manifest {
                input: manifest(1).input,
                ..tensor_manifest(&[("a", vec![2])])
            },
            "format 2 has `inputs` and no `input`",
        );
        refused(
            Manifest {
                format: 1,
                ..tensor_manifest(&[("a", vec![2])])
            },
            "format 1 has `input`",
        );
        refused(
            Manifest {
                format: 3,
                ..manifest(1)
            },
            "format 3 is not supported",
        );
        let mut bad = tensor_manifest(&[("a", vec![2])]);
        bad.inputs.as_mut().expect("tensor inputs")[0].dtype = "uint8".into();
        refused(bad, "dtype");
    }

    #[test]
    fn image_inputs_are_checked_against_their_shape() {
        let image = |channels: &str, layout: &str, mean: &[&str], std: &[&str]| ImageSchema {
            channels: channels.into(),
            layout: layout.into(),
            mean: mean.iter().map(|s| s.to_string()).collect(),
            std: std.iter().map(|s| s.to_string()).collect(),
        };
        let rgb = image(
            "rgb",
            "nchw",
            &["0.485", "0.456", "0.406"],
            &["0.229", "0.224", "0.225"],
        );
        let plan = rgb.plan(&[3, 32, 48]).expect("fits");
        assert_eq!((plan.height, plan.width, plan.planar), (32, 48, true));
        assert_eq!(plan.mean[0], 0.485);
        let gray = image("gray", "nhwc", &["0"], &["1"]);
        assert_eq!(gray.plan(&[20, 10, 1]).expect("fits").width, 10);
        for (schema, shape, why) in [
            (&rgb, vec![1, 32, 48], "has 3 channel(s)"),
            (&rgb, vec![3, 32], "3 dimensions"),
            (&gray, vec![20, 10, 3], "has 1 channel(s)"),
            (&image("rgb", "chw", &["0"; 3], &["1"; 3]), vec![3, 2, 2], "layout"),
            (&image("rgba", "nchw", &["0"; 3], &["1"; 3]), vec![3, 2, 2], "channels"),
            (
                &image("rgb", "nchw", &["0"; 2], &["1"; 3]),
                vec![3, 2, 2],
                "image.mean has 2",
            ),
            (
                &image("rgb", "nchw", &["0"; 3], &["1", "0", "1"]),
                vec![3, 2, 2],
                "above 0",
            ),
            (
                &image("rgb", "nchw", &["x"; 3], &["1"; 3]),
                vec![3, 2, 2],
                "not a decimal",
            ),
            (
                &image("rgb", "nchw", &["0"; 3], &["1"; 3]),
                vec![3, 9000, 2],
                "at most 8192",
            ),
        ] {
            let e = schema.plan(&shape).expect_err(why);
            assert!(e.contains(why), "{e:?} does not say {why:?}");
        }
        // The manifest check applies it.
        let mut m = tensor_manifest(&[("image", vec![3, 32, 48])]);
        m.inputs.as_mut().expect("tensor inputs")[0].image = Some(gray.clone());
        let e = pack(m, &[(model_ref(), b"onnx".to_vec())], &[&key(4)]).expect_err("gray into 3 channels");
        assert!(e.contains("input \"image\": image.channels"), "{e}");
    }

    /// A format 1 manifest's signed bytes do not change with the format 2 members.
    #[test]
    fn tabular_manifests_keep_their_bytes() {
        let text = String::from_utf8(manifest(1).canonical_bytes()).expect("UTF-8");
        assert!(text.contains(r#""format":1,"input":{"#), "{text}");
        assert!(!text.contains("inputs"), "{text}");
    }

    #[test]
    fn pae_matches_dsse() {
        assert_eq!(pae("t", b"body"), b"DSSEv1 1 t 4 body".to_vec());
    }
}
