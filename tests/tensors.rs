//! Tensor models end to end, with the real binaries against real Mosquitto brokers: an image
//! classifier packed from its ONNX shapes with signed image preprocessing, deployed, fed JPEG
//! and PNG readings (binary and in JSON): PNG files that hold the pixels onnxruntime saw match
//! it exactly, JPEG files within the decoders' rounding; its predictions are compact and
//! synced to the hub; and a 1-D signal model packed with a
//! `.npy` self-test, run by `lathe model run` and fed JSON tensors.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use lathe_e2e::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-5 + 1e-4 * want.abs()
}

fn images() -> std::path::PathBuf {
    repo_root().join("fixtures/images")
}

/// The `readings` losses of cause `malformed` that `lathe status --json` shows, once there are
/// at least `n`.
fn refused(d: &Device, n: u64) -> u64 {
    let count = |v: &Value| {
        v["losses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["stream"] == "readings" && l["cause"] == "malformed")
            .filter_map(|l| l["total"].as_u64())
            .sum::<u64>()
    };
    eventually(Duration::from_secs(20), || {
        let (_, v) = status(d);
        let c = count(&v);
        (c >= n).then_some(c)
    })
    .unwrap_or_else(|| panic!("the device never counted {n} refused reading(s): {:?}", status(d)))
}

#[test]
fn an_image_model_deploys_and_predicts_jpeg_readings_like_onnxruntime() {
    let f = Fleet::new();
    let _hub = f.hub();
    let id = "camera-1";
    let d = f.device(
        id,
        f.hub_broker.port,
        &[
            ("inputs", "binary_topics = [\"cams/camera-1/+\"]"),
            // Four probabilities are more than 2 values: predictions carry the top 3.
            ("predictions", "max_values = 2"),
            ("predictions", "top_k = 3"),
        ],
    );
    let _agent = f.agent(&d);
    wait_online(f.hub_broker.port, id);

    let doc: Value = serde_json::from_slice(&std::fs::read(images().join("cases.json")).expect("cases")).expect("json");
    let image = &doc["image"];
    let list = |k: &str| {
        image[k]
            .as_array()
            .expect("list")
            .iter()
            .map(|v| v.as_str().expect("string"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let (mean, std) = (list("mean"), list("std"));
    let (code, out, bundle) = f.pack_model(
        &fixture("image_cnn.onnx"),
        "defects",
        1,
        "",
        &["--image", "rgb", "--image-mean", &mean, "--image-std", &std],
    );
    assert_eq!(code, 0, "pack: {out}");
    let (code, out, err) =
        run(hub_cmd(&["bundle", "inspect", bundle.to_str().expect("utf8")]).stdout(std::process::Stdio::piped()));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("input      image float32 [N, 3, 64, 64]"), "{out}");
    assert!(out.contains("image      rgb nchw mean [0.485, 0.456, 0.406]"), "{out}");
    let (code, out) = f.deploy(&d, &bundle);
    assert_eq!(code, 0, "deploy: {out}");

    // Each image on a topic of its own (binary), one again inside a JSON reading with an id,
    // and a broken JPEG, which is refused and counted.
    let sensor = Sensor::new(f.sensor_broker.port, id);
    let cases = doc["cases"].as_array().expect("cases");
    let mut files = vec![];
    for c in cases {
        for k in ["file", "lossless"] {
            let file = c[k].as_str().expect("file");
            if !files.contains(&file) {
                files.push(file);
            }
        }
    }
    for file in &files {
        let bytes = std::fs::read(images().join(file)).expect("image");
        sensor
            .client
            .publish(format!("cams/{id}/{file}"), rumqttc::QoS::AtLeastOnce, false, bytes)
            .expect("publish");
    }
    let first = std::fs::read(images().join(cases[0]["file"].as_str().expect("a string"))).expect("image");
    let json = serde_json::json!({"id": 100, "image": {"image": B64.encode(&first)}});
    sensor.send(serde_json::to_vec(&json).expect("json"));
    sensor
        .client
        .publish(
            format!("cams/{id}/broken.jpg"),
            rumqttc::QoS::AtLeastOnce,
            false,
            first[..first.len() / 2].to_vec(),
        )
        .expect("publish");
    sensor.wait_acked(files.len() as u64 + 2);

    // Every prediction reaches the hub, with its top 3 classes as onnxruntime ranks them.
    let preds = eventually(Duration::from_secs(60), || {
        let p: Vec<Value> = hub_records(&f.hub_db, "predictions")
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect();
        (p.len() > files.len()).then_some(p)
    })
    .expect("the predictions reach the hub");
    // Outputs on the pixels onnxruntime saw match it; a JPEG's are within the decoders'
    // rounding (agent/tests/cnn_fixtures.rs measures it).
    let check = |p: &Value, c: &Value, exact: bool| {
        let want: Vec<f64> = serde_json::from_value(c["probabilities"].clone()).expect("probabilities");
        let mut order: Vec<usize> = (0..want.len()).collect();
        order.sort_by(|a, b| want[*b].total_cmp(&want[*a]));
        let top = p["top"]["probabilities"]
            .as_array()
            .unwrap_or_else(|| panic!("no top: {p}"));
        assert_eq!(top.len(), 3, "{p}");
        for (k, entry) in top.iter().enumerate() {
            let (i, v) = (
                entry[0].as_u64().expect("index") as usize,
                entry[1].as_f64().expect("value"),
            );
            assert_eq!(i, order[k], "{}: rank {k} in {p}", c["file"]);
            let near = if exact {
                close(v, want[i])
            } else {
                (v - want[i]).abs() <= 0.005
            };
            assert!(near, "{}: {v} where onnxruntime gave {}", c["file"], want[i]);
        }
        assert!(p["outputs"].get("probabilities").is_none(), "{p}");
        assert_eq!(p["model"]["name"], "defects");
    };
    for c in cases {
        for (k, exact) in [("file", false), ("lossless", true)] {
            let source = format!("cams/{id}/{}", c[k].as_str().expect("a string"));
            let p = preds
                .iter()
                .find(|p| p["source"] == source.as_str())
                .unwrap_or_else(|| panic!("no prediction for {source}: {preds:?}"));
            check(p, c, exact || c["file"] == c["lossless"]);
        }
    }
    let by_json = preds
        .iter()
        .find(|p| p["reading_id"] == 100)
        .expect("the JSON reading's prediction");
    check(by_json, &cases[0], false);
    assert!(!preds
        .iter()
        .any(|p| p["source"].as_str().unwrap_or("").ends_with("broken.jpg")));

    assert_eq!(refused(&d, 1), 1);
    let (code, out, err) = run(Command::new(&bins().0).args(["status", "--config"]).arg(&d.config));
    assert!(out.contains("defects v1"), "{code}: {out}{err}");
}

#[test]
fn a_signal_model_packs_from_its_shape_and_runs_from_npy_and_json_tensors() {
    let f = Fleet::new();
    let _hub = f.hub();
    let dir = f.path();
    let cases: Value =
        serde_json::from_slice(&std::fs::read(fixture("signal_cnn.cases.json")).expect("cases")).expect("json");
    let want: Vec<f64> = serde_json::from_value(cases["outputs"]["rul"]["values"].clone()).expect("values");
    let npy = fixture("signal_cnn.inputs.npy");
    let inputs = lathe::npy::read_f32(&std::fs::read(&npy).expect("npy")).expect("float32 npy");
    assert_eq!(inputs.shape, [4, 1, 1024]);

    // `model run` on the ONNX file and the .npy file.
    let (code, out, err) = run(Command::new(&bins().0)
        .args(["model", "run", "--json", "--input"])
        .arg(&npy)
        .arg(fixture("signal_cnn.onnx")));
    assert_eq!(code, 0, "{out}{err}");
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(rows.len(), 4);
    for (r, w) in rows.iter().zip(&want) {
        assert!(close(r["rul"][0].as_f64().expect("rul"), *w), "{r} vs {w}");
    }
    // A CSV is for tabular models; a .npy of the wrong shape says what the model takes.
    let (code, _, err) = run(Command::new(&bins().0)
        .args(["model", "run", "--input"])
        .arg(fixture("image_cnn.inputs.npy"))
        .arg(fixture("signal_cnn.onnx")));
    assert_eq!(code, 1);
    assert!(err.contains("input \"signal\""), "{err}");

    // Packed without --features: the input comes from the model; the .npy is the self-test.
    let (code, out, bundle) = f.pack_model(
        &fixture("signal_cnn.onnx"),
        "rul",
        1,
        "",
        &["--selftest", npy.to_str().expect("utf8")],
    );
    assert_eq!(code, 0, "pack: {out}");
    let (m, _) = protocol::bundle::inspect(&std::fs::read(&bundle).expect("bundle")).expect("manifest");
    assert_eq!(m.format, protocol::bundle::TENSOR_FORMAT);
    let t = &m.inputs.as_ref().expect("tensor inputs")[0];
    assert_eq!((t.name.as_str(), t.shape.as_slice()), ("signal", &[1u64, 1024][..]));
    // A baseline needs named features, which a tensor model has not.
    let csv = dir.join("train.csv");
    std::fs::write(&csv, "a\n1\n").expect("csv");
    let (code, out, _) = f.pack_model(
        &fixture("signal_cnn.onnx"),
        "rul",
        2,
        "",
        &["--baseline", csv.to_str().expect("utf8")],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("tensor model has none"), "{out}");

    // `model run` on the bundle, verified with the device's trust store.
    let d = f.device("press-9", f.hub_broker.port, &[]);
    let (code, out, err) = run(Command::new(&bins().0)
        .args(["model", "run", "--json", "--config"])
        .arg(&d.config)
        .arg("--input")
        .arg(&npy)
        .arg(&bundle));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().count(), 4);

    let _agent = f.agent(&d);
    wait_online(f.hub_broker.port, &d.id);
    let (code, out) = f.deploy(&d, &bundle);
    assert_eq!(code, 0, "deploy: {out}");
    // Sample 0 nested, sample 1 flat, sample 2 as base64, sample 3 with a wrong length.
    let sample = |s: usize| &inputs.values[s * 1024..(s + 1) * 1024];
    let sensor = Sensor::new(f.sensor_broker.port, &d.id);
    sensor.send(serde_json::to_vec(&serde_json::json!({"id": 0, "signal": [sample(0)]})).expect("json"));
    sensor.send(serde_json::to_vec(&serde_json::json!({"id": 1, "signal": sample(1)})).expect("json"));
    let b64 = B64.encode(sample(2).iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    sensor.send(
        serde_json::to_vec(&serde_json::json!({"id": 2, "signal": {"shape": [1, 1024], "b64": b64}})).expect("json"),
    );
    sensor.send(serde_json::to_vec(&serde_json::json!({"id": 3, "signal": &sample(3)[1..]})).expect("json"));
    sensor.wait_acked(4);
    let got = wait_hub_has(&f.hub_db, 0..3, Duration::from_secs(60));
    for (id, p) in &got {
        let v = p["outputs"]["rul"][0].as_f64().expect("rul");
        assert!(
            close(v, want[*id as usize]),
            "reading {id}: {v} vs {}",
            want[*id as usize]
        );
    }
    assert_eq!(refused(&d, 1), 1);
    assert!(!got.iter().any(|(id, _)| *id == 3));
}
