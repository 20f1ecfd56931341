//! The per-step summary the monitor keeps, and the signals that precede hallucination: least-squares
//! slopes (RM score up while rule accuracy is flat), response-length growth, RM-rule disagreement.

use serde::{Deserialize, Serialize};

use crate::verifiers::HallucinationFlags;
use crate::{Error, Result};

/// One sampled response as the monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampleObservation {
    /// Rule accuracy (the verifier's score, in [0, 1]).
    pub rule_accuracy: f64,
    /// The reward model's raw score.
    pub rm_score: f64,
    /// Response length in tokens.
    pub response_len: usize,
}

/// What one training step tells the monitor.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepObservation {
    /// The hallucination flags of the step's verdicts that carry them.
    pub flags: Vec<HallucinationFlags>,
    /// The step's samples, one inner vector per GRPO group (same prompt).
    pub groups: Vec<Vec<SampleObservation>>,
}

/// Claims and unsupported claims over a set of flags (CHAIR-i = unsupported / claims).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimCount {
    /// Checkable claims.
    pub claims: u64,
    /// Unsupported claims.
    pub unsupported: u64,
}

impl ClaimCount {
    /// Sums the flags.
    pub fn of(flags: &[HallucinationFlags]) -> Self {
        flags.iter().fold(Self::default(), |acc, f| Self {
            claims: acc.claims + u64::from(f.claims_checked),
            unsupported: acc.unsupported + f.unsupported.len() as u64,
        })
    }

    /// Unsupported / claims; `None` without claims.
    pub fn rate(&self) -> Option<f64> {
        (self.claims > 0).then(|| self.unsupported as f64 / self.claims as f64)
    }
}

/// The summary of one step kept in the monitor's window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSummary {
    /// The training step.
    pub step: u64,
    /// Claims over the step's verdicts.
    pub claims: ClaimCount,
    /// Mean rule accuracy (`None` without samples).
    pub rule_accuracy: Option<f64>,
    /// Mean RM score.
    pub rm_score: Option<f64>,
    /// Mean response length in tokens.
    pub response_len: Option<f64>,
    /// Within-group pairs the rules order strictly (`rule_i > rule_j`).
    pub ordered_pairs: u64,
    /// Of those, the pairs the RM orders the other way strictly (`rm_i < rm_j`).
    pub disagreeing_pairs: u64,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// (ordered pairs, disagreeing pairs) of one group: the RM ranks a rule-worse response strictly above a
/// rule-better one.
pub fn rm_rule_disagreement(group: &[SampleObservation]) -> (u64, u64) {
    let mut ordered = 0;
    let mut disagreeing = 0;
    for better in group {
        for worse in group
            .iter()
            .filter(|w| w.rule_accuracy < better.rule_accuracy)
        {
            ordered += 1;
            disagreeing += u64::from(worse.rm_score > better.rm_score);
        }
    }
    (ordered, disagreeing)
}

impl StepSummary {
    /// Summarises a step; a non-finite score is an error naming the group and sample.
    pub fn of(step: u64, observation: &StepObservation) -> Result<Self> {
        for (g, group) in observation.groups.iter().enumerate() {
            for (i, s) in group.iter().enumerate() {
                if !s.rule_accuracy.is_finite() || !s.rm_score.is_finite() {
                    return Err(Error::msg(format!(
                        "monitor: step {step} group {g} sample {i}: non-finite score \
                         (rule_accuracy {}, rm_score {})",
                        s.rule_accuracy, s.rm_score
                    )));
                }
            }
        }
        let samples = || observation.groups.iter().flatten();
        let (ordered_pairs, disagreeing_pairs) = observation
            .groups
            .iter()
            .map(|g| rm_rule_disagreement(g))
            .fold((0, 0), |(o, d), (go, gd)| (o + go, d + gd));
        Ok(Self {
            step,
            claims: ClaimCount::of(&observation.flags),
            rule_accuracy: mean(samples().map(|s| s.rule_accuracy)),
            rm_score: mean(samples().map(|s| s.rm_score)),
            response_len: mean(samples().map(|s| s.response_len as f64)),
            ordered_pairs,
            disagreeing_pairs,
        })
    }
}

/// The ordinary least-squares slope of `y` on `x`; `None` with fewer than two points or no spread in x.
pub fn least_squares_slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let x_mean = points.iter().map(|p| p.0).sum::<f64>() / n;
    let y_mean = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - x_mean).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - x_mean) * (p.1 - y_mean)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// The leading signals over the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LeadingSignals {
    /// Least-squares slope of the mean RM score per step.
    pub rm_slope: Option<f64>,
    /// Least-squares slope of the mean rule accuracy per step.
    pub accuracy_slope: Option<f64>,
    /// Relative response-length growth per step: the length slope over the window's mean length.
    pub length_growth: Option<f64>,
    /// Share of rule-ordered within-group pairs the RM orders the other way.
    pub rm_rule_disagreement: Option<f64>,
    /// The RM slope is above its alert while the accuracy slope is within its flat tolerance.
    pub rm_up_accuracy_flat: bool,
}

impl LeadingSignals {
    /// Computes the signals over `window` with the alert thresholds.
    pub fn of<'a>(
        window: impl Iterator<Item = &'a StepSummary> + Clone,
        rm_slope_alert: f64,
        accuracy_flat_tolerance: f64,
    ) -> Self {
        let series = |pick: fn(&StepSummary) -> Option<f64>| -> Vec<(f64, f64)> {
            window
                .clone()
                .filter_map(|s| pick(s).map(|v| (s.step as f64, v)))
                .collect()
        };
        let rm_slope = least_squares_slope(&series(|s| s.rm_score));
        let accuracy_slope = least_squares_slope(&series(|s| s.rule_accuracy));
        let lengths = series(|s| s.response_len);
        let mean_len = mean(lengths.iter().map(|p| p.1));
        let length_growth = least_squares_slope(&lengths)
            .zip(mean_len.filter(|m| *m > 0.0))
            .map(|(slope, m)| slope / m);
        let (ordered, disagreeing) = window
            .map(|s| (s.ordered_pairs, s.disagreeing_pairs))
            .fold((0, 0), |(o, d), (so, sd)| (o + so, d + sd));
        let rm_rule_disagreement = (ordered > 0).then(|| disagreeing as f64 / ordered as f64);
        let rm_up_accuracy_flat = rm_slope.is_some_and(|s| s > rm_slope_alert)
            && accuracy_slope.is_some_and(|s| s.abs() <= accuracy_flat_tolerance);
        Self {
            rm_slope,
            accuracy_slope,
            length_growth,
            rm_rule_disagreement,
            rm_up_accuracy_flat,
        }
    }
}
