//! Operator schedules in cron syntax, such as closing a drift window at each shift change
//! (`0 6,14,22 * * *`). The only module that knows the cron crate (tokio-cron-scheduler):
//! the rest of the agent gets a tick on a bounded channel.
//!
//! Internal periodic work (sync, health, window ages) uses tokio intervals, not this: the cron
//! crate follows the wall clock, and upstream reports repeated jobs that stop firing under
//! load (tokio-cron-scheduler #113); the test below holds ours to firing under load.
//!
//! Expressions have five fields (minute hour day-of-month month day-of-week, as in crontab)
//! or six (seconds first). When both day fields are given, both must match. The time zone is
//! an IANA name; its offset from UTC is taken when the agent starts (a daylight-saving change
//! takes effect at the next restart).

use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler};

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("{expr:?} is not a cron schedule (five fields: minute hour day-of-month month day-of-week, e.g. \"0 6,14,22 * * *\"; or six with seconds first)")]
    Parse { expr: String },
    #[error("{0:?} is not an IANA time zone name (e.g. \"UTC\", \"Europe/Berlin\")")]
    TimeZone(String),
    #[error("cron scheduler: {0}")]
    Scheduler(String),
}

/// A checked schedule: the expression with seconds, and its time zone.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    expr: String,
    tz: chrono_tz::Tz,
}

impl Schedule {
    pub fn parse(expr: &str, tz: &str) -> Result<Schedule, ScheduleError> {
        let fields = expr.split_whitespace().count();
        let full = match fields {
            5 => format!("0 {}", expr.trim()),
            6 => expr.trim().to_string(),
            _ => return Err(ScheduleError::Parse { expr: expr.into() }),
        };
        let tz: chrono_tz::Tz = tz.parse().map_err(|_| ScheduleError::TimeZone(tz.into()))?;
        // The crate's own parser decides: build (and drop) a job with this expression.
        Job::new_async_tz(full.as_str(), tz, |_, _| Box::pin(async {}))
            .map_err(|_| ScheduleError::Parse { expr: expr.into() })?;
        Ok(Schedule { expr: full, tz })
    }
}

/// Running schedules; dropped or stopped, they fire no more.
pub struct Running {
    scheduler: JobScheduler,
}

impl Running {
    /// Start `schedule`: each time it fires, a tick is offered on `tick`. A tick that finds
    /// the channel full is dropped: one is already waiting.
    pub async fn start(schedule: &Schedule, tick: mpsc::Sender<()>) -> Result<Running, ScheduleError> {
        let err = |e: tokio_cron_scheduler::JobSchedulerError| ScheduleError::Scheduler(e.to_string());
        let scheduler = JobScheduler::new().await.map_err(err)?;
        let job = Job::new_async_tz(schedule.expr.as_str(), schedule.tz, move |_, _| {
            let _ = tick.try_send(());
            Box::pin(async {})
        })
        .map_err(err)?;
        scheduler.add(job).await.map_err(err)?;
        scheduler.start().await.map_err(err)?;
        Ok(Running { scheduler })
    }

    pub async fn stop(mut self) {
        let _ = self.scheduler.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn five_and_six_fields_and_time_zones() {
        let ok = |e: &str, tz: &str| Schedule::parse(e, tz).unwrap_or_else(|err| panic!("{e} {tz}: {err}"));
        assert_eq!(ok("0 6,14,22 * * *", "UTC").expr, "0 0 6,14,22 * * *");
        assert_eq!(ok("*/5 * * * * *", "Europe/Berlin").expr, "*/5 * * * * *");
        ok("30 5 * * mon-fri", "America/Chicago");
        let bad = |e: &str, tz: &str, want: &str| {
            let err = Schedule::parse(e, tz).expect_err(e).to_string();
            assert!(err.contains(want), "{e} {tz}: {err}");
        };
        bad("0 25 * * *", "UTC", "is not a cron schedule");
        bad("every shift", "UTC", "is not a cron schedule");
        bad("* * *", "UTC", "five fields");
        bad("0 6 * * *", "Mars/Olympus", "IANA");
    }

    /// Upstream #113: repeated jobs can stop firing under load. Ours must not: with every
    /// worker thread and the blocking pool kept busy, a schedule firing each second still fires,
    /// and keeps firing to the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn schedules_keep_firing_under_load() {
        let (tx, mut rx) = mpsc::channel(1);
        let every_second = Schedule::parse("* * * * * *", "UTC").expect("schedule");
        let running = Running::start(&every_second, tx).await.expect("starts");
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = vec![];
        for _ in 0..8 {
            let stop = stop.clone();
            // Busy async tasks that yield rarely, as an inference burst does.
            load.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_millis(20) {
                        std::hint::black_box(0u64);
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        for _ in 0..4 {
            let stop = stop.clone();
            load.push(tokio::task::spawn_blocking(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(0u64);
                }
            }));
        }
        let start = Instant::now();
        let mut fired = vec![];
        while start.elapsed() < Duration::from_secs(12) {
            if tokio::time::timeout(Duration::from_millis(200), rx.recv())
                .await
                .is_ok()
            {
                fired.push(start.elapsed());
            }
        }
        stop.store(true, Ordering::Relaxed);
        for l in load {
            let _ = l.await;
        }
        running.stop().await;
        // Twelve seconds of a once-a-second schedule: most seconds fire, and the last ones too.
        assert!(fired.len() >= 8, "fired {} times in 12 s: {fired:?}", fired.len());
        assert!(
            fired.iter().any(|t| *t >= Duration::from_secs(9)),
            "stopped firing: {fired:?}"
        );
    }
}
