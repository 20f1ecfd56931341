//! Shared helpers of the kernel tests: seeded random tensors, closeness checks, a finite-difference
//! gradient check and a comparison of gradients with the composed reference.

#![allow(dead_code)] // each test binary uses its own subset of the helpers.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A seeded generator, so that every run draws the same inputs.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A tensor of uniform values in [lo, hi), f64 on the CPU, cast to `dtype`.
pub fn uniform(
    rng: &mut StdRng,
    shape: &[usize],
    lo: f64,
    hi: f64,
    dtype: DType,
) -> Result<Tensor> {
    let count: usize = shape.iter().product();
    let values: Vec<f64> = (0..count).map(|_| rng.gen_range(lo..hi)).collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// Largest absolute difference between two tensors of the same shape, compared in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    ensure!(
        a.shape() == b.shape(),
        "shapes differ: {:?} vs {:?}",
        a.shape(),
        b.shape()
    );
    let diff = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
    Ok(diff.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// Fails with `what` unless `a` and `b` agree within `tol` (absolute), and `a` is finite.
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) -> Result<()> {
    let diff = max_abs_diff(a, b)?;
    ensure!(
        diff.is_finite() && diff <= tol,
        "{what}: max |a - b| = {diff:e} > {tol:e}"
    );
    Ok(())
}

/// `sum(f(inputs) * weights)` for fixed random `weights`: a scalar loss whose gradient reaches every
/// output element with a different factor.
fn weighted_loss(out: &Tensor, weights: &Tensor) -> Result<Tensor> {
    Ok((out.to_dtype(DType::F64)? * weights)?.sum_all()?)
}

/// Central finite-difference check, in f64, of the gradient of `sum(f(inputs) * w)` with respect to
/// every input listed in `check` (indices into `inputs`). `inputs` must be f64 except the ones not checked.
pub fn finite_difference_check(
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    check: &[usize],
    seed: u64,
) -> Result<()> {
    let vars: Vec<Option<Var>> = (0..inputs.len())
        .map(|i| {
            check
                .contains(&i)
                .then(|| Var::from_tensor(&inputs[i]))
                .transpose()
        })
        .collect::<candle_core::Result<_>>()?;
    let tracked: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let out = f(&tracked)?;
    let weights = uniform(&mut rng(seed), out.dims(), -1.0, 1.0, DType::F64)?;
    let grads = weighted_loss(&out, &weights)?.backward()?;
    let step = 1e-5;
    for &i in check {
        ensure!(
            inputs[i].dtype() == DType::F64,
            "input {i} must be f64 for the gradient check"
        );
        let var = vars[i]
            .as_ref()
            .expect("every checked input has a Var (built above)");
        let analytic = grads
            .get(var)
            .ok_or_else(|| anyhow::anyhow!("no gradient for input {i}"))?;
        let base: Vec<f64> = inputs[i].flatten_all()?.to_vec1()?;
        let mut numeric = Vec::with_capacity(base.len());
        for k in 0..base.len() {
            let loss_at = |delta: f64| -> Result<f64> {
                let mut moved = base.clone();
                moved[k] += delta;
                let mut args = inputs.to_vec();
                args[i] = Tensor::from_vec(moved, inputs[i].shape(), &Device::Cpu)?;
                Ok(weighted_loss(&f(&args)?, &weights)?.to_scalar::<f64>()?)
            };
            numeric.push((loss_at(step)? - loss_at(-step)?) / (2.0 * step));
        }
        let numeric = Tensor::from_vec(numeric, inputs[i].shape(), &Device::Cpu)?;
        let scale = 1.0 + numeric.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert_close(
            analytic,
            &numeric,
            1e-6 * scale,
            &format!("gradient of input {i} vs finite differences"),
        )?;
    }
    Ok(())
}

/// Gradients of `sum(f(inputs) * w)` with respect to the inputs listed in `check`, in order.
pub fn gradients(
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    check: &[usize],
    seed: u64,
) -> Result<Vec<Tensor>> {
    let vars: Vec<Var> = check
        .iter()
        .map(|&i| Var::from_tensor(&inputs[i]))
        .collect::<candle_core::Result<_>>()?;
    let mut tracked = inputs.to_vec();
    for (&i, var) in check.iter().zip(&vars) {
        tracked[i] = var.as_tensor().clone();
    }
    let out = f(&tracked)?;
    let weights = uniform(&mut rng(seed), out.dims(), -1.0, 1.0, DType::F64)?;
    let grads = weighted_loss(&out, &weights)?.backward()?;
    vars.iter()
        .enumerate()
        .map(|(k, var)| {
            grads
                .get(var)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no gradient for input {}", check[k]))
        })
        .collect()
}

/// Checks that the fused op and the reference give the same gradients for the inputs in `check`.
pub fn assert_same_gradients(
    fused: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    check: &[usize],
    tol: f64,
) -> Result<()> {
    let got = gradients(fused, inputs, check, 7)?;
    let want = gradients(reference, inputs, check, 7)?;
    for ((g, w), i) in got.iter().zip(&want).zip(check) {
        assert_close(
            g,
            w,
            tol,
            &format!("gradient of input {i}: fused vs reference"),
        )?;
    }
    Ok(())
}
