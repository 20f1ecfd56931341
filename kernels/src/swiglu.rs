//! SwiGLU gate of the Qwen2 MLP, `silu(gate) * up`, kept as a composition of candle ops.
//!
//! Both steps already have a backward in candle-core 0.11.1 (`backprop.rs`: `Op::Unary(_, Silu)` uses
//! `d silu / dx = sigmoid(x) * (1 - silu(x)) + silu(x)`, and `Op::Binary(_, _, Mul)`), so gradients flow
//! without a CustomOp. A fused kernel would save one (N, F) temporary; it is not worth a CPU kernel.
//! The same holds for the adapter's GELU: candle's `gelu_erf` has a backward (`UnaryOp::GeluErf`).

use candle_core::{bail, Result, Tensor};

/// SwiGLU: `silu(gate) * up`. gate (..., F), up (..., F) -> (..., F).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!(
            "swiglu: gate {:?} and up {:?} must have the same shape",
            gate.shape(),
            up.shape()
        );
    }
    gate.silu()? * up
}
