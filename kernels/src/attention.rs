//! Inference-only attention of a step's queries over a KV cache, fused: for each query row the scores, the
//! additive mask, the softmax and the weighted sum of values are one pass, with no intermediate tensors.
//!
//! The composed version (`q @ k^T * scale + mask`, softmax, `@ v`, then a transpose to `(B, T, H*D)`) runs
//! about ten candle ops per layer; in a decode step (T = 1) those are tiny batched matmuls whose set-up costs
//! more than their arithmetic. Here one task per (batch row, query position) computes every head and writes its
//! `H*D` outputs where the output projection reads them. Grouped-query attention reads KV head `h / group` for
//! query head `h`, as transformers' `repeat_kv`; keys whose mask is `-inf` are skipped, not multiplied.
//!
//! Each output element is a fixed sequence of f32 multiplies and adds: dot products in 16 lanes combined in a
//! fixed tree, the softmax in key order, the value sum in key order. It does not depend on the batch, the
//! number of threads, or the instruction set (the AVX-512 / AVX2 copies compile the same loops, Rust never fuses
//! a multiply and an add on its own, and the dot products' intrinsics perform the portable [`dot`]'s operations),
//! which generation's determinism needs.
//!
//! There is no backward: use it where no gradient flows (the model's forward checks that no input is tracked).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::isa::Isa;

/// Lanes of the dot-product accumulators.
const LANES: usize = 16;

/// `softmax(q @ k^T * scale + mask) @ v`, laid out as `(B, T, H * D)`.
///
/// q: (B, H, T, D) f32; k, v: (B, Hkv, S, D) f32 with H a multiple of Hkv, any strides but a unit stride on D
/// (a view of a larger cache buffer is read in place); mask: (B, 1, 1, T, S) or (B, T, S) f32, additive (0 or
/// `-inf`), every query row with at least one finite entry. CPU only, no backward.
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let Ok((b, h, t, d)) = q.dims4() else {
        bail!(
            "cached_attention: q must be (B, H, T, D), got {:?}",
            q.shape()
        )
    };
    let Ok((kb, h_kv, s, kd)) = k.dims4() else {
        bail!(
            "cached_attention: k must be (B, Hkv, S, D), got {:?}",
            k.shape()
        )
    };
    if kb != b || kd != d || v.dims() != k.dims() || h_kv == 0 || h % h_kv != 0 {
        bail!(
            "cached_attention: q {:?}, k {:?} and v {:?} do not fit (B, H, T, D) / (B, Hkv, S, D) with H a \
             multiple of Hkv",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    if mask.dims() != [b, 1, 1, t, s] && mask.dims() != [b, t, s] {
        bail!(
            "cached_attention: mask must be ({b}, 1, 1, {t}, {s}) or ({b}, {t}, {s}), got {:?}",
            mask.shape()
        );
    }
    if !q.device().is_cpu() {
        bail!("cached_attention: CPU tensors only");
    }
    let op = CachedAttention {
        mask: mask.contiguous()?,
        scale: scale as f32,
        group: h / h_kv,
    };
    q.contiguous()?.apply_op3_no_bwd(k, v, &op)
}

struct CachedAttention {
    mask: Tensor,
    scale: f32,
    /// Query heads per KV head.
    group: usize,
}

/// A (B, Hkv, S, D) operand read in place: element `(b, h, s, 0..D)` starts at
/// `start + b * sb + h * sh + s * ss`.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    start: usize,
    sb: usize,
    sh: usize,
    ss: usize,
}

impl<'a> Strided<'a> {
    fn new(name: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let CpuStorage::F32(data) = storage else {
            bail!(
                "cached_attention: {name} must be f32, got {:?}",
                storage.dtype()
            )
        };
        let stride = layout.stride();
        if stride[3] != 1 && layout.dims()[3] > 1 {
            bail!("cached_attention: {name} needs a unit stride on its last dimension, got {stride:?}");
        }
        Ok(Self {
            data,
            start: layout.start_offset(),
            sb: stride[0],
            sh: stride[1],
            ss: stride[2],
        })
    }

