//! `lathe-hub demo`: the whole loop on one machine, with nothing installed.
//!
//! An embedded broker, the ingest service, a real `lathe` agent process and simulated sensors.
//! A signed bundle with its training baseline is deployed, predictions flow, the agent's link
//! to the hub is cut (a black-holing proxy) and restored, and the buffered predictions arrive
//! at the hub; then a sensor is recalibrated and the drift is alerted on the device and at the
//! hub.

use crate::ingest::{Ingest, IngestStats};
use crate::{broker, ops, proxy::Proxy, rollout};
use clap::Args;
use protocol::keys::SigningKey;
use protocol::{Channel, Name, Topic};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const MODEL: &[u8] = include_bytes!("../../fixtures/models/vibration_logreg.onnx");
const CASES: &str = include_str!("../../fixtures/models/vibration_logreg.cases.json");
/// Training rows of the model (the drift baseline), live rows like them, and live rows after
/// the peak-frequency sensor was recalibrated (x1.3).
const TRAIN: &str = include_str!("../../fixtures/drift/train.csv");
const LIVE: &str = include_str!("../../fixtures/drift/control.csv");
const RECALIBRATED: &str = include_str!("../../fixtures/drift/peak_recalibrated.csv");

fn csv_rows(text: &str) -> Vec<Vec<f64>> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split(',').map(|v| v.trim().parse::<f64>().ok()).collect())
        .collect()
}

#[derive(Args)]
pub struct DemoArgs {
    /// The `lathe` agent binary; by default the one next to this binary.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Seconds the link stays cut.
    #[arg(long, default_value_t = 12)]
    cut_secs: u64,
    /// Readings per second from the simulated sensors.
    #[arg(long, default_value_t = 20)]
    rate: u64,
}

