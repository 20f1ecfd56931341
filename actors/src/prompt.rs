//! Prompts as the model takes them, shared by the policy generator and the optimizer.
//!
//! The controller encodes each dataset prompt once (chat template applied, `<IMG_CONTEXT>` expanded, image
//! tiles preprocessed) and puts it in the [`PromptBank`]. Messages then carry only a [`PromptId`]: the
//! generator reads the prompt to sample from it, the optimizer reads it again to recompute log-probs, possibly
//! steps later when the Selective Sample Buffer replays the group.

use std::sync::Arc;

use candle_core::Tensor;
use dashmap::DashMap;

use crate::rl::PromptId;

/// One prompt, ready for the policy model.
#[derive(Debug, Clone)]
pub struct EncodedPrompt {
    /// Which prompt of the pool.
    pub id: PromptId,
    /// Prompt token ids, chat template applied, every image's `<IMG_CONTEXT>` run expanded.
    pub token_ids: Vec<u32>,
    /// The images in the model's dtype and device, or none for a text-only prompt: InternVL-chat tiles
    /// `(tiles, 3, S, S)`, or Qwen2.5-VL's flattened patches `(patches, C * T * P * P)`.
    pub pixel_values: Option<Tensor>,
    /// Qwen2.5-VL: each image's `(t, h, w)` patch grid, in prompt order; empty otherwise.
    pub image_grids: Vec<[usize; 3]>,
    /// The reference answer (for the verifiers).
    pub answer: String,
    /// Which verifier judges the responses.
    pub verifier: String,
    /// The prompt's text as the user wrote it (for verifiers and logs).
    pub question: String,
    /// The dataset line's `meta` object, if any (for verifiers).
    pub meta: Option<serde_json::Value>,
}

/// The encoded prompts of a run, by id.
///
/// A `DashMap`: the controller inserts while generator and optimizer threads read concurrently; a sharded
/// map keeps readers from queueing behind one lock. Values are `Arc` so a reader holds a prompt without
/// holding a shard lock.
#[derive(Debug, Clone, Default)]
pub struct PromptBank {
    prompts: Arc<DashMap<PromptId, Arc<EncodedPrompt>>>,
}

impl PromptBank {
    /// An empty bank.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a prompt.
    pub fn insert(&self, prompt: EncodedPrompt) {
        self.prompts.insert(prompt.id, Arc::new(prompt));
    }

    /// The prompt `id`, or an error naming it.
    pub fn get(&self, id: PromptId) -> crate::Result<Arc<EncodedPrompt>> {
        self.prompts
            .get(&id)
            .map(|entry| Arc::clone(entry.value()))
            .ok_or_else(|| crate::Error::msg(format!("prompt {} is not in the prompt bank", id.0)))
    }

    /// Whether prompt `id` is present.
    pub fn contains(&self, id: PromptId) -> bool {
        self.prompts.contains_key(&id)
    }

    /// Number of prompts.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Whether the bank is empty.
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }
}
