//! Deploys and rollbacks: the deploy task, which applies signed desired states (SPEC.md §8,
//! through [`crate::rollout`]) and answers `ping`.
//!
//! Guarantees:
//! - an unverified bundle never runs: a bundle is verified (signatures, digests, expiry,
//!   version) and its model loaded before anything changes; a refusal leaves the active model
//!   as it was and says why in the command's response;
//! - the switch is atomic: the bundle file is written and synced under a temporary name and
//!   renamed, then the active and previous bundles are recorded in one SQLite transaction,
//!   then the in-memory model is swapped; a power cut at any point leaves either the old or
//!   the new bundle active, never a mix;
//! - the previous bundle stays on disk for a rollback; older ones are removed;
//! - versions of a model name only increase: the highest version ever activated is kept.
//!
//! [`DeployState`] holds these rules without I/O.

use crate::config::slot_key;
use crate::engine::{Engine, EngineError};
use crate::inference::Features;
use crate::link::{ConnState, IncomingCommand};
use crate::metrics::Metrics;
use crate::queue::Held;
use crate::store::{NewRecord, Store};
use crate::sync::{now_ms, Append, Outbox, Outgoing};
use crate::trial::Trial;
use arc_swap::ArcSwapOption;
use protocol::baseline::Baseline;
use protocol::bundle::{self, Manifest, Policy, Verified};
use protocol::keys::TrustStore;
use protocol::keyset::KeySet;
use protocol::messages::{Event, Level, ModelRef, ReceivedCommand, Response};
use protocol::selftest::{Selftest, Tolerance};
use protocol::{Channel, Name, Topic};
use rumqttc::{AsyncClient, QoS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// The model the agent runs now.
#[derive(Debug)]
pub struct ActiveModel {
    pub manifest: Manifest,
    pub engine: Engine,
    pub signed_by: Vec<String>,
    /// Where each input feature goes in a row.
    pub features: Features,
    /// The training baseline drift is measured against; `None` when the bundle has none, and
    /// drift is off for it.
    pub baseline: Option<Arc<Baseline>>,
    /// What this model did since it was loaded, for its watch period (SPEC §8.4).
    pub trial: Trial,
}

impl ActiveModel {
    pub fn model_ref(&self) -> ModelRef {
        ModelRef {
            name: self.manifest.name.clone(),
            version: self.manifest.version,
        }
    }
}

pub type SharedModel = Arc<ArcSwapOption<ActiveModel>>;

/// An installed bundle file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub name: String,
    pub version: u64,
    /// File name inside the bundles directory.
    pub file: String,
    /// SHA-256 of the file, recorded when it was verified and activated: a bundle that later
    /// fails the trust policy (a key revoked, the threshold raised) keeps running while its file
    /// is unchanged (SPEC §4.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Which bundles are active and kept, and the version high-water marks. No I/O.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployState {
    pub active: Option<Installed>,
    pub previous: Option<Installed>,
    pub high_water: BTreeMap<String, u64>,
    /// The active bundle is in its watch period (SPEC §8.4): not committed, so its version is
    /// not yet a high-water mark, and the previous bundle is the last one that passed every
    /// step.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub watching: bool,
}

impl DeployState {
    /// The version a new bundle of this name must exceed.
    pub fn installed_version(&self, name: &str) -> Option<u64> {
        self.high_water.get(name).copied()
    }

    /// Make `new` active; the old active becomes previous, unless it was still watched: then
    /// the previous one stays, the last that passed every step. A watched bundle is committed
    /// by [`DeployState::commit`]; one that is not watched is committed at once. Returns bundle
    /// files no longer kept.
    pub fn activate(&mut self, new: Installed, watched: bool) -> Vec<String> {
        let dropped = if self.watching {
            self.active.replace(new)
        } else {
            let dropped = self.previous.take();
            self.previous = self.active.replace(new);
            dropped
        };
        self.watching = watched;
        if !watched {
            self.commit();
        }
        dropped.into_iter().map(|d| d.file).filter(|f| !self.keeps(f)).collect()
    }

