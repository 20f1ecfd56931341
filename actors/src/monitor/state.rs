//! The hallucination monitor's state: the sliding window of step summaries, the latest probe result,
//! the current calibration and its change log. Everything serialises for the checkpoint.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::calibrate::{describe_move, relaxed, tightened, CalibrationChange};
use super::config::{MonitorConfig, RateSource};
use super::names;
use super::signals::{ClaimCount, LeadingSignals, StepObservation, StepSummary};
use crate::rl::config::Calibration;
use crate::verifiers::HallucinationFlags;
use crate::{Error, Result};

/// The outcome of one probe-set run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The training step at which the probe ran.
    pub step: u64,
    /// Claims over the probe responses.
    pub claims: ClaimCount,
    /// Probe responses with flags.
    pub responses: u64,
    /// Of those, responses with at least one unsupported claim (CHAIR-s numerator).
    pub hallucinating: u64,
}

/// The hallucination monitor (r1v2-method.md section 5). Fed each step with the verdicts' flags and the
/// samples' rule accuracy, RM score and length, and with each probe run; proposes calibration changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HallucinationMonitor {
    config: MonitorConfig,
    /// The run's initial calibration: the ceiling of any relaxation.
    baseline: Calibration,
    calibration: Calibration,
    window: VecDeque<StepSummary>,
    last_probe: Option<ProbeResult>,
    last_change_step: Option<u64>,
    /// The step since which the compared rate has stayed at or under the bound.
    under_bound_since: Option<u64>,
    changes: Vec<CalibrationChange>,
}

