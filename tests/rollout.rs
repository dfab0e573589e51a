//! Rollouts through a real Mosquitto with its default limits (SPEC.md §8): bundles in retained
//! chunks, checked one by one and resumed after a `kill -9`; signed desired states, refused
//! when replayed, misdirected, expired or downgrading; devices that were offline converge.

use lathe_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The device's retained reported state, once `ok` accepts it.
fn reported(f: &Fleet, d: &Device, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    reported_at(f, d, None, what, ok)
}

/// The retained reported state of a device's model slot (`None`: the default one), once `ok`
/// accepts it.
fn reported_at(f: &Fleet, d: &Device, slot: Option<&str>, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let topic = format!("lathe/v1/{FLEET}/{}/reported", d.id);
    let rx = watch(
        f.hub_broker.port,
        &slot.map_or(topic.clone(), |s| format!("{topic}/{s}")),
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
    let (code, out, err) = deploy_group(
        &f,
        "line-2",
        "k1",
        &bundle,
        &["--wait-for", &a.id, "--chunk-bytes", "1024", "--timeout-secs", "60"],
    );
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
    let r = v2_needs(&f, &d, &["k1"], &["k1", "k2"]);
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

/// `bearing` v2, signed by k1 and k2: a deploy whose desired state the keys `weak` sign is
/// refused (`signature_threshold`); one that `strong` sign activates it. The report that says
/// so.
fn v2_needs(f: &Fleet, d: &Device, weak: &[&str], strong: &[&str]) -> Value {
    let key = |k: &str| f.path().join(format!("{k}.key")).to_str().expect("utf8").to_string();
    let c = cases();
    let (code, out, v2) = f.pack_model(
        &fixture("vibration_logreg.onnx"),
        "bearing",
        2,
        &c.features.join(","),
        &["--key", &key("k2")],
    );
    assert_eq!(code, 0, "{out}");
    let deploy = |keys: &[&str]| {
        let keys: Vec<String> = keys.iter().flat_map(|k| ["--key".to_string(), key(k)]).collect();
        let mut args = vec!["deploy", "--bundle", v2.to_str().expect("utf8")];
        args.extend(keys.iter().map(String::as_str));
        f.command(d, &args)
    };
    let (code, out) = deploy(weak);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused (signature_threshold)"), "{out}");
    let (code, out) = deploy(strong);
    assert_eq!(code, 0, "{out}");
    reported(f, d, "v2 without a warning", |r| {
        r["active"]["version"] == 2 && r["warnings"].is_null()
    })
}

/// `bearing` v2 from a model that passes every check before activation and fails on large
/// readings (`send_failing`).
fn failing_v2(f: &Fleet) -> PathBuf {
    let c = cases();
    let (code, out, v2) = f.pack_model(
        &fixture("fails_on_large.onnx"),
        "bearing",
        2,
        &c.features.join(","),
        &[],
    );
    assert_eq!(code, 0, "{out}");
    v2
}

/// `n` readings that the model of `failing_v2` fails on.
fn send_failing(sensor: &Sensor, n: i64) {
    for id in 0..n {
        let row =
            serde_json::json!({"id": id, "rms": 30_000.0, "kurtosis": 3.0, "crest_factor": 3.2, "peak_hz": 120.0});
        sensor.send(serde_json::to_vec(&row).expect("json"));
    }
}

/// `lathe-hub deploy --group` of `bundle`, signed with `<key>.key`, with `extra` arguments.
fn deploy_group(f: &Fleet, group: &str, key: &str, bundle: &Path, extra: &[&str]) -> (i32, String, String) {
    let port = format!("127.0.0.1:{}", f.hub_broker.port);
    let key = f.path().join(format!("{key}.key"));
    let mut args = vec![
        "deploy",
        "--broker",
        &port,
        "--fleet",
        FLEET,
        "--group",
        group,
        "--key",
        key.to_str().expect("utf8"),
        "--bundle",
        bundle.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    run(&mut hub_cmd(&args))
}

fn client(port: u16, name: &str) -> rumqttc::Client {
    let mut opts = rumqttc::MqttOptions::new(name, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = rumqttc::Client::new(opts, 100);
    std::thread::spawn(move || for _ in conn.iter() {});
    client
}

/// The watch period (SPEC §8.4): a model that breaks a rule is rolled back from on its own; one
/// killed in its watch period is not run again at start-up, the previous one is; one that keeps
/// to the rules is committed when the period ends, and only then is a high-water mark.
#[test]
fn a_watched_model_is_rolled_back_undone_by_a_crash_or_committed() {
    let f = Fleet::new();
    let _hub = f.hub();
    let d = f.device("press-60", f.hub_broker.port, &[]);
    let mut agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let (code, out) = f.deploy(&d, &f.bundle);
    assert_eq!(code, 0, "{out}");
    assert_eq!(agent.terminate(Duration::from_secs(15)), Some(0));
    let watched = |secs: &'static str| {
        f.device(
            "press-60",
            f.hub_broker.port,
            &[("rollout.watch", secs), ("rollout.watch", "early_rows = 20")],
        )
    };
    let d = watched("secs = 600");
    let mut agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let port = format!("127.0.0.1:{}", f.hub_broker.port);
    let key = f.path().join("k1.key");
    let key = key.to_str().expect("utf8");
    let publish = |bundle: &Path| {
        let mut args = deploy_args(&f, &d, &port, key, bundle);
        args.extend(["--timeout-secs", "0"]);
        let (code, out, err) = run(&mut hub_cmd(&args));
        assert_eq!(code, 0, "{out}{err}");
    };

    // v2 passes every check before activation, then fails on the readings it gets.
    let c = cases();
    let v2 = failing_v2(&f);
    publish(&v2);
    let r = reported(&f, &d, "v2 watched", |r| {
        r["phase"] == "watching" && r["watch"]["version"] == 2
    });
    assert_eq!(r["active"]["version"], 2, "{r}");
    assert_eq!(r["high_water"]["bearing"], 1, "not committed yet: {r}");
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    send_failing(&sensor, 25);
    let r = reported(&f, &d, "v2 rolled back from", |r| r["error"]["code"] == "watch_failed");
    assert_eq!(r["active"]["version"], 1, "{r}");
    assert_eq!(r["previous"]["version"], 2, "{r}");
    assert_eq!(r["phase"], "failed", "{r}");
    assert_eq!(
        r["high_water"]["bearing"], 1,
        "a failed model is no high-water mark: {r}"
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("rows whose inference failed: "),
        "{r}"
    );
    let (_, v) = status(&d);
    assert_eq!(v["model"]["version"], 1, "{v}");

    // v3 is killed in its watch period: at start-up v1, which passed every step, runs.
    let v3 = f.pack(3);
    publish(&v3);
    reported(&f, &d, "v3 watched", |r| {
        r["phase"] == "watching" && r["watch"]["version"] == 3
    });
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let mut agent = f.agent(&d);
    let r = reported(&f, &d, "v3 undone", |r| r["error"]["code"] == "watch_interrupted");
    assert_eq!(r["active"]["version"], 1, "{r}");
    assert_eq!(r["previous"]["version"], 3, "{r}");
    // The retained desired state is not applied again.
    std::thread::sleep(Duration::from_secs(2));
    let (_, v) = status(&d);
    assert_eq!(v["model"]["version"], 1, "{v}");
    assert_eq!(agent.terminate(Duration::from_secs(15)), Some(0));

    // v4 keeps to the rules while it is watched: the deploy waits for its commit.
    let d = watched("secs = 3");
    let _agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let v4 = f.pack(4);
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    let (code, out) = std::thread::scope(|s| {
        s.spawn(|| sensor.send_range(&c, 100, 200, Duration::from_millis(10)));
        f.deploy(&d, &v4)
    });
    assert_eq!(code, 0, "{out}");
    let r = reported(&f, &d, "v4 committed", |r| {
        r["phase"] == "idle" && r["active"]["version"] == 4
    });
    assert_eq!(r["high_water"]["bearing"], 4, "{r}");
    assert!(r["error"].is_null() && r["watch"].is_null(), "{r}");
    let committed = eventually(Duration::from_secs(30), || {
        hub_records(&f.hub_db, "events")
            .into_iter()
            .find(|e| e.contains("model_committed") && e.contains("bearing v4 passed its watch period"))
    });
    assert!(committed.is_some(), "{:?}", hub_records(&f.hub_db, "events"));

    // The chunks of v2, which no desired state names any more, are cleared at the broker; those
    // of v4, which the device's desired state names, are kept.
    let clear = |bundle: &Path| {
        let (code, out, err) = run(&mut hub_cmd(&[
            "rollout",
            "clear",
            "--broker",
            &port,
            "--fleet",
            FLEET,
            "--bundle",
            bundle.to_str().expect("utf8"),
        ]));
        (code, format!("{out}{err}"))
    };
    let (code, out) = clear(&v4);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("names this bundle"), "{out}");
    let (code, out) = clear(&v2);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("cleared 2 retained chunk(s)"),
        "one chunk and one of its index: {out}"
    );
    let sha = protocol::sha256_hex(&std::fs::read(&v2).expect("v2"));
    let left = watch(
        f.hub_broker.port,
        &format!("lathe/v1/{FLEET}/@blob/{sha}/#"),
        "blob-left",
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(left.try_iter().count(), 0, "nothing retained for v2");
    let kept = watch(f.hub_broker.port, &format!("lathe/v1/{FLEET}/@blob/#"), "blob-kept");
    assert!(kept.recv_timeout(Duration::from_secs(5)).is_ok(), "v4's chunks stay");
}

/// `deploy --group --canary`: the canary devices first, each watched; the group only once they
/// have committed the model. A canary that fails its watch halts the rollout: the rest of the
/// group never sees the bad model.
#[test]
fn a_canary_goes_first_and_a_failed_one_halts_the_rollout() {
    let f = Fleet::new();
    let _hub = f.hub();
    let member = |id: &str| {
        f.device(
            id,
            f.hub_broker.port,
            &[
                ("rollout", "groups = [\"line-4\"]"),
                ("rollout.watch", "secs = 3"),
                ("rollout.watch", "early_rows = 20"),
            ],
        )
    };
    let devices = [member("press-70"), member("press-71"), member("press-72")];
    let _agents: Vec<_> = devices.iter().map(|d| f.agent(d)).collect();
    for d in &devices {
        reported(&f, d, "a first report", |r| r["groups"][0] == "line-4");
    }
    let canary = |bundle: &Path| deploy_group(&f, "line-4", "k1", bundle, &["--canary", "10%", "--timeout-secs", "60"]);
    let (code, out, err) = canary(&f.bundle);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("canary: 1 of the 3 members of line-4 first: press-70"),
        "{err}"
    );
    for d in &devices {
        assert!(out.contains(&format!("ok: {}: activated bearing v1", d.id)), "{out}");
    }

    // v2 fails on the canary's readings: the rollout halts there.
    let v2 = failing_v2(&f);
    let sensor = Sensor::new(f.sensor_broker.port, &devices[0].id);
    let (code, out, err) = std::thread::scope(|s| {
        s.spawn(|| {
            reported(&f, &devices[0], "v2 watched", |r| r["phase"] == "watching");
            send_failing(&sensor, 25);
        });
        canary(&v2)
    });
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("refused (watch_failed): press-70"), "{out}");
    assert!(out.contains("halted: the canary did not commit the model"), "{out}");
    let r = reported(&f, &devices[0], "v1 again", |r| r["active"]["version"] == 1);
    assert_eq!(r["error"]["code"], "watch_failed", "{r}");
    for d in &devices[1..] {
        let r = reported(&f, d, "its report", |_| true);
        assert_eq!(r["active"]["version"], 1, "{}: never saw v2: {r}", d.id);
        assert!(r["error"].is_null(), "{r}");
    }
}

