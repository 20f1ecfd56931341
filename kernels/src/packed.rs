//! Inference-only linear layer for the CPU decode loop: `x (M, K) @ W^T + b` with `W (N, K)` packed once into
//! column panels, so a matmul streams the weights in order instead of re-packing them on every call.
//!
//! Layout: the N output columns are cut into panels of [`PANEL`] (the last one zero-padded); panel `p` holds
//! `W[p*PANEL + j, kk]` at `panel[p][kk * PANEL + j]`, so one step of `kk` reads 32 consecutive floats.
//! A matmul walks the panels (split across the rayon pool), the depth in chunks that stay in L1, and the rows
//! of `x` in blocks held in registers (AVX-512: 12 rows x 32 columns; AVX2 + FMA: 6 rows x 16 columns).
//!
//! Every output element is `bias + fma(x[kk], w[kk], ...)` summed in increasing `kk`, one fused multiply-add
//! at a time, whatever M, the row block, the number of threads or the instruction set: a row's result does not
//! depend on the batch it runs in (generation relies on this for its determinism). Partial sums cross chunk
//! boundaries through memory as f32, which is exact.
//!
//! There is no backward: [`PackedMatmul`] is applied with `apply_op1_no_bwd`, and only models that are not
//! trained (the policy generator's snapshot, `r1v2 generate`) pack their weights.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::isa::Isa;

/// Output columns per packed panel.
pub const PANEL: usize = 32;
/// Depth of one chunk: a 64 KiB slice of a panel, read from memory by the first row block and from L2 by the
/// others. Accumulators cross chunk boundaries through memory, so deeper chunks spill less: 512 runs a decode
/// step's matmuls ~15% faster than 128 at 32 rows on one thread (`examples/bench_matmul`, AMD EPYC).
const DEPTH_CHUNK: usize = 512;
/// Below this many multiply-adds a matmul runs on the calling thread (a rayon fork costs more).
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// A weight matrix `(N, K)` (and optional bias `(N)`) packed into column panels; see the module doc.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    n: usize,
    k: usize,
    /// `ceil(N / PANEL)` panels of `K * PANEL` floats.
    panels: Vec<f32>,
    /// The bias, zero-padded to whole panels.
    bias: Option<Vec<f32>>,
}

impl PackedMatrix {
    /// Packs `weight` (N, K) row-major and `bias` (N).
    pub fn pack(weight: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Result<Self> {
        if weight.len() != n * k {
            candle_core::bail!(
                "PackedMatrix: {} weights for a ({n}, {k}) matrix",
                weight.len()
            );
        }
        if let Some(bias) = bias {
            if bias.len() != n {
                candle_core::bail!("PackedMatrix: {} biases for {n} outputs", bias.len());
            }
        }
        let num_panels = n.div_ceil(PANEL);
        let mut panels = vec![0f32; num_panels * k * PANEL];
        panels
            .par_chunks_mut((k * PANEL).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..PANEL.min(n - p * PANEL) {
                    let row = &weight[(p * PANEL + j) * k..][..k];
                    for (kk, &w) in row.iter().enumerate() {
                        panel[kk * PANEL + j] = w;
                    }
                }
            });
        let bias = bias.map(|b| {
            let mut padded = b.to_vec();
            padded.resize(num_panels * PANEL, 0.0);
            padded
        });
        Ok(Self { n, k, panels, bias })
    }

    /// Packs a 2-D f32 weight tensor (N, K) and an optional bias (N), wherever they live (copied to host memory).
    pub fn from_tensors(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let weight = weight.flatten_all()?.to_vec1::<f32>()?;
        let bias = bias
            .map(|b| b.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        Self::pack(&weight, n, k, bias.as_deref())
    }

    /// `out (M, N) = x (M, K) @ W^T + b`, both row-major; every element of `out` is overwritten.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        self.matmul_with(Isa::detect(), x, m, out)
    }

    /// [`Self::matmul`] into a new `(M, N)` buffer, which is written once (not zero-filled first).
    pub fn matmul_vec(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.check(x, m)?;
        let len = m * self.n;
        let mut out = Vec::with_capacity(len);
        // SAFETY: `x` holds (m, k) floats (checked) and `out` has room for m * n, every one of which `write`
        // initializes before the length is set.
        unsafe {
            self.write(Isa::detect(), x, m, out.as_mut_ptr());
            out.set_len(len);
        }
        Ok(out)
    }

