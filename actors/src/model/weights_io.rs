//! The bytes of safetensors checkpoints: files memory-mapped and read one tensor at a time, and files
//! written one tensor at a time, each under a temporary name, synced, then renamed into place.
//!
//! Reading never holds a file in memory: a tensor's bytes are decoded straight from the map into the asked
//! dtype (one allocation, the result), and the map's pages of that tensor are then dropped from this
//! process (`MADV_DONTNEED`; the kernel's page cache keeps them), so the resident set stays the tensors
//! kept plus about one tensor in flight. See examples/bench_load.rs for the measurement.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, WithDType};
use half::{bf16, f16};
use memmap2::{Advice, Mmap, UncheckedAdvice};
use rayon::prelude::*;

use crate::{Error, Result};

/// Where one tensor's bytes lie in a [`MappedFile`].
#[derive(Debug, Clone)]
pub(super) struct FileTensor {
    pub name: String,
    /// The dtype in the file.
    pub stored: DType,
    pub shape: Vec<usize>,
    /// Byte range in the whole file (header included).
    pub start: usize,
    pub end: usize,
}

/// One safetensors file, mapped read-only.
pub(super) struct MappedFile {
    pub path: PathBuf,
    mmap: Mmap,
}

fn checkpoint_error(path: &Path, msg: String) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { path, source }
}

/// The candle dtype of a stored tensor, or an error naming it.
fn stored_dtype(path: &Path, name: &str, dtype: safetensors::Dtype) -> Result<DType> {
    match dtype {
        safetensors::Dtype::F32 => Ok(DType::F32),
        safetensors::Dtype::BF16 => Ok(DType::BF16),
        safetensors::Dtype::F16 => Ok(DType::F16),
        safetensors::Dtype::F64 => Ok(DType::F64),
        other => Err(checkpoint_error(
            path,
            format!(
                "tensor `{name}` is stored as {other:?}; only f32, bf16, f16 and f64 are supported"
            ),
        )),
    }
}

impl MappedFile {
    /// Maps `path` and reads its header (nothing else is read).
    pub fn open(path: &Path) -> Result<(Self, Vec<FileTensor>)> {
        let file = File::open(path).map_err(io_error(path))?;
        // SAFETY: the map is only read, and it stays valid as long as nobody truncates or rewrites the file
        // in place while it is mapped. Our own writer never does (it writes a new file and renames it over
        // the old name, so a mapped old file keeps its inode); another program doing so is outside what a
        // checkpoint directory promises, as for every mmap-based loader (transformers', candle's).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_error(path))?;
        // Read-ahead for the one pass that loading makes; advisory, so a refusal changes nothing.
        let _ = mmap.advise(Advice::Sequential);
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|err| checkpoint_error(path, format!("not a safetensors file: {err}")))?;
        let data_start = 8 + header_len;
        let mut tensors = Vec::new();
        for (name, info) in metadata.tensors() {
            let (begin, end) = info.data_offsets;
            tensors.push(FileTensor {
                stored: stored_dtype(path, &name, info.dtype)?,
                shape: info.shape.clone(),
                start: data_start + begin,
                end: data_start + end,
                name,
            });
        }
        // The header's order is a hash map's: file order makes reading sequential.
        tensors.sort_by_key(|t| t.start);
        let path = path.to_path_buf();
        Ok((Self { path, mmap }, tensors))
    }

    /// Decodes `tensor` into `dtype` on `device`, one allocation on the host. For another device the host
    /// copy keeps the stored dtype (half the bytes of f32 for bf16) and the conversion runs there.
    pub fn read(&self, tensor: &FileTensor, dtype: DType, device: &Device) -> Result<Tensor> {
        if tensor.end > self.mmap.len() || tensor.start > tensor.end {
            return Err(checkpoint_error(
                &self.path,
                format!("tensor `{}` lies past the end of the file", tensor.name),
            ));
        }
        let host = if device.is_cpu() {
            dtype
        } else {
            tensor.stored
        };
        let shape = tensor.shape.clone();
        let cpu = &Device::Cpu;
        let (start, end, stored) = (tensor.start, tensor.end, tensor.stored);
        let out = match host {
            DType::F32 => Tensor::from_vec(self.decode::<f32>(start, end, stored), shape, cpu)?,
            DType::F64 => Tensor::from_vec(self.decode::<f64>(start, end, stored), shape, cpu)?,
            DType::BF16 => Tensor::from_vec(self.decode::<bf16>(start, end, stored), shape, cpu)?,
            DType::F16 => Tensor::from_vec(self.decode::<f16>(start, end, stored), shape, cpu)?,
            other => return Err(Error::msg(format!("cannot load weights as {other:?}"))),
        };
        if device.is_cpu() {
            return Ok(out);
        }
        Ok(out.to_device(device)?.to_dtype(dtype)?)
    }

    /// The elements in bytes `start..end` (of dtype `stored`) as `T`, read in chunks: each chunk's pages
    /// are faulted in with one call, decoded by all threads, then dropped, so at most one chunk of the map
    /// is resident besides the result.
    fn decode<T: Decode>(&self, start: usize, end: usize, stored: DType) -> Vec<T> {
        // A multiple of every element size, so chunks hold whole elements.
        const CHUNK: usize = 32 << 20;
        let mut out = Vec::with_capacity((end - start) / stored.size_in_bytes());
        let mut at = start;
        while at < end {
            let stop = (at + CHUNK).min(end);
            let first = at / PAGE * PAGE;
            // Advisory: without it the same pages fault in one by one.
            let _ = self
                .mmap
                .advise_range(Advice::PopulateRead, first, stop - first);
            extend_decoded(&mut out, &self.mmap[at..stop], stored);
            self.release(at, stop);
            at = stop;
        }
        out
    }

    /// Drops the mapped pages wholly inside `start..end` from this process's resident set.
    fn release(&self, start: usize, end: usize) {
        let first = start.div_ceil(PAGE) * PAGE;
        let last = end / PAGE * PAGE;
        if last > first {
            // SAFETY: MADV_DONTNEED on a read-only shared file mapping only unmaps the pages; the next read
            // of them faults them back in from the page cache with the same contents (the "unchecked" part
            // is about private writable maps, whose changes it would discard; this one is never written).
            // Advisory: an error leaves the pages resident, nothing else.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, first, last - first)
            };
        }
    }
}

