//! Composed reference versions of every op: plain candle compositions whose every step has a backward.
//!
//! They define the semantics the fused ops in this crate must match (forward and gradients), and are
//! what the tests and `examples/bench_kernels.rs` compare against. They stay public so that a caller can
//! switch back to them when chasing a numerical difference.

use candle_core::{DType, Result, Tensor, D};

/// The dtype the norms compute in: f64 stays f64 (for gradient checks), everything else goes to f32.
fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// `x @ W^T` (x (M, K), weight (N, K)) as candle-nn's `Linear` computes it: the weight's gradient flows back
/// through a transpose node.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.matmul(&weight.t()?)
}

/// RMSNorm as in Qwen2 (`Qwen2RMSNorm`): computed in f32, cast back, then scaled by `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(compute_dtype(dtype))?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.to_dtype(dtype)?.broadcast_mul(weight)
}

/// LayerNorm over the last dimension (biased variance, as torch), with an optional bias.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(compute_dtype(dtype))?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?;
    let y = y.broadcast_mul(weight)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Numerically stable softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Rotary position embedding, non-interleaved halves (`rotate_half`, as Qwen2 / Llama).
/// x: (B, H, T, D); cos, sin: (T, D/2) or (B, T, D/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _h, t, d) = x.dims4()?;
    let half = d / 2;
    let (cos, sin) = match cos.rank() {
        2 => (cos.reshape((1, 1, t, half))?, sin.reshape((1, 1, t, half))?),
        _ => (cos.reshape((b, 1, t, half))?, sin.reshape((b, 1, t, half))?),
    };
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
    Tensor::cat(&[r1, r2], 3)
}

/// SwiGLU gate of the Qwen2 MLP: silu(gate) * up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Log-probability of each target token: log_softmax(logits)[target], in f32.
/// logits (..., V), targets (...) u32 -> (...) f32.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let dims = logits.dims().to_vec();
    let v = dims[dims.len() - 1];
    let lead = &dims[..dims.len() - 1];
    let logits = logits.to_dtype(DType::F32)?.reshape(((), v))?;
    let targets = targets.flatten_all()?.unsqueeze(1)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets, 1)?;
    (picked - lse)?.reshape(lead)
}
