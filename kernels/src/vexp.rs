//! `exp` over f32 slices (the sampler's passes over the vocabulary): vectorized, and bit-identical on every
//! instruction set ([`crate::Isa`]).
//!
//! [`exp_shifted`] writes `exp(value * scale - shift)` of a slice and returns its sum, [`exp_sum`] returns
//! the same sum without writing, [`log_sum_exp`] and [`max`] build on them, and [`inverse_cdf`] draws from
//! what [`exp_shifted`] wrote. Every entry is an independent Cephes-style `expf`: range reduction
//! `x = n ln2 + r` with `n = round(x log2 e)` (`|r| <= ln2 / 2`), a degree-5 polynomial for
//! `(exp(r) - 1 - r) / r^2`, and `2^n` put into the exponent bits. Relative error is below `2e-7` (about 8e-8
//! at worst) wherever the result is a normal f32. Inputs below `ln(f32::MIN_POSITIVE)` (about -87.34, -inf
//! included) give exactly 0, so no subnormal is ever produced; inputs above 88 saturate to `exp(88)` (about
//! 1.65e38, finite); NaN gives 0.
//!
//! The sums are accumulated in f64 in a fixed order: 16 lane partials (entry `i` of a block goes to lane
//! `i % 16`) per block of [`BLOCK`] entries, added in lane order into the block's sum; the total is the block
//! sums added in order. The code is written once over `[f32; 16]` lane arrays with `mul_add` (a
//! correctly rounded FMA) and no other rounding step than IEEE basic operations, then compiled three times:
//! for AVX-512F, for AVX2 + FMA, and plain (whose `mul_add` may be a libm `fmaf` call on x86-64 CPUs without
//! FMA). The copy for the CPU is picked at run time, and all three give the same bits.

use crate::isa::Isa;

/// Entries per step: the loops work on `[f32; LANES]` arrays, one AVX-512 register or two AVX2 ones.
const LANES: usize = 16;

/// Entries per block of [`exp_shifted`]'s block sums.
pub const BLOCK: usize = 256;

/// `log2(e)`, the factor of the range reduction.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `ln 2 = LN2_HI + LN2_LO`, split as in Cephes (`LN2_HI` has 9 significant bits).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 * 2^23`: adding it rounds a float of magnitude `< 2^22` to an integer (ties to even), which then sits
/// in the low mantissa bits.
const ROUNDER: f32 = 12_582_912.0;
/// The smallest f32 whose `exp` is a normal f32 (`ln(f32::MIN_POSITIVE) = -87.3365447...`, rounded up).
const X_MIN: f32 = -87.336_54;
/// Inputs above this saturate: `exp(88)` still fits in an f32 with `n <= 127`.
const X_MAX: f32 = 88.0;
/// Cephes `expf` polynomial, highest degree first: `exp(r) ~ 1 + r + r^2 * P(r)`.
const POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5, // 5.0000001201e-1 in Cephes, 0.5 in f32
];

/// `exp(x)` of one entry, without branches; see the module docs for the range.
#[inline(always)]
pub(crate) fn exp1(x: f32) -> f32 {
    // `x >= X_MIN` is false for NaN, and `max` maps NaN to X_MIN (`clamp` would keep it): every lane computes
    // on a finite input.
    let keep = x >= X_MIN;
    #[allow(clippy::manual_clamp)]
    let x = x.max(X_MIN).min(X_MAX);
    let t = x.mul_add(LOG2_E, ROUNDER);
    let n = t - ROUNDER;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let p = POLY[1..].iter().fold(POLY[0], |p, &c| p.mul_add(r, c));
    let y = p.mul_add(r * r, r) + 1.0;
    // `n` in [-126, 127] is the low mantissa bits of `t`: `2^n` has the biased exponent `n + 127` in [1, 254].
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    let two_to_n = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
    f32::from_bits((y * two_to_n).to_bits() & (keep as u32).wrapping_neg())
}

/// `exp(v * scale - shift)` of 16 entries, the argument rounded once (`mul_add`).
#[inline(always)]
fn exp_lanes(values: &[f32; LANES], scale: f32, shift: f32) -> [f32; LANES] {
    let mut out = [0f32; LANES];
    for (o, &v) in out.iter_mut().zip(values) {
        *o = exp1(v.mul_add(scale, -shift));
    }
    out
}