    #[inline(always)]
    fn row(&self, b: usize, h: usize, s: usize, d: usize) -> &'a [f32] {
        &self.data[self.start + b * self.sb + h * self.sh + s * self.ss..][..d]
    }
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "r1v2-cached-attention"
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
        let (b, h, t, d) = l1.shape().dims4()?;
        let s = l2.dims()[2];
        let (Some((q0, q1)), CpuStorage::F32(q)) = (l1.contiguous_offsets(), s1) else {
            bail!("cached_attention: q must be contiguous f32");
        };
        let q = &q[q0..q1];
        let (k, v) = (Strided::new("k", s2, l2)?, Strided::new("v", s3, l3)?);
        let (mask_storage, mask_layout) = self.mask.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(mask)), Some((m0, m1))) =
            (&*mask_storage, mask_layout.contiguous_offsets())
        else {
            bail!("cached_attention: the mask must be a contiguous f32 CPU tensor");
        };
        let mask = &mask[m0..m1];
        let shape = Shapes {
            group: self.group,
            steps: t,
            dim: d,
            scale: self.scale,
        };
        let isa = Isa::detect();
        let mut out = vec![0f32; b * t * h * d];
        // One task per (batch row, query position): its H * D outputs are contiguous in (B, T, H * D).
        out.par_chunks_mut(h * d)
            .with_min_len(4)
            .enumerate()
            .for_each_init(
                || vec![0f32; shape.group * s],
                |scores, (row, out)| {
                    let (bi, ti) = (row / t, row % t);
                    let task = Task {
                        q: &q[(bi * h * t + ti) * d..],
                        k,
                        v,
                        mask: &mask[row * s..][..s],
                        batch: bi,
                    };
                    isa.run(&shape, &task, scores, out);
                },
            );
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))))
    }
}

/// Sizes shared by every task.
struct Shapes {
    group: usize,
    steps: usize,
    dim: usize,
    scale: f32,
}

/// One (batch row, query position): its queries (head `hh` at `q[hh * T * D..][..D]`), the cache and its mask.
struct Task<'a> {
    q: &'a [f32],
    k: Strided<'a>,
    v: Strided<'a>,
    mask: &'a [f32],
    batch: usize,
}

