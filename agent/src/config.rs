//! The agent's configuration file (TOML). Every field, its default and its bounds are listed
//! in README.md; `lathe run` refuses a file with an unknown field or a value out of bounds and
//! names the field.

use protocol::Name;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("config {path}: field {field}: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub device: DeviceConfig,
    pub broker: BrokerConfig,
    #[serde(default)]
    pub inputs: InputsConfig,
    pub trust: TrustConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub predictions: PredictionsConfig,
    #[serde(default)]
    pub health: HealthConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub fleet: String,
    pub id: String,
    /// Where the outbox database and the installed bundles live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/lathe")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Defaults to `lathe-<fleet>-<device>` (with `-sensors` for the sensor connection).
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// The largest MQTT packet sent or received. Deploy commands carry whole bundles.
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    pub tls: Option<TlsConfig>,
}

fn default_port() -> u16 {
    1883
}
fn default_keep_alive() -> u64 {
    30
}
fn default_max_packet() -> usize {
    96 << 20
}
fn default_backoff_initial() -> u64 {
    500
}
fn default_backoff_max() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificates that sign the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate chain and key, for brokers that require client certificates.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputsConfig {
    /// MQTT topic filters that carry readings.
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(default)]
    pub qos: u8,
    /// A separate broker for readings (a local broker on the gateway). Without it, readings
    /// come over `[broker]`.
    pub broker: Option<BrokerConfig>,
    /// Readings waiting for inference; when full, new readings are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// The most rows run through the model in one call.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
}

impl Default for InputsConfig {
    fn default() -> Self {
        InputsConfig {
            topics: vec![],
            qos: 0,
            broker: None,
            queue: default_queue(),
            max_batch: default_max_batch(),
        }
    }
}

fn default_queue() -> usize {
    1024
}
fn default_max_batch() -> usize {
    256
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Trusted public keys, one per line.
    pub keys_file: PathBuf,
    #[serde(default = "default_threshold")]
    pub threshold: usize,
    #[serde(default = "default_max_bundle")]
    pub max_bundle_bytes: usize,
}

fn default_threshold() -> usize {
    1
}
fn default_max_bundle() -> usize {
    64 << 20
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest unsynced records of the stream; the loss is counted and reported.
    DropOldest,
    /// Refuse the new record; the loss is counted and reported.
    DropNewest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    #[serde(default = "default_max_records")]
    pub max_records: u64,
    #[serde(default = "default_when_full")]
    pub when_full: WhenFull,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_records: default_max_records(),
            when_full: default_when_full(),
        }
    }
}

fn default_max_records() -> u64 {
    1_000_000
}
fn default_when_full() -> WhenFull {
    WhenFull::DropOldest
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    #[serde(default = "default_batch_records")]
    pub batch_records: usize,
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_ms: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            batch_records: default_batch_records(),
            batch_bytes: default_batch_bytes(),
            interval_ms: default_interval(),
            ack_timeout_ms: default_ack_timeout(),
        }
    }
}

fn default_batch_records() -> usize {
    500
}
fn default_batch_bytes() -> usize {
    256 << 10
}
fn default_interval() -> u64 {
    1000
}
fn default_ack_timeout() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictionsConfig {
    /// Publish each prediction live on `pred` as well as buffering it for sync.
    #[serde(default = "yes")]
    pub publish: bool,
    #[serde(default)]
    pub qos: u8,
}

impl Default for PredictionsConfig {
    fn default() -> Self {
        PredictionsConfig { publish: true, qos: 0 }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default = "default_health_interval")]
    pub interval_secs: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_secs: default_health_interval(),
        }
    }
}

