//! r1v2: fine-tune multimodal reasoning models (ViT + MLP adapter + LLM) with the Skywork R1V2 method.
//!
//! | module | what it holds |
//! |---|---|
//! | [`cli`] | the `r1v2` subcommands, one file each |
//! | [`error`] | the crate's error type |
//! | [`images`] | InternVL image preprocessing: dynamic tiling, bicubic resize, normalisation |
//! | [`text`] | `tokenizer.json` wrapper and the Qwen / InternVL-chat template |
//!
//! The models, verifiers and RL algorithms live in `r1v2-actors`; differentiable ops in `r1v2-kernels`.

pub mod cli;
pub mod error;
pub mod images;
pub mod text;

pub use error::{Error, Result};
