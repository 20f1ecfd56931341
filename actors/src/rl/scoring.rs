//! A step's scoring as one pure function (no actix): the generator's groups, the rule verdicts and the
//! reward model's scores in, scored groups and everything the step logs about them out.
//!
//! ```text
//! verdicts[i], rm[i]  -> attached to the i-th sample (groups in order, samples in order)
//! reward              = hybrid_rewards(rule, rm, format; calibration)          (rl::reward)
//! advantage           = group_advantages(rewards, correct)                     (rl::advantages)
//! observation         = flags + per-sample (accuracy, rm, length)              (for the monitor)
//! metrics             = reward/*, verify/failures, calibration/rm_threshold
//! ```
//! The same scored groups feed the sample buffer (GRPO) and pair mining (MPO, [`super::mpo::mine_pairs`]).

use super::advantages::group_advantages;
use super::config::{AdvantageConfig, Calibration, RewardConfig};
use super::group::Group;
use super::reward::{hybrid_rewards, summarise, RewardInputs};
use crate::monitor::signals::{SampleObservation, StepObservation};
use crate::verifiers::Verdict;
use crate::{Error, Result};

/// The reward settings a step is scored with.
#[derive(Debug, Clone, Copy)]
pub struct ScoringConfig<'a> {
    /// The hybrid reward's weights and RM normalisation.
    pub reward: &'a RewardConfig,
    /// How advantages are normalised.
    pub advantage: &'a AdvantageConfig,
    /// The monitor's current calibration of the RM term.
    pub calibration: &'a Calibration,
}

/// What one scoring says about its batch (logged as `reward/*`, `verify/failures`,
/// `calibration/rm_threshold`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardMetrics {
    /// Mean hybrid reward over every sample.
    pub mean: f64,
    /// Its (population) standard deviation.
    pub std: f64,
    /// Mean weighted rule term.
    pub rule: f64,
    /// Mean weighted reward-model term.
    pub rm: f64,
    /// Mean weighted format term.
    pub format: f64,
    /// Mean rule score (the verifiers' accuracy).
    pub accuracy: f64,
    /// The RM threshold the rewards were computed with.
    pub rm_threshold: f64,
    /// Verdicts that stand for a failed verifier (scored 0), not a judgement.
    pub verify_failures: usize,
    /// The share of groups with a non-zero advantage (before the sample buffer).
    pub nonzero_share: f64,
}

