//! Logits processors and the choice of the next token, for one row at a time.
//!
//! The processors follow Hugging Face transformers 5.23 (`generation/logits_process.py`), chained in the
//! order `GenerationMixin._get_logits_processor` (`generation/utils.py`) appends them:
//!
//! 1. `RepetitionPenaltyLogitsProcessor`: for every token id in the context (prompt and generated so far),
//!    `score = torch.where(score < 0, score * self.penalty, score / self.penalty)`.
//! 2. `TemperatureLogitsWarper`: `scores_processed = scores / self.temperature`.
//! 3. `TopKLogitsWarper`: `indices_to_remove = scores < torch.topk(scores, top_k)[0][..., -1, None]`
//!    (ties with the k-th score are kept).
//! 4. `TopPLogitsWarper`: sort ascending, `cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)`,
//!    `sorted_indices_to_remove = cumulative_probs <= (1 - self.top_p)`, the most probable token always kept.
//!    Equivalently a token is kept iff the probability mass of the tokens ranked above it is `< top_p`, which
//!    is what [`top_p_filter`] computes, sorting only as many candidates as the nucleus needs.
//! 5. `MinPLogitsWarper`: `tokens_to_remove = probs < self.min_p * top_probs`, the top token always kept.
//!
//! Removed tokens get `-inf` (transformers' `filter_value`). Greedy decoding (`do_sample=False`) runs only the
//! repetition penalty and takes the argmax (the first index among equal maxima, as `torch.argmax`).
//!
//! Probabilities are `exp(score - max)` computed in f32 (a vectorized `expf`, relative error below 2e-7, the
//! same bits on every CPU) and summed in f64 in a fixed order, so a draw depends on the logits and the row's
//! random stream only.

use super::sampling::{RowRng, SamplingParams};
use crate::{Error, Result};
use r1v2_kernels::vexp;

/// The token ids a row has in its context (prompt + generated): what the repetition penalty reads.
#[derive(Debug, Clone)]
pub struct SeenTokens {
    mask: Vec<bool>,
    ids: Vec<u32>,
}

impl SeenTokens {
    /// The context `ids` of a row over a vocabulary of `vocab_size` logits. Ids `>= vocab_size` (an embedding
    /// larger than the LM head) cannot be penalised and are ignored, as transformers drops them.
    pub fn new(vocab_size: usize, ids: &[u32]) -> Self {
        let mut seen = Self {
            mask: vec![false; vocab_size],
            ids: Vec::new(),
        };
        for &id in ids {
            seen.insert(id);
        }
        seen
    }

    /// Adds one token id to the context.
    pub fn insert(&mut self, id: u32) {
        if let Some(slot) = self.mask.get_mut(id as usize) {
            if !*slot {
                *slot = true;
                self.ids.push(id);
            }
        }
    }

    /// The distinct ids seen, in first-seen order.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// The log-probabilities of a chosen token under three distributions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogprobs {
    /// `log_softmax(logits)[token]`: the policy's own log-prob (temperature 1, no penalty, no filter). This is
    /// the behaviour log-prob GRPO's importance ratio `pi_theta / pi_behaviour` uses when the trainer scores
    /// tokens with plain `log_softmax(logits)`.
    pub policy: f32,
    /// `log_softmax(logits / temperature)[token]`, what TRL's GRPOTrainer trains on (its fused LM head divides
    /// by `args.temperature`); equal to `policy` for greedy decoding and for temperature 1.
    pub tempered: f32,
    /// The log-prob under the distribution the token was actually drawn from (after every processor); `0` for
    /// greedy decoding, whose choice is deterministic.
    pub processed: f32,
}

/// One chosen token and its log-probs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledToken {
    /// The token id chosen.
    pub token_id: u32,
    /// Its log-probabilities.
    pub logprobs: TokenLogprobs,
}

/// transformers' `RepetitionPenaltyLogitsProcessor` on one row.
pub fn apply_repetition_penalty(scores: &mut [f32], seen: &SeenTokens, penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let penalty = penalty as f32;
    for &id in seen.ids() {
        if let Some(score) = scores.get_mut(id as usize) {
            *score = if *score < 0.0 {
                *score * penalty
            } else {
                *score / penalty
            };
        }
    }
}

