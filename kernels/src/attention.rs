//! Inference-only attention of a step's queries over a KV cache, fused: for each query row the scores, the
//! additive mask, the softmax and the weighted sum of values are one pass, with no intermediate tensors.
//!
//! The composed version (`q @ k^T * scale + mask`, softmax, `@ v`, then a transpose to `(B, T, H*D)`) runs
//! about ten candle ops per layer; in a decode step (T = 1) those are tiny batched matmuls whose set-up costs
//! more than their arithmetic. Here one task per (batch row, query position, KV head) computes that KV head's
//! query heads and writes their outputs where the output projection reads them (`(B, T, H*D)`); a single row
//! (batch 1, a long response) still spreads over the threads. Grouped-query attention reads KV head `h / group` for
//! query head `h`, as transformers' `repeat_kv`; keys whose mask is `-inf` are skipped, not multiplied.
//!
//! Each output element is a fixed sequence of f32 operations: dot products in 16 lanes combined in a fixed
//! tree, the softmax's exps from [`crate::vexp`] over the keys (summed in f64 in its fixed order), the value sum
//! in key order. It does not depend on the batch, the number of threads, or the instruction set (the AVX-512 /
//! AVX2 copies compile the same loops, Rust never fuses a multiply and an add on its own, the intrinsics
//! perform the portable [`dot`]'s and [`values`]' operations, and vexp gives the same bits on each), which
//! generation's determinism needs.
//!
//! The work is blocked for the registers: the scores of 4 query heads (of one KV head) against 4 keys are 16
//! lane sums whose halving runs on all 16 at once; the weighted values of up to 4 heads stay in registers
//! across the keys, 64 columns at a time. The cache is read once per step, mostly from memory, so its rows are
//! prefetched a few keys ahead (`examples/bench_attention`).
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
        // One task per (batch row, query position, KV head): the outputs of the KV head's query heads are
        // `group * D` contiguous floats of (B, T, H * D). Per KV head, so that a single row (batch 1, a long
        // response) still spreads over the threads.
        let h_kv = h / self.group;
        out.par_chunks_mut(self.group * d)
            .enumerate()
            .for_each_init(Scratch::default, |scratch, (task, out)| {
                let (row, kv_head) = (task / h_kv, task % h_kv);
                let (bi, ti) = (row / t, row % t);
                let task = Task {
                    q: &q[(bi * h * t + ti) * d..],
                    k,
                    v,
                    mask: &mask[row * s..][..s],
                    batch: bi,
                    kv_head,
                };
                isa.run(&shape, &task, scratch, out);
            });
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

/// One (batch row, query position, KV head): the row's queries (head `hh` at `q[hh * T * D..][..D]`), the cache
/// and its mask.
struct Task<'a> {
    q: &'a [f32],
    k: Strided<'a>,
    v: Strided<'a>,
    mask: &'a [f32],
    batch: usize,
    /// The KV head whose query heads this task computes.
    kv_head: usize,
}

/// A task's working memory, reused across the tasks of a thread.
#[derive(Default)]
struct Scratch {
    /// `group * S` scores, then softmax weights, head-major.
    scores: Vec<f32>,
    /// One head's exps and their block sums.
    exps: Vec<f32>,
    sums: Vec<f64>,
}

/// Query heads (and key rows) per block of dot products: 4 x 4 sums fill the 16 lanes of one register.
const BLOCK: usize = 4;

/// A block's query (or key) rows.
type Rows<'a> = [&'a [f32]; BLOCK];
/// A block's dot products, `[4 * key + head]`.
type Dots = [f32; BLOCK * BLOCK];

