//! Tokenizer, chat template and image preprocessing against the Python reference
//! (tests/fixtures/gen_preprocess.py: transformers' `apply_chat_template` + the tokenizers package, and a
//! transcription of InternVL's `load_image` with PIL).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use r1v2::images::{candidate_grids, closest_grid, load_image, Grid, TilingConfig};
use r1v2::text::{
    encode_prompt, expand_image_placeholders, ChatTemplate, Message, Role, Tokenizer,
};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/preprocess"
    ))
}

fn cases() -> Result<serde_json::Value> {
    let path = fixtures().join("cases.json");
    Ok(serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| path.display().to_string())?,
    )?)
}

/// Tiles go through our transcription of Pillow 13's BICUBIC resize (src/images/bicubic.rs) and must
/// equal PIL's up to f32 rounding of the normalisation. (The `image` crate's Catmull-Rom, the same kernel in
/// f32, was up to 7 u8 levels = 0.12 away on these fixtures, mean 0.004.)
const TILE_TOLERANCE: f32 = 1e-6;

#[test]
fn grid_choice_matches_internvl_exactly() -> Result<()> {
    let path = fixtures().join("grids.json");
    let rows: Vec<[u32; 6]> = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    assert!(rows.len() > 1000, "grid fixture too small: {}", rows.len());
    for [tile, max_tiles, width, height, cols, rows_expected] in rows {
        let grid = closest_grid(width, height, tile, &candidate_grids(1, max_tiles));
        assert_eq!(
            grid,
            Grid {
                cols,
                rows: rows_expected
            },
            "image {width}x{height}, tile {tile}, max {max_tiles}"
        );
    }
    Ok(())
}

#[test]
fn image_tiles_match_pil_reference() -> Result<()> {
    let cases = cases()?;
    let expected =
        candle_core::safetensors::load(fixtures().join("images.safetensors"), &Device::Cpu)?;
    let mut worst = 0f32;
    for case in cases["images"].as_array().context("images")? {
        let name = case["name"].as_str().context("name")?;
        let tiling = TilingConfig {
            tile_size: case["tile_size"].as_u64().context("tile_size")? as u32,
            min_tiles: 1,
            max_tiles: case["max_tiles"].as_u64().context("max_tiles")? as u32,
            use_thumbnail: true,
        };
        let image = load_image(
            &fixtures().join(case["file"].as_str().context("file")?),
            &tiling,
            &Device::Cpu,
        )?;
        let grid = [image.grid.cols as u64, image.grid.rows as u64];
        assert_eq!(serde_json::json!(grid), case["grid"], "{name}: grid");
        let reference: &Tensor = expected.get(name).context("expected tensor")?;
        assert_eq!(image.pixel_values.dims(), reference.dims(), "{name}: shape");
        for tile in 0..image.num_tiles() {
            let diff = (image.pixel_values.get(tile)? - reference.get(tile)?)?.abs()?;
            let max_diff = diff.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            worst = worst.max(max_diff);
            assert!(
                max_diff <= TILE_TOLERANCE,
                "{name} tile {tile}: max |diff| {max_diff} > {TILE_TOLERANCE}"
            );
        }
        println!("{name}: grid {grid:?}, {} tiles", image.num_tiles());
    }
    println!("worst max |diff| {worst:.5}");
    Ok(())
}

