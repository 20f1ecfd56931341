//! What an update takes and gives back: the batches of the three stages, the published weights and the
//! update's report. [`crate::protocol`] re-exports them for the Optimizer's messages, so training code never
//! imports actor messages.

use serde::{Deserialize, Serialize};

use crate::rl::ssb::SsbMetrics;
use crate::rl::{Group, PromptId};

/// The trainable tensors of one policy version, by checkpoint name: what the optimizer publishes and the
/// generators load. Cheap to clone (the tensors are shared).
#[derive(Debug, Clone)]
pub struct PolicyWeights {
    /// The policy version these weights are (0 = the initial checkpoint; +1 per optimizer step).
    pub version: u64,
    /// `(checkpoint name, tensor)` for every trainable parameter.
    pub tensors: std::sync::Arc<Vec<(String, candle_core::Tensor)>>,
}

impl PolicyWeights {
    /// Bytes of the tensors (what a sync moves).
    pub fn bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// A GRPO batch: fresh informative groups first, then replayed ones (the sample buffer's reply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainBatch {
    /// The policy version the batch was assembled for.
    pub policy_version: u64,
    /// The groups.
    pub groups: Vec<Group>,
    /// How many of `groups` (the last ones) were replayed from the buffer.
    pub replayed: usize,
    /// The buffer's metrics for this batch (ssb/*).
    pub metrics: SsbMetrics,
}

/// One preference pair for an MPO update: two responses to the same prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MpoPair {
    /// The prompt (in the prompt bank).
    pub prompt_id: PromptId,
    /// The chosen response's token ids.
    pub chosen: Vec<u32>,
    /// The rejected response's token ids.
    pub rejected: Vec<u32>,
}

/// One supervised example: a prompt and the response to learn (the SFT warm start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftExample {
    /// The prompt (in the prompt bank).
    pub prompt_id: PromptId,
    /// The target response's token ids (end-of-turn token included).
    pub response: Vec<u32>,
}

/// What one update did: the new policy and the update's metrics.
#[derive(Debug, Clone)]
pub struct UpdateReport {
    /// The weights after the update (`weights.version` = the new version).
    pub weights: PolicyWeights,
    /// Metrics by design.md name: `actor/pg_loss`, `actor/kl`, `actor/clipfrac`, `actor/entropy`,
    /// `actor/grad_norm`, `actor/lr` for GRPO; `mpo/dpo`, `mpo/bco`, `mpo/sft`, `mpo/delta`,
    /// `actor/grad_norm`, `actor/lr` for MPO; `sft/nll` and the same two for SFT.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Response tokens the update trained on.
    pub tokens: usize,
}
