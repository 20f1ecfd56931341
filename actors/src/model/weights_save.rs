//! Writing checkpoints: sharding as transformers' `save_pretrained` does, each file atomically, the index
//! last, the other layout's files removed once the new ones are in place.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Tensor};

use super::io::{self, ToWrite};
use super::{checkpoint_error, ShardIndex, INDEX_FILE, SINGLE_FILE};
use crate::{Error, Result};

/// Default shard size of [`save`] callers that do not care: 5 GB, as `save_pretrained`'s default.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Writes `tensors` converted to `dtype` as an HF checkpoint in `dir` (created if needed):
/// `model.safetensors` when the total fits in `max_shard_bytes`, otherwise shards
/// `model-00001-of-0000N.safetensors` and `model.safetensors.index.json`, the layout transformers'
/// `from_pretrained` reads. Checkpoint files of the other layout already in `dir` are removed so
/// that the directory holds exactly one checkpoint.
///
/// Each file is written under a temporary name, synced and renamed into place (the index last), so a
/// crash never leaves a half-written file under a checkpoint name; a directory that must change as a
/// whole is written fresh and renamed, as `src/checkpoint.rs` does.
pub fn save(
    dir: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<()> {
    let fetch: Vec<Box<dyn Fn() -> Result<Tensor> + '_>> = tensors
        .iter()
        .map(|(_, t)| Box::new(move || Ok(t.clone())) as Box<dyn Fn() -> Result<Tensor>>)
        .collect();
    let items = tensors
        .iter()
        .zip(&fetch)
        .map(|((name, tensor), value)| ToWrite {
            name,
            shape: tensor.dims(),
            value: &**value,
        })
        .collect();
    save_items(dir.as_ref(), items, dtype, max_shard_bytes)
}

pub(super) fn save_items(
    dir: &Path,
    items: Vec<ToWrite<'_>>,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut seen = BTreeSet::new();
    for item in &items {
        if !seen.insert(item.name) {
            return Err(checkpoint_error(
                dir,
                format!("tensor `{}` given twice to save", item.name),
            ));
        }
    }
    // Greedy sharding in the given order, as save_pretrained does: start a new shard when the next
    // tensor would overflow the current one (a tensor larger than the limit gets a shard of its own).
    let mut shards: Vec<Vec<ToWrite<'_>>> = vec![vec![]];
    let mut shard_bytes = 0usize;
    let mut total_bytes = 0usize;
    for item in items {
        let bytes = item.shape.iter().product::<usize>() * dtype.size_in_bytes();
        total_bytes += bytes;
        let current_is_empty = shards.last().is_none_or(|s| s.is_empty());
        if shard_bytes + bytes > max_shard_bytes && !current_is_empty {
            shards.push(vec![]);
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        if let Some(shard) = shards.last_mut() {
            shard.push(item);
        }
    }
    let metadata: serde_json::Map<String, serde_json::Value> =
        [("format".to_string(), "pt".into())].into_iter().collect();
    let count = shards.len();
    let file_names: Vec<String> = if count == 1 {
        vec![SINGLE_FILE.to_string()]
    } else {
        (1..=count)
            .map(|k| format!("model-{k:05}-of-{count:05}.safetensors"))
            .collect()
    };
    let mut weight_map = BTreeMap::new();
    for (shard, file) in shards.iter_mut().zip(&file_names) {
        io::write_file(&dir.join(file), shard, dtype, &metadata)?;
        for item in shard.iter() {
            weight_map.insert(item.name.to_string(), file.clone());
        }
    }
    let mut keep = file_names.clone();
    if count > 1 {
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
        io::write_text(&index_path, &text)?;
        keep.push(INDEX_FILE.to_string());
    }
    // The other layout's files (and shards of another count) go only once the new ones are in place: a
    // reader meanwhile sees the old checkpoint or the new one, whole.
    remove_checkpoint_files(dir, &keep)?;
    io::sync_dir(dir)
}

/// Removes `model.safetensors`, `model.safetensors.index.json` and `model-*-of-*.safetensors` not in
/// `keep`.
fn remove_checkpoint_files(dir: &Path, keep: &[String]) -> Result<()> {
    let listing = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in listing.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let is_shard =
            name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors");
        if (name == SINGLE_FILE || name == INDEX_FILE || is_shard) && !keep.contains(&name) {
            std::fs::remove_file(entry.path()).map_err(|source| Error::Io {
                path: entry.path(),
                source,
            })?;
        }
    }
    Ok(())
}
