//! Fault tests: the real `lathe` and `lathe-hub` binaries against real Mosquitto brokers, under
//! forged messages, lost and restored databases, `kill -9`, broker restarts, black-holed
//! links, hostile payloads, a full disk and a stepped wall clock.
//!
//! After each, the hub holds every prediction once, or the loss is declared and counted:
//! `lathe-hub audit` finds nothing unaccounted, and no record is stored twice.

use lathe_e2e::*;
use rumqttc::{Client, MqttOptions, QoS};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A plain MQTT client for forging messages.
fn forger(port: u16, name: &str) -> Client {
    let mut opts = MqttOptions::new(name, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(256 << 20, 256 << 20);
    let (client, mut conn) = Client::new(opts, 1000);
    std::thread::spawn(move || for _ in conn.iter() {});
    client
}

fn publish(c: &Client, topic: &str, payload: Vec<u8>) {
    c.publish(topic, QoS::AtLeastOnce, false, payload)
        .expect("queue a publish");
}

fn stream<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["outbox_by_stream"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["stream"] == name))
        .unwrap_or(&Value::Null)
}

/// Wait until the device's outbox is empty.
fn wait_drained(d: &Device) {
    let ok = eventually(Duration::from_secs(60), || {
        let (_, v) = status(d);
        (v["outbox_depth"] == 0).then_some(())
    });
    assert!(ok.is_some(), "the outbox of {} did not drain: {}", d.id, status(d).1);
}

/// Every check that holds after any fault: nothing unaccounted at the hub, no record stored
/// twice, and every reading id in `ids` predicted.
fn assert_whole(f: &Fleet, ids: impl IntoIterator<Item = i64>) {
    let want: Vec<i64> = ids.into_iter().collect();
    wait_hub_has(&f.hub_db, want.iter().copied(), Duration::from_secs(90));
    let records = hub_records(&f.hub_db, "predictions");
    let mut seen = BTreeSet::new();
    for r in &records {
        assert!(seen.insert(r.as_str()), "a record is stored twice at the hub: {r}");
    }
    let (code, audit) = f.audit();
    assert_eq!(code, 0, "audit: {audit:#}");
    for e in audit["epochs"].as_array().expect("epochs") {
        assert_eq!(e["unaccounted"], 0, "{e}");
    }
}

/// Start a device with model v1 deployed.
fn deployed(f: &Fleet, d: &Device) -> Proc {
    let agent = f.agent(d);
    wait_online(f.hub_broker.port, &d.id);
    let (code, out) = f.deploy(d, &f.bundle);
    assert_eq!(code, 0, "{out}");
    agent
}

