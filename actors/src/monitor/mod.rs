//! The hallucination monitor as pure state (r1v2-method.md section 5; issue 6, "Hallucination monitor").
//!
//! | file | what it holds |
//! |---|---|
//! | [`config`] | [`MonitorConfig`], [`CalibrationPolicy`], [`ProbeSchedule`] |
//! | [`signals`] | per-step summaries, least-squares slopes, RM-rule disagreement |
//! | [`calibrate`] | bounded tightening / relaxation moves and the [`CalibrationChange`] record |
//! | [`probe`] | the probe set (prompts with image annotations) |
//! | [`state`] | [`HallucinationMonitor`]: window, probe result, calibration, change log (serde) |
//!
//! The rate is CHAIR-i (unsupported claims / claims) from the grounding verifier's
//! [`crate::verifiers::HallucinationFlags`]. The actor that wraps this state calls, each step:
//! [`HallucinationMonitor::observe_step`], [`HallucinationMonitor::observe_probe`] when
//! [`HallucinationMonitor::probe_due`], then [`HallucinationMonitor::calibrate`] and
//! [`HallucinationMonitor::metrics`].

pub mod calibrate;
pub mod config;
pub mod probe;
pub mod signals;
pub mod state;

pub use calibrate::CalibrationChange;
pub use config::{CalibrationPolicy, MonitorConfig, ProbeSchedule, RateSource};
pub use probe::{ProbeItem, ProbeSet};
pub use signals::{LeadingSignals, SampleObservation, StepObservation};
pub use state::{HallucinationMonitor, ProbeResult};

/// Metric names (design.md, metrics.jsonl).
pub mod names {
    /// CHAIR-i over the window's training samples.
    pub const RATE: &str = "hallucination/rate";
    /// CHAIR-i of the latest probe run.
    pub const PROBE_RATE: &str = "hallucination/probe_rate";
    /// Share of rule-ordered within-group pairs the RM orders the other way.
    pub const RM_RULE_DISAGREEMENT: &str = "hallucination/rm_rule_disagreement";
    /// Least-squares slope of the mean RM score per step over the window.
    pub const RM_SLOPE: &str = "hallucination/rm_slope";
    /// Least-squares slope of the mean rule accuracy per step over the window.
    pub const ACCURACY_SLOPE: &str = "hallucination/accuracy_slope";
    /// Relative response-length growth per step over the window.
    pub const LENGTH_GROWTH: &str = "hallucination/length_growth";
    /// 1 when the RM score rises while rule accuracy is flat, else 0.
    pub const RM_UP_ACCURACY_FLAT: &str = "hallucination/rm_up_accuracy_flat";
    /// The current RM threshold.
    pub const RM_THRESHOLD: &str = "calibration/rm_threshold";
    /// The current RM weight.
    pub const RM_WEIGHT: &str = "calibration/rm_weight";
}
