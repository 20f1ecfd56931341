//! Shared by the `bench_*` examples (`mod common;`): the timing loop and the thread set-up.

use std::time::Instant;

use anyhow::Result;

/// Median seconds of `iters` runs of `f` after one warm-up run.
pub fn median_seconds(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// As the `r1v2` binary (src/main.rs): candle's element-wise ops on the calling thread (`CANDLE_NUM_THREADS=1`
/// unless the caller set it), not on a second pool of spinning workers that competes with rayon's (gemm and the
/// kernels) for the cores. Call it first in `main`, before any thread starts.
pub fn candle_on_the_calling_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
