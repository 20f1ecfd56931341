//! SwiGLU gate of the Qwen2 MLP, `silu(gate) * up`.
//!
//! On the CPU in f32, `silu(g) = g / (1 + exp(-g))` takes its exp from [`crate::vexp`] (vectorized, the same
//! bits on every instruction set): [`Silu`] is a CustomOp with a backward for a forward that may be trained,
//! followed by candle's `mul`; where no gradient can flow (generation's decode loop) one fused pass computes
//! the same expression, `g / (1 + exp(-g)) * u`, without the intermediate tensor. Both give the same bits, so
//! a forward with and one without a gradient agree exactly (a trainer's no-grad log-probs equal its graded
//! ones; the finite-difference checks rely on it).
//!
//! Elsewhere (f64, other devices) it is candle's `silu` (with its backward, `Op::Unary(_, Silu)`) times `up`;
//! [`Silu`] also runs f64 on the CPU, with libm's exp, for the finite-difference checks.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::cpu::no_grad_f32_cpu;
use crate::isa::Isa;
use crate::vexp::exp1;

/// SwiGLU: `silu(gate) * up`. gate (..., F), up (..., F) -> (..., F).
///
/// f32 and f64 CPU inputs take [`Silu`] (a backward) then `* up`, or, in f32, when no gradient can reach them (neither is a
/// variable nor computed from one: `track_op` is false, as in generation), one fused pass with the same
/// arithmetic and no backward. Other inputs take candle's `silu`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!(
            "swiglu: gate {:?} and up {:?} must have the same shape",
            gate.shape(),
            up.shape()
        );
    }
    if no_grad_f32_cpu(&[gate, up]) {
        gate.contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)
    } else if gate.device().is_cpu() && matches!(gate.dtype(), DType::F32 | DType::F64) {
        silu(gate)? * up
    } else {
        gate.silu()? * up
    }
}

/// `silu(x) = x / (1 + exp(-x))` through [`Silu`] (CPU, f32 or f64), with a backward.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Silu)
}

/// SiLU on the CPU: f32 with [`crate::vexp`]'s exp (as the fused pass of [`swiglu`]), f64 with libm's.
/// Backward: `d silu / dx = s * (1 + x * (1 - s))` with `s = sigmoid(x)`, one pass ([`SiluBwd`]) with the
/// operations, in the order, of the candle composition it replaced, so the same bits.
pub struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "r1v2-silu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("silu: contiguous input only");
        };
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(Isa::detect().silu_mul(&x[start..end], None)),
            CpuStorage::F64(x) => CpuStorage::F64(
                x[start..end]
                    .iter()
                    .map(|&x| x / (1.0 + (-x).exp()))
                    .collect(),
            ),
            other => bail!("silu: f32 or f64 only, got {:?}", other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad_res.contiguous()?, &SiluBwd)?,
        ))
    }
}

/// The SiLU backward kernel: (x, grad) -> `grad * (s * (x * (1 - s) + 1))` with `s = 1 / (exp(-x) + 1)`, libm's
/// exp: element for element the candle ops `recip(exp(-x) + 1)`, `affine(-1, 1)`, `*`, `+ 1`, `*`, `*` (the
/// composition this replaced, kept as the reference in the tests), in one pass without their seven temporaries.
struct SiluBwd;

impl CustomOp2 for SiluBwd {
    fn name(&self) -> &'static str {
        "r1v2-silu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((x0, x1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("silu backward: contiguous inputs only");
        };
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(silu_grad(&x[x0..x1], &g[g0..g1], f32::exp))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(silu_grad(&x[x0..x1], &g[g0..g1], f64::exp))
            }
            (x, g) => bail!(
                "silu backward: f32 or f64 of one dtype, got {:?} and {:?}",
                x.dtype(),
                g.dtype()
            ),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `grad * silu'(x)` element by element (see [`SiluBwd`]), split over the threads in blocks.
fn silu_grad<T>(x: &[T], grad: &[T], exp: fn(T) -> T) -> Vec<T>
where
    T: num_traits::Float + Send + Sync,
{
    use rayon::prelude::*;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(4096)
        .zip(x.par_chunks(4096).zip(grad.par_chunks(4096)))
        .for_each(|(out, (x, grad))| {
            for ((out, &x), &g) in out.iter_mut().zip(x).zip(grad) {
                let s = (exp(-x) + T::one()).recip();
                let one_minus_s = s * -T::one() + T::one();
                *out = g * (s * (x * one_minus_s + T::one()));
            }
        });
    out
}

/// The fused pass of [`swiglu`] (f32, contiguous inputs).
struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "r1v2-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(gate), CpuStorage::F32(up), Some((g0, g1)), Some((u0, u1))) =
            (s1, s2, l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("silu-mul: contiguous f32 inputs only");
        };
        let out = Isa::detect().silu_mul(&gate[g0..g1], Some(&up[u0..u1]));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `g / (1 + exp(-g))`, times `u` when given: the one expression both paths compute, element by element.
