//! The MPO update of [`PolicyTrainer`]: each pair is two rows (chosen, rejected) of the same prompt, so the
//! prompt's image is encoded once per pair. Sequence log-prob sums under the policy (with grad) and the
//! frozen reference feed `rl::mpo`.
//!
//! With more pairs than fit in one micro-batch (`micro_batch / 2` pairs), the BCO delta must come from the
//! whole batch (TRL folds the batch-mean reward into the running mean before the loss): a first pass
//! computes every pair's rewards without keeping the graph, folds their mean into the [`BcoRewardMean`], and
//! the second pass accumulates `mpo_loss_with_delta` per micro-batch, scaled by its share of pairs (the SFT
//! term of `batch_token_mean` by its share of chosen tokens instead).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Tensor, D};

use super::logprobs::ResponseRow;
use super::trainer::{accumulate, Accumulated, PolicyTrainer};
use crate::prompt::{EncodedPrompt, PromptBank};
use crate::protocol::{MpoPair, UpdateReport};
use crate::rl::config::{MpoConfig, SftNormalisation};
use crate::rl::mpo::{
    batch_mean_reward, mpo_loss, mpo_loss_with_delta, BcoRewardMean, MpoInputs, MpoMetrics,
};
use crate::train::logprobs::ResponseScorer;
use crate::{Error, Result};

/// Sequence log-prob sums of the chosen and rejected responses of `pairs`. (N,) each
fn sequence_sums(
    scorer: &ResponseScorer,
    pairs: &[(Arc<EncodedPrompt>, &MpoPair)],
) -> Result<(Tensor, Tensor)> {
    let rows: Vec<ResponseRow> = pairs
        .iter()
        .flat_map(|(prompt, pair)| {
            [&pair.chosen, &pair.rejected].map(|response| ResponseRow {
                prompt: Arc::clone(prompt),
                response,
            })
        })
        .collect();
    let sums = scorer
        .response_logprobs(&rows, false)?
        .logprobs
        .sum(D::Minus1)? // (2N,)
        .reshape((pairs.len(), 2))?; // (N, 2): chosen, rejected
    Ok((
        sums.narrow(1, 0, 1)?.squeeze(1)?,
        sums.narrow(1, 1, 1)?.squeeze(1)?,
    ))
}