fn default_health_interval() -> u64 {
    30
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        cfg.validate().map_err(|(field, message)| ConfigError::Field {
            path: path.to_path_buf(),
            field,
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        Name::new(self.device.fleet.clone()).map_err(|e| ("device.fleet".to_string(), e.to_string()))?;
        Name::new(self.device.id.clone()).map_err(|e| ("device.id".to_string(), e.to_string()))?;
        check_broker(&self.broker, "broker")?;
        if let Some(b) = &self.inputs.broker {
            check_broker(b, "inputs.broker")?;
        }
        for t in &self.inputs.topics {
            if t.is_empty() || t.starts_with(protocol::topic::ROOT) {
                return Err((
                    "inputs.topics".to_string(),
                    format!("{t:?} must be a non-empty filter outside {}", protocol::topic::ROOT),
                ));
            }
        }
        range("inputs.qos", self.inputs.qos as u64, 0, 1)?;
        range("inputs.queue", self.inputs.queue as u64, 1, 1 << 20)?;
        range("inputs.max_batch", self.inputs.max_batch as u64, 1, 65_536)?;
        range(
            "trust.threshold",
            self.trust.threshold as u64,
            1,
            protocol::bundle::MAX_SIGNATURES as u64,
        )?;
        range(
            "trust.max_bundle_bytes",
            self.trust.max_bundle_bytes as u64,
            1024,
            1 << 30,
        )?;
        range("outbox.max_records", self.outbox.max_records, 1, 1 << 40)?;
        range("sync.batch_records", self.sync.batch_records as u64, 1, 100_000)?;
        range("sync.batch_bytes", self.sync.batch_bytes as u64, 1024, 64 << 20)?;
        range("sync.interval_ms", self.sync.interval_ms, 10, 3_600_000)?;
        range("sync.ack_timeout_ms", self.sync.ack_timeout_ms, 100, 3_600_000)?;
        range("predictions.qos", self.predictions.qos as u64, 0, 1)?;
        range("health.interval_secs", self.health.interval_secs, 1, 86_400)?;
        if self.sync.batch_bytes + 4096 > self.broker.max_packet_bytes {
            return Err((
                "sync.batch_bytes".to_string(),
                "must be at least 4 KiB below broker.max_packet_bytes".into(),
            ));
        }
        Ok(())
    }

    pub fn fleet(&self) -> Name {
        Name::new(self.device.fleet.clone()).expect("validated at load")
    }

    pub fn device(&self) -> Name {
        Name::new(self.device.id.clone()).expect("validated at load")
    }

    pub fn db_path(&self) -> PathBuf {
        db_path(&self.device.state_dir)
    }

    pub fn bundles_dir(&self) -> PathBuf {
        self.device.state_dir.join("bundles")
    }
}

/// The outbox database inside a state directory.
pub fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join("lathe.db")
}

fn check_broker(b: &BrokerConfig, prefix: &str) -> Result<(), (String, String)> {
    let f = |name: &str| format!("{prefix}.{name}");
    if b.host.is_empty() {
        return Err((f("host"), "must not be empty".into()));
    }
    if b.port == 0 {
        return Err((f("port"), "must be 1 to 65535".into()));
    }
    range(&f("keep_alive_secs"), b.keep_alive_secs, 5, 3600)?;
    range(&f("max_packet_bytes"), b.max_packet_bytes as u64, 16 << 10, 256 << 20)?;
    if b.backoff_initial_ms == 0 || b.backoff_initial_ms > b.backoff_max_ms || b.backoff_max_ms > 3_600_000 {
        return Err((
            f("backoff_max_ms"),
            "need 0 < backoff_initial_ms <= backoff_max_ms <= 3600000".into(),
        ));
    }
    if let Some(t) = &b.tls {
        if t.cert_file.is_some() != t.key_file.is_some() {
            return Err((f("tls.key_file"), "cert_file and key_file go together".into()));
        }
    }
    Ok(())
}

fn range(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), (String, String)> {
    if v < lo || v > hi {
        Err((field.to_string(), format!("{v} is out of range {lo}..={hi}")))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[device]
fleet = "plant1"
id = "press-7"
[broker]
host = "127.0.0.1"
[trust]
keys_file = "/etc/lathe/trust.keys"
"#;

    fn check(extra: &str, expected: Result<(), &str>) {
        let text = format!("{MINIMAL}{extra}");
        match (Config::parse(&text, Path::new("t.toml")), expected) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{e} does not mention {want}"),
            (got, want) => panic!("{extra}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn defaults_and_errors_name_the_field() {
        let c = Config::parse(MINIMAL, Path::new("t.toml")).expect("minimal config");
        assert_eq!(c.broker.port, 1883);
        assert_eq!(c.sync.batch_records, 500);
        assert_eq!(c.outbox.when_full, WhenFull::DropOldest);
        assert_eq!(c.device.state_dir, PathBuf::from("/var/lib/lathe"));
        check("", Ok(()));
        check("[sync]\nbatch_records = 0\n", Err("sync.batch_records"));
        check("[outbox]\nwhen_full = \"explode\"\n", Err("when_full"));
        check("[health]\ninterval_secs = 0\n", Err("health.interval_secs"));
        check("[inputs]\ntopics = [\"lathe/v1/x\"]\n", Err("inputs.topics"));
        check("[inputs]\nbogus = 1\n", Err("bogus"));
        check("[inputs.broker]\nhost = \"\"\n", Err("inputs.broker.host"));
    }

    #[test]
    fn bad_names_are_refused() {
        let text = MINIMAL.replace("press-7", "press 7");
        let e = Config::parse(&text, Path::new("t.toml")).expect_err("space in id");
        assert!(e.to_string().contains("device.id"), "{e}");
    }
}
