//! The GRPO update of [`PolicyTrainer`]: the batch's responses in micro-batches of `micro_batch` rows, each
//! micro-batch's loss scaled so that the accumulated gradient equals the whole batch's:
//!
//! ```text
//! sequence_mean_token_mean, sequence_sum_normalised: loss is a mean over rows  -> scale b / B
//! token_mean:                                       loss is a mean over tokens -> scale tokens_b / tokens_B
//! ```
//!
//! The metrics are combined with the same weights (token means by token share).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;

use super::batch::{TrainBatch, UpdateReport};
use super::collective::{all_reduce_with_sums, rank_local, Collective, RankSums};
use super::logprobs::ResponseRow;
use super::trainer::{accumulate, zero_grads, Accumulated, PolicyTrainer};
use crate::prompt::{EncodedPrompt, PromptBank};
use crate::rl::config::{GrpoConfig, LossAggregation};
use crate::rl::grpo::{grpo_loss, GrpoInputs};
use crate::rl::Sample;
use crate::{Error, Result};

/// One response of the batch with its prompt.
struct Row<'a> {
    prompt: Arc<EncodedPrompt>,
    sample: &'a Sample,
}

/// Right-pads `rows` of `values` to (B, T) f32.
fn padded(values: &[&[f32]], time: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mut out = vec![0f32; values.len() * time];
    for (r, row) in values.iter().enumerate() {
        out[r * time..r * time + row.len()].copy_from_slice(row);
    }
    Ok(Tensor::from_vec(out, (values.len(), time), device)?)
}

impl PolicyTrainer {
    /// The accumulated GRPO gradient of `batch` and its metrics (`actor/pg_loss`, `actor/kl`,
    /// `actor/clipfrac`, `actor/entropy`), without touching the weights. Reference log-probs are computed
    /// only when `grpo.kl_coef > 0` (`actor/kl` is then the k-estimator's token mean, else 0).
    pub fn grpo_gradients(
        &self,
        batch: &TrainBatch,
        prompts: &PromptBank,
        grpo: &GrpoConfig,
    ) -> Result<Accumulated> {
        grpo.validate()?;
        let mut rows = Vec::new();
        for group in &batch.groups {
            let prompt = prompts.get(group.prompt_id)?;
            for (index, sample) in group.samples.iter().enumerate() {
                if sample.behaviour_logprobs.len() != sample.token_ids.len() {
                    return Err(Error::msg(format!(
                        "prompt {} sample {index}: {} behaviour log-probs for {} tokens",
                        group.prompt_id.0,
                        sample.behaviour_logprobs.len(),
                        sample.token_ids.len()
                    )));
                }
                rows.push(Row {
                    prompt: Arc::clone(&prompt),
                    sample,
                });
            }
        }
        if rows.is_empty() {
            return Err(Error::msg("GRPO update: the batch has no responses"));
        }
        let total_rows = rows.len() as f64;
        let total_tokens: usize = rows.iter().map(|r| r.sample.token_ids.len()).sum();
        let token_share = |tokens: usize| tokens as f64 / total_tokens.max(1) as f64;
        let device = self.policy.store.device().clone();
        let mut sums = None;
        let (mut pg_loss, mut kl, mut clipfrac, mut entropy) = (0.0, 0.0, 0.0, 0.0);
        for chunk in rows.chunks(self.config().micro_batch) {
            let response_rows: Vec<ResponseRow> = chunk
                .iter()
                .map(|r| ResponseRow {
                    prompt: Arc::clone(&r.prompt),
                    response: &r.sample.token_ids,
                })
                .collect();
            let policy = self.policy_scorer.response_logprobs(&response_rows, true)?;
            let time = policy.logprobs.dim(1)?;
            let behaviour: Vec<&[f32]> = chunk
                .iter()
                .map(|r| r.sample.behaviour_logprobs.as_slice())
                .collect();
            let behaviour = padded(&behaviour, time, &device)?;
            let advantages: Vec<f32> = chunk.iter().map(|r| r.sample.advantage as f32).collect();
            let advantages = Tensor::from_vec(advantages, chunk.len(), &device)?;
            let reference = if grpo.kl_coef > 0.0 {
                Some(
                    self.reference
                        .response_logprobs(&response_rows, false)?
                        .logprobs
                        .detach(),
                )
            } else {
                None
            };
            let out = grpo_loss(
                &GrpoInputs {
                    policy_logprobs: &policy.logprobs,
                    behaviour_logprobs: &behaviour,
                    reference_logprobs: reference.as_ref(),
                    advantages: &advantages,
                    response_mask: &policy.mask,
                    token_entropies: policy.entropy.as_ref(),
                },
                grpo,
            )?;
            let chunk_tokens: usize = chunk.iter().map(|r| r.sample.token_ids.len()).sum();
            let scale = match grpo.aggregation {
                LossAggregation::TokenMean => token_share(chunk_tokens),
                LossAggregation::SequenceMeanTokenMean
                | LossAggregation::SequenceSumNormalised { .. } => chunk.len() as f64 / total_rows,
            };
            let grads = (out.loss * scale)?.backward()?;
            accumulate(&mut sums, self.trainable_vars(), &grads)?;
            let m = out.metrics;
            let share = token_share(chunk_tokens);
            pg_loss += scale * m.pg_loss;
            kl += share * m.kl.unwrap_or(0.0);
            clipfrac += share * (m.clipfrac_low + m.clipfrac_high);
            entropy += share * m.entropy.unwrap_or(0.0);
        }
        let grads = sums.ok_or_else(|| Error::msg("GRPO update: no micro-batch ran"))?;
        let metrics = BTreeMap::from([
            ("actor/pg_loss".to_string(), pg_loss),
            ("actor/kl".to_string(), kl),
            ("actor/clipfrac".to_string(), clipfrac),
            ("actor/entropy".to_string(), entropy),
        ]);
        Ok(Accumulated {
            grads,
            metrics,
            tokens: total_tokens,
            rows: rows.len(),
        })
    }

