//! PolicyTrainer on the tiny InternVL-chat fixture: gradient accumulation equals the single-batch gradient,
//! adapter-only updates touch only `mlp1.*`, GRPO raises the log-probs of positive-advantage responses, the
//! reference shares the frozen tensors, and save -> load -> step equals an uninterrupted step bit for bit.

mod train_common;

use anyhow::{ensure, Result};
use candle_core::Tensor;
use r1v2_actors::model::chat::Trainable;
use r1v2_actors::rl::config::{GrpoConfig, LossAggregation, MpoConfig, SftNormalisation};
use r1v2_actors::rl::mpo::BcoRewardMean;
use r1v2_actors::train::{OptimConfig, PolicyTrainer, ResponseRow, ResponseScorer};
use train_common::{bank, grpo_batch, img_context_id, load, mpo_pairs, prompts};

fn trainer(micro_batch: usize) -> Result<PolicyTrainer> {
    let config = OptimConfig {
        lr: 1e-2,
        micro_batch,
        warmup_steps: 1,
        total_steps: 10,
        ..Default::default()
    };
    Ok(PolicyTrainer::new(load(config.trainable)?, config)?)
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> Result<f32> {
    ensure!(a.len() == b.len());
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        worst = worst.max((x - y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
    }
    Ok(worst)
}

fn max_abs(a: &[Tensor]) -> Result<f32> {
    let mut worst = 0f32;
    for x in a {
        worst = worst.max(x.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
    }
    Ok(worst)
}

#[test]
fn grpo_gradient_accumulation_equals_single_batch() -> Result<()> {
    let (whole, split) = (trainer(64)?, trainer(2)?);
    let bank = bank()?;
    let batch = grpo_batch(
        &[
            (0, &[1.0, -0.5, 0.2]),
            (2, &[-1.0, 1.0]),
            (1, &[0.7, -0.7, 0.3]),
        ],
        None,
    )?;
    for aggregation in [
        LossAggregation::SequenceMeanTokenMean,
        LossAggregation::TokenMean,
        LossAggregation::SequenceSumNormalised {
            max_completion_len: 8,
        },
    ] {
        let cfg = GrpoConfig {
            aggregation,
            kl_coef: 0.05,
            ..Default::default()
        };
        let a = whole.grpo_gradients(&batch, &bank, &cfg)?;
        let b = split.grpo_gradients(&batch, &bank, &cfg)?;
        let diff = max_diff(&a.grads, &b.grads)?;
        let scale = max_abs(&a.grads)?;
        eprintln!("{aggregation:?}: max |accumulated - single| = {diff:e} (max |grad| {scale:e})");
        ensure!(scale > 1e-4, "gradient is ~0: the check would be vacuous");
        ensure!(
            diff < 1e-5,
            "{aggregation:?}: accumulated gradient differs by {diff}"
        );
        for key in [
            "actor/pg_loss",
            "actor/kl",
            "actor/clipfrac",
            "actor/entropy",
        ] {
            let (x, y) = (a.metrics[key], b.metrics[key]);
            ensure!((x - y).abs() < 1e-5, "{key}: {x} vs {y}");
        }
        ensure!(a.tokens == b.tokens);
    }
    Ok(())
}

#[test]
fn mpo_gradient_accumulation_equals_single_batch() -> Result<()> {
    let (whole, split) = (trainer(64)?, trainer(2)?);
    let bank = bank()?;
    let pairs = mpo_pairs(5);
    for sft_normalisation in [
        SftNormalisation::PerSequence,
        SftNormalisation::BatchTokenMean,
    ] {
        let cfg = MpoConfig {
            sft_normalisation,
            ..Default::default()
        };
        // A running mean with history, so delta is not just this batch's mean.
        let start = BcoRewardMean {
            mean: 0.3,
            count: 2,
        };
        let (mut da, mut db) = (start, start);
        let a = whole.mpo_gradients(&pairs, &bank, &cfg, &mut da)?;
        let b = split.mpo_gradients(&pairs, &bank, &cfg, &mut db)?;
        ensure!(
            da.count == 3 && (da.mean - db.mean).abs() < 1e-9,
            "{da:?} vs {db:?}"
        );
        let diff = max_diff(&a.grads, &b.grads)?;
        let scale = max_abs(&a.grads)?;
        eprintln!(
            "{sft_normalisation:?}: max |accumulated - single| = {diff:e} (max |grad| {scale:e})"
        );
        ensure!(scale > 1e-4, "gradient is ~0: the check would be vacuous");
        ensure!(
            diff < 1e-5,
            "{sft_normalisation:?}: accumulated gradient differs by {diff}"
        );
        for key in ["mpo/dpo", "mpo/bco", "mpo/sft", "mpo/delta"] {
            let (x, y) = (a.metrics[key], b.metrics[key]);
            ensure!((x - y).abs() < 1e-5, "{key}: {x} vs {y}");
        }
    }
    Ok(())
}

#[test]
fn adapter_only_update_changes_only_mlp1_and_reference_shares_frozen_tensors() -> Result<()> {
    let mut trainer = trainer(4)?;
    let policy = trainer.policy().model.as_chat().expect("a chat policy");
    let reference = trainer.reference().as_chat().expect("a chat reference");
    // The frozen modules are the same tensors (same storage), not copies.
    ensure!(
        policy.llm.model.embedding_weight().id() == reference.llm.model.embedding_weight().id(),
        "the reference copied the embedding matrix"
    );
    // Copies: a Var is updated in place, so the store's tensors would follow it.
    let before = trainer
        .policy()
        .store
        .tensors()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.copy()?)))
        .collect::<Result<Vec<_>>>()?;
    let bank = bank()?;
    let batch = grpo_batch(&[(0, &[1.0, -1.0]), (1, &[0.5, -0.5])], None)?;
    let prompts = prompts()?;
    let reference_before = trainer.reference().as_chat().expect("chat").forward(
        &Tensor::new(prompts[0].token_ids.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?,
        prompts[0].pixel_values.as_ref(),
        None,
    )?;
    // Two updates: the first has lr 0 (warmup), the second moves the weights.
    for _ in 0..2 {
        trainer.grpo_update(&batch, &bank, &GrpoConfig::default())?;
    }
    ensure!(trainer.version() == 2);
    let after = trainer.policy().store.tensors()?;
    let mut changed = Vec::new();
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        let same = a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?;
        if !same {
            changed.push(name.clone());
        }
    }
    ensure!(!changed.is_empty(), "nothing changed");
    ensure!(
        changed.iter().all(|n| n.starts_with("mlp1.")),
        "changed: {changed:?}"
    );
    // The reference did not move with the policy.
    let reference_after = trainer.reference().as_chat().expect("chat").forward(
        &Tensor::new(prompts[0].token_ids.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?,
        prompts[0].pixel_values.as_ref(),
        None,
    )?;
    let moved = (reference_after - reference_before)?
        .abs()?
        .max_keepdim(2)?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    ensure!(moved == 0.0, "the reference moved by {moved}");
    // The published weights are the mlp1 tensors at version 2.
    let weights = trainer.weights()?;
    ensure!(weights.version == 2 && weights.tensors.iter().all(|(n, _)| n.starts_with("mlp1.")));
    Ok(())
}

/// Mean log-prob per token of the positive- and negative-advantage responses of `batch`.
fn mean_logprobs(
    scorer: &ResponseScorer,
    batch: &r1v2_actors::protocol::TrainBatch,
) -> Result<(f32, f32)> {
    let prompts = prompts()?;
    let (mut positive, mut negative) = (Vec::new(), Vec::new());
    for group in &batch.groups {
        for sample in &group.samples {
            let rows = [ResponseRow {
                prompt: prompts[group.prompt_id.0 as usize].clone(),
                response: &sample.token_ids,
            }];
            let lp = scorer
                .response_logprobs(&rows, false)?
                .logprobs
                .sum_all()?
                .to_scalar::<f32>()?
                / sample.token_ids.len() as f32;
            if sample.advantage > 0.0 {
                positive.push(lp)
            } else {
                negative.push(lp)
            }
        }
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    Ok((mean(&positive), mean(&negative)))
}

#[test]
fn grpo_updates_raise_positive_advantage_logprobs() -> Result<()> {
    let mut trainer = trainer(4)?;
    let bank = bank()?;
    // The policy's model shares its Vars, so this scorer follows the updates.
    let policy = trainer.policy();
    let scorer =
        ResponseScorer::for_policy(policy.model.clone(), &policy.store.frozen_var_builder())?;
    let batch = grpo_batch(
        &[(0, &[1.0, -1.0, 1.0, -1.0]), (1, &[-1.0, 1.0])],
        Some(&scorer),
    )?;
    let (pos0, neg0) = mean_logprobs(&scorer, &batch)?;
    let mut report = None;
    for _ in 0..4 {
        report = Some(trainer.grpo_update(&batch, &bank, &GrpoConfig::default())?);
    }
    let report = report.expect("four updates ran");
    let (pos1, neg1) = mean_logprobs(&scorer, &batch)?;
    eprintln!(
        "positive {pos0} -> {pos1}, negative {neg0} -> {neg1}; metrics {:?}",
        report.metrics
    );
    ensure!(
        pos1 > pos0 + 1e-3,
        "positive-advantage log-probs did not rise: {pos0} -> {pos1}"
    );
    ensure!(
        neg1 < neg0 - 1e-3,
        "negative-advantage log-probs did not fall: {neg0} -> {neg1}"
    );
    for key in [
        "actor/pg_loss",
        "actor/kl",
        "actor/clipfrac",
        "actor/entropy",
        "actor/grad_norm",
        "actor/lr",
    ] {
        ensure!(
            report.metrics.get(key).is_some_and(|v| v.is_finite()),
            "metric {key} missing"
        );
    }
    ensure!(
        report.metrics["actor/kl"] > 0.0,
        "the policy moved, KL must be > 0"
    );
    ensure!(report.weights.version == 4 && report.tokens > 0);
    Ok(())
}

#[test]
fn save_load_step_equals_uninterrupted_step() -> Result<()> {
    let bank = bank()?;
    let batch = grpo_batch(&[(0, &[1.0, -1.0]), (2, &[0.5, -0.5])], None)?;
    let grpo = GrpoConfig::default();
    let mut uninterrupted = trainer(4)?;
    for _ in 0..2 {
        uninterrupted.grpo_update(&batch, &bank, &grpo)?;
    }
    let dir = tempfile::tempdir()?;
    ensure!(uninterrupted.save_state(dir.path())? == 2);
    let expected = uninterrupted.grpo_update(&batch, &bank, &grpo)?;

    let config = uninterrupted.config().clone();
    let mut resumed = PolicyTrainer::load_checkpoint(
        dir.path(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        config,
        Some(img_context_id()?),
    )?;
    ensure!(resumed.version() == 2 && resumed.optimizer_steps() == 2);
    ensure!(
        resumed
            .policy()
            .model
            .as_chat()
            .expect("chat")
            .llm
            .model
            .embedding_weight()
            .id()
            == resumed
                .reference()
                .as_chat()
                .expect("chat")
                .llm
                .model
                .embedding_weight()
                .id(),
        "the resumed reference copied the frozen tensors"
    );
    let got = resumed.grpo_update(&batch, &bank, &grpo)?;
    ensure!(got.weights.version == 3);
    for ((n1, a), (n2, b)) in expected
        .weights
        .tensors
        .iter()
        .zip(got.weights.tensors.iter())
    {
        ensure!(n1 == n2);
        ensure!(
            a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?,
            "`{n1}` differs after resume"
        );
    }
    for key in ["actor/kl", "actor/pg_loss", "actor/lr", "actor/grad_norm"] {
        ensure!(
            expected.metrics[key] == got.metrics[key],
            "{key} differs after resume"
        );
    }
    Ok(())
}

#[test]
fn mpo_updates_widen_the_preference_margin_and_mismatched_trainables_are_errors() -> Result<()> {
    let mut trainer = trainer(4)?;
    let bank = bank()?;
    let pairs = mpo_pairs(4);
    let mut delta = BcoRewardMean::default();
    let cfg = MpoConfig::default();
    let first = trainer.mpo_update(&pairs, &bank, &cfg, &mut delta)?;
    let mut last = first.clone();
    for _ in 0..4 {
        last = trainer.mpo_update(&pairs, &bank, &cfg, &mut delta)?;
    }
    eprintln!("mpo first {:?}\nmpo last {:?}", first.metrics, last.metrics);
    ensure!(
        last.metrics["mpo/dpo"] < first.metrics["mpo/dpo"],
        "DPO loss did not fall"
    );
    ensure!(
        last.metrics["mpo/sft"] < first.metrics["mpo/sft"],
        "SFT loss did not fall"
    );
    ensure!(delta.count == 5);
    // A policy loaded with LLM Vars for an adapter-only optimizer is refused.
    let all = Trainable {
        vision: false,
        adapter: true,
        llm: true,
    };
    let err = PolicyTrainer::new(load(all)?, OptimConfig::default())
        .err()
        .expect("mismatch");
    ensure!(err.to_string().contains("optimizer.trainable"), "{err}");
    Ok(())
}

#[test]
fn bad_batches_are_errors_naming_the_item() -> Result<()> {
    let mut trainer = trainer(4)?;
    let bank = bank()?;
    let mut batch = grpo_batch(&[(0, &[1.0, -1.0])], None)?;
    batch.groups[0].samples[1].behaviour_logprobs.pop();
    let err = trainer
        .grpo_update(&batch, &bank, &GrpoConfig::default())
        .expect_err("length mismatch");
    ensure!(err.to_string().contains("prompt 0 sample 1"), "{err}");
    batch.groups.clear();
    let err = trainer
        .grpo_update(&batch, &bank, &GrpoConfig::default())
        .expect_err("empty batch");
    ensure!(err.to_string().contains("no responses"), "{err}");
    let mut pairs = mpo_pairs(2);
    pairs[1].rejected.clear();
    let err = trainer
        .mpo_update(
            &pairs,
            &bank,
            &MpoConfig::default(),
            &mut BcoRewardMean::default(),
        )
        .expect_err("empty rejected");
    ensure!(err.to_string().contains("MPO pair 1"), "{err}");
    // Nothing was applied.
    ensure!(trainer.version() == 0 && trainer.is_consistent());
    Ok(())
}

#[test]
fn a_reset_optimizer_steps_as_a_fresh_adamw_and_the_schedule_goes_on() -> Result<()> {
    let bank = bank()?;
    let batch = grpo_batch(&[(0, &[1.0, -1.0]), (2, &[0.5, -0.5])], None)?;
    let grpo = GrpoConfig::default();
    // A constant rate, so that a fresh trainer at version 0 steps at the same rate as one at version 2.
    let config = OptimConfig {
        lr: 1e-2,
        micro_batch: 4,
        ..Default::default()
    };
    let mut continued = PolicyTrainer::new(load(config.trainable)?, config.clone())?;
    for _ in 0..2 {
        continued.grpo_update(&batch, &bank, &grpo)?;
    }
    let dir = tempfile::tempdir()?;
    continued.save_state(dir.path())?;
    let mut reset = PolicyTrainer::load_checkpoint(
        dir.path(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        config.clone(),
        Some(img_context_id()?),
    )?;
    reset.reset_optimizer()?;
    // The fresh trainer's reference is the weights it loads: make it the same here (GRPO's KL term).
    reset.refresh_reference()?;
    ensure!(reset.version() == 2 && reset.optimizer_steps() == 0);
    ensure!(reset.next_lr() == continued.next_lr());
    let mut fresh = PolicyTrainer::new(
        train_common::load_from(&dir.path().join("model"), config.trainable)?,
        config,
    )?;

    let after_reset = reset.grpo_update(&batch, &bank, &grpo)?;
    let after_fresh = fresh.grpo_update(&batch, &bank, &grpo)?;
    let after_continued = continued.grpo_update(&batch, &bank, &grpo)?;
    let tensors = |w: &r1v2_actors::train::PolicyWeights| -> Vec<Tensor> {
        w.tensors.iter().map(|(_, t)| t.clone()).collect()
    };
    ensure!(
        max_diff(
            &tensors(&after_reset.weights),
            &tensors(&after_fresh.weights)
        )? == 0.0,
        "a reset AdamW steps as a fresh one"
    );
    // The carried moments make a different step.
    ensure!(
        max_diff(
            &tensors(&after_reset.weights),
            &tensors(&after_continued.weights)
        )? > 1e-6
    );
    ensure!(after_reset.weights.version == 3);
    Ok(())
}
