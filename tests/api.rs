//! The local API end to end: a stock Open Inference Protocol client (`tritonclient[http]`) and
//! a stock Prometheus parser (`prometheus_client`) against a real agent, for a tabular and a
//! tensor model. Its predictions go to drift and to the hub like any other.

use lathe_e2e::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

/// One raw HTTP/1.1 exchange on a fresh connection: (status, body).
fn http(port: u16, request: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

fn get(port: u16, path: &str) -> (u16, String) {
    http(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: lathe\r\nConnection: close\r\n\r\n"),
    )
}

/// Run the stock clients against the API; what they saw.
fn clients(port: u16, model: &str, spec: &Value, dir: &std::path::Path) -> Value {
    let file = dir.join(format!("{model}-spec.json"));
    std::fs::write(&file, spec.to_string()).expect("spec");
    let (code, out, err) = run(Command::new("python3")
        .arg(repo_root().join("tests/clients/v2_client.py"))
        .arg(format!("127.0.0.1:{port}"))
        .arg(model)
        .arg(&file));
    assert_eq!(code, 0, "v2_client.py: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4 + 1e-4 * b.abs()
}

/// The samples of a metric family as the stock parser read it: (sample name, labels, value).
fn samples<'a>(seen: &'a Value, family: &str, kind: &str) -> &'a Vec<Value> {
    let f = &seen["metrics"][family];
    assert_eq!(f["type"], kind, "{family}: {:#}", seen["metrics"]);
    f["samples"].as_array().expect("samples")
}

#[test]
fn a_stock_v2_client_runs_a_tabular_model_and_its_predictions_reach_drift_and_the_hub() {
    let s = Fleet::new();
    let _hub = s.hub();
    let port = free_port();
    let listen = format!("listen = \"127.0.0.1:{port}\"");
    let d = s.device(
        "api-1",
        s.hub_broker.port,
        &[
            ("api", &listen),
            ("drift", "window_rows = 16"),
            ("drift", "min_rows = 8"),
        ],
    );
    let _agent = s.agent(&d);
    wait_online(s.hub_broker.port, "api-1");

    // Live at once; ready only with a model.
    assert_eq!(get(port, "/v2/health/live").0, 200);
    let (code, body) = get(port, "/v2/health/ready");
    assert_eq!(
        (code, body.as_str()),
        (503, r#"{"error":"no model deployed in slot(s) default"}"#)
    );

    let train = repo_root().join("fixtures/drift/train.csv");
    let c = cases();
    let (code, out, bundle) = s.pack_model(
        &fixture("vibration_logreg.onnx"),
        "vibration",
        1,
        &c.features.join(","),
        &["--baseline", train.to_str().expect("utf8")],
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = s.deploy(&d, &bundle);
    assert_eq!(code, 0, "{out}");

    let (code, body) = get(port, "/v2/models/vibration");
    assert_eq!(code, 200, "{body}");
    let meta: Value = serde_json::from_str(&body).expect("metadata");
    let input = meta["inputs"][0]["name"].as_str().expect("input name").to_string();
    let rows: Vec<&Vec<f64>> = c.rows.iter().take(8).collect();
    let spec = json!({
        "inputs": {&input: {"shape": [8, c.features.len()], "values": rows.iter().flat_map(|r| r.iter()).collect::<Vec<_>>()}},
        "outputs": ["label", "probabilities"],
    });
    let seen = clients(port, "vibration", &spec, s.path());

    assert_eq!(
        (
            &seen["live"],
            &seen["ready"],
            &seen["model_ready"],
            &seen["unknown_ready"]
        ),
        (&json!(true), &json!(true), &json!(true), &json!(false)),
        "{seen:#}"
    );
    assert_eq!(seen["server"]["name"], "lathe");
    assert_eq!(
        seen["metadata"],
        json!({
            "name": "vibration",
            "versions": ["1"],
            "platform": "onnx_onnxv1",
            "inputs": [{"name": input, "datatype": "FP32", "shape": [-1, c.features.len()]}],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}
            ]
        })
    );
    assert_eq!(seen["id"], "req-1");
    let label = &seen["outputs"]["label"];
    assert_eq!(
        (&label["shape"], &label["dtype"]),
        (&json!([8]), &json!("int64")),
        "{seen:#}"
    );
    let probs = &seen["outputs"]["probabilities"];
    assert_eq!(probs["shape"], json!([8, 2]));
    for (i, want) in c.expected.iter().take(8).enumerate() {
        assert_eq!(label["values"][i].as_f64(), Some(want["label"][0]), "row {i}: {seen:#}");
        for (j, p) in want["probabilities"].iter().enumerate() {
            let got = probs["values"][i * 2 + j].as_f64().expect("probability");
            assert!(close(got, *p), "row {i}: {got} vs {p}");
        }
    }
    assert_eq!(seen["all_outputs"], json!(["label", "probabilities"]));
    let refused = |what: &str, words: &[&str]| {
        let e = seen[what]
            .as_str()
            .unwrap_or_else(|| panic!("{what} was not refused: {seen:#}"));
        assert!(words.iter().all(|w| e.contains(w)), "{what}: {e}");
    };
    refused("wrong_shape", &["shape [1, 3]", "the model takes [n, 4]"]);
    refused("binary_input", &["binary tensor data", "send the tensors as JSON"]);
    refused("unknown_model", &["no active model named \"no-such-model\""]);

    // The stock parser reads every family with its type.
    let codes: Vec<(String, f64)> = samples(&seen, "lathe_api_requests", "counter")
        .iter()
        .map(|s| {
            (
                s[1]["code"].as_str().expect("code").to_string(),
                s[2].as_f64().expect("value"),
            )
        })
        .collect();
    assert!(codes.iter().any(|(c, n)| c == "200" && *n >= 7.0), "{codes:?}");
    assert!(codes.iter().any(|(c, n)| c == "400" && *n == 2.0), "{codes:?}");
    assert!(codes.iter().any(|(c, n)| c == "404" && *n >= 2.0), "{codes:?}");
    let calls = samples(&seen, "lathe_inference_duration_seconds", "histogram")
        .iter()
        .find(|s| s[0] == "lathe_inference_duration_seconds_count")
        .and_then(|s| s[2].as_f64())
        .expect("a count");
    assert!(calls >= 2.0, "{calls}");
    for (family, kind) in [
        ("lathe_readings", "counter"),
        ("lathe_readings_rejected", "counter"),
        ("lathe_predictions", "counter"),
        ("lathe_inference_failures", "counter"),
        ("lathe_records_dropped", "counter"),
        ("lathe_drift_alerts", "counter"),
        ("lathe_mqtt_reconnects", "counter"),
        ("lathe_outbox_records", "gauge"),
        ("lathe_sync_lag_seconds", "gauge"),
        ("lathe_model_info", "gauge"),
        ("lathe_api_request_duration_seconds", "histogram"),
    ] {
        samples(&seen, family, kind);
    }
    let info = &samples(&seen, "lathe_model_info", "gauge")[0];
    assert_eq!(
        info[1],
        json!({"slot": "default", "model": "vibration", "version": "1"})
    );

    // Two requests of 8 rows: one drift window of 16 rows, and 16 predictions at the hub,
    // each with the request's id and where it came from.
    let window = eventually(Duration::from_secs(30), || {
        let (_, v) = status(&d);
        (v["drift"]["last"]["rows"] == 16).then_some(v)
    });
    assert!(window.is_some(), "no drift window of the API's rows: {}", status(&d).1);
    let at_hub = eventually(Duration::from_secs(30), || {
        let api: Vec<Value> = hub_records(&s.hub_db, "predictions")
            .iter()
            .filter_map(|r| serde_json::from_str::<Value>(r).ok())
            .filter(|v| v["source"] == "api")
            .collect();
        (api.len() == 16).then_some(api)
    })
    .expect("16 predictions of the API at the hub");
    assert_eq!(at_hub.iter().filter(|v| v["reading_id"] == "req-1").count(), 8);
    assert_eq!(at_hub[0]["model"], json!({"name": "vibration", "version": 1}));
    let (_, metrics) = get(port, "/metrics");
    assert!(metrics.lines().any(|l| l == "lathe_predictions_total 16"), "{metrics}");

    // A body over the limit is refused before it is read; a chunked one, for want of a length.
    let (code, body) = http(
        port,
        "POST /v2/models/vibration/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000\r\n\r\n",
    );
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("api.max_body_bytes"), "{body}");
    let (code, _) = http(
        port,
        "POST /v2/models/vibration/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert_eq!(code, 411);
}

