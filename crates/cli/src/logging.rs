//! Logging for both binaries: stderr, through `tracing`.

/// Logs go to stderr, warnings only unless `-v`/`-vv` or `BULWARK_LOG=error|warn|info|debug|trace`.
pub fn init(verbose: u8) {
    use tracing::Level;
    let from_env = std::env::var("BULWARK_LOG")
        .ok()
        .and_then(|v| v.parse::<Level>().ok());
    let level = from_env.unwrap_or(match verbose {
        0 => Level::WARN,
        1 => Level::INFO,
        _ => Level::DEBUG,
    });
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
