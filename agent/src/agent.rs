//! The running agent: every task and channel is wired here.
//!
//! ```text
//!  sensors ──► link (sensors) ──readings──► inference ──┐
//!                   ▲  (PUBACK once durable)            ├─appends─► sync (outbox) ──batches──► hub
//!  hub ──cmd──► link (hub) ──commands──► deploy ────────┘   │  ▲                 ◄────acks──── link (hub)
//!                   └──────────── refusals ─────────────────┘  └─ live copies once durable
//! ```
//!
//! Every channel is bounded in messages and, where messages can be large, in bytes. Shutdown:
//! the token stops the links and the producers; the sync task flushes what it was handed and
//! returns when the producers are gone; whatever has not finished after the drain time is
//! aborted.

use crate::config::{Config, ConfigError};
use crate::deploy::{birth, DeployTask, Deployer, Events, SharedModel, SlotDeploy};
use crate::inference::{InferenceTask, Watch};
use crate::link::{self, Backoff, ConnState, Limits as LinkLimits, Link, Refusals, Routes};
use crate::metrics::Metrics;
use crate::queue;
use crate::schedule;
use crate::store::{Limits, Store};
use crate::sync::{now_ms, LiveTopics, Outbox, SyncTask};
use crate::systemd::{Heartbeats, Notifier};
use protocol::keys::TrustStore;
use protocol::messages::{Health, State, Status};
use protocol::{topic::filter, Channel, Name, Topic};
use rumqttc::{AsyncClient, LastWill, QoS};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const DRAIN: Duration = Duration::from_secs(10);

/// Appends waiting for the outbox: messages, and bytes.
const OUTBOX_QUEUE: usize = 256;
const OUTBOX_QUEUE_BYTES: usize = 16 << 20;

/// Why the agent cannot start on its state_dir. Restarting does not help: `lathe run` exits
/// with the config code (78), which systemd does not restart on.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "state_dir {dir} is in use by another lathe agent{holder}; stop it first, or give this one its own state_dir"
    )]
    Locked { dir: std::path::PathBuf, holder: String },
    #[error(
        "state_dir {dir}: cannot {what}: permission denied; the user lathe runs as must own it \
         (chown -R that user {dir}) or set device.state_dir to a directory it may write"
    )]
    Permission { dir: std::path::PathBuf, what: String },
    #[error("state_dir {dir}: cannot {what}: {message}")]
    Unusable {
        dir: std::path::PathBuf,
        what: String,
        message: String,
    },
}

impl StartError {
    fn io(dir: &std::path::Path, what: impl std::fmt::Display, e: std::io::Error) -> StartError {
        let (dir, what) = (dir.to_path_buf(), what.to_string());
        match e.kind() {
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
                StartError::Permission { dir, what }
            }
            _ => StartError::Unusable {
                dir,
                what,
                message: e.to_string(),
            },
        }
    }
}

