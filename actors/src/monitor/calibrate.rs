//! Calibration moves: bounded steps of the RM threshold and weight, with floors and a ceiling at the
//! run's initial calibration, and the logged record of each change.

use serde::{Deserialize, Serialize};

use super::config::CalibrationPolicy;
use crate::rl::config::Calibration;

/// One change of the calibration, logged and kept in the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationChange {
    /// The training step at which the change was made.
    pub step: u64,
    /// The calibration before.
    pub old: Calibration,
    /// The calibration after.
    pub new: Calibration,
    /// Why, in words: the rate, its source, the bound, and what moved.
    pub reason: String,
}

/// `bound` when `value` is within rounding error of it (0.8 - 0.1 lands on 0.7, not 0.7000000000000001).
fn snap(value: f64, bound: f64) -> f64 {
    if (value - bound).abs() <= 1e-9 {
        bound
    } else {
        value
    }
}

/// One tightening step: the threshold drops by `threshold_step` and the weight by `weight_step`, neither
/// below its floor (nor above where it already is, should it start under its floor). `None` when both
/// already sit at their floors.
pub fn tightened(policy: &CalibrationPolicy, current: Calibration) -> Option<Calibration> {
    let step_down =
        |value: f64, step: f64, floor: f64| snap(value - step, floor).max(floor).min(value);
    let next = Calibration {
        rm_threshold: step_down(
            current.rm_threshold,
            policy.threshold_step,
            policy.threshold_floor,
        ),
        rm_weight: step_down(current.rm_weight, policy.weight_step, policy.weight_floor),
    };
    (next != current).then_some(next)
}

/// One relaxation step back towards `baseline` (the run's initial calibration), never past it. `None`
/// when already there.
pub fn relaxed(
    policy: &CalibrationPolicy,
    current: Calibration,
    baseline: Calibration,
) -> Option<Calibration> {
    let step_up =
        |value: f64, step: f64, ceiling: f64| snap(value + step, ceiling).min(ceiling).max(value);
    let next = Calibration {
        rm_threshold: step_up(
            current.rm_threshold,
            policy.threshold_step,
            baseline.rm_threshold,
        ),
        rm_weight: step_up(current.rm_weight, policy.weight_step, baseline.rm_weight),
    };
    (next != current).then_some(next)
}

/// "rm_threshold 1.00 -> 0.75, rm_weight 1.00 -> 0.90" (only what moved).
pub fn describe_move(old: Calibration, new: Calibration) -> String {
    let mut parts = Vec::new();
    if old.rm_threshold != new.rm_threshold {
        parts.push(format!(
            "rm_threshold {:.3} -> {:.3}",
            old.rm_threshold, new.rm_threshold
        ));
    }
    if old.rm_weight != new.rm_weight {
        parts.push(format!(
            "rm_weight {:.3} -> {:.3}",
            old.rm_weight, new.rm_weight
        ));
    }
    parts.join(", ")
}
