//! Data-parallel GRPO: two replicas on two threads, each with half the batch, joined by the in-process
//! `LocalCollective`, end identical to each other and equal to one trainer on the whole batch; a rank that
//! fails makes every rank fail instead of hanging.

mod train_common;

use anyhow::{ensure, Result};
use r1v2_actors::protocol::{TrainBatch, UpdateReport};
use r1v2_actors::rl::config::{GrpoConfig, LossAggregation, MpoConfig, SftNormalisation};
use r1v2_actors::rl::mpo::BcoRewardMean;
use r1v2_actors::rl::PromptId;
use r1v2_actors::train::{LocalCollective, OptimConfig, PolicyTrainer};
use train_common::{bank, grpo_batch, load, mpo_pairs};

/// A first Adam step moves each weight by about lr * g / (|g| + eps): with torch's eps = 1e-8, a weight
/// whose gradient is ~1e-8 turns summation-order noise into an O(lr) difference. eps = 1e-3 bounds the
/// sensitivity to lr / eps = 10, so the weights compare at 1e-6.
fn config() -> OptimConfig {
    OptimConfig {
        lr: 1e-2,
        eps: 1e-3,
        micro_batch: 2,
        ..Default::default()
    }
}

fn shards(batch: &TrainBatch) -> [TrainBatch; 2] {
    let half = batch.groups.len() / 2;
    let mut first = batch.clone();
    first.groups.truncate(half);
    let mut second = batch.clone();
    second.groups.drain(..half);
    [first, second]
}

/// Runs one update per rank on its shard; returns each rank's result.
fn data_parallel(shards: &[TrainBatch; 2], grpo: &GrpoConfig) -> Result<Vec<Result<UpdateReport>>> {
    let group = LocalCollective::group(2)?;
    let bank = bank()?;
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .zip(shards)
            .map(|(collective, shard)| {
                let bank = bank.clone();
                scope.spawn(move || -> Result<UpdateReport> {
                    let mut trainer = PolicyTrainer::new(load(config().trainable)?, config())?;
                    Ok(trainer.grpo_update_shard(shard, &bank, grpo, &collective)?)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("rank panicked")))
            })
            .collect::<Vec<_>>()
    });
    Ok(results)
}

#[test]
fn two_replicas_equal_one_trainer_on_the_whole_batch() -> Result<()> {
    let batch = grpo_batch(
        &[
            (0, &[1.0, -1.0, 0.5]),
            (2, &[-0.3, 0.3]),
            (1, &[0.8, -0.8]),
            (3, &[1.0, -1.0]),
        ],
        None,
    )?;
    for aggregation in [
        LossAggregation::SequenceMeanTokenMean,
        LossAggregation::TokenMean,
    ] {
        let grpo = GrpoConfig {
            aggregation,
            kl_coef: 0.05,
            ..Default::default()
        };
        let mut single = PolicyTrainer::new(load(config().trainable)?, config())?;
        let expected = single.grpo_update(&batch, &bank()?, &grpo)?;
        let results = data_parallel(&shards(&batch), &grpo)?;
        let reports = results.into_iter().collect::<Result<Vec<_>>>()?;
        let mut worst = 0f32;
        for ((name, a), ((_, b), (_, c))) in expected.weights.tensors.iter().zip(
            reports[0]
                .weights
                .tensors
                .iter()
                .zip(reports[1].weights.tensors.iter()),
        ) {
            ensure!(
                b.flatten_all()?.to_vec1::<f32>()? == c.flatten_all()?.to_vec1::<f32>()?,
                "replicas differ on `{name}`"
            );
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            worst = worst.max(diff);
            ensure!(
                diff < 1e-6,
                "{aggregation:?}: `{name}` differs from the single trainer by {diff}"
            );
        }
        for key in [
            "actor/pg_loss",
            "actor/kl",
            "actor/clipfrac",
            "actor/entropy",
            "actor/grad_norm",
        ] {
            let (x, y) = (expected.metrics[key], reports[0].metrics[key]);
            ensure!((x - y).abs() < 1e-5 * (1.0 + x.abs()), "{key}: {x} vs {y}");
        }
        ensure!(expected.tokens == reports[0].tokens);
        eprintln!("{aggregation:?}: max |data-parallel - single| = {worst:e}");
    }
    Ok(())
}

