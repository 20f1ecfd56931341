//! The controller: the schedule's state, the actors it drives, the run loop, and the phases the stage steps
//! share (sample, score, update + sync, monitor). One step of each stage reads top to bottom in its own file:
//! [`grpo`](grpo.rs), [`mpo`](mpo.rs), [`sft`](sft.rs). Building a run is [`build`](build.rs); checkpoints
//! are [`super::state`].
//!
//! The controller is the async task that owns the schedule: it sends each step's requests to the actors and
//! awaits their replies under the watchdog's deadline, so it is not itself addressed by messages. At the end
//! of a run (its schedule, a Ctrl-C, or an error) [`Controller::shutdown`] closes the actors in pipeline
//! order and waits for each to answer.

#[path = "build.rs"]
mod build;
#[path = "checkpoint.rs"]
mod checkpoint;
#[path = "eval.rs"]
pub mod eval;
#[path = "grpo.rs"]
mod grpo;
#[path = "mpo.rs"]
mod mpo;
#[path = "sft.rs"]
mod sft;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Handler, Message};
use r1v2_actors::actor::monitor::MonitorActor;
use r1v2_actors::actor::optimizer::Optimizer;
use r1v2_actors::actor::policy_generator::PolicyGenerator;
use r1v2_actors::actor::reward_model::RewardModel;
use r1v2_actors::actor::rule_verifier::RuleVerifier;
use r1v2_actors::actor::sample_buffer::SampleBuffer;
use r1v2_actors::generate::FinishReason;
use r1v2_actors::monitor::ProbeSet;
use r1v2_actors::prompt::{EncodedPrompt, PromptBank};
use r1v2_actors::protocol::{
    ActorName, GenerateGroups, GroupRequest, MpoPair, Named, ObserveProbe, ObserveStep, Rollouts,
    Score, ScoreSequence, ScoreWithImages, SftExample, Shutdown, SyncWeights, TrainBatch,
    TrainGrpo, TrainMpo, TrainSft, Verify,
};
use r1v2_actors::rl::scoring::{mean, score_groups, Scoring, ScoringConfig};
use r1v2_actors::rl::PromptId;
use r1v2_actors::verifiers::registry::VerifyRequest;
use tracing::Instrument;

use super::metrics::{GenerationMetrics, ScoringTimes, StepMetrics, UpdateMetrics};
use super::state::LoopState;
use super::watchdog::Watchdog;
use super::{stage_at, RunSummary};
use crate::config::{ScheduleMode, Stage, TrainConfig};
use crate::data::DataLoader;
use crate::prompting::PromptEncoder;
use crate::telemetry::{MetricsWriter, Progress};
use crate::{Error, Result};

/// Probe prompts live in the prompt bank above every dataset index.
const PROBE_ID_BASE: u64 = 1 << 48;

/// The addresses of the actors.
struct Actors {
    /// One per generation device (`placement.generator`); a step's prompts are split across them.
    generators: Vec<Addr<PolicyGenerator>>,
    verifier: Addr<RuleVerifier>,
    /// When the config has a reward model.
    reward: Option<Addr<RewardModel>>,
    buffer: Addr<SampleBuffer>,
    monitor: Addr<MonitorActor>,
    /// One shard per trainer device (`placement.trainer`); several form a data-parallel group.
    optimizers: Vec<Addr<Optimizer>>,
}

/// A step's generation requests, one per generator (async mode: already in their mailboxes).
type Prefetched = Vec<actix::dev::Request<PolicyGenerator, GenerateGroups>>;

/// A step's request to the reward model.
enum RmRequest {
    /// Prompt + response ids of the policy's encoding (a text-only reward model).
    Text(Score),
    /// Re-encoded for a reward model that reads images.
    Images(ScoreWithImages),
}

/// One update's data, split across the optimizer shards by [`Update::split`].
enum Update {
    Sft(Vec<SftExample>),
    Mpo(Vec<MpoPair>),
    Grpo(TrainBatch),
}

/// `items` in `parts` contiguous chunks whose lengths differ by at most one (the first ones longer).
fn split_evenly<T>(items: Vec<T>, parts: usize) -> Vec<Vec<T>> {
    let (base, extra) = (items.len() / parts, items.len() % parts);
    let mut items = items.into_iter();
    (0..parts)
        .map(|i| items.by_ref().take(base + usize::from(i < extra)).collect())
        .collect()
}

