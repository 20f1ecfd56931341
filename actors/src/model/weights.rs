//! HF checkpoint I/O: safetensors weights (one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`, as transformers' `save_pretrained` writes them) and `config.json`.
//!
//! [`WeightStore`] loads every tensor of a checkpoint once and hands them to models through a
//! candle [`VarBuilder`]: names chosen as trainable come back as [`Var`]s (recorded, so an optimizer
//! sees exactly them), the rest as plain tensors that never receive a gradient. Names the model asks
//! for but the checkpoint lacks, or with another shape, are errors naming the tensor and the file;
//! names in the checkpoint that no model asked for are reported by [`WeightStore::unexpected`].
//! [`save`] writes the same layout back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

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

/// One loaded tensor and the file it came from (for error messages).
struct Entry {
    tensor: Tensor,
    file: PathBuf,
}

/// What models asked for so far.
#[derive(Default)]
struct Requests {
    /// Every name handed out.
    names: BTreeSet<String>,
    /// The trainable ones, one `Var` per name (a name asked twice, as tied embeddings do, shares it).
    vars: BTreeMap<String, Var>,
}

struct Inner {
    dir: PathBuf,
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
}

/// Every tensor of an HF safetensors checkpoint, converted to one dtype and device.
#[derive(Clone)]
pub struct WeightStore {
    inner: Arc<Inner>,
    dtype: DType,
    device: Device,
}

impl WeightStore {
    /// Loads `dir/model.safetensors`, or the shards named by `dir/model.safetensors.index.json`.
    /// Tensors stored as f32, bf16 or f16 are converted to `dtype` on `device`.
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let mut entries = BTreeMap::new();
        if index_path.is_file() {
            let index: ShardIndex = read_config(&index_path)?;
            let mut by_file: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            for (name, file) in &index.weight_map {
                by_file.entry(file).or_default().insert(name);
            }
            for (file, names) in by_file {
                let path = dir.join(file);
                let loaded = load_file(&path, dtype, device)?;
                for name in names {
                    if !loaded.contains_key(name) {
                        return Err(checkpoint_error(
                            &path,
                            format!(
                                "tensor `{name}` is listed in {INDEX_FILE} but not in the file"
                            ),
                        ));
                    }
                }
                for (name, tensor) in loaded {
                    if index.weight_map.get(&name).map(String::as_str) != Some(file) {
                        return Err(checkpoint_error(
                            &path,
                            format!("tensor `{name}` is in the file but {INDEX_FILE} does not map it here"),
                        ));
                    }
                    let file = path.clone();
                    entries.insert(name, Entry { tensor, file });
                }
            }
        } else if single_path.is_file() {
            for (name, tensor) in load_file(&single_path, dtype, device)? {
                let file = single_path.clone();
                entries.insert(name, Entry { tensor, file });
            }
        } else {
            return Err(checkpoint_error(
                &dir,
                format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
            ));
        }
        tracing::debug!(dir = %dir.display(), tensors = entries.len(), "checkpoint loaded");
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
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
            let file = origin.clone();
            entries.insert(name, Entry { tensor, file });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir: origin,
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

    /// The current value of every tensor: trainable ones as the optimizer left them, the rest as
    /// loaded. This is what [`save`] needs to write a checkpoint after training.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let requests = self.inner.requests();
        self.inner
            .entries
            .iter()
            .map(|(name, entry)| {
                let tensor = match requests.vars.get(name) {
                    Some(var) => var.as_tensor().clone(),
                    None => entry.tensor.clone(),
                };
                (name.clone(), tensor)
            })
            .collect()
    }

    /// The directory (or origin) the store was loaded from.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The dtype every tensor was converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device every tensor lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// `model.safetensors.index.json`.
#[derive(serde::Deserialize, serde::Serialize)]
struct ShardIndex {
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    weight_map: BTreeMap<String, String>,
}

fn checkpoint_error(path: &Path, msg: String) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    }
}

/// Reads every tensor of one safetensors file, converted to `dtype` on `device`.
fn load_file(path: &Path, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|err| checkpoint_error(path, format!("not a safetensors file: {err}")))?;
    let mut out = HashMap::new();
    for (name, view) in file.tensors() {
        let stored = view.dtype();
        if !matches!(
            stored,
            safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16
        ) {
            return Err(checkpoint_error(
                path,
                format!(
                    "tensor `{name}` is stored as {stored:?}; only f32, bf16 and f16 are supported"
                ),
            ));
        }
        let tensor = view
            .load(&Device::Cpu)
            .map_err(|err| checkpoint_error(path, format!("tensor `{name}`: {err}")))?;
        out.insert(name, tensor.to_dtype(dtype)?.to_device(device)?);
    }
    Ok(out)
}

