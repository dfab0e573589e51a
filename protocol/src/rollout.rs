//! Rollouts (SPEC.md §8, 1.4): signed desired state, bundles carried in chunks, and the state a
//! device reports.
//!
//! - A **desired state** says which model version a device or a group should run. It is a DSSE
//!   envelope like a bundle's, of its own payload type, signed by the same trust store and
//!   threshold; its canonical body names the targets, a counter, an expiry and the bundle by
//!   digest, size and chunk index. A replayed (lower counter), misdirected (another fleet,
//!   device or group), expired or downgrading (version not above the high-water mark, unless it
//!   is a rollback) desired state is refused.
//! - A bundle travels as retained chunks of `chunk_bytes` each under
//!   `lathe/v1/<fleet>/@blob/<sha256>/<index>`. Its **chunk index** is the concatenated raw
//!   SHA-256 digests of its chunks, itself carried the same way under its own digest, which the
//!   desired state signs: every chunk is checked before it is written.
//! - The **reported state** is what a device publishes, retained, about its rollouts.

use crate::bundle::{self, Envelope, VerifyError};
use crate::canonical;
use crate::keys::{SigningKey, TrustStore};
use serde::{Deserialize, Serialize};

pub const DESIRED_PAYLOAD_TYPE: &str = "application/vnd.lathe.desired.v1+json";
pub const DESIRED_FORMAT: u32 = 1;
/// The largest desired-state message (envelope JSON) a device reads.
pub const MAX_DESIRED_BYTES: usize = 64 << 10;
/// The most device ids a desired state may target.
pub const MAX_TARGET_DEVICES: usize = 1000;
/// Chunk sizes: 64 KiB by default, which every common broker's default packet limit takes.
pub const DEFAULT_CHUNK_BYTES: u32 = 64 << 10;
pub const MIN_CHUNK_BYTES: u32 = 1 << 10;
pub const MAX_CHUNK_BYTES: u32 = 1 << 20;
/// The most chunks an object may have; bounds the chunk index to 1 MiB.
pub const MAX_CHUNKS: u64 = 32_768;
/// The largest reported-state message a hub reads.
pub const MAX_REPORTED_BYTES: usize = 16 << 10;

/// Where a desired state is published for a target (retained, QoS 1).
pub fn device_desired_topic(fleet: &str, device: &str) -> String {
    format!("{}/{fleet}/{device}/desired", crate::topic::ROOT)
}

/// Where a group's desired state is published. `@` is never in a name, so no device topic
/// has this form.
pub fn group_desired_topic(fleet: &str, group: &str) -> String {
    format!("{}/{fleet}/@group/{group}/desired", crate::topic::ROOT)
}

/// The topic of a model slot (1.6, SPEC §8.8): a device running several models keeps each in a
/// named slot, whose desired and reported states are at the device's or group's topic with
/// `/<slot>` added; the default slot (a device with one model) uses the topic itself.
pub fn slot_topic(topic: String, slot: Option<&str>) -> String {
    match slot {
        Some(s) => format!("{topic}/{s}"),
        None => topic,
    }
}

/// `s` as the name of a model slot, if it can be one: a *name* (§2) that is not a path of its
/// own (`.`, `..`, or any name starting with `.`) and not `desired` or `reported`, which would
/// make its topics ambiguous.
pub fn check_slot(s: &str) -> Result<crate::Name, String> {
    let name = crate::Name::new(s.to_string()).map_err(|e| e.to_string())?;
    if s.starts_with('.') || s == "desired" || s == "reported" {
        return Err(format!(
            "{s:?} cannot name a slot: it must not start with '.' or be desired or reported"
        ));
    }
    Ok(name)
}

