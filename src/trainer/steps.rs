//! One step of each stage, as the controller reads it (design.md "One GRPO step"):
//!
//! ```text
//! prompts  = data.next_batch()                           (encoded once into the prompt bank)
//! rollouts = generator.GenerateGroups(prompts, n = G)    (async mode: requested one step ahead)
//! verdicts, rm = verifier.Verify || reward.Score         (concurrently)
//! rewards  = hybrid_rewards(verdicts, rm, calibration);  advantages = group_advantages(rewards)
//! batch    = buffer.ScoredGroups; buffer.NextBatch       (SSB: drop zero-advantage, replay by |A|)
//! update   = optimizer.TrainGrpo(batch)                  -> new weights, metrics
//! generator.SyncWeights(update.weights)                  (version checked)
//! monitor.ObserveStep / probes                           -> maybe a new calibration
//! ```
//! MPO mines one pair per group from the same scoring and trains with TrainMpo; SFT trains on the dataset's
//! reference answers with TrainSft. Every stage is timed (`timing_s/*`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use actix::Handler;
use r1v2_actors::actor::optimizer::{Optimizer, RefreshReference};
use r1v2_actors::actor::policy_generator::PolicyGenerator;
use r1v2_actors::actor::sample_buffer::SampleBuffer;
use r1v2_actors::protocol::{
    FinishReason, GenerateGroups, GroupRequest, MpoPair, NextBatch, Rollouts, ScoredGroups,
    SftExample, SyncWeights, TrainBatch, TrainGrpo, TrainMpo, TrainSft, UpdateReport,
};
use r1v2_actors::rl::mpo::{mine_pairs, ScoredGroup, ScoredResponse, VerifierOutcome};
use r1v2_actors::rl::PromptId;
use tracing::Instrument;

use super::setup::Controller;
use super::{stage_at, RunSummary};
use crate::config::{ScheduleMode, Stage};
use crate::{Error, Result};

/// Async mode: the next step's prompts and their generation request, already in the generator's mailbox.
pub type Prefetched = (
    Vec<GroupRequest>,
    actix::dev::Request<PolicyGenerator, GenerateGroups>,
);

/// A step's metrics by design.md name.
pub(super) type Metrics = BTreeMap<String, f64>;

pub(super) fn put(metrics: &mut Metrics, name: &str, value: f64) {
    metrics.insert(name.to_string(), value);
}

pub(super) fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

impl Controller {
    /// Runs the schedule from the current step to its end (or a Ctrl-C, or an error).
    pub async fn run(&mut self) -> Result<RunSummary> {
        let total = self.config.total_steps();
        let mut interrupted = false;
        let mut checkpointed_at = self.last_checkpoint.as_ref().map(|_| self.state.step);
        while self.state.step < total {
            if self.stop.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            // Validation guarantees a stage for every step below the total.
            let Some((stage, offset)) = stage_at(&self.config.stages, self.state.step) else {
                break;
            };
            let stage = stage.clone();
            let span =
                tracing::info_span!("stage", stage = stage.name(), step = self.state.step + 1);
            // Each RL stage's reference (MPO's DPO/BCO terms, GRPO's KL) is the policy it starts from: after
            // the SFT warm start, after the MPO rounds. (On resume mid-stage the checkpoint holds it.)
            if offset == 0 && self.state.step > 0 && !matches!(stage, Stage::Sft { .. }) {
                self.refresh_reference().await?;
                tracing::info!(
                    stage = stage.name(),
                    "reference policy reset to the current policy"
                );
            }
            let before = (self.loader.cursor(), self.state.clone());
            let started = Instant::now();
            let outcome = match &stage {
                Stage::Sft { .. } => self.sft_step().instrument(span).await,
                Stage::Mpo {
                    steps_per_round, ..
                } => {
                    let new_round = offset > 0 && offset.is_multiple_of(*steps_per_round);
                    self.mpo_step(new_round).instrument(span).await
                }
                Stage::Grpo { .. } => self.grpo_step().instrument(span).await,
            };
            let mut metrics = match outcome {
                Ok(metrics) => metrics,
                Err(error) => {
                    if self.watchdog.stalled().is_some() {
                        self.checkpoint_after_stall(before).await;
                    }
                    self.progress.finish();
                    return Err(error);
                }
            };
            put(
                &mut metrics,
                "timing_s/step",
                started.elapsed().as_secs_f64(),
            );
            self.state.step += 1;
            let step = self.state.step;
            self.metrics.write(step, &metrics)?;
            let reward = metrics
                .get("reward/mean")
                .copied()
                .filter(|r| r.is_finite());
            self.progress.update(step, reward);
            tracing::info!(
                step,
                stage = stage.name(),
                reward = reward.unwrap_or(f64::NAN),
                version = self.state.policy_version,
                "step {step}/{total} done in {:.2} s",
                started.elapsed().as_secs_f64()
            );
            self.last_metrics = metrics;
            let every = self.config.run.checkpoint_every;
            if every > 0 && step.is_multiple_of(every) {
                self.checkpoint().await?;
                checkpointed_at = Some(step);
            }
        }
        if checkpointed_at != Some(self.state.step) {
            self.checkpoint().await?;
        }
        self.progress.finish();
        if interrupted {
            tracing::warn!(
                step = self.state.step,
                "stopped by Ctrl-C; continue with --resume {}",
                self.run.root().display()
            );
        }
        Ok(RunSummary {
            step: self.state.step,
            total_steps: total,
            last_checkpoint: self.last_checkpoint.clone(),
            interrupted,
            last_metrics: self.last_metrics.clone(),
        })
    }

