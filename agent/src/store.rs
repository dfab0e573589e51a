//! The agent's SQLite store: the outbox of records waiting for the hub, and small state
//! (the outbox epoch, the active and previous bundles, the connection and sync status).
//!
//! Guarantees:
//! - a record is deleted only when the hub's ack covers it, or when the configured when-full
//!   policy drops it; a drop raises the stream's `lost_through` and is counted, never silent;
//! - seqs of a stream start at 1 and increase by one per record, with no gap and no reuse;
//! - every write is a transaction in WAL mode with `synchronous=FULL`, so a power cut loses
//!   at most the transaction in progress, never a committed record;
//! - appends are batched: one transaction per call, whatever the number of records.
//!
//! Nothing else in the agent touches SQLite.

use crate::config::WhenFull;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("outbox database {path}: {source}")]
pub struct StoreError {
    pub path: PathBuf,
    #[source]
    pub source: rusqlite::Error,
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A record to append: its stream, time and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    pub stream: &'static str,
    pub ts_ms: u64,
    pub data: String,
}

/// A stored record.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub seq: u64,
    pub ts_ms: u64,
    pub data: String,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub appended: u64,
    /// Records dropped by the when-full policy (old ones deleted, or new ones refused).
    pub dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_records: u64,
    pub when_full: WhenFull,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Records in the outbox, all streams; kept in step with the table.
    depth: u64,
}

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
";

