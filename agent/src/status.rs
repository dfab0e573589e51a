//! `lathe status`: what the agent is doing, read from its database. Works whether or not the
//! agent or the broker is up.

use crate::deploy::DeployState;
use crate::store::Store;
use crate::sync::now_ms;
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct Report {
    pub state_dir: String,
    /// `running` when the agent wrote a heartbeat in the last 15 s, else `not_running`.
    pub agent: String,
    pub heartbeat_age_s: Option<u64>,
    pub connection: Value,
    pub model: Option<Value>,
    pub previous_model: Option<Value>,
    pub outbox_depth: u64,
    pub outbox_by_stream: Vec<(String, u64)>,
    pub last_sync: Option<Value>,
    /// Problems a technician should know of; empty when all is well.
    pub problems: Vec<String>,
}

pub fn report(state_dir: &Path) -> Result<Report, String> {
    let db = crate::config::db_path(state_dir);
    if !db.exists() {
        return Err(format!(
            "no agent database at {}: has `lathe run` ever started with this state_dir?",
            db.display()
        ));
    }
    let store = Store::open_readonly(&db).map_err(|e| e.to_string())?;
    let meta = |k: &str| store.get_meta(k).map_err(|e| e.to_string());
    let now = now_ms();
    let heartbeat_age_s = meta("heartbeat_ms")?
        .and_then(|h| h.parse::<u64>().ok())
        .map(|h| now.saturating_sub(h) / 1000);
    let running = heartbeat_age_s.is_some_and(|a| a <= 15);
    let connection: Value = meta("conn")?
        .and_then(|c| serde_json::from_str(&c).ok())
        .unwrap_or(Value::Null);
    let deploy: DeployState = meta("deploy_state")?
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let as_value = |i: &Option<crate::deploy::Installed>| {
        i.as_ref()
            .map(|i| serde_json::json!({"name": i.name, "version": i.version, "file": i.file}))
    };
    let last_sync = meta("last_ack")?.and_then(|s| serde_json::from_str(&s).ok());
    let by_stream = store.depth_by_stream().map_err(|e| e.to_string())?;
    let mut problems = vec![];
    if !running {
        problems.push("agent is not running (no heartbeat in the last 15 s)".to_string());
    } else if connection["state"] != "connected" {
        let err = connection["error"].as_str().unwrap_or("unknown");
        problems.push(format!("not connected to the broker: {err}"));
    }
    if deploy.active.is_none() {
        problems.push("no model deployed".into());
    }
    Ok(Report {
        state_dir: state_dir.display().to_string(),
        agent: if running { "running" } else { "not_running" }.into(),
        heartbeat_age_s,
        connection,
        model: as_value(&deploy.active),
        previous_model: as_value(&deploy.previous),
        outbox_depth: store.depth(),
        outbox_by_stream: by_stream,
        last_sync,
        problems,
    })
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        Some(t) => format!("{}s ago", now_ms().saturating_sub(t) / 1000),
        None => "never".into(),
    }
}

pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let agent = match r.heartbeat_age_s {
        Some(a) => format!("{} (heartbeat {a}s ago)", r.agent.replace('_', " ")),
        None => "not running (never started)".into(),
    };
    s += &format!("agent       {agent}\n");
    let c = &r.connection;
    let conn = match c["state"].as_str() {
        Some(st) => {
            let mut line = format!("{st} since {}", ago(c["since_ms"].as_u64()));
            if let Some(e) = c["error"].as_str() {
                line += &format!(": {e}");
            }
            line
        }
        None => "unknown".into(),
    };
    s += &format!("connection  {conn}\n");
    let model = |m: &Option<Value>| match m {
        Some(m) => format!("{} v{}", m["name"].as_str().unwrap_or("?"), m["version"]),
        None => "none".into(),
    };
    s += &format!(
        "model       {} (previous: {})\n",
        model(&r.model),
        model(&r.previous_model)
    );
    let parts: Vec<String> = r.outbox_by_stream.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let detail = if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    };
    s += &format!("outbox      {} record(s) waiting{detail}\n", r.outbox_depth);
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
    for p in &r.problems {
        s += &format!("problem     {p}\n");
    }
    s
}