    /// After a stall: puts the step's counters back and writes a checkpoint of the last completed step, if
    /// the actors still answer; says so either way.
    async fn checkpoint_after_stall(
        &mut self,
        before: (crate::data::DataCursor, super::state::LoopState),
    ) {
        let (cursor, state) = before;
        self.state = state;
        match crate::data::DataLoader::with_cursor(
            self.loader.samples().to_vec(),
            self.config.data.prompts_per_step,
            cursor,
        ) {
            Ok(loader) => self.loader = loader,
            Err(error) => tracing::error!(%error, "watchdog: cannot rewind the data loader"),
        }
        match self.checkpoint().await {
            Ok(dir) => tracing::error!(
                "watchdog: stopped the run; checkpoint of step {} written to {}",
                self.state.step,
                dir.display()
            ),
            Err(error) => tracing::error!(
                %error,
                "watchdog: stopped the run; no checkpoint could be written (the last one stands)"
            ),
        }
    }

    /// The next batch of prompts, encoded into the prompt bank, each with its place in the prompt stream.
    fn next_requests(&mut self) -> Result<Vec<GroupRequest>> {
        let batch = self.loader.next_batch();
        let mut requests = Vec::with_capacity(batch.len());
        for sample in batch {
            // Every sample handed out by the loader came from `samples`, which `index_of` indexes.
            let index = self.index_of[&sample.id];
            let prompt_id = PromptId(index as u64);
            self.encode_into_bank(
                prompt_id,
                &sample.question,
                &sample.images,
                &sample.answer,
                &sample.verifier,
                sample.meta.clone(),
            )?;
            requests.push(GroupRequest {
                prompt_id,
                prompt_index: self.state.prompts_drawn,
            });
            self.state.prompts_drawn += 1;
        }
        Ok(requests)
    }

    pub(super) fn sampling(&self) -> r1v2_actors::generate::SamplingParams {
        let mut params = self.config.generation.sampling.clone();
        if params.stop_token_ids.is_empty() {
            params.stop_token_ids = self.encoder.stop_token_ids();
        }
        if params.seed == 0 {
            params.seed = self.config.run.seed;
        }
        params
    }

    fn generate_request(
        &self,
        requests: Vec<GroupRequest>,
    ) -> actix::dev::Request<PolicyGenerator, GenerateGroups> {
        self.actors.generator.send(GenerateGroups {
            prompts: requests,
            n: self.config.generation.group_size,
            params: self.sampling(),
        })
    }

    /// This step's rollouts: requested now (sync), or the request made one step ahead (async), in which
    /// case the next step's request goes out before this one is scored.
    async fn rollouts(&mut self, metrics: &mut Metrics) -> Result<Rollouts> {
        let started = Instant::now();
        let request = match self.prefetched.take() {
            Some((_, request)) => request,
            None => {
                let requests = self.next_requests()?;
                self.generate_request(requests)
            }
        };
        let rollouts = self
            .watchdog
            .call("policy_generator", "GenerateGroups", request)
            .await??;
        if self.config.run.mode == ScheduleMode::Async
            && self.state.step + 1 < self.config.total_steps()
        {
            let next = self.next_requests()?;
            let request = self.generate_request(next.clone());
            self.prefetched = Some((next, request));
        }
        let seconds = started.elapsed().as_secs_f64();
        put(metrics, "timing_s/gen", seconds);
        put(
            metrics,
            "perf/tokens_per_s",
            rollouts.tokens as f64 / seconds.max(1e-9),
        );
        let lengths: Vec<f64> = rollouts
            .groups
            .iter()
            .flat_map(|g| g.rollouts.iter().map(|r| r.token_ids.len() as f64))
            .collect();
        put(
            metrics,
            "response_length/mean",
            mean(lengths.iter().copied()),
        );
        let clipped = rollouts
            .groups
            .iter()
            .flat_map(|g| &g.rollouts)
            .filter(|r| r.finish_reason == FinishReason::Length)
            .count();
        put(
            metrics,
            "response_length/clip_ratio",
            clipped as f64 / lengths.len().max(1) as f64,
        );
        Ok(rollouts)
    }

