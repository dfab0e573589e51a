//! Rollouts on the device (SPEC.md §8): signed desired states in, bundles fetched in chunks to
//! disk, the reported state out.
//!
//! - [`Transfer`] knows, without I/O, which chunks of an object are present, and checks each
//!   arriving chunk against the signed chunk index before anything is written.
//! - [`Download`] keeps a transfer on disk under `<state_dir>/downloads`: the object's bytes at
//!   their offsets in `<sha>.part`, the chunk index in `<sha>.index` and the chunks present in
//!   `<sha>.have`. The bitmap is replaced only after the data it marks is synced, so a power cut
//!   loses at most the chunks since the last sync and never marks a chunk present that is not.
//!   After a disconnect or a restart, only missing chunks are fetched.
//! - [`Following`] and [`Decision`] say what a verified desired state means for the device.
//!
//! Memory is bounded whatever the bundle's size: the chunk index (at most 1 MiB) and the chunks
//! in flight (`rollout.window` of at most 1 MiB each).

use protocol::rollout::{self, BlobRef, DesiredModel, ReportedError, VerifiedDesired};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Why an arriving chunk was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {index} is out of range: the object has {chunks}")]
    OutOfRange { index: u64, chunks: u64 },
    #[error("chunk {index} is {got} bytes, {want} expected")]
    Length { index: u64, got: u64, want: u64 },
    #[error("chunk {index} does not match its digest in the signed chunk index")]
    Digest { index: u64 },
}

/// Which chunks of an object are present. For an object with a chunk index (a bundle), each
/// chunk is checked against it; an index itself is checked whole, by its signed digest.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub object: BlobRef,
    digests: Option<Vec<u8>>,
    have: Vec<u8>,
    present: u64,
    /// Bytes of the chunks present.
    received: u64,
}

impl Transfer {
    /// A transfer of `object`; `index` is its chunk index (raw digests), or `None` for an
    /// object checked only whole.
    pub fn new(object: BlobRef, index: Option<Vec<u8>>) -> Result<Transfer, String> {
        let chunks = object.chunks();
        if let Some(i) = &index {
            if i.len() as u64 != chunks * 32 {
                return Err(format!("chunk index of {} bytes for {chunks} chunks", i.len()));
            }
        }
        Ok(Transfer {
            have: vec![0; chunks.div_ceil(8) as usize],
            object,
            digests: index,
            present: 0,
            received: 0,
        })
    }

    pub fn chunks(&self) -> u64 {
        self.object.chunks()
    }

