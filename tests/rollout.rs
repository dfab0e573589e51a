//! Rollouts through a real Mosquitto with its default limits (SPEC.md §8): bundles in retained
//! chunks, checked one by one and resumed after a `kill -9`; signed desired states, refused
//! when replayed, misdirected, expired or downgrading; devices that were offline converge.

use lathe_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The device's retained reported state, once `ok` accepts it.
fn reported(f: &Fleet, d: &Device, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let rx = watch(
        f.hub_broker.port,
        &format!("lathe/v1/{FLEET}/{}/reported", d.id),
        &format!("reported-{}-{}", d.id, free_port()),
    );
    let mut last = Value::Null;
    let got = eventually(Duration::from_secs(60), || {
        while let Ok((_, p)) = rx.recv_timeout(Duration::from_millis(200)) {
            last = serde_json::from_slice(&p).unwrap_or_default();
            if ok(&last) {
                return Some(last.clone());
            }
        }
        None
    });
    got.unwrap_or_else(|| panic!("{}: no reported state where {what}; the last: {last}", d.id))
}

/// A bundle of `bearing` at `version` with a self-test of 1,024 rows: about 64 KiB, so that
/// chunks of 1 KiB make some sixty of them.
fn big_bundle(f: &Fleet, version: u64) -> PathBuf {
    let c = cases();
    let rows = f.path().join("selftest.csv");
    let mut text = c.features.join(",") + "\n";
    for i in 0..1024 {
        let r = &c.rows[i % c.rows.len()];
        text += &(r.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(",") + "\n");
    }
    std::fs::write(&rows, text).expect("rows");
    let (code, out, bundle) = f.pack_model(
        &fixture("vibration_logreg.onnx"),
        "bearing",
        version,
        &c.features.join(","),
        &["--selftest", rows.to_str().expect("utf8")],
    );
    assert_eq!(code, 0, "pack: {out}");
    bundle
}

fn deploy_args<'a>(f: &'a Fleet, d: &'a Device, port: &'a str, key: &'a str, bundle: &'a Path) -> Vec<&'a str> {
    let _ = f;
    vec![
        "deploy",
        "--broker",
        port,
        "--fleet",
        FLEET,
        "--device",
        &d.id,
        "--key",
        key,
        "--bundle",
        bundle.to_str().expect("utf8"),
    ]
}

