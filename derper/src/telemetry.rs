//! Tracing subscriber set-up for the binary: `EnvFilter` from `RUST_LOG` (default `info`)
//! and a plain or JSON formatter on stderr. Libraries never install a subscriber.

use tracing_subscriber::EnvFilter;

use crate::args::LogFormat;

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Formats an error with its causes, like `{:#}`, but skips a cause whose text the previous
/// message already ends with (our error types print their source in their own message, so
/// `{:#}` would print it twice).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("bind admin listener on 127.0.0.1:3480: {source}")]
    struct Outer {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn chain_prints_each_cause_once() {
        let e = anyhow::Error::new(Outer {
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use"),
        })
        .context("starting the relay");
        assert_eq!(
            error_chain(e.as_ref()),
            "starting the relay: bind admin listener on 127.0.0.1:3480: Address already in use"
        );
    }
}
