//! Every message the actors exchange (design.md "Actors"), one struct per message, and the actors' names.
//!
//! | message | to (handler file) | reply | sent by |
//! |---|---|---|---|
//! | [`GenerateGroups`] | PolicyGenerator (actor/policy_generator.rs) | [`Rollouts`] | controller: each step, probes |
//! | [`SyncWeights`] | PolicyGenerator (actor/policy_generator.rs) | version held | controller: after each update |
//! | [`Verify`] | RuleVerifier (actor/rule_verifier.rs) | [`Verdicts`] | controller: each step, probes |
//! | [`Score`] | RewardModel (actor/reward_model.rs) | [`RmScores`] | controller: each step |
//! | [`ScoreWithImages`] | RewardModel (actor/reward_model.rs) | [`RmScores`] | controller: each step, for a reward model that reads images (Qwen2.5-VL) |
//! | [`ScoredGroups`] | SampleBuffer (actor/sample_buffer.rs) | [`Accepted`] | controller: each GRPO step |
//! | [`NextBatch`] | SampleBuffer (actor/sample_buffer.rs) | [`TrainBatch`] | controller: each GRPO step |
//! | [`Snapshot`] | SampleBuffer (actor/sample_buffer.rs) | [`BufferSnapshot`] | controller: checkpoints |
//! | [`ObserveStep`] | MonitorActor (actor/monitor.rs) | [`MonitorReport`] | controller: each RL step |
//! | [`ObserveProbe`] | MonitorActor (actor/monitor.rs) | `()` | controller: when the probe set is due |
//! | [`MonitorSnapshot`] | MonitorActor (actor/monitor.rs) | the monitor's state | controller: checkpoints |
//! | [`TrainSft`] / [`TrainMpo`] / [`TrainGrpo`] | Optimizer (actor/optimizer.rs) | [`UpdateReport`] | controller: each step |
//! | [`RefreshReference`] | Optimizer (actor/optimizer.rs) | version | controller: at a stage's start, MPO rounds |
//! | [`ResetOptimizer`] | Optimizer (actor/optimizer.rs) | version | controller: at a stage's start, with `optimizer.reset_each_stage` |
//! | [`CurrentWeights`] | Optimizer (actor/optimizer.rs) | [`PolicyWeights`] | controller: syncing the generators before the first step |
//! | [`SaveState`] | Optimizer (actor/optimizer.rs) | version written | controller: checkpoints |
//! | [`Heartbeat`] | every actor | [`HeartbeatReply`] | the watchdog (src/trainer/watchdog.rs) |
//! | [`Shutdown`] | every actor | `()` | controller: the end of a run, in order |
//!
//! A group's data travels as one [`Group`] (crate::rl::group) from the generator to the optimizer.
//! Fallible requests reply with [`crate::Result`]: the error names the request's item that could not be
//! used. The batch and report types of the updates belong to [`crate::train`] and are re-exported here.

use actix::{Message, MessageResponse};
use serde::{Deserialize, Serialize};

use crate::monitor::signals::StepObservation;
use crate::monitor::HallucinationMonitor;
use crate::rl::advantages::GroupKindCounts;
use crate::rl::config::Calibration;
use crate::rl::ssb::SsbState;
use crate::rl::PromptId;
use crate::verifiers::registry::VerifyRequest;
use crate::verifiers::{HallucinationFlags, Verdict};

pub use crate::rl::{Group, Sample};
pub use crate::train::{MpoPair, PolicyWeights, SftExample, TrainBatch, UpdateReport};

/// The actors, by role: the names heartbeats, logs and the watchdog use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActorName {
    /// Samples groups with a snapshot of the policy.
    PolicyGenerator,
    /// The rule verifier pool.
    RuleVerifier,
    /// The frozen reward model.
    RewardModel,
    /// The Selective Sample Buffer.
    SampleBuffer,
    /// The hallucination monitor.
    HallucinationMonitor,
    /// The optimizer (policy trainer).
    Optimizer,
}