impl Store {
    /// Open (creating if needed) the database for reading and writing.
    pub fn open(path: &Path) -> Result<Store> {
        let err = |source| StoreError {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        let depth: i64 = conn
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
            .map_err(err)?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
            depth: depth as u64,
        })
    }

    /// Open an existing database read-only (for `lathe status`, while the agent runs).
    pub fn open_readonly(path: &Path) -> Result<Store> {
        let err = |source| StoreError {
            path: path.to_path_buf(),
            source,
        };
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(2)).map_err(err)?;
        let depth: i64 = conn
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
            .map_err(err)?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
            depth: depth as u64,
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError {
            path: self.path.clone(),
            source,
        }
    }

    pub fn depth(&self) -> u64 {
        self.depth
    }

    /// Records waiting, per stream.
    pub fn depth_by_stream(&self) -> Result<Vec<(String, u64)>> {
        let mut st = self
            .conn
            .prepare("SELECT stream, count(*) FROM outbox GROUP BY stream ORDER BY stream")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(self.err())
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(self.err())
    }

    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Set several meta keys in one transaction: all or none.
    pub fn set_meta_many(&mut self, pairs: &[(&str, &str)]) -> Result<()> {
        let path = self.path.clone();
        let err = |source| StoreError {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        for (k, v) in pairs {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![k, v],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// The outbox epoch: 16 hex digits chosen at random when the database was created.
    pub fn epoch(&mut self) -> Result<String> {
        if let Some(e) = self.get_meta("epoch")? {
            return Ok(e);
        }
        let e = format!("{:016x}", rand::random::<u64>());
        self.set_meta("epoch", &e)?;
        Ok(e)
    }

    /// Append records in one transaction, applying the when-full policy.
    pub fn append(&mut self, records: &[NewRecord], limits: Limits) -> Result<AppendOutcome> {
        let path = self.path.clone();
        let err = |source| StoreError {
            path: path.clone(),
            source,
        };
        let mut out = AppendOutcome::default();
        let mut depth = self.depth;
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut next_seq = tx
                .prepare_cached("SELECT next_seq FROM streams WHERE stream = ?1")
                .map_err(err)?;
            let mut insert = tx
                .prepare_cached("INSERT INTO outbox (stream, seq, ts_ms, data) VALUES (?1, ?2, ?3, ?4)")
                .map_err(err)?;
            // The oldest record of the same stream, else of any stream; both walk the primary key.
            let mut oldest_same = tx
                .prepare_cached("SELECT stream, seq FROM outbox WHERE stream = ?1 ORDER BY seq LIMIT 1")
                .map_err(err)?;
            let mut oldest_any = tx
                .prepare_cached("SELECT stream, seq FROM outbox ORDER BY stream, seq LIMIT 1")
                .map_err(err)?;
            let mut delete = tx
                .prepare_cached("DELETE FROM outbox WHERE stream = ?1 AND seq = ?2")
                .map_err(err)?;
            let mut lost = tx
                .prepare_cached("UPDATE streams SET lost_through = max(lost_through, ?2) WHERE stream = ?1")
                .map_err(err)?;
            let mut bump = tx
                .prepare_cached(
                    "INSERT INTO streams (stream, next_seq) VALUES (?1, ?2)
                     ON CONFLICT(stream) DO UPDATE SET next_seq = excluded.next_seq",
                )
                .map_err(err)?;
            for r in records {
                if depth >= limits.max_records {
                    match limits.when_full {
                        WhenFull::DropNewest => {
                            out.dropped += 1;
                            continue;
                        }
                        WhenFull::DropOldest => {
                            let pick = |row: &rusqlite::Row<'_>| Ok((row.get(0)?, row.get(1)?));
                            let mut victim: Option<(String, i64)> =
                                oldest_same.query_row([r.stream], pick).optional().map_err(err)?;
                            if victim.is_none() {
                                victim = oldest_any.query_row([], pick).optional().map_err(err)?;
                            }
                            if let Some((stream, seq)) = victim {
                                delete.execute(params![stream, seq]).map_err(err)?;
                                lost.execute(params![stream, seq]).map_err(err)?;
                                depth -= 1;
                                out.dropped += 1;
                            }
                        }
                    }
                }
                let seq: i64 = next_seq
                    .query_row([r.stream], |row| row.get(0))
                    .optional()
                    .map_err(err)?
                    .unwrap_or(1);
                insert
                    .execute(params![r.stream, seq, r.ts_ms as i64, r.data])
                    .map_err(err)?;
                bump.execute(params![r.stream, seq + 1]).map_err(err)?;
                depth += 1;
                out.appended += 1;
            }
        }
        tx.commit().map_err(err)?;
        self.depth = depth;
        Ok(out)
    }

    /// Records of a stream with seq above `after`, ascending, at most `max_records` of them and
    /// at most `max_bytes` of data (but always at least one, if any).
    pub fn pending(&self, stream: &str, after: u64, max_records: usize, max_bytes: usize) -> Result<Vec<StoredRecord>> {
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
            bytes += data.len() + 48;
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(StoredRecord {
                seq: row.get::<_, i64>(0).map_err(self.err())? as u64,
                ts_ms: row.get::<_, i64>(1).map_err(self.err())? as u64,
                data,
            });
        }
        Ok(out)
    }

    /// The acked watermark and lost_through of a stream.
    pub fn stream_marks(&self, stream: &str) -> Result<(u64, u64)> {
        self.conn
            .query_row(
                "SELECT acked, lost_through FROM streams WHERE stream = ?1",
                [stream],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .optional()
            .map(|o| o.unwrap_or((0, 0)))
            .map_err(self.err())
    }

    /// Apply an ack: delete every record of the stream with seq at or below `acked`.
    /// Returns how many were deleted. An ack below the current watermark changes nothing.
    pub fn ack(&mut self, stream: &str, acked: u64) -> Result<u64> {
        let path = self.path.clone();
        let err = |source| StoreError {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let deleted = tx
            .execute(
                "DELETE FROM outbox WHERE stream = ?1 AND seq <= ?2",
                params![stream, acked as i64],
            )
            .map_err(err)?;
        tx.execute(
            "INSERT INTO streams (stream, next_seq, acked) VALUES (?1, ?2 + 1, ?2)
             ON CONFLICT(stream) DO UPDATE SET acked = max(acked, excluded.acked)",
            params![stream, acked as i64],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        self.depth = self.depth.saturating_sub(deleted as u64);
        Ok(deleted as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn rec(stream: &'static str, ts: u64) -> NewRecord {
        NewRecord {
            stream,
            ts_ms: ts,
            data: format!("{{\"n\":{ts}}}"),
        }
    }

    const ROOMY: Limits = Limits {
        max_records: 1000,
        when_full: WhenFull::DropOldest,
    };

    #[test]
    fn seqs_are_contiguous_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.db");
        let mut s = Store::open(&path).expect("open");
        let epoch = s.epoch().expect("epoch");
        s.append(&[rec("p", 1), rec("p", 2), rec("e", 3)], ROOMY)
            .expect("append");
        drop(s);
        let mut s = Store::open(&path).expect("reopen");
        assert_eq!(s.epoch().expect("epoch"), epoch);
        assert_eq!(s.depth(), 3);
        s.append(&[rec("p", 4)], ROOMY).expect("append");
        let seqs: Vec<u64> = s
            .pending("p", 0, 100, 1 << 20)
            .expect("pending")
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(s.ack("p", 2).expect("ack"), 2);
        // Seqs are never reused, even after the records are gone.
        s.append(&[rec("p", 5)], ROOMY).expect("append");
        let seqs: Vec<u64> = s
            .pending("p", 2, 100, 1 << 20)
            .expect("pending")
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, vec![3, 4]);
        assert_eq!(s.stream_marks("p").expect("marks"), (2, 0));
        let ro = Store::open_readonly(&path).expect("read-only");
        assert_eq!(
            ro.depth_by_stream().expect("depth"),
            vec![("e".into(), 1), ("p".into(), 2)]
        );
    }

    #[test]
    fn pending_respects_byte_limit_but_returns_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(&dir.path().join("a.db")).expect("open");
        s.append(&[rec("p", 1), rec("p", 2), rec("p", 3)], ROOMY)
            .expect("append");
        assert_eq!(s.pending("p", 0, 100, 1).expect("pending").len(), 1);
        assert_eq!(s.pending("p", 0, 2, 1 << 20).expect("pending").len(), 2);
    }

    #[test]
    fn when_full_drop_newest_refuses_and_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(&dir.path().join("a.db")).expect("open");
        let lim = Limits {
            max_records: 2,
            when_full: WhenFull::DropNewest,
        };
        let out = s.append(&[rec("p", 1), rec("p", 2), rec("p", 3)], lim).expect("append");
        assert_eq!(
            out,
            AppendOutcome {
                appended: 2,
                dropped: 1
            }
        );
        assert_eq!(s.stream_marks("p").expect("marks"), (0, 0));
    }

    #[test]
    fn when_full_drop_oldest_records_the_loss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(&dir.path().join("a.db")).expect("open");
        let lim = Limits {
            max_records: 2,
            when_full: WhenFull::DropOldest,
        };
        let out = s.append(&[rec("p", 1), rec("p", 2), rec("p", 3)], lim).expect("append");
        assert_eq!(
            out,
            AppendOutcome {
                appended: 3,
                dropped: 1
            }
        );
        assert_eq!(s.stream_marks("p").expect("marks"), (0, 1));
        let seqs: Vec<u64> = s
            .pending("p", 0, 10, 1 << 20)
            .expect("pending")
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, vec![2, 3]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Ack(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..20).prop_map(Op::Append),
            (0u8..40).prop_map(Op::Ack),
            Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The outbox against a VecDeque model: same records, same order, same seqs.
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
                        let recs: Vec<NewRecord> = (0..n).map(|_| { ts += 1; rec("p", ts) }).collect();
                        s.append(&recs, ROOMY).expect("append");
                        for r in &recs { model.push_back((next, r.ts_ms)); next += 1; }
                    }
                    Op::Ack(k) => {
                        let a = (acked + k as u64).min(next - 1);
                        s.ack("p", a).expect("ack");
                        acked = acked.max(a);
                        while model.front().is_some_and(|(seq, _)| *seq <= acked) { model.pop_front(); }
                    }
                    Op::Reopen => { drop(s); s = Store::open(&path).expect("reopen"); }
                }
                let got: Vec<(u64, u64)> = s.pending("p", 0, 10_000, usize::MAX).expect("pending")
                    .iter().map(|r| (r.seq, r.ts_ms)).collect();
                prop_assert_eq!(&got, &model.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(s.depth(), model.len() as u64);
            }
        }
    }
}
