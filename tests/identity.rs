//! Identity and authorisation: every device and the hub log in with their own credentials, and
//! the shipped Mosquitto ACL (`broker/mosquitto/lathe.acl`) confines each device to its own
//! topics.

use lathe_e2e::*;
use rumqttc::{Client, MqttOptions, QoS};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

fn passwd(file: &std::path::Path, user: &str, password: &str, create: bool) {
    let mut c = Command::new("mosquitto_passwd");
    if create {
        c.arg("-c");
    }
    let (code, out, err) = run(c.arg("-b").arg(file).arg(user).arg(password));
    assert_eq!(code, 0, "mosquitto_passwd: {out}{err}");
}

fn client_as(port: u16, id: &str, user: &str, password: &str) -> Client {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_credentials(user, password);
    let (client, mut conn) = Client::new(opts, 100);
    std::thread::spawn(move || for _ in conn.iter() {});
    client
}

fn connected(d: &Device) -> Value {
    let v = eventually(Duration::from_secs(30), || {
        let (_, v) = status(d);
        (v["connection"]["state"] == "connected").then_some(v)
    });
    v.unwrap_or_else(|| panic!("{} did not connect: {}", d.id, status(d).1))
}

#[test]
fn device_a_cannot_write_records_or_acks_as_device_b() {
    let acl = repo_root().join("broker/mosquitto/lathe.acl");
    let mut pw = std::path::PathBuf::new();
    let mut f = Fleet::with_hub_broker(|dir| {
        pw = dir.join("passwd");
        passwd(&pw, "lathe-hub", "hub-secret", true);
        passwd(&pw, "press-a", "a-secret", false);
        passwd(&pw, "press-b", "b-secret", false);
        Mosquitto::start_conf(
            dir,
            "secure-broker",
            &format!(
                "allow_anonymous false\npassword_file {}\nacl_file {}\n",
                pw.display(),
                acl.display()
            ),
        )
    });
    let hub_pw = f.path().join("hub.password");
    std::fs::write(&hub_pw, "hub-secret\n").expect("hub password file");
    f.hub_args = vec![
        "--username".into(),
        "lathe-hub".into(),
        "--password-file".into(),
        hub_pw.display().to_string(),
    ];
    let port = f.hub_broker.port;
    let a = f.device(
        "press-a",
        port,
        &[
            ("broker", "username = \"press-a\""),
            ("broker", "password = \"a-secret\""),
        ],
    );
    let pw_b = f.path().join("b.password");
    std::fs::write(&pw_b, "b-secret\n").expect("password file");
    let b_pw_line = format!("password_file = \"{}\"", pw_b.display());
    let b = f.device(
        "press-b",
        port,
        &[("broker", "username = \"press-b\""), ("broker", &b_pw_line)],
    );
    let _hub = f.hub();
    let _agent_a = f.agent(&a);
    let _agent_b = f.agent(&b);
    connected(&a);
    connected(&b);
    for d in [&a, &b] {
        let (code, out) = f.deploy(d, &f.bundle);
        assert_eq!(code, 0, "{out}");
    }
    let v2 = f.pack(2);
    let (code, out) = f.deploy(&b, &v2);
    assert_eq!(code, 0, "{out}");

    // Both devices' records reach the hub through the ACL.
    let c = cases();
    let (sa, sb) = (
        Sensor::new(f.sensor_broker.port, &a.id),
        Sensor::new(f.sensor_broker.port, &b.id),
    );
    sa.send_range(&c, 0, 20, Duration::ZERO);
    sb.send_range(&c, 100, 120, Duration::ZERO);
    wait_hub_has(&f.hub_db, (0..20).chain(100..120), Duration::from_secs(60));

    // Device A's credentials, used to impersonate B: a forged record, a forged ack, a rollback,
    // and a subscription to B's commands.
    let rogue = client_as(port, "rogue", "press-a", "a-secret");
    let seen = watch_as(
        port,
        &format!("lathe/v1/{FLEET}/{}/cmd/+", b.id),
        "rogue-reader",
        Some(("press-a", "a-secret")),
    );
    let (_, vb) = status(&b);
    let epoch = vb["outbox_by_stream"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["stream"] == "predictions"))
        .and_then(|s| s["epoch"].as_str())
        .expect("epoch")
        .to_string();
    let topic = |ch: &str| format!("lathe/v1/{FLEET}/{}/{ch}", b.id);
    rogue
        .publish(
            topic("sync/predictions"),
            QoS::AtLeastOnce,
            false,
            json!({"device": b.id, "stream": "predictions", "epoch": epoch, "acked": 1_000_000, "records": [{"seq": 1_000_000, "ts_ms": 1, "data": {"forged": "by press-a"}}]})
                .to_string(),
        )
        .expect("publish");
    rogue
        .publish(
            topic("ack/predictions"),
            QoS::AtLeastOnce,
            false,
            json!({"stream": "predictions", "epoch": epoch, "acked": 1_000_000_000u64}).to_string(),
        )
        .expect("publish");
    rogue
        .publish(topic("cmd/rogue"), QoS::AtLeastOnce, false, r#"{"op":"ping"}"#)
        .expect("publish");
    // A's copy of B's retained desired state, published back under B's topic: the ACL drops it.
    rogue
        .publish(topic("desired"), QoS::AtLeastOnce, true, r#"{"forged":true}"#)
        .expect("publish");
    std::thread::sleep(Duration::from_secs(2));
    // A real rollback to B is not seen by A's subscription.
    let (code, out) = f.rollout(&b, "rollback", &f.bundle);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rolled back to bearing v1 (active: bearing v1)"), "{out}");
    let (_, vb) = status(&b);
    assert_eq!(vb["model"]["version"], 1, "{vb}");

    sb.send_range(&c, 120, 140, Duration::ZERO);
    wait_hub_has(&f.hub_db, 100..140, Duration::from_secs(60));
    assert!(
        !hub_records(&f.hub_db, "predictions")
            .iter()
            .any(|r| r.contains("forged")),
        "a record forged by press-a was stored as press-b's"
    );
    let (_, vb) = status(&b);
    assert_eq!(vb["acks_refused"], 0, "the forged ack reached press-b: {vb}");
    assert!(seen.try_iter().next().is_none(), "press-a read press-b's commands");
}

/// Regression: a SUBACK refusing a subscription was ignored, and status said connected. NATS
/// refuses subscriptions its permissions deny in the SUBACK.
#[test]
fn a_refused_subscription_is_a_problem_in_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = Nats::start(
        dir.path(),
        r#"users = [ { user: "press-c", password: "c-secret", permissions: { publish: ">", subscribe: { allow: [">"], deny: ["lathe.v1.plant1.press-c.cmd.*"] } } } ]"#,
    );
    let f = Fleet::new();
    let d = f.device(
        "press-c",
        nats.mqtt_port,
        &[
            ("broker", "username = \"press-c\""),
            ("broker", "password = \"c-secret\""),
        ],
    );
    let _agent = f.agent(&d);
    let refused = eventually(Duration::from_secs(30), || {
        let (code, v) = status(&d);
        (code == 1 && v["connection"]["state"] == "refused").then_some(v)
    });
    let v = refused.unwrap_or_else(|| panic!("the refused subscription is not shown: {}", status(&d).1));
    let problems = v["problems"].to_string();
    assert!(
        problems.contains("refused the subscription") && problems.contains("/cmd/+"),
        "{v}"
    );
}