/// Key-set updates (SPEC §8.7): one signed by a key the devices do not trust is refused; k1
/// signs the key set that rotates the fleet to k2 and so revokes itself; from then on what k1
/// alone signs is refused, the model it signed keeps running with a warning, and the device
/// keeps the key set across a restart.
#[test]
fn a_signed_key_set_rotates_and_revokes_keys() {
    let f = Fleet::new();
    let dir = f.path().to_str().expect("utf8").to_string();
    for k in ["k2", "k3"] {
        let (code, out, err) = run(&mut hub_cmd(&["keygen", "--out-dir", &dir, "--name", k]));
        assert_eq!(code, 0, "{out}{err}");
    }
    let _hub = f.hub();
    let d = f.device("press-80", f.hub_broker.port, &[]);
    let mut agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let (code, out) = f.deploy(&d, &f.bundle);
    assert_eq!(code, 0, "{out}");

    let port = format!("127.0.0.1:{}", f.hub_broker.port);
    let k2_only = f.path().join("k2.pub");
    let publish_keys = |signer: &str| {
        let key = f.path().join(format!("{signer}.key"));
        run(&mut hub_cmd(&[
            "rollout",
            "keys",
            "--broker",
            &port,
            "--fleet",
            FLEET,
            "--keys-file",
            k2_only.to_str().expect("utf8"),
            "--key",
            key.to_str().expect("utf8"),
            "--wait-for",
            &d.id,
        ]))
    };
    let (code, out, err) = publish_keys("k3");
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("refused (signature_threshold): press-80"), "{out}");
    let (code, v) = status(&d);
    assert_eq!(code, 1, "{v}");
    assert!(
        v["problems"]
            .to_string()
            .contains("a key set was refused (signature_threshold)"),
        "{v}"
    );
    let (code, out, err) = publish_keys("k1");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: press-80: trusts key set #"), "{out}");
    let r = reported(&f, &d, "the key set in force", |r| r["key_set"].is_u64());
    assert_eq!(r["active"]["version"], 1, "the model k1 signed keeps running: {r}");
    assert!(r["keys_error"].is_null(), "{r}");
    let (_, v) = status(&d);
    assert!(!v["problems"].to_string().contains("key set was refused"), "{v}");
    assert!(
        r["warnings"][0]
            .as_str()
            .unwrap_or("")
            .contains("no longer meets the trust policy"),
        "{r}"
    );

    // k1 is revoked: what it alone signs is refused; k2 signs the next deploy.
    let r = v2_needs(&f, &d, &["k1"], &["k2"]);
    let counter = r["key_set"].clone();

    // The key set outlives a restart, and the configured trust.keys_file (k1) no longer counts.
    assert_eq!(agent.terminate(Duration::from_secs(15)), Some(0));
    let (_, v) = status(&d);
    assert_eq!(v["key_set"]["keys"], 1, "{v}");
    assert_eq!(v["key_set"]["counter"], counter, "{v}");
    let _agent = f.agent(&d);
    let r = reported(&f, &d, "a report after the restart", |r| r["active"]["version"] == 2);
    assert_eq!(r["key_set"], counter, "{r}");
    let k1 = f.path().join("k1.key");
    let k1 = k1.to_str().expect("utf8");
    let (code, out) = f.command(
        &d,
        &["rollback", "--bundle", f.bundle.to_str().expect("utf8"), "--key", k1],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused (signature_threshold)"), "{out}");
}

