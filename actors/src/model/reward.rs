//! One scoring interface over the two reward-model families: a Qwen2 value head ([`ValueModel`], text only)
//! and Qwen2.5-VL with TRL's value head ([`Qwen25Vl`], Skywork-VL Reward, images included). Both score a
//! batch of (B, T) ids with a (B, T) mask (padding anywhere; the head reads each row's last real token).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::qwen2;
use super::qwen2_5_vl::{self, Images, Qwen25Vl};
use super::value_head::ValueModel;
use super::weights::{read_config, WeightStore};
use crate::{Error, Result};

/// A reward model of either family (one lives per actor or trainer, so the variants' sizes do not matter).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum RewardNet {
    /// `qwen2` with a `score` head (`Qwen2ForSequenceClassification`); images are not seen.
    Qwen2(ValueModel),
    /// `qwen2_5_vl` with `value_head.safetensors`.
    Qwen25Vl(Qwen25Vl),
}

impl RewardNet {
    /// Whether the model reads pixels.
    pub fn takes_images(&self) -> bool {
        matches!(self, RewardNet::Qwen25Vl(_))
    }

    /// Vocabulary size (ids must be below it).
    pub fn vocab_size(&self) -> usize {
        match self {
            RewardNet::Qwen2(m) => m.model.config().vocab_size,
            RewardNet::Qwen25Vl(m) => m.config().text.vocab_size,
        }
    }

    /// ids (B, T) u32, mask (B, T), the batch's images (Qwen2.5-VL only) -> scores (B) f32.
    pub fn score(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        images: Option<&Images>,
    ) -> Result<Tensor> {
        match self {
            RewardNet::Qwen2(model) => {
                if images.is_some_and(|im| !im.grids.is_empty()) {
                    return Err(Error::msg(
                        "images given to a Qwen2 value head, which reads text only",
                    ));
                }
                model.forward(input_ids, attention_mask)
            }
            RewardNet::Qwen25Vl(model) => model.score(input_ids, images, attention_mask),
        }
    }
}

/// A reward model loaded from a directory, with the stores its tensors came from.
pub struct LoadedReward {
    /// The model.
    pub net: RewardNet,
    /// The checkpoint's tensors (first) and, for Qwen2.5-VL, the value head's.
    pub stores: Vec<WeightStore>,
}

/// Whether a checkpoint tensor belongs to a vision tower (`visual.*`, `model.visual.*`).
pub fn is_vision_tensor(name: &str) -> bool {
    name.starts_with("visual.") || name.starts_with("model.visual.")
}

/// Loads the reward model in `dir` by its `config.json` `model_type` (`qwen2` or `qwen2_5_vl`); tensors whose
/// names satisfy `trainable` come back as `Var`s. A Qwen2.5-VL without `value_head.safetensors` is an error.
pub fn load_reward_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
    trainable: impl Fn(&str) -> bool + Clone + Send + Sync + 'static,
) -> Result<LoadedReward> {
    let config_path = dir.join("config.json");
    let config: serde_json::Value = read_config(&config_path)?;
    match config.get("model_type").and_then(|v| v.as_str()) {
        Some("qwen2") => {
            let cfg = qwen2::Config::from_file(&config_path)?;
            let store = WeightStore::load(dir, dtype, device)?;
            let net = RewardNet::Qwen2(ValueModel::new(&cfg, store.var_builder(trainable))?);
            Ok(LoadedReward {
                net,
                stores: vec![store],
            })
        }
        Some("qwen2_5_vl") => {
            let loaded = qwen2_5_vl::load_dir(dir, dtype, device, trainable)?;
            let Some(head_store) = loaded.head_store else {
                return Err(Error::Checkpoint {
                    path: dir.to_path_buf(),
                    msg: format!(
                        "a Qwen2.5-VL reward model needs {} beside the checkpoint",
                        qwen2_5_vl::VALUE_HEAD_FILE
                    ),
                });
            };
            Ok(LoadedReward {
                net: RewardNet::Qwen25Vl(loaded.model),
                stores: vec![loaded.store, head_store],
            })
        }
        other => Err(Error::ConfigFile {
            path: config_path,
            key: "model_type".into(),
            msg: format!("{other:?} is not a reward model family (qwen2, qwen2_5_vl)"),
        }),
    }
}
