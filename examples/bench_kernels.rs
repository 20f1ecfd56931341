//! Benchmark of the differentiable kernels of `r1v2-kernels` on CPU: forward and forward+backward time
//! of each fused op beside its composed reference (`r1v2_kernels::reference`).
//!
//! Run: `cargo run --release --example bench_kernels [-- --iters N] [--only NAME]`. Prints one table; the times are
//! the median over N runs (default 5) after one warm-up run.

use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use r1v2_kernels as kernels;
use r1v2_kernels::reference;

/// An op under test: inputs -> output.
type Op = fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// One benchmark row: the op name, the shape it runs on, its inputs, which of them get gradients,
/// and the fused and composed versions.
struct Case {
    name: &'static str,
    shape: &'static str,
    inputs: Vec<Tensor>,
    trainable: Vec<usize>,
    fused: Op,
    composed: Op,
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Median time of `iters` runs of `f` after one warm-up run.
fn time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    Ok(median(times))
}

/// (forward, forward + backward) times of `op` on the case's inputs.
fn measure(case: &Case, op: Op, iters: usize) -> Result<(Duration, Duration)> {
    let forward = time(iters, || {
        op(&case.inputs)?;
        Ok(())
    })?;
    let vars: Vec<Var> = case
        .trainable
        .iter()
        .map(|&i| Var::from_tensor(&case.inputs[i]))
        .collect::<candle_core::Result<_>>()?;
    let mut tracked = case.inputs.clone();
    for (&i, var) in case.trainable.iter().zip(&vars) {
        tracked[i] = var.as_tensor().clone();
    }
    let weights = Tensor::randn(0f32, 1., op(&case.inputs)?.shape(), &Device::Cpu)?;
    let backward = time(iters, || {
        let out = op(&tracked)?.to_dtype(DType::F32)?;
        (out * &weights)?.sum_all()?.backward()?;
        Ok(())
    })?;
    Ok((forward, backward))
}