#[inline(always)]
fn silu_one(g: f32, u: Option<f32>) -> f32 {
    let s = g / (1.0 + exp1(-g));
    match u {
        Some(u) => s * u,
        None => s,
    }
}

/// [`silu_one`] over a slice, 16 lanes at a time (the tail one by one: the same operations per element).
#[inline(always)]
fn silu_mul_lanes(gate: &[f32], up: Option<&[f32]>) -> Vec<f32> {
    let mut out = Vec::with_capacity(gate.len());
    let (gate_chunks, gate_tail) = gate.as_chunks::<16>();
    match up {
        Some(up) => {
            let (up_chunks, up_tail) = up.as_chunks::<16>();
            for (g, u) in gate_chunks.iter().zip(up_chunks) {
                // Plain loops over the lanes (a closure, as in `array::from_fn`, is not inlined into the
                // target-feature copies, and `mul_add` would then call libm's fmaf).
                let mut lanes = [0f32; 16];
                for ((l, &g), &u) in lanes.iter_mut().zip(g).zip(u) {
                    *l = silu_one(g, Some(u));
                }
                out.extend_from_slice(&lanes);
            }
            out.extend(
                gate_tail
                    .iter()
                    .zip(up_tail)
                    .map(|(&g, &u)| silu_one(g, Some(u))),
            );
        }
        None => {
            for g in gate_chunks {
                let mut lanes = [0f32; 16];
                for (l, &g) in lanes.iter_mut().zip(g) {
                    *l = silu_one(g, None);
                }
                out.extend_from_slice(&lanes);
            }
            out.extend(gate_tail.iter().map(|&g| silu_one(g, None)));
        }
    }
    out
}

impl Isa {
    /// [`silu_mul_lanes`] compiled for this instruction set (`up`, when given, as long as `gate`).
    fn silu_mul(self, gate: &[f32], up: Option<&[f32]>) -> Vec<f32> {
        match self {
            // SAFETY: `detect` (or the test that lists the instruction sets) found the features on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::avx512_silu_mul(gate, up) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::avx2_silu_mul(gate, up) },
            Isa::Portable => silu_mul_lanes(gate, up),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// [`super::silu_mul_lanes`] with AVX-512F; the CPU must have it.
    #[target_feature(enable = "avx512f")]
    pub(super) fn avx512_silu_mul(gate: &[f32], up: Option<&[f32]>) -> Vec<f32> {
        super::silu_mul_lanes(gate, up)
    }

    /// [`super::silu_mul_lanes`] with AVX2 and FMA; the CPU must have them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn avx2_silu_mul(gate: &[f32], up: Option<&[f32]>) -> Vec<f32> {
        super::silu_mul_lanes(gate, up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_silu_backward_has_the_bits_of_the_candle_composition() -> Result<()> {
        // Past both ends of exp's range, in f32 and f64.
        for dtype in [DType::F32, DType::F64] {
            let values: Vec<f64> = (0..1000).map(|i| (i as f64 - 500.0) * 0.23).collect();
            let x = Tensor::new(values.as_slice(), &Device::Cpu)?.to_dtype(dtype)?;
            let grad = Tensor::new(
                values.iter().map(|v| (v * 3.1).sin()).collect::<Vec<_>>(),
                &Device::Cpu,
            )?
            .to_dtype(dtype)?;
            let var = Var::from_tensor(&x)?;
            let fused = silu(var.as_tensor())?.mul(&grad)?.sum_all()?.backward()?;
            let fused = fused.get(&var).expect("a gradient").flatten_all()?;
            let sigmoid = (x.neg()?.exp()? + 1.0)?.recip()?;
            let slope = (&sigmoid * ((&x * sigmoid.affine(-1.0, 1.0)?)? + 1.0)?)?;
            let composed = grad.mul(&slope)?;
            let (fused, composed) = (
                fused.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                composed.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            );
            for (i, (f, c)) in fused.iter().zip(&composed).enumerate() {
                // Equal bits; a zero's sign aside (backward adds each gradient to a zero: 0 + -0 = +0).
                let same = f.to_bits() == c.to_bits() || (*f == 0.0 && *c == 0.0);
                assert!(same, "{dtype:?} element {i}: {f} vs {c}");
            }
        }
        Ok(())
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        // Past both ends of exp's range, and a tail after the 16-lane chunks.
        let gate: Vec<f32> = (0..357).map(|i| (i as f32 - 178.0) * 0.61).collect();
        let up: Vec<f32> = (0..357)
            .map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.5)
            .collect();
        for up in [None, Some(up.as_slice())] {
            let runs: Vec<Vec<f32>> = Isa::available()
                .iter()
                .map(|isa| isa.silu_mul(&gate, up))
                .collect();
            for (isa, run) in Isa::available().iter().zip(&runs) {
                assert_eq!(run, &runs[0], "{isa:?} differs from the portable pass");
            }
        }
    }
}
