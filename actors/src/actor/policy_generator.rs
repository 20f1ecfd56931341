//! PolicyGenerator: owns a snapshot of the policy (InternVL-chat or Qwen2.5-VL, its trainable tensors as
//! `Var`s) and its version.
//!
//! - [`GenerateGroups`]: samples G responses per prompt with the generation engine (prompt and image encoded
//!   once per group, finished rows leave the batch); prompts come from the shared [`PromptBank`]. Every
//!   rollout carries the policy version that sampled it.
//! - [`SyncWeights`]: loads a published [`crate::protocol::PolicyWeights`] into the snapshot; the reply is the
//!   version now held, which the controller checks.
//!
//! The forward passes run on the actor's own thread (`SyncArbiter` of one). The snapshot lives in an `Arc`
//! shared with the arbiter's factory, so a worker restarted after a panic keeps the synced weights.
//! On the CPU the LLM's weights are packed for the decode loop (`PolicyNet::pack_weights`) before the first
//! generation after each sync; the snapshot is never trained, so the packed path (no backward) is safe here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::{Actor, Addr, Handler, SyncArbiter, SyncContext};
use candle_core::{Device, Var};
use parking_lot::RwLock;

use super::{handle_guarded, Closed, Liveness};
use crate::generate::PromptInput;
use crate::model::policy::PolicyNet;
use crate::prompt::PromptBank;
use crate::protocol::{
    ActorName, GenerateGroups, Group, Heartbeat, HeartbeatReply, Rollouts, Sample, Shutdown,
    SyncWeights,
};
use crate::{Error, Result};

const NAME: ActorName = ActorName::PolicyGenerator;

/// Turns response token ids into text (the tokenizer's decode, special tokens skipped).
pub type Decoder = Arc<dyn Fn(&[u32]) -> Result<String> + Send + Sync>;

/// What the generator's workers share.
struct Snapshot {
    /// Written only to (re)pack the LLM's weights.
    model: RwLock<PolicyNet>,
    /// The trainable tensors, by checkpoint name: what [`SyncWeights`] overwrites.
    vars: HashMap<String, Var>,
    device: Device,
    prompts: PromptBank,
    decode: Decoder,
    version: AtomicU64,
}

/// The policy generator actor.
pub struct PolicyGenerator {
    snapshot: Arc<Snapshot>,
    liveness: Liveness,
    closed: Closed,
}

impl PolicyGenerator {
    /// Starts the generator on its own thread with `model` (its trainable tensors as `vars`) at policy
    /// `version`. Needs a running actix `System`.
    pub fn start(
        model: impl Into<PolicyNet>,
        vars: Vec<(String, Var)>,
        device: Device,
        prompts: PromptBank,
        decode: Decoder,
        version: u64,
    ) -> Addr<Self> {
        let snapshot = Arc::new(Snapshot {
            model: RwLock::new(model.into()),
            vars: vars.into_iter().collect(),
            device,
            prompts,
            decode,
            version: AtomicU64::new(version),
        });
        let closed = Closed::default();
        SyncArbiter::start(1, move || PolicyGenerator {
            snapshot: Arc::clone(&snapshot),
            liveness: Liveness::new(NAME),
            closed: closed.clone(),
        })
    }
}

impl Snapshot {
    fn generate(&self, msg: &GenerateGroups) -> Result<Rollouts> {
        let version = self.version.load(Ordering::SeqCst);
        let inputs = msg
            .prompts
            .iter()
            .map(|request| {
                let prompt = self.prompts.get(request.prompt_id)?;
                Ok(PromptInput {
                    token_ids: prompt.token_ids.clone(),
                    prompt_index: request.prompt_index,
                    pixel_values: prompt.pixel_values.clone(),
                    image_grids: prompt.image_grids.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if !self.model.read().is_packed() {
            self.model.write().pack_weights()?;
        }
        let model = self.model.read();
        let decode = |ids: &[u32]| (self.decode)(ids);
        let groups =
            model.generate_groups(&inputs, msg.n, &msg.params, Some(&decode), &self.device)?;
        let mut tokens = 0;
        let groups = groups
            .into_iter()
            .zip(&msg.prompts)
            .map(|(group, request)| Group {
                prompt_id: request.prompt_id,
                policy_version: version,
                samples: group
                    .into_iter()
                    .map(|rollout| {
                        tokens += rollout.token_ids.len();
                        Sample::generated(rollout)
                    })
                    .collect(),
            })
            .collect();
        Ok(Rollouts {
            groups,
            policy_version: version,
            tokens,
        })
    }

    fn sync(&self, msg: &SyncWeights) -> Result<u64> {
        let weights = &msg.weights;
        if weights.tensors.len() != self.vars.len() {
            return Err(Error::msg(format!(
                "SyncWeights: {} tensors for {} trainable parameters",
                weights.tensors.len(),
                self.vars.len()
            )));
        }
        // The packed copies would keep the old weights: the next generation packs again.
        self.model.write().unpack_weights();
        for (name, tensor) in weights.tensors.iter() {
            let var = self.vars.get(name).ok_or_else(|| {
                Error::msg(format!(
                    "SyncWeights: `{name}` is not a trainable parameter here"
                ))
            })?;
            let tensor = tensor.to_device(&self.device)?.to_dtype(var.dtype())?;
            var.set(&tensor)?;
        }
        self.version.store(weights.version, Ordering::SeqCst);
        Ok(weights.version)
    }
}

impl Actor for PolicyGenerator {
    type Context = SyncContext<Self>;
}

impl Handler<GenerateGroups> for PolicyGenerator {
    type Result = Result<Rollouts>;

    fn handle(&mut self, msg: GenerateGroups, _: &mut SyncContext<Self>) -> Result<Rollouts> {
        let snapshot = &self.snapshot;
        handle_guarded(&mut self.liveness, &self.closed, "GenerateGroups", || {
            snapshot.generate(&msg)
        })
    }
}

impl Handler<SyncWeights> for PolicyGenerator {
    type Result = Result<u64>;

    fn handle(&mut self, msg: SyncWeights, _: &mut SyncContext<Self>) -> Result<u64> {
        let snapshot = &self.snapshot;
        handle_guarded(&mut self.liveness, &self.closed, "SyncWeights", || {
            snapshot.sync(&msg)
        })
    }
}

impl Handler<Shutdown> for PolicyGenerator {
    type Result = ();

    fn handle(&mut self, _msg: Shutdown, _: &mut SyncContext<Self>) {
        self.liveness.handling("Shutdown");
        self.closed.close(NAME);
    }
}

impl Handler<Heartbeat> for PolicyGenerator {
    type Result = HeartbeatReply;

    fn handle(&mut self, _: Heartbeat, _: &mut SyncContext<Self>) -> HeartbeatReply {
        self.liveness.reply()
    }
}

#[cfg(test)]
#[path = "policy_generator_tests.rs"]
mod tests;
