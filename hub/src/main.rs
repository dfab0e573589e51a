use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use lathe::config::{BrokerConfig, TlsConfig};
use lathe_hub::{broker, demo, ingest, ops, rollout, views};
use protocol::bundle::{self, Policy};
use protocol::keys::{SigningKey, TrustStore};
use protocol::Name;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Lathe hub: keys, signed model bundles, deploys, and the sync ingest service.
#[derive(Parser)]
#[command(name = "lathe-hub", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate an Ed25519 signing key: NAME.key (private) and NAME.pub (public).
    Keygen {
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        #[arg(long, default_value = "hub")]
        name: String,
    },
    /// Pack, verify and inspect bundles.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Deploy a bundle to devices or a group: publish it in retained chunks, sign and publish
    /// their desired state, and wait for the devices to report.
    Deploy(RolloutArgs),
    /// Roll devices or a group back to the version of this (older) bundle: a signed desired
    /// state that runs it below the version high-water mark, which stays.
    Rollback(RolloutArgs),
    /// What the devices report about their rollouts.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Make the broker hold the desired states a fleet file declares (a bundle per group and
    /// per device): print the difference, then sign and publish what differs.
    Apply {
        /// The fleet file (TOML): `fleet`, `[[group]]` (name, bundle, rollback, canary) and
        /// `[[device]]` (id, bundle, rollback); bundle paths are relative to it.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long, env = "LATHE_HUB_BROKER", default_value = "127.0.0.1:18830")]
        broker: String,
        #[command(flatten)]
        conn: ConnArgs,
        /// A desired state at the broker counts only when one of the --key keys signs it.
        #[command(flatten)]
        sign: SignArgs,
        /// How long to wait for each device target (and each canary); 0 does not wait.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
        /// Print the difference only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Receive synced records, store them in SQLite and acknowledge them.
    Serve {
        /// Broker to connect to (host:port).
        #[arg(long, env = "LATHE_HUB_BROKER", conflicts_with = "embedded_broker")]
        broker: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
        /// Run an in-process broker instead, listening on --listen. For demos and trials only:
        /// it has no authentication, no ACLs and no TLS.
        #[arg(long)]
        embedded_broker: bool,
        #[arg(long, default_value = "127.0.0.1:18830")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "lathe-hub.db")]
        db: PathBuf,
        #[arg(long, default_value_t = 96 << 20)]
        max_packet_bytes: usize,
        /// The largest batch accepted, after decompression.
        #[arg(long, default_value_t = protocol::sync::MAX_BATCH_JSON)]
        max_batch_bytes: usize,
    },
    /// Show what the store holds per device, stream and epoch, and every loss it knows of.
    Audit {
        #[arg(long, default_value = "lathe-hub.db")]
        db: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List drift alerts and the worst features of each device and model, from the windows the
    /// devices synced. Exits 1 when a device's last window alerted.
    Drift {
        #[arg(long, default_value = "lathe-hub.db")]
        db: PathBuf,
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// Alerts listed per device and model, newest first.
        #[arg(long, default_value_t = 10)]
        alerts: usize,
        #[arg(long)]
        json: bool,
    },
    /// Write the samples the devices captured for a model (inputs with outputs), ready for
    /// pandas: time, fleet, device, model_version, reason, source, one column per feature, one
    /// per output value.
    Export {
        #[arg(long, default_value = "lathe-hub.db")]
        db: PathBuf,
        #[arg(long)]
        model: String,
        #[arg(long)]
        device: Option<String>,
        /// Only samples from this time on: unix seconds, a date, or a UTC time.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, value_enum)]
        format: views::Format,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Show the last health message of each device.
    Health {
        #[arg(long, default_value = "lathe-hub.db")]
        db: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run the whole loop on this machine: embedded broker, hub, a real agent, simulated sensors.
    Demo(demo::DemoArgs),
}

#[derive(Subcommand)]
enum RolloutCmd {
    /// Each device's rollout state: active, previous and staged models, progress, last error.
    Status {
        #[arg(long, env = "LATHE_HUB_BROKER", default_value = "127.0.0.1:18830")]
        broker: String,
        #[command(flatten)]
        conn: ConnArgs,
        /// Only this fleet.
        #[arg(long)]
        fleet: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Clear a bundle's retained chunks at the broker once no device needs them. Refused while
    /// a desired state at the broker names the bundle, unless --force.
    Clear {
        #[command(flatten)]
        at: FleetAt,
        /// The bundle whose chunks to clear.
        #[arg(long)]
        bundle: PathBuf,
        /// The chunk size it was deployed with.
        #[arg(long, default_value_t = protocol::rollout::DEFAULT_CHUNK_BYTES)]
        chunk_bytes: u32,
        #[arg(long)]
        force: bool,
    },
    /// Replace the fleet's trust store: publish a key set (the public keys in --keys-file and
    /// --threshold), signed with --key by enough of the keys the devices trust now. Leave a
    /// key out to revoke it.
    Keys {
        #[command(flatten)]
        at: FleetAt,
        /// The new trust store: public keys, one per line, as `keygen` writes them.
        #[arg(long)]
        keys_file: PathBuf,
        /// Signatures a document needs from now on.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// Signing key of a key the devices trust now; repeat to meet their threshold.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Devices to wait for, until they report the key set in force.
        #[arg(long = "wait-for")]
        wait_for: Vec<String>,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

/// How desired states are signed and their bundles cut.
#[derive(Args)]
struct SignArgs {
    /// Signing key file for the desired state; repeat to meet the devices' trust.threshold.
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    #[arg(long, default_value_t = protocol::rollout::DEFAULT_CHUNK_BYTES)]
    chunk_bytes: u32,
    /// The desired state expires after this; a device that comes back later refuses it.
    #[arg(long, default_value_t = 30)]
    expires_in_days: u64,
}

/// A fleet at its broker.
#[derive(Args)]
struct FleetAt {
    /// The broker the devices use (host:port). The default is where `serve --embedded-broker`
    /// listens.
    #[arg(long, env = "LATHE_HUB_BROKER", default_value = "127.0.0.1:18830")]
    broker: String,
    #[command(flatten)]
    conn: ConnArgs,
    #[arg(long)]
    fleet: String,
}

impl FleetAt {
    fn resolve(&self) -> anyhow::Result<(BrokerConfig, Name)> {
        Ok((self.conn.broker(&self.broker, 1 << 20)?, Name::new(self.fleet.clone())?))
    }
}

#[derive(Args)]
struct RolloutArgs {
    #[command(flatten)]
    at: FleetAt,
    /// A target device; repeat for several. Or give --group.
    #[arg(long = "device", required_unless_present = "group", conflicts_with = "group")]
    devices: Vec<String>,
    /// A target group: devices with it in rollout.groups.
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    bundle: PathBuf,
    #[command(flatten)]
    sign: SignArgs,
    /// Devices to wait for with --group (by default: the --device targets).
    #[arg(long = "wait-for")]
    wait_for: Vec<String>,
    /// How long to wait for the devices to report; 0 does not wait.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// With --group: deploy to this share of its members first (as `10%` or `10`, at least one
    /// device), and to the group only once each of them has committed the model after its
    /// watch period; a canary that fails halts the rollout.
    #[arg(long, requires = "group", value_parser = lathe_hub::apply::parse_percent)]
    canary: Option<u8>,
    /// The model slot to deploy to or roll back, on devices that run several models
    /// (`[[models]]` in their config); without it, their default slot.
    #[arg(long)]
    slot: Option<String>,
}

impl RolloutArgs {
    async fn run(self, rollback: bool) -> anyhow::Result<u8> {
        let bundle = std::fs::read(&self.bundle).with_context(|| format!("{}", self.bundle.display()))?;
        let keys = read_keys(&self.sign.keys)?;
        anyhow::ensure!(
            self.canary.is_none() || self.timeout_secs > 0,
            "--canary waits for the canary devices to commit the model: give --timeout-secs longer than their watch period (rollout.watch.secs) and the transfer"
        );
        let names = |v: &[String]| v.iter().map(|d| Name::new(d.clone())).collect::<Result<Vec<_>, _>>();
        let devices = names(&self.devices)?;
        let wait_for = if self.timeout_secs == 0 {
            vec![]
        } else if self.wait_for.is_empty() {
            devices.clone()
        } else {
            names(&self.wait_for)?
        };
        let plan = rollout::Plan {
            fleet: Name::new(self.at.fleet.clone())?,
            devices,
            group: self.group.clone().map(Name::new).transpose()?,
            bundle: &bundle,
            keys: keys.iter().collect(),
            chunk_bytes: self.sign.chunk_bytes,
            expires_in_secs: self.sign.expires_in_days * 86_400,
            rollback,
            slot: self
                .slot
                .as_deref()
                .map(protocol::rollout::check_slot)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--slot: {e}"))?,
        };
        let size = (self.sign.chunk_bytes as usize + 4096).max(1 << 20);
        rollout::run(rollout::Run {
            broker: self.at.conn.broker(&self.at.broker, size)?,
            plan,
            wait_for,
            timeout: Duration::from_secs(self.timeout_secs),
            canary: self.canary,
        })
        .await
    }
}

fn read_keys(paths: &[PathBuf]) -> anyhow::Result<Vec<SigningKey>> {
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).with_context(|| format!("key {}", p.display()))?;
            SigningKey::from_text(&text).with_context(|| format!("key {}", p.display()))
        })
        .collect()
}

// Parsed once per run: the size of the pack variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum BundleCmd {
    /// Check the model runs, then build and sign a bundle.
    Pack {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: u64,
        /// A tabular model's input feature names in model order, comma separated. Without
        /// --features (or --features-file) the model is packed as a tensor model: its inputs,
        /// with their shapes, are taken from the model.
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
        /// A JSON array of feature names, instead of --features.
        #[arg(long, conflicts_with = "features")]
        features_file: Option<PathBuf>,
        /// A tensor input's dimensions after the batch axis, where the model does not declare
        /// them: NAME=D1,D2,… (repeat for several inputs).
        #[arg(long = "shape", value_parser = parse_shape)]
        shapes: Vec<(String, Vec<usize>)>,
        /// The input is an image (JPEG or PNG readings): its channels, `rgb`, `bgr` or `gray`.
        #[arg(long, value_parser = ["rgb", "bgr", "gray"])]
        image: Option<String>,
        /// The image input, when the model has several inputs.
        #[arg(long, requires = "image")]
        image_input: Option<String>,
        /// The image input's layout: `nchw` ([C, H, W]) or `nhwc` ([H, W, C]).
        #[arg(long, default_value = "nchw", value_parser = ["nchw", "nhwc"], requires = "image")]
        image_layout: String,
        /// Per-channel means, comma separated: each value is (pixel / 255 - mean) / std.
        /// Default 0.
        #[arg(long, value_delimiter = ',', requires = "image")]
        image_mean: Vec<String>,
        /// Per-channel standard deviations, comma separated. Default 1.
        #[arg(long, value_delimiter = ',', requires = "image")]
        image_std: Vec<String>,
        /// Signing key file; repeat for several signatures.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 365)]
        expires_in_days: u64,
        /// A CSV of training rows (header: feature names, matched by name; other columns are
        /// ignored). The drift baseline is computed from it and the model's outputs on it, and
        /// signed into the bundle (SPEC §4.9). Without one, the agent says drift is off.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Quantile bins per feature and output column in the baseline.
        #[arg(long, default_value_t = protocol::baseline::DEFAULT_BINS as u64,
              value_parser = clap::value_parser!(u64).range(2..=protocol::baseline::MAX_BINS as u64))]
        baseline_bins: u64,
        /// A CSV of self-test rows (header: feature names, matched by name), or for a tensor
        /// model one float32 .npy file per input ([samples, …], repeat --selftest in input
        /// order). The model is run on them now and the bundle carries the outputs; the agent
        /// runs the rows again before it activates the bundle and refuses it
        /// (`selftest_failed`) if an output differs.
        #[arg(long)]
        selftest: Vec<PathBuf>,
        /// Self-test tolerance: |got - expected| <= absolute + relative * |expected|.
        #[arg(long, default_value_t = protocol::selftest::Tolerance::default().absolute)]
        selftest_absolute: f64,
        #[arg(long, default_value_t = protocol::selftest::Tolerance::default().relative)]
        selftest_relative: f64,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Verify a bundle against a trust store, as the agent would.
    Verify {
        file: PathBuf,
        #[arg(long)]
        trust: PathBuf,
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// Refuse the bundle unless it is newer than this version.
        #[arg(long)]
        installed_version: Option<u64>,
    },
    /// Print a bundle's manifest and signatures, without verifying them.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// Credentials and TLS for the hub's broker connection. Each can also come from the
/// environment (`LATHE_HUB_USERNAME`, …), so an operator sets them once per shell or unit.
#[derive(Args, Clone)]
struct ConnArgs {
    /// Username on the broker; the password is read from --password-file.
    #[arg(long, env = "LATHE_HUB_USERNAME", requires = "password_file")]
    username: Option<String>,
    /// A file whose first line is the broker password.
    #[arg(long, env = "LATHE_HUB_PASSWORD_FILE", requires = "username")]
    password_file: Option<PathBuf>,
    /// PEM CA certificates that sign the broker's certificate: connect with TLS.
    #[arg(long, env = "LATHE_HUB_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that require one (mTLS); with --key-file.
    #[arg(long, env = "LATHE_HUB_CERT_FILE", requires_all = ["ca_file", "key_file"])]
    cert_file: Option<PathBuf>,
    #[arg(long, env = "LATHE_HUB_KEY_FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,
}

impl ConnArgs {
    fn broker(&self, addr: &str, max_packet_bytes: usize) -> anyhow::Result<BrokerConfig> {
        let (host, port) = split_addr(addr)?;
        Ok(BrokerConfig {
            username: self.username.clone(),
            password_file: self.password_file.clone(),
            keep_alive_secs: 15,
            max_packet_bytes,
            tls: self.ca_file.clone().map(|ca_file| TlsConfig {
                ca_file,
                cert_file: self.cert_file.clone(),
                key_file: self.key_file.clone(),
            }),
            ..BrokerConfig::new(host, port)
        })
    }
}

fn split_addr(s: &str) -> anyhow::Result<(String, u16)> {
    let (h, p) = s
        .rsplit_once(':')
        .with_context(|| format!("broker {s:?} must be host:port"))?;
    Ok((
        h.to_string(),
        p.parse().with_context(|| format!("broker {s:?}: bad port"))?,
    ))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // The demo prints its own story; the embedded broker is chatty at info.
    let default_filter = match cli.cmd {
        Cmd::Demo(_) => "warn,rumqttd=off",
        _ => "info,rumqttd=warn",
    };
    lathe::logs::init(lathe::logs::Format::Text, default_filter);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("lathe-hub: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<u8> {
    match cmd {
        Cmd::Keygen { out_dir, name } => {
            Name::new(name.clone())?;
            let key = SigningKey::generate(&ring::rand::SystemRandom::new())?;
            std::fs::create_dir_all(&out_dir)?;
            let (kpath, ppath) = (out_dir.join(format!("{name}.key")), out_dir.join(format!("{name}.pub")));
            if kpath.exists() {
                anyhow::bail!("{} exists; refusing to overwrite a key", kpath.display());
            }
            write_private(&kpath, key.to_text().as_bytes())?;
            std::fs::write(&ppath, format!("{} {name}\n", key.public_key().to_text()))?;
            println!(
                "key id {}: private {} public {}",
                key.key_id(),
                kpath.display(),
                ppath.display()
            );
            println!("add the public key line to each agent's trust.keys_file");
            Ok(0)
        }
        Cmd::Bundle(BundleCmd::Pack {
            model,
            name,
            version,
            features,
            features_file,
            shapes,
            image,
            image_input,
            image_layout,
            image_mean,
            image_std,
            keys,
            expires_in_days,
            baseline,
            baseline_bins,
            selftest,
            selftest_absolute,
            selftest_relative,
            out,
        }) => {
            let features = match features_file {
                Some(f) => serde_json::from_slice(&std::fs::read(&f).with_context(|| format!("{}", f.display()))?)
                    .with_context(|| format!("{}: expected a JSON array of names", f.display()))?,
                None => features,
            };
            let keys = read_keys(&keys)?;
            let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("{}", p.display()));
            let tolerance = protocol::selftest::Tolerance {
                absolute: selftest_absolute,
                relative: selftest_relative,
            };
            let selftest = match &selftest[..] {
                [] => None,
                paths if paths.iter().all(|p| lathe::npy::is_npy(p)) => {
                    let tensors = lathe::npy::read_files(paths).map_err(|e| anyhow::anyhow!("--selftest {e}"))?;
                    let (shapes, rows) = lathe::npy::rows(&tensors).map_err(|e| anyhow::anyhow!("--selftest: {e}"))?;
                    Some(ops::Selftest {
                        rows,
                        shapes: Some(shapes),
                        tolerance,
                    })
                }
                [path] if !features.is_empty() => {
                    let text = String::from_utf8(read(path)?)
                        .map_err(|_| anyhow::anyhow!("{}: not UTF-8 text", path.display()))?;
                    let rows = lathe::engine::parse_csv(&text, &features, false)
                        .map_err(|e| anyhow::anyhow!("--selftest {}: {e}", path.display()))?;
                    Some(ops::Selftest {
                        rows,
                        shapes: None,
                        tolerance,
                    })
                }
                _ => anyhow::bail!(
                    "--selftest takes one CSV file for a tabular model (with --features), or one .npy file per input of a tensor model"
                ),
            };
            let image = image.map(|channels| {
                let n = if channels == "gray" { 1 } else { 3 };
                let or = |v: Vec<String>, d: &str| if v.is_empty() { vec![d.to_string(); n] } else { v };
                (
                    image_input,
                    protocol::bundle::ImageSchema {
                        channels,
                        layout: image_layout,
                        mean: or(image_mean, "0"),
                        std: or(image_std, "1"),
                    },
                )
            });
            if baseline.is_some() && features.is_empty() {
                anyhow::bail!(ops::TENSOR_BASELINE);
            }
            let baseline = match baseline {
                Some(path) => {
                    let text = String::from_utf8(read(&path)?)
                        .map_err(|_| anyhow::anyhow!("{}: not UTF-8 text", path.display()))?;
                    let missing = lathe::engine::Engine::load(&read(&model)?, features.len())
                        .map(|e| e.handles_missing())
                        .unwrap_or(false);
                    let rows = lathe::engine::parse_training_csv(&text, &features, missing)
                        .map_err(|e| anyhow::anyhow!("--baseline {}: {e}", path.display()))?;
                    Some(rows)
                }
                None => None,
            };
            let now = ops::now_secs();
            let input = ops::PackInput {
                name,
                version,
                model: read(&model)?,
                features,
                shapes,
                image,
                selftest,
                baseline,
                baseline_bins: baseline_bins as usize,
                created: now,
                expires: now + expires_in_days * 86_400,
            };
            let (bytes, m) = ops::pack(input, &keys.iter().collect::<Vec<_>>())?;
            std::fs::write(&out, &bytes).with_context(|| format!("{}", out.display()))?;
            println!(
                "packed {} v{} ({} bytes) into {}",
                m.name,
                m.version,
                bytes.len(),
                out.display()
            );
            Ok(0)
        }
        Cmd::Bundle(BundleCmd::Verify {
            file,
            trust,
            threshold,
            installed_version,
        }) => {
            let bytes = std::fs::read(&file).with_context(|| format!("{}", file.display()))?;
            let trust =
                TrustStore::parse(&std::fs::read_to_string(&trust).with_context(|| format!("{}", trust.display()))?)?;
            let installed = move |_: &str| installed_version;
            let policy = Policy {
                trust: &trust,
                threshold,
                now: ops::now_secs(),
                installed_version: &installed,
            };
            match bundle::verify(&bytes, &policy) {
                Ok(v) => {
                    println!(
                        "ok: {} v{} signed by {}",
                        v.manifest.name,
                        v.manifest.version,
                        v.signed_by.join(", ")
                    );
                    Ok(0)
                }
                Err(e) => {
                    println!("refused ({}): {e}", e.code());
                    Ok(1)
                }
            }
        }
        Cmd::Bundle(BundleCmd::Inspect { file, json }) => {
            let bytes = std::fs::read(&file).with_context(|| format!("{}", file.display()))?;
            let (m, env) = bundle::inspect(&bytes)?;
            let keyids: Vec<&str> = env.signatures.iter().map(|s| s.keyid.as_str()).collect();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"manifest": m, "signatures": keyids}))?
                );
            } else {
                println!("bundle     {} v{} (not verified)", m.name, m.version);
                println!(
                    "created    {}  expires {}",
                    lathe::status::utc(m.created),
                    lathe::status::utc(m.expires)
                );
                if let Some(input) = m.features() {
                    println!("input      {} float32 [{}]", input.name, input.features.join(", "));
                }
                for t in m.inputs.iter().flatten() {
                    let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
                    println!("input      {} {} [N, {}]", t.name, t.dtype, dims.join(", "));
                    if let Some(i) = &t.image {
                        println!(
                            "image      {} {} mean [{}] std [{}]",
                            i.channels,
                            i.layout,
                            i.mean.join(", "),
                            i.std.join(", ")
                        );
                    }
                }
                for o in &m.outputs {
                    println!("output     {} {}", o.name, o.dtype);
                }
                for p in &m.payloads {
                    println!(
                        "payload    {:?} {} {} bytes sha256 {}",
                        p.role, p.name, p.size, p.sha256
                    );
                }
                println!("signed by  {}", keyids.join(", "));
            }
            Ok(0)
        }
        Cmd::Deploy(args) => args.run(false).await,
        Cmd::Rollback(args) => args.run(true).await,
        Cmd::Rollout(RolloutCmd::Status {
            broker,
            conn,
            fleet,
            json,
        }) => {
            let fleet = fleet.map(Name::new).transpose()?;
            let states = rollout::reported(
                &conn.broker(&broker, 1 << 20)?,
                fleet.as_ref(),
                Duration::from_millis(500),
                Duration::from_secs(10),
            )
            .await?;
            if json {
                let v: Vec<serde_json::Value> = states
                    .iter()
                    .map(|((f, d, s), r)| {
                        let slot = (!s.is_empty()).then_some(s);
                        serde_json::json!({"fleet": f, "device": d, "slot": slot, "reported": r})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", rollout::render(&states));
            }
            Ok(0)
        }
        Cmd::Apply {
            file,
            broker,
            conn,
            sign,
            timeout_secs,
            dry_run,
        } => {
            let signers = read_keys(&sign.keys)?;
            let size = (sign.chunk_bytes as usize + 4096).max(1 << 20);
            lathe_hub::apply::apply(
                &file,
                lathe_hub::apply::Apply {
                    broker: conn.broker(&broker, size)?,
                    keys: signers.iter().collect(),
                    chunk_bytes: sign.chunk_bytes,
                    expires_in_secs: sign.expires_in_days * 86_400,
                    timeout: Duration::from_secs(timeout_secs),
                    dry_run,
                },
            )
            .await
        }
        Cmd::Rollout(RolloutCmd::Clear {
            at,
            bundle,
            chunk_bytes,
            force,
        }) => {
            let bytes = std::fs::read(&bundle).with_context(|| format!("{}", bundle.display()))?;
            let (broker, fleet) = at.resolve()?;
            let n = rollout::clear(&broker, &fleet, &bytes, chunk_bytes, force).await?;
            println!("cleared {n} retained chunk(s) of {}", bundle.display());
            Ok(0)
        }
        Cmd::Rollout(RolloutCmd::Keys {
            at,
            keys_file,
            threshold,
            keys,
            wait_for,
            timeout_secs,
        }) => {
            let text = std::fs::read_to_string(&keys_file).with_context(|| format!("{}", keys_file.display()))?;
            let store = TrustStore::parse(&text).with_context(|| format!("{}", keys_file.display()))?;
            let signers = read_keys(&keys)?;
            let wait_for = wait_for.into_iter().map(Name::new).collect::<Result<Vec<_>, _>>()?;
            let (broker, fleet) = at.resolve()?;
            rollout::publish_keys(
                &broker,
                &fleet,
                &store,
                threshold,
                &signers.iter().collect::<Vec<_>>(),
                &wait_for,
                Duration::from_secs(timeout_secs),
            )
            .await
        }
        Cmd::Serve {
            broker,
            conn,
            embedded_broker,
            listen,
            db,
            max_packet_bytes,
            max_batch_bytes,
        } => {
            let addr = if embedded_broker {
                broker::start(listen, max_packet_bytes)?;
                println!("embedded broker listening on {listen}");
                eprintln!(
                    "lathe-hub: the embedded broker is for demos and trials only: it has no authentication, \
                     no ACLs and no TLS; in production run Mosquitto with broker/mosquitto/ (README)"
                );
                listen.to_string()
            } else {
                broker.context("give --broker host:port or --embedded-broker")?
            };
            let shutdown = tokio_util::sync::CancellationToken::new();
            let sd = shutdown.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                sd.cancel();
            });
            let ingest = ingest::Ingest {
                broker: conn.broker(&addr, max_packet_bytes)?,
                client_id: format!("lathe-hub-ingest-{}", std::process::id()),
                db,
                max_batch_json: max_batch_bytes,
                stats: Arc::default(),
                echo: false,
            };
            ingest.run(shutdown).await?;
            Ok(0)
        }
        Cmd::Audit { db, json } => {
            let a = open_store(&db)?.audit()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&a)?);
            } else {
                print!("{}", lathe_hub::store::render_audit(&a));
            }
            let bad = a.epochs.iter().any(|e| e.unaccounted > 0);
            Ok(if bad { 1 } else { 0 })
        }
        Cmd::Drift {
            db,
            device,
            model,
            alerts,
            json,
        } => {
            let store = open_store(&db)?;
            let r = views::drift(&store, device.as_deref(), model.as_deref(), alerts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", views::render_drift(&r));
            }
            let alerting = r.devices.iter().any(|d| d.last.status == lathe::drift::Verdict::Alert);
            Ok(if alerting { 1 } else { 0 })
        }
        Cmd::Export {
            db,
            model,
            device,
            since,
            format,
            out,
        } => {
            let store = open_store(&db)?;
            let since = since.as_deref().map(views::parse_time).transpose()?.unwrap_or(0);
            let e = views::export(&store, &model, device.as_deref(), since, format, &out)?;
            println!(
                "wrote {} sample(s) in {} columns to {}",
                e.rows,
                e.columns,
                out.display()
            );
            if e.unreadable > 0 {
                println!("{} stored sample(s) could not be read and were skipped", e.unreadable);
            }
            Ok(0)
        }
        Cmd::Health { db, json } => {
            let rows = open_store(&db)?.health()?;
            if json {
                let v: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(f, d, at, data)| {
                        serde_json::json!({"fleet": f, "device": d, "received_ms": at,
                            "health": serde_json::from_str::<serde_json::Value>(data).unwrap_or_default()})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", views::render_health(&rows));
            }
            Ok(0)
        }
        Cmd::Demo(args) => demo::run(args).await,
    }
}

/// The store a reading command names with `--db`: it must exist (`serve` creates it).
fn open_store(db: &std::path::Path) -> anyhow::Result<lathe_hub::store::HubStore> {
    anyhow::ensure!(
        db.exists(),
        "no hub database at {}; give the --db that lathe-hub serve uses",
        db.display()
    );
    Ok(lathe_hub::store::HubStore::open(db)?)
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)?.write_all(bytes)?;
    Ok(())
}

/// `--shape NAME=D1,D2,…`.
fn parse_shape(text: &str) -> Result<(String, Vec<usize>), String> {
    let (name, dims) = text
        .split_once('=')
        .ok_or("expected NAME=D1,D2,… (the input's dimensions after the batch axis)")?;
    let dims = dims
        .split(',')
        .map(|d| d.trim().parse::<usize>().ok().filter(|d| *d > 0))
        .collect::<Option<Vec<_>>>()
        .ok_or("each dimension is a whole number above 0")?;
    if name.is_empty() {
        return Err("the input name is empty".into());
    }
    Ok((name.to_string(), dims))
}
