//! The Lathe agent. `ARCHITECTURE.md` at the repository root maps the modules.

pub mod agent;
pub mod api;
pub mod config;
pub mod deploy;
pub mod doctor;
pub mod drift;
pub mod engine;
pub mod image;
pub mod inference;
pub mod link;
pub mod logs;
pub mod metrics;
pub mod ml;
pub mod npy;
pub mod queue;
pub mod rollout;
pub mod samples;
pub mod schedule;
pub mod status;
pub mod store;
pub mod sync;
pub mod system;
pub mod systemd;
pub mod trial;
pub mod v2;

/// Exit codes of the `lathe` binary.
pub mod exit {
    pub const OK: i32 = 0;
    /// Something is wrong: a failed check, a runtime error.
    pub const PROBLEM: i32 = 1;
    /// Bad command-line usage.
    pub const USAGE: i32 = 2;
    /// The configuration is invalid; restarting will not help (systemd: RestartPreventExitStatus).
    pub const CONFIG: i32 = 78;
}
