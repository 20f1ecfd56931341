//! From a question and image files to what the policy model takes: token ids with the chat template applied
//! and each image's `<IMG_CONTEXT>` run, plus the image tiles.
//!
//! [`PromptEncoder`] ties together the pieces of [`crate::text`] (tokenizer, [`ChatTemplate`],
//! `<image>` expansion) and [`crate::images`] (InternVL tiling and Pillow-exact preprocessing), read from
//! a model directory, as InternVL's `chat` does: one `<image>` placeholder per image (a single image
//! without one gets `<image>\n` in front), each replaced by `<img>` + `<IMG_CONTEXT>` x (tokens per tile
//! x tiles) + `</img>`. For Qwen2.5-VL each image becomes `<|vision_start|>` + `<|image_pad|>` x (merged
//! patches: the processor's smart-resized grid / merge size²) + `<|vision_end|>`, at its `<image>` placeholder
//! or, without placeholders, all in front of the question (transformers' chat template with the image items
//! first, as `train-rm` encodes them), and the pixels are the processor's flattened patches. It also knows the
//! model's stop tokens and decodes responses.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use r1v2_actors::model::qwen2_5_vl::{Config as VlConfig, Images};

use crate::images::qwen2_vl::{load_images, ProcessorConfig};
use crate::images::{load_image, TilingConfig};
use crate::model_dir::{read_json, ModelKind};
use crate::text::chat::IMAGE_PLACEHOLDER;
use crate::text::tokenizer::{END_OF_TEXT, IMG_CONTEXT, IM_END};
use crate::text::{encode_prompt, ChatTemplate, Tokenizer};
use crate::{Error, Result};

/// How an InternVL-chat model cuts images, read from its config.json.
#[derive(Debug, Clone, Copy)]
struct ImageSetup {
    tiling: TilingConfig,
    tokens_per_tile: usize,
}

/// How Qwen2.5-VL takes images: its processor (preprocessor_config.json) and vision tokens (config.json).
/// The policy's prompts (here) and the reward model's pairs (`rm_train::data`) encode images through it.
#[derive(Debug, Clone)]
pub(crate) struct VlSetup {
    pub(crate) processor: ProcessorConfig,
    pub(crate) config: VlConfig,
    start: String,
    pad: String,
    end: String,
}

impl VlSetup {
    /// The processor of `dir` and the text of `config`'s vision tokens in `tokenizer`'s vocabulary.
    pub(crate) fn new(dir: &Path, config: VlConfig, tokenizer: &Tokenizer) -> Result<Self> {
        let token = |id: u32| -> Result<String> {
            tokenizer
                .inner()
                .id_to_token(id)
                .ok_or_else(|| Error::File {
                    path: tokenizer.path().to_path_buf(),
                    msg: format!("no token with id {id} (named by config.json)"),
                })
        };
        Ok(Self {
            processor: ProcessorConfig::from_dir(dir)?,
            start: token(config.vision_start_token_id)?,
            pad: token(config.image_token_id)?,
            end: token(config.vision_end_token_id)?,
            config,
        })
    }

    /// Each image's vision run: `<|vision_start|>`, one `<|image_pad|>` per merged patch, `<|vision_end|>`.
    pub(crate) fn runs(&self, images: &Images) -> Vec<String> {
        images
            .grids
            .iter()
            .map(|&grid| {
                let pads = self.pad.repeat(self.config.image_tokens(grid));
                format!("{}{pads}{}", self.start, self.end)
            })
            .collect()
    }
}

/// The image side of an encoder.
#[derive(Debug, Clone)]
enum Vision {
    /// A plain Qwen2: no images.
    None,
    /// InternVL-chat tiles.
    Tiles(ImageSetup),
    /// Qwen2.5-VL patches.
    Patches(Box<VlSetup>),
}

/// A prompt ready for the generation engine (`r1v2_actors::generate::PromptInput`).
#[derive(Debug, Clone)]
pub struct EncodedText {
    /// The prompt's token ids: chat template applied, every image's `<IMG_CONTEXT>` run in place.
    pub token_ids: Vec<u32>,
    /// The images, in order, in the encoder's dtype; none without images: InternVL-chat tiles
    /// `(tiles, 3, S, S)`, or Qwen2.5-VL's flattened patches `(patches, 3 * T * P * P)`.
    pub pixel_values: Option<Tensor>,
    /// Qwen2.5-VL: each image's `(t, h, w)` patch grid; empty otherwise.
    pub image_grids: Vec<[usize; 3]>,
}

/// Turns (question, image files) into prompts for a chat or Qwen2 model, and responses back into text.
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// How the model takes images, if it does.
    vision: Vision,
    stop_token_ids: Vec<u32>,
    /// The model directory's config.json (named in errors).
    config_path: PathBuf,
    device: Device,
    dtype: DType,
}