fn qos(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Make sure the state_dir exists, is readable and writable, and take its lock for the life
/// of the process: two agents on one outbox would assign the same seqs twice.
fn lock_state_dir(dir: &std::path::Path, db: &std::path::Path) -> Result<std::fs::File, StartError> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::DirBuilderExt;
    // Only the agent's user reads the outbox: it holds the plant's data.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StartError::io(dir, "create it", e))?;
    std::fs::read_dir(dir).map_err(|e| StartError::io(dir, "read it", e))?;
    let path = dir.join("lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StartError::io(dir, format_args!("open {}", path.display()), e))?;
    if f.try_lock().is_err() {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        let holder = match pid.trim() {
            "" => String::new(),
            p => format!(" (pid {p})"),
        };
        return Err(StartError::Locked {
            dir: dir.to_path_buf(),
            holder,
        });
    }
    let write_pid = |f: &mut std::fs::File| -> std::io::Result<()> {
        f.set_len(0)?;
        f.rewind()?;
        write!(f, "{}", std::process::id())
    };
    write_pid(&mut f).map_err(|e| StartError::io(dir, format_args!("write {}", path.display()), e))?;
    // SQLite creates its journal files beside the database, and writes the database itself.
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    std::fs::File::create(&probe).map_err(|e| StartError::io(dir, "create files in it", e))?;
    let _ = std::fs::remove_file(&probe);
    if db.exists() {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(db)
            .map_err(|e| StartError::io(dir, format_args!("write {}", db.display()), e))?;
    }
    Ok(f)
}

/// The trust store and threshold in force: the last key set the device accepted (SPEC §8.7),
/// kept in `state_dir/keyset.json`, or else the ones the config names.
pub fn load_trust(cfg: &Config) -> anyhow::Result<crate::deploy::Trust> {
    let kept = cfg.keyset_path();
    match std::fs::read(&kept) {
        Ok(body) => {
            let keys = protocol::keyset::parse_body(&body).map_err(|e| ConfigError::File {
                path: kept.clone(),
                message: format!(
                    "the key set this device accepted is unreadable: {e}; restore it, or remove it to trust trust.keys_file again"
                ),
            })?;
            let store = keys.trust().expect("parse_body checked the rules");
            Ok(crate::deploy::Trust {
                store,
                threshold: keys.threshold,
                key_set: Some(keys),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(crate::deploy::Trust {
            store: configured_trust(cfg)?,
            threshold: cfg.trust.threshold,
            key_set: None,
        }),
        Err(e) => Err(ConfigError::File {
            path: kept,
            message: format!("the key set this device accepted cannot be read: {e}"),
        }
        .into()),
    }
}

/// The trust store the config names, checked against its threshold.
fn configured_trust(cfg: &Config) -> anyhow::Result<TrustStore> {
    let keys_file = &cfg.trust.keys_file;
    let config_err = |message: String| ConfigError::File {
        path: keys_file.clone(),
        message,
    };
    let text = std::fs::read_to_string(keys_file).map_err(|e| config_err(format!("trust.keys_file: {e}")))?;
    let trust = TrustStore::parse(&text).map_err(|e| config_err(format!("trust.keys_file: {e}")))?;
    if trust.len() < cfg.trust.threshold {
        return Err(config_err(format!(
            "holds {} key(s), fewer than trust.threshold {}; no bundle could ever verify",
            trust.len(),
            cfg.trust.threshold
        ))
        .into());
    }
    Ok(trust)
}

/// A model slot's readings queue.
type Readings = (queue::Sender<link::Reading>, mpsc::Receiver<queue::Held<link::Reading>>);

/// The channels between the tasks.
struct Wires {
    /// One readings queue per model slot, in the order of `Config::slots`.
    readings: Vec<Readings>,
    commands: (
        queue::Sender<link::IncomingCommand>,
        mpsc::Receiver<queue::Held<link::IncomingCommand>>,
    ),
    rollouts: (
        queue::Sender<crate::rollout::RolloutMessage>,
        mpsc::Receiver<queue::Held<crate::rollout::RolloutMessage>>,
    ),
    acks: (
        mpsc::Sender<protocol::messages::Ack>,
        mpsc::Receiver<protocol::messages::Ack>,
    ),
    outbox: (Outbox, mpsc::Receiver<queue::Held<crate::sync::Append>>),
    hub_state: (watch::Sender<ConnState>, watch::Receiver<ConnState>),
    sensor_state: (watch::Sender<ConnState>, watch::Receiver<ConnState>),
}

pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (fleet, device) = (cfg.fleet(), cfg.device());
    let lock = lock_state_dir(&cfg.device.state_dir, &cfg.db_path())?;
    let trust = load_trust(&cfg)?;
    let metrics = Arc::new(Metrics::default());
    let beats = Arc::new(Heartbeats::default());
    if let Some(k) = &trust.key_set {
        info!(
            counter = k.counter,
            keys = k.keys.len(),
            threshold = k.threshold,
            "trusting the key set this device accepted (trust.keys_file is superseded)"
        );
    }
    // Where models run, decided before any is loaded.
    let placement = crate::engine::place(cfg.engine.device);
    match (&placement.reason, placement.requested) {
        (None, _) => info!(device = %placement.used, "models run on the {}", placement.used),
        (Some(why), crate::engine::Device::Cuda) => {
            warn!(reason = %why, "engine.device is cuda, but models run on the CPU")
        }
        (Some(why), _) => info!(reason = %why, "models run on the CPU"),
    }
    let slots = cfg.slots();
    let mut deployers = vec![];
    let mut startup_events = vec![];
    for slot in &slots {
        let name = slot.name.as_deref();
        let (deployer, events) = Deployer::open(
            Store::open(&cfg.db_path())?,
            cfg.slot_dir(name, false),
            trust.clone(),
            cfg.trust.max_bundle_bytes,
            slot.name.clone(),
        )?;
        let slot = name.unwrap_or("default");
        match deployer.active.load().as_ref().map(|m| m.model_ref()) {
            Some(m) => info!(slot, model = %m.name, version = m.version, "model active"),
            None => info!(slot, "no model deployed yet"),
        }
        deployers.push(deployer);
        startup_events.extend(events);
    }
    let actives: Vec<SharedModel> = deployers.iter().map(|d| d.active.clone()).collect();
    // The slots in the config's order, for `lathe status` ("" is the default slot).
    let order: Vec<&str> = slots.iter().map(|s| s.name.as_deref().unwrap_or("")).collect();
    deployers[0]
        .store
        .set_meta("slots", &serde_json::to_string(&order).expect("names serialize"))?;
    deployers[0].store.set_meta(
        "engine",
        &serde_json::to_string(placement).expect("a placement serializes"),
    )?;

    let w = Wires {
        readings: slots
            .iter()
            .map(|_| queue::channel(cfg.inputs.queue, cfg.inputs.queue_bytes))
            .collect(),
        commands: queue::channel(4, cfg.max_command_bytes()),
        rollouts: {
            // The chunks every slot asks for at once, and every retained desired state (a
            // slot's own and its groups') and the key set, which all come at a reconnect.
            let chunks = slots.len() * cfg.rollout.window;
            let signed = slots.len() * (1 + cfg.rollout.groups.len()) + 1;
            queue::channel(
                chunks + signed + 4,
                chunks * (cfg.max_chunk_bytes() as usize + 4096) + signed * protocol::rollout::MAX_DESIRED_BYTES,
            )
        },
        acks: mpsc::channel(64),
        outbox: queue::channel(OUTBOX_QUEUE, OUTBOX_QUEUE_BYTES),
        hub_state: watch::channel(ConnState::Connecting),
        sensor_state: watch::channel(ConnState::Connecting),
    };
    let refusals = Refusals {
        outbox: w.outbox.0.clone(),
        metrics: metrics.clone(),
    };
    let events = Events {
        outbox: w.outbox.0.clone(),
    };
    let (hub, client) = hub_link(
        &cfg,
        &fleet,
        &device,
        &w,
        &actives[0],
        refusals.clone(),
        metrics.clone(),
        &beats,
    )?;
    let sensors_stop = CancellationToken::new();
    let (readings_in, readings_out): (Vec<_>, Vec<_>) = w.readings.into_iter().unzip();
    let (sensors, sensor_link) = if cfg.input_topics().is_empty() {
        (None, None)
    } else {
        let routes = slots.iter().map(|s| s.topics.clone()).zip(readings_in).collect();
        let l = sensor_link(
            &cfg,
            routes,
            w.sensor_state.0,
            refusals,
            shutdown.clone(),
            metrics.clone(),
            &beats,
        )?;
        let client = l.client.clone();
        (
            Some(w.sensor_state.1),
            Some((client, tokio::spawn(l.run(sensors_stop.clone())))),
        )
    };
    let hub_shutdown = CancellationToken::new();
    let hub_task = tokio::spawn(hub.run(hub_shutdown.clone()));
    for e in startup_events {
        events.emit(e).await;
    }
    let (cron, schedule) = drift_schedule(&cfg, slots.len()).await?;
    let api = match cfg.api.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("api.listen {addr}: cannot listen: {e}"))?,
        ),
        None => None,
    };
    let sync_stop = CancellationToken::new();
    let mut sync = sync(
        &cfg,
        &fleet,
        &device,
        client.clone(),
        w.outbox.1,
        w.acks.1,
        w.hub_state.1.clone(),
        metrics.clone(),
        &beats,
    )?;
    sync.sensors = sensors;
    sync.stop = sync_stop.clone();
    let sync_task = tokio::spawn(sync.run());
    let producers_done = producers(
        &cfg,
        &fleet,
        &device,
        deployers,
        client.clone(),
        w.commands.1,
        w.rollouts.1,
        readings_out,
        schedule,
        events,
        w.outbox.0,
        w.hub_state.1,
        metrics,
        &beats,
        api,
        &shutdown,
    );

    info!(fleet = %fleet, device = %device, broker = %format!("{}:{}", cfg.broker.host, cfg.broker.port), "agent running");
    let notifier = notify_ready(beats, &shutdown);
    shutdown.cancelled().await;
    info!("shutting down");
    if let Some(n) = &notifier {
        let _ = n.send("STOPPING=1");
    }
    let drained = tokio::time::timeout(DRAIN, async {
        producers_done.await;
        // The producers are done: the outbox takes what is queued, writes it, and stops.
        sync_stop.cancel();
        let _ = sync_task.await;
    })
    .await;
    if drained.is_err() {
        warn!("drain time exceeded; aborting the remaining tasks");
    }
    if let Some(c) = cron {
        c.stop().await;
    }
    // The sensor link sends the PUBACKs of what was made durable, then disconnects.
    if let Some((client, task)) = sensor_link {
        stop_link(&client, task, sensors_stop).await;
    }
    say_goodbye(&client, &fleet, &device, hub_task, hub_shutdown).await;
    // No pid in the lock once stopped: `lathe status` reads it to tell a live agent.
    let _ = lock.set_len(0);
    Ok(())
}

