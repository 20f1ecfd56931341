//! The `r1v2` command line: one file per subcommand, each with its clap `Args` and a `run`.

use clap::{Parser, Subcommand};

pub mod forward;
pub mod forward_qwen2_5_vl;
pub mod generate;
pub mod inspect;
pub mod report;
pub mod train;
pub mod train_rm;
pub mod verify;

/// Fine-tune multimodal reasoning models with the Skywork R1V2 method.
#[derive(Debug, Parser)]
#[command(name = "r1v2", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a model directory's architecture, parameter count per module and dtypes.
    Inspect(inspect::InspectArgs),
    /// Run one forward pass on token ids (and images) from a JSON file; write logits or scores.
    Forward(forward::ForwardArgs),
    /// Sample responses to a question (and images) with the generation engine; stream or print them.
    Generate(generate::GenerateArgs),
    /// Score a JSON-lines file of responses with the rule verifiers.
    Verify(verify::VerifyArgs),
    /// Train: SFT warm start, MPO rounds and GRPO steps over the actors, as the config's [[stages]] say.
    Train(train::TrainArgs),
    /// Train a reward model (Qwen2 value head or Qwen2.5-VL + value head) on preference pairs (Bradley-Terry).
    TrainRm(train_rm::TrainRmArgs),
    /// The main job on the embedded default task with a random tiny model, on the CPU: stages, ablations, tables.
    Demo(train::DemoArgs),
    /// Draw RUN_DIR/metrics.jsonl to PNG/SVG charts in RUN_DIR/report/ and print a summary table.
    Report(report::ReportArgs),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Inspect(args) => inspect::run(args),
            Command::Forward(args) => forward::run(args),
            Command::Generate(args) => generate::run(args),
            Command::Verify(args) => args.run(),
            Command::Report(args) => report::run(&args),
            Command::Train(args) => train::run(args),
            Command::TrainRm(args) => train_rm::run(args),
            Command::Demo(args) => train::run_demo(args),
        }
    }
}