    pub fn has(&self, i: u64) -> bool {
        i < self.chunks() && self.have[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Chunks not yet present, ascending.
    pub fn missing(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.chunks()).filter(|i| !self.has(*i))
    }

    pub fn complete(&self) -> bool {
        self.present == self.chunks()
    }

    /// Bytes of the chunks present.
    pub fn received_bytes(&self) -> u64 {
        self.received
    }

    /// Check chunk `index`: its place, its length and, with an index, its digest. `Ok(false)`
    /// when it is already present.
    pub fn check(&self, index: u64, bytes: &[u8]) -> Result<bool, ChunkError> {
        let chunks = self.chunks();
        if index >= chunks {
            return Err(ChunkError::OutOfRange { index, chunks });
        }
        let want = rollout::chunk_len(self.object.size, self.object.chunk_bytes, index);
        if bytes.len() as u64 != want {
            return Err(ChunkError::Length {
                index,
                got: bytes.len() as u64,
                want,
            });
        }
        if let Some(d) = &self.digests {
            let at = index as usize * 32;
            if ring::digest::digest(&ring::digest::SHA256, bytes).as_ref() != &d[at..at + 32] {
                return Err(ChunkError::Digest { index });
            }
        }
        Ok(!self.has(index))
    }

    pub fn mark(&mut self, i: u64) {
        if i < self.chunks() && !self.has(i) {
            self.have[(i / 8) as usize] |= 1 << (i % 8);
            self.present += 1;
            self.received += rollout::chunk_len(self.object.size, self.object.chunk_bytes, i);
        }
    }

    /// Take a bitmap as read back from disk; bits past the last chunk are ignored.
    fn restore(&mut self, bits: &[u8]) {
        if bits.len() != self.have.len() {
            return;
        }
        for i in 0..self.chunks() {
            if bits[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                self.mark(i);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the fetched {what} does not match its signed sha256 {want} (got {got})")]
    Digest {
        what: &'static str,
        want: String,
        got: String,
    },
}

impl DownloadError {
    pub fn code(&self) -> &'static str {
        match self {
            DownloadError::Chunk(ChunkError::Digest { .. }) | DownloadError::Digest { .. } => "chunk_corrupt",
            DownloadError::Chunk(_) => "chunk_invalid",
            DownloadError::Io { .. } => "io",
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Chunks written between two syncs of the data and the bitmap.
const SYNC_EVERY: u32 = 32;

/// A bundle being fetched to disk.
pub struct Download {
    pub transfer: Transfer,
    dir: PathBuf,
    part: std::fs::File,
    unsynced: u32,
}

impl Download {
    fn paths(dir: &Path, sha: &str) -> (PathBuf, PathBuf, PathBuf) {
        (
            dir.join(format!("{sha}.part")),
            dir.join(format!("{sha}.have")),
            dir.join(format!("{sha}.index")),
        )
    }

    /// The chunk index kept from an earlier run, if it is still the signed one.
    pub fn saved_index(dir: &Path, object: &BlobRef) -> Option<Vec<u8>> {
        let (_, _, index) = Self::paths(dir, &object.sha256);
        let bytes = std::fs::read(index).ok()?;
        (protocol::sha256_hex(&bytes) == object.index_sha256).then_some(bytes)
    }

    /// Open (or resume) the download of `object` with its verified chunk index. Any other
    /// download in `dir` is removed: one bundle is fetched at a time.
    pub fn open(dir: &Path, object: &BlobRef, index: Vec<u8>) -> Result<Download, DownloadError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (part_path, have_path, index_path) = Self::paths(dir, &object.sha256);
        for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&object.sha256) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if Self::saved_index(dir, object).is_none() {
            write_replace(&index_path, &index)?;
        }
        let mut transfer = Transfer::new(object.clone(), Some(index)).map_err(|m| DownloadError::Digest {
            what: "chunk index",
            want: object.index_sha256.clone(),
            got: m,
        })?;
        let part = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part_path)
            .map_err(io(&part_path))?;
        let len = part.metadata().map_err(io(&part_path))?.len();
        if len == object.size {
            if let Ok(bits) = std::fs::read(&have_path) {
                transfer.restore(&bits);
            }
        } else {
            part.set_len(object.size).map_err(io(&part_path))?;
        }
        Ok(Download {
            transfer,
            dir: dir.to_path_buf(),
            part,
            unsynced: 0,
        })
    }

    /// Check and write chunk `index`. `Ok(false)` when it was already present.
    pub fn write(&mut self, index: u64, bytes: &[u8]) -> Result<bool, DownloadError> {
        if !self.transfer.check(index, bytes)? {
            return Ok(false);
        }
        let (part_path, _, _) = Self::paths(&self.dir, &self.transfer.object.sha256);
        let at = index * self.transfer.object.chunk_bytes as u64;
        self.part.write_all_at(bytes, at).map_err(io(&part_path))?;
        self.transfer.mark(index);
        self.unsynced += 1;
        if self.unsynced >= SYNC_EVERY || self.transfer.complete() {
            self.sync()?;
        }
        Ok(true)
    }

    /// Make the chunks written so far durable, then record them as present.
    pub fn sync(&mut self) -> Result<(), DownloadError> {
        if self.unsynced == 0 {
            return Ok(());
        }
        let (part_path, have_path, _) = Self::paths(&self.dir, &self.transfer.object.sha256);
        self.part.sync_data().map_err(io(&part_path))?;
        write_replace(&have_path, &self.transfer.have)?;
        self.unsynced = 0;
        Ok(())
    }

    /// The complete file, checked whole against its signed digest.
    pub fn finish(mut self) -> Result<PathBuf, DownloadError> {
        self.sync()?;
        let (part_path, _, _) = Self::paths(&self.dir, &self.transfer.object.sha256);
        let got = sha256_file(&part_path).map_err(io(&part_path))?;
        if got != self.transfer.object.sha256 {
            let _ = std::fs::remove_file(Self::paths(&self.dir, &self.transfer.object.sha256).1);
            return Err(DownloadError::Digest {
                what: "bundle",
                want: self.transfer.object.sha256.clone(),
                got,
            });
        }
        Ok(part_path)
    }

    /// Remove every download in `dir`.
    pub fn clear(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The SHA-256 of a file, read in pieces.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(protocol::hex(ctx.finish().as_ref()))
}

fn write_replace(path: &Path, bytes: &[u8]) -> Result<(), DownloadError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_data().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The desired state the device follows now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Following {
    pub topic: String,
    pub counter: u64,
    /// SHA-256 of its signed body.
    pub digest: String,
    pub model: DesiredModel,
}

/// What the device keeps about rollouts, in its store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    /// The highest counter accepted per desired-state topic.
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
    #[serde(default)]
    pub following: Option<Following>,
    /// Why the last desired state could not be applied, until another one is.
    #[serde(default)]
    pub error: Option<ReportedError>,
}

/// What a verified desired state means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A newer one than followed: follow it.
    Follow(Following),
    /// The one followed now, again (a retained copy at reconnect): carry on.
    Same,
    /// Older than the one followed, from another topic (a group's, while the device's own is
    /// newer): not an error, nothing to do.
    Superseded { counter: u64, following: u64 },
    /// The counter followed now, with another body.
    Conflict { counter: u64 },
}

impl RolloutState {
    /// The highest counter accepted from `topic`.
    pub fn last_counter(&self, topic: &str) -> Option<u64> {
        self.counters.get(topic).copied()
    }

    /// Decide on a desired state verified against `last_counter(topic)`.
    pub fn decide(&self, topic: &str, v: &VerifiedDesired) -> Decision {
        let counter = v.desired.counter;
        match &self.following {
            Some(f) if f.counter == counter && f.digest == v.digest => Decision::Same,
            Some(f) if f.counter == counter => Decision::Conflict { counter },
            Some(f) if f.counter > counter => Decision::Superseded {
                counter,
                following: f.counter,
            },
            _ => Decision::Follow(Following {
                topic: topic.to_string(),
                counter,
                digest: v.digest.clone(),
                model: v.desired.model.clone(),
            }),
        }
    }

    /// Record that `f` is followed from now on.
    pub fn follow(&mut self, f: Following) {
        let c = self.counters.entry(f.topic.clone()).or_insert(0);
        *c = (*c).max(f.counter);
        self.following = Some(f);
        self.error = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::rollout::{describe, Desired, Targets, DESIRED_FORMAT};

    fn object(size: usize, chunk: u32) -> (Vec<u8>, BlobRef, Vec<u8>) {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
        let (r, index) = describe(&bytes, chunk);
        (bytes, r, index)
    }

    #[test]
    fn chunks_are_checked_before_they_count() {
        let (bytes, r, index) = object(5000, 1024);
        let mut t = Transfer::new(r.clone(), Some(index.clone())).expect("transfer");
        assert_eq!(t.chunks(), 5);
        assert_eq!(t.check(4, &bytes[4096..]), Ok(true));
        assert_eq!(
            t.check(4, &bytes[4095..]),
            Err(ChunkError::Length {
                index: 4,
                got: 905,
                want: 904
            })
        );
        let mut bad = bytes[..1024].to_vec();
        bad[3] ^= 1;
        assert_eq!(t.check(0, &bad), Err(ChunkError::Digest { index: 0 }));
        assert_eq!(t.check(5, &[]), Err(ChunkError::OutOfRange { index: 5, chunks: 5 }));
        t.mark(0);
        t.mark(0);
        assert_eq!(t.check(0, &bytes[..1024]), Ok(false), "a repeat is not new");
        assert_eq!(t.missing().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(t.received_bytes(), 1024);
        assert!(Transfer::new(r, Some(index[..64].to_vec())).is_err(), "a short index");
    }

    #[test]
    fn a_download_resumes_with_only_the_missing_chunks() {
        let dir = tempfile::tempdir().expect("tmp");
        let (bytes, r, index) = object(10_000, 1024);
        let chunk = |i: u64| &bytes[(i as usize * 1024)..((i as usize + 1) * 1024).min(bytes.len())];
        {
            let mut d = Download::open(dir.path(), &r, index.clone()).expect("open");
            for i in [0, 3, 9] {
                assert!(d.write(i, chunk(i)).expect("write"));
            }
            d.sync().expect("sync");
            // Written after the last sync and never synced: a power cut forgets it.
            d.write(5, chunk(5)).expect("write");
        }
        assert_eq!(Download::saved_index(dir.path(), &r), Some(index.clone()));
        let mut d = Download::open(dir.path(), &r, index).expect("reopen");
        assert_eq!(d.transfer.missing().collect::<Vec<_>>(), vec![1, 2, 4, 5, 6, 7, 8]);
        assert_eq!(
            d.transfer.received_bytes(),
            1024 + 1024 + 784,
            "chunks 0, 3 and the short 9"
        );
        let mut bad = chunk(1).to_vec();
        bad[0] ^= 0xff;
        assert_eq!(d.write(1, &bad).expect_err("corrupt").code(), "chunk_corrupt");
        for i in d.transfer.missing().collect::<Vec<_>>() {
            d.write(i, chunk(i)).expect("write");
        }
        let path = d.finish().expect("complete");
        assert_eq!(std::fs::read(path).expect("read"), bytes);
    }

    #[test]
    fn opening_another_download_removes_the_old_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let (_, a, ai) = object(3000, 1024);
        let (_, b, bi) = object(4000, 1024);
        Download::open(dir.path(), &a, ai).expect("a");
        Download::open(dir.path(), &b, bi).expect("b");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.starts_with(&b.sha256)), "{names:?}");
    }

    fn verified(counter: u64, version: u64) -> VerifiedDesired {
        let (_, bundle, _) = object(100, 1024);
        let desired = Desired {
            format: DESIRED_FORMAT,
            fleet: "f".into(),
            targets: Targets {
                devices: vec!["d".into()],
                group: None,
            },
            counter,
            created: 1,
            expires: 2,
            model: DesiredModel {
                name: "m".into(),
                version,
                rollback: false,
                bundle,
            },
            slot: None,
        };
        VerifiedDesired {
            digest: protocol::sha256_hex(&desired.canonical_bytes()),
            desired,
            signed_by: vec![],
        }
    }

    #[test]
    fn a_chunk_topic_is_unsubscribed_when_no_slot_waits_on_it() {
        let subs = ChunkSubs::default();
        subs.hold("t");
        subs.hold("t");
        assert!(!subs.release("t"), "another slot still waits on it");
        assert!(subs.held("t"));
        assert!(subs.release("t"));
        assert!(!subs.held("t"));
        assert!(subs.release("unknown"), "a topic nobody holds may go");
    }

    #[test]
    fn the_newest_desired_state_is_followed() {
        let mut s = RolloutState::default();
        let Decision::Follow(f) = s.decide("dev", &verified(5, 1)) else {
            panic!("a first one is followed")
        };
        s.follow(f);
        assert_eq!(s.decide("dev", &verified(5, 1)), Decision::Same);
        assert_eq!(s.decide("dev", &verified(5, 2)), Decision::Conflict { counter: 5 });
        assert_eq!(
            s.decide("group", &verified(4, 2)),
            Decision::Superseded {
                counter: 4,
                following: 5
            }
        );
        let Decision::Follow(f) = s.decide("group", &verified(6, 2)) else {
            panic!("a newer one from the group is followed")
        };
        s.follow(f);
        assert_eq!(s.last_counter("dev"), Some(5));
        assert_eq!(s.last_counter("group"), Some(6));
    }
}

// ---------------------------------------------------------------------------------------------
// The task's side: what the deploy task does with desired states and chunks.

use crate::deploy::{event, Deployer, Events};
use protocol::messages::Level;
use protocol::rollout::{DesiredPolicy, Phase, Reported, ReportedModel, Staged};
use rumqttc::{AsyncClient, QoS};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// A message for the rollout side of the deploy task: a desired state or a chunk.
#[derive(Debug)]
pub struct RolloutMessage {
    pub topic: String,
    pub payload: bytes::Bytes,
}

/// Rollout settings (`[rollout]`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub groups: Vec<String>,
    /// Chunks requested at once.
    pub window: usize,
    /// A requested chunk that does not come within this is requested again, twice, and then
    /// the transfer fails (`chunk_missing`) until `retry`.
    pub chunk_timeout: Duration,
    pub retry: Duration,
    pub dir: PathBuf,
    /// The largest chunk this device's hub connection takes (`broker.max_packet_bytes`, less
    /// room for the topic).
    pub max_chunk_bytes: u64,
    /// How a newly activated model is watched; `None`: it is committed at activation.
    pub watch: Option<crate::trial::Rules>,
    /// Where an accepted key set is kept (SPEC §8.7).
    pub keyset_path: PathBuf,
    /// The model slot this driver follows desired states for (SPEC §8.8); `None`: the default
    /// slot.
    pub slot: Option<String>,
    /// Whether the device's retained state (SPEC §3.1) names this slot's model: the first
    /// slot's.
    pub announces: bool,
}

