//! The hybrid reward of R1V2's GRPO stage (r1v2-method.md sections 3 and 5):
//!
//! ```text
//! r = w_rule * rule + rm_weight * min(g(rm_raw), rm_threshold) + w_format * format
//! ```
//!
//! g normalises the reward model's raw score (z-score per group or per batch, or a fixed affine map), because
//! raw RM scores (about -15 to +8) dwarf a 0/1 rule reward. The cap and the weight form the [`Calibration`]
//! that the hallucination monitor tightens. Optionally the RM term is zeroed when the rule verifier says the
//! answer is wrong. Every component is returned for logging.

use serde::{Deserialize, Serialize};

use super::config::{Calibration, RewardConfig, RmNormalisation};
use crate::{Error, Result};

/// The raw signals of one response.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardInputs {
    /// Rule verifier reward (1/0, or graded).
    pub rule: f64,
    /// The verifier's verdict, when one applies (drives RM gating).
    pub rule_correct: Option<bool>,
    /// The reward model's raw score; None when no RM scored it (its RM term is then 0).
    pub rm_raw: Option<f64>,
    /// Format reward (1/0).
    pub format: f64,
}

/// Every component of one response's hybrid reward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardComponents {
    /// `w_rule * rule`.
    pub rule_term: f64,
    /// `w_format * format`.
    pub format_term: f64,
    /// g(rm_raw) before the cap (0 without an RM score).
    pub rm_normalised: f64,
    /// `min(rm_normalised, rm_threshold)`.
    pub rm_capped: f64,
    /// `rm_weight * rm_capped`, or 0 when gated.
    pub rm_term: f64,
    /// True when the RM term was zeroed because the answer was wrong.
    pub rm_gated: bool,
    /// The hybrid reward.
    pub total: f64,
}

/// Batch means of the components, for logging.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardSummary {
    /// Mean rule term.
    pub rule_term: f64,
    /// Mean format term.
    pub format_term: f64,
    /// Mean RM term.
    pub rm_term: f64,
    /// Share of responses whose RM term hit the cap.
    pub rm_capped_share: f64,
    /// Share of responses whose RM term was gated.
    pub rm_gated_share: f64,
    /// Mean total reward.
    pub total: f64,
}

/// Mean and population std of the present RM scores.
fn moments(scores: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = scores.collect();
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / v.len() as f64;
    (mean, var.sqrt())
}

/// Computes the hybrid reward of every response of every group.
pub fn hybrid_rewards(
    groups: &[Vec<RewardInputs>],
    cfg: &RewardConfig,
    calibration: &Calibration,
) -> Result<Vec<Vec<RewardComponents>>> {
    cfg.validate()?;
    calibration.validate()?;
    for (g, group) in groups.iter().enumerate() {
        for (i, r) in group.iter().enumerate() {
            let finite =
                r.rule.is_finite() && r.format.is_finite() && r.rm_raw.is_none_or(f64::is_finite);
            if !finite {
                return Err(Error::msg(format!(
                    "hybrid_rewards: response {i} of group {g} has a non-finite input"
                )));
            }
        }
    }
    let batch = moments(groups.iter().flatten().filter_map(|r| r.rm_raw));
    let mut out = Vec::with_capacity(groups.len());
    for group in groups {
        let (mean, std) = match cfg.rm_normalisation {
            RmNormalisation::PerGroup => moments(group.iter().filter_map(|r| r.rm_raw)),
            _ => batch,
        };
        let normalise = |raw: f64| match cfg.rm_normalisation {
            RmNormalisation::PerGroup | RmNormalisation::PerBatch => {
                (raw - mean) / (std + cfg.rm_eps)
            }
            RmNormalisation::Affine { scale, offset } => scale * raw + offset,
        };
        let row = group
            .iter()
            .map(|r| {
                let rm_normalised = r.rm_raw.map(normalise).unwrap_or(0.0);
                let rm_capped = rm_normalised.min(calibration.rm_threshold);
                let rm_gated = cfg.gate_rm_on_wrong && r.rule_correct == Some(false);
                let rm_term = if rm_gated {
                    0.0
                } else {
                    calibration.rm_weight * rm_capped
                };
                let rule_term = cfg.w_rule * r.rule;
                let format_term = cfg.w_format * r.format;
                RewardComponents {
                    rule_term,
                    format_term,
                    rm_normalised,
                    rm_capped,
                    rm_term,
                    rm_gated,
                    total: rule_term + rm_term + format_term,
                }
            })
            .collect();
        out.push(row);
    }
    Ok(out)
}

/// Batch means of the components.
pub fn summarise(rewards: &[Vec<RewardComponents>]) -> RewardSummary {
    let all: Vec<&RewardComponents> = rewards.iter().flatten().collect();
    let n = all.len().max(1) as f64;
    let mean = |f: &dyn Fn(&RewardComponents) -> f64| all.iter().map(|c| f(c)).sum::<f64>() / n;
    RewardSummary {
        rule_term: mean(&|c| c.rule_term),
        format_term: mean(&|c| c.format_term),
        rm_term: mean(&|c| c.rm_term),
        rm_capped_share: mean(&|c| f64::from(u8::from(c.rm_capped < c.rm_normalised))),
        rm_gated_share: mean(&|c| f64::from(u8::from(c.rm_gated))),
        total: mean(&|c| c.total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(rule: f64, correct: bool, rm: f64) -> RewardInputs {
        RewardInputs {
            rule,
            rule_correct: Some(correct),
            rm_raw: Some(rm),
            format: 1.0,
        }
    }

    #[test]
    fn per_group_z_score_cap_and_gate() {
        let groups = vec![vec![
            resp(1.0, true, 8.0),
            resp(0.0, false, 4.0),
            resp(0.0, false, 0.0),
        ]];
        let cfg = RewardConfig {
            gate_rm_on_wrong: true,
            rm_eps: 0.0,
            ..Default::default()
        };
        let calib = Calibration {
            rm_threshold: 1.0,
            rm_weight: 0.5,
        };
        let out = hybrid_rewards(&groups, &cfg, &calib).unwrap();
        let std = (32.0f64 / 3.0).sqrt(); // population std of [8, 4, 0]
        assert!((out[0][0].rm_normalised - 4.0 / std).abs() < 1e-12);
        assert_eq!(out[0][0].rm_capped, 1.0); // 4 / 3.27 = 1.22 > 1: capped
        assert_eq!(out[0][0].total, 1.0 + 0.5 + 1.0);
        assert!(out[0][1].rm_gated && out[0][1].rm_term == 0.0);
        assert_eq!(out[0][2].total, 1.0);
        let s = summarise(&out);
        assert!((s.rm_gated_share - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.rm_capped_share - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn affine_map_and_bad_input() {
        let cfg = RewardConfig {
            rm_normalisation: RmNormalisation::Affine {
                scale: 0.1,
                offset: 0.5,
            },
            ..Default::default()
        };
        let calib = Calibration {
            rm_threshold: 10.0,
            rm_weight: 1.0,
        };
        let out = hybrid_rewards(&[vec![resp(1.0, true, -15.0)]], &cfg, &calib).unwrap();
        assert!((out[0][0].rm_term - (-1.0)).abs() < 1e-12);
        let bad = vec![vec![RewardInputs {
            rule: f64::NAN,
            rule_correct: None,
            rm_raw: None,
            format: 0.0,
        }]];
        let err = hybrid_rewards(&bad, &cfg, &calib).unwrap_err().to_string();
        assert!(err.contains("group 0"), "{err}");
    }
}
