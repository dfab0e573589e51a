//! Ed25519 signing keys, public keys, key ids and the trust store.
//!
//! Text formats (SPEC.md §4.5):
//! - a private key file holds one line: the standard base64 of a PKCS#8 v2 Ed25519 document;
//! - a public key is the standard base64 of the raw 32-byte key;
//! - a trust store holds one public key per line, optionally followed by white space and a
//!   comment; blank lines and lines starting with `#` are ignored.
//!
//! A key id is the first 16 lowercase hex digits of SHA-256 over the raw 32-byte public key.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("private key is not base64 of a PKCS#8 Ed25519 key")]
    BadPrivateKey,
    #[error("line {line}: public key is not base64 of 32 bytes")]
    BadPublicKey { line: usize },
    #[error("could not generate a key: the system random source failed")]
    Random,
}

/// A key id: 16 lowercase hex digits of SHA-256 over the raw public key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub String);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl KeyId {
    pub fn of(public_key: &[u8]) -> KeyId {
        let d = ring::digest::digest(&ring::digest::SHA256, public_key);
        KeyId(crate::hex(&d.as_ref()[..8]))
    }
}

/// A private signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    /// A new random key.
    pub fn generate(rng: &dyn ring::rand::SecureRandom) -> Result<SigningKey, KeyError> {
        let doc = Ed25519KeyPair::generate_pkcs8(rng).map_err(|_| KeyError::Random)?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// The key for a 32-byte seed (RFC 8032 private key), as a PKCS#8 v2 document.
    /// Used for reproducible test vectors; real keys come from [`SigningKey::generate`].
    pub fn from_seed(seed: &[u8; 32]) -> SigningKey {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32-byte seed is a valid key");
        let mut der = vec![
            0x30, 0x53, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
        ];
        der.extend_from_slice(seed);
        der.extend_from_slice(&[0xa1, 0x23, 0x03, 0x21, 0x00]);
        der.extend_from_slice(pair.public_key().as_ref());
        Self::from_pkcs8(&der).expect("a PKCS#8 v2 document built from a seed parses")
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<SigningKey, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| KeyError::BadPrivateKey)?;
        Ok(SigningKey {
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// Parse the text of a private key file.
    pub fn from_text(text: &str) -> Result<SigningKey, KeyError> {
        let der = B64.decode(text.trim()).map_err(|_| KeyError::BadPrivateKey)?;
        Self::from_pkcs8(&der)
    }

    /// The text of a private key file.
    pub fn to_text(&self) -> String {
        format!("{}\n", B64.encode(&self.pkcs8))
    }

    pub fn public_key(&self) -> PublicKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(raw)
    }

    pub fn key_id(&self) -> KeyId {
        self.public_key().key_id()
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }
}

/// A raw Ed25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.0)
    }

    pub fn to_text(&self) -> String {
        B64.encode(self.0)
    }

    pub fn from_text(text: &str) -> Option<PublicKey> {
        let raw = B64.decode(text.trim()).ok()?;
        Some(PublicKey(raw.try_into().ok()?))
    }

    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0).verify(msg, sig).is_ok()
    }
}

/// The public keys a verifier trusts, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    keys: BTreeMap<KeyId, PublicKey>,
}

impl TrustStore {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> TrustStore {
        TrustStore {
            keys: keys.into_iter().map(|k| (k.key_id(), k)).collect(),
        }
    }

    /// Parse the text of a trust store file.
    pub fn parse(text: &str) -> Result<TrustStore, KeyError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or_default();
            keys.push(PublicKey::from_text(first).ok_or(KeyError::BadPublicKey { line: i + 1 })?);
        }
        Ok(TrustStore::new(keys))
    }

    pub fn get(&self, id: &KeyId) -> Option<&PublicKey> {
        self.keys.get(id)
    }

    /// The keys, by key id.
    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values()
    }

    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.keys().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_round_trips() {
        let k = SigningKey::generate(&ring::rand::SystemRandom::new()).expect("keygen");
        let back = SigningKey::from_text(&k.to_text()).expect("parses");
        assert_eq!(back.public_key(), k.public_key());
        let pk = PublicKey::from_text(&k.public_key().to_text()).expect("parses");
        assert_eq!(pk, k.public_key());
        assert_eq!(k.key_id().0.len(), 16);
        let sig = k.sign(b"hello");
        assert!(pk.verify(b"hello", &sig));
        assert!(!pk.verify(b"hellO", &sig));
    }

    #[test]
    fn seed_keys_are_stable_and_round_trip() {
        let k = SigningKey::from_seed(&[7u8; 32]);
        let again = SigningKey::from_text(&k.to_text()).expect("parses");
        assert_eq!(again.public_key(), k.public_key());
        assert_eq!(k.sign(b"x"), SigningKey::from_seed(&[7u8; 32]).sign(b"x"));
    }

    #[test]
    fn trust_store_parsing() {
        let k = SigningKey::generate(&ring::rand::SystemRandom::new()).expect("keygen");
        let text = format!("# hub keys\n\n{} line-3 signer\n", k.public_key().to_text());
        let ts = TrustStore::parse(&text).expect("parses");
        assert_eq!(ts.ids(), vec![k.key_id()]);
        assert!(matches!(
            TrustStore::parse("abc\n"),
            Err(KeyError::BadPublicKey { line: 1 })
        ));
    }
}
