//! `gpu_bench`: what scripts/gpu_check.sh prints for r1v2 on one GPU (ignored by default; it takes a minute).
//!
//! - bf16 matmul rate: the best of 8192^3 products, 2 n^3 FLOPs each (the ceiling for MFU).
//! - decode: a Qwen2-0.5B-shaped model (random weights, bf16) after a 64-token prompt, 32 steps of
//!   `forward_step_last_ids` at batch 1 / 32 / 256; bound = batch / (weight bytes / bandwidth), the
//!   bandwidth given by `R1V2_GPU_BANDWIDTH` (bytes/s; the H200 measured ~4.3e12).
//! - training: forward + backward of the same model's token log-probs on (8, 512) tokens, every weight a
//!   Var; MFU = 6 * params * tokens / time / matmul rate (the Kaplan et al. count, attention omitted).
//! - one GRPO step of the tiny fixture: gradients and the optimizer update timed apart.
//!
//! Lines start with `BENCH` so the script can collect them next to PyTorch's.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use r1v2_actors::model::qwen2::{Config, ForCausalLM};
use r1v2_actors::rl::config::GrpoConfig;

use super::{bank, gpu, grpo_batch, trainer};

fn qwen2_0_5b() -> Result<Config> {
    Ok(serde_json::from_value(serde_json::json!({
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true, "hidden_act": "silu", "use_sliding_window": false
    }))?)
}

fn seconds(device: &Device, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    device.synchronize()?;
    let start = Instant::now();
    f()?;
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64())
}

#[test]
#[ignore = "a GPU benchmark: scripts/gpu_check.sh runs it"]
fn gpu_bench() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    // bf16 matmul rate.
    let n = 8192;
    let a = Tensor::randn(0f32, 1.0, (n, n), &gpu)?.to_dtype(DType::BF16)?;
    let mut best = f64::MAX;
    for _ in 0..10 {
        best = best.min(seconds(&gpu, || {
            a.matmul(&a)?;
            Ok(())
        })?);
    }
    let flops = 2.0 * (n as f64).powi(3) / best;
    println!("BENCH matmul_bf16_tflops {:.1}", flops / 1e12);

    // Decode.
    let cfg = qwen2_0_5b()?;
    let bandwidth: f64 = std::env::var("R1V2_GPU_BANDWIDTH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.3e12);
    for dtype in [DType::BF16, DType::F32] {
        let varmap = VarMap::new();
        let model = ForCausalLM::new(&cfg, VarBuilder::from_varmap(&varmap, dtype, &gpu))?;
        let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        let weight_bytes = (params * dtype.size_in_bytes()) as f64;
        for batch in [1usize, 32, 256] {
            let prompt = Tensor::ones((batch, 64), DType::U32, &gpu)?;
            let mut cache = model.new_cache();
            model.forward_step_last_ids(&prompt, None, &mut cache)?;
            let step = Tensor::ones((batch, 1), DType::U32, &gpu)?;
            let steps = 32;
            let secs = seconds(&gpu, || {
                for _ in 0..steps {
                    model.forward_step_last_ids(&step, None, &mut cache)?;
                }
                Ok(())
            })?;
            let tokens_per_s = (batch * steps) as f64 / secs;
            let bound = batch as f64 / (weight_bytes / bandwidth);
            println!(
                "BENCH decode {dtype:?} batch {batch} tokens_per_s {tokens_per_s:.0} bound {bound:.0} ({:.0}% of it)",
                100.0 * tokens_per_s / bound
            );
        }
        // Training step: forward + backward of token log-probs, every weight a Var.
        let (b, t) = (8, 512);
        let ids = Tensor::ones((b, t), DType::U32, &gpu)?;
        let mut best = f64::MAX;
        for _ in 0..3 {
            best = best.min(seconds(&gpu, || {
                let loss = model.token_logprobs(&ids, None)?.sum_all()?;
                loss.backward()?;
                Ok(())
            })?);
        }
        let mfu = 6.0 * params as f64 * (b * t) as f64 / best / flops;
        println!(
            "BENCH train {dtype:?} fwd_bwd_s {best:.3} tokens_per_s {:.0} mfu {:.1}%",
            (b * t) as f64 / best,
            100.0 * mfu
        );
    }

    // One GRPO step of the fixture, by stage.
    let bank = bank()?;
    let batch = grpo_batch(&[(0, &[1.0, -0.5, 0.2]), (2, &[-1.0, 1.0])], None)?;
    let cfg = GrpoConfig::default();
    let mut policy = trainer(&gpu)?;
    policy.grpo_update(&batch, &bank, &cfg)?; // warm-up
    let mut grads = None;
    let backward = seconds(&gpu, || {
        grads = Some(policy.grpo_gradients(&batch, &bank, &cfg)?);
        Ok(())
    })?;
    let grads = grads.map(|g| g.grads).unwrap_or_default();
    let update = seconds(&gpu, || {
        policy.apply_gradients(grads)?;
        Ok(())
    })?;
    println!("BENCH grpo_step fixture gradients_s {backward:.4} update_s {update:.4}");
    Ok(())
}
