//! The hub's SQLite store of synced records.
//!
//! Guarantees:
//! - a record is stored at most once per (fleet, device, stream, epoch, seq): duplicates are
//!   dropped and counted;
//! - the watermark of a (fleet, device, stream, epoch) only rises, and every seq at or below
//!   it is stored or was declared lost by the device; an ack never claims more;
//! - a batch is stored in one transaction with `synchronous=FULL`, before its ack is sent.

use protocol::messages::{advance_watermark, SyncBatch};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("hub database {path}: {source}")]
pub struct StoreError {
    pub path: PathBuf,
    #[source]
    pub source: rusqlite::Error,
}

pub struct HubStore {
    conn: Connection,
    path: PathBuf,
}

/// What storing a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub inserted: u64,
    pub duplicates: u64,
    /// The watermark to ack.
    pub acked: u64,
    /// Seqs newly declared lost by the device.
    pub newly_lost: u64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    fleet TEXT NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL, epoch TEXT NOT NULL,
    seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, data TEXT NOT NULL, received_ms INTEGER NOT NULL,
    PRIMARY KEY (fleet, device, stream, epoch, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermarks (
    fleet TEXT NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL, epoch TEXT NOT NULL,
    acked INTEGER NOT NULL, lost INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (fleet, device, stream, epoch)
);
";

impl HubStore {
    pub fn open(path: &Path) -> Result<HubStore, StoreError> {
        let err = |source| StoreError {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(HubStore {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Store a batch from `fleet`/`device` and return the watermark to ack.
    pub fn store_batch(&mut self, fleet: &str, device: &str, b: &SyncBatch, now_ms: u64) -> Result<Stored, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let key = params![fleet, device, b.stream, b.epoch];
        let (acked, lost): (u64, u64) = tx
            .query_row(
                "SELECT acked, lost FROM watermarks WHERE fleet=?1 AND device=?2 AND stream=?3 AND epoch=?4",
                key,
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .optional()
            .map_err(err)?
            .unwrap_or((0, 0));
        let mut inserted = 0;
        let mut duplicates = 0;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO records (fleet, device, stream, epoch, seq, ts_ms, data, received_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(err)?;
            for r in &b.records {
                if r.seq == 0 || r.seq <= acked {
                    duplicates += 1;
                    continue;
                }
                let n = ins
                    .execute(params![
                        fleet,
                        device,
                        b.stream,
                        b.epoch,
                        r.seq as i64,
                        r.ts_ms as i64,
                        r.data.to_string(),
                        now_ms as i64
                    ])
                    .map_err(err)?;
                if n == 1 {
                    inserted += 1;
                } else {
                    duplicates += 1;
                }
            }
        }
        // Seqs the device declared lost and that the hub never stored.
        let newly_lost = if b.lost_through > acked {
            let have: i64 = tx
                .query_row(
                    "SELECT count(*) FROM records WHERE fleet=?1 AND device=?2 AND stream=?3 AND epoch=?4 AND seq > ?5 AND seq <= ?6",
                    params![fleet, device, b.stream, b.epoch, acked as i64, b.lost_through as i64],
                    |r| r.get(0),
                )
                .map_err(err)?;
            (b.lost_through - acked).saturating_sub(have as u64)
        } else {
            0
        };
        let above: Vec<u64> = {
            let mut st = tx
                .prepare_cached(
                    "SELECT seq FROM records WHERE fleet=?1 AND device=?2 AND stream=?3 AND epoch=?4 AND seq > ?5
                     ORDER BY seq LIMIT 1000000",
                )
                .map_err(err)?;
            let rows = st
                .query_map(
                    params![fleet, device, b.stream, b.epoch, acked.max(b.lost_through) as i64],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(err)?;
            let mut v = vec![];
            let mut expect = acked.max(b.lost_through) + 1;
            for s in rows {
                let s = s.map_err(err)? as u64;
                if s != expect {
                    break;
                }
                v.push(s);
                expect += 1;
            }
            v
        };
        let new_acked = advance_watermark(acked, b.lost_through, above);
        tx.execute(
            "INSERT INTO watermarks (fleet, device, stream, epoch, acked, lost) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(fleet, device, stream, epoch) DO UPDATE SET acked = excluded.acked, lost = excluded.lost",
            params![
                fleet,
                device,
                b.stream,
                b.epoch,
                new_acked as i64,
                (lost + newly_lost) as i64
            ],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(Stored {
            inserted,
            duplicates,
            acked: new_acked,
            newly_lost,
        })
    }

    /// Records stored for a device and stream, all epochs, in seq order.
    pub fn count(&self, fleet: &str, device: &str, stream: &str) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM records WHERE fleet=?1 AND device=?2 AND stream=?3",
                params![fleet, device, stream],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|source| StoreError {
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::messages::Record;

    fn batch(seqs: &[u64], lost_through: u64) -> SyncBatch {
        SyncBatch {
            device: "d".into(),
            stream: "predictions".into(),
            epoch: "00000000000000aa".into(),
            lost_through,
            records: seqs
                .iter()
                .map(|s| Record {
                    seq: *s,
                    ts_ms: *s,
                    data: serde_json::json!({"n": s}),
                })
                .collect(),
        }
    }

    #[test]
    fn duplicates_are_dropped_and_acks_are_contiguous() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = HubStore::open(&dir.path().join("hub.db")).expect("open");
        let r = s.store_batch("f", "d", &batch(&[1, 2, 3], 0), 0).expect("store");
        assert_eq!((r.inserted, r.duplicates, r.acked), (3, 0, 3));
        let r = s.store_batch("f", "d", &batch(&[2, 3, 4], 0), 0).expect("store");
        assert_eq!((r.inserted, r.duplicates, r.acked), (1, 2, 4));
        // A gap holds the watermark until it is filled.
        let r = s.store_batch("f", "d", &batch(&[6, 7], 0), 0).expect("store");
        assert_eq!(r.acked, 4);
        let r = s.store_batch("f", "d", &batch(&[5], 0), 0).expect("store");
        assert_eq!(r.acked, 7);
        assert_eq!(s.count("f", "d", "predictions").expect("count"), 7);
    }

    #[test]
    fn declared_losses_move_the_watermark_and_are_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = HubStore::open(&dir.path().join("hub.db")).expect("open");
        s.store_batch("f", "d", &batch(&[1], 0), 0).expect("store");
        let r = s.store_batch("f", "d", &batch(&[5, 6], 4), 0).expect("store");
        assert_eq!((r.acked, r.newly_lost), (6, 3));
    }

    #[test]
    fn epochs_are_separate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = HubStore::open(&dir.path().join("hub.db")).expect("open");
        s.store_batch("f", "d", &batch(&[1, 2], 0), 0).expect("store");
        let mut b = batch(&[1], 0);
        b.epoch = "00000000000000bb".into();
        let r = s.store_batch("f", "d", &b, 0).expect("store");
        assert_eq!((r.inserted, r.acked), (1, 1), "a reflashed device starts a new epoch");
    }
}