/// Tries of one chunk (a timeout or a corrupt copy) before the transfer fails.
const CHUNK_TRIES: u32 = 3;

enum Fetch {
    /// The chunk index, checked whole by its signed digest once complete.
    Index {
        transfer: Transfer,
        bytes: Vec<u8>,
    },
    Bundle(Download),
}

struct Job {
    model: DesiredModel,
    counter: u64,
    fetch: Fetch,
    /// Chunks subscribed to and not yet received: when, and how many tries so far.
    requested: BTreeMap<u64, (Instant, u32)>,
    /// Corrupt copies seen per chunk.
    corrupt: BTreeMap<u64, u32>,
}

impl Job {
    fn object(&self) -> &str {
        match &self.fetch {
            Fetch::Index { transfer, .. } => &transfer.object.sha256,
            Fetch::Bundle(d) => &d.transfer.object.sha256,
        }
    }

    fn transfer(&self) -> &Transfer {
        match &self.fetch {
            Fetch::Index { transfer, .. } => transfer,
            Fetch::Bundle(d) => &d.transfer,
        }
    }
}

/// A failure to apply the followed desired state.
struct Failure {
    code: String,
    message: String,
    /// Try again after `Settings::retry` (a transfer problem), or not (the bundle itself).
    retry: bool,
}

