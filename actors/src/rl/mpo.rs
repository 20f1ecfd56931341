//! Mixed Preference Optimisation (r1v2-method.md section 2; InternVL MPO, arXiv 2411.10442):
//!
//! ```text
//! h(y)  = beta * (log pi(y|x) - log pi_ref(y|x))                 sequence log-prob sums
//! L_dpo = -log sigmoid(h(y_c) - h(y_r))
//! L_bco = -log sigmoid(h(y_c) - delta) - log sigmoid(-(h(y_r) - delta))
//! L_sft = -log pi(y_c|x) / |y_c|
//! L     = w_pref * L_dpo + w_q * L_bco + w_gen * L_sft           (each a mean over pairs)
//! ```
//!
//! References: TRL 1.16 `DPOTrainer._compute_loss` ("sigmoid", "bco_pair" with delta = 0, "sft"), and TRL's
//! earlier `bco_pair` whose delta is a `RunningMoments` mean of the batch-mean rewards, updated before use
//! ([`BcoRewardMean`]). Pair mining and the reference cache are here too.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::config::{MpoConfig, SftNormalisation};
use super::group::{Group, Sample};
use super::PromptId;
use crate::{Error, Result};

/// Sequence-level inputs of one MPO batch of N pairs; every tensor is (N,).
#[derive(Debug, Clone, Copy)]
pub struct MpoInputs<'a> {
    /// Sum of the chosen response's token log-probs under the policy, with grad. (N,)
    pub policy_chosen: &'a Tensor,
    /// Same for the rejected response. (N,)
    pub policy_rejected: &'a Tensor,
    /// Chosen sum under the frozen reference. (N,)
    pub reference_chosen: &'a Tensor,
    /// Rejected sum under the frozen reference. (N,)
    pub reference_rejected: &'a Tensor,
    /// Number of tokens of each chosen response. (N,)
    pub chosen_lengths: &'a Tensor,
}

/// delta of the BCO loss: the running mean of past batch-mean rewards h (TRL `RunningMoments` fed one
/// batch mean per step). Serialisable so a checkpoint can hold it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BcoRewardMean {
    /// Current running mean.
    pub mean: f64,
    /// Number of batch means folded in.
    pub count: u64,
}

impl BcoRewardMean {
    /// Folds one batch-mean reward in and returns the new mean.
    pub fn update(&mut self, batch_mean_reward: f64) -> f64 {
        self.count += 1;
        self.mean += (batch_mean_reward - self.mean) / self.count as f64;
        self.mean
    }
}

/// Values of one MPO evaluation (each loss is the mean over pairs, before weighting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MpoMetrics {
    /// DPO sigmoid preference loss.
    pub dpo: f64,
    /// BCO quality loss.
    pub bco: f64,
    /// SFT generation loss.
    pub sft: f64,
    /// The weighted total.
    pub total: f64,
    /// The delta the BCO term used.
    pub delta: f64,
    /// Mean of h(y_c).
    pub chosen_reward: f64,
    /// Mean of h(y_r).
    pub rejected_reward: f64,
    /// Share of pairs with h(y_c) > h(y_r).
    pub reward_accuracy: f64,
}

/// The MPO loss (scalar, with grad) and its metrics.
#[derive(Debug, Clone)]
pub struct MpoOutput {
    /// Scalar loss to back-propagate.
    pub loss: Tensor,
    /// Metrics from the same pass.
    pub metrics: MpoMetrics,
}

