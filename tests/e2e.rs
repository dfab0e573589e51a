//! End to end: real `lathe` and `lathe-hub` processes against real Mosquitto brokers.

use lathe_e2e::*;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const FLEET: &str = "plant1";
const DEVICE: &str = "press-7";

struct Setup {
    dir: tempfile::TempDir,
    hub_broker: Mosquitto,
    sensor_broker: Mosquitto,
    bundle: PathBuf,
    hub_db: PathBuf,
    state_dir: PathBuf,
    config: PathBuf,
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("fixtures/models").join(name)
}

fn hub(args: &[&str]) -> Command {
    let mut c = Command::new(&bins().1);
    c.args(args).env("LATHE_LOG", "warn");
    c
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub_broker = Mosquitto::start(dir.path(), "hub-broker");
    let sensor_broker = Mosquitto::start(dir.path(), "sensor-broker");
    let d = dir.path().to_str().expect("utf8 path").to_string();
    let (code, out, err) = run(&mut hub(&["keygen", "--out-dir", &d, "--name", "k1"]));
    assert_eq!(code, 0, "keygen: {out}{err}");
    std::fs::copy(dir.path().join("k1.pub"), dir.path().join("trust.keys")).expect("trust.keys");
    let bundle = pack(dir.path(), 1);
    let state_dir = dir.path().join("agent-state");
    let config = dir.path().join("lathe.toml");
    std::fs::write(
        &config,
        format!(
            r#"[device]
fleet = "{FLEET}"
id = "{DEVICE}"
state_dir = "{state}"
[broker]
host = "127.0.0.1"
port = {hub_port}
keep_alive_secs = 5
backoff_initial_ms = 100
backoff_max_ms = 1000
[inputs]
topics = ["sensors/{DEVICE}/features"]
qos = 1
[inputs.broker]
host = "127.0.0.1"
port = {sensor_port}
[trust]
keys_file = "{d}/trust.keys"
[sync]
interval_ms = 100
ack_timeout_ms = 2000
batch_records = 50
"#,
            state = state_dir.display(),
            hub_port = hub_broker.port,
            sensor_port = sensor_broker.port,
        ),
    )
    .expect("write config");
    let hub_db = dir.path().join("hub.db");
    Setup {
        dir,
        hub_broker,
        sensor_broker,
        bundle,
        hub_db,
        state_dir,
        config,
    }
}

/// Pack the fixture model as `bearing` at `version`, signed with k1.
fn pack(dir: &Path, version: u64) -> PathBuf {
    let out = dir.join(format!("bearing-{version}.lbundle"));
    let (code, o, e) = run(&mut hub(&[
        "bundle",
        "pack",
        "--model",
        fixture("vibration_logreg.onnx").to_str().expect("utf8"),
        "--name",
        "bearing",
        "--version",
        &version.to_string(),
        "--features-file",
        fixture("vibration_logreg.features.json").to_str().expect("utf8"),
        "--key",
        dir.join("k1.key").to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
    ]));
    assert_eq!(code, 0, "pack: {o}{e}");
    out
}

fn start_hub(s: &Setup) -> Proc {
    Proc::spawn(
        "lathe-hub serve",
        hub(&[
            "serve",
            "--broker",
            &format!("127.0.0.1:{}", s.hub_broker.port),
            "--db",
            s.hub_db.to_str().expect("utf8"),
        ])
        .stdout(Stdio::null()),
    )
}

fn start_agent(s: &Setup) -> Proc {
    Proc::spawn(
        "lathe run",
        Command::new(&bins().0)
            .arg("run")
            .arg("--config")
            .arg(&s.config)
            .env("LATHE_LOG", "info,rumqttc=warn"),
    )
}

/// Subscribe on a broker and forward (topic, payload) of every publish.
fn watch(port: u16, filter: &str, name: &str) -> mpsc::Receiver<(String, Vec<u8>)> {
    let mut opts = MqttOptions::new(name, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = Client::new(opts, 100);
    let (tx, rx) = mpsc::channel();
    let filter = filter.to_string();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    rx
}

fn wait_online(port: u16) {
    let rx = watch(port, &format!("lathe/v1/{FLEET}/{DEVICE}/state"), "e2e-state-watch");
    let online = eventually(Duration::from_secs(30), || {
        let (_, p) = rx.recv_timeout(Duration::from_millis(200)).ok()?;
        let v: Value = serde_json::from_slice(&p).ok()?;
        (v["status"] == "online").then_some(())
    });
    assert!(online.is_some(), "the agent never published its birth message");
}

fn deploy(s: &Setup, bundle: &Path) -> (i32, String) {
    let (code, out, err) = run(&mut hub(&[
        "deploy",
        "--broker",
        &format!("127.0.0.1:{}", s.hub_broker.port),
        "--fleet",
        FLEET,
        "--device",
        DEVICE,
        "--bundle",
        bundle.to_str().expect("utf8"),
        "--timeout-secs",
        "30",
    ]));
    (code, format!("{out}{err}"))
}

fn status(s: &Setup) -> (i32, Value) {
    let (code, out, err) = run(Command::new(&bins().0)
        .args(["status", "--json", "--state-dir"])
        .arg(&s.state_dir));
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}{err}"));
    (code, v)
}

