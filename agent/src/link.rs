//! MQTT connections.
//!
//! A [`Link`] owns one rumqttc event loop. It reconnects with exponential backoff and jitter
//! (rumqttc itself retries at once), re-subscribes on every ConnAck (rumqttc does not after a
//! session loss), publishes the retained birth message on the hub link, and routes each
//! incoming publish to its subsystem through bounded channels with `try_send`: the event loop
//! never waits on a subsystem, and what cannot be queued is counted and dropped. The SQLite
//! outbox, not the MQTT session, is what guarantees delivery.

use crate::config::{BrokerConfig, TlsConfig};
use crate::metrics::Metrics;
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

/// An incoming reading, for the inference task.
#[derive(Debug)]
pub struct Reading {
    pub topic: String,
    pub payload: bytes::Bytes,
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
    pub readings: Option<mpsc::Sender<Reading>>,
    pub commands: Option<mpsc::Sender<IncomingCommand>>,
    pub acks: Option<mpsc::Sender<protocol::messages::Ack>>,
}

/// Connection state, as the rest of the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Connected,
    Disconnected { error: String },
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
    pub metrics: Arc<Metrics>,
}

/// Build the MQTT options for a broker section.
pub fn options(b: &BrokerConfig, client_id: String, will: Option<LastWill>) -> Result<MqttOptions, LinkError> {
    let mut o = MqttOptions::new(client_id, b.host.clone(), b.port);
    o.set_keep_alive(Duration::from_secs(b.keep_alive_secs));
    o.set_max_packet_size(b.max_packet_bytes, b.max_packet_bytes);
    o.set_clean_session(true);
    if let (Some(u), Some(p)) = (&b.username, &b.password) {
        o.set_credentials(u.clone(), p.clone());
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
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = self.eventloop.poll() => ev,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    info!(link = self.name, session_present = ack.session_present, "connected");
                    self.backoff.reset();
                    self.on_connected();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => self.route(p),
                // An orderly disconnect was sent: this link is done.
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => {
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
        }
        self.state.send_replace(ConnState::Connected);
    }

    fn route(&self, p: rumqttc::Publish) {
        let topic = p.topic.clone();
        let ours = topic.parse::<Topic>().ok().filter(|t| {
            self.identity
                .as_ref()
                .is_some_and(|(f, d)| &t.fleet == f && &t.device == d)
        });
        match ours.map(|t| t.channel) {
            Some(Channel::Command(id)) => {
                if let Some(tx) = &self.routes.commands {
                    if tx
                        .try_send(IncomingCommand {
                            id: id.clone(),
                            payload: p.payload,
                        })
                        .is_err()
                    {
                        self.metrics.dropped.inc();
                        warn!(command = %id, "command dropped: the deploy task is busy");
                    }
                }
            }
            Some(Channel::Ack(stream)) => {
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
            None => {
                if let Some(tx) = &self.routes.readings {
                    if tx
                        .try_send(Reading {
                            topic,
                            payload: p.payload,
                        })
                        .is_err()
                    {
                        self.metrics.dropped.inc();
                        self.metrics.readings_dropped.inc();
                    }
                }
            }
        }
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