#[test]
fn a_failing_rank_fails_every_rank() -> Result<()> {
    let batch = grpo_batch(&[(0, &[1.0, -1.0]), (1, &[0.5, -0.5])], None)?;
    let mut parts = shards(&batch);
    parts[1].groups[0].prompt_id = PromptId(99);
    let results = data_parallel(&parts, &GrpoConfig::default())?;
    ensure!(results.len() == 2);
    let errors: Vec<String> = results
        .into_iter()
        .map(|r| r.err().map(|e| e.to_string()).unwrap_or_default())
        .collect();
    ensure!(errors[1].contains("99"), "{errors:?}");
    ensure!(errors[0].contains("failed"), "{errors:?}");
    Ok(())
}

#[test]
fn two_replicas_equal_one_trainer_on_mpo_pairs() -> Result<()> {
    let pairs = mpo_pairs(5);
    let shards = [pairs[..2].to_vec(), pairs[2..].to_vec()];
    let start = BcoRewardMean {
        mean: 0.2,
        count: 3,
    };
    for sft_normalisation in [
        SftNormalisation::PerSequence,
        SftNormalisation::BatchTokenMean,
    ] {
        let mpo = MpoConfig {
            sft_normalisation,
            ..Default::default()
        };
        let mut single = PolicyTrainer::new(load(config().trainable)?, config())?;
        let mut single_delta = start;
        let expected = single.mpo_update(&pairs, &bank()?, &mpo, &mut single_delta)?;
        let group = LocalCollective::group(2)?;
        let bank = bank()?;
        let results: Vec<Result<(UpdateReport, BcoRewardMean)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = group
                .into_iter()
                .zip(&shards)
                .map(|(collective, shard)| {
                    let (bank, mpo) = (bank.clone(), mpo.clone());
                    scope.spawn(move || -> Result<(UpdateReport, BcoRewardMean)> {
                        let mut trainer = PolicyTrainer::new(load(config().trainable)?, config())?;
                        let mut delta = start;
                        let report = trainer.mpo_update_shard(
                            shard,
                            &bank,
                            &mpo,
                            &mut delta,
                            &collective,
                        )?;
                        Ok((report, delta))
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
        });
        let results = results.into_iter().collect::<Result<Vec<_>>>()?;
        for (_, delta) in &results {
            ensure!(
                delta.count == single_delta.count && (delta.mean - single_delta.mean).abs() < 1e-6,
                "{delta:?} vs {single_delta:?}"
            );
        }
        let mut worst = 0f32;
        for ((name, a), ((_, b), (_, c))) in expected.weights.tensors.iter().zip(
            results[0]
                .0
                .weights
                .tensors
                .iter()
                .zip(results[1].0.weights.tensors.iter()),
        ) {
            ensure!(
                b.flatten_all()?.to_vec1::<f32>()? == c.flatten_all()?.to_vec1::<f32>()?,
                "replicas differ on `{name}`"
            );
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            worst = worst.max(diff);
            ensure!(
                diff < 1e-6,
                "{sft_normalisation:?}: `{name}` differs by {diff}"
            );
        }
        for key in [
            "mpo/dpo",
            "mpo/bco",
            "mpo/sft",
            "mpo/delta",
            "actor/grad_norm",
        ] {
            let (x, y) = (expected.metrics[key], results[0].0.metrics[key]);
            ensure!((x - y).abs() < 1e-5 * (1.0 + x.abs()), "{key}: {x} vs {y}");
        }
        ensure!(expected.tokens == results[0].0.tokens);
        eprintln!("MPO {sft_normalisation:?}: max |data-parallel - single| = {worst:e}");
    }
    Ok(())
}