/// Predictions stored at the hub, by reading id (the row index the test sent).
fn hub_predictions(db: &Path) -> Vec<(i64, Value)> {
    let Ok(conn) = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return vec![];
    };
    let Ok(mut st) = conn.prepare("SELECT data FROM records WHERE stream = 'predictions'") else {
        return vec![];
    };
    let rows = st.query_map([], |r| r.get::<_, String>(0)).expect("query");
    rows.filter_map(|r| r.ok())
        .filter_map(|d| serde_json::from_str::<Value>(&d).ok())
        .filter_map(|v| Some((v["reading_id"].as_i64()?, v)))
        .collect()
}

struct Cases {
    features: Vec<String>,
    rows: Vec<Vec<f64>>,
    expected: Vec<BTreeMap<String, Vec<f64>>>,
}

fn cases() -> Cases {
    let v: Value =
        serde_json::from_slice(&std::fs::read(fixture("vibration_logreg.cases.json")).expect("cases")).expect("json");
    Cases {
        features: serde_json::from_value(v["features"].clone()).expect("features"),
        rows: serde_json::from_value(v["rows"].clone()).expect("rows"),
        expected: serde_json::from_value(v["expected"].clone()).expect("expected"),
    }
}

fn reading(c: &Cases, id: i64) -> Vec<u8> {
    let row = &c.rows[id as usize % c.rows.len()];
    let mut o = serde_json::Map::new();
    for (f, v) in c.features.iter().zip(row) {
        o.insert(f.clone(), Value::from(*v));
    }
    o.insert("id".into(), Value::from(id));
    serde_json::to_vec(&o).expect("json")
}