/// `lathe-hub apply -f fleet.toml` (GitOps): the difference first, then only what differs; a
/// dry run publishes nothing; a desired state at the broker that the given keys do not sign
/// counts for nothing and is replaced.
#[test]
fn a_fleet_file_is_applied_with_its_difference_first() {
    let f = Fleet::new();
    let dir = f.path().to_str().expect("utf8").to_string();
    let (code, out, err) = run(&mut hub_cmd(&["keygen", "--out-dir", &dir, "--name", "k3"]));
    assert_eq!(code, 0, "{out}{err}");
    let _hub = f.hub();
    let member = f.device("press-90", f.hub_broker.port, &[("rollout", "groups = [\"line-5\"]")]);
    let single = f.device("press-91", f.hub_broker.port, &[]);
    let _a = f.agent(&member);
    let _b = f.agent(&single);
    wait_online(f.hub_broker.port, &member.id);
    wait_online(f.hub_broker.port, &single.id);
    let v2 = f.pack(2);
    let file = f.path().join("fleet.toml");
    let declare = |device_bundle: &str| {
        let text = format!(
            "fleet = \"{FLEET}\"\n[[group]]\nname = \"line-5\"\nbundle = \"bearing-1.lbundle\"\n[[device]]\nid = \"press-91\"\nbundle = \"{device_bundle}\"\n"
        );
        std::fs::write(&file, text).expect("fleet file");
    };
    let port = format!("127.0.0.1:{}", f.hub_broker.port);
    let apply = |key: &str, extra: &[&str]| {
        let key = f.path().join(format!("{key}.key"));
        let mut args = vec![
            "apply",
            "-f",
            file.to_str().expect("utf8"),
            "--broker",
            &port,
            "--key",
            key.to_str().expect("utf8"),
            "--timeout-secs",
            "60",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = run(&mut hub_cmd(&args));
        (code, format!("{out}{err}"))
    };
    // Someone left a desired state for the group signed by a key the devices do not trust.
    let (code, out, err) = deploy_group(&f, "line-5", "k3", &v2, &["--timeout-secs", "0"]);
    assert_eq!(code, 0, "{out}{err}");

    declare("bearing-1.lbundle");
    let (code, out) = apply("k1", &["--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 declared, 2 to publish"), "{out}");
    assert!(
        out.contains("~ group line-5: a desired state refused (signature_threshold) -> bearing v1"),
        "{out}"
    );
    assert!(out.contains("+ device press-91: none -> bearing v1"), "{out}");
    std::thread::sleep(Duration::from_secs(1));
    let r = reported(&f, &single, "its report", |_| true);
    assert!(r["active"].is_null(), "a dry run publishes nothing: {r}");

    let (code, out) = apply("k1", &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: press-91: activated bearing v1"), "{out}");
    reported(&f, &member, "v1 from the group", |r| {
        r["active"]["version"] == 1 && r["phase"] == "idle"
    });

    let (code, out) = apply("k1", &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 declared, 0 to publish"), "{out}");
    assert!(
        out.contains("= group line-5: bearing v1") && out.contains("= device press-91: bearing v1"),
        "{out}"
    );

    declare("bearing-2.lbundle");
    let (code, out) = apply("k1", &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("1 to publish") && out.contains("~ device press-91: bearing v1 -> bearing v2"),
        "{out}"
    );
    let r = reported(&f, &single, "v2", |r| r["active"]["version"] == 2);
    assert!(r["error"].is_null(), "{r}");
}

/// `kill -9` while a large bundle is being activated (verified, loaded, switched to): at the
/// restart the device runs a model that passed every step, v1 or v2, never neither or a mix,
/// and converges to v2, which the retained desired state names.
#[test]
fn a_kill_during_activation_leaves_a_whole_model_and_converges() {
    let f = Fleet::new();
    let d = f.device("press-95", f.hub_broker.port, &[]);
    let mut agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let (code, out) = f.deploy(&d, &f.bundle);
    assert_eq!(code, 0, "{out}");
    // A model of 24 MiB takes a second or so to verify and load.
    let model = f.path().join("padded.onnx");
    let fixture_model = std::fs::read(fixture("vibration_logreg.onnx")).expect("fixture");
    std::fs::write(&model, padded_model(&fixture_model, 24 << 20)).expect("model");
    let c = cases();
    let (code, out, v2) = f.pack_model(&model, "bearing", 2, &c.features.join(","), &[]);
    assert_eq!(code, 0, "{out}");
    let port = format!("127.0.0.1:{}", f.hub_broker.port);
    let key = f.path().join("k1.key");
    let mut args = deploy_args(&f, &d, &port, key.to_str().expect("utf8"), &v2);
    args.extend(["--timeout-secs", "0"]);
    let (code, out, err) = run(&mut hub_cmd(&args));
    assert_eq!(code, 0, "{out}{err}");
    reported(&f, &d, "activating", |r| r["phase"] == "activating");
    let _ = agent.child.kill();
    let _ = agent.child.wait();

    let _agent = f.agent(&d);
    let (_, v) = status(&d);
    let version = v["model"]["version"].as_u64().unwrap_or(0);
    assert!(version == 1 || version == 2, "a whole model runs at once: {v}");
    let r = reported(&f, &d, "v2 runs", |r| {
        r["active"]["version"] == 2 && r["phase"] == "idle"
    });
    assert_eq!(r["previous"]["version"], 1, "{r}");
    assert!(r["error"].is_null(), "{r}");
    let files: Vec<String> = std::fs::read_dir(d.state_dir.join("bundles"))
        .expect("bundles")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut files = files;
    files.sort();
    assert_eq!(
        files,
        ["bearing-1.lbundle", "bearing-2.lbundle"],
        "no partial file is left"
    );
}

/// Several models on one device (SPEC §8.8): two slots, each with its own input topics,
/// predictions and drift state, deployed and rolled back on its own; a reading both slots take
/// is acknowledged to the sensor once both have made it durable; a slot's desired state copied
/// to another slot's topic is refused.
#[test]
fn two_model_slots_are_deployed_and_rolled_back_on_their_own() {
    let f = Fleet::new();
    let d = f.device("press-60", f.hub_broker.port, &[("inputs", "topics = []")]);
    let slots = format!(
        "[[models]]\nslot = \"anomaly\"\ntopics = [\"sensors/{id}/features\"]\n\
         [[models]]\nslot = \"rul\"\ntopics = [\"sensors/{id}/features\", \"sensors/{id}/spindle\"]\n",
        id = d.id
    );
    let mut config = std::fs::read_to_string(&d.config).expect("config");
    config += &slots;
    std::fs::write(&d.config, config).expect("config");
    let c = cases();
    let pack = |name: &str, version: u64| {
        let (code, out, b) = f.pack_model(
            &fixture("vibration_logreg.onnx"),
            name,
            version,
            &c.features.join(","),
            &[],
        );
        assert_eq!(code, 0, "{out}");
        b
    };
    let (rul1, rul2) = (pack("rul", 1), pack("rul", 2));
    let key = f.path().join("k1.key");
    let to_slot = |op: &str, bundle: &Path, slot: &str| {
        f.command(
            &d,
            &[
                op,
                "--bundle",
                bundle.to_str().expect("utf8"),
                "--key",
                key.to_str().expect("utf8"),
                "--slot",
                slot,
            ],
        )
    };
    let _hub = f.hub();
    let _agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);

    let (code, out) = to_slot("deploy", &f.bundle, "anomaly");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("activated bearing v1"), "{out}");
    let (code, out) = to_slot("deploy", &rul1, "rul");
    assert_eq!(code, 0, "{out}");
    let anomaly = reported_at(&f, &d, Some("anomaly"), "bearing v1 in slot anomaly", |r| {
        r["active"]["name"] == "bearing" && r["slot"] == "anomaly"
    });
    assert!(anomaly["previous"].is_null(), "{anomaly}");

    // Readings on the shared topic go to both slots; those on the spindle topic to rul only.
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    sensor.send_range(&c, 0, 20, Duration::ZERO);
    for id in 20..30 {
        sensor
            .client
            .publish(
                format!("sensors/{}/spindle", d.id),
                rumqttc::QoS::AtLeastOnce,
                false,
                reading(&c, id),
            )
            .expect("publish");
    }
    sensor.wait_acked(30);
    let predicted_by = |id: i64| -> Vec<String> {
        let mut m: Vec<String> = hub_predictions(&f.hub_db)
            .into_iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, p)| p["model"]["name"].as_str().unwrap_or("?").to_string())
            .collect();
        m.sort();
        m.dedup();
        m
    };
    let all = eventually(Duration::from_secs(30), || {
        let shared = (0..20).all(|i| predicted_by(i) == ["bearing", "rul"]);
        let spindle = (20..30).all(|i| predicted_by(i) == ["rul"]);
        (shared && spindle).then_some(())
    });
    assert!(
        all.is_some(),
        "predictions by model: {:?}",
        (0..30).map(predicted_by).collect::<Vec<_>>()
    );
    // Health carries each slot's latency, named by its model.
    let health = watch(
        f.hub_broker.port,
        &format!("lathe/v1/{FLEET}/{}/health", d.id),
        "slot-health-watch",
    );
    let mut last = Value::Null;
    let both = eventually(Duration::from_secs(20), || {
        let (_, p) = health.recv_timeout(Duration::from_millis(500)).ok()?;
        last = serde_json::from_slice(&p).ok()?;
        (last["model"]["name"] == "bearing"
            && last["latency"]["model"]["name"] == "bearing"
            && last["latencies"][0]["model"]["name"] == "rul")
            .then_some(())
    });
    assert!(both.is_some(), "health: {last}");

    // rul v2, then a rollback to v1: slot anomaly is not touched.
    let (code, out) = to_slot("deploy", &rul2, "rul");
    assert_eq!(code, 0, "{out}");
    let (code, out) = to_slot("rollback", &rul1, "rul");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rolled back to rul v1"), "{out}");
    let rul = reported_at(&f, &d, Some("rul"), "rul v1 after its rollback", |r| {
        r["active"]["version"] == 1 && r["phase"] == "idle"
    });
    assert_eq!(rul["previous"]["version"], 2, "{rul}");
    assert_eq!(rul["high_water"]["rul"], 2, "{rul}");
    let again = reported_at(&f, &d, Some("anomaly"), "slot anomaly as it was", |_| true);
    assert_eq!(again["active"], anomaly["active"], "{again}");
    assert_eq!(again["counter"], anomaly["counter"], "{again}");

    // Slot rul's desired state copied to slot anomaly's topic.
    let retained = watch(
        f.hub_broker.port,
        &format!("lathe/v1/{FLEET}/{}/desired/rul", d.id),
        "slot-desired-watch",
    );
    let (_, for_rul) = retained.recv_timeout(Duration::from_secs(10)).expect("retained");
    client(f.hub_broker.port, "slot-forger")
        .publish(
            format!("lathe/v1/{FLEET}/{}/desired/anomaly", d.id),
            rumqttc::QoS::AtLeastOnce,
            true,
            for_rul,
        )
        .expect("publish");
    let r = reported_at(&f, &d, Some("anomaly"), "the copy refused", |r| {
        r["error"]["code"] == "not_targeted"
    });
    assert_eq!(r["active"]["name"], "bearing", "{r}");

    // A deploy without the slot names the slots the device runs.
    let port = format!("127.0.0.1:{}", f.hub_broker.port);
    let mut args = deploy_args(&f, &d, &port, key.to_str().expect("utf8"), &rul2);
    args.extend(["--timeout-secs", "3"]);
    let (code, out, err) = run(&mut hub_cmd(&args));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("only anomaly, rul: give the slot"), "{out}");

    let (_, v) = status(&d);
    assert_eq!(v["slot"], "anomaly", "{v}");
    assert_eq!(v["model"]["name"], "bearing", "{v}");
    assert_eq!(v["drift"]["model"]["name"], "bearing", "{v}");
    assert_eq!(v["slots"][0]["slot"], "rul", "{v}");
    assert_eq!(v["slots"][0]["model"]["version"], 1, "{v}");
    assert_eq!(v["slots"][0]["drift"]["model"]["name"], "rul", "{v}");
    let problems = v["problems"].to_string();
    assert!(
        problems.contains("slot anomaly: the last desired state was not applied (not_targeted)"),
        "{v}"
    );
    let (code, out, err) = run(&mut hub_cmd(&[
        "rollout", "status", "--broker", &port, "--fleet", FLEET,
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("{FLEET}/{}[rul]  idle", d.id)), "{out}");
    assert!(
        out.contains(&format!("{FLEET}/{}[anomaly]  idle", d.id)) && out.contains("last error (not_targeted)"),
        "{out}"
    );
}
