//! Helpers for the end-to-end tests: the real binaries, real Mosquitto brokers on free ports,
//! and child processes that are stopped when a test ends, pass or fail.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Build `lathe` and `lathe-hub` once per test run and return their paths.
pub fn bins() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "lathe", "-p", "lathe-hub"])
            .current_dir(repo_root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
        // target/debug/deps/e2e-… -> target/debug
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
        (dir.join("lathe"), dir.join("lathe-hub"))
    })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A child process killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.into(),
            child,
        }
    }

    /// SIGTERM, then wait up to `timeout`; SIGKILL after that. Returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Mosquitto broker of our own on a free port; it can be stopped and started again.
pub struct Mosquitto {
    pub port: u16,
    conf: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Mosquitto {
    pub fn start(dir: &Path, name: &str) -> Mosquitto {
        Self::start_with(dir, name, "")
    }

    /// Start with extra configuration lines (more listeners, TLS) after the plain listener.
    pub fn start_with(dir: &Path, name: &str, extra: &str) -> Mosquitto {
        Self::start_conf(dir, name, &format!("allow_anonymous true\n{extra}"))
    }

    /// Start with these settings (authentication, ACLs, listeners) besides the plain listener.
    pub fn start_conf(dir: &Path, name: &str, settings: &str) -> Mosquitto {
        let port = free_port();
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(
            &conf,
            format!(
                // `user root`: when started as root, Mosquitto would otherwise switch to its own
                // user, which cannot read the test's private temporary directory.
                "user root\nper_listener_settings false\npersistence false\nmax_queued_messages 100000\nset_tcp_nodelay true\nlistener {port} 127.0.0.1\n{settings}"
            ),
        )
        .expect("write mosquitto.conf");
        let log = dir.join(format!("{name}.log"));
        let mut m = Mosquitto {
            port,
            conf,
            log,
            proc: None,
        };
        m.up();
        m
    }

    pub fn up(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("mosquitto log");
        let p = Proc::spawn(
            "mosquitto",
            Command::new("mosquitto")
                .arg("-c")
                .arg(&self.conf)
                .stdout(Stdio::null())
                .stderr(log),
        );
        self.proc = Some(p);
        assert!(
            wait_for_port(self.port, Duration::from_secs(10)),
            "mosquitto did not listen on {}:\n{}",
            self.port,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Kill the broker outright, as a crash or power cut would.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// Run a command to completion; return (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("command runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Poll `f` until it returns Some or the timeout passes.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fleet on this machine for end-to-end tests: a hub broker and a sensor broker (real
/// Mosquitto), a signing key and its trust store, a signed bundle of the fixture model, and
/// helpers to run `lathe-hub` and `lathe` agents against them.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub hub_broker: Mosquitto,
    pub sensor_broker: Mosquitto,
    pub hub_db: PathBuf,
    /// Bundle of the fixture model, version 1.
    pub bundle: PathBuf,
    /// Extra `lathe-hub` arguments for the hub broker (credentials).
    pub hub_args: Vec<String>,
}

/// One agent's files.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub config: PathBuf,
    pub state_dir: PathBuf,
}

pub const FLEET: &str = "plant1";

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("fixtures/models").join(name)
}

/// `lathe-hub` with quiet logs.
pub fn hub_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(&bins().1);
    c.args(args).env("LATHE_LOG", "warn");
    c
}

