//! Optimizer: owns the [`PolicyTrainer`] (trainable weights, AdamW state, the frozen reference) and runs
//! the policy updates.
//!
//! - [`TrainGrpo`] / [`TrainMpo`]: one update ([`PolicyTrainer::grpo_update`] / `mpo_update`); the reply
//!   carries the new versioned weights for the generators and the update's metrics.
//! - [`SaveState`]: the model in the HF layout under `dir/model`, the optimizer state, reference, version and
//!   the BCO running mean under `dir/optimizer`; replies the version written.
//! - [`RefreshReference`]: the current policy becomes the reference (MPO's optional per-round refresh).
//! - [`ResetOptimizer`]: a fresh AdamW for the next stage (`optimizer.reset_each_stage`).
//! - [`CurrentWeights`]: the weights at the current version (to sync generators at the start of a run).
//! - [`Heartbeat`]: the [`Liveness`] record; [`Shutdown`]: the actor stops, and its thread with it.
//!
//! A backward pass blocks for as long as it takes, so the actor runs on a dedicated [`Arbiter`] (its own
//! thread), never on the arbiter that routes messages; the thread ends when the actor stops (its last
//! address is dropped). It is not a `SyncArbiter` worker: those are rebuilt from a factory, and a trainer
//! (moments, version) cannot be rebuilt from one. A handler that panics replies an error naming the message
//! and the actor carries on (counted as a restart): updates compute gradients before touching any weight,
//! and a panic during the optimizer step itself leaves the trainer marked inconsistent, so later updates
//! and saves are refused with an error asking to resume from the last checkpoint.

use std::path::Path;

use actix::{Actor, ActorContext, Addr, Arbiter, Context, Handler};

use super::{catch_panic, Liveness};
use crate::prompt::PromptBank;
use crate::protocol::{
    ActorName, CurrentWeights, Heartbeat, HeartbeatReply, PolicyWeights, RefreshReference,
    ResetOptimizer, SaveState, Shutdown, TrainGrpo, TrainMpo, TrainSft, UpdateReport,
};
use crate::rl::config::{GrpoConfig, MpoConfig};
use crate::rl::mpo::BcoRewardMean;
use crate::train::{Collective, PolicyTrainer, OPTIMIZER_DIR};
use crate::{Error, Result};

/// File (under `dir/optimizer`) holding the BCO running mean of MPO.
const BCO_FILE: &str = "bco_reward_mean.json";

/// The optimizer actor.
pub struct Optimizer {
    trainer: PolicyTrainer,
    prompts: PromptBank,
    grpo: GrpoConfig,
    mpo: MpoConfig,
    /// MPO's BCO delta: the running mean of past batch-mean rewards (checkpointed with the optimizer).
    bco_reward_mean: BcoRewardMean,
    liveness: Liveness,
    /// Started by [`Optimizer::start_dedicated`]: the arbiter is this actor's own and ends with it.
    owns_arbiter: bool,
    /// Data parallel: this shard's handle of the group's all-reduce (each update message then carries
    /// this shard's part of the batch); `None` for a single optimizer.
    collective: Option<Box<dyn Collective>>,
}

impl Optimizer {
    /// An optimizer over `trainer`, reading prompts from `prompts`, with the loss settings of the run
    /// (both validated here).
    pub fn new(
        trainer: PolicyTrainer,
        prompts: PromptBank,
        grpo: GrpoConfig,
        mpo: MpoConfig,
    ) -> Result<Self> {
        grpo.validate()?;
        mpo.validate()?;
        Ok(Self {
            trainer,
            prompts,
            grpo,
            mpo,
            bco_reward_mean: BcoRewardMean::default(),
            liveness: Liveness::new(ActorName::Optimizer),
            owns_arbiter: false,
            collective: None,
        })
    }

    /// Makes this optimizer one shard of a data-parallel group: updates sum the shards' gradients through
    /// `collective`, so every shard applies the same update (see `PolicyTrainer::grpo_update_shard`).
    pub fn with_collective(mut self, collective: Box<dyn Collective>) -> Self {
        self.collective = Some(collective);
        self
    }

    /// Fault drill: the data-parallel gradient of the update at policy `version` panics once (see
    /// `PolicyTrainer::inject_shard_panic_at`).
    pub fn inject_shard_panic_at(mut self, version: Option<u64>) -> Self {
        self.trainer.inject_shard_panic_at(version);
        self
    }

    /// Takes the BCO running mean saved by [`SaveState`] in the checkpoint `dir` (use with a trainer
    /// resumed from the same checkpoint).
    pub fn resume_bco_reward_mean(mut self, dir: &Path) -> Result<Self> {
        let path = dir.join(OPTIMIZER_DIR).join(BCO_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        self.bco_reward_mean =
            serde_json::from_str(&text).map_err(|source| Error::Json { path, source })?;
        Ok(self)
    }

    /// The BCO running mean.
    pub fn bco_reward_mean(&self) -> BcoRewardMean {
        self.bco_reward_mean
    }

    /// Starts the actor on a new dedicated arbiter thread. Needs a running actix `System`.
    pub fn start_dedicated(mut self) -> Addr<Self> {
        self.owns_arbiter = true;
        let arbiter = Arbiter::new();
        Self::start_in_arbiter(&arbiter.handle(), move |_ctx| self)
    }

    /// Runs `body` on the trainer, turning a panic into an error (counted as a restart).
    fn guarded<T>(
        &mut self,
        message: &'static str,
        body: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        self.liveness.handling(message);
        match catch_panic(ActorName::Optimizer, message, || body(self)) {
            Ok(result) => result,
            Err(error) => {
                tracing::error!(%error, consistent = self.trainer.is_consistent(), "optimizer: handler panicked");
                self.liveness.restarted();
                Err(error)
            }
        }
    }

    fn save(&self, dir: &Path) -> Result<u64> {
        let version = self.trainer.save_state(dir)?;
        let path = dir.join(OPTIMIZER_DIR).join(BCO_FILE);
        let text =
            serde_json::to_string_pretty(&self.bco_reward_mean).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?;
        std::fs::write(&path, text).map_err(|source| Error::Io { path, source })?;
        Ok(version)
    }
}

impl Actor for Optimizer {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // A dedicated arbiter's thread exists for this actor only; any other arbiter is left alone.
        if self.owns_arbiter {
            Arbiter::current().stop();
        }
    }
}

