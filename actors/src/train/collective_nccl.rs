//! [`NcclCollective`]: the all-reduce of data-parallel training across the GPUs of this process, on NCCL
//! (cudarc's bindings), `cuda` feature only.
//!
//! NCCL's communicators of one process are made together (`ncclCommInitAll`, cudarc's
//! `Comm::from_devices`), one per GPU, and a collective over them is one call per communicator between
//! `ncclGroupStart` and `ncclGroupEnd`, from one thread. cudarc's `Comm` holds a raw pointer and is not
//! `Send`, so one thread owns every communicator: each rank's handle sends its tensors there, the thread
//! waits for every rank, issues the group, waits for the GPUs and hands each rank its sums.
//!
//! Streams: candle's `Device::new_cuda` runs each thread's work on that thread's per-thread default
//! stream, so a rank's gradient kernels and the NCCL thread's calls are on different streams. The handle
//! therefore synchronises its device before sending, and the NCCL thread synchronises its streams before
//! replying: one wait per step, where the gradients are complete anyway.

use std::sync::mpsc;

use candle_core::cuda::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda::cudarc::nccl::safe::{group_end, group_start, Comm, NcclType, ReduceOp};
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};

use super::Collective;
use crate::{Error, Result};

/// Where a rank's sums (or the error) go.
type Reply = mpsc::Sender<Result<Vec<Tensor>>>;

enum Message {
    /// One rank's contribution to the current all-reduce, and where its sums go.
    Reduce {
        rank: usize,
        tensors: Vec<Tensor>,
        reply: Reply,
    },
    /// A rank's handle was dropped (its thread ended or panicked): the others must not wait for it.
    Left { rank: usize },
}

/// One rank of an all-reduce over the GPUs of this process; see the module note.
pub struct NcclCollective {
    rank: usize,
    world_size: usize,
    device: Device,
    messages: mpsc::Sender<Message>,
}

impl NcclCollective {
    /// One handle per device of `devices` (CUDA devices, each once), rank `i` for `devices[i]`; give each
    /// to the thread that trains on that device. Fails with NCCL's error when the communicators cannot be
    /// made (a device twice, no NCCL library).
    pub fn group(devices: &[Device]) -> Result<Vec<Self>> {
        if devices.is_empty() {
            return Err(Error::msg("an NCCL group needs at least one device"));
        }
        let cuda: Vec<CudaDevice> = devices
            .iter()
            .map(|d| d.as_cuda_device().cloned())
            .collect::<candle_core::Result<_>>()
            .map_err(|err| Error::msg(format!("NCCL runs on CUDA devices only: {err}")))?;
        let (messages, inbox) = mpsc::channel();
        let (ready, started) = mpsc::channel();
        let owned = cuda.clone();
        std::thread::Builder::new()
            .name("nccl".into())
            .spawn(move || {
                let streams = owned.iter().map(|d| d.cuda_stream()).collect();
                match Comm::from_devices(streams) {
                    Ok(comms) => {
                        let _ = ready.send(Ok(()));
                        serve(&comms, &owned, &inbox);
                    }
                    Err(err) => {
                        let _ = ready.send(Err(Error::msg(format!(
                            "NCCL communicators for {} devices: {err:?}",
                            owned.len()
                        ))));
                    }
                }
            })
            .map_err(|err| Error::msg(format!("cannot start the NCCL thread: {err}")))?;
        started
            .recv()
            .map_err(|_| Error::msg("the NCCL thread ended while starting"))??;
        Ok(devices
            .iter()
            .enumerate()
            .map(|(rank, device)| Self {
                rank,
                world_size: devices.len(),
                device: device.clone(),
                messages: messages.clone(),
            })
            .collect())
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        let _ = self.messages.send(Message::Left { rank: self.rank });
    }
}

impl Collective for NcclCollective {
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        // This thread's kernels (on its per-thread stream) must be done before NCCL reads the inputs.
        self.device.synchronize()?;
        let (reply, answer) = mpsc::channel();
        let message = Message::Reduce {
            rank: self.rank,
            tensors: tensors.to_vec(),
            reply,
        };
        let gone = || Error::msg("all-reduce: the NCCL thread has stopped");
        self.messages.send(message).map_err(|_| gone())?;
        let sums = answer.recv().map_err(|_| gone())??;
        for (tensor, sum) in tensors.iter_mut().zip(sums) {
            *tensor = sum;
        }
        Ok(())
    }
}