    /// The active bundle passed its watch period: its version becomes the high-water mark.
    pub fn commit(&mut self) {
        self.watching = false;
        if let Some(a) = &self.active {
            let hw = self.high_water.entry(a.name.clone()).or_insert(0);
            *hw = (*hw).max(a.version);
        }
    }

    /// Swap active and previous. The high-water marks stay: a rolled-back version cannot be
    /// deployed again, only a newer one. A watched bundle rolled back from was never
    /// committed, so its version is no high-water mark.
    pub fn rollback(&mut self) -> Result<(), &'static str> {
        if self.previous.is_none() {
            return Err("no previous bundle to roll back to");
        }
        std::mem::swap(&mut self.active, &mut self.previous);
        self.watching = false;
        Ok(())
    }

    fn keeps(&self, file: &str) -> bool {
        [&self.active, &self.previous]
            .iter()
            .any(|i| i.as_ref().is_some_and(|i| i.file == file))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("bad command: {0}")]
    BadCommand(String),
    #[error("bundle is {size} bytes, more than this device accepts ({limit}, trust.max_bundle_bytes)")]
    TooLarge { size: usize, limit: usize },
    #[error("bundle refused: {0}")]
    Refused(#[from] bundle::VerifyError),
    #[error("bundle {name} v{version}: {message}")]
    Load {
        name: String,
        version: u64,
        message: String,
    },
    #[error("bundle {name} v{version}: self-test failed: {message}")]
    Selftest {
        name: String,
        version: u64,
        message: String,
    },
    #[error("bundle {name} v{version}: drift baseline is invalid: {message}")]
    Baseline {
        name: String,
        version: u64,
        message: String,
    },
    #[error("{0}")]
    NoPrevious(&'static str),
    #[error("the fetched bundle is {got}, the desired state names {want}")]
    Mismatch { got: String, want: String },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl DeployError {
    pub fn code(&self) -> String {
        match self {
            DeployError::BadCommand(_) => "bad_command".into(),
            DeployError::TooLarge { .. } => "too_large".into(),
            DeployError::Refused(v) => v.code().into(),
            DeployError::Load { .. } => "load_failed".into(),
            DeployError::Selftest { .. } => "selftest_failed".into(),
            DeployError::Baseline { .. } => "baseline_invalid".into(),
            DeployError::NoPrevious(_) => "no_previous".into(),
            DeployError::Mismatch { .. } => "bundle_mismatch".into(),
            DeployError::Io { .. } | DeployError::Store(_) => "io".into(),
        }
    }
}

/// The keys documents must be signed by, and how many of them.
#[derive(Debug, Clone)]
pub struct Trust {
    pub store: TrustStore,
    pub threshold: usize,
    /// The signed key set these come from (SPEC §8.7), or `None`: from `trust.keys_file`.
    pub key_set: Option<KeySet>,
}

pub struct Deployer {
    pub store: Store,
    pub state: DeployState,
    pub bundles_dir: PathBuf,
    pub trust: TrustStore,
    pub threshold: usize,
    /// The key set in force, if the device accepted one.
    pub key_set: Option<KeySet>,
    pub max_bundle_bytes: usize,
    pub active: SharedModel,
    /// Why the active bundle runs although it no longer meets the trust policy, if it does.
    pub policy_warning: Option<String>,
    /// A bundle that was in its watch period when the agent stopped, and was rolled back from
    /// at start-up (SPEC §8.4).
    pub interrupted: Option<Installed>,
    /// The model slot this deployer keeps (SPEC §8.8); `None`: the default slot.
    pub slot: Option<String>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DeployError + '_ {
    move |e| DeployError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

impl Deployer {
    /// Open the deploy state and load the active bundle, re-verifying it. If it cannot be
    /// loaded, the previous bundle is tried. Returns the deployer and what happened, as events.
    pub fn open(
        store: Store,
        bundles_dir: PathBuf,
        trust: Trust,
        max_bundle_bytes: usize,
        slot: Option<String>,
    ) -> Result<(Deployer, Vec<Event>), DeployError> {
        std::fs::create_dir_all(&bundles_dir).map_err(io_err(&bundles_dir))?;
        let state = match store.get_meta(&slot_key("deploy_state", slot.as_deref()))? {
            Some(s) => serde_json::from_str(&s).map_err(|e| DeployError::Io {
                path: bundles_dir.clone(),
                message: format!("deploy state is unreadable: {e}"),
            })?,
            None => DeployState::default(),
        };
        let mut d = Deployer {
            store,
            state,
            bundles_dir,
            trust: trust.store,
            threshold: trust.threshold,
            key_set: trust.key_set,
            max_bundle_bytes,
            active: Arc::default(),
            policy_warning: None,
            interrupted: None,
            slot,
        };
        let mut events = vec![];
        let mut order = [
            ("active", d.state.active.clone()),
            ("previous", d.state.previous.clone()),
        ];
        // A bundle still in its watch period had not passed every step when the agent stopped:
        // the previous one runs instead, if it can (SPEC §8.4).
        let watched = d.state.watching.then(|| d.state.active.clone()).flatten();
        if watched.is_some() && d.state.previous.is_some() {
            order.reverse();
        }
        for (which, inst) in order {
            let Some(inst) = inst else { continue };
            match d.load_installed(&inst) {
                Ok((m, warning)) => {
                    info!(bundle = %inst.file, "loaded {which} bundle");
                    if let Some(w) = &warning {
                        warn!(bundle = %inst.file, "{w}");
                        events.push(event(Level::Warn, "bundle_policy", w.clone()));
                    }
                    d.set_policy_warning(warning);
                    if which == "previous" {
                        d.state.rollback().expect("previous exists");
                        d.persist()?;
                        let why = match &watched {
                            Some(w) => {
                                d.interrupted = Some(w.clone());
                                format!(
                                    "{} v{} had not finished its watch period when the agent stopped",
                                    w.name, w.version
                                )
                            }
                            None => "the active bundle failed to load".into(),
                        };
                        warn!("{why}; running the previous bundle {} v{}", inst.name, inst.version);
                        events.push(event(
                            Level::Warn,
                            "rolled_back",
                            format!("{why}; running the previous bundle {} v{}", inst.name, inst.version),
                        ));
                    }
                    d.active.store(Some(Arc::new(m)));
                    break;
                }
                Err(e) => {
                    error!(error = %e, bundle = %inst.file, "installed bundle does not load");
                    events.push(event(
                        Level::Error,
                        "bundle_unloadable",
                        format!("{which} bundle {}: {e}", inst.file),
                    ));
                }
            }
        }
        Ok((d, events))
    }

    fn load_installed(&self, inst: &Installed) -> Result<(ActiveModel, Option<String>), DeployError> {
        load_installed(&self.bundles_dir, &self.trust, self.threshold, inst)
    }

    /// Trust a verified key set from now on (SPEC §8.7): kept in `path` (written whole, then
    /// renamed), then in force. The active bundle is checked against the new policy: one that
    /// no longer meets it keeps running, with a warning. Returns what changed, in a sentence.
    pub fn accept_key_set(&mut self, v: protocol::keyset::VerifiedKeySet, path: &Path) -> Result<String, DeployError> {
        let tmp = path.with_extension("tmp");
        std::fs::File::create(&tmp)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, &v.body)?;
                f.sync_all()
            })
            .map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        let before: Vec<String> = self.trust.ids().into_iter().map(|k| k.0).collect();
        let after: Vec<String> = v.trust.ids().into_iter().map(|k| k.0).collect();
        let removed: Vec<&String> = before.iter().filter(|k| !after.contains(k)).collect();
        let added: Vec<&String> = after.iter().filter(|k| !before.contains(k)).collect();
        let msg = format!(
            "key set #{} accepted (signed by {}): {} key(s), threshold {}; added {:?}, removed {:?}",
            v.keys.counter,
            v.signed_by.join(", "),
            after.len(),
            v.keys.threshold,
            added,
            removed
        );
        self.trust = v.trust;
        self.threshold = v.keys.threshold;
        self.key_set = Some(v.keys);
        self.recheck_policy();
        Ok(msg)
    }

    /// Trust what `other` (another slot's deployer) trusts, after it accepted a key set: one
    /// trust store for the whole device.
    pub fn trust_as(&mut self, other: &Deployer) {
        self.trust = other.trust.clone();
        self.threshold = other.threshold;
        self.key_set = other.key_set.clone();
        self.recheck_policy();
    }

    /// The key this deployer keeps `base` under in the store's meta table.
    pub fn key(&self, base: &str) -> String {
        slot_key(base, self.slot.as_deref())
    }

    /// Check the active bundle against the trust policy in force, and record whether it meets
    /// it.
    fn recheck_policy(&mut self) {
        let Some(inst) = self.state.active.clone() else { return };
        let path = self.bundles_dir.join(&inst.file);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, bundle = %inst.file, "cannot read the active bundle to check it against the new keys");
                return;
            }
        };
        let policy = Policy {
            trust: &self.trust,
            threshold: self.threshold,
            now: 0,
            installed_version: &bundle::none_installed,
        };
        let warning = bundle::verify(&bytes, &policy).err().map(|e| policy_warning(&inst, &e));
        if let Some(w) = &warning {
            warn!(bundle = %inst.file, "{w}");
        }
        self.set_policy_warning(warning);
    }

    /// Record (or clear) the policy warning of the active bundle, for the reported state and
    /// `lathe status`.
    fn set_policy_warning(&mut self, w: Option<String>) {
        if let Err(e) = self
            .store
            .set_meta(&self.key("policy_warning"), w.as_deref().unwrap_or(""))
        {
            warn!(error = %e, "cannot record the trust policy warning");
        }
        self.policy_warning = w;
    }

    fn persist(&mut self) -> Result<(), DeployError> {
        self.adopt(self.state.clone())
    }

    /// Record `next` in the store, then make it the state: nothing changes in memory unless
    /// it is durable.
    fn adopt(&mut self, next: DeployState) -> Result<(), DeployError> {
        let s = serde_json::to_string(&next).expect("deploy state serializes");
        self.store.set_meta(&self.key("deploy_state"), &s)?;
        self.state = next;
        Ok(())
    }

    /// Verify, load, store and activate a fetched bundle file that a desired state names (SPEC
    /// §8.4). A rollback may name a version at or below the high-water mark, which stays.
    pub fn deploy_file(
        &mut self,
        path: &Path,
        now: u64,
        want: &protocol::rollout::DesiredModel,
        watch: Option<&crate::trial::Rules>,
    ) -> Result<String, DeployError> {
        let size = std::fs::metadata(path).map_err(io_err(path))?.len() as usize;
        if size > self.max_bundle_bytes {
            return Err(DeployError::TooLarge {
                size,
                limit: self.max_bundle_bytes,
            });
        }
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        // Nothing of the manifest is read before its signatures are checked: the version
        // high-water mark is looked up inside `verify`, with the verified name (SPEC §4.6).
        let state = &self.state;
        let installed = |name: &str| state.installed_version(name);
        let policy = Policy {
            trust: &self.trust,
            threshold: self.threshold,
            now,
            installed_version: if want.rollback {
                &bundle::none_installed
            } else {
                &installed
            },
        };
        let verified = bundle::verify_owned(bytes, &policy)?;
        let (name, version) = (verified.manifest.name.clone(), verified.manifest.version);
        if name != want.name || version != want.version {
            return Err(DeployError::Mismatch {
                got: format!("{name} v{version}"),
                want: format!("{} v{}", want.name, want.version),
            });
        }
        let mut model = load_model(verified)?;
        if let Some(r) = watch {
            model.trial = Trial::new(model.baseline.as_deref(), r.range_margin);
        }

        let file = format!("{name}-{version}.lbundle");
        let dest = self.bundles_dir.join(&file);
        std::fs::rename(path, &dest).map_err(io_err(&dest))?;
        sync_dir(&self.bundles_dir)?;
        let mut next = self.state.clone();
        // A rollback names a version that ran before: it is not watched again.
        let watched = watch.is_some() && !want.rollback;
        let unused = next.activate(
            Installed {
                name: name.clone(),
                version,
                file,
                sha256: Some(want.bundle.sha256.clone()),
            },
            watched,
        );
        self.adopt(next)?;
        self.active.store(Some(Arc::new(model)));
        self.set_policy_warning(None);
        for f in unused {
            let _ = std::fs::remove_file(self.bundles_dir.join(f));
        }
        Ok(if want.rollback {
            format!("rolled back to {name} v{version}")
        } else {
            format!("activated {name} v{version}")
        })
    }

    pub fn rollback(&mut self) -> Result<String, DeployError> {
        let prev = self
            .state
            .previous
            .clone()
            .ok_or(DeployError::NoPrevious("no previous bundle to roll back to"))?;
        let (model, warning) = self.load_installed(&prev)?;
        let mut next = self.state.clone();
        next.rollback().map_err(DeployError::NoPrevious)?;
        self.adopt(next)?;
        self.active.store(Some(Arc::new(model)));
        self.set_policy_warning(warning);
        let was = self
            .state
            .previous
            .as_ref()
            .map(|p| format!("{} v{}", p.name, p.version))
            .unwrap_or_else(|| "none".into());
        // A rollback swaps the two: run twice, it goes back to where it started. Say which.
        Ok(format!(
            "swapped {was} (now previous) for {} v{} (now active)",
            prev.name, prev.version
        ))
    }

    /// The active bundle passed its watch period: record it (SPEC §8.4).
    pub fn commit(&mut self) -> Result<(), DeployError> {
        let mut next = self.state.clone();
        next.commit();
        self.adopt(next)
    }

    pub fn current(&self) -> Option<ModelRef> {
        self.active.load().as_ref().map(|m| m.model_ref())
    }
}

