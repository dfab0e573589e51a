//! The ingest service: receives sync batches, stores them, acks them.
//!
//! It subscribes to every device's sync topics, health (it keeps each device's last one) and,
//! to log them, state and events, decodes
//! each batch within a size limit (zstd or plain JSON), stores it in one transaction, then
//! publishes the ack. It re-subscribes on every ConnAck and reconnects with backoff; a batch
//! that arrives twice is stored once and acked again. Acks say which encodings the hub
//! accepts, so agents compress only for a hub that can read it.

use crate::store::{HubStore, StoreError};
use lathe::config::BrokerConfig;
use protocol::messages::{Ack, SyncBatch};
use protocol::{topic::filter, Channel, Topic};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The largest health message the hub keeps.
const MAX_HEALTH_BYTES: usize = 64 << 10;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Counters, for the demo and for logs.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub batches: AtomicU64,
    pub inserted: AtomicU64,
    /// Inserted records of the predictions stream.
    pub predictions: AtomicU64,
    pub duplicates: AtomicU64,
    pub lost: AtomicU64,
    pub hub_lost: AtomicU64,
    pub conflicts: AtomicU64,
    /// Batches dropped unacked: malformed, too large, or naming another device.
    pub refused: AtomicU64,
}

pub struct Ingest {
    pub broker: BrokerConfig,
    pub client_id: String,
    pub db: PathBuf,
    /// The largest batch JSON accepted, after decompression.
    pub max_batch_json: usize,
    pub stats: Arc<IngestStats>,
    /// Print each state change and event of the devices (the demo turns this on).
    pub echo: bool,
}

