//! Building a run: the run directory, the models, the dataset and prompt bank, and every actor, fresh or
//! resumed from the last complete checkpoint. (A child of `controller.rs`: it fills the private fields.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr};
use candle_core::{DType, Device};
use r1v2_actors::actor::monitor::MonitorActor;
use r1v2_actors::actor::optimizer::Optimizer;
use r1v2_actors::actor::policy_generator::{Decoder, PolicyGenerator};
use r1v2_actors::actor::reward_model::RewardModel;
use r1v2_actors::actor::rule_verifier::RuleVerifier;
use r1v2_actors::actor::sample_buffer::SampleBuffer;
use r1v2_actors::model::policy::load_policy;
use r1v2_actors::model::qwen2;
use r1v2_actors::model::reward::load_reward_dir;
use r1v2_actors::model::value_head::ValueModel;
use r1v2_actors::model::weights::WeightStore;
use r1v2_actors::monitor::{HallucinationMonitor, ProbeSet};
use r1v2_actors::prompt::PromptBank;
use r1v2_actors::protocol::ActorName;
use r1v2_actors::protocol::BufferSnapshot;
use r1v2_actors::train::{Collective, LocalCollective, PolicyTrainer};
use r1v2_actors::verifiers::registry::VerifierRegistry;

use super::eval::EvalSet;
use super::{Actors, Controller};
use crate::checkpoint::{RunDir, TrainerState};
use crate::config::TrainConfig;
use crate::data::{DataLoader, Dataset};
use crate::model_dir::{parse_device, read_json, ModelKind};
use crate::placement::local_gpu_count;
use crate::prompting::PromptEncoder;
use crate::rm_train::config::{RmDataSection, RmModelSection, RmTrainSection};
use crate::rm_train::{train_reward_model, PairEncoder, RmConfig};
use crate::telemetry::{self, MetricsWriter, Progress};
use crate::trainer::state::{self, LoopState};
use crate::trainer::watchdog::Watchdog;
use crate::trainer::RunOptions;
use crate::{demo, tiny, Error, Result};

fn device_of(config: &TrainConfig) -> Result<Device> {
    parse_device(&config.model.device).map_err(|e| Error::Msg(format!("model.device: {e}")))
}

/// The policy checkpoint to start from: the configured dir, or a tiny model written once into the run dir.
fn initial_model_dir(config: &TrainConfig, run: &RunDir) -> Result<PathBuf> {
    if let Some(dir) = &config.model.dir {
        return Ok(dir.clone());
    }
    // Validation guarantees `tiny` when `dir` is absent.
    let spec = config.model.tiny.unwrap_or_default();
    let dir = run.root().join("init-model");
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    match &config.model.pretrain_vision {
        None => tiny::write_chat_model(&dir, &spec)?,
        Some(pretrain) => {
            // The random model, then its pretrained vision into `dir` (renamed in when complete).
            let random = run.root().join("init-model.random");
            tiny::write_chat_model(&random, &spec)?;
            demo::vision_pretrain::pretrain(&random, &dir, pretrain)?;
            std::fs::remove_dir_all(&random).map_err(|source| Error::Io {
                path: random.clone(),
                source,
            })?;
        }
    }
    Ok(dir)
}

/// The embedded task's files in RUN_DIR/demo-data, written once (when any path is `"demo"`).
fn demo_task(config: &TrainConfig, run: &RunDir) -> Result<Option<demo::TaskFiles>> {
    if config.data.path.as_os_str() == "demo-colour" {
        return Ok(Some(demo::colour::write_colour_task(
            &run.root().join("demo-data"),
        )?));
    }
    let uses_demo = config.data.path.as_os_str() == "demo"
        || config
            .eval
            .as_ref()
            .is_some_and(|e| e.path.as_os_str() == "demo");
    if !uses_demo {
        return Ok(None);
    }
    let dir = run.root().join("demo-data");
    let files = demo::TaskFiles::under(&dir);
    if !files.heldout.is_file() {
        demo::write_task(&dir)?;
    }
    Ok(Some(files))
}