/// Whom a desired-state topic is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DesiredTopic<'a> {
    Device(&'a str),
    Group(&'a str),
}

/// The filters that match every desired state of `fleet`: the devices' and the groups', of
/// the default slot and of named slots.
pub fn desired_filters(fleet: &str) -> [String; 4] {
    let (root, fleet) = (crate::topic::ROOT, fleet);
    [
        format!("{root}/{fleet}/+/desired"),
        format!("{root}/{fleet}/@group/+/desired"),
        format!("{root}/{fleet}/+/desired/+"),
        format!("{root}/{fleet}/@group/+/desired/+"),
    ]
}

/// Whom a desired-state topic of `fleet` is for, if it is one, and for which slot (`None`: the
/// default slot).
pub fn parse_desired_topic<'a>(fleet: &str, topic: &'a str) -> Option<(DesiredTopic<'a>, Option<&'a str>)> {
    let rest = topic
        .strip_prefix(crate::topic::ROOT)?
        .strip_prefix('/')?
        .strip_prefix(fleet)?
        .strip_prefix('/')?;
    let (rest, slot) = match rest.strip_suffix("/desired") {
        Some(r) => (r, None),
        None => {
            let (r, slot) = rest.rsplit_once("/desired/")?;
            check_slot(slot).ok()?;
            (r, Some(slot))
        }
    };
    let target = match rest.strip_prefix("@group/") {
        Some(g) if !g.is_empty() && !g.contains('/') => DesiredTopic::Group(g),
        Some(_) => return None,
        None if !rest.is_empty() && !rest.contains('/') && !rest.starts_with('@') => DesiredTopic::Device(rest),
        None => return None,
    };
    Some((target, slot))
}

/// Where a device reports its rollout state (retained, QoS 1).
pub fn reported_topic(fleet: &str, device: &str) -> String {
    format!("{}/{fleet}/{device}/reported", crate::topic::ROOT)
}

/// Every device's reported states in every fleet (`None`) or in one, of every slot, for a hub.
pub fn reported_filters(fleet: Option<&str>) -> [String; 2] {
    let (root, fleet) = (crate::topic::ROOT, fleet.unwrap_or("+"));
    [
        format!("{root}/{fleet}/+/reported"),
        format!("{root}/{fleet}/+/reported/+"),
    ]
}

/// The fleet, device and slot of a reported-state topic, if it is one.
pub fn parse_reported_topic(topic: &str) -> Option<(&str, &str, Option<&str>)> {
    let parts: Vec<&str> = topic
        .strip_prefix(crate::topic::ROOT)?
        .strip_prefix('/')?
        .split('/')
        .collect();
    match parts[..] {
        [fleet, device, "reported"] => Some((fleet, device, None)),
        [fleet, device, "reported", slot] => Some((fleet, device, Some(slot))),
        _ => None,
    }
}

/// Where chunk `index` of an object is published (retained, QoS 1).
pub fn chunk_topic(fleet: &str, object: &str, index: u64) -> String {
    format!("{}/{fleet}/@blob/{object}/{index}", crate::topic::ROOT)
}

/// The object and chunk index of a chunk topic of `fleet`, if it is one.
pub fn parse_chunk_topic<'a>(fleet: &str, topic: &'a str) -> Option<(&'a str, u64)> {
    let rest = topic
        .strip_prefix(crate::topic::ROOT)?
        .strip_prefix('/')?
        .strip_prefix(fleet)?
        .strip_prefix("/@blob/")?;
    let (object, index) = rest.split_once('/')?;
    if !is_digest(object) || index.is_empty() || index.len() > 10 || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((object, index.parse().ok()?))
}

/// 64 lowercase hex digits.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whom a desired state is for: a list of devices, or a group. Exactly one is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// A bundle as an object carried in chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    /// Lowercase hex SHA-256 of the whole bundle file.
    pub sha256: String,
    pub size: u64,
    pub chunk_bytes: u32,
    /// Lowercase hex SHA-256 of the chunk index (the chunks' raw digests, concatenated).
    pub index_sha256: String,
}

impl BlobRef {
    pub fn chunks(&self) -> u64 {
        chunk_count(self.size, self.chunk_bytes)
    }