/// Element types a stored tensor decodes into, with candle's `to_dtype` rounding (so a decoded tensor has
/// the bits `load then to_dtype` gave).
trait Decode: WithDType {
    fn of_f32(v: f32) -> Self;
    fn of_f64(v: f64) -> Self;
    fn of_bf16(v: bf16) -> Self;
    fn of_f16(v: f16) -> Self;
}

impl Decode for f32 {
    fn of_f32(v: f32) -> Self {
        v
    }
    fn of_f64(v: f64) -> Self {
        v as f32
    }
    fn of_bf16(v: bf16) -> Self {
        v.to_f32()
    }
    fn of_f16(v: f16) -> Self {
        v.to_f32()
    }
}

impl Decode for f64 {
    fn of_f32(v: f32) -> Self {
        v as f64
    }
    fn of_f64(v: f64) -> Self {
        v
    }
    fn of_bf16(v: bf16) -> Self {
        v.to_f64()
    }
    fn of_f16(v: f16) -> Self {
        v.to_f64()
    }
}

impl Decode for bf16 {
    fn of_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn of_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    fn of_bf16(v: bf16) -> Self {
        v
    }
    fn of_f16(v: f16) -> Self {
        bf16::from_f32(v.to_f32())
    }
}

impl Decode for f16 {
    fn of_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn of_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
    fn of_bf16(v: bf16) -> Self {
        f16::from_f32(v.to_f32())
    }
    fn of_f16(v: f16) -> Self {
        v
    }
}

/// The mapped pages' size (x86-64 and aarch64 Linux defaults; only used to round advice ranges).
const PAGE: usize = 4096;

/// Appends the little-endian elements of dtype `stored` in `bytes`, converted to `T`, using all threads.
fn extend_decoded<T: Decode>(out: &mut Vec<T>, bytes: &[u8], stored: DType) {
    match stored {
        DType::F64 => out.par_extend(bytes.par_chunks_exact(8).map(|b| {
            T::of_f64(f64::from_le_bytes([
                b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
            ]))
        })),
        DType::BF16 => out.par_extend(
            bytes
                .par_chunks_exact(2)
                .map(|b| T::of_bf16(bf16::from_le_bytes([b[0], b[1]]))),
        ),
        DType::F16 => out.par_extend(
            bytes
                .par_chunks_exact(2)
                .map(|b| T::of_f16(f16::from_le_bytes([b[0], b[1]]))),
        ),
        // F32 (the only other dtype `stored_dtype` admits).
        _ => out.par_extend(
            bytes
                .par_chunks_exact(4)
                .map(|b| T::of_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        ),
    }
}

/// The safetensors name of a dtype we write.
fn dtype_name(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("F32"),
        DType::F64 => Ok("F64"),
        DType::BF16 => Ok("BF16"),
        DType::F16 => Ok("F16"),
        other => Err(Error::msg(format!("cannot save weights as {other:?}"))),
    }
}

