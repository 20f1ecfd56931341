//! The fused attention over a KV cache (`r1v2_kernels::cached_attention`) at decode shapes: one query per row
//! (T = 1), the cache read in place. Prints the time per call and the cache bytes read per second (the kernel
//! reads every key and value row once, mostly from memory: past a few hundred keys that is its bound).
//!
//!     RAYON_NUM_THREADS=2 cargo run --release --example bench_attention
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

fn main() -> Result<()> {
    let dev = Device::Cpu;
    println!("| rows | keys | heads / KV heads | head dim | ms per call | cache GB/s |");
    println!("|---:|---:|---|---:|---:|---:|");
    // The 20M bench config at the end of a short run and at a long one, the 100M config's heads at a long
    // response (8 rows, and one row alone), and a Qwen2-7B-like layer (28 heads over 4, head dim 128).
    for &(b, s, h, h_kv, d) in &[
        (1usize, 4096usize, 12usize, 2usize, 64usize),
        (64, 48, 8, 2, 64),
        (64, 512, 8, 2, 64),
        (8, 2048, 12, 2, 64),
        (8, 512, 28, 4, 128),
    ] {
        let q = Tensor::randn(0f32, 1.0, (b, h, 1, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, h_kv, s, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, h_kv, s, d), &dev)?;
        let mask = Tensor::zeros((b, 1, s), DType::F32, &dev)?;
        let scale = 1.0 / (d as f64).sqrt();
        r1v2_kernels::cached_attention(&q, &k, &v, &mask, scale)?;
        let mut best = f64::MAX;
        for _ in 0..30 {
            let start = Instant::now();
            r1v2_kernels::cached_attention(&q, &k, &v, &mask, scale)?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        let bytes = 2.0 * (b * h_kv * s * d * 4) as f64;
        println!(
            "| {b} | {s} | {h} / {h_kv} | {d} | {:.3} | {:.1} |",
            best * 1e3,
            bytes / best / 1e9
        );
    }
    Ok(())
}
