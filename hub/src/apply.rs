//! `lathe-hub apply -f fleet.toml`: the desired state of a fleet declared in a file (kept in
//! git), compared with the desired states retained at the broker, the difference printed, and
//! then only what differs signed and published (SPEC.md §8).
//!
//! A desired state at the broker counts as what it says only when the keys given to `apply`
//! sign it: one that they do not (forged, or signed by a retired key) is replaced. Desired
//! states at the broker that the file does not declare are shown and left as they are.
//!
//! [`plan`] decides without I/O.

use crate::rollout;
use anyhow::Context;
use lathe::config::BrokerConfig;
use protocol::keys::{SigningKey, TrustStore};
use protocol::rollout::{DesiredTopic, VerifiedDesired};
use protocol::Name;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file: the fleet, and a bundle per group and per device.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    pub fleet: String,
    #[serde(default)]
    pub group: Vec<GroupEntry>,
    #[serde(default)]
    pub device: Vec<DeviceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupEntry {
    pub name: String,
    /// The bundle file, relative to the fleet file.
    pub bundle: PathBuf,
    /// Run this version although a higher one ran before (a signed rollback).
    #[serde(default)]
    pub rollback: bool,
    /// Deploy to this share of the group first (`"10%"`), as `deploy --canary`.
    #[serde(default)]
    pub canary: Option<String>,
    /// The model slot (SPEC §8.8), as `deploy --slot`; absent: the default slot.
    #[serde(default)]
    pub slot: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    pub id: String,
    pub bundle: PathBuf,
    #[serde(default)]
    pub rollback: bool,
    #[serde(default)]
    pub slot: Option<String>,
}

/// Whom a desired state is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Whom {
    Group(Name),
    Device(Name),
}

/// Where a desired state is published: for whom, and for which of their model slots (`None`:
/// the default one).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub whom: Whom,
    pub slot: Option<Name>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.whom {
            Whom::Group(g) => write!(f, "group {g}")?,
            Whom::Device(d) => write!(f, "device {d}")?,
        }
        match &self.slot {
            Some(s) => write!(f, " slot {s}"),
            None => Ok(()),
        }
    }
}

/// A model as a desired state names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub rollback: bool,
}

impl fmt::Display for Want {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} v{}", self.name, self.version)?;
        if self.rollback {
            write!(f, " (rollback)")?;
        }
        Ok(())
    }
}

/// One declared target.
#[derive(Debug, Clone)]
pub struct Declared {
    pub target: Target,
    pub bundle: PathBuf,
    pub want: Want,
    pub canary: Option<u8>,
}

/// What the broker holds for a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Current {
    /// A desired state signed by the keys given, until `expires` (Unix seconds).
    Signed { want: Want, expires: u64 },
    /// Something the keys given do not vouch for, and why.
    Unverified(String),
}

/// What `apply` does for a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The broker holds it already.
    Keep,
    /// Sign and publish it: `why`, in a few words.
    Publish { why: String },
    /// At the broker and not in the file: left as it is.
    Undeclared,
}

/// Compare the declared targets with what the broker holds (`now` in Unix seconds). One line
/// per target, declared ones first, in order.
pub fn plan(declared: &[Declared], current: &BTreeMap<Target, Current>, now: u64) -> Vec<(Target, Step, String)> {
    let mut out = vec![];
    for d in declared {
        let (step, line) = match current.get(&d.target) {
            None => (
                Step::Publish { why: "new".into() },
                format!("+ {}: none -> {}", d.target, d.want),
            ),
            Some(Current::Unverified(why)) => (
                Step::Publish {
                    why: "not signed by these keys".into(),
                },
                format!("~ {}: {why} -> {}", d.target, d.want),
            ),
            Some(Current::Signed { want, .. }) if *want != d.want => (
                Step::Publish { why: "changed".into() },
                format!("~ {}: {want} -> {}", d.target, d.want),
            ),
            Some(Current::Signed { expires, .. }) if *expires <= now => (
                Step::Publish { why: "expired".into() },
                format!("~ {}: {} (expired; signed again)", d.target, d.want),
            ),
            Some(Current::Signed { .. }) => (Step::Keep, format!("= {}: {}", d.target, d.want)),
        };
        let line = match (d.canary, &step) {
            (Some(p), Step::Publish { .. }) => format!("{line}, canary {p}%"),
            _ => line,
        };
        out.push((d.target.clone(), step, line));
    }
    for (t, c) in current {
        if declared.iter().any(|d| d.target == *t) {
            continue;
        }
        let what = match c {
            Current::Signed { want, .. } => want.to_string(),
            Current::Unverified(why) => why.clone(),
        };
        out.push((
            t.clone(),
            Step::Undeclared,
            format!("? {t}: {what} at the broker, not declared (left as it is)"),
        ));
    }
    out
}

