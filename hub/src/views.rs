//! Fleet views over the hub's store: drift per device (`lathe-hub drift`), samples exported for
//! retraining (`lathe-hub export`), and the last health of each device (`lathe-hub health`).
//!
//! Records are read as the devices wrote them; one that does not parse as its stream's type is
//! counted as unreadable and skipped, never guessed at.

use crate::store::{HubStore, StoreError};
use lathe::drift::{Measures, Verdict, Window};
use protocol::messages::ModelRef;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {message}")]
    Write { path: String, message: String },
    #[error(
        "no samples of model {model:?}{filter} in the store; the agents keep samples only when [samples] asks them to"
    )]
    NoSamples { model: String, filter: String },
    #[error("{0:?} is not a time: give unix seconds, a date (2026-11-29) or a UTC time (2026-11-29T06:00:00Z)")]
    Time(String),
    #[error("the samples of model {model:?} name more than {MAX_COLUMNS} feature and output columns; narrow the export with --device or --since")]
    TooManyColumns { model: String },
}

/// The alerts of one device and model, and its worst features in the last window.
#[derive(Debug, Serialize)]
pub struct DeviceDrift {
    pub fleet: String,
    pub device: String,
    pub model: ModelRef,
    pub windows: u64,
    /// Windows that alerted, newest first, at most `max_alerts`.
    pub alerts: Vec<Alert>,
    pub alerts_total: u64,
    pub last: Window,
}

#[derive(Debug, Serialize)]
pub struct Alert {
    pub end_ms: u64,
    pub rows: u64,
    /// The alerting features and outputs, worst first.
    pub measures: Vec<Measures>,
}

#[derive(Debug, Serialize)]
pub struct DriftReport {
    pub devices: Vec<DeviceDrift>,
    /// Drift records that do not parse as windows.
    pub unreadable: u64,
}

/// Drift of every device (or one), for every model (or one).
pub fn drift(
    store: &HubStore,
    device: Option<&str>,
    model: Option<&str>,
    max_alerts: usize,
) -> Result<DriftReport, ViewError> {
    let mut by: BTreeMap<(String, String, String, u64), DeviceDrift> = BTreeMap::new();
    let mut unreadable = 0;
    store.each_record(protocol::streams::DRIFT, device, model, 0, |fleet, device, _, data| {
        let Ok(w) = serde_json::from_str::<Window>(data) else {
            unreadable += 1;
            return;
        };
        let key = (
            fleet.to_string(),
            device.to_string(),
            w.model.name.clone(),
            w.model.version,
        );
        let alert = (w.status == Verdict::Alert).then(|| Alert {
            end_ms: w.end_ms,
            rows: w.rows,
            measures: w
                .worst()
                .into_iter()
                .filter(|m| m.status == Verdict::Alert)
                .cloned()
                .collect(),
        });
        let e = by.entry(key).or_insert_with(|| DeviceDrift {
            fleet: fleet.to_string(),
            device: device.to_string(),
            model: w.model.clone(),
            windows: 0,
            alerts: vec![],
            alerts_total: 0,
            last: w.clone(),
        });
        e.windows += 1;
        if let Some(a) = alert {
            e.alerts_total += 1;
            e.alerts.insert(0, a);
            e.alerts.truncate(max_alerts);
        }
        if w.end_ms >= e.last.end_ms {
            e.last = w;
        }
    })?;
    Ok(DriftReport {
        devices: by.into_values().collect(),
        unreadable,
    })
}

fn label(m: &Measures) -> String {
    match m.column {
        Some(c) => format!("{}[{c}]", m.name),
        None => m.name.clone(),
    }
}

