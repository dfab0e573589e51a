//! Logging for `lathe` and `lathe-hub`: to stderr, as text or as one JSON object per line.
//!
//! The filter comes from `LATHE_LOG`, else `RUST_LOG`, else the caller's default. Colours are
//! used only when stderr is a terminal, so journald and files get plain text. tract's notice
//! about a model's ONNX operator set is kept at error level: the engine says itself, at debug
//! for the operator sets Lathe's corpus covers and as a warning for others
//! ([`crate::engine::TESTED_OPSETS`]).

use serde::Deserialize;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

/// Directives added to every default filter.
const QUIET: &str = "tract_onnx::model=error";

/// The filter from the environment, or `default`; with [`QUIET`] unless the filter names
/// tract's ONNX loader itself.
pub fn filter(default: &str) -> EnvFilter {
    let chosen = ["LATHE_LOG", "RUST_LOG"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| default.to_string());
    if chosen.contains("tract_onnx") {
        EnvFilter::new(chosen)
    } else {
        EnvFilter::new(format!("{chosen},{QUIET}"))
    }
}

/// Install the global subscriber. Call once, before anything logs.
pub fn init(format: Format, default: &str) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(default))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}