impl Update {
    /// This update as `parts` shard updates (a GRPO shard keeps the batch's version and metrics).
    fn split(self, parts: usize) -> Vec<Update> {
        match self {
            Update::Sft(examples) => split_evenly(examples, parts)
                .into_iter()
                .map(Update::Sft)
                .collect(),
            Update::Mpo(pairs) => split_evenly(pairs, parts)
                .into_iter()
                .map(Update::Mpo)
                .collect(),
            Update::Grpo(batch) => {
                let TrainBatch {
                    policy_version,
                    groups,
                    replayed,
                    metrics,
                } = batch;
                split_evenly(groups, parts)
                    .into_iter()
                    .map(|groups| {
                        Update::Grpo(TrainBatch {
                            policy_version,
                            groups,
                            replayed,
                            metrics,
                        })
                    })
                    .collect()
            }
        }
    }
}

/// The controller: the schedule's state and the actors it drives.
pub struct Controller {
    config: TrainConfig,
    run: crate::checkpoint::RunDir,
    actors: Actors,
    /// Turns dataset lines into model inputs.
    encoder: PromptEncoder,
    /// Encoded prompts, shared with the generator and the optimizer.
    bank: PromptBank,
    /// Sample id -> its index in the file (its [`PromptId`]).
    index_of: HashMap<String, usize>,
    loader: DataLoader,
    /// When the monitor has one.
    probes: Option<ProbeSet>,
    /// `[eval]`'s held-out prompts and probes.
    eval: Option<Arc<eval::EvalSet>>,
    /// Step, policy version, calibration, prompt counter ... (checkpointed).
    state: LoopState,
    metrics: MetricsWriter,
    progress: Progress,
    watchdog: Watchdog,
    /// Set by Ctrl-C.
    stop: Arc<AtomicBool>,
    last_checkpoint: Option<PathBuf>,
    last_metrics: BTreeMap<String, f64>,
    prefetched: Option<Prefetched>,
    /// For a reward model that reads images (Qwen2.5-VL): its own prompt encoding.
    rm_encoder: Option<crate::rm_train::PairEncoder>,
    /// Each prompt's image files (the reward model's encoder reads them again).
    image_paths: HashMap<PromptId, Vec<PathBuf>>,
}

