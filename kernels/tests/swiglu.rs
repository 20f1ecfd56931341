//! SwiGLU (r1v2's SiLU op with a backward, then candle's mul; fused where no gradient flows): finite-difference
//! gradient check, the fused and graded paths' bits, and candle's silu as a reference.

mod common;

use anyhow::Result;
use candle_core::{DType, Tensor};
use common::{finite_difference_check, rng, uniform};
use r1v2_kernels::{silu, swiglu};

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
fn silu_gradient_matches_finite_differences() -> Result<()> {
    let mut rng = rng(405);
    let x = uniform(&mut rng, &[4, 9], -6.0, 6.0, DType::F64)?;
    finite_difference_check(|t: &[Tensor]| silu(&t[0]), &[x], &[0], 406)
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
    // The graded path (a variable gate): r1v2's SiLU op, then candle's mul.
    let tracked = candle_core::Var::from_tensor(&gate)?;
    anyhow::ensure!(
        values(&fused)? == values(&swiglu(tracked.as_tensor(), &up)?)?,
        "the fused pass differs from the graded path"
    );
    // Both are candle's silu(gate) * up up to exp's rounding.
    let candle = (gate.silu()? * &up)?;
    for (i, (got, want)) in values(&fused)?.iter().zip(values(&candle)?).enumerate() {
        anyhow::ensure!(
            (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
            "element {i}: {got} vs candle's {want}"
        );
    }
    // A non-contiguous gate is read correctly too.
    let gate_t = uniform(&mut rng, &[37, 4], -8.0, 8.0, DType::F32)?.t()?;
    anyhow::ensure!(
        values(&swiglu(&gate_t, &up)?)? == values(&swiglu(&gate_t.contiguous()?, &up)?)?,
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
fn f32_gradient_matches_candles_silu() -> Result<()> {
    let mut rng = rng(440);
    let gate =
        candle_core::Var::from_tensor(&uniform(&mut rng, &[3, 45], -12.0, 12.0, DType::F32)?)?;
    let up = uniform(&mut rng, &[3, 45], -1.5, 1.5, DType::F32)?;
    let ours = swiglu(gate.as_tensor(), &up)?.sum_all()?.backward()?;
    let candle = (gate.as_tensor().silu()? * &up)?.sum_all()?.backward()?;
    let grad = |g: &candle_core::backprop::GradStore| -> Result<Vec<f32>> {
        values(
            g.get(gate.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("no gradient"))?,
        )
    };
    for (i, (got, want)) in grad(&ours)?.iter().zip(grad(&candle)?).enumerate() {
        anyhow::ensure!(
            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "element {i}: gradient {got} vs candle's {want}"
        );
    }
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
