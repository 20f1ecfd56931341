//! The typed messages the actors exchange (design.md "Actors"), one struct per message and per payload.
//!
//! | message | to | reply |
//! |---|---|---|
//! | [`Verify`] | RuleVerifier | [`Verdicts`] |
//! | [`Score`] | RewardModel | [`RmScores`] |
//! | [`ScoredGroups`] | SampleBuffer | [`Accepted`] |
//! | [`NextBatch`] | SampleBuffer | [`TrainBatch`] |
//! | [`Snapshot`] | SampleBuffer | [`BufferSnapshot`] |
//! | [`Calibrate`] | the reward combiner | `()` |
//! | [`Heartbeat`] | every actor | [`HeartbeatReply`] |
//! | [`Shutdown`] | SampleBuffer | `()` |
//!
//! [`Rollout`] and [`Group`] are what a generator produces; a group becomes a [`SampledGroup`] once its
//! rewards and advantages are known. Fallible requests reply with [`crate::Result`]: the error names the
//! request's item that could not be used.

use actix::{Message, MessageResponse};
use serde::{Deserialize, Serialize};

use crate::rl::advantages::GroupKindCounts;
use crate::rl::config::Calibration;
use crate::rl::ssb::{SampledGroup, SsbMetrics, SsbState};
use crate::rl::PromptId;
use crate::verifiers::registry::VerifyRequest;
use crate::verifiers::Verdict;

/// Why a generator stopped a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// An end-of-sequence / stop token was sampled.
    Stop,
    /// The response reached the maximum number of new tokens.
    Length,
}

/// One sampled response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The prompt it answers.
    pub prompt_id: PromptId,
    /// Its index among the prompt's G samples.
    pub sample_index: u32,
    /// Response token ids (the prompt excluded).
    pub token_ids: Vec<u32>,
    /// Log-prob of each response token under the behaviour policy (same length as `token_ids`).
    pub behaviour_logprobs: Vec<f32>,
    /// The decoded response.
    pub text: String,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Version of the policy that sampled it.
    pub policy_version: u64,
}

/// The G rollouts of one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// The prompt.
    pub prompt_id: PromptId,
    /// The responses, in sample-index order.
    pub rollouts: Vec<Rollout>,
}

/// Rule-verify these responses; the reply has one verdict per item, in order.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Verdicts")]
pub struct Verify {
    /// The requests (verifier name, prompt, response, reference answer, meta).
    pub items: Vec<VerifyRequest>,
}

/// Reply to [`Verify`]: `verdicts[i]` judges `items[i]`. A verifier that failed, panicked or timed out gives a
/// zero-score verdict whose reason says so.
#[derive(Debug, Clone, PartialEq, MessageResponse)]
pub struct Verdicts {
    /// One verdict per request.
    pub verdicts: Vec<Verdict>,
}

/// One sequence for the reward model: token ids and their attention mask (1 = token, 0 = padding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreSequence {
    /// Prompt + response token ids.
    pub token_ids: Vec<u32>,
    /// Same length as `token_ids`; at least one 1.
    pub attention_mask: Vec<u32>,
}

/// Score these sequences with the frozen reward model; sequences may have different lengths.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<RmScores>")]
pub struct Score {
    /// The sequences.
    pub sequences: Vec<ScoreSequence>,
}

/// Reply to [`Score`]: one raw (unnormalised) scalar per sequence, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RmScores {
    /// The scores.
    pub scores: Vec<f32>,
}

/// Groups whose rewards and advantages are known, for the sample buffer.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<Accepted>")]
pub struct ScoredGroups {
    /// The groups.
    pub groups: Vec<SampledGroup>,
}

/// Reply to [`ScoredGroups`]: how many groups were kept and the kinds of all of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    /// Informative groups kept for the next batch.
    pub kept: usize,
    /// Kinds of the received groups (the zero-advantage ones were dropped).
    pub kinds: GroupKindCounts,
}

/// Assemble the next training batch of `target` groups for the policy at `policy_version`.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "crate::Result<TrainBatch>")]
pub struct NextBatch {
    /// Wanted number of groups (> 0).
    pub target: usize,
    /// Version of the policy about to be updated.
    pub policy_version: u64,
}

/// Reply to [`NextBatch`]: fresh informative groups first, then replayed ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainBatch {
    /// The policy version the batch was assembled for.
    pub policy_version: u64,
    /// The groups.
    pub groups: Vec<SampledGroup>,
    /// How many of `groups` (the last ones) were replayed from the buffer.
    pub replayed: usize,
    /// The buffer's metrics for this batch (ssb/*).
    pub metrics: SsbMetrics,
}

/// Ask the sample buffer for its whole state, for a checkpoint.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "BufferSnapshot")]
pub struct Snapshot;

