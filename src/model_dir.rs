//! A model directory in the Hugging Face layout: `config.json`, safetensors weights (one file or sharded
//! through `model.safetensors.index.json`), optionally `tokenizer.json`; and the device names models are
//! placed on. Shared by the CLI, the prompt encoder and the controller.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::{Error, Result};
use r1v2_actors::model::weights::{INDEX_FILE, SINGLE_FILE};

/// The supported model families, from `config.json`'s `model_type` (and `architectures` for qwen2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// `qwen2` with `Qwen2ForCausalLM` (or no `architectures`): logits over the vocabulary.
    Qwen2CausalLm,
    /// `qwen2` with `Qwen2ForSequenceClassification` / `Qwen2ForRewardModel`: one score per sequence.
    Qwen2ValueHead,
    /// `internvl_chat` or `skywork_chat`: InternViT + `mlp1` + Qwen2 (`vision_model.*`, `mlp1.*`,
    /// `language_model.*`).
    Chat,
    /// `qwen2_5_vl`: Qwen2.5-VL (`visual.*`, `model.*`, `lm_head`), with a TRL value head when
    /// `value_head.safetensors` sits beside it (Skywork-VL Reward).
    Qwen25Vl,
}

/// The model types `forward` and `inspect` accept, for error messages.
pub const SUPPORTED_MODEL_TYPES: &str = "qwen2, internvl_chat, skywork_chat, qwen2_5_vl";

impl ModelKind {
    /// Reads the kind from a parsed `config.json`; an unknown `model_type` is an error naming the file.
    pub fn from_config(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::File {
                path: path.to_path_buf(),
                msg: "no string `model_type`".into(),
            })?;
        match model_type {
            "qwen2" => {
                let architectures = architectures(config);
                let value_head = architectures.iter().any(|a| {
                    a.ends_with("ForSequenceClassification")
                        || a.ends_with("ForRewardModel")
                        || a.contains("ValueHead")
                });
                Ok(if value_head {
                    ModelKind::Qwen2ValueHead
                } else {
                    ModelKind::Qwen2CausalLm
                })
            }
            "internvl_chat" | "skywork_chat" => Ok(ModelKind::Chat),
            "qwen2_5_vl" => Ok(ModelKind::Qwen25Vl),
            other => Err(Error::File {
                path: path.to_path_buf(),
                msg: format!(
                    "unsupported `model_type` \"{other}\" (supported: {SUPPORTED_MODEL_TYPES})"
                ),
            }),
        }
    }

    /// A short human name.
    pub fn describe(self) -> &'static str {
        match self {
            ModelKind::Qwen2CausalLm => "Qwen2 causal LM",
            ModelKind::Qwen2ValueHead => "Qwen2 with a value head (one score per sequence)",
            ModelKind::Chat => "InternVL-chat (InternViT + mlp1 adapter + Qwen2)",
            ModelKind::Qwen25Vl => "Qwen2.5-VL (vision tower + patch merger + Qwen2 with mrope)",
        }
    }
}

/// The `architectures` list of a config (empty when absent).
pub fn architectures(config: &serde_json::Value) -> Vec<String> {
    config
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|list| {
            list.iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads and parses a JSON file; errors name the file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|err| Error::File {
        path: path.to_path_buf(),
        msg: format!("invalid JSON: {err}"),
    })
}

/// The weight files of a model directory, as the checkpoint loader reads them: the shards named by
/// `model.safetensors.index.json`, else `model.safetensors` (other files, e.g. test references, are not
/// weights). Neither is an error naming the directory.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::File {
                path: index.clone(),
                msg: "no `weight_map` object".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::File {
        path: dir.to_path_buf(),
        msg: "no weights: neither model.safetensors nor model.safetensors.index.json".into(),
    })
}

/// Name, dtype and shape of one stored tensor (from a safetensors header, without reading the data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Dtype as safetensors writes it (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Reads the header of one safetensors file: tensor name -> info. Errors name the file.
pub fn read_safetensors_header(path: &Path) -> Result<BTreeMap<String, TensorInfo>> {
    let bad = |msg: String| Error::File {
        path: path.to_path_buf(),
        msg,
    };
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .map_err(|err| bad(format!("not a safetensors file: {err}")))?;
    let length = u64::from_le_bytes(length);
    let file_len = file
        .metadata()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if length > file_len.saturating_sub(8) || length > 100_000_000 {
        return Err(bad(format!(
            "not a safetensors file: header length {length} exceeds the file"
        )));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header)
        .map_err(|err| bad(format!("truncated safetensors header: {err}")))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|err| bad(format!("invalid safetensors header: {err}")))?;
    let object = json
        .as_object()
        .ok_or_else(|| bad("safetensors header is not an object".into()))?;
    let mut tensors = BTreeMap::new();
    for (name, entry) in object {
        if name == "__metadata__" {
            continue;
        }
        let dtype = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad(format!("tensor `{name}`: no dtype")))?;
        let shape = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad(format!("tensor `{name}`: no shape")))?;
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype: dtype.to_owned(),
                shape,
            },
        );
    }
    Ok(tensors)
}

/// Every tensor of a model directory (all shards).
pub fn read_all_headers(dir: &Path) -> Result<BTreeMap<String, TensorInfo>> {
    let mut tensors = BTreeMap::new();
    for file in weight_files(dir)? {
        tensors.extend(read_safetensors_header(&file)?);
    }
    Ok(tensors)
}

/// Which part of the model a tensor belongs to: `vision`, `adapter`, `llm`, `head` or `other`.
pub fn module_of(kind: ModelKind, name: &str) -> &'static str {
    let llm_name = match kind {
        ModelKind::Chat => {
            if name.starts_with("vision_model.") {
                return "vision";
            }
            if name.starts_with("mlp1.") {
                return "adapter";
            }
            match name.strip_prefix("language_model.") {
                Some(rest) => rest,
                None => return "other",
            }
        }
        ModelKind::Qwen25Vl => {
            let visual = name
                .strip_prefix("visual.")
                .or_else(|| name.strip_prefix("model.visual."));
            match visual {
                Some(rest) if rest.starts_with("merger.") => return "adapter",
                Some(_) => return "vision",
                None => match name.strip_prefix("model.language_model.") {
                    Some(_) => return "llm",
                    None => name,
                },
            }
        }
        ModelKind::Qwen2CausalLm | ModelKind::Qwen2ValueHead => name,
    };
    if llm_name.starts_with("lm_head.")
        || llm_name.starts_with("score.")
        || llm_name.starts_with("v_head.")
    {
        "head"
    } else if llm_name.starts_with("model.") {
        "llm"
    } else {
        "other"
    }
}

/// The device a name stands for: `cpu` or `cuda:N`. An unknown name, a GPU index past the ones present or a
/// build without the `cuda` feature is an error naming the device (`r1v2_actors::device`).
pub fn parse_device(name: &str) -> Result<Device> {
    Ok(r1v2_actors::device::parse_device(name)?)
}