/// Why an installed bundle runs although it no longer verifies under the trust policy.
fn policy_warning(inst: &Installed, e: &bundle::VerifyError) -> String {
    format!(
        "{} v{} was verified when it was installed but no longer meets the trust policy ({e}); it keeps running until a bundle that does is deployed",
        inst.name, inst.version
    )
}

/// Re-verify an installed bundle (signatures and digests; not expiry or version) and load it.
/// One that fails only the signature threshold, whose file is the one recorded when it was
/// verified, still loads, with a warning: a change of trust policy never leaves the device
/// without its model; a bundle that meets the new policy replaces it.
pub fn load_installed(
    bundles_dir: &Path,
    trust: &TrustStore,
    threshold: usize,
    inst: &Installed,
) -> Result<(ActiveModel, Option<String>), DeployError> {
    let path = bundles_dir.join(&inst.file);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let policy = Policy {
        trust,
        threshold,
        now: 0,
        installed_version: &bundle::none_installed,
    };
    match bundle::verify_owned(bytes, &policy) {
        Ok(v) => Ok((load_model(v)?, None)),
        Err(e @ bundle::VerifyError::SignatureThreshold { .. }) => {
            let Some(sha) = &inst.sha256 else {
                return Err(e.into());
            };
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let v = bundle::reopen(bytes, sha)?;
            Ok((load_model(v)?, Some(policy_warning(inst, &e))))
        }
        Err(e) => Err(e.into()),
    }
}