/// Read and check a fleet file: names, bundles (each read and inspected), canaries.
pub fn load(path: &Path) -> anyhow::Result<(Name, Vec<Declared>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let file: FleetFile = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let fleet = Name::new(file.fleet.clone()).with_context(|| format!("{}: fleet", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = vec![];
    let mut entry = |target: Target, bundle: &Path, rollback: bool, canary: Option<u8>| -> anyhow::Result<()> {
        anyhow::ensure!(
            !out.iter().any(|d: &Declared| d.target == target),
            "{}: {target} is declared twice",
            path.display()
        );
        let file = base.join(bundle);
        let bytes = std::fs::read(&file).with_context(|| format!("{target}: {}", file.display()))?;
        let (manifest, _) = protocol::bundle::inspect(&bytes)
            .map_err(|e| anyhow::anyhow!("{target}: {}: not a bundle: {e}", file.display()))?;
        out.push(Declared {
            target,
            want: Want {
                name: manifest.name,
                version: manifest.version,
                sha256: protocol::sha256_hex(&bytes),
                rollback,
            },
            bundle: file,
            canary,
        });
        Ok(())
    };
    for g in &file.group {
        let name = Name::new(g.name.clone()).with_context(|| format!("{}: group", path.display()))?;
        let canary = g
            .canary
            .as_deref()
            .map(parse_percent)
            .transpose()
            .map_err(|e| anyhow::anyhow!("{}: group {name}: canary {e}", path.display()))?;
        let slot = slot_name(path, g.slot.as_deref())?;
        entry(
            Target {
                whom: Whom::Group(name),
                slot,
            },
            &g.bundle,
            g.rollback,
            canary,
        )?;
    }
    for d in &file.device {
        let id = Name::new(d.id.clone()).with_context(|| format!("{}: device", path.display()))?;
        let slot = slot_name(path, d.slot.as_deref())?;
        entry(
            Target {
                whom: Whom::Device(id),
                slot,
            },
            &d.bundle,
            d.rollback,
            None,
        )?;
    }
    Ok((fleet, out))
}

fn slot_name(path: &Path, slot: Option<&str>) -> anyhow::Result<Option<Name>> {
    slot.map(protocol::rollout::check_slot)
        .transpose()
        .map_err(|e| anyhow::anyhow!("{}: slot: {e}", path.display()))
}

/// A percentage from 1 to 100, with or without `%`.
pub fn parse_percent(s: &str) -> Result<u8, String> {
    let n: u8 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage"))?;
    if (1..=100).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{s:?}: a canary is 1% to 100% of the group"))
    }
}

/// What the broker holds for the fleet's devices and groups, as the keys of `signers` see it.
pub async fn current(
    broker: &BrokerConfig,
    fleet: &Name,
    signers: &[&SigningKey],
) -> anyhow::Result<BTreeMap<Target, Current>> {
    let trust = TrustStore::new(signers.iter().map(|k| k.public_key()));
    let mut out = BTreeMap::new();
    for (topic, payload) in rollout::retained_desired(broker, fleet).await? {
        let Some((whom, slot)) = protocol::rollout::parse_desired_topic(fleet.as_str(), &topic) else {
            continue;
        };
        let whom = match whom {
            DesiredTopic::Group(g) => Name::new(g.to_string()).map(Whom::Group),
            DesiredTopic::Device(d) => Name::new(d.to_string()).map(Whom::Device),
        };
        let (Ok(whom), Ok(slot)) = (whom, slot.map(|s| Name::new(s.to_string())).transpose()) else {
            continue;
        };
        let target = Target { whom, slot };
        if payload.is_empty() {
            continue;
        }
        let c = match protocol::rollout::read_desired(&payload, &trust, 1, u64::MAX) {
            Ok(VerifiedDesired { desired, .. })
                if desired.slot.as_deref() != target.slot.as_ref().map(Name::as_str) =>
            {
                Current::Unverified("a desired state signed for another slot".into())
            }
            Ok(VerifiedDesired { desired, .. }) => Current::Signed {
                want: Want {
                    name: desired.model.name,
                    version: desired.model.version,
                    sha256: desired.model.bundle.sha256,
                    rollback: desired.model.rollback,
                },
                expires: desired.expires,
            },
            Err(e) => Current::Unverified(format!("a desired state refused ({})", e.code())),
        };
        out.insert(target, c);
    }
    Ok(out)
}

/// `apply`: what it needs besides the file.
pub struct Apply<'a> {
    pub broker: BrokerConfig,
    pub keys: Vec<&'a SigningKey>,
    pub chunk_bytes: u32,
    pub expires_in_secs: u64,
    pub timeout: Duration,
    pub dry_run: bool,
}

