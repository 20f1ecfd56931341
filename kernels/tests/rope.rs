//! Rotary embedding: fused CustomOp against the composed reference and finite differences.

mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use common::{assert_close, assert_same_gradients, finite_difference_check, rng, uniform};
use r1v2_kernels::{reference, rope};

/// x (B, H, T, D) and cos/sin tables of shape `table` ((T, D/2) or (B, T, D/2)) with real angles.
fn inputs(seed: u64, x_shape: [usize; 4], table: &[usize], dtype: DType) -> Result<[Tensor; 3]> {
    let mut rng = rng(seed);
    let x = uniform(&mut rng, &x_shape, -2.0, 2.0, dtype)?;
    let angles = uniform(&mut rng, table, -3.0, 3.0, DType::F64)?;
    Ok([
        x,
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ])
}

#[test]
fn rope_forward_matches_reference() -> Result<()> {
    for (k, (x_shape, table)) in [
        ([2, 3, 5, 8], &[5usize, 4][..]),
        ([2, 2, 6, 16], &[2, 6, 8]),
        ([1, 4, 33, 64], &[33, 32]),
    ]
    .into_iter()
    .enumerate()
    {
        let [x, cos, sin] = inputs(200 + k as u64, x_shape, table, DType::F32)?;
        assert_close(
            &rope(&x, &cos, &sin)?,
            &reference::rope(&x, &cos, &sin)?,
            1e-6,
            "rope f32",
        )?;
        let [x, cos, sin] = inputs(200 + k as u64, x_shape, table, DType::BF16)?;
        let got = rope(&x, &cos, &sin)?;
        ensure!(got.dtype() == DType::BF16, "bf16 in, bf16 out");
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let want = reference::rope(&f32(&x)?, &f32(&cos)?, &f32(&sin)?)?;
        assert_close(&got, &want, 2e-2, "rope bf16")?;
    }
    // The attention layout: q computed as (B, T, H, D) and transposed to (B, H, T, D), not contiguous.
    let [x, cos, sin] = inputs(210, [2, 7, 3, 8], &[7, 4], DType::F32)?;
    let x = x.transpose(1, 2)?;
    ensure!(
        !x.is_contiguous(),
        "the test input should be a strided view"
    );
    let want = reference::rope(&x.contiguous()?, &cos, &sin)?;
    assert_close(&rope(&x, &cos, &sin)?, &want, 1e-6, "rope strided")
}

#[test]
fn rope_gradient_matches_finite_differences() -> Result<()> {
    // All three inputs, with shared (T, D/2) and per-batch (B, T, D/2) tables.
    for (seed, table) in [(220u64, &[4usize, 3][..]), (221, &[2, 4, 3])] {
        let [x, cos, sin] = inputs(seed, [2, 2, 4, 6], table, DType::F64)?;
        finite_difference_check(
            |t| rope(&t[0], &t[1], &t[2]),
            &[x, cos, sin],
            &[0, 1, 2],
            seed,
        )?;
    }
    // x through a strided (B, T, H, D) -> (B, H, T, D) view.
    let [x, cos, sin] = inputs(222, [2, 4, 2, 6], &[4, 3], DType::F64)?;
    finite_difference_check(
        |t| rope(&t[0].transpose(1, 2)?, &t[1], &t[2]),
        &[x, cos, sin],
        &[0],
        223,
    )
}

#[test]
fn rope_gradient_matches_reference() -> Result<()> {
    for (seed, table) in [(230u64, &[5usize, 8][..]), (231, &[2, 5, 8])] {
        let [x, cos, sin] = inputs(seed, [2, 3, 5, 16], table, DType::F32)?;
        let fused = |t: &[Tensor]| rope(&t[0], &t[1], &t[2]);
        let composed = |t: &[Tensor]| reference::rope(&t[0], &t[1], &t[2]);
        assert_same_gradients(
            fused,
            composed,
            &[x.clone(), cos.clone(), sin.clone()],
            &[0, 1, 2],
            1e-5,
        )?;
        assert_same_gradients(fused, composed, &[x, cos, sin], &[0], 1e-5)?;
    }
    Ok(())
}

#[test]
fn rope_rejects_bad_shapes() -> Result<()> {
    let [x, cos, sin] = inputs(240, [1, 2, 4, 6], &[4, 3], DType::F32)?;
    let err = rope(&x, &cos.narrow(0, 0, 3)?, &sin)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    ensure!(
        err.contains("rope") && err.contains("cos"),
        "unexpected error: {err}"
    );
    let odd = x.narrow(3, 0, 5)?;
    ensure!(
        rope(&odd, &cos, &sin).is_err(),
        "an odd head dimension must be refused"
    );
    Ok(())
}