#[test]
fn a_stock_v2_client_runs_a_tensor_model_like_onnxruntime() {
    let s = Fleet::new();
    let _hub = s.hub();
    let port = free_port();
    let listen = format!("listen = \"127.0.0.1:{port}\"");
    let d = s.device("api-2", s.hub_broker.port, &[("api", &listen)]);
    let _agent = s.agent(&d);
    wait_online(s.hub_broker.port, "api-2");
    let npy = fixture("signal_cnn.inputs.npy");
    let (code, out, bundle) = s.pack_model(
        &fixture("signal_cnn.onnx"),
        "rul",
        1,
        "",
        &["--selftest", npy.to_str().expect("utf8")],
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = s.deploy(&d, &bundle);
    assert_eq!(code, 0, "{out}");

    let cases: Value =
        serde_json::from_slice(&std::fs::read(fixture("signal_cnn.cases.json")).expect("cases")).expect("json");
    let values = npy_f32(&npy);
    let spec = json!({
        "inputs": {"signal": {"shape": [4, 1, 1024], "values": values}},
        "outputs": ["rul"],
    });
    let seen = clients(port, "rul", &spec, s.path());
    assert_eq!(
        seen["metadata"],
        json!({
            "name": "rul",
            "versions": ["1"],
            "platform": "onnx_onnxv1",
            "inputs": [{"name": "signal", "datatype": "FP32", "shape": [-1, 1, 1024]}],
            "outputs": [{"name": "rul", "datatype": "FP32", "shape": [-1, 1]}]
        })
    );
    let rul = &seen["outputs"]["rul"];
    assert_eq!(
        (&rul["shape"], &rul["dtype"]),
        (&json!([4, 1]), &json!("float32")),
        "{seen:#}"
    );
    let want = cases["outputs"]["rul"]["values"].as_array().expect("values");
    for (got, want) in rul["values"].as_array().expect("values").iter().zip(want) {
        let (g, w) = (got.as_f64().expect("f64"), want.as_f64().expect("f64"));
        assert!(close(g, w), "{g} vs {w}");
    }
    assert_eq!(rul["values"].as_array().map(Vec::len), Some(4));
    assert!(
        seen["wrong_shape"]
            .as_str()
            .is_some_and(|e| e.contains("the model takes [n, 1, 1024]")),
        "{seen:#}"
    );
}

/// The float32 values of a little-endian `.npy` file (version 1, C order).
fn npy_f32(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).expect("npy");
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8_lossy(&bytes[10..10 + header_len]);
    assert!(header.contains("'<f4'") && header.contains("False"), "{header}");
    bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
