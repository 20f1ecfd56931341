//! Forward and forward+backward time (median) of a Qwen2 checkpoint on the CPU, as one JSON line.
//!
//!     cargo run --release --example bench_forward -- --model DIR [--batch 4] [--seq 128] [--iters 5]
//!
//! `benches/bench_forward.py` builds a ~20M-parameter Qwen2 with transformers, times PyTorch on it and runs
//! this example on the same weights with the same thread count (RAYON_NUM_THREADS), printing one table.
//! The backward pass reaches every LLM parameter (all trainable), through the same token log-probs
//! loss as the PyTorch side: -mean(log p(ids[t+1] | ids[..=t])).
//! `peak_rss_mib` is the process's peak resident set (VmHWM, Linux) above its resident set once the model and
//! the batch are loaded: what the passes took at their peak (the forward+backward's).

mod common;

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use r1v2_actors::model::qwen2::{Config, ForCausalLM};
use r1v2_actors::model::weights::{read_config, WeightStore};

use common::median_seconds;

#[derive(Parser)]
struct Args {
    /// A Qwen2ForCausalLM directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
}

/// A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(field: &str) -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/self/status"))?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse::<f64>()?;
    Ok(kib)
}

fn main() -> Result<()> {
    common::candle_on_the_calling_thread();
    let args = Args::parse();
    let device = Device::Cpu;
    let cfg: Config = read_config(&args.model.join("config.json"))?;
    let store = WeightStore::load(&args.model, DType::F32, &device)?;
    let model = ForCausalLM::new(&cfg, store.var_builder(|_| true))?;
    let params: Vec<_> = store.trainable_vars().into_iter().map(|(_, v)| v).collect();

    // Deterministic token ids in [0, vocab): a multiplicative hash of the position.
    let n = args.batch * args.seq;
    let ids: Vec<u32> = (0..n as u64)
        .map(|i| ((i * 2_654_435_761) % cfg.vocab_size as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (args.batch, args.seq), &device)?; // (B, T)
    let mask = Tensor::ones((args.batch, args.seq), DType::U32, &device)?;

    // "5" resets the peak (VmHWM) to the current resident set: loading's own peak does not count.
    std::fs::write("/proc/self/clear_refs", "5")?;
    let loaded = status_kib("VmRSS")?;
    let forward = median_seconds(args.iters, || {
        model.forward(&ids, Some(&mask))?;
        Ok(())
    })?;
    let forward_backward = median_seconds(args.iters, || {
        let loss = model.token_logprobs(&ids, Some(&mask))?.mean_all()?.neg()?;
        let grads = loss.backward()?;
        // Every parameter must have received a gradient, or the timing would flatter us.
        for var in &params {
            anyhow::ensure!(grads.get(var).is_some(), "a parameter got no gradient");
        }
        Ok(())
    })?;
    let peak = (status_kib("VmHWM")? - loaded) / 1024.0;
    println!(
        "{}",
        serde_json::json!({ "forward": forward, "forward+backward": forward_backward, "peak_rss_mib": peak })
    );
    Ok(())
}
