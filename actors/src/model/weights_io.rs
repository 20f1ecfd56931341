//! The bytes of safetensors checkpoints: files read one tensor at a time, and files written one tensor at a
//! time, each under a temporary name, synced, then renamed into place.
//!
//! Reading never holds a file in memory. A file's header is read through a memory map (nothing else of it
//! is touched); a tensor's bytes are then read with positioned reads (`pread`) in chunks, by all threads:
//! straight into the result when the file holds the asked dtype, else into a small per-thread buffer that
//! is converted into the result (`half`'s slice conversions for bf16/f16 <-> f32, the same bits as candle's
//! `to_dtype`). The result is allocated zeroed (fresh pages from the kernel, not written twice), and each
//! chunk's pages are faulted in with one call (`MADV_POPULATE_WRITE`) before the read fills them. The
//! resident set stays the tensors kept plus the one being read.
//!
//! Why not the map itself (the previous loader): faulting the map's pages in, converting element by element
//! and dropping the pages after each chunk doubled the page faults (the map's and the result's) and spent
//! ~1 s of user time per 3 GB in the conversion; examples/bench_load.rs measures both (README "Big
//! checkpoints"). Transparent huge pages for the result were measured too and left out: on this project's
//! VMs they made loads that keep their tensors 2-6x slower (fresh huge pages are slow to back), while only
//! helping loads that drop each tensor.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, WithDType};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::{Error, Result};

/// Where one tensor's bytes lie in a [`CheckpointFile`].
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

/// One safetensors file, open for positioned reads.
pub(super) struct CheckpointFile {
    pub path: PathBuf,
    file: File,
    len: usize,
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

/// Elements per chunk of a read (4 MiB of f32). A converted chunk's buffer stays in cache between the read
/// and the conversion; a direct read is one `pread` per chunk.
const CHUNK_ELEMS: usize = 1 << 20;

impl CheckpointFile {
    /// Opens `path` and reads its header through a memory map (only the header's pages are touched; the map
    /// is dropped before returning).
    pub fn open(path: &Path) -> Result<(Self, Vec<FileTensor>)> {
        let file = File::open(path).map_err(io_error(path))?;
        // SAFETY: the map is only read, here, and dropped before this function returns; nobody truncates a
        // checkpoint file in place meanwhile (our own writer writes a new file and renames it).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_error(path))?;
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
        let len = mmap.len();
        let path = path.to_path_buf();
        Ok((Self { path, file, len }, tensors))
    }

    /// Decodes `tensor` into `dtype` on `device`, one allocation on the host. For another device the host
    /// copy keeps the stored dtype (half the bytes of f32 for bf16) and the conversion runs there.
    pub fn read(&self, tensor: &FileTensor, dtype: DType, device: &Device) -> Result<Tensor> {
        self.read_chunked(tensor, dtype, device, CHUNK_ELEMS)
    }

    /// [`Self::read`] with `chunk` elements per positioned read (tests use small chunks).
    pub(super) fn read_chunked(
        &self,
        tensor: &FileTensor,
        dtype: DType,
        device: &Device,
        chunk: usize,
    ) -> Result<Tensor> {
        let count: usize = tensor.shape.iter().product();
        if tensor.end > self.len
            || tensor.start > tensor.end
            || tensor.end - tensor.start != count * tensor.stored.size_in_bytes()
        {
            return Err(checkpoint_error(
                &self.path,
                format!(
                    "tensor `{}` lies past the end of the file or does not match its shape",
                    tensor.name
                ),
            ));
        }
        let host = if device.is_cpu() {
            dtype
        } else {
            tensor.stored
        };
        let shape = tensor.shape.clone();
        let cpu = &Device::Cpu;
        let out = match host {
            DType::F32 => Tensor::from_vec(self.decode::<f32>(tensor, chunk)?, shape, cpu)?,
            DType::F64 => Tensor::from_vec(self.decode::<f64>(tensor, chunk)?, shape, cpu)?,
            DType::BF16 => Tensor::from_vec(self.decode::<bf16>(tensor, chunk)?, shape, cpu)?,
            DType::F16 => Tensor::from_vec(self.decode::<f16>(tensor, chunk)?, shape, cpu)?,
            other => return Err(Error::msg(format!("cannot load weights as {other:?}"))),
        };
        if device.is_cpu() {
            return Ok(out);
        }
        Ok(out.to_device(device)?.to_dtype(dtype)?)
    }

