//! The commands as a technician and an operator meet them, run as the real binaries against
//! real Mosquitto brokers: `lathe status` on running, stopped and dead agents, `lathe run` on a
//! state_dir it cannot use, the agent's logs, and the hub CLI's environment, errors and answers.

use lathe_e2e::*;
use rumqttc::{Client, MqttOptions, QoS};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;

fn lathe_status(d: &Device) -> (i32, String) {
    let (code, out, err) = run(Command::new(&bins().0).args(["status", "--config"]).arg(&d.config));
    (code, format!("{out}{err}"))
}

/// Regressions: `agent running` for 15 s after a clean stop, `connected since …` for a dead
/// agent, and no way to see whether the model produces output.
#[test]
fn status_tells_a_running_agent_from_a_stopped_and_a_dead_one() {
    let f = Fleet::new();
    let _hub = f.hub();
    let d = f.device("press-5", f.hub_broker.port, &[]);
    let mut agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let (code, out) = f.deploy(&d, &f.bundle);
    assert_eq!(code, 0, "{out}");
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    sensor.send_range(&cases(), 0, 20, Duration::ZERO);
    sensor.wait_acked(20);
    // Within a heartbeat or two: the predictions, in the last minute, and when the last was made.
    let v = eventually(Duration::from_secs(30), || {
        let (code, v) = status(&d);
        (code == 0 && v["activity"]["last_minute"]["predictions"] == 20).then_some(v)
    })
    .unwrap_or_else(|| panic!("status never showed 20 predictions: {}", status(&d).1));
    assert_eq!(v["agent"], "running");
    assert_eq!(v["connection"]["state"], "connected");
    assert!(v["activity"]["last_prediction_ms"].as_u64().is_some(), "{v}");
    assert_eq!(v["activity"]["inference_failed_rows"], 0);
    let (code, text) = lathe_status(&d);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("last minute: 20 predictions, 0 readings refused, 0 rows failed"),
        "{text}"
    );
    assert!(
        text.contains("predicted   20"),
        "the time of the last prediction: {text}"
    );

    // A clean stop is seen at once; what only a running agent knows is unknown.
    assert_eq!(agent.terminate(Duration::from_secs(20)), Some(0));
    let (code, v) = status(&d);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["agent"], "stopped", "{v}");
    assert_eq!(v["connection"]["state"], "unknown", "{v}");
    assert_eq!(v["connection"]["last_known"]["state"], "stopped", "{v}");
    assert!(v["activity"]["last_minute"].is_null(), "{v}");
    assert_eq!(v["activity"]["predictions"], 20, "{v}");
    assert!(v["problems"].to_string().contains("it stopped cleanly"), "{v}");
    let (_, text) = lathe_status(&d);
    assert!(
        text.contains("unknown (the agent is not running; last known: stopped)"),
        "{text}"
    );
    assert!(text.contains("hint: start it"), "{text}");

    // A dead agent is seen at once too: its pid is gone.
    let mut agent = f.agent(&d);
    eventually(Duration::from_secs(30), || {
        (status(&d).1["agent"] == "running").then_some(())
    })
    .expect("the agent runs again");
    agent.child.kill().expect("kill -9");
    agent.child.wait().expect("wait");
    let (code, v) = status(&d);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["agent"], "not_running", "{v}");
    assert!(v["problems"].to_string().contains("it died (pid"), "{v}");
    assert_eq!(v["connection"]["state"], "unknown", "{v}");
}

