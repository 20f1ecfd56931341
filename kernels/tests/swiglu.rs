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
