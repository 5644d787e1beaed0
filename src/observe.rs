//! Logging setup: `tracing` to stderr, text or JSON, level from config or
//! `RUST_LOG`. Secrets never reach a log line because config types redact
//! them in `Debug` and sinks log event ids and user keys, not row values.

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

/// `--log-format`: wins over `log.format` for every command.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

static FORMAT_OVERRIDE: OnceLock<LogFormat> = OnceLock::new();

/// Records the command line's `--log-format` before any logging starts.
pub fn set_format_override(format: Option<LogFormat>) {
    if let Some(f) = format {
        let _ = FORMAT_OVERRIDE.set(f);
    }
}

/// Installs the global subscriber once; later calls are no-ops (tests).
pub fn init_logging(level: &str, json: bool) {
    let json = match FORMAT_OVERRIDE.get() {
        Some(f) => *f == LogFormat::Json,
        None => json,
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
