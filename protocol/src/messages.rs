//! Message payloads, one type per channel. All are UTF-8 JSON objects (SPEC.md §3).
//!
//! Receivers ignore members they do not know, so a newer sender can add members without
//! breaking an older receiver. Types that are read off the wire deserialise straight into
//! typed fields: unknown members are skipped without being buffered, and nothing is parsed
//! into a `serde_json::Value` first. Callers check a payload's size before parsing it.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
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

/// `health`, not retained (SPEC.md §3.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub ts_ms: u64,
    pub model: Option<ModelRef>,
    /// Records waiting in the outbox, all streams.
    pub outbox_depth: u64,
    /// Bytes of record data waiting in the outbox, all streams.
    #[serde(default)]
    pub outbox_bytes: u64,
    /// Age of the oldest record waiting, by the device's clock; absent when none waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_age_ms: Option<u64>,
    /// Free bytes on the filesystem that holds the outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_free_bytes: Option<u64>,
    /// Reading messages received since the agent started.
    #[serde(default)]
    pub readings_total: u64,
    /// Predictions made durable in the outbox since the agent started.
    pub predictions_total: u64,
    /// Reading messages refused whole since the agent started, whatever the cause.
    pub rejected_total: u64,
    /// Rows of accepted reading messages whose inference failed, since the agent started.
    #[serde(default)]
    pub inference_failed_total: u64,
    /// Records (predictions, events, loss reports) lost since the agent started, whatever the
    /// cause. Readings are not records: refused readings are counted in `rejected_total`.
    pub dropped_total: u64,
    /// Every loss since the outbox was created, per stream and cause. Survives restarts.
    #[serde(default)]
    pub losses: Vec<LossTotal>,
    /// The box the agent runs on (1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<SystemHealth>,
    /// The agent's own process (1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessHealth>,
    /// Inference latency of the active model since the previous health message (1.3); of the
    /// first slot's model on a device with several (1.6, SPEC §8.8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    /// The same, of the other slots' models (1.6), each named by its model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latencies: Vec<Latency>,
    /// Records waiting in the outbox, per stream (1.3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<StreamDepth>,
}

/// CPU, memory, uptime and temperature of the box.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemHealth {
    /// All CPUs together, 0 to 100, since the previous sample.
    pub cpu_percent: f32,
    pub cpus: u32,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub uptime_secs: u64,
    /// The hottest temperature sensor the board exposes, in °C; absent when it exposes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessHealth {
    pub rss_bytes: u64,
    pub uptime_secs: u64,
}

/// Inference calls of one model: how long a call to the engine took, by percentile. Calls run
/// a batch of rows; the figures are bucketed to within 19% (quarter powers of two).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub model: ModelRef,
    pub calls: u64,
    pub rows: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamDepth {
    pub stream: String,
    pub depth: u64,
    pub bytes: u64,
}

/// One loss counter: everything of `stream` lost for `cause`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossTotal {
    pub stream: String,
    pub cause: String,
    pub total: u64,
}

/// `cmd/<id>`, hub to device, as the hub builds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Command {
    /// Answer with the active model; changes nothing. Since 1.4 the only command: deploys and
    /// rollbacks are signed desired states (SPEC.md §8).
    Ping,
}

/// The longest piece of a received value that an answer or an event repeats.
pub const MAX_ECHO: usize = 64;

/// Cut a received string to at most `max` bytes (on a character boundary), marking the cut.
pub fn echo(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes)", &s[..end], s.len()))
}

/// A command as received: borrowed from the payload, unknown members skipped unbuffered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceivedCommand {
    Ping,
}

