//! The agent's configuration file (TOML). Every field, its default and its bounds are listed
//! in README.md; `lathe run` refuses a file with an unknown field or a value out of bounds and
//! names the field.

use protocol::Name;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    #[serde(default)]
    pub status: StatusConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub drift: DriftConfig,
    #[serde(default)]
    pub samples: SamplesConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub rollout: RolloutConfig,
    /// `[[models]]`: the model slots of a device that runs several models (SPEC §8.8). Without
    /// any, the device has one default slot, fed by `inputs.topics`.
    #[serde(default)]
    pub models: Vec<ModelSlotConfig>,
    #[serde(default)]
    pub api: ApiConfig,
}

/// `[api]`: the local HTTP API (the Open Inference Protocol and Prometheus metrics), off unless
/// `listen` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address and port to serve on, e.g. `127.0.0.1:8080`.
    pub listen: Option<std::net::SocketAddr>,
    /// The largest request body, checked before it is read.
    #[serde(default = "default_api_body")]
    pub max_body_bytes: usize,
    /// Connections served at once; more wait in the kernel's backlog.
    #[serde(default = "default_api_connections")]
    pub max_connections: usize,
    /// How long a kept-alive connection may wait for its next request.
    #[serde(default = "default_api_idle")]
    pub idle_timeout_secs: u64,
    /// How long a request may take to arrive whole and be answered.
    #[serde(default = "default_api_request")]
    pub request_timeout_secs: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: None,
            max_body_bytes: default_api_body(),
            max_connections: default_api_connections(),
            idle_timeout_secs: default_api_idle(),
            request_timeout_secs: default_api_request(),
        }
    }
}

fn default_api_body() -> usize {
    4 << 20
}
fn default_api_connections() -> usize {
    8
}
fn default_api_idle() -> u64 {
    60
}
fn default_api_request() -> u64 {
    30
}

/// One `[[models]]` entry: a model slot, deployed and rolled back on its own, with its own
/// input topics, drift state and rollout state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSlotConfig {
    /// The slot's name: a name as for devices (letters, digits, `-`, `_`, `.`).
    pub slot: String,
    /// MQTT topic filters that carry this slot's readings. A reading that matches the filters
    /// of several slots goes to each.
    #[serde(default)]
    pub topics: Vec<String>,
    /// MQTT topic filters whose readings are binary: raw float32 tensors or images (SPEC §3.7).
    #[serde(default)]
    pub binary_topics: Vec<String>,
}

fn default_max_values() -> usize {
    64
}
fn default_top_k() -> usize {
    5
}

/// `[engine]`: where models run.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// `cpu`, `cuda` or `auto` (the GPU when the build and the box have one).
    #[serde(default)]
    pub device: crate::engine::Device,
}

/// The most model slots a device has.
pub const MAX_SLOTS: usize = 8;

/// A model slot as the agent runs it: the default one (`name` is `None`) or a named one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub name: Option<String>,
    /// Every filter the slot's readings come on: JSON and binary.
    pub topics: Vec<String>,
    /// The filters whose readings are binary.
    pub binary: Vec<String>,
}

/// The key a slot keeps `base` under in the store's meta table: `base` for the default slot,
/// `base/<slot>` for a named one.
pub fn slot_key(base: &str, slot: Option<&str>) -> String {
    match slot {
        Some(s) => format!("{base}/{s}"),
        None => base.to_string(),
    }
}

/// `[rollout]`: how signed desired states are followed and bundles fetched (SPEC §8).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Groups this device belongs to: it follows their desired states too.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Chunks asked for at once.
    #[serde(default = "default_rollout_window")]
    pub window: usize,
    /// A chunk asked for and not received within this is asked for again (3 tries).
    #[serde(default = "default_chunk_timeout")]
    pub chunk_timeout_secs: u64,
    /// A failed transfer is tried again after this.
    #[serde(default = "default_rollout_retry")]
    pub retry_secs: u64,
    /// How a newly activated model is watched before it is committed.
    #[serde(default)]
    pub watch: WatchConfig,
}

/// `[rollout.watch]`: the watch period after an activation (SPEC §8.4). A model that breaks
/// a rule during it is rolled back from; one that keeps to them is committed at its end.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// How long a new model is watched; 0 commits it at activation.
    #[serde(default = "default_watch_secs")]
    pub secs: u64,
    #[serde(default = "default_max_failed_ratio")]
    pub max_failed_ratio: f64,
    #[serde(default)]
    pub max_non_finite_ratio: f64,
    #[serde(default = "default_max_out_of_range_ratio")]
    pub max_out_of_range_ratio: f64,
    /// The share of an output's training span (from the bundle's baseline) it may stray past
    /// it on each side before it counts as out of range.
    #[serde(default = "default_range_margin")]
    pub range_margin: f64,
    /// The slowest an inference call may be at the 99th percentile.
    #[serde(default = "default_max_latency_ms")]
    pub max_latency_ms: u64,
    /// Rows tried before the watch may roll back before the period ends.
    #[serde(default = "default_early_rows")]
    pub early_rows: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            secs: default_watch_secs(),
            max_failed_ratio: default_max_failed_ratio(),
            max_non_finite_ratio: 0.0,
            max_out_of_range_ratio: default_max_out_of_range_ratio(),
            range_margin: default_range_margin(),
            max_latency_ms: default_max_latency_ms(),
            early_rows: default_early_rows(),
        }
    }
}