/// Load the model of a verified bundle, check it against the manifest (SPEC §4.7) and run its
/// self-test, if it has one (§4.8). This is the check a deploy, a re-verification at start-up
/// and `lathe model run` on a bundle make.
pub fn load_model(v: Verified) -> Result<ActiveModel, DeployError> {
    let m = &v.manifest;
    let err = |message: String| DeployError::Load {
        name: m.name.clone(),
        version: m.version,
        message,
    };
    let tensors = m.tensors();
    let shapes: Vec<Vec<usize>> = tensors
        .iter()
        .map(|t| t.shape.iter().map(|d| *d as usize).collect())
        .collect();
    let engine = Engine::load_shapes(v.model(), &shapes).map_err(|e| err(e.to_string()))?;
    let declared: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    let actual: Vec<&str> = engine.inputs().iter().map(|i| i.name.as_str()).collect();
    if declared != actual {
        return Err(err(format!(
            "manifest inputs {declared:?} differ from the model's {actual:?}"
        )));
    }
    let features = Features::for_manifest(m).map_err(err)?;
    let declared: Vec<(&str, &str)> = m
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), declared_dtype(&o.dtype)))
        .collect();
    let model = engine.outputs();
    let actual: Vec<(&str, &str)> = model.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
    if declared != actual {
        return Err(err(format!(
            "manifest outputs {declared:?} differ from the model's {actual:?} (name, dtype)"
        )));
    }
    if let Some(bytes) = v.payload(bundle::Role::Selftest) {
        let failed = |message: String| DeployError::Selftest {
            name: m.name.clone(),
            version: m.version,
            message,
        };
        let test = Selftest::parse(bytes, m).map_err(failed)?;
        let outputs = engine.run(&test.rows).map_err(|e| failed(e.to_string()))?;
        test.compare(|name, row| outputs.column(name).map(|c| c.row(row)))
            .map_err(|e| failed(e.to_string()))?;
    }
    let baseline = match v.payload(bundle::Role::Baseline) {
        Some(bytes) => Some(Arc::new(Baseline::parse(bytes, m).map_err(|message| {
            DeployError::Baseline {
                name: m.name.clone(),
                version: m.version,
                message,
            }
        })?)),
        None => None,
    };
    Ok(ActiveModel {
        trial: Trial::new(baseline.as_deref(), crate::trial::DEFAULT_RANGE_MARGIN),
        baseline,
        features,
        manifest: v.manifest,
        engine,
        signed_by: v.signed_by,
    })
}

