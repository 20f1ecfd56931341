//! Learning-rate schedule and gradient clipping.
//!
//! [`lr_multiplier`] is transformers' `_get_cosine_schedule_with_warmup_lr_lambda` (the lambda behind
//! `get_cosine_schedule_with_warmup` and `get_cosine_with_min_lr_schedule_with_warmup`, `num_cycles = 0.5`):
//!
//! ```python
//! if current_step < num_warmup_steps:
//!     return float(current_step) / float(max(1, num_warmup_steps))
//! progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
//! factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
//! factor = factor * (1 - min_lr_rate) + min_lr_rate
//! return max(0, factor)
//! ```
//!
//! Update number k (0-based) uses `lr * lr_multiplier(k)`, as a `LambdaLR` stepped after each
//! `optimizer.step()` does (so with warmup the first update has rate 0, as in transformers). One deviation:
//! past the horizon the progress is held at 1 (transformers' cosine would rise again).
//!
//! [`clip_grad_norm`] is `torch.nn.utils.clip_grad_norm_` (2-norm over all gradients):
//!
//! ```python
//! total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
//! clip_coef = max_norm / (total_norm + 1e-6)
//! clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
//! for g in grads: g.mul_(clip_coef_clamped)
//! return total_norm
//! ```

use candle_core::{DType, Tensor};

use super::config::OptimConfig;
use crate::Result;

/// The factor of the peak learning rate at update `step` (0-based).
pub fn lr_multiplier(step: u64, warmup_steps: u64, total_steps: u64, min_lr_ratio: f64) -> f64 {
    if step < warmup_steps {
        return step as f64 / warmup_steps.max(1) as f64;
    }
    if total_steps == 0 {
        return 1.0;
    }
    let progress = ((step - warmup_steps) as f64
        / total_steps.saturating_sub(warmup_steps).max(1) as f64)
        .min(1.0);
    let factor = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    (factor * (1.0 - min_lr_ratio) + min_lr_ratio).max(0.0)
}

/// The learning rate of update `step` under `config`.
pub fn learning_rate(config: &OptimConfig, step: u64) -> f64 {
    config.lr
        * lr_multiplier(
            step,
            config.warmup_steps,
            config.total_steps,
            config.min_lr_ratio,
        )
}

/// Global 2-norm of `grads` (accumulated in f64, in element order).
///
/// Summed here rather than with candle's `sum_all`, whose CPU reduction is split across threads adaptively:
/// its f64 result changed in the last bits from run to run, and a deterministic run (resume included) must
/// log the same numbers.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum_sq = 0.0f64;
    for grad in grads {
        let values = grad.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        sum_sq += values.iter().map(|v| v * v).sum::<f64>();
    }
    Ok(sum_sq.sqrt())
}

/// Scales `grads` so that their global norm is at most `max_norm` (torch `clip_grad_norm_`); returns the
/// norm before clipping. `max_norm <= 0` leaves them unchanged.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let total_norm = global_norm(grads)?;
    if max_norm <= 0.0 {
        return Ok(total_norm);
    }
    // torch computes the norm in the gradients' dtype; the coefficient is then a tensor of that dtype.
    let coef = (max_norm / (total_norm + 1e-6)).min(1.0);
    for grad in grads.iter_mut() {
        *grad = (&*grad * coef)?;
    }
    Ok(total_norm)
}
