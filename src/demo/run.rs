//! `r1v2 demo`: the staged run on the embedded task (SFT warm start -> MPO rounds -> GRPO, held-out
//! evaluation after each stage), then the ablations, each GRPO from the same MPO checkpoint for the same
//! steps at the staged run's GRPO learning rate (a fresh AdamW), then the tables (printed and written to RUN_DIR/summary.md) and the charts.
//!
//! | arm | what differs from the full method |
//! |---|---|
//! | `full` | nothing: hybrid reward, SSB, adapter + LLM trained (as the config says), RM calibration on |
//! | `no_ssb` | `rl.ssb.enabled = false`: zero-advantage groups train, nothing is replayed |
//! | `adapter_only` | `optimizer.trainable` = adapter only: the vision tower and the LLM stay frozen |
//! | `no_calibration` | `monitor.calibration.enabled = false`: the RM thresholds never move |

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use super::table::{self, ArmResult};
use super::{TaskFiles, DEMO_CONFIG, QUICK_CONFIG};
use crate::checkpoint::RunDir;
use crate::config::{Stage, TrainConfig};
use crate::telemetry::{read_metrics, MetricsRecord};
use crate::trainer::{train, EvalRecord, RunOptions, EVAL_FILE};

/// What `r1v2 demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub run_dir: PathBuf,
    /// The short run (`configs/demo_quick.toml`).
    pub quick: bool,
    /// Skip the ablations (the staged run and its table only).
    pub no_ablations: bool,
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoResult {
    /// The staged run's evaluations (one per stage).
    pub stages: Vec<EvalRecord>,
    pub arms: Vec<ArmResult>,
    /// The tables as printed.
    pub summary: String,
}

struct Arm {
    name: &'static str,
    change: &'static str,
    apply: fn(&mut TrainConfig),
}

const ARMS: [Arm; 4] = [
    Arm {
        name: "full",
        change: "none (SSB, adapter + LLM trained, calibration on)",
        apply: |_| {},
    },
    Arm {
        name: "no_ssb",
        change: "no Selective Sample Buffer",
        apply: |c| c.rl.ssb.enabled = false,
    },
    Arm {
        name: "adapter_only",
        change: "only the MLP adapter trains (vision tower and LLM frozen)",
        apply: |c| {
            c.optimizer.trainable.llm = false;
            c.optimizer.trainable.vision = false;
        },
    },
    Arm {
        name: "no_calibration",
        change: "RM threshold calibration off",
        apply: |c| {
            if let Some(monitor) = &mut c.monitor {
                monitor.config.calibration.enabled = false;
            }
        },
    },
];

fn evals_of(run_dir: &Path) -> anyhow::Result<Vec<EvalRecord>> {
    Ok(EvalRecord::load_all(&run_dir.join(EVAL_FILE))?)
}

fn metrics_of(run_dir: &Path) -> anyhow::Result<Vec<MetricsRecord>> {
    Ok(read_metrics(&RunDir::open(run_dir)?.metrics_path())?)
}

/// The model directory of `run_dir`'s checkpoint at `step`.
fn checkpoint_model(run_dir: &Path, step: u64) -> anyhow::Result<PathBuf> {
    let dir = run_dir
        .join("checkpoints")
        .join(format!("step-{step}"))
        .join("model");
    anyhow::ensure!(
        dir.is_dir(),
        "no checkpoint of step {step}: {}",
        dir.display()
    );
    Ok(dir)
}

/// An ablation arm's config: GRPO only, from the MPO checkpoint's weights with the reward model the staged
/// run trained, on the staged run's task files.
fn arm_config(
    base: &TrainConfig,
    start: &Path,
    reward_model: Option<&Path>,
    task: &TaskFiles,
    start_step: u64,
    grpo_steps: u64,
) -> TrainConfig {
    let mut config = base.clone();
    config.model.dir = Some(start.to_path_buf());
    config.model.tiny = None;
    config.model.pretrain_vision = None;
    config.data.path = task.train.clone();
    let prompts_per_step = base
        .stages
        .iter()
        .find(|s| matches!(s, Stage::Grpo { .. }))
        .and_then(Stage::prompts_per_step);
    config.stages = vec![Stage::Grpo {
        steps: grpo_steps,
        prompts_per_step,
        lr_scale: None,
    }];
    // The staged run's GRPO learning rate (with its stage's lr_scale), held constant (a fresh optimizer starts
    // where it left off, without a warmup or a second decay).
    let rate = r1v2_actors::train::schedule::learning_rate(&base.optimizer, start_step)
        * base.lr_scale_at(start_step);
    config.optimizer.lr = rate;
    config.optimizer.warmup_steps = 0;
    config.optimizer.total_steps = 0;
    if let (Some(rm), Some(dir)) = (&mut config.reward_model, reward_model) {
        rm.dir = Some(dir.to_path_buf());
        rm.tiny = None;
        rm.tiny_vl = None;
        rm.train = None;
    }
    if let Some(monitor) = &mut config.monitor {
        monitor.probe_set = Some(task.probes.clone());
    }
    if let Some(eval) = &mut config.eval {
        eval.path = task.heldout.clone();
        eval.probe_set = Some(task.probes.clone());
        eval.at_start = false;
    }
    config
}

/// The vision pretraining's result (`[model] pretrain_vision`), as a line under the stage table.
fn pretrain_line(model: &Path) -> Option<String> {
    let text = std::fs::read_to_string(model.join("vision_pretrain.json")).ok()?;
    let report: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(format!(
        "\nvision tower + adapter pretrained before SFT ({} steps, {:.0} s): cell readout accuracy {:.3} on fresh \
         scenes, {:.3} on the cells that hold a shape or a held-out digit\n",
        report["steps"].as_u64()?,
        report["seconds"].as_f64()?,
        report["cell_accuracy"].as_f64()?,
        report["filled_cell_accuracy"].as_f64()?,
    ))
}

