//! Sync batches on the wire (SPEC.md §5): the encoder the agent uses, the bounded decoder the
//! hub uses, and the rule for what a hub may believe of a batch's declarations.
//!
//! A batch payload is JSON, or a zstd frame whose content is that JSON. A decoder tells them
//! apart by the frame's magic number and never inflates more than its limit, so a small
//! compressed payload cannot expand into gigabytes.

use std::borrow::Cow;
use std::io::Read;

/// The first four bytes of a zstd frame (RFC 8878).
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// The name a hub gives zstd in an ack's `accepts`.
pub const ZSTD: &str = "zstd";

/// The largest batch JSON (after decompression) every hub accepts.
pub const MAX_BATCH_JSON: usize = 16 << 20;

/// Bytes a record adds to a batch besides its data, at most: seq, time, the historical flag
/// and an origin.
pub const RECORD_OVERHEAD: usize = 160;

/// Bytes of a batch besides its records, at most (names are at most 64 bytes).
pub const BATCH_OVERHEAD: usize = 320;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("batch inflates past {limit} bytes; refused")]
    TooLarge { limit: usize },
    #[error("batch is not valid zstd: {0}")]
    Zstd(String),
}

/// The batch's JSON: the payload itself, or the payload decompressed, up to `max_json` bytes.
pub fn decode(payload: &[u8], max_json: usize) -> Result<Cow<'_, [u8]>, DecodeError> {
    if !payload.starts_with(&ZSTD_MAGIC) {
        if payload.len() > max_json {
            return Err(DecodeError::TooLarge { limit: max_json });
        }
        return Ok(Cow::Borrowed(payload));
    }
    let decoder = zstd::stream::read::Decoder::new(payload).map_err(|e| DecodeError::Zstd(e.to_string()))?;
    let mut out = Vec::with_capacity((payload.len() * 4).min(max_json));
    decoder
        .take(max_json as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Zstd(e.to_string()))?;
    if out.len() > max_json {
        return Err(DecodeError::TooLarge { limit: max_json });
    }
    Ok(Cow::Owned(out))
}

/// Compress a batch's JSON into one zstd frame.
pub fn compress(json: &[u8], level: i32) -> Vec<u8> {
    zstd::bulk::compress(json, level).expect("zstd compresses any input held in memory")
}

/// The header of a batch being written.
#[derive(Debug, Clone, Copy)]
pub struct BatchHeader<'a> {
    pub device: &'a str,
    pub stream: &'a str,
    pub epoch: &'a str,
    pub lost_through: u64,
    pub acked: u64,
}

/// Writes a batch's JSON record by record, without building a value tree. Record data is
/// copied verbatim: the caller guarantees it is one JSON value (it wrote it itself).
#[derive(Debug)]
pub struct BatchWriter {
    buf: Vec<u8>,
    records: usize,
}

fn json_str(buf: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *buf, s).expect("writing a string to memory cannot fail");
}

impl BatchWriter {
    pub fn new(h: BatchHeader<'_>, capacity: usize) -> BatchWriter {
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(b"{\"device\":");
        json_str(&mut buf, h.device);
        buf.extend_from_slice(b",\"stream\":");
        json_str(&mut buf, h.stream);
        buf.extend_from_slice(b",\"epoch\":");
        json_str(&mut buf, h.epoch);
        buf.extend_from_slice(
            format!(
                ",\"lost_through\":{},\"acked\":{},\"records\":[",
                h.lost_through, h.acked
            )
            .as_bytes(),
        );
        BatchWriter { buf, records: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn records(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    pub fn push(&mut self, seq: u64, ts_ms: u64, data: &str, historical: bool, origin: Option<(&str, u64)>) {
        use std::io::Write;
        if self.records > 0 {
            self.buf.push(b',');
        }
        write!(self.buf, "{{\"seq\":{seq},\"ts_ms\":{ts_ms},\"data\":").expect("memory write");
        self.buf.extend_from_slice(data.as_bytes());
        if historical {
            self.buf.extend_from_slice(b",\"historical\":true");
        }
        if let Some((epoch, seq)) = origin {
            self.buf.extend_from_slice(b",\"origin\":{\"epoch\":");
            json_str(&mut self.buf, epoch);
            write!(self.buf, ",\"seq\":{seq}}}").expect("memory write");
        }
        self.buf.push(b'}');
        self.records += 1;
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(b"]}");
        self.buf
    }
}

/// What a hub may take from a batch's declarations: `lost_through` and `acked` count only
/// below the batch's first seq, and an empty batch declares nothing (SPEC.md §5.4).
pub fn declared(first_seq: Option<u64>, lost_through: u64, acked: Option<u64>) -> (u64, u64) {
    match first_seq {
        None => (0, 0),
        Some(f) => {
            let below = f.saturating_sub(1);
            (lost_through.min(below), acked.unwrap_or(0).min(below))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::SyncBatch;

    fn written() -> Vec<u8> {
        let mut w = BatchWriter::new(
            BatchHeader {
                device: "d",
                stream: "predictions",
                epoch: "00000000000000aa",
                lost_through: 3,
                acked: 4,
            },
            64,
        );
        w.push(5, 100, r#"{"a":[1,2.5]}"#, false, None);
        w.push(6, 101, r#""text""#, true, Some(("00000000000000bb", 9)));
        assert_eq!(w.records(), 2);
        w.finish()
    }

    #[test]
    fn written_batches_parse_back() {
        let bytes = written();
        let b: SyncBatch = serde_json::from_slice(&bytes).expect("parses");
        assert_eq!(
            (b.device.as_str(), b.stream.as_str(), b.lost_through, b.acked),
            ("d", "predictions", 3, Some(4))
        );
        assert_eq!(b.records.len(), 2);
        assert_eq!(b.records[0].data.get(), r#"{"a":[1,2.5]}"#);
        assert!(!b.records[0].historical && b.records[0].origin.is_none());
        assert!(b.records[1].historical);
        let o = b.records[1].origin.as_ref().expect("origin");
        assert_eq!((o.epoch.as_str(), o.seq), ("00000000000000bb", 9));
    }

    #[test]
    fn compressed_batches_decode_within_the_limit() {
        let json = written();
        let z = compress(&json, 3);
        assert!(z.starts_with(&ZSTD_MAGIC));
        assert_eq!(decode(&z, 1 << 20).expect("decodes").as_ref(), json.as_slice());
        assert_eq!(decode(&json, 1 << 20).expect("plain").as_ref(), json.as_slice());
        assert_eq!(decode(&json, 10), Err(DecodeError::TooLarge { limit: 10 }));
        // A bomb: 64 MiB of zeros compress to a few KiB and are refused at the limit.
        let bomb = compress(&vec![b'0'; 64 << 20], 3);
        assert!(bomb.len() < 64 << 10);
        assert_eq!(decode(&bomb, 1 << 20), Err(DecodeError::TooLarge { limit: 1 << 20 }));
        assert!(matches!(
            decode(&[0x28, 0xB5, 0x2F, 0xFD, 1, 2, 3], 100),
            Err(DecodeError::Zstd(_))
        ));
    }

    #[test]
    fn declarations_count_only_below_the_first_seq() {
        assert_eq!(declared(None, 1_000_000_000, Some(1_000_000_000)), (0, 0));
        assert_eq!(declared(Some(1), 1_000_000_000, Some(5)), (0, 0));
        assert_eq!(declared(Some(501), 200, Some(500)), (200, 500));
        assert_eq!(declared(Some(501), 900, None), (500, 0));
    }
}
