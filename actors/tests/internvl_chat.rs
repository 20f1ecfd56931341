//! The InternVL-chat model against transformers' InternVLForConditionalGeneration (fixtures from
//! `tests/fixtures/gen_internvl.py`), and adapter-only training: one step changes only `mlp1.*`, and the
//! adapter's gradients match finite differences.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::Optimizer;
use r1v2_actors::model::chat::{ChatModel, LoadedChat, Trainable};

fn fixture_dir(variant: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/internvl"
    ))
    .join(variant)
}

fn load(variant: &str, trainable: Trainable) -> Result<(LoadedChat, HashMap<String, Tensor>)> {
    let dir = fixture_dir(variant);
    let mut loaded = ChatModel::load(&dir, DType::F32, &Device::Cpu, trainable)?;
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)?;
    let ctx = reference["img_context_token_id"].to_vec1::<i64>()?[0] as u32;
    loaded.model.set_img_context_token_id(ctx);
    Ok((loaded, reference))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    ensure!(
        a.dims() == b.dims(),
        "shapes differ: {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn check_logits(variant: &str) -> Result<()> {
    let (loaded, reference) = load(variant, Trainable::frozen())?;
    ensure!(
        loaded.unexpected.is_empty(),
        "unexpected tensors: {:?}",
        loaded.unexpected
    );
    ensure!(
        loaded.trainable_vars.is_empty(),
        "a frozen load handed out Vars"
    );
    let logits = loaded.model.forward(
        &reference["input_ids"],
        Some(&reference["pixel_values"]),
        None,
    )?;
    let diff = max_abs_diff(&logits, &reference["logits"])?;
    ensure!(diff < 1e-4, "{variant}: logits differ by {diff}");
    eprintln!("{variant}: max |logits - transformers| = {diff:e}");
    // The image really matters: other pixels give other logits.
    let other = (&reference["pixel_values"] * 0.5)?;
    let moved = max_abs_diff(
        &loaded
            .model
            .forward(&reference["input_ids"], Some(&other), None)?,
        &logits,
    )?;
    ensure!(moved > 1e-3, "{variant}: logits ignore the image");
    Ok(())
}

#[test]
fn chat_logits_match_transformers_vit300m() -> Result<()> {
    check_logits("vit300m")
}

#[test]
fn chat_logits_match_transformers_vit6b() -> Result<()> {
    check_logits("vit6b")
}

#[test]
fn wrong_number_of_image_tokens_is_an_error() -> Result<()> {
    let (loaded, reference) = load("vit300m", Trainable::frozen())?;
    let pixels = &reference["pixel_values"];
    // Two tiles for three tiles' worth of IMG_CONTEXT tokens.
    let err = loaded.model.forward(
        &reference["input_ids"],
        Some(&pixels.narrow(0, 0, 2)?),
        None,
    );
    let msg = err
        .expect_err("a tile/token mismatch must fail")
        .to_string();
    ensure!(msg.contains("IMG_CONTEXT"), "unclear error: {msg}");
    // IMG_CONTEXT tokens without pixels.
    let err = loaded.model.forward(&reference["input_ids"], None, None);
    ensure!(
        err.is_err(),
        "IMG_CONTEXT tokens without pixel_values must fail"
    );
    Ok(())
}

#[test]
fn trainable_selects_module_vars() -> Result<()> {
    let dir = fixture_dir("vit6b");
    let vision_only = Trainable {
        vision: true,
        adapter: false,
        llm: false,
    };
    let loaded = ChatModel::load(&dir, DType::F32, &Device::Cpu, vision_only)?;
    let total_vision = loaded
        .store
        .names()
        .iter()
        .filter(|n| n.starts_with("vision_model."))
        .count();
    ensure!(
        loaded.trainable_vars.len() == total_vision,
        "{} of {total_vision}",
        loaded.trainable_vars.len()
    );
    ensure!(loaded
        .trainable_vars
        .iter()
        .all(|(n, _)| n.starts_with("vision_model.")));
    let loaded = ChatModel::load(&dir, DType::F32, &Device::Cpu, Trainable::default())?;
    let names: Vec<&str> = loaded
        .trainable_vars
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    ensure!(
        names.len() == 6 && names.iter().all(|n| n.starts_with("mlp1.")),
        "adapter vars: {names:?}"
    );
    Ok(())
}

