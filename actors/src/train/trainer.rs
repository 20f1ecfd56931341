//! [`PolicyTrainer`]: the policy with its trainable [`Var`]s, a frozen reference that shares every frozen
//! tensor with it, AdamW, the schedule and the policy version. Pure (no actix): the Optimizer actor calls it.
//!
//! One update, top to bottom:
//!
//! ```text
//! grads, metrics = grpo_gradients(batch) | mpo_gradients(pairs)    // micro-batches, accumulated
//! grad_norm      = clip_grad_norm(grads, max_grad_norm)            // torch semantics, pre-clip norm
//! lr             = schedule(optimizer step)                        // warmup + cosine
//! adamw.step(grads, lr); version += 1
//! ```
//!
//! The reference: on a fresh start it is built from the policy's own [`WeightStore`] with nothing trainable,
//! so the frozen modules are the very same tensors (same storage) and only the trainable ones exist twice
//! (the store's loaded value, read by the reference, and the policy's `Var`). After a resume or a refresh it
//! is built from a store of the policy's frozen tensors (shared, not copied) plus saved copies of the
//! trainable ones.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adamw::{AdamW, AdamWParams, AdamWState};
use super::batch::{PolicyWeights, UpdateReport};
use super::config::OptimConfig;
use super::logprobs::ResponseScorer;
use super::schedule::{clip_grad_norm, learning_rate};
use crate::model::policy::{load_policy, LoadedPolicy, PolicyNet};
use crate::model::weights::{WeightStore, DEFAULT_MAX_SHARD_BYTES};
use crate::{Error, Result};

/// Gradients summed over the micro-batches of one update, in the order of the trainable parameters, and the
/// update's metrics (before the optimizer step adds `actor/grad_norm` and `actor/lr`).
#[derive(Debug, Clone)]
pub struct Accumulated {
    /// One gradient per trainable parameter (zeros where no gradient reached it).
    pub grads: Vec<Tensor>,
    /// Metrics by design.md name.
    pub metrics: BTreeMap<String, f64>,
    /// Response tokens trained on.
    pub tokens: usize,
    /// Responses (GRPO) or pairs (MPO) trained on.
    pub rows: usize,
}

/// Sub-directory of a checkpoint holding the model in the HF layout.
pub const MODEL_DIR: &str = "model";
/// Sub-directory of a checkpoint holding the optimizer state.
pub const OPTIMIZER_DIR: &str = "optimizer";
const REFERENCE_FILE: &str = "reference.safetensors";
const TRAINER_FILE: &str = "trainer.json";

/// `optimizer/trainer.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainerFile {
    version: u64,
    trainable: Vec<String>,
}

/// The policy being trained and everything its updates need.
pub struct PolicyTrainer {
    pub(super) policy: LoadedPolicy,
    pub(super) policy_scorer: ResponseScorer,
    pub(super) reference: ResponseScorer,
    /// The reference's values of the trainable tensors (what a checkpoint stores to rebuild it).
    reference_trainable: Vec<(String, Tensor)>,
    optimizer: AdamW,
    config: OptimConfig,
    version: u64,
    /// Set while the optimizer writes the weights: still set afterwards means that step did not finish
    /// (an error or a panic midway) and the weights are partly updated.
    in_step: bool,
    /// Fault drill: the data-parallel gradient of the update at this policy version panics (once).
    panic_at_version: Option<u64>,
    /// Factor on the schedule's rate (the running stage's `lr_scale`).
    lr_scale: f64,
}

