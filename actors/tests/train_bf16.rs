//! Mixed precision on the tiny InternVL-chat fixture: a policy held in bf16 (weights and activations, forward
//! and backward) with f32 master weights and AdamW moments. One GRPO update in bf16 agrees with the same
//! update in f32 from the same weights within bf16's precision; the trained parameters stay bf16 Vars whose
//! values are their f32 masters rounded; save -> load -> step equals an uninterrupted step bit for bit
//! (the masters come back from the checkpoint, not from the bf16 model); two data-parallel bf16 ranks sum
//! f32 gradients (an empty rank's zeros included), end identical and match one trainer.

mod train_common;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use r1v2_actors::model::chat::Trainable;
use r1v2_actors::rl::config::GrpoConfig;
use r1v2_actors::train::{OptimConfig, PolicyTrainer};
use train_common::{bank, grpo_batch, img_context_id, load_as, model_dir};

/// LLM and adapter train, so the backward runs through every bf16 layer into bf16 Vars.
fn config() -> OptimConfig {
    OptimConfig {
        lr: 1e-3,
        weight_decay: 0.0,
        micro_batch: 2,
        trainable: Trainable {
            vision: false,
            adapter: true,
            llm: true,
        },
        ..Default::default()
    }
}

fn trainer(dtype: DType) -> Result<PolicyTrainer> {
    trainer_with(dtype, config())
}

fn trainer_with(dtype: DType, config: OptimConfig) -> Result<PolicyTrainer> {
    Ok(PolicyTrainer::new(
        load_as(&model_dir(), dtype, config.trainable)?,
        config,
    )?)
}

