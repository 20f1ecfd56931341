//! HF checkpoint I/O: safetensors weights (one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`, as transformers' `save_pretrained` writes them) and `config.json`.
//!
//! [`WeightStore`] opens a checkpoint's files and reads only their headers; a tensor is read (by positioned
//! reads, into the asked dtype, then moved to its device) when a model asks for it through a
//! candle [`VarBuilder`], one at a time, so loading a checkpoint larger than memory onto GPUs, or only
//! part of it, holds about one tensor on the host (`weights_io.rs`; measured by examples/bench_load.rs).
//! Names chosen as trainable come back as [`Var`]s (recorded, so an optimizer sees exactly them), the
//! rest as plain tensors that never receive a gradient (kept by the store too, so that every model built
//! from it shares one copy). Names the model asks for but the checkpoint lacks, or with
//! another shape, are errors naming the tensor and the file; names in the checkpoint that no model
//! asked for are reported by [`WeightStore::unexpected`]. [`save`] and [`WeightStore::save`] write the
//! same layout back, one tensor in memory at a time, each file atomically.
//!
//! Every tensor is converted to the store's one dtype as it is read: the models' layers (candle-nn's
//! `Linear`, `Embedding`) multiply weights and activations of one dtype, so a frozen bf16 module beside
//! f32 compute would need a cast in each forward. A store in bf16 (mixed precision, `[model] dtype =
//! "bf16"`) keeps a bf16 checkpoint's frozen modules as they are in the file, read without conversion;
//! the trainable ones are bf16 Vars whose f32 masters the optimizer keeps (train/adamw.rs).
//! [`WeightStore::stored_dtype`] tells what the file holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

#[path = "weights_backend.rs"]
mod backend;
#[path = "weights_io.rs"]
mod io;
#[path = "weights_save.rs"]
mod save_files;
use backend::StoreBackend;
use io::{CheckpointFile, FileTensor, ToWrite};
pub use save_files::{save, DEFAULT_MAX_SHARD_BYTES};

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Reads a JSON config file; errors name the file and the key path (`rope_scaling.factor`).
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut de = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut de).map_err(|err| Error::ConfigFile {
        path: path.to_path_buf(),
        key: err.path().to_string(),
        msg: err.into_inner().to_string(),
    })
}

/// Where a tensor's value comes from.
enum Source {
    /// Bytes in `Inner::files[file]`.
    File { file: usize, tensor: FileTensor },
    /// Already a tensor of the store's dtype and device ([`WeightStore::from_tensors`]).
    Memory(Tensor),
}

/// One tensor of the checkpoint: its shape, the file it comes from (for error messages), its source.
struct Entry {
    shape: Shape,
    file: PathBuf,
    source: Source,
}

/// What models asked for so far.
#[derive(Default)]
struct Requests {
    /// Every name handed out.
    names: BTreeSet<String>,
    /// The trainable ones, one `Var` per name (a name asked twice, as tied embeddings do, shares it).
    vars: BTreeMap<String, Var>,
    /// The frozen ones read in the store's dtype and device, so that every model built from the store
    /// (policy, reference, scorers) shares one copy.
    frozen: BTreeMap<String, Tensor>,
}

struct Inner {
    dir: PathBuf,
    files: Vec<CheckpointFile>,
    entries: BTreeMap<String, Entry>,
    requests: Mutex<Requests>,
}

