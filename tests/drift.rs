//! Closing the loop, end to end: a bundle packed with a training baseline, drift measured on
//! the device, alerted, synced, shown by `lathe status` and listed by `lathe-hub drift`;
//! samples exported to Parquet and CSV and read back in pandas; health with the box's figures
//! kept at the hub.

use lathe_e2e::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const DEVICE: &str = "line-3";

fn drift_csv(name: &str) -> std::path::PathBuf {
    repo_root().join("fixtures/drift").join(format!("{name}.csv"))
}

/// Readings of a window file, 50 rows to a message, with ids from `first`.
fn send_window(sensor: &Sensor, name: &str, first: i64) -> u64 {
    let text = std::fs::read_to_string(drift_csv(name)).expect("csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let rows: Vec<Value> = lines
        .enumerate()
        .map(|(i, l)| {
            let mut o = serde_json::Map::new();
            for (h, v) in header.iter().zip(l.split(',')) {
                o.insert(h.to_string(), Value::from(v.parse::<f64>().expect("number")));
            }
            o.insert("id".into(), Value::from(first + i as i64));
            Value::Object(o)
        })
        .collect();
    let mut messages = 0;
    for chunk in rows.chunks(50) {
        sensor.send(serde_json::to_vec(chunk).expect("json"));
        messages += 1;
    }
    messages
}

/// The vibration model packed as `vibration` v1 with `fixtures/drift/train.csv` as its
/// baseline.
fn pack_with_baseline(s: &Fleet) -> std::path::PathBuf {
    let train = drift_csv("train");
    let (code, out, bundle) = s.pack_model(
        &fixture("vibration_logreg.onnx"),
        "vibration",
        1,
        &cases().features.join(","),
        &["--baseline", train.to_str().expect("utf8")],
    );
    assert_eq!(code, 0, "{out}");
    bundle
}

/// Rows of `stream` the hub stored for `device`, oldest first, as (received_ms, data).
fn hub_rows(db: &Path, device: &str, stream: &str) -> Vec<(i64, String)> {
    let Ok(conn) = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return vec![];
    };
    let Ok(mut st) = conn.prepare(
        "SELECT received_ms, data FROM records WHERE device = ?1 AND stream = ?2 AND data IS NOT NULL
         ORDER BY received_ms, epoch, seq",
    ) else {
        return vec![];
    };
    st.query_map([device, stream], |r| Ok((r.get(0)?, r.get(1)?)))
        .and_then(|rows| rows.collect())
        .unwrap_or_default()
}

fn hub_json(args: &[&str]) -> (i32, Value) {
    let (code, out, err) = run(&mut hub_cmd(args));
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}{err}"));
    (code, v)
}

fn status_text(d: &Device) -> (i32, String) {
    let (code, out, err) = run(Command::new(&bins().0).args(["status", "--config"]).arg(&d.config));
    (code, format!("{out}{err}"))
}