    /// The sample buffer's next batch; a failed request (the buffer panicked and was restarted with its
    /// state rolled back) is sent again.
    async fn next_batch(&self) -> Result<TrainBatch> {
        let request = NextBatch {
            target: self.config.data.prompts_per_step,
            policy_version: self.state.policy_version,
        };
        let buffer: &actix::Addr<SampleBuffer> = &self.actors.buffer;
        match self
            .watchdog
            .call("sample_buffer", "NextBatch", buffer.send(request))
            .await?
        {
            Ok(batch) => Ok(batch),
            Err(error) => {
                tracing::warn!(%error, "sample_buffer failed; its supervisor restarted it, re-sending NextBatch");
                self.watchdog
                    .call("sample_buffer", "NextBatch", buffer.send(request))
                    .await?
                    .map_err(Error::from)
            }
        }
    }

    /// Publishes an update's weights to the generator and checks the version it now holds.
    async fn sync(&mut self, update: &UpdateReport, metrics: &mut Metrics) -> Result<()> {
        let started = Instant::now();
        let version = update.weights.version;
        let held = self
            .watchdog
            .call(
                "policy_generator",
                "SyncWeights",
                self.actors.generator.send(SyncWeights {
                    weights: update.weights.clone(),
                }),
            )
            .await??;
        if held != version {
            return Err(Error::Msg(format!(
                "SyncWeights: the generator holds policy version {held}, the optimizer published {version}"
            )));
        }
        self.state.policy_version = version;
        put(metrics, "timing_s/sync", started.elapsed().as_secs_f64());
        for (name, value) in &update.metrics {
            put(metrics, name, *value);
        }
        Ok(())
    }

    /// Sends one update to the optimizer, then its weights to the generator; logs the update's metrics.
    async fn train_and_sync<M>(&mut self, message: M, metrics: &mut Metrics) -> Result<()>
    where
        M: actix::Message<Result = r1v2_actors::Result<UpdateReport>> + Send + 'static,
        Optimizer: Handler<M>,
    {
        // "r1v2_actors::protocol::TrainGrpo" -> "TrainGrpo", for the watchdog's messages.
        let name = std::any::type_name::<M>()
            .rsplit("::")
            .next()
            .unwrap_or("Train");
        let started = Instant::now();
        let update = self
            .watchdog
            .call("optimizer", name, self.actors.optimizer.send(message))
            .await??;
        put(metrics, "timing_s/update", started.elapsed().as_secs_f64());
        put(metrics, "actor/skipped", 0.0);
        self.sync(&update, metrics).await
    }

    /// Makes the current policy the optimizer's frozen reference.
    async fn refresh_reference(&self) -> Result<()> {
        self.watchdog
            .call(
                "optimizer",
                "RefreshReference",
                self.actors.optimizer.send(RefreshReference),
            )
            .await??;
        Ok(())
    }

    /// Records a step without an update.
    fn skip_update(&mut self, why: &str, metrics: &mut Metrics) {
        self.state.skipped_updates += 1;
        tracing::info!("{why}: no update this step");
        put(metrics, "actor/skipped", 1.0);
        put(metrics, "timing_s/update", 0.0);
        put(metrics, "timing_s/sync", 0.0);
    }