/// Adds 16 entries into the lane partials.
#[inline(always)]
fn accumulate(partials: &mut [f64; LANES], exps: &[f32; LANES]) {
    for (p, &e) in partials.iter_mut().zip(exps) {
        *p += e as f64;
    }
}

/// The lane partials added in lane order. (A pairwise tree here leads LLVM's SLP vectorizer to pack the
/// partials in pairs of lanes across the whole block loop, with shuffles; this keeps them in two vectors.)
#[inline(always)]
fn combine(partials: [f64; LANES]) -> f64 {
    partials.iter().fold(0.0, |sum, &p| sum + p)
}

/// One block (at most [`BLOCK`] entries): writes the exps into `out` (same length) when given, returns their
/// sum.
#[inline(always)]
fn block(values: &[f32], scale: f32, shift: f32, out: Option<&mut [f32]>) -> f64 {
    let mut partials = [0f64; LANES];
    let (chunks, tail) = values.as_chunks::<LANES>();
    // The tail, padded with -inf (whose exp is 0) to a full step.
    let tail_exps = (!tail.is_empty()).then(|| {
        let mut padded = [f32::NEG_INFINITY; LANES];
        padded[..tail.len()].copy_from_slice(tail);
        exp_lanes(&padded, scale, shift)
    });
    match out {
        Some(out) => {
            let (out_chunks, out_tail) = out.as_chunks_mut::<LANES>();
            for (o, v) in out_chunks.iter_mut().zip(chunks) {
                let exps = exp_lanes(v, scale, shift);
                accumulate(&mut partials, &exps);
                *o = exps;
            }
            if let Some(exps) = &tail_exps {
                out_tail.copy_from_slice(&exps[..out_tail.len()]);
            }
        }
        None => {
            for v in chunks {
                accumulate(&mut partials, &exp_lanes(v, scale, shift));
            }
        }
    }
    if let Some(exps) = &tail_exps {
        accumulate(&mut partials, exps);
    }
    combine(partials)
}

/// The whole pass: `out` (as long as `values`) and `block_sums` (one per block) filled when given.
#[inline(always)]
fn pass(values: &[f32], scale: f32, shift: f32, out: Option<(&mut [f32], &mut [f64])>) -> f64 {
    let mut total = 0.0;
    match out {
        Some((out, block_sums)) => {
            let blocks = values.chunks(BLOCK).zip(out.chunks_mut(BLOCK));
            for ((v, o), sum) in blocks.zip(block_sums) {
                *sum = block(v, scale, shift, Some(o));
                total += *sum;
            }
        }
        None => {
            for v in values.chunks(BLOCK) {
                total += block(v, scale, shift, None);
            }
        }
    }
    total
}

/// [`block`] writing the exps over `values` (scale 1): the same exps and the same sum.
#[inline(always)]
fn block_in_place(values: &mut [f32], shift: f32) -> f64 {
    let mut partials = [0f64; LANES];
    let (chunks, tail) = values.as_chunks_mut::<LANES>();
    for v in chunks {
        let exps = exp_lanes(v, 1.0, shift);
        accumulate(&mut partials, &exps);
        *v = exps;
    }
    if !tail.is_empty() {
        let mut padded = [f32::NEG_INFINITY; LANES];
        padded[..tail.len()].copy_from_slice(tail);
        let exps = exp_lanes(&padded, 1.0, shift);
        accumulate(&mut partials, &exps);
        tail.copy_from_slice(&exps[..tail.len()]);
    }
    combine(partials)
}

/// [`pass`] at scale 1 writing the exps over `values`: the same exps and total, bit for bit.
#[inline(always)]
fn pass_in_place(values: &mut [f32], shift: f32) -> f64 {
    // A loop, not a closure: a closure is compiled without the caller's target features.
    let mut total = 0.0;
    for v in values.chunks_mut(BLOCK) {
        total += block_in_place(v, shift);
    }
    total
}

