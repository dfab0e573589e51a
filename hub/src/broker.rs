//! The embedded MQTT broker (rumqttd), so that a first run needs nothing installed.

use std::collections::HashMap;
use std::net::SocketAddr;

/// Start a broker listening on `listen` in a background thread. It runs until the process ends.
pub fn start(listen: SocketAddr, max_packet_bytes: usize) -> anyhow::Result<()> {
    // Fail early and plainly if the port is taken; rumqttd would only log it.
    drop(
        std::net::TcpListener::bind(listen)
            .map_err(|e| anyhow::anyhow!("embedded broker cannot listen on {listen}: {e}"))?,
    );
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: max_packet_bytes,
            max_inflight_count: 200,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            max_segment_size: max_packet_bytes.max(1 << 20) * 2,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })?;
    // Wait until it completes an MQTT handshake.
    for _ in 0..100 {
        if handshake(listen).is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    anyhow::bail!("embedded broker did not start answering on {listen}")
}

/// An MQTT 3.1.1 CONNECT, CONNACK and DISCONNECT, so the broker sees a well-behaved client.
fn handshake(addr: SocketAddr) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
    let id = b"lathe-hub-probe";
    let mut pkt = vec![
        0x10,
        (10 + 2 + id.len()) as u8,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x02,
        0,
        10,
        0,
        id.len() as u8,
    ];
    pkt.extend_from_slice(id);
    s.write_all(&pkt)?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)?;
    if ack != [0x20, 0x02, 0x00, 0x00] {
        return Err(std::io::Error::other(format!("unexpected CONNACK {ack:02x?}")));
    }
    s.write_all(&[0xe0, 0x00])
}
