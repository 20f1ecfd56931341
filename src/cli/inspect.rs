//! `r1v2 inspect --model DIR`: what a model directory holds - architecture, parameters per module, dtypes.
//!
//! Reads only `config.json` and the safetensors headers, so it is instant even on a 38B checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use crate::images::TilingConfig;
use crate::model_dir::{
    architectures, module_of, read_all_headers, read_json, read_safetensors_header, ModelKind,
};
use crate::Result;

/// Arguments of `r1v2 inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model directory (config.json + *.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `inspect` reports.
#[derive(Debug, Serialize)]
pub struct ModelSummary {
    /// `config.json`'s `model_type`.
    pub model_type: String,
    /// `config.json`'s `architectures`.
    pub architectures: Vec<String>,
    /// The family as r1v2 treats it.
    pub kind: String,
    /// Key sizes of the language model (hidden, layers, heads, vocab...).
    pub llm: BTreeMap<String, serde_json::Value>,
    /// Key sizes of the vision tower and the image tiling (chat models only).
    pub vision: BTreeMap<String, serde_json::Value>,
    /// Parameter count per module: `vision`, `adapter`, `llm`, `head`, and `other` if any.
    pub parameters: BTreeMap<String, usize>,
    /// Sum of all parameters.
    pub total_parameters: usize,
    /// Stored dtype -> number of tensors.
    pub dtypes: BTreeMap<String, usize>,
    /// Whether the LM head shares the token embedding (`tie_word_embeddings`).
    pub tied_embeddings: bool,
}

const LLM_KEYS: [&str; 10] = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "num_labels",
];
const VISION_KEYS: [&str; 7] = [
    "image_size",
    "patch_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "norm_type",
    "qk_normalization",
];

const QWEN2_5_VL_VISION_KEYS: [&str; 7] = [
    "depth",
    "hidden_size",
    "num_heads",
    "patch_size",
    "spatial_merge_size",
    "window_size",
    "fullatt_block_indexes",
];

/// Builds the summary of a model directory.
pub fn summarize(dir: &Path) -> Result<ModelSummary> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let kind = ModelKind::from_config(&config, &config_path)?;
    let llm_config = match kind {
        ModelKind::Chat => config.get("llm_config").cloned().unwrap_or_default(),
        ModelKind::Qwen25Vl => config.get("text_config").unwrap_or(&config).clone(),
        _ => config.clone(),
    };
    let pick = |source: &serde_json::Value, keys: &[&str]| -> BTreeMap<String, serde_json::Value> {
        keys.iter()
            .filter_map(|k| source.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect()
    };
    let llm = pick(&llm_config, &LLM_KEYS);
    let mut vision = BTreeMap::new();
    if kind == ModelKind::Qwen25Vl {
        vision = pick(
            config
                .get("vision_config")
                .unwrap_or(&serde_json::Value::Null),
            &QWEN2_5_VL_VISION_KEYS,
        );
    }
    if kind == ModelKind::Chat {
        vision = pick(
            config
                .get("vision_config")
                .unwrap_or(&serde_json::Value::Null),
            &VISION_KEYS,
        );
        let tiling = TilingConfig::from_model_config(&config, &config_path)?;
        vision.insert("tile_size".into(), tiling.tile_size.into());
        vision.insert("max_tiles".into(), tiling.max_tiles.into());
        vision.insert("use_thumbnail".into(), tiling.use_thumbnail.into());
        for key in ["downsample_ratio", "select_layer", "template", "ps_version"] {
            if let Some(value) = config.get(key) {
                vision.insert(key.into(), value.clone());
            }
        }
    }
    let tied_embeddings = llm_config
        .get("tie_word_embeddings")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let tensors = read_all_headers(dir)?;
    let mut parameters: BTreeMap<String, usize> = BTreeMap::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut tensors = tensors;
    if kind == ModelKind::Qwen25Vl {
        // Skywork-VL Reward keeps TRL's value head in its own file.
        let head = dir.join(r1v2_actors::model::qwen2_5_vl::VALUE_HEAD_FILE);
        if head.is_file() {
            tensors.extend(read_safetensors_header(&head)?);
        }
    }
    let modules: &[&str] = match kind {
        ModelKind::Chat | ModelKind::Qwen25Vl => &["vision", "adapter", "llm", "head"],
        _ => &["llm", "head"],
    };
    for module in modules {
        parameters.insert(module.to_string(), 0);
    }
    for (name, info) in &tensors {
        *parameters
            .entry(module_of(kind, name).to_string())
            .or_default() += info.numel();
        *dtypes.entry(info.dtype.to_lowercase()).or_default() += 1;
    }
    Ok(ModelSummary {
        model_type: config["model_type"].as_str().unwrap_or_default().to_owned(),
        architectures: architectures(&config),
        kind: kind.describe().to_owned(),
        llm,
        vision,
        total_parameters: parameters.values().sum(),
        parameters,
        dtypes,
        tied_embeddings,
    })
}

fn human(count: usize) -> String {
    match count {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Text rendering of a summary.
pub fn render(dir: &Path, summary: &ModelSummary) -> String {
    let join = |map: &BTreeMap<String, serde_json::Value>| {
        map.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = format!("model:        {}\n", dir.display());
    out += &format!(
        "model_type:   {} ({})\n",
        summary.model_type,
        summary.architectures.join(", ")
    );
    out += &format!("kind:         {}\n", summary.kind);
    out += &format!("llm:          {}\n", join(&summary.llm));
    if !summary.vision.is_empty() {
        out += &format!("vision:       {}\n", join(&summary.vision));
    }
    let dtypes: Vec<String> = summary
        .dtypes
        .iter()
        .map(|(d, n)| format!("{d} ({n} tensors)"))
        .collect();
    out += &format!("dtype:        {}\n", dtypes.join(", "));
    out += "parameters:\n";
    for (module, count) in &summary.parameters {
        let note = if module == "head" && *count == 0 && summary.tied_embeddings {
            "  (tied to embed_tokens)"
        } else {
            ""
        };
        out += &format!("  {module:<10} {count:>15}  {:>9}{note}\n", human(*count));
    }
    out += &format!(
        "  {:<10} {:>15}  {:>9}\n",
        "total",
        summary.total_parameters,
        human(summary.total_parameters)
    );
    out
}

/// Runs `r1v2 inspect`.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let summary = summarize(&args.model)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", render(&args.model, &summary));
    }
    Ok(())
}