impl ReceivedCommand {
    /// Parse a command payload. The caller has checked its size. Errors quote at most
    /// [`MAX_ECHO`] bytes of what was received.
    pub fn parse(payload: &[u8]) -> Result<ReceivedCommand, String> {
        #[derive(Deserialize)]
        struct Wire<'a> {
            #[serde(borrow)]
            op: Cow<'a, str>,
        }
        // serde would take a struct from an array too (`["ping"]`); a command is an object.
        if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err("not a command: a command is a JSON object".into());
        }
        let w: Wire<'_> = serde_json::from_slice(payload).map_err(|e| format!("not a command: {e}"))?;
        match w.op.as_ref() {
            "ping" => Ok(ReceivedCommand::Ping),
            op @ ("deploy" | "rollback") => Err(format!(
                "{op} is not a command since protocol 1.4: deploys and rollbacks are signed desired states (lathe-hub deploy, lathe-hub rollback)"
            )),
            other => Err(format!("unknown op {:?} (known: ping)", echo(other, MAX_ECHO))),
        }
    }

    pub fn op(&self) -> &'static str {
        "ping"
    }
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
    /// `bad_command`, `load_failed`, `selftest_failed`, `baseline_invalid`, `busy`,
    /// `no_previous` or `io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// One prediction: published live on `pred` and stored as a record of stream `predictions`.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction<'a> {
    pub ts_ms: u64,
    pub model: &'a ModelRef,
    /// The topic the reading came in on.
    pub source: &'a str,
    /// The reading's own `id`, as JSON, when it had one (cut to a bounded length).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reading_id: Option<&'a RawValue>,
    /// Each model output, flattened to numbers (labels included), when it has at most
    /// `predictions.max_values` values per row.
    pub outputs: BTreeMap<&'a str, &'a [f64]>,
    /// The wider outputs (1.7): their `predictions.top_k` largest values, as `[index, value]`
    /// pairs, largest first (ties by lower index).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub top: BTreeMap<&'a str, Vec<(usize, f64)>>,
}

/// The `k` largest values of `values` as `(index, value)`, largest first, ties by lower index;
/// NaN values are never picked.
pub fn top_k(values: &[f64], k: usize) -> Vec<(usize, f64)> {
    let mut best: Vec<(usize, f64)> = Vec::with_capacity(k + 1);
    for (i, v) in values.iter().copied().enumerate() {
        if v.is_nan() || (best.len() == k && best.last().is_none_or(|(_, w)| v <= *w)) {
            continue;
        }
        let at = best.partition_point(|(_, w)| *w >= v);
        best.insert(at, (i, v));
        best.truncate(k);
    }
    best
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

/// A loss report: a record of stream `losses` (SPEC.md §5.6). `count` items of `stream` were
/// lost for `cause` since the previous report for the same stream and cause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossReport {
    pub ts_ms: u64,
    pub stream: String,
    pub cause: String,
    pub count: u64,
    /// Everything of this stream lost for this cause since the outbox was created.
    pub total: u64,
    /// When the first and the last of the `count` losses happened (device clock).
    pub first_ms: u64,
    pub last_ms: u64,
}

/// The identity a record had before the agent moved it to a new epoch (SPEC.md §5.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub epoch: String,
    pub seq: u64,
}

/// One record inside a received sync batch, borrowed from the payload.
#[derive(Debug, Clone, Deserialize)]
pub struct Record<'a> {
    pub seq: u64,
    pub ts_ms: u64,
    /// The record itself, a JSON value (a [`Prediction`], an [`Event`], a [`LossReport`]), as
    /// the device wrote it.
    #[serde(borrow)]
    pub data: &'a RawValue,
    /// Made before the device's current connection: delivered late, not live.
    #[serde(default)]
    pub historical: bool,
    #[serde(default)]
    pub origin: Option<Origin>,
}

/// `sync/<stream>`, device to hub, as received (borrowed from the decoded payload).
#[derive(Debug, Clone, Deserialize)]
pub struct SyncBatch<'a> {
    pub device: String,
    pub stream: String,
    /// 16 lowercase hex digits (SPEC.md §5.1).
    pub epoch: String,
    /// Every seq at or below this was dropped by the device and will never be sent; 0 when
    /// none was.
    #[serde(default)]
    pub lost_through: u64,
    /// The device's acked watermark in this epoch: every seq at or below it was acked by the
    /// hub and deleted on the device. Absent from older agents.
    #[serde(default)]
    pub acked: Option<u64>,
    /// Records in ascending seq order.
    #[serde(borrow)]
    pub records: Vec<Record<'a>>,
}

