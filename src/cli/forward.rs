//! `r1v2 forward --model DIR --input FILE.json --output FILE.safetensors`: one full-sequence forward pass.
//!
//! Input: `{"input_ids": [[...], ...], "images": ["path", ...], "attention_mask": [[...], ...]}`. All rows
//! have the same length; the optional `attention_mask` (1 = token, 0 = padding, same shape) marks padding.
//! `images` (chat models only) are paths relative to the input file; the ids already hold `<img>`, the
//! `<IMG_CONTEXT>` run of each image (tokens per tile x tiles, thumbnail included) and `</img>`; the images
//! fill the `<IMG_CONTEXT>` positions in order, across the whole batch, as InternVL's `forward` does.
//! Output: `logits` f32 `[batch, seq, vocab]`, or `scores` f32 `[batch]` for a value-head model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde::Deserialize;

use r1v2_actors::model::chat::{ChatModel, Trainable};
use r1v2_actors::model::qwen2;
use r1v2_actors::model::value_head::ValueModel;
use r1v2_actors::model::weights::WeightStore;

use crate::images::{load_image, TilingConfig};
use crate::model_dir::{parse_device, read_json, ModelKind};
use crate::text::tokenizer::IMG_CONTEXT;
use crate::text::Tokenizer;
use crate::{Error, Result};

/// Arguments of `r1v2 forward`.
#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// Model directory (config.json + *.safetensors; tokenizer.json when images are given).
    #[arg(long)]
    pub model: PathBuf,
    /// Input JSON: `{"input_ids": [[...]], "images": ["path", ...]}`.
    #[arg(long)]
    pub input: PathBuf,
    /// Output safetensors file (`logits` or `scores`).
    #[arg(long)]
    pub output: PathBuf,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The input file's contents.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardInput {
    /// Token ids, one row per sequence, all rows the same length.
    pub input_ids: Vec<Vec<u32>>,
    /// Image files (relative to the input file), in the order their `<IMG_CONTEXT>` runs appear.
    #[serde(default)]
    pub images: Vec<String>,
    /// Optional padding mask, the shape of `input_ids`: 1 = token, 0 = padding (anywhere in a row).
    #[serde(default)]
    pub attention_mask: Option<Vec<Vec<u32>>>,
}

impl ForwardInput {
    /// Reads and checks an input file; errors name the file and the offending row.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let input: Self = serde_json::from_str(&text).map_err(|err| Error::File {
            path: path.to_path_buf(),
            msg: format!("invalid forward input: {err}"),
        })?;
        let bad = |msg: String| Error::File {
            path: path.to_path_buf(),
            msg,
        };
        let Some(first) = input.input_ids.first() else {
            return Err(bad("`input_ids` is empty".into()));
        };
        if first.is_empty() {
            return Err(bad("`input_ids[0]` is empty".into()));
        }
        if let Some((row, ids)) = input
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, ids)| ids.len() != first.len())
        {
            return Err(bad(format!(
                "`input_ids[{row}]` has {} tokens but `input_ids[0]` has {}: rows must have equal lengths",
                ids.len(),
                first.len()
            )));
        }
        if let Some(mask) = &input.attention_mask {
            if mask.len() != input.input_ids.len() {
                return Err(bad(format!(
                    "`attention_mask` has {} rows but `input_ids` has {}",
                    mask.len(),
                    input.input_ids.len()
                )));
            }
            for (row, (mask_row, ids)) in mask.iter().zip(&input.input_ids).enumerate() {
                if mask_row.len() != ids.len() {
                    return Err(bad(format!(
                        "`attention_mask[{row}]` has {} entries, `input_ids[{row}]` {}",
                        mask_row.len(),
                        ids.len()
                    )));
                }
                if mask_row.iter().any(|&m| m > 1) {
                    return Err(bad(format!(
                        "`attention_mask[{row}]` holds values other than 0 and 1"
                    )));
                }
                if !mask_row.contains(&1) {
                    return Err(bad(format!("`attention_mask[{row}]` masks every token")));
                }
            }
        }
        Ok(input)
    }

    /// `attention_mask` as a u32 tensor `(batch, seq)`, if given.
    pub fn mask_tensor(&self, device: &Device) -> Result<Option<Tensor>> {
        let Some(mask) = &self.attention_mask else {
            return Ok(None);
        };
        let (batch, seq) = (mask.len(), self.input_ids[0].len());
        let flat: Vec<u32> = mask.iter().flatten().copied().collect();
        Ok(Some(Tensor::from_vec(flat, (batch, seq), device)?))
    }

    /// `input_ids` as a u32 tensor `(batch, seq)`.
    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        let (batch, seq) = (self.input_ids.len(), self.input_ids[0].len());
        let flat: Vec<u32> = self.input_ids.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (batch, seq), device)?)
    }

    /// The largest id, to check against the vocabulary.
    pub fn max_id(&self) -> u32 {
        self.input_ids.iter().flatten().copied().max().unwrap_or(0)
    }
}

