//! Rollouts from the hub (SPEC.md §8): a bundle goes out once, as retained chunks that every
//! targeted device fetches from the broker (one upload for a whole group, and a device that
//! was offline fetches them when it comes back); then the signed desired state goes out,
//! retained, and the hub waits for the devices' reported state.

use anyhow::Context;
use lathe::config::BrokerConfig;
use protocol::bundle;
use protocol::keys::SigningKey;
use protocol::rollout::{self, Desired, DesiredModel, Phase, Reported, Targets};
use protocol::Name;
use rumqttc::{Event, Packet, QoS};
use std::collections::BTreeMap;
use std::time::Duration;

/// What to roll out, and to whom.
pub struct Plan<'a> {
    pub fleet: Name,
    /// Device ids, or empty for a group.
    pub devices: Vec<Name>,
    pub group: Option<Name>,
    pub bundle: &'a [u8],
    pub keys: Vec<&'a SigningKey>,
    pub chunk_bytes: u32,
    pub expires_in_secs: u64,
    /// A signed rollback: run this bundle's version although a higher one ran before.
    pub rollback: bool,
}

/// A desired state, signed, with where it goes.
pub struct Signed {
    pub desired: Desired,
    pub message: Vec<u8>,
    pub topics: Vec<String>,
    pub index: Vec<u8>,
}

/// Sign the desired state of a plan. The counter is the signing time in milliseconds, so a
/// later desired state from any signer of the fleet supersedes an earlier one.
pub fn sign(plan: &Plan<'_>, now_ms: u64) -> anyhow::Result<Signed> {
    let (manifest, _) = bundle::inspect(plan.bundle).context("the bundle cannot be read")?;
    let (blob, index) = rollout::describe(plan.bundle, plan.chunk_bytes);
    let targets = Targets {
        devices: plan.devices.iter().map(|d| d.to_string()).collect(),
        group: plan.group.as_ref().map(|g| g.to_string()),
    };
    let created = now_ms / 1000;
    let desired = Desired {
        format: rollout::DESIRED_FORMAT,
        fleet: plan.fleet.to_string(),
        targets,
        counter: now_ms,
        created,
        expires: created + plan.expires_in_secs.max(1),
        model: DesiredModel {
            name: manifest.name,
            version: manifest.version,
            rollback: plan.rollback,
            bundle: blob,
        },
    };
    let message = rollout::sign_desired(&desired, &plan.keys).map_err(|e| anyhow::anyhow!(e))?;
    let topics = match &plan.group {
        Some(g) => vec![rollout::group_desired_topic(plan.fleet.as_str(), g.as_str())],
        None => plan
            .devices
            .iter()
            .map(|d| rollout::device_desired_topic(plan.fleet.as_str(), d.as_str()))
            .collect(),
    };
    Ok(Signed {
        desired,
        message,
        topics,
        index,
    })
}

/// Chunks published and not yet acknowledged by the broker, at most.
const IN_FLIGHT: usize = 32;

