//! [`StepModel`] for the Qwen2 LLM (`model::qwen2::ForCausalLM`) over its KV cache (`model::kv_cache`).
//!
//! That cache grows by concatenation and exposes no way to copy or drop rows, so for now:
//! - `prefill` runs the prompt once per row of the group (batch `rows`, identical rows) instead of once;
//! - a finished row stays in the cache and is fed a padding slot (mask 0) each step, which the cache's
//!   layout keeps out of every other row's attention, so results are exact but its compute is not saved.
//!
//! Both become real savings once `KvCache` can select / repeat rows (index_select on the batch axis of every
//! layer's keys and values plus its per-row bookkeeping): `prefill` then runs batch 1 and repeats row 0, and
//! `select_rows` drops the finished rows.

use candle_core::{DType, Device, IndexOp, Tensor};

use super::engine::StepModel;
use crate::model::kv_cache::KvCache;
use crate::model::qwen2::ForCausalLM;
use crate::{Error, Result};

/// A Qwen2 model driven by the generation engine.
pub struct Qwen2Generator<'a> {
    model: &'a ForCausalLM,
    device: Device,
}

impl<'a> Qwen2Generator<'a> {
    /// Drives `model`, whose weights live on `device`.
    pub fn new(model: &'a ForCausalLM, device: &Device) -> Self {
        Self {
            model,
            device: device.clone(),
        }
    }
}

/// The KV cache of a group's rows and which of them still run.
pub struct Qwen2Rows {
    cache: KvCache,
    /// Per cached row: whether it still runs (finished rows are fed padding).
    running: Vec<bool>,
}

impl StepModel for Qwen2Generator<'_> {
    type Cache = Qwen2Rows;

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn max_sequence_len(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    fn prefill(&self, prompt: &[u32], rows: usize) -> Result<(Vec<f32>, Self::Cache)> {
        let len = prompt.len();
        let ids = Tensor::new(prompt, &self.device)?
            .unsqueeze(0)? // (1, T)
            .repeat((rows, 1))?; // (rows, T)
        let mut cache = self.model.new_cache();
        let logits = self.model.forward_step_ids(&ids, None, &mut cache)?; // (rows, T, V)
        let last = logits
            .i((0, len - 1))?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?; // (V)
        Ok((
            last,
            Qwen2Rows {
                cache,
                running: vec![true; rows],
            },
        ))
    }

    fn decode_step(&self, tokens: &[u32], rows: &mut Self::Cache) -> Result<Vec<Vec<f32>>> {
        let physical = rows.running.len();
        let mut ids = Vec::with_capacity(physical);
        let mut mask = Vec::with_capacity(physical);
        let mut next = tokens.iter();
        for &running in &rows.running {
            if running {
                let token = next.next().ok_or_else(|| {
                    Error::msg("generate: fewer tokens than running rows in a decode step")
                })?;
                ids.push(*token);
                mask.push(1f32);
            } else {
                ids.push(0);
                mask.push(0f32);
            }
        }
        if next.next().is_some() {
            return Err(Error::msg(
                "generate: more tokens than running rows in a decode step",
            ));
        }
        let ids = Tensor::from_vec(ids, (physical, 1), &self.device)?; // (B, 1)
        let all_running = rows.running.iter().all(|&r| r);
        let mask = if all_running {
            None
        } else {
            Some(Tensor::from_vec(mask, (physical, 1), &self.device)?) // (B, 1)
        };
        let logits = self
            .model
            .forward_step_ids(&ids, mask.as_ref(), &mut rows.cache)? // (B, 1, V)
            .squeeze(1)? // (B, V)
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        Ok(logits
            .into_iter()
            .zip(&rows.running)
            .filter_map(|(row, &running)| running.then_some(row))
            .collect())
    }

    fn select_rows(&self, rows: &mut Self::Cache, keep: &[usize]) -> Result<()> {
        let physical: Vec<usize> = (0..rows.running.len())
            .filter(|&r| rows.running[r])
            .collect();
        let mut running = vec![false; rows.running.len()];
        for &logical in keep {
            let &r = physical.get(logical).ok_or_else(|| {
                Error::msg(format!(
                    "generate: row {logical} kept, only {} run",
                    physical.len()
                ))
            })?;
            running[r] = true;
        }
        rows.running = running;
        Ok(())
    }
}
