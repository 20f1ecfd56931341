//! Token log-probs: fused CustomOp against the composed reference and finite differences.

mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use common::{assert_close, assert_same_gradients, finite_difference_check, rng, uniform};
use r1v2_kernels::{reference, token_logprobs, token_logprobs_as};
use rand::Rng;

/// Random logits (lead..., V) and u32 targets (lead...).
fn inputs(seed: u64, lead: &[usize], vocab: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
    let mut rng = rng(seed);
    let shape: Vec<usize> = lead.iter().copied().chain([vocab]).collect();
    let logits = uniform(&mut rng, &shape, -5.0, 5.0, dtype)?;
    let count: usize = lead.iter().product();
    let targets: Vec<u32> = (0..count).map(|_| rng.gen_range(0..vocab as u32)).collect();
    Ok((logits, Tensor::from_vec(targets, lead, &Device::Cpu)?))
}

#[test]
fn token_logprobs_forward_matches_reference() -> Result<()> {
    for (k, (lead, vocab)) in [(&[4usize][..], 7usize), (&[2, 3], 50), (&[3, 2], 1000)]
        .into_iter()
        .enumerate()
    {
        let (logits, targets) = inputs(300 + k as u64, lead, vocab, DType::F32)?;
        let got = token_logprobs(&logits, &targets)?;
        ensure!(
            got.dtype() == DType::F32 && got.dims() == lead,
            "f32 output of the lead shape"
        );
        assert_close(
            &got,
            &reference::token_logprobs(&logits, &targets)?,
            1e-5,
            "token_logprobs f32",
        )?;
        // i64 targets give the same result.
        let got = token_logprobs(&logits, &targets.to_dtype(DType::I64)?)?;
        assert_close(
            &got,
            &reference::token_logprobs(&logits, &targets)?,
            1e-5,
            "token_logprobs i64",
        )?;
        // bf16 logits: same values as the f32 reference sees after rounding.
        let logits = logits.to_dtype(DType::BF16)?;
        let want = reference::token_logprobs(&logits.to_dtype(DType::F32)?, &targets)?;
        assert_close(
            &token_logprobs(&logits, &targets)?,
            &want,
            1e-5,
            "token_logprobs bf16",
        )?;
    }
    // Strided logits: (V, N) buffer transposed to (N, V).
    let (logits, _) = inputs(310, &[40], 6, DType::F32)?;
    let logits = logits.t()?;
    let targets = Tensor::new(&[0u32, 5, 39, 17, 2, 2], &Device::Cpu)?;
    ensure!(
        !logits.is_contiguous(),
        "the test input should be a strided view"
    );
    let want = reference::token_logprobs(&logits.contiguous()?, &targets)?;
    assert_close(
        &token_logprobs(&logits, &targets)?,
        &want,
        1e-5,
        "token_logprobs strided",
    )
}

#[test]
fn token_logprobs_gradient_matches_finite_differences() -> Result<()> {
    let (logits, targets) = inputs(320, &[2, 3], 9, DType::F64)?;
    let f = |t: &[Tensor]| token_logprobs_as(&t[0], &t[1], DType::F64);
    finite_difference_check(f, &[logits.clone(), targets.clone()], &[0], 321)?;
    // Strided logits: (B, V, T) buffer seen as (B, T, V).
    let strided = logits.transpose(1, 2)?.contiguous()?;
    let f = |t: &[Tensor]| token_logprobs_as(&t[0].transpose(1, 2)?, &t[1], DType::F64);
    finite_difference_check(f, &[strided, targets], &[0], 322)
}

#[test]
fn token_logprobs_gradient_matches_reference() -> Result<()> {
    for (k, dtype) in [DType::F32, DType::BF16].into_iter().enumerate() {
        let (logits, targets) = inputs(330 + k as u64, &[3, 4], 300, dtype)?;
        let fused = |t: &[Tensor]| token_logprobs(&t[0], &t[1]);
        let composed = |t: &[Tensor]| reference::token_logprobs(&t[0], &t[1]);
        // bf16: both produce the gradient in bf16, rounded from slightly different f32 values.
        let tol = if dtype == DType::BF16 { 4e-3 } else { 1e-6 };
        assert_same_gradients(fused, composed, &[logits, targets], &[0], tol)?;
    }
    Ok(())
}

#[test]
fn token_logprobs_rejects_bad_targets() -> Result<()> {
    let (logits, _) = inputs(340, &[2], 5, DType::F32)?;
    let out_of_range = Tensor::new(&[1u32, 5], &Device::Cpu)?;
    let err = token_logprobs(&logits, &out_of_range)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    ensure!(
        err.contains("target 5") && err.contains("0..5"),
        "unexpected error: {err}"
    );
    let negative = Tensor::new(&[1i64, -1], &Device::Cpu)?;
    ensure!(
        token_logprobs(&logits, &negative).is_err(),
        "a negative target must be refused"
    );
    let wrong_shape = Tensor::new(&[1u32, 2, 3], &Device::Cpu)?;
    let err = token_logprobs(&logits, &wrong_shape)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    ensure!(err.contains("targets shape"), "unexpected error: {err}");
    Ok(())
}
