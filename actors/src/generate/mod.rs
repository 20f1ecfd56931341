//! The generation engine of the policy generator: sampling parameters, logits processors, stop strings.
//!
//! | file | what it holds |
//! |---|---|
//! | [`sampling`] | [`SamplingParams`] (serde, validated) and [`RowRng`], the per-response random stream |
//! | [`processors`] | transformers' logits processors and [`sample_next`], the choice of one token with its log-probs |
//! | [`stop`] | stop-string detection on decoded text across token boundaries |
//! | [`rollout`] | the engine's inputs and outputs: [`PromptInput`], [`Rollout`], [`FinishReason`] |
//! | [`engine`] | [`generate_groups`]: grouped sampling with a shared prefix, over any [`StepModel`] |
//! | [`qwen2`] | [`StepModel`] for the Qwen2 LLM and its KV cache |
//! | [`shards`] | [`shards::ShardedCache`]: the running rows' KV cache in shards that decode concurrently |
//! | [`chat`] | [`StepModel`] for the InternVL-chat model: images encoded once per group, then the LLM |
//! | [`qwen2_5_vl`] | [`StepModel`] for Qwen2.5-VL: images once per group, multimodal RoPE prefill, Qwen2 decode steps |

pub mod chat;
pub mod engine;
pub mod processors;
pub mod qwen2;
pub mod qwen2_5_vl;
pub mod rollout;
pub mod sampling;
pub mod shards;
pub mod stop;

pub use engine::{
    generate_groups, generate_groups_streaming, generate_one_uncached, StepModel, TokenSink,
};
pub use engine::{generate_groups_batched, BatchOptions};
pub use processors::{sample_next, SampledToken, Scratch, SeenTokens, TokenLogprobs};
pub use rollout::{FinishReason, PromptInput, Rollout};
pub use sampling::{validate_group_size, RowRng, SamplingParams};
pub use stop::{DecodeFn, StopStrings};