/// A first Adam step is lr * g / (|g| + eps): with torch's eps = 1e-8 a gradient near 0 whose sign the
/// summation order flips moves its weight by 2 lr. eps = 1e-3 bounds the sensitivity to lr / eps, so
/// data-parallel ranks compare with one trainer closely (as in train_collective.rs).
fn smooth_config() -> OptimConfig {
    OptimConfig {
        eps: 1e-3,
        ..config()
    }
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

#[test]
fn a_bf16_grpo_update_agrees_with_f32_and_trains_f32_masters() -> Result<()> {
    let bank = bank()?;
    let batch = grpo_batch(&[(0, &[1.0, -0.5, 0.2]), (2, &[-1.0, 1.0])], None)?;
    let grpo = GrpoConfig {
        kl_coef: 0.05,
        ..Default::default()
    };
    let (mut full, mut half) = (trainer(DType::F32)?, trainer(DType::BF16)?);
    // The f32 run starts from the bf16 values, so both start from the same weights.
    for ((_, f), (_, h)) in full
        .policy()
        .trainable_vars
        .iter()
        .zip(&half.policy().trainable_vars)
    {
        ensure!(h.dtype() == DType::BF16, "the bf16 policy holds bf16 Vars");
        f.set(&h.as_tensor().to_dtype(DType::F32)?)?;
    }

    // Gradients: the bf16 ones are summed in f32, and within bf16's precision of the f32 ones.
    let a = full.grpo_gradients(&batch, &bank, &grpo)?;
    let b = half.grpo_gradients(&batch, &bank, &grpo)?;
    let (mut worst, mut scale, mut dot, mut norm_a, mut norm_b) = (0f32, 0f32, 0f64, 0f64, 0f64);
    for (ga, gb) in a.grads.iter().zip(&b.grads) {
        ensure!(gb.dtype() == DType::F32, "accumulated gradients are f32");
        for (x, y) in values(ga)?.into_iter().zip(values(gb)?) {
            worst = worst.max((x - y).abs());
            scale = scale.max(x.abs());
            dot += f64::from(x) * f64::from(y);
            norm_a += f64::from(x) * f64::from(x);
            norm_b += f64::from(y) * f64::from(y);
        }
    }
    let cosine = dot / (norm_a.sqrt() * norm_b.sqrt());
    eprintln!(
        "bf16 vs f32 gradients: max |diff| = {worst:e} (max |grad| {scale:e}), cosine {cosine}"
    );
    ensure!(
        scale > 1e-4,
        "the gradient is ~0: the check would be vacuous"
    );
    // bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%) per op; through two LLM layers, the
    // adapter and the log-softmax a few percent of the largest gradient is bf16-sized.
    ensure!(
        worst < 0.05 * scale,
        "bf16 gradients differ by {worst} (scale {scale})"
    );
    ensure!(
        cosine > 0.995,
        "bf16 gradients point elsewhere: cosine {cosine}"
    );
    for key in ["actor/pg_loss", "actor/kl", "actor/entropy"] {
        let (x, y) = (a.metrics[key], b.metrics[key]);
        ensure!(
            (x - y).abs() < 0.02 * x.abs().max(1.0),
            "{key}: f32 {x} vs bf16 {y}"
        );
    }

    // One update each from the same weights.
    let before: Vec<Vec<f32>> = full
        .policy()
        .trainable_vars
        .iter()
        .map(|(_, v)| values(v.as_tensor()))
        .collect::<Result<_>>()?;
    full.grpo_update(&batch, &bank, &grpo)?;
    half.grpo_update(&batch, &bank, &grpo)?;
    let lr = config().lr as f32;
    let (mut agree, mut total) = (0usize, 0usize);
    for (((name, f), (_, h)), start) in full
        .policy()
        .trainable_vars
        .iter()
        .zip(&half.policy().trainable_vars)
        .zip(&before)
    {
        ensure!(h.dtype() == DType::BF16, "`{name}` left bf16");
        let master = half
            .master_weight(name)
            .expect("a bf16 parameter has a master");
        ensure!(
            master.dtype() == DType::F32,
            "the master of `{name}` is f32"
        );
        ensure!(
            values(h.as_tensor())? == values(&master.to_dtype(DType::BF16)?)?,
            "`{name}` is not its master rounded to bf16"
        );
        // AdamW's first step moves each weight by lr * g / (|g| + eps) = ±lr: the f32 master moves as the
        // f32 run does wherever the gradients agree in sign, which bf16 rounding changes only for tiny ones.
        for ((m, w), s) in values(&master)?
            .into_iter()
            .zip(values(f.as_tensor())?)
            .zip(start)
        {
            let (step_half, step_full) = (m - s, w - s);
            ensure!(
                step_half.abs() <= 1.001 * lr && step_full.abs() <= 1.001 * lr,
                "`{name}`: a step larger than lr"
            );
            agree += usize::from((step_half - step_full).abs() < 1e-3 * lr);
            total += 1;
        }
    }
    let share = agree as f64 / total as f64;
    eprintln!("bf16 vs f32 update: {agree} of {total} weights ({share:.4}) took the same step");
    ensure!(
        share > 0.95,
        "only {share} of the weights took the f32 run's step"
    );
    Ok(())
}

#[test]
fn bf16_save_load_step_equals_uninterrupted_step() -> Result<()> {
    let bank = bank()?;
    let batch = grpo_batch(&[(0, &[1.0, -1.0]), (2, &[0.5, -0.5])], None)?;
    let grpo = GrpoConfig::default();
    let mut uninterrupted = trainer(DType::BF16)?;
    for _ in 0..2 {
        uninterrupted.grpo_update(&batch, &bank, &grpo)?;
    }
    let dir = tempfile::tempdir()?;
    ensure!(uninterrupted.save_state(dir.path())? == 2);
    let expected = uninterrupted.grpo_update(&batch, &bank, &grpo)?;
    let mut resumed = PolicyTrainer::load_checkpoint(
        dir.path(),
        DType::BF16,
        &Device::Cpu,
        config(),
        Some(img_context_id()?),
    )?;
    let got = resumed.grpo_update(&batch, &bank, &grpo)?;
    for ((name, a), (_, b)) in expected
        .weights
        .tensors
        .iter()
        .zip(got.weights.tensors.iter())
    {
        ensure!(a.dtype() == DType::BF16 && b.dtype() == DType::BF16);
        ensure!(values(a)? == values(b)?, "`{name}` differs after resume");
        let (ma, mb) = (
            uninterrupted.master_weight(name).expect("master"),
            resumed.master_weight(name).expect("master"),
        );
        ensure!(
            values(&ma)? == values(&mb)?,
            "the master of `{name}` differs after resume"
        );
    }
    for key in ["actor/kl", "actor/pg_loss", "actor/grad_norm"] {
        ensure!(
            expected.metrics[key] == got.metrics[key],
            "{key} differs after resume"
        );
    }
    Ok(())
}

/// One data-parallel GRPO update of two bf16 ranks over `shards`; returns each rank's trainer.
fn data_parallel(
    shards: [&r1v2_actors::protocol::TrainBatch; 2],
    grpo: &GrpoConfig,
) -> Result<Vec<PolicyTrainer>> {
    let group = r1v2_actors::train::LocalCollective::group(2)?;
    let bank = bank()?;
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .zip(shards)
            .map(|(collective, shard)| {
                let bank = bank.clone();
                scope.spawn(move || -> Result<PolicyTrainer> {
                    let mut trainer = trainer_with(DType::BF16, smooth_config())?;
                    trainer.grpo_update_shard(shard, &bank, grpo, &collective)?;
                    Ok(trainer)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("rank panicked")))
            })
            .collect()
    })
}

