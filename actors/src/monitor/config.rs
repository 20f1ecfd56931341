//! Configuration of the hallucination monitor and of its calibration policy.

use serde::{Deserialize, Serialize};

use crate::Result;

use crate::error::check;

/// Which measured rate is compared with [`MonitorConfig::rate_bound`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RateSource {
    /// The latest probe-set rate: a fixed set, so comparable over the run (r1v2-method.md section 5).
    #[default]
    Probe,
    /// The rate over the training samples of the sliding window (depends on the batch's prompts).
    Training,
}

/// When the probe set runs through the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSchedule {
    /// Run the probe set at every step that is a multiple of this (step 0 included); 0 never runs it.
    pub every_n_steps: u64,
}

impl Default for ProbeSchedule {
    fn default() -> Self {
        Self { every_n_steps: 50 }
    }
}

impl ProbeSchedule {
    /// Whether the probe set runs at `step`.
    pub fn is_due(&self, step: u64) -> bool {
        self.every_n_steps > 0 && step.is_multiple_of(self.every_n_steps)
    }
}

/// How the monitor moves the RM threshold and weight ([`crate::rl::config::Calibration`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrationPolicy {
    /// Whether the monitor changes the calibration at all (false: it only measures and logs).
    pub enabled: bool,
    /// Amount `rm_threshold` drops per tightening (default 0.25: a quarter of the default cap of 1.0).
    pub threshold_step: f64,
    /// Amount `rm_weight` drops per tightening (default 0.1 of the default weight 1.0).
    pub weight_step: f64,
    /// `rm_threshold` never goes below this (default 0.0: the RM can still rank, never above the mean).
    pub threshold_floor: f64,
    /// `rm_weight` never goes below this (default 0.25: the RM keeps a voice).
    pub weight_floor: f64,
    /// At least this many steps between two changes, so a change's effect can be measured (default 20).
    pub cooldown_steps: u64,
    /// Step back towards the run's initial calibration after the rate has stayed at or under the bound
    /// for this many steps (default 0: never relax).
    pub relax_after_steps: u64,
}

impl Default for CalibrationPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold_step: 0.25,
            weight_step: 0.1,
            threshold_floor: 0.0,
            weight_floor: 0.25,
            cooldown_steps: 20,
            relax_after_steps: 0,
        }
    }
}

/// The hallucination monitor (r1v2-method.md section 5; design.md, actor HallucinationMonitor).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Steps kept in the sliding window for the training rate, the slopes and the disagreement (default 50).
    pub window: usize,
    /// When the probe set runs.
    pub probe: ProbeSchedule,
    /// The hallucination-rate bound (CHAIR-i, unsupported claims / claims) above which the calibration
    /// tightens (default 0.10: between the paper's MPO 8.7% and SFT 12.1%, Table 3).
    pub rate_bound: f64,
    /// Which rate is compared with the bound.
    pub rate_source: RateSource,
    /// The rate counts only when it rests on at least this many claims (default 20).
    pub min_claims: u64,
    /// RM-score slope per step above which the RM counts as rising (default 0.002).
    pub rm_slope_alert: f64,
    /// Rule-accuracy slope per step within +- this counts as flat (default 0.001).
    pub accuracy_flat_tolerance: f64,
    /// How the calibration moves.
    pub calibration: CalibrationPolicy,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            window: 50,
            probe: ProbeSchedule::default(),
            rate_bound: 0.10,
            rate_source: RateSource::Probe,
            min_claims: 20,
            rm_slope_alert: 0.002,
            accuracy_flat_tolerance: 0.001,
            calibration: CalibrationPolicy::default(),
        }
    }
}

impl MonitorConfig {
    /// Checks every field; the error names the key.
    pub fn validate(&self) -> Result<()> {
        check(
            self.window >= 2,
            "monitor.window",
            "must be >= 2 (a slope needs two points)",
        )?;
        check(
            (0.0..=1.0).contains(&self.rate_bound),
            "monitor.rate_bound",
            "must be in [0, 1]",
        )?;
        check(
            self.rm_slope_alert.is_finite(),
            "monitor.rm_slope_alert",
            "must be finite",
        )?;
        check(
            self.accuracy_flat_tolerance >= 0.0 && self.accuracy_flat_tolerance.is_finite(),
            "monitor.accuracy_flat_tolerance",
            "must be finite and >= 0",
        )?;
        let c = &self.calibration;
        check(
            c.threshold_step > 0.0 && c.threshold_step.is_finite(),
            "monitor.calibration.threshold_step",
            "must be finite and > 0",
        )?;
        check(
            c.weight_step > 0.0 && c.weight_step.is_finite(),
            "monitor.calibration.weight_step",
            "must be finite and > 0",
        )?;
        check(
            c.threshold_floor.is_finite(),
            "monitor.calibration.threshold_floor",
            "must be finite",
        )?;
        check(
            c.weight_floor >= 0.0 && c.weight_floor.is_finite(),
            "monitor.calibration.weight_floor",
            "must be finite and >= 0",
        )
    }
}
