//! Data-parallel training (design.md "Devices"): one trainer replica per device, each computing the gradient
//! of its shard of the batch; a [`Collective`] sums them so that every replica applies the same update and
//! the replicas stay identical.
//!
//! [`LocalCollective`] is the in-process implementation for CPU devices (`cpu:0`, `cpu:1`: one thread per
//! replica), so that the multi-device logic is tested without GPUs; [`NcclCollective`] (`cuda` feature,
//! `collective_nccl.rs`) takes its place on the GPUs of this process. Every rank of a `LocalCollective` sums
//! the contributions in rank order, so all ranks get bit-identical results (NCCL's sums are identical on
//! every rank too, in its own order).

use std::sync::{Arc, Barrier};

use candle_core::Tensor;
use parking_lot::Mutex;

use crate::{Error, Result};

#[cfg(feature = "cuda")]
#[path = "collective_nccl.rs"]
mod nccl;
#[cfg(feature = "cuda")]
pub use nccl::NcclCollective;

/// An all-reduce among `world_size` ranks.
pub trait Collective: Send + Sync {
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// This rank (0-based).
    fn rank(&self) -> usize;
    /// Replaces each of `tensors` by its element-wise sum over all ranks (every rank passes the same
    /// shapes in the same order). Blocks until every rank has contributed.
    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()>;
}

/// What the ranks of a [`LocalCollective`] share.
struct Shared {
    world_size: usize,
    barrier: Barrier,
    /// Each rank's contribution to the current all-reduce. A parking_lot mutex: held only to copy handles
    /// in and out, and a panicking rank must not poison it for the others.
    slots: Mutex<Vec<Option<Vec<Tensor>>>>,
}

/// In-process all-reduce between threads (one per rank).
#[derive(Clone)]
pub struct LocalCollective {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalCollective {
    /// One handle per rank of a `world_size`-rank group; give each to its own thread.
    pub fn group(world_size: usize) -> Result<Vec<Self>> {
        if world_size == 0 {
            return Err(Error::msg("a collective group needs at least one rank"));
        }
        let shared = Arc::new(Shared {
            world_size,
            barrier: Barrier::new(world_size),
            slots: Mutex::new(vec![None; world_size]),
        });
        Ok((0..world_size)
            .map(|rank| Self {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect())
    }
}

impl Collective for LocalCollective {
    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        self.shared.slots.lock()[self.rank] = Some(tensors.to_vec());
        // Every contribution is in.
        self.shared.barrier.wait();
        let contributions: Vec<Vec<Tensor>> = {
            let slots = self.shared.slots.lock();
            slots
                .iter()
                .map(|s| s.clone().unwrap_or_default())
                .collect()
        };
        // Everyone has read them: a slot may be overwritten by the next all-reduce only after this.
        self.shared.barrier.wait();
        for (rank, contribution) in contributions.iter().enumerate() {
            if contribution.len() != tensors.len() {
                return Err(Error::msg(format!(
                    "all-reduce: rank {rank} contributed {} tensors, rank {} {}",
                    contribution.len(),
                    self.rank,
                    tensors.len()
                )));
            }
        }
        for (i, tensor) in tensors.iter_mut().enumerate() {
            let device = tensor.device().clone();
            let mut sum = contributions[0][i].to_device(&device)?;
            for contribution in &contributions[1..] {
                sum = (sum + contribution[i].to_device(&device)?)?;
            }
            *tensor = sum;
        }
        Ok(())
    }
}

/// Named scalar sums a rank contributes to an all-reduce beside its gradients.
pub(crate) trait RankSums: Copy + Default {
    /// The fields, in a fixed order.
    fn to_vec(&self) -> Vec<f64>;
    /// The fields back from `values` (as long as `to_vec`'s).
    fn from_slice(values: &[f64]) -> Self;
}

/// The sums over the ranks, and how many ranks failed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reduced<S> {
    failed_ranks: f64,
    sums: S,
}

impl<S> Reduced<S> {
    /// The sums, or an error when some rank failed (its own error is what that rank returns).
    pub(crate) fn into_result(self) -> Result<S> {
        if self.failed_ranks > 0.0 {
            return Err(Error::msg(format!(
                "{} rank(s) failed to compute their shard's gradient: update skipped",
                self.failed_ranks
            )));
        }
        Ok(self.sums)
    }
}

/// All-reduces `tensors` with this rank's `sums` appended as one f64 tensor (`None`: this rank failed and
/// contributes zeros and a failure, so no rank waits forever); returns the summed scalars.
pub(crate) fn all_reduce_with_sums<S: RankSums>(
    collective: &dyn Collective,
    tensors: &mut Vec<Tensor>,
    sums: Option<S>,
) -> Result<Reduced<S>> {
    let mut values = vec![if sums.is_some() { 0.0 } else { 1.0 }];
    values.extend(sums.unwrap_or_default().to_vec());
    tensors.push(Tensor::new(values.as_slice(), &candle_core::Device::Cpu)?);
    collective.all_reduce_sum(tensors)?;
    let values = tensors
        .pop()
        .ok_or_else(|| Error::msg("all-reduce lost the statistics"))?
        .to_vec1::<f64>()?;
    Ok(Reduced {
        failed_ranks: values[0],
        sums: S::from_slice(&values[1..]),
    })
}

/// Runs a rank's local computation, turning a panic into an error: the rank then still joins the
/// all-reduce (with a failure), so no other rank waits for it forever.
pub(crate) fn rank_local<T>(body: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string panic payload".into());
        Err(Error::msg(format!("this rank panicked: {why}")))
    })
}
