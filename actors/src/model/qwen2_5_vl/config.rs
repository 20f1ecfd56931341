//! `config.json` of a Qwen2.5-VL model (transformers `Qwen2_5_VLConfig`), in either layout: the released
//! one (text keys at the top level, `rope_scaling = {"type": "mrope", "mrope_section": [...]}`, transformers
//! 4.x) or transformers 5.x's (`text_config`, `rope_parameters`). The text half becomes a Qwen2
//! [`qwen2::Config`] plus the multimodal RoPE sections; `vision_config` is [`VisionConfig`].

use std::path::Path;

use serde::Deserialize;

use super::super::qwen2;
use super::super::weights::read_config;
use crate::{Error, Result};

/// `vision_config` (transformers `Qwen2_5_VLVisionConfig`, with its defaults); unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VisionConfig {
    /// Number of vision blocks.
    #[serde(default = "defaults::depth")]
    pub depth: usize,
    /// Width of the vision tower.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// Width of the blocks' SwiGLU MLP.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// MLP activation; only `silu` is supported.
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    /// Attention heads.
    #[serde(default = "defaults::num_heads")]
    pub num_heads: usize,
    /// Image channels.
    #[serde(default = "defaults::in_channels", alias = "in_chans")]
    pub in_channels: usize,
    /// Side of one square patch, in pixels.
    #[serde(default = "defaults::patch_size", alias = "spatial_patch_size")]
    pub patch_size: usize,
    /// Side of the block of patches the merger folds into one LLM token.
    #[serde(default = "defaults::spatial_merge_size")]
    pub spatial_merge_size: usize,
    /// Frames per temporal patch (an image is repeated to fill it).
    #[serde(default = "defaults::temporal_patch_size")]
    pub temporal_patch_size: usize,
    /// Side of an attention window, in pixels.
    #[serde(default = "defaults::window_size")]
    pub window_size: usize,
    /// Width of the merger's output (the LLM's hidden size).
    #[serde(default = "defaults::out_hidden_size")]
    pub out_hidden_size: usize,
    /// Blocks that attend over the whole image; the others attend inside windows.
    #[serde(default = "defaults::fullatt_block_indexes")]
    pub fullatt_block_indexes: Vec<usize>,
}

impl VisionConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Values of one flattened patch: channels x temporal x patch x patch.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| {
            Err(Error::Config {
                key: format!("vision_config.{key}"),
                msg,
            })
        };
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(
                "num_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_heads, self.hidden_size
                ),
            );
        }
        if !self.head_dim().is_multiple_of(4) {
            return bad(
                "hidden_size",
                format!(
                    "head dim {} is not a multiple of 4 (2D RoPE)",
                    self.head_dim()
                ),
            );
        }
        if self.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!("`{}` is not supported (only silu)", self.hidden_act),
            );
        }
        let merge_px = self.spatial_merge_size * self.patch_size;
        if self.spatial_merge_size == 0 || self.window_size < merge_px {
            return bad(
                "window_size",
                format!(
                    "{} is smaller than one merged patch ({merge_px} px)",
                    self.window_size
                ),
            );
        }
        if let Some(&i) = self
            .fullatt_block_indexes
            .iter()
            .find(|&&i| i >= self.depth)
        {
            return bad(
                "fullatt_block_indexes",
                format!("block {i} does not exist (depth {})", self.depth),
            );
        }
        Ok(())
    }
}

/// A whole Qwen2.5-VL config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The LLM (a Qwen2 decoder; its `rope_scaling_type` is cleared, mrope is handled here).
    pub text: qwen2::Config,
    /// How the rotary frequencies are split between the (temporal, height, width) position axes;
    /// sums to half the head dim.
    pub mrope_section: [usize; 3],
    /// The vision tower.
    pub vision: VisionConfig,
    /// `<|image_pad|>`: one per merged image token.
    pub image_token_id: u32,
    /// `<|vision_start|>`, just before an image's pad run.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`, just after it.
    pub vision_end_token_id: u32,
}

