//! The run config of `r1v2 train CONFIG.toml`: one TOML file, every section typed and validated.
//!
//! ```toml
//! [run]                       # seed, schedule mode, checkpoints, determinism
//! [model]                     # dir = "path/to/internvl_chat" or a Qwen2.5-VL dir (or tiny = { seed = 0 }), dtype = "bf16"
//! [data]                      # path = "train.jsonl", prompts_per_step = 8
//! [generation]                # group_size = 8 + the sampling parameters (temperature, top_p, ...)
//! [[stages]]                  # kind = "sft" | "mpo" | "grpo", with steps / rounds (+ prompts_per_step, lr_scale)
//! [rl.grpo] [rl.mpo] [rl.reward] [rl.ssb] [rl.advantage]
//! [verifiers]                 # rule verifiers and plugins
//! [reward_model]              # optional: dir = ..., tiny = { seed = 1 } or tiny_vl = { seed = 1 } (+ train = {...})
//! [monitor]                   # hallucination monitor and calibration (+ probe_set = "probes.jsonl")
//! [optimizer]                 # AdamW, schedule, clipping, accumulation, trainable modules, reset_each_stage
//! [placement]                 # devices of each role: generator / trainer / reward_model (default "all")
//! [watchdog]                  # heartbeat period and stall timeout
//! [faults]                    # fault injection, for tests
//! ```
//!
//! Unknown keys are errors; every error names the file and the key (TOML syntax errors also the line).

use std::path::{Path, PathBuf};

use r1v2_actors::generate::SamplingParams;
use r1v2_actors::monitor::config::MonitorConfig;
use r1v2_actors::rl::config::RlConfig;
use r1v2_actors::train::OptimConfig;
use r1v2_actors::verifiers::config::VerifiersConfig;
use serde::{Deserialize, Serialize};

use crate::data::{DatasetConfig, OnBadLine};
use crate::{Error, Result};

/// How generation and training interleave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleMode {
    /// On-policy: generate -> score -> update -> sync, one after another.
    #[default]
    Sync,
    /// The generator samples the next step's groups while the optimizer trains on this step's; rollouts more
    /// than `max_staleness` policy versions old are dropped and counted.
    Async,
}

/// `[run]`: the run as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Seed of the data order and of every sampling stream.
    pub seed: u64,
    /// `sync` or `async`.
    pub mode: ScheduleMode,
    /// Async mode: the most policy versions a rollout may lag behind the policy it trains (>= 1).
    pub max_staleness: u64,
    /// With `true` (sync mode only) an interrupted and resumed run ends with the same weights as an
    /// uninterrupted one: nothing depends on timing or thread scheduling.
    pub deterministic: bool,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Keep this many most recent checkpoints.
    pub keep_checkpoints: usize,
    /// Log filter for the terminal and log.jsonl (`info`, `debug`, `r1v2=debug` ...).
    pub log_level: String,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            seed: 0,
            mode: ScheduleMode::Sync,
            max_staleness: 1,
            deterministic: true,
            checkpoint_every: 50,
            keep_checkpoints: 2,
            log_level: "info".into(),
        }
    }
}

/// A random tiny chat model made at the start of the run (CI, demos, tests).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TinySpec {
    /// Seed of the random weights.
    pub seed: u64,
    /// LLM hidden size.
    pub hidden: usize,
    /// LLM layers.
    pub layers: usize,
    /// Side of the image tile in pixels, a multiple of 28 (14-px patches, pixel-shuffled 2 x 2 into one
    /// token: 56 px gives 4 vision tokens, 84 px gives 9).
    pub image_size: usize,
    /// Vision tower (InternViT) width.
    pub vision_hidden: usize,
    /// Vision tower layers.
    pub vision_layers: usize,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            seed: 0,
            hidden: 64,
            layers: 2,
            image_size: 56,
            vision_hidden: 32,
            vision_layers: 1,
        }
    }
}

