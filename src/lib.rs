//! r1v2: fine-tune multimodal reasoning models (ViT + MLP adapter + LLM) with the Skywork R1V2 method.
//!
//! | module | what it holds |
//! |---|---|
//! | [`cli`] | the `r1v2` subcommands, one file each |
//! | [`text`] | `tokenizer.json` wrapper and the Qwen / InternVL-chat template |
//! | [`images`] | InternVL image preprocessing: dynamic tiling, bicubic resize, normalisation |
//! | [`model_dir`] | a model directory: which family it holds, its config and headers; device names |
//! | [`placement`] | `[placement]`: the devices of each role (`all`, `cpu:N`, `cuda:N`), resolved and checked |
//! | [`prompting`] | [`prompting::PromptEncoder`]: question + image files -> prompt ids and tiles, stop ids, decode |
//! | [`data`] | JSONL prompt datasets, the seeded per-epoch shuffling loader and its resumable cursor |
//! | [`telemetry`] | tracing setup (terminal + RUN_DIR/log.jsonl), metrics.jsonl writer/reader, progress bar |
//! | [`checkpoint`] | the run directory layout, atomic checkpoints, trainer state |
//! | [`config`] | the run config of `r1v2 train` (TOML, typed, validated) |
//! | [`trainer`] | `r1v2 train`: the controller driving the actors through the schedule, checkpoints, watchdog |
//! | [`demo`] | the embedded default task (colour squares, multiple choice) and its config |
//! | [`tiny`] | random tiny models in the real checkpoint layouts (CI, demo, tests) |
//! | [`error`] | the crate's error type |
//!
//! The models, verifiers and RL algorithms live in `r1v2-actors`; differentiable ops in `r1v2-kernels`.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod demo;
pub mod error;
pub mod images;
pub mod model_dir;
pub mod placement;
pub mod prompting;
pub mod rm_train;
pub mod telemetry;
pub mod text;
pub mod tiny;
pub mod trainer;

pub use error::{Error, Result};