impl Config {
    /// Reads and validates `config.json`; errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_config(path)?;
        Self::from_value(&value).map_err(|err| err.in_file(path))
    }

    /// Parses an already-read `config.json`.
    pub fn from_value(value: &serde_json::Value) -> Result<Self> {
        let key = |key: &str, msg: String| Error::Config {
            key: key.to_string(),
            msg,
        };
        let mut text = value.get("text_config").unwrap_or(value).clone();
        // The mrope settings: `rope_scaling` (4.x) or `rope_parameters` (5.x), in the text config or at the top.
        let rope = ["rope_parameters", "rope_scaling"].iter().find_map(|name| {
            text.get(*name)
                .or_else(|| value.get(*name))
                .filter(|v| v.is_object())
                .map(|v| (*name, v.clone()))
        });
        let (rope_key, rope) = rope.ok_or_else(|| {
            key(
                "rope_scaling",
                "no `rope_scaling` / `rope_parameters` with `mrope_section`".into(),
            )
        })?;
        let section: Vec<usize> = rope
            .get("mrope_section")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|err| key(&format!("{rope_key}.mrope_section"), err.to_string()))?
            .ok_or_else(|| key(&format!("{rope_key}.mrope_section"), "missing".into()))?;
        let mrope_section: [usize; 3] = section.as_slice().try_into().map_err(|_| {
            key(
                &format!("{rope_key}.mrope_section"),
                format!("{section:?} does not have 3 entries"),
            )
        })?;
        // The rest is a plain Qwen2 config once the mrope type is taken out.
        let obj = text
            .as_object_mut()
            .ok_or_else(|| key("text_config", "not an object".into()))?;
        let theta = rope
            .get("rope_theta")
            .cloned()
            .or_else(|| obj.get("rope_theta").cloned())
            .or_else(|| value.get("rope_theta").cloned());
        obj.remove("rope_scaling");
        obj.remove("rope_parameters");
        if let Some(theta) = theta {
            obj.insert("rope_theta".into(), theta);
        }
        if obj.get("hidden_act").is_none() {
            obj.insert("hidden_act".into(), "silu".into());
        }
        let text: qwen2::Config =
            serde_json::from_value(text).map_err(|err| key("text_config", err.to_string()))?;
        let vision: VisionConfig = serde_json::from_value(
            value
                .get("vision_config")
                .cloned()
                .ok_or_else(|| key("vision_config", "missing".into()))?,
        )
        .map_err(|err| key("vision_config", err.to_string()))?;
        let token = |name: &str, default: u32| -> Result<u32> {
            match value
                .get(name)
                .or_else(|| value.get("text_config")?.get(name))
            {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|v| v as u32)
                    .ok_or_else(|| key(name, format!("{v} is not a token id"))),
            }
        };
        let cfg = Config {
            text,
            mrope_section,
            vision,
            image_token_id: token("image_token_id", 151_655)?,
            vision_start_token_id: token("vision_start_token_id", 151_652)?,
            vision_end_token_id: token("vision_end_token_id", 151_653)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what this implementation supports; errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.text.validate()?;
        self.vision.validate()?;
        let half = self.text.head_dim() / 2;
        if self.mrope_section.iter().sum::<usize>() != half {
            return Err(Error::Config {
                key: "rope_scaling.mrope_section".into(),
                msg: format!(
                    "{:?} sums to {}, not half the head dim {half}",
                    self.mrope_section,
                    self.mrope_section.iter().sum::<usize>()
                ),
            });
        }
        if self.vision.out_hidden_size != self.text.hidden_size {
            return Err(Error::Config {
                key: "vision_config.out_hidden_size".into(),
                msg: format!(
                    "{} is not the LLM's hidden_size {}",
                    self.vision.out_hidden_size, self.text.hidden_size
                ),
            });
        }
        Ok(())
    }

    /// LLM tokens of one image of `grid` = (t, h, w) patches: t * h * w / merge^2.
    pub fn image_tokens(&self, grid: [usize; 3]) -> usize {
        let merge = self.vision.spatial_merge_size;
        grid[0] * grid[1] * grid[2] / (merge * merge)
    }
}

/// transformers `Qwen2_5_VLVisionConfig` defaults.
mod defaults {
    pub fn depth() -> usize {
        32
    }
    pub fn hidden_size() -> usize {
        3584
    }
    pub fn intermediate_size() -> usize {
        3420
    }
    pub fn hidden_act() -> String {
        "silu".into()
    }
    pub fn num_heads() -> usize {
        16
    }
    pub fn in_channels() -> usize {
        3
    }
    pub fn patch_size() -> usize {
        14
    }
    pub fn spatial_merge_size() -> usize {
        2
    }
    pub fn temporal_patch_size() -> usize {
        2
    }
    pub fn window_size() -> usize {
        112
    }
    pub fn out_hidden_size() -> usize {
        3584
    }
    pub fn fullatt_block_indexes() -> Vec<usize> {
        vec![7, 15, 23, 31]
    }
}
