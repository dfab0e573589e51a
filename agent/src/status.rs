//! `lathe status`: what the agent is doing, read from its database. Works whether or not the
//! agent or the broker is up.
//!
//! It names every problem a technician should act on, and `lathe status` exits 1 when there is
//! one: the agent is not running or not connected, a subscription was refused, no model is
//! deployed, records were lost recently, the disk is under its floor, records wait with no ack
//! from the hub for too long, or acks were refused (forged, or an outbox restored from an old
//! copy).

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

#[derive(Debug, Serialize)]
pub struct Report {
    pub state_dir: String,
    /// `running` when the agent wrote a heartbeat in the last 15 s, else `not_running`.
    pub agent: String,
    pub heartbeat_age_s: Option<u64>,
    pub connection: Value,
    /// The readings link, when the agent has input topics.
    pub inputs_connection: Value,
    pub model: Option<Value>,
    pub previous_model: Option<Value>,
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
    /// Problems a technician should know of; empty when all is well.
    pub problems: Vec<String>,
}

fn human_bytes(b: u64) -> String {
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

pub fn report(state_dir: &Path, t: &Thresholds) -> Result<Report, String> {
    let db = crate::config::db_path(state_dir);
    if !db.exists() {
        return Err(format!(
            "no agent database at {}: has `lathe run` ever started with this state_dir?",
            db.display()
        ));
    }
    let store = Store::open_readonly(&db).map_err(|e| e.to_string())?;
    let meta = |k: &str| store.get_meta(k).map_err(|e| e.to_string());
    let json = |k: &str| -> Result<Value, String> {
        Ok(meta(k)?
            .and_then(|c| serde_json::from_str(&c).ok())
            .unwrap_or(Value::Null))
    };
    let now = now_ms();
    let heartbeat_age_s = meta("heartbeat_ms")?
        .and_then(|h| h.parse::<u64>().ok())
        .map(|h| now.saturating_sub(h) / 1000);
    let fresh = heartbeat_age_s.is_some_and(|a| a <= 15);
    // The agent writes its pid into the state_dir's lock; a live process there is a running
    // agent even when it cannot write its heartbeat (a full disk).
    let pid = agent_pid(state_dir);
    let running = fresh || pid.is_some();
    let connection = json("conn")?;
    let inputs_connection = json("inputs_conn")?;
    let deploy: DeployState = meta("deploy_state")?
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let as_value = |i: &Option<crate::deploy::Installed>| {
        i.as_ref()
            .map(|i| serde_json::json!({"name": i.name, "version": i.version, "file": i.file}))
    };
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
    let oldest = store.oldest_ts_ms().map_err(|e| e.to_string())?;
    let disk_free_bytes = crate::store::free_bytes(state_dir);
    let losses: Vec<LossReport> = store
        .losses()
        .map_err(|e| e.to_string())?
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

    let mut problems = vec![];
    if !running {
        problems.push("agent is not running (no heartbeat in the last 15 s)".to_string());
    } else if !fresh {
        let since = heartbeat_age_s.map_or("since it started".into(), |a| format!("for {}", human_secs(a)));
        problems.push(format!(
            "agent (pid {}) runs but has not written its heartbeat {since}: it cannot write its database (is the disk full?)",
            pid.unwrap_or(0)
        ));
    } else {
        for (what, c) in [("broker", &connection), ("readings broker", &inputs_connection)] {
            let err = c["error"].as_str().unwrap_or("unknown");
            match c["state"].as_str() {
                None | Some("connected") => {}
                Some("refused") => problems.push(format!("{what}: {err}")),
                Some(_) => problems.push(format!("not connected to the {what}: {err}")),
            }
        }
    }
    if deploy.active.is_none() {
        problems.push("no model deployed".into());
    }
    let window_ms = t.status.loss_window_secs * 1000;
    let records: [&str; 3] = crate::store::STREAMS;
    for l in &losses {
        if records.contains(&l.stream.as_str()) && now.saturating_sub(l.last_ms) < window_ms {
            problems.push(format!(
                "{} record(s) lost: {} {} (last {} ago); see `lathe status` losses",
                l.stream,
                l.total,
                l.cause,
                human_secs(now.saturating_sub(l.last_ms) / 1000)
            ));
        }
    }
    if let Some(free) = disk_free_bytes {
        if free < t.min_free_bytes {
            problems.push(format!(
                "the state_dir's filesystem has {} free, under its floor of {} (outbox.min_free_bytes): new records replace the oldest or are refused",
                human_bytes(free),
                human_bytes(t.min_free_bytes)
            ));
        }
    }
    let depth = store.depth();
    if depth > 0 {
        let last_ack = last_sync.as_ref().and_then(|l| l["ts_ms"].as_u64()).unwrap_or(0);
        let since = last_ack.max(oldest.unwrap_or(now));
        let quiet = now.saturating_sub(since) / 1000;
        if quiet > t.status.ack_stale_secs {
            problems.push(format!(
                "{depth} record(s) wait and the hub has acked nothing for {} (status.ack_stale_secs {})",
                human_secs(quiet),
                t.status.ack_stale_secs
            ));
        }
    }
    if let Some(last) = meta("acks_refused_ms")?.and_then(|v| v.parse::<u64>().ok()) {
        if now.saturating_sub(last) < window_ms {
            problems.push(format!(
                "{acks_refused} ack(s) refused, the last {} ago: forged, or this outbox was restored from an older copy; records were kept and moved to a new epoch",
                human_secs(now.saturating_sub(last) / 1000)
            ));
        }
    }
    Ok(Report {
        state_dir: state_dir.display().to_string(),
        agent: if running { "running" } else { "not_running" }.into(),
        heartbeat_age_s,
        connection,
        inputs_connection,
        model: as_value(&deploy.active),
        previous_model: as_value(&deploy.previous),
        outbox_depth: depth,
        outbox_bytes: store.bytes(),
        outbox_by_stream: streams,
        oldest_record_age_s: oldest.map(|o| now.saturating_sub(o) / 1000),
        disk_free_bytes,
        disk_floor_bytes: t.min_free_bytes,
        losses,
        acks_refused,
        last_sync,
        problems,
    })
}

/// The pid in the state_dir's lock file, if that process is alive and is a lathe agent.
fn agent_pid(state_dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(state_dir.join("lock"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if pid == std::process::id() {
        return None;
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    comm.trim().starts_with("lathe").then_some(pid)
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        Some(t) => format!("{} ago", human_secs(now_ms().saturating_sub(t) / 1000)),
        None => "never".into(),
    }
}

fn conn_line(c: &Value) -> String {
    match c["state"].as_str() {
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
    let agent = match r.heartbeat_age_s {
        Some(a) => format!("{} (heartbeat {a}s ago)", r.agent.replace('_', " ")),
        None => "not running (never started)".into(),
    };
    s += &format!("agent       {agent}\n");
    s += &format!("connection  {}\n", conn_line(&r.connection));
    if !r.inputs_connection.is_null() {
        s += &format!("readings    {}\n", conn_line(&r.inputs_connection));
    }
    let model = |m: &Option<Value>| match m {
        Some(m) => format!("{} v{}", m["name"].as_str().unwrap_or("?"), m["version"]),
        None => "none".into(),
    };
    s += &format!(
        "model       {} (previous: {})\n",
        model(&r.model),
        model(&r.previous_model)
    );
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
    for p in &r.problems {
        s += &format!("problem     {p}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Limits, Loss, NewRecord};

    fn check(t: Thresholds, expected: &[&str]) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(&crate::config::db_path(dir.path())).expect("open");
        let old = now_ms() - 7_200_000;
        let lim = Limits {
            max_records: 10,
            max_bytes: 1 << 20,
            max_record_bytes: 1 << 10,
            min_free_bytes: 0,
            when_full: crate::config::WhenFull::DropOldest,
        };
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
        let problems = r.problems.join("\n");
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
}
