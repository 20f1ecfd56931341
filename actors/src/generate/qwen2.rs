//! [`StepModel`] for the Qwen2 LLM (`model::qwen2::ForCausalLM`) over its KV cache (`model::kv_cache`).
//!
//! Prefix sharing: `prefill` runs a group's prompt once (batch 1, the LM head on its last position only)
//! and repeats the cached row for the group's `rows` (`KvCache::select_rows`). Finished rows leave the cache
//! the same way, so each decode step runs only the rows still generating, and prefilled groups join the
//! running batch with `KvCache::append_rows` (continuous batching). The running cache is a
//! [`ShardedCache`]: with enough rows, each compute thread decodes its own shard of them.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::engine::StepModel;
use super::rollout::PromptInput;
use super::shards::{ShardPlan, ShardedCache};
use crate::model::kv_cache::KvCache;
use crate::model::qwen2::ForCausalLM;
use crate::Result;

/// A Qwen2 model driven by the generation engine.
pub struct Qwen2Generator<'a> {
    model: &'a ForCausalLM,
    device: Device,
    plan: ShardPlan,
}

impl<'a> Qwen2Generator<'a> {
    /// Drives `model`, whose weights live on `device`.
    /// On the CPU, decode steps of many rows run in shards ([`ShardPlan::for_cpu`]).
    pub fn new(model: &'a ForCausalLM, device: &Device) -> Self {
        let plan = if device.is_cpu() {
            ShardPlan::for_cpu()
        } else {
            ShardPlan::single()
        };
        Self {
            model,
            device: device.clone(),
            plan,
        }
    }

    /// Replaces the shard plan (tests compare plans; one shard is the plain batch).
    pub fn with_shard_plan(mut self, plan: ShardPlan) -> Self {
        self.plan = plan;
        self
    }

    /// The shard plan of the running cache.
    pub fn shard_plan(&self) -> ShardPlan {
        self.plan
    }

    /// One decode step of one shard: `tokens` in the shard's row order -> logits per row.
    fn step_shard(&self, tokens: Vec<u32>, cache: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        let rows = tokens.len();
        let ids = Tensor::from_vec(tokens, (rows, 1), &self.device)?; // (B, 1)
        Ok(self
            .model
            .forward_step_last_ids(&ids, None, cache)? // (B, V)
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?)
    }
}

impl StepModel for Qwen2Generator<'_> {
    /// One cached row per running response, in shards.
    type Cache = ShardedCache;

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn max_sequence_len(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    fn prefill(&self, prompt: &PromptInput, rows: usize) -> Result<(Vec<f32>, Self::Cache)> {
        if prompt.pixel_values.is_some() {
            return Err(crate::Error::msg(format!(
                "generate: prompt {} has images, but a Qwen2 LLM takes text only (use the chat model)",
                prompt.prompt_index
            )));
        }
        let ids = Tensor::new(prompt.token_ids.as_slice(), &self.device)?.unsqueeze(0)?; // (1, T)
        let mut cache = self.model.new_cache();
        let model = self.model;
        let last = self.device.with_context(|| -> Result<Vec<f32>> {
            Ok(model
                .forward_step_last_ids(&ids, None, &mut cache)? // (1, V)
                .squeeze(0)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?) // (V)
        })?;
        cache.select_rows(&vec![0; rows])?; // the prompt's keys/values, once per row of the group
        Ok((last, ShardedCache::single(cache, self.plan)))
    }

    fn decode_step(&self, tokens: &[u32], cache: &mut Self::Cache) -> Result<Vec<Vec<f32>>> {
        if tokens.len() != cache.batch_size() {
            return Err(crate::Error::msg(format!(
                "generate: {} tokens for {} running rows in a decode step",
                tokens.len(),
                cache.batch_size()
            )));
        }
        let per_shard = cache.scatter(tokens)?;
        // On the CPU: the step's parallel sections run in candle's own thread pool, kept warm between them;
        // shards run side by side there, each op of a shard splitting further when a thread is free.
        let logits = self.device.with_context(|| {
            cache
                .shards_mut()
                .par_iter_mut()
                .zip(per_shard)
                .map(|(shard, tokens)| self.step_shard(tokens, shard))
                .collect::<Result<Vec<_>>>()
        })?;
        cache.gather(logits)
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
