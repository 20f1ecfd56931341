//! The config of `r1v2 train-rm CONFIG.toml`: Bradley-Terry training of a reward model on preference pairs.
//!
//! ```toml
//! [model]
//! dir = "models/skywork-vl-reward"   # qwen2 value head, or qwen2_5_vl with value_head.safetensors
//! # tiny = { seed = 1 }              # or a random tiny Qwen2 value head (the demo's reward model)
//! device = "cpu"
//!
//! [data]
//! train = "pairs.jsonl"   # {"question", "images", "chosen", "rejected"} (+ optional "margin") per line
//! eval = "held_out.jsonl" # optional; without it the last `eval_fraction` of train is held out
//! eval_fraction = 0.1
//!
//! [train]
//! steps = 200             # AdamW updates
//! batch_pairs = 8         # pairs per update (chosen and rejected rows of one forward)
//! lr = 1e-5               # peak learning rate (linear warmup, then cosine to min_lr_ratio * lr)
//! margin = 0.0            # added to every pair's own margin: loss = -logsigmoid(r_c - r_r - margin)
//! freeze_vision = true    # Skywork-VL Reward trains the LLM and the head, not the vision tower
//! ```
//!
//! Unknown keys are errors naming the file and the key; relative paths are relative to the config file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::TinySpec;
use crate::{Error, Result};

/// `[model]`: the reward model to start from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmModelSection {
    /// A model directory (`qwen2` value head or `qwen2_5_vl` + `value_head.safetensors`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Or a random tiny Qwen2 value head, written into the run directory.
    #[serde(default)]
    pub tiny: Option<TinySpec>,
    /// `cpu` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_device() -> String {
    "cpu".into()
}

/// `[data]`: preference pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmDataSection {
    /// Training pairs (JSONL).
    pub train: PathBuf,
    /// Held-out pairs (JSONL); without it the last `eval_fraction` of `train` is held out.
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// Share of `train` held out when `eval` is not given, in [0, 1).
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
}

fn default_eval_fraction() -> f64 {
    0.1
}

/// `[train]`: the optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RmTrainSection {
    /// Number of AdamW updates.
    pub steps: u64,
    /// Pairs per update.
    pub batch_pairs: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// The cosine decay ends at `min_lr_ratio * lr`.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW (beta1, beta2).
    pub betas: (f64, f64),
    /// AdamW epsilon.
    pub eps: f64,
    /// Clip the global gradient norm to this (none: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Added to each pair's margin (TRL's `margin` column); 0 is plain Bradley-Terry.
    pub margin: f32,
    /// Keep the vision tower frozen (Qwen2.5-VL; the Qwen2 family has none).
    pub freeze_vision: bool,
    /// Seed of the pair order.
    pub seed: u64,
    /// Measure held-out accuracy every this many steps (and at the end).
    pub eval_every: u64,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Keep this many most recent checkpoints.
    pub keep_checkpoints: usize,
}

impl Default for RmTrainSection {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_pairs: 8,
            lr: 1e-5,
            warmup_steps: 0,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            max_grad_norm: Some(1.0),
            margin: 0.0,
            freeze_vision: true,
            seed: 0,
            eval_every: 20,
            checkpoint_every: 0,
            keep_checkpoints: 2,
        }
    }
}

/// The whole `train-rm` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmConfig {
    /// `[model]`.
    pub model: RmModelSection,
    /// `[data]`.
    pub data: RmDataSection,
    /// `[train]`.
    #[serde(default)]
    pub train: RmTrainSection,
}

impl RmConfig {
    /// Reads, resolves (paths relative to the file) and validates a config file; errors name the file and key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, base).map_err(|err| match err {
            Error::Msg(msg) => Error::File {
                path: path.to_path_buf(),
                msg,
            },
            other => other,
        })
    }

    /// Parses a config; relative paths are joined to `base_dir`.
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<Self> {
        let mut cfg: RmConfig =
            toml::from_str(text).map_err(|error| Error::Msg(error.to_string().trim().into()))?;
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base_dir.join(&*p);
            }
        };
        if let Some(dir) = cfg.model.dir.as_mut() {
            resolve(dir);
        }
        resolve(&mut cfg.data.train);
        if let Some(eval) = cfg.data.eval.as_mut() {
            resolve(eval);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: &str| Err(Error::Msg(format!("`{key}`: {msg}")));
        match (&self.model.dir, &self.model.tiny) {
            (Some(_), Some(_)) => return bad("model", "give `dir` or `tiny`, not both"),
            (None, None) => return bad("model", "give `dir` or `tiny`"),
            _ => {}
        }
        if !(0.0..1.0).contains(&self.data.eval_fraction) {
            return bad("data.eval_fraction", "must be in [0, 1)");
        }
        let t = &self.train;
        if t.steps == 0 {
            return bad("train.steps", "must be at least 1");
        }
        if t.batch_pairs == 0 {
            return bad("train.batch_pairs", "must be at least 1");
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return bad("train.lr", "must be a positive number");
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return bad("train.min_lr_ratio", "must be in [0, 1]");
        }
        if t.max_grad_norm.is_some_and(|n| n.is_nan() || n <= 0.0) {
            return bad("train.max_grad_norm", "must be positive");
        }
        if t.eval_every == 0 {
            return bad("train.eval_every", "must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_parses_and_bad_values_name_their_key() {
        let text = include_str!("../../configs/train_rm.toml");
        let cfg = RmConfig::from_toml_str(text, Path::new("/base")).expect("configs/train_rm.toml");
        assert_eq!(cfg.data.train, Path::new("/base/data/rm_pairs.jsonl"));
        assert!(cfg.train.freeze_vision && cfg.train.steps == 500);

        let base = "[model]\ntiny = {}\n[data]\ntrain = \"p.jsonl\"\n";
        for (extra, key) in [
            ("[train]\nbatch_pairs = 0\n", "train.batch_pairs"),
            ("[train]\nlr = -1.0\n", "train.lr"),
            ("[train]\nlearning_rate = 1.0\n", "learning_rate"),
        ] {
            let err = RmConfig::from_toml_str(&format!("{base}{extra}"), Path::new("."))
                .expect_err(key)
                .to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let both = "[model]\ndir = \"m\"\ntiny = {}\n[data]\ntrain = \"p.jsonl\"\n";
        let err = RmConfig::from_toml_str(both, Path::new(".")).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
    }
}