fn adamw_params(config: &OptimConfig) -> AdamWParams {
    AdamWParams {
        betas: config.betas,
        eps: config.eps,
        weight_decay: config.weight_decay,
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { path, source }
}

/// Checks that `policy`'s trainable Vars are exactly those `config.trainable` selects.
fn check_trainable(policy: &LoadedPolicy, config: &OptimConfig) -> Result<()> {
    if policy.trainable_vars.is_empty() {
        return Err(Error::msg(
            "the policy has no trainable parameters: load it with the optimizer's `trainable` setting",
        ));
    }
    if let Some((name, _)) = policy
        .trainable_vars
        .iter()
        .find(|(name, _)| !config.trainable.contains(name))
    {
        return Err(Error::msg(format!(
            "parameter `{name}` was loaded as trainable but optimizer.trainable excludes it"
        )));
    }
    let expected = policy
        .store
        .names()
        .into_iter()
        .filter(|n| config.trainable.contains(n))
        .count();
    if expected != policy.trainable_vars.len() {
        return Err(Error::msg(format!(
            "optimizer.trainable selects {expected} checkpoint tensors but the policy was loaded with {} trainable",
            policy.trainable_vars.len()
        )));
    }
    Ok(())
}

impl PolicyTrainer {
    /// A trainer at version 0 over `policy` (an InternVL-chat or Qwen2.5-VL policy loaded with
    /// `config.trainable`); the reference is the policy as loaded.
    pub fn new(policy: impl Into<LoadedPolicy>, config: OptimConfig) -> Result<Self> {
        let policy = policy.into();
        config.validate()?;
        check_trainable(&policy, &config)?;
        // Nothing trainable: every tensor comes back as the store's loaded value, shared with the policy.
        let reference_model = policy.model.rebuild(policy.store.frozen_var_builder())?;
        let frozen_vb = policy.store.frozen_var_builder();
        let reference = ResponseScorer::for_policy(reference_model, &frozen_vb)?;
        let reference_trainable = policy
            .trainable_vars
            .iter()
            .map(|(name, _)| Ok((name.clone(), frozen_vb.get_unchecked(name)?)))
            .collect::<Result<Vec<_>>>()?;
        let optimizer = AdamW::new(policy.trainable_vars.clone(), adamw_params(&config))?;
        let policy_scorer = policy_scorer(&policy, &config)?;
        Ok(Self {
            policy,
            policy_scorer,
            reference,
            reference_trainable,
            optimizer,
            config,
            version: 0,
            in_step: false,
            panic_at_version: None,
            lr_scale: 1.0,
        })
    }

    /// Continues from a checkpoint: `policy` loaded from `dir/model` (with `config.trainable`), the optimizer
    /// state, reference and version from `state_dir` (= `dir/optimizer`, as [`Self::save_state`] wrote it).
    pub fn resume(
        policy: impl Into<LoadedPolicy>,
        state_dir: &Path,
        config: OptimConfig,
    ) -> Result<Self> {
        let policy = policy.into();
        config.validate()?;
        check_trainable(&policy, &config)?;
        let trainer_path = state_dir.join(TRAINER_FILE);
        let text = std::fs::read_to_string(&trainer_path).map_err(io_error(&trainer_path))?;
        let file: TrainerFile = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: trainer_path.clone(),
            source,
        })?;
        let mut names: Vec<&str> = policy
            .trainable_vars
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        names.sort_unstable();
        let mut saved: Vec<&str> = file.trainable.iter().map(String::as_str).collect();
        saved.sort_unstable();
        if names != saved {
            return Err(Error::Checkpoint {
                path: trainer_path,
                msg: format!("trained parameters {saved:?}, the policy now trains {names:?}"),
            });
        }
        let reference_path = state_dir.join(REFERENCE_FILE);
        let mut stored = candle_core::safetensors::load(&reference_path, policy.store.device())
            .map_err(|err| Error::Checkpoint {
                path: reference_path.clone(),
                msg: err.to_string(),
            })?;
        let reference_trainable = file
            .trainable
            .iter()
            .map(|name| {
                let tensor = stored.remove(name).ok_or_else(|| Error::Checkpoint {
                    path: reference_path.clone(),
                    msg: format!("missing tensor `{name}`"),
                })?;
                Ok((name.clone(), tensor.to_dtype(policy.store.dtype())?))
            })
            .collect::<Result<Vec<_>>>()?;
        let reference = build_reference(&policy, &reference_trainable)?;
        let state = AdamWState::load(state_dir)?;
        let optimizer =
            AdamW::from_state(policy.trainable_vars.clone(), adamw_params(&config), state)?;
        let policy_scorer = policy_scorer(&policy, &config)?;
        Ok(Self {
            policy,
            policy_scorer,
            reference,
            reference_trainable,
            optimizer,
            config,
            version: file.version,
            in_step: false,
            panic_at_version: None,
            lr_scale: 1.0,
        })
    }

    /// Loads a checkpoint directory written by [`Self::save_state`]: `dir/model` in `dtype` on `device`, then
    /// [`Self::resume`]; either family (see [`load_policy`]). `img_context_token_id` is needed for an
    /// InternVL-chat checkpoint without tokenizer.json.
    pub fn load_checkpoint(
        dir: &Path,
        dtype: DType,
        device: &Device,
        config: OptimConfig,
        img_context_token_id: Option<u32>,
    ) -> Result<Self> {
        let mut policy = load_policy(&dir.join(MODEL_DIR), dtype, device, config.trainable)?;
        if let (Some(id), PolicyNet::Chat(model)) = (img_context_token_id, &mut policy.model) {
            model.set_img_context_token_id(id);
        }
        Self::resume(policy, &dir.join(OPTIMIZER_DIR), config)
    }

    /// Makes the current policy the new reference (MPO's optional per-round refresh).
    pub fn refresh_reference(&mut self) -> Result<()> {
        self.reference_trainable = self
            .policy
            .trainable_vars
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?.detach())))
            .collect::<Result<Vec<_>>>()?;
        self.reference = build_reference(&self.policy, &self.reference_trainable)?;
        Ok(())
    }

    /// The policy version (0 = as loaded on a fresh start; +1 per update).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// AdamW steps since its moments were last zeroed (its bias correction's count).
    pub fn optimizer_steps(&self) -> u64 {
        self.optimizer.step_count()
    }

    /// A fresh AdamW over the same parameters (zero moments, bias correction from the first step), as a
    /// separate job for the next stage would start with; the schedule, which counts updates, goes on.
    pub fn reset_optimizer(&mut self) -> Result<()> {
        self.check_consistent()?;
        // Moments and step zeroed; a bf16 parameter keeps its f32 master (a new AdamW would restart it
        // from the bf16 value and lose what lies below bf16's resolution).
        self.optimizer.reset()
    }

    /// The configuration.
    pub fn config(&self) -> &OptimConfig {
        &self.config
    }

    /// The policy (model, trainable Vars, store).
    pub fn policy(&self) -> &LoadedPolicy {
        &self.policy
    }

    /// The frozen reference model.
    pub fn reference(&self) -> &PolicyNet {
        self.reference.model()
    }

    /// The learning rate the next update will use: the schedule's at the updates done (the policy version)
    /// times the stage's factor.
    pub fn next_lr(&self) -> f64 {
        learning_rate(&self.config, self.version) * self.lr_scale
    }

    /// Sets the factor on the schedule's rate for the next updates (a stage's `lr_scale`).
    pub fn set_lr_scale(&mut self, scale: f64) -> Result<()> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::msg(format!(
                "lr_scale must be finite and > 0, got {scale}"
            )));
        }
        self.lr_scale = scale;
        Ok(())
    }

    /// A snapshot of the trainable tensors at the current version (copies: later updates do not change it).
    pub fn weights(&self) -> Result<PolicyWeights> {
        let tensors = self
            .policy
            .trainable_vars
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?.detach())))
            .collect::<Result<Vec<_>>>()?;
        Ok(PolicyWeights {
            version: self.version,
            tensors: Arc::new(tensors),
        })
    }

    /// Clips `grads`, takes one AdamW step at the scheduled rate and bumps the version; returns
    /// `(pre-clip global norm, learning rate used)`. A non-finite norm is refused before anything changes.
    pub fn apply_gradients(&mut self, mut grads: Vec<Tensor>) -> Result<(f64, f64)> {
        self.check_consistent()?;
        let norm = clip_grad_norm(&mut grads, self.config.max_grad_norm)?;
        if !norm.is_finite() {
            return Err(Error::msg(format!(
                "gradient norm is {norm} at policy version {}: update skipped",
                self.version
            )));
        }
        let lr = self.next_lr();
        self.in_step = true;
        self.optimizer.step(&grads, lr)?;
        self.in_step = false;
        self.version += 1;
        Ok((norm, lr))
    }

    /// Fault drill: the data-parallel (`*_update_shard`) gradient of the update at policy `version` panics
    /// once, inside the rank's computation, so that the collective's failure path runs for real.
    pub fn inject_shard_panic_at(&mut self, version: Option<u64>) {
        self.panic_at_version = version;
    }

    /// Panics when the fault drill is armed for the current version (and disarms it).
    pub(super) fn fault_drill(&mut self) {
        if self.panic_at_version == Some(self.version) {
            self.panic_at_version = None;
            panic!(
                "injected fault in a shard's gradient at policy version {}",
                self.version
            );
        }
    }

    /// Whether the weights are those of a whole number of updates (false after an optimizer step that failed
    /// or panicked midway: resume from the last checkpoint).
    pub fn is_consistent(&self) -> bool {
        !self.in_step
    }

    /// Test-only: marks the trainer as if an optimizer step had stopped midway.
    #[cfg(test)]
    pub(crate) fn mark_step_unfinished(&mut self) {
        self.in_step = true;
    }

    /// An error when [`Self::is_consistent`] is false.
    pub(super) fn check_consistent(&self) -> Result<()> {
        if self.in_step {
            return Err(Error::msg(format!(
                "the optimizer step after policy version {} did not finish: the weights are partly updated; resume from the last checkpoint",
                self.version
            )));
        }
        Ok(())
    }

    /// Applies accumulated gradients and builds the report.
    pub(super) fn finish_update(&mut self, accumulated: Accumulated) -> Result<UpdateReport> {
        let Accumulated {
            grads,
            mut metrics,
            tokens,
            ..
        } = accumulated;
        let (norm, lr) = self.apply_gradients(grads)?;
        metrics.insert("actor/grad_norm".into(), norm);
        metrics.insert("actor/lr".into(), lr);
        Ok(UpdateReport {
            weights: self.weights()?,
            metrics,
            tokens,
        })
    }

    /// Writes the model in the HF layout to `dir/model` and the optimizer state, reference and version to
    /// `dir/optimizer`; returns the version written.
    pub fn save_state(&self, dir: &Path) -> Result<u64> {
        self.check_consistent()?;
        self.policy
            .save(&dir.join(MODEL_DIR), DEFAULT_MAX_SHARD_BYTES)?;
        let state_dir = dir.join(OPTIMIZER_DIR);
        self.optimizer.state().save(&state_dir)?;
        let reference: std::collections::HashMap<String, Tensor> =
            self.reference_trainable.iter().cloned().collect();
        candle_core::safetensors::save(&reference, state_dir.join(REFERENCE_FILE))?;
        let file = TrainerFile {
            version: self.version,
            trainable: self
                .policy
                .trainable_vars
                .iter()
                .map(|(n, _)| n.clone())
                .collect(),
        };
        let path = state_dir.join(TRAINER_FILE);
        let text = serde_json::to_string_pretty(&file).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, text).map_err(io_error(&path))?;
        Ok(self.version)
    }

    /// The f32 master weight of trainable parameter `name` when the policy is held in bf16 / f16 (mixed
    /// precision; see adamw.rs), else `None`.
    pub fn master_weight(&self, name: &str) -> Option<Tensor> {
        self.optimizer.master(name).cloned()
    }

    /// The trainable Vars in gradient order.
    pub(super) fn trainable_vars(&self) -> &[(String, Var)] {
        &self.policy.trainable_vars
    }
}