    /// One GRPO update on `batch`: accumulated gradients, clipping, one AdamW step, version + 1. The report
    /// holds the new weights and `actor/{pg_loss, kl, clipfrac, entropy, grad_norm, lr}`.
    pub fn grpo_update(
        &mut self,
        batch: &TrainBatch,
        prompts: &PromptBank,
        grpo: &GrpoConfig,
    ) -> Result<UpdateReport> {
        let accumulated = self.grpo_gradients(batch, prompts, grpo)?;
        self.finish_update(accumulated)
    }

    /// One data-parallel GRPO update: this replica computes the gradient of its `shard` of the batch, the
    /// `collective` sums the shards' contributions weighted by their share of the loss's denominator (rows,
    /// or tokens for `token_mean`), and every replica applies the same update. The result equals
    /// [`Self::grpo_update`] on the whole batch (up to summation order). A shard may be empty; a rank whose
    /// gradient fails still joins the all-reduce (with a failure flag), so every rank returns the error
    /// instead of waiting forever.
    pub fn grpo_update_shard(
        &mut self,
        shard: &TrainBatch,
        prompts: &PromptBank,
        grpo: &GrpoConfig,
        collective: &dyn Collective,
    ) -> Result<UpdateReport> {
        let empty = shard.groups.iter().all(|g| g.samples.is_empty());
        let local = rank_local(|| {
            self.fault_drill();
            if empty {
                Ok(None)
            } else {
                self.grpo_gradients(shard, prompts, grpo).map(Some)
            }
        });
        let zeros = || zero_grads(self.trainable_vars());
        let metric = |a: &Accumulated, key: &str| a.metrics.get(key).copied().unwrap_or(0.0);
        let (mut tensors, sums) = match &local {
            Ok(Some(a)) => {
                let loss_weight = match grpo.aggregation {
                    LossAggregation::TokenMean => a.tokens,
                    _ => a.rows,
                } as f64;
                let token_weight = a.tokens as f64;
                let grads = a
                    .grads
                    .iter()
                    .map(|g| Ok((g * loss_weight)?))
                    .collect::<Result<Vec<_>>>()?;
                let sums = GrpoSums {
                    loss_weight,
                    token_weight,
                    pg_loss: loss_weight * metric(a, "actor/pg_loss"),
                    kl: token_weight * metric(a, "actor/kl"),
                    clipfrac: token_weight * metric(a, "actor/clipfrac"),
                    entropy: token_weight * metric(a, "actor/entropy"),
                };
                (grads, Some(sums))
            }
            Ok(None) => (zeros()?, Some(GrpoSums::default())),
            Err(_) => (zeros()?, None),
        };
        let reduced = all_reduce_with_sums(collective, &mut tensors, sums)?;
        local?;
        let sums = reduced.into_result()?;
        let (loss_weight, token_weight) = (sums.loss_weight, sums.token_weight);
        if loss_weight <= 0.0 {
            return Err(Error::msg("GRPO update: every shard is empty"));
        }
        let grads = tensors
            .iter()
            .map(|g| Ok((g / loss_weight)?))
            .collect::<Result<Vec<_>>>()?;
        let per_token = |x: f64| x / token_weight.max(1.0);
        let metrics = BTreeMap::from([
            ("actor/pg_loss".to_string(), sums.pg_loss / loss_weight),
            ("actor/kl".to_string(), per_token(sums.kl)),
            ("actor/clipfrac".to_string(), per_token(sums.clipfrac)),
            ("actor/entropy".to_string(), per_token(sums.entropy)),
        ]);
        self.finish_update(Accumulated {
            grads,
            metrics,
            tokens: token_weight as usize,
            rows: 0,
        })
    }
}

/// What a GRPO shard sums across the ranks beside its gradients.
#[derive(Debug, Clone, Copy, Default)]
struct GrpoSums {
    /// The shard's share of the loss's denominator (rows, or tokens for `token_mean`).
    loss_weight: f64,
    /// Its response tokens.
    token_weight: f64,
    /// `loss_weight * pg_loss`.
    pg_loss: f64,
    /// `token_weight * kl` (and likewise below).
    kl: f64,
    clipfrac: f64,
    entropy: f64,
}

impl RankSums for GrpoSums {
    fn to_vec(&self) -> Vec<f64> {
        vec![
            self.loss_weight,
            self.token_weight,
            self.pg_loss,
            self.kl,
            self.clipfrac,
            self.entropy,
        ]
    }

    fn from_slice(v: &[f64]) -> Self {
        Self {
            loss_weight: v[0],
            token_weight: v[1],
            pg_loss: v[2],
            kl: v[3],
            clipfrac: v[4],
            entropy: v[5],
        }
    }
}
