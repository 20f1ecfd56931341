//! What a checkpoint holds besides the weights, and writing one.
//!
//! `checkpoints/step-N/` = `model/` (HF layout, from the optimizer) + `optimizer/` (AdamW moments, reference,
//! version, MPO's BCO running mean) + `trainer_state.json`: the step, the data cursor, and the sections `loop` ([`LoopState`]),
//! `ssb` (the sample buffer's snapshot, RNG position included) and `monitor` (the hallucination monitor and
//! its calibration log). [`crate::checkpoint::RunDir::write_checkpoint`] writes it under a temporary name and
//! renames it, so a crash never leaves a half checkpoint.

use std::path::PathBuf;

use r1v2_actors::actor::monitor::MonitorSnapshot;
use r1v2_actors::protocol::{SaveState, Snapshot};
use r1v2_actors::rl::config::Calibration;
use serde::{Deserialize, Serialize};

use super::Controller;
use crate::checkpoint::TrainerState;
use crate::Result;

/// Name prefix of the scratch directory the optimizer saves into before the checkpoint's rename.
const SCRATCH_PREFIX: &str = ".save-";

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

impl Controller {
    /// Writes checkpoint `step-N` for the current state (N = completed steps).
    pub async fn checkpoint(&mut self) -> Result<PathBuf> {
        let step = self.state.step;
        let buffer = self
            .watchdog
            .call(
                "sample_buffer",
                "Snapshot",
                self.actors.buffer.send(Snapshot),
            )
            .await?;
        let monitor = self
            .watchdog
            .call(
                "hallucination_monitor",
                "MonitorSnapshot",
                self.actors.monitor.send(MonitorSnapshot),
            )
            .await?;
        let mut trainer_state = TrainerState::new(step, self.loader.cursor());
        trainer_state.set_section("loop", &self.state)?;
        trainer_state.set_section("ssb", &buffer)?;
        trainer_state.set_section("monitor", &monitor)?;
        // The optimizer writes the weights into a directory we name; the run dir then renames it.
        // (In the run root, beside checkpoints/: `write_checkpoint` clears temporaries inside checkpoints/.
        // A leftover from a killed run is removed by `clean_scratch` at the next start.)
        let scratch = tempfile::Builder::new()
            .prefix(SCRATCH_PREFIX)
            .tempdir_in(self.run.root())
            .map_err(|source| crate::Error::Io {
                path: self.run.root().into(),
                source,
            })?;
        let saved_version = self
            .watchdog
            .call(
                "optimizer",
                "SaveState",
                self.actors.optimizer.send(SaveState {
                    dir: scratch.path().to_path_buf(),
                }),
            )
            .await??;
        if saved_version != self.state.policy_version {
            return Err(crate::Error::Msg(format!(
                "checkpoint: the optimizer saved policy version {saved_version}, the controller is at {}",
                self.state.policy_version
            )));
        }
        let dir = self
            .run
            .write_checkpoint(step, self.config.run.keep_checkpoints, |tmp| {
                for entry in
                    std::fs::read_dir(scratch.path()).map_err(|source| crate::Error::Io {
                        path: scratch.path().into(),
                        source,
                    })?
                {
                    let entry = entry.map_err(|source| crate::Error::Io {
                        path: scratch.path().into(),
                        source,
                    })?;
                    let target = tmp.join(entry.file_name());
                    std::fs::rename(entry.path(), &target).map_err(|source| crate::Error::Io {
                        path: target.clone(),
                        source,
                    })?;
                }
                trainer_state.save(tmp)
            })?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }
}