    fn check(&self, x: &[f32], m: usize) -> Result<()> {
        if x.len() != m * self.k {
            candle_core::bail!(
                "PackedMatrix::matmul: x has {} floats, expected ({m}, {})",
                x.len(),
                self.k
            );
        }
        Ok(())
    }

    fn matmul_with(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        self.check(x, m)?;
        if out.len() != m * self.n {
            candle_core::bail!(
                "PackedMatrix::matmul: out has {} floats, expected ({m}, {})",
                out.len(),
                self.n
            );
        }
        // SAFETY: both lengths were checked.
        unsafe { self.write(isa, x, m, out.as_mut_ptr()) };
        Ok(())
    }

    /// Writes every element of `out (M, N)`.
    ///
    /// # Safety
    /// `x` holds m rows of k floats and `out` has room for m rows of n floats (it may be uninitialized).
    unsafe fn write(&self, isa: Isa, x: &[f32], m: usize, out: *mut f32) {
        let (n, k) = (self.n, self.k);
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            // No depth: the bias alone (the kernels below would not run).
            for r in 0..m {
                for j in 0..n {
                    *out.add(r * n + j) = self.bias.as_ref().map_or(0.0, |b| b[j]);
                }
            }
            return;
        }
        let out_ptr = SendPtr(out);
        let num_panels = n.div_ceil(PANEL);
        let run = |panels: std::ops::Range<usize>| {
            for p in panels {
                // SAFETY: panel `p` writes only output columns p*PANEL..min(n, (p+1)*PANEL) of each of the m
                // rows, inside `out` (m * n floats), and no two tasks share a panel; `x` and the panels are
                // read within their lengths (the caller's contract and construction). The first depth chunk
                // writes before anything reads, so `out` may start uninitialized.
                unsafe { self.panel_matmul(isa, p, x, m, out_ptr) };
            }
        };
        let threads = rayon::current_num_threads();
        if m * n * k < PARALLEL_MIN_WORK || threads == 1 || num_panels == 1 {
            run(0..num_panels);
        } else {
            // A few tasks per thread so that uneven panels balance; contiguous panel ranges per task.
            let tasks = (threads * 4).min(num_panels);
            (0..tasks).into_par_iter().for_each(|t| {
                run(t * num_panels / tasks..(t + 1) * num_panels / tasks);
            });
        }
    }

    /// One panel of output columns for all m rows.
    ///
    /// # Safety
    /// `x` holds m rows of k floats, `out` points at m rows of n floats, and no other thread writes this panel's
    /// columns.
    unsafe fn panel_matmul(&self, isa: Isa, p: usize, x: &[f32], m: usize, out: SendPtr) {
        let (n, k) = (self.n, self.k);
        let cols = PANEL.min(n - p * PANEL);
        let panel = self.panels.as_ptr().add(p * k * PANEL);
        let bias = self.bias.as_ref().map(|b| b.as_ptr().add(p * PANEL));
        let out = out.0.add(p * PANEL);
        let rows_per_block = isa.rows_per_block();
        let blocks = m.div_ceil(rows_per_block);
        let mut k0 = 0;
        while k0 < k {
            let kc = DEPTH_CHUNK.min(k - k0);
            let mut step = Step {
                w: panel.add(k0 * PANEL),
                prefetch: std::ptr::null(),
                prefetch_every: blocks,
                kc,
                ldx: k,
                ldo: n,
                cols,
                first: k0 == 0,
                bias: if k0 + kc == k { bias } else { None },
            };
            let mut r0 = 0;
            for block in 0..blocks {
                let rows = rows_per_block.min(m - r0);
                // Block `block` of `blocks` requests its share of a chunk further on in the packed stream (the
                // panels are contiguous, so that may be the next panel's), one depth step every `blocks`
                // iterations: the requests spread over the whole chunk instead of bursting in one block.
                // Prefetches never fault; an address past the panels is a hint that is not dereferenced.
                step.prefetch = step.w.wrapping_add(
                    (step.prefetch_chunks() * DEPTH_CHUNK + block * kc / blocks) * PANEL,
                );
                isa.block(rows, x.as_ptr().add(r0 * k + k0), out.add(r0 * n), &step);
                r0 += rows;
            }
            k0 += kc;
        }
    }
}

/// `*mut f32` that crosses rayon tasks; each task writes its own panels' columns.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges (see `PackedMatrix::matmul`).
unsafe impl Send for SendPtr {}
// SAFETY: as above; the pointer is only read (copied) across threads.
unsafe impl Sync for SendPtr {}

