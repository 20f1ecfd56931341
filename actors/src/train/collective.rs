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

/// One rank alone: the all-reduce is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn world_size(&self) -> usize {
        1
    }

    fn rank(&self) -> usize {
        0
    }

    fn all_reduce_sum(&self, _tensors: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
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
