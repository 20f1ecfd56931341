//! InternVL image preprocessing: dynamic tiling, bicubic resize and ImageNet normalisation.
//!
//! A transcription of InternVL's `load_image` (InternVL-Chat-V1-5 / InternVL2 model cards, also used by
//! Skywork-R1V): `dynamic_preprocess` picks a grid of `cols x rows` tiles (`min_tiles <= cols*rows <=
//! max_tiles`) whose aspect ratio is closest to the image's (`find_closest_aspect_ratio`, ties going to the
//! larger grid when the image has more than half its pixel area), resizes the image bicubically to
//! `(tile*cols, tile*rows)`, crops the tiles row-major and appends a `tile x tile` thumbnail of the whole
//! image when there is more than one tile; `build_transform` then maps each tile to `ToTensor` +
//! `Normalize(IMAGENET_MEAN, IMAGENET_STD)`.
//!
//! Files are decoded with the `image` crate; the resize is a transcription of Pillow's BICUBIC
//! ([`bicubic`]), so tiles equal the PIL reference exactly (tests/fixtures/preprocess, `tests/preprocess.rs`).

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{imageops, RgbImage};

pub mod bicubic;
pub mod qwen2_vl;

use bicubic::resize_bicubic;

use crate::{Error, Result};

/// ImageNet channel means (torchvision / InternVL `IMAGENET_MEAN`).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (InternVL `IMAGENET_STD`).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How an image is cut into tiles; comes from the model config (see [`TilingConfig::from_model_config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TilingConfig {
    /// Side of one square tile in pixels (`force_image_size` / `vision_config.image_size`, 448 for R1V).
    pub tile_size: u32,
    /// Fewest tiles in the grid (`min_dynamic_patch`, 1).
    pub min_tiles: u32,
    /// Most tiles in the grid, thumbnail not counted (`max_dynamic_patch`, 12).
    pub max_tiles: u32,
    /// Append a whole-image thumbnail when the grid has more than one tile (`use_thumbnail`).
    pub use_thumbnail: bool,
}

impl Default for TilingConfig {
    fn default() -> Self {
        Self {
            tile_size: 448,
            min_tiles: 1,
            max_tiles: 12,
            use_thumbnail: true,
        }
    }
}

impl TilingConfig {
    /// Reads the tiling fields of an InternVL-chat `config.json` (`force_image_size`, else
    /// `vision_config.image_size`; `min_dynamic_patch`, `max_dynamic_patch`, `use_thumbnail`,
    /// `dynamic_image_size`), with InternVL's defaults for absent fields. `path` names the file in errors.
    pub fn from_model_config(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let int = |value: Option<&serde_json::Value>, key: &str| -> Result<Option<u32>> {
            match value {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| Error::File {
                        path: path.to_path_buf(),
                        msg: format!("`{key}` must be a positive integer, got {v}"),
                    }),
            }
        };
        let defaults = Self::default();
        let tile_size = match int(config.get("force_image_size"), "force_image_size")? {
            Some(size) => size,
            None => int(
                config.pointer("/vision_config/image_size"),
                "vision_config.image_size",
            )?
            .ok_or_else(|| Error::File {
                path: path.to_path_buf(),
                msg: "neither `force_image_size` nor `vision_config.image_size` is set".into(),
            })?,
        };
        let dynamic = config
            .get("dynamic_image_size")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let min_tiles = int(config.get("min_dynamic_patch"), "min_dynamic_patch")?
            .unwrap_or(defaults.min_tiles);
        let max_tiles = if dynamic {
            int(config.get("max_dynamic_patch"), "max_dynamic_patch")?.unwrap_or(defaults.max_tiles)
        } else {
            1
        };
        let use_thumbnail = config
            .get("use_thumbnail")
            .and_then(|v| v.as_bool())
            .unwrap_or(defaults.use_thumbnail);
        let tiling = Self {
            tile_size,
            min_tiles: if dynamic { min_tiles } else { 1 },
            max_tiles,
            use_thumbnail,
        };
        tiling.validate().map_err(|msg| Error::File {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(tiling)
    }

    /// InternVL's `num_image_token`: `(image_size // patch_size)^2 * downsample_ratio^2`, the number of
    /// `<IMG_CONTEXT>` tokens one tile becomes, from a chat model's `config.json`.
    pub fn tokens_per_tile(config: &serde_json::Value, path: &Path) -> Result<usize> {
        let field = |pointer: &str| config.pointer(pointer).and_then(|v| v.as_f64());
        let image_size = field("/force_image_size").or_else(|| field("/vision_config/image_size"));
        let patch_size = field("/vision_config/patch_size");
        let ratio = field("/downsample_ratio").unwrap_or(0.5);
        match (image_size, patch_size) {
            (Some(image), Some(patch)) if patch >= 1.0 && image >= patch => {
                let side = (image / patch).floor();
                Ok((side * side * ratio * ratio) as usize)
            }
            _ => Err(Error::File {
                path: path.to_path_buf(),
                msg: "need `force_image_size` or `vision_config.image_size`, and `vision_config.patch_size`, \
                      with image size >= patch size"
                    .into(),
            }),
        }
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.tile_size == 0 {
            return Err("the tile size must be positive".into());
        }
        if self.min_tiles == 0 || self.min_tiles > self.max_tiles {
            return Err(format!(
                "need 1 <= min_dynamic_patch ({}) <= max_dynamic_patch ({})",
                self.min_tiles, self.max_tiles
            ));
        }
        Ok(())
    }
}

/// A grid of tiles: `cols` across, `rows` down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    /// Tiles across (InternVL's `target_aspect_ratio[0]`).
    pub cols: u32,
    /// Tiles down (InternVL's `target_aspect_ratio[1]`).
    pub rows: u32,
}