#[test]
fn deploy_infer_survive_broker_restart_and_sync_exactly_once() {
    let mut s = setup();
    let _hub = start_hub(&s);
    let mut agent = start_agent(&s);
    wait_online(s.hub_broker.port);

    // A tampered bundle is refused with its reason, and nothing is active.
    let mut bytes = std::fs::read(&s.bundle).expect("bundle");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let tampered = s.dir.path().join("tampered.lbundle");
    std::fs::write(&tampered, &bytes).expect("write");
    let (code, out) = deploy(&s, &tampered);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("digest_mismatch") && out.contains("model.onnx"), "{out}");
    assert!(out.contains("active: none"), "{out}");

    let (code, out) = deploy(&s, &s.bundle);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("activated bearing v1"), "{out}");
    // The same version again is not newer.
    let (code, out) = deploy(&s, &s.bundle);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not_newer") && out.contains("active: bearing v1"), "{out}");

    // Sensors publish to their own broker; the agent's link to the hub broker will die.
    let c = cases();
    let mut opts = MqttOptions::new("e2e-sensors", "127.0.0.1", s.sensor_broker.port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (sensors, mut conn) = Client::new(opts, 1000);
    std::thread::spawn(move || for _ in conn.iter() {});
    let topic = format!("sensors/{DEVICE}/features");
    let live = watch(
        s.hub_broker.port,
        &format!("lathe/v1/{FLEET}/{DEVICE}/pred"),
        "e2e-pred-watch",
    );
    // Warm up until one prediction comes back, so the agent's sensor subscription is in place.
    let warm = eventually(Duration::from_secs(30), || {
        sensors
            .publish(topic.clone(), QoS::AtLeastOnce, false, reading(&c, -1))
            .ok()?;
        live.recv_timeout(Duration::from_millis(300)).ok()
    });
    assert!(warm.is_some(), "no live prediction for the warm-up reading");

    let send = |from: i64, to: i64| {
        for id in from..to {
            sensors
                .publish(topic.clone(), QoS::AtLeastOnce, false, reading(&c, id))
                .expect("publish");
            std::thread::sleep(Duration::from_millis(3));
        }
    };
    const N: i64 = 600;
    send(0, 200);
    s.hub_broker.kill();
    send(200, 400);
    // While the hub broker is down, status still answers from the device's database.
    let buffered = eventually(Duration::from_secs(20), || {
        let (code, v) = status(&s);
        (code == 1 && v["connection"]["state"] == "disconnected" && v["outbox_depth"].as_u64()? > 0).then_some(v)
    });
    assert!(
        buffered.is_some(),
        "status did not show a disconnected agent with a buffered outbox: {:?}",
        status(&s)
    );
    s.hub_broker.up();
    send(400, N);

    let all = eventually(Duration::from_secs(60), || {
        let p = hub_predictions(&s.hub_db);
        (p.iter().filter(|(id, _)| *id >= 0).count() as i64 >= N).then_some(p)
    });
    let preds: Vec<(i64, Value)> = all
        .unwrap_or_else(|| panic!("hub has {} of {N} predictions", hub_predictions(&s.hub_db).len()))
        .into_iter()
        .filter(|(id, _)| *id >= 0)
        .collect();
    // Exactly once: N records, N distinct reading ids.
    let ids: std::collections::BTreeSet<i64> = preds.iter().map(|(id, _)| *id).collect();
    assert_eq!(preds.len() as i64, N, "duplicates stored at the hub");
    assert_eq!(ids.len() as i64, N);
    // Each prediction matches onnxruntime's output for its row.
    for (id, v) in &preds {
        let want = &c.expected[*id as usize % c.rows.len()];
        assert_eq!(v["model"]["name"], "bearing");
        for (name, values) in want {
            let got: Vec<f64> = serde_json::from_value(v["outputs"][name].clone()).expect("output values");
            assert_eq!(got.len(), values.len(), "reading {id} output {name}");
            for (g, w) in got.iter().zip(values) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "reading {id} output {name}: {g} vs onnxruntime {w}"
                );
            }
        }
    }

    let drained = eventually(Duration::from_secs(20), || {
        let (_, v) = status(&s);
        (v["outbox_depth"] == 0 && v["connection"]["state"] == "connected").then_some(v)
    });
    let v = drained.unwrap_or_else(|| panic!("outbox did not drain: {:?}", status(&s)));
    assert_eq!(v["model"]["name"], "bearing");
    assert_eq!(v["model"]["version"], 1);

    // A newer version deploys; a rollback returns to the previous one.
    let v2 = pack(s.dir.path(), 2);
    let (code, out) = deploy(&s, &v2);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("activated bearing v2"), "{out}");
    let (code, out, err) = run(&mut hub(&[
        "rollback",
        "--broker",
        &format!("127.0.0.1:{}", s.hub_broker.port),
        "--fleet",
        FLEET,
        "--device",
        DEVICE,
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rolled back to bearing v1"), "{out}");

    // An orderly stop, then a restart: the active model comes back from disk, re-verified.
    assert_eq!(
        agent.terminate(Duration::from_secs(15)),
        Some(0),
        "agent exits cleanly on SIGTERM"
    );
    let _agent = start_agent(&s);
    let back = eventually(Duration::from_secs(30), || {
        let (_, v) = status(&s);
        (v["agent"] == "running" && v["connection"]["state"] == "connected").then_some(v)
    });
    let v = back.unwrap_or_else(|| panic!("agent did not come back: {:?}", status(&s)));
    assert_eq!(v["model"]["version"], 1, "{v}");
    assert_eq!(v["previous_model"]["version"], 2, "{v}");
    let after = eventually(Duration::from_secs(30), || {
        sensors
            .publish(topic.clone(), QoS::AtLeastOnce, false, reading(&c, N))
            .ok()?;
        let p = hub_predictions(&s.hub_db);
        p.iter().find(|(id, _)| *id == N).map(|(_, v)| v.clone())
    });
    let v = after.expect("a prediction after the restart reaches the hub");
    assert_eq!(v["model"]["version"], 1);
    drop(s.sensor_broker);
}

#[test]
fn bad_config_exits_with_the_config_code_and_names_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[device]\nfleet = \"f\"\nid = \"d\"\n[broker]\nhost = \"127.0.0.1\"\n[trust]\nkeys_file = \"x\"\n[sync]\nbatch_records = 0\n",
    )
    .expect("write");
    let (code, _, err) = run(Command::new(&bins().0).arg("run").arg("--config").arg(&cfg));
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("sync.batch_records"), "{err}");
    let (code, _, err) = run(Command::new(&bins().0).arg("run").arg("--bogus"));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn pack_refuses_a_model_the_agent_cannot_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8").to_string();
    let (code, out, err) = run(&mut hub(&["keygen", "--out-dir", &d, "--name", "k1"]));
    assert_eq!(code, 0, "{out}{err}");
    let out_file = format!("{d}/x.lbundle");
    let (code, out, err) = run(&mut hub(&[
        "bundle",
        "pack",
        "--model",
        fixture("unsupported_op.onnx").to_str().expect("utf8"),
        "--name",
        "x",
        "--version",
        "1",
        "--features",
        "a,b,c,d",
        "--key",
        &format!("{d}/k1.key"),
        "--out",
        &out_file,
    ]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("refusing to sign")
            && err.contains("com.example.lathe:FeatureHasher")
            && err.contains("hash_features"),
        "{err}"
    );
    assert!(
        !std::path::Path::new(&out_file).exists(),
        "nothing is written for a refused model"
    );
}
