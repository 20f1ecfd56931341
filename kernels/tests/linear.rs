//! `linear` (x @ W^T with the weight's gradient in its own layout): finite-difference gradient check, the
//! forward's bits and both gradients against candle's `x.matmul(&w.t())`, strided inputs, bad shapes.

mod common;

use anyhow::Result;
use candle_core::{DType, Tensor};
use common::{assert_same_gradients, finite_difference_check, rng, uniform};
use r1v2_kernels::linear;

fn composed(t: &[Tensor]) -> candle_core::Result<Tensor> {
    r1v2_kernels::reference::linear(&t[0], &t[1])
}

#[test]
fn linear_gradient_matches_finite_differences() -> Result<()> {
    let mut rng = rng(700);
    let x = uniform(&mut rng, &[5, 7], -2.0, 2.0, DType::F64)?;
    let w = uniform(&mut rng, &[3, 7], -1.0, 1.0, DType::F64)?;
    finite_difference_check(|t: &[Tensor]| linear(&t[0], &t[1]), &[x, w], &[0, 1], 701)
}

#[test]
fn linear_forward_has_the_bits_of_the_composition_and_its_gradients() -> Result<()> {
    let mut rng = rng(710);
    // Sizes past the matmul's blocking, so the weight gradient sums many rows.
    let x = uniform(&mut rng, &[300, 96], -1.0, 1.0, DType::F32)?;
    let w = uniform(&mut rng, &[130, 96], -0.5, 0.5, DType::F32)?;
    let ours = linear(&x, &w)?.flatten_all()?.to_vec1::<f32>()?;
    let theirs = composed(&[x.clone(), w.clone()])?
        .flatten_all()?
        .to_vec1::<f32>()?;
    anyhow::ensure!(
        ours.iter()
            .zip(&theirs)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the forward differs from x.matmul(&w.t())"
    );
    assert_same_gradients(
        |t: &[Tensor]| linear(&t[0], &t[1]),
        composed,
        &[x, w],
        &[0, 1],
        1e-4,
    )
}

#[test]
fn linear_reads_strided_inputs() -> Result<()> {
    let mut rng = rng(720);
    // x as the transpose of a (K, M) tensor, w as a narrowed slice of a wider one.
    let xt = uniform(&mut rng, &[7, 5], -1.0, 1.0, DType::F64)?;
    let wide = uniform(&mut rng, &[3, 11], -1.0, 1.0, DType::F64)?;
    let (x, w) = (xt.t()?, wide.narrow(1, 2, 7)?);
    common::assert_close(
        &linear(&x, &w)?,
        &composed(&[x.clone(), w.clone()])?,
        1e-12,
        "strided inputs",
    )?;
    finite_difference_check(
        |t: &[Tensor]| linear(&t[0].t()?, &t[1].narrow(1, 2, 7)?),
        &[xt, wide],
        &[0, 1],
        721,
    )
}

#[test]
fn linear_rejects_mismatched_inner_dimensions() -> Result<()> {
    let x = Tensor::zeros((4, 6), DType::F32, &candle_core::Device::Cpu)?;
    let w = Tensor::zeros((3, 5), DType::F32, &candle_core::Device::Cpu)?;
    let err = linear(&x, &w).expect_err("K = 6 against K = 5").to_string();
    anyhow::ensure!(err.contains("inner dimension"), "unexpected error: {err}");
    Ok(())
}

#[test]
fn a_frozen_weight_gets_no_gradient() -> Result<()> {
    let mut rng = rng(730);
    let x = candle_core::Var::from_tensor(&uniform(&mut rng, &[4, 6], -1.0, 1.0, DType::F32)?)?;
    let w = uniform(&mut rng, &[3, 6], -1.0, 1.0, DType::F32)?;
    let grads = linear(x.as_tensor(), &w)?.sum_all()?.backward()?;
    anyhow::ensure!(grads.get(&w).is_none(), "a frozen weight got a gradient");
    let gx = grads
        .get(x.as_tensor())
        .ok_or_else(|| anyhow::anyhow!("no gradient for the tracked input"))?;
    // d sum(x W^T) / dx = each row the column sums of W.
    common::assert_close(
        gx,
        &w.sum_keepdim(0)?.broadcast_as((4, 6))?,
        1e-6,
        "input gradient",
    )
}
