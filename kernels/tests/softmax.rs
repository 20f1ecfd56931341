//! Softmax over the last dimension: fused CustomOp against the composed reference and finite differences.

mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use common::{
    assert_close, assert_same_gradients, finite_difference_check, gradients, rng, uniform,
};
use r1v2_kernels::{reference, scaled_masked_softmax, softmax_last_dim};

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

/// The composition `scaled_masked_softmax` replaces in the Qwen2 attention.
fn composed_scaled_masked(x: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    softmax_last_dim(&(x * scale)?.broadcast_add(mask)?)
}

/// A (B, 1, 1, T, S) additive causal mask with some padded keys, `fill` where masked, in `dtype`.
fn causal_mask(b: usize, t: usize, s: usize, fill: f32, dtype: DType) -> Result<Tensor> {
    let values: Vec<f32> = (0..b * t * s)
        .map(|i| {
            let (row, key) = ((i / s) % t, i % s);
            let padded = i / (t * s) == 1 && key == 0;
            if key > row + (s - t) || padded {
                fill
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(values, (b, 1, 1, t, s), &candle_core::Device::Cpu)?.to_dtype(dtype)?)
}

fn bits(t: &Tensor) -> Result<Vec<u64>> {
    Ok(t.to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .iter()
        .map(|v| if *v == 0.0 { 0 } else { v.to_bits() })
        .collect())
}

#[test]
fn scaled_masked_softmax_has_the_bits_of_the_composition() -> Result<()> {
    let mut rng = rng(130);
    // The model's masks hold -inf (kv_cache); f32::MIN is the other usual fill. Either way a masked key's
    // exp is skipped, which must not change a bit.
    for (dtype, fill) in [
        (DType::F32, f32::MIN),
        (DType::F64, f32::MIN),
        (DType::F32, f32::NEG_INFINITY),
        (DType::F64, f32::NEG_INFINITY),
    ] {
        let (b, h, g, t, s) = (2, 2, 3, 5, 7);
        let x = uniform(&mut rng, &[b, h, g, t, s], -9.0, 9.0, dtype)?;
        let mask = causal_mask(b, t, s, fill, dtype)?;
        let scale = 1.0 / 8f64.sqrt();
        let fused = scaled_masked_softmax(&x, &mask, scale)?;
        ensure!(
            bits(&fused)? == bits(&composed_scaled_masked(&x, &mask, scale)?)?,
            "{dtype:?} (mask {fill}) forward differs from the composition"
        );
        let got = gradients(
            |t| scaled_masked_softmax(&t[0], &mask, scale),
            std::slice::from_ref(&x),
            &[0],
            5,
        )?;
        let want = gradients(
            |t| composed_scaled_masked(&t[0], &mask, scale),
            &[x],
            &[0],
            5,
        )?;
        ensure!(
            bits(&got[0])? == bits(&want[0])?,
            "{dtype:?} (mask {fill}) gradient differs from the composition"
        );
    }
    Ok(())
}

#[test]
fn scaled_masked_softmax_gradient_matches_finite_differences() -> Result<()> {
    let x = uniform(&mut rng(140), &[2, 1, 2, 3, 4], -3.0, 3.0, DType::F64)?;
    let mask = causal_mask(2, 3, 4, f32::MIN, DType::F64)?;
    finite_difference_check(
        |t| scaled_masked_softmax(&t[0], &mask, 0.7),
        std::slice::from_ref(&x),
        &[0],
        141,
    )
}