/// `ack/<stream>`, hub to device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub stream: String,
    pub epoch: String,
    /// The highest seq such that the hub has stored every seq from 1 to it (lost ones count as
    /// stored); 0 when none.
    pub acked: u64,
    /// The lowest seq of the batch that the hub holds a different record for (SPEC.md §5.5):
    /// the device's outbox was restored from an older copy, or someone else wrote under its
    /// name. The device moves its unacknowledged records to a new epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<u64>,
    /// Batch encodings the hub accepts besides plain JSON (`"zstd"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accepts: Vec<String>,
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

    fn cmd(payload: &str, expected: Result<&str, &str>) {
        match (ReceivedCommand::parse(payload.as_bytes()), expected) {
            (Ok(c), Ok(op)) => assert_eq!(c.op(), op, "{payload}"),
            (Err(e), Err(want)) => assert!(e.contains(want), "{payload}: {e} lacks {want}"),
            (got, want) => panic!("{payload}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn commands_parse_by_op_and_skip_the_rest() {
        cmd(r#"{"op":"ping"}"#, Ok("ping"));
        cmd(r#"{"op":"ping","extra":[1,2,{"a":"b"}]}"#, Ok("ping"));
        cmd(r#"{"padding":[[[0,0,0]]],"op":"ping"}"#, Ok("ping"));
        // Unsigned, they could flip a device between models: signed desired states only.
        cmd(
            r#"{"op":"rollback"}"#,
            Err("rollback is not a command since protocol 1.4"),
        );
        cmd(r#"{"op":"deploy","bundle":"AAAA"}"#, Err("deploy is not a command"));
        cmd(r#"{"op":"format_disk"}"#, Err("unknown op \"format_disk\""));
        cmd(r#"{"bundle":"AAAA"}"#, Err("missing field `op`"));
        cmd("[1]", Err("not a command"));
        // Regression: an array was taken field by field and executed as a ping.
        cmd(r#"["ping"]"#, Err("a command is a JSON object"));
        cmd(r#" ["deploy","AAAA"]"#, Err("a command is a JSON object"));
        cmd(" \n{\"op\":\"ping\"}", Ok("ping"));
        let long = format!(r#"{{"op":"{}"}}"#, "x".repeat(10_000));
        let e = ReceivedCommand::parse(long.as_bytes()).expect_err("unknown op");
        assert!(e.len() < 200, "the echo of a long op is cut: {} bytes", e.len());
        assert!(e.contains("(10000 bytes)"), "{e}");
    }

    #[test]
    fn hub_commands_round_trip_through_the_parser() {
        let bytes = serde_json::to_vec(&Command::Ping).expect("ser");
        assert_eq!(ReceivedCommand::parse(&bytes), Ok(ReceivedCommand::Ping));
    }

    #[test]
    fn echo_cuts_on_a_character_boundary() {
        assert_eq!(echo("short", 64), "short");
        let s = "é".repeat(40); // 80 bytes
        let e = echo(&s, 63);
        assert!(e.starts_with(&"é".repeat(31)) && e.ends_with("(80 bytes)"), "{e}");
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

    #[test]
    fn top_k_takes_the_largest_values_first() {
        let v = [0.1, 0.7, f64::NAN, 0.7, -1.0, 0.2];
        assert_eq!(top_k(&v, 3), vec![(1, 0.7), (3, 0.7), (5, 0.2)]);
        assert_eq!(top_k(&v, 0), vec![]);
        assert_eq!(top_k(&v, 10).len(), 5);
        assert_eq!(top_k(&[], 2), vec![]);
    }
}