/// A transfer problem: tried again after `Settings::retry`.
impl From<DownloadError> for Failure {
    fn from(e: DownloadError) -> Failure {
        Failure {
            code: e.code().into(),
            message: e.to_string(),
            retry: true,
        }
    }
}

/// A model in its watch period.
struct Watching {
    model: std::sync::Arc<crate::deploy::ActiveModel>,
    /// The desired state it was activated for.
    counter: u64,
    ends: Instant,
    ends_ms: u64,
    rules: crate::trial::Rules,
}

/// The chunk topics the device's slots wait on, and how many slots wait on each. Subscriptions
/// belong to the one hub connection, not to a slot: a slot unsubscribes only from a topic no
/// other slot waits on.
#[derive(Debug, Clone, Default)]
pub struct ChunkSubs(std::sync::Arc<std::sync::Mutex<BTreeMap<String, usize>>>);

impl ChunkSubs {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One more slot waits on `topic`.
    fn hold(&self, topic: &str) {
        *self.map().entry(topic.to_string()).or_insert(0) += 1;
    }

    /// One slot no longer waits on `topic`; whether none does now.
    fn release(&self, topic: &str) -> bool {
        let mut m = self.map();
        match m.get_mut(topic) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                m.remove(topic);
                true
            }
        }
    }

    /// Whether any slot waits on `topic`.
    fn held(&self, topic: &str) -> bool {
        self.map().contains_key(topic)
    }
}

/// How often the reported state is refreshed while a model is watched.
const WATCH_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The rollout side of the deploy task.
pub struct Driver {
    pub settings: Settings,
    pub fleet: protocol::Name,
    pub device: protocol::Name,
    pub client: AsyncClient,
    pub state: RolloutState,
    phase: Phase,
    job: Option<Job>,
    retry_at: Option<Instant>,
    report_due: bool,
    last_report: Option<Instant>,
    watching: Option<Watching>,
    /// Why the last key set was refused, until one is accepted.
    keys_error: Option<ReportedError>,
    /// The chunk topics every slot's driver waits on (shared by the device's drivers).
    pub chunk_subs: ChunkSubs,
}

impl Driver {
    pub fn new(
        settings: Settings,
        fleet: protocol::Name,
        device: protocol::Name,
        client: AsyncClient,
        state: RolloutState,
    ) -> Driver {
        let phase = if state.error.is_some() {
            Phase::Failed
        } else {
            Phase::Idle
        };
        Driver {
            settings,
            fleet,
            device,
            client,
            state,
            phase,
            job: None,
            retry_at: None,
            report_due: true,
            last_report: None,
            watching: None,
            keys_error: None,
            chunk_subs: ChunkSubs::default(),
        }
    }

    /// At start-up: a model whose watch period a stop interrupted was rolled back from (the
    /// error says so, and it is not tried again for the same desired state); one with nothing
    /// to return to is watched again from the start.
    pub fn resume(&mut self, d: &mut Deployer) {
        if let Some(w) = d.interrupted.take() {
            self.phase = Phase::Failed;
            self.state.error = Some(ReportedError {
                code: "watch_interrupted".into(),
                message: format!(
                    "{} v{} had not finished its watch period when the agent stopped; the previous model runs",
                    w.name, w.version
                ),
                counter: self.state.following.as_ref().map(|f| f.counter),
            });
            self.persist(d);
        } else if d.state.watching && self.settings.watch.is_none() {
            // Watching was turned off (rollout.watch.secs = 0) while a model had nothing to
            // return to: it is committed.
            if let Err(e) = d.commit() {
                warn!(error = %e, "cannot commit the active model");
            }
        } else if d.state.watching {
            let counter = self.state.following.as_ref().map_or(0, |f| f.counter);
            self.begin_watch(d, counter);
        }
    }

    /// The topics a slot's desired states come on: the device's own and its groups', with the
    /// slot's name added for a named slot (SPEC §8.8).
    pub fn desired_topics(fleet: &str, device: &str, groups: &[String], slot: Option<&str>) -> Vec<String> {
        std::iter::once(rollout::device_desired_topic(fleet, device))
            .chain(groups.iter().map(|g| rollout::group_desired_topic(fleet, g)))
            .map(|t| rollout::slot_topic(t, slot))
            .collect()
    }

    /// Whether desired states on `topic` are for this driver's slot.
    pub fn follows(&self, topic: &str) -> bool {
        Driver::desired_topics(
            self.fleet.as_str(),
            self.device.as_str(),
            &self.settings.groups,
            self.settings.slot.as_deref(),
        )
        .iter()
        .any(|t| t == topic)
    }

    /// Another slot's driver accepted or refused a key set: report the same.
    pub fn share_keys_error(&mut self, e: Option<ReportedError>) {
        self.keys_error = e;
        self.report_due = true;
    }

    /// Whether this driver is fetching `object` (a bundle or its chunk index).
    pub fn fetches(&self, object: &str) -> bool {
        self.job.as_ref().is_some_and(|j| j.object() == object)
    }

    /// Why the last key set was refused, if it was.
    pub fn keys_error(&self) -> Option<&ReportedError> {
        self.keys_error.as_ref()
    }

    pub async fn on_message(&mut self, d: &mut Deployer, events: &Events, m: RolloutMessage) {
        if let Some((object, index)) = rollout::parse_chunk_topic(self.fleet.as_str(), &m.topic) {
            let object = object.to_string();
            self.on_chunk(d, events, &object, index, &m.payload).await;
        } else if m.topic == protocol::keyset::keys_topic(self.fleet.as_str()) {
            self.on_keys(d, events, &m.payload).await;
        } else {
            self.on_desired(d, events, &m.topic, &m.payload).await;
        }
    }