/// [`softmax_in_place`]'s body: the shift, the exps in place, each divided by their total in f64.
#[inline(always)]
fn softmax_lanes(values: &mut [f32]) {
    let max = max_lanes(values);
    let total = pass_in_place(values, max);
    for v in values.iter_mut() {
        *v = (*v as f64 / total) as f32;
    }
}

/// The largest entry, ignoring NaN (`-inf` for an empty slice).
#[inline(always)]
fn max_lanes(values: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let (chunks, tail) = values.as_chunks::<LANES>();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.max(v);
        }
    }
    tail.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

impl Isa {
    /// [`pass`] compiled for this instruction set.
    pub(crate) fn pass(
        self,
        values: &[f32],
        scale: f32,
        shift: f32,
        out: Option<(&mut [f32], &mut [f64])>,
    ) -> f64 {
        match self {
            // SAFETY: `detect` (or the test that lists the instruction sets) found the features on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::avx512_pass(values, scale, shift, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::avx2_pass(values, scale, shift, out) },
            Isa::Portable => pass(values, scale, shift, out),
        }
    }

    /// [`softmax_lanes`] compiled for this instruction set.
    pub(crate) fn softmax(self, values: &mut [f32]) {
        match self {
            // SAFETY: as in `pass`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::avx512_softmax(values) },
            // SAFETY: as in `pass`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::avx2_softmax(values) },
            Isa::Portable => softmax_lanes(values),
        }
    }

    /// [`max_lanes`] compiled for this instruction set.
    pub(crate) fn max(self, values: &[f32]) -> f32 {
        match self {
            // SAFETY: as in `pass`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::avx512_max(values) },
            // SAFETY: as in `pass`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::avx2_max(values) },
            Isa::Portable => max_lanes(values),
        }
    }
}

/// The same bodies compiled with the x86 vector extensions enabled.
#[cfg(target_arch = "x86_64")]
mod x86 {
    /// [`super::pass`] with AVX-512F (which implies AVX2 and FMA); the CPU must have it.
    #[target_feature(enable = "avx512f")]
    pub(super) fn avx512_pass(
        values: &[f32],
        scale: f32,
        shift: f32,
        out: Option<(&mut [f32], &mut [f64])>,
    ) -> f64 {
        super::pass(values, scale, shift, out)
    }

    /// [`super::pass`] with AVX2 and FMA; the CPU must have them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn avx2_pass(
        values: &[f32],
        scale: f32,
        shift: f32,
        out: Option<(&mut [f32], &mut [f64])>,
    ) -> f64 {
        super::pass(values, scale, shift, out)
    }

    /// [`super::softmax_lanes`] with AVX-512F; the CPU must have it.
    #[target_feature(enable = "avx512f")]
    pub(super) fn avx512_softmax(values: &mut [f32]) {
        super::softmax_lanes(values)
    }

    /// [`super::softmax_lanes`] with AVX2 and FMA; the CPU must have them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn avx2_softmax(values: &mut [f32]) {
        super::softmax_lanes(values)
    }

    /// [`super::max_lanes`] with AVX-512F; the CPU must have it.
    #[target_feature(enable = "avx512f")]
    pub(super) fn avx512_max(values: &[f32]) -> f32 {
        super::max_lanes(values)
    }

    /// [`super::max_lanes`] with AVX2 and FMA; the CPU must have them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn avx2_max(values: &[f32]) -> f32 {
        super::max_lanes(values)
    }
}

/// Writes `out[i] = exp(values[i] * scale - shift)` (the argument rounded once) and `block_sums[b]`, the sum of
/// block `b` (entries `b * BLOCK ..`), and returns the block sums added in order: the total the draw walks.
pub fn exp_shifted(
    values: &[f32],
    scale: f32,
    shift: f32,
    out: &mut Vec<f32>,
    block_sums: &mut Vec<f64>,
) -> f64 {
    // Every entry is overwritten: no need to clear.
    out.resize(values.len(), 0.0);
    block_sums.resize(values.len().div_ceil(BLOCK), 0.0);
    Isa::detect().pass(
        values,
        scale,
        shift,
        Some((out.as_mut_slice(), block_sums.as_mut_slice())),
    )
}