impl WatchConfig {
    /// The rules, or `None` when models are not watched.
    pub fn rules(&self) -> Option<crate::trial::Rules> {
        (self.secs > 0).then(|| crate::trial::Rules {
            period: Duration::from_secs(self.secs),
            max_failed_ratio: self.max_failed_ratio,
            max_non_finite_ratio: self.max_non_finite_ratio,
            max_out_of_range_ratio: self.max_out_of_range_ratio,
            max_latency: Duration::from_millis(self.max_latency_ms),
            early_rows: self.early_rows,
            range_margin: self.range_margin,
        })
    }
}

fn default_watch_secs() -> u64 {
    60
}
fn default_max_failed_ratio() -> f64 {
    0.01
}
fn default_max_out_of_range_ratio() -> f64 {
    0.1
}
fn default_range_margin() -> f64 {
    crate::trial::DEFAULT_RANGE_MARGIN
}
fn default_max_latency_ms() -> u64 {
    1000
}
fn default_early_rows() -> u64 {
    100
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            groups: vec![],
            window: default_rollout_window(),
            chunk_timeout_secs: default_chunk_timeout(),
            retry_secs: default_rollout_retry(),
            watch: WatchConfig::default(),
        }
    }
}

fn default_rollout_window() -> usize {
    16
}
fn default_chunk_timeout() -> u64 {
    30
}
fn default_rollout_retry() -> u64 {
    60
}

/// The most groups a device belongs to.
pub const MAX_GROUPS: usize = 16;

/// `[drift]`: drift of the active model against the baseline signed into its bundle (SPEC §6).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A window closes after this many rows...
    #[serde(default = "default_window_rows")]
    pub window_rows: u64,
    /// ...or once it is this old and holds at least `min_rows` rows...
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Windows with fewer rows are reported but not judged: too few to tell drift from noise.
    #[serde(default = "default_min_rows")]
    pub min_rows: u64,
    /// ...or when this cron schedule fires (e.g. `"0 6,14,22 * * *"` at each shift change).
    #[serde(default)]
    pub schedule: Option<String>,
    /// The IANA time zone of `schedule`.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// While a model stays in alert, the alert event is repeated at most this often.
    #[serde(default = "default_repeat_alert")]
    pub repeat_alert_secs: u64,
    #[serde(default)]
    pub thresholds: crate::drift::Thresholds,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            enabled: true,
            window_rows: default_window_rows(),
            window_secs: default_window_secs(),
            min_rows: default_min_rows(),
            schedule: None,
            timezone: default_timezone(),
            repeat_alert_secs: default_repeat_alert(),
            thresholds: Default::default(),
        }
    }
}

impl DriftConfig {
    pub fn policy(&self) -> crate::drift::Policy {
        crate::drift::Policy {
            window_rows: self.window_rows,
            window_ms: self.window_secs * 1000,
            min_rows: self.min_rows,
            thresholds: self.thresholds,
        }
    }
}

fn default_window_rows() -> u64 {
    1000
}
fn default_window_secs() -> u64 {
    600
}
fn default_min_rows() -> u64 {
    500
}
fn default_timezone() -> String {
    "UTC".into()
}
fn default_repeat_alert() -> u64 {
    600
}

/// `[samples]`: input rows captured with their outputs into the `samples` stream, for
/// retraining (SPEC §6.5).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplesConfig {
    /// Keep one row in this many; 0 keeps none by count.
    #[serde(default)]
    pub every: u64,
    /// Always keep rows with a feature outside the baseline's training range.
    #[serde(default = "yes")]
    pub out_of_range: bool,
    /// Always keep rows whose top class probability is below this (0 = off). A probability
    /// output is a float output whose row is non-negative and sums to 1.
    #[serde(default)]
    pub low_confidence: f64,
    /// When a drift window alerts, keep up to this many of its rows (a uniform sample of the
    /// window, held in fixed memory).
    #[serde(default = "default_alert_rows")]
    pub alert_rows: usize,
    /// At most this many samples a minute; the rest are counted as lost (`samples`,
    /// `rate_limited`).
    #[serde(default = "default_samples_per_minute")]
    pub max_per_minute: u64,
}