    /// The elements of `tensor` as `T`: the result is allocated once (zeroed pages, not written twice), then
    /// its chunks are filled in parallel, each by one positioned read into it (same dtype) or into a
    /// per-thread buffer converted into it.
    fn decode<T: Decode>(&self, tensor: &FileTensor, chunk: usize) -> Result<Vec<T>> {
        let count = (tensor.end - tensor.start) / tensor.stored.size_in_bytes();
        let mut out = T::zeroed_vec(count);
        let chunk = chunk.max(1);
        let stored = tensor.stored;
        out.par_chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(index, dst)| {
                let at = tensor.start + index * chunk * stored.size_in_bytes();
                match stored {
                    DType::F64 => self.read_converted::<f64, T>(at, dst),
                    DType::BF16 => self.read_converted::<bf16, T>(at, dst),
                    DType::F16 => self.read_converted::<f16, T>(at, dst),
                    // F32 (the only other dtype `stored_dtype` admits).
                    _ => self.read_converted::<f32, T>(at, dst),
                }
            })?;
        Ok(out)
    }

    /// Fills `dst` with the elements of dtype `S` starting at byte `at`, converted to `T`.
    fn read_converted<S: Stored, T: Decode>(&self, at: usize, dst: &mut [T]) -> Result<()> {
        populate(dst);
        if S::DTYPE == T::DTYPE {
            // The file's little-endian bytes are the elements (see `Stored`): read straight into the result.
            return self.read_exact_at(as_bytes_mut(dst), at);
        }
        S::with_buffer(dst.len(), |buffer| {
            self.read_exact_at(as_bytes_mut(buffer), at)?;
            T::convert_from(buffer, dst);
            Ok(())
        })
    }

    fn read_exact_at(&self, bytes: &mut [u8], at: usize) -> Result<()> {
        self.file
            .read_exact_at(bytes, at as u64)
            .map_err(io_error(&self.path))
    }
}

