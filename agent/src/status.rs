//! `lathe status`: what the agent is doing, read from its database. Works whether or not the
//! agent or the broker is up.
//!
//! It names every problem a technician should act on, each with a one-line hint, and `lathe
//! status` exits 1 when there is one: the agent is stopped, dead or not connected, a
//! subscription was refused, no model is deployed, inference is failing, records were lost
//! recently, the disk is under its floor, records wait with no ack from the hub for too long,
//! or acks were refused (forged, or an outbox restored from an old copy). What only a running
//! agent can know (its connections, the last minute's counts) is marked unknown when it is not
//! running.

use crate::config::{OutboxConfig, StatusConfig};
use crate::deploy::DeployState;
use crate::store::Store;
use crate::sync::now_ms;
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// What `lathe status` compares against.
#[derive(Debug, Clone)]
pub struct Thresholds {
    pub status: StatusConfig,
    pub min_free_bytes: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            status: StatusConfig::default(),
            min_free_bytes: OutboxConfig::default().min_free_bytes,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StreamReport {
    pub stream: String,
    pub waiting: u64,
    pub bytes: u64,
    pub epoch: String,
    /// Wire seqs of the current epoch.
    pub assigned: u64,
    pub acked: u64,
}

#[derive(Debug, Serialize)]
pub struct LossReport {
    pub stream: String,
    pub cause: String,
    pub total: u64,
    /// Not yet reported to the hub.
    pub unreported: u64,
    pub last_ms: u64,
}

/// What the agent has done since it started: written with each heartbeat (meta `activity`)
/// and on a clean stop, read by `lathe status`. Bounded: a minute and a bit of samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Activity {
    pub started_ms: u64,
    pub predictions: u64,
    /// Reading messages refused whole.
    pub rejected: u64,
    /// Rows whose inference failed.
    pub inference_failed: u64,
    pub last_prediction_ms: Option<u64>,
    pub last_failure_ms: Option<u64>,
    pub last_failure: Option<String>,
    /// `[ts_ms, predictions, rejected, inference_failed]` at each update of the last 70 s.
    pub samples: Vec<[u64; 4]>,
    /// The box, the agent's process, inference latency and the outbox per stream, as last
    /// sampled.
    #[serde(default)]
    pub health: crate::metrics::Snapshot,
}

/// The longest failure reason kept.
const MAX_REASON: usize = 512;
const MINUTE_MS: u64 = 60_000;

impl Activity {
    pub fn started(now_ms: u64) -> Activity {
        Activity {
            started_ms: now_ms,
            ..Activity::default()
        }
    }

    /// Take the metrics' counts and add a sample.
    pub fn update(&mut self, m: &crate::metrics::Metrics, now_ms: u64) {
        self.predictions = m.predictions.get();
        self.rejected = m.rejected.get();
        self.inference_failed = m.inference_failed.get();
        self.health = m.snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.last_prediction_ms = Some(m.last_prediction_ms.get()).filter(|t| *t > 0);
        if let Some((ms, reason)) = m.last_failure() {
            self.last_failure_ms = Some(ms);
            self.last_failure = Some(protocol::messages::echo(&reason, MAX_REASON).into_owned());
        }
        self.sample(now_ms);
    }

    fn sample(&mut self, now_ms: u64) {
        self.samples
            .push([now_ms, self.predictions, self.rejected, self.inference_failed]);
        // Keep the newest sample that is a minute old, and everything after it.
        let cutoff = now_ms.saturating_sub(MINUTE_MS);
        let keep_from = self.samples.iter().rposition(|s| s[0] <= cutoff).unwrap_or(0);
        self.samples.drain(..keep_from);
    }

    /// Predictions, refused readings and failed rows over the minute before the last update:
    /// since the agent started, when that was less than a minute before.
    pub fn last_minute(&self) -> [u64; 3] {
        let Some(last) = self.samples.last() else {
            return [0; 3];
        };
        let cutoff = last[0].saturating_sub(MINUTE_MS);
        let base = match self.samples.iter().rev().find(|s| s[0] <= cutoff) {
            Some(s) => [s[1], s[2], s[3]],
            None if self.started_ms >= cutoff => [0; 3],
            None => [self.samples[0][1], self.samples[0][2], self.samples[0][3]],
        };
        [
            last[1].saturating_sub(base[0]),
            last[2].saturating_sub(base[1]),
            last[3].saturating_sub(base[2]),
        ]
    }
}

/// The activity as `lathe status` shows it.
#[derive(Debug, Serialize)]
pub struct ActivityReport {
    /// The box, the agent's process and inference latency, as last sampled.
    pub health: crate::metrics::Snapshot,
    pub since_ms: u64,
    pub predictions: u64,
    pub rejected_readings: u64,
    pub inference_failed_rows: u64,
    /// Over the last minute; absent when the agent is not running.
    pub last_minute: Option<LastMinute>,
    pub last_prediction_ms: Option<u64>,
    pub last_failure_ms: Option<u64>,
    pub last_failure: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LastMinute {
    pub predictions: u64,
    pub rejected_readings: u64,
    pub inference_failed_rows: u64,
}

/// A problem a technician should act on, and what to do about it.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub problem: String,
    pub hint: String,
}

fn problem(problem: String, hint: &str) -> Problem {
    Problem {
        problem,
        hint: hint.to_string(),
    }
}

