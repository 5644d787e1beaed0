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

/// Libraries whose debug lines carry data: tokio-postgres prints query
/// parameters (row values, envelopes with emails), the HTTP stack prints
/// frames and headers (API keys). A global `debug` must not turn them on;
/// naming one explicitly in the filter still does.
const QUIET_TARGETS: [&str; 7] = [
    "tokio_postgres",
    "pgwire_replication",
    "reqwest",
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
];

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
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| level.to_string());
    let mut filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    for target in QUIET_TARGETS {
        if !spec.contains(target) {
            if let Ok(d) = format!("{target}=info").parse() {
                filter = filter.add_directive(d);
            }
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a log file, journald or a
        // collector would get escape codes in every line.
        .with_ansi(use_colour())
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn use_colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
