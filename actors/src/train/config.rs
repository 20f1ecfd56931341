//! The optimizer's section of the run config (`[optimizer]`): AdamW, the warmup + cosine schedule, gradient
//! clipping, gradient accumulation and which modules train.

use serde::{Deserialize, Serialize};

use crate::error::check;
use crate::model::chat::Trainable;
use crate::Result;

/// AdamW, schedule, clipping and accumulation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate (R1V's GRPO: 1e-6; this default suits adapter-only training of small models).
    pub lr: f64,
    /// AdamW (beta1, beta2) (PyTorch's defaults).
    pub betas: (f64, f64),
    /// AdamW epsilon added to the denominator (PyTorch's default).
    pub eps: f64,
    /// Decoupled weight decay (PyTorch AdamW's default 0.01).
    pub weight_decay: f64,
    /// Linear warmup from 0 over this many updates (transformers `num_warmup_steps`).
    pub warmup_steps: u64,
    /// Horizon of the cosine decay in updates (transformers `num_training_steps`); 0 = no decay (constant
    /// after warmup). Past the horizon the rate stays at `min_lr_ratio * lr`.
    pub total_steps: u64,
    /// The cosine decays to this fraction of `lr` (transformers `min_lr_rate`; 0 = to zero).
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this (torch `clip_grad_norm_`); 0 = no clipping.
    pub max_grad_norm: f64,
    /// Sequences per forward pass; a batch is split into micro-batches whose gradients are accumulated.
    /// The responses of one prompt (a GRPO group, an MPO pair) that land in one micro-batch share the prompt's
    /// forward, so a multiple of the group size wastes least.
    pub micro_batch: usize,
    /// Which modules receive gradients (adapter only by default: the paper's Table 4; for Qwen2.5-VL the
    /// adapter is the patch merger).
    pub trainable: Trainable,
    /// Start every stage after the first with a fresh AdamW (zero moments), as separate SFT / MPO / GRPO jobs
    /// would; the learning-rate schedule goes on. Otherwise the moments of the supervised steps carry into RL,
    /// whose gradients are of another size and direction.
    pub reset_each_stage: bool,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: 0.0,
            max_grad_norm: 1.0,
            micro_batch: 8,
            trainable: Trainable::default(),
            reset_each_stage: false,
        }
    }
}

impl OptimConfig {
    /// Checks every field; the error names the key as `optimizer.<key>`.
    pub fn validate(&self) -> Result<()> {
        check(
            self.lr.is_finite() && self.lr >= 0.0,
            "optimizer.lr",
            "must be finite and >= 0",
        )?;
        check(
            (0.0..1.0).contains(&self.betas.0),
            "optimizer.betas",
            "beta1 must be in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&self.betas.1),
            "optimizer.betas",
            "beta2 must be in [0, 1)",
        )?;
        check(self.eps > 0.0, "optimizer.eps", "must be > 0")?;
        check(
            self.weight_decay >= 0.0,
            "optimizer.weight_decay",
            "must be >= 0",
        )?;
        check(
            self.total_steps == 0 || self.total_steps > self.warmup_steps,
            "optimizer.total_steps",
            "must be 0 (no decay) or greater than warmup_steps",
        )?;
        check(
            (0.0..=1.0).contains(&self.min_lr_ratio),
            "optimizer.min_lr_ratio",
            "must be in [0, 1]",
        )?;
        check(
            self.max_grad_norm >= 0.0,
            "optimizer.max_grad_norm",
            "must be >= 0 (0 = no clipping)",
        )?;
        check(self.micro_batch > 0, "optimizer.micro_batch", "must be > 0")?;
        check(
            self.trainable.vision || self.trainable.adapter || self.trainable.llm,
            "optimizer.trainable",
            "at least one of vision, adapter, llm must train",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_errors_name_the_key() {
        OptimConfig::default().validate().unwrap();
        let cfg: OptimConfig =
            toml::from_str("lr = 2e-6\nbetas = [0.9, 0.95]\n[trainable]\nvision = false\nadapter = true\nllm = true\n")
                .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.betas, (0.9, 0.95));
        assert!(cfg.trainable.llm);
        let err = toml::from_str::<OptimConfig>("learning_rate = 1.0").unwrap_err();
        assert!(err.to_string().contains("learning_rate"), "{err}");
        for (bad, key) in [
            (
                OptimConfig {
                    micro_batch: 0,
                    ..Default::default()
                },
                "optimizer.micro_batch",
            ),
            (
                OptimConfig {
                    warmup_steps: 5,
                    total_steps: 5,
                    ..Default::default()
                },
                "optimizer.total_steps",
            ),
            (
                OptimConfig {
                    betas: (0.9, 1.0),
                    ..Default::default()
                },
                "optimizer.betas",
            ),
            (
                OptimConfig {
                    trainable: Trainable::frozen(),
                    ..Default::default()
                },
                "optimizer.trainable",
            ),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }
}