/// Regression: one forged ack (`acked: 1000000000`) deleted a device's outbox and wedged it;
/// an empty forged batch declaring a billion lost did the same through the hub.
#[test]
fn forged_acks_and_batches_delete_nothing() {
    let f = Fleet::new();
    let d = f.device("press-1", f.hub_broker.port, &[]);
    let _agent = deployed(&f, &d);
    let c = cases();
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    // No hub yet: 200 predictions wait in the outbox.
    sensor.send_range(&c, 0, 200, Duration::ZERO);
    let waiting = eventually(Duration::from_secs(30), || {
        let (_, v) = status(&d);
        (stream(&v, "predictions")["waiting"] == 200).then_some(v)
    })
    .unwrap_or_else(|| panic!("200 predictions never waited: {}", status(&d).1));
    let e1 = stream(&waiting, "predictions")["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    let forge = forger(f.hub_broker.port, "forger");
    let ack_topic = format!("lathe/v1/{FLEET}/{}/ack/predictions", d.id);
    publish(
        &forge,
        &ack_topic,
        json!({"stream": "predictions", "epoch": e1, "acked": 1_000_000_000u64})
            .to_string()
            .into(),
    );
    let refused = eventually(Duration::from_secs(20), || {
        let (code, v) = status(&d);
        (v["acks_refused"] == 1 && stream(&v, "predictions")["epoch"] != e1.as_str()).then_some((code, v))
    });
    let (code, v) = refused.unwrap_or_else(|| panic!("the forged ack was not refused: {}", status(&d).1));
    assert_eq!(stream(&v, "predictions")["waiting"], 200, "records were deleted: {v}");
    assert_ne!(
        stream(&v, "predictions")["epoch"],
        e1.as_str(),
        "the records moved to a new epoch: {v}"
    );
    assert_eq!(code, 1, "status names the refused ack as a problem: {v}");
    assert!(v["problems"].to_string().contains("ack(s) refused"), "{v}");
    let e2 = stream(&v, "predictions")["epoch"].as_str().expect("epoch").to_string();

    // The hub comes up; forged batches arrive on the device's sync topic with the live traffic.
    let _hub = f.hub();
    let sync_topic = format!("lathe/v1/{FLEET}/{}/sync/predictions", d.id);
    for epoch in [&e1, &e2] {
        publish(
            &forge,
            &sync_topic,
            json!({"device": d.id, "stream": "predictions", "epoch": epoch, "lost_through": 1_000_000_000u64, "acked": 1_000_000_000u64, "records": []})
                .to_string()
                .into(),
        );
    }
    publish(
        &forge,
        &sync_topic,
        json!({"device": d.id, "stream": "predictions", "epoch": e2, "lost_through": 999_999_999u64,
               "records": [{"seq": 1_000_000_000u64, "ts_ms": 1, "data": {"forged": true}}]})
        .to_string()
        .into(),
    );
    publish(
        &forge,
        &sync_topic,
        json!({"device": "someone-else", "stream": "predictions", "epoch": e2, "records": [{"seq": 1, "ts_ms": 1, "data": {"forged": true}}]})
            .to_string()
            .into(),
    );
    // Malformed and oversized batches at the hub: refused, nothing stored, the hub carries on.
    let bomb = protocol::sync::compress(&vec![b' '; 64 << 20], 3);
    for junk in [
        b"\x00\x01 not json".to_vec(),
        bomb,
        vec![b'{'; 20 << 20],
        json!({"device": d.id, "stream": "predictions", "epoch": e2, "records": [{"seq": 9, "ts_ms": 1, "data": 1}, {"seq": 3, "ts_ms": 1, "data": 2}]})
            .to_string()
            .into(),
        json!({"device": d.id, "stream": "predictions", "epoch": "not hex!", "records": [{"seq": 1, "ts_ms": 1, "data": 1}]})
            .to_string()
            .into(),
    ] {
        publish(&forge, &sync_topic, junk);
    }
    sensor.send_range(&c, 200, 300, Duration::from_millis(2));
    assert_whole(&f, 0..300);
    let preds = hub_predictions(&f.hub_db);
    let per_id: BTreeMap<i64, usize> = preds.iter().fold(BTreeMap::new(), |mut m, (id, _)| {
        *m.entry(*id).or_default() += 1;
        m
    });
    assert!(per_id.values().all(|n| *n == 1), "a reading was predicted twice");
    wait_drained(&d);
}

fn copy_dir(from: &Path, to: &Path) {
    let (code, out, err) = run(Command::new("cp").arg("-a").arg(from).arg(to));
    assert_eq!(code, 0, "cp: {out}{err}");
}

/// Copy the hub's database (with its WAL) aside, or back.
fn copy_db(from: &Path, to: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let (f, t) = (
            format!("{}{suffix}", from.display()),
            format!("{}{suffix}", to.display()),
        );
        let _ = std::fs::remove_file(&t);
        if Path::new(&f).exists() {
            std::fs::copy(&f, &t).expect("copy database");
        }
    }
}

fn audit_of<'a>(audit: &'a Value, device: &str, stream: &str) -> Vec<&'a Value> {
    audit["epochs"]
        .as_array()
        .expect("epochs")
        .iter()
        .filter(|e| e["device"] == device && e["stream"] == stream)
        .collect()
}