/// A self-test of `rows` whose expected outputs are what `engine` computes for them, by output
/// name (SPEC §4.8): what a packer signs into a bundle, and what `load_model` compares with.
pub fn make_selftest(engine: &Engine, rows: Vec<Vec<f32>>, tolerance: Tolerance) -> Result<Selftest, EngineError> {
    let outputs = engine.run(&rows)?;
    let expected = outputs
        .columns()
        .iter()
        .map(|c| (c.name.to_string(), (0..rows.len()).map(|i| c.row(i).to_vec()).collect()))
        .collect();
    Ok(Selftest {
        format: protocol::selftest::FORMAT,
        rows,
        expected,
        tolerance,
    })
}

/// A manifest output dtype as compared with the model's: packers before protocol 1.2 wrote
/// `tdim` for int64 outputs that the engine computes as dimensions.
fn declared_dtype(d: &str) -> &str {
    if d == "tdim" {
        "int64"
    } else {
        d
    }
}

fn sync_dir(dir: &Path) -> Result<(), DeployError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// The longest event message; longer ones are cut.
pub const MAX_EVENT_MESSAGE: usize = 1024;

pub fn event(level: Level, kind: &str, message: String) -> Event {
    let message = match protocol::messages::echo(&message, MAX_EVENT_MESSAGE) {
        std::borrow::Cow::Borrowed(_) => message,
        std::borrow::Cow::Owned(cut) => cut,
    };
    Event {
        ts_ms: now_ms(),
        level,
        kind: kind.into(),
        message,
    }
}

