//! The MPO update of [`PolicyTrainer`]: each pair is two rows (chosen, rejected) of the same prompt, so the
//! prompt's image is encoded once per pair. Sequence log-prob sums under the policy (with grad) and the
//! frozen reference feed `rl::mpo`.
//!
//! With more pairs than fit in one micro-batch (`micro_batch / 2` pairs), the BCO delta must come from the
//! whole batch (TRL folds the batch-mean reward into the running mean before the loss): a first pass
//! computes every pair's rewards without keeping the graph, folds their mean into the [`BcoRewardMean`], and
//! the second pass accumulates `mpo_loss_with_delta` per micro-batch, scaled by its share of pairs (the SFT
//! term of `batch_token_mean` by its share of chosen tokens instead). The data-parallel update
//! ([`PolicyTrainer::mpo_update_shard`]) runs the same two passes with the sums taken over all ranks.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use super::batch::{MpoPair, UpdateReport};
use super::collective::{all_reduce_with_sums, rank_local, Collective, RankSums};
use super::logprobs::ResponseRow;
use super::trainer::{accumulate, zero_grads, Accumulated, PolicyTrainer};
use crate::prompt::{EncodedPrompt, PromptBank};
use crate::rl::config::{MpoConfig, SftNormalisation};
use crate::rl::mpo::{mpo_loss, mpo_loss_with_delta, BcoRewardMean, MpoInputs, MpoMetrics};
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

/// The pairs of one update with their prompts, in micro-batches, and the reference's sequence sums.
struct PairBatch<'a> {
    pairs: Vec<(Arc<EncodedPrompt>, &'a MpoPair)>,
    per_chunk: usize,
    /// Reference (chosen, rejected) sums per micro-batch. (n_b,) each
    references: Vec<(Tensor, Tensor)>,
}

impl PairBatch<'_> {
    fn chunks(&self) -> std::slice::Chunks<'_, (Arc<EncodedPrompt>, &MpoPair)> {
        self.pairs.chunks(self.per_chunk)
    }

    fn chosen_tokens(&self) -> usize {
        self.pairs.iter().map(|(_, p)| p.chosen.len()).sum()
    }

    fn tokens(&self) -> usize {
        self.chosen_tokens()
            + self
                .pairs
                .iter()
                .map(|(_, p)| p.rejected.len())
                .sum::<usize>()
    }
}

/// Chosen lengths of a micro-batch. (n_b,)
fn lengths(chunk: &[(Arc<EncodedPrompt>, &MpoPair)], device: &Device) -> Result<Tensor> {
    let l: Vec<f32> = chunk.iter().map(|(_, p)| p.chosen.len() as f32).collect();
    Ok(Tensor::from_vec(l, chunk.len(), device)?)
}