/// Softmax of `values` in place, the way [`crate::cached_attention`] weighs its keys: the largest entry
/// (ignoring NaN) as the shift, the exps and their total as [`exp_shifted`] at scale 1 makes them, then each
/// exp divided by the total in f64. `-inf` entries (masked keys) get exactly 0. A row with no finite entry
/// becomes NaN (`0 / 0`), as `exp(x - max) / sum` does.
pub fn softmax_in_place(values: &mut [f32]) {
    Isa::detect().softmax(values)
}

/// The total [`exp_shifted`] returns, bit for bit, without writing the exps.
pub fn exp_sum(values: &[f32], scale: f32, shift: f32) -> f64 {
    Isa::detect().pass(values, scale, shift, None)
}

/// The largest entry of `values`, ignoring NaN; `-inf` when empty.
pub fn max(values: &[f32]) -> f32 {
    Isa::detect().max(values)
}

/// `ln(sum(exp(v * scale)))` over `values`, shifted by the largest `v * scale` and accumulated in f64: what
/// `max + ln(total)` gives for [`exp_shifted`]`(values, 1, max)` when `scale` is 1. `-inf` entries count 0;
/// `-inf` for an empty slice. `scale` must be positive and the entries finite or `-inf`.
pub fn log_sum_exp(values: &[f32], scale: f32) -> f64 {
    let max = max(values);
    // `max * scale` is the largest `v * scale` (scale > 0), rounded as `exp1`'s argument is.
    let shift = max * scale;
    if !shift.is_finite() {
        return shift as f64;
    }
    shift as f64 + exp_sum(values, scale, shift).ln()
}

