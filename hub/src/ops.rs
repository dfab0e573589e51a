//! Operator actions: pack a bundle, send a command to a device and wait for its answer.

use lathe::engine::Engine;
use protocol::bundle::{self, ImageSchema, InputSchema, Manifest, OutputSchema, PayloadRef, Role, TensorSchema};
use protocol::keys::SigningKey;
use protocol::messages::{Command, Response, State, Status};
use protocol::selftest::Tolerance;
use protocol::{Channel, Name, Topic};
use rumqttc::{Event, Packet, QoS};
use std::time::Duration;

/// What goes into a bundle.
pub struct PackInput {
    pub name: String,
    pub version: u64,
    pub model: Vec<u8>,
    /// A tabular model's feature names (manifest format 1). Empty for a tensor model, whose
    /// inputs are taken from the model (format 2).
    pub features: Vec<String>,
    /// A tensor model's input shapes after the batch axis, by input name, where the model
    /// does not declare them.
    pub shapes: Vec<(String, Vec<usize>)>,
    /// How an image becomes a tensor input: for the named input, or the model's only one.
    pub image: Option<(Option<String>, ImageSchema)>,
    /// Self-test rows: the expected outputs are computed here (SPEC §4.8).
    pub selftest: Option<Selftest>,
    /// Training rows, in feature order (NaN = missing): the drift baseline is computed from
    /// them and the model's outputs on them (SPEC §4.9).
    pub baseline: Option<Vec<Vec<f32>>>,
    /// Quantile bins per distribution in the baseline.
    pub baseline_bins: usize,
    pub created: u64,
    pub expires: u64,
}

/// Rows for a self-test and the tolerance its outputs are checked with.
pub struct Selftest {
    /// Each row in the model's input order: features, or every input's values back to back.
    pub rows: Vec<Vec<f32>>,
    /// The shape of each input in the rows, when they came from tensor files: checked
    /// against the model's.
    pub shapes: Option<Vec<Vec<usize>>>,
    pub tolerance: Tolerance,
}

/// Why a tensor model is packed without a baseline.
pub const TENSOR_BASELINE: &str = "--baseline describes named features: a tensor model has none (drift is off for it); pack with --features for a tabular model";

/// Check that the model runs as the agent would run it, then build and sign the bundle.
///
/// The check is the agent's ([`Engine::load`]: operators, input and output types, a run on
/// trial rows); with a self-test, the model is also run on its rows and their outputs become
/// the expected ones. A model the agent could not load is refused here, before anything is
/// signed, and the signed bundle is loaded again exactly as a deploy loads it.
pub fn pack(input: PackInput, keys: &[&SigningKey]) -> anyhow::Result<(Vec<u8>, Manifest)> {
    let what = format!("{} v{}", input.name, input.version);
    let refuse = |e: &dyn std::fmt::Display| anyhow::anyhow!("refusing to sign {what}: {e}");
    let (engine, tabular, tensors) = if input.features.is_empty() {
        let (engine, tensors) = tensor_inputs(&input).map_err(|e| refuse(&e))?;
        (engine, None, Some(tensors))
    } else {
        if !input.shapes.is_empty() || input.image.is_some() {
            anyhow::bail!("--shape and --image describe tensor inputs; a model packed with --features is tabular");
        }
        let engine = Engine::load(&input.model, input.features.len()).map_err(|e| refuse(&e))?;
        let tabular = InputSchema {
            name: engine.input_name().to_string(),
            dtype: "float32".into(),
            accepts_missing: engine.handles_missing(),
            features: input.features.clone(),
        };
        (engine, Some(tabular), None)
    };
    if let Some(t) = &input.selftest {
        let want: Vec<Vec<usize>> = engine.inputs().iter().map(|i| i.shape.clone()).collect();
        match (&t.shapes, &tensors) {
            (Some(s), _) if *s == want => {}
            (Some(s), _) => anyhow::bail!(
                "self-test: the tensors have shapes {s:?} after the sample axis; the model's inputs are {want:?}"
            ),
            (None, Some(_)) => anyhow::bail!("self-test: a tensor model's self-test is one .npy file per input"),
            (None, None) => {}
        }
    }
    if tensors.is_some() && input.baseline.is_some() {
        anyhow::bail!(TENSOR_BASELINE);
    }
    let manifest = Manifest {
        format: if tabular.is_some() {
            bundle::MANIFEST_FORMAT
        } else {
            bundle::TENSOR_FORMAT
        },
        name: input.name,
        version: input.version,
        created: input.created,
        expires: input.expires,
        payloads: vec![],
        input: tabular,
        inputs: tensors,
        outputs: engine
            .outputs()
            .iter()
            .map(|(n, t)| OutputSchema {
                name: n.clone(),
                dtype: t.clone(),
            })
            .collect(),
    };
    let r = |role, name: &str| PayloadRef {
        role,
        name: name.into(),
        sha256: String::new(),
        size: 0,
    };
    let selftest = match &input.selftest {
        Some(t) => Some(selftest(&engine, &manifest, t).map_err(|e| refuse(&format_args!("self-test: {e}")))?),
        None => None,
    };
    let baseline = match &input.baseline {
        Some(rows) => Some(
            baseline(&engine, &manifest, rows, input.baseline_bins)
                .map_err(|e| refuse(&format_args!("baseline: {e}")))?,
        ),
        None => None,
    };
    let mut payloads = vec![(r(Role::Model, "model.onnx"), input.model)];
    if let Some(b) = baseline {
        payloads.push((r(Role::Baseline, "baseline.json"), b));
    }
    if let Some(s) = selftest {
        payloads.push((r(Role::Selftest, "selftest.json"), s));
    }
    let bytes = bundle::pack(manifest, &payloads, keys).map_err(|e| anyhow::anyhow!("cannot pack: {e}"))?;
    // What was signed must load as a deploy loads it: the one check, on the bundle itself.
    let trust = protocol::keys::TrustStore::new(keys.iter().map(|k| k.public_key()));
    let policy = bundle::Policy {
        trust: &trust,
        threshold: 1,
        now: 0,
        installed_version: &bundle::none_installed,
    };
    let verified =
        bundle::verify(&bytes, &policy).map_err(|e| anyhow::anyhow!("the packed bundle does not verify: {e}"))?;
    let m = verified.manifest.clone();
    lathe::deploy::load_model(verified).map_err(|e| refuse(&e))?;
    Ok((bytes, m))
}

