//! The agent's SQLite store: the outbox of records waiting for the hub, the loss counters,
//! and small state (the epochs, the active and previous bundles, the connection and sync
//! status).
//!
//! Guarantees:
//! - a record is deleted only when an ack from the hub covers it, or when the configured
//!   when-full policy drops it; every drop raises the stream's `lost_through` and is counted
//!   in `losses` in the same transaction, never silent;
//! - every loss (records dropped when full, refused for a full disk or for their size,
//!   readings refused, commands dropped) is counted per stream and cause in `losses`, which
//!   survives restarts; each count is reported to the hub exactly once, as a record of the
//!   `losses` stream written in the same transaction that marks it reported;
//! - each record has a local seq (`seq` in the tables) that starts at 1 per stream and
//!   increases by one, never reused; its wire seq is the local seq minus the base of the
//!   stream's current epoch. Moving to a new epoch (see [`Store::rebase`]) changes no row:
//!   it records a new epoch and base, and a record born in an earlier epoch names its
//!   original identity as its `origin`;
//! - the outbox stays within `max_records`, `max_bytes` of record data, and a free-space
//!   floor on its filesystem; SQLite's own `SQLITE_FULL` is handled by the same policy;
//! - every write is one IMMEDIATE transaction in WAL mode with `synchronous=FULL`, so a power
//!   cut loses at most the transaction in progress, never a committed record, and two writers
//!   never meet a stale snapshot; the WAL file is kept under `max_wal_bytes`.
//!
//! Nothing else in the agent touches SQLite.

use crate::config::WhenFull;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("outbox database {path}: {source}")]
pub struct StoreError {
    pub path: PathBuf,
    #[source]
    pub source: rusqlite::Error,
}

impl StoreError {
    /// SQLite ran out of room (the filesystem, or a page limit).
    pub fn is_full(&self) -> bool {
        self.source.sqlite_error_code() == Some(ErrorCode::DiskFull)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The streams the outbox holds, in the order they are served: events, loss reports and drift
/// windows go before the bulk of samples and predictions when a backlog drains.
pub const STREAMS: [&str; 5] = [
    protocol::streams::EVENTS,
    protocol::streams::LOSSES,
    protocol::streams::DRIFT,
    protocol::streams::SAMPLES,
    protocol::streams::PREDICTIONS,
];

/// Which records make room when the outbox is full, least important first: a new record drops
/// the oldest of the first of these streams that holds any and is no more important than
/// itself, else it is dropped itself. Loss reports are never dropped for room.
const EVICTION_ORDER: [&str; 4] = [
    protocol::streams::SAMPLES,
    protocol::streams::PREDICTIONS,
    protocol::streams::DRIFT,
    protocol::streams::EVENTS,
];

/// Why something was lost: the `cause` of a loss counter.
pub mod cause {
    /// The outbox reached `max_records` or `max_bytes`.
    pub const OUTBOX_FULL: &str = "outbox_full";
    /// The state_dir's filesystem went under its free-space floor, or SQLite found it full.
    pub const DISK_FULL: &str = "disk_full";
    /// A record larger than `outbox.max_record_bytes`, or too large for a batch.
    pub const OVERSIZE: &str = "oversize";
    /// Readings: not JSON, not the model's features, or with non-finite values.
    pub const MALFORMED: &str = "malformed";
    /// Readings larger than `inputs.max_message_bytes`, commands larger than their limit.
    pub const TOO_LARGE: &str = "too_large";
    /// Readings or commands that found their queue full.
    pub const QUEUE_FULL: &str = "queue_full";
    /// Readings that arrived while no model was active.
    pub const NO_MODEL: &str = "no_model";
    /// Readings whose topic matched no model slot's filters (the broker sent them for a
    /// filter the agent cannot match, such as a shared subscription's).
    pub const NO_SLOT: &str = "no_slot";
    /// Readings whose inference failed.
    pub const INFERENCE_FAILED: &str = "inference_failed";
    /// A sample over `samples.max_per_minute`.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The readings link dropped its broker session to be rid of a message larger than its
    /// packet limit; what the broker held for it is gone (counted once per reset).
    pub const SESSION_RESET: &str = "session_reset";
    /// Records the database refused for another reason than a full disk (an I/O error).
    pub const WRITE_FAILED: &str = "write_failed";
}

/// A record to append: its stream, time and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    pub stream: &'static str,
    pub ts_ms: u64,
    pub data: String,
}

/// Something lost that never became a record (a reading, a command), to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loss {
    pub stream: &'static str,
    pub cause: &'static str,
    pub count: u64,
}

/// A stored record, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// Local seq.
    pub lseq: u64,
    pub ts_ms: u64,
    pub data: String,
    /// The identity the record was first sent under, when it was born in an earlier epoch.
    pub origin: Option<(String, u64)>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    pub appended: u64,
    /// For each record given, in order: whether it was stored.
    pub kept: Vec<bool>,
    appended_streams: Vec<&'static str>,
    /// Records lost by this append (new ones refused or old ones deleted), per stream and cause.
    pub lost: Vec<Loss>,
}

impl AppendOutcome {
    fn lose(&mut self, stream: &'static str, cause: &'static str) {
        match self.lost.iter_mut().find(|l| l.stream == stream && l.cause == cause) {
            Some(l) => l.count += 1,
            None => self.lost.push(Loss {
                stream,
                cause,
                count: 1,
            }),
        }
    }

    /// Records lost, all streams and causes.
    pub fn lost_records(&self) -> u64 {
        self.lost.iter().map(|l| l.count).sum()
    }

    /// Records of `stream` stored by this append.
    pub fn appended_to(&self, stream: &str) -> u64 {
        self.appended_streams.iter().filter(|s| **s == stream).count() as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_records: u64,
    pub max_bytes: u64,
    pub max_record_bytes: usize,
    /// Free bytes the filesystem must keep; under it, each new record must free as much.
    pub min_free_bytes: u64,
    pub when_full: WhenFull,
}

/// One epoch of a stream: wire seq = local seq - `base`, for records sent while it is
/// current. Records appended from local seq `started` on were born in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    pub epoch: String,
    pub base: u64,
    pub started: u64,
}

