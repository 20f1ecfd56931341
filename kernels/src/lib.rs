//! r1v2-kernels: differentiable fused ops for training on candle.
//!
//! candle's own fused `rms_norm`, `layer_norm`, `softmax_last_dim` and `rope` have no backward pass
//! (candle issue #2168): a gradient that reaches them silently stops. Every op here has a backward,
//! either as a `CustomOp` with `cpu_fwd` + `bwd`, or as a composition of candle ops that all have one,
//! and each is guarded by a finite-difference gradient check and a comparison with [`reference`].
//!
//! | op | module | shapes | how |
//! |---|---|---|---|
//! | [`rms_norm`] | `norm.rs` | x (..., D), weight (D) -> (..., D) | CustomOp2, fused backward |
//! | [`layer_norm`] | `norm.rs` | x (..., D), weight (D), bias (D)? -> (..., D) | CustomOp2/3, fused backward |
//! | [`softmax_last_dim`] | `softmax.rs` | x (..., N) -> (..., N) | CustomOp1, fused backward |
//! | [`scaled_masked_softmax`] | `softmax.rs` | x (B, H, G, T, S), mask (B, 1, 1, T, S) -> x's shape | CustomOp2: `softmax(x * scale + mask)`, the bits of `softmax_last_dim` over `x * scale + mask` |
//! | [`rope`] | `rope.rs` | x (B, H, T, D), cos/sin (T, D/2) or (B, T, D/2) -> (B, H, T, D) | CustomOp3 |
//! | [`swiglu`], [`silu`] | `swiglu.rs` | gate (..., F), up (..., F) -> (..., F) | CustomOp1 SiLU (f32/f64 CPU; candle's elsewhere), then mul |
//! | [`linear`] | `linear.rs` | x (M, K), weight (N, K) -> (M, N) | CustomOp2: `x @ W^T`, the weight's gradient in its own layout |
//! | [`token_logprobs`] | `logprobs.rs` | logits (..., V), targets (...) u32/i64 -> (...) f32 | CustomOp2 |
//!
//! Inference only, without a backward, for the CPU decode loop of models that are not trained: [`packed`]
//! (`x @ W^T + b` with the weight packed once into column panels, AVX-512 / AVX2 register-blocked,
//! batch-invariant), [`cached_attention`] (`attention.rs`: scores, mask, softmax and values in one pass per
//! query over a KV cache read in place, batch-invariant) and [`vexp`] (`exp` over f32 slices with fixed-order sums,
//! for the sampler). Each picks its compiled copy with [`Isa::detect`] and gives the same bits on every [`Isa`].
//!
//! Other modules: `cpu.rs` (element types, strided reads, dtype dispatch shared by the kernels,
//! [`no_grad_f32_cpu`]),
//! [`reference`] (the composed versions), `cuda.rs` (the place for CUDA kernels, `cuda` feature).
//! CPU kernels take f32, f64, bf16 and f16 (the last two computed in f32) and any layout
//! (non-contiguous inputs are read through their strides). CUDA versions come in a later issue.

mod attention;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod isa;
mod linear;
mod logprobs;
mod norm;
pub mod packed;
pub mod reference;
mod rope;
mod softmax;
mod swiglu;
pub mod vexp;

pub use attention::cached_attention;
pub use cpu::no_grad_f32_cpu;
pub use isa::Isa;
pub use linear::linear;
pub use logprobs::{token_logprobs, token_logprobs_as};
pub use norm::{layer_norm, rms_norm};
pub use packed::{packed_linear, PackedMatrix};
pub use rope::rope;
pub use softmax::{scaled_masked_softmax, softmax_last_dim};
pub use swiglu::{silu, swiglu};