/// Mean negative log-likelihood of each next token.
fn lm_loss(model: &ChatModel, input_ids: &Tensor, pixels: &Tensor) -> Result<Tensor> {
    let logits = model.forward(input_ids, Some(pixels), None)?; // (B, T, V)
    let t = logits.dim(1)?;
    let targets = input_ids.i((.., 1..))?.to_dtype(DType::U32)?; // (B, T-1)
    let logprobs = r1v2_kernels::token_logprobs(&logits.i((.., ..t - 1, ..))?, &targets)?;
    Ok(logprobs.mean_all()?.neg()?)
}

fn set_entry(var: &Var, values: &[f32], index: usize, value: f32) -> Result<()> {
    let mut v = values.to_vec();
    v[index] = value;
    var.set(&Tensor::from_vec(v, var.dims(), var.device())?)?;
    Ok(())
}

#[test]
fn adapter_only_step_changes_only_adapter_and_gradients_match_finite_differences() -> Result<()> {
    let (loaded, reference) = load("vit6b", Trainable::default())?;
    let (ids, pixels) = (&reference["input_ids"], &reference["pixel_values"]);
    let model = &loaded.model;
    let loss = lm_loss(model, ids, pixels)?;
    let grads = loss.backward()?;

    // Gradients reach every adapter tensor and no other.
    for (name, tensor) in loaded.store.tensors() {
        let has_grad = grads.get(&tensor).is_some();
        ensure!(
            has_grad == name.starts_with("mlp1."),
            "{name}: gradient present = {has_grad}"
        );
    }

    // Finite differences (central, f32) on the largest-gradient entries of each adapter tensor.
    let h = 5e-3f32;
    let mut worst = (0f32, 0f32); // (|numeric - analytic|, |analytic|)
    for (name, var) in &loaded.trainable_vars {
        let grad = grads
            .get(var.as_tensor())
            .expect("checked above")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..grad.len()).collect();
        order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
        for &i in order
            .iter()
            .take(3)
            .chain(std::iter::once(&(values.len() / 2)))
        {
            set_entry(var, &values, i, values[i] + h)?;
            let up = lm_loss(model, ids, pixels)?.to_scalar::<f32>()?;
            set_entry(var, &values, i, values[i] - h)?;
            let down = lm_loss(model, ids, pixels)?.to_scalar::<f32>()?;
            set_entry(var, &values, i, values[i])?;
            let numeric = (up - down) / (2.0 * h);
            let tol = 5e-4 + 1e-2 * grad[i].abs();
            if (numeric - grad[i]).abs() > worst.0 {
                worst = ((numeric - grad[i]).abs(), grad[i].abs());
            }
            ensure!(
                (numeric - grad[i]).abs() <= tol,
                "{name}[{i}]: analytic {} vs numeric {numeric}",
                grad[i]
            );
        }
    }

    eprintln!(
        "finite differences: worst |numeric - analytic| = {:e} (|analytic| = {:e})",
        worst.0, worst.1
    );

    // One SGD step, then compare every tensor with the checkpoint on disk.
    let vars: Vec<Var> = loaded
        .trainable_vars
        .iter()
        .map(|(_, v)| v.clone())
        .collect();
    let mut sgd = candle_nn::SGD::new(vars, 0.1)?;
    sgd.backward_step(&lm_loss(model, ids, pixels)?)?;
    let on_disk = candle_core::safetensors::load(
        fixture_dir("vit6b").join("model.safetensors"),
        &Device::Cpu,
    )?;
    for (name, tensor) in loaded.store.tensors() {
        let now: Vec<u32> = tensor
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits())
            .collect();
        let before: Vec<u32> = on_disk[&name]
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits())
            .collect();
        if name.starts_with("mlp1.") {
            ensure!(now != before, "{name}: the adapter did not move");
        } else {
            ensure!(now == before, "{name}: a frozen tensor changed");
        }
    }
    let after = lm_loss(model, ids, pixels)?.to_scalar::<f32>()?;
    ensure!(
        after < loss.to_scalar::<f32>()?,
        "the step did not lower the loss"
    );
    Ok(())
}