impl PromptEncoder {
    /// Reads tokenizer.json and config.json (image size, max tiles, thumbnail, tokens per tile) of a chat,
    /// Qwen2 or Qwen2.5-VL model dir (for Qwen2.5-VL also preprocessor_config.json).
    ///
    /// Tiles come out in `dtype` on `device`. The template has no system message (set one with
    /// [`Self::with_template`]). Stop tokens: generation_config.json's `eos_token_id` (a number or a list)
    /// when the file exists, plus `<|im_end|>` and `<|endoftext|>` when the tokenizer has them.
    pub fn from_model_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let tokenizer = Tokenizer::from_model_dir(dir)?;
        let vision = match ModelKind::from_config(&config, &config_path)? {
            ModelKind::Chat => Vision::Tiles(ImageSetup {
                tiling: TilingConfig::from_model_config(&config, &config_path)?,
                tokens_per_tile: TilingConfig::tokens_per_tile(&config, &config_path)?,
            }),
            ModelKind::Qwen2CausalLm | ModelKind::Qwen2ValueHead => Vision::None,
            ModelKind::Qwen25Vl => {
                let config = VlConfig::from_value(&config).map_err(|err| Error::File {
                    path: config_path.clone(),
                    msg: err.to_string(),
                })?;
                Vision::Patches(Box::new(VlSetup::new(dir, config, &tokenizer)?))
            }
        };
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
            vision,
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

    /// Whether the model takes images (a chat or Qwen2.5-VL model).
    pub fn takes_images(&self) -> bool {
        !matches!(self.vision, Vision::None)
    }

    /// `<IMG_CONTEXT>` tokens per image tile, for an InternVL-chat model.
    pub fn tokens_per_tile(&self) -> Option<usize> {
        match &self.vision {
            Vision::Tiles(setup) => Some(setup.tokens_per_tile),
            _ => None,
        }
    }

    /// Chat template applied, one `<image>` placeholder per image expanded to its IMG_CONTEXT run (Qwen2.5-VL:
    /// its vision run), images preprocessed.
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
                image_grids: Vec::new(),
            });
        }
        let setup = match &self.vision {
            Vision::Tiles(setup) => *setup,
            Vision::Patches(setup) => return self.encode_patches(setup, question, images),
            Vision::None => {
                return Err(Error::File {
                    path: self.config_path.clone(),
                    msg: format!(
                        "{} image(s) given, but this model (a Qwen2 LLM) takes no images",
                        images.len()
                    ),
                })
            }
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
            image_grids: Vec::new(),
        })
    }

    /// Qwen2.5-VL: each image's vision run at its `<image>` placeholder (or all in front of the question
    /// when it has none), patches preprocessed as transformers' `Qwen2VLImageProcessor`.
    fn encode_patches(
        &self,
        setup: &VlSetup,
        question: &str,
        paths: &[PathBuf],
    ) -> Result<EncodedText> {
        let images = load_images(paths, &setup.processor, &self.device)?;
        let runs = setup.runs(&images);
        let pieces: Vec<&str> = question.split(IMAGE_PLACEHOLDER).collect();
        let text = if pieces.len() == 1 {
            format!("{}{question}", runs.concat())
        } else if pieces.len() - 1 == runs.len() {
            let mut text = pieces[0].to_string();
            for (run, piece) in runs.iter().zip(&pieces[1..]) {
                text.push_str(run);
                text.push_str(piece);
            }
            text
        } else {
            return Err(Error::Msg(format!(
                "the text has {} `{IMAGE_PLACEHOLDER}` placeholders but {} images were given",
                pieces.len() - 1,
                runs.len()
            )));
        };
        let token_ids = self.tokenizer.encode(&self.template.prompt(&text))?;
        // The tokenizer must keep every `<|image_pad|>` whole (an added token of Qwen2.5-VL's vocab).
        let pad_id = setup.config.image_token_id;
        let found = token_ids.iter().filter(|&&id| id == pad_id).count();
        let needed: usize = images
            .grids
            .iter()
            .map(|&g| setup.config.image_tokens(g))
            .sum();
        if found != needed {
            return Err(Error::File {
                path: self.tokenizer.path().to_path_buf(),
                msg: format!(
                    "the prompt encodes to {found} `{}` tokens (id {pad_id}), its images (grids {:?}) need \
                     {needed}: the question may hold `{}` itself",
                    setup.pad, images.grids, setup.pad
                ),
            });
        }
        Ok(EncodedText {
            token_ids,
            pixel_values: Some(images.pixel_values.to_dtype(self.dtype)?),
            image_grids: images.grids,
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