/// Publish the chunk index, the bundle's chunks and then the desired state, all retained, and
/// wait until the broker has acknowledged every one. `progress(done, total)` is called as
/// bundle bytes are acknowledged.
pub async fn publish(
    broker: &BrokerConfig,
    plan: &Plan<'_>,
    signed: &Signed,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<()> {
    let chunk = plan.chunk_bytes as usize;
    let mut opts = lathe::link::options(broker, format!("lathe-hub-up-{:x}", signed.desired.counter), None)?;
    let size = chunk + 4096;
    opts.set_max_packet_size(size.max(1 << 20), size.max(1 << 20));
    opts.set_inflight(IN_FLIGHT as u16);
    let (client, mut eventloop) = lathe::link::connect(opts, IN_FLIGHT);
    let fleet = plan.fleet.as_str();
    let blob = &signed.desired.model.bundle;
    // The index first: a device needs it before any chunk of the bundle.
    let mut messages: Vec<(String, &[u8])> = vec![];
    for (i, c) in signed.index.chunks(chunk).enumerate() {
        messages.push((rollout::chunk_topic(fleet, &blob.index_sha256, i as u64), c));
    }
    let index_messages = messages.len();
    for (i, c) in plan.bundle.chunks(chunk).enumerate() {
        messages.push((rollout::chunk_topic(fleet, &blob.sha256, i as u64), c));
    }
    for t in &signed.topics {
        messages.push((t.clone(), &signed.message));
    }
    let total = plan.bundle.len() as u64;
    let mut next = 0;
    let mut acked = 0;
    let mut connected = false;
    let mut outstanding = 0usize;
    progress(0, total);
    while acked < messages.len() {
        while connected && outstanding < IN_FLIGHT && next < messages.len() {
            let (topic, payload) = &messages[next];
            client
                .try_publish(topic.clone(), QoS::AtLeastOnce, true, payload.to_vec())
                .context("queueing a chunk")?;
            next += 1;
            outstanding += 1;
        }
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked += 1;
                outstanding -= 1;
                if acked > index_messages {
                    let chunks = (acked - index_messages) as u64;
                    progress((chunks * chunk as u64).min(total), total);
                }
            }
            Ok(_) => {}
            Err(e) if connected => anyhow::bail!(
                "connection to broker {}:{} lost while publishing ({acked} of {} messages acknowledged): {e}; run the same command again, devices keep what they have",
                broker.host,
                broker.port,
                messages.len()
            ),
            Err(e) => anyhow::bail!("cannot connect to broker {}:{}: {e}", broker.host, broker.port),
        }
    }
    let _ = client.disconnect().await;
    // Let the DISCONNECT go out.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    Ok(())
}

/// What one device reported about a desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It runs the desired model.
    Done(Reported),
    /// It refused the desired state or failed to apply it.
    Failed(Reported),
}

/// Whether a device's report settles the desired state of `counter` for `model`.
pub fn outcome(r: &Reported, counter: u64, model: &DesiredModel) -> Option<Outcome> {
    if let Some(e) = &r.error {
        if e.counter == Some(counter) {
            return Some(Outcome::Failed(r.clone()));
        }
    }
    let runs = r
        .active
        .as_ref()
        .is_some_and(|a| a.name == model.name && a.version == model.version);
    (r.counter >= counter && r.phase == Phase::Idle && runs).then(|| Outcome::Done(r.clone()))
}

