//! The outbox and its sync to the hub.
//!
//! One task owns the outbox ([`Store`]). Producers (inference, deploy) send it records and
//! loss counts through a channel bounded in messages and in bytes; it writes each burst in
//! one transaction and only then publishes the live copies (`pred`, `events`) and PUBACKs the
//! readings the burst came from: nothing is seen live or acknowledged upstream before it is
//! durable.
//!
//! Per stream it keeps a window of batches in flight: it sends the records above the acked
//! watermark, and deletes records only when a valid ack covers them. An ack is believed only
//! as far as the agent can check it: one for another epoch is ignored, one above the highest
//! seq assigned in the epoch is never applied (a forgery, or an outbox restored from an older
//! copy) and moves the unacknowledged records to a new epoch, and one above what this process
//! has sent is cut down to that. A batch not acked in time, or outstanding when the link comes
//! back, is sent again; the hub drops the duplicates.
//!
//! Streams are served in the order of [`crate::store::STREAMS`]: events, loss reports and drift
//! windows before samples and predictions, so that under an uplink cap or a backlog what
//! matters most goes first. Live copies of events are published before those of predictions.
//!
//! The decisions are made by [`StreamSync`], [`judge_ack`] and [`TokenBucket`], which do no
//! I/O.

use crate::config::{Compression, SyncConfig};
use crate::link::{ConnState, PubAck};
use crate::metrics::Metrics;
use crate::queue;
use crate::store::{cause, Limits, Loss, NewRecord, Store};
use protocol::messages::{Ack, Event, Level};
use protocol::sync::{BatchHeader, BatchWriter};
use protocol::{Channel, Name, Topic};
use rumqttc::{AsyncClient, QoS};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// A record a producer hands to the outbox, and whether to publish it live once durable.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub record: NewRecord,
    pub live: bool,
}

/// What the sync task is sent: records to append, losses to count, and readings to PUBACK
/// once both are durable. It travels on a [`queue`] bounded in messages and bytes.
#[derive(Debug, Default)]
pub struct Append {
    pub records: Vec<Outgoing>,
    pub losses: Vec<Loss>,
    pub acks: Vec<PubAck>,
    /// Small state for `lathe status` (key, JSON), written after the records.
    pub meta: Vec<(String, String)>,
}

impl Append {
    /// The bytes this message holds, for the byte budget.
    pub fn bytes(&self) -> usize {
        self.records.iter().map(|r| r.record.data.len() + 64).sum::<usize>()
            + self.meta.iter().map(|m| m.1.len() + 32).sum::<usize>()
            + 64
    }
}

/// The sending end of the outbox channel. Producers that can wait (inference, deploy) use
/// `send` and are back-pressured; links use `try_send` and count what does not fit.
pub type Outbox = queue::Sender<Append>;

/// What an ack means, given what the agent knows of the stream (all in local seqs but the
/// ack's own number, which is a wire seq of `epoch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckVerdict {
    /// For an epoch that is not the stream's current one: ignored.
    OtherEpoch,
    /// At or below the watermark: changes nothing.
    Stale,
    /// Delete through this local seq.
    Advance(u64),
    /// Above the highest seq ever assigned in the epoch: never applied.
    Beyond { acked: u64, assigned: u64 },
}

/// Judge an ack for the current epoch `epoch` whose wire seq 1 is local `base + 1`. An ack
/// above `sent_hi` (the highest local seq this process sent) but within what was assigned is
/// cut down to `sent_hi`: what was not sent cannot have been stored.
pub fn judge_ack(ack: &Ack, epoch: &str, base: u64, assigned_wire: u64, acked: u64, sent_hi: u64) -> AckVerdict {
    if ack.epoch != epoch {
        return AckVerdict::OtherEpoch;
    }
    if ack.acked > assigned_wire {
        return AckVerdict::Beyond {
            acked: ack.acked,
            assigned: assigned_wire,
        };
    }
    let local = (base + ack.acked).min(sent_hi);
    if local <= acked {
        AckVerdict::Stale
    } else {
        AckVerdict::Advance(local)
    }
}

/// One batch in flight: its local seqs and when it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub first: u64,
    pub last: u64,
    pub sent: Instant,
}