impl HallucinationMonitor {
    /// A fresh monitor starting from the reward's `initial` calibration; both configs are validated.
    pub fn new(config: MonitorConfig, initial: Calibration) -> Result<Self> {
        config.validate()?;
        initial.validate()?;
        Ok(Self {
            config,
            baseline: initial,
            calibration: initial,
            window: VecDeque::with_capacity(config.window),
            last_probe: None,
            last_change_step: None,
            under_bound_since: None,
            changes: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MonitorConfig {
        &self.config
    }

    /// The calibration the reward combiner should use now.
    pub fn calibration(&self) -> Calibration {
        self.calibration
    }

    /// Every change made so far, oldest first.
    pub fn changes(&self) -> &[CalibrationChange] {
        &self.changes
    }

    /// The latest probe result.
    pub fn last_probe(&self) -> Option<&ProbeResult> {
        self.last_probe.as_ref()
    }

    /// Whether the probe set runs at `step`.
    pub fn probe_due(&self, step: u64) -> bool {
        self.config.probe.is_due(step)
    }

    /// Records a training step. Steps must increase; a non-finite score is an error naming the sample.
    pub fn observe_step(&mut self, step: u64, observation: &StepObservation) -> Result<()> {
        if let Some(last) = self.window.back().filter(|last| last.step >= step) {
            return Err(Error::msg(format!(
                "monitor: step {step} observed after step {}",
                last.step
            )));
        }
        self.window.push_back(StepSummary::of(step, observation)?);
        while self.window.len() > self.config.window {
            self.window.pop_front();
        }
        Ok(())
    }

    /// Records a probe run's flags (one per probe response).
    pub fn observe_probe(&mut self, step: u64, flags: &[HallucinationFlags]) {
        self.last_probe = Some(ProbeResult {
            step,
            claims: ClaimCount::of(flags),
            responses: flags.len() as u64,
            hallucinating: flags.iter().filter(|f| !f.unsupported.is_empty()).count() as u64,
        });
    }

    /// Claims over the window's training samples.
    pub fn window_claims(&self) -> ClaimCount {
        self.window
            .iter()
            .fold(ClaimCount::default(), |acc, s| ClaimCount {
                claims: acc.claims + s.claims.claims,
                unsupported: acc.unsupported + s.claims.unsupported,
            })
    }

    /// CHAIR-i over the window's training samples.
    pub fn rate(&self) -> Option<f64> {
        self.window_claims().rate()
    }

    /// CHAIR-i of the latest probe run.
    pub fn probe_rate(&self) -> Option<f64> {
        self.last_probe.and_then(|p| p.claims.rate())
    }

    /// The leading signals over the window.
    pub fn signals(&self) -> LeadingSignals {
        LeadingSignals::of(
            self.window.iter(),
            self.config.rm_slope_alert,
            self.config.accuracy_flat_tolerance,
        )
    }

    /// The rate compared with the bound: (rate, its claims, the step it was measured at, source name);
    /// `None` when it rests on fewer than `min_claims` claims.
    fn compared_rate(&self) -> Option<(f64, ClaimCount, u64, &'static str)> {
        let (claims, at, source) = match self.config.rate_source {
            RateSource::Probe => {
                let probe = self.last_probe?;
                (probe.claims, probe.step, "probe")
            }
            RateSource::Training => (self.window_claims(), self.window.back()?.step, "training"),
        };
        let rate = claims
            .rate()
            .filter(|_| claims.claims >= self.config.min_claims)?;
        Some((rate, claims, at, source))
    }

    /// Decides at `step` whether the calibration moves: it tightens by one bounded step when the compared
    /// rate is above the bound, the cooldown has passed and the rate was measured after the last change;
    /// it relaxes by one step towards the initial calibration (if `relax_after_steps > 0`) when the rate
    /// has stayed at or under the bound that long. Returns the change, also kept in [`Self::changes`].
    pub fn calibrate(&mut self, step: u64) -> Option<CalibrationChange> {
        let policy = self.config.calibration;
        if !policy.enabled {
            return None;
        }
        let (rate, claims, measured_at, source) = self.compared_rate()?;
        let cooled = self
            .last_change_step
            .is_none_or(|last| step >= last + policy.cooldown_steps);
        let fresh = self.last_change_step.is_none_or(|last| measured_at > last);
        let bound = self.config.rate_bound;
        let evidence = format!(
            "{source} hallucination rate {rate:.3} ({}/{} claims, step {measured_at})",
            claims.unsupported, claims.claims
        );
        let (new, reason) = if rate > bound {
            self.under_bound_since = None;
            if !(cooled && fresh) {
                return None;
            }
            let new = tightened(&policy, self.calibration)?;
            let why = format!("{evidence} > bound {bound:.3}: tighten");
            (new, why)
        } else {
            let since = *self.under_bound_since.get_or_insert(measured_at);
            let waited = step.saturating_sub(since);
            if policy.relax_after_steps == 0 || waited < policy.relax_after_steps || !cooled {
                return None;
            }
            let new = relaxed(&policy, self.calibration, self.baseline)?;
            self.under_bound_since = Some(step);
            let why = format!("{evidence} <= bound {bound:.3} for {waited} steps: relax");
            (new, why)
        };
        let change = CalibrationChange {
            step,
            old: self.calibration,
            new,
            reason: format!("{reason} {}", describe_move(self.calibration, new)),
        };
        self.calibration = new;
        self.last_change_step = Some(step);
        self.changes.push(change.clone());
        Some(change)
    }

    /// The metrics to log, as (name, value) pairs; a value not yet defined (no claims, fewer than two
    /// steps, no probe run yet) is logged as 0.0 so every key is present on every step.
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        let signals = self.signals();
        vec![
            (names::RATE, self.rate().unwrap_or(0.0)),
            (names::PROBE_RATE, self.probe_rate().unwrap_or(0.0)),
            (
                names::RM_RULE_DISAGREEMENT,
                signals.rm_rule_disagreement.unwrap_or(0.0),
            ),
            (names::RM_SLOPE, signals.rm_slope.unwrap_or(0.0)),
            (names::ACCURACY_SLOPE, signals.accuracy_slope.unwrap_or(0.0)),
            (names::LENGTH_GROWTH, signals.length_growth.unwrap_or(0.0)),
            (
                names::RM_UP_ACCURACY_FLAT,
                f64::from(u8::from(signals.rm_up_accuracy_flat)),
            ),
            (names::RM_THRESHOLD, self.calibration.rm_threshold),
            (names::RM_WEIGHT, self.calibration.rm_weight),
        ]
    }
}
