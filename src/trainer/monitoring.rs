//! Feeding the hallucination monitor: each step's flags and per-sample signals, the probe set through the
//! generator when it is due, and the calibration the monitor sends back to the reward combiner.

use std::time::Instant;

use r1v2_actors::actor::monitor::{ObserveProbe, ObserveStep};
use r1v2_actors::monitor::{SampleObservation, StepObservation};
use r1v2_actors::protocol::{GenerateGroups, GroupRequest, Verify};
use r1v2_actors::rl::PromptId;

use super::scoring::Scored;
use super::setup::Controller;
use super::steps::{put, Metrics};
use crate::{Error, Result};

/// Probe prompts live in the prompt bank above every dataset index.
const PROBE_ID_BASE: u64 = 1 << 48;

impl Controller {
    /// Feeds the hallucination monitor (and runs the probe set when due); applies a new calibration.
    pub(super) async fn observe(&mut self, scored: &Scored, metrics: &mut Metrics) -> Result<()> {
        let step = self.state.step + 1;
        if let Some(probes) = &self.probes {
            let schedule = self
                .config
                .monitor
                .as_ref()
                .map(|m| m.config.probe)
                .unwrap_or_default();
            if schedule.is_due(step) {
                let started = Instant::now();
                let flags = self.run_probes(probes.clone()).await?;
                put(metrics, "timing_s/probe", started.elapsed().as_secs_f64());
                self.actors
                    .monitor
                    .send(ObserveProbe { step, flags })
                    .await
                    .map_err(|e| Error::Msg(format!("hallucination_monitor: {e}")))?;
            }
        }
        let observation = StepObservation {
            flags: scored
                .verdicts
                .iter()
                .flatten()
                .filter_map(|v| v.hallucination.clone())
                .collect(),
            groups: scored.per_sample(|verdict, rm, response_len| SampleObservation {
                rule_accuracy: f64::from(verdict.score),
                rm_score: rm.unwrap_or(0.0),
                response_len,
            }),
        };
        let report = self
            .watchdog
            .call(
                "hallucination_monitor",
                "ObserveStep",
                self.actors.monitor.send(ObserveStep { step, observation }),
            )
            .await??;
        for (name, value) in report.metrics {
            put(metrics, name, value);
        }
        if let Some(calibrate) = report.calibrate {
            tracing::warn!(step, "reward calibration changed: {}", calibrate.reason);
            self.state.calibration = calibrate.calibration;
        }
        Ok(())
    }

    /// Generates one response per probe prompt with the current policy and returns the grounding flags.
    async fn run_probes(
        &mut self,
        probes: r1v2_actors::monitor::ProbeSet,
    ) -> Result<Vec<r1v2_actors::verifiers::HallucinationFlags>> {
        let mut requests = Vec::with_capacity(probes.items.len());
        for (i, item) in probes.items.iter().enumerate() {
            let prompt_id = PromptId(PROBE_ID_BASE + i as u64);
            self.encode_into_bank(
                prompt_id,
                &item.question,
                &item.images,
                &item.answer,
                &item.verifier,
                Some(item.meta.clone()),
            )?;
            requests.push(GroupRequest {
                prompt_id,
                prompt_index: PROBE_ID_BASE + i as u64,
            });
        }
        let request = self.actors.generator.send(GenerateGroups {
            prompts: requests,
            n: 1,
            params: self.sampling(),
        });
        let rollouts = self
            .watchdog
            .call("policy_generator", "GenerateGroups (probes)", request)
            .await??;
        let items = self.verify_requests(&rollouts)?;
        let verdicts = self
            .watchdog
            .call(
                "rule_verifier",
                "Verify (probes)",
                self.actors.verifier.send(Verify { items }),
            )
            .await?;
        Ok(verdicts
            .verdicts
            .into_iter()
            .filter_map(|v| v.hallucination)
            .collect())
    }
}