/// The base agent configuration, section by section; `overrides` replace or add `key = value`
/// lines, as `("sync", "window = 1")`, or add sections.
fn agent_toml(sections: &[(&str, String)], overrides: &[(&str, &str)]) -> String {
    let mut out: Vec<(String, Vec<String>)> = sections
        .iter()
        .map(|(s, body)| (s.to_string(), body.lines().map(str::to_string).collect()))
        .collect();
    for (section, line) in overrides {
        let key = line.split('=').next().unwrap_or("").trim().to_string();
        let lines = match out.iter_mut().find(|(s, _)| s == section) {
            Some((_, l)) => l,
            None => {
                out.push((section.to_string(), vec![]));
                &mut out.last_mut().expect("pushed").1
            }
        };
        lines.retain(|l| l.split('=').next().unwrap_or("").trim() != key);
        lines.push(line.to_string());
    }
    out.into_iter()
        .map(|(s, l)| format!("[{s}]\n{}\n", l.join("\n")))
        .collect()
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    pub fn new() -> Fleet {
        Self::with_hub_broker(|dir| Mosquitto::start(dir, "hub-broker"))
    }

    /// A fleet whose hub broker is made by `broker` (for authentication and ACLs).
    pub fn with_hub_broker(broker: impl FnOnce(&Path) -> Mosquitto) -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub_broker = broker(dir.path());
        let sensor_broker = Mosquitto::start(dir.path(), "sensor-broker");
        let d = dir.path().to_str().expect("utf8 path").to_string();
        let (code, out, err) = run(&mut hub_cmd(&["keygen", "--out-dir", &d, "--name", "k1"]));
        assert_eq!(code, 0, "keygen: {out}{err}");
        std::fs::copy(dir.path().join("k1.pub"), dir.path().join("trust.keys")).expect("trust.keys");
        let hub_db = dir.path().join("hub.db");
        let mut f = Fleet {
            dir,
            hub_broker,
            sensor_broker,
            hub_db,
            bundle: PathBuf::new(),
            hub_args: vec![],
        };
        f.bundle = f.pack(1);
        f
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Pack the fixture model as `bearing` at `version`, signed with k1.
    pub fn pack(&self, version: u64) -> PathBuf {
        let features = cases().features.join(",");
        let (code, out, bundle) =
            self.pack_model(&fixture("vibration_logreg.onnx"), "bearing", version, &features, &[]);
        assert_eq!(code, 0, "pack: {out}");
        bundle
    }

    /// `lathe-hub bundle pack` of `model` as `name` at `version` with `features` (comma
    /// separated; none packs a tensor model), signed with k1, into `<name>-<version>.lbundle`, with `extra` arguments;
    /// (exit code, output, bundle path).
    pub fn pack_model(
        &self,
        model: &Path,
        name: &str,
        version: u64,
        features: &str,
        extra: &[&str],
    ) -> (i32, String, PathBuf) {
        let bundle = self.path().join(format!("{name}-{version}.lbundle"));
        let version = version.to_string();
        let (model, key) = (model.to_str().expect("utf8"), self.path().join("k1.key"));
        let mut args = vec![
            "bundle",
            "pack",
            "--model",
            model,
            "--name",
            name,
            "--version",
            &version,
            "--key",
            key.to_str().expect("utf8"),
            "--out",
            bundle.to_str().expect("utf8"),
        ];
        if !features.is_empty() {
            args.extend_from_slice(&["--features", features]);
        }
        args.extend_from_slice(extra);
        let (code, out, err) = run(&mut hub_cmd(&args));
        (code, format!("{out}{err}"), bundle)
    }

    /// Write an agent config for `id`: the hub link on `hub_port` (the hub broker, or a proxy
    /// in front of it), readings from the sensor broker at QoS 1, fast sync timings.
    pub fn device(&self, id: &str, hub_port: u16, overrides: &[(&str, &str)]) -> Device {
        let state_dir = self.path().join(format!("{id}-state"));
        let config = self.path().join(format!("{id}.toml"));
        let sections = [
            (
                "device",
                format!("fleet = \"{FLEET}\"\nid = \"{id}\"\nstate_dir = \"{}\"", state_dir.display()),
            ),
            (
                "broker",
                format!("host = \"127.0.0.1\"\nport = {hub_port}\nkeep_alive_secs = 5\nbackoff_initial_ms = 100\nbackoff_max_ms = 1000"),
            ),
            ("inputs", format!("topics = [\"sensors/{id}/features\"]\nqos = 1")),
            (
                "inputs.broker",
                format!("host = \"127.0.0.1\"\nport = {}\nkeep_alive_secs = 5\nbackoff_initial_ms = 100\nbackoff_max_ms = 1000", self.sensor_broker.port),
            ),
            ("trust", format!("keys_file = \"{}/trust.keys\"", self.path().display())),
            ("sync", "interval_ms = 100\nack_timeout_ms = 2000\nbatch_records = 50".to_string()),
            ("health", "interval_secs = 1".to_string()),
            // Models are committed at activation unless a test watches them.
            ("rollout.watch", "secs = 0".to_string()),
        ];
        std::fs::write(&config, agent_toml(&sections, overrides)).expect("write config");
        Device {
            id: id.to_string(),
            config,
            state_dir,
        }
    }

    /// `lathe-hub serve` on the hub broker, storing into `hub_db`.
    pub fn hub(&self) -> Proc {
        self.hub_with(&[])
    }

    pub fn hub_with(&self, extra: &[&str]) -> Proc {
        let port = format!("127.0.0.1:{}", self.hub_broker.port);
        let mut args = vec!["serve", "--broker", &port, "--db", self.hub_db.to_str().expect("utf8")];
        args.extend(self.hub_args.iter().map(String::as_str));
        args.extend_from_slice(extra);
        Proc::spawn("lathe-hub serve", hub_cmd(&args).stdout(Stdio::null()))
    }

    /// `lathe run` for `d` with its default log settings, its log written to `log`.
    pub fn agent_logging_to(&self, d: &Device, log: &Path) -> Proc {
        Proc::spawn(
            &format!("lathe run ({})", d.id),
            Command::new(&bins().0)
                .arg("run")
                .arg("--config")
                .arg(&d.config)
                .env_remove("LATHE_LOG")
                .env_remove("RUST_LOG")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).expect("log file")),
        )
    }

    pub fn agent(&self, d: &Device) -> Proc {
        Proc::spawn(
            &format!("lathe run ({})", d.id),
            Command::new(&bins().0)
                .arg("run")
                .arg("--config")
                .arg(&d.config)
                .env("LATHE_LOG", "info,rumqttc=warn"),
        )
    }

    /// Deploy a bundle through the hub broker, signed with k1; (exit code, output).
    pub fn deploy(&self, d: &Device, bundle: &Path) -> (i32, String) {
        self.rollout(d, "deploy", bundle)
    }

    /// `lathe-hub deploy` or `rollback` of `bundle` to one device, the desired state signed with
    /// k1; (exit code, output).
    pub fn rollout(&self, d: &Device, op: &str, bundle: &Path) -> (i32, String) {
        let key = self.path().join("k1.key");
        self.command(
            d,
            &[
                op,
                "--bundle",
                bundle.to_str().expect("utf8"),
                "--key",
                key.to_str().expect("utf8"),
            ],
        )
    }

    /// A `lathe-hub` command to one device (`deploy …`, `rollback …`); (exit code, output).
    pub fn command(&self, d: &Device, args: &[&str]) -> (i32, String) {
        let port = format!("127.0.0.1:{}", self.hub_broker.port);
        let mut all = vec![
            args[0],
            "--broker",
            &port,
            "--fleet",
            FLEET,
            "--device",
            &d.id,
            "--timeout-secs",
            "30",
        ];
        all.extend(self.hub_args.iter().map(String::as_str));
        all.extend_from_slice(&args[1..]);
        let (code, out, err) = run(&mut hub_cmd(&all));
        (code, format!("{out}{err}"))
    }

    /// `lathe-hub audit --json` of the hub's store.
    pub fn audit(&self) -> (i32, serde_json::Value) {
        let (code, out, err) = run(&mut hub_cmd(&[
            "audit",
            "--json",
            "--db",
            self.hub_db.to_str().expect("utf8"),
        ]));
        let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("audit is not JSON ({e}): {out}{err}"));
        (code, v)
    }
}

