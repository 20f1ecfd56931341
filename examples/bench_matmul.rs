//! Decode-shaped matmuls on the CPU: `x (M, K) @ W^T` with W stored as (N, K) (the checkpoint layout)
//! or pre-transposed as (K, N), GFLOP/s per shape.
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
    Ok(())
}
