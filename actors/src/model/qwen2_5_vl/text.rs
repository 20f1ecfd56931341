//! The Qwen2.5-VL LLM: the Qwen2 decoder ([`qwen2::Model`], the same tensors) with multimodal RoPE.
//! Each token has three positions (temporal, height, width); the rotary frequencies are split into
//! `mrope_section` runs and run `k` takes its angles from axis `k`. Text tokens have the same value on all
//! three axes (the usual 1D position); an image's merged patches sit at (start, start + row, start + col).
//!
//! Reference: transformers 5 `modeling_qwen2_5_vl.py`, `Qwen2_5_VLModel.get_rope_index` /
//! `get_vision_position_ids` (images: time interval 1, one frame) and `apply_multimodal_rotary_pos_emb`.

use candle_core::{DType, Device, Tensor};

use super::super::kv_cache::{mask_rows, KvCache};
use super::super::qwen2;
use super::config::Config;
use crate::{Error, Result};

/// Three-axis positions of a batch: `[axis][row][slot]`; padding slots hold 0, as the reference.
pub type MropePositions = [Vec<Vec<u32>>; 3];

/// transformers' `get_rope_index` for images: `ids` and `real` (B rows of T), `grids` the (t, h, w) patch
/// grids of the images in the order their `<|image_pad|>` runs appear across the batch. Text tokens count up
/// one by one; an image's merged patch (frame, row, col) sits at `(p, p + row, p + col)`, `p` the position
/// after the text before it, and the text after it continues from `p + max(rows, cols)`.
pub fn rope_index(
    cfg: &Config,
    ids: &[Vec<u32>],
    real: &[Vec<bool>],
    grids: &[[usize; 3]],
) -> Result<MropePositions> {
    let merge = cfg.vision.spatial_merge_size;
    let mut out: MropePositions = std::array::from_fn(|_| Vec::with_capacity(ids.len()));
    let mut next_image = 0;
    for (row, (row_ids, row_real)) in ids.iter().zip(real).enumerate() {
        let tokens: Vec<u32> = row_ids
            .iter()
            .zip(row_real)
            .filter(|(_, r)| **r)
            .map(|(&id, _)| id)
            .collect();
        let mut pos: [Vec<u32>; 3] = std::array::from_fn(|_| Vec::with_capacity(tokens.len()));
        let mut current = 0u32;
        let mut i = 0;
        while i < tokens.len() {
            if tokens[i] != cfg.image_token_id {
                pos.iter_mut().for_each(|axis| axis.push(current));
                current += 1;
                i += 1;
                continue;
            }
            let [t, h, w] = *grids.get(next_image).ok_or_else(|| {
                Error::msg(format!(
                    "row {row}: image {next_image} has pad tokens but only {} grids were given",
                    grids.len()
                ))
            })?;
            let (gh, gw) = (h / merge, w / merge);
            let n = t * gh * gw;
            if tokens.len() < i + n || tokens[i..i + n].iter().any(|&id| id != cfg.image_token_id) {
                return Err(Error::msg(format!(
                    "row {row}: image {next_image} (grid {t} x {h} x {w}) needs a run of {n} pad tokens"
                )));
            }
            next_image += 1;
            for frame in 0..t as u32 {
                for r in 0..gh as u32 {
                    for c in 0..gw as u32 {
                        pos[0].push(current + frame);
                        pos[1].push(current + r);
                        pos[2].push(current + c);
                    }
                }
            }
            current += gh.max(gw) as u32;
            i += n;
        }
        // Scatter the real tokens' positions into the row; padding gets 0.
        for (axis, values) in pos.into_iter().enumerate() {
            let mut values = values.into_iter();
            let full: Vec<u32> = row_real
                .iter()
                .map(|&r| if r { values.next().unwrap_or(0) } else { 0 })
                .collect();
            out[axis].push(full);
        }
    }
    if next_image != grids.len() {
        return Err(Error::msg(format!(
            "{} image grids were given but the input ids hold {next_image} images",
            grids.len()
        )));
    }
    Ok(out)
}

/// The decoder plus the multimodal rotary tables; `VarBuilder` as [`qwen2::Model`] (at the LLM prefix).
#[derive(Debug, Clone)]
pub struct TextModel {
    /// The Qwen2 decoder (its own 1D RoPE is not used).
    pub model: qwen2::Model,
    /// Inverse frequencies `theta^(-2i/d)`, d / 2 of them.
    inv_freq: Vec<f32>,
    mrope_section: [usize; 3],
}

impl TextModel {
    /// Wraps a decoder built from `cfg.text`.
    pub fn new(cfg: &Config, model: qwen2::Model) -> Self {
        let dim = cfg.text.head_dim();
        let inv_freq = (0..dim / 2)
            .map(|i| 1.0 / cfg.text.rope_theta.powf(2.0 * i as f64 / dim as f64) as f32)
            .collect();
        Self {
            model,
            inv_freq,
            mrope_section: cfg.mrope_section,
        }
    }

