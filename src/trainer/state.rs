//! What a checkpoint holds besides the weights, and writing one.
//!
//! `checkpoints/step-N/` = `model/` (HF layout, from the optimizer) + `optimizer/` (AdamW moments, reference,
//! version, MPO's BCO running mean) + `trainer_state.json`: the step, the data cursor, and the sections `loop` ([`LoopState`]),
//! `ssb` (the sample buffer's snapshot, RNG position included) and `monitor` (the hallucination monitor and
//! its calibration log). [`crate::checkpoint::RunDir::write_checkpoint`] (called from the controller's `checkpoint.rs`) writes it under a temporary name and
//! renames it, so a crash never leaves a half checkpoint.

use r1v2_actors::rl::config::Calibration;
use serde::{Deserialize, Serialize};

/// Name prefix of the scratch directory the optimizer saves into before the checkpoint's rename.
pub(super) const SCRATCH_PREFIX: &str = ".save-";

/// Removes scratch directories a killed run left in `root`.
pub fn clean_scratch(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(SCRATCH_PREFIX)
        {
            tracing::warn!("removing the unfinished save {}", entry.path().display());
            if let Err(error) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(%error, "cannot remove {}", entry.path().display());
            }
        }
    }
}

/// The controller's own counters, saved in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopState {
    /// Completed steps.
    pub step: u64,
    /// The policy version the generator holds (= optimizer updates so far).
    pub policy_version: u64,
    /// Prompts handed out so far: the next prompt's `prompt_index` (keys its sampling streams).
    pub prompts_drawn: u64,
    /// The reward combiner's current calibration (moved by the hallucination monitor).
    pub calibration: Calibration,
    /// Rollouts dropped for staleness (async mode).
    pub stale_dropped: u64,
    /// Steps that had no informative group and so no update.
    pub skipped_updates: u64,
}

impl LoopState {
    /// The state of a fresh run.
    pub fn new(calibration: Calibration) -> Self {
        Self {
            step: 0,
            policy_version: 0,
            prompts_drawn: 0,
            calibration,
            stale_dropped: 0,
            skipped_updates: 0,
        }
    }
}
