//! `lathe doctor`: checks everything a running agent depends on and says what to fix, in the
//! manner of `iotedge check`.
//!
//! - It only reads: the store is opened read-only, the brokers are reached with the doctor's
//!   own client id (`<client id>-doctor`, a clean session, never the agent's), and the active
//!   models are loaded in memory, by the same check a deploy makes. It can run beside a live
//!   agent.
//! - Each check ends `ok`, `warn`, `fail` or `skipped` (a check whose premise failed), and every
//!   warning and failure carries one concrete fix.
//! - The checks are plain functions from what they read to [`Check`]s; `run` does the I/O.

use crate::config::{BrokerConfig, Config};
use crate::deploy::{DeployState, Installed};
use crate::store::Store;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Warn,
    Fail,
    Skipped,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked: `config`, `secrets`, `state_dir`, `trust`, `broker`, …
    pub check: String,
    pub outcome: Outcome,
    pub message: String,
    /// What to do about a warning or a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(check: &str, message: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            outcome: Outcome::Ok,
            message: message.into(),
            fix: None,
        }
    }
    fn warn(check: &str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            outcome: Outcome::Warn,
            fix: Some(fix.into()),
            ..Check::ok(check, message)
        }
    }
    fn fail(check: &str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            outcome: Outcome::Fail,
            fix: Some(fix.into()),
            ..Check::ok(check, message)
        }
    }
    fn skipped(check: &str, message: impl Into<String>) -> Check {
        Check {
            outcome: Outcome::Skipped,
            ..Check::ok(check, message)
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub config: String,
    /// No check failed (warnings allowed).
    pub ok: bool,
    pub failures: usize,
    pub warnings: usize,
    pub checks: Vec<Check>,
}

impl Report {
    fn new(config: &Path, checks: Vec<Check>) -> Report {
        let count = |o| checks.iter().filter(|c| c.outcome == o).count();
        let (failures, warnings) = (count(Outcome::Fail), count(Outcome::Warn));
        Report {
            config: config.display().to_string(),
            ok: failures == 0,
            failures,
            warnings,
            checks,
        }
    }

    /// Whether the config itself failed to load (nothing else could be checked).
    pub fn config_failed(&self) -> bool {
        self.checks
            .iter()
            .any(|c| c.check == "config" && c.outcome == Outcome::Fail)
    }
}

/// What `lathe doctor` may be told.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long a broker may take to accept a connection.
    pub connect_timeout: Duration,
    /// Warn about a certificate this many days before it expires.
    pub cert_warn_days: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(10),
            cert_warn_days: 30,
        }
    }
}