/// `status --json` prints one JSON object whatever happens (regression: nothing for a bad
/// config), and `lathe run` refuses a state_dir it cannot use in one sentence, with the code
/// systemd does not restart on (regression: "unable to open database file" three times, exit 1).
#[test]
fn unusable_configs_and_state_dirs_are_refused_plainly() {
    let f = Fleet::new();
    let bad = f.path().join("bad.toml");
    std::fs::write(&bad, "[device]\nfleet = \"plant1\"\n").expect("write");
    let (code, out, err) = run(Command::new(&bins().0).args(["status", "--json", "--config"]).arg(&bad));
    assert_eq!(code, 78, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not one JSON object ({e}): {out}"));
    assert_eq!(v["agent"], "unknown");
    assert!(v["error"].as_str().expect("error").contains("bad.toml"), "{v}");
    assert!(v["problems"][0]["hint"].as_str().is_some_and(|h| !h.is_empty()), "{v}");
    let (code, out, _) = run(Command::new(&bins().0)
        .args(["status", "--json", "--state-dir"])
        .arg(f.path().join("nothing-here")));
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).expect("one JSON object");
    assert!(v["error"].as_str().expect("error").contains("no agent database"), "{v}");

    let file = f.path().join("a-file");
    std::fs::write(&file, "").expect("write");
    let file = file.join("state");
    for (id, state_dir, says) in [
        // Not writable, even by root: sysfs refuses new directories.
        ("denied", "/sys/lathe-state".to_string(), "permission denied"),
        ("afile", file.display().to_string(), "cannot create it"),
    ] {
        let line = format!("state_dir = \"{state_dir}\"");
        let d = f.device(id, f.hub_broker.port, &[("device", &line)]);
        let (code, out, err) = run(Command::new(&bins().0).arg("run").arg("--config").arg(&d.config));
        assert_eq!(code, 78, "{id}: {out}{err}");
        assert_eq!(err.trim().lines().count(), 1, "{id}: one sentence: {err}");
        assert!(err.contains(says) && err.contains(&state_dir), "{id}: {err}");
    }
}

/// Regressions: ANSI codes in logs that are not a terminal, and tract's alarming notice about
/// the operator set of a default scikit-learn export.
#[test]
fn logs_are_plain_or_json_and_quiet_about_tested_opsets() {
    let f = Fleet::new();
    let model = "default_opsets_logreg_pipeline";
    let corpus = repo_root().join("fixtures/corpus");
    let cases: Value =
        serde_json::from_slice(&std::fs::read(corpus.join(format!("{model}.cases.json"))).expect("cases"))
            .expect("json");
    let features: Vec<String> = serde_json::from_value(cases["features"].clone()).expect("features");
    let (code, out, bundle) = f.pack_model(
        &corpus.join(format!("{model}.onnx")),
        "pipeline",
        1,
        &features.join(","),
        &[],
    );
    assert_eq!(code, 0, "{out}");
    for (id, format) in [("logtext", "text"), ("logjson", "json")] {
        let line = format!("format = \"{format}\"");
        let d = f.device(id, f.hub_broker.port, &[("log", &line)]);
        let log = f.path().join(format!("{id}.log"));
        let mut agent = f.agent_logging_to(&d, &log);
        wait_online(f.hub_broker.port, &d.id);
        let (code, out) = f.deploy(&d, &bundle);
        assert_eq!(code, 0, "{out}");
        assert_eq!(agent.terminate(Duration::from_secs(20)), Some(0));
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(
            text.contains("activated") || text.contains("command done"),
            "{id}: {text}"
        );
        assert!(!text.contains('\u{1b}'), "{id}: ANSI codes in a log file: {text}");
        assert!(!text.contains("tract is only tested"), "{id}: {text}");
        if format == "json" {
            for l in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{id}: not JSON ({e}): {l}"));
                assert!(v["level"].is_string() && v["timestamp"].is_string(), "{id}: {l}");
            }
        }
    }
}

fn client(port: u16, id: &str) -> Client {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = Client::new(opts, 100);
    std::thread::spawn(move || for _ in conn.iter() {});
    client
}

