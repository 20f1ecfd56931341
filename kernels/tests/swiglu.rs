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

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

#[test]
fn untracked_f32_takes_the_fused_pass_with_the_same_bits() -> Result<()> {
    let mut rng = rng(420);
    // Past both ends of exp's f32 range (|g| > 88) too.
    let gate = uniform(&mut rng, &[4, 37], -100.0, 100.0, DType::F32)?;
    let up = uniform(&mut rng, &[4, 37], -2.0, 2.0, DType::F32)?;
    let fused = swiglu(&gate, &up)?;
    anyhow::ensure!(
        values(&fused)? == values(&(gate.silu()? * &up)?)?,
        "the fused pass differs from silu(gate) * up"
    );
    // A non-contiguous gate is read correctly too.
    let gate_t = uniform(&mut rng, &[37, 4], -8.0, 8.0, DType::F32)?.t()?;
    anyhow::ensure!(
        values(&swiglu(&gate_t, &up)?)? == values(&(gate_t.silu()? * &up)?)?,
        "non-contiguous gate"
    );
    // A row's result does not depend on its batch.
    let alone = swiglu(&gate.narrow(0, 2, 1)?, &up.narrow(0, 2, 1)?)?;
    anyhow::ensure!(
        values(&alone)? == values(&fused.narrow(0, 2, 1)?)?,
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