/// The candidate grids of `dynamic_preprocess`: every `(cols, rows)` with `min <= cols*rows <= max`, sorted by
/// tile count. InternVL sorts a Python set, so the order among equal counts is hash order; we use `cols`
/// ascending. Only an exact tie between two equal-count grids could tell the orders apart, and a brute-force
/// check over all max counts 1..=12, tile sizes {14, 16, 32, 448} and 400x133 image sizes found none.
pub fn candidate_grids(min_tiles: u32, max_tiles: u32) -> Vec<Grid> {
    let mut grids: Vec<Grid> = (1..=max_tiles)
        .flat_map(|cols| (1..=max_tiles).map(move |rows| Grid { cols, rows }))
        .filter(|g| (min_tiles..=max_tiles).contains(&(g.cols * g.rows)))
        .collect();
    grids.sort_by_key(|g| (g.cols * g.rows, g.cols));
    grids
}

/// InternVL's `find_closest_aspect_ratio`: the grid whose aspect ratio is closest to `width / height`; on an
/// exact tie the later (larger) grid wins when the image area exceeds half the grid's pixel area.
pub fn closest_grid(width: u32, height: u32, tile_size: u32, grids: &[Grid]) -> Grid {
    let aspect_ratio = width as f64 / height as f64;
    let area = width as f64 * height as f64;
    let mut best_diff = f64::INFINITY;
    let mut best = Grid { cols: 1, rows: 1 };
    for &grid in grids {
        let diff = (aspect_ratio - grid.cols as f64 / grid.rows as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = grid;
        } else if diff == best_diff
            && area
                > 0.5 * tile_size as f64 * tile_size as f64 * grid.cols as f64 * grid.rows as f64
        {
            best = grid;
        }
    }
    best
}

/// InternVL's `dynamic_preprocess`: the chosen grid and its tiles (row-major), thumbnail last when used.
pub fn dynamic_tiles(image: &RgbImage, tiling: &TilingConfig) -> (Grid, Vec<RgbImage>) {
    let size = tiling.tile_size;
    let grid = closest_grid(
        image.width(),
        image.height(),
        size,
        &candidate_grids(tiling.min_tiles, tiling.max_tiles),
    );
    let resized = resize_bicubic(image, size * grid.cols, size * grid.rows);
    let mut tiles: Vec<RgbImage> = (0..grid.rows)
        .flat_map(|row| (0..grid.cols).map(move |col| (col, row)))
        .map(|(col, row)| {
            imageops::crop_imm(&resized, col * size, row * size, size, size).to_image()
        })
        .collect();
    if tiling.use_thumbnail && tiles.len() != 1 {
        tiles.push(resize_bicubic(image, size, size));
    }
    (grid, tiles)
}

