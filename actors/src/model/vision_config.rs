//! `vision_config` of an InternVL-chat config.json: InternVL's `InternVisionConfig`
//! (`configuration_intern_vit.py`), with its defaults.

use serde::Deserialize;

use crate::{Error, Result};

fn default_image_size() -> usize {
    448
}
fn default_patch_size() -> usize {
    14
}
fn default_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn default_norm_type() -> NormType {
    NormType::RmsNorm
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "gelu".to_string()
}

/// Which normalisation an InternViT uses (`norm_type` in `vision_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormType {
    /// LayerNorm with bias: InternViT-300M.
    LayerNorm,
    /// RMSNorm without bias: InternViT-6B.
    RmsNorm,
}

/// `vision_config` of an InternVL-chat config.json (`InternVisionConfig`); unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    /// Width of the encoder (1024 for 300M, 3200 for 6B).
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads; `hidden_size` must divide evenly.
    pub num_attention_heads: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Tile side the position embedding was trained for (pixels).
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Patch side (pixels) of the patch-embedding convolution.
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// Input channels.
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Whether the fused `attn.qkv` Linear has a bias.
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// RMSNorm of q and k over the full width before splitting into heads (6B kind).
    #[serde(default)]
    pub qk_normalization: bool,
    /// LayerNorm (300M kind) or RMSNorm (6B kind).
    #[serde(default = "default_norm_type")]
    pub norm_type: NormType,
    /// Epsilon of every norm in the encoder.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// MLP activation; only `gelu` (exact, erf) is used by InternViT.
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

impl VisionConfig {
    /// Checks the values the model relies on; `prefix` names the config section in errors.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let bad = |key: &str, msg: String| Error::Config {
            key: format!("{prefix}.{key}"),
            msg,
        };
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(bad(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(bad(
                "hidden_act",
                format!("`{}` is not supported (only gelu)", self.hidden_act),
            ));
        }
        Ok(())
    }

    /// Patches per side at the configured image size.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }
}
