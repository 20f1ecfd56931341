//! `[model] pretrain_vision`: supervised pretraining of a tiny policy's vision tower and MLP adapter, the
//! demo's stand-in for a pretrained InternViT (R1V2 starts from InternViT-6B and an aligned adapter; a random
//! tower's tokens do carry the image, but a 3-layer LLM learns to read them too slowly: with it, 1,200 SFT
//! steps left colour and kind counts at chance).
//!
//! Each step draws fresh scenes from the demo task's generators (shapes, and digits from the training pool
//! only: the held-out digit images are never seen), runs InternViT + pixel shuffle + `mlp1` to the 9 image
//! tokens (one per 28-px cell), and trains a linear readout of each token's cell content with cross-entropy:
//! empty, one of 9 colour-shape pairs, or one of 10 digits. The readout is then dropped; the tower and the
//! adapter are written into the model directory. The LLM is untouched.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::Serialize;

use super::digits::{self, Digit, DigitScene};
use super::shapes::{Colour, Scene, Shape};
use crate::config::VisionPretrainSpec;
use crate::images::normalize_tiles;
use crate::{Error, Result};
use r1v2_actors::model::chat::{ChatModel, Trainable};

/// Cell classes: empty, 9 colour-shape pairs, 10 digits.
const CLASSES: usize = 20;
/// Cells per image (a 3 x 3 grid: one image token each).
const CELLS: usize = 9;
/// The share of digit images among the scenes.
const DIGIT_SHARE: f64 = 1.0 / 3.0;
/// Images in the before/after measurement.
const PROBE_IMAGES: usize = 256;

fn class_of_shape(colour: Colour, shape: Shape) -> u32 {
    let c = Colour::ALL.iter().position(|&x| x == colour).unwrap_or(0);
    let s = Shape::ALL.iter().position(|&x| x == shape).unwrap_or(0);
    1 + (c * 3 + s) as u32
}

/// A batch of scenes and their cell labels, (B, 3, S, S) and (B * 9,).
fn batch(
    count: usize,
    digits: &[Digit],
    pool: &[usize],
    rng: &mut ChaCha8Rng,
) -> Result<(Tensor, Tensor)> {
    let mut images = Vec::with_capacity(count);
    let mut labels = Vec::with_capacity(count * CELLS);
    for _ in 0..count {
        let mut cells = [0u32; CELLS];
        if rng.gen_bool(DIGIT_SHARE) {
            let scene = DigitScene::random(pool, rng);
            for &(cell, index) in &scene.placed {
                cells[cell] = 10 + digits[index].label as u32;
            }
            images.push(scene.render(digits, rng));
        } else {
            let scene = Scene::random(rng);
            for item in &scene.items {
                cells[item.cell()] = class_of_shape(item.colour, item.shape);
            }
            images.push(scene.render(rng));
        }
        labels.extend_from_slice(&cells);
    }
    let pixels = normalize_tiles(&images, &Device::Cpu)?; // (B, 3, S, S)
    let labels = Tensor::from_vec(labels, count * CELLS, &Device::Cpu)?;
    Ok((pixels, labels))
}

/// The readout: image tokens (B, 9, D) -> logits (B * 9, CLASSES).
fn logits(model: &ChatModel, head: &Var, bias: &Var, pixels: &Tensor) -> Result<Tensor> {
    let tokens = model.image_features(pixels)?; // (B, 9, D)
    let (b, n, d) = tokens.dims3()?;
    if n != CELLS {
        return Err(Error::Msg(format!(
            "model.pretrain_vision: the model makes {n} image tokens per tile, the demo's scenes need \
             {CELLS} (model.tiny.image_size = 84)"
        )));
    }
    let flat = tokens.reshape((b * n, d))?; // (B*9, D)
    Ok(flat
        .matmul(head.as_tensor())?
        .broadcast_add(bias.as_tensor())?)
}