/// A stream's marks, in local seqs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The next local seq to assign.
    pub next: u64,
    /// Every local seq at or below this was acked by the hub.
    pub acked: u64,
    /// Every local seq at or below this that is not in the outbox was dropped.
    pub lost_through: u64,
    /// Records and bytes of data waiting.
    pub depth: u64,
    pub bytes: u64,
    /// Oldest first; the last is current.
    pub epochs: Vec<Epoch>,
}

impl StreamInfo {
    pub fn epoch(&self) -> &Epoch {
        self.epochs.last().expect("every stream has an epoch")
    }

    /// The highest wire seq assigned in the current epoch (0 when none).
    pub fn assigned_wire(&self) -> u64 {
        (self.next - 1).saturating_sub(self.epoch().base)
    }

    pub fn to_wire(&self, lseq: u64) -> u64 {
        lseq.saturating_sub(self.epoch().base)
    }

    /// Where a record was first sent from, if it was born before the current epoch.
    pub fn origin(&self, lseq: u64) -> Option<(String, u64)> {
        let cur = self.epochs.len() - 1;
        let born = self.epochs.iter().rposition(|e| e.started <= lseq).unwrap_or(0);
        (born != cur).then(|| (self.epochs[born].epoch.clone(), lseq - self.epochs[born].base))
    }
}

/// A loss counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossCounter {
    pub stream: String,
    pub cause: String,
    pub total: u64,
    /// How much of `total` is reported to the hub.
    pub reported: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    streams: BTreeMap<String, StreamInfo>,
}

