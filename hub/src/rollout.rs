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
    /// The model slot of the targets (SPEC §8.8); `None`: their default slot.
    pub slot: Option<Name>,
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
        slot: plan.slot.as_ref().map(|s| s.to_string()),
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
    let slot = plan.slot.as_ref().map(Name::as_str);
    let topics = topics.into_iter().map(|t| rollout::slot_topic(t, slot)).collect();
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
    chunks: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<()> {
    let chunk = plan.chunk_bytes as usize;
    let fleet = plan.fleet.as_str();
    let blob = &signed.desired.model.bundle;
    // The index first: a device needs it before any chunk of the bundle.
    let mut messages: Vec<(String, &[u8])> = vec![];
    if chunks {
        for (i, c) in signed.index.chunks(chunk).enumerate() {
            messages.push((rollout::chunk_topic(fleet, &blob.index_sha256, i as u64), c));
        }
    }
    let index_messages = messages.len();
    if chunks {
        for (i, c) in plan.bundle.chunks(chunk).enumerate() {
            messages.push((rollout::chunk_topic(fleet, &blob.sha256, i as u64), c));
        }
    }
    for t in &signed.topics {
        messages.push((t.clone(), &signed.message));
    }
    let total = if chunks { plan.bundle.len() as u64 } else { 0 };
    progress(0, total);
    send_retained(broker, "up", chunk + 4096, &messages, &mut |acked| {
        if acked > index_messages {
            let chunks = (acked - index_messages) as u64;
            progress((chunks * chunk as u64).min(total), total);
        }
    })
    .await
    .context("devices keep what they have; run the same command again")
}