/// Tell systemd the agent is ready (every model loaded, the store open, every task running)
/// and, when it asks for a watchdog, feed it while every task beats.
fn notify_ready(beats: Arc<Heartbeats>, shutdown: &CancellationToken) -> Option<Arc<Notifier>> {
    let notifier = match Notifier::from_env() {
        Ok(Some(n)) => Arc::new(n),
        Ok(None) => return None,
        Err(e) => {
            warn!(error = %e, "NOTIFY_SOCKET is set but unusable; systemd will not hear that the agent is ready");
            return None;
        }
    };
    if let Err(e) = notifier.send("READY=1\nSTATUS=running") {
        warn!(error = %e, "cannot tell systemd the agent is ready");
    }
    if let Some(period) = crate::systemd::watchdog_period() {
        tokio::spawn(crate::systemd::watchdog(
            notifier.clone(),
            period,
            beats,
            shutdown.clone(),
        ));
    }
    Some(notifier)
}

/// How long a link's event loop may go without an event: a keep-alive ping when idle, or a
/// failed connection (at most 10 s) and the longest back-off when the broker is away.
fn link_allowance(b: &crate::config::BrokerConfig) -> Duration {
    Duration::from_secs(b.keep_alive_secs + 10) + Duration::from_millis(b.backoff_max_ms) + crate::systemd::GRACE
}

