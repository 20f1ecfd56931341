//! RMSNorm (Qwen2, InternViT-6B) and LayerNorm (InternViT-300M, the `mlp1` adapter) over the last
//! dimension, as candle CustomOps with a fused backward.
//!
//! Forward: one pass per row computing the statistics in f32 (f64 for f64 inputs). Backward: one pass
//! per row that recomputes the row statistics from `x` (nothing is saved in the forward) and writes
//! `grad_x`; the weight (and bias) gradients are reduced per block of rows in the same pass. The backward
//! kernel returns one flat buffer `[grad_x; grad_weight; grad_bias]` that `bwd` splits with `narrow`.
//!
//! With `xh = x * r` (RMSNorm, `r = 1/sqrt(mean(x^2) + eps)`) or `xh = (x - mean) * r` (LayerNorm,
//! `r = 1/sqrt(var + eps)`) and `gh = grad_y * weight`:
//! - RMSNorm:   `grad_x = r * (gh - xh * mean(gh * xh))`
//! - LayerNorm: `grad_x = r * (gh - mean(gh) - xh * mean(gh * xh))`
//! - both:      `grad_weight = sum_rows(grad_y * xh)`, `grad_bias = sum_rows(grad_y)`.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::{Float, Zero};
use rayon::prelude::*;

use crate::cpu::{contiguous, float_dispatch, Acc, Elem};

/// Rows per parallel task of a backward pass: each task keeps its own partial weight/bias gradients.
const ROW_BLOCK: usize = 32;

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
/// x (..., D), weight (D) of the same dtype -> (..., D). Matches [`crate::reference::rms_norm`].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    // CUDA: candle's ops composed (they have a backward) until a fused kernel exists (`crate::cuda`).
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return crate::reference::rms_norm(x, weight, eps);
    }
    check_affine("rms_norm", x, weight, None)?;
    x.apply_op2(weight, RmsNorm { eps })
}

/// LayerNorm over the last dimension (biased variance, as torch), with an optional bias.
/// x (..., D), weight (D), bias (D)? of the same dtype -> (..., D). Matches [`crate::reference::layer_norm`].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    // CUDA: candle's ops composed (they have a backward) until a fused kernel exists (`crate::cuda`).
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return crate::reference::layer_norm(x, weight, bias, eps);
    }
    check_affine("layer_norm", x, weight, bias)?;
    match bias {
        Some(bias) => x.apply_op3(weight, bias, LayerNorm { eps }),
        None => x.apply_op2(weight, LayerNormNoBias { eps }),
    }
}

/// Checks x (..., D) against weight (D) and bias (D), same dtype and device, D > 0.
fn check_affine(op: &str, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    let d = match x.dims().last() {
        Some(&d) if d > 0 => d,
        _ => bail!(
            "{op}: x must have a non-empty last dimension, got shape {:?}",
            x.shape()
        ),
    };
    for (name, t) in std::iter::once(("weight", weight)).chain(bias.map(|b| ("bias", b))) {
        if t.dims() != [d] {
            bail!(
                "{op}: {name} must have shape ({d}) for x {:?}, got {:?}",
                x.shape(),
                t.shape()
            );
        }
        if t.dtype() != x.dtype() {
            bail!(
                "{op}: {name} dtype {:?} differs from x dtype {:?}",
                t.dtype(),
                x.dtype()
            );
        }
        if !t.device().same_device(x.device()) {
            bail!("{op}: {name} is on another device than x");
        }
    }
    Ok(())
}

/// Splits the flat backward buffer `[grad_x; grad_weight; grad_bias]`, keeping only what is tracked.
fn split_grads(flat: &Tensor, x: &Tensor, weight: &Tensor) -> Result<[Option<Tensor>; 3]> {
    let (n, d) = (x.elem_count(), weight.elem_count());
    let grad_x = flat.narrow(0, 0, n)?.reshape(x.shape())?;
    let grad_weight = flat.narrow(0, n, d)?;
    // The LayerNorm kernel appends grad_bias; the RMSNorm one stops after grad_weight.
    let grad_bias = match flat.elem_count() == n + 2 * d {
        true => Some(flat.narrow(0, n + d, d)?),
        false => None,
    };
    Ok([
        x.track_op().then_some(grad_x),
        weight.track_op().then_some(grad_weight),
        grad_bias,
    ])
}

