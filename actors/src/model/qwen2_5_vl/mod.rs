//! Qwen2.5-VL (transformers `Qwen2_5_VLForConditionalGeneration`) and the Skywork-VL Reward model built on it:
//! the vision tower's merged patch tokens replace the `<|image_pad|>` embeddings, the LLM runs with
//! multimodal RoPE, and either the LM head gives logits or TRL's value head (`v_head.summary`, a biased
//! linear to one scalar, in `value_head.safetensors` beside the checkpoint) scores each row's last real token.
//!
//! Checkpoint layouts read: the released one (`model.*` LLM, `visual.*`, `lm_head.weight`) and transformers
//! 5.x's (`model.language_model.*`, `model.visual.*`, `lm_head.weight`); the first that holds the LLM's
//! embedding is used. `lm_head` is optional (a reward model needs only the value head).

pub mod config;
pub mod text;
pub mod vision;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

pub use config::{Config, VisionConfig};
use text::{ids_and_real, rope_index, MropePositions, TextModel};
pub use vision::{PatchLayout, VisionTower};

use super::linear::{linear_no_bias, Linear};
use super::qwen2;
use super::weights::WeightStore;
use crate::{Error, Result};

/// File holding TRL's value head (`v_head.summary.weight` [1, hidden], `v_head.summary.bias` [1]).
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";

/// The images of one batch: every image's patches, concatenated as the processor writes them, and grids.
#[derive(Debug, Clone)]
pub struct Images {
    /// (patches, channels * temporal * patch * patch).
    pub pixel_values: Tensor,
    /// (t, h, w) patches of each image, in the order the images appear across the batch.
    pub grids: Vec<[usize; 3]>,
}

/// Which checkpoint prefixes hold the LLM and the vision tower.
fn prefixes(vb: &VarBuilder) -> (&'static str, &'static str) {
    if vb.contains_tensor("model.language_model.embed_tokens.weight") {
        ("model.language_model", "model.visual")
    } else {
        ("model", "visual")
    }
}

/// Qwen2.5-VL with an optional LM head and an optional value head.
#[derive(Debug, Clone)]
pub struct Qwen25Vl {
    /// The vision tower.
    pub visual: VisionTower,
    /// The LLM.
    pub llm: TextModel,
    lm_head: Option<Linear>,
    value_head: Option<candle_nn::Linear>,
    cfg: Config,
}

impl Qwen25Vl {
    /// Builds the model from `vb` at the checkpoint root and, when given, the value head from `head_vb`
    /// (at the root of `value_head.safetensors`).
    pub fn new(cfg: &Config, vb: VarBuilder, head_vb: Option<VarBuilder>) -> Result<Self> {
        cfg.validate()?;
        let (llm_prefix, visual_prefix) = prefixes(&vb);
        let model = qwen2::Model::new(&cfg.text, vb.pp(llm_prefix))?;
        let lm_head = if cfg.text.tie_word_embeddings {
            Some(Linear::new(candle_nn::Linear::new(
                model.embedding_weight().clone(),
                None,
            )))
        } else if vb.contains_tensor("lm_head.weight") {
            Some(linear_no_bias(
                cfg.text.hidden_size,
                cfg.text.vocab_size,
                vb.pp("lm_head"),
            )?)
        } else {
            None
        };
        let value_head = head_vb
            .map(|vb| candle_nn::linear(cfg.text.hidden_size, 1, vb.pp("v_head").pp("summary")))
            .transpose()?;
        Ok(Self {
            visual: VisionTower::new(&cfg.vision, vb.pp(visual_prefix))?,
            llm: TextModel::new(cfg, model),
            lm_head,
            value_head,
            cfg: cfg.clone(),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Whether logits can be computed (the checkpoint has `lm_head.weight` or ties it).
    pub fn has_lm_head(&self) -> bool {
        self.lm_head.is_some()
    }

    /// Whether scores can be computed (a value head was loaded).
    pub fn has_value_head(&self) -> bool {
        self.value_head.is_some()
    }

    /// Input embeddings (B, T, D): token embeddings with the `<|image_pad|>` slots (row-major across the
    /// batch) replaced by the images' merged patch tokens. The counts must agree.
    pub fn embed(&self, input_ids: &Tensor, images: Option<&Images>) -> Result<Tensor> {
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let embeds = self.llm.model.embed_tokens(&input_ids)?; // (B, T, D)
        let (b, t, d) = embeds.dims3()?;
        let pad = self.cfg.image_token_id;
        let slots: Vec<usize> = input_ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .enumerate()
            .filter(|(_, id)| **id == pad)
            .map(|(i, _)| i)
            .collect();
        let expected: usize = images.map_or(0, |im| {
            im.grids.iter().map(|&g| self.cfg.image_tokens(g)).sum()
        });
        if slots.len() != expected {
            return Err(Error::msg(format!(
                "input_ids hold {} image pad tokens (id {pad}) but the images give {expected} tokens",
                slots.len()
            )));
        }
        let Some(images) = images.filter(|_| expected > 0) else {
            return Ok(embeds);
        };
        let features = self
            .visual
            .forward(&images.pixel_values, &images.grids)?
            .to_dtype(embeds.dtype())?; // (n, D)
                                        // Differentiable scatter: gather rows from [text embeddings; image tokens].
        let mut source: Vec<u32> = (0..(b * t) as u32).collect();
        for (k, &slot) in slots.iter().enumerate() {
            source[slot] = (b * t + k) as u32;
        }
        let index = Tensor::from_vec(source, b * t, embeds.device())?;
        let pool = Tensor::cat(&[&embeds.reshape((b * t, d))?, &features], 0)?;
        Ok(pool.index_select(&index, 0)?.reshape((b, t, d))?)
    }

    /// The three-axis positions of a batch (see [`text::rope_index`]).
    pub fn positions(
        &self,
        input_ids: &Tensor,
        images: Option<&Images>,
        attention_mask: Option<&Tensor>,
    ) -> Result<MropePositions> {
        let (ids, real) = ids_and_real(input_ids, attention_mask)?;
        rope_index(
            &self.cfg,
            &ids,
            &real,
            images.map_or(&[][..], |im| &im.grids),
        )
    }

    /// input_ids (B, T), images, mask (B, T) 1 = token -> final-normed hidden states (B, T, D).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        images: Option<&Images>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let positions = self.positions(input_ids, images, attention_mask)?;
        let embeds = self.embed(input_ids, images)?;
        self.llm.forward_embeds(&embeds, attention_mask, &positions)
    }

    /// Logits (B, T, V); an error when the checkpoint has no LM head.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        images: Option<&Images>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let head = self.head()?;
        head.forward(&self.hidden_states(input_ids, images, attention_mask)?)
    }

    /// The LLM with its LM head as a Qwen2 causal LM sharing every tensor (a cheap clone): decode steps after
    /// [`Self::prefill_last`] are Qwen2 steps (see [`TextModel::prefill`]). An error without an LM head.
    pub fn causal_lm(&self) -> Result<qwen2::ForCausalLM> {
        Ok(qwen2::ForCausalLM::from_parts(
            self.llm.model.clone(),
            self.head()?.clone(),
        ))
    }

    /// The LM head on hidden states (..., D) -> logits (..., V); an error without an LM head.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head()?.forward(hidden)
    }