/// Publish `messages` retained at QoS 1, at most [`IN_FLIGHT`] unacknowledged, in order, and
/// wait until the broker has acknowledged every one; `acked(n)` is called as they are.
async fn send_retained(
    broker: &BrokerConfig,
    what: &str,
    max_packet: usize,
    messages: &[(String, &[u8])],
    acked_so_far: &mut dyn FnMut(usize),
) -> anyhow::Result<()> {
    let mut opts = lathe::link::options(broker, format!("lathe-hub-{what}-{:x}", rand_u64()), None)?;
    opts.set_max_packet_size(max_packet.max(1 << 20), max_packet.max(1 << 20));
    opts.set_inflight(IN_FLIGHT as u16);
    let (client, mut eventloop) = lathe::link::connect(opts, IN_FLIGHT);
    let (mut next, mut acked, mut outstanding, mut connected) = (0, 0, 0usize, false);
    while acked < messages.len() {
        while connected && outstanding < IN_FLIGHT && next < messages.len() {
            let (topic, payload) = &messages[next];
            client
                .try_publish(topic.clone(), QoS::AtLeastOnce, true, payload.to_vec())
                .context("queueing a message")?;
            next += 1;
            outstanding += 1;
        }
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked += 1;
                outstanding -= 1;
                acked_so_far(acked);
            }
            Ok(_) => {}
            Err(e) if connected => anyhow::bail!(
                "connection to broker {}:{} lost ({acked} of {} messages acknowledged): {e}",
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

/// Publish a key set (SPEC §8.7), retained, signed by `signers`: from now on the fleet's
/// devices trust `store` at `threshold`. Waits for `wait_for` to report it in force. Returns the
/// exit code: 0 when every device waited for did.
pub async fn publish_keys(
    broker: &BrokerConfig,
    fleet: &Name,
    store: &protocol::keys::TrustStore,
    threshold: usize,
    signers: &[&SigningKey],
    wait_for: &[Name],
    timeout: Duration,
) -> anyhow::Result<u8> {
    let now = lathe::sync::now_ms();
    let set = protocol::keyset::KeySet {
        format: protocol::keyset::KEYS_FORMAT,
        fleet: fleet.to_string(),
        counter: now,
        created: now / 1000,
        threshold,
        keys: store.keys().map(|k| k.to_text()).collect(),
    };
    let message = protocol::keyset::sign_key_set(&set, signers).map_err(|e| anyhow::anyhow!("key set: {e}"))?;
    let topic = protocol::keyset::keys_topic(fleet.as_str());
    send_retained(broker, "keys", 1 << 20, &[(topic.clone(), &message)], &mut |_| {}).await?;
    eprintln!(
        "key set #{now} published to {topic}: {} key(s), threshold {threshold}, signed by {}",
        set.keys.len(),
        signers
            .iter()
            .map(|k| k.key_id().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if wait_for.is_empty() {
        return Ok(0);
    }
    let mut seen: BTreeMap<String, Reported> = BTreeMap::new();
    // Every slot of a device reports the key set in force; any of them says.
    let filters = rollout::reported_filters(Some(fleet.as_str()));
    watch_reported(broker, &filters, timeout, None, |_, device, _, r| {
        if wait_for.iter().any(|d| d.as_str() == device) {
            seen.insert(device.to_string(), r);
        }
        wait_for.iter().all(|d| {
            seen.get(d.as_str()).is_some_and(|r| {
                r.key_set == Some(now) || r.keys_error.as_ref().is_some_and(|e| e.counter == Some(now))
            })
        })
    })
    .await?;
    let mut code = 0;
    for d in wait_for {
        match seen.get(d.as_str()) {
            Some(r) if r.key_set == Some(now) => println!("ok: {d}: trusts key set #{now}"),
            Some(r) => {
                code = 1;
                match r.keys_error.as_ref().filter(|e| e.counter == Some(now)) {
                    Some(e) => println!("refused ({}): {d}: {}", e.code, e.message),
                    None => println!(
                        "no answer from {d} within {}s: it converges when it can (the key set is retained)",
                        timeout.as_secs()
                    ),
                }
            }
            None => {
                code = 1;
                println!(
                    "no answer from {d} within {}s: it has never reported a rollout state",
                    timeout.as_secs()
                );
            }
        }
    }
    Ok(code)
}

/// Clear the retained chunks of a bundle (and of its chunk index) at the broker: an empty
/// retained message on each chunk topic. Refused while a desired state retained for the fleet
/// still names the bundle, unless `force`: a device that comes back would find nothing to
/// fetch. Returns the chunk topics cleared.
pub async fn clear(
    broker: &BrokerConfig,
    fleet: &Name,
    bundle: &[u8],
    chunk_bytes: u32,
    force: bool,
) -> anyhow::Result<usize> {
    let (blob, _) = rollout::describe(bundle, chunk_bytes);
    if !force {
        for (topic, payload) in retained_desired(broker, fleet).await? {
            if desired_names(&payload, &blob.sha256) {
                anyhow::bail!(
                    "the desired state at {topic} names this bundle: devices may still fetch it; deploy another bundle there first, or pass --force"
                );
            }
        }
    }
    let mut topics: Vec<String> = (0..blob.chunks())
        .map(|i| rollout::chunk_topic(fleet.as_str(), &blob.sha256, i))
        .collect();
    topics
        .extend((0..blob.index_object().chunks()).map(|i| rollout::chunk_topic(fleet.as_str(), &blob.index_sha256, i)));
    let empty: &[u8] = &[];
    let messages: Vec<(String, &[u8])> = topics.iter().map(|t| (t.clone(), empty)).collect();
    send_retained(broker, "clear", 1 << 20, &messages, &mut |_| {})
        .await
        .context("run the same command again")?;
    Ok(topics.len())
}

/// Whether a retained desired-state message names the bundle `sha256`. Read without checking
/// signatures: a forged one only makes `clear` more careful.
fn desired_names(message: &[u8], sha256: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Body {
        model: Model,
    }
    #[derive(serde::Deserialize)]
    struct Model {
        bundle: Blob,
    }
    #[derive(serde::Deserialize)]
    struct Blob {
        sha256: String,
    }
    bundle::unverified_payload(message)
        .is_some_and(|body| serde_json::from_slice::<Body>(&body).is_ok_and(|b| b.model.bundle.sha256 == sha256))
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

/// A device's model slot, as reported states are keyed: fleet, device, slot (empty for the
/// default slot).
pub type SlotKey = (String, String, String);

/// Read the retained reported states of a fleet's devices (all fleets when `None`), of every
/// slot, until `settle` passes without a new one or `timeout` passes.
pub async fn reported(
    broker: &BrokerConfig,
    fleet: Option<&Name>,
    settle: Duration,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<SlotKey, Reported>> {
    let filters = rollout::reported_filters(fleet.map(Name::as_str));
    let mut out = BTreeMap::new();
    watch_reported(broker, &filters, timeout, Some(settle), |fleet, device, slot, r| {
        out.insert(
            (fleet.to_string(), device.to_string(), slot.unwrap_or("").to_string()),
            r,
        );
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
    let filter = rollout::slot_topic(
        format!("{}/{fleet}/+/reported", protocol::topic::ROOT),
        desired.slot.as_deref(),
    );
    watch_reported(broker, &[filter], timeout, None, |_, device, _, r| {
        if let Some(slot) = out.get_mut(device) {
            on_change(device, &r);
            *slot = outcome(&r, desired.counter, &desired.model);
        }
        out.values().all(|o| o.is_some())
    })
    .await?;
    Ok(out)
}

/// Subscribe to reported states and hand each to `seen(fleet, device, slot, state)` until it
/// returns true, `timeout` passes or, with `settle`, nothing new came for that long.
async fn watch_reported(
    broker: &BrokerConfig,
    filters: &[String],
    timeout: Duration,
    settle: Option<Duration>,
    mut seen: impl FnMut(&str, &str, Option<&str>, Reported) -> bool,
) -> anyhow::Result<()> {
    watch_topics(
        broker,
        filters,
        timeout,
        settle,
        rollout::MAX_REPORTED_BYTES,
        |topic, payload| {
            let Some((fleet, device, slot)) = rollout::parse_reported_topic(topic) else {
                return false;
            };
            match serde_json::from_slice::<Reported>(payload) {
                Ok(r) => seen(fleet, device, slot, r),
                Err(_) => false,
            }
        },
    )
    .await
}

/// The retained messages on `filters` (each at most a desired state's size), read until
/// nothing new came for `settle`, or `timeout`.
pub async fn retained(
    broker: &BrokerConfig,
    filters: &[String],
    settle: Duration,
    timeout: Duration,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = vec![];
    watch_topics(
        broker,
        filters,
        timeout,
        Some(settle),
        rollout::MAX_DESIRED_BYTES,
        |topic, payload| {
            out.push((topic.to_string(), payload.to_vec()));
            false
        },
    )
    .await?;
    Ok(out)
}

/// Every desired state retained for `fleet`'s devices and groups, by topic.
pub async fn retained_desired(broker: &BrokerConfig, fleet: &Name) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    retained(
        broker,
        &rollout::desired_filters(fleet.as_str()),
        Duration::from_millis(500),
        Duration::from_secs(10),
    )
    .await
}

/// Subscribe to `filters` and hand each message of at most `max_bytes` to `seen(topic,
/// payload)` until it returns true, `timeout` passes or, with `settle`, nothing new came for
/// that long.
async fn watch_topics(
    broker: &BrokerConfig,
    filters: &[String],
    timeout: Duration,
    settle: Option<Duration>,
    max_bytes: usize,
    mut seen: impl FnMut(&str, &[u8]) -> bool,
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
                for f in filters {
                    client.subscribe(f, QoS::AtLeastOnce).await?;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.payload.len() > max_bytes {
                    continue;
                }
                if let Some(s) = settle {
                    quiet = Some(tokio::time::Instant::now() + s);
                }
                if seen(&p.topic, &p.payload) {
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
pub fn render(states: &BTreeMap<SlotKey, Reported>) -> String {
    let mut s = String::new();
    if states.is_empty() {
        return "no device has reported a rollout state\n".into();
    }
    let model = |m: &Option<rollout::ReportedModel>| {
        m.as_ref()
            .map(|m| format!("{} v{}", m.name, m.version))
            .unwrap_or_else(|| "none".into())
    };
    for ((fleet, device, slot), r) in states {
        let slot = if slot.is_empty() {
            String::new()
        } else {
            format!("[{slot}]")
        };
        let phase = match r.phase {
            Phase::Idle => "idle",
            Phase::Downloading => "downloading",
            Phase::Activating => "activating",
            Phase::Watching => "watching",
            Phase::Failed => "failed",
        };
        s += &format!(
            "{fleet}/{device}{slot}  {phase:<11} active {}  previous {}",
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
        if let Some(w) = &r.watch {
            let left = w.ends_ms.saturating_sub(r.ts_ms).div_ceil(1000);
            let c = &w.counts;
            s += &format!(
                "\n    watching {} v{}: {left} s left, {} rows, {} failed, {} non-finite, {} out of range, p99 {} µs",
                w.name, w.version, c.rows, c.failed, c.non_finite, c.out_of_range, c.p99_us
            );
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
    /// With a group: this percentage of its members (at least one) first, each to commit the
    /// model after its watch period, before the group's desired state is published.
    pub canary: Option<u8>,
}

/// Do a [`Run`], printing progress on stderr and one line per device on stdout. Returns the
/// exit code: 0 when every device waited for runs the desired model.
pub async fn run(r: Run<'_>) -> anyhow::Result<u8> {
    if let (Some(pct), Some(group)) = (r.canary, r.plan.group.clone()) {
        return canary(r, pct, &group).await;
    }
    let signed = sign(&r.plan, lathe::sync::now_ms())?;
    upload(&r.broker, &r.plan, &signed, true).await?;
    if r.wait_for.is_empty() {
        println!("published; lathe-hub rollout status shows the devices' progress");
        return Ok(0);
    }
    settle(&r, &signed, &r.wait_for).await
}

/// A canary: the first `pct`% of the group's members (by name, at least one) get a desired
/// state of their own; only when every one of them has committed the model (its watch period
/// passed) does the group's desired state go out. A canary that fails halts the rollout.
async fn canary(r: Run<'_>, pct: u8, group: &Name) -> anyhow::Result<u8> {
    let known = reported(
        &r.broker,
        Some(&r.plan.fleet),
        Duration::from_millis(300),
        Duration::from_secs(5),
    )
    .await?;
    let slot = r.plan.slot.as_ref().map_or("", Name::as_str);
    let members: Vec<Name> = known
        .iter()
        .filter(|((_, _, s), rep)| s == slot && rep.groups.iter().any(|g| g == group.as_str()))
        .filter_map(|((_, device, _), _)| Name::new(device.clone()).ok())
        .collect();
    anyhow::ensure!(
        !members.is_empty(),
        "no device of fleet {} reports that it is in group {group}: a canary needs the members' reported states (agents 1.5 and later, with the group in rollout.groups)",
        r.plan.fleet
    );
    let n = (members.len() * pct as usize).div_ceil(100).clamp(1, members.len());
    let canaries: Vec<Name> = members[..n].to_vec();
    eprintln!(
        "canary: {} of the {} members of {group} first: {}",
        canaries.len(),
        members.len(),
        canaries.iter().map(Name::as_str).collect::<Vec<_>>().join(", ")
    );
    let first = Plan {
        fleet: r.plan.fleet.clone(),
        devices: canaries.clone(),
        group: None,
        bundle: r.plan.bundle,
        keys: r.plan.keys.clone(),
        chunk_bytes: r.plan.chunk_bytes,
        expires_in_secs: r.plan.expires_in_secs,
        rollback: r.plan.rollback,
        slot: r.plan.slot.clone(),
    };
    let signed = sign(&first, lathe::sync::now_ms())?;
    upload(&r.broker, &first, &signed, true).await?;
    let code = settle(&r, &signed, &canaries).await?;
    if code != 0 {
        println!("halted: the canary did not commit the model; the desired state of {group} was not published");
        return Ok(code);
    }
    eprintln!("canary passed; publishing the desired state of {group}");
    // Signed later, so its counter is above the canaries' own: they follow it with nothing
    // to do, since they run its model already.
    let signed = sign(&r.plan, lathe::sync::now_ms().max(signed.desired.counter + 1))?;
    upload(&r.broker, &r.plan, &signed, false).await?;
    let wait_for = if r.wait_for.is_empty() { &members } else { &r.wait_for };
    if r.timeout.is_zero() {
        println!("published; lathe-hub rollout status shows the devices' progress");
        return Ok(0);
    }
    settle(&r, &signed, wait_for).await
}

/// Publish a signed desired state, with the bundle's chunks first when `chunks` (they are
/// retained: a second desired state for the same bundle needs none), showing the upload's
/// progress on stderr.
async fn upload(broker: &BrokerConfig, plan: &Plan<'_>, signed: &Signed, chunks: bool) -> anyhow::Result<()> {
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
    publish(broker, plan, signed, chunks, &mut bar).await?;
    eprintln!("published to {}", signed.topics.join(", "));
    Ok(())
}

/// Wait for `devices` to settle a published desired state and print one line per device.
/// Returns 0 when every one runs (and has committed) the model.
async fn settle(r: &Run<'_>, signed: &Signed, devices: &[Name]) -> anyhow::Result<u8> {
    let m = &signed.desired.model;
    let outcomes = wait(&r.broker, &r.plan.fleet, devices, &signed.desired, r.timeout, |_, _| {}).await?;
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
                let slot = r.plan.slot.as_ref().map_or("", Name::as_str);
                let now = last.get(&(r.plan.fleet.to_string(), device.to_string(), slot.to_string()));
                let others: Vec<&str> = last
                    .keys()
                    .filter(|(f, d, _)| *f == r.plan.fleet.as_str() && d == device)
                    .map(|(_, _, s)| if s.is_empty() { "the default slot" } else { s.as_str() })
                    .collect();
                let why = match now {
                    None if !others.is_empty() => format!(
                        "it reports no {}, only {}: give the slot it runs this model in (--slot)",
                        if slot.is_empty() {
                            "default slot".to_string()
                        } else {
                            format!("slot {slot}")
                        },
                        others.join(", ")
                    ),
                    None => "it has never reported a rollout state: offline, or not running a 1.4 agent".to_string(),
                    Some(rep) => {
                        let mut w = format!("phase {:?}", rep.phase).to_lowercase();
                        if let Some(s) = &rep.staged {
                            w += &format!(", {} of {} bytes fetched", s.received_bytes, s.size);
                        }
                        if let Some(wt) = &rep.watch {
                            w += &format!(
                                ", {} v{} watched for {} s more ({} rows so far)",
                                wt.name,
                                wt.version,
                                wt.ends_ms.saturating_sub(rep.ts_ms).div_ceil(1000),
                                wt.counts.rows
                            );
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

    #[test]
    fn rollout_status_says_what_each_device_does() {
        let model = |v| {
            Some(ReportedModel {
                name: "bearing".into(),
                version: v,
            })
        };
        let watching = Reported {
            ts_ms: 1_000,
            counter: 10,
            phase: Phase::Watching,
            active: model(3),
            previous: model(2),
            high_water: [("bearing".to_string(), 2)].into(),
            watch: Some(protocol::rollout::WatchReport {
                name: "bearing".into(),
                version: 3,
                ends_ms: 46_000,
                counts: protocol::rollout::WatchCounts {
                    rows: 120,
                    failed: 1,
                    non_finite: 0,
                    out_of_range: 4,
                    p99_us: 850,
                },
            }),
            ..Default::default()
        };
        let rolled_back = Reported {
            counter: 11,
            phase: Phase::Failed,
            active: model(2),
            previous: model(3),
            high_water: [("bearing".to_string(), 3)].into(),
            error: Some(ReportedError {
                code: "watch_failed".into(),
                message: "bearing v3 failed its watch period".into(),
                counter: Some(11),
            }),
            ..Default::default()
        };
        let states = [
            (("plant1".to_string(), "press-7".to_string(), String::new()), watching),
            (
                ("plant1".to_string(), "press-8".to_string(), "rul".to_string()),
                rolled_back,
            ),
        ]
        .into();
        assert_eq!(
            render(&states),
            "plant1/press-7  watching    active bearing v3  previous bearing v2\n    \
             watching bearing v3: 45 s left, 120 rows, 1 failed, 0 non-finite, 4 out of range, p99 850 µs\n\
             plant1/press-8[rul]  failed      active bearing v2  previous bearing v3  below v3 (rolled back)\n    \
             last error (watch_failed): bearing v3 failed its watch period\n"
        );
    }
}