/// The operator's drift schedule (`drift.schedule`), ticking each of `slots` model slots on a
/// channel of one: a tick that finds one waiting is not needed.
async fn drift_schedule(
    cfg: &Config,
    slots: usize,
) -> anyhow::Result<(Option<schedule::Running>, Vec<Option<mpsc::Receiver<()>>>)> {
    let Some(expr) = cfg.drift.schedule.as_deref().filter(|_| cfg.drift.enabled) else {
        return Ok((None, (0..slots).map(|_| None).collect()));
    };
    let s = schedule::Schedule::parse(expr, &cfg.drift.timezone)?;
    let (tx, mut rx) = mpsc::channel(1);
    let running = schedule::Running::start(&s, tx).await?;
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..slots).map(|_| mpsc::channel::<()>(1)).unzip();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            for t in &txs {
                let _ = t.try_send(());
            }
        }
    });
    info!(schedule = expr, timezone = %cfg.drift.timezone, "drift windows also close on schedule");
    Ok((Some(running), rxs.into_iter().map(Some).collect()))
}

/// The link to the readings' broker: its own connection (on `[inputs.broker]`, else on
/// `[broker]`), so readings never share a route with Lathe's own topics. At QoS 1 it keeps a
/// persistent session and PUBACKs a reading only once its prediction or refusal is durable,
/// so a crash loses no reading the broker handed over: the broker sends it again.
fn sensor_link(
    cfg: &Config,
    readings: Vec<(Vec<String>, queue::Sender<link::Reading>)>,
    state: watch::Sender<ConnState>,
    refusals: Refusals,
    accepting: CancellationToken,
    metrics: Arc<Metrics>,
    beats: &Heartbeats,
) -> anyhow::Result<Link> {
    let b = cfg.inputs.broker.as_ref().unwrap_or(&cfg.broker);
    let id = b.client_id.clone().map_or_else(
        || format!("lathe-{}-{}-sensors", cfg.fleet(), cfg.device()),
        |c| {
            if cfg.inputs.broker.is_some() {
                c
            } else {
                format!("{c}-sensors")
            }
        },
    );
    let input_qos = qos(cfg.inputs.qos);
    let mut opts = link::options(b, id, None)?;
    let manual_acks = input_qos == QoS::AtLeastOnce;
    if manual_acks {
        opts.set_clean_session(false);
        opts.set_manual_acks(true);
    }
    // Room for a PUBACK per reading that can be waiting anywhere in the pipeline.
    let (client, eventloop) = link::connect(opts, cfg.inputs.queue + OUTBOX_QUEUE + 64);
    Ok(Link {
        name: "sensors",
        eventloop,
        client,
        backoff: Backoff::new(
            Duration::from_millis(b.backoff_initial_ms),
            Duration::from_millis(b.backoff_max_ms),
        ),
        subscriptions: cfg.input_topics().into_iter().map(|t| (t, input_qos)).collect(),
        birth: None,
        routes: Routes {
            readings,
            ..Routes::default()
        },
        identity: None,
        state,
        limits: LinkLimits {
            reading_bytes: cfg.inputs.max_message_bytes,
            command_bytes: 0,
        },
        refusals,
        manual_acks,
        accepting,
        metrics,
        awaiting_suback: false,
        beat: beats.beat("sensor link", link_allowance(b)),
    })
}

