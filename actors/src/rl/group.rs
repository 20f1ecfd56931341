//! The one group type of the pipeline: the G responses to one prompt, and what each stage learned about
//! them.
//!
//! A [`Group`] leaves the policy generator with its samples' tokens, behaviour log-probs, text and finish
//! reasons; [`super::scoring::score_groups`] fills in each sample's verdict, reward-model score, hybrid reward
//! and advantage; the sample buffer keeps it (and may replay it); the optimizer trains on it; MPO mines its
//! preference pair from it. Nothing is copied into another shape on the way.

use serde::{Deserialize, Serialize};

use super::advantages::{classify_group, GroupKind};
use super::PromptId;
use crate::generate::{FinishReason, Rollout};
use crate::verifiers::Verdict;

/// One response and what the stages found out about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Response token ids (the prompt excluded, stop token included).
    pub token_ids: Vec<u32>,
    /// Log-prob of each response token under the behaviour policy at temperature 1 (as long as
    /// `token_ids`): the denominator of GRPO's importance ratio.
    pub behaviour_logprobs: Vec<f32>,
    /// The decoded response.
    pub text: String,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// The rule verifier's verdict (scoring).
    pub verdict: Option<Verdict>,
    /// The reward model's raw score (scoring, when the run has a reward model).
    pub rm_score: Option<f64>,
    /// The hybrid reward (scoring; 0 before).
    pub reward: f64,
    /// The group-relative advantage (scoring; 0 before).
    pub advantage: f64,
    /// Whether the rule verifier passed it, when a verifier judged it (scoring).
    pub correct: Option<bool>,
}

impl Sample {
    /// A sample as the generator made it, not scored yet.
    pub fn generated(rollout: Rollout) -> Self {
        Self {
            behaviour_logprobs: rollout.behaviour_logprobs(),
            token_ids: rollout.token_ids,
            text: rollout.text.unwrap_or_default(),
            finish_reason: rollout.finish_reason,
            verdict: None,
            rm_score: None,
            reward: 0.0,
            advantage: 0.0,
            correct: None,
        }
    }

    /// A scored sample with only what an update needs (tests and tools that make batches by hand).
    pub fn scored(
        token_ids: Vec<u32>,
        behaviour_logprobs: Vec<f32>,
        reward: f64,
        advantage: f64,
        correct: Option<bool>,
    ) -> Self {
        Self {
            token_ids,
            behaviour_logprobs,
            text: String::new(),
            finish_reason: FinishReason::Length,
            verdict: None,
            rm_score: None,
            reward,
            advantage,
            correct,
        }
    }
}

/// The G responses of one prompt, sampled by policy version `policy_version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// The prompt.
    pub prompt_id: PromptId,
    /// Version of the policy that sampled the responses.
    pub policy_version: u64,
    /// The responses, in sample-index order.
    pub samples: Vec<Sample>,
}

impl Group {
    /// Mean |A_i| over the group.
    pub fn mean_abs_advantage(&self) -> f64 {
        let n = self.samples.len().max(1) as f64;
        self.samples.iter().map(|s| s.advantage.abs()).sum::<f64>() / n
    }

    /// What the group contributes to the gradient.
    pub fn kind(&self, zero_tolerance: f64) -> GroupKind {
        let adv: Vec<f64> = self.samples.iter().map(|s| s.advantage).collect();
        let correct: Option<Vec<bool>> = self.samples.iter().map(|s| s.correct).collect();
        classify_group(&adv, correct.as_deref(), zero_tolerance)
    }
}