impl Handler<TrainGrpo> for Optimizer {
    type Result = Result<UpdateReport>;

    fn handle(&mut self, msg: TrainGrpo, _ctx: &mut Context<Self>) -> Result<UpdateReport> {
        self.guarded("TrainGrpo", |this| {
            this.trainer.set_lr_scale(msg.lr_scale)?;
            if msg.batch.policy_version != this.trainer.version() {
                tracing::warn!(
                    batch = msg.batch.policy_version,
                    policy = this.trainer.version(),
                    "TrainGrpo: the batch was assembled for another policy version"
                );
            }
            let report = match &this.collective {
                Some(collective) => this.trainer.grpo_update_shard(
                    &msg.batch,
                    &this.prompts,
                    &this.grpo,
                    collective.as_ref(),
                )?,
                None => this
                    .trainer
                    .grpo_update(&msg.batch, &this.prompts, &this.grpo)?,
            };
            tracing::debug!(
                version = report.weights.version,
                tokens = report.tokens,
                "GRPO update"
            );
            Ok(report)
        })
    }
}

impl Handler<TrainMpo> for Optimizer {
    type Result = Result<UpdateReport>;

    fn handle(&mut self, msg: TrainMpo, _ctx: &mut Context<Self>) -> Result<UpdateReport> {
        self.guarded("TrainMpo", |this| {
            this.trainer.set_lr_scale(msg.lr_scale)?;
            let mut delta = this.bco_reward_mean;
            let report = match &this.collective {
                Some(collective) => this.trainer.mpo_update_shard(
                    &msg.pairs,
                    &this.prompts,
                    &this.mpo,
                    &mut delta,
                    collective.as_ref(),
                )?,
                None => {
                    this.trainer
                        .mpo_update(&msg.pairs, &this.prompts, &this.mpo, &mut delta)?
                }
            };
            // Only a completed update moves the running mean.
            this.bco_reward_mean = delta;
            Ok(report)
        })
    }
}

impl Handler<TrainSft> for Optimizer {
    type Result = Result<UpdateReport>;

    fn handle(&mut self, msg: TrainSft, _ctx: &mut Context<Self>) -> Result<UpdateReport> {
        self.guarded("TrainSft", |this| {
            this.trainer.set_lr_scale(msg.lr_scale)?;
            match &this.collective {
                Some(collective) => {
                    this.trainer
                        .sft_update_shard(&msg.examples, &this.prompts, collective.as_ref())
                }
                None => this.trainer.sft_update(&msg.examples, &this.prompts),
            }
        })
    }
}

impl Handler<SaveState> for Optimizer {
    type Result = Result<u64>;

    fn handle(&mut self, msg: SaveState, _ctx: &mut Context<Self>) -> Result<u64> {
        self.guarded("SaveState", |this| this.save(&msg.dir))
    }
}

impl Handler<ResetOptimizer> for Optimizer {
    type Result = Result<u64>;

    fn handle(&mut self, _msg: ResetOptimizer, _ctx: &mut Context<Self>) -> Result<u64> {
        self.guarded("ResetOptimizer", |this| {
            this.trainer.reset_optimizer()?;
            Ok(this.trainer.version())
        })
    }
}

impl Handler<RefreshReference> for Optimizer {
    type Result = Result<u64>;

    fn handle(&mut self, _msg: RefreshReference, _ctx: &mut Context<Self>) -> Result<u64> {
        self.guarded("RefreshReference", |this| {
            this.trainer.refresh_reference()?;
            Ok(this.trainer.version())
        })
    }
}

impl Handler<CurrentWeights> for Optimizer {
    type Result = Result<PolicyWeights>;

    fn handle(&mut self, _msg: CurrentWeights, _ctx: &mut Context<Self>) -> Result<PolicyWeights> {
        self.guarded("CurrentWeights", |this| this.trainer.weights())
    }
}

impl Handler<Shutdown> for Optimizer {
    type Result = ();

    /// Stops the actor: its mailbox closes (later sends fail) and its dedicated thread ends.
    fn handle(&mut self, _msg: Shutdown, ctx: &mut Context<Self>) {
        self.liveness.handling("Shutdown");
        tracing::info!(actor = %ActorName::Optimizer, "shut down");
        ctx.stop();
    }
}

impl Handler<Heartbeat> for Optimizer {
    type Result = HeartbeatReply;

    fn handle(&mut self, _msg: Heartbeat, _ctx: &mut Context<Self>) -> HeartbeatReply {
        self.liveness.reply()
    }
}

#[cfg(test)]
#[path = "optimizer_tests.rs"]
mod tests;