/// A corrupt chunk at the broker is refused (three copies, then `chunk_corrupt`); the agent is
/// killed with the bundle half fetched; after the restart it fetches only what it lacks, and
/// once the hub's chunk is back the bundle activates.
#[test]
fn chunks_are_checked_and_a_killed_transfer_resumes() {
    let f = Fleet::new();
    let d = f.device(
        "press-20",
        f.hub_broker.port,
        &[
            ("rollout", "window = 4"),
            ("rollout", "chunk_timeout_secs = 2"),
            ("rollout", "retry_secs = 2"),
        ],
    );
    let bundle = big_bundle(&f, 1);
    let bytes = std::fs::read(&bundle).expect("bundle");
    assert!(bytes.len() > 60_000, "{} bytes", bytes.len());
    let port = format!("127.0.0.1:{}", f.hub_broker.port);
    let key = f.path().join("k1.key");
    let key = key.to_str().expect("utf8");
    // Published while the device is offline: nothing waits for it.
    let mut args = deploy_args(&f, &d, &port, key, &bundle);
    args.extend(["--chunk-bytes", "1024", "--timeout-secs", "0"]);
    let (code, out, err) = run(&mut hub_cmd(&args));
    assert_eq!(code, 0, "{out}{err}");
    // Someone overwrites chunk 50 at the broker.
    let sha = protocol::sha256_hex(&bytes);
    let chunk_topic = format!("lathe/v1/{FLEET}/@blob/{sha}/50");
    let forger = client(f.hub_broker.port, "chunk-forger");
    forger
        .publish(&chunk_topic, rumqttc::QoS::AtLeastOnce, true, vec![0u8; 1024])
        .expect("publish");
    std::thread::sleep(Duration::from_millis(500));

    let log1 = f.path().join("agent1.log");
    let mut agent = f.agent_logging_to(&d, &log1);
    let r = reported(&f, &d, "the corrupt chunk failed the transfer", |r| {
        r["error"]["code"] == "chunk_corrupt"
    });
    assert!(r["active"].is_null(), "nothing activated: {r}");
    assert!(r["error"]["message"].as_str().unwrap_or("").contains("chunk 50"), "{r}");
    // Killed with every chunk but one on disk.
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let log2 = f.path().join("agent2.log");
    let _agent = f.agent_logging_to(&d, &log2);
    let resumed = eventually(Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log2).ok()?;
        text.lines()
            .find(|l| l.contains("fetching the bundle's chunks"))
            .map(str::to_string)
    })
    .expect("the restarted agent resumes the transfer");
    // The transfer stopped at chunk 50 with some later chunks not yet asked for.
    let missing: u64 = resumed
        .split("missing=")
        .nth(1)
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or_else(|| panic!("{resumed}"));
    assert!(
        (1..20).contains(&missing),
        "only the chunks it lacked are fetched again: {resumed}"
    );
    // The hub's chunk is back: the next retry completes the bundle, and it activates.
    forger
        .publish(
            &chunk_topic,
            rumqttc::QoS::AtLeastOnce,
            true,
            bytes[50 * 1024..51 * 1024].to_vec(),
        )
        .expect("publish");
    let r = reported(&f, &d, "bearing v1 runs", |r| {
        r["active"]["version"] == 1 && r["phase"] == "idle"
    });
    assert!(r["error"].is_null(), "{r}");
    let (_, v) = status(&d);
    assert_eq!(v["model"]["version"], 1, "{v}");
    // Nothing of the transfer is left behind.
    let left: Vec<_> = std::fs::read_dir(d.state_dir.join("downloads"))
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// Desired states: a device that was offline converges; a replayed, misdirected, expired or
/// downgrading one is refused with its code and changes nothing.
#[test]
fn desired_states_are_checked_and_offline_devices_converge() {
    let f = Fleet::new();
    let d = f.device("press-21", f.hub_broker.port, &[]);
    let port = format!("127.0.0.1:{}", f.hub_broker.port);
    let key = f.path().join("k1.key");
    let key = key.to_str().expect("utf8");
    let desired_topic = format!("lathe/v1/{FLEET}/{}/desired", d.id);
    let retained = watch(f.hub_broker.port, &desired_topic, "desired-watch");

    // Offline: the deploy is published and the device converges when it starts.
    let mut args = deploy_args(&f, &d, &port, key, &f.bundle);
    args.extend(["--timeout-secs", "0"]);
    let (code, out, err) = run(&mut hub_cmd(&args));
    assert_eq!(code, 0, "{out}{err}");
    let (_, first) = retained
        .recv_timeout(Duration::from_secs(10))
        .expect("the retained desired state");
    let _agent = f.agent(&d);
    reported(&f, &d, "v1 runs", |r| {
        r["active"]["version"] == 1 && r["phase"] == "idle"
    });

    let v2 = f.pack(2);
    let (code, out) = f.deploy(&d, &v2);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("activated bearing v2"), "{out}");
    let refused = |what: &str, code: &str| {
        let r = reported(&f, &d, what, |r| r["error"]["code"] == code);
        assert_eq!(r["active"]["version"], 2, "{what} changed nothing: {r}");
        let (_, v) = status(&d);
        assert_eq!(v["model"]["version"], 2, "{v}");
    };

    // A replay of the first desired state (an attacker who kept a copy).
    let forger = client(f.hub_broker.port, "desired-forger");
    forger
        .publish(&desired_topic, rumqttc::QoS::AtLeastOnce, true, first.clone())
        .expect("publish");
    refused("a replay", "replayed");

    // A desired state signed for another device, copied to this one.
    let other = f.device("press-22", f.hub_broker.port, &[]);
    let v3 = f.pack(3);
    let mut args = deploy_args(&f, &other, &port, key, &v3);
    args.extend(["--timeout-secs", "0"]);
    let (code, out, err) = run(&mut hub_cmd(&args));
    assert_eq!(code, 0, "{out}{err}");
    let for_other = watch(
        f.hub_broker.port,
        &format!("lathe/v1/{FLEET}/{}/desired", other.id),
        "other-watch",
    );
    let (_, misdirected) = for_other.recv_timeout(Duration::from_secs(10)).expect("retained");
    forger
        .publish(&desired_topic, rumqttc::QoS::AtLeastOnce, true, misdirected)
        .expect("publish");
    refused("a misdirected one", "not_targeted");

    // A downgrade that is not a signed rollback.
    let (code, out) = f.deploy(&d, &f.bundle);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused (not_newer)"), "{out}");
    refused("a downgrade", "not_newer");

    // A desired state that expired while the device could not hear it.
    let mut args = deploy_args(&f, &d, &port, key, &v3);
    args.extend(["--expires-in-days", "0", "--timeout-secs", "0"]);
    drop(_agent);
    let (code, out, err) = run(&mut hub_cmd(&args));
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_millis(2500));
    let _agent = f.agent(&d);
    refused("an expired one", "expired");

    // A signed rollback is followed, and says that the device runs below its high-water mark.
    let (code, out) = f.rollout(&d, "rollback", &f.bundle);
    assert_eq!(code, 0, "{out}");
    let r = reported(&f, &d, "v1 after the rollback", |r| r["active"]["version"] == 1);
    assert_eq!(r["high_water"]["bearing"], 2, "{r}");
    let (code, out, err) = run(&mut hub_cmd(&[
        "rollout", "status", "--broker", &port, "--fleet", FLEET,
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("{FLEET}/{}  idle", d.id)) && out.contains("below v2 (rolled back)"),
        "{out}"
    );
}