impl ActorName {
    /// The snake-case name (`policy_generator`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PolicyGenerator => "policy_generator",
            Self::RuleVerifier => "rule_verifier",
            Self::RewardModel => "reward_model",
            Self::SampleBuffer => "sample_buffer",
            Self::HallucinationMonitor => "hallucination_monitor",
            Self::Optimizer => "optimizer",
        }
    }
}

impl std::fmt::Display for ActorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message's name, for heartbeats, logs and the watchdog.
pub trait Named {
    /// The message's type name.
    const NAME: &'static str;
}

macro_rules! named {
    ($($message:ident),* $(,)?) => {
        $(impl Named for $message {
            const NAME: &'static str = stringify!($message);
        })*
    };
}

named!(
    GenerateGroups,
    SyncWeights,
    Verify,
    Score,
    ScoreWithImages,
    ScoredGroups,
    NextBatch,
    Snapshot,
    ObserveStep,
    ObserveProbe,
    MonitorSnapshot,
    TrainSft,
    TrainMpo,
    TrainGrpo,
    RefreshReference,
    ResetOptimizer,
    CurrentWeights,
    SaveState,
    Heartbeat,
    Shutdown,
);

// ---- Policy generator -------------------------------------------------------------------------------

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
    /// The groups (not scored yet).
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

// ---- Rule verifier and reward model ---------------------------------------------------------------------

/// Rule-verify these responses; the reply has one verdict per item, in order.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<Verdicts>")]
pub struct Verify {
    /// The requests (verifier name, prompt, response, reference answer, meta).
    pub items: Vec<VerifyRequest>,
}

/// Reply to [`Verify`]: `verdicts[i]` judges `items[i]`. A verifier that failed, panicked or timed out gives a
/// zero-score verdict carrying its [`crate::verifiers::VerifyFailure`].
#[derive(Debug, Clone, PartialEq)]
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

/// [`Score`] with each sequence's images (`images[i]` for `sequences[i]`, `None` for text only), which fill
/// the sequence's `<|image_pad|>` runs in order. A Qwen2 value head reads text only and refuses images.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<RmScores>")]
pub struct ScoreWithImages {
    /// The sequences.
    pub sequences: Vec<ScoreSequence>,
    /// One entry per sequence.
    pub images: Vec<Option<crate::model::qwen2_5_vl::Images>>,
}

/// Reply to [`Score`] / [`ScoreWithImages`]: one raw (unnormalised) scalar per sequence, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RmScores {
    /// The scores.
    pub scores: Vec<f32>,
}

// ---- Sample buffer -------------------------------------------------------------------------------------

/// Groups whose rewards and advantages are known, for the sample buffer.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<Accepted>")]
pub struct ScoredGroups {
    /// The groups.
    pub groups: Vec<Group>,
}

/// Reply to [`ScoredGroups`]: how many groups were kept and the kinds of all of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    /// Informative groups kept for the next batch.
    pub kept: usize,
    /// Kinds of the received groups (the zero-advantage ones were dropped).
    pub kinds: GroupKindCounts,
}

/// Assemble the next training batch of `target` groups for the policy at `policy_version`; the reply is a
/// [`TrainBatch`] (fresh informative groups first, then replayed ones).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "crate::Result<TrainBatch>")]
pub struct NextBatch {
    /// Wanted number of groups (> 0).
    pub target: usize,
    /// Version of the policy about to be updated.
    pub policy_version: u64,
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
    pub pending: Vec<Group>,
    /// Number of groups received since the last batch (zero-advantage ones included).
    pub pending_received: usize,
    /// Kinds of those groups.
    pub pending_kinds: GroupKindCounts,
}

// ---- Hallucination monitor --------------------------------------------------------------------------------

/// A training step's observation.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<MonitorReport>")]
pub struct ObserveStep {
    /// The training step.
    pub step: u64,
    /// Its flags and samples.
    pub observation: StepObservation,
}