    /// A key set (SPEC §8.7): accepted only when the keys in force sign it to their threshold
    /// and its counter is above the one in force; the same one again (a retained copy at
    /// reconnect) is nothing new.
    async fn on_keys(&mut self, d: &mut Deployer, events: &Events, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        let last = d.key_set.as_ref().map(|k| k.counter);
        let verdict = protocol::keyset::verify_key_set(payload, &d.trust, d.threshold, self.fleet.as_str(), last);
        match verdict {
            Ok(v) => {
                let path = self.settings.keyset_path.clone();
                match tokio::task::block_in_place(|| d.accept_key_set(v, &path)) {
                    Ok(msg) => {
                        info!(%msg, "trust store replaced");
                        self.set_keys_error(d, None);
                        events.emit(event(Level::Warn, "keys_updated", msg)).await;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot keep the key set; the keys in force stay");
                        self.keys_error = Some(ReportedError {
                            code: e.code(),
                            message: e.to_string(),
                            counter: None,
                        });
                    }
                }
            }
            Err(protocol::keyset::KeySetError::Replayed { counter, last }) if counter == last => {
                debug!(counter, "the key set in force, again");
                return;
            }
            Err(e) => {
                warn!(code = e.code(), error = %e, "key set refused");
                let refused = ReportedError {
                    code: e.code().into(),
                    message: e.to_string(),
                    counter: counter_of(payload),
                };
                self.set_keys_error(d, Some(refused));
                events
                    .emit(event(Level::Error, "keys_refused", format!("key set refused: {e}")))
                    .await;
            }
        }
        self.report_due = true;
    }

    /// Record why the last key set was refused (or that none is), for the reported state and
    /// `lathe status`.
    fn set_keys_error(&mut self, d: &mut Deployer, e: Option<ReportedError>) {
        let text = e
            .as_ref()
            .map(|e| format!("({}) {}", e.code, e.message))
            .unwrap_or_default();
        if let Err(err) = d.store.set_meta("keys_error", &text) {
            warn!(error = %err, "cannot record the key set's refusal");
        }
        self.keys_error = e;
    }

    async fn on_desired(&mut self, d: &mut Deployer, events: &Events, topic: &str, payload: &[u8]) {
        if payload.is_empty() {
            debug!(topic, "desired state cleared");
            return;
        }
        let active = d.current();
        let verdict = {
            let policy = DesiredPolicy {
                trust: &d.trust,
                threshold: d.threshold,
                now: crate::sync::now_ms() / 1000,
                fleet: self.fleet.as_str(),
                device: self.device.as_str(),
                groups: &self.settings.groups,
                slot: self.settings.slot.as_deref(),
                last_counter: self.state.last_counter(topic),
                high_water: &|n: &str| d.state.installed_version(n),
                active: &|n: &str| active.as_ref().filter(|a| a.name == n).map(|a| a.version),
                max_bundle_bytes: d.max_bundle_bytes as u64,
            };
            rollout::verify_desired(payload, &policy)
        };
        let v = match verdict {
            Ok(v) => v,
            Err(e) => {
                warn!(topic, code = e.code(), error = %e, "desired state refused");
                self.state.error = Some(ReportedError {
                    code: e.code().into(),
                    message: e.to_string(),
                    counter: counter_of(payload),
                });
                self.persist(d);
                self.report_due = true;
                events
                    .emit(event(
                        Level::Error,
                        "deploy_refused",
                        format!("desired state refused: {e}"),
                    ))
                    .await;
                return;
            }
        };
        match self.state.decide(topic, &v) {
            Decision::Follow(f) => {
                info!(topic, counter = f.counter, model = %f.model.name, version = f.model.version,
                    rollback = f.model.rollback, "following a new desired state");
                self.stop_job().await;
                self.state.follow(f);
                self.persist(d);
                self.apply(d, events).await;
            }
            Decision::Same => {
                // A retained copy at reconnect or start-up: resume, unless the bundle itself
                // failed (fetching it again would fail again).
                let failed_for_good = self
                    .state
                    .error
                    .as_ref()
                    .is_some_and(|e| !retryable(&e.code) && e.counter == Some(v.desired.counter));
                if self.job.is_none() && self.retry_at.is_none() && !failed_for_good {
                    self.apply(d, events).await;
                }
            }
            Decision::Superseded { counter, following } => {
                debug!(topic, counter, following, "desired state superseded by a newer one");
            }
            Decision::Conflict { counter } => {
                let e = rollout::DesiredError::Replayed { counter, last: counter };
                warn!(
                    topic,
                    counter, "a different desired state under a counter already followed; refused"
                );
                self.state.error = Some(ReportedError {
                    code: e.code().into(),
                    message: format!(
                        "desired state #{counter} differs from the one already followed under that counter"
                    ),
                    counter: Some(counter),
                });
                self.persist(d);
                self.report_due = true;
            }
        }
    }

