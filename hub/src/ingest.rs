//! The ingest service: receives sync batches, stores them, acks them.
//!
//! It subscribes to every device's sync topics (and, to log them, state and events), stores
//! each batch in one transaction, then publishes the ack. It re-subscribes on every ConnAck
//! and reconnects with backoff; a batch that arrives twice is stored once and acked again.

use crate::store::HubStore;
use protocol::messages::{Ack, SyncBatch};
use protocol::{topic::filter, Channel, Topic};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
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
}

pub struct Ingest {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub db: PathBuf,
    pub max_packet_bytes: usize,
    pub stats: Arc<IngestStats>,
    /// Print each state change and event of the devices (the demo turns this on).
    pub echo: bool,
}

impl Ingest {
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut store = HubStore::open(&self.db)?;
        let mut opts = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        opts.set_keep_alive(Duration::from_secs(15));
        opts.set_max_packet_size(self.max_packet_bytes, self.max_packet_bytes);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let mut backoff = Duration::from_millis(200);
        info!(broker = %format!("{}:{}", self.host, self.port), db = %self.db.display(), "ingest running");
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = eventloop.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(200);
                    // Straight to the front of the event loop's queue: never refused, sent first.
                    let filters = [filter::all_sync(), filter::all_state(), filter::all_events()]
                        .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                    eventloop
                        .pending
                        .push_front(rumqttc::Request::Subscribe(rumqttc::Subscribe::new_many(filters)));
                    info!("ingest connected");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = p.topic.clone();
                    let Ok(t) = topic.parse::<Topic>() else { continue };
                    match &t.channel {
                        Channel::Sync(stream) => self.on_batch(&mut store, &client, &t, stream.as_str(), &p.payload),
                        Channel::State if self.echo => {
                            println!(
                                "hub    | {}/{} state: {}",
                                t.fleet,
                                t.device,
                                String::from_utf8_lossy(&p.payload)
                            );
                        }
                        Channel::Events if self.echo => {
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
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "ingest connection lost");
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

    fn on_batch(&self, store: &mut HubStore, client: &AsyncClient, t: &Topic, stream: &str, payload: &[u8]) {
        let batch: SyncBatch = match serde_json::from_slice(payload) {
            Ok(b) => b,
            Err(e) => {
                warn!(fleet = %t.fleet, device = %t.device, error = %e, "malformed sync batch dropped");
                return;
            }
        };
        if batch.stream != stream || batch.device != t.device.as_str() {
            warn!(fleet = %t.fleet, device = %t.device, "sync batch names another device or stream than its topic; dropped");
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let stored =
            match tokio::task::block_in_place(|| store.store_batch(t.fleet.as_str(), t.device.as_str(), &batch, now)) {
                Ok(s) => s,
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
        self.stats.duplicates.fetch_add(stored.duplicates, Ordering::Relaxed);
        self.stats.lost.fetch_add(stored.newly_lost, Ordering::Relaxed);
        if stored.newly_lost > 0 {
            warn!(fleet = %t.fleet, device = %t.device, stream, lost = stored.newly_lost, "device reports records dropped by its when-full policy");
        }
        debug!(device = %t.device, stream, inserted = stored.inserted, duplicates = stored.duplicates, acked = stored.acked, "batch stored");
        let ack = Ack {
            stream: stream.to_string(),
            epoch: batch.epoch.clone(),
            acked: stored.acked,
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