/// One model slot on the deploy side (SPEC §8.8): what it runs and keeps, and the desired
/// states it follows.
pub struct SlotDeploy {
    pub deployer: Deployer,
    pub driver: crate::rollout::Driver,
}

/// The task that serves commands and follows every slot's desired states.
pub struct DeployTask {
    /// The model slots, the first the one the retained state names.
    pub slots: Vec<SlotDeploy>,
    pub rx: mpsc::Receiver<Held<IncomingCommand>>,
    /// Desired states, key sets and chunks from the hub link.
    pub rollouts: mpsc::Receiver<Held<crate::rollout::RolloutMessage>>,
    pub hub_state: watch::Receiver<ConnState>,
    pub client: AsyncClient,
    pub fleet: Name,
    pub device: Name,
    pub events: Events,
    pub metrics: Arc<Metrics>,
}

/// Hands events to the outbox, which publishes them live once they are durable.
#[derive(Clone)]
pub struct Events {
    pub outbox: Outbox,
}

impl Events {
    pub async fn emit(&self, e: Event) {
        let data = serde_json::to_string(&e).expect("an event serializes");
        let a = Append {
            records: vec![Outgoing {
                record: NewRecord {
                    stream: protocol::streams::EVENTS,
                    ts_ms: e.ts_ms,
                    data,
                },
                live: true,
            }],
            ..Default::default()
        };
        let bytes = a.bytes();
        let _ = self.outbox.send(a, bytes).await;
    }
}