    /// The chunk index as an object of its own, carried in chunks of the same size.
    pub fn index_object(&self) -> BlobRef {
        BlobRef {
            sha256: self.index_sha256.clone(),
            size: self.chunks() * 32,
            chunk_bytes: self.chunk_bytes,
            index_sha256: String::new(),
        }
    }

    fn check(&self, max_bytes: u64) -> Result<(), String> {
        if !is_digest(&self.sha256) || !is_digest(&self.index_sha256) {
            return Err("bundle digests must be 64 lowercase hex digits".into());
        }
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&self.chunk_bytes) {
            return Err(format!(
                "chunk_bytes {} is outside {MIN_CHUNK_BYTES}..={MAX_CHUNK_BYTES}",
                self.chunk_bytes
            ));
        }
        if self.size == 0 || self.size > max_bytes {
            return Err(format!(
                "bundle of {} bytes: this device accepts 1 to {max_bytes} (trust.max_bundle_bytes)",
                self.size
            ));
        }
        if self.chunks() > MAX_CHUNKS {
            return Err(format!(
                "{} chunks, at most {MAX_CHUNKS}: use larger chunks",
                self.chunks()
            ));
        }
        Ok(())
    }
}

/// Chunks of `chunk_bytes` needed for `size` bytes.
pub fn chunk_count(size: u64, chunk_bytes: u32) -> u64 {
    size.div_ceil(chunk_bytes.max(1) as u64)
}

/// The byte length of chunk `index` of an object.
pub fn chunk_len(size: u64, chunk_bytes: u32, index: u64) -> u64 {
    let start = index * chunk_bytes as u64;
    size.saturating_sub(start).min(chunk_bytes as u64)
}

/// The chunk index of `bytes`: each chunk's raw SHA-256, concatenated.
pub fn chunk_index(bytes: &[u8], chunk_bytes: u32) -> Vec<u8> {
    bytes
        .chunks(chunk_bytes as usize)
        .flat_map(|c| ring::digest::digest(&ring::digest::SHA256, c).as_ref().to_vec())
        .collect()
}

/// Describe `bytes` as an object in chunks of `chunk_bytes`, with its chunk index.
pub fn describe(bytes: &[u8], chunk_bytes: u32) -> (BlobRef, Vec<u8>) {
    let index = chunk_index(bytes, chunk_bytes);
    (
        BlobRef {
            sha256: crate::sha256_hex(bytes),
            size: bytes.len() as u64,
            chunk_bytes,
            index_sha256: crate::sha256_hex(&index),
        },
        index,
    )
}

/// The model a target should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredModel {
    pub name: String,
    pub version: u64,
    /// Run this version although a higher one was activated before: a rollback. The device
    /// keeps its high-water mark and reports that it runs below it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback: bool,
    pub bundle: BlobRef,
}

/// The signed body of a desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    pub format: u32,
    pub fleet: String,
    pub targets: Targets,
    /// Increases with every desired state the signer makes; a device refuses a lower one than
    /// it has accepted from the same topic.
    pub counter: u64,
    /// Unix seconds.
    pub created: u64,
    pub expires: u64,
    pub model: DesiredModel,
    /// The model slot this is for (1.6, SPEC §8.8); absent: the default slot. It must match
    /// the slot of the topic it came on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
}