impl Inner {
    fn requests(&self) -> MutexGuard<'_, Requests> {
        // A poisoned lock only means another thread panicked while holding it; the sets stay valid.
        self.requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The value of `entry` as stored (not a Var's), read now, in `dtype` on `device`.
    fn read(&self, entry: &Entry, dtype: DType, device: &Device) -> Result<Tensor> {
        match &entry.source {
            Source::File { file, tensor } => self.files[*file].read(tensor, dtype, device),
            Source::Memory(tensor) => Ok(tensor.to_dtype(dtype)?.to_device(device)?),
        }
    }
}

/// An HF safetensors checkpoint, its files open, each tensor converted to one dtype and device when read.
#[derive(Clone)]
pub struct WeightStore {
    inner: Arc<Inner>,
    dtype: DType,
    device: Device,
}

impl WeightStore {
    /// Opens `dir/model.safetensors`, or the shards named by `dir/model.safetensors.index.json`, and reads
    /// their headers: the index and the files must name the same tensors. Tensors stored as f32, bf16,
    /// f16 or f64 are converted to `dtype` on `device` as models ask for them.
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let mut files = Vec::new();
        let mut entries = BTreeMap::new();
        let mut add_file = |path: PathBuf, listed: Option<&BTreeSet<&str>>| -> Result<()> {
            let (opened, tensors) = CheckpointFile::open(&path)?;
            if let Some(listed) = listed {
                for name in listed {
                    if !tensors.iter().any(|t| t.name == *name) {
                        return Err(checkpoint_error(
                            &path,
                            format!(
                                "tensor `{name}` is listed in {INDEX_FILE} but not in the file"
                            ),
                        ));
                    }
                }
            }
            for tensor in tensors {
                if listed.is_some_and(|listed| !listed.contains(tensor.name.as_str())) {
                    return Err(checkpoint_error(
                        &path,
                        format!(
                            "tensor `{}` is in the file but {INDEX_FILE} does not map it here",
                            tensor.name
                        ),
                    ));
                }
                let entry = Entry {
                    shape: Shape::from(tensor.shape.clone()),
                    file: path.clone(),
                    source: Source::File {
                        file: files.len(),
                        tensor: tensor.clone(),
                    },
                };
                if entries.insert(tensor.name.clone(), entry).is_some() {
                    return Err(checkpoint_error(
                        &path,
                        format!("tensor `{}` is in two files", tensor.name),
                    ));
                }
            }
            files.push(opened);
            Ok(())
        };
        if index_path.is_file() {
            let index: ShardIndex = read_config(&index_path)?;
            let mut by_file: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            for (name, file) in &index.weight_map {
                by_file.entry(file).or_default().insert(name);
            }
            for (file, names) in &by_file {
                add_file(dir.join(file), Some(names))?;
            }
        } else if single_path.is_file() {
            add_file(single_path, None)?;
        } else {
            return Err(checkpoint_error(
                &dir,
                format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
            ));
        }
        tracing::debug!(dir = %dir.display(), tensors = entries.len(), files = files.len(), "checkpoint mapped");
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                files,
                entries,
                requests: Mutex::new(Requests::default()),
            }),
            dtype,
            device: device.clone(),
        })
    }

    /// Builds a store from named tensors already in memory (tests, freshly initialised models).
    /// `origin` stands in for the file name in error messages.
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        origin: impl Into<PathBuf>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let origin = origin.into();
        let mut entries = BTreeMap::new();
        for (name, tensor) in tensors {
            let tensor = tensor.to_dtype(dtype)?.to_device(device)?;
            let entry = Entry {
                shape: tensor.shape().clone(),
                file: origin.clone(),
                source: Source::Memory(tensor),
            };
            entries.insert(name, entry);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir: origin,
                files: Vec::new(),
                entries,
                requests: Mutex::new(Requests::default()),
            }),
            dtype,
            device: device.clone(),
        })
    }

    /// A `VarBuilder` over the checkpoint: a tensor whose full name satisfies `trainable` is
    /// returned as a [`Var`] (kept in this store, see [`Self::trainable_vars`]), any other as a
    /// plain tensor that gradients do not reach.
    pub fn var_builder(
        &self,
        trainable: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> VarBuilder<'static> {
        let backend = StoreBackend {
            inner: self.inner.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
            trainable: Box::new(trainable),
        };
        VarBuilder::from_backend(Box::new(backend), self.dtype, self.device.clone())
    }

    /// A `VarBuilder` in which nothing is trainable (inference, frozen reference models).
    pub fn frozen_var_builder(&self) -> VarBuilder<'static> {
        self.var_builder(|_| false)
    }

    /// The trainable tensors handed out so far, by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let requests = self.inner.requests();
        requests
            .vars
            .iter()
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect()
    }

    /// Names in the checkpoint that no model asked for (so far).
    pub fn unexpected(&self) -> Vec<String> {
        let requests = self.inner.requests();
        self.inner
            .entries
            .keys()
            .filter(|name| !requests.names.contains(*name))
            .cloned()
            .collect()
    }

    /// [`Self::unexpected`], also logged as a warning naming the checkpoint: call it once every
    /// model of the checkpoint is built.
    pub fn report_unexpected(&self) -> Vec<String> {
        let names = self.unexpected();
        if !names.is_empty() {
            tracing::warn!(
                checkpoint = %self.inner.dir.display(),
                count = names.len(),
                names = ?names,
                "checkpoint tensors no model asked for"
            );
        }
        names
    }

    /// Names of every tensor in the checkpoint, sorted.
    pub fn names(&self) -> Vec<String> {
        self.inner.entries.keys().cloned().collect()
    }

    /// Every tensor's name and shape, sorted by name (nothing is read).
    pub fn shapes(&self) -> Vec<(String, Shape)> {
        let entries = self.inner.entries.iter();
        entries.map(|(n, e)| (n.clone(), e.shape.clone())).collect()
    }

    /// The dtype `name` has in its file (for a store built in memory, the store's dtype).
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.inner
            .entries
            .get(name)
            .map(|entry| match &entry.source {
                Source::File { tensor, .. } => tensor.stored,
                Source::Memory(tensor) => tensor.dtype(),
            })
    }

    /// The current value of `name`: a trainable one as the optimizer left it, a frozen one a model holds
    /// as shared with it, any other read now (and not kept).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        {
            let requests = self.inner.requests();
            if let Some(var) = requests.vars.get(name) {
                return Ok(var.as_tensor().clone());
            }
            if let Some(tensor) = requests.frozen.get(name) {
                return Ok(tensor.clone());
            }
        }
        let entry = self
            .inner
            .entries
            .get(name)
            .ok_or_else(|| checkpoint_error(&self.inner.dir, format!("no tensor `{name}`")))?;
        self.inner.read(entry, self.dtype, &self.device)
    }

    /// The current value of every tensor ([`Self::tensor`]), all read into memory at once: prefer
    /// [`Self::save`], which holds one at a time, for writing a checkpoint.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.inner
            .entries
            .keys()
            .map(|name| Ok((name.clone(), self.tensor(name)?)))
            .collect()
    }

    /// Writes the current value of every tensor (trained Vars included) to `dir` as [`save`] does, reading
    /// each one only while it is written. `dir` may be the store's own directory: files are replaced by
    /// rename, so the mapped old ones stay readable until the store is dropped.
    pub fn save(&self, dir: impl AsRef<Path>, dtype: DType, max_shard_bytes: usize) -> Result<()> {
        let names: Vec<&String> = self.inner.entries.keys().collect();
        let fetch: Vec<Box<dyn Fn() -> Result<Tensor> + '_>> = names
            .iter()
            .map(|name| Box::new(move || self.tensor(name)) as Box<dyn Fn() -> Result<Tensor>>)
            .collect();
        let shapes: Vec<&[usize]> = self
            .inner
            .entries
            .values()
            .map(|e| e.shape.dims())
            .collect();
        let items: Vec<ToWrite<'_>> = (0..names.len())
            .map(|i| ToWrite {
                name: names[i],
                shape: shapes[i],
                value: &*fetch[i],
            })
            .collect();
        save_files::save_items(dir.as_ref(), items, dtype, max_shard_bytes)
    }

    /// The directory (or origin) the store was loaded from.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The dtype every tensor is converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device every tensor is moved to.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// `model.safetensors.index.json`.
#[derive(serde::Deserialize, serde::Serialize)]
struct ShardIndex {
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    /// Tensor name -> file name in the checkpoint directory.
    weight_map: BTreeMap<String, String>,
}

fn checkpoint_error(path: &Path, msg: String) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    }
}

#[cfg(test)]
#[path = "weights_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "weights_io_tests.rs"]
mod io_tests;