/// The candle backend behind [`WeightStore::var_builder`].
struct StoreBackend {
    inner: Arc<Inner>,
    trainable: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

impl SimpleBackend for StoreBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let entry = self.inner.entries.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "checkpoint {}: missing tensor `{name}` (the model expects shape {:?})",
                self.inner.dir.display(),
                shape.dims()
            ))
        })?;
        if entry.tensor.shape() != &shape {
            return Err(candle_core::Error::Msg(format!(
                "checkpoint {}: tensor `{name}` has shape {:?}, the model expects {:?}",
                entry.file.display(),
                entry.tensor.dims(),
                shape.dims()
            )));
        }
        let tensor = entry.tensor.to_dtype(dtype)?.to_device(device)?;
        let mut requests = self.inner.requests();
        requests.names.insert(name.to_string());
        if !(self.trainable)(name) {
            return Ok(tensor);
        }
        if let Some(var) = requests.vars.get(name) {
            if var.dtype() == dtype && var.device().same_device(device) {
                return Ok(var.as_tensor().clone());
            }
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` is trainable and was already handed out as {:?}; asked again as {dtype:?}",
                var.dtype()
            )));
        }
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        requests.vars.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let shape = match self.inner.entries.get(name) {
            Some(entry) => entry.tensor.shape().clone(),
            None => Shape::from(()),
        };
        self.get(shape, name, candle_nn::Init::Const(0.), dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.entries.contains_key(name)
    }
}

/// Default shard size of [`save`] callers that do not care: 5 GB, as `save_pretrained`'s default.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Writes `tensors` converted to `dtype` as an HF checkpoint in `dir` (created if needed):
/// `model.safetensors` when the total fits in `max_shard_bytes`, otherwise shards
/// `model-00001-of-0000N.safetensors` and `model.safetensors.index.json`, the layout transformers'
/// `from_pretrained` reads. Checkpoint files of the other layout already in `dir` are removed so
/// that the directory holds exactly one checkpoint.
pub fn save(
    dir: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<()> {
    let dir = dir.as_ref();
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut seen = BTreeSet::new();
    let mut converted = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(checkpoint_error(
                dir,
                format!("tensor `{name}` given twice to save"),
            ));
        }
        let tensor = tensor
            .detach()
            .to_dtype(dtype)?
            .to_device(&Device::Cpu)?
            .contiguous()?;
        converted.push((name.clone(), tensor));
    }
    // Greedy sharding in the given order, as save_pretrained does: start a new shard when the next
    // tensor would overflow the current one (a tensor larger than the limit gets a shard of its own).
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut shard_bytes = 0usize;
    let mut total_bytes = 0usize;
    for (i, (_, tensor)) in converted.iter().enumerate() {
        let bytes = tensor.elem_count() * dtype.size_in_bytes();
        total_bytes += bytes;
        let current_is_empty = shards.last().is_none_or(|s| s.is_empty());
        if shard_bytes + bytes > max_shard_bytes && !current_is_empty {
            shards.push(vec![]);
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        if let Some(shard) = shards.last_mut() {
            shard.push(i);
        }
    }
    remove_checkpoint_files(dir)?;
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let write = |path: &Path, members: &[usize]| -> Result<()> {
        let data = members
            .iter()
            .map(|&i| (converted[i].0.as_str(), &converted[i].1));
        safetensors::serialize_to_file(data, Some(metadata.clone()), path)
            .map_err(|err| checkpoint_error(path, format!("cannot write: {err}")))
    };
    if shards.len() == 1 {
        return write(&dir.join(SINGLE_FILE), &shards[0]);
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    for (k, members) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", k + 1);
        write(&dir.join(&file), members)?;
        for &i in members {
            weight_map.insert(converted[i].0.clone(), file.clone());
        }
    }
    let mut meta = serde_json::Map::new();
    meta.insert("total_size".into(), total_bytes.into());
    let index = ShardIndex {
        metadata: meta,
        weight_map,
    };
    let index_path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index).map_err(|source| Error::Json {
        path: index_path.clone(),
        source,
    })?;
    std::fs::write(&index_path, text).map_err(io_err(&index_path))
}

/// Removes `model.safetensors`, `model.safetensors.index.json` and `model-*-of-*.safetensors`.
fn remove_checkpoint_files(dir: &Path) -> Result<()> {
    let listing = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in listing.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let is_shard =
            name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors");
        if name == SINGLE_FILE || name == INDEX_FILE || is_shard {
            std::fs::remove_file(entry.path()).map_err(|source| Error::Io {
                path: entry.path(),
                source,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "weights_tests.rs"]
mod tests;
