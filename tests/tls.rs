//! The agent's hub link over TLS (rustls with ring) against a real Mosquitto TLS listener.

use lathe_e2e::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn openssl(dir: &Path, args: &[&str]) {
    let (code, out, err) = run(Command::new("openssl").args(args).current_dir(dir));
    assert_eq!(code, 0, "openssl {args:?}: {out}{err}");
}

/// A CA, and a server certificate for `localhost` signed by it.
fn make_pki(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
        ],
    );
}

fn make_server_cert(dir: &Path, ca: &str) {
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost\n").expect("write");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

fn config(dir: &Path, name: &str, tls_port: u16, ca: &str) -> std::path::PathBuf {
    let d = dir.display();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"[device]
fleet = "plant1"
id = "{name}"
state_dir = "{d}/{name}-state"
[broker]
host = "localhost"
port = {tls_port}
keep_alive_secs = 5
backoff_initial_ms = 100
backoff_max_ms = 500
[broker.tls]
ca_file = "{d}/{ca}.pem"
[trust]
keys_file = "{d}/trust.keys"
[rollout.watch]
secs = 0
"#
        ),
    )
    .expect("write config");
    path
}

/// Two CAs (`ca` signs the broker's certificate, `other-ca` does not), a Mosquitto with a
/// TLS listener (returned with its port) and a plain one, and a trusted key `k` in
/// `trust.keys`: any valid key will do, the agent trusts it.
fn tls_broker(d: &Path) -> (Mosquitto, u16) {
    make_pki(d, "ca");
    make_pki(d, "other-ca");
    make_server_cert(d, "ca");
    let tls_port = free_port();
    let broker = Mosquitto::start_with(
        d,
        "tls-broker",
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n",
            d = d.display()
        ),
    );
    assert!(wait_for_port(tls_port, Duration::from_secs(10)));
    let (code, out, err) = run(Command::new(&bins().1)
        .args(["keygen", "--out-dir"])
        .arg(d)
        .args(["--name", "k"]));
    assert_eq!(code, 0, "{out}{err}");
    std::fs::copy(d.join("k.pub"), d.join("trust.keys")).expect("trust");
    (broker, tls_port)
}

#[test]
fn agent_connects_over_tls_and_refuses_an_untrusted_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (broker, tls_port) = tls_broker(d);

    // Watch births on the plain listener of the same broker.
    let rx = watch(broker.port, "lathe/v1/plant1/+/state", "tls-watch");

    let good = config(d, "good", tls_port, "ca");
    let _agent = Proc::spawn(
        "lathe run (tls)",
        Command::new(&bins().0).arg("run").arg("--config").arg(&good),
    );
    let online = eventually(Duration::from_secs(30), || {
        let (topic, p) = rx.recv_timeout(Duration::from_millis(200)).ok()?;
        let v: Value = serde_json::from_slice(&p).ok()?;
        (topic.ends_with("/good/state") && v["status"] == "online").then_some(())
    });
    assert!(online.is_some(), "agent did not come online over TLS");

    // The hub deploys over TLS too, and refuses a broker its CA does not vouch for.
    let bundle = d.join("b.lbundle");
    let (code, out, err) = run(Command::new(&bins().1)
        .args(["bundle", "pack", "--model"])
        .arg(fixture("vibration_logreg.onnx"))
        .args(["--name", "bearing", "--version", "1", "--features-file"])
        .arg(fixture("vibration_logreg.features.json"))
        .arg("--key")
        .arg(d.join("k.key"))
        .arg("--out")
        .arg(&bundle));
    assert_eq!(code, 0, "{out}{err}");
    let deploy = |ca: &str| {
        run(Command::new(&bins().1)
            .args(["deploy", "--broker", &format!("localhost:{tls_port}"), "--ca-file"])
            .arg(d.join(format!("{ca}.pem")))
            .args(["--fleet", "plant1", "--device", "good", "--timeout-secs", "20", "--key"])
            .arg(d.join("k.key"))
            .arg("--bundle")
            .arg(&bundle))
    };
    let (code, out, err) = deploy("ca");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("activated bearing v1"), "{out}");
    let (code, out, err) = deploy("other-ca");
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // An agent that trusts another CA must not connect, and must say why.
    let bad = config(d, "bad", tls_port, "other-ca");
    let _bad_agent = Proc::spawn(
        "lathe run (bad ca)",
        Command::new(&bins().0).arg("run").arg("--config").arg(&bad),
    );
    let refused = eventually(Duration::from_secs(20), || {
        let (code, out, _) = run(Command::new(&bins().0)
            .args(["status", "--json", "--state-dir"])
            .arg(d.join("bad-state")));
        let v: Value = serde_json::from_str(&out).ok()?;
        let err = v["connection"]["error"].as_str()?.to_lowercase();
        (code == 1 && v["connection"]["state"] == "disconnected" && err.contains("certificate")).then_some(err)
    });
    assert!(
        refused.is_some(),
        "the agent with the wrong CA did not report a certificate error"
    );
}

/// `lathe doctor` over TLS: the handshake checked as the agent makes it, a certificate near
/// its end warned of ahead of time, and a CA that does not sign the broker named with its fix.
#[test]
fn doctor_checks_tls_and_warns_of_certificates_near_expiry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (_broker, tls_port) = tls_broker(d);
    let doctor = |config: &Path| -> (i32, Value) {
        let (code, out, err) = run(Command::new(&bins().0)
            .args(["doctor", "--json", "--timeout-secs", "5", "--config"])
            .arg(config));
        (
            code,
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}")),
        )
    };
    let check = |v: &Value, name: &str| -> Value {
        v["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["check"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} check: {v:#}"))
    };

    // The CA is valid for two days: a warning, not a failure.
    let (code, v) = doctor(&config(d, "good", tls_port, "ca"));
    assert_eq!(code, 0, "{v:#}");
    let broker = check(&v, "broker");
    assert_eq!(broker["outcome"], "ok", "{v:#}");
    assert!(
        broker["message"]
            .as_str()
            .expect("message")
            .contains("(TLS, anonymous)"),
        "{broker}"
    );
    let certs = check(&v, "certificates");
    assert_eq!(certs["outcome"], "warn", "{v:#}");
    let message = certs["message"].as_str().expect("message");
    // Two days, less the moments since openssl made it (the days left are rounded down).
    assert!(
        message.contains("ca.pem certificate 1 expires in 1 day(s)")
            || message.contains("ca.pem certificate 1 expires in 2 day(s)"),
        "{message}"
    );
    // Asked to warn only a day ahead, it is fine.
    let (code, out, _) = run(Command::new(&bins().0)
        .args(["doctor", "--json", "--cert-warn-days", "1", "--config"])
        .arg(d.join("good.toml")));
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (code, &check(&v, "certificates")["outcome"]),
        (0, &Value::from("ok")),
        "{v:#}"
    );

    // A CA that did not sign the broker's certificate.
    let (code, v) = doctor(&config(d, "bad", tls_port, "other-ca"));
    assert_eq!(code, 1, "{v:#}");
    let broker = check(&v, "broker");
    assert_eq!(broker["outcome"], "fail", "{v:#}");
    assert!(
        broker["message"]
            .as_str()
            .expect("message")
            .starts_with(&format!("TLS with localhost:{tls_port} failed")),
        "{broker}"
    );
    assert!(
        broker["fix"].as_str().expect("fix").contains("broker.tls.ca_file"),
        "{broker}"
    );
}
