//! Structured logging for the daemons: `RUST_LOG` filters (default `info`), text or JSON lines on
//! stderr, colours only on a terminal.

/// Installs the global subscriber. `format` is `text` or `json`.
pub fn init(format: &str) {
    init_with_default(format, "info")
}

/// Like [`init`], with another level when `RUST_LOG` is unset (e.g. `warn` under a progress bar).
pub fn init_with_default(format: &str, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
