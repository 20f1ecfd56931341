//! The supervised update of [`PolicyTrainer`] (the SFT warm start of the schedule): the token-mean negative
//! log-likelihood of target responses given their prompts (TRL `SFTTrainer`'s completion-only loss), over
//! micro-batches whose gradients add up to the whole batch's (each micro-batch's summed NLL is divided by
//! the batch's token count).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::logprobs::ResponseRow;
use super::trainer::{accumulate, Accumulated, PolicyTrainer};
use crate::prompt::PromptBank;
use crate::protocol::{SftExample, UpdateReport};
use crate::{Error, Result};

impl PolicyTrainer {
    /// The accumulated SFT gradient of `examples` and its metric `sft/nll` (token-mean NLL), without touching
    /// the weights.
    pub fn sft_gradients(
        &self,
        examples: &[SftExample],
        prompts: &PromptBank,
    ) -> Result<Accumulated> {
        if examples.is_empty() {
            return Err(Error::msg("SFT update: no examples"));
        }
        let mut rows = Vec::with_capacity(examples.len());
        for (index, example) in examples.iter().enumerate() {
            if example.response.is_empty() {
                return Err(Error::msg(format!(
                    "SFT example {index} (prompt {}): empty response",
                    example.prompt_id.0
                )));
            }
            rows.push(ResponseRow {
                prompt: prompts.get(example.prompt_id)?,
                response: &example.response,
            });
        }
        let total_tokens: usize = examples.iter().map(|e| e.response.len()).sum();
        let mut sums = None;
        let mut nll = 0.0;
        for chunk in rows.chunks(self.config().micro_batch) {
            let chunk: Vec<ResponseRow> = chunk
                .iter()
                .map(|r| ResponseRow {
                    prompt: Arc::clone(&r.prompt),
                    response: r.response,
                })
                .collect();
            let scored = self.policy_scorer.response_logprobs(&chunk, false)?;
            // -(sum of response log-probs) / (tokens of the whole batch): the chunks add up to the mean.
            let loss = (scored.logprobs * &scored.mask)?
                .sum_all()?
                .affine(-1.0 / total_tokens as f64, 0.0)?;
            nll += f64::from(loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
            let grads = loss.backward()?;
            accumulate(&mut sums, self.trainable_vars(), &grads)?;
        }
        let grads = sums.ok_or_else(|| Error::msg("SFT update: no micro-batch ran"))?;
        Ok(Accumulated {
            grads,
            metrics: BTreeMap::from([("sft/nll".to_string(), nll)]),
            tokens: total_tokens,
            rows: examples.len(),
        })
    }

    /// One SFT update: accumulated gradients, clipping, one AdamW step, version + 1. The report holds the new
    /// weights and `sft/nll`, `actor/grad_norm`, `actor/lr`.
    pub fn sft_update(
        &mut self,
        examples: &[SftExample],
        prompts: &PromptBank,
    ) -> Result<UpdateReport> {
        let accumulated = self.sft_gradients(examples, prompts)?;
        self.finish_update(accumulated)
    }
}
