//! Generation speed of a Qwen2 checkpoint on the CPU (tokens/s of sampled decoding), as one JSON line.
//!
//!     cargo run --release --example bench_generate -- --model DIR [--prompts 1] [-n 8] [--threads 2]
//!         [--prompt-len 16] [--new-tokens 64] [--iters 1]
//!
//! `benches/bench_generate.py` builds random Qwen2 models with transformers, times `generate` on them and
//! runs this example on the same weights with the same thread count, printing one table. The batch is
//! `prompts x n` rows: `n` responses to each of `prompts` prompts of `prompt-len` tokens. No stop token:
//! every response runs to `new-tokens`, so the token count is exact. Timing covers the whole request
//! (prefill included), as transformers' `generate` does. The model is packed, the batch sharded and CANDLE_NUM_THREADS
//! defaults to 1, as in `r1v2 generate` and the policy generator (`R1V2_UNPACKED=1`: candle's matmuls instead of the packed kernel).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Parser;
use r1v2_actors::generate::qwen2::Qwen2Generator;
use r1v2_actors::generate::{generate_groups, PromptInput, SamplingParams};
use r1v2_actors::model::qwen2::{Config, ForCausalLM};
use r1v2_actors::model::weights::{read_config, WeightStore};

#[derive(Parser)]
struct Args {
    /// A Qwen2ForCausalLM directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Number of distinct prompts.
    #[arg(long, default_value_t = 1)]
    prompts: usize,
    /// Responses per prompt (the group size).
    #[arg(short, long, default_value_t = 1)]
    n: usize,
    /// Compute threads (sets RAYON_NUM_THREADS before any pool starts); default: the environment's.
    #[arg(long)]
    threads: Option<usize>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    /// Tokens generated per response.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Timed repetitions after one warm-up (the mean is printed).
    #[arg(long, default_value_t = 1)]
    iters: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(threads) = args.threads {
        // Before any thread pool exists (candle and rayon read it when they first start).
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    // As the `r1v2` binary (src/main.rs): candle's spinning element-wise pool would take a core from the matmuls.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let device = Device::Cpu;
    let cfg: Config = read_config(&args.model.join("config.json"))?;
    let store = WeightStore::load(&args.model, DType::F32, &device)?;
    let mut model = ForCausalLM::new(&cfg, store.frozen_var_builder())?;
    if std::env::var_os("R1V2_UNPACKED").is_none() {
        model.pack_weights()?; // what `r1v2 generate` and the policy generator run
    }
    let generator = Qwen2Generator::new(&model, &device);

    // Deterministic prompt ids in [0, vocab): a multiplicative hash of (prompt, position).
    let prompts: Vec<PromptInput> = (0..args.prompts as u64)
        .map(|p| {
            let ids = (0..args.prompt_len as u64)
                .map(|i| (((p * 131 + i) * 2_654_435_761) % cfg.vocab_size as u64) as u32)
                .collect();
            PromptInput::text(ids, p)
        })
        .collect();
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
        max_new_tokens: args.new_tokens,
        stop_token_ids: Vec::new(),
        seed: 0,
        ..SamplingParams::default()
    };
    let run = || -> Result<usize> {
        let groups = generate_groups(&generator, &prompts, args.n, &params, None)?;
        Ok(groups
            .iter()
            .flat_map(|g| g.iter().map(|r| r.token_ids.len()))
            .sum())
    };
    run()?; // warm-up
    let start = Instant::now();
    let mut tokens = 0;
    for _ in 0..args.iters {
        tokens += run()?;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "rows": args.prompts * args.n,
            "tokens": tokens / args.iters,
            "seconds": seconds / args.iters as f64,
            "tokens_per_s": tokens as f64 / seconds,
        })
    );
    Ok(())
}
