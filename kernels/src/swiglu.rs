//! SwiGLU gate of the Qwen2 MLP, `silu(gate) * up`: a composition of candle ops when a gradient may flow.
//!
//! Both steps already have a backward in candle-core 0.11.1 (`backprop.rs`: `Op::Unary(_, Silu)` uses
//! `d silu / dx = sigmoid(x) * (1 - silu(x)) + silu(x)`, and `Op::Binary(_, _, Mul)`), so gradients flow
//! without a CustomOp. The same holds for the adapter's GELU: candle's `gelu_erf` has a backward (`UnaryOp::GeluErf`).
//!
//! Where no gradient can flow (generation's decode loop), f32 CPU inputs take one fused pass instead.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu::no_grad_f32_cpu;

/// SwiGLU: `silu(gate) * up`. gate (..., F), up (..., F) -> (..., F).
///
/// When no gradient can reach the inputs (neither is a variable nor computed from one: `track_op` is false, as
/// in generation) and both are f32 on the CPU, this runs one fused pass without a backward, element for element
/// the same arithmetic as the composition (`g / (1 + exp(-g)) * u`, libm's `exp`), so a forward with and one
/// without a gradient agree bit for bit (a trainer's no-grad log-probs equal its graded ones; the
/// finite-difference checks rely on it). A vectorized exp (`crate::vexp`) would break that by an ulp.
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
    } else {
        gate.silu()? * up
    }
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
        let (gate, up) = (&gate[g0..g1], &up[u0..u1]);
        let mut out = vec![0f32; gate.len()];
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
