//! End to end: real `lathe` and `lathe-hub` processes against real Mosquitto brokers.

use lathe_e2e::*;
use rumqttc::{Client, MqttOptions, QoS};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const DEVICE: &str = "press-7";

#[test]
fn deploy_infer_survive_broker_restart_and_sync_exactly_once() {
    let mut s = Fleet::new();
    let d = s.device(DEVICE, s.hub_broker.port, &[]);
    let _hub = s.hub();
    let mut agent = s.agent(&d);
    wait_online(s.hub_broker.port, DEVICE);

    // A tampered bundle is refused with its reason, and nothing is active.
    let mut bytes = std::fs::read(&s.bundle).expect("bundle");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let tampered = s.path().join("tampered.lbundle");
    std::fs::write(&tampered, &bytes).expect("write");
    let (code, out) = s.deploy(&d, &tampered);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("digest_mismatch") && out.contains("model.onnx"), "{out}");
    assert!(out.contains("active: none"), "{out}");

    let (code, out) = s.deploy(&d, &s.bundle);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("activated bearing v1"), "{out}");
    // The same desired state again (a deploy re-run after a lost answer) changes nothing.
    let (code, out) = s.deploy(&d, &s.bundle);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("active: bearing v1"), "{out}");

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
    let batches = watch(
        s.hub_broker.port,
        &format!("lathe/v1/{FLEET}/{DEVICE}/sync/predictions"),
        "e2e-sync-watch",
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
        let (code, v) = status(&d);
        (code == 1 && v["connection"]["state"] == "disconnected" && v["outbox_depth"].as_u64()? > 0).then_some(v)
    });
    assert!(
        buffered.is_some(),
        "status did not show a disconnected agent with a buffered outbox: {:?}",
        status(&d)
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
        let (_, v) = status(&d);
        (v["outbox_depth"] == 0 && v["connection"]["state"] == "connected").then_some(v)
    });
    let v = drained.unwrap_or_else(|| panic!("outbox did not drain: {:?}", status(&d)));
    assert_eq!(v["model"]["name"], "bearing");
    assert_eq!(v["model"]["version"], 1);
    // The hub's acks say it reads zstd, so batches after the first are compressed.
    let compressed = batches
        .try_iter()
        .filter(|(_, p)| p.starts_with(&protocol::sync::ZSTD_MAGIC))
        .count();
    assert!(compressed > 0, "no batch was zstd-compressed");
    // What was buffered while the hub broker was down arrived flagged historical; what was
    // sent live was not.
    let (code, audit) = s.audit();
    assert_eq!(code, 0, "{audit:#}");
    let p = audit["epochs"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["stream"] == "predictions"))
        .expect("predictions at the hub");
    let historical = p["historical"].as_u64().expect("historical");
    assert!(historical >= 100 && historical < N as u64, "{p}");

    // A newer version deploys; a rollback returns to the previous one.
    let v2 = s.pack(2);
    let (code, out) = s.deploy(&d, &v2);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("activated bearing v2"), "{out}");
    // A rollback is a signed desired state naming v1; run twice, it stays on v1.
    for _ in 0..2 {
        let (code, out) = s.rollout(&d, "rollback", &s.bundle);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("rolled back to bearing v1 (active: bearing v1)"), "{out}");
    }

    // An orderly stop, then a restart: the active model comes back from disk, re-verified.
    assert_eq!(
        agent.terminate(Duration::from_secs(15)),
        Some(0),
        "agent exits cleanly on SIGTERM"
    );
    let _agent = s.agent(&d);
    let back = eventually(Duration::from_secs(30), || {
        let (_, v) = status(&d);
        (v["agent"] == "running" && v["connection"]["state"] == "connected").then_some(v)
    });
    let v = back.unwrap_or_else(|| panic!("agent did not come back: {:?}", status(&d)));
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
    let (code, out, err) = run(&mut hub_cmd(&["keygen", "--out-dir", &d, "--name", "k1"]));
    assert_eq!(code, 0, "{out}{err}");
    let out_file = format!("{d}/x.lbundle");
    let (code, out, err) = run(&mut hub_cmd(&[
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
