//! Reward-model training with the Bradley-Terry loss, for either [`RewardNet`] family.
//!
//! Loss of a pair (TRL 1.16 `RewardTrainer.compute_loss`):
//! `-logsigmoid(r_chosen - r_rejected - margin).mean()`, computed as `softplus(-(r_c - r_r - m))` =
//! `relu(-z) + log(1 + exp(-|z|))`, stable for any `z`. Chosen and rejected rows of a batch go through one
//! forward pass (right-padded; each row carries its question's images), and every trainable tensor gets its
//! gradient from that one backward. Accuracy: the fraction of pairs with `r_chosen > r_rejected`.

use std::path::Path;

use candle_core::{Device, Tensor, Var};

use super::adamw::{AdamW, AdamWParams, AdamWState};
use super::schedule::clip_grad_norm;
use crate::model::qwen2_5_vl::{Images, VALUE_HEAD_FILE};
use crate::model::reward::{LoadedReward, RewardNet};
use crate::model::weights::{save, DEFAULT_MAX_SHARD_BYTES};
use crate::{Error, Result};

/// One preference pair, tokenized: prompt + response ids of both answers, the question's images.
#[derive(Debug, Clone)]
pub struct PreferencePair {
    /// Prompt + chosen response.
    pub chosen: Vec<u32>,
    /// Prompt + rejected response.
    pub rejected: Vec<u32>,
    /// The question's images (the same for both answers), for a model that reads them.
    pub images: Option<Images>,
    /// Required score gap (0: plain Bradley-Terry).
    pub margin: f32,
}

/// `-logsigmoid(chosen - rejected - margin)`, averaged: chosen, rejected, margin (N) -> scalar.
pub fn bradley_terry_loss(chosen: &Tensor, rejected: &Tensor, margin: &Tensor) -> Result<Tensor> {
    let z = ((chosen - rejected)? - margin)?; // (N)
    let softplus = (z.neg()?.relu()? + ((z.abs()?.neg()?.exp()? + 1.0)?.log())?)?; // softplus(-z)
    Ok(softplus.mean_all()?)
}

/// Scores the chosen rows then the rejected rows of `pairs` in one forward: (chosen (N), rejected (N)).
pub fn score_pairs(
    net: &RewardNet,
    pairs: &[PreferencePair],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let rows: Vec<(&[u32], Option<&Images>)> = pairs
        .iter()
        .map(|p| (p.chosen.as_slice(), p.images.as_ref()))
        .chain(
            pairs
                .iter()
                .map(|p| (p.rejected.as_slice(), p.images.as_ref())),
        )
        .collect();
    let scores = score_rows(net, &rows, device)?;
    let n = pairs.len();
    Ok((scores.narrow(0, 0, n)?, scores.narrow(0, n, n)?))
}

/// Right-pads `rows` into one batch (ids 0 with mask 0), concatenates their images in row order, scores it.
pub fn score_rows(
    net: &RewardNet,
    rows: &[(&[u32], Option<&Images>)],
    device: &Device,
) -> Result<Tensor> {
    let width = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    if rows.is_empty() || width == 0 || rows.iter().any(|(ids, _)| ids.is_empty()) {
        return Err(Error::msg(
            "reward model: an empty batch or an empty sequence",
        ));
    }
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    let (mut pixels, mut grids) = (Vec::new(), Vec::new());
    for (row, images) in rows {
        ids.extend(
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(0, width - row.len())),
        );
        mask.extend(
            std::iter::repeat_n(1u32, row.len()).chain(std::iter::repeat_n(0, width - row.len())),
        );
        if let Some(images) = images.filter(|_| net.takes_images()) {
            pixels.push(images.pixel_values.to_device(device)?);
            grids.extend_from_slice(&images.grids);
        }
    }
    let ids = Tensor::from_vec(ids, (rows.len(), width), device)?;
    let mask = Tensor::from_vec(mask, (rows.len(), width), device)?;
    let images = if pixels.is_empty() {
        None
    } else {
        Some(Images {
            pixel_values: Tensor::cat(&pixels, 0)?,
            grids,
        })
    };
    net.score(&ids, Some(&mask), images.as_ref())
}

/// What one update or evaluation measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairMetrics {
    /// Mean Bradley-Terry loss.
    pub loss: f64,
    /// Fraction of pairs scored chosen > rejected.
    pub accuracy: f64,
    /// Mean `r_chosen - r_rejected`.
    pub mean_gap: f64,
    /// Number of pairs.
    pub pairs: usize,
}

fn metrics(chosen: &Tensor, rejected: &Tensor, loss: f64) -> Result<PairMetrics> {
    let gaps = (chosen - rejected)?.to_vec1::<f32>()?;
    let n = gaps.len().max(1) as f64;
    Ok(PairMetrics {
        loss,
        accuracy: gaps.iter().filter(|&&g| g > 0.0).count() as f64 / n,
        mean_gap: gaps.iter().map(|&g| g as f64).sum::<f64>() / n,
        pairs: gaps.len(),
    })
}

