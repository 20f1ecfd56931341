//! `r1v2 train-rm`: Bradley-Terry training of a reward model (a Qwen2 value head, or Skywork-VL Reward's
//! Qwen2.5-VL + value head) on preference pairs, with checkpoints, resume and held-out pairwise accuracy.
//!
//! | file | what |
//! |---|---|
//! | `config.rs` | [`RmConfig`]: `[model]`, `[data]`, `[train]` |
//! | `data.rs` | the pairs JSONL reader (bad lines name `file:line`) and [`PairEncoder`] |
//! | `run.rs` | the loop: schedule, batch, update, evaluate, log, checkpoint |

pub mod config;
pub mod data;
pub mod run;

pub use config::RmConfig;
pub use data::{read_pairs, PairEncoder, PairRecord};
pub use run::{train_reward_model, RmRunSummary};