/// `lathe status --json` of a device; (exit code, report). Waits up to 20 s for the agent to
/// have created its database.
pub fn status(d: &Device) -> (i32, serde_json::Value) {
    let mut last = String::new();
    let got = eventually(Duration::from_secs(20), || {
        let (code, out, err) = run(Command::new(&bins().0)
            .args(["status", "--json", "--config"])
            .arg(&d.config));
        match serde_json::from_str(&out) {
            Ok(v) => Some((code, v)),
            Err(e) => {
                last = format!("status --json is not JSON ({e}): {out}{err}");
                None
            }
        }
    });
    got.unwrap_or_else(|| panic!("{last}"))
}

/// Every record of a stream stored at the hub (copies of moved records excluded), as its
/// data text.
pub fn hub_records(db: &Path, stream: &str) -> Vec<String> {
    let Ok(conn) = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return vec![];
    };
    let Ok(mut st) = conn.prepare("SELECT data FROM records WHERE stream = ?1 AND data IS NOT NULL") else {
        return vec![];
    };
    let Ok(rows) = st.query_map([stream], |r| r.get::<_, String>(0)) else {
        return vec![];
    };
    rows.filter_map(|r| r.ok()).collect()
}

/// Predictions stored at the hub, by reading id.
pub fn hub_predictions(db: &Path) -> Vec<(i64, serde_json::Value)> {
    hub_records(db, "predictions")
        .iter()
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| Some((v["reading_id"].as_i64()?, v)))
        .collect()
}

