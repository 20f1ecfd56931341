//! GRPO's token-level clipped surrogate with a KL penalty (r1v2-method.md section 3, the paper's Eq. 8):
//!
//! ```text
//! rho_t = exp(log pi - log pi_old)
//! l_t   = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + kl_coef * KL_t
//! ```
//!
//! Reference: TRL 1.16 `GRPOTrainer._compute_loss` (loss types grpo / bnpo / dapo / dr_grpo, `epsilon_high`,
//! the dual clip as TRL's `delta`, k3 KL with `beta`); `tests/fixtures/gen_rl.py` calls that method and
//! `actors/tests/rl_reference.rs` matches loss, metrics and gradients.
//!
//! Every op used here has a backward in candle (exp, mul, sub, sum, where_cond); the clip is written with
//! `where_cond` on masks computed from the values, so the gradient is exactly torch's `clamp`/`min` one:
//! zero through a clipped branch, identity elsewhere.

use candle_core::{DType, Tensor, D};

use super::config::{GrpoConfig, KlEstimator, LossAggregation};
use crate::{Error, Result};

/// The tensors of one GRPO update. Zero-advantage groups should already be dropped (see `ssb`), so that they
/// count neither in the denominators nor in the KL term.
#[derive(Debug, Clone, Copy)]
pub struct GrpoInputs<'a> {
    /// Log-probs of the sampled tokens under the policy being trained, with grad. (B, T)
    pub policy_logprobs: &'a Tensor,
    /// Log-probs of the same tokens under the behaviour policy that sampled them (treated as constants). (B, T)
    pub behaviour_logprobs: &'a Tensor,
    /// Log-probs under the frozen reference policy; required when `kl_coef > 0`, never read otherwise
    /// except for the `kl` metric. (B, T)
    pub reference_logprobs: Option<&'a Tensor>,
    /// One advantage per response. (B,)
    pub advantages: &'a Tensor,
    /// 1 for response tokens, 0 for padding. (B, T)
    pub response_mask: &'a Tensor,
    /// Entropy of the policy's next-token distribution at each position, for the metric only. (B, T)
    pub token_entropies: Option<&'a Tensor>,
}

/// Quantiles of the importance ratio over unmasked tokens (linear interpolation, as `torch.quantile`).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RatioQuantiles {
    /// Smallest ratio.
    pub min: f64,
    /// 10th percentile.
    pub p10: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Largest ratio.
    pub max: f64,
}

/// Metrics of one GRPO loss evaluation, from the same pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GrpoMetrics {
    /// The policy-gradient part of the loss, aggregated like the loss.
    pub pg_loss: f64,
    /// Masked token mean of the per-token KL estimate (None without reference log-probs).
    pub kl: Option<f64>,
    /// Share of tokens with A < 0 and rho < 1 - eps_low (TRL `clip_ratio/low_mean`).
    pub clipfrac_low: f64,
    /// Share of tokens with A > 0 and rho > 1 + eps_high (TRL `clip_ratio/high_mean`).
    pub clipfrac_high: f64,
    /// Quantiles of rho over unmasked tokens.
    pub ratio: RatioQuantiles,
    /// Masked token mean of the supplied token entropies.
    pub entropy: Option<f64>,
    /// Number of unmasked tokens.
    pub tokens: usize,
}

/// The loss (a scalar tensor with grad) and its metrics.
#[derive(Debug, Clone)]
pub struct GrpoOutput {
    /// Scalar loss to back-propagate.
    pub loss: Tensor,
    /// Metrics from the same pass.
    pub metrics: GrpoMetrics,
}

fn check_shape(name: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() != dims {
        return Err(Error::msg(format!(
            "grpo: tensor `{name}` has shape {:?}, expected {dims:?}",
            t.dims()
        )));
    }
    Ok(())
}

/// A constant tensor shaped and typed like `like`.
fn constant_like(like: &Tensor, value: f64) -> Result<Tensor> {
    Ok(like.detach().zeros_like()?.affine(0.0, value)?)
}

