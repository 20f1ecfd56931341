//! Decode-shaped matmuls on the CPU, GFLOP/s: per shape, candle's `x (M, K) @ W^T` beside the packed kernel
//! (`r1v2_kernels::packed_linear`); then every matmul of one decode step of the ~20M and ~100M Qwen2 configs of
//! `benches/bench_generate.py` (all layers and the LM head, each weight read once, as in generation) through
//! the packed kernel alone. Weights are cold (more than the caches hold) unless `HOT` is set.
//!
//!     RAYON_NUM_THREADS=1 cargo run --release --example bench_matmul
//!
//! Generation runs one shard of rows per thread, each shard's matmuls on one thread: `RAYON_NUM_THREADS=1` with
//! 32 rows is a 64-row batch on 2 threads; few rows (one shard) split each matmul across the threads.
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};

fn time(f: impl Fn() -> Result<Tensor>) -> Result<f64> {
    f()?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..20 {
            f()?;
        }
        best = best.min(start.elapsed().as_secs_f64() / 20.0);
    }
    Ok(best)
}

fn main() -> Result<()> {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let dev = Device::Cpu;
    let shapes = [
        (512, 512),
        (512, 128),
        (512, 1408),
        (1408, 512),
        (512, 8192),
        (768, 2048),
        (2048, 768),
        (768, 32000),
    ];
    println!("| M | K | N | candle GFLOP/s | packed GFLOP/s |");
    for m in [8usize, 32, 64] {
        for &(k, n) in &shapes {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            // Enough distinct weights to overflow the caches, as in a decode step (each weight read once).
            let copies = if std::env::var_os("HOT").is_some() {
                1
            } else {
                (96 << 20) / (4 * n * k) + 1
            };
            let ws = (0..copies)
                .map(|_| Ok(Tensor::randn(0f32, 0.02, (n, k), &dev)?))
                .collect::<Result<Vec<_>>>()?;
            let packed = ws
                .iter()
                .map(|w| Ok(r1v2_kernels::PackedMatrix::from_tensors(w, None)?))
                .collect::<Result<Vec<_>>>()?;
            let i = std::cell::Cell::new(0usize);
            let flops = 2.0 * (m * k * n) as f64;
            let a = time(|| {
                i.set((i.get() + 1) % copies);
                Ok(x.matmul(&ws[i.get()].t()?)?)
            })?;
            let b = time(|| {
                i.set((i.get() + 1) % copies);
                Ok(r1v2_kernels::packed_linear(&x, &packed[i.get()])?)
            })?;
            println!(
                "| {m} | {k} | {n} | {:.1} | {:.1} |",
                flops / a / 1e9,
                flops / b / 1e9
            );
        }
    }
    decode_steps()
}

/// One decode step's matmuls, packed: (hidden, intermediate, layers, vocab, heads, KV heads) of each config.
fn decode_steps() -> Result<()> {
    println!();
    println!("| config | rows | packed GFLOP/s | ms per step |");
    println!("|---|---:|---:|---:|");
    let mut state = 1u64;
    let mut random = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
            })
            .collect()
    };
    for (name, (hidden, inter, layers, vocab, heads, kv_heads)) in [
        (
            "20M",
            (512usize, 1408usize, 6usize, 8192usize, 8usize, 2usize),
        ),
        ("100M", (768, 2048, 12, 32000, 12, 2)),
    ] {
        let kv = hidden / heads * kv_heads;
        // (K, N) of q/k/v together, o, gate/up together, down; then the tied LM head.
        let layer = [
            (hidden, hidden + 2 * kv),
            (hidden, hidden),
            (hidden, 2 * inter),
            (inter, hidden),
        ];
        let shapes: Vec<(usize, usize)> = (0..layers)
            .flat_map(|_| layer)
            .chain([(hidden, vocab)])
            .collect();
        let weights = shapes
            .iter()
            .map(|&(k, n)| {
                Ok(r1v2_kernels::PackedMatrix::pack(
                    &random(n * k),
                    n,
                    k,
                    None,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        for m in [1usize, 8, 32, 64] {
            let xs: Vec<Vec<f32>> = shapes.iter().map(|&(k, _)| random(m * k)).collect();
            let flops: f64 = shapes.iter().map(|&(k, n)| 2.0 * (m * k * n) as f64).sum();
            let step = || -> Result<()> {
                for (w, x) in weights.iter().zip(&xs) {
                    std::hint::black_box(w.matmul_vec(x, m)?);
                }
                Ok(())
            };
            step()?;
            let mut best = f64::MAX;
            for _ in 0..10 {
                let start = Instant::now();
                step()?;
                best = best.min(start.elapsed().as_secs_f64());
            }
            println!(
                "| {name} | {m} | {:.1} | {:.2} |",
                flops / best / 1e9,
                best * 1e3
            );
        }
    }
    Ok(())
}