/// log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), numerically stable and differentiable everywhere.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let abs = x.abs()?;
    let min_x_0 = ((x - &abs)? * 0.5)?;
    Ok((min_x_0 - ((abs.neg()?.exp()? + 1.0)?.log()?))?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Mean of h over chosen and rejected responses of the batch: the reward folded into [`BcoRewardMean`].
pub fn batch_mean_reward(inputs: &MpoInputs, beta: f64) -> Result<f64> {
    let (h_chosen, h_rejected) = implicit_rewards(inputs, beta)?;
    scalar(&Tensor::cat(&[&h_chosen, &h_rejected], 0)?.mean_all()?)
}

/// Computes the MPO loss; folds this batch's mean reward into `delta_state` first (TRL's order) and uses the
/// updated mean as the BCO delta.
pub fn mpo_loss(
    inputs: &MpoInputs,
    cfg: &MpoConfig,
    delta_state: &mut BcoRewardMean,
) -> Result<MpoOutput> {
    let delta = delta_state.update(batch_mean_reward(inputs, cfg.beta)?);
    mpo_loss_with_delta(inputs, cfg, delta)
}

/// h(y_c), h(y_r) after checking the shapes. (N,) each
fn implicit_rewards(inputs: &MpoInputs, beta: f64) -> Result<(Tensor, Tensor)> {
    let n = inputs
        .policy_chosen
        .dims1()
        .map_err(|e| Error::msg(format!("mpo: `policy_chosen`: {e}")))?;
    for (name, t) in [
        ("policy_rejected", inputs.policy_rejected),
        ("reference_chosen", inputs.reference_chosen),
        ("reference_rejected", inputs.reference_rejected),
        ("chosen_lengths", inputs.chosen_lengths),
    ] {
        if t.dims() != [n] {
            return Err(Error::msg(format!(
                "mpo: tensor `{name}` has shape {:?}, expected [{n}]",
                t.dims()
            )));
        }
    }
    if n == 0 {
        return Err(Error::msg("mpo: empty batch of pairs"));
    }
    let dtype = inputs.policy_chosen.dtype();
    let reference_chosen = inputs.reference_chosen.detach().to_dtype(dtype)?;
    let reference_rejected = inputs.reference_rejected.detach().to_dtype(dtype)?;
    let h_chosen = ((inputs.policy_chosen - reference_chosen)? * beta)?; // (N,)
    let h_rejected = ((inputs.policy_rejected - reference_rejected)? * beta)?; // (N,)
    Ok((h_chosen, h_rejected))
}

/// The MPO loss with an explicit BCO `delta`.
pub fn mpo_loss_with_delta(inputs: &MpoInputs, cfg: &MpoConfig, delta: f64) -> Result<MpoOutput> {
    cfg.validate()?;
    let (h_chosen, h_rejected) = implicit_rewards(inputs, cfg.beta)?;
    let n = h_chosen.dims1()?;
    let dtype = h_chosen.dtype();
    let dpo = log_sigmoid(&(&h_chosen - &h_rejected)?)?
        .neg()?
        .mean_all()?;
    let bco_chosen = log_sigmoid(&(&h_chosen - delta)?)?;
    let bco_rejected = log_sigmoid(&(&h_rejected - delta)?.neg()?)?;
    let bco = (bco_chosen + bco_rejected)?.neg()?.mean_all()?;
    let lengths = inputs.chosen_lengths.detach().to_dtype(dtype)?;
    let sft = match cfg.sft_normalisation {
        SftNormalisation::PerSequence => (inputs.policy_chosen / lengths.maximum(1.0)?)?
            .neg()?
            .mean_all()?,
        SftNormalisation::BatchTokenMean => {
            let tokens = scalar(&lengths.sum_all()?)?.max(1.0);
            (inputs.policy_chosen.sum_all()?.neg()? / tokens)?
        }
    };
    let loss =
        (((&dpo * cfg.w_preference)? + (&bco * cfg.w_quality)?)? + (&sft * cfg.w_generation)?)?;

    let chosen = h_chosen.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let rejected = h_rejected.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let wins = chosen.iter().zip(&rejected).filter(|(c, r)| c > r).count();
    let metrics = MpoMetrics {
        dpo: scalar(&dpo)?,
        bco: scalar(&bco)?,
        sft: scalar(&sft)?,
        total: scalar(&loss)?,
        delta,
        chosen_reward: chosen.iter().sum::<f64>() / n as f64,
        rejected_reward: rejected.iter().sum::<f64>() / n as f64,
        reward_accuracy: wins as f64 / n as f64,
    };
    Ok(MpoOutput { loss, metrics })
}

/// What the rule verifier said about one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerifierOutcome {
    /// The answer checked out.
    Pass,
    /// The answer is wrong.
    Fail,
    /// No verifier applies to this task (open-ended): it does not block a chosen response.
    NotApplicable,
}

/// How pair mining sees one scored sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoredResponse {
    /// The hybrid score ranking the responses (on the scale `MpoConfig::min_margin` is given in).
    pub score: f64,
    /// The rule verifier's outcome.
    pub verifier: VerifierOutcome,
    /// Whether the response passed the format check.
    pub format_ok: bool,
}

impl ScoredResponse {
    /// A scored sample as pair mining ranks it: by the reward model's raw score when there is one (the
    /// scale of `mpo.min_margin`), else by the rule and format rewards; a sample no verifier judged is
    /// [`VerifierOutcome::NotApplicable`] and not blocked by the format check.
    pub fn of(sample: &Sample) -> Self {
        match &sample.verdict {
            Some(verdict) => Self {
                score: sample.rm_score.unwrap_or_else(|| {
                    f64::from(verdict.score) + f64::from(u8::from(verdict.format_ok))
                }),
                verifier: if verdict.score >= 1.0 {
                    VerifierOutcome::Pass
                } else {
                    VerifierOutcome::Fail
                },
                format_ok: verdict.format_ok,
            },
            None => Self {
                score: sample.rm_score.unwrap_or(0.0),
                verifier: VerifierOutcome::NotApplicable,
                format_ok: true,
            },
        }
    }
}

