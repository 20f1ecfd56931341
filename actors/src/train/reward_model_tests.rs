use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::*;
use crate::model::reward::{is_vision_tensor, load_reward_dir};

fn fixtures(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(rel)
}

fn params(weight_decay: f64) -> AdamWParams {
    AdamWParams {
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay,
    }
}

#[test]
fn bradley_terry_loss_and_gradients_match_trl() -> anyhow::Result<()> {
    let io: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures("qwen2_5_vl/io.safetensors"), &Device::Cpu)?;
    let chosen = Var::from_tensor(&io["bt_chosen"])?;
    let rejected = Var::from_tensor(&io["bt_rejected"])?;
    let loss = bradley_terry_loss(chosen.as_tensor(), rejected.as_tensor(), &io["bt_margin"])?;
    let got = loss.to_scalar::<f32>()?;
    let want = io["bt_loss"].to_scalar::<f32>()?;
    assert!((got - want).abs() < 1e-5, "loss {got} vs TRL {want}");
    let grads = loss.backward()?;
    for (var, key) in [(&chosen, "bt_grad_chosen"), (&rejected, "bt_grad_rejected")] {
        let grad = grads.get(var.as_tensor()).expect("gradient");
        let diff = (grad - &io[key])?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{key}: max |diff| {diff}");
    }
    Ok(())
}

/// Pairs whose chosen answer ends with token `good` and rejected with `bad`, after random prefixes.
fn separable_pairs(count: usize, seed: u64, good: u32, bad: u32) -> Vec<PreferencePair> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    (0..count)
        .map(|_| {
            let prefix: Vec<u32> = (0..3 + next() % 4).map(|_| 20 + next() % 200).collect();
            let answer: Vec<u32> = (0..1 + next() % 3).map(|_| 20 + next() % 200).collect();
            let with = |last: u32| {
                let mut ids = prefix.clone();
                ids.extend(&answer);
                ids.push(last);
                ids
            };
            PreferencePair {
                chosen: with(good),
                rejected: with(bad),
                images: None,
                margin: 0.0,
            }
        })
        .collect()
}

#[test]
fn training_raises_held_out_accuracy_on_a_separable_task() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let dir = fixtures("qwen2/value");
    let loaded = load_reward_dir(&dir, DType::F32, &dev, |_| true)?;
    // Orient the task against the initial model, so that it has something to learn.
    let (mut good, mut bad) = (7, 9);
    let probe = evaluate(&loaded.net, &separable_pairs(16, 5, good, bad), 16, &dev)?;
    if probe.accuracy > 0.5 {
        std::mem::swap(&mut good, &mut bad);
    }
    let train = separable_pairs(32, 1, good, bad);
    let held_out = separable_pairs(24, 2, good, bad);
    let mut trainer = RewardTrainer::new(loaded, params(0.0), None, Some(1.0), &dev)?;
    let before = trainer.evaluate(&held_out, 24)?;
    for step in 0..12 {
        let batch = &train[(step * 8) % 32..(step * 8) % 32 + 8];
        trainer.step(batch, 1e-2)?;
    }
    let after = trainer.evaluate(&held_out, 24)?;
    assert!(before.accuracy <= 0.5, "{before:?}");
    assert!(
        after.accuracy >= 0.9 && after.loss < before.loss,
        "{before:?} -> {after:?}"
    );
    Ok(())
}

#[test]
fn a_qwen2_5_vl_step_with_images_trains_the_head_and_llm_but_not_the_frozen_vision(
) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let loaded = load_reward_dir(&fixtures("qwen2_5_vl/released"), DType::F32, &dev, |name| {
        !is_vision_tensor(name)
    })?;
    let vision_before = loaded.stores[0]
        .tensors()?
        .into_iter()
        .find(|(name, _)| name == "visual.blocks.0.attn.qkv.weight")
        .expect("vision tensor")
        .1;
    let io: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures("qwen2_5_vl/io.safetensors"), &dev)?;
    let frame = io["pixels_d"].unsqueeze(2)?;
    let n = frame.dim(0)?;
    let images = Images {
        pixel_values: Tensor::cat(&[&frame, &frame], 2)?.reshape((n, 3 * 2 * 196))?,
        grids: vec![[1, 4, 4]],
    };
    let prompt = |tail: u32| -> Vec<u32> {
        let mut ids = vec![3, 4, 250, 252, 252, 252, 252, 251, 5];
        ids.push(tail);
        ids
    };
    let pairs: Vec<PreferencePair> = [(10, 11), (12, 13)]
        .iter()
        .map(|&(c, r)| PreferencePair {
            chosen: prompt(c),
            rejected: prompt(r),
            images: Some(images.clone()),
            margin: 0.5,
        })
        .collect();
    let mut trainer = RewardTrainer::new(loaded, params(0.01), None, None, &dev)?;
    assert!(trainer.trainable_parameters() > 0);
    let first = trainer.step(&pairs, 5e-2)?;
    for _ in 0..4 {
        trainer.step(&pairs, 5e-2)?;
    }
    let last = trainer.evaluate(&pairs, 2)?;
    assert!(last.loss < first.loss, "{first:?} -> {last:?}");
    let vision_after = trainer.loaded.stores[0]
        .tensors()?
        .into_iter()
        .find(|(name, _)| name == "visual.blocks.0.attn.qkv.weight")
        .expect("vision tensor")
        .1;
    let moved = (vision_after - vision_before)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert_eq!(moved, 0.0, "the frozen vision tower changed");

    // Saved and reloaded, the model scores as the trained one.
    let out = tempfile::tempdir()?;
    trainer.save_model(out.path())?;
    for file in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(
            fixtures("qwen2_5_vl/released").join(file),
            out.path().join(file),
        )?;
    }
    let reloaded = load_reward_dir(out.path(), DType::F32, &dev, |_| false)?;
    let again = evaluate(&reloaded.net, &pairs, 2, &dev)?;
    assert!(
        (again.loss - last.loss).abs() < 1e-5,
        "{again:?} vs {last:?}"
    );
    Ok(())
}
