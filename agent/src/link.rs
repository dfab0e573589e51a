//! MQTT connections.
//!
//! A [`Link`] owns one rumqttc event loop. It reconnects with exponential backoff and jitter
//! (rumqttc itself retries at once), re-subscribes on every ConnAck (rumqttc does not after a
//! session loss) and checks the broker's SUBACK (a refused subscription is a problem, shown
//! in `lathe status`), publishes the retained birth message on the hub link, and routes each
//! incoming publish to its subsystem through queues bounded in messages and bytes, with
//! `try_send`: the event loop never waits on a subsystem.
//!
//! Sizes are checked before anything is parsed: a reading, a command or an ack larger than
//! its limit is refused and counted. What cannot be queued is refused and counted too; a
//! refusal goes to the outbox as a loss and, for a QoS 1 reading, is PUBACKed once durable.
//! The SQLite outbox, not the MQTT session, is what guarantees delivery.

use crate::config::{BrokerConfig, TlsConfig};
use crate::metrics::Metrics;
use crate::queue;
use crate::store::{cause, Loss};
use crate::sync::Append;
use protocol::messages::Response;
use protocol::{Channel, Topic};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, Transport};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("TLS file {path}: {message}")]
    Tls { path: std::path::PathBuf, message: String },
    #[error("password file {path}: {message}")]
    Password { path: std::path::PathBuf, message: String },
}

/// Exponential backoff with jitter, without I/O.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt, given a jitter fraction in [0, 1): the exponential
    /// delay is scaled into [50%, 100%) of itself.
    pub fn next(&mut self, jitter: f64) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX));
        let capped = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        capped.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

pub type BirthFn = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// The PUBACK owed for a QoS 1 publish received with manual acks: sent once what it carried
/// is durable. A reading that goes to several model slots is owed by each copy
/// ([`PubAck::split`]): the PUBACK goes when the last copy is durable.
#[derive(Debug)]
pub struct PubAck {
    owed: Arc<Owed>,
    /// 0: this copy is not done yet; 1: done, another copy sends the PUBACK; 2: done, and
    /// this copy sends it.
    state: std::sync::atomic::AtomicU8,
}

#[derive(Debug)]
struct Owed {
    client: AsyncClient,
    pkid: u16,
    /// Copies not done yet.
    copies: std::sync::atomic::AtomicUsize,
}

impl PubAck {
    pub fn new(client: AsyncClient, pkid: u16) -> PubAck {
        PubAck::copies(client, pkid, 1).pop().expect("one copy")
    }

    fn copies(client: AsyncClient, pkid: u16, n: usize) -> Vec<PubAck> {
        let owed = Arc::new(Owed {
            client,
            pkid,
            copies: n.into(),
        });
        (0..n)
            .map(|_| PubAck {
                owed: owed.clone(),
                state: 0.into(),
            })
            .collect()
    }

    /// `n` copies of this PUBACK, one for each slot a reading goes to.
    pub fn split(self, n: usize) -> Vec<PubAck> {
        PubAck::copies(self.owed.client.clone(), self.owed.pkid, n)
    }

    /// This copy is done: queue the PUBACK if it is the last one; an error means the event
    /// loop's queue is full (retry later).
    pub fn send(&self) -> Result<(), rumqttc::ClientError> {
        use std::sync::atomic::Ordering::AcqRel;
        let mut state = self.state.load(std::sync::atomic::Ordering::Acquire);
        if state == 0 {
            state = if self.owed.copies.fetch_sub(1, AcqRel) == 1 {
                2
            } else {
                1
            };
            self.state.store(state, std::sync::atomic::Ordering::Release);
        }
        if state == 1 {
            return Ok(());
        }
        let mut p = rumqttc::Publish::new("", QoS::AtLeastOnce, Vec::new());
        p.pkid = self.owed.pkid;
        self.owed.client.try_ack(&p)
    }
}

/// An incoming reading, for the inference task.
#[derive(Debug)]
pub struct Reading {
    pub topic: String,
    pub payload: bytes::Bytes,
    /// For a QoS 1 reading: the PUBACK to send once its prediction or refusal is durable.
    pub ack: Option<PubAck>,
}

/// An incoming command, for the deploy task.
#[derive(Debug)]
pub struct IncomingCommand {
    pub id: protocol::Name,
    pub payload: bytes::Bytes,
}