/// A group gets one upload: the hub publishes each chunk once, however many devices take it;
/// a member that was offline converges when it starts, and a device outside the group is
/// not touched.
#[test]
fn a_group_gets_one_upload_and_its_offline_member_converges() {
    let f = Fleet::new();
    let member = |id: &str| f.device(id, f.hub_broker.port, &[("rollout", "groups = [\"line-2\"]")]);
    let (a, b) = (member("press-30"), member("press-31"));
    let outsider = f.device("press-32", f.hub_broker.port, &[("rollout", "groups = [\"line-3\"]")]);
    let _a = f.agent(&a);
    let _outsider = f.agent(&outsider);
    wait_online(f.hub_broker.port, &a.id);
    wait_online(f.hub_broker.port, &outsider.id);
    let chunks = watch(f.hub_broker.port, &format!("lathe/v1/{FLEET}/@blob/#"), "blob-watch");
    std::thread::sleep(Duration::from_millis(500));
    let bundle = big_bundle(&f, 1);
    let size = std::fs::metadata(&bundle).expect("bundle").len();
    let port = format!("127.0.0.1:{}", f.hub_broker.port);
    let key = f.path().join("k1.key");
    let (code, out, err) = run(&mut hub_cmd(&[
        "deploy",
        "--broker",
        &port,
        "--fleet",
        FLEET,
        "--group",
        "line-2",
        "--wait-for",
        &a.id,
        "--key",
        key.to_str().expect("utf8"),
        "--bundle",
        bundle.to_str().expect("utf8"),
        "--chunk-bytes",
        "1024",
        "--timeout-secs",
        "60",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("ok: {}: activated bearing v1", a.id)), "{out}");
    // The member that was offline comes up and takes the same chunks from the broker.
    let _b = f.agent(&b);
    reported(&f, &b, "v1 runs", |r| {
        r["active"]["version"] == 1 && r["phase"] == "idle"
    });
    // Each chunk (and each chunk of the index) was published once, for both devices.
    let data = size.div_ceil(1024);
    let index = (data * 32).div_ceil(1024);
    let published = chunks.try_iter().count() as u64;
    assert_eq!(published, data + index, "one upload for the group");
    let r = reported(&f, &outsider, "its report", |_| true);
    assert!(
        r["active"].is_null() && r["counter"] == 0,
        "another group's device is untouched: {r}"
    );
}

/// Raising the trust threshold never leaves a device without its model: the installed bundle,
/// verified when it was installed, keeps running and the device says so, until a bundle and a
/// desired state signed by enough keys replace it.
#[test]
fn a_stricter_trust_policy_keeps_the_model_until_a_bundle_that_meets_it() {
    let f = Fleet::new();
    let dir = f.path().to_str().expect("utf8").to_string();
    let (code, out, err) = run(&mut hub_cmd(&["keygen", "--out-dir", &dir, "--name", "k2"]));
    assert_eq!(code, 0, "{out}{err}");
    let d = f.device("press-40", f.hub_broker.port, &[]);
    let mut agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let (code, out) = f.deploy(&d, &f.bundle);
    assert_eq!(code, 0, "{out}");
    assert_eq!(agent.terminate(Duration::from_secs(15)), Some(0));

    // Two keys are trusted now, and both must sign.
    let both = f.path().join("both.keys");
    let text = std::fs::read_to_string(f.path().join("k1.pub")).expect("k1")
        + &std::fs::read_to_string(f.path().join("k2.pub")).expect("k2");
    std::fs::write(&both, text).expect("trust");
    let keys_line = format!("keys_file = \"{}\"", both.display());
    let d = f.device(
        "press-40",
        f.hub_broker.port,
        &[("trust", &keys_line), ("trust", "threshold = 2")],
    );
    let _agent = f.agent(&d);
    let r = reported(&f, &d, "a policy warning", |r| {
        r["warnings"].as_array().is_some_and(|w| !w.is_empty())
    });
    assert_eq!(r["active"]["version"], 1, "the model still runs: {r}");
    assert!(
        r["warnings"][0]
            .as_str()
            .unwrap_or("")
            .contains("no longer meets the trust policy"),
        "{r}"
    );
    let (code, v) = status(&d);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["model"]["version"], 1, "{v}");
    assert!(
        v["problems"].to_string().contains("no longer meets the trust policy"),
        "{v}"
    );

    // One signature is no longer enough, for the desired state as for the bundle.
    let (k1, k2) = (f.path().join("k1.key"), f.path().join("k2.key"));
    let (k1, k2) = (k1.to_str().expect("utf8"), k2.to_str().expect("utf8"));
    let c = cases();
    let (code, out, v2) = f.pack_model(
        &fixture("vibration_logreg.onnx"),
        "bearing",
        2,
        &c.features.join(","),
        &["--key", k2],
    );
    assert_eq!(code, 0, "{out}");
    let v2 = v2.to_str().expect("utf8");
    let (code, out) = f.command(&d, &["deploy", "--bundle", v2, "--key", k1]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused (signature_threshold)"), "{out}");
    let (code, out) = f.command(&d, &["deploy", "--bundle", v2, "--key", k1, "--key", k2]);
    assert_eq!(code, 0, "{out}");
    let r = reported(&f, &d, "v2 without a warning", |r| {
        r["active"]["version"] == 2 && r["warnings"].is_null()
    });
    assert!(r["error"].is_null(), "{r}");
    let (code, v) = status(&d);
    assert!(!v["problems"].to_string().contains("trust policy"), "{code} {v}");
}

/// A model switch under load drops and fails no reading: every reading sent while v2 is
/// fetched, checked and switched to is predicted, by v1 before the switch and by v2 after.
#[test]
fn a_switch_under_load_drops_and_fails_no_reading() {
    let f = Fleet::new();
    let d = f.device("press-50", f.hub_broker.port, &[]);
    let _hub = f.hub();
    let _agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let (code, out) = f.deploy(&d, &f.bundle);
    assert_eq!(code, 0, "{out}");
    let v2 = big_bundle(&f, 2);
    let c = cases();
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    let n = 1500i64;
    let (code, out) = std::thread::scope(|s| {
        s.spawn(|| sensor.send_range(&c, 0, n, Duration::from_millis(2)));
        std::thread::sleep(Duration::from_millis(500));
        f.deploy(&d, &v2)
    });
    assert_eq!(code, 0, "{out}");
    sensor.wait_acked(n as u64);
    let got = wait_hub_has(&f.hub_db, 0..n, Duration::from_secs(60));
    // In the order of the readings, v1 and then v2, each reading once.
    let mut by_id: Vec<(i64, u64)> = got
        .iter()
        .map(|(i, p)| (*i, p["model"]["version"].as_u64().expect("version")))
        .collect();
    by_id.sort();
    by_id.dedup();
    assert_eq!(by_id.len() as i64, n, "each reading predicted once");
    let first_v2 = by_id.iter().position(|(_, v)| *v == 2).expect("v2 took over");
    assert!(first_v2 > 0, "v1 answered before the switch");
    assert!(
        by_id[first_v2..].iter().all(|(_, v)| *v == 2),
        "no v1 answer after the switch"
    );
    let (_, v) = status(&d);
    assert!(v["losses"].as_array().is_none_or(|l| l.is_empty()), "nothing lost: {v}");
    assert_eq!(v["activity"]["inference_failed_rows"], 0, "{v}");
    assert_eq!(v["model"]["version"], 2, "{v}");
}

fn client(port: u16, name: &str) -> rumqttc::Client {
    let mut opts = rumqttc::MqttOptions::new(name, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = rumqttc::Client::new(opts, 100);
    std::thread::spawn(move || for _ in conn.iter() {});
    client
}