/// Per-stream send window, without I/O. All seqs are local.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamSync {
    /// Every seq at or below this is acked.
    pub acked: u64,
    /// Batches sent and not yet acked, oldest first.
    pub inflight: VecDeque<InFlight>,
    /// The highest seq sent in the current epoch by this process.
    pub sent_hi: u64,
    /// Records below this were made before the current connection: historical.
    pub live_from: u64,
    /// When the stream last moved to a new epoch.
    pub last_rebase: Option<Instant>,
}

impl StreamSync {
    pub fn new(acked: u64) -> Self {
        StreamSync {
            acked,
            ..Default::default()
        }
    }

    /// The local seq after which the next batch starts.
    pub fn next_after(&self) -> u64 {
        self.inflight.back().map_or(self.acked, |b| b.last).max(self.acked)
    }

    /// Whether a batch may be sent now. A window whose oldest batch timed out is emptied: the
    /// next batch starts again above the watermark.
    pub fn may_send(&mut self, now: Instant, window: usize, ack_timeout: Duration) -> bool {
        if self
            .inflight
            .front()
            .is_some_and(|b| now.duration_since(b.sent) >= ack_timeout)
        {
            self.inflight.clear();
        }
        self.inflight.len() < window
    }

    pub fn sent(&mut self, first: u64, last: u64, now: Instant) {
        self.inflight.push_back(InFlight { first, last, sent: now });
        self.sent_hi = self.sent_hi.max(last);
    }

    /// Apply a valid ack (local seq); returns whether the watermark moved.
    pub fn on_ack(&mut self, acked: u64) -> bool {
        while self.inflight.front().is_some_and(|b| b.last <= acked) {
            self.inflight.pop_front();
        }
        if acked > self.acked {
            self.acked = acked;
            true
        } else {
            false
        }
    }

    /// The link came back: whatever was in flight may be lost; send again. Records made
    /// before `next` are historical from now on.
    pub fn reconnected(&mut self, next: u64) {
        self.inflight.clear();
        self.live_from = next;
    }

    /// The stream moved to a new epoch: nothing of the old one is in flight any more.
    pub fn rebased(&mut self, now: Instant) {
        self.inflight.clear();
        self.sent_hi = self.acked;
        self.last_rebase = Some(now);
    }

    /// Whether a new move to another epoch is allowed: at most one per `interval`, so that a
    /// flood of forged acks cannot keep the stream resending.
    pub fn may_rebase(&self, now: Instant, interval: Duration) -> bool {
        self.last_rebase.is_none_or(|t| now.duration_since(t) >= interval)
    }
}

/// A token bucket of bytes per second, without I/O. It may go into debt by one message, so a
/// message larger than the burst still goes out, and the rate holds on average.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(bytes_per_sec: u64, now: Instant) -> TokenBucket {
        let rate = bytes_per_sec as f64;
        TokenBucket {
            rate,
            burst: rate,
            tokens: rate,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Whether a message may go now.
    pub fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens > 0.0
    }

    pub fn spend(&mut self, bytes: usize, now: Instant) {
        self.refill(now);
        self.tokens -= bytes as f64;
    }

    /// How long until a message may go.
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens > 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((-self.tokens + 1.0) / self.rate)
        }
    }
}

/// Where live copies go.
#[derive(Debug, Clone)]
pub struct LiveTopics {
    /// `pred`, and its QoS; None when live predictions are off.
    pub predictions: Option<(String, QoS)>,
    pub events: String,
}

pub struct SyncTask {
    /// Stamped at every turn of the loop, at least every `sync.interval_ms`.
    pub beat: crate::systemd::Beat,
    pub store: Store,
    pub limits: Limits,
    pub cfg: SyncConfig,
    pub fleet: Name,
    pub device: Name,
    pub client: AsyncClient,
    pub rx: mpsc::Receiver<queue::Held<Append>>,
    pub acks: mpsc::Receiver<Ack>,
    pub conn: watch::Receiver<ConnState>,
    pub metrics: Arc<Metrics>,
    pub live: LiveTopics,
    /// The directory whose filesystem holds the outbox (for the free-space floor).
    pub state_dir: PathBuf,
    pub max_wal_bytes: u64,
    /// The readings link's state, written down for `lathe status`.
    pub sensors: Option<watch::Receiver<ConnState>>,
    /// Cancelled once every producer has stopped: take what is queued, write it, return.
    pub stop: tokio_util::sync::CancellationToken,
}

