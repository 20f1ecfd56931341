//! `r1v2 train`: the controller that drives the schedule (SFT warm start -> MPO rounds -> GRPO steps) over
//! the actors, in one actix `System`.
//!
//! | file | what it holds |
//! |---|---|
//! | [`setup`] | building a run: run directory, models, dataset, prompt bank, every actor (fresh or resumed) |
//! | [`steps`] | the run loop and one SFT, MPO or GRPO step as the controller reads it (design.md "One GRPO step") |
//! | `scoring.rs` | verdicts and RM scores (concurrently), hybrid reward, advantages; prompts into the bank |
//! | `monitoring.rs` | the hallucination monitor's feed, probe runs, calibration changes |
//! | [`state`] | what a checkpoint holds besides the weights, and writing one atomically |
//! | [`watchdog`] | deadlines on every request, heartbeats, the stall record |
//!
//! The controller is the async task that owns the schedule: it sends each step's requests to the actors
//! and awaits their replies (under the watchdog's deadline), so it is not itself addressed by messages.

mod monitoring;
mod scoring;
pub mod setup;
pub mod state;
pub mod steps;
pub mod watchdog;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::{Stage, TrainConfig};
use crate::Result;

pub use setup::Controller;

/// What `r1v2 train` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The validated config.
    pub config: TrainConfig,
    /// The config file's text (kept in the run directory beside the resolved config).
    pub config_text: String,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Continue from the run directory's last complete checkpoint.
    pub resume: bool,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// The last completed step.
    pub step: u64,
    /// Steps the schedule has in all.
    pub total_steps: u64,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// True when Ctrl-C stopped the run before the end of the schedule.
    pub interrupted: bool,
    /// The last step's metrics.
    pub last_metrics: BTreeMap<String, f64>,
}

/// Where `step` (0-based: the step about to run) falls in the schedule: the stage and the step's offset in it.
pub fn stage_at(stages: &[Stage], step: u64) -> Option<(&Stage, u64)> {
    let mut start = 0;
    for stage in stages {
        if step < start + stage.steps() {
            return Some((stage, step - start));
        }
        start += stage.steps();
    }
    None
}

/// Runs (or resumes) a training run to the end of its schedule, a Ctrl-C, or an error.
pub fn train(options: RunOptions) -> Result<RunSummary> {
    let stop = Arc::new(AtomicBool::new(false));
    let system = actix::System::new();
    let result = system.block_on(async move {
        let flag = Arc::clone(&stop);
        actix::spawn(async move {
            if actix_rt::signal::ctrl_c().await.is_ok() {
                tracing::warn!("Ctrl-C: stopping after the current step, with a checkpoint");
                flag.store(true, Ordering::SeqCst);
            }
        });
        let mut controller = Controller::build(&options, stop).await?;
        controller.run().await
    });
    // Dropping the system ends the actors' threads: their last addresses were in its tasks.
    result
}
