//! config.json of an InternVL-chat / Skywork-R1V checkpoint (`InternVLChatConfig`).
//!
//! Reference: InternVL `configuration_internvl_chat.py`. `model_type` is `internvl_chat` (OpenGVLab) or
//! `skywork_chat` (Skywork-R1V, the same layout); `llm_config.model_type` must be `qwen2`.

use std::path::Path;

use serde::Deserialize;

use super::adapter::PixelShuffleVersion;
use super::qwen2::Config as LlmConfig;
use super::vision::VisionConfig;
use super::weights::read_config;
use crate::{Error, Result};

fn default_downsample_ratio() -> f64 {
    0.5
}
fn default_select_layer() -> i64 {
    -1
}
fn default_ps_version() -> String {
    "v2".to_string()
}
fn default_max_dynamic_patch() -> usize {
    12
}
fn default_min_dynamic_patch() -> usize {
    1
}
fn default_true() -> bool {
    true
}

/// The InternVL-chat model configuration; unknown keys are ignored (released checkpoints carry many).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatConfig {
    /// `internvl_chat` or `skywork_chat`.
    pub model_type: String,
    /// The InternViT tower.
    pub vision_config: VisionConfig,
    /// The LLM's own config.json (a Qwen2 config), parsed by the LLM.
    pub llm_config: serde_json::Value,
    /// Pixel-shuffle ratio: 0.5 turns 2x2 patches into one image token.
    #[serde(default = "default_downsample_ratio")]
    pub downsample_ratio: f64,
    /// Which ViT hidden state feeds the adapter (-1: the last layer).
    #[serde(default = "default_select_layer")]
    pub select_layer: i64,
    /// Pixel-shuffle version, `v1` or `v2`.
    #[serde(default = "default_ps_version")]
    pub ps_version: String,
    /// Tile side in pixels when it differs from `vision_config.image_size`.
    #[serde(default)]
    pub force_image_size: Option<usize>,
    /// Name of the conversation template (e.g. `internvl2_5`, `skywork-r1v2`); informational here.
    #[serde(default)]
    pub template: Option<String>,
    /// Whether images are cut into several tiles (InternVL dynamic tiling).
    #[serde(default = "default_true")]
    pub dynamic_image_size: bool,
    /// Most tiles per image.
    #[serde(default = "default_max_dynamic_patch")]
    pub max_dynamic_patch: usize,
    /// Fewest tiles per image.
    #[serde(default = "default_min_dynamic_patch")]
    pub min_dynamic_patch: usize,
    /// Whether a thumbnail tile is added when an image has more than one tile.
    #[serde(default = "default_true")]
    pub use_thumbnail: bool,
}

impl ChatConfig {
    /// Reads and validates `path` (a config.json); errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_config(path)?;
        cfg.validate().map_err(|err| err.in_file(path))?;
        Ok(cfg)
    }

    /// The LLM's configuration, parsed from `llm_config`.
    pub fn llm(&self) -> Result<LlmConfig> {
        let cfg: LlmConfig =
            serde_json::from_value(self.llm_config.clone()).map_err(|e| Error::Config {
                key: "llm_config".into(),
                msg: e.to_string(),
            })?;
        cfg.validate().map_err(|e| match e {
            Error::Config { key, msg } => Error::Config {
                key: format!("llm_config.{key}"),
                msg,
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Checks the model type, the LLM type, the pixel shuffle and the vision tower.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.model_type.as_str(), "internvl_chat" | "skywork_chat") {
            return Err(Error::Config {
                key: "model_type".into(),
                msg: format!(
                    "`{}` is not an InternVL-chat model (internvl_chat, skywork_chat)",
                    self.model_type
                ),
            });
        }
        let llm_type = self.llm_config.get("model_type").and_then(|v| v.as_str());
        if llm_type != Some("qwen2") {
            return Err(Error::Config {
                key: "llm_config.model_type".into(),
                msg: format!("{llm_type:?} is not supported (only qwen2)"),
            });
        }
        self.llm()?;
        self.pixel_shuffle_version()?;
        self.vision_config.validate("vision_config")?;
        let grid = self.tile_size() / self.vision_config.patch_size;
        let factor = (1.0 / self.downsample_ratio).round() as usize;
        if !self
            .tile_size()
            .is_multiple_of(self.vision_config.patch_size)
            || factor == 0
            || !grid.is_multiple_of(factor)
        {
            return Err(Error::Config {
                key: "force_image_size".into(),
                msg: format!(
                    "a {} px tile is not a whole number of {} px patches divisible by the shuffle factor {factor}",
                    self.tile_size(),
                    self.vision_config.patch_size
                ),
            });
        }
        Ok(())
    }

    /// `ps_version` as an enum.
    pub fn pixel_shuffle_version(&self) -> Result<PixelShuffleVersion> {
        match self.ps_version.as_str() {
            "v1" => Ok(PixelShuffleVersion::V1),
            "v2" => Ok(PixelShuffleVersion::V2),
            other => Err(Error::Config {
                key: "ps_version".into(),
                msg: format!("`{other}` is not v1 or v2"),
            }),
        }
    }

    /// Tile side in pixels: `force_image_size or vision_config.image_size`.
    pub fn tile_size(&self) -> usize {
        self.force_image_size
            .unwrap_or(self.vision_config.image_size)
    }

    /// Image tokens per tile: `int((image_size // patch_size) ** 2 * (downsample_ratio ** 2))` (256 for
    /// 448 px tiles).
    pub fn num_image_token(&self) -> usize {
        let grid = self.tile_size() / self.vision_config.patch_size;
        ((grid * grid) as f64 * self.downsample_ratio * self.downsample_ratio).round() as usize
    }
}
