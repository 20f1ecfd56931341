//! Shared by the `bench_*` examples (`mod common;`): the timing loop.

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