/// One depth chunk of one panel: the operands every row block of it shares.
struct Step {
    /// The chunk's first packed row: `kc` rows of `PANEL` floats.
    w: *const f32,
    /// Where to start prefetching (only a hint: may point past the panels).
    prefetch: *const f32,
    /// Prefetch one depth step (`PANEL` floats, 2 cache lines) every this many steps of the chunk; the number
    /// of row blocks that share the chunk.
    prefetch_every: usize,
    kc: usize,
    /// Row strides of x and out.
    ldx: usize,
    ldo: usize,
    /// Valid output columns of this panel (the last panel may be partial).
    cols: usize,
    /// The first chunk starts from zero; later ones continue the sums stored in `out`.
    first: bool,
    /// Added after the last chunk.
    bias: Option<*const f32>,
}

impl Step {
    /// Several row blocks reuse a chunk: the next one is brought into L1 while this one runs. A single block
    /// reads each weight once: it is brought two chunks ahead into L2 only, where it does not evict the rows of
    /// `x` and the partial sums from L1 (one row block, 8 rows on 2 threads: ~20% faster than into L1).
    fn prefetch_chunks(&self) -> usize {
        if self.prefetch_every > 1 {
            1
        } else {
            2
        }
    }
}

impl Isa {
    fn rows_per_block(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => 12,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => 6,
            Isa::Portable => 4,
        }
    }

    /// `rows` (1..=rows_per_block) rows of one step.
    ///
    /// # Safety
    /// As [`PackedMatrix::panel_matmul`]: x has `rows` rows of `step.kc` floats at stride `ldx`, out has `rows`
    /// rows of `step.cols` floats at stride `ldo`.
    unsafe fn block(self, rows: usize, x: *const f32, out: *mut f32, step: &Step) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::avx512_block(rows, x, out, step),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::avx2_block(rows, x, out, step),
            Isa::Portable => portable_block(rows, x, out, step),
        }
    }
}