/// A model slot as `lathe status` shows it.
#[derive(Debug, Serialize)]
pub struct SlotReport {
    /// The slot's name; empty for the default slot.
    pub slot: String,
    pub model: Option<Value>,
    pub previous_model: Option<Value>,
    pub drift: Option<crate::drift::DriftState>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub state_dir: String,
    /// `running`; `stopped` (it stopped cleanly); `not_running` (it died, or never ran).
    pub agent: String,
    pub heartbeat_age_s: Option<u64>,
    /// When the agent last stopped cleanly, if it is not running.
    pub stopped_ms: Option<u64>,
    pub activity: Option<ActivityReport>,
    pub connection: Value,
    /// The readings link, when the agent has input topics.
    pub inputs_connection: Value,
    /// The model slot `model` and `drift` are of; empty for the default slot.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub slot: String,
    pub model: Option<Value>,
    pub previous_model: Option<Value>,
    /// Where models run (`engine.device`), as the agent last decided at start-up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::engine::Placement>,
    /// The signed key set in force (`counter`, `keys`, `threshold`), if the device accepted
    /// one; otherwise it trusts `trust.keys_file`.
    pub key_set: Option<Value>,
    pub outbox_depth: u64,
    pub outbox_bytes: u64,
    pub outbox_by_stream: Vec<StreamReport>,
    /// How long the oldest waiting record has waited, by this device's clock.
    pub oldest_record_age_s: Option<u64>,
    pub disk_free_bytes: Option<u64>,
    pub disk_floor_bytes: u64,
    pub losses: Vec<LossReport>,
    pub acks_refused: u64,
    pub last_sync: Option<Value>,
    /// Drift of the active model against its baseline: the last closed window.
    pub drift: Option<crate::drift::DriftState>,
    /// The other model slots of a device that runs several models (SPEC §8.8); `model` and
    /// `drift` are the first slot's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<SlotReport>,
    /// Problems a technician should know of; empty when all is well.
    pub problems: Vec<Problem>,
}

/// The one object `lathe status --json` prints when it cannot read the state at all.
pub fn failure(message: &str, hint: &str) -> serde_json::Value {
    serde_json::json!({"agent": "unknown", "error": message, "problems": [problem(message.to_string(), hint)]})
}