impl Isa {
    fn run(self, shape: &Shapes, task: &Task, scores: &mut [f32], out: &mut [f32]) {
        match self {
            // SAFETY: `detect` saw the feature on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { run_avx512(shape, task, scores, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { run_avx2(shape, task, scores, out) },
            Isa::Portable => run_task(shape, task, scores, out, one_by_one(dot)),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_avx512(shape: &Shapes, task: &Task, scores: &mut [f32], out: &mut [f32]) {
    run_task(shape, task, scores, out, |q, k, dots| {
        x86::dot4_avx512(q, k, dots)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2(shape: &Shapes, task: &Task, scores: &mut [f32], out: &mut [f32]) {
    run_task(
        shape,
        task,
        scores,
        out,
        one_by_one(|a, b| unsafe { x86::dot_avx2(a, b) }),
    )
}

/// The four-query dot of [`run_task`] as four calls of a one-query `dot`.
#[inline(always)]
fn one_by_one(dot: impl Fn(&[f32], &[f32]) -> f32) -> impl Fn([&[f32]; 4], &[f32], &mut [f32; 4]) {
    move |q, k, dots| {
        for (d, q) in dots.iter_mut().zip(q) {
            *d = dot(q, k);
        }
    }
}

/// Every head of one task; `out` is its `H * D` outputs, `scores` room for `group * S` weights. The query heads
/// of one KV head go together, so each key and value row is loaded once for the whole group.
#[inline(always)]
fn run_task(
    shape: &Shapes,
    task: &Task,
    scores: &mut [f32],
    out: &mut [f32],
    dot4: impl Fn([&[f32]; 4], &[f32], &mut [f32; 4]),
) {
    let (d, group) = (shape.dim, shape.group);
    let keys = task.mask.len();
    for (kv_head, out) in out.chunks_exact_mut(group * d).enumerate() {
        let first_head = kv_head * group;
        for (key, &m) in task.mask.iter().enumerate() {
            if m == f32::NEG_INFINITY {
                (0..group).for_each(|g| scores[g * keys + key] = f32::NEG_INFINITY);
                continue;
            }
            let k_row = task.k.row(task.batch, kv_head, key, d);
            let mut g = 0;
            while g < group {
                // Up to four query heads against this key row at once (independent sums, same bits as `dot`).
                let n = (group - g).min(4);
                let mut dots = [0f32; 4];
                let query =
                    |i: usize| &task.q[(first_head + g + i.min(n - 1)) * shape.steps * d..][..d];
                dot4([query(0), query(1), query(2), query(3)], k_row, &mut dots);
                for (i, dot) in dots[..n].iter().enumerate() {
                    scores[(g + i) * keys + key] = dot * shape.scale + m;
                }
                g += n;
            }
        }
        // Softmax per head, in key order: every query row has a finite score (its own slot), so total > 0.
        for weights in scores[..group * keys].chunks_exact_mut(keys) {
            let max = weights.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut total = 0f32;
            for w in weights.iter_mut() {
                *w = if *w == f32::NEG_INFINITY {
                    0.0
                } else {
                    (*w - max).exp()
                };
                total += *w;
            }
            weights.iter_mut().for_each(|w| *w /= total);
        }
        out.fill(0.0);
        for (key, &m) in task.mask.iter().enumerate() {
            if m == f32::NEG_INFINITY {
                continue;
            }
            let value = task.v.row(task.batch, kv_head, key, d);
            for (g, out) in out.chunks_exact_mut(d).enumerate() {
                let weight = scores[g * keys + key];
                for (o, &x) in out.iter_mut().zip(value) {
                    *o += weight * x;
                }
            }
        }
    }
}

/// `sum(a * b)` in [`LANES`] partial sums over `i % LANES` (whole chunks of 16), combined by halves (lane `i`
/// takes lane `i + 8`, then `i + 4`, `i + 2`, `i + 1`), then the tail in order. The vector versions in [`x86`]
/// perform exactly these operations.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_tail, b_tail) = (a_chunks.remainder(), b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    let mut sum = lanes[0];
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! [`super::dot`] in registers: one multiply and one add per lane and chunk, then the same halving.
    use std::arch::x86_64::*;

    use super::LANES;

    /// [`super::dot`]`(q[i], k)` for four queries, their sums interleaved so the four chains overlap.
    ///
    /// # Safety
    /// The CPU has AVX-512F; every query has the length of `k`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot4_avx512(q: [&[f32]; 4], k: &[f32], dots: &mut [f32; 4]) {
        let whole = k.len() / LANES * LANES;
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i < whole {
            let kv = _mm512_loadu_ps(k.as_ptr().add(i));
            for (acc, q) in acc.iter_mut().zip(&q) {
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(_mm512_loadu_ps(q.as_ptr().add(i)), kv));
            }
            i += LANES;
        }
        for ((dot, acc), q) in dots.iter_mut().zip(acc).zip(&q) {
            let low = _mm512_castps512_ps256(acc);
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
            *dot = finish(_mm256_add_ps(low, high), &q[whole..], &k[whole..]);
        }
    }

    /// # Safety
    /// The CPU has AVX2; `a` and `b` have the same length.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let whole = a.len() / LANES * LANES;
        let (mut low, mut high) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i < whole {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            low = _mm256_add_ps(low, _mm256_mul_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb)));
            high = _mm256_add_ps(
                high,
                _mm256_mul_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8))),
            );
            i += LANES;
        }
        finish(_mm256_add_ps(low, high), &a[whole..], &b[whole..])
    }

    /// Lanes 0..8 (already `lane i + lane i+8`) -> halved to one, then the tail added in order.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[target_feature(enable = "avx")]
    #[inline]
    unsafe fn finish(eight: __m256, a_tail: &[f32], b_tail: &[f32]) -> f32 {
        let four = _mm_add_ps(
            _mm256_castps256_ps128(eight),
            _mm256_extractf128_ps::<1>(eight),
        );
        let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        let one = _mm_add_ss(two, _mm_shuffle_ps::<1>(two, two));
        let mut sum = _mm_cvtss_f32(one);
        for (x, y) in a_tail.iter().zip(b_tail) {
            sum += x * y;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    /// The composed attention (as the model's training path), f64.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
        let (b, h, t, d) = q.dims4()?;
        let h_kv = k.dim(1)?;
        let group = h / h_kv;
        let (q, k, v) = (
            q.to_dtype(DType::F64)?,
            k.to_dtype(DType::F64)?,
            v.to_dtype(DType::F64)?,
        );
        let mask = mask.to_dtype(DType::F64)?.reshape((b, 1, t, k.dim(2)?))?;
        let mut heads = Vec::new();
        for head in 0..h {
            let qh = q.narrow(1, head, 1)?;
            let kh = k.narrow(1, head / group, 1)?.contiguous()?;
            let vh = v.narrow(1, head / group, 1)?.contiguous()?;
            let scores = (qh.matmul(&kh.t()?)? * scale)?.broadcast_add(&mask)?;
            let probs = candle_nn_free_softmax(&scores)?;
            heads.push(probs.matmul(&vh)?); // (B, 1, T, D)
        }
        Tensor::cat(&heads, 1)?
            .transpose(1, 2)?
            .reshape((b, t, h * d))
    }

    fn candle_nn_free_softmax(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?;
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    /// A causal mask over `past` cached slots and `t` new ones, with some padding slots (-inf) per row.
    fn mask(b: usize, t: usize, past: usize) -> Result<Tensor> {
        let s = past + t;
        let mut m = vec![0f32; b * t * s];
        for bi in 0..b {
            for ti in 0..t {
                for si in 0..s {
                    let padded = si < past && (si + bi) % 3 == 1;
                    let future = si > past + ti;
                    if padded || future {
                        m[(bi * t + ti) * s + si] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, 1, t, s), &Device::Cpu)
    }

    /// (q, k, v) with k and v views of a larger cache buffer, as the KV cache hands them out.
    fn inputs(
        b: usize,
        h: usize,
        h_kv: usize,
        t: usize,
        s: usize,
        d: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, h_kv, s + 7, d), &dev)?.narrow(2, 0, s)?;
        let v = Tensor::randn(0f32, 1.0, (b, h_kv, s + 7, d), &dev)?.narrow(2, 0, s)?;
        Ok((q, k, v))
    }

    #[test]
    fn matches_the_composed_attention() -> Result<()> {
        // GQA groups 1, 2 and 4; head dims below, at and past the lanes; decode (T = 1) and prefill steps.
        for &(b, h, h_kv, t, past, d) in &[
            (3, 4, 4, 1, 9, 8),
            (2, 8, 2, 1, 30, 64),
            (2, 8, 4, 5, 6, 20),
            (1, 2, 1, 7, 0, 16),
            (5, 12, 2, 1, 80, 64),
        ] {
            let s = past + t;
            let (q, k, v) = inputs(b, h, h_kv, t, s, d)?;
            let mask = mask(b, t, past)?;
            let scale = 1.0 / (d as f64).sqrt();
            let got = cached_attention(&q, &k, &v, &mask, scale)?;
            assert_eq!(got.dims(), &[b, t, h * d]);
            let want = reference(&q, &k, &v, &mask, scale)?;
            let diff = (got.to_dtype(DType::F64)? - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            assert!(
                diff < 1e-5,
                "{:?}: max difference {diff}",
                (b, h, h_kv, t, past, d)
            );
        }
        Ok(())
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch_and_every_isa_agrees() -> Result<()> {
        // Head dims of whole 16-lane chunks and with a tail.
        for d in [64, 20] {
            row_and_isa_invariance(d)?;
        }
        Ok(())
    }

    fn row_and_isa_invariance(d: usize) -> Result<()> {
        let (b, h, h_kv, t, past) = (6, 8, 2, 2, 40);
        let s = past + t;
        let (q, k, v) = inputs(b, h, h_kv, t, s, d)?;
        let mask = mask(b, t, past)?;
        let all = cached_attention(&q, &k, &v, &mask, 0.125)?;
        for row in [0, 4] {
            let one = |x: &Tensor| x.narrow(0, row, 1);
            let alone = cached_attention(&one(&q)?, &one(&k)?, &one(&v)?, &one(&mask)?, 0.125)?;
            assert_eq!(
                alone.flatten_all()?.to_vec1::<f32>()?,
                one(&all)?.flatten_all()?.to_vec1::<f32>()?,
                "row {row} alone"
            );
        }
        // The same task through every compiled copy of the loop.
        let (q_all, k_all, v_all) = (
            q.flatten_all()?.to_vec1::<f32>()?,
            k.contiguous()?,
            v.contiguous()?,
        );
        let (ks, kl) = k_all.storage_and_layout();
        let (vs, vl) = v_all.storage_and_layout();
        let (Storage::Cpu(ks), Storage::Cpu(vs)) = (&*ks, &*vs) else {
            unreachable!("CPU tensors")
        };
        let (kk, vv) = (Strided::new("k", ks, kl)?, Strided::new("v", vs, vl)?);
        let mask_all = mask.flatten_all()?.to_vec1::<f32>()?;
        let shape = Shapes {
            group: h / h_kv,
            steps: t,
            dim: d,
            scale: 0.125,
        };
        let task = Task {
            q: &q_all[(3 * h * t + 1) * d..],
            k: kk,
            v: vv,
            mask: &mask_all[(3 * t + 1) * s..][..s],
            batch: 3,
        };
        let runs: Vec<Vec<f32>> = Isa::available()
            .iter()
            .map(|isa| {
                let (mut scores, mut out) = (vec![0f32; (h / h_kv) * s], vec![0f32; h * d]);
                isa.run(&shape, &task, &mut scores, &mut out);
                out
            })
            .collect();
        for run in &runs[1..] {
            assert_eq!(run, &runs[0], "head dim {d}");
        }
        let from_op = all.narrow(0, 3, 1)?.narrow(1, 1, 1)?.flatten_all()?;
        assert_eq!(runs[0], from_op.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> Result<()> {
        let (q, k, v) = inputs(2, 6, 4, 1, 5, 8)?; // 6 heads over 4 KV heads
        let m = mask(2, 1, 4)?;
        let err = cached_attention(&q, &k, &v, &m, 1.0).unwrap_err();
        assert!(err.to_string().contains("multiple of Hkv"), "{err}");
        let (q, k, v) = inputs(2, 4, 2, 1, 5, 8)?;
        let err = cached_attention(&q, &k, &v, &mask(2, 1, 3)?, 1.0).unwrap_err();
        assert!(err.to_string().contains("mask must be"), "{err}");
        let err = cached_attention(&q.to_dtype(DType::F64)?, &k, &v, &m, 1.0).unwrap_err();
        assert!(err.to_string().contains("contiguous f32"), "{err}");
        Ok(())
    }
}
