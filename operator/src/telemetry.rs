//! Logging: one `init(format, filter)` for the binary. EnvFilter from `RUST_LOG` (or the
//! `--log-filter` flag), default `info`; `plain` or `json` lines. Libraries never install a
//! subscriber; tests may call [`init`] and ignore the error of a second call.

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// A subscriber was already installed.
#[derive(Debug, thiserror::Error)]
#[error("install log subscriber: {0}")]
pub struct InitError(String);

/// Install the global subscriber.
pub fn init(format: LogFormat, filter: &str) -> Result<(), InitError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(|e| InitError(e.to_string()))
}
