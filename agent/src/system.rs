//! Samples of the box the agent runs on and of its own process, for health messages and
//! `lathe status`: CPU, memory, uptime, the hottest temperature sensor, the agent's RSS.

use protocol::messages::{ProcessHealth, SystemHealth};
use sysinfo::{Components, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

pub struct Sampler {
    /// `None` where the system cannot be read (no /proc).
    sys: Option<System>,
    /// `None` where the board exposes no sensors.
    components: Option<Components>,
    pid: Pid,
    started: std::time::Instant,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::new()
    }
}

impl Sampler {
    pub fn new() -> Sampler {
        let mut sys = System::new().ok();
        if let Some(s) = sys.as_mut() {
            s.refresh_cpu_usage();
        }
        Sampler {
            sys,
            components: Components::new_with_refreshed_list().ok().filter(|c| !c.is_empty()),
            pid: Pid::from_u32(std::process::id()),
            started: std::time::Instant::now(),
        }
    }

    /// The box and the process now; CPU use is since the previous sample. `None` where the
    /// system cannot be read.
    pub fn sample(&mut self) -> Option<(SystemHealth, ProcessHealth)> {
        let sys = self.sys.as_mut()?;
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[self.pid]),
            false,
            ProcessRefreshKind::nothing().with_memory(),
        );
        let temperature_c = self.components.as_mut().and_then(|c| {
            c.refresh(false);
            c.iter()
                .filter_map(|c| c.temperature())
                .filter(|t| t.is_finite())
                .reduce(f32::max)
        });
        let system = SystemHealth {
            cpu_percent: sys.global_cpu_usage(),
            cpus: sys.cpus().len() as u32,
            memory_total_bytes: sys.total_memory(),
            memory_used_bytes: sys.used_memory(),
            uptime_secs: System::uptime().unwrap_or(0),
            temperature_c,
        };
        let process = ProcessHealth {
            rss_bytes: sys.process(self.pid).map_or(0, |p| p.memory()),
            uptime_secs: self.started.elapsed().as_secs(),
        };
        Some((system, process))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_box_and_the_process_are_measured() {
        let mut s = Sampler::new();
        let (sys, proc_) = s.sample().expect("linux has /proc");
        assert!(sys.cpus >= 1);
        assert!(
            sys.memory_total_bytes > sys.memory_used_bytes && sys.memory_used_bytes > 0,
            "{sys:?}"
        );
        assert!(sys.uptime_secs > 0);
        assert!((0.0..=100.0).contains(&sys.cpu_percent), "{sys:?}");
        // This test process holds at least its own code and heap.
        assert!(proc_.rss_bytes > 1 << 20, "{proc_:?}");
        let status = std::fs::read_to_string("/proc/self/status").expect("linux");
        let vm_rss_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        let ratio = proc_.rss_bytes as f64 / (vm_rss_kb * 1024) as f64;
        assert!(
            (0.5..2.0).contains(&ratio),
            "sysinfo {} vs /proc {vm_rss_kb} kB",
            proc_.rss_bytes
        );
    }
}
