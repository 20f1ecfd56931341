//! Batched response log-probs (right padding, shared image encoding, LM head at response positions only)
//! equal `log_softmax` of `ChatModel::forward` on each row alone, without padding.

mod train_common;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use r1v2_actors::model::chat::Trainable;
use r1v2_actors::train::{ResponseRow, ResponseScorer};
use train_common::{load, max_diff, prompts, response, response_rows, same_gradients};

#[test]
fn batched_response_logprobs_equal_single_row_forward() -> Result<()> {
    let loaded = load(Trainable::default())?;
    let scorer = ResponseScorer::new(loaded.model.clone(), &loaded.store.frozen_var_builder())?;
    let prompts = prompts()?;
    let responses = [
        (0, response(1, 5)),
        (0, response(2, 3)),
        (2, response(3, 7)),
        (1, response(4, 1)),
        (3, response(5, 4)),
    ];
    let rows = response_rows(&prompts, &responses);
    let out = scorer.response_logprobs(&rows, true)?;
    ensure!(out.logprobs.dims() == [5, 7], "{:?}", out.logprobs.dims());
    let entropy = out.entropy.clone().expect("asked for entropy");
    let mut worst = 0f32;
    for (r, (p, resp)) in responses.iter().enumerate() {
        let prompt = &prompts[*p];
        let ids: Vec<u32> = prompt.token_ids.iter().chain(resp).copied().collect();
        let len = ids.len();
        let input = Tensor::from_vec(ids, (1, len), &Device::Cpu)?;
        let logits = loaded
            .model
            .forward(&input, prompt.pixel_values.as_ref(), None)?
            .i(0)?; // (L, V)
        let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let prompt_len = prompt.token_ids.len();
        for j in 0..7 {
            let got = out.logprobs.i((r, j))?.to_scalar::<f32>()?;
            let mask = out.mask.i((r, j))?.to_scalar::<f32>()?;
            let got_entropy = entropy.i((r, j))?.to_scalar::<f32>()?;
            if j >= resp.len() {
                ensure!(
                    mask == 0.0 && got == 0.0 && got_entropy == 0.0,
                    "padding ({r}, {j})"
                );
                continue;
            }
            ensure!(mask == 1.0);
            let row = log_p.i(prompt_len - 1 + j)?;
            let want = row.i(resp[j] as usize)?.to_scalar::<f32>()?;
            let want_entropy = (row.exp()? * &row)?.sum_all()?.neg()?.to_scalar::<f32>()?;
            let diff = (got - want).abs().max((got_entropy - want_entropy).abs());
            worst = worst.max(diff);
            ensure!(
                diff < 1e-5,
                "row {r} token {j}: {got} vs {want} (entropy {got_entropy} vs {want_entropy})"
            );
        }
    }
    eprintln!("max |batched - single-row| = {worst:e}");
    // The log-probs carry gradients to the adapter.
    let grads = out.logprobs.sum_all()?.backward()?;
    for (name, var) in &loaded.trainable_vars {
        let grad = grads.get(var.as_tensor());
        ensure!(grad.is_some(), "no gradient reaches `{name}`");
    }
    ensure!(out.logprobs.dtype() == DType::F32);
    Ok(())
}

#[test]
fn bad_rows_are_errors_naming_the_prompt() -> Result<()> {
    let loaded = load(Trainable::default())?;
    let scorer = ResponseScorer::new(loaded.model.clone(), &loaded.store.frozen_var_builder())?;
    let prompts = prompts()?;
    let resp = response(9, 3);
    // Prompt 0's image tokens with prompt 1's single tile.
    let mut wrong = (*prompts[0]).clone();
    wrong.pixel_values = prompts[1].pixel_values.clone();
    let rows = [ResponseRow {
        prompt: std::sync::Arc::new(wrong),
        response: &resp,
    }];
    let err = scorer
        .response_logprobs(&rows, false)
        .expect_err("tile mismatch");
    ensure!(err.to_string().contains("prompt 0"), "{err}");
    let mut no_pixels = (*prompts[1]).clone();
    no_pixels.pixel_values = None;
    let rows = [ResponseRow {
        prompt: std::sync::Arc::new(no_pixels),
        response: &resp,
    }];
    let err = scorer
        .response_logprobs(&rows, false)
        .expect_err("no pixels");
    ensure!(err.to_string().contains("prompt 1"), "{err}");
    ensure!(scorer.response_logprobs(&[], false).is_err());
    Ok(())
}

