//! CUDA against the CPU (`cuda` feature only): each differentiable op of r1v2-kernels forward and backward,
//! one whole GRPO update of the tiny InternVL-chat fixture (gradients, metrics and updated weights), and
//! the NCCL all-reduce. Without a GPU every test prints "skipped: no CUDA device (<why>)" and returns.
//!
//! `gpu_bench` (ignored; scripts/gpu_check.sh runs it with `--ignored --nocapture`) prints the measured
//! bf16 matmul rate, decode tokens/s of a Qwen2-0.5B-shaped random model at batch 1 / 32 / 256 against the
//! memory-bandwidth bound, its forward+backward MFU, and one GRPO step's stage timings.
#![cfg(feature = "cuda")]

mod train_common;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use r1v2_actors::model::chat::ChatModel;
use r1v2_actors::rl::config::GrpoConfig;
use r1v2_actors::train::collective::NcclCollective;
use r1v2_actors::train::{Collective, OptimConfig, PolicyTrainer};
use train_common::{bank, grpo_batch, img_context_id, model_dir};

fn gpu() -> Option<Device> {
    match r1v2_actors::device::parse_device("cuda:0") {
        Ok(device) => Some(device),
        Err(err) => {
            println!("skipped: no CUDA device ({err})");
            None
        }
    }
}

/// A deterministic tensor in [-1, 1) of `dims` on the CPU.
fn pattern(dims: &[usize], seed: usize) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|k| ((k * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(values, dims.to_vec(), &Device::Cpu)?)
}

/// Largest |a - b| over the largest |a| (relative), a and b flattened to f32 on the CPU.
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?;
    let b = b
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?;
    let scale = a.abs()?.max(0)?.to_scalar::<f32>()?.max(1e-6);
    Ok((a - b)?.abs()?.max(0)?.to_scalar::<f32>()? / scale)
}

type Op<'a> = dyn Fn(&[Tensor], &Device) -> candle_core::Result<Tensor> + 'a;

/// Runs `op` on the CPU and on `gpu` with the same inputs (as Vars), a fixed weighting of the output as
/// the loss, and compares the outputs and every input's gradient.
fn compare(name: &str, inputs: &[Tensor], op: &Op<'_>, gpu: &Device) -> Result<()> {
    let run = |device: &Device| -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(device)?))
            .collect::<candle_core::Result<_>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = op(&tensors, device)?;
        let probe = pattern(out.dims(), 99)?.to_device(device)?;
        let grads = (out.to_dtype(DType::F32)? * probe)?.sum_all()?.backward()?;
        let grads = vars
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("no gradient"))
            })
            .collect::<Result<_>>()?;
        Ok((out, grads))
    };
    let (cpu_out, cpu_grads) = run(&Device::Cpu)?;
    let (gpu_out, gpu_grads) = run(gpu)?;
    let diff = rel_diff(&cpu_out, &gpu_out)?;
    println!("{name}: forward max rel diff {diff:e}");
    ensure!(
        diff < 1e-4,
        "{name}: CUDA forward differs from the CPU by {diff}"
    );
    for (i, (c, g)) in cpu_grads.iter().zip(&gpu_grads).enumerate() {
        let diff = rel_diff(c, g)?;
        println!("{name}: gradient of input {i} max rel diff {diff:e}");
        ensure!(diff < 1e-4, "{name}: CUDA gradient {i} differs by {diff}");
    }
    Ok(())
}

#[test]
fn each_op_matches_the_cpu_forward_and_backward() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let x = pattern(&[4, 7, 64], 1)?;
    let (w, b) = (pattern(&[64], 2)?, pattern(&[64], 3)?);
    compare(
        "rms_norm",
        &[x.clone(), w.clone()],
        &|t, _| r1v2_kernels::rms_norm(&t[0], &t[1], 1e-6),
        &gpu,
    )?;
    compare(
        "layer_norm",
        &[x.clone(), w, b],
        &|t, _| r1v2_kernels::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5),
        &gpu,
    )?;
    compare(
        "softmax_last_dim",
        &[pattern(&[4, 33], 4)?],
        &|t, _| r1v2_kernels::softmax_last_dim(&t[0]),
        &gpu,
    )?;
    compare(
        "rope",
        &[
            pattern(&[2, 4, 5, 16], 5)?,
            pattern(&[5, 8], 6)?,
            pattern(&[5, 8], 7)?,
        ],
        &|t, _| r1v2_kernels::rope(&t[0], &t[1], &t[2]),
        &gpu,
    )?;
    compare(
        "swiglu",
        &[pattern(&[3, 40], 8)?, pattern(&[3, 40], 9)?],
        &|t, _| r1v2_kernels::swiglu(&t[0], &t[1]),
        &gpu,
    )?;
    let targets: Vec<u32> = (0..15).map(|k| (k * 13 % 50) as u32).collect();
    compare(
        "token_logprobs",
        &[pattern(&[3, 5, 50], 10)?],
        &|t, device| {
            let targets = Tensor::from_vec(targets.clone(), (3, 5), device)?;
            r1v2_kernels::token_logprobs(&t[0], &targets)
        },
        &gpu,
    )?;
    Ok(())
}