impl Isa {
    fn run(self, shape: &Shapes, task: &Task, scratch: &mut Scratch, out: &mut [f32]) {
        match self {
            // SAFETY: `detect` saw the feature on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { run_avx512(shape, task, scratch, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { run_avx2(shape, task, scratch, out) },
            Isa::Portable => run_task(self, shape, task, scratch, out, one_by_one(dot), values),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_avx512(shape: &Shapes, task: &Task, scratch: &mut Scratch, out: &mut [f32]) {
    run_task(
        Isa::Avx512,
        shape,
        task,
        scratch,
        out,
        |q, k, dots| unsafe { x86::dots_avx512(q, k, dots) },
        |w, v, out| unsafe { x86::values_avx512(w, v, out) },
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2(shape: &Shapes, task: &Task, scratch: &mut Scratch, out: &mut [f32]) {
    run_task(
        Isa::Avx2,
        shape,
        task,
        scratch,
        out,
        one_by_one(|a, b| unsafe { x86::dot_avx2(a, b) }),
        values,
    )
}

/// The block of dot products of [`run_task`] (`dots[4 * key + head] = dot(q[head], k[key])`) as sixteen calls
/// of a one-query `dot`.
#[inline(always)]
fn one_by_one(dot: impl Fn(&[f32], &[f32]) -> f32) -> impl Fn(Rows, Rows, &mut Dots) {
    move |q, k, dots| {
        for (key, k) in k.iter().enumerate() {
            for (head, q) in q.iter().enumerate() {
                dots[BLOCK * key + head] = dot(q, k);
            }
        }
    }
}

/// The query heads of one task's KV head; `out` is their `group * D` outputs. They go together: blocks of
/// 4 heads x 4 keys for the scores (each key row loaded once per block), the softmax per head with
/// [`crate::vexp`], and the values of up to 4 heads summed in registers, each value row loaded once per block.
///
/// `dots` fills a block of dot products as [`one_by_one`]`(`[`dot`]`)` does; `values` adds `w[h] * v` to
/// `out[h]` (`w` in key order) as [`values`] does: every copy gives the same bits.
#[inline(always)]
fn run_task(
    isa: Isa,
    shape: &Shapes,
    task: &Task,
    scratch: &mut Scratch,
    out: &mut [f32],
    dots: impl Fn(Rows, Rows, &mut Dots),
    values: impl Fn(&[[f32; BLOCK]], &[&[f32]], &mut [&mut [f32]]),
) {
    let (d, group) = (shape.dim, shape.group);
    let keys = task.mask.len();
    scratch.scores.resize(group * keys, 0.0);
    let Scratch { scores, exps, sums } = scratch;
    // The unmasked keys, in order: masked ones get no score, weight or value.
    let live: Vec<usize> = (0..keys)
        .filter(|&key| task.mask[key] != f32::NEG_INFINITY)
        .collect();
    let mut weights: Vec<[f32; BLOCK]> = Vec::with_capacity(live.len());
    let mut rows: Vec<&[f32]> = Vec::with_capacity(live.len());
    let kv_head = task.kv_head;
    let first_head = kv_head * group;
    let query = |g: usize| &task.q[(first_head + g) * shape.steps * d..][..d];
    scores.fill(f32::NEG_INFINITY);
    for h0 in (0..group).step_by(BLOCK) {
        let heads = BLOCK.min(group - h0);
        // A short block repeats its last head (or key); the extra sums are not kept.
        let q: [&[f32]; BLOCK] = std::array::from_fn(|i| query(h0 + i.min(heads - 1)));
        for (b, block) in live.chunks(BLOCK).enumerate() {
            // The cache is read once per step, from memory: ask for the rows a few blocks ahead.
            for &key in live.iter().skip((b + AHEAD) * BLOCK).take(BLOCK) {
                prefetch(task.k.row(task.batch, kv_head, key, d));
            }
            let k: [&[f32]; BLOCK] = std::array::from_fn(|i| {
                task.k
                    .row(task.batch, kv_head, block[i.min(block.len() - 1)], d)
            });
            let mut sums = [0f32; BLOCK * BLOCK];
            dots(q, k, &mut sums);
            for (i, &key) in block.iter().enumerate() {
                for head in 0..heads {
                    scores[(h0 + head) * keys + key] =
                        sums[BLOCK * i + head] * shape.scale + task.mask[key];
                }
            }
        }
    }
    // Softmax per head: every query row has a finite score (its own slot), so the total is positive.
    for weights in scores.chunks_exact_mut(keys) {
        let max = isa.max(weights);
        let total = isa.pass(weights, 1.0, max, Some(exp_buffers(exps, sums, keys)));
        for (w, &e) in weights.iter_mut().zip(exps.iter()) {
            *w = (e as f64 / total) as f32;
        }
    }
    rows.clear();
    rows.extend(
        live.iter()
            .map(|&key| task.v.row(task.batch, kv_head, key, d)),
    );
    for (h0, out) in (0..group).step_by(BLOCK).zip(out.chunks_mut(BLOCK * d)) {
        let heads = BLOCK.min(group - h0);
        weights.clear();
        weights.extend(
            live.iter()
                .map(|&key| std::array::from_fn(|i| scores[(h0 + i.min(heads - 1)) * keys + key])),
        );
        let mut outs: Vec<&mut [f32]> = out.chunks_exact_mut(d).collect();
        values(&weights, &rows, &mut outs);
    }
}

/// Blocks of keys (and keys of values) read ahead of the ones in use.
const AHEAD: usize = 4;

/// Asks for `row`'s cache lines (a hint; nothing on other CPUs).
#[inline(always)]
fn prefetch(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..row.len()).step_by(16) {
        // SAFETY: a prefetch never faults; the address is inside `row` anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                row.as_ptr().add(line) as *const i8,
            )
        };
    }
}

/// `exps` and `sums` sized for a pass over `keys` values.
fn exp_buffers<'a>(
    exps: &'a mut Vec<f32>,
    sums: &'a mut Vec<f64>,
    keys: usize,
) -> (&'a mut [f32], &'a mut [f64]) {
    exps.resize(keys, 0.0);
    sums.resize(keys.div_ceil(crate::vexp::BLOCK), 0.0);
    (exps.as_mut_slice(), sums.as_mut_slice())
}

/// `out[h] = sum over keys of w[key][h] * v[key]`, each element summed from 0 in key order, one multiply and
/// one add per term (`out` holds up to [`BLOCK`] heads).
#[inline(always)]
fn values(w: &[[f32; BLOCK]], v: &[&[f32]], out: &mut [&mut [f32]]) {
    for (h, out) in out.iter_mut().enumerate() {
        out.fill(0.0);
        for (w, v) in w.iter().zip(v) {
            for (o, &x) in out.iter_mut().zip(v.iter()) {
                *o += w[h] * x;
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
    //! [`super::dot`] and [`super::values`] in registers, with the same operations.
    use std::arch::x86_64::*;

    use super::{BLOCK, LANES};

    /// [`super::dot`] of 4 queries x 4 keys: `dots[4 * key + head]`. The 16 lane sums stay in 16 registers;
    /// the halving then runs on all of them at once, two registers merged into one at each step (lanes
    /// `i` and `i + 8`, then `i + 4` within 128-bit blocks, `i + 2`, `i + 1`), which adds the same pairs of
    /// lanes as the one-query `dot` and leaves the 16 dots in one register.
    ///
    /// # Safety
    /// The CPU has AVX-512F; every query and key has the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dots_avx512(
        q: [&[f32]; BLOCK],
        k: [&[f32]; BLOCK],
        dots: &mut [f32; BLOCK * BLOCK],
    ) {
        let len = k[0].len();
        let whole = len / LANES * LANES;
        // acc[4 * head + key]
        let mut acc = [_mm512_setzero_ps(); BLOCK * BLOCK];
        let mut i = 0;
        while i < whole {
            let kv: [__m512; BLOCK] =
                std::array::from_fn(|key| _mm512_loadu_ps(k[key].as_ptr().add(i)));
            for (head, q) in q.iter().enumerate() {
                let qv = _mm512_loadu_ps(q.as_ptr().add(i));
                for (key, &kv) in kv.iter().enumerate() {
                    let a = &mut acc[BLOCK * head + key];
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(qv, kv));
                }
            }
            i += LANES;
        }
        // 16 -> 8 lanes: r[j] holds acc[2j] in lanes 0..8 and acc[2j + 1] in lanes 8..16.
        let r: [__m512; 8] = std::array::from_fn(|j| {
            let (a, b) = (acc[2 * j], acc[2 * j + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            )
        });
        // 8 -> 4: s[j] holds acc[4j + b] in 128-bit block b.
        let s: [__m512; 4] = std::array::from_fn(|j| {
            let (a, b) = (r[2 * j], r[2 * j + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        });
        // 4 -> 2: t[j], block b: two lanes of acc[8j + b], then two of acc[8j + 4 + b].
        let t: [__m512; 2] = std::array::from_fn(|j| {
            let (a, b) = (s[2 * j], s[2 * j + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
                _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
            )
        });
        // 2 -> 1: lane 4b + i is acc[4i + b], i.e. head i against key b: dots[4 * key + head].
        let u = _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(t[0], t[1]),
            _mm512_shuffle_ps::<0b11_01_11_01>(t[0], t[1]),
        );
        _mm512_storeu_ps(dots.as_mut_ptr(), u);
        if whole < len {
            for (key, k) in k.iter().enumerate() {
                for (head, q) in q.iter().enumerate() {
                    let dot = &mut dots[BLOCK * key + head];
                    for (x, y) in q[whole..].iter().zip(&k[whole..]) {
                        *dot += x * y;
                    }
                }
            }
        }
    }

    /// [`super::values`] with the sums of up to 4 heads x 64 floats held in registers across the keys.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `w` and `v` have one entry per key, every value row and output the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn values_avx512(w: &[[f32; BLOCK]], v: &[&[f32]], out: &mut [&mut [f32]]) {
        let all = v;
        let heads = out.len();
        let d = out.first().map_or(0, |o| o.len());
        let mut c0 = 0;
        while c0 < d {
            // Up to 4 registers of one chunk of 64 columns; the last chunk's lanes past d are masked.
            let masks: [__mmask16; 4] = std::array::from_fn(|j| {
                let left = d.saturating_sub(c0 + LANES * j).min(LANES);
                ((1u32 << left) - 1) as __mmask16
            });
            let mut acc = [[_mm512_setzero_ps(); 4]; BLOCK];
            for (i, (w, v)) in w.iter().zip(v).enumerate() {
                if let Some(ahead) = all.get(i + super::AHEAD * BLOCK) {
                    for line in (c0..(c0 + 4 * LANES).min(d)).step_by(LANES) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.as_ptr().add(line) as *const i8);
                    }
                }
                let row: [__m512; 4] = std::array::from_fn(|j| {
                    _mm512_maskz_loadu_ps(masks[j], v.as_ptr().add(c0 + LANES * j))
                });
                for (acc, &w) in acc.iter_mut().zip(w).take(heads) {
                    let w = _mm512_set1_ps(w);
                    for (a, &x) in acc.iter_mut().zip(&row) {
                        *a = _mm512_add_ps(*a, _mm512_mul_ps(w, x));
                    }
                }
            }
            for (acc, out) in acc.iter().zip(out.iter_mut()) {
                for (j, &a) in acc.iter().enumerate() {
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(c0 + LANES * j), masks[j], a);
                }
            }
            c0 += 4 * LANES;
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
        // Head dims of whole 16-lane chunks and with a tail, past one 64-float chunk of values; GQA groups of
        // one block of 4 heads, less than one, and one and a half.
        for (d, h, h_kv) in [(64, 8, 2), (20, 8, 2), (128, 2, 2), (16, 6, 1), (72, 6, 3)] {
            row_and_isa_invariance(d, h, h_kv)?;
        }
        Ok(())
    }

    fn row_and_isa_invariance(d: usize, h: usize, h_kv: usize) -> Result<()> {
        let (b, t, past) = (6, 2, 40);
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
        // Row 3, position 1, every KV head's task in turn.
        let runs: Vec<Vec<f32>> = Isa::available()
            .iter()
            .map(|isa| {
                let mut out = vec![0f32; h * d];
                for (kv_head, out) in out.chunks_exact_mut(shape.group * d).enumerate() {
                    let task = Task {
                        q: &q_all[(3 * h * t + 1) * d..],
                        k: kk,
                        v: vv,
                        mask: &mask_all[(3 * t + 1) * s..][..s],
                        batch: 3,
                        kv_head,
                    };
                    isa.run(&shape, &task, &mut Scratch::default(), out);
                }
                out
            })
            .collect();
        for run in &runs[1..] {
            assert_eq!(run, &runs[0], "head dim {d}, {h} heads over {h_kv}");
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