#[test]
fn drift_is_measured_on_the_device_alerted_synced_shown_and_listed_at_the_hub() {
    let s = Fleet::new();
    let with_baseline = pack_with_baseline(&s);
    let (_, inspect, _) = run(&mut hub_cmd(&[
        "bundle",
        "inspect",
        with_baseline.to_str().expect("utf8"),
    ]));
    assert!(inspect.contains("Baseline baseline.json"), "{inspect}");

    let d = s.device(
        DEVICE,
        s.hub_broker.port,
        &[
            ("drift", "window_rows = 500"),
            ("drift", "min_rows = 200"),
            ("samples", "every = 100"),
            ("samples", "max_per_minute = 100000"),
        ],
    );
    let _hub = s.hub();
    let _agent = s.agent(&d);
    wait_online(s.hub_broker.port, DEVICE);
    let sensor = Sensor::new(s.sensor_broker.port, DEVICE);

    // A bundle without a baseline deploys, and the agent says drift is off for it.
    let (code, out) = s.deploy(&d, &s.bundle);
    assert_eq!(code, 0, "{out}");
    let off = eventually(Duration::from_secs(30), || {
        sensor.send(reading(&cases(), 0));
        std::thread::sleep(Duration::from_millis(300));
        let (_, v) = status(&d);
        (v["drift"]["baseline"] == false).then_some(v)
    });
    assert!(off.is_some(), "status never said drift is off");
    let (_, text) = status_text(&d);
    assert!(
        text.contains("drift       off for bearing v1: its bundle has no baseline"),
        "{text}"
    );

    let (code, out) = s.deploy(&d, &with_baseline);
    assert_eq!(code, 0, "{out}");
    let events = watch(
        s.hub_broker.port,
        &format!("lathe/v1/{FLEET}/{DEVICE}/events"),
        "drift-events",
    );
    // Live data like the training data: two windows, both ok. Then the peak frequency sensor
    // is recalibrated: two windows that alert.
    let mut sent = send_window(&sensor, "control", 1);
    sensor.wait_acked(sent + 1);
    let ok = eventually(Duration::from_secs(30), || {
        let (_, v) = status(&d);
        (v["drift"]["last"]["status"] == "ok").then_some(v)
    });
    assert!(ok.is_some(), "the control windows were never judged ok");
    sent += send_window(&sensor, "peak_recalibrated", 10_001);
    sensor.wait_acked(sent + 1);

    let alert = eventually(Duration::from_secs(30), || {
        let (_, payload) = events.recv_timeout(Duration::from_millis(500)).ok()?;
        let e: Value = serde_json::from_slice(&payload).ok()?;
        (e["kind"] == "drift_alert").then_some(e)
    })
    .expect("a drift_alert event");
    let message = alert["message"].as_str().expect("message");
    assert!(
        message.starts_with("vibration v1 has drifted") && message.contains("peak_hz: PSI"),
        "{message}"
    );

    // On the device: the worst feature first, plainly worded, and a problem.
    let (code, v) = status(&d);
    assert_eq!(code, 1, "a drift alert is a problem: {v}");
    assert_eq!(v["drift"]["last"]["status"], "alert", "{v}");
    let problems = v["problems"].to_string();
    assert!(problems.contains("has drifted"), "{problems}");
    let (_, text) = status_text(&d);
    let drift_lines: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("drift")).take(3).collect();
    assert!(
        drift_lines[0].contains("vibration v1: ALERT in the last window (500 rows"),
        "{text}"
    );
    assert!(
        drift_lines[1].trim_start().starts_with("peak_hz") && drift_lines[1].contains("ALERT"),
        "{text}"
    );

    // At the hub: every window synced (4 closed by count), alerts and worst features listed.
    let windows = eventually(Duration::from_secs(30), || {
        let w = hub_records(&s.hub_db, "drift");
        (w.len() >= 4).then_some(w)
    })
    .expect("four drift windows at the hub");
    let statuses: Vec<String> = windows
        .iter()
        .map(|w| {
            serde_json::from_str::<Value>(w).expect("json")["status"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    assert_eq!(statuses[..4], ["ok", "ok", "alert", "alert"], "{statuses:?}");
    let db = s.hub_db.to_str().expect("utf8");
    let (code, r) = hub_json(&["drift", "--db", db, "--json"]);
    assert_eq!(code, 1, "the last window alerted: {r}");
    let dev = &r["devices"][0];
    assert_eq!(
        (dev["device"].as_str(), dev["model"]["name"].as_str()),
        (Some(DEVICE), Some("vibration"))
    );
    assert!(dev["alerts_total"].as_u64() >= Some(2), "{dev}");
    assert_eq!(dev["alerts"][0]["measures"][0]["name"], "peak_hz", "{dev}");
    let (_, text, _) = run(&mut hub_cmd(&["drift", "--db", db, "--model", "vibration"]));
    assert!(
        text.contains(&format!("{FLEET}/{DEVICE}  vibration v1")) && text.contains("worst  peak_hz ALERT"),
        "{text}"
    );
    let (code, r) = hub_json(&["drift", "--db", db, "--device", "elsewhere", "--json"]);
    assert_eq!((code, r["devices"].as_array().map(Vec::len)), (0, Some(0)), "{r}");

    // Samples: one in 100, rows outside the training range, and rows of the alerting windows.
    let samples = eventually(Duration::from_secs(30), || {
        let v: Vec<Value> = hub_records(&s.hub_db, "samples")
            .iter()
            .map(|r| serde_json::from_str(r).expect("json"))
            .collect();
        let reasons: std::collections::BTreeSet<String> = v
            .iter()
            .map(|s| s["reason"].as_str().unwrap_or("?").to_string())
            .collect();
        (["every", "out_of_range", "drift_alert"]
            .iter()
            .all(|r| reasons.contains(*r)))
        .then_some(v)
    })
    .expect("samples of every kind at the hub");
    let every = samples
        .iter()
        .filter(|s| s["reason"] == "every" && s["model"]["name"] == "vibration")
        .count();
    assert!((15..=21).contains(&every), "one in 100 of 2,000 rows: {every}");
    export_reads_back_in_pandas(&s.hub_db, s.path());

    // Health with the box's figures is kept at the hub.
    let health = eventually(Duration::from_secs(30), || {
        let (_, v) = hub_json(&["health", "--db", db, "--json"]);
        let h = v.as_array()?.iter().find(|h| h["device"] == DEVICE)?.clone();
        (h["health"]["latency"]["calls"].as_u64() > Some(0)).then_some(h)
    })
    .expect("health with latency at the hub");
    let h = &health["health"];
    assert!(h["system"]["cpus"].as_u64() >= Some(1), "{h}");
    assert!(h["system"]["memory_total_bytes"].as_u64() > Some(0), "{h}");
    assert!(h["process"]["rss_bytes"].as_u64() > Some(1 << 20), "{h}");
    assert!(h["system"]["uptime_secs"].as_u64() > Some(0), "{h}");
    assert!(
        h["latency"]["p99_us"].as_u64() >= h["latency"]["p50_us"].as_u64(),
        "{h}"
    );
    let depths = h["outbox"].as_array().expect("outbox per stream");
    assert!(depths.iter().any(|x| x["stream"] == "drift"), "{h}");
    // On the device too, once the agent's heartbeat has written the latest sample.
    let on_device = eventually(Duration::from_secs(20), || {
        let (_, v) = status(&d);
        (v["activity"]["health"]["latency"]["calls"].as_u64() > Some(0)).then_some(v)
    })
    .expect("status shows the box and latency");
    let h = &on_device["activity"]["health"];
    assert!(h["process"]["rss_bytes"].as_u64() > Some(1 << 20), "{h}");
    let (_, text) = status_text(&d);
    assert!(
        text.contains("box         cpu ") && text.contains("latency     vibration v1: p50 "),
        "{text}"
    );
}

/// Export the samples of `vibration` as Parquet and as CSV; pandas reads both, with the same
/// rows, typed columns and the values the hub holds.
fn export_reads_back_in_pandas(db: &Path, dir: &Path) {
    let parquet = dir.join("samples.parquet");
    let csv = dir.join("samples.csv");
    for (format, out) in [("parquet", &parquet), ("csv", &csv)] {
        let (code, text, err) = run(&mut hub_cmd(&[
            "export",
            "--db",
            db.to_str().expect("utf8"),
            "--model",
            "vibration",
            "--device",
            DEVICE,
            "--since",
            "2020-01-01",
            "--format",
            format,
            "--out",
            out.to_str().expect("utf8"),
        ]));
        assert_eq!(code, 0, "{text}{err}");
        assert!(text.contains("sample(s) in 13 columns"), "{text}");
    }
    let (code, text, err) = run(&mut hub_cmd(&[
        "export",
        "--db",
        db.to_str().expect("utf8"),
        "--model",
        "nonesuch",
        "--format",
        "csv",
        "--out",
        dir.join("none.csv").to_str().expect("utf8"),
    ]));
    assert_eq!(code, 1, "{text}");
    assert!(err.contains("no samples of model \"nonesuch\""), "{err}");

    let script = r#"
import json, sys
import pandas as pd
p = pd.read_parquet(sys.argv[1])
c = pd.read_csv(sys.argv[2], parse_dates=["time"])
print(json.dumps({
    "rows": len(p),
    "csv_rows": len(c),
    "columns": list(p.columns),
    "time": str(p["time"].dtype),
    "version": str(p["model_version"].dtype),
    "peak": str(p["peak_hz"].dtype),
    "devices": sorted(set(p["device"])),
    "same": bool((p[["rms", "kurtosis", "crest_factor", "peak_hz", "output_label"]].values
                  == c[["rms", "kurtosis", "crest_factor", "peak_hz", "output_label"]].values).all()),
    "max_peak": float(p["peak_hz"].max()),
}))
"#;
    let (code, out, err) = run(Command::new("python3").arg("-c").arg(script).arg(&parquet).arg(&csv));
    assert_eq!(
        code, 0,
        "pandas could not read the export (pip install pandas pyarrow): {out}{err}"
    );
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["rows"], v["csv_rows"], "{v}");
    assert!(v["rows"].as_u64() > Some(20), "{v}");
    assert_eq!(
        v["columns"],
        serde_json::json!([
            "time",
            "fleet",
            "device",
            "model_version",
            "reason",
            "source",
            "crest_factor",
            "kurtosis",
            "peak_hz",
            "rms",
            "output_label",
            "output_probabilities_0",
            "output_probabilities_1"
        ]),
        "{v}"
    );
    assert_eq!(v["time"], "datetime64[ms, UTC]", "{v}");
    assert_eq!(
        (v["version"].as_str(), v["peak"].as_str()),
        (Some("int64"), Some("float64"))
    );
    assert_eq!(v["devices"], serde_json::json!([DEVICE]));
    assert_eq!(v["same"], true, "{v}");
    // The recalibrated peak frequencies are in the export: above the training maximum (≈ 480).
    assert!(v["max_peak"].as_f64() > Some(500.0), "{v}");
}

/// Windows close on the operator's cron schedule and on age, as well as on count: a
/// scheduled close reports a window too small to judge as `few_rows`; one old enough with
/// `min_rows` rows closes on `time` and is judged.
#[test]
fn windows_close_on_schedule_and_on_age() {
    let s = Fleet::new();
    let bundle = pack_with_baseline(&s);
    let scheduled = s.device(
        "line-4",
        s.hub_broker.port,
        &[
            ("drift", "window_rows = 100000"),
            ("drift", "min_rows = 50"),
            ("drift", "schedule = \"*/2 * * * * *\""),
        ],
    );
    let aged = s.device(
        "line-5",
        s.hub_broker.port,
        &[
            ("drift", "window_rows = 100000"),
            ("drift", "min_rows = 50"),
            ("drift", "window_secs = 1"),
        ],
    );
    let _hub = s.hub();
    let _a = s.agent(&scheduled);
    let _b = s.agent(&aged);
    for d in [&scheduled, &aged] {
        wait_online(s.hub_broker.port, &d.id);
        let (code, out) = s.deploy(d, &bundle);
        assert_eq!(code, 0, "{out}");
    }
    let one = Sensor::new(s.sensor_broker.port, "line-4");
    let text = std::fs::read_to_string(drift_csv("control")).expect("csv");
    let row = |i: usize| {
        let header: Vec<&str> = text.lines().next().expect("header").split(',').collect();
        let line = text.lines().nth(1 + i).expect("row");
        let o: serde_json::Map<String, Value> = header
            .iter()
            .zip(line.split(','))
            .map(|(h, v)| (h.to_string(), Value::from(v.parse::<f64>().expect("number"))))
            .collect();
        Value::Object(o)
    };
    let ten: Vec<Value> = (0..10).map(row).collect();
    one.send(serde_json::to_vec(&ten).expect("json"));
    let window = |device: &str| -> Option<Value> {
        let rows = hub_rows(&s.hub_db, device, "drift");
        serde_json::from_str(&rows.first()?.1).ok()
    };
    let w = eventually(Duration::from_secs(30), || window("line-4")).expect("a scheduled window at the hub");
    assert_eq!(
        (w["closed_by"].as_str(), w["status"].as_str(), w["rows"].as_u64()),
        (Some("schedule"), Some("few_rows"), Some(10)),
        "{w}"
    );

    let other = Sensor::new(s.sensor_broker.port, "line-5");
    let sixty: Vec<Value> = (0..60).map(row).collect();
    other.send(serde_json::to_vec(&sixty).expect("json"));
    let w = eventually(Duration::from_secs(30), || window("line-5")).expect("a window closed on age");
    assert_eq!(
        (w["closed_by"].as_str(), w["rows"].as_u64()),
        (Some("time"), Some(60)),
        "{w}"
    );
    assert_ne!(w["status"], "few_rows", "{w}");
}

/// A backlog drains events and drift windows before the bulk of predictions: through an
/// uplink capped at 20 kB/s, a device makes 1,000 predictions much faster than it can send
/// them, and four drift windows among them; every window reaches the hub before half of the
/// predictions have. (Were predictions served first, the windows would wait for the whole
/// backlog.)
#[test]
fn a_backlog_serves_drift_before_predictions() {
    let s = Fleet::new();
    let bundle = pack_with_baseline(&s);
    let d = s.device(
        "line-6",
        s.hub_broker.port,
        &[
            ("drift", "window_rows = 250"),
            ("drift", "min_rows = 200"),
            ("predictions", "publish = false"),
            ("sync", "max_bytes_per_sec = 20000"),
            ("sync", "compression = \"none\""),
            ("sync", "ack_timeout_ms = 60000"),
        ],
    );
    let _hub = s.hub();
    let _agent = s.agent(&d);
    wait_online(s.hub_broker.port, "line-6");
    let (code, out) = s.deploy(&d, &bundle);
    assert_eq!(code, 0, "{out}");
    let sensor = Sensor::new(s.sensor_broker.port, "line-6");
    let sent = send_window(&sensor, "control", 1);
    sensor.wait_acked(sent);
    let arrived =
        |stream: &str| -> Vec<i64> { hub_rows(&s.hub_db, "line-6", stream).into_iter().map(|r| r.0).collect() };
    let done = eventually(Duration::from_secs(120), || {
        let (p, w) = (arrived("predictions"), arrived("drift"));
        (p.len() >= 1000 && w.len() >= 4).then_some((p, w))
    });
    let (predictions, windows) = done.expect("the backlog drained");
    let (first, last) = (predictions[0], *predictions.last().expect("predictions"));
    assert!(last - first > 3000, "the cap made a backlog: {first}..{last}");
    let last_window = windows[3];
    let median_prediction = predictions[predictions.len() / 2];
    assert!(
        last_window <= median_prediction,
        "the fourth drift window arrived at {last_window}, after half the predictions ({median_prediction})"
    );
}
