//! `config.json` of a Qwen2 model, with the defaults of transformers' `Qwen2Config`.
//! Both layouts are read: `rope_theta` at the top level (transformers 4.x, the published Qwen2.5 /
//! QwQ files) or inside `rope_parameters` (transformers 5.x).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::weights::read_config;
use crate::{Error, Result};

/// Qwen2 hyper-parameters (transformers `Qwen2Config`). Unknown keys are ignored: HF configs
/// carry many that do not change the computation (`initializer_range`, `use_cache`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawConfig")]
pub struct Config {
    /// Vocabulary size (rows of `embed_tokens`).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Longest sequence the model was trained for (informational: RoPE is computed per position).
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether `lm_head` reuses `embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// MLP activation; only `silu` (SwiGLU) is supported.
    pub hidden_act: String,
    /// Sliding-window attention; only `false` is supported (as in every released Qwen2.5 config).
    pub use_sliding_window: bool,
    /// Padding token id, if the config names one (used by the value head's reference).
    pub pad_token_id: Option<u32>,
    /// RoPE scaling type other than `default`, if any (rejected by [`Config::validate`]).
    pub rope_scaling_type: Option<String>,
}

impl Config {
    /// Reads and validates `config.json`; errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Config = read_config(path)?;
        cfg.validate().map_err(|err| err.in_file(path))?;
        Ok(cfg)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks what this implementation supports; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| {
            Err(Error::Config {
                key: key.to_string(),
                msg,
            })
        };
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(
                "hidden_size",
                format!("head dim {} is odd; RoPE needs it even", self.head_dim()),
            );
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            );
        }
        if self.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!("`{}` is not supported (only silu)", self.hidden_act),
            );
        }
        if self.use_sliding_window {
            return bad(
                "use_sliding_window",
                "sliding-window attention is not supported".into(),
            );
        }
        if let Some(kind) = &self.rope_scaling_type {
            return bad(
                "rope_scaling",
                format!("RoPE scaling `{kind}` is not supported"),
            );
        }
        Ok(())
    }
}

/// RoPE settings in either layout (`rope_scaling` of 4.x, `rope_parameters` of 5.x).
#[derive(Debug, Clone, Default, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    #[serde(alias = "type")]
    rope_type: Option<String>,
}

/// `config.json` as written, before defaults and the two RoPE layouts are resolved.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    #[serde(default = "defaults::vocab_size")]
    vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default = "defaults::max_position_embeddings")]
    max_position_embeddings: usize,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    rope_scaling: Option<RopeParameters>,
    #[serde(default = "defaults::rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "defaults::hidden_act")]
    hidden_act: String,
    #[serde(default)]
    use_sliding_window: bool,
    #[serde(default)]
    pad_token_id: Option<u32>,
}

impl From<RawConfig> for Config {
    fn from(raw: RawConfig) -> Self {
        let rope = raw.rope_parameters.or(raw.rope_scaling).unwrap_or_default();
        let rope_theta = raw.rope_theta.or(rope.rope_theta).unwrap_or(10_000.0);
        let rope_scaling_type = rope.rope_type.filter(|kind| kind != "default");
        Config {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings,
            hidden_act: raw.hidden_act,
            use_sliding_window: raw.use_sliding_window,
            pad_token_id: raw.pad_token_id,
            rope_scaling_type,
        }
    }
}

/// transformers `Qwen2Config` defaults.
mod defaults {
    pub fn vocab_size() -> usize {
        151_936
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        22_016
    }
    pub fn num_hidden_layers() -> usize {
        32
    }
    pub fn num_attention_heads() -> usize {
        32
    }
    pub fn max_position_embeddings() -> usize {
        32_768
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn hidden_act() -> String {
        "silu".into()
    }
}