impl Desired {
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let v = serde_json::to_value(self).expect("a desired state converts to JSON");
        canonical::encode(&v).expect("a desired state holds integers only")
    }

    fn check(&self, max_bundle_bytes: u64) -> Result<(), String> {
        if self.format != DESIRED_FORMAT {
            return Err(format!(
                "format {} is not supported (expected {DESIRED_FORMAT})",
                self.format
            ));
        }
        crate::Name::new(self.fleet.clone()).map_err(|e| format!("fleet: {e}"))?;
        crate::Name::new(self.model.name.clone()).map_err(|e| format!("model name: {e}"))?;
        if let Some(s) = &self.slot {
            check_slot(s).map_err(|e| format!("slot: {e}"))?;
        }
        match (&self.targets.devices[..], &self.targets.group) {
            ([], Some(g)) => {
                crate::Name::new(g.clone()).map_err(|e| format!("group: {e}"))?;
            }
            (devices, None) if !devices.is_empty() && devices.len() <= MAX_TARGET_DEVICES => {
                for d in devices {
                    crate::Name::new(d.clone()).map_err(|e| format!("device: {e}"))?;
                }
            }
            _ => {
                return Err(format!(
                    "targets must be 1 to {MAX_TARGET_DEVICES} devices or one group"
                ))
            }
        }
        if self.expires <= self.created {
            return Err("expires must be after created".into());
        }
        self.model.bundle.check(max_bundle_bytes)
    }
}

/// Why a desired state was refused. `code()` is the stable name in SPEC.md and reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredError {
    #[error("desired state of {0} bytes is larger than {MAX_DESIRED_BYTES}")]
    TooLarge(usize),
    #[error("desired state: {0}")]
    Envelope(VerifyError),
    #[error("desired state is invalid: {0}")]
    Invalid(String),
    #[error("desired state is for {0}, not this device")]
    NotTargeted(String),
    #[error("desired state is signed for {signed} but came on the topic of {topic}")]
    WrongSlot { signed: String, topic: String },
    #[error("desired state #{counter} expired at {expires} (now {now}); sign a new one or check the clock")]
    Expired { counter: u64, expires: u64, now: u64 },
    #[error("desired state #{counter} is older than #{last}, already accepted: a replay")]
    Replayed { counter: u64, last: u64 },
    #[error("desired state names {name} v{version}, not above v{high_water} already run; a lower version needs a signed rollback")]
    NotNewer {
        name: String,
        version: u64,
        high_water: u64,
    },
}

impl DesiredError {
    pub fn code(&self) -> &'static str {
        match self {
            DesiredError::TooLarge(_) => "too_large",
            DesiredError::Envelope(e) => e.code(),
            DesiredError::Invalid(_) => "invalid_desired",
            DesiredError::NotTargeted(_) | DesiredError::WrongSlot { .. } => "not_targeted",
            DesiredError::Expired { .. } => "expired",
            DesiredError::Replayed { .. } => "replayed",
            DesiredError::NotNewer { .. } => "not_newer",
        }
    }
}

/// What a device checks a desired state against.
pub struct DesiredPolicy<'a> {
    pub trust: &'a TrustStore,
    pub threshold: usize,
    /// Unix seconds.
    pub now: u64,
    pub fleet: &'a str,
    pub device: &'a str,
    /// The groups this device belongs to.
    pub groups: &'a [String],
    /// The slot of the topic this came on (`None`: the default slot).
    pub slot: Option<&'a str>,
    /// The highest counter accepted from the topic this came on.
    pub last_counter: Option<u64>,
    /// The highest version of a model name ever activated.
    pub high_water: &'a dyn Fn(&str) -> Option<u64>,
    /// The model version running now, if any, by name.
    pub active: &'a dyn Fn(&str) -> Option<u64>,
    pub max_bundle_bytes: u64,
}

/// A desired state whose signatures and rules passed, with the key ids that signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDesired {
    pub desired: Desired,
    pub signed_by: Vec<String>,
    /// SHA-256 of the canonical body: the same counter must always mean the same body.
    pub digest: String,
}