/// The link to the hub's broker: commands and acks in, everything Lathe publishes out, with
/// a retained birth message and a Last Will that marks the device offline.
#[allow(clippy::too_many_arguments)]
fn hub_link(
    cfg: &Config,
    fleet: &Name,
    device: &Name,
    w: &Wires,
    active: &crate::deploy::SharedModel,
    refusals: Refusals,
    metrics: Arc<Metrics>,
    beats: &Heartbeats,
) -> anyhow::Result<(Link, AsyncClient)> {
    let state_topic = Topic::new(fleet, device, Channel::State).to_string();
    let lost = State {
        status: Status::Offline,
        agent_version: None,
        ts_ms: None,
        model: None,
        reason: Some("lost".into()),
    };
    let will = LastWill::new(&state_topic, serde_json::to_vec(&lost)?, QoS::AtLeastOnce, true);
    let client_id = cfg
        .broker
        .client_id
        .clone()
        .unwrap_or_else(|| format!("lathe-{fleet}-{device}"));
    let opts = link::options(&cfg.broker, client_id, Some(will))?;
    let (client, eventloop) = link::connect(opts, 256);
    let birth_model = active.clone();
    let mut desired: Vec<String> = cfg
        .slots()
        .iter()
        .flat_map(|s| {
            crate::rollout::Driver::desired_topics(
                fleet.as_str(),
                device.as_str(),
                &cfg.rollout.groups,
                s.name.as_deref(),
            )
        })
        .collect();
    desired.push(protocol::keyset::keys_topic(fleet.as_str()));
    let hub = Link {
        name: "hub",
        eventloop,
        client: client.clone(),
        backoff: Backoff::new(
            Duration::from_millis(cfg.broker.backoff_initial_ms),
            Duration::from_millis(cfg.broker.backoff_max_ms),
        ),
        subscriptions: [
            (filter::commands(fleet, device), QoS::AtLeastOnce),
            (filter::acks(fleet, device), QoS::AtLeastOnce),
        ]
        .into_iter()
        .chain(desired.iter().map(|t| (t.clone(), QoS::AtLeastOnce)))
        .collect(),
        birth: Some((
            state_topic,
            Arc::new(move || birth(birth_model.load().as_ref().map(|m| m.model_ref()))),
        )),
        routes: Routes {
            readings: vec![],
            commands: Some(w.commands.0.clone()),
            acks: Some(w.acks.0.clone()),
            rollout: Some((w.rollouts.0.clone(), desired)),
        },
        identity: Some((fleet.clone(), device.clone())),
        state: w.hub_state.0.clone(),
        limits: LinkLimits {
            reading_bytes: 0,
            command_bytes: cfg.max_command_bytes(),
        },
        refusals,
        manual_acks: false,
        accepting: CancellationToken::new(),
        metrics,
        awaiting_suback: false,
        beat: beats.beat("hub link", link_allowance(&cfg.broker)),
    };
    Ok((hub, client))
}

