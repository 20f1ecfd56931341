//! One GRPO step (design.md "One GRPO step"), top to bottom.

use r1v2_actors::protocol::{ActorName, NextBatch, ScoredGroups, TrainBatch};

use super::{Controller, Update};
use crate::trainer::metrics::{BufferMetrics, StalenessMetrics, StepMetrics};
use crate::{Error, Result};

impl Controller {
    /// One GRPO step: sample -> verify + score -> rewards/advantages -> buffer -> update -> sync -> monitor.
    /// The run loop logs the metrics and writes checkpoints.
    pub(super) async fn grpo_step(&mut self) -> Result<StepMetrics> {
        let mut metrics = StepMetrics::default();

        // Sample: G responses per prompt (async mode: requested one step ahead).
        let rollouts = self.sample(&mut metrics).await?;
        let sampled_by = rollouts.policy_version;

        // Verify + score (concurrently), then rewards and advantages (pure).
        let scoring = self.score(rollouts, &mut metrics).await?;

        // Buffer: rollouts more than max_staleness versions behind are dropped (async mode); the SSB drops
        // zero-advantage groups and tops the batch up by replay.
        let oldest = self
            .state
            .policy_version
            .saturating_sub(self.config.run.max_staleness);
        let mut groups = scoring.groups;
        let before = groups.len();
        groups.retain(|g| g.policy_version >= oldest);
        let stale = (before - groups.len()) as u64;
        self.state.stale_dropped += stale;
        metrics.staleness = Some(StalenessMetrics {
            stale_dropped: stale,
            staleness: self.state.policy_version.saturating_sub(sampled_by),
        });
        self.ask(
            ActorName::SampleBuffer,
            &self.actors.buffer,
            ScoredGroups { groups },
        )
        .await??;
        let batch = self.next_batch().await?;
        metrics.buffer = Some(BufferMetrics::of(&batch));

        // Update + sync: skipped when no group is informative.
        metrics.update = Some(if batch.groups.is_empty() {
            self.skip_update("no informative group")
        } else {
            self.update_and_sync(Update::Grpo(batch)).await?
        });

        // Monitor: probes when due, the step's flags and signals; maybe a new calibration.
        self.observe(scoring.observation, &mut metrics).await?;
        Ok(metrics)
    }

    /// The sample buffer's next batch; a failed request (the buffer panicked and was restarted with its
    /// state rolled back) is sent again.
    async fn next_batch(&self) -> Result<TrainBatch> {
        let request = NextBatch {
            target: self.config.prompts_at(self.state.step),
            policy_version: self.state.policy_version,
        };
        let buffer = &self.actors.buffer;
        match self.ask(ActorName::SampleBuffer, buffer, request).await? {
            Ok(batch) => Ok(batch),
            Err(error) => {
                tracing::warn!(%error, "sample_buffer failed; its supervisor restarted it, re-sending NextBatch");
                self.ask(ActorName::SampleBuffer, buffer, request)
                    .await?
                    .map_err(Error::from)
            }
        }
    }
}
