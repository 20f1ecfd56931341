//! One SFT step (the warm start), top to bottom: the dataset's reference answers as targets.

use r1v2_actors::protocol::SftExample;

use super::{Controller, Update};
use crate::trainer::metrics::StepMetrics;
use crate::Result;

impl Controller {
    /// One supervised step: next prompts -> reference answers tokenised (+ end of turn) -> update -> sync.
    pub(super) async fn sft_step(&mut self) -> Result<StepMetrics> {
        let mut metrics = StepMetrics::default();

        // Prompts and their reference answers.
        let requests = self.next_requests()?;
        let end_of_turn = self.encoder.stop_token_ids();
        let examples = requests
            .iter()
            .map(|request| {
                let prompt = self.bank.get(request.prompt_id)?;
                let mut response = self.encoder.tokenizer().encode(&prompt.answer)?;
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
