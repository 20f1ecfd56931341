//! Writing checkpoint `step-N`: the buffer's and the monitor's state, the optimizer's save into a scratch
//! directory, then one atomic rename by the run directory (see [`crate::trainer::state`] for the contents).

use std::path::PathBuf;

use r1v2_actors::protocol::{ActorName, MonitorSnapshot, SaveState, Snapshot};

use super::Controller;
use crate::checkpoint::TrainerState;
use crate::trainer::state::SCRATCH_PREFIX;
use crate::Result;

impl Controller {
    /// Writes checkpoint `step-N` for the current state (N = completed steps).
    pub(super) async fn checkpoint(&mut self) -> Result<PathBuf> {
        let step = self.state.step;
        let buffer = self
            .ask(ActorName::SampleBuffer, &self.actors.buffer, Snapshot)
            .await?;
        let monitor = self
            .ask(
                ActorName::HallucinationMonitor,
                &self.actors.monitor,
                MonitorSnapshot,
            )
            .await??;
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
            .ask(
                ActorName::Optimizer,
                // The shards hold the same weights and state: the first one saves.
                &self.actors.optimizers[0],
                SaveState {
                    dir: scratch.path().to_path_buf(),
                },
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
