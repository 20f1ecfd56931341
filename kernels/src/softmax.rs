//! Softmax over the last dimension as a CustomOp with a fused backward.
//!
//! Forward: per row, `y = exp(x - max) / sum(exp(x - max))`, computed in f32 (f64 for f64 inputs).
//! Backward: from the saved output only, `grad_x = y * (grad_y - sum(grad_y * y))` in one pass per row.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use num_traits::{Float, Zero};
use rayon::prelude::*;

use crate::cpu::{contiguous, float_dispatch, Elem};

/// Numerically stable softmax over the last dimension. x (..., N) -> (..., N).
/// Matches [`crate::reference::softmax_last_dim`].
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    // CUDA: candle's ops composed (they have a backward) until a fused kernel exists (`crate::cuda`).
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return crate::reference::softmax_last_dim(x);
    }
    match x.dims().last() {
        Some(&n) if n > 0 => x.apply_op1(SoftmaxLastDim),
        _ => bail!(
            "softmax_last_dim: x must have a non-empty last dimension, got shape {:?}",
            x.shape()
        ),
    }
}

/// The forward CustomOp: x -> y.
struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "r1v2-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!(
            storage.dtype(),
            "softmax_last_dim",
            softmax_fwd(storage, layout)
        )?;
        Ok((out, layout.shape().clone()))
    }

    // cuda_fwd: a later issue (see `crate::cuda`); the trait's default errors "no cuda implementation".

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(grad_y, &SoftmaxBwd)?))
    }
}

/// The backward kernel: (y, grad_y) -> grad_x.
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "r1v2-softmax-last-dim-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!(
            s1.dtype(),
            "softmax_last_dim backward",
            softmax_bwd(s1, l1, s2, l2)
        )?;
        Ok((out, l1.shape().clone()))
    }
}

/// Row length of a layout whose last dimension was checked non-empty by the public function.
fn row_len(layout: &Layout) -> Result<usize> {
    match layout.dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => bail!(
            "softmax_last_dim: empty last dimension in {:?}",
            layout.shape()
        ),
    }
}

fn softmax_fwd<T: Elem>(storage: &CpuStorage, layout: &Layout) -> Result<CpuStorage> {
    let x = contiguous::<T>(storage, layout)?;
    let n = row_len(layout)?;
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
        let max = x
            .iter()
            .map(|&v| v.load())
            .fold(T::A::neg_infinity(), T::A::max);
        let mut sum = T::A::zero();
        let exps: Vec<T::A> = x
            .iter()
            .map(|&v| {
                let e = (v.load() - max).exp();
                sum += e;
                e
            })
            .collect();
        let inv = sum.recip();
        for (y, e) in y.iter_mut().zip(exps) {
            *y = T::store(e * inv);
        }
    });
    Ok(T::to_cpu_storage_owned(y))
}

fn softmax_bwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<CpuStorage> {
    let (y, grad_y) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
    let n = row_len(l1)?;
    let mut grad_x = vec![T::zero(); y.len()];
    grad_x
        .par_chunks_mut(n)
        .zip(y.par_chunks(n).zip(grad_y.par_chunks(n)))
        .for_each(|(grad_x, (y, grad_y))| {
            let dot = y
                .iter()
                .zip(grad_y)
                .map(|(&y, &g)| y.load() * g.load())
                .sum::<T::A>();
            for ((out, &y), &g) in grad_x.iter_mut().zip(y).zip(grad_y) {
                *out = T::store(y.load() * (g.load() - dot));
            }
        });
    Ok(T::to_cpu_storage_owned(grad_x))
}