/// Unix seconds as a UTC date and time: `2026-11-29 18:46:15 UTC`.
pub fn utc(secs: u64) -> String {
    // Howard Hinnant's days-to-civil algorithm, for the proleptic Gregorian calendar.
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn human_secs(s: u64) -> String {
    match s {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// Why the state cannot be read, with what to do about it.
#[derive(Debug, Clone)]
pub struct ReadError {
    pub message: String,
    pub hint: &'static str,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; {}", self.message, self.hint)
    }
}

const PERMISSION_HINT: &str =
    "run it as root or as the user the agent runs as (sudo lathe status), or give your user read access";

fn read_error(db: &Path, e: &std::io::Error) -> ReadError {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => ReadError {
            message: format!("permission denied reading {}", db.display()),
            hint: PERMISSION_HINT,
        },
        std::io::ErrorKind::NotFound => ReadError {
            message: format!("no agent database at {}", db.display()),
            hint: "has `lathe run` ever started with this state_dir? Check device.state_dir",
        },
        _ => ReadError {
            message: format!("cannot read {}: {e}", db.display()),
            hint: "check the state_dir's filesystem",
        },
    }
}

/// Read the agent's state from its database.
pub fn report(state_dir: &Path, t: &Thresholds) -> Result<Report, ReadError> {
    let db = crate::config::db_path(state_dir);
    // std tells a missing file from one we may not read; SQLite says "unable to open" for both.
    std::fs::File::open(&db).map_err(|e| read_error(&db, &e))?;
    let fail = |e: crate::store::StoreError| ReadError {
        message: e.to_string(),
        hint: "the database may be damaged; `lathe run` checks it at start",
    };
    let store = Store::open_readonly(&db).map_err(fail)?;
    let meta = |k: &str| store.get_meta(k).map_err(fail);
    let json = |k: &str| -> Result<Value, ReadError> {
        Ok(meta(k)?
            .and_then(|c| serde_json::from_str(&c).ok())
            .unwrap_or(Value::Null))
    };
    let now = now_ms();
    let heartbeat_ms = meta("heartbeat_ms")?.and_then(|h| h.parse::<u64>().ok());
    let heartbeat_age_s = heartbeat_ms.map(|h| now.saturating_sub(h) / 1000);
    // The agent writes its pid into the state_dir's lock and clears it on a clean stop: a live
    // process there is a running agent, even one that cannot write its heartbeat (a full
    // disk), and a pid whose process is gone is an agent that died, whatever an earlier clean
    // stop left behind.
    let lock = lock_state(state_dir);
    let stopped_ms = meta("stopped_ms")?
        .and_then(|h| h.parse::<u64>().ok())
        .filter(|s| heartbeat_ms.is_none_or(|h| *s >= h))
        .filter(|_| matches!(lock, Lock::Empty | Lock::Unknown));
    let fresh = stopped_ms.is_none() && heartbeat_age_s.is_some_and(|a| a <= 15);
    let running = match lock {
        Lock::Alive(_) => true,
        Lock::Dead(_) => false,
        Lock::Empty | Lock::Unknown => fresh,
    };
    let pid = match lock {
        Lock::Alive(p) => Some(p),
        _ => None,
    };
    let stale = |v: Value| {
        if running || v.is_null() {
            v
        } else {
            serde_json::json!({"state": "unknown", "error": "the agent is not running", "last_known": v})
        }
    };
    let connection = stale(json("conn")?);
    let inputs_connection = stale(json("inputs_conn")?);
    let activity: Option<Activity> = meta("activity")?.and_then(|a| serde_json::from_str(&a).ok());
    let mut problems = vec![];
    let mut slots = vec![];
    // The slots the agent last ran with, in its config's order; else the ones on disk.
    let names = match meta("slots")?.and_then(|s| serde_json::from_str::<Vec<String>>(&s).ok()) {
        Some(names) if !names.is_empty() => names.into_iter().map(|s| (!s.is_empty()).then_some(s)).collect(),
        _ => slot_names(state_dir, meta("deploy_state")?.is_some()),
    };
    for slot in names {
        slots.push(slot_report(&meta, slot, &mut problems)?);
    }
    // The first slot is the one `model` and `drift` have always shown.
    let first = slots.remove(0);
    let engine: Option<crate::engine::Placement> = meta("engine")?.and_then(|e| serde_json::from_str(&e).ok());
    if let Some(e) = engine
        .as_ref()
        .filter(|e| e.requested == crate::engine::Device::Cuda && e.used != "cuda")
    {
        problems.push(problem(
            format!(
                "engine.device is cuda, but models run on the CPU: {}",
                e.reason.as_deref().unwrap_or("the GPU is not used")
            ),
            "install the NVIDIA driver and the CUDA 12 libraries (cudart, cublas, nvrtc, cudnn), run the GPU build of lathe, then restart it; or set engine.device = \"cpu\"",
        ));
    }
    let last_sync = json("last_ack")?;
    let last_sync = (!last_sync.is_null()).then_some(last_sync);
    let streams: Vec<StreamReport> = store
        .streams()
        .map(|(name, s)| StreamReport {
            stream: name.to_string(),
            waiting: s.depth,
            bytes: s.bytes,
            epoch: s.epoch().epoch.clone(),
            assigned: s.assigned_wire(),
            acked: s.to_wire(s.acked),
        })
        .collect();
    let oldest = store.oldest_ts_ms().map_err(fail)?;
    let disk_free_bytes = crate::store::free_bytes(state_dir);
    let losses: Vec<LossReport> = store
        .losses()
        .map_err(fail)?
        .into_iter()
        .map(|l| LossReport {
            unreported: l.total - l.reported,
            stream: l.stream,
            cause: l.cause,
            total: l.total,
            last_ms: l.last_ms,
        })
        .collect();
    let acks_refused = meta("acks_refused")?.and_then(|v| v.parse().ok()).unwrap_or(0);
    const START: &str = "start it (systemctl start lathe); its log says why it stopped (journalctl -u lathe)";
    if running && !fresh {
        let since = heartbeat_age_s.map_or("since it started".into(), |a| format!("for {}", human_secs(a)));
        problems.push(problem(
            format!(
                "agent (pid {}) runs but has not written its heartbeat {since}: it cannot write its database",
                pid.unwrap_or(0)
            ),
            "free space on the state_dir's filesystem (see disk) and check its log (journalctl -u lathe)",
        ));
    } else if let Some(at) = stopped_ms {
        problems.push(problem(
            format!(
                "agent is stopped: it stopped cleanly {} ago",
                human_secs(now.saturating_sub(at) / 1000)
            ),
            START,
        ));
    } else if !running {
        let what = match (heartbeat_age_s, lock) {
            (Some(a), Lock::Dead(p)) => format!(
                "agent is not running: it died (pid {p} is gone) without stopping cleanly; its last heartbeat was {} ago",
                human_secs(a)
            ),
            (Some(a), _) => format!(
                "agent is not running: its last heartbeat was {} ago and it did not stop cleanly",
                human_secs(a)
            ),
            (None, _) => "agent has never run with this state_dir".to_string(),
        };
        problems.push(problem(what, START));
    } else {
        for (what, c) in [("broker", &connection), ("readings broker", &inputs_connection)] {
            let err = c["error"].as_str().unwrap_or("unknown");
            match c["state"].as_str() {
                None | Some("connected") => {}
                Some("refused") => problems.push(problem(
                    format!("{what}: {err}"),
                    "the broker's ACL must let this device read its own cmd/+ and ack/+ topics (broker/mosquitto/lathe.acl)",
                )),
                Some(_) => problems.push(problem(
                    format!("not connected to the {what}: {err}"),
                    "check the broker's host and port in the config, the credentials and the network",
                )),
            }
        }
    }
    let activity = activity.map(|a| {
        let [p, r, f] = a.last_minute();
        if running && f > 0 {
            problems.push(problem(
                format!(
                    "inference is failing: {f} row(s) in the last minute; last: {}",
                    a.last_failure.as_deref().unwrap_or("unknown")
                ),
                "the active model cannot run these readings: try them with `lathe model run`, or roll back (lathe-hub rollback)",
            ));
        }
        ActivityReport {
            health: a.health.clone(),
            since_ms: a.started_ms,
            predictions: a.predictions,
            rejected_readings: a.rejected,
            inference_failed_rows: a.inference_failed,
            last_minute: running.then_some(LastMinute {
                predictions: p,
                rejected_readings: r,
                inference_failed_rows: f,
            }),
            last_prediction_ms: a.last_prediction_ms,
            last_failure_ms: a.last_failure_ms,
            last_failure: a.last_failure,
        }
    });
    let window_ms = t.status.loss_window_secs * 1000;
    let records = crate::store::STREAMS;
    for l in &losses {
        if records.contains(&l.stream.as_str()) && now.saturating_sub(l.last_ms) < window_ms {
            problems.push(problem(
                format!(
                    "{} record(s) lost: {} {} (last {} ago); see `lathe status` losses",
                    l.stream,
                    l.total,
                    l.cause,
                    human_secs(now.saturating_sub(l.last_ms) / 1000)
                ),
                if l.cause == crate::store::cause::RATE_LIMITED {
                    "more rows were to be sampled than samples.max_per_minute allows; raise it, or sample less \
                     (samples.every, samples.low_confidence)"
                } else {
                    "free disk space, raise outbox.max_records or outbox.max_bytes, or restore the link to the hub"
                },
            ));
        }
    }
    if let Some(free) = disk_free_bytes {
        if free < t.min_free_bytes {
            problems.push(problem(
                format!(
                    "the state_dir's filesystem has {} free, under its floor of {} (outbox.min_free_bytes): new records replace the oldest or are refused",
                    human_bytes(free),
                    human_bytes(t.min_free_bytes)
                ),
                "free space on that filesystem, or lower outbox.min_free_bytes",
            ));
        }
    }
    let depth = store.depth();
    if depth > 0 {
        let last_ack = last_sync.as_ref().and_then(|l| l["ts_ms"].as_u64()).unwrap_or(0);
        let since = last_ack.max(oldest.unwrap_or(now));
        let quiet = now.saturating_sub(since) / 1000;
        if quiet > t.status.ack_stale_secs {
            problems.push(problem(
                format!(
                    "{depth} record(s) wait and the hub has acked nothing for {} (status.ack_stale_secs {})",
                    human_secs(quiet),
                    t.status.ack_stale_secs
                ),
                "check that lathe-hub serve runs and reaches the same broker",
            ));
        }
    }
    if let Some(e) = meta("keys_error")?.filter(|e| !e.is_empty()) {
        problems.push(problem(
            format!("a key set was refused {e}"),
            "publish key sets signed by the keys this device trusts now (lathe-hub rollout keys --key …); if you published none, someone else writes to lathe/v1/<fleet>/@keys: restrict it in the broker's ACL",
        ));
    }
    if let Some(last) = meta("acks_refused_ms")?.and_then(|v| v.parse::<u64>().ok()) {
        if now.saturating_sub(last) < window_ms {
            problems.push(problem(
                format!(
                    "{acks_refused} ack(s) refused, the last {} ago: forged, or this outbox was restored from an older copy; records were kept and moved to a new epoch",
                    human_secs(now.saturating_sub(last) / 1000)
                ),
                "if no outbox was restored, someone publishes acks as the hub: restrict ack/+ with the broker's ACL",
            ));
        }
    }
    let agent = if running {
        "running"
    } else if stopped_ms.is_some() {
        "stopped"
    } else {
        "not_running"
    };
    Ok(Report {
        state_dir: state_dir.display().to_string(),
        agent: agent.into(),
        heartbeat_age_s,
        stopped_ms,
        activity,
        connection,
        inputs_connection,
        slot: first.slot,
        model: first.model,
        previous_model: first.previous_model,
        engine,
        key_set: std::fs::read(crate::config::keyset_path(state_dir))
            .ok()
            .and_then(|b| protocol::keyset::parse_body(&b).ok())
            .map(|k| serde_json::json!({"counter": k.counter, "keys": k.keys.len(), "threshold": k.threshold})),
        outbox_depth: depth,
        outbox_bytes: store.bytes(),
        outbox_by_stream: streams,
        oldest_record_age_s: oldest.map(|o| now.saturating_sub(o) / 1000),
        disk_free_bytes,
        disk_floor_bytes: t.min_free_bytes,
        losses,
        acks_refused,
        drift: first.drift,
        slots,
        last_sync,
        problems,
    })
}

/// The model slots a state_dir holds (SPEC §8.8): the default one, unless only named slots
/// (`slots/<slot>/`) have ever run there, then the named ones.
fn slot_names(state_dir: &Path, default_used: bool) -> Vec<Option<String>> {
    let mut named: Vec<String> = std::fs::read_dir(state_dir.join("slots"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    named.sort();
    let mut out: Vec<Option<String>> = vec![];
    if default_used || named.is_empty() {
        out.push(None);
    }
    out.extend(named.into_iter().map(Some));
    out
}

/// One model slot's model, drift and rollout as `lathe status` shows them, and its problems.
fn slot_report(
    meta: &dyn Fn(&str) -> Result<Option<String>, ReadError>,
    slot: Option<String>,
    problems: &mut Vec<Problem>,
) -> Result<SlotReport, ReadError> {
    let key = |base: &str| crate::config::slot_key(base, slot.as_deref());
    let named = |what: String| match &slot {
        Some(s) => format!("slot {s}: {what}"),
        None => what,
    };
    let deploy: DeployState = meta(&key("deploy_state"))?
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let as_value = |i: &Option<crate::deploy::Installed>| {
        i.as_ref()
            .map(|i| serde_json::json!({"name": i.name, "version": i.version, "file": i.file}))
    };
    let mut model = as_value(&deploy.active);
    if let (Some(m), true) = (model.as_mut(), deploy.watching) {
        // In its watch period: not committed yet (SPEC §8.4).
        m["watching"] = Value::Bool(true);
    }
    let drift: Option<crate::drift::DriftState> = meta(&key("drift"))?.and_then(|d| serde_json::from_str(&d).ok());
    // The drift state is of the model that last ran; after a deploy, until the new model's
    // first reading, it speaks of the old one, and is shown as such, not as a problem.
    let drift = drift.filter(|d| {
        deploy
            .active
            .as_ref()
            .is_some_and(|a| a.name == d.model.name && a.version == d.model.version)
    });
    if let Some(w) = drift.as_ref().and_then(|d| d.last.as_ref()) {
        if w.status == crate::drift::Verdict::Alert {
            problems.push(problem(
                named(format!(
                    "{} ({})",
                    crate::drift::alert_message(w),
                    ago(Some(w.end_ms))
                )),
                "compare recent inputs with the training data (lathe-hub export) and retrain, or check the sensors named",
            ));
        }
    }
    if deploy.active.is_none() {
        problems.push(problem(
            named("no model deployed".into()),
            match slot {
                None => "deploy one from the hub: lathe-hub deploy --fleet F --device D --bundle FILE",
                Some(_) => "deploy one from the hub: lathe-hub deploy --fleet F --device D --slot S --bundle FILE",
            },
        ));
    }
    let rollout: crate::rollout::RolloutState = meta(&key("rollout_state"))?
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    if let Some(e) = &rollout.error {
        problems.push(problem(
            named(format!(
                "the last desired state was not applied ({}): {}",
                e.code, e.message
            )),
            "see lathe-hub rollout status; a new deploy or rollback signed by the hub replaces it",
        ));
    }
    if let Some(w) = meta(&key("policy_warning"))?.filter(|w| !w.is_empty()) {
        problems.push(problem(
            named(w),
            "deploy a bundle (and a desired state) signed to the current trust.keys_file and trust.threshold",
        ));
    }
    Ok(SlotReport {
        slot: slot.unwrap_or_default(),
        model,
        previous_model: as_value(&deploy.previous),
        drift,
    })
}

/// What the state_dir's lock file says of the agent: it holds the agent's pid while it runs
/// and is emptied on a clean stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lock {
    /// A live lathe process.
    Alive(u32),
    /// A pid whose process is gone: the agent died without stopping.
    Dead(u32),
    /// No pid: stopped cleanly, or never started.
    Empty,
    /// Unreadable: fall back to the heartbeat.
    Unknown,
}

fn lock_state(state_dir: &Path) -> Lock {
    let text = match std::fs::read_to_string(state_dir.join("lock")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lock::Empty,
        Err(_) => return Lock::Unknown,
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return Lock::Empty;
    };
    if pid == std::process::id() {
        return Lock::Empty;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) if comm.trim().starts_with("lathe") => Lock::Alive(pid),
        _ => Lock::Dead(pid),
    }
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        Some(t) => format!("{} ago", human_secs(now_ms().saturating_sub(t) / 1000)),
        None => "never".into(),
    }
}