/// The policy's scorer: its LM head read back through a builder that hands out the policy's own tensors
/// (the existing Var when the LLM trains).
fn policy_scorer(policy: &LoadedPolicy, config: &OptimConfig) -> Result<ResponseScorer> {
    let trainable = config.trainable;
    let vb = policy
        .store
        .var_builder(move |name| trainable.contains(name));
    ResponseScorer::for_policy(policy.model.clone(), &vb)
}

/// A frozen reference: the policy's frozen tensors (shared) with `trainable` in place of its Vars.
fn build_reference(
    policy: &LoadedPolicy,
    trainable: &[(String, Tensor)],
) -> Result<ResponseScorer> {
    let replaced: BTreeMap<&str, &Tensor> =
        trainable.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let tensors = policy.store.tensors()?.into_iter().map(|(name, tensor)| {
        match replaced.get(name.as_str()) {
            Some(t) => (name, (*t).clone()),
            None => (name, tensor),
        }
    });
    // Same dtype and device: `from_tensors` keeps each tensor's storage (no copy).
    let store = WeightStore::from_tensors(
        tensors,
        policy.store.dir(),
        policy.store.dtype(),
        policy.store.device(),
    )?;
    let model = policy.model.rebuild(store.frozen_var_builder())?;
    ResponseScorer::for_policy(model, &store.frozen_var_builder())
}