/// `[model] pretrain_vision`: supervised pretraining of a tiny model's vision tower + adapter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionPretrainSpec {
    /// AdamW steps.
    pub steps: usize,
    /// Images per step (fresh scenes every step).
    #[serde(default = "default_pretrain_batch")]
    pub batch: usize,
    /// Learning rate (constant).
    #[serde(default = "default_pretrain_lr")]
    pub lr: f64,
    /// Seed of the scenes and of the readout head.
    #[serde(default)]
    pub seed: u64,
}

fn default_pretrain_batch() -> usize {
    32
}

fn default_pretrain_lr() -> f64 {
    1e-3
}

/// `[model]`: the policy's starting checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// An InternVL-chat / Skywork-R1V or a Qwen2.5-VL (with its LM head) checkpoint directory (relative
    /// paths: to the config file).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Or a random tiny model.
    #[serde(default)]
    pub tiny: Option<TinySpec>,
    /// With `tiny` only: pretrain the tiny model's vision tower and adapter before the run on cell labels of
    /// generated scenes (the demo task's generators), standing in for a pretrained InternViT (src/demo/
    /// vision_pretrain.rs). A random tower's tokens carry the image, but a small LLM learns to read them
    /// too slowly for the demo's budget.
    #[serde(default)]
    pub pretrain_vision: Option<VisionPretrainSpec>,
    /// The device of a role whose `[placement]` is `"all"` when no GPU is present (default `cpu`), and of
    /// the prompt encoder's image tiles.
    #[serde(default = "default_device")]
    pub device: String,
    /// The policy's compute dtype (generators, trainer shards and the reference): `"f32"` (default) or
    /// `"bf16"`, mixed precision: bf16 weights and activations in the forward, the backward and generation,
    /// while the optimizer keeps f32 master weights and f32 AdamW moments and sums gradients in f32; norms,
    /// softmax and log-probs reduce in f32 (r1v2-kernels widen bf16 to f32 inside each op). Frozen modules
    /// stay bf16 (a bf16 checkpoint is read without conversion). Checkpoints hold the model in bf16 and the
    /// f32 masters in `optimizer/adamw.safetensors`, so a resumed run continues from the masters. On the
    /// CPU candle has no bf16 matrix kernel (it widens each product to f32), so there bf16 halves the
    /// weights' memory but costs time; it is meant for GPUs. The reward model stays f32.
    #[serde(default)]
    pub dtype: ModelDtype,
}

/// `[model] dtype`: the policy's compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelDtype {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 weights and activations, f32 master weights, AdamW moments and reductions.
    Bf16,
}

impl ModelDtype {
    /// The candle dtype the policy is loaded in.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}

fn default_device() -> String {
    "cpu".into()
}

/// `[data]`: the prompt set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The JSONL file (relative paths: to the config file). `"demo"` uses the embedded demo task,
    /// `"demo-colour"` the one-colour smoke-test task (configs/tiny.toml).
    pub path: PathBuf,
    /// `skip` or `error`: what a bad line does.
    #[serde(default)]
    pub on_bad_line: OnBadLine,
    /// Prompts per step (each gets `generation.group_size` responses).
    #[serde(default = "default_prompts_per_step")]
    pub prompts_per_step: usize,
}

fn default_prompts_per_step() -> usize {
    8
}

impl DataSection {
    /// The dataset part as the loader takes it.
    pub fn dataset(&self) -> DatasetConfig {
        DatasetConfig {
            path: self.path.clone(),
            on_bad_line: self.on_bad_line,
        }
    }
}

/// `[generation]`: the group size and the sampling parameters of the policy generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationSection {
    /// Responses per prompt (G).
    pub group_size: usize,
    /// Sampling parameters (`[generation.sampling]`); the seed is `run.seed` unless given here.
    pub sampling: SamplingParams,
}

impl Default for GenerationSection {
    fn default() -> Self {
        Self {
            group_size: 8,
            sampling: SamplingParams::default(),
        }
    }
}