/// Identifies a pair: prompt and the indices of the chosen and rejected responses in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PairId {
    /// The prompt.
    pub prompt_id: PromptId,
    /// Index of the chosen response.
    pub chosen: usize,
    /// Index of the rejected response.
    pub rejected: usize,
}

/// A mined preference pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// Which responses.
    pub id: PairId,
    /// score(chosen) - score(rejected).
    pub margin: f64,
}

/// Groups that gave no pair, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedPairs {
    /// Fewer than two responses.
    pub too_few_responses: usize,
    /// No response passed both its verifier and the format check.
    pub no_eligible_chosen: usize,
    /// Every other response passed its verifier and the format check: nothing to reject.
    pub no_eligible_rejected: usize,
    /// Best eligible minus worst below the margin.
    pub below_margin: usize,
}

/// Pairs mined from a batch of groups and what was dropped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MinedPairs {
    /// The kept pairs, in group order.
    pub pairs: Vec<PreferencePair>,
    /// Counts of dropped groups.
    pub dropped: DroppedPairs,
}

/// Mines one (chosen, rejected) pair per group: chosen = the highest score among responses that pass their
/// verifier (or have none) and the format check, rejected = the lowest score of the other responses that a
/// verifier did not pass (failed answers, bad formats, open-ended ones), so a verified-correct response is
/// never pushed down, however the reward model ranks it; kept when the margin is at least `min_margin`. Ties
/// go to the lower index.
pub fn mine_pairs(groups: &[Group], min_margin: f64) -> Result<MinedPairs> {
    let mut out = MinedPairs::default();
    for (g, group) in groups.iter().enumerate() {
        let responses: Vec<ScoredResponse> = group.samples.iter().map(ScoredResponse::of).collect();
        if let Some(i) = responses.iter().position(|r| !r.score.is_finite()) {
            return Err(Error::msg(format!(
                "mine_pairs: score of response {i} of group {g} (prompt {}) is not finite",
                group.prompt_id.0
            )));
        }
        if responses.len() < 2 {
            out.dropped.too_few_responses += 1;
            continue;
        }
        let eligible = |r: &ScoredResponse| r.format_ok && r.verifier != VerifierOutcome::Fail;
        let best = responses
            .iter()
            .enumerate()
            .filter(|(_, r)| eligible(r))
            .fold(None::<(usize, f64)>, |acc, (i, r)| match acc {
                Some((_, s)) if s >= r.score => acc,
                _ => Some((i, r.score)),
            });
        let Some((chosen, chosen_score)) = best else {
            out.dropped.no_eligible_chosen += 1;
            continue;
        };
        let verified = |r: &ScoredResponse| r.format_ok && r.verifier == VerifierOutcome::Pass;
        let worst = responses
            .iter()
            .enumerate()
            .filter(|(i, r)| *i != chosen && !verified(r))
            .fold(None::<(usize, f64)>, |acc, (i, r)| match acc {
                Some((_, s)) if s <= r.score => acc,
                _ => Some((i, r.score)),
            });
        let Some((rejected, rejected_score)) = worst else {
            out.dropped.no_eligible_rejected += 1;
            continue;
        };
        let margin = chosen_score - rejected_score;
        if margin < min_margin {
            out.dropped.below_margin += 1;
            continue;
        }
        out.pairs.push(PreferencePair {
            id: PairId {
                prompt_id: group.prompt_id,
                chosen,
                rejected,
            },
            margin,
        });
    }
    Ok(out)
}

/// Reference sequence log-prob sums of one pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReferenceLogprobs {
    /// Sum of the chosen response's token log-probs under pi_ref.
    pub chosen: f64,
    /// Same for the rejected response.
    pub rejected: f64,
}

/// Reference log-probs computed once per pair and reused across MPO epochs; cleared when the reference is
/// refreshed.
#[derive(Debug, Clone, Default)]
pub struct ReferenceCache {
    entries: HashMap<PairId, ReferenceLogprobs>,
    hits: u64,
    misses: u64,
}

impl ReferenceCache {
    /// Returns the cached value or computes, stores and returns it.
    pub fn get_or_compute(
        &mut self,
        id: PairId,
        compute: impl FnOnce() -> Result<ReferenceLogprobs>,
    ) -> Result<ReferenceLogprobs> {
        if let Some(v) = self.entries.get(&id) {
            self.hits += 1;
            return Ok(*v);
        }
        let v = compute()?;
        self.misses += 1;
        self.entries.insert(id, v);
        Ok(v)
    }

    /// Forgets every entry (call when the reference policy is refreshed).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Number of cached pairs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (hits, misses) since creation.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}
