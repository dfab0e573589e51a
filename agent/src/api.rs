//! The local API (`[api] listen`, off by default): the Open Inference Protocol (KServe V2) over
//! REST for the models this device runs, and Prometheus metrics at `/metrics`.
//!
//! - A small HTTP/1.1 server on tokio: keep-alive, `Content-Length` bodies (a chunked body is
//!   refused with 411), `Expect: 100-continue`. Everything is bounded: connections served at
//!   once (`max_connections`), the request head (16 KiB, 64 headers), the body
//!   (`max_body_bytes`, checked before it is read), the wait for a next request
//!   (`idle_timeout_secs`) and each request (`request_timeout_secs`).
//! - Inference is not done here: a request's rows go to the slot's inference task on a bounded
//!   queue, and run there like readings (drift, samples, the watch period, predictions in the
//!   outbox). A full queue is a 503, never a wait without end.
//! - The API only reads the agent's state: it deploys nothing and changes no setting.

use crate::config::ApiConfig;
use crate::deploy::{ActiveModel, SharedModel};
use crate::inference::ApiCall;
use crate::metrics::{Histogram, Metrics};
use crate::sync::now_ms;
use crate::v2;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The largest request head (request line and headers).
const MAX_HEAD: usize = 16 << 10;
const MAX_HEADERS: usize = 64;

/// One model slot as the API sees it.
pub struct ApiSlot {
    pub name: Option<String>,
    pub active: SharedModel,
    pub calls: mpsc::Sender<ApiCall>,
}

pub struct Api {
    pub listener: TcpListener,
    pub cfg: ApiConfig,
    pub slots: Vec<ApiSlot>,
    pub metrics: Arc<Metrics>,
    /// The longest request id echoed into predictions.
    pub max_id: usize,
}

/// An answer: status, content type, body, and whether the connection must close after it.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    close: bool,
}