/// Run every check for the config at `path`.
pub fn run(path: &Path, opts: &Options) -> Report {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            let fix = format!(
                "correct {} as the message says; `lathe run` refuses to start until it is fixed",
                path.display()
            );
            return Report::new(path, vec![Check::fail("config", format!("{e:#}"), fix)]);
        }
    };
    let now = Utc::now();
    let slots = cfg.slots();
    let mut checks = vec![Check::ok(
        "config",
        format!(
            "{} is valid: device {}/{}, {} model slot(s)",
            path.display(),
            cfg.fleet(),
            cfg.device(),
            slots.len()
        ),
    )];
    checks.push(secrets(path, &cfg));
    checks.extend(state_dir(&cfg));
    let trust = crate::agent::load_trust(&cfg);
    checks.push(match &trust {
        Ok(t) => Check::ok(
            "trust",
            format!(
                "{} key(s) trusted, {} signature(s) required ({})",
                t.store.len(),
                t.threshold,
                match &t.key_set {
                    Some(k) => format!("the key set #{} this device accepted", k.counter),
                    None => format!("from {}", cfg.trust.keys_file.display()),
                }
            ),
        ),
        Err(e) => Check::fail(
            "trust",
            format!("{e:#}"),
            "give trust.keys_file a file of public keys (lathe-hub keygen makes them) holding at least trust.threshold keys",
        ),
    });
    checks.extend(brokers(&cfg, opts));
    checks.extend(certificates(&cfg, now, opts.cert_warn_days));
    let db = cfg.db_path();
    let store = db.exists().then(|| Store::open_readonly(&db));
    let meta = |key: &str| -> Option<String> {
        match &store {
            Some(Ok(s)) => s.get_meta(key).ok().flatten(),
            _ => None,
        }
    };
    let mut states = vec![];
    for slot in &slots {
        let state: Option<DeployState> = meta(&crate::config::slot_key("deploy_state", slot.name.as_deref()))
            .and_then(|s| serde_json::from_str(&s).ok());
        states.push((slot.name.clone(), state.unwrap_or_default()));
    }
    let mut created = vec![];
    for (slot, state) in &states {
        let check = match (&store, &trust) {
            (None, _) => Check::warn(
                "model",
                format!(
                    "no outbox database in {}: the agent has not run here yet",
                    cfg.device.state_dir.display()
                ),
                "start the agent (systemctl start lathe), then deploy a model",
            ),
            (Some(Err(e)), _) => Check::fail(
                "model",
                format!("cannot read the deploy state: {e}"),
                "the database may be damaged; `lathe run` checks it at start (see its log)",
            ),
            (_, Err(_)) => Check::skipped("model", "no trust store to verify the installed bundle with"),
            (Some(Ok(_)), Ok(t)) => {
                let dir = cfg.slot_dir(slot.as_deref(), false);
                let (check, signed) = model(&dir, t, slot.as_deref(), state);
                created.extend(signed);
                check
            }
        };
        checks.push(check);
    }
    let heartbeat = meta("heartbeat_ms").and_then(|h| h.parse::<u64>().ok());
    checks.push(clock(now, heartbeat, &created));
    Report::new(path, checks)
}

/// Secrets must not be readable by every user: the config when it holds a password inline,
/// the password files and the TLS keys it names.
fn secrets(path: &Path, cfg: &Config) -> Check {
    let brokers: Vec<&BrokerConfig> = sections(cfg).into_iter().map(|(_, b)| b).collect();
    let mut files = vec![];
    if brokers.iter().any(|b| b.password.is_some()) {
        files.push(("the config, which holds a password", path.to_path_buf()));
    }
    for b in &brokers {
        if let Some(p) = &b.password_file {
            files.push(("the password file", p.clone()));
        }
        if let Some(k) = b.tls.as_ref().and_then(|t| t.key_file.clone()) {
            files.push(("the TLS key", k));
        }
    }
    let mut open = vec![];
    for (what, f) in &files {
        match std::fs::metadata(f) {
            Ok(m) if m.mode() & 0o004 != 0 => {
                open.push(format!("{what} {} (mode {:o})", f.display(), m.mode() & 0o777))
            }
            Ok(_) => {}
            Err(e) => {
                return Check::fail(
                    "secrets",
                    format!("{what} {}: {e}", f.display()),
                    "create it, readable by the agent's user only (chmod 600), or correct the path in the config",
                )
            }
        }
    }
    if open.is_empty() {
        Check::ok(
            "secrets",
            match files.len() {
                0 => "the config names no password or private key".to_string(),
                n => format!("{n} secret file(s), none readable by every user"),
            },
        )
    } else {
        Check::fail(
            "secrets",
            format!("readable by every user: {}", open.join(", ")),
            "chmod o-rwx each file (chown root:lathe and chmod 640 the config), or move the secret into a credential (/etc/credstore, LoadCredential= in the unit)",
        )
    }
}