/// The outbox task.
#[allow(clippy::too_many_arguments)]
fn sync(
    cfg: &Config,
    fleet: &Name,
    device: &Name,
    client: AsyncClient,
    rx: mpsc::Receiver<queue::Held<crate::sync::Append>>,
    acks: mpsc::Receiver<protocol::messages::Ack>,
    conn: watch::Receiver<ConnState>,
    metrics: Arc<Metrics>,
    beats: &Heartbeats,
) -> anyhow::Result<SyncTask> {
    let mut store = Store::open(&cfg.db_path())?;
    store.limit_wal(cfg.outbox.max_wal_bytes)?;
    Ok(SyncTask {
        beat: beats.beat(
            "outbox",
            Duration::from_millis(cfg.sync.interval_ms) + crate::systemd::GRACE,
        ),
        store,
        limits: Limits {
            max_records: cfg.outbox.max_records,
            max_bytes: cfg.outbox.max_bytes,
            max_record_bytes: cfg.outbox.max_record_bytes,
            min_free_bytes: cfg.outbox.min_free_bytes,
            when_full: cfg.outbox.when_full,
        },
        cfg: cfg.sync.clone(),
        fleet: fleet.clone(),
        device: device.clone(),
        client,
        rx,
        acks,
        conn,
        metrics,
        live: LiveTopics {
            predictions: cfg.predictions.publish.then(|| {
                (
                    Topic::new(fleet, device, Channel::Predictions).to_string(),
                    qos(cfg.predictions.qos),
                )
            }),
            events: Topic::new(fleet, device, Channel::Events).to_string(),
        },
        state_dir: cfg.device.state_dir.clone(),
        max_wal_bytes: cfg.outbox.max_wal_bytes,
        sensors: None,
        stop: CancellationToken::new(),
    })
}

/// The rollout side of a slot of the deploy task, with the state it kept.
fn rollout_driver(
    cfg: &Config,
    fleet: &Name,
    device: &Name,
    deployer: &mut Deployer,
    client: AsyncClient,
    announces: bool,
    chunk_subs: crate::rollout::ChunkSubs,
) -> crate::rollout::Driver {
    let slot = deployer.slot.clone();
    let state = match deployer.store.get_meta(&deployer.key("rollout_state")) {
        Ok(Some(s)) => serde_json::from_str(&s).unwrap_or_else(|e| {
            warn!(error = %e, "the rollout state is unreadable; starting afresh (desired states are accepted again)");
            Default::default()
        }),
        Ok(None) => Default::default(),
        Err(e) => {
            warn!(error = %e, "cannot read the rollout state; starting afresh");
            Default::default()
        }
    };
    let settings = crate::rollout::Settings {
        groups: cfg.rollout.groups.clone(),
        window: cfg.rollout.window,
        chunk_timeout: Duration::from_secs(cfg.rollout.chunk_timeout_secs),
        retry: Duration::from_secs(cfg.rollout.retry_secs),
        dir: cfg.slot_dir(slot.as_deref(), true),
        max_chunk_bytes: cfg.max_chunk_bytes(),
        watch: cfg.rollout.watch.rules(),
        keyset_path: cfg.keyset_path(),
        slot,
        announces,
    };
    let mut driver = crate::rollout::Driver::new(settings, fleet.clone(), device.clone(), client, state);
    driver.chunk_subs = chunk_subs;
    driver.resume(deployer);
    driver
}