impl Answer {
    fn json(status: u16, body: Vec<u8>) -> Answer {
        Answer {
            status,
            content_type: "application/json",
            body,
            close: false,
        }
    }
    fn error(status: u16, message: &str) -> Answer {
        Answer::json(status, v2::error_body(message))
    }
    fn empty(status: u16) -> Answer {
        Answer {
            body: vec![],
            ..Answer::json(status, vec![])
        }
    }
    fn closing(mut self) -> Answer {
        self.close = true;
        self
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

struct Shared {
    cfg: ApiConfig,
    slots: Vec<ApiSlot>,
    metrics: Arc<Metrics>,
    max_id: usize,
}

impl Api {
    /// Serve until `shutdown`; connections being served finish their request.
    pub async fn run(self, shutdown: CancellationToken) {
        let limit = Arc::new(Semaphore::new(self.cfg.max_connections));
        let addr = self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        info!(%addr, "local API listening");
        let shared = Arc::new(Shared {
            cfg: self.cfg,
            slots: self.slots,
            metrics: self.metrics,
            max_id: self.max_id,
        });
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let (shared, stop) = (shared.clone(), shutdown.clone());
                    tokio::spawn(async move {
                        connection(stream, &shared, stop).await;
                        debug!(%peer, "API connection closed");
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    warn!(error = %e, "the local API cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Serve one connection's requests, one after the other.
async fn connection(mut stream: TcpStream, shared: &Shared, shutdown: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(8 << 10);
    let idle = Duration::from_secs(shared.cfg.idle_timeout_secs);
    let per_request = Duration::from_secs(shared.cfg.request_timeout_secs);
    loop {
        // Wait for the first byte of the next request, then give it `per_request` in all.
        if buf.is_empty() {
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(idle, read_more(&mut stream, &mut buf)) => r,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + per_request;
        let answer = match tokio::time::timeout_at(deadline, request(&mut stream, &mut buf, shared, deadline)).await {
            Ok(Some(a)) => a,
            Ok(None) => return,
            Err(_) => Answer::error(408, "the request did not arrive whole in time").closing(),
        };
        shared.metrics.api.served(answer.status, started.elapsed());
        if write_answer(&mut stream, &answer).await.is_err() || answer.close {
            return;
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; 8 << 10];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

async fn write_answer(stream: &mut TcpStream, a: &Answer) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\n",
        a.status,
        reason(a.status),
        a.body.len()
    );
    if !a.body.is_empty() {
        let _ = write!(head, "Content-Type: {}\r\n", a.content_type);
    }
    if a.status == 405 {
        head.push_str("Allow: GET, POST\r\n");
    }
    if a.close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&a.body).await?;
    stream.flush().await
}

/// What a request head says, once parsed.
struct Head {
    method: String,
    path: String,
    keep_alive: bool,
    length: usize,
    expect_continue: bool,
    binary_header: bool,
    encoded: bool,
}

/// Read, parse and answer one request whose first bytes are in `buf`; `None` when the peer
/// went away. Consumed bytes leave `buf`.
async fn request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    shared: &Shared,
    deadline: tokio::time::Instant,
) -> Option<Answer> {
    let (head, head_len) = loop {
        match parse_head(buf, shared.cfg.max_body_bytes) {
            Ok(Some(h)) => break h,
            Ok(None) if buf.len() >= MAX_HEAD => {
                return Some(Answer::error(431, "the request head is larger than 16 KiB").closing())
            }
            Ok(None) => {
                if read_more(stream, buf).await.ok()? == 0 {
                    return None;
                }
            }
            Err(a) => return Some(a.closing()),
        }
    };
    if head.expect_continue && head.length > 0 && buf.len() < head_len + head.length {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.ok()?;
    }
    while buf.len() < head_len + head.length {
        if read_more(stream, buf).await.ok()? == 0 {
            return None;
        }
    }
    let body: Vec<u8> = buf[head_len..head_len + head.length].to_vec();
    buf.drain(..head_len + head.length);
    let mut answer = route(&head, &body, shared, deadline).await;
    answer.close |= !head.keep_alive;
    Some(answer)
}

/// Parse a request head: `Ok(None)` while it is incomplete; an answer when it is refused.
fn parse_head(buf: &[u8], max_body: usize) -> Result<Option<(Head, usize)>, Answer> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Answer::error(431, "more than 64 request headers")),
        Err(e) => return Err(Answer::error(400, &format!("not an HTTP/1.1 request: {e}"))),
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    if header("transfer-encoding").is_some() {
        return Err(Answer::error(
            411,
            "a body must come with a Content-Length; chunked bodies are not supported",
        ));
    }
    let length = match header("content-length") {
        None => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| Answer::error(400, &format!("Content-Length {v:?} is not a number")))?,
    };
    if length > max_body {
        return Err(Answer::error(
            413,
            &format!("the body has {length} bytes; this API takes at most {max_body} (api.max_body_bytes)"),
        ));
    }
    let version = req.version.unwrap_or(1);
    let connection = header("connection").unwrap_or_default();
    let keep_alive = match version {
        0 => connection.contains("keep-alive"),
        _ => !connection.contains("close"),
    };
    Ok(Some((
        Head {
            method: req.method.unwrap_or("").to_string(),
            path: req.path.unwrap_or("").to_string(),
            keep_alive,
            length,
            expect_continue: header("expect").is_some_and(|e| e == "100-continue"),
            binary_header: header("inference-header-content-length").is_some(),
            encoded: header("content-encoding").is_some_and(|e| e != "identity"),
        },
        len,
    )))
}

/// The routes, by path and method.
async fn route(head: &Head, body: &[u8], shared: &Shared, deadline: tokio::time::Instant) -> Answer {
    let path = head.path.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let get = head.method == "GET" || head.method == "HEAD";
    let post = head.method == "POST";
    let answer = match (parts.as_slice(), get, post) {
        (["metrics"], true, _) => Answer {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: render_metrics(&shared.metrics, &shared.slots, now_ms()).into_bytes(),
            close: false,
        },
        (["v2", "health", "live"], true, _) => Answer::empty(200),
        (["v2", "health", "ready"], true, _) => {
            let missing: Vec<String> = shared
                .slots
                .iter()
                .filter(|s| s.active.load().is_none())
                .map(|s| s.name.clone().unwrap_or_else(|| "default".into()))
                .collect();
            if missing.is_empty() {
                Answer::empty(200)
            } else {
                Answer::error(503, &format!("no model deployed in slot(s) {}", missing.join(", ")))
            }
        }
        (["v2"], true, _) => Answer::json(200, to_json(&v2::server_metadata())),
        (["v2", "models", rest @ ..], _, _) => model_route(rest, head, body, shared, deadline).await,
        (["metrics"] | ["v2"] | ["v2", "health", "live" | "ready"], false, _) => {
            Answer::error(405, &format!("{} does not take {}", path, head.method))
        }
        _ => Answer::error(404, &format!("no such endpoint: {path}")),
    };
    if head.method == "HEAD" {
        // The same head, without the body.
        return Answer { body: vec![], ..answer };
    }
    answer
}

/// `v2/models/{name}[/versions/{v}][/ready|/infer]`.
async fn model_route(
    rest: &[&str],
    head: &Head,
    body: &[u8],
    shared: &Shared,
    deadline: tokio::time::Instant,
) -> Answer {
    let (name, version, action) = match rest {
        [name] => (*name, None, None),
        [name, "versions", v] => (*name, Some(*v), None),
        [name, action] => (*name, None, Some(*action)),
        [name, "versions", v, action] => (*name, Some(*v), Some(*action)),
        _ => return Answer::error(404, "no such endpoint"),
    };
    let method_ok = match action {
        None | Some("ready") => head.method == "GET" || head.method == "HEAD",
        Some("infer") => head.method == "POST",
        Some(_) => return Answer::error(404, "no such endpoint"),
    };
    if !method_ok {
        return Answer::error(405, &format!("this endpoint does not take {}", head.method));
    }
    let (slot, model) = match find(shared, name, version) {
        Ok(found) => found,
        Err(a) => return a,
    };
    match action {
        None => Answer::json(200, to_json(&v2::metadata(&model))),
        Some("ready") => Answer::empty(200),
        _ => infer(slot, model, head, body, shared, deadline).await,
    }
}

/// The slot whose active model is `name` (at `version`, when given).
fn find<'a>(shared: &'a Shared, name: &str, version: Option<&str>) -> Result<(&'a ApiSlot, Arc<ActiveModel>), Answer> {
    let mut active = vec![];
    for slot in &shared.slots {
        if let Some(m) = slot.active.load_full() {
            if m.manifest.name == name {
                return match version {
                    Some(v) if v != m.manifest.version.to_string() => Err(Answer::error(
                        404,
                        &format!(
                            "model {name} version {v} is not active; version {} is",
                            m.manifest.version
                        ),
                    )),
                    _ => Ok((slot, m)),
                };
            }
            active.push(m.manifest.name.clone());
        }
    }
    Err(Answer::error(
        404,
        &format!("no active model named {name:?}; active: {active:?}"),
    ))
}

async fn infer(
    slot: &ApiSlot,
    model: Arc<ActiveModel>,
    head: &Head,
    body: &[u8],
    shared: &Shared,
    deadline: tokio::time::Instant,
) -> Answer {
    if head.binary_header {
        return Answer::error(
            400,
            "binary tensor data (Inference-Header-Content-Length) is not supported; send the tensors as JSON",
        );
    }
    if head.encoded {
        return Answer::error(415, "compressed request bodies are not supported");
    }
    let mut req: v2::InferRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Answer::error(400, &format!("the body is not an inference request: {e}")),
    };
    let rows = match v2::rows(&model, &mut req, shared.max_id) {
        Ok(r) => r,
        Err(e) => return Answer::error(400, &e),
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let call = ApiCall {
        model: model.clone(),
        rows,
        reply,
    };
    match slot.calls.try_send(call) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            return Answer::error(503, "the model is busy with other requests; retry");
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return Answer::error(503, "inference has stopped: the agent is shutting down");
        }
    }
    let outputs = match tokio::time::timeout_at(deadline, answer).await {
        Ok(Ok(Ok(o))) => o,
        Ok(Ok(Err(e))) if e.starts_with("the model changed") => return Answer::error(503, &e),
        Ok(Ok(Err(e))) => return Answer::error(500, &e),
        Ok(Err(_)) => return Answer::error(503, "inference has stopped: the agent is shutting down"),
        Err(_) => {
            return Answer::error(
                504,
                "the model did not answer within api.request_timeout_secs (its predictions still go to the outbox)",
            )
        }
    };
    Answer::json(200, to_json(&v2::response(&model, &req, outputs)))
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("API bodies serialize")
}