/// Verify a desired-state message: size, signatures (before anything else is read), canonical
/// form, rules, targets, expiry, counter and version, in that order (SPEC.md §8.2).
pub fn verify_desired(message: &[u8], policy: &DesiredPolicy<'_>) -> Result<VerifiedDesired, DesiredError> {
    let VerifiedDesired {
        desired,
        signed_by,
        digest,
    } = read_desired(message, policy.trust, policy.threshold, policy.max_bundle_bytes)?;
    let t = &desired.targets;
    let targeted = desired.fleet == policy.fleet
        && (t.devices.iter().any(|d| d == policy.device)
            || t.group.as_ref().is_some_and(|g| policy.groups.contains(g)));
    if !targeted {
        let whom = match &t.group {
            Some(g) => format!("group {g} of fleet {}", desired.fleet),
            None => format!("device(s) {} of fleet {}", t.devices.join(", "), desired.fleet),
        };
        return Err(DesiredError::NotTargeted(whom));
    }
    if desired.slot.as_deref() != policy.slot {
        let slot = |s: Option<&str>| s.map_or("the default slot".to_string(), |s| format!("slot {s}"));
        return Err(DesiredError::WrongSlot {
            signed: slot(desired.slot.as_deref()),
            topic: slot(policy.slot),
        });
    }
    if policy.now >= desired.expires {
        return Err(DesiredError::Expired {
            counter: desired.counter,
            expires: desired.expires,
            now: policy.now,
        });
    }
    if let Some(last) = policy.last_counter {
        if desired.counter < last {
            return Err(DesiredError::Replayed {
                counter: desired.counter,
                last,
            });
        }
    }
    let m = &desired.model;
    if let Some(hw) = (policy.high_water)(&m.name) {
        let running = (policy.active)(&m.name) == Some(m.version);
        if !m.rollback && !running && m.version <= hw {
            return Err(DesiredError::NotNewer {
                name: m.name.clone(),
                version: m.version,
                high_water: hw,
            });
        }
    }
    Ok(VerifiedDesired {
        digest,
        desired,
        signed_by,
    })
}

/// Steps 1 to 3 of a desired state's checks (SPEC.md §8.2): size, signatures by `trust` to
/// `threshold` (before anything else is read), canonical form and rules. What a hub reads back
/// from the broker; a device goes on with [`verify_desired`].
pub fn read_desired(
    message: &[u8],
    trust: &TrustStore,
    threshold: usize,
    max_bundle_bytes: u64,
) -> Result<VerifiedDesired, DesiredError> {
    if message.len() > MAX_DESIRED_BYTES {
        return Err(DesiredError::TooLarge(message.len()));
    }
    let env: Envelope = serde_json::from_slice(message)
        .map_err(|e| DesiredError::Envelope(VerifyError::MalformedEnvelope(e.to_string())))?;
    let (body, signed_by) =
        bundle::check_signatures(&env, DESIRED_PAYLOAD_TYPE, trust, threshold).map_err(DesiredError::Envelope)?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| DesiredError::Invalid(e.to_string()))?;
    if canonical::encode(&value).ok().as_deref() != Some(body.as_slice()) {
        return Err(DesiredError::Envelope(VerifyError::NonCanonicalManifest));
    }
    let desired: Desired = serde_json::from_value(value).map_err(|e| DesiredError::Invalid(e.to_string()))?;
    desired.check(max_bundle_bytes).map_err(DesiredError::Invalid)?;
    Ok(VerifiedDesired {
        digest: crate::sha256_hex(&body),
        desired,
        signed_by,
    })
}

/// Sign a desired state: the message a hub publishes, retained.
pub fn sign_desired(desired: &Desired, keys: &[&SigningKey]) -> Result<Vec<u8>, String> {
    desired.check(u64::MAX)?;
    if keys.is_empty() {
        return Err("at least one signing key is needed".into());
    }
    let body = desired.canonical_bytes();
    let env = bundle::sign_envelope(DESIRED_PAYLOAD_TYPE, &body, keys);
    Ok(serde_json::to_vec(&env).expect("an envelope serializes"))
}

/// Where a device is with its rollouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Nothing to do: it runs what it was last told to, or was never told anything.
    #[default]
    Idle,
    /// Fetching the chunks of a bundle.
    Downloading,
    /// Verifying, loading and switching to a fetched bundle.
    Activating,
    /// Watching the model just activated (1.5): it is committed, or rolled back on its own,
    /// when the watch period ends; `watch` says how it does.
    Watching,
    /// The last desired state could not be applied; `error` says why.
    Failed,
}

