//! `r1v2 forward` on a Qwen2.5-VL directory: the ids already hold each image's `<|vision_start|>`, its run of
//! `<|image_pad|>` (one per merged 28 x 28 patch: grid_h * grid_w / 4) and `<|vision_end|>`; the images,
//! preprocessed as transformers' `Qwen2VLImageProcessor` (settings from `preprocessor_config.json`), fill the
//! pad runs in order across the batch. With `value_head.safetensors` in the directory the output is `scores`
//! (Skywork-VL Reward), else `logits`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use r1v2_actors::model::qwen2_5_vl::{load_dir, Images};

use super::forward::{ForwardInput, ForwardOutput};
use crate::images::qwen2_vl::{load_images, ProcessorConfig};
use crate::{Error, Result};

/// The images of an input file (paths relative to it), preprocessed for the model in `model_dir`.
pub fn input_images(
    model_dir: &Path,
    input: &ForwardInput,
    input_path: &Path,
    device: &Device,
) -> Result<Option<Images>> {
    if input.images.is_empty() {
        return Ok(None);
    }
    let base = input_path.parent().unwrap_or(Path::new("."));
    let paths: Vec<PathBuf> = input.images.iter().map(|p| base.join(p)).collect();
    let processor = ProcessorConfig::from_dir(model_dir)?;
    Ok(Some(load_images(&paths, &processor, device)?))
}

/// One forward pass: scores with a value head, logits otherwise.
pub fn forward(
    model_dir: &Path,
    input: &ForwardInput,
    input_path: &Path,
    device: &Device,
) -> Result<ForwardOutput> {
    let loaded = load_dir(model_dir, DType::F32, device, |_| false)?;
    let model = loaded.model;
    let vocab = model.config().text.vocab_size;
    let max_id = input.max_id();
    if max_id as usize >= vocab {
        return Err(Error::File {
            path: input_path.to_path_buf(),
            msg: format!("token id {max_id} is out of the model's vocabulary ({vocab} ids)"),
        });
    }
    let images = input_images(model_dir, input, input_path, device)?;
    if let Some(images) = &images {
        let needed: usize = images
            .grids
            .iter()
            .map(|&g| model.config().image_tokens(g))
            .sum();
        let pad = model.config().image_token_id;
        let found = input
            .input_ids
            .iter()
            .flatten()
            .filter(|&&id| id == pad)
            .count();
        if found != needed {
            return Err(Error::File {
                path: input_path.to_path_buf(),
                msg: format!(
                    "`input_ids` hold {found} image pad tokens (id {pad}) but the images need {needed} (grids {:?})",
                    images.grids
                ),
            });
        }
    }
    let unexpected = loaded.store.unexpected();
    if !unexpected.is_empty() {
        tracing::warn!(dir = %model_dir.display(), count = unexpected.len(), first = %unexpected[0],
            "checkpoint tensors not used by the model");
    }
    let ids = input.ids_tensor(device)?;
    let mask = input.mask_tensor(device)?;
    if model.has_value_head() {
        Ok(ForwardOutput::Scores(model.score(
            &ids,
            images.as_ref(),
            mask.as_ref(),
        )?))
    } else {
        Ok(ForwardOutput::Logits(model.forward(
            &ids,
            images.as_ref(),
            mask.as_ref(),
        )?))
    }
}