/// One tensor to write: its name, shape and a way to get its value (read only while writing it).
pub(super) struct ToWrite<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub value: &'a (dyn Fn() -> Result<Tensor> + 'a),
}

/// Writes `tensors` as one safetensors file at `path` in `dtype`, one tensor in memory at a time: the
/// header first (its offsets follow from the shapes), then each tensor's bytes. The file goes to a
/// temporary name next to `path`, is synced, and only then renamed over `path`.
pub(super) fn write_file(
    path: &Path,
    tensors: &mut [ToWrite<'_>],
    dtype: DType,
    metadata: &serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    // safetensors' own order for one dtype: by name.
    tensors.sort_by(|a, b| a.name.cmp(b.name));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), metadata.clone().into());
    let mut offset = 0usize;
    for t in tensors.iter() {
        let bytes = t.shape.iter().product::<usize>() * dtype.size_in_bytes();
        let entry = serde_json::json!({
            "dtype": dtype_name(dtype)?,
            "shape": t.shape,
            "data_offsets": [offset, offset + bytes],
        });
        header.insert(t.name.to_string(), entry);
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    // Pad with spaces so the data starts 8-byte aligned, as safetensors does.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let file_name = path.file_name().map(|n| n.to_string_lossy().to_string());
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.unwrap_or_default(),
        std::process::id()
    ));
    atomically(path, &tmp, || {
        let file = File::create(&tmp).map_err(io_error(&tmp))?;
        let mut out = BufWriter::with_capacity(1 << 22, file);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&header))
            .map_err(io_error(&tmp))?;
        for t in tensors.iter() {
            let value = (t.value)()?;
            if value.dims() != t.shape {
                return Err(checkpoint_error(
                    path,
                    format!(
                        "tensor `{}` changed shape while saving: {:?}, expected {:?}",
                        t.name,
                        value.dims(),
                        t.shape
                    ),
                ));
            }
            write_tensor(&mut out, &value, dtype).map_err(|err| match err {
                Error::Io { source, .. } => Error::Io {
                    path: tmp.clone(),
                    source,
                },
                other => other,
            })?;
        }
        let file = out.into_inner().map_err(|err| Error::Io {
            path: tmp.clone(),
            source: err.into_error(),
        })?;
        file.sync_all().map_err(io_error(&tmp))
    })
}

/// Runs `write` (which fills `tmp`), then renames `tmp` over `path`; on any error `tmp` is removed.
fn atomically(path: &Path, tmp: &Path, write: impl FnOnce() -> Result<()>) -> Result<()> {
    let result = write().and_then(|()| std::fs::rename(tmp, path).map_err(io_error(path)));
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Appends the little-endian bytes of `value` converted to `dtype`, in chunks of 1M elements.
fn write_tensor(out: &mut impl Write, value: &Tensor, dtype: DType) -> Result<()> {
    let flat = value
        .detach()
        .to_device(&Device::Cpu)?
        .to_dtype(dtype)?
        .flatten_all()?;
    let io = |source| Error::Io {
        path: PathBuf::new(),
        source,
    };
    const CHUNK: usize = 1 << 20;
    let mut buf = Vec::with_capacity(CHUNK * dtype.size_in_bytes());
    macro_rules! put {
        ($t:ty) => {
            for chunk in flat.to_vec1::<$t>()?.chunks(CHUNK) {
                buf.clear();
                buf.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
                out.write_all(&buf).map_err(io)?;
            }
        };
    }
    match dtype {
        DType::F32 => put!(f32),
        DType::F64 => put!(f64),
        DType::BF16 => put!(bf16),
        DType::F16 => put!(f16),
        other => return Err(Error::msg(format!("cannot save weights as {other:?}"))),
    }
    Ok(())
}

/// Writes `text` to `path` atomically (temporary name, sync, rename).
pub(super) fn write_text(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    atomically(path, &tmp, || {
        let mut file = File::create(&tmp).map_err(io_error(&tmp))?;
        file.write_all(text.as_bytes()).map_err(io_error(&tmp))?;
        file.sync_all().map_err(io_error(&tmp))
    })
}

/// Syncs a directory, so that renames into it survive a crash.
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}