/// The Prometheus text format (version 0.0.4) of the agent's metrics.
pub fn render_metrics(m: &Metrics, slots: &[ApiSlot], now: u64) -> String {
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v as f64)];
    let simple = [
        (
            "lathe_readings_total",
            "counter",
            "Reading messages received.",
            &m.readings,
        ),
        (
            "lathe_readings_rejected_total",
            "counter",
            "Reading messages refused whole (too large, malformed, no model, queue full).",
            &m.rejected,
        ),
        (
            "lathe_predictions_total",
            "counter",
            "Predictions made durable in the outbox.",
            &m.predictions,
        ),
        (
            "lathe_inference_failures_total",
            "counter",
            "Rows whose inference failed.",
            &m.inference_failed,
        ),
        (
            "lathe_records_dropped_total",
            "counter",
            "Records lost: dropped by the when-full policy, refused for their size, or unwritable.",
            &m.dropped,
        ),
        (
            "lathe_drift_alerts_total",
            "counter",
            "Drift windows that closed in alert.",
            &m.drift_alerts,
        ),
        (
            "lathe_outbox_records",
            "gauge",
            "Records in the outbox waiting for the hub's ack.",
            &m.outbox_depth,
        ),
        (
            "lathe_outbox_bytes",
            "gauge",
            "Bytes of the records waiting in the outbox.",
            &m.outbox_bytes,
        ),
    ];
    for (name, kind, help, counter) in simple {
        family(name, kind, help, &one(counter.get()));
    }
    family(
        "lathe_mqtt_reconnects_total",
        "counter",
        "Connections made again after one was lost, by link.",
        &[
            ("{link=\"hub\"}".into(), m.reconnects_hub.get() as f64),
            ("{link=\"sensors\"}".into(), m.reconnects_sensors.get() as f64),
        ],
    );
    let oldest = m.oldest_ms.get();
    let lag = if oldest == 0 {
        0.0
    } else {
        now.saturating_sub(oldest) as f64 / 1000.0
    };
    family(
        "lathe_sync_lag_seconds",
        "gauge",
        "Age of the oldest record not yet acked by the hub (0 when none waits).",
        &[(String::new(), lag)],
    );
    let free = m.disk_free.get();
    if free != u64::MAX && free != 0 {
        family(
            "lathe_disk_free_bytes",
            "gauge",
            "Free bytes on the state_dir's filesystem.",
            &one(free),
        );
    }
    let models: Vec<(String, f64)> = slots
        .iter()
        .filter_map(|s| {
            let m = s.active.load_full()?;
            Some((
                format!(
                    "{{slot=\"{}\",model=\"{}\",version=\"{}\"}}",
                    label(s.name.as_deref().unwrap_or("default")),
                    label(&m.manifest.name),
                    m.manifest.version
                ),
                1.0,
            ))
        })
        .collect();
    family("lathe_model_info", "gauge", "The active model of each slot.", &models);
    let requests: Vec<(String, f64)> = m
        .api
        .by_code()
        .into_iter()
        .map(|(code, n)| (format!("{{code=\"{code}\"}}"), n as f64))
        .collect();
    family(
        "lathe_api_requests_total",
        "counter",
        "Requests the local API answered, by status code.",
        &requests,
    );
    histogram(
        &mut out,
        "lathe_inference_duration_seconds",
        "Inference calls (a batch of rows each).",
        &m.inference_seconds,
    );
    histogram(
        &mut out,
        "lathe_api_request_duration_seconds",
        "Requests of the local API, from their first byte to their answer.",
        &m.api.duration,
    );
    out
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let (counts, sum) = h.cumulative();
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (bound, count) in Histogram::BOUNDS.iter().zip(&counts) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let total = counts.last().copied().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {total}");
}

