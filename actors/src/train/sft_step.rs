//! The supervised update of [`PolicyTrainer`] (the SFT warm start of the schedule): the token-mean negative
//! log-likelihood of target responses given their prompts (TRL `SFTTrainer`'s completion-only loss), over
//! micro-batches whose gradients add up to the whole batch's (each micro-batch's summed NLL is divided by
//! the batch's token count).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::batch::{SftExample, UpdateReport};
use super::collective::{all_reduce_with_sums, rank_local, Collective, RankSums};
use super::logprobs::ResponseRow;
use super::trainer::{accumulate, zero_grads, Accumulated, PolicyTrainer};
use crate::prompt::PromptBank;
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

    /// One data-parallel SFT update: this replica's `shard` of the examples. Each shard's gradient of its
    /// token-mean NLL is weighted by its tokens, summed over the ranks by `collective` and divided by the
    /// total, so every replica applies the same update, equal to [`Self::sft_update`] on the whole batch (up
    /// to summation order). A shard may be empty; a rank that fails (or panics) still joins the all-reduce,
    /// so that every rank returns an error.
    pub fn sft_update_shard(
        &mut self,
        shard: &[SftExample],
        prompts: &PromptBank,
        collective: &dyn Collective,
    ) -> Result<UpdateReport> {
        let local = rank_local(|| {
            self.fault_drill();
            if shard.is_empty() {
                Ok(None)
            } else {
                self.sft_gradients(shard, prompts).map(Some)
            }
        });
        let zeros = || zero_grads(self.trainable_vars());
        let (mut tensors, sums) = match &local {
            Ok(Some(a)) => {
                let tokens = a.tokens as f64;
                let grads = a
                    .grads
                    .iter()
                    .map(|g| Ok((g * tokens)?))
                    .collect::<Result<Vec<_>>>()?;
                let nll = a.metrics.get("sft/nll").copied().unwrap_or(0.0);
                (
                    grads,
                    Some(SftSums {
                        tokens,
                        nll: tokens * nll,
                    }),
                )
            }
            Ok(None) => (zeros()?, Some(SftSums::default())),
            Err(_) => (zeros()?, None),
        };
        let reduced = all_reduce_with_sums(collective, &mut tensors, sums)?;
        local?;
        let sums = reduced.into_result()?;
        if sums.tokens <= 0.0 {
            return Err(Error::msg("SFT update: every shard is empty"));
        }
        let grads = tensors
            .iter()
            .map(|g| Ok((g / sums.tokens)?))
            .collect::<Result<Vec<_>>>()?;
        self.finish_update(Accumulated {
            grads,
            metrics: BTreeMap::from([("sft/nll".to_string(), sums.nll / sums.tokens)]),
            tokens: sums.tokens as usize,
            rows: 0,
        })
    }
}

/// What an SFT shard sums across the ranks beside its gradients.
#[derive(Debug, Clone, Copy, Default)]
struct SftSums {
    /// Response tokens of the shard.
    tokens: f64,
    /// `tokens * nll`.
    nll: f64,
}

impl RankSums for SftSums {
    fn to_vec(&self) -> Vec<f64> {
        vec![self.tokens, self.nll]
    }

    fn from_slice(v: &[f64]) -> Self {
        Self {
            tokens: v[0],
            nll: v[1],
        }
    }
}
