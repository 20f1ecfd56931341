//! The SFT warm-start update on the tiny InternVL-chat fixture: its loss is the token-mean NLL of the target
//! responses (checked against `log_softmax` of `ChatModel::forward` on each row alone), accumulating over
//! micro-batches gives the single-batch gradient, and a few updates lower the NLL.

mod train_common;

use anyhow::{ensure, Result};
use candle_core::{Device, IndexOp, Tensor, D};
use r1v2_actors::protocol::SftExample;
use r1v2_actors::rl::PromptId;
use r1v2_actors::train::{OptimConfig, PolicyTrainer};
use train_common::{bank, load, prompts, response};

fn trainer(micro_batch: usize) -> Result<PolicyTrainer> {
    let config = OptimConfig {
        lr: 1e-2,
        micro_batch,
        ..Default::default()
    };
    Ok(PolicyTrainer::new(load(config.trainable)?, config)?)
}

fn examples() -> Vec<SftExample> {
    [(0, 5), (2, 3), (1, 6), (3, 2)]
        .into_iter()
        .enumerate()
        .map(|(seed, (prompt, len))| SftExample {
            prompt_id: PromptId(prompt),
            response: response(seed as u64 + 10, len),
        })
        .collect()
}

#[test]
fn sft_loss_is_the_token_mean_nll_and_accumulates_exactly() -> Result<()> {
    let (whole, split) = (trainer(64)?, trainer(1)?);
    let bank = bank()?;
    let examples = examples();
    let a = whole.sft_gradients(&examples, &bank)?;
    let b = split.sft_gradients(&examples, &bank)?;

    // Reference: -mean over every response token of log_softmax(forward(prompt + response)) at that token.
    let loaded = load(Default::default())?;
    let prompts = prompts()?;
    let (mut nll, mut tokens) = (0f64, 0usize);
    for example in &examples {
        let prompt = &prompts[example.prompt_id.0 as usize];
        let ids: Vec<u32> = prompt
            .token_ids
            .iter()
            .chain(&example.response)
            .copied()
            .collect();
        let len = ids.len();
        let input = Tensor::from_vec(ids, (1, len), &Device::Cpu)?;
        let logits = loaded
            .model
            .forward(&input, prompt.pixel_values.as_ref(), None)?
            .i(0)?;
        let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        for (j, &token) in example.response.iter().enumerate() {
            let at = prompt.token_ids.len() - 1 + j;
            nll -= f64::from(log_p.i((at, token as usize))?.to_scalar::<f32>()?);
            tokens += 1;
        }
    }
    let want = nll / tokens as f64;
    let got = a.metrics["sft/nll"];
    eprintln!("sft/nll {got} vs reference {want}");
    ensure!(
        (got - want).abs() < 1e-5 * want.abs().max(1.0),
        "nll {got} vs {want}"
    );
    ensure!((b.metrics["sft/nll"] - want).abs() < 1e-5 * want.abs().max(1.0));
    ensure!(a.tokens == tokens && a.rows == examples.len());

    let mut worst = 0f32;
    let mut scale = 0f32;
    for (x, y) in a.grads.iter().zip(&b.grads) {
        worst = worst.max((x - y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
        scale = scale.max(x.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
    }
    eprintln!("max |accumulated - single| = {worst:e} (max |grad| {scale:e})");
    ensure!(scale > 1e-4, "gradient is ~0: the check would be vacuous");
    ensure!(worst < 1e-5, "accumulated gradient differs by {worst}");
    Ok(())
}

#[test]
fn sft_updates_lower_the_nll_and_bump_the_version() -> Result<()> {
    let mut trainer = trainer(2)?;
    let bank = bank()?;
    let examples = examples();
    let first = trainer.sft_update(&examples, &bank)?;
    ensure!(first.weights.version == 1);
    let mut last = first.metrics["sft/nll"];
    for _ in 0..4 {
        last = trainer.sft_update(&examples, &bank)?.metrics["sft/nll"];
    }
    eprintln!("sft/nll {} -> {last}", first.metrics["sft/nll"]);
    ensure!(last < first.metrics["sft/nll"] - 0.05, "NLL did not drop");
    ensure!(trainer.version() == 5);
    let empty = trainer.sft_update(&[], &bank);
    ensure!(empty.is_err(), "an empty batch is an error");
    let bad = trainer.sft_update(
        &[SftExample {
            prompt_id: PromptId(0),
            response: vec![],
        }],
        &bank,
    );
    ensure!(format!("{}", bad.err().unwrap()).contains("empty response"));
    ensure!(trainer.version() == 5, "failed updates change nothing");
    Ok(())
}