/// The RMSNorm forward CustomOp: (x, weight) -> y.
struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "r1v2-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!(s1.dtype(), "rms_norm", rms_fwd(self.eps, s1, l1, s2, l2))?;
        Ok((out, l1.shape().clone()))
    }

    // cuda_fwd: a later issue (see `crate::cuda`); the trait's default errors "no cuda implementation".

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(weight, grad_y, &RmsNormBwd { eps: self.eps })?;
        let [grad_x, grad_weight, _] = split_grads(&flat, x, weight)?;
        Ok((grad_x, grad_weight))
    }
}

/// The RMSNorm backward kernel: (x, weight, grad_y) -> flat [grad_x; grad_weight].
struct RmsNormBwd {
    eps: f64,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "r1v2-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(
            s1.dtype(),
            "rms_norm backward",
            norm_bwd(false, self.eps, [(s1, l1), (s2, l2), (s3, l3)])
        )
    }
}

/// The LayerNorm forward CustomOp with a bias: (x, weight, bias) -> y.
struct LayerNorm {
    eps: f64,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "r1v2-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!(
            s1.dtype(),
            "layer_norm",
            layer_fwd(self.eps, s1, l1, s2, l2, Some((s3, l3)))
        )?;
        Ok((out, l1.shape().clone()))
    }

    // cuda_fwd: a later issue (see `crate::cuda`).

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(weight, grad_y, &LayerNormBwd { eps: self.eps })?;
        let [grad_x, grad_weight, grad_bias] = split_grads(&flat, x, weight)?;
        Ok((grad_x, grad_weight, grad_bias.filter(|_| bias.track_op())))
    }
}

/// The LayerNorm forward CustomOp without a bias: (x, weight) -> y.
struct LayerNormNoBias {
    eps: f64,
}

impl CustomOp2 for LayerNormNoBias {
    fn name(&self) -> &'static str {
        "r1v2-layer-norm-no-bias"
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
            "layer_norm",
            layer_fwd(self.eps, s1, l1, s2, l2, None)
        )?;
        Ok((out, l1.shape().clone()))
    }

    // cuda_fwd: a later issue (see `crate::cuda`).

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(weight, grad_y, &LayerNormBwd { eps: self.eps })?;
        let [grad_x, grad_weight, _] = split_grads(&flat, x, weight)?;
        Ok((grad_x, grad_weight))
    }
}

/// The LayerNorm backward kernel: (x, weight, grad_y) -> flat [grad_x; grad_weight; grad_bias].
struct LayerNormBwd {
    eps: f64,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "r1v2-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(
            s1.dtype(),
            "layer_norm backward",
            norm_bwd(true, self.eps, [(s1, l1), (s2, l2), (s3, l3)])
        )
    }
}

/// RMSNorm forward: y = x * r * weight per row.
fn rms_fwd<T: Elem>(
    eps: f64,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<CpuStorage> {
    let (x, weight) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
    let d = weight.len();
    let eps = T::A::of_f64(eps);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
        let mean_sq = x.iter().map(|&v| v.load() * v.load()).sum::<T::A>() / T::A::of_usize(d);
        let r = (mean_sq + eps).sqrt().recip();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight.iter()) {
            *y = T::store(x.load() * r * w.load());
        }
    });
    Ok(T::to_cpu_storage_owned(y))
}

/// LayerNorm forward: y = (x - mean) * r * weight + bias per row.
fn layer_fwd<T: Elem>(
    eps: f64,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<CpuStorage> {
    let (x, weight) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
    let bias = bias.map(|(s, l)| contiguous::<T>(s, l)).transpose()?;
    let d = weight.len();
    let eps = T::A::of_f64(eps);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
        let (mean, r) = mean_and_rstd(x, eps);
        for (i, (y, &x)) in y.iter_mut().zip(x).enumerate() {
            let shift = bias.as_ref().map_or(T::A::zero(), |b| b[i].load());
            *y = T::store((x.load() - mean) * r * weight[i].load() + shift);
        }
    });
    Ok(T::to_cpu_storage_owned(y))
}

