//! Key-set updates (SPEC.md §8.7, 1.5): the fleet's trust store and threshold, replaced by a
//! signed document that the *current* trust store must sign to its *current* threshold.
//!
//! A key set is a DSSE envelope of its own payload type, published retained at
//! `lathe/v1/<fleet>/@keys`. Its canonical body names the fleet, a counter that only grows, the
//! new threshold and the new public keys. Rotating a key is a key set with the new key and
//! without the old one; revoking one is a key set without it. A device keeps the key set it
//! accepted and checks every later document (bundles, desired states, key sets) against it.

use crate::bundle::{self, Envelope, VerifyError};
use crate::canonical;
use crate::keys::{PublicKey, SigningKey, TrustStore};
use serde::{Deserialize, Serialize};

pub const KEYS_PAYLOAD_TYPE: &str = "application/vnd.lathe.keys.v1+json";
pub const KEYS_FORMAT: u32 = 1;
/// The largest key-set message a device reads.
pub const MAX_KEYS_BYTES: usize = 64 << 10;
/// The most keys a key set may hold.
pub const MAX_KEYS: usize = 64;

/// Where a fleet's key set is published (retained, QoS 1).
pub fn keys_topic(fleet: &str) -> String {
    format!("{}/{fleet}/@keys", crate::topic::ROOT)
}

/// The signed body of a key set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySet {
    pub format: u32,
    pub fleet: String,
    /// Grows with every key set the fleet's signers make (`lathe-hub` uses the signing time in
    /// milliseconds); a device refuses one not above the one it holds.
    pub counter: u64,
    /// Unix seconds; informative.
    pub created: u64,
    /// Valid signatures from distinct keys of this set that a document needs from now on.
    pub threshold: usize,
    /// Public keys, base64 of the 32 raw bytes, as in a trust store file (SPEC §4.5).
    pub keys: Vec<String>,
}

impl KeySet {
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let v = serde_json::to_value(self).expect("a key set converts to JSON");
        canonical::encode(&v).expect("a key set holds integers only")
    }

    /// The trust store it describes, after the rules: a known format, 1 to 64 distinct valid
    /// keys, and a threshold from 1 to the number of keys.
    pub fn trust(&self) -> Result<TrustStore, String> {
        if self.format != KEYS_FORMAT {
            return Err(format!(
                "format {} is not supported (expected {KEYS_FORMAT})",
                self.format
            ));
        }
        crate::Name::new(self.fleet.clone()).map_err(|e| format!("fleet: {e}"))?;
        if self.keys.is_empty() || self.keys.len() > MAX_KEYS {
            return Err(format!("{} keys: a key set holds 1 to {MAX_KEYS}", self.keys.len()));
        }
        let mut keys = Vec::with_capacity(self.keys.len());
        for (i, text) in self.keys.iter().enumerate() {
            let k = PublicKey::from_text(text).ok_or_else(|| format!("key {i} is not an Ed25519 public key"))?;
            if keys.contains(&k) {
                return Err(format!("key {i} is listed twice"));
            }
            keys.push(k);
        }
        if self.threshold == 0 || self.threshold > keys.len() {
            return Err(format!(
                "threshold {} with {} keys: it must be 1 to the number of keys",
                self.threshold,
                keys.len()
            ));
        }
        Ok(TrustStore::new(keys))
    }
}

/// Why a key set was refused. `code()` is the stable name in SPEC.md.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    #[error("key set of {0} bytes is larger than {MAX_KEYS_BYTES}")]
    TooLarge(usize),
    #[error("key set: {0}")]
    Envelope(VerifyError),
    #[error("key set is invalid: {0}")]
    Invalid(String),
    #[error("key set is for fleet {0}, not this device's")]
    NotTargeted(String),
    #[error("key set #{counter} is not newer than #{last}, already accepted: a replay")]
    Replayed { counter: u64, last: u64 },
}

impl KeySetError {
    pub fn code(&self) -> &'static str {
        match self {
            KeySetError::TooLarge(_) => "too_large",
            KeySetError::Envelope(e) => e.code(),
            KeySetError::Invalid(_) => "invalid_keys",
            KeySetError::NotTargeted(_) => "not_targeted",
            KeySetError::Replayed { .. } => "replayed",
        }
    }
}

/// A key set whose signatures and rules passed.
#[derive(Debug, Clone)]
pub struct VerifiedKeySet {
    pub keys: KeySet,
    pub trust: TrustStore,
    pub signed_by: Vec<String>,
    /// The canonical body, as kept by the device.
    pub body: Vec<u8>,
}

/// Verify a key-set message against the trust store and threshold in force: size, signatures
/// (before anything else is read), canonical form, rules, fleet, and a counter above `last`
/// (SPEC.md §8.7).
pub fn verify_key_set(
    message: &[u8],
    trust: &TrustStore,
    threshold: usize,
    fleet: &str,
    last: Option<u64>,
) -> Result<VerifiedKeySet, KeySetError> {
    if message.len() > MAX_KEYS_BYTES {
        return Err(KeySetError::TooLarge(message.len()));
    }
    let env: Envelope = serde_json::from_slice(message)
        .map_err(|e| KeySetError::Envelope(VerifyError::MalformedEnvelope(e.to_string())))?;
    let (body, signed_by) =
        bundle::check_signatures(&env, KEYS_PAYLOAD_TYPE, trust, threshold).map_err(KeySetError::Envelope)?;
    let keys = parse_body(&body)?;
    let new_trust = keys.trust().map_err(KeySetError::Invalid)?;
    if keys.fleet != fleet {
        return Err(KeySetError::NotTargeted(keys.fleet));
    }
    if let Some(last) = last {
        if keys.counter <= last {
            return Err(KeySetError::Replayed {
                counter: keys.counter,
                last,
            });
        }
    }
    Ok(VerifiedKeySet {
        keys,
        trust: new_trust,
        signed_by,
        body,
    })
}

