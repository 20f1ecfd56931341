//! r1v2-actors: the actors of the R1V2 trainer and everything they compute with.
//!
//! | module | what it holds |
//! |---|---|
//! | [`model`] | the R1V model family: Qwen2 LLM, InternViT, the `mlp1` adapter, the chat model, Qwen2.5-VL, the policy of either family, value head, HF checkpoint I/O |
//! | [`verifiers`] | rule-based verifiers (math, choice, format, code, external plugins) behind the [`verifiers::Verifier`] trait |
//! | [`generate`] | batched grouped sampling for the policy generator: logits processors, stop strings, the engine |
//! | [`monitor`] | the hallucination monitor and reward calibration as pure state |
//! | [`rl`] | the RL algorithms as pure functions: GRPO, MPO, hybrid reward, Selective Sample Buffer |
//! | [`train`] | the policy trainer: AdamW, schedule, clipping, response log-probs, GRPO and MPO updates |
//! | [`prompt`] | encoded prompts shared by generator and optimizer ([`prompt::PromptBank`]) |
//! | [`protocol`] | the typed messages the actors exchange |
//! | [`actor`] | the actix actors: rule verifier pool, reward model, sample buffer, optimizer |
//! | [`device`] | device names (`cpu`, `cuda:N`) and the local GPUs |
//! | [`error`] | the crate's error type |

pub mod actor;
pub mod device;
pub mod error;
pub mod generate;
pub mod model;
pub mod monitor;
pub mod prompt;
pub mod protocol;
pub mod rl;
pub mod train;
pub mod verifiers;

pub use error::{Error, Result};