fn conn_line(c: &Value) -> String {
    match c["state"].as_str() {
        Some("unknown") => {
            let last = match c["last_known"]["state"].as_str() {
                Some(st) => format!("; last known: {st}"),
                None => String::new(),
            };
            format!("unknown (the agent is not running{last})")
        }
        Some(st) => {
            let mut line = format!("{st} since {}", ago(c["since_ms"].as_u64()));
            if let Some(e) = c["error"].as_str() {
                line += &format!(": {e}");
            }
            line
        }
        None => "unknown".into(),
    }
}

pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let agent = match (r.agent.as_str(), r.heartbeat_age_s, r.stopped_ms) {
        (_, None, _) => "not running (never started)".to_string(),
        ("stopped", _, Some(at)) => format!("stopped (cleanly, {})", ago(Some(at))),
        (state, Some(a), _) => format!("{} (heartbeat {} ago)", state.replace('_', " "), human_secs(a)),
    };
    s += &format!("agent       {agent}\n");
    s += &format!("connection  {}\n", conn_line(&r.connection));
    if !r.inputs_connection.is_null() {
        s += &format!("readings    {}\n", conn_line(&r.inputs_connection));
    }
    let model = |m: &Option<Value>| match m {
        Some(m) if m["watching"] == true => format!(
            "{} v{} (in its watch period)",
            m["name"].as_str().unwrap_or("?"),
            m["version"]
        ),
        Some(m) => format!("{} v{}", m["name"].as_str().unwrap_or("?"), m["version"]),
        None => "none".into(),
    };
    let slot = if r.slot.is_empty() {
        "model      ".to_string()
    } else {
        format!("slot        {}:", r.slot)
    };
    s += &format!("{slot} {} (previous: {})\n", model(&r.model), model(&r.previous_model));
    if let Some(e) = &r.engine {
        let why = e.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
        s += &format!("engine      {}{why}\n", e.used);
    }
    if let Some(k) = &r.key_set {
        s += &format!(
            "trust       key set #{}: {} key(s), threshold {} (trust.keys_file is superseded)\n",
            k["counter"], k["keys"], k["threshold"]
        );
    }
    if let Some(a) = &r.activity {
        let minute = match &a.last_minute {
            Some(m) => format!(
                "last minute: {} predictions, {} readings refused, {} rows failed",
                m.predictions, m.rejected_readings, m.inference_failed_rows
            ),
            None => "last minute: unknown (the agent is not running)".into(),
        };
        s += &format!("activity    {minute}\n");
        s += &format!(
            "            since it started {}: {} predictions, {} readings refused, {} rows failed\n",
            ago(Some(a.since_ms)),
            a.predictions,
            a.rejected_readings,
            a.inference_failed_rows
        );
        let last = match a.last_prediction_ms {
            Some(t) => format!("{} ({})", utc(t / 1000), ago(Some(t))),
            None => "none since it started".into(),
        };
        s += &format!("predicted   {last}\n");
        if let (Some(t), Some(why)) = (a.last_failure_ms, &a.last_failure) {
            s += &format!("failed      {}: {why}\n", ago(Some(t)));
        }
        s += &render_health(&a.health);
    }
    let parts: Vec<String> = r
        .outbox_by_stream
        .iter()
        .filter(|x| x.waiting > 0)
        .map(|x| format!("{} {}", x.stream, x.waiting))
        .collect();
    let detail = if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    };
    let oldest = r
        .oldest_record_age_s
        .map(|a| format!(", oldest waiting {}", human_secs(a)))
        .unwrap_or_default();
    s += &format!(
        "outbox      {} record(s) waiting, {}{detail}{oldest}\n",
        r.outbox_depth,
        human_bytes(r.outbox_bytes)
    );
    let disk = match r.disk_free_bytes {
        Some(f) => format!("{} free (floor {})", human_bytes(f), human_bytes(r.disk_floor_bytes)),
        None => "free space unknown".into(),
    };
    s += &format!("disk        {disk}\n");
    let sync = match &r.last_sync {
        Some(l) => format!(
            "{} acked through #{} {}",
            l["stream"].as_str().unwrap_or("?"),
            l["acked"],
            ago(l["ts_ms"].as_u64())
        ),
        None => "never".into(),
    };
    s += &format!("last sync   {sync}\n");
    if r.losses.is_empty() {
        s += "losses      none\n";
    }
    for l in &r.losses {
        s += &format!(
            "lost        {} {} {} (last {})\n",
            l.stream,
            l.cause,
            l.total,
            ago(Some(l.last_ms))
        );
    }
    if r.acks_refused > 0 {
        s += &format!("acks        {} refused\n", r.acks_refused);
    }
    let drift = |m: &Option<Value>, d: Option<&crate::drift::DriftState>| {
        if d.is_none() && m.is_some() {
            format!("drift       {}: no reading since it became active\n", model(m))
        } else {
            render_drift(d)
        }
    };
    s += &drift(&r.model, r.drift.as_ref());
    for x in &r.slots {
        s += &format!(
            "slot        {}: {} (previous: {})\n",
            x.slot,
            model(&x.model),
            model(&x.previous_model)
        );
        s += &drift(&x.model, x.drift.as_ref());
    }
    for p in &r.problems {
        s += &format!("problem     {}\n            hint: {}\n", p.problem, p.hint);
    }
    s
}

