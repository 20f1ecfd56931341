//! From a question and image files to what the chat model takes: token ids with the chat template applied
//! and each image's `<IMG_CONTEXT>` run, plus the image tiles.
//!
//! [`PromptEncoder`] ties together the pieces of [`crate::text`] (tokenizer, [`ChatTemplate`],
//! `<image>` expansion) and [`crate::images`] (InternVL tiling and Pillow-exact preprocessing), read from
//! a model directory, as InternVL's `chat` does: one `<image>` placeholder per image (a single image
//! without one gets `<image>\n` in front), each replaced by `<img>` + `<IMG_CONTEXT>` x (tokens per tile
//! x tiles) + `</img>`. It also knows the model's stop tokens and decodes responses.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::images::{load_image, TilingConfig};
use crate::model_dir::{read_json, ModelKind};
use crate::text::tokenizer::{END_OF_TEXT, IMG_CONTEXT, IM_END};
use crate::text::{encode_prompt, ChatTemplate, Tokenizer};
use crate::{Error, Result};

/// How a model that takes images cuts them, read from its config.json.
#[derive(Debug, Clone, Copy)]
struct ImageSetup {
    tiling: TilingConfig,
    tokens_per_tile: usize,
}

/// A prompt ready for the generation engine (`r1v2_actors::generate::PromptInput`).
#[derive(Debug, Clone)]
pub struct EncodedText {
    /// The prompt's token ids: chat template applied, every image's `<IMG_CONTEXT>` run in place.
    pub token_ids: Vec<u32>,
    /// The tiles of all images, in order: `(tiles, 3, S, S)` in the encoder's dtype; none without images.
    pub pixel_values: Option<Tensor>,
}

/// Turns (question, image files) into prompts for a chat or Qwen2 model, and responses back into text.
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// None for a model that takes no images (a plain Qwen2).
    images: Option<ImageSetup>,
    stop_token_ids: Vec<u32>,
    /// The model directory's config.json (named in errors).
    config_path: PathBuf,
    device: Device,
    dtype: DType,
}