/// The hub CLI takes its broker from the environment, tells "cannot connect" from "connection
/// lost", and says what a rollback did (regression: run twice, it rolled forward and said
/// "rolled back"). The agent publishes its state before it answers, and refuses a command that
/// is a JSON array (regression: `["ping"]` was a ping).
#[test]
fn the_hub_cli_and_the_command_channel_say_what_happened() {
    let f = Fleet::new();
    let d = f.device("press-6", f.hub_broker.port, &[]);
    let _agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let broker = format!("127.0.0.1:{}", f.hub_broker.port);
    let key = f.path().join("k1.key");
    let key = key.to_str().expect("utf8");
    let from_env = |args: &[&str]| {
        let mut all = vec![
            args[0],
            "--fleet",
            FLEET,
            "--device",
            &d.id,
            "--timeout-secs",
            "30",
            "--key",
            key,
        ];
        all.extend_from_slice(&args[1..]);
        let (code, out, err) = run(hub_cmd(&all).env("LATHE_HUB_BROKER", &broker));
        (code, format!("{out}{err}"))
    };
    let (code, out) = from_env(&["deploy", "--bundle", f.bundle.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");

    // The retained state naming the new model is out before the reported state says it is
    // done.
    let seen = watch(
        f.hub_broker.port,
        &format!("lathe/v1/{FLEET}/{}/#", d.id),
        "order-watch",
    );
    let v2 = f.pack(2);
    let (code, out) = from_env(&["deploy", "--bundle", v2.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");
    let mut order = vec![];
    while let Ok((topic, payload)) = seen.recv_timeout(Duration::from_secs(5)) {
        let v: Value = serde_json::from_slice(&payload).unwrap_or_default();
        if topic.ends_with("/state") && v["model"]["version"] == 2 {
            order.push("state");
        } else if topic.ends_with("/reported") && v["active"]["version"] == 2 && v["phase"] == "idle" {
            order.push("reported");
            break;
        }
    }
    assert_eq!(order, ["state", "reported"], "the state goes out before the report");

    // A rollback is a signed desired state naming the version to run: run twice, it stays
    // there (regression: a rollback was a swap, and a second one rolled forward).
    let v1 = f.bundle.to_str().expect("utf8");
    for _ in 0..2 {
        let (code, out) = from_env(&["rollback", "--bundle", v1]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("rolled back to bearing v1 (active: bearing v1)"), "{out}");
    }
    let (_, v) = status(&d);
    assert_eq!(v["model"]["version"], 1, "{v}");

    let nobody = format!("127.0.0.1:{}", free_port());
    let (code, out, err) = run(&mut hub_cmd(&[
        "deploy",
        "--broker",
        &nobody,
        "--fleet",
        FLEET,
        "--device",
        &d.id,
        "--key",
        key,
        "--bundle",
        v1,
        "--timeout-secs",
        "10",
    ]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&format!("cannot connect to broker {nobody}")), "{err}");

    // Regression: `serve` against a dead broker said `connection lost` for a connection that
    // never existed.
    let log = f.path().join("serve.log");
    let mut serve = Proc::spawn(
        "serve",
        hub_cmd(&[
            "serve",
            "--broker",
            &nobody,
            "--db",
            f.path().join("x.db").to_str().expect("utf8"),
        ])
        .env("LATHE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log")),
    );
    let said = eventually(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("cannot connect to the broker").then_some(text)
    });
    serve.terminate(Duration::from_secs(5));
    let text = said.unwrap_or_else(|| std::fs::read_to_string(&log).unwrap_or_default());
    assert!(text.contains("cannot connect to the broker"), "{text}");
    assert!(!text.contains("connection lost"), "{text}");

    let answers = watch(
        f.hub_broker.port,
        &format!("lathe/v1/{FLEET}/{}/res/+", d.id),
        "res-watch",
    );
    std::thread::sleep(Duration::from_millis(500));
    let forge = client(f.hub_broker.port, "array-command");
    forge
        .publish(
            format!("lathe/v1/{FLEET}/{}/cmd/array1", d.id),
            QoS::AtLeastOnce,
            false,
            br#"["ping"]"#.to_vec(),
        )
        .expect("publish");
    let (topic, payload) = answers.recv_timeout(Duration::from_secs(20)).expect("an answer");
    assert!(topic.ends_with("/res/array1"), "{topic}");
    let v: Value = serde_json::from_slice(&payload).expect("json");
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["code"], "bad_command", "{v}");
    assert!(
        v["message"]
            .as_str()
            .expect("message")
            .contains("a command is a JSON object"),
        "{v}"
    );
    // Unsigned commands change nothing: a rollback or a deploy by command is refused.
    for (id, cmd) in [
        ("unsigned1", r#"{"op":"rollback"}"#),
        ("unsigned2", r#"{"op":"deploy","bundle":"AAAA"}"#),
    ] {
        forge
            .publish(
                format!("lathe/v1/{FLEET}/{}/cmd/{id}", d.id),
                QoS::AtLeastOnce,
                false,
                cmd,
            )
            .expect("publish");
        let (_, payload) = answers.recv_timeout(Duration::from_secs(20)).expect("an answer");
        let v: Value = serde_json::from_slice(&payload).expect("json");
        assert_eq!(v["code"], "bad_command", "{v}");
        assert!(
            v["message"]
                .as_str()
                .expect("message")
                .contains("signed desired states"),
            "{v}"
        );
        assert_eq!(v["model"]["version"], 1, "{v}");
    }
}

/// A model that passed every check before activation but fails on some readings at run time
/// (tract panics on a lookup out of range): only those rows are lost, each counted; the
/// failure is logged and sent as an event once, not per reading; `lathe status` says that
/// inference is failing, with the reason, and exits 1.
#[test]
fn inference_failures_are_counted_shown_and_not_flooded() {
    let f = Fleet::new();
    let _hub = f.hub();
    let d = f.device("press-8", f.hub_broker.port, &[]);
    let (code, out, bundle) = f.pack_model(
        &fixture("fails_on_large.onnx"),
        "fragile",
        1,
        "rms,kurtosis,crest_factor,peak_hz",
        &[],
    );
    assert_eq!(code, 0, "it passes every check before activation: {out}");
    let log = f.path().join("agent.log");
    let _agent = f.agent_logging_to(&d, &log);
    wait_online(f.hub_broker.port, &d.id);
    let (code, out) = f.deploy(&d, &bundle);
    assert_eq!(code, 0, "{out}");

    let row = |id: i64, rms: f64| serde_json::json!({"id": id, "rms": rms, "kurtosis": 3.0, "crest_factor": 3.2, "peak_hz": 120.0});
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    // One message whose middle row fails: its neighbours are still predicted.
    sensor.send(serde_json::to_vec(&[row(1, 0.9), row(2, 25_000.0), row(3, 1.1)]).expect("json"));
    for id in 10..15 {
        sensor.send(serde_json::to_vec(&row(id, 30_000.0)).expect("json"));
    }
    sensor.send(serde_json::to_vec(&row(20, 0.8)).expect("json"));
    sensor.wait_acked(7);
    let stored = wait_hub_has(&f.hub_db, [1, 3, 20], Duration::from_secs(60));
    let ids: Vec<i64> = stored.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), 3, "only the rows that fail alone are lost: {ids:?}");

    let v = eventually(Duration::from_secs(30), || {
        let (code, v) = status(&d);
        (code == 1 && v["activity"]["inference_failed_rows"] == 6).then_some(v)
    })
    .unwrap_or_else(|| panic!("status never counted 6 failed rows: {}", status(&d).1));
    let problems = v["problems"].to_string();
    assert!(
        problems.contains("inference is failing: 6 row(s) in the last minute")
            && problems.contains("the engine failed on these rows"),
        "{v}"
    );
    assert_eq!(v["activity"]["predictions"], 3, "{v}");
    assert_eq!(v["activity"]["rejected_readings"], 0, "the messages were taken: {v}");

    let events = eventually(Duration::from_secs(30), || {
        let e: Vec<String> = hub_records(&f.hub_db, "events")
            .into_iter()
            .filter(|e| e.contains("inference_failed"))
            .collect();
        (!e.is_empty()).then_some(e)
    })
    .expect("an inference_failed event reaches the hub");
    std::thread::sleep(Duration::from_secs(2));
    let text = std::fs::read_to_string(&log).expect("log");
    let logged = text.lines().filter(|l| l.contains("inference failed")).count();
    assert_eq!(logged, 1, "logged once, then counted: {text}");
    assert!(!text.contains("panicked"), "{text}");
    assert_eq!(events.len(), 1, "{events:?}");
}