/// Cell accuracy of the readout's `logits` against `labels`, over all cells and over the non-empty ones.
fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<(f64, f64)> {
    let predicted = logits.argmax(1)?.to_vec1::<u32>()?;
    let labels = labels.to_vec1::<u32>()?;
    let (mut right, mut filled, mut filled_right) = (0usize, 0usize, 0usize);
    for (p, l) in predicted.iter().zip(&labels) {
        right += usize::from(p == l);
        if *l != 0 {
            filled += 1;
            filled_right += usize::from(p == l);
        }
    }
    Ok((
        right as f64 / labels.len().max(1) as f64,
        filled_right as f64 / filled.max(1) as f64,
    ))
}

/// What the pretraining did, written beside the weights as `vision_pretrain.json`.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainReport {
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    /// Readout accuracy on fresh scenes (digits from the held-out pool) after pretraining: all cells, and the
    /// cells that hold a shape or a digit.
    pub cell_accuracy: f64,
    pub filled_cell_accuracy: f64,
    pub seconds: f64,
}

/// Pretrains the vision tower and adapter of the InternVL-chat checkpoint in `source` and writes the
/// whole checkpoint, LLM unchanged, to `target` (through `target`.tmp, renamed when complete).
pub fn pretrain(source: &Path, target: &Path, spec: &VisionPretrainSpec) -> Result<PretrainReport> {
    let started = std::time::Instant::now();
    let trainable = Trainable {
        vision: true,
        adapter: true,
        llm: false,
    };
    let loaded = ChatModel::load(source, DType::F32, &Device::Cpu, trainable)?;
    let width = loaded.model.config().llm_config["hidden_size"]
        .as_u64()
        .ok_or_else(|| {
            Error::Msg(format!(
                "{}: llm_config.hidden_size is missing",
                source.join("config.json").display()
            ))
        })? as usize;
    let all = digits::load()?;
    let (pool, heldout_pool) = super::digit_pools(all.len());

    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    // Normal::new fails only for a negative or non-finite std.
    let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::Msg(e.to_string()))?;
    let init: Vec<f32> = (0..width * CLASSES)
        .map(|_| normal.sample(&mut rng))
        .collect();
    let head = Var::from_tensor(&Tensor::from_vec(init, (width, CLASSES), &Device::Cpu)?)?;
    let bias = Var::zeros(CLASSES, DType::F32, &Device::Cpu)?;
    let mut vars: Vec<Var> = loaded
        .trainable_vars
        .iter()
        .map(|(_, v)| v.clone())
        .collect();
    vars.extend([head.clone(), bias.clone()]);
    let mut optimizer = AdamW::new(
        vars,
        ParamsAdamW {
            lr: spec.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;

    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    for step in 0..spec.steps {
        let (pixels, labels) = batch(spec.batch, &all, &pool, &mut rng)?;
        let logits = logits(&loaded.model, &head, &bias, &pixels)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        optimizer.backward_step(&loss)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if step == 0 {
            first_loss = value;
        }
        last_loss = value;
        if (step + 1) % 100 == 0 || step + 1 == spec.steps {
            tracing::info!(
                step = step + 1,
                loss = value,
                "vision pretraining: step {}/{} loss {value:.4}",
                step + 1,
                spec.steps
            );
        }
    }

    let mut probe_rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x5eed);
    let (pixels, labels) = batch(PROBE_IMAGES, &all, &heldout_pool, &mut probe_rng)?;
    let (cell_accuracy, filled_cell_accuracy) =
        accuracy(&logits(&loaded.model, &head, &bias, &pixels)?, &labels)?;
    let report = PretrainReport {
        steps: spec.steps,
        first_loss,
        last_loss,
        cell_accuracy,
        filled_cell_accuracy,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        cell_accuracy,
        filled_cell_accuracy,
        "vision pretraining: readout accuracy on fresh scenes {cell_accuracy:.3} (filled cells \
         {filled_cell_accuracy:.3}) in {:.0} s",
        report.seconds
    );

    let staging = target.with_extension("tmp");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|source| Error::Io {
            path: staging.clone(),
            source,
        })?;
    }
    loaded.save(&staging, usize::MAX)?;
    let report_path = staging.join("vision_pretrain.json");
    // A struct of numbers always serialises.
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    std::fs::write(&report_path, text).map_err(|source| Error::Io {
        path: report_path,
        source,
    })?;
    std::fs::rename(&staging, target).map_err(|source| Error::Io {
        path: target.into(),
        source,
    })?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TinySpec;

    #[test]
    fn the_pretraining_pool_leaves_out_a_fifth_of_the_digits_for_the_heldout_split() {
        let all = digits::load().unwrap();
        let (pool, _) = crate::demo::digit_pools(all.len());
        let mut sorted = pool.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), pool.len());
        assert_eq!(all.len() - pool.len(), (all.len() as f64 * 0.2) as usize);
        // The same draws every time: the split write_task makes.
        assert_eq!(pool, crate::demo::digit_pools(all.len()).0);
    }

    #[test]
    fn bad_pretrain_settings_are_errors_naming_the_key() {
        let demo = crate::demo::DEMO_CONFIG;
        for (text, key) in [
            (
                demo.replace("tiny = { seed = 0", "dir = \"m\"\n# tiny = { seed = 0"),
                "model.pretrain_vision",
            ),
            (
                demo.replace(
                    "pretrain_vision = { steps = 600",
                    "pretrain_vision = { steps = 0",
                ),
                "model.pretrain_vision",
            ),
            (
                demo.replace("batch = 32, lr = 0.001 }", "batch = 32, lr = -1.0 }"),
                "model.pretrain_vision.lr",
            ),
        ] {
            assert_ne!(text, demo);
            let err = crate::config::TrainConfig::from_toml_str(&text, Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn pretraining_teaches_the_readout_and_changes_only_vision_and_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec {
            seed: 0,
            hidden: 32,
            layers: 1,
            image_size: 84,
            vision_hidden: 16,
            vision_layers: 1,
        };
        let random = dir.path().join("random");
        crate::tiny::write_chat_model(&random, &spec).unwrap();
        let target = dir.path().join("pretrained");
        let report = pretrain(
            &random,
            &target,
            &VisionPretrainSpec {
                steps: 200,
                batch: 16,
                lr: 3e-3,
                seed: 0,
            },
        )
        .unwrap();
        assert!(report.last_loss < report.first_loss * 0.6, "{report:?}");
        // Empty cells alone are ~60% of all: the readout must also name what fills the others.
        assert!(report.cell_accuracy > 0.7, "{report:?}");
        assert!(report.filled_cell_accuracy > 0.3, "{report:?}");
        assert!(target.join("vision_pretrain.json").is_file());
        assert!(!dir.path().join("pretrained.tmp").exists());

        let read = |d: &Path| {
            let loaded = ChatModel::load(d, DType::F32, &Device::Cpu, Trainable::frozen()).unwrap();
            loaded
                .store
                .shapes()
                .into_iter()
                .map(|(name, _)| {
                    let t = loaded.store.tensor(&name).unwrap();
                    (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                })
                .collect::<Vec<_>>()
        };
        let (before, after) = (read(&random), read(&target));
        assert_eq!(before.len(), after.len());
        for ((name, a), (name_b, b)) in before.iter().zip(&after) {
            assert_eq!(name, name_b);
            let moved = a.iter().zip(b).any(|(x, y)| x != y);
            if name.starts_with("language_model.") {
                assert!(!moved, "{name} changed");
            } else if name.starts_with("mlp1.1.")
                || name == "vision_model.embeddings.patch_embedding.weight"
            {
                assert!(moved, "{name} did not train");
            }
        }
    }
}
