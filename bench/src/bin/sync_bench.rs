//! The data path's speed, with the real binaries and a real broker.
//!
//! `write`: readings stream into a real `lathe` agent (QoS 1, 256 rows per message) while it
//! syncs to a real `lathe-hub serve` through Mosquitto; it prints how many predictions a second
//! become durable in the outbox (each published live only after that) and how many a second
//! the hub stores.
//!
//! `drain`: an outbox prefilled with a backlog of predictions (records as the agent writes
//! them) is drained by a real agent through Mosquitto to the hub, acks included; it prints the
//! records per second and the agent's peak RSS while draining.
//!
//! `rollout`: a bundle of `--mib` MiB (the fixture model padded with an unused initializer) is
//! deployed to a real agent through Mosquitto: retained chunks and a signed desired state, then
//! the agent's fetch, check and activation. In the same run, `mosquitto_pub` sends the same
//! bytes as one message to a `mosquitto_sub`. It prints both times, their ratio, the agent's
//! peak RSS and the time from the fetched bundle to the new model running.
//!
//! Usage: lathe-sync-bench --bin-dir DIR write [--secs S] [--rate ROWS_PER_SEC ...]
//!        lathe-sync-bench --bin-dir DIR drain [--records N ...]
//!        lathe-sync-bench --bin-dir DIR rollout [--mib M]
//! `bench/sync.sh` builds the binaries and runs both.

use anyhow::{bail, Context, Result};
use lathe::store::{Limits, NewRecord, Store};
use protocol::keys::SigningKey;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MODEL: &[u8] = include_bytes!("../../../fixtures/models/vibration_logreg.onnx");
const CASES: &str = include_str!("../../../fixtures/models/vibration_logreg.cases.json");

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16) -> Result<()> {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on {port}")
}

fn mosquitto(dir: &Path) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("user root\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\nmax_inflight_messages 1000\nset_tcp_nodelay true\nlistener {port} 127.0.0.1\n"),
    )?;
    let p = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("mosquitto")?;
    wait_port(port)?;
    Ok((Proc(p), port))
}

fn hub(bins: &Path, dir: &Path, port: u16) -> Result<Proc> {
    let p = Command::new(bins.join("lathe-hub"))
        .args(["serve", "--broker", &format!("127.0.0.1:{port}"), "--db"])
        .arg(dir.join("hub.db"))
        .env("LATHE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("lathe-hub")?;
    Ok(Proc(p))
}

fn agent_config(dir: &Path, port: u16, extra: &str) -> Result<PathBuf> {
    let key = SigningKey::from_seed(&[7; 32]);
    std::fs::write(dir.join("trust.keys"), format!("{}\n", key.public_key().to_text()))?;
    let config = dir.join("lathe.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nfleet = \"bench\"\nid = \"d1\"\nstate_dir = \"{}\"\n[broker]\nhost = \"127.0.0.1\"\nport = {port}\n\
             backoff_initial_ms = 100\nbackoff_max_ms = 500\n[trust]\nkeys_file = \"{}\"\n[health]\ninterval_secs = 3600\n[rollout.watch]\nsecs = 0\n{extra}",
            dir.join("state").display(),
            dir.join("trust.keys").display()
        ),
    )?;
    Ok(config)
}

