//! Readings in, predictions out.
//!
//! A reading is a JSON object whose members name the model's input features, or an array of
//! such objects. Members the model does not use are ignored; an optional `id` is echoed in the
//! prediction. A reading that lacks a feature, or gives one that is not a finite number, is
//! refused and counted, and an `input_rejected` event says why (at most one a minute).
//!
//! The task drains up to `max_batch` queued rows and runs them through the shared plan in one
//! call on a blocking thread, off the async runtime. Each prediction is published live and
//! handed to the outbox.

use crate::deploy::{event, ActiveModel, Events, SharedModel};
use crate::link::Reading;
use crate::metrics::Metrics;
use crate::store::NewRecord;
use crate::sync::{now_ms, SyncMsg};
use protocol::messages::{Level, Prediction};
use rumqttc::{AsyncClient, QoS};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// One parsed input row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub values: Vec<f32>,
    pub id: Option<Value>,
}

/// Parse a reading into rows for a model with these features.
pub fn parse_reading(payload: &[u8], features: &[String]) -> Result<Vec<Row>, String> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    let objects = match v {
        Value::Object(_) => vec![v],
        Value::Array(a) if !a.is_empty() => a,
        Value::Array(_) => return Err("empty array".into()),
        _ => return Err("expected an object or an array of objects".into()),
    };
    objects
        .iter()
        .map(|o| {
            let o = o.as_object().ok_or("array element is not an object")?;
            let values = features
                .iter()
                .map(|f| match o.get(f) {
                    None => Err(format!("feature {f:?} is missing")),
                    Some(Value::Number(n)) => n
                        .as_f64()
                        .map(|x| x as f32)
                        .filter(|x| x.is_finite())
                        .ok_or_else(|| format!("feature {f:?} is out of float32 range")),
                    Some(other) => Err(format!("feature {f:?} is {other}, not a number")),
                })
                .collect::<Result<Vec<f32>, String>>()?;
            Ok(Row {
                values,
                id: o.get("id").cloned(),
            })
        })
        .collect()
}

pub struct InferenceTask {
    pub rx: mpsc::Receiver<Reading>,
    pub active: SharedModel,
    pub sync: mpsc::Sender<SyncMsg>,
    pub events: Events,
    pub client: AsyncClient,
    pub pred_topic: String,
    pub publish: Option<QoS>,
    /// The hub link's state: live copies are published only while it is up.
    pub conn: tokio::sync::watch::Receiver<crate::link::ConnState>,
    pub max_batch: usize,
    pub metrics: Arc<Metrics>,
}

struct Pending {
    source: String,
    row: Row,
}

