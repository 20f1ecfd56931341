//! Does a chat model see its images? The vision tokens (InternViT + MLP adapter output) of each image, and
//! how much they differ between images against their overall size. A model whose tokens barely change with
//! the image (difference/size near 0) answers from the text alone, whatever its loss says.
//!
//!     cargo run --release --example vision_probe -- MODEL_DIR IMAGE_A IMAGE_B [IMAGE ...]

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use r1v2::prompting::PromptEncoder;
use r1v2_actors::model::chat::{ChatModel, Trainable};

fn rms(t: &Tensor) -> anyhow::Result<f32> {
    Ok(t.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 3,
        "usage: vision_probe MODEL_DIR IMAGE_A IMAGE_B [IMAGE ...]"
    );
    let dir = std::path::Path::new(&args[0]);
    let encoder = PromptEncoder::from_model_dir(dir, &Device::Cpu, DType::F32)?;
    let model = ChatModel::load(dir, DType::F32, &Device::Cpu, Trainable::default())?.model;
    let mut tokens = Vec::new();
    for image in &args[1..] {
        let encoded = encoder.encode("?", &[image.into()])?;
        let pixels = encoded
            .pixel_values
            .with_context(|| format!("{image}: no pixel values"))?;
        tokens.push(model.image_features(&pixels)?);
    }
    let mean = (Tensor::stack(&tokens, 0)?.mean(0))?;
    println!("| image | vision tokens | rms | rms of (tokens - mean over images) |");
    println!("|---|---|---|---|");
    let mut spread = 0.0;
    for (image, t) in args[1..].iter().zip(&tokens) {
        let off = rms(&t.broadcast_sub(&mean)?)?;
        spread += off / tokens.len() as f32;
        println!("| {image} | {:?} | {:.4} | {off:.4} |", t.dims(), rms(t)?);
    }
    println!(
        "\nimage-dependent share of the vision tokens: {:.4} (mean spread / rms of the mean)",
        spread / rms(&mean)?.max(1e-12)
    );
    Ok(())
}
