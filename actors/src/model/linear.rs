//! The models' linear layers (LLM, vision towers, adapter): candle-nn's `Linear` (weights, bias, loading), computed
//! on the CPU by [`r1v2_kernels::linear`] (differentiable, what training uses), plus an optional packed copy of the
//! weight ([`r1v2_kernels::PackedMatrix`]) for fast CPU inference.
//!
//! [`r1v2_kernels::linear`] gives the weight its gradient in the weight's own layout; candle's `matmul(&w.t())`
//! routes it through a transpose node (two zero fills and a strided add per weight). Other devices, and inputs
//! that are not contiguous, take candle-nn's forward.
//!
//! A packed layer computes `x @ W^T + b` with the packed kernel (no backward) for f32 inputs on the CPU and
//! falls back to the above otherwise. The packed copy is taken from the weight when [`Linear::pack`] runs:
//! whoever overwrites the weight afterwards (the policy generator's `SyncWeights`) packs again.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;
use r1v2_kernels::{packed_linear, PackedMatrix};

use crate::Result;

/// A linear layer, optionally packed for inference.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    /// Shared by clones of the model (it is only read).
    packed: Option<Arc<PackedMatrix>>,
}

impl Linear {
    /// Wraps a candle-nn layer (unpacked).
    pub fn new(inner: candle_nn::Linear) -> Self {
        Self {
            inner,
            packed: None,
        }
    }

    /// `(N, K)` weight.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// Packs the current weight and bias when they are f32 on the CPU (otherwise the layer stays unpacked).
    /// The packed path has no backward: pack only a model that is not trained.
    pub fn pack(&mut self) -> Result<()> {
        let weight = self.inner.weight();
        self.packed = if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            Some(Arc::new(PackedMatrix::from_tensors(
                weight,
                self.inner.bias(),
            )?))
        } else {
            None
        };
        Ok(())
    }

    /// Drops the packed copy: every forward goes through candle again.
    pub fn unpack(&mut self) {
        self.packed = None;
    }

    /// Whether forwards of f32 CPU inputs use the packed copy.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// `x (..., K) -> (..., N)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.packed {
            Some(packed) if x.dtype() == DType::F32 && x.device().is_cpu() => {
                Ok(packed_linear(x, packed)?)
            }
            _ if x.device().is_cpu() && x.is_contiguous() && x.rank() >= 2 => {
                // `x @ W^T` as one op whose backward gives the weight's gradient in its own layout
                // (r1v2_kernels::linear), instead of through candle's transpose node.
                let y = r1v2_kernels::linear(&x.flatten_to(D::Minus2)?, self.inner.weight())?;
                let mut dims = x.dims().to_vec();
                dims[x.rank() - 1] = y.dim(1)?;
                let y = y.reshape(dims)?;
                Ok(match self.inner.bias() {
                    Some(bias) => y.broadcast_add(bias)?,
                    None => y,
                })
            }
            _ => Ok(self.inner.forward(x)?),
        }
    }
}

/// `candle_nn::linear` (with bias), wrapped.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(candle_nn::linear(in_dim, out_dim, vb)?))
}

/// `candle_nn::linear_b` (bias or not), wrapped.
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(candle_nn::linear_b(in_dim, out_dim, bias, vb)?))
}

/// `candle_nn::linear_no_bias`, wrapped.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(candle_nn::linear_no_bias(in_dim, out_dim, vb)?))
}