impl InferenceTask {
    /// Runs until shutdown or until the readings channel closes. A batch already taken is
    /// always finished and handed to the outbox.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut last_reject_event: Option<Instant> = None;
        let mut rejected_since_event = 0u64;
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.rx.recv() => match r { Some(r) => r, None => break },
            };
            let model = self.active.load_full();
            let mut readings = vec![first];
            while readings.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(r) => readings.push(r),
                    Err(_) => break,
                }
            }
            let mut batch: Vec<Pending> = Vec::with_capacity(readings.len());
            let mut reject = |reason: String| {
                self.metrics.rejected.inc();
                rejected_since_event += 1;
                let due = last_reject_event.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                due.then(|| {
                    last_reject_event = Some(Instant::now());
                    let n = std::mem::take(&mut rejected_since_event);
                    event(
                        Level::Warn,
                        "input_rejected",
                        format!("{n} reading(s) refused; last: {reason}"),
                    )
                })
            };
            let mut events = vec![];
            for r in readings {
                let Some(m) = &model else {
                    events.extend(reject(format!("reading on {} arrived with no model deployed", r.topic)));
                    continue;
                };
                match parse_reading(&r.payload, &m.manifest.input.features) {
                    Ok(rows) => batch.extend(rows.into_iter().map(|row| Pending {
                        source: r.topic.clone(),
                        row,
                    })),
                    Err(e) => events.extend(reject(format!("reading on {}: {e}", r.topic))),
                }
            }
            for e in events {
                warn!(message = %e.message, "input rejected");
                self.events.emit(e).await;
            }
            if let (Some(m), false) = (model, batch.is_empty()) {
                self.infer(m, batch).await;
            }
        }
    }

    async fn infer(&mut self, model: Arc<ActiveModel>, batch: Vec<Pending>) {
        let rows: Vec<Vec<f32>> = batch.iter().map(|p| p.row.values.clone()).collect();
        let m = model.clone();
        let result = tokio::task::spawn_blocking(move || m.engine.run(&rows)).await;
        let outputs = match result {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                self.metrics.rejected.add(batch.len() as u64);
                self.events
                    .emit(event(Level::Error, "inference_failed", e.to_string()))
                    .await;
                return;
            }
            Err(e) => {
                self.metrics.rejected.add(batch.len() as u64);
                self.events
                    .emit(event(
                        Level::Error,
                        "inference_failed",
                        format!("inference thread: {e}"),
                    ))
                    .await;
                return;
            }
        };
        let ts_ms = now_ms();
        let mut records = Vec::with_capacity(outputs.rows());
        for (i, p) in batch.into_iter().enumerate() {
            let pred = Prediction {
                ts_ms,
                model: model.model_ref(),
                source: p.source,
                reading_id: p.row.id,
                outputs: outputs.row(i),
            };
            let data = serde_json::to_string(&pred).expect("a prediction serializes");
            let connected = *self.conn.borrow() == crate::link::ConnState::Connected;
            if let Some(qos) = self.publish.filter(|_| connected) {
                // Live copies are best effort; the outbox copy is the one that is guaranteed.
                if self
                    .client
                    .try_publish(self.pred_topic.clone(), qos, false, data.clone())
                    .is_err()
                {
                    self.metrics.dropped.inc();
                }
            }
            records.push(NewRecord {
                stream: protocol::streams::PREDICTIONS,
                ts_ms,
                data,
            });
        }
        self.metrics.predictions.add(records.len() as u64);
        if self.sync.send(SyncMsg::Append(records)).await.is_err() {
            warn!("outbox task is gone; predictions not buffered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feats() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn check(input: &str, expected: Result<Vec<Vec<f32>>, &str>) {
        match (parse_reading(input.as_bytes(), &feats()), expected) {
            (Ok(rows), Ok(want)) => assert_eq!(rows.into_iter().map(|r| r.values).collect::<Vec<_>>(), want, "{input}"),
            (Err(e), Err(want)) => assert!(e.contains(want), "{input}: {e} lacks {want}"),
            (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn readings_map_features_by_name() {
        check(r#"{"b": 2, "a": 1, "extra": "x"}"#, Ok(vec![vec![1.0, 2.0]]));
        check(
            r#"[{"a": 1, "b": 2}, {"a": 3.5, "b": -4}]"#,
            Ok(vec![vec![1.0, 2.0], vec![3.5, -4.0]]),
        );
        check(r#"{"a": 1}"#, Err("\"b\" is missing"));
        check(r#"{"a": 1, "b": "2"}"#, Err("not a number"));
        check(r#"{"a": 1, "b": null}"#, Err("not a number"));
        check(r#"{"a": 1, "b": 1e300}"#, Err("out of float32 range"));
        check(r#"[]"#, Err("empty array"));
        check(r#"[1]"#, Err("not an object"));
        check("42", Err("expected an object"));
        check("{", Err("not JSON"));
    }

    #[test]
    fn reading_ids_are_kept() {
        let rows = parse_reading(br#"{"a":1,"b":2,"id":"r-17"}"#, &feats()).expect("parses");
        assert_eq!(rows[0].id, Some(Value::String("r-17".into())));
    }
}
