//! The outbox and its sync to the hub.
//!
//! One task owns the outbox ([`Store`]). Producers (inference, deploy) send it records through
//! a bounded channel; it writes each burst in one transaction. Per stream it keeps at most one
//! batch in flight: it sends the records above the acked watermark, waits for the hub's ack,
//! and deletes records only when an ack covers them. A batch not acked within the timeout, or
//! outstanding when the link comes back, is sent again; the hub drops the duplicates.
//!
//! The decisions are made by [`StreamSync`], which does no I/O.

use crate::config::SyncConfig;
use crate::link::ConnState;
use crate::metrics::Metrics;
use crate::store::{Limits, NewRecord, Store};
use protocol::messages::{Ack, Record, SyncBatch};
use protocol::{Channel, Name, Topic};
use rumqttc::{AsyncClient, QoS};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// The streams an agent syncs, in the order they are served.
pub const STREAMS: [&str; 2] = [protocol::streams::PREDICTIONS, protocol::streams::EVENTS];

/// What the sync task is sent.
#[derive(Debug)]
pub enum SyncMsg {
    Append(Vec<NewRecord>),
}

/// Per-stream send window, without I/O.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamSync {
    /// Every seq at or below this is acked.
    pub acked: u64,
    /// The last seq of the batch in flight, and when it was sent.
    pub inflight: Option<(u64, Instant)>,
}

impl StreamSync {
    pub fn new(acked: u64) -> Self {
        StreamSync { acked, inflight: None }
    }

    /// Whether a batch may be sent now.
    pub fn may_send(&self, now: Instant, ack_timeout: Duration) -> bool {
        match self.inflight {
            None => true,
            Some((_, sent)) => now.duration_since(sent) >= ack_timeout,
        }
    }

    pub fn sent(&mut self, last_seq: u64, now: Instant) {
        self.inflight = Some((last_seq, now));
    }

    /// Apply an ack; returns whether the watermark moved.
    pub fn on_ack(&mut self, acked: u64) -> bool {
        if let Some((last, _)) = self.inflight {
            if acked >= last {
                self.inflight = None;
            }
        }
        if acked > self.acked {
            self.acked = acked;
            true
        } else {
            false
        }
    }

    /// The link came back: whatever was in flight may be lost; send again.
    pub fn reconnected(&mut self) {
        self.inflight = None;
    }
}

pub struct SyncTask {
    pub store: Store,
    pub limits: Limits,
    pub cfg: SyncConfig,
    pub fleet: Name,
    pub device: Name,
    pub client: AsyncClient,
    pub rx: mpsc::Receiver<SyncMsg>,
    pub acks: mpsc::Receiver<Ack>,
    pub conn: watch::Receiver<ConnState>,
    pub metrics: Arc<Metrics>,
}