impl Controller {
    /// Runs the schedule from the current step to its end (or a Ctrl-C, or an error).
    pub async fn run(&mut self) -> Result<RunSummary> {
        self.sync_generators_at_start().await?;
        let total = self.config.total_steps();
        if self.state.step == 0 && self.config.eval.as_ref().is_some_and(|e| e.at_start) {
            self.evaluate("start").await?;
        }
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
            // A fresh AdamW per stage, when asked (on resume at a stage's first step it is fresh again).
            if offset == 0 && self.state.step > 0 && self.config.optimizer.reset_each_stage {
                self.ask_every_optimizer(r1v2_actors::protocol::ResetOptimizer)
                    .await?;
                tracing::info!(stage = stage.name(), "optimizer state reset (fresh AdamW)");
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
            metrics.step_s = started.elapsed().as_secs_f64();
            let metrics = metrics.to_map();
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
            // A stage's last step: evaluate (with `[eval]`) and checkpoint, so every stage's end is a
            // starting point (the demo's ablations start from the MPO rounds' end).
            let stage_ended =
                stage_at(&self.config.stages, step).is_none_or(|(_, offset)| offset == 0);
            if stage_ended {
                self.evaluate(stage.name()).await?;
            }
            let every = self.config.run.checkpoint_every;
            if (every > 0 && step.is_multiple_of(every)) || stage_ended {
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

    /// Before the first step: every generator gets the trainer's current weights (`CurrentWeights` from the
    /// first optimizer shard, then `SyncWeights`), and must then hold the trainer's version.
    async fn sync_generators_at_start(&mut self) -> Result<()> {
        let weights = self
            .ask(
                ActorName::Optimizer,
                &self.actors.optimizers[0],
                r1v2_actors::protocol::CurrentWeights,
            )
            .await??;
        let version = weights.version;
        for (index, generator) in self.actors.generators.iter().enumerate() {
            let held = self
                .ask(
                    ActorName::PolicyGenerator,
                    generator,
                    SyncWeights {
                        weights: weights.clone(),
                    },
                )
                .await??;
            if held != version || version != self.state.policy_version {
                return Err(Error::Msg(format!(
                    "at start: generator {index} holds policy version {held}, the trainer {version}, the \
                     checkpoint's loop state {}",
                    self.state.policy_version
                )));
            }
        }
        tracing::info!(
            version,
            generators = self.actors.generators.len(),
            "generators synced to the trainer's weights"
        );
        Ok(())
    }

    /// Closes the actors in pipeline order (generator, verifier, reward model, buffer, monitor, optimizer),
    /// waiting for each to answer; logs each and the end. Dropping the controller afterwards drops the last
    /// addresses, which ends the actors' threads.
    pub async fn shutdown(self) {
        let actors = &self.actors;
        for generator in &actors.generators {
            self.close(ActorName::PolicyGenerator, generator).await;
        }
        self.close(ActorName::RuleVerifier, &actors.verifier).await;
        if let Some(reward) = &actors.reward {
            self.close(ActorName::RewardModel, reward).await;
        }
        self.close(ActorName::SampleBuffer, &actors.buffer).await;
        self.close(ActorName::HallucinationMonitor, &actors.monitor)
            .await;
        for optimizer in &actors.optimizers {
            self.close(ActorName::Optimizer, optimizer).await;
        }
        tracing::info!("every actor shut down");
    }

    async fn close<A>(&self, actor: ActorName, addr: &Addr<A>)
    where
        A: Actor + Handler<Shutdown>,
        A::Context: ToEnvelope<A, Shutdown>,
    {
        if let Err(error) = self.ask(actor, addr, Shutdown).await {
            tracing::warn!(%error, "{actor} did not confirm its shutdown");
        }
    }

    /// Sends `message` to `actor` and awaits the reply under the watchdog's deadline.
    async fn ask<A, M>(&self, actor: ActorName, addr: &Addr<A>, message: M) -> Result<M::Result>
    where
        A: Actor + Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: Message + Named + Send + 'static,
        M::Result: Send,
    {
        self.watchdog.call(actor, M::NAME, addr.send(message)).await
    }

    /// After a stall: puts the step's counters back and writes a checkpoint of the last completed step, if
    /// the actors still answer; says so either way.
    async fn checkpoint_after_stall(&mut self, before: (crate::data::DataCursor, LoopState)) {
        let (cursor, state) = before;
        self.state = state;
        match DataLoader::with_cursor(
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

    // ---- Prompts -----------------------------------------------------------------------------------------

    /// Encodes a prompt into the bank under `id`, once.
    fn encode_into_bank(
        &mut self,
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
        self.image_paths.insert(id, images.to_vec());
        self.bank.insert(EncodedPrompt {
            id,
            token_ids: encoded.token_ids,
            pixel_values: encoded.pixel_values,
            image_grids: encoded.image_grids,
            answer: answer.to_string(),
            verifier: verifier.to_string(),
            question: question.to_string(),
            meta,
        });
        Ok(())
    }

    /// The prompts of step `step` (0-based; its stage's batch size), encoded into the prompt bank, each with
    /// its place in the prompt stream.
    fn next_requests(&mut self, step: u64) -> Result<Vec<GroupRequest>> {
        let batch = self.loader.next_batch_of(self.config.prompts_at(step));
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

    fn sampling(&self) -> r1v2_actors::generate::SamplingParams {
        let mut params = self.config.generation.sampling.clone();
        if params.stop_token_ids.is_empty() {
            params.stop_token_ids = self.encoder.stop_token_ids();
        }
        if params.seed == 0 {
            params.seed = self.config.run.seed;
        }
        params
    }

    /// `prompts` split across the generators (a response depends only on its prompt's index, its sample
    /// index and the seed, so the split does not change it).
    fn generate_request(&self, prompts: Vec<GroupRequest>, n: usize) -> Prefetched {
        self.generate_request_with(prompts, n, self.sampling())
    }

    /// [`Self::generate_request`] with other sampling parameters (evaluation: greedy).
    fn generate_request_with(
        &self,
        prompts: Vec<GroupRequest>,
        n: usize,
        params: r1v2_actors::generate::SamplingParams,
    ) -> Prefetched {
        split_evenly(prompts, self.actors.generators.len())
            .into_iter()
            .zip(&self.actors.generators)
            .map(|(prompts, generator)| {
                generator.send(GenerateGroups {
                    prompts,
                    n,
                    params: params.clone(),
                })
            })
            .collect()
    }

    /// Awaits every generator's part of a step and joins them in prompt order; they must all have
    /// sampled with the same policy version (in sync mode: the trainer's).
    async fn collect_rollouts(&self, requests: Prefetched, label: &str) -> Result<Rollouts> {
        let replies = futures_util::future::join_all(requests.into_iter().map(|request| {
            self.watchdog
                .call(ActorName::PolicyGenerator, label, request)
        }))
        .await;
        let mut joined: Option<Rollouts> = None;
        for (index, reply) in replies.into_iter().enumerate() {
            let part = reply??;
            match &mut joined {
                None => joined = Some(part),
                Some(all) => {
                    if part.policy_version != all.policy_version {
                        return Err(Error::Msg(format!(
                            "generator {index} sampled with policy version {}, generator 0 with {}",
                            part.policy_version, all.policy_version
                        )));
                    }
                    all.groups.extend(part.groups);
                    all.tokens += part.tokens;
                }
            }
        }
        let rollouts = joined.ok_or_else(|| Error::Msg("no policy generator".into()))?;
        if self.config.run.mode == ScheduleMode::Sync
            && rollouts.policy_version != self.state.policy_version
        {
            return Err(Error::Msg(format!(
                "the generators sampled with policy version {}, the trainer is at {}",
                rollouts.policy_version, self.state.policy_version
            )));
        }
        Ok(rollouts)
    }

    // ---- Phases the RL steps share -------------------------------------------------------------------------

    /// Sample: this step's groups, requested now (sync), or the request made one step ahead (async), in
    /// which case the next step's request goes out before this one is scored.
    async fn sample(&mut self, metrics: &mut StepMetrics) -> Result<Rollouts> {
        let started = Instant::now();
        let request = match self.prefetched.take() {
            Some(request) => request,
            None => {
                let requests = self.next_requests(self.state.step)?;
                self.generate_request(requests, self.config.generation.group_size)
            }
        };
        let rollouts = self.collect_rollouts(request, GenerateGroups::NAME).await?;
        if self.config.run.mode == ScheduleMode::Async
            && self.state.step + 1 < self.config.total_steps()
        {
            let next = self.next_requests(self.state.step + 1)?;
            self.prefetched = Some(self.generate_request(next, self.config.generation.group_size));
        }
        let seconds = started.elapsed().as_secs_f64();
        let samples = || rollouts.groups.iter().flat_map(|g| &g.samples);
        let count = samples().count();
        let clipped = samples()
            .filter(|s| s.finish_reason == FinishReason::Length)
            .count();
        metrics.generation = Some(GenerationMetrics {
            seconds,
            tokens_per_s: rollouts.tokens as f64 / seconds.max(1e-9),
            mean_length: mean(samples().map(|s| s.token_ids.len() as f64)),
            clip_ratio: clipped as f64 / count.max(1) as f64,
        });
        Ok(rollouts)
    }

    /// One verifier request per sample, groups in order.
    fn verify_requests(&self, rollouts: &Rollouts) -> Result<Vec<VerifyRequest>> {
        let mut items = Vec::new();
        for group in &rollouts.groups {
            let prompt = self.bank.get(group.prompt_id)?;
            for sample in &group.samples {
                items.push(VerifyRequest {
                    verifier: prompt.verifier.clone(),
                    prompt: prompt.question.clone(),
                    response: sample.text.clone(),
                    answer: prompt.answer.clone(),
                    meta: prompt.meta.clone().unwrap_or(serde_json::Value::Null),
                });
            }
        }
        Ok(items)
    }

    /// Verify + score: rule verdicts and RM scores, requested concurrently, then the hybrid rewards and
    /// advantages ([`score_groups`], pure).
    async fn score(&self, rollouts: Rollouts, metrics: &mut StepMetrics) -> Result<Scoring> {
        let items = self.verify_requests(&rollouts)?;
        let rm_request = self.rm_request(&rollouts)?;
        let started = Instant::now();
        let verify = async {
            let reply = self
                .ask(
                    ActorName::RuleVerifier,
                    &self.actors.verifier,
                    Verify { items },
                )
                .await;
            (reply, started.elapsed())
        };
        let score = async {
            let rm = self.actors.reward.as_ref()?;
            let reply = match rm_request? {
                RmRequest::Text(message) => self.ask(ActorName::RewardModel, rm, message).await,
                RmRequest::Images(message) => self.ask(ActorName::RewardModel, rm, message).await,
            };
            Some((reply, started.elapsed()))
        };
        let ((verdicts, verify_time), score) = futures_util::future::join(verify, score).await;
        let verdicts = verdicts??.verdicts;
        let (rm, reward_time) = match score {
            Some((reply, time)) => (Some(reply??.scores), time.as_secs_f64()),
            None => (None, 0.0),
        };
        metrics.scoring = Some(ScoringTimes {
            verify_s: verify_time.as_secs_f64(),
            reward_s: reward_time,
        });
        let scoring = score_groups(
            rollouts.groups,
            verdicts,
            rm,
            ScoringConfig {
                reward: &self.config.rl.reward,
                advantage: &self.config.rl.advantage,
                calibration: &self.state.calibration,
            },
        )?;
        let failed = scoring.metrics.verify_failures;
        if failed > 0 {
            tracing::warn!(
                failed,
                "verifier failures scored 0 (see the verdict reasons)"
            );
        }
        metrics.reward = Some(scoring.metrics);
        Ok(scoring)
    }

    /// What the reward model is asked: prompt + response ids from the policy's own encoding, or, for a model
    /// that reads images, each prompt encoded again with the reward model's template and vision runs (once
    /// per group) and the response re-tokenised with its tokenizer (a text reward model of a Qwen2.5-VL
    /// policy: the same with the question text alone).
    fn rm_request(&self, rollouts: &Rollouts) -> Result<Option<RmRequest>> {
        if self.actors.reward.is_none() {
            return Ok(None);
        }
        let mut sequences = Vec::new();
        let Some(encoder) = &self.rm_encoder else {
            for group in &rollouts.groups {
                let prompt = self.bank.get(group.prompt_id)?;
                for sample in &group.samples {
                    let mut ids = prompt.token_ids.clone();
                    ids.extend(&sample.token_ids);
                    sequences.push(ScoreSequence {
                        attention_mask: vec![1; ids.len()],
                        token_ids: ids,
                    });
                }
            }
            return Ok(Some(RmRequest::Text(Score { sequences })));
        };
        let mut images = Vec::new();
        for group in &rollouts.groups {
            let prompt = self.bank.get(group.prompt_id)?;
            let paths = self
                .image_paths
                .get(&group.prompt_id)
                .map_or(&[][..], Vec::as_slice);
            let (prompt_ids, prompt_images) =
                encoder.encode_prompt(&prompt.question, paths, &candle_core::Device::Cpu)?;
            for sample in &group.samples {
                let ids = encoder.encode_response(&prompt_ids, &sample.text)?;
                sequences.push(ScoreSequence {
                    attention_mask: vec![1; ids.len()],
                    token_ids: ids,
                });
                images.push(prompt_images.clone());
            }
        }
        Ok(Some(RmRequest::Images(ScoreWithImages {
            sequences,
            images,
        })))
    }

    /// Update + sync: one update on every optimizer shard (each its part of the data), then the new
    /// weights to every generator, whose versions are checked against the trainer's.
    async fn update_and_sync(&mut self, update: Update) -> Result<UpdateMetrics> {
        let started = Instant::now();
        let shards = &self.actors.optimizers;
        let lr_scale = self.config.lr_scale_at(self.state.step);
        let parts = update.split(shards.len());
        let requests = parts.into_iter().zip(shards).map(|(part, shard)| {
            let watchdog = &self.watchdog;
            async move {
                let actor = ActorName::Optimizer;
                match part {
                    Update::Sft(examples) => {
                        let request = shard.send(TrainSft { examples, lr_scale });
                        watchdog.call(actor, TrainSft::NAME, request).await
                    }
                    Update::Mpo(pairs) => {
                        let request = shard.send(TrainMpo { pairs, lr_scale });
                        watchdog.call(actor, TrainMpo::NAME, request).await
                    }
                    Update::Grpo(batch) => {
                        let request = shard.send(TrainGrpo { batch, lr_scale });
                        watchdog.call(actor, TrainGrpo::NAME, request).await
                    }
                }
            }
        });
        let replies = futures_util::future::join_all(requests).await;
        let mut reports = Vec::with_capacity(replies.len());
        let mut failures = Vec::new();
        for (shard, reply) in replies.into_iter().enumerate() {
            match reply? {
                Ok(report) => reports.push(report),
                Err(error) => failures.push(format!("optimizer shard {shard}: {error}")),
            }
        }
        if !failures.is_empty() {
            return Err(Error::Msg(failures.join("; ")));
        }
        // Every shard applied the same update: same version (the weights are equal by construction).
        let report = reports.swap_remove(0);
        if let Some(other) = reports
            .iter()
            .find(|r| r.weights.version != report.weights.version)
        {
            return Err(Error::Msg(format!(
                "optimizer shards disagree: versions {} and {}",
                report.weights.version, other.weights.version
            )));
        }
        let update_s = started.elapsed().as_secs_f64();

        let started = Instant::now();
        let version = report.weights.version;
        for (index, generator) in self.actors.generators.iter().enumerate() {
            let held = self
                .ask(
                    ActorName::PolicyGenerator,
                    generator,
                    SyncWeights {
                        weights: report.weights.clone(),
                    },
                )
                .await??;
            if held != version {
                return Err(Error::Msg(format!(
                    "SyncWeights: generator {index} holds policy version {held}, the optimizer published {version}"
                )));
            }
        }
        self.state.policy_version = version;
        let mut metrics = UpdateMetrics::done(&report, update_s, started.elapsed().as_secs_f64());
        if let UpdateMetrics::Done { sync_bytes, .. } = &mut metrics {
            *sync_bytes *= self.actors.generators.len();
        }
        Ok(metrics)
    }

    /// Records a step without an update.
    fn skip_update(&mut self, why: &str) -> UpdateMetrics {
        self.state.skipped_updates += 1;
        tracing::info!("{why}: no update this step");
        UpdateMetrics::Skipped
    }

    /// Makes the current policy every optimizer shard's frozen reference.
    async fn refresh_reference(&self) -> Result<()> {
        self.ask_every_optimizer(r1v2_actors::protocol::RefreshReference)
            .await
    }

    /// Sends `message` to every optimizer shard in turn; the first error stops.
    async fn ask_every_optimizer<M>(&self, message: M) -> Result<()>
    where
        M: Message<Result = r1v2_actors::Result<u64>> + Named + Copy + Send + 'static,
        Optimizer: Handler<M>,
    {
        for shard in &self.actors.optimizers {
            self.ask(ActorName::Optimizer, shard, message).await??;
        }
        Ok(())
    }

    /// Monitor: the probe set through the generator when it is due, then the step's observation; applies
    /// the calibration the monitor sends back (from the next step on).
    async fn observe(
        &mut self,
        observation: r1v2_actors::monitor::StepObservation,
        metrics: &mut StepMetrics,
    ) -> Result<()> {
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
                metrics.probe_s = Some(started.elapsed().as_secs_f64());
                self.ask(
                    ActorName::HallucinationMonitor,
                    &self.actors.monitor,
                    ObserveProbe { step, flags },
                )
                .await??;
            }
        }
        let report = self
            .ask(
                ActorName::HallucinationMonitor,
                &self.actors.monitor,
                ObserveStep { step, observation },
            )
            .await??;
        metrics.monitor = report.metrics;
        if let Some(change) = report.calibrate {
            tracing::warn!(step, "reward calibration changed: {}", change.reason);
            self.state.calibration = change.calibration;
        }
        Ok(())
    }

    /// One response per probe prompt with the current policy; the grounding flags of their verdicts.
    async fn run_probes(
        &mut self,
        probes: ProbeSet,
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
        let request = self.generate_request(requests, 1);
        let rollouts = self
            .collect_rollouts(request, "GenerateGroups (probes)")
            .await?;
        let items = self.verify_requests(&rollouts)?;
        let verdicts = self
            .watchdog
            .call(
                ActorName::RuleVerifier,
                "Verify (probes)",
                self.actors.verifier.send(Verify { items }),
            )
            .await??;
        Ok(verdicts
            .verdicts
            .into_iter()
            .filter_map(|v| v.hallucination)
            .collect())
    }
}
