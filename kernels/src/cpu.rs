//! Shared plumbing of the CPU kernels: element types and their accumulator, reading a storage through its
//! layout, the dtype dispatch every `cpu_fwd` uses, and [`no_grad_f32_cpu`], the test the inference-only fused
//! paths (attention, swiglu) share.
//!
//! Kernels are written once, generic over [`Elem`]: f32 and f64 compute in their own precision, bf16 and
//! f16 load each element into f32, compute there, and round once on the way out.

use std::borrow::Cow;

use candle_core::{CpuStorage, DType, Layout, Result, Tensor, WithDType};
use half::{bf16, f16};

/// Accumulator type a kernel computes in: f32 or f64.
pub(crate) trait Acc:
    WithDType + num_traits::Float + std::ops::AddAssign + std::iter::Sum + Send + Sync
{
    /// Converts an f64 constant (an epsilon) into the accumulator type.
    fn of_f64(v: f64) -> Self;
    /// Converts a count (a row length) into the accumulator type.
    fn of_usize(n: usize) -> Self;
    /// Softmax of one row in place (`-inf` entries get 0): f32 through [`crate::vexp::softmax_in_place`]
    /// (vectorized), f64 with libm's `exp`, summed in order.
    fn softmax_in_place(row: &mut [Self]);
}

impl Acc for f32 {
    fn of_f64(v: f64) -> Self {
        v as f32
    }
    fn of_usize(n: usize) -> Self {
        n as f32
    }
    fn softmax_in_place(row: &mut [f32]) {
        crate::vexp::softmax_in_place(row)
    }
}

impl Acc for f64 {
    fn of_f64(v: f64) -> Self {
        v
    }
    fn of_usize(n: usize) -> Self {
        n as f64
    }
    fn softmax_in_place(row: &mut [f64]) {
        let max = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
        let mut sum = 0.0;
        for v in row.iter_mut() {
            let e = (*v - max).exp();
            sum += e;
            *v = e;
        }
        let inv = sum.recip();
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// A floating element type a kernel reads and writes, with the accumulator it computes in.
pub(crate) trait Elem: WithDType {
    /// f64 for f64, f32 for everything else.
    type A: Acc;
    /// Widens one element to the accumulator.
    fn load(self) -> Self::A;
    /// Rounds an accumulator value back to the element type.
    fn store(a: Self::A) -> Self;
}

impl Elem for f32 {
    type A = f32;
    fn load(self) -> f32 {
        self
    }
    fn store(a: f32) -> Self {
        a
    }
}

impl Elem for f64 {
    type A = f64;
    fn load(self) -> f64 {
        self
    }
    fn store(a: f64) -> Self {
        a
    }
}

impl Elem for bf16 {
    type A = f32;
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(a: f32) -> Self {
        bf16::from_f32(a)
    }
}

impl Elem for f16 {
    type A = f32;
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(a: f32) -> Self {
        f16::from_f32(a)
    }
}

/// The elements of `storage` seen through `layout`, in row-major order: borrowed when the layout is
/// contiguous, gathered into a fresh buffer otherwise (transposed or broadcast inputs).
/// Errors when the storage does not hold `T` (a dtype mismatch between the inputs of an op).
pub(crate) fn contiguous<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<Cow<'a, [T]>> {
    let data = T::cpu_storage_as_slice(storage)?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(Cow::Borrowed(&data[start..end])),
        None => Ok(Cow::Owned(gather_strided(data, layout))),
    }
}

/// Copies a strided view into a row-major buffer by walking its multi-index; a view whose last dimension is
/// dense (stride 1, as a `narrow` of an earlier dimension or a slice of rows) is copied a row at a time.
fn gather_strided<T: Copy>(data: &[T], layout: &Layout) -> Vec<T> {
    let dims = layout.dims();
    let stride = layout.stride();
    let count = layout.shape().elem_count();
    let mut out = Vec::with_capacity(count);
    if let (Some(&row), Some(&1)) = (dims.last(), stride.last()) {
        if row > 1 && count > 0 {
            let lead = &dims[..dims.len() - 1];
            let lead_stride = &stride[..stride.len() - 1];
            let mut index = vec![0usize; lead.len()];
            let mut offset = layout.start_offset();
            for _ in 0..count / row {
                out.extend_from_slice(&data[offset..offset + row]);
                for dim in (0..lead.len()).rev() {
                    index[dim] += 1;
                    offset += lead_stride[dim];
                    if index[dim] < lead[dim] {
                        break;
                    }
                    offset -= lead_stride[dim] * lead[dim];
                    index[dim] = 0;
                }
            }
            return out;
        }
    }
    let mut index = vec![0usize; dims.len()];
    let mut offset = layout.start_offset();
    for _ in 0..count {
        out.push(data[offset]);
        // Odometer step from the last dimension; a dimension that wraps rewinds its offset.
        for dim in (0..dims.len()).rev() {
            index[dim] += 1;
            offset += stride[dim];
            if index[dim] < dims[dim] {
                break;
            }
            offset -= stride[dim] * dims[dim];
            index[dim] = 0;
        }
    }
    out
}

/// Calls `$kernel::<T>($args)` for the float dtype `$dtype`, or errors naming `$op` for other dtypes.
macro_rules! float_dispatch {
    ($dtype:expr, $op:expr, $kernel:ident ( $($arg:expr),* $(,)? )) => {
        match $dtype {
            candle_core::DType::F32 => $kernel::<f32>($($arg),*),
            candle_core::DType::F64 => $kernel::<f64>($($arg),*),
            candle_core::DType::BF16 => $kernel::<half::bf16>($($arg),*),
            candle_core::DType::F16 => $kernel::<half::f16>($($arg),*),
            other => candle_core::bail!(
                "{}: unsupported dtype {other:?} (expected f32, f64, bf16 or f16)",
                $op
            ),
        }
    };
}
pub(crate) use float_dispatch;

/// Whether the inference-only fused paths may run on `tensors`: all f32 on the CPU, and no gradient can reach
/// any of them (`track_op` is false: none is a variable nor computed from one, as in generation from loaded
/// weights). Those paths have no backward.
pub fn no_grad_f32_cpu(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Storage, Tensor};

    #[test]
    fn gather_strided_matches_candle_contiguous() -> Result<()> {
        let t = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((2, 3, 4))?;
        let views = [
            t.permute((2, 0, 1))?.narrow(0, 1, 2)?, // (2, 2, 3), offset 1: element by element
            t.narrow(1, 0, 2)?,                     // (2, 2, 4): rows of 4 copied whole
            t.narrow(1, 1, 2)?.narrow(2, 1, 3)?,    // (2, 2, 3), offset 5: rows of 3
            t.narrow(2, 2, 1)?,                     // (2, 3, 1): rows of one element
        ];
        for view in views {
            let (storage, layout) = view.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("expected a cpu storage")
            };
            let gathered = contiguous::<f32>(cpu, layout)?.into_owned();
            assert_eq!(gathered, view.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(())
    }
}