    /// cos, sin (B, T, D/2): frequency i takes its angle from the axis whose section holds i.
    fn cos_sin(&self, positions: &MropePositions, device: &Device) -> Result<(Tensor, Tensor)> {
        let (b, t) = (positions[0].len(), positions[0].first().map_or(0, Vec::len));
        let axis_of: Vec<usize> = (0..3)
            .flat_map(|axis| std::iter::repeat_n(axis, self.mrope_section[axis]))
            .collect();
        let mut angles = Vec::with_capacity(b * t * self.inv_freq.len());
        let [temporal, height, width] = positions;
        for ((t_row, h_row), w_row) in temporal.iter().zip(height).zip(width) {
            for ((&pt, &ph), &pw) in t_row.iter().zip(h_row).zip(w_row) {
                let axes = [pt as f32, ph as f32, pw as f32];
                for (f, &axis) in self.inv_freq.iter().zip(&axis_of) {
                    angles.push(axes[axis] * f);
                }
            }
        }
        let angles = Tensor::from_vec(angles, (b, t, self.inv_freq.len()), device)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    /// embeds (B, T, D), mask (B, T) 1 = token (`None`: no padding), three-axis positions ->
    /// final-normed hidden states (B, T, D).
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: &MropePositions,
    ) -> Result<Tensor> {
        let (b, t, _) = embeds.dims3()?;
        check_positions(positions, b, t)?;
        let real = mask_rows(attention_mask, b, t)?;
        let layout = KvCache::new(0).begin_step(&real, embeds.device())?;
        let (cos, sin) = self.cos_sin(positions, embeds.device())?;
        let (cos, sin) = (cos.to_dtype(embeds.dtype())?, sin.to_dtype(embeds.dtype())?);
        let mut x = embeds.clone();
        for (i, layer) in self.model.layers.iter().enumerate() {
            x = layer.forward(&x, &cos, &sin, &layout.mask, i, None)?;
        }
        self.model.norm.forward(&x)
    }
}

impl TextModel {
    /// The prefix-shared forward of [`qwen2::Model::forward_prefixed`] with three-axis positions: prompts
    /// (Bp, P, D) with `prompt_mask` and `prompt_positions`, responses (B, R, D) with `attention_mask` and
    /// `positions`, response row b after prompt `prompt_of[b]`. Returns the final-normed hidden states of
    /// the prompts (Bp, P, D) and of the responses (B, R, D).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_prefixed(
        &self,
        prompt_embeds: &Tensor,
        prompt_mask: Option<&Tensor>,
        prompt_positions: &MropePositions,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: &MropePositions,
        prompt_of: &[usize],
    ) -> Result<(Tensor, Tensor)> {
        let (bp, p, _) = prompt_embeds.dims3()?;
        let (b, r, _) = embeds.dims3()?;
        check_positions(prompt_positions, bp, p)?;
        check_positions(positions, b, r)?;
        self.model.forward_prefixed_with(
            prompt_embeds,
            prompt_mask,
            embeds,
            attention_mask,
            prompt_of,
            |is_prompt, _, dtype| {
                let side = if is_prompt {
                    prompt_positions
                } else {
                    positions
                };
                let (cos, sin) = self.cos_sin(side, embeds.device())?;
                Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
            },
        )
    }

    /// Cached forward of a prompt (a prefill): embeds (B, T, D) and mask (B, T) into an empty `cache`, with
    /// the three-axis `positions`; returns the final-normed hidden states (B, T, D). Afterwards each row's
    /// next position is its largest position + 1, so decode steps run as plain 1D steps of the Qwen2 decoder:
    /// transformers continues at `cache length + rope delta` (`rope_deltas = max position + 1 - length`) on
    /// all three axes, and a rotary angle whose three axes agree is the 1D angle. After an error the cache
    /// is unusable: clear it.
    pub fn prefill(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: &MropePositions,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t, _) = embeds.dims3()?;
        check_positions(positions, b, t)?;
        if cache.seq_len() != 0 || cache.num_layers() != self.model.layers.len() {
            return Err(Error::msg(format!(
                "Qwen2.5-VL prefill needs an empty KV cache for {} layers (it holds {} slots for {} layers)",
                self.model.layers.len(),
                cache.seq_len(),
                cache.num_layers()
            )));
        }
        let real = mask_rows(attention_mask, b, t)?;
        let layout = cache.begin_step(&real, embeds.device())?;
        let (cos, sin) = self.cos_sin(positions, embeds.device())?;
        let (cos, sin) = (cos.to_dtype(embeds.dtype())?, sin.to_dtype(embeds.dtype())?);
        let mut x = embeds.clone();
        for (i, layer) in self.model.layers.iter().enumerate() {
            x = layer.forward(&x, &cos, &sin, &layout.mask, i, Some(cache))?;
        }
        let next: Vec<u32> = (0..b)
            .map(|row| {
                (0..t)
                    .filter(|&slot| real[row][slot])
                    .flat_map(|slot| positions.iter().map(move |axis| axis[row][slot] + 1))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        cache.set_next_positions(&next)?;
        self.model.norm.forward(&x)
    }
}

/// An error unless `positions` hold (B, T) values on each axis.
fn check_positions(positions: &MropePositions, b: usize, t: usize) -> Result<()> {
    if positions
        .iter()
        .any(|axis| axis.len() != b || axis.iter().any(|r| r.len() != t))
    {
        return Err(Error::msg(format!(
            "mrope positions do not match the input ({b}, {t})"
        )));
    }
    Ok(())
}

/// Per-row token ids and real flags.
pub(crate) type RowsAndReal = (Vec<Vec<u32>>, Vec<Vec<bool>>);

/// (B, T) real flags and ids of a (B, T) u32 id tensor and optional mask.
pub(crate) fn ids_and_real(
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
) -> Result<RowsAndReal> {
    let (b, t) = input_ids.dims2()?;
    let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok((ids, mask_rows(attention_mask, b, t)?))
}
