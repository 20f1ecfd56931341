//! `x @ W^T` for a weight stored `(N, K)`, as torch's `F.linear` computes it: one op whose backward hands
//! the weight its gradient `grad^T @ x` directly in the weight's own `(N, K)` layout.
//!
//! candle's composition `x.matmul(&w.t())` puts a `Transpose` node between the weight and the matmul. Its
//! backward computes the weight gradient as `x^T @ grad`, `(K, N)`, adds it to a zero tensor, then adds the
//! transposed view of that to another zero tensor: per weight, per backward, two zero fills and one
//! strided add (element by element through the strides) of the weight's size. [`Linear`] skips all three.
//! Its forward is the same storage matmul with the same operands and layouts, so the same bits; the input
//! gradient `grad @ W` is the composition's too; the weight gradient sums the same products over the rows
//! in the order the matmul's blocking gives (within rounding of the composition's). Neither gradient is
//! computed for an input that no gradient flows into (a frozen weight, an input that is not tracked).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `x (M, K) @ w (N, K)^T -> (M, N)` on the CPU with a backward for both (see the module doc). Other
/// devices, and inputs of other ranks, take candle's `x.matmul(&w.t())`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.rank() != 2 || w.rank() != 2 || !x.device().is_cpu() {
        return x.matmul(&w.t()?);
    }
    let (_, k) = x.dims2()?;
    let (_, wk) = w.dims2()?;
    if k != wk {
        bail!(
            "linear: x {:?} and weight {:?} disagree on the inner dimension",
            x.shape(),
            w.shape()
        );
    }
    x.apply_op2(w, Linear)
}

/// The op behind [`linear`].
pub struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "r1v2-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, _) = l2.shape().dims2()?;
        // What `Tensor::matmul` passes the storage for `x.matmul(&w.t())`: w's layout transposed.
        let out = s1.matmul(s2, (1, m, n, k), l1, &l2.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Only what a gradient can flow into: a frozen weight (not a variable) costs no gemm, nor does the
        // input of the first layer when the embedding is frozen.
        let grad_x = if x.track_op() {
            Some(grad.matmul(w)?) // (M, N) @ (N, K)
        } else {
            None
        };
        let grad_w = if !w.track_op() {
            None
        } else if matches!(grad.dtype(), DType::F32 | DType::F64) {
            Some(
                grad.contiguous()?
                    .apply_op2_no_bwd(&x.contiguous()?, &WeightGrad)?,
            )
        } else {
            Some(grad.t()?.matmul(x)?) // (N, M) @ (M, K)
        };
        Ok((grad_x, grad_w))
    }
}

/// The weight's gradient `grad^T @ x`: grad (M, N), x (M, K) -> (N, K), both contiguous, f32 or f64, as the
/// gemm of `grad.t().matmul(x)` in blocks of [`WEIGHT_GRAD_ROWS`] weight rows: the gemm packs the block's
/// `grad^T` (rows x M) rather than all of it (N x M: for the LM head, the size of the logits), and each block
/// writes its rows of the (N, K) result in place.
struct WeightGrad;

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "r1v2-linear-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((g0, g1)), Some((x0, x1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("linear weight gradient: contiguous inputs only");
        };
        let (m, n) = l1.shape().dims2()?;
        let (_, k) = l2.shape().dims2()?;
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(x)) => {
                CpuStorage::F32(weight_grad(&g[g0..g1], &x[x0..x1], m, n, k))
            }
            (CpuStorage::F64(g), CpuStorage::F64(x)) => {
                CpuStorage::F64(weight_grad(&g[g0..g1], &x[x0..x1], m, n, k))
            }
            (g, x) => bail!(
                "linear weight gradient: f32 or f64 of one dtype, got {:?} and {:?}",
                g.dtype(),
                x.dtype()
            ),
        };
        Ok((out, Shape::from((n, k))))
    }
}

/// Weight rows per gemm of [`WeightGrad`].
const WEIGHT_GRAD_ROWS: usize = 1024;

/// `out[n, k] = sum_m g[m, n] * x[m, k]` (row-major g (M, N), x (M, K), out (N, K)), rows of `out` in blocks.
fn weight_grad<T: num_traits::Float + Send + Sync + 'static>(
    g: &[T],
    x: &[T],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<T> {
    assert!(g.len() >= m * n && x.len() >= m * k);
    let mut out = vec![T::zero(); n * k];
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    for (block, dst) in out.chunks_mut(WEIGHT_GRAD_ROWS * k).enumerate() {
        let first = block * WEIGHT_GRAD_ROWS;
        let rows = dst.len() / k;
        // SAFETY: dst is rows x K row-major (dst_rs = K, dst_cs = 1); lhs is g^T's rows first..first + rows:
        // element (r, j) = g[j * N + first + r] (lhs_rs = 1, lhs_cs = N), inside g's M * N elements;
        // rhs is x, (M, K) row-major.
        unsafe {
            gemm::gemm(
                rows,
                k,
                m,
                dst.as_mut_ptr(),
                1,
                k as isize,
                false,
                g.as_ptr().add(first),
                n as isize,
                1,
                x.as_ptr(),
                1,
                k as isize,
                T::zero(),
                T::one(),
                false,
                false,
                false,
                parallelism,
            )
        };
    }
    out
}
