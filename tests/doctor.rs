//! `lathe doctor` end to end: the real binary against a real agent's state, real brokers and
//! real faults, each named with its fix.

use lathe_e2e::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `lathe doctor --json` on `config`: (exit code, report).
fn doctor(config: &Path) -> (i32, Value) {
    let (code, out, err) = run(Command::new(&bins().0)
        .args(["doctor", "--json", "--timeout-secs", "5", "--config"])
        .arg(config));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("doctor --json: {e}: {out}{err}"));
    (code, v)
}

/// The checks of a report named `name`, as (outcome, message, fix).
fn checks(v: &Value, name: &str) -> Vec<(String, String, String)> {
    v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["check"] == name)
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
            (s("outcome"), s("message"), s("fix"))
        })
        .collect()
}

fn one(v: &Value, name: &str) -> (String, String, String) {
    let mut c = checks(v, name);
    assert_eq!(c.len(), 1, "one {name} check: {v:#}");
    c.remove(0)
}

/// The bearing model with a self-test of the cases' rows.
fn tested_bundle(f: &Fleet) -> std::path::PathBuf {
    let c = cases();
    let rows = f.path().join("selftest.csv");
    let mut text = c.features.join(",") + "\n";
    for r in c.rows.iter().take(16) {
        text += &(r.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(",") + "\n");
    }
    std::fs::write(&rows, text).expect("rows");
    let (code, out, bundle) = f.pack_model(
        &fixture("vibration_logreg.onnx"),
        "bearing",
        1,
        &c.features.join(","),
        &["--selftest", rows.to_str().expect("utf8")],
    );
    assert_eq!(code, 0, "pack: {out}");
    bundle
}

#[test]
fn doctor_passes_a_healthy_device_and_names_each_fault_with_its_fix() {
    let mut s = Fleet::new();
    let d = s.device("doc-1", s.hub_broker.port, &[]);
    let _hub = s.hub();
    let bundle = tested_bundle(&s);

    // Before the agent ever ran: nothing is broken, but there is no state and no model yet.
    let (code, v) = doctor(&d.config);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(one(&v, "state_dir").0, "warn", "{v:#}");
    assert!(one(&v, "model").1.contains("has not run here yet"), "{v:#}");

    let mut agent = s.agent(&d);
    wait_online(s.hub_broker.port, "doc-1");
    let (code, out) = s.deploy(&d, &bundle);
    assert_eq!(code, 0, "{out}");

    // Healthy, beside the running agent (its own client ids; the agent stays connected).
    let (code, v) = doctor(&d.config);
    assert_eq!(
        (code, v["ok"].as_bool(), v["warnings"].as_u64()),
        (0, Some(true), Some(0)),
        "{v:#}"
    );
    let names: Vec<&str> = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| c["check"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "config",
            "secrets",
            "state_dir",
            "disk",
            "trust",
            "broker",
            "inputs.broker",
            "certificates",
            "model",
            "clock"
        ],
        "{v:#}"
    );
    assert_eq!(one(&v, "model").1, "bearing v1 loads and passes its self-test");
    assert!(one(&v, "broker").1.contains("connected to 127.0.0.1:"), "{v:#}");
    assert_eq!(one(&v, "certificates").0, "skipped");
    let (code, text, _) = run(Command::new(&bins().0).args(["doctor", "--config"]).arg(&d.config));
    assert_eq!(code, 0, "{text}");
    assert!(text.ends_with("all checks passed\n"), "{text}");
    assert_eq!(status(&d).1["connection"]["state"], "connected");

    // The hub's broker is gone: named, with its fix, and the exit code says so.
    s.hub_broker.kill();
    let (code, v) = doctor(&d.config);
    assert_eq!(code, 1, "{v:#}");
    let (outcome, message, fix) = one(&v, "broker");
    assert_eq!(outcome, "fail");
    assert!(
        message.starts_with(&format!(
            "nothing accepts connections on 127.0.0.1:{}",
            s.hub_broker.port
        )),
        "{message}"
    );
    assert_eq!(fix, "start the broker, or correct broker.host and broker.port");
    assert_eq!(one(&v, "inputs.broker").0, "ok", "{v:#}");
    s.hub_broker.up();
    assert_eq!(agent.terminate(Duration::from_secs(20)), Some(0));

    // The installed bundle is damaged on disk: the same check a start makes refuses it.
    let bundles = d.state_dir.join("bundles");
    let file = std::fs::read_dir(&bundles)
        .expect("bundles dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "lbundle"))
        .expect("an installed bundle");
    let good = std::fs::read(&file).expect("bundle");
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(&file, &bad).expect("write");
    let (code, v) = doctor(&d.config);
    assert_eq!(code, 1, "{v:#}");
    let (outcome, message, fix) = one(&v, "model");
    assert_eq!(outcome, "fail");
    assert!(message.contains("does not match its sha256"), "{message}");
    assert!(fix.contains("deploy the bundle again"), "{fix}");
    std::fs::write(&file, &good).expect("restore");

    // A password in a config every user can read.
    let text = std::fs::read_to_string(&d.config).expect("config");
    let open = s.path().join("open.toml");
    std::fs::write(
        &open,
        text.replacen(
            "[broker]\n",
            "[broker]\nusername = \"doc-1\"\npassword = \"hunter2\"\n",
            1,
        ),
    )
    .expect("write");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (code, v) = doctor(&open);
    assert_eq!(code, 1, "{v:#}");
    let (outcome, message, fix) = one(&v, "secrets");
    assert_eq!(outcome, "fail");
    assert!(
        message.contains("the config, which holds a password") && message.contains("mode 644"),
        "{message}"
    );
    assert!(fix.contains("chmod 640"), "{fix}");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    assert_eq!(one(&doctor(&open).1, "secrets").0, "ok");

    // A state_dir that is not a directory.
    let not_dir = s.path().join("not-a-dir");
    std::fs::write(&not_dir, "x").expect("write");
    let moved = s.path().join("moved.toml");
    std::fs::write(
        &moved,
        text.replace(&d.state_dir.display().to_string(), &not_dir.display().to_string()),
    )
    .expect("write");
    let (code, v) = doctor(&moved);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(
        one(&v, "state_dir"),
        (
            "fail".into(),
            format!("{} is not a directory", not_dir.display()),
            "set device.state_dir to a directory".into()
        )
    );

    // An invalid config: one report, the config's own exit code.
    let broken = s.path().join("broken.toml");
    std::fs::write(&broken, text.replace("keep_alive_secs = 5", "keep_alive_secs = 1")).expect("write");
    let (code, v) = doctor(&broken);
    assert_eq!(code, 78, "{v:#}");
    let (outcome, message, _) = one(&v, "config");
    assert_eq!(outcome, "fail");
    assert!(message.contains("keep_alive_secs"), "{message}");
}

