//! The choice of the next token alone (`sample_next`): 64 rows over a vocabulary of 8192 and of 32000, random
//! `N(0, 1) * 3` logits and 256 context ids per row, temperature 1, with and without the repetition penalty
//! and top-p. Prints a markdown table of microseconds per row (best of 5 runs of ~50 ms).
//!
//! Run: `cargo run --release -p r1v2-actors --example bench_sample`.
use std::time::Instant;

use anyhow::Result;
use r1v2_actors::generate::processors::{sample_next, Scratch, SeenTokens};
use r1v2_actors::generate::{RowRng, SamplingParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ROWS: usize = 64;

/// `n` draws of `N(0, 1) * 3` (Box-Muller).
fn logits(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.gen(), rng.gen());
            let z = (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos();
            (3.0 * z) as f32
        })
        .collect()
}

/// Seconds per row, best of 5 runs of about 50 ms each (whole passes over the rows).
fn time(params: &SamplingParams, rows: &[(Vec<f32>, SeenTokens)]) -> Result<f64> {
    let mut scratch = Scratch::default();
    let mut pass = |round: u64| -> Result<u64> {
        let mut checksum = 0;
        for (i, (logits, seen)) in rows.iter().enumerate() {
            let mut rng = RowRng::new(round, i as u64, 0);
            checksum += sample_next(params, logits, seen, &mut rng, &mut scratch)?.token_id as u64;
        }
        Ok(checksum)
    };
    let start = Instant::now();
    pass(0)?;
    let iters = (0.05 / start.elapsed().as_secs_f64()).clamp(1.0, 1000.0) as usize;
    let mut best = f64::MAX;
    for run in 0..5 {
        let start = Instant::now();
        let mut checksum = 0;
        for it in 0..iters {
            checksum += pass((run * iters + it) as u64)?;
        }
        std::hint::black_box(checksum);
        best = best.min(start.elapsed().as_secs_f64() / (iters * rows.len()) as f64);
    }
    Ok(best)
}

fn main() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    println!("| vocab | repetition_penalty | top_p | µs per row |");
    println!("|---|---|---|---|");
    for vocab in [8192usize, 32000] {
        let rows = (0..ROWS)
            .map(|_| {
                let context: Vec<u32> = (0..256).map(|_| rng.gen_range(0..vocab as u32)).collect();
                (logits(vocab, &mut rng), SeenTokens::new(vocab, &context))
            })
            .collect::<Vec<_>>();
        for repetition_penalty in [1.0, 1.05] {
            for top_p in [1.0, 0.95] {
                let params = SamplingParams {
                    temperature: 1.0,
                    top_p,
                    repetition_penalty,
                    ..SamplingParams::default()
                };
                let seconds = time(&params, &rows)?;
                println!(
                    "| {vocab} | {repetition_penalty} | {top_p} | {:.1} |",
                    seconds * 1e6
                );
            }
        }
    }
    Ok(())
}