impl SyncTask {
    /// Runs until every producer has dropped its sender; then flushes and returns.
    pub async fn run(mut self) {
        let epoch = match self.store.epoch() {
            Ok(e) => e,
            Err(e) => {
                error!(error = %e, "cannot read the outbox epoch; sync stopped");
                return;
            }
        };
        let mut streams: Vec<(&'static str, StreamSync)> = STREAMS
            .iter()
            .map(|s| {
                (
                    *s,
                    StreamSync::new(self.store.stream_marks(s).map(|m| m.0).unwrap_or(0)),
                )
            })
            .collect();
        self.metrics.outbox_depth.set(self.store.depth());
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = Instant::now() - Duration::from_secs(60);
        let mut connected = *self.conn.borrow() == ConnState::Connected;
        let ack_timeout = Duration::from_millis(self.cfg.ack_timeout_ms);
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(SyncMsg::Append(first)) => {
                        let mut records = first;
                        while records.len() < 10_000 {
                            match self.rx.try_recv() {
                                Ok(SyncMsg::Append(more)) => records.extend(more),
                                Err(_) => break,
                            }
                        }
                        self.append(&records);
                    }
                    None => break,
                },
                Some(ack) = self.acks.recv() => {
                    if ack.epoch != epoch {
                        warn!(stream = %ack.stream, epoch = %ack.epoch, "ack for another outbox epoch ignored");
                        continue;
                    }
                    let Some((_, st)) = streams.iter_mut().find(|(s, _)| *s == ack.stream) else { continue };
                    if st.on_ack(ack.acked) {
                        match tokio::task::block_in_place(|| self.store.ack(&ack.stream, ack.acked)) {
                            Ok(n) => debug!(stream = %ack.stream, acked = ack.acked, deleted = n, "acked"),
                            Err(e) => error!(error = %e, "cannot apply ack"),
                        }
                        self.metrics.outbox_depth.set(self.store.depth());
                        let last = serde_json::json!({"ts_ms": now_ms(), "stream": ack.stream, "acked": ack.acked});
                        let _ = tokio::task::block_in_place(|| self.store.set_meta("last_ack", &last.to_string()));
                    }
                }
                changed = self.conn.changed() => {
                    if changed.is_err() {
                        // The link is gone (shutting down); keep flushing appends.
                        connected = false;
                        continue;
                    }
                    let state = self.conn.borrow_and_update().clone();
                    connected = state == ConnState::Connected;
                    if connected {
                        for (_, st) in streams.iter_mut() {
                            st.reconnected();
                        }
                    }
                    let (name, err) = match &state {
                        ConnState::Connected => ("connected", None),
                        ConnState::Connecting => ("connecting", None),
                        ConnState::Disconnected { error } => ("disconnected", Some(error.clone())),
                    };
                    let v = serde_json::json!({"state": name, "since_ms": now_ms(), "error": err});
                    let _ = tokio::task::block_in_place(|| self.store.set_meta("conn", &v.to_string()));
                }
                _ = tick.tick() => {
                    if heartbeat.elapsed() >= Duration::from_secs(5) {
                        heartbeat = Instant::now();
                        let _ = tokio::task::block_in_place(|| self.store.set_meta("heartbeat_ms", &now_ms().to_string()));
                    }
                }
            }
            if connected {
                let now = Instant::now();
                for (stream, st) in streams.iter_mut() {
                    if st.may_send(now, ack_timeout) {
                        self.send_batch(stream, &epoch, st, now);
                    }
                }
            }
        }
        let stopped = serde_json::json!({"state": "stopped", "since_ms": now_ms(), "error": null});
        let _ = tokio::task::block_in_place(|| self.store.set_meta("conn", &stopped.to_string()));
        info!(depth = self.store.depth(), "outbox flushed");
    }

    fn append(&mut self, records: &[NewRecord]) {
        match tokio::task::block_in_place(|| self.store.append(records, self.limits)) {
            Ok(out) => {
                if out.dropped > 0 {
                    self.metrics.dropped.add(out.dropped);
                    warn!(dropped = out.dropped, policy = ?self.limits.when_full, "outbox full: records dropped");
                }
            }
            Err(e) => {
                // The records stay with nobody: count them as dropped, loudly.
                self.metrics.dropped.add(records.len() as u64);
                error!(error = %e, records = records.len(), "cannot write to the outbox; records lost");
            }
        }
        self.metrics.outbox_depth.set(self.store.depth());
    }

    fn send_batch(&mut self, stream: &'static str, epoch: &str, st: &mut StreamSync, now: Instant) {
        let pending = match self
            .store
            .pending(stream, st.acked, self.cfg.batch_records, self.cfg.batch_bytes)
        {
            Ok(p) => p,
            Err(e) => {
                error!(error = %e, "cannot read the outbox");
                return;
            }
        };
        let Some(last) = pending.last().map(|r| r.seq) else {
            return;
        };
        let lost_through = self.store.stream_marks(stream).map(|m| m.1).unwrap_or(0);
        let records = pending
            .into_iter()
            .map(|r| Record {
                seq: r.seq,
                ts_ms: r.ts_ms,
                data: serde_json::from_str(&r.data).unwrap_or(serde_json::Value::String(r.data)),
            })
            .collect();
        let batch = SyncBatch {
            device: self.device.to_string(),
            stream: stream.to_string(),
            epoch: epoch.to_string(),
            lost_through,
            records,
        };
        let topic = Topic::new(
            &self.fleet,
            &self.device,
            Channel::Sync(Name::new(stream).expect("stream names are valid")),
        );
        let payload = serde_json::to_vec(&batch).expect("a batch serializes");
        match self
            .client
            .try_publish(topic.to_string(), QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => {
                st.sent(last, now);
                debug!(stream, last, "batch sent");
            }
            Err(e) => debug!(stream, error = %e, "batch not queued; will retry"),
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_batch_in_flight_until_ack_or_timeout() {
        // Time is passed in, so the test moves it by hand.
        let timeout = Duration::from_secs(10);
        let mut s = StreamSync::new(0);
        let t0 = Instant::now();
        assert!(s.may_send(t0, timeout));
        s.sent(5, t0);
        assert!(!s.may_send(t0, timeout));
        assert!(!s.may_send(t0 + Duration::from_secs(9), timeout));
        assert!(
            s.may_send(t0 + Duration::from_secs(10), timeout),
            "resend after the ack timeout"
        );
        // A partial ack moves the watermark but keeps the batch in flight.
        assert!(s.on_ack(3));
        assert!(s.inflight.is_some());
        assert!(s.on_ack(5));
        assert!(s.inflight.is_none());
        // A stale ack changes nothing.
        assert!(!s.on_ack(4));
        assert_eq!(s.acked, 5);
    }

    #[test]
    fn reconnect_resends() {
        let mut s = StreamSync::new(2);
        s.sent(9, Instant::now());
        s.reconnected();
        assert!(s.may_send(Instant::now(), Duration::from_secs(3600)));
        assert_eq!(s.acked, 2);
    }
}
