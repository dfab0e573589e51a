//! Message payloads, one type per channel. All are UTF-8 JSON objects (SPEC.md §3).
//!
//! Receivers ignore members they do not know, so a newer sender can add members without
//! breaking an older receiver.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// `state`, retained. The birth message says `online`; the Last Will says `offline`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelRef>,
    /// Why a device went offline: `lost` (the Last Will) or `shutdown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Online,
    Offline,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: u64,
}

/// `health`, not retained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub ts_ms: u64,
    pub model: Option<ModelRef>,
    /// Records waiting in the outbox, all streams.
    pub outbox_depth: u64,
    pub predictions_total: u64,
    /// Readings refused (bad JSON, missing features) since start.
    pub rejected_total: u64,
    /// Records and messages dropped by a when-full policy since start.
    pub dropped_total: u64,
}

/// `cmd/<id>`, hub to device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Command {
    /// Install and activate a bundle; `bundle` is the standard base64 of the bundle file.
    Deploy { bundle: String },
    /// Re-activate the previously active bundle.
    Rollback,
    /// Answer with the active model; changes nothing.
    Ping,
}

/// `res/<id>`, device to hub: the answer to the command with the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// What was done, or why it was refused.
    pub message: String,
    /// The active model after the command.
    pub model: Option<ModelRef>,
    /// A stable code for a refusal: a bundle verdict (`signature_threshold`, …),
    /// `bad_command`, `load_failed`, `busy`, `no_previous` or `io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// One prediction: published live on `pred` and stored as a record of stream `predictions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub ts_ms: u64,
    pub model: ModelRef,
    /// The topic the reading came in on.
    pub source: String,
    /// The reading's own `id`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reading_id: Option<Value>,
    /// Each model output, flattened to numbers (labels included).
    pub outputs: BTreeMap<String, Vec<f64>>,
}

/// One event: published live on `events` and stored as a record of stream `events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub ts_ms: u64,
    pub level: Level,
    /// A stable, machine-readable kind such as `model_activated` or `deploy_refused`.
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// One buffered record inside a sync batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub ts_ms: u64,
    /// The record itself: a [`Prediction`] or an [`Event`] as JSON, by stream.
    pub data: Value,
}

/// `sync/<stream>`, device to hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncBatch {
    pub device: String,
    pub stream: String,
    /// 16 lowercase hex digits, chosen at random when the device's outbox was created.
    pub epoch: String,
    /// Every seq at or below this was dropped by the device's when-full policy and will never
    /// be sent; 0 when none was.
    #[serde(default)]
    pub lost_through: u64,
    /// Records in ascending seq order.
    pub records: Vec<Record>,
}

/// `ack/<stream>`, hub to device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub stream: String,
    pub epoch: String,
    /// The highest seq such that the hub has stored every seq from 1 to it (lost ones count as
    /// stored); 0 when none.
    pub acked: u64,
}

/// The hub's per-(device, stream, epoch) watermark rule, without storage.
///
/// `acked` is the highest contiguous seq; `stored_above` are stored seqs above it, ascending.
/// Returns the new watermark after accounting for `lost_through` and the stored seqs.
pub fn advance_watermark(acked: u64, lost_through: u64, stored_above: impl IntoIterator<Item = u64>) -> u64 {
    let mut wm = acked.max(lost_through);
    for s in stored_above {
        if s <= wm {
            continue;
        }
        if s == wm + 1 {
            wm = s;
        } else {
            break;
        }
    }
    wm
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn commands_are_tagged_by_op() {
        let c: Command = serde_json::from_value(json!({"op": "deploy", "bundle": "AAAA"})).expect("parses");
        assert_eq!(c, Command::Deploy { bundle: "AAAA".into() });
        assert_eq!(
            serde_json::to_value(Command::Rollback).expect("ser"),
            json!({"op": "rollback"})
        );
        assert!(serde_json::from_value::<Command>(json!({"op": "format_disk"})).is_err());
    }

    fn check(acked: u64, lost: u64, stored: &[u64], expected: u64) {
        assert_eq!(
            advance_watermark(acked, lost, stored.iter().copied()),
            expected,
            "{acked} {lost} {stored:?}"
        );
    }

    #[test]
    fn watermark_is_highest_contiguous() {
        check(0, 0, &[], 0);
        check(0, 0, &[1, 2, 3], 3);
        check(0, 0, &[2, 3], 0);
        check(3, 0, &[4, 6], 4);
        check(0, 5, &[6, 7, 9], 7);
        check(10, 5, &[11], 11);
        check(4, 0, &[3, 5], 5);
    }
}