#[test]
fn chat_template_ids_match_transformers() -> Result<()> {
    let cases = cases()?;
    let tokenizer = Tokenizer::from_file(fixtures().join("tokenizer.json"))?;
    assert_eq!(
        tokenizer.vocab_size() as u64,
        cases["vocab_size"].as_u64().context("vocab_size")?
    );
    for case in cases["chat"].as_array().context("chat")? {
        let template = ChatTemplate {
            system_message: case["system"].as_str().map(str::to_owned),
            ..Default::default()
        };
        let tiles: Vec<usize> = case
            .get("image_tiles")
            .and_then(|t| t.as_array())
            .map_or(Vec::new(), |t| {
                t.iter().map(|n| n.as_u64().unwrap_or(0) as usize).collect()
            });
        let tokens_per_tile = case
            .get("tokens_per_tile")
            .and_then(|t| t.as_u64())
            .unwrap_or(0) as usize;
        let user = expand_image_placeholders(
            case["user"].as_str().context("user")?,
            &tiles,
            tokens_per_tile,
        )?;
        let text = template.render(&[Message::new(Role::User, user)], true);
        assert_eq!(
            text,
            case["text"].as_str().context("text")?,
            "rendered text"
        );
        let ids = encode_prompt(
            &tokenizer,
            &template,
            case["user"].as_str().context("user")?,
            &tiles,
            tokens_per_tile,
        )?;
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        assert_eq!(ids, expected, "ids of {text:?}");
        assert_eq!(tokenizer.decode(&ids, false)?, text, "decode round trip");
    }
    Ok(())
}

#[test]
fn image_token_ids_are_found() -> Result<()> {
    let tokenizer = Tokenizer::from_file(fixtures().join("tokenizer.json"))?;
    let ids = tokenizer.image_token_ids()?;
    assert_eq!(
        tokenizer.encode("<img><IMG_CONTEXT></img>")?,
        vec![ids.start, ids.context, ids.end]
    );
    Ok(())
}

#[test]
fn missing_special_token_names_token_and_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let json = std::fs::read_to_string(fixtures().join("tokenizer.json"))?
        .replace("<IMG_CONTEXT>", "<IMG_CTX>");
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json)?;
    let err = Tokenizer::from_file(&path)?
        .image_token_ids()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("<IMG_CONTEXT>") && err.contains(&path.display().to_string()),
        "{err}"
    );
    Ok(())
}

#[test]
fn missing_or_corrupt_tokenizer_names_the_path() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nope/tokenizer.json");
    let err = Tokenizer::from_file(&missing).unwrap_err().to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
    let corrupt = dir.path().join("tokenizer.json");
    std::fs::write(&corrupt, "{\"model\": 3")?;
    let err = Tokenizer::from_file(&corrupt).unwrap_err().to_string();
    assert!(
        err.contains(&corrupt.display().to_string()) && err.contains("tokenizer.json"),
        "{err}"
    );
    Ok(())
}

#[test]
fn missing_or_corrupt_image_names_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tiling = TilingConfig {
        tile_size: 16,
        ..Default::default()
    };
    let missing = dir.path().join("absent.png");
    let err = load_image(&missing, &tiling, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.png"), "{err}");
    let corrupt = dir.path().join("broken.png");
    let png = std::fs::read(fixtures().join("img_wide.png"))?;
    std::fs::write(&corrupt, &png[..png.len() / 2])?;
    let err = load_image(&corrupt, &tiling, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broken.png") && err.contains("decode"),
        "{err}"
    );
    std::fs::write(dir.path().join("text.png"), "not an image")?;
    let err = load_image(&dir.path().join("text.png"), &tiling, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("text.png"), "{err}");
    let _: &Path = &missing;
    Ok(())
}

#[test]
fn bicubic_resize_matches_pillow_in_both_pass_orders() -> Result<()> {
    let source = r1v2::images::read_rgb(&fixtures().join("img_gray_odd.png"))?;
    let expected =
        candle_core::safetensors::load(fixtures().join("images.safetensors"), &Device::Cpu)?;
    let mut checked = 0;
    for (name, reference) in expected
        .iter()
        .filter(|(name, _)| name.starts_with("resize_"))
    {
        let (height, width, _) = reference.dims3()?;
        let ours = r1v2::images::bicubic::resize_bicubic(&source, width as u32, height as u32);
        let reference: Vec<u8> = reference.flatten_all()?.to_vec1()?;
        assert_eq!(ours.as_raw(), &reference, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 9);
    Ok(())
}
