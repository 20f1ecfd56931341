//! Softmax over the last dimension: fused CustomOp against the composed reference and finite differences.

mod common;

use anyhow::{ensure, Result};
use candle_core::DType;
use common::{assert_close, assert_same_gradients, finite_difference_check, rng, uniform};
use r1v2_kernels::{reference, softmax_last_dim};

#[test]
fn softmax_forward_matches_reference() -> Result<()> {
    let mut rng = rng(100);
    for shape in [&[1usize, 5][..], &[4, 3, 17], &[9, 300]] {
        let x = uniform(&mut rng, shape, -6.0, 6.0, DType::F32)?;
        assert_close(
            &softmax_last_dim(&x)?,
            &reference::softmax_last_dim(&x)?,
            1e-6,
            "softmax f32",
        )?;
        let x = x.to_dtype(DType::F64)?;
        assert_close(
            &softmax_last_dim(&x)?,
            &reference::softmax_last_dim(&x)?,
            1e-14,
            "softmax f64",
        )?;
    }
    // Large logits: the max subtraction keeps it finite.
    let x = (uniform(&mut rng, &[3, 10], -1.0, 1.0, DType::F32)? * 1e4)?;
    assert_close(
        &softmax_last_dim(&x)?,
        &reference::softmax_last_dim(&x)?,
        1e-6,
        "softmax large",
    )?;
    // Strided: softmax over the rows of a transposed buffer.
    let x = uniform(&mut rng, &[12, 5], -3.0, 3.0, DType::F32)?.t()?;
    ensure!(
        !x.is_contiguous(),
        "the test input should be a strided view"
    );
    let want = reference::softmax_last_dim(&x.contiguous()?)?;
    assert_close(&softmax_last_dim(&x)?, &want, 1e-6, "softmax strided")?;
    let x = uniform(&mut rng, &[6, 50], -3.0, 3.0, DType::BF16)?;
    let got = softmax_last_dim(&x)?;
    ensure!(got.dtype() == DType::BF16, "bf16 in, bf16 out");
    assert_close(
        &got,
        &reference::softmax_last_dim(&x.to_dtype(DType::F32)?)?,
        4e-3,
        "softmax bf16",
    )
}

#[test]
fn softmax_gradient_matches_finite_differences() -> Result<()> {
    let x = uniform(&mut rng(110), &[2, 3, 7], -3.0, 3.0, DType::F64)?;
    finite_difference_check(
        |t| softmax_last_dim(&t[0]),
        std::slice::from_ref(&x),
        &[0],
        111,
    )?;
    // Through a strided view: softmax over dim 1 of the (2, 7, 3) buffer.
    let xt = x.transpose(1, 2)?.contiguous()?;
    finite_difference_check(
        |t| softmax_last_dim(&t[0].transpose(1, 2)?),
        &[xt],
        &[0],
        112,
    )
}

#[test]
fn softmax_gradient_matches_reference() -> Result<()> {
    let mut rng = rng(120);
    for shape in [&[3usize, 8][..], &[2, 4, 65]] {
        let x = uniform(&mut rng, shape, -4.0, 4.0, DType::F32)?;
        let fused = |t: &[candle_core::Tensor]| softmax_last_dim(&t[0]);
        let composed = |t: &[candle_core::Tensor]| reference::softmax_last_dim(&t[0]);
        assert_same_gradients(fused, composed, &[x], &[0], 1e-6)?;
    }
    Ok(())
}
