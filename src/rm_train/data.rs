//! Preference pairs for `train-rm`: JSONL lines `{"question", "images", "chosen", "rejected"}` (+ an optional
//! `"margin"`), and their encoding for a reward model of either family.
//!
//! Encoding: the question goes through the chat template as a user turn (`<|im_start|>user ...
//! <|im_end|><|im_start|>assistant\n`), the answer follows with `<|im_end|>`. For Qwen2.5-VL each image
//! becomes `<|vision_start|>`, one `<|image_pad|>` per merged 28 x 28 patch and `<|vision_end|>` before the
//! question, and its pixels are preprocessed as transformers' `Qwen2VLImageProcessor`; a Qwen2 value head
//! reads text only, so a line's images are not encoded for it.

use std::path::{Path, PathBuf};

use candle_core::Device;
use r1v2_actors::model::qwen2_5_vl::{Config as VlConfig, Images};
use r1v2_actors::train::reward_model::PreferencePair;
use serde::Deserialize;

use crate::images::qwen2_vl::load_images;
use crate::prompting::VlSetup;
use crate::text::tokenizer::IM_END;
use crate::text::{ChatTemplate, Tokenizer};
use crate::{Error, Result};

/// One line as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PairLine {
    question: String,
    #[serde(default)]
    images: Vec<String>,
    chosen: String,
    rejected: String,
    #[serde(default)]
    margin: Option<f32>,
}

/// One preference pair, image paths resolved against the file's directory.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRecord {
    /// The question.
    pub question: String,
    /// Image files.
    pub images: Vec<PathBuf>,
    /// The preferred answer.
    pub chosen: String,
    /// The other answer.
    pub rejected: String,
    /// The line's margin (0 when absent).
    pub margin: f32,
}

/// Reads a pairs file. Blank lines are skipped; any other bad line (not JSON, a missing or unknown field, an
/// empty answer, a missing image file) is an error naming `path:line`.
pub fn read_pairs(path: &Path) -> Result<Vec<PairRecord>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut pairs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::Msg(format!("{}:{}: {msg}", path.display(), index + 1));
        let parsed: PairLine = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        if parsed.chosen.trim().is_empty() || parsed.rejected.trim().is_empty() {
            return Err(bad("`chosen` and `rejected` must not be empty".into()));
        }
        if parsed.margin.is_some_and(|m| !m.is_finite()) {
            return Err(bad("`margin` must be a finite number".into()));
        }
        let images: Vec<PathBuf> = parsed.images.iter().map(|p| base.join(p)).collect();
        if let Some(missing) = images.iter().find(|p| !p.is_file()) {
            return Err(bad(format!("image {} does not exist", missing.display())));
        }
        pairs.push(PairRecord {
            question: parsed.question,
            images,
            chosen: parsed.chosen,
            rejected: parsed.rejected,
            margin: parsed.margin.unwrap_or(0.0),
        });
    }
    if pairs.is_empty() {
        return Err(Error::File {
            path: path.to_path_buf(),
            msg: "no preference pairs".into(),
        });
    }
    Ok(pairs)
}

/// Turns pair records into token ids (and pixels) for one reward model.
#[derive(Clone)]
pub struct PairEncoder {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    vision: Option<VlSetup>,
}

impl PairEncoder {
    /// The encoder of the model in `dir` (its tokenizer.json; for `qwen2_5_vl` its config and
    /// preprocessor_config.json too).
    pub fn from_model_dir(dir: &Path, takes_images: bool) -> Result<Self> {
        let tokenizer = Tokenizer::from_model_dir(dir)?;
        let vision = if takes_images {
            let config = VlConfig::from_file(&dir.join("config.json"))?;
            Some(VlSetup::new(dir, config, &tokenizer)?)
        } else {
            None
        };
        Ok(Self {
            tokenizer,
            template: ChatTemplate::default(),
            vision,
        })
    }

    /// The prompt's token ids (chat template, one vision run per image for a model that reads images) and
    /// its images, preprocessed; no images for a text-only model or prompt.
    pub fn encode_prompt(
        &self,
        question: &str,
        image_paths: &[PathBuf],
        device: &Device,
    ) -> Result<(Vec<u32>, Option<Images>)> {
        let (prefix, images) = match (&self.vision, image_paths.is_empty()) {
            (Some(vision), false) => {
                let images = load_images(image_paths, &vision.processor, device)?;
                (vision.runs(&images).concat(), Some(images))
            }
            _ => (String::new(), None),
        };
        let prompt = self
            .tokenizer
            .encode(&self.template.prompt(&format!("{prefix}{question}")))?;
        Ok((prompt, images))
    }

    /// `prompt` followed by the response's tokens and the end of the turn.
    pub fn encode_response(&self, prompt: &[u32], text: &str) -> Result<Vec<u32>> {
        let mut ids = prompt.to_vec();
        ids.extend(self.tokenizer.encode(text)?);
        if let Ok(end) = self.tokenizer.token_id(IM_END) {
            ids.push(end);
        }
        Ok(ids)
    }

    /// Encodes one record: prompt + each answer, the images for a model that reads them.
    pub fn encode(&self, record: &PairRecord, device: &Device) -> Result<PreferencePair> {
        let (prompt, images) = self.encode_prompt(&record.question, &record.images, device)?;
        let answer = |text: &str| self.encode_response(&prompt, text);
        Ok(PreferencePair {
            chosen: answer(&record.chosen)?,
            rejected: answer(&record.rejected)?,
            images,
            margin: record.margin,
        })
    }
}
