//! Scoring a step's rollouts: rule verdicts and reward-model scores (requested concurrently), the hybrid
//! reward and group advantages; and putting prompts into the prompt bank.

use std::path::PathBuf;
use std::time::Instant;

use r1v2_actors::prompt::EncodedPrompt;
use r1v2_actors::protocol::{Rollouts, Score, ScoreSequence, Verify};
use r1v2_actors::rl::advantages::group_advantages;
use r1v2_actors::rl::reward::{hybrid_rewards, summarise, RewardInputs};
use r1v2_actors::rl::ssb::{GroupSample, SampledGroup};
use r1v2_actors::rl::PromptId;
use r1v2_actors::verifiers::registry::VerifyRequest;
use r1v2_actors::verifiers::Verdict;

use super::setup::Controller;
use super::steps::{mean, put, Metrics};
use crate::Result;

/// Rollouts and everything the scorers said about them.
pub(super) struct Scored {
    pub(super) rollouts: Rollouts,
    /// `verdicts[group][sample]`.
    pub(super) verdicts: Vec<Vec<Verdict>>,
    /// `rm[group][sample]`, when there is a reward model.
    pub(super) rm: Option<Vec<Vec<f32>>>,
}

impl Scored {
    /// `f(verdict, rm score, response tokens)` for every sample, grouped like the rollouts.
    pub(super) fn per_sample<T>(
        &self,
        f: impl Fn(&Verdict, Option<f64>, usize) -> T,
    ) -> Vec<Vec<T>> {
        self.verdicts
            .iter()
            .enumerate()
            .map(|(g, verdicts)| {
                verdicts
                    .iter()
                    .enumerate()
                    .map(|(i, verdict)| {
                        let rm = self.rm.as_ref().map(|rm| f64::from(rm[g][i]));
                        f(
                            verdict,
                            rm,
                            self.rollouts.groups[g].rollouts[i].token_ids.len(),
                        )
                    })
                    .collect()
            })
            .collect()
    }
}

/// Whether a verdict stands for a verifier that failed (error, panic, timeout, crashed or hung plugin) rather
/// than a judgement: the registry and the plugin runner word these reasons.
fn is_failure(verdict: &Verdict) -> bool {
    const MARKS: [&str; 7] = [
        "plugin restarted",
        "panicked",
        "timed out",
        "failed:",
        "exited",
        "malformed reply",
        "no verifier named",
    ];
    verdict.score == 0.0 && MARKS.iter().any(|mark| verdict.reason.contains(mark))
}

impl Controller {
    /// Encodes a prompt into the bank under `id`, once.
    pub(super) fn encode_into_bank(
        &self,
        id: PromptId,
        question: &str,
        images: &[PathBuf],
        answer: &str,
        verifier: &str,
        meta: Option<serde_json::Value>,
    ) -> Result<()> {
        if self.bank.contains(id) {
            return Ok(());
        }
        let encoded = self.encoder.encode(question, images)?;
        self.bank.insert(EncodedPrompt {
            id,
            token_ids: encoded.token_ids,
            pixel_values: encoded.pixel_values,
            answer: answer.to_string(),
            verifier: verifier.to_string(),
            question: question.to_string(),
            meta,
        });
        Ok(())
    }

    /// One verifier request per rollout, in order.
    pub(super) fn verify_requests(&self, rollouts: &Rollouts) -> Result<Vec<VerifyRequest>> {
        let mut items = Vec::new();
        for group in &rollouts.groups {
            let prompt = self.bank.get(group.prompt_id)?;
            for rollout in &group.rollouts {
                items.push(VerifyRequest {
                    verifier: prompt.verifier.clone(),
                    prompt: prompt.question.clone(),
                    response: rollout.text.clone(),
                    answer: prompt.answer.clone(),
                    meta: prompt.meta.clone().unwrap_or(serde_json::Value::Null),
                });
            }
        }
        Ok(items)
    }