impl PolicyTrainer {
    /// Checks the pairs, finds their prompts and computes the reference sums.
    fn prepare_pairs<'a>(
        &self,
        pairs: &'a [MpoPair],
        prompts: &PromptBank,
    ) -> Result<PairBatch<'a>> {
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
        let mut batch = PairBatch {
            pairs: with_prompts,
            per_chunk: (self.config().micro_batch / 2).max(1),
            references: Vec::new(),
        };
        // No graph: the reference has no Vars.
        let references = batch
            .chunks()
            .map(|chunk| sequence_sums(&self.reference, chunk))
            .collect::<Result<Vec<_>>>()?;
        batch.references = references;
        Ok(batch)
    }

    /// Pass 1: (sum of h over chosen and rejected responses, number of responses), without a graph kept.
    fn reward_sum(&self, batch: &PairBatch, beta: f64) -> Result<(f64, usize)> {
        let mut sum = 0.0;
        for (chunk, (reference_chosen, reference_rejected)) in batch.chunks().zip(&batch.references)
        {
            let (chosen, rejected) = sequence_sums(&self.policy_scorer, chunk)?;
            for (policy, reference) in [(chosen, reference_chosen), (rejected, reference_rejected)]
            {
                let h = ((policy.detach() - reference)? * beta)?;
                sum += h.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            }
        }
        Ok((sum, 2 * batch.pairs.len()))
    }

    /// Pass 2: accumulates every micro-batch's `mpo_loss_with_delta`, scaled by its share of `total_pairs`
    /// (the SFT term of `batch_token_mean` by its share of `total_chosen_tokens`); the metrics come weighted
    /// the same way, so that shares of several shards add up.
    fn preference_pass(
        &self,
        batch: &PairBatch,
        mpo: &MpoConfig,
        delta: f64,
        total_pairs: usize,
        total_chosen_tokens: usize,
    ) -> Result<(Option<Vec<Tensor>>, MpoMetrics)> {
        let device = self.policy.store.device().clone();
        let mut sums = None;
        let mut metrics = MpoMetrics {
            delta,
            ..Default::default()
        };
        for (chunk, (reference_chosen, reference_rejected)) in batch.chunks().zip(&batch.references)
        {
            let (policy_chosen, policy_rejected) = sequence_sums(&self.policy_scorer, chunk)?;
            let out = mpo_loss_with_delta(
                &MpoInputs {
                    policy_chosen: &policy_chosen,
                    policy_rejected: &policy_rejected,
                    reference_chosen,
                    reference_rejected,
                    chosen_lengths: &lengths(chunk, &device)?,
                },
                mpo,
                delta,
            )?;
            let pair_share = chunk.len() as f64 / total_pairs.max(1) as f64;
            let chosen_tokens: usize = chunk.iter().map(|(_, p)| p.chosen.len()).sum();
            // The SFT term's share: of pairs, or of chosen tokens for the batch token mean.
            let sft_share = match mpo.sft_normalisation {
                SftNormalisation::PerSequence => pair_share,
                SftNormalisation::BatchTokenMean => {
                    chosen_tokens as f64 / total_chosen_tokens.max(1) as f64
                }
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
        Ok((sums, metrics))
    }

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
        let batch = self.prepare_pairs(pairs, prompts)?;
        let tokens = batch.tokens();
        if batch.references.len() == 1 {
            // One micro-batch: the reference implementation's own order (fold, then loss).
            let device = self.policy.store.device().clone();
            let (policy_chosen, policy_rejected) =
                sequence_sums(&self.policy_scorer, &batch.pairs)?;
            let (reference_chosen, reference_rejected) = &batch.references[0];
            let out = mpo_loss(
                &MpoInputs {
                    policy_chosen: &policy_chosen,
                    policy_rejected: &policy_rejected,
                    reference_chosen,
                    reference_rejected,
                    chosen_lengths: &lengths(&batch.pairs, &device)?,
                },
                mpo,
                delta_state,
            )?;
            let mut sums = None;
            accumulate(&mut sums, self.trainable_vars(), &out.loss.backward()?)?;
            return Ok(finish(sums, &out.metrics, tokens, pairs.len()));
        }
        let (sum, count) = self.reward_sum(&batch, mpo.beta)?;
        let delta = delta_state.update(sum / count as f64);
        let (sums, metrics) =
            self.preference_pass(&batch, mpo, delta, pairs.len(), batch.chosen_tokens())?;
        Ok(finish(sums, &metrics, tokens, pairs.len()))
    }

    /// One data-parallel MPO update: this replica's `shard` of the pairs; the batch-mean reward (for the
    /// BCO delta), the pair and token totals and then the gradients are summed over the ranks by
    /// `collective`, so every replica folds the same mean into `delta_state` and applies the same update,
    /// equal to [`Self::mpo_update`] on the whole batch (up to summation order). A shard may be empty; a
    /// rank that fails still joins both all-reduces, so that every rank returns an error.
    pub fn mpo_update_shard(
        &mut self,
        shard: &[MpoPair],
        prompts: &PromptBank,
        mpo: &MpoConfig,
        delta_state: &mut BcoRewardMean,
        collective: &dyn Collective,
    ) -> Result<UpdateReport> {
        // Pass 1: rewards and totals.
        let local = rank_local(|| {
            self.fault_drill();
            mpo.validate()?;
            let batch = self.prepare_pairs(shard, prompts)?;
            let (sum, count) = self.reward_sum(&batch, mpo.beta)?;
            Ok((batch, sum, count))
        });
        let totals = local.as_ref().ok().map(|(batch, sum, count)| MpoTotals {
            reward_sum: *sum,
            reward_count: *count as f64,
            pairs: batch.pairs.len() as f64,
            chosen_tokens: batch.chosen_tokens() as f64,
            tokens: batch.tokens() as f64,
        });
        let reduced = all_reduce_with_sums(collective, &mut Vec::new(), totals)?;
        let (batch, _, _) = local?;
        let totals = reduced.into_result()?;
        if totals.pairs == 0.0 {
            return Err(Error::msg("MPO update: every shard is empty"));
        }
        let delta = delta_state.update(totals.reward_sum / totals.reward_count);

        // Pass 2: gradients scaled by the global shares, summed over the ranks.
        let local = rank_local(|| {
            self.preference_pass(
                &batch,
                mpo,
                delta,
                totals.pairs as usize,
                totals.chosen_tokens as usize,
            )
        });
        let zeros = || zero_grads(self.trainable_vars());
        let (mut tensors, losses) = match &local {
            Ok((sums, m)) => (
                match sums {
                    Some(sums) => sums.clone(),
                    None => zeros()?,
                },
                Some(MpoLosses {
                    dpo: m.dpo,
                    bco: m.bco,
                    sft: m.sft,
                }),
            ),
            Err(_) => (zeros()?, None),
        };
        let reduced = all_reduce_with_sums(collective, &mut tensors, losses)?;
        local?;
        let losses = reduced.into_result()?;
        let metrics = MpoMetrics {
            dpo: losses.dpo,
            bco: losses.bco,
            sft: losses.sft,
            delta,
            ..Default::default()
        };
        let accumulated = finish(Some(tensors), &metrics, totals.tokens as usize, 0);
        self.finish_update(accumulated)
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

/// Pass 1 of a data-parallel MPO update: what each shard sums across the ranks.
#[derive(Debug, Clone, Copy, Default)]
struct MpoTotals {
    /// Sum of the pairs' implicit rewards (for the BCO delta's batch mean).
    reward_sum: f64,
    /// How many rewards that sum holds.
    reward_count: f64,
    /// Pairs.
    pairs: f64,
    /// Tokens of the chosen responses.
    chosen_tokens: f64,
    /// Response tokens in all.
    tokens: f64,
}

impl RankSums for MpoTotals {
    fn to_vec(&self) -> Vec<f64> {
        vec![
            self.reward_sum,
            self.reward_count,
            self.pairs,
            self.chosen_tokens,
            self.tokens,
        ]
    }

    fn from_slice(v: &[f64]) -> Self {
        Self {
            reward_sum: v[0],
            reward_count: v[1],
            pairs: v[2],
            chosen_tokens: v[3],
            tokens: v[4],
        }
    }
}

/// Pass 2: the loss terms each shard sums (already weighted by its share).
#[derive(Debug, Clone, Copy, Default)]
struct MpoLosses {
    dpo: f64,
    bco: f64,
    sft: f64,
}

impl RankSums for MpoLosses {
    fn to_vec(&self) -> Vec<f64> {
        vec![self.dpo, self.bco, self.sft]
    }

    fn from_slice(v: &[f64]) -> Self {
        Self {
            dpo: v[0],
            bco: v[1],
            sft: v[2],
        }
    }
}
