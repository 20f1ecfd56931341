//! Token log-probabilities, `log_softmax(logits)[target]`, as a CustomOp that never materialises the
//! log-softmax of the vocabulary.
//!
//! Forward: per row of V logits, a max pass and a sum-of-exp pass give `logsumexp`, then
//! `logprob = logits[target] - logsumexp`: one f32 per token is written, nothing else is kept (the
//! composed version holds a (N, V) copy of the shifted logits and one of their exponentials).
//! Backward: recomputes `logsumexp` from the logits and writes
//! `grad_logits[j] = grad[row] * (1{j == target} - softmax(logits)[j])` in the logits' dtype.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use num_traits::{Float, Zero};
use rayon::prelude::*;

use crate::cpu::{contiguous, float_dispatch, Acc, Elem};

/// Log-probability of each target token: `log_softmax(logits)[target]`, in f32.
/// logits (..., V) f32/f64/bf16/f16, targets (...) u32 or i64 -> (...) f32.
/// Matches [`crate::reference::token_logprobs`]; a target outside `0..V` is an error.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    token_logprobs_as(logits, targets, DType::F32)
}

/// [`token_logprobs`] with the output in `out_dtype` (F32 or F64): F64 keeps the full precision of f64
/// logits, which the gradient checks need.
pub fn token_logprobs_as(logits: &Tensor, targets: &Tensor, out_dtype: DType) -> Result<Tensor> {
    // CUDA: candle's ops composed (they have a backward) until a fused kernel exists (`crate::cuda`).
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return crate::reference::token_logprobs(logits, targets)?.to_dtype(out_dtype);
    }
    let (lead, vocab) = match logits.dims().split_last() {
        Some((&v, lead)) if v > 0 => (lead, v),
        _ => bail!(
            "token_logprobs: logits must be (..., V) with V > 0, got shape {:?}",
            logits.shape()
        ),
    };
    if targets.dims() != lead {
        bail!("token_logprobs: targets shape {:?} must equal the logits shape without V, {lead:?} (logits {:?}, V = {vocab})", targets.shape(), logits.shape());
    }
    if !matches!(targets.dtype(), DType::U32 | DType::I64) {
        bail!(
            "token_logprobs: targets must be u32 or i64, got {:?}",
            targets.dtype()
        );
    }
    if !matches!(out_dtype, DType::F32 | DType::F64) {
        bail!("token_logprobs: out_dtype must be f32 or f64, got {out_dtype:?}");
    }
    logits.apply_op2(targets, TokenLogprobs { out_dtype })
}

/// The forward CustomOp: (logits, targets) -> logprobs in `out_dtype`.
struct TokenLogprobs {
    out_dtype: DType,
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "r1v2-token-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!(
            s1.dtype(),
            "token_logprobs",
            logprobs_fwd(self.out_dtype, s1, l1, s2, l2)
        )?;
        Ok((out, l2.shape().clone()))
    }

    // cuda_fwd: a later issue (see `crate::cuda`); the trait's default errors "no cuda implementation".

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The kernel reads the incoming gradient in the logits' accumulator type (f64 or f32).
        let acc_dtype = if logits.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let grad = grad.to_dtype(acc_dtype)?;
        let grad_logits = logits.apply_op3_no_bwd(targets, &grad, &TokenLogprobsBwd)?;
        Ok((Some(grad_logits), None))
    }
}

/// The backward kernel: (logits, targets, grad) -> grad_logits.
struct TokenLogprobsBwd;

impl CustomOp3 for TokenLogprobsBwd {
    fn name(&self) -> &'static str {
        "r1v2-token-logprobs-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!(
            s1.dtype(),
            "token_logprobs backward",
            logprobs_bwd(s1, l1, s2, l2, s3, l3)
        )?;
        Ok((out, l1.shape().clone()))
    }
}

/// Reads the targets as row indices, checking each against the vocabulary size.
fn read_targets(storage: &CpuStorage, layout: &Layout, vocab: usize) -> Result<Vec<usize>> {
    let raw: Vec<i64> = match storage {
        CpuStorage::U32(_) => contiguous::<u32>(storage, layout)?
            .iter()
            .map(|&t| t as i64)
            .collect(),
        CpuStorage::I64(_) => contiguous::<i64>(storage, layout)?.into_owned(),
        other => bail!(
            "token_logprobs: targets must be u32 or i64, got {:?}",
            other.dtype()
        ),
    };
    raw.iter()
        .enumerate()
        .map(|(row, &t)| match usize::try_from(t) {
            Ok(t) if t < vocab => Ok(t),
            _ => bail!("token_logprobs: target {t} at flat position {row} is outside the vocabulary 0..{vocab}"),
        })
        .collect()
}

/// Vocabulary size: the last dimension of the logits, checked non-empty by the public function.
fn vocab_size(layout: &Layout) -> Result<usize> {
    match layout.dims().last() {
        Some(&v) if v > 0 => Ok(v),
        _ => bail!(
            "token_logprobs: logits need a non-empty last dimension, got {:?}",
            layout.shape()
        ),
    }
}

/// `max` and `log(sum(exp(x - max)))` of one row.
fn max_and_log_sum_exp<T: Elem>(row: &[T]) -> (T::A, T::A) {
    let max = row
        .iter()
        .map(|&v| v.load())
        .fold(T::A::neg_infinity(), T::A::max);
    let sum = row.iter().map(|&v| (v.load() - max).exp()).sum::<T::A>();
    (max, sum.ln())
}

fn logprobs_fwd<T: Elem>(
    out_dtype: DType,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<CpuStorage> {
    let logits = contiguous::<T>(s1, l1)?;
    let vocab = vocab_size(l1)?;
    let targets = read_targets(s2, l2, vocab)?;
    let logprobs: Vec<f64> = logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            let (max, log_sum_exp) = max_and_log_sum_exp(row);
            candle_core::WithDType::to_f64(row[target].load() - max - log_sum_exp)
        })
        .collect();
    Ok(match out_dtype {
        DType::F64 => CpuStorage::F64(logprobs),
        _ => CpuStorage::F32(logprobs.into_iter().map(|v| v as f32).collect()),
    })
}

fn logprobs_bwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> Result<CpuStorage> {
    let logits = contiguous::<T>(s1, l1)?;
    let vocab = vocab_size(l1)?;
    let targets = read_targets(s2, l2, vocab)?;
    let grad = contiguous::<T::A>(s3, l3)?;
    let mut grad_logits = vec![T::zero(); logits.len()];
    grad_logits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter().zip(grad.par_iter()))
        .for_each(|((out, row), (&target, &g))| {
            if g.is_zero() {
                return; // masked (padding) tokens: the gradient row stays zero.
            }
            let (max, log_sum_exp) = max_and_log_sum_exp(row);
            let shift = max + log_sum_exp;
            for (out, &v) in out.iter_mut().zip(row) {
                *out = T::store(-g * (v.load() - shift).exp());
            }
            out[target] = T::store(g * (T::A::of_f64(1.0) - (row[target].load() - shift).exp()));
        });
    Ok(T::to_cpu_storage_owned(grad_logits))
}