    /// Rule verdicts and RM scores of `rollouts`, requested concurrently.
    pub(super) async fn score(&self, rollouts: Rollouts, metrics: &mut Metrics) -> Result<Scored> {
        let items = self.verify_requests(&rollouts)?;
        let mut sequences = Vec::new();
        for group in &rollouts.groups {
            let prompt = self.bank.get(group.prompt_id)?;
            for rollout in &group.rollouts {
                let mut ids = prompt.token_ids.clone();
                ids.extend(&rollout.token_ids);
                sequences.push(ScoreSequence {
                    attention_mask: vec![1; ids.len()],
                    token_ids: ids,
                });
            }
        }
        let started = Instant::now();
        let watchdog = self.watchdog.clone();
        let verify = self.actors.verifier.send(Verify { items });
        let score = self
            .actors
            .reward
            .as_ref()
            .map(|rm| rm.send(Score { sequences }));
        let verify = async {
            let reply = watchdog.call("rule_verifier", "Verify", verify).await;
            (reply, started.elapsed())
        };
        let score = async {
            match score {
                Some(request) => {
                    let reply = watchdog.call("reward_model", "Score", request).await;
                    Some((reply, started.elapsed()))
                }
                None => None,
            }
        };
        let ((verdicts, verify_time), score) = futures_util::future::join(verify, score).await;
        put(metrics, "timing_s/verify", verify_time.as_secs_f64());
        let verdicts = verdicts?.verdicts;
        let failed = verdicts.iter().filter(|v| is_failure(v)).count();
        if failed > 0 {
            tracing::warn!(
                failed,
                "verifier failures scored 0 (see the verdict reasons)"
            );
        }
        put(metrics, "verify/failures", failed as f64);
        let rm = match score {
            Some((reply, time)) => {
                put(metrics, "timing_s/reward", time.as_secs_f64());
                Some(reply??.scores)
            }
            None => {
                put(metrics, "timing_s/reward", 0.0);
                None
            }
        };
        // Back into groups.
        let mut verdicts = verdicts.into_iter();
        let mut scores = rm.map(|s| s.into_iter());
        let mut by_group = Vec::with_capacity(rollouts.groups.len());
        let mut rm_by_group = scores.as_ref().map(|_| Vec::new());
        for group in &rollouts.groups {
            let n = group.rollouts.len();
            by_group.push(verdicts.by_ref().take(n).collect::<Vec<_>>());
            if let (Some(scores), Some(out)) = (scores.as_mut(), rm_by_group.as_mut()) {
                out.push(scores.by_ref().take(n).collect::<Vec<_>>());
            }
        }
        Ok(Scored {
            rollouts,
            verdicts: by_group,
            rm: rm_by_group,
        })
    }

    /// Hybrid rewards and group advantages of a scored batch, as sample-buffer groups; logs reward/*.
    pub(super) fn reward_groups(
        &mut self,
        scored: &Scored,
        metrics: &mut Metrics,
    ) -> Result<Vec<SampledGroup>> {
        let inputs = scored.per_sample(|verdict, rm_raw, _| RewardInputs {
            rule: f64::from(verdict.score),
            rule_correct: Some(verdict.score >= 1.0),
            rm_raw,
            format: f64::from(u8::from(verdict.format_ok)),
        });
        let rewards = hybrid_rewards(&inputs, &self.config.rl.reward, &self.state.calibration)?;
        let summary = summarise(&rewards);
        let totals: Vec<Vec<f64>> = rewards
            .iter()
            .map(|g| g.iter().map(|r| r.total).collect())
            .collect();
        let all: Vec<f64> = totals.iter().flatten().copied().collect();
        let reward_mean = mean(all.iter().copied());
        let reward_std = (mean(all.iter().map(|r| (r - reward_mean).powi(2)))).sqrt();
        put(metrics, "reward/mean", reward_mean);
        put(metrics, "reward/std", reward_std);
        put(metrics, "reward/rule", summary.rule_term);
        put(metrics, "reward/rm", summary.rm_term);
        put(metrics, "reward/format", summary.format_term);
        put(
            metrics,
            "reward/accuracy",
            mean(scored.verdicts.iter().flatten().map(|v| f64::from(v.score))),
        );
        put(
            metrics,
            "calibration/rm_threshold",
            self.state.calibration.rm_threshold,
        );
        let correct: Vec<Vec<bool>> = scored
            .verdicts
            .iter()
            .map(|g| g.iter().map(|v| v.score >= 1.0).collect())
            .collect();
        let advantages = group_advantages(&totals, Some(&correct), &self.config.rl.advantage)?;
        let version = scored.rollouts.policy_version;
        Ok(scored
            .rollouts
            .groups
            .iter()
            .enumerate()
            .map(|(g, group)| SampledGroup {
                prompt_id: group.prompt_id,
                policy_version: version,
                samples: group
                    .rollouts
                    .iter()
                    .enumerate()
                    .map(|(i, rollout)| GroupSample {
                        token_ids: rollout.token_ids.clone(),
                        behaviour_logprobs: rollout.behaviour_logprobs.clone(),
                        reward: totals[g][i],
                        advantage: advantages.advantages[g][i],
                        correct: Some(correct[g][i]),
                    })
                    .collect(),
            })
            .collect())
    }
}