/// The box, the agent's memory and inference latency, as the agent last sampled them.
fn render_health(h: &crate::metrics::Snapshot) -> String {
    let mut s = String::new();
    if let Some(b) = &h.system {
        let temp = b.temperature_c.map(|t| format!(", {t:.0} °C")).unwrap_or_default();
        s += &format!(
            "box         cpu {:.0}% of {} CPU(s), memory {} used of {}, up {}{temp}\n",
            b.cpu_percent,
            b.cpus,
            human_bytes(b.memory_used_bytes),
            human_bytes(b.memory_total_bytes),
            human_secs(b.uptime_secs)
        );
    }
    if let Some(p) = &h.process {
        s += &format!(
            "memory      agent rss {}, up {}\n",
            human_bytes(p.rss_bytes),
            human_secs(p.uptime_secs)
        );
    }
    for l in h.latency.iter().chain(&h.latencies) {
        s += &format!(
            "latency     {} v{}: p50 {} µs, p99 {} µs per call ({} calls, {} rows)\n",
            l.model.name, l.model.version, l.p50_us, l.p99_us, l.calls, l.rows
        );
    }
    s
}

/// The drift lines: the last window's verdict, then its features and outputs, worst first.
fn render_drift(d: Option<&crate::drift::DriftState>) -> String {
    const SHOWN: usize = 8;
    let Some(d) = d else {
        return "drift       no model has run yet\n".into();
    };
    let model = format!("{} v{}", d.model.name, d.model.version);
    if !d.baseline {
        return format!(
            "drift       off for {model}: its bundle has no baseline (pack it with --baseline <training.csv>)\n"
        );
    }
    if !d.enabled {
        return format!("drift       off (drift.enabled = false in the config); {model} has a baseline\n");
    }
    let Some(w) = &d.last else {
        return format!(
            "drift       {model}: no window closed yet (window open since {})\n",
            ago(Some(d.window_start_ms))
        );
    };
    let mut s = format!(
        "drift       {model}: {} in the last window ({} rows, closed by {} {})\n",
        w.status.word(),
        w.rows,
        w.closed_by.replace('_', " "),
        ago(Some(w.end_ms))
    );
    let all = w.worst();
    for m in all.iter().take(SHOWN) {
        let name = match (m.column, w.features.iter().any(|f| std::ptr::eq(f, *m))) {
            (_, true) => m.name.clone(),
            (Some(c), false) => format!("output {}[{c}]", m.name),
            (None, false) => format!("output {}", m.name),
        };
        let detail = if m.reasons.is_empty() {
            match m.psi {
                Some(p) => format!("PSI {p:.3}"),
                None => "no values".into(),
            }
        } else {
            m.reasons.join(", ")
        };
        s += &format!("            {name:<24} {:<8} {detail}\n", m.status.word());
    }
    if all.len() > SHOWN {
        s += &format!("            ... {} more, all no worse\n", all.len() - SHOWN);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Limits, Loss, NewRecord};

    const LIMITS: Limits = Limits {
        max_records: 10,
        max_bytes: 1 << 20,
        max_record_bytes: 1 << 10,
        min_free_bytes: 0,
        when_full: crate::config::WhenFull::DropOldest,
    };

    fn check(t: Thresholds, expected: &[&str]) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(&crate::config::db_path(dir.path())).expect("open");
        let old = now_ms() - 7_200_000;
        let lim = LIMITS;
        let rec = NewRecord {
            stream: protocol::streams::PREDICTIONS,
            ts_ms: old,
            data: "{}".into(),
        };
        let lost = Loss {
            stream: protocol::streams::PREDICTIONS,
            cause: crate::store::cause::DISK_FULL,
            count: 3,
        };
        s.append(&[rec], &[lost], lim, None).expect("append");
        s.set_meta("heartbeat_ms", &now_ms().to_string()).expect("heartbeat");
        let r = report(dir.path(), &t).expect("report");
        assert!(r.problems.iter().all(|p| !p.hint.is_empty()));
        let problems: Vec<&str> = r.problems.iter().map(|p| p.problem.as_str()).collect();
        let problems = problems.join("\n");
        for e in expected {
            assert!(problems.contains(e), "{e:?} not in:\n{problems}");
        }
        assert_eq!(r.problems.len(), expected.len(), "{problems}");
    }

    #[test]
    fn problems_are_named() {
        let t = |window, stale, floor| Thresholds {
            status: StatusConfig {
                loss_window_secs: window,
                ack_stale_secs: stale,
            },
            min_free_bytes: floor,
        };
        // Recent losses, a record waiting two hours, a floor no disk has; no model either.
        check(
            t(86_400, 3600, u64::MAX),
            &[
                "no model deployed",
                "record(s) lost: 3 disk_full",
                "under its floor",
                "acked nothing for 2h",
            ],
        );
        // The same, with thresholds that do not call them problems.
        check(t(0, 86_400, 0), &["no model deployed"]);
    }

    /// A drift alert and samples over their cap are problems, each with its own fix; the
    /// drift lines name the worst feature first.
    #[test]
    fn drift_and_sample_problems_say_what_to_do() {
        use crate::drift::{DriftState, Measures, Verdict, Window};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(&crate::config::db_path(dir.path())).expect("open");
        let lim = LIMITS;
        let capped = Loss {
            stream: protocol::streams::SAMPLES,
            cause: crate::store::cause::RATE_LIMITED,
            count: 5,
        };
        s.append(&[], &[capped], lim, None).expect("append");
        let m = |name: &str, status, psi: f64, reasons: &[&str]| Measures {
            name: name.into(),
            column: None,
            status,
            values: 1000,
            missing: 0,
            below: 0,
            above: 0,
            psi: Some(psi),
            ks: None,
            mean_shift: None,
            mean: None,
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
        };
        let model = protocol::messages::ModelRef {
            name: "m".into(),
            version: 1,
        };
        let state = DriftState {
            model: model.clone(),
            baseline: true,
            enabled: true,
            window_start_ms: now_ms(),
            last: Some(Window {
                ts_ms: now_ms(),
                model,
                start_ms: now_ms() - 60_000,
                end_ms: now_ms(),
                rows: 1000,
                closed_by: "count".into(),
                status: Verdict::Alert,
                features: vec![
                    m("rms", Verdict::Ok, 0.01, &[]),
                    m("peak_hz", Verdict::Alert, 2.2, &["PSI 2.200 >= 0.25"]),
                ],
                outputs: vec![m("label", Verdict::Warn, 0.12, &["PSI 0.120 >= 0.1 (label mix)"])],
            }),
        };
        s.set_meta("drift", &serde_json::to_string(&state).expect("json"))
            .expect("meta");
        s.set_meta("heartbeat_ms", &now_ms().to_string()).expect("heartbeat");
        let active = |s: &mut Store, version: u64| {
            let mut d = DeployState::default();
            d.activate(
                crate::deploy::Installed {
                    name: "m".into(),
                    version,
                    file: format!("m-{version}.lbundle"),
                    sha256: None,
                },
                false,
            );
            s.set_meta("deploy_state", &serde_json::to_string(&d).expect("json"))
                .expect("meta");
        };
        active(&mut s, 1);
        let r = report(dir.path(), &Thresholds::default()).expect("report");
        let hint = |what: &str| {
            r.problems
                .iter()
                .find(|p| p.problem.contains(what))
                .map(|p| p.hint.clone())
                .unwrap_or_else(|| panic!("no problem with {what:?}: {:?}", r.problems))
        };
        assert!(hint("has drifted").contains("retrain"));
        assert!(hint("samples record(s) lost: 5 rate_limited").contains("samples.max_per_minute"));
        let text = render(&r);
        let lines: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("drift")).take(4).collect();
        assert!(
            lines[0].starts_with("drift       m v1: ALERT in the last window (1000 rows, closed by count"),
            "{text}"
        );
        assert!(
            lines[1].trim_start().starts_with("peak_hz") && lines[1].contains("PSI 2.200 >= 0.25"),
            "{text}"
        );
        assert!(
            lines[2].trim_start().starts_with("rms") && lines[2].contains("PSI 0.010"),
            "{text}"
        );
        assert!(lines[3].contains("output label") && lines[3].contains("WARN"), "{text}");

        // A newer model is active and has had no reading: the old model's alert is not its own.
        active(&mut s, 2);
        let r = report(dir.path(), &Thresholds::default()).expect("report");
        assert!(
            r.problems.iter().all(|p| !p.problem.contains("drifted")),
            "{:?}",
            r.problems
        );
        let text = render(&r);
        assert!(
            text.contains("drift       m v2: no reading since it became active"),
            "{text}"
        );
    }

    /// Where models run is shown; the GPU asked for and not used is a problem.
    #[test]
    fn the_engine_placement_is_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(&crate::config::db_path(dir.path())).expect("open");
        let mut placed = |requested, used: &str, reason: Option<&str>| {
            let p = crate::engine::Placement {
                requested,
                used: used.into(),
                reason: reason.map(str::to_string),
            };
            s.set_meta("engine", &serde_json::to_string(&p).expect("json"))
                .expect("meta");
            report(dir.path(), &Thresholds::default()).expect("report")
        };
        let r = placed(crate::engine::Device::Cuda, "cpu", Some("no usable GPU: no driver"));
        assert!(
            render(&r).contains("engine      cpu (no usable GPU: no driver)"),
            "{}",
            render(&r)
        );
        assert!(
            r.problems
                .iter()
                .any(|p| p.problem.contains("engine.device is cuda, but models run on the CPU")),
            "{:?}",
            r.problems
        );
        let r = placed(crate::engine::Device::Auto, "cpu", Some("no usable GPU: no driver"));
        assert!(
            !r.problems.iter().any(|p| p.problem.contains("engine")),
            "{:?}",
            r.problems
        );
        let r = placed(crate::engine::Device::Cuda, "cuda", None);
        assert!(render(&r).contains("engine      cuda\n"), "{}", render(&r));
        assert!(
            !r.problems.iter().any(|p| p.problem.contains("engine")),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn activity_counts_the_last_minute() {
        let m = crate::metrics::Metrics::default();
        let mut a = Activity::started(1_000_000);
        for i in 0..30 {
            m.predictions.add(10);
            m.inference_failed.add(i % 2);
            a.update(&m, 1_000_000 + i * 5000);
        }
        // Twelve updates of 10 predictions after the sample a minute before the last.
        assert_eq!(a.last_minute(), [120, 0, 6]);
        assert!(a.samples.len() <= 14, "bounded: {}", a.samples.len());
        // An agent younger than a minute: everything since it started.
        let m = crate::metrics::Metrics::default();
        let mut young = Activity::started(5_000);
        m.predictions.add(7);
        young.update(&m, 20_000);
        assert_eq!(young.last_minute(), [7, 0, 0]);
        assert_eq!(Activity::started(0).last_minute(), [0, 0, 0]);
    }

    /// The agent's state as status tells it, from what the agent left in its database
    /// (regressions: `agent running` for 15 s after a clean stop, `connected since …` for a
    /// dead agent, and nothing said about a model failing every reading).
    fn state(meta: &[(&str, String)], agent: &str, problem: &str, connection: Option<&str>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(&crate::config::db_path(dir.path())).expect("open");
        for (k, v) in meta {
            s.set_meta(k, v).expect("meta");
        }
        let r = report(dir.path(), &Thresholds::default()).expect("report");
        assert_eq!(r.agent, agent, "{meta:?}");
        let problems: Vec<&str> = r.problems.iter().map(|p| p.problem.as_str()).collect();
        assert!(
            problems.iter().any(|p| p.contains(problem)),
            "{problem:?} not in {problems:?}"
        );
        assert_eq!(r.connection["state"].as_str(), connection, "{meta:?}");
        let text = render(&r);
        assert!(text.contains("hint: "), "{text}");
    }

    #[test]
    fn stopped_dead_and_failing_agents_are_told_apart() {
        let now = now_ms();
        let conn = || ("conn", r#"{"state":"connected","since_ms":1}"#.to_string());
        let beat = |ago: u64| ("heartbeat_ms", (now - ago).to_string());
        state(
            &[conn(), beat(2000), ("stopped_ms", (now - 1000).to_string())],
            "stopped",
            "it stopped cleanly",
            Some("unknown"),
        );
        state(
            &[conn(), beat(60_000)],
            "not_running",
            "did not stop cleanly",
            Some("unknown"),
        );
        state(&[], "not_running", "never run with this state_dir", None);
        let m = crate::metrics::Metrics::default();
        let mut a = Activity::started(now - 30_000);
        m.inference_failed.add(4);
        m.set_last_failure(now - 1000, "Sigmoid does not support F64");
        a.update(&m, now - 1000);
        let a = ("activity", serde_json::to_string(&a).expect("json"));
        state(
            &[conn(), beat(1000), a],
            "running",
            "inference is failing: 4 row(s) in the last minute; last: Sigmoid does not support F64",
            Some("connected"),
        );
    }

    #[test]
    fn unreadable_state_says_permission_denied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = report(dir.path(), &Thresholds::default()).expect_err("no database");
        assert!(e.message.contains("no agent database"), "{e}");
        let e = read_error(
            Path::new("/x/lathe.db"),
            &std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(e.message, "permission denied reading /x/lathe.db");
        assert!(e.to_string().contains("sudo lathe status"), "{e}");
    }

    #[test]
    fn utc_dates() {
        for (secs, want) in [
            (0, "1970-01-01 00:00:00 UTC"),
            (951_782_400, "2000-02-29 00:00:00 UTC"),
            (1_795_536_000, "2026-11-24 16:00:00 UTC"),
            (4_102_444_799, "2099-12-31 23:59:59 UTC"),
        ] {
            assert_eq!(utc(secs), want, "{secs}");
        }
    }
}