    fn head(&self) -> Result<&Linear> {
        self.lm_head
            .as_ref()
            .ok_or_else(|| Error::msg("this Qwen2.5-VL checkpoint has no lm_head.weight"))
    }

    /// Prefill of one batch into an empty `cache` (see [`TextModel::prefill`]): input_ids (B, T), images, mask
    /// -> the logits after each row's last slot (B, V).
    pub fn prefill_last(
        &self,
        input_ids: &Tensor,
        images: Option<&Images>,
        attention_mask: Option<&Tensor>,
        cache: &mut super::kv_cache::KvCache,
    ) -> Result<Tensor> {
        let head = self.head()?;
        let t = input_ids.dim(1)?;
        if t == 0 {
            return Err(Error::msg("Qwen2.5-VL prefill: a prompt of 0 tokens"));
        }
        let positions = self.positions(input_ids, images, attention_mask)?;
        let embeds = self.embed(input_ids, images)?;
        let hidden = self
            .llm
            .prefill(&embeds, attention_mask, &positions, cache)?;
        head.forward(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?) // (B, V)
    }

    /// Scores (B) f32: the value head on each row's last real token. An error without a value head or
    /// for a row with no real token.
    pub fn score(
        &self,
        input_ids: &Tensor,
        images: Option<&Images>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let head = self.value_head.as_ref().ok_or_else(|| {
            Error::msg(format!(
                "no value head loaded ({VALUE_HEAD_FILE} beside the checkpoint)"
            ))
        })?;
        let (b, t) = input_ids.dims2()?;
        let (_, real) = ids_and_real(input_ids, attention_mask)?;
        let mut picked = Vec::with_capacity(b);
        for (row, real) in real.iter().enumerate() {
            let last = real
                .iter()
                .rposition(|&r| r)
                .ok_or_else(|| Error::msg(format!("value head: row {row} has no real token")))?;
            picked.push((row * t + last) as u32);
        }
        let hidden = self.hidden_states(input_ids, images, attention_mask)?;
        let d = hidden.dim(2)?;
        let index = Tensor::from_vec(picked, b, hidden.device())?;
        let last = hidden.reshape((b * t, d))?.index_select(&index, 0)?; // (B, D)
        let last = last.to_dtype(head.weight().dtype())?;
        Ok(head.forward(&last)?.squeeze(1)?.to_dtype(DType::F32)?)
    }
}

/// A Qwen2.5-VL directory loaded: the model and the stores its tensors came from (the checkpoint, and
/// the value head's when `value_head.safetensors` exists), for optimizers and saving.
pub struct Loaded {
    /// The model.
    pub model: Qwen25Vl,
    /// The checkpoint's tensors.
    pub store: WeightStore,
    /// The value head's tensors, when the file exists.
    pub head_store: Option<WeightStore>,
}

/// Loads `dir` (config.json, the checkpoint, and `value_head.safetensors` when present); a tensor whose
/// name satisfies `trainable` (value-head names are `v_head.summary.*`) comes back as a `Var`.
pub fn load_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
    trainable: impl Fn(&str) -> bool + Clone + Send + Sync + 'static,
) -> Result<Loaded> {
    let cfg = Config::from_file(&dir.join("config.json"))?;
    let store = WeightStore::load(dir, dtype, device)?;
    let head_path = dir.join(VALUE_HEAD_FILE);
    let head_store = if head_path.is_file() {
        let tensors = candle_core::safetensors::load(&head_path, device).map_err(|err| {
            Error::Checkpoint {
                path: head_path.clone(),
                msg: err.to_string(),
            }
        })?;
        Some(WeightStore::from_tensors(
            tensors, &head_path, dtype, device,
        )?)
    } else {
        None
    };
    let model = Qwen25Vl::new(
        &cfg,
        store.var_builder(trainable.clone()),
        head_store.as_ref().map(|s| s.var_builder(trainable)),
    )?;
    Ok(Loaded {
        model,
        store,
        head_store,
    })
}

#[cfg(test)]
mod tests;
