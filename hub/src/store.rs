//! The hub's SQLite store of synced records.
//!
//! Guarantees:
//! - a record is stored at most once per (fleet, device, stream, epoch, seq): an identical copy
//!   is counted as a duplicate, a different record under a stored identity is a *conflict*
//!   and is not stored (SPEC.md §5.5);
//! - a record the device moved to a new epoch (it carries an `origin`) whose original is
//!   already stored is kept as a copy marker (`data` NULL), not stored twice;
//! - the watermark of a (fleet, device, stream, epoch) only rises, and every seq at or below
//!   it is stored, was declared lost by the device, or is recorded in `hub_losses` as lost by
//!   the hub itself (its store was behind the device's acks); an ack never claims more;
//! - a batch's declarations count only below its first seq, and an empty batch declares
//!   nothing: a forged `lost_through` cannot move a watermark past records not yet sent;
//! - a batch is stored in one IMMEDIATE transaction with `synchronous=FULL`, before its ack
//!   is sent.

use protocol::messages::{advance_watermark, Origin, SyncBatch};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("hub database {path}: {source}")]
    Sql {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("malformed batch: {0}")]
    Malformed(String),
}

pub struct HubStore {
    conn: Connection,
    path: PathBuf,
}

/// What storing a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stored {
    pub inserted: u64,
    pub duplicates: u64,
    /// Records moved by the device to a new epoch whose original was already stored.
    pub moved_copies: u64,
    /// The watermark to ack.
    pub acked: u64,
    /// Seqs newly declared lost by the device.
    pub newly_lost: u64,
    /// Seqs the device had been acked for that this store does not hold (SPEC.md §5.5).
    pub hub_lost: u64,
    /// The first seq of the batch for which a different record is stored.
    pub conflict: Option<u64>,
}