/// Reply to [`Snapshot`]: everything the sample buffer needs to resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, MessageResponse)]
pub struct BufferSnapshot {
    /// The Selective Sample Buffer, RNG position included.
    pub ssb: SsbState,
    /// Informative groups received since the last batch.
    pub pending: Vec<SampledGroup>,
    /// Number of groups received since the last batch (zero-advantage ones included).
    pub pending_received: usize,
    /// Kinds of those groups.
    pub pending_kinds: GroupKindCounts,
}

/// New RM threshold / weight for the reward combiner (from the hallucination monitor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct Calibrate {
    /// The new calibration.
    pub calibration: Calibration,
    /// Why it changed (logged).
    pub reason: String,
}

/// Are you alive, and what did you last do?
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "HeartbeatReply")]
pub struct Heartbeat;

/// Reply to [`Heartbeat`].
#[derive(Debug, Clone, PartialEq, MessageResponse)]
pub struct HeartbeatReply {
    /// The actor's name.
    pub actor: &'static str,
    /// Name of the last message it handled (before this heartbeat), if any.
    pub last_message: Option<&'static str>,
    /// How many messages it handled (heartbeats excluded).
    pub handled: u64,
    /// How many times it was restarted after a panic.
    pub restarts: u32,
}

/// Close the actor: it refuses work queued after this message. actix restarts a supervised actor and a
/// `SyncArbiter` worker whenever they stop while addresses remain, so these actors end when their last address
/// is dropped; the sync pools (RuleVerifier, RewardModel) hold no state to close and take no `Shutdown`.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

// ---- Policy generator and optimizer -------------------------------------------------------------------

/// The trainable tensors of one policy version, by checkpoint name: what the optimizer publishes and the
/// generators load. Cheap to clone (the tensors are shared).
#[derive(Debug, Clone)]
pub struct PolicyWeights {
    /// The policy version these weights are (0 = the initial checkpoint; +1 per optimizer step).
    pub version: u64,
    /// `(checkpoint name, tensor)` for every trainable parameter.
    pub tensors: std::sync::Arc<Vec<(String, candle_core::Tensor)>>,
}

/// One prompt to sample a group for: which prompt of the [`crate::prompt::PromptBank`], and its position
/// in the run's stream of prompts (keys the random streams of its responses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRequest {
    /// The prompt.
    pub prompt_id: PromptId,
    /// Its index in the run's prompt stream (`generate::PromptInput::prompt_index`).
    pub prompt_index: u64,
}

/// Sample `n` responses for each prompt with the generator's current policy.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<Rollouts>")]
pub struct GenerateGroups {
    /// The prompts, in order.
    pub prompts: Vec<GroupRequest>,
    /// Responses per prompt (G).
    pub n: usize,
    /// Sampling parameters (seed included).
    pub params: crate::generate::SamplingParams,
}

/// Reply to [`GenerateGroups`]: one group per prompt, in order, each stamped with the policy version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollouts {
    /// The groups.
    pub groups: Vec<Group>,
    /// The policy version that sampled them.
    pub policy_version: u64,
    /// Response tokens generated.
    pub tokens: usize,
}

/// Load these weights; the reply is the version the generator now holds.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<u64>")]
pub struct SyncWeights {
    /// The weights.
    pub weights: PolicyWeights,
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

/// Run one supervised update (token-mean negative log-likelihood of the responses) on these examples.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<UpdateReport>")]
pub struct TrainSft {
    /// The examples.
    pub examples: Vec<SftExample>,
}

/// Run one GRPO update (with gradient accumulation over micro-batches) on this batch.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<UpdateReport>")]
pub struct TrainGrpo {
    /// The batch from the sample buffer.
    pub batch: TrainBatch,
}

/// Run one MPO update on these pairs.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<UpdateReport>")]
pub struct TrainMpo {
    /// The pairs.
    pub pairs: Vec<MpoPair>,
}

/// Reply to [`TrainGrpo`] / [`TrainMpo`]: the new policy and the update's metrics.
#[derive(Debug, Clone)]
pub struct UpdateReport {
    /// The weights after the update (`weights.version` = the new version).
    pub weights: PolicyWeights,
    /// Metrics by design.md name: `actor/pg_loss`, `actor/kl`, `actor/clipfrac`, `actor/entropy`,
    /// `actor/grad_norm`, `actor/lr` for GRPO; `mpo/dpo`, `mpo/bco`, `mpo/sft`, `mpo/delta`,
    /// `actor/grad_norm`, `actor/lr` for MPO.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Response tokens the update trained on.
    pub tokens: usize,
}

/// Write the trainable state to `dir`: the model in the HF layout under `dir/model`, the optimizer state
/// beside it. The reply is the version written.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<u64>")]
pub struct SaveState {
    /// The (temporary) checkpoint directory.
    pub dir: std::path::PathBuf,
}