/// Subscribe on a broker and forward (topic, payload) of every publish.
pub fn watch(port: u16, filter: &str, name: &str) -> std::sync::mpsc::Receiver<(String, Vec<u8>)> {
    watch_as(port, filter, name, None)
}

/// `watch`, with a username and password.
pub fn watch_as(
    port: u16,
    filter: &str,
    name: &str,
    login: Option<(&str, &str)>,
) -> std::sync::mpsc::Receiver<(String, Vec<u8>)> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(name, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(256 << 20, 256 << 20);
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (client, mut conn) = Client::new(opts, 100);
    let (tx, rx) = std::sync::mpsc::channel();
    let filter = filter.to_string();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    rx
}

/// Wait until `device` publishes its retained birth message on the hub broker.
pub fn wait_online(port: u16, device: &str) {
    let rx = watch(
        port,
        &format!("lathe/v1/{FLEET}/{device}/state"),
        &format!("state-watch-{device}-{}", free_port()),
    );
    let online = eventually(Duration::from_secs(30), || {
        let (_, p) = rx.recv_timeout(Duration::from_millis(200)).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&p).ok()?;
        (v["status"] == "online").then_some(())
    });
    assert!(online.is_some(), "{device} never published its birth message");
}

/// The fixture model's test rows, features and onnxruntime's outputs.
pub struct Cases {
    pub features: Vec<String>,
    pub rows: Vec<Vec<f64>>,
    pub expected: Vec<std::collections::BTreeMap<String, Vec<f64>>>,
}

pub fn cases() -> Cases {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("vibration_logreg.cases.json")).expect("cases")).expect("json");
    Cases {
        features: serde_json::from_value(v["features"].clone()).expect("features"),
        rows: serde_json::from_value(v["rows"].clone()).expect("rows"),
        expected: serde_json::from_value(v["expected"].clone()).expect("expected"),
    }
}

/// A reading of the fixture's row `id % rows` with `id` as its id.
pub fn reading(c: &Cases, id: i64) -> Vec<u8> {
    let row = &c.rows[id.unsigned_abs() as usize % c.rows.len()];
    let mut o = serde_json::Map::new();
    for (f, v) in c.features.iter().zip(row) {
        o.insert(f.clone(), serde_json::Value::from(*v));
    }
    o.insert("id".into(), serde_json::Value::from(id));
    serde_json::to_vec(&o).expect("json")
}

/// A sensor publishing readings at QoS 1 to the sensor broker; it counts the readings the
/// broker acknowledged.
pub struct Sensor {
    pub client: rumqttc::Client,
    pub acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub topic: String,
}

impl Sensor {
    pub fn new(port: u16, device: &str) -> Sensor {
        use rumqttc::{Client, Event, MqttOptions, Packet};
        let mut opts = MqttOptions::new(format!("sensor-{device}-{}", free_port()), "127.0.0.1", port);
        // Long enough that a busy machine does not drop the connection (and send again what
        // the broker had not acked) in the middle of a flood.
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(256 << 20, 256 << 20);
        let (client, mut conn) = Client::new(opts, 10_000);
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let a = acked.clone();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        Sensor {
            client,
            acked,
            topic: format!("sensors/{device}/features"),
        }
    }

    pub fn send(&self, payload: Vec<u8>) {
        self.client
            .publish(self.topic.clone(), rumqttc::QoS::AtLeastOnce, false, payload)
            .expect("queue a reading");
    }