const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    fleet TEXT NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL, epoch TEXT NOT NULL,
    seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL,
    data TEXT,
    received_ms INTEGER NOT NULL,
    historical INTEGER NOT NULL DEFAULT 0,
    origin_epoch TEXT, origin_seq INTEGER,
    PRIMARY KEY (fleet, device, stream, epoch, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_origin ON records (fleet, device, stream, origin_epoch, origin_seq)
    WHERE origin_epoch IS NOT NULL;
CREATE TABLE IF NOT EXISTS watermarks (
    fleet TEXT NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL, epoch TEXT NOT NULL,
    acked INTEGER NOT NULL, lost INTEGER NOT NULL DEFAULT 0,
    hub_lost INTEGER NOT NULL DEFAULT 0, conflicts INTEGER NOT NULL DEFAULT 0,
    conflict_at INTEGER,
    PRIMARY KEY (fleet, device, stream, epoch)
);
CREATE TABLE IF NOT EXISTS health (
    fleet TEXT NOT NULL, device TEXT NOT NULL,
    ts_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (fleet, device)
);
CREATE TABLE IF NOT EXISTS hub_losses (
    fleet TEXT NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL, epoch TEXT NOT NULL,
    from_seq INTEGER NOT NULL, to_seq INTEGER NOT NULL, count INTEGER NOT NULL,
    cause TEXT NOT NULL, recorded_ms INTEGER NOT NULL
);
";

/// Version 1 stored every record's data and had no copies, origins or hub losses.
const MIGRATE_FROM_1: &str = "
ALTER TABLE records RENAME TO records_v1;
ALTER TABLE watermarks RENAME TO watermarks_v1;
";
const MIGRATE_FROM_1_COPY: &str = "
INSERT INTO records (fleet, device, stream, epoch, seq, ts_ms, data, received_ms)
    SELECT fleet, device, stream, epoch, seq, ts_ms, data, received_ms FROM records_v1;
INSERT INTO watermarks (fleet, device, stream, epoch, acked, lost)
    SELECT fleet, device, stream, epoch, acked, lost FROM watermarks_v1;
DROP TABLE records_v1;
DROP TABLE watermarks_v1;
";

/// Whether two records' data are the same JSON value (byte-equal text, or equal once parsed:
/// a record stored by an older hub was re-serialised).
fn same_data(a: &str, b: &str) -> bool {
    a == b
        || matches!(
            (serde_json::from_str::<serde_json::Value>(a), serde_json::from_str::<serde_json::Value>(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

impl HubStore {
    pub fn open(path: &Path) -> Result<HubStore, StoreError> {
        let err = |source| StoreError::Sql {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(err)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let has_v1 = version < SCHEMA_VERSION
            && tx
                .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'records'", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(err)?
                > 0;
        if has_v1 {
            tx.execute_batch(MIGRATE_FROM_1).map_err(err)?;
        }
        tx.execute_batch(SCHEMA).map_err(err)?;
        if has_v1 {
            tx.execute_batch(MIGRATE_FROM_1_COPY).map_err(err)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(HubStore {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Store a batch from `fleet`/`device` and return the watermark to ack.
    pub fn store_batch(&mut self, fleet: &str, device: &str, b: &SyncBatch, now_ms: u64) -> Result<Stored, StoreError> {
        if let Some(bad) = b.records.windows(2).find(|w| w[1].seq <= w[0].seq) {
            return Err(StoreError::Malformed(format!(
                "records are not in ascending seq order ({} then {})",
                bad[0].seq, bad[1].seq
            )));
        }
        if b.records.first().is_some_and(|r| r.seq == 0) {
            return Err(StoreError::Malformed("seq 0 does not exist".into()));
        }
        let path = self.path.clone();
        let err = |source| StoreError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let key = (fleet, device, b.stream.as_str(), b.epoch.as_str());
        let (acked, conflict_at): (u64, Option<u64>) = tx
            .query_row(
                "SELECT acked, conflict_at FROM watermarks WHERE fleet=?1 AND device=?2 AND stream=?3 AND epoch=?4",
                params![key.0, key.1, key.2, key.3],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, Option<i64>>(1)?.map(|c| c as u64),
                    ))
                },
            )
            .optional()
            .map_err(err)?
            .unwrap_or((0, None));
        let (lost_through, device_acked) =
            protocol::sync::declared(b.records.first().map(|r| r.seq), b.lost_through, b.acked);
        let mut out = Stored::default();
        let count_stored = |tx: &rusqlite::Transaction<'_>, from: u64, to: u64| -> Result<u64, StoreError> {
            tx.query_row(
                "SELECT count(*) FROM records WHERE fleet=?1 AND device=?2 AND stream=?3 AND epoch=?4 AND seq BETWEEN ?5 AND ?6",
                params![key.0, key.1, key.2, key.3, from as i64, to as i64],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(err)
        };
        // Seqs the device declared lost and that the hub never stored.
        if lost_through > acked {
            out.newly_lost = (lost_through - acked) - count_stored(&tx, acked + 1, lost_through)?;
        }
        // Seqs the device was acked for, that this store does not hold: it is behind (restored
        // or replaced). The device deleted them; record the hole as the hub's own loss.
        let floor = acked.max(lost_through);
        if device_acked > floor {
            let missing = (device_acked - floor) - count_stored(&tx, floor + 1, device_acked)?;
            if missing > 0 {
                out.hub_lost = missing;
                tx.execute(
                    "INSERT INTO hub_losses (fleet, device, stream, epoch, from_seq, to_seq, count, cause, recorded_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'hub_store_behind', ?8)",
                    params![
                        key.0,
                        key.1,
                        key.2,
                        key.3,
                        (floor + 1) as i64,
                        device_acked as i64,
                        missing as i64,
                        now_ms as i64
                    ],
                )
                .map_err(err)?;
            }
        }
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO records
                     (fleet, device, stream, epoch, seq, ts_ms, data, received_ms, historical, origin_epoch, origin_seq)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .map_err(err)?;
            let mut existing = tx
                .prepare_cached(
                    "SELECT ts_ms, data, origin_epoch, origin_seq FROM records
                     WHERE fleet=?1 AND device=?2 AND stream=?3 AND epoch=?4 AND seq=?5",
                )
                .map_err(err)?;
            // Stored copies of a record first assigned as (origin_epoch, origin_seq).
            let mut copies = tx
                .prepare_cached(
                    "SELECT ts_ms, data FROM records WHERE fleet=?1 AND device=?2 AND stream=?3 AND data IS NOT NULL
                     AND ((epoch=?4 AND seq=?5) OR (origin_epoch=?4 AND origin_seq=?5))",
                )
                .map_err(err)?;
            let mut has_copy = |o: &Origin, ts_ms: u64, data: &str| -> Result<bool, StoreError> {
                let mut rows = copies
                    .query(params![key.0, key.1, key.2, o.epoch, o.seq as i64])
                    .map_err(err)?;
                while let Some(row) = rows.next().map_err(err)? {
                    let ts: i64 = row.get(0).map_err(err)?;
                    let d: String = row.get(1).map_err(err)?;
                    if ts as u64 == ts_ms && same_data(&d, data) {
                        return Ok(true);
                    }
                }
                Ok(false)
            };
            // Store a record (or, with `data` None, the marker of a moved copy); false when
            // its identity is taken.
            let mut put = |r: &protocol::messages::Record<'_>, data: Option<&str>| -> Result<bool, StoreError> {
                let o = r.origin.as_ref();
                let n = insert
                    .execute(params![
                        key.0,
                        key.1,
                        key.2,
                        key.3,
                        r.seq as i64,
                        r.ts_ms as i64,
                        data,
                        now_ms as i64,
                        r.historical,
                        o.map(|o| o.epoch.as_str()),
                        o.map(|o| o.seq as i64)
                    ])
                    .map_err(err)?;
                Ok(n == 1)
            };
            for r in &b.records {
                let data = r.data.get();
                let fresh = match &r.origin {
                    // A moved record: a copy of one already stored is kept as a marker only.
                    Some(o) => {
                        let taken = existing
                            .query_row(params![key.0, key.1, key.2, key.3, r.seq as i64], |_| Ok(()))
                            .optional()
                            .map_err(err)?
                            .is_some();
                        if !taken {
                            let copy = has_copy(o, r.ts_ms, data)?;
                            put(r, (!copy).then_some(data))?;
                            if copy {
                                out.moved_copies += 1;
                                continue;
                            }
                        }
                        !taken
                    }
                    None => put(r, Some(data))?,
                };
                if fresh {
                    out.inserted += 1;
                    continue;
                }
                // This identity is stored: the same record again, or a different one.
                let (ts, stored, oe, os): (i64, Option<String>, Option<String>, Option<i64>) = existing
                    .query_row(params![key.0, key.1, key.2, key.3, r.seq as i64], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                    })
                    .map_err(err)?;
                let same = match (stored, oe, os) {
                    (Some(d), ..) => ts as u64 == r.ts_ms && same_data(&d, data),
                    (None, Some(epoch), Some(seq)) => has_copy(&Origin { epoch, seq: seq as u64 }, r.ts_ms, data)?,
                    _ => false,
                };
                if same {
                    out.duplicates += 1;
                } else {
                    out.conflict = Some(r.seq);
                    break;
                }
            }
        }
        let start = acked.max(lost_through).max(device_acked);
        let above: Vec<u64> = {
            let mut st = tx
                .prepare_cached(
                    "SELECT seq FROM records WHERE fleet=?1 AND device=?2 AND stream=?3 AND epoch=?4 AND seq > ?5
                     ORDER BY seq",
                )
                .map_err(err)?;
            let rows = st
                .query_map(params![key.0, key.1, key.2, key.3, start as i64], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(err)?;
            // Only the run that continues the watermark matters: stop at the first gap.
            let mut v = vec![];
            for (expect, s) in (start + 1..).zip(rows) {
                let s = s.map_err(err)? as u64;
                if s != expect {
                    break;
                }
                v.push(s);
            }
            v
        };
        let new_acked = advance_watermark(start, 0, above);
        tx.execute(
            "INSERT INTO watermarks (fleet, device, stream, epoch, acked, lost, hub_lost, conflicts, conflict_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT(fleet, device, stream, epoch) DO UPDATE SET acked = excluded.acked,
                 lost = lost + excluded.lost, hub_lost = hub_lost + excluded.hub_lost,
                 conflicts = conflicts + excluded.conflicts,
                 conflict_at = min(coalesce(conflict_at, excluded.conflict_at), coalesce(excluded.conflict_at, conflict_at))",
            params![
                key.0,
                key.1,
                key.2,
                key.3,
                new_acked as i64,
                out.newly_lost as i64,
                out.hub_lost as i64,
                out.conflict.is_some() as i64,
                out.conflict.map(|c| c as i64)
            ],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        // An ack answers this batch: it never covers seqs the batch did not carry, whose
        // records the hub has not compared with the device's (SPEC §5.5). After a conflict, no
        // ack of this epoch reaches it again.
        out.conflict = match (out.conflict, conflict_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let last = b
            .records
            .last()
            .map_or(0, |r| r.seq)
            .max(device_acked)
            .max(lost_through);
        out.acked = new_acked.min(last);
        if let Some(c) = out.conflict {
            out.acked = out.acked.min(c - 1);
        }
        Ok(out)
    }

    /// Keep `data` as the last health message of a device.
    pub fn set_health(
        &mut self,
        fleet: &str,
        device: &str,
        ts_ms: u64,
        data: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO health (fleet, device, ts_ms, received_ms, data) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(fleet, device) DO UPDATE SET ts_ms = excluded.ts_ms,
                    received_ms = excluded.received_ms, data = excluded.data",
                params![fleet, device, ts_ms as i64, now_ms as i64, data],
            )
            .map(|_| ())
            .map_err(|source| StoreError::Sql {
                path: self.path.clone(),
                source,
            })
    }

    /// The last health message of each device (fleet, device, received_ms, data), by device.
    pub fn health(&self) -> Result<Vec<(String, String, u64, String)>, StoreError> {
        let err = |source| StoreError::Sql {
            path: self.path.clone(),
            source,
        };
        let mut st = self
            .conn
            .prepare("SELECT fleet, device, received_ms, data FROM health ORDER BY fleet, device")
            .map_err(err)?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64, r.get(3)?))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(err)?;
        Ok(rows)
    }

    /// Records of a stream (copies of moved records excluded), oldest first, for one device or
    /// all, from `since_ms` on, of one model name or all (the record's `model.name`). Calls `f`
    /// with (fleet, device, ts_ms, data) for each.
    pub fn each_record(
        &self,
        stream: &str,
        device: Option<&str>,
        model: Option<&str>,
        since_ms: u64,
        mut f: impl FnMut(&str, &str, u64, &str),
    ) -> Result<(), StoreError> {
        let err = |source| StoreError::Sql {
            path: self.path.clone(),
            source,
        };
        let mut st = self
            .conn
            .prepare(
                "SELECT fleet, device, ts_ms, data FROM records
                 WHERE stream = ?1 AND data IS NOT NULL AND ts_ms >= ?2
                   AND (?3 IS NULL OR device = ?3)
                   AND (?4 IS NULL OR (json_valid(data) AND json_extract(data, '$.model.name') = ?4))
                 ORDER BY ts_ms, fleet, device, epoch, seq",
            )
            .map_err(err)?;
        let mut rows = st
            .query(params![stream, since_ms.min(i64::MAX as u64) as i64, device, model])
            .map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let (fleet, device, ts, data): (String, String, i64, String) = (
                r.get(0).map_err(err)?,
                r.get(1).map_err(err)?,
                r.get(2).map_err(err)?,
                r.get(3).map_err(err)?,
            );
            f(&fleet, &device, ts.max(0) as u64, &data);
        }
        Ok(())
    }

    /// Records stored for a device and stream, all epochs (copies of moved records excluded).
    pub fn count(&self, fleet: &str, device: &str, stream: &str) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM records WHERE fleet=?1 AND device=?2 AND stream=?3 AND data IS NOT NULL",
                params![fleet, device, stream],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|source| StoreError::Sql {
                path: self.path.clone(),
                source,
            })
    }

    /// What the store holds, per device, stream and epoch, and every loss it knows of.
    pub fn audit(&self) -> Result<Audit, StoreError> {
        let err = |source| StoreError::Sql {
            path: self.path.clone(),
            source,
        };
        let mut epochs = vec![];
        {
            let mut st = self
                .conn
                .prepare(
                    "SELECT w.fleet, w.device, w.stream, w.epoch, w.acked, w.lost, w.hub_lost, w.conflicts,
                        (SELECT count(*) FROM records r WHERE r.fleet=w.fleet AND r.device=w.device AND r.stream=w.stream
                            AND r.epoch=w.epoch AND r.data IS NOT NULL),
                        (SELECT count(*) FROM records r WHERE r.fleet=w.fleet AND r.device=w.device AND r.stream=w.stream
                            AND r.epoch=w.epoch AND r.data IS NULL),
                        (SELECT count(*) FROM records r WHERE r.fleet=w.fleet AND r.device=w.device AND r.stream=w.stream
                            AND r.epoch=w.epoch AND r.seq <= w.acked),
                        (SELECT count(*) FROM records r WHERE r.fleet=w.fleet AND r.device=w.device AND r.stream=w.stream
                            AND r.epoch=w.epoch AND r.seq > w.acked),
                        (SELECT max(seq) FROM records r WHERE r.fleet=w.fleet AND r.device=w.device AND r.stream=w.stream
                            AND r.epoch=w.epoch),
                        (SELECT count(*) FROM records r WHERE r.fleet=w.fleet AND r.device=w.device AND r.stream=w.stream
                            AND r.epoch=w.epoch AND r.historical)
                     FROM watermarks w ORDER BY w.fleet, w.device, w.stream, w.epoch",
                )
                .map_err(err)?;
            let rows = st
                .query_map([], |r| {
                    let n = |i: usize| r.get::<_, Option<i64>>(i).map(|v| v.unwrap_or(0) as u64);
                    let acked = n(4)?;
                    let (lost, hub_lost, stored_le) = (n(5)?, n(6)?, n(10)?);
                    Ok(EpochAudit {
                        fleet: r.get(0)?,
                        device: r.get(1)?,
                        stream: r.get(2)?,
                        epoch: r.get(3)?,
                        acked,
                        declared_lost: lost,
                        hub_lost,
                        conflicts: n(7)?,
                        records: n(8)?,
                        moved_copies: n(9)?,
                        waiting_above_ack: n(11)?,
                        max_seq: n(12)?,
                        historical: n(13)?,
                        unaccounted: acked.saturating_sub(stored_le + lost + hub_lost),
                    })
                })
                .map_err(err)?;
            for e in rows {
                epochs.push(e.map_err(err)?);
            }
        }
        let mut losses = vec![];
        {
            let mut st = self
                .conn
                .prepare(
                    "SELECT fleet, device, json_extract(data, '$.stream'), json_extract(data, '$.cause'),
                        sum(json_extract(data, '$.count')), max(json_extract(data, '$.last_ms'))
                     FROM records WHERE stream = 'losses' AND data IS NOT NULL AND json_valid(data)
                     GROUP BY 1, 2, 3, 4
                     UNION ALL
                     SELECT fleet, device, stream, cause, sum(count), max(recorded_ms)
                     FROM hub_losses GROUP BY 1, 2, 3, 4
                     ORDER BY 1, 2, 3, 4",
                )
                .map_err(err)?;
            let rows = st
                .query_map([], |r| {
                    Ok(LossAudit {
                        fleet: r.get(0)?,
                        device: r.get(1)?,
                        stream: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                        cause: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                        count: r.get::<_, Option<i64>>(4)?.unwrap_or(0) as u64,
                        last_ms: r.get::<_, Option<i64>>(5)?.unwrap_or(0) as u64,
                    })
                })
                .map_err(err)?;
            for l in rows {
                losses.push(l.map_err(err)?);
            }
        }
        Ok(Audit { epochs, losses })
    }
}

/// `lathe-hub audit`: the store's view of every device's streams.
#[derive(Debug, Clone, Serialize)]
pub struct Audit {
    pub epochs: Vec<EpochAudit>,
    /// Losses by device, stream and cause: those the devices reported (stream `losses`) and
    /// those the hub caused itself (`hub_store_behind`).
    pub losses: Vec<LossAudit>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochAudit {
    pub fleet: String,
    pub device: String,
    pub stream: String,
    pub epoch: String,
    /// Every seq at or below this is stored or lost.
    pub acked: u64,
    /// Records stored (copies of moved records excluded).
    pub records: u64,
    /// Records the device moved to a later epoch whose original was already stored.
    pub moved_copies: u64,
    /// Seqs the device declared lost (`lost_through`).
    pub declared_lost: u64,
    /// Seqs the hub lost itself (its store was behind the device's acks).
    pub hub_lost: u64,
    pub conflicts: u64,
    /// Stored seqs above `acked` (waiting for a gap to fill).
    pub waiting_above_ack: u64,
    pub max_seq: u64,
    /// Records delivered after an outage rather than live.
    pub historical: u64,
    /// Seqs at or below `acked` neither stored nor declared lost: 0 unless the store is broken.
    pub unaccounted: u64,
}

/// The audit as text, a line per epoch and per loss.
pub fn render_audit(a: &Audit) -> String {
    let mut s = String::new();
    if a.epochs.is_empty() {
        s += "no records stored yet\n";
    }
    for e in &a.epochs {
        s += &format!(
            "{}/{} {} epoch {}: acked #{}, {} stored ({} historical), {} moved copies, {} declared lost, {} lost by the hub, {} waiting above the ack, {} conflicts",
            e.fleet, e.device, e.stream, e.epoch, e.acked, e.records, e.historical, e.moved_copies, e.declared_lost, e.hub_lost,
            e.waiting_above_ack, e.conflicts
        );
        if e.unaccounted > 0 {
            s += &format!(", {} UNACCOUNTED", e.unaccounted);
        }
        s += "\n";
    }
    for l in &a.losses {
        s += &format!("lost {}/{} {} {}: {}\n", l.fleet, l.device, l.stream, l.cause, l.count);
    }
    s
}

#[derive(Debug, Clone, Serialize)]
pub struct LossAudit {
    pub fleet: String,
    pub device: String,
    pub stream: String,
    pub cause: String,
    pub count: u64,
    pub last_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::sync::{BatchHeader, BatchWriter};

    const E1: &str = "00000000000000aa";
    const E2: &str = "00000000000000bb";

    /// A record of a test batch: seq, data, origin.
    type R = (u64, String, Option<(&'static str, u64)>);

    struct B {
        epoch: &'static str,
        lost_through: u64,
        acked: u64,
        records: Vec<R>,
    }

    fn b(seqs: &[u64]) -> B {
        B {
            epoch: E1,
            lost_through: 0,
            acked: 0,
            records: seqs.iter().map(|s| (*s, format!("{{\"n\":{s}}}"), None)).collect(),
        }
    }

    impl B {
        fn lost(mut self, l: u64) -> B {
            self.lost_through = l;
            self
        }
        fn acked(mut self, a: u64) -> B {
            self.acked = a;
            self
        }
        fn epoch(mut self, e: &'static str) -> B {
            self.epoch = e;
            self
        }
        fn json(&self) -> Vec<u8> {
            let mut w = BatchWriter::new(
                BatchHeader {
                    device: "d",
                    stream: "predictions",
                    epoch: self.epoch,
                    lost_through: self.lost_through,
                    acked: self.acked,
                },
                256,
            );
            for (seq, data, origin) in &self.records {
                w.push(*seq, 7, data, false, *origin);
            }
            w.finish()
        }
    }

    fn store(s: &mut HubStore, batch: B) -> Stored {
        let bytes = batch.json();
        let parsed: SyncBatch = serde_json::from_slice(&bytes).expect("batch parses");
        s.store_batch("f", "d", &parsed, 0).expect("store")
    }

    fn open() -> (tempfile::TempDir, HubStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = HubStore::open(&dir.path().join("hub.db")).expect("open");
        (dir, s)
    }

    #[test]
    fn duplicates_are_dropped_and_acks_are_contiguous() {
        let (_d, mut s) = open();
        let r = store(&mut s, b(&[1, 2, 3]));
        assert_eq!((r.inserted, r.duplicates, r.acked), (3, 0, 3));
        let r = store(&mut s, b(&[2, 3, 4]));
        assert_eq!((r.inserted, r.duplicates, r.acked), (1, 2, 4));
        // A gap holds the watermark until it is filled.
        assert_eq!(store(&mut s, b(&[6, 7])).acked, 4);
        // An ack answers its batch: the store is whole through 7, the batch ends at 5.
        assert_eq!(store(&mut s, b(&[5])).acked, 5);
        assert_eq!(store(&mut s, b(&[6, 7])).acked, 7);
        assert_eq!(s.count("f", "d", "predictions").expect("count"), 7);
    }

    #[test]
    fn declared_losses_move_the_watermark_and_are_counted() {
        let (_d, mut s) = open();
        store(&mut s, b(&[1]));
        let r = store(&mut s, b(&[5, 6]).lost(4));
        assert_eq!((r.acked, r.newly_lost), (6, 3));
    }

    #[test]
    fn epochs_are_separate() {
        let (_d, mut s) = open();
        store(&mut s, b(&[1, 2]));
        let r = store(&mut s, b(&[1]).epoch(E2));
        assert_eq!((r.inserted, r.acked), (1, 1), "a reflashed device starts a new epoch");
    }

    /// Regression: an empty batch with `lost_through: 1000000000` moved the watermark, so the
    /// hub acked a billion and the device deleted its outbox.
    #[test]
    fn an_empty_batch_declares_no_loss() {
        let (_d, mut s) = open();
        store(&mut s, b(&[1, 2]));
        let r = store(&mut s, b(&[]).lost(1_000_000_000).acked(1_000_000_000));
        assert_eq!((r.acked, r.newly_lost, r.hub_lost), (0, 0, 0));
        assert_eq!(
            s.audit().expect("audit").epochs[0].acked,
            2,
            "the watermark did not move"
        );
        // Declarations at or above the first seq are cut below it.
        let r = store(&mut s, b(&[3]).lost(1_000_000_000).acked(1_000_000_000));
        assert_eq!((r.acked, r.newly_lost, r.hub_lost), (3, 0, 0));
        let r = store(&mut s, b(&[5, 6]).lost(1_000_000_000));
        assert_eq!((r.acked, r.newly_lost), (6, 1), "only seq 4, below the batch, is lost");
    }

    /// Regression: a hub whose database was restored acked its lower watermark forever, and
    /// the device resent the same batch every ack timeout.
    #[test]
    fn a_store_behind_the_device_converges_and_records_its_own_loss() {
        let (_d, mut s) = open();
        // The device was acked through 500 by a store that has since been lost; 1..=100 survive.
        store(&mut s, b(&(1..=100).collect::<Vec<_>>()));
        let r = store(&mut s, b(&[501, 502]).acked(500));
        assert_eq!((r.acked, r.hub_lost, r.inserted), (502, 400, 2));
        let a = s.audit().expect("audit");
        let l = &a.losses[0];
        assert_eq!(
            (l.stream.as_str(), l.cause.as_str(), l.count),
            ("predictions", "hub_store_behind", 400)
        );
        assert_eq!(a.epochs[0].unaccounted, 0);
        // Device drops below its acks are the device's, not the hub's.
        let (_d, mut s) = open();
        let r = store(&mut s, b(&[51]).lost(20).acked(50));
        assert_eq!((r.acked, r.newly_lost, r.hub_lost), (51, 20, 30));
    }

    /// Regression: a gateway restored from an image reused seqs the hub held; its new records
    /// were taken for duplicates and deleted on the device.
    #[test]
    fn a_different_record_under_a_stored_identity_is_a_conflict() {
        let (_d, mut s) = open();
        store(&mut s, b(&(1..=10).collect::<Vec<_>>()));
        let mut restored = b(&[6, 7, 8]);
        restored.records[1].1 = r#"{"n":"new"}"#.into();
        let r = store(&mut s, restored);
        assert_eq!(
            (r.duplicates, r.conflict, r.acked),
            (1, Some(7), 6),
            "acked below the conflict"
        );
        assert_eq!(s.audit().expect("audit").epochs[0].conflicts, 1);
        assert_eq!(
            s.count("f", "d", "predictions").expect("count"),
            10,
            "nothing overwritten"
        );
        // Every later ack of the epoch stays below the conflict, whatever its batch carries.
        let r = store(&mut s, b(&[9, 10]));
        assert_eq!((r.duplicates, r.conflict, r.acked), (2, Some(7), 6));
    }

    /// Regression (found by the restored-state_dir fault test): the hub acked its whole
    /// watermark in answer to a batch of old copies, so the device deleted new records the hub
    /// held different versions of, before the conflict was seen.
    #[test]
    fn an_ack_covers_only_what_its_batch_carried() {
        let (_d, mut s) = open();
        store(&mut s, b(&(1..=10).collect::<Vec<_>>()));
        assert_eq!(store(&mut s, b(&[3, 4])).acked, 4);
        assert_eq!(
            store(&mut s, b(&[]).acked(0)).acked,
            0,
            "an empty batch is answered with nothing"
        );
    }

    #[test]
    fn moved_records_are_stored_once() {
        let (_d, mut s) = open();
        store(&mut s, b(&[1, 2, 3]));
        // The device moved 2..=4 to E2 as 1..=3: 2 and 3 were stored, 4 was not.
        let mut moved = b(&[1, 2, 3]).epoch(E2);
        for (i, r) in moved.records.iter_mut().enumerate() {
            r.1 = format!("{{\"n\":{}}}", i + 2);
            r.2 = Some((E1, i as u64 + 2));
        }
        let r = store(&mut s, moved);
        assert_eq!((r.moved_copies, r.inserted, r.acked), (2, 1, 3));
        assert_eq!(s.count("f", "d", "predictions").expect("count"), 4);
        // Sent again: duplicates, and moved once more to a third epoch they are still copies.
        let mut again = b(&[1]).epoch(E2);
        again.records[0] = (1, "{\"n\":2}".into(), Some((E1, 2)));
        assert_eq!(store(&mut s, again).duplicates, 1);
        let mut third = b(&[1, 2]).epoch("00000000000000cc");
        third.records[0] = (1, "{\"n\":3}".into(), Some((E1, 3)));
        third.records[1] = (2, "{\"n\":4}".into(), Some((E1, 4)));
        let r = store(&mut s, third);
        assert_eq!((r.moved_copies, r.inserted), (2, 0));
        assert_eq!(s.count("f", "d", "predictions").expect("count"), 4);
        // A moved record whose original is a different record is new.
        let mut other = b(&[3]).epoch("00000000000000cc");
        other.records[0] = (3, "{\"n\":\"other\"}".into(), Some((E1, 1)));
        assert_eq!(store(&mut s, other).inserted, 1);
    }

    #[test]
    fn unordered_batches_are_malformed() {
        let (_d, mut s) = open();
        let bytes = b(&[2, 1]).json();
        let parsed: SyncBatch = serde_json::from_slice(&bytes).expect("parses");
        assert!(matches!(
            s.store_batch("f", "d", &parsed, 0),
            Err(StoreError::Malformed(_))
        ));
    }

    #[test]
    fn a_version_1_store_is_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let c = Connection::open(&path).expect("open");
        c.execute_batch(
            "CREATE TABLE records (fleet TEXT NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL, epoch TEXT NOT NULL,
                seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, data TEXT NOT NULL, received_ms INTEGER NOT NULL,
                PRIMARY KEY (fleet, device, stream, epoch, seq)) WITHOUT ROWID;
             CREATE TABLE watermarks (fleet TEXT NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL, epoch TEXT NOT NULL,
                acked INTEGER NOT NULL, lost INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (fleet, device, stream, epoch));
             INSERT INTO records VALUES ('f','d','predictions','00000000000000aa',1,7,'{\"n\":1}',0);
             INSERT INTO watermarks VALUES ('f','d','predictions','00000000000000aa',1,0);",
        )
        .expect("v1 schema");
        drop(c);
        let mut s = HubStore::open(&path).expect("migrates");
        assert_eq!(s.count("f", "d", "predictions").expect("count"), 1);
        let r = store(&mut s, b(&[1, 2]));
        assert_eq!((r.duplicates, r.inserted, r.acked), (1, 1, 2));
    }
}
