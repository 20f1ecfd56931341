//! Softmax over the last dimension as a CustomOp with a fused backward.
//!
//! Forward: per row, `y = exp(x - max) / sum(exp(x - max))`, computed in f32 (f64 for f64 inputs). The f32
//! exps are [`crate::vexp`]'s (vectorized, relative error below 2e-7, the same bits on every instruction set)
//! summed in f64 in its fixed order, as [`crate::cached_attention`] weighs its keys; f64 uses libm's `exp`.
//! A masked (`-inf`) entry gets 0, and a NaN entry gets 0 in f32 (vexp's `exp(NaN)`), where f64 gives NaN.
//! Backward: from the saved output only, `grad_x = y * (grad_y - sum(grad_y * y))` in one pass per row.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{contiguous, float_dispatch, Acc, Elem};

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
        let mut row: Vec<T::A> = x.iter().map(|&v| v.load()).collect();
        T::A::softmax_in_place(&mut row);
        for (y, e) in y.iter_mut().zip(row) {
            *y = T::store(e);
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

/// Attention's `softmax(x * scale + mask)` over the last dimension in one pass, with a backward: the
/// composition `softmax_last_dim((x * scale).broadcast_add(mask))` without its two (B, H, T, S) temporaries,
/// which a graph keeps alive until the backward. x (B, H, G, T, S) f32/f64, mask (B, 1, 1, T, S) of x's dtype
/// (additive: 0 or -inf-like), not differentiated. Element for element the composition's arithmetic
/// (`x * scale + 0`, `+ mask`, then [`softmax_last_dim`]; backward `softmax'` then `* scale + 0`), so the
/// same bits forward and backward.
pub fn scaled_masked_softmax(x: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, _, _, t, s) = x.dims5()?;
    if mask.dims() != [b, 1, 1, t, s] {
        bail!(
            "scaled_masked_softmax: mask must be ({b}, 1, 1, {t}, {s}) for x {:?}, got {:?}",
            x.shape(),
            mask.shape()
        );
    }
    if mask.dtype() != x.dtype() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        bail!(
            "scaled_masked_softmax: x and mask must both be f32 or f64, got {:?} and {:?}",
            x.dtype(),
            mask.dtype()
        );
    }
    if s == 0 {
        bail!("scaled_masked_softmax: no keys in {:?}", x.shape());
    }
    x.apply_op2(mask, ScaledMaskedSoftmax { scale })
}

/// The forward CustomOp: (x, mask) -> y.
struct ScaledMaskedSoftmax {
    scale: f64,
}

impl CustomOp2 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "r1v2-scaled-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(masked_fwd::<f32>(self.scale, s1, l1, s2, l2)?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(masked_fwd::<f64>(self.scale, s1, l1, s2, l2)?)
            }
            _ => bail!("scaled_masked_softmax: f32 or f64 inputs of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_x = y.apply_op2_no_bwd(grad_y, &ScaledSoftmaxBwd { scale: self.scale })?;
        Ok((Some(grad_x), None))
    }
}

/// The backward kernel: (y, grad_y) -> `softmax_bwd(y, grad_y) * scale + 0`.
struct ScaledSoftmaxBwd {
    scale: f64,
}

impl CustomOp2 for ScaledSoftmaxBwd {
    fn name(&self) -> &'static str {
        "r1v2-scaled-masked-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(scaled_bwd::<f32>(self.scale, s1, l1, s2, l2)?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(scaled_bwd::<f64>(self.scale, s1, l1, s2, l2)?)
            }
            _ => bail!("scaled_masked_softmax backward: f32 or f64 inputs of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Per row of S: `b = (x * scale + 0) + mask[batch, query]`, then [`softmax_fwd`]'s max, exps, sum and scaling.
fn masked_fwd<T: Acc>(
    scale: f64,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<Vec<T>> {
    let (x, mask) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
    let &[_, h, g, t, s] = l1.dims() else {
        bail!("scaled_masked_softmax: x must be 5-D, got {:?}", l1.shape())
    };
    let (scale, zero) = (T::of_f64(scale), T::zero());
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(s)
        .zip(x.par_chunks(s))
        .enumerate()
        .for_each(|(row, (y, x))| {
            let (query, batch) = (row % t, row / (h * g * t));
            let mask = &mask[(batch * t + query) * s..][..s];
            for ((y, &x), &m) in y.iter_mut().zip(x).zip(mask) {
                *y = (x * scale + zero) + m;
            }
            T::softmax_in_place(y);
        });
    Ok(y)
}

/// Per row: `grad_x = (y * (grad_y - sum(grad_y * y))) * scale + 0`, [`softmax_bwd`] then the scale's backward.
fn scaled_bwd<T: Acc>(
    scale: f64,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<Vec<T>> {
    let (y, grad_y) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
    let n = row_len(l1)?;
    let (scale, zero) = (T::of_f64(scale), T::zero());
    let mut grad_x = vec![T::zero(); y.len()];
    grad_x
        .par_chunks_mut(n)
        .zip(y.par_chunks(n).zip(grad_y.par_chunks(n)))
        .for_each(|(grad_x, (y, grad_y))| {
            let dot = y.iter().zip(grad_y).map(|(&y, &g)| y * g).sum::<T>();
            for ((out, &y), &g) in grad_x.iter_mut().zip(y).zip(grad_y) {
                *out = (y * (g - dot)) * scale + zero;
            }
        });
    Ok(grad_x)
}