#[test]
fn doctor_says_when_the_broker_refuses_the_credentials() {
    let s = Fleet::new();
    let d = s.device("doc-2", s.hub_broker.port, &[]);
    let pw = s.path().join("passwd");
    let (code, out, err) = run(Command::new("mosquitto_passwd")
        .arg("-c")
        .arg("-b")
        .arg(&pw)
        .args(["doc-2", "right"]));
    assert_eq!(code, 0, "{out}{err}");
    let auth = Mosquitto::start_conf(
        s.path(),
        "auth-broker",
        &format!("allow_anonymous false\npassword_file {}\n", pw.display()),
    );
    let secret = s.path().join("doc-2.password");
    std::fs::write(&secret, "wrong\n").expect("write");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let text = std::fs::read_to_string(&d.config).expect("config").replacen(
        &format!("port = {}\n", s.hub_broker.port),
        &format!(
            "port = {}\nusername = \"doc-2\"\npassword_file = \"{}\"\n",
            auth.port,
            secret.display()
        ),
        1,
    );
    std::fs::write(&d.config, text).expect("write");
    let (code, v) = doctor(&d.config);
    assert_eq!(code, 1, "{v:#}");
    let (outcome, message, fix) = one(&v, "broker");
    assert_eq!(outcome, "fail");
    assert!(message.contains("refused the credentials"), "{message}");
    assert!(fix.contains("broker.username"), "{fix}");
    assert_eq!(one(&v, "secrets").0, "ok", "{v:#}");

    std::fs::write(&secret, "right\n").expect("write");
    let (_, v) = doctor(&d.config);
    let (outcome, message, _) = one(&v, "broker");
    assert_eq!(outcome, "ok", "{message}");
    assert!(message.contains("as user doc-2"), "{message}");
}