/// A reward model, its trainable tensors and AdamW.
pub struct RewardTrainer {
    /// The model being trained.
    pub loaded: LoadedReward,
    optimizer: AdamW,
    device: Device,
    max_grad_norm: Option<f64>,
}

impl RewardTrainer {
    /// Trains the `Var`s of `loaded`'s stores; `state` continues a saved optimizer.
    pub fn new(
        loaded: LoadedReward,
        params: AdamWParams,
        state: Option<AdamWState>,
        max_grad_norm: Option<f64>,
        device: &Device,
    ) -> Result<Self> {
        let vars: Vec<(String, Var)> = loaded
            .stores
            .iter()
            .flat_map(|store| store.trainable_vars())
            .collect();
        if vars.is_empty() {
            return Err(Error::msg("reward model training: no trainable tensor"));
        }
        let optimizer = match state {
            Some(state) => AdamW::from_state(vars, params, state)?,
            None => AdamW::new(vars, params)?,
        };
        Ok(Self {
            loaded,
            optimizer,
            device: device.clone(),
            max_grad_norm,
        })
    }

    /// Number of trainable parameters.
    pub fn trainable_parameters(&self) -> usize {
        self.optimizer.vars().map(|(_, v)| v.elem_count()).sum()
    }

    /// One AdamW update on `pairs` with learning rate `lr`; the metrics are those of the forward before it.
    pub fn step(&mut self, pairs: &[PreferencePair], lr: f64) -> Result<PairMetrics> {
        let (chosen, rejected) = score_pairs(&self.loaded.net, pairs, &self.device)?;
        let margin: Vec<f32> = pairs.iter().map(|p| p.margin).collect();
        let margin = Tensor::from_vec(margin, pairs.len(), &self.device)?;
        let loss = bradley_terry_loss(&chosen, &rejected, &margin)?;
        let grads = loss.backward()?;
        let mut grads: Vec<Tensor> = self
            .optimizer
            .vars()
            .map(|(_, var)| match grads.get(var.as_tensor()) {
                Some(grad) => Ok(grad.clone()),
                None => Ok(var.as_tensor().zeros_like()?),
            })
            .collect::<Result<_>>()?;
        if let Some(max_norm) = self.max_grad_norm {
            clip_grad_norm(&mut grads, max_norm)?;
        }
        let value = loss.to_scalar::<f32>()? as f64;
        let measured = metrics(&chosen.detach(), &rejected.detach(), value)?;
        self.optimizer.step(&grads, lr)?;
        Ok(measured)
    }

    /// Loss and accuracy on `pairs`, `batch` pairs per forward, without updating.
    pub fn evaluate(&self, pairs: &[PreferencePair], batch: usize) -> Result<PairMetrics> {
        evaluate(&self.loaded.net, pairs, batch, &self.device)
    }

    /// The optimizer's state (for checkpoints).
    pub fn optimizer_state(&self) -> AdamWState {
        self.optimizer.state()
    }

    /// Writes the model to `dir` in its own layout: the checkpoint (f32, `model.safetensors`), plus
    /// `value_head.safetensors` for Qwen2.5-VL. Config and tokenizer files are the caller's to copy.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        let mut stores = self.loaded.stores.iter();
        if let Some(main) = stores.next() {
            save(
                dir,
                &main.tensors()?,
                candle_core::DType::F32,
                DEFAULT_MAX_SHARD_BYTES,
            )?;
        }
        if let Some(head) = stores.next() {
            let path = dir.join(VALUE_HEAD_FILE);
            let tensors: std::collections::HashMap<String, Tensor> =
                head.tensors()?.into_iter().collect();
            candle_core::safetensors::save(&tensors, &path).map_err(|err| Error::Checkpoint {
                path: path.clone(),
                msg: err.to_string(),
            })?;
        }
        Ok(())
    }
}

/// Loss and accuracy of `net` on `pairs`, `batch` pairs per forward.
pub fn evaluate(
    net: &RewardNet,
    pairs: &[PreferencePair],
    batch: usize,
    device: &Device,
) -> Result<PairMetrics> {
    let (mut gaps, mut losses) = (Vec::new(), Vec::new());
    for chunk in pairs.chunks(batch.max(1)) {
        let (chosen, rejected) = score_pairs(net, chunk, device)?;
        let (chosen, rejected) = (chosen.detach(), rejected.detach());
        let margin: Vec<f32> = chunk.iter().map(|p| p.margin).collect();
        let margin = Tensor::from_vec(margin, chunk.len(), device)?;
        let loss = bradley_terry_loss(&chosen, &rejected, &margin)?.to_scalar::<f32>()? as f64;
        losses.push(loss * chunk.len() as f64);
        gaps.extend((chosen - rejected)?.to_vec1::<f32>()?);
    }
    let n = gaps.len().max(1) as f64;
    Ok(PairMetrics {
        loss: losses.iter().sum::<f64>() / n,
        accuracy: gaps.iter().filter(|&&g| g > 0.0).count() as f64 / n,
        mean_gap: gaps.iter().map(|&g| g as f64).sum::<f64>() / n,
        pairs: gaps.len(),
    })
}

#[cfg(test)]
#[path = "reward_model_tests.rs"]
mod tests;
