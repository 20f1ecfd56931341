//! `r1v2 train CONFIG.toml [--run-dir DIR] [--resume RUN_DIR]` and `r1v2 demo`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::config::TrainConfig;
use crate::trainer::{train, RunOptions, RunSummary};

/// Arguments of `r1v2 train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The run config (TOML): model, data, stages, RL, verifiers, reward model, monitor, optimizer.
    pub config: PathBuf,
    /// Where the run writes its config, logs, metrics and checkpoints (default: runs/<config name>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its last complete checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "run_dir")]
    pub resume: Option<PathBuf>,
}

/// Arguments of `r1v2 demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the demo run goes (default: the first free runs/demo, runs/demo-2, ...).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// The short run (configs/demo_quick.toml): the same stages, tables and ablations in a few minutes.
    #[arg(long)]
    pub quick: bool,
    /// Only the staged run and its table.
    #[arg(long)]
    pub no_ablations: bool,
}

fn print_summary(summary: &RunSummary) {
    let state = if summary.interrupted {
        "stopped"
    } else {
        "finished"
    };
    println!(
        "{state} at step {}/{}; last checkpoint: {}",
        summary.step,
        summary.total_steps,
        summary
            .last_checkpoint
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string())
    );
}

/// The run directory and whether to resume it: `--resume DIR`, else `--run-dir DIR`, else
/// `runs/<config file stem>` (`default_stem` when the path has none).
pub fn run_dir_of(
    config: &Path,
    run_dir: Option<PathBuf>,
    resume: Option<PathBuf>,
    default_stem: &str,
) -> (PathBuf, bool) {
    match resume {
        Some(dir) => (dir, true),
        None => (
            run_dir.unwrap_or_else(|| {
                let stem = config
                    .file_stem()
                    .map_or(default_stem.into(), |s| s.to_string_lossy().into_owned());
                Path::new("runs").join(stem)
            }),
            false,
        ),
    }
}

/// Runs `r1v2 train`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let config = TrainConfig::from_file(&args.config)?;
    let config_text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let (run_dir, resume) = run_dir_of(&args.config, args.run_dir, args.resume, "run");
    let summary = train(RunOptions {
        config,
        config_text,
        run_dir,
        resume,
    })?;
    print_summary(&summary);
    Ok(())
}

/// The first of runs/demo, runs/demo-2, ... that does not exist yet.
fn free_demo_dir() -> PathBuf {
    let base = Path::new("runs");
    (1..)
        .map(|n| match n {
            1 => base.join("demo"),
            n => base.join(format!("demo-{n}")),
        })
        .find(|dir| !dir.exists())
        .unwrap_or_else(|| base.join("demo"))
}

/// Runs `r1v2 demo`: the staged run on the embedded task, the ablations, the tables and charts.
pub fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let run_dir = args.run_dir.unwrap_or_else(free_demo_dir);
    println!(
        "r1v2 demo{}: a random tiny InternVL-layout model (InternViT + pixel-shuffle MLP adapter + Qwen2) learns\n\
         the embedded visual-reasoning task (shape scenes + handwritten digits) on the CPU: SFT warm start on\n\
         templated traces -> MPO rounds -> GRPO with the hybrid reward (math verifier + a Qwen2.5-VL reward\n\
         model fitted by train-rm + format), the SSB and the hallucination monitor; held-out evaluation after\n\
         each stage; then the ablations. Run directory: {}",
        if args.quick { " --quick" } else { "" },
        run_dir.display()
    );
    crate::demo::run::run(&crate::demo::run::DemoOptions {
        run_dir,
        quick: args.quick,
        no_ablations: args.no_ablations,
    })?;
    Ok(())
}