/// Where a link sends what it receives. A `None` route is not subscribed.
#[derive(Clone, Default)]
pub struct Routes {
    /// Readings, to each model slot whose topic filters match.
    pub readings: Vec<(Vec<String>, queue::Sender<Reading>)>,
    pub commands: Option<queue::Sender<IncomingCommand>>,
    pub acks: Option<mpsc::Sender<protocol::messages::Ack>>,
    /// Desired states (on these topics) and bundle chunks, for the deploy task.
    pub rollout: Option<(queue::Sender<crate::rollout::RolloutMessage>, Vec<String>)>,
}

/// The largest message accepted on each route, checked before parsing.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub reading_bytes: usize,
    pub command_bytes: usize,
}

/// The largest ack accepted; real ones are about 100 bytes.
pub const MAX_ACK_BYTES: usize = 4096;

/// Counts what a link refuses: in the outbox when it has room (durable, then PUBACKed), else
/// in memory until the outbox task takes it.
#[derive(Clone)]
pub struct Refusals {
    pub outbox: queue::Sender<Append>,
    pub metrics: Arc<Metrics>,
}

impl Refusals {
    pub fn refuse(&self, stream: &'static str, cause: &'static str, ack: Option<PubAck>) {
        if stream == protocol::streams::READINGS {
            self.metrics.rejected.inc();
        }
        let a = Append {
            losses: vec![Loss {
                stream,
                cause,
                count: 1,
            }],
            acks: ack.into_iter().collect(),
            ..Default::default()
        };
        if let Err((a, _)) = self.outbox.try_send(a, 64) {
            self.metrics.tally.add(Loss {
                stream,
                cause,
                count: 1,
            });
            for ack in a.acks {
                let _ = ack.send();
            }
        }
    }
}

/// Connection state, as the rest of the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Connected,
    Disconnected {
        error: String,
    },
    /// Connected, but the broker refused these subscriptions (its ACL, usually).
    Refused {
        filters: Vec<String>,
    },
}

pub struct Link {
    pub name: &'static str,
    pub eventloop: EventLoop,
    pub client: AsyncClient,
    pub backoff: Backoff,
    pub subscriptions: Vec<(String, QoS)>,
    /// Topic and payload maker of the retained birth message, for the hub link. The payload
    /// is made at each ConnAck, so it names the model active then.
    pub birth: Option<(String, BirthFn)>,
    pub routes: Routes,
    pub identity: Option<(protocol::Name, protocol::Name)>,
    pub state: watch::Sender<ConnState>,
    pub limits: Limits,
    pub refusals: Refusals,
    /// QoS 1 readings are PUBACKed by the outbox once durable (the options set manual acks).
    pub manual_acks: bool,
    /// Once cancelled (the agent is stopping), readings are no longer taken: without a
    /// PUBACK, the broker hands them to the next run. The link itself runs on until its own
    /// token, so the PUBACKs of what was made durable still go out.
    pub accepting: CancellationToken,
    pub metrics: Arc<Metrics>,
    /// The SUBACK of this connection's own SUBSCRIBE is still to come: others (of bundle
    /// chunks, sent by the deploy task) say nothing about these filters.
    pub awaiting_suback: bool,
    /// Stamped at every turn of the event loop: each event, each failed connection.
    pub beat: crate::systemd::Beat,
}

/// The password of a broker section: given inline, or read from a file (first line).
pub fn password(b: &BrokerConfig) -> Result<Option<String>, LinkError> {
    match (&b.password, &b.password_file) {
        (Some(p), _) => Ok(Some(p.clone())),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).map_err(|e| LinkError::Password {
                path: f.clone(),
                message: e.to_string(),
            })?;
            Ok(Some(text.lines().next().unwrap_or("").to_string()))
        }
        (None, None) => Ok(None),
    }
}

/// Build the MQTT options for a broker section.
pub fn options(b: &BrokerConfig, client_id: String, will: Option<LastWill>) -> Result<MqttOptions, LinkError> {
    let mut o = MqttOptions::new(client_id, b.host.clone(), b.port);
    o.set_keep_alive(Duration::from_secs(b.keep_alive_secs));
    o.set_max_packet_size(b.max_packet_bytes, b.max_packet_bytes);
    o.set_clean_session(true);
    // The configuration refuses a username without a password, so both or neither are set.
    if let (Some(u), Some(p)) = (&b.username, password(b)?) {
        o.set_credentials(u.clone(), p);
    }
    if let Some(w) = will {
        o.set_last_will(w);
    }
    if let Some(t) = &b.tls {
        o.set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(
            tls_config(t)?,
        ))));
    }
    Ok(o)
}