#[test]
fn bf16_data_parallel_ranks_sum_f32_gradients_and_match_one_trainer() -> Result<()> {
    let batch = grpo_batch(
        &[
            (0, &[1.0, -1.0, 0.5]),
            (2, &[-0.3, 0.3]),
            (1, &[0.8, -0.8]),
            (3, &[1.0, -1.0]),
        ],
        None,
    )?;
    let grpo = GrpoConfig {
        kl_coef: 0.05,
        ..Default::default()
    };
    let mut single = trainer_with(DType::BF16, smooth_config())?;
    single.grpo_update(&batch, &bank()?, &grpo)?;
    let mut empty = batch.clone();
    empty.groups.clear();
    let mut halves = [batch.clone(), batch.clone()];
    halves[0].groups.truncate(2);
    halves[1].groups.drain(..2);
    // Split in halves, and all on one rank (the other adds zero gradients, which must be f32 too).
    for (label, shards) in [
        ("halves", [&halves[0], &halves[1]]),
        ("one rank empty", [&batch, &empty]),
    ] {
        let ranks = data_parallel(shards, &grpo)?;
        let mut worst = 0f32;
        for (name, var) in &ranks[0].policy().trainable_vars {
            let masters: Vec<Vec<f32>> = ranks
                .iter()
                .map(|r| values(&r.master_weight(name).expect("master")))
                .collect::<Result<_>>()?;
            ensure!(
                masters[0] == masters[1],
                "{label}: the ranks' masters of `{name}` differ"
            );
            ensure!(var.dtype() == DType::BF16);
            let want = values(&single.master_weight(name).expect("master"))?;
            for (a, b) in masters[0].iter().zip(&want) {
                worst = worst.max((a - b).abs());
            }
        }
        let lr = config().lr as f32;
        eprintln!(
            "bf16 data parallel ({label}): max |master - one trainer's| = {worst:e} (lr {lr:e})"
        );
        // Other micro-batch compositions change the padded shapes, hence candle's f32 summation order
        // inside each widened bf16 product, and bf16 rounding turns a last-bit difference into a 2^-8
        // relative one: the gradients agree at bf16's precision (~1e-4 here), and through eps = 1e-3 a
        // weight's step moves by at most ~lr * 1e-4 / 1e-3. Measured 0.16 lr (halves), 0 (same batches).
        ensure!(worst < 0.3 * lr, "{label}: masters differ by {worst}");
    }
    Ok(())
}
