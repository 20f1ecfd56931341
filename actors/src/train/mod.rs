//! Training the policy: AdamW, the learning-rate schedule, gradient clipping, response log-probs on the chat
//! model, and the [`PolicyTrainer`] the Optimizer actor drives (GRPO and MPO updates with gradient
//! accumulation, a frozen reference that shares the frozen modules, checkpoints).
//!
//! | file | what |
//! |---|---|
//! | `batch.rs` | what an update takes and returns: [`TrainBatch`], [`MpoPair`], [`SftExample`], [`PolicyWeights`], [`UpdateReport`] |
//! | `config.rs` | [`OptimConfig`], the `[optimizer]` section |
//! | `adamw.rs` | [`AdamW`] with torch semantics and a checkpointable state |
//! | `schedule.rs` | warmup + cosine learning rate, global-norm clipping |
//! | `logprobs.rs` | [`ResponseScorer`]: per-token log-probs of (prompt, response) rows on the policy (InternVL-chat or Qwen2.5-VL) |
//! | `trainer.rs` | [`PolicyTrainer`]: policy, shared frozen reference, AdamW, version, checkpoints |
//! | `grpo_step.rs`, `mpo_step.rs`, `sft_step.rs` | its GRPO, MPO and SFT updates with gradient accumulation (GRPO also data-parallel) |
//! | `collective.rs` | [`Collective`] all-reduce for data-parallel replicas; [`LocalCollective`] between threads |

pub mod adamw;
pub mod batch;
pub mod collective;
pub mod config;
mod grpo_step;
pub mod logprobs;
mod mpo_step;
pub mod reward_model;
pub mod schedule;
mod sft_step;
pub mod trainer;

pub use adamw::{AdamW, AdamWParams, AdamWState};
pub use batch::{MpoPair, PolicyWeights, SftExample, TrainBatch, UpdateReport};
pub use collective::{Collective, LocalCollective};
pub use config::OptimConfig;
pub use logprobs::{ResponseLogprobs, ResponseRow, ResponseScorer};
pub use trainer::{Accumulated, PolicyTrainer, MODEL_DIR, OPTIMIZER_DIR};