/// A probe-set run's flags, one per probe response that carries them.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<()>")]
pub struct ObserveProbe {
    /// The training step it ran at.
    pub step: u64,
    /// The flags.
    pub flags: Vec<HallucinationFlags>,
}

/// Ask for the monitor's whole state (for a checkpoint).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "crate::Result<HallucinationMonitor>")]
pub struct MonitorSnapshot;

/// Reply to [`ObserveStep`].
#[derive(Debug, Clone)]
pub struct MonitorReport {
    /// `(metric name, value)`, every key on every step (see `HallucinationMonitor::metrics`).
    pub metrics: Vec<(&'static str, f64)>,
    /// A new calibration for the reward combiner, when the monitor moved it at this step.
    pub calibrate: Option<CalibrationChange>,
}

/// New RM threshold / weight for the reward combiner (the controller applies it from the next step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationChange {
    /// The new calibration.
    pub calibration: Calibration,
    /// Why it changed (logged).
    pub reason: String,
}

// ---- Optimizer ---------------------------------------------------------------------------------------------

/// Run one supervised update (token-mean negative log-likelihood of the responses) on these examples.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<UpdateReport>")]
pub struct TrainSft {
    /// The examples.
    pub examples: Vec<SftExample>,
    /// Multiplies the schedule's learning rate for this update (the stage's `lr_scale`; 1 = as scheduled).
    pub lr_scale: f64,
}

/// Run one GRPO update (with gradient accumulation over micro-batches) on this batch.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<UpdateReport>")]
pub struct TrainGrpo {
    /// The batch from the sample buffer.
    pub batch: TrainBatch,
    /// Multiplies the schedule's learning rate for this update (the stage's `lr_scale`; 1 = as scheduled).
    pub lr_scale: f64,
}

/// Run one MPO update on these pairs.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<UpdateReport>")]
pub struct TrainMpo {
    /// The pairs.
    pub pairs: Vec<MpoPair>,
    /// Multiplies the schedule's learning rate for this update (the stage's `lr_scale`; 1 = as scheduled).
    pub lr_scale: f64,
}

/// Replace the optimizer's AdamW by a fresh one (zero moments) for the next stage (`optimizer.reset_each_stage`).
/// Replies the policy version (unchanged: the weights do not move).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "crate::Result<u64>")]
pub struct ResetOptimizer;

/// Make the current policy the frozen reference. Replies the policy version it now is.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "crate::Result<u64>")]
pub struct RefreshReference;

/// The trainable weights at the current version.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "crate::Result<PolicyWeights>")]
pub struct CurrentWeights;

/// Write the trainable state to `dir`: the model in the HF layout under `dir/model`, the optimizer state
/// beside it. The reply is the version written.
#[derive(Debug, Clone, Message)]
#[rtype(result = "crate::Result<u64>")]
pub struct SaveState {
    /// The (temporary) checkpoint directory.
    pub dir: std::path::PathBuf,
}

// ---- Every actor --------------------------------------------------------------------------------------------

/// Are you alive, and what did you last do?
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "HeartbeatReply")]
pub struct Heartbeat;

/// Reply to [`Heartbeat`].
#[derive(Debug, Clone, PartialEq, MessageResponse)]
pub struct HeartbeatReply {
    /// The actor.
    pub actor: ActorName,
    /// Name of the last message it handled (before this heartbeat), if any.
    pub last_message: Option<&'static str>,
    /// How many messages it handled (heartbeats excluded).
    pub handled: u64,
    /// How many times it was restarted after a panic.
    pub restarts: u32,
}

/// Close the actor: it refuses work queued after this message with an error, and the reply says it is
/// closed. The controller sends it to every actor at the end of a run, in pipeline order, and awaits each
/// reply before dropping the addresses (which ends the actors' threads). A pool's workers share the flag.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Shutdown;
