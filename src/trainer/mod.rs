//! `r1v2 train`: the controller that drives the schedule (SFT warm start -> MPO rounds -> GRPO steps) over
//! the actors, in one actix `System`.
//!
//! | file | what it holds |
//! |---|---|
//! | `controller.rs` | [`Controller`]: private state, the run loop, the actor calls, the phases the steps share, shutdown |
//! | `grpo.rs`, `mpo.rs`, `sft.rs` | one step of each stage, top to bottom (design.md "One GRPO step") |
//! | `eval.rs` | held-out evaluation after each stage ([`EvalRecord`], RUN_DIR/eval.jsonl) |
//! | `build.rs` | building a run: run directory, models, dataset, prompt bank, every actor (fresh or resumed) |
//! | `checkpoint.rs` | writing checkpoint `step-N` atomically |
//! | [`metrics`] | a step's metrics as typed families, named for metrics.jsonl |
//! | [`state`] | what a checkpoint holds besides the weights ([`state::LoopState`]) |
//! | [`watchdog`] | deadlines on every request, heartbeats, the stall record |
//!
//! Scoring (verdicts + RM scores -> rewards, advantages, the monitor's observation) is the pure function
//! `r1v2_actors::rl::scoring::score_groups`.

mod controller;
pub mod metrics;
pub mod state;
pub mod watchdog;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::{Stage, TrainConfig};
use crate::Result;

pub use controller::eval::{EvalRecord, EVAL_FILE};
pub use controller::Controller;

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
        let result = controller.run().await;
        if let Err(error) = &result {
            tracing::error!(%error, "the run stopped with an error");
        }
        // Whatever ended the run: close the actors in order, then drop their last addresses.
        controller.shutdown().await;
        result
    });
    // Dropping the system ends what is left of its tasks (the watchdog's heartbeats).
    result
}