impl PolicyTrainer {
    /// The accumulated MPO gradient of `pairs` and its metrics (`mpo/dpo`, `mpo/bco`, `mpo/sft`,
    /// `mpo/delta`), without touching the weights; folds the batch's mean reward into `delta_state`.
    pub fn mpo_gradients(
        &self,
        pairs: &[MpoPair],
        prompts: &PromptBank,
        mpo: &MpoConfig,
        delta_state: &mut BcoRewardMean,
    ) -> Result<Accumulated> {
        mpo.validate()?;
        if pairs.is_empty() {
            return Err(Error::msg("MPO update: no pairs"));
        }
        let mut with_prompts = Vec::with_capacity(pairs.len());
        for (i, pair) in pairs.iter().enumerate() {
            if pair.chosen.is_empty() || pair.rejected.is_empty() {
                return Err(Error::msg(format!(
                    "MPO pair {i} (prompt {}): empty chosen or rejected response",
                    pair.prompt_id.0
                )));
            }
            with_prompts.push((prompts.get(pair.prompt_id)?, pair));
        }
        let device = self.policy.store.device().clone();
        let per_chunk = (self.config().micro_batch / 2).max(1);
        let chunks: Vec<_> = with_prompts.chunks(per_chunk).collect();
        let n = pairs.len() as f64;
        let total_chosen: usize = pairs.iter().map(|p| p.chosen.len()).sum();
        let tokens = total_chosen + pairs.iter().map(|p| p.rejected.len()).sum::<usize>();

        // Reference sums, per micro-batch (no graph: the reference has no Vars).
        let mut references = Vec::with_capacity(chunks.len());
        for chunk in &chunks {
            references.push(sequence_sums(&self.reference, chunk)?);
        }
        let lengths = |chunk: &[(Arc<EncodedPrompt>, &MpoPair)]| -> Result<Tensor> {
            let l: Vec<f32> = chunk.iter().map(|(_, p)| p.chosen.len() as f32).collect();
            Ok(Tensor::from_vec(l, chunk.len(), &device)?)
        };

        let mut sums = None;
        if chunks.len() == 1 {
            let (policy_chosen, policy_rejected) = sequence_sums(&self.policy_scorer, chunks[0])?;
            let (reference_chosen, reference_rejected) = &references[0];
            let out = mpo_loss(
                &MpoInputs {
                    policy_chosen: &policy_chosen,
                    policy_rejected: &policy_rejected,
                    reference_chosen,
                    reference_rejected,
                    chosen_lengths: &lengths(chunks[0])?,
                },
                mpo,
                delta_state,
            )?;
            accumulate(&mut sums, self.trainable_vars(), &out.loss.backward()?)?;
            return Ok(finish(sums, &out.metrics, tokens, pairs.len()));
        }

        // Pass 1: the whole batch's mean reward -> delta.
        let (mut all_policy, mut all_reference) = (Vec::new(), Vec::new());
        for (chunk, (reference_chosen, reference_rejected)) in chunks.iter().zip(&references) {
            let (c, r) = sequence_sums(&self.policy_scorer, chunk)?;
            all_policy.push((c.detach(), r.detach()));
            all_reference.push((reference_chosen.clone(), reference_rejected.clone()));
        }
        let cat = |parts: &[(Tensor, Tensor)], second: bool| -> Result<Tensor> {
            let list: Vec<&Tensor> = parts
                .iter()
                .map(|(c, r)| if second { r } else { c })
                .collect();
            Ok(Tensor::cat(&list, 0)?)
        };
        let whole = MpoInputs {
            policy_chosen: &cat(&all_policy, false)?,
            policy_rejected: &cat(&all_policy, true)?,
            reference_chosen: &cat(&all_reference, false)?,
            reference_rejected: &cat(&all_reference, true)?,
            chosen_lengths: &lengths(&with_prompts)?,
        };
        let delta = delta_state.update(batch_mean_reward(&whole, mpo.beta)?);

        // Pass 2: accumulate the scaled micro-batch losses.
        let mut metrics = MpoMetrics {
            delta,
            ..Default::default()
        };
        for (chunk, (reference_chosen, reference_rejected)) in chunks.iter().zip(&references) {
            let (policy_chosen, policy_rejected) = sequence_sums(&self.policy_scorer, chunk)?;
            let out = mpo_loss_with_delta(
                &MpoInputs {
                    policy_chosen: &policy_chosen,
                    policy_rejected: &policy_rejected,
                    reference_chosen,
                    reference_rejected,
                    chosen_lengths: &lengths(chunk)?,
                },
                mpo,
                delta,
            )?;
            let pair_share = chunk.len() as f64 / n;
            let chosen_tokens: usize = chunk.iter().map(|(_, p)| p.chosen.len()).sum();
            // The SFT term's share: of pairs, or of chosen tokens for the batch token mean.
            let sft_share = match mpo.sft_normalisation {
                SftNormalisation::PerSequence => pair_share,
                SftNormalisation::BatchTokenMean => chosen_tokens as f64 / total_chosen as f64,
            };
            let mut loss = (out.loss * pair_share)?;
            if sft_share != pair_share {
                // Re-weight the micro-batch's SFT term: sft_b = -sum(log pi(y_c)) / chosen_tokens_b.
                let sft = (policy_chosen.sum_all()?.neg()? / chosen_tokens as f64)?;
                loss = (loss + (sft * (mpo.w_generation * (sft_share - pair_share)))?)?;
            }
            accumulate(&mut sums, self.trainable_vars(), &loss.backward()?)?;
            let m = out.metrics;
            metrics.dpo += pair_share * m.dpo;
            metrics.bco += pair_share * m.bco;
            metrics.sft += sft_share * m.sft;
        }
        Ok(finish(sums, &metrics, tokens, pairs.len()))
    }

    /// One MPO update on `pairs`: accumulated gradients, clipping, one AdamW step, version + 1. The report
    /// holds the new weights and `mpo/{dpo, bco, sft, delta}`, `actor/{grad_norm, lr}`.
    pub fn mpo_update(
        &mut self,
        pairs: &[MpoPair],
        prompts: &PromptBank,
        mpo: &MpoConfig,
        delta_state: &mut BcoRewardMean,
    ) -> Result<UpdateReport> {
        let accumulated = self.mpo_gradients(pairs, prompts, mpo, delta_state)?;
        self.finish_update(accumulated)
    }
}

fn finish(sums: Option<Vec<Tensor>>, m: &MpoMetrics, tokens: usize, rows: usize) -> Accumulated {
    let metrics = BTreeMap::from([
        ("mpo/dpo".to_string(), m.dpo),
        ("mpo/bco".to_string(), m.bco),
        ("mpo/sft".to_string(), m.sft),
        ("mpo/delta".to_string(), m.delta),
    ]);
    Accumulated {
        grads: sums.unwrap_or_default(),
        metrics,
        tokens,
        rows,
    }
}