/// Read the retained reported states of a fleet's devices (all fleets when `None`), until
/// `settle` passes without a new one or `timeout` passes.
pub async fn reported(
    broker: &BrokerConfig,
    fleet: Option<&Name>,
    settle: Duration,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<(String, String), Reported>> {
    let filter = match fleet {
        Some(f) => format!("{}/{f}/+/reported", protocol::topic::ROOT),
        None => rollout::all_reported(),
    };
    let mut out = BTreeMap::new();
    watch_reported(broker, &filter, timeout, Some(settle), |fleet, device, r| {
        out.insert((fleet.to_string(), device.to_string()), r);
        false
    })
    .await?;
    Ok(out)
}

/// Wait until every device of `devices` has settled the desired state, or `timeout`.
pub async fn wait(
    broker: &BrokerConfig,
    fleet: &Name,
    devices: &[Name],
    desired: &Desired,
    timeout: Duration,
    mut on_change: impl FnMut(&str, &Reported),
) -> anyhow::Result<BTreeMap<String, Option<Outcome>>> {
    let mut out: BTreeMap<String, Option<Outcome>> = devices.iter().map(|d| (d.to_string(), None)).collect();
    let filter = format!("{}/{fleet}/+/reported", protocol::topic::ROOT);
    watch_reported(broker, &filter, timeout, None, |_, device, r| {
        if let Some(slot) = out.get_mut(device) {
            on_change(device, &r);
            *slot = outcome(&r, desired.counter, &desired.model);
        }
        out.values().all(|o| o.is_some())
    })
    .await?;
    Ok(out)
}

/// Subscribe to reported states and hand each to `seen(fleet, device, state)` until it returns
/// true, `timeout` passes or, with `settle`, nothing new came for that long.
async fn watch_reported(
    broker: &BrokerConfig,
    filter: &str,
    timeout: Duration,
    settle: Option<Duration>,
    mut seen: impl FnMut(&str, &str, Reported) -> bool,
) -> anyhow::Result<()> {
    let mut opts = lathe::link::options(broker, format!("lathe-hub-watch-{:x}", rand_u64()), None)?;
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = lathe::link::connect(opts, 16);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut quiet = settle.map(|s| tokio::time::Instant::now() + s + Duration::from_secs(1));
    let mut connected = false;
    loop {
        let until = quiet.map_or(deadline, |q| q.min(deadline));
        let ev = match tokio::time::timeout_at(until, eventloop.poll()).await {
            Ok(ev) => ev,
            Err(_) => break,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                client.subscribe(filter, QoS::AtLeastOnce).await?;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.payload.len() > rollout::MAX_REPORTED_BYTES {
                    continue;
                }
                let parts: Vec<&str> = p.topic.split('/').collect();
                let [_, _, fleet, device, "reported"] = parts[..] else {
                    continue;
                };
                let Ok(r) = serde_json::from_slice::<Reported>(&p.payload) else {
                    continue;
                };
                if let Some(s) = settle {
                    quiet = Some(tokio::time::Instant::now() + s);
                }
                if seen(fleet, device, r) {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) if connected => anyhow::bail!("connection to broker {}:{} lost: {e}", broker.host, broker.port),
            Err(e) => anyhow::bail!("cannot connect to broker {}:{}: {e}", broker.host, broker.port),
        }
    }
    let _ = client.disconnect().await;
    Ok(())
}

/// One line per device for `rollout status`.
pub fn render(states: &BTreeMap<(String, String), Reported>) -> String {
    let mut s = String::new();
    if states.is_empty() {
        return "no device has reported a rollout state\n".into();
    }
    let model = |m: &Option<rollout::ReportedModel>| {
        m.as_ref()
            .map(|m| format!("{} v{}", m.name, m.version))
            .unwrap_or_else(|| "none".into())
    };
    for ((fleet, device), r) in states {
        let phase = match r.phase {
            Phase::Idle => "idle",
            Phase::Downloading => "downloading",
            Phase::Activating => "activating",
            Phase::Failed => "failed",
        };
        s += &format!(
            "{fleet}/{device}  {phase:<11} active {}  previous {}",
            model(&r.active),
            model(&r.previous)
        );
        if let Some(st) = &r.staged {
            let pct = (st.received_bytes * 100).checked_div(st.size).unwrap_or(100);
            s += &format!("  staged {} v{} {pct}%", st.name, st.version);
        }
        let below: Vec<String> = r
            .active
            .iter()
            .filter_map(|a| {
                let hw = *r.high_water.get(&a.name)?;
                (hw > a.version).then(|| format!("below v{hw} (rolled back)"))
            })
            .collect();
        if !below.is_empty() {
            s += &format!("  {}", below.join(", "));
        }
        if let Some(e) = &r.error {
            s += &format!("\n    last error ({}): {}", e.code, e.message);
        }
        s += "\n";
    }
    s
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system random source works");
    u64::from_le_bytes(b)
}

/// A deploy or rollback from the command line: sign, publish, and wait for `wait_for` devices
/// (the targeted devices, or those given for a group) for at most `timeout`.
pub struct Run<'a> {
    pub broker: BrokerConfig,
    pub plan: Plan<'a>,
    pub wait_for: Vec<Name>,
    pub timeout: Duration,
}