/// The state_dir exists, is a directory this user can write, is not open to every user, and
/// its filesystem has room above `outbox.min_free_bytes`.
fn state_dir(cfg: &Config) -> Vec<Check> {
    let dir = &cfg.device.state_dir;
    let shown = dir.display();
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return vec![Check::warn(
                "state_dir",
                format!("{shown} does not exist yet"),
                format!("start the agent, which makes it (under systemd, StateDirectory= does), or: mkdir -p {shown} && chown lathe:lathe {shown}"),
            )]
        }
        Err(e) => {
            return vec![Check::fail(
                "state_dir",
                format!("{shown}: {e}"),
                format!("make {shown} a directory the agent's user owns, or set device.state_dir"),
            )]
        }
    };
    if !meta.is_dir() {
        return vec![Check::fail(
            "state_dir",
            format!("{shown} is not a directory"),
            "set device.state_dir to a directory",
        )];
    }
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    let writable = std::fs::File::create(&probe);
    let _ = std::fs::remove_file(&probe);
    let db = cfg.db_path();
    let db_writable = match db.exists() {
        true => std::fs::OpenOptions::new().read(true).write(true).open(&db).map(|_| ()),
        false => Ok(()),
    };
    let mut checks = vec![];
    match writable.map(|_| ()).and(db_writable) {
        Ok(()) if meta.mode() & 0o007 != 0 => checks.push(Check::warn(
            "state_dir",
            format!(
                "{shown} is open to every user (mode {:o}): the outbox holds the plant's data",
                meta.mode() & 0o777
            ),
            format!("chmod 700 {shown}"),
        )),
        Ok(()) => checks.push(Check::ok(
            "state_dir",
            format!(
                "{shown} is writable (owner uid {}, mode {:o})",
                meta.uid(),
                meta.mode() & 0o777
            ),
        )),
        Err(e) => checks.push(Check::fail(
            "state_dir",
            format!("{shown} cannot be written: {e}"),
            format!("the agent's user must own it: chown -R lathe:lathe {shown}"),
        )),
    }
    checks.push(free_space(crate::store::free_bytes(dir), cfg.outbox.min_free_bytes));
    checks
}

fn free_space(free: Option<u64>, floor: u64) -> Check {
    let Some(free) = free else {
        return Check::skipped("disk", "the filesystem's free space cannot be read");
    };
    let (f, m) = (crate::status::human_bytes(free), crate::status::human_bytes(floor));
    if free < floor {
        Check::fail(
            "disk",
            format!("{f} free, under outbox.min_free_bytes ({m}): new records replace the oldest or are refused"),
            "free space on the state_dir's filesystem, or lower outbox.min_free_bytes",
        )
    } else if free < floor.saturating_mul(2) {
        Check::warn(
            "disk",
            format!("{f} free, less than twice outbox.min_free_bytes ({m})"),
            "free space on the state_dir's filesystem before the outbox reaches its floor",
        )
    } else {
        Check::ok("disk", format!("{f} free (the outbox keeps {m} free)"))
    }
}

/// Each broker section the agent uses, by its name in the config.
fn sections(cfg: &Config) -> Vec<(&'static str, &BrokerConfig)> {
    std::iter::once(("broker", &cfg.broker))
        .chain(cfg.inputs.broker.as_ref().map(|b| ("inputs.broker", b)))
        .collect()
}

/// Connect to each broker the agent uses, as the agent would, and wait for its CONNACK.
fn brokers(cfg: &Config, opts: &Options) -> Vec<Check> {
    let base = cfg
        .broker
        .client_id
        .clone()
        .unwrap_or_else(|| format!("lathe-{}-{}", cfg.fleet(), cfg.device()));
    let list: Vec<(&str, &BrokerConfig, String)> = sections(cfg)
        .into_iter()
        .map(|(name, b)| {
            let id = match name {
                "broker" => base.clone(),
                _ => b.client_id.clone().unwrap_or_else(|| format!("{base}-sensors")),
            };
            (name, b, format!("{id}-doctor"))
        })
        .collect();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return vec![Check::skipped("broker", format!("cannot start a runtime: {e}"))],
    };
    list.into_iter()
        .map(|(name, b, id)| rt.block_on(broker(name, b, id, opts.connect_timeout)))
        .collect()
}