/// A label value, escaped as the text format says.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<(Head, usize)>, Answer> {
        parse_head(text.as_bytes(), 1024)
    }

    #[test]
    fn heads_are_parsed_and_refused_with_their_reason() {
        let text = "POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n{";
        let (h, n) = head(text).ok().flatten().expect("complete");
        assert_eq!(
            (h.method.as_str(), h.path.as_str(), h.length),
            ("POST", "/v2/models/m/infer", 12)
        );
        assert_eq!(n, text.len() - 1, "the head ends before the body");
        assert!(h.keep_alive && h.expect_continue && !h.binary_header);
        assert!(
            matches!(head("GET /v2 HTTP/1.1\r\nHost: x\r\n"), Ok(None)),
            "incomplete"
        );
        let h = head("GET /v2 HTTP/1.0\r\n\r\n").ok().flatten().expect("complete").0;
        assert!(!h.keep_alive, "HTTP/1.0 closes unless asked");
        let h = head("GET /v2 HTTP/1.1\r\nConnection: close\r\n\r\n")
            .ok()
            .flatten()
            .expect("complete")
            .0;
        assert!(!h.keep_alive);
        let status = |text: &str| match head(text) {
            Err(a) => a.status,
            Ok(_) => 0,
        };
        assert_eq!(status("POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 411);
        assert_eq!(status("POST /x HTTP/1.1\r\nContent-Length: 1025\r\n\r\n"), 413);
        assert_eq!(status("POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(status("BLAH\r\n\r\n"), 400);
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(65));
        assert_eq!(status(&many), 431);
    }

    #[test]
    fn metrics_follow_the_text_format() {
        let m = Metrics::default();
        m.readings.add(7);
        m.predictions.add(5);
        m.oldest_ms.set(1_000);
        m.inference_seconds.observe(Duration::from_micros(300));
        m.api.served(200, Duration::from_millis(2));
        m.api.served(400, Duration::from_millis(1));
        let text = render_metrics(&m, &[], 4_500);
        for line in [
            "# TYPE lathe_readings_total counter",
            "lathe_readings_total 7",
            "lathe_predictions_total 5",
            "lathe_sync_lag_seconds 3.5",
            "lathe_mqtt_reconnects_total{link=\"hub\"} 0",
            "lathe_api_requests_total{code=\"200\"} 1",
            "lathe_api_requests_total{code=\"400\"} 1",
            "# TYPE lathe_inference_duration_seconds histogram",
            "lathe_inference_duration_seconds_bucket{le=\"0.00025\"} 0",
            "lathe_inference_duration_seconds_bucket{le=\"0.0005\"} 1",
            "lathe_inference_duration_seconds_bucket{le=\"+Inf\"} 1",
            "lathe_inference_duration_seconds_count 1",
            "lathe_api_request_duration_seconds_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        // Every sample line names a family declared before it.
        let mut declared = vec![];
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().expect("name").to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().expect("name");
                assert!(
                    declared.iter().any(|d| name == d
                        || name
                            .strip_prefix(d.as_str())
                            .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))),
                    "{l}"
                );
            }
        }
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