    /// Send readings `from..to`, `pause` apart.
    pub fn send_range(&self, c: &Cases, from: i64, to: i64, pause: Duration) {
        for id in from..to {
            self.send(reading(c, id));
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    }

    /// Wait until the broker acknowledged `n` readings in all.
    pub fn wait_acked(&self, n: u64) {
        let ok = eventually(Duration::from_secs(60), || {
            (self.acked.load(std::sync::atomic::Ordering::Relaxed) >= n).then_some(())
        });
        assert!(
            ok.is_some(),
            "the sensor broker acknowledged {} of {n} readings",
            self.acked.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
}

/// Wait until the hub holds a prediction for every reading id in `ids`; returns them all.
pub fn wait_hub_has(db: &Path, ids: impl IntoIterator<Item = i64>, timeout: Duration) -> Vec<(i64, serde_json::Value)> {
    let want: std::collections::BTreeSet<i64> = ids.into_iter().collect();
    let got = eventually(timeout, || {
        let p = hub_predictions(db);
        let have: std::collections::BTreeSet<i64> = p.iter().map(|(i, _)| *i).collect();
        want.is_subset(&have).then_some(p)
    });
    got.unwrap_or_else(|| {
        let have: std::collections::BTreeSet<i64> = hub_predictions(db).iter().map(|(i, _)| *i).collect();
        let missing: Vec<&i64> = want.difference(&have).take(20).collect();
        panic!(
            "the hub lacks predictions for {} reading(s), first {missing:?}",
            want.difference(&have).count()
        )
    })
}

/// A link that can be cut the way networks fail: bytes vanish, nothing is closed. Runs the
/// hub's own proxy on a runtime of its own.
pub struct BlackHole {
    pub port: u16,
    proxy: lathe_hub::proxy::Proxy,
    _rt: tokio::runtime::Runtime,
}

impl BlackHole {
    pub fn to(port: u16) -> BlackHole {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let upstream: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let proxy = rt.block_on(lathe_hub::proxy::Proxy::start(upstream)).expect("proxy");
        BlackHole {
            port: proxy.addr.port(),
            proxy,
            _rt: rt,
        }
    }

    pub fn cut(&self) {
        self.proxy.cut();
    }

    pub fn restore(&self) {
        self.proxy.restore();
    }
}

/// A NATS server with JetStream and its MQTT listener, for a broker that refuses
/// subscriptions in its SUBACK (Mosquitto grants them and delivers nothing).
pub struct Nats {
    pub mqtt_port: u16,
    _proc: Proc,
}

impl Nats {
    /// `authorization` is the body of NATS's authorization block.
    pub fn start(dir: &Path, authorization: &str) -> Nats {
        let (port, mqtt_port) = (free_port(), free_port());
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "server_name: lathe_test\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\nmqtt {{ listen: 127.0.0.1:{mqtt_port} }}\nauthorization {{ {authorization} }}\n",
                dir.join("nats-js").display()
            ),
        )
        .expect("nats.conf");
        let log = std::fs::File::create(dir.join("nats.log")).expect("nats log");
        let p = Proc::spawn(
            "nats-server",
            Command::new("nats-server")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(log),
        );
        assert!(
            wait_for_port(mqtt_port, Duration::from_secs(20)),
            "nats-server did not listen for MQTT:\n{}",
            std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default()
        );
        Nats { mqtt_port, _proc: p }
    }
}

/// Protobuf: a varint.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Protobuf: a length-delimited field.
fn field(num: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(num << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// An ONNX `model` with one more, unused, float initializer of `bytes` bytes: a second `graph`
/// field (7), which protobuf merges into the first. A large model that computes as `model` does.
pub fn padded_model(model: &[u8], bytes: usize) -> Vec<u8> {
    let mut tensor = vec![];
    varint(1 << 3, &mut tensor); // dims
    varint((bytes / 4) as u64, &mut tensor);
    varint(2 << 3, &mut tensor); // data_type: FLOAT
    varint(1, &mut tensor);
    field(8, b"padding", &mut tensor);
    let data: Vec<u8> = (0..bytes / 4).flat_map(|i| ((i % 1000) as f32).to_le_bytes()).collect();
    field(9, &data, &mut tensor);
    let mut graph = vec![];
    field(5, &tensor, &mut graph);
    let mut out = model.to_vec();
    field(7, &graph, &mut out);
    out
}