impl Default for SamplesConfig {
    fn default() -> Self {
        SamplesConfig {
            every: 0,
            out_of_range: true,
            low_confidence: 0.0,
            alert_rows: default_alert_rows(),
            max_per_minute: default_samples_per_minute(),
        }
    }
}

fn default_alert_rows() -> usize {
    32
}
fn default_samples_per_minute() -> u64 {
    600
}

/// `[log]`: how `lathe run` writes its log to stderr. The level comes from `LATHE_LOG` (or
/// `RUST_LOG`), e.g. `LATHE_LOG=debug` or `LATHE_LOG=info,lathe::sync=debug`; default `info`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: crate::logs::Format,
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
    /// A file whose first line is the password, instead of `password`.
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// The largest MQTT packet sent or received: a bundle chunk (at most 1 MiB) or a sync
    /// batch on the hub connection, a reading on the readings connection.
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// The largest command accepted, checked before it is parsed (commands are `ping` only).
    pub max_command_bytes: Option<usize>,
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    pub tls: Option<TlsConfig>,
}

impl BrokerConfig {
    /// A plain connection to `host:port` with every other field at its default.
    pub fn new(host: impl Into<String>, port: u16) -> BrokerConfig {
        BrokerConfig {
            host: host.into(),
            port,
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            keep_alive_secs: default_keep_alive(),
            max_packet_bytes: default_max_packet(),
            max_command_bytes: None,
            backoff_initial_ms: default_backoff_initial(),
            backoff_max_ms: default_backoff_max(),
            tls: None,
        }
    }
}

fn default_port() -> u16 {
    1883
}
fn default_keep_alive() -> u64 {
    30
}
fn default_max_packet() -> usize {
    2 << 20
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
    /// MQTT topic filters whose readings are binary: raw float32 tensors or images (SPEC §3.7).
    #[serde(default)]
    pub binary_topics: Vec<String>,
    #[serde(default)]
    pub qos: u8,
    /// A separate broker for readings (a local broker on the gateway). Without it, readings
    /// come over `[broker]`.
    pub broker: Option<BrokerConfig>,
    /// Readings waiting for inference; when full, new readings are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Bytes of readings waiting for inference; when full, new readings are dropped and
    /// counted.
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: usize,
    /// The most rows run through the model in one call.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// The largest reading message; larger ones are refused and counted before parsing.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// A reading's `id` echoed in its prediction is cut to this many bytes of JSON.
    #[serde(default = "default_max_id")]
    pub max_id_bytes: usize,
    /// Bytes of input values (float32) run through the model in one call: a batch of wide
    /// tensor rows is cut to fit, down to one row.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// The most pixels an image reading may have; a larger one is refused before it is
    /// decoded.
    #[serde(default = "default_max_image_pixels")]
    pub max_image_pixels: u64,
}

impl Default for InputsConfig {
    fn default() -> Self {
        InputsConfig {
            topics: vec![],
            binary_topics: vec![],
            qos: 0,
            broker: None,
            queue: default_queue(),
            queue_bytes: default_queue_bytes(),
            max_batch: default_max_batch(),
            max_message_bytes: default_max_message(),
            max_id_bytes: default_max_id(),
            max_batch_bytes: default_max_batch_bytes(),
            max_image_pixels: default_max_image_pixels(),
        }
    }
}

fn default_max_batch_bytes() -> usize {
    16 << 20
}
fn default_max_image_pixels() -> u64 {
    1 << 22
}

fn default_queue() -> usize {
    1024
}
fn default_queue_bytes() -> usize {
    8 << 20
}
fn default_max_batch() -> usize {
    256
}
fn default_max_message() -> usize {
    256 << 10
}
fn default_max_id() -> usize {
    128
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
    256 << 20
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
    /// Bytes of record data the outbox holds at most.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// The largest record; a larger one is refused and counted (it could never be sent).
    #[serde(default = "default_max_record")]
    pub max_record_bytes: usize,
    /// Free bytes to keep on the state_dir's filesystem.
    #[serde(default = "default_min_free")]
    pub min_free_bytes: u64,
    /// The WAL file is truncated back to this after checkpoints.
    #[serde(default = "default_max_wal")]
    pub max_wal_bytes: u64,
    #[serde(default = "default_when_full")]
    pub when_full: WhenFull,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_records: default_max_records(),
            max_bytes: default_max_bytes(),
            max_record_bytes: default_max_record(),
            min_free_bytes: default_min_free(),
            max_wal_bytes: default_max_wal(),
            when_full: default_when_full(),
        }
    }
}