/// The tasks that make records: deploy (commands), inference (readings, one task per model
/// slot), health. They stop when the token fires; the returned future ends when all have.
#[allow(clippy::too_many_arguments)]
fn producers(
    cfg: &Config,
    fleet: &Name,
    device: &Name,
    deployers: Vec<Deployer>,
    client: AsyncClient,
    commands: mpsc::Receiver<queue::Held<link::IncomingCommand>>,
    rollouts: mpsc::Receiver<queue::Held<crate::rollout::RolloutMessage>>,
    readings: Vec<mpsc::Receiver<queue::Held<link::Reading>>>,
    schedules: Vec<Option<mpsc::Receiver<()>>>,
    events: Events,
    outbox: Outbox,
    conn: watch::Receiver<ConnState>,
    metrics: Arc<Metrics>,
    beats: &Heartbeats,
    api: Option<tokio::net::TcpListener>,
    shutdown: &CancellationToken,
) -> impl std::future::Future<Output = ()> {
    let mut set = JoinSet::new();
    let mut api_slots = vec![];
    let chunk_subs = crate::rollout::ChunkSubs::default();
    let mut watched = vec![];
    let mut slots = vec![];
    let configured = cfg.slots();
    for (i, ((mut deployer, rx), schedule)) in deployers.into_iter().zip(readings).zip(schedules).enumerate() {
        let driver = rollout_driver(
            cfg,
            fleet,
            device,
            &mut deployer,
            client.clone(),
            i == 0,
            chunk_subs.clone(),
        );
        // The first slot's latency is the one health has always carried.
        let latency = if i == 0 {
            metrics.latency.clone()
        } else {
            Arc::default()
        };
        watched.push((deployer.active.clone(), latency.clone()));
        let inference = InferenceTask {
            rx,
            active: deployer.active.clone(),
            outbox: outbox.clone(),
            live: cfg.predictions.publish,
            max_batch: cfg.inputs.max_batch,
            max_batch_bytes: cfg.inputs.max_batch_bytes,
            limits: crate::inference::Limits {
                max_id: cfg.inputs.max_id_bytes,
                max_image_pixels: cfg.inputs.max_image_pixels,
                max_values: cfg.inputs.max_batch_bytes / 4,
            },
            binary: configured.get(i).map(|s| s.binary.clone()).unwrap_or_default(),
            max_output_values: cfg.predictions.max_values,
            top_k: cfg.predictions.top_k,
            metrics: metrics.clone(),
            latency,
            watch: Watch::new(
                &cfg.drift,
                cfg.samples.clone(),
                deployer.slot.as_deref(),
                cfg.outbox.max_record_bytes,
            ),
            schedule,
            beat: beats.beat(
                format!("inference ({})", deployer.slot.as_deref().unwrap_or("default")),
                crate::systemd::IDLE_BEAT + crate::systemd::GRACE,
            ),
            api: api.as_ref().map(|_| {
                // One request waiting per connection the API serves at once.
                let (tx, rx) = mpsc::channel(cfg.api.max_connections);
                api_slots.push(crate::api::ApiSlot {
                    name: deployer.slot.clone(),
                    active: deployer.active.clone(),
                    calls: tx,
                });
                rx
            }),
        };
        set.spawn(inference.run(shutdown.clone()));
        slots.push(SlotDeploy { deployer, driver });
    }
    let deploy = DeployTask {
        slots,
        rx: commands,
        rollouts,
        hub_state: conn.clone(),
        client: client.clone(),
        fleet: fleet.clone(),
        device: device.clone(),
        events,
        metrics: metrics.clone(),
    };
    set.spawn(deploy.run(shutdown.clone()));
    if let Some(listener) = api {
        let api = crate::api::Api {
            listener,
            cfg: cfg.api.clone(),
            slots: api_slots,
            metrics: metrics.clone(),
            max_id: cfg.inputs.max_id_bytes,
        };
        set.spawn(api.run(shutdown.clone()));
    }
    set.spawn(health(
        Topic::new(fleet, device, Channel::Health).to_string(),
        Duration::from_secs(cfg.health.interval_secs),
        client,
        watched,
        conn,
        metrics,
        shutdown.clone(),
    ));
    async move { while set.join_next().await.is_some() {} }
}

