//! Logging for `lathe` and `lathe-hub`: to stderr, as text or as one JSON object per line.
//!
//! The filter comes from `LATHE_LOG`, else `RUST_LOG`, else the caller's default. Colours are
//! used only when stderr is a terminal, so journald and files get plain text. tract's notice
//! about a model's ONNX operator set is kept at error level: the engine says itself, at debug
//! for the operator sets Lathe's corpus covers and as a warning for others
//! ([`crate::engine::TESTED_OPSETS`]).

use serde::Deserialize;
use std::io::IsTerminal;
use tracing_subscriber::filter::Targets;

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
/// tract's ONNX loader itself. Directives are `level` and `target=level`, comma-separated
/// (`info,lathe::sync=debug`); one that does not parse leaves the default in force.
pub fn filter(default: &str) -> Targets {
    let from_env = ["LATHE_LOG", "RUST_LOG"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()));
    filter_of(from_env, default)
}

fn filter_of(from_env: Option<String>, default: &str) -> Targets {
    let parse = |s: &str| s.parse::<Targets>().ok();
    let chosen = from_env
        .filter(|s| parse(s).is_some())
        .unwrap_or_else(|| default.to_string());
    let full = if chosen.contains("tract_onnx") {
        chosen
    } else {
        format!("{chosen},{QUIET}")
    };
    parse(&full)
        .or_else(|| parse(default))
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO))
}

/// Install the global subscriber. Call once, before anything logs.
pub fn init(format: Format, default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter(default));
    let _ = match format {
        Format::Text => registry.with(fmt).try_init(),
        Format::Json => registry
            .with(fmt.json().flatten_event(true).with_current_span(false))
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn directives_set_levels_per_target_and_tract_loader_stays_quiet() {
        let f = |s: &str| s.parse::<Targets>().map(|_| ()).is_ok();
        assert!(f("info,lathe::sync=debug") && f("warn") && !f("info,=="));
        // The default, with tract's ONNX loader held to errors.
        let t = filter_of(None, "info");
        assert!(t.would_enable("lathe::agent", &Level::INFO));
        assert!(!t.would_enable("lathe::agent", &Level::DEBUG));
        assert!(!t.would_enable("tract_onnx::model", &Level::WARN));
        assert!(t.would_enable("tract_onnx::model", &Level::ERROR));
        let t = filter_of(Some("info,lathe::sync=debug".into()), "warn");
        assert!(t.would_enable("lathe::sync", &Level::DEBUG));
        assert!(!t.would_enable("lathe::link", &Level::DEBUG));
        // A filter that does not parse leaves the default in force.
        let t = filter_of(Some("info,==".into()), "warn");
        assert!(!t.would_enable("lathe::agent", &Level::INFO));
        assert!(t.would_enable("lathe::agent", &Level::WARN));
    }
}
