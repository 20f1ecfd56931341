//! The RL algorithms of R1V2 as pure functions (no actix): GRPO, MPO, hybrid reward, Selective Sample Buffer.
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | serde configs of every algorithm, with the documented defaults |
//! | [`advantages`] | group-relative advantages, zero-advantage groups by kind |
//! | [`group`] | the one group type: a prompt's samples and what each stage learned about them |
//! | [`scoring`] | a step's scoring as one pure function: verdicts + RM scores -> rewards, advantages, metrics |
//! | [`grpo`] | GRPO clipped surrogate + KL (k1/k2/k3), loss aggregations, metrics |
//! | [`mpo`] | MPO losses (DPO sigmoid, BCO pair, SFT), pair mining, reference cache |
//! | [`reward`] | the hybrid reward with a calibrated, capped RM term |
//! | [`ssb`] | the Selective Sample Buffer (priority replay of non-zero-advantage groups) |

pub mod advantages;
pub mod config;
pub mod group;
pub mod grpo;
pub mod mpo;
pub mod reward;
pub mod scoring;
pub mod ssb;

use serde::{Deserialize, Serialize};

pub use group::{Group, Sample};

/// Identifies a prompt of the training pool (its index in the dataset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PromptId(pub u64);