const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0,
    lost_through INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox (
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS epochs (
    stream TEXT NOT NULL,
    epoch TEXT NOT NULL,
    base INTEGER NOT NULL,
    started INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (stream, started, epoch)
);
CREATE TABLE IF NOT EXISTS losses (
    stream TEXT NOT NULL,
    cause TEXT NOT NULL,
    total INTEGER NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0,
    first_ms INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    PRIMARY KEY (stream, cause)
);
";

/// What a record of `len` bytes may take on disk while it is written: its page in the WAL and
/// then in the database, with B-tree overhead. The free-space floor is kept against this.
pub fn disk_cost(len: u64) -> u64 {
    2 * len + 256
}

/// Errors of the database at `path`.
fn on(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
    move |source| StoreError {
        path: path.to_path_buf(),
        source,
    }
}

/// A write transaction that takes the lock at once (IMMEDIATE), so that two writers never
/// meet a stale snapshot (`SQLITE_BUSY_SNAPSHOT`): the second waits for the first.
fn write_tx(conn: &mut Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn now_ms() -> u64 {
    crate::sync::now_ms()
}

impl Store {
    /// Open (creating if needed) the database for reading and writing.
    pub fn open(path: &Path) -> Result<Store> {
        let err = on(path);
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        let tx = write_tx(&mut conn).map_err(err)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(err)?;
        tx.execute_batch(SCHEMA).map_err(err)?;
        if version < 2 {
            // Version 1 had one epoch for the whole outbox (meta `epoch`) and no counters.
            let cols: Vec<String> = tx
                .prepare("SELECT name FROM pragma_table_info('streams')")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .map_err(err)?;
            for (col, ddl) in [
                (
                    "depth",
                    "ALTER TABLE streams ADD COLUMN depth INTEGER NOT NULL DEFAULT 0",
                ),
                (
                    "bytes",
                    "ALTER TABLE streams ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0",
                ),
            ] {
                if !cols.iter().any(|c| c == col) {
                    tx.execute(ddl, []).map_err(err)?;
                }
            }
            tx.execute_batch(
                "UPDATE streams SET
                    depth = (SELECT count(*) FROM outbox o WHERE o.stream = streams.stream),
                    bytes = (SELECT coalesce(sum(length(CAST(o.data AS BLOB))), 0) FROM outbox o WHERE o.stream = streams.stream);",
            )
            .map_err(err)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(err)?;
        }
        let legacy: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| r.get(0))
            .optional()
            .map_err(err)?;
        for s in STREAMS {
            tx.execute(
                "INSERT OR IGNORE INTO streams (stream, next_seq, acked, lost_through, depth, bytes) VALUES (?1, 1, 0, 0, 0, 0)",
                [s],
            )
            .map_err(err)?;
            let has: i64 = tx
                .query_row("SELECT count(*) FROM epochs WHERE stream = ?1", [s], |r| r.get(0))
                .map_err(err)?;
            if has == 0 {
                // A stream of a version 1 outbox keeps that outbox's epoch: its seqs go on.
                let e = legacy.clone().unwrap_or_else(new_epoch);
                tx.execute(
                    "INSERT INTO epochs (stream, epoch, base, started, created_ms) VALUES (?1, ?2, 0, 1, ?3)",
                    params![s, e, now_ms() as i64],
                )
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            streams: BTreeMap::new(),
        };
        store.load_streams()?;
        Ok(store)
    }

    /// Open an existing database read-only (for `lathe status`, while the agent runs).
    pub fn open_readonly(path: &Path) -> Result<Store> {
        let err = on(path);
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(2)).map_err(err)?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            streams: BTreeMap::new(),
        };
        store.load_streams()?;
        Ok(store)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
        on(&self.path)
    }

    fn load_streams(&mut self) -> Result<()> {
        let mut streams = BTreeMap::new();
        let has_counters: bool = self
            .conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('streams') WHERE name = 'depth'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(self.err())?
            > 0;
        let q = if has_counters {
            "SELECT stream, next_seq, acked, lost_through, depth, bytes FROM streams"
        } else {
            // A version 1 database opened read-only: count what is there.
            "SELECT stream, next_seq, acked, lost_through,
                (SELECT count(*) FROM outbox o WHERE o.stream = s.stream),
                (SELECT coalesce(sum(length(CAST(o.data AS BLOB))), 0) FROM outbox o WHERE o.stream = s.stream)
             FROM streams s"
        };
        {
            let mut st = self.conn.prepare(q).map_err(self.err())?;
            let rows = st
                .query_map([], |r| {
                    let n = |i| r.get::<_, i64>(i).map(|v| v as u64);
                    Ok((
                        r.get::<_, String>(0)?,
                        StreamInfo {
                            next: n(1)?,
                            acked: n(2)?,
                            lost_through: n(3)?,
                            depth: n(4)?,
                            bytes: n(5)?,
                            epochs: vec![],
                        },
                    ))
                })
                .map_err(self.err())?;
            for r in rows {
                let (name, info) = r.map_err(self.err())?;
                streams.insert(name, info);
            }
        }
        let has_epochs: bool = self
            .conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'epochs'", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(self.err())?
            > 0;
        if has_epochs {
            let mut st = self
                .conn
                .prepare("SELECT stream, epoch, base, started FROM epochs ORDER BY stream, started, created_ms")
                .map_err(self.err())?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        Epoch {
                            epoch: r.get(1)?,
                            base: r.get::<_, i64>(2)? as u64,
                            started: r.get::<_, i64>(3)? as u64,
                        },
                    ))
                })
                .map_err(self.err())?;
            for r in rows {
                let (name, e) = r.map_err(self.err())?;
                if let Some(s) = streams.get_mut(&name) {
                    s.epochs.push(e);
                }
            }
        } else if let Some(e) = self.get_meta("epoch")? {
            for s in streams.values_mut() {
                s.epochs.push(Epoch {
                    epoch: e.clone(),
                    base: 0,
                    started: 1,
                });
            }
        }
        streams.retain(|_, s| !s.epochs.is_empty());
        self.streams = streams;
        Ok(())
    }

    /// A stream's marks and epochs.
    pub fn stream(&self, stream: &str) -> Option<&StreamInfo> {
        self.streams.get(stream)
    }

    pub fn streams(&self) -> impl Iterator<Item = (&str, &StreamInfo)> {
        self.streams.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Records in the outbox, all streams.
    pub fn depth(&self) -> u64 {
        self.streams.values().map(|s| s.depth).sum()
    }

    /// Bytes of record data in the outbox, all streams.
    pub fn bytes(&self) -> u64 {
        self.streams.values().map(|s| s.bytes).sum()
    }

    /// Records waiting, per stream.
    pub fn depth_by_stream(&self) -> Vec<(String, u64)> {
        self.streams.iter().map(|(k, v)| (k.clone(), v.depth)).collect()
    }

    /// The time of the oldest record waiting, all streams.
    pub fn oldest_ts_ms(&self) -> Result<Option<u64>> {
        let mut oldest: Option<u64> = None;
        for (name, s) in &self.streams {
            if s.depth == 0 {
                continue;
            }
            let ts: Option<i64> = self
                .conn
                .query_row(
                    "SELECT ts_ms FROM outbox WHERE stream = ?1 ORDER BY seq LIMIT 1",
                    [name],
                    |r| r.get(0),
                )
                .optional()
                .map_err(self.err())?;
            if let Some(ts) = ts {
                oldest = Some(oldest.map_or(ts as u64, |o| o.min(ts as u64)));
            }
        }
        Ok(oldest)
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(self.err())
    }

    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.set_meta_many(&[(key, value)])
    }

    /// Set several meta keys in one transaction: all or none.
    pub fn set_meta_many(&mut self, pairs: &[(&str, &str)]) -> Result<()> {
        let err = on(&self.path);
        let tx = write_tx(&mut self.conn).map_err(err)?;
        for (k, v) in pairs {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![k, v],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Append records, and count losses of things that are not records, in one transaction,
    /// applying the size limits and the when-full policy. `free_bytes` is the free space of
    /// the filesystem, when known.
    ///
    /// When SQLite finds the disk full, the policy is applied once more as if under the floor
    /// (drop_oldest frees room first); if that fails too, the error is returned and nothing is
    /// written.
    pub fn append(
        &mut self,
        records: &[NewRecord],
        losses: &[Loss],
        limits: Limits,
        free_bytes: Option<u64>,
    ) -> Result<AppendOutcome> {
        match self.try_append(records, losses, limits, free_bytes) {
            Err(e) if e.is_full() && limits.when_full == WhenFull::DropOldest => {
                tracing::warn!(path = %self.path.display(), "SQLite reports the disk full; dropping the oldest records to make room");
                self.try_append(records, losses, limits, Some(0))
            }
            other => other,
        }
    }

    fn try_append(
        &mut self,
        records: &[NewRecord],
        losses: &[Loss],
        limits: Limits,
        free_bytes: Option<u64>,
    ) -> Result<AppendOutcome> {
        let err = on(&self.path);
        let mut out = AppendOutcome::default();
        let mut streams = self.streams.clone();
        let now = now_ms() as i64;
        // Bytes the filesystem can still take above the floor, as this transaction spends them.
        let mut headroom: Option<i64> = free_bytes.map(|f| f as i64 - limits.min_free_bytes as i64);
        let tx = write_tx(&mut self.conn).map_err(err)?;
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO outbox (stream, seq, ts_ms, data) VALUES (?1, ?2, ?3, ?4)")
                .map_err(err)?;
            let mut oldest_same = tx
                .prepare_cached(
                    "SELECT seq, length(CAST(data AS BLOB)) FROM outbox WHERE stream = ?1 ORDER BY seq LIMIT 1",
                )
                .map_err(err)?;
            let mut delete = tx
                .prepare_cached("DELETE FROM outbox WHERE stream = ?1 AND seq = ?2")
                .map_err(err)?;
            for r in records {
                let len = r.data.len() as u64;
                out.kept.push(false);
                if len as usize > limits.max_record_bytes {
                    out.lose(r.stream, cause::OVERSIZE);
                    continue;
                }
                // Free what the policy asks for before this record goes in. Under the floor,
                // the record must free at least its own size: SQLite reuses the freed pages.
                let mut freed = 0u64;
                let cost = disk_cost(len);
                let kept = loop {
                    let depth: u64 = streams.values().map(|s| s.depth).sum();
                    let bytes: u64 = streams.values().map(|s| s.bytes).sum();
                    let why = if headroom.is_some_and(|h| h < cost as i64) && freed < len {
                        cause::DISK_FULL
                    } else if depth + 1 > limits.max_records || bytes + len > limits.max_bytes {
                        cause::OUTBOX_FULL
                    } else {
                        break true;
                    };
                    if limits.when_full == WhenFull::DropNewest {
                        out.lose(r.stream, why);
                        break false;
                    }
                    // The oldest record of the least important stream that holds any, if it is
                    // no more important than the new record's; never a loss report.
                    let rank = |s: &str| {
                        EVICTION_ORDER
                            .iter()
                            .position(|e| *e == s)
                            .unwrap_or(EVICTION_ORDER.len())
                    };
                    let mut victim: Option<(String, i64, i64)> = None;
                    for s in EVICTION_ORDER.into_iter().filter(|s| rank(s) <= rank(r.stream)) {
                        victim = oldest_same
                            .query_row([s], |row| Ok((s.to_string(), row.get(0)?, row.get(1)?)))
                            .optional()
                            .map_err(err)?;
                        if victim.is_some() {
                            break;
                        }
                    }
                    let Some((vstream, vseq, vlen)) = victim else {
                        // Nothing left to drop: the new record cannot be kept.
                        out.lose(r.stream, why);
                        break false;
                    };
                    delete.execute(params![vstream, vseq]).map_err(err)?;
                    let s = streams.get_mut(&vstream).expect("outbox rows belong to known streams");
                    s.depth -= 1;
                    s.bytes -= vlen as u64;
                    s.lost_through = s.lost_through.max(vseq as u64);
                    freed += vlen as u64;
                    let vs = STREAMS.iter().find(|n| **n == vstream).copied().unwrap_or("unknown");
                    out.lose(vs, why);
                };
                if !kept {
                    continue;
                }
                let s = streams.get_mut(r.stream).expect("appends go to known streams");
                let seq = s.next;
                insert
                    .execute(params![r.stream, seq as i64, r.ts_ms as i64, r.data])
                    .map_err(err)?;
                s.next += 1;
                s.depth += 1;
                s.bytes += len;
                if let Some(h) = headroom.as_mut() {
                    if freed < len {
                        *h -= cost as i64;
                    }
                }
                out.appended += 1;
                out.appended_streams.push(r.stream);
                *out.kept.last_mut().expect("pushed above") = true;
            }
        }
        for (name, s) in &streams {
            let old = &self.streams[name];
            if s.next != old.next || s.depth != old.depth || s.bytes != old.bytes || s.lost_through != old.lost_through
            {
                tx.execute(
                    "UPDATE streams SET next_seq = ?2, depth = ?3, bytes = ?4, lost_through = ?5 WHERE stream = ?1",
                    params![
                        name,
                        s.next as i64,
                        s.depth as i64,
                        s.bytes as i64,
                        s.lost_through as i64
                    ],
                )
                .map_err(err)?;
            }
        }
        for l in losses.iter().chain(out.lost.iter()) {
            if l.count == 0 {
                continue;
            }
            tx.execute(
                "INSERT INTO losses (stream, cause, total, reported, first_ms, last_ms) VALUES (?1, ?2, ?3, 0, ?4, ?4)
                 ON CONFLICT(stream, cause) DO UPDATE SET total = total + excluded.total, last_ms = excluded.last_ms",
                params![l.stream, l.cause, l.count as i64, now],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        self.streams = streams;
        Ok(out)
    }

    /// Records of a stream after local seq `after`, ascending, at most `max_records` of them and
    /// at most `max_bytes` of data. A first record larger than `max_bytes` alone is returned by
    /// itself: the caller decides (it can never be sent; see [`Store::drop_unsendable`]).
    pub fn pending(&self, stream: &str, after: u64, max_records: usize, max_bytes: usize) -> Result<Vec<Pending>> {
        let Some(info) = self.streams.get(stream) else {
            return Ok(vec![]);
        };
        let mut st = self
            .conn
            .prepare_cached("SELECT seq, ts_ms, data FROM outbox WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")
            .map_err(self.err())?;
        let mut rows = st
            .query(params![stream, after as i64, max_records as i64])
            .map_err(self.err())?;
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(row) = rows.next().map_err(self.err())? {
            let data: String = row.get(2).map_err(self.err())?;
            bytes += data.len() + protocol::sync::RECORD_OVERHEAD;
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            let lseq = row.get::<_, i64>(0).map_err(self.err())? as u64;
            out.push(Pending {
                lseq,
                ts_ms: row.get::<_, i64>(1).map_err(self.err())? as u64,
                data,
                origin: info.origin(lseq),
            });
            if bytes > max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Delete a record that can never fit a batch: an explicit loss (`oversize`), not a wedge.
    /// It must be the stream's oldest unacked record.
    pub fn drop_unsendable(&mut self, stream: &'static str, lseq: u64) -> Result<()> {
        let err = on(&self.path);
        let tx = write_tx(&mut self.conn).map_err(err)?;
        let len: Option<i64> = tx
            .query_row(
                "SELECT length(CAST(data AS BLOB)) FROM outbox WHERE stream = ?1 AND seq = ?2",
                params![stream, lseq as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        let Some(len) = len else { return Ok(()) };
        tx.execute(
            "DELETE FROM outbox WHERE stream = ?1 AND seq = ?2",
            params![stream, lseq as i64],
        )
        .map_err(err)?;
        let mut s = self.streams[stream].clone();
        s.depth -= 1;
        s.bytes -= len as u64;
        s.lost_through = s.lost_through.max(lseq);
        tx.execute(
            "UPDATE streams SET depth = ?2, bytes = ?3, lost_through = ?4 WHERE stream = ?1",
            params![stream, s.depth as i64, s.bytes as i64, s.lost_through as i64],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO losses (stream, cause, total, reported, first_ms, last_ms) VALUES (?1, ?2, 1, 0, ?3, ?3)
             ON CONFLICT(stream, cause) DO UPDATE SET total = total + 1, last_ms = excluded.last_ms",
            params![stream, cause::OVERSIZE, now_ms() as i64],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        self.streams.insert(stream.to_string(), s);
        Ok(())
    }

    /// Apply an ack given in local seqs: delete every record of the stream at or below
    /// `acked`. Returns how many were deleted. An ack below the watermark changes nothing.
    /// The caller has checked the ack against what it assigned and sent.
    ///
    /// The delete is not synced to disk by itself (it is by the next append): a power cut may
    /// bring back records the hub already holds, which are then sent again and dropped by the
    /// hub as duplicates. Nothing can be lost that way, and a drain saves one fsync per batch.
    pub fn ack(&mut self, stream: &str, acked: u64) -> Result<u64> {
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(self.err())?;
        let r = self.delete_acked(stream, acked);
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(self.err())?;
        r
    }

    fn delete_acked(&mut self, stream: &str, acked: u64) -> Result<u64> {
        let err = on(&self.path);
        let Some(old) = self.streams.get(stream) else {
            return Ok(0);
        };
        if acked <= old.acked {
            return Ok(0);
        }
        let mut s = old.clone();
        let tx = write_tx(&mut self.conn).map_err(err)?;
        let (n, bytes): (i64, i64) = tx
            .query_row(
                "SELECT count(*), coalesce(sum(length(CAST(data AS BLOB))), 0) FROM outbox WHERE stream = ?1 AND seq <= ?2",
                params![stream, acked as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(err)?;
        tx.execute(
            "DELETE FROM outbox WHERE stream = ?1 AND seq <= ?2",
            params![stream, acked as i64],
        )
        .map_err(err)?;
        s.acked = acked;
        s.depth -= n as u64;
        s.bytes -= bytes as u64;
        tx.execute(
            "UPDATE streams SET acked = ?2, depth = ?3, bytes = ?4 WHERE stream = ?1",
            params![stream, s.acked as i64, s.depth as i64, s.bytes as i64],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        self.streams.insert(stream.to_string(), s);
        Ok(n as u64)
    }

    /// Move a stream's unacknowledged records to a new epoch: a new random epoch whose wire
    /// seq 1 is the first unacked record. No row changes; records born before it carry their
    /// original identity as `origin` when sent. Returns the new epoch.
    pub fn rebase(&mut self, stream: &str) -> Result<String> {
        let err = on(&self.path);
        let mut s = self.streams[stream].clone();
        let e = Epoch {
            epoch: new_epoch(),
            base: s.acked.max(s.lost_through),
            started: s.next,
        };
        let tx = write_tx(&mut self.conn).map_err(err)?;
        tx.execute(
            "INSERT INTO epochs (stream, epoch, base, started, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![stream, e.epoch, e.base as i64, e.started as i64, now_ms() as i64],
        )
        .map_err(err)?;
        // Epochs that no waiting record was born in, other than the first and the new one, are
        // no longer needed to name an origin.
        let first_waiting = s.acked.max(s.lost_through) + 1;
        let keep_from = s.epochs.iter().rposition(|x| x.started <= first_waiting).unwrap_or(0);
        for old in &s.epochs[..keep_from] {
            tx.execute(
                "DELETE FROM epochs WHERE stream = ?1 AND epoch = ?2 AND started = ?3",
                params![stream, old.epoch, old.started as i64],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        s.epochs.drain(..keep_from);
        s.epochs.push(e.clone());
        self.streams.insert(stream.to_string(), s);
        Ok(e.epoch)
    }

    /// Every loss counter.
    pub fn losses(&self) -> Result<Vec<LossCounter>> {
        let mut st = self
            .conn
            .prepare("SELECT stream, cause, total, reported, first_ms, last_ms FROM losses ORDER BY stream, cause")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok(LossCounter {
                    stream: r.get(0)?,
                    cause: r.get(1)?,
                    total: r.get::<_, i64>(2)? as u64,
                    reported: r.get::<_, i64>(3)? as u64,
                    first_ms: r.get::<_, i64>(4)? as u64,
                    last_ms: r.get::<_, i64>(5)? as u64,
                })
            })
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Turn every unreported loss into a record of the `losses` stream, marking it reported in
    /// the same transaction. Returns how many reports were written.
    pub fn report_losses(&mut self) -> Result<u64> {
        let pending: Vec<LossCounter> = self.losses()?.into_iter().filter(|l| l.total > l.reported).collect();
        if pending.is_empty() {
            return Ok(0);
        }
        let err = on(&self.path);
        let now = now_ms();
        let mut s = self.streams[protocol::streams::LOSSES].clone();
        let tx = write_tx(&mut self.conn).map_err(err)?;
        for l in &pending {
            let report = protocol::messages::LossReport {
                ts_ms: now,
                stream: l.stream.clone(),
                cause: l.cause.clone(),
                count: l.total - l.reported,
                total: l.total,
                first_ms: l.first_ms,
                last_ms: l.last_ms,
            };
            let data = serde_json::to_string(&report).expect("a loss report serializes");
            tx.execute(
                "INSERT INTO outbox (stream, seq, ts_ms, data) VALUES (?1, ?2, ?3, ?4)",
                params![protocol::streams::LOSSES, s.next as i64, now as i64, data],
            )
            .map_err(err)?;
            s.next += 1;
            s.depth += 1;
            s.bytes += data.len() as u64;
            tx.execute(
                "UPDATE losses SET reported = ?3, first_ms = ?4 WHERE stream = ?1 AND cause = ?2",
                params![l.stream, l.cause, l.total as i64, l.last_ms as i64],
            )
            .map_err(err)?;
        }
        tx.execute(
            "UPDATE streams SET next_seq = ?2, depth = ?3, bytes = ?4 WHERE stream = ?1",
            params![protocol::streams::LOSSES, s.next as i64, s.depth as i64, s.bytes as i64],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        self.streams.insert(protocol::streams::LOSSES.to_string(), s);
        Ok(pending.len() as u64)
    }

    /// Keep the WAL file under `max_bytes`: SQLite checkpoints at half of it and truncates the
    /// file back to it after each checkpoint. Set once, on the connection that writes.
    pub fn limit_wal(&mut self, max_bytes: u64) -> Result<()> {
        self.conn
            .pragma_update(None, "journal_size_limit", max_bytes as i64)
            .map_err(self.err())?;
        let page: i64 = self
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(self.err())?;
        self.conn
            .pragma_update(None, "wal_autocheckpoint", (max_bytes as i64 / page / 2).max(16))
            .map_err(self.err())
    }

    /// If the WAL file has grown past `max_bytes` all the same (a reader held a snapshot), a
    /// full checkpoint truncates it.
    pub fn bound_wal(&mut self, max_bytes: u64) -> Result<()> {
        let wal = wal_path(&self.path);
        if std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > max_bytes {
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(self.err())?;
        }
        Ok(())
    }
}

/// The WAL file of a database.
pub fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// Free bytes (for an unprivileged process) on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    rustix::fs::statvfs(path)
        .ok()
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    const P: &str = protocol::streams::PREDICTIONS;
    const E: &str = protocol::streams::EVENTS;

    fn rec(stream: &'static str, ts: u64) -> NewRecord {
        NewRecord {
            stream,
            ts_ms: ts,
            data: format!("{{\"n\":{ts}}}"),
        }
    }

    fn limits(max_records: u64, when_full: WhenFull) -> Limits {
        Limits {
            max_records,
            max_bytes: 1 << 30,
            max_record_bytes: 1 << 16,
            min_free_bytes: 0,
            when_full,
        }
    }

    const ROOMY: Limits = Limits {
        max_records: 1000,
        max_bytes: 1 << 30,
        max_record_bytes: 1 << 16,
        min_free_bytes: 0,
        when_full: WhenFull::DropOldest,
    };

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("a.db")).expect("open");
        (dir, s)
    }

    fn seqs(s: &Store, stream: &str, after: u64) -> Vec<u64> {
        s.pending(stream, after, 100, 1 << 20)
            .expect("pending")
            .iter()
            .map(|r| r.lseq)
            .collect()
    }

    fn lost(s: &Store) -> Vec<(String, String, u64)> {
        s.losses()
            .expect("losses")
            .into_iter()
            .map(|l| (l.stream, l.cause, l.total))
            .collect()
    }

    #[test]
    fn seqs_are_contiguous_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.db");
        let mut s = Store::open(&path).expect("open");
        let epoch = s.stream(P).expect("p").epoch().epoch.clone();
        s.append(&[rec(P, 1), rec(P, 2), rec(E, 3)], &[], ROOMY, None)
            .expect("append");
        drop(s);
        let mut s = Store::open(&path).expect("reopen");
        assert_eq!(s.stream(P).expect("p").epoch().epoch, epoch);
        assert_eq!(s.depth(), 3);
        assert_eq!(s.bytes(), 21, "three records of 7 bytes");
        s.append(&[rec(P, 4)], &[], ROOMY, None).expect("append");
        assert_eq!(seqs(&s, P, 0), vec![1, 2, 3]);
        assert_eq!(s.ack(P, 2).expect("ack"), 2);
        // Seqs are never reused, even after the records are gone.
        s.append(&[rec(P, 5)], &[], ROOMY, None).expect("append");
        assert_eq!(seqs(&s, P, 2), vec![3, 4]);
        let i = s.stream(P).expect("p");
        assert_eq!((i.acked, i.lost_through, i.depth), (2, 0, 2));
        let ro = Store::open_readonly(&path).expect("read-only");
        assert_eq!(
            ro.depth_by_stream(),
            vec![
                ("drift".into(), 0),
                (E.into(), 1),
                ("losses".into(), 0),
                (P.into(), 2),
                ("samples".into(), 0)
            ]
        );
    }

    #[test]
    fn pending_respects_byte_limit_but_returns_one() {
        let (_d, mut s) = open();
        s.append(&[rec(P, 1), rec(P, 2), rec(P, 3)], &[], ROOMY, None)
            .expect("append");
        assert_eq!(s.pending(P, 0, 100, 1).expect("pending").len(), 1);
        assert_eq!(s.pending(P, 0, 2, 1 << 20).expect("pending").len(), 2);
    }

    #[test]
    fn when_full_drop_newest_refuses_and_counts() {
        let (_d, mut s) = open();
        let out = s
            .append(
                &[rec(P, 1), rec(P, 2), rec(P, 3)],
                &[],
                limits(2, WhenFull::DropNewest),
                None,
            )
            .expect("append");
        assert_eq!((out.appended, out.lost_records()), (2, 1));
        assert_eq!(s.stream(P).expect("p").lost_through, 0, "no seq was assigned to it");
        assert_eq!(lost(&s), vec![(P.into(), cause::OUTBOX_FULL.into(), 1)]);
    }

    #[test]
    fn when_full_drop_oldest_records_the_loss() {
        let (_d, mut s) = open();
        let out = s
            .append(
                &[rec(P, 1), rec(P, 2), rec(P, 3)],
                &[],
                limits(2, WhenFull::DropOldest),
                None,
            )
            .expect("append");
        assert_eq!((out.appended, out.lost_records()), (3, 1));
        assert_eq!(s.stream(P).expect("p").lost_through, 1);
        assert_eq!(seqs(&s, P, 0), vec![2, 3]);
        assert_eq!(lost(&s), vec![(P.into(), cause::OUTBOX_FULL.into(), 1)]);
    }

    /// A full outbox makes room with the least important records first: samples, predictions,
    /// drift windows, events; a record never pushes out a more important one.
    #[test]
    fn room_is_made_from_bulk_streams_first() {
        let (_d, mut s) = open();
        let at = |stream: &'static str, ts: u64| NewRecord {
            stream,
            ts_ms: ts,
            data: "{}".into(),
        };
        let (d, sm) = (protocol::streams::DRIFT, protocol::streams::SAMPLES);
        s.append(&[at(E, 1), at(d, 2), at(P, 3), at(sm, 4)], &[], ROOMY, None)
            .expect("append");
        let full = limits(4, WhenFull::DropOldest);
        let left = |s: &Store| -> Vec<(String, u64)> { s.depth_by_stream().into_iter().filter(|x| x.1 > 0).collect() };
        let lost_of = |s: &Store, stream: &str| lost(s).into_iter().find(|l| l.0 == stream).map_or(0, |l| l.2);
        s.append(&[at(E, 5)], &[], full, None).expect("append");
        assert_eq!(lost_of(&s, sm), 1, "a sample makes room for an event first");
        s.append(&[at(d, 6)], &[], full, None).expect("append");
        assert_eq!(lost_of(&s, P), 1, "then a prediction");
        s.append(&[at(d, 7), at(E, 8)], &[], full, None).expect("append");
        assert_eq!(
            (lost_of(&s, d), lost_of(&s, E)),
            (2, 0),
            "then drift windows, oldest first"
        );
        assert_eq!(left(&s), vec![("drift".into(), 1), (E.into(), 3)]);
        // A sample cannot push out anything more important: it is dropped itself.
        s.append(&[at(sm, 9)], &[], full, None).expect("append");
        assert_eq!(lost_of(&s, sm), 2);
        assert_eq!(left(&s), vec![("drift".into(), 1), (E.into(), 3)]);
    }

    #[test]
    fn the_byte_cap_holds() {
        let (_d, mut s) = open();
        let lim = Limits { max_bytes: 20, ..ROOMY };
        // Each record is 7 bytes: two fit, the third pushes out the first.
        let out = s
            .append(&[rec(P, 1), rec(P, 2), rec(P, 3)], &[], lim, None)
            .expect("append");
        assert_eq!((out.appended, out.lost_records()), (3, 1));
        assert_eq!(s.bytes(), 14);
    }

    /// Regression: one record larger than a packet took the link down at every reconnect.
    #[test]
    fn oversize_records_are_refused_and_counted() {
        let (_d, mut s) = open();
        let big = NewRecord {
            stream: P,
            ts_ms: 1,
            data: format!("\"{}\"", "x".repeat(100)),
        };
        let lim = Limits {
            max_record_bytes: 64,
            ..ROOMY
        };
        let out = s.append(&[rec(P, 1), big, rec(P, 2)], &[], lim, None).expect("append");
        assert_eq!(out.appended, 2);
        assert_eq!(lost(&s), vec![(P.into(), cause::OVERSIZE.into(), 1)]);
        assert_eq!(seqs(&s, P, 0), vec![1, 2], "no seq is spent on it");
        // One already stored (the limit was raised before) is dropped when found unsendable.
        s.drop_unsendable(P, 1).expect("drop");
        assert_eq!(s.stream(P).expect("p").lost_through, 1);
        assert_eq!(lost(&s), vec![(P.into(), cause::OVERSIZE.into(), 2)]);
    }

    #[test]
    fn under_the_free_space_floor_new_records_must_free_their_room() {
        let (_d, mut s) = open();
        s.append(&[rec(P, 1), rec(P, 2), rec(P, 3)], &[], ROOMY, None)
            .expect("append");
        let floor = Limits {
            min_free_bytes: 1000,
            ..ROOMY
        };
        // 10 bytes free, 1000 required: each new record drops an old one of at least its size.
        let out = s.append(&[rec(P, 4), rec(P, 5)], &[], floor, Some(10)).expect("append");
        assert_eq!((out.appended, out.lost_records()), (2, 2));
        assert_eq!(seqs(&s, P, 0), vec![3, 4, 5]);
        assert_eq!(lost(&s), vec![(P.into(), cause::DISK_FULL.into(), 2)]);
        let newest = Limits {
            when_full: WhenFull::DropNewest,
            ..floor
        };
        let out = s.append(&[rec(P, 6)], &[], newest, Some(10)).expect("append");
        assert_eq!((out.appended, out.lost_records()), (0, 1));
        assert_eq!(lost(&s), vec![(P.into(), cause::DISK_FULL.into(), 3)]);
    }

    /// Regression: nothing limited the WAL. It is checkpointed at half its limit and truncated
    /// back to it, even while a reader holds an old snapshot that stops checkpoints.
    #[test]
    fn the_wal_stays_under_its_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.db");
        let mut s = Store::open(&path).expect("open");
        let limit = 1 << 20;
        s.limit_wal(limit).expect("limit");
        let big = |ts| NewRecord {
            stream: P,
            ts_ms: ts,
            data: format!("\"{}\"", "x".repeat(2000)),
        };
        let wal = || std::fs::metadata(wal_path(&path)).map(|m| m.len()).unwrap_or(0);
        let mut largest = 0;
        for i in 0..400 {
            s.append(&(i * 10..i * 10 + 10).map(big).collect::<Vec<_>>(), &[], ROOMY, None)
                .expect("append");
            s.bound_wal(limit).expect("bound");
            largest = largest.max(wal());
        }
        assert!(largest <= 2 * limit, "the WAL grew to {largest} bytes");
        // A reader in the middle of a read transaction stops checkpoints; once it is gone the
        // next bound truncates the WAL again.
        let reader = Connection::open(&path).expect("reader");
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM outbox;")
            .expect("snapshot");
        for i in 400..700 {
            s.append(&(i * 10..i * 10 + 10).map(big).collect::<Vec<_>>(), &[], ROOMY, None)
                .expect("append");
        }
        assert!(wal() > limit, "the reader held the WAL open: {}", wal());
        drop(reader);
        s.bound_wal(limit).expect("bound");
        assert!(wal() <= limit, "the WAL is {} bytes after the bound", wal());
    }

    /// SQLITE_FULL (here: a page limit) is met by the when-full policy, not by losing the batch.
    #[test]
    fn sqlite_full_drops_the_oldest_to_make_room() {
        let (_d, mut s) = open();
        let page = |s: &Store| -> i64 { s.conn.query_row("PRAGMA page_count", [], |r| r.get(0)).expect("pages") };
        let big = |ts| NewRecord {
            stream: P,
            ts_ms: ts,
            data: format!("\"{}\"", "x".repeat(3000)),
        };
        s.append(&(0..20).map(big).collect::<Vec<_>>(), &[], ROOMY, None)
            .expect("append");
        let pages = page(&s);
        s.conn
            .pragma_update(None, "max_page_count", pages)
            .expect("cap the database at its size");
        let out = s
            .append(&(20..25).map(big).collect::<Vec<_>>(), &[], ROOMY, None)
            .expect("append");
        assert_eq!(out.appended, 5);
        assert!(out.lost_records() >= 5, "{out:?}");
        assert_eq!(s.stream(P).expect("p").next, 26);
        assert!(lost(&s).iter().any(|(_, c, n)| c == cause::DISK_FULL && *n >= 5));
        let newest = Limits {
            when_full: WhenFull::DropNewest,
            ..ROOMY
        };
        let e = s
            .append(&(30..60).map(big).collect::<Vec<_>>(), &[], newest, None)
            .expect_err("full");
        assert!(e.is_full(), "{e}");
    }

    #[test]
    fn losses_are_counted_reported_once_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.db");
        let mut s = Store::open(&path).expect("open");
        let refused = Loss {
            stream: "readings",
            cause: cause::MALFORMED,
            count: 3,
        };
        s.append(&[], &[refused], ROOMY, None).expect("append");
        assert_eq!(s.report_losses().expect("report"), 1);
        assert_eq!(s.report_losses().expect("report"), 0, "reported once");
        s.append(&[], &[refused], ROOMY, None).expect("append");
        drop(s);
        let mut s = Store::open(&path).expect("reopen");
        assert_eq!(lost(&s), vec![("readings".into(), cause::MALFORMED.into(), 6)]);
        assert_eq!(s.report_losses().expect("report"), 1);
        let reports: Vec<protocol::messages::LossReport> = s
            .pending(protocol::streams::LOSSES, 0, 10, 1 << 20)
            .expect("pending")
            .iter()
            .map(|p| serde_json::from_str(&p.data).expect("a loss report"))
            .collect();
        assert_eq!(
            reports.iter().map(|r| (r.count, r.total)).collect::<Vec<_>>(),
            vec![(3, 3), (3, 6)]
        );
    }

    #[test]
    fn rebase_renumbers_without_touching_rows_and_names_origins() {
        let (_d, mut s) = open();
        s.append(&(1..=5).map(|t| rec(P, t)).collect::<Vec<_>>(), &[], ROOMY, None)
            .expect("append");
        s.ack(P, 2).expect("ack");
        let e1 = s.stream(P).expect("p").epoch().epoch.clone();
        let e2 = s.rebase(P).expect("rebase");
        assert_ne!(e1, e2);
        s.append(&[rec(P, 6)], &[], ROOMY, None).expect("append");
        let i = s.stream(P).expect("p");
        assert_eq!((i.epoch().base, i.assigned_wire()), (2, 4));
        let got: Vec<(u64, Option<(String, u64)>)> = s
            .pending(P, 2, 10, 1 << 20)
            .expect("pending")
            .into_iter()
            .map(|p| (i.to_wire(p.lseq), p.origin))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, Some((e1.clone(), 3))),
                (2, Some((e1.clone(), 4))),
                (3, Some((e1.clone(), 5))),
                (4, None)
            ]
        );
        // Moved twice: the origin stays the identity it was born with.
        s.ack(P, 3).expect("ack");
        s.rebase(P).expect("rebase");
        let i = s.stream(P).expect("p");
        assert_eq!(i.origin(4), Some((e1, 4)));
        assert_eq!(i.origin(6), Some((e2, 4)));
        assert_eq!(i.to_wire(4), 1);
    }

    #[test]
    fn a_version_1_outbox_keeps_its_epoch_and_seqs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.db");
        let c = Connection::open(&path).expect("open");
        c.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE streams (stream TEXT PRIMARY KEY, next_seq INTEGER NOT NULL,
                acked INTEGER NOT NULL DEFAULT 0, lost_through INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE outbox (stream TEXT NOT NULL, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL,
                data TEXT NOT NULL, PRIMARY KEY (stream, seq)) WITHOUT ROWID;
             INSERT INTO meta VALUES ('epoch', '00000000000000aa');
             INSERT INTO streams VALUES ('predictions', 8, 6, 0);
             INSERT INTO outbox VALUES ('predictions', 7, 1, '{\"n\":7}');",
        )
        .expect("v1 schema");
        drop(c);
        let ro = Store::open_readonly(&path).expect("read-only before migration");
        assert_eq!(ro.depth(), 1);
        drop(ro);
        let s = Store::open(&path).expect("migrates");
        let i = s.stream(P).expect("p");
        assert_eq!(
            (i.epoch().epoch.as_str(), i.next, i.acked, i.depth, i.bytes),
            ("00000000000000aa", 8, 6, 1, 7)
        );
        assert_eq!(s.stream(E).expect("e").epoch().epoch, "00000000000000aa");
    }

    /// Regression: DEFERRED transactions let two writers meet SQLITE_BUSY_SNAPSHOT. Two
    /// connections appending at once both succeed.
    #[test]
    fn two_writers_do_not_meet_a_stale_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.db");
        Store::open(&path).expect("create");
        let threads: Vec<_> = (0..2)
            .map(|k| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut s = Store::open(&path).expect("open");
                    for i in 0..50 {
                        s.append(&[rec(if k == 0 { P } else { E }, i)], &[], ROOMY, None)
                            .expect("append under contention");
                        s.set_meta("k", &i.to_string()).expect("meta under contention");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Ack(u8),
        Rebase,
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..20).prop_map(Op::Append),
            (0u8..40).prop_map(Op::Ack),
            Just(Op::Rebase),
            Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The outbox against a VecDeque model: same records, same order, same seqs, and the
        /// counters in step with the table.
        #[test]
        fn outbox_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("m.db");
            let mut s = Store::open(&path).expect("open");
            let mut model: VecDeque<(u64, u64)> = VecDeque::new();
            let (mut next, mut ts, mut acked) = (1u64, 0u64, 0u64);
            for op in ops {
                match op {
                    Op::Append(n) => {
                        let recs: Vec<NewRecord> = (0..n).map(|_| { ts += 1; rec(P, ts) }).collect();
                        s.append(&recs, &[], ROOMY, None).expect("append");
                        for r in &recs { model.push_back((next, r.ts_ms)); next += 1; }
                    }
                    Op::Ack(k) => {
                        let a = (acked + k as u64).min(next - 1);
                        s.ack(P, a).expect("ack");
                        acked = acked.max(a);
                        while model.front().is_some_and(|(seq, _)| *seq <= acked) { model.pop_front(); }
                    }
                    Op::Rebase => { s.rebase(P).expect("rebase"); }
                    Op::Reopen => { drop(s); s = Store::open(&path).expect("reopen"); }
                }
                let got: Vec<(u64, u64)> = s.pending(P, 0, 10_000, usize::MAX).expect("pending")
                    .iter().map(|r| (r.lseq, r.ts_ms)).collect();
                prop_assert_eq!(&got, &model.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(s.depth(), model.len() as u64);
                let bytes: u64 = s.pending(P, 0, 10_000, usize::MAX).expect("pending").iter().map(|r| r.data.len() as u64).sum();
                prop_assert_eq!(s.bytes(), bytes);
                let info = s.stream(P).expect("p");
                prop_assert_eq!(info.assigned_wire(), (next - 1) - info.epoch().base);
                for (lseq, _) in &model {
                    prop_assert!(info.to_wire(*lseq) >= 1, "wire seqs start at 1");
                }
            }
        }
    }
}