fn trainer(device: &Device) -> Result<PolicyTrainer> {
    let config = OptimConfig {
        lr: 1e-2,
        micro_batch: 4,
        warmup_steps: 1,
        total_steps: 10,
        ..Default::default()
    };
    let mut loaded = ChatModel::load(&model_dir(), DType::F32, device, config.trainable)?;
    loaded.model.set_img_context_token_id(img_context_id()?);
    Ok(PolicyTrainer::new(loaded, config)?)
}

#[test]
fn one_grpo_update_matches_the_cpu() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let bank = bank()?;
    let batch = grpo_batch(&[(0, &[1.0, -0.5, 0.2]), (2, &[-1.0, 1.0])], None)?;
    let cfg = GrpoConfig {
        kl_coef: 0.05,
        ..Default::default()
    };
    let (mut cpu, mut cuda) = (trainer(&Device::Cpu)?, trainer(&gpu)?);
    let (a, b) = (
        cpu.grpo_gradients(&batch, &bank, &cfg)?,
        cuda.grpo_gradients(&batch, &bank, &cfg)?,
    );
    ensure!(a.grads.len() == b.grads.len() && !a.grads.is_empty());
    for (i, (x, y)) in a.grads.iter().zip(&b.grads).enumerate() {
        let diff = rel_diff(x, y)?;
        ensure!(
            diff < 1e-3,
            "gradient {i}: CUDA differs from the CPU by {diff} (relative)"
        );
    }
    for (key, value) in &a.metrics {
        let other = b.metrics.get(key).copied().unwrap_or(f64::NAN);
        ensure!(
            (value - other).abs() <= 1e-4 * value.abs().max(1.0),
            "{key}: {value} vs {other}"
        );
    }
    let (ra, rb) = (
        cpu.grpo_update(&batch, &bank, &cfg)?,
        cuda.grpo_update(&batch, &bank, &cfg)?,
    );
    for ((name, x), (_, y)) in ra.weights.tensors.iter().zip(rb.weights.tensors.iter()) {
        let diff = rel_diff(x, y)?;
        ensure!(
            diff < 1e-4,
            "{name} after one update: CUDA differs by {diff} (relative)"
        );
    }
    println!(
        "GRPO update on CUDA equals the CPU's; metrics {:?}",
        rb.metrics
    );
    Ok(())
}

#[test]
fn nccl_all_reduce_sums_over_every_gpu() -> Result<()> {
    let Some(_) = gpu() else { return Ok(()) };
    let (count, _) = r1v2_actors::device::cuda_device_count();
    let devices: Vec<Device> = (0..count)
        .map(Device::new_cuda)
        .collect::<candle_core::Result<_>>()?;
    let group = NcclCollective::group(&devices)?;
    let devices = &devices;
    let results: Vec<Result<Vec<Tensor>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .iter()
            .map(|rank| {
                scope.spawn(move || -> Result<Vec<Tensor>> {
                    let device = &devices[rank.rank()];
                    let value = rank.rank() as f32 + 1.0;
                    let mut tensors = vec![
                        Tensor::full(value, (3, 5), device)?,
                        Tensor::full(value, 7, device)?.to_dtype(DType::BF16)?,
                    ];
                    rank.all_reduce_sum(&mut tensors)?;
                    Ok(tensors)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    let expected = (count * (count + 1) / 2) as f32;
    for result in results {
        for tensor in result? {
            let values = tensor
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            ensure!(
                values.iter().all(|v| *v == expected),
                "{values:?} != {expected}"
            );
        }
    }
    println!("NCCL all-reduce over {count} GPU(s) gives the sum on every rank");
    Ok(())
}

#[path = "cuda_support/bench.rs"]
mod cuda_bench;
