//! [`StepModel`] for Qwen2.5-VL (`model::qwen2_5_vl::Qwen25Vl` with its LM head) as a policy.
//!
//! Prefill of a prompt runs the vision tower once per group: its merged patch tokens replace the prompt's
//! `<|image_pad|>` embeddings ([`Qwen25Vl::embed`]), the LLM runs on them with the three-axis positions of
//! transformers' `get_rope_index` into a fresh KV cache (batch 1), and the cached row is repeated for the
//! group's rows. The prefill leaves each row's next position at its largest position + 1 (the rope delta of
//! transformers' `generate`), and a decode step's tokens have the same position on all three axes, where the
//! multimodal rotary angle is the 1D one: decode steps, row selection and continuous batching are those of
//! [`Qwen2Generator`] on [`Qwen25Vl::causal_lm`], the same tensors (packed for the CPU by its owner). As in
//! transformers, only the prompt's `<|image_pad|>` positions take image features.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};

use super::engine::StepModel;
use super::qwen2::Qwen2Generator;
use super::rollout::PromptInput;
use super::shards::{ShardPlan, ShardedCache};
use crate::model::qwen2::ForCausalLM;
use crate::model::qwen2_5_vl::{Images, Qwen25Vl};
use crate::{Error, Result};

/// A Qwen2.5-VL model driven by the generation engine.
pub struct Qwen25VlGenerator<'a> {
    model: &'a Qwen25Vl,
    /// `model`'s LLM and head as a Qwen2 causal LM (the same tensors), for decode steps.
    decoder: &'a ForCausalLM,
    device: Device,
    plan: ShardPlan,
    /// How many times the vision tower has run (one per prefill of a prompt with images).
    vision_runs: AtomicUsize,
}

impl<'a> Qwen25VlGenerator<'a> {
    /// Drives `model`, whose weights live on `device`; `decoder` is `model.causal_lm()` (possibly packed).
    pub fn new(model: &'a Qwen25Vl, decoder: &'a ForCausalLM, device: &Device) -> Self {
        let plan = Qwen2Generator::new(decoder, device).shard_plan();
        Self {
            model,
            decoder,
            device: device.clone(),
            plan,
            vision_runs: AtomicUsize::new(0),
        }
    }

    /// Replaces the shard plan of the running cache (tests compare plans).
    pub fn with_shard_plan(mut self, plan: ShardPlan) -> Self {
        self.plan = plan;
        self
    }

    /// How many times the vision tower ran since this generator was made: once per prompt with images.
    pub fn vision_runs(&self) -> usize {
        self.vision_runs.load(Ordering::Relaxed)
    }

    fn llm(&self) -> Qwen2Generator<'a> {
        Qwen2Generator::new(self.decoder, &self.device).with_shard_plan(self.plan)
    }

    /// The prompt's images as the model takes them, after checking them against its grids.
    fn images(&self, prompt: &PromptInput) -> Result<Option<Images>> {
        let name = format!("prompt {}", prompt.prompt_index);
        let Some(pixel_values) = &prompt.pixel_values else {
            if !prompt.image_grids.is_empty() {
                return Err(Error::msg(format!(
                    "generate: {name} has {} image grids but no pixel values",
                    prompt.image_grids.len()
                )));
            }
            return Ok(None);
        };
        let patch_len = self.model.config().vision.patch_len();
        let patches: usize = prompt.image_grids.iter().map(|&[t, h, w]| t * h * w).sum();
        let dims = pixel_values.dims();
        if prompt.image_grids.is_empty() || dims != [patches, patch_len] {
            return Err(Error::msg(format!(
                "generate: {name} has pixel values of shape {dims:?}, its image grids {:?} need \
                 ({patches}, {patch_len}) (Qwen2.5-VL takes the processor's flattened patches)",
                prompt.image_grids
            )));
        }
        Ok(Some(Images {
            pixel_values: pixel_values.clone(),
            grids: prompt.image_grids.clone(),
        }))
    }
}

impl StepModel for Qwen25VlGenerator<'_> {
    /// One cached row per running response (the LLM's sharded cache).
    type Cache = ShardedCache;

    fn vocab_size(&self) -> usize {
        self.decoder.config().vocab_size
    }

    fn max_sequence_len(&self) -> usize {
        self.decoder.config().max_position_embeddings
    }

    fn prefill(&self, prompt: &PromptInput, rows: usize) -> Result<(Vec<f32>, Self::Cache)> {
        let name = format!("prompt {}", prompt.prompt_index);
        if prompt.token_ids.is_empty() {
            return Err(Error::msg(format!("generate: {name} is empty")));
        }
        let images = self.images(prompt)?;
        if images.is_some() {
            self.vision_runs.fetch_add(1, Ordering::Relaxed);
        }
        let ids = Tensor::new(prompt.token_ids.as_slice(), &self.device)?.unsqueeze(0)?; // (1, T)
        let mut cache = self.decoder.new_cache();
        let last = self
            .device
            .with_context(|| -> Result<Vec<f32>> {
                Ok(self
                    .model
                    .prefill_last(&ids, images.as_ref(), None, &mut cache)? // (1, V)
                    .squeeze(0)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?) // (V)
            })
            .map_err(|err| Error::msg(format!("generate: {name}: {err}")))?;
        cache.select_rows(&vec![0; rows])?; // the prompt's keys/values, once per row of the group
        Ok((last, ShardedCache::single(cache, self.plan)))
    }

    fn decode_step(&self, tokens: &[u32], cache: &mut Self::Cache) -> Result<Vec<Vec<f32>>> {
        self.llm().decode_step(tokens, cache)
    }

    fn select_rows(&self, cache: &mut Self::Cache, keep: &[usize]) -> Result<()> {
        cache.select_rows(keep)
    }

    fn can_append_rows(&self) -> bool {
        true
    }

    fn append_rows(&self, cache: &mut Self::Cache, joining: Self::Cache) -> Result<()> {
        cache.append_rows(joining)
    }
}
