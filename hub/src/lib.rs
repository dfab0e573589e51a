//! The Lathe hub. `ARCHITECTURE.md` at the repository root maps the modules.

pub mod apply;
pub mod broker;
pub mod demo;
pub mod ingest;
pub mod ops;
pub mod proxy;
pub mod rollout;
pub mod store;
pub mod views;
