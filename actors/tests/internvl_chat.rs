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
    let counts = loaded.parameter_counts();
    let modules: Vec<&str> = counts.iter().map(|(m, _)| m.as_str()).collect();
    ensure!(
        modules == ["language_model", "mlp1", "vision_model"],
        "{modules:?}"
    );
    // mlp1: LayerNorm(4*32) + Linear(128, 64) + Linear(64, 64), from the fixture's sizes.
    ensure!(
        counts[1].1 == 2 * 128 + 128 * 64 + 64 + 64 * 64 + 64,
        "{counts:?}"
    );
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

/// Central differences (f32, h = 5e-3) on the three largest-gradient entries and one middle entry of
/// every var, against the analytic gradients in `grads`: |numeric - analytic| <= abs_tol + 1% |analytic|.
/// `abs_tol` covers f32 rounding of the loss divided by 2h (about 1e-6 x |loss| / 1e-2).
fn check_finite_differences(
    vars: &[(String, Var)],
    grads: &candle_core::backprop::GradStore,
    loss: impl Fn() -> Result<f32>,
    abs_tol: f32,
) -> Result<()> {
    let h = 5e-3f32;
    let mut worst = (0f32, 0f32, String::new()); // (|numeric - analytic|, |analytic|, where)
    for (name, var) in vars {
        let Some(grad) = grads.get(var.as_tensor()) else {
            anyhow::bail!("{name}: no gradient");
        };
        let grad = grad.flatten_all()?.to_vec1::<f32>()?;
        let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..grad.len()).collect();
        order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
        for &i in order
            .iter()
            .take(3)
            .chain(std::iter::once(&(values.len() / 2)))
        {
            set_entry(var, &values, i, values[i] + h)?;
            let up = loss()?;
            set_entry(var, &values, i, values[i] - h)?;
            let down = loss()?;
            set_entry(var, &values, i, values[i])?;
            let numeric = (up - down) / (2.0 * h);
            let error = (numeric - grad[i]).abs();
            if error > worst.0 {
                worst = (error, grad[i].abs(), format!("{name}[{i}]"));
            }
            let tol = abs_tol + 1e-2 * grad[i].abs();
            ensure!(
                error <= tol,
                "{name}[{i}]: analytic {} vs numeric {numeric}",
                grad[i]
            );
        }
    }
    eprintln!(
        "finite differences over {} tensors: worst |numeric - analytic| = {:e} at {} (|analytic| = {:e})",
        vars.len(),
        worst.0,
        worst.2,
        worst.1
    );
    Ok(())
}

/// Vision-trainable: gradients through InternViT (patchify matmul, bicubic position interpolation at
/// 84 px, norms, q/k norm, layer scales) match finite differences.
fn check_vision_gradients(variant: &str) -> Result<()> {
    let vision_only = Trainable {
        vision: true,
        adapter: false,
        llm: false,
    };
    let (loaded, reference) = load(variant, vision_only)?;
    let pixels = &reference["pixel_values_84"];
    let features = loaded.model.image_features(pixels)?;
    // A fixed, non-symmetric projection of the image tokens to one scalar.
    let n = features.elem_count();
    let weights = Tensor::arange(0f32, n as f32, &Device::Cpu)?
        .affine(0.37, 0.1)?
        .sin()?;
    let weights = weights.reshape(features.dims())?;
    let loss_of = |f: &Tensor| -> Result<Tensor> { Ok((f * &weights)?.mean_all()?) };
    let grads = loss_of(&features)?.backward()?;
    let loss_value = || -> Result<f32> {
        Ok(loss_of(&loaded.model.image_features(pixels)?)?.to_scalar::<f32>()?)
    };
    ensure!(loaded
        .trainable_vars
        .iter()
        .all(|(n, _)| n.starts_with("vision_model.")));
    // The loss is ~1e-2: rounding noise ~1e-6 after dividing by 2h; gradients are up to ~1e-2.
    check_finite_differences(&loaded.trainable_vars, &grads, loss_value, 2e-5)
}

#[test]
fn vision_gradients_match_finite_differences_vit300m() -> Result<()> {
    check_vision_gradients("vit300m")
}

#[test]
fn vision_gradients_match_finite_differences_vit6b() -> Result<()> {
    check_vision_gradients("vit6b")
}

