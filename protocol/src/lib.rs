//! The contract between the Lathe agent and hub: topics, messages, the bundle format and its
//! signatures, and the sync and ack rules. `SPEC.md` beside this crate is the normative text.
//!
//! This crate does no I/O and knows nothing of tokio, sockets or files: callers pass bytes in
//! and get values or bytes back.

pub mod baseline;
pub mod bundle;
pub mod canonical;
pub mod keys;
pub mod keyset;
pub mod messages;
pub mod rollout;
pub mod selftest;
pub mod sync;
pub mod topic;

pub use topic::{Channel, Name, Topic};

/// The stream names an agent syncs.
pub mod streams {
    pub const PREDICTIONS: &str = "predictions";
    pub const EVENTS: &str = "events";
    /// Closed drift windows (SPEC.md §6.3).
    pub const DRIFT: &str = "drift";
    /// Captured input rows with their outputs, for retraining (SPEC.md §6.5).
    pub const SAMPLES: &str = "samples";
    /// Loss reports (SPEC.md §5.6).
    pub const LOSSES: &str = "losses";
    /// Not a stream of records: the name loss reports give to refused readings.
    pub const READINGS: &str = "readings";
    /// Not a stream of records: the name loss reports give to dropped commands.
    pub const COMMANDS: &str = "commands";
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Lowercase hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}
