use clap::Parser;

fn main() -> anyhow::Result<()> {
    // candle runs element-wise ops on its own pool of CANDLE_NUM_THREADS workers (default: RAYON_NUM_THREADS),
    // which spin between tasks and take cores from the matmul threads. Generation suffers most: the ~100M
    // Qwen2 of benches/bench_generate.py samples 64 rows at ~560 tokens/s with 1 versus ~420 with 2 on 2
    // cores, while a forward+backward (examples/bench_forward.rs) is within 5% either way. Matmuls, the packed
    // kernel and sampling still use RAYON_NUM_THREADS threads. Set before any thread starts; a user's value wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Human-readable lines on stderr; a command that owns a run directory (train) points the JSON log
    // at RUN_DIR/log.jsonl by calling `telemetry::init` again. RUST_LOG overrides the level.
    let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    r1v2::telemetry::init(None, &level)?;
    r1v2::cli::Cli::parse().run()
}
