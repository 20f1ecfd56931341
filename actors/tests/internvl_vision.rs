//! InternViT (both variants) and the `mlp1` adapter against transformers' InternVL
//! (fixtures from `tests/fixtures/gen_internvl.py`): 56 px tiles (the config's size), 84 px tiles and
//! 56x84 inputs (bicubic position-embedding interpolation), vision tower output and image tokens.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use r1v2_actors::model::adapter::{Adapter, PixelShuffleVersion};
use r1v2_actors::model::vision::{VisionConfig, VisionModel};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/internvl");

struct Fixture {
    vision: VisionModel,
    adapter: Adapter,
    reference: HashMap<String, Tensor>,
}

fn load(variant: &str) -> Result<Fixture> {
    let dir = format!("{FIXTURES}/{variant}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/config.json"))?)?;
    let vision_cfg: VisionConfig = serde_json::from_value(config["vision_config"].clone())?;
    let llm_hidden = config["llm_config"]["hidden_size"]
        .as_u64()
        .expect("fixture has llm_config.hidden_size") as usize;
    let weights = candle_core::safetensors::load(format!("{dir}/model.safetensors"), &Device::Cpu)?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let vision = VisionModel::new(&vision_cfg, vb.pp("vision_model"))?;
    let adapter = Adapter::new(
        vision_cfg.hidden_size,
        llm_hidden,
        0.5,
        PixelShuffleVersion::V2,
        vb.pp("mlp1"),
    )?;
    let reference =
        candle_core::safetensors::load(format!("{dir}/reference.safetensors"), &Device::Cpu)?;
    Ok(Fixture {
        vision,
        adapter,
        reference,
    })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn check_variant(variant: &str) -> Result<()> {
    let fx = load(variant)?;
    for suffix in ["", "_84"] {
        let pixels = &fx.reference[&format!("pixel_values{suffix}")];
        let hidden = fx.vision.forward_hidden(pixels, -1)?;
        let diff = max_abs_diff(&hidden, &fx.reference[&format!("vision_out{suffix}")])?;
        assert!(
            diff < 1e-4,
            "{variant}{suffix}: vision tower differs by {diff}"
        );
        let features = fx.adapter.forward(&fx.vision.forward(pixels, -1)?)?;
        let features = features.flatten_to(1)?;
        let diff = max_abs_diff(&features, &fx.reference[&format!("image_features{suffix}")])?;
        assert!(
            diff < 1e-4,
            "{variant}{suffix}: image features differ by {diff}"
        );
    }
    // Non-square input: the 4x4 position grid is interpolated to 4x6.
    let pixels = &fx.reference["pixel_values_56x84"];
    let hidden = fx.vision.forward_hidden(pixels, -1)?;
    let diff = max_abs_diff(&hidden, &fx.reference["vision_out_56x84"])?;
    assert!(
        diff < 1e-4,
        "{variant}_56x84: vision tower differs by {diff}"
    );
    Ok(())
}

#[test]
fn internvit_300m_kind_and_adapter_match_transformers() -> Result<()> {
    check_variant("vit300m")
}

#[test]
fn internvit_6b_kind_and_adapter_match_transformers() -> Result<()> {
    check_variant("vit6b")
}