/// Gradients of a weighted sum of batched response log-probs w.r.t. the adapter match central finite
/// differences (the gather of image tokens, the position selection and the fused log-prob op together).
#[test]
fn response_logprob_gradients_match_finite_differences() -> Result<()> {
    let loaded = load(Trainable::default())?;
    let scorer = ResponseScorer::new(loaded.model.clone(), &loaded.store.frozen_var_builder())?;
    let prompts = prompts()?;
    let responses = [
        (0, response(11, 4)),
        (1, response(12, 2)),
        (0, response(13, 3)),
    ];
    let rows = response_rows(&prompts, &responses);
    let weights = Tensor::arange(0f32, 12f32, &Device::Cpu)?
        .affine(0.7, 0.3)?
        .sin()?
        .reshape((3, 4))?;
    let loss = || -> Result<Tensor> {
        Ok((scorer.response_logprobs(&rows, false)?.logprobs * &weights)?.sum_all()?)
    };
    let grads = loss()?.backward()?;
    let h = 5e-3f32;
    let mut worst = 0f32;
    for (name, var) in &loaded.trainable_vars {
        let grad = grads
            .get(var.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient for {name}"))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..grad.len()).collect();
        order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
        for &i in order.iter().take(2) {
            let eval = |delta: f32| -> Result<f32> {
                let mut v = values.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu)?)?;
                Ok(loss()?.to_scalar::<f32>()?)
            };
            let numeric = (eval(h)? - eval(-h)?) / (2.0 * h);
            eval(0.0)?;
            let error = (numeric - grad[i]).abs();
            worst = worst.max(error);
            // The loss is ~40 in f32: rounding ~5e-6, over 2h = 1e-2 gives ~5e-4 of noise.
            ensure!(
                error <= 2e-3 + 1e-2 * grad[i].abs(),
                "{name}[{i}]: analytic {} vs numeric {numeric}",
                grad[i]
            );
        }
    }
    eprintln!("finite differences: worst |numeric - analytic| = {worst:e}");
    Ok(())
}

/// Responses that share prompts (interleaved, of different lengths, one of a single token) scored through the
/// prefix-shared forward give the log-probs, entropies and gradients (vision tower, adapter, LLM, LM head) of
/// every row run on its own.
#[test]
fn prefix_shared_logprobs_and_gradients_equal_row_by_row() -> Result<()> {
    let all = Trainable {
        vision: true,
        adapter: true,
        llm: true,
    };
    let loaded = load(all)?;
    // The builder hands out the trainable Vars, so the LM head is one.
    let vb = loaded.store.var_builder(move |name| all.contains(name));
    let shared = ResponseScorer::new(loaded.model.clone(), &vb)?;
    let plain = shared.clone().without_prefix_sharing();
    let prompts = prompts()?;
    let responses = [
        (0, response(21, 6)),
        (2, response(22, 3)),
        (0, response(23, 1)),
        (1, response(24, 5)),
        (2, response(25, 7)),
        (0, response(26, 4)),
    ];
    let rows = response_rows(&prompts, &responses);
    let weights = Tensor::arange(0f32, 42f32, &Device::Cpu)?
        .affine(0.37, 0.1)?
        .cos()?
        .reshape((6, 7))?;
    let a = shared.response_logprobs(&rows, true)?;
    let b = plain.response_logprobs(&rows, true)?;
    ensure!(max_diff(&a.mask, &b.mask)? == 0.0);
    let logprob_diff = max_diff(&a.logprobs, &b.logprobs)?;
    let entropy_diff = max_diff(
        a.entropy.as_ref().expect("entropy"),
        b.entropy.as_ref().expect("entropy"),
    )?;
    ensure!(
        logprob_diff < 1e-5 && entropy_diff < 1e-5,
        "log-probs differ by {logprob_diff}, entropies by {entropy_diff}"
    );
    let grads_a = (a.logprobs * &weights)?.sum_all()?.backward()?;
    let grads_b = (b.logprobs * &weights)?.sum_all()?.backward()?;
    let worst = same_gradients(&loaded.trainable_vars, &grads_a, &grads_b)?;
    eprintln!(
        "shared vs row by row: log-probs {logprob_diff:e}, entropies {entropy_diff:e}, gradients {worst:e} relative"
    );
    Ok(())
}