/// The inverse CDF at `target`: the first token whose cumulative weight (in token-id order, in f64) exceeds
/// `target`, for the `weights` and `block_sums` [`exp_shifted`] wrote and a `target` below its total. The walk
/// adds whole blocks until the next one would pass `target`, then the tokens of that block; the block prefix
/// ends at the total exactly. When rounding leaves the sum `<= target` (past the last block, or in a block
/// whose tokens add up a hair below its sum), the last token of that block with a positive weight is taken.
/// `None` when every weight is 0.
pub fn inverse_cdf(weights: &[f32], block_sums: &[f64], target: f64) -> Option<usize> {
    let last_kept = |(start, block): (usize, &[f32])| {
        let kept = block.iter().rposition(|&w| w > 0.0);
        kept.map(|i| start + i)
    };
    let mut acc = 0.0;
    let mut last_block = None;
    let blocks = weights.chunks(BLOCK).zip(block_sums).enumerate();
    for (b, (block, &sum)) in blocks {
        let start = b * BLOCK;
        if sum <= 0.0 {
            continue;
        }
        if acc + sum > target {
            for (i, &w) in block.iter().enumerate() {
                acc += w as f64;
                if w > 0.0 && acc > target {
                    return Some(start + i);
                }
            }
            return last_kept((start, block));
        }
        acc += sum;
        last_block = Some((start, block));
    }
    last_block.and_then(last_kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every f32 in `[lo, hi]` (same sign), stepping `stride` bit patterns.
    fn sweep(lo: f32, hi: f32, stride: usize) -> Vec<f32> {
        let (a, b) = (
            lo.to_bits().min(hi.to_bits()),
            lo.to_bits().max(hi.to_bits()),
        );
        (a..=b).step_by(stride).map(f32::from_bits).collect()
    }

    fn exps(values: &[f32]) -> Vec<f32> {
        let (mut out, mut sums) = (Vec::new(), Vec::new());
        exp_shifted(values, 1.0, 0.0, &mut out, &mut sums);
        out
    }

    #[test]
    fn relative_error_is_below_2e_7_over_the_normal_range() {
        // About 2.6 million points in [X_MIN, 0] and 1.3 million in [0, 88], plus the ends.
        let mut xs = sweep(-0.0, X_MIN, 397);
        xs.extend(sweep(0.0, X_MAX, 797));
        xs.extend([X_MIN, -87.0, -1e-30, 0.0, 1e-30, 87.9, X_MAX]);
        let mut worst = (0.0f64, 0.0f32);
        for (&x, &e) in xs.iter().zip(&exps(&xs)) {
            let exact = (x as f64).exp();
            assert!(e.is_normal(), "exp({x}) = {e} is not a normal float");
            let err = ((e as f64 - exact) / exact).abs();
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(worst.0 <= 2e-7, "relative error {} at {}", worst.0, worst.1);
    }

    #[test]
    fn special_inputs() {
        let below = [
            f32::NEG_INFINITY,
            f32::MIN,
            -1e30,
            -104.0,
            -103.9,
            -88.0,
            -87.4,
            f32::from_bits(X_MIN.to_bits() + 1), // the next f32 below X_MIN
        ];
        for (x, e) in below.iter().zip(exps(&below)) {
            assert_eq!(e.to_bits(), 0, "exp({x}) = {e}, expected +0");
        }
        assert_eq!(exps(&[0.0, -0.0]), [1.0, 1.0]);
        assert!(exps(&[X_MIN])[0] >= f32::MIN_POSITIVE);
        let saturated = exps(&[88.0, 100.0, f32::MAX, f32::INFINITY]);
        assert!(saturated
            .iter()
            .all(|&e| e == saturated[0] && e.is_finite()));
        assert_eq!(exps(&[f32::NAN]), [0.0]);
    }

    #[test]
    fn sums_are_blockwise_and_agree_with_the_exps() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for len in [0, 1, 15, 16, 17, 255, 256, 257, 1000, 4096] {
            let values: Vec<f32> = (0..len).map(|_| rng.gen_range(-30.0..5.0)).collect();
            let (mut out, mut sums) = (Vec::new(), Vec::new());
            let total = exp_shifted(&values, 0.5, 2.0, &mut out, &mut sums);
            assert_eq!(out.len(), len);
            assert_eq!(sums.len(), len.div_ceil(BLOCK));
            assert_eq!(total, sums.iter().fold(0.0, |t, s| t + s));
            assert_eq!(total.to_bits(), exp_sum(&values, 0.5, 2.0).to_bits());
            for (block, &sum) in out.chunks(BLOCK).zip(&sums) {
                let serial: f64 = block.iter().map(|&e| e as f64).sum();
                assert!((serial - sum).abs() <= 1e-12 * sum, "{serial} vs {sum}");
            }
            for (&v, &e) in values.iter().zip(&out) {
                // The argument is rounded once to f32, then exp'd within 2e-7.
                let exact = (v.mul_add(0.5, -2.0) as f64).exp();
                assert!(
                    ((e as f64 - exact) / exact).abs() <= 2e-7,
                    "{v}: {e} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn log_sum_exp_and_max_match_f64() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut values: Vec<f32> = (0..3000).map(|_| rng.gen_range(-20.0..20.0)).collect();
        values[7] = f32::NEG_INFINITY;
        let expected_max = values.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        assert_eq!(max(&values), expected_max);
        for scale in [1.0f32, 0.7, 1.6] {
            let m = expected_max as f64 * scale as f64;
            let exact = m + values
                .iter()
                .map(|&v| (v as f64 * scale as f64 - m).exp())
                .sum::<f64>()
                .ln();
            let ours = log_sum_exp(&values, scale);
            assert!(
                (ours - exact).abs() < 1e-6,
                "scale {scale}: {ours} vs {exact}"
            );
        }
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[], 1.0), f64::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3], 1.0), f64::NEG_INFINITY);
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut values: Vec<f32> = (0..5003).map(|_| rng.gen_range(-110.0..95.0)).collect();
        values.extend(sweep(-0.0, X_MIN, 100_003));
        values.extend([f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 0.0, -0.0, X_MIN]);
        let mut first = None;
        for isa in Isa::available() {
            let mut out = vec![0f32; values.len()];
            let mut sums = vec![0f64; values.len().div_ceil(BLOCK)];
            let total = isa.pass(&values, 1.25, 3.5, Some((&mut out[..], &mut sums[..])));
            let bits = (
                out.iter().map(|e| e.to_bits()).collect::<Vec<_>>(),
                sums.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
                total.to_bits(),
                isa.pass(&values, 1.25, 3.5, None).to_bits(),
                isa.max(&values).to_bits(),
            );
            match &first {
                None => first = Some(bits),
                Some(expected) => assert!(bits == *expected, "{isa:?} differs from the plain code"),
            }
        }
    }

    #[test]
    fn the_softmax_is_the_pass_exps_over_their_total_on_every_instruction_set() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        for len in [1, 15, 16, 17, 255, 256, 257, 1000] {
            let mut values: Vec<f32> = (0..len).map(|_| rng.gen_range(-30.0..30.0)).collect();
            // Masked keys, as attention's -inf mask leaves them.
            for v in values.iter_mut().step_by(3) {
                *v = f32::NEG_INFINITY;
            }
            values[len - 1] = 4.0;
            for isa in Isa::available() {
                // The in-place softmax: `pass`'s exps (as the sampler and cached attention make them) over
                // their total.
                let max = isa.max(&values);
                let mut out = vec![0f32; len];
                let mut sums = vec![0f64; len.div_ceil(BLOCK)];
                let total = isa.pass(&values, 1.0, max, Some((&mut out[..], &mut sums[..])));
                let mut in_place = values.clone();
                isa.softmax(&mut in_place);
                assert!(
                    out.iter()
                        .zip(&in_place)
                        .all(|(e, p)| ((*e as f64 / total) as f32).to_bits() == p.to_bits()),
                    "{isa:?} {len}: the softmax is not pass's exps over their total"
                );
            }
            let mut soft = values.clone();
            softmax_in_place(&mut soft);
            for isa in Isa::available() {
                let mut other = values.clone();
                isa.softmax(&mut other);
                assert!(
                    other
                        .iter()
                        .zip(&soft)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} {len}: the softmax differs"
                );
            }
            let m = values.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = values.iter().map(|&v| (v as f64 - m).exp()).sum();
            for (&v, &p) in values.iter().zip(&soft) {
                let want = (v as f64 - m).exp() / sum;
                // `v - max` is rounded to f32 (relative 2^-24), which exp turns into an error of that times
                // `|v - max|`; then vexp's 2e-7 and the division's rounding.
                if v == f32::NEG_INFINITY {
                    assert_eq!(p.to_bits(), 0, "a masked entry is +0");
                    continue;
                }
                let tolerance = 4e-7 + 6e-8 * (v as f64 - m).abs();
                assert!(
                    (p as f64 - want).abs() <= tolerance * want,
                    "{v}: {p} vs {want}"
                );
            }
        }
        // No finite entry: NaN, as exp(x - max) / sum gives.
        let mut masked = [f32::NEG_INFINITY; 5];
        softmax_in_place(&mut masked);
        assert!(masked.iter().all(|p| p.is_nan()));
    }

    #[test]
    fn inverse_cdf_walks_blocks_then_tokens() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // 4 blocks, the last one partial; a quarter of the tokens removed, and the last 20 too.
        let mut values: Vec<f32> = (0..1000)
            .map(|_| match rng.gen_range(0..4) {
                0 => f32::NEG_INFINITY,
                _ => rng.gen_range(-8.0..0.0),
            })
            .collect();
        values[980..].fill(f32::NEG_INFINITY);
        let (mut weights, mut sums) = (Vec::new(), Vec::new());
        let total = exp_shifted(&values, 1.0, 0.0, &mut weights, &mut sums);
        let serial = |target: f64| {
            let mut acc = 0.0;
            weights.iter().position(|&w| {
                acc += w as f64;
                w > 0.0 && acc > target
            })
        };
        for _ in 0..10_000 {
            let target = rng.gen::<f64>() * total;
            let token = inverse_cdf(&weights, &sums, target);
            assert_eq!(token, serial(target), "target {target}");
        }
        let first_kept = weights.iter().position(|&w| w > 0.0);
        let last_kept = weights.iter().rposition(|&w| w > 0.0);
        assert_eq!(inverse_cdf(&weights, &sums, 0.0), first_kept);
        assert_eq!(inverse_cdf(&weights, &sums, total), last_kept);
        assert_eq!(inverse_cdf(&weights, &sums, 2.0 * total), last_kept);
        assert_eq!(inverse_cdf(&[0.0; 300], &[0.0, 0.0], 0.0), None);
        assert_eq!(inverse_cdf(&[], &[], 0.0), None);
    }
}