fn default_max_records() -> u64 {
    1_000_000
}
fn default_max_bytes() -> u64 {
    1 << 30
}
fn default_max_record() -> usize {
    64 << 10
}
fn default_min_free() -> u64 {
    64 << 20
}
fn default_max_wal() -> u64 {
    64 << 20
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
    /// Batches in flight per stream.
    #[serde(default = "default_window")]
    pub window: usize,
    #[serde(default)]
    pub compression: Compression,
    /// Uplink cap for batches and live copies, in bytes per second; 0 for none.
    #[serde(default)]
    pub max_bytes_per_sec: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            batch_records: default_batch_records(),
            batch_bytes: default_batch_bytes(),
            interval_ms: default_interval(),
            ack_timeout_ms: default_ack_timeout(),
            window: default_window(),
            compression: Compression::default(),
            max_bytes_per_sec: 0,
        }
    }
}

fn default_window() -> usize {
    8
}

/// Whether sync batches are zstd-compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Once the hub's acks say it accepts zstd.
    #[default]
    Auto,
    Zstd,
    None,
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
    /// An output with at most this many values per row is sent whole (SPEC §3.5).
    #[serde(default = "default_max_values")]
    pub max_values: usize,
    /// A wider output is sent as its `top_k` largest values with their indices.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

impl Default for PredictionsConfig {
    fn default() -> Self {
        PredictionsConfig {
            publish: true,
            qos: 0,
            max_values: default_max_values(),
            top_k: default_top_k(),
        }
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

/// When `lathe status` calls something a problem.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Records lost in this many seconds before now are a problem.
    #[serde(default = "default_loss_window")]
    pub loss_window_secs: u64,
    /// Records waiting with no ack from the hub for this long are a problem.
    #[serde(default = "default_ack_stale")]
    pub ack_stale_secs: u64,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            loss_window_secs: default_loss_window(),
            ack_stale_secs: default_ack_stale(),
        }
    }
}