impl DeployTask {
    /// Runs until shutdown; a command already taken is always answered.
    pub async fn run(mut self, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let cmd = tokio::select! {
                _ = shutdown.cancelled() => break,
                c = self.rx.recv() => match c { Some(c) => c.into_inner(), None => break },
                m = self.rollouts.recv() => {
                    if let Some(m) = m {
                        self.on_rollout(m.into_inner()).await;
                    }
                    continue;
                }
                changed = self.hub_state.changed() => {
                    if changed.is_ok() && *self.hub_state.borrow_and_update() == ConnState::Connected {
                        for s in &mut self.slots {
                            s.driver.on_connected(&mut s.deployer).await;
                        }
                    }
                    continue;
                }
                _ = tick.tick() => {
                    for s in &mut self.slots {
                        s.driver.tick(&mut s.deployer, &self.events).await;
                    }
                    continue;
                }
            };
            let result = match ReceivedCommand::parse(&cmd.payload) {
                Ok(ReceivedCommand::Ping) => Ok("pong".to_string()),
                Err(e) => Err(DeployError::BadCommand(e)),
            };
            let (ok, message, code) = match &result {
                Ok(m) => (true, m.clone(), None),
                Err(e) => (false, e.to_string(), Some(e.code())),
            };
            if ok {
                info!(command = %cmd.id, %message, "command done");
            } else {
                warn!(command = %cmd.id, %message, "command refused");
            }
            let resp = Response {
                ok,
                message,
                model: self.slots[0].deployer.current(),
                code,
            };
            let topic = Topic::new(&self.fleet, &self.device, Channel::Response(cmd.id.clone()));
            let payload = serde_json::to_vec(&resp).expect("a response serializes");
            if let Err(e) = self
                .client
                .publish(topic.to_string(), QoS::AtLeastOnce, false, payload)
                .await
            {
                warn!(error = %e, "could not queue command response");
            }
        }
        for s in &mut self.slots {
            s.driver.shutdown().await;
        }
    }

    /// A desired state goes to the slot whose topic it came on; a chunk to every slot (each
    /// takes the chunks of what it fetches); a key set to the first slot, whose trust store the
    /// others then share.
    async fn on_rollout(&mut self, m: crate::rollout::RolloutMessage) {
        let fleet = self.fleet.as_str();
        if m.topic == protocol::keyset::keys_topic(fleet) {
            let (first, rest) = self.slots.split_first_mut().expect("at least one slot");
            first.driver.on_message(&mut first.deployer, &self.events, m).await;
            for s in rest {
                let counter = |d: &Deployer| d.key_set.as_ref().map(|k| k.counter);
                if counter(&s.deployer) != counter(&first.deployer) {
                    tokio::task::block_in_place(|| s.deployer.trust_as(&first.deployer));
                }
                s.driver.share_keys_error(first.driver.keys_error().cloned());
            }
        } else if let Some((object, _)) = protocol::rollout::parse_chunk_topic(fleet, &m.topic) {
            // The slots that fetch it; if none does, the first, which unsubscribes it.
            let wanted: Vec<bool> = self.slots.iter().map(|s| s.driver.fetches(object)).collect();
            let none = !wanted.contains(&true);
            for (i, s) in self.slots.iter_mut().enumerate() {
                if !(wanted[i] || (none && i == 0)) {
                    continue;
                }
                // A copy shares the payload's bytes.
                let copy = crate::rollout::RolloutMessage {
                    topic: m.topic.clone(),
                    payload: m.payload.clone(),
                };
                s.driver.on_message(&mut s.deployer, &self.events, copy).await;
            }
        } else if let Some(s) = self.slots.iter_mut().find(|s| s.driver.follows(&m.topic)) {
            s.driver.on_message(&mut s.deployer, &self.events, m).await;
        } else {
            warn!(topic = %m.topic, "a rollout message on a topic no slot follows; ignored");
        }
    }
}