/// A tensor model's engine and inputs: shapes from the model, or from `--shape` where it does
/// not declare them, and the image preprocessing.
fn tensor_inputs(input: &PackInput) -> anyhow::Result<(Engine, Vec<TensorSchema>)> {
    let info = lathe::engine::inspect(&input.model)?;
    if let Some((name, _)) = input
        .shapes
        .iter()
        .find(|(n, _)| !info.inputs.iter().any(|i| i.name == *n))
    {
        anyhow::bail!(
            "--shape {name}: the model has no input {name:?} (its inputs: {})",
            info.inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut shapes = vec![];
    for i in &info.inputs {
        let shape = match input.shapes.iter().find(|(n, _)| *n == i.name) {
            Some((_, s)) => s.clone(),
            None => lathe::engine::declared_sample_shape(i).ok_or_else(|| {
                anyhow::anyhow!(
                    "input {:?} is declared [{}]: give its dimensions after the batch axis with --shape {}=D1,D2,…                      (or --features for a tabular model)",
                    i.name,
                    i.shape.join(", "),
                    i.name
                )
            })?,
        };
        shapes.push(shape);
    }
    let engine = Engine::load_shapes(&input.model, &shapes)?;
    let target = match &input.image {
        None => None,
        Some((Some(name), _)) => Some(name.clone()),
        Some((None, _)) => match engine.inputs() {
            [only] => Some(only.name.clone()),
            many => anyhow::bail!(
                "the model has {} inputs: name the image one with --image-input",
                many.len()
            ),
        },
    };
    if let Some(t) = &target {
        if !engine.inputs().iter().any(|i| i.name == *t) {
            anyhow::bail!("--image-input {t}: the model has no such input");
        }
    }
    let tensors: Vec<TensorSchema> = engine
        .inputs()
        .iter()
        .map(|i| TensorSchema {
            name: i.name.clone(),
            dtype: "float32".into(),
            shape: i.shape.iter().map(|d| *d as u64).collect(),
            image: (target.as_deref() == Some(i.name.as_str()))
                .then(|| input.image.as_ref().map(|(_, s)| s.clone()))
                .flatten(),
        })
        .collect();
    for t in &tensors {
        if let Some(image) = &t.image {
            image
                .plan(&t.shape)
                .map_err(|e| anyhow::anyhow!("input {:?}: {e}", t.name))?;
        }
    }
    Ok((engine, tensors))
}

/// Run the self-test rows and write `selftest.json` with the outputs as the expected values.
fn selftest(engine: &Engine, manifest: &Manifest, t: &Selftest) -> anyhow::Result<Vec<u8>> {
    let test = lathe::deploy::make_selftest(engine, t.rows.clone(), t.tolerance)?;
    test.check(manifest).map_err(|e| anyhow::anyhow!(e))?;
    Ok(serde_json::to_vec(&test)?)
}

/// Rows the model is run on at a time while a baseline is computed.
const BASELINE_CHUNK: usize = 1024;

/// Compute the drift baseline of training `rows`: each feature's distribution, and the
/// distribution of each output the model computes for them (labels for integer outputs,
/// scores by column otherwise), then write `baseline.json`.
fn baseline(engine: &Engine, manifest: &Manifest, rows: &[Vec<f32>], bins: usize) -> anyhow::Result<Vec<u8>> {
    use protocol::baseline::{self, OutputValues};
    if rows.is_empty() {
        anyhow::bail!("the training CSV has no rows");
    }
    let features = &manifest
        .features()
        .ok_or_else(|| anyhow::anyhow!("a baseline needs named features"))?
        .features;
    let width = features.len();
    let columns: Vec<Vec<f64>> = (0..width)
        .map(|i| rows.iter().map(|r| f64::from(r[i])).collect())
        .collect();
    let mut outputs: Vec<OutputValues> = manifest
        .outputs
        .iter()
        .map(|o| match o.dtype.as_str() {
            "int64" | "int32" | "tdim" | "bool" => OutputValues::Labels {
                name: o.name.clone(),
                values: Vec::with_capacity(rows.len()),
            },
            _ => OutputValues::Scores {
                name: o.name.clone(),
                columns: vec![],
            },
        })
        .collect();
    for chunk in rows.chunks(BASELINE_CHUNK) {
        let out = engine.run(chunk)?;
        for o in outputs.iter_mut() {
            let (name, c) = match o {
                OutputValues::Labels { name, .. } | OutputValues::Scores { name, .. } => {
                    let c = out
                        .column(name)
                        .ok_or_else(|| anyhow::anyhow!("the model did not compute output {name:?}"))?;
                    (name.clone(), c)
                }
            };
            for i in 0..chunk.len() {
                let values = c.row(i);
                match o {
                    OutputValues::Labels { values: v, .. } => {
                        if values.len() != 1 {
                            anyhow::bail!("label output {name:?} has {} values per row, expected 1", values.len());
                        }
                        v.push(values[0]);
                    }
                    OutputValues::Scores { columns, .. } => {
                        if columns.is_empty() {
                            columns.resize(values.len().min(baseline::MAX_COLUMNS), vec![]);
                        }
                        for (col, x) in columns.iter_mut().zip(values) {
                            col.push(*x);
                        }
                    }
                }
            }
        }
    }
    let b = baseline::build(features, &columns, outputs, bins).map_err(|e| anyhow::anyhow!(e))?;
    b.check(manifest).map_err(|e| anyhow::anyhow!(e))?;
    Ok(serde_json::to_vec(&b)?)
}

/// Where a command goes: the broker (address, credentials, TLS) and the device.
#[derive(Debug, Clone)]
pub struct Target {
    pub broker: lathe::config::BrokerConfig,
    pub fleet: Name,
    pub device: Name,
}

/// Send a command to a device and wait for its response.
///
/// The command is published only once the device's retained state says it is online: agents
/// use clean sessions, so a command sent while a device is offline would never arrive.
pub async fn command(target: &Target, cmd: &Command, timeout: Duration) -> anyhow::Result<Response> {
    let id = Name::new(format!("c{:016x}", rand_u64()))?;
    let payload = serde_json::to_vec(cmd)?;
    let mut opts = lathe::link::options(&target.broker, format!("lathe-hub-{id}"), None)?;
    let size = (payload.len() + 4096).max(1 << 20);
    opts.set_max_packet_size(size, size);
    let (client, mut eventloop) = lathe::link::connect(opts, 16);
    let (fleet, device) = (&target.fleet, &target.device);
    let res_topic = Topic::new(fleet, device, Channel::Response(id.clone())).to_string();
    let cmd_topic = Topic::new(fleet, device, Channel::Command(id.clone())).to_string();
    let state_topic = Topic::new(fleet, device, Channel::State).to_string();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_state: Option<State> = None;
    let mut sent = false;
    let mut connected = false;
    loop {
        let ev = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(ev) => ev,
            Err(_) => {
                let why = match (&last_state, sent) {
                    (_, true) => "the device did not answer".to_string(),
                    (None, false) => "the device has never connected to this broker".to_string(),
                    (Some(s), false) => format!(
                        "the device is offline (reason: {})",
                        s.reason.as_deref().unwrap_or("unknown")
                    ),
                };
                anyhow::bail!(
                    "no answer from {fleet}/{device} within {}s: {why} (command {id})",
                    timeout.as_secs()
                );
            }
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                client.subscribe(res_topic.clone(), QoS::AtLeastOnce).await?;
                client.subscribe(state_topic.clone(), QoS::AtLeastOnce).await?;
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == state_topic => {
                let state: Option<State> = serde_json::from_slice(&p.payload).ok();
                let online = state.as_ref().is_some_and(|s| s.status == Status::Online);
                last_state = state;
                if online && !sent {
                    client
                        .publish(cmd_topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                        .await?;
                    sent = true;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == res_topic => {
                let resp: Response = serde_json::from_slice(&p.payload)
                    .map_err(|e| anyhow::anyhow!("device sent a malformed response: {e}"))?;
                let _ = client.disconnect().await;
                return Ok(resp);
            }
            Ok(_) => {}
            Err(e) if connected => anyhow::bail!(
                "connection to broker {}:{} lost: {e}",
                target.broker.host,
                target.broker.port
            ),
            Err(e) => anyhow::bail!(
                "cannot connect to broker {}:{}: {e}",
                target.broker.host,
                target.broker.port
            ),
        }
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system random source works");
    u64::from_le_bytes(b)
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