fn default_loss_window() -> u64 {
    86_400
}
fn default_ack_stale() -> u64 {
    3_600
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
        range("api.max_body_bytes", self.api.max_body_bytes as u64, 1024, 256 << 20)?;
        range("api.max_connections", self.api.max_connections as u64, 1, 1024)?;
        range("api.idle_timeout_secs", self.api.idle_timeout_secs, 1, 3600)?;
        range("api.request_timeout_secs", self.api.request_timeout_secs, 1, 3600)?;
        if let Some(b) = &self.inputs.broker {
            check_broker(b, "inputs.broker")?;
        }
        check_input_topics(&self.inputs.topics, "inputs.topics")?;
        check_input_topics(&self.inputs.binary_topics, "inputs.binary_topics")?;
        check_binary_topics(&self.inputs.topics, &self.inputs.binary_topics, "inputs.binary_topics")?;
        if self.models.len() > MAX_SLOTS {
            return Err(("models".into(), format!("at most {MAX_SLOTS} model slots")));
        }
        let default_topics = !self.inputs.topics.is_empty() || !self.inputs.binary_topics.is_empty();
        if !self.models.is_empty() && default_topics {
            return Err((
                "inputs.topics".into(),
                "with [[models]], each model slot names its own topics; move these to a slot".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let field = format!("models[{i}]");
            protocol::rollout::check_slot(&m.slot).map_err(|e| (format!("{field}.slot"), e))?;
            if !seen.insert(m.slot.as_str()) {
                return Err((format!("{field}.slot"), format!("slot {} is named twice", m.slot)));
            }
            if m.topics.is_empty() && m.binary_topics.is_empty() {
                return Err((
                    format!("{field}.topics"),
                    "a model slot needs at least one topic filter (topics or binary_topics)".into(),
                ));
            }
            check_input_topics(&m.topics, &format!("{field}.topics"))?;
            check_input_topics(&m.binary_topics, &format!("{field}.binary_topics"))?;
            check_binary_topics(&m.topics, &m.binary_topics, &format!("{field}.binary_topics"))?;
        }
        range("inputs.qos", self.inputs.qos as u64, 0, 1)?;
        range("inputs.queue", self.inputs.queue as u64, 1, 1 << 20)?;
        range("inputs.queue_bytes", self.inputs.queue_bytes as u64, 64 << 10, 1 << 30)?;
        range("inputs.max_batch", self.inputs.max_batch as u64, 1, 65_536)?;
        range(
            "inputs.max_message_bytes",
            self.inputs.max_message_bytes as u64,
            64,
            16 << 20,
        )?;
        range("inputs.max_id_bytes", self.inputs.max_id_bytes as u64, 16, 4096)?;
        range(
            "inputs.max_batch_bytes",
            self.inputs.max_batch_bytes as u64,
            64 << 10,
            1 << 30,
        )?;
        range("inputs.max_image_pixels", self.inputs.max_image_pixels, 1, 1 << 26)?;
        range("predictions.max_values", self.predictions.max_values as u64, 1, 65_536)?;
        range("predictions.top_k", self.predictions.top_k as u64, 1, 1024)?;
        let readings_packet = self.inputs.broker.as_ref().unwrap_or(&self.broker).max_packet_bytes;
        if self.inputs.max_message_bytes + 65_536 > readings_packet {
            return Err((
                "inputs.max_message_bytes".to_string(),
                format!("must be at least 64 KiB below the readings broker's max_packet_bytes ({readings_packet})"),
            ));
        }
        if self.inputs.max_message_bytes > self.inputs.queue_bytes {
            return Err((
                "inputs.max_message_bytes".to_string(),
                "must not exceed inputs.queue_bytes".into(),
            ));
        }
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
        range("outbox.max_bytes", self.outbox.max_bytes, 1 << 20, 1 << 40)?;
        range(
            "outbox.max_record_bytes",
            self.outbox.max_record_bytes as u64,
            1024,
            16 << 20,
        )?;
        range("outbox.min_free_bytes", self.outbox.min_free_bytes, 0, 1 << 40)?;
        range("outbox.max_wal_bytes", self.outbox.max_wal_bytes, 1 << 20, 4 << 30)?;
        range("sync.batch_records", self.sync.batch_records as u64, 1, 100_000)?;
        range(
            "sync.batch_bytes",
            self.sync.batch_bytes as u64,
            4096,
            protocol::sync::MAX_BATCH_JSON as u64,
        )?;
        range("sync.interval_ms", self.sync.interval_ms, 10, 3_600_000)?;
        range("sync.ack_timeout_ms", self.sync.ack_timeout_ms, 100, 3_600_000)?;
        range("sync.window", self.sync.window as u64, 1, 64)?;
        range("status.loss_window_secs", self.status.loss_window_secs, 1, 365 * 86_400)?;
        range("status.ack_stale_secs", self.status.ack_stale_secs, 1, 365 * 86_400)?;
        if self.outbox.max_record_bytes + protocol::sync::RECORD_OVERHEAD + protocol::sync::BATCH_OVERHEAD
            > self.sync.batch_bytes
        {
            return Err((
                "outbox.max_record_bytes".to_string(),
                format!(
                    "a record of {} bytes could not fit a batch of sync.batch_bytes {}; keep it at least {} bytes smaller",
                    self.outbox.max_record_bytes,
                    self.sync.batch_bytes,
                    protocol::sync::RECORD_OVERHEAD + protocol::sync::BATCH_OVERHEAD
                ),
            ));
        }
        range("predictions.qos", self.predictions.qos as u64, 0, 1)?;
        range("health.interval_secs", self.health.interval_secs, 1, 86_400)?;
        range("drift.window_rows", self.drift.window_rows, 1, 1 << 32)?;
        range("drift.window_secs", self.drift.window_secs, 1, 30 * 86_400)?;
        range("drift.min_rows", self.drift.min_rows, 1, self.drift.window_rows)?;
        range("drift.repeat_alert_secs", self.drift.repeat_alert_secs, 1, 30 * 86_400)?;
        if let Some(which) = self.drift.thresholds.invalid() {
            return Err((format!("drift.thresholds.{which}"), "needs 0 < warn <= alert".into()));
        }
        if let Some(s) = &self.drift.schedule {
            crate::schedule::Schedule::parse(s, &self.drift.timezone)
                .map_err(|e| ("drift.schedule".to_string(), e.to_string()))?;
        }
        if !(0.0..1.0).contains(&self.samples.low_confidence) {
            return Err(("samples.low_confidence".into(), "must be 0 (off) or below 1".into()));
        }
        range("samples.alert_rows", self.samples.alert_rows as u64, 0, 1024)?;
        range("samples.max_per_minute", self.samples.max_per_minute, 1, 1_000_000)?;
        let command = self.max_command_bytes();
        if command + 4096 > self.broker.max_packet_bytes {
            return Err((
                "broker.max_command_bytes".to_string(),
                format!("must be at least 4 KiB below broker.max_packet_bytes ({command} given)"),
            ));
        }
        if self.broker.max_packet_bytes < (64 << 10) + 4096 {
            return Err((
                "broker.max_packet_bytes".to_string(),
                "must take a bundle chunk of 64 KiB and its topic: at least 69632".into(),
            ));
        }
        if self.rollout.groups.len() > MAX_GROUPS {
            return Err(("rollout.groups".into(), format!("at most {MAX_GROUPS} groups")));
        }
        for g in &self.rollout.groups {
            Name::new(g.clone()).map_err(|e| ("rollout.groups".to_string(), e.to_string()))?;
        }
        range("rollout.window", self.rollout.window as u64, 1, 256)?;
        range("rollout.chunk_timeout_secs", self.rollout.chunk_timeout_secs, 1, 3600)?;
        range("rollout.retry_secs", self.rollout.retry_secs, 1, 86_400)?;
        let w = &self.rollout.watch;
        range("rollout.watch.secs", w.secs, 0, 7 * 86_400)?;
        range("rollout.watch.max_latency_ms", w.max_latency_ms, 1, 3_600_000)?;
        range("rollout.watch.early_rows", w.early_rows, 1, 1 << 40)?;
        for (key, v, max) in [
            ("rollout.watch.max_failed_ratio", w.max_failed_ratio, 1.0),
            ("rollout.watch.max_non_finite_ratio", w.max_non_finite_ratio, 1.0),
            ("rollout.watch.max_out_of_range_ratio", w.max_out_of_range_ratio, 1.0),
            ("rollout.watch.range_margin", w.range_margin, 100.0),
        ] {
            if !(0.0..=max).contains(&v) {
                return Err((key.into(), format!("must be between 0 and {max}")));
            }
        }
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

    /// Where the key set this device accepted is kept (SPEC §8.7).
    pub fn keyset_path(&self) -> PathBuf {
        keyset_path(&self.device.state_dir)
    }

    pub fn bundles_dir(&self) -> PathBuf {
        self.device.state_dir.join("bundles")
    }

    /// The model slots: the `[[models]]`, or else the default slot fed by `inputs.topics`.
    pub fn slots(&self) -> Vec<Slot> {
        let slot = |name: Option<&String>, json: &[String], binary: &[String]| {
            let mut topics = json.to_vec();
            topics.extend(binary.iter().cloned());
            Slot {
                name: name.cloned(),
                topics,
                binary: binary.to_vec(),
            }
        };
        if self.models.is_empty() {
            return vec![slot(None, &self.inputs.topics, &self.inputs.binary_topics)];
        }
        self.models
            .iter()
            .map(|m| slot(Some(&m.slot), &m.topics, &m.binary_topics))
            .collect()
    }

    /// Every input topic filter, of every slot.
    pub fn input_topics(&self) -> Vec<String> {
        let mut all: Vec<String> = self.slots().into_iter().flat_map(|s| s.topics).collect();
        all.sort();
        all.dedup();
        all
    }

    /// Where a slot keeps its bundles and, with `downloads`, its transfers: the default slot in
    /// `bundles` and `downloads`, a named one under `slots/<slot>/`.
    pub fn slot_dir(&self, slot: Option<&str>, downloads: bool) -> PathBuf {
        let leaf = if downloads { "downloads" } else { "bundles" };
        match slot {
            None => self.device.state_dir.join(leaf),
            Some(s) => self.device.state_dir.join("slots").join(s).join(leaf),
        }
    }

    /// The largest command the hub link accepts.
    pub fn max_command_bytes(&self) -> usize {
        self.broker.max_command_bytes.unwrap_or(64 << 10)
    }

    /// The largest bundle chunk the hub link takes: its packet limit less room for the topic.
    pub fn max_chunk_bytes(&self) -> u64 {
        (self.broker.max_packet_bytes as u64 - 4096).min(protocol::rollout::MAX_CHUNK_BYTES as u64)
    }

    pub fn downloads_dir(&self) -> PathBuf {
        self.device.state_dir.join("downloads")
    }
}

/// The outbox database inside a state directory.
/// Where the key set a device accepted is kept, in its state_dir (SPEC §8.7).
pub fn keyset_path(state_dir: &Path) -> PathBuf {
    state_dir.join("keyset.json")
}

pub fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join("lathe.db")
}

/// A filter is for JSON readings or for binary ones, not both: a binary filter may not match a
/// JSON one, nor be matched by it (read as a topic). Overlaps this cannot see go to the binary
/// side.
fn check_binary_topics(json: &[String], binary: &[String], field: &str) -> Result<(), (String, String)> {
    use protocol::topic::filter::matches;
    for b in binary {
        if let Some(j) = json.iter().find(|j| matches(j, b) || matches(b, j)) {
            return Err((
                field.to_string(),
                format!("{b:?} overlaps the JSON topic filter {j:?}; a topic carries JSON readings or binary ones"),
            ));
        }
    }
    Ok(())
}

/// Input topic filters must not reach Lathe's own topics.
fn check_input_topics(topics: &[String], field: &str) -> Result<(), (String, String)> {
    for t in topics {
        if t.is_empty() || protocol::topic::filter::overlaps_root(t) {
            return Err((
                field.to_string(),
                format!(
                    "{t:?} would match Lathe's own topics; give a non-empty filter that cannot match anything under {}/",
                    protocol::topic::ROOT
                ),
            ));
        }
    }
    Ok(())
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
    match (&b.username, &b.password, &b.password_file) {
        (Some(_), Some(_), Some(_)) => {
            return Err((f("password_file"), "give password or password_file, not both".into()))
        }
        (Some(_), None, None) => {
            return Err((
                f("password"),
                "a username needs password or password_file; without one the broker would see an anonymous client"
                    .into(),
            ))
        }
        (None, Some(_), _) | (None, _, Some(_)) => return Err((f("username"), "a password needs a username".into())),
        _ => {}
    }
    if let Some(c) = b.max_command_bytes {
        range(&f("max_command_bytes"), c as u64, 1024, b.max_packet_bytes as u64)?;
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
    fn model_slots_have_their_own_topics_and_places() {
        let two = "[[models]]\nslot = \"anomaly\"\ntopics = [\"plant/+/vibration\"]\n\
                   [[models]]\nslot = \"rul\"\ntopics = [\"plant/+/vibration\", \"plant/+/spindle\"]\n";
        let c = Config::parse(&format!("{MINIMAL}{two}"), Path::new("t.toml")).expect("two slots");
        let slots = c.slots();
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[1].name.as_deref(), Some("rul"));
        assert_eq!(c.input_topics(), ["plant/+/spindle", "plant/+/vibration"]);
        assert_eq!(
            c.slot_dir(Some("rul"), true),
            PathBuf::from("/var/lib/lathe/slots/rul/downloads")
        );
        assert_eq!(c.slot_dir(None, false), c.bundles_dir());
        assert_eq!(slot_key("deploy_state", Some("rul")), "deploy_state/rul");
        let plain = Config::parse(MINIMAL, Path::new("t.toml")).expect("minimal");
        assert_eq!(
            plain.slots(),
            [Slot {
                name: None,
                topics: vec![],
                binary: vec![]
            }]
        );
        check(two, Ok(()));
        check(&format!("[inputs]\ntopics = [\"a\"]\n{two}"), Err("inputs.topics"));
        check("[[models]]\nslot = \"a b\"\ntopics = [\"x\"]\n", Err("models[0].slot"));
        check("[[models]]\nslot = \"..\"\ntopics = [\"x\"]\n", Err("models[0].slot"));
        check(
            "[[models]]\nslot = \"desired\"\ntopics = [\"x\"]\n",
            Err("models[0].slot"),
        );
        check("[[models]]\nslot = \"a\"\ntopics = []\n", Err("models[0].topics"));
        check("[[models]]\nslot = \"cam\"\nbinary_topics = [\"cam/+/jpeg\"]\n", Ok(()));
        check(
            "[[models]]\nslot = \"cam\"\nbinary_topics = [\"lathe/#\"]\n",
            Err("models[0].binary_topics"),
        );
        check(
            "[inputs]\ntopics = [\"a/#\"]\nbinary_topics = [\"a/b\"]\n",
            Err("\"a/b\" overlaps the JSON topic filter \"a/#\""),
        );
        let cam = Config::parse(
            &format!("{MINIMAL}[inputs]\ntopics = [\"a/#\"]\nbinary_topics = [\"cam/+\"]\n"),
            Path::new("t.toml"),
        )
        .expect("binary topics");
        assert_eq!(cam.slots()[0].topics, ["a/#", "cam/+"]);
        assert_eq!(cam.slots()[0].binary, ["cam/+"]);
        check(
            "[inputs]\ntopics = [\"a/#\"]\nbinary_topics = [\"a/#\"]\n",
            Err("overlaps the JSON topic filter"),
        );
        check("[predictions]\nmax_values = 0\n", Err("predictions.max_values"));
        check("[engine]\ndevice = \"cuda\"\n", Ok(()));
        check(
            "[engine]\ndevice = \"gpu\"\n",
            Err("unknown variant `gpu`, expected one of `cpu`, `cuda`, `auto`"),
        );
        check("[predictions]\ntop_k = 2000\n", Err("predictions.top_k"));
        check("[inputs]\nmax_image_pixels = 0\n", Err("inputs.max_image_pixels"));
        check(
            "[[models]]\nslot = \"a\"\ntopics = [\"lathe/#\"]\n",
            Err("models[0].topics"),
        );
        check(
            "[[models]]\nslot = \"a\"\ntopics = [\"x\"]\n[[models]]\nslot = \"a\"\ntopics = [\"y\"]\n",
            Err("named twice"),
        );
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
        check("[outbox]\nmax_record_bytes = 300000\n", Err("outbox.max_record_bytes"));
        check("[sync]\nwindow = 0\n", Err("sync.window"));
        check("[sync]\ncompression = \"lz4\"\n", Err("compression"));
        check(
            "[inputs]\nmax_message_bytes = 9000000\n",
            Err("inputs.max_message_bytes"),
        );
        check("[drift]\nmin_rows = 2000\n", Err("drift.min_rows"));
        check("[drift]\nschedule = \"at noon\"\n", Err("drift.schedule"));
        check(
            "[drift]\nschedule = \"0 6 * * *\"\ntimezone = \"Atlantis/Capital\"\n",
            Err("IANA"),
        );
        check(
            "[drift.thresholds]\npsi = { warn = 0.3, alert = 0.2 }\n",
            Err("drift.thresholds.psi"),
        );
        check(
            "[drift]\nschedule = \"0 6,14,22 * * *\"\ntimezone = \"Europe/Berlin\"\n[drift.thresholds]\nks = { warn = 0.05, alert = 0.1 }\n",
            Ok(()),
        );
        check("[samples]\nlow_confidence = 1.5\n", Err("samples.low_confidence"));
        check("[samples]\nmax_per_minute = 0\n", Err("samples.max_per_minute"));
        check("[rollout]\ngroups = [\"line 2\"]\n", Err("rollout.groups"));
        check("[rollout]\nwindow = 0\n", Err("rollout.window"));
        check(
            "[rollout.watch]\nmax_failed_ratio = 1.5\n",
            Err("rollout.watch.max_failed_ratio"),
        );
        check(
            "[rollout.watch]\nrange_margin = nan\n",
            Err("rollout.watch.range_margin"),
        );
        check("[rollout.watch]\nsecs = 0\nmax_latency_ms = 50\n", Ok(()));
        check(
            "[rollout]\ngroups = [\"line-2\", \"north\"]\nwindow = 4\nretry_secs = 5\n",
            Ok(()),
        );
        // Bundles travel in chunks: a large one needs no large packets.
        let big = MINIMAL.replace(
            "keys_file = \"/etc/lathe/trust.keys\"",
            "keys_file = \"k\"\nmax_bundle_bytes = 1000000000",
        );
        let c = Config::parse(&big, Path::new("t.toml")).expect("a large bundle cap");
        assert_eq!(c.broker.max_packet_bytes, 2 << 20);
        assert_eq!(c.max_chunk_bytes(), 1 << 20);
    }

    /// The README's configuration block, every field with its default, is a valid config and
    /// says what the defaults are.
    #[test]
    fn the_readme_config_parses_to_the_defaults() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n[device]").expect("the README's config block") + 8;
        let block = &readme[start..start + readme[start..].find("```").expect("end of block")];
        let c = Config::parse(block, Path::new("README.md")).expect("the README's config parses");
        let d = Config::parse(MINIMAL, Path::new("t.toml")).expect("minimal");
        assert_eq!(c.drift.window_rows, d.drift.window_rows);
        assert_eq!(c.drift.window_secs, d.drift.window_secs);
        assert_eq!(c.drift.min_rows, d.drift.min_rows);
        assert_eq!(c.drift.thresholds, d.drift.thresholds);
        assert_eq!(c.samples.max_per_minute, d.samples.max_per_minute);
        assert_eq!(c.samples.alert_rows, d.samples.alert_rows);
    }

    /// Regression: `inputs.topics = ["#"]` routed `cmd` and `sync` traffic into readings.
    #[test]
    fn input_filters_that_match_lathe_topics_are_refused() {
        for bad in [
            "#",
            "+/#",
            "lathe/#",
            "lathe/+/x/y/pred",
            "+/v1/#",
            "lathe/v1/+/+/cmd/+",
            "lathe/v1",
        ] {
            check(&format!("[inputs]\ntopics = [\"{bad}\"]\n"), Err("inputs.topics"));
        }
        for good in ["sensors/#", "+/features", "lathe/v2/#", "lathe2/#", "x/lathe/v1/#"] {
            check(&format!("[inputs]\ntopics = [\"{good}\"]\n"), Ok(()));
        }
    }

    /// Regression: a username without a password silently connected anonymously.
    #[test]
    fn credentials_go_together() {
        let with = |extra: &str| MINIMAL.replace("host = \"127.0.0.1\"", &format!("host = \"127.0.0.1\"\n{extra}"));
        let parse = |t: String| Config::parse(&t, Path::new("t.toml"));
        let e = parse(with("username = \"d1\"")).expect_err("no password");
        assert!(e.to_string().contains("broker.password"), "{e}");
        let e = parse(with("password = \"x\"")).expect_err("no username");
        assert!(e.to_string().contains("broker.username"), "{e}");
        assert!(parse(with("username = \"d1\"\npassword = \"x\"")).is_ok());
        assert!(parse(with("username = \"d1\"\npassword_file = \"/etc/lathe/pw\"")).is_ok());
    }

    #[test]
    fn bad_names_are_refused() {
        let text = MINIMAL.replace("press-7", "press 7");
        let e = Config::parse(&text, Path::new("t.toml")).expect_err("space in id");
        assert!(e.to_string().contains("device.id"), "{e}");
    }
}