/// Print the difference between the file and the broker, then (unless a dry run) publish what
/// differs, each as `deploy` or `rollback` would. Returns the exit code: 0 when everything
/// published was applied by the devices waited for (device targets; groups with a canary).
pub async fn apply(file: &Path, a: Apply<'_>) -> anyhow::Result<u8> {
    let (fleet, declared) = load(file)?;
    let current = current(&a.broker, &fleet, &a.keys).await?;
    let steps = plan(&declared, &current, lathe::sync::now_ms() / 1000);
    let changes = steps
        .iter()
        .filter(|(_, s, _)| matches!(s, Step::Publish { .. }))
        .count();
    println!("fleet {fleet}: {} declared, {changes} to publish", declared.len());
    for (_, _, line) in &steps {
        println!("  {line}");
    }
    if a.dry_run || changes == 0 {
        return Ok(0);
    }
    let mut code = 0;
    for (d, (_, step, _)) in declared.iter().zip(&steps) {
        if *step == Step::Keep {
            continue;
        }
        let bytes = std::fs::read(&d.bundle).with_context(|| format!("{}", d.bundle.display()))?;
        anyhow::ensure!(
            protocol::sha256_hex(&bytes) == d.want.sha256,
            "{}: changed while apply ran",
            d.bundle.display()
        );
        let (devices, group, wait_for) = match &d.target.whom {
            Whom::Device(id) => (vec![id.clone()], None, vec![id.clone()]),
            Whom::Group(g) => (vec![], Some(g.clone()), vec![]),
        };
        println!("{}:", d.target);
        let r = rollout::run(rollout::Run {
            broker: a.broker.clone(),
            plan: rollout::Plan {
                fleet: fleet.clone(),
                devices,
                group,
                bundle: &bytes,
                keys: a.keys.clone(),
                chunk_bytes: a.chunk_bytes,
                expires_in_secs: a.expires_in_secs,
                rollback: d.want.rollback,
                slot: d.target.slot.clone(),
            },
            wait_for: if a.timeout.is_zero() { vec![] } else { wait_for },
            timeout: a.timeout,
            canary: d.canary,
        })
        .await?;
        code = code.max(r);
        if r != 0 && d.canary.is_some() {
            println!("apply stopped: the canary of {} failed", d.target);
            break;
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(version: u64) -> Want {
        Want {
            name: "bearing".into(),
            version,
            sha256: format!("{version:064}"),
            rollback: false,
        }
    }

    fn group(g: &str) -> Target {
        Target {
            whom: Whom::Group(Name::new(g.to_string()).expect("name")),
            slot: None,
        }
    }

    fn device(d: &str) -> Target {
        Target {
            whom: Whom::Device(Name::new(d.to_string()).expect("name")),
            slot: None,
        }
    }

    fn declared(target: Target, version: u64) -> Declared {
        Declared {
            target,
            bundle: PathBuf::from("b.lbundle"),
            want: want(version),
            canary: None,
        }
    }

    #[test]
    fn only_what_differs_is_published() {
        let signed = |v, expires| Current::Signed { want: want(v), expires };
        let current: BTreeMap<Target, Current> = [
            (group("line-1"), signed(2, 100)),
            (group("line-2"), signed(1, 100)),
            (device("press-1"), signed(3, 10)),
            (
                device("press-2"),
                Current::Unverified("a desired state refused (signature_threshold)".into()),
            ),
            (device("press-9"), signed(1, 100)),
        ]
        .into();
        let mut rollback = declared(device("press-3"), 1);
        rollback.want.rollback = true;
        let mut canary = declared(group("line-2"), 2);
        canary.canary = Some(10);
        let d = vec![
            declared(group("line-1"), 2),
            canary,
            declared(device("press-1"), 3),
            declared(device("press-2"), 3),
            rollback,
        ];
        let lines: Vec<(Step, String)> = plan(&d, &current, 50).into_iter().map(|(_, s, l)| (s, l)).collect();
        let publish = |why: &str| Step::Publish { why: why.into() };
        assert_eq!(
            lines,
            vec![
                (Step::Keep, "= group line-1: bearing v2".into()),
                (
                    publish("changed"),
                    "~ group line-2: bearing v1 -> bearing v2, canary 10%".into()
                ),
                (
                    publish("expired"),
                    "~ device press-1: bearing v3 (expired; signed again)".into()
                ),
                (
                    publish("not signed by these keys"),
                    "~ device press-2: a desired state refused (signature_threshold) -> bearing v3".into()
                ),
                (publish("new"), "+ device press-3: none -> bearing v1 (rollback)".into()),
                (
                    Step::Undeclared,
                    "? device press-9: bearing v1 at the broker, not declared (left as it is)".into()
                ),
            ]
        );
    }

    #[test]
    fn a_fleet_file_is_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("fleet.toml");
        let check = |text: &str, err: &str| {
            std::fs::write(&f, text).expect("write");
            let e = format!("{:#}", load(&f).expect_err(text));
            assert!(e.contains(err), "{text}: {e}");
        };
        check("fleet = \"plant 1\"\n", "fleet");
        check("fleet = \"p\"\nfoo = 1\n", "unknown field");
        check(
            "fleet = \"p\"\n[[group]]\nname = \"g\"\nbundle = \"missing.lbundle\"\n",
            "group g: ",
        );
        check(
            "fleet = \"p\"\n[[group]]\nname = \"g\"\nbundle = \"b\"\ncanary = \"120%\"\n",
            "canary",
        );
        std::fs::write(dir.path().join("b"), b"not a bundle").expect("write");
        check(
            "fleet = \"p\"\n[[device]]\nid = \"d\"\nbundle = \"b\"\n",
            "not a bundle",
        );
        check(
            "fleet = \"p\"\n[[device]]\nid = \"d\"\nbundle = \"b\"\nslot = \"a/b\"\n",
            "slot",
        );
        std::fs::write(&f, "fleet = \"p\"\n").expect("write");
        assert!(load(&f).expect("empty fleet").1.is_empty());
        let slotted = Target {
            whom: Whom::Device(Name::new("press-7").expect("name")),
            slot: Some(Name::new("rul").expect("name")),
        };
        assert_eq!(slotted.to_string(), "device press-7 slot rul");
    }
}
