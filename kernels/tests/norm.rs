//! RMSNorm and LayerNorm: fused CustomOps against the composed reference and finite differences.

mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use common::{assert_close, assert_same_gradients, finite_difference_check, rng, uniform};
use r1v2_kernels::{layer_norm, reference, rms_norm};

const EPS: f64 = 1e-6;

/// Row-major shapes of x, including a single row, a 3-d input and a row longer than the row block.
const SHAPES: [&[usize]; 3] = [&[3, 8], &[2, 5, 64], &[70, 33]];

/// x, weight and bias for the shape, uniformly random, in `dtype`.
fn inputs(seed: u64, shape: &[usize], dtype: DType) -> Result<[Tensor; 3]> {
    let mut rng = rng(seed);
    let d = shape[shape.len() - 1];
    Ok([
        uniform(&mut rng, shape, -2.0, 2.0, dtype)?,
        uniform(&mut rng, &[d], 0.5, 1.5, dtype)?,
        uniform(&mut rng, &[d], -0.5, 0.5, dtype)?,
    ])
}

/// (N, D) x that is a transposed view of a (D, N) buffer: not contiguous.
fn transposed_x(seed: u64, n: usize, d: usize) -> Result<Tensor> {
    let x = uniform(&mut rng(seed), &[d, n], -2.0, 2.0, DType::F32)?.t()?;
    ensure!(
        !x.is_contiguous(),
        "the test input should be a strided view"
    );
    Ok(x)
}

#[test]
fn rms_norm_forward_matches_reference() -> Result<()> {
    for (k, shape) in SHAPES.iter().enumerate() {
        let [x, w, _] = inputs(k as u64, shape, DType::F32)?;
        assert_close(
            &rms_norm(&x, &w, EPS)?,
            &reference::rms_norm(&x, &w, EPS)?,
            1e-5,
            "rms_norm f32",
        )?;
        let [x, w, _] = inputs(k as u64, shape, DType::F64)?;
        assert_close(
            &rms_norm(&x, &w, EPS)?,
            &reference::rms_norm(&x, &w, EPS)?,
            1e-12,
            "rms_norm f64",
        )?;
    }
    let x = transposed_x(10, 9, 16)?;
    let [_, w, _] = inputs(11, &[9, 16], DType::F32)?;
    let want = reference::rms_norm(&x.contiguous()?, &w, EPS)?;
    assert_close(&rms_norm(&x, &w, EPS)?, &want, 1e-5, "rms_norm strided x")?;
    // bf16 (computed in f32, rounded once) against the f32 reference on the same bf16 values.
    let [x, w, _] = inputs(12, &[6, 40], DType::BF16)?;
    let got = rms_norm(&x, &w, EPS)?;
    ensure!(got.dtype() == DType::BF16, "bf16 in, bf16 out");
    let want = reference::rms_norm(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, EPS)?;
    assert_close(&got, &want, 2e-2, "rms_norm bf16")?;
    let got = rms_norm(&x.to_dtype(DType::F16)?, &w.to_dtype(DType::F16)?, EPS)?;
    assert_close(&got, &want, 5e-3, "rms_norm f16")
}

#[test]
fn layer_norm_forward_matches_reference() -> Result<()> {
    for (k, shape) in SHAPES.iter().enumerate() {
        let [x, w, b] = inputs(20 + k as u64, shape, DType::F32)?;
        let got = layer_norm(&x, &w, Some(&b), EPS)?;
        assert_close(
            &got,
            &reference::layer_norm(&x, &w, Some(&b), EPS)?,
            1e-5,
            "layer_norm f32",
        )?;
        let got = layer_norm(&x, &w, None, EPS)?;
        assert_close(
            &got,
            &reference::layer_norm(&x, &w, None, EPS)?,
            1e-5,
            "layer_norm f32 no bias",
        )?;
    }
    let x = transposed_x(30, 9, 16)?;
    let [_, w, b] = inputs(31, &[9, 16], DType::F32)?;
    let want = reference::layer_norm(&x.contiguous()?, &w, Some(&b), EPS)?;
    assert_close(
        &layer_norm(&x, &w, Some(&b), EPS)?,
        &want,
        1e-5,
        "layer_norm strided x",
    )?;
    let [x, w, b] = inputs(32, &[6, 40], DType::BF16)?;
    let got = layer_norm(&x, &w, Some(&b), EPS)?;
    ensure!(got.dtype() == DType::BF16, "bf16 in, bf16 out");
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let want = reference::layer_norm(&f32(&x)?, &f32(&w)?, Some(&f32(&b)?), EPS)?;
    assert_close(&got, &want, 2e-2, "layer_norm bf16")
}