/// The same sums in plain Rust (one `mul_add` per term, in `kk` order), for CPUs without AVX2 + FMA.
///
/// # Safety
/// See [`Isa::block`].
unsafe fn portable_block(rows: usize, x: *const f32, out: *mut f32, step: &Step) {
    for r in 0..rows {
        let mut acc = [0f32; PANEL];
        let out_row = out.add(r * step.ldo);
        if !step.first {
            for (j, a) in acc.iter_mut().enumerate().take(step.cols) {
                *a = *out_row.add(j);
            }
        }
        for kk in 0..step.kc {
            let xv = *x.add(r * step.ldx + kk);
            let w = step.w.add(kk * PANEL);
            for (j, a) in acc.iter_mut().enumerate() {
                *a = xv.mul_add(*w.add(j), *a);
            }
        }
        for (j, a) in acc.iter().enumerate().take(step.cols) {
            *out_row.add(j) = match step.bias {
                Some(b) => a + *b.add(j),
                None => *a,
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The register-blocked kernels: `MR` rows x one panel, accumulators held in vector registers.
    use std::arch::x86_64::*;

    use super::{Step, PANEL};

    /// Dispatches `rows` to the kernel compiled for that many rows.
    macro_rules! by_rows {
        ($kernel:ident, $rows:expr, $args:tt; $($mr:literal)*) => {
            match $rows {
                $($mr => $kernel::<$mr> $args,)*
                _ => unreachable!("row block larger than the kernel's"),
            }
        };
    }

    /// Walks a block's prefetch share (see `PackedMatrix::panel_matmul`): one depth step of the panel, two cache
    /// lines, every `step.prefetch_every` calls of `tick`, into L1 when several blocks share the chunk and into
    /// L2 when one block reads it (see `Step::prefetch_chunks`).
    struct Prefetcher {
        at: *const i8,
        every: usize,
        count: usize,
    }

    impl Prefetcher {
        fn new(step: &Step) -> Self {
            Self {
                at: step.prefetch as *const i8,
                every: step.prefetch_every,
                count: 0,
            }
        }

        #[inline(always)]
        fn tick(&mut self) {
            self.count += 1;
            if self.count == self.every {
                self.count = 0;
                // SAFETY: prefetch is a hint that never faults, whatever the address.
                unsafe {
                    if self.every > 1 {
                        _mm_prefetch::<_MM_HINT_T0>(self.at);
                        _mm_prefetch::<_MM_HINT_T0>(self.at.wrapping_add(64));
                    } else {
                        _mm_prefetch::<_MM_HINT_T1>(self.at);
                        _mm_prefetch::<_MM_HINT_T1>(self.at.wrapping_add(64));
                    }
                }
                self.at = self.at.wrapping_add(PANEL * std::mem::size_of::<f32>());
            }
        }
    }

    /// # Safety
    /// See `Isa::block`; the CPU has AVX-512F.
    pub(super) unsafe fn avx512_block(rows: usize, x: *const f32, out: *mut f32, step: &Step) {
        by_rows!(avx512_rows, rows, (x, out, step); 1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// # Safety
    /// See `Isa::block`; the CPU has AVX2 and FMA.
    pub(super) unsafe fn avx2_block(rows: usize, x: *const f32, out: *mut f32, step: &Step) {
        for half in 0..2 {
            let cols = step.cols.saturating_sub(half * 16).min(16);
            if cols > 0 {
                by_rows!(avx2_rows, rows, (x, out, step, half, cols); 1 2 3 4 5 6)
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_rows<const MR: usize>(x: *const f32, out: *mut f32, step: &Step) {
        // Lanes of the partial last panel: the low `cols` of 32.
        let lanes = if step.cols >= PANEL {
            u32::MAX
        } else {
            (1u32 << step.cols) - 1
        };
        let masks = [lanes as u16 as __mmask16, (lanes >> 16) as u16 as __mmask16];
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if !step.first {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (h, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_maskz_loadu_ps(masks[h], out.add(r * step.ldo + 16 * h));
                }
            }
        }
        let mut ahead = Prefetcher::new(step);
        for kk in 0..step.kc {
            ahead.tick();
            let w0 = _mm512_loadu_ps(step.w.add(kk * PANEL));
            let w1 = _mm512_loadu_ps(step.w.add(kk * PANEL + 16));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(r * step.ldx + kk));
                acc[0] = _mm512_fmadd_ps(xv, w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(xv, w1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (h, &a) in acc.iter().enumerate() {
                let a = match step.bias {
                    Some(b) => _mm512_add_ps(a, _mm512_maskz_loadu_ps(masks[h], b.add(16 * h))),
                    None => a,
                };
                _mm512_mask_storeu_ps(out.add(r * step.ldo + 16 * h), masks[h], a);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_rows<const MR: usize>(
        x: *const f32,
        out: *mut f32,
        step: &Step,
        half: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut tile = [0f32; 16];
        let (w, out, bias) = (
            step.w.add(16 * half),
            out.add(16 * half),
            step.bias.map(|b| b.add(16 * half)),
        );
        if !step.first {
            for (r, acc) in acc.iter_mut().enumerate() {
                std::ptr::copy_nonoverlapping(out.add(r * step.ldo), tile.as_mut_ptr(), cols);
                acc[0] = _mm256_loadu_ps(tile.as_ptr());
                acc[1] = _mm256_loadu_ps(tile.as_ptr().add(8));
            }
        }
        let mut ahead = Prefetcher::new(step);
        for kk in 0..step.kc {
            if half == 0 {
                ahead.tick();
            }
            let w0 = _mm256_loadu_ps(w.add(kk * PANEL));
            let w1 = _mm256_loadu_ps(w.add(kk * PANEL + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*x.add(r * step.ldx + kk));
                acc[0] = _mm256_fmadd_ps(xv, w0, acc[0]);
                acc[1] = _mm256_fmadd_ps(xv, w1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let (mut a0, mut a1) = (acc[0], acc[1]);
            if let Some(b) = bias {
                // The bias is padded to whole panels, so 16 floats are always readable.
                a0 = _mm256_add_ps(a0, _mm256_loadu_ps(b));
                a1 = _mm256_add_ps(a1, _mm256_loadu_ps(b.add(8)));
            }
            _mm256_storeu_ps(tile.as_mut_ptr(), a0);
            _mm256_storeu_ps(tile.as_mut_ptr().add(8), a1);
            std::ptr::copy_nonoverlapping(tile.as_ptr(), out.add(r * step.ldo), cols);
        }
    }
}

/// `x (..., K) @ W^T + b -> (..., N)` on a contiguous f32 CPU tensor, as a candle op without backward.
#[derive(Debug, Clone)]
pub struct PackedMatmul<'a>(pub &'a PackedMatrix);

impl CustomOp1 for PackedMatmul<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let packed = self.0;
        let dims = layout.shape().dims();
        let Some((&k, batch)) = dims.split_last() else {
            candle_core::bail!("packed-matmul: a scalar input");
        };
        if k != packed.k {
            candle_core::bail!(
                "packed-matmul: input has {k} features, the weight {}",
                packed.k
            );
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed-matmul: the input must be contiguous");
        };
        let x = match storage {
            CpuStorage::F32(x) => &x[start..end],
            other => candle_core::bail!("packed-matmul: f32 input only, got {:?}", other.dtype()),
        };
        let m = batch.iter().product::<usize>();
        let out = packed.matmul_vec(x, m)?;
        let mut shape = batch.to_vec();
        shape.push(packed.n);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `x (..., K) -> (..., N)` through `packed` (x made contiguous first).
pub fn packed_linear(x: &Tensor, packed: &PackedMatrix) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&PackedMatmul(packed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
        (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    /// f64 reference of x @ W^T + b.
    fn reference(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|kk| x[r * k + kk] as f64 * w[j * k + kk] as f64)
                    .sum();
                out[r * n + j] = dot + b.map_or(0.0, |b| b[j] as f64);
            }
        }
        out
    }

    #[test]
    fn matches_reference_on_every_tail() -> Result<()> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Partial panels (n % 32), several depth chunks with a partial one (k > 512), every row-block tail,
        // one row block (prefetch into L2) and several (into L1), no depth at all (the bias alone).
        for &(m, n, k) in &[
            (3, 40, 0),
            (1, 5, 3),
            (13, 70, 1100),
            (25, 64, 512),
            (7, 33, 513),
            (64, 96, 40),
        ] {
            for with_bias in [false, true] {
                let (x, w, b) = (
                    random(m * k, &mut rng),
                    random(n * k, &mut rng),
                    random(n, &mut rng),
                );
                let bias = with_bias.then_some(b.as_slice());
                let packed = PackedMatrix::pack(&w, n, k, bias)?;
                let mut out = vec![f32::NAN; m * n];
                packed.matmul(&x, m, &mut out)?;
                assert_eq!(
                    packed.matmul_vec(&x, m)?,
                    out,
                    "({m}, {n}, {k}): matmul_vec"
                );
                let expected = reference(&x, &w, bias, m, n, k);
                for (i, (&got, &want)) in out.iter().zip(&expected).enumerate() {
                    let tol = 1e-5 * (k as f64).sqrt() * (1.0 + want.abs());
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "({m}, {n}, {k}) bias {with_bias}: element {i} = {got}, reference {want}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() -> Result<()> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let (n, k) = (200, 700);
        let (w, b) = (random(n * k, &mut rng), random(n, &mut rng));
        let packed = PackedMatrix::pack(&w, n, k, Some(&b))?;
        let x = random(40 * k, &mut rng);
        let mut all = vec![0f32; 40 * n];
        packed.matmul(&x, 40, &mut all)?;
        for (r, m) in [(0, 1), (3, 5), (17, 23)] {
            let mut some = vec![0f32; m * n];
            packed.matmul(&x[r * k..(r + m) * k], m, &mut some)?;
            assert_eq!(some, all[r * n..(r + m) * n], "rows {r}..{} alone", r + m);
        }
        Ok(())
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() -> Result<()> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (m, n, k) = (19, 77, 1100);
        let (x, w, b) = (
            random(m * k, &mut rng),
            random(n * k, &mut rng),
            random(n, &mut rng),
        );
        let packed = PackedMatrix::pack(&w, n, k, Some(&b))?;
        let mut first: Option<Vec<f32>> = None;
        for isa in Isa::available() {
            let mut out = vec![0f32; m * n];
            packed.matmul_with(isa, &x, m, &mut out)?;
            match &first {
                None => first = Some(out),
                Some(expected) => {
                    assert_eq!(&out, expected, "{isa:?} differs from the portable kernel")
                }
            }
        }
        Ok(())
    }

    #[test]
    fn candle_op_equals_matmul() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 48), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (40, 48), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 40, &dev)?;
        let packed = PackedMatrix::from_tensors(&w, Some(&b))?;
        let got = packed_linear(&x, &packed)?;
        let want = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        assert_eq!(got.dims(), &[2, 3, 40]);
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "max difference {diff}");
        // Non-contiguous input is made contiguous; wrong widths and dtypes are errors.
        let xt = Tensor::randn(0f32, 1.0, (48, 5), &dev)?.t()?;
        assert_eq!(packed_linear(&xt, &packed)?.dims(), &[5, 40]);
        let err = packed_linear(
            &Tensor::zeros((2, 47), candle_core::DType::F32, &dev)?,
            &packed,
        );
        assert!(err.unwrap_err().to_string().contains("47 features"));
        let err = packed_linear(&x.to_dtype(candle_core::DType::F64)?, &packed);
        assert!(err.unwrap_err().to_string().contains("f32 input only"));
        Ok(())
    }
}