/// Regression: a hub whose database was restored or lost acked its lower watermark forever,
/// and every agent resent the same batch each ack timeout.
#[test]
fn a_hub_database_restored_or_deleted_converges_and_records_its_loss() {
    let f = Fleet::new();
    let d = f.device("press-2", f.hub_broker.port, &[]);
    let _agent = deployed(&f, &d);
    let c = cases();
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    let mut hub = f.hub();
    sensor.send_range(&c, 0, 100, Duration::ZERO);
    wait_hub_has(&f.hub_db, 0..100, Duration::from_secs(60));
    wait_drained(&d);
    hub.terminate(Duration::from_secs(5));
    let snapshot = f.path().join("hub-snapshot.db");
    copy_db(&f.hub_db, &snapshot);

    let mut hub = f.hub();
    sensor.send_range(&c, 100, 200, Duration::ZERO);
    wait_hub_has(&f.hub_db, 100..200, Duration::from_secs(60));
    wait_drained(&d);
    hub.terminate(Duration::from_secs(5));

    // Restored to the snapshot: it lacks 100..200, which the device was acked for.
    copy_db(&snapshot, &f.hub_db);
    let mut hub = f.hub();
    sensor.send_range(&c, 200, 300, Duration::ZERO);
    wait_hub_has(&f.hub_db, 200..300, Duration::from_secs(60));
    wait_drained(&d);
    let (code, audit) = f.audit();
    assert_eq!(code, 0, "{audit:#}");
    let p = audit_of(&audit, &d.id, "predictions");
    assert_eq!(p.len(), 1, "{audit:#}");
    assert_eq!(
        (p[0]["acked"].as_u64(), p[0]["hub_lost"].as_u64()),
        (Some(300), Some(100)),
        "{audit:#}"
    );
    let lost: Vec<&Value> = audit["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .filter(|l| l["stream"] == "predictions" && l["cause"] == "hub_store_behind")
        .collect();
    assert_eq!(lost.len(), 1, "{audit:#}");
    assert_eq!(lost[0]["count"], 100);
    hub.terminate(Duration::from_secs(5));

    // Deleted: a new, empty store learns what it lacks from the device's next batch.
    copy_db(&f.path().join("nothing"), &f.hub_db);
    let _hub = f.hub();
    sensor.send_range(&c, 300, 400, Duration::ZERO);
    wait_hub_has(&f.hub_db, 300..400, Duration::from_secs(60));
    wait_drained(&d);
    let (code, audit) = f.audit();
    assert_eq!(code, 0, "{audit:#}");
    let p = audit_of(&audit, &d.id, "predictions");
    assert_eq!(
        (p[0]["acked"].as_u64(), p[0]["hub_lost"].as_u64()),
        (Some(400), Some(300)),
        "{audit:#}"
    );
    assert_eq!(p[0]["records"], 100, "{audit:#}");
}

/// Regression: a gateway whose state_dir was restored from an image reused seqs the hub held;
/// its new records were taken for duplicates at the hub and deleted on the device.
#[test]
fn a_state_dir_restored_from_an_old_copy_loses_nothing() {
    let f = Fleet::new();
    let d = f.device("press-3", f.hub_broker.port, &[]);
    let mut agent = deployed(&f, &d);
    let c = cases();
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    let mut hub = f.hub();
    sensor.send_range(&c, 0, 50, Duration::ZERO);
    wait_hub_has(&f.hub_db, 0..50, Duration::from_secs(60));
    wait_drained(&d);
    // Records wait in the outbox when the image is taken.
    hub.terminate(Duration::from_secs(5));
    sensor.send_range(&c, 50, 100, Duration::ZERO);
    sensor.wait_acked(100);
    let waiting = eventually(Duration::from_secs(30), || {
        (stream(&status(&d).1, "predictions")["waiting"] == 50).then_some(())
    });
    assert!(waiting.is_some(), "{}", status(&d).1);
    assert_eq!(agent.terminate(Duration::from_secs(15)), Some(0));
    let image = f.path().join("image");
    copy_dir(&d.state_dir, &image);

    let _agent = f.agent(&d);
    let _hub = f.hub();
    sensor.send_range(&c, 100, 150, Duration::ZERO);
    wait_hub_has(&f.hub_db, 0..150, Duration::from_secs(60));
    wait_drained(&d);
    drop(_agent);

    // The image comes back: the outbox holds 50..100 again, and its next seqs are taken.
    std::fs::remove_dir_all(&d.state_dir).expect("remove state_dir");
    copy_dir(&image, &d.state_dir);
    let _agent = f.agent(&d);
    sensor.send_range(&c, 150, 250, Duration::from_millis(1));
    assert_whole(&f, 0..250);
    wait_drained(&d);
    let (_, v) = status(&d);
    let (_, audit) = f.audit();
    let conflicts: u64 = audit_of(&audit, &d.id, "predictions")
        .iter()
        .map(|e| e["conflicts"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        conflicts > 0 || v["acks_refused"].as_u64() > Some(0),
        "the restore went unnoticed: {v} {audit:#}"
    );
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

fn good_readings(sensor: &Sensor, c: &Cases, from: i64, to: i64) {
    sensor.send_range(c, from, to, Duration::ZERO);
}

fn losses_of(v: &Value, stream: &str, cause: &str) -> u64 {
    v["losses"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|l| l["stream"] == stream && l["cause"] == cause)
                .map(|l| l["total"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// Regression: memory was bounded by message count, not bytes (a 90 MiB reading or padded
/// `ping` needed gigabytes), and an echoed value could make a record larger than a packet.
/// Maximum-size and malformed messages on every subscribed topic: each is refused and counted
/// or handled, the agent keeps working, and its peak memory stays under the stated bound.
#[test]
fn hostile_messages_on_every_topic() {
    let f = Fleet::new();
    // Commands up to 64 KiB, packets up to 8 MiB, readings up to 256 KiB.
    let d = f.device(
        "press-4",
        f.hub_broker.port,
        &[
            ("broker", "max_packet_bytes = 8388608"),
            ("inputs.broker", "max_packet_bytes = 8388608"),
            ("trust", "max_bundle_bytes = 3145728"),
        ],
    );
    let agent = deployed(&f, &d);
    let _hub = f.hub();
    let c = cases();
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    let forge = forger(f.hub_broker.port, "forger-hub");
    let responses = watch(
        f.hub_broker.port,
        &format!("lathe/v1/{FLEET}/{}/res/+", d.id),
        "res-watch",
    );
    good_readings(&sensor, &c, 0, 20);
    wait_hub_has(&f.hub_db, 0..20, Duration::from_secs(60));

    let limit = 256 << 10;
    let padded = |id: i64, total: usize| {
        let mut r: Value = serde_json::from_slice(&reading(&c, id)).expect("json");
        let body = r.to_string().len() + 12;
        r["pad"] = Value::String("x".repeat(total.saturating_sub(body)));
        let bytes = r.to_string().into_bytes();
        assert!(
            (bytes.len() as i64 - total as i64).abs() < 16,
            "{} vs {total}",
            bytes.len()
        );
        bytes
    };
    // Larger than the readings link's packet limit: the broker would resend it forever to the
    // persistent session, so the link drops the session once, and says so.
    sensor.send(padded(10_001, 8 << 20));
    let reset = eventually(Duration::from_secs(30), || {
        let (_, v) = status(&d);
        (losses_of(&v, "readings", "session_reset") == 1 && v["inputs_connection"]["state"] == "connected")
            .then_some(())
    });
    assert!(reset.is_some(), "{}", status(&d).1);

    // A flood of readings at the size limit: accepted while the queue has bytes for them,
    // refused as queue_full beyond.
    for id in 1000..1060 {
        sensor.send(padded(id, limit - 8));
    }
    // Over the limit, malformed, hostile: each refused and counted.
    let hostile: Vec<Vec<u8>> = vec![
        padded(10_000, limit + 1024),
        b"{".to_vec(),
        b"\xff\xfe not utf8".to_vec(),
        b"[]".to_vec(),
        br#"{"rms": "loud"}"#.to_vec(),
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        format!(r#"{{"id": {}}}"#, "[".repeat(5000) + &"]".repeat(5000)).into_bytes(),
        br#"{"rms": 1e999, "kurtosis": 1, "crest_factor": 1, "peak_hz": 1}"#.to_vec(),
    ];
    for h in &hostile {
        sensor.send(h.clone());
    }
    // A reading with a huge id: accepted, its echo cut.
    let mut big_id: Value = serde_json::from_slice(&reading(&c, 0)).expect("json");
    big_id["id"] = Value::String(format!("huge-{}", "i".repeat(200_000)));
    sensor.send(big_id.to_string().into_bytes());

    // Commands: over the limit, garbage, a long unknown op; then a flood of maximum-size
    // padded pings.
    // Commands are pings since protocol 1.4: the default limit is 64 KiB.
    let cmd_limit = 65536usize;
    let cmd = |n: usize| format!(r#"{{"op":"ping","padding":[{}]}}"#, vec!["0"; n / 2].join(",")).into_bytes();
    let cmd_topic = |id: &str| format!("lathe/v1/{FLEET}/{}/cmd/{id}", d.id);
    publish(&forge, &cmd_topic("toolarge"), cmd(cmd_limit + 4096));
    publish(&forge, &cmd_topic("garbage"), b"\x00\x01garbage".to_vec());
    publish(
        &forge,
        &cmd_topic("longop"),
        format!(r#"{{"op":"{}"}}"#, "x".repeat(100_000)).into_bytes(),
    );
    let mut answers = BTreeMap::new();
    let mut collect = |want: &dyn Fn(&BTreeMap<String, Value>) -> bool| {
        let got = eventually(Duration::from_secs(60), || {
            while let Ok((t, p)) = responses.recv_timeout(Duration::from_millis(100)) {
                let v: Value = serde_json::from_slice(&p).ok()?;
                answers.insert(t.rsplit('/').next()?.to_string(), v);
            }
            want(&answers).then_some(())
        });
        assert!(got.is_some(), "answers: {answers:?}");
    };
    collect(&|a| ["toolarge", "garbage", "longop"].iter().all(|k| a.contains_key(*k)));
    let max_cmd = cmd(cmd_limit - 64);
    assert!(max_cmd.len() <= cmd_limit && max_cmd.len() > cmd_limit - 128);
    for i in 0..12 {
        publish(&forge, &cmd_topic(&format!("flood{i}")), max_cmd.clone());
    }
    // Acks: oversized, malformed, for another stream, for another epoch.
    let ack = format!("lathe/v1/{FLEET}/{}/ack/predictions", d.id);
    publish(&forge, &ack, vec![b' '; 4 << 20]);
    publish(&forge, &ack, b"{\"stream\":".to_vec());
    publish(
        &forge,
        &ack,
        json!({"stream": "events", "epoch": "00", "acked": 5})
            .to_string()
            .into(),
    );
    publish(
        &forge,
        &ack,
        json!({"stream": "predictions", "epoch": "0000000000000000", "acked": 1_000_000})
            .to_string()
            .into(),
    );
    // Lathe topics of other devices and unknown streams are not for this agent.
    publish(
        &forge,
        &format!("lathe/v1/{FLEET}/someone/cmd/x"),
        br#"{"op":"rollback"}"#.to_vec(),
    );
    publish(
        &forge,
        &format!("lathe/v1/{FLEET}/{}/ack/unknownstream", d.id),
        b"{}".to_vec(),
    );

    good_readings(&sensor, &c, 20, 50);
    // The agent still works: every well-formed reading is predicted.
    assert_whole(&f, 0..50);

    // The commands were answered: pings pong or are refused as busy; the oversized and
    // malformed ones are refused and quoted briefly.
    collect(&|a| (0..12).all(|i| a.contains_key(&format!("flood{i}"))));
    assert_eq!(answers["toolarge"]["code"], "too_large", "{answers:?}");
    assert_eq!(answers["garbage"]["code"], "bad_command");
    assert!(
        answers["longop"]["message"].as_str().expect("message").len() < 300,
        "{answers:?}"
    );
    let flood: Vec<&Value> = (0..12).map(|i| &answers[&format!("flood{i}")]).collect();
    assert!(flood.iter().any(|a| a["message"] == "pong"), "{flood:?}");
    assert!(
        flood.iter().all(|a| a["message"] == "pong" || a["code"] == "busy"),
        "{flood:?}"
    );

    // Losses are counted per cause.
    let (_, v) = status(&d);
    assert_eq!(losses_of(&v, "readings", "too_large"), 1, "{v}");
    assert_eq!(losses_of(&v, "readings", "malformed"), 7, "{v}");
    assert!(losses_of(&v, "commands", "too_large") >= 1, "{v}");
    // The huge id was cut: every stored prediction is small.
    for r in hub_records(&f.hub_db, "predictions") {
        assert!(r.len() < 2048, "a prediction of {} bytes", r.len());
    }
    // Peak memory, whatever came in: far below a 512 MB gateway.
    let peak_mib = peak_rss_kib(agent.child.id()) / 1024;
    eprintln!("peak RSS under the flood: {peak_mib} MiB");
    assert!(peak_mib < 96, "peak RSS {peak_mib} MiB under the flood");
}

/// Regression: with the state_dir on a full filesystem, records were lost while `lathe status`
/// said all was well and the hub recorded no loss. Under the free-space floor the policy
/// drops the oldest records; every loss is counted, shown, and reported to the hub, and what
/// the hub holds plus what it was told is lost is every prediction made.
#[test]
fn a_full_disk_loses_only_what_it_counts_and_says_so() {
    let f = Fleet::new();
    let mount = f.path().join("small");
    std::fs::create_dir_all(&mount).expect("mount point");
    let (code, out, err) = run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&mount));
    assert_eq!(
        code, 0,
        "this test mounts a 6 MiB tmpfs (it runs as root in CI): {out}{err}"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let d = f.device("press-5", f.hub_broker.port, &[]);
    let small = Device {
        state_dir: mount.join("state"),
        ..d.clone()
    };
    let text = std::fs::read_to_string(&d.config).expect("config").replace(
        &d.state_dir.display().to_string(),
        &small.state_dir.display().to_string(),
    );
    std::fs::write(
        &small.config,
        text.replace("qos = 1", "qos = 1\nmax_id_bytes = 4096")
            + "[outbox]\nmin_free_bytes = 3145728\nmax_wal_bytes = 1048576\n",
    )
    .expect("config");
    let _agent = deployed(&f, &small);
    let c = cases();
    let sensor = Sensor::new(f.sensor_broker.port, &small.id);
    // No hub: records pile up until the floor, with large ids so that it comes soon.
    let n = 3000i64;
    for id in 0..n {
        let mut r: Value = serde_json::from_slice(&reading(&c, id)).expect("json");
        r["id"] = json!({"n": id, "note": "x".repeat(3000)});
        sensor.send(r.to_string().into_bytes());
    }
    sensor.wait_acked(n as u64);
    let full = eventually(Duration::from_secs(60), || {
        let (code, v) = status(&small);
        let problems = v["problems"].to_string();
        (code == 1 && losses_of(&v, "predictions", "disk_full") > 0 && problems.contains("record(s) lost")).then_some(v)
    });
    let v = full.unwrap_or_else(|| panic!("status did not report the losses: {}", status(&small).1));
    // The floor held: the agent dropped its oldest records rather than fill the disk.
    let (free, floor) = (
        v["disk_free_bytes"].as_u64().expect("free"),
        v["disk_floor_bytes"].as_u64().expect("floor"),
    );
    assert!(free > floor / 2, "the disk filled past its floor: {v}");
    // The hub comes back: what it holds plus what it was told is lost is every prediction.
    let _hub = f.hub();
    wait_drained(&small);
    let stored: BTreeSet<i64> = hub_records(&f.hub_db, "predictions")
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["reading_id"]["n"].as_i64())
        .collect();
    // Every reading the agent received is accounted for: predicted and stored, predicted and
    // lost, or refused (a busy machine may find the readings queue full). Readings are at least
    // once: a sensor that reconnects under load sends again what the broker had not acked, so
    // the agent's own count of what it received is the total, not what the sensor sent.
    let health = watch(
        f.hub_broker.port,
        &format!("lathe/v1/{FLEET}/{}/health", small.id),
        "health-watch",
    );
    let mut h = Value::Null;
    let told = eventually(Duration::from_secs(30), || {
        while let Ok((_, p)) = health.try_recv() {
            h = serde_json::from_slice(&p).expect("health json");
        }
        let received = h["readings_total"].as_u64()?;
        let (_, audit) = f.audit();
        let lost = |stream: &str| -> Option<u64> {
            Some(
                audit["losses"]
                    .as_array()?
                    .iter()
                    .filter(|l| l["device"] == small.id.as_str() && l["stream"] == stream)
                    .map(|l| l["count"].as_u64().unwrap_or(0))
                    .sum(),
            )
        };
        let (predictions, readings) = (lost("predictions")?, lost("readings")?);
        let records = hub_records(&f.hub_db, "predictions").len() as u64;
        (records + predictions + readings == received).then_some((predictions, received))
    });
    let (lost, received) = told.unwrap_or_else(|| {
        panic!(
            "hub holds {} predictions ({} readings); its losses: {}; health: {h}",
            hub_records(&f.hub_db, "predictions").len(),
            stored.len(),
            f.audit().1
        )
    });
    assert!(lost > 0);
    assert!(
        received >= n as u64,
        "the agent received {received} of {n} readings: {h}"
    );
    let (_, v) = status(&small);
    assert_eq!(losses_of(&v, "predictions", "disk_full"), lost, "{v}");
    // The health counters agree with each other.
    let predictions = h["predictions_total"].as_u64().expect("predictions_total");
    let dropped = h["dropped_total"].as_u64().expect("dropped_total");
    let rejected = h["rejected_total"].as_u64().expect("rejected_total");
    // Every reading was made a durable prediction or refused, or its prediction was refused by
    // the outbox (then it is also in dropped_total).
    assert!(
        predictions + rejected <= received && received <= predictions + rejected + dropped,
        "{h}"
    );
    assert_eq!(dropped, lost, "every prediction lost is counted once: {h}");
    assert!(dropped <= received, "{h}");
}

fn libfaketime() -> &'static str {
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        Path::new(lib).exists(),
        "this test steps the agent's wall clock with libfaketime; scripts/test.sh installs it (apt-get install faketime)"
    );
    lib
}

/// The wall clock stepped backwards and forwards under a running agent: seqs, acks and
/// timers do not follow the wall clock, so nothing is lost or stored twice.
#[test]
fn wall_clock_steps_lose_and_duplicate_nothing() {
    let f = Fleet::new();
    let d = f.device("press-6", f.hub_broker.port, &[]);
    let clock = f.path().join("faketime");
    std::fs::write(&clock, "+0\n").expect("faketime file");
    let agent = Proc::spawn(
        "lathe run (faked clock)",
        Command::new(&bins().0)
            .arg("run")
            .arg("--config")
            .arg(&d.config)
            .env("LATHE_LOG", "info,rumqttc=warn")
            .env("LD_PRELOAD", libfaketime())
            .env("FAKETIME_TIMESTAMP_FILE", &clock)
            .env("FAKETIME_CACHE_DURATION", "0")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    );
    wait_online(f.hub_broker.port, &d.id);
    let (code, out) = f.deploy(&d, &f.bundle);
    assert_eq!(code, 0, "{out}");
    let _hub = f.hub();
    let c = cases();
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    let live = watch(
        f.hub_broker.port,
        &format!("lathe/v1/{FLEET}/{}/pred", d.id),
        "pred-watch",
    );
    let mut id = 0;
    for step in ["-1d", "+2d", "-3600", "+0"] {
        sensor.send_range(&c, id, id + 100, Duration::from_millis(2));
        id += 100;
        std::fs::write(&clock, format!("{step}\n")).expect("step the clock");
        std::thread::sleep(Duration::from_millis(700));
    }
    sensor.send_range(&c, id, id + 100, Duration::from_millis(2));
    id += 100;
    assert_whole(&f, 0..id);
    // The clock really moved: some predictions carry times a day away from now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_millis() as i64;
    let far = hub_predictions(&f.hub_db)
        .iter()
        .filter(|(_, v)| (v["ts_ms"].as_i64().unwrap_or(now) - now).abs() > 12 * 3_600_000)
        .count();
    assert!(far > 0, "libfaketime did not move the agent's clock");
    assert!(live.try_iter().count() > 0);
    drop(agent);
}

/// Live predictions seen on `pred`, kept in a set shared with the test.
fn collect_live(port: u16, device: &str) -> std::sync::Arc<std::sync::Mutex<BTreeSet<String>>> {
    let rx = watch(
        port,
        &format!("lathe/v1/{FLEET}/{device}/pred"),
        &format!("live-{device}"),
    );
    let seen = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for (_, p) in rx {
            s.lock().expect("lock").insert(String::from_utf8_lossy(&p).into_owned());
        }
    });
    seen
}

/// `kill -9` of the agent at random moments while readings stream in at QoS 1, with the hub
/// broker killed and the link black-holed now and then. Afterwards every reading the sensor
/// broker accepted is predicted, every prediction seen live is at the hub, no record is stored
/// twice and nothing is unaccounted.
///
/// Regression: a prediction went out live before its outbox append was durable, so a
/// `kill -9` could lose one that someone had already acted on; QoS 1 readings were PUBACKed
/// before their predictions were durable. CI runs `LATHE_STRESS_KILLS` (default 12) kills;
/// the README gives the command for 60.
#[test]
fn kill_dash_nine_at_random_moments() {
    let kills: u32 = std::env::var("LATHE_STRESS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let mut f = Fleet::new();
    let link = BlackHole::to(f.hub_broker.port);
    let d = f.device("press-9", link.port, &[("sync", "ack_timeout_ms = 1000")]);
    let mut agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let (code, out) = f.deploy(&d, &f.bundle);
    assert_eq!(code, 0, "{out}");
    let _hub = f.hub();
    let live = collect_live(f.hub_broker.port, &d.id);
    let c = cases();
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let publisher = {
        let (stop, sent, client, topic) = (stop.clone(), sent.clone(), sensor.client.clone(), sensor.topic.clone());
        std::thread::spawn(move || {
            let mut id = 0i64;
            let start = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // About 300 readings a second.
                if client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, reading(&c, id))
                    .is_ok()
                {
                    id += 1;
                    sent.store(id, std::sync::atomic::Ordering::Relaxed);
                }
                let due = start + Duration::from_micros(3_333 * id as u64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        })
    };
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(200 + rand(1300)));
        let _ = agent.child.kill();
        let _ = agent.child.wait();
        if k % 5 == 4 {
            f.hub_broker.kill();
            std::thread::sleep(Duration::from_millis(300));
            f.hub_broker.up();
        }
        if k % 7 == 3 {
            link.cut();
            agent = f.agent(&d);
            std::thread::sleep(Duration::from_millis(1500 + rand(1500)));
            link.restore();
            continue;
        }
        agent = f.agent(&d);
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.join().expect("publisher");
    let n = sent.load(std::sync::atomic::Ordering::Relaxed);
    sensor.wait_acked(n as u64);
    eprintln!("{kills} kills, {n} readings");
    assert_whole(&f, 0..n);
    wait_drained(&d);
    let stored: BTreeSet<String> = hub_records(&f.hub_db, "predictions").into_iter().collect();
    let seen = live.lock().expect("lock").clone();
    let missing: Vec<&String> = seen.difference(&stored).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} prediction(s) seen live never reached the hub: {missing:?}",
        seen.difference(&stored).count()
    );
    assert!(!seen.is_empty());
    let (_, audit) = f.audit();
    for e in audit["epochs"].as_array().expect("epochs") {
        assert_eq!(
            (e["declared_lost"].as_u64(), e["hub_lost"].as_u64()),
            (Some(0), Some(0)),
            "nothing is lost here: {e}"
        );
    }
    drop(agent);
}

/// Regression: two agents on one state_dir were not prevented.
#[test]
fn a_second_agent_on_the_same_state_dir_is_refused() {
    let f = Fleet::new();
    let d = f.device("press-7", f.hub_broker.port, &[]);
    let _first = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let (code, _, err) = run(Command::new(&bins().0).arg("run").arg("--config").arg(&d.config));
    assert_eq!(code, 78, "systemd must not restart it: {err}");
    assert!(
        err.contains("in use by another lathe agent") && err.contains("pid"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one plain sentence: {err}");
}
