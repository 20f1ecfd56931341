//! Qwen2-VL / Qwen2.5-VL image preprocessing (transformers `Qwen2VLImageProcessor`, the PIL one):
//! `smart_resize` to multiples of `patch_size * merge_size` (28) with the pixel count inside
//! `[min_pixels, max_pixels]`, Pillow BICUBIC resize, `rescale` (x * 1/255 in f64, then f32), `normalize`
//! with the OpenAI CLIP mean / std in f32, the frame repeated to fill a temporal patch, and patches
//! flattened in merge-block order: (grid_t * grid_h * grid_w, channels * temporal * patch * patch).
//!
//! Reference, `_preprocess`:
//!     patches = patches.reshape(grid_t, temporal_patch_size, channel, grid_h // merge_size, merge_size,
//!                               patch_size, grid_w // merge_size, merge_size, patch_size)
//!     patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use r1v2_actors::model::qwen2_5_vl::Images;

use super::bicubic::resize_bicubic;
use super::read_rgb;
use crate::{Error, Result};

/// OpenAI CLIP channel means (`OPENAI_CLIP_MEAN`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP channel standard deviations (`OPENAI_CLIP_STD`).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The processor's settings (`preprocessor_config.json`, with `Qwen2VLImageProcessor`'s defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    /// Fewest pixels after resizing (`min_pixels` or `size.shortest_edge`).
    pub min_pixels: usize,
    /// Most pixels after resizing (`max_pixels` or `size.longest_edge`).
    pub max_pixels: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Patches per merge-block side.
    pub merge_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
    /// Channel means.
    pub image_mean: [f32; 3],
    /// Channel standard deviations.
    pub image_std: [f32; 3],
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }
}

impl ProcessorConfig {
    /// Reads `dir/preprocessor_config.json` when it exists (defaults otherwise); errors name the file and key.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|err| Error::File {
            path: path.clone(),
            msg: format!("invalid JSON: {err}"),
        })?;
        Self::from_value(&json).map_err(|msg| Error::File { path, msg })
    }

    /// Parses a `preprocessor_config.json` object.
    pub fn from_value(json: &serde_json::Value) -> std::result::Result<Self, String> {
        let mut cfg = Self::default();
        let int = |value: Option<&serde_json::Value>, key: &str, into: &mut usize| match value {
            None | Some(serde_json::Value::Null) => Ok(()),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => {
                    *into = n as usize;
                    Ok(())
                }
                _ => Err(format!("`{key}`: {v} is not a positive integer")),
            },
        };
        let size = json.get("size");
        int(
            size.and_then(|s| s.get("shortest_edge")),
            "size.shortest_edge",
            &mut cfg.min_pixels,
        )?;
        int(
            size.and_then(|s| s.get("longest_edge")),
            "size.longest_edge",
            &mut cfg.max_pixels,
        )?;
        int(json.get("min_pixels"), "min_pixels", &mut cfg.min_pixels)?;
        int(json.get("max_pixels"), "max_pixels", &mut cfg.max_pixels)?;
        int(json.get("patch_size"), "patch_size", &mut cfg.patch_size)?;
        int(json.get("merge_size"), "merge_size", &mut cfg.merge_size)?;
        int(
            json.get("temporal_patch_size"),
            "temporal_patch_size",
            &mut cfg.temporal_patch_size,
        )?;
        let triple = |key: &str, into: &mut [f32; 3]| -> std::result::Result<(), String> {
            if let Some(v) = json.get(key).filter(|v| !v.is_null()) {
                let list: Vec<f32> =
                    serde_json::from_value(v.clone()).map_err(|e| format!("`{key}`: {e}"))?;
                *into = list
                    .try_into()
                    .map_err(|_| format!("`{key}` does not have 3 entries"))?;
            }
            Ok(())
        };
        triple("image_mean", &mut cfg.image_mean)?;
        triple("image_std", &mut cfg.image_std)?;
        if cfg.min_pixels > cfg.max_pixels {
            return Err(format!(
                "`min_pixels` {} exceeds `max_pixels` {}",
                cfg.min_pixels, cfg.max_pixels
            ));
        }
        Ok(cfg)
    }

    /// Pixels per resize step: `patch_size * merge_size`.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

/// Python's `round` (half to even) of a non-negative ratio.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc() - 0.5).abs() == 0.0 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    }
}

/// transformers' `smart_resize`: (height, width) -> resized (height, width), both multiples of `factor`.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if height == 0 || width == 0 || h.max(w) / h.min(w) > 200.0 {
        return Err(Error::Msg(format!(
            "image of {width} x {height}: the aspect ratio must be below 200"
        )));
    }
    let mut h_bar = round_half_even(h / f) * f;
    let mut w_bar = round_half_even(w / f) * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// One image as the vision tower takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Patches {
    /// Row-major (grid_t * grid_h * grid_w, channels * temporal * patch * patch) values.
    pub values: Vec<f32>,
    /// (t, h, w) patches.
    pub grid: [usize; 3],
}