/// A client and its event loop, with Nagle's algorithm off: acks and small batches go out at
/// once instead of waiting for the peer's delayed ACK (tens of milliseconds per round trip).
pub fn connect(opts: MqttOptions, requests: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(opts, requests);
    eventloop.network_options.set_tcp_nodelay(true);
    (client, eventloop)
}

fn tls_config(t: &TlsConfig) -> Result<rustls::ClientConfig, LinkError> {
    let tls_err = |path: &std::path::Path, message: String| LinkError::Tls {
        path: path.to_path_buf(),
        message,
    };
    let read = |path: &std::path::Path| std::fs::read(path).map_err(|e| tls_err(path, e.to_string()));
    let ca = read(&t.ca_file)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        let cert = cert.map_err(|e| tls_err(&t.ca_file, e.to_string()))?;
        roots.add(cert).map_err(|e| tls_err(&t.ca_file, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(tls_err(&t.ca_file, "no PEM certificate found".into()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&t.ca_file, e.to_string()))?
        .with_root_certificates(roots);
    match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => {
            let chain = rustls_pemfile::certs(&mut read(cert)?.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_err(cert, e.to_string()))?;
            let key_der = rustls_pemfile::private_key(&mut read(key)?.as_slice())
                .map_err(|e| tls_err(key, e.to_string()))?
                .ok_or_else(|| tls_err(key, "no PEM private key found".into()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| tls_err(key, e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

impl Link {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut connected_before = false;
        loop {
            self.beat.now();
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = self.eventloop.poll() => ev,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    info!(link = self.name, session_present = ack.session_present, "connected");
                    if connected_before {
                        match self.name {
                            "hub" => self.metrics.reconnects_hub.inc(),
                            _ => self.metrics.reconnects_sensors.inc(),
                        }
                    }
                    connected_before = true;
                    self.backoff.reset();
                    if self.manual_acks {
                        // Back to the persistent session after a reset (below).
                        self.eventloop.mqtt_options.set_clean_session(false);
                    }
                    self.on_connected();
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) if self.awaiting_suback => {
                    self.awaiting_suback = false;
                    self.on_suback(&ack.return_codes)
                }
                Ok(Event::Incoming(Packet::Publish(p))) => self.route(p),
                // An orderly disconnect was sent: this link is done.
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => {
                    if let Some(size) = oversized(&e).filter(|_| self.manual_acks) {
                        // The broker would send this message again at every reconnect of the
                        // persistent session, forever. Drop the session once to be rid of it:
                        // readings the broker still held for this agent go with it.
                        warn!(link = self.name, size, limit = self.eventloop.mqtt_options.max_packet_size(),
                            "the broker sent a message larger than max_packet_bytes; resetting the session to drop it (queued readings at the broker are lost)");
                        self.eventloop.mqtt_options.set_clean_session(true);
                        self.refusals
                            .refuse(protocol::streams::READINGS, cause::SESSION_RESET, None);
                    }
                    // Requests queued for the dead connection are stale: a clean session would
                    // drop them at reconnect anyway, and the outbox resends what matters. Drop
                    // them now so that nothing piles up while the link is down.
                    self.eventloop.clean();
                    self.eventloop.pending.clear();
                    let delay = self.backoff.next(rand::random::<f64>());
                    let error = describe(&e);
                    warn!(link = self.name, %error, retry_in_ms = delay.as_millis() as u64, "connection lost");
                    self.state.send_replace(ConnState::Disconnected { error });
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        debug!(link = self.name, "link stopped");
    }

    /// Subscriptions and the birth message go straight to the front of the event loop's own
    /// queue: they are sent first, whatever else is queued, and can never be refused.
    fn on_connected(&mut self) {
        if let Some((topic, make)) = &self.birth {
            let mut birth = rumqttc::Publish::new(topic.clone(), QoS::AtLeastOnce, make());
            birth.retain = true;
            self.eventloop.pending.push_front(rumqttc::Request::Publish(birth));
        }
        if !self.subscriptions.is_empty() {
            let filters = self
                .subscriptions
                .iter()
                .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), *q));
            self.eventloop
                .pending
                .push_front(rumqttc::Request::Subscribe(rumqttc::Subscribe::new_many(filters)));
            self.awaiting_suback = true;
        }
        self.state.send_replace(ConnState::Connected);
    }

    /// The link sends one SUBSCRIBE per connection, with every filter in order.
    fn on_suback(&mut self, codes: &[rumqttc::SubscribeReasonCode]) {
        let refused: Vec<String> = self
            .subscriptions
            .iter()
            .zip(codes)
            .filter(|(_, c)| matches!(c, rumqttc::SubscribeReasonCode::Failure))
            .map(|((f, _), _)| f.clone())
            .collect();
        if !refused.is_empty() {
            warn!(link = self.name, filters = ?refused, "the broker refused subscriptions; check its ACL for this client");
            self.state.send_replace(ConnState::Refused { filters: refused });
        }
    }

    fn route(&self, p: rumqttc::Publish) {
        if let Some((tx, desired)) = &self.routes.rollout {
            let fleet = self.identity.as_ref().map(|(f, _)| f.as_str()).unwrap_or("");
            let chunk = protocol::rollout::parse_chunk_topic(fleet, &p.topic).is_some();
            if chunk || desired.contains(&p.topic) {
                let limit = if chunk {
                    protocol::rollout::MAX_CHUNK_BYTES as usize
                } else {
                    // A desired state or a key set: 64 KiB each.
                    protocol::rollout::MAX_DESIRED_BYTES.max(protocol::keyset::MAX_KEYS_BYTES)
                };
                if p.payload.len() > limit {
                    warn!(topic = %p.topic, bytes = p.payload.len(), limit, "oversized rollout message ignored");
                    return;
                }
                let bytes = p.payload.len() + p.topic.len() + 64;
                let m = crate::rollout::RolloutMessage {
                    payload: bytes::Bytes::copy_from_slice(&p.payload),
                    topic: p.topic,
                };
                if tx.try_send(m, bytes).is_err() {
                    // A chunk is asked for again when it does not come; a desired state comes
                    // again at the next connection.
                    warn!("rollout queue full; message dropped");
                }
                return;
            }
        }
        let topic = p.topic.clone();
        let parsed = topic.parse::<Topic>();
        let ours = parsed.as_ref().ok().filter(|t| {
            self.identity
                .as_ref()
                .is_some_and(|(f, d)| &t.fleet == f && &t.device == d)
        });
        match ours.map(|t| &t.channel) {
            Some(Channel::Command(id)) => self.command(id, p),
            Some(Channel::Ack(stream)) => {
                if p.payload.len() > MAX_ACK_BYTES {
                    warn!(%topic, bytes = p.payload.len(), "oversized ack ignored");
                    return;
                }
                match serde_json::from_slice::<protocol::messages::Ack>(&p.payload) {
                    Ok(ack) if ack.stream == stream.as_str() => {
                        if let Some(tx) = &self.routes.acks {
                            // A dropped ack is harmless: the batch is sent again and acked again.
                            let _ = tx.try_send(ack);
                        }
                    }
                    Ok(_) => warn!(%topic, "ack names another stream than its topic; ignored"),
                    Err(e) => warn!(%topic, error = %e, "malformed ack ignored"),
                }
            }
            Some(_) => debug!(%topic, "ignored"),
            None => self.reading(p),
        }
    }

    fn reading(&self, p: rumqttc::Publish) {
        let ack = (self.manual_acks && p.qos != QoS::AtMostOnce).then(|| PubAck::new(self.client.clone(), p.pkid));
        let slots: Vec<&queue::Sender<Reading>> = match &self.routes.readings[..] {
            // No readings on this link.
            [] => {
                if let Some(a) = ack {
                    let _ = a.send();
                }
                return;
            }
            [(_, tx)] => vec![tx],
            all => all
                .iter()
                .filter(|(filters, _)| filters.iter().any(|f| protocol::topic::filter::matches(f, &p.topic)))
                .map(|(_, tx)| tx)
                .collect(),
        };
        if self.accepting.is_cancelled() {
            return;
        }
        self.metrics.readings.inc();
        if p.topic.starts_with(protocol::topic::ROOT) {
            // Never readings, whatever a filter matched.
            self.refusals.refuse(protocol::streams::READINGS, cause::MALFORMED, ack);
            return;
        }
        if slots.is_empty() {
            warn!(topic = %protocol::messages::echo(&p.topic, 128), "a reading whose topic matches no model slot's filters refused");
            self.refusals.refuse(protocol::streams::READINGS, cause::NO_SLOT, ack);
            return;
        }
        if p.payload.len() > self.limits.reading_bytes {
            warn!(topic = %protocol::messages::echo(&p.topic, 128), bytes = p.payload.len(), limit = self.limits.reading_bytes,
                "reading larger than inputs.max_message_bytes refused");
            self.refusals.refuse(protocol::streams::READINGS, cause::TOO_LARGE, ack);
            return;
        }
        // Copied out of the receive buffer, so the queue's byte budget is what it really holds.
        let bytes = p.payload.len() + p.topic.len() + 64;
        let payload = bytes::Bytes::copy_from_slice(&p.payload);
        let acks: Vec<Option<PubAck>> = match ack {
            Some(a) => a.split(slots.len()).into_iter().map(Some).collect(),
            None => slots.iter().map(|_| None).collect(),
        };
        for (tx, ack) in slots.into_iter().zip(acks) {
            let r = Reading {
                topic: p.topic.clone(),
                payload: payload.clone(),
                ack,
            };
            if let Err((r, _)) = tx.try_send(r, bytes) {
                self.metrics.readings_dropped.inc();
                self.refusals
                    .refuse(protocol::streams::READINGS, cause::QUEUE_FULL, r.ack);
            }
        }
    }

    fn command(&self, id: &protocol::Name, p: rumqttc::Publish) {
        let Some(tx) = &self.routes.commands else { return };
        let refuse = |why: &'static str, message: String, code: &str| {
            self.refusals.refuse(protocol::streams::COMMANDS, why, None);
            warn!(command = %id, %message, "command refused");
            let (fleet, device) = self.identity.as_ref().expect("the hub link has an identity");
            let resp = Response {
                ok: false,
                message,
                model: None,
                code: Some(code.into()),
            };
            let topic = Topic::new(fleet, device, Channel::Response(id.clone()));
            let _ = self.client.try_publish(
                topic.to_string(),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&resp).expect("a response serializes"),
            );
        };
        if p.payload.len() > self.limits.command_bytes {
            refuse(
                cause::TOO_LARGE,
                format!(
                    "command is {} bytes, more than the device accepts ({}; see trust.max_bundle_bytes)",
                    p.payload.len(),
                    self.limits.command_bytes
                ),
                "too_large",
            );
            return;
        }
        let bytes = p.payload.len();
        // A small payload may share a large receive buffer: copy it, so that the queue's byte
        // budget is what it really holds. A large one fills its own buffer.
        let payload = if bytes < 1 << 20 {
            bytes::Bytes::copy_from_slice(&p.payload)
        } else {
            p.payload
        };
        let c = IncomingCommand {
            id: id.clone(),
            payload,
        };
        if tx.try_send(c, bytes).is_err() {
            refuse(
                cause::QUEUE_FULL,
                "the device is busy with earlier commands; send again later".into(),
                "busy",
            );
        }
    }
}

/// The size of an incoming packet over the connection's limit, if that is what broke it.
fn oversized(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
        )) => Some(*n),
        _ => None,
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Io(io) => format!("i/o: {io}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reading taken by two slots is acknowledged once, by the last copy done: the client's
    /// request queue holds one request, so a send that finds it full is one that really sent.
    #[test]
    fn a_split_puback_is_sent_by_the_last_copy_only() {
        let (client, _eventloop) = AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 1);
        let copies = PubAck::new(client.clone(), 7).split(2);
        assert!(copies[0].send().is_ok());
        assert!(copies[0].send().is_ok(), "a copy done twice counts once");
        // The queue is still empty: the first copy sent nothing. The probe fills it.
        PubAck::new(client, 8).send().expect("the queue had room");
        assert!(
            copies[1].send().is_err(),
            "the last copy sends, and finds the queue full"
        );
        assert!(copies[1].send().is_err(), "and tries again");
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let full: Vec<u64> = (0..6).map(|_| b.next(0.999_999).as_millis() as u64).collect();
        assert_eq!(full, vec![99, 199, 399, 799, 999, 999]);
        b.reset();
        assert_eq!(b.next(0.0), Duration::from_millis(50));
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        for _ in 0..100 {
            assert!(b.next(0.5) <= Duration::from_secs(60));
        }
    }
}