impl Ingest {
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut store = HubStore::open(&self.db)?;
        let opts = lathe::link::options(&self.broker, self.client_id.clone(), None)?;
        let (client, mut eventloop) = lathe::link::connect(opts, 1024);
        let mut backoff = Duration::from_millis(200);
        let broker = format!("{}:{}", self.broker.host, self.broker.port);
        info!(broker = %broker, db = %self.db.display(), "ingest starting");
        let mut connected = false;
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = eventloop.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(200);
                    // Straight to the front of the event loop's queue: never refused, sent first.
                    let filters = [
                        filter::all_sync(),
                        filter::all_state(),
                        filter::all_events(),
                        filter::all_health(),
                    ]
                    .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                    eventloop
                        .pending
                        .push_front(rumqttc::Request::Subscribe(rumqttc::Subscribe::new_many(filters)));
                    connected = true;
                    info!(broker = %broker, "ingest connected");
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        warn!(codes = ?ack.return_codes, "the broker refused a subscription of the ingest service; check its ACL");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = p.topic.clone();
                    let Ok(t) = topic.parse::<Topic>() else { continue };
                    match &t.channel {
                        Channel::Sync(stream) => self.on_batch(&mut store, &client, &t, stream.as_str(), &p.payload),
                        Channel::Health => self.on_health(&mut store, &t, &p.payload),
                        Channel::State if self.echo => {
                            println!(
                                "hub    | {}/{} state: {}",
                                t.fleet,
                                t.device,
                                String::from_utf8_lossy(&p.payload[..p.payload.len().min(512)])
                            );
                        }
                        Channel::Events if self.echo && p.payload.len() <= 64 << 10 => {
                            if let Ok(e) = serde_json::from_slice::<protocol::messages::Event>(&p.payload) {
                                println!("hub    | {}/{} event {}: {}", t.fleet, t.device, e.kind, e.message);
                            }
                        }
                        _ => {}
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // Acks queued for the dead connection are stale; devices resend and get new ones.
                    eventloop.clean();
                    eventloop.pending.clear();
                    let retry_in_ms = backoff.as_millis() as u64;
                    if std::mem::take(&mut connected) {
                        warn!(broker = %broker, error = %e, retry_in_ms, "ingest connection lost");
                    } else {
                        warn!(broker = %broker, error = %e, retry_in_ms, "ingest cannot connect to the broker");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        Ok(())
    }

    /// Keep a device's last health message (SPEC §3.2), if it is one.
    fn on_health(&self, store: &mut HubStore, t: &Topic, payload: &[u8]) {
        if payload.len() > MAX_HEALTH_BYTES {
            warn!(fleet = %t.fleet, device = %t.device, bytes = payload.len(), "health message too large; not stored");
            return;
        }
        let h: protocol::messages::Health = match serde_json::from_slice(payload) {
            Ok(h) => h,
            Err(e) => {
                warn!(fleet = %t.fleet, device = %t.device, error = %e, "malformed health message; not stored");
                return;
            }
        };
        let Ok(text) = std::str::from_utf8(payload) else { return };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Err(e) =
            tokio::task::block_in_place(|| store.set_health(t.fleet.as_str(), t.device.as_str(), h.ts_ms, text, now))
        {
            warn!(error = %e, "cannot store a health message");
        }
    }

    fn refuse(&self, t: &Topic, why: &str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        warn!(fleet = %t.fleet, device = %t.device, why, "sync batch dropped, not acked");
    }

    fn on_batch(&self, store: &mut HubStore, client: &AsyncClient, t: &Topic, stream: &str, payload: &[u8]) {
        let json = match protocol::sync::decode(payload, self.max_batch_json) {
            Ok(j) => j,
            Err(e) => return self.refuse(t, &e.to_string()),
        };
        let batch: SyncBatch = match serde_json::from_slice(&json) {
            Ok(b) => b,
            Err(e) => return self.refuse(t, &format!("malformed: {e}")),
        };
        if batch.stream != stream || batch.device != t.device.as_str() {
            return self.refuse(t, "the batch names another device or stream than its topic");
        }
        if batch.epoch.len() != 16 || !batch.epoch.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return self.refuse(t, "the epoch is not 16 hex digits");
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let stored =
            match tokio::task::block_in_place(|| store.store_batch(t.fleet.as_str(), t.device.as_str(), &batch, now)) {
                Ok(s) => s,
                Err(StoreError::Malformed(m)) => return self.refuse(t, &m),
                Err(e) => {
                    // Not acked: the device keeps the records and sends them again.
                    warn!(error = %e, "cannot store sync batch; not acked");
                    return;
                }
            };
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.inserted.fetch_add(stored.inserted, Ordering::Relaxed);
        if stream == protocol::streams::PREDICTIONS {
            self.stats.predictions.fetch_add(stored.inserted, Ordering::Relaxed);
        }
        self.stats
            .duplicates
            .fetch_add(stored.duplicates + stored.moved_copies, Ordering::Relaxed);
        self.stats.lost.fetch_add(stored.newly_lost, Ordering::Relaxed);
        self.stats.hub_lost.fetch_add(stored.hub_lost, Ordering::Relaxed);
        if stored.newly_lost > 0 {
            warn!(fleet = %t.fleet, device = %t.device, stream, lost = stored.newly_lost, "device declares records it dropped");
        }
        if stored.hub_lost > 0 {
            warn!(fleet = %t.fleet, device = %t.device, stream, lost = stored.hub_lost, epoch = %batch.epoch,
                "this store lacks records the device was acked for (restored or replaced database); recorded as the hub's loss");
        }
        if let Some(c) = stored.conflict {
            self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
            warn!(fleet = %t.fleet, device = %t.device, stream, seq = c, epoch = %batch.epoch,
                "a different record is stored under this identity (restored device or impostor); the device is told to move to a new epoch");
        }
        debug!(device = %t.device, stream, inserted = stored.inserted, duplicates = stored.duplicates, acked = stored.acked, "batch stored");
        let ack = Ack {
            stream: stream.to_string(),
            epoch: batch.epoch.clone(),
            acked: stored.acked,
            conflict: stored.conflict,
            accepts: vec![protocol::sync::ZSTD.to_string()],
        };
        let ack_topic = Topic::new(
            &t.fleet,
            &t.device,
            Channel::Ack(protocol::Name::new(stream).expect("checked by the topic parser")),
        );
        if let Err(e) = client.try_publish(
            ack_topic.to_string(),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&ack).expect("ack serializes"),
        ) {
            warn!(error = %e, "ack not queued; the device will resend");
        }
    }
}
