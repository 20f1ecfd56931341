//! Parity with transformers' `Qwen2_5_VLForConditionalGeneration` on the tiny random model of
//! tests/fixtures/gen_qwen2_5_vl.py (images of three sizes in one padded batch, two checkpoint layouts).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};

use super::*;

fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/qwen2_5_vl"
    ))
    .join(rel)
}

fn io() -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixture("io.safetensors"),
        &Device::Cpu,
    )?)
}

/// The processor's pixel values of images a, b, d (the batch's order), both temporal frames restored.
fn images(io: &HashMap<String, Tensor>) -> anyhow::Result<Images> {
    let mut pixels = Vec::new();
    let mut grids = Vec::new();
    for key in ["a", "b", "d"] {
        let frame = io[&format!("pixels_{key}")].unsqueeze(2)?; // (N, 3, 1, 196)
        let n = frame.dim(0)?;
        pixels.push(Tensor::cat(&[&frame, &frame], 2)?.reshape((n, 3 * 2 * 196))?);
        let grid = io[&format!("grid_{key}")]
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        grids.push([grid[0] as usize, grid[1] as usize, grid[2] as usize]);
    }
    Ok(Images {
        pixel_values: Tensor::cat(&pixels, 0)?,
        grids,
    })
}

/// Max |a - b| over the real positions of (B, T, ...) tensors.
fn max_diff_real(a: &Tensor, b: &Tensor, mask: &Tensor) -> anyhow::Result<f32> {
    let mask = mask.to_dtype(DType::F32)?;
    let mut mask = mask.clone();
    while mask.rank() < a.rank() {
        mask = mask.unsqueeze(D::Minus1)?;
    }
    let diff = (a - b)?.abs()?.broadcast_mul(&mask)?;
    Ok(diff.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn qwen2_5_vl_matches_transformers_in_both_layouts() -> anyhow::Result<()> {
    let io = io()?;
    let images = images(&io)?;
    let ids = io["input_ids"].to_dtype(DType::U32)?;
    let mask = io["attention_mask"].to_dtype(DType::U32)?;
    for layout in ["released", "v5"] {
        let loaded = load_dir(&fixture(layout), DType::F32, &Device::Cpu, |_| false)?;
        assert!(
            loaded.store.unexpected().is_empty(),
            "{layout}: {:?}",
            loaded.store.unexpected()
        );
        let model = loaded.model;
        assert_eq!(model.has_value_head(), layout == "released");

        // 3-axis positions equal get_rope_index at every real slot.
        let positions = model.positions(&ids, Some(&images), Some(&mask))?;
        let want = io["position_ids"].to_dtype(DType::U32)?;
        let real = mask.to_vec2::<u32>()?;
        for (axis, rows) in positions.iter().enumerate() {
            let want = want.get(axis)?.to_vec2::<u32>()?;
            for (row, slots) in rows.iter().enumerate() {
                for (slot, &p) in slots.iter().enumerate() {
                    if real[row][slot] == 1 {
                        assert_eq!(
                            p, want[row][slot],
                            "{layout}: axis {axis} row {row} slot {slot}"
                        );
                    }
                }
            }
        }

        let features = model.visual.forward(&images.pixel_values, &images.grids)?;
        let feature_diff = max_diff(&features, &io["image_features"])?;
        let hidden = model.hidden_states(&ids, Some(&images), Some(&mask))?;
        let hidden_diff = max_diff_real(&hidden, &io["hidden"], &mask)?;
        let logits = model.forward(&ids, Some(&images), Some(&mask))?;
        let logit_diff = max_diff_real(&logits, &io["logits"], &mask)?;
        println!("{layout}: max |diff| image features {feature_diff:.2e}, hidden {hidden_diff:.2e}, logits {logit_diff:.2e}");
        assert!(
            feature_diff < 1e-4,
            "{layout}: image features differ by {feature_diff}"
        );
        assert!(
            hidden_diff < 1e-4,
            "{layout}: hidden states differ by {hidden_diff}"
        );
        assert!(logit_diff < 1e-4, "{layout}: logits differ by {logit_diff}");
        if model.has_value_head() {
            let scores = model.score(&ids, Some(&images), Some(&mask))?;
            let score_diff = max_diff(&scores, &io["scores"])?;
            println!("{layout}: max |diff| scores {score_diff:.2e}");
            assert!(score_diff < 1e-4, "{layout}: scores differ by {score_diff}");
        }
    }
    Ok(())
}

#[test]
fn qwen2_5_vl_pad_count_mismatch_is_an_error() -> anyhow::Result<()> {
    let io = io()?;
    let mut images = images(&io)?;
    let model = load_dir(&fixture("released"), DType::F32, &Device::Cpu, |_| false)?.model;
    images.grids.pop();
    let n = images.pixel_values.dim(0)? - 16;
    images.pixel_values = images.pixel_values.narrow(0, 0, n)?;
    let ids = io["input_ids"].to_dtype(DType::U32)?;
    let err = model
        .score(&ids, Some(&images), Some(&io["attention_mask"]))
        .expect_err("an image without a grid must be refused");
    assert!(err.to_string().contains("grids were given"), "{err}");
    Ok(())
}

#[test]
fn qwen2_5_vl_gradients_reach_the_vision_tower_and_the_value_head() -> anyhow::Result<()> {
    let io = io()?;
    let images = images(&io)?;
    let loaded = load_dir(&fixture("released"), DType::F32, &Device::Cpu, |name| {
        name.starts_with("v_head.") || name == "visual.blocks.0.attn.qkv.weight"
    })?;
    let ids = io["input_ids"].to_dtype(DType::U32)?;
    let scores = loaded
        .model
        .score(&ids, Some(&images), Some(&io["attention_mask"]))?;
    let grads = scores.sum_all()?.backward()?;
    let mut vars: Vec<(String, Var)> = loaded.store.trainable_vars();
    vars.extend(loaded.head_store.expect("value head").trainable_vars());
    assert_eq!(vars.len(), 3);
    for (name, var) in vars {
        let grad = grads.get(var.as_tensor()).expect(&name);
        let norm = grad.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(norm > 0.0 && norm.is_finite(), "{name}: |grad|^2 = {norm}");
    }
    Ok(())
}

#[test]
fn qwen2_5_vl_configs_read_both_layouts_alike() -> anyhow::Result<()> {
    let released = Config::from_file(&fixture("released/config.json"))?;
    let v5 = Config::from_file(&fixture("v5/config.json"))?;
    assert_eq!(released, v5);
    assert_eq!(released.mrope_section, [2, 3, 3]);
    let mut bad: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("released/config.json"))?)?;
    bad["rope_scaling"]["mrope_section"] = serde_json::json!([2, 3, 4]);
    let err = Config::from_value(&bad).expect_err("sections must sum to half the head dim");
    assert!(err.to_string().contains("mrope_section"), "{err}");
    Ok(())
}