/// `ToTensor` + `Normalize(IMAGENET_MEAN, IMAGENET_STD)` of same-sized tiles: f32 `(tiles, 3, S, S)`.
pub fn normalize_tiles(tiles: &[RgbImage], device: &Device) -> Result<Tensor> {
    let Some(first) = tiles.first() else {
        return Err(Error::Msg("normalize_tiles: no tiles".into()));
    };
    let (width, height) = first.dimensions();
    let plane = (width * height) as usize;
    let mut data = vec![0f32; tiles.len() * 3 * plane];
    for (tile_index, tile) in tiles.iter().enumerate() {
        if tile.dimensions() != (width, height) {
            return Err(Error::Msg(format!(
                "normalize_tiles: tile {tile_index} is {:?}, the first is {:?}",
                tile.dimensions(),
                (width, height)
            )));
        }
        let tile_data = &mut data[tile_index * 3 * plane..(tile_index + 1) * 3 * plane];
        for (pixel_index, pixel) in tile.pixels().enumerate() {
            for channel in 0..3 {
                let unit = pixel.0[channel] as f32 / 255.0;
                tile_data[channel * plane + pixel_index] =
                    (unit - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel];
            }
        }
    }
    // (tiles, 3, H, W)
    Ok(Tensor::from_vec(
        data,
        (tiles.len(), 3, height as usize, width as usize),
        device,
    )?)
}

/// One preprocessed image: what the vision tower consumes and how many tiles it became.
#[derive(Debug, Clone)]
pub struct PreprocessedImage {
    /// f32 `(tiles, 3, S, S)`, thumbnail last.
    pub pixel_values: Tensor,
    /// The grid chosen by dynamic tiling (the thumbnail is not part of it).
    pub grid: Grid,
}

impl PreprocessedImage {
    /// Number of tiles including the thumbnail: the `num_patches` that sizes the `<IMG_CONTEXT>` run.
    pub fn num_tiles(&self) -> usize {
        self.pixel_values.dims()[0]
    }
}

/// Reads an image file (PNG, JPEG, WebP, BMP, GIF; format from the contents) as RGB (alpha dropped, grey
/// replicated, as PIL's `convert('RGB')`). Errors name the file.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = reader.with_guessed_format().map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let decoded = reader.decode().map_err(|err| Error::File {
        path: path.to_path_buf(),
        msg: format!("cannot decode image: {err}"),
    })?;
    if decoded.width() == 0 || decoded.height() == 0 {
        return Err(Error::File {
            path: path.to_path_buf(),
            msg: "image has zero width or height".into(),
        });
    }
    Ok(decoded.to_rgb8())
}

/// InternVL's `load_image`: read, tile and normalise one image file.
pub fn load_image(
    path: &Path,
    tiling: &TilingConfig,
    device: &Device,
) -> Result<PreprocessedImage> {
    tiling.validate().map_err(Error::Msg)?;
    let image = read_rgb(path)?;
    let (grid, tiles) = dynamic_tiles(&image, tiling);
    Ok(PreprocessedImage {
        pixel_values: normalize_tiles(&tiles, device)?,
        grid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_grids_respect_bounds() {
        let grids = candidate_grids(1, 6);
        assert_eq!(grids.len(), 14); // as InternVL's target_ratios for max_num=6 (fixture generator)
        assert!(grids.iter().all(|g| (1..=6).contains(&(g.cols * g.rows))));
        assert_eq!(grids[0], Grid { cols: 1, rows: 1 });
    }

    #[test]
    fn tiling_reads_model_config() {
        let cfg = serde_json::json!({"vision_config": {"image_size": 32}, "max_dynamic_patch": 4, "use_thumbnail": false});
        let tiling =
            TilingConfig::from_model_config(&cfg, Path::new("config.json")).expect("valid config");
        assert_eq!(
            tiling,
            TilingConfig {
                tile_size: 32,
                min_tiles: 1,
                max_tiles: 4,
                use_thumbnail: false
            }
        );
        let forced =
            serde_json::json!({"force_image_size": 448, "vision_config": {"image_size": 224}});
        assert_eq!(
            TilingConfig::from_model_config(&forced, Path::new("c.json"))
                .expect("valid")
                .tile_size,
            448
        );
        let missing = serde_json::json!({"max_dynamic_patch": 4});
        let err = TilingConfig::from_model_config(&missing, Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m/config.json") && err.contains("image_size"),
            "{err}"
        );
    }
}
