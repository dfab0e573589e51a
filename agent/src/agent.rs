//! The running agent: every task and channel is wired here.
//!
//! ```text
//!  sensors ──► link (inputs) ──readings──► inference ──records──► sync ──batches──► hub
//!                                                ▲                  ▲  ◄────acks──── link (hub)
//!  hub ──cmd──► link (hub) ──commands──► deploy ─┘ (active model)   │
//!                                          └──────events────────────┘
//! ```
//!
//! Every channel is bounded. Shutdown: the token stops the links and the producers; the sync
//! task flushes what it was handed and returns when the producers are gone; whatever has not
//! finished after the drain time is aborted.

use crate::config::{Config, ConfigError};
use crate::deploy::{birth, DeployTask, Deployer, Events};
use crate::inference::InferenceTask;
use crate::link::{self, Backoff, ConnState, Link, Routes};
use crate::metrics::Metrics;
use crate::store::{Limits, Store};
use crate::sync::{now_ms, SyncTask};
use anyhow::Context;
use protocol::keys::TrustStore;
use protocol::messages::{Health, State, Status};
use protocol::{topic::filter, Channel, Topic};
use rumqttc::{AsyncClient, LastWill, QoS};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const DRAIN: Duration = Duration::from_secs(10);

fn qos(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (fleet, device) = (cfg.fleet(), cfg.device());
    std::fs::create_dir_all(&cfg.device.state_dir)
        .with_context(|| format!("cannot create state_dir {}", cfg.device.state_dir.display()))?;
    let keys_file = &cfg.trust.keys_file;
    let config_err = |message: String| ConfigError::File {
        path: keys_file.clone(),
        message,
    };
    let trust_text = std::fs::read_to_string(keys_file).map_err(|e| config_err(format!("trust.keys_file: {e}")))?;
    let trust = TrustStore::parse(&trust_text).map_err(|e| config_err(format!("trust.keys_file: {e}")))?;
    if trust.len() < cfg.trust.threshold {
        return Err(config_err(format!(
            "holds {} key(s), fewer than trust.threshold {}; no bundle could ever verify",
            trust.len(),
            cfg.trust.threshold
        ))
        .into());
    }
    let metrics = Arc::new(Metrics::default());

    let (deployer, startup_events) = Deployer::open(
        Store::open(&cfg.db_path())?,
        cfg.bundles_dir(),
        trust,
        cfg.trust.threshold,
        cfg.trust.max_bundle_bytes,
    )?;
    let active = deployer.active.clone();
    let current = active.load().as_ref().map(|m| m.model_ref());
    match &current {
        Some(m) => info!(model = %m.name, version = m.version, "model active"),
        None => info!("no model deployed yet"),
    }

    // The hub link, with a Last Will that marks the device offline.
    let state_topic = Topic::new(&fleet, &device, Channel::State).to_string();
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
    let opts = link::options(&cfg.broker, client_id.clone(), Some(will))?;
    let (client, eventloop) = AsyncClient::new(opts, 256);

    let (readings_tx, readings_rx) = mpsc::channel(cfg.inputs.queue);
    let (commands_tx, commands_rx) = mpsc::channel(4);
    let (acks_tx, acks_rx) = mpsc::channel(64);
    let (sync_tx, sync_rx) = mpsc::channel(256);
    let (hub_state_tx, hub_state_rx) = watch::channel(ConnState::Connecting);

    let input_qos = qos(cfg.inputs.qos);
    let mut hub_subs = vec![
        (filter::commands(&fleet, &device), QoS::AtLeastOnce),
        (filter::acks(&fleet, &device), QoS::AtLeastOnce),
    ];
    let mut hub_routes = Routes {
        readings: None,
        commands: Some(commands_tx),
        acks: Some(acks_tx),
    };
    let mut tasks = tokio::task::JoinSet::new();

    match &cfg.inputs.broker {
        None => {
            hub_subs.extend(cfg.inputs.topics.iter().map(|t| (t.clone(), input_qos)));
            hub_routes.readings = Some(readings_tx);
        }
        Some(b) => {
            let id = b.client_id.clone().unwrap_or_else(|| format!("{client_id}-sensors"));
            let (sclient, sloop) = AsyncClient::new(link::options(b, id, None)?, 64);
            let sensors = Link {
                name: "sensors",
                eventloop: sloop,
                client: sclient,
                backoff: Backoff::new(
                    Duration::from_millis(b.backoff_initial_ms),
                    Duration::from_millis(b.backoff_max_ms),
                ),
                subscriptions: cfg.inputs.topics.iter().map(|t| (t.clone(), input_qos)).collect(),
                birth: None,
                routes: Routes {
                    readings: Some(readings_tx),
                    commands: None,
                    acks: None,
                },
                identity: None,
                state: watch::channel(ConnState::Connecting).0,
                metrics: metrics.clone(),
            };
            tasks.spawn(sensors.run(shutdown.clone()));
        }
    }

    let birth_model = active.clone();
    let hub = Link {
        name: "hub",
        eventloop,
        client: client.clone(),
        backoff: Backoff::new(
            Duration::from_millis(cfg.broker.backoff_initial_ms),
            Duration::from_millis(cfg.broker.backoff_max_ms),
        ),
        subscriptions: hub_subs,
        birth: Some((
            state_topic.clone(),
            Arc::new(move || birth(birth_model.load().as_ref().map(|m| m.model_ref()))),
        )),
        routes: hub_routes,
        identity: Some((fleet.clone(), device.clone())),
        state: hub_state_tx,
        metrics: metrics.clone(),
    };
    let hub_shutdown = CancellationToken::new();
    let hub_task = tokio::spawn(hub.run(hub_shutdown.clone()));

    let events = Events {
        client: client.clone(),
        topic: Topic::new(&fleet, &device, Channel::Events).to_string(),
        sync: sync_tx.clone(),
        conn: hub_state_rx.clone(),
    };
    for e in startup_events {
        events.emit(e).await;
    }

    let sync = SyncTask {
        store: Store::open(&cfg.db_path())?,
        limits: Limits {
            max_records: cfg.outbox.max_records,
            when_full: cfg.outbox.when_full,
        },
        cfg: cfg.sync.clone(),
        fleet: fleet.clone(),
        device: device.clone(),
        client: client.clone(),
        rx: sync_rx,
        acks: acks_rx,
        conn: hub_state_rx.clone(),
        metrics: metrics.clone(),
    };
    let sync_task = tokio::spawn(sync.run());

    let deploy = DeployTask {
        deployer,
        rx: commands_rx,
        client: client.clone(),
        fleet: fleet.clone(),
        device: device.clone(),
        events: events.clone(),
        metrics: metrics.clone(),
    };
    let inference = InferenceTask {
        rx: readings_rx,
        active: active.clone(),
        sync: sync_tx.clone(),
        events: events.clone(),
        client: client.clone(),
        pred_topic: Topic::new(&fleet, &device, Channel::Predictions).to_string(),
        publish: cfg.predictions.publish.then(|| qos(cfg.predictions.qos)),
        conn: hub_state_rx.clone(),
        max_batch: cfg.inputs.max_batch,
        metrics: metrics.clone(),
    };
    // Producers stop when the token fires: their input channels close with the links, and
    // the health task watches the token.
    let producers_done = {
        let mut producers = tokio::task::JoinSet::new();
        producers.spawn(deploy.run(shutdown.clone()));
        producers.spawn(inference.run(shutdown.clone()));
        let health_topic = Topic::new(&fleet, &device, Channel::Health).to_string();
        let (hc, hm, ha, sd) = (client.clone(), metrics.clone(), active.clone(), shutdown.clone());
        let hconn = hub_state_rx.clone();
        let every = Duration::from_secs(cfg.health.interval_secs);
        producers.spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                tokio::select! { _ = sd.cancelled() => break, _ = t.tick() => {} }
                if *hconn.borrow() != ConnState::Connected {
                    continue;
                }
                let h = Health {
                    ts_ms: now_ms(),
                    model: ha.load().as_ref().map(|m| m.model_ref()),
                    outbox_depth: hm.outbox_depth.get(),
                    predictions_total: hm.predictions.get(),
                    rejected_total: hm.rejected.get(),
                    dropped_total: hm.dropped.get(),
                };
                let _ = hc.try_publish(
                    health_topic.clone(),
                    QoS::AtMostOnce,
                    false,
                    serde_json::to_vec(&h).expect("health serializes"),
                );
            }
        });
        drop(events);
        drop(sync_tx);
        async move { while producers.join_next().await.is_some() {} }
    };

    info!(fleet = %fleet, device = %device, broker = %format!("{}:{}", cfg.broker.host, cfg.broker.port), "agent running");
    shutdown.cancelled().await;
    info!("shutting down");
    let drained = tokio::time::timeout(DRAIN, async {
        producers_done.await;
        let _ = sync_task.await;
    })
    .await;
    if drained.is_err() {
        warn!("drain time exceeded; aborting the remaining tasks");
    }
    // Say goodbye on the hub link, then stop it.
    let bye = State {
        status: Status::Offline,
        agent_version: None,
        ts_ms: Some(now_ms()),
        model: None,
        reason: Some("shutdown".into()),
    };
    let _ = client.try_publish(state_topic, QoS::AtLeastOnce, true, serde_json::to_vec(&bye)?);
    let _ = client.try_disconnect();
    // The link stops by itself once the disconnect is sent; it is cancelled if that takes long.
    let mut hub_task = hub_task;
    if tokio::time::timeout(Duration::from_secs(2), &mut hub_task)
        .await
        .is_err()
    {
        hub_shutdown.cancel();
        let _ = hub_task.await;
    }
    tasks.abort_all();
    Ok(())
}
