//! systemd integration: readiness and the watchdog (the sd_notify protocol), without
//! libsystemd.
//!
//! - `READY=1` goes once, when every model slot is loaded, the store is open and the links,
//!   the outbox and inference run. `STOPPING=1` goes when shutdown starts.
//! - The watchdog is fed (`WATCHDOG=1`, at half of `WatchdogSec`) only while every task that
//!   must keep going has shown that it does: each [`Beat`] is stamped by its own task, at
//!   least once per its natural cadence, and one older than its allowance stops the feeding.
//!   The late tasks are named in `STATUS=` and in the log; systemd then restarts the agent.
//! - Outside systemd (no `NOTIFY_SOCKET`) nothing is sent and nothing is watched. The beats
//!   cost one atomic store each.
//!
//! What counts as alive, per task, is decided here by [`Heartbeats::late`], without I/O.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Added to every task's natural cadence: what a slow disk or a slow model may take on top.
pub const GRACE: Duration = Duration::from_secs(30);

/// How often a task that waits on a channel stamps its beat while idle.
pub const IDLE_BEAT: Duration = Duration::from_secs(1);

/// The socket systemd listens on for this service's notifications.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notification socket named by `NOTIFY_SOCKET`, if any: a path, or an abstract
    /// name after `@`.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let name = name.to_string_lossy().into_owned();
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abstract_name.as_bytes())?
            }
            None => SocketAddr::from_pathname(&name)?,
        };
        Ok(Some(Notifier {
            socket: UnixDatagram::unbound()?,
            addr,
        }))
    }

    /// Send one notification (`READY=1`, `WATCHDOG=1`, `STATUS=…`); a datagram, never blocks
    /// for long.
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.socket.send_to_addr(state.as_bytes(), &self.addr).map(|_| ())
    }
}