/// Per-token KL(pi || pi_ref) estimate.
pub fn kl_per_token(policy: &Tensor, reference: &Tensor, estimator: KlEstimator) -> Result<Tensor> {
    // d = log pi_ref - log pi
    let d = (reference.detach() - policy)?;
    Ok(match estimator {
        KlEstimator::K1 => d.neg()?,
        KlEstimator::K2 => (d.sqr()? * 0.5)?,
        KlEstimator::K3 => ((d.exp()? - &d)? - 1.0)?,
    })
}

/// Reduces per-token values to one scalar the way `aggregation` says. `mask` is 0/1, same shape and dtype.
pub fn aggregate(
    per_token: &Tensor,
    mask: &Tensor,
    aggregation: LossAggregation,
) -> Result<Tensor> {
    let (batch, _) = per_token.dims2()?;
    let masked = (per_token * mask)?;
    Ok(match aggregation {
        LossAggregation::SequenceMeanTokenMean => {
            let lengths = mask.sum(D::Minus1)?.maximum(1.0)?; // (B,)
            (masked.sum(D::Minus1)? / lengths)?.mean_all()?
        }
        LossAggregation::TokenMean => {
            let tokens = mask
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                .max(1.0);
            (masked.sum_all()? / tokens)?
        }
        LossAggregation::SequenceSumNormalised { max_completion_len } => {
            (masked.sum_all()? / (batch * max_completion_len).max(1) as f64)?
        }
    })
}

/// Linear-interpolation quantile of sorted values (`torch.quantile` default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn to_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.detach().to_dtype(DType::F64)?.to_vec2::<f64>()?)
}

