//! Helpers shared by the verbs test binaries (a directory module, so Cargo
//! builds no test binary of its own for it).

/// Logs to stderr (`RUST_LOG`, default `info`), once per process.
pub fn logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let f = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(f)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    });
}