    /// Bring the device to the followed desired state: nothing, a switch back to the previous
    /// bundle, or a fetch.
    async fn apply(&mut self, d: &mut Deployer, events: &Events) {
        let Some(f) = self.state.following.clone() else { return };
        let m = &f.model;
        let runs = |x: &Option<crate::deploy::Installed>| {
            x.as_ref().is_some_and(|i| i.name == m.name && i.version == m.version)
        };
        self.retry_at = None;
        if runs(&d.state.active) && d.current().is_some() {
            if d.state.watching {
                // Still in its watch period: the watch decides.
                if self.watching.is_none() {
                    self.begin_watch(d, f.counter);
                }
                return;
            }
            self.done(None);
            return;
        }
        if runs(&d.state.previous) {
            self.phase = Phase::Activating;
            let result = tokio::task::block_in_place(|| d.rollback());
            match result {
                Ok(msg) => {
                    info!(%msg, "switched to the previous bundle");
                    self.publish_state(d.current()).await;
                    events.emit(event(Level::Warn, "rolled_back", msg)).await;
                    self.done(Some(d));
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "the previous bundle cannot run; fetching the desired one");
                }
            }
        }
        let blob = &m.bundle;
        if blob.chunk_bytes as u64 > self.settings.max_chunk_bytes {
            let fail = Failure {
                code: "too_large".into(),
                message: format!(
                    "chunks of {} bytes do not fit this device's broker.max_packet_bytes (at most {} per chunk)",
                    blob.chunk_bytes, self.settings.max_chunk_bytes
                ),
                retry: false,
            };
            self.fail(d, events, fail).await;
            return;
        }
        let fetch = match Download::saved_index(&self.settings.dir, blob) {
            Some(index) => match Download::open(&self.settings.dir, blob, index) {
                Ok(dl) => {
                    log_chunks(&dl);
                    Fetch::Bundle(dl)
                }
                Err(e) => {
                    self.fail(d, events, e.into()).await;
                    return;
                }
            },
            None => {
                let object = blob.index_object();
                Fetch::Index {
                    bytes: vec![0; object.size as usize],
                    transfer: Transfer::new(object, None).expect("no index to check"),
                }
            }
        };
        info!(model = %m.name, version = m.version, bytes = blob.size, "fetching the bundle");
        self.job = Some(Job {
            model: m.clone(),
            counter: f.counter,
            fetch,
            requested: BTreeMap::new(),
            corrupt: BTreeMap::new(),
        });
        self.phase = Phase::Downloading;
        self.report_due = true;
        self.request_more().await;
        if self.job.as_ref().is_some_and(|j| j.transfer().complete()) {
            self.next_stage(d, events).await;
        }
    }

    /// Subscribe to missing chunks up to the window. Each is retained at the broker, which
    /// sends it on the subscription.
    async fn request_more(&mut self) {
        let Some(job) = self.job.as_mut() else { return };
        let room = self.settings.window.saturating_sub(job.requested.len());
        let wanted: Vec<u64> = job
            .transfer()
            .missing()
            .filter(|i| !job.requested.contains_key(i))
            .take(room)
            .collect();
        let object = job.object().to_string();
        for i in wanted {
            job.requested.insert(i, (Instant::now(), 1));
            let topic = rollout::chunk_topic(self.fleet.as_str(), &object, i);
            self.chunk_subs.hold(&topic);
            if let Err(e) = self.client.subscribe(topic, QoS::AtLeastOnce).await {
                warn!(error = %e, "cannot subscribe to a chunk");
            }
        }
    }

    async fn on_chunk(&mut self, d: &mut Deployer, events: &Events, object: &str, index: u64, bytes: &[u8]) {
        let topic = rollout::chunk_topic(self.fleet.as_str(), object, index);
        let Some(job) = self.job.as_mut().filter(|j| j.object() == object) else {
            debug!(%topic, "chunk of no transfer in progress; ignored");
            if !self.chunk_subs.held(&topic) {
                let _ = self.client.unsubscribe(topic).await;
            }
            return;
        };
        let Some((_, tries)) = job.requested.remove(&index) else {
            // Not asked for (a repeat, or someone else's request): nothing to do.
            return;
        };
        if self.chunk_subs.release(&topic) {
            let _ = self.client.unsubscribe(topic).await;
        }
        let result = match &mut job.fetch {
            Fetch::Index { transfer, bytes: buf } => transfer.check(index, bytes).map(|new| {
                if new {
                    let at = (index * transfer.object.chunk_bytes as u64) as usize;
                    buf[at..at + bytes.len()].copy_from_slice(bytes);
                    transfer.mark(index);
                }
            }),
            Fetch::Bundle(dl) => match dl.write(index, bytes) {
                Ok(_) => Ok(()),
                Err(DownloadError::Chunk(c)) => Err(c),
                Err(e) => {
                    self.fail(d, events, e.into()).await;
                    return;
                }
            },
        };
        if let Err(e) = result {
            let seen = job.corrupt.entry(index).or_insert(0);
            *seen += 1;
            warn!(error = %e, copies = *seen, "a chunk was refused");
            if *seen >= CHUNK_TRIES {
                let fail = Failure {
                    code: "chunk_corrupt".into(),
                    message: format!(
                        "{e}, {seen} times: the copy at the broker is not the one the hub signed; publish the bundle again (lathe-hub deploy)"
                    ),
                    retry: true,
                };
                self.fail(d, events, fail).await;
                return;
            }
            job.requested.insert(index, (Instant::now(), tries + 1));
            let topic = rollout::chunk_topic(self.fleet.as_str(), object, index);
            self.chunk_subs.hold(&topic);
            let _ = self.client.subscribe(topic, QoS::AtLeastOnce).await;
            return;
        }
        self.report_due = true;
        if self.job.as_ref().is_some_and(|j| j.transfer().complete()) {
            self.next_stage(d, events).await;
        } else {
            self.request_more().await;
        }
    }

    /// A fetch completed: the index leads to the bundle, the bundle to its activation.
    async fn next_stage(&mut self, d: &mut Deployer, events: &Events) {
        let Some(mut job) = self.job.take() else { return };
        match job.fetch {
            Fetch::Index { transfer, bytes } => {
                let got = protocol::sha256_hex(&bytes);
                let blob = job.model.bundle.clone();
                if got != blob.index_sha256 {
                    let fail = Failure {
                        code: "chunk_corrupt".into(),
                        message: format!(
                            "the chunk index at the broker does not match the signed one ({got}); publish the bundle again (lathe-hub deploy)"
                        ),
                        retry: true,
                    };
                    drop(transfer);
                    self.fail(d, events, fail).await;
                    return;
                }
                match Download::open(&self.settings.dir, &blob, bytes) {
                    Ok(dl) => {
                        log_chunks(&dl);
                        job.fetch = Fetch::Bundle(dl);
                        job.requested.clear();
                        let complete = job.transfer().complete();
                        self.job = Some(job);
                        if complete {
                            Box::pin(self.next_stage(d, events)).await;
                        } else {
                            self.request_more().await;
                        }
                    }
                    Err(e) => {
                        self.fail(d, events, e.into()).await;
                    }
                }
            }
            Fetch::Bundle(dl) => {
                self.phase = Phase::Activating;
                self.publish_report(d);
                let path = match tokio::task::block_in_place(|| dl.finish()) {
                    Ok(p) => p,
                    Err(e) => {
                        self.fail(d, events, e.into()).await;
                        return;
                    }
                };
                let now = crate::sync::now_ms() / 1000;
                let watch = self.settings.watch;
                let result = tokio::task::block_in_place(|| d.deploy_file(&path, now, &job.model, watch.as_ref()));
                Download::clear(&self.settings.dir);
                match result {
                    Ok(msg) => {
                        info!(%msg, counter = job.counter, "desired state applied");
                        self.publish_state(d.current()).await;
                        let kind = if job.model.rollback {
                            (Level::Warn, "rolled_back")
                        } else {
                            (Level::Info, "model_activated")
                        };
                        events.emit(event(kind.0, kind.1, msg)).await;
                        if d.state.watching {
                            self.begin_watch(d, job.counter);
                        } else {
                            self.watching = None;
                            self.done(Some(d));
                        }
                    }
                    Err(e) => {
                        let fail = Failure {
                            code: e.code(),
                            message: e.to_string(),
                            retry: false,
                        };
                        self.fail(d, events, fail).await;
                    }
                }
            }
        }
    }

    /// Watch the active model for the configured period (SPEC §8.4).
    fn begin_watch(&mut self, d: &mut Deployer, counter: u64) {
        let (Some(rules), Some(model)) = (self.settings.watch, d.active.load_full()) else {
            return;
        };
        info!(model = %model.manifest.name, version = model.manifest.version,
            secs = rules.period.as_secs(), "watching the new model");
        self.watching = Some(Watching {
            model,
            counter,
            ends: Instant::now() + rules.period,
            ends_ms: crate::sync::now_ms() + rules.period.as_millis() as u64,
            rules,
        });
        self.phase = Phase::Watching;
        self.job = None;
        self.retry_at = None;
        if self.state.error.take().is_some() {
            self.persist(d);
        }
        self.report_due = true;
    }

    /// Judge the watched model: commit it at the end of its period, or roll back to the
    /// previous model as soon as it breaks a rule.
    async fn judge_watch(&mut self, d: &mut Deployer, events: &Events) {
        let Some(w) = &self.watching else { return };
        let still_active = d
            .active
            .load_full()
            .is_some_and(|a| std::sync::Arc::ptr_eq(&a, &w.model));
        if !d.state.watching || !still_active {
            // Switched away from it (a signed rollback): nothing left to watch.
            self.watching = None;
            return;
        }
        let now = Instant::now();
        let counts = w.model.trial.counts();
        let end = now >= w.ends;
        let (name, version, counter) = (w.model.manifest.name.clone(), w.model.manifest.version, w.counter);
        match crate::trial::judge(&counts, &w.rules, end) {
            Ok(()) if end => {
                if let Err(e) = tokio::task::block_in_place(|| d.commit()) {
                    warn!(error = %e, "cannot commit the watched model; trying again");
                    return;
                }
                let msg = format!(
                    "{name} v{version} passed its watch period ({})",
                    crate::trial::summary(&counts)
                );
                info!(%msg, "model committed");
                events.emit(event(Level::Info, "model_committed", msg)).await;
                self.watching = None;
                // Settled, unless a newer desired state is followed meanwhile: its fetch, its
                // failure and its retry stay as they are.
                let settled = self
                    .state
                    .following
                    .as_ref()
                    .is_none_or(|f| f.model.name == name && f.model.version == version);
                if settled && self.job.is_none() {
                    self.done(Some(d));
                } else {
                    self.report_due = true;
                }
            }
            Ok(()) => {
                if self
                    .last_report
                    .is_none_or(|t| now.duration_since(t) >= WATCH_REPORT_EVERY)
                {
                    self.report_due = true;
                }
            }
            Err(reason) => {
                self.watching = None;
                let result = tokio::task::block_in_place(|| d.rollback());
                let message = match &result {
                    Ok(msg) => {
                        self.publish_state(d.current()).await;
                        format!("{name} v{version} failed its watch period: {reason}; rolled back ({msg})")
                    }
                    Err(e) => {
                        // Nothing to return to: it keeps running, and no longer watched.
                        if let Err(e) = tokio::task::block_in_place(|| d.commit()) {
                            warn!(error = %e, "cannot record the end of the watch");
                        }
                        format!("{name} v{version} failed its watch period: {reason}; it keeps running: {e}")
                    }
                };
                warn!(%message, "watch failed");
                events.emit(event(Level::Error, "watch_failed", message.clone())).await;
                if self.job.is_none() {
                    self.phase = Phase::Failed;
                }
                self.state.error = Some(ReportedError {
                    code: "watch_failed".into(),
                    message,
                    counter: Some(counter),
                });
                self.persist(d);
                self.report_due = true;
            }
        }
    }

    fn done(&mut self, d: Option<&mut Deployer>) {
        self.phase = Phase::Idle;
        self.job = None;
        self.retry_at = None;
        if self.state.error.take().is_some() {
            if let Some(d) = d {
                self.persist(d);
            }
        }
        self.report_due = true;
    }

    async fn fail(&mut self, d: &mut Deployer, events: &Events, f: Failure) {
        self.stop_job().await;
        warn!(code = %f.code, message = %f.message, retry = f.retry, "desired state not applied");
        self.phase = Phase::Failed;
        self.state.error = Some(ReportedError {
            code: f.code.clone(),
            message: f.message.clone(),
            counter: self.state.following.as_ref().map(|x| x.counter),
        });
        self.retry_at = f.retry.then(|| Instant::now() + self.settings.retry);
        self.persist(d);
        self.report_due = true;
        events
            .emit(event(
                Level::Error,
                "deploy_refused",
                format!("{}: {}", f.code, f.message),
            ))
            .await;
    }

    /// Forget the chunks `job` waits on; the topics of those no slot waits on any more, to
    /// unsubscribe from.
    fn release_requested(&self, job: &mut Job) -> Vec<String> {
        let object = job.object().to_string();
        std::mem::take(&mut job.requested)
            .into_keys()
            .map(|i| rollout::chunk_topic(self.fleet.as_str(), &object, i))
            .filter(|topic| self.chunk_subs.release(topic))
            .collect()
    }

    /// Drop the job in progress, keeping what it fetched on disk.
    async fn stop_job(&mut self) {
        if let Some(mut job) = self.job.take() {
            for topic in self.release_requested(&mut job) {
                let _ = self.client.unsubscribe(topic).await;
            }
            if let Fetch::Bundle(mut dl) = job.fetch {
                let _ = tokio::task::block_in_place(|| dl.sync());
            }
        }
    }

    /// Every second: chunks that did not come are asked for again, a failed transfer is tried
    /// again when due, and progress is reported.
    pub async fn tick(&mut self, d: &mut Deployer, events: &Events) {
        let now = Instant::now();
        if let Some(job) = self.job.as_mut() {
            let late: Vec<(u64, u32)> = job
                .requested
                .iter()
                .filter(|(_, (at, _))| now.duration_since(*at) >= self.settings.chunk_timeout)
                .map(|(i, (_, tries))| (*i, *tries))
                .collect();
            if let Some((i, _)) = late.iter().find(|(_, tries)| *tries >= CHUNK_TRIES) {
                let fail = Failure {
                    code: "chunk_missing".into(),
                    message: format!(
                        "chunk {i} of {} never came from the broker, {CHUNK_TRIES} times: publish the bundle again (lathe-hub deploy), and check that the broker keeps retained messages and lets this device subscribe to lathe/v1/{}/@blob/#",
                        job.object(),
                        self.fleet
                    ),
                    retry: true,
                };
                self.fail(d, events, fail).await;
            } else {
                let object = job.object().to_string();
                for (i, tries) in late {
                    job.requested.insert(i, (now, tries + 1));
                    let topic = rollout::chunk_topic(self.fleet.as_str(), &object, i);
                    let _ = self.client.unsubscribe(topic.clone()).await;
                    let _ = self.client.subscribe(topic, QoS::AtLeastOnce).await;
                }
            }
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            info!("trying the desired state again");
            self.apply(d, events).await;
        }
        self.judge_watch(d, events).await;
        if self.report_due
            && self
                .last_report
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.publish_report(d);
        }
    }

    /// The agent stops: what was fetched is made durable, for the next run.
    pub async fn shutdown(&mut self) {
        self.stop_job().await;
    }

    /// The hub connection is up again: its subscriptions went with the old one.
    pub async fn on_connected(&mut self, d: &mut Deployer) {
        if let Some(mut job) = self.job.take() {
            // Nothing to unsubscribe: the old connection's subscriptions are gone.
            let _ = self.release_requested(&mut job);
            self.job = Some(job);
        }
        self.request_more().await;
        self.publish_report(d);
    }

    pub fn report(&self, d: &Deployer) -> Reported {
        let model = |i: &Option<crate::deploy::Installed>| {
            i.as_ref().map(|i| ReportedModel {
                name: i.name.clone(),
                version: i.version,
            })
        };
        let staged = self.job.as_ref().map(|j| Staged {
            name: j.model.name.clone(),
            version: j.model.version,
            sha256: j.model.bundle.sha256.clone(),
            received_bytes: match &j.fetch {
                Fetch::Index { .. } => 0,
                Fetch::Bundle(dl) => dl.transfer.received_bytes(),
            },
            size: j.model.bundle.size,
        });
        Reported {
            ts_ms: crate::sync::now_ms(),
            counter: self.state.following.as_ref().map_or(0, |f| f.counter),
            phase: self.phase,
            active: model(&d.state.active).filter(|_| d.current().is_some()),
            previous: model(&d.state.previous),
            staged,
            high_water: d.state.high_water.clone(),
            error: self.state.error.clone(),
            warnings: d.policy_warning.iter().cloned().collect(),
            watch: self.watching.as_ref().map(|w| protocol::rollout::WatchReport {
                name: w.model.manifest.name.clone(),
                version: w.model.manifest.version,
                ends_ms: w.ends_ms,
                counts: w.model.trial.counts(),
            }),
            groups: self.settings.groups.clone(),
            key_set: d.key_set.as_ref().map(|k| k.counter),
            keys_error: self.keys_error.clone(),
            slot: self.settings.slot.clone(),
        }
    }

    fn publish_report(&mut self, d: &Deployer) {
        let r = self.report(d);
        let topic = rollout::slot_topic(
            rollout::reported_topic(self.fleet.as_str(), self.device.as_str()),
            self.settings.slot.as_deref(),
        );
        let payload = serde_json::to_vec(&r).expect("a report serializes");
        if self.client.try_publish(topic, QoS::AtLeastOnce, true, payload).is_ok() {
            self.report_due = false;
            self.last_report = Some(Instant::now());
        }
    }

    /// The retained state (SPEC §3.1) names the active model of the first slot.
    async fn publish_state(&self, model: Option<protocol::messages::ModelRef>) {
        if !self.settings.announces {
            return;
        }
        let topic = protocol::Topic::new(&self.fleet, &self.device, protocol::Channel::State);
        let state = crate::deploy::birth(model);
        if let Err(e) = self
            .client
            .publish(topic.to_string(), QoS::AtLeastOnce, true, state)
            .await
        {
            warn!(error = %e, "could not queue the retained state");
        }
    }

    fn persist(&self, d: &mut Deployer) {
        let s = serde_json::to_string(&self.state).expect("rollout state serializes");
        if let Err(e) = d.store.set_meta(&d.key("rollout_state"), &s) {
            warn!(error = %e, "cannot save the rollout state");
        }
    }
}

fn log_chunks(dl: &Download) {
    let t = &dl.transfer;
    info!(
        chunks = t.chunks(),
        missing = t.missing().count(),
        "fetching the bundle's chunks"
    );
}

/// Whether a failure with this code may pass when the same desired state is tried again: a
/// transfer problem, not the bundle itself.
fn retryable(code: &str) -> bool {
    matches!(code, "chunk_corrupt" | "chunk_missing" | "chunk_invalid" | "io")
}

/// The counter of a desired-state or key-set message that was refused, read without trusting
/// it, for the report only.
fn counter_of(payload: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Body {
        counter: u64,
    }
    let body = protocol::bundle::unverified_payload(payload)?;
    serde_json::from_slice::<Body>(&body).ok().map(|b| b.counter)
}