/// How a link's state is written down for `lathe status`.
fn conn_meta(state: &ConnState) -> String {
    let (name, err) = match state {
        ConnState::Connected => ("connected", None),
        ConnState::Connecting => ("connecting", None),
        ConnState::Disconnected { error } => ("disconnected", Some(error.clone())),
        ConnState::Refused { filters } => (
            "refused",
            Some(format!(
                "connected, but the broker refused the subscription to {}; check its ACL for this client",
                filters.join(", ")
            )),
        ),
    };
    serde_json::json!({"state": name, "since_ms": now_ms(), "error": err}).to_string()
}

/// Records, and bytes of them, taken from the channel into one transaction, at most.
const APPEND_BURST: usize = 10_000;
const APPEND_BURST_BYTES: usize = 8 << 20;

struct Run {
    streams: Vec<(&'static str, StreamSync)>,
    connected: bool,
    hub_zstd: bool,
    bucket: Option<TokenBucket>,
    /// Losses counted but not yet written (the disk refused them); retried with every write.
    unsaved: Vec<Loss>,
    /// PUBACKs the event loop's queue had no room for; retried every tick.
    acks_due: VecDeque<PubAck>,
    last_ack: Option<(String, u64, u64)>,
    last_ack_saved: bool,
    ack_timeout: Duration,
    /// Acks refused before this run (from the database), and whether the count changed since
    /// it was last written down (at most once a tick: a flood of forged acks costs no fsyncs).
    acks_refused_before: u64,
    acks_refused_dirty: Option<u64>,
    /// A batch found the event loop's queue full: live copies wait until batches go again,
    /// so that best-effort traffic never starves the durable one.
    batch_blocked: bool,
}

impl SyncTask {
    /// Runs until every producer has dropped its sender; then flushes and returns.
    pub async fn run(mut self) {
        let streams = crate::store::STREAMS
            .iter()
            .map(|s| (*s, StreamSync::new(self.store.stream(s).map_or(0, |i| i.acked))))
            .collect();
        let mut run = Run {
            streams,
            connected: matches!(*self.conn.borrow(), ConnState::Connected | ConnState::Refused { .. }),
            hub_zstd: false,
            bucket: (self.cfg.max_bytes_per_sec > 0)
                .then(|| TokenBucket::new(self.cfg.max_bytes_per_sec, Instant::now())),
            unsaved: vec![],
            acks_due: VecDeque::new(),
            last_ack: None,
            last_ack_saved: true,
            ack_timeout: Duration::ZERO,
            acks_refused_before: self
                .store
                .get_meta("acks_refused")
                .ok()
                .flatten()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            acks_refused_dirty: None,
            batch_blocked: false,
        };
        self.publish_gauges();
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = Instant::now() - Duration::from_secs(60);
        let mut activity = crate::status::Activity::started(now_ms());
        // Under an uplink cap, a full window takes time to go out: never call a batch lost
        // before it could have arrived.
        run.ack_timeout = Duration::from_millis(self.cfg.ack_timeout_ms);
        if self.cfg.max_bytes_per_sec > 0 {
            let window_bytes = (self.cfg.window * self.cfg.batch_bytes) as f64;
            run.ack_timeout = run.ack_timeout.max(Duration::from_secs_f64(
                2.0 * window_bytes / self.cfg.max_bytes_per_sec as f64,
            ));
        }
        let mut conn_open = true;
        loop {
            self.beat.now();
            // Biased: acks and link changes first, so that a flood of appends never starves the
            // sync (every ack frees room and lets the next batch go).
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => {
                    let mut rest = vec![];
                    while let Ok(m) = self.rx.try_recv() {
                        rest.push(m.into_inner());
                    }
                    self.append(&mut run, rest);
                    // A clean stop, so that `lathe status` says so at once.
                    self.write_activity(&mut activity, "stopped_ms");
                    break;
                }
                Some(ack) = self.acks.recv() => self.on_ack(&mut run, ack),
                changed = self.conn.changed(), if conn_open => {
                    if changed.is_err() {
                        // The link is gone (shutting down); keep flushing appends.
                        run.connected = false;
                        conn_open = false;
                        continue;
                    }
                    let state = self.conn.borrow_and_update().clone();
                    let was = run.connected;
                    // Refused subscriptions leave the connection up: batches still go out.
                    run.connected = matches!(state, ConnState::Connected | ConnState::Refused { .. });
                    if run.connected && !was {
                        for (s, st) in run.streams.iter_mut() {
                            st.reconnected(self.store.stream(s).map_or(1, |i| i.next));
                        }
                    }
                    let _ = tokio::task::block_in_place(|| self.store.set_meta("conn", &conn_meta(&state)));
                }
                Some(state) = next_state(&mut self.sensors) => {
                    let _ = tokio::task::block_in_place(|| self.store.set_meta("inputs_conn", &conn_meta(&state)));
                }
                _ = tick.tick() => {
                    self.housekeeping(&mut run);
                    if heartbeat.elapsed() >= Duration::from_secs(5) {
                        heartbeat = Instant::now();
                        self.write_activity(&mut activity, "heartbeat_ms");
                    }
                }
                msg = self.rx.recv() => match msg {
                    Some(first) => {
                        let mut burst = vec![first.into_inner()];
                        let (mut n, mut bytes) = (burst[0].records.len(), burst[0].bytes());
                        while n < APPEND_BURST && bytes < APPEND_BURST_BYTES {
                            match self.rx.try_recv() {
                                Ok(more) => {
                                    let more = more.into_inner();
                                    n += more.records.len();
                                    bytes += more.bytes();
                                    burst.push(more);
                                }
                                Err(_) => break,
                            }
                        }
                        self.append(&mut run, burst);
                    }
                    None => break,
                },
            }
            if run.connected {
                self.send_batches(&mut run);
            }
        }
        self.housekeeping(&mut run);
        let stopped = serde_json::json!({"state": "stopped", "since_ms": now_ms(), "error": null});
        let _ = tokio::task::block_in_place(|| self.store.set_meta("conn", &stopped.to_string()));
        info!(depth = self.store.depth(), "outbox flushed");
    }

