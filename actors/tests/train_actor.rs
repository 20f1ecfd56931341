//! The Optimizer actor driven through actix messages: GRPO and MPO updates bump the version and return
//! weights and metrics, a bad request is an error and the actor carries on, SaveState writes a checkpoint
//! that resumes (BCO running mean included).

mod train_common;

use anyhow::{ensure, Result};
use r1v2_actors::actor::optimizer::Optimizer;
use r1v2_actors::model::chat::ChatModel;
use r1v2_actors::protocol::{
    ActorName, CurrentWeights, Heartbeat, RefreshReference, SaveState, TrainGrpo, TrainMpo,
};
use r1v2_actors::rl::config::{GrpoConfig, MpoConfig};
use r1v2_actors::rl::PromptId;
use r1v2_actors::train::{OptimConfig, PolicyTrainer};
use train_common::{bank, grpo_batch, img_context_id, load, mpo_pairs};

fn config() -> OptimConfig {
    OptimConfig {
        lr: 1e-2,
        micro_batch: 4,
        ..Default::default()
    }
}

#[actix::test]
async fn optimizer_actor_trains_saves_and_resumes() -> Result<()> {
    let trainer = PolicyTrainer::new(load(config().trainable)?, config())?;
    let optimizer = Optimizer::new(
        trainer,
        bank()?,
        GrpoConfig::default(),
        MpoConfig::default(),
    )?
    .start_dedicated();

    let initial = optimizer.send(CurrentWeights).await??;
    ensure!(initial.version == 0 && !initial.tensors.is_empty());

    let batch = grpo_batch(&[(0, &[1.0, -1.0]), (1, &[0.5, -0.5])], None)?;
    let grpo = optimizer
        .send(TrainGrpo {
            batch: batch.clone(),
            lr_scale: 1.0,
        })
        .await??;
    ensure!(
        grpo.weights.version == 1,
        "version {}",
        grpo.weights.version
    );
    for key in [
        "actor/pg_loss",
        "actor/kl",
        "actor/clipfrac",
        "actor/entropy",
        "actor/grad_norm",
        "actor/lr",
    ] {
        ensure!(grpo.metrics.contains_key(key), "missing {key}");
    }
    ensure!(grpo.tokens > 0);

    let mpo = optimizer
        .send(TrainMpo {
            pairs: mpo_pairs(3),
            lr_scale: 1.0,
        })
        .await??;
    ensure!(mpo.weights.version == 2);
    for key in [
        "mpo/dpo",
        "mpo/bco",
        "mpo/sft",
        "mpo/delta",
        "actor/grad_norm",
        "actor/lr",
    ] {
        ensure!(mpo.metrics.contains_key(key), "missing {key}");
    }
    ensure!(optimizer.send(RefreshReference).await?? == 2);

    // A batch naming a prompt the bank lacks: an error naming it, and the actor carries on.
    let mut bad = batch.clone();
    bad.groups[0].prompt_id = PromptId(42);
    let err = optimizer
        .send(TrainGrpo {
            batch: bad,
            lr_scale: 1.0,
        })
        .await?
        .expect_err("unknown prompt");
    ensure!(err.to_string().contains("42"), "{err}");
    let beat = optimizer.send(Heartbeat).await?;
    ensure!(beat.actor == ActorName::Optimizer && beat.last_message == Some("TrainGrpo"));
    ensure!(beat.handled == 5 && beat.restarts == 0, "{beat:?}");

    let dir = tempfile::tempdir()?;
    let written = optimizer
        .send(SaveState {
            dir: dir.path().to_path_buf(),
        })
        .await??;
    ensure!(written == 2);
    // The model directory is an ordinary HF checkpoint.
    let reloaded = ChatModel::load(
        &dir.path().join("model"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        config().trainable,
    )?;
    for ((name, saved), (_, live)) in reloaded
        .trainable_vars
        .iter()
        .zip(mpo.weights.tensors.iter())
    {
        ensure!(
            saved.as_tensor().flatten_all()?.to_vec1::<f32>()?
                == live.flatten_all()?.to_vec1::<f32>()?,
            "`{name}` saved differs from the published weights"
        );
    }

    // Resume: same version, same BCO running mean; the next update is version 3.
    let resumed = PolicyTrainer::load_checkpoint(
        dir.path(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        config(),
        Some(img_context_id()?),
    )?;
    let resumed = Optimizer::new(
        resumed,
        bank()?,
        GrpoConfig::default(),
        MpoConfig::default(),
    )?
    .resume_bco_reward_mean(dir.path())?;
    ensure!(
        resumed.bco_reward_mean().count == 1,
        "{:?}",
        resumed.bco_reward_mean()
    );
    let resumed = resumed.start_dedicated();
    let next = resumed
        .send(TrainGrpo {
            batch,
            lr_scale: 1.0,
        })
        .await??;
    ensure!(next.weights.version == 3);
    Ok(())
}