/// Runs the demo (see the module docs) and returns what it measured.
pub fn run(options: &DemoOptions) -> anyhow::Result<DemoResult> {
    let text = if options.quick {
        QUICK_CONFIG
    } else {
        DEMO_CONFIG
    };
    let name = if options.quick {
        "configs/demo_quick.toml"
    } else {
        "configs/demo.toml"
    };
    let config = TrainConfig::from_toml_str(text, Path::new("."))
        .with_context(|| format!("the embedded demo config ({name})"))?;
    let started = Instant::now();
    let root = &options.run_dir;
    println!(
        "[1/3] the staged run: {} -> {}",
        config
            .stages
            .iter()
            .map(|s| format!("{} x{}", s.name(), s.steps()))
            .collect::<Vec<_>>()
            .join(" -> "),
        root.display()
    );
    train(RunOptions {
        config: config.clone(),
        config_text: text.to_string(),
        run_dir: root.clone(),
        resume: false,
    })?;
    let stages = evals_of(root)?;
    let metrics = metrics_of(root)?;
    let mut summary = format!(
        "## Stages (held-out: greedy, n = {})\n\n{}",
        stages.first().map_or(0, |e| e.n),
        table::stage_table(&stages, &metrics)
    );
    if let Some(line) = pretrain_line(&root.join("init-model")) {
        summary.push_str(&line);
    }
    println!(
        "\n{summary}\n(staged run: {:.0} s)",
        started.elapsed().as_secs_f64()
    );

    let mut arms = Vec::new();
    let grpo_steps = config
        .stages
        .iter()
        .filter(|s| matches!(s, Stage::Grpo { .. }))
        .map(Stage::steps)
        .sum::<u64>();
    if !options.no_ablations && grpo_steps > 0 {
        let before_grpo = config
            .stages
            .iter()
            .take_while(|s| !matches!(s, Stage::Grpo { .. }))
            .map(Stage::steps)
            .sum::<u64>();
        let start = checkpoint_model(root, before_grpo)?;
        let rm_run = root.join("reward-model-training").join("run");
        let reward_model = RunDir::open(&rm_run)
            .ok()
            .and_then(|r| r.latest_checkpoint().ok().flatten())
            .map(|(_, dir)| dir.join("model"));
        let task = TaskFiles::under(&root.join("demo-data"));
        for (i, arm) in ARMS.iter().enumerate() {
            let arm_started = Instant::now();
            let mut arm_config = arm_config(
                &config,
                &start,
                reward_model.as_deref(),
                &task,
                before_grpo,
                grpo_steps,
            );
            (arm.apply)(&mut arm_config);
            arm_config.validate()?;
            let dir = root.join("ablations").join(arm.name);
            println!(
                "[2/3] ablation {}/{}: {} ({}): GRPO x{grpo_steps} from step {before_grpo}",
                i + 1,
                ARMS.len(),
                arm.name,
                arm.change
            );
            train(RunOptions {
                config: arm_config,
                config_text: format!("# ablation arm `{}`: {}\n{text}", arm.name, arm.change),
                run_dir: dir.clone(),
                resume: false,
            })?;
            let eval = evals_of(&dir)?
                .pop()
                .context("the arm wrote no evaluation")?;
            println!(
                "      accuracy {:.3} ± {:.3} ({:.0} s)",
                eval.accuracy,
                eval.stderr,
                arm_started.elapsed().as_secs_f64()
            );
            arms.push(ArmResult {
                name: arm.name.to_string(),
                change: arm.change.to_string(),
                eval,
                metrics: metrics_of(&dir)?,
            });
        }
        summary.push_str(&format!(
            "\n## Ablations (GRPO x{grpo_steps} from the MPO checkpoint, same seeds)\n\n{}",
            table::ablation_table(&arms)
        ));
    }
    summary.push_str(&format!(
        "\nwall time: {:.0} s\n",
        started.elapsed().as_secs_f64()
    ));

    println!("[3/3] report");
    let report_dir = root.join("report");
    let report = crate::cli::report::write_report(root)?;
    let mut files = report.files;
    if !arms.is_empty() {
        let curves: Vec<(String, Vec<(f64, f64)>)> = arms
            .iter()
            .filter(|a| a.name == "full" || a.name == "no_ssb")
            .flat_map(|a| {
                [
                    (
                        format!("{} trained", a.name),
                        table::series(&a.metrics, "ssb/effective_share_after"),
                    ),
                    (
                        format!("{} fresh", a.name),
                        table::series(&a.metrics, "reward/nonzero_share"),
                    ),
                ]
            })
            .collect();
        let lines: Vec<crate::cli::report::Curve> = curves
            .iter()
            .map(|(n, p)| (n.as_str(), p.as_slice()))
            .collect();
        files.extend(crate::cli::report::write_chart(
            &report_dir.join("ablation_nonzero_share"),
            "non-zero-advantage share: SSB vs none",
            &lines,
        )?);
    }
    let summary_path = root.join("summary.md");
    std::fs::write(&summary_path, &summary)
        .with_context(|| format!("writing {}", summary_path.display()))?;
    Ok(DemoResult {
        stages,
        arms,
        summary,
    })
    .inspect(|result| {
        print!("\n{}", result.summary);
        for file in &files {
            println!("wrote {}", file.display());
        }
        println!("wrote {}", summary_path.display());
    })
}