    /// Work done every tick: losses into reports, the WAL kept small, PUBACKs retried, the
    /// last ack written down.
    fn housekeeping(&mut self, run: &mut Run) {
        run.unsaved.extend(self.metrics.tally.take());
        if !run.unsaved.is_empty() {
            self.append(run, vec![]);
        }
        match tokio::task::block_in_place(|| self.store.report_losses()) {
            Ok(n) if n > 0 => debug!(reports = n, "loss reports queued for the hub"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot write loss reports; will retry"),
        }
        if let Err(e) = tokio::task::block_in_place(|| self.store.bound_wal(self.max_wal_bytes)) {
            warn!(error = %e, "cannot checkpoint the WAL");
        }
        while let Some(a) = run.acks_due.front() {
            if a.send().is_err() {
                break;
            }
            run.acks_due.pop_front();
        }
        if let Some(at) = run.acks_refused_dirty {
            let n = (run.acks_refused_before + self.metrics.acks_refused.get()).to_string();
            let at = at.to_string();
            let written = tokio::task::block_in_place(|| {
                self.store
                    .set_meta_many(&[("acks_refused", n.as_str()), ("acks_refused_ms", at.as_str())])
            });
            if written.is_ok() {
                run.acks_refused_dirty = None;
            }
        }
        if let (Some((stream, acked, ts)), false) = (&run.last_ack, run.last_ack_saved) {
            let v = serde_json::json!({"ts_ms": ts, "stream": stream, "acked": acked});
            if tokio::task::block_in_place(|| self.store.set_meta("last_ack", &v.to_string())).is_ok() {
                run.last_ack_saved = true;
            }
        }
        self.publish_gauges();
    }

    fn publish_gauges(&self) {
        if let Ok(l) = self.store.losses() {
            *self.metrics.losses.lock().unwrap_or_else(|e| e.into_inner()) = l
                .into_iter()
                .map(|l| protocol::messages::LossTotal {
                    stream: l.stream,
                    cause: l.cause,
                    total: l.total,
                })
                .collect();
        }
        self.metrics.outbox_depth.set(self.store.depth());
        self.metrics.outbox_bytes.set(self.store.bytes());
        self.metrics.snapshot.lock().unwrap_or_else(|e| e.into_inner()).outbox = self
            .store
            .streams()
            .map(|(stream, s)| protocol::messages::StreamDepth {
                stream: stream.to_string(),
                depth: s.depth,
                bytes: s.bytes,
            })
            .collect();
        self.metrics
            .oldest_ms
            .set(self.store.oldest_ts_ms().ok().flatten().unwrap_or(0));
        self.metrics
            .disk_free
            .set(crate::store::free_bytes(&self.state_dir).unwrap_or(u64::MAX));
    }

    fn append(&mut self, run: &mut Run, burst: Vec<Append>) {
        let mut records = vec![];
        let mut live = vec![];
        let mut losses = std::mem::take(&mut run.unsaved);
        let mut acks = vec![];
        let mut meta: Vec<(String, String)> = vec![];
        for a in burst {
            for o in a.records {
                live.push(o.live);
                records.push(o.record);
            }
            losses.extend(a.losses);
            acks.extend(a.acks);
            for (k, v) in a.meta {
                meta.retain(|(m, _)| *m != k);
                meta.push((k, v));
            }
        }
        // One transaction must fit in the free-space floor, WAL and all: a large burst is
        // written in several.
        let per_txn = (self.limits.min_free_bytes / 8).clamp(64 << 10, APPEND_BURST_BYTES as u64);
        let mut start = 0;
        while start < records.len() || start == 0 {
            let mut end = start;
            let mut bytes = 0;
            while end < records.len() && (end == start || bytes + records[end].data.len() as u64 <= per_txn) {
                bytes += records[end].data.len() as u64;
                end += 1;
            }
            let chunk_losses = if start == 0 {
                std::mem::take(&mut losses)
            } else {
                vec![]
            };
            self.write(run, &records[start..end], &live[start..end], chunk_losses);
            start = end.max(1);
        }
        for a in acks {
            if a.send().is_err() {
                run.acks_due.push_back(a);
            }
        }
        if !meta.is_empty() {
            let pairs: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            if let Err(e) = tokio::task::block_in_place(|| self.store.set_meta_many(&pairs)) {
                warn!(error = %e, "cannot write the drift state for lathe status");
            }
        }
        self.metrics.outbox_depth.set(self.store.depth());
        self.metrics.outbox_bytes.set(self.store.bytes());
    }

    /// Write what the agent has done for `lathe status`, with the time now under `key` (the
    /// heartbeat, or a clean stop), in one transaction. A failed write is retried next time.
    fn write_activity(&mut self, activity: &mut crate::status::Activity, key: &str) {
        let now = now_ms();
        activity.update(&self.metrics, now);
        let text = serde_json::to_string(&activity).expect("activity serializes");
        let now = now.to_string();
        let _ = tokio::task::block_in_place(|| self.store.set_meta_many(&[(key, &now), ("activity", &text)]));
    }

    /// Write records and losses in one transaction, then publish the live copies.
    fn write(&mut self, run: &mut Run, records: &[NewRecord], live: &[bool], mut losses: Vec<Loss>) {
        let free = crate::store::free_bytes(&self.state_dir);
        let written = tokio::task::block_in_place(|| self.store.append(records, &losses, self.limits, free));
        match written {
            Ok(out) => {
                let lost = out.lost_records();
                if lost > 0 {
                    self.metrics.dropped.add(lost);
                    warn!(lost = ?out.lost, policy = ?self.limits.when_full, "outbox full: records dropped");
                }
                let made = out.appended_to(protocol::streams::PREDICTIONS);
                if made > 0 {
                    self.metrics.predictions.add(made);
                    self.metrics.last_prediction_ms.set(now_ms());
                }
                // Durable: batches first, then the live copies, then the PUBACKs.
                if run.connected {
                    self.send_batches(run);
                    let now = Instant::now();
                    // Events first: an alert must not wait behind a burst of predictions.
                    for events_pass in [true, false] {
                        for ((r, live), kept) in records.iter().zip(live).zip(&out.kept) {
                            if *live && *kept && (r.stream == protocol::streams::EVENTS) == events_pass {
                                self.publish_live(run, r, now);
                            }
                        }
                    }
                }
            }
            Err(e) => {
                // Nothing was written. The records are lost; the counts wait in memory.
                let n = records.len() as u64;
                self.metrics.dropped.add(n);
                let why = if e.is_full() {
                    cause::DISK_FULL
                } else {
                    cause::WRITE_FAILED
                };
                for r in records {
                    push_loss(
                        &mut losses,
                        Loss {
                            stream: r.stream,
                            cause: why,
                            count: 1,
                        },
                    );
                }
                error!(error = %e, records = n, "cannot write to the outbox; records lost and counted");
                for l in losses {
                    push_loss(&mut run.unsaved, l);
                }
            }
        }
    }

    fn publish_live(&mut self, run: &mut Run, r: &NewRecord, now: Instant) {
        if run.batch_blocked {
            self.metrics.live_skipped.inc();
            return;
        }
        let (topic, qos) = match r.stream {
            protocol::streams::PREDICTIONS => match &self.live.predictions {
                Some((t, q)) => (t.clone(), *q),
                None => return,
            },
            protocol::streams::EVENTS => (self.live.events.clone(), QoS::AtLeastOnce),
            _ => return,
        };
        if let Some(b) = run.bucket.as_mut() {
            if !b.ready(now) {
                self.metrics.live_skipped.inc();
                return;
            }
            b.spend(r.data.len() + topic.len(), now);
        }
        // Live copies are best effort; the outbox copy is the one that is guaranteed.
        if self.client.try_publish(topic, qos, false, r.data.clone()).is_err() {
            self.metrics.live_skipped.inc();
        }
    }

    fn event(&mut self, run: &mut Run, level: Level, kind: &str, message: String) {
        match level {
            Level::Error => error!(kind, %message, "event"),
            Level::Warn => warn!(kind, %message, "event"),
            Level::Info => info!(kind, %message, "event"),
        }
        let e = Event {
            ts_ms: now_ms(),
            level,
            kind: kind.into(),
            message,
        };
        let record = NewRecord {
            stream: protocol::streams::EVENTS,
            ts_ms: e.ts_ms,
            data: serde_json::to_string(&e).expect("an event serializes"),
        };
        self.append(
            run,
            vec![Append {
                records: vec![Outgoing { record, live: true }],
                ..Default::default()
            }],
        );
    }

    fn on_ack(&mut self, run: &mut Run, ack: Ack) {
        let Some(i) = run.streams.iter().position(|(s, _)| *s == ack.stream) else {
            return;
        };
        let stream = run.streams[i].0;
        let Some(info) = self.store.stream(stream).cloned() else {
            return;
        };
        let now = Instant::now();
        let st = &mut run.streams[i].1;
        let verdict = judge_ack(
            &ack,
            &info.epoch().epoch,
            info.epoch().base,
            info.assigned_wire(),
            st.acked,
            st.sent_hi,
        );
        let mut rebase_why = None;
        match verdict {
            AckVerdict::OtherEpoch => {
                debug!(stream, epoch = %ack.epoch, "ack for another epoch ignored");
                return;
            }
            AckVerdict::Stale => {}
            AckVerdict::Beyond { acked, assigned } => {
                self.metrics.acks_refused.inc();
                run.acks_refused_dirty = Some(now_ms());
                rebase_why = Some(format!(
                    "ack for #{acked} of {stream} in epoch {} is above the highest seq assigned (#{assigned}): \
                     a forged ack, or an outbox restored from an older copy; not applied, every record kept",
                    ack.epoch
                ));
            }
            AckVerdict::Advance(local) => {
                st.on_ack(local);
                match tokio::task::block_in_place(|| self.store.ack(stream, local)) {
                    Ok(n) => debug!(stream, acked = ack.acked, deleted = n, "acked"),
                    Err(e) => error!(error = %e, "cannot apply ack"),
                }
                run.last_ack = Some((stream.to_string(), ack.acked, now_ms()));
                run.last_ack_saved = false;
            }
        }
        if verdict != AckVerdict::OtherEpoch && ack.accepts.iter().any(|a| a == protocol::sync::ZSTD) {
            run.hub_zstd = true;
        }
        if let (Some(c), None) = (ack.conflict, &rebase_why) {
            self.metrics.acks_refused.inc();
            run.acks_refused_dirty = Some(now_ms());
            rebase_why = Some(format!(
                "the hub holds a different record under #{c} of {stream} in epoch {}: this outbox was restored \
                 from an older copy, or another device writes under this name",
                ack.epoch
            ));
        }
        let Some(why) = rebase_why else { return };
        let st = &mut run.streams[i].1;
        if !st.may_rebase(now, run.ack_timeout) {
            debug!(
                stream,
                "suspicious ack ignored: the stream moved to a new epoch moments ago"
            );
            return;
        }
        match tokio::task::block_in_place(|| self.store.rebase(stream)) {
            Ok(new) => {
                st.rebased(now);
                self.event(
                    run,
                    Level::Error,
                    "ack_refused",
                    format!("{why}; unacknowledged records move to epoch {new}"),
                );
            }
            Err(e) => error!(error = %e, "cannot move to a new epoch"),
        }
    }

    fn send_batches(&mut self, run: &mut Run) {
        let now = Instant::now();
        let ack_timeout = run.ack_timeout;
        for i in 0..run.streams.len() {
            loop {
                if let Some(b) = run.bucket.as_mut() {
                    if !b.ready(now) {
                        return;
                    }
                }
                let st = &mut run.streams[i].1;
                if !st.may_send(now, self.cfg.window, ack_timeout) {
                    break;
                }
                if !self.send_batch(run, i, now) {
                    break;
                }
            }
        }
    }

    /// Send the next batch of a stream; false when there is nothing (more) to send now.
    fn send_batch(&mut self, run: &mut Run, i: usize, now: Instant) -> bool {
        let stream = run.streams[i].0;
        let Some(info) = self.store.stream(stream).cloned() else {
            return false;
        };
        let after = run.streams[i].1.next_after();
        let room = self.cfg.batch_bytes - protocol::sync::BATCH_OVERHEAD;
        let pending = match self.store.pending(stream, after, self.cfg.batch_records, room) {
            Ok(p) => p,
            Err(e) => {
                error!(error = %e, "cannot read the outbox");
                return false;
            }
        };
        let (Some(first), Some(last)) = (pending.first(), pending.last()) else {
            return false;
        };
        let (first, last) = (first.lseq, last.lseq);
        if pending[0].data.len() + protocol::sync::RECORD_OVERHEAD > room {
            // It can never fit a batch. As the oldest waiting, it becomes an explicit loss;
            // otherwise it waits until everything before it is acked.
            let oldest = first == info.acked.max(info.lost_through) + 1;
            if oldest {
                let bytes = pending[0].data.len();
                if tokio::task::block_in_place(|| self.store.drop_unsendable(stream, first)).is_ok() {
                    self.metrics.dropped.inc();
                    self.event(
                        run,
                        Level::Error,
                        "record_dropped",
                        format!(
                            "{stream} #{first} is {bytes} bytes, more than a batch can carry (sync.batch_bytes); dropped and counted as lost"
                        ),
                    );
                    return true;
                }
            }
            return false;
        }
        let st = &run.streams[i].1;
        let wire_lost = if info.lost_through > info.epoch().base {
            info.to_wire(info.lost_through)
        } else {
            0
        };
        let mut w = BatchWriter::new(
            BatchHeader {
                device: self.device.as_str(),
                stream,
                epoch: &info.epoch().epoch,
                lost_through: wire_lost,
                acked: info.to_wire(st.acked.max(info.epoch().base)),
            },
            room.min(pending.iter().map(|p| p.data.len() + 96).sum::<usize>() + 256),
        );
        for p in &pending {
            w.push(
                info.to_wire(p.lseq),
                p.ts_ms,
                &p.data,
                p.lseq < st.live_from,
                p.origin.as_ref().map(|(e, s)| (e.as_str(), *s)),
            );
        }
        let json = w.finish();
        let compress = match self.cfg.compression {
            Compression::None => false,
            Compression::Zstd => true,
            Compression::Auto => run.hub_zstd,
        };
        let payload = if compress {
            protocol::sync::compress(&json, 3)
        } else {
            json
        };
        let size = payload.len();
        let topic = Topic::new(
            &self.fleet,
            &self.device,
            Channel::Sync(Name::new(stream).expect("stream names are valid")),
        );
        match self
            .client
            .try_publish(topic.to_string(), QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => {
                run.batch_blocked = false;
                run.streams[i].1.sent(first, last, now);
                if let Some(b) = run.bucket.as_mut() {
                    b.spend(size, now);
                }
                debug!(stream, first, last, bytes = size, "batch sent");
                true
            }
            Err(e) => {
                run.batch_blocked = true;
                debug!(stream, error = %e, "batch not queued; will retry");
                false
            }
        }
    }
}

/// The next state of an optional link; pending forever when there is none or it is gone.
async fn next_state(rx: &mut Option<watch::Receiver<ConnState>>) -> Option<ConnState> {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    if r.changed().await.is_ok() {
        return Some(r.borrow_and_update().clone());
    }
    *rx = None;
    None
}

fn push_loss(losses: &mut Vec<Loss>, l: Loss) {
    match losses.iter_mut().find(|x| x.stream == l.stream && x.cause == l.cause) {
        Some(x) => x.count += l.count,
        None => losses.push(l),
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

    fn ack(epoch: &str, acked: u64) -> Ack {
        Ack {
            stream: "predictions".into(),
            epoch: epoch.into(),
            acked,
            conflict: None,
            accepts: vec![],
        }
    }

    /// (ack epoch, ack seq) against epoch "e" with base 10, 50 assigned, 12 acked, 40 sent.
    fn check(epoch: &str, acked: u64, expected: AckVerdict) {
        assert_eq!(
            judge_ack(&ack(epoch, acked), "e", 10, 50, 12, 40),
            expected,
            "{epoch} {acked}"
        );
    }

    #[test]
    fn acks_are_believed_only_as_far_as_they_can_be_checked() {
        check("x", 5, AckVerdict::OtherEpoch);
        check("e", 1, AckVerdict::Stale);
        check("e", 2, AckVerdict::Stale);
        check("e", 3, AckVerdict::Advance(13));
        check("e", 30, AckVerdict::Advance(40));
        check("e", 35, AckVerdict::Advance(40));
        check("e", 50, AckVerdict::Advance(40));
        check(
            "e",
            51,
            AckVerdict::Beyond {
                acked: 51,
                assigned: 50,
            },
        );
        // Regression: `{"acked":1000000000}` deleted the whole outbox and wedged the stream.
        check(
            "e",
            1_000_000_000,
            AckVerdict::Beyond {
                acked: 1_000_000_000,
                assigned: 50,
            },
        );
    }

    #[test]
    fn a_window_of_batches_in_flight_until_ack_or_timeout() {
        // Time is passed in, so the test moves it by hand.
        let timeout = Duration::from_secs(10);
        let mut s = StreamSync::new(0);
        let t0 = Instant::now();
        assert!(s.may_send(t0, 2, timeout));
        s.sent(1, 5, t0);
        assert_eq!(s.next_after(), 5);
        assert!(s.may_send(t0, 2, timeout));
        s.sent(6, 9, t0);
        assert!(!s.may_send(t0, 2, timeout), "the window is full");
        assert!(!s.may_send(t0 + Duration::from_secs(9), 2, timeout));
        // A partial ack moves the watermark and frees the first batch's slot.
        assert!(s.on_ack(5));
        assert_eq!(s.inflight.len(), 1);
        assert!(s.may_send(t0, 2, timeout));
        assert!(s.on_ack(9));
        assert!(s.inflight.is_empty());
        // A stale ack changes nothing.
        assert!(!s.on_ack(4));
        assert_eq!(s.acked, 9);
        // A timeout sends again from the watermark.
        s.sent(10, 12, t0);
        assert!(s.may_send(t0 + Duration::from_secs(10), 1, timeout));
        assert_eq!(s.next_after(), 9);
    }

    #[test]
    fn reconnect_resends_and_marks_history() {
        let mut s = StreamSync::new(2);
        s.sent(3, 9, Instant::now());
        s.reconnected(10);
        assert!(s.may_send(Instant::now(), 1, Duration::from_secs(3600)));
        assert_eq!((s.acked, s.next_after(), s.live_from), (2, 2, 10));
    }

    #[test]
    fn rebases_are_rate_limited() {
        let mut s = StreamSync::new(0);
        let t0 = Instant::now();
        let i = Duration::from_secs(10);
        assert!(s.may_rebase(t0, i));
        s.sent(1, 4, t0);
        s.rebased(t0);
        assert_eq!((s.sent_hi, s.inflight.len()), (0, 0));
        assert!(!s.may_rebase(t0 + Duration::from_secs(9), i));
        assert!(s.may_rebase(t0 + Duration::from_secs(10), i));
    }

    #[test]
    fn the_token_bucket_holds_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        assert!(b.ready(t0));
        b.spend(1500, t0);
        assert!(!b.ready(t0), "in debt after a message larger than the burst");
        assert_eq!(b.wait(t0), Duration::from_secs_f64(501.0 / 1000.0));
        assert!(b.ready(t0 + Duration::from_millis(501)));
        // Over ten seconds at most rate × time + burst goes out.
        let mut sent = 0;
        let mut t = t0 + Duration::from_millis(501);
        let end = t0 + Duration::from_secs(10);
        while t < end {
            if b.ready(t) {
                b.spend(100, t);
                sent += 100;
            }
            t += Duration::from_millis(10);
        }
        assert!(sent <= 10_000 + 1000, "{sent}");
        assert!(sent >= 9_000, "{sent}");
    }
}
