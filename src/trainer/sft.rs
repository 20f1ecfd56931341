//! One SFT step (the warm start), top to bottom: each line's worked `solution` as the target (its reference
//! answer when it has none).

use r1v2_actors::protocol::SftExample;

use super::{Controller, Update};
use crate::trainer::metrics::StepMetrics;
use crate::Result;

impl Controller {
    /// One supervised step: next prompts -> solutions (or answers) tokenised (+ end of turn) -> update -> sync.
    pub(super) async fn sft_step(&mut self) -> Result<StepMetrics> {
        let mut metrics = StepMetrics::default();

        // Prompts and their targets.
        let requests = self.next_requests(self.state.step)?;
        let end_of_turn = self.encoder.stop_token_ids();
        let examples = requests
            .iter()
            .map(|request| {
                // A dataset prompt's id is its index in the file.
                let sample = &self.loader.samples()[request.prompt_id.0 as usize];
                let target = sample.solution.as_deref().unwrap_or(&sample.answer);
                let mut response = self.encoder.tokenizer().encode(target)?;
                response.extend(end_of_turn.first());
                Ok(SftExample {
                    prompt_id: request.prompt_id,
                    response,
                })
            })
            .collect::<Result<Vec<_>>>()?;

        // Update + sync.
        metrics.update = Some(self.update_and_sync(Update::Sft(examples)).await?);
        Ok(metrics)
    }
}