    /// One GRPO step.
    async fn grpo_step(&mut self) -> Result<Metrics> {
        let mut metrics = Metrics::new();
        let rollouts = self.rollouts(&mut metrics).await?;
        let scored = self.score(rollouts, &mut metrics).await?;
        let mut groups = self.reward_groups(&scored, &mut metrics)?;
        // Async mode: rollouts more than max_staleness versions behind are dropped.
        let oldest = self
            .state
            .policy_version
            .saturating_sub(self.config.run.max_staleness);
        let before = groups.len();
        groups.retain(|g| g.policy_version >= oldest);
        let stale = (before - groups.len()) as u64;
        self.state.stale_dropped += stale;
        put(&mut metrics, "async/stale_dropped", stale as f64);
        put(
            &mut metrics,
            "async/staleness",
            self.state
                .policy_version
                .saturating_sub(scored.rollouts.policy_version) as f64,
        );
        self.watchdog
            .call(
                "sample_buffer",
                "ScoredGroups",
                self.actors.buffer.send(ScoredGroups { groups }),
            )
            .await??;
        let batch = self.next_batch().await?;
        put(
            &mut metrics,
            "ssb/effective_share_before",
            batch.metrics.effective_share_before,
        );
        put(
            &mut metrics,
            "ssb/effective_share_after",
            batch.metrics.effective_share_after,
        );
        put(&mut metrics, "ssb/replayed", batch.replayed as f64);
        put(&mut metrics, "ssb/size", batch.metrics.buffer_size as f64);
        if batch.groups.is_empty() {
            self.skip_update("no informative group", &mut metrics);
        } else {
            self.train_and_sync(TrainGrpo { batch }, &mut metrics)
                .await?;
        }
        self.observe(&scored, &mut metrics).await?;
        Ok(metrics)
    }

    /// One MPO step: sample, score, mine one pair per group, train on the pairs.
    async fn mpo_step(&mut self, new_round: bool) -> Result<Metrics> {
        let mut metrics = Metrics::new();
        if new_round && self.config.rl.mpo.refresh_reference_each_round {
            self.refresh_reference().await?;
        }
        let rollouts = self.rollouts(&mut metrics).await?;
        let scored = self.score(rollouts, &mut metrics).await?;
        self.reward_groups(&scored, &mut metrics)?;
        let responses = scored.per_sample(|verdict, rm, _| ScoredResponse {
            // The RM's raw score when there is one (the scale of `mpo.min_margin`), else the rule and format
            // rewards.
            score: rm.unwrap_or_else(|| {
                f64::from(verdict.score) + f64::from(u8::from(verdict.format_ok))
            }),
            verifier: if verdict.score >= 1.0 {
                VerifierOutcome::Pass
            } else {
                VerifierOutcome::Fail
            },
            format_ok: verdict.format_ok,
        });
        let groups: Vec<ScoredGroup> = scored
            .rollouts
            .groups
            .iter()
            .zip(responses)
            .map(|(group, responses)| ScoredGroup {
                prompt_id: group.prompt_id,
                responses,
            })
            .collect();
        let mined = mine_pairs(&groups, self.config.rl.mpo.min_margin)?;
        put(&mut metrics, "mpo/pairs", mined.pairs.len() as f64);
        let pairs: Vec<MpoPair> = mined
            .pairs
            .iter()
            .map(|pair| {
                let group = scored
                    .rollouts
                    .groups
                    .iter()
                    .find(|g| g.prompt_id == pair.id.prompt_id)
                    .ok_or_else(|| {
                        Error::Msg("mpo: a pair names a prompt not in the batch".into())
                    })?;
                Ok(MpoPair {
                    prompt_id: pair.id.prompt_id,
                    chosen: group.rollouts[pair.id.chosen].token_ids.clone(),
                    rejected: group.rollouts[pair.id.rejected].token_ids.clone(),
                })
            })
            .collect::<Result<_>>()?;
        if pairs.is_empty() {
            tracing::debug!(dropped = ?mined.dropped, "pair mining");
            self.skip_update("no preference pair", &mut metrics);
        } else {
            self.train_and_sync(TrainMpo { pairs }, &mut metrics)
                .await?;
        }
        self.observe(&scored, &mut metrics).await?;
        Ok(metrics)
    }

    /// One supervised step on the dataset's reference answers (the warm start).
    async fn sft_step(&mut self) -> Result<Metrics> {
        let mut metrics = Metrics::new();
        let requests = self.next_requests()?;
        let end_of_turn = self.encoder.stop_token_ids();
        let examples = requests
            .iter()
            .map(|request| {
                let prompt = self.bank.get(request.prompt_id)?;
                let mut response = self.encoder.tokenizer().encode(&prompt.answer)?;
                response.extend(end_of_turn.first());
                Ok(SftExample {
                    prompt_id: request.prompt_id,
                    response,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.train_and_sync(TrainSft { examples }, &mut metrics)
            .await?;
        Ok(metrics)
    }
}