/// The training set's path and, for the demo task, its probe set.
fn dataset_path(
    config: &TrainConfig,
    task: Option<&demo::TaskFiles>,
) -> (PathBuf, Option<PathBuf>) {
    match task {
        Some(task) if matches!(config.data.path.to_str(), Some("demo" | "demo-colour")) => {
            (task.train.clone(), Some(task.probes.clone()))
        }
        _ => (config.data.path.clone(), None),
    }
}

/// A probe file, its image paths made relative to it.
fn load_probes(path: &Path) -> Result<ProbeSet> {
    let mut set = ProbeSet::load(path)?;
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    for item in &mut set.items {
        for image in &mut item.images {
            if image.is_relative() {
                *image = base.join(&*image);
            }
        }
    }
    Ok(set)
}

/// `[eval]`'s held-out prompts and probes (the demo task's when its path is `"demo"`).
fn eval_set(
    config: &TrainConfig,
    task: Option<&demo::TaskFiles>,
    monitor_probes: Option<&ProbeSet>,
) -> Result<Option<EvalSet>> {
    let Some(eval) = &config.eval else {
        return Ok(None);
    };
    let (path, demo_probes) = match task {
        Some(task) if matches!(eval.path.to_str(), Some("demo" | "demo-colour")) => {
            (task.heldout.clone(), Some(task.probes.clone()))
        }
        _ => (eval.path.clone(), None),
    };
    let samples = Dataset::from_config(&crate::data::DatasetConfig {
        path: path.clone(),
        on_bad_line: crate::data::OnBadLine::Error,
    })?
    .samples;
    if samples.is_empty() {
        return Err(Error::File {
            path,
            msg: "eval: no held-out samples".into(),
        });
    }
    let probes = match eval.probe_set.as_ref().or(demo_probes.as_ref()) {
        Some(path) => Some(load_probes(path)?),
        None => monitor_probes.cloned(),
    };
    Ok(Some(EvalSet { samples, probes }))
}