#[test]
fn rms_norm_gradient_matches_finite_differences() -> Result<()> {
    let [x, w, _] = inputs(40, &[3, 7], DType::F64)?;
    finite_difference_check(
        |t| rms_norm(&t[0], &t[1], EPS),
        &[x.clone(), w.clone()],
        &[0, 1],
        41,
    )?;
    // Through a strided view of x: (7, 3) buffer, transposed.
    let xt = x.t()?.contiguous()?;
    finite_difference_check(|t| rms_norm(&t[0].t()?, &t[1], EPS), &[xt, w], &[0, 1], 42)
}

#[test]
fn layer_norm_gradient_matches_finite_differences() -> Result<()> {
    let [x, w, b] = inputs(50, &[2, 3, 6], DType::F64)?;
    let with_bias = |t: &[Tensor]| layer_norm(&t[0], &t[1], Some(&t[2]), EPS);
    finite_difference_check(with_bias, &[x.clone(), w.clone(), b], &[0, 1, 2], 51)?;
    finite_difference_check(
        |t| layer_norm(&t[0], &t[1], None, EPS),
        &[x, w],
        &[0, 1],
        52,
    )
}

#[test]
fn norm_gradients_match_reference() -> Result<()> {
    for (k, shape) in SHAPES.iter().enumerate() {
        let [x, w, b] = inputs(60 + k as u64, shape, DType::F32)?;
        let rms = |t: &[Tensor]| rms_norm(&t[0], &t[1], EPS);
        let rms_ref = |t: &[Tensor]| reference::rms_norm(&t[0], &t[1], EPS);
        assert_same_gradients(rms, rms_ref, &[x.clone(), w.clone()], &[0, 1], 1e-4)?;
        let ln = |t: &[Tensor]| layer_norm(&t[0], &t[1], Some(&t[2]), EPS);
        let ln_ref = |t: &[Tensor]| reference::layer_norm(&t[0], &t[1], Some(&t[2]), EPS);
        assert_same_gradients(ln, ln_ref, &[x.clone(), w.clone(), b], &[0, 1, 2], 1e-4)?;
        let ln = |t: &[Tensor]| layer_norm(&t[0], &t[1], None, EPS);
        let ln_ref = |t: &[Tensor]| reference::layer_norm(&t[0], &t[1], None, EPS);
        assert_same_gradients(ln, ln_ref, &[x, w], &[0, 1], 1e-4)?;
    }
    // Only x tracked: the weight gets no gradient and x's matches.
    let [x, w, _] = inputs(63, &[4, 12], DType::F32)?;
    let rms = |t: &[Tensor]| rms_norm(&t[0], &t[1], EPS);
    let rms_ref = |t: &[Tensor]| reference::rms_norm(&t[0], &t[1], EPS);
    assert_same_gradients(rms, rms_ref, &[x, w], &[0], 1e-4)
}

#[test]
fn norm_rejects_bad_shapes_and_dtypes() -> Result<()> {
    let [x, w, _] = inputs(70, &[3, 8], DType::F32)?;
    let short = w.narrow(0, 0, 5)?;
    let err = rms_norm(&x, &short, EPS)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    ensure!(
        err.contains("rms_norm") && err.contains("weight"),
        "unexpected error: {err}"
    );
    let err = layer_norm(&x, &w, Some(&w.to_dtype(DType::F64)?), EPS)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    ensure!(
        err.contains("layer_norm") && err.contains("bias"),
        "unexpected error: {err}"
    );
    let ints = x.to_dtype(DType::U32)?;
    ensure!(
        rms_norm(&ints, &w.to_dtype(DType::U32)?, EPS).is_err(),
        "u32 input must be refused"
    );
    Ok(())
}
