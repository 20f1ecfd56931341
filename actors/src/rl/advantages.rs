//! Group-relative advantages of GRPO (r1v2-method.md section 3):
//! `A_i = (r_i - mean(r_group)) / (std + eps)`, the same A_i for every token of response i.
//!
//! Reference: TRL 1.16 `GRPOTrainer._generate_and_score_completions` (`scale_rewards` "group" / "batch" /
//! "none", unbiased `nanstd`, eps 1e-4); checked in `actors/tests/rl_reference.rs`.

use serde::{Deserialize, Serialize};

use super::config::{AdvantageConfig, AdvantageScaling};
use crate::{Error, Result};

/// What a group contributes to the gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupKind {
    /// Some advantage is non-zero: the group carries a gradient.
    Informative,
    /// Zero advantage and every response passed its verifier.
    AllCorrect,
    /// Zero advantage and every response failed its verifier.
    AllWrong,
    /// Zero advantage with mixed or unknown verifier outcomes (identical rewards).
    Tied,
}

impl GroupKind {
    /// True for the three zero-advantage kinds.
    pub fn is_zero_advantage(self) -> bool {
        self != GroupKind::Informative
    }
}

/// Counts of groups by [`GroupKind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupKindCounts {
    /// Groups with a non-zero advantage.
    pub informative: usize,
    /// Zero-advantage groups, all responses right.
    pub all_correct: usize,
    /// Zero-advantage groups, all responses wrong.
    pub all_wrong: usize,
    /// Zero-advantage groups otherwise (identical rewards, mixed or unknown correctness).
    pub tied: usize,
}

impl GroupKindCounts {
    /// Adds one group of `kind`.
    pub fn add(&mut self, kind: GroupKind) {
        match kind {
            GroupKind::Informative => self.informative += 1,
            GroupKind::AllCorrect => self.all_correct += 1,
            GroupKind::AllWrong => self.all_wrong += 1,
            GroupKind::Tied => self.tied += 1,
        }
    }

    /// Number of zero-advantage groups of any kind.
    pub fn zero_advantage(&self) -> usize {
        self.all_correct + self.all_wrong + self.tied
    }

    /// Total number of groups counted.
    pub fn total(&self) -> usize {
        self.informative + self.zero_advantage()
    }
}

/// Advantages of a batch of groups.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupAdvantages {
    /// `advantages[g][i]`: advantage of response i of group g.
    pub advantages: Vec<Vec<f64>>,
    /// The kind of each group.
    pub kinds: Vec<GroupKind>,
    /// Counts of `kinds`.
    pub counts: GroupKindCounts,
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Unbiased (Bessel-corrected) standard deviation, 0 for fewer than two values.
fn unbiased_std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = mean(xs);
    let var = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (xs.len() - 1) as f64;
    var.sqrt()
}

/// Classifies a group from its advantages and (optionally) its verifier outcomes.
pub fn classify_group(
    advantages: &[f64],
    correct: Option<&[bool]>,
    zero_tolerance: f64,
) -> GroupKind {
    if advantages.iter().any(|a| a.abs() > zero_tolerance) {
        return GroupKind::Informative;
    }
    match correct {
        Some(c) if !c.is_empty() && c.iter().all(|&x| x) => GroupKind::AllCorrect,
        Some(c) if !c.is_empty() && c.iter().all(|&x| !x) => GroupKind::AllWrong,
        _ => GroupKind::Tied,
    }
}

/// Computes group-relative advantages.
///
/// `rewards[g]` holds the G rewards of group g; `correct[g][i]`, when given, says whether response i passed its
/// rule verifier (used only to name the kind of a zero-advantage group).
pub fn group_advantages(
    rewards: &[Vec<f64>],
    correct: Option<&[Vec<bool>]>,
    cfg: &AdvantageConfig,
) -> Result<GroupAdvantages> {
    for (g, group) in rewards.iter().enumerate() {
        if group.is_empty() {
            return Err(Error::msg(format!(
                "advantages: group {g} has no responses"
            )));
        }
        if let Some(i) = group.iter().position(|r| !r.is_finite()) {
            return Err(Error::msg(format!(
                "advantages: reward {i} of group {g} is not finite: {}",
                group[i]
            )));
        }
    }
    if let Some(c) = correct {
        if c.len() != rewards.len() || c.iter().zip(rewards).any(|(c, r)| c.len() != r.len()) {
            return Err(Error::msg(
                "advantages: `correct` must have the shape of `rewards`",
            ));
        }
    }
    let batch_std = match cfg.scaling {
        AdvantageScaling::Batch => {
            let all: Vec<f64> = rewards.iter().flatten().copied().collect();
            Some(unbiased_std(&all))
        }
        _ => None,
    };
    let mut out = GroupAdvantages {
        advantages: Vec::new(),
        kinds: Vec::new(),
        counts: Default::default(),
    };
    for (g, group) in rewards.iter().enumerate() {
        let m = mean(group);
        let denom = match cfg.scaling {
            AdvantageScaling::Group => unbiased_std(group) + cfg.eps,
            AdvantageScaling::Batch => batch_std.unwrap_or(0.0) + cfg.eps,
            AdvantageScaling::None => 1.0,
        };
        let adv: Vec<f64> = group.iter().map(|r| (r - m) / denom).collect();
        let kind = classify_group(&adv, correct.map(|c| c[g].as_slice()), cfg.zero_tolerance);
        out.counts.add(kind);
        out.kinds.push(kind);
        out.advantages.push(adv);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_groups_are_classified_by_verifier_outcome() {
        let rewards = vec![
            vec![1.0, 1.0, 1.0],
            vec![0.0, 0.0, 0.0],
            vec![0.5, 0.5, 0.5],
            vec![1.0, 0.0, 0.0],
        ];
        let correct = vec![
            vec![true; 3],
            vec![false; 3],
            vec![true, false, true],
            vec![true, false, false],
        ];
        let out = group_advantages(&rewards, Some(&correct), &AdvantageConfig::default()).unwrap();
        assert_eq!(
            out.kinds,
            vec![
                GroupKind::AllCorrect,
                GroupKind::AllWrong,
                GroupKind::Tied,
                GroupKind::Informative
            ]
        );
        assert_eq!(
            out.counts,
            GroupKindCounts {
                informative: 1,
                all_correct: 1,
                all_wrong: 1,
                tied: 1
            }
        );
        // (1 - 1/3) / (std([1,0,0]) + 1e-4), std unbiased = sqrt(1/3)
        let expected = (2.0 / 3.0) / ((1.0f64 / 3.0).sqrt() + 1e-4);
        assert!((out.advantages[3][0] - expected).abs() < 1e-12);
        let sum: f64 = out.advantages[3].iter().sum();
        assert!(sum.abs() < 1e-12);
    }

    #[test]
    fn bad_rewards_are_named() {
        let err = group_advantages(
            &[vec![1.0], vec![f64::NAN]],
            None,
            &AdvantageConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("group 1"), "{err}");
        assert!(group_advantages(&[vec![]], None, &AdvantageConfig::default()).is_err());
    }
}