/// Trains the reward model in `dir` on pairs made from the dataset (see `[reward_model] train`), once:
/// RUN_DIR/reward-model-training holds the pairs and the `train-rm` run; the trained model's directory
/// is returned.
fn train_on_task(
    dir: &Path,
    train: &RmTrainSection,
    samples: &[crate::data::Sample],
    run: &RunDir,
    device: &str,
) -> Result<PathBuf> {
    let root = run.root().join("reward-model-training");
    let rm_run = root.join("run");
    if let Some((_, checkpoint)) = RunDir::open(&rm_run)
        .ok()
        .and_then(|r| r.latest_checkpoint().ok().flatten())
    {
        return Ok(checkpoint.join("model"));
    }
    std::fs::create_dir_all(&root).map_err(|source| Error::Io {
        path: root.clone(),
        source,
    })?;
    // chosen: the prompt's worked solution (else its reference answer); rejected: the solution of the next
    // prompt that asks the same question with another answer (so it reads another image: a wrong answer
    // and, for a description, hallucinated objects), else of the next one with another answer.
    let response = |s: &crate::data::Sample| s.solution.clone().unwrap_or_else(|| s.answer.clone());
    let mut lines = String::new();
    for (i, sample) in samples.iter().enumerate() {
        let others = || samples[i + 1..].iter().chain(&samples[..i]);
        let Some(wrong) = others()
            .find(|o| o.question == sample.question && o.answer != sample.answer)
            .or_else(|| others().find(|o| o.answer != sample.answer))
            .map(response)
        else {
            continue;
        };
        // Absolute paths: the pairs file lives elsewhere than the dataset.
        let images = sample
            .images
            .iter()
            .map(|image| {
                std::fs::canonicalize(image).map_err(|source| Error::Io {
                    path: image.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let line = serde_json::json!({
            "question": sample.question,
            "images": images,
            "chosen": response(sample),
            "rejected": wrong,
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    if lines.is_empty() {
        return Err(Error::Msg(
            "reward_model.train: every sample has the same answer, so no preference pair can be made"
                .into(),
        ));
    }
    let pairs = root.join("pairs.jsonl");
    std::fs::write(&pairs, lines).map_err(|source| Error::Io {
        path: pairs.clone(),
        source,
    })?;
    let rm_config = RmConfig {
        model: RmModelSection {
            dir: Some(dir.to_path_buf()),
            tiny: None,
            device: device.to_string(),
        },
        data: RmDataSection {
            train: pairs,
            eval: None,
            eval_fraction: 0.2,
        },
        train: train.clone(),
    };
    let text = toml::to_string(&rm_config).unwrap_or_default();
    let summary = train_reward_model(&rm_config, &text, &rm_run, false)?;
    tracing::info!(
        steps = summary.step,
        before = summary.initial.as_ref().map_or(f64::NAN, |m| m.accuracy),
        after = summary.last.accuracy,
        "reward model trained on pairs from the task: held-out pairwise accuracy {:.3} -> {:.3}",
        summary.initial.as_ref().map_or(f64::NAN, |m| m.accuracy),
        summary.last.accuracy
    );
    Ok(summary.checkpoint.join("model"))
}

/// Starts the reward model and, when it cannot read the policy's prompt ids, the encoder that re-encodes
/// each prompt for it: a Qwen2.5-VL reward model reads images with its own vision runs; a text Qwen2 value
/// head of a Qwen2.5-VL policy gets the question text alone (the policy's vision tokens are no ids of its).
fn start_reward_model(
    config: &TrainConfig,
    run: &RunDir,
    device: &Device,
    samples: &[crate::data::Sample],
    policy_kind: ModelKind,
) -> Result<Option<(Addr<RewardModel>, Option<PairEncoder>)>> {
    let Some(section) = &config.reward_model else {
        return Ok(None);
    };
    let dir = match (&section.dir, &section.tiny_vl, &section.tiny) {
        (Some(dir), _, _) => dir.clone(),
        (None, Some(spec), _) => {
            let dir = run.root().join("init-reward-model-vl");
            if !dir.join("model.safetensors").is_file() {
                tiny::write_vl_reward_model(&dir, spec)?;
            }
            dir
        }
        (None, None, spec) => {
            let dir = run.root().join("init-reward-model");
            if !dir.join("model.safetensors").is_file() {
                tiny::write_reward_model(&dir, &spec.unwrap_or_default())?;
            }
            dir
        }
    };
    let dir = match &section.train {
        Some(train) => train_on_task(&dir, train, samples, run, &config.model.device)?,
        None => dir,
    };
    let config_path = dir.join("config.json");
    if ModelKind::from_config(&read_json(&config_path)?, &config_path)? == ModelKind::Qwen25Vl {
        // Skywork-VL Reward: Qwen2.5-VL + value head. It reads the images, so each prompt is encoded again
        // with its own template and vision runs (the policy's InternVL encoding means nothing to it).
        let loaded = load_reward_dir(&dir, DType::F32, device, |_| false)?;
        let encoder = PairEncoder::from_model_dir(&dir, true)?;
        tracing::info!(
            dir = %dir.display(),
            "reward model reads images (qwen2_5_vl): prompts encoded with its own template"
        );
        return Ok(Some((
            RewardModel::start(loaded.net, device.clone(), section.max_batch),
            Some(encoder),
        )));
    }
    let rm_config = qwen2::Config::from_file(&config_path)?;
    let weights = WeightStore::load(&dir, DType::F32, device)?;
    let model = ValueModel::new(&rm_config, weights.frozen_var_builder())?;
    let encoder = if policy_kind == ModelKind::Qwen25Vl {
        tracing::info!(
            dir = %dir.display(),
            "text reward model of a qwen2_5_vl policy: prompts encoded again as text, images left out"
        );
        Some(PairEncoder::from_model_dir(&dir, false)?)
    } else {
        None
    };
    Ok(Some((
        RewardModel::start(model, device.clone(), section.max_batch),
        encoder,
    )))
}

/// The all-reduce handles of the optimizer shards: none for one shard; NCCL over the GPUs when every shard
/// is on one (the `cuda` feature); else the in-process CPU collective.
fn shard_collectives(
    trainer: &[crate::placement::Placed],
) -> Result<Vec<Option<Box<dyn Collective>>>> {
    if trainer.len() == 1 {
        return Ok(vec![None]);
    }
    #[cfg(feature = "cuda")]
    if trainer.iter().all(|p| p.device.is_cuda()) {
        let devices: Vec<Device> = trainer.iter().map(|p| p.device.clone()).collect();
        return Ok(
            r1v2_actors::train::collective::NcclCollective::group(&devices)?
                .into_iter()
                .map(|c| Some(Box::new(c) as Box<dyn Collective>))
                .collect(),
        );
    }
    Ok(LocalCollective::group(trainer.len())?
        .into_iter()
        .map(|c| Some(Box::new(c) as Box<dyn Collective>))
        .collect())
}

fn verifier_registry(config: &TrainConfig) -> Result<VerifierRegistry> {
    // The monitor's probes are judged by the grounding (CHAIR) verifier, one of the built-ins.
    Ok(VerifierRegistry::from_config(&config.verifiers)?)
}

impl Controller {
    /// Builds a run from `options`: a fresh one, or (with `resume`) the state of the run directory's last
    /// complete checkpoint.
    pub async fn build(options: &RunOptions, stop: Arc<AtomicBool>) -> Result<Self> {
        let config = options.config.clone();
        let run = if options.resume {
            RunDir::open(&options.run_dir)?
        } else {
            RunDir::create(&options.run_dir)?
        };
        let resume_from = if options.resume {
            let latest = run.latest_checkpoint()?;
            if latest.is_none() {
                tracing::warn!(
                    "{}: no complete checkpoint to resume from: starting from step 0",
                    run.root().display()
                );
            }
            latest
        } else {
            if run.latest_checkpoint()?.is_some() {
                return Err(Error::File {
                    path: run.root().into(),
                    msg:
                        "this run directory already has checkpoints: pass --resume to continue it, \
                          or choose another --run-dir"
                            .into(),
                });
            }
            None
        };
        telemetry::init(Some(run.root()), &config.run.log_level)?;
        state::clean_scratch(run.root());
        run.write_config(&resolved_config(&config, &options.config_text))?;
        let device = device_of(&config)?;
        let placement = config
            .placement
            .resolve(local_gpu_count(), &config.model.device)?;

        let initial_dir = initial_model_dir(&config, &run)?;
        let initial_config = initial_dir.join("config.json");
        let policy_kind = ModelKind::from_config(&read_json(&initial_config)?, &initial_config)?;
        // The policy's compute dtype (`[model] dtype`): image tiles are made in it too.
        let dtype = config.model.dtype.dtype();
        let encoder = PromptEncoder::from_model_dir(&initial_dir, &device, dtype)?;
        let task = demo_task(&config, &run)?;
        let (data_path, demo_probes) = dataset_path(&config, task.as_ref());
        let mut dataset_config = config.data.dataset();
        dataset_config.path = data_path;
        let dataset = Dataset::from_config(&dataset_config)?;
        if !dataset.bad_lines.is_empty() {
            tracing::warn!(
                skipped = dataset.bad_lines.len(),
                "{}: {} bad lines skipped (data.on_bad_line = \"skip\")",
                dataset.path.display(),
                dataset.bad_lines.len()
            );
        }
        if dataset.samples.is_empty() {
            return Err(Error::File {
                path: dataset.path.clone(),
                msg: "no usable samples".into(),
            });
        }
        let probe_path = config
            .monitor
            .as_ref()
            .and_then(|m| m.probe_set.clone())
            .or(demo_probes);
        let probes = probe_path.map(|path| load_probes(&path)).transpose()?;
        let eval = eval_set(&config, task.as_ref(), probes.as_ref())?;

        // Where the weights and the trainer's own state come from.
        let (model_dir, trainer_state) = match &resume_from {
            Some((step, dir)) => {
                tracing::info!(step, "resuming from {}", dir.display());
                (dir.join("model"), Some(TrainerState::load(dir)?))
            }
            None => (initial_dir.clone(), None),
        };
        let samples = dataset.samples;
        let sample_count = samples.len();
        let index_of = samples
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let prompts_per_step = config.data.prompts_per_step;
        let (loader, state) = match &trainer_state {
            Some(saved) => (
                DataLoader::with_cursor(samples, prompts_per_step, saved.data_cursor)?,
                saved.section::<LoopState>("loop")?.ok_or_else(|| {
                    Error::Msg("checkpoint: trainer state has no `loop` section".into())
                })?,
            ),
            None => (
                DataLoader::new(samples, prompts_per_step, config.run.seed)?,
                LoopState::new(config.rl.reward.calibration),
            ),
        };

        // The actors. One optimizer shard per trainer device (a data-parallel group when there are
        // several), one policy generator per generation device.
        let bank = PromptBank::new();
        let collectives = shard_collectives(&placement.trainer)?;
        let mut optimizers = Vec::with_capacity(placement.trainer.len());
        let mut version = 0;
        for (shard, (placed, collective)) in placement.trainer.iter().zip(collectives).enumerate() {
            let trainer = match &resume_from {
                Some((_, dir)) => PolicyTrainer::load_checkpoint(
                    dir,
                    dtype,
                    &placed.device,
                    config.optimizer.clone(),
                    None,
                )?,
                None => {
                    let policy = load_policy(
                        &initial_dir,
                        dtype,
                        &placed.device,
                        config.optimizer.trainable,
                    )?;
                    PolicyTrainer::new(policy, config.optimizer.clone())?
                }
            };
            version = trainer.version();
            let mut optimizer = Optimizer::new(
                trainer,
                bank.clone(),
                config.rl.grpo.clone(),
                config.rl.mpo.clone(),
            )?;
            if let Some((_, dir)) = &resume_from {
                optimizer = optimizer.resume_bco_reward_mean(dir)?;
            }
            if let Some(collective) = collective {
                optimizer = optimizer.with_collective(collective);
            }
            if let Some(fault) = config.faults.panic_trainer_shard {
                if fault.shard == shard {
                    optimizer = optimizer.inject_shard_panic_at(Some(fault.at_version));
                }
            }
            tracing::info!(shard, device = %placed.name, "optimizer shard");
            optimizers.push(optimizer.start_dedicated());
        }
        let tokenizer = encoder.clone();
        let decode: Decoder = Arc::new(move |ids: &[u32]| {
            tokenizer
                .decode(ids)
                .map_err(|e| r1v2_actors::Error::msg(e.to_string()))
        });
        let mut generators = Vec::with_capacity(placement.generator.len());
        for placed in &placement.generator {
            let model = load_policy(
                &model_dir,
                dtype,
                &placed.device,
                config.optimizer.trainable,
            )?;
            tracing::info!(device = %placed.name, "policy generator");
            generators.push(PolicyGenerator::start(
                model.model,
                model.trainable_vars,
                placed.device.clone(),
                bank.clone(),
                Arc::clone(&decode),
                version,
            ));
        }
        let verifier = RuleVerifier::start_pool(
            Arc::new(verifier_registry(&config)?),
            config.verifiers.parallel,
        );
        let (reward, rm_encoder) = match start_reward_model(
            &config,
            &run,
            &placement.reward_model.device,
            loader.samples(),
            policy_kind,
        )? {
            Some((addr, encoder)) => (Some(addr), encoder),
            None => (None, None),
        };
        let buffer = match trainer_state
            .as_ref()
            .map(|s| s.section::<BufferSnapshot>("ssb"))
            .transpose()?
            .flatten()
        {
            Some(snapshot) => SampleBuffer::from_snapshot(snapshot)?,
            None => SampleBuffer::new(config.rl.ssb.clone())?,
        }
        .inject_panics_at(config.faults.panic_sample_buffer_at_versions.clone())
        .start_supervised();
        let monitor_config = config
            .monitor
            .as_ref()
            .map(|m| m.config)
            .unwrap_or_default();
        let monitor = match trainer_state
            .as_ref()
            .map(|s| s.section::<HallucinationMonitor>("monitor"))
            .transpose()?
            .flatten()
        {
            Some(monitor) => monitor,
            None => HallucinationMonitor::new(monitor_config, config.rl.reward.calibration)?,
        };
        let monitor = MonitorActor::new(monitor).start();

        let watchdog = Watchdog::new(Duration::from_secs_f64(config.watchdog.stall_timeout_s));
        let every = Duration::from_secs_f64(config.watchdog.heartbeat_every_s);
        for generator in &generators {
            watchdog.watch(ActorName::PolicyGenerator, generator.clone(), every);
        }
        watchdog.watch(ActorName::RuleVerifier, verifier.clone(), every);
        watchdog.watch(ActorName::SampleBuffer, buffer.clone(), every);
        watchdog.watch(ActorName::HallucinationMonitor, monitor.clone(), every);
        for optimizer in &optimizers {
            watchdog.watch(ActorName::Optimizer, optimizer.clone(), every);
        }
        if let Some(reward) = &reward {
            watchdog.watch(ActorName::RewardModel, reward.clone(), every);
        }

        let metrics = match &resume_from {
            Some((step, _)) => MetricsWriter::resume(run.metrics_path(), *step)?,
            None => MetricsWriter::open(run.metrics_path())?,
        };
        let start_step = resume_from.as_ref().map_or(0, |(step, _)| *step);
        let progress = Progress::new(config.total_steps(), start_step);
        tracing::info!(
            run_dir = %run.root().display(),
            steps = config.total_steps(),
            start_step,
            samples = sample_count,
            "training: {}",
            config
                .stages
                .iter()
                .map(|s| format!("{} x{}", s.name(), s.steps()))
                .collect::<Vec<_>>()
                .join(" -> ")
        );
        Ok(Self {
            actors: Actors {
                generators,
                verifier,
                reward,
                buffer,
                monitor,
                optimizers,
            },
            config,
            run,
            encoder,
            bank,
            index_of,
            loader,
            probes,
            eval: eval.map(Arc::new),
            state,
            metrics,
            progress,
            watchdog,
            stop,
            last_checkpoint: resume_from.map(|(_, dir)| dir),
            last_metrics: BTreeMap::new(),
            prefetched: None,
            rm_encoder,
            image_paths: Default::default(),
        })
    }
}

/// `config.toml` of the run directory: the resolved config (every default filled in) followed by the file as
/// the user wrote it, commented out.
fn resolved_config(config: &TrainConfig, original: &str) -> String {
    let resolved = toml::to_string(config)
        .unwrap_or_else(|e| format!("# (the resolved config could not be written: {e})\n"));
    let mut text = String::from("# The run config as resolved (defaults filled in). [verifiers] is in the original below.\n");
    text.push_str(&resolved);
    text.push_str("\n# ---- The config file as given ----\n");
    for line in original.lines() {
        text.push_str("# ");
        text.push_str(line);
        text.push('\n');
    }
    text
}
