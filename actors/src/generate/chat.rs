//! [`StepModel`] for the InternVL-chat model (`model::chat::ChatModel`: InternViT + `mlp1` + Qwen2).
//!
//! Prefill of a prompt with images runs the vision tower and the adapter once per group: the prompt's
//! embeddings get the image features at its `<IMG_CONTEXT>` positions ([`ChatModel::embed`], InternVL's
//! `input_embeds[selected] = vit_embeds`), the LLM runs on them into a fresh KV cache (batch 1), and the
//! cached row is repeated for the group's rows (`KvCache::select_rows`). Decode steps only feed sampled
//! tokens, so they go through the LLM's token embeddings: they, the row selection and text-only prompts are
//! delegated to [`Qwen2Generator`] on the chat model's LLM. As in InternVL's `generate`, only the prompt's
//! `<IMG_CONTEXT>` positions take image features: a generated `<IMG_CONTEXT>` token is an ordinary token.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};

use super::engine::StepModel;
use super::qwen2::Qwen2Generator;
use super::rollout::PromptInput;
use super::shards::ShardedCache;
use crate::model::chat::ChatModel;
use crate::{Error, Result};

/// A chat model driven by the generation engine.
pub struct ChatGenerator<'a> {
    model: &'a ChatModel,
    llm: Qwen2Generator<'a>,
    device: Device,
    /// How many times the vision tower has run (one per prefill of a prompt with images).
    vision_runs: AtomicUsize,
}

impl<'a> ChatGenerator<'a> {
    /// Drives `model`, whose weights live on `device`. Prompts with images need the model's IMG_CONTEXT
    /// token id (read from tokenizer.json by `ChatModel::load`, or set with `set_img_context_token_id`).
    pub fn new(model: &'a ChatModel, device: &Device) -> Self {
        Self {
            model,
            llm: Qwen2Generator::new(&model.llm, device),
            device: device.clone(),
            vision_runs: AtomicUsize::new(0),
        }
    }

    /// How many times the vision tower (and adapter) ran since this generator was made: once per prompt
    /// with images, whatever the group size.
    pub fn vision_runs(&self) -> usize {
        self.vision_runs.load(Ordering::Relaxed)
    }

    /// The prompt's input embeddings `(1, T, D)`: token embeddings with the image features of
    /// `prompt.pixel_values` at its `<IMG_CONTEXT>` positions. Checks the prompt against the model first;
    /// every error names the prompt.
    pub fn prompt_embeddings(&self, prompt: &PromptInput) -> Result<Tensor> {
        self.check_images(prompt)?;
        let ids = Tensor::new(prompt.token_ids.as_slice(), &self.device)?.unsqueeze(0)?; // (1, T)
        if prompt.pixel_values.is_some() {
            self.vision_runs.fetch_add(1, Ordering::Relaxed);
        }
        self.model
            .embed(&ids, prompt.pixel_values.as_ref())
            .map_err(|err| Error::msg(format!("generate: {}: {err}", prompt_name(prompt))))
    }

    /// The checks of a prompt's images against the model: tiles `(tiles, 3, S, S)` with the model's tile
    /// side, a known IMG_CONTEXT id, and as many `<IMG_CONTEXT>` tokens as tiles x tokens per tile.
    fn check_images(&self, prompt: &PromptInput) -> Result<()> {
        let name = prompt_name(prompt);
        let context_id = self.model.img_context_token_id();
        let context_tokens = context_id.map_or(0, |ctx| {
            prompt.token_ids.iter().filter(|&&id| id == ctx).count()
        });
        let Some(pixel_values) = &prompt.pixel_values else {
            if context_tokens > 0 {
                return Err(Error::msg(format!(
                    "generate: {name} holds {context_tokens} <IMG_CONTEXT> tokens but no images"
                )));
            }
            return Ok(());
        };
        let Some(context_id) = context_id else {
            return Err(Error::msg(format!(
                "generate: {name} has images, but the model's <IMG_CONTEXT> token id is unknown (no \
                 tokenizer.json in the model directory; set it with ChatModel::set_img_context_token_id)"
            )));
        };
        let side = self.model.config().tile_size();
        let dims = pixel_values.dims();
        if dims.len() != 4 || dims[0] == 0 || dims[1] != 3 || dims[2] != side || dims[3] != side {
            return Err(Error::msg(format!(
                "generate: {name} has image tiles of shape {dims:?}, the model takes (tiles, 3, {side}, {side})"
            )));
        }
        let tokens_per_tile = self.model.tokens_per_tile();
        let needed = dims[0] * tokens_per_tile;
        if context_tokens != needed {
            return Err(Error::msg(format!(
                "generate: {name} holds {context_tokens} <IMG_CONTEXT> tokens (id {context_id}) but its {} \
                 tiles x {tokens_per_tile} tokens per tile need {needed}",
                dims[0]
            )));
        }
        Ok(())
    }
}

/// How errors name a prompt.
fn prompt_name(prompt: &PromptInput) -> String {
    format!("prompt {}", prompt.prompt_index)
}

impl StepModel for ChatGenerator<'_> {
    /// One cached row per running response (the LLM's sharded cache).
    type Cache = ShardedCache;

    fn vocab_size(&self) -> usize {
        self.llm.vocab_size()
    }

    fn max_sequence_len(&self) -> usize {
        self.llm.max_sequence_len()
    }

    fn prefill(&self, prompt: &PromptInput, rows: usize) -> Result<(Vec<f32>, Self::Cache)> {
        if prompt.token_ids.is_empty() {
            return Err(Error::msg(format!(
                "generate: {} is empty",
                prompt_name(prompt)
            )));
        }
        if prompt.pixel_values.is_none() {
            self.check_images(prompt)?;
            return self.llm.prefill(prompt, rows);
        }
        let embeds = self.prompt_embeddings(prompt)?; // (1, T, D)
        let mut cache = self.model.llm.new_cache();
        // The LM head runs on the last position only: generation never reads the other prompt logits.
        let last = self
            .model
            .llm
            .forward_step_last(&embeds, None, &mut cache)? // (1, V)
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?; // (V)
        cache.select_rows(&vec![0; rows])?; // the prompt's keys/values, once per row of the group
        Ok((last, ShardedCache::single(cache, self.llm.shard_plan())))
    }

    fn decode_step(&self, tokens: &[u32], cache: &mut Self::Cache) -> Result<Vec<Vec<f32>>> {
        self.llm.decode_step(tokens, cache)
    }

    fn select_rows(&self, cache: &mut Self::Cache, keep: &[usize]) -> Result<()> {
        self.llm.select_rows(cache, keep)
    }

    /// Continuous batching: a group prefilled with its images joins the running rows like a text one.
    fn can_append_rows(&self) -> bool {
        self.llm.can_append_rows()
    }

    fn append_rows(&self, cache: &mut Self::Cache, joining: Self::Cache) -> Result<()> {
        self.llm.append_rows(cache, joining)
    }
}