/// Sample the box every interval, and publish health while connected. `slots`: each model
/// slot's active model and inference latency, the first slot's first.
async fn health(
    topic: String,
    every: Duration,
    client: AsyncClient,
    slots: Vec<(SharedModel, Arc<crate::metrics::Latencies>)>,
    conn: watch::Receiver<ConnState>,
    m: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut t = tokio::time::interval(every);
    let mut sampler = crate::system::Sampler::new();
    let mut others: Vec<Option<protocol::messages::Latency>> = vec![None; slots.len()];
    loop {
        tokio::select! { _ = shutdown.cancelled() => break, _ = t.tick() => {} }
        let sampled = tokio::task::block_in_place(|| sampler.sample());
        let models: Vec<_> = slots
            .iter()
            .map(|(a, _)| a.load().as_ref().map(|a| a.model_ref()))
            .collect();
        let model = models[0].clone();
        let snapshot = {
            let mut s = m.snapshot.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((system, process)) = sampled {
                s.system = Some(system);
                s.process = Some(process);
            }
            for (i, ((_, latency), model)) in slots.iter().zip(&models).enumerate() {
                let (Some((calls, rows, p50_us, p99_us)), Some(model)) = (latency.take(), model.clone()) else {
                    continue;
                };
                let l = protocol::messages::Latency {
                    model,
                    calls,
                    rows,
                    p50_us,
                    p99_us,
                };
                if i == 0 {
                    s.latency = Some(l);
                } else {
                    others[i] = Some(l);
                }
            }
            // Each other slot's last latency, while it is of the model the slot runs.
            for (o, model) in others.iter_mut().zip(&models) {
                if o.as_ref().is_some_and(|l| Some(&l.model) != model.as_ref()) {
                    *o = None;
                }
            }
            s.latencies = others.iter().flatten().cloned().collect();
            s.clone()
        };
        if !matches!(*conn.borrow(), ConnState::Connected | ConnState::Refused { .. }) {
            continue;
        }
        let oldest = m.oldest_ms.get();
        let h = Health {
            ts_ms: now_ms(),
            model,
            outbox_depth: m.outbox_depth.get(),
            outbox_bytes: m.outbox_bytes.get(),
            oldest_age_ms: (oldest > 0).then(|| now_ms().saturating_sub(oldest)),
            disk_free_bytes: Some(m.disk_free.get()).filter(|f| *f != u64::MAX),
            readings_total: m.readings.get(),
            predictions_total: m.predictions.get(),
            rejected_total: m.rejected.get(),
            inference_failed_total: m.inference_failed.get(),
            dropped_total: m.dropped.get(),
            losses: m.loss_totals(),
            system: snapshot.system,
            process: snapshot.process,
            latency: snapshot.latency,
            latencies: snapshot.latencies,
            outbox: snapshot.outbox,
        };
        let _ = client.try_publish(
            topic.clone(),
            QoS::AtMostOnce,
            false,
            serde_json::to_vec(&h).expect("health serializes"),
        );
    }
}

/// Say goodbye on the hub link (retained offline state), then stop it.
async fn say_goodbye(
    client: &AsyncClient,
    fleet: &Name,
    device: &Name,
    hub_task: tokio::task::JoinHandle<()>,
    hub_shutdown: CancellationToken,
) {
    let bye = State {
        status: Status::Offline,
        agent_version: None,
        ts_ms: Some(now_ms()),
        model: None,
        reason: Some("shutdown".into()),
    };
    let topic = Topic::new(fleet, device, Channel::State).to_string();
    let _ = client.try_publish(
        topic,
        QoS::AtLeastOnce,
        true,
        serde_json::to_vec(&bye).expect("state serializes"),
    );
    stop_link(client, hub_task, hub_shutdown).await;
}

/// Disconnect a link after what is queued on it; cancel it if that takes long.
async fn stop_link(client: &AsyncClient, mut task: tokio::task::JoinHandle<()>, stop: CancellationToken) {
    let _ = client.try_disconnect();
    if tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_err() {
        stop.cancel();
        let _ = task.await;
    }
}
