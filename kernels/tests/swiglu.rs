//! SwiGLU (composed: candle's silu and mul have a backward): finite-difference gradient check.

mod common;

use anyhow::Result;
use candle_core::{DType, Tensor};
use common::{finite_difference_check, rng, uniform};
use r1v2_kernels::swiglu;

#[test]
fn swiglu_gradient_matches_finite_differences() -> Result<()> {
    let mut rng = rng(400);
    let gate = uniform(&mut rng, &[3, 10], -4.0, 4.0, DType::F64)?;
    let up = uniform(&mut rng, &[3, 10], -2.0, 2.0, DType::F64)?;
    finite_difference_check(
        |t: &[Tensor]| swiglu(&t[0], &t[1]),
        &[gate, up],
        &[0, 1],
        401,
    )
}

#[test]
fn swiglu_rejects_mismatched_shapes() -> Result<()> {
    let mut rng = rng(410);
    let gate = uniform(&mut rng, &[3, 10], -1.0, 1.0, DType::F32)?;
    let up = uniform(&mut rng, &[3, 9], -1.0, 1.0, DType::F32)?;
    anyhow::ensure!(
        swiglu(&gate, &up).is_err(),
        "mismatched shapes must be refused"
    );
    Ok(())
}

/// Largest `|a - b| / max(|b|, 1e-30)` over two equal-shape tensors.
fn max_relative(a: &Tensor, b: &Tensor) -> Result<f32> {
    let (a, b) = (
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?,
    );
    anyhow::ensure!(a.len() == b.len(), "lengths {} and {}", a.len(), b.len());
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-30))
        .fold(0.0, f32::max))
}

#[test]
fn untracked_f32_takes_the_fused_pass() -> Result<()> {
    let mut rng = rng(420);
    // Past both ends of the exp's range (|g| > 88) too.
    let gate = uniform(&mut rng, &[4, 37], -100.0, 100.0, DType::F32)?;
    let up = uniform(&mut rng, &[4, 37], -2.0, 2.0, DType::F32)?;
    let fused = swiglu(&gate, &up)?;
    let composed = (gate.silu()? * &up)?;
    let err = max_relative(&fused, &composed)?;
    anyhow::ensure!(
        err < 4e-6,
        "fused pass vs silu(gate) * up: relative error {err}"
    );
    // A non-contiguous gate is read correctly too.
    let gate_t = uniform(&mut rng, &[37, 4], -8.0, 8.0, DType::F32)?.t()?;
    let err = max_relative(&swiglu(&gate_t, &up)?, &(gate_t.silu()? * &up)?)?;
    anyhow::ensure!(err < 4e-6, "non-contiguous gate: relative error {err}");
    // A row's result does not depend on its batch.
    let alone = swiglu(&gate.narrow(0, 2, 1)?, &up.narrow(0, 2, 1)?)?;
    anyhow::ensure!(
        alone.flatten_all()?.to_vec1::<f32>()?
            == fused.narrow(0, 2, 1)?.flatten_all()?.to_vec1::<f32>()?,
        "row 2 alone differs from row 2 in the batch"
    );
    Ok(())
}

#[test]
fn a_variable_input_keeps_the_gradient() -> Result<()> {
    let mut rng = rng(430);
    let gate = candle_core::Var::from_tensor(&uniform(&mut rng, &[2, 5], -3.0, 3.0, DType::F32)?)?;
    let up = uniform(&mut rng, &[2, 5], -1.0, 1.0, DType::F32)?;
    let grads = swiglu(gate.as_tensor(), &up)?.sum_all()?.backward()?;
    let grad = grads
        .get(gate.as_tensor())
        .ok_or_else(|| anyhow::anyhow!("no gradient reached the gate"))?;
    anyhow::ensure!(
        grad.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
        "zero gradient"
    );
    Ok(())
}