impl RewardMetrics {
    /// `(name, value)` pairs by design.md name.
    pub fn entries(&self) -> [(&'static str, f64); 9] {
        [
            ("reward/mean", self.mean),
            ("reward/std", self.std),
            ("reward/rule", self.rule),
            ("reward/rm", self.rm),
            ("reward/format", self.format),
            ("reward/accuracy", self.accuracy),
            ("calibration/rm_threshold", self.rm_threshold),
            ("verify/failures", self.verify_failures as f64),
            ("reward/nonzero_share", self.nonzero_share),
        ]
    }
}

/// A scored batch.
#[derive(Debug, Clone)]
pub struct Scoring {
    /// The groups with every sample's verdict, RM score, reward and advantage filled in.
    pub groups: Vec<Group>,
    /// What the step logs about the rewards.
    pub metrics: RewardMetrics,
    /// What the hallucination monitor is told about the step.
    pub observation: StepObservation,
}

/// The mean of `values`, NaN when there are none.
pub fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// Scores `groups`: `verdicts` and `rm_scores` (when the run has a reward model) hold one entry per sample,
/// groups in order and samples in order, as the verifier and the reward model were asked.
pub fn score_groups(
    mut groups: Vec<Group>,
    verdicts: Vec<Verdict>,
    rm_scores: Option<Vec<f32>>,
    config: ScoringConfig<'_>,
) -> Result<Scoring> {
    let samples: usize = groups.iter().map(|g| g.samples.len()).sum();
    if verdicts.len() != samples {
        return Err(Error::msg(format!(
            "scoring: {} verdicts for {samples} samples",
            verdicts.len()
        )));
    }
    if let Some(scores) = &rm_scores {
        if scores.len() != samples {
            return Err(Error::msg(format!(
                "scoring: {} reward-model scores for {samples} samples",
                scores.len()
            )));
        }
    }
    let mut verdicts = verdicts.into_iter();
    let mut rm_scores = rm_scores.map(Vec::into_iter);
    for sample in groups.iter_mut().flat_map(|g| g.samples.iter_mut()) {
        sample.rm_score = rm_scores.as_mut().and_then(Iterator::next).map(f64::from);
        sample.verdict = verdicts.next();
    }
    // Every sample got a verdict just above (the counts were checked); `none` only satisfies the types.
    let none = Verdict::zero("no verdict");
    fn or_none<'a>(sample: &'a super::group::Sample, none: &'a Verdict) -> &'a Verdict {
        sample.verdict.as_ref().unwrap_or(none)
    }

    // The hybrid reward (rule + RM + format) of every sample.
    let inputs: Vec<Vec<RewardInputs>> = groups
        .iter()
        .map(|g| {
            g.samples
                .iter()
                .map(|s| {
                    let v = or_none(s, &none);
                    RewardInputs {
                        rule: f64::from(v.score),
                        rule_correct: Some(v.score >= 1.0),
                        rm_raw: s.rm_score,
                        format: f64::from(u8::from(v.format_ok)),
                    }
                })
                .collect()
        })
        .collect();
    let rewards = hybrid_rewards(&inputs, config.reward, config.calibration)?;
    let summary = summarise(&rewards);
    let totals: Vec<Vec<f64>> = rewards
        .iter()
        .map(|g| g.iter().map(|r| r.total).collect())
        .collect();
    let all: Vec<f64> = totals.iter().flatten().copied().collect();
    let reward_mean = mean(all.iter().copied());
    let reward_std = (mean(all.iter().map(|r| (r - reward_mean).powi(2)))).sqrt();

    // Group-relative advantages.
    let correct: Vec<Vec<bool>> = inputs
        .iter()
        .map(|g| g.iter().map(|i| i.rule >= 1.0).collect())
        .collect();
    let advantages = group_advantages(&totals, Some(&correct), config.advantage)?;

    let metrics = RewardMetrics {
        mean: reward_mean,
        std: reward_std,
        rule: summary.rule_term,
        rm: summary.rm_term,
        format: summary.format_term,
        accuracy: mean(inputs.iter().flatten().map(|i| i.rule)),
        rm_threshold: config.calibration.rm_threshold,
        verify_failures: groups
            .iter()
            .flat_map(|g| &g.samples)
            .filter(|s| s.verdict.as_ref().is_some_and(|v| v.failure.is_some()))
            .count(),
        nonzero_share: advantages
            .advantages
            .iter()
            .filter(|group| group.iter().any(|a| a.abs() > 1e-6))
            .count() as f64
            / advantages.advantages.len().max(1) as f64,
    };
    for (g, group) in groups.iter_mut().enumerate() {
        for (i, sample) in group.samples.iter_mut().enumerate() {
            sample.reward = totals[g][i];
            sample.advantage = advantages.advantages[g][i];
            sample.correct = Some(correct[g][i]);
        }
    }
    let observation = StepObservation {
        flags: groups
            .iter()
            .flat_map(|g| &g.samples)
            .filter_map(|s| s.verdict.as_ref().and_then(|v| v.hallucination.clone()))
            .collect(),
        groups: groups
            .iter()
            .map(|g| {
                g.samples
                    .iter()
                    .map(|s| SampleObservation {
                        rule_accuracy: f64::from(or_none(s, &none).score),
                        rm_score: s.rm_score.unwrap_or(0.0),
                        response_len: s.token_ids.len(),
                    })
                    .collect()
            })
            .collect(),
    };
    Ok(Scoring {
        groups,
        metrics,
        observation,
    })
}

#[cfg(test)]
#[path = "scoring_tests.rs"]
mod tests;
