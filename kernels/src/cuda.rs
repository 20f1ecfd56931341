//! Place for the CUDA versions of the kernels (a later issue).
//!
//! Plan: one `.cu` source per module (`norm.cu`, `softmax.cu`, `rope.cu`, `logprobs.cu`) compiled at run
//! time by NVRTC through candle's cudarc, and a `cuda_fwd` in each CustomOp (forward and backward
//! kernels alike) that launches it with the same row-per-block layout as the CPU kernel. Until then every
//! op errors on a CUDA tensor with candle's "no cuda implementation for r1v2-<op>" message instead of
//! silently computing something else; the composed versions in [`crate::reference`] do run on CUDA.
