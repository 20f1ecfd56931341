//! r1v2: fine-tune multimodal reasoning models (ViT + MLP adapter + LLM) with the Skywork R1V2 method.
//!
//! | module | what it holds |
//! |---|---|
//! | [`cli`] | the `r1v2` subcommands, one file each |
//! | [`error`] | the crate's error type |
//!
//! The models, verifiers and RL algorithms live in `r1v2-actors`; differentiable ops in `r1v2-kernels`.

pub mod cli;
pub mod error;

pub use error::{Error, Result};