async fn broker(name: &str, b: &BrokerConfig, client_id: String, timeout: Duration) -> Check {
    let addr = format!("{}:{}", b.host, b.port);
    let mut mqtt = match crate::link::options(b, client_id.clone(), None) {
        Ok(o) => o,
        Err(e) => {
            return Check::fail(
                name,
                e.to_string(),
                "the file must exist and be readable by the agent's user; correct the path in the config",
            )
        }
    };
    mqtt.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = crate::link::connect(mqtt, 4);
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(timeout, async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    let how = format!(
        "{}, {}",
        if b.tls.is_some() { "TLS" } else { "plain MQTT" },
        match &b.username {
            Some(u) => format!("as user {u}"),
            None => "anonymous".into(),
        }
    );
    let check = match result {
        Ok(Ok(())) => Check::ok(
            name,
            format!("connected to {addr} ({how}) in {} ms", started.elapsed().as_millis()),
        ),
        Ok(Err(e)) => connection_failed(name, &addr, &e),
        Err(_) => Check::fail(
            name,
            format!("{addr} did not accept a connection within {} s", timeout.as_secs()),
            format!("check the network path and firewall to {addr}, and that it speaks MQTT on that port (a TLS port needs [broker.tls])"),
        ),
    };
    if check.outcome == Outcome::Ok {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(ev) = eventloop.poll().await {
                if matches!(ev, rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    check
}

/// A failed connection, with what to do about it.
fn connection_failed(name: &str, addr: &str, e: &rumqttc::ConnectionError) -> Check {
    use rumqttc::{ConnectReturnCode as Code, ConnectionError as E};
    let (message, fix) = match e {
        E::ConnectionRefused(Code::BadUserNamePassword | Code::NotAuthorized) => (
            format!("{addr} refused the credentials ({e})"),
            format!("check {name}.username and its password (password, password_file or the credential) against the broker's accounts"),
        ),
        E::ConnectionRefused(Code::BadClientId) => (
            format!("{addr} refused the client id ({e})"),
            format!("check {name}.client_id against the broker's rules for client ids"),
        ),
        E::ConnectionRefused(_) => (
            format!("{addr} refused the connection ({e})"),
            "check the broker's log for why it refused this client".to_string(),
        ),
        E::Tls(t) => (
            format!("TLS with {addr} failed: {t}"),
            format!("check that {name}.tls.ca_file holds the CA that signed the broker's certificate, that the certificate names {}, and that the clock is right", addr.rsplit_once(':').map_or(addr, |(h, _)| h)),
        ),
        E::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => (
            format!("nothing accepts connections on {addr} ({io})"),
            format!("start the broker, or correct {name}.host and {name}.port"),
        ),
        E::Io(io) => (
            format!("cannot reach {addr}: {io}"),
            format!("check {name}.host (a name must resolve), the network path and the firewall to {addr}"),
        ),
        E::NetworkTimeout | E::FlushTimeout => (
            format!("{addr} did not answer in time"),
            format!("check the network path and firewall to {addr}, and that it speaks MQTT on that port (a TLS port needs [{name}.tls])"),
        ),
        other => (
            format!("{addr}: {other}"),
            format!("check that {addr} is an MQTT 3.1.1 broker"),
        ),
    };
    Check::fail(name, message, fix)
}

/// A certificate's validity, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// Read one DER item: (tag, contents, rest).
fn der_item(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n].iter().fold(0usize, |acc, &x| (acc << 8) | x as usize);
        b = &b[n..];
        len
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

fn der_time(tag: u8, v: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(v).ok()?;
    let t = match tag {
        // UTCTime: two-digit years 50–99 are 19xx (RFC 5280 §4.1.2.5.1).
        0x17 => {
            let yy: u32 = text.get(..2)?.parse().ok()?;
            let century = if yy >= 50 { "19" } else { "20" };
            NaiveDateTime::parse_from_str(&format!("{century}{text}"), "%Y%m%d%H%M%SZ").ok()?
        }
        0x18 => NaiveDateTime::parse_from_str(text, "%Y%m%d%H%M%SZ").ok()?,
        _ => return None,
    };
    Some(t.and_utc().timestamp())
}

/// The validity of a DER certificate (RFC 5280 §4.1): the fifth member of `tbsCertificate`,
/// after the optional version.
pub fn validity(der: &[u8]) -> Option<Validity> {
    let (0x30, cert, _) = der_item(der)? else { return None };
    let (0x30, tbs, _) = der_item(cert)? else { return None };
    let (tag, _, mut rest) = der_item(tbs)?;
    if tag != 0xa0 {
        rest = tbs;
    }
    for _ in 0..3 {
        rest = der_item(rest)?.2; // serial, signature algorithm, issuer
    }
    let (0x30, validity, _) = der_item(rest)? else {
        return None;
    };
    let (t1, v1, rest) = der_item(validity)?;
    let (t2, v2, _) = der_item(rest)?;
    Some(Validity {
        not_before: der_time(t1, v1)?,
        not_after: der_time(t2, v2)?,
    })
}

fn date(secs: i64) -> String {
    DateTime::from_timestamp(secs, 0).map_or_else(|| secs.to_string(), |d| d.format("%Y-%m-%d %H:%M UTC").to_string())
}

/// Judge one certificate at `now`.
fn judge_cert(what: &str, v: Validity, now: i64, warn_days: u64) -> Check {
    let days_left = (v.not_after - now).div_euclid(86_400);
    if now >= v.not_after {
        Check::fail(
            "certificates",
            format!("{what} expired on {}", date(v.not_after)),
            "renew it and replace the file (the broker refuses an expired certificate)",
        )
    } else if now < v.not_before {
        Check::fail(
            "certificates",
            format!(
                "{what} is not valid until {}; the clock reads {}",
                date(v.not_before),
                date(now)
            ),
            "set the clock right (timedatectl set-ntp true), or use a certificate valid now",
        )
    } else if days_left < warn_days as i64 {
        Check::warn(
            "certificates",
            format!("{what} expires in {days_left} day(s), on {}", date(v.not_after)),
            "renew it before then and replace the file",
        )
    } else {
        Check::ok(
            "certificates",
            format!("{what} is valid until {} ({days_left} days)", date(v.not_after)),
        )
    }
}

/// Every certificate of the TLS settings: the CA files' and the client chains'.
fn certificates(cfg: &Config, now: DateTime<Utc>, warn_days: u64) -> Vec<Check> {
    let mut files = vec![];
    for (name, b) in sections(cfg) {
        if let Some(t) = &b.tls {
            files.push((format!("{name}.tls.ca_file"), t.ca_file.clone()));
            if let Some(c) = &t.cert_file {
                files.push((format!("{name}.tls.cert_file"), c.clone()));
            }
        }
    }
    if files.is_empty() {
        return vec![Check::skipped("certificates", "no TLS configured")];
    }
    let mut checks = vec![];
    for (setting, path) in files {
        let pem = match std::fs::read(&path) {
            Ok(p) => p,
            Err(e) => {
                checks.push(Check::fail(
                    "certificates",
                    format!("{setting} {}: {e}", path.display()),
                    "correct the path, and make the file readable by the agent's user",
                ));
                continue;
            }
        };
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
        if certs.is_empty() {
            checks.push(Check::fail(
                "certificates",
                format!("{setting} {}: no PEM certificate found", path.display()),
                "give it the PEM certificate(s) (-----BEGIN CERTIFICATE-----)",
            ));
        }
        for (i, cert) in certs.iter().enumerate() {
            let what = format!("{setting} {} certificate {}", path.display(), i + 1);
            let v = cert.as_ref().ok().and_then(|c| validity(c.as_ref()));
            checks.push(match v {
                Some(v) => judge_cert(&what, v, now.timestamp(), warn_days),
                None => Check::fail(
                    "certificates",
                    format!("{what} cannot be read"),
                    "replace it with a valid PEM X.509 certificate",
                ),
            });
        }
    }
    checks
}

/// The active bundle of a slot loads, verified with the trust in force, and passes its
/// self-test: the check a deploy and a start make. Returns the bundle's signing time too.
fn model(dir: &Path, trust: &crate::deploy::Trust, slot: Option<&str>, state: &DeployState) -> (Check, Option<u64>) {
    let name = match slot {
        Some(s) => format!("model ({s})"),
        None => "model".to_string(),
    };
    let Some(inst): Option<&Installed> = state.active.as_ref() else {
        return (
            Check::warn(
                &name,
                "no model deployed yet",
                "deploy a signed bundle from the hub (lathe-hub rollout deploy)",
            ),
            None,
        );
    };
    match crate::deploy::load_installed(dir, &trust.store, trust.threshold, inst) {
        Ok((m, warning)) => {
            let tested = m
                .manifest
                .payloads
                .iter()
                .any(|p| p.role == protocol::bundle::Role::Selftest);
            let created = Some(m.manifest.created);
            let what = format!("{} v{}", inst.name, inst.version);
            let check = match (warning, tested) {
                (Some(w), _) => Check::warn(&name, w, "deploy a bundle signed under the trust policy in force"),
                (None, true) => Check::ok(&name, format!("{what} loads and passes its self-test")),
                (None, false) => Check::warn(
                    &name,
                    format!("{what} loads, but its bundle has no self-test"),
                    "pack the next version with --selftest, so that every device checks its outputs before it runs",
                ),
            };
            (check, created)
        }
        Err(e) => (
            Check::fail(
                &name,
                format!("the active bundle {}: {e}", inst.file),
                "deploy the bundle again or a newer one; `lathe model run` on the bundle shows the same check",
            ),
            None,
        ),
    }
}

/// Unix seconds before which no clock is right: this agent did not exist then.
const EARLIEST: i64 = 1_735_689_600; // 2025-01-01

/// The clock is sane when it reads after everything this device knows happened: the agent's
/// last heartbeat and the signing of its active bundles.
fn clock(now: DateTime<Utc>, heartbeat_ms: Option<u64>, signed: &[u64]) -> Check {
    let secs = now.timestamp();
    let fix = "set the clock right and keep it so: timedatectl set-ntp true (or run chrony)";
    if secs < EARLIEST {
        return Check::fail(
            "clock",
            format!("the clock reads {}: it was never set", date(secs)),
            fix,
        );
    }
    // A minute of slack: the heartbeat is written by another process, at its own reading.
    if let Some(h) = heartbeat_ms.map(|h| (h / 1000) as i64).filter(|h| *h > secs + 60) {
        return Check::fail(
            "clock",
            format!(
                "the clock reads {}, before the agent's last heartbeat at {}: it went back",
                date(secs),
                date(h)
            ),
            fix,
        );
    }
    if let Some(c) = signed.iter().map(|c| *c as i64).filter(|c| *c > secs + 60).max() {
        return Check::fail(
            "clock",
            format!(
                "the clock reads {}, before the active bundle was signed at {}",
                date(secs),
                date(c)
            ),
            fix,
        );
    }
    Check::ok(
        "clock",
        format!("reads {}, after everything this device recorded", date(secs)),
    )
}

/// The report for a person: one line per check, the fix under each problem.
pub fn render(r: &Report) -> String {
    let mut out = format!("lathe doctor: {}\n", r.config);
    let width = r.checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
    for c in &r.checks {
        let label = match c.outcome {
            Outcome::Ok => "ok",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
            Outcome::Skipped => "skip",
        };
        out.push_str(&format!("  {label:<4}  {:<width$}  {}\n", c.check, c.message));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("        {:<width$}  fix: {fix}\n", ""));
        }
    }
    out.push_str(&match (r.failures, r.warnings) {
        (0, 0) => "all checks passed\n".to_string(),
        (f, w) => format!("{f} failure(s), {w} warning(s)\n"),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
            .expect("date")
            .and_utc()
            .timestamp()
    }

    /// A certificate made by `openssl req -x509 -days 1 -subj /CN=doctor` with an EC key (notBefore
    /// 2026-11-30 17:37:00Z, notAfter 2026-12-01 17:37:00Z, both UTCTime).
    const CERT: &str = include_str!("../../fixtures/doctor_cert.pem");

    #[test]
    fn validity_is_read_from_a_real_certificate() {
        let der = rustls_pemfile::certs(&mut CERT.as_bytes())
            .next()
            .expect("one certificate")
            .expect("PEM");
        let v = validity(der.as_ref()).expect("validity");
        assert_eq!(v.not_before, at("2026-11-30 17:37:00"));
        assert_eq!(v.not_after, at("2026-12-01 17:37:00"));
        // Truncated or foreign DER is refused, not misread.
        for cut in [0, 1, 10, 100, der.as_ref().len() / 2] {
            assert_eq!(validity(&der.as_ref()[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn der_times_of_both_kinds() {
        assert_eq!(der_time(0x17, b"491231235959Z"), Some(at("2049-12-31 23:59:59")));
        assert_eq!(der_time(0x17, b"500101000000Z"), Some(at("1950-01-01 00:00:00")));
        assert_eq!(der_time(0x18, b"20510101000000Z"), Some(at("2051-01-01 00:00:00")));
        assert_eq!(der_time(0x17, b"5001010000Z"), None);
        assert_eq!(der_time(0x04, b"20510101000000Z"), None);
    }

    #[test]
    fn certificates_are_judged_ahead_of_expiry() {
        let v = Validity {
            not_before: at("2026-01-01 00:00:00"),
            not_after: at("2026-12-31 00:00:00"),
        };
        let check = |now: &str| {
            let c = judge_cert("ca", v, at(now), 30);
            (c.outcome, c.message)
        };
        assert_eq!(
            check("2026-06-01 00:00:00"),
            (Outcome::Ok, "ca is valid until 2026-12-31 00:00 UTC (213 days)".into())
        );
        assert_eq!(
            check("2026-12-11 00:00:00"),
            (Outcome::Warn, "ca expires in 20 day(s), on 2026-12-31 00:00 UTC".into())
        );
        assert_eq!(
            check("2026-12-31 00:00:00"),
            (Outcome::Fail, "ca expired on 2026-12-31 00:00 UTC".into())
        );
        assert_eq!(check("2025-12-31 00:00:00").0, Outcome::Fail);
    }

    #[test]
    fn the_clock_is_judged_against_what_the_device_recorded() {
        let now = DateTime::from_timestamp(at("2026-11-30 12:00:00"), 0).expect("time");
        let ms = |t: &str| at(t) as u64 * 1000;
        assert_eq!(clock(now, Some(ms("2026-11-30 11:59:00")), &[]).outcome, Outcome::Ok);
        // Within the minute of slack: another process's reading.
        assert_eq!(clock(now, Some(ms("2026-11-30 12:00:30")), &[]).outcome, Outcome::Ok);
        let back = clock(now, Some(ms("2026-12-02 08:00:00")), &[]);
        assert_eq!(back.outcome, Outcome::Fail);
        assert!(back.message.contains("it went back"), "{}", back.message);
        let signed = clock(now, None, &[at("2026-12-01 00:00:00") as u64]);
        assert!(
            signed.message.contains("before the active bundle was signed"),
            "{}",
            signed.message
        );
        let never = clock(DateTime::from_timestamp(0, 0).expect("epoch"), None, &[]);
        assert!(never.message.contains("never set"), "{}", never.message);
    }

    #[test]
    fn free_space_against_the_floor() {
        assert_eq!(free_space(Some(100 << 20), 10 << 20).outcome, Outcome::Ok);
        assert_eq!(free_space(Some(15 << 20), 10 << 20).outcome, Outcome::Warn);
        assert_eq!(free_space(Some(5 << 20), 10 << 20).outcome, Outcome::Fail);
        assert_eq!(free_space(None, 10 << 20).outcome, Outcome::Skipped);
    }
}