/// The watchdog period systemd asks for (`WATCHDOG_USEC`), if it is meant for this process
/// (`WATCHDOG_PID`, when set, is this pid).
pub fn watchdog_period() -> Option<Duration> {
    period_for(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn period_for(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok()?;
    if pid.is_some_and(|p| p.parse::<u32>().ok() != Some(me)) {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// One task's sign of life: stamped by the task, read by the watchdog.
#[derive(Clone, Debug)]
pub struct Beat {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Beat {
    /// The task is making progress now.
    pub fn now(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

struct Watched {
    name: String,
    allowance: Duration,
    last_ms: Arc<AtomicU64>,
}

/// Every task the watchdog waits on, each with how long it may go without a beat.
pub struct Heartbeats {
    start: Instant,
    watched: Mutex<Vec<Watched>>,
}

impl Default for Heartbeats {
    fn default() -> Self {
        Heartbeats {
            start: Instant::now(),
            watched: Mutex::default(),
        }
    }
}

impl Heartbeats {
    /// A beat for the task `name`, late once `allowance` passes without one. It counts as
    /// stamped now.
    pub fn beat(&self, name: impl Into<String>, allowance: Duration) -> Beat {
        let beat = Beat {
            start: self.start,
            last_ms: Arc::default(),
        };
        beat.now();
        self.watched.lock().unwrap_or_else(|e| e.into_inner()).push(Watched {
            name: name.into(),
            allowance,
            last_ms: beat.last_ms.clone(),
        });
        beat
    }

    /// The tasks that are late at `now`, each with how long it has been silent.
    pub fn late(&self, now: Instant) -> Vec<(String, Duration)> {
        let now_ms = now.saturating_duration_since(self.start).as_millis() as u64;
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|w| {
                let silent = Duration::from_millis(now_ms.saturating_sub(w.last_ms.load(Ordering::Relaxed)));
                (silent > w.allowance).then(|| (w.name.clone(), silent))
            })
            .collect()
    }
}

/// Describe late tasks for `STATUS=` and the log.
pub fn describe_late(late: &[(String, Duration)]) -> String {
    let tasks: Vec<String> = late
        .iter()
        .map(|(name, silent)| format!("{name} silent for {} s", silent.as_secs()))
        .collect();
    format!("watchdog not fed: {}", tasks.join(", "))
}

/// Feed systemd's watchdog every half `period` while no task is late, until `shutdown`.
pub async fn watchdog(notifier: Arc<Notifier>, period: Duration, beats: Arc<Heartbeats>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(period / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_late = false;
    info!(period_ms = period.as_millis() as u64, "feeding the systemd watchdog");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let late = beats.late(Instant::now());
        let result = if late.is_empty() {
            if was_late {
                info!("every task is beating again; feeding the watchdog");
                let _ = notifier.send("STATUS=running");
            }
            was_late = false;
            notifier.send("WATCHDOG=1")
        } else {
            let why = describe_late(&late);
            if !was_late {
                warn!("{why}; systemd will restart the agent unless they resume");
            }
            was_late = true;
            notifier.send(&format!("STATUS={why}"))
        };
        if let Err(e) = result {
            warn!(error = %e, "cannot notify systemd");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_is_late_only_past_its_own_allowance() {
        let beats = Heartbeats::default();
        let link = beats.beat("hub link", Duration::from_secs(90));
        let infer = beats.beat("inference", Duration::from_secs(31));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(beats.late(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        let late = beats.late(Instant::now());
        assert_eq!(late, vec![("inference".to_string(), Duration::from_secs(33))]);
        assert_eq!(describe_late(&late), "watchdog not fed: inference silent for 33 s");
        infer.now();
        assert!(beats.late(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(60)).await;
        let names: Vec<String> = beats.late(Instant::now()).into_iter().map(|l| l.0).collect();
        assert_eq!(names, vec!["hub link", "inference"]);
        link.now();
        infer.now();
        assert!(beats.late(Instant::now()).is_empty());
    }

    #[test]
    fn the_watchdog_period_is_for_this_process_only() {
        let four = Some(Duration::from_secs(4));
        assert_eq!(period_for(Some("4000000"), None, 7), four);
        assert_eq!(period_for(Some("4000000"), Some("7"), 7), four);
        assert_eq!(period_for(Some("4000000"), Some("1"), 7), None);
        assert_eq!(period_for(Some("4000000"), Some("x"), 7), None);
        assert_eq!(period_for(Some("0"), Some("7"), 7), None);
        assert_eq!(period_for(Some("soon"), None, 7), None);
        assert_eq!(period_for(None, Some("7"), 7), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_is_fed_only_while_every_task_beats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let notifier = Arc::new(Notifier {
            socket: UnixDatagram::unbound().expect("socket"),
            addr: SocketAddr::from_pathname(&path).expect("addr"),
        });
        let beats = Arc::new(Heartbeats::default());
        let sync = beats.beat("outbox", Duration::from_secs(5));
        let stop = CancellationToken::new();
        let task = tokio::spawn(watchdog(notifier, Duration::from_secs(2), beats.clone(), stop.clone()));
        let mut received = vec![];
        let mut buf = [0u8; 256];
        for second in 0..12 {
            if !(4..9).contains(&second) {
                sync.now();
            }
            tokio::time::advance(Duration::from_secs(1)).await;
            tokio::task::yield_now().await;
            while let Ok(n) = listener.recv(&mut buf) {
                received.push((second, String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        }
        stop.cancel();
        task.await.expect("watchdog task");
        let fed: Vec<i32> = received.iter().filter(|r| r.1 == "WATCHDOG=1").map(|r| r.0).collect();
        // Last beat at second 3: late from second 9 (more than 5 s), fed again from 9.
        assert!(fed.iter().all(|s| *s < 8 || *s >= 9), "{received:?}");
        assert!(fed.contains(&2) && fed.contains(&10), "{received:?}");
        assert!(
            received
                .iter()
                .any(|r| r.1.starts_with("STATUS=watchdog not fed: outbox silent for")),
            "{received:?}"
        );
        assert!(received.iter().any(|r| r.1 == "STATUS=running"), "{received:?}");
    }
}
