//! Value head / reward model: the Qwen2 decoder plus a bias-free linear `score` on the hidden state
//! of each row's last real token, one scalar per row.
//!
//! Reference: transformers `Qwen2ForSequenceClassification` with `num_labels = 1` (its
//! `score` runs on every position and the logit of the last non-pad token is picked; the same
//! number).

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::kv_cache::mask_rows;
use super::qwen2::{Config, Model};
use crate::{Error, Result};

/// Qwen2 with a scalar head; `VarBuilder` at the checkpoint root (`model.*`, `score.weight`).
#[derive(Debug, Clone)]
pub struct ValueModel {
    /// The decoder.
    pub model: Model,
    score: Linear,
}

impl ValueModel {
    /// Builds the decoder and the `score` head (1, hidden) without bias.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let model = Model::new(cfg, vb.pp("model"))?;
        let score = candle_nn::linear_no_bias(cfg.hidden_size, 1, vb.pp("score"))?;
        Ok(Self { model, score })
    }

    /// input_ids (B, T) u32, mask (B, T) 1 = token -> scores (B) f32.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_embeds(&self.model.embed_tokens(input_ids)?, attention_mask)
    }

    /// embeds (B, T, D), mask (B, T) -> scores (B) f32, read at each row's last real token.
    /// A row without any real token is an error.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, d) = embeds.dims3()?;
        let rows = mask_rows(attention_mask, b, t)?;
        let mut picked = Vec::with_capacity(b);
        for (row, real) in rows.iter().enumerate() {
            let last = real
                .iter()
                .rposition(|&r| r)
                .ok_or_else(|| Error::msg(format!("value head: row {row} has no real token")))?;
            picked.push((row * t + last) as u32);
        }
        let hidden = self.model.forward_embeds(embeds, attention_mask)?;
        let index = Tensor::from_vec(picked, b, embeds.device())?;
        let last_hidden = hidden.reshape((b * t, d))?.index_select(&index, 0)?; // (B, D)
        let scores = self.score.forward(&last_hidden)?; // (B, 1)
        Ok(scores.squeeze(1)?.to_dtype(DType::F32)?)
    }
}