/// The dtype gradients of a `dtype` parameter are summed and applied in: f32 for bf16 / f16 (mixed
/// precision), else the parameter's own.
pub(super) fn grad_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// Zero gradients of every trainable Var, in [`grad_dtype`] (what a shard with nothing to add contributes).
pub(super) fn zero_grads(vars: &[(String, Var)]) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|(_, var)| {
            Ok(var
                .as_tensor()
                .zeros_like()?
                .to_dtype(grad_dtype(var.dtype()))?)
        })
        .collect()
}

/// Adds `grads` (from one micro-batch's backward) into `sums`, per trainable Var; a Var no gradient reached
/// gets zeros. The gradient of a bf16 / f16 Var is widened to f32 first, so the sum over micro-batches (and
/// over data-parallel shards), the clipping norm and AdamW run in f32 (mixed precision, see adamw.rs).
pub(super) fn accumulate(
    sums: &mut Option<Vec<Tensor>>,
    vars: &[(String, Var)],
    grads: &candle_core::backprop::GradStore,
) -> Result<()> {
    let current = vars
        .iter()
        .map(|(_, var)| {
            let dtype = grad_dtype(var.dtype());
            match grads.get(var.as_tensor()) {
                Some(g) => Ok(g.to_dtype(dtype)?),
                None => Ok(var.as_tensor().zeros_like()?.to_dtype(dtype)?),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    *sums = Some(match sums.take() {
        None => current,
        Some(previous) => previous
            .iter()
            .zip(&current)
            .map(|(a, b)| Ok((a + b)?))
            .collect::<Result<Vec<_>>>()?,
    });
    Ok(())
}
