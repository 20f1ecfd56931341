//! r1v2-kernels: differentiable fused ops for training on candle.
//!
//! candle's own fused `rms_norm`, `layer_norm`, `softmax_last_dim` and `rope` have no backward pass
//! (candle issue #2168): a gradient that reaches them silently stops. Every op here has a backward,
//! either as a `CustomOp` with `cpu_fwd` + `bwd`, or as a composition of candle ops that all have one,
//! and each is guarded by a finite-difference gradient check.
//!
//! | op | shapes |
//! |---|---|
//! | [`rms_norm`] | x (..., D), weight (D) -> (..., D) |
//! | [`layer_norm`] | x (..., D), weight (D), bias (D)? -> (..., D) |
//! | [`softmax_last_dim`] | x (..., N) -> (..., N) |
//! | [`rope`] | x (B, H, T, D), cos/sin (T, D/2) or (B, T, D/2) -> (B, H, T, D) |
//! | [`swiglu`] | gate (..., F), up (..., F) -> (..., F) |
//! | [`token_logprobs`] | logits (..., V), targets (...) u32 -> (...) f32 |
//!
//! CUDA versions (NVRTC-compiled `.cu` sources behind the `cuda` feature) come in a later issue.

use candle_core::{DType, Result, Tensor, D};

/// RMSNorm as in Qwen2 (`Qwen2RMSNorm`): computed in f32, cast back, then scaled by `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.to_dtype(dtype)?.broadcast_mul(weight)
}

/// LayerNorm over the last dimension (biased variance, as torch), with an optional bias.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centred.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
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