/// A model a device holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedModel {
    pub name: String,
    pub version: u64,
}

/// A transfer in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub received_bytes: u64,
    pub size: u64,
}

/// Why the last desired state failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedError {
    pub code: String,
    pub message: String,
    /// The counter of the desired state that failed, when it was read that far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<u64>,
}

/// What a device publishes, retained, at `reported_topic` (SPEC.md §8.5). Receivers ignore
/// members they do not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reported {
    pub ts_ms: u64,
    /// The counter of the last desired state accepted, 0 when none.
    pub counter: u64,
    pub phase: Phase,
    pub active: Option<ReportedModel>,
    pub previous: Option<ReportedModel>,
    pub staged: Option<Staged>,
    /// The highest version ever activated, per model name.
    #[serde(default)]
    pub high_water: std::collections::BTreeMap<String, u64>,
    pub error: Option<ReportedError>,
    /// Why the active bundle runs although it no longer meets the device's trust policy (1.4):
    /// verified when installed, it keeps running until a bundle that meets it is deployed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The model being watched after its activation, while phase is `watching` (1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchReport>,
    /// The groups whose desired states the device follows (1.5): how a hub finds a group's
    /// members, for a canary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The counter of the key set in force (1.5, §8.7); absent while the device trusts the keys
    /// it was installed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_set: Option<u64>,
    /// Why the last key set that came was refused (1.5), until one is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_error: Option<ReportedError>,
    /// The model slot this report is about (1.6, SPEC §8.8); absent: the default slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
}

/// How a model in its watch period does so far (SPEC.md §8.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchReport {
    pub name: String,
    pub version: u64,
    /// When the period ends, Unix ms by the device's clock.
    pub ends_ms: u64,
    pub counts: WatchCounts,
}

