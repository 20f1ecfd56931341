use clap::Parser;

fn main() -> anyhow::Result<()> {
    // Human-readable lines on stderr; a command that owns a run directory (train) points the JSON log
    // at RUN_DIR/log.jsonl by calling `telemetry::init` again. RUST_LOG overrides the level.
    let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    r1v2::telemetry::init(None, &level)?;
    r1v2::cli::Cli::parse().run()
}