/// One stage of the schedule (`[[stages]]`), run in order. Each may set its own `prompts_per_step` (else
/// `data.prompts_per_step`: supervised steps are cheap, RL steps want more prompts for a steadier gradient)
/// and an `lr_scale` on the `[optimizer]` schedule (preference and RL steps usually want a smaller rate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Stage {
    /// Supervised warm start on the dataset's reference answers.
    Sft {
        /// Optimizer steps.
        steps: u64,
        /// Prompts per step in this stage (default `data.prompts_per_step`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prompts_per_step: Option<usize>,
        /// Multiplies the `[optimizer]` schedule's rate during this stage (default 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr_scale: Option<f64>,
    },
    /// Iterative MPO: each round samples groups, scores them, mines pairs and trains on them.
    Mpo {
        /// Rounds.
        rounds: u64,
        /// Optimizer steps per round (each on the stage's prompts per step's pairs).
        steps_per_round: u64,
        /// Prompts per step in this stage (default `data.prompts_per_step`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prompts_per_step: Option<usize>,
        /// Multiplies the `[optimizer]` schedule's rate during this stage (default 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr_scale: Option<f64>,
    },
    /// GRPO with the hybrid reward and the Selective Sample Buffer.
    Grpo {
        /// Optimizer steps.
        steps: u64,
        /// Prompts per step in this stage (default `data.prompts_per_step`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prompts_per_step: Option<usize>,
        /// Multiplies the `[optimizer]` schedule's rate during this stage (default 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr_scale: Option<f64>,
    },
}

impl Stage {
    /// Optimizer steps this stage takes.
    pub fn steps(&self) -> u64 {
        match *self {
            Stage::Sft { steps, .. } | Stage::Grpo { steps, .. } => steps,
            Stage::Mpo {
                rounds,
                steps_per_round,
                ..
            } => rounds * steps_per_round,
        }
    }

    /// The stage's factor on the schedule's learning rate, if it sets one.
    pub fn lr_scale(&self) -> Option<f64> {
        match *self {
            Stage::Sft { lr_scale, .. }
            | Stage::Mpo { lr_scale, .. }
            | Stage::Grpo { lr_scale, .. } => lr_scale,
        }
    }

    /// The stage's own prompts per step, if it sets one.
    pub fn prompts_per_step(&self) -> Option<usize> {
        match *self {
            Stage::Sft {
                prompts_per_step, ..
            }
            | Stage::Mpo {
                prompts_per_step, ..
            }
            | Stage::Grpo {
                prompts_per_step, ..
            } => prompts_per_step,
        }
    }

    /// `sft`, `mpo` or `grpo`.
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Sft { .. } => "sft",
            Stage::Mpo { .. } => "mpo",
            Stage::Grpo { .. } => "grpo",
        }
    }
}

/// `[reward_model]`: the frozen Skywork-VL-style reward model (a Qwen2ForSequenceClassification dir).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardModelSection {
    /// Checkpoint directory.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Or a random tiny reward model sharing the policy's vocabulary.
    #[serde(default)]
    pub tiny: Option<TinySpec>,
    /// Or a random tiny Qwen2.5-VL reward model (Skywork-VL Reward layout) that reads the images.
    #[serde(default)]
    pub tiny_vl: Option<TinySpec>,
    /// Sequences per forward pass.
    #[serde(default = "default_rm_batch")]
    pub max_batch: usize,
    /// Train the reward model before the run (`train-rm`'s loop) on preference pairs made from the dataset:
    /// chosen = a prompt's reference answer, rejected = another prompt's different reference answer. The
    /// trained model lands in RUN_DIR/reward-model-training (done once; a resumed run reuses it). A text-only
    /// (Qwen2) reward model learns only what the text tells apart: on the demo task, where the right answer
    /// depends on the image, it stays at chance; a Qwen2.5-VL reward model sees the images.
    #[serde(default)]
    pub train: Option<crate::rm_train::config::RmTrainSection>,
}

fn default_rm_batch() -> usize {
    16
}