/// What a watched model did since its activation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchCounts {
    /// Rows the model ran.
    pub rows: u64,
    /// Rows whose inference failed.
    pub failed: u64,
    /// Rows with a NaN or infinite output.
    pub non_finite: u64,
    /// Rows with an output outside the training baseline's range.
    pub out_of_range: u64,
    /// The 99th percentile of an inference call, in µs (0: no call).
    pub p99_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_topics_round_trip() {
        let d = device_desired_topic("plant1", "press-7");
        let g = group_desired_topic("plant1", "line-2");
        assert_eq!(
            parse_desired_topic("plant1", &d),
            Some((DesiredTopic::Device("press-7"), None))
        );
        assert_eq!(
            parse_desired_topic("plant1", &g),
            Some((DesiredTopic::Group("line-2"), None))
        );
        assert_eq!(parse_desired_topic("plant2", &d), None, "another fleet");
        assert_eq!(
            parse_desired_topic("plant1", &slot_topic(d.clone(), Some("rul"))),
            Some((DesiredTopic::Device("press-7"), Some("rul")))
        );
        assert_eq!(
            parse_desired_topic("plant1", &slot_topic(g.clone(), Some("rul"))),
            Some((DesiredTopic::Group("line-2"), Some("rul")))
        );
        let r = slot_topic(reported_topic("plant1", "press-7"), Some("rul"));
        assert_eq!(parse_reported_topic(&r), Some(("plant1", "press-7", Some("rul"))));
        assert_eq!(
            parse_reported_topic(&reported_topic("plant1", "press-7")),
            Some(("plant1", "press-7", None))
        );
        for other in [
            reported_topic("plant1", "press-7"),
            chunk_topic("plant1", &"a".repeat(64), 0),
            "lathe/v1/plant1/@group/desired".to_string(),
            "lathe/v1/plant1/a/b/desired".to_string(),
            "lathe/v1/plant1/@keys/desired".to_string(),
            "lathe/v1/plant1/press-7/desired/a/b".to_string(),
            "lathe/v1/plant1/press-7/desired/".to_string(),
        ] {
            assert_eq!(parse_desired_topic("plant1", &other), None, "{other}");
        }
        let [devices, groups, ..] = desired_filters("plant1");
        assert_eq!(devices, "lathe/v1/plant1/+/desired");
        assert_eq!(groups, "lathe/v1/plant1/@group/+/desired");
    }
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_seed(&[seed; 32])
    }

    fn desired(counter: u64) -> Desired {
        let (bundle, _) = describe(&vec![7u8; 200_000], DEFAULT_CHUNK_BYTES);
        Desired {
            format: DESIRED_FORMAT,
            fleet: "plant1".into(),
            targets: Targets {
                devices: vec!["press-7".into()],
                group: None,
            },
            counter,
            created: 1_000,
            expires: 2_000,
            model: DesiredModel {
                name: "bearing".into(),
                version: 3,
                rollback: false,
                bundle,
            },
            slot: None,
        }
    }

    struct Case {
        what: &'static str,
        desired: Desired,
        now: u64,
        groups: Vec<String>,
        last: Option<u64>,
        high_water: Option<u64>,
        active: Option<u64>,
        code: Option<&'static str>,
    }

    fn check(c: &Case, trust: &TrustStore, threshold: usize) {
        let msg = sign_desired(&c.desired, &[&key(1)]).expect("signs");
        let (hw, active) = (c.high_water, c.active);
        let high_water = move |_: &str| hw;
        let act = move |_: &str| active;
        let policy = DesiredPolicy {
            trust,
            threshold,
            now: c.now,
            fleet: "plant1",
            device: "press-7",
            groups: &c.groups,
            slot: None,
            last_counter: c.last,
            high_water: &high_water,
            active: &act,
            max_bundle_bytes: 256 << 20,
        };
        let got = verify_desired(&msg, &policy).err().map(|e| e.code());
        assert_eq!(got, c.code, "{}", c.what);
    }

    #[test]
    fn desired_state_rules() {
        let trust = TrustStore::new([key(1).public_key()]);
        let group = |g: &str| {
            let mut d = desired(5);
            d.targets = Targets {
                devices: vec![],
                group: Some(g.into()),
            };
            d
        };
        let other_fleet = {
            let mut d = desired(5);
            d.fleet = "plant2".into();
            d
        };
        let rollback = {
            let mut d = desired(5);
            d.model.version = 2;
            d.model.rollback = true;
            d
        };
        let lower = {
            let mut d = desired(5);
            d.model.version = 2;
            d
        };
        let base = |what, desired| Case {
            what,
            desired,
            now: 1_500,
            groups: vec!["line-2".into()],
            last: None,
            high_water: None,
            active: None,
            code: None,
        };
        let cases = [
            base("a fresh device takes it", desired(5)),
            Case {
                last: Some(5),
                ..base("the same counter again is not a replay", desired(5))
            },
            Case {
                last: Some(6),
                code: Some("replayed"),
                ..base("a lower counter is a replay", desired(5))
            },
            Case {
                now: 2_000,
                code: Some("expired"),
                ..base("at expiry it is refused", desired(5))
            },
            base("its group", group("line-2")),
            Case {
                code: Some("not_targeted"),
                ..base("another group", group("line-3"))
            },
            Case {
                code: Some("not_targeted"),
                ..base("another fleet", other_fleet)
            },
            Case {
                high_water: Some(3),
                code: Some("not_newer"),
                ..base("a version already run and replaced", desired(5))
            },
            Case {
                high_water: Some(3),
                active: Some(3),
                ..base("the version running now: nothing to do", desired(5))
            },
            Case {
                high_water: Some(3),
                code: Some("not_newer"),
                ..base("a downgrade", lower)
            },
            Case {
                high_water: Some(3),
                ..base("a signed rollback", rollback)
            },
        ];
        for c in &cases {
            check(c, &trust, 1);
        }
        // Signatures first: a threshold of two refuses before anything is read.
        check(
            &Case {
                code: Some("signature_threshold"),
                ..base("one signature of two", desired(5))
            },
            &trust,
            2,
        );
    }

    #[test]
    fn targets_and_bundle_rules() {
        let mut d = desired(1);
        d.targets.group = Some("line-2".into());
        assert!(sign_desired(&d, &[&key(1)]).is_err(), "devices and a group");
        let mut d = desired(1);
        d.model.bundle.chunk_bytes = 100;
        assert!(sign_desired(&d, &[&key(1)]).is_err(), "tiny chunks");
        let mut d = desired(1);
        d.model.bundle.sha256 = d.model.bundle.sha256.to_uppercase();
        assert!(sign_desired(&d, &[&key(1)]).is_err(), "uppercase digest");
    }

    #[test]
    fn tampered_and_oversized_messages_are_refused() {
        let trust = TrustStore::new([key(1).public_key()]);
        let msg = sign_desired(&desired(1), &[&key(1)]).expect("signs");
        let none = |_: &str| None;
        let policy = DesiredPolicy {
            trust: &trust,
            threshold: 1,
            now: 1_500,
            fleet: "plant1",
            device: "press-7",
            groups: &[],
            slot: None,
            last_counter: None,
            high_water: &none,
            active: &none,
            max_bundle_bytes: 256 << 20,
        };
        assert!(verify_desired(&msg, &policy).is_ok());
        let mut env: Envelope = serde_json::from_slice(&msg).expect("envelope");
        let mut body = B64.decode(&env.payload).expect("b64");
        let at = body.windows(6).position(|w| w == b"press-").expect("device") + 6;
        body[at] = b'8';
        env.payload = B64.encode(&body);
        let forged = serde_json::to_vec(&env).expect("json");
        let err = verify_desired(&forged, &policy).expect_err("retargeted");
        assert_eq!(err.code(), "signature_threshold");
        let big = vec![b' '; MAX_DESIRED_BYTES + 1];
        assert_eq!(verify_desired(&big, &policy).expect_err("big").code(), "too_large");
        assert_eq!(
            verify_desired(b"[1]", &policy).expect_err("array").code(),
            "malformed_envelope"
        );
        let mut small = policy;
        small.max_bundle_bytes = 1000;
        assert_eq!(verify_desired(&msg, &small).expect_err("cap").code(), "invalid_desired");
    }

    #[test]
    fn chunks_cover_the_object_exactly() {
        for size in [1u64, 1023, 1024, 1025, 65_536 * 3 + 7] {
            let bytes: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let (r, index) = describe(&bytes, 1024);
            assert_eq!(index.len() as u64, r.chunks() * 32);
            let total: u64 = (0..r.chunks()).map(|i| chunk_len(r.size, r.chunk_bytes, i)).sum();
            assert_eq!(total, size);
            assert_eq!(chunk_len(r.size, r.chunk_bytes, r.chunks()), 0);
            assert_eq!(r.index_object().size, index.len() as u64);
        }
    }

    #[test]
    fn chunk_topics_round_trip_and_refuse_look_alikes() {
        let obj = crate::sha256_hex(b"x");
        let t = chunk_topic("plant1", &obj, 17);
        assert_eq!(parse_chunk_topic("plant1", &t), Some((obj.as_str(), 17)));
        assert_eq!(parse_chunk_topic("plant2", &t), None);
        for bad in [
            format!("lathe/v1/plant1/@blob/{obj}/"),
            format!("lathe/v1/plant1/@blob/{obj}/1/2"),
            format!("lathe/v1/plant1/@blob/{obj}/-1"),
            format!("lathe/v1/plant1/@blob/{}/1", obj.to_uppercase()),
            format!("lathe/v1/plant1/@blob/{obj}/99999999999"),
            "lathe/v1/plant1/@blob/abc/1".to_string(),
        ] {
            assert_eq!(parse_chunk_topic("plant1", &bad), None, "{bad}");
        }
    }
}