/// Mean and 1/sqrt(biased variance + eps) of one row, two-pass for accuracy.
fn mean_and_rstd<T: Elem>(x: &[T], eps: T::A) -> (T::A, T::A) {
    let n = T::A::of_usize(x.len());
    let mean = x.iter().map(|&v| v.load()).sum::<T::A>() / n;
    let var = x
        .iter()
        .map(|&v| (v.load() - mean) * (v.load() - mean))
        .sum::<T::A>()
        / n;
    (mean, (var + eps).sqrt().recip())
}

/// Shared backward of both norms (`centred` selects LayerNorm): inputs (x, weight, grad_y), output flat
/// `[grad_x (N*D); grad_weight (D)]` plus `grad_bias (D)` for LayerNorm.
fn norm_bwd<T: Elem>(
    centred: bool,
    eps: f64,
    inputs: [(&CpuStorage, &Layout); 3],
) -> Result<(CpuStorage, Shape)> {
    let [(s1, l1), (s2, l2), (s3, l3)] = inputs;
    let (x, weight, grad_y) = (
        contiguous::<T>(s1, l1)?,
        contiguous::<T>(s2, l2)?,
        contiguous::<T>(s3, l3)?,
    );
    let (n, d) = (x.len(), weight.len());
    let eps = T::A::of_f64(eps);
    let n_param_grads = if centred { 2 } else { 1 };
    let mut out = vec![T::zero(); n + n_param_grads * d];
    let (grad_x, grad_params) = out.split_at_mut(n);
    let block = ROW_BLOCK * d;
    let sums = grad_x
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(grad_y.par_chunks(block)))
        .map(|(grad_x, (x, grad_y))| {
            // Partial [grad_weight; grad_bias] of this block of rows.
            let mut partial = vec![T::A::zero(); n_param_grads * d];
            for (grad_x, (x, grad_y)) in grad_x.chunks_mut(d).zip(x.chunks(d).zip(grad_y.chunks(d)))
            {
                let (mean, r) = if centred {
                    mean_and_rstd(x, eps)
                } else {
                    let mean_sq =
                        x.iter().map(|&v| v.load() * v.load()).sum::<T::A>() / T::A::of_usize(d);
                    (T::A::zero(), (mean_sq + eps).sqrt().recip())
                };
                let (mut sum_gh, mut sum_gh_xh) = (T::A::zero(), T::A::zero());
                for i in 0..d {
                    let xh = (x[i].load() - mean) * r;
                    let gh = grad_y[i].load() * weight[i].load();
                    sum_gh += gh;
                    sum_gh_xh += gh * xh;
                    partial[i] += grad_y[i].load() * xh;
                    if centred {
                        partial[d + i] += grad_y[i].load();
                    }
                }
                let mean_gh = if centred {
                    sum_gh / T::A::of_usize(d)
                } else {
                    T::A::zero()
                };
                let mean_gh_xh = sum_gh_xh / T::A::of_usize(d);
                for i in 0..d {
                    let xh = (x[i].load() - mean) * r;
                    let gh = grad_y[i].load() * weight[i].load();
                    grad_x[i] = T::store(r * (gh - mean_gh - xh * mean_gh_xh));
                }
            }
            partial
        })
        .collect::<Vec<_>>();
    // The blocks' partial sums are added in row order, not by rayon's `reduce`, whose tree follows the work
    // stealing: its result changed in the last bits from run to run, and resumed runs must be bit-identical.
    let sums = sums.into_iter().fold(
        vec![T::A::zero(); n_param_grads * d],
        |mut total, partial| {
            total.iter_mut().zip(partial).for_each(|(t, p)| *t += p);
            total
        },
    );
    for (out, sum) in grad_params.iter_mut().zip(sums) {
        *out = T::store(sum);
    }
    let len = out.len();
    Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
}