/// The NCCL thread: gathers one request per rank, reduces, replies; until every handle is gone.
fn serve(comms: &[Comm], devices: &[CudaDevice], inbox: &mpsc::Receiver<Message>) {
    let world = comms.len();
    let mut left: Option<usize> = None;
    let mut pending: Vec<Option<(Vec<Tensor>, Reply)>> = (0..world).map(|_| None).collect();
    let mut gone = 0;
    while gone < world {
        let Ok(message) = inbox.recv() else { return };
        match message {
            Message::Left { rank } => {
                gone += 1;
                left.get_or_insert(rank);
            }
            Message::Reduce {
                rank,
                tensors,
                reply,
            } => pending[rank] = Some((tensors, reply)),
        }
        let ready = pending.iter().filter(|p| p.is_some()).count();
        if let Some(rank) = left {
            // A rank is gone: every waiting rank gets an error instead of waiting forever.
            for (tensors, reply) in pending.iter_mut().filter_map(Option::take) {
                drop(tensors);
                let _ = reply.send(Err(Error::msg(format!(
                    "all-reduce: rank {rank} left the NCCL group"
                ))));
            }
            continue;
        }
        if ready < world {
            continue;
        }
        let requests: Vec<_> = pending.iter_mut().filter_map(Option::take).collect();
        let inputs: Vec<&[Tensor]> = requests.iter().map(|(t, _)| t.as_slice()).collect();
        match reduce(comms, devices, &inputs) {
            Ok(sums) => {
                for ((_, reply), sums) in requests.iter().zip(sums) {
                    let _ = reply.send(Ok(sums));
                }
            }
            Err(err) => {
                for (_, reply) in &requests {
                    let _ = reply.send(Err(Error::msg(err.to_string())));
                }
            }
        }
    }
}

/// Sums `inputs[rank][i]` over ranks for every `i`, in one NCCL group; `out[rank][i]` on rank's device.
fn reduce(
    comms: &[Comm],
    devices: &[CudaDevice],
    inputs: &[&[Tensor]],
) -> Result<Vec<Vec<Tensor>>> {
    let count = inputs[0].len();
    for (rank, tensors) in inputs.iter().enumerate() {
        if tensors.len() != count {
            return Err(Error::msg(format!(
                "all-reduce: rank {rank} contributed {} tensors, rank 0 {count}",
                tensors.len()
            )));
        }
    }
    // Contiguous inputs whose storage stays borrowed (read-locked) until the GPUs are done.
    let inputs: Vec<Vec<Tensor>> = inputs
        .iter()
        .map(|ts| ts.iter().map(|t| t.contiguous()).collect())
        .collect::<candle_core::Result<_>>()?;
    let mut outputs: Vec<Vec<Storage>> = (0..comms.len())
        .map(|_| Vec::with_capacity(count))
        .collect();
    group_start().map_err(nccl_error)?;
    let issued = issue_all(comms, devices, &inputs, &mut outputs);
    // The group is closed even when issuing failed, or NCCL stays inside it.
    let ended = group_end().map_err(nccl_error);
    issued?;
    ended?;
    for device in devices {
        device
            .cuda_stream()
            .synchronize()
            .map_err(|err| Error::msg(format!("all-reduce: waiting for the GPU: {err:?}")))?;
    }
    let mut sums = Vec::with_capacity(comms.len());
    for (rank, storages) in outputs.into_iter().enumerate() {
        let tensors = storages
            .into_iter()
            .zip(&inputs[rank])
            .map(|(storage, input)| {
                Tensor::from_storage(storage, input.shape().clone(), BackpropOp::none(), false)
            })
            .collect();
        sums.push(tensors);
    }
    Ok(sums)
}

/// Enqueues every tensor's all-reduce on every rank (inside the caller's group), the sums' storage into
/// `outputs[rank]`.
fn issue_all(
    comms: &[Comm],
    devices: &[CudaDevice],
    inputs: &[Vec<Tensor>],
    outputs: &mut [Vec<Storage>],
) -> Result<()> {
    for (i, first) in inputs[0].iter().enumerate() {
        for (rank, tensors) in inputs.iter().enumerate() {
            if tensors[i].dims() != first.dims() || tensors[i].dtype() != first.dtype() {
                return Err(Error::msg(format!(
                    "all-reduce: tensor {i} is {:?} {:?} on rank {rank}, {:?} {:?} on rank 0",
                    tensors[i].dtype(),
                    tensors[i].dims(),
                    first.dtype(),
                    first.dims()
                )));
            }
            let out = match first.dtype() {
                DType::F32 => issue::<f32>(&comms[rank], &devices[rank], &tensors[i])?,
                DType::BF16 => issue::<bf16>(&comms[rank], &devices[rank], &tensors[i])?,
                DType::F16 => issue::<f16>(&comms[rank], &devices[rank], &tensors[i])?,
                DType::F64 => issue::<f64>(&comms[rank], &devices[rank], &tensors[i])?,
                other => return Err(Error::msg(format!("all-reduce of {other:?}"))),
            };
            outputs[rank].push(out);
        }
    }
    Ok(())
}

/// Enqueues the all-reduce of one rank's `tensor` into a new buffer, returned as candle storage.
fn issue<T>(comm: &Comm, device: &CudaDevice, tensor: &Tensor) -> Result<Storage>
where
    T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
{
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        return Err(Error::msg("all-reduce: a tensor is not on a CUDA device"));
    };
    let start = layout.start_offset();
    let len = tensor.elem_count();
    let input = cuda.as_cuda_slice::<T>()?.slice(start..start + len);
    let mut out: CudaSlice<T> = device
        .cuda_stream()
        .alloc_zeros::<T>(len)
        .map_err(|err| Error::msg(format!("all-reduce: allocating {len} elements: {err:?}")))?;
    comm.all_reduce(&input, &mut out, &ReduceOp::Sum)
        .map_err(nccl_error)?;
    Ok(Storage::Cuda(CudaStorage::wrap_cuda_slice(
        out,
        device.clone(),
    )))
}

fn nccl_error(err: impl std::fmt::Debug) -> Error {
    Error::msg(format!("NCCL: {err:?}"))
}