/// A key set's canonical body, as a device kept it: parsed and checked again, without
/// signatures (they were checked when it was accepted).
pub fn parse_body(body: &[u8]) -> Result<KeySet, KeySetError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| KeySetError::Invalid(e.to_string()))?;
    if canonical::encode(&value).ok().as_deref() != Some(body) {
        return Err(KeySetError::Envelope(VerifyError::NonCanonicalManifest));
    }
    let keys: KeySet = serde_json::from_value(value).map_err(|e| KeySetError::Invalid(e.to_string()))?;
    keys.trust().map_err(KeySetError::Invalid)?;
    Ok(keys)
}

/// Sign a key set: the message a hub publishes, retained.
pub fn sign_key_set(keys: &KeySet, signers: &[&SigningKey]) -> Result<Vec<u8>, String> {
    keys.trust()?;
    if signers.is_empty() {
        return Err("at least one signing key is needed".into());
    }
    let env = bundle::sign_envelope(KEYS_PAYLOAD_TYPE, &keys.canonical_bytes(), signers);
    Ok(serde_json::to_vec(&env).expect("an envelope serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_seed(&[seed; 32])
    }

    fn set(counter: u64, threshold: usize, keys: &[&SigningKey]) -> KeySet {
        KeySet {
            format: KEYS_FORMAT,
            fleet: "plant1".into(),
            counter,
            created: 1,
            threshold,
            keys: keys.iter().map(|k| k.public_key().to_text()).collect(),
        }
    }

    /// Verify `message` against a store of `trusted` at `threshold`, last counter 10; the code.
    fn check(message: &[u8], trusted: &[&SigningKey], threshold: usize) -> Result<VerifiedKeySet, &'static str> {
        let trust = TrustStore::new(trusted.iter().map(|k| k.public_key()));
        verify_key_set(message, &trust, threshold, "plant1", Some(10)).map_err(|e| e.code())
    }

    #[test]
    fn a_key_set_needs_the_current_threshold() {
        let (k1, k2, k3) = (key(1), key(2), key(3));
        let rotated = set(11, 1, &[&k2, &k3]);
        let by_k1 = sign_key_set(&rotated, &[&k1]).expect("sign");
        let v = check(&by_k1, &[&k1], 1).expect("accepted");
        assert_eq!(v.trust.len(), 2);
        assert!(v.trust.get(&k1.key_id()).is_none(), "k1 is revoked by leaving it out");
        assert_eq!(check(&by_k1, &[&k1, &k2], 2).err(), Some("signature_threshold"));
        let by_both = sign_key_set(&rotated, &[&k1, &k2]).expect("sign");
        assert!(check(&by_both, &[&k1, &k2], 2).is_ok());
        // Signed by a key of the new set only: the current store does not know it.
        let by_k3 = sign_key_set(&rotated, &[&k3]).expect("sign");
        assert_eq!(check(&by_k3, &[&k1], 1).err(), Some("signature_threshold"));
    }

    #[test]
    fn a_key_set_is_refused_when_replayed_misdirected_or_invalid() {
        let k1 = key(1);
        let sign = |s: &KeySet| {
            let env = bundle::sign_envelope(KEYS_PAYLOAD_TYPE, &s.canonical_bytes(), &[&k1]);
            serde_json::to_vec(&env).expect("json")
        };
        assert_eq!(check(&sign(&set(10, 1, &[&k1])), &[&k1], 1).err(), Some("replayed"));
        assert_eq!(check(&sign(&set(9, 1, &[&k1])), &[&k1], 1).err(), Some("replayed"));
        let mut other = set(11, 1, &[&k1]);
        other.fleet = "plant2".into();
        assert_eq!(check(&sign(&other), &[&k1], 1).err(), Some("not_targeted"));
        assert_eq!(check(&sign(&set(11, 2, &[&k1])), &[&k1], 1).err(), Some("invalid_keys"));
        assert_eq!(check(&sign(&set(11, 0, &[&k1])), &[&k1], 1).err(), Some("invalid_keys"));
        assert_eq!(
            check(&sign(&set(11, 1, &[&k1, &k1])), &[&k1], 1).err(),
            Some("invalid_keys")
        );
        let mut bad = set(11, 1, &[&k1]);
        bad.keys.push("not a key".into());
        assert_eq!(check(&sign(&bad), &[&k1], 1).err(), Some("invalid_keys"));
        // A desired state is not a key set, even signed by the same key.
        let env = bundle::sign_envelope(
            crate::rollout::DESIRED_PAYLOAD_TYPE,
            &set(11, 1, &[&k1]).canonical_bytes(),
            &[&k1],
        );
        let wrong = serde_json::to_vec(&env).expect("json");
        assert_eq!(check(&wrong, &[&k1], 1).err(), Some("wrong_payload_type"));
        assert_eq!(
            check(&vec![b' '; MAX_KEYS_BYTES + 1], &[&k1], 1).err(),
            Some("too_large")
        );
        assert_eq!(check(b"{", &[&k1], 1).err(), Some("malformed_envelope"));
    }

    #[test]
    fn a_kept_body_parses_again() {
        let k1 = key(1);
        let s = set(11, 1, &[&k1]);
        assert_eq!(parse_body(&s.canonical_bytes()), Ok(s.clone()));
        let mut loose = s.canonical_bytes();
        loose.insert(1, b' ');
        assert!(parse_body(&loose).is_err(), "not canonical");
    }
}