impl PromptEncoder {
    /// Reads tokenizer.json and config.json (image size, max tiles, thumbnail, tokens per tile) of a chat or
    /// Qwen2 model dir.
    ///
    /// Tiles come out in `dtype` on `device`. The template has no system message (set one with
    /// [`Self::with_template`]). Stop tokens: generation_config.json's `eos_token_id` (a number or a list)
    /// when the file exists, plus `<|im_end|>` and `<|endoftext|>` when the tokenizer has them.
    pub fn from_model_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let images =
            match ModelKind::from_config(&config, &config_path)? {
                ModelKind::Chat => Some(ImageSetup {
                    tiling: TilingConfig::from_model_config(&config, &config_path)?,
                    tokens_per_tile: TilingConfig::tokens_per_tile(&config, &config_path)?,
                }),
                ModelKind::Qwen2CausalLm | ModelKind::Qwen2ValueHead => None,
                ModelKind::Qwen25Vl => return Err(Error::File {
                    path: config_path,
                    msg:
                        "qwen2_5_vl: the prompt encoder does not place Qwen2.5-VL image tokens yet"
                            .into(),
                }),
            };
        let tokenizer = Tokenizer::from_model_dir(dir)?;
        let mut stop_token_ids = generation_config_eos(&dir.join("generation_config.json"))?;
        for token in [IM_END, END_OF_TEXT] {
            if let Ok(id) = tokenizer.token_id(token) {
                if !stop_token_ids.contains(&id) {
                    stop_token_ids.push(id);
                }
            }
        }
        Ok(Self {
            tokenizer,
            template: ChatTemplate::default(),
            images,
            stop_token_ids,
            config_path,
            device: device.clone(),
            dtype,
        })
    }

    /// The same encoder with another chat template (system message, generation prefix).
    pub fn with_template(mut self, template: ChatTemplate) -> Self {
        self.template = template;
        self
    }

    /// The chat template prompts are rendered with.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Whether the model takes images (a chat model).
    pub fn takes_images(&self) -> bool {
        self.images.is_some()
    }

    /// `<IMG_CONTEXT>` tokens per image tile, for a model that takes images.
    pub fn tokens_per_tile(&self) -> Option<usize> {
        self.images.map(|setup| setup.tokens_per_tile)
    }

    /// Chat template applied, one `<image>` placeholder per image expanded to its IMG_CONTEXT run, tiles
    /// preprocessed.
    ///
    /// Errors: an empty question; images for a model that takes none (naming its config.json); an image
    /// file that cannot be read or decoded (naming it); placeholders that do not match the images; a
    /// tokenizer without the image tokens (naming tokenizer.json).
    pub fn encode(&self, question: &str, images: &[PathBuf]) -> Result<EncodedText> {
        if question.trim().is_empty() {
            return Err(Error::Msg("the prompt is empty".into()));
        }
        if images.is_empty() {
            let token_ids = encode_prompt(&self.tokenizer, &self.template, question, &[], 0)?;
            return Ok(EncodedText {
                token_ids,
                pixel_values: None,
            });
        }
        let Some(setup) = self.images else {
            return Err(Error::File {
                path: self.config_path.clone(),
                msg: format!(
                    "{} image(s) given, but this model (a Qwen2 LLM) takes no images",
                    images.len()
                ),
            });
        };
        let context_id = self.tokenizer.image_token_ids()?.context;
        let mut tiles = Vec::with_capacity(images.len());
        let mut pixel_values = Vec::with_capacity(images.len());
        for path in images {
            let image = load_image(path, &setup.tiling, &self.device)?;
            tiles.push(image.num_tiles());
            pixel_values.push(image.pixel_values);
        }
        let token_ids = encode_prompt(
            &self.tokenizer,
            &self.template,
            question,
            &tiles,
            setup.tokens_per_tile,
        )?;
        // The tokenizer must keep every `<IMG_CONTEXT>` whole (it is an added token of InternVL's vocab).
        let found = token_ids.iter().filter(|&&id| id == context_id).count();
        let needed = tiles.iter().sum::<usize>() * setup.tokens_per_tile;
        if found != needed {
            return Err(Error::File {
                path: self.tokenizer.path().to_path_buf(),
                msg: format!(
                    "the prompt encodes to {found} `{IMG_CONTEXT}` tokens, its images ({tiles:?} tiles x {} \
                     tokens per tile) need {needed}: the question may hold `{IMG_CONTEXT}` itself",
                    setup.tokens_per_tile
                ),
            });
        }
        let pixel_values = Tensor::cat(&pixel_values, 0)?.to_dtype(self.dtype)?; // (tiles, 3, S, S)
        Ok(EncodedText {
            token_ids,
            pixel_values: Some(pixel_values),
        })
    }

    /// The text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true)
    }

    /// EOS / end-of-turn ids (generation_config.json eos_token_id if present, plus <|im_end|> /
    /// <|endoftext|> when in the vocab).
    pub fn stop_token_ids(&self) -> Vec<u32> {
        self.stop_token_ids.clone()
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// `eos_token_id` of a generation_config.json (a number, a list of numbers, or absent/null); no file gives
/// no ids. Errors name the file.
fn generation_config_eos(path: &Path) -> Result<Vec<u32>> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let config = read_json(path)?;
    let bad = |value: &serde_json::Value| Error::File {
        path: path.to_path_buf(),
        msg: format!("`eos_token_id` must be a token id or a list of them, got {value}"),
    };
    let id = |value: &serde_json::Value| {
        value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(value))
    };
    match config.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(list)) => list.iter().map(id).collect(),
        Some(value) => Ok(vec![id(value)?]),
    }
}

#[cfg(test)]
#[path = "prompting_tests.rs"]
mod tests;