/// `[monitor]`: the hallucination monitor's settings (every key of `MonitorConfig`) plus `probe_set`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "toml::Table", into = "toml::Table")]
pub struct MonitorSection {
    /// Probe prompts (JSONL with annotations, see `monitor::probe`); none: the monitor uses the training
    /// verdicts only.
    pub probe_set: Option<PathBuf>,
    /// The monitor and calibration policy.
    pub config: MonitorConfig,
}

impl TryFrom<toml::Table> for MonitorSection {
    type Error = String;

    /// `probe_set` is taken out; the rest must be exactly `MonitorConfig`'s keys (serde's `flatten` would
    /// lose `deny_unknown_fields`).
    fn try_from(mut table: toml::Table) -> std::result::Result<Self, String> {
        let probe_set = match table.remove("probe_set") {
            None => None,
            Some(toml::Value::String(path)) => Some(PathBuf::from(path)),
            Some(_) => return Err("monitor.probe_set: must be a path string".into()),
        };
        let config = MonitorConfig::deserialize(table).map_err(|e| format!("monitor: {e}"))?;
        Ok(Self { probe_set, config })
    }
}

impl From<MonitorSection> for toml::Table {
    fn from(section: MonitorSection) -> Self {
        // MonitorConfig is plain numbers and enums: it always serialises to a table.
        let mut table = toml::Table::try_from(section.config).unwrap_or_default();
        if let Some(path) = section.probe_set {
            table.insert(
                "probe_set".into(),
                toml::Value::String(path.display().to_string()),
            );
        }
        table
    }
}

/// `[watchdog]`: liveness.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogSection {
    /// Seconds between heartbeats to every actor.
    pub heartbeat_every_s: f64,
    /// An actor that does not answer a heartbeat, or a step request that takes longer than this, stops the
    /// run with a checkpoint and an error naming the actor and the message.
    pub stall_timeout_s: f64,
}

impl Default for WatchdogSection {
    fn default() -> Self {
        Self {
            heartbeat_every_s: 5.0,
            stall_timeout_s: 600.0,
        }
    }
}

/// `[faults]`: deliberate failures, to prove the run survives them (tests and drills).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSection {
    /// The sample buffer panics (once each) while handling the batch request for these policy versions; the
    /// supervisor restarts it with its state rolled back and the controller re-sends the request.
    pub panic_sample_buffer_at_versions: Vec<u64>,
    /// One optimizer shard (data parallel, `placement.trainer` with several devices) panics inside its
    /// gradient computation at this policy version: every shard must then stop the step with an error.
    pub panic_trainer_shard: Option<ShardFault>,
}

/// Which shard panics, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardFault {
    /// The shard (index into `placement.trainer`).
    pub shard: usize,
    /// The policy version whose update panics.
    pub at_version: u64,
}

/// The whole run config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `[run]`.
    #[serde(default)]
    pub run: RunSection,
    /// `[model]`.
    pub model: ModelSection,
    /// `[data]`.
    pub data: DataSection,
    /// `[generation]`.
    #[serde(default)]
    pub generation: GenerationSection,
    /// `[[stages]]`.
    pub stages: Vec<Stage>,
    /// `[rl]`.
    #[serde(default)]
    pub rl: RlConfig,
    /// `[verifiers]`.
    #[serde(default, skip_serializing)]
    pub verifiers: VerifiersConfig,
    /// `[reward_model]`.
    #[serde(default)]
    pub reward_model: Option<RewardModelSection>,
    /// `[monitor]`.
    #[serde(default)]
    pub monitor: Option<MonitorSection>,
    /// `[optimizer]`.
    #[serde(default)]
    pub optimizer: OptimConfig,
    /// `[placement]`.
    #[serde(default)]
    pub placement: crate::placement::PlacementSection,
    /// `[watchdog]`.
    #[serde(default)]
    pub watchdog: WatchdogSection,
    /// `[faults]`.
    #[serde(default)]
    pub faults: FaultSection,
    /// `[eval]`.
    #[serde(default)]
    pub eval: Option<EvalSection>,
}

