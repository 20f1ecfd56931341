//! One MPO step, top to bottom: the same sampling and scoring as GRPO, then one preference pair per group.

use r1v2_actors::protocol::MpoPair;
use r1v2_actors::rl::mpo::mine_pairs;

use super::{Controller, Update};
use crate::trainer::metrics::StepMetrics;
use crate::{Error, Result};

impl Controller {
    /// One MPO step: (new round: refresh the reference) -> sample -> verify + score -> mine pairs -> update
    /// -> sync -> monitor. The run loop logs the metrics and writes checkpoints.
    pub(super) async fn mpo_step(&mut self, new_round: bool) -> Result<StepMetrics> {
        let mut metrics = StepMetrics::default();
        if new_round && self.config.rl.mpo.refresh_reference_each_round {
            self.refresh_reference().await?;
        }

        // Sample, then verify + score (rewards logged as in GRPO).
        let rollouts = self.sample(&mut metrics).await?;
        let scoring = self.score(rollouts, &mut metrics).await?;

        // Pairs: chosen = best eligible response, rejected = the worst other one not verified correct
        // (rl::mpo::mine_pairs).
        let mined = mine_pairs(&scoring.groups, self.config.rl.mpo.min_margin)?;
        metrics.mpo_pairs = Some(mined.pairs.len());
        let pairs: Vec<MpoPair> = mined
            .pairs
            .iter()
            .map(|pair| {
                let group = scoring
                    .groups
                    .iter()
                    .find(|g| g.prompt_id == pair.id.prompt_id)
                    .ok_or_else(|| {
                        Error::Msg("mpo: a pair names a prompt not in the batch".into())
                    })?;
                Ok(MpoPair {
                    prompt_id: pair.id.prompt_id,
                    chosen: group.samples[pair.id.chosen].token_ids.clone(),
                    rejected: group.samples[pair.id.rejected].token_ids.clone(),
                })
            })
            .collect::<Result<_>>()?;

        // Update + sync: skipped when no group gave a pair.
        metrics.update = Some(if pairs.is_empty() {
            tracing::debug!(dropped = ?mined.dropped, "pair mining");
            self.skip_update("no preference pair")
        } else {
            self.update_and_sync(Update::Mpo(pairs)).await?
        });

        // Monitor.
        self.observe(scoring.observation, &mut metrics).await?;
        Ok(metrics)
    }
}
