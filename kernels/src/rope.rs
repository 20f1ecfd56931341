//! Rotary position embedding (non-interleaved halves, `rotate_half` as in Qwen2 / Llama / InternViT)
//! as a CustomOp with a backward.
//!
//! With `x = [x1, x2]` split in halves of the head dimension:
//! `y1 = x1 * cos - x2 * sin`, `y2 = x1 * sin + x2 * cos`, a rotation by `theta`. Its transpose is the
//! rotation by `-theta`, so `grad_x = rope(grad_y, cos, -sin)` runs the same kernel. Gradients for
//! `cos` / `sin` (usually constants) are composed from candle ops, only when they are tracked:
//! `grad_cos = sum_H(g1 * x1 + g2 * x2)`, `grad_sin = sum_H(g2 * x1 - g1 * x2)` (and summed over B when
//! the tables are shared by the batch).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{contiguous, float_dispatch, Elem};

/// Rotary position embedding. x: (B, H, T, D), D even; cos, sin: (T, D/2) or (B, T, D/2), same dtype
/// as x. Returns (B, H, T, D). Matches [`crate::reference::rope`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    // CUDA: candle's ops composed (they have a backward) until a fused kernel exists (`crate::cuda`).
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return crate::reference::rope(x, cos, sin);
    }
    let (b, _h, t, d) = match x.dims4() {
        Ok(dims) => dims,
        Err(_) => bail!("rope: x must be (B, H, T, D), got shape {:?}", x.shape()),
    };
    if d == 0 || d % 2 != 0 {
        bail!(
            "rope: head dimension D must be even and non-zero, got shape {:?}",
            x.shape()
        );
    }
    for (name, table) in [("cos", cos), ("sin", sin)] {
        if table.dims() != [t, d / 2] && table.dims() != [b, t, d / 2] {
            bail!(
                "rope: {name} must be ({t}, {}) or ({b}, {t}, {}) for x {:?}, got {:?}",
                d / 2,
                d / 2,
                x.shape(),
                table.shape()
            );
        }
        if table.dtype() != x.dtype() {
            bail!(
                "rope: {name} dtype {:?} differs from x dtype {:?}",
                table.dtype(),
                x.dtype()
            );
        }
    }
    if cos.dims() != sin.dims() {
        bail!(
            "rope: cos {:?} and sin {:?} must have the same shape",
            cos.shape(),
            sin.shape()
        );
    }
    x.apply_op3(cos, sin, Rope)
}

/// The CustomOp: (x, cos, sin) -> y; its backward applies it again with `-sin`.
struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "r1v2-rope"
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
        let out = float_dispatch!(s1.dtype(), "rope", rope_fwd(s1, l1, s2, l2, s3, l3))?;
        Ok((out, l1.shape().clone()))
    }

    // cuda_fwd: a later issue (see `crate::cuda`); the trait's default errors "no cuda implementation".

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_x = match x.track_op() {
            true => Some(grad_y.apply_op3_no_bwd(cos, &sin.neg()?, &Rope)?),
            false => None,
        };
        if !cos.track_op() && !sin.track_op() {
            return Ok((grad_x, None, None));
        }
        let half = x.dim(3)? / 2;
        let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
        let (g1, g2) = (grad_y.narrow(3, 0, half)?, grad_y.narrow(3, half, half)?);
        // Sum over heads, then over the batch when the tables are shared: (B, H, T, D/2) -> cos.shape.
        let reduce = |t: Tensor| -> Result<Tensor> {
            let t = t.sum(1)?; // (B, T, D/2)
            match cos.rank() {
                2 => t.sum(0),
                _ => Ok(t),
            }
        };
        let grad_cos = match cos.track_op() {
            true => Some(reduce(((&g1 * &x1)? + (&g2 * &x2)?)?)?),
            false => None,
        };
        let grad_sin = match sin.track_op() {
            true => Some(reduce(((&g2 * &x1)? - (&g1 * &x2)?)?)?),
            false => None,
        };
        Ok((grad_x, grad_cos, grad_sin))
    }
}

fn rope_fwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> Result<CpuStorage> {
    let (x, cos, sin) = (
        contiguous::<T>(s1, l1)?,
        contiguous::<T>(s2, l2)?,
        contiguous::<T>(s3, l3)?,
    );
    let &[_b, h, t, d] = l1.dims() else {
        bail!("rope: x must be (B, H, T, D), got {:?}", l1.shape())
    };
    let half = d / 2;
    let batched_tables = l2.dims().len() == 3;
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .for_each(|(row, (y, x))| {
            // row = (b * H + h) * T + t
            let (pos, batch) = (row % t, row / (h * t));
            let table_row = if batched_tables { batch * t + pos } else { pos } * half;
            let (cos, sin) = (
                &cos[table_row..table_row + half],
                &sin[table_row..table_row + half],
            );
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            for i in 0..half {
                let (a, b, c, s) = (x1[i].load(), x2[i].load(), cos[i].load(), sin[i].load());
                y1[i] = T::store(a * c - b * s);
                y2[i] = T::store(a * s + b * c);
            }
        });
    Ok(T::to_cpu_storage_owned(y))
}