/// Faults in the pages wholly inside `values` with one call (MADV_POPULATE_WRITE), before it is written.
fn populate<T>(values: &mut [T]) {
    const PAGE: usize = 4096;
    let start = values.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(values);
    let (first, last) = (start.div_ceil(PAGE) * PAGE, end / PAGE * PAGE);
    if last > first {
        // SAFETY: the range lies inside `values`, memory this process owns; populating only allocates the
        // pages (zero-filled), it never changes what they hold.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }
}

/// The bytes of a slice of plain floats (f32, f64, bf16, f16: every bit pattern is a value, no padding).
fn as_bytes_mut<T: Decode>(values: &mut [T]) -> &mut [u8] {
    // SAFETY: `T` is one of the four float types (the `Decode` impls), which have no padding and accept any
    // bit pattern; the byte slice covers exactly the same memory and borrows it mutably for its lifetime.
    unsafe {
        std::slice::from_raw_parts_mut(
            values.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(values),
        )
    }
}

// safetensors stores little-endian elements; reading them in place assumes the host is little-endian too
// (x86-64 and aarch64 Linux, as candle's own safetensors loading does).
#[cfg(not(target_endian = "little"))]
compile_error!("checkpoint reading assumes a little-endian host");

/// A dtype the file may hold: a per-thread read buffer of it.
trait Stored: Decode {
    /// Runs `f` on this thread's buffer of `len` elements (kept between chunks, so a load allocates it once
    /// per thread and element type).
    fn with_buffer<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

macro_rules! stored_with_buffer {
    ($t:ty, $zero:expr) => {
        impl Stored for $t {
            fn with_buffer<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                thread_local! {
                    static BUFFER: std::cell::RefCell<Vec<$t>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                BUFFER.with(|buffer| {
                    let mut buffer = buffer.borrow_mut();
                    if buffer.len() < len {
                        buffer.resize(len, $zero);
                    }
                    f(&mut buffer[..len])
                })
            }
        }
    };
}
stored_with_buffer!(f32, 0.0);
stored_with_buffer!(f64, 0.0);
stored_with_buffer!(bf16, bf16::ZERO);
stored_with_buffer!(f16, f16::ZERO);

/// Element types a stored tensor decodes into, with candle's `to_dtype` rounding (so a decoded tensor has
/// the bits `load then to_dtype` gave).
trait Decode: WithDType {
    /// A vector of `count` zeros from zeroed memory (large ones: fresh pages, not written).
    fn zeroed_vec(count: usize) -> Vec<Self>;
    fn of_f32(v: f32) -> Self;
    fn of_f64(v: f64) -> Self;
    fn of_bf16(v: bf16) -> Self;
    fn of_f16(v: f16) -> Self;
    /// Converts `src` (of any decodable dtype) into `dst`, element by element unless a faster slice
    /// conversion with the same bits exists.
    fn convert_from<S: Decode>(src: &[S], dst: &mut [Self]) {
        decode_each(src, dst)
    }
    /// This element converted to `T`.
    fn decode_into<T: Decode>(self) -> T;
}

/// `src` converted into `dst` element by element.
fn decode_each<S: Decode, T: Decode>(src: &[S], dst: &mut [T]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.decode_into();
    }
}

/// `src` into a 2-byte float `dst`: an f32 source through half's slice conversion (`from_f32`'s rounding, to
/// nearest even, as candle's `to_dtype`), any other element by element.
fn half_from<S: Decode, T: Decode>(src: &[S], dst: &mut [T])
where
    [T]: HalfFloatSliceExt,
{
    match S::DTYPE {
        DType::F32 => dst.convert_from_f32_slice(cast_slice::<S, f32>(src)),
        _ => decode_each(src, dst),
    }
}

/// A `Vec<u16>` of zeros (`vec!` of an integer zero allocates zeroed memory) as a vector of a 2-byte float.
fn zeroed_half<T: Copy>(count: usize) -> Vec<T> {
    const { assert!(std::mem::size_of::<T>() == 2 && std::mem::align_of::<T>() == 2) };
    let mut raw = std::mem::ManuallyDrop::new(vec![0u16; count]);
    // SAFETY: `T` is bf16 or f16, `repr(transparent)` over u16 (asserted: same size and alignment), so the
    // allocation has the layout a `Vec<T>` of this capacity expects, and all-zero bits are +0.0.
    unsafe { Vec::from_raw_parts(raw.as_mut_ptr().cast::<T>(), raw.len(), raw.capacity()) }
}

impl Decode for f32 {
    fn zeroed_vec(count: usize) -> Vec<Self> {
        vec![0.0; count]
    }
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
    fn convert_from<S: Decode>(src: &[S], dst: &mut [Self]) {
        // half's slice conversions (vectorised; F16C for f16 where the CPU has it) give `to_f32`'s bits.
        match S::DTYPE {
            DType::BF16 => cast_slice::<S, bf16>(src).convert_to_f32_slice(dst),
            DType::F16 => cast_slice::<S, f16>(src).convert_to_f32_slice(dst),
            _ => decode_each(src, dst),
        }
    }
    fn decode_into<T: Decode>(self) -> T {
        T::of_f32(self)
    }
}

impl Decode for f64 {
    fn zeroed_vec(count: usize) -> Vec<Self> {
        vec![0.0; count]
    }
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
    fn decode_into<T: Decode>(self) -> T {
        T::of_f64(self)
    }
}

impl Decode for bf16 {
    fn zeroed_vec(count: usize) -> Vec<Self> {
        zeroed_half(count)
    }
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
    fn convert_from<S: Decode>(src: &[S], dst: &mut [Self]) {
        half_from(src, dst)
    }
    fn decode_into<T: Decode>(self) -> T {
        T::of_bf16(self)
    }
}

impl Decode for f16 {
    fn zeroed_vec(count: usize) -> Vec<Self> {
        zeroed_half(count)
    }
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
    fn convert_from<S: Decode>(src: &[S], dst: &mut [Self]) {
        half_from(src, dst)
    }
    fn decode_into<T: Decode>(self) -> T {
        T::of_f16(self)
    }
}

/// `src` seen as a slice of `U`, which is `S` itself (the caller checked the dtype).
fn cast_slice<S: Decode, U: Decode>(src: &[S]) -> &[U] {
    assert_eq!(S::DTYPE, U::DTYPE, "cast_slice between different dtypes");
    // SAFETY: the dtypes are equal, and each dtype has exactly one `Decode` type, so `S` and `U` are the
    // same type.
    unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<U>(), src.len()) }
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
