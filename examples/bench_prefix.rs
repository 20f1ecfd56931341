//! What prefix sharing saves: prefilling a group's prompt once and repeating its KV cache rows, against
//! prefilling every row of the group.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release --example bench_prefix -- [--prompt 300] [--group 8]
//!
//! The model is a random ~20M-parameter Qwen2 (the shape of `benches/bench_forward.py`); timing does not
//! depend on the weights' values.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use r1v2_actors::model::qwen2::{Config, ForCausalLM};

use common::median_seconds;

#[derive(Parser)]
struct Args {
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 300)]
    prompt: usize,
    /// Responses per prompt (G).
    #[arg(long, default_value_t = 8)]
    group: usize,
    /// Timed repetitions (the median is printed).
    #[arg(long, default_value_t = 3)]
    iters: usize,
}

fn main() -> Result<()> {
    common::candle_on_the_calling_thread();
    let args = Args::parse();
    let device = Device::Cpu;
    let cfg: Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6,
        "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true
    }))?;
    let vars = VarMap::new();
    let model = ForCausalLM::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &device))?;
    let prompt: Vec<u32> = (0..args.prompt as u32).map(|i| (i * 7919) % 8192).collect();
    let one = Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?; // (1, T)
    let group = one.repeat((args.group, 1))?; // (G, T)

    let shared = median_seconds(args.iters, || {
        let mut cache = model.new_cache();
        model.forward_step_ids(&one, None, &mut cache)?;
        cache.select_rows(&vec![0; args.group])?;
        Ok(())
    })?;
    let per_row = median_seconds(args.iters, || {
        let mut cache = model.new_cache();
        model.forward_step_ids(&group, None, &mut cache)?;
        Ok(())
    })?;
    println!(
        "Qwen2 ~21M, f32, CPU; prompt {} tokens, group {}; median of {}",
        args.prompt, args.group, args.iters
    );
    println!("| prefill | ms | prompt tokens computed |");
    println!("|---|---|---|");
    println!(
        "| every row (no sharing) | {:.1} | {} |",
        per_row * 1e3,
        args.prompt * args.group
    );
    println!(
        "| once + repeat cache rows | {:.1} | {} |",
        shared * 1e3,
        args.prompt
    );
    println!("saving: {:.1}x", per_row / shared);
    Ok(())
}