pub fn render_drift(r: &DriftReport) -> String {
    let mut s = String::new();
    if r.devices.is_empty() {
        s += "no drift windows stored (devices report them for bundles packed with --baseline)\n";
    }
    for d in &r.devices {
        s += &format!(
            "{}/{}  {} v{}  {} window(s), {} alert(s); last window {} ({} rows): {}\n",
            d.fleet,
            d.device,
            d.model.name,
            d.model.version,
            d.windows,
            d.alerts_total,
            lathe::status::utc(d.last.end_ms / 1000),
            d.last.rows,
            d.last.status.word()
        );
        for a in &d.alerts {
            let what: Vec<String> = a
                .measures
                .iter()
                .take(4)
                .map(|m| format!("{}: {}", label(m), m.reasons.join(", ")))
                .collect();
            s += &format!(
                "  alert  {}  {}\n",
                lathe::status::utc(a.end_ms / 1000),
                what.join("; ")
            );
        }
        let worst: Vec<String> = d
            .last
            .worst()
            .into_iter()
            .take(5)
            .map(|m| {
                let psi = m.psi.map(|p| format!(" PSI {p:.3}")).unwrap_or_default();
                format!("{} {}{psi}", label(m), m.status.word())
            })
            .collect();
        s += &format!("  worst  {}\n", worst.join(", "));
    }
    if r.unreadable > 0 {
        s += &format!("{} drift record(s) could not be read and were skipped\n", r.unreadable);
    }
    s
}

/// A sample record as stored (SPEC §6.5).
#[derive(Debug, Deserialize)]
struct SampleIn {
    ts_ms: u64,
    model: ModelRef,
    reason: String,
    #[serde(default)]
    source: String,
    /// A tabular model's; a tensor model's samples carry `inputs` instead, which an export
    /// leaves out.
    #[serde(default)]
    features: BTreeMap<String, Option<f64>>,
    outputs: BTreeMap<String, Vec<f64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Parquet,
    Csv,
}

/// Rows per Parquet row group: what export holds in memory at once.
const ROW_GROUP: usize = 65_536;
/// The most feature and output columns an export writes: samples come from devices, and a
/// device that names a new feature in every sample must not make the export unbounded.
pub const MAX_COLUMNS: usize = 4096;

/// The export's columns: fixed ones, then features, then outputs (`output_<name>`, with
/// `_<i>` for each value of an output with several).
#[derive(Debug, Default)]
struct Columns {
    features: Vec<String>,
    outputs: Vec<(String, usize)>,
}

impl Columns {
    const FIXED: [&'static str; 6] = ["time", "fleet", "device", "model_version", "reason", "source"];

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = Self::FIXED.iter().map(|s| s.to_string()).collect();
        for f in &self.features {
            v.push(if Self::FIXED.contains(&f.as_str()) {
                format!("feature_{f}")
            } else {
                f.clone()
            });
        }
        for (o, w) in &self.outputs {
            if *w == 1 {
                v.push(format!("output_{o}"));
            } else {
                v.extend((0..*w).map(|i| format!("output_{o}_{i}")));
            }
        }
        v
    }
}

/// One exported row: the fixed columns, then every number column (None = missing).
struct Row {
    ts_ms: u64,
    fleet: String,
    device: String,
    version: u64,
    reason: String,
    source: String,
    numbers: Vec<Option<f64>>,
}

fn to_row(fleet: &str, device: &str, s: SampleIn, cols: &Columns) -> Row {
    let mut numbers: Vec<Option<f64>> = cols
        .features
        .iter()
        .map(|f| s.features.get(f).copied().flatten())
        .collect();
    for (o, w) in &cols.outputs {
        let v = s.outputs.get(o);
        numbers.extend((0..*w).map(|i| v.and_then(|v| v.get(i)).copied().filter(|x| x.is_finite())));
    }
    Row {
        ts_ms: s.ts_ms,
        fleet: fleet.into(),
        device: device.into(),
        version: s.model.version,
        reason: s.reason,
        source: s.source,
        numbers,
    }
}

/// What an export wrote.
#[derive(Debug, PartialEq, Eq)]
pub struct Exported {
    pub rows: u64,
    pub columns: usize,
    pub unreadable: u64,
}