/// Computes the GRPO loss and its metrics.
pub fn grpo_loss(inputs: &GrpoInputs, cfg: &GrpoConfig) -> Result<GrpoOutput> {
    cfg.validate()?;
    let policy = inputs.policy_logprobs;
    let (batch, time) = policy
        .dims2()
        .map_err(|e| Error::msg(format!("grpo: `policy_logprobs`: {e}")))?;
    if batch == 0 || time == 0 {
        return Err(Error::msg(format!(
            "grpo: empty batch, `policy_logprobs` has shape ({batch}, {time})"
        )));
    }
    check_shape(
        "behaviour_logprobs",
        inputs.behaviour_logprobs,
        &[batch, time],
    )?;
    check_shape("response_mask", inputs.response_mask, &[batch, time])?;
    check_shape("advantages", inputs.advantages, &[batch])?;
    if let Some(r) = inputs.reference_logprobs {
        check_shape("reference_logprobs", r, &[batch, time])?;
    }
    if let Some(e) = inputs.token_entropies {
        check_shape("token_entropies", e, &[batch, time])?;
    }
    if cfg.kl_coef > 0.0 && inputs.reference_logprobs.is_none() {
        return Err(Error::msg("grpo: kl_coef > 0 needs `reference_logprobs`"));
    }
    let dtype = policy.dtype();
    let mask = inputs.response_mask.detach().to_dtype(dtype)?;
    let advantages = inputs
        .advantages
        .detach()
        .to_dtype(dtype)?
        .unsqueeze(1)?
        .broadcast_as((batch, time))?; // (B, T)

    // rho = pi / pi_old, the behaviour log-probs are constants.
    let ratio = (policy - inputs.behaviour_logprobs.detach().to_dtype(dtype)?)?.exp()?; // (B, T)
    let (low, high) = (1.0 - cfg.eps_low, 1.0 + cfg.eps_high);
    // Unclipped branch, with the dual clip capping rho at c (TRL `delta`): clamp(rho, max=c).
    let unclipped_ratio = match cfg.dual_clip {
        Some(c) => ratio
            .gt(c)?
            .where_cond(&constant_like(&ratio, c)?, &ratio)?,
        None => ratio.clone(),
    };
    // clip(rho, 1 - eps_low, 1 + eps_high)
    let clipped_ratio = ratio.lt(low)?.where_cond(
        &constant_like(&ratio, low)?,
        &ratio
            .gt(high)?
            .where_cond(&constant_like(&ratio, high)?, &ratio)?,
    )?;
    let surrogate_unclipped = (unclipped_ratio * &advantages)?;
    let surrogate_clipped = (clipped_ratio * &advantages)?;
    // -min(s1, s2)
    let pg_per_token = surrogate_unclipped
        .le(&surrogate_clipped)?
        .where_cond(&surrogate_unclipped, &surrogate_clipped)?
        .neg()?;

    let kl_per_tok = match inputs.reference_logprobs {
        Some(reference) => Some(kl_per_token(
            policy,
            &reference.to_dtype(dtype)?,
            cfg.kl_estimator,
        )?),
        None => None,
    };
    let per_token = match (&kl_per_tok, cfg.kl_coef > 0.0) {
        (Some(kl), true) => (&pg_per_token + (kl * cfg.kl_coef)?)?,
        _ => pg_per_token.clone(),
    };
    let loss = aggregate(&per_token, &mask, cfg.aggregation)?;

    // Metrics, from the same tensors (detached, on the host).
    let pg_loss = aggregate(&pg_per_token.detach(), &mask, cfg.aggregation)?
        .to_dtype(DType::F64)?
        .to_scalar()?;
    let mask_rows = to_rows(&mask)?;
    let ratio_rows = to_rows(&ratio)?;
    let adv_rows = to_rows(&advantages)?;
    let tokens = mask_rows.iter().flatten().filter(|&&m| m > 0.0).count();
    let masked_mean = |rows: &[Vec<f64>]| -> f64 {
        let sum: f64 = rows
            .iter()
            .flatten()
            .zip(mask_rows.iter().flatten())
            .map(|(v, m)| v * m)
            .sum();
        sum / (tokens.max(1) as f64)
    };
    let (mut low_count, mut high_count) = (0usize, 0usize);
    let mut ratios = Vec::with_capacity(tokens);
    for ((r_row, a_row), m_row) in ratio_rows.iter().zip(&adv_rows).zip(&mask_rows) {
        for ((&r, &a), &m) in r_row.iter().zip(a_row).zip(m_row) {
            if m > 0.0 {
                low_count += usize::from(r < low && a < 0.0);
                high_count += usize::from(r > high && a > 0.0);
                ratios.push(r);
            }
        }
    }
    ratios.sort_by(f64::total_cmp);
    let ratio_quantiles = RatioQuantiles {
        min: quantile(&ratios, 0.0),
        p10: quantile(&ratios, 0.1),
        p50: quantile(&ratios, 0.5),
        p90: quantile(&ratios, 0.9),
        max: quantile(&ratios, 1.0),
    };
    let kl = match &kl_per_tok {
        Some(kl) => Some(masked_mean(&to_rows(kl)?)),
        None => None,
    };
    let entropy = match inputs.token_entropies {
        Some(e) => Some(masked_mean(&to_rows(e)?)),
        None => None,
    };
    let denom = tokens.max(1) as f64;
    let metrics = GrpoMetrics {
        pg_loss,
        kl,
        clipfrac_low: low_count as f64 / denom,
        clipfrac_high: high_count as f64 / denom,
        ratio: ratio_quantiles,
        entropy,
        tokens,
    };
    Ok(GrpoOutput { loss, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn kl_coef_zero_needs_no_reference_and_positive_does() {
        let dev = Device::Cpu;
        let policy = Var::new(&[[-1.0f64, -2.0], [-0.5, -0.7]], &dev).unwrap();
        let behaviour = Tensor::new(&[[-1.1f64, -1.9], [-0.5, -0.9]], &dev).unwrap();
        let adv = Tensor::new(&[1.0f64, -1.0], &dev).unwrap();
        let mask = Tensor::new(&[[1.0f64, 1.0], [1.0, 0.0]], &dev).unwrap();
        let inputs = GrpoInputs {
            policy_logprobs: policy.as_tensor(),
            behaviour_logprobs: &behaviour,
            reference_logprobs: None,
            advantages: &adv,
            response_mask: &mask,
            token_entropies: None,
        };
        let cfg = GrpoConfig {
            kl_coef: 0.0,
            ..Default::default()
        };
        let out = grpo_loss(&inputs, &cfg).unwrap();
        assert_eq!(out.metrics.kl, None);
        assert_eq!(out.metrics.tokens, 3);
        let err = grpo_loss(&inputs, &GrpoConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("reference_logprobs"), "{err}");
        let bad = GrpoInputs {
            advantages: &mask,
            ..inputs
        };
        let err = grpo_loss(&bad, &cfg).unwrap_err().to_string();
        assert!(err.contains("`advantages`"), "{err}");
    }
}