/// `[eval]`: held-out evaluation after each stage (and, with `at_start`, before the first step): one greedy
/// response per prompt (the run's seed), the rule verifiers' accuracy with its standard error, and the
/// hallucination rate (CHAIR-i) on the probe set. Written to RUN_DIR/eval.jsonl, one line per evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// JSONL in the dataset format (relative paths: to the config file); `"demo"`: the embedded task's
    /// held-out split.
    pub path: PathBuf,
    /// Also evaluate the starting policy (label `start`).
    #[serde(default)]
    pub at_start: bool,
    /// New tokens per response (default: `generation.sampling.max_new_tokens`).
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// Probe prompts for the hallucination rate (default: the monitor's probe set, if any).
    #[serde(default)]
    pub probe_set: Option<PathBuf>,
}

fn invalid(key: &str, msg: impl Into<String>) -> Error {
    Error::Actors(r1v2_actors::Error::Config {
        key: key.into(),
        msg: msg.into(),
    })
}

impl TrainConfig {
    /// Parses and validates TOML text; relative paths are resolved against `base_dir`.
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<Self> {
        let mut config: TrainConfig =
            toml::from_str(text).map_err(|error| Error::Msg(error.to_string().trim().into()))?;
        config.resolve_paths(base_dir);
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file; every error names the file (and the key or line).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, base).map_err(|error| Error::File {
            path: path.into(),
            msg: error.to_string(),
        })
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && !matches!(p.to_str(), Some("demo" | "demo-colour")) {
                *p = base.join(&*p);
            }
        };
        if let Some(dir) = &mut self.model.dir {
            resolve(dir);
        }
        resolve(&mut self.data.path);
        if let Some(rm) = &mut self.reward_model {
            if let Some(dir) = &mut rm.dir {
                resolve(dir);
            }
        }
        if let Some(probe) = self.monitor.as_mut().and_then(|m| m.probe_set.as_mut()) {
            resolve(probe);
        }
        if let Some(eval) = &mut self.eval {
            resolve(&mut eval.path);
            if let Some(probe) = &mut eval.probe_set {
                resolve(probe);
            }
        }
    }

    /// Total optimizer steps over every stage.
    pub fn total_steps(&self) -> u64 {
        self.stages.iter().map(Stage::steps).sum()
    }

    /// The factor on the `[optimizer]` schedule's rate at `step` (0-based): its stage's `lr_scale`, else 1.
    pub fn lr_scale_at(&self, step: u64) -> f64 {
        crate::trainer::stage_at(&self.stages, step)
            .and_then(|(stage, _)| stage.lr_scale())
            .unwrap_or(1.0)
    }

    /// Prompts per step at `step` (0-based): its stage's `prompts_per_step`, else `data.prompts_per_step`.
    pub fn prompts_at(&self, step: u64) -> usize {
        crate::trainer::stage_at(&self.stages, step)
            .and_then(|(stage, _)| stage.prompts_per_step())
            .unwrap_or(self.data.prompts_per_step)
    }

    /// Checks every section; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let run = &self.run;
        if run.mode == ScheduleMode::Async && run.max_staleness == 0 {
            return Err(invalid(
                "run.max_staleness",
                "must be >= 1 in async mode (0 is the sync schedule)",
            ));
        }
        if run.mode == ScheduleMode::Async && run.deterministic {
            return Err(invalid(
                "run.deterministic",
                "async mode overlaps generation and training, so its order depends on timing: \
                 set deterministic = false or mode = \"sync\"",
            ));
        }
        if run.keep_checkpoints == 0 {
            return Err(invalid("run.keep_checkpoints", "must be >= 1"));
        }
        let gpus = crate::placement::local_gpu_count();
        self.placement.check(gpus, &self.model.device)?;
        if let Some(fault) = self.faults.panic_trainer_shard {
            let shards = match &self.placement.trainer {
                crate::placement::Devices::List(names) => names.len(),
                crate::placement::Devices::Named(_) => gpus.max(1),
            };
            if fault.shard >= shards {
                return Err(invalid(
                    "faults.panic_trainer_shard.shard",
                    format!("only {shards} trainer shard(s)"),
                ));
            }
        }
        match (&self.model.dir, &self.model.tiny) {
            (Some(_), Some(_)) => {
                return Err(invalid("model", "give either `dir` or `tiny`, not both"))
            }
            (None, None) => return Err(invalid("model", "give `dir` (a checkpoint) or `tiny`")),
            _ => {}
        }
        if let Some(tiny) = &self.model.tiny {
            if tiny.image_size == 0 || !tiny.image_size.is_multiple_of(28) {
                return Err(invalid(
                    "model.tiny.image_size",
                    "must be a positive multiple of 28 (14-px patches, merged 2 x 2)",
                ));
            }
        }
        if let Some(pretrain) = &self.model.pretrain_vision {
            if self.model.tiny.is_none() {
                return Err(invalid(
                    "model.pretrain_vision",
                    "needs `tiny` (a checkpoint's vision tower is pretrained already)",
                ));
            }
            if pretrain.steps == 0 || pretrain.batch == 0 {
                return Err(invalid(
                    "model.pretrain_vision",
                    "steps and batch must be >= 1",
                ));
            }
            if !(pretrain.lr.is_finite() && pretrain.lr > 0.0) {
                return Err(invalid("model.pretrain_vision.lr", "must be > 0"));
            }
        }
        if let Some(eval) = &self.eval {
            if eval.max_new_tokens == Some(0) {
                return Err(invalid("eval.max_new_tokens", "must be >= 1"));
            }
        }
        if self.data.prompts_per_step == 0 {
            return Err(invalid("data.prompts_per_step", "must be >= 1"));
        }
        if self.generation.group_size < 2 {
            return Err(invalid(
                "generation.group_size",
                "must be >= 2 (group-relative advantages need two responses)",
            ));
        }
        self.generation
            .sampling
            .validate()
            .map_err(|e| prefixed("generation.sampling", e))?;
        if self.stages.is_empty() {
            return Err(invalid("stages", "give at least one [[stages]] entry"));
        }
        for (index, stage) in self.stages.iter().enumerate() {
            if stage.steps() == 0 {
                return Err(invalid(
                    &format!("stages[{index}]"),
                    format!("a {} stage with no steps", stage.name()),
                ));
            }
            if stage
                .lr_scale()
                .is_some_and(|scale| !(scale.is_finite() && scale > 0.0))
            {
                return Err(invalid(
                    &format!("stages[{index}].lr_scale"),
                    "must be finite and > 0",
                ));
            }
            if stage.prompts_per_step() == Some(0) {
                return Err(invalid(
                    &format!("stages[{index}].prompts_per_step"),
                    "must be at least 1",
                ));
            }
        }
        self.rl.validate().map_err(|e| prefixed("rl", e))?;
        self.verifiers
            .validate()
            .map_err(|e| prefixed("verifiers", e))?;
        if let Some(rm) = &self.reward_model {
            let given = [rm.dir.is_some(), rm.tiny.is_some(), rm.tiny_vl.is_some()];
            if given.iter().filter(|&&g| g).count() != 1 {
                return Err(invalid(
                    "reward_model",
                    "give one of `dir`, `tiny` or `tiny_vl`",
                ));
            }
            if rm.max_batch == 0 {
                return Err(invalid("reward_model.max_batch", "must be >= 1"));
            }
        }
        if let Some(monitor) = &self.monitor {
            monitor.config.validate()?;
        }
        self.optimizer.validate()?;
        let w = &self.watchdog;
        if !(w.heartbeat_every_s > 0.0 && w.stall_timeout_s > w.heartbeat_every_s) {
            return Err(invalid(
                "watchdog",
                "need heartbeat_every_s > 0 and stall_timeout_s > heartbeat_every_s",
            ));
        }
        Ok(())
    }
}

/// Puts the section name in front of a nested config error's key.
fn prefixed(section: &str, error: r1v2_actors::Error) -> Error {
    match error {
        r1v2_actors::Error::Config { key, msg } if !key.starts_with(section) => {
            invalid(&format!("{section}.{key}"), msg)
        }
        other => Error::Actors(other),
    }
}