/// Write the samples of `model` (one device or all, from `since_ms`) to `out`.
pub fn export(
    store: &HubStore,
    model: &str,
    device: Option<&str>,
    since_ms: u64,
    format: Format,
    out: &Path,
) -> Result<Exported, ViewError> {
    // First pass: the columns, in the order they first appear.
    let mut cols = Columns::default();
    let (mut rows, mut unreadable, mut too_many) = (0u64, 0u64, false);
    store.each_record(
        protocol::streams::SAMPLES,
        device,
        Some(model),
        since_ms,
        |_, _, _, data| {
            let Ok(s) = serde_json::from_str::<SampleIn>(data) else {
                unreadable += 1;
                return;
            };
            rows += 1;
            if too_many {
                return;
            }
            for f in s.features.keys() {
                if !cols.features.contains(f) {
                    cols.features.push(f.clone());
                }
            }
            for (o, v) in &s.outputs {
                match cols.outputs.iter_mut().find(|(n, _)| n == o) {
                    Some((_, w)) => *w = (*w).max(v.len()),
                    None => cols.outputs.push((o.clone(), v.len())),
                }
            }
            too_many = cols.features.len() + cols.outputs.iter().map(|o| o.1).sum::<usize>() > MAX_COLUMNS;
        },
    )?;
    if too_many {
        return Err(ViewError::TooManyColumns { model: model.into() });
    }
    if rows == 0 {
        return Err(ViewError::NoSamples {
            model: model.into(),
            filter: device.map(|d| format!(" from device {d}")).unwrap_or_default(),
        });
    }
    let werr = |e: &dyn std::fmt::Display| ViewError::Write {
        path: out.display().to_string(),
        message: e.to_string(),
    };
    let file = std::fs::File::create(out).map_err(|e| werr(&e))?;
    let mut sink = match format {
        Format::Csv => Sink::Csv(std::io::BufWriter::new(file)),
        Format::Parquet => Sink::Parquet(parquet_writer(file, &cols).map_err(|e| werr(&e))?),
    };
    sink.header(&cols).map_err(|e| werr(&e))?;
    let mut group = Vec::with_capacity(ROW_GROUP.min(rows as usize));
    let mut failed: Option<String> = None;
    store.each_record(
        protocol::streams::SAMPLES,
        device,
        Some(model),
        since_ms,
        |fleet, device, _, data| {
            if failed.is_some() {
                return;
            }
            let Ok(s) = serde_json::from_str::<SampleIn>(data) else {
                return;
            };
            group.push(to_row(fleet, device, s, &cols));
            if group.len() == ROW_GROUP {
                if let Err(e) = sink.rows(&group, &cols) {
                    failed = Some(e);
                }
                group.clear();
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(werr(&e));
    }
    if !group.is_empty() {
        sink.rows(&group, &cols).map_err(|e| werr(&e))?;
    }
    sink.finish().map_err(|e| werr(&e))?;
    Ok(Exported {
        rows,
        columns: cols.names().len(),
        unreadable,
    })
}

enum Sink {
    Csv(std::io::BufWriter<std::fs::File>),
    Parquet(parquet::file::writer::SerializedFileWriter<std::fs::File>),
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

impl Sink {
    fn header(&mut self, cols: &Columns) -> Result<(), String> {
        if let Sink::Csv(w) = self {
            let names: Vec<String> = cols.names().iter().map(|n| csv_cell(n)).collect();
            writeln!(w, "{}", names.join(",")).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn rows(&mut self, rows: &[Row], cols: &Columns) -> Result<(), String> {
        match self {
            Sink::Csv(w) => {
                for r in rows {
                    let mut cells = vec![
                        iso_utc(r.ts_ms),
                        csv_cell(&r.fleet),
                        csv_cell(&r.device),
                        r.version.to_string(),
                        csv_cell(&r.reason),
                        csv_cell(&r.source),
                    ];
                    cells.extend(r.numbers.iter().map(|n| n.map(|x| x.to_string()).unwrap_or_default()));
                    writeln!(w, "{}", cells.join(",")).map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Sink::Parquet(w) => write_group(w, rows, cols).map_err(|e| e.to_string()),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self {
            Sink::Csv(mut w) => w.flush().map_err(|e| e.to_string()),
            Sink::Parquet(w) => w.close().map(|_| ()).map_err(|e| e.to_string()),
        }
    }
}

fn parquet_writer(
    file: std::fs::File,
    cols: &Columns,
) -> parquet::errors::Result<parquet::file::writer::SerializedFileWriter<std::fs::File>> {
    use parquet::basic::{LogicalType, Repetition, TimeUnit, Type as Physical};
    use parquet::schema::types::Type;
    use std::sync::Arc;
    let names = cols.names();
    let mut fields = vec![];
    for (i, name) in names.iter().enumerate() {
        let t = match i {
            0 => Type::primitive_type_builder(name, Physical::INT64)
                .with_repetition(Repetition::REQUIRED)
                .with_logical_type(Some(LogicalType::timestamp(true, TimeUnit::MILLIS)))
                .build()?,
            3 => Type::primitive_type_builder(name, Physical::INT64)
                .with_repetition(Repetition::REQUIRED)
                .build()?,
            1 | 2 | 4 | 5 => Type::primitive_type_builder(name, Physical::BYTE_ARRAY)
                .with_repetition(Repetition::REQUIRED)
                .with_logical_type(Some(LogicalType::String))
                .build()?,
            _ => Type::primitive_type_builder(name, Physical::DOUBLE)
                .with_repetition(Repetition::OPTIONAL)
                .build()?,
        };
        fields.push(Arc::new(t));
    }
    let schema = Type::group_type_builder("samples").with_fields(fields).build()?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_created_by(format!("lathe-hub {}", env!("CARGO_PKG_VERSION")))
        .build();
    parquet::file::writer::SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props))
}

fn write_group(
    w: &mut parquet::file::writer::SerializedFileWriter<std::fs::File>,
    rows: &[Row],
    cols: &Columns,
) -> parquet::errors::Result<()> {
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
    let mut g = w.next_row_group()?;
    let n_numbers = cols.names().len() - Columns::FIXED.len();
    let mut i = 0;
    while let Some(mut c) = g.next_column()? {
        match i {
            0 | 3 => {
                let v: Vec<i64> = rows
                    .iter()
                    .map(|r| if i == 0 { r.ts_ms as i64 } else { r.version as i64 })
                    .collect();
                c.typed::<Int64Type>().write_batch(&v, None, None)?;
            }
            1 | 2 | 4 | 5 => {
                let v: Vec<ByteArray> = rows
                    .iter()
                    .map(|r| {
                        let s = match i {
                            1 => &r.fleet,
                            2 => &r.device,
                            4 => &r.reason,
                            _ => &r.source,
                        };
                        ByteArray::from(s.as_str())
                    })
                    .collect();
                c.typed::<ByteArrayType>().write_batch(&v, None, None)?;
            }
            k => {
                let j = k - Columns::FIXED.len();
                debug_assert!(j < n_numbers);
                let values: Vec<f64> = rows.iter().filter_map(|r| r.numbers[j]).collect();
                let defs: Vec<i16> = rows.iter().map(|r| i16::from(r.numbers[j].is_some())).collect();
                c.typed::<DoubleType>().write_batch(&values, Some(&defs), None)?;
            }
        }
        c.close()?;
        i += 1;
    }
    g.close()?;
    Ok(())
}

/// Unix milliseconds as an ISO 8601 UTC time with milliseconds.
fn iso_utc(ms: u64) -> String {
    let d = lathe::status::utc(ms / 1000); // "2026-11-29 18:46:15 UTC"
    format!("{}T{}.{:03}Z", &d[..10], &d[11..19], ms % 1000)
}

/// `--since`: unix seconds, a date, or a UTC date and time; returns unix milliseconds.
pub fn parse_time(s: &str) -> Result<u64, ViewError> {
    let bad = || ViewError::Time(s.to_string());
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs * 1000);
    }
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, t.trim_end_matches('Z')),
        None => (s, "00:00:00"),
    };
    let num = |p: &str| p.parse::<i64>().map_err(|_| bad());
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || !(2..=3).contains(&t.len()) {
        return Err(bad());
    }
    let (y, m, day) = (num(d[0])?, num(d[1])?, num(d[2])?);
    let (h, min) = (num(t[0])?, num(t[1])?);
    let sec = if t.len() == 3 { num(t[2])? } else { 0 };
    if !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || !(0..24).contains(&h)
        || !(0..60).contains(&min)
        || !(0..=60).contains(&sec)
    {
        return Err(bad());
    }
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + min * 60 + sec;
    u64::try_from(secs).map(|s| s * 1000).map_err(|_| bad())
}

/// `lathe-hub health`: the last health message of each device.
pub fn render_health(rows: &[(String, String, u64, String)]) -> String {
    let mut s = String::new();
    if rows.is_empty() {
        s += "no health messages stored yet (devices send one every health.interval_secs while connected)\n";
    }
    for (fleet, device, received_ms, data) in rows {
        let h: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
        let sys = &h["system"];
        let pct = |v: &serde_json::Value| v.as_f64().map(|p| format!("{p:.0}%")).unwrap_or_else(|| "?".into());
        let mib = |v: &serde_json::Value| {
            v.as_u64()
                .map(|b| format!("{} MiB", b >> 20))
                .unwrap_or_else(|| "?".into())
        };
        s += &format!(
            "{fleet}/{device}  received {}  cpu {}  memory {} of {}  agent rss {}  disk free {}  outbox {}\n",
            lathe::status::utc(received_ms / 1000),
            pct(&sys["cpu_percent"]),
            mib(&sys["memory_used_bytes"]),
            mib(&sys["memory_total_bytes"]),
            mib(&h["process"]["rss_bytes"]),
            mib(&h["disk_free_bytes"]),
            h["outbox_depth"]
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples are read as devices wrote them: one that does not parse is skipped and counted,
    /// and a device naming ever more features cannot make the export unbounded.
    #[test]
    fn exports_count_what_they_skip_and_bound_their_columns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = HubStore::open(&dir.path().join("hub.db")).expect("store");
        let sample = |seq: u64, features: &str| {
            format!(
                r#"{{"seq":{seq},"ts_ms":{seq},"data":{{"ts_ms":{seq},"model":{{"name":"m","version":2}},"reason":"every","source":"t","features":{features},"outputs":{{"y":[0.5]}}}}}}"#
            )
        };
        let mut records = vec![
            sample(1, r#"{"a":1.5,"b":null}"#),
            sample(2, r#"{"a":2.5,"b":3.0}"#),
            r#"{"seq":3,"ts_ms":3,"data":{"model":{"name":"m","version":2},"nonsense":true}}"#.to_string(),
        ];
        let batch = |records: &[String]| {
            format!(
                r#"{{"device":"d1","stream":"samples","epoch":"00000000000000aa","records":[{}]}}"#,
                records.join(",")
            )
        };
        let text = batch(&records);
        let b: protocol::messages::SyncBatch = serde_json::from_str(&text).expect("batch");
        store.store_batch("f", "d1", &b, 10).expect("stored");
        let out = dir.path().join("s.csv");
        let e = export(&store, "m", None, 0, Format::Csv, &out).expect("export");
        assert_eq!((e.rows, e.columns, e.unreadable), (2, 9, 1));
        let text = std::fs::read_to_string(&out).expect("csv");
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "time,fleet,device,model_version,reason,source,a,b,output_y",
                "1970-01-01T00:00:00.001Z,f,d1,2,every,t,1.5,,0.5",
                "1970-01-01T00:00:00.002Z,f,d1,2,every,t,2.5,3,0.5",
            ]
        );
        let many: String = (0..=MAX_COLUMNS)
            .map(|i| format!(r#""f{i}":1"#))
            .collect::<Vec<_>>()
            .join(",");
        records = vec![sample(4, &format!("{{{many}}}"))];
        let text = batch(&records);
        let b: protocol::messages::SyncBatch = serde_json::from_str(&text).expect("batch");
        store.store_batch("f", "d1", &b, 10).expect("stored");
        let e = export(&store, "m", None, 0, Format::Parquet, &dir.path().join("s.parquet")).expect_err("bounded");
        assert!(e.to_string().contains("more than 4096"), "{e}");
    }

    #[test]
    fn times() {
        let check = |s: &str, want: Option<u64>| assert_eq!(parse_time(s).ok(), want, "{s}");
        check("0", Some(0));
        check("1764403200", Some(1_764_403_200_000));
        check("1970-01-02", Some(86_400_000));
        check("2026-11-29T06:00:00Z", Some(1_795_932_000_000));
        check("2026-11-29 06:00", Some(1_795_932_000_000));
        check("2026-13-01", None);
        check("yesterday", None);
        assert_eq!(iso_utc(1_795_932_000_123), "2026-11-29T06:00:00.123Z");
    }
}