/// Do a [`Run`], printing progress on stderr and one line per device on stdout. Returns the
/// exit code: 0 when every device waited for runs the desired model.
pub async fn run(r: Run<'_>) -> anyhow::Result<u8> {
    let signed = sign(&r.plan, lathe::sync::now_ms())?;
    let m = &signed.desired.model;
    let what = if m.rollback { "rollback to" } else { "deploy of" };
    eprintln!(
        "{what} {} v{} ({} bytes in {} chunks), desired state #{}",
        m.name,
        m.version,
        m.bundle.size,
        m.bundle.chunks(),
        signed.desired.counter
    );
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_pct = u64::MAX;
    let mut bar = |done: u64, total: u64| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if tty {
            eprint!(
                "\ruploading [{:<30}] {pct:>3}% {:.1}/{:.1} MiB",
                "#".repeat((pct * 30 / 100) as usize),
                done as f64 / 1048576.0,
                total as f64 / 1048576.0
            );
            if done == total {
                eprintln!();
            }
        } else if pct / 25 != last_pct / 25 || (done == total && last_pct != 100) {
            eprintln!("uploaded {pct}% ({done} of {total} bytes)");
        }
        last_pct = pct;
    };
    publish(&r.broker, &r.plan, &signed, &mut bar).await?;
    eprintln!("published to {}", signed.topics.join(", "));
    if r.wait_for.is_empty() {
        println!("published; lathe-hub rollout status shows the devices' progress");
        return Ok(0);
    }
    let outcomes = wait(
        &r.broker,
        &r.plan.fleet,
        &r.wait_for,
        &signed.desired,
        r.timeout,
        |_, _| {},
    )
    .await?;
    let last = reported(
        &r.broker,
        Some(&r.plan.fleet),
        Duration::from_millis(300),
        Duration::from_secs(3),
    )
    .await?;
    let mut code = 0;
    for (device, o) in &outcomes {
        let active = |rep: &Reported| {
            rep.active
                .as_ref()
                .map(|a| format!("{} v{}", a.name, a.version))
                .unwrap_or_else(|| "none".into())
        };
        match o {
            Some(Outcome::Done(rep)) => {
                let did = if m.rollback { "rolled back to" } else { "activated" };
                println!(
                    "ok: {device}: {did} {} v{} (active: {})",
                    m.name,
                    m.version,
                    active(rep)
                );
            }
            Some(Outcome::Failed(rep)) => {
                code = 1;
                let e = rep.error.as_ref().expect("a failure has an error");
                println!(
                    "refused ({}): {device}: {} (active: {})",
                    e.code,
                    e.message,
                    active(rep)
                );
            }
            None => {
                code = 1;
                let now = last.get(&(r.plan.fleet.to_string(), device.clone()));
                let why = match now {
                    None => "it has never reported a rollout state: offline, or not running a 1.4 agent".to_string(),
                    Some(rep) => {
                        let mut w = format!("phase {:?}", rep.phase).to_lowercase();
                        if let Some(s) = &rep.staged {
                            w += &format!(", {} of {} bytes fetched", s.received_bytes, s.size);
                        }
                        if rep.counter < signed.desired.counter {
                            w += ", the desired state not yet seen (offline?)";
                        }
                        w
                    }
                };
                println!(
                    "no answer from {device} within {}s: {why}; it converges when it can (the desired state is retained)",
                    r.timeout.as_secs()
                );
            }
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::rollout::{ReportedError, ReportedModel};

    #[test]
    fn a_report_settles_a_rollout_only_for_its_counter() {
        let (blob, _) = rollout::describe(b"bundle", 1024);
        let model = DesiredModel {
            name: "m".into(),
            version: 2,
            rollback: false,
            bundle: blob,
        };
        let mut r = Reported {
            counter: 10,
            phase: Phase::Idle,
            active: Some(ReportedModel {
                name: "m".into(),
                version: 2,
            }),
            ..Default::default()
        };
        assert!(matches!(outcome(&r, 10, &model), Some(Outcome::Done(_))));
        assert_eq!(outcome(&r, 11, &model), None, "an older counter");
        r.phase = Phase::Downloading;
        assert_eq!(outcome(&r, 10, &model), None, "still fetching");
        r.error = Some(ReportedError {
            code: "chunk_corrupt".into(),
            message: "…".into(),
            counter: Some(10),
        });
        assert!(matches!(outcome(&r, 10, &model), Some(Outcome::Failed(_))));
        assert_eq!(outcome(&r, 12, &model), None, "another desired state's error");
    }
}