impl Patches {
    /// Values per patch.
    pub fn patch_len(&self) -> usize {
        self.values.len() / (self.grid[0] * self.grid[1] * self.grid[2]).max(1)
    }
}

/// Preprocesses one RGB image (see the module doc).
pub fn preprocess(image: &RgbImage, cfg: &ProcessorConfig) -> Result<Patches> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let (rh, rw) = smart_resize(height, width, cfg.factor(), cfg.min_pixels, cfg.max_pixels)?;
    let resized = resize_bicubic(image, rw as u32, rh as u32);
    // rescale (f64 product, then f32) and normalize (f32), channel planes (3, H, W).
    let plane = rh * rw;
    let mut planes = vec![0f32; 3 * plane];
    for (i, pixel) in resized.pixels().enumerate() {
        for c in 0..3 {
            let unit = (pixel.0[c] as f64 * (1.0 / 255.0)) as f32;
            planes[c * plane + i] = (unit - cfg.image_mean[c]) / cfg.image_std[c];
        }
    }
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (rh / p, rw / p);
    // One image is one frame, repeated `tp` times: grid_t = 1.
    let patch_len = 3 * tp * p * p;
    let mut values = Vec::with_capacity(gh * gw * patch_len);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (row0, col0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for c in 0..3 {
                        for _frame in 0..tp {
                            for y in 0..p {
                                let start = c * plane + (row0 + y) * rw + col0;
                                values.extend_from_slice(&planes[start..start + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(Patches {
        values,
        grid: [1, gh, gw],
    })
}

/// Reads and preprocesses image files, in order, into the model's [`Images`]: every image's patches
/// concatenated (f32 on `device`) and their grids. Errors name the file.
pub fn load_images(paths: &[PathBuf], cfg: &ProcessorConfig, device: &Device) -> Result<Images> {
    let mut values = Vec::new();
    let mut grids = Vec::with_capacity(paths.len());
    let patch_len = 3 * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
    for path in paths {
        let patches = preprocess(&read_rgb(path)?, cfg).map_err(|err| Error::File {
            path: path.clone(),
            msg: err.to_string(),
        })?;
        values.extend_from_slice(&patches.values);
        grids.push(patches.grid);
    }
    let rows = values.len() / patch_len;
    Ok(Images {
        pixel_values: Tensor::from_vec(values, (rows, patch_len), device)?,
        grids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_half_to_even_and_respects_bounds() {
        // 42 / 28 = 1.5 rounds to 2 (even), 70 / 28 = 2.5 rounds to 2.
        assert_eq!(smart_resize(42, 70, 28, 0, 1 << 30).unwrap(), (56, 56));
        // Too few pixels: scaled up to at least min_pixels.
        let (h, w) = smart_resize(30, 40, 28, 56 * 56 * 4, 1 << 30).unwrap();
        assert!(
            h * w >= 56 * 56 * 4 && h % 28 == 0 && w % 28 == 0,
            "{h} x {w}"
        );
        // Too many: scaled down under max_pixels.
        let (h, w) = smart_resize(1000, 2000, 28, 0, 28 * 28 * 100).unwrap();
        assert!(
            h * w <= 28 * 28 * 100 && h % 28 == 0 && w % 28 == 0,
            "{h} x {w}"
        );
        assert!(smart_resize(10, 2100, 28, 0, 1 << 30).is_err());
    }

    #[test]
    fn patches_follow_the_merge_block_order() {
        // A 56 x 56 image whose red channel encodes the column: patch 1 (merge block 0, second column)
        // starts at x = 14.
        let image = RgbImage::from_fn(56, 56, |x, _| image::Rgb([x as u8 * 4, 0, 0]));
        let cfg = ProcessorConfig {
            min_pixels: 0,
            ..ProcessorConfig::default()
        };
        let patches = preprocess(&image, &cfg).unwrap();
        assert_eq!(patches.grid, [1, 4, 4]);
        assert_eq!(patches.patch_len(), 3 * 2 * 14 * 14);
        let value = |x: u8| ((x as f64 * 4.0 * (1.0 / 255.0)) as f32 - CLIP_MEAN[0]) / CLIP_STD[0];
        let len = patches.patch_len();
        assert_eq!(patches.values[len], value(14));
        // Patch 2 is the second row of merge block 0: x starts at 0 again.
        assert_eq!(patches.values[2 * len], value(0));
        // Both frames of a patch are the same image.
        assert_eq!(patches.values[14 * 14], patches.values[0]);
    }
}
