//! What the prefix-shared forward saves in a GRPO update: the response log-probs of a batch of groups (G
//! responses per prompt) under the policy with their backward, plus the frozen reference's log-probs, run
//! row by row (every row `prompt ++ response`) and with each prompt's forward shared by its group.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release --example bench_update -- [--prompts 32] [--group 8]
//!
//! The model is the demo's tiny InternVL-layout policy (configs/demo.toml's `tiny`, random weights; the
//! adapter and the LLM train, the vision tower is frozen) and the prompts are the demo task's first training
//! lines with their images; every response of a group is the line's worked solution (the SFT target, the
//! length a trained policy writes). Micro-batches of `--micro-batch` rows, as `[optimizer] micro_batch`.
//! It prints one table: median seconds over `--iters` runs after a warm-up, and the largest log-prob
//! difference between the two.

mod common;

use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use r1v2::config::TinySpec;
use r1v2::data::{load_jsonl, OnBadLine};
use r1v2::prompting::PromptEncoder;
use r1v2_actors::model::chat::{ChatModel, Trainable};
use r1v2_actors::prompt::EncodedPrompt;
use r1v2_actors::rl::PromptId;
use r1v2_actors::train::{ResponseRow, ResponseScorer};

use common::median_seconds;

#[derive(Parser)]
struct Args {
    /// Prompts (groups) in the batch.
    #[arg(long, default_value_t = 32)]
    prompts: usize,
    /// Responses per prompt (G).
    #[arg(long, default_value_t = 8)]
    group: usize,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 32)]
    micro_batch: usize,
    /// Timed runs (the median is printed).
    #[arg(long, default_value_t = 3)]
    iters: usize,
}

/// One update's log-prob work on `rows`: per micro-batch, the policy's log-probs (with entropies, as GRPO
/// asks) and their backward through a weighted sum, and the reference's log-probs. Returns every row's
/// policy log-probs.
fn update(
    policy: &ResponseScorer,
    reference: &ResponseScorer,
    rows: &[ResponseRow],
    micro_batch: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(micro_batch) {
        let scored = policy.response_logprobs(chunk, true)?;
        let reference = reference.response_logprobs(chunk, false)?.logprobs;
        let weights = (Tensor::ones_like(&reference)? * 0.5)?;
        let loss = ((&scored.logprobs * &weights)? - reference)?.sum_all()?;
        loss.backward()?;
        out.extend(scored.logprobs.to_vec2::<f32>()?);
    }
    Ok(out)
}

fn main() -> Result<()> {
    common::candle_on_the_calling_thread();
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let spec = TinySpec {
        seed: 0,
        hidden: 96,
        layers: 3,
        image_size: 84,
        vision_hidden: 48,
        vision_layers: 2,
    };
    let model_dir = dir.path().join("model");
    r1v2::tiny::write_chat_model(&model_dir, &spec)?;
    let task = r1v2::demo::write_task(&dir.path().join("task"))?;
    let dataset = load_jsonl(&task.train, OnBadLine::Error)?;
    let encoder = PromptEncoder::from_model_dir(&model_dir, &Device::Cpu, DType::F32)?;

    let mut prompts = Vec::new();
    let mut solutions = Vec::new();
    for (i, sample) in dataset.samples.iter().take(args.prompts).enumerate() {
        let text = encoder.encode(&sample.question, &sample.images)?;
        prompts.push(Arc::new(EncodedPrompt {
            id: PromptId(i as u64),
            token_ids: text.token_ids,
            pixel_values: text.pixel_values,
            image_grids: text.image_grids,
            answer: sample.answer.clone(),
            verifier: sample.verifier.clone(),
            question: sample.question.clone(),
            meta: sample.meta.clone(),
        }));
        let solution = sample.solution.as_deref().unwrap_or(&sample.answer);
        solutions.push(encoder.tokenizer().encode(solution)?);
    }
    let rows: Vec<ResponseRow> = prompts
        .iter()
        .zip(&solutions)
        .flat_map(|(prompt, solution)| {
            (0..args.group).map(move |_| ResponseRow {
                prompt: Arc::clone(prompt),
                response: solution,
            })
        })
        .collect();
    let prompt_tokens: usize = prompts.iter().map(|p| p.token_ids.len()).sum();
    let response_tokens: usize = solutions.iter().map(Vec::len).sum();

    let trainable = Trainable {
        vision: false,
        adapter: true,
        llm: true,
    };
    let policy = ChatModel::load(&model_dir, DType::F32, &Device::Cpu, trainable)?;
    let vb = policy
        .store
        .var_builder(move |name| trainable.contains(name));
    let shared = ResponseScorer::new(policy.model.clone(), &vb)?;
    let plain = shared.clone().without_prefix_sharing();
    let frozen = ChatModel::load(&model_dir, DType::F32, &Device::Cpu, Trainable::default())?;
    let reference = ResponseScorer::new(frozen.model.clone(), &frozen.store.frozen_var_builder())?;
    let reference_plain = reference.clone().without_prefix_sharing();

    let a = update(&plain, &reference_plain, &rows, args.micro_batch)?;
    let b = update(&shared, &reference, &rows, args.micro_batch)?;
    let diff = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let row_by_row = median_seconds(args.iters, || {
        update(&plain, &reference_plain, &rows, args.micro_batch).map(drop)
    })?;
    let prefix_shared = median_seconds(args.iters, || {
        update(&shared, &reference, &rows, args.micro_batch).map(drop)
    })?;

    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "GRPO update log-probs: {} prompts x G={}, micro-batch {}, mean prompt {:.0} tokens, mean response {:.0} \
         tokens, {threads} threads",
        prompts.len(),
        args.group,
        args.micro_batch,
        prompt_tokens as f64 / prompts.len() as f64,
        response_tokens as f64 / prompts.len() as f64,
    );
    println!("| forward | policy fwd+bwd + reference fwd (s) | speed-up |");
    println!("|---|---|---|");
    println!("| row by row | {row_by_row:.3} | 1.00x |");
    println!(
        "| prefix-shared | {prefix_shared:.3} | {:.2}x |",
        row_by_row / prefix_shared
    );
    println!("max |log-prob difference| = {diff:.2e}");
    Ok(())
}
