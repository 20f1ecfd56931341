//! `r1v2 train CONFIG.toml [--run-dir DIR] [--resume RUN_DIR]` and `r1v2 demo`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::config::TrainConfig;
use crate::demo::DEMO_CONFIG;
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

/// Runs `r1v2 demo`: the embedded task with a random tiny model on the CPU, then the report.
pub fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let run_dir = args.run_dir.unwrap_or_else(free_demo_dir);
    let config = TrainConfig::from_toml_str(DEMO_CONFIG, Path::new("."))
        .context("the embedded demo config (configs/demo.toml)")?;
    println!(
        "r1v2 demo: a random tiny InternVL-style model learns the embedded colour task on the CPU\n\
         (SFT warm start -> MPO -> GRPO with the hybrid reward, SSB and the hallucination monitor).\n\
         Run directory: {}",
        run_dir.display()
    );
    let summary = train(RunOptions {
        config,
        config_text: DEMO_CONFIG.to_string(),
        run_dir: run_dir.clone(),
        resume: false,
    })?;
    print_summary(&summary);
    let report = crate::cli::report::write_report(&run_dir)?;
    print!("{}", crate::cli::report::format_summary(&report.summaries));
    for file in &report.files {
        println!("wrote {}", file.display());
    }
    Ok(())
}