/// The images of an input, preprocessed with the model's tiling, concatenated: `(tiles, 3, S, S)` and the
/// tile count of each image.
pub fn load_input_images(
    input: &ForwardInput,
    input_path: &Path,
    tiling: &TilingConfig,
    device: &Device,
) -> Result<(Tensor, Vec<usize>)> {
    let base = input_path.parent().unwrap_or(Path::new("."));
    let mut pixel_values = Vec::with_capacity(input.images.len());
    let mut tiles = Vec::with_capacity(input.images.len());
    for image in &input.images {
        let image = load_image(&base.join(image), tiling, device)?;
        tiles.push(image.num_tiles());
        pixel_values.push(image.pixel_values);
    }
    Ok((Tensor::cat(&pixel_values, 0)?, tiles))
}

/// Checks that the ids hold exactly as many `<IMG_CONTEXT>` tokens as the images need.
pub fn check_image_tokens(
    input: &ForwardInput,
    input_path: &Path,
    context_id: u32,
    tiles: &[usize],
    tokens_per_tile: usize,
) -> Result<()> {
    let found = input
        .input_ids
        .iter()
        .flatten()
        .filter(|&&id| id == context_id)
        .count();
    let needed = tiles.iter().sum::<usize>() * tokens_per_tile;
    if found != needed {
        return Err(Error::File {
            path: input_path.to_path_buf(),
            msg: format!(
                "`input_ids` hold {found} `{IMG_CONTEXT}` (id {context_id}) tokens but the images need {needed} \
                 ({tiles:?} tiles x {tokens_per_tile} tokens per tile)"
            ),
        });
    }
    Ok(())
}

/// What a forward pass produces.
pub enum ForwardOutput {
    /// f32 `(batch, seq, vocab)`.
    Logits(Tensor),
    /// f32 `(batch,)`.
    Scores(Tensor),
}

/// Writes the output safetensors file.
pub fn write_output(output: ForwardOutput, path: &Path) -> Result<()> {
    let (name, tensor) = match output {
        ForwardOutput::Logits(t) => ("logits", t),
        ForwardOutput::Scores(t) => ("scores", t),
    };
    let tensor = tensor.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let map = HashMap::from([(name.to_string(), tensor)]);
    candle_core::safetensors::save(&map, path).map_err(|err| Error::File {
        path: path.to_path_buf(),
        msg: format!("cannot write output: {err}"),
    })
}

/// Checks every id against the vocabulary size; the error names the input file.
fn check_vocab(input: &ForwardInput, input_path: &Path, vocab_size: usize) -> Result<()> {
    let max_id = input.max_id();
    if max_id as usize >= vocab_size {
        return Err(Error::File {
            path: input_path.to_path_buf(),
            msg: format!("token id {max_id} is out of the model's vocabulary ({vocab_size} ids)"),
        });
    }
    Ok(())
}

fn qwen2_parts(model_dir: &Path, device: &Device) -> Result<(qwen2::Config, WeightStore)> {
    let config = qwen2::Config::from_file(&model_dir.join("config.json"))?;
    let weights = WeightStore::load(model_dir, DType::F32, device)?;
    Ok((config, weights))
}