fn cases() -> Result<Vec<Case>> {
    let cpu = &Device::Cpu;
    let (rows, hidden) = (8 * 256, 1024);
    let x = Tensor::randn(0f32, 1., (rows, hidden), cpu)?;
    let weight = Tensor::randn(1f32, 0.1, hidden, cpu)?;
    let bias = Tensor::randn(0f32, 0.1, hidden, cpu)?;
    let q = Tensor::randn(0f32, 1., (8, 16, 256, 64), cpu)?;
    let angles = Tensor::randn(0f32, 3., (256, 32), cpu)?;
    let (vocab_rows, vocab) = (2048, 32000);
    let logits = Tensor::randn(0f32, 2., (vocab_rows, vocab), cpu)?;
    let targets = Tensor::arange(0u32, vocab_rows as u32, cpu)?;
    let gate = Tensor::randn(0f32, 1., (rows, 2 * hidden), cpu)?;
    // Attention scores of 8 rows x 8 heads (2 KV heads x 4) x 256 queries x 256 keys, a causal mask.
    let scores = Tensor::randn(0f32, 3., (8, 2, 4, 256, 256), cpu)?;
    let causal: Vec<f32> = (0..256 * 256)
        .map(|i| if i % 256 > i / 256 { f32::MIN } else { 0.0 })
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, 1, 256, 256), cpu)?
        .broadcast_as((8, 1, 1, 256, 256))?
        .contiguous()?;
    // The ~20M Qwen2 of benches/bench_forward.py at batch 4 x 128: an MLP projection and the LM head.
    let tokens = Tensor::randn(0f32, 1., (512, 512), cpu)?;
    let mlp = Tensor::randn(0f32, 0.05, (1408, 512), cpu)?;
    let head = Tensor::randn(0f32, 0.05, (8192, 512), cpu)?;
    Ok(vec![
        Case {
            name: "linear (MLP)",
            shape: "(512, 512) x (1408, 512)",
            inputs: vec![tokens.clone(), mlp],
            trainable: vec![0, 1],
            fused: |t| kernels::linear(&t[0], &t[1]),
            composed: |t| reference::linear(&t[0], &t[1]),
        },
        Case {
            name: "linear (LM head)",
            shape: "(512, 512) x (8192, 512)",
            inputs: vec![tokens, head],
            trainable: vec![0, 1],
            fused: |t| kernels::linear(&t[0], &t[1]),
            composed: |t| reference::linear(&t[0], &t[1]),
        },
        Case {
            name: "rms_norm",
            shape: "(2048, 1024)",
            inputs: vec![x.clone(), weight.clone()],
            trainable: vec![0, 1],
            fused: |t| kernels::rms_norm(&t[0], &t[1], 1e-6),
            composed: |t| reference::rms_norm(&t[0], &t[1], 1e-6),
        },
        Case {
            name: "layer_norm",
            shape: "(2048, 1024)",
            inputs: vec![x.clone(), weight, bias],
            trainable: vec![0, 1, 2],
            fused: |t| kernels::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-6),
            composed: |t| reference::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-6),
        },
        Case {
            name: "softmax_last_dim",
            shape: "(2048, 1024)",
            inputs: vec![x],
            trainable: vec![0],
            fused: |t| kernels::softmax_last_dim(&t[0]),
            composed: |t| reference::softmax_last_dim(&t[0]),
        },
        Case {
            name: "scaled_masked_softmax",
            shape: "(8, 2, 4, 256, 256)",
            inputs: vec![scores, causal],
            trainable: vec![0],
            fused: |t| kernels::scaled_masked_softmax(&t[0], &t[1], 0.125),
            composed: |t| kernels::softmax_last_dim(&(&t[0] * 0.125)?.broadcast_add(&t[1])?),
        },
        Case {
            name: "rope",
            shape: "(8, 16, 256, 64)",
            inputs: vec![q, angles.cos()?, angles.sin()?],
            trainable: vec![0],
            fused: |t| kernels::rope(&t[0], &t[1], &t[2]),
            composed: |t| reference::rope(&t[0], &t[1], &t[2]),
        },
        Case {
            name: "swiglu (composed)",
            shape: "(2048, 2048)",
            inputs: vec![gate.clone(), gate],
            trainable: vec![0, 1],
            fused: |t| kernels::swiglu(&t[0], &t[1]),
            composed: |t| reference::swiglu(&t[0], &t[1]),
        },
        Case {
            name: "token_logprobs",
            shape: "(2048, 32000)",
            inputs: vec![logits, targets],
            trainable: vec![0],
            fused: |t| kernels::token_logprobs(&t[0], &t[1]),
            composed: |t| reference::token_logprobs(&t[0], &t[1]),
        },
    ])
}

fn main() -> Result<()> {
    // As the `r1v2` binary (src/main.rs): candle's element-wise ops on the calling thread. With candle's own pool of
    // spinning workers beside rayon's, the fused kernels (rayon) shared the cores with spinning threads and the
    // timings followed the machine's load more than the op (rms_norm fused fwd+bwd read 120 ms, 31 ms without).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let args: Vec<String> = std::env::args().collect();
    let iters = match args.iter().position(|a| a == "--iters") {
        Some(i) => args.get(i + 1).map(|v| v.parse()).transpose()?.unwrap_or(5),
        None => 5,
    };
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    println!(
        "r1v2-kernels on CPU, f32, median of {iters} runs (ms); threads: {}",
        rayon_threads()
    );
    println!("| op | shape | fused fwd | composed fwd | fused fwd+bwd | composed fwd+bwd |");
    println!("|---|---|---:|---:|---:|---:|");
    for case in cases()? {
        if only.as_deref().is_some_and(|o| !case.name.starts_with(o)) {
            continue;
        }
        let (fused_fwd, fused_both) = measure(&case, case.fused, iters)?;
        let (composed_fwd, composed_both) = measure(&case, case.composed, iters)?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            case.name,
            case.shape,
            ms(fused_fwd),
            ms(composed_fwd),
            ms(fused_both),
            ms(composed_both)
        );
    }
    Ok(())
}

/// Worker threads of the fused kernels (rayon's global pool, `RAYON_NUM_THREADS`).
fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        format!(
            "default ({} cores)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        )
    })
}