/// The retained birth message for a device running `model`.
pub fn birth(model: Option<ModelRef>) -> Vec<u8> {
    let s = protocol::messages::State {
        status: protocol::messages::Status::Online,
        agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        ts_ms: Some(now_ms()),
        model,
        reason: None,
    };
    serde_json::to_vec(&s).expect("state serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(name: &str, v: u64) -> Installed {
        Installed {
            name: name.into(),
            version: v,
            file: format!("{name}-{v}.lbundle"),
            sha256: None,
        }
    }

    #[test]
    fn activation_keeps_one_previous_and_raises_high_water() {
        let mut s = DeployState::default();
        assert_eq!(s.activate(inst("m", 1), false), Vec::<String>::new());
        assert_eq!(s.activate(inst("m", 2), false), Vec::<String>::new());
        assert_eq!(s.activate(inst("m", 3), false), vec!["m-1.lbundle".to_string()]);
        assert_eq!(s.previous, Some(inst("m", 2)));
        assert_eq!(s.installed_version("m"), Some(3));
        s.rollback().expect("has previous");
        assert_eq!(s.active, Some(inst("m", 2)));
        assert_eq!(s.installed_version("m"), Some(3), "rollback keeps the high-water mark");
        // Deploying after a rollback drops the rolled-back-from bundle, not the active one.
        assert_eq!(s.activate(inst("m", 4), false), vec!["m-3.lbundle".to_string()]);
        assert_eq!(s.previous, Some(inst("m", 2)));
    }

    #[test]
    fn a_watched_bundle_is_a_high_water_mark_only_once_committed() {
        let mut s = DeployState::default();
        s.activate(inst("m", 1), false);
        s.activate(inst("m", 2), true);
        assert!(s.watching);
        assert_eq!(s.installed_version("m"), Some(1), "not committed yet");
        // Another bundle while v2 is watched: v1, the last one that passed, stays previous.
        assert_eq!(s.activate(inst("m", 3), true), vec!["m-2.lbundle".to_string()]);
        assert_eq!(s.previous, Some(inst("m", 1)));
        s.commit();
        assert!(!s.watching);
        assert_eq!(s.installed_version("m"), Some(3));
        // A watched bundle that fails is rolled back from, and never raised the mark.
        s.activate(inst("m", 4), true);
        s.rollback().expect("has previous");
        assert!(!s.watching);
        assert_eq!(s.active, Some(inst("m", 3)));
        assert_eq!(s.installed_version("m"), Some(3));
    }

    #[test]
    fn rollback_without_previous_is_refused() {
        let mut s = DeployState::default();
        assert!(s.rollback().is_err());
        s.activate(inst("m", 1), false);
        assert!(s.rollback().is_err(), "the first bundle has nothing before it");
        s.activate(inst("m", 2), false);
        assert!(s.rollback().is_ok());
        assert_eq!(s.active, Some(inst("m", 1)));
        assert_eq!(s.previous, Some(inst("m", 2)));
    }
}