/// Tensors the model did not use are reported (they are not silently ignored).
fn report_unexpected(weights: &WeightStore) {
    let unexpected = weights.unexpected();
    if !unexpected.is_empty() {
        tracing::warn!(dir = %weights.dir().display(), count = unexpected.len(), first = %unexpected[0],
            "checkpoint tensors not used by the model");
    }
}

fn forward_qwen2(
    model_dir: &Path,
    input: &ForwardInput,
    input_path: &Path,
    device: &Device,
) -> Result<ForwardOutput> {
    let (config, weights) = qwen2_parts(model_dir, device)?;
    check_vocab(input, input_path, config.vocab_size)?;
    let model = qwen2::ForCausalLM::new(&config, weights.frozen_var_builder())?;
    report_unexpected(&weights);
    let logits = model.forward(
        &input.ids_tensor(device)?,
        input.mask_tensor(device)?.as_ref(),
    )?;
    Ok(ForwardOutput::Logits(logits))
}

fn forward_value_head(
    model_dir: &Path,
    input: &ForwardInput,
    input_path: &Path,
    device: &Device,
) -> Result<ForwardOutput> {
    let (config, weights) = qwen2_parts(model_dir, device)?;
    check_vocab(input, input_path, config.vocab_size)?;
    let model = ValueModel::new(&config, weights.frozen_var_builder())?;
    report_unexpected(&weights);
    let scores = model.forward(
        &input.ids_tensor(device)?,
        input.mask_tensor(device)?.as_ref(),
    )?;
    Ok(ForwardOutput::Scores(scores))
}

fn forward_chat(
    model_dir: &Path,
    config: &serde_json::Value,
    config_path: &Path,
    input: &ForwardInput,
    input_path: &Path,
    device: &Device,
) -> Result<ForwardOutput> {
    let tiling = TilingConfig::from_model_config(config, config_path)?;
    let tokens_per_tile = TilingConfig::tokens_per_tile(config, config_path)?;
    let mut loaded = ChatModel::load(model_dir, DType::F32, device, Trainable::frozen())?;
    check_vocab(input, input_path, loaded.model.llm.config().vocab_size)?;
    let pixel_values = if input.images.is_empty() {
        None
    } else {
        // The IMG_CONTEXT id comes from the model's tokenizer.json (an error naming it when absent).
        let tokenizer = Tokenizer::from_model_dir(model_dir)?;
        let context_id = tokenizer.token_id(IMG_CONTEXT)?;
        loaded.model.set_img_context_token_id(context_id);
        let (pixel_values, tiles) = load_input_images(input, input_path, &tiling, device)?;
        check_image_tokens(input, input_path, context_id, &tiles, tokens_per_tile)?;
        Some(pixel_values)
    };
    let logits = loaded.model.forward(
        &input.ids_tensor(device)?,
        pixel_values.as_ref(),
        input.mask_tensor(device)?.as_ref(),
    )?;
    Ok(ForwardOutput::Logits(logits))
}

/// Runs `r1v2 forward`.
pub fn run(args: ForwardArgs) -> anyhow::Result<()> {
    let config_path = args.model.join("config.json");
    let config = read_json(&config_path)?;
    let kind = ModelKind::from_config(&config, &config_path)?;
    let input = ForwardInput::from_file(&args.input)?;
    let device = parse_device(&args.device)?;
    if !input.images.is_empty() && !matches!(kind, ModelKind::Chat | ModelKind::Qwen25Vl) {
        return Err(Error::File {
            path: args.input.clone(),
            msg: format!("`images` given but {} takes no images", kind.describe()),
        }
        .into());
    }
    let output = match kind {
        ModelKind::Qwen2CausalLm => forward_qwen2(&args.model, &input, &args.input, &device)?,
        ModelKind::Qwen2ValueHead => forward_value_head(&args.model, &input, &args.input, &device)?,
        ModelKind::Qwen25Vl => {
            super::forward_qwen2_5_vl::forward(&args.model, &input, &args.input, &device)?
        }
        ModelKind::Chat => forward_chat(
            &args.model,
            &config,
            &config_path,
            &input,
            &args.input,
            &device,
        )?,
    };
    write_output(output, &args.output)?;
    tracing::info!(output = %args.output.display(), "forward done");
    Ok(())
}