fn agent(bins: &Path, config: &Path) -> Result<Proc> {
    let p = Command::new(bins.join("lathe"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .env(
            "LATHE_LOG",
            std::env::var("LATHE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .context("lathe")?;
    Ok(Proc(p))
}

/// (depth of the outbox, predictions assigned) from the agent's database, read-only.
fn outbox(db: &Path) -> Option<(u64, u64)> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    c.query_row(
        "SELECT (SELECT sum(depth) FROM streams), (SELECT next_seq - 1 FROM streams WHERE stream = 'predictions')",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .ok()
}

fn hub_count(db: &Path) -> u64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row(
                "SELECT count(*) FROM records WHERE stream = 'predictions' AND data IS NOT NULL",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .map(|n| n as u64)
        .unwrap_or(0)
}

/// (current RSS, peak RSS) of a process in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A prediction record as the agent writes it.
fn prediction(i: u64) -> String {
    format!(
        r#"{{"ts_ms":{},"model":{{"name":"bearing","version":3}},"source":"sensors/press-7/features","reading_id":{i},"outputs":{{"label":[1],"probabilities":[0.{:04},0.{:04}]}}}}"#,
        1_764_000_000_000u64 + i * 100,
        i % 10_000,
        9_999 - i % 10_000
    )
}

fn drain(bins: &Path, records: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = agent_config(
        dir.path(),
        1,
        &std::env::var("LATHE_BENCH_CONFIG")
            .unwrap_or_default()
            .replace("\\n", "\n"),
    )?;
    std::fs::create_dir_all(dir.path().join("state"))?;
    let db = dir.path().join("state/lathe.db");
    {
        let mut store = Store::open(&db)?;
        let limits = Limits {
            max_records: u64::MAX,
            max_bytes: u64::MAX,
            max_record_bytes: 1 << 20,
            min_free_bytes: 0,
            when_full: lathe::config::WhenFull::DropNewest,
        };
        let mut i = 0;
        while i < records {
            let n = (records - i).min(50_000);
            let batch: Vec<NewRecord> = (i..i + n)
                .map(|k| NewRecord {
                    stream: protocol::streams::PREDICTIONS,
                    ts_ms: 1_764_000_000_000 + k,
                    data: prediction(k),
                })
                .collect();
            store.append(&batch, &[], limits, None)?;
            i += n;
        }
    }
    let bytes = std::fs::metadata(&db)?.len();
    let (_broker, port) = mosquitto(dir.path())?;
    let config_text = std::fs::read_to_string(&config)?.replace("port = 1\n", &format!("port = {port}\n"));
    std::fs::write(&config, config_text)?;
    let _hub = hub(bins, dir.path(), port)?;
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    let agent = agent(bins, &config)?;
    let pid = agent.0.id();
    let mut peak = 0;
    let mut rss_at = vec![];
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let (rss, hwm) = rss_kib(pid);
        peak = peak.max(hwm);
        let depth = outbox(&db).map_or(u64::MAX, |o| o.0);
        rss_at.push((start.elapsed().as_secs_f64(), rss, depth));
        if depth == 0 && hub_count(&dir.path().join("hub.db")) >= records {
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!("the backlog did not drain in 10 minutes (depth {depth})");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let rss: Vec<String> = rss_at
        .iter()
        .step_by((rss_at.len() / 6).max(1))
        .map(|(t, r, d)| format!("{t:.1}s {:.1} MiB (depth {d})", *r as f64 / 1024.0))
        .collect();
    println!(
        "drain {records:>9} records ({:.0} MiB outbox): {secs:6.2} s, {:>8.0} records/s (agent start and acks included); agent peak RSS {:.1} MiB",
        bytes as f64 / (1u64 << 20) as f64,
        records as f64 / secs,
        peak as f64 / 1024.0
    );
    println!("    RSS while draining: {}", rss.join(", "));
    Ok(())
}

fn write(bins: &Path, secs: u64, rates: Vec<u64>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_broker, port) = mosquitto(dir.path())?;
    let config = agent_config(
        dir.path(),
        port,
        "[inputs]\ntopics = [\"sensors/d1\"]\nqos = 1\nqueue = 4096\nqueue_bytes = 67108864\n[predictions]\npublish = true\n\
         [outbox]\nmax_records = 100000000\nmax_bytes = 68719476736\n",
    )?;
    let _hub = hub(bins, dir.path(), port)?;
    let _agent = agent(bins, &config)?;
    // Deploy the fixture model, signed with the key the agent trusts.
    let key = SigningKey::from_seed(&[7; 32]);
    let cases: serde_json::Value = serde_json::from_str(CASES)?;
    let features: Vec<String> = serde_json::from_value(cases["features"].clone())?;
    let rows: Vec<Vec<f64>> = serde_json::from_value(cases["rows"].clone())?;
    let now = lathe_hub::ops::now_secs();
    let (bundle, _) = lathe_hub::ops::pack(
        lathe_hub::ops::PackInput {
            shapes: vec![],
            image: None,
            name: "bearing".into(),
            version: 1,
            model: MODEL.to_vec(),
            features: features.clone(),
            selftest: None,
            baseline: None,
            baseline_bins: protocol::baseline::DEFAULT_BINS,
            created: now,
            expires: now + 3600,
        },
        &[&key],
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let code = deploy(&rt, port, &bundle, &key, Duration::from_secs(30))?;
    anyhow::ensure!(code == 0, "deploy refused");
    // Readings of 256 rows each, at QoS 1, as fast as the broker takes them.
    let message: Vec<u8> = {
        let arr: Vec<serde_json::Value> = (0..256)
            .map(|i| {
                let mut o = serde_json::Map::new();
                for (f, v) in features.iter().zip(&rows[i % rows.len()]) {
                    o.insert(f.clone(), serde_json::json!(v));
                }
                o.insert("id".into(), serde_json::json!(i));
                serde_json::Value::Object(o)
            })
            .collect();
        serde_json::to_vec(&arr)?
    };
    let live = Arc::new(AtomicU64::new(0));
    {
        let mut opts = MqttOptions::new("bench-live", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        let (c, mut conn) = Client::new(opts, 100);
        let l = live.clone();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c.subscribe("lathe/v1/bench/d1/pred", QoS::AtMostOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        l.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => return,
                    _ => {}
                }
            }
        });
    }
    let db = dir.path().join("state/lathe.db");
    let hub_db = dir.path().join("hub.db");
    let mut opts = MqttOptions::new("bench-sensor", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(64);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (sensor, mut conn) = Client::new(opts, 64);
    std::thread::spawn(move || for _ in conn.iter() {});
    // At each offered rate (rows a second; 0: as fast as the broker takes them), for `secs`.
    for rate in rates {
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = {
            let (stop, c, message) = (stop.clone(), sensor.clone(), message.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if c.publish("sensors/d1", QoS::AtLeastOnce, false, message.clone())
                        .is_err()
                    {
                        return;
                    }
                    sent += 256;
                    if rate > 0 {
                        let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_secs(2));
        let sample = || {
            let o = outbox(&db).unwrap_or((0, 0));
            (
                o.1,
                o.0,
                hub_count(&hub_db),
                live.load(Ordering::Relaxed),
                Instant::now(),
            )
        };
        let (a0, d0, h0, l0, t0) = sample();
        std::thread::sleep(Duration::from_secs(secs));
        let (a1, d1, h1, l1, t1) = sample();
        stop.store(true, Ordering::Relaxed);
        let _ = publisher.join();
        let dt = (t1 - t0).as_secs_f64();
        let offered = if rate > 0 {
            format!("{rate:>7}/s")
        } else {
            "    max".to_string()
        };
        println!(
            "write at {offered} offered: {:>8.0} predictions/s durable in the outbox, {:>8.0}/s stored at the hub, {:>8.0}/s seen live; outbox {d0} -> {d1} waiting",
            (a1 - a0) as f64 / dt,
            (h1 - h0) as f64 / dt,
            (l1 - l0) as f64 / dt
        );
        // Let the outbox drain before the next rate.
        let drained = Instant::now();
        while outbox(&db).map_or(0, |o| o.0) > 1000 && drained.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// Deploy a bundle of about `mib` MiB to an agent through Mosquitto, against mosquitto_pub of
/// the same bytes to mosquitto_sub, in the same run.
fn rollout(bins: &Path, mib: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_broker, port) = mosquitto(dir.path())?;
    let key = SigningKey::from_seed(&[7; 32]);
    let cases: serde_json::Value = serde_json::from_str(CASES)?;
    let features: Vec<String> = serde_json::from_value(cases["features"].clone())?;
    let now = lathe_hub::ops::now_secs();
    let (bundle, _) = lathe_hub::ops::pack(
        lathe_hub::ops::PackInput {
            shapes: vec![],
            image: None,
            name: "bearing".into(),
            version: 1,
            model: lathe_e2e::padded_model(MODEL, mib << 20),
            features,
            selftest: None,
            baseline: None,
            baseline_bins: protocol::baseline::DEFAULT_BINS,
            created: now,
            expires: now + 3600,
        },
        &[&key],
    )?;
    let path = dir.path().join("bundle.lbundle");
    std::fs::write(&path, &bundle)?;
    println!("bundle: {} bytes", bundle.len());

    // The peer: one message of the same bytes, QoS 1, mosquitto_pub to mosquitto_sub.
    let mut raw = vec![];
    for _ in 0..3 {
        let out = dir.path().join("received");
        let mut sub = Command::new("mosquitto_sub")
            .args(["-p", &port.to_string(), "-t", "raw/bundle", "-q", "1", "-C", "1", "-N"])
            .stdout(std::fs::File::create(&out)?)
            .spawn()
            .context("mosquitto_sub")?;
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let status = Command::new("mosquitto_pub")
            .args(["-p", &port.to_string(), "-t", "raw/bundle", "-q", "1", "-f"])
            .arg(&path)
            .status()
            .context("mosquitto_pub")?;
        anyhow::ensure!(status.success(), "mosquitto_pub failed");
        sub.wait()?;
        raw.push(t.elapsed());
        anyhow::ensure!(
            std::fs::metadata(&out)?.len() == bundle.len() as u64,
            "mosquitto_sub got another size"
        );
    }
    raw.sort();
    let raw = raw[1];

    let config = agent_config(dir.path(), port, "")?;
    let agent = agent(bins, &config)?;
    let pid = agent.0.id();
    // Timestamps of the reported states.
    let seen: Arc<std::sync::Mutex<Vec<(Instant, serde_json::Value)>>> = Arc::default();
    // The agent's RSS while it fetches, sampled every 10 ms until the activation begins.
    let fetch_peak = Arc::new(AtomicU64::new(0));
    let fetching = Arc::new(AtomicBool::new(true));
    {
        let (peak, on) = (fetch_peak.clone(), fetching.clone());
        std::thread::spawn(move || {
            while on.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid).0, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    }
    {
        let fetching = fetching.clone();
        let mut opts = MqttOptions::new("bench-reported", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (c, mut conn) = Client::new(opts, 100);
        let seen = seen.clone();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c.subscribe("lathe/v1/bench/d1/reported", QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                        if v["phase"] == "activating" {
                            fetching.store(false, Ordering::Relaxed);
                        }
                        seen.lock().expect("lock").push((Instant::now(), v));
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    let rt = tokio::runtime::Runtime::new()?;
    let t = Instant::now();
    let code = deploy(&rt, port, &bundle, &key, Duration::from_secs(600))?;
    let total = t.elapsed();
    anyhow::ensure!(code == 0, "the deploy failed");
    std::thread::sleep(Duration::from_millis(300));
    let seen = seen.lock().expect("lock");
    let at = |phase: &str| seen.iter().find(|(_, v)| v["phase"] == phase).map(|(i, _)| *i);
    let activating = at("activating").context("no report of the activation")?;
    let done = seen
        .iter()
        .find(|(_, v)| v["phase"] == "idle" && v["active"]["version"] == 1)
        .map(|(i, _)| *i)
        .context("no report of the new model")?;
    let fetched = activating.duration_since(t);
    let (_, peak) = rss_kib(pid);
    println!(
        "mosquitto_pub -> mosquitto_sub, one message: {:.3} s (median of 3)",
        raw.as_secs_f64()
    );
    println!(
        "lathe-hub deploy -> agent, chunks of 64 KiB, upload and fetch: {:.3} s ({:.2}x the raw transfer)",
        fetched.as_secs_f64(),
        fetched.as_secs_f64() / raw.as_secs_f64()
    );
    println!(
        "activation (verify, load, self-check, switch): {:.3} s; deploy to running in all: {:.3} s",
        done.duration_since(activating).as_secs_f64(),
        total.as_secs_f64()
    );
    println!(
        "agent RSS while fetching: at most {} MiB; peak over the whole run (activation included): {} MiB",
        fetch_peak.load(Ordering::Relaxed) / 1024,
        peak / 1024
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut bins = None;
    let mut cmd = None;
    let mut secs = 10;
    let mut records = vec![];
    let mut rates = vec![];
    let mut mib = 50;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--bin-dir" => {
                bins = args.get(i + 1).map(PathBuf::from);
                i += 1;
            }
            "--secs" => {
                secs = args.get(i + 1).context("--secs takes seconds")?.parse()?;
                i += 1;
            }
            "--rate" => {
                rates.push(args.get(i + 1).context("--rate takes rows a second (0: as fast as possible)")?.parse()?);
                i += 1;
            }
            "--records" => {
                records.push(args.get(i + 1).context("--records takes a count")?.parse()?);
                i += 1;
            }
            "--mib" => {
                mib = args.get(i + 1).context("--mib takes a size")?.parse()?;
                i += 1;
            }
            c @ ("write" | "drain" | "rollout") => cmd = Some(c.to_string()),
            other => bail!("unknown argument {other:?}; usage: lathe-sync-bench --bin-dir DIR write|drain [--secs S] [--records N ...]"),
        }
        i += 1;
    }
    let bins = bins.context("--bin-dir DIR (where lathe and lathe-hub are) is required")?;
    match cmd.as_deref() {
        Some("write") => {
            if rates.is_empty() {
                rates = vec![25_000, 50_000, 75_000, 100_000, 0];
            }
            write(&bins, secs, rates)
        }
        Some("drain") => {
            if records.is_empty() {
                records = vec![100_000, 1_000_000];
            }
            for n in records {
                drain(&bins, n)?;
            }
            Ok(())
        }
        Some("rollout") => rollout(&bins, mib),
        _ => bail!("give write, drain or rollout"),
    }
}

/// `lathe-hub deploy` of `bundle` to the bench's one device, waiting up to `timeout`; the exit
/// code.
fn deploy(
    rt: &tokio::runtime::Runtime,
    port: u16,
    bundle: &[u8],
    key: &protocol::keys::SigningKey,
    timeout: Duration,
) -> Result<u8> {
    let device = protocol::Name::new("d1")?;
    rt.block_on(lathe_hub::rollout::run(lathe_hub::rollout::Run {
        broker: lathe::config::BrokerConfig::new("127.0.0.1", port),
        plan: lathe_hub::rollout::Plan {
            fleet: protocol::Name::new("bench")?,
            devices: vec![device.clone()],
            group: None,
            bundle,
            keys: vec![key],
            chunk_bytes: protocol::rollout::DEFAULT_CHUNK_BYTES,
            expires_in_secs: 3600,
            rollback: false,
            slot: None,
        },
        wait_for: vec![device],
        timeout,
        canary: None,
    }))
}