/// transformers' `TopKLogitsWarper` on one row: removes every score below the k-th largest.
pub fn top_k_filter(scores: &mut [f32], top_k: usize, scratch: &mut Vec<f32>) {
    if top_k == 0 || top_k >= scores.len() {
        return;
    }
    scratch.clear();
    scratch.extend_from_slice(scores);
    let (_, kth, _) = scratch.select_nth_unstable_by(top_k - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    for score in scores.iter_mut() {
        if *score < threshold {
            *score = f32::NEG_INFINITY;
        }
    }
}

/// transformers' `TopPLogitsWarper` on one row: keeps a token iff the mass ranked above it is `< top_p`.
///
/// Sorts only the top candidates (64, doubled until the nucleus is covered), not the whole vocabulary.
pub fn top_p_filter(scores: &mut [f32], top_p: f64, scratch: &mut Scratch) {
    if top_p >= 1.0 {
        return;
    }
    let (_, total) = scratch.exps(scores);
    let weights = &scratch.weights;
    let candidates = &mut scratch.ids;
    candidates.clear();
    candidates.extend((0..scores.len() as u32).filter(|&i| scores[i as usize].is_finite()));
    let by_score_desc = |a: &u32, b: &u32| scores[*b as usize].total_cmp(&scores[*a as usize]);
    let mut sorted = 64.min(candidates.len());
    let kept = loop {
        if sorted < candidates.len() {
            candidates.select_nth_unstable_by(sorted - 1, by_score_desc);
        }
        candidates[..sorted].sort_by(by_score_desc);
        let mut mass_above = 0.0;
        let mut kept = None;
        for (rank, &id) in candidates[..sorted].iter().enumerate() {
            if mass_above >= top_p {
                kept = Some(rank);
                break;
            }
            mass_above += weights[id as usize] as f64 / total;
        }
        match kept {
            Some(rank) => break rank,
            None if sorted == candidates.len() => break sorted,
            None => sorted = (sorted * 2).min(candidates.len()),
        }
    };
    let mut keep = vec![false; scores.len()];
    for &id in &candidates[..kept] {
        keep[id as usize] = true;
    }
    for (score, keep) in scores.iter_mut().zip(keep) {
        if !keep {
            *score = f32::NEG_INFINITY;
        }
    }
}

/// transformers' `MinPLogitsWarper` on one row: removes tokens with `p < min_p * p_max`, i.e.
/// `exp(score - max_score) < min_p` (a token exactly at the threshold is kept). The exp is f32's: ratios below
/// `f32::MIN_POSITIVE` (`score - max_score < -87.3`) count as 0, which matters only for `min_p < 1.2e-38`.
pub fn min_p_filter(scores: &mut [f32], min_p: f64, scratch: &mut Scratch) {
    if min_p <= 0.0 {
        return;
    }
    scratch.exps(scores);
    for (score, &weight) in scores.iter_mut().zip(&scratch.weights) {
        if (weight as f64) < min_p {
            *score = f32::NEG_INFINITY;
        }
    }
}

/// Runs the processors of `params` on `scores` (a copy of one row's raw logits), in transformers' order.
/// Greedy parameters run the repetition penalty only.
pub fn process_logits(
    params: &SamplingParams,
    seen: &SeenTokens,
    scores: &mut [f32],
    scratch: &mut Scratch,
) {
    apply_repetition_penalty(scores, seen, params.repetition_penalty);
    if params.is_greedy() {
        return;
    }
    if params.temperature != 1.0 {
        let temperature = params.temperature as f32;
        scores.iter_mut().for_each(|s| *s /= temperature);
    }
    top_k_filter(scores, params.top_k, &mut scratch.values);
    top_p_filter(scores, params.top_p, scratch);
    min_p_filter(scores, params.min_p, scratch);
}

/// Reusable buffers for [`sample_next`] and the processors, one per worker thread.
#[derive(Debug, Default)]
pub struct Scratch {
    scores: Vec<f32>,
    /// `exp(score - max)` of every token: computed once per draw (and by the top-p and min-p filters).
    weights: Vec<f32>,
    /// The sums of `weights` over blocks of 256 tokens (`vexp::BLOCK`), in f64.
    block_sums: Vec<f64>,
    values: Vec<f32>,
    ids: Vec<u32>,
}

impl Scratch {
    /// Fills `weights` with `exp(score - max)` and `block_sums` with their block sums ([`vexp::exp_shifted`]);
    /// returns the max and the total.
    fn exps(&mut self, scores: &[f32]) -> (f32, f64) {
        let max = vexp::max(scores);
        let total = vexp::exp_shifted(scores, 1.0, max, &mut self.weights, &mut self.block_sums);
        (max, total)
    }
}

/// Chooses the next token of one row from its raw `logits` (length = vocabulary), drawing one uniform from
/// `rng` unless greedy, and returns it with its [`TokenLogprobs`].
///
/// Sampling is inverse-CDF over the processed probabilities in token-id order (f32 exps accumulated in f64 in a
/// fixed order, whole blocks of 256 tokens first), so the choice depends on the logits and the row's stream
/// only, whatever the CPU. Empty or non-finite logits are an error.
pub fn sample_next(
    params: &SamplingParams,
    logits: &[f32],
    seen: &SeenTokens,
    rng: &mut RowRng,
    scratch: &mut Scratch,
) -> Result<SampledToken> {
    if logits.is_empty() {
        return Err(Error::msg(
            "sampling: the model produced no logits (empty vocabulary)",
        ));
    }
    // A branch-free pass (it vectorizes); the position is looked for only when there is a non-finite logit.
    if !logits.iter().fold(true, |ok, v| ok & v.is_finite()) {
        let at = logits
            .iter()
            .position(|v| !v.is_finite())
            .unwrap_or_default();
        return Err(Error::msg(format!(
            "sampling: the model produced a non-finite logit ({}) at vocabulary index {at}",
            logits[at]
        )));
    }
    let mut scores = std::mem::take(&mut scratch.scores);
    scores.clear();
    scores.extend_from_slice(logits);
    process_logits(params, seen, &mut scores, scratch);

    // When no processor changed a score, the draw's normaliser is also the policy's
    // (`vexp::log_sum_exp(logits, 1)`, the same sum bit for bit), and the pass over the vocabulary is not
    // repeated.
    let mut policy_lse = None;
    let (token, processed) = if params.is_greedy() {
        // The first maximal index, as torch.argmax; logits are non-empty (checked above).
        let mut best = 0;
        for (i, &s) in scores.iter().enumerate() {
            if s > scores[best] {
                best = i;
            }
        }
        (best, 0.0)
    } else {
        let (max, total) = scratch.exps(&scores);
        let target = rng.next_uniform() * total;
        // The processors keep at least the top token, whose weight is exp(0) = 1.
        let token = vexp::inverse_cdf(&scratch.weights, &scratch.block_sums, target)
            .ok_or_else(|| Error::msg("sampling: the logits processors removed every token"))?;
        let unprocessed = scores
            .iter()
            .zip(logits)
            .fold(true, |same, (s, l)| same & (s.to_bits() == l.to_bits()));
        let max = max as f64;
        if unprocessed {
            policy_lse = Some(max + total.ln());
        }
        (token, (scores[token] as f64 - max - total.ln()) as f32)
    };
    scratch.scores = scores;

    let raw = logits[token] as f64;
    let policy = (raw - policy_lse.unwrap_or_else(|| vexp::log_sum_exp(logits, 1.0))) as f32;
    let tempered = if params.is_greedy() || params.temperature == 1.0 {
        policy
    } else {
        // `raw * inv_t` is exact in f64, and `log_sum_exp` scales by the same f32.
        let inv_t = (1.0 / params.temperature) as f32;
        (raw * inv_t as f64 - vexp::log_sum_exp(logits, inv_t)) as f32
    };
    Ok(SampledToken {
        token_id: token as u32,
        logprobs: TokenLogprobs {
            policy,
            tempered,
            processed,
        },
    })
}