#[test]
fn adapter_only_step_changes_only_adapter_and_gradients_match_finite_differences() -> Result<()> {
    let (loaded, reference) = load("vit6b", Trainable::default())?;
    let (ids, pixels) = (&reference["input_ids"], &reference["pixel_values"]);
    let model = &loaded.model;
    let loss = lm_loss(model, ids, pixels)?;
    let grads = loss.backward()?;

    // Gradients reach every adapter tensor and no other.
    for (name, tensor) in loaded.store.tensors()? {
        let has_grad = grads.get(&tensor).is_some();
        ensure!(
            has_grad == name.starts_with("mlp1."),
            "{name}: gradient present = {has_grad}"
        );
    }

    // Finite differences (central, f32) on the largest-gradient entries of each adapter tensor.
    let loss_value = || -> Result<f32> { Ok(lm_loss(model, ids, pixels)?.to_scalar::<f32>()?) };
    // The loss is ~4.5 (ln 96): rounding noise ~5e-4 after dividing by 2h.
    check_finite_differences(&loaded.trainable_vars, &grads, loss_value, 5e-4)?;

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
    for (name, tensor) in loaded.store.tensors()? {
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

    // Saved and reloaded (sharded, to exercise the index), the trained model computes the same logits.
    let saved = tempfile::tempdir()?;
    loaded.save(saved.path(), 100_000)?;
    ensure!(saved.path().join("model.safetensors.index.json").is_file());
    let mut reloaded =
        ChatModel::load(saved.path(), DType::F32, &Device::Cpu, Trainable::frozen())?;
    ensure!(
        reloaded.unexpected.is_empty(),
        "unexpected: {:?}",
        reloaded.unexpected
    );
    reloaded
        .model
        .set_img_context_token_id(model.img_context_token_id().expect("set by load()"));
    let diff = max_abs_diff(
        &reloaded.model.forward(ids, Some(pixels), None)?,
        &model.forward(ids, Some(pixels), None)?,
    )?;
    ensure!(diff == 0.0, "reloaded model differs by {diff}");
    ensure!(
        after < loss.to_scalar::<f32>()?,
        "the step did not lower the loss"
    );
    Ok(())
}

/// A copy of the vit300m fixture with its tensors edited by `edit` and its config by `edit_config`.
fn edited_checkpoint(
    edit: impl FnOnce(&mut HashMap<String, Tensor>) -> Result<()>,
    edit_config: impl FnOnce(&mut serde_json::Value),
) -> Result<tempfile::TempDir> {
    let src = fixture_dir("vit300m");
    let dir = tempfile::tempdir()?;
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)?;
    edit(&mut tensors)?;
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors"))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)?;
    edit_config(&mut config);
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&config)?,
    )?;
    Ok(dir)
}

fn load_error(dir: &tempfile::TempDir) -> String {
    match ChatModel::load(dir.path(), DType::F32, &Device::Cpu, Trainable::default()) {
        Ok(_) => "loaded".to_string(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_checkpoints_give_errors_that_name_the_tensor_or_key() -> Result<()> {
    let missing = "vision_model.encoder.layers.1.ls2";
    let dir = edited_checkpoint(
        |t| {
            t.remove(missing);
            Ok(())
        },
        |_| {},
    )?;
    let msg = load_error(&dir);
    ensure!(msg.contains(missing), "missing tensor: {msg}");

    let reshaped = "mlp1.1.weight";
    let dir = edited_checkpoint(
        |t| {
            let w = t[reshaped].t()?.contiguous()?;
            t.insert(reshaped.to_string(), w);
            Ok(())
        },
        |_| {},
    )?;
    let msg = load_error(&dir);
    ensure!(msg.contains(reshaped), "mis-shaped tensor: {msg}");

    let dir = edited_checkpoint(|_| Ok(()), |c| c["model_type"] = "llava".into())?;
    let msg = load_error(&dir);
    ensure!(
        msg.contains("model_type") && msg.contains("config.json"),
        "model type: {msg}"
    );

    let dir = edited_checkpoint(
        |_| Ok(()),
        |c| c["vision_config"]["norm_type"] = "batch_norm".into(),
    )?;
    let msg = load_error(&dir);
    ensure!(msg.contains("norm_type"), "norm type: {msg}");

    let dir = edited_checkpoint(
        |t| {
            t.insert(
                "vision_model.extra.weight".into(),
                Tensor::zeros(3, DType::F32, &Device::Cpu)?,
            );
            Ok(())
        },
        |c| c["model_type"] = "skywork_chat".into(),
    )?;
    let loaded = ChatModel::load(dir.path(), DType::F32, &Device::Cpu, Trainable::default())?;
    ensure!(
        loaded.unexpected == ["vision_model.extra.weight"],
        "unexpected: {:?}",
        loaded.unexpected
    );
    Ok(())
}

#[test]
fn bf16_checkpoint_runs_close_to_f32_reference() -> Result<()> {
    let dir = fixture_dir("vit6b");
    let mut loaded = ChatModel::load(&dir, DType::BF16, &Device::Cpu, Trainable::frozen())?;
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)?;
    let ctx = reference["img_context_token_id"].to_vec1::<i64>()?[0] as u32;
    loaded.model.set_img_context_token_id(ctx);
    let pixels = reference["pixel_values"].to_dtype(DType::BF16)?;
    let logits = loaded
        .model
        .forward(&reference["input_ids"], Some(&pixels), None)?;
    ensure!(logits.dtype() == DType::BF16);
    let expected = &reference["logits"];
    let scale = expected.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let diff = max_abs_diff(&logits.to_dtype(DType::F32)?, expected)?;
    eprintln!("bf16: max |logits - f32 reference| = {diff:e} (max |logit| = {scale:e})");
    // bf16 keeps 8 mantissa bits: a few percent of the logit scale after two ViT and two LLM layers.
    ensure!(
        diff < 0.05 * scale,
        "bf16 logits differ by {diff} (scale {scale})"
    );
    Ok(())
}
