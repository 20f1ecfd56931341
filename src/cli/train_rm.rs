//! `r1v2 train-rm CONFIG.toml [--run-dir DIR] [--resume RUN_DIR]`: train a reward model on preference pairs
//! with the Bradley-Terry loss (see [`crate::rm_train`]); prints the held-out pairwise accuracy at the end.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::rm_train::{train_reward_model, RmConfig};

/// Arguments of `r1v2 train-rm`.
#[derive(Debug, Args)]
pub struct TrainRmArgs {
    /// The config (TOML): `[model]`, `[data]`, `[train]`.
    pub config: PathBuf,
    /// Where the run writes its config, metrics and checkpoints (default: runs/<config name>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its last complete checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "run_dir")]
    pub resume: Option<PathBuf>,
}

/// Runs `r1v2 train-rm`.
pub fn run(args: TrainRmArgs) -> anyhow::Result<()> {
    let config = RmConfig::from_file(&args.config)?;
    let config_text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let (run_dir, resume) = super::train::run_dir_of(&args.config, args.run_dir, args.resume, "rm");
    let summary = train_reward_model(&config, &config_text, &run_dir, resume)?;
    if let Some(initial) = summary.initial {
        println!(
            "held-out pairwise accuracy before: {:.3} ({} pairs, loss {:.4})",
            initial.accuracy, initial.pairs, initial.loss
        );
    }
    println!(
        "held-out pairwise accuracy after {} steps: {:.3} ({} pairs, loss {:.4}); checkpoint: {}",
        summary.step,
        summary.last.accuracy,
        summary.last.pairs,
        summary.last.loss,
        summary.checkpoint.display()
    );
    Ok(())
}