fn step(msg: impl AsRef<str>) {
    println!("\n==> {}", msg.as_ref());
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub async fn run(args: DemoArgs) -> anyhow::Result<u8> {
    let agent_bin = match args.agent {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("lathe"),
    };
    anyhow::ensure!(
        agent_bin.exists(),
        "agent binary {} not found; build it with `cargo build -p lathe` or pass --agent",
        agent_bin.display()
    );
    let dir = tempfile::tempdir()?;
    let (fleet, device) = (Name::new("demo-plant")?, Name::new("press-7")?);

    step("starting an embedded MQTT broker (for this demo only: no authentication, no TLS)");
    let port = free_port()?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    broker::start(addr, 16 << 20)?;
    println!("    broker on {addr}");
    let proxy = Proxy::start(addr).await?;
    println!(
        "    the agent reaches the hub through a link we can cut, {} -> {addr}",
        proxy.addr
    );

    step("generating a signing key and packing a signed bundle, with the training data's baseline");
    let key = SigningKey::generate(&ring::rand::SystemRandom::new())?;
    let trust = dir.path().join("trust.keys");
    std::fs::write(&trust, format!("{} demo\n", key.public_key().to_text()))?;
    let cases: serde_json::Value = serde_json::from_str(CASES)?;
    let features: Vec<String> = serde_json::from_value(cases["features"].clone())?;
    let now = ops::now_secs();
    let (bundle, m) = ops::pack(
        ops::PackInput {
            shapes: vec![],
            image: None,
            name: "bearing-wear".into(),
            version: 1,
            model: MODEL.to_vec(),
            features: features.clone(),
            selftest: None,
            baseline: Some(
                csv_rows(TRAIN)
                    .into_iter()
                    .map(|r| r.into_iter().map(|v| v as f32).collect())
                    .collect(),
            ),
            baseline_bins: protocol::baseline::DEFAULT_BINS,
            created: now,
            expires: now + 86_400,
        },
        &[&key],
    )?;
    println!(
        "    {} v{}: {} bytes, signed by key {}, inputs [{}]",
        m.name,
        m.version,
        bundle.len(),
        key.key_id(),
        features.join(", ")
    );

    step("starting the hub's ingest service");
    let stats = Arc::new(IngestStats::default());
    let shutdown = CancellationToken::new();
    let ingest = Ingest {
        broker: lathe::config::BrokerConfig {
            keep_alive_secs: 15,
            max_packet_bytes: 16 << 20,
            ..lathe::config::BrokerConfig::new("127.0.0.1", port)
        },
        client_id: "lathe-hub-demo".into(),
        db: dir.path().join("hub.db"),
        max_batch_json: protocol::sync::MAX_BATCH_JSON,
        stats: stats.clone(),
        echo: true,
    };
    let sd = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = ingest.run(sd).await {
            eprintln!("ingest stopped: {e:#}");
        }
    });

    step("starting a real lathe agent process");
    let state_dir = dir.path().join("agent");
    let config = dir.path().join("lathe.toml");
    std::fs::write(
        &config,
        format!(
            r#"[device]
fleet = "{fleet}"
id = "{device}"
state_dir = "{state}"

[broker]            # the hub link, through the cuttable proxy
host = "127.0.0.1"
port = {pport}
keep_alive_secs = 5
backoff_initial_ms = 250
backoff_max_ms = 2000

[inputs]
topics = ["sensors/{device}/features"]
[inputs.broker]     # sensors publish to the broker directly
host = "127.0.0.1"
port = {port}

[trust]
keys_file = "{trust}"

[sync]
interval_ms = 200
ack_timeout_ms = 3000

[health]
interval_secs = 5

[rollout.watch]     # a short watch after each activation, before it is committed
secs = 5

[drift]             # small windows, so that the demo shows them quickly
window_rows = 200
min_rows = 200
"#,
            state = state_dir.display(),
            pport = proxy.addr.port(),
            trust = trust.display(),
        ),
    )?;
    let mut agent = tokio::process::Command::new(&agent_bin)
        .args(["run", "--config"])
        .arg(&config)
        .env(
            "LATHE_LOG",
            std::env::var("LATHE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .kill_on_drop(true)
        .spawn()?;
    println!("    {} run --config {}", agent_bin.display(), config.display());

    // Watch the device's predictions from the hub side.
    let mut opts = MqttOptions::new("lathe-demo-sensors", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (sensors, mut sensor_loop) = AsyncClient::new(opts, 1024);
    let pred_topic = Topic::new(&fleet, &device, Channel::Predictions).to_string();
    let live = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (live2, pt) = (live.clone(), pred_topic.clone());
    let sclient = sensors.clone();
    tokio::spawn(async move {
        while let Ok(ev) = sensor_loop.poll().await {
            match ev {
                Event::Incoming(Packet::ConnAck(_)) => {
                    let _ = sclient.subscribe(pt.clone(), QoS::AtMostOnce).await;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let n = live2.fetch_add(1, Ordering::Relaxed);
                    if n < 3 || n % 100 == 0 {
                        println!("    prediction #{}: {}", n + 1, String::from_utf8_lossy(&p.payload));
                    }
                }
                _ => {}
            }
        }
    });

    step("deploying: the bundle in retained chunks, then the device's signed desired state; the device watches the new model for 5 s before it commits it");
    let deploy = |bundle: Vec<u8>| {
        let (fleet, device, key) = (fleet.clone(), device.clone(), &key);
        async move {
            let plan = rollout::Plan {
                fleet,
                devices: vec![device.clone()],
                group: None,
                bundle: &bundle,
                keys: vec![key],
                chunk_bytes: protocol::rollout::DEFAULT_CHUNK_BYTES,
                expires_in_secs: 86_400,
                rollback: false,
                slot: None,
            };
            rollout::run(rollout::Run {
                broker: lathe::config::BrokerConfig::new("127.0.0.1", port),
                plan,
                wait_for: vec![device],
                timeout: Duration::from_secs(30),
                canary: None,
            })
            .await
        }
    };
    anyhow::ensure!(deploy(bundle.clone()).await? == 0, "deploy refused");

    step("simulated sensors publish readings; predictions flow");
    let rows = csv_rows(LIVE);
    let recalibrated_rows = csv_rows(RECALIBRATED);
    let recalibrated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let recal = recalibrated.clone();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (sent2, sc) = (sent.clone(), sensors.clone());
    let input_topic = format!("sensors/{device}/features");
    let period = Duration::from_micros(1_000_000 / args.rate.max(1));
    let stop_sensors = CancellationToken::new();
    let stop2 = stop_sensors.clone();
    let sensor_task = tokio::spawn(async move {
        let mut t = tokio::time::interval(period);
        let mut i = 0usize;
        while !stop2.is_cancelled() {
            t.tick().await;
            let row = if recal.load(Ordering::Relaxed) {
                &recalibrated_rows[i % recalibrated_rows.len()]
            } else {
                &rows[i % rows.len()]
            };
            let mut obj = serde_json::Map::new();
            for (f, v) in features.iter().zip(row) {
                obj.insert(f.clone(), serde_json::json!(v));
            }
            obj.insert("id".into(), serde_json::json!(i));
            if sc
                .publish(
                    input_topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    serde_json::to_vec(&obj).expect("json"),
                )
                .await
                .is_ok()
            {
                sent2.fetch_add(1, Ordering::Relaxed);
            }
            i += 1;
        }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    println!(
        "    {} readings sent, {} predictions seen live, {} stored at the hub",
        sent.load(Ordering::Relaxed),
        live.load(Ordering::Relaxed),
        stats.predictions.load(Ordering::Relaxed)
    );

    step(format!(
        "cutting the link between the agent and the hub for {}s (packets vanish, nothing closes)",
        args.cut_secs
    ));
    proxy.cut();
    let at_cut = stats.predictions.load(Ordering::Relaxed);
    for _ in 0..(args.cut_secs / 4).max(1) {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let status = tokio::process::Command::new(&agent_bin)
            .args(["status", "--state-dir"])
            .arg(&state_dir)
            .output()
            .await?;
        println!(
            "    {} readings sent, hub has {} (was {at_cut} at the cut); `lathe status` on the device says:",
            sent.load(Ordering::Relaxed),
            stats.predictions.load(Ordering::Relaxed)
        );
        for line in String::from_utf8_lossy(&status.stdout).lines() {
            println!("      {line}");
        }
    }

    step("restoring the link");
    proxy.restore();
    tokio::time::sleep(Duration::from_secs(2)).await;

    step("a technician recalibrates the peak-frequency sensor (x1.3): the model's inputs drift");
    recalibrated.store(true, Ordering::Relaxed);
    // Two windows of 200 rows at the sensors' rate: the second holds recalibrated rows only.
    tokio::time::sleep(period * 2 * 200 + Duration::from_secs(2)).await;
    let status = tokio::process::Command::new(&agent_bin)
        .args(["status", "--state-dir"])
        .arg(&state_dir)
        .output()
        .await?;
    println!("    `lathe status` on the device says:");
    for line in String::from_utf8_lossy(&status.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("drift"))
        .take(6)
    {
        println!("      {line}");
    }
    let drift = crate::views::drift(
        &crate::store::HubStore::open(&dir.path().join("hub.db"))?,
        None,
        None,
        3,
    )?;
    println!("    and the hub's drift view (`lathe-hub drift`):");
    for line in crate::views::render_drift(&drift).lines() {
        println!("      {line}");
    }
    let alerted = drift.devices.iter().any(|d| d.alerts_total > 0);
    stop_sensors.cancel();
    let _ = sensor_task.await;
    let total = sent.load(Ordering::Relaxed);
    println!("    sensors stopped after {total} readings; waiting for the outbox to drain");
    let start = Instant::now();
    let hub_count = |s: &IngestStats| s.predictions.load(Ordering::Relaxed);
    while hub_count(&stats) < total && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let stored = hub_count(&stats);
    println!(
        "    hub stored {stored} of {total} predictions exactly once ({} duplicate deliveries dropped)",
        stats.duplicates.load(Ordering::Relaxed)
    );

    step("stopping the agent");
    if let Some(pid) = agent.id() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), agent.wait()).await;
    shutdown.cancel();
    if stored == total && alerted {
        println!("\ndemo complete: every prediction made it to the hub, and the drift was alerted");
        Ok(0)
    } else if stored == total {
        println!("\ndemo FAILED: the recalibrated sensor raised no drift alert at the hub");
        Ok(1)
    } else {
        println!("\ndemo FAILED: {stored} of {total} predictions reached the hub");
        Ok(1)
    }
}
